//! The chunked form of `scan.gla` on the CPU: chunks of CHUNK steps, each three small matrix
//! products on L1-resident blocks instead of CHUNK rank-1 updates of the state.
//!
//! Within a chunk starting from state S0, with cumulative log-gates G[t] = Σ_{τ<=t} g[τ]
//! (per key channel, from the chunk start):
//!   o[t]  = scale·(q[t]∘e^{G[t]})·S0 + Σ_{τ<=t} A[t,τ]·v[τ],
//!   A[t,τ] = scale·Σ_k q[t,k]·k[τ,k]·e^{G[t,k] − G[τ,k]},
//!   S_end = diag(e^{G_last})·S0 + Σ_τ (k[τ]∘e^{G_last − G[τ]})ᵀ·v[τ].
//! Every exponent above is a difference G[t] − G[τ] ≤ 0 (for gates ≤ 0), so nothing
//! overflows. The products into S and o use e^{G[t]} and e^{G_last − G[τ]} (both ≤ 1, formed
//! as running products of e^{g}: one exponential per gate, and a -inf gate gives exact
//! zeros where it counts, never -inf − -inf). A is
//! factored as (q[t]∘e^{G[t] − G_last})·(k[τ]∘e^{G_last − G[τ]}) when the chunk's cumulative
//! gates stay within ±GATE_LIMIT (every factor then lies in [e^-2L, e^2L], far from f32's
//! range limits); a chunk with stronger gates (a sum below −40 over 16 steps) forms each
//! e^{G[t] − G[τ]} directly instead: exact, and slower only for such chunks.
//!
//! Flops per step: 4·K·V for the two state products (as the recurrence) plus about
//! CHUNK·(K + V) for A and A·V, run as register-tiled products (see `cpu::gemm`).
//!
//! A task owns a group of adjacent heads of one batch row and advances them chunk by chunk
//! together: the rows of one head are H rows apart in `[B, T, H, K]`, and walking one head
//! alone touches a new page every row or two (measured: a third of the time went to those
//! loads at H = 8); the heads of a group share their pages and cache lines.

use super::{GlaInputs, GlaShape, exp_in_place, padded_stride, row};
use crate::cpu::gemm::{Strided, gemm_acc};
use crate::cpu::{SendPtr, Simd, SimdKernel, prefetch};
use crate::element::{Accum, Element};

/// Steps per chunk: the per-step cost of the state products does not depend on it, the
/// intra-chunk part grows with it, and 16 rows are enough for full register tiles.
pub(super) const CHUNK: usize = 16;

/// Bound on |cumulative log-gate| within a chunk for the factored form of A.
const GATE_LIMIT: f64 = 40.0;

pub(super) struct ChunkedHeads<'a, E: Element> {
    pub shape: GlaShape,
    pub inputs: &'a GlaInputs<'a, E>,
    pub batch: usize,
    pub heads: std::ops::Range<usize>,
    pub scale: E::Acc,
    pub o: SendPtr<E>,
    pub h_last: SendPtr<E::Acc>,
}

impl<E: Element> SimdKernel for ChunkedHeads<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            shape,
            inputs,
            batch,
            heads,
            scale,
            o,
            h_last,
        } = self;
        let (kd, vd) = (shape.key_dim, shape.value_dim);
        let zero = <E::Acc as Accum>::ZERO;
        let stride = padded_stride(vd);
        let mut states: Vec<Vec<E::Acc>> = heads
            .clone()
            .map(|hi| {
                let mut state = vec![zero; kd * stride];
                if let Some(h0) = inputs.h0 {
                    let bh = batch * shape.heads + hi;
                    for kk in 0..kd {
                        let src = (bh * kd + kk) * vd;
                        state[kk * stride..kk * stride + vd].copy_from_slice(&h0[src..src + vd]);
                    }
                }
                state
            })
            .collect();
        let mut work: Vec<Workspace<E::Acc>> =
            heads.clone().map(|_| Workspace::new(kd, vd)).collect();
        let rows = |head| Rows {
            shape: &shape,
            batch,
            head,
        };
        let mut t0 = 0;
        while t0 < shape.len {
            let n = CHUNK.min(shape.len - t0);
            // the group's rows, time-major: each step's heads are adjacent in memory, so the
            // loads run through whole segments of G·K values
            for j in 0..n {
                for (w, hi) in work.iter_mut().zip(heads.clone()) {
                    w.load(inputs, &rows(hi), t0 + j, j);
                }
            }
            // fetch the next chunk's rows while this one computes
            for t in t0 + n..(t0 + n + CHUNK).min(shape.len) {
                let (first, count) = (rows(heads.start), heads.len());
                prefetch(inputs.q[first.at(t, kd)..].as_ptr(), count * kd);
                prefetch(inputs.k[first.at(t, kd)..].as_ptr(), count * kd);
                prefetch(inputs.g[first.at(t, kd)..].as_ptr(), count * kd);
                prefetch(inputs.v[first.at(t, vd)..].as_ptr(), count * vd);
            }
            for ((state, w), hi) in states.iter_mut().zip(&mut work).zip(heads.clone()) {
                w.advance::<S>(state, stride, n, scale);
                let rows = rows(hi);
                for j in 0..n {
                    let at = rows.at(t0 + j, vd);
                    for (c, x) in w.o[j * vd..(j + 1) * vd].iter().enumerate() {
                        // SAFETY: row (batch, t, hi) of o belongs to this task's heads.
                        unsafe { *o.get().add(at + c) = E::from_acc(*x) };
                    }
                }
            }
            t0 += n;
        }
        for (state, hi) in states.iter().zip(heads) {
            let bh = batch * shape.heads + hi;
            for (kk, r) in state.chunks_exact(stride).enumerate() {
                for (c, x) in r[..vd].iter().enumerate() {
                    // SAFETY: this task's heads' own blocks of h_last.
                    unsafe { *h_last.get().add((bh * kd + kk) * vd + c) = *x };
                }
            }
        }
    }
}

