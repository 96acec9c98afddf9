//! The attention family on the GPU against the CPU path (skipped without a device):
//! forward (query-tile and split-KV paths), backward and top_keys in every dtype, over every
//! parameter of the contract (causal/window masks, softcap, ALiBi, broadcast bias, GQA/MQA,
//! cu_seqlens, scale, empty rows) and every head-dim instantiation; deterministic bits; the
//! kernels' limits as `Unsupported`; bad device buffers as errors naming the tensor.

#![cfg(feature = "cuda")]

mod common;

use common::attention::{Config, config, draw};
use common::to_f64;
use half::{bf16, f16};
use neurokernels::attention::cuda::{self as gpu, AttentionViews};
use neurokernels::attention::{
    self, AttentionInputs, AttentionOut, AttentionParams, AttentionShape, CuSeqlens, SplitKv,
};
use neurokernels::cuda::{CudaElement, Device};
use neurokernels::element::Accum;
use neurokernels::{Element, Error};

fn acc_f64<A: Accum>(x: &[A]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// (rtol, atol) between the GPU and the CPU for dtype E (both accumulate alike; they differ
/// in summation order only).
fn tol<E: Element>(grad: bool) -> (f64, f64) {
    match E::DTYPE {
        neurokernels::DType::F64 => (1e-9, 1e-10),
        neurokernels::DType::F32 if grad => (2e-3, 2e-4),
        neurokernels::DType::F32 => (2e-4, 2e-5),
        _ => (2e-2, 2e-2),
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], (rtol, atol): (f64, f64)) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}[{i}]: gpu {g}, cpu {w}");
    }
}

/// Every parameter of the contract, odd and instantiation-sized head dims, empty rows.
fn configs() -> Vec<Config> {
    let p = AttentionParams::new;
    vec![
        config(2, 17, 23, 2, 2, 16, 16),
        config(1, 1, 1, 1, 1, 1, 1),
        config(2, 5, 3, 3, 3, 7, 7).with(p().causal(true)), // Sq > Sk: empty rows
        config(1, 70, 131, 4, 2, 32, 24).with(p().causal(true)), // GQA, Dv < D
        config(1, 131, 67, 2, 1, 8, 40).with(p().causal(true).window_left(9)), // MQA, Dv > D
        config(2, 23, 17, 2, 2, 64, 64).with(p().window_left(2).window_right(1)),
        config(1, 61, 130, 2, 2, 96, 96).with(p().window_right(0).window_left(70)),
        config(2, 17, 23, 4, 2, 128, 128)
            .with(p().softcap(2.0).scale(Some(0.5)))
            .alibi()
            .bias(2, 4),
        config(2, 9, 11, 2, 2, 8, 8)
            .bias(1, 1)
            .with(p().scale(Some(-0.3))),
        config(2, 9, 11, 2, 2, 192, 192).bias(2, 1).alibi(),
        config(2, 9, 11, 2, 2, 8, 8)
            .bias(1, 2)
            .with(p().causal(true)),
        config(1, 0, 0, 2, 1, 16, 16)
            .varlen(&[5, 4, 11, 0, 3], &[7, 1, 13, 2, 0])
            .with(p().causal(true)),
        config(1, 0, 0, 4, 2, 16, 8)
            .varlen(&[5, 1, 64], &[7, 3, 70])
            .with(p().window_left(3).window_right(2))
            .alibi()
            .bias(1, 4),
        config(1, 5, 7, 2, 1, 256, 256),
        config(1, 40, 90, 2, 2, 256, 64).with(p().causal(true).softcap(5.0)),
        config(1, 3, 200, 8, 2, 64, 64).with(p().causal(true).softcap(5.0)),
        // split-KV decode (Auto picks it: Sq·G = 4 <= 16, Sk >= 2 chunks), with masks
        config(2, 1, 1500, 8, 2, 128, 128),
        config(1, 2, 1100, 4, 2, 64, 32).with(p().causal(true).window_left(700)),
        // D 80 / Dv 96: the 96 instantiation, and the SIMT f16/bf16 forward (split-KV) below 128
        config(1, 1, 1030, 4, 1, 80, 96),
        config(1, 0, 0, 2, 2, 32, 32)
            .varlen(&[1, 2, 0], &[1030, 5, 600])
            .alibi(),
    ]
}

