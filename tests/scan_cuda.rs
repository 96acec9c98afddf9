//! scan.linear on CUDA against the CPU path (itself checked against float64), for every
//! dtype, both directions, with and without h0, with shapes that take the single-chunk and
//! the chunked (summary + carry + apply) plans; plus bad device input. Without a GPU each
//! test prints SKIPPED and returns.
#![cfg(feature = "cuda")]

mod common;

use common::{Rng, complex_gates, to_f64, worst_ratio};
use half::{bf16, f16};
use neurokernels::cuda::{CudaElement, Device};
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::{DType, Element};

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 17, 13),
    (2, 333, 37),
    (4, 64, 130),
    // few blocks, long sequence: cut into time chunks
    (1, 100_003, 16),
    (2, 50_000, 33),
    // many blocks: one chunk
    (8, 2048, 1024),
];

fn tolerance<E: Element>() -> (f64, f64) {
    match E::DTYPE {
        DType::F64 => (1e-9, 1e-11),
        DType::F32 => (2e-4, 2e-5),
        _ => (2e-2, 2e-2),
    }
}

fn check<E: CudaElement>(device: &Device, seed: u64) {
    let (rtol, atol) = tolerance::<E>();
    for (k, &(bsz, t, d)) in SHAPES.iter().enumerate() {
        let n = bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let mut rng = Rng::new(seed + k as u64);
        let a: Vec<E> = rng.vec(n, 0.5, 1.0);
        let b: Vec<E> = rng.vec(n, -1.0, 1.0);
        let h0: Vec<E> = rng.vec(bsz * d, -1.0, 1.0);
        let dh: Vec<E> = rng.vec(n, -1.0, 1.0);
        for reverse in [false, true] {
            for with_h0 in [false, true] {
                let what = format!("{} {shape} reverse={reverse} h0={with_h0}", E::DTYPE);
                let p = ScanParams::new().reverse(reverse);
                let h0_opt = with_h0.then_some(h0.as_slice());
                let want = scan::linear(&p, shape, &a, &b, h0_opt).unwrap();
                let got = scan::cuda::linear_host(device, &p, shape, &a, &b, h0_opt).unwrap();
                let r = worst_ratio(&to_f64(&got), &to_f64(&want), rtol, atol);
                assert!(r <= 1.0, "cuda forward {what}: {r} x tolerance");

                let want = scan::linear_backward(&p, shape, &a, &want, &dh, h0_opt).unwrap();
                let got =
                    scan::cuda::linear_backward_host(device, &p, shape, &a, &got, &dh, h0_opt)
                        .unwrap();
                for (name, g, w) in [
                    ("da", &got.da, &want.da),
                    ("db", &got.db, &want.db),
                    ("dh0", &got.dh0, &want.dh0),
                ] {
                    let r = worst_ratio(&to_f64(g), &to_f64(w), rtol, atol);
                    assert!(r <= 1.0, "cuda backward {name} {what}: {r} x tolerance");
                }
            }
        }
    }
}

/// The complex scan on the GPU against the CPU, single-pass and chunked shapes.
fn check_complex<E: CudaElement>(device: &Device, seed: u64) {
    let (rtol, atol) = tolerance::<E>();
    for (k, &(bsz, t, d)) in [(3, 17, 13), (2, 333, 37), (1, 100_003, 16), (8, 2048, 1024)]
        .iter()
        .enumerate()
    {
        let n = 2 * bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let mut rng = Rng::new(seed + k as u64);
        let a: Vec<E> = complex_gates(&mut rng, n / 2, 0.5, 1.0);
        let b: Vec<E> = rng.vec(n, -1.0, 1.0);
        let h0: Vec<E> = rng.vec(2 * bsz * d, -1.0, 1.0);
        let dh: Vec<E> = rng.vec(n, -1.0, 1.0);
        for reverse in [false, true] {
            for h0_opt in [None, Some(h0.as_slice())] {
                let what = format!(
                    "complex {} {shape} reverse={reverse} h0={}",
                    E::DTYPE,
                    h0_opt.is_some()
                );
                let p = ScanParams::new().reverse(reverse);
                let want = scan::linear_complex(&p, shape, &a, &b, h0_opt).unwrap();
                let got =
                    scan::cuda::linear_complex_host(device, &p, shape, &a, &b, h0_opt).unwrap();
                let r = worst_ratio(&to_f64(&got), &to_f64(&want), rtol, atol);
                assert!(r <= 1.0, "cuda forward {what}: {r} x tolerance");
                let want =
                    scan::linear_complex_backward(&p, shape, &a, &want, &dh, h0_opt).unwrap();
                let got = scan::cuda::linear_complex_backward_host(
                    device, &p, shape, &a, &got, &dh, h0_opt,
                )
                .unwrap();
                for (name, g, w) in [
                    ("da", &got.da, &want.da),
                    ("db", &got.db, &want.db),
                    ("dh0", &got.dh0, &want.dh0),
                ] {
                    let r = worst_ratio(&to_f64(g), &to_f64(w), rtol, atol);
                    assert!(r <= 1.0, "cuda backward {name} {what}: {r} x tolerance");
                }
            }
        }
    }
}

