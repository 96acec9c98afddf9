//! Batched ridge on the CPU at the standard sizes (`../shared/anchors/cpu.py`: `ridge`):
//! ridge.cv n3000 p1000 t10000, 20 alphas, 3 folds (himalaya's numpy backend is the
//! anchor), ridge.solve_batched G1024 n256 p64 t16 (the anchor: batched
//! torch.linalg.solve of the normal equations), and ridge_banded_cv n3000, two spaces of 500
//! columns, t2000, 20 alphas, 3 folds, 20 candidates (the anchor: himalaya's BandedRidgeCV,
//! numpy backend, `ridge_banded_cv_himalaya_n3000p500x2t2000a20f3c20`).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use neurokernels::cpu::{Isa, set_force_scalar};
use neurokernels::ridge::{self, BatchedShape, RidgeShape};
use std::hint::black_box;
use std::time::Duration;

/// Deterministic values uniform in [-0.5, 0.5).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn bench_solve_batched(c: &mut Criterion) {
    let s = BatchedShape::new(1024, 256, 64, 16);
    let x = data(1024 * 256 * 64, 1);
    let y = data(1024 * 256 * 16, 2);
    let alpha: Vec<f32> = data(1024, 3).iter().map(|a| a + 0.6).collect();
    let mut group = c.benchmark_group("ridge_solve_batched/G1024_n256_p64_t16");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    // the products XᵀX (n·p², as a full square) and XᵀY (n·p·t), 2 flops each
    group.throughput(Throughput::Elements(1024u64 * 2 * 256 * 64 * (64 + 16)));
    for isa in Isa::available() {
        group.bench_function(BenchmarkId::new("f32", isa.name()), |b| {
            set_force_scalar(isa == Isa::Scalar);
            b.iter(|| ridge::solve_batched(s, black_box(&x), &y, &alpha).unwrap());
            set_force_scalar(false);
        });
    }
    group.finish();
}

fn bench_cv(c: &mut Criterion) {
    let (n, p, t) = (3000, 1000, 10000);
    let x = data(n * p, 4);
    // half the targets carry signal, as in the anchor
    let w = data(p * t, 5);
    let noise = data(n * t, 6);
    let mut y = noise;
    for (i, row) in y.chunks_exact_mut(t).enumerate().take(n) {
        for (c, v) in row.iter_mut().enumerate().filter(|(c, _)| c % 2 == 0) {
            let signal: f32 = (0..p)
                .step_by(50)
                .map(|k| x[i * p + k] * w[k * t + c])
                .sum();
            *v += 0.5 * signal;
        }
    }
    let alphas: Vec<f32> = (0..20)
        .map(|i| 10f32.powf(-2.0 + 8.0 * i as f32 / 19.0))
        .collect();
    let folds: Vec<i32> = (0..n).map(|i| (i * 3 / n) as i32).collect();
    let inputs = ridge::CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let mut group = c.benchmark_group("ridge_cv/n3000_p1000_t10000_a20_f3");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(60))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("f32", |b| {
        b.iter(|| {
            ridge::cv(
                &ridge::CvParams::new(),
                RidgeShape::new(n, p, t),
                black_box(&inputs),
                None,
            )
            .unwrap()
        })
    });
    group.finish();
}

/// The anchor's candidates: `np.random.default_rng(1).dirichlet([1.0, 1.0], size=20)`, the
/// first space's weight of each (the second's is 1 − it).
const ANCHOR_GAMMAS: [f64; 20] = [
    0.7767230365237853,
    0.9361832474916392,
    0.060236268420309075,
    0.4748670289749568,
    0.03743284413154844,
    0.8187177351668874,
    0.8893768575540093,
    0.859280307179974,
    0.6662277007756437,
    0.20634773664645198,
    0.5535763428924831,
    0.5830572926079699,
    0.7801131810273508,
    0.9009365010825094,
    0.9727514642869698,
    0.5657334549604599,
    0.15082168676880753,
    0.03406872772654678,
    0.9528385228163941,
    0.2271066252530141,
];

fn bench_banded_cv(c: &mut Criterion) {
    let (n, p1, p2, t) = (3000, 500, 500, 2000);
    let p = p1 + p2;
    let x = data(n * p, 7);
    // as the anchor: each space drives about half the targets, plus noise
    let w = data(p * t, 8);
    let mut y = data(n * t, 9);
    for (i, row) in y.chunks_exact_mut(t).enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            let mut signal = 0.0f32;
            for k in (0..p).step_by(25) {
                let on = if k < p1 { c % 2 == 0 } else { c % 3 == 0 };
                if on {
                    signal += x[i * p + k] * w[k * t + c];
                }
            }
            *v += 0.5 * signal;
        }
    }
    let groups: Vec<i32> = (0..p).map(|j| i32::from(j >= p1)).collect();
    let gammas: Vec<f32> = ANCHOR_GAMMAS
        .iter()
        .flat_map(|g| [*g as f32, (1.0 - g) as f32])
        .collect();
    let alphas: Vec<f32> = (0..20)
        .map(|i| 10f32.powf(-2.0 + 8.0 * i as f32 / 19.0))
        .collect();
    let folds: Vec<i32> = (0..n).map(|i| (i * 3 / n) as i32).collect();
    let inputs = ridge::BandedInputs {
        x: &x,
        groups: &groups,
        y: &y,
        alphas: &alphas,
        gammas: &gammas,
        folds: &folds,
    };
    let mut group = c.benchmark_group("ridge_banded_cv/n3000_p500x2_t2000_a20_f3_c20");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(60))
        .warm_up_time(Duration::from_secs(1));
    let shape = ridge::BandedShape::new(n, p, t, 2);
    group.bench_function("f32", |b| {
        b.iter(|| {
            ridge::banded_cv(&ridge::CvParams::new(), shape, black_box(&inputs), None).unwrap()
        })
    });
    // the CUDA path, host in and host out (y copied per fold and candidate), where a device is
    #[cfg(feature = "cuda")]
    match neurokernels::cuda::Device::open(0) {
        Ok(device) => {
            group.bench_function("f32_cuda", |b| {
                b.iter(|| {
                    ridge::cuda::banded_cv_host(
                        &device,
                        &ridge::CvParams::new(),
                        shape,
                        black_box(&inputs),
                        None,
                    )
                    .unwrap()
                })
            });
        }
        Err(e) => eprintln!("SKIPPED ridge_banded_cv f32_cuda: {e}"),
    }
    group.finish();
}

criterion_group!(benches, bench_solve_batched, bench_cv, bench_banded_cv);
criterion_main!(benches);
