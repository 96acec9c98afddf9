//! Fused attention on candle tensors: [`crate::attention`]'s forward as a `CustomOp3` on
//! (q, k, v) whose backward gives dq, dk, dv, `top_keys`, and [`decode`] on a [`KvCache`]
//! (token-by-token generation).
//!
//! Layouts (the slice API's, heads third): `q [B, Sq, Hq, D]`, `k [B, Sk, Hk, D]`,
//! `v [B, Sk, Hk, Dv]`, `o [B, Sq, Hq, Dv]`, `lse [B, Hq, Sq]`; query head h reads KV head
//! `h / (Hq / Hk)` (GQA/MQA). `alibi_slopes [Hq]` and `bias [Bb, Hb, Sq, Sk]` (Bb in {1, B},
//! Hb in {1, Hq}) enter the kernels in the accumulator type (f32; f64 for f64 inputs); when
//! candle tracks them (a `Var`, or computed from one) they get gradients from the scores'
//! gradient dS = P∘(dP − rowsum(P∘dP)), formed densely in the backward (not with packed
//! sequences, where they stay constants). Packed variable-length sequences take B = 1 and integer cumulative lengths
//! `[N+1]` (any integer dtype; see [`crate::attention`]). Masks, softcap, scale and the order
//! in which they apply are [`AttentionParams`]'.
//!
//! ```
//! use neurokernels::candle::attention::{self, AttentionInputs, AttentionParams};
//! use neurokernels::candle::candle_core::{Device, Tensor, Var};
//!
//! let dev = Device::Cpu;
//! let q = Var::randn(0f32, 1., (1, 8, 4, 16), &dev)?; // [B, Sq, Hq, D]
//! let k = Tensor::randn(0f32, 1., (1, 8, 2, 16), &dev)?; // [B, Sk, Hk, D]: GQA, 2 KV heads
//! let v = Tensor::randn(0f32, 1., (1, 8, 2, 16), &dev)?;
//! let params = AttentionParams::new().causal(true);
//! let o = attention::forward(&params, &AttentionInputs::new(&q, &k, &v))?;
//! let grads = o.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&q).unwrap().dims(), &[1, 8, 4, 16]);
//! # Ok::<(), neurokernels::candle::candle_core::Error>(())
//! ```

use super::{
    CandleElement, acc_dtype, check_cpu, check_device, check_float, check_like, cpu_slice,
    host_vec, with_dtype, wrap,
};
use crate::attention::{self as flat, AttentionShape, Bias};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::any::Any;
use std::sync::{Arc, Mutex};

#[doc(no_inline)]
pub use crate::attention::{AttentionParams, BackwardTasks, SplitKv};

const OP: &str = "attention";

/// Packed variable-length sequences (B = 1): sequence n holds query rows `q[n]..q[n+1]` and
/// key rows `k[n]..k[n+1]`, as [`crate::attention::CuSeqlens`]. Any integer dtype; values
/// must fit in i32.
#[derive(Clone, Copy, Debug)]
pub struct CuSeqlens<'a> {
    /// `[N+1]`: cumulative query lengths, from 0, non-decreasing, ending at Sq.
    pub q: &'a Tensor,
    /// `[N+1]`: cumulative key lengths, from 0, non-decreasing, ending at Sk.
    pub k: &'a Tensor,
}

/// The inputs of the attention functions; `v` is ignored by [`top_keys`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs<'a> {
    /// `[B, Sq, Hq, D]`: the queries (differentiable).
    pub q: &'a Tensor,
    /// `[B, Sk, Hk, D]`: the keys (differentiable), dtype and device of `q`.
    pub k: &'a Tensor,
    /// `[B, Sk, Hk, Dv]`: the values (differentiable), dtype and device of `q`.
    pub v: &'a Tensor,
    /// `[Hq]`: ALiBi slopes, `s -= slope[h]·|i + Sk − Sq − j|` (default none). Gets a
    /// gradient when candle tracks it (a `Var`, or computed from one), except with packed
    /// sequences.
    pub alibi_slopes: Option<&'a Tensor>,
    /// `[Bb, Hb, Sq, Sk]`: additive score bias, Bb in {1, B}, Hb in {1, Hq} (default none).
    /// Gets a gradient (dense, [B, Hq, Sq, Sk] of work memory) when candle tracks it, except
    /// with packed sequences.
    pub bias: Option<&'a Tensor>,
    /// Packed variable-length sequences, with B = 1 (default none).
    pub cu_seqlens: Option<CuSeqlens<'a>>,
}

