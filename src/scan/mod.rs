//! Linear-recurrence scans. `scan.linear`: h\[t\] = a\[t\]·h\[t-1\] + b\[t\], elementwise over
//! channels, on tensors laid out `[B, T, D]` (channels contiguous), and its backward.
//!
//! CPU entry points take slices; CUDA ones (`scan::cuda`, feature `cuda`) take device slices and
//! a stream. All validate shapes up front and return `Err` naming the tensor.
//!
//! # Example
//!
//! A forward and its backward, then Mamba's selective scan ([`selective`]); gated linear
//! attention ([`gla`]) follows the same pattern.
//!
//! ```
//! use neurokernels::scan::{self, ScanParams, ScanShape};
//! use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
//!
//! let shape = ScanShape::from_dims("a", &[1, 4, 2])?; // [B, T, D]
//! let a = vec![0.5f32; 8];
//! let b = vec![1.0f32; 8];
//! let h = scan::linear(&ScanParams::new(), shape, &a, &b, None)?;
//! assert_eq!(h[6..8], [1.875; 2]); // 1, 1.5, 1.75, 1.875
//!
//! // gradients of sum(h): dh = 1
//! let grads = scan::linear_backward(&ScanParams::new(), shape, &a, &h, &[1.0; 8], None)?;
//! assert_eq!(grads.db[0], 1.875); // 1 + 0.5 + 0.25 + 0.125
//!
//! // Mamba: u, delta [B, T, D]; A [D, N]; Bm, Cm [B, T, N]
//! let s = SelectiveShape::from_dims(&[1, 4, 2], &[2, 3])?;
//! let (u, delta) = (vec![1.0f32; 8], vec![0.1f32; 8]);
//! let (a, bm, cm) = (vec![-1.0f32; 6], vec![1.0f32; 12], vec![1.0f32; 12]);
//! let inputs = SelectiveInputs::new(&u, &delta, &a, &bm, &cm);
//! let out = selective::selective(&SelectiveParams::new().delta_softplus(true), s, &inputs)?;
//! assert_eq!((out.y.len(), out.h_last.len()), (8, 6)); // y [B, T, D], h_last [B, D, N]
//! # Ok::<(), neurokernels::Error>(())
//! ```

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gla;
pub mod selective;

use crate::cpu::Isa;
use crate::element::{Accum, Element};
use crate::error::{Error, Result};

/// Parameters of `scan.linear` and `scan.linear_backward`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScanParams {
    /// Run the recurrence from t = T-1 down to 0: h\[t\] = a\[t\]·h\[t+1\] + b\[t\], with h0
    /// entering at t = T-1.
    pub reverse: bool,
}

impl ScanParams {
    /// The defaults: a forward-in-time scan (`reverse` false).
    pub fn new() -> Self {
        Self::default()
    }

    /// Scan from t = T-1 down to 0 (default false): `h[t] = a[t]·h[t+1] + b[t]`, with h0
    /// entering at t = T-1.
    pub fn reverse(mut self, reverse: bool) -> Self {
        self.reverse = reverse;
        self
    }
}

/// The shape `[batch, len, channels]` = `[B, T, D]` of a linear scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanShape {
    /// B, the number of independent sequences.
    pub batch: usize,
    /// T, the time steps of each sequence.
    pub len: usize,
    /// D, the channels, each scanned independently (complex scans: complex channels).
    pub channels: usize,
}

impl ScanShape {
    /// `[batch, len, channels]` = `[B, T, D]`.
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
}

impl std::fmt::Display for ScanShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}, {}]", self.batch, self.len, self.channels)
    }
}

pub(crate) use crate::error::check_len;

/// Real or complex scans; a complex channel is two interleaved floats (re, im).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Numbers {
    /// Real channels: tensors `[B, T, D]`, states `[B, D]`.
    Real,
    /// Complex channels: tensors `[B, T, D, 2]`, states `[B, D, 2]` (real, imaginary last).
    Complex,
}

impl Numbers {
    pub(crate) fn width(self) -> usize {
        match self {
            Numbers::Real => 1,
            Numbers::Complex => 2,
        }
    }

