//! `ridge.banded_cv` on the GPU ([`banded_cv_host`]): the CPU algorithm of
//! [`crate::ridge::banded_cv()`] with the products in cuBLAS, the eigendecompositions in
//! cuSOLVER and the scoring of `ridge.cv`'s CUDA path.
//!
//! Per fold, once: the centered training and held-out rows on the device and either the Gram
//! matrix XᵀX (primal, n_train ≥ p) or the per-space kernels X_s X_sᵀ and cross kernels
//! X_te,s X_sᵀ, stored `[S, ·]` in one buffer (dual). Per candidate: D·XᵀX·D (our scale
//! kernel, D = diag(√γ of each column's space)) or Σ_s γ_s K_s (our mix kernel), one
//! `syevd`, the held-out projection and the map from a target batch to Z; then every target
//! batch is scored for every alpha by `ridge.cv`'s kernels into a `[C, A, t]` f64 buffer.
//! Target batches are copied from host memory per (fold, candidate), so y need not fit on the
//! device. The choice per target is the CPU's own code ([`super::super::banded::select`]) on
//! the sums brought back; the refit decomposes once per chosen candidate.
//!
//! `ridge.split_scores` ([`split_scores_host`]): each space's prediction by cuBLAS and one
//! kernel for the centered sums.

use super::{CudaRidgeReal, Device};
use super::{
    CvKernels, CvRun, DeviceFold, Linalg, elementwise_config, int, split_batch, upload,
    upload_rows, upload_values,
};
use crate::cuda::{CudaElement, i64_dim, read_ptr, write_ptr};
use crate::error::{Error, Result};
use crate::ridge::banded::{
    BandedFit, BandedInputs, BandedProgress, BandedShape, SplitScores, check_inputs, check_split,
    column_scales, select,
};
use crate::ridge::cv::{CvInputs, CvParams, intercepts, means, rows_of};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

/// The kernels only banded ridge uses.
struct BandedKernels {
    /// dst = diag(row_scale)·src·diag(col_scale) (col_scale may be null).
    scale: CudaFunction,
    /// dst = Σ_s γ_s mats[s].
    mix: CudaFunction,
}

impl BandedKernels {
    fn load<E: CudaElement>(device: &Device) -> Result<Self> {
        let f = |op: &str| device.function("ridge", &format!("ridge_banded_{op}_{}", E::SUFFIX));
        Ok(Self {
            scale: f("scale")?,
            mix: f("mix")?,
        })
    }

    /// `dst = diag(rows)·src·diag(cols)` for column-major `[m, k]` matrices, `cols` absent
    /// meaning 1.
    fn scale<E: CudaRidgeReal>(
        &self,
        stream: &Arc<CudaStream>,
        dst: &mut CudaSlice<E>,
        src: &CudaSlice<E>,
        (rows, cols): (&CudaSlice<f64>, Option<&CudaSlice<f64>>),
        (m, k): (usize, usize),
    ) -> Result<()> {
        let total = m * k;
        if dst.len() < total
            || src.len() < total
            || rows.len() < m
            || cols.is_some_and(|c| c.len() < k)
        {
            return Err(Error::Cuda(format!(
                "internal: banded scale of [{m}, {k}] on buffers too small"
            )));
        }
        let (mi, ki) = (int(m, "x")?, int(k, "x")?);
        let (dp, _g1) = write_ptr(dst, stream);
        let (sp, _g2) = read_ptr(src, stream);
        let (rp, _g3) = read_ptr(rows, stream);
        let (cp, _g4) = match cols {
            Some(c) => {
                let (p, g) = read_ptr(c, stream);
                (p, Some(g))
            }
            None => (0u64, None),
        };
        // SAFETY: dst and src hold m·k elements, rows m and cols (when given) k values,
        // checked above; a null cols is read as ones by the kernel.
        unsafe {
            stream
                .launch_builder(&self.scale)
                .arg(&dp)
                .arg(&sp)
                .arg(&rp)
                .arg(&cp)
                .arg(&mi)
                .arg(&ki)
                .launch(elementwise_config(total))?;
        }
        Ok(())
    }

