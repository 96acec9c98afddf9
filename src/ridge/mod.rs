//! Batched ridge regression (CPU): `ridge.cv` (one design matrix, many targets, an alpha per
//! target by cross-validation; see [`cv()`]), `ridge.banded_cv` (several feature spaces, a
//! weight per space and an alpha per target by cross-validation; see [`banded_cv()`] and
//! [`split_scores()`]), `ridge.solve_batched` (many independent small problems) and
//! `ridge.score` (R² and Pearson per target).
//!
//! Small problems: the products (XᵀX or XXᵀ, XᵀY) run in the accumulator type (f32, f64 for
//! f64) on the SIMD register tiles of `cpu::gemm`; the Cholesky factorization of XᵀX + αI
//! (n ≥ p) or of the dual XXᵀ + αI (n < p, then w = Xᵀ(XXᵀ + αI)⁻¹Y) and the triangular
//! solves run in f64 (p³/3 against the products' n·p², and f64 keeps them stable). One task
//! per problem: results do not depend on the thread count.
//!
//! # Example
//!
//! A voxelwise encoding model: one design, many targets, an alpha per target chosen by
//! cross-validation, then predictions and their scores.
//!
//! ```
//! use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
//!
//! let shape = RidgeShape { samples: 60, features: 3, targets: 2 };
//! let x: Vec<f64> = (0..60 * 3).map(|i| ((i * 37 % 11) as f64 - 5.0) / 5.0).collect();
//! // target 0 = 2·x0 − x2 exactly; target 1 = x1 plus a deterministic wobble
//! let y: Vec<f64> = (0..60)
//!     .flat_map(|r| {
//!         let row = &x[r * 3..r * 3 + 3];
//!         [2.0 * row[0] - row[2], row[1] + 0.3 * ((r * 7 % 5) as f64 - 2.0)]
//!     })
//!     .collect();
//! let folds: Vec<i32> = (0..60).map(|r| r % 3).collect();
//! let alphas = [1e-3, 1.0, 1e3];
//! let inputs = CvInputs { x: &x, y: &y, alphas: &alphas, folds: &folds };
//!
//! let fit = ridge::cv(&CvParams::new(), shape, &inputs, None)?;
//! assert_eq!(fit.best_alpha[0], 1e-3); // a noiseless target wants little shrinkage
//! assert!((fit.w[0] - 2.0).abs() < 1e-2); // w [p, t]: w[feature 0, target 0]
//!
//! let y_hat = ridge::predict(shape, &x, &fit.w, Some(&fit.intercept))?;
//! let scores = ridge::score(shape, &y, &y_hat)?;
//! assert!(scores.r2[0] > 0.999 && scores.pearson[1] > 0.5);
//! # Ok::<(), neurokernels::Error>(())
//! ```

use crate::cpu::gemm::{Strided, gemm_acc};
use crate::cpu::{Isa, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element, widened};
use crate::error::{Error, Result, check_backed, check_len};
use rayon::prelude::*;

pub mod banded;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cv;
pub use banded::{
    BandedFit, BandedInputs, BandedProgress, BandedShape, SplitScores, banded_cv, split_scores,
};
pub use cv::{CvFit, CvInputs, CvParams, CvProgress, CvScore, RidgeReal, cv, predict};

/// The sizes of one design and its targets: `x [samples, features]`, `y [samples,
/// targets]`, `w [features, targets]` (`ridge.cv`, `ridge.predict`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RidgeShape {
    /// Rows of x and y (n).
    pub samples: usize,
    /// Columns of x (p).
    pub features: usize,
    /// Columns of y (t), each its own regression.
    pub targets: usize,
}

impl RidgeShape {
    /// `[samples, features]` designs with `targets` targets.
    pub fn new(samples: usize, features: usize, targets: usize) -> Self {
        Self {
            samples,
            features,
            targets,
        }
    }

    /// From the dims of `x [n, p]` and `y [n, t]`.
    pub fn from_dims(x: &[usize], y: &[usize]) -> Result<Self> {
        let [n, p] = *x else {
            return Err(Error::shape("x", "rank 2 [n, p]", format!("{x:?}")));
        };
        match *y {
            [m, t] if m == n => Ok(Self::new(n, p, t)),
            _ => Err(Error::shape("y", format!("[{n}, t]"), format!("{y:?}"))),
        }
    }

