//! `ridge.cv`: one design matrix, many targets, an alpha per target chosen by
//! cross-validation over given folds.
//!
//! Per fold: center with the training rows' means (when `center`), then one symmetric
//! eigendecomposition of the training Gram matrix, reused for every alpha — XᵀX (p × p) when
//! the fold has at least p training rows, the dual XXᵀ (n_tr × n_tr) otherwise:
//!   primal: XᵀX = V diag(s) Vᵀ, Z = Vᵀ Xᵀ Y, pred_α = (X_te V) diag(1/(s+α)) Z;
//!   dual:   XXᵀ = U diag(λ) Uᵀ, Z = Uᵀ Y,    pred_α = (X_te Xᵀ U) diag(1/(λ+α)) Z;
//! (plus the training mean of y when centered). Targets stream in batches of
//! `target_batch`. The held-out predictions are never formed: with proj = X_te V (or
//! X_te Xᵀ U) = Q·R (one QR per fold) and d = diag(1/(s+α)) Z, the score needs only
//! Σŷ = 1ᵀproj·d, Σa·ŷ = (projᵀa)·d (a: the centered held-out targets, projᵀa once per
//! batch) and |ŷ|² = |R·d|², so each alpha costs one triangular product R·d
//! (rank²/2 · batch multiply-adds against n_te · rank · batch for forming ŷ) and
//! [alphas × held-out rows × targets] is never stored. The refit on all rows uses one
//! decomposition of the full Gram matrix and scales Z column by column with each target's
//! chosen alpha: W = V (Z ∘ 1/(s + α_target)).
//!
//! The dense products and the eigendecompositions are faer's (parallel over the rayon
//! pool); the centering, the batching, the scaling and the scoring are ours. Scores are
//! accumulated in f64. Eigenvalues below zero (rounding of a PSD Gram) are clamped to 0.
//! Results are identical for any thread count (tested); another `target_batch` changes the
//! shapes of the products and so their rounding (agreement to f32 rounding, tested).

use super::check_finite;
use crate::element::Element;
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;

/// The element types `ridge.cv` runs in: f32 and f64.
pub trait RidgeReal: Element + faer::traits::RealField {}
impl RidgeReal for f32 {}
impl RidgeReal for f64 {}

fn cast<E: Element>(x: f64) -> E {
    <E as Element>::from_f64(x)
}

fn widen<E: Element>(x: E) -> f64 {
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
pub struct CvParams {
    pub score: CvScore,
    /// Center x and y with the training rows' means and fit an intercept.
    pub center: bool,
    /// Targets per batch: the working memory is about (p + 2·n) · target_batch values
    /// beside the decompositions.
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
    pub fn new() -> Self {
        Self::default()
    }
    pub fn score(mut self, score: CvScore) -> Self {
        self.score = score;
        self
    }
    pub fn center(mut self, center: bool) -> Self {
        self.center = center;
        self
    }
    pub fn target_batch(mut self, targets: usize) -> Self {
        self.target_batch = targets.max(1);
        self
    }
}

/// Where a running `ridge.cv` is: reported after each target batch of each fold and after
/// the refit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CvProgress {
    /// The fold being scored, or `folds` during the refit.
    pub fold: usize,
    pub folds: usize,
    /// Targets of this fold (or of the refit) done so far.
    pub targets_done: usize,
    pub targets: usize,
}

/// Outputs of `ridge.cv`.
#[derive(Clone, Debug, PartialEq)]
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
    pub x: &'a [E],
    pub y: &'a [E],
    pub alphas: &'a [E],
    /// The fold of each sample, 0..F−1; each fold is held out once.
    pub folds: &'a [i32],
}