#[test]
fn cuda_complex_matches_cpu_every_dtype() {
    if let Some(dev) = common::device_or_skip("cuda_complex_matches_cpu_every_dtype") {
        check_complex::<f32>(&dev, 50);
        check_complex::<f64>(&dev, 60);
        check_complex::<f16>(&dev, 70);
        check_complex::<bf16>(&dev, 80);
    }
}

#[test]
fn cuda_matches_cpu_f32() {
    if let Some(dev) = common::device_or_skip("cuda_matches_cpu_f32") {
        check::<f32>(&dev, 10);
    }
}

#[test]
fn cuda_matches_cpu_f64() {
    if let Some(dev) = common::device_or_skip("cuda_matches_cpu_f64") {
        check::<f64>(&dev, 20);
    }
}

#[test]
fn cuda_matches_cpu_f16() {
    if let Some(dev) = common::device_or_skip("cuda_matches_cpu_f16") {
        check::<f16>(&dev, 30);
    }
}

#[test]
fn cuda_matches_cpu_bf16() {
    if let Some(dev) = common::device_or_skip("cuda_matches_cpu_bf16") {
        check::<bf16>(&dev, 40);
    }
}

#[test]
fn cuda_writes_every_output_element_and_is_deterministic() {
    let Some(dev) = common::device_or_skip("cuda_writes_every_output_element") else {
        return;
    };
    let stream = dev.stream().clone();
    let shape = ScanShape::new(2, 50_000, 33);
    let n = 2 * 50_000 * 33;
    let mut rng = Rng::new(77);
    let a: Vec<f32> = rng.vec(n, 0.5, 1.0);
    let b: Vec<f32> = rng.vec(n, -1.0, 1.0);
    let a_d = stream.clone_htod(&a).unwrap();
    let b_d = stream.clone_htod(&b).unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        // poison the output first
        let mut h_d = stream.clone_htod(&vec![f32::NAN; n]).unwrap();
        scan::cuda::linear(
            &dev,
            &stream,
            &ScanParams::new(),
            shape,
            &a_d,
            &b_d,
            None,
            &mut h_d,
        )
        .unwrap();
        let h = stream.clone_dtoh(&h_d).unwrap();
        assert!(
            h.iter().all(|x| x.is_finite()),
            "an output element was not written"
        );
        runs.push(h);
    }
    assert!(runs[0] == runs[1], "two runs differ");
}