    /// (n·p, p·t, n·t), checked.
    pub(crate) fn sizes(&self) -> Result<(usize, usize, usize)> {
        let Self {
            samples: n,
            features: p,
            targets: t,
        } = *self;
        let over = |tensor: &str| Error::overflow(tensor, format!("{self:?} overflows"));
        let fits = |v: Option<usize>| v.filter(|v| v.checked_mul(8).is_some());
        Ok((
            fits(n.checked_mul(p)).ok_or_else(|| over("x"))?,
            fits(p.checked_mul(t)).ok_or_else(|| over("w"))?,
            fits(n.checked_mul(t)).ok_or_else(|| over("y"))?,
        ))
    }
}

/// The per-target scores of `ridge.score`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Scores<E> {
    /// `[t]`: the coefficient of determination.
    pub r2: Vec<E>,
    /// `[t]`: the Pearson correlation of prediction and target.
    pub pearson: Vec<E>,
}

/// Sizes of `ridge.solve_batched`: G problems, each `x [n, p]`, `y [n, t]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchedShape {
    /// G, the independent problems.
    pub problems: usize,
    /// n, the rows of each x and y.
    pub samples: usize,
    /// p, the columns of each x.
    pub features: usize,
    /// t, the columns of each y.
    pub targets: usize,
}

impl BatchedShape {
    /// From the dims in field order (G, n, p, t).
    pub fn new(problems: usize, samples: usize, features: usize, targets: usize) -> Self {
        Self {
            problems,
            samples,
            features,
            targets,
        }
    }

    /// (G·n·p, G·n·t, G·p·t), checked.
    fn sizes(&self) -> Result<(usize, usize, usize)> {
        let over = || Error::overflow("x", format!("{self:?} overflows"));
        let prod = |a: usize, b: usize, c: usize| {
            a.checked_mul(b)
                .and_then(|x| x.checked_mul(c))
                .filter(|x| x.checked_mul(8).is_some())
        };
        let g = self.problems;
        Ok((
            prod(g, self.samples, self.features).ok_or_else(over)?,
            prod(g, self.samples, self.targets).ok_or_else(over)?,
            prod(g, self.features, self.targets).ok_or_else(over)?,
        ))
    }
}

/// Every alpha finite, > 0 and not subnormal, or an `Err` naming the problem.
fn check_alpha<E: Element>(alpha: &[E]) -> Result<()> {
    match alpha.iter().position(|a| !cv::usable_alpha(a.to_f64())) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "alpha",
            format!(
                "must be finite, > 0 and not subnormal (problem {i} has {})",
                alpha[i].to_f64()
            ),
        )),
    }
}

/// No NaN or Inf in `c`: a branch-free pass (vectorizes).
fn all_finite<E: Element>(c: &[E]) -> bool {
    c.iter().fold(true, |ok, v| ok & v.to_f64().is_finite())
}

pub(super) fn check_finite<E: Element>(name: &str, x: &[E]) -> Result<()> {
    // chunks in parallel; the position only on failure
    if x.par_chunks(1 << 16).all(all_finite) {
        return Ok(());
    }
    match x.iter().position(|v| !v.to_f64().is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            name,
            format!(
                "holds a non-finite value ({}) at flat index {i}",
                x[i].to_f64()
            ),
        )),
    }
}

/// `ridge.solve_batched`: w_g = argmin |X_g w − Y_g|² + α_g |w|² for every problem g; returns
/// `w [G, p, t]`. Errors name the tensor: wrong lengths, NaN/Inf in x or y, an alpha ≤ 0 or
/// NaN.
pub fn solve_batched<E: Element>(
    shape: BatchedShape,
    x: &[E],
    y: &[E],
    alpha: &[E],
) -> Result<Vec<E>> {
    E::ridge_solve_batched(shape, x, y, alpha)
}

