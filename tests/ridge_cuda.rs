//! The batched ridge ops on the GPU against the CPU path (skipped without a device).
//!
//! ridge.solve_batched: f32 and f64, primal and dual, several right-hand-side passes, factor
//! orders 64, 65, 200, 256 (the shared-memory kernel; f32 elements past the f64 factor's fit
//! factor in f32) and 300 (cuBLAS + cuSOLVER), failed factorizations reported as errors.
//! ridge.cv: f32 and f64, n < p and n ≥ p folds, R² and Pearson, centered or not, several
//! target batches, bad inputs refused naming the tensor. ridge.banded_cv: f32 and f64, primal
//! and dual folds and refits, 2 and 3 interleaved feature spaces, R² and Pearson, centered or
//! not, several target batches, progress, bad groups and gammas refused. ridge.split_scores:
//! f32 and f64, 1 to 4 spaces, a constant target and a zero space, more targets than one
//! block holds, one row, no rows, bad groups refused. ridge.score: f32 and
//! f64, the constant target/prediction conventions, one row, no rows.

#![cfg(feature = "cuda")]

mod common;

use common::{Rng, to_f64, worst_ratio};
use neurokernels::cuda::Device;
use neurokernels::ridge::cuda::CudaRidgeReal;
use neurokernels::ridge::{
    self, BandedInputs, BandedShape, BatchedShape, CvInputs, CvParams, CvScore, RidgeShape,
};

/// Well-conditioned problems: n ≈ 2p (primal) or p ≈ 2n (dual) with uniform entries.
fn check_solve<E: CudaRidgeReal>(
    device: &Device,
    seed: u64,
    shapes: &[(usize, usize, usize, usize)],
    rtol: f64,
    atol: f64,
) {
    for (i, &(g, n, p, t)) in shapes.iter().enumerate() {
        let s = BatchedShape::new(g, n, p, t);
        let mut rng = Rng::new(seed + i as u64);
        let x: Vec<E> = rng.vec(g * n * p, -1.0, 1.0);
        let y: Vec<E> = rng.vec(g * n * t, -1.0, 1.0);
        let alpha: Vec<E> = rng.vec(g, 0.5, 2.0);
        let want = ridge::solve_batched(s, &x, &y, &alpha).unwrap();
        let got = ridge::cuda::solve_batched_host(device, s, &x, &y, &alpha).unwrap();
        let r = worst_ratio(&to_f64(&got), &to_f64(&want), rtol, atol);
        assert!(r <= 1.0, "{} {s:?}: {r} x tolerance", E::DTYPE);
    }
}

const SMALL: &[(usize, usize, usize, usize)] = &[
    (7, 80, 64, 3),
    (5, 20, 90, 37),
    (3, 1, 1, 1),
    (4, 64, 64, 16),
    (3, 0, 5, 2),
];

/// Orders 64, 65, 200, 256 and 300, primal and dual.
const LARGE: &[(usize, usize, usize, usize)] = &[
    (3, 140, 64, 5),
    (3, 140, 65, 17),
    (2, 130, 65, 3),
    (2, 410, 200, 3),
    (2, 200, 420, 18),
    (2, 520, 256, 20),
    (2, 256, 530, 2),
    (2, 610, 300, 4),
    (2, 300, 610, 5),
];

#[test]
fn cuda_solve_batched_matches_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_solve_batched_matches_cpu") {
        check_solve::<f32>(&dev, 1, SMALL, 1e-4, 1e-5);
        check_solve::<f64>(&dev, 2, SMALL, 1e-10, 1e-12);
    }
}

#[test]
fn cuda_solve_batched_large_orders_match_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_solve_batched_large_orders_match_cpu") {
        // f32 elements of orders past the f64 factor's fit (and the library path) work in
        // f32: error ≈ cond · order · 2⁻²⁴, cond ≈ 35 here
        check_solve::<f32>(&dev, 3, LARGE, 2e-3, 2e-4);
        check_solve::<f64>(&dev, 4, LARGE, 1e-9, 1e-11);
    }
}

