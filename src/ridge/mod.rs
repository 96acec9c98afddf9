//! Batched ridge regression (CPU): `ridge.cv` (one design matrix, many targets, an alpha per
//! target by cross-validation; see [`cv`]), `ridge.solve_batched` (many independent small
//! problems) and `ridge.score` (R² and Pearson per target).
//!
//! Small problems: the products (XᵀX or XXᵀ, XᵀY) run in the accumulator type (f32, f64 for
//! f64) on the SIMD register tiles of `cpu::gemm`; the Cholesky factorization of XᵀX + αI
//! (n ≥ p) or of the dual XXᵀ + αI (n < p, then w = Xᵀ(XXᵀ + αI)⁻¹Y) and the triangular
//! solves run in f64 (p³/3 against the products' n·p², and f64 keeps them stable). One task
//! per problem: results do not depend on the thread count.

use crate::cpu::gemm::{Strided, gemm_acc};
use crate::cpu::{Isa, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_len};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cv;
pub use cv::{CvFit, CvInputs, CvParams, CvProgress, CvScore, cv};

/// Sizes of `ridge.solve_batched`: G problems, each `x [n, p]`, `y [n, t]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchedShape {
    pub problems: usize,
    pub samples: usize,
    pub features: usize,
    pub targets: usize,
}

impl BatchedShape {
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

/// Every alpha finite and > 0, or an `Err` naming the problem.
fn check_alpha<E: Element>(alpha: &[E]) -> Result<()> {
    let usable = |a: f64| a.is_finite() && a > 0.0;
    match alpha.iter().position(|a| !usable(a.to_f64())) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            "alpha",
            format!(
                "must be finite and > 0 (problem {i} has {})",
                alpha[i].to_f64()
            ),
        )),
    }
}

fn check_finite<E: Element>(name: &str, x: &[E]) -> Result<()> {
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
    check_finite("x", x)?;
    check_finite("y", y)?;
    check_alpha(alpha)?;
    let mut w = vec![E::default(); ws];
    if ws == 0 {
        return Ok(w);
    }
    w.par_chunks_mut(p * t)
        .enumerate()
        .try_for_each(|(gi, out)| {
            let xg = &x[gi * n * p..(gi + 1) * n * p];
            let yg = &y[gi * n * t..(gi + 1) * n * t];
            let sol = solve_one(n, p, t, xg, yg, alpha[gi].to_f64())
                .map_err(|e| Error::invalid("x", format!("problem {gi}: {e}")))?;
            for (o, v) in out.iter_mut().zip(&sol) {
                *o = E::from_f64(*v);
            }
            Ok::<(), Error>(())
        })?;
    Ok(w)
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
        let xa: Vec<E::Acc> = x.iter().map(|v| v.to_acc()).collect();
        let ya: Vec<E::Acc> = y.iter().map(|v| v.to_acc()).collect();
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
                // the lower triangle only (what the factorization reads), in blocks of rows
                const BLOCK: usize = 16;
                let mut r0 = 0;
                while r0 < p {
                    let rows = BLOCK.min(p - r0);
                    let block_a = Strided {
                        ptr: xt.ptr.add(r0),
                        ..xt
                    };
                    let cols = r0 + rows;
                    gemm_acc::<S, E::Acc>(
                        rows,
                        cols,
                        n,
                        block_a,
                        xa.as_ptr(),
                        p,
                        gram.as_mut_ptr().add(r0 * p),
                        p,
                        false,
                    );
                    r0 += rows;
                }
                gemm_acc::<S, E::Acc>(p, t, n, xt, ya.as_ptr(), t, rhs.as_mut_ptr(), t, false);
            }
            let mut gram = widen(&gram);
            for a in 0..p {
                gram[a * p + a] += alpha;
            }
            let mut w = widen(&rhs);
            cholesky_solve(&mut gram, p, &mut w, t)?;
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
                gemm_acc::<S, E::Acc>(
                    n,
                    n,
                    p,
                    rows,
                    x_transposed.as_ptr(),
                    n,
                    kernel.as_mut_ptr(),
                    n,
                    false,
                );
            }
            let mut kernel = widen(&kernel);
            for i in 0..n {
                kernel[i * n + i] += alpha;
            }
            let mut coef = widen(&ya);
            cholesky_solve(&mut kernel, n, &mut coef, t)?;
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

