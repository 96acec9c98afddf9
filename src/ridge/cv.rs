//! `ridge.cv`: one design matrix, many targets, an alpha per target chosen by
//! cross-validation over given folds.
//!
//! Per fold: center with the training rows' means (when `center`), then one symmetric
//! eigendecomposition of the training Gram matrix, reused for every alpha — XᵀX (p × p) when
//! the fold has at least p training rows, the dual XXᵀ (n_tr × n_tr) otherwise:
//!   primal: XᵀX = V diag(s) Vᵀ, Z = Vᵀ Xᵀ Y, pred_α = (X_te V) diag(1/(s+α)) Z;
//!   dual:   XXᵀ = U diag(λ) Uᵀ, Z = Uᵀ Y,    pred_α = (X_te Xᵀ U) diag(1/(λ+α)) Z;
//! (plus the training mean of y when centered). Targets stream in batches of
//! `target_batch`. The held-out predictions are never formed: with d = diag(1/(s+α)) Z and
//! G = projᵀproj (rank × rank, once per fold), the score needs only Σŷ = 1ᵀproj·d,
//! Σa·ŷ = (projᵀa)·d (a: the centered held-out targets, projᵀa once per batch) and
//! |ŷ|² = dᵀGd. The last is a quadratic form in 1/(s_j+α); partial fractions,
//! 1/((s_j+α)(s_k+α)) = (1/(s_j+α) − 1/(s_k+α)) / (s_k − s_j), make it linear in them:
//!   |ŷ|² = Σ_j [2 z_j (Mz)_j] / (s_j+α) + Σ_j G_jj z_j² / (s_j+α)²,
//!   M_jk = G_jk / (s_k − s_j) (j ≠ k),
//! so one product M·Z per batch (in f64) serves every alpha, and each alpha costs O(rank)
//! per target instead of a rank² product. The split is exact algebra but divides by
//! eigenvalue gaps: eigenvalues closer than `RidgeReal::CLUSTER_GAP`·(s + α_max) form a
//! cluster whose pairs are summed directly per alpha (d_Cᵀ G_CC d_C), which bounds the
//! rounding amplification by 1/CLUSTER_GAP. [alphas × held-out rows × targets] is never
//! stored. The refit on all rows uses one
//! decomposition of the full Gram matrix and scales Z column by column with each target's
//! chosen alpha: W = V (Z ∘ 1/(s + α_target)).
//!
//! The dense products and the eigendecompositions are faer's (parallel over the rayon
//! pool); the centering, the batching, the scaling and the scoring are ours. Scores are
//! accumulated in f64. Eigenvalues below zero (rounding of a PSD Gram) are clamped to 0.
//! Results are identical for any thread count (tested); another `target_batch` changes the
//! shapes of the products and so their rounding (agreement to f32 rounding, tested).

use super::{RidgeShape, check_finite};
use crate::element::Element;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;

/// The element types `ridge.cv` runs in: f32 and f64.
pub trait RidgeReal: Element + faer::traits::RealField {
    /// Eigenvalues closer than this times (s + α_max) are scored as one cluster (see the
    /// module doc): the f64 scoring's rounding is amplified by at most its inverse, so
    /// 1e-8 leaves f32 results at f32 rounding and 1e-6 keeps f64 results to ~1e-10.
    #[doc(hidden)]
    const CLUSTER_GAP: f64;
    /// `ridge.cv` compiled for this type here, not in the caller's crate (see
    /// `crate::dispatch`).
    #[doc(hidden)]
    fn ridge_cv(
        params: &CvParams,
        shape: RidgeShape,
        inputs: &CvInputs<'_, Self>,
        progress: Option<&(dyn Fn(CvProgress) + Sync)>,
    ) -> Result<CvFit<Self>>;
    /// `ridge.banded_cv` compiled for this type here.
    #[doc(hidden)]
    fn ridge_banded_cv(
        params: &CvParams,
        shape: super::BandedShape,
        inputs: &super::BandedInputs<'_, Self>,
        progress: Option<&(dyn Fn(super::BandedProgress) + Sync)>,
    ) -> Result<super::BandedFit<Self>>;
    /// `ridge.split_scores` compiled for this type here.
    #[doc(hidden)]
    fn ridge_split_scores(
        shape: super::BandedShape,
        x: &[Self],
        groups: &[i32],
        w: &[Self],
        y: &[Self],
    ) -> Result<super::SplitScores<Self>>;
    /// `ridge.predict` compiled for this type here.
    #[doc(hidden)]
    fn ridge_predict(
        shape: RidgeShape,
        x: &[Self],
        w: &[Self],
        intercept: Option<&[Self]>,
    ) -> Result<Vec<Self>>;
}

