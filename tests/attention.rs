//! `attention.forward`, `attention.backward` and `attention.top_keys` on the CPU against a
//! naive float64 implementation written from the contract (CASES.md), plus properties: GQA
//! equals repeated K/V, a packed batch equals separate runs, top_keys equals the full softmax,
//! finite differences, the split-KV path equals the query-block path, identical bits with any
//! thread count, every ISA against scalar, and every bad input rejected naming the tensor.

mod common;

use common::attention::{Config, Data, config, draw};
use half::{bf16, f16};
use neurokernels::attention::{
    self, AttentionInputs, AttentionOut, AttentionParams, AttentionShape, BackwardTasks, Bias,
    CuSeqlens, SplitKv,
};
use neurokernels::cpu::Isa;
use neurokernels::element::Accum;
use neurokernels::{Element, Error};

fn f64s<T: Copy>(x: &[T], f: impl Fn(T) -> f64) -> Vec<f64> {
    x.iter().map(|v| f(*v)).collect()
}

/// The naive float64 attention: o, lse, the full probabilities `[B, Hq, Sq, Sk]` (0 where
/// masked or across sequences) and the gradients of sum(o·do).
struct Naive {
    o: Vec<f64>,
    lse: Vec<f64>,
    probs: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn naive<E: Element>(c: &Config, x: &Data<E>) -> Naive {
    let (q, k, v, d_o) = (
        f64s(&x.q, E::to_f64),
        f64s(&x.k, E::to_f64),
        f64s(&x.v, E::to_f64),
        f64s(&x.d_o, E::to_f64),
    );
    let slopes = f64s(&x.slopes, |s: E::Acc| s.to_f64());
    let bias = f64s(&x.bias, |s: E::Acc| s.to_f64());
    let p = &c.params;
    let scale = p.scale.unwrap_or(1.0 / (c.d as f64).sqrt());
    let g = c.hq / c.hk;
    let mut n = Naive {
        o: vec![0.0; c.b * c.sq * c.hq * c.dv],
        lse: vec![f64::NEG_INFINITY; c.b * c.hq * c.sq],
        probs: vec![0.0; c.b * c.hq * c.sq * c.sk],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; v.len()],
    };
    let qi = |b: usize, s: usize, h: usize| (b * c.sq + s) * c.hq + h;
    let ki = |b: usize, s: usize, h: usize| (b * c.sk + s) * c.hk + h;
    for (b, qs, ql, ks, kl) in c.segments() {
        for h in 0..c.hq {
            let hk = h / g;
            for i in 0..ql {
                let diag = i as i64 + kl as i64 - ql as i64;
                let mut scores = vec![f64::NEG_INFINITY; kl];
                let mut capd = vec![1.0; kl];
                for (j, sc) in scores.iter_mut().enumerate() {
                    let j64 = j as i64;
                    let seen = (!p.causal || j64 <= diag)
                        && (p.window_left < 0 || j64 >= diag - p.window_left)
                        && (p.window_right < 0 || j64 <= diag + p.window_right);
                    if !seen {
                        continue;
                    }
                    let qv = &q[qi(b, qs + i, h) * c.d..][..c.d];
                    let kv = &k[ki(b, ks + j, hk) * c.d..][..c.d];
                    let mut s = scale * qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>();
                    if p.softcap > 0.0 {
                        let t = (s / p.softcap).tanh();
                        s = p.softcap * t;
                        capd[j] = 1.0 - t * t;
                    }
                    if c.alibi {
                        s -= slopes[h] * (diag - j64).abs() as f64;
                    }
                    if let Some((bb, hb)) = c.bias {
                        let (bb_i, hb_i) =
                            (if bb == 1 { 0 } else { b }, if hb == 1 { 0 } else { h });
                        s += bias[((bb_i * hb + hb_i) * c.sq + qs + i) * c.sk + ks + j];
                    }
                    *sc = s;
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                let lse = m + sum.ln();
                n.lse[(b * c.hq + h) * c.sq + qs + i] = lse;
                let probs: Vec<f64> = scores.iter().map(|s| (s - lse).exp()).collect();
                let orow = qi(b, qs + i, h) * c.dv;
                for (j, pj) in probs.iter().enumerate() {
                    n.probs[((b * c.hq + h) * c.sq + qs + i) * c.sk + ks + j] = *pj;
                    for e in 0..c.dv {
                        n.o[orow + e] += pj * v[ki(b, ks + j, hk) * c.dv + e];
                    }
                }
                // gradients of sum(o·do)
                let dorow = &d_o[orow..orow + c.dv];
                let dp: Vec<f64> = (0..kl)
                    .map(|j| {
                        let vr = &v[ki(b, ks + j, hk) * c.dv..][..c.dv];
                        dorow.iter().zip(vr).map(|(a, b)| a * b).sum()
                    })
                    .collect();
                let delta: f64 = probs.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..kl {
                    let ds = probs[j] * (dp[j] - delta) * capd[j];
                    for e in 0..c.d {
                        n.dq[qi(b, qs + i, h) * c.d + e] +=
                            scale * ds * k[ki(b, ks + j, hk) * c.d + e];
                        n.dk[ki(b, ks + j, hk) * c.d + e] +=
                            scale * ds * q[qi(b, qs + i, h) * c.d + e];
                    }
                    for (e, g) in dorow.iter().enumerate() {
                        n.dv[ki(b, ks + j, hk) * c.dv + e] += probs[j] * g;
                    }
                }
            }
        }
    }
    n
}

fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(ok, "{what}[{i}]: got {g}, want {w}");
    }
}

