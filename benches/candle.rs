//! Criterion benches of `neurokernels::candle` on the CPU, B1 H8 S2048 D64 f32, non-causal:
//! - our candle attention op against candle's own matmul → softmax → matmul (the softmax
//!   written with candle-core's ops: max, sub, exp, sum, div), forward and forward + backward
//!   (`Tensor::backward` of the sum of o);
//! - the candle wrapper's overhead: the op on contiguous tensors against a direct call of
//!   `neurokernels::attention::forward` on the same data as slices (goal ≤ 5%);
//! - a top-k SAE step's gradients through candle's autograd against the slice API's encode,
//!   decode and fused backward (B1024 Dm768 L16384 k32).
//!
//! ```text
//! cargo bench --features candle --bench candle
//! ```

use candle_core::{D, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use neurokernels::attention::{self as flat, AttentionShape};
use neurokernels::candle::attention::{self, AttentionInputs, AttentionParams};
use neurokernels::candle::candle_core;
use std::hint::black_box;
use std::time::Duration;

const B: usize = 1;
const H: usize = 8;
const S: usize = 2048;
const DH: usize = 64;

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

/// candle's own attention in the `[B, H, S, D]` layout.
fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * (1.0 / (DH as f64).sqrt()))?;
    let m = s.max_keepdim(D::Minus1)?.detach();
    let e = s.broadcast_sub(&m)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    p.matmul(v)
}

fn bench(c: &mut Criterion) {
    let n = B * S * H * DH;
    let (qd, kd, vd) = (data(n, 1), data(n, 2), data(n, 3));
    let dev = Device::Cpu;
    // ours: [B, S, H, D]; candle's: [B, H, S, D] (the same numbers, each in its own layout)
    let ours = |x: &Vec<f32>| {
        Var::from_tensor(&Tensor::from_slice(x, (B, S, H, DH), &dev).unwrap()).unwrap()
    };
    let theirs = |x: &Vec<f32>| {
        Var::from_tensor(
            &Tensor::from_slice(x, (B, S, H, DH), &dev)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap(),
        )
        .unwrap()
    };
    let (q, k, v) = (ours(&qd), ours(&kd), ours(&vd));
    let (qt, kt, vt) = (theirs(&qd), theirs(&kd), theirs(&vd));
    let params = AttentionParams::new();

    let mut group = c.benchmark_group("candle_attention_cpu/B1_H8_S2048_D64");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("direct_forward", |bench| {
        let shape = AttentionShape::new(B, S, S, H, H, DH, DH);
        let inputs = flat::AttentionInputs::new(&qd, &kd, &vd);
        bench.iter(|| black_box(flat::forward(&params, shape, &inputs).unwrap()))
    });
    group.bench_function("neurokernels_forward", |bench| {
        bench.iter(|| {
            black_box(attention::forward(&params, &AttentionInputs::new(&q, &k, &v)).unwrap())
        })
    });
    group.bench_function("candle_forward", |bench| {
        bench.iter(|| black_box(candle_attention(&qt, &kt, &vt).unwrap()))
    });
    group.bench_function("neurokernels_forward_backward", |bench| {
        bench.iter(|| {
            let o = attention::forward(&params, &AttentionInputs::new(&q, &k, &v)).unwrap();
            black_box(o.sum_all().unwrap().backward().unwrap())
        })
    });
    group.bench_function("candle_forward_backward", |bench| {
        bench.iter(|| {
            let o = candle_attention(&qt, &kt, &vt).unwrap();
            black_box(o.sum_all().unwrap().backward().unwrap())
        })
    });
    group.finish();
}

/// A top-k SAE training step's gradients (B1024 Dm768 L16384 k32, f32): through candle's
/// autograd (`topk::encode` → `topk::decode` → Σ x̂·w → `backward()`) against the slice API
/// (encode, decode, the fused `sae.backward`) on the same data: the wrappers' overhead on a
/// step whose encoder GEMM dominates.
fn bench_sae(c: &mut Criterion) {
    use neurokernels::candle::topk;
    use neurokernels::topk::{self as flat_topk, BackwardInputs, EncoderInputs, SaeShape};
    let (b, dm, l, k) = (1024, 768, 16384, 32);
    let (xd, wed, wdd) = (data(b * dm, 11), data(l * dm, 12), data(l * dm, 13));
    let bed = vec![0.01f32; l];
    let gd = data(b * dm, 14);
    let dev = Device::Cpu;
    let x = Tensor::from_slice(&xd, (b, dm), &dev).unwrap();
    let w_enc = Var::from_tensor(&Tensor::from_slice(&wed, (l, dm), &dev).unwrap()).unwrap();
    let b_enc = Var::from_tensor(&Tensor::from_slice(&bed, l, &dev).unwrap()).unwrap();
    let w_dec = Var::from_tensor(&Tensor::from_slice(&wdd, (l, dm), &dev).unwrap()).unwrap();
    let g = Tensor::from_slice(&gd, (b, dm), &dev).unwrap();
    let mut group = c.benchmark_group("candle_sae_cpu/B1024_Dm768_L16384_k32");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("direct_step", |bench| {
        let shape = SaeShape::new(b, dm, l);
        let enc = EncoderInputs {
            x: &xd,
            w_enc: &wed,
            b_enc: &bed,
            b_dec: None,
        };
        bench.iter(|| {
            let top = flat_topk::encode(shape, k, &enc).unwrap();
            let x_hat = flat_topk::decode(shape, k, &top.indices, &top.values, &wdd, None).unwrap();
            let inputs = BackwardInputs {
                x: &xd,
                w_enc: &wed,
                b_enc: &bed,
                b_dec: None,
                w_dec: &wdd,
                indices: &top.indices,
                values: &top.values,
                d_xhat: &gd,
            };
            black_box((x_hat, flat_topk::backward(shape, k, &inputs).unwrap()))
        })
    });
    group.bench_function("neurokernels_candle_step", |bench| {
        bench.iter(|| {
            let (values, indices) = topk::encode(&x, &w_enc, &b_enc, k).unwrap();
            let x_hat = topk::decode(&values, &indices, &w_dec).unwrap();
            black_box((x_hat * &g).unwrap().sum_all().unwrap().backward().unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, bench, bench_sae);
criterion_main!(benches);