/// The CPU batched solve, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn solve_batched_impl<E: Element>(
    shape: BatchedShape,
    x: &[E],
    y: &[E],
    alpha: &[E],
) -> Result<Vec<E>> {
    let (xs, ys, ws) = shape.sizes()?;
    let BatchedShape {
        problems: g,
        samples: n,
        features: p,
        targets: t,
    } = shape;
    check_len("x", x.len(), xs, &format!("[{g}, {n}, {p}]"))?;
    check_len("y", y.len(), ys, &format!("[{g}, {n}, {t}]"))?;
    check_len("alpha", alpha.len(), g, &format!("[{g}]"))?;
    if n == 0 {
        // rule 3 of crate::error: with no rows, x and y do not carry p and t of w [G, p, t]
        check_backed("x", "p and t (n = 0 rows)", ws, alpha.len())?;
    }
    // The NaN/Inf checks of x and y run per problem, on data the solve is about to read
    // from cache (a separate pass over the inputs cost a whole extra read from DRAM). On
    // any failure the full checks run in the documented order (x, y, then alpha), so the
    // error is the same as that of checking up front.
    let checks_in_order = |failure: Error| -> Result<Vec<E>> {
        check_finite("x", x)?;
        check_finite("y", y)?;
        Err(failure)
    };
    if let Err(e) = check_alpha(alpha) {
        return checks_in_order(e);
    }
    let mut w = vec![E::default(); ws];
    if ws == 0 {
        return Ok(w);
    }
    let solved = w
        .par_chunks_mut(p * t)
        .enumerate()
        .try_for_each(|(gi, out)| {
            let xg = &x[gi * n * p..(gi + 1) * n * p];
            let yg = &y[gi * n * t..(gi + 1) * n * t];
            if !(all_finite(xg) && all_finite(yg)) {
                // replaced by the error of checks_in_order, which finds this value
                return Err(Error::invalid("x", "holds a non-finite value"));
            }
            let sol = solve_one(n, p, t, xg, yg, alpha[gi].to_f64())
                .map_err(|e| Error::invalid("x", format!("problem {gi}: {e}")))?;
            for (o, v) in out.iter_mut().zip(&sol) {
                *o = E::from_f64(*v);
            }
            Ok::<(), Error>(())
        });
    match solved {
        Ok(()) => Ok(w),
        Err(e) => checks_in_order(e),
    }
}

/// One problem: the products (Gram matrix, right-hand sides, back-projection) in the
/// accumulator type with the register-tiled SIMD kernels of `cpu::gemm`, the factorization
/// and the triangular solves in f64. Returns w [p, t] (row-major, f64).
fn solve_one<E: Element>(
    n: usize,
    p: usize,
    t: usize,
    x: &[E],
    y: &[E],
    alpha: f64,
) -> std::result::Result<Vec<f64>, String> {
    dispatch(
        Isa::active(),
        Problem {
            n,
            p,
            t,
            x,
            y,
            alpha,
        },
    )
}

struct Problem<'a, E: Element> {
    n: usize,
    p: usize,
    t: usize,
    x: &'a [E],
    y: &'a [E],
    alpha: f64,
}