macro_rules! ridge_real {
    ($($t:ty => $gap:expr),*) => {$(
        impl RidgeReal for $t {
            const CLUSTER_GAP: f64 = $gap;
            fn ridge_cv(
                params: &CvParams,
                shape: RidgeShape,
                inputs: &CvInputs<'_, Self>,
                progress: Option<&(dyn Fn(CvProgress) + Sync)>,
            ) -> Result<CvFit<Self>> {
                cv_impl(params, shape, inputs, progress)
            }
            fn ridge_banded_cv(
                params: &CvParams,
                shape: super::BandedShape,
                inputs: &super::BandedInputs<'_, Self>,
                progress: Option<&(dyn Fn(super::BandedProgress) + Sync)>,
            ) -> Result<super::BandedFit<Self>> {
                super::banded::banded_impl(params, shape, inputs, progress)
            }
            fn ridge_split_scores(
                shape: super::BandedShape,
                x: &[Self],
                groups: &[i32],
                w: &[Self],
                y: &[Self],
            ) -> Result<super::SplitScores<Self>> {
                super::banded::split_impl(shape, x, groups, w, y)
            }
            fn ridge_predict(
                shape: RidgeShape,
                x: &[Self],
                w: &[Self],
                intercept: Option<&[Self]>,
            ) -> Result<Vec<Self>> {
                predict_impl(shape, x, w, intercept)
            }
        }
    )*};
}
ridge_real!(f32 => 1e-8, f64 => 1e-6);

pub(super) fn cast<E: Element>(x: f64) -> E {
    <E as Element>::from_f64(x)
}

pub(super) fn widen<E: Element>(x: E) -> f64 {
    <E as Element>::to_f64(x)
}

/// The held-out score of `ridge.cv`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CvScore {
    /// 1 − SS_res / SS_tot around the held-out fold's mean; 0 for a constant held-out target.
    #[default]
    R2,
    /// Pearson correlation of prediction and target on the held-out rows; 0 where either is
    /// constant.
    Pearson,
}

/// Parameters of `ridge.cv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CvParams {
    /// The held-out score alphas are chosen by (default [`CvScore::R2`]).
    pub score: CvScore,
    /// Center x and y with the training rows' means and fit an intercept (default true).
    pub center: bool,
    /// Targets per batch: the working memory is about (p + 2·n) · target_batch values
    /// and 4 · rank · target_batch f64 (the scoring) beside the decompositions (per fold:
    /// the eigenvectors, the held-out projection and the rank × rank f64 matrix M;
    /// rank = min(p, training rows)). Default 2048; must be at least 1. Changes rounding only.
    pub target_batch: usize,
}

impl Default for CvParams {
    fn default() -> Self {
        Self {
            score: CvScore::R2,
            center: true,
            target_batch: 2048,
        }
    }
}

impl CvParams {
    /// The defaults: R² scores, centered, target batches of 2048.
    pub fn new() -> Self {
        Self::default()
    }
    /// The held-out score (default [`CvScore::R2`]).
    pub fn score(mut self, score: CvScore) -> Self {
        self.score = score;
        self
    }
    /// Center x and y with the training rows' means and fit an intercept (default true).
    pub fn center(mut self, center: bool) -> Self {
        self.center = center;
        self
    }
    /// Targets scored per batch (default 2048, at least 1): bounds the working memory.
    pub fn target_batch(mut self, targets: usize) -> Self {
        self.target_batch = targets;
        self
    }
}

/// Where a running `ridge.cv` is: reported after each target batch of each fold and after
/// the refit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CvProgress {
    /// The fold being scored, or `folds` during the refit.
    pub fold: usize,
    /// The number of folds F.
    pub folds: usize,
    /// Targets of this fold (or of the refit) done so far.
    pub targets_done: usize,
    /// The number of targets t.
    pub targets: usize,
}

/// Outputs of `ridge.cv`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct CvFit<E> {
    /// `[A, t]`: each alpha's held-out score, mean over folds (unweighted).
    pub cv_scores: Vec<E>,
    /// `[t]`: the alpha with the best mean score (the largest alpha among equal scores).
    pub best_alpha: Vec<E>,
    /// `[p, t]`: refit on all rows with each target's best alpha.
    pub w: Vec<E>,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Vec<E>,
}

/// The design of `ridge.cv`: `x [n, p]`, `y [n, t]`, `alphas [A]`, `folds [n]`.
#[derive(Clone, Copy, Debug)]
pub struct CvInputs<'a, E> {
    /// `[n, p]`: the design, finite.
    pub x: &'a [E],
    /// `[n, t]`: the targets, finite; each column is its own regression.
    pub y: &'a [E],
    /// `[A]`: the candidate alphas, finite and > 0.
    pub alphas: &'a [E],
    /// `[n]`: the fold of each sample, 0..F−1 (F ≥ 2, every id used); each fold is held out once.
    pub folds: &'a [i32],
}

