//! Criterion benches of scan.linear. The scan is memory-bound, so each group also times a
//! multi-threaded copy moving the same number of bytes: that copy is the ceiling, and
//! `scan / copy` throughput is the fraction of it reached.
//!
//! Bytes counted: forward reads a, b and writes h (3 tensors); backward reads a, h, dh and
//! writes da, db (5 tensors; dh0 is negligible).
//!
//!     cargo bench --bench scan                 # all
//!     cargo bench --bench scan -- B8_T4096     # one size
//!
//! With `--features cuda` and a GPU, the same sizes also run on the device against a
//! device-to-device copy of the same bytes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use neurokernels::cpu::Isa;
use neurokernels::scan::{self, ScanParams, ScanShape};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

/// (label, B, T, D): the standard size, and a long sequence on few channels where the
/// parallelism must come from the time axis.
const SIZES: &[(&str, usize, usize, usize)] = &[
    ("B8_T4096_D1024", 8, 4096, 1024),
    ("B1_T262144_D16", 1, 262_144, 16),
];

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            0.5 + (x >> 8) as f32 / (1u32 << 25) as f32
        })
        .collect()
}

/// Copies src to dst on every rayon thread, in 1 MiB pieces.
fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    const PIECE: usize = 1 << 18;
    dst.par_chunks_mut(PIECE)
        .zip(src.par_chunks(PIECE))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

