//! scan.selective (Mamba-1's fused selective scan) on the CPU against a naive float64 loop:
//! every ISA and dtype, every combination of the optional inputs, softplus on and off, odd
//! sizes; determinism; bad input.

mod common;

use common::{Rng, to_f64, worst_ratio};
use half::{bf16, f16};
use neurokernels::cpu::Isa;
use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
use neurokernels::{DType, Element};

struct Data<E: Element> {
    u: Vec<E>,
    delta: Vec<E>,
    a: Vec<E::Acc>,
    bm: Vec<E>,
    cm: Vec<E>,
    dskip: Vec<E::Acc>,
    z: Vec<E>,
    bias: Vec<E::Acc>,
    h0: Vec<E::Acc>,
}

fn acc<E: Element>(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<E::Acc> {
    rng.vec::<E>(n, lo, hi).iter().map(|x| x.to_acc()).collect()
}

fn data<E: Element>(s: SelectiveShape, seed: u64) -> Data<E> {
    let mut rng = Rng::new(seed);
    let (seq, bc) = (s.batch * s.len * s.channels, s.batch * s.len * s.state);
    Data {
        u: rng.vec(seq, -1.0, 1.0),
        // dt > 0 as in Mamba, so exp(dt·A) decays even without softplus
        delta: rng.vec(seq, 0.05, 1.0),
        a: acc::<E>(&mut rng, s.channels * s.state, -2.0, -0.3),
        bm: rng.vec(bc, -1.0, 1.0),
        cm: rng.vec(bc, -1.0, 1.0),
        dskip: acc::<E>(&mut rng, s.channels, -1.0, 1.0),
        z: rng.vec(seq, -2.0, 2.0),
        bias: acc::<E>(&mut rng, s.channels, 0.2, 0.8),
        h0: acc::<E>(&mut rng, s.batch * s.channels * s.state, -1.0, 1.0),
    }
}

fn f(x: &[impl Copy + Into<f64>]) -> Vec<f64> {
    x.iter().map(|v| (*v).into()).collect()
}

/// Naive float64 reference: (y, h_last).
fn reference<E: Element>(
    s: SelectiveShape,
    d: &Data<E>,
    opt: [bool; 4],
    softplus: bool,
) -> (Vec<f64>, Vec<f64>)
where
    E::Acc: Into<f64>,
{
    let [with_dskip, with_z, with_bias, with_h0] = opt;
    let (u, delta, bm, cm, z) = (
        to_f64(&d.u),
        to_f64(&d.delta),
        to_f64(&d.bm),
        to_f64(&d.cm),
        to_f64(&d.z),
    );
    let (a, dskip, bias, h0) = (f(&d.a), f(&d.dskip), f(&d.bias), f(&d.h0));
    let (bsz, t_len, dd, n) = (s.batch, s.len, s.channels, s.state);
    let mut y = vec![0.0; bsz * t_len * dd];
    let mut h_last = vec![0.0; bsz * dd * n];
    for b in 0..bsz {
        for c in 0..dd {
            let mut x: Vec<f64> = (0..n)
                .map(|j| {
                    if with_h0 {
                        h0[(b * dd + c) * n + j]
                    } else {
                        0.0
                    }
                })
                .collect();
            for t in 0..t_len {
                let k = (b * t_len + t) * dd + c;
                let mut dt = delta[k] + if with_bias { bias[c] } else { 0.0 };
                if softplus {
                    dt = dt.exp().ln_1p();
                }
                let mut out = 0.0;
                for j in 0..n {
                    let r = (b * t_len + t) * n + j;
                    x[j] = (dt * a[c * n + j]).exp() * x[j] + dt * bm[r] * u[k];
                    out += cm[r] * x[j];
                }
                if with_dskip {
                    out += dskip[c] * u[k];
                }
                if with_z {
                    out *= z[k] / (1.0 + (-z[k]).exp());
                }
                y[k] = out;
            }
            for j in 0..n {
                h_last[(b * dd + c) * n + j] = x[j];
            }
        }
    }
    (y, h_last)
}

fn check<E: Element>(seed: u64)
where
    E::Acc: Into<f64>,
{
    let (rtol, atol) = match E::DTYPE {
        DType::F64 => (1e-10, 1e-12),
        DType::F32 => (2e-4, 2e-5),
        _ => (2e-2, 2e-2),
    };
    let shapes = [
        (1, 1, 1, 1),
        (2, 17, 13, 16),
        (1, 40, 70, 4),
        (3, 9, 8, 1),
        (1, 130, 5, 7),
    ];
    for (k, &(b, t, dd, n)) in shapes.iter().enumerate() {
        let s = SelectiveShape::new(b, t, dd, n);
        let d = data::<E>(s, seed + k as u64);
        for mask in 0..16u32 {
            let opt = [mask & 1 != 0, mask & 2 != 0, mask & 4 != 0, mask & 8 != 0];
            let softplus = mask % 3 == 0;
            let inputs = SelectiveInputs {
                u: &d.u,
                delta: &d.delta,
                a: &d.a,
                bm: &d.bm,
                cm: &d.cm,
                dskip: opt[0].then_some(d.dskip.as_slice()),
                z: opt[1].then_some(d.z.as_slice()),
                delta_bias: opt[2].then_some(d.bias.as_slice()),
                h0: opt[3].then_some(d.h0.as_slice()),
            };
            let (want_y, want_h) = reference(s, &d, opt, softplus);
            let p = SelectiveParams::new().delta_softplus(softplus);
            for isa in Isa::available() {
                let mut y = vec![E::from_f64(f64::NAN); b * t * dd];
                let mut h = vec![<E::Acc as neurokernels::element::Accum>::ZERO; b * dd * n];
                selective::selective_into_on(isa, &p, s, &inputs, &mut y, &mut h).unwrap();
                let what = format!(
                    "{} {isa:?} {s:?} options {opt:?} softplus={softplus}",
                    E::DTYPE
                );
                let r = worst_ratio(&to_f64(&y), &want_y, rtol, atol);
                assert!(r <= 1.0, "y {what}: {r} x tolerance");
                // h_last stays in the accumulator type: f32 tolerance for the half types
                let (hr, ha) = if E::DTYPE == DType::F64 {
                    (rtol, atol)
                } else {
                    (2e-4, 2e-5)
                };
                let r = worst_ratio(&f(&h), &want_h, hr, ha);
                assert!(r <= 1.0, "h_last {what}: {r} x tolerance");
            }
        }
    }
}

#[test]
fn f32_matches_f64_reference() {
    check::<f32>(1);
}

#[test]
fn f64_matches_f64_reference() {
    check::<f64>(2);
}

#[test]
fn f16_matches_f64_reference() {
    check::<f16>(3);
}

#[test]
fn bf16_matches_f64_reference() {
    check::<bf16>(4);
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // the channel block narrows with the thread count (512 to 128 channels for the second
    // shape); a channel's result must not depend on the block it falls in
    for s in [
        SelectiveShape::new(2, 50, 300, 16),
        SelectiveShape::new(1, 20, 1100, 4),
    ] {
        let d = data::<f32>(s, 9);
        let inputs = SelectiveInputs {
            u: &d.u,
            delta: &d.delta,
            a: &d.a,
            bm: &d.bm,
            cm: &d.cm,
            dskip: Some(&d.dskip),
            z: Some(&d.z),
            delta_bias: None,
            h0: None,
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| selective::selective(&SelectiveParams::new(), s, &inputs).unwrap())
        };
        let one = run(1);
        assert!(run(2) == one && run(3) == one, "{s:?}");
        // the backward's sums over channel blocks, batch and time in a fixed order too (the
        // first shape spans several channel blocks)
        let back = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let p = SelectiveParams::new().delta_softplus(true);
            pool.install(|| selective::selective_backward(&p, s, &inputs, &d.delta).unwrap())
        };
        let one = back(1);
        assert!(back(2) == one && back(3) == one, "backward {s:?}");
    }
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let s = SelectiveShape::new(2, 3, 4, 5);
    let d = data::<f32>(s, 5);
    let ok = SelectiveInputs {
        u: &d.u,
        delta: &d.delta,
        a: &d.a,
        bm: &d.bm,
        cm: &d.cm,
        dskip: None,
        z: None,
        delta_bias: None,
        h0: None,
    };
    let p = SelectiveParams::new();
    let err = |inputs: SelectiveInputs<'_, f32>| {
        selective::selective(&p, s, &inputs)
            .unwrap_err()
            .to_string()
    };
    assert!(err(SelectiveInputs { u: &d.u[1..], ..ok }).contains("`u`"));
    assert!(
        err(SelectiveInputs {
            delta: &d.delta[1..],
            ..ok
        })
        .contains("`delta`")
    );
    assert!(err(SelectiveInputs { a: &d.a[1..], ..ok }).contains("`A`"));
    assert!(
        err(SelectiveInputs {
            bm: &d.bm[1..],
            ..ok
        })
        .contains("`Bm`")
    );
    assert!(
        err(SelectiveInputs {
            cm: &d.cm[1..],
            ..ok
        })
        .contains("`Cm`")
    );
    assert!(
        err(SelectiveInputs {
            dskip: Some(&d.dskip[1..]),
            ..ok
        })
        .contains("`Dskip`")
    );
    assert!(
        err(SelectiveInputs {
            z: Some(&d.z[1..]),
            ..ok
        })
        .contains("`z`")
    );
    assert!(
        err(SelectiveInputs {
            delta_bias: Some(&d.bias[1..]),
            ..ok
        })
        .contains("`delta_bias`")
    );
    assert!(
        err(SelectiveInputs {
            h0: Some(&d.h0[1..]),
            ..ok
        })
        .contains("`h0`")
    );
    let (mut y, mut h) = (vec![0f32; 24], vec![0f32; 40]);
    assert!(
        selective::selective_into(&p, s, &ok, &mut y[1..], &mut h)
            .unwrap_err()
            .to_string()
            .contains("`y`")
    );
    assert!(
        selective::selective_into(&p, s, &ok, &mut y, &mut h[1..])
            .unwrap_err()
            .to_string()
            .contains("`h_last`")
    );
    assert!(
        SelectiveShape::from_dims(&[2, 3, 4], &[5, 5])
            .unwrap_err()
            .to_string()
            .contains("`A`")
    );
    assert!(
        SelectiveShape::from_dims(&[2, 3], &[4, 5])
            .unwrap_err()
            .to_string()
            .contains("`u`")
    );
    let huge = SelectiveShape::new(usize::MAX / 2, 3, 4, 5);
    assert!(selective::selective(&p, huge, &ok).is_err());
    // an empty batch is an Ok no-op
    let empty = SelectiveShape::new(0, 3, 4, 5);
    let none = SelectiveInputs::<f32> {
        u: &[],
        delta: &[],
        a: &d.a,
        bm: &[],
        cm: &[],
        dskip: None,
        z: None,
        delta_bias: None,
        h0: None,
    };
    let out = selective::selective(&p, empty, &none).unwrap();
    assert_eq!((out.y, out.h_last), (vec![], vec![]));
}

