//! `scan.selective`: the fused selective scan of Mamba-1, on the CPU.
//!
//! Per (batch, channel d, state n): dt = delta (+ delta_bias, then softplus if asked);
//! x[t] = exp(dt·A[d,n])·x[t-1] + dt·Bm[t,n]·u[t]; y[t] = Σ_n Cm[t,n]·x[t,d,n] + Dskip·u[t];
//! y *= silu(z) where z is given. Discretization, scan, contraction, skip and gate run in one
//! pass; the [B, T, D, N] states are never stored.
//!
//! Kernel plan: tasks are (batch, block of channels); a task keeps its block's states
//! `x[n][d]` and `A` transposed to `[n][d]` in small buffers, so the vectors run across
//! channels (contiguous in u, delta, y) and Bm[t,n], Cm[t,n] are broadcast. The bound is the
//! B·T·D·N exponentials (a vectorized exp), not memory. Each (batch, channel) is computed by
//! one task in time order: deterministic whatever the thread count.

use crate::cpu::{Isa, SendPtr, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result};
use crate::scan::check_len;
use rayon::prelude::*;

/// Channels per task: 1 KiB row segments of u, delta, z and y per step keep the strided rows
/// streaming (64 → 256 channels measured 64 → 52 ms at the bench size); with 16 states the
/// block's state and A take 32 KiB.
const CHANNEL_BLOCK: usize = 256;

/// Parameters of `scan.selective`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelectiveParams {
    /// dt = softplus(delta + delta_bias) instead of delta + delta_bias.
    pub delta_softplus: bool,
}

impl SelectiveParams {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn delta_softplus(mut self, on: bool) -> Self {
        self.delta_softplus = on;
        self
    }
}

/// `[B, T, D]` sequences with an `N`-dimensional state per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelectiveShape {
    pub batch: usize,
    pub len: usize,
    pub channels: usize,
    pub state: usize,
}

impl SelectiveShape {
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
    pub u: &'a [E],
    pub delta: &'a [E],
    /// `[D, N]`
    pub a: &'a [E::Acc],
    /// `[B, T, N]`
    pub bm: &'a [E],
    /// `[B, T, N]`
    pub cm: &'a [E],
    /// `[D]`
    pub dskip: Option<&'a [E::Acc]>,
    /// `[B, T, D]`
    pub z: Option<&'a [E]>,
    /// `[D]`
    pub delta_bias: Option<&'a [E::Acc]>,
    /// `[B, D, N]`
    pub h0: Option<&'a [E::Acc]>,
}

impl<E: Element> SelectiveInputs<'_, E> {
    fn validate(&self, shape: &SelectiveShape) -> Result<Sizes> {
        let sizes = shape.sizes()?;
        let SelectiveShape {
            batch: b,
            len: t,
            channels: d,
            state: n,
        } = *shape;
        let seq = format!("[{b}, {t}, {d}]");
        check_len("u", self.u.len(), sizes.seq, &seq)?;
        check_len("delta", self.delta.len(), sizes.seq, &seq)?;
        check_len("A", self.a.len(), sizes.a, &format!("[{d}, {n}]"))?;
        check_len("Bm", self.bm.len(), sizes.bc, &format!("[{b}, {t}, {n}]"))?;
        check_len("Cm", self.cm.len(), sizes.bc, &format!("[{b}, {t}, {n}]"))?;
        if let Some(x) = self.dskip {
            check_len("Dskip", x.len(), d, &format!("[{d}]"))?;
        }
        if let Some(x) = self.z {
            check_len("z", x.len(), sizes.seq, &seq)?;
        }
        if let Some(x) = self.delta_bias {
            check_len("delta_bias", x.len(), d, &format!("[{d}]"))?;
        }
        if let Some(x) = self.h0 {
            check_len("h0", x.len(), sizes.states, &format!("[{b}, {d}, {n}]"))?;
        }
        Ok(sizes)
    }
}

