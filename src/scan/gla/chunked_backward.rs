//! The chunked backward of `scan.gla` on the CPU: the gradients of a chunk as the small matrix
//! products of the forward's chunked form (see `chunked`), instead of CHUNK rank-1 steps.
//!
//! Per chunk of n steps from state S0, with E[t] = e^{G[t]} (the running product of e^{g}
//! from the chunk start), q̃ = scale·q∘E, k̃ = k∘e^{G_last − G}, kŝ = k∘e^{−G} and
//! A = (q̃·kŝᵀ) masked causal, the forward is o = q̃·S0 + A·v and
//! S_end = diag(E_last)·S0 + k̃ᵀ·v. Given do and dS = ∂L/∂S_end:
//!   dA  = (do·vᵀ) masked causal
//!   dq  = scale·E∘(do·S0ᵀ + dA·kŝ)
//!   dk  = e^{−G}∘(dAᵀ·q̃) + e^{G_last − G}∘(v·dSᵀ)
//!   dv  = Aᵀ·do + k̃·dS
//!   dS0 = diag(E_last)·dS + q̃ᵀ·do
//!   dg[τ] = Σ_{t>=τ} (q[t]∘dq[t] − k[t]∘dk[t]) + Σ_τ k̃∘(v·dSᵀ) + E_last∘rowsum(dS∘S0),
//! the last line because G[t] = Σ_{τ<=t} g[τ]: q̃ depends on G[t] as e^{G}, k̃ and kŝ as
//! e^{−G} (q·dq and k·dk collect exactly those terms), and G_last enters through k̃ and
//! diag(E_last). Every product reads operands of the layouts `gemm_acc` takes (A through any
//! strides, B row-major), so the states are kept transposed (Sᵀ, V×K) for do·S0ᵀ, dS only
//! as dSᵀ (for v·dSᵀ), and dv is formed transposed (dvᵀ = doᵀ·A + dSᵀ·k̃ᵀ, with a K×CHUNK
//! copy of k̃ᵀ): one K×V product per chunk fewer than keeping dS in both layouts.
//!
//! A chunk whose cumulative gates leave [e^-L, e^L] (the forward's GATE_LIMIT) cannot use the
//! factored kŝ = k∘e^{−G} without overflow: its A and the dA terms of dq and dk are formed
//! pair by pair with e^{G[t] − G[τ]} instead (exact, slower, and only for such chunks), as the
//! forward does.
//!
//! A task is a group of adjacent heads of one batch row, as in the forward: a forward pass
//! stores Sᵀ of every head at every chunk start (K·V values per head and chunk), then the
//! chunks are walked backward, each chunk of every head in turn, so one head's rows are read
//! right after its neighbour's on the same pages (one head per task walked every page of
//! every tensor once per head: its page walks were a large part of the loads' misses). Each
//! head's results depend only on its own rows, in a fixed order, so they do not depend on
//! the grouping or the thread count.

use super::chunked::{CHUNK, GATE_LIMIT};
use super::{GlaInputs, GlaShape, exp_in_place, narrow, widen};
use crate::cpu::gemm::{Strided, gemm_acc, gemm_scaled_acc, gemm_set};
use crate::cpu::scratch::Scratch;
use crate::cpu::{SendPtr, Simd, SimdKernel, prefetch};
use crate::element::{Accum, Element};

/// Where one task writes its gradients: its own rows of dq, dk, dg, dv (and block of dh0).
#[derive(Clone, Copy)]
pub(super) struct GradPtrs<E: Element> {
    pub dq: SendPtr<E>,
    pub dk: SendPtr<E>,
    pub dv: SendPtr<E>,
    pub dg: SendPtr<E>,
    pub dh0: Option<SendPtr<E::Acc>>,
}

pub(super) struct ChunkedBackwardHeads<'a, E: Element> {
    pub shape: GlaShape,
    pub inputs: &'a GlaInputs<'a, E>,
    pub d_o: &'a [E],
    pub dh_last: Option<&'a [E::Acc]>,
    pub batch: usize,
    pub heads: std::ops::Range<usize>,
    pub scale: E::Acc,
    pub out: GradPtrs<E>,
}