/// (rtol, atol) for outputs of dtype E; gradients get a looser f32 bound (longer sums).
fn tol<E: Element>(grad: bool) -> (f64, f64) {
    match E::DTYPE {
        neurokernels::DType::F64 => (1e-10, 1e-10),
        neurokernels::DType::F32 if grad => (1e-3, 1e-4),
        neurokernels::DType::F32 => (1e-4, 1e-5),
        _ => (2e-2, 2e-2),
    }
}

/// The configurations the naive comparisons walk: every parameter, odd sizes, empty rows.
fn configs() -> Vec<Config> {
    let p = AttentionParams::new;
    vec![
        config(2, 17, 23, 2, 2, 16, 16),
        config(1, 1, 1, 1, 1, 1, 1),
        config(2, 5, 3, 3, 3, 7, 7).with(p().causal(true)), // Sq > Sk: empty rows
        config(1, 70, 131, 4, 2, 32, 24).with(p().causal(true)), // GQA, Dv < D, two key blocks
        config(1, 131, 67, 2, 1, 8, 40).with(p().causal(true).window_left(9)), // MQA, Dv > D
        config(2, 23, 17, 2, 2, 16, 16).with(p().window_left(2).window_right(1)),
        config(1, 61, 130, 2, 2, 16, 16).with(p().window_right(0).window_left(70)),
        config(2, 17, 23, 4, 2, 16, 16)
            .with(p().softcap(2.0).scale(Some(0.5)))
            .alibi()
            .bias(2, 4),
        config(2, 9, 11, 2, 2, 8, 8)
            .bias(1, 1)
            .with(p().scale(Some(-0.3))),
        config(2, 9, 11, 2, 2, 8, 8).bias(2, 1).alibi(),
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
        config(1, 3, 200, 8, 2, 64, 64).with(p().causal(true).softcap(5.0)), // decode-like
    ]
}

fn forward_vs_naive<E: Element>(isa: Isa) {
    for (n, c) in configs().iter().enumerate() {
        let x = draw::<E>(c, 100 + n as u64);
        let want = naive(c, &x);
        let what = format!("{:?} {} config {n} {c:?}", isa, E::DTYPE);
        assert_forward_close(isa, c, &x, &want, &what);
    }
}

/// The forward on `isa` against the naive o and lse, at the dtype's tolerance.
fn assert_forward_close<E: Element>(isa: Isa, c: &Config, x: &Data<E>, want: &Naive, what: &str) {
    let AttentionOut { o, lse, .. } =
        attention::forward_on(isa, &c.params, c.shape(), &x.inputs(c)).unwrap();
    let (rtol, atol) = tol::<E>(false);
    assert_close(
        &format!("o {what}"),
        &f64s(&o, E::to_f64),
        &want.o,
        rtol,
        atol,
    );
    let lse = f64s(&lse, |v: E::Acc| v.to_f64());
    assert_close(&format!("lse {what}"), &lse, &want.lse, rtol, atol);
}

#[test]
fn forward_matches_naive_float64_in_every_dtype() {
    forward_vs_naive::<f32>(Isa::active());
    forward_vs_naive::<f64>(Isa::active());
    forward_vs_naive::<f16>(Isa::active());
    forward_vs_naive::<bf16>(Isa::active());
}