/// Solves A·X = B in place for a symmetric positive definite A (m×m, its lower triangle
/// read; overwritten by the Cholesky factor) and B (m×t, overwritten by X). Right-looking, so
/// every inner loop is a row update (axpy) that vectorizes where it is inlined into a SIMD
/// kernel; the summation order is fixed.
#[inline(always)]
fn cholesky_solve(
    a: &mut [f64],
    m: usize,
    b: &mut [f64],
    t: usize,
) -> std::result::Result<(), String> {
    let mut col = vec![0.0; m];
    for j in 0..m {
        let d = a[j * m + j];
        if d.is_nan() || d <= 0.0 {
            return Err(format!(
                "the regularized Gram matrix is not positive definite (pivot {j}: {d})"
            ));
        }
        let d = d.sqrt();
        a[j * m + j] = d;
        let inv = 1.0 / d;
        for i in j + 1..m {
            a[i * m + j] *= inv;
            col[i] = a[i * m + j];
        }
        // trailing update of the lower triangle: row i -= l_i · l[j+1..=i]
        for i in j + 1..m {
            let li = col[i];
            let row = &mut a[i * m + j + 1..i * m + i + 1];
            for (x, l) in row.iter_mut().zip(&col[j + 1..=i]) {
                *x -= li * l;
            }
        }
    }
    // L z = b, then Lᵀ x = z: each step updates whole rows of B (t right-hand sides)
    for i in 0..m {
        let d = a[i * m + i];
        let (done, rest) = b.split_at_mut(i * t);
        let row = &mut rest[..t];
        for k in 0..i {
            let l = a[i * m + k];
            for (x, z) in row.iter_mut().zip(&done[k * t..(k + 1) * t]) {
                *x -= l * z;
            }
        }
        let inv = 1.0 / d;
        row.iter_mut().for_each(|x| *x *= inv);
    }
    for i in (0..m).rev() {
        let d = a[i * m + i];
        let (head, tail) = b.split_at_mut((i + 1) * t);
        let row = &mut head[i * t..];
        for k in i + 1..m {
            let l = a[k * m + i];
            for (x, z) in row.iter_mut().zip(&tail[(k - i - 1) * t..(k - i) * t]) {
                *x -= l * z;
            }
        }
        let inv = 1.0 / d;
        row.iter_mut().for_each(|x| *x *= inv);
    }
    Ok(())
}

/// `ridge.score`: per target column of `y_true [n, t]` and `y_pred [n, t]`, returns
/// `(r2 [t], pearson [t])`, computed in f64 in two passes:
/// R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)², and 0 where Σ(y − ȳ)² is exactly 0 (a constant target);
/// Pearson = Σ(y − ȳ)(ŷ − ŷ̄) / √(Σ(y − ȳ)² Σ(ŷ − ŷ̄)²), and 0 where that denominator is 0
/// (himalaya's conventions).
pub fn score<E: Element>(
    samples: usize,
    targets: usize,
    y_true: &[E],
    y_pred: &[E],
) -> Result<(Vec<E>, Vec<E>)> {
    let len = samples
        .checked_mul(targets)
        .ok_or_else(|| Error::overflow("y_true", "n·t overflows"))?;
    let shape = format!("[{samples}, {targets}]");
    check_len("y_true", y_true.len(), len, &shape)?;
    check_len("y_pred", y_pred.len(), len, &shape)?;
    check_finite("y_true", y_true)?;
    check_finite("y_pred", y_pred)?;
    let (mut r2, mut pearson) = (vec![E::default(); targets], vec![E::default(); targets]);
    if samples == 0 {
        return Ok((r2, pearson));
    }
    fn col<E: Element>(
        v: &[E],
        samples: usize,
        targets: usize,
        c: usize,
    ) -> impl Iterator<Item = f64> + '_ {
        (0..samples).map(move |i| v[i * targets + c].to_f64())
    }
    for c in 0..targets {
        let mean_t = col(y_true, samples, targets, c).sum::<f64>() / samples as f64;
        let mean_p = col(y_pred, samples, targets, c).sum::<f64>() / samples as f64;
        let (mut ss_tot, mut ss_res, mut ss_pred, mut cross) = (0.0, 0.0, 0.0, 0.0);
        for (yt, yp) in col(y_true, samples, targets, c).zip(col(y_pred, samples, targets, c)) {
            let (a, b) = (yt - mean_t, yp - mean_p);
            ss_tot += a * a;
            ss_res += (yt - yp) * (yt - yp);
            ss_pred += b * b;
            cross += a * b;
        }
        r2[c] = E::from_f64(if ss_tot == 0.0 {
            0.0
        } else {
            1.0 - ss_res / ss_tot
        });
        let denom = (ss_tot * ss_pred).sqrt();
        pearson[c] = E::from_f64(if denom == 0.0 { 0.0 } else { cross / denom });
    }
    Ok((r2, pearson))
}