impl<E: Element> SimdKernel for ChunkedBackwardHeads<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            shape,
            inputs,
            d_o,
            dh_last,
            batch,
            heads,
            scale,
            out,
        } = self;
        let (t_len, kd, vd) = (shape.len, shape.key_dim, shape.value_dim);
        let zero = <E::Acc as Accum>::ZERO;
        let size = kd * vd;
        let chunks = t_len.div_ceil(CHUNK);
        let group = heads.len();
        let bh = |i: usize| batch * shape.heads + heads.start + i;
        let mut w = Work::<E::Acc>::new(kd, vd);

        // forward: Sᵀ (V×K) of every head before every chunk, [chunk][head]
        // reused across calls (megabytes: a fresh mapping costs a page fault per 4 KiB); every
        // value is written below before it is read
        let mut states = Scratch::take(chunks * group * size, zero);
        for i in 0..group {
            let at = &mut states[i * size..(i + 1) * size];
            match inputs.h0 {
                Some(h0) => transpose(&h0[bh(i) * size..(bh(i) + 1) * size], kd, vd, at),
                None => at.fill(zero),
            }
        }
        // the units (chunk, head) in the order walked: one chunk of every head, then the next
        let units = (0..chunks.saturating_sub(1)).flat_map(|c| (0..group).map(move |i| (c, i)));
        let ahead_of = |c: usize, i: usize| match i + 1 < group {
            true => Some((bh(i + 1), c * CHUNK)),
            false => (c + 2 < chunks).then(|| (bh(0), (c + 1) * CHUNK)),
        };
        for (c, i) in units {
            let (t0, n) = (c * CHUNK, CHUNK.min(t_len - c * CHUNK));
            w.load::<S, E>(
                inputs,
                d_o,
                &shape,
                bh(i),
                t0,
                n,
                false,
                ahead_of(c, i),
                None,
            );
            w.gates::<S>(n, scale, false);
            let (done, next) = states.split_at_mut(((c + 1) * group + i) * size);
            let (s0, s1) = (&done[(c * group + i) * size..][..size], &mut next[..size]);
            // Sᵀ_end = Sᵀ0·diag(E_last) + vᵀ·k̃
            // SAFETY: vᵀ read through strides (V rows at stride 1, n inner at stride vd) of
            // the n×V workspace, k̃ n rows of kd, s0 and s1 V rows of kd, E_last kd values;
            // s1 overlaps none of them.
            unsafe {
                gemm_scaled_acc::<S, E::Acc>(
                    vd,
                    kd,
                    n,
                    Strided {
                        ptr: w.v.as_ptr(),
                        row_stride: 1,
                        inner_stride: vd,
                    },
                    w.kt.as_ptr(),
                    kd,
                    s1.as_mut_ptr(),
                    kd,
                    (s0.as_ptr(), kd, w.last.as_ptr()),
                );
            }
        }

        // backward: dSᵀ (V×K) of every head from dh_last, walked back chunk by chunk
        let mut ds = vec![zero; group * size];
        if let Some(x) = dh_last {
            for (i, ds_t) in ds.chunks_exact_mut(size).enumerate() {
                transpose(&x[bh(i) * size..(bh(i) + 1) * size], kd, vd, ds_t);
            }
        }
        let ahead_of = |c: usize, i: usize| match (i + 1 < group, c.checked_sub(1)) {
            (true, _) => Some((bh(i + 1), c * CHUNK, (c * group + i + 1) * size)),
            (false, Some(p)) => Some((bh(0), p * CHUNK, p * group * size)),
            (false, None) => None,
        };
        for c in (0..chunks).rev() {
            for (i, ds_t) in ds.chunks_exact_mut(size).enumerate() {
                let (t0, n) = (c * CHUNK, CHUNK.min(t_len - c * CHUNK));
                let ahead = ahead_of(c, i);
                let state = ahead.map(|(_, _, at)| &states[at..at + size]);
                let rows = ahead.map(|(h, t, _)| (h, t));
                w.load::<S, E>(inputs, d_o, &shape, bh(i), t0, n, true, rows, state);
                let factored = w.gates::<S>(n, scale, true);
                let s0 = &states[(c * group + i) * size..][..size];
                w.chunk::<S>(n, scale, factored, s0, ds_t);
                // dSᵀ0 = dSᵀ·diag(E_last) + doᵀ·q̃, in place
                let ds_ptr = ds_t.as_mut_ptr();
                // SAFETY: doᵀ (V rows at stride 1, n inner at stride vd), q̃ (n rows of kd)
                // and E_last (kd values) read from the workspace; dSᵀ is its own V×K buffer,
                // read as the start before each place is written.
                unsafe {
                    gemm_scaled_acc::<S, E::Acc>(
                        vd,
                        kd,
                        n,
                        Strided {
                            ptr: w.d_o.as_ptr(),
                            row_stride: 1,
                            inner_stride: vd,
                        },
                        w.qt.as_ptr(),
                        kd,
                        ds_ptr,
                        kd,
                        (ds_ptr.cast_const(), kd, w.last.as_ptr()),
                    );
                }
                w.store::<S, E>(&shape, bh(i), t0, n, out, rows);
            }
        }
        if let Some(dh0) = out.dh0 {
            let mut block = vec![zero; size];
            for (i, ds_t) in ds.chunks_exact(size).enumerate() {
                transpose(ds_t, vd, kd, &mut block);
                for (j, x) in block.iter().enumerate() {
                    // SAFETY: this task's own head's block [bh·K·V, (bh + 1)·K·V) of dh0.
                    unsafe { *dh0.get().add(bh(i) * size + j) = *x };
                }
            }
        }
    }
}

