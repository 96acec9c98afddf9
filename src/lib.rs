//! # neurokernels
//!
//! Compute kernels for neuro-AI and interpretability research, as hand-written CUDA kernels
//! compiled at build time (feature `cuda`) and SIMD CPU kernels, behind one safe API.
//!
//! Families: linear-recurrence scans ([`scan`]: `scan.linear`, `scan.linear_complex`,
//! Mamba's selective scan in [`scan::selective`], gated linear attention in [`scan::gla`],
//! each with its backward); batched ridge in [`ridge`] (`ridge.cv`, `ridge.solve_batched`,
//! `ridge.score`); fused attention in [`attention`] (`attention.forward` with a split-KV
//! decode path, `attention.backward`, `attention.top_keys`: causal/window masks, softcap,
//! ALiBi, bias, GQA/MQA, packed variable-length batches; CPU); sparse top-k encoding in
//! [`topk`] (`topk.rows`, the SAE encoders, decode and backward, matching pursuit,
//! `codebook.nearest`). [`cases`] runs reference cases in the format of CASES.md.
//!
//! Every call validates its inputs and returns [`Result`]; bad input is an [`Error`] naming
//! the tensor, never a panic.

// The docs write recurrences as h[t] = a[t]·h[t-1], which rustdoc would read as links.
#![allow(rustdoc::broken_intra_doc_links)]

pub mod attention;
pub mod cases;
pub mod cpu;
mod dispatch;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod element;
pub mod error;
pub mod ridge;
pub mod scan;
pub mod topk;

pub use element::{DType, Element};
/// The 16-bit float types the kernels take (`f16`, `bf16`), re-exported so a user's crate
/// needs no `half` dependency of its own (and cannot get a mismatched version).
pub use half::{self, bf16, f16};
pub use error::{Error, Result};
