//! The top-k sparse autoencoder on candle tensors: [`encode`] (values + latent indices) with
//! gradients into x, w_enc and b_enc through the selected latents, and [`decode`] with
//! gradients into the values and w_dec. A top-k SAE's reconstruction is
//! `decode(encode(x − b_dec)) + b_dec`; write the b_dec terms with candle's ops (as below),
//! and autograd gives b_dec its gradient too.
//!
//! Layouts: `x [B, Dm]`, `w_enc [L, Dm]`, `b_enc [L]`, `values [B, k]` (dtype of x),
//! `indices [B, k]` (u32), `w_dec [L, Dm]`, `x_hat [B, Dm]`. The selection is the slice API's
//! ([`crate::topk::encode`]: the k largest of ReLU(x·W_encᵀ + b_enc), descending, ties to
//! the lower latent); it is piecewise constant, so no gradient flows through the indices, and
//! a selected value that is 0 (ReLU off) passes none to the encoder.
//!
//! Forward only, on CPU tensors: the other encoders ([`encode_batch_topk`],
//! [`encode_jumprelu`] as [`CsrTensors`], [`encode_mp`]), [`nearest`] (`codebook.nearest`)
//! and [`rows`] (`topk.rows`).
//!
//! ```
//! use neurokernels::candle::topk;
//! use neurokernels::candle::candle_core::{Device, Tensor, Var};
//!
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f32, 1., (4, 16), &dev)?; // [B, Dm]
//! let w_enc = Var::randn(0f32, 0.3, (64, 16), &dev)?; // [L, Dm]
//! let b_enc = Var::zeros(64, candle_core::DType::F32, &dev)?;
//! let w_dec = Var::randn(0f32, 0.3, (64, 16), &dev)?;
//! let b_dec = Var::zeros(16, candle_core::DType::F32, &dev)?;
//! let (values, indices) = topk::encode(&x.broadcast_sub(&b_dec)?, &w_enc, &b_enc, 8)?;
//! let x_hat = topk::decode(&values, &indices, &w_dec)?.broadcast_add(&b_dec)?;
//! let loss = (x_hat - &x)?.sqr()?.mean_all()?;
//! let grads = loss.backward()?;
//! assert_eq!(grads.get(&w_enc).unwrap().dims(), &[64, 16]);
//! # use neurokernels::candle::candle_core;
//! # Ok::<(), candle_core::Error>(())
//! ```

use super::{
    CandleElement, check_float, check_like, cpu_slice, host_vec, with_dtype, with_host, wrap,
};
use crate::topk::{self as flat, EncoderInputs, SaeShape};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The selected latents of one encode, kept for its backward and returned as a tensor.
type Selection = Arc<Mutex<Option<Vec<i32>>>>;

/// `sae.encode` on (x, w_enc, b_enc): returns the values, keeps the indices.
struct EncodeOp {
    k: usize,
    indices: Selection,
}

const ENC: &str = "sae.encode";
const DEC: &str = "sae.decode";

fn sae_shape(op: &str, x: &[usize], w: &[usize], wname: &str) -> candle_core::Result<SaeShape> {
    let (&[b, dm], &[l, dm2]) = (x, w) else {
        candle_core::bail!(
            "neurokernels {op}: expected x [B, Dm] and {wname} [L, Dm], got {x:?} and {w:?}"
        );
    };
    if dm != dm2 {
        candle_core::bail!(
            "neurokernels {op}: tensor `{wname}` has shape {w:?}, expected [L, {dm}] (Dm from x)"
        );
    }
    Ok(SaeShape::new(b, dm, l))
}

/// The lock of a selection (poisoning is a candle error).
fn lock(s: &Selection) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Vec<i32>>>> {
    s.lock()
        .map_err(|_| candle_core::Error::Msg("neurokernels: selection lock poisoned".into()))
}