/// One chunk's rows (n ≤ CHUNK of K or V values, widened) and products, reused across chunks.
struct Work<A: Accum> {
    kd: usize,
    vd: usize,
    /// raw q, k and log-gates
    q: Vec<A>,
    k: Vec<A>,
    g: Vec<A>,
    v: Vec<A>,
    d_o: Vec<A>,
    /// e^{G[t]} per row
    e: Vec<A>,
    /// e^{G_last − G[τ]} per row
    suffix: Vec<A>,
    /// q̃ = scale·q∘E, k̃ = k∘suffix, kŝ = k̃∘e^{−G_last}
    qt: Vec<A>,
    kt: Vec<A>,
    ks: Vec<A>,
    /// e^{G_last} and its inverse
    last: Vec<A>,
    inv_last: Vec<A>,
    attn: [A; CHUNK * CHUNK],
    d_attn: [A; CHUNK * CHUNK],
    /// the gradients of the chunk's rows, and dk's two parts
    dq: Vec<A>,
    dk: Vec<A>,
    dk_state: Vec<A>,
    dg: Vec<A>,
    /// k̃ᵀ (K×CHUNK) and dvᵀ (V×CHUNK)
    kt_t: Vec<A>,
    dv_t: Vec<A>,
    /// vᵀ (V×CHUNK), and q̃∘e^{−G_last}: the chunk's products A = (q̃∘e^{−G_last})·k̃ᵀ and
    /// dA = do·vᵀ read a row-major right operand
    v_t: Vec<A>,
    qs: Vec<A>,
    /// K values of scratch: the running suffix product, then dg's running sum
    run: Vec<A>,
}

impl<A: Accum> Work<A> {
    fn new(kd: usize, vd: usize) -> Self {
        let z = A::ZERO;
        let rows_k = || vec![z; CHUNK * kd];
        let rows_v = || vec![z; CHUNK * vd];
        Self {
            kd,
            vd,
            q: rows_k(),
            k: rows_k(),
            g: rows_k(),
            v: rows_v(),
            d_o: rows_v(),
            e: rows_k(),
            suffix: rows_k(),
            qt: rows_k(),
            kt: rows_k(),
            ks: rows_k(),
            last: vec![z; kd],
            inv_last: vec![z; kd],
            attn: [z; CHUNK * CHUNK],
            d_attn: [z; CHUNK * CHUNK],
            dq: rows_k(),
            dk: rows_k(),
            dk_state: rows_k(),
            dg: rows_k(),
            kt_t: rows_k(),
            dv_t: rows_v(),
            v_t: rows_v(),
            qs: rows_k(),
            run: vec![z; kd],
        }
    }

