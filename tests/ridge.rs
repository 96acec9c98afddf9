//! ridge.solve_batched and ridge.score on the CPU: the normal equations hold in float64 for
//! primal (n >= p) and dual (n < p) problems, f32 agrees with f64, results do not depend on
//! the thread count, the score conventions (constant columns give 0), and bad input.

mod common;

use common::Rng;
use neurokernels::ridge::{self, BatchedShape, RidgeShape, Scores};

/// max over problems of |(XᵀX + αI)w − XᵀY| relative to |XᵀY|, in f64.
fn normal_equation_residual(
    s: BatchedShape,
    x: &[f64],
    y: &[f64],
    alpha: &[f64],
    w: &[f64],
) -> f64 {
    let (n, p, t) = (s.samples, s.features, s.targets);
    let mut worst: f64 = 0.0;
    for g in 0..s.problems {
        let (xg, yg, wg) = (&x[g * n * p..], &y[g * n * t..], &w[g * p * t..]);
        for a in 0..p {
            for c in 0..t {
                let mut lhs = alpha[g] * wg[a * t + c];
                let mut rhs = 0.0;
                for i in 0..n {
                    let pred: f64 = (0..p).map(|b| xg[i * p + b] * wg[b * t + c]).sum();
                    lhs += xg[i * p + a] * pred;
                    rhs += xg[i * p + a] * yg[i * t + c];
                }
                worst = worst.max((lhs - rhs).abs() / (1.0 + rhs.abs()));
            }
        }
    }
    worst
}

