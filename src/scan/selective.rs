//! `scan.selective`: the fused selective scan of Mamba-1, on the CPU.
//!
//! Per (batch, channel d, state n): dt = delta (+ delta_bias, then softplus if asked);
//! x\[t\] = exp(dt·A\[d,n\])·x\[t-1\] + dt·Bm\[t,n\]·u\[t\]; y\[t\] = Σ_n Cm\[t,n\]·x\[t,d,n\] + Dskip·u\[t\];
//! y *= silu(z) where z is given. Discretization, scan, contraction, skip and gate run in one
//! pass; the [B, T, D, N] states are never stored.
//!
//! Kernel plan: tasks are (batch, block of channels); a task keeps its block's states
//! `x[n][d]` and `A` transposed to `[n][d]` in small buffers, so the vectors run across
//! channels (contiguous in u, delta, y) and Bm\[t,n\], Cm\[t,n\] are broadcast. The bound is the
//! B·T·D·N exponentials (a vectorized exp), not memory. Each (batch, channel) is computed by
//! one task in time order: deterministic whatever the thread count.

use crate::cpu::{Isa, SendPtr, Simd, SimdKernel, dispatch, prefetch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result};
use crate::scan::check_len;
use rayon::prelude::*;

mod backward;
pub(crate) use backward::selective_backward_into_impl;
pub use backward::{
    SelectiveGrads, SelectiveGradsMut, selective_backward, selective_backward_into,
    selective_backward_into_on, selective_backward_on,
};

/// Channels per task: wide row segments of u, delta, z and y per step keep the strided rows
/// streaming (64 → 256 channels measured 64 → 52 ms at the bench size; 256 → 512, 2 KiB
/// segments, another 4–11% on two threads, although the block's state and A, 64 KiB with 16
/// states, then sit in L2 rather than L1). Halved, down to `MIN_CHANNEL_BLOCK`, while there
/// would be fewer than two tasks per thread.
const CHANNEL_BLOCK: usize = 512;
const MIN_CHANNEL_BLOCK: usize = 64;

/// The forward's channels per task for `b` batch rows of `d` channels (a multiple of 32, so
/// a channel takes the same vector path whatever the block: results do not depend on it).
fn channel_block(b: usize, d: usize) -> usize {
    let threads = rayon::current_num_threads();
    let mut block = CHANNEL_BLOCK;
    while block > MIN_CHANNEL_BLOCK && b * d.div_ceil(block) < 2 * threads {
        block /= 2;
    }
    block
}

/// Steps ahead whose rows of u, delta and z are prefetched.
const PREFETCH_STEPS: usize = 6;

/// Parameters of `scan.selective`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SelectiveParams {
    /// dt = softplus(delta + delta_bias) instead of delta + delta_bias.
    pub delta_softplus: bool,
}

impl SelectiveParams {
    /// The defaults: `delta_softplus` false.
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply softplus to delta (+ delta_bias) to get dt (default false: dt = delta + delta_bias).
    pub fn delta_softplus(mut self, on: bool) -> Self {
        self.delta_softplus = on;
        self
    }
}

/// `[B, T, D]` sequences with an `N`-dimensional state per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectiveShape {
    /// B, the batch size.
    pub batch: usize,
    /// T, the time steps.
    pub len: usize,
    /// D, the channels (of u, delta, y).
    pub channels: usize,
    /// N, the state size per channel (of A, Bm, Cm).
    pub state: usize,
}

impl SelectiveShape {
    /// From the dims in field order (B, T, D, N).
    pub fn new(batch: usize, len: usize, channels: usize, state: usize) -> Self {
        Self {
            batch,
            len,
            channels,
            state,
        }
    }

    /// From the dims of `u [B, T, D]` and `A [D, N]`.
    pub fn from_dims(u: &[usize], a: &[usize]) -> Result<Self> {
        let [batch, len, channels] = *u else {
            return Err(Error::shape("u", "rank 3 [B, T, D]", format!("{u:?}")));
        };
        match *a {
            [d, state] if d == channels => Ok(Self::new(batch, len, channels, state)),
            _ => Err(Error::shape(
                "A",
                format!("[{channels}, N]"),
                format!("{a:?}"),
            )),
        }
    }

    fn sizes(&self) -> Result<Sizes> {
        let mul = |x: usize, y: usize, what: &str| {
            x.checked_mul(y)
                .ok_or_else(|| Error::overflow(what, format!("{self:?} overflows")))
        };
        let seq = mul(mul(self.batch, self.len, "u")?, self.channels, "u")?;
        let bc = mul(mul(self.batch, self.len, "Bm")?, self.state, "Bm")?;
        let a = mul(self.channels, self.state, "A")?;
        let states = mul(self.batch, a, "h0")?;
        if seq.checked_mul(8).is_none()
            || bc.checked_mul(8).is_none()
            || states.checked_mul(8).is_none()
        {
            return Err(Error::overflow(
                "u",
                format!("{self:?} exceeds the address space"),
            ));
        }
        Ok(Sizes { seq, bc, a, states })
    }
}

struct Sizes {
    /// B·T·D, B·T·N, D·N, B·D·N.
    seq: usize,
    bc: usize,
    a: usize,
    states: usize,
}

/// The inputs of `scan.selective`: sequences in the element type, parameters (A, Dskip,
/// delta_bias, h0) in its accumulator type (f32, or f64 for f64 sequences).
#[derive(Clone, Copy, Debug)]
pub struct SelectiveInputs<'a, E: Element> {
    /// `[B, T, D]`: the input sequence.
    pub u: &'a [E],
    /// `[B, T, D]`: the step sizes before `delta_bias` and softplus.
    pub delta: &'a [E],
    /// `[D, N]`, accumulator type: the state matrix A (decay `exp(dt·A)`; negative in Mamba).
    pub a: &'a [E::Acc],
    /// `[B, T, N]`: the input projection Bm.
    pub bm: &'a [E],
    /// `[B, T, N]`: the output projection Cm.
    pub cm: &'a [E],
    /// `[D]`, accumulator type: the skip weight, `y += Dskip·u` (default none).
    pub dskip: Option<&'a [E::Acc]>,
    /// `[B, T, D]`: the gate, `y ·= silu(z)` (default none).
    pub z: Option<&'a [E]>,
    /// `[D]`, accumulator type: added to delta before the softplus (default none).
    pub delta_bias: Option<&'a [E::Acc]>,
    /// `[B, D, N]`, accumulator type: the state before the first step (default none = zeros).
    pub h0: Option<&'a [E::Acc]>,
}

