//! Batched ridge regression on arrays: [`crate::ridge`]'s `cv`, `banded_cv`,
//! `split_scores`, `predict`, `score` and `solve_batched`, with every input's dims checked.
//!
//! Layouts: `x [n, p]`, `y [n, t]`, `w [p, t]`, `intercept [t]`, `alphas [A]`, `folds [n]`;
//! banded ridge adds `groups [p]` (each column's feature space, 0..S−1) and
//! `gammas [C, S]`; `solve_batched` `x [G, n, p]`, `y [G, n, t]`, `alpha [G]` and
//! `w [G, p, t]`.
//!
//! ```
//! use neurokernels::nd::ndarray::{self, Array, ArrayD};
//! use neurokernels::nd::ridge;
//!
//! let x: ArrayD<f64> = Array::from_shape_fn(vec![6, 2], |i| (i[0] * 2 + i[1]) as f64);
//! let w: ArrayD<f64> = Array::from_shape_fn(vec![2, 3], |i| (i[0] + i[1]) as f64);
//! let y = ridge::predict(x.view(), w.view(), None)?; // [n, t]
//! assert_eq!(y.shape(), [6, 3]);
//!
//! // y_pred with one sample too few
//! let err = ridge::score(y.view().into_dyn(), y.slice(ndarray::s![..5, ..]).into_dyn())
//!     .unwrap_err();
//! assert_eq!(err.to_string(), "tensor `y_pred`: expected [6, 3] ([n, t], as y_true), got [5, 3]");
//! # Ok::<(), neurokernels::Error>(())
//! ```

use super::{array, dims, dims_opt, slice};
use crate::element::Element;
use crate::error::Result;
use crate::ridge::{self as flat, BandedShape, BatchedShape, RidgeShape};
use ndarray::{Array1, Array2, Array3, ArrayViewD};

#[doc(no_inline)]
pub use crate::ridge::{BandedProgress, CvParams, CvProgress, CvScore, RidgeReal};

/// The design of [`cv`], as [`crate::ridge::CvInputs`].
#[derive(Clone, Debug)]
pub struct CvInputs<'a, E> {
    /// `[n, p]`: the design, finite.
    pub x: ArrayViewD<'a, E>,
    /// `[n, t]`: the targets, finite; each column is its own regression.
    pub y: ArrayViewD<'a, E>,
    /// `[A]`: the candidate alphas, finite and > 0.
    pub alphas: ArrayViewD<'a, E>,
    /// `[n]`: the fold of each sample, 0..F−1 (F ≥ 2, every id used).
    pub folds: ArrayViewD<'a, i32>,
}

/// Outputs of [`cv`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CvFit<E> {
    /// `[A, t]`: each alpha's held-out score, mean over folds.
    pub cv_scores: Array2<E>,
    /// `[t]`: the alpha with the best mean score (the largest alpha among equal scores).
    pub best_alpha: Array1<E>,
    /// `[p, t]`: refit on all rows with each target's best alpha.
    pub w: Array2<E>,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Array1<E>,
}

/// [`crate::ridge::cv()`] (`ridge.cv`) on arrays: for `x [n, p]` and `y [n, t]`, scores every
/// alpha of `alphas [A]` on every fold of `folds [n]`, picks each target's best alpha and
/// refits on all samples. `progress`, when given, is called as by the slice API.
pub fn cv<E: RidgeReal>(
    params: &CvParams,
    inputs: &CvInputs<'_, E>,
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
) -> Result<CvFit<E>> {
    let [n, p] = dims("x", &inputs.x, [None; 2], "[n, p]")?;
    let [_, t] = dims("y", &inputs.y, [Some(n), None], "[n, t], n from x")?;
    let [a] = dims("alphas", &inputs.alphas, [None], "[A]")?;
    dims("folds", &inputs.folds, [Some(n)], "[n], n from x")?;
    let (x, y) = (slice(&inputs.x), slice(&inputs.y));
    let (alphas, folds) = (slice(&inputs.alphas), slice(&inputs.folds));
    let flat_inputs = flat::CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let fit = flat::cv(params, RidgeShape::new(n, p, t), &flat_inputs, progress)?;
    Ok(CvFit {
        cv_scores: array("cv_scores", [a, t], fit.cv_scores)?,
        best_alpha: array("best_alpha", [t], fit.best_alpha)?,
        w: array("w", [p, t], fit.w)?,
        intercept: array("intercept", [t], fit.intercept)?,
    })
}

