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
                selective::selective_on(isa, &p, s, &inputs, &mut y, &mut h).unwrap();
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
    let s = SelectiveShape::new(2, 50, 300, 16);
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
        pool.install(|| selective::selective_alloc(&SelectiveParams::new(), s, &inputs).unwrap())
    };
    let one = run(1);
    assert!(run(2) == one && run(3) == one);
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
        selective::selective_alloc(&p, s, &inputs)
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
        selective::selective(&p, s, &ok, &mut y[1..], &mut h)
            .unwrap_err()
            .to_string()
            .contains("`y`")
    );
    assert!(
        selective::selective(&p, s, &ok, &mut y, &mut h[1..])
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
    assert!(selective::selective_alloc(&p, huge, &ok).is_err());
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
    assert_eq!(
        selective::selective_alloc(&p, empty, &none).unwrap(),
        (vec![], vec![])
    );
}
