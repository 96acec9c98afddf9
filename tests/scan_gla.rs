//! scan.gla (gated linear attention, matrix-valued state) on the CPU: every ISA and dtype
//! against a naive float64 recurrence, g = 0 against causal linear attention, gates near zero
//! and very negative log-gates stay finite, the backward against finite differences, and
//! bad input.

mod common;

use common::{Rng, to_f64, worst_ratio};
use half::{bf16, f16};
use neurokernels::cpu::Isa;
use neurokernels::scan::gla::{self, GlaForm, GlaInputs, GlaOut, GlaParams, GlaShape};
use neurokernels::{DType, Element};

struct Data<E: Element> {
    q: Vec<E>,
    k: Vec<E>,
    v: Vec<E>,
    g: Vec<E>,
    h0: Vec<E::Acc>,
}

fn data<E: Element>(s: GlaShape, seed: u64, gate_lo: f64) -> Data<E> {
    let mut rng = Rng::new(seed);
    let (qk, vv) = (
        s.batch * s.len * s.heads * s.key_dim,
        s.batch * s.len * s.heads * s.value_dim,
    );
    Data {
        q: rng.vec(qk, -1.0, 1.0),
        k: rng.vec(qk, -1.0, 1.0),
        v: rng.vec(vv, -1.0, 1.0),
        g: rng.vec(qk, gate_lo, 0.0),
        h0: rng
            .vec::<E>(s.batch * s.heads * s.key_dim * s.value_dim, -1.0, 1.0)
            .iter()
            .map(|x| x.to_acc())
            .collect(),
    }
}

fn f<A: Copy + Into<f64>>(x: &[A]) -> Vec<f64> {
    x.iter().map(|v| (*v).into()).collect()
}