#[test]
fn cuda_solve_batched_reports_failed_factorizations() {
    let Some(dev) = common::device_or_skip("cuda_solve_batched_reports_failed_factorizations")
    else {
        return;
    };
    // a negative alpha (not scanned on the device) makes problem 1 indefinite, in the
    // kernel (order 8) and in the library path (order 300)
    for (n, p) in [(20, 8), (310, 300), (8, 30)] {
        let g = 3;
        let s = BatchedShape::new(g, n, p, 2);
        let mut rng = Rng::new(9);
        let x: Vec<f64> = rng.vec(g * n * p, -1.0, 1.0);
        let y: Vec<f64> = rng.vec(g * n * 2, -1.0, 1.0);
        let alpha = [1.0, -1e7, 1.0];
        let stream = dev.stream();
        let (xd, yd, ad) = (
            stream.clone_htod(&x).unwrap(),
            stream.clone_htod(&y).unwrap(),
            stream.clone_htod(&alpha).unwrap(),
        );
        let mut wd = stream.alloc_zeros::<f64>(g * p * 2).unwrap();
        let err = ridge::cuda::solve_batched(
            &dev,
            stream,
            s,
            &xd.slice(..),
            &yd.slice(..),
            &ad.slice(..),
            &mut wd,
        )
        .unwrap_err();
        assert!(err.to_string().contains("problem 1"), "{n}x{p}: {err}");
    }
    // bad values are refused on the host, naming the tensor
    let s = BatchedShape::new(2, 4, 3, 1);
    let (x, y) = (vec![0.5f64; 24], vec![0.5f64; 8]);
    let err = ridge::cuda::solve_batched_host(&dev, s, &x, &y, &[1.0, -1.0]).unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");
    let mut x = x;
    x[5] = f64::NAN;
    let err = ridge::cuda::solve_batched_host(&dev, s, &x, &y, &[1.0, 1.0]).unwrap_err();
    assert!(err.to_string().contains("`x`"), "{err}");
}

/// x [n, p] with a planted linear signal in y [n, t]; folds 0..F−1 in a shuffled order.
struct CvData<E> {
    x: Vec<E>,
    y: Vec<E>,
    alphas: Vec<E>,
    folds: Vec<i32>,
}

fn cv_data<E: CudaRidgeReal>(seed: u64, n: usize, p: usize, t: usize, folds: usize) -> CvData<E> {
    let mut rng = Rng::new(seed);
    let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    let w: Vec<f64> = rng.vec(p * t, -1.0, 1.0);
    let noise: Vec<f64> = rng.vec(n * t, -1.0, 1.0);
    let mut y = vec![0.0; n * t];
    for i in 0..n {
        for c in 0..t {
            let s: f64 = (0..p).map(|k| x[i * p + k] * w[k * t + c]).sum();
            // targets with different signal-to-noise, so different alphas win
            y[i * t + c] = s / (p as f64).sqrt() + (0.2 + c as f64) * noise[i * t + c] + 3.0;
        }
    }
    // 7 is coprime to every fold count used, so each fold is non-empty and interleaved
    let fold_of: Vec<i32> = (0..n).map(|i| ((i * 7) % folds) as i32).collect();
    CvData {
        x: x.into_iter().map(E::from_f64).collect(),
        y: y.into_iter().map(E::from_f64).collect(),
        alphas: [0.1, 1.0, 10.0, 100.0, 1000.0]
            .into_iter()
            .map(E::from_f64)
            .collect(),
        folds: fold_of,
    }
}