impl<E: Element> SimdKernel for Problem<'_, E> {
    type Output = std::result::Result<Vec<f64>, String>;
    #[inline(always)]
    fn run<S: Simd>(self) -> Self::Output {
        let Self {
            n,
            p,
            t,
            x,
            y,
            alpha,
        } = self;
        let zero = <E::Acc as Accum>::ZERO;
        // f32 and f64 inputs are read in place; halves are widened once
        let (xa, ya) = (widened(x), widened(y));
        // Xᵀ read through strides: element (i, k) of Xᵀ is x[k][i]
        let xt = Strided {
            ptr: xa.as_ptr(),
            row_stride: 1,
            inner_stride: p,
        };
        let widen = |v: &[E::Acc]| v.iter().map(|a| a.to_f64()).collect::<Vec<f64>>();
        if n >= p {
            // (XᵀX + αI) w = XᵀY
            let (mut gram, mut rhs) = (vec![zero; p * p], vec![zero; p * t]);
            // SAFETY: xa is n×p, ya n×t, gram p×p and rhs p×t, all live and disjoint.
            unsafe {
                product::<S, E::Acc>(true, p, p, n, xt, xa.as_ptr(), p, gram.as_mut_ptr(), p);
                product::<S, E::Acc>(false, p, t, n, xt, ya.as_ptr(), t, rhs.as_mut_ptr(), t);
            }
            let mut gram = widen(&gram);
            for a in 0..p {
                gram[a * p + a] += alpha;
            }
            let mut w = widen(&rhs);
            // SAFETY: gram is p×p and w p×t.
            unsafe { cholesky_solve::<S>(&mut gram, p, &mut w, t)? };
            Ok(w)
        } else {
            // w = Xᵀ (XXᵀ + αI)⁻¹ Y
            let mut x_transposed = vec![zero; p * n];
            for i in 0..n {
                for k in 0..p {
                    x_transposed[k * n + i] = xa[i * p + k];
                }
            }
            let mut kernel = vec![zero; n * n];
            let rows = Strided {
                ptr: xa.as_ptr(),
                row_stride: p,
                inner_stride: 1,
            };
            // SAFETY: xa is n×p, x_transposed p×n, kernel n×n, all live and disjoint.
            unsafe {
                product::<S, E::Acc>(
                    true,
                    n,
                    n,
                    p,
                    rows,
                    x_transposed.as_ptr(),
                    n,
                    kernel.as_mut_ptr(),
                    n,
                );
            }
            let mut kernel = widen(&kernel);
            for i in 0..n {
                kernel[i * n + i] += alpha;
            }
            let mut coef = widen(&ya);
            // SAFETY: kernel is n×n and coef n×t.
            unsafe { cholesky_solve::<S>(&mut kernel, n, &mut coef, t)? };
            let coef: Vec<E::Acc> = coef
                .iter()
                .map(|v| <E::Acc as Accum>::from_f64(*v))
                .collect();
            let mut w = vec![zero; p * t];
            // SAFETY: xa is n×p (read as Xᵀ), coef n×t, w p×t, all live and disjoint.
            unsafe {
                gemm_acc::<S, E::Acc>(p, t, n, xt, coef.as_ptr(), t, w.as_mut_ptr(), t, false);
            }
            Ok(widen(&w))
        }
    }
}

/// Rows of the inner dimension per pass of [`product`]: the slices of both operands stay in
/// L1 while every register tile of C uses them (a problem's X is larger than L1).
const DEPTH_CHUNK: usize = 64;

/// C += A·B (`m × n`, inner dimension `k`) in passes over chunks of the inner dimension,
/// each element still summed in order. With `lower`, C is square and only its lower
/// triangle is wanted (a symmetric product: the factorization reads only that half): blocks
/// of six rows run to their last row's diagonal rounded up to whole vectors (a few entries
/// above the diagonal get written, and are never read).
///
/// # Safety
/// As [`gemm_acc`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn product<S: Simd, A: Accum>(
    lower: bool,
    m: usize,
    n: usize,
    k: usize,
    a: Strided<A>,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
) {
    const ROWS: usize = 6;
    let lanes = A::lanes::<S>();
    let mut k0 = 0;
    while k0 < k {
        let depth = DEPTH_CHUNK.min(k - k0);
        // SAFETY: the chunk's rows of B and columns of A lie inside the operands.
        let (a_chunk, b_chunk) = unsafe {
            (
                Strided {
                    ptr: a.ptr.add(k0 * a.inner_stride),
                    ..a
                },
                b.add(k0 * b_stride),
            )
        };
        if lower {
            let mut r0 = 0;
            while r0 < m {
                let rows = ROWS.min(m - r0);
                let cols = (r0 + rows).next_multiple_of(lanes).min(n);
                // SAFETY: rows r0..r0+rows and columns ..cols lie inside the m × n product.
                unsafe {
                    let block_a = Strided {
                        ptr: a_chunk.ptr.add(r0 * a.row_stride),
                        ..a_chunk
                    };
                    let c_rows = c.add(r0 * c_stride);
                    gemm_acc::<S, A>(
                        rows, cols, depth, block_a, b_chunk, b_stride, c_rows, c_stride, false,
                    );
                }
                r0 += rows;
            }
        } else {
            // SAFETY: as the caller guarantees for the whole product.
            unsafe {
                gemm_acc::<S, A>(m, n, depth, a_chunk, b_chunk, b_stride, c, c_stride, false)
            };
        }
        k0 += depth;
    }
}

