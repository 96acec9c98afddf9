//! The ops on [candle](https://docs.rs/candle-core) tensors (feature `candle`): each op is a
//! candle custom op (`CustomOp1/2/3`) whose `cpu_fwd` runs this crate's CPU kernel and whose
//! `bwd` runs the op's backward, so `Tensor::backward` differentiates a candle model through
//! them.
//!
//! - [`attention`]: fused attention (`forward`, `forward_with_lse`, `top_keys`, `decode` on a
//!   `KvCache`), gradients for q, k and v.
//! - [`scan`]: `scan.linear`, `scan.linear_complex` (interleaved real/imaginary layout),
//!   `scan.selective`, `scan.gla`, gradients for every differentiable input.
//! - [`ridge`]: `cv`, `banded_cv`, `split_scores`, `predict`, `solve_batched`, `score` on
//!   tensors (no autograd).
//! - [`topk`]: the top-k SAE `encode` (values + indices; gradients into x, w_enc, b_enc) and
//!   `decode` (gradients into values, w_dec); forward only: `encode_batch_topk`,
//!   `encode_jumprelu`, `encode_mp`, `nearest` (`codebook.nearest`), `rows` (`topk.rows`).
//!
//! Conventions, for every function here:
//!
//! - **Layouts** are the slice API's (e.g. attention's `q [B, Sq, Hq, D]`, not candle's usual
//!   `[B, H, S, D]`: transpose first if your model keeps heads second).
//! - **Strided tensors** (transposed, narrowed, broadcast) are copied to a contiguous tensor
//!   first (`Tensor::contiguous`, a no-op when already contiguous).
//! - **dtypes**: f32, f16, bf16 and f64; the inputs of one call share one dtype, and a mismatch
//!   is a candle error naming the tensor. Inputs that the slice API takes in the accumulator
//!   type (attention's `alibi_slopes` and `bias`) are converted to f32 (f64 for f64 inputs).
//! - **Devices**: the inputs of one call share one device (a mismatch is an error naming the
//!   tensor). The kernels run on CPU tensors; on a CUDA tensor the op returns candle's
//!   "no cuda implementation" error (`cuda_fwd` is not implemented yet: move tensors to the
//!   CPU, or call the `cuda` feature's APIs on cudarc slices directly).
//! - **Gradients** are first order: the gradients a backward returns are new tensors that
//!   candle does not track, so derivatives of gradients (double backward) through these ops
//!   are not available. Constant
//!   inputs (attention's `bias` and `alibi_slopes`) get no gradient.
//! - Errors of the kernels (shapes, parameters) come back as candle errors wrapping
//!   [`crate::Error`], which names the tensor.

pub mod attention;
pub mod ridge;
pub mod scan;
pub mod topk;

use crate::element::Element;
use candle_core::{CpuStorage, DType, Device, Layout, Tensor, WithDType};

pub use candle_core;

/// An element type both this crate's kernels and candle know: f32, f64, f16, bf16.
pub trait CandleElement: Element<Acc: WithDType> + WithDType {}
impl CandleElement for f32 {}
impl CandleElement for f64 {}
impl CandleElement for half::f16 {}
impl CandleElement for half::bf16 {}

/// A kernel error as a candle error (it names the tensor).
pub(crate) fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The accumulator dtype of `dtype` (f64 for f64, f32 otherwise).
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks that `dtype` is one the kernels take.
pub(crate) fn check_float(op: &str, name: &str, t: &Tensor) -> candle_core::Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        other => candle_core::bail!(
            "neurokernels {op}: tensor `{name}` has dtype {other:?}; the op takes f32, f64, f16 or bf16"
        ),
    }
}

/// Checks that `t` has dtype `dtype` (that of tensor `like`) and lives on `device`.
pub(crate) fn check_like(
    op: &str,
    name: &str,
    t: &Tensor,
    dtype: DType,
    device: &Device,
    like: &str,
) -> candle_core::Result<()> {
    if t.dtype() != dtype {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` has dtype {:?}, expected {dtype:?} (the dtype of `{like}`)",
            t.dtype()
        );
    }
    if !t.device().same_device(device) {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` is on {:?}, expected {device:?} (the device of `{like}`)",
            t.device().location()
        );
    }
    Ok(())
}

/// Checks that `t` is a CPU tensor (for the ops that are not custom ops).
pub(crate) fn check_cpu(op: &str, name: &str, t: &Tensor) -> candle_core::Result<()> {
    if !t.device().is_cpu() {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` is on {:?}; the op runs on CPU tensors",
            t.device().location()
        );
    }
    Ok(())
}

/// Checks device only (for inputs whose dtype is converted).
pub(crate) fn check_device(
    op: &str,
    name: &str,
    t: &Tensor,
    device: &Device,
    like: &str,
) -> candle_core::Result<()> {
    if !t.device().same_device(device) {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` is on {:?}, expected {device:?} (the device of `{like}`)",
            t.device().location()
        );
    }
    Ok(())
}

/// The elements of a contiguous CPU storage as `&[T]`.
pub(crate) fn cpu_slice<'a, T: WithDType>(
    op: &str,
    name: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!(
            "neurokernels {op}: tensor `{name}` is not contiguous (the public functions make it contiguous first)"
        ),
    }
}

/// Runs `f` on the row-major elements of a CPU tensor: borrowed from its storage when it is
/// contiguous (no copy: a backward reads the weights in place), else a contiguous copy.
pub(crate) fn with_host<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return f(&cpu.as_slice::<T>()?[start..end]);
        }
    }
    f(&host_vec::<T>(t)?)
}

/// A contiguous CPU tensor's elements as a `Vec<T>` (any rank).
pub(crate) fn host_vec<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// Runs `$body` with `$T` bound to the element type of candle dtype `$dtype` (f32, f64, f16,
/// bf16), or returns an error naming `$op`.
macro_rules! with_dtype {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            other => candle_core::bail!(
                "neurokernels {}: dtype {other:?} is not supported (f32, f64, f16, bf16)",
                $op
            ),
        }
    };
}
pub(crate) use with_dtype;