fn forward_case<E: CudaElement>(dev: &Device, n: usize, c: &Config) {
    let x = draw::<E>(c, 500 + n as u64);
    let inputs = x.inputs(c);
    let want = attention::forward(&c.params, c.shape(), &inputs).unwrap();
    let got = gpu::forward_host(dev, &c.params, c.shape(), &inputs).unwrap();
    let what = format!("{} config {n} {c:?}", E::DTYPE);
    assert_close(
        &format!("o {what}"),
        &to_f64(&got.o),
        &to_f64(&want.o),
        tol::<E>(false),
    );
    assert_close(
        &format!("lse {what}"),
        &acc_f64(&got.lse),
        &acc_f64(&want.lse),
        tol::<E>(false),
    );
}

#[test]
fn cuda_forward_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_forward_matches_cpu") else {
        return;
    };
    for (n, c) in configs().iter().enumerate() {
        forward_case::<f32>(&dev, n, c);
        forward_case::<f64>(&dev, n, c);
        forward_case::<f16>(&dev, n, c);
        forward_case::<bf16>(&dev, n, c);
    }
}

#[test]
fn cuda_split_kv_equals_the_query_tile_path() {
    let Some(dev) = common::device_or_skip("cuda_split_kv_equals_the_query_tile_path") else {
        return;
    };
    let p = AttentionParams::new;
    for (n, c) in [
        config(1, 3, 1300, 4, 2, 64, 64).with(p().causal(true)),
        config(2, 20, 700, 2, 1, 32, 48).with(p().window_left(100).window_right(3)),
        config(1, 1, 40, 2, 2, 16, 16), // one chunk
    ]
    .iter()
    .enumerate()
    {
        let x = draw::<f32>(c, 900 + n as u64);
        let inputs = x.inputs(c);
        let run = |split| {
            let params = c.params.split_kv(split);
            gpu::forward_host(&dev, &params, c.shape(), &inputs).unwrap()
        };
        let (split, tiles) = (run(SplitKv::Always), run(SplitKv::Never));
        let what = format!("config {n} {c:?}");
        assert_close(
            &format!("o {what}"),
            &to_f64(&split.o),
            &to_f64(&tiles.o),
            tol::<f32>(false),
        );
        assert_close(
            &format!("lse {what}"),
            &acc_f64(&split.lse),
            &acc_f64(&tiles.lse),
            tol::<f32>(false),
        );
    }
}

fn backward_case<E: CudaElement>(dev: &Device, n: usize, c: &Config) {
    let x = draw::<E>(c, 700 + n as u64);
    let inputs = x.inputs(c);
    let AttentionOut { o, lse, .. } = attention::forward(&c.params, c.shape(), &inputs).unwrap();
    let want = attention::backward(&c.params, c.shape(), &inputs, &o, &x.d_o, &lse).unwrap();
    let got = gpu::backward_host(dev, &c.params, c.shape(), &inputs, &o, &x.d_o, &lse).unwrap();
    let what = format!("{} config {n} {c:?}", E::DTYPE);
    for (name, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        assert_close(
            &format!("{name} {what}"),
            &to_f64(g),
            &to_f64(w),
            tol::<E>(true),
        );
    }
}

#[test]
fn cuda_backward_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_backward_matches_cpu") else {
        return;
    };
    for (n, c) in configs().iter().enumerate() {
        backward_case::<f32>(&dev, n, c);
        backward_case::<f64>(&dev, n, c);
        backward_case::<f16>(&dev, n, c);
        backward_case::<bf16>(&dev, n, c);
    }
}