#[test]
fn cuda_bad_input_is_an_error() {
    let Some(dev) = common::device_or_skip("cuda_bad_input_is_an_error") else {
        return;
    };
    let stream = dev.stream().clone();
    let shape = ScanShape::new(2, 3, 4);
    let p = ScanParams::new();
    let ok = stream.alloc_zeros::<f32>(24).unwrap();
    let short = stream.alloc_zeros::<f32>(23).unwrap();
    let mut out = stream.alloc_zeros::<f32>(24).unwrap();
    let mut out_short = stream.alloc_zeros::<f32>(10).unwrap();
    let h0_short = stream.alloc_zeros::<f32>(7).unwrap();
    let name = |r: neurokernels::Result<()>| r.unwrap_err().to_string();
    assert!(
        name(scan::cuda::linear(
            &dev, &stream, &p, shape, &short, &ok, None, &mut out
        ))
        .contains("`a`")
    );
    assert!(
        name(scan::cuda::linear(
            &dev, &stream, &p, shape, &ok, &short, None, &mut out
        ))
        .contains("`b`")
    );
    assert!(
        name(scan::cuda::linear(
            &dev,
            &stream,
            &p,
            shape,
            &ok,
            &ok,
            None,
            &mut out_short
        ))
        .contains("`h`")
    );
    assert!(
        name(scan::cuda::linear(
            &dev,
            &stream,
            &p,
            shape,
            &ok,
            &ok,
            Some(&h0_short.as_view()),
            &mut out
        ))
        .contains("`h0`")
    );
    // a second Device on the same GPU shares its primary context: its streams are accepted
    let other = Device::open(0).unwrap();
    let shared = other.stream().clone();
    scan::cuda::linear(&dev, &shared, &p, shape, &ok, &ok, None, &mut out).unwrap();
    // empty batch: Ok, nothing launched
    let empty = stream.alloc_zeros::<f32>(1).unwrap();
    let mut empty_out = stream.alloc_zeros::<f32>(1).unwrap();
    let e = empty.slice(0..0);
    let mut eo = empty_out.slice_mut(0..0);
    scan::cuda::linear(
        &dev,
        &stream,
        &p,
        ScanShape::new(0, 3, 4),
        &e,
        &e,
        None,
        &mut eo,
    )
    .unwrap();
}

/// The selective scan on the GPU against the CPU: every dtype, every state-size instantiation
/// (N = 1, 16, 33 and 64; f64 up to 32), all optional inputs, softplus on and off, shapes cut
/// into 3 equal time chunks, 16 chunks with a short last one, and a single step.
fn check_selective<E: CudaElement>(device: &Device, seed: u64) {
    use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
    let (rtol, atol) = tolerance::<E>();
    let states: &[usize] = if E::DTYPE == DType::F64 {
        &[1, 16, 32]
    } else {
        &[1, 16, 33, 64]
    };
    let shapes = [(2, 150, 70), (1, 1000, 5), (3, 1, 2)];
    for (i, (&n, &(bsz, t, d))) in states
        .iter()
        .flat_map(|n| shapes.iter().map(move |s| (n, s)))
        .enumerate()
    {
        let s = SelectiveShape::new(bsz, t, d, n);
        let mut rng = Rng::new(seed + i as u64);
        let seq = bsz * t * d;
        let acc = |rng: &mut Rng, len: usize, lo: f64, hi: f64| -> Vec<E::Acc> {
            rng.vec::<E>(len, lo, hi)
                .iter()
                .map(|x| x.to_acc())
                .collect()
        };
        let (u, delta, z): (Vec<E>, Vec<E>, Vec<E>) = (
            rng.vec(seq, -1.0, 1.0),
            rng.vec(seq, 0.05, 1.0),
            rng.vec(seq, -2.0, 2.0),
        );
        let a = acc(&mut rng, d * n, -2.0, -0.3);
        let (bm, cm): (Vec<E>, Vec<E>) = (
            rng.vec(bsz * t * n, -1.0, 1.0),
            rng.vec(bsz * t * n, -1.0, 1.0),
        );
        let (dskip, bias, h0) = (
            acc(&mut rng, d, -1.0, 1.0),
            acc(&mut rng, d, 0.2, 0.8),
            acc(&mut rng, bsz * d * n, -1.0, 1.0),
        );
        for all in [false, true] {
            let inputs = SelectiveInputs {
                u: &u,
                delta: &delta,
                a: &a,
                bm: &bm,
                cm: &cm,
                dskip: all.then_some(dskip.as_slice()),
                z: all.then_some(z.as_slice()),
                delta_bias: all.then_some(bias.as_slice()),
                h0: all.then_some(h0.as_slice()),
            };
            let p = SelectiveParams::new().delta_softplus(all);
            let out = selective::selective(&p, s, &inputs).unwrap();
            let (want_y, want_h) = (out.y, out.h_last);
            let got = selective::cuda::selective_host(device, &p, s, &inputs).unwrap();
            let (got_y, got_h) = (got.y, got.h_last);
            let what = format!("selective {} {s:?} optional inputs={all}", E::DTYPE);
            let r = worst_ratio(&to_f64(&got_y), &to_f64(&want_y), rtol, atol);
            assert!(r <= 1.0, "cuda y {what}: {r} x tolerance");
            let acc64 = |v: &[E::Acc]| {
                v.iter()
                    .map(|x| neurokernels::element::Accum::to_f64(*x))
                    .collect::<Vec<f64>>()
            };
            let r = worst_ratio(&acc64(&got_h), &acc64(&want_h), 2e-4, 2e-5);
            assert!(r <= 1.0, "cuda h_last {what}: {r} x tolerance");
        }
    }
}