/// Naive float64 recurrence: (o, h_last).
fn reference(
    s: GlaShape,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: &[f64],
    h0: Option<&[f64]>,
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (b, t_len, h, kd, vd) = (s.batch, s.len, s.heads, s.key_dim, s.value_dim);
    let mut o = vec![0.0; b * t_len * h * vd];
    let mut last = vec![0.0; b * h * kd * vd];
    for bi in 0..b {
        for hi in 0..h {
            let base = (bi * h + hi) * kd * vd;
            let mut st: Vec<f64> =
                h0.map_or(vec![0.0; kd * vd], |h0| h0[base..base + kd * vd].to_vec());
            for t in 0..t_len {
                let r = (bi * t_len + t) * h + hi;
                for i in 0..kd {
                    for j in 0..vd {
                        st[i * vd + j] =
                            g[r * kd + i].exp() * st[i * vd + j] + k[r * kd + i] * v[r * vd + j];
                    }
                }
                for j in 0..vd {
                    o[r * vd + j] =
                        scale * (0..kd).map(|i| q[r * kd + i] * st[i * vd + j]).sum::<f64>();
                }
            }
            last[base..base + kd * vd].copy_from_slice(&st);
        }
    }
    (o, last)
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
    for (i, &(b, t, h, kd, vd)) in [
        (1, 1, 1, 1, 1),
        (2, 33, 3, 8, 5),
        (1, 70, 2, 16, 16),
        (1, 50, 1, 64, 64),
        (2, 20, 2, 7, 19),
    ]
    .iter()
    .enumerate()
    {
        let s = GlaShape::new(b, t, h, kd, vd);
        let d = data::<E>(s, seed + i as u64, -0.5);
        for (with_h0, scale) in [(false, None), (true, Some(0.3))] {
            let inputs = GlaInputs {
                q: &d.q,
                k: &d.k,
                v: &d.v,
                g: &d.g,
                h0: with_h0.then_some(d.h0.as_slice()),
            };
            let h0f = f(&d.h0);
            let sc = scale.unwrap_or(1.0 / (kd as f64).sqrt());
            let (want_o, want_h) = reference(
                s,
                &to_f64(&d.q),
                &to_f64(&d.k),
                &to_f64(&d.v),
                &to_f64(&d.g),
                with_h0.then_some(h0f.as_slice()),
                sc,
            );
            for isa in Isa::available() {
                let GlaOut { o, h_last: hl, .. } =
                    gla::gla_on(isa, &GlaParams::new().scale(scale), s, &inputs).unwrap();
                let what = format!("{} {isa:?} {s:?} h0={with_h0}", E::DTYPE);
                let r = worst_ratio(&to_f64(&o), &want_o, rtol, atol);
                assert!(r <= 1.0, "o {what}: {r} x tolerance");
                let (hr, ha) = if E::DTYPE == DType::F64 {
                    (rtol, atol)
                } else {
                    (2e-4, 2e-5)
                };
                let r = worst_ratio(&f(&hl), &want_h, hr, ha);
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

/// The chunked form (default) equals the step-by-step recurrence, forward and backward, on every ISA, for chunk
/// boundaries anywhere, gates near 1 (the factored intra-chunk product), strong gates and
/// -inf gates (the direct one), and both paths mixed within one head.
fn chunked_matches_recurrent<E: Element>(seed: u64, (rtol, atol): (f64, f64), grad_tol: (f64, f64))
where
    E::Acc: Into<f64> + Element,
{
    for (i, &(b, t, h, kd, vd, gate_lo)) in [
        (1, 15, 1, 4, 3, -0.1),
        (2, 16, 2, 8, 8, -0.5),
        (1, 17, 1, 64, 64, -0.05),
        (2, 67, 3, 9, 21, -1.0),
        (1, 100, 2, 16, 40, -8.0),
        (1, 48, 1, 33, 17, 0.0),
    ]
    .iter()
    .enumerate()
    {
        let s = GlaShape::new(b, t, h, kd, vd);
        let mut d = data::<E>(s, seed + i as u64, gate_lo);
        if i == 3 {
            // one chunk of a head with a -inf and a -60 gate: the direct path beside factored ones
            d.g[20 * kd + 1] = E::from_f64(f64::NEG_INFINITY);
            d.g[40 * kd * h + 2] = E::from_f64(-60.0);
        }
        let inputs = GlaInputs {
            q: &d.q,
            k: &d.k,
            v: &d.v,
            g: &d.g,
            h0: Some(&d.h0),
        };
        for isa in Isa::available() {
            let run = |form| gla::gla_on(isa, &GlaParams::new().form(form), s, &inputs).unwrap();
            let out = run(GlaForm::Chunked);
            let (o_c, h_c) = (out.o, out.h_last);
            let out = run(GlaForm::Recurrent);
            let (o_r, h_r) = (out.o, out.h_last);
            let what = format!("{} {isa:?} {s:?} gates >= {gate_lo}", E::DTYPE);
            let r = worst_ratio(&to_f64(&o_c), &to_f64(&o_r), rtol, atol);
            assert!(r <= 1.0, "o {what}: {r} x tolerance");
            let r = worst_ratio(&f(&h_c), &f(&h_r), rtol, atol);
            assert!(r <= 1.0, "h_last {what}: {r} x tolerance");
            // the backward: the chunked products against the step-by-step walk
            let dout: Vec<E> = Rng::new(seed + 50).vec(o_c.len(), -1.0, 1.0);
            let dh_last: Vec<E::Acc> = Rng::new(seed + 51).vec(h_c.len(), -1.0, 1.0);
            let grads = |form| {
                let p = GlaParams::new().form(form);
                gla::gla_backward_on(isa, &p, s, &inputs, &dout, Some(&dh_last)).unwrap()
            };
            let (c, r) = (grads(GlaForm::Chunked), grads(GlaForm::Recurrent));
            for (name, x, y) in [
                ("dq", &c.dq, &r.dq),
                ("dk", &c.dk, &r.dk),
                ("dv", &c.dv, &r.dv),
                ("dg", &c.dg, &r.dg),
            ] {
                let worst = worst_ratio(&to_f64(x), &to_f64(y), grad_tol.0, grad_tol.1);
                assert!(worst <= 1.0, "{name} {what}: {worst} x tolerance");
            }
            let (x, y) = (c.dh0.unwrap(), r.dh0.unwrap());
            let worst = worst_ratio(&f(&x), &f(&y), grad_tol.0, grad_tol.1);
            assert!(worst <= 1.0, "dh0 {what}: {worst} x tolerance");
        }
    }
}

#[test]
fn forward_does_not_depend_on_thread_count() {
    // tasks group heads by the thread count; each head's arithmetic must not change
    let s = GlaShape::new(2, 45, 5, 16, 12);
    let d = data::<f32>(s, 21, -0.3);
    let inputs = GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: Some(&d.h0),
    };
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| gla::gla(&GlaParams::new(), s, &inputs).unwrap())
    };
    let base = run(1);
    for threads in [2, 3, 7, 16] {
        assert!(run(threads) == base, "{threads} threads");
    }
}

#[test]
fn chunked_equals_step_by_step_f64() {
    chunked_matches_recurrent::<f64>(11, (1e-12, 1e-13), (1e-12, 1e-13));
}

#[test]
fn chunked_equals_step_by_step_f32() {
    // gradients: each f32 walk is within ~1e-6 of the float64 one; the two sum in other orders
    // (the log-gates' through q·dq − k·dk within a chunk)
    chunked_matches_recurrent::<f32>(12, (1e-5, 1e-6), (5e-5, 1e-5));
}

#[test]
fn chunked_equals_step_by_step_bf16() {
    // both accumulate in f32 from the same bf16 inputs; outputs rounded to bf16 may differ by
    // one unit in the last place
    chunked_matches_recurrent::<bf16>(13, (8e-3, 1e-3), (8e-3, 1e-3));
}

#[test]
fn zero_gates_give_causal_linear_attention() {
    let s = GlaShape::new(1, 40, 2, 8, 6);
    let mut d = data::<f64>(s, 5, -1.0);
    d.g.fill(0.0);
    let inputs = GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: None,
    };
    let o = gla::gla(&GlaParams::new().scale(Some(1.0)), s, &inputs)
        .unwrap()
        .o;
    let (h, kd, vd) = (2, 8, 6);
    for t in 0..40 {
        for hi in 0..h {
            let r = t * h + hi;
            for j in 0..vd {
                // o[t] = Σ_{τ<=t} (q[t]·k[τ]) v[τ]
                let want: f64 = (0..=t)
                    .map(|tau| {
                        let rt = tau * h + hi;
                        let score: f64 = (0..kd).map(|i| d.q[r * kd + i] * d.k[rt * kd + i]).sum();
                        score * d.v[rt * vd + j]
                    })
                    .sum();
                assert!(
                    (o[r * vd + j] - want).abs() < 1e-10 * (1.0 + want.abs()),
                    "t {t} h {hi} v {j}"
                );
            }
        }
    }
}

