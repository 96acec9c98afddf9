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
//! A task is one (batch, head): a forward pass stores Sᵀ at every chunk start (K·V values per
//! chunk), then the chunks are walked backward. Each task writes only its own rows of the
//! gradients, so the result does not depend on the thread count.

use super::chunked::{CHUNK, GATE_LIMIT};
use super::{GlaInputs, GlaShape, exp_in_place, narrow, widen};
use crate::cpu::gemm::{Strided, gemm_acc, gemm_set};
use crate::cpu::scratch::Scratch;
use crate::cpu::{SendPtr, Simd, SimdKernel};
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

pub(super) struct ChunkedBackwardHead<'a, E: Element> {
    pub shape: GlaShape,
    pub inputs: &'a GlaInputs<'a, E>,
    pub d_o: &'a [E],
    pub dh_last: Option<&'a [E::Acc]>,
    pub bh: usize,
    pub scale: E::Acc,
    pub out: GradPtrs<E>,
}

impl<E: Element> SimdKernel for ChunkedBackwardHead<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            shape,
            inputs,
            d_o,
            dh_last,
            bh,
            scale,
            out,
        } = self;
        let (t_len, kd, vd) = (shape.len, shape.key_dim, shape.value_dim);
        let zero = <E::Acc as Accum>::ZERO;
        let size = kd * vd;
        let chunks = t_len.div_ceil(CHUNK);
        let mut w = Work::<E::Acc>::new(kd, vd);

        // forward: Sᵀ (V×K) before every chunk
        // reused across calls (megabytes: a fresh mapping costs a page fault per 4 KiB); every
        // value is written below before it is read
        let mut states = Scratch::take(chunks * size, zero);
        match inputs.h0 {
            Some(h0) => transpose(&h0[bh * size..(bh + 1) * size], kd, vd, &mut states[..size]),
            None => states[..size].fill(zero),
        }
        for c in 0..chunks.saturating_sub(1) {
            let (t0, n) = (c * CHUNK, CHUNK.min(t_len - c * CHUNK));
            w.load::<S, E>(inputs, d_o, &shape, bh, t0, n, false);
            w.gates::<S>(n, scale, false);
            let (done, next) = states.split_at_mut((c + 1) * size);
            let (s0, s1) = (&done[c * size..], &mut next[..size]);
            // Sᵀ_end = Sᵀ0·diag(E_last) + vᵀ·k̃
            for (to, from) in s1.chunks_exact_mut(kd).zip(s0.chunks_exact(kd)) {
                for ((x, s), e) in to.iter_mut().zip(from).zip(&w.last) {
                    *x = *s * *e;
                }
            }
            // SAFETY: vᵀ read through strides (V rows at stride 1, n inner at stride vd) of
            // the n×V workspace, k̃ n rows of kd, s1 V rows of kd; s1 overlaps neither.
            unsafe {
                gemm_acc::<S, E::Acc>(
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
                    false,
                );
            }
        }

        // backward: dSᵀ (V×K) from dh_last, walked back chunk by chunk
        let mut ds_t = vec![zero; size];
        if let Some(x) = dh_last {
            transpose(&x[bh * size..(bh + 1) * size], kd, vd, &mut ds_t);
        }
        for c in (0..chunks).rev() {
            let (t0, n) = (c * CHUNK, CHUNK.min(t_len - c * CHUNK));
            w.load::<S, E>(inputs, d_o, &shape, bh, t0, n, true);
            let factored = w.gates::<S>(n, scale, true);
            w.chunk::<S>(n, scale, factored, &states[c * size..(c + 1) * size], &ds_t);
            // dSᵀ0 = dSᵀ·diag(E_last) + doᵀ·q̃
            for r in ds_t.chunks_exact_mut(kd) {
                for (x, e) in r.iter_mut().zip(&w.last) {
                    *x = *e * *x;
                }
            }
            // SAFETY: doᵀ (V rows at stride 1, n inner at stride vd) and q̃ (n rows of kd) read
            // from the workspace; dSᵀ is its own V×K buffer.
            unsafe {
                gemm_acc::<S, E::Acc>(
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
                    ds_t.as_mut_ptr(),
                    kd,
                    false,
                );
            }
            w.store::<S, E>(&shape, bh, t0, n, out);
        }
        if let Some(dh0) = out.dh0 {
            let mut ds = vec![zero; size];
            transpose(&ds_t, vd, kd, &mut ds);
            for (i, x) in ds.iter().enumerate() {
                // SAFETY: this task's own block [bh·K·V, (bh + 1)·K·V) of dh0.
                unsafe { *dh0.get().add(bh * size + i) = *x };
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

    /// Rows t0..t0+n of one head: k, g, v, and with `all` also q and do.
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
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let (bi, hi) = (bh / shape.heads, bh % shape.heads);
        for j in 0..n {
            let base = (bi * shape.len + t0 + j) * shape.heads + hi;
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
            let prev = &done[(t - 1) * kd..];
            for ((p, x), eg) in rest[..kd].iter_mut().zip(prev).zip(&self.suffix[t * kd..]) {
                *p = *x * *eg;
            }
        }
        self.last.copy_from_slice(&self.e[(n - 1) * kd..nk]);
        // suffix[τ] = Π_{τ<u<n} e^{g[u]}, from the end, replacing e^{g} row by row
        let run = &mut self.run;
        run.fill(A::ONE);
        for t in (0..n).rev() {
            let rows = self.suffix[t * kd..][..kd]
                .iter_mut()
                .zip(&mut self.kt[t * kd..][..kd])
                .zip(&self.k[t * kd..][..kd]);
            for (((s, kt), k), r) in rows.zip(run.iter_mut()) {
                let eg = *s;
                *s = *r;
                *kt = *k * *r;
                *r = *r * eg;
            }
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
        for (x, (q, e)) in self.qt[..nk].iter_mut().zip(self.q.iter().zip(&self.e)) {
            *x = scale * *q * *e;
        }
        if inside {
            for (i, l) in self.inv_last.iter_mut().zip(&self.last) {
                *i = A::ONE / *l;
            }
            for (ks, kt) in (self.ks[..nk].chunks_exact_mut(kd)).zip(self.kt.chunks_exact(kd)) {
                for ((x, k), i) in ks.iter_mut().zip(kt).zip(&self.inv_last) {
                    *x = *k * *i;
                }
            }
            for (qs, qt) in (self.qs[..nk].chunks_exact_mut(kd)).zip(self.qt.chunks_exact(kd)) {
                for ((x, q), i) in qs.iter_mut().zip(qt).zip(&self.inv_last) {
                    *x = *q * *i;
                }
            }
        }
        inside
    }

    /// The chunk's dq, dk, dg (workspace rows) and dvᵀ from Sᵀ0 and dSᵀ at its end.
    #[inline(always)]
    fn chunk<S: Simd>(&mut self, n: usize, scale: A, factored: bool, s0_t: &[A], ds_t: &[A]) {
        let (kd, vd) = (self.kd, self.vd);
        let zero = A::ZERO;
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
            let nk = n * kd;
            for (dq, e) in self.dq[..nk].iter_mut().zip(&self.e) {
                *dq = scale * *e * *dq;
            }
            let rows = (self.dk[..nk].chunks_exact_mut(kd))
                .zip(self.dk_state.chunks_exact(kd))
                .zip(self.suffix.chunks_exact(kd));
            for ((dk, dk_state), suffix) in rows {
                let cols = dk.iter_mut().zip(dk_state).zip(suffix).zip(&self.inv_last);
                for (((x, d), s), i) in cols {
                    *x = *s * (*x * *i + *d);
                }
            }
        } else {
            let nk = n * kd;
            for (dq, e) in self.dq[..nk].iter_mut().zip(&self.e) {
                *dq = scale * *e * *dq;
            }
            let rows = self.dk[..nk]
                .iter_mut()
                .zip(&self.suffix)
                .zip(&self.dk_state);
            for ((x, s), d) in rows {
                *x = *s * *d;
            }
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
        for (ds_row, s_row) in ds_t.chunks_exact(kd).zip(s0_t.chunks_exact(kd)) {
            for ((a, d), s) in acc.iter_mut().zip(ds_row).zip(s_row) {
                *a = *a + *d * *s;
            }
        }
        for (a, l) in acc.iter_mut().zip(&self.last) {
            *a = *l * *a;
        }
        for (kt, d) in self.kt[..n * kd]
            .chunks_exact(kd)
            .zip(self.dk_state.chunks_exact(kd))
        {
            for ((a, x), y) in acc.iter_mut().zip(kt).zip(d) {
                *a = *a + *x * *y;
            }
        }
        for t in (0..n).rev() {
            let at = t * kd;
            let cols = (acc.iter_mut())
                .zip(&mut self.dg[at..at + kd])
                .zip(self.q[at..at + kd].iter().zip(&self.dq[at..at + kd]))
                .zip(self.k[at..at + kd].iter().zip(&self.dk[at..at + kd]));
            for (((a, dg), (q, dq)), (k, dk)) in cols {
                *a = *a + *q * *dq - *k * *dk;
                *dg = *a;
            }
        }
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

    /// The chunk's gradient rows into the task's own rows of the outputs.
    #[inline(always)]
    fn store<S: Simd, E: Element<Acc = A>>(
        &self,
        shape: &GlaShape,
        bh: usize,
        t0: usize,
        n: usize,
        out: GradPtrs<E>,
    ) {
        let (kd, vd) = (self.kd, self.vd);
        let (bi, hi) = (bh / shape.heads, bh % shape.heads);
        for j in 0..n {
            let base = (bi * shape.len + t0 + j) * shape.heads + hi;
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