    /// Rows t0..t0+n of head `bh`: k, g, v, and with `all` also q and do. Meanwhile asks for
    /// n rows of the unit loaded next (`ahead`: its head and first step) and for `state`,
    /// the state it reads: the rows lie H·K values apart, a stride the hardware prefetchers
    /// do not follow, and without the hint their misses were a fifth of the profile.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn load<S: Simd, E: Element<Acc = A>>(
        &mut self,
        inputs: &GlaInputs<'_, E>,
        d_o: &[E],
        shape: &GlaShape,
        bh: usize,
        t0: usize,
        n: usize,
        all: bool,
        ahead: Option<(usize, usize)>,
        state: Option<&[A]>,
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let row = |bh: usize, t: usize| {
            let (bi, hi) = (bh / shape.heads, bh % shape.heads);
            (bi * shape.len + t) * shape.heads + hi
        };
        let state_part = state.map_or(0, |s| s.len().div_ceil(n));
        for j in 0..n {
            // a few lines per row between the work (a burst of a chunk's lines measured
            // slower in the forward: the misses queue up)
            if let Some((next_bh, next_t0)) = ahead {
                let base = row(next_bh, next_t0 + j);
                prefetch(inputs.k[base * kd..].as_ptr(), kd);
                prefetch(inputs.g[base * kd..].as_ptr(), kd);
                prefetch(inputs.v[base * vd..].as_ptr(), vd);
                if all {
                    prefetch(inputs.q[base * kd..].as_ptr(), kd);
                    prefetch(d_o[base * vd..].as_ptr(), vd);
                }
            }
            if let Some(s) = state {
                let from = (j * state_part).min(s.len());
                prefetch(s[from..].as_ptr(), state_part.min(s.len() - from));
            }
            let base = row(bh, t0 + j);
            let (at_k, at_v) = (base * kd, base * vd);
            widen::<S, E>(&inputs.k[at_k..at_k + kd], &mut self.k[j * kd..][..kd]);
            widen::<S, E>(&inputs.g[at_k..at_k + kd], &mut self.g[j * kd..][..kd]);
            widen::<S, E>(&inputs.v[at_v..at_v + vd], &mut self.v[j * vd..][..vd]);
            if all {
                widen::<S, E>(&inputs.q[at_k..at_k + kd], &mut self.q[j * kd..][..kd]);
                widen::<S, E>(&d_o[at_v..at_v + vd], &mut self.d_o[j * vd..][..vd]);
            }
        }
        if all {
            for (c, col) in self.v_t.chunks_exact_mut(CHUNK).enumerate() {
                for (t, x) in col[..n].iter_mut().enumerate() {
                    *x = self.v[t * vd + c];
                }
            }
        }
    }

    /// E, suffix, E_last and k̃ from the loaded rows; with `all` also q̃, and kŝ where the
    /// factored form applies, returning whether it does (every E[t] within [e^-L, e^L]; NaN
    /// fails the test and takes the pairwise form). Without `all`, returns false.
    #[inline(always)]
    fn gates<S: Simd>(&mut self, n: usize, scale: A, all: bool) -> bool {
        let kd = self.kd;
        let nk = n * kd;
        // e^{g} into `suffix` for now
        self.suffix[..nk].copy_from_slice(&self.g[..nk]);
        exp_in_place::<S, A>(&mut self.suffix[..nk]);
        self.e[..kd].copy_from_slice(&self.suffix[..kd]);
        for t in 1..n {
            let (done, rest) = self.e.split_at_mut(t * kd);
            let (prev, eg) = (&done[(t - 1) * kd..], &self.suffix[t * kd..]);
            map::<S, _, 2>(&mut rest[..kd], [prev, eg], |_, [x, eg]| mul::<S, A>(x, eg));
        }
        self.last.copy_from_slice(&self.e[(n - 1) * kd..nk]);
        // suffix[τ] = Π_{τ<u<n} e^{g[u]}, from the end, replacing e^{g} row by row
        let run = &mut self.run;
        run.fill(A::ONE);
        for t in (0..n).rev() {
            let rows = t * kd..(t + 1) * kd;
            map::<S, _, 2>(
                &mut self.kt[rows.clone()],
                [&self.k[rows.clone()], run],
                |_, [k, r]| mul::<S, A>(k, r),
            );
            // suffix[t] = run, run = run·e^{g[t]}
            let suffix = &mut self.suffix[rows];
            map::<S, _, 1>(suffix, [run], |eg, [r]| mul::<S, A>(r, eg));
            suffix.swap_with_slice(run);
        }
        if all {
            for (c, col) in self.kt_t.chunks_exact_mut(CHUNK).enumerate() {
                for (t, x) in col[..n].iter_mut().enumerate() {
                    *x = self.kt[t * kd + c];
                }
            }
        }
        if !all {
            // the state's update needs neither q̃ nor the factored form
            return false;
        }
        let (low, high) = (
            A::from_f64((-GATE_LIMIT).exp()),
            A::from_f64(GATE_LIMIT.exp()),
        );
        // `&`, not `&&`: one pass without branches
        let outside = (self.e[..nk].iter()).fold(0u32, |count, p| {
            count + u32::from(!((*p >= low) & (*p <= high)))
        });
        let inside = outside == 0;
        let scale_v = splat::<S, A>(scale);
        map::<S, _, 2>(&mut self.qt[..nk], [&self.q, &self.e], |_, [q, e]| {
            mul::<S, A>(mul::<S, A>(scale_v, q), e)
        });
        if inside {
            for (i, l) in self.inv_last.iter_mut().zip(&self.last) {
                *i = A::ONE / *l;
            }
            for (ks, kt) in (self.ks[..nk].chunks_exact_mut(kd)).zip(self.kt.chunks_exact(kd)) {
                map::<S, _, 2>(ks, [kt, &self.inv_last], |_, [k, i]| mul::<S, A>(k, i));
            }
            for (qs, qt) in (self.qs[..nk].chunks_exact_mut(kd)).zip(self.qt.chunks_exact(kd)) {
                map::<S, _, 2>(qs, [qt, &self.inv_last], |_, [q, i]| mul::<S, A>(q, i));
            }
        }
        inside
    }

    /// The chunk's dq, dk, dg (workspace rows) and dvᵀ from Sᵀ0 and dSᵀ at its end.
    #[inline(always)]
    fn chunk<S: Simd>(&mut self, n: usize, scale: A, factored: bool, s0_t: &[A], ds_t: &[A]) {
        let (kd, vd) = (self.kd, self.vd);
        let (zero, nk) = (A::ZERO, n * kd);
        self.attn.fill(zero);
        // SAFETY: do (n rows of vd) and vᵀ (vd rows of CHUNK, n used) are workspace buffers;
        // dA is CHUNK×CHUNK and overlaps neither.
        unsafe {
            gemm_set::<S, A>(
                n,
                n,
                vd,
                Strided {
                    ptr: self.d_o.as_ptr(),
                    row_stride: vd,
                    inner_stride: 1,
                },
                self.v_t.as_ptr(),
                CHUNK,
                self.d_attn.as_mut_ptr(),
                CHUNK,
            );
        }
        causal_mask(&mut self.d_attn, n);
        if factored {
            // A = q̃·kŝᵀ = (q̃∘e^{−G_last})·k̃ᵀ; above the diagonal the factors reach at most
            // e^{2·GATE_LIMIT}, finite in f32, and those entries are then cleared
            // SAFETY: as for dA, with qs (n rows of kd) and k̃ᵀ (kd rows of CHUNK).
            unsafe {
                gemm_set::<S, A>(
                    n,
                    n,
                    kd,
                    Strided {
                        ptr: self.qs.as_ptr(),
                        row_stride: kd,
                        inner_stride: 1,
                    },
                    self.kt_t.as_ptr(),
                    CHUNK,
                    self.attn.as_mut_ptr(),
                    CHUNK,
                );
            }
            causal_mask(&mut self.attn, n);
        }
        // SAFETY: every operand is a workspace buffer of at least the rows × columns passed
        // (n <= CHUNK rows of kd or vd; attn CHUNK×CHUNK; Sᵀ0 and dSᵀ V×K), read through the
        // strides given; no output overlaps an operand. (The same holds for the products
        // below.)
        unsafe {
            // dq (before scaling) = do·S0ᵀ
            gemm_set::<S, A>(
                n,
                kd,
                vd,
                Strided {
                    ptr: self.d_o.as_ptr(),
                    row_stride: vd,
                    inner_stride: 1,
                },
                s0_t.as_ptr(),
                kd,
                self.dq.as_mut_ptr(),
                kd,
            );
            // dk's state part = v·dSᵀ
            gemm_set::<S, A>(
                n,
                kd,
                vd,
                Strided {
                    ptr: self.v.as_ptr(),
                    row_stride: vd,
                    inner_stride: 1,
                },
                ds_t.as_ptr(),
                kd,
                self.dk_state.as_mut_ptr(),
                kd,
            );
        }
        if factored {
            // SAFETY: as above; dA is causal (zeros above the diagonal), dAᵀ read through
            // strides.
            unsafe {
                gemm_acc::<S, A>(
                    n,
                    kd,
                    n,
                    Strided {
                        ptr: self.d_attn.as_ptr(),
                        row_stride: CHUNK,
                        inner_stride: 1,
                    },
                    self.ks.as_ptr(),
                    kd,
                    self.dq.as_mut_ptr(),
                    kd,
                    true,
                );
                gemm_set::<S, A>(
                    n,
                    kd,
                    n,
                    Strided {
                        ptr: self.d_attn.as_ptr(),
                        row_stride: 1,
                        inner_stride: CHUNK,
                    },
                    self.qt.as_ptr(),
                    kd,
                    self.dk.as_mut_ptr(),
                    kd,
                );
            }
            // dq = scale·E∘(…); dk = suffix∘(dAᵀq̃∘e^{−G_last} + v·dSᵀ)
            self.scale_dq::<S>(n, scale);
            let rows = (self.dk[..nk].chunks_exact_mut(kd))
                .zip(self.dk_state.chunks_exact(kd))
                .zip(self.suffix.chunks_exact(kd));
            for ((dk, dk_state), suffix) in rows {
                map::<S, _, 3>(dk, [dk_state, suffix, &self.inv_last], |x, [d, s, i]| {
                    mul::<S, A>(s, add::<S, A>(mul::<S, A>(x, i), d))
                });
            }
        } else {
            self.scale_dq::<S>(n, scale);
            map::<S, _, 2>(
                &mut self.dk[..nk],
                [&self.suffix, &self.dk_state],
                |_, [s, d]| mul::<S, A>(s, d),
            );
            self.pairwise(n, scale);
        }
        // SAFETY: as the products above; k̃ᵀ is K rows of CHUNK, dvᵀ V rows of CHUNK.
        unsafe {
            // dvᵀ = doᵀ·A + dSᵀ·k̃ᵀ (dv = Aᵀ·do + k̃·dS, transposed: dS is kept as dSᵀ only)
            gemm_set::<S, A>(
                vd,
                n,
                n,
                Strided {
                    ptr: self.d_o.as_ptr(),
                    row_stride: 1,
                    inner_stride: vd,
                },
                self.attn.as_ptr(),
                CHUNK,
                self.dv_t.as_mut_ptr(),
                CHUNK,
            );
            gemm_acc::<S, A>(
                vd,
                n,
                kd,
                Strided {
                    ptr: ds_t.as_ptr(),
                    row_stride: kd,
                    inner_stride: 1,
                },
                self.kt_t.as_ptr(),
                CHUNK,
                self.dv_t.as_mut_ptr(),
                CHUNK,
                false,
            );
        }
        // dg: from the end, Σ_{t>=τ} (q∘dq − k∘dk) on top of the G_last terms
        let acc = &mut self.run;
        acc.fill(zero);
        let mul_add = |a: A::V<S>, [x, y]: [A::V<S>; 2]| add::<S, A>(a, mul::<S, A>(x, y));
        for (ds_row, s_row) in ds_t.chunks_exact(kd).zip(s0_t.chunks_exact(kd)) {
            map::<S, _, 2>(acc, [ds_row, s_row], mul_add);
        }
        map::<S, _, 1>(acc, [&self.last], |a, [l]| mul::<S, A>(l, a));
        for (kt, d) in self.kt[..nk]
            .chunks_exact(kd)
            .zip(self.dk_state.chunks_exact(kd))
        {
            map::<S, _, 2>(acc, [kt, d], mul_add);
        }
        let minus = splat::<S, A>(A::ZERO - A::ONE);
        for t in (0..n).rev() {
            let at = t * kd..(t + 1) * kd;
            let (q, dq) = (&self.q[at.clone()], &self.dq[at.clone()]);
            let (k, dk) = (&self.k[at.clone()], &self.dk[at.clone()]);
            // a + q·dq − k·dk, as a + q·dq + (−k)·dk: the same rounding
            map::<S, _, 4>(acc, [q, dq, k, dk], |a, [q, dq, k, dk]| {
                let a = add::<S, A>(a, mul::<S, A>(q, dq));
                add::<S, A>(a, mul::<S, A>(mul::<S, A>(minus, k), dk))
            });
            self.dg[at].copy_from_slice(acc);
        }
    }

    /// dq = scale·E∘dq over the chunk's n rows.
    #[inline(always)]
    fn scale_dq<S: Simd>(&mut self, n: usize, scale: A) {
        let scale_v = splat::<S, A>(scale);
        map::<S, _, 1>(&mut self.dq[..n * self.kd], [&self.e], |x, [e]| {
            mul::<S, A>(mul::<S, A>(scale_v, e), x)
        });
    }

    /// A and the dA terms of dq and dk pair by pair, with e^{G[t] − G[τ]} as e^{running sum
    /// of the log-gates}, for a chunk outside the factored form's range.
    fn pairwise(&mut self, n: usize, scale: A) {
        let kd = self.kd;
        let mut span = vec![A::ZERO; kd];
        for t in 0..n {
            span.fill(A::ZERO);
            for tau in (0..=t).rev() {
                if tau < t {
                    for (s, g) in span.iter_mut().zip(&self.g[(tau + 1) * kd..]) {
                        *s = *s + *g;
                    }
                }
                let d = scale * self.d_attn[t * CHUNK + tau];
                let mut a = A::ZERO;
                for (c, s) in span.iter().enumerate() {
                    let decay = s.exp();
                    let (q, k) = (self.q[t * kd + c], self.k[tau * kd + c]);
                    a = a + q * k * decay;
                    self.dq[t * kd + c] = self.dq[t * kd + c] + d * k * decay;
                    self.dk[tau * kd + c] = self.dk[tau * kd + c] + d * q * decay;
                }
                self.attn[t * CHUNK + tau] = scale * a;
            }
        }
    }

    /// The chunk's gradient rows into the task's own rows of the outputs; meanwhile asks for
    /// the output rows of the unit stored next (`ahead`: its head and first step), so its
    /// stores do not wait on their lines (as `load` does for the inputs).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn store<S: Simd, E: Element<Acc = A>>(
        &self,
        shape: &GlaShape,
        bh: usize,
        t0: usize,
        n: usize,
        out: GradPtrs<E>,
        ahead: Option<(usize, usize)>,
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let row = |bh: usize, t: usize| {
            let (bi, hi) = (bh / shape.heads, bh % shape.heads);
            (bi * shape.len + t) * shape.heads + hi
        };
        for j in 0..n {
            if let Some((next_bh, next_t0)) = ahead {
                let base = row(next_bh, next_t0 + j);
                // a hint on addresses formed without dereferencing (see `prefetch`)
                let at_k = |p: SendPtr<E>| p.get().wrapping_add(base * kd).cast_const();
                prefetch(at_k(out.dq), kd);
                prefetch(at_k(out.dk), kd);
                prefetch(at_k(out.dg), kd);
                prefetch(out.dv.get().wrapping_add(base * vd).cast_const(), vd);
            }
            let base = row(bh, t0 + j);
            let rk = j * kd..(j + 1) * kd;
            // SAFETY: row (bi, t0 + j, hi) of dq, dk, dg (kd values) and dv (vd values)
            // belongs to this task alone.
            unsafe {
                narrow::<S, E>(&self.dq[rk.clone()], out.dq.get().add(base * kd));
                narrow::<S, E>(&self.dk[rk.clone()], out.dk.get().add(base * kd));
                narrow::<S, E>(&self.dg[rk], out.dg.get().add(base * kd));
                let dv = out.dv.get().add(base * vd);
                for (c, col) in self.dv_t.chunks_exact(CHUNK).enumerate() {
                    *dv.add(c) = E::from_acc(col[j]);
                }
            }
        }
    }
}