fn bench_cpu(c: &mut Criterion) {
    for &(label, bsz, t, d) in SIZES {
        let n = bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let (a, b) = (data(n, 1), data(n, 2));
        let mut h = vec![0f32; n];
        let mut group = c.benchmark_group(format!("scan_linear_cpu/{label}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(4))
            .warm_up_time(Duration::from_secs(1));

        let fwd_bytes = (3 * n * 4) as u64;
        group.throughput(Throughput::Bytes(fwd_bytes));
        let copy_src = data(3 * n / 2, 3);
        let mut copy_dst = vec![0f32; copy_src.len()];
        group.bench_function("copy_same_bytes_as_forward", |bench| {
            bench.iter(|| parallel_copy(black_box(&copy_src), &mut copy_dst))
        });
        for isa in Isa::available() {
            let p = ScanParams::new();
            group.bench_function(BenchmarkId::new("forward_f32", isa.name()), |bench| {
                bench.iter(|| {
                    scan::linear_into_on(isa, &p, shape, black_box(&a), black_box(&b), None, &mut h)
                        .unwrap()
                })
            });
        }
        let (ah, bh): (Vec<half::bf16>, Vec<half::bf16>) = (
            a.iter().map(|&x| half::bf16::from_f32(x)).collect(),
            b.iter().map(|&x| half::bf16::from_f32(x)).collect(),
        );
        let mut hh = vec![half::bf16::ZERO; n];
        group.throughput(Throughput::Bytes((3 * n * 2) as u64));
        group.bench_function(
            BenchmarkId::new("forward_bf16", Isa::detected().name()),
            |bench| {
                bench.iter(|| {
                    scan::linear_into(
                        &ScanParams::new(),
                        shape,
                        black_box(&ah),
                        black_box(&bh),
                        None,
                        &mut hh,
                    )
                    .unwrap()
                })
            },
        );

        let bwd_bytes = (5 * n * 4) as u64;
        group.throughput(Throughput::Bytes(bwd_bytes));
        let copy_src = data(5 * n / 2, 4);
        let mut copy_dst = vec![0f32; copy_src.len()];
        group.bench_function("copy_same_bytes_as_backward", |bench| {
            bench.iter(|| parallel_copy(black_box(&copy_src), &mut copy_dst))
        });
        scan::linear_into(&ScanParams::new(), shape, &a, &b, None, &mut h).unwrap();
        let (mut da, mut db, mut dh0) = (vec![0f32; n], vec![0f32; n], vec![0f32; bsz * d]);
        group.bench_function(
            BenchmarkId::new("backward_f32", Isa::detected().name()),
            |bench| {
                bench.iter(|| {
                    scan::linear_backward_into(
                        &ScanParams::new(),
                        shape,
                        black_box(&a),
                        &h,
                        black_box(&b),
                        None,
                        &mut da,
                        &mut db,
                        &mut dh0,
                    )
                    .unwrap()
                })
            },
        );
        group.finish();
    }
}

/// The complex scan at the standard size's bytes: B8 T4096 D512 complex channels.
fn bench_cpu_complex(c: &mut Criterion) {
    let (bsz, t, d) = (8, 4096, 512);
    let n = 2 * bsz * t * d;
    let shape = ScanShape::new(bsz, t, d);
    // gates of modulus below one: the phase comes from the data's own mix of signs
    let (a, b) = (
        data(n, 5).iter().map(|x| x - 0.75).collect::<Vec<f32>>(),
        data(n, 6),
    );
    let mut h = vec![0f32; n];
    let mut group = c.benchmark_group("scan_linear_complex_cpu/B8_T4096_D512");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes((3 * n * 4) as u64));
    let copy_src = data(3 * n / 2, 7);
    let mut copy_dst = vec![0f32; copy_src.len()];
    group.bench_function("copy_same_bytes_as_forward", |bench| {
        bench.iter(|| parallel_copy(black_box(&copy_src), &mut copy_dst))
    });
    for isa in Isa::available() {
        group.bench_function(BenchmarkId::new("forward_f32", isa.name()), |bench| {
            bench.iter(|| {
                scan::linear_complex_into_on(
                    isa,
                    &ScanParams::new(),
                    shape,
                    black_box(&a),
                    black_box(&b),
                    None,
                    &mut h,
                )
                .unwrap()
            })
        });
    }
    // the backward beside its forward: reads a, h, dh and writes da, db (5 tensors)
    let dh = data(n, 8);
    let (mut da, mut db, mut dh0) = (vec![0f32; n], vec![0f32; n], vec![0f32; 2 * bsz * d]);
    group.throughput(Throughput::Bytes((5 * n * 4) as u64));
    group.bench_function("copy_same_bytes_as_backward", |bench| {
        let src = data(5 * n / 2, 9);
        let mut dst = vec![0f32; src.len()];
        bench.iter(|| parallel_copy(black_box(&src), &mut dst))
    });
    group.bench_function(
        BenchmarkId::new("backward_f32", Isa::detected().name()),
        |bench| {
            bench.iter(|| {
                scan::linear_complex_backward_into(
                    &ScanParams::new(),
                    shape,
                    black_box(&a),
                    black_box(&h),
                    black_box(&dh),
                    None,
                    &mut da,
                    &mut db,
                    &mut dh0,
                )
                .unwrap()
            })
        },
    );
    group.finish();
}

/// Mamba-1's selective scan at the anchor's size (B2 T2048 D1536 N16, softplus, D skip, z
/// gate). Compute-bound: B·T·D·N exponentials. Throughput in channel-steps (B·T·D).
fn bench_cpu_selective(c: &mut Criterion) {
    use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
    let (b, t, d, n) = (2, 2048, 1536, 16);
    let shape = SelectiveShape::new(b, t, d, n);
    let seq = b * t * d;
    let centered = |v: Vec<f32>| {
        v.into_iter()
            .map(|x| 4.0 * (x - 0.75))
            .collect::<Vec<f32>>()
    };
    let (u, delta, z) = (
        centered(data(seq, 11)),
        centered(data(seq, 12)),
        centered(data(seq, 13)),
    );
    let a: Vec<f32> = data(d * n, 14).iter().map(|x| -2.0 * x).collect();
    let (bm, cm) = (centered(data(b * t * n, 15)), centered(data(b * t * n, 16)));
    let dskip = centered(data(d, 17));
    let inputs = SelectiveInputs {
        u: &u,
        delta: &delta,
        a: &a,
        bm: &bm,
        cm: &cm,
        dskip: Some(&dskip),
        z: Some(&z),
        delta_bias: None,
        h0: None,
    };
    let (mut y, mut h_last) = (vec![0f32; seq], vec![0f32; b * d * n]);
    let dy = centered(data(seq, 18));
    let params = SelectiveParams::new().delta_softplus(true);
    // the gradient buffers, allocated (and faulted in) once
    let mut grads = selective::selective_backward(&params, shape, &inputs, &dy).unwrap();
    let mut group = c.benchmark_group("scan_selective_cpu/B2_T2048_D1536_N16");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(seq as u64));
    for isa in Isa::available() {
        group.bench_function(BenchmarkId::new("forward_f32", isa.name()), |bench| {
            bench.iter(|| {
                selective::selective_into_on(
                    isa,
                    &params,
                    shape,
                    black_box(&inputs),
                    &mut y,
                    &mut h_last,
                )
                .unwrap()
            })
        });
        // beside the forward, so the ratio shows in one run (issue 29: at most 3×); into
        // reused buffers, as the forward writes y
        group.bench_function(BenchmarkId::new("backward_f32", isa.name()), |bench| {
            bench.iter(|| {
                selective::selective_backward_into_on(
                    isa,
                    &params,
                    shape,
                    black_box(&inputs),
                    &dy,
                    grads.as_mut(),
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

/// Gated linear attention at the anchor's size (B1 T2048 H8 K64 V64). Throughput in
/// head-steps; the recurrence does 4·K·V flops per head-step (state update and readout).
fn bench_cpu_gla(c: &mut Criterion) {
    use neurokernels::scan::gla::{self, GlaForm, GlaInputs, GlaParams, GlaShape};
    let (b, t, h, k, v) = (1, 2048, 8, 64, 64);
    let shape = GlaShape::new(b, t, h, k, v);
    let centered = |x: Vec<f32>| {
        x.into_iter()
            .map(|y| 4.0 * (y - 0.75))
            .collect::<Vec<f32>>()
    };
    let (q, kk, vv) = (
        centered(data(b * t * h * k, 21)),
        centered(data(b * t * h * k, 22)),
        centered(data(b * t * h * v, 23)),
    );
    // log-gates near 0 (gates near 1), as logsigmoid(randn + 3) gives
    let g: Vec<f32> = data(b * t * h * k, 24).iter().map(|x| -0.1 * x).collect();
    let inputs = GlaInputs {
        q: &q,
        k: &kk,
        v: &vv,
        g: &g,
        h0: None,
    };
    let d_o = centered(data(b * t * h * v, 25));
    let mut group = c.benchmark_group("scan_gla_cpu/B1_T2048_H8_K64_V64");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements((b * t * h) as u64));
    let (mut o, mut h_last) = (vec![0f32; b * t * h * v], vec![0f32; b * h * k * v]);
    for isa in Isa::available() {
        for (form, name) in [
            (GlaForm::Chunked, "forward_f32"),
            (GlaForm::Recurrent, "forward_recurrent_f32"),
        ] {
            group.bench_function(BenchmarkId::new(name, isa.name()), |bench| {
                bench.iter(|| {
                    gla::gla_into_on(
                        isa,
                        &GlaParams::new().form(form),
                        shape,
                        black_box(&inputs),
                        &mut o,
                        &mut h_last,
                    )
                    .unwrap()
                })
            });
        }
    }
    // the backward beside its forward, into reused buffers as the forward writes o
    let n = b * t * h * k;
    let (mut dq, mut dk, mut dv, mut dg) = (
        vec![0f32; n],
        vec![0f32; n],
        vec![0f32; b * t * h * v],
        vec![0f32; n],
    );
    for isa in Isa::available() {
        for (form, name) in [
            (GlaForm::Chunked, "backward_f32"),
            (GlaForm::Recurrent, "backward_recurrent_f32"),
        ] {
            if isa == Isa::Scalar && form == GlaForm::Recurrent {
                continue;
            }
            group.bench_function(BenchmarkId::new(name, isa.name()), |bench| {
                bench.iter(|| {
                    let grads = gla::GlaGradsMut {
                        dq: &mut dq,
                        dk: &mut dk,
                        dv: &mut dv,
                        dg: &mut dg,
                        dh0: None,
                    };
                    let p = GlaParams::new().form(form);
                    gla::gla_backward_into_on(isa, &p, shape, black_box(&inputs), &d_o, None, grads)
                        .unwrap()
                })
            });
        }
    }
    group.finish();
}

#[cfg(feature = "cuda")]
fn bench_cuda(c: &mut Criterion) {
    use neurokernels::cuda::Device;
    let device = match Device::open(0) {
        Ok(d) => d,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED CUDA benches: {e}");
            return;
        }
    };
    let stream = device.stream().clone();
    // times `iters` runs of `f` between two synchronizations
    let timed = |iters: u64, f: &mut dyn FnMut()| {
        stream.synchronize().unwrap();
        let start = std::time::Instant::now();
        for _ in 0..iters {
            f();
        }
        stream.synchronize().unwrap();
        start.elapsed()
    };
    for &(label, bsz, t, d) in SIZES.iter().chain(&[("B64_T4096_D1024", 64, 4096, 1024)]) {
        let n = bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let a = stream.clone_htod(&data(n, 1)).unwrap();
        let b = stream.clone_htod(&data(n, 2)).unwrap();
        let mut h = stream.alloc_zeros::<f32>(n).unwrap();
        let copy_src = stream.alloc_zeros::<f32>(3 * n / 2).unwrap();
        let mut copy_dst = stream.alloc_zeros::<f32>(3 * n / 2).unwrap();
        let mut group = c.benchmark_group(format!("scan_linear_cuda/{label}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        group.throughput(Throughput::Bytes((3 * n * 4) as u64));
        group.bench_function("copy_same_bytes_as_forward", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    stream.memcpy_dtod(&copy_src, &mut copy_dst).unwrap()
                })
            })
        });
        group.bench_function("forward_f32", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    scan::cuda::linear(
                        &device,
                        &stream,
                        &ScanParams::new(),
                        shape,
                        &a,
                        &b,
                        None,
                        &mut h,
                    )
                    .unwrap()
                })
            })
        });
        group.throughput(Throughput::Bytes((5 * n * 4) as u64));
        let (mut da, mut db) = (
            stream.alloc_zeros::<f32>(n).unwrap(),
            stream.alloc_zeros::<f32>(n).unwrap(),
        );
        let mut dh0 = stream.alloc_zeros::<f32>(bsz * d).unwrap();
        group.bench_function("backward_f32", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    scan::cuda::linear_backward(
                        &device,
                        &stream,
                        &ScanParams::new(),
                        shape,
                        &a,
                        &h,
                        &b,
                        None,
                        &mut da,
                        &mut db,
                        &mut dh0,
                    )
                    .unwrap()
                })
            })
        });
        group.finish();
    }

    // the selective scan, forward and backward, at the size
    {
        use neurokernels::scan::selective::{self, SelectiveParams, SelectiveShape};
        let (b, t, d, n) = (2, 2048, 1536, 16);
        let shape = SelectiveShape::new(b, t, d, n);
        let seq = b * t * d;
        let up = |x: Vec<f32>| stream.clone_htod(&x).unwrap();
        let (u, delta, dy) = (up(data(seq, 31)), up(data(seq, 32)), up(data(seq, 33)));
        let a = up(data(d * n, 34).iter().map(|x| -2.0 * x).collect());
        let (bm, cm) = (up(data(b * t * n, 35)), up(data(b * t * n, 36)));
        let inputs = selective::cuda::DeviceInputs {
            u: u.as_view(),
            delta: delta.as_view(),
            a: a.as_view(),
            bm: bm.as_view(),
            cm: cm.as_view(),
            dskip: None,
            z: None,
            delta_bias: None,
            h0: None,
        };
        let (mut y, mut h_last) = (
            stream.alloc_zeros::<f32>(seq).unwrap(),
            stream.alloc_zeros::<f32>(b * d * n).unwrap(),
        );
        let p = SelectiveParams::new();
        let mut group = c.benchmark_group("scan_selective_cuda/B2_T2048_D1536_N16");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        group.throughput(Throughput::Elements(seq as u64));
        group.bench_function("forward_f32", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    selective::cuda::selective(
                        &device,
                        &stream,
                        &p,
                        shape,
                        &inputs,
                        &mut y,
                        &mut h_last,
                    )
                    .unwrap()
                })
            })
        });
        // (includes allocating the gradients and the scratch on the stream)
        group.bench_function("backward_f32", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    selective::cuda::selective_backward(
                        &device,
                        &stream,
                        &p,
                        shape,
                        &inputs,
                        &dy.as_view(),
                    )
                    .map(drop)
                    .unwrap()
                })
            })
        });
        group.finish();
    }

    // GLA forward at the size
    {
        use neurokernels::scan::gla::{self, GlaParams, GlaShape};
        let (b, t, h, k, v) = (1, 2048, 8, 64, 64);
        let shape = GlaShape::new(b, t, h, k, v);
        let up = |x: Vec<f32>| stream.clone_htod(&x).unwrap();
        let (q, kk, vv) = (
            up(data(b * t * h * k, 41)),
            up(data(b * t * h * k, 42)),
            up(data(b * t * h * v, 43)),
        );
        let g = up(data(b * t * h * k, 44).iter().map(|x| -0.1 * x).collect());
        let inputs = gla::cuda::DeviceInputs {
            q: q.as_view(),
            k: kk.as_view(),
            v: vv.as_view(),
            g: g.as_view(),
            h0: None,
        };
        let (mut o, mut h_last) = (
            stream.alloc_zeros::<f32>(b * t * h * v).unwrap(),
            stream.alloc_zeros::<f32>(b * h * k * v).unwrap(),
        );
        let mut group = c.benchmark_group("scan_gla_cuda/B1_T2048_H8_K64_V64");
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        group.throughput(Throughput::Elements((b * t * h) as u64));
        group.bench_function("forward_f32", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    gla::cuda::gla(
                        &device,
                        &stream,
                        &GlaParams::new(),
                        shape,
                        &inputs,
                        &mut o,
                        &mut h_last,
                    )
                    .unwrap()
                })
            })
        });
        // bf16 takes the tensor-core kernel (kernels/gla_tc.cu)
        let up16 = |x: &[f32]| {
            let x: Vec<half::bf16> = x.iter().map(|&x| half::bf16::from_f32(x)).collect();
            stream.clone_htod(&x).unwrap()
        };
        let (q16, k16, v16) = (
            up16(&data(b * t * h * k, 41)),
            up16(&data(b * t * h * k, 42)),
            up16(&data(b * t * h * v, 43)),
        );
        let g16 = up16(
            &data(b * t * h * k, 44)
                .iter()
                .map(|x| -0.1 * x)
                .collect::<Vec<_>>(),
        );
        let inputs16 = gla::cuda::DeviceInputs {
            q: q16.as_view(),
            k: k16.as_view(),
            v: v16.as_view(),
            g: g16.as_view(),
            h0: None,
        };
        let mut o16 = stream.alloc_zeros::<half::bf16>(b * t * h * v).unwrap();
        group.bench_function("forward_bf16_tensor_cores", |bench| {
            bench.iter_custom(|iters| {
                timed(iters, &mut || {
                    gla::cuda::gla(
                        &device,
                        &stream,
                        &GlaParams::new(),
                        shape,
                        &inputs16,
                        &mut o16,
                        &mut h_last,
                    )
                    .unwrap()
                })
            })
        });
        group.finish();
    }
}

#[cfg(not(feature = "cuda"))]
fn bench_cuda(_: &mut Criterion) {}

criterion_group!(
    benches,
    bench_cpu,
    bench_cpu_complex,
    bench_cpu_selective,
    bench_cpu_gla,
    bench_cuda
);
criterion_main!(benches);
