//! Batched ridge on the CPU at the standard sizes (`../shared/anchors/cpu.py`: `ridge`):
//! ridge.cv n3000 p1000 t10000, 20 alphas, 3 folds (himalaya's numpy backend is the
//! anchor), and ridge.solve_batched G1024 n256 p64 t16 (the anchor: batched
//! torch.linalg.solve of the normal equations).

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

criterion_group!(benches, bench_solve_batched, bench_cv);
criterion_main!(benches);
