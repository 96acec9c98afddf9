//! Linear-recurrence scans on candle tensors, differentiable in every input:
//! [`linear`] (`h[t] = a[t]·h[t-1] + b[t]`), [`linear_complex`] (the same over complex
//! numbers), [`selective`] (Mamba) and [`gla`] (gated linear attention);
//! [`selective_with_state`] and [`gla_with_state`] also return the final state, to carry
//! into the next segment (its gradient is not propagated: truncated BPTT).
//!
//! **Complex layout.** candle has no complex dtype: a complex tensor is a real tensor with a
//! trailing axis of 2 holding (real, imaginary), interleaved: `a`, `b`, `h` are
//! `[B, T, D, 2]` and `h0` is `[B, D, 2]`. The gradient of a complex input follows PyTorch's
//! convention for a real loss L: `dL/dRe(z) + i·dL/dIm(z)` in the same layout, which is what
//! candle's autograd propagates through real ops on the two halves.
//!
//! Multi-input ops ([`selective`], [`gla`]) hand their inputs to one candle custom op as a
//! single flat tensor (`Tensor::cat` of the flattened inputs, one per dtype), so candle's
//! autograd splits the op's packed gradient back onto each input; the copy is one pass over
//! the inputs.
//!
//! ```
//! use neurokernels::candle::scan::{self, ScanParams};
//! use neurokernels::candle::candle_core::{Device, Tensor, Var};
//!
//! let dev = Device::Cpu;
//! let a = Var::from_tensor(&Tensor::full(0.5f32, (1, 4, 2), &dev)?)?; // [B, T, D]
//! let b = Var::from_tensor(&Tensor::ones((1, 4, 2), candle_core::DType::F32, &dev)?)?;
//! let h = scan::linear(&ScanParams::new(), &a, &b, None)?;
//! assert_eq!(h.to_vec3::<f32>()?[0][3], [1.875; 2]); // 1, 1.5, 1.75, 1.875
//! let grads = h.sum_all()?.backward()?;
//! assert_eq!(grads.get(&b).unwrap().to_vec3::<f32>()?[0][0], [1.875; 2]);
//! # use neurokernels::candle::candle_core;
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::{CandleElement, check_float, check_like, cpu_slice, host_vec, with_dtype, wrap};
use crate::scan::{self as flat, ScanShape};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use std::sync::{Arc, Mutex};

#[doc(no_inline)]
pub use crate::scan::ScanParams;

/// `scan.linear` or `scan.linear_complex` on (a, b, h0) as a candle op.
struct LinearOp {
    params: ScanParams,
    complex: bool,
}

impl LinearOp {
    fn op(&self) -> &'static str {
        if self.complex {
            "scan.linear_complex"
        } else {
            "scan.linear"
        }
    }

    fn shape(&self, dims: &[usize]) -> candle_core::Result<ScanShape> {
        if self.complex {
            ScanShape::from_complex_dims("a", dims).map_err(wrap)
        } else {
            ScanShape::from_dims("a", dims).map_err(wrap)
        }
    }

    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.op();
        let shape = self.shape(l1.dims())?;
        if l2.dims() != l1.dims() {
            candle_core::bail!(
                "neurokernels {op}: tensor `b` has shape {:?}, expected {:?} (the shape of `a`)",
                l2.dims(),
                l1.dims()
            );
        }
        let a = cpu_slice::<E>(op, "a", s1, l1)?;
        let b = cpu_slice::<E>(op, "b", s2, l2)?;
        let h0 = cpu_slice::<E>(op, "h0", s3, l3)?;
        let h = if self.complex {
            flat::linear_complex(&self.params, shape, a, b, Some(h0))
        } else {
            flat::linear(&self.params, shape, a, b, Some(h0))
        }
        .map_err(wrap)?;
        Ok((E::to_cpu_storage_owned(h), l1.shape().clone()))
    }

    fn bwd_typed<E: CandleElement>(
        &self,
        a: &Tensor,
        h0: &Tensor,
        h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let shape = self.shape(a.dims())?;
        let (ah, h0h, hh) = (host_vec::<E>(a)?, host_vec::<E>(h0)?, host_vec::<E>(h)?);
        let dhh = host_vec::<E>(&dh.to_dtype(a.dtype())?)?;
        let g = if self.complex {
            flat::linear_complex_backward(&self.params, shape, &ah, &hh, &dhh, Some(&h0h))
        } else {
            flat::linear_backward(&self.params, shape, &ah, &hh, &dhh, Some(&h0h))
        }
        .map_err(wrap)?;
        Ok((
            Tensor::from_vec(g.da, a.shape(), a.device())?,
            Tensor::from_vec(g.db, a.shape(), a.device())?,
            Tensor::from_vec(g.dh0, h0.shape(), h0.device())?,
        ))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        if self.complex {
            "neurokernels-scan-linear-complex"
        } else {
            "neurokernels-scan-linear"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_dtype!(self.op(), s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        h0: &Tensor,
        h: &Tensor,
        dh: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db, dh0) =
            with_dtype!(self.op(), a.dtype(), T => self.bwd_typed::<T>(a, h0, h, dh))?;
        Ok((Some(da), Some(db), Some(dh0)))
    }
}

