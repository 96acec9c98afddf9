//! Sparse top-k encoding on the CPU at the standard sizes (`../shared/anchors/cpu.py`:
//! `topk_rows`, `sae_encode`, `sae_decode`): topk.rows R4096 N32768 k32 (anchor
//! torch.topk), sae.encode B4096 Dm768 L32768 k32 (anchor: dense F.linear + relu + topk),
//! sae.decode at the same sizes (anchor F.embedding_bag), plus sae.backward, BatchTopK and
//! codebook.nearest at the encoder's sizes for reference.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use neurokernels::cpu::{Isa, set_amx_enabled, set_bf16_screen_enabled, set_force_scalar};
use neurokernels::topk::{
    self, BackwardInputs, EncoderInputs, Metric, RowsParams, RowsShape, SaeShape,
};
use std::hint::black_box;
use std::time::Duration;

/// Deterministic values uniform in [-0.5, 0.5) times `scale`.
fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

const B: usize = 4096;
const DM: usize = 768;
const L: usize = 32768;
const K: usize = 32;

fn slow_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    group
}

fn bench_rows(c: &mut Criterion) {
    let (r, n) = (4096, 32768);
    let x = data(r * n, 1, 2.0);
    let mut group = slow_group(c, "topk_rows/R4096_N32768_k32");
    // bound: one pass over the input
    group.throughput(Throughput::Bytes((r * n * 4) as u64));
    for isa in [Isa::active(), Isa::Scalar] {
        group.bench_function(BenchmarkId::new("f32", isa.name()), |b| {
            b.iter(|| {
                topk::rows_on(
                    isa,
                    &RowsParams::new(),
                    RowsShape::new(r, n),
                    K,
                    black_box(&x),
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let s = SaeShape::new(B, DM, L);
    let x = data(B * DM, 2, 3.4);
    let w = data(L * DM, 3, 3.4 / (DM as f32).sqrt());
    let b_enc = vec![0.0f32; L];
    let inputs = EncoderInputs {
        x: &x,
        w_enc: &w,
        b_enc: &b_enc,
        b_dec: None,
    };
    let mut group = slow_group(c, "sae_encode/B4096_D768_L32768_k32");
    // bound: the 2·B·L·Dm flops of the encoder product
    group.throughput(Throughput::Elements((2 * B * L * DM) as u64));
    group.bench_function(BenchmarkId::new("f32", Isa::active().name()), |b| {
        b.iter(|| topk::encode(s, K, black_box(&inputs)).unwrap())
    });
    // the row above screens with bf16 products and rescores exactly where the CPU allows:
    // AMX where present, else AVX512-BF16. The same with AMX off (AVX512-BF16 screening
    // where present: on CPUs without AMX, the row above again)
    group.bench_function(BenchmarkId::new("f32_dpbf16", Isa::active().name()), |b| {
        set_amx_enabled(false);
        b.iter(|| topk::encode(s, K, black_box(&inputs)).unwrap());
        set_amx_enabled(true);
    });
    // the plain AVX-512 path (same results): both screenings off
    group.bench_function(BenchmarkId::new("f32_plain", Isa::active().name()), |b| {
        set_amx_enabled(false);
        set_bf16_screen_enabled(false);
        b.iter(|| topk::encode(s, K, black_box(&inputs)).unwrap());
        set_amx_enabled(true);
        set_bf16_screen_enabled(true);
    });
    group.bench_function(
        BenchmarkId::new("f32_batch_topk", Isa::active().name()),
        |b| b.iter(|| topk::encode_batch_topk(s, K, black_box(&inputs)).unwrap()),
    );
    group.bench_function(
        BenchmarkId::new("f32_nearest_l2", Isa::active().name()),
        |b| b.iter(|| topk::nearest(Metric::L2, s, K, black_box(&x), &w).unwrap()),
    );
    group.finish();
}

fn bench_decode_backward(c: &mut Criterion) {
    let s = SaeShape::new(B, DM, L);
    let w_dec = data(L * DM, 4, 2.0);
    let mut seed = 5u64;
    let indices: Vec<i32> = (0..B * K)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ((seed >> 33) % L as u64) as i32
        })
        .collect();
    let values: Vec<f32> = data(B * K, 6, 1.0).iter().map(|v| v + 0.5).collect();
    let mut group = slow_group(c, "sae_decode/B4096_D768_L32768_k32");
    // bound: the B·k gathered rows of w_dec (plus the output)
    group.throughput(Throughput::Bytes((B * K * DM * 4 + B * DM * 4) as u64));
    for isa in [Isa::active(), Isa::Scalar] {
        group.bench_function(BenchmarkId::new("f32", isa.name()), |b| {
            set_force_scalar(isa == Isa::Scalar);
            b.iter(|| {
                topk::decode_on(isa, s, K, black_box(&indices), &values, &w_dec, None).unwrap()
            });
            set_force_scalar(false);
        });
    }
    group.finish();

    let x = data(B * DM, 7, 3.4);
    let w_enc = data(L * DM, 8, 0.1);
    let b_enc = vec![0.0f32; L];
    let d_xhat = data(B * DM, 9, 1.0);
    let mut group = slow_group(c, "sae_backward/B4096_D768_L32768_k32");
    // bound: writing dw_dec and dw_enc (dense [L, Dm] each) and the B·k row gathers
    group.throughput(Throughput::Bytes(
        (2 * L * DM * 4 + 3 * B * K * DM * 4) as u64,
    ));
    group.bench_function(BenchmarkId::new("f32", Isa::active().name()), |b| {
        b.iter(|| {
            topk::backward(
                s,
                K,
                &BackwardInputs {
                    x: black_box(&x),
                    w_enc: &w_enc,
                    b_enc: &b_enc,
                    b_dec: None,
                    w_dec: &w_dec,
                    indices: &indices,
                    values: &values,
                    d_xhat: &d_xhat,
                },
            )
            .unwrap()
        })
    });
    group.finish();
}

/// With `--features cuda` and a GPU: sae.encode in bf16 at B4096 D768 L131072 k32 (the
/// issue's GPU size; gpu.py's anchor), and topk.rows / sae.decode at the CPU sizes.
#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use half::bf16;
    use neurokernels::cuda::Device;
    use neurokernels::topk::cuda::{self as tc, EncoderViews};
    let device = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED CUDA benches: {e}");
            return;
        }
    };
    let stream = device.stream().clone();
    let timed = |iters: u64, f: &mut dyn FnMut()| {
        stream.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        stream.synchronize().unwrap();
        start.elapsed()
    };
    let l = 131_072;
    let s = SaeShape::new(B, DM, l);
    let to_bf16 = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let x = stream.clone_htod(&to_bf16(data(B * DM, 2, 3.4))).unwrap();
    let w = stream
        .clone_htod(&to_bf16(data(l * DM, 3, 3.4 / (DM as f32).sqrt())))
        .unwrap();
    let b = stream.alloc_zeros::<bf16>(l).unwrap();
    let mut values = stream.alloc_zeros::<bf16>(B * K).unwrap();
    let mut indices = stream.alloc_zeros::<i32>(B * K).unwrap();
    let mut group = c.benchmark_group("sae_encode_cuda/B4096_D768_L131072_k32");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements((2 * B * l * DM) as u64));
    group.bench_function("bf16_simt", |bench| {
        bench.iter_custom(|iters| {
            timed(iters, &mut || {
                tc::encode(
                    &device,
                    &stream,
                    s,
                    EncoderViews {
                        x: &x.slice(..),
                        w_enc: &w.slice(..),
                        b_enc: &b.slice(..),
                        b_dec: None,
                    },
                    K,
                    &mut values,
                    &mut indices,
                )
                .unwrap()
            })
        })
    });
    group.finish();

    let (r, n) = (4096, 131_072); // gpu.py's topk_rows size
    let xr = stream.clone_htod(&data(r * n, 1, 2.0)).unwrap();
    let mut v = stream.alloc_zeros::<f32>(r * K).unwrap();
    let mut i = stream.alloc_zeros::<i32>(r * K).unwrap();
    let mut group = c.benchmark_group("topk_rows_cuda/R4096_N131072_k32");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Bytes((r * n * 4) as u64));
    group.bench_function("f32", |bench| {
        bench.iter_custom(|iters| {
            timed(iters, &mut || {
                tc::rows(
                    &device,
                    &stream,
                    &RowsParams::new(),
                    RowsShape::new(r, n),
                    K,
                    &xr.slice(..),
                    &mut v,
                    &mut i,
                )
                .unwrap()
            })
        })
    });
    group.finish();
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(
    benches,
    bench_rows,
    bench_encode,
    bench_decode_backward,
    bench_cuda
);
criterion_main!(benches);
