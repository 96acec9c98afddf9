//! `scan.gla`: gated linear attention with a matrix-valued state, on the CPU.
//!
//! Per (batch, head): S\[t\] = diag(exp(g\[t\]))·S\[t-1\] + k\[t\]ᵀ·v\[t\] (S is K×V, S\[-1\] = h0 or
//! zeros), o\[t\] = scale·q\[t\]·S\[t\]. Log-gates g <= 0 enter only through exp(g) <= 1, so no
//! exponential of a large positive number is ever formed, however long the sequence.
//!
//! Two forms compute the forward (chosen by [`GlaForm`], both exact):
//! - chunked (the default; see `chunked`): chunks of 16 steps, each a few small
//!   register-tiled matrix products on L1-resident blocks, with the log-gates entering only
//!   through differences within the chunk;
//! - recurrent: the recurrence step by step, vectorized along V, with S (K×V, 16 KiB at
//!   K = V = 64) in L1: 2·K·V multiply-adds per step, FORWARD_STEPS steps per pass over S.
//!
//! Tasks are (batch, head), each walked in time order: deterministic whatever the thread
//! count. The inner loops are plain slices, compiled per ISA through `cpu::dispatch`.
//!
//! Backward (with upstream do and optional dh_last), in the form the params choose: chunked
//! (the default; see `chunked_backward`), the chunk's gradients as small matrix products
//! from the states stored at every chunk start; or recurrent, step by step:
//! walking back with dS (from dh_last),
//! dS += scale·q\[t\]ᵀ·do\[t\]; dq\[t\] = scale·S\[t\]·do\[t\]; dk\[t\] = dS·v\[t\]; dv\[t\] = dSᵀ·k\[t\];
//! dg\[t\] = exp(g\[t\]) ∘ rowsum(dS ∘ S\[t-1\]); dS = diag(exp(g\[t\]))·dS; dh0 = dS at the end.
//! The states are recomputed chunk by chunk from checkpoints, never stored for all steps.

use crate::cpu::{Isa, SendPtr, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_backed};
use crate::scan::check_len;
use rayon::prelude::*;

mod chunked;
mod chunked_backward;
use chunked_backward::{ChunkedBackwardHeads, GradPtrs};

/// Steps between stored states in the recurrent backward (a chunk of states stays in L2).
const CHECKPOINT_STEPS: usize = 16;

/// Which exact evaluation order the CPU forward and backward use; the two agree to rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GlaForm {
    /// Chunks of 16 steps as small matrix products (the faster one).
    #[default]
    Chunked,
    /// One rank-1 state update per step (forward), one step at a time walking back
    /// (backward; the same bits on every ISA).
    Recurrent,
}

/// Parameters of `scan.gla`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct GlaParams {
    /// Output scale; `None` = 1/sqrt(K).
    pub scale: Option<f64>,
    /// The CPU forward's evaluation order (not a contract parameter).
    pub form: GlaForm,
}

impl GlaParams {
    /// The defaults: scale 1/sqrt(K), the [`GlaForm::Chunked`] forward.
    pub fn new() -> Self {
        Self::default()
    }

    /// Output scale (default `None` = 1/sqrt(K)): `o[t] = scale·q[t]·S[t]`. Must be finite
    /// in the accumulator type (NaN, ±inf and, for f32, |scale| > 3.4e38 are an `Err`).
    pub fn scale(mut self, scale: Option<f64>) -> Self {
        self.scale = scale;
        self
    }

    /// The CPU forward's evaluation order (default [`GlaForm::Chunked`]); changes rounding only.
    pub fn form(mut self, form: GlaForm) -> Self {
        self.form = form;
        self
    }

    /// A given `scale` must be finite in the accumulator type `A` (as attention's): a NaN or
    /// infinite one would turn every output into NaN.
    fn validate<A: Accum>(&self) -> Result<()> {
        match self.scale {
            Some(s) if !A::from_f64(s).to_f64().is_finite() => Err(Error::invalid(
                "scale",
                format!(
                    "must be finite in the {}-bit accumulator, got {s:e}",
                    8 * std::mem::size_of::<A>()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// `[B, T, H, K]` queries/keys/gates and `[B, T, H, V]` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlaShape {
    /// B, the batch size.
    pub batch: usize,
    /// T, the time steps.
    pub len: usize,
    /// H, the heads (each with its own K×V state).
    pub heads: usize,
    /// K, the head dim of q, k and g (rows of the state).
    pub key_dim: usize,
    /// V, the head dim of v and o (columns of the state).
    pub value_dim: usize,
}

impl GlaShape {
    /// From the dims in field order (B, T, H, K, V).
    pub fn new(batch: usize, len: usize, heads: usize, key_dim: usize, value_dim: usize) -> Self {
        Self {
            batch,
            len,
            heads,
            key_dim,
            value_dim,
        }
    }

    /// From the dims of `q [B, T, H, K]` and `v [B, T, H, V]`.
    pub fn from_dims(q: &[usize], v: &[usize]) -> Result<Self> {
        let [b, t, h, k] = *q else {
            return Err(Error::shape("q", "rank 4 [B, T, H, K]", format!("{q:?}")));
        };
        match *v {
            [vb, vt, vh, vd] if (vb, vt, vh) == (b, t, h) => Ok(Self::new(b, t, h, k, vd)),
            _ => Err(Error::shape(
                "v",
                format!("[{b}, {t}, {h}, V]"),
                format!("{v:?}"),
            )),
        }
    }

    /// (B·T·H·K, B·T·H·V, B·H·K·V), checked.
    fn sizes(&self) -> Result<(usize, usize, usize)> {
        let over = || Error::overflow("q", format!("{self:?} overflows"));
        let bth = self
            .batch
            .checked_mul(self.len)
            .and_then(|x| x.checked_mul(self.heads))
            .ok_or_else(over)?;
        let qk = bth.checked_mul(self.key_dim).ok_or_else(over)?;
        let vv = bth.checked_mul(self.value_dim).ok_or_else(over)?;
        let state = self
            .batch
            .checked_mul(self.heads)
            .and_then(|x| x.checked_mul(self.key_dim))
            .and_then(|x| x.checked_mul(self.value_dim))
            .ok_or_else(over)?;
        if [qk, vv, state].iter().any(|n| n.checked_mul(8).is_none()) {
            return Err(over());
        }
        Ok((qk, vv, state))
    }

    /// Rule 3 of [`crate::error`]: with T = 0 and no `h0`, no input carries B·H·K·V, the
    /// size of `h_last`.
    fn check_state_backed(&self, has_h0: bool, state: usize) -> Result<()> {
        if self.len == 0 && !has_h0 {
            check_backed("h0", "B·H·K·V (T = 0 steps)", state, 0)?;
        }
        Ok(())
    }

    fn scale(&self, params: &GlaParams) -> f64 {
        params
            .scale
            .unwrap_or(1.0 / (self.key_dim.max(1) as f64).sqrt())
    }
}

/// The inputs of `scan.gla`; `h0` is in the accumulator type (f32, f64 for f64).
#[derive(Clone, Copy, Debug)]
pub struct GlaInputs<'a, E: Element> {
    /// `[B, T, H, K]`: the queries.
    pub q: &'a [E],
    /// `[B, T, H, K]`: the keys.
    pub k: &'a [E],
    /// `[B, T, H, V]`: the values.
    pub v: &'a [E],
    /// Log-gates, <= 0 (positive ones are accepted and used as given; they grow the state).
    pub g: &'a [E],
    /// `[B, H, K, V]`, accumulator type: the initial state (default `None` = zeros).
    pub h0: Option<&'a [E::Acc]>,
}

impl<E: Element> GlaInputs<'_, E> {
    fn validate(&self, params: &GlaParams, shape: &GlaShape) -> Result<(usize, usize, usize)> {
        params.validate::<E::Acc>()?;
        let (qk, vv, state) = shape.sizes()?;
        let GlaShape {
            batch: b,
            len: t,
            heads: h,
            key_dim: k,
            value_dim: v,
        } = *shape;
        shape.check_state_backed(self.h0.is_some(), state)?;
        let keys = format!("[{b}, {t}, {h}, {k}]");
        check_len("q", self.q.len(), qk, &keys)?;
        check_len("k", self.k.len(), qk, &keys)?;
        check_len("g", self.g.len(), qk, &keys)?;
        check_len("v", self.v.len(), vv, &format!("[{b}, {t}, {h}, {v}]"))?;
        if let Some(h0) = self.h0 {
            check_len("h0", h0.len(), state, &format!("[{b}, {h}, {k}, {v}]"))?;
        }
        Ok((qk, vv, state))
    }
}

/// The outputs of `scan.gla`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct GlaOut<E: Element> {
    /// `[B, T, H, V]`: o\[t\] = scale·q\[t\]·S\[t\].
    pub o: Vec<E>,
    /// `[B, H, K, V]`: the state after the last step, in the accumulator type.
    pub h_last: Vec<E::Acc>,
}

/// `scan.gla` on the CPU: returns `o [B, T, H, V]` and `h_last [B, H, K, V]`.
pub fn gla<E: Element>(
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
) -> Result<GlaOut<E>> {
    gla_on(Isa::active(), params, shape, inputs)
}

/// [`gla`] on a chosen instruction set.
#[doc(hidden)]
pub fn gla_on<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
) -> Result<GlaOut<E>> {
    let (_, vv, state) = inputs.validate(params, &shape)?;
    let mut out = GlaOut {
        o: vec![E::default(); vv],
        h_last: vec![<E::Acc as Accum>::ZERO; state],
    };
    E::scan_gla_into(isa, params, shape, inputs, &mut out.o, &mut out.h_last)?;
    Ok(out)
}

/// [`gla`] into the caller's `o [B, T, H, V]` and `h_last [B, H, K, V]`.
pub fn gla_into<E: Element>(
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    o: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    E::scan_gla_into(Isa::active(), params, shape, inputs, o, h_last)
}

/// [`gla_into`] on a chosen instruction set.
#[doc(hidden)]
pub fn gla_into_on<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    o: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    E::scan_gla_into(isa, params, shape, inputs, o, h_last)
}