impl EncodeOp {
    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = sae_shape(ENC, l1.dims(), l2.dims(), "w_enc")?;
        let inputs = EncoderInputs {
            x: cpu_slice::<E>(ENC, "x", s1, l1)?,
            w_enc: cpu_slice::<E>(ENC, "w_enc", s2, l2)?,
            b_enc: cpu_slice::<E>(ENC, "b_enc", s3, l3)?,
            b_dec: None,
        };
        let out = flat::encode(shape, self.k, &inputs).map_err(wrap)?;
        *lock(&self.indices)? = Some(out.indices);
        Ok((
            E::to_cpu_storage_owned(out.values),
            Shape::from((shape.batch, self.k)),
        ))
    }

    /// dx = Σ_j dv·w_enc[idx], dw_enc[idx] += dv·x, db_enc[idx] += dv over the selected
    /// latents whose value is positive: the fused `sae.backward`'s encoder part (SIMD,
    /// parallel over rows for dx and over latents for dw_enc and db_enc, the same bits for
    /// any thread count).
    fn bwd_typed<E: CandleElement>(
        &self,
        x: &Tensor,
        w_enc: &Tensor,
        b_enc: &Tensor,
        values: &Tensor,
        d_values: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let shape = sae_shape(ENC, x.dims(), w_enc.dims(), "w_enc")?;
        let k = self.k;
        let guard = lock(&self.indices)?;
        let Some(idx) = guard.as_ref() else {
            candle_core::bail!("neurokernels {ENC}: the forward kept no selection");
        };
        let vals = host_vec::<E>(values)?;
        let dv = host_vec::<E>(&d_values.to_dtype(x.dtype())?)?;
        let zero = <E::Acc as crate::element::Accum>::ZERO;
        // a value that is not positive (ReLU off, or NaN) passes no gradient
        let dpre: Vec<E::Acc> = vals
            .iter()
            .zip(&dv)
            .map(|(v, g)| if v.to_acc() > zero { g.to_acc() } else { zero })
            .collect();
        let isa = crate::cpu::Isa::active();
        let dx = with_host::<E, _>(w_enc, |wh| {
            Ok(flat::gather_rows(isa, shape, k, idx, &dpre, wh))
        })?;
        let (dw, db) = with_host::<E, _>(x, |xh| {
            Ok(flat::scatter_rows(isa, shape, k, idx, &dpre, xh))
        })?;
        let cast = |v: Vec<E::Acc>| -> Vec<E> { v.into_iter().map(E::from_acc).collect() };
        Ok((
            Tensor::from_vec(cast(dx), x.shape(), x.device())?,
            Tensor::from_vec(dw, w_enc.shape(), w_enc.device())?,
            Tensor::from_vec(cast(db), b_enc.shape(), b_enc.device())?,
        ))
    }
}

impl CustomOp3 for EncodeOp {
    fn name(&self) -> &'static str {
        "neurokernels-sae-encode"
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
        with_dtype!(ENC, s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2), (s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w_enc: &Tensor,
        b_enc: &Tensor,
        values: &Tensor,
        d_values: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = with_dtype!(ENC, x.dtype(),
            T => self.bwd_typed::<T>(x, w_enc, b_enc, values, d_values))?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `sae.encode`: per row of `x [B, Dm]`, the `k` largest of ReLU(x·W_encᵀ + b_enc)
/// (`w_enc [L, Dm]`, `b_enc [L]`), descending, as `values [B, k]` (dtype of x) and their
/// latents `indices [B, k]` (u32); where fewer than k are positive the rest are zeros at the
/// lowest latents with a non-positive pre-activation. `values` is differentiable in x, w_enc
/// and b_enc through the selected latents; `indices` carries no gradient. `k` in 1..=L.
pub fn encode(
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    k: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    check_float(ENC, "x", x)?;
    check_like(ENC, "w_enc", w_enc, x.dtype(), x.device(), "x")?;
    check_like(ENC, "b_enc", b_enc, x.dtype(), x.device(), "x")?;
    let indices: Selection = Arc::new(Mutex::new(None));
    let op = EncodeOp {
        k,
        indices: indices.clone(),
    };
    let values = x.contiguous()?.apply_op3_arc(
        &w_enc.contiguous()?,
        &b_enc.contiguous()?,
        Arc::new(Box::new(op)),
    )?;
    let idx: Vec<u32> = match lock(&indices)?.as_ref() {
        Some(idx) => idx.iter().map(|&i| i as u32).collect(),
        None => candle_core::bail!("neurokernels {ENC}: the forward kept no selection"),
    };
    let indices = Tensor::from_vec(idx, values.shape(), values.device())?;
    Ok((values, indices))
}

/// `sae.decode` on (values, w_dec), the indices captured.
struct DecodeOp {
    indices: Vec<i32>,
    k: usize,
}

impl DecodeOp {
    fn fwd<E: CandleElement>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[b, _] = l1.dims() else {
            candle_core::bail!(
                "neurokernels {DEC}: tensor `values` has shape {:?}, expected [B, k]",
                l1.dims()
            );
        };
        let &[l, dm] = l2.dims() else {
            candle_core::bail!(
                "neurokernels {DEC}: tensor `w_dec` has shape {:?}, expected [L, Dm]",
                l2.dims()
            );
        };
        let shape = SaeShape::new(b, dm, l);
        let values = cpu_slice::<E>(DEC, "values", s1, l1)?;
        let w = cpu_slice::<E>(DEC, "w_dec", s2, l2)?;
        let x_hat = flat::decode(shape, self.k, &self.indices, values, w, None).map_err(wrap)?;
        Ok((E::to_cpu_storage_owned(x_hat), Shape::from((b, dm))))
    }

    /// d_values[r, j] = d_xhat[r]·w_dec[idx], dw_dec[idx] += values[r, j]·d_xhat[r]: the
    /// fused `sae.backward`'s decoder part (SIMD, parallel over rows, then over latents).
    fn bwd_typed<E: CandleElement>(
        &self,
        values: &Tensor,
        w_dec: &Tensor,
        d_xhat: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (b, k) = values.dims2()?;
        let (l, dm) = w_dec.dims2()?;
        let shape = SaeShape::new(b, dm, l);
        let vh = host_vec::<E>(values)?;
        let gh = host_vec::<E>(&d_xhat.to_dtype(values.dtype())?)?;
        let isa = crate::cpu::Isa::active();
        let dv = with_host::<E, _>(w_dec, |wh| {
            Ok(flat::selected_dots(isa, shape, k, &self.indices, &gh, wh))
        })?;
        let coef: Vec<E::Acc> = vh.iter().map(|v| v.to_acc()).collect();
        let (dw, _) = flat::scatter_rows(isa, shape, k, &self.indices, &coef, &gh);
        let dv: Vec<E> = dv.into_iter().map(E::from_acc).collect();
        Ok((
            Tensor::from_vec(dv, values.shape(), values.device())?,
            Tensor::from_vec(dw, w_dec.shape(), w_dec.device())?,
        ))
    }
}

impl CustomOp2 for DecodeOp {
    fn name(&self) -> &'static str {
        "neurokernels-sae-decode"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        with_dtype!(DEC, s1.dtype(), T => self.fwd::<T>((s1, l1), (s2, l2)))
    }