/// `ridge.cv` on the CPU for `x [samples, features]` and `y [samples, targets]`: scores
/// every alpha on every fold, picks each target's best alpha and refits on all samples.
/// `progress`, when given, is called after each target batch of each fold and after the
/// refit.
pub fn cv<E: RidgeReal>(
    params: &CvParams,
    shape: RidgeShape,
    inputs: &CvInputs<'_, E>,
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
) -> Result<CvFit<E>> {
    E::ridge_cv(params, shape, inputs, progress)
}

/// `ridge.predict`: `y [samples, targets] = x [samples, features] · w [features, targets] +
/// intercept [targets]` (no intercept when `None`), for example with a [`CvFit`]'s `w` and
/// `intercept`. Products in the element type by faer, parallel over rayon's threads.
pub fn predict<E: RidgeReal>(
    shape: RidgeShape,
    x: &[E],
    w: &[E],
    intercept: Option<&[E]>,
) -> Result<Vec<E>> {
    E::ridge_predict(shape, x, w, intercept)
}

fn predict_impl<E: RidgeReal>(
    shape: RidgeShape,
    x: &[E],
    w: &[E],
    intercept: Option<&[E]>,
) -> Result<Vec<E>> {
    let RidgeShape {
        samples: n,
        features: p,
        targets: t,
    } = shape;
    let (xs, ws, ys) = shape.sizes()?;
    super::check_len("x", x.len(), xs, &format!("[{n}, {p}]"))?;
    super::check_len("w", w.len(), ws, &format!("[{p}, {t}]"))?;
    if let Some(b) = intercept {
        super::check_len("intercept", b.len(), t, &format!("[{t}]"))?;
    }
    if p == 0 {
        // rule 3 of crate::error: x [n, 0] and w [0, t] are empty and carry neither n nor t
        let inputs = intercept.map_or(0, <[E]>::len);
        crate::error::check_backed("x", "n and t (p = 0 columns)", ys, inputs)?;
    }
    let mut y = vec![E::default(); ys];
    if ys == 0 {
        return Ok(y);
    }
    if p > 0 {
        let xm = MatRef::from_row_major_slice(x, n, p);
        let wm = MatRef::from_row_major_slice(w, p, t);
        let ym = faer::MatMut::from_row_major_slice_mut(&mut y, n, t);
        matmul(ym, Accum::Replace, xm, wm, cast::<E>(1.0), par());
    }
    if let Some(b) = intercept {
        y.par_chunks_mut(t).for_each(|row| {
            for (v, b) in row.iter_mut().zip(b) {
                *v += *b;
            }
        });
    }
    Ok(y)
}

fn cv_impl<E: RidgeReal>(
    params: &CvParams,
    shape: RidgeShape,
    inputs: &CvInputs<'_, E>,
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
) -> Result<CvFit<E>> {
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let fold_rows = check_inputs(params, n, p, t, inputs)?;
    let n_alphas = inputs.alphas.len();
    let n_folds = fold_rows.len();

    let mut sums = vec![0.0f64; n_alphas * t];
    for (f, test) in fold_rows.iter().enumerate() {
        let train: Vec<usize> = (0..n).filter(|i| inputs.folds[*i] as usize != f).collect();
        let fold = Fold::new(params, p, t, inputs, &train, test)?;
        let batch = params.target_batch;
        let mut t0 = 0;
        while t0 < t {
            let tb = batch.min(t - t0);
            fold.score_batch(params, inputs, t, t0, tb, &train, test, &mut sums)?;
            t0 += tb;
            if let Some(report) = progress {
                report(CvProgress {
                    fold: f,
                    folds: n_folds,
                    targets_done: t0,
                    targets: t,
                });
            }
        }
    }
    let cv_scores: Vec<f64> = sums.iter().map(|s| mean_score(*s, n_folds)).collect();
    // best alpha per target: the highest mean score, the largest alpha among equal scores
    let best: Vec<usize> = (0..t)
        .map(|c| {
            let mut best = 0;
            for a in 1..n_alphas {
                let (sa, sb) = (cv_scores[a * t + c], cv_scores[best * t + c]);
                if sa > sb || (sa == sb && widen(inputs.alphas[a]) > widen(inputs.alphas[best])) {
                    best = a;
                }
            }
            best
        })
        .collect();
    let chosen: Vec<f64> = best.iter().map(|a| widen(inputs.alphas[*a])).collect();
    let (w, intercept) = refit(params, n, p, t, inputs, &chosen, progress, n_folds)?;
    Ok(CvFit {
        cv_scores: cv_scores.into_iter().map(cast).collect(),
        best_alpha: chosen.into_iter().map(cast).collect(),
        w,
        intercept,
    })
}