    fn dims(self, shape: &ScanShape) -> (String, String) {
        let (b, t, d) = (shape.batch, shape.len, shape.channels);
        match self {
            Numbers::Real => (format!("[{b}, {t}, {d}]"), format!("[{b}, {d}]")),
            Numbers::Complex => (format!("[{b}, {t}, {d}, 2]"), format!("[{b}, {d}, 2]")),
        }
    }

    /// (elements of a [B, T, D(, 2)] tensor, elements of a [B, D(, 2)] state), checked to
    /// fit in `isize` bytes of `E` (so every element index also fits the CUDA kernels' i64).
    pub(crate) fn sizes<E: Element>(self, shape: &ScanShape) -> Result<(usize, usize)> {
        let n = shape.numel("a")?.checked_mul(self.width());
        let s = shape.state_numel("h0")?.checked_mul(self.width());
        let fits = |x: usize| {
            x.checked_mul(E::DTYPE.size_bytes())
                .is_some_and(|b| b <= isize::MAX as usize)
        };
        match n.zip(s) {
            Some((n, s)) if fits(n) && fits(s) => Ok((n, s)),
            _ => Err(Error::overflow(
                "a",
                format!("{shape} of {} exceeds isize::MAX bytes", E::DTYPE),
            )),
        }
    }

    /// The shape the CPU kernels walk: rows of D·width floats (validated sizes only).
    pub(crate) fn float_shape(self, shape: ScanShape) -> ScanShape {
        ScanShape::new(shape.batch, shape.len, shape.channels * self.width())
    }
}

/// Sizes checked once for a forward call: (elements of a, elements of h0).
pub(crate) fn validate_forward<E: Element>(
    numbers: Numbers,
    shape: &ScanShape,
    a: usize,
    b: usize,
    h0: Option<usize>,
    h: usize,
) -> Result<(usize, usize)> {
    let (n, s) = numbers.sizes::<E>(shape)?;
    let (dims, state_dims) = numbers.dims(shape);
    check_len("a", a, n, &dims)?;
    check_len("b", b, n, &dims)?;
    if let Some(h0) = h0 {
        check_len("h0", h0, s, &state_dims)?;
    }
    check_len("h", h, n, &dims)?;
    Ok((n, s))
}

/// Sizes checked once for a backward call.
#[allow(clippy::too_many_arguments)]
pub(crate) fn validate_backward<E: Element>(
    numbers: Numbers,
    shape: &ScanShape,
    a: usize,
    h: usize,
    dh: usize,
    h0: Option<usize>,
    da: usize,
    db: usize,
    dh0: usize,
) -> Result<(usize, usize)> {
    let (n, s) = numbers.sizes::<E>(shape)?;
    let (dims, state_dims) = numbers.dims(shape);
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

/// `scan.linear` on the CPU: returns `h [B, T, D]`, the state after every step.
///
/// `a` and `b` are `[B, T, D]`; `h0 [B, D]` is the state before the first step (zeros when
/// `None`). Accumulates in f32 (f64 for f64). Deterministic: the result does not depend on
/// the thread count.
pub fn linear<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    forward_alloc(Numbers::Real, params, shape, a, b, h0, E::scan_linear)
}

/// [`linear`] into the caller's `h [B, T, D]`.
pub fn linear_into<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    E::scan_linear(Isa::active(), params, shape, a, b, h0, h)
}

/// [`linear_into`] on a chosen instruction set (`Err` if this CPU lacks it): for tests that
/// compare the SIMD and scalar paths, and for benchmarks. With AVX-512 the forward of wide
/// f32/f64 rows runs its AVX2 loop, which is faster there (memory-bound; see
/// `cpu::streaming_isa`).
#[doc(hidden)]
pub fn linear_into_on<E: Element>(
    isa: Isa,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    E::scan_linear(isa, params, shape, a, b, h0, h)
}