#[test]
fn solutions_satisfy_the_normal_equations_primal_and_dual() {
    // orders past one factorization block (16) and depths past one product chunk (64)
    let shapes = [
        (3, 40, 7, 2),
        (4, 9, 30, 3),
        (1, 1, 1, 1),
        (2, 12, 12, 5),
        (2, 150, 37, 3),
        (2, 45, 100, 4),
        (1, 300, 70, 17),
    ];
    for (i, &(g, n, p, t)) in shapes.iter().enumerate() {
        let s = BatchedShape::new(g, n, p, t);
        let mut rng = Rng::new(40 + i as u64);
        let x: Vec<f64> = rng.vec(g * n * p, -1.0, 1.0);
        let y: Vec<f64> = rng.vec(g * n * t, -1.0, 1.0);
        let alpha: Vec<f64> = rng.vec(g, 0.01, 3.0);
        let w = ridge::solve_batched(s, &x, &y, &alpha).unwrap();
        let r = normal_equation_residual(s, &x, &y, &alpha, &w);
        assert!(r < 1e-10, "{s:?}: residual {r}");
        // f32 inputs: the same solution to f32 precision
        let (xf, yf, af): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            x.iter().map(|v| *v as f32).collect(),
            y.iter().map(|v| *v as f32).collect(),
            alpha.iter().map(|v| *v as f32).collect(),
        );
        let wf = ridge::solve_batched(s, &xf, &yf, &af).unwrap();
        let x64: Vec<f64> = xf.iter().map(|v| *v as f64).collect();
        let y64: Vec<f64> = yf.iter().map(|v| *v as f64).collect();
        let a64: Vec<f64> = af.iter().map(|v| *v as f64).collect();
        let w_exact = ridge::solve_batched(s, &x64, &y64, &a64).unwrap();
        for (got, want) in wf.iter().zip(&w_exact) {
            assert!(
                (*got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{s:?}: f32 {got} vs f64 {want}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let s = BatchedShape::new(9, 20, 11, 3);
    let mut rng = Rng::new(50);
    let x: Vec<f32> = rng.vec(9 * 20 * 11, -1.0, 1.0);
    let y: Vec<f32> = rng.vec(9 * 20 * 3, -1.0, 1.0);
    let alpha: Vec<f32> = rng.vec(9, 0.1, 2.0);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| ridge::solve_batched(s, &x, &y, &alpha).unwrap())
    };
    let base = run(1);
    for threads in [2, 5] {
        assert!(run(threads) == base, "{threads} threads");
    }
}

#[test]
fn score_conventions() {
    // columns: perfect, constant target, constant prediction, anti-correlated
    let n = 6;
    let y_true: Vec<f64> = (0..n)
        .flat_map(|i| {
            let v = i as f64;
            [v, 1.5, v, v]
        })
        .collect();
    let y_pred: Vec<f64> = (0..n)
        .flat_map(|i| {
            let v = i as f64;
            [v, 0.3 * v, 2.0, -2.0 * v]
        })
        .collect();
    let Scores { r2, pearson, .. } =
        ridge::score(RidgeShape::new(n, 0, 4), &y_true, &y_pred).unwrap();
    assert_eq!(r2[0], 1.0);
    assert_eq!(pearson[0], 1.0);
    assert_eq!(r2[1], 0.0, "constant target: R² defined as 0");
    assert_eq!(pearson[1], 0.0, "constant target: Pearson defined as 0");
    assert_eq!(pearson[2], 0.0, "constant prediction: Pearson defined as 0");
    assert!((pearson[3] + 1.0).abs() < 1e-12);
    // R² of a constant prediction at 2.0: 1 − Σ(y − 2)² / Σ(y − ȳ)²
    let mean = 2.5;
    let ss_tot: f64 = (0..n).map(|i| (i as f64 - mean).powi(2)).sum();
    let ss_res: f64 = (0..n).map(|i| (i as f64 - 2.0).powi(2)).sum();
    assert!((r2[2] - (1.0 - ss_res / ss_tot)).abs() < 1e-12);
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let s = BatchedShape::new(2, 3, 2, 1);
    let x = vec![0.5f32; 12];
    let y = vec![0.5f32; 6];
    let alpha = vec![1.0f32; 2];
    let msg = |e: neurokernels::Error| e.to_string();
    assert!(msg(ridge::solve_batched(s, &x[..11], &y, &alpha).unwrap_err()).contains("x"));
    assert!(msg(ridge::solve_batched(s, &x, &y[..5], &alpha).unwrap_err()).contains("y"));
    assert!(msg(ridge::solve_batched(s, &x, &y, &alpha[..1]).unwrap_err()).contains("alpha"));
    for bad in [0.0f32, -1.0, f32::NAN] {
        let e = msg(ridge::solve_batched(s, &x, &y, &[1.0, bad]).unwrap_err());
        assert!(e.contains("alpha") && e.contains("problem 1"), "{e}");
    }
    // NaN/Inf are found per problem during the solve; the error is still that of checking
    // x, then y, then alpha up front
    let mut x_nan = x.clone();
    x_nan[7] = f32::NAN;
    let e = msg(ridge::solve_batched(s, &x_nan, &y, &alpha).unwrap_err());
    assert!(e.contains("x") && e.contains("flat index 7"), "{e}");
    let e = msg(ridge::solve_batched(s, &x_nan, &y, &[1.0, -1.0]).unwrap_err());
    assert!(e.contains("x") && e.contains("flat index 7"), "{e}");
    let mut y_inf = y.clone();
    y_inf[4] = f32::INFINITY;
    let e = msg(ridge::solve_batched(s, &x, &y_inf, &alpha).unwrap_err());
    assert!(e.starts_with("y") || e.contains("`y`"), "{e}");
    assert!(e.contains("flat index 4"), "{e}");
    let e = msg(ridge::solve_batched(s, &x_nan, &y_inf, &alpha).unwrap_err());
    assert!(e.contains("flat index 7"), "x is checked before y: {e}");
    assert!(
        msg(ridge::score(RidgeShape::new(3, 0, 2), &y, &y[..5]).unwrap_err()).contains("y_pred")
    );
    assert!(
        msg(ridge::score(RidgeShape::new(3, 0, 2), &y_inf, &y).unwrap_err()).contains("y_true")
    );
    // empty batch: Ok, nothing to solve
    assert!(
        ridge::solve_batched::<f32>(BatchedShape::new(0, 3, 2, 1), &[], &[], &[])
            .unwrap()
            .is_empty()
    );
}

/// ridge.cv against a direct computation: per fold and alpha, center with the training means,
/// solve by Cholesky (`solve_batched`, an independent route from cv's eigendecomposition),
/// predict and score with `ridge::score`; then the best alpha and the refit.
fn check_cv(
    n: usize,
    p: usize,
    t: usize,
    folds_of: impl Fn(usize) -> i32,
    score: ridge::CvScore,
    center: bool,
) {
    check_cv_design(n, p, t, folds_of, score, center, Design::Random)
}

/// The x of `check_cv_design`.
#[derive(Clone, Copy, PartialEq)]
enum Design {
    Random,
    /// The second half of the columns repeats the first: half the Gram matrix's
    /// eigenvalues are 0.
    RepeatedColumns,
    /// Outside fold 0, row i is row i / folds of a p × p Hadamard matrix (p a power of 2,
    /// n = folds · p, fold = i % folds), moved by 1e-9: the training Gram matrix of fold 0
    /// is nearly a multiple of the identity, so its eigenvalues (but the centered-away one)
    /// are nearly equal, which cv's scoring must sum as one cluster (partial fractions
    /// would divide by their tiny gaps); fold 0's random rows make the held-out Gram
    /// matrix G generic.
    Hadamard,
}

fn check_cv_design(
    n: usize,
    p: usize,
    t: usize,
    folds_of: impl Fn(usize) -> i32,
    score: ridge::CvScore,
    center: bool,
    design: Design,
) {
    let mut rng = Rng::new((n * 1000 + p) as u64);
    let mut x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    for (i, row) in x.chunks_exact_mut(p).enumerate() {
        match design {
            Design::RepeatedColumns => {
                for j in p / 2..p {
                    row[j] = row[j - p / 2];
                }
            }
            Design::Hadamard if folds_of(i) != 0 => {
                let h = i / (n / p);
                // ±1, moved by 1e-9 so that the equal eigenvalues differ by rounding-size
                // gaps (the x of the Random draw supplies the moves)
                for (j, v) in row.iter_mut().enumerate() {
                    let sign = if (h & j).count_ones().is_multiple_of(2) {
                        1.0
                    } else {
                        -1.0
                    };
                    *v = sign + 1e-9 * *v;
                }
            }
            Design::Random | Design::Hadamard => {}
        }
    }
    let mut y: Vec<f64> = rng.vec(n * t, -1.0, 1.0);
    // signal of varying strength per target, so different targets choose different alphas
    for c in 0..t {
        for i in 0..n {
            y[i * t + c] += (c as f64) * x[i * p + c % p] + 0.5 * x[i * p + (c + 1) % p];
        }
    }
    let alphas = [0.05, 1.0, 20.0, 400.0];
    let folds: Vec<i32> = (0..n).map(&folds_of).collect();
    let params = ridge::CvParams::new()
        .score(score)
        .center(center)
        .target_batch(2);
    let inputs = ridge::CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let reports = std::sync::Mutex::new(Vec::new());
    let record = |r: ridge::CvProgress| reports.lock().unwrap().push(r);
    let fit = ridge::cv(&params, RidgeShape::new(n, p, t), &inputs, Some(&record)).unwrap();
    let n_folds = *folds.iter().max().unwrap() as usize + 1;
    let last = *reports.lock().unwrap().last().unwrap();
    assert_eq!(
        (last.fold, last.targets_done, last.targets),
        (n_folds, t, t),
        "the last report is the end of the refit"
    );

    let fit_direct = |rows: &[usize], alpha: f64| -> (Vec<f64>, Vec<f64>) {
        // (w [p, t], intercept [t]) from the given rows
        let k = rows.len();
        let mean = |data: &[f64], width: usize, c: usize| {
            if center {
                rows.iter().map(|r| data[r * width + c]).sum::<f64>() / k as f64
            } else {
                0.0
            }
        };
        let xm: Vec<f64> = (0..p).map(|c| mean(&x, p, c)).collect();
        let ym: Vec<f64> = (0..t).map(|c| mean(&y, t, c)).collect();
        let xs: Vec<f64> = rows
            .iter()
            .flat_map(|r| (0..p).map(|c| x[r * p + c] - xm[c]).collect::<Vec<_>>())
            .collect();
        let ys: Vec<f64> = rows
            .iter()
            .flat_map(|r| (0..t).map(|c| y[r * t + c] - ym[c]).collect::<Vec<_>>())
            .collect();
        let w = ridge::solve_batched(BatchedShape::new(1, k, p, t), &xs, &ys, &[alpha]).unwrap();
        let b = (0..t)
            .map(|c| ym[c] - (0..p).map(|r| xm[r] * w[r * t + c]).sum::<f64>())
            .collect();
        (w, b)
    };
    let mut want_scores = vec![0.0; alphas.len() * t];
    for f in 0..n_folds {
        let train: Vec<usize> = (0..n).filter(|i| folds[*i] as usize != f).collect();
        let test: Vec<usize> = (0..n).filter(|i| folds[*i] as usize == f).collect();
        for (a, alpha) in alphas.iter().enumerate() {
            let (w, b) = fit_direct(&train, *alpha);
            let mut truth = Vec::new();
            let mut pred = Vec::new();
            for r in &test {
                for c in 0..t {
                    truth.push(y[r * t + c]);
                    pred.push(b[c] + (0..p).map(|j| x[r * p + j] * w[j * t + c]).sum::<f64>());
                }
            }
            let Scores { r2, pearson, .. } =
                ridge::score(RidgeShape::new(test.len(), 0, t), &truth, &pred).unwrap();
            let s = if score == ridge::CvScore::R2 {
                r2
            } else {
                pearson
            };
            for c in 0..t {
                want_scores[a * t + c] += s[c] / n_folds as f64;
            }
        }
    }
    for (got, want) in fit.cv_scores.iter().zip(&want_scores) {
        assert!((got - want).abs() < 1e-9, "cv score {got} vs {want}");
    }
    for c in 0..t {
        let best = (0..alphas.len())
            .max_by(|a, b| {
                want_scores[a * t + c]
                    .partial_cmp(&want_scores[b * t + c])
                    .unwrap()
                    .then(alphas[*a].partial_cmp(&alphas[*b]).unwrap())
            })
            .unwrap();
        assert_eq!(fit.best_alpha[c], alphas[best], "target {c}");
        let all: Vec<usize> = (0..n).collect();
        let (w, b) = fit_direct(&all, alphas[best]);
        for r in 0..p {
            let (got, want) = (fit.w[r * t + c], w[r * t + c]);
            assert!(
                (got - want).abs() < 1e-9 * (1.0 + want.abs()),
                "w[{r}, {c}]: {got} vs {want}"
            );
        }
        let want_b = if center { b[c] } else { 0.0 };
        assert!((fit.intercept[c] - want_b).abs() < 1e-9, "intercept {c}");
    }
    let chosen: std::collections::BTreeSet<u64> =
        fit.best_alpha.iter().map(|a| a.to_bits()).collect();
    assert!(
        chosen.len() > 1,
        "the data should make targets choose different alphas"
    );
}

#[test]
fn cv_matches_a_direct_computation_primal() {
    check_cv(60, 8, 5, |i| (i % 3) as i32, ridge::CvScore::R2, true);
}

#[test]
fn cv_matches_a_direct_computation_dual() {
    // 27 training rows per fold < p = 40: the kernel form
    check_cv(
        40,
        40,
        5,
        |i| (i * 3 / 40) as i32,
        ridge::CvScore::Pearson,
        true,
    );
}

#[test]
fn cv_matches_a_direct_computation_with_repeated_eigenvalues() {
    // primal (p = 10, half the eigenvalues 0) and dual (p = 50 > 33 training rows, the
    // kernel of rank 25)
    let repeated = Design::RepeatedColumns;
    check_cv_design(
        50,
        10,
        5,
        |i| (i % 3) as i32,
        ridge::CvScore::R2,
        true,
        repeated,
    );
    let dual_folds = |i| (i * 3 / 50) as i32;
    check_cv_design(
        50,
        50,
        5,
        dual_folds,
        ridge::CvScore::Pearson,
        true,
        repeated,
    );
    // nearly equal eigenvalues (R² only: with equal eigenvalues every alpha scales the same
    // prediction, so Pearson ties across alphas and the best alpha is decided by rounding)
    for center in [true, false] {
        let folds = |i| (i % 3) as i32;
        check_cv_design(
            24,
            8,
            5,
            folds,
            ridge::CvScore::R2,
            center,
            Design::Hadamard,
        );
    }
}

#[test]
fn cv_matches_a_direct_computation_uncentered() {
    check_cv(45, 6, 4, |i| (i % 4) as i32, ridge::CvScore::R2, false);
}

#[test]
fn cv_is_identical_for_any_thread_count_and_close_for_any_batch() {
    let (n, p, t) = (50, 9, 7);
    let mut rng = Rng::new(77);
    let x: Vec<f32> = rng.vec(n * p, -1.0, 1.0);
    let y: Vec<f32> = rng.vec(n * t, -1.0, 1.0);
    let alphas = [0.1f32, 3.0, 50.0];
    let folds: Vec<i32> = (0..n).map(|i| (i % 3) as i32).collect();
    let inputs = ridge::CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let run = |threads, batch| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                ridge::cv(
                    &ridge::CvParams::new().target_batch(batch),
                    RidgeShape::new(n, p, t),
                    &inputs,
                    None,
                )
                .unwrap()
            })
    };
    let base = run(1, 1000);
    for threads in [2, 3] {
        assert!(run(threads, 1000) == base, "{threads} threads");
    }
    // another target batch changes the shapes of the products (and so the rounding) only
    for batch in [1, 2, 5] {
        let other = run(2, batch);
        assert_eq!(other.best_alpha, base.best_alpha, "batches of {batch}");
        for (a, b) in other
            .cv_scores
            .iter()
            .chain(&other.w)
            .zip(base.cv_scores.iter().chain(&base.w))
        {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "batches of {batch}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn cv_bad_input_is_an_error_naming_the_tensor() {
    let (n, p, t) = (6, 2, 1);
    let x = vec![0.5f64; n * p];
    let y = vec![0.5f64; n * t];
    let alphas = [1.0];
    let good: Vec<i32> = vec![0, 1, 0, 1, 0, 1];
    let run = |x: &[f64], y: &[f64], alphas: &[f64], folds: &[i32]| {
        let inputs = ridge::CvInputs {
            x,
            y,
            alphas,
            folds,
        };
        ridge::cv(
            &ridge::CvParams::new(),
            RidgeShape::new(n, p, t),
            &inputs,
            None,
        )
        .unwrap_err()
        .to_string()
    };
    assert!(run(&x[..11], &y, &alphas, &good).contains("x"));
    assert!(run(&x, &y[..5], &alphas, &good).contains("y"));
    assert!(run(&x, &y, &alphas, &good[..5]).contains("folds"));
    assert!(run(&x, &y, &[], &good).contains("alphas"));
    for bad in [0.0, -2.0, f64::NAN, f64::INFINITY] {
        assert!(run(&x, &y, &[1.0, bad], &good).contains("alphas"));
    }
    // a fold id unused (fold 1 empty), a single fold holding every row, a negative id
    assert!(run(&x, &y, &alphas, &[0, 2, 0, 2, 0, 2]).contains("fold 1 holds no sample"));
    assert!(run(&x, &y, &alphas, &[0; 6]).contains("every sample"));
    assert!(run(&x, &y, &alphas, &[0, 1, -1, 1, 0, 1]).contains("folds"));
    let mut x_nan = x.clone();
    x_nan[3] = f64::NAN;
    assert!(run(&x_nan, &y, &alphas, &good).contains("x"));
    let mut y_inf = y.clone();
    y_inf[0] = f64::INFINITY;
    assert!(run(&x, &y_inf, &alphas, &good).contains("y"));
}

/// ridge.score over several column blocks (t = 600, the last block partial) equals the
/// column-by-column formulas, bit for bit (each column is summed over the rows in order).
#[test]
fn score_matches_the_column_formulas_across_column_blocks() {
    let (n, t) = (13, 600);
    let mut rng = Rng::new(3);
    let y_true: Vec<f64> = rng.vec(n * t, -1.0, 1.0);
    let y_pred: Vec<f64> = rng.vec(n * t, -1.0, 1.0);
    let Scores { r2, pearson, .. } =
        ridge::score(RidgeShape::new(n, 0, t), &y_true, &y_pred).unwrap();
    for c in 0..t {
        let col = |v: &[f64]| (0..n).map(|i| v[i * t + c]).collect::<Vec<f64>>();
        let (yt, yp) = (col(&y_true), col(&y_pred));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / n as f64;
        let (mt, mp) = (mean(&yt), mean(&yp));
        let (mut ss_tot, mut ss_res, mut ss_pred, mut cross) = (0.0, 0.0, 0.0, 0.0);
        for (a, b) in yt.iter().zip(&yp) {
            ss_tot += (a - mt) * (a - mt);
            ss_res += (a - b) * (a - b);
            ss_pred += (b - mp) * (b - mp);
            cross += (a - mt) * (b - mp);
        }
        assert_eq!(r2[c], 1.0 - ss_res / ss_tot, "r2 of column {c}");
        assert_eq!(pearson[c], cross / (ss_tot * ss_pred).sqrt(), "pearson {c}");
    }
}

// ---------------------------------------------------------------------------------------
// ridge.banded_cv and ridge.split_scores
// ---------------------------------------------------------------------------------------

/// A design of two spaces (columns interleaved: even columns space 0, odd space 1) whose
/// targets lean on one space or the other.
fn banded_design(n: usize, p: usize, t: usize, seed: u64) -> (Vec<f64>, Vec<i32>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    let groups: Vec<i32> = (0..p).map(|j| (j % 2) as i32).collect();
    let w: Vec<f64> = rng.vec(p * t, -1.0, 1.0);
    let mut y: Vec<f64> = rng.vec(n * t, -0.5, 0.5);
    for i in 0..n {
        for c in 0..t {
            // target c weights space 0 by c/(t-1) and space 1 by the rest
            let lean = c as f64 / (t - 1).max(1) as f64;
            let pred: f64 = (0..p)
                .map(|j| {
                    let k = if groups[j] == 0 { lean } else { 1.0 - lean };
                    k * x[i * p + j] * w[j * t + c]
                })
                .sum();
            y[i * t + c] += pred + 0.25;
        }
    }
    (x, groups, y)
}

/// With the single uniform candidate γ = (1/2, 1/2), banded ridge is ridge on the columns
/// scaled by √(1/2), i.e. ridge.cv with the alphas doubled: the same scores and weights, in
/// float64, primal (n ≥ p) and dual (n < p).
#[test]
fn banded_cv_with_a_uniform_candidate_is_ridge_cv_float64() {
    for (n, p, t, seed) in [(48, 10, 5, 1), (21, 30, 4, 2)] {
        let (x, groups, y) = banded_design(n, p, t, seed);
        let alphas = [0.01, 0.3, 4.0, 100.0];
        let doubled: Vec<f64> = alphas.iter().map(|a| 2.0 * a).collect();
        let folds: Vec<i32> = (0..n).map(|i| (i % 3) as i32).collect();
        let gammas = [0.5, 0.5];
        let inputs = ridge::BandedInputs {
            x: &x,
            groups: &groups,
            y: &y,
            alphas: &alphas,
            gammas: &gammas,
            folds: &folds,
        };
        let params = ridge::CvParams::new();
        let fit =
            ridge::banded_cv(&params, ridge::BandedShape::new(n, p, t, 2), &inputs, None).unwrap();
        let cv_inputs = ridge::CvInputs {
            x: &x,
            y: &y,
            alphas: &doubled,
            folds: &folds,
        };
        let plain = ridge::cv(&params, RidgeShape::new(n, p, t), &cv_inputs, None).unwrap();
        for c in 0..t {
            let best = (0..alphas.len())
                .map(|a| plain.cv_scores[a * t + c])
                .fold(f64::NEG_INFINITY, f64::max);
            let got = fit.cv_scores[c];
            assert!(
                (got - best).abs() < 1e-10,
                "n {n} target {c}: {got} vs {best}"
            );
            assert_eq!(
                2.0 * fit.best_alpha[c],
                plain.best_alpha[c],
                "n {n} target {c}"
            );
            let delta = (0.5 / fit.best_alpha[c]).ln();
            assert!((fit.deltas[c] - delta).abs() < 1e-12 && fit.deltas[t + c] == fit.deltas[c]);
        }
        let r = common::worst_ratio(&fit.w, &plain.w, 1e-9, 1e-11);
        assert!(r <= 1.0, "n {n}: w differs from ridge.cv's (ratio {r})");
        let r = common::worst_ratio(&fit.intercept, &plain.intercept, 1e-9, 1e-11);
        assert!(r <= 1.0, "n {n}: intercept differs (ratio {r})");
    }
}

/// The refit solves the banded normal equations of each target's choice:
/// (XcᵀXc + α·diag(1/γ_groups[j])) w = Xcᵀyc (Xc, yc centered), in float64, and a space of
/// weight 0 gets w = 0 and δ = −inf.
#[test]
fn banded_cv_refit_satisfies_the_banded_normal_equations_float64() {
    for (n, p, t, seed) in [(40, 8, 6, 3), (14, 20, 6, 4)] {
        let (x, groups, y) = banded_design(n, p, t, seed);
        let alphas = [0.05, 1.0, 20.0];
        let gammas = [0.5, 0.5, 0.9, 0.1, 0.2, 0.8, 1.0, 0.0];
        let folds: Vec<i32> = (0..n).map(|i| (i * 7 % 4) as i32).collect();
        let inputs = ridge::BandedInputs {
            x: &x,
            groups: &groups,
            y: &y,
            alphas: &alphas,
            gammas: &gammas,
            folds: &folds,
        };
        let fit = ridge::banded_cv(
            &ridge::CvParams::new(),
            ridge::BandedShape::new(n, p, t, 2),
            &inputs,
            None,
        )
        .unwrap();
        let xm: Vec<f64> = (0..p)
            .map(|j| (0..n).map(|i| x[i * p + j]).sum::<f64>() / n as f64)
            .collect();
        for c in 0..t {
            let cand = fit.best_candidate[c];
            let gamma = &gammas[cand * 2..cand * 2 + 2];
            let alpha = fit.best_alpha[c];
            let ym = (0..n).map(|i| y[i * t + c]).sum::<f64>() / n as f64;
            let w: Vec<f64> = (0..p).map(|j| fit.w[j * t + c]).collect();
            for a in 0..p {
                let g = gamma[groups[a] as usize];
                if g == 0.0 {
                    assert_eq!(w[a], 0.0, "target {c}: a space of weight 0 has w = 0");
                    assert_eq!(fit.deltas[groups[a] as usize * t + c], f64::NEG_INFINITY);
                    continue;
                }
                // (XcᵀXc w)_a + α/γ w_a = (Xcᵀ yc)_a, on the columns of nonzero weight
                let (mut lhs, mut rhs) = (alpha / g * w[a], 0.0);
                for i in 0..n {
                    let xa = x[i * p + a] - xm[a];
                    let pred: f64 = (0..p).map(|b| (x[i * p + b] - xm[b]) * w[b]).sum();
                    lhs += xa * pred;
                    rhs += xa * (y[i * t + c] - ym);
                }
                let r = (lhs - rhs).abs() / (1.0 + rhs.abs());
                assert!(r < 1e-9, "n {n} target {c} column {a}: residual {r}");
            }
            let b: f64 = ym - (0..p).map(|j| xm[j] * w[j]).sum::<f64>();
            assert!((fit.intercept[c] - b).abs() < 1e-12);
        }
    }
}

#[test]
fn banded_cv_is_identical_for_any_thread_count() {
    let (n, p, t) = (45, 12, 9);
    let (x, groups, y) = banded_design(n, p, t, 5);
    let (x, y): (Vec<f32>, Vec<f32>) = (
        x.iter().map(|v| *v as f32).collect(),
        y.iter().map(|v| *v as f32).collect(),
    );
    let alphas = [0.1f32, 3.0, 50.0];
    let gammas = [0.5f32, 0.5, 0.8, 0.2, 0.3, 0.7];
    let folds: Vec<i32> = (0..n).map(|i| (i % 3) as i32).collect();
    let inputs = ridge::BandedInputs {
        x: &x,
        groups: &groups,
        y: &y,
        alphas: &alphas,
        gammas: &gammas,
        folds: &folds,
    };
    let reports = std::sync::Mutex::new(0usize);
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let count = |_: ridge::BandedProgress| *reports.lock().unwrap() += 1;
                ridge::banded_cv(
                    &ridge::CvParams::new().target_batch(4),
                    ridge::BandedShape::new(n, p, t, 2),
                    &inputs,
                    Some(&count),
                )
                .unwrap()
            })
    };
    let base = run(1);
    // progress: every (fold, candidate), then at most one report per candidate of the refit
    let calls = *reports.lock().unwrap();
    assert!(
        (3 * 3 + 1..=3 * 3 + 3).contains(&calls),
        "{calls} progress reports"
    );
    for threads in [2, 3] {
        assert!(run(threads) == base, "{threads} threads");
    }
}