impl<'a> AttentionInputs<'a> {
    /// q, k, v without optional inputs.
    pub fn new(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> Self {
        Self {
            q,
            k,
            v,
            alibi_slopes: None,
            bias: None,
            cu_seqlens: None,
        }
    }

    /// Sets the ALiBi slopes `[Hq]` (default none).
    pub fn alibi_slopes(mut self, slopes: Option<&'a Tensor>) -> Self {
        self.alibi_slopes = slopes;
        self
    }

    /// Sets the additive bias `[Bb, Hb, Sq, Sk]` (default none).
    pub fn bias(mut self, bias: Option<&'a Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the packed sequences' cumulative lengths (default none; requires B = 1).
    pub fn cu_seqlens(mut self, cu: Option<CuSeqlens<'a>>) -> Self {
        self.cu_seqlens = cu;
        self
    }

    /// Checks dtypes and devices (`v` only `with_v`) and prepares the constant inputs.
    fn prepare(&self, with_v: bool) -> candle_core::Result<Extras> {
        check_float(OP, "q", self.q)?;
        let (dtype, device) = (self.q.dtype(), self.q.device());
        check_like(OP, "k", self.k, dtype, device, "q")?;
        if with_v {
            check_like(OP, "v", self.v, dtype, device, "q")?;
        }
        let acc = acc_dtype(dtype);
        let constant = |name: &str, t: &Tensor| -> candle_core::Result<Box<dyn AnyVec>> {
            check_device(OP, name, t, device, "q")?;
            check_float(OP, name, t)?;
            check_cpu(OP, name, t)?;
            let t = t.to_dtype(acc)?;
            Ok(if acc == DType::F64 {
                Box::new(host_vec::<f64>(&t)?)
            } else {
                Box::new(host_vec::<f32>(&t)?)
            })
        };
        let slopes = match self.alibi_slopes {
            Some(t) => {
                if t.rank() != 1 {
                    candle_core::bail!(
                        "neurokernels {OP}: tensor `alibi_slopes` has shape {:?}, expected [Hq]",
                        t.dims()
                    );
                }
                Some(constant("alibi_slopes", t)?)
            }
            None => None,
        };
        let bias = match self.bias {
            Some(t) => {
                let &[bb, hb, _, _] = t.dims() else {
                    candle_core::bail!(
                        "neurokernels {OP}: tensor `bias` has shape {:?}, expected [Bb, Hb, Sq, Sk]",
                        t.dims()
                    );
                };
                Some((constant("bias", t)?, bb, hb))
            }
            None => None,
        };
        let cu = match self.cu_seqlens {
            Some(cu) => Some((lengths("cu_seqlens_q", cu.q, device)?, {
                lengths("cu_seqlens_k", cu.k, device)?
            })),
            None => None,
        };
        Ok(Extras { slopes, bias, cu })
    }
}

/// An integer tensor `[N+1]` as i32s.
fn lengths(name: &str, t: &Tensor, device: &candle_core::Device) -> candle_core::Result<Vec<i32>> {
    check_device(OP, name, t, device, "q")?;
    if t.dtype().is_float() {
        candle_core::bail!(
            "neurokernels {OP}: tensor `{name}` has dtype {:?}, expected an integer dtype",
            t.dtype()
        );
    }
    if t.rank() != 1 {
        candle_core::bail!(
            "neurokernels {OP}: tensor `{name}` has shape {:?}, expected [N+1]",
            t.dims()
        );
    }
    host_vec::<i64>(&t.to_dtype(DType::I64)?)?
        .into_iter()
        .map(|x| {
            i32::try_from(x).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "neurokernels {OP}: tensor `{name}` holds {x}, outside i32"
                ))
            })
        })
        .collect()
}

/// A `Vec<A>` of the accumulator type, behind `Any`.
trait AnyVec: Any + Send + Sync {
    fn as_any(&self) -> &dyn Any;
}
impl<T: Any + Send + Sync> AnyVec for Vec<T> {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Downcasts a stored accumulator vector.
fn acc_slice<A: 'static>(v: &dyn AnyVec) -> candle_core::Result<&[A]> {
    v.as_any()
        .downcast_ref::<Vec<A>>()
        .map(|v| v.as_slice())
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "neurokernels {OP}: a constant input's dtype does not match the inputs' accumulator"
            ))
        })
}