    /// `dst[..len] = Σ_s gamma[s] · mats[s·len..(s+1)·len]`.
    fn mix<E: CudaRidgeReal>(
        &self,
        stream: &Arc<CudaStream>,
        dst: &mut CudaSlice<E>,
        mats: &CudaSlice<E>,
        gamma: &CudaSlice<f64>,
        len: usize,
    ) -> Result<()> {
        let spaces = gamma.len();
        if dst.len() < len || spaces.checked_mul(len).is_none_or(|v| v > mats.len()) {
            return Err(Error::Cuda(format!(
                "internal: banded mix of {spaces} × {len} on buffers too small"
            )));
        }
        let (si, li) = (int(spaces, "gammas")?, i64_dim("x", "a kernel", len)?);
        let (dp, _g1) = write_ptr(dst, stream);
        let (mp, _g2) = read_ptr(mats, stream);
        let (gp, _g3) = read_ptr(gamma, stream);
        // SAFETY: dst holds len elements, mats S·len and gamma S values, checked above.
        unsafe {
            stream
                .launch_builder(&self.mix)
                .arg(&dp)
                .arg(&mp)
                .arg(&gp)
                .arg(&si)
                .arg(&li)
                .launch(elementwise_config(len))?;
        }
        Ok(())
    }
}

/// Row-major `[rows, |cols|]` copies of the given columns of a row-major `[rows, p]` matrix.
fn space_columns<E: Copy>(m: &[E], p: usize, cols: &[usize]) -> Vec<E> {
    m.chunks_exact(p.max(1))
        .flat_map(|row| cols.iter().map(move |&j| row[j]))
        .collect()
}

/// The part of a fold (or of all rows, for the refit) that every candidate shares.
enum Shared<E> {
    /// x_train's XᵀX (p × p), and the rows themselves: column-major Xᵀ (p × rows).
    Primal {
        gram: CudaSlice<E>,
        x_train: CudaSlice<E>,
        x_test: CudaSlice<E>,
    },
    /// `kernels [S, n_tr, n_tr]` and `cross [S, n_te, n_tr]` (column-major blocks).
    Dual {
        /// n_train, the kernels' order.
        order: usize,
        kernels: CudaSlice<E>,
        cross: CudaSlice<E>,
    },
}

/// One candidate's eigendecomposition: column-major square matrices.
struct Decomposition<E> {
    /// The eigenvalues, clamped at 0.
    values: Vec<f64>,
    /// The eigenvectors (columns).
    vectors: CudaSlice<E>,
    /// Primal form: D·V, the eigenvectors in the original column scale; dual: absent.
    scaled: Option<CudaSlice<E>>,
}

/// Everything one [`banded_cv_host`] call shares between its steps.
struct BandedRun<'a, E> {
    cv: CvRun<'a, E>,
    kernels: BandedKernels,
    inputs: &'a BandedInputs<'a, E>,
    columns: Vec<Vec<usize>>,
}