fn check_cv<E: CudaRidgeReal>(device: &Device, seed: u64, tol: f64) {
    for (i, &(n, p, t, folds)) in [
        (60, 12, 7, 3),
        (36, 50, 5, 4),
        (45, 45, 3, 5),
        (40, 30, 9, 2),
    ]
    .iter()
    .enumerate()
    {
        let data = cv_data::<E>(seed + i as u64, n, p, t, folds);
        let inputs = CvInputs {
            x: &data.x,
            y: &data.y,
            alphas: &data.alphas,
            folds: &data.folds,
        };
        for score in [CvScore::R2, CvScore::Pearson] {
            for center in [true, false] {
                let params = CvParams::new().score(score).center(center).target_batch(3);
                let what = format!("{} n{n} p{p} t{t} {score:?} center={center}", E::DTYPE);
                let want = ridge::cv(&params, RidgeShape::new(n, p, t), &inputs, None).unwrap();
                let got =
                    ridge::cuda::cv_host(device, &params, RidgeShape::new(n, p, t), &inputs, None)
                        .unwrap();
                let (gs, ws) = (to_f64(&got.cv_scores), to_f64(&want.cv_scores));
                let r = worst_ratio(&gs, &ws, tol, tol);
                assert!(r <= 1.0, "{what}: cv_scores {r} x tolerance");
                let a = data.alphas.len();
                for c in 0..t {
                    let (gb, wb) = (got.best_alpha[c].to_f64(), want.best_alpha[c].to_f64());
                    if gb != wb {
                        // a different choice only between (nearly) equal mean scores
                        let pick = |alpha: f64| {
                            (0..a)
                                .find(|k| data.alphas[*k].to_f64() == alpha)
                                .expect("a chosen alpha is one of the alphas")
                        };
                        let (sg, sw) = (ws[pick(gb) * t + c], ws[pick(wb) * t + c]);
                        assert!(
                            (sg - sw).abs() <= tol,
                            "{what}: target {c} chose {gb} vs {wb}"
                        );
                        continue;
                    }
                    let col = |w: &[E]| (0..p).map(|r| w[r * t + c].to_f64()).collect::<Vec<_>>();
                    let r = worst_ratio(&col(&got.w), &col(&want.w), tol * 10.0, tol);
                    assert!(r <= 1.0, "{what}: w of target {c} {r} x tolerance");
                    let r = worst_ratio(
                        &[got.intercept[c].to_f64()],
                        &[want.intercept[c].to_f64()],
                        tol * 10.0,
                        tol,
                    );
                    assert!(r <= 1.0, "{what}: intercept of target {c} {r} x tolerance");
                }
            }
        }
    }
}

#[test]
fn cuda_cv_matches_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_cv_matches_cpu") {
        check_cv::<f32>(&dev, 20, 2e-4);
        check_cv::<f64>(&dev, 30, 1e-9);
    }
}