#[test]
fn extreme_gates_stay_finite() {
    // gates near zero and a log-gate of -1000 (exp underflows to 0): no NaN or inf, ever
    let s = GlaShape::new(1, 5000, 1, 16, 16);
    let mut d = data::<f32>(s, 6, -40.0);
    d.g[100] = -1000.0;
    d.g[101] = f32::NEG_INFINITY;
    let inputs = GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: None,
    };
    let GlaOut { o, h_last: h, .. } = gla::gla(&GlaParams::new(), s, &inputs).unwrap();
    assert!(o.iter().chain(&h).all(|x| x.is_finite()));
    let dout: Vec<f32> = Rng::new(7).vec(5000 * 16, -1.0, 1.0);
    let g = gla::gla_backward(&GlaParams::new(), s, &inputs, &dout, None).unwrap();
    assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
    // the -inf gate has zero slope: its gradient is 0 · (finite) = 0
    assert!(
        g.dg.iter()
            .enumerate()
            .all(|(i, x)| x.is_finite() || i == 101)
    );
}

#[test]
fn backward_matches_finite_differences() {
    let s = GlaShape::new(2, 21, 2, 5, 4);
    for (with_h0, with_dh_last) in [(false, false), (true, true), (true, false)] {
        let d = data::<f64>(s, 8, -1.0);
        let dout: Vec<f64> = Rng::new(9).vec(2 * 21 * 2 * 4, -1.0, 1.0);
        let dh_last: Vec<f64> = Rng::new(10).vec(2 * 2 * 5 * 4, -1.0, 1.0);
        let p = GlaParams::new().scale(Some(0.7));
        let loss = |t: &[Vec<f64>]| -> f64 {
            let inputs = GlaInputs {
                q: &t[0],
                k: &t[1],
                v: &t[2],
                g: &t[3],
                h0: with_h0.then_some(t[4].as_slice()),
            };
            let GlaOut { o, h_last: h, .. } = gla::gla(&p, s, &inputs).unwrap();
            let mut l: f64 = o.iter().zip(&dout).map(|(a, b)| a * b).sum();
            if with_dh_last {
                l += h.iter().zip(&dh_last).map(|(a, b)| a * b).sum::<f64>();
            }
            l
        };
        let mut tensors = vec![
            d.q.clone(),
            d.k.clone(),
            d.v.clone(),
            d.g.clone(),
            d.h0.clone(),
        ];
        let inputs = GlaInputs {
            q: &d.q,
            k: &d.k,
            v: &d.v,
            g: &d.g,
            h0: with_h0.then_some(d.h0.as_slice()),
        };
        let grads = gla::gla_backward(
            &p,
            s,
            &inputs,
            &dout,
            with_dh_last.then_some(dh_last.as_slice()),
        )
        .unwrap();
        let analytic = [
            Some(grads.dq),
            Some(grads.dk),
            Some(grads.dv),
            Some(grads.dg),
            grads.dh0,
        ];
        assert_eq!(analytic[4].is_some(), with_h0);
        for (ti, want) in analytic.iter().enumerate() {
            let Some(want) = want else { continue };
            for (i, a) in want.iter().enumerate() {
                let orig = tensors[ti][i];
                tensors[ti][i] = orig + 1e-6;
                let up = loss(&tensors);
                tensors[ti][i] = orig - 1e-6;
                let down = loss(&tensors);
                tensors[ti][i] = orig;
                let numeric = (up - down) / 2e-6;
                assert!(
                    (numeric - a).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "tensor {ti} [{i}]: analytic {a} vs numeric {numeric}"
                );
            }
        }
    }
}