/// The checks of `ridge.cv`'s inputs (shared by the CPU and CUDA paths): lengths, sizes that
/// overflow, NaN/Inf in x or y, alphas finite and > 0, fold ids; returns the rows of each
/// fold.
pub(super) fn check_inputs<E: Element>(
    params: &CvParams,
    n: usize,
    p: usize,
    t: usize,
    inputs: &CvInputs<'_, E>,
) -> Result<Vec<Vec<usize>>> {
    let over = || Error::overflow("x", format!("[{n}, {p}] / [{n}, {t}] overflows"));
    let xs = n.checked_mul(p).ok_or_else(over)?;
    let ys = n.checked_mul(t).ok_or_else(over)?;
    let n_alphas = inputs.alphas.len();
    n_alphas
        .checked_mul(t)
        .and_then(|x| x.checked_mul(8))
        .ok_or_else(over)?;
    p.checked_mul(t)
        .and_then(|x| x.checked_mul(8))
        .ok_or_else(over)?;
    super::check_len("x", inputs.x.len(), xs, &format!("[{n}, {p}]"))?;
    super::check_len("y", inputs.y.len(), ys, &format!("[{n}, {t}]"))?;
    super::check_len("folds", inputs.folds.len(), n, &format!("[{n}]"))?;
    check_finite("x", inputs.x)?;
    check_finite("y", inputs.y)?;
    if n_alphas == 0 {
        return Err(Error::invalid("alphas", "is empty"));
    }
    if params.target_batch == 0 {
        return Err(Error::invalid("target_batch", "must be at least 1"));
    }
    if let Some(i) = inputs.alphas.iter().position(|a| !usable_alpha(widen(*a))) {
        return Err(Error::invalid(
            "alphas",
            format!(
                "must be finite, > 0 and not subnormal (alphas[{i}] = {})",
                widen(inputs.alphas[i])
            ),
        ));
    }
    fold_rows(inputs.folds)
}

/// An alpha ridge can divide by: finite, > 0 and normal (1/α of a subnormal overflows).
pub(super) fn usable_alpha(a: f64) -> bool {
    a.is_normal() && a > 0.0
}

/// The mean held-out score over folds; −inf where the fit overflowed to NaN (an alpha so
/// small that 1/α blows up a rank-deficient direction), so it ranks below every real score.
pub(super) fn mean_score(sum: f64, folds: usize) -> f64 {
    let mean = sum / folds as f64;
    if mean.is_nan() {
        f64::NEG_INFINITY
    } else {
        mean
    }
}

/// The rows of each fold, checked: ids 0..F−1, each present, F ≥ 2.
/// The intercepts of a refit `w [p, t]` on centered data: mean(y) − mean(x)·w per target
/// (summed in f64), or zeros when the data were not centered (no means).
pub(super) fn intercepts<E: RidgeReal>(
    x_mean: Option<&[f64]>,
    y_mean: Option<&[f64]>,
    w: &[E],
    p: usize,
    t: usize,
) -> Vec<E> {
    (0..t)
        .map(|c| match (x_mean, y_mean) {
            (Some(xm), Some(ym)) => {
                let dot: f64 = (0..p).map(|r| xm[r] * widen(w[r * t + c])).sum();
                cast(ym[c] - dot)
            }
            _ => E::default(),
        })
        .collect()
}

pub(super) fn fold_rows(folds: &[i32]) -> Result<Vec<Vec<usize>>> {
    if let Some(i) = folds.iter().position(|f| *f < 0) {
        return Err(Error::invalid(
            "folds",
            format!("fold ids must be >= 0 (folds[{i}] = {})", folds[i]),
        ));
    }
    // F non-empty folds need F samples: an id ≥ n leaves a fold empty, and is refused before
    // anything is sized by it
    if let Some(i) = folds.iter().position(|f| *f as usize >= folds.len()) {
        return Err(Error::invalid(
            "folds",
            format!(
                "fold ids must be 0..F-1, each used, so below n = {} (folds[{i}] = {})",
                folds.len(),
                folds[i]
            ),
        ));
    }
    let count = folds.iter().map(|f| *f as usize + 1).max().unwrap_or(0);
    let mut rows = vec![Vec::new(); count];
    for (i, f) in folds.iter().enumerate() {
        rows[*f as usize].push(i);
    }
    if let Some(empty) = rows.iter().position(Vec::is_empty) {
        return Err(Error::invalid(
            "folds",
            format!("fold {empty} holds no sample (ids must be 0..F-1, each used)"),
        ));
    }
    if count < 2 {
        return Err(Error::invalid(
            "folds",
            "a single fold holds every sample: no training rows remain",
        ));
    }
    Ok(rows)
}

pub(super) fn par() -> Par {
    Par::rayon(0)
}

/// dst = a · b
pub(super) fn product<E: RidgeReal>(a: MatRef<'_, E>, b: MatRef<'_, E>) -> Mat<E> {
    let mut dst = Mat::<E>::zeros(a.nrows(), b.ncols());
    matmul(dst.as_mut(), Accum::Replace, a, b, cast::<E>(1.0), par());
    dst
}

