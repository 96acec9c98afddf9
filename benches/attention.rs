//! Criterion benches of the attention family on the CPU at the standard sizes of
//! `../shared/anchors/cpu.py` (compare in the same sitting):
//! - forward B1 H8 S2048 D64 f32, non-causal and causal: throughput in elements = flops
//!   (4·B·H·S²·D, halved with causal; criterion's "elem/s" reads as FLOP/s);
//! - the backward alone at the same size (2.5 × the forward flops), and forward + backward:
//!   3.5 × the forward flops (the anchor's count);
//! - decode Hq32 Hk8 Sk8192 D128, one query: throughput in bytes of f32 K and V read
//!   (2·Hk·Sk·D·4; the bf16 row reads half of that), next to a parallel copy of the same
//!   bytes.
//!
//! ```text
//! cargo bench --bench attention
//! cargo bench --bench attention -- decode
//! ```

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neurokernels::attention::{
    self, AttentionInputs, AttentionOut, AttentionParams, AttentionShape,
};
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn bench_prefill(c: &mut Criterion) {
    let (b, h, s, d) = (1, 8, 2048, 64);
    let shape = AttentionShape::new(b, s, s, h, h, d, d);
    let (q, k, v, d_o) = (
        data(b * s * h * d, 1),
        data(b * s * h * d, 2),
        data(b * s * h * d, 3),
        data(b * s * h * d, 4),
    );
    let inputs = AttentionInputs::new(&q, &k, &v);
    let mut group = c.benchmark_group("attention_cpu/B1_H8_S2048_D64");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(6))
        .warm_up_time(Duration::from_secs(1));
    for causal in [false, true] {
        let params = AttentionParams::new().causal(causal);
        let flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
        let tag = if causal { "causal" } else { "full" };
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function(format!("forward_{tag}"), |bench| {
            bench.iter(|| black_box(attention::forward(&params, shape, &inputs).unwrap()))
        });
        // the backward alone (2.5 × the forward flops: dS = dO·Vᵀ, dV, dQ, dK and the
        // recomputed S) from one forward's o and lse
        let AttentionOut { o, lse, .. } = attention::forward(&params, shape, &inputs).unwrap();
        group.throughput(Throughput::Elements((2.5 * flops) as u64));
        group.bench_function(format!("backward_{tag}"), |bench| {
            bench.iter(|| {
                black_box(attention::backward(&params, shape, &inputs, &o, &d_o, &lse).unwrap())
            })
        });
        group.throughput(Throughput::Elements((3.5 * flops) as u64));
        group.bench_function(format!("forward_backward_{tag}"), |bench| {
            bench.iter(|| {
                let AttentionOut { o, lse, .. } =
                    attention::forward(&params, shape, &inputs).unwrap();
                black_box(attention::backward(&params, shape, &inputs, &o, &d_o, &lse).unwrap())
            })
        });
    }
    group.finish();
}

fn bench_decode(c: &mut Criterion) {
    let (hq, hk, sk, d) = (32, 8, 8192, 128);
    let shape = AttentionShape::new(1, 1, sk, hq, hk, d, d);
    let (q, k, v) = (data(hq * d, 5), data(sk * hk * d, 6), data(sk * hk * d, 7));
    let inputs = AttentionInputs::new(&q, &k, &v);
    let params = AttentionParams::new();
    let bytes = (2 * hk * sk * d * 4) as u64;
    let mut group = c.benchmark_group("attention_cpu/decode_Hq32_Hk8_Sk8192_D128");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("decode", |bench| {
        bench.iter(|| black_box(attention::forward(&params, shape, &inputs).unwrap()))
    });
    // the same decode on a bf16 KV cache (half the bytes; keys widened in registers)
    let to_bf16 = |x: &[f32]| {
        x.iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect::<Vec<_>>()
    };
    let (qh, kh, vh) = (to_bf16(&q), to_bf16(&k), to_bf16(&v));
    let inputs_bf16 = AttentionInputs::new(&qh, &kh, &vh);
    group.bench_function("decode_bf16", |bench| {
        bench.iter(|| black_box(attention::forward(&params, shape, &inputs_bf16).unwrap()))
    });
    // a reference rate: a parallel copy reading as many bytes (and writing them); a read
    // alone is faster, so this is not the decode's ceiling
    let src: Vec<f32> = k.iter().chain(&v).copied().collect();
    let mut dst = vec![0f32; src.len()];
    group.bench_function("copy_same_bytes", |bench| {
        bench.iter(|| {
            dst.par_chunks_mut(1 << 18)
                .zip(src.par_chunks(1 << 18))
                .for_each(|(d, s)| d.copy_from_slice(s));
            black_box(&dst);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_prefill, bench_decode);
criterion_main!(benches);