/// Σ y·dy of the f64 kernel, for finite differences.
fn loss(
    s: SelectiveShape,
    inputs: &SelectiveInputs<'_, f64>,
    p: &SelectiveParams,
    dy: &[f64],
) -> f64 {
    let y = selective::selective(p, s, inputs).unwrap().y;
    y.iter().zip(dy).map(|(a, b)| a * b).sum()
}

#[test]
fn backward_matches_finite_differences() {
    let s = SelectiveShape::new(2, 7, 5, 3);
    for (softplus, all) in [(false, false), (true, true), (false, true)] {
        let d = data::<f64>(s, 21);
        let dy: Vec<f64> = Rng::new(22).vec(2 * 7 * 5, -1.0, 1.0);
        let p = SelectiveParams::new().delta_softplus(softplus);
        // every input as one flat list of tensors we can perturb
        let mut tensors: Vec<(&str, Vec<f64>)> = vec![
            ("u", d.u.clone()),
            ("delta", d.delta.clone()),
            ("A", d.a.clone()),
            ("Bm", d.bm.clone()),
            ("Cm", d.cm.clone()),
            ("Dskip", d.dskip.clone()),
            ("z", d.z.clone()),
            ("delta_bias", d.bias.clone()),
            ("h0", d.h0.clone()),
        ];
        let build = |t: &[(&str, Vec<f64>)]| -> Vec<Vec<f64>> {
            t.iter().map(|(_, v)| v.clone()).collect()
        };
        let make = |v: &[Vec<f64>]| -> f64 {
            let inputs = SelectiveInputs {
                u: &v[0],
                delta: &v[1],
                a: &v[2],
                bm: &v[3],
                cm: &v[4],
                dskip: all.then_some(v[5].as_slice()),
                z: all.then_some(v[6].as_slice()),
                delta_bias: all.then_some(v[7].as_slice()),
                h0: all.then_some(v[8].as_slice()),
            };
            loss(s, &inputs, &p, &dy)
        };
        let base = build(&tensors);
        let inputs = SelectiveInputs {
            u: &base[0],
            delta: &base[1],
            a: &base[2],
            bm: &base[3],
            cm: &base[4],
            dskip: all.then_some(base[5].as_slice()),
            z: all.then_some(base[6].as_slice()),
            delta_bias: all.then_some(base[7].as_slice()),
            h0: all.then_some(base[8].as_slice()),
        };
        let g = selective::selective_backward(&p, s, &inputs, &dy).unwrap();
        let analytic: Vec<Option<Vec<f64>>> = vec![
            Some(g.du.clone()),
            Some(g.ddelta.clone()),
            Some(g.da.clone()),
            Some(g.dbm.clone()),
            Some(g.dcm.clone()),
            g.ddskip.clone(),
            g.dz.clone(),
            g.ddelta_bias.clone(),
            g.dh0.clone(),
        ];
        for (ti, want) in analytic.iter().enumerate() {
            let Some(want) = want else {
                assert!(!all || ti < 5, "{} missing", tensors[ti].0);
                continue;
            };
            for (i, analytic) in want.iter().enumerate() {
                let h = 1e-6;
                let orig = tensors[ti].1[i];
                tensors[ti].1[i] = orig + h;
                let up = make(&build(&tensors));
                tensors[ti].1[i] = orig - h;
                let down = make(&build(&tensors));
                tensors[ti].1[i] = orig;
                let numeric = (up - down) / (2.0 * h);
                let err = (numeric - analytic).abs() / (1e-6 + numeric.abs());
                assert!(
                    err < 1e-5,
                    "{} [{i}] softplus={softplus}: analytic {analytic} vs numeric {numeric}",
                    tensors[ti].0
                );
            }
        }
    }
}