/// Column means of the given rows of a row-major [_, width] matrix, in f64.
pub(super) fn means<E: Element>(data: &[E], width: usize, rows: &[usize]) -> Vec<f64> {
    let mut m = vec![0.0; width];
    for r in rows {
        for (acc, v) in m.iter_mut().zip(&data[r * width..(r + 1) * width]) {
            *acc += widen(*v);
        }
    }
    let inv = 1.0 / rows.len().max(1) as f64;
    m.iter_mut().for_each(|v| *v *= inv);
    m
}

/// The given rows of a row-major matrix, columns [c0, c0 + w), minus `offset` (per column).
pub(super) fn gather<E: RidgeReal>(
    data: &[E],
    width: usize,
    rows: &[usize],
    c0: usize,
    w: usize,
    offset: Option<&[f64]>,
) -> Mat<E> {
    Mat::from_fn(rows.len(), w, |i, j| {
        let v = data[rows[i] * width + c0 + j];
        match offset {
            Some(o) => cast(widen(v) - o[c0 + j]),
            None => v,
        }
    })
}

/// The given rows of a row-major matrix, columns [c0, c0 + w), minus `offset` (per column),
/// as a row-major buffer (contiguous copies: the rows of y are long).
pub(super) fn rows_of<E: RidgeReal>(
    data: &[E],
    width: usize,
    rows: &[usize],
    c0: usize,
    w: usize,
    offset: Option<&[f64]>,
) -> Vec<E> {
    let mut out = Vec::with_capacity(rows.len() * w);
    for r in rows {
        let src = &data[r * width + c0..r * width + c0 + w];
        match offset {
            Some(o) => out.extend(
                src.iter()
                    .zip(&o[c0..c0 + w])
                    .map(|(v, m)| cast::<E>(widen(*v) - m)),
            ),
            None => out.extend_from_slice(src),
        }
    }
    out
}

/// Eigendecomposition of a symmetric matrix: (vectors, values clamped at 0).
pub(super) fn eigh<E: RidgeReal>(gram: &Mat<E>, what: &str) -> Result<(Mat<E>, Vec<f64>)> {
    let eig = gram
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::invalid("x", format!("{what}: eigendecomposition failed ({e:?})")))?;
    let values = eig.S().column_vector();
    let values: Vec<f64> = (0..gram.nrows())
        .map(|i| widen(values[i]).max(0.0))
        .collect();
    Ok((eig.U().to_owned(), values))
}

/// One fold's decomposition: the held-out rows projected so that each alpha's prediction is
/// `proj · diag(1/(s + α)) · Z`, and what the scoring of |ŷ|² needs (see the module doc).
struct Fold<E: RidgeReal> {
    /// The training rows' means of y (centered fits), all targets.
    y_mean: Option<Vec<f64>>,
    /// Primal: Xᵀ of the centered training rows is needed for Z = Vᵀ Xᵀ Y.
    x_train: Mat<E>,
    /// Eigenvectors of the Gram matrix (V or U).
    vectors: Mat<E>,
    /// X_te V (primal) or X_te Xᵀ U (dual): n_te × rank.
    proj: Mat<E>,
    /// The eigenvalues and the scoring terms derived from proj.
    scoring: Scoring,
    primal: bool,
}

/// What scores every alpha of one decomposition from Z and projᵀa (see the module doc):
/// shared by `ridge.cv` and `ridge.banded_cv`.
pub(super) struct Scoring {
    /// The eigenvalues s (or λ), clamped at 0.
    values: Vec<f64>,
    /// Column sums of proj (over the held-out rows), in f64.
    proj_sums: Vec<f64>,
    /// M = G_jk / (s_k − s_j) for j, k in different clusters, 0 within one (rank × rank).
    gap_product: Mat<f64>,
    /// G_jj for eigenvalues alone in their cluster, 0 for members of larger clusters.
    gram_diag: Vec<f64>,
    /// The clusters of two or more eigenvalues: their indices and G restricted to them.
    clusters: Vec<(Vec<usize>, Mat<f64>)>,
}

/// The held-out targets of one batch, centered on their own means: (a [n_te, tb] row-major,
/// the means [tb], SS_tot [tb]).
pub(super) fn held_out_batch<E: RidgeReal>(
    y: &[E],
    t: usize,
    test: &[usize],
    t0: usize,
    tb: usize,
) -> (Vec<E>, Vec<f64>, Vec<f64>) {
    let n_te = test.len();
    let mut held_out = rows_of(y, t, test, t0, tb, None);
    let y_te_mean = means(&held_out, tb, &(0..n_te).collect::<Vec<_>>());
    for row in held_out.chunks_exact_mut(tb) {
        for (v, m) in row.iter_mut().zip(&y_te_mean) {
            *v = cast(widen(*v) - m);
        }
    }
    let mut ss_tot = vec![0.0f64; tb];
    for row in held_out.chunks_exact(tb) {
        for (acc, v) in ss_tot.iter_mut().zip(row) {
            *acc += widen(*v).powi(2);
        }
    }
    (held_out, y_te_mean, ss_tot)
}