#[test]
fn cuda_cv_reports_progress_and_refuses_bad_inputs() {
    let Some(dev) = common::device_or_skip("cuda_cv_reports_progress_and_refuses_bad_inputs")
    else {
        return;
    };
    let (n, p, t) = (30, 8, 5);
    let data = cv_data::<f32>(5, n, p, t, 3);
    let inputs = CvInputs {
        x: &data.x,
        y: &data.y,
        alphas: &data.alphas,
        folds: &data.folds,
    };
    let params = CvParams::new().target_batch(2);
    let seen = std::sync::Mutex::new(Vec::new());
    let report = |r: ridge::CvProgress| seen.lock().unwrap().push((r.fold, r.targets_done));
    ridge::cuda::cv_host(
        &dev,
        &params,
        RidgeShape::new(n, p, t),
        &inputs,
        Some(&report),
    )
    .unwrap();
    // 3 folds and the refit, each in batches of 2 of 5 targets
    let want: Vec<(usize, usize)> = (0..4).flat_map(|f| [(f, 2), (f, 4), (f, 5)]).collect();
    assert_eq!(*seen.lock().unwrap(), want);

    let bad_alphas = [1.0f32, 0.0];
    let err = ridge::cuda::cv_host(
        &dev,
        &params,
        RidgeShape::new(n, p, t),
        &CvInputs {
            alphas: &bad_alphas,
            ..inputs
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("alphas"), "{err}");
    let one_fold = vec![0i32; n];
    let err = ridge::cuda::cv_host(
        &dev,
        &params,
        RidgeShape::new(n, p, t),
        &CvInputs {
            folds: &one_fold,
            ..inputs
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("folds"), "{err}");
    let err = ridge::cuda::cv_host(&dev, &params, RidgeShape::new(n, p, t + 1), &inputs, None)
        .unwrap_err();
    assert!(err.to_string().contains("`y`"), "{err}");
}

/// Banded data: x [n, p] whose columns belong to `spaces` interleaved spaces (column j in
/// space (j·5 + j/4) mod S, so spaces are not contiguous); target c draws on each space with
/// its own strength, so different candidates win; candidates: the simplex's corners (nearly),
/// its centre and a few in between.
struct BandedData<E> {
    x: Vec<E>,
    groups: Vec<i32>,
    y: Vec<E>,
    alphas: Vec<E>,
    gammas: Vec<E>,
    folds: Vec<i32>,
}

fn banded_data<E: CudaRidgeReal>(
    seed: u64,
    (n, p, t, spaces): (usize, usize, usize, usize),
    folds: usize,
) -> BandedData<E> {
    let mut rng = Rng::new(seed);
    let groups: Vec<i32> = (0..p).map(|j| ((j * 5 + j / 4) % spaces) as i32).collect();
    let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    let w: Vec<f64> = rng.vec(p * t, -1.0, 1.0);
    let noise: Vec<f64> = rng.vec(n * t, -1.0, 1.0);
    let mut y = vec![0.0; n * t];
    for i in 0..n {
        for c in 0..t {
            let s: f64 = (0..p)
                .map(|k| {
                    // target c weighs space (c mod S) most and the others little
                    let strength = if groups[k] as usize == c % spaces {
                        1.0
                    } else {
                        0.1
                    };
                    strength * x[i * p + k] * w[k * t + c]
                })
                .sum();
            y[i * t + c] = s / (p as f64).sqrt() + (0.1 + 0.3 * c as f64) * noise[i * t + c] - 2.0;
        }
    }
    let mut gammas = Vec::new();
    for s in 0..spaces {
        // near a corner
        gammas.extend((0..spaces).map(|k| {
            if k == s {
                0.9
            } else {
                0.1 / (spaces - 1) as f64
            }
        }));
    }
    gammas.extend((0..spaces).map(|_| 1.0 / spaces as f64));
    // one exact corner (a space weighted 0)
    gammas.extend((0..spaces).map(|k| if k == 0 { 1.0 } else { 0.0 }));
    BandedData {
        x: x.into_iter().map(E::from_f64).collect(),
        groups,
        y: y.into_iter().map(E::from_f64).collect(),
        alphas: [0.1, 1.0, 10.0, 100.0]
            .into_iter()
            .map(E::from_f64)
            .collect(),
        gammas: gammas.into_iter().map(E::from_f64).collect(),
        folds: (0..n).map(|i| ((i * 7) % folds) as i32).collect(),
    }
}

fn check_banded<E: CudaRidgeReal>(device: &Device, seed: u64, tol: f64) {
    // primal folds and refit; dual folds and refit; dual folds, primal refit (n ≥ p > n_train)
    for (i, &(n, p, t, spaces, folds)) in [(60, 12, 7, 2, 3), (30, 40, 5, 3, 3), (48, 40, 4, 2, 4)]
        .iter()
        .enumerate()
    {
        let data = banded_data::<E>(seed + i as u64, (n, p, t, spaces), folds);
        let inputs = BandedInputs {
            x: &data.x,
            groups: &data.groups,
            y: &data.y,
            alphas: &data.alphas,
            gammas: &data.gammas,
            folds: &data.folds,
        };
        let shape = BandedShape::new(n, p, t, spaces);
        let n_cand = data.gammas.len() / spaces;
        let mut several_chosen = false;
        for score in [CvScore::R2, CvScore::Pearson] {
            for center in [true, false] {
                let params = CvParams::new().score(score).center(center).target_batch(3);
                let what = format!(
                    "{} n{n} p{p} t{t} S{spaces} {score:?} center={center}",
                    E::DTYPE
                );
                let want = ridge::banded_cv(&params, shape, &inputs, None).unwrap();
                let got =
                    ridge::cuda::banded_cv_host(device, &params, shape, &inputs, None).unwrap();
                let (gs, ws) = (to_f64(&got.cv_scores), to_f64(&want.cv_scores));
                assert_eq!(gs.len(), n_cand * t);
                let r = worst_ratio(&gs, &ws, tol, tol);
                assert!(r <= 1.0, "{what}: cv_scores {r} x tolerance");
                let mut same = 0;
                for c in 0..t {
                    let (gb, wb) = (got.best_candidate[c], want.best_candidate[c]);
                    let (ga, wa) = (got.best_alpha[c].to_f64(), want.best_alpha[c].to_f64());
                    if gb != wb || ga != wa {
                        // a different choice only between (nearly) equal mean scores
                        let (sg, sw) = (ws[gb * t + c], ws[wb * t + c]);
                        assert!(
                            (sg - sw).abs() <= tol,
                            "{what}: target {c} chose {gb} vs {wb}"
                        );
                        continue;
                    }
                    same += 1;
                    let col = |m: &[E], rows: usize| {
                        (0..rows).map(|r| m[r * t + c].to_f64()).collect::<Vec<_>>()
                    };
                    let (gd, wd) = (col(&got.deltas, spaces), col(&want.deltas, spaces));
                    assert!(
                        gd.iter()
                            .zip(&wd)
                            .all(|(g, w)| g == w || (g - w).abs() <= tol),
                        "{what}: deltas of target {c}: {gd:?} vs {wd:?}"
                    );
                    let r = worst_ratio(&col(&got.w, p), &col(&want.w, p), tol * 10.0, tol);
                    assert!(r <= 1.0, "{what}: w of target {c} {r} x tolerance");
                    let r = worst_ratio(
                        &[got.intercept[c].to_f64()],
                        &[want.intercept[c].to_f64()],
                        tol * 10.0,
                        tol,
                    );
                    assert!(r <= 1.0, "{what}: intercept of target {c} {r} x tolerance");
                }
                assert!(same > 0, "{what}: no target chose alike");
                let chosen: std::collections::BTreeSet<usize> =
                    want.best_candidate.iter().copied().collect();
                several_chosen |= chosen.len() > 1;
            }
        }
        // some fit has targets on different candidates (the refit decomposes several)
        assert!(
            several_chosen,
            "n{n} p{p}: every target of every fit chose one candidate"
        );
    }
}

#[test]
fn cuda_banded_cv_matches_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_banded_cv_matches_cpu") {
        check_banded::<f32>(&dev, 40, 2e-4);
        check_banded::<f64>(&dev, 50, 1e-9);
    }
}