/// The CPU forward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn gla_into_impl<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    o: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    isa.check()?;
    let (qk, vv, state) = inputs.validate(params, &shape)?;
    let (b, t, h, k, v) = (
        shape.batch,
        shape.len,
        shape.heads,
        shape.key_dim,
        shape.value_dim,
    );
    check_len("o", o.len(), vv, &format!("[{b}, {t}, {h}, {v}]"))?;
    check_len(
        "h_last",
        h_last.len(),
        state,
        &format!("[{b}, {h}, {k}, {v}]"),
    )?;
    if t == 0 || (qk == 0 && vv == 0) {
        // no step or no column: o is empty and h_last is h0 (zeros without one); rule 4 of
        // crate::error, the B·H heads are not iterated
        match inputs.h0 {
            Some(h0) => h_last.copy_from_slice(h0),
            None => h_last.fill(<E::Acc as Accum>::ZERO),
        }
        return Ok(());
    }
    let scale = <E::Acc as Accum>::from_f64(shape.scale(params));
    let (op, hp) = (SendPtr(o.as_mut_ptr()), SendPtr(h_last.as_mut_ptr()));
    match params.form {
        GlaForm::Chunked => {
            head_groups(b, h, 0).for_each(|(bi, heads)| {
                // SAFETY: a task writes only its heads' rows of o and blocks of h_last.
                dispatch(
                    isa,
                    chunked::ChunkedHeads {
                        shape,
                        inputs,
                        batch: bi,
                        heads,
                        scale,
                        o: op,
                        h_last: hp,
                    },
                )
            });
        }
        GlaForm::Recurrent => (0..b * h).into_par_iter().for_each(|bh| {
            // SAFETY: head bh writes only its own rows of o and its own block of h_last.
            dispatch(
                isa,
                ForwardHead {
                    shape,
                    inputs,
                    bh,
                    scale,
                    o: op,
                    h_last: hp,
                },
            )
        }),
    }
    Ok(())
}

/// Row `t` of head (bi, hi) of a `[B, T, H, X]` tensor, widened.
#[inline(always)]
fn row<E: Element>(
    x: &[E],
    shape: &GlaShape,
    bh: usize,
    t: usize,
    width: usize,
    out: &mut [E::Acc],
) {
    let (bi, hi) = (bh / shape.heads, bh % shape.heads);
    let at = ((bi * shape.len + t) * shape.heads + hi) * width;
    for (o, v) in out.iter_mut().zip(&x[at..at + width]) {
        *o = v.to_acc();
    }
}

/// One step of the recurrence: S = diag(decay)·S + kᵀ·v, in place.
#[inline(always)]
fn advance<A: Accum>(state: &mut [A], decay: &[A], k: &[A], v: &[A]) {
    let vd = v.len();
    for ((s_row, d), kk) in state.chunks_exact_mut(vd).zip(decay).zip(k) {
        for (s, vv) in s_row.iter_mut().zip(v) {
            *s = *d * *s + *kk * *vv;
        }
    }
}

/// A row of E widened into the accumulator type, a vector at a time.
#[inline(always)]
fn widen<S: Simd, E: Element>(from: &[E], to: &mut [E::Acc]) {
    let lanes = E::Acc::lanes::<S>();
    let whole = from.len() - from.len() % lanes;
    for c in (0..whole).step_by(lanes) {
        // SAFETY: c + lanes <= whole <= the length of both rows.
        unsafe {
            <E::Acc as Accum>::vstore::<S>(
                to.as_mut_ptr().add(c),
                E::vload::<S>(from.as_ptr().add(c)),
            )
        };
    }
    for (t, f) in to[whole..].iter_mut().zip(&from[whole..]) {
        *t = f.to_acc();
    }
}

/// A row in the accumulator type rounded to E at `to`, a vector at a time.
///
/// # Safety
/// `to` is valid for writing `from.len()` values of E.
#[inline(always)]
unsafe fn narrow<S: Simd, E: Element>(from: &[E::Acc], to: *mut E) {
    let lanes = E::Acc::lanes::<S>();
    let whole = from.len() - from.len() % lanes;
    // SAFETY: c + lanes <= whole <= from.len(), which `to` holds by this fn's contract.
    unsafe {
        for c in (0..whole).step_by(lanes) {
            E::vstore::<S>(
                to.add(c),
                <E::Acc as Accum>::vload::<S>(from.as_ptr().add(c)),
            );
        }
        for (c, x) in from.iter().enumerate().skip(whole) {
            *to.add(c) = E::from_acc(*x);
        }
    }
}

/// The chunked forms' tasks: groups of adjacent heads of one batch row (see `chunked`), as
/// many groups as threads where the batch alone gives fewer, each group's `bytes_per_head`
/// (of per-task buffers) within 64 MiB where a head allows it. Yields (batch, heads).
fn head_groups(
    b: usize,
    h: usize,
    bytes_per_head: usize,
) -> impl ParallelIterator<Item = (usize, std::ops::Range<usize>)> {
    const GROUP_BYTES: usize = 64 << 20;
    let groups = rayon::current_num_threads()
        .div_ceil(b.max(1))
        .clamp(1, h.max(1));
    let fit = (GROUP_BYTES / bytes_per_head.max(1)).max(1);
    let per_group = h.div_ceil(groups).clamp(1, fit);
    let per_batch = h.div_ceil(per_group);
    (0..b * per_batch).into_par_iter().map(move |task| {
        let (bi, group) = (task / per_batch, task % per_batch);
        (bi, group * per_group..((group + 1) * per_group).min(h))
    })
}

