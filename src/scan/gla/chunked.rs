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
//! factored as (q[t]∘e^{G[t]})·(k[τ]∘e^{G_last − G[τ]}∘e^{−G_last}) when the chunk's
//! cumulative gates stay within ±GATE_LIMIT (every factor then lies in [e^-2L, e^2L], far
//! from f32's range limits); a chunk with stronger gates (a sum below −40 over 16 steps)
//! forms each e^{G[t] − G[τ]} directly instead: exact, and slower only for such chunks.
//!
//! Flops per step: 4·K·V for the two state products (as the recurrence) plus about
//! CHUNK·(K + V) for A and A·V, run as register-tiled products (see `cpu::gemm`).
//!
//! A task owns a group of adjacent heads of one batch row and advances them chunk by chunk
//! together: the rows of one head are H rows apart in `[B, T, H, K]`, and walking one head
//! alone through the sequence touches a new page every row or two; the heads of a group take
//! their turns on the same chunk, so they share its pages and cache lines. Each head's rows
//! are read straight from the inputs by the passes that transform them (no staging copies),
//! and the group shares one workspace, so that a head's chunk works in about L1's size.
//! When the element type is the accumulator type (f32, f64), the products also read v and
//! write o in the tensors themselves, rows H apart, instead of through workspace copies.

use super::{GlaInputs, GlaShape, narrow, padded_stride, row, widen};
use crate::cpu::gemm::{Strided, gemm_acc};
use crate::cpu::{SendPtr, Simd, SimdKernel, prefetch};
use crate::element::{Accum, Element, as_acc};

/// Steps per chunk: the per-step cost of the state products does not depend on it, the
/// intra-chunk part grows with it, and 16 rows are enough for full register tiles.
pub(super) const CHUNK: usize = 16;