#[test]
fn backward_low_precision_matches_f64() {
    // the f32 kernel against the f64 one on a longer sequence (several checkpoint chunks)
    let s = SelectiveShape::new(2, 200, 70, 8);
    let d32 = data::<f32>(s, 31);
    let up = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<f64>>();
    let (u, delta, a, bm, cm, dskip, z, bias, h0) = (
        up(&d32.u),
        up(&d32.delta),
        up(&d32.a),
        up(&d32.bm),
        up(&d32.cm),
        up(&d32.dskip),
        up(&d32.z),
        up(&d32.bias),
        up(&d32.h0),
    );
    let dy32: Vec<f32> = Rng::new(32).vec(2 * 200 * 70, -1.0, 1.0);
    let p = SelectiveParams::new().delta_softplus(true);
    let i32_ = SelectiveInputs {
        u: &d32.u,
        delta: &d32.delta,
        a: &d32.a,
        bm: &d32.bm,
        cm: &d32.cm,
        dskip: Some(&d32.dskip),
        z: Some(&d32.z),
        delta_bias: Some(&d32.bias),
        h0: Some(&d32.h0),
    };
    let i64_ = SelectiveInputs {
        u: &u,
        delta: &delta,
        a: &a,
        bm: &bm,
        cm: &cm,
        dskip: Some(&dskip),
        z: Some(&z),
        delta_bias: Some(&bias),
        h0: Some(&h0),
    };
    let g32 = selective::selective_backward(&p, s, &i32_, &dy32).unwrap();
    let g64 = selective::selective_backward(&p, s, &i64_, &up(&dy32)).unwrap();
    let pairs: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("du", up(&g32.du), g64.du.clone()),
        ("ddelta", up(&g32.ddelta), g64.ddelta.clone()),
        ("dA", up(&g32.da), g64.da.clone()),
        ("dBm", up(&g32.dbm), g64.dbm.clone()),
        ("dCm", up(&g32.dcm), g64.dcm.clone()),
        ("dz", up(g32.dz.as_ref().unwrap()), g64.dz.clone().unwrap()),
        (
            "dh0",
            up(g32.dh0.as_ref().unwrap()),
            g64.dh0.clone().unwrap(),
        ),
        (
            "dDskip",
            up(g32.ddskip.as_ref().unwrap()),
            g64.ddskip.clone().unwrap(),
        ),
        (
            "ddelta_bias",
            up(g32.ddelta_bias.as_ref().unwrap()),
            g64.ddelta_bias.clone().unwrap(),
        ),
    ];
    for (name, got, want) in pairs {
        // sums over many terms: scale the absolute tolerance by the largest magnitude
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let r = worst_ratio(&got, &want, 1e-3, 1e-5 * scale.max(1.0));
        assert!(r <= 1.0, "{name}: {r}");
    }
    // and deterministic across thread counts
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| selective::selective_backward(&p, s, &i32_, &dy32).unwrap())
    };
    assert!(run(1) == run(3));
    // dy of the wrong length
    assert!(
        selective::selective_backward(&p, s, &i32_, &dy32[1..])
            .unwrap_err()
            .to_string()
            .contains("`dy`")
    );
}