#[test]
fn cuda_backward_bits_repeat() {
    let Some(dev) = common::device_or_skip("cuda_backward_bits_repeat") else {
        return;
    };
    let c = config(1, 70, 131, 4, 1, 64, 64).with(AttentionParams::new().causal(true));
    let x = draw::<f32>(&c, 3);
    let inputs = x.inputs(&c);
    let out = gpu::forward_host(&dev, &c.params, c.shape(), &inputs).unwrap();
    let run = || {
        gpu::backward_host(
            &dev,
            &c.params,
            c.shape(),
            &inputs,
            &out.o,
            &x.d_o,
            &out.lse,
        )
    };
    let (a, b) = (run().unwrap(), run().unwrap());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.dq), bits(&b.dq));
    assert_eq!(bits(&a.dk), bits(&b.dk));
    assert_eq!(bits(&a.dv), bits(&b.dv));
}

fn top_keys_case<E: CudaElement>(dev: &Device, n: usize, c: &Config, top: usize) {
    let x = draw::<E>(c, 300 + n as u64);
    let inputs = AttentionInputs {
        v: &[],
        ..x.inputs(c)
    };
    let want = attention::top_keys(&c.params, c.shape(), &inputs, top).unwrap();
    let got = gpu::top_keys_host(dev, &c.params, c.shape(), &inputs, top).unwrap();
    let what = format!("{} config {n} top {top} {c:?}", E::DTYPE);
    let (gw, ww) = (acc_f64(&got.weights), acc_f64(&want.weights));
    let (rtol, atol) = tol::<E>(false);
    assert_close(&format!("weights {what}"), &gw, &ww, (rtol, atol));
    for (slot, (gi, wi)) in got.indices.iter().zip(&want.indices).enumerate() {
        // the same key, or a near tie of weights that rounding may order either way
        assert!(
            gi == wi || (*gi >= 0 && *wi >= 0 && (gw[slot] - ww[slot]).abs() <= 4.0 * atol),
            "indices {what}[{slot}]: gpu {gi}, cpu {wi}"
        );
    }
}

#[test]
fn cuda_top_keys_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_top_keys_matches_cpu") else {
        return;
    };
    for (n, c) in configs().iter().enumerate() {
        for top in [1, 5, 40, 128] {
            top_keys_case::<f32>(&dev, n, c, top);
        }
        top_keys_case::<f64>(&dev, n, c, 7);
        top_keys_case::<f16>(&dev, n, c, 5);
        top_keys_case::<bf16>(&dev, n, c, 3);
    }
}

#[test]
fn cuda_top_keys_keep_the_lower_key_on_ties() {
    let Some(dev) = common::device_or_skip("cuda_top_keys_keep_the_lower_key_on_ties") else {
        return;
    };
    // every key equal: every score ties, so the first `top` keys in order win
    let c = config(1, 3, 50, 1, 1, 32, 0);
    let q = vec![0.25f32; 3 * 32];
    let k = vec![0.5f32; 50 * 32];
    let inputs = AttentionInputs::new(&q, &k, &[]);
    let keys = gpu::top_keys_host(&dev, &c.params, c.shape(), &inputs, 60).unwrap();
    let (w, i) = (keys.weights, keys.indices);
    for row in 0..3 {
        for t in 0..60 {
            let (wt, it) = (w[row * 60 + t], i[row * 60 + t]);
            if t < 50 {
                assert_eq!(it, t as i32, "row {row} slot {t}");
                assert!((wt - 1.0 / 50.0).abs() < 1e-6, "row {row} slot {t}: {wt}");
            } else {
                assert_eq!((wt, it), (0.0, -1), "row {row} padding slot {t}");
            }
        }
    }
}

#[test]
fn cuda_empty_rows_give_zeros_and_neg_inf() {
    let Some(dev) = common::device_or_skip("cuda_empty_rows_give_zeros_and_neg_inf") else {
        return;
    };
    // Sq > Sk with causal: the first Sq - Sk rows see no key
    let c = config(1, 6, 2, 1, 1, 32, 32).with(AttentionParams::new().causal(true));
    let x = draw::<f32>(&c, 11);
    let out = gpu::forward_host(&dev, &c.params, c.shape(), &x.inputs(&c)).unwrap();
    let (o, lse) = (out.o, out.lse);
    for i in 0..4 {
        assert_eq!(lse[i], f32::NEG_INFINITY, "row {i}");
        assert!(o[i * 32..(i + 1) * 32].iter().all(|&v| v == 0.0), "row {i}");
    }
    assert!(lse[4].is_finite() && lse[5].is_finite());
}

