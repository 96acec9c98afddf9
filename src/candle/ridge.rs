//! Batched ridge regression on candle tensors (no autograd): [`cv`] (one design, many
//! targets, an alpha per target by cross-validation), [`banded_cv`] (several feature spaces,
//! a weight per space) with [`split_scores`], [`predict`], [`solve_batched`] (many
//! small independent problems) and [`score`] (R² and Pearson per target). CPU tensors only
//! (a CUDA tensor is an error naming it: nothing is copied to the host behind your back).
//!
//! ```
//! use neurokernels::candle::ridge::{self, CvParams};
//! use neurokernels::candle::candle_core::{Device, Tensor};
//!
//! let dev = Device::Cpu;
//! let x = Tensor::randn(0f64, 1., (90, 4), &dev)?; // [n, p]
//! let w_true = Tensor::new(&[[1.0f64], [-2.0], [0.0], [0.5]], &dev)?; // [p, t]
//! let y = x.matmul(&w_true)?; // [n, t]
//! let alphas = Tensor::new(&[1e-3f64, 1.0, 1e3], &dev)?;
//! let folds = Tensor::from_vec((0..90u32).map(|i| i % 3).collect::<Vec<_>>(), 90, &dev)?;
//! let fit = ridge::cv(&CvParams::new(), &x, &y, &alphas, &folds)?;
//! let y_hat = ridge::predict(&x, &fit.w, Some(&fit.intercept))?;
//! let (r2, _pearson) = ridge::score(&y, &y_hat)?;
//! assert!(r2.to_vec1::<f64>()?[0] > 0.999);
//! # Ok::<(), neurokernels::candle::candle_core::Error>(())
//! ```

use super::{check_cpu, check_float, check_like, host_vec, with_dtype, wrap};
use crate::ridge::{self as flat, BandedShape, BatchedShape, RidgeShape};
use candle_core::{DType, Tensor};

pub use crate::ridge::{CvParams, CvScore};

/// The outputs of [`cv`], in the dtype of x.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CvFit {
    /// `[A, t]`: each alpha's held-out score, mean over folds.
    pub cv_scores: Tensor,
    /// `[t]`: each target's best alpha (the largest among equal scores).
    pub best_alpha: Tensor,
    /// `[p, t]`: refit on all samples with each target's best alpha.
    pub w: Tensor,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Tensor,
}

