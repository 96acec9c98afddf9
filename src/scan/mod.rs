//! Linear-recurrence scans. `scan.linear`: h[t] = a[t]·h[t-1] + b[t], elementwise over
//! channels, on tensors laid out `[B, T, D]` (channels contiguous), and its backward.
//!
//! CPU entry points take slices; CUDA ones ([`cuda`], feature `cuda`) take device slices and
//! a stream. All validate shapes up front and return `Err` naming the tensor.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::cpu::Isa;
use crate::element::{Accum, Element};
use crate::error::{Error, Result};

/// Parameters of `scan.linear` and `scan.linear_backward`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanParams {
    /// Run the recurrence from t = T-1 down to 0: h[t] = a[t]·h[t+1] + b[t], with h0
    /// entering at t = T-1.
    pub reverse: bool,
}

impl ScanParams {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn reverse(mut self, reverse: bool) -> Self {
        self.reverse = reverse;
        self
    }
}

/// The shape `[batch, len, channels]` = `[B, T, D]` of a linear scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    pub len: usize,
    pub channels: usize,
}

impl ScanShape {
    pub fn new(batch: usize, len: usize, channels: usize) -> Self {
        Self {
            batch,
            len,
            channels,
        }
    }

    /// A shape from a tensor's dims, which must have rank 3.
    pub fn from_dims(tensor: &str, dims: &[usize]) -> Result<Self> {
        match *dims {
            [batch, len, channels] => Ok(Self::new(batch, len, channels)),
            _ => Err(Error::shape(
                tensor,
                "rank 3 [B, T, D]",
                format!("rank {} {dims:?}", dims.len()),
            )),
        }
    }

    /// B·T·D, or `Err` if it overflows.
    pub fn numel(&self, tensor: &str) -> Result<usize> {
        self.batch
            .checked_mul(self.len)
            .and_then(|n| n.checked_mul(self.channels))
            .ok_or_else(|| {
                Error::overflow(tensor, format!("{self} has more than usize::MAX elements"))
            })
    }

    /// B·D, the size of h0 and dh0.
    pub fn state_numel(&self, tensor: &str) -> Result<usize> {
        self.batch
            .checked_mul(self.channels)
            .ok_or_else(|| Error::overflow(tensor, format!("[B, D] of {self} overflows")))
    }

    /// Checks that the element count fits in `E`'s byte size and in an i64 (kernel index).
    pub(crate) fn checked_numel<E: Element>(&self, tensor: &str) -> Result<usize> {
        let n = self.numel(tensor)?;
        let bytes = n.checked_mul(E::DTYPE.size_bytes());
        if bytes.is_none_or(|b| b > isize::MAX as usize) {
            return Err(Error::overflow(
                tensor,
                format!("{self} of {} exceeds isize::MAX bytes", E::DTYPE),
            ));
        }
        Ok(n)
    }
}

impl std::fmt::Display for ScanShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}]", self.batch, self.len, self.channels)
    }
}

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

/// Sizes checked once for a forward call: (B·T·D, B·D).
pub(crate) fn validate_forward(
    shape: &ScanShape,
    a: usize,
    b: usize,
    h0: Option<usize>,
    h: usize,
) -> Result<(usize, usize)> {
    let n = shape.numel("a")?;
    let s = shape.state_numel("h0")?;
    let dims = shape.to_string();
    check_len("a", a, n, &dims)?;
    check_len("b", b, n, &dims)?;
    if let Some(h0) = h0 {
        check_len(
            "h0",
            h0,
            s,
            &format!("[{}, {}]", shape.batch, shape.channels),
        )?;
    }
    check_len("h", h, n, &dims)?;
    Ok((n, s))
}