fn run_linear(
    params: &ScanParams,
    complex: bool,
    a: &Tensor,
    b: &Tensor,
    h0: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = LinearOp {
        params: *params,
        complex,
    };
    let name = op.op();
    check_float(name, "a", a)?;
    check_like(name, "b", b, a.dtype(), a.device(), "a")?;
    let shape = op.shape(a.dims())?;
    let state: Vec<usize> = if complex {
        vec![shape.batch, shape.channels, 2]
    } else {
        vec![shape.batch, shape.channels]
    };
    let h0 = match h0 {
        Some(h0) => {
            check_like(name, "h0", h0, a.dtype(), a.device(), "a")?;
            if h0.dims() != state.as_slice() {
                candle_core::bail!(
                    "neurokernels {name}: tensor `h0` has shape {:?}, expected {state:?}",
                    h0.dims()
                );
            }
            h0.contiguous()?
        }
        None => Tensor::zeros(state, a.dtype(), a.device())?,
    };
    a.contiguous()?.apply_op3(&b.contiguous()?, &h0, op)
}

/// `scan.linear`: `h[t] = a[t]·h[t-1] + b[t]` elementwise over channels (from t = T−1 down
/// with `params.reverse`). `a`, `b` and the returned `h` are `[B, T, D]`; `h0 [B, D]` is the
/// state before the first step (zeros when `None`). Differentiable in a, b and h0.
pub fn linear(
    params: &ScanParams,
    a: &Tensor,
    b: &Tensor,
    h0: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    run_linear(params, false, a, b, h0)
}

/// `scan.linear_complex`: [`linear`] over complex numbers, in the interleaved layout of the
/// module docs: `a`, `b`, `h` `[B, T, D, 2]`, `h0 [B, D, 2]`. Differentiable in a, b and h0.
pub fn linear_complex(
    params: &ScanParams,
    a: &Tensor,
    b: &Tensor,
    h0: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    run_linear(params, true, a, b, h0)
}

// ------------------------------------------------------------------ packed multi-input ops

/// The inputs flattened and concatenated into one 1-D tensor (differentiable: candle's `cat`
/// backward splits the gradient back).
fn pack(parts: &[&Tensor]) -> candle_core::Result<Tensor> {
    let flat = parts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&flat, 0)
}

/// `data` cut into consecutive pieces of `sizes` (checked against its length).
fn split<'a, T>(op: &str, data: &'a [T], sizes: &[usize]) -> candle_core::Result<Vec<&'a [T]>> {
    if sizes.iter().sum::<usize>() != data.len() {
        candle_core::bail!(
            "neurokernels {op}: packed inputs of {} elements, expected {sizes:?}",
            data.len()
        );
    }
    let mut rest = data;
    let mut out = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    Ok(out)
}

