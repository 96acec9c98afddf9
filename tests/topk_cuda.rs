//! The sparse top-k family on the GPU against the CPU (skipped without a device): every op
//! (topk.rows, the five encoders, decode, backward) in f32, f16 and bf16, NaN and tie
//! rules, the kernels' limits and f64 as `Unsupported`.

#![cfg(feature = "cuda")]

mod common;

use common::{Rng, to_f64};
use half::{bf16, f16};
use neurokernels::cuda::{CudaElement, Device};
use neurokernels::topk::{
    self, BackwardInputs, Csr, EncoderInputs, Metric, RowsParams, RowsShape, SaeShape, TopK,
};
use neurokernels::{Element, Error};

/// A CPU (or `rows_host`) selection as the (values, indices) pair the other host calls return.
fn pair<E>(t: TopK<E>) -> (Vec<E>, Vec<i32>) {
    (t.values, t.indices)
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
    let (p, shape) = (RowsParams::new().largest(largest), RowsShape::new(r, n));
    let want = pair(topk::rows(&p, shape, k, &x).unwrap());
    let got = pair(topk::cuda::rows_host(dev, &p, shape, k, &x).unwrap());
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
    let Some(dev) = common::device_or_skip("cuda_rows_matches_cpu") else {
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
    let want = pair(topk::encode(s, k, &inputs).unwrap());
    let got = pair(topk::cuda::encode_host(dev, s, k, &inputs).unwrap());
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
    let Some(dev) = common::device_or_skip("cuda_encode_matches_cpu") else {
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
    let Some(dev) = common::device_or_skip("cuda_decode_matches_cpu") else {
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
    let Some(dev) = common::device_or_skip("cuda_limits_are_errors") else {
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
        topk::cuda::encode_host(&dev, s, 257, &inputs),
        Err(Error::Unsupported(_))
    ));
    let xd = vec![0.5f64; 40];
    let e =
        topk::cuda::rows_host(&dev, &RowsParams::new(), RowsShape::new(2, 20), 3, &xd).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let e =
        topk::cuda::rows_host(&dev, &RowsParams::new(), RowsShape::new(2, 20), 3, &x).unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
}

fn tolerance<E: CudaElement>() -> f64 {
    if E::DTYPE == neurokernels::DType::F32 {
        1e-4
    } else {
        2e-2
    }
}

/// An encoder's random inputs: x, w, b_enc around `bias`, b_dec.
struct Sae<E> {
    x: Vec<E>,
    w: Vec<E>,
    b_enc: Vec<E>,
    b_dec: Vec<E>,
}

impl<E: CudaElement> Sae<E> {
    fn new(b: usize, dm: usize, l: usize, bias: f64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let scale = 1.0 / (dm as f64).sqrt();
        Sae {
            x: rng.vec(b * dm, -1.5, 1.5),
            w: rng.vec(l * dm, -1.7 * scale, 1.7 * scale),
            b_enc: rng.vec(l, bias - 0.1, bias + 0.1),
            b_dec: rng.vec(dm, -0.1, 0.1),
        }
    }
    fn inputs(&self) -> EncoderInputs<'_, E> {
        EncoderInputs {
            x: &self.x,
            w_enc: &self.w,
            b_enc: &self.b_enc,
            b_dec: Some(&self.b_dec),
        }
    }
}

/// The same CSR. f32 (the device scores follow the CPU's order of operations): row pointers
/// and indices exactly, values within `tol`. f16/bf16 (tensor-core sums differ from the
/// CPU's in rounding): per row the same latents with values within `tol`, except entries
/// `near_cut(latent, value)` says sit at the selection's boundary, which may fall either way.
fn same_csr<E: Element>(
    what: &str,
    got: &Csr<E>,
    want: &Csr<E>,
    tol: f64,
    near_cut: impl Fn(usize, f64) -> bool,
) {
    let close = |g: f64, w: f64| (g - w).abs() <= tol * (1.0 + w.abs());
    if E::DTYPE == neurokernels::DType::F32 {
        assert_eq!(got.indptr, want.indptr, "{what}: indptr");
        assert_eq!(got.indices, want.indices, "{what}: indices");
        let (gv, wv) = (to_f64(&got.values), to_f64(&want.values));
        for (j, (g, w)) in gv.iter().zip(&wv).enumerate() {
            assert!(close(*g, *w), "{what}: entry {j}: {g} vs {w}");
        }
        return;
    }
    assert_eq!(got.indptr.len(), want.indptr.len(), "{what}: rows");
    let row = |c: &Csr<E>, b: usize| -> std::collections::BTreeMap<usize, f64> {
        let (lo, hi) = (c.indptr[b] as usize, c.indptr[b + 1] as usize);
        (lo..hi)
            .map(|p| (c.indices[p] as usize, c.values[p].to_f64()))
            .collect()
    };
    for b in 0..want.indptr.len() - 1 {
        let (g, w) = (row(got, b), row(want, b));
        for (l, wv) in &w {
            match g.get(l) {
                Some(gv) => assert!(close(*gv, *wv), "{what}: row {b} latent {l}: {gv} vs {wv}"),
                None => assert!(near_cut(*l, *wv), "{what}: row {b} lacks latent {l} ({wv})"),
            }
        }
        for (l, gv) in &g {
            if !w.contains_key(l) {
                assert!(
                    near_cut(*l, *gv),
                    "{what}: row {b} has extra latent {l} ({gv})"
                );
            }
        }
    }
}

#[test]
fn cuda_nearest_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_nearest_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize, k: usize) {
        let sae = Sae::<E>::new(b, dm, l, 0.0, (b + dm + l) as u64);
        let s = SaeShape::new(b, dm, l);
        for metric in [Metric::Dot, Metric::Cosine, Metric::L2] {
            let want = pair(topk::nearest(metric, s, k, &sae.x, &sae.w).unwrap());
            let got = pair(topk::cuda::nearest_host(dev, metric, s, k, &sae.x, &sae.w).unwrap());
            let what = format!("{:?} nearest {metric:?} {b}x{dm}x{l} k{k}", E::DTYPE);
            same_selection(&what, &got, &want, tolerance::<E>());
        }
    }
    // one latent range; several ranges merged (few rows); a row tile boundary
    for &(b, dm, l, k) in &[(37, 70, 300, 5), (3, 33, 5000, 17), (33, 8, 64, 64)] {
        run::<f32>(&dev, b, dm, l, k);
        run::<bf16>(&dev, b, dm, l, k);
        run::<f16>(&dev, b, dm, l, k);
    }
}