/// Where the rows of one (batch, head) lie in a `[B, T, H, X]` tensor.
struct Rows<'a> {
    shape: &'a GlaShape,
    batch: usize,
    head: usize,
}

impl Rows<'_> {
    fn at(&self, t: usize, width: usize) -> usize {
        ((self.batch * self.shape.len + t) * self.shape.heads + self.head) * width
    }
}

/// One chunk's rows ([CHUNK][K] or [CHUNK][V], widened) and scratch, reused across chunks.
struct Workspace<A: Accum> {
    kd: usize,
    vd: usize,
    /// q, then scale·q∘e^{G}
    q: Vec<A>,
    /// k, then k∘e^{G_last − G}
    k: Vec<A>,
    /// the log-gates as given
    gates: Vec<A>,
    /// e^{G[t]}: running products of e^{g}
    prefix: Vec<A>,
    /// e^{G_last − G[t]}: running products of e^{g} from the end
    suffix: Vec<A>,
    v: Vec<A>,
    o: Vec<A>,
    attn: [A; CHUNK * CHUNK],
    tmp: Vec<A>,
}

impl<A: Accum> Workspace<A> {
    fn new(kd: usize, vd: usize) -> Self {
        let z = A::ZERO;
        Self {
            kd,
            vd,
            q: vec![z; CHUNK * kd],
            k: vec![z; CHUNK * kd],
            gates: vec![z; CHUNK * kd],
            prefix: vec![z; CHUNK * kd],
            suffix: vec![z; CHUNK * kd],
            v: vec![z; CHUNK * vd],
            o: vec![z; CHUNK * vd],
            attn: [z; CHUNK * CHUNK],
            tmp: vec![z; CHUNK * kd],
        }
    }