/// Columns per block of the factorization: each diagonal block is factored column by column,
/// everything else is [`gemm_acc`] updates on f64 register tiles.
const FACTOR_BLOCK: usize = 16;

/// Solves A·X = B in place for a symmetric positive definite A (m×m, its lower triangle
/// read; overwritten by the Cholesky factor) and B (m×t, overwritten by X), all in f64.
/// Blocked right-looking Cholesky: per block of columns, the diagonal block is factored, the
/// panel below it solved in transposed form (contiguous rows, so the axpys vectorize), and
/// the trailing lower triangle updated by a register-tiled product; the two triangular solves
/// are blocked the same way. The summation order is fixed.
///
/// # Safety
/// `a` holds m·m and `b` m·t values (checked by debug assertions only).
#[inline(always)]
unsafe fn cholesky_solve<S: Simd>(
    a: &mut [f64],
    m: usize,
    b: &mut [f64],
    t: usize,
) -> std::result::Result<(), String> {
    debug_assert!(a.len() >= m * m && b.len() >= m * t);
    // the transposed panel and its negation, [block columns][rows below]
    let mut panel = vec![0.0f64; FACTOR_BLOCK * m];
    let mut negated = vec![0.0f64; FACTOR_BLOCK * m.max(t)];
    let mut k0 = 0;
    while k0 < m {
        let k1 = (k0 + FACTOR_BLOCK).min(m);
        let nb = k1 - k0;
        // the diagonal block, column by column
        for j in k0..k1 {
            let d = a[j * m + j];
            if d.is_nan() || d <= 0.0 {
                return Err(format!(
                    "the regularized Gram matrix is not positive definite (pivot {j}: {d})"
                ));
            }
            let d = d.sqrt();
            a[j * m + j] = d;
            let inv = 1.0 / d;
            for i in j + 1..k1 {
                a[i * m + j] *= inv;
            }
            for i in j + 1..k1 {
                let li = a[i * m + j];
                for c in j + 1..=i {
                    a[i * m + c] -= li * a[c * m + j];
                }
            }
        }
        let below = m - k1;
        if below > 0 {
            // panel: L21 = A21 · L11⁻ᵀ, solved on its transpose (row c of `panel` is column
            // k0 + c of the panel)
            for c in 0..nb {
                for i in 0..below {
                    panel[c * below + i] = a[(k1 + i) * m + k0 + c];
                }
            }
            for c in 0..nb {
                let (done, rest) = panel.split_at_mut(c * below);
                let row = &mut rest[..below];
                for c2 in 0..c {
                    let l = a[(k0 + c) * m + k0 + c2];
                    for (x, z) in row.iter_mut().zip(&done[c2 * below..(c2 + 1) * below]) {
                        *x -= l * z;
                    }
                }
                let inv = 1.0 / a[(k0 + c) * m + k0 + c];
                row.iter_mut().for_each(|x| *x *= inv);
            }
            for c in 0..nb {
                for i in 0..below {
                    a[(k1 + i) * m + k0 + c] = panel[c * below + i];
                }
            }
            // trailing update: A22 −= L21·L21ᵀ (lower triangle)
            for (o, v) in negated.iter_mut().zip(&panel[..nb * below]) {
                *o = -v;
            }
            let minus_l21 = Strided {
                ptr: negated.as_ptr(),
                row_stride: 1,
                inner_stride: below,
            };
            // SAFETY: `negated` is nb × below, `panel` nb × below, and the trailing block
            // (below × below at row/column k1, stride m) lies inside `a`, disjoint from both.
            unsafe {
                product::<S, f64>(
                    true,
                    below,
                    below,
                    nb,
                    minus_l21,
                    panel.as_ptr(),
                    below,
                    a.as_mut_ptr().add(k1 * m + k1),
                    m,
                );
            }
        }
        k0 = k1;
    }
    // L z = b: per block of rows, the diagonal block by row axpys, then the rows below
    // updated by one product (B[k1..] −= L[k1.., k0..k1] · Z[k0..k1])
    let mut k0 = 0;
    while k0 < m {
        let k1 = (k0 + FACTOR_BLOCK).min(m);
        for i in k0..k1 {
            let (done, rest) = b.split_at_mut(i * t);
            let row = &mut rest[..t];
            for k in k0..i {
                let l = a[i * m + k];
                for (x, z) in row.iter_mut().zip(&done[k * t..(k + 1) * t]) {
                    *x -= l * z;
                }
            }
            let inv = 1.0 / a[i * m + i];
            row.iter_mut().for_each(|x| *x *= inv);
        }
        if k1 < m {
            let nb = k1 - k0;
            for (o, v) in negated.iter_mut().zip(&b[k0 * t..k1 * t]) {
                *o = -v;
            }
            let l_block = Strided {
                ptr: a[k1 * m + k0..].as_ptr(),
                row_stride: m,
                inner_stride: 1,
            };
            // SAFETY: L[k1.., k0..k1] lies in `a`, −Z (nb × t) in `negated`, the updated rows
            // k1.. of `b` are disjoint from both.
            unsafe {
                gemm_acc::<S, f64>(
                    m - k1,
                    t,
                    nb,
                    l_block,
                    negated.as_ptr(),
                    t,
                    b.as_mut_ptr().add(k1 * t),
                    t,
                    false,
                );
            }
        }
        k0 = k1;
    }
    // Lᵀ x = z: blocks from the bottom; the rows above updated by one product
    // (B[..k0] −= L[k0..k1, ..k0]ᵀ · X[k0..k1])
    let mut k1 = m;
    while k1 > 0 {
        let k0 = k1.saturating_sub(FACTOR_BLOCK);
        for i in (k0..k1).rev() {
            let (head, tail) = b.split_at_mut((i + 1) * t);
            let row = &mut head[i * t..];
            for k in i + 1..k1 {
                let l = a[k * m + i];
                for (x, z) in row.iter_mut().zip(&tail[(k - i - 1) * t..(k - i) * t]) {
                    *x -= l * z;
                }
            }
            let inv = 1.0 / a[i * m + i];
            row.iter_mut().for_each(|x| *x *= inv);
        }
        if k0 > 0 {
            let nb = k1 - k0;
            for (o, v) in negated.iter_mut().zip(&b[k0 * t..k1 * t]) {
                *o = -v;
            }
            // element (i, c) of L[k0..k1, ..k0]ᵀ is a[(k0 + c)·m + i]
            let l_block_t = Strided {
                ptr: a[k0 * m..].as_ptr(),
                row_stride: 1,
                inner_stride: m,
            };
            // SAFETY: as above; rows ..k0 of `b` are disjoint from `negated`.
            unsafe {
                gemm_acc::<S, f64>(
                    k0,
                    t,
                    nb,
                    l_block_t,
                    negated.as_ptr(),
                    t,
                    b.as_mut_ptr(),
                    t,
                    false,
                );
            }
        }
        k1 = k0;
    }
    Ok(())
}