/// `scan.selective` on the CPU: writes `y [B, T, D]` and `h_last [B, D, N]` (the state after
/// the last step).
pub fn selective<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    y: &mut [E],
    h_last: &mut [E::Acc],
) -> Result<()> {
    selective_on(Isa::active(), params, shape, inputs, y, h_last)
}

/// [`selective`] on a chosen instruction set.
pub fn selective_on<E: Element>(
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
    let (yp, hp) = (SendPtr(y.as_mut_ptr()), SendPtr(h_last.as_mut_ptr()));
    let tasks: Vec<(usize, usize)> = (0..b)
        .flat_map(|bi| (0..d).step_by(CHANNEL_BLOCK).map(move |d0| (bi, d0)))
        .collect();
    tasks.into_par_iter().for_each(|(bi, d0)| {
        let w = CHANNEL_BLOCK.min(d - d0);
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

/// Allocating convenience: returns `(y, h_last)`.
pub fn selective_alloc<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
) -> Result<(Vec<E>, Vec<E::Acc>)> {
    let sizes = inputs.validate(&shape)?;
    let mut y = vec![E::default(); sizes.seq];
    let mut h_last = vec![<E::Acc as Accum>::ZERO; sizes.states];
    selective(params, shape, inputs, &mut y, &mut h_last)?;
    Ok((y, h_last))
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
#[inline(always)]
unsafe fn vsoftplus<S: Simd, A: Accum>(x: A::V<S>) -> A::V<S> {
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

/// Vector silu(z) = z / (1 + e^-z).
#[inline(always)]
unsafe fn vsilu<S: Simd, A: Accum>(z: A::V<S>) -> A::V<S> {
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
        // A and the states of this block, transposed to [n][channel]
        let mut a_t = vec![zero; n * w];
        let mut x = vec![zero; n * w];
        for c in 0..w {
            for j in 0..n {
                a_t[j * w + c] = inputs.a[(d0 + c) * n + j];
                if let Some(h0) = inputs.h0 {
                    x[j * w + c] = h0[(bi * d + d0 + c) * n + j];
                }
            }
        }
        let (mut dt, mut dtu, mut acc) = (vec![zero; w], vec![zero; w], vec![zero; w]);
        let (mut bm, mut cm) = (vec![zero; n], vec![zero; n]);
        for t in 0..t_len {
            let row = (bi * t_len + t) * d + d0;
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
            // SAFETY: c + lanes <= w, and every buffer holds n·w or w values.
            unsafe {
                while c + lanes <= w {
                    let dtv = E::Acc::vload::<S>(dt.as_ptr().add(c));
                    let dtuv = E::Acc::vload::<S>(dtu.as_ptr().add(c));
                    let mut yv = E::Acc::vsplat::<S>(zero);
                    for j in 0..n {
                        let at = j * w + c;
                        let decay = E::Acc::vexp::<S>(E::Acc::vmul::<S>(
                            dtv,
                            E::Acc::vload::<S>(a_t.as_ptr().add(at)),
                        ));
                        let input = E::Acc::vmul::<S>(dtuv, E::Acc::vsplat::<S>(bm[j]));
                        let xv =
                            E::Acc::vfma::<S>(decay, E::Acc::vload::<S>(x.as_ptr().add(at)), input);
                        E::Acc::vstore::<S>(x.as_mut_ptr().add(at), xv);
                        yv = E::Acc::vfma::<S>(E::Acc::vsplat::<S>(cm[j]), xv, yv);
                    }
                    E::Acc::vstore::<S>(acc.as_mut_ptr().add(c), yv);
                    c += lanes;
                }
            }
            while c < w {
                let mut yc = zero;
                for j in 0..n {
                    let at = j * w + c;
                    x[at] = (dt[c] * a_t[at]).exp() * x[at] + dtu[c] * bm[j];
                    yc = yc + cm[j] * x[at];
                }
                acc[c] = yc;
                c += 1;
            }
            // y = Σ_n C·x + Dskip·u, gated by silu(z)
            let mut c = 0;
            if vector_prologue {
                // SAFETY: as the prologue; y rows of this task only (see selective_on).
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
                // SAFETY: this task's own slice of y (see selective_on).
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