/// The CPU forward for either kind of number, validated (instantiated per dtype in
/// [`crate::dispatch`]).
pub(crate) fn forward_on<E: Element, F: cpu::Algebra>(
    isa: Isa,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    isa.check()?;
    let numbers = F::NUMBERS;
    validate_forward::<E>(
        numbers,
        &shape,
        a.len(),
        b.len(),
        h0.map(<[E]>::len),
        h.len(),
    )?;
    if h.is_empty() {
        return Ok(());
    }
    cpu::forward::<E, F>(isa, params.reverse, numbers.float_shape(shape), a, b, h0, h);
    Ok(())
}

/// A forward entry point of [`crate::dispatch::Kernels`].
type ForwardKernel<E> =
    fn(Isa, &ScanParams, ScanShape, &[E], &[E], Option<&[E]>, &mut [E]) -> Result<()>;

/// The allocating forward: sizes `h` (checking for overflow) and runs `kernel` into it.
fn forward_alloc<E: Element>(
    numbers: Numbers,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    kernel: ForwardKernel<E>,
) -> Result<Vec<E>> {
    let (n, _) = numbers.sizes::<E>(&shape)?;
    // the inputs first: h is sized by the shape only once a and b back it
    validate_forward::<E>(numbers, &shape, a.len(), b.len(), h0.map(<[E]>::len), n)?;
    let mut h = vec![E::default(); n];
    kernel(Isa::active(), params, shape, a, b, h0, &mut h)?;
    Ok(h)
}

/// Gradients of `scan.linear` (and `scan.linear_complex`, interleaved `[.., 2]`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LinearGrads<E> {
    /// `[B, T, D]`: the gradient with respect to `a`.
    pub da: Vec<E>,
    /// `[B, T, D]`: the gradient with respect to `b`.
    pub db: Vec<E>,
    /// `[B, D]`: the gradient with respect to the initial state (also when `h0` was `None`).
    pub dh0: Vec<E>,
}

/// `scan.linear_backward` on the CPU. `h` is the forward output, `dh` the gradient of the
/// loss with respect to it (both `[B, T, D]`). Returns `da`, `db` and `dh0`.
pub fn linear_backward<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    backward_alloc(
        Numbers::Real,
        params,
        shape,
        a,
        h,
        dh,
        h0,
        E::scan_linear_backward,
    )
}

/// [`linear_backward`] into the caller's `da`, `db` (`[B, T, D]`) and `dh0` (`[B, D]`).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_into<E: Element>(
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
    E::scan_linear_backward(Isa::active(), params, shape, a, h, dh, h0, da, db, dh0)
}

/// [`linear_backward_into`] on a chosen instruction set.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_into_on<E: Element>(
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
    E::scan_linear_backward(isa, params, shape, a, h, dh, h0, da, db, dh0)
}

/// The CPU backward for either kind of number, validated (instantiated per dtype in
/// [`crate::dispatch`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_on<E: Element, F: cpu::Algebra>(
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
    let numbers = F::NUMBERS;
    let lens = (a.len(), h.len(), dh.len(), h0.map(<[E]>::len));
    validate_backward::<E>(
        numbers,
        &shape,
        lens.0,
        lens.1,
        lens.2,
        lens.3,
        da.len(),
        db.len(),
        dh0.len(),
    )?;
    if shape.len == 0 {
        // no step: the initial state reaches no output
        dh0.fill(E::from_acc(<E::Acc as Accum>::ZERO));
        return Ok(());
    }
    if da.is_empty() {
        return Ok(());
    }
    cpu::backward::<E, F>(
        isa,
        params.reverse,
        numbers.float_shape(shape),
        a,
        h,
        dh,
        h0,
        da,
        db,
        dh0,
    );
    Ok(())
}

/// A backward entry point of [`crate::dispatch::Kernels`].
type BackwardKernel<E> = fn(
    Isa,
    &ScanParams,
    ScanShape,
    &[E],
    &[E],
    &[E],
    Option<&[E]>,
    &mut [E],
    &mut [E],
    &mut [E],
) -> Result<()>;