/// The lengths of `ridge.score`'s inputs (shared by the CPU, CUDA host and device paths):
/// both `[samples, targets]`; returns samples · targets.
fn check_score_lens(
    samples: usize,
    targets: usize,
    y_true_len: usize,
    y_pred_len: usize,
) -> Result<usize> {
    let len = samples
        .checked_mul(targets)
        .ok_or_else(|| Error::overflow("y_true", "n·t overflows"))?;
    let shape = format!("[{samples}, {targets}]");
    check_len("y_true", y_true_len, len, &shape)?;
    check_len("y_pred", y_pred_len, len, &shape)?;
    if samples == 0 {
        // rule 3 of crate::error: with no rows, no input carries t of the [t] outputs
        check_backed("y_true", "t (n = 0 rows)", targets, 0)?;
    }
    Ok(len)
}

/// The checks of `ridge.score`'s host inputs (CPU and CUDA host paths): the lengths, and no
/// NaN/Inf; returns samples · targets.
fn check_score_inputs<E: Element>(
    samples: usize,
    targets: usize,
    y_true: &[E],
    y_pred: &[E],
) -> Result<usize> {
    let len = check_score_lens(samples, targets, y_true.len(), y_pred.len())?;
    check_finite("y_true", y_true)?;
    check_finite("y_pred", y_pred)?;
    Ok(len)
}