fn backward_vs_naive<E: Element>(isa: Isa) {
    for (n, c) in configs().iter().enumerate() {
        let x = draw::<E>(c, 200 + n as u64);
        let want = naive(c, &x);
        let inputs = x.inputs(c);
        let AttentionOut { o, lse, .. } =
            attention::forward_on(isa, &c.params, c.shape(), &inputs).unwrap();
        let g =
            attention::backward_on(isa, &c.params, c.shape(), &inputs, &o, &x.d_o, &lse).unwrap();
        let (rtol, atol) = tol::<E>(true);
        let what = format!("{:?} {} config {n} {c:?}", isa, E::DTYPE);
        assert_close(
            &format!("dq {what}"),
            &f64s(&g.dq, E::to_f64),
            &want.dq,
            rtol,
            atol,
        );
        assert_close(
            &format!("dk {what}"),
            &f64s(&g.dk, E::to_f64),
            &want.dk,
            rtol,
            atol,
        );
        assert_close(
            &format!("dv {what}"),
            &f64s(&g.dv, E::to_f64),
            &want.dv,
            rtol,
            atol,
        );
    }
}

#[test]
fn backward_matches_naive_float64_in_every_dtype() {
    backward_vs_naive::<f32>(Isa::active());
    backward_vs_naive::<f64>(Isa::active());
    backward_vs_naive::<f16>(Isa::active());
    backward_vs_naive::<bf16>(Isa::active());
}

#[test]
fn every_isa_matches_naive() {
    for isa in Isa::available() {
        forward_vs_naive::<f32>(isa);
        backward_vs_naive::<f32>(isa);
        forward_vs_naive::<bf16>(isa);
        backward_vs_naive::<f64>(isa);
    }
}

/// Scores that rise along the keys, slowly (the running max is held: every block stays
/// within 2^8 of it) and in jumps (it moves, and the accumulator is rescaled), then fall, over
/// several key blocks; against the float64 naive on every ISA, f32 and f64.
#[test]
fn rising_and_falling_scores_keep_the_softmax_exact() {
    fn run<E: Element>(isa: Isa, slope: f64, c: &Config) {
        let mut x = draw::<E>(c, 7);
        // q = 1/D in every lane; key j scores ~ slope·f(j) plus a small ripple
        for v in x.q.iter_mut() {
            *v = E::from_f64(1.0 / c.d as f64);
        }
        let shape = (c.sk, c.hk, c.d);
        for j in 0..shape.0 {
            let rise = if j < 600 { j as f64 } else { 1200.0 - j as f64 };
            for h in 0..shape.1 {
                for e in 0..shape.2 {
                    let ripple = ((j * 7 + e * 3) % 11) as f64 * 0.01;
                    x.k[(j * shape.1 + h) * shape.2 + e] = E::from_f64(slope * rise + ripple);
                }
            }
        }
        let what = format!("{isa:?} {} slope {slope}", E::DTYPE);
        assert_forward_close(isa, c, &x, &naive(c, &x), &what);
    }
    // scale = 1/sqrt(D) = 1/4; per key the score moves by slope/4 (natural units): 0.002
    // keeps every 128-key block within 2^8 of the running max, 0.5 moves it every block
    // (up to ~75 natural units; larger slopes test f32 rounding of the scores, not the max,
    // so the steepest runs in f64)
    let c = config(1, 13, 900, 2, 1, 16, 20);
    for isa in Isa::available() {
        for slope in [0.002, 0.05, 0.5] {
            run::<f32>(isa, slope, &c);
            run::<f64>(isa, slope, &c);
        }
        // past 2^1023 over the keys: overflows unless the max moves
        run::<f64>(isa, 8.0, &c);
        let causal = config(1, 13, 900, 2, 1, 16, 20).with(AttentionParams::new().causal(true));
        run::<f32>(isa, 0.5, &causal);
    }
}

#[test]
fn every_isa_agrees_with_scalar() {
    let c = config(1, 70, 131, 4, 2, 32, 24)
        .with(AttentionParams::new().causal(true))
        .alibi();
    let x = draw::<f32>(&c, 7);
    let inputs = x.inputs(&c);
    let run = |isa| attention::forward_on(isa, &c.params, c.shape(), &inputs).unwrap();
    let AttentionOut { o: o0, lse: l0, .. } = run(Isa::Scalar);
    for isa in Isa::available() {
        let AttentionOut { o, lse: l, .. } = run(isa);
        assert_close(
            &format!("{isa:?} o"),
            &f64s(&o, f64::from),
            &f64s(&o0, f64::from),
            1e-5,
            1e-6,
        );
        assert_close(
            &format!("{isa:?} lse"),
            &f64s(&l, f64::from),
            &f64s(&l0, f64::from),
            1e-5,
            1e-6,
        );
        let keys = attention::top_keys_on(isa, &c.params, c.shape(), &inputs, 5).unwrap();
        let (w, i) = (keys.weights, keys.indices);
        let keys = attention::top_keys_on(Isa::Scalar, &c.params, c.shape(), &inputs, 5).unwrap();
        let (w0, i0) = (keys.weights, keys.indices);
        assert_eq!(i, i0, "{isa:?} top_keys indices");
        assert_close(
            &format!("{isa:?} weights"),
            &f64s(&w, f64::from),
            &f64s(&w0, f64::from),
            1e-5,
            1e-7,
        );
    }
}

