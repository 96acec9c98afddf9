//! `ridge.banded_cv`: banded ridge (himalaya's `BandedRidgeCV` with its random search over
//! per-space weights, the candidates given), and `ridge.split_scores`: the per-space share of
//! a fit's prediction score.
//!
//! The columns of `x [n, p]` belong to S feature spaces (`groups [p]`). Candidate c weights
//! space s by γ[c, s] (each row of `gammas [C, S]` on the simplex); with alpha α the model is
//! ridge on the columns scaled by `√γ[c, groups[j]]` with penalty α, i.e. kernel ridge with
//! K = Σ_s γ_s X_s X_sᵀ. Each target keeps the (candidate, alpha) with the best mean held-out
//! score: per candidate the best alpha (the largest among equal scores), then the best
//! candidate (the earliest among equal scores; himalaya replaces its best only on a strict
//! improvement too, by more than the dtype's epsilon).
//!
//! Per fold (after centering with the training rows' means when `center`):
//! * primal, n_train ≥ p: the unscaled Gram XᵀX (p × p) and the products XᵀY (training
//!   targets) and X_teᵀA (A: held-out targets centered on their own means) for every target,
//!   once. A candidate's Gram is D·XᵀX·D with D = `diag(√γ[groups[j]])` (the blocks scaled by
//!   √(γ_s γ_s')), its eigenvectors V give Z = (DV)ᵀXᵀY, the projection X_te·DV and
//!   projᵀA = (DV)ᵀX_teᵀA without touching the rows again;
//! * dual, n_train < p: the per-space kernels X_s X_sᵀ and cross kernels X_te,s X_sᵀ, once; a
//!   candidate's kernel is Σ γ_s X_s X_sᵀ.
//!
//! One eigendecomposition per (fold, candidate) then serves every alpha, scored exactly as
//! `ridge.cv` scores them (the same code: the predictions over alphas are never formed).
//! Targets stream in batches of `target_batch`. The refit on all rows decomposes once per
//! candidate that some target chose and maps the weights back to the original column scale
//! (w_j = `√γ_{groups[j]}` · w_scaled,j). Products and decompositions are faer's; the scores
//! are summed in f64; results are identical for any thread count.
//!
//! # Example
//!
//! Two feature spaces; the target depends on the first only, so the candidate that weights it
//! most wins, and the split puts the explained variance on it.
//!
//! ```
//! use neurokernels::ridge::{self, BandedInputs, BandedShape, CvParams};
//!
//! let (n, p, t) = (80, 6, 1);
//! let mut state = 12345u64;
//! let mut uniform = move || {
//!     state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
//!     (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
//! };
//! let x: Vec<f64> = (0..n * p).map(|_| uniform()).collect();
//! let groups = [0, 0, 0, 1, 1, 1]; // columns 0..3: space 0, 3..6: space 1
//! // y depends on space 0 only
//! let y: Vec<f64> = (0..n)
//!     .map(|i| x[i * p] - 2.0 * x[i * p + 1] + 0.5 * x[i * p + 2] + 0.05 * uniform())
//!     .collect();
//! let gammas = [0.5, 0.5, 0.95, 0.05, 0.05, 0.95]; // three candidates [C = 3, S = 2]
//! let alphas = [0.01, 0.1, 1.0, 10.0];
//! let folds: Vec<i32> = (0..n).map(|i| (i % 4) as i32).collect();
//! let shape = BandedShape::new(n, p, t, 2);
//! let inputs = BandedInputs {
//!     x: &x, groups: &groups, y: &y, alphas: &alphas, gammas: &gammas, folds: &folds,
//! };
//! let fit = ridge::banded_cv(&CvParams::new(), shape, &inputs, None)?;
//! assert_eq!(fit.best_candidate[0], 1); // most weight on space 0
//! assert!((fit.w[0] - 1.0).abs() < 0.1); // w [p, t] in the original column scale
//!
//! let split = ridge::split_scores(shape, &x, &groups, &fit.w, &y)?;
//! assert!(split.r2[0] > 0.95 && split.r2[1].abs() < 0.01); // [S, t]
//! # Ok::<(), neurokernels::Error>(())
//! ```

use super::cv::{
    CvParams, HeldOut, RidgeReal, Scoring, cast, eigh, fold_rows, gather, held_out_batch,
    intercepts, mean_score, means, par, product, rows_of, usable_alpha, widen,
};
use super::{check_finite, check_len};
use crate::error::{Error, Result};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};

/// How far a row of `gammas` may sum from 1 and still be on the simplex: 1e-5 absolute (the
/// sum is taken in f64; f32 draws of a Dirichlet sample sum to 1 within ~S·6e-8).
pub const SIMPLEX_TOLERANCE: f64 = 1e-5;