#[test]
fn backward_every_isa_matches_f64() {
    // odd sizes: a channel block and a tail not a whole vector (70), N not a multiple of 4,
    // several checkpoint chunks and a partial one (T = 70)
    for (k, &(b, t, dd, n)) in [(2, 70, 70, 5), (1, 3, 1, 1), (1, 33, 17, 16)]
        .iter()
        .enumerate()
    {
        let s = SelectiveShape::new(b, t, dd, n);
        let d32 = data::<f32>(s, 40 + k as u64);
        let up = |v: &[f32]| v.iter().map(|x| *x as f64).collect::<Vec<f64>>();
        let d64 = [&d32.u, &d32.delta, &d32.bm, &d32.cm, &d32.z].map(|v| up(v));
        let p64 = [&d32.a, &d32.dskip, &d32.bias, &d32.h0].map(|v| up(v));
        let dy32: Vec<f32> = Rng::new(41).vec(b * t * dd, -1.0, 1.0);
        for (mask, softplus) in [(0u32, false), (15, true), (5, true), (10, false)] {
            let opt = |i: u32| mask & (1 << i) != 0;
            let p = SelectiveParams::new().delta_softplus(softplus);
            let i32_ = SelectiveInputs::new(&d32.u, &d32.delta, &d32.a, &d32.bm, &d32.cm)
                .dskip(opt(0).then_some(d32.dskip.as_slice()))
                .z(opt(1).then_some(d32.z.as_slice()))
                .delta_bias(opt(2).then_some(d32.bias.as_slice()))
                .h0(opt(3).then_some(d32.h0.as_slice()));
            let i64_ = SelectiveInputs::new(&d64[0], &d64[1], &p64[0], &d64[2], &d64[3])
                .dskip(opt(0).then_some(p64[1].as_slice()))
                .z(opt(1).then_some(d64[4].as_slice()))
                .delta_bias(opt(2).then_some(p64[2].as_slice()))
                .h0(opt(3).then_some(p64[3].as_slice()));
            let want =
                selective::selective_backward_on(Isa::Scalar, &p, s, &i64_, &up(&dy32)).unwrap();
            for isa in Isa::available() {
                let got = selective::selective_backward_on(isa, &p, s, &i32_, &dy32).unwrap();
                let pairs = [
                    ("du", up(&got.du), want.du.clone()),
                    ("ddelta", up(&got.ddelta), want.ddelta.clone()),
                    ("dA", up(&got.da), want.da.clone()),
                    ("dBm", up(&got.dbm), want.dbm.clone()),
                    ("dCm", up(&got.dcm), want.dcm.clone()),
                    (
                        "dz",
                        up(&got.dz.unwrap_or_default()),
                        want.dz.clone().unwrap_or_default(),
                    ),
                    (
                        "dh0",
                        up(&got.dh0.unwrap_or_default()),
                        want.dh0.clone().unwrap_or_default(),
                    ),
                    (
                        "dDskip",
                        up(&got.ddskip.unwrap_or_default()),
                        want.ddskip.clone().unwrap_or_default(),
                    ),
                    (
                        "ddelta_bias",
                        up(&got.ddelta_bias.unwrap_or_default()),
                        want.ddelta_bias.clone().unwrap_or_default(),
                    ),
                ];
                for (name, got, want) in pairs {
                    // as backward_low_precision_matches_f64: sums over many terms
                    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                    let r = worst_ratio(&got, &want, 1e-3, 1e-5 * scale.max(1.0));
                    assert!(
                        r <= 1.0,
                        "{name} {isa:?} {s:?} mask {mask} softplus={softplus}: {r}"
                    );
                }
            }
        }
    }
}