/// Checks `t`'s dtype, device and dims.
fn check_input(
    op: &str,
    name: &str,
    t: &Tensor,
    like: &Tensor,
    like_name: &str,
    dims: &[usize],
    acc: bool,
) -> candle_core::Result<()> {
    let dtype = if acc {
        super::acc_dtype(like.dtype())
    } else {
        like.dtype()
    };
    check_like(op, name, t, dtype, like.device(), like_name)?;
    if t.dims() != dims {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` has shape {:?}, expected {dims:?}",
            t.dims()
        );
    }
    Ok(())
}

use crate::scan::gla::{self as flat_gla, GlaInputs, GlaShape};
pub use crate::scan::gla::{GlaForm, GlaParams};

const GLA: &str = "scan.gla";

/// The final state of a forward, kept by the op for the `*_with_state` functions.
type StateSlot = Arc<Mutex<Option<Tensor>>>;

/// Keeps `h_last` (accumulator type, `dims`) in `slot`.
fn keep_state<A: WithDType>(
    slot: &StateSlot,
    h_last: Vec<A>,
    dims: &[usize],
) -> candle_core::Result<()> {
    let t = Tensor::from_vec(h_last, dims, &candle_core::Device::Cpu)?;
    *slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("neurokernels: state lock poisoned".into()))? =
        Some(t);
    Ok(())
}

/// The state a forward kept, or an error naming the op.
fn take_state(op: &str, slot: &StateSlot) -> candle_core::Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("neurokernels: state lock poisoned".into()))?
        .take()
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("neurokernels {op}: the forward kept no state"))
        })
}

/// `scan.gla` on (packed q, k, v, g; h0).
struct GlaOp {
    params: GlaParams,
    shape: GlaShape,
    /// Where the forward leaves h_last.
    state: StateSlot,
}

impl GlaOp {
    fn sizes(&self) -> [usize; 4] {
        let s = &self.shape;
        let qk = s.batch * s.len * s.heads * s.key_dim;
        [qk, qk, s.batch * s.len * s.heads * s.value_dim, qk]
    }

    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let packed = cpu_slice::<E>(GLA, "q, k, v, g", s1, l1)?;
        let p = split(GLA, packed, &self.sizes())?;
        let h0 = cpu_slice::<E::Acc>(GLA, "h0", s2, l2)?;
        let inputs = GlaInputs {
            q: p[0],
            k: p[1],
            v: p[2],
            g: p[3],
            h0: Some(h0),
        };
        let out = flat_gla::gla(&self.params, self.shape, &inputs).map_err(wrap)?;
        let s = &self.shape;
        keep_state(
            &self.state,
            out.h_last,
            &[s.batch, s.heads, s.key_dim, s.value_dim],
        )?;
        Ok((
            E::to_cpu_storage_owned(out.o),
            Shape::from((s.batch, s.len, s.heads, s.value_dim)),
        ))
    }

    fn bwd_typed<E: CandleElement>(
        &self,
        packed: &Tensor,
        h0: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let data = host_vec::<E>(packed)?;
        let p = split(GLA, &data, &self.sizes())?;
        let h0h = host_vec::<E::Acc>(h0)?;
        let doh = host_vec::<E>(&d_o.to_dtype(packed.dtype())?)?;
        let inputs = GlaInputs {
            q: p[0],
            k: p[1],
            v: p[2],
            g: p[3],
            h0: Some(&h0h),
        };
        let g =
            flat_gla::gla_backward(&self.params, self.shape, &inputs, &doh, None).map_err(wrap)?;
        let mut grads = g.dq;
        grads.extend_from_slice(&g.dk);
        grads.extend_from_slice(&g.dv);
        grads.extend_from_slice(&g.dg);
        let dh0 = match g.dh0 {
            Some(d) => d,
            None => candle_core::bail!("neurokernels {GLA}: the backward gave no dh0"),
        };
        Ok((
            Tensor::from_vec(grads, packed.shape(), packed.device())?,
            Tensor::from_vec(dh0, h0.shape(), h0.device())?,
        ))
    }
}

impl CustomOp2 for GlaOp {
    fn name(&self) -> &'static str {
        "neurokernels-scan-gla"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_dtype!(GLA, s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        packed: &Tensor,
        h0: &Tensor,
        _o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dp, dh0) =
            with_dtype!(GLA, packed.dtype(), T => self.bwd_typed::<T>(packed, h0, d_o))?;
        Ok((Some(dp), Some(dh0)))
    }
}

/// `scan.gla`, gated linear attention: per head, the state `S[t] = diag(exp(g[t]))·S[t−1] +
/// k[t]ᵀv[t]` (`S [K, V]`, from `h0`, zeros when `None`) and `o[t] = scale·q[t]·S[t]`.
/// `q`, `k` and the log-gates `g` are `[B, T, H, K]`, `v` `[B, T, H, V]`, all one dtype;
/// `h0 [B, H, K, V]` is in the accumulator dtype (f32; f64 for f64). Returns
/// `o [B, T, H, V]`, differentiable in q, k, v, g and h0.
pub fn gla(
    params: &GlaParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    Ok(gla_with_state(params, q, k, v, g, h0)?.0)
}

/// [`gla`] that also returns the final state `h_last [B, H, K, V]` (accumulator dtype), to
/// carry into the next segment as its `h0` (streaming, truncated backpropagation through
/// time). `o` is differentiable as in [`gla`]; `h_last` is a constant to candle (no gradient
/// flows back through it: detach semantics, as truncated BPTT uses).
pub fn gla_with_state(
    params: &GlaParams,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h0: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor)> {
    check_float(GLA, "q", q)?;
    let shape = GlaShape::from_dims(q.dims(), v.dims()).map_err(wrap)?;
    check_input(GLA, "k", k, q, "q", q.dims(), false)?;
    check_input(GLA, "g", g, q, "q", q.dims(), false)?;
    check_input(GLA, "v", v, q, "q", v.dims(), false)?;
    let state = [shape.batch, shape.heads, shape.key_dim, shape.value_dim];
    let h0 = match h0 {
        Some(h0) => {
            check_input(GLA, "h0", h0, q, "q", &state, true)?;
            h0.contiguous()?
        }
        None => Tensor::zeros(&state, super::acc_dtype(q.dtype()), q.device())?,
    };
    let packed = pack(&[q, k, v, g])?;
    let slot = StateSlot::default();
    let o = packed.apply_op2(
        &h0,
        GlaOp {
            params: *params,
            shape,
            state: slot.clone(),
        },
    )?;
    Ok((o, take_state(GLA, &slot)?.to_device(q.device())?))
}

pub use crate::scan::selective::SelectiveParams;
use crate::scan::selective::{self as flat_sel, SelectiveInputs, SelectiveShape};

const SEL: &str = "scan.selective";

/// The inputs of [`selective`] (Mamba's selective scan), as
/// [`crate::scan::selective::SelectiveInputs`]: sequences in one dtype, parameters in its
/// accumulator dtype (f32; f64 for f64 sequences). Every input is differentiable.
#[derive(Clone, Copy, Debug)]
pub struct SelectiveArgs<'a> {
    /// `[B, T, D]`: the input sequence.
    pub u: &'a Tensor,
    /// `[B, T, D]`: the step sizes before `delta_bias` and softplus.
    pub delta: &'a Tensor,
    /// `[D, N]`, accumulator dtype: the state matrix A (decay `exp(dt·A)`).
    pub a: &'a Tensor,
    /// `[B, T, N]`: the input projection Bm.
    pub bm: &'a Tensor,
    /// `[B, T, N]`: the output projection Cm.
    pub cm: &'a Tensor,
    /// `[D]`, accumulator dtype: the skip weight, `y += Dskip·u` (default none).
    pub dskip: Option<&'a Tensor>,
    /// `[B, T, D]`: the gate, `y ·= silu(z)` (default none).
    pub z: Option<&'a Tensor>,
    /// `[D]`, accumulator dtype: added to delta before the softplus (default none).
    pub delta_bias: Option<&'a Tensor>,
    /// `[B, D, N]`, accumulator dtype: the state before the first step (default none = zeros).
    pub h0: Option<&'a Tensor>,
}

impl<'a> SelectiveArgs<'a> {
    /// The required inputs; the optional ones default to none.
    pub fn new(
        u: &'a Tensor,
        delta: &'a Tensor,
        a: &'a Tensor,
        bm: &'a Tensor,
        cm: &'a Tensor,
    ) -> Self {
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
}

/// `scan.selective` on (packed u, delta, bm, cm, z?; packed a, dskip?, delta_bias?, h0?).
struct SelectiveOp {
    params: SelectiveParams,
    shape: SelectiveShape,
    /// Which optional inputs are packed: z, dskip, delta_bias, h0.
    has: [bool; 4],
    /// Where the forward leaves h_last.
    state: StateSlot,
}

impl SelectiveOp {
    fn seq_sizes(&self) -> Vec<usize> {
        let s = &self.shape;
        let (seq, proj) = (s.batch * s.len * s.channels, s.batch * s.len * s.state);
        let mut v = vec![seq, seq, proj, proj];
        if self.has[0] {
            v.push(seq);
        }
        v
    }

    fn acc_sizes(&self) -> Vec<usize> {
        let s = &self.shape;
        let mut v = vec![s.channels * s.state];
        for (on, n) in
            self.has[1..]
                .iter()
                .zip([s.channels, s.channels, s.batch * s.channels * s.state])
        {
            if *on {
                v.push(n);
            }
        }
        v
    }

    /// Runs `f` on the slice API's inputs cut from the two packed buffers.
    fn with_inputs<E: CandleElement, R>(
        &self,
        seq: &[E],
        acc: &[E::Acc],
        f: impl FnOnce(&SelectiveInputs<'_, E>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let s = split(SEL, seq, &self.seq_sizes())?;
        let a = split(SEL, acc, &self.acc_sizes())?;
        let mut next = 1;
        let mut opt = |on: bool| {
            on.then(|| {
                next += 1;
                a[next - 1]
            })
        };
        let dskip = opt(self.has[1]);
        let delta_bias = opt(self.has[2]);
        let h0 = opt(self.has[3]);
        let inputs = SelectiveInputs::new(s[0], s[1], a[0], s[2], s[3])
            .z(self.has[0].then(|| s[4]))
            .dskip(dskip)
            .delta_bias(delta_bias)
            .h0(h0);
        f(&inputs)
    }

    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let seq = cpu_slice::<E>(SEL, "u, delta, bm, cm, z", s1, l1)?;
        let acc = cpu_slice::<E::Acc>(SEL, "a, dskip, delta_bias, h0", s2, l2)?;
        let out = self.with_inputs(seq, acc, |inputs| {
            flat_sel::selective(&self.params, self.shape, inputs).map_err(wrap)
        })?;
        let s = &self.shape;
        keep_state(&self.state, out.h_last, &[s.batch, s.channels, s.state])?;
        Ok((
            E::to_cpu_storage_owned(out.y),
            Shape::from((s.batch, s.len, s.channels)),
        ))
    }

    fn bwd_typed<E: CandleElement>(
        &self,
        seq: &Tensor,
        acc: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (sh, ah) = (host_vec::<E>(seq)?, host_vec::<E::Acc>(acc)?);
        let dyh = host_vec::<E>(&dy.to_dtype(seq.dtype())?)?;
        let g = self.with_inputs(&sh, &ah, |inputs| {
            flat_sel::selective_backward(&self.params, self.shape, inputs, &dyh).map_err(wrap)
        })?;
        let missing =
            || candle_core::Error::Msg(format!("neurokernels {SEL}: a gradient is missing"));
        let mut dseq = g.du;
        for part in [g.ddelta, g.dbm, g.dcm] {
            dseq.extend_from_slice(&part);
        }
        if self.has[0] {
            dseq.extend_from_slice(&g.dz.ok_or_else(missing)?);
        }
        let mut dacc = g.da;
        for (on, part) in self.has[1..].iter().zip([g.ddskip, g.ddelta_bias, g.dh0]) {
            if *on {
                dacc.extend_from_slice(&part.ok_or_else(missing)?);
            }
        }
        Ok((
            Tensor::from_vec(dseq, seq.shape(), seq.device())?,
            Tensor::from_vec(dacc, acc.shape(), acc.device())?,
        ))
    }
}

impl CustomOp2 for SelectiveOp {
    fn name(&self) -> &'static str {
        "neurokernels-scan-selective"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_dtype!(SEL, s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        seq: &Tensor,
        acc: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (ds, da) = with_dtype!(SEL, seq.dtype(), T => self.bwd_typed::<T>(seq, acc, dy))?;
        Ok((Some(ds), Some(da)))
    }
}

/// `scan.selective`, Mamba's selective scan: per channel d and state n,
/// `h[t] = exp(dt[t]·A[d, n])·h[t−1] + dt[t]·Bm[t, n]·u[t]` with
/// `dt = softplus(delta + delta_bias)` (`params.delta_softplus`, else without softplus),
/// `y[t] = Σ_n Cm[t, n]·h[t] (+ Dskip·u[t]) (·silu(z[t]))`. Shapes in [`SelectiveArgs`].
/// Returns `y [B, T, D]` in the sequences' dtype, differentiable in every input given.
pub fn selective(
    params: &SelectiveParams,
    args: &SelectiveArgs<'_>,
) -> candle_core::Result<Tensor> {
    Ok(selective_with_state(params, args)?.0)
}

/// [`selective`] that also returns the final state `h_last [B, D, N]` (accumulator dtype),
/// to carry into the next segment as its `h0` (streaming inference, truncated BPTT). `y` is
/// differentiable as in [`selective`]; `h_last` is a constant to candle (no gradient flows
/// back through it, as in Mamba's own selective scan).
pub fn selective_with_state(
    params: &SelectiveParams,
    args: &SelectiveArgs<'_>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let u = args.u;
    check_float(SEL, "u", u)?;
    let shape = SelectiveShape::from_dims(u.dims(), args.a.dims()).map_err(wrap)?;
    let (b, t, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
    check_input(SEL, "delta", args.delta, u, "u", &[b, t, d], false)?;
    check_input(SEL, "a", args.a, u, "u", &[d, n], true)?;
    check_input(SEL, "bm", args.bm, u, "u", &[b, t, n], false)?;
    check_input(SEL, "cm", args.cm, u, "u", &[b, t, n], false)?;
    let mut seq = vec![u, args.delta, args.bm, args.cm];
    if let Some(z) = args.z {
        check_input(SEL, "z", z, u, "u", &[b, t, d], false)?;
        seq.push(z);
    }
    let mut acc = vec![args.a];
    for (name, t, dims) in [
        ("dskip", args.dskip, vec![d]),
        ("delta_bias", args.delta_bias, vec![d]),
        ("h0", args.h0, vec![b, d, n]),
    ] {
        if let Some(t) = t {
            check_input(SEL, name, t, u, "u", &dims, true)?;
            acc.push(t);
        }
    }
    let op = SelectiveOp {
        params: *params,
        shape,
        has: [
            args.z.is_some(),
            args.dskip.is_some(),
            args.delta_bias.is_some(),
            args.h0.is_some(),
        ],
        state: StateSlot::default(),
    };
    let slot = op.state.clone();
    let y = pack(&seq)?.apply_op2(&pack(&acc)?, op)?;
    Ok((y, take_state(SEL, &slot)?.to_device(u.device())?))
}