/// The split scores equal the formulas computed directly, sum to the R² of the centered
/// prediction, and one space carries everything when the other's weights are 0.
#[test]
fn split_scores_match_the_formulas_float64() {
    let (n, p, t) = (30, 6, 3);
    let mut rng = Rng::new(9);
    let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    let groups = [0, 1, 2, 0, 1, 2];
    let mut w: Vec<f64> = rng.vec(p * t, -1.0, 1.0);
    for j in [1, 4] {
        w[j * t + 2] = 0.0; // target 2: space 1 contributes nothing
    }
    let y: Vec<f64> = rng.vec(n * t, -2.0, 2.0);
    let s = ridge::split_scores(ridge::BandedShape::new(n, p, t, 3), &x, &groups, &w, &y).unwrap();
    for c in 0..t {
        let ym = (0..n).map(|i| y[i * t + c]).sum::<f64>() / n as f64;
        let a: Vec<f64> = (0..n).map(|i| y[i * t + c] - ym).collect();
        let mut q = vec![vec![0.0; n]; 3];
        for (sp, qs) in q.iter_mut().enumerate() {
            for (i, v) in qs.iter_mut().enumerate() {
                *v = (0..p)
                    .filter(|j| groups[*j] == sp as i32)
                    .map(|j| x[i * p + j] * w[j * t + c])
                    .sum();
            }
            let m = qs.iter().sum::<f64>() / n as f64;
            qs.iter_mut().for_each(|v| *v -= m);
        }
        let tot: Vec<f64> = (0..n).map(|i| q[0][i] + q[1][i] + q[2][i]).collect();
        let sst: f64 = a.iter().map(|v| v * v).sum();
        let sd_a = (sst / n as f64).sqrt();
        let sd_p = (tot.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        let mut sum = 0.0;
        for (sp, qs) in q.iter().enumerate() {
            let inter: f64 = a.iter().zip(qs).map(|(a, q)| a * q).sum();
            let shared: f64 = qs.iter().zip(&tot).map(|(q, t)| q * t).sum();
            let r2 = (2.0 * inter - shared) / sst;
            let pr = inter / n as f64 / (sd_a * sd_p);
            assert!(
                (s.r2[sp * t + c] - r2).abs() < 1e-12,
                "r2 space {sp} target {c}"
            );
            assert!((s.pearson[sp * t + c] - pr).abs() < 1e-12);
            sum += s.r2[sp * t + c];
        }
        let joint = 1.0 - (0..n).map(|i| (a[i] - tot[i]).powi(2)).sum::<f64>() / sst;
        assert!((sum - joint).abs() < 1e-12, "target {c}: {sum} vs {joint}");
    }
    assert_eq!(s.r2[t + 2], 0.0);
    assert_eq!(s.pearson[t + 2], 0.0);
}

#[test]
fn banded_bad_input_is_an_error_naming_the_tensor() {
    let (n, p, t) = (6, 4, 2);
    let x = vec![0.5f64; n * p];
    let y: Vec<f64> = (0..n * t).map(|i| i as f64).collect();
    let groups = [0, 1, 0, 1];
    let gammas = [0.5, 0.5, 0.25, 0.75];
    let folds = [0, 1, 0, 1, 0, 1];
    struct Call<'a> {
        x: &'a [f64],
        groups: &'a [i32],
        y: &'a [f64],
        gammas: &'a [f64],
        spaces: usize,
    }
    let good = Call {
        x: &x,
        groups: &groups,
        y: &y,
        gammas: &gammas,
        spaces: 2,
    };
    let run = |c: Call<'_>| {
        let inputs = ridge::BandedInputs {
            x: c.x,
            groups: c.groups,
            y: c.y,
            alphas: &[1.0],
            gammas: c.gammas,
            folds: &folds,
        };
        ridge::banded_cv(
            &ridge::CvParams::new(),
            ridge::BandedShape::new(n, p, t, c.spaces),
            &inputs,
            None,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    assert!(run(Call { ..good }).is_ok());
    let err = |c: Call<'_>| run(c).unwrap_err();
    // a group id out of range, negative, an empty space, a wrong length
    assert!(
        err(Call {
            groups: &[0, 2, 0, 1],
            ..good
        })
        .contains("`groups`")
    );
    assert!(
        err(Call {
            groups: &[0, -1, 0, 1],
            ..good
        })
        .contains("`groups`")
    );
    let empty = err(Call {
        groups: &[0, 0, 0, 0],
        ..good
    });
    assert!(
        empty.contains("`groups`") && empty.contains("space 1 has no column"),
        "{empty}"
    );
    assert!(
        err(Call {
            groups: &[0, 1, 0],
            ..good
        })
        .contains("`groups`")
    );
    // more spaces than columns is refused before anything is sized by S
    assert!(
        err(Call {
            spaces: 1 << 40,
            gammas: &[],
            ..good
        })
        .contains("`gammas`")
    );
    assert!(
        err(Call {
            spaces: usize::MAX,
            ..good
        })
        .contains("`deltas`")
    );
    // gamma rows: negative, off the simplex, NaN, a length that is no multiple of S
    assert!(
        err(Call {
            gammas: &[1.5, -0.5, 0.5, 0.5],
            ..good
        })
        .contains("`gammas`")
    );
    let off = err(Call {
        gammas: &[0.5, 0.5, 0.3, 0.3],
        ..good
    });
    assert!(off.contains("`gammas`") && off.contains("simplex"), "{off}");
    assert!(
        err(Call {
            gammas: &[0.5, f64::NAN],
            ..good
        })
        .contains("`gammas`")
    );
    assert!(
        err(Call {
            gammas: &[0.5, 0.5, 1.0],
            ..good
        })
        .contains("`gammas`")
    );
    assert!(
        err(Call {
            gammas: &[],
            ..good
        })
        .contains("`gammas`")
    );
    // within the tolerance (1e-5) a row is on the simplex
    assert!(
        run(Call {
            gammas: &[0.5, 0.500004],
            ..good
        })
        .is_ok()
    );
    // x, y lengths and values
    assert!(
        err(Call {
            x: &x[..23],
            ..good
        })
        .contains("`x`")
    );
    assert!(
        err(Call {
            y: &y[..11],
            ..good
        })
        .contains("`y`")
    );
    let mut x_nan = x.clone();
    x_nan[5] = f64::NAN;
    assert!(err(Call { x: &x_nan, ..good }).contains("`x`"));
    // split_scores: the same group checks, and w's shape
    let w = vec![0.1f64; p * t];
    let split = |groups: &[i32], w: &[f64], spaces: usize| {
        ridge::split_scores(ridge::BandedShape::new(n, p, t, spaces), &x, groups, w, &y)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    assert!(split(&groups, &w, 2).is_ok());
    assert!(
        split(&[0, 3, 0, 1], &w, 2)
            .unwrap_err()
            .contains("`groups`")
    );
    assert!(
        split(&[1, 1, 1, 1], &w, 2)
            .unwrap_err()
            .contains("`groups`")
    );
    assert!(split(&groups, &w[..7], 2).unwrap_err().contains("`w`"));
    assert!(
        split(&groups, &w, 1 << 40)
            .unwrap_err()
            .contains("`groups`")
    );
}