    /// Widens step `t` of these rows into row `j` of the chunk.
    #[inline(always)]
    fn load<E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        rows: &Rows,
        t: usize,
        j: usize,
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let (shape, bh) = (rows.shape, rows.batch * rows.shape.heads + rows.head);
        row(
            inputs.q,
            shape,
            bh,
            t,
            kd,
            &mut self.q[j * kd..(j + 1) * kd],
        );
        row(
            inputs.k,
            shape,
            bh,
            t,
            kd,
            &mut self.k[j * kd..(j + 1) * kd],
        );
        row(
            inputs.g,
            shape,
            bh,
            t,
            kd,
            &mut self.gates[j * kd..(j + 1) * kd],
        );
        row(
            inputs.v,
            shape,
            bh,
            t,
            vd,
            &mut self.v[j * vd..(j + 1) * vd],
        );
    }

    /// Computes the chunk's outputs into `o` (n rows) and advances `state` past the chunk.
    #[inline(always)]
    fn advance<S: Simd>(&mut self, state: &mut [A], stride: usize, n: usize, scale: A) {
        let (kd, vd) = (self.kd, self.vd);
        let zero = A::ZERO;
        let (low, high) = (
            A::from_f64((-GATE_LIMIT).exp()),
            A::from_f64(GATE_LIMIT.exp()),
        );
        // e^{g}, then its running products both ways
        let prefix = &mut self.prefix[..n * kd];
        prefix.copy_from_slice(&self.gates[..n * kd]);
        exp_in_place::<S, A>(prefix);
        let suffix = &mut self.suffix[..n * kd];
        suffix[(n - 1) * kd..].fill(A::ONE);
        for j in (0..n - 1).rev() {
            for kk in 0..kd {
                suffix[j * kd + kk] = suffix[(j + 1) * kd + kk] * prefix[(j + 1) * kd + kk];
            }
        }
        for j in 1..n {
            for kk in 0..kd {
                prefix[j * kd + kk] = prefix[(j - 1) * kd + kk] * prefix[j * kd + kk];
            }
        }
        // the factored form needs every e^{G[t]} within [e^-L, e^L]; NaN fails the test
        // too and takes the direct path (which carries the NaN). A fold without early exit
        // vectorizes.
        let factored = prefix
            .iter()
            .fold(true, |ok, x| ok & (*x >= low) & (*x <= high));

        let attn = &mut self.attn;
        attn.fill(zero);
        if !factored {
            // A[t,τ] = scale·Σ_k q·k·e^{Σ_{τ<u<=t} g[u]}, from the raw q and k, walking τ down
            // from t so that the exponent is a running sum of the log-gates
            for t in 0..n {
                let span = &mut self.tmp[..kd];
                span.fill(zero);
                for tau in (0..=t).rev() {
                    if tau < t {
                        for (s, g) in span.iter_mut().zip(&self.gates[(tau + 1) * kd..]) {
                            *s = *s + *g;
                        }
                    }
                    let (qt, kt) = (&self.q[t * kd..][..kd], &self.k[tau * kd..][..kd]);
                    let mut acc = zero;
                    for ((x, y), s) in qt.iter().zip(kt).zip(span.iter()) {
                        acc = acc + *x * *y * s.exp();
                    }
                    attn[t * CHUNK + tau] = scale * acc;
                }
            }
        }
        // q ← scale·q∘e^G;  k ← k∘e^{G_last − G}
        for (x, e) in self.q[..n * kd].iter_mut().zip(&*prefix) {
            *x = scale * *x * *e;
        }
        for (x, e) in self.k[..n * kd].iter_mut().zip(&*suffix) {
            *x = *x * *e;
        }
        let last = &prefix[(n - 1) * kd..];
        if factored {
            // A[t,τ] = (q̃[t]∘e^{−G_last})·k̃[τ]
            let (inv_last, row) = self.tmp.split_at_mut(kd);
            for (i, x) in inv_last.iter_mut().zip(last) {
                *i = A::ONE / *x;
            }
            for t in 0..n {
                for kk in 0..kd {
                    row[kk] = self.q[t * kd + kk] * inv_last[kk];
                }
                for tau in 0..=t {
                    attn[t * CHUNK + tau] = dot::<S, A>(&row[..kd], &self.k[tau * kd..][..kd]);
                }
            }
        }
        // o = q̃·S0 + A·v
        let o = &mut self.o[..n * vd];
        o.fill(zero);
        // SAFETY: every operand is a live buffer of the sizes passed (n <= CHUNK rows of kd or
        // vd, the state kd rows at `stride`); o overlaps none of them.
        unsafe {
            gemm_acc::<S, A>(
                n,
                vd,
                kd,
                Strided {
                    ptr: self.q.as_ptr(),
                    row_stride: kd,
                    inner_stride: 1,
                },
                state.as_ptr(),
                stride,
                o.as_mut_ptr(),
                vd,
                false,
            );
            gemm_acc::<S, A>(
                n,
                vd,
                n,
                Strided {
                    ptr: attn.as_ptr(),
                    row_stride: CHUNK,
                    inner_stride: 1,
                },
                self.v.as_ptr(),
                vd,
                o.as_mut_ptr(),
                vd,
                true,
            );
        }
        // S = diag(e^{G_last})·S0 + k̃ᵀ·v
        for (r, d) in state.chunks_exact_mut(stride).zip(last) {
            for x in &mut r[..vd] {
                *x = *d * *x;
            }
        }
        // SAFETY: k̃ read transposed (kd rows at stride 1, n inner at stride kd); the state is
        // kd rows of vd at `stride` and overlaps neither k nor v.
        unsafe {
            gemm_acc::<S, A>(
                kd,
                vd,
                n,
                Strided {
                    ptr: self.k.as_ptr(),
                    row_stride: 1,
                    inner_stride: kd,
                },
                self.v.as_ptr(),
                vd,
                state.as_mut_ptr(),
                stride,
                false,
            );
        }
    }
}

/// Σ x·y over two equal-length slices: vector partial sums, then the lanes in order.
#[inline(always)]
fn dot<S: Simd, A: Accum>(x: &[A], y: &[A]) -> A {
    let lanes = A::lanes::<S>();
    let whole = x.len() - x.len() % lanes;
    let mut total = A::ZERO;
    if whole > 0 {
        // SAFETY: i + lanes <= whole <= len of both slices; the lane buffer holds 16 values,
        // the widest vector (AVX-512 f32).
        unsafe {
            let mut acc = A::vsplat::<S>(A::ZERO);
            let mut i = 0;
            while i < whole {
                acc = A::vfma::<S>(
                    A::vload::<S>(x.as_ptr().add(i)),
                    A::vload::<S>(y.as_ptr().add(i)),
                    acc,
                );
                i += lanes;
            }
            let mut parts = [A::ZERO; 16];
            A::vstore::<S>(parts.as_mut_ptr(), acc);
            for p in &parts[..lanes] {
                total = total + *p;
            }
        }
    }
    for (a, b) in x[whole..].iter().zip(&y[whole..]) {
        total = total + *a * *b;
    }
    total
}