#[test]
fn cuda_banded_cv_reports_progress_and_refuses_bad_inputs() {
    let Some(dev) =
        common::device_or_skip("cuda_banded_cv_reports_progress_and_refuses_bad_inputs")
    else {
        return;
    };
    let (n, p, t, spaces) = (30, 8, 5, 2);
    let data = banded_data::<f32>(6, (n, p, t, spaces), 3);
    let inputs = BandedInputs {
        x: &data.x,
        groups: &data.groups,
        y: &data.y,
        alphas: &data.alphas,
        gammas: &data.gammas,
        folds: &data.folds,
    };
    let shape = BandedShape::new(n, p, t, spaces);
    let params = CvParams::new().target_batch(2);
    let seen = std::sync::Mutex::new(Vec::new());
    let report = |r: ridge::BandedProgress| seen.lock().unwrap().push((r.fold, r.candidate));
    let fit = ridge::cuda::banded_cv_host(&dev, &params, shape, &inputs, Some(&report)).unwrap();
    // every candidate of the 3 folds, then the chosen candidates of the refit in order
    let n_cand = data.gammas.len() / spaces;
    let mut want: Vec<(usize, usize)> = (0..3)
        .flat_map(|f| (0..n_cand).map(move |c| (f, c)))
        .collect();
    let chosen: std::collections::BTreeSet<usize> = fit.best_candidate.iter().copied().collect();
    want.extend(chosen.iter().map(|c| (3, *c)));
    assert_eq!(*seen.lock().unwrap(), want);

    let mut bad_groups = data.groups.clone();
    bad_groups[3] = 2;
    let err = ridge::cuda::banded_cv_host(
        &dev,
        &params,
        shape,
        &BandedInputs {
            groups: &bad_groups,
            ..inputs
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
    let mut off_simplex = data.gammas.clone();
    off_simplex[0] = 0.5;
    let err = ridge::cuda::banded_cv_host(
        &dev,
        &params,
        shape,
        &BandedInputs {
            gammas: &off_simplex,
            ..inputs
        },
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("gammas"), "{err}");
    let err = ridge::cuda::banded_cv_host(
        &dev,
        &params,
        BandedShape::new(n, p, t + 1, spaces),
        &inputs,
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("`y`"), "{err}");
}

fn check_split<E: CudaRidgeReal>(device: &Device, tol: f64) {
    for (i, &(n, p, t, spaces)) in [
        (40, 12, 7, 2),
        (25, 30, 70, 3),
        (50, 9, 5, 1),
        (33, 16, 4, 4),
        (1, 6, 3, 2),
        (0, 6, 3, 2),
    ]
    .iter()
    .enumerate()
    {
        let data = banded_data::<E>(60 + i as u64, (n, p, t, spaces), 3);
        let mut rng = Rng::new(70 + i as u64);
        let mut w: Vec<E> = rng
            .vec(p * t, -1.0, 1.0)
            .into_iter()
            .map(E::from_f64)
            .collect();
        let mut y = data.y.clone();
        if t > 1 && n > 0 {
            // a constant target (R² shares 0), and space 0 weighted 0 for target 1
            for r in 0..n {
                y[r * t] = E::from_f64(1.5);
            }
            for (j, g) in data.groups.iter().enumerate() {
                if *g == 0 {
                    w[j * t + 1] = E::from_f64(0.0);
                }
            }
        }
        let shape = BandedShape::new(n, p, t, spaces);
        let want = ridge::split_scores(shape, &data.x, &data.groups, &w, &y).unwrap();
        let got =
            ridge::cuda::split_scores_host(device, shape, &data.x, &data.groups, &w, &y).unwrap();
        let what = format!("{} n{n} p{p} t{t} S{spaces}", E::DTYPE);
        for (name, g, wv) in [
            ("r2", &got.r2, &want.r2),
            ("pearson", &got.pearson, &want.pearson),
        ] {
            let r = worst_ratio(&to_f64(g), &to_f64(wv), tol, tol);
            assert!(r <= 1.0, "{what}: {name} {r} x tolerance");
        }
    }
    // a group id out of range names `groups`
    let data = banded_data::<E>(80, (10, 4, 2, 2), 2);
    let mut groups = data.groups.clone();
    groups[1] = -1;
    let w = vec![E::from_f64(0.5); 4 * 2];
    let err = ridge::cuda::split_scores_host(
        device,
        BandedShape::new(10, 4, 2, 2),
        &data.x,
        &groups,
        &w,
        &data.y,
    )
    .unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
}

#[test]
fn cuda_split_scores_matches_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_split_scores_matches_cpu") {
        check_split::<f32>(&dev, 2e-5);
        check_split::<f64>(&dev, 1e-12);
    }
}