/// The held-out statistics of one target batch that do not depend on the decomposition.
pub(super) struct HeldOut<'a> {
    /// The held-out row count.
    pub n_te: usize,
    /// SS_tot per target of the batch (around the held-out mean).
    pub ss_tot: &'a [f64],
    /// The held-out mean per target of the batch.
    pub y_te_mean: &'a [f64],
    /// The training mean per target of the batch (centered fits), else None.
    pub y_mean: Option<&'a [f64]>,
}

impl Scoring {
    /// From the held-out projection (n_te × rank) and the eigenvalues.
    pub(super) fn new<E: RidgeReal>(proj: &Mat<E>, values: Vec<f64>, alpha_max: f64) -> Self {
        let proj_sums = (0..proj.ncols())
            .map(|j| proj.col_as_slice(j).iter().map(|v| widen(*v)).sum())
            .collect();
        let (gap_product, gram_diag, clusters) =
            gap_terms(proj, &values, alpha_max, E::CLUSTER_GAP);
        Self {
            values,
            proj_sums,
            gap_product,
            gram_diag,
            clusters,
        }
    }

    /// Adds each alpha's held-out score of targets [t0, t0 + tb) into `sums [A, t]`, from
    /// z = Uᵀ-projected training targets (rank × tb) and cross = projᵀa (rank × tb).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_scores<E: RidgeReal>(
        &self,
        kind: CvScore,
        alphas: &[E],
        z: &Mat<E>,
        cross: &Mat<E>,
        held: &HeldOut<'_>,
        t: usize,
        t0: usize,
        sums: &mut [f64],
    ) {
        let tb = z.ncols();
        let n_te = held.n_te;
        let (rank, n_alphas) = (self.values.len(), alphas.len());
        let z = Mat::<f64>::from_fn(rank, tb, |j, c| widen(z[(j, c)]));
        let mut mz = Mat::<f64>::zeros(rank, tb);
        matmul(
            mz.as_mut(),
            Accum::Replace,
            self.gap_product.as_ref(),
            z.as_ref(),
            1.0,
            par(),
        );
        // Each sum is linear in 1/(s_j + α) (or its square): one product of per-target
        // weights [tb, rank] with the alphas' factors [rank, A] gives it for every alpha.
        let inv = Mat::<f64>::from_fn(rank, n_alphas, |j, a| {
            1.0 / (self.values[j] + widen(alphas[a]))
        });
        let inv_sq = Mat::<f64>::from_fn(rank, n_alphas, |j, a| inv[(j, a)].powi(2));
        let over_alphas =
            |weight: &dyn Fn(usize, usize) -> f64, factors: &Mat<f64>, dst: &mut Mat<f64>| {
                // built [rank, tb] like z (contiguous reads), used transposed
                let weights = Mat::<f64>::from_fn(rank, tb, weight);
                matmul(
                    dst.as_mut(),
                    Accum::Add,
                    weights.transpose(),
                    factors.as_ref(),
                    1.0,
                    par(),
                );
            };
        // Σŷ = Σ_j u_j z_j / (s_j + α), Σa·ŷ = Σ_j cross_j z_j / (s_j + α)
        let mut sum_pred_all = Mat::<f64>::zeros(tb, n_alphas);
        let mut sum_cross_all = Mat::<f64>::zeros(tb, n_alphas);
        let mut sum_sq_all = Mat::<f64>::zeros(tb, n_alphas);
        over_alphas(
            &|j, c| self.proj_sums[j] * z[(j, c)],
            &inv,
            &mut sum_pred_all,
        );
        over_alphas(
            &|j, c| widen(cross[(j, c)]) * z[(j, c)],
            &inv,
            &mut sum_cross_all,
        );
        // |ŷ|²: the partial-fraction terms, then the diagonal of singletons
        over_alphas(&|j, c| 2.0 * z[(j, c)] * mz[(j, c)], &inv, &mut sum_sq_all);
        over_alphas(
            &|j, c| self.gram_diag[j] * z[(j, c)].powi(2),
            &inv_sq,
            &mut sum_sq_all,
        );
        // and the pairs inside clusters, directly: d_Cᵀ G_CC d_C per alpha
        for (members, block) in &self.clusters {
            let size = members.len();
            let mut scaled_block = Mat::<f64>::zeros(size, tb);
            for a in 0..n_alphas {
                let d =
                    Mat::<f64>::from_fn(size, tb, |i, c| z[(members[i], c)] * inv[(members[i], a)]);
                matmul(
                    scaled_block.as_mut(),
                    Accum::Replace,
                    block.as_ref(),
                    d.as_ref(),
                    1.0,
                    Par::Seq,
                );
                for c in 0..tb {
                    let q: f64 = d
                        .col_as_slice(c)
                        .iter()
                        .zip(scaled_block.col_as_slice(c))
                        .map(|(x, y)| x * y)
                        .sum();
                    sum_sq_all[(c, a)] += q;
                }
            }
        }
        for a in 0..n_alphas {
            let row = &mut sums[a * t + t0..a * t + t0 + tb];
            let (sum_pred_all, sum_cross_all, sum_sq_all) =
                (&sum_pred_all, &sum_cross_all, &sum_sq_all);
            row.par_iter_mut().enumerate().for_each(|(c, acc)| {
                let (sum_pred, sum_cross) = (sum_pred_all[(c, a)], sum_cross_all[(c, a)]);
                let offset = held.y_mean.map_or(0.0, |m| m[c]);
                *acc += held_out_score(
                    kind,
                    n_te,
                    held.ss_tot[c],
                    sum_cross,
                    (sum_sq_all[(c, a)] - sum_pred * sum_pred / n_te as f64).max(0.0),
                    (sum_pred / n_te as f64 + offset) - held.y_te_mean[c],
                );
            });
        }
    }
}