/// The design of [`banded_cv`], as [`crate::ridge::BandedInputs`].
#[derive(Clone, Debug)]
pub struct BandedInputs<'a, E> {
    /// `[n, p]`: the design (all spaces' columns), finite.
    pub x: ArrayViewD<'a, E>,
    /// `[p]`: the feature space of each column, 0..S−1, every space used.
    pub groups: ArrayViewD<'a, i32>,
    /// `[n, t]`: the targets, finite.
    pub y: ArrayViewD<'a, E>,
    /// `[A]`: the candidate alphas, finite and > 0.
    pub alphas: ArrayViewD<'a, E>,
    /// `[C, S]`: the candidate per-space weights, each row ≥ 0 and on the simplex; S is
    /// read from here.
    pub gammas: ArrayViewD<'a, E>,
    /// `[n]`: the fold of each sample, 0..F−1 (F ≥ 2, every id used).
    pub folds: ArrayViewD<'a, i32>,
}

/// Outputs of [`banded_cv`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BandedFit<E> {
    /// `[C, t]`: per candidate, the mean held-out score of its best alpha.
    pub cv_scores: Array2<E>,
    /// `[S, t]`: log(γ[best, s] / α_best) (himalaya's `deltas_`); −inf where γ = 0.
    pub deltas: Array2<E>,
    /// `[t]`: the chosen candidate (row of `gammas`) of each target.
    pub best_candidate: Array1<usize>,
    /// `[t]`: the chosen alpha of each target.
    pub best_alpha: Array1<E>,
    /// `[p, t]`: refit on all rows with each target's choice, in the original column scale.
    pub w: Array2<E>,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Array1<E>,
}

/// [`crate::ridge::banded_cv()`] (`ridge.banded_cv`) on arrays: banded ridge over the
/// feature spaces of `groups [p]`, each target keeping the (candidate of `gammas [C, S]`,
/// alpha) with the best mean held-out score. `params` and `progress` as the slice API.
pub fn banded_cv<E: RidgeReal>(
    params: &CvParams,
    inputs: &BandedInputs<'_, E>,
    progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
) -> Result<BandedFit<E>> {
    let [n, p] = dims("x", &inputs.x, [None; 2], "[n, p]")?;
    let [_, t] = dims("y", &inputs.y, [Some(n), None], "[n, t], n from x")?;
    let [c, spaces] = dims("gammas", &inputs.gammas, [None; 2], "[C, S]")?;
    dims("groups", &inputs.groups, [Some(p)], "[p], p from x")?;
    dims("alphas", &inputs.alphas, [None], "[A]")?;
    dims("folds", &inputs.folds, [Some(n)], "[n], n from x")?;
    let (x, y, groups) = (slice(&inputs.x), slice(&inputs.y), slice(&inputs.groups));
    let (alphas, gammas) = (slice(&inputs.alphas), slice(&inputs.gammas));
    let folds = slice(&inputs.folds);
    let flat_inputs = flat::BandedInputs {
        x: &x,
        groups: &groups,
        y: &y,
        alphas: &alphas,
        gammas: &gammas,
        folds: &folds,
    };
    let shape = BandedShape::new(n, p, t, spaces);
    let fit = flat::banded_cv(params, shape, &flat_inputs, progress)?;
    Ok(BandedFit {
        cv_scores: array("cv_scores", [c, t], fit.cv_scores)?,
        deltas: array("deltas", [spaces, t], fit.deltas)?,
        best_candidate: array("best_candidate", [t], fit.best_candidate)?,
        best_alpha: array("best_alpha", [t], fit.best_alpha)?,
        w: array("w", [p, t], fit.w)?,
        intercept: array("intercept", [t], fit.intercept)?,
    })
}

/// The per-space scores of [`split_scores`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SplitScores<E> {
    /// `[S, t]`: each space's share of R² (himalaya's `r2_score_split`).
    pub r2: Array2<E>,
    /// `[S, t]`: each space's share of the Pearson correlation.
    pub pearson: Array2<E>,
}