/// ridge.score on the device against the CPU: random columns, a constant target (R² and
/// Pearson 0), a constant prediction (Pearson 0), a perfect prediction, more columns than
/// one block holds, one row, no rows.
fn check_score<E: CudaRidgeReal>(device: &Device, tol: f64) {
    for (seed, &(n, t)) in [(37usize, 70usize), (1, 3), (0, 4), (200, 1)]
        .iter()
        .enumerate()
    {
        let mut rng = Rng::new(90 + seed as u64);
        let y_true: Vec<E> = rng.vec(n * t, -1.0, 1.0);
        let mut y_pred: Vec<E> = rng.vec(n * t, -1.0, 1.0);
        if n > 1 && t >= 3 {
            // column 0 predicted perfectly, column 1 by a constant
            let constant = y_pred[1];
            for i in 0..n {
                y_pred[i * t] = y_true[i * t];
                y_pred[i * t + 1] = constant;
            }
        }
        let want = ridge::score(RidgeShape::new(n, 0, t), &y_true, &y_pred).unwrap();
        let got =
            ridge::cuda::score_host(device, RidgeShape::new(n, 0, t), &y_true, &y_pred).unwrap();
        for (what, g, w) in [
            ("r2", &got.r2, &want.r2),
            ("pearson", &got.pearson, &want.pearson),
        ] {
            let r = worst_ratio(&to_f64(g), &to_f64(w), tol, tol);
            assert!(r <= 1.0, "{} n{n} t{t} {what}: {r} x tolerance", E::DTYPE);
        }
    }
    // a constant target: both scores exactly 0, as on the CPU
    let (n, t) = (9, 2);
    let y_true: Vec<E> = (0..n * t).map(|i| E::from_f64((i % t) as f64)).collect();
    let y_pred: Vec<E> = Rng::new(5).vec(n * t, -1.0, 1.0);
    let got = ridge::cuda::score_host(device, RidgeShape::new(n, 0, t), &y_true, &y_pred).unwrap();
    let (r2, pearson) = (got.r2, got.pearson);
    assert_eq!(to_f64(&r2), vec![0.0, 0.0]);
    assert_eq!(to_f64(&pearson), vec![0.0, 0.0]);
    let mut bad = y_pred.clone();
    bad[3] = E::from_f64(f64::NAN);
    let e = ridge::cuda::score_host(device, RidgeShape::new(n, 0, t), &y_true, &bad).unwrap_err();
    assert!(e.to_string().contains("y_pred"), "{e}");
    let e = ridge::cuda::score_host(device, RidgeShape::new(n, 0, t), &y_true[1..], &y_pred)
        .unwrap_err();
    assert!(e.to_string().contains("y_true"), "{e}");
}

#[test]
fn cuda_score_matches_cpu() {
    if let Some(dev) = common::device_or_skip("cuda_score_matches_cpu") {
        check_score::<f32>(&dev, 1e-5);
        check_score::<f64>(&dev, 1e-12);
    }
}