fn top_keys_vs_softmax<E: Element>() {
    for (n, c) in configs().iter().enumerate() {
        let x = draw::<E>(c, 300 + n as u64);
        let want = naive(c, &x);
        for top in [1, 3, c.sk + 2] {
            let keys = attention::top_keys(&c.params, c.shape(), &x.inputs(c), top).unwrap();
            let (w, idx) = (keys.weights, keys.indices);
            let rows = c.b * c.hq * c.sq;
            assert_eq!(w.len(), rows * top);
            let (rtol, atol) = tol::<E>(false);
            for row in 0..rows {
                let probs = &want.probs[row * c.sk..(row + 1) * c.sk];
                let mut order: Vec<usize> = (0..c.sk).filter(|&j| probs[j] > 0.0).collect();
                order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
                for t in 0..top {
                    let (gw, gi) = (w[row * top + t].to_f64(), idx[row * top + t]);
                    match order.get(t) {
                        None => assert!(gw == 0.0 && gi == -1, "padding row {row} slot {t}"),
                        Some(&j) => {
                            // the index points at its probability; ranks agree up to near-ties
                            assert!(gi >= 0, "config {n} row {row} slot {t}: index {gi}");
                            let pj = probs[gi as usize];
                            assert!((gw - pj).abs() <= atol + rtol * pj, "weight of {gi}");
                            assert!(
                                (pj - probs[j]).abs() <= 1e-3 * probs[j] + 1e-6,
                                "config {n} row {row} rank {t}: key {gi} p {pj}, want {j} p {}",
                                probs[j]
                            );
                        }
                    }
                }
                for t in 1..top {
                    assert!(w[row * top + t] <= w[row * top + t - 1], "descending");
                }
            }
        }
    }
}

#[test]
fn top_keys_equal_the_full_softmax() {
    top_keys_vs_softmax::<f32>();
    top_keys_vs_softmax::<f64>();
    top_keys_vs_softmax::<bf16>();
}

#[test]
fn gqa_equals_repeated_kv() {
    let c = config(2, 19, 37, 6, 2, 16, 12).with(AttentionParams::new().causal(true));
    let x = draw::<f32>(&c, 11);
    let mut r = c.clone();
    r.hk = r.hq;
    let g = c.hq / c.hk;
    let repeat = |t: &[f32], dim: usize| -> Vec<f32> {
        let mut out = Vec::new();
        for row in t.chunks(c.hk * dim) {
            for h in 0..c.hq {
                out.extend_from_slice(&row[(h / g) * dim..(h / g + 1) * dim]);
            }
        }
        out
    };
    let xr = Data::<f32> {
        k: repeat(&x.k, c.d),
        v: repeat(&x.v, c.dv),
        q: x.q.clone(),
        d_o: x.d_o.clone(),
        slopes: x.slopes.clone(),
        bias: x.bias.clone(),
        cu: None,
    };
    let AttentionOut { o, lse, .. } =
        attention::forward(&c.params, c.shape(), &x.inputs(&c)).unwrap();
    let AttentionOut { o: or, lse: lr, .. } =
        attention::forward(&r.params, r.shape(), &xr.inputs(&r)).unwrap();
    assert_close("o", &f64s(&o, f64::from), &f64s(&or, f64::from), 1e-6, 1e-7);
    assert_close(
        "lse",
        &f64s(&lse, f64::from),
        &f64s(&lr, f64::from),
        1e-6,
        1e-7,
    );
    let gr = attention::backward(&r.params, r.shape(), &xr.inputs(&r), &or, &x.d_o, &lr).unwrap();
    let gg = attention::backward(&c.params, c.shape(), &x.inputs(&c), &o, &x.d_o, &lse).unwrap();
    assert_close(
        "dq",
        &f64s(&gg.dq, f64::from),
        &f64s(&gr.dq, f64::from),
        1e-5,
        1e-6,
    );
    // dk of a KV head = the sum over its repeated copies
    let fold = |t: &[f32], dim: usize| -> Vec<f64> {
        let mut out = vec![0.0; t.len() / g];
        for (ri, row) in t.chunks(c.hq * dim).enumerate() {
            for h in 0..c.hq {
                for e in 0..dim {
                    out[(ri * c.hk + h / g) * dim + e] += row[h * dim + e] as f64;
                }
            }
        }
        out
    };
    assert_close(
        "dk",
        &f64s(&gg.dk, f64::from),
        &fold(&gr.dk, c.d),
        1e-4,
        1e-6,
    );
    assert_close(
        "dv",
        &f64s(&gg.dv, f64::from),
        &fold(&gr.dv, c.dv),
        1e-4,
        1e-6,
    );
}