/// The allocating backward: sizes the gradients and runs `kernel` into them.
#[allow(clippy::too_many_arguments)]
fn backward_alloc<E: Element>(
    numbers: Numbers,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
    kernel: BackwardKernel<E>,
) -> Result<LinearGrads<E>> {
    let (n, s) = numbers.sizes::<E>(&shape)?;
    // the inputs first: the gradients are sized by the shape only once the inputs back it
    let lens = (a.len(), h.len(), dh.len(), h0.map(<[E]>::len));
    validate_backward::<E>(numbers, &shape, lens.0, lens.1, lens.2, lens.3, n, n, s)?;
    if shape.len == 0 && h0.is_none() {
        // rule 3 of crate::error: with no step and no h0, no input carries B·D of dh0
        crate::error::check_backed("h0", "B·D (T = 0 steps)", s, 0)?;
    }
    let mut g = LinearGrads {
        da: vec![E::default(); n],
        db: vec![E::default(); n],
        dh0: vec![E::default(); s],
    };
    kernel(
        Isa::active(),
        params,
        shape,
        a,
        h,
        dh,
        h0,
        &mut g.da,
        &mut g.db,
        &mut g.dh0,
    )?;
    Ok(g)
}

/// A shape from a complex tensor's dims, which must be `[B, T, D, 2]`.
impl ScanShape {
    /// A shape from a complex tensor's dims, which must be `[B, T, D, 2]`.
    pub fn from_complex_dims(tensor: &str, dims: &[usize]) -> Result<Self> {
        match *dims {
            [batch, len, channels, 2] => Ok(Self::new(batch, len, channels)),
            _ => Err(Error::shape(
                tensor,
                "rank 4 [B, T, D, 2] (real, imaginary last)",
                format!("{dims:?}"),
            )),
        }
    }
}

/// `scan.linear_complex` on the CPU: the same recurrence over complex numbers,
/// h\[t\] = a\[t\]·h\[t-1\] + b\[t\], with `a`, `b` and the returned `h` laid out `[B, T, D, 2]`
/// (real, imaginary interleaved) and `h0` `[B, D, 2]`. Accumulates in f32 (f64 for f64).
pub fn linear_complex<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    forward_alloc(
        Numbers::Complex,
        params,
        shape,
        a,
        b,
        h0,
        E::scan_linear_complex,
    )
}

/// [`linear_complex`] into the caller's `h [B, T, D, 2]`.
pub fn linear_complex_into<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    E::scan_linear_complex(Isa::active(), params, shape, a, b, h0, h)
}

/// [`linear_complex_into`] on a chosen instruction set (with AVX-512, wide f32/f64 rows run
/// the AVX2 loop, as in [`linear_into_on`]).
#[doc(hidden)]
pub fn linear_complex_into_on<E: Element>(
    isa: Isa,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) -> Result<()> {
    E::scan_linear_complex(isa, params, shape, a, b, h0, h)
}

/// Backward of [`linear_complex`]. Gradients follow PyTorch's convention for a real loss L:
/// the gradient of a complex z is dL/dRe(z) + i·dL/dIm(z). With g the gradient of h including
/// the future: g\[s\] = dh\[s\] + conj(a\[s+1\])·g\[s+1\], db = g, da = g·conj(h\[s-1\]),
/// dh0 = conj(a\[0\])·g\[0\]. Returns `da`, `db` (`[B, T, D, 2]`) and `dh0` (`[B, D, 2]`).
pub fn linear_complex_backward<E: Element>(
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    backward_alloc(
        Numbers::Complex,
        params,
        shape,
        a,
        h,
        dh,
        h0,
        E::scan_linear_complex_backward,
    )
}

/// [`linear_complex_backward`] into the caller's `da`, `db` and `dh0`.
#[allow(clippy::too_many_arguments)]
pub fn linear_complex_backward_into<E: Element>(
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
    E::scan_linear_complex_backward(Isa::active(), params, shape, a, h, dh, h0, da, db, dh0)
}

/// [`linear_complex_backward_into`] on a chosen instruction set.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn linear_complex_backward_into_on<E: Element>(
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
    E::scan_linear_complex_backward(isa, params, shape, a, h, dh, h0, da, db, dh0)
}