#[test]
fn backward_is_deterministic_and_agrees_across_isas() {
    let s = GlaShape::new(2, 100, 3, 16, 24);
    let d = data::<f32>(s, 11, -0.3);
    let dout: Vec<f32> = Rng::new(12).vec(2 * 100 * 3 * 24, -1.0, 1.0);
    let inputs = GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: Some(&d.h0),
    };
    let run = |threads: usize, isa: Isa, form: GlaForm| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let p = GlaParams::new().form(form);
                gla::gla_backward_on(isa, &p, s, &inputs, &dout, None).unwrap()
            })
    };
    // each ISA gives the same bits for any thread count (the chunked form's products sum in
    // an order that depends on the vector width, so ISAs agree only to rounding: see
    // chunked_equals_step_by_step_*)
    for isa in Isa::available() {
        assert!(
            run(3, isa, GlaForm::Chunked) == run(1, isa, GlaForm::Chunked),
            "{isa:?}"
        );
    }
    // the step-by-step walk sums in one fixed order: the same bits on every ISA
    let base = run(1, Isa::Scalar, GlaForm::Recurrent);
    for isa in Isa::available() {
        assert!(run(3, isa, GlaForm::Recurrent) == base, "{isa:?}");
    }
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let s = GlaShape::new(2, 3, 2, 4, 5);
    let d = data::<f32>(s, 13, -1.0);
    let ok = GlaInputs {
        q: &d.q,
        k: &d.k,
        v: &d.v,
        g: &d.g,
        h0: None,
    };
    let p = GlaParams::new();
    let err = |i: GlaInputs<'_, f32>| gla::gla(&p, s, &i).unwrap_err().to_string();
    assert!(err(GlaInputs { q: &d.q[1..], ..ok }).contains("`q`"));
    assert!(err(GlaInputs { k: &d.k[1..], ..ok }).contains("`k`"));
    assert!(err(GlaInputs { v: &d.v[1..], ..ok }).contains("`v`"));
    assert!(err(GlaInputs { g: &d.g[1..], ..ok }).contains("`g`"));
    assert!(
        err(GlaInputs {
            h0: Some(&d.h0[1..]),
            ..ok
        })
        .contains("`h0`")
    );
    let dout = vec![0f32; 60];
    assert!(
        gla::gla_backward(&p, s, &ok, &dout[1..], None)
            .unwrap_err()
            .to_string()
            .contains("`do`")
    );
    assert!(
        gla::gla_backward(&p, s, &ok, &dout, Some(&d.h0[1..]))
            .unwrap_err()
            .to_string()
            .contains("`dh_last`")
    );
    assert!(
        GlaShape::from_dims(&[2, 3, 2], &[2, 3, 2, 5])
            .unwrap_err()
            .to_string()
            .contains("`q`")
    );
    assert!(
        GlaShape::from_dims(&[2, 3, 2, 4], &[2, 4, 2, 5])
            .unwrap_err()
            .to_string()
            .contains("`v`")
    );
    assert!(gla::gla(&p, GlaShape::new(usize::MAX / 2, 2, 2, 2, 2), &ok).is_err());
    // an empty batch is an Ok no-op
    let none = GlaInputs::<f32> {
        q: &[],
        k: &[],
        v: &[],
        g: &[],
        h0: None,
    };
    let out = gla::gla(&p, GlaShape::new(0, 3, 2, 4, 5), &none).unwrap();
    assert_eq!((out.o, out.h_last), (vec![], vec![]));
}