/// e^x over a slice, vectorized (the same polynomial as the scalar `exp` of the tail).
#[inline(always)]
fn exp_in_place<S: Simd, A: Accum>(x: &mut [A]) {
    let lanes = A::lanes::<S>();
    let mut chunks = x.chunks_exact_mut(lanes);
    for chunk in &mut chunks {
        // SAFETY: the chunk holds exactly `lanes` values.
        unsafe {
            A::vstore::<S>(
                chunk.as_mut_ptr(),
                A::vexp::<S>(A::vload::<S>(chunk.as_ptr())),
            )
        };
    }
    for v in chunks.into_remainder() {
        *v = v.exp();
    }
}

/// Σ x·y in eight interleaved partial sums: a fixed order, so every ISA gives the same bits.
#[inline(always)]
fn dot<A: Accum>(x: &[A], y: &[A]) -> A {
    let mut parts = [A::ZERO; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for i in 0..8 {
            parts[i] = parts[i] + a[i] * b[i];
        }
    }
    let mut total = A::ZERO;
    for p in parts {
        total = total + p;
    }
    for (a, b) in xr.iter().zip(yr) {
        total = total + *a * *b;
    }
    total
}

struct ForwardHead<'a, E: Element> {
    shape: GlaShape,
    inputs: &'a GlaInputs<'a, E>,
    bh: usize,
    scale: E::Acc,
    o: SendPtr<E>,
    h_last: SendPtr<E::Acc>,
}

/// A row stride (in elements) of at least `len` whose byte size is not a multiple of 512, so
/// that consecutive rows do not share their low address bits every few rows.
fn padded_stride(len: usize) -> usize {
    let mut stride = len.next_multiple_of(16);
    if (stride * 8).is_multiple_of(512) {
        stride += 16;
    }
    stride
}

/// Time steps one pass over the state advances: the state is loaded and stored once per
/// pass, and each step's output vector stays in a register across the K rows.
const FORWARD_STEPS: usize = 4;

impl<E: Element> SimdKernel for ForwardHead<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            shape,
            inputs,
            bh,
            scale,
            o: o_out,
            h_last,
        } = self;
        let (t_len, kd, vd) = (shape.len, shape.key_dim, shape.value_dim);
        let zero = <E::Acc as Accum>::ZERO;
        let lanes = E::Acc::lanes::<S>();
        // S rows at a padded stride: with rows a power-of-two size apart, a row's load can
        // wait on the store to the row 4 KiB before it, still in the store buffer (4K
        // aliasing; padding measured about 10% faster here at V = 64)
        let stride = padded_stride(vd);
        let mut state = vec![zero; kd * stride];
        if let Some(h0) = inputs.h0 {
            for kk in 0..kd {
                let src = (bh * kd + kk) * vd;
                state[kk * stride..kk * stride + vd].copy_from_slice(&h0[src..src + vd]);
            }
        }
        // rows of up to FORWARD_STEPS steps: scale·q, k, exp(g) ([step][K]) and v ([step][V])
        let (mut qs, mut k, mut decay) = (
            vec![zero; FORWARD_STEPS * kd],
            vec![zero; FORWARD_STEPS * kd],
            vec![zero; FORWARD_STEPS * kd],
        );
        let (mut v, mut o) = (
            vec![zero; FORWARD_STEPS * vd],
            vec![zero; FORWARD_STEPS * vd],
        );
        let vec_end = vd - vd % lanes;
        let (bi, hi) = (bh / shape.heads, bh % shape.heads);
        let mut t0 = 0;
        while t0 < t_len {
            let steps = FORWARD_STEPS.min(t_len - t0);
            for j in 0..steps {
                let t = t0 + j;
                row(inputs.q, &shape, bh, t, kd, &mut qs[j * kd..(j + 1) * kd]);
                row(inputs.k, &shape, bh, t, kd, &mut k[j * kd..(j + 1) * kd]);
                row(
                    inputs.g,
                    &shape,
                    bh,
                    t,
                    kd,
                    &mut decay[j * kd..(j + 1) * kd],
                );
                row(inputs.v, &shape, bh, t, vd, &mut v[j * vd..(j + 1) * vd]);
            }
            for x in &mut qs[..steps * kd] {
                *x = scale * *x;
            }
            exp_in_place::<S, E::Acc>(&mut decay[..steps * kd]);
            // a short last pass runs identity steps (decay 1, k = q = v = 0): the vector loop
            // then always takes FORWARD_STEPS steps, a constant it unrolls into registers
            decay[steps * kd..].fill(<E::Acc as Accum>::ONE);
            k[steps * kd..].fill(zero);
            qs[steps * kd..].fill(zero);
            v[steps * vd..].fill(zero);
            // SAFETY: c + lanes <= vd and every index stays inside its [steps][K or V] buffer.
            unsafe {
                let mut c = 0;
                while c < vec_end {
                    let mut acc = [E::Acc::vsplat::<S>(zero); FORWARD_STEPS];
                    let mut vals = [E::Acc::vsplat::<S>(zero); FORWARD_STEPS];
                    for (j, val) in vals.iter_mut().enumerate() {
                        *val = E::Acc::vload::<S>(v.as_ptr().add(j * vd + c));
                    }
                    // two rows at a time: their state chains (multiply, then multiply-add,
                    // per step) are independent, so the two interleave (the sums into acc keep
                    // the row order, so results do not change)
                    let mut kk = 0;
                    while kk + 2 <= kd {
                        let cell0 = state.as_mut_ptr().add(kk * stride + c);
                        let cell1 = cell0.add(stride);
                        let (mut s0, mut s1) =
                            (E::Acc::vload::<S>(cell0), E::Acc::vload::<S>(cell1));
                        for j in 0..FORWARD_STEPS {
                            let at = j * kd + kk;
                            let carried0 = E::Acc::vmul::<S>(E::Acc::vsplat::<S>(decay[at]), s0);
                            let carried1 =
                                E::Acc::vmul::<S>(E::Acc::vsplat::<S>(decay[at + 1]), s1);
                            s0 = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(k[at]), vals[j], carried0);
                            s1 = E::Acc::vfma::<S>(
                                E::Acc::vsplat::<S>(k[at + 1]),
                                vals[j],
                                carried1,
                            );
                            acc[j] = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(qs[at]), s0, acc[j]);
                            acc[j] = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(qs[at + 1]), s1, acc[j]);
                        }
                        E::Acc::vstore::<S>(cell0, s0);
                        E::Acc::vstore::<S>(cell1, s1);
                        kk += 2;
                    }
                    if kk < kd {
                        let cell = state.as_mut_ptr().add(kk * stride + c);
                        let mut s = E::Acc::vload::<S>(cell);
                        for j in 0..FORWARD_STEPS {
                            let at = j * kd + kk;
                            let carried = E::Acc::vmul::<S>(E::Acc::vsplat::<S>(decay[at]), s);
                            s = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(k[at]), vals[j], carried);
                            acc[j] = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(qs[at]), s, acc[j]);
                        }
                        E::Acc::vstore::<S>(cell, s);
                    }
                    for (j, a) in acc.iter().enumerate().take(steps) {
                        E::Acc::vstore::<S>(o.as_mut_ptr().add(j * vd + c), *a);
                    }
                    c += lanes;
                }
            }
            // columns past the last whole vector
            for c in vec_end..vd {
                for j in 0..steps {
                    o[j * vd + c] = zero;
                }
                for kk in 0..kd {
                    let mut s = state[kk * stride + c];
                    for j in 0..steps {
                        let at = j * kd + kk;
                        s = decay[at] * s + k[at] * v[j * vd + c];
                        o[j * vd + c] = o[j * vd + c] + qs[at] * s;
                    }
                    state[kk * stride + c] = s;
                }
            }
            for j in 0..steps {
                let at = ((bi * t_len + t0 + j) * shape.heads + hi) * vd;
                for (c, x) in o[j * vd..(j + 1) * vd].iter().enumerate() {
                    // SAFETY: row (bi, t, hi) of o belongs to this head (see gla_into_impl).
                    unsafe { *o_out.get().add(at + c) = E::from_acc(*x) };
                }
            }
            t0 += steps;
        }
        for (kk, r) in state.chunks_exact(stride).enumerate() {
            for (c, x) in r[..vd].iter().enumerate() {
                // SAFETY: this head's own block of h_last.
                unsafe { *h_last.get().add((bh * kd + kk) * vd + c) = *x };
            }
        }
    }
}