/// `out[i] = f(out[i], xs[0][i], …)` over `out`, a vector at a time and the tail one value
/// at a time with the same operations (IEEE, one rounding each: the same bits either way).
/// Written out because the compiler left these loops over the workspace's fields scalar.
/// The inputs must be at least as long as `out`.
#[inline(always)]
fn map<S: Simd, A: Accum, const N: usize>(
    out: &mut [A],
    xs: [&[A]; N],
    f: impl Fn(A::V<S>, [A::V<S>; N]) -> A::V<S>,
) {
    const { assert!(N < 5, "map takes at most four inputs") };
    let (len, lanes) = (out.len(), A::lanes::<S>());
    let xs = xs.map(|x| &x[..len]);
    let whole = len - len % lanes;
    // SAFETY: c + lanes <= whole <= len, the length of `out` and of every input; the ISA is
    // `S`, the caller's (inside `dispatch`).
    unsafe {
        for c in (0..whole).step_by(lanes) {
            let args = xs.map(|x| A::vload::<S>(x.as_ptr().add(c)));
            let at = out.as_mut_ptr().add(c);
            A::vstore::<S>(at, f(A::vload::<S>(at), args));
        }
    }
    // the tail through a lanes-wide buffer, so `f` is the only formula
    if whole < len {
        let mut buf = [[A::ZERO; MAX_LANES]; 5];
        let tail = len - whole;
        buf[0][..tail].copy_from_slice(&out[whole..]);
        for (b, x) in buf[1..].iter_mut().zip(&xs) {
            b[..tail].copy_from_slice(&x[whole..]);
        }
        // SAFETY: every buffer holds MAX_LANES >= lanes values.
        unsafe {
            let args: [A::V<S>; N] = std::array::from_fn(|i| A::vload::<S>(buf[i + 1].as_ptr()));
            let r = f(A::vload::<S>(buf[0].as_ptr()), args);
            A::vstore::<S>(buf[0].as_mut_ptr(), r);
        }
        out[whole..].copy_from_slice(&buf[0][..tail]);
    }
}