/// The selective backward on the GPU against the CPU's: every dtype, N = 3 and 16, T across
/// several checkpoint chunks, D across two channel blocks, with and without the optional
/// inputs; run twice to check it is deterministic.
fn check_selective_backward<E: CudaElement>(device: &Device, seed: u64) {
    use neurokernels::element::Accum;
    use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
    let (rtol, atol) = tolerance::<E>();
    for (i, &n) in [3usize, 16].iter().enumerate() {
        let (b, t, d) = (2, 150, 130);
        let s = SelectiveShape::new(b, t, d, n);
        let mut rng = Rng::new(seed + i as u64);
        let seq = b * t * d;
        let acc = |rng: &mut Rng, len: usize, lo: f64, hi: f64| -> Vec<E::Acc> {
            rng.vec::<E>(len, lo, hi)
                .iter()
                .map(|x| x.to_acc())
                .collect()
        };
        let (u, delta, z, dy): (Vec<E>, Vec<E>, Vec<E>, Vec<E>) = (
            rng.vec(seq, -1.0, 1.0),
            rng.vec(seq, 0.05, 1.0),
            rng.vec(seq, -2.0, 2.0),
            rng.vec(seq, -1.0, 1.0),
        );
        let a = acc(&mut rng, d * n, -2.0, -0.3);
        let (bm, cm): (Vec<E>, Vec<E>) =
            (rng.vec(b * t * n, -1.0, 1.0), rng.vec(b * t * n, -1.0, 1.0));
        let (dskip, bias, h0) = (
            acc(&mut rng, d, -1.0, 1.0),
            acc(&mut rng, d, 0.2, 0.8),
            acc(&mut rng, b * d * n, -1.0, 1.0),
        );
        for all in [false, true] {
            let inputs = SelectiveInputs {
                u: &u,
                delta: &delta,
                a: &a,
                bm: &bm,
                cm: &cm,
                dskip: all.then_some(dskip.as_slice()),
                z: all.then_some(z.as_slice()),
                delta_bias: all.then_some(bias.as_slice()),
                h0: all.then_some(h0.as_slice()),
            };
            let p = SelectiveParams::new().delta_softplus(all);
            let want = selective::selective_backward(&p, s, &inputs, &dy).unwrap();
            let got =
                selective::cuda::selective_backward_host(device, &p, s, &inputs, &dy).unwrap();
            let again =
                selective::cuda::selective_backward_host(device, &p, s, &inputs, &dy).unwrap();
            assert!(
                got == again,
                "selective backward {} is not deterministic",
                E::DTYPE
            );
            let what = format!(
                "selective backward {} N={n} optional inputs={all}",
                E::DTYPE
            );
            let acc64 = |v: &[E::Acc]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
            // sums over batch, time or channels: looser for the half types' f32 partials
            let (srtol, satol) = if E::DTYPE == DType::F64 {
                (1e-9, 1e-9)
            } else {
                (1e-3, 1e-3)
            };
            for (name, g, w) in [
                ("du", &got.du, &want.du),
                ("ddelta", &got.ddelta, &want.ddelta),
                ("dBm", &got.dbm, &want.dbm),
                ("dCm", &got.dcm, &want.dcm),
            ] {
                let r = worst_ratio(&to_f64(g), &to_f64(w), rtol.max(srtol), atol.max(satol));
                assert!(r <= 1.0, "cuda {name} {what}: {r} x tolerance");
            }
            if all {
                let r = worst_ratio(
                    &to_f64(got.dz.as_ref().unwrap()),
                    &to_f64(want.dz.as_ref().unwrap()),
                    rtol,
                    atol,
                );
                assert!(r <= 1.0, "cuda dz {what}: {r} x tolerance");
            }
            for (name, g, w) in [
                ("dA", Some(&got.da), Some(&want.da)),
                ("dDskip", got.ddskip.as_ref(), want.ddskip.as_ref()),
                (
                    "ddelta_bias",
                    got.ddelta_bias.as_ref(),
                    want.ddelta_bias.as_ref(),
                ),
                ("dh0", got.dh0.as_ref(), want.dh0.as_ref()),
            ] {
                assert_eq!(g.is_some(), w.is_some(), "{name} {what}");
                if let (Some(g), Some(w)) = (g, w) {
                    let r = worst_ratio(&acc64(g), &acc64(w), srtol, satol);
                    assert!(r <= 1.0, "cuda {name} {what}: {r} x tolerance");
                }
            }
        }
    }
}