/// `ridge.cv` on the CPU for `x [samples, features]` and `y [samples, targets]`.
pub fn cv<E: RidgeReal>(
    params: &CvParams,
    samples: usize,
    features: usize,
    targets: usize,
    inputs: &CvInputs<'_, E>,
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
) -> Result<CvFit<E>> {
    let (n, p, t) = (samples, features, targets);
    let fold_rows = check_inputs(n, p, t, inputs)?;
    let n_alphas = inputs.alphas.len();
    let n_folds = fold_rows.len();

    let mut sums = vec![0.0f64; n_alphas * t];
    for (f, test) in fold_rows.iter().enumerate() {
        let train: Vec<usize> = (0..n).filter(|i| inputs.folds[*i] as usize != f).collect();
        let fold = Fold::new(params, p, t, inputs, &train, test)?;
        let batch = params.target_batch.max(1);
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
    let cv_scores: Vec<f64> = sums.iter().map(|s| s / n_folds as f64).collect();
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
    if let Some(i) = inputs
        .alphas
        .iter()
        .position(|a| !(widen(*a) > 0.0 && widen(*a).is_finite()))
    {
        return Err(Error::invalid(
            "alphas",
            format!(
                "must be finite and > 0 (alphas[{i}] = {})",
                widen(inputs.alphas[i])
            ),
        ));
    }
    fold_rows(inputs.folds)
}

/// The rows of each fold, checked: ids 0..F−1, each present, F ≥ 2.
fn fold_rows(folds: &[i32]) -> Result<Vec<Vec<usize>>> {
    if let Some(i) = folds.iter().position(|f| *f < 0) {
        return Err(Error::invalid(
            "folds",
            format!("fold ids must be >= 0 (folds[{i}] = {})", folds[i]),
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

fn par() -> Par {
    Par::rayon(0)
}

/// dst = a · b
fn product<E: RidgeReal>(a: MatRef<'_, E>, b: MatRef<'_, E>) -> Mat<E> {
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
fn gather<E: RidgeReal>(
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
fn eigh<E: RidgeReal>(gram: &Mat<E>, what: &str) -> Result<(Mat<E>, Vec<f64>)> {
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
/// one product `proj · diag(1/(s + α)) · Z`.
struct Fold<E: RidgeReal> {
    /// The training rows' means of y (centered fits), all targets.
    y_mean: Option<Vec<f64>>,
    /// Primal: Xᵀ of the centered training rows is needed for Z = Vᵀ Xᵀ Y.
    x_train: Mat<E>,
    /// Eigenvectors of the Gram matrix (V or U).
    vectors: Mat<E>,
    values: Vec<f64>,
    /// X_te V (primal) or X_te Xᵀ U (dual): n_te × rank.
    proj: Mat<E>,
    /// R of proj = Q·R (min(n_te, rank) × rank, upper triangular when square):
    /// |proj·d|² = |R·d|², so the held-out predictions never need forming.
    r_factor: Mat<E>,
    /// Column sums of proj (over the held-out rows), in f64.
    proj_sums: Vec<f64>,
    primal: bool,
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
        let r_factor = proj.qr().thin_R().to_owned();
        let proj_sums = (0..proj.ncols())
            .map(|j| proj.col_as_slice(j).iter().map(|v| widen(*v)).sum())
            .collect();
        Ok(Self {
            y_mean,
            x_train,
            vectors,
            values,
            proj,
            r_factor,
            proj_sums,
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
        let mut held_out = rows_of(inputs.y, t, test, t0, tb, None);
        let y_te_mean = means(&held_out, tb, &(0..n_te).collect::<Vec<_>>());
        for row in held_out.chunks_exact_mut(tb) {
            for (v, m) in row.iter_mut().zip(&y_te_mean) {
                *v = cast(widen(*v) - m);
            }
        }
        let centered = MatRef::from_row_major_slice(&held_out, n_te, tb);
        let mut ss_tot = vec![0.0f64; tb];
        for row in held_out.chunks_exact(tb) {
            for (acc, v) in ss_tot.iter_mut().zip(row) {
                *acc += widen(*v).powi(2);
            }
        }
        // projᵀ·a: the cross terms Σ a·ŷ of every alpha come from it
        let cross = product(self.proj.transpose(), centered);
        // Σŷ and Σa·ŷ of every (target, alpha) at once, in f64:
        // Σ_j u_j z_jc / (s_j + α) and Σ_j cross_jc z_jc / (s_j + α)
        let (rank, n_alphas) = (self.values.len(), inputs.alphas.len());
        let inv_all = Mat::<f64>::from_fn(rank, n_alphas, |j, a| {
            1.0 / (self.values[j] + widen(inputs.alphas[a]))
        });
        let weighted_sums =
            Mat::<f64>::from_fn(tb, rank, |c, j| self.proj_sums[j] * widen(z[(j, c)]));
        let weighted_cross =
            Mat::<f64>::from_fn(tb, rank, |c, j| widen(cross[(j, c)]) * widen(z[(j, c)]));
        let mut sum_pred_all = Mat::<f64>::zeros(tb, n_alphas);
        let mut sum_cross_all = Mat::<f64>::zeros(tb, n_alphas);
        matmul(
            sum_pred_all.as_mut(),
            Accum::Replace,
            weighted_sums.as_ref(),
            inv_all.as_ref(),
            1.0,
            par(),
        );
        matmul(
            sum_cross_all.as_mut(),
            Accum::Replace,
            weighted_cross.as_ref(),
            inv_all.as_ref(),
            1.0,
            par(),
        );
        let square = self.r_factor.nrows() == rank;
        let mut scaled = Mat::<E>::zeros(rank, tb);
        let mut reduced = Mat::<E>::zeros(self.r_factor.nrows(), tb);
        // the element-type copy of inv_all, reused by every pass over the alphas
        let inv_elem = Mat::<E>::from_fn(rank, n_alphas, |j, a| cast(inv_all[(j, a)]));
        for a in 0..n_alphas {
            let inv = inv_elem.col_as_slice(a);
            for c in 0..tb {
                for ((d, x), i) in scaled
                    .col_as_slice_mut(c)
                    .iter_mut()
                    .zip(z.col_as_slice(c))
                    .zip(inv)
                {
                    *d = *x * *i;
                }
            }
            // R·(D z): |ŷ − offset|² per target without forming ŷ
            triangular::matmul(
                reduced.as_mut(),
                BlockStructure::Rectangular,
                Accum::Replace,
                self.r_factor.as_ref(),
                if square {
                    BlockStructure::TriangularUpper
                } else {
                    BlockStructure::Rectangular
                },
                scaled.as_ref(),
                BlockStructure::Rectangular,
                cast::<E>(1.0),
                par(),
            );
            let row = &mut sums[a * t + t0..a * t + t0 + tb];
            let reduced = &reduced;
            let (sum_pred_all, sum_cross_all) = (&sum_pred_all, &sum_cross_all);
            row.par_iter_mut().enumerate().for_each(|(c, acc)| {
                let (sum_pred, sum_cross) = (sum_pred_all[(c, a)], sum_cross_all[(c, a)]);
                let sum_sq: f64 = reduced
                    .col_as_slice(c)
                    .iter()
                    .map(|v| widen(*v).powi(2))
                    .sum();
                let offset = y_mean.map_or(0.0, |m| m[t0 + c]);
                *acc += held_out_score(
                    params.score,
                    n_te,
                    ss_tot[c],
                    sum_cross,
                    (sum_sq - sum_pred * sum_pred / n_te as f64).max(0.0),
                    (sum_pred / n_te as f64 + offset) - y_te_mean[c],
                );
            });
        }
        Ok(())
    }
}

/// R² or Pearson from the sums of one target's held-out rows (a = y − ȳ, ŷ the prediction):
/// ss_tot = Σa², cross = Σa·ŷ, ss_pred = Σ(ŷ − mean ŷ)², shift = mean ŷ − ȳ. Then
/// SS_res = Σ(a − (ŷ − ȳ))² = ss_tot − 2·cross + ss_pred + n·shift² (Σa = 0).
fn held_out_score(
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
    let intercept = (0..t)
        .map(|c| match (&x_mean, &y_mean) {
            (Some(xm), Some(ym)) => {
                let dot: f64 = (0..p).map(|r| xm[r] * widen(w[r * t + c])).sum();
                cast(ym[c] - dot)
            }
            _ => E::default(),
        })
        .collect();
    Ok((w, intercept))
}