/// The constant inputs, on the host in the accumulator type.
struct Extras {
    slopes: Option<Box<dyn AnyVec>>,
    bias: Option<(Box<dyn AnyVec>, usize, usize)>,
    cu: Option<(Vec<i32>, Vec<i32>)>,
}

impl Extras {
    /// Runs `f` on the slice API's inputs for q, k, v.
    fn with_inputs<E: CandleElement, R>(
        &self,
        q: &[E],
        k: &[E],
        v: &[E],
        f: impl FnOnce(&flat::AttentionInputs<'_, E>) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let slopes = match &self.slopes {
            Some(s) => Some(acc_slice::<E::Acc>(s.as_ref())?),
            None => None,
        };
        let bias = match &self.bias {
            Some((b, batch, heads)) => Some(Bias {
                data: acc_slice::<E::Acc>(b.as_ref())?,
                batch: *batch,
                heads: *heads,
            }),
            None => None,
        };
        let inputs = flat::AttentionInputs::new(q, k, v)
            .alibi_slopes(slopes)
            .bias(bias)
            .cu_seqlens(self.cu.as_ref().map(|(q, k)| flat::CuSeqlens {
                q: q.as_slice(),
                k: k.as_slice(),
            }));
        f(&inputs)
    }
}

/// The forward's log-sum-exps, kept for the backward (and for [`forward_with_lse`]).
type LseCache = Arc<Mutex<Option<Box<dyn AnyVec>>>>;

/// The attention forward as a candle op on (q, k, v).
struct AttentionOp {
    params: AttentionParams,
    extras: Extras,
    lse: LseCache,
}