#[test]
fn cuda_selective_backward_matches_cpu_every_dtype() {
    if let Some(dev) = common::device_or_skip("cuda_selective_backward_matches_cpu_every_dtype") {
        check_selective_backward::<f32>(&dev, 95);
        check_selective_backward::<f64>(&dev, 96);
        check_selective_backward::<f16>(&dev, 97);
        check_selective_backward::<bf16>(&dev, 98);
    }
}

/// scan.gla on the GPU against the CPU's chunked form: every dtype (f16/bf16 take the
/// tensor-core kernel), K up to the kernel's limit and not a multiple of 16, V not a multiple of
/// the 32- or 64-column tiles and across several tiles, T not a multiple of the chunks and
/// long, h0, gates near 1, strong gates and -inf gates (the direct intra-chunk path).
fn check_gla<E: CudaElement>(device: &Device, seed: u64) {
    use neurokernels::element::Accum;
    use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
    let (rtol, atol) = tolerance::<E>();
    let max_key = if E::DTYPE == DType::F64 { 64 } else { 128 };
    for (i, &(b, t, h, kd, vd, gate_lo)) in [
        (1, 1, 1, 1, 1, -0.1),
        (2, 37, 3, 16, 40, -0.2),
        (1, 70, 2, max_key, 33, -0.05),
        (2, 29, 2, 8, 64, -9.0),
        (1, 1000, 2, 40, 130, -0.01),
    ]
    .iter()
    .enumerate()
    {
        let s = GlaShape::new(b, t, h, kd, vd);
        let mut rng = Rng::new(seed + i as u64);
        let (qk, vv) = (b * t * h * kd, b * t * h * vd);
        let (q, k, v): (Vec<E>, Vec<E>, Vec<E>) = (
            rng.vec(qk, -1.0, 1.0),
            rng.vec(qk, -1.0, 1.0),
            rng.vec(vv, -1.0, 1.0),
        );
        let mut g: Vec<E> = rng.vec(qk, gate_lo, 0.0);
        if i == 3 {
            g[5 * kd + 1] = E::from_f64(f64::NEG_INFINITY);
        }
        let h0: Vec<E::Acc> = rng
            .vec::<E>(b * h * kd * vd, -1.0, 1.0)
            .iter()
            .map(|x| x.to_acc())
            .collect();
        for with_h0 in [false, true] {
            let inputs = GlaInputs {
                q: &q,
                k: &k,
                v: &v,
                g: &g,
                h0: with_h0.then_some(h0.as_slice()),
            };
            let p = GlaParams::new().scale(Some(0.4));
            let out = gla::gla(&p, s, &inputs).unwrap();
            let (want_o, want_h) = (out.o, out.h_last);
            let got = gla::cuda::gla_host(device, &p, s, &inputs).unwrap();
            let (got_o, got_h) = (got.o, got.h_last);
            let what = format!("gla {} {s:?} h0={with_h0}", E::DTYPE);
            let r = worst_ratio(&to_f64(&got_o), &to_f64(&want_o), rtol, atol);
            assert!(r <= 1.0, "cuda o {what}: {r} x tolerance");
            let acc64 = |v: &[E::Acc]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
            let r = worst_ratio(
                &acc64(&got_h),
                &acc64(&want_h),
                rtol.max(2e-4),
                atol.max(2e-5),
            );
            assert!(r <= 1.0, "cuda h_last {what}: {r} x tolerance");
        }
    }
}