    fn bwd(
        &self,
        values: &Tensor,
        w_dec: &Tensor,
        _x_hat: &Tensor,
        d_xhat: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dv, dw) =
            with_dtype!(DEC, values.dtype(), T => self.bwd_typed::<T>(values, w_dec, d_xhat))?;
        Ok((Some(dv), Some(dw)))
    }
}

/// `sae.decode`: `x_hat [B, Dm]`, row r = Σ_j values[r, j]·w_dec[indices[r, j]]
/// (`values [B, k]`, `indices [B, k]` any integer dtype with entries in 0..L,
/// `w_dec [L, Dm]`). Differentiable in values and w_dec.
pub fn decode(values: &Tensor, indices: &Tensor, w_dec: &Tensor) -> candle_core::Result<Tensor> {
    check_float(DEC, "values", values)?;
    check_like(
        DEC,
        "w_dec",
        w_dec,
        values.dtype(),
        values.device(),
        "values",
    )?;
    if indices.dtype().is_float() {
        candle_core::bail!(
            "neurokernels {DEC}: tensor `indices` has dtype {:?}, expected an integer dtype",
            indices.dtype()
        );
    }
    if indices.dims() != values.dims() {
        candle_core::bail!(
            "neurokernels {DEC}: tensor `indices` has shape {:?}, expected {:?} (the shape of `values`)",
            indices.dims(),
            values.dims()
        );
    }
    let (_, k) = values.dims2()?;
    let l = w_dec.dim(0)?;
    let idx = host_vec::<i64>(&indices.to_dtype(DType::I64)?)?
        .into_iter()
        .map(|i| {
            if i < 0 || i as usize >= l {
                Err(candle_core::Error::Msg(format!(
                    "neurokernels {DEC}: tensor `indices` holds {i}, outside 0..{l} (L from w_dec)"
                )))
            } else {
                Ok(i as i32)
            }
        })
        .collect::<candle_core::Result<Vec<i32>>>()?;
    values
        .contiguous()?
        .apply_op2(&w_dec.contiguous()?, DecodeOp { indices: idx, k })
}

// ---------------------------------------------------------------------------------------------
// forward-only ops: the other encoders, codebook search and row top-k (no gradient: their
// outputs are selections, or the encoders are used for inference and analysis)