/// The sizes of a banded fit: `x [samples, features]`, `groups [features]` with values in
/// `0..spaces`, `y [samples, targets]`, `gammas [C, spaces]`, `w [features, targets]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BandedShape {
    /// Rows of x and y (n).
    pub samples: usize,
    /// Columns of x (p), over all spaces.
    pub features: usize,
    /// Columns of y (t), each its own regression.
    pub targets: usize,
    /// The number of feature spaces S (≥ 1, each with at least one column).
    pub spaces: usize,
}

impl BandedShape {
    /// `[samples, features]` designs of `spaces` feature spaces with `targets` targets.
    pub fn new(samples: usize, features: usize, targets: usize, spaces: usize) -> Self {
        Self {
            samples,
            features,
            targets,
            spaces,
        }
    }
}

/// The inputs of `ridge.banded_cv`: `x [n, p]`, `groups [p]`, `y [n, t]`, `alphas [A]`,
/// `gammas [C, S]`, `folds [n]`.
#[derive(Clone, Copy, Debug)]
pub struct BandedInputs<'a, E> {
    /// `[n, p]`: the design (all spaces' columns), finite.
    pub x: &'a [E],
    /// `[p]`: the feature space of each column, 0..S−1, every space used.
    pub groups: &'a [i32],
    /// `[n, t]`: the targets, finite; each column is its own regression.
    pub y: &'a [E],
    /// `[A]`: the candidate alphas, finite, > 0 and normal.
    pub alphas: &'a [E],
    /// `[C, S]` row-major: the candidate per-space weights, each row ≥ 0 and summing to 1
    /// within [`SIMPLEX_TOLERANCE`] (e.g. Dirichlet draws, as himalaya's random search).
    pub gammas: &'a [E],
    /// `[n]`: the fold of each sample, 0..F−1 (F ≥ 2, every id used).
    pub folds: &'a [i32],
}

/// Where a running `ridge.banded_cv` is: reported after each candidate of each fold, and
/// after each candidate of the refit (then `fold == folds`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BandedProgress {
    /// The fold being scored, or `folds` during the refit.
    pub fold: usize,
    /// The number of folds F.
    pub folds: usize,
    /// The candidate (row of `gammas`) just done.
    pub candidate: usize,
    /// The number of candidates C.
    pub candidates: usize,
}

/// Outputs of `ridge.banded_cv`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BandedFit<E> {
    /// `[C, t]`: per candidate, the mean held-out score (over folds, unweighted) of its best
    /// alpha.
    pub cv_scores: Vec<E>,
    /// `[S, t]`: log(γ[best, s] / α_best) (himalaya's `deltas_`); −inf where γ = 0.
    pub deltas: Vec<E>,
    /// `[t]`: the chosen candidate (row of `gammas`) of each target.
    pub best_candidate: Vec<usize>,
    /// `[t]`: the chosen alpha of each target.
    pub best_alpha: Vec<E>,
    /// `[p, t]`: refit on all rows with each target's choice, in the original column scale
    /// (predict with `x · w + intercept`).
    pub w: Vec<E>,
    /// `[t]`: mean(y) − mean(x)·w when centered, else 0.
    pub intercept: Vec<E>,
}

/// The outputs of `ridge.split_scores`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SplitScores<E> {
    /// `[S, t]`: each space's share of R² (himalaya's `r2_score_split`, product measure
    /// with correlations); sums over spaces to the R² of the prediction shifted to the
    /// targets' mean.
    pub r2: Vec<E>,
    /// `[S, t]`: each space's share of the Pearson correlation (himalaya's
    /// `correlation_score_split`); sums over spaces to the correlation of the prediction.
    pub pearson: Vec<E>,
}

/// `ridge.banded_cv` on the CPU: scores every (candidate, alpha) on every fold, picks each
/// target's best and refits on all samples. `params` as [`crate::ridge::cv()`] (`score`,
/// `center` default true, `target_batch` default 2048). `progress`, when given, is called
/// after each candidate of each fold and of the refit.
///
/// Working memory beside the outputs (`[C, A, t]` f64 score sums among them): per fold the
/// centered rows of x, and either XᵀX plus XᵀY and X_teᵀA for every target (2·p·t values,
/// primal) or S kernels and S cross kernels (dual); per candidate one decomposition (p × p or
/// n_train × n_train) and its scoring terms (rank × rank f64); per target batch the products
/// of that batch. Errors name the tensor: wrong lengths, NaN/Inf in x or y, a group id
/// outside 0..S−1 or a space without a column, a gamma row negative or off the simplex, bad
/// alphas or folds (as `ridge.cv`).
pub fn banded_cv<E: RidgeReal>(
    params: &CvParams,
    shape: BandedShape,
    inputs: &BandedInputs<'_, E>,
    progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
) -> Result<BandedFit<E>> {
    E::ridge_banded_cv(params, shape, inputs, progress)
}