/// Sizes checked once for a backward call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_backward(
    shape: &ScanShape,
    a: usize,
    h: usize,
    dh: usize,
    h0: Option<usize>,
    da: usize,
    db: usize,
    dh0: usize,
) -> Result<(usize, usize)> {
    let n = shape.numel("a")?;
    let s = shape.state_numel("dh0")?;
    let dims = shape.to_string();
    let state_dims = format!("[{}, {}]", shape.batch, shape.channels);
    check_len("a", a, n, &dims)?;
    check_len("h", h, n, &dims)?;
    check_len("dh", dh, n, &dims)?;
    if let Some(h0) = h0 {
        check_len("h0", h0, s, &state_dims)?;
    }
    check_len("da", da, n, &dims)?;
    check_len("db", db, n, &dims)?;
    check_len("dh0", dh0, s, &state_dims)?;
    Ok((n, s))
}

/// `scan.linear` on the CPU, in place: writes `h [B, T, D]`.
///
/// `h0 [B, D]` is the state before the first step (zeros when `None`). Accumulates in f32
/// (f64 for f64). Deterministic: the result does not depend on the thread count.
pub fn linear<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    linear_on(Isa::active(), params, shape, a, b, h0, h)
}

/// [`linear`] on a chosen instruction set (`Err` if this CPU lacks it): for tests that
/// compare the SIMD and scalar paths, and for benchmarks.
pub fn linear_on<E: Element>(
    isa: Isa,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    isa.check()?;
    validate_forward(&shape, a.len(), b.len(), h0.map(<[E]>::len), h.len())?;
    shape.checked_numel::<E>("a")?;
    if h.is_empty() {
        return Ok(());
    }
    cpu::forward(isa, params.reverse, shape, a, b, h0, h);
    Ok(())
}

/// Allocating convenience for [`linear`]: returns `h`.
pub fn linear_alloc<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    let n = shape.checked_numel::<E>("a")?;
    let mut h = vec![E::default(); n];
    linear(params, shape, a, b, h0, &mut h)?;
    Ok(h)
}

/// Gradients of `scan.linear`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearGrads<E> {
    pub da: Vec<E>,
    pub db: Vec<E>,
    pub dh0: Vec<E>,
}

/// `scan.linear_backward` on the CPU, in place. `h` is the forward output, `dh` the gradient
/// of the loss with respect to it. Writes `da`, `db` (`[B, T, D]`) and `dh0` (`[B, D]`, the
/// gradient with respect to the initial state, zeros-initial-state included).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
    da: &mut [E],
    db: &mut [E],
    dh0: &mut [E],
) -> Result<()> {
    linear_backward_on(Isa::active(), params, shape, a, h, dh, h0, da, db, dh0)
}

/// [`linear_backward`] on a chosen instruction set.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_on<E: Element>(
    isa: Isa,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
    da: &mut [E],
    db: &mut [E],
    dh0: &mut [E],
) -> Result<()> {
    isa.check()?;
    validate_backward(
        &shape,
        a.len(),
        h.len(),
        dh.len(),
        h0.map(<[E]>::len),
        da.len(),
        db.len(),
        dh0.len(),
    )?;
    shape.checked_numel::<E>("a")?;
    if shape.len == 0 {
        // no step: the initial state reaches no output
        dh0.fill(E::from_acc(<E::Acc as Accum>::ZERO));
        return Ok(());
    }
    if da.is_empty() {
        return Ok(());
    }
    cpu::backward(isa, params.reverse, shape, a, h, dh, h0, da, db, dh0);
    Ok(())
}

/// Allocating convenience for [`linear_backward`].
pub fn linear_backward_alloc<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    let n = shape.checked_numel::<E>("a")?;
    let s = shape.state_numel("dh0")?;
    let mut grads = LinearGrads {
        da: vec![E::default(); n],
        db: vec![E::default(); n],
        dh0: vec![E::default(); s],
    };
    linear_backward(
        params,
        shape,
        a,
        h,
        dh,
        h0,
        &mut grads.da,
        &mut grads.db,
        &mut grads.dh0,
    )?;
    Ok(grads)
}