#[test]
fn packed_batch_equals_separate_runs() {
    let (lq, lk) = ([5usize, 0, 70, 1], [7usize, 4, 66, 0]);
    let c = config(1, 0, 0, 4, 2, 16, 8)
        .varlen(&lq, &lk)
        .with(AttentionParams::new().causal(true))
        .alibi();
    let x = draw::<f32>(&c, 21);
    let AttentionOut { o, lse, .. } =
        attention::forward(&c.params, c.shape(), &x.inputs(&c)).unwrap();
    let g = attention::backward(&c.params, c.shape(), &x.inputs(&c), &o, &x.d_o, &lse).unwrap();
    let (mut q0, mut k0) = (0, 0);
    for (&nq, &nk) in lq.iter().zip(&lk) {
        let one = config(1, nq, nk, 4, 2, 16, 8).with(c.params).alibi();
        let (qa, ka) = (q0 * 4 * 16, k0 * 2 * 16);
        let sub = Data::<f32> {
            q: x.q[qa..qa + nq * 4 * 16].to_vec(),
            k: x.k[ka..ka + nk * 2 * 16].to_vec(),
            v: x.v[k0 * 2 * 8..(k0 + nk) * 2 * 8].to_vec(),
            d_o: x.d_o[q0 * 4 * 8..(q0 + nq) * 4 * 8].to_vec(),
            slopes: x.slopes.clone(),
            bias: Vec::new(),
            cu: None,
        };
        let AttentionOut { o: so, lse: sl, .. } =
            attention::forward(&one.params, one.shape(), &sub.inputs(&one)).unwrap();
        let sg = attention::backward(
            &one.params,
            one.shape(),
            &sub.inputs(&one),
            &so,
            &sub.d_o,
            &sl,
        )
        .unwrap();
        assert_eq!(
            &o[q0 * 4 * 8..(q0 + nq) * 4 * 8],
            &so[..],
            "o of sequence at {q0}"
        );
        for h in 0..4 {
            assert_eq!(
                &lse[h * c.sq + q0..h * c.sq + q0 + nq],
                &sl[h * nq..(h + 1) * nq]
            );
        }
        assert_eq!(&g.dq[qa..qa + nq * 64], &sg.dq[..], "dq");
        assert_eq!(&g.dk[ka..ka + nk * 32], &sg.dk[..], "dk");
        assert_eq!(&g.dv[k0 * 16..(k0 + nk) * 16], &sg.dv[..], "dv");
        q0 += nq;
        k0 += nk;
    }
}

/// Gradients of L = sum(o·do) in f64 against central differences of the forward.
#[test]
fn finite_difference_gradients_f64() {
    let p = AttentionParams::new;
    for c in [
        config(1, 3, 4, 2, 1, 3, 2)
            .with(p().causal(true).softcap(1.5))
            .alibi()
            .bias(1, 2),
        config(1, 4, 3, 2, 2, 2, 3).with(p().window_left(1).window_right(0).scale(Some(0.7))),
        config(1, 0, 0, 2, 1, 2, 2)
            .varlen(&[2, 1], &[3, 2])
            .with(p().causal(true)),
    ] {
        let x = draw::<f64>(&c, 5);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let y = Data::<f64> {
                q: q.to_vec(),
                k: k.to_vec(),
                v: v.to_vec(),
                d_o: x.d_o.clone(),
                slopes: x.slopes.clone(),
                bias: x.bias.clone(),
                cu: x.cu.clone(),
            };
            let o = attention::forward(&c.params, c.shape(), &y.inputs(&c))
                .unwrap()
                .o;
            o.iter().zip(&x.d_o).map(|(a, b)| a * b).sum()
        };
        let AttentionOut { o, lse, .. } =
            attention::forward(&c.params, c.shape(), &x.inputs(&c)).unwrap();
        let g = attention::backward(&c.params, c.shape(), &x.inputs(&c), &o, &x.d_o, &lse).unwrap();
        let h = 1e-6;
        for which in 0..3 {
            let base = [&x.q, &x.k, &x.v][which];
            let grad = [&g.dq, &g.dk, &g.dv][which];
            for i in 0..base.len() {
                let mut plus = [x.q.clone(), x.k.clone(), x.v.clone()];
                let mut minus = plus.clone();
                plus[which][i] += h;
                minus[which][i] -= h;
                let fd = (loss(&plus[0], &plus[1], &plus[2])
                    - loss(&minus[0], &minus[1], &minus[2]))
                    / (2.0 * h);
                assert!(
                    (fd - grad[i]).abs() <= 1e-7 + 1e-6 * fd.abs(),
                    "{c:?} tensor {which} [{i}]: analytic {}, finite difference {fd}",
                    grad[i]
                );
            }
        }
    }
}

