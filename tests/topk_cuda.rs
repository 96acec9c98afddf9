//! The sparse top-k family on the GPU against the CPU (skipped without a device):
//! topk.rows, sae.encode and sae.decode in f32, f16 and bf16, NaN and tie rules, the
//! kernels' limits and f64 as `Unsupported`.

#![cfg(feature = "cuda")]

mod common;

use common::{Rng, to_f64};
use half::{bf16, f16};
use neurokernels::cuda::{CudaElement, Device};
use neurokernels::topk::{self, EncoderInputs, RowsParams, SaeShape};
use neurokernels::{Element, Error};

fn device_or_skip(test: &str) -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            common::say_skipped(&format!("{test}: {e}"));
            None
        }
    }
}

/// Same rows of (value, index) pairs, value by value within `tol` and index by index where
/// the values are not near-ties.
fn same_selection<E: Element>(
    what: &str,
    got: &(Vec<E>, Vec<i32>),
    want: &(Vec<E>, Vec<i32>),
    tol: f64,
) {
    assert_eq!(got.1.len(), want.1.len(), "{what}");
    let (gv, wv) = (to_f64(&got.0), to_f64(&want.0));
    for j in 0..gv.len() {
        let (g, w) = (gv[j], wv[j]);
        assert!(
            (g.is_nan() && w.is_nan()) || (g - w).abs() <= tol * (1.0 + w.abs()),
            "{what}: slot {j}: {g} vs {w}"
        );
    }
}

fn rows_case<E: CudaElement>(dev: &Device, r: usize, n: usize, k: usize, largest: bool) {
    let mut rng = Rng::new((r * n + k) as u64);
    let mut x: Vec<E> = rng.vec(r * n, -2.0, 2.0);
    if n > 10 {
        x[3] = E::from_f64(f64::NAN);
        x[7] = x[5]; // a tie
    }
    let p = RowsParams::new(k).largest(largest);
    let want = topk::rows(r, n, &x, p).unwrap();
    let got = topk::cuda::rows_host(dev, r, n, &x, p).unwrap();
    // exact: the same order keys decide on both
    assert_eq!(
        got.1,
        want.1,
        "{:?} rows {r}x{n} k{k} largest {largest}",
        E::DTYPE
    );
    same_selection("rows", &got, &want, 0.0);
}

#[test]
fn cuda_rows_matches_cpu() {
    let Some(dev) = device_or_skip("cuda_rows_matches_cpu") else {
        return;
    };
    for &(r, n, k) in &[
        (1, 1, 1),
        (3, 37, 5),
        (5, 1000, 64),
        (2, 70_000, 512),
        (64, 4099, 32),
    ] {
        for largest in [true, false] {
            rows_case::<f32>(&dev, r, n, k, largest);
            rows_case::<f16>(&dev, r, n, k, largest);
            rows_case::<bf16>(&dev, r, n, k, largest);
        }
    }
}

fn encode_case<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize, k: usize, bias: f64) {
    let mut rng = Rng::new((b * l + dm) as u64);
    let scale = 1.0 / (dm as f64).sqrt();
    let x: Vec<E> = rng.vec(b * dm, -1.5, 1.5);
    let w: Vec<E> = rng.vec(l * dm, -1.7 * scale, 1.7 * scale);
    let be: Vec<E> = rng.vec(l, bias - 0.1, bias + 0.1);
    let bd: Vec<E> = rng.vec(dm, -0.1, 0.1);
    let s = SaeShape::new(b, dm, l);
    let inputs = EncoderInputs {
        x: &x,
        w_enc: &w,
        b_enc: &be,
        b_dec: Some(&bd),
    };
    let want = topk::encode(s, inputs, k).unwrap();
    let got = topk::cuda::encode_host(dev, s, inputs, k).unwrap();
    let tol = if E::DTYPE == neurokernels::DType::F32 {
        1e-4
    } else {
        2e-2
    };
    same_selection(
        &format!("{:?} encode {b}x{dm}x{l} k{k}", E::DTYPE),
        &got,
        &want,
        tol,
    );
}

#[test]
fn cuda_encode_matches_cpu() {
    let Some(dev) = device_or_skip("cuda_encode_matches_cpu") else {
        return;
    };
    for &(b, dm, l, k) in &[
        (1, 8, 20, 1),
        (3, 16, 37, 37),
        (9, 64, 1031, 16),
        (17, 1024, 700, 256),
    ] {
        for bias in [0.0, -2.0] {
            encode_case::<f32>(&dev, b, dm, l, k, bias);
            encode_case::<bf16>(&dev, b, dm, l, k, bias);
            encode_case::<f16>(&dev, b, dm, l, k, bias);
        }
    }
}

#[test]
fn cuda_decode_matches_cpu() {
    let Some(dev) = device_or_skip("cuda_decode_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device) {
        let (b, dm, l, k) = (13, 77, 50, 6);
        let mut rng = Rng::new(3);
        let w: Vec<E> = rng.vec(l * dm, -1.0, 1.0);
        let v: Vec<E> = rng.vec(b * k, 0.0, 2.0);
        let bd: Vec<E> = rng.vec(dm, -0.1, 0.1);
        let idx: Vec<i32> = (0..b * k).map(|j| ((j * 7) % l) as i32).collect();
        let s = SaeShape::new(b, dm, l);
        let want = topk::decode(s, k, &idx, &v, &w, Some(&bd)).unwrap();
        let got = topk::cuda::decode_host(dev, s, k, &idx, &v, &w, Some(&bd)).unwrap();
        let r = common::worst_ratio(&to_f64(&got), &to_f64(&want), 1e-3, 1e-3);
        assert!(r <= 1.0, "{:?}: {r}", E::DTYPE);
        let bad = vec![l as i32; b * k];
        let e = topk::cuda::decode_host(dev, s, k, &bad, &v, &w, None).unwrap_err();
        assert!(e.to_string().contains("indices"));
    }
    run::<f32>(&dev);
    run::<bf16>(&dev);
}

#[test]
fn cuda_limits_are_errors() {
    let Some(dev) = device_or_skip("cuda_limits_are_errors") else {
        return;
    };
    let s = SaeShape::new(2, 8, 300);
    let (x, w, b) = (vec![0.5f32; 16], vec![0.1f32; 2400], vec![0.0f32; 300]);
    let inputs = EncoderInputs {
        x: &x,
        w_enc: &w,
        b_enc: &b,
        b_dec: None,
    };
    assert!(matches!(
        topk::cuda::encode_host(&dev, s, inputs, 257),
        Err(Error::Unsupported(_))
    ));
    let xd = vec![0.5f64; 40];
    let e = topk::cuda::rows_host(&dev, 2, 20, &xd, RowsParams::new(3)).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let e = topk::cuda::rows_host(&dev, 2, 20, &x, RowsParams::new(3)).unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
}