/// `ridge.score`: per target column of `y_true [n, t]` and `y_pred [n, t]`, returns
/// `r2 [t]` and `pearson [t]`, computed in f64 in two passes:
/// R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)², and 0 where Σ(y − ȳ)² is exactly 0 (a constant target);
/// Pearson = Σ(y − ȳ)(ŷ − ŷ̄) / √(Σ(y − ȳ)² Σ(ŷ − ŷ̄)²), and 0 where that denominator is 0
/// (himalaya's conventions). R² saturates at the element type's lowest finite value (−65504
/// in f16) rather than overflow to −inf. `shape.features` is not used.
pub fn score<E: Element>(shape: RidgeShape, y_true: &[E], y_pred: &[E]) -> Result<Scores<E>> {
    E::ridge_score(shape, y_true, y_pred)
}

/// The CPU scores, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn score_impl<E: Element>(
    shape: RidgeShape,
    y_true: &[E],
    y_pred: &[E],
) -> Result<Scores<E>> {
    let (samples, targets) = (shape.samples, shape.targets);
    check_score_inputs(samples, targets, y_true, y_pred)?;
    let (mut r2, mut pearson) = (vec![E::default(); targets], vec![E::default(); targets]);
    if samples == 0 {
        return Ok(Scores { r2, pearson });
    }
    // Column blocks in parallel; within a block the rows are read in order (contiguous
    // slices of each row), each column summed over the rows in order, in f64.
    const COLUMNS: usize = 256;
    r2.par_chunks_mut(COLUMNS)
        .zip(pearson.par_chunks_mut(COLUMNS))
        .enumerate()
        .for_each(|(block, (r2, pearson))| {
            let (c0, width) = (block * COLUMNS, r2.len());
            fn rows<E>(
                v: &[E],
                c0: usize,
                n: usize,
                t: usize,
                w: usize,
            ) -> impl Iterator<Item = &[E]> {
                (0..n).map(move |i| &v[c0 + i * t..c0 + i * t + w])
            }
            let rows = |v| rows(v, c0, samples, targets, width);
            let (mut mean_t, mut mean_p) = (vec![0.0f64; width], vec![0.0f64; width]);
            for (rt, rp) in rows(y_true).zip(rows(y_pred)) {
                for j in 0..width {
                    mean_t[j] += rt[j].to_f64();
                    mean_p[j] += rp[j].to_f64();
                }
            }
            mean_t
                .iter_mut()
                .chain(mean_p.iter_mut())
                .for_each(|m| *m /= samples as f64);
            let mut sums = vec![[0.0f64; 4]; width]; // ss_tot, ss_res, ss_pred, cross
            for (rt, rp) in rows(y_true).zip(rows(y_pred)) {
                for j in 0..width {
                    let (yt, yp) = (rt[j].to_f64(), rp[j].to_f64());
                    let (a, b) = (yt - mean_t[j], yp - mean_p[j]);
                    let s = &mut sums[j];
                    s[0] += a * a;
                    s[1] += (yt - yp) * (yt - yp);
                    s[2] += b * b;
                    s[3] += a * b;
                }
            }
            for (j, [ss_tot, ss_res, ss_pred, cross]) in sums.into_iter().enumerate() {
                // R² has no lower bound: it saturates at the element type's lowest finite
                // value (−65504 in f16) instead of becoming −inf
                let lowest = -E::DTYPE.max_finite();
                r2[j] = E::from_f64(if ss_tot == 0.0 {
                    0.0
                } else {
                    (1.0 - ss_res / ss_tot).max(lowest)
                });
                let denom = (ss_tot * ss_pred).sqrt();
                pearson[j] = E::from_f64(if denom == 0.0 { 0.0 } else { cross / denom });
            }
        });
    Ok(Scores { r2, pearson })
}