#[test]
fn cuda_jumprelu_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_jumprelu_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize) {
        let sae = Sae::<E>::new(b, dm, l, 0.0, 11);
        let mut rng = Rng::new(12);
        // some negative thresholds: negative pre-activations may be kept too
        let theta: Vec<E> = rng.vec(l, -0.2, 0.8);
        let s = SaeShape::new(b, dm, l);
        let want = topk::encode_jumprelu(s, &sae.inputs(), &theta).unwrap();
        let got = topk::cuda::encode_jumprelu_host(dev, s, &sae.inputs(), &theta).unwrap();
        let what = format!("{:?} jumprelu {b}x{dm}x{l}", E::DTYPE);
        let tol = tolerance::<E>();
        let near = |latent: usize, v: f64| {
            let t = theta[latent].to_f64();
            (v - t).abs() <= tol * (1.0 + t.abs())
        };
        same_csr(&what, &got, &want, tol, near);
    }
    for &(b, dm, l) in &[(1, 16, 40), (45, 96, 1500), (3, 20, 9000)] {
        run::<f32>(&dev, b, dm, l);
        run::<bf16>(&dev, b, dm, l);
    }
}

#[test]
fn cuda_batch_topk_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_batch_topk_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize, k: usize, skew: bool) {
        let mut sae = Sae::<E>::new(b, dm, l, 0.0, 21);
        if skew {
            // row 0 far above the rest: it holds most of the batch's B·k winners, more
            // than its first 2k list, so the exact path needs the above pass
            for v in &mut sae.x[..dm] {
                *v = E::from_f64(v.to_f64() * 8.0);
            }
        }
        let s = SaeShape::new(b, dm, l);
        let want = topk::encode_batch_topk(s, k, &sae.inputs()).unwrap();
        let got = topk::cuda::encode_batch_topk_host(dev, s, k, &sae.inputs()).unwrap();
        let what = format!("{:?} batch_topk {b}x{dm}x{l} k{k} skew {skew}", E::DTYPE);
        // the batch threshold: the smallest kept value
        let cut = to_f64(&want.values)
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let tol = tolerance::<E>();
        same_csr(&what, &got, &want, tol, |_, v| {
            (v - cut).abs() <= tol * (1.0 + cut.abs())
        });
    }
    for skew in [false, true] {
        run::<f32>(&dev, 24, 48, 700, 8, skew);
        run::<bf16>(&dev, 24, 48, 700, 8, skew);
        run::<f32>(&dev, 5, 16, 90, 30, skew);
    }
}