impl<E: RidgeReal> Fold<E> {
    fn new(
        params: &CvParams,
        p: usize,
        t: usize,
        inputs: &CvInputs<'_, E>,
        train: &[usize],
        test: &[usize],
    ) -> Result<Self> {
        let x = inputs.x;
        let x_mean = params.center.then(|| means(x, p, train));
        let y_mean = params.center.then(|| means(inputs.y, t, train));
        let x_train = gather(x, p, train, 0, p, x_mean.as_deref());
        let x_test = gather(x, p, test, 0, p, x_mean.as_deref());
        let primal = train.len() >= p;
        let (vectors, values, proj) = if primal {
            let gram = product(x_train.transpose(), x_train.as_ref());
            let (v, s) = eigh(&gram, "training Gram matrix")?;
            let proj = product(x_test.as_ref(), v.as_ref());
            (v, s, proj)
        } else {
            let kernel = product(x_train.as_ref(), x_train.transpose());
            let (u, l) = eigh(&kernel, "training kernel matrix")?;
            let cross = product(x_test.as_ref(), x_train.transpose());
            let proj = product(cross.as_ref(), u.as_ref());
            (u, l, proj)
        };
        let alpha_max = inputs.alphas.iter().map(|a| widen(*a)).fold(0.0, f64::max);
        let scoring = Scoring::new(&proj, values, alpha_max);
        Ok(Self {
            y_mean,
            x_train,
            vectors,
            proj,
            scoring,
            primal,
        })
    }

    /// Adds each alpha's held-out score of targets [t0, t0 + tb) into `sums [A, t]`.
    #[allow(clippy::too_many_arguments)]
    fn score_batch(
        &self,
        params: &CvParams,
        inputs: &CvInputs<'_, E>,
        t: usize,
        t0: usize,
        tb: usize,
        train: &[usize],
        test: &[usize],
        sums: &mut [f64],
    ) -> Result<()> {
        let y_mean = self.y_mean.as_deref();
        let y_train = rows_of(inputs.y, t, train, t0, tb, y_mean);
        let y_train = MatRef::from_row_major_slice(&y_train, train.len(), tb);
        let z = if self.primal {
            let xty = product(self.x_train.transpose(), y_train);
            product(self.vectors.transpose(), xty.as_ref())
        } else {
            product(self.vectors.transpose(), y_train)
        };
        // held-out targets, centered on their own means: a (n_te × tb), SS_tot per target
        let n_te = test.len();
        let (held_out, y_te_mean, ss_tot) = held_out_batch(inputs.y, t, test, t0, tb);
        let centered = MatRef::from_row_major_slice(&held_out, n_te, tb);
        // projᵀ·a: the cross terms Σ a·ŷ of every alpha come from it
        let cross = product(self.proj.transpose(), centered);
        let held = HeldOut {
            n_te,
            ss_tot: &ss_tot,
            y_te_mean: &y_te_mean,
            y_mean: y_mean.map(|m| &m[t0..t0 + tb]),
        };
        self.scoring
            .add_scores(params.score, inputs.alphas, &z, &cross, &held, t, t0, sums);
        Ok(())
    }
}

