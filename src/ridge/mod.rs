//! Batched ridge regression (CPU): `ridge.cv` (one design matrix, many targets, an alpha per
//! target by cross-validation; see [`cv`]), `ridge.solve_batched` (many independent small
//! problems) and `ridge.score` (R² and Pearson per target).
//!
//! Small problems are solved in f64 whatever the element type (the factorizations are a
//! few hundred values on a side, so f64 costs little and keeps f32 results at f32
//! precision even for poorly conditioned X): a Cholesky factorization of XᵀX + αI when
//! n ≥ p, of the dual XXᵀ + αI when n < p (then w = Xᵀ(XXᵀ + αI)⁻¹Y), one task per problem.
//! Results do not depend on the thread count.

use crate::element::Element;
use crate::error::{Error, Result};
use rayon::prelude::*;

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

fn check_len(name: &str, got: usize, want: usize, shape: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            name,
            format!("{shape} ({want} values)"),
            format!("{got} values"),
        ))
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
    let usable = |a: f64| a.is_finite() && a > 0.0;
    if let Some(i) = alpha.iter().position(|a| !usable(a.to_f64())) {
        return Err(Error::invalid(
            "alpha",
            format!(
                "must be finite and > 0 (problem {i} has {})",
                alpha[i].to_f64()
            ),
        ));
    }
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

/// One problem in f64: returns w [p, t] (row-major).
fn solve_one<E: Element>(
    n: usize,
    p: usize,
    t: usize,
    x: &[E],
    y: &[E],
    alpha: f64,
) -> std::result::Result<Vec<f64>, String> {
    let xf: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    let yf: Vec<f64> = y.iter().map(|v| v.to_f64()).collect();
    if n >= p {
        // (XᵀX + αI) w = XᵀY
        let mut gram = vec![0.0; p * p];
        let mut rhs = vec![0.0; p * t];
        for i in 0..n {
            let (row, yr) = (&xf[i * p..(i + 1) * p], &yf[i * t..(i + 1) * t]);
            for a in 0..p {
                let xa = row[a];
                for (gv, xb) in gram[a * p..a * p + a + 1].iter_mut().zip(row) {
                    *gv += xa * xb;
                }
                for (r, yv) in rhs[a * t..(a + 1) * t].iter_mut().zip(yr) {
                    *r += xa * yv;
                }
            }
        }
        for a in 0..p {
            gram[a * p + a] += alpha;
        }
        cholesky_solve(&mut gram, p, &mut rhs, t)?;
        Ok(rhs)
    } else {
        // w = Xᵀ (XXᵀ + αI)⁻¹ Y
        let mut kernel = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..=i {
                let dot: f64 = xf[i * p..(i + 1) * p]
                    .iter()
                    .zip(&xf[j * p..(j + 1) * p])
                    .map(|(a, b)| a * b)
                    .sum();
                kernel[i * n + j] = dot;
            }
            kernel[i * n + i] += alpha;
        }
        let mut coef = yf;
        cholesky_solve(&mut kernel, n, &mut coef, t)?;
        let mut w = vec![0.0; p * t];
        for i in 0..n {
            let (row, cr) = (&xf[i * p..(i + 1) * p], &coef[i * t..(i + 1) * t]);
            for a in 0..p {
                for (wv, c) in w[a * t..(a + 1) * t].iter_mut().zip(cr) {
                    *wv += row[a] * c;
                }
            }
        }
        Ok(w)
    }
}

/// Solves A·X = B in place for a symmetric positive definite A (m×m, its lower triangle
/// read; overwritten by the Cholesky factor) and B (m×t, overwritten by X).
fn cholesky_solve(
    a: &mut [f64],
    m: usize,
    b: &mut [f64],
    t: usize,
) -> std::result::Result<(), String> {
    for j in 0..m {
        let mut d = a[j * m + j];
        for k in 0..j {
            d -= a[j * m + k] * a[j * m + k];
        }
        if d.is_nan() || d <= 0.0 {
            return Err(format!(
                "the regularized Gram matrix is not positive definite (pivot {j}: {d})"
            ));
        }
        let d = d.sqrt();
        a[j * m + j] = d;
        for i in j + 1..m {
            let mut s = a[i * m + j];
            for k in 0..j {
                s -= a[i * m + k] * a[j * m + k];
            }
            a[i * m + j] = s / d;
        }
    }
    // L z = b, then Lᵀ x = z, each right-hand side column at once along t
    for i in 0..m {
        for k in 0..i {
            let l = a[i * m + k];
            for c in 0..t {
                b[i * t + c] -= l * b[k * t + c];
            }
        }
        let d = a[i * m + i];
        for c in 0..t {
            b[i * t + c] /= d;
        }
    }
    for i in (0..m).rev() {
        for k in i + 1..m {
            let l = a[k * m + i];
            for c in 0..t {
                b[i * t + c] -= l * b[k * t + c];
            }
        }
        let d = a[i * m + i];
        for c in 0..t {
            b[i * t + c] /= d;
        }
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