/// The split-KV decode forced on decode-like shapes, against the naive float64 forward in every
/// dtype and on every ISA: the head dims its score loop unrolls (64, 128) and others (with
/// a tail past the last vector), 1 to 4 query rows per KV head at a time, masks and terms.
fn split_kv_vs_naive<E: Element>(isa: Isa) {
    let p = || AttentionParams::new().split_kv(SplitKv::Always);
    let cases = [
        config(1, 1, 700, 8, 2, 128, 128).with(p()),
        config(2, 1, 530, 4, 1, 64, 64).with(p().causal(true)),
        config(1, 1, 300, 3, 1, 64, 40).with(p().window_left(200)),
        config(2, 1, 90, 5, 5, 33, 17).with(p()),
        config(1, 2, 515, 6, 2, 48, 48)
            .with(p().softcap(4.0).causal(true))
            .alibi()
            .bias(1, 6),
    ];
    for (n, c) in cases.iter().enumerate() {
        let x = draw::<E>(c, 400 + n as u64);
        let want = naive(c, &x);
        let what = format!("split-KV {:?} {} case {n} {c:?}", isa, E::DTYPE);
        assert_forward_close(isa, c, &x, &want, &what);
    }
}

#[test]
fn split_kv_decode_matches_naive_float64_in_every_dtype_and_isa() {
    for isa in Isa::available() {
        split_kv_vs_naive::<f32>(isa);
        split_kv_vs_naive::<f64>(isa);
        split_kv_vs_naive::<f16>(isa);
        split_kv_vs_naive::<bf16>(isa);
    }
}

#[test]
fn split_kv_decode_equals_the_query_block_path() {
    let p = AttentionParams::new;
    for c in [
        config(2, 1, 1500, 8, 2, 64, 64),
        config(1, 3, 1100, 4, 1, 40, 24)
            .with(p().causal(true).window_left(700))
            .alibi(),
        config(1, 2, 1030, 2, 2, 16, 16)
            .with(p().softcap(3.0))
            .bias(1, 2),
        config(1, 0, 0, 4, 2, 16, 16)
            .varlen(&[1, 2, 1], &[600, 0, 1300])
            .with(p().causal(true)),
    ] {
        for (n, isa) in Isa::available().into_iter().enumerate() {
            let x = draw::<f32>(&c, 31 + n as u64);
            let inputs = x.inputs(&c);
            let run = |split| {
                attention::forward_on(isa, &c.params.split_kv(split), c.shape(), &inputs).unwrap()
            };
            let AttentionOut { o: o1, lse: l1, .. } = run(SplitKv::Always);
            let AttentionOut { o: o2, lse: l2, .. } = run(SplitKv::Never);
            let AttentionOut { o: o3, lse: l3, .. } = run(SplitKv::Auto);
            assert_close(
                "o",
                &f64s(&o1, f64::from),
                &f64s(&o2, f64::from),
                1e-5,
                1e-6,
            );
            assert_close(
                "lse",
                &f64s(&l1, f64::from),
                &f64s(&l2, f64::from),
                1e-5,
                1e-6,
            );
            // Auto picks the split path for these shapes
            assert!(o3 == o1 && l3 == l1, "{c:?}");
            let want = naive(&c, &x);
            assert_close("o naive", &f64s(&o1, f64::from), &want.o, 1e-4, 1e-5);
        }
    }
}