#[test]
fn cuda_gla_matches_cpu_every_dtype() {
    if let Some(dev) = common::device_or_skip("cuda_gla_matches_cpu_every_dtype") {
        check_gla::<f32>(&dev, 110);
        check_gla::<f64>(&dev, 111);
        check_gla::<f16>(&dev, 112);
        check_gla::<bf16>(&dev, 113);
    }
}

/// scan.gla_backward on the GPU against the CPU's: every dtype and key-dim instantiation
/// (K = 1, 16, 48, the maximum), V across one and several 32-column tiles, T across one and
/// many 8-step chunks, with and without h0 and dh_last, gates near 1, strong gates and a -inf
/// gate; each run twice to check the bits repeat. Tolerances are relative to each gradient's
/// largest magnitude (the sums run in another order than the CPU's).
fn check_gla_backward<E: CudaElement>(device: &Device, seed: u64) {
    use neurokernels::element::Accum;
    use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
    let (rtol, atol) = tolerance::<E>();
    let max_key = if E::DTYPE == DType::F64 { 64 } else { 128 };
    for (i, &(b, t, h, kd, vd, gate_lo)) in [
        (1, 1, 1, 1, 1, -0.1),
        (2, 37, 3, 16, 40, -0.2),
        (1, 70, 2, max_key, 33, -0.05),
        (2, 29, 2, 48, 64, -9.0),
        (1, 203, 1, 5, 97, -0.01),
    ]
    .iter()
    .enumerate()
    {
        let s = GlaShape::new(b, t, h, kd, vd);
        let mut rng = Rng::new(seed + i as u64);
        let (qk, vv, state) = (b * t * h * kd, b * t * h * vd, b * h * kd * vd);
        let (q, k, v): (Vec<E>, Vec<E>, Vec<E>) = (
            rng.vec(qk, -1.0, 1.0),
            rng.vec(qk, -1.0, 1.0),
            rng.vec(vv, -1.0, 1.0),
        );
        let mut g: Vec<E> = rng.vec(qk, gate_lo, 0.0);
        if i == 3 {
            g[5 * kd + 1] = E::from_f64(f64::NEG_INFINITY);
        }
        let d_o: Vec<E> = rng.vec(vv, -1.0, 1.0);
        let acc = |x: Vec<E>| x.iter().map(|x| x.to_acc()).collect::<Vec<E::Acc>>();
        let h0 = acc(rng.vec::<E>(state, -1.0, 1.0));
        let dh_last = acc(rng.vec::<E>(state, -1.0, 1.0));
        for (with_h0, with_dh) in [(false, false), (true, true), (true, false)] {
            let inputs = GlaInputs {
                q: &q,
                k: &k,
                v: &v,
                g: &g,
                h0: with_h0.then_some(h0.as_slice()),
            };
            let dh = with_dh.then_some(dh_last.as_slice());
            let p = GlaParams::new().scale(Some(0.4));
            let want = gla::gla_backward(&p, s, &inputs, &d_o, dh).unwrap();
            let got = gla::cuda::gla_backward_host(device, &p, s, &inputs, &d_o, dh).unwrap();
            let again = gla::cuda::gla_backward_host(device, &p, s, &inputs, &d_o, dh).unwrap();
            let what = format!(
                "gla backward {} {s:?} h0={with_h0} dh_last={with_dh}",
                E::DTYPE
            );
            assert!(got == again, "{what} is not deterministic");
            assert_eq!(got.dh0.is_some(), with_h0, "{what}: dh0 presence");
            let acc64 = |v: &[E::Acc]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
            let mut pairs = vec![
                ("dq", to_f64(&got.dq), to_f64(&want.dq)),
                ("dk", to_f64(&got.dk), to_f64(&want.dk)),
                ("dv", to_f64(&got.dv), to_f64(&want.dv)),
                ("dg", to_f64(&got.dg), to_f64(&want.dg)),
            ];
            if let (Some(x), Some(y)) = (&got.dh0, &want.dh0) {
                pairs.push(("dh0", acc64(x), acc64(y)));
            }
            for (name, got, want) in pairs {
                let scale = want.iter().fold(1.0f64, |m, x| m.max(x.abs()));
                let r = worst_ratio(&got, &want, rtol, atol * scale);
                assert!(r <= 1.0, "cuda {name} {what}: {r} x tolerance");
            }
        }
    }
}