/// The rows of a CSR result as tensors: `indptr [B + 1]` and `indices [nnz]` (u32), `values
/// [nnz]` (dtype of x).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CsrTensors {
    /// `[B + 1]`: row b's entries are `indptr[b]..indptr[b + 1]`.
    pub indptr: Tensor,
    /// `[nnz]`: the latent of each entry.
    pub indices: Tensor,
    /// `[nnz]`: the entries, descending within each row.
    pub values: Tensor,
}

/// The matching pursuit of [`encode_mp`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MatchingPursuit {
    /// `[B, k]`: the coefficient of each step, in selection order.
    pub values: Tensor,
    /// `[B, k]` (u32): the atom of each step.
    pub indices: Tensor,
    /// `[B, Dm]`: what is left of x − b_dec.
    pub residual: Tensor,
}

/// The contiguous host elements of a CPU tensor (the forward-only ops are not custom ops).
fn cpu_vec<T: candle_core::WithDType>(
    op: &str,
    name: &str,
    t: &Tensor,
) -> candle_core::Result<Vec<T>> {
    super::check_cpu(op, name, t)?;
    host_vec::<T>(t)
}

fn u32_tensor(
    v: Vec<i32>,
    shape: impl Into<Shape>,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    Tensor::from_vec(
        v.into_iter().map(|i| i as u32).collect::<Vec<_>>(),
        shape,
        dev,
    )
}

fn csr_tensors<T: CandleElement>(
    csr: flat::Csr<T>,
    dev: &candle_core::Device,
) -> candle_core::Result<CsrTensors> {
    let (rows, nnz) = (csr.indptr.len(), csr.indices.len());
    Ok(CsrTensors {
        indptr: u32_tensor(csr.indptr, rows, dev)?,
        indices: u32_tensor(csr.indices, nnz, dev)?,
        values: Tensor::from_vec(csr.values, nnz, dev)?,
    })
}

/// Checks x [B, Dm], w_enc [L, Dm] and b_enc [L] (and b_dec [Dm]) of one dtype and device.
fn encoder_checks(
    op: &str,
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
) -> candle_core::Result<SaeShape> {
    check_float(op, "x", x)?;
    check_like(op, "w_enc", w_enc, x.dtype(), x.device(), "x")?;
    check_like(op, "b_enc", b_enc, x.dtype(), x.device(), "x")?;
    if let Some(b) = b_dec {
        check_like(op, "b_dec", b, x.dtype(), x.device(), "x")?;
    }
    sae_shape(op, x.dims(), w_enc.dims(), "w_enc")
}

/// `sae.encode_batch_topk` (BatchTopK): the B·k largest positive pre-activations
/// ReLU((x − b_dec)·W_encᵀ + b_enc) over the whole batch, as CSR tensors (each row
/// descending). `x [B, Dm]`, `w_enc [L, Dm]`, `b_enc [L]`, `b_dec [Dm]` optional; CPU
/// tensors; no gradient. See [`crate::topk::encode_batch_topk`].
pub fn encode_batch_topk(
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
    k: usize,
) -> candle_core::Result<CsrTensors> {
    const OP: &str = "sae.encode_batch_topk";
    let shape = encoder_checks(OP, x, w_enc, b_enc, b_dec)?;
    with_dtype!(OP, x.dtype(), T => {
        let (xh, wh, bh) = (cpu_vec::<T>(OP, "x", x)?, host_vec::<T>(w_enc)?, host_vec::<T>(b_enc)?);
        let bd = b_dec.map(host_vec::<T>).transpose()?;
        let inputs = EncoderInputs { x: &xh, w_enc: &wh, b_enc: &bh, b_dec: bd.as_deref() };
        let csr = flat::encode_batch_topk(shape, k, &inputs).map_err(wrap)?;
        csr_tensors(csr, x.device())
    })
}

