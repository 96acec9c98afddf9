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
