//! The crate's one error type. Every fallible call returns [`Result`].
//!
//! # The validation rule
//!
//! Every op, on the CPU and under CUDA, follows one rule, so that no input can panic, abort,
//! hang or read out of bounds:
//!
//! 1. **All shape arithmetic is checked.** Element counts, byte sizes and offsets are
//!    computed with checked arithmetic; a product that overflows `usize` (or the 32-bit
//!    index a CUDA kernel uses) is an [`Error::Overflow`] naming the tensor.
//! 2. **Inputs are validated before anything is allocated or launched.** Every length is
//!    checked against the shape, every parameter against its range (non-finite scales,
//!    counts of zero, fold ids no sample can fill), then outputs are sized.
//! 3. **No allocation is sized by a dim the inputs do not back.** A dim is backed when a
//!    non-empty input carries it (B is backed by a non-empty `q`, Sk by `k`, …). An output
//!    with a dim that no non-empty input carries, such as a batch of a million rows of zero
//!    columns, or a `top` past the keys that exist, may hold at most as many elements as
//!    the inputs together, or [`UNBACKED_LIMIT`] (2^20), whichever is larger. Past that it
//!    is an [`Error::Shape`] naming the input that should carry the dim. An empty tensor
//!    never allocates by a huge dim.
//! 4. **Every loop is bounded by input lengths.** Work over a dim that carries no data,
//!    such as the heads of a call with no queries or the sequences of an empty scan, is skipped, not
//!    iterated.
//!
//! Where a value is accepted but the arithmetic can still overflow the accumulator (an
//! attention `scale` of 1e30 with large scores), the op's docs say what it returns.

use std::fmt;

/// Everything that can go wrong in a neurokernels call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A tensor has the wrong shape, rank or length.
    Shape {
        /// The tensor's name, as in the op's docs (e.g. `q`).
        tensor: String,
        /// The shape or length the op expected.
        expected: String,
        /// The shape or length it was given.
        got: String,
    },
    /// A parameter or input value is outside what the op accepts.
    InvalidArgument {
        /// The parameter or input's name.
        name: String,
        /// What is wrong with its value.
        problem: String,
    },
    /// A shape whose element count or byte size does not fit in `usize` (or in the
    /// kernel's index type).
    Overflow {
        /// The tensor's name.
        tensor: String,
        /// Which size overflowed.
        detail: String,
    },
    /// A dtype the op or the device does not support.
    Unsupported(String),
    /// No CUDA device or driver is available (never a panic).
    NoDevice(String),
    /// An error reported by the CUDA driver or while loading kernels.
    Cuda(String),
    /// A reference case could not be read or is malformed.
    Case(String),
    /// A reference case names an op this crate does not implement.
    OpNotImplemented(String),
    /// File system errors (reading cases, saving outputs).
    Io(String),
}

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn shape(tensor: &str, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Error::Shape {
            tensor: tensor.to_string(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn invalid(name: &str, problem: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name: name.to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn overflow(tensor: &str, detail: impl Into<String>) -> Self {
        Error::Overflow {
            tensor: tensor.to_string(),
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape {
                tensor,
                expected,
                got,
            } => write!(f, "tensor `{tensor}`: expected {expected}, got {got}"),
            Error::InvalidArgument { name, problem } => write!(f, "`{name}`: {problem}"),
            Error::Overflow { tensor, detail } => {
                write!(f, "tensor `{tensor}`: size overflows: {detail}")
            }
            Error::Unsupported(what) => write!(f, "unsupported: {what}"),
            Error::NoDevice(why) => write!(f, "no CUDA device: {why}"),
            Error::Cuda(what) => write!(f, "CUDA error: {what}"),
            Error::Case(what) => write!(f, "reference case: {what}"),
            Error::OpNotImplemented(op) => write!(f, "op not implemented: {op}"),
            Error::Io(what) => write!(f, "I/O error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

/// The most elements an output may hold when one of its dims is carried by no non-empty
/// input (rule 3 of the [module docs](self)): tiny degenerate calls still work, huge ones
/// are refused before allocating.
pub const UNBACKED_LIMIT: usize = 1 << 20;

/// Rule 3: `Err(Shape)` naming `carrier` (the input that should carry the dim `what`) when an
/// output of `len` elements exceeds both the `inputs`' total elements and [`UNBACKED_LIMIT`].
pub(crate) fn check_backed(carrier: &str, what: &str, len: usize, inputs: usize) -> Result<()> {
    if len <= inputs.max(UNBACKED_LIMIT) {
        return Ok(());
    }
    Err(Error::shape(
        carrier,
        format!(
            "a non-empty tensor carrying {what}, or outputs of at most max(the inputs' \
             {inputs} elements, {UNBACKED_LIMIT})"
        ),
        format!("an output of {len} elements sized by {what} alone"),
    ))
}

/// `Err(Shape)` naming `tensor` unless it holds `expected` elements (`shape` says which dims).
pub(crate) fn check_len(tensor: &str, got: usize, expected: usize, shape: &str) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(
            tensor,
            format!("{expected} elements ({shape})"),
            format!("{got} elements"),
        ))
    }
}