/// Bound on |cumulative log-gate| within a chunk for the factored form of A.
pub(super) const GATE_LIMIT: f64 = 40.0;

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
        let mut work = Workspace::new(kd, vd);
        // f32 and f64 are their own accumulator types: values are then read and outputs
        // written in place (the two staging copies were ~10% of the profile)
        let v_as_acc = as_acc(inputs.v);
        let mut t0 = 0;
        while t0 < shape.len {
            let n = CHUNK.min(shape.len - t0);
            for (state, hi) in states.iter_mut().zip(heads.clone()) {
                let rows = Rows {
                    shape: &shape,
                    batch,
                    head: hi,
                };
                let in_place = v_as_acc.map(|v| {
                    let at = rows.at(t0, vd);
                    InPlace {
                        v: v[at..].as_ptr(),
                        // SAFETY: `as_acc` returned Some, so E is E::Acc; row (batch, t0, hi)
                        // of o exists (validated shapes) and belongs to this task.
                        o: unsafe { o.get().add(at).cast::<E::Acc>() },
                        stride: shape.heads * vd,
                    }
                });
                let direct = in_place.is_some();
                work.advance::<S, E>(inputs, &rows, t0, n, state, stride, scale, in_place);
                if direct {
                    continue;
                }
                for j in 0..n {
                    let (at, from) = (rows.at(t0 + j, vd), &work.o[j * vd..(j + 1) * vd]);
                    // SAFETY: row (batch, t, hi) of o belongs to this task's heads and holds
                    // vd elements, as many as `from`.
                    unsafe { narrow::<S, E>(from, o.get().add(at)) };
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

/// A chunk's rows of v (read) and o (written) in the tensors themselves, `stride` apart.
struct InPlace<A> {
    v: *const A,
    o: *mut A,
    stride: usize,
}

/// One chunk's transformed rows ([CHUNK][K] or [CHUNK][V], widened) and scratch, reused
/// across chunks and heads.
struct Workspace<A: Accum> {
    kd: usize,
    vd: usize,
    /// scale·q∘e^{G}
    q: Vec<A>,
    /// e^{g}, then k̃ = k∘e^{G_last − G}
    k: Vec<A>,
    /// k̃∘e^{−G_last} (= k∘e^{−G}), the right factor of the factored A
    k_scores: Vec<A>,
    v: Vec<A>,
    o: Vec<A>,
    attn: [A; CHUNK * CHUNK],
    /// e^{G} of the latest row: after the forward pass, e^{G_last}
    prefix: Vec<A>,
    /// e^{G_last − G} of the row being formed, from the end
    suffix: Vec<A>,
    /// e^{−G_last}
    inv_last: Vec<A>,
    /// the raw q, k and log-gates, for the direct form of A only
    raw: Vec<A>,
}

impl<A: Accum> Workspace<A> {
    fn new(kd: usize, vd: usize) -> Self {
        let z = A::ZERO;
        Self {
            kd,
            vd,
            q: vec![z; CHUNK * kd],
            k: vec![z; CHUNK * kd],
            k_scores: vec![z; CHUNK * kd],
            v: vec![z; CHUNK * vd],
            o: vec![z; CHUNK * vd],
            attn: [z; CHUNK * CHUNK],
            prefix: vec![z; kd],
            suffix: vec![z; kd],
            inv_last: vec![z; kd],
            raw: vec![z; 3 * CHUNK * kd],
        }
    }

    /// Computes the outputs of steps t0..t0+n of one head into `o` (n rows), or straight
    /// into the output rows with `in_place` (then v is read there too), and advances its
    /// `state` past them.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn advance<S: Simd, E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        rows: &Rows,
        t0: usize,
        n: usize,
        state: &mut [A],
        stride: usize,
        scale: A,
        in_place: Option<InPlace<A>>,
    ) {
        let factored = self.forward_pass::<S, E>(inputs, rows, t0, n, scale);
        self.backward_pass::<S, E>(inputs, rows, t0, n, factored, in_place.is_none());
        self.attn.fill(A::ZERO);
        if factored {
            causal_scores::<S, A>(&self.q, &self.k_scores, self.kd, n, &mut self.attn);
        } else {
            self.direct_scores(inputs, rows, t0, n, scale);
        }
        let (kd, vd) = (self.kd, self.vd);
        let (v, v_stride, o, o_stride) = match in_place {
            Some(rows) => (rows.v, rows.stride, rows.o, rows.stride),
            None => (self.v.as_ptr(), vd, self.o.as_mut_ptr(), vd),
        };
        // o = q̃·S0 + A·v
        for j in 0..n {
            // SAFETY: row j of o holds vd values (the workspace's, or this task's output row).
            unsafe { std::slice::from_raw_parts_mut(o.add(j * o_stride), vd).fill(A::ZERO) };
        }
        // SAFETY: every operand is a live buffer of the sizes passed (n <= CHUNK rows of kd or
        // vd, the state kd rows at `stride`, v and o n rows at their strides); o overlaps
        // none of them.
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
                o,
                o_stride,
                false,
            );
            gemm_acc::<S, A>(
                n,
                vd,
                n,
                Strided {
                    ptr: self.attn.as_ptr(),
                    row_stride: CHUNK,
                    inner_stride: 1,
                },
                v,
                v_stride,
                o,
                o_stride,
                true,
            );
        }
        // S = diag(e^{G_last})·S0 + k̃ᵀ·v
        for (r, d) in state.chunks_exact_mut(stride).zip(&self.prefix) {
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
                v,
                v_stride,
                state.as_mut_ptr(),
                stride,
                false,
            );
        }
    }

    /// Forward over the chunk: e^{g} into `k` (for the backward pass), its running product
    /// e^{G} in `prefix`, and q̃ = scale·q∘e^{G} into `q`. Returns whether the factored form
    /// of A applies: every e^{G[t]} within [e^-L, e^L] (NaN fails the test too and takes the
    /// direct form, which carries it).
    #[inline(always)]
    fn forward_pass<S: Simd, E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        rows: &Rows,
        t0: usize,
        n: usize,
        scale: A,
    ) -> bool {
        let kd = self.kd;
        let lanes = A::lanes::<S>();
        let whole = kd - kd % lanes;
        let (low, high) = (
            A::from_f64((-GATE_LIMIT).exp()),
            A::from_f64(GATE_LIMIT.exp()),
        );
        let mut outside = 0u32;
        for t in 0..n {
            // the same row of the next chunk, a few lines at a time between the work (a
            // burst of a chunk's lines measured slower: the misses queue up)
            if t0 + t + CHUNK < rows.shape.len {
                let ahead = rows.at(t0 + t + CHUNK, kd);
                prefetch(inputs.q[ahead..].as_ptr(), kd);
                prefetch(inputs.g[ahead..].as_ptr(), kd);
            }
            let at = rows.at(t0 + t, kd);
            let (q_in, g_in) = (&inputs.q[at..at + kd], &inputs.g[at..at + kd]);
            let (q_row, e_row) = (&mut self.q[t * kd..][..kd], &mut self.k[t * kd..][..kd]);
            let prefix = &mut self.prefix[..kd];
            // SAFETY: c + lanes <= whole <= kd, the length of every slice here.
            unsafe {
                let (scale_v, low_v, high_v) = (
                    A::vsplat::<S>(scale),
                    A::vsplat::<S>(low),
                    A::vsplat::<S>(high),
                );
                for c in (0..whole).step_by(lanes) {
                    let e = A::vexp::<S>(E::vload::<S>(g_in.as_ptr().add(c)));
                    let p = if t == 0 {
                        e
                    } else {
                        A::vmul::<S>(A::vload::<S>(prefix.as_ptr().add(c)), e)
                    };
                    let q = A::vmul::<S>(E::vload::<S>(q_in.as_ptr().add(c)), scale_v);
                    A::vstore::<S>(prefix.as_mut_ptr().add(c), p);
                    A::vstore::<S>(e_row.as_mut_ptr().add(c), e);
                    A::vstore::<S>(q_row.as_mut_ptr().add(c), A::vmul::<S>(q, p));
                    outside |= A::vmask_nle::<S>(low_v, p) | A::vmask_nle::<S>(p, high_v);
                }
            }
            for c in whole..kd {
                let e = g_in[c].to_acc().exp();
                let p = if t == 0 { e } else { prefix[c] * e };
                prefix[c] = p;
                e_row[c] = e;
                q_row[c] = q_in[c].to_acc() * scale * p;
                outside |= u32::from(!(p >= low && p <= high));
            }
        }
        outside == 0
    }

    /// Backward over the chunk: k̃ = k∘e^{G_last − G} into `k` (in place of e^{g}, whose
    /// running product from the end is e^{G_last − G}), k_scores = k̃∘e^{−G_last} when
    /// `factored`, and v widened into `v` when `copy_v`.
    #[inline(always)]
    fn backward_pass<S: Simd, E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        rows: &Rows,
        t0: usize,
        n: usize,
        factored: bool,
        copy_v: bool,
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let lanes = A::lanes::<S>();
        let k_whole = kd - kd % lanes;
        if factored {
            for (i, p) in self.inv_last.iter_mut().zip(&self.prefix) {
                *i = A::ONE / *p;
            }
        }
        self.suffix.fill(A::ONE);
        for t in (0..n).rev() {
            if t0 + t + CHUNK < rows.shape.len {
                prefetch(inputs.k[rows.at(t0 + t + CHUNK, kd)..].as_ptr(), kd);
                prefetch(inputs.v[rows.at(t0 + t + CHUNK, vd)..].as_ptr(), vd);
            }
            let at = rows.at(t0 + t, kd);
            let k_in = &inputs.k[at..at + kd];
            let k_row = &mut self.k[t * kd..][..kd];
            let scores_row = &mut self.k_scores[t * kd..][..kd];
            let (suffix, inv_last) = (&mut self.suffix[..kd], &self.inv_last[..kd]);
            // SAFETY: c + lanes <= k_whole <= kd, the length of every slice here.
            unsafe {
                for c in (0..k_whole).step_by(lanes) {
                    let (e, s) = (
                        A::vload::<S>(k_row.as_ptr().add(c)),
                        A::vload::<S>(suffix.as_ptr().add(c)),
                    );
                    let kt = A::vmul::<S>(E::vload::<S>(k_in.as_ptr().add(c)), s);
                    A::vstore::<S>(k_row.as_mut_ptr().add(c), kt);
                    if factored {
                        let i = A::vload::<S>(inv_last.as_ptr().add(c));
                        A::vstore::<S>(scores_row.as_mut_ptr().add(c), A::vmul::<S>(kt, i));
                    }
                    A::vstore::<S>(suffix.as_mut_ptr().add(c), A::vmul::<S>(s, e));
                }
            }
            for c in k_whole..kd {
                let (e, s) = (k_row[c], suffix[c]);
                k_row[c] = k_in[c].to_acc() * s;
                scores_row[c] = k_row[c] * inv_last[c];
                suffix[c] = s * e;
            }
            if !copy_v {
                continue;
            }
            let at = rows.at(t0 + t, vd);
            widen::<S, E>(&inputs.v[at..at + vd], &mut self.v[t * vd..][..vd]);
        }
    }

    /// A[t,τ] = scale·Σ_k q·k·e^{Σ_{τ<u<=t} g[u]}, from the raw rows, walking τ down from t
    /// so that the exponent is a running sum of the log-gates.
    fn direct_scores<E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        rows: &Rows,
        t0: usize,
        n: usize,
        scale: A,
    ) {
        let kd = self.kd;
        let (q, rest) = self.raw.split_at_mut(CHUNK * kd);
        let (k, gates) = rest.split_at_mut(CHUNK * kd);
        for j in 0..n {
            let bh = rows.batch * rows.shape.heads + rows.head;
            row(inputs.q, rows.shape, bh, t0 + j, kd, &mut q[j * kd..][..kd]);
            row(inputs.k, rows.shape, bh, t0 + j, kd, &mut k[j * kd..][..kd]);
            row(
                inputs.g,
                rows.shape,
                bh,
                t0 + j,
                kd,
                &mut gates[j * kd..][..kd],
            );
        }
        let mut span = vec![A::ZERO; kd];
        for t in 0..n {
            span.fill(A::ZERO);
            for tau in (0..=t).rev() {
                if tau < t {
                    for (s, g) in span.iter_mut().zip(&gates[(tau + 1) * kd..]) {
                        *s = *s + *g;
                    }
                }
                let (qt, kt) = (&q[t * kd..][..kd], &k[tau * kd..][..kd]);
                let mut acc = A::ZERO;
                for ((x, y), s) in qt.iter().zip(kt).zip(&span) {
                    acc = acc + *x * *y * s.exp();
                }
                self.attn[t * CHUNK + tau] = scale * acc;
            }
        }
    }
}