/// Gradients of `scan.gla`, each with the shape of its input.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct GlaGrads<E: Element> {
    /// `[B, T, H, K]`: the gradient of `q`.
    pub dq: Vec<E>,
    /// `[B, T, H, K]`: the gradient of `k`.
    pub dk: Vec<E>,
    /// `[B, T, H, V]`: the gradient of `v`.
    pub dv: Vec<E>,
    /// `[B, T, H, K]`: the gradient of the log-gates.
    pub dg: Vec<E>,
    /// `[B, H, K, V]`, in the accumulator type; `Some` only where `h0` was given.
    pub dh0: Option<Vec<E::Acc>>,
}

/// The caller's buffers for [`gla_backward_into`], each with the shape of its input (as
/// [`GlaGrads`]): every value is overwritten.
#[derive(Debug)]
pub struct GlaGradsMut<'a, E: Element> {
    /// `[B, T, H, K]`: the gradient of `q`.
    pub dq: &'a mut [E],
    /// `[B, T, H, K]`: the gradient of `k`.
    pub dk: &'a mut [E],
    /// `[B, T, H, V]`: the gradient of `v`.
    pub dv: &'a mut [E],
    /// `[B, T, H, K]`: the gradient of the log-gates.
    pub dg: &'a mut [E],
    /// `[B, H, K, V]`, in the accumulator type: given exactly when `h0` is.
    pub dh0: Option<&'a mut [E::Acc]>,
}

/// `scan.gla_backward` on the CPU: gradients of Σ o·do (+ Σ h_last·dh_last when given).
pub fn gla_backward<E: Element>(
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    d_o: &[E],
    dh_last: Option<&[E::Acc]>,
) -> Result<GlaGrads<E>> {
    gla_backward_on(Isa::active(), params, shape, inputs, d_o, dh_last)
}

/// [`gla_backward`] on a chosen instruction set.
#[doc(hidden)]
pub fn gla_backward_on<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    d_o: &[E],
    dh_last: Option<&[E::Acc]>,
) -> Result<GlaGrads<E>> {
    // validated before allocating (and again, cheaply, by the call below)
    let (qk, vv, state) = inputs.validate(params, &shape)?;
    check_output_grads(&shape, vv, state, d_o.len(), dh_last.map(<[_]>::len))?;
    let mut grads = GlaGrads {
        dq: vec![E::default(); qk],
        dk: vec![E::default(); qk],
        dv: vec![E::default(); vv],
        dg: vec![E::default(); qk],
        dh0: inputs.h0.map(|_| vec![<E::Acc as Accum>::ZERO; state]),
    };
    let out = GlaGradsMut {
        dq: &mut grads.dq,
        dk: &mut grads.dk,
        dv: &mut grads.dv,
        dg: &mut grads.dg,
        dh0: grads.dh0.as_deref_mut(),
    };
    E::scan_gla_backward_into(isa, params, shape, inputs, d_o, dh_last, out)?;
    Ok(grads)
}

/// [`gla_backward`] into the caller's buffers (no allocation of the gradients: for a
/// training loop that reuses them).
pub fn gla_backward_into<E: Element>(
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    d_o: &[E],
    dh_last: Option<&[E::Acc]>,
    grads: GlaGradsMut<'_, E>,
) -> Result<()> {
    E::scan_gla_backward_into(Isa::active(), params, shape, inputs, d_o, dh_last, grads)
}

/// [`gla_backward_into`] on a chosen instruction set.
#[doc(hidden)]
pub fn gla_backward_into_on<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    d_o: &[E],
    dh_last: Option<&[E::Acc]>,
    grads: GlaGradsMut<'_, E>,
) -> Result<()> {
    E::scan_gla_backward_into(isa, params, shape, inputs, d_o, dh_last, grads)
}

/// The lengths of the backward's incoming gradients, `do [B, T, H, V]` and `dh_last [B, H, K,
/// V]` (`vv` and `state` as `GlaInputs::validate` returns them); shared by the CPU and CUDA
/// entry points.
fn check_output_grads(
    shape: &GlaShape,
    vv: usize,
    state: usize,
    d_o: usize,
    dh_last: Option<usize>,
) -> Result<()> {
    let GlaShape {
        batch: b,
        len: t,
        heads: h,
        key_dim: kd,
        value_dim: vd,
    } = *shape;
    check_len("do", d_o, vv, &format!("[{b}, {t}, {h}, {vd}]"))?;
    if let Some(len) = dh_last {
        check_len("dh_last", len, state, &format!("[{b}, {h}, {kd}, {vd}]"))?;
    }
    Ok(())
}