impl<'a, E: Element> SelectiveInputs<'a, E> {
    /// The required inputs; the optional ones (`dskip`, `z`, `delta_bias`, `h0`) are `None`
    /// until set. `u`, `delta [B, T, D]`; `a [D, N]`; `bm`, `cm [B, T, N]`.
    pub fn new(u: &'a [E], delta: &'a [E], a: &'a [E::Acc], bm: &'a [E], cm: &'a [E]) -> Self {
        Self {
            u,
            delta,
            a,
            bm,
            cm,
            dskip: None,
            z: None,
            delta_bias: None,
            h0: None,
        }
    }

    /// The skip weight `Dskip [D]`: y += Dskip·u.
    pub fn dskip(mut self, dskip: Option<&'a [E::Acc]>) -> Self {
        self.dskip = dskip;
        self
    }

    /// The gate `z [B, T, D]`: y ·= silu(z).
    pub fn z(mut self, z: Option<&'a [E]>) -> Self {
        self.z = z;
        self
    }

    /// `delta_bias [D]`, added to delta before the softplus.
    pub fn delta_bias(mut self, delta_bias: Option<&'a [E::Acc]>) -> Self {
        self.delta_bias = delta_bias;
        self
    }

    /// The state before the first step, `h0 [B, D, N]` (zeros when `None`).
    pub fn h0(mut self, h0: Option<&'a [E::Acc]>) -> Self {
        self.h0 = h0;
        self
    }

    fn validate(&self, shape: &SelectiveShape) -> Result<Sizes> {
        Lengths {
            u: self.u.len(),
            delta: self.delta.len(),
            a: self.a.len(),
            bm: self.bm.len(),
            cm: self.cm.len(),
            dskip: self.dskip.map(<[_]>::len),
            z: self.z.map(<[_]>::len),
            delta_bias: self.delta_bias.map(<[_]>::len),
            h0: self.h0.map(<[_]>::len),
        }
        .validate(shape)
    }
}

/// The element counts of the inputs, host or device alike.
struct Lengths {
    u: usize,
    delta: usize,
    a: usize,
    bm: usize,
    cm: usize,
    dskip: Option<usize>,
    z: Option<usize>,
    delta_bias: Option<usize>,
    h0: Option<usize>,
}

impl Lengths {
    fn validate(&self, shape: &SelectiveShape) -> Result<Sizes> {
        let sizes = shape.sizes()?;
        let SelectiveShape {
            batch: b,
            len: t,
            channels: d,
            state: n,
        } = *shape;
        let seq = format!("[{b}, {t}, {d}]");
        check_len("u", self.u, sizes.seq, &seq)?;
        check_len("delta", self.delta, sizes.seq, &seq)?;
        check_len("A", self.a, sizes.a, &format!("[{d}, {n}]"))?;
        check_len("Bm", self.bm, sizes.bc, &format!("[{b}, {t}, {n}]"))?;
        check_len("Cm", self.cm, sizes.bc, &format!("[{b}, {t}, {n}]"))?;
        if let Some(x) = self.dskip {
            check_len("Dskip", x, d, &format!("[{d}]"))?;
        }
        if let Some(x) = self.z {
            check_len("z", x, sizes.seq, &seq)?;
        }
        if let Some(x) = self.delta_bias {
            check_len("delta_bias", x, d, &format!("[{d}]"))?;
        }
        if let Some(x) = self.h0 {
            check_len("h0", x, sizes.states, &format!("[{b}, {d}, {n}]"))?;
        } else if t == 0 {
            // rule 3 of crate::error: with no step and no h0, no input carries the B of
            // h_last [B, D, N]
            let inputs = self.a + self.dskip.unwrap_or(0) + self.delta_bias.unwrap_or(0);
            crate::error::check_backed("h0", "B (T = 0 steps)", sizes.states, inputs)?;
        }
        Ok(sizes)
    }
}

/// The outputs of `scan.selective`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SelectiveOut<E: Element> {
    /// `[B, T, D]`
    pub y: Vec<E>,
    /// `[B, D, N]`: the state after the last step, in the accumulator type.
    pub h_last: Vec<E::Acc>,
}

/// `scan.selective` on the CPU: returns `y [B, T, D]` and `h_last [B, D, N]` (the state after
/// the last step).
pub fn selective<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
) -> Result<SelectiveOut<E>> {
    selective_on(Isa::active(), params, shape, inputs)
}

/// [`selective`] on a chosen instruction set.
#[doc(hidden)]
pub fn selective_on<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
) -> Result<SelectiveOut<E>> {
    let sizes = inputs.validate(&shape)?;
    let mut out = SelectiveOut {
        y: vec![E::default(); sizes.seq],
        h_last: vec![<E::Acc as Accum>::ZERO; sizes.states],
    };
    E::scan_selective_into(isa, params, shape, inputs, &mut out.y, &mut out.h_last)?;
    Ok(out)
}

/// [`selective`] into the caller's `y [B, T, D]` and `h_last [B, D, N]`.
pub fn selective_into<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    y: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    E::scan_selective_into(Isa::active(), params, shape, inputs, y, h_last)
}

/// [`selective_into`] on a chosen instruction set.
#[doc(hidden)]
pub fn selective_into_on<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    y: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    E::scan_selective_into(isa, params, shape, inputs, y, h_last)
}

/// The CPU forward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn selective_into_impl<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    y: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    isa.check()?;
    let sizes = inputs.validate(&shape)?;
    let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
    check_len("y", y.len(), sizes.seq, &format!("[{b}, {t}, {d}]"))?;
    check_len(
        "h_last",
        h_last.len(),
        sizes.states,
        &format!("[{b}, {d}, {n}]"),
    )?;
    if b == 0 || d == 0 {
        return Ok(());
    }
    if t == 0 {
        // no step: h_last is h0 (zeros without one); rule 4 of crate::error, the B·D
        // channels are not iterated
        match inputs.h0 {
            Some(h0) => h_last.copy_from_slice(h0),
            None => h_last.fill(<E::Acc as Accum>::ZERO),
        }
        return Ok(());
    }
    let (yp, hp) = (SendPtr(y.as_mut_ptr()), SendPtr(h_last.as_mut_ptr()));
    let block = channel_block(b, d);
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..d).step_by(block).map(move |d0| (bi, d0)))
        .collect();
    tasks.into_par_iter().for_each(|(bi, d0)| {
        let w = block.min(d - d0);
        // SAFETY: each task writes only rows bi of y at channels [d0, d0 + w) and h_last
        // entries (bi, d0..d0 + w, ·): disjoint across tasks; lengths were validated.
        let kernel = SelectiveBlock {
            shape,
            params: *params,
            inputs,
            bi,
            d0,
            w,
            y: yp,
            h_last: hp,
        };
        dispatch(isa, kernel);
    });
    Ok(())
}