/// The one-pass (per KV head) and two-pass (per block) backward sum the same terms in the same
/// order, so they must agree to the bit (the auto choice depends on the thread count).
fn backward_tasks_agree<E: Element>(isa: Isa) {
    for (n, c) in configs().iter().enumerate() {
        let x = draw::<E>(c, 300 + n as u64);
        let inputs = x.inputs(c);
        let AttentionOut { o, lse, .. } =
            attention::forward_on(isa, &c.params, c.shape(), &inputs).unwrap();
        let run = |tasks| {
            let params = c.params.backward_tasks(tasks);
            attention::backward_on(isa, &params, c.shape(), &inputs, &o, &x.d_o, &lse).unwrap()
        };
        let (head, block) = (run(BackwardTasks::PerHead), run(BackwardTasks::PerBlock));
        let what = format!("{isa:?} {} config {n} {c:?}", E::DTYPE);
        assert!(head.dq == block.dq, "dq differs: {what}");
        assert!(head.dk == block.dk, "dk differs: {what}");
        assert!(head.dv == block.dv, "dv differs: {what}");
    }
}

#[test]
fn backward_per_head_equals_per_block_to_the_bit() {
    for isa in Isa::available() {
        backward_tasks_agree::<f32>(isa);
    }
    backward_tasks_agree::<f64>(Isa::active());
    backward_tasks_agree::<bf16>(Isa::active());
}

#[test]
fn identical_bits_whatever_the_thread_count() {
    let c = config(2, 130, 150, 4, 2, 32, 24)
        .with(AttentionParams::new().causal(true).window_left(100))
        .alibi()
        .bias(1, 4);
    let d = config(1, 1, 3000, 8, 2, 64, 64);
    let x = draw::<f32>(&c, 41);
    let y = draw::<f32>(&d, 42);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let inputs = x.inputs(&c);
            let AttentionOut { o, lse, .. } =
                attention::forward(&c.params, c.shape(), &inputs).unwrap();
            let g = attention::backward(&c.params, c.shape(), &inputs, &o, &x.d_o, &lse).unwrap();
            let t = attention::top_keys(&c.params, c.shape(), &inputs, 7).unwrap();
            let dec = attention::forward(&d.params, d.shape(), &y.inputs(&d)).unwrap();
            (o, lse, g, t, dec)
        })
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        assert!(run(threads) == one, "{threads} threads differ from 1");
    }
}