/// `ridge.split_scores`: per feature space s and target, the share of the prediction score
/// of `x [n, p]` · `w [p, t]` against `y [n, t]` that the space's prediction ŷ_s = X_s w_s
/// carries. With a = y − ȳ and q_s = ŷ_s − mean(ŷ_s) (over the n rows):
/// * `r2[s]` = Σ_i (2 a_i q_s,i − q_s,i Σ_s' q_s',i) / Σ_i a_i²  (0 where Σa² = 0), which is
///   himalaya's `r2_score_split(a, q)`;
/// * `pearson[s]` = mean_i(a_i q_s,i) / (σ_a σ_Σq), population σ, a σ of 0 read as 1, which is
///   himalaya's `correlation_score_split(y, ŷ)`.
///
/// Both center, so an intercept (a constant shift of every ŷ) changes neither and is not an
/// input. Sums in f64.
pub fn split_scores<E: RidgeReal>(
    shape: BandedShape,
    x: &[E],
    groups: &[i32],
    w: &[E],
    y: &[E],
) -> Result<SplitScores<E>> {
    E::ridge_split_scores(shape, x, groups, w, y)
}

/// The checked sizes of a banded shape: (n·p, n·t, p·t, S·t).
fn sizes(shape: BandedShape) -> Result<(usize, usize, usize, usize)> {
    let BandedShape {
        samples: n,
        features: p,
        targets: t,
        spaces: s,
    } = shape;
    let fits = |v: Option<usize>, tensor: &str| {
        v.filter(|v| v.checked_mul(8).is_some())
            .ok_or_else(|| Error::overflow(tensor, format!("{shape:?} overflows")))
    };
    Ok((
        fits(n.checked_mul(p), "x")?,
        fits(n.checked_mul(t), "y")?,
        fits(p.checked_mul(t), "w")?,
        fits(s.checked_mul(t), "deltas")?,
    ))
}

/// `groups [p]`: every id in 0..S and every space used; returns the columns of each space.
fn check_groups(groups: &[i32], spaces: usize) -> Result<Vec<Vec<usize>>> {
    if spaces == 0 {
        return Err(Error::invalid("groups", "S = 0 feature spaces"));
    }
    if spaces > groups.len() {
        // every space needs a column: refused before anything is sized by S
        return Err(Error::invalid(
            "groups",
            format!(
                "S = {spaces} feature spaces need at least S columns (p = {})",
                groups.len()
            ),
        ));
    }
    if let Some(j) = groups.iter().position(|g| *g < 0 || *g as usize >= spaces) {
        return Err(Error::invalid(
            "groups",
            format!(
                "space ids must be 0..{} (groups[{j}] = {})",
                spaces - 1,
                groups[j]
            ),
        ));
    }
    let mut columns = vec![Vec::new(); spaces];
    for (j, g) in groups.iter().enumerate() {
        columns[*g as usize].push(j);
    }
    if let Some(s) = columns.iter().position(Vec::is_empty) {
        return Err(Error::invalid(
            "groups",
            format!("feature space {s} has no column (every space 0..S-1 must be used)"),
        ));
    }
    Ok(columns)
}

/// The rows of each fold, the columns of each space, and C.
pub(super) type Checked = (Vec<Vec<usize>>, Vec<Vec<usize>>, usize);