/// The widest vector of any ISA, in values (f32 on AVX-512).
const MAX_LANES: usize = 16;

// The vector operations `map`'s closures use. SAFETY (each): only called inside `map`'s
// closures, which run on the ISA `S` (the caller is inside `dispatch`).
#[inline(always)]
fn mul<S: Simd, A: Accum>(a: A::V<S>, b: A::V<S>) -> A::V<S> {
    // SAFETY: see above.
    unsafe { A::vmul::<S>(a, b) }
}
#[inline(always)]
fn add<S: Simd, A: Accum>(a: A::V<S>, b: A::V<S>) -> A::V<S> {
    // SAFETY: see above.
    unsafe { A::vadd::<S>(a, b) }
}
#[inline(always)]
fn splat<S: Simd, A: Accum>(x: A) -> A::V<S> {
    // SAFETY: see above.
    unsafe { A::vsplat::<S>(x) }
}

/// Zeros above the diagonal of the chunk's n×n block (a causal A or dA).
fn causal_mask<A: Accum>(x: &mut [A; CHUNK * CHUNK], n: usize) {
    for (t, row) in x.chunks_exact_mut(CHUNK).take(n).enumerate() {
        row[t + 1..].fill(A::ZERO);
    }
}

/// `to` (V×K) = `from` (K×V) transposed.
fn transpose<A: Accum>(from: &[A], kd: usize, vd: usize, to: &mut [A]) {
    for (kk, row) in from.chunks_exact(vd).enumerate() {
        for (c, x) in row.iter().enumerate() {
            to[c * kd + kk] = *x;
        }
    }
}