/// The fold's scoring terms for |ŷ|² from proj and the eigenvalues (see the module doc):
/// (M, the diagonal of G for singletons, the clusters with their blocks of G). Eigenvalues
/// whose gap to the next smaller one is below `cluster_gap`·(s + α_max) join its cluster.
#[allow(clippy::type_complexity)]
fn gap_terms<E: RidgeReal>(
    proj: &Mat<E>,
    values: &[f64],
    alpha_max: f64,
    cluster_gap: f64,
) -> (Mat<f64>, Vec<f64>, Vec<(Vec<usize>, Mat<f64>)>) {
    let rank = values.len();
    let proj = Mat::<f64>::from_fn(proj.nrows(), rank, |i, j| widen(proj[(i, j)]));
    let mut gram = Mat::<f64>::zeros(rank, rank);
    matmul(
        gram.as_mut(),
        Accum::Replace,
        proj.transpose(),
        proj.as_ref(),
        1.0,
        par(),
    );
    let mut order: Vec<usize> = (0..rank).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    let mut cluster_of = vec![0usize; rank];
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (pos, &j) in order.iter().enumerate() {
        let joins = pos > 0 && {
            let below = values[order[pos - 1]];
            values[j] - below <= cluster_gap * (values[j] + alpha_max)
        };
        if !joins {
            members.push(Vec::new());
        }
        cluster_of[j] = members.len() - 1;
        members.last_mut().unwrap().push(j);
    }
    let gram_diag = (0..rank)
        .map(|j| {
            if members[cluster_of[j]].len() == 1 {
                gram[(j, j)]
            } else {
                0.0
            }
        })
        .collect();
    let clusters = members
        .into_iter()
        .filter(|m| m.len() > 1)
        .map(|m| {
            let block = Mat::<f64>::from_fn(m.len(), m.len(), |i, k| gram[(m[i], m[k])]);
            (m, block)
        })
        .collect();
    for k in 0..rank {
        for (j, g) in gram.col_as_slice_mut(k).iter_mut().enumerate() {
            *g = if cluster_of[j] == cluster_of[k] {
                0.0
            } else {
                *g / (values[k] - values[j])
            };
        }
    }
    (gram, gram_diag, clusters)
}

/// R² or Pearson from the sums of one target's held-out rows (a = y − ȳ, ŷ the prediction):
/// ss_tot = Σa², cross = Σa·ŷ, ss_pred = Σ(ŷ − mean ŷ)², shift = mean ŷ − ȳ. Then
/// SS_res = Σ(a − (ŷ − ȳ))² = ss_tot − 2·cross + ss_pred + n·shift² (Σa = 0).
pub(super) fn held_out_score(
    kind: CvScore,
    count: usize,
    ss_tot: f64,
    cross: f64,
    ss_pred: f64,
    shift: f64,
) -> f64 {
    match kind {
        CvScore::R2 => {
            if ss_tot == 0.0 {
                0.0
            } else {
                let ss_res = ss_tot - 2.0 * cross + ss_pred + count as f64 * shift * shift;
                1.0 - ss_res / ss_tot
            }
        }
        CvScore::Pearson => {
            let denom = (ss_tot * ss_pred).sqrt();
            if denom == 0.0 { 0.0 } else { cross / denom }
        }
    }
}

/// Refit on all rows with each target's chosen alpha: (w [p, t], intercept [t]).
#[allow(clippy::too_many_arguments)]
fn refit<E: RidgeReal>(
    params: &CvParams,
    n: usize,
    p: usize,
    t: usize,
    inputs: &CvInputs<'_, E>,
    chosen: &[f64],
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
    n_folds: usize,
) -> Result<(Vec<E>, Vec<E>)> {
    let all: Vec<usize> = (0..n).collect();
    let x_mean = params.center.then(|| means(inputs.x, p, &all));
    let y_mean = params.center.then(|| means(inputs.y, t, &all));
    let xc = gather(inputs.x, p, &all, 0, p, x_mean.as_deref());
    let primal = n >= p;
    let (vectors, values) = if primal {
        eigh(
            &product(xc.transpose(), xc.as_ref()),
            "Gram matrix of all rows",
        )?
    } else {
        eigh(
            &product(xc.as_ref(), xc.transpose()),
            "kernel matrix of all rows",
        )?
    };
    // W = back · (Z ∘ 1/(s + α_target)), back = V (primal) or Xᵀ U (dual)
    let back = if primal {
        vectors.clone()
    } else {
        product(xc.transpose(), vectors.as_ref())
    };
    let mut w = vec![E::default(); p * t];
    let batch = params.target_batch.max(1);
    let mut t0 = 0;
    while t0 < t {
        let tb = batch.min(t - t0);
        let yc = rows_of(inputs.y, t, &all, t0, tb, y_mean.as_deref());
        let yc = MatRef::from_row_major_slice(&yc, n, tb);
        let mut z = if primal {
            product(vectors.transpose(), product(xc.transpose(), yc).as_ref())
        } else {
            product(vectors.transpose(), yc)
        };
        for c in 0..tb {
            let alpha = chosen[t0 + c];
            for (i, s) in values.iter().enumerate() {
                z[(i, c)] *= cast::<E>(1.0 / (s + alpha));
            }
        }
        let wb = product(back.as_ref(), z.as_ref());
        for r in 0..p {
            for c in 0..tb {
                w[r * t + t0 + c] = wb[(r, c)];
            }
        }
        t0 += tb;
        if let Some(report) = progress {
            report(CvProgress {
                fold: n_folds,
                folds: n_folds,
                targets_done: t0,
                targets: t,
            });
        }
    }
    let intercept = intercepts(x_mean.as_deref(), y_mean.as_deref(), &w, p, t);
    Ok((w, intercept))
}