/// The slice API's shape of q, k, v's dims.
fn shape_of(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<AttentionShape> {
    AttentionShape::from_dims(q, k, Some(v)).map_err(wrap)
}

impl AttentionOp {
    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = shape_of(l1.dims(), l2.dims(), l3.dims())?;
        let q = cpu_slice::<E>(OP, "q", s1, l1)?;
        let k = cpu_slice::<E>(OP, "k", s2, l2)?;
        let v = cpu_slice::<E>(OP, "v", s3, l3)?;
        let out = self.extras.with_inputs(q, k, v, |inputs| {
            flat::forward(&self.params, shape, inputs).map_err(wrap)
        })?;
        if let Ok(mut cache) = self.lse.lock() {
            *cache = Some(Box::new(out.lse));
        }
        let dims = match &self.extras.cu {
            Some((cq, _)) => {
                // packed: o [total_q, Hq, Dv] with the batch axis of 1
                let total_q = cq.last().copied().unwrap_or(0).max(0) as usize;
                vec![1, total_q, shape.heads_q, shape.value_dim]
            }
            None => vec![shape.batch, shape.len_q, shape.heads_q, shape.value_dim],
        };
        Ok((E::to_cpu_storage_owned(out.o), Shape::from(dims)))
    }

    fn bwd_typed<E: CandleElement>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let shape = shape_of(q.dims(), k.dims(), v.dims())?;
        let (qh, kh, vh) = (host_vec::<E>(q)?, host_vec::<E>(k)?, host_vec::<E>(v)?);
        let oh = host_vec::<E>(o)?;
        let doh = host_vec::<E>(&d_o.to_dtype(q.dtype())?)?;
        let cached = self.lse.lock().ok().and_then(|mut c| c.take());
        let grads = self.extras.with_inputs(&qh, &kh, &vh, |inputs| {
            let recomputed;
            let lse: &[E::Acc] = match &cached {
                Some(l) => acc_slice::<E::Acc>(l.as_ref())?,
                None => {
                    recomputed = flat::forward(&self.params, shape, inputs)
                        .map_err(wrap)?
                        .lse;
                    &recomputed
                }
            };
            flat::backward(&self.params, shape, inputs, &oh, &doh, lse).map_err(wrap)
        })?;
        if let Ok(mut c) = self.lse.lock() {
            *c = cached;
        }
        let dq = Tensor::from_vec(grads.dq, q.shape(), q.device())?;
        let dk = Tensor::from_vec(grads.dk, k.shape(), k.device())?;
        let dv = Tensor::from_vec(grads.dv, v.shape(), v.device())?;
        Ok((dq, dk, dv))
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "neurokernels-attention"
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
        with_dtype!(OP, s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = with_dtype!(OP, q.dtype(), T => self.bwd_typed::<T>(q, k, v, o, d_o))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Runs the forward op, returning o and the lse cache.
fn run(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_>,
) -> candle_core::Result<(Tensor, LseCache)> {
    let extras = inputs.prepare(true)?;
    let lse: LseCache = Arc::new(Mutex::new(None));
    let op = AttentionOp {
        params: *params,
        extras,
        lse: lse.clone(),
    };
    let (q, k, v) = (
        inputs.q.contiguous()?,
        inputs.k.contiguous()?,
        inputs.v.contiguous()?,
    );
    let mut o = q.apply_op3_arc(&k, &v, Arc::new(Box::new(op)))?;
    // the constant inputs that candle tracks get their gradient through a bridge (identity
    // forward); with packed sequences they stay constants
    if inputs.cu_seqlens.is_none() {
        for (kind, t) in [
            (ScoreInput::Bias, inputs.bias),
            (ScoreInput::Alibi, inputs.alibi_slopes),
        ] {
            if let Some(t) = t.filter(|t| t.track_op()) {
                let bridge = ScoreGrad {
                    params: *params,
                    kind,
                    q: q.detach(),
                    k: k.detach(),
                    v: v.detach(),
                    alibi: inputs.alibi_slopes.map(Tensor::detach),
                    bias: inputs.bias.map(Tensor::detach),
                };
                o = o.apply_op2(t, bridge)?;
            }
        }
    }
    Ok((o, lse))
}

/// The constant input a [`ScoreGrad`] differentiates.
#[derive(Clone, Copy, Debug)]
enum ScoreInput {
    /// `bias [Bb, Hb, Sq, Sk]`: its gradient is dS summed over its broadcast axes.
    Bias,
    /// `alibi_slopes [Hq]`: −Σ dS·|i + Sk − Sq − j| per head.
    Alibi,
}

/// The identity on `o` whose backward passes `do` through unchanged and gives the bias (or
/// the ALiBi slopes) its gradient from the scores' gradient dS = P∘(dP − rowsum(P∘dP)),
/// dP = dO·Vᵀ; P comes from [`top_keys`] over every key (exact probabilities, masks and all).
/// Dense in [B, Hq, Sq, Sk], as any dense bias gradient is.
struct ScoreGrad {
    params: AttentionParams,
    kind: ScoreInput,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alibi: Option<Tensor>,
    bias: Option<Tensor>,
}

impl ScoreGrad {
    /// dS `[B, Hq, Sq, Sk]` in the accumulator dtype, for the upstream gradient `d_o`.
    fn scores_grad(&self, d_o: &Tensor) -> candle_core::Result<Tensor> {
        let (b, sq, hq, _) = self.q.dims4()?;
        let (_, sk, hk, dv) = self.v.dims4()?;
        let inputs = AttentionInputs::new(&self.q, &self.k, &self.v)
            .alibi_slopes(self.alibi.as_ref())
            .bias(self.bias.as_ref());
        let (w, idx) = top_keys(&self.params, &inputs, sk)?;
        let acc = w.dtype();
        // padded entries (index −1) carry weight 0: adding them at key 0 changes nothing
        let idx = idx.clamp(0i64, sk.saturating_sub(1) as i64)?;
        let p = Tensor::zeros((b, hq, sq, sk), acc, w.device())?.scatter_add(&idx, &w, 3)?;
        let d_o = d_o.to_dtype(acc)?.transpose(1, 2)?.contiguous()?; // [B, Hq, Sq, Dv]
        let group = hq / hk.max(1);
        let v = self.v.to_dtype(acc)?.transpose(1, 2)?; // [B, Hk, Sk, Dv]
        let v = v
            .unsqueeze(2)?
            .broadcast_as((b, hk, group, sk, dv))?
            .reshape((b, hq, sk, dv))?;
        let dp = d_o.matmul(&v.transpose(2, 3)?.contiguous()?)?; // [B, Hq, Sq, Sk]
        let pdp = (&p * &dp)?;
        let row = pdp.sum_keepdim(3)?;
        pdp - p.broadcast_mul(&row)?
    }

    fn grad(&self, param: &Tensor, d_o: &Tensor) -> candle_core::Result<Tensor> {
        let ds = self.scores_grad(d_o)?;
        let (b, hq, sq, sk) = ds.dims4()?;
        let g = match self.kind {
            ScoreInput::Bias => {
                let (bb, hb) = (param.dim(0)?, param.dim(1)?);
                let ds = if bb == 1 && b > 1 {
                    ds.sum_keepdim(0)?
                } else {
                    ds
                };
                if hb == 1 && hq > 1 {
                    ds.sum_keepdim(1)?
                } else {
                    ds
                }
            }
            ScoreInput::Alibi => {
                let off = sk as i64 - sq as i64;
                let dist: Vec<f64> = (0..sq as i64)
                    .flat_map(|i| (0..sk as i64).map(move |j| (i + off - j).abs() as f64))
                    .collect();
                let dist =
                    Tensor::from_vec(dist, (1, 1, sq, sk), ds.device())?.to_dtype(ds.dtype())?;
                ds.broadcast_mul(&dist)?.sum((0, 2, 3))?.neg()?
            }
        };
        g.to_dtype(param.dtype())
    }
}

impl CustomOp2 for ScoreGrad {
    fn name(&self) -> &'static str {
        "neurokernels-attention-score-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_dtype!(OP, s1.dtype(), T => {
            let o = cpu_slice::<T>(OP, "o", s1, l1)?;
            Ok((<T as candle_core::WithDType>::to_cpu_storage_owned(o.to_vec()), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _o: &Tensor,
        param: &Tensor,
        _res: &Tensor,
        d_o: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(d_o.clone()), Some(self.grad(param, d_o)?)))
    }
}

/// Attention's output `o [B, Sq, Hq, Dv]` (packed: `[1, total_q, Hq, Dv]`), dtype of q;
/// differentiable in q, k and v. A query that sees no key gives a zero row.
pub fn forward(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_>,
) -> candle_core::Result<Tensor> {
    Ok(run(params, inputs)?.0)
}

/// [`forward`], also returning `lse [B, Hq, Sq]` (packed: `[1, Hq, total_q]`) in the
/// accumulator dtype (f32; f64 for f64 inputs): the natural-log sum of exp of each query's
/// scores, −inf for a query that sees no key. `lse` carries no gradient.
pub fn forward_with_lse(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (o, cache) = run(params, inputs)?;
    let (b, sq, hq, _) = o.dims4()?;
    let acc = acc_dtype(o.dtype());
    let guard = cache
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("neurokernels {OP}: lse cache poisoned")))?;
    let stored = guard.as_ref().ok_or_else(|| {
        candle_core::Error::Msg(format!("neurokernels {OP}: the forward kept no lse"))
    })?;
    let lse = if acc == DType::F64 {
        Tensor::from_slice(acc_slice::<f64>(stored.as_ref())?, (b, hq, sq), o.device())?
    } else {
        Tensor::from_slice(acc_slice::<f32>(stored.as_ref())?, (b, hq, sq), o.device())?
    };
    drop(guard);
    Ok((o, lse))
}