/// The CPU backward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn gla_backward_into_impl<E: Element>(
    isa: Isa,
    params: &GlaParams,
    shape: GlaShape,
    inputs: &GlaInputs<'_, E>,
    d_o: &[E],
    dh_last: Option<&[E::Acc]>,
    grads: GlaGradsMut<'_, E>,
) -> Result<()> {
    isa.check()?;
    let (qk, vv, state) = inputs.validate(params, &shape)?;
    let GlaShape {
        batch: b,
        len: t_len,
        heads: h,
        key_dim: kd,
        value_dim: vd,
    } = shape;
    check_output_grads(&shape, vv, state, d_o.len(), dh_last.map(|x| x.len()))?;
    let GlaGradsMut {
        dq,
        dk,
        dv,
        dg,
        mut dh0,
    } = grads;
    let keys = format!("[{b}, {t_len}, {h}, {kd}]");
    check_len("dq", dq.len(), qk, &keys)?;
    check_len("dk", dk.len(), qk, &keys)?;
    check_len("dg", dg.len(), qk, &keys)?;
    check_len("dv", dv.len(), vv, &format!("[{b}, {t_len}, {h}, {vd}]"))?;
    match (&dh0, inputs.h0) {
        (Some(x), Some(_)) => check_len("dh0", x.len(), state, &format!("[{b}, {h}, {kd}, {vd}]"))?,
        (None, None) => {}
        (x, _) => {
            let given = if x.is_some() { "given" } else { "missing" };
            return Err(Error::shape("dh0", "given exactly when h0 is", given));
        }
    }
    if t_len == 0 || kd == 0 || vd == 0 {
        // no step (h_last = h0: dh0 = dh_last), or o [.., V] empty or zero (q·S with K = 0)
        // and an empty state: every other gradient of Σ o·do (+ Σ h_last·dh_last) is zero,
        // as the CUDA backward returns
        for x in [&mut *dq, &mut *dk, &mut *dv, &mut *dg] {
            x.fill(E::default());
        }
        if let Some(dh0) = dh0 {
            match dh_last {
                Some(x) if t_len == 0 => dh0.copy_from_slice(x),
                _ => dh0.fill(<E::Acc as Accum>::ZERO),
            }
        }
        return Ok(());
    }
    let scale = <E::Acc as Accum>::from_f64(shape.scale(params));
    if params.form == GlaForm::Chunked {
        let out = GradPtrs {
            dq: SendPtr(dq.as_mut_ptr()),
            dk: SendPtr(dk.as_mut_ptr()),
            dv: SendPtr(dv.as_mut_ptr()),
            dg: SendPtr(dg.as_mut_ptr()),
            dh0: dh0.as_mut().map(|x| SendPtr(x.as_mut_ptr())),
        };
        // the states of a group's heads are kept for the walk back: at most ~64 MiB a task
        let per_head = t_len.div_ceil(chunked::CHUNK) * kd * vd * size_of::<E::Acc>();
        head_groups(b, h, per_head).for_each(|(batch, heads)| {
            dispatch(
                isa,
                ChunkedBackwardHeads {
                    shape,
                    inputs,
                    d_o,
                    dh_last,
                    batch,
                    heads,
                    scale,
                    out,
                },
            )
        });
        return Ok(());
    }
    let heads: Vec<HeadGrads<E>> = (0..b * h)
        .into_par_iter()
        .map(|bh| {
            dispatch(
                isa,
                BackwardHead {
                    shape,
                    inputs,
                    d_o,
                    dh_last,
                    bh,
                    scale,
                },
            )
        })
        .collect();
    for (bh, head) in heads.into_iter().enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        for t in 0..t_len {
            let base = (bi * t_len + t) * h + hi;
            let (kq, kv) = (base * kd, base * vd);
            dq[kq..kq + kd].copy_from_slice(&head.dq[t * kd..(t + 1) * kd]);
            dk[kq..kq + kd].copy_from_slice(&head.dk[t * kd..(t + 1) * kd]);
            dg[kq..kq + kd].copy_from_slice(&head.dg[t * kd..(t + 1) * kd]);
            dv[kv..kv + vd].copy_from_slice(&head.dv[t * vd..(t + 1) * vd]);
        }
        if let Some(dh0) = &mut dh0 {
            dh0[bh * kd * vd..(bh + 1) * kd * vd].copy_from_slice(&head.ds);
        }
    }
    Ok(())
}

struct HeadGrads<E: Element> {
    /// [T, K] and [T, V] rows of this head
    dq: Vec<E>,
    dk: Vec<E>,
    dg: Vec<E>,
    dv: Vec<E>,
    /// dS before the first step: dh0
    ds: Vec<E::Acc>,
}

struct BackwardHead<'a, E: Element> {
    shape: GlaShape,
    inputs: &'a GlaInputs<'a, E>,
    d_o: &'a [E],
    dh_last: Option<&'a [E::Acc]>,
    bh: usize,
    scale: E::Acc,
}

impl<E: Element> SimdKernel for BackwardHead<'_, E> {
    type Output = HeadGrads<E>;
    #[inline(always)]
    fn run<S: Simd>(self) -> HeadGrads<E> {
        let Self {
            shape,
            inputs,
            d_o,
            dh_last,
            bh,
            scale,
        } = self;
        let (t_len, kd, vd) = (shape.len, shape.key_dim, shape.value_dim);
        let zero = <E::Acc as Accum>::ZERO;
        let size = kd * vd;
        // forward once, keeping the state before every chunk
        let chunks = t_len.div_ceil(CHECKPOINT_STEPS);
        let mut checkpoints = vec![zero; chunks.max(1) * size];
        let mut state = match inputs.h0 {
            Some(h0) => h0[bh * size..(bh + 1) * size].to_vec(),
            None => vec![zero; size],
        };
        let (mut q, mut k, mut g, mut v, mut dov) = (
            vec![zero; kd],
            vec![zero; kd],
            vec![zero; kd],
            vec![zero; vd],
            vec![zero; vd],
        );
        for c in 0..chunks {
            checkpoints[c * size..(c + 1) * size].copy_from_slice(&state);
            for t in c * CHECKPOINT_STEPS..((c + 1) * CHECKPOINT_STEPS).min(t_len) {
                row(inputs.k, &shape, bh, t, kd, &mut k);
                row(inputs.g, &shape, bh, t, kd, &mut g);
                row(inputs.v, &shape, bh, t, vd, &mut v);
                for x in &mut g {
                    *x = x.exp();
                }
                advance(&mut state, &g, &k, &v);
            }
        }
        let mut out = HeadGrads {
            dq: vec![E::default(); t_len * kd],
            dk: vec![E::default(); t_len * kd],
            dg: vec![E::default(); t_len * kd],
            dv: vec![E::default(); t_len * vd],
            ds: match dh_last {
                Some(x) => x[bh * size..(bh + 1) * size].to_vec(),
                None => vec![zero; size],
            },
        };
        // states[i] = S before step t0 + i; states[len] = after the chunk's last step
        let mut states = vec![zero; (CHECKPOINT_STEPS + 1) * size];
        let mut dv_acc = vec![zero; vd];
        for c in (0..chunks).rev() {
            let (t0, t1) = (
                c * CHECKPOINT_STEPS,
                ((c + 1) * CHECKPOINT_STEPS).min(t_len),
            );
            states[..size].copy_from_slice(&checkpoints[c * size..(c + 1) * size]);
            for t in t0..t1 {
                let i = t - t0;
                let (before, after) = states.split_at_mut((i + 1) * size);
                after[..size].copy_from_slice(&before[i * size..]);
                row(inputs.k, &shape, bh, t, kd, &mut k);
                row(inputs.g, &shape, bh, t, kd, &mut g);
                row(inputs.v, &shape, bh, t, vd, &mut v);
                for x in &mut g {
                    *x = x.exp();
                }
                advance(&mut after[..size], &g, &k, &v);
            }
            for t in (t0..t1).rev() {
                let i = t - t0;
                let (prev, now) = (
                    &states[i * size..(i + 1) * size],
                    &states[(i + 1) * size..(i + 2) * size],
                );
                row(inputs.q, &shape, bh, t, kd, &mut q);
                row(inputs.k, &shape, bh, t, kd, &mut k);
                row(inputs.g, &shape, bh, t, kd, &mut g);
                row(inputs.v, &shape, bh, t, vd, &mut v);
                row(d_o, &shape, bh, t, vd, &mut dov);
                dv_acc.fill(zero);
                let ds = &mut out.ds;
                for kk in 0..kd {
                    let (ds_row, s_now, s_prev) = (
                        &mut ds[kk * vd..(kk + 1) * vd],
                        &now[kk * vd..(kk + 1) * vd],
                        &prev[kk * vd..(kk + 1) * vd],
                    );
                    // dS += scale·q[t]ᵀ·do[t]
                    let w = scale * q[kk];
                    for (d, x) in ds_row.iter_mut().zip(&dov) {
                        *d = *d + w * *x;
                    }
                    out.dq[t * kd + kk] = E::from_acc(scale * dot(s_now, &dov));
                    out.dk[t * kd + kk] = E::from_acc(dot(ds_row, &v));
                    let decay = g[kk].exp();
                    out.dg[t * kd + kk] = E::from_acc(decay * dot(ds_row, s_prev));
                    for (acc, d) in dv_acc.iter_mut().zip(ds_row.iter()) {
                        *acc = *acc + k[kk] * *d;
                    }
                    for d in ds_row.iter_mut() {
                        *d = decay * *d;
                    }
                }
                for (dst, x) in out.dv[t * vd..(t + 1) * vd].iter_mut().zip(&dv_acc) {
                    *dst = E::from_acc(*x);
                }
            }
        }
        out
    }
}