/// `selective_backward_into` writes the same bits as `selective_backward` into buffers full
/// of garbage (every value overwritten, the sums started from zero), and refuses buffers of
/// the wrong length or presence, naming them.
#[test]
fn backward_into_reused_buffers_matches_and_checks_them() {
    let s = SelectiveShape::new(2, 37, 70, 8);
    let d = data::<f32>(s, 12);
    let inputs = SelectiveInputs {
        u: &d.u,
        delta: &d.delta,
        a: &d.a,
        bm: &d.bm,
        cm: &d.cm,
        dskip: Some(&d.dskip),
        z: Some(&d.z),
        delta_bias: Some(&d.bias),
        h0: Some(&d.h0),
    };
    let params = SelectiveParams::new().delta_softplus(true);
    let dy: Vec<f32> = d.u.iter().map(|v| 0.5 - v).collect();
    let want = selective::selective_backward(&params, s, &inputs, &dy).unwrap();
    let mut got = want.clone();
    let garbage = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = 7.5);
    for v in [
        &mut got.du,
        &mut got.ddelta,
        &mut got.da,
        &mut got.dbm,
        &mut got.dcm,
    ] {
        garbage(v);
    }
    for v in [
        &mut got.ddskip,
        &mut got.dz,
        &mut got.ddelta_bias,
        &mut got.dh0,
    ] {
        garbage(v.as_mut().unwrap());
    }
    for _ in 0..2 {
        selective::selective_backward_into(&params, s, &inputs, &dy, got.as_mut()).unwrap();
        assert!(
            got == want,
            "into reused buffers differs from the allocating backward"
        );
    }
    // a missing dz buffer (z is given), and a short dbm
    let mut g = want.clone();
    let grads = selective::SelectiveGradsMut {
        dz: None,
        ..g.as_mut()
    };
    let e = selective::selective_backward_into(&params, s, &inputs, &dy, grads).unwrap_err();
    assert!(e.to_string().contains("`dz`"), "{e}");
    let mut g = want.clone();
    let mut grads = g.as_mut();
    let short = grads.dbm.len() - 1;
    grads.dbm = &mut std::mem::take(&mut grads.dbm)[..short];
    let e = selective::selective_backward_into(&params, s, &inputs, &dy, grads).unwrap_err();
    assert!(e.to_string().contains("`dbm`"), "{e}");
}
