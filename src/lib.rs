//! # neurokernels
//!
//! Compute kernels for neuro-AI and interpretability research, as hand-written CUDA kernels
//! compiled at build time (feature `cuda`) and SIMD CPU kernels, behind one safe API.
//!
//! | family | module | ops |
//! |---|---|---|
//! | linear-recurrence scans | [`scan`], [`scan::selective`], [`scan::gla`] | `linear`, `linear_complex`, Mamba's `selective`, gated linear attention `gla`, each with its backward |
//! | fused attention | [`attention`] | `forward` (split-KV decode path), `backward`, `top_keys`: causal/window masks, softcap, ALiBi, bias, GQA/MQA, packed variable-length batches |
//! | sparse top-k encoding | [`topk`] | `rows`, the SAE encoders (`encode`, `encode_batch_topk`, `encode_jumprelu`, `encode_mp`), `decode`, `backward`, `nearest` |
//! | batched ridge | [`ridge`] | `cv` (an alpha per target), `banded_cv` (a weight per feature space and an alpha per target) and `split_scores`, `predict`, `score`, `solve_batched` |
//!
//! Each family's module doc has a runnable example. The op contract (names, shapes, layouts
//! and conventions shared with the reference cases) is `CASES.md` in the repository and the
//! package.
//!
//! # One convention
//!
//! - **Tensors** are row-major slices; their layout is written `[B, T, D]` (last axis
//!   contiguous) in every doc. A **shape** struct gives the sizes: build it with named fields
//!   or `from_dims` (checks the dims of each tensor against the op's layout), never from
//!   a long positional list you could misorder.
//! - **Arguments** come in one order: options (`&Params`, built with `Params::new()` and
//!   setters, defaults documented), then the shape, then the count to keep (`k`, `top`),
//!   then the inputs, by reference (slices, or an `Inputs` struct with named fields).
//! - `op(...)` **allocates** and returns `Result<Out>`: a `Vec` for one tensor, a named struct
//!   (`AttentionOut { o, lse }`, `TopK { values, indices }`, `Scores { r2, pearson }`,
//!   `…Grads`) for several. `op_into(..., &mut out)` **writes the caller's buffers** where
//!   reusing them pays (the scans).
//! - **Element types**: `f32`, `f64`, [`f16`](struct@f16), [`bf16`] (re-exported from `half`) through
//!   [`Element`]; reductions accumulate in `E::Acc` (f32, or f64 for f64), and tensors in
//!   the accumulator type (`lse`, states) say so.
//! - **Errors**: every call validates its inputs before allocating or launching and returns
//!   [`Result`]; bad input is an [`Error`] naming the tensor and both shapes, never a panic.
//! - **Devices**: the CPU functions pick the best SIMD path of the running CPU. The CUDA
//!   entry points (feature `cuda`) live in each family's `cuda` module: they take a
//!   `cuda::Device`, a stream and device buffers, and write the caller's device buffers;
//!   their `_host` forms take the CPU function's arguments after the device and return the
//!   CPU function's result type. Hidden `*_on(isa, ...)` variants run one chosen instruction
//!   set, for tests and benches.
//! - **Frameworks**: `nd` (feature `ndarray`) takes `ndarray` views; `candle` (feature
//!   `candle`) runs the ops on candle tensors as custom ops with backward passes, so
//!   `Tensor::backward` differentiates a candle model through them.
//!
//! ```
//! use neurokernels::scan::{self, ScanParams, ScanShape};
//!
//! // h[t] = a[t]·h[t-1] + b[t] over 2 sequences of 3 steps and 4 channels
//! let shape = ScanShape { batch: 2, len: 3, channels: 4 };
//! let (a, b) = (vec![0.5f32; 24], vec![1.0f32; 24]);
//! let h = scan::linear(&ScanParams::new(), shape, &a, &b, None)?;
//! assert_eq!(h[..4], [1.0; 4]);
//! assert_eq!(h[8..12], [1.75; 4]);
//!
//! // bad input is an error naming the tensor
//! let err = scan::linear(&ScanParams::new(), shape, &a[..5], &b, None).unwrap_err();
//! assert!(err.to_string().contains("`a`"));
//! # Ok::<(), neurokernels::Error>(())
//! ```
//!
//! # Build time and debug builds
//!
//! The kernels are compiled once per element type in this crate (see `dispatch.rs`), so a
//! crate using them does not re-optimize them on each of its own builds. In a debug build
//! of your crate the kernels still run at debug speed unless neurokernels itself is
//! optimized; the README gives the profile setting.

#![deny(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod attention;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "cases")]
pub mod cases;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod dispatch;
pub mod element;
pub mod error;
#[cfg(feature = "ndarray")]
pub mod nd;
pub mod ridge;
pub mod scan;
pub mod topk;

pub use element::{DType, Element};
pub use error::{Error, Result};
/// The 16-bit float types the kernels take (`f16`, `bf16`), re-exported so a user's crate
/// needs no `half` dependency of its own (and cannot get a mismatched version).
pub use half::{self, bf16, f16};