/// softplus(x) = ln(1 + e^x), exactly enough in f64 and f32 (x > 20: x itself to < 2e-9).
pub(crate) fn softplus<A: Accum>(x: A) -> A {
    let v = x.to_f64();
    A::from_f64(if v > 20.0 { v } else { v.exp().ln_1p() })
}

/// silu(z) = z·sigmoid(z).
pub(crate) fn silu<A: Accum>(z: A) -> A {
    let v = z.to_f64();
    A::from_f64(v / (1.0 + (-v).exp()))
}

/// Vector softplus for f32: max(x, 0) + ln(1 + e^-|x|), with ln(1 + y) = 2·atanh(s),
/// s = y / (2 + y) in [0, 1/3], summed to s^13 (truncation below 5e-9).
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`).
#[inline(always)]
unsafe fn vsoftplus<S: Simd, A: Accum>(x: A::V<S>) -> A::V<S> {
    // SAFETY: register-only vector operations; the ISA per this fn's contract.
    unsafe {
        let splat = |v: f64| A::vsplat::<S>(A::from_f64(v));
        let neg_abs = A::vmin::<S>(x, A::vmul::<S>(x, splat(-1.0)));
        let y = A::vexp::<S>(neg_abs);
        let s = A::vdiv::<S>(y, A::vadd::<S>(y, splat(2.0)));
        let s2 = A::vmul::<S>(s, s);
        let mut poly = splat(1.0 / 13.0);
        for c in [11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
            poly = A::vfma::<S>(poly, s2, splat(1.0 / c));
        }
        A::vfma::<S>(
            A::vmul::<S>(splat(2.0), s),
            poly,
            A::vmax::<S>(x, splat(0.0)),
        )
    }
}

/// One time step's state update and C contraction for a block's channels, `[n][w]` state.
struct StateRows<'a, A> {
    n: usize,
    w: usize,
    dt: &'a [A],
    dtu: &'a [A],
    a_t: &'a [A],
    bm: &'a [A],
    cm: &'a [A],
}

impl<A: Accum> StateRows<'_, A> {
    /// Channels [c, c + V·lanes): x = 2^(dt·a_t)·x + dt·u·Bm[j] for every state j, and
    /// acc = Σ_j Cm[j]·x. `exp2` takes the V decay exponents of one state at once.
    ///
    /// # Safety
    /// c + V·lanes <= w; `x` holds n·w values, `acc` w.
    #[inline(always)]
    unsafe fn step<S: Simd, const V: usize>(
        &self,
        c: usize,
        x: &mut [A],
        acc: &mut [A],
        exp2: impl Fn([A::V<S>; V]) -> [A::V<S>; V],
    ) {
        let lanes = A::lanes::<S>();
        let at0: [usize; V] = std::array::from_fn(|v| c + v * lanes);
        // SAFETY: every index is below c + V·lanes <= w (or j·w + that, below n·w).
        unsafe {
            let dtv = at0.map(|i| A::vload::<S>(self.dt.as_ptr().add(i)));
            let dtuv = at0.map(|i| A::vload::<S>(self.dtu.as_ptr().add(i)));
            let mut yv = [A::vsplat::<S>(A::ZERO); V];
            for j in 0..self.n {
                let at = at0.map(|i| j * self.w + i);
                let decay = exp2(std::array::from_fn(|v| {
                    A::vmul::<S>(dtv[v], A::vload::<S>(self.a_t.as_ptr().add(at[v])))
                }));
                let (b_j, c_j) = (A::vsplat::<S>(self.bm[j]), A::vsplat::<S>(self.cm[j]));
                for v in 0..V {
                    let input = A::vmul::<S>(dtuv[v], b_j);
                    let xv = A::vfma::<S>(decay[v], A::vload::<S>(x.as_ptr().add(at[v])), input);
                    A::vstore::<S>(x.as_mut_ptr().add(at[v]), xv);
                    yv[v] = A::vfma::<S>(c_j, xv, yv[v]);
                }
            }
            for v in 0..V {
                A::vstore::<S>(acc.as_mut_ptr().add(at0[v]), yv[v]);
            }
        }
    }
}

/// Vector silu(z) = z / (1 + e^-z).
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`).
#[inline(always)]
unsafe fn vsilu<S: Simd, A: Accum>(z: A::V<S>) -> A::V<S> {
    // SAFETY: register-only vector operations; the ISA per this fn's contract.
    unsafe {
        let one = A::vsplat::<S>(A::ONE);
        let e = A::vexp::<S>(A::vmul::<S>(z, A::vsplat::<S>(A::from_f64(-1.0))));
        A::vdiv::<S>(z, A::vadd::<S>(one, e))
    }
}

/// One task: batch `bi`, channels [d0, d0 + w).
struct SelectiveBlock<'a, E: Element> {
    shape: SelectiveShape,
    params: SelectiveParams,
    inputs: &'a SelectiveInputs<'a, E>,
    bi: usize,
    d0: usize,
    w: usize,
    y: SendPtr<E>,
    h_last: SendPtr<E::Acc>,
}