#[test]
fn cuda_mp_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_mp_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize, k: usize)
    where
        E::Acc: Element<Acc = E::Acc>,
    {
        let mut rng = Rng::new(31);
        let x: Vec<E> = rng.vec(b * dm, -1.0, 1.0);
        let bd: Vec<E> = rng.vec(dm, -0.1, 0.1);
        // unit-norm atoms
        let raw: Vec<f64> = (0..l * dm).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut atoms = Vec::with_capacity(l * dm);
        for row in raw.chunks(dm) {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            atoms.extend(row.iter().map(|v| E::from_f64(v / n)));
        }
        let s = SaeShape::new(b, dm, l);
        let want = topk::encode_mp(s, k, &x, &atoms, Some(&bd)).unwrap();
        let got = topk::cuda::encode_mp_host(dev, s, k, &x, &atoms, Some(&bd)).unwrap();
        let what = format!("{:?} mp {b}x{dm}x{l} k{k}", E::DTYPE);
        assert_eq!(got.indices, want.indices, "{what}: indices");
        let tol = tolerance::<E>();
        let r = common::worst_ratio(&to_f64(&got.values), &to_f64(&want.values), tol, tol);
        assert!(r <= 1.0, "{what}: values {r}");
        let r = common::worst_ratio(&to_f64(&got.residual), &to_f64(&want.residual), tol, tol);
        assert!(r <= 1.0, "{what}: residual {r}");
    }
    for &(b, dm, l, k) in &[(9, 40, 200, 6), (2, 64, 3000, 3), (40, 17, 50, 50)] {
        run::<f32>(&dev, b, dm, l, k);
        run::<bf16>(&dev, b, dm, l, k);
    }
}

#[test]
fn cuda_backward_matches_cpu() {
    let Some(dev) = common::device_or_skip("cuda_backward_matches_cpu") else {
        return;
    };
    fn run<E: CudaElement>(dev: &Device, b: usize, dm: usize, l: usize, k: usize) {
        let sae = Sae::<E>::new(b, dm, l, 0.0, 41);
        let mut rng = Rng::new(42);
        let w_dec: Vec<E> = rng.vec(l * dm, -0.5, 0.5);
        let d_xhat: Vec<E> = rng.vec(b * dm, -1.0, 1.0);
        // repeated latents across rows, and a few zero values (masked by the ReLU)
        let indices: Vec<i32> = (0..b * k).map(|j| ((j * 13 + j / k) % l) as i32).collect();
        let values: Vec<E> = (0..b * k)
            .map(|j| {
                E::from_f64(if j % 5 == 0 {
                    0.0
                } else {
                    rng.uniform(0.1, 2.0)
                })
            })
            .collect();
        let s = SaeShape::new(b, dm, l);
        let inputs = BackwardInputs {
            x: &sae.x,
            w_enc: &sae.w,
            b_enc: &sae.b_enc,
            b_dec: Some(&sae.b_dec),
            w_dec: &w_dec,
            indices: &indices,
            values: &values,
            d_xhat: &d_xhat,
        };
        let want = topk::backward(s, k, &inputs).unwrap();
        let got = topk::cuda::backward_host(dev, s, k, &inputs).unwrap();
        let tol = 10.0 * tolerance::<E>();
        for (name, g, w) in [
            ("dw_dec", &got.dw_dec, &want.dw_dec),
            ("db_dec", &got.db_dec, &want.db_dec),
            ("dw_enc", &got.dw_enc, &want.dw_enc),
            ("db_enc", &got.db_enc, &want.db_enc),
            ("dx", &got.dx, &want.dx),
        ] {
            let r = common::worst_ratio(&to_f64(g), &to_f64(w), tol, tol);
            assert!(r <= 1.0, "{:?} backward {name}: {r}", E::DTYPE);
        }
    }
    for &(b, dm, l, k) in &[(7, 30, 20, 4), (64, 129, 1000, 16), (1, 8, 3, 3)] {
        run::<f32>(&dev, b, dm, l, k);
        run::<bf16>(&dev, b, dm, l, k);
        run::<f16>(&dev, b, dm, l, k);
    }
}

#[test]
fn cuda_new_ops_reject_what_the_cpu_rejects() {
    let Some(dev) = common::device_or_skip("cuda_new_ops_reject_what_the_cpu_rejects") else {
        return;
    };
    let s = SaeShape::new(2, 8, 300);
    let sae = Sae::<f32>::new(2, 8, 300, 0.0, 51);
    let e = topk::cuda::nearest_host(&dev, Metric::Dot, s, 257, &sae.x, &sae.w).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let e = topk::cuda::nearest_host(&dev, Metric::Dot, s, 3, &sae.x[1..], &sae.w).unwrap_err();
    assert!(e.to_string().contains("x"), "{e}");
    let nan = vec![f32::NAN; 300];
    let e = topk::cuda::encode_jumprelu_host(&dev, s, &sae.inputs(), &nan).unwrap_err();
    assert!(e.to_string().contains("threshold"), "{e}");
    let e = topk::cuda::encode_batch_topk_host(&dev, s, 0, &sae.inputs()).unwrap_err();
    assert!(e.to_string().contains("k"), "{e}");
    let e = topk::cuda::encode_mp_host(&dev, s, 301, &sae.x, &sae.w, None).unwrap_err();
    assert!(e.to_string().contains("k"), "{e}");
    let xd: Vec<f64> = vec![0.5; 16];
    let wd: Vec<f64> = vec![0.1; 2400];
    let e = topk::cuda::encode_mp_host(&dev, s, 2, &xd, &wd, None).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}