/// out[t·CHUNK + τ] = x[t]·y[τ] for τ <= t < n (rows of `dim` values; entries above the
/// diagonal are left as they are), in blocks of 2 rows × 4 columns: 8 independent vector
/// sums, each x and y vector loaded once per block: the chunk's A (q̃ by k_scores).
#[inline(always)]
fn causal_scores<S: Simd, A: Accum>(
    x: &[A],
    y: &[A],
    dim: usize,
    n: usize,
    out: &mut [A; CHUNK * CHUNK],
) {
    const ROWS: usize = 2;
    const COLS: usize = 4;
    let lanes = A::lanes::<S>();
    let whole = dim - dim % lanes;
    let (q, k) = (&x[..n * dim], &y[..n * dim]);
    for t in (0..n).step_by(ROWS) {
        let last_row = (t + ROWS - 1).min(n - 1);
        // rows past the chunk or columns past the diagonal repeat a valid row; their sums
        // are not stored
        let ts: [usize; ROWS] = std::array::from_fn(|i| (t + i).min(last_row));
        for tau in (0..=last_row).step_by(COLS) {
            let taus: [usize; COLS] = std::array::from_fn(|j| (tau + j).min(last_row));
            let mut sums = [[A::ZERO; COLS]; ROWS];
            // SAFETY: every row index is < n and c + lanes <= whole <= dim; the lane
            // buffer holds 16 values, the widest vector (AVX-512 f32).
            unsafe {
                let mut acc = [[A::vsplat::<S>(A::ZERO); COLS]; ROWS];
                for c in (0..whole).step_by(lanes) {
                    let kv: [A::V<S>; COLS] =
                        std::array::from_fn(|j| A::vload::<S>(k.as_ptr().add(taus[j] * dim + c)));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let qv = A::vload::<S>(q.as_ptr().add(ts[i] * dim + c));
                        for (x, kv) in row.iter_mut().zip(&kv) {
                            *x = A::vfma::<S>(qv, *kv, *x);
                        }
                    }
                }
                let mut parts = [A::ZERO; 16];
                for (row, sum_row) in acc.iter().zip(&mut sums) {
                    for (x, sum) in row.iter().zip(sum_row) {
                        A::vstore::<S>(parts.as_mut_ptr(), *x);
                        *sum = lane_sum(&mut parts[..lanes]);
                    }
                }
            }
            for (i, sum_row) in sums.iter_mut().enumerate() {
                for (j, sum) in sum_row.iter_mut().enumerate() {
                    for c in whole..dim {
                        *sum = *sum + q[ts[i] * dim + c] * k[taus[j] * dim + c];
                    }
                }
            }
            for (i, sum_row) in sums.iter().enumerate() {
                for (j, sum) in sum_row.iter().enumerate() {
                    if t + i < n && tau + j <= t + i {
                        out[(t + i) * CHUNK + tau + j] = *sum;
                    }
                }
            }
        }
    }
}

/// The lanes of one vector summed pairwise (a fixed order); `parts` holds a power of two.
#[inline(always)]
fn lane_sum<A: Accum>(parts: &mut [A]) -> A {
    let mut len = parts.len();
    while len > 1 {
        len /= 2;
        for i in 0..len {
            parts[i] = parts[i] + parts[i + len];
        }
    }
    parts[0]
}