/// [`crate::ridge::split_scores()`] (`ridge.split_scores`) on arrays: per feature space of
/// `groups [p]` (values 0..`spaces`−1) and target, the share of the score of
/// `x [n, p] · w [p, t]` against `y [n, t]` that the space's prediction carries.
pub fn split_scores<E: RidgeReal>(
    x: ArrayViewD<'_, E>,
    groups: ArrayViewD<'_, i32>,
    spaces: usize,
    w: ArrayViewD<'_, E>,
    y: ArrayViewD<'_, E>,
) -> Result<SplitScores<E>> {
    let [n, p] = dims("x", &x, [None; 2], "[n, p]")?;
    dims("groups", &groups, [Some(p)], "[p], p from x")?;
    let [_, t] = dims("w", &w, [Some(p), None], "[p, t], p from x")?;
    dims("y", &y, [Some(n), Some(t)], "[n, t], n from x and t from w")?;
    let shape = BandedShape::new(n, p, t, spaces);
    let s = flat::split_scores(shape, &slice(&x), &slice(&groups), &slice(&w), &slice(&y))?;
    Ok(SplitScores {
        r2: array("r2", [spaces, t], s.r2)?,
        pearson: array("pearson", [spaces, t], s.pearson)?,
    })
}

/// [`crate::ridge::predict`] (`ridge.predict`) on arrays:
/// `y [n, t] = x [n, p] · w [p, t] + intercept [t]` (no intercept when `None`).
pub fn predict<E: RidgeReal>(
    x: ArrayViewD<'_, E>,
    w: ArrayViewD<'_, E>,
    intercept: Option<ArrayViewD<'_, E>>,
) -> Result<Array2<E>> {
    let [n, p] = dims("x", &x, [None; 2], "[n, p]")?;
    let [_, t] = dims("w", &w, [Some(p), None], "[p, t], p from x")?;
    dims_opt("intercept", intercept.as_ref(), [t], "[t], t from w")?;
    let intercept = intercept.as_ref().map(slice);
    let y = flat::predict(
        RidgeShape::new(n, p, t),
        &slice(&x),
        &slice(&w),
        intercept.as_deref(),
    )?;
    array("y", [n, t], y)
}

/// The per-target scores of [`score`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Scores<E> {
    /// `[t]`: the coefficient of determination.
    pub r2: Array1<E>,
    /// `[t]`: the Pearson correlation of prediction and target.
    pub pearson: Array1<E>,
}

/// [`crate::ridge::score`] (`ridge.score`) on arrays: per target column of `y_true [n, t]`
/// and `y_pred [n, t]`, `r2 [t]` and `pearson [t]`.
pub fn score<E: Element>(
    y_true: ArrayViewD<'_, E>,
    y_pred: ArrayViewD<'_, E>,
) -> Result<Scores<E>> {
    let [n, t] = dims("y_true", &y_true, [None; 2], "[n, t]")?;
    dims("y_pred", &y_pred, [n, t].map(Some), "[n, t], as y_true")?;
    let s = flat::score(RidgeShape::new(n, 0, t), &slice(&y_true), &slice(&y_pred))?;
    Ok(Scores {
        r2: array("r2", [t], s.r2)?,
        pearson: array("pearson", [t], s.pearson)?,
    })
}

/// [`crate::ridge::solve_batched`] (`ridge.solve_batched`) on arrays: for every problem g of
/// `x [G, n, p]`, `y [G, n, t]` and `alpha [G]`, w_g = argmin |X_g w − Y_g|² + α_g |w|²;
/// returns `w [G, p, t]`.
pub fn solve_batched<E: Element>(
    x: ArrayViewD<'_, E>,
    y: ArrayViewD<'_, E>,
    alpha: ArrayViewD<'_, E>,
) -> Result<Array3<E>> {
    let [g, n, p] = dims("x", &x, [None; 3], "[G, n, p]")?;
    let [.., t] = dims(
        "y",
        &y,
        [Some(g), Some(n), None],
        "[G, n, t], G and n from x",
    )?;
    dims("alpha", &alpha, [Some(g)], "[G], G from x")?;
    let w = flat::solve_batched(
        BatchedShape::new(g, n, p, t),
        &slice(&x),
        &slice(&y),
        &slice(&alpha),
    )?;
    array("w", [g, p, t], w)
}