#[test]
fn cuda_gla_backward_matches_cpu_every_dtype() {
    if let Some(dev) = common::device_or_skip("cuda_gla_backward_matches_cpu_every_dtype") {
        check_gla_backward::<f32>(&dev, 120);
        check_gla_backward::<f64>(&dev, 121);
        check_gla_backward::<f16>(&dev, 122);
        check_gla_backward::<bf16>(&dev, 123);
    }
}

#[test]
fn cuda_gla_backward_edge_shapes_and_bad_input() {
    use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
    let Some(dev) = common::device_or_skip("cuda_gla_backward_edge_shapes_and_bad_input") else {
        return;
    };
    let p = GlaParams::new();
    // no step: dh0 is dh_last, every other gradient empty
    let s = GlaShape::new(1, 0, 2, 3, 4);
    let (h0, dh_last) = (
        vec![0.5f32; 24],
        (0..24).map(|x| x as f32).collect::<Vec<_>>(),
    );
    let inputs = GlaInputs::<f32> {
        q: &[],
        k: &[],
        v: &[],
        g: &[],
        h0: Some(&h0),
    };
    let got = gla::cuda::gla_backward_host(&dev, &p, s, &inputs, &[], Some(&dh_last)).unwrap();
    assert_eq!(got.dh0.as_deref(), Some(dh_last.as_slice()));
    assert!(got.dq.is_empty() && got.dv.is_empty());
    // K too large, and a short `do`
    let s = GlaShape::new(1, 2, 1, 129, 4);
    let (x, v) = (vec![0.5f32; 2 * 129], vec![0.5f32; 8]);
    let inputs = GlaInputs {
        q: &x,
        k: &x,
        v: &v,
        g: &x,
        h0: None,
    };
    let err = gla::cuda::gla_backward_host(&dev, &p, s, &inputs, &v, None).unwrap_err();
    assert!(err.to_string().contains("K = 129"), "{err}");
    let s = GlaShape::new(1, 2, 1, 4, 4);
    let inputs = GlaInputs {
        q: &x[..8],
        k: &x[..8],
        v: &v,
        g: &x[..8],
        h0: None,
    };
    let err = gla::cuda::gla_backward_host(&dev, &p, s, &inputs, &v[..7], None).unwrap_err();
    assert!(err.to_string().contains("do"), "{err}");
}

#[test]
fn cuda_gla_rejects_a_key_dim_too_large() {
    use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
    let Some(dev) = common::device_or_skip("cuda_gla_rejects_a_key_dim_too_large") else {
        return;
    };
    let s = GlaShape::new(1, 2, 1, 129, 4);
    let (x, v) = (vec![0.5f32; 2 * 129], vec![0.5f32; 8]);
    let inputs = GlaInputs {
        q: &x,
        k: &x,
        v: &v,
        g: &x,
        h0: None,
    };
    let err = gla::cuda::gla_host(&dev, &GlaParams::new(), s, &inputs).unwrap_err();
    assert!(err.to_string().contains("K = 129"), "{err}");
}

#[test]
fn cuda_selective_matches_cpu_every_dtype() {
    if let Some(dev) = common::device_or_skip("cuda_selective_matches_cpu_every_dtype") {
        check_selective::<f32>(&dev, 90);
        check_selective::<f64>(&dev, 91);
        check_selective::<f16>(&dev, 92);
        check_selective::<bf16>(&dev, 93);
    }
}

#[test]
fn cuda_selective_rejects_a_state_too_large() {
    use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
    let Some(dev) = common::device_or_skip("cuda_selective_rejects_a_state_too_large") else {
        return;
    };
    let s = SelectiveShape::new(1, 2, 3, 65);
    let (x, a) = (vec![0.5f32; 6], vec![-1.0f32; 3 * 65]);
    let bc = vec![0.5f32; 2 * 65];
    let inputs = SelectiveInputs {
        u: &x,
        delta: &x,
        a: &a,
        bm: &bc,
        cm: &bc,
        dskip: None,
        z: None,
        delta_bias: None,
        h0: None,
    };
    let err =
        selective::cuda::selective_host(&dev, &SelectiveParams::new(), s, &inputs).unwrap_err();
    assert!(err.to_string().contains("N = 65"), "{err}");
}