impl<E: Element> SimdKernel for SelectiveBlock<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            shape,
            params,
            inputs,
            bi,
            d0,
            w,
            ..
        } = self;
        let (t_len, d, n) = (shape.len, shape.channels, shape.state);
        let zero = <E::Acc as Accum>::ZERO;
        let lanes = E::Acc::lanes::<S>();
        // log2(e)·A and the states of this block, transposed to [n][channel]: the decay
        // e^(Δ·A) is computed as 2^(Δ·log2(e)·A), whose range reduction needs no multiply
        let log2e = <E::Acc as Accum>::from_f64(std::f64::consts::LOG2_E);
        let mut a_t = vec![zero; n * w];
        let mut x = vec![zero; n * w];
        for c in 0..w {
            for j in 0..n {
                a_t[j * w + c] = log2e * inputs.a[(d0 + c) * n + j];
                if let Some(h0) = inputs.h0 {
                    x[j * w + c] = h0[(bi * d + d0 + c) * n + j];
                }
            }
        }
        let (mut dt, mut dtu, mut acc) = (vec![zero; w], vec![zero; w], vec![zero; w]);
        let (mut bm, mut cm) = (vec![zero; n], vec![zero; n]);
        for t in 0..t_len {
            let row = (bi * t_len + t) * d + d0;
            if t + PREFETCH_STEPS < t_len {
                // the rows of a later step: the block's segments are a whole row of D apart per
                // step, a stride the hardware prefetchers do not follow
                let ahead = row + PREFETCH_STEPS * d;
                prefetch(inputs.u[ahead..].as_ptr(), w);
                prefetch(inputs.delta[ahead..].as_ptr(), w);
                if let Some(z) = inputs.z {
                    prefetch(z[ahead..].as_ptr(), w);
                }
            }
            // dt and dt·u for the block: vectors in f32 (the f64 path keeps the exact scalar
            // softplus, since the vector one is accurate to f32 only)
            let vector_prologue = std::mem::size_of::<E::Acc>() == 4;
            let mut c = 0;
            if vector_prologue {
                // SAFETY: c + lanes <= w; row + w is in bounds of delta and u (validated).
                unsafe {
                    while c + lanes <= w {
                        let mut v = E::vload::<S>(inputs.delta.as_ptr().add(row + c));
                        if let Some(bias) = inputs.delta_bias {
                            v = E::Acc::vadd::<S>(v, E::Acc::vload::<S>(bias.as_ptr().add(d0 + c)));
                        }
                        if params.delta_softplus {
                            v = vsoftplus::<S, E::Acc>(v);
                        }
                        E::Acc::vstore::<S>(dt.as_mut_ptr().add(c), v);
                        let u = E::vload::<S>(inputs.u.as_ptr().add(row + c));
                        E::Acc::vstore::<S>(dtu.as_mut_ptr().add(c), E::Acc::vmul::<S>(v, u));
                        c += lanes;
                    }
                }
            }
            for c in c..w {
                let mut v = inputs.delta[row + c].to_acc();
                if let Some(bias) = inputs.delta_bias {
                    v = v + bias[d0 + c];
                }
                if params.delta_softplus {
                    v = softplus(v);
                }
                dt[c] = v;
                dtu[c] = v * inputs.u[row + c].to_acc();
            }
            let bc_row = (bi * t_len + t) * n;
            for j in 0..n {
                bm[j] = inputs.bm[bc_row + j].to_acc();
                cm[j] = inputs.cm[bc_row + j].to_acc();
            }
            let mut c = 0;
            let state = StateRows {
                n,
                w,
                dt: &dt,
                dtu: &dtu,
                a_t: &a_t,
                bm: &bm,
                cm: &cm,
            };
            // SAFETY: c + 4·lanes (then c + lanes) <= w, and every buffer holds n·w or w values.
            unsafe {
                // four channel vectors per state step, their decays through the exp2 side by
                // side (vexp2_x4); then single vectors
                while c + 4 * lanes <= w {
                    state.step::<S, 4>(c, &mut x, &mut acc, |v| E::Acc::vexp2_x4::<S>(v));
                    c += 4 * lanes;
                }
                while c + lanes <= w {
                    state.step::<S, 1>(c, &mut x, &mut acc, |[v]| [E::Acc::vexp2::<S>(v)]);
                    c += lanes;
                }
            }
            while c < w {
                let mut yc = zero;
                for j in 0..n {
                    let at = j * w + c;
                    x[at] = (dt[c] * a_t[at]).exp2() * x[at] + dtu[c] * bm[j];
                    yc = yc + cm[j] * x[at];
                }
                acc[c] = yc;
                c += 1;
            }
            // y = Σ_n C·x + Dskip·u, gated by silu(z)
            let mut c = 0;
            if vector_prologue {
                // SAFETY: as the prologue; y rows of this task only (see selective_into_impl).
                unsafe {
                    while c + lanes <= w {
                        let mut out = E::Acc::vload::<S>(acc.as_ptr().add(c));
                        if let Some(dskip) = inputs.dskip {
                            let u = E::vload::<S>(inputs.u.as_ptr().add(row + c));
                            out = E::Acc::vfma::<S>(
                                E::Acc::vload::<S>(dskip.as_ptr().add(d0 + c)),
                                u,
                                out,
                            );
                        }
                        if let Some(z) = inputs.z {
                            out = E::Acc::vmul::<S>(
                                out,
                                vsilu::<S, E::Acc>(E::vload::<S>(z.as_ptr().add(row + c))),
                            );
                        }
                        E::vstore::<S>(self.y.get().add(row + c), out);
                        c += lanes;
                    }
                }
            }
            for c in c..w {
                let u = inputs.u[row + c].to_acc();
                let mut out = acc[c];
                if let Some(dskip) = inputs.dskip {
                    out = out + dskip[d0 + c] * u;
                }
                if let Some(z) = inputs.z {
                    out = out * silu(z[row + c].to_acc());
                }
                // SAFETY: this task's own slice of y (see selective_into_impl).
                unsafe { *self.y.get().add(row + c) = E::from_acc(out) };
            }
        }
        for c in 0..w {
            for j in 0..n {
                // SAFETY: this task's own entries of h_last.
                unsafe { *self.h_last.get().add((bi * d + d0 + c) * n + j) = x[j * w + c] };
            }
        }
    }
}

/// The CUDA forward and backward (feature `cuda`): kernels/selective.cu, one thread per
/// (batch, channel, time chunk) with its states in registers (chunk summaries, a carry chain
/// over chunks, then each chunk rerun from its entering state); kernels/selective_backward.cu,
/// one thread per (batch, channel), re-running the forward chunk by chunk from stored states.
#[cfg(feature = "cuda")]
pub mod cuda {
    use super::{Lengths, SelectiveInputs, SelectiveParams, SelectiveShape};
    use super::{SelectiveGrads, SelectiveOut};
    use crate::cuda::config::{
        NK_SELECTIVE_BWD_CHUNK, NK_SELECTIVE_BWD_MAX_STATE, NK_SELECTIVE_MAX_STATE,
        NK_SELECTIVE_MAX_STATE_F64, NK_SELECTIVE_MIN_CHUNK, NK_SELECTIVE_THREADS,
    };
    use crate::cuda::{CudaElement, Device, read_ptr, scratch, write_ptr};
    use crate::element::DType;
    use crate::error::{Error, Result};
    use crate::scan::check_len;
    use cudarc::driver::{CudaSlice, CudaView as View};
    use cudarc::driver::{CudaStream, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg};
    use std::sync::Arc;