/// `sae.encode_jumprelu`: keeps the pre-activations (x − b_dec)·W_encᵀ + b_enc above
/// `threshold [L]` (strictly), as CSR tensors (each row descending). Shapes and dtypes as
/// [`encode_batch_topk`]; CPU tensors; no gradient.
pub fn encode_jumprelu(
    x: &Tensor,
    w_enc: &Tensor,
    b_enc: &Tensor,
    b_dec: Option<&Tensor>,
    threshold: &Tensor,
) -> candle_core::Result<CsrTensors> {
    const OP: &str = "sae.encode_jumprelu";
    let shape = encoder_checks(OP, x, w_enc, b_enc, b_dec)?;
    check_like(OP, "threshold", threshold, x.dtype(), x.device(), "x")?;
    with_dtype!(OP, x.dtype(), T => {
        let (xh, wh, bh) = (cpu_vec::<T>(OP, "x", x)?, host_vec::<T>(w_enc)?, host_vec::<T>(b_enc)?);
        let (bd, th) = (b_dec.map(host_vec::<T>).transpose()?, host_vec::<T>(threshold)?);
        let inputs = EncoderInputs { x: &xh, w_enc: &wh, b_enc: &bh, b_dec: bd.as_deref() };
        let csr = flat::encode_jumprelu(shape, &inputs, &th).map_err(wrap)?;
        csr_tensors(csr, x.device())
    })
}

/// `sae.encode_mp`: `k` steps of matching pursuit of x − b_dec over the atoms `w_dec [L, Dm]`
/// (normalize them first), `b_dec [Dm]` optional; returns each step's coefficient and atom
/// and the residual. CPU tensors; no gradient. See [`crate::topk::encode_mp`].
pub fn encode_mp(
    x: &Tensor,
    w_dec: &Tensor,
    b_dec: Option<&Tensor>,
    k: usize,
) -> candle_core::Result<MatchingPursuit> {
    const OP: &str = "sae.encode_mp";
    check_float(OP, "x", x)?;
    check_like(OP, "w_dec", w_dec, x.dtype(), x.device(), "x")?;
    if let Some(b) = b_dec {
        check_like(OP, "b_dec", b, x.dtype(), x.device(), "x")?;
    }
    let shape = sae_shape(OP, x.dims(), w_dec.dims(), "w_dec")?;
    with_dtype!(OP, x.dtype(), T => {
        let (xh, wh) = (cpu_vec::<T>(OP, "x", x)?, host_vec::<T>(w_dec)?);
        let bd = b_dec.map(host_vec::<T>).transpose()?;
        let mp = flat::encode_mp(shape, k, &xh, &wh, bd.as_deref()).map_err(wrap)?;
        let dev = x.device();
        Ok(MatchingPursuit {
            values: Tensor::from_vec(mp.values, (shape.batch, k), dev)?,
            indices: u32_tensor(mp.indices, (shape.batch, k), dev)?,
            residual: Tensor::from_vec(mp.residual, (shape.batch, shape.dm), dev)?,
        })
    })
}

/// `codebook.nearest`: per row of `x [B, Dm]`, the `k` best rows of `codebook [L, Dm]` by
/// `metric` (dot, cosine: largest first; L2: smallest first), as `(scores [B, k],
/// indices [B, k] u32)`. CPU tensors; no gradient.
pub fn nearest(
    metric: flat::Metric,
    x: &Tensor,
    codebook: &Tensor,
    k: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    const OP: &str = "codebook.nearest";
    check_float(OP, "x", x)?;
    check_like(OP, "codebook", codebook, x.dtype(), x.device(), "x")?;
    let shape = sae_shape(OP, x.dims(), codebook.dims(), "codebook")?;
    with_dtype!(OP, x.dtype(), T => {
        let (xh, ch) = (cpu_vec::<T>(OP, "x", x)?, host_vec::<T>(codebook)?);
        let top = flat::nearest(metric, shape, k, &xh, &ch).map_err(wrap)?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(top.values, (shape.batch, k), dev)?,
            u32_tensor(top.indices, (shape.batch, k), dev)?,
        ))
    })
}

/// `topk.rows`: the `k` largest (or, with `params.largest = false`, smallest) entries of each
/// row of `x [rows, N]`, best first, as `(values [rows, k], indices [rows, k] u32)`; ties to the
/// lower index, NaN above every number (as torch.topk). CPU tensors; no gradient.
pub fn rows(
    params: &flat::RowsParams,
    x: &Tensor,
    k: usize,
) -> candle_core::Result<(Tensor, Tensor)> {
    const OP: &str = "topk.rows";
    check_float(OP, "x", x)?;
    let shape = flat::RowsShape::from_dims(x.dims()).map_err(wrap)?;
    with_dtype!(OP, x.dtype(), T => {
        let xh = cpu_vec::<T>(OP, "x", x)?;
        let top = flat::rows(params, shape, k, &xh).map_err(wrap)?;
        let dev = x.device();
        Ok((
            Tensor::from_vec(top.values, (shape.rows, k), dev)?,
            u32_tensor(top.indices, (shape.rows, k), dev)?,
        ))
    })
}