/// `ridge.cv`: `x [n, p]`, `y [n, t]`, candidate `alphas [A]` (finite, > 0) in one dtype,
/// f32 or f64; `folds [n]` any integer dtype (each sample's fold, 0..F−1, F ≥ 2). Returns the
/// [`CvFit`]; see [`crate::ridge::cv()`].
pub fn cv(
    params: &CvParams,
    x: &Tensor,
    y: &Tensor,
    alphas: &Tensor,
    folds: &Tensor,
) -> candle_core::Result<CvFit> {
    const OP: &str = "ridge.cv";
    check_float(OP, "x", x)?;
    check_cpu(OP, "x", x)?;
    check_like(OP, "y", y, x.dtype(), x.device(), "x")?;
    check_like(OP, "alphas", alphas, x.dtype(), x.device(), "x")?;
    let folds = index_vec(OP, "folds", folds)?;
    let shape = RidgeShape::from_dims(x.dims(), y.dims()).map_err(wrap)?;
    let a = alphas.elem_count();
    let (p, t) = (shape.features, shape.targets);
    macro_rules! run {
        ($T:ty) => {{
            let (xh, yh, ah) = (
                host_vec::<$T>(x)?,
                host_vec::<$T>(y)?,
                host_vec::<$T>(alphas)?,
            );
            let inputs = flat::CvInputs {
                x: &xh,
                y: &yh,
                alphas: &ah,
                folds: &folds,
            };
            let fit = flat::cv(params, shape, &inputs, None).map_err(wrap)?;
            let dev = x.device();
            CvFit {
                cv_scores: Tensor::from_vec(fit.cv_scores, (a, t), dev)?,
                best_alpha: Tensor::from_vec(fit.best_alpha, t, dev)?,
                w: Tensor::from_vec(fit.w, (p, t), dev)?,
                intercept: Tensor::from_vec(fit.intercept, t, dev)?,
            }
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        other => candle_core::bail!(
            "neurokernels {OP}: tensor `x` has dtype {other:?}; ridge.cv takes f32 or f64"
        ),
    })
}

/// `ridge.predict`: `x [n, p] · w [p, t] (+ intercept [t])`, f32 or f64.
pub fn predict(x: &Tensor, w: &Tensor, intercept: Option<&Tensor>) -> candle_core::Result<Tensor> {
    const OP: &str = "ridge.predict";
    check_float(OP, "x", x)?;
    check_cpu(OP, "x", x)?;
    check_like(OP, "w", w, x.dtype(), x.device(), "x")?;
    let (n, p) = x.dims2()?;
    let Ok((p2, t)) = w.dims2() else {
        candle_core::bail!(
            "neurokernels {OP}: tensor `w` has shape {:?}, expected [{p}, t]",
            w.dims()
        );
    };
    if p2 != p {
        candle_core::bail!(
            "neurokernels {OP}: tensor `w` has shape {:?}, expected [{p}, t] (p from x)",
            w.dims()
        );
    }
    if let Some(i) = intercept {
        check_like(OP, "intercept", i, x.dtype(), x.device(), "x")?;
    }
    let shape = RidgeShape::new(n, p, t);
    macro_rules! run {
        ($T:ty) => {{
            let (xh, wh) = (host_vec::<$T>(x)?, host_vec::<$T>(w)?);
            let ih = intercept.map(host_vec::<$T>).transpose()?;
            let y = flat::predict(shape, &xh, &wh, ih.as_deref()).map_err(wrap)?;
            Tensor::from_vec(y, (n, t), x.device())?
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        other => candle_core::bail!(
            "neurokernels {OP}: tensor `x` has dtype {other:?}; ridge.predict takes f32 or f64"
        ),
    })
}

/// `ridge.solve_batched`: for every problem g, `w_g = argmin |X_g w − Y_g|² + α_g |w|²` with
/// `x [G, n, p]`, `y [G, n, t]`, `alpha [G]` in one dtype (f32, f64, f16, bf16); returns
/// `w [G, p, t]`.
pub fn solve_batched(x: &Tensor, y: &Tensor, alpha: &Tensor) -> candle_core::Result<Tensor> {
    const OP: &str = "ridge.solve_batched";
    check_float(OP, "x", x)?;
    check_cpu(OP, "x", x)?;
    check_like(OP, "y", y, x.dtype(), x.device(), "x")?;
    check_like(OP, "alpha", alpha, x.dtype(), x.device(), "x")?;
    let (&[g, n, p], &[g2, n2, t]) = (x.dims(), y.dims()) else {
        candle_core::bail!(
            "neurokernels {OP}: expected x [G, n, p] and y [G, n, t], got {:?} and {:?}",
            x.dims(),
            y.dims()
        );
    };
    if (g2, n2) != (g, n) {
        candle_core::bail!(
            "neurokernels {OP}: tensor `y` has shape {:?}, expected [{g}, {n}, t] (G, n from x)",
            y.dims()
        );
    }
    if alpha.dims() != [g] {
        candle_core::bail!(
            "neurokernels {OP}: tensor `alpha` has shape {:?}, expected [{g}]",
            alpha.dims()
        );
    }
    let shape = BatchedShape::new(g, n, p, t);
    with_dtype!(OP, x.dtype(), T => {
        let (xh, yh, ah) = (host_vec::<T>(x)?, host_vec::<T>(y)?, host_vec::<T>(alpha)?);
        let w = flat::solve_batched(shape, &xh, &yh, &ah).map_err(wrap)?;
        Tensor::from_vec(w, (g, p, t), x.device())
    })
}

/// `ridge.score`: per target column of `y_true [n, t]` and `y_pred [n, t]` (one dtype),
/// returns `(r2 [t], pearson [t])`; conventions as [`crate::ridge::score`].
pub fn score(y_true: &Tensor, y_pred: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    const OP: &str = "ridge.score";
    check_float(OP, "y_true", y_true)?;
    check_cpu(OP, "y_true", y_true)?;
    check_like(
        OP,
        "y_pred",
        y_pred,
        y_true.dtype(),
        y_true.device(),
        "y_true",
    )?;
    let (n, t) = y_true.dims2()?;
    if y_pred.dims() != [n, t] {
        candle_core::bail!(
            "neurokernels {OP}: tensor `y_pred` has shape {:?}, expected [{n}, {t}]",
            y_pred.dims()
        );
    }
    let shape = RidgeShape::new(n, 0, t);
    with_dtype!(OP, y_true.dtype(), T => {
        let (a, b) = (host_vec::<T>(y_true)?, host_vec::<T>(y_pred)?);
        let s = flat::score(shape, &a, &b).map_err(wrap)?;
        Ok((
            Tensor::from_vec(s.r2, t, y_true.device())?,
            Tensor::from_vec(s.pearson, t, y_true.device())?,
        ))
    })
}

/// An integer tensor's entries as i32 (`name` in errors; an entry outside i32 becomes −1,
/// which the op's checks refuse naming the tensor).
fn index_vec(op: &str, name: &str, t: &Tensor) -> candle_core::Result<Vec<i32>> {
    check_cpu(op, name, t)?;
    if t.dtype().is_float() {
        candle_core::bail!(
            "neurokernels {op}: tensor `{name}` has dtype {:?}, expected an integer dtype",
            t.dtype()
        );
    }
    Ok(host_vec::<i64>(&t.to_dtype(DType::I64)?)?
        .into_iter()
        .map(|f| i32::try_from(f).unwrap_or(-1))
        .collect())
}

/// The outputs of [`banded_cv`], in the dtype of x.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BandedFit {
    /// `[C, t]`: per candidate, the mean held-out score of its best alpha.
    pub cv_scores: Tensor,
    /// `[S, t]`: log(γ[best, s] / α_best) (himalaya's `deltas_`); −inf where γ = 0.
    pub deltas: Tensor,
    /// `[t]` (u32): each target's chosen candidate (row of `gammas`).
    pub best_candidate: Tensor,
    /// `[t]`: each target's chosen alpha.
    pub best_alpha: Tensor,
    /// `[p, t]`: refit on all samples with each target's choice, in the original column scale.
    pub w: Tensor,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Tensor,
}

/// `ridge.banded_cv` (banded ridge, himalaya's BandedRidgeCV with the candidates given):
/// `x [n, p]`, `y [n, t]`, `alphas [A]`, `gammas [C, S]` (each row on the simplex) in one
/// dtype, f32 or f64; `groups [p]` (each column's feature space, 0..S−1) and `folds [n]` any
/// integer dtype. Returns the [`BandedFit`]; see [`crate::ridge::banded_cv()`].
pub fn banded_cv(
    params: &CvParams,
    x: &Tensor,
    groups: &Tensor,
    y: &Tensor,
    alphas: &Tensor,
    gammas: &Tensor,
    folds: &Tensor,
) -> candle_core::Result<BandedFit> {
    const OP: &str = "ridge.banded_cv";
    check_float(OP, "x", x)?;
    check_cpu(OP, "x", x)?;
    check_like(OP, "y", y, x.dtype(), x.device(), "x")?;
    check_like(OP, "alphas", alphas, x.dtype(), x.device(), "x")?;
    check_like(OP, "gammas", gammas, x.dtype(), x.device(), "x")?;
    let (groups, folds) = (
        index_vec(OP, "groups", groups)?,
        index_vec(OP, "folds", folds)?,
    );
    let shape = RidgeShape::from_dims(x.dims(), y.dims()).map_err(wrap)?;
    let Ok((c, spaces)) = gammas.dims2() else {
        candle_core::bail!(
            "neurokernels {OP}: tensor `gammas` has shape {:?}, expected [C, S]",
            gammas.dims()
        );
    };
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let banded = BandedShape::new(n, p, t, spaces);
    macro_rules! run {
        ($T:ty) => {{
            let (xh, yh) = (host_vec::<$T>(x)?, host_vec::<$T>(y)?);
            let (ah, gh) = (host_vec::<$T>(alphas)?, host_vec::<$T>(gammas)?);
            let inputs = flat::BandedInputs {
                x: &xh,
                groups: &groups,
                y: &yh,
                alphas: &ah,
                gammas: &gh,
                folds: &folds,
            };
            let fit = flat::banded_cv(params, banded, &inputs, None).map_err(wrap)?;
            let dev = x.device();
            let best: Vec<u32> = fit.best_candidate.iter().map(|b| *b as u32).collect();
            BandedFit {
                cv_scores: Tensor::from_vec(fit.cv_scores, (c, t), dev)?,
                deltas: Tensor::from_vec(fit.deltas, (spaces, t), dev)?,
                best_candidate: Tensor::from_vec(best, t, dev)?,
                best_alpha: Tensor::from_vec(fit.best_alpha, t, dev)?,
                w: Tensor::from_vec(fit.w, (p, t), dev)?,
                intercept: Tensor::from_vec(fit.intercept, t, dev)?,
            }
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        other => candle_core::bail!(
            "neurokernels {OP}: tensor `x` has dtype {other:?}; ridge.banded_cv takes f32 or f64"
        ),
    })
}

/// `ridge.split_scores`: per feature space of `groups [p]` (values 0..`spaces`−1) and target,
/// the share of the score of `x [n, p] · w [p, t]` against `y [n, t]` that the space's
/// prediction carries, as `(r2 [S, t], pearson [S, t])`; x, w, y in one dtype (f32, f64).
/// See [`crate::ridge::split_scores()`].
pub fn split_scores(
    x: &Tensor,
    groups: &Tensor,
    spaces: usize,
    w: &Tensor,
    y: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    const OP: &str = "ridge.split_scores";
    check_float(OP, "x", x)?;
    check_cpu(OP, "x", x)?;
    check_like(OP, "w", w, x.dtype(), x.device(), "x")?;
    check_like(OP, "y", y, x.dtype(), x.device(), "x")?;
    let groups = index_vec(OP, "groups", groups)?;
    let shape = RidgeShape::from_dims(x.dims(), y.dims()).map_err(wrap)?;
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let banded = BandedShape::new(n, p, t, spaces);
    macro_rules! run {
        ($T:ty) => {{
            let (xh, wh, yh) = (host_vec::<$T>(x)?, host_vec::<$T>(w)?, host_vec::<$T>(y)?);
            let s = flat::split_scores(banded, &xh, &groups, &wh, &yh).map_err(wrap)?;
            (
                Tensor::from_vec(s.r2, (spaces, t), x.device())?,
                Tensor::from_vec(s.pearson, (spaces, t), x.device())?,
            )
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        other => candle_core::bail!(
            "neurokernels {OP}: tensor `x` has dtype {other:?}; ridge.split_scores takes f32 or f64"
        ),
    })
}