/// `attention.top_keys`: the softmax probabilities of each query's `top` most attended keys
/// (descending, ties to the lower key), `weights [B, Hq, Sq, top]` in the accumulator dtype,
/// and their key positions `indices [B, Hq, Sq, top]` as i64; rows with fewer visible keys
/// than `top` are padded with weight 0 and index −1. No gradient; `inputs.v` is not read.
/// CPU tensors only.
pub fn top_keys(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_>,
    top: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    let extras = inputs.prepare(false)?;
    let device = inputs.q.device().clone();
    check_cpu(OP, "q", inputs.q)?;
    let (q, k) = (inputs.q, inputs.k);
    let shape = AttentionShape::from_dims(q.dims(), k.dims(), None).map_err(wrap)?;
    let rows = match &extras.cu {
        Some((cq, _)) => cq.last().copied().unwrap_or(0).max(0) as usize,
        None => shape.batch * shape.len_q,
    };
    let dims = match &extras.cu {
        Some(_) => (1, shape.heads_q, rows, top),
        None => (shape.batch, shape.heads_q, shape.len_q, top),
    };
    let (weights, indices) = with_dtype!(OP, q.dtype(), T => {
        let (qh, kh) = (host_vec::<T>(q)?, host_vec::<T>(k)?);
        let out = extras.with_inputs(&qh, &kh, &[], |inputs| {
            flat::top_keys(params, shape, inputs, top).map_err(wrap)
        })?;
        (
            Tensor::from_vec(out.weights, dims, &device)?,
            Tensor::from_vec(
                out.indices.into_iter().map(i64::from).collect::<Vec<_>>(),
                dims,
                &device,
            )?,
        )
    });
    Ok((weights, indices))
}