/// The CUDA forward and backward (feature `cuda`): for f32/f64, kernels/gla.cu, one block per
/// (value tile of 32 columns, head, batch) walking time in chunks of 8 steps with its state
/// slice in shared memory; for f16/bf16, kernels/gla_tc.cu, the same walk in chunks of 16
/// steps and 64-column tiles with the chunk's products on tensor cores (split TF32 operands,
/// f32 state); kernels/gla_backward.cu, the same blocks with the state tile in registers, walking
/// the chunks backward from checkpointed states. K up to 128 (f64: 64); larger K is
/// `Err(Unsupported)`.
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{GlaGrads, GlaOut};
    use super::{GlaInputs, GlaParams, GlaShape};
    use crate::cuda::config::{
        NK_GLA_BWD_CHUNK, NK_GLA_MAX_KEY, NK_GLA_MAX_KEY_F64, NK_GLA_TC_CHUNK, NK_GLA_TC_PAD,
        NK_GLA_TC_VALUE_TILE, NK_GLA_THREADS, NK_GLA_VALUE_TILE,
    };
    use crate::cuda::{
        CudaElement, Device, grid_x, grid_yz, i32_dim, i64_dim, read_ptr, scratch, write_ptr,
    };
    use crate::element::{Accum, DType};
    use crate::error::{Error, Result};
    use crate::scan::check_len;
    use cudarc::driver::sys::CUfunction_attribute;
    use cudarc::driver::{
        CudaSlice, CudaStream, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use std::sync::Arc;

    /// The inputs on the device; `h0` in the accumulator type.
    pub struct DeviceInputs<'a, E: CudaElement> {
        /// `[B, T, H, K]`: the queries.
        pub q: CudaView<'a, E>,
        /// `[B, T, H, K]`: the keys.
        pub k: CudaView<'a, E>,
        /// `[B, T, H, V]`: the values.
        pub v: CudaView<'a, E>,
        /// `[B, T, H, K]`: the log-gates, <= 0.
        pub g: CudaView<'a, E>,
        /// `[B, H, K, V]`, accumulator type: the initial state (`None` = zeros).
        pub h0: Option<CudaView<'a, E::Acc>>,
    }

    impl<E: CudaElement> DeviceInputs<'_, E> {
        /// The length checks of the host inputs, on the device views: (B·T·H·K, B·T·H·V,
        /// B·H·K·V).
        fn validate(&self, params: &GlaParams, shape: &GlaShape) -> Result<(usize, usize, usize)> {
            params.validate::<E::Acc>()?;
            let (qk, vv, state) = shape.sizes()?;
            let GlaShape {
                batch: b,
                len: t,
                heads: h,
                key_dim: kd,
                value_dim: vd,
            } = *shape;
            shape.check_state_backed(self.h0.is_some(), state)?;
            let keys = format!("[{b}, {t}, {h}, {kd}]");
            check_len("q", self.q.len(), qk, &keys)?;
            check_len("k", self.k.len(), qk, &keys)?;
            check_len("g", self.g.len(), qk, &keys)?;
            check_len("v", self.v.len(), vv, &format!("[{b}, {t}, {h}, {vd}]"))?;
            if let Some(h0) = &self.h0 {
                check_len("h0", h0.len(), state, &format!("[{b}, {h}, {kd}, {vd}]"))?;
            }
            Ok((qk, vv, state))
        }
    }

    /// The largest K the kernels hold for `E` (shared rows of the forward, registers of the
    /// backward): `Err(Unsupported)` past it.
    fn check_key_dim<E: CudaElement>(op: &str, kd: usize) -> Result<usize> {
        let max_key = if E::DTYPE == DType::F64 {
            NK_GLA_MAX_KEY_F64
        } else {
            NK_GLA_MAX_KEY
        } as usize;
        if kd > max_key {
            return Err(Error::Unsupported(format!(
                "{op} on CUDA with K = {kd} (at most {max_key} for {})",
                E::DTYPE
            )));
        }
        Ok(max_key)
    }

    /// The kernels' integer arguments: B and T as `long long`, H, K and V as `int`.
    struct KernelDims {
        b: i64,
        t: i64,
        h: i32,
        k: i32,
        v: i32,
    }

    /// `shape` within the kernels' limits, checked before anything is allocated or launched:
    /// B and H index grid z and y (at most 65535 each), H, K and V are `int`s (V at most
    /// [`MAX_I32_EXTENT`](crate::cuda::MAX_I32_EXTENT); the kernels' column and offset
    /// arithmetic is 64-bit). `Err(Overflow)` naming `q` (B, H, K) or `v` (V) past them.
    fn kernel_dims(shape: &GlaShape) -> Result<KernelDims> {
        grid_yz("q", "B (batch)", shape.batch)?;
        grid_yz("q", "H (heads)", shape.heads)?;
        Ok(KernelDims {
            b: i64_dim("q", "B", shape.batch)?,
            t: i64_dim("q", "T", shape.len)?,
            h: i32_dim("q", "H", shape.heads)?,
            k: i32_dim("q", "K", shape.key_dim)?,
            v: i32_dim("v", "V", shape.value_dim)?,
        })
    }

    /// The grid of the kernels: (value tiles of `tile` columns, heads, batch).
    fn grid(shape: &GlaShape, tile: u32) -> Result<(u32, u32, u32)> {
        Ok((
            grid_x("v", "V", shape.value_dim.div_ceil(tile as usize))?,
            grid_yz("q", "H (heads)", shape.heads)?,
            grid_yz("q", "B (batch)", shape.batch)?,
        ))
    }

    /// `scan.gla` on the GPU: writes `o [B, T, H, V]` and `h_last [B, H, K, V]` on `stream`.
    pub fn gla<E: CudaElement>(
        device: &Device,
        stream: &Arc<CudaStream>,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &DeviceInputs<'_, E>,
        o: &mut impl DevicePtrMut<E>,
        h_last: &mut impl DevicePtrMut<E::Acc>,
    ) -> Result<()> {
        device.check_stream(stream)?;
        let (_, vv, state) = inputs.validate(params, &shape)?;
        let GlaShape {
            batch: b,
            len: t,
            heads: h,
            key_dim: kd,
            value_dim: vd,
        } = shape;
        check_len("o", o.len(), vv, &format!("[{b}, {t}, {h}, {vd}]"))?;
        check_len(
            "h_last",
            h_last.len(),
            state,
            &format!("[{b}, {h}, {kd}, {vd}]"),
        )?;
        check_key_dim::<E>("scan.gla", kd)?;
        let dims = kernel_dims(&shape)?;
        if b == 0 || h == 0 || vd == 0 || kd == 0 {
            return Ok(());
        }
        let tensor_cores = matches!(E::DTYPE, DType::F16 | DType::BF16);
        let (f, cfg) = if tensor_cores {
            // gla_tc.cu's layout: three [C][Kp + PAD] rows (q, k, g), A [C][C + PAD], v and o
            // [C][VT + PAD], the state [Kp][VT + PAD], P_last [Kp] (f32), a flag (i32)
            let (c, vt, pad) = (
                NK_GLA_TC_CHUNK as usize,
                NK_GLA_TC_VALUE_TILE as usize,
                NK_GLA_TC_PAD as usize,
            );
            let kp = kd.next_multiple_of(16);
            let floats =
                3 * c * (kp + pad) + c * (c + pad) + 2 * c * (vt + pad) + kp * (vt + pad) + kp;
            let smem = i32::try_from(4 * floats + 4).map_err(|_| {
                Error::overflow("q", format!("K = {kd} needs too much shared memory"))
            })?;
            let f = device.function("gla_tc", &format!("scan_gla_fwd_tc_{}", E::SUFFIX))?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem,
            )?;
            let cfg = LaunchConfig {
                grid_dim: grid(&shape, NK_GLA_TC_VALUE_TILE)?,
                block_dim: (NK_GLA_THREADS, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            (f, cfg)
        } else {
            let cfg = LaunchConfig {
                grid_dim: grid(&shape, NK_GLA_VALUE_TILE)?,
                block_dim: (NK_GLA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            (
                device.function("gla", &format!("scan_gla_fwd_{}", E::SUFFIX))?,
                cfg,
            )
        };
        let (q, _g1) = read_ptr(&inputs.q, stream);
        let (k, _g2) = read_ptr(&inputs.k, stream);
        let (v, _g3) = read_ptr(&inputs.v, stream);
        let (g, _g4) = read_ptr(&inputs.g, stream);
        let h0 = inputs.h0.as_ref().map(|x| read_ptr(x, stream));
        let h0_p = h0.as_ref().map_or(0u64, |(p, _)| *p);
        let (o_p, _g5) = write_ptr(o, stream);
        let (hl_p, _g6) = write_ptr(h_last, stream);
        let scale = <E::Acc as Accum>::from_f64(shape.scale(params));
        let KernelDims {
            b: bb,
            t: tt,
            h: hh,
            k: kk,
            v: vv32,
        } = dims;
        // SAFETY: arguments match scan_gla_fwd_* in kernels/gla.cu and scan_gla_fwd_tc_* in
        // kernels/gla_tc.cu (the same list); every buffer holds the element counts validated
        // above, K fits the kernels' shared rows, the dims are within the kernels' int and
        // grid limits (kernel_dims) and the dynamic shared memory is gla_tc's layout for this K.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&g)
                .arg(&h0_p)
                .arg(&o_p)
                .arg(&hl_p)
                .arg(&bb)
                .arg(&tt)
                .arg(&hh)
                .arg(&kk)
                .arg(&vv32)
                .arg(&scale)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Host in, host out on the device's default stream: `o` and `h_last`.
    pub fn gla_host<E: CudaElement>(
        device: &Device,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, E>,
    ) -> Result<GlaOut<E>> {
        let (qk, vv, state) = inputs.validate(params, &shape)?;
        kernel_dims(&shape)?;
        if vv == 0 || qk == 0 {
            // no step or no column to compute (and no zero-length device allocations):
            // o is empty or all zeros, h_last is h0
            let h_last = inputs
                .h0
                .map_or_else(|| vec![<E::Acc as Accum>::ZERO; state], <[_]>::to_vec);
            return Ok(GlaOut {
                o: vec![E::default(); vv],
                h_last,
            });
        }
        let stream = device.stream();
        let up = |x: &[E]| -> Result<CudaSlice<E>> { Ok(stream.clone_htod(x)?) };
        let (q, k, v, g) = (up(inputs.q)?, up(inputs.k)?, up(inputs.v)?, up(inputs.g)?);
        let h0 = match inputs.h0 {
            Some(x) if !x.is_empty() => Some(stream.clone_htod(x)?),
            _ => None,
        };
        let mut o = stream.alloc_zeros::<E>(vv)?;
        let mut h_last = scratch::<E::Acc>(stream, state)?;
        {
            let device_inputs = DeviceInputs {
                q: q.as_view(),
                k: k.as_view(),
                v: v.as_view(),
                g: g.as_view(),
                h0: h0.as_ref().map(|x| x.as_view()),
            };
            let mut h_view = h_last.slice_mut(0..state);
            gla(
                device,
                stream,
                params,
                shape,
                &device_inputs,
                &mut o,
                &mut h_view,
            )?;
        }
        Ok(GlaOut {
            o: stream.clone_dtoh(&o)?,
            h_last: stream.clone_dtoh(&h_last.slice(0..state))?,
        })
    }

    /// Bytes of checkpointed states the backward may keep (every block's state slice at the
    /// start of every checkpoint segment); past it, segments span several chunks and each
    /// chunk's starting state is recomputed from its segment's start.
    const CHECKPOINT_BUDGET_BYTES: usize = 256 << 20;

    /// Gradients of `scan.gla` on the device, in new buffers (at least one element long, so
    /// an empty gradient is a 1-element buffer); `dh0` where h0 was given.
    pub struct DeviceGrads<E: CudaElement> {
        /// `[B, T, H, K]`: the gradient of q.
        pub dq: CudaSlice<E>,
        /// `[B, T, H, K]`: the gradient of k.
        pub dk: CudaSlice<E>,
        /// `[B, T, H, V]`: the gradient of v.
        pub dv: CudaSlice<E>,
        /// `[B, T, H, K]`: the gradient of the log-gates g.
        pub dg: CudaSlice<E>,
        /// `[B, H, K, V]`, accumulator type: the gradient of h0; `Some` only where h0 was given.
        pub dh0: Option<CudaSlice<E::Acc>>,
    }

    /// `scan.gla_backward` on the GPU, on `stream`: the gradients of Σ o·do (+ Σ h_last·dh_last
    /// when given), as the CPU's [`super::gla_backward`]. Deterministic (fixed-order sums, no
    /// atomics). K up to 128 (f64: 64); larger K is `Err(Unsupported)`. Scratch:
    /// 3·⌈V/32⌉·B·T·H·K accumulators of per-tile partial sums of dq, dk, dg, plus the
    /// checkpoints (at most 256 MiB, see kernels/gla_backward.cu).
    pub fn gla_backward<E: CudaElement>(
        device: &Device,
        stream: &Arc<CudaStream>,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &DeviceInputs<'_, E>,
        d_o: &CudaView<'_, E>,
        dh_last: Option<&CudaView<'_, E::Acc>>,
    ) -> Result<DeviceGrads<E>> {
        device.check_stream(stream)?;
        let (qk, vv, state) = inputs.validate(params, &shape)?;
        let GlaShape {
            batch: b,
            len: t,
            heads: h,
            key_dim: kd,
            ..
        } = shape;
        super::check_output_grads(&shape, vv, state, d_o.len(), dh_last.map(|x| x.len()))?;
        check_key_dim::<E>("scan.gla_backward", kd)?;
        let dims = kernel_dims(&shape)?;
        let zeros =
            |len: usize| -> Result<CudaSlice<E>> { Ok(stream.alloc_zeros::<E>(len.max(1))?) };
        let mut grads = DeviceGrads {
            dq: zeros(qk)?,
            dk: zeros(qk)?,
            dv: zeros(vv)?,
            dg: zeros(qk)?,
            dh0: inputs
                .h0
                .as_ref()
                .map(|_| scratch::<E::Acc>(stream, state))
                .transpose()?,
        };
        if qk == 0 || vv == 0 {
            // no step, no key or no value column: the sums over them are zero, and without a
            // step dh_last passes to h0 unchanged
            if let (Some(dh0), Some(x)) = (&mut grads.dh0, dh_last)
                && state > 0
            {
                stream.memcpy_dtod(x, &mut dh0.slice_mut(0..state))?;
            }
            return Ok(grads);
        }
        // the instantiation: rows per thread = KMAX / 8
        let kmax = match kd {
            0..=32 => 32,
            33..=64 => 64,
            _ => 128,
        };
        let (gx, gy, gz) = grid(&shape, NK_GLA_VALUE_TILE)?;
        let tiles = gx as usize;
        let blocks = tiles * h * b;
        let over = || Error::overflow("q", format!("{shape:?}: backward scratch overflows"));
        // checkpoints: `segments` states of every block's K x 32 slice, `per` chunks apart
        let chunks = t.div_ceil(NK_GLA_BWD_CHUNK as usize);
        let slice = kmax * NK_GLA_VALUE_TILE as usize;
        let one_segment = blocks
            .checked_mul(slice * std::mem::size_of::<E::Acc>())
            .ok_or_else(over)?;
        let max_segments = (CHECKPOINT_BUDGET_BYTES / one_segment).max(1);
        let per = chunks.div_ceil(max_segments).max(1);
        let segments = chunks.div_ceil(per);
        let checkpoint_len = (blocks * slice).checked_mul(segments).ok_or_else(over)?;
        let parts_len = qk.checked_mul(3 * tiles).ok_or_else(over)?;
        let mut checkpoints = scratch::<E::Acc>(stream, checkpoint_len)?;
        let mut parts = scratch::<E::Acc>(stream, parts_len)?;

        let f = device.function(
            "gla_backward",
            &format!("scan_gla_bwd_k{kmax}_{}", E::SUFFIX),
        )?;
        let sum = device.function("gla_backward", &format!("scan_gla_bwd_sum_{}", E::SUFFIX))?;
        let scale = <E::Acc as Accum>::from_f64(shape.scale(params));
        let KernelDims {
            b: bb,
            t: tt,
            h: hh,
            k: kk,
            v: vv32,
        } = dims;
        // per ≤ chunks ≤ T, which fits i64 (kernel_dims)
        let per64 = per as i64;
        {
            let (q, _g1) = read_ptr(&inputs.q, stream);
            let (k, _g2) = read_ptr(&inputs.k, stream);
            let (v, _g3) = read_ptr(&inputs.v, stream);
            let (g, _g4) = read_ptr(&inputs.g, stream);
            let (do_p, _g5) = read_ptr(d_o, stream);
            let dh_last = dh_last.map(|x| read_ptr(x, stream));
            let dh_last_p = dh_last.as_ref().map_or(0u64, |(p, _)| *p);
            let h0 = inputs.h0.as_ref().map(|x| read_ptr(x, stream));
            let h0_p = h0.as_ref().map_or(0u64, |(p, _)| *p);
            let (dv_p, _w1) = write_ptr(&mut grads.dv, stream);
            let dh0 = grads.dh0.as_mut().map(|x| write_ptr(x, stream));
            let dh0_p = dh0.as_ref().map_or(0u64, |(p, _)| *p);
            let (parts_p, _w2) = write_ptr(&mut parts, stream);
            let (ck_p, _w3) = write_ptr(&mut checkpoints, stream);
            let cfg = LaunchConfig {
                grid_dim: (gx, gy, gz),
                block_dim: (NK_GLA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match scan_gla_bwd_k*_* in kernels/gla_backward.cu; the inputs
            // hold the validated element counts, K <= kmax, parts holds 3·tiles·B·T·H·K and
            // checkpoints blocks·segments·kmax·32 accumulators, segments = ⌈chunks / per⌉.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&q)
                    .arg(&k)
                    .arg(&v)
                    .arg(&g)
                    .arg(&do_p)
                    .arg(&dh_last_p)
                    .arg(&dv_p)
                    .arg(&dh0_p)
                    .arg(&parts_p)
                    .arg(&ck_p)
                    .arg(&bb)
                    .arg(&tt)
                    .arg(&hh)
                    .arg(&kk)
                    .arg(&vv32)
                    .arg(&scale)
                    .arg(&per64)
                    .arg(&h0_p)
                    .launch(cfg)?;
            }
        }
        {
            let (parts_p, _g1) = read_ptr(&parts, stream);
            let (dq_p, _w1) = write_ptr(&mut grads.dq, stream);
            let (dk_p, _w2) = write_ptr(&mut grads.dk, stream);
            let (dg_p, _w3) = write_ptr(&mut grads.dg, stream);
            let (n, tiles32) = (i64_dim("q", "B·T·H·K", qk)?, i32_dim("v", "V / 32", tiles)?);
            let cfg = LaunchConfig {
                // 3·qk fits (sizes() checks 8·qk); at most 8192 blocks, grid-stride
                grid_dim: ((3 * qk).div_ceil(256).min(8192) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: parts holds 3·tiles·n accumulators and dq, dk, dg n elements each.
            unsafe {
                stream
                    .launch_builder(&sum)
                    .arg(&parts_p)
                    .arg(&dq_p)
                    .arg(&dk_p)
                    .arg(&dg_p)
                    .arg(&n)
                    .arg(&tiles32)
                    .launch(cfg)?;
            }
        }
        Ok(grads)
    }

    /// Host in, host out on the device's default stream: [`gla_backward`] as [`GlaGrads`].
    pub fn gla_backward_host<E: CudaElement>(
        device: &Device,
        params: &GlaParams,
        shape: GlaShape,
        inputs: &GlaInputs<'_, E>,
        d_o: &[E],
        dh_last: Option<&[E::Acc]>,
    ) -> Result<GlaGrads<E>> {
        let (qk, vv, state) = inputs.validate(params, &shape)?;
        super::check_output_grads(&shape, vv, state, d_o.len(), dh_last.map(|x| x.len()))?;
        check_key_dim::<E>("scan.gla_backward", shape.key_dim)?;
        kernel_dims(&shape)?;
        let stream = device.stream();
        // zero-length inputs go up as one zero (a view of length 0 is then taken)
        let up = |x: &[E]| -> Result<CudaSlice<E>> {
            Ok(if x.is_empty() {
                stream.alloc_zeros::<E>(1)?
            } else {
                stream.clone_htod(x)?
            })
        };
        let up_acc = |x: &[E::Acc]| -> Result<CudaSlice<E::Acc>> {
            Ok(if x.is_empty() {
                stream.alloc_zeros::<E::Acc>(1)?
            } else {
                stream.clone_htod(x)?
            })
        };
        let (q, k, v, g, do_d) = (
            up(inputs.q)?,
            up(inputs.k)?,
            up(inputs.v)?,
            up(inputs.g)?,
            up(d_o)?,
        );
        let h0 = inputs.h0.map(up_acc).transpose()?;
        let dh_last_d = dh_last.map(up_acc).transpose()?;
        let grads = {
            let device_inputs = DeviceInputs {
                q: q.slice(0..qk),
                k: k.slice(0..qk),
                v: v.slice(0..vv),
                g: g.slice(0..qk),
                h0: h0.as_ref().map(|x| x.slice(0..state)),
            };
            gla_backward(
                device,
                stream,
                params,
                shape,
                &device_inputs,
                &do_d.slice(0..vv),
                dh_last_d.as_ref().map(|x| x.slice(0..state)).as_ref(),
            )?
        };
        let down = |x: &CudaSlice<E>, n: usize| -> Result<Vec<E>> {
            Ok(if n == 0 {
                Vec::new()
            } else {
                stream.clone_dtoh(&x.slice(0..n))?
            })
        };
        Ok(GlaGrads {
            dq: down(&grads.dq, qk)?,
            dk: down(&grads.dk, qk)?,
            dv: down(&grads.dv, vv)?,
            dg: down(&grads.dg, qk)?,
            dh0: match grads.dh0 {
                Some(_) if state == 0 => Some(Vec::new()),
                Some(x) => Some(stream.clone_dtoh(&x.slice(0..state))?),
                None => None,
            },
        })
    }
}