#[test]
fn cuda_limits_are_unsupported() {
    let Some(dev) = common::device_or_skip("cuda_limits_are_unsupported") else {
        return;
    };
    let c = config(1, 2, 3, 1, 1, 257, 16);
    let x = draw::<f32>(&c, 1);
    let r = gpu::forward_host(&dev, &c.params, c.shape(), &x.inputs(&c));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let c = config(1, 2, 3, 1, 1, 16, 300);
    let x = draw::<f32>(&c, 1);
    let r = gpu::forward_host(&dev, &c.params, c.shape(), &x.inputs(&c));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let c = config(1, 2, 300, 1, 1, 16, 16);
    let x = draw::<f32>(&c, 1);
    let r = gpu::top_keys_host(&dev, &c.params, c.shape(), &x.inputs(&c), 129);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

fn err_names<T: std::fmt::Debug>(result: Result<T, Error>, tensor: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(tensor), "{e} does not name {tensor}"),
        Ok(v) => panic!("expected an error naming {tensor}, got {v:?}"),
    }
}

#[test]
fn cuda_bad_buffers_are_errors_naming_the_tensor() {
    let Some(dev) = common::device_or_skip("cuda_bad_buffers_are_errors_naming_the_tensor") else {
        return;
    };
    let c = config(2, 5, 7, 2, 1, 16, 16);
    let shape = c.shape();
    let x = draw::<f32>(&c, 2);
    let s = dev.stream();
    let (q, k, v) = (
        s.clone_htod(&x.q).unwrap(),
        s.clone_htod(&x.k).unwrap(),
        s.clone_htod(&x.v).unwrap(),
    );
    let (qv, kv, vv) = (
        q.slice(0..q.len()),
        k.slice(0..k.len()),
        v.slice(0..v.len()),
    );
    let short = q.slice(0..q.len() - 1);
    let views = |q| AttentionViews {
        q,
        k: &kv,
        v: Some(&vv),
        alibi_slopes: None,
        bias: None,
        cu_seqlens: None,
    };
    let p = AttentionParams::new();
    let mut o = s.alloc_zeros::<f32>(2 * 5 * 2 * 16).unwrap();
    let mut lse = s.alloc_zeros::<f32>(2 * 2 * 5).unwrap();
    let mut bad_o = s.alloc_zeros::<f32>(7).unwrap();
    err_names(
        gpu::forward(&dev, s, &p, shape, &views(&short), &mut o, &mut lse),
        "q",
    );
    err_names(
        gpu::forward(&dev, s, &p, shape, &views(&qv), &mut bad_o, &mut lse),
        "o",
    );
    let no_v = AttentionViews {
        v: None,
        ..views(&qv)
    };
    err_names(
        gpu::forward(&dev, s, &p, shape, &no_v, &mut o, &mut lse),
        "v",
    );
    let bad_cu = AttentionViews {
        cu_seqlens: Some(CuSeqlens {
            q: &[0, 3, 2],
            k: &[0, 3, 7],
        }),
        ..views(&qv)
    };
    let packed = AttentionShape::new(1, 10, 14, 2, 1, 16, 16);
    err_names(
        gpu::forward(&dev, s, &p, packed, &bad_cu, &mut o, &mut lse),
        "cu_seqlens_q",
    );
    let mut w = s.alloc_zeros::<f32>(2 * 2 * 5 * 3).unwrap();
    let mut idx = s.alloc_zeros::<i32>(5).unwrap();
    err_names(
        gpu::top_keys(&dev, s, &p, shape, &views(&qv), 3, &mut w, &mut idx),
        "indices",
    );
    // the kernels ran nowhere: the good call still works afterwards
    gpu::forward(&dev, s, &p, shape, &views(&qv), &mut o, &mut lse).unwrap();
    let want = attention::forward(&p, shape, &x.inputs(&c)).unwrap();
    assert_close(
        "o after the rejected calls",
        &to_f64(&s.clone_dtoh(&o).unwrap()),
        &to_f64(&want.o),
        tol::<f32>(false),
    );
}