/// The keys and values of the tokens seen so far, for decoding one token (or a few) at a
/// time: `k [B, len, Hk, D]` and `v [B, len, Hk, Dv]`, grown by [`KvCache::append`] along the
/// sequence axis. [`decode`] appends a step's keys and values and attends its queries to the
/// whole cache; with `params.causal` the queries sit at the cache's last positions (the
/// mask is aligned bottom-right), so a multi-token prefill and one-token steps use the same
/// call. Every sequence of the batch has the same length; for ragged batches keep one cache
/// per sequence (or pack them with `cu_seqlens` in [`forward`]).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The positions cached (0 when empty).
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dim(1).unwrap_or(0))
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached keys `[B, len, Hk, D]`, if any.
    pub fn k(&self) -> Option<&Tensor> {
        self.k.as_ref()
    }

    /// The cached values `[B, len, Hk, Dv]`, if any.
    pub fn v(&self) -> Option<&Tensor> {
        self.v.as_ref()
    }

    /// Forgets every position (a new sequence).
    pub fn reset(&mut self) {
        self.k = None;
        self.v = None;
    }

    /// Appends `k [B, S, Hk, D]` and `v [B, S, Hk, Dv]` (S ≥ 1 new positions). Their batch,
    /// heads, head sizes, dtype and device must match what is cached (an error names the
    /// tensor); the cache is unchanged on error. Costs a copy of the cache (`Tensor::cat`).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> candle_core::Result<()> {
        const OP: &str = "attention.decode";
        check_float(OP, "k", k)?;
        check_like(OP, "v", v, k.dtype(), k.device(), "k")?;
        let (b, s, hk, _) = k.dims4()?;
        let Ok((bv, sv, hv, _)) = v.dims4() else {
            candle_core::bail!(
                "neurokernels {OP}: tensor `v` has shape {:?}, expected [{b}, {s}, {hk}, Dv]",
                v.dims()
            );
        };
        if (bv, sv, hv) != (b, s, hk) {
            candle_core::bail!(
                "neurokernels {OP}: tensor `v` has shape {:?}, expected [{b}, {s}, {hk}, Dv] (B, S, Hk from k)",
                v.dims()
            );
        }
        let grown = |cached: &Option<Tensor>, new: &Tensor, name: &str| match cached {
            None => Ok(new.clone()),
            Some(c) => {
                check_like(OP, name, new, c.dtype(), c.device(), "the cache")?;
                let (cd, nd) = (c.dims(), new.dims());
                if (cd[0], cd[2], cd[3]) != (nd[0], nd[2], nd[3]) {
                    candle_core::bail!(
                        "neurokernels {OP}: tensor `{name}` has shape {nd:?}, expected [{}, S, {}, {}] (the cache's)",
                        cd[0],
                        cd[2],
                        cd[3]
                    );
                }
                Tensor::cat(&[c, new], 1)
            }
        };
        let (k_all, v_all) = (grown(&self.k, k, "k")?, grown(&self.v, v, "v")?);
        self.k = Some(k_all);
        self.v = Some(v_all);
        Ok(())
    }
}

/// One decoding step on a [`KvCache`]: appends `k_new [B, S, Hk, D]` and
/// `v_new [B, S, Hk, Dv]` to `cache`, then attends `q [B, S, Hq, D]` (this step's queries)
/// to every cached position with `params` (use `causal` so that a multi-token step masks its
/// own future; one token sees the whole cache either way). Returns `o [B, S, Hq, Dv]`.
/// A one-query step takes the split-KV path (keys spread over the threads); the forward is
/// [`forward`]'s, differentiable as it is.
pub fn decode(
    params: &AttentionParams,
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    cache: &mut KvCache,
) -> candle_core::Result<Tensor> {
    check_like(
        "attention.decode",
        "k_new",
        k_new,
        q.dtype(),
        q.device(),
        "q",
    )?;
    cache.append(k_new, v_new)?;
    let (Some(k), Some(v)) = (cache.k(), cache.v()) else {
        candle_core::bail!("neurokernels attention.decode: the cache is empty after an append");
    };
    forward(params, &AttentionInputs::new(q, k, v))
}