fn err_names(result: Result<impl std::fmt::Debug, Error>, tensor: &str) {
    let e = result.expect_err("bad input accepted");
    let named = match &e {
        Error::Shape { tensor: t, .. } | Error::Overflow { tensor: t, .. } => t == tensor,
        Error::InvalidArgument { name, .. } => name == tensor,
        _ => false,
    };
    assert!(named, "error {e:?} should name `{tensor}`");
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let c = config(1, 4, 5, 4, 2, 8, 8);
    let x = draw::<f32>(&c, 1);
    let p = AttentionParams::new();
    let fwd = |shape: AttentionShape, inputs: &AttentionInputs<'_, f32>, p: &AttentionParams| {
        attention::forward(p, shape, inputs)
    };
    let good = x.inputs(&c);
    assert!(fwd(c.shape(), &good, &p).is_ok());
    // Hq not a multiple of Hk
    let s = AttentionShape::new(1, 4, 5, 3, 2, 8, 8);
    err_names(fwd(s, &good, &p), "q");
    // mismatched head dims
    err_names(
        AttentionShape::from_dims(&[1, 4, 4, 8], &[1, 5, 2, 7], Some(&[1, 5, 2, 8])),
        "k",
    );
    err_names(
        AttentionShape::from_dims(&[1, 4, 4, 8], &[1, 5, 2, 8], Some(&[1, 6, 2, 8])),
        "v",
    );
    // wrong lengths
    err_names(
        fwd(c.shape(), &AttentionInputs::new(&x.q[1..], &x.k, &x.v), &p),
        "q",
    );
    err_names(
        fwd(c.shape(), &AttentionInputs::new(&x.q, &x.k[1..], &x.v), &p),
        "k",
    );
    err_names(
        fwd(c.shape(), &AttentionInputs::new(&x.q, &x.k, &x.v[1..]), &p),
        "v",
    );
    let slopes = [0.1f32; 3];
    err_names(
        fwd(c.shape(), &good.alibi_slopes(Some(&slopes)), &p),
        "alibi_slopes",
    );
    // bias that does not broadcast / wrong length
    let bias = vec![0.0f32; 3 * 4 * 5];
    let b3 = Bias {
        data: &bias[..],
        batch: 1,
        heads: 3,
    };
    err_names(fwd(c.shape(), &good.bias(Some(b3)), &p), "bias");
    let b1 = Bias {
        data: &bias[..20],
        batch: 2,
        heads: 1,
    };
    err_names(fwd(c.shape(), &good.bias(Some(b1)), &p), "bias");
    let b1 = Bias {
        data: &bias[..19],
        batch: 1,
        heads: 1,
    };
    err_names(fwd(c.shape(), &good.bias(Some(b1)), &p), "bias");
    // cu_seqlens: decreasing, past the end, not ending at S, mismatched counts, batch > 1
    let cu = |q: &'static [i32], k: &'static [i32]| good.cu_seqlens(Some(CuSeqlens { q, k }));
    err_names(
        fwd(c.shape(), &cu(&[0, 3, 2, 4], &[0, 1, 2, 5]), &p),
        "cu_seqlens_q",
    );
    err_names(
        fwd(c.shape(), &cu(&[0, 2, 4], &[0, 6, 5]), &p),
        "cu_seqlens_k",
    );
    err_names(
        fwd(c.shape(), &cu(&[0, 2, 3], &[0, 1, 5]), &p),
        "cu_seqlens_q",
    );
    err_names(fwd(c.shape(), &cu(&[0, 4], &[0, 1, 5]), &p), "cu_seqlens_k");
    err_names(fwd(c.shape(), &cu(&[-1, 4], &[0, 5]), &p), "cu_seqlens_q");
    let c2 = config(2, 4, 5, 4, 2, 8, 8);
    let x2 = draw::<f32>(&c2, 2);
    let packed = x2.inputs(&c2).cu_seqlens(Some(CuSeqlens {
        q: &[0, 4],
        k: &[0, 5],
    }));
    err_names(fwd(c2.shape(), &packed, &p), "q");
    // params
    err_names(fwd(c.shape(), &good, &p.scale(Some(f64::NAN))), "scale");
    err_names(fwd(c.shape(), &good, &p.softcap(-1.0)), "softcap");
    err_names(fwd(c.shape(), &good, &p.softcap(f64::NAN)), "softcap");
    err_names(fwd(c.shape(), &good, &p.window_left(-2)), "window_left");
    err_names(fwd(c.shape(), &good, &p.window_right(-5)), "window_right");
    // top_keys: top 0; top > Sk is allowed (padding)
    err_names(attention::top_keys(&p, c.shape(), &good, 0), "top");
    assert!(attention::top_keys(&p, c.shape(), &good, 9).is_ok());
    // backward: o, do, lse lengths
    let AttentionOut { o, lse, .. } = attention::forward(&p, c.shape(), &good).unwrap();
    let bwd = |o: &[f32], d_o: &[f32], lse: &[f32]| {
        attention::backward(&p, c.shape(), &good, o, d_o, lse)
    };
    assert!(bwd(&o, &x.d_o, &lse).is_ok());
    err_names(bwd(&o[1..], &x.d_o, &lse), "o");
    err_names(bwd(&o, &x.d_o[1..], &lse), "do");
    err_names(bwd(&o, &x.d_o, &lse[1..]), "lse");
    // overflowing shapes
    let huge = AttentionShape::new(usize::MAX / 2, 4, 5, 4, 2, 8, 8);
    err_names(fwd(huge, &good, &p), "q");
}

#[test]
fn empty_rows_give_zeros_and_neg_inf() {
    // causal with Sq > Sk: the first Sq - Sk rows see nothing; a −inf bias row too
    let c = config(1, 6, 2, 1, 1, 4, 3)
        .with(AttentionParams::new().causal(true))
        .bias(1, 1);
    let mut x = draw::<f32>(&c, 3);
    for j in 0..2 {
        x.bias[5 * 2 + j] = f32::NEG_INFINITY; // row 5 masked by the bias alone
    }
    let AttentionOut { o, lse, .. } =
        attention::forward(&c.params, c.shape(), &x.inputs(&c)).unwrap();
    for row in [0, 1, 2, 3, 5] {
        assert_eq!(lse[row], f32::NEG_INFINITY, "row {row}");
        assert!(o[row * 3..row * 3 + 3].iter().all(|v| *v == 0.0));
    }
    assert!(lse[4].is_finite());
    let g = attention::backward(&c.params, c.shape(), &x.inputs(&c), &o, &x.d_o, &lse).unwrap();
    for row in [0, 1, 2, 3, 5] {
        assert!(g.dq[row * 4..row * 4 + 4].iter().all(|v| *v == 0.0));
    }
    let keys = attention::top_keys(&c.params, c.shape(), &x.inputs(&c), 3).unwrap();
    let (w, i) = (keys.weights, keys.indices);
    assert!(w[..12].iter().all(|v| *v == 0.0) && i[..12].iter().all(|v| *v == -1));
    // row 4 sees key 0 only: all its weight there, then padding
    assert_eq!(&i[12..15], &[0, -1, -1]);
    assert!((w[12] - 1.0).abs() < 1e-6 && w[13] == 0.0 && w[14] == 0.0);
}