/// The checks of `ridge.banded_cv`'s inputs, before anything is allocated by them: returns
/// (the rows of each fold, the columns of each space, C).
pub(super) fn check_inputs<E: RidgeReal>(
    params: &CvParams,
    shape: BandedShape,
    inputs: &BandedInputs<'_, E>,
) -> Result<Checked> {
    let BandedShape {
        samples: n,
        features: p,
        targets: t,
        spaces,
    } = shape;
    let (xs, ys, _, _) = sizes(shape)?;
    check_len("x", inputs.x.len(), xs, &format!("[{n}, {p}]"))?;
    check_len("y", inputs.y.len(), ys, &format!("[{n}, {t}]"))?;
    check_len("groups", inputs.groups.len(), p, &format!("[{p}]"))?;
    check_len("folds", inputs.folds.len(), n, &format!("[{n}]"))?;
    if spaces == 0 || inputs.gammas.is_empty() || !inputs.gammas.len().is_multiple_of(spaces) {
        return Err(Error::shape(
            "gammas",
            format!("[C, {spaces}] with C ≥ 1 (S ≥ 1)"),
            format!("{} values", inputs.gammas.len()),
        ));
    }
    let candidates = inputs.gammas.len() / spaces;
    candidates
        .checked_mul(t)
        .and_then(|v| v.checked_mul(inputs.alphas.len().max(1)))
        .and_then(|v| v.checked_mul(8))
        .ok_or_else(|| Error::overflow("cv_scores", format!("C = {candidates}, {shape:?}")))?;
    let columns = check_groups(inputs.groups, spaces)?;
    for (c, row) in inputs.gammas.chunks_exact(spaces).enumerate() {
        let row: Vec<f64> = row.iter().map(|g| widen(*g)).collect();
        if let Some(s) = row.iter().position(|g| !(g.is_finite() && *g >= 0.0)) {
            return Err(Error::invalid(
                "gammas",
                format!(
                    "weights must be finite and >= 0 (gammas[{c}, {s}] = {})",
                    row[s]
                ),
            ));
        }
        let sum: f64 = row.iter().sum();
        if (sum - 1.0).abs() > SIMPLEX_TOLERANCE {
            return Err(Error::invalid(
                "gammas",
                format!(
                    "each row must lie on the simplex (sum 1 within {SIMPLEX_TOLERANCE}); \
                     row {c} sums to {sum}"
                ),
            ));
        }
    }
    check_finite("x", inputs.x)?;
    check_finite("y", inputs.y)?;
    if inputs.alphas.is_empty() {
        return Err(Error::invalid("alphas", "is empty"));
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
    if params.target_batch == 0 {
        return Err(Error::invalid("target_batch", "must be at least 1"));
    }
    Ok((fold_rows(inputs.folds)?, columns, candidates))
}

/// √γ of each column's space for one candidate's weights.
pub(super) fn column_scales(gamma: &[f64], groups: &[i32]) -> Vec<f64> {
    groups.iter().map(|g| gamma[*g as usize].sqrt()).collect()
}

/// `rows × cols` Mat of the given columns of `m`.
fn columns_of<E: RidgeReal>(m: &Mat<E>, cols: &[usize]) -> Mat<E> {
    Mat::from_fn(m.nrows(), cols.len(), |i, k| m[(i, cols[k])])
}

/// Σ_s γ_s · mats[s] (all the same shape), summed in f64.
fn weighted_sum<E: RidgeReal>(mats: &[Mat<E>], gamma: &[f64]) -> Mat<E> {
    let (r, c) = (mats[0].nrows(), mats[0].ncols());
    Mat::from_fn(r, c, |i, j| {
        let v: f64 = mats
            .iter()
            .zip(gamma)
            .map(|(m, g)| g * widen(m[(i, j)]))
            .sum();
        cast(v)
    })
}

/// D·G·D for D = diag(d), in f64 then rounded.
fn scaled_gram<E: RidgeReal>(gram: &Mat<E>, d: &[f64]) -> Mat<E> {
    Mat::from_fn(gram.nrows(), gram.ncols(), |i, j| {
        cast(widen(gram[(i, j)]) * d[i] * d[j])
    })
}

/// diag(d)·V.
fn scaled_rows<E: RidgeReal>(v: &Mat<E>, d: &[f64]) -> Mat<E> {
    Mat::from_fn(v.nrows(), v.ncols(), |i, j| cast(widen(v[(i, j)]) * d[i]))
}

/// The shared part of one fold: computed once, used by every candidate.
enum FoldData<E: RidgeReal> {
    Primal {
        /// XᵀX of the centered training rows (p × p).
        gram: Mat<E>,
        /// The centered held-out rows (n_te × p).
        x_test: Mat<E>,
        /// Xᵀ Y of the training rows, every target (p × t).
        xty: Mat<E>,
        /// X_teᵀ A, every target (p × t).
        xta: Mat<E>,
    },
    Dual {
        /// X_s X_sᵀ per space (n_tr × n_tr).
        kernels: Vec<Mat<E>>,
        /// X_te,s X_sᵀ per space (n_te × n_tr).
        cross: Vec<Mat<E>>,
    },
}

struct BandedFold<E: RidgeReal> {
    data: FoldData<E>,
    y_mean: Option<Vec<f64>>,
    /// Held-out means and SS_tot of every target.
    y_te_mean: Vec<f64>,
    ss_tot: Vec<f64>,
}

impl<E: RidgeReal> BandedFold<E> {
    fn new(
        params: &CvParams,
        shape: BandedShape,
        inputs: &BandedInputs<'_, E>,
        columns: &[Vec<usize>],
        train: &[usize],
        test: &[usize],
    ) -> Self {
        let (p, t) = (shape.features, shape.targets);
        let x_mean = params.center.then(|| means(inputs.x, p, train));
        let y_mean = params.center.then(|| means(inputs.y, t, train));
        let x_train = gather(inputs.x, p, train, 0, p, x_mean.as_deref());
        let x_test = gather(inputs.x, p, test, 0, p, x_mean.as_deref());
        let primal = train.len() >= p;
        let mut y_te_mean = vec![0.0; t];
        let mut ss_tot = vec![0.0; t];
        let (mut xty, mut xta) = if primal {
            (Mat::<E>::zeros(p, t), Mat::<E>::zeros(p, t))
        } else {
            (Mat::<E>::zeros(0, 0), Mat::<E>::zeros(0, 0))
        };
        let batch = params.target_batch;
        let mut t0 = 0;
        while t0 < t {
            let tb = batch.min(t - t0);
            let (held, mean, ss) = held_out_batch(inputs.y, t, test, t0, tb);
            y_te_mean[t0..t0 + tb].copy_from_slice(&mean);
            ss_tot[t0..t0 + tb].copy_from_slice(&ss);
            if primal {
                let y_tr = rows_of(inputs.y, t, train, t0, tb, y_mean.as_deref());
                let y_tr = MatRef::from_row_major_slice(&y_tr, train.len(), tb);
                let held = MatRef::from_row_major_slice(&held, test.len(), tb);
                let one = cast::<E>(1.0);
                matmul(
                    xty.as_mut().subcols_mut(t0, tb),
                    Accum::Replace,
                    x_train.transpose(),
                    y_tr,
                    one,
                    par(),
                );
                matmul(
                    xta.as_mut().subcols_mut(t0, tb),
                    Accum::Replace,
                    x_test.transpose(),
                    held,
                    one,
                    par(),
                );
            }
            t0 += tb;
        }
        let data = if primal {
            FoldData::Primal {
                gram: product(x_train.transpose(), x_train.as_ref()),
                x_test,
                xty,
                xta,
            }
        } else {
            let (mut kernels, mut cross) = (Vec::new(), Vec::new());
            for cols in columns {
                let tr = columns_of(&x_train, cols);
                let te = columns_of(&x_test, cols);
                kernels.push(product(tr.as_ref(), tr.transpose()));
                cross.push(product(te.as_ref(), tr.transpose()));
            }
            FoldData::Dual { kernels, cross }
        };
        Self {
            data,
            y_mean,
            y_te_mean,
            ss_tot,
        }
    }

    /// Adds each alpha's held-out score of candidate `gamma` into `sums [A, t]`.
    #[allow(clippy::too_many_arguments)]
    fn score_candidate(
        &self,
        params: &CvParams,
        inputs: &BandedInputs<'_, E>,
        t: usize,
        gamma: &[f64],
        train: &[usize],
        test: &[usize],
        sums: &mut [f64],
    ) -> Result<()> {
        let alpha_max = inputs.alphas.iter().map(|a| widen(*a)).fold(0.0, f64::max);
        let batch = params.target_batch;
        let n_te = test.len();
        let held_of = |t0: usize, tb: usize| HeldOut {
            n_te,
            ss_tot: &self.ss_tot[t0..t0 + tb],
            y_te_mean: &self.y_te_mean[t0..t0 + tb],
            y_mean: self.y_mean.as_deref().map(|m| &m[t0..t0 + tb]),
        };
        match &self.data {
            FoldData::Primal {
                gram,
                x_test,
                xty,
                xta,
            } => {
                let d = column_scales(gamma, inputs.groups);
                let (v, s) = eigh(&scaled_gram(gram, &d), "training Gram matrix")?;
                let dv = scaled_rows(&v, &d);
                drop(v);
                let proj = product(x_test.as_ref(), dv.as_ref());
                let scoring = Scoring::new(&proj, s, alpha_max);
                drop(proj);
                let mut t0 = 0;
                while t0 < t {
                    let tb = batch.min(t - t0);
                    let z = product(dv.transpose(), xty.as_ref().subcols(t0, tb));
                    let cross = product(dv.transpose(), xta.as_ref().subcols(t0, tb));
                    let held = held_of(t0, tb);
                    scoring.add_scores(params.score, inputs.alphas, &z, &cross, &held, t, t0, sums);
                    t0 += tb;
                }
            }
            FoldData::Dual { kernels, cross } => {
                let kernel = weighted_sum(kernels, gamma);
                let (u, l) = eigh(&kernel, "training kernel matrix")?;
                let proj = product(weighted_sum(cross, gamma).as_ref(), u.as_ref());
                let scoring = Scoring::new(&proj, l, alpha_max);
                let mut t0 = 0;
                while t0 < t {
                    let tb = batch.min(t - t0);
                    let y_tr = rows_of(inputs.y, t, train, t0, tb, self.y_mean.as_deref());
                    let y_tr = MatRef::from_row_major_slice(&y_tr, train.len(), tb);
                    let z = product(u.transpose(), y_tr);
                    let (a, _, _) = held_out_batch(inputs.y, t, test, t0, tb);
                    let a = MatRef::from_row_major_slice(&a, n_te, tb);
                    let cross = product(proj.transpose(), a);
                    let held = held_of(t0, tb);
                    scoring.add_scores(params.score, inputs.alphas, &z, &cross, &held, t, t0, sums);
                    t0 += tb;
                }
            }
        }
        Ok(())
    }
}

pub(super) fn banded_impl<E: RidgeReal>(
    params: &CvParams,
    shape: BandedShape,
    inputs: &BandedInputs<'_, E>,
    progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
) -> Result<BandedFit<E>> {
    let (fold_rows, columns, n_cand) = check_inputs(params, shape, inputs)?;
    let (n, t, spaces) = (shape.samples, shape.targets, shape.spaces);
    let n_alphas = inputs.alphas.len();
    let n_folds = fold_rows.len();
    let gammas: Vec<f64> = inputs.gammas.iter().map(|g| widen(*g)).collect();
    let gamma = |c: usize| &gammas[c * spaces..(c + 1) * spaces];

    // sums [C, A, t]
    let mut sums = vec![0.0f64; n_cand * n_alphas * t];
    for (f, test) in fold_rows.iter().enumerate() {
        let train: Vec<usize> = (0..n).filter(|i| inputs.folds[*i] as usize != f).collect();
        let fold = BandedFold::new(params, shape, inputs, &columns, &train, test);
        for c in 0..n_cand {
            let block = &mut sums[c * n_alphas * t..(c + 1) * n_alphas * t];
            fold.score_candidate(params, inputs, t, gamma(c), &train, test, block)?;
            if let Some(report) = progress {
                report(BandedProgress {
                    fold: f,
                    folds: n_folds,
                    candidate: c,
                    candidates: n_cand,
                });
            }
        }
    }
    let chosen = select(&sums, inputs.alphas, &gammas, spaces, t, n_folds);
    let (w, intercept) = refit(
        params,
        shape,
        inputs,
        &columns,
        &gammas,
        &chosen.best_candidate,
        &chosen.best_alpha,
        progress,
        n_folds,
    )?;
    Ok(chosen.into_fit(w, intercept))
}

/// What the held-out scores choose for every target.
pub(super) struct Selection {
    /// `[C, t]`: per candidate the mean score of its best alpha.
    pub cv_scores: Vec<f64>,
    /// `[t]`.
    pub best_candidate: Vec<usize>,
    /// `[t]`.
    pub best_alpha: Vec<f64>,
    /// `[S, t]`: log(γ[best, s] / α_best).
    pub deltas: Vec<f64>,
}

impl Selection {
    pub(super) fn into_fit<E: RidgeReal>(self, w: Vec<E>, intercept: Vec<E>) -> BandedFit<E> {
        BandedFit {
            cv_scores: self.cv_scores.into_iter().map(cast).collect(),
            deltas: self.deltas.into_iter().map(cast).collect(),
            best_candidate: self.best_candidate,
            best_alpha: self.best_alpha.into_iter().map(cast).collect(),
            w,
            intercept,
        }
    }
}

/// Each target's choice from the score sums `[C, A, t]` over `folds` folds: per candidate
/// the best alpha (the largest among equal scores), then the best candidate (the earliest
/// among equal scores). Shared by the CPU and CUDA paths so both choose alike.
pub(super) fn select<E: RidgeReal>(
    sums: &[f64],
    alphas: &[E],
    gammas: &[f64],
    spaces: usize,
    t: usize,
    n_folds: usize,
) -> Selection {
    let n_cand = gammas.len() / spaces;
    let n_alphas = alphas.len();
    let gamma = |c: usize| &gammas[c * spaces..(c + 1) * spaces];
    let mut cv_scores = vec![0.0f64; n_cand * t];
    let mut best_alpha_index = vec![0usize; n_cand * t];
    for c in 0..n_cand {
        for j in 0..t {
            let score = |a: usize| mean_score(sums[(c * n_alphas + a) * t + j], n_folds);
            let mut best = 0;
            for a in 1..n_alphas {
                let (sa, sb) = (score(a), score(best));
                if sa > sb || (sa == sb && widen(alphas[a]) > widen(alphas[best])) {
                    best = a;
                }
            }
            cv_scores[c * t + j] = score(best);
            best_alpha_index[c * t + j] = best;
        }
    }
    let best_candidate: Vec<usize> = (0..t)
        .map(|j| {
            let mut best = 0;
            for c in 1..n_cand {
                if cv_scores[c * t + j] > cv_scores[best * t + j] {
                    best = c;
                }
            }
            best
        })
        .collect();
    let best_alpha: Vec<f64> = (0..t)
        .map(|j| widen(alphas[best_alpha_index[best_candidate[j] * t + j]]))
        .collect();
    let mut deltas = vec![0.0f64; spaces * t];
    for j in 0..t {
        let g = gamma(best_candidate[j]);
        for s in 0..spaces {
            deltas[s * t + j] = (g[s] / best_alpha[j]).ln();
        }
    }
    Selection {
        cv_scores,
        best_candidate,
        best_alpha,
        deltas,
    }
}

/// Refit on all rows, one decomposition per chosen candidate: (w [p, t], intercept [t]).
#[allow(clippy::too_many_arguments)]
fn refit<E: RidgeReal>(
    params: &CvParams,
    shape: BandedShape,
    inputs: &BandedInputs<'_, E>,
    columns: &[Vec<usize>],
    gammas: &[f64],
    best_candidate: &[usize],
    best_alpha: &[f64],
    progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
    n_folds: usize,
) -> Result<(Vec<E>, Vec<E>)> {
    let (n, p, t, spaces) = (shape.samples, shape.features, shape.targets, shape.spaces);
    let n_cand = gammas.len() / spaces;
    let all: Vec<usize> = (0..n).collect();
    let x_mean = params.center.then(|| means(inputs.x, p, &all));
    let y_mean = params.center.then(|| means(inputs.y, t, &all));
    let xc = gather(inputs.x, p, &all, 0, p, x_mean.as_deref());
    let primal = n >= p;
    // primal: XᵀX; dual: X_s X_sᵀ per space
    let (gram, kernels) = if primal {
        (product(xc.transpose(), xc.as_ref()), Vec::new())
    } else {
        let kernels = columns
            .iter()
            .map(|cols| {
                let xs = columns_of(&xc, cols);
                product(xs.as_ref(), xs.transpose())
            })
            .collect();
        (Mat::<E>::zeros(0, 0), kernels)
    };
    let mut w = vec![E::default(); p * t];
    let batch = params.target_batch;
    for c in 0..n_cand {
        let chosen: Vec<usize> = (0..t).filter(|j| best_candidate[*j] == c).collect();
        if chosen.is_empty() {
            continue;
        }
        let gamma = &gammas[c * spaces..(c + 1) * spaces];
        let d = column_scales(gamma, inputs.groups);
        // the decomposition, and `back` with w_original = back · (Z ∘ 1/(s + α)):
        // primal D·V (Z = (DV)ᵀ Xᵀ Y); dual diag(γ_g) Xᵀ U (Z = Uᵀ Y)
        let (vectors, values, back) = if primal {
            let (v, s) = eigh(&scaled_gram(&gram, &d), "Gram matrix of all rows")?;
            let dv = scaled_rows(&v, &d);
            (dv.clone(), s, dv)
        } else {
            let (u, l) = eigh(&weighted_sum(&kernels, gamma), "kernel matrix of all rows")?;
            let xtu = product(xc.transpose(), u.as_ref());
            let dd: Vec<f64> = d.iter().map(|v| v * v).collect();
            let back = scaled_rows(&xtu, &dd);
            (u, l, back)
        };
        for part in chosen.chunks(batch) {
            let k = part.len();
            let yc = Mat::<E>::from_fn(n, k, |i, m| {
                let v = widen(inputs.y[i * t + part[m]]);
                cast(v - y_mean.as_ref().map_or(0.0, |ym| ym[part[m]]))
            });
            let mut z = if primal {
                product(
                    vectors.transpose(),
                    product(xc.transpose(), yc.as_ref()).as_ref(),
                )
            } else {
                product(vectors.transpose(), yc.as_ref())
            };
            for (m, target) in part.iter().enumerate() {
                let alpha = best_alpha[*target];
                for (i, s) in values.iter().enumerate() {
                    z[(i, m)] *= cast::<E>(1.0 / (s + alpha));
                }
            }
            let wb = product(back.as_ref(), z.as_ref());
            for r in 0..p {
                for (m, target) in part.iter().enumerate() {
                    w[r * t + target] = wb[(r, m)];
                }
            }
        }
        if let Some(report) = progress {
            report(BandedProgress {
                fold: n_folds,
                folds: n_folds,
                candidate: c,
                candidates: n_cand,
            });
        }
    }
    let intercept = intercepts(x_mean.as_deref(), y_mean.as_deref(), &w, p, t);
    Ok((w, intercept))
}

/// The checks of `ridge.split_scores`' inputs, before anything is allocated by them:
/// returns the columns of each space.
pub(super) fn check_split<E: RidgeReal>(
    shape: BandedShape,
    x: &[E],
    groups: &[i32],
    w: &[E],
    y: &[E],
) -> Result<Vec<Vec<usize>>> {
    let BandedShape {
        samples: n,
        features: p,
        targets: t,
        spaces,
    } = shape;
    let (xs, ys, ws, st) = sizes(shape)?;
    check_len("x", x.len(), xs, &format!("[{n}, {p}]"))?;
    check_len("groups", groups.len(), p, &format!("[{p}]"))?;
    check_len("w", w.len(), ws, &format!("[{p}, {t}]"))?;
    check_len("y", y.len(), ys, &format!("[{n}, {t}]"))?;
    let columns = check_groups(groups, spaces)?;
    check_finite("x", x)?;
    check_finite("w", w)?;
    check_finite("y", y)?;
    if n == 0 {
        // rule 3 of crate::error: with no rows only w carries t
        crate::error::check_backed("w", "t (n = 0 rows)", st, ws)?;
    }
    Ok(columns)
}

pub(super) fn split_impl<E: RidgeReal>(
    shape: BandedShape,
    x: &[E],
    groups: &[i32],
    w: &[E],
    y: &[E],
) -> Result<SplitScores<E>> {
    let BandedShape {
        samples: n,
        features: p,
        targets: t,
        spaces,
    } = shape;
    let columns = check_split(shape, x, groups, w, y)?;
    let st = spaces * t;
    let (mut r2, mut pearson) = (vec![E::default(); st], vec![E::default(); st]);
    if n == 0 || t == 0 {
        return Ok(SplitScores { r2, pearson });
    }
    let xm = MatRef::from_row_major_slice(x, n, p);
    let wm = MatRef::from_row_major_slice(w, p, t);
    // per space: ŷ_s = X_s w_s (n × t), column means removed, in f64
    const TARGETS: usize = 512;
    let mut t0 = 0;
    while t0 < t {
        let tb = TARGETS.min(t - t0);
        let preds: Vec<Mat<f64>> = columns
            .iter()
            .map(|cols| {
                let xs = Mat::<E>::from_fn(n, cols.len(), |i, k| xm[(i, cols[k])]);
                let wsub = Mat::<E>::from_fn(cols.len(), tb, |k, c| wm[(cols[k], t0 + c)]);
                let q = product(xs.as_ref(), wsub.as_ref());
                let mut q = Mat::<f64>::from_fn(n, tb, |i, c| widen(q[(i, c)]));
                for c in 0..tb {
                    let col = q.col_as_slice_mut(c);
                    let mean = col.iter().sum::<f64>() / n as f64;
                    col.iter_mut().for_each(|v| *v -= mean);
                }
                q
            })
            .collect();
        for c in 0..tb {
            let target = t0 + c;
            let mean = (0..n).map(|i| widen(y[i * t + target])).sum::<f64>() / n as f64;
            let a: Vec<f64> = (0..n).map(|i| widen(y[i * t + target]) - mean).collect();
            let sst: f64 = a.iter().map(|v| v * v).sum();
            let total: Vec<f64> = (0..n)
                .map(|i| preds.iter().map(|q| q[(i, c)]).sum())
                .collect();
            let ss_total: f64 = total.iter().map(|v| v * v).sum();
            let sd = |ss: f64| {
                let sd = (ss / n as f64).sqrt();
                if sd == 0.0 { 1.0 } else { sd }
            };
            let (sd_a, sd_pred) = (sd(sst), sd(ss_total));
            for (s, q) in preds.iter().enumerate() {
                let q = q.col_as_slice(c);
                let inter: f64 = a.iter().zip(q).map(|(a, q)| a * q).sum();
                let shared: f64 = q.iter().zip(&total).map(|(q, tot)| q * tot).sum();
                let r = if sst == 0.0 {
                    0.0
                } else {
                    (2.0 * inter - shared) / sst
                };
                r2[s * t + target] = cast(r);
                pearson[s * t + target] = cast(inter / n as f64 / (sd_a * sd_pred));
            }
        }
        t0 += tb;
    }
    Ok(SplitScores { r2, pearson })
}