    /// The inputs on the device; parameters (A, Dskip, delta_bias, h0) in the accumulator type.
    pub struct DeviceInputs<'a, E: CudaElement> {
        /// `[B, T, D]`: the input sequence.
        pub u: CudaView<'a, E>,
        /// `[B, T, D]`: the step sizes before `delta_bias` and softplus.
        pub delta: CudaView<'a, E>,
        /// `[D, N]`, accumulator type: the state matrix A.
        pub a: CudaView<'a, E::Acc>,
        /// `[B, T, N]`: the input projection Bm.
        pub bm: CudaView<'a, E>,
        /// `[B, T, N]`: the output projection Cm.
        pub cm: CudaView<'a, E>,
        /// `[D]`, accumulator type: the skip weight, `y += Dskip·u`.
        pub dskip: Option<CudaView<'a, E::Acc>>,
        /// `[B, T, D]`: the gate, `y ·= silu(z)`.
        pub z: Option<CudaView<'a, E>>,
        /// `[D]`, accumulator type: added to delta before the softplus.
        pub delta_bias: Option<CudaView<'a, E::Acc>>,
        /// `[B, D, N]`, accumulator type: the state before the first step (`None` = zeros).
        pub h0: Option<CudaView<'a, E::Acc>>,
    }

    impl<E: CudaElement> DeviceInputs<'_, E> {
        /// The lengths checks of the host inputs, on the device views.
        fn validate(&self, shape: &SelectiveShape) -> Result<super::Sizes> {
            Lengths {
                u: self.u.len(),
                delta: self.delta.len(),
                a: self.a.len(),
                bm: self.bm.len(),
                cm: self.cm.len(),
                dskip: self.dskip.as_ref().map(|x| x.len()),
                z: self.z.as_ref().map(|x| x.len()),
                delta_bias: self.delta_bias.as_ref().map(|x| x.len()),
                h0: self.h0.as_ref().map(|x| x.len()),
            }
            .validate(shape)
        }
    }

    /// The instantiation holding N states: the smallest of 4, 16 and the dtype's maximum.
    fn state_bucket<E: CudaElement>(n: usize) -> Result<u32> {
        let max = if E::DTYPE == DType::F64 {
            NK_SELECTIVE_MAX_STATE_F64
        } else {
            NK_SELECTIVE_MAX_STATE
        };
        match n {
            0..=4 => Ok(4),
            5..=16 => Ok(16),
            _ if n <= max as usize => Ok(max),
            _ => Err(Error::Unsupported(format!(
                "scan.selective on CUDA with N = {n} (at most {max} for {})",
                E::DTYPE
            ))),
        }
    }

    /// `scan.selective` on the GPU: writes `y [B, T, D]` and `h_last [B, D, N]` on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn selective<E: CudaElement>(
        device: &Device,
        stream: &Arc<CudaStream>,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &DeviceInputs<'_, E>,
        y: &mut impl DevicePtrMut<E>,
        h_last: &mut impl DevicePtrMut<E::Acc>,
    ) -> Result<()> {
        device.check_stream(stream)?;
        let sizes = inputs.validate(&shape)?;
        let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
        check_len("y", y.len(), sizes.seq, &format!("[{b}, {t}, {d}]"))?;
        check_len(
            "h_last",
            h_last.len(),
            sizes.states,
            &format!("[{b}, {d}, {n}]"),
        )?;
        if b == 0 || d == 0 {
            return Ok(());
        }
        let bucket = state_bucket::<E>(n)?;
        if t == 0 {
            // no step: h_last is h0 (or zeros)
            match &inputs.h0 {
                _ if sizes.states == 0 => {}
                Some(h0) => stream.memcpy_dtod(h0, h_last)?,
                None => stream.memset_zeros(h_last)?,
            }
            return Ok(());
        }
        let (chunks, chunk_len) = forward_chunking(b, t, d);
        let over = || Error::overflow("u", format!("{shape:?} needs too many blocks"));
        let cfg = LaunchConfig {
            // x: (batch, channel block) pairs, as the kernel splits blockIdx.x
            grid_dim: (
                u32::try_from(b * d.div_ceil(NK_SELECTIVE_THREADS as usize))
                    .ok()
                    .filter(|&x| x < i32::MAX as u32)
                    .ok_or_else(over)?,
                chunks as u32,
                1,
            ),
            block_dim: (NK_SELECTIVE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let optional = |x: &Option<(u64, cudarc::driver::SyncOnDrop<'_>)>| {
            x.as_ref().map_or(0u64, |(p, _)| *p)
        };
        let (u, _gu) = read_ptr(&inputs.u, stream);
        let (delta, _gd) = read_ptr(&inputs.delta, stream);
        let (a, _ga) = read_ptr(&inputs.a, stream);
        let (bm, _gb) = read_ptr(&inputs.bm, stream);
        let (cm, _gc) = read_ptr(&inputs.cm, stream);
        let dskip = inputs.dskip.as_ref().map(|x| read_ptr(x, stream));
        let z = inputs.z.as_ref().map(|x| read_ptr(x, stream));
        let bias = inputs.delta_bias.as_ref().map(|x| read_ptr(x, stream));
        let h0 = inputs.h0.as_ref().map(|x| read_ptr(x, stream));
        let (dskip_p, z_p, bias_p, h0_p) = (
            optional(&dskip),
            optional(&z),
            optional(&bias),
            optional(&h0),
        );
        let (bb, tt, dd, nn, sp, cl) = (
            b as i64,
            t as i64,
            d as i64,
            n as i32,
            params.delta_softplus as i32,
            chunk_len as i64,
        );
        // with several chunks: the chunk summaries, then the state entering every chunk
        let carries = if chunks > 1 {
            let per_chunk = b * d * chunks;
            let states = per_chunk.checked_mul(n).ok_or_else(over)?;
            let mut end = scratch::<E::Acc>(stream, states)?;
            let mut dt_sum = scratch::<E::Acc>(stream, per_chunk)?;
            let mut carries = scratch::<E::Acc>(stream, states)?;
            let summary = device.function(
                "selective",
                &format!("scan_selective_fwd_summary_n{bucket}_{}", E::SUFFIX),
            )?;
            let acc = if E::DTYPE == DType::F64 { "f64" } else { "f32" };
            let carry = device.function("selective", &format!("scan_selective_fwd_carry_{acc}"))?;
            {
                let (end_p, _w1) = write_ptr(&mut end, stream);
                let (dts_p, _w2) = write_ptr(&mut dt_sum, stream);
                // SAFETY: arguments match scan_selective_fwd_summary_n*_* in
                // kernels/selective.cu; end holds B·chunks·D·N and dt_sum B·chunks·D
                // accumulators, the grid covers exactly chunks chunks of chunk_len steps.
                unsafe {
                    stream
                        .launch_builder(&summary)
                        .arg(&u)
                        .arg(&delta)
                        .arg(&a)
                        .arg(&bm)
                        .arg(&bias_p)
                        .arg(&end_p)
                        .arg(&dts_p)
                        .arg(&bb)
                        .arg(&tt)
                        .arg(&dd)
                        .arg(&nn)
                        .arg(&sp)
                        .arg(&cl)
                        .launch(cfg)?;
                }
            }
            if states > 0 {
                let blocks =
                    crate::cuda::grid_x("h0", "⌈B·D·N/256⌉ blocks", (b * d * n).div_ceil(256))?;
                let (end_p, _g1) = read_ptr(&end, stream);
                let (dts_p, _g2) = read_ptr(&dt_sum, stream);
                let (car_p, _w1) = write_ptr(&mut carries, stream);
                let ch = chunks as i64;
                // SAFETY: arguments match scan_selective_fwd_carry_* (the accumulator type);
                // end and carries hold B·chunks·D·N, dt_sum B·chunks·D accumulators, a D·N.
                unsafe {
                    stream
                        .launch_builder(&carry)
                        .arg(&a)
                        .arg(&h0_p)
                        .arg(&end_p)
                        .arg(&dts_p)
                        .arg(&car_p)
                        .arg(&bb)
                        .arg(&dd)
                        .arg(&nn)
                        .arg(&ch)
                        .launch(LaunchConfig {
                            grid_dim: (blocks, 1, 1),
                            block_dim: (256, 1, 1),
                            shared_mem_bytes: 0,
                        })?;
                }
            }
            Some(carries)
        } else {
            None
        };
        let carries_guard = carries.as_ref().map(|x| read_ptr(x, stream));
        let carries_p = optional(&carries_guard);
        let f = device.function(
            "selective",
            &format!("scan_selective_fwd_n{bucket}_{}", E::SUFFIX),
        )?;
        let (y_p, _gy) = write_ptr(y, stream);
        let (h_p, _gh) = write_ptr(h_last, stream);
        // SAFETY: arguments match scan_selective_fwd_n*_* in kernels/selective.cu; every
        // buffer holds the element counts validated above, carries (when given) B·chunks·D·N.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&u)
                .arg(&delta)
                .arg(&a)
                .arg(&bm)
                .arg(&cm)
                .arg(&dskip_p)
                .arg(&z_p)
                .arg(&bias_p)
                .arg(&h0_p)
                .arg(&carries_p)
                .arg(&y_p)
                .arg(&h_p)
                .arg(&bb)
                .arg(&tt)
                .arg(&dd)
                .arg(&nn)
                .arg(&sp)
                .arg(&cl)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Threads (one per batch, channel and time chunk) to aim for: about 1024 resident per SM
    /// of a 132-SM H100. Untuned on hardware so far.
    const FORWARD_TARGET_THREADS: usize = 132 * 1024;

    /// (chunks, steps per chunk) of the forward for B·D channels over T > 0 steps: one chunk
    /// when B·D threads fill the GPU, else as many as reach the target, each at least
    /// NK_SELECTIVE_MIN_CHUNK steps long (at most 65535); every chunk holds at least one step.
    pub(crate) fn forward_chunking(b: usize, t: usize, d: usize) -> (usize, usize) {
        let lanes = (b * d).max(1);
        let wanted = FORWARD_TARGET_THREADS.div_ceil(lanes);
        let most = t.div_ceil(NK_SELECTIVE_MIN_CHUNK as usize).clamp(1, 65_535);
        let chunks = wanted.clamp(1, most);
        let chunk_len = t.div_ceil(chunks).max(1);
        (t.div_ceil(chunk_len).max(1), chunk_len)
    }

    /// Host in, host out on the device's default stream: `y` and `h_last`.
    pub fn selective_host<E: CudaElement>(
        device: &Device,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, E>,
    ) -> Result<SelectiveOut<E>> {
        let sizes = inputs.validate(&shape)?;
        if sizes.seq == 0 {
            // no step to run (and no zero-length device allocations): h_last is h0
            let h_last = inputs.h0.map_or_else(
                || vec![<E::Acc as crate::element::Accum>::ZERO; sizes.states],
                <[_]>::to_vec,
            );
            return Ok(SelectiveOut {
                y: Vec::new(),
                h_last,
            });
        }
        let stream = device.stream();
        let up = |x: &[E]| stream.clone_htod(x);
        let up_acc = |x: &[E::Acc]| stream.clone_htod(x);
        let (u, delta, a, bm, cm) = (
            up(inputs.u)?,
            up(inputs.delta)?,
            up_acc(inputs.a)?,
            up(inputs.bm)?,
            up(inputs.cm)?,
        );
        let dskip = inputs.dskip.map(up_acc).transpose()?;
        let z = inputs.z.map(up).transpose()?;
        let bias = inputs.delta_bias.map(up_acc).transpose()?;
        let h0 = inputs.h0.map(up_acc).transpose()?;
        let mut y = stream.alloc_zeros::<E>(sizes.seq.max(1))?;
        let mut h_last = stream.alloc_zeros::<E::Acc>(sizes.states.max(1))?;
        {
            let device_inputs = DeviceInputs {
                u: u.as_view(),
                delta: delta.as_view(),
                a: a.as_view(),
                bm: bm.as_view(),
                cm: cm.as_view(),
                dskip: dskip.as_ref().map(|x| x.as_view()),
                z: z.as_ref().map(|x| x.as_view()),
                delta_bias: bias.as_ref().map(|x| x.as_view()),
                h0: h0.as_ref().map(|x| x.as_view()),
            };
            let mut y_view = y.slice_mut(0..sizes.seq);
            let mut h_view = h_last.slice_mut(0..sizes.states);
            selective(
                device,
                stream,
                params,
                shape,
                &device_inputs,
                &mut y_view,
                &mut h_view,
            )?;
        }
        Ok(SelectiveOut {
            y: stream.clone_dtoh(&y.slice(0..sizes.seq))?,
            h_last: stream.clone_dtoh(&h_last.slice(0..sizes.states))?,
        })
    }

    /// Gradients of `scan.selective` on the device (`None` where the input was not given).
    pub struct DeviceGrads<E: CudaElement> {
        /// `[B, T, D]`: the gradient of u.
        pub du: CudaSlice<E>,
        /// `[B, T, D]`: the gradient of delta.
        pub ddelta: CudaSlice<E>,
        /// `[D, N]`, accumulator type: the gradient of A.
        pub da: CudaSlice<E::Acc>,
        /// `[B, T, N]`: the gradient of Bm.
        pub dbm: CudaSlice<E>,
        /// `[B, T, N]`: the gradient of Cm.
        pub dcm: CudaSlice<E>,
        /// `[D]`, accumulator type: the gradient of Dskip, where it was given.
        pub ddskip: Option<CudaSlice<E::Acc>>,
        /// `[B, T, D]`: the gradient of z, where it was given.
        pub dz: Option<CudaSlice<E>>,
        /// `[D]`, accumulator type: the gradient of delta_bias, where it was given.
        pub ddelta_bias: Option<CudaSlice<E::Acc>>,
        /// `[B, D, N]`, accumulator type: the gradient of h0, where it was given.
        pub dh0: Option<CudaSlice<E::Acc>>,
    }

    /// `scan.selective_backward` on the GPU, on `stream`: the gradients of Σ y·dy, in new
    /// device buffers. Deterministic: every sum over channels, batch or time is taken in a
    /// fixed order. N up to NK_SELECTIVE_BWD_MAX_STATE (16); larger N is `Err(Unsupported)`.
    /// Scratch: B·D·N·(⌈T/64⌉ + 64 + 1) + B·T·⌈D/128⌉·N·2 accumulators.
    pub fn selective_backward<E: CudaElement>(
        device: &Device,
        stream: &Arc<CudaStream>,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &DeviceInputs<'_, E>,
        dy: &View<'_, E>,
    ) -> Result<DeviceGrads<E>> {
        device.check_stream(stream)?;
        let sizes = inputs.validate(&shape)?;
        let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
        check_len("dy", dy.len(), sizes.seq, &format!("[{b}, {t}, {d}]"))?;
        if n > NK_SELECTIVE_BWD_MAX_STATE as usize {
            return Err(Error::Unsupported(format!(
                "scan.selective_backward on CUDA with N = {n} (at most {NK_SELECTIVE_BWD_MAX_STATE})"
            )));
        }
        let bucket = if n <= 4 { 4 } else { 16 };
        let blocks_d = d.div_ceil(NK_SELECTIVE_THREADS as usize);
        let chunks = t.div_ceil(NK_SELECTIVE_BWD_CHUNK as usize);
        let over = || Error::overflow("u", format!("{shape:?}: backward scratch overflows"));
        let bdn = sizes.states;
        let checkpoint_len = bdn.checked_mul(chunks).ok_or_else(over)?;
        let steps_len = bdn
            .checked_mul(NK_SELECTIVE_BWD_CHUNK as usize)
            .ok_or_else(over)?;
        let parts_len = (b * t)
            .checked_mul(blocks_d)
            .and_then(|x| x.checked_mul(n))
            .ok_or_else(over)?;
        let grid_x = crate::cuda::grid_x("u", "⌈D/128⌉ channel blocks", blocks_d)?;
        let grid_y = crate::cuda::grid_yz("u", "B (batch)", b)?;

        let zeros =
            |len: usize| -> Result<CudaSlice<E>> { Ok(stream.alloc_zeros::<E>(len.max(1))?) };
        let mut g = DeviceGrads {
            du: zeros(sizes.seq)?,
            ddelta: zeros(sizes.seq)?,
            da: scratch::<E::Acc>(stream, sizes.a)?,
            dbm: zeros(sizes.bc)?,
            dcm: zeros(sizes.bc)?,
            ddskip: inputs
                .dskip
                .as_ref()
                .map(|_| scratch::<E::Acc>(stream, d))
                .transpose()?,
            dz: inputs.z.as_ref().map(|_| zeros(sizes.seq)).transpose()?,
            ddelta_bias: inputs
                .delta_bias
                .as_ref()
                .map(|_| scratch::<E::Acc>(stream, d))
                .transpose()?,
            dh0: inputs
                .h0
                .as_ref()
                .map(|_| scratch::<E::Acc>(stream, bdn))
                .transpose()?,
        };
        if b == 0 || d == 0 || t == 0 {
            // no step: every gradient is zero, dh0 included (dy never reaches h0)
            return Ok(g);
        }
        let mut checkpoints = scratch::<E::Acc>(stream, checkpoint_len)?;
        let mut steps = scratch::<E::Acc>(stream, steps_len)?;
        let mut dbm_part = scratch::<E::Acc>(stream, parts_len)?;
        let mut dcm_part = scratch::<E::Acc>(stream, parts_len)?;
        let mut da_part = scratch::<E::Acc>(stream, bdn)?;
        let mut dskip_part = scratch::<E::Acc>(stream, b * d)?;
        let mut dbias_part = scratch::<E::Acc>(stream, b * d)?;

        let f = device.function(
            "selective_backward",
            &format!("scan_selective_bwd_n{bucket}_{}", E::SUFFIX),
        )?;
        let optional = |x: &Option<(u64, cudarc::driver::SyncOnDrop<'_>)>| {
            x.as_ref().map_or(0u64, |(p, _)| *p)
        };
        {
            let (u, _gu) = read_ptr(&inputs.u, stream);
            let (delta, _gd) = read_ptr(&inputs.delta, stream);
            let (a, _ga) = read_ptr(&inputs.a, stream);
            let (bm, _gb) = read_ptr(&inputs.bm, stream);
            let (cm, _gc) = read_ptr(&inputs.cm, stream);
            let dskip = inputs.dskip.as_ref().map(|x| read_ptr(x, stream));
            let z = inputs.z.as_ref().map(|x| read_ptr(x, stream));
            let bias = inputs.delta_bias.as_ref().map(|x| read_ptr(x, stream));
            let h0 = inputs.h0.as_ref().map(|x| read_ptr(x, stream));
            let (dy_p, _gdy) = read_ptr(dy, stream);
            let (du, _w1) = write_ptr(&mut g.du, stream);
            let (ddelta, _w2) = write_ptr(&mut g.ddelta, stream);
            let dz = g.dz.as_mut().map(|x| write_ptr(x, stream));
            let dh0 = g.dh0.as_mut().map(|x| write_ptr(x, stream));
            let (ck, _w3) = write_ptr(&mut checkpoints, stream);
            let (st, _w4) = write_ptr(&mut steps, stream);
            let (pb, _w5) = write_ptr(&mut dbm_part, stream);
            let (pc, _w6) = write_ptr(&mut dcm_part, stream);
            let (pa, _w7) = write_ptr(&mut da_part, stream);
            let (ps, _w8) = write_ptr(&mut dskip_part, stream);
            let (pd, _w9) = write_ptr(&mut dbias_part, stream);
            let (dskip_p, z_p, bias_p, h0_p, dz_p, dh0_p) = (
                optional(&dskip),
                optional(&z),
                optional(&bias),
                optional(&h0),
                optional(&dz),
                optional(&dh0),
            );
            let (bb, tt, dd, nn, sp) = (
                b as i64,
                t as i64,
                d as i64,
                n as i32,
                params.delta_softplus as i32,
            );
            let cfg = LaunchConfig {
                grid_dim: (grid_x, grid_y, 1),
                block_dim: (NK_SELECTIVE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match scan_selective_bwd_n*_* in kernels/selective_backward.cu;
            // inputs were validated above and every scratch buffer has the size the kernel
            // indexes (checkpoints chunks·B·D·N, steps 64·B·D·N, partials B·T·blocks·N, B·D·N,
            // B·D).
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&u)
                    .arg(&delta)
                    .arg(&a)
                    .arg(&bm)
                    .arg(&cm)
                    .arg(&dskip_p)
                    .arg(&z_p)
                    .arg(&bias_p)
                    .arg(&h0_p)
                    .arg(&dy_p)
                    .arg(&du)
                    .arg(&ddelta)
                    .arg(&dz_p)
                    .arg(&dh0_p)
                    .arg(&ck)
                    .arg(&st)
                    .arg(&pb)
                    .arg(&pc)
                    .arg(&pa)
                    .arg(&ps)
                    .arg(&pd)
                    .arg(&bb)
                    .arg(&tt)
                    .arg(&dd)
                    .arg(&nn)
                    .arg(&sp)
                    .launch(cfg)?;
            }
        }
        // fixed-order sums of the partials: dBm/dCm over channel blocks, the rest over batch
        let acc_suffix = if E::DTYPE == DType::F64 { "f64" } else { "f32" };
        sum_parts(
            device,
            stream,
            E::SUFFIX,
            &dbm_part,
            &mut g.dbm,
            b * t,
            blocks_d,
            n,
        )?;
        sum_parts(
            device,
            stream,
            E::SUFFIX,
            &dcm_part,
            &mut g.dcm,
            b * t,
            blocks_d,
            n,
        )?;
        sum_parts(device, stream, acc_suffix, &da_part, &mut g.da, 1, b, d * n)?;
        if let Some(out) = &mut g.ddskip {
            sum_parts(device, stream, acc_suffix, &dskip_part, out, 1, b, d)?;
        }
        if let Some(out) = &mut g.ddelta_bias {
            sum_parts(device, stream, acc_suffix, &dbias_part, out, 1, b, d)?;
        }
        Ok(g)
    }

    /// out[o, r] = Σ_p input[o, p, r] in order of p (kernel `scan_selective_sum_parts_*`).
    #[allow(clippy::too_many_arguments)]
    fn sum_parts<A, T>(
        device: &Device,
        stream: &Arc<CudaStream>,
        suffix: &str,
        input: &CudaSlice<A>,
        out: &mut CudaSlice<T>,
        outer: usize,
        parts: usize,
        inner: usize,
    ) -> Result<()> {
        let total = outer * inner;
        if total == 0 {
            return Ok(());
        }
        let f = device.function(
            "selective_backward",
            &format!("scan_selective_sum_parts_{suffix}"),
        )?;
        let blocks = crate::cuda::grid_x("u", "backward reduction blocks", total.div_ceil(256))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (i, _gi) = read_ptr(input, stream);
        let (o, _go) = write_ptr(out, stream);
        let (oo, pp, ii) = (outer as i64, parts as i64, inner as i64);
        // SAFETY: input holds outer·parts·inner accumulators and out outer·inner values of the
        // suffix's type (the callers pair them so).
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&i)
                .arg(&o)
                .arg(&oo)
                .arg(&pp)
                .arg(&ii)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Host in, host out on the device's default stream.
    pub fn selective_backward_host<E: CudaElement>(
        device: &Device,
        params: &SelectiveParams,
        shape: SelectiveShape,
        inputs: &SelectiveInputs<'_, E>,
        dy: &[E],
    ) -> Result<SelectiveGrads<E>> {
        let sizes = inputs.validate(&shape)?;
        let (b, t, d) = (shape.batch, shape.len, shape.channels);
        check_len("dy", dy.len(), sizes.seq, &format!("[{b}, {t}, {d}]"))?;
        let stream = device.stream();
        // empty tensors travel as one-element buffers (no zero-length device allocations)
        let up = |x: &[E]| -> Result<CudaSlice<E>> {
            if x.is_empty() {
                Ok(stream.alloc_zeros::<E>(1)?)
            } else {
                Ok(stream.clone_htod(x)?)
            }
        };
        let up_acc = |x: &[E::Acc]| -> Result<CudaSlice<E::Acc>> {
            if x.is_empty() {
                Ok(scratch::<E::Acc>(stream, 1)?)
            } else {
                Ok(stream.clone_htod(x)?)
            }
        };
        let (u, delta, a, bm, cm, dyd) = (
            up(inputs.u)?,
            up(inputs.delta)?,
            up_acc(inputs.a)?,
            up(inputs.bm)?,
            up(inputs.cm)?,
            up(dy)?,
        );
        let dskip = inputs.dskip.map(up_acc).transpose()?;
        let z = inputs.z.map(up).transpose()?;
        let bias = inputs.delta_bias.map(up_acc).transpose()?;
        let h0 = inputs.h0.map(up_acc).transpose()?;
        let device_inputs = DeviceInputs {
            u: u.slice(0..sizes.seq),
            delta: delta.slice(0..sizes.seq),
            a: a.slice(0..sizes.a),
            bm: bm.slice(0..sizes.bc),
            cm: cm.slice(0..sizes.bc),
            dskip: dskip.as_ref().map(|x| x.slice(0..d)),
            z: z.as_ref().map(|x| x.slice(0..sizes.seq)),
            delta_bias: bias.as_ref().map(|x| x.slice(0..d)),
            h0: h0.as_ref().map(|x| x.slice(0..sizes.states)),
        };
        let g = selective_backward(
            device,
            stream,
            params,
            shape,
            &device_inputs,
            &dyd.slice(0..sizes.seq),
        )?;
        let down = |x: &CudaSlice<E>, len: usize| -> Result<Vec<E>> {
            Ok(stream.clone_dtoh(&x.slice(0..len))?)
        };
        let down_acc = |x: &CudaSlice<E::Acc>, len: usize| -> Result<Vec<E::Acc>> {
            Ok(stream.clone_dtoh(&x.slice(0..len))?)
        };
        Ok(SelectiveGrads {
            du: down(&g.du, sizes.seq)?,
            ddelta: down(&g.ddelta, sizes.seq)?,
            da: down_acc(&g.da, sizes.a)?,
            dbm: down(&g.dbm, sizes.bc)?,
            dcm: down(&g.dcm, sizes.bc)?,
            ddskip: g.ddskip.as_ref().map(|x| down_acc(x, d)).transpose()?,
            dz: g.dz.as_ref().map(|x| down(x, sizes.seq)).transpose()?,
            ddelta_bias: g.ddelta_bias.as_ref().map(|x| down_acc(x, d)).transpose()?,
            dh0: g
                .dh0
                .as_ref()
                .map(|x| down_acc(x, sizes.states))
                .transpose()?,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::forward_chunking;

        #[test]
        fn forward_chunks_cover_the_sequence_exactly() {
            for (b, t, d) in [
                (1, 1, 1),
                (2, 2048, 1536),
                (2, 150, 70),
                (1, 1000, 5),
                (1, 65_536, 1),
                (64, 4096, 4096),
                (1, 10_000_000, 1),
            ] {
                let (chunks, len) = forward_chunking(b, t, d);
                assert!((1..=65_535).contains(&chunks), "{b} {t} {d}");
                assert!(chunks * len >= t && (chunks - 1) * len < t, "{b} {t} {d}");
            }
            // B2 T2048 D1536 (3072 channels): time gives the parallelism
            assert_eq!(forward_chunking(2, 2048, 1536), (32, 64));
            // enough channels: one pass
            assert_eq!(forward_chunking(64, 4096, 4096).0, 1);
        }
    }
}