impl<E: CudaRidgeReal> BandedRun<'_, E> {
    fn la(&self) -> &Linalg {
        &self.cv.la
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.cv.la.stream
    }

    /// The shared products of training rows `train` and held-out rows `test` (may be empty:
    /// the refit), with x centered on the training rows' means when asked.
    fn shared(&self, train: &[usize], test: &[usize]) -> Result<Shared<E>> {
        let (p, la, stream) = (self.cv.p, self.la(), self.stream());
        let x = self.inputs.x;
        let x_mean = self.cv.params.center.then(|| means(x, p, train));
        let x_tr = rows_of(x, p, train, 0, p, x_mean.as_deref());
        let x_te = rows_of(x, p, test, 0, p, x_mean.as_deref());
        let (n_tr, n_te) = (train.len(), test.len());
        if n_tr >= p {
            let x_train = upload(stream, &x_tr)?;
            let x_test = upload(stream, &x_te)?;
            let mut gram = stream.alloc_zeros::<E>(p * p)?;
            la.gemm(
                (false, true),
                (p, p, n_tr),
                &x_train,
                p,
                &x_train,
                p,
                &mut gram,
                p,
            )?;
            return Ok(Shared::Primal {
                gram,
                x_train,
                x_test,
            });
        }
        let spaces = self.columns.len();
        let mut kernels = stream.alloc_zeros::<E>(spaces * n_tr * n_tr)?;
        let mut cross = stream.alloc_zeros::<E>((spaces * n_te * n_tr).max(1))?;
        for (s, cols) in self.columns.iter().enumerate() {
            let ps = cols.len();
            // row-major [rows, p_s] = column-major X_sᵀ (p_s × rows, ld p_s)
            let tr = upload(stream, &space_columns(&x_tr, p, cols))?;
            la.gemm_at(
                (true, false),
                (n_tr, n_tr, ps),
                (&tr, 0, ps),
                (&tr, 0, ps),
                (&mut kernels, s * n_tr * n_tr, n_tr),
            )?;
            if n_te > 0 {
                let te = upload(stream, &space_columns(&x_te, p, cols))?;
                la.gemm_at(
                    (true, false),
                    (n_te, n_tr, ps),
                    (&te, 0, ps),
                    (&tr, 0, ps),
                    (&mut cross, s * n_te * n_tr, n_te),
                )?;
            }
        }
        Ok(Shared::Dual {
            order: n_tr,
            kernels,
            cross,
        })
    }

    /// Candidate `gamma`'s decomposition (`d`: its column scales on the device); `what`
    /// names the matrix in errors.
    fn decompose(
        &self,
        shared: &Shared<E>,
        gamma: &[f64],
        d: &CudaSlice<f64>,
        what: &str,
    ) -> Result<Decomposition<E>> {
        let (la, stream) = (self.la(), self.stream());
        match shared {
            Shared::Primal { gram, .. } => {
                let p = self.cv.p;
                let mut v = stream.alloc_zeros::<E>(p * p)?;
                self.kernels
                    .scale(stream, &mut v, gram, (d, Some(d)), (p, p))?;
                let values = la.eigh(&mut v, p, what)?;
                let mut dv = stream.alloc_zeros::<E>(p * p)?;
                self.kernels.scale(stream, &mut dv, &v, (d, None), (p, p))?;
                Ok(Decomposition {
                    values,
                    vectors: v,
                    scaled: Some(dv),
                })
            }
            Shared::Dual { order, kernels, .. } => {
                let order = *order;
                let g = upload(stream, gamma)?;
                let mut u = stream.alloc_zeros::<E>(order * order)?;
                self.kernels
                    .mix(stream, &mut u, kernels, &g, order * order)?;
                let values = la.eigh(&mut u, order, what)?;
                Ok(Decomposition {
                    values,
                    vectors: u,
                    scaled: None,
                })
            }
        }
    }

    /// One candidate of one fold, ready for `ridge.cv`'s scoring.
    fn candidate_fold(
        &self,
        shared: &Shared<E>,
        gamma: &[f64],
        (train, test): (&[usize], &[usize]),
    ) -> Result<DeviceFold<E>> {
        let (la, stream) = (self.la(), self.stream());
        let (n_tr, n_te, p) = (train.len(), test.len(), self.cv.p);
        let d = upload(stream, &column_scales(gamma, self.inputs.groups))?;
        let what = match shared {
            Shared::Primal { .. } => "training Gram matrix",
            Shared::Dual { .. } => "training kernel matrix",
        };
        let Decomposition {
            values,
            vectors,
            scaled: dv,
        } = self.decompose(shared, gamma, &d, what)?;
        let (rank, proj, to_z) = match (shared, dv) {
            (
                Shared::Primal {
                    x_train, x_test, ..
                },
                Some(dv),
            ) => {
                // proj = X_te·DV; to_z = (DV)ᵀ·X_trᵀ
                let mut proj = stream.alloc_zeros::<E>(n_te * p)?;
                la.gemm(
                    (true, false),
                    (n_te, p, p),
                    x_test,
                    p,
                    &dv,
                    p,
                    &mut proj,
                    n_te,
                )?;
                let mut to_z = stream.alloc_zeros::<E>(p * n_tr)?;
                la.gemm(
                    (true, false),
                    (p, n_tr, p),
                    &dv,
                    p,
                    x_train,
                    p,
                    &mut to_z,
                    p,
                )?;
                (p, proj, to_z)
            }
            (Shared::Dual { cross, .. }, _) => {
                // proj = (Σ γ_s X_te,s X_sᵀ)·U; to_z = U
                let g = upload(stream, gamma)?;
                let mut mixed = stream.alloc_zeros::<E>(n_te * n_tr)?;
                self.kernels
                    .mix(stream, &mut mixed, cross, &g, n_te * n_tr)?;
                let mut proj = stream.alloc_zeros::<E>(n_te * n_tr)?;
                la.gemm(
                    (false, false),
                    (n_te, n_tr, n_tr),
                    &mixed,
                    n_te,
                    &vectors,
                    n_tr,
                    &mut proj,
                    n_te,
                )?;
                (n_tr, proj, vectors)
            }
            (Shared::Primal { .. }, None) => unreachable!("the primal form returns D·V"),
        };
        Ok(DeviceFold {
            primal: matches!(shared, Shared::Primal { .. }),
            rank,
            n_tr,
            n_te,
            values: upload_values(stream, &values)?,
            proj,
            to_z,
            train: upload_rows(stream, train)?,
            test: upload_rows(stream, test)?,
        })
    }

    /// Refit on all rows, one decomposition per chosen candidate: (w [p, t], intercept [t]).
    fn refit(
        &self,
        gammas: &[f64],
        (best_candidate, best_alpha): (&[usize], &[f64]),
        progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
        n_folds: usize,
    ) -> Result<(Vec<E>, Vec<E>)> {
        let (n, p, t) = (self.cv.n, self.cv.p, self.cv.t);
        let (la, stream) = (self.la(), self.stream());
        let spaces = self.columns.len();
        let n_cand = gammas.len() / spaces;
        let center = self.cv.params.center;
        let all: Vec<usize> = (0..n).collect();
        let x_mean = center.then(|| means(self.inputs.x, p, &all));
        // the targets' means as the device's split computes them, per part
        let mut y_mean = vec![0.0f64; t];
        let shared = self.shared(&all, &[])?;
        // the dual form's back-map needs X itself: column-major Xᵀ (p × n)
        let xc = match &shared {
            Shared::Primal { .. } => None,
            Shared::Dual { .. } => Some(upload(
                stream,
                &rows_of(self.inputs.x, p, &all, 0, p, x_mean.as_deref()),
            )?),
        };
        let rows = upload_rows(stream, &all)?;
        let no_rows = upload_rows(stream, &[])?;
        let mut w = vec![E::default(); p * t];
        let batch = self.cv.params.target_batch;
        for c in 0..n_cand {
            let chosen: Vec<usize> = (0..t).filter(|j| best_candidate[*j] == c).collect();
            if chosen.is_empty() {
                continue;
            }
            let gamma = &gammas[c * spaces..(c + 1) * spaces];
            let d = column_scales(gamma, self.inputs.groups);
            let d_dev = upload(stream, &d)?;
            let what = match &shared {
                Shared::Primal { .. } => "Gram matrix of all rows",
                Shared::Dual { .. } => "kernel matrix of all rows",
            };
            let Decomposition {
                values,
                vectors,
                scaled: dv,
            } = self.decompose(&shared, gamma, &d_dev, what)?;
            // w = back · (Z ∘ 1/(s + α)): primal back = D·V, Z = (DV)ᵀ·Xᵀ·Y;
            // dual back = diag(γ_g)·Xᵀ·U, Z = Uᵀ·Y
            let (rank, to_z, back) = match (&shared, dv, &xc) {
                (Shared::Primal { x_train, .. }, Some(dv), _) => {
                    let mut to_z = stream.alloc_zeros::<E>(p * n)?;
                    la.gemm((true, false), (p, n, p), &dv, p, x_train, p, &mut to_z, p)?;
                    (p, to_z, dv)
                }
                (Shared::Dual { .. }, _, Some(xc)) => {
                    let mut xtu = stream.alloc_zeros::<E>(p * n)?;
                    la.gemm((false, false), (p, n, n), xc, p, &vectors, n, &mut xtu, p)?;
                    let dd = upload(stream, &d.iter().map(|v| v * v).collect::<Vec<_>>())?;
                    let mut back = stream.alloc_zeros::<E>(p * n)?;
                    self.kernels
                        .scale(stream, &mut back, &xtu, (&dd, None), (p, n))?;
                    (n, vectors, back)
                }
                _ => unreachable!("the primal form returns D·V; the dual keeps X"),
            };
            let values = upload_values(stream, &values)?;
            for part in chosen.chunks(batch) {
                let k = part.len();
                let mut yb = Vec::with_capacity(n * k);
                for r in 0..n {
                    yb.extend(part.iter().map(|j| self.inputs.y[r * t + j]));
                }
                let yb = upload(stream, &yb)?;
                let split = split_batch(
                    stream,
                    &self.cv.kernels,
                    &yb,
                    (&rows, n),
                    (&no_rows, 0),
                    k,
                    center,
                )?;
                let mut z = stream.alloc_zeros::<E>(rank * k)?;
                let primal = matches!(shared, Shared::Primal { .. });
                la.gemm(
                    (!primal, true),
                    (rank, k, n),
                    &to_z,
                    rank,
                    &split.y_train,
                    k,
                    &mut z,
                    rank,
                )?;
                let alphas = upload(
                    stream,
                    &part.iter().map(|j| best_alpha[*j]).collect::<Vec<_>>(),
                )?;
                self.cv
                    .kernels
                    .scale_refit(stream, &mut z, &values, (&alphas, 0), (rank, k))?;
                // row-major [p, k] = column-major (k × p) = Zᵀ · backᵀ
                let mut wb = stream.alloc_zeros::<E>(p * k)?;
                la.gemm((true, true), (k, p, rank), &z, rank, &back, p, &mut wb, k)?;
                let wb = stream.clone_dtoh(&wb)?;
                for r in 0..p {
                    for (m, target) in part.iter().enumerate() {
                        w[r * t + target] = wb[r * k + m];
                    }
                }
                let part_means = stream.clone_dtoh(&split.train_mean)?;
                for (m, target) in part.iter().enumerate() {
                    y_mean[*target] = part_means[m];
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
        let intercept = intercepts(x_mean.as_deref(), Some(&y_mean), &w, p, t);
        Ok((w, intercept))
    }
}

/// `ridge.banded_cv` on the GPU, host in, host out, on the device's default stream: the same
/// inputs, checks, choice rules and outputs as the CPU [`crate::ridge::banded_cv()`]
/// (agreement to the element type's rounding: the products and decompositions are cuBLAS's
/// and cuSOLVER's). y stays in host memory and is copied one batch of `params.target_batch`
/// targets at a time, once per (fold, candidate) and once for the refit. What stays on the
/// device: one fold's rows and shared products (p² or 2·S·n_train² elements), one
/// candidate's decomposition and the `[C, A, t]` f64 score sums. `progress` is called after
/// each candidate of each fold and of the refit. Shapes with no target run the CPU path.
pub fn banded_cv_host<E: CudaRidgeReal>(
    device: &Device,
    params: &CvParams,
    shape: BandedShape,
    inputs: &BandedInputs<'_, E>,
    progress: Option<&(dyn Fn(BandedProgress) + Sync)>,
) -> Result<BandedFit<E>> {
    let (fold_rows, columns, n_cand) = check_inputs(params, shape, inputs)?;
    let (n, p, t, spaces) = (shape.samples, shape.features, shape.targets, shape.spaces);
    if t == 0 {
        return crate::ridge::banded_cv(params, shape, inputs, progress);
    }
    // every size the libraries and kernels see as i32
    int(n, "x")?;
    int(p, "x")?;
    int(params.target_batch.min(t), "y")?;
    let n_alphas = inputs.alphas.len();
    int(n_alphas, "alphas")?;
    let n_folds = fold_rows.len();
    let stream = device.stream();
    let cv_inputs = CvInputs {
        x: inputs.x,
        y: inputs.y,
        alphas: inputs.alphas,
        folds: inputs.folds,
    };
    let run = BandedRun {
        cv: CvRun {
            la: Linalg::new(stream)?,
            kernels: CvKernels::load::<E>(device)?,
            params,
            inputs: &cv_inputs,
            n,
            p,
            t,
        },
        kernels: BandedKernels::load::<E>(device)?,
        inputs,
        columns,
    };
    let gammas: Vec<f64> = inputs.gammas.iter().map(|g| g.to_f64()).collect();
    let block = n_alphas * t;
    let mut sums = stream.alloc_zeros::<f64>(n_cand * block)?;
    let batch = params.target_batch;
    for (f, test) in fold_rows.iter().enumerate() {
        let train: Vec<usize> = (0..n).filter(|i| inputs.folds[*i] as usize != f).collect();
        let shared = run.shared(&train, test)?;
        for c in 0..n_cand {
            let gamma = &gammas[c * spaces..(c + 1) * spaces];
            let fold = run.candidate_fold(&shared, gamma, (&train, test))?;
            let mut t0 = 0;
            while t0 < t {
                let tb = batch.min(t - t0);
                run.cv.score_batch(&fold, t0, tb, (&mut sums, c * block))?;
                t0 += tb;
            }
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
    let sums = stream.clone_dtoh(&sums)?;
    let chosen = select(&sums, inputs.alphas, &gammas, spaces, t, n_folds);
    let (w, intercept) = run.refit(
        &gammas,
        (&chosen.best_candidate, &chosen.best_alpha),
        progress,
        n_folds,
    )?;
    Ok(chosen.into_fit(w, intercept))
}

/// Target columns per batch of [`split_scores_host`]: the spaces' predictions of a batch
/// take S·n·`SPLIT_TARGETS` elements on the device.
const SPLIT_TARGETS: usize = 2048;

/// `ridge.split_scores` on the GPU, host in, host out, on the device's default stream: the
/// same inputs, checks and outputs as the CPU [`crate::ridge::split_scores()`] (agreement to
/// the element type's rounding). Per batch of targets, each space's prediction X_s·W_s by
/// cuBLAS, then one kernel for the centered sums of every (space, target), in f64. Shapes
/// with no row or no target run the CPU path.
pub fn split_scores_host<E: CudaRidgeReal>(
    device: &Device,
    shape: BandedShape,
    x: &[E],
    groups: &[i32],
    w: &[E],
    y: &[E],
) -> Result<SplitScores<E>> {
    let columns = check_split(shape, x, groups, w, y)?;
    let (n, p, t, spaces) = (shape.samples, shape.features, shape.targets, shape.spaces);
    if n == 0 || t == 0 {
        return crate::ridge::split_scores(shape, x, groups, w, y);
    }
    let batch = SPLIT_TARGETS.min(t);
    let (ni, si) = (int(n, "x")?, int(spaces, "groups")?);
    int(p, "x")?;
    int(batch, "w")?;
    spaces
        .checked_mul(n)
        .and_then(|v| v.checked_mul(batch))
        .and_then(|v| i64::try_from(v).ok())
        .ok_or_else(|| Error::overflow("x", format!("S·n·{batch} predictions of {shape:?}")))?;
    let stream = device.stream();
    let la = Linalg::new(stream)?;
    let kernel = device.function("ridge", &format!("ridge_split_scores_{}", E::SUFFIX))?;
    // each space's columns of x, row-major [n, p_s] = column-major X_sᵀ (p_s × n, ld p_s)
    let xs: Vec<CudaSlice<E>> = columns
        .iter()
        .map(|cols| upload(stream, &space_columns(x, p, cols)))
        .collect::<Result<_>>()?;
    let (mut r2, mut pearson) = (
        vec![E::default(); spaces * t],
        vec![E::default(); spaces * t],
    );
    let mut t0 = 0;
    while t0 < t {
        let tb = batch.min(t - t0);
        let yb = super::upload_batch(stream, y, n, t, t0, tb)?;
        let mut q = stream.alloc_zeros::<E>(spaces * n * tb)?;
        for (s, cols) in columns.iter().enumerate() {
            // W_s row-major [p_s, tb] = column-major W_sᵀ (tb × p_s, ld tb);
            // q_s row-major [n, tb] = column-major (tb × n) = W_sᵀ·X_sᵀ
            let ws: Vec<E> = cols
                .iter()
                .flat_map(|&j| w[j * t + t0..j * t + t0 + tb].iter().copied())
                .collect();
            let ws = upload(stream, &ws)?;
            let ps = cols.len();
            la.gemm_at(
                (false, false),
                (tb, n, ps),
                (&ws, 0, tb),
                (&xs[s], 0, ps),
                (&mut q, s * n * tb, tb),
            )?;
        }
        let mut means = stream.alloc_zeros::<f64>((spaces + 1) * tb)?;
        let mut r2b = stream.alloc_zeros::<E>(spaces * tb)?;
        let mut pearson_b = stream.alloc_zeros::<E>(spaces * tb)?;
        {
            let tbi = int(tb, "w")?;
            let (yp, _g1) = read_ptr(&yb, stream);
            let (qp, _g2) = read_ptr(&q, stream);
            let (mp, _g3) = write_ptr(&mut means, stream);
            let (rp, _g4) = write_ptr(&mut r2b, stream);
            let (pp, _g5) = write_ptr(&mut pearson_b, stream);
            // SAFETY: yb holds [n, tb], q [S, n, tb], means (S + 1)·tb values, r2b and
            // pearson_b [S, tb]; the kernel's block plan covers tb columns.
            unsafe {
                stream
                    .launch_builder(&kernel)
                    .arg(&yp)
                    .arg(&qp)
                    .arg(&si)
                    .arg(&ni)
                    .arg(&tbi)
                    .arg(&mp)
                    .arg(&rp)
                    .arg(&pp)
                    .launch(super::column_blocks(tb)?)?;
            }
        }
        let (r2b, pearson_b) = (stream.clone_dtoh(&r2b)?, stream.clone_dtoh(&pearson_b)?);
        for s in 0..spaces {
            r2[s * t + t0..s * t + t0 + tb].copy_from_slice(&r2b[s * tb..(s + 1) * tb]);
            pearson[s * t + t0..s * t + t0 + tb].copy_from_slice(&pearson_b[s * tb..(s + 1) * tb]);
        }
        t0 += tb;
    }
    Ok(SplitScores { r2, pearson })
}
