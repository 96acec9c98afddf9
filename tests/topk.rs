//! The sparse top-k family on the CPU: every op on every ISA and dtype against float64
//! references written here (dense scores, stable sorts, direct gradient formulas), the
//! edge cases of the issue (ties, k = 1, k = L, rows with fewer than k positives, L not a
//! multiple of any tile, B = 1, NaN rows), thread-count independence, finite differences
//! for the backward, and bad input.

mod common;

use common::{Rng, to_f64};
use half::{bf16, f16};
use neurokernels::cpu::Isa;
use neurokernels::topk::{
    self, BackwardInputs, EncoderInputs, Metric, RowsParams, RowsShape, SaeShape, TopK,
};
use neurokernels::{Element, Error};

/// The stable top-k of `scores` (larger first, lower index first among equals).
fn stable_topk(scores: &[f64], k: usize) -> Vec<(f64, usize)> {
    let mut order: Vec<(f64, usize)> = scores.iter().copied().zip(0..).collect();
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    order.truncate(k);
    order
}

fn pre_f64(x: &[f64], w: &[f64], b_enc: &[f64], b_dec: Option<&[f64]>, s: SaeShape) -> Vec<f64> {
    let SaeShape { batch, dm, latents } = s;
    let mut pre = vec![0.0; batch * latents];
    for b in 0..batch {
        for l in 0..latents {
            let mut acc = b_enc[l];
            for d in 0..dm {
                acc += (x[b * dm + d] - b_dec.map_or(0.0, |c| c[d])) * w[l * dm + d];
            }
            pre[b * latents + l] = acc;
        }
    }
    pre
}

/// Checks a dense top-k output against the float64 scores: sorted values within the
/// tolerance, every index pointing at its value (and distinct), values descending.
fn check_topk(
    got_v: &[f64],
    got_i: &[i32],
    scores: &[f64],
    rows: usize,
    k: usize,
    tol: f64,
    what: &str,
) {
    let n = scores.len() / rows;
    for r in 0..rows {
        let row = &scores[r * n..(r + 1) * n];
        let want = stable_topk(row, k);
        let idx = &got_i[r * k..(r + 1) * k];
        let vals = &got_v[r * k..(r + 1) * k];
        let mut seen = std::collections::HashSet::new();
        for j in 0..k {
            let i = idx[j];
            assert!(i >= 0 && (i as usize) < n, "{what}: row {r} index {i}");
            assert!(seen.insert(i), "{what}: row {r} repeats index {i}");
            let at = row[i as usize];
            assert!(
                (vals[j] - at).abs() <= tol * (1.0 + at.abs()),
                "{what}: row {r} slot {j}: value {} but index {i} holds {at}",
                vals[j]
            );
            assert!(
                (vals[j] - want[j].0).abs() <= tol * (1.0 + want[j].0.abs()),
                "{what}: row {r} slot {j}: {} vs the reference's {}",
                vals[j],
                want[j].0
            );
            if j > 0 {
                assert!(
                    vals[j] <= vals[j - 1] + tol,
                    "{what}: row {r} not descending"
                );
            }
        }
    }
}

fn tol_of<E: Element>() -> f64 {
    match E::DTYPE {
        neurokernels::DType::F64 => 1e-10,
        neurokernels::DType::F32 => 2e-5,
        _ => 2e-2,
    }
}

#[test]
fn rows_matches_stable_sort_on_every_isa_and_dtype() {
    fn run<E: Element>(isa: Isa, r: usize, n: usize, k: usize, largest: bool, ties: bool) {
        let mut rng = Rng::new((r * 131 + n * 7 + k) as u64);
        let x: Vec<E> = if ties {
            (0..r * n)
                .map(|_| E::from_f64((rng.uniform(0.0, 10.0)).floor()))
                .collect()
        } else {
            rng.vec(r * n, -3.0, 3.0)
        };
        let xf = to_f64(&x);
        let sel = topk::rows_on(
            isa,
            &RowsParams::new().largest(largest),
            RowsShape::new(r, n),
            k,
            &x,
        )
        .unwrap();
        let (v, i) = (sel.values, sel.indices);
        let sign = if largest { 1.0 } else { -1.0 };
        let signed: Vec<f64> = xf.iter().map(|v| v * sign).collect();
        let gv: Vec<f64> = to_f64(&v).iter().map(|v| v * sign).collect();
        check_topk(
            &gv,
            &i,
            &signed,
            r,
            k,
            0.0,
            &format!("{isa:?} {r}x{n} k{k}"),
        );
        if ties {
            // exact ties: the lower index first
            for row in 0..r {
                let want = stable_topk(&signed[row * n..(row + 1) * n], k);
                let got: Vec<usize> = i[row * k..(row + 1) * k]
                    .iter()
                    .map(|&i| i as usize)
                    .collect();
                assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>());
            }
        }
    }
    for isa in Isa::available() {
        for &(r, n, k) in &[
            (1, 1, 1),
            (3, 37, 5),
            (2, 100, 100),
            (5, 1003, 50),
            (1, 70_000, 64),
            (4, 40, 7),
        ] {
            for largest in [true, false] {
                run::<f32>(isa, r, n, k, largest, false);
                run::<f32>(isa, r, n, k, largest, true);
                run::<f64>(isa, r, n, k, largest, false);
                run::<f16>(isa, r, n, k, largest, true);
                run::<bf16>(isa, r, n, k, largest, false);
            }
        }
    }
}

#[test]
fn rows_ranks_nan_first_and_neg_inf_last() {
    let x = [
        1.0f32,
        f32::NAN,
        -f32::INFINITY,
        3.0,
        f32::NAN,
        -f32::INFINITY,
    ];
    for isa in Isa::available() {
        let sel = topk::rows_on(isa, &RowsParams::new(), RowsShape::new(1, 6), 4, &x).unwrap();
        let (v, i) = (sel.values, sel.indices);
        assert!(v[0].is_nan() && v[1].is_nan(), "{isa:?}: {v:?}");
        assert_eq!(&i[..], &[1, 4, 3, 0]);
        let sel = topk::rows_on(
            isa,
            &RowsParams::new().largest(false),
            RowsShape::new(1, 6),
            4,
            &x,
        )
        .unwrap();
        let (v, i) = (sel.values, sel.indices);
        assert_eq!(&i[..], &[2, 5, 0, 3], "{isa:?}: {v:?}");
    }
}

struct Sae<E> {
    s: SaeShape,
    x: Vec<E>,
    w_enc: Vec<E>,
    b_enc: Vec<E>,
    b_dec: Vec<E>,
}

fn sae<E: Element>(s: SaeShape, seed: u64, bias: f64) -> Sae<E> {
    let mut rng = Rng::new(seed);
    let scale = 1.0 / (s.dm.max(1) as f64).sqrt();
    Sae {
        s,
        x: rng.vec(s.batch * s.dm, -1.5, 1.5),
        w_enc: rng.vec(s.latents * s.dm, -1.7 * scale, 1.7 * scale),
        b_enc: rng.vec(s.latents, bias - 0.1, bias + 0.1),
        b_dec: rng.vec(s.dm, -0.1, 0.1),
    }
}

impl<E: Element> Sae<E> {
    fn inputs(&self, with_b_dec: bool) -> EncoderInputs<'_, E> {
        EncoderInputs {
            x: &self.x,
            w_enc: &self.w_enc,
            b_enc: &self.b_enc,
            b_dec: with_b_dec.then_some(&self.b_dec[..]),
        }
    }
    fn pre(&self, with_b_dec: bool) -> Vec<f64> {
        let b_dec = to_f64(&self.b_dec);
        pre_f64(
            &to_f64(&self.x),
            &to_f64(&self.w_enc),
            &to_f64(&self.b_enc),
            with_b_dec.then_some(&b_dec[..]),
            self.s,
        )
    }
}

const SHAPES: &[(usize, usize, usize, usize)] = &[
    // (B, Dm, L, k): B = 1, k = 1, k = L, L not a multiple of 6, 12 or 512, Dm odd, many rows
    (1, 8, 20, 1),
    (3, 16, 37, 37),
    (5, 13, 257, 16),
    (17, 32, 1031, 8),
    (70, 24, 600, 32),
    (300, 8, 50, 4),
    // large enough for the AMX screening where the CPU has it (B >= 64, L >= 1024, k <= L/8)
    (96, 40, 2053, 8),
    // Dm = 0: every score is its latent's bias
    (3, 0, 13, 2),
    // Dm so large that the rows are packed in several groups (of 192 f32 / 96 f64 rows)
    (250, 40_000, 13, 3),
];

#[test]
fn encode_matches_dense_reference_on_every_isa_and_dtype() {
    fn run<E: Element>(isa: Isa, &(b, dm, l, k): &(usize, usize, usize, usize), bias: f64) {
        let d = sae::<E>(SaeShape::new(b, dm, l), (b * dm * l) as u64, bias);
        for with_b_dec in [false, true] {
            let sel = topk::encode_on(isa, d.s, k, &d.inputs(with_b_dec)).unwrap();
            let (v, i) = (sel.values, sel.indices);
            let relu: Vec<f64> = d.pre(with_b_dec).iter().map(|p| p.max(0.0)).collect();
            let what = format!("{isa:?} {:?} {b}x{dm}x{l} k{k} bias {bias}", E::DTYPE);
            check_topk(&to_f64(&v), &i, &relu, b, k, tol_of::<E>(), &what);
            // zeros sit at the lowest latents whose pre-activation is not positive
            if E::DTYPE == neurokernels::DType::F64 {
                for r in 0..b {
                    let want = stable_topk(&relu[r * l..(r + 1) * l], k);
                    let got: Vec<usize> =
                        i[r * k..(r + 1) * k].iter().map(|&i| i as usize).collect();
                    assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>(), "{what}");
                }
            }
        }
    }
    for isa in Isa::available() {
        for shape in SHAPES {
            for bias in [0.0, -2.0] {
                run::<f64>(isa, shape, bias);
                run::<f32>(isa, shape, bias);
            }
            run::<bf16>(isa, shape, 0.0);
            run::<f16>(isa, shape, 0.0);
        }
    }
}

#[test]
fn encode_does_not_depend_on_the_thread_count() {
    let d = sae::<f32>(SaeShape::new(300, 48, 3000), 7, 0.0);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                (
                    topk::encode(d.s, 24, &d.inputs(true)).unwrap(),
                    topk::encode_batch_topk(d.s, 5, &d.inputs(true)).unwrap(),
                    topk::nearest(Metric::L2, d.s, 3, &d.x, &d.w_enc).unwrap(),
                )
            })
    };
    let one = run(1);
    for threads in [2, 3, 8] {
        assert!(run(threads) == one, "{threads} threads differ from one");
    }
}

#[test]
fn encode_of_a_nan_row_returns_nan_values_and_leaves_other_rows_alone() {
    let mut d = sae::<f32>(SaeShape::new(3, 16, 100), 3, 0.0);
    for v in &mut d.x[16..32] {
        *v = f32::NAN;
    }
    let sel = topk::encode(d.s, 4, &d.inputs(false)).unwrap();
    let (v, i) = (sel.values, sel.indices);
    assert!(v[4..8].iter().all(|v| v.is_nan()));
    assert_eq!(&i[4..8], &[0, 1, 2, 3]);
    let relu: Vec<f64> = d.pre(false).iter().map(|p| p.max(0.0)).collect();
    check_topk(&to_f64(&v[..4]), &i[..4], &relu[..100], 1, 4, 2e-5, "row 0");
    check_topk(&to_f64(&v[8..]), &i[8..], &relu[200..], 1, 4, 2e-5, "row 2");
    // CSR encoders never keep a NaN
    let c = topk::encode_batch_topk(d.s, 4, &d.inputs(false)).unwrap();
    assert!(c.values.iter().all(|v| !v.is_nan()));
    assert_eq!(c.indptr[1], c.indptr[2]);
}

#[test]
fn batch_topk_looks_past_nan_pre_activations() {
    // rows whose first lists (their best m = 2k, NaN ranking first) hold NaN: NaN is never
    // kept, so winners lie past those lists and the rows must be encoded again (an all-NaN
    // list used to end its row empty)
    let (b, dm, l) = (2, 3, 6);
    let x = vec![0.0f32; b * dm];
    let w_enc = vec![0.0f32; l * dm];
    let nan = f32::NAN;
    for (k, b_enc) in [
        (1, [nan, nan, 5.0, 3.0, 4.0, 1.0]),
        (2, [nan, 2.0, nan, 7.0, 1.0, 6.0]),
    ] {
        // x = 0: every row's pre-activations are b_enc; the B·k best positives by (value,
        // row, latent), listed row by row, descending
        let mut best: Vec<(usize, u32, f32)> = (0..b)
            .flat_map(|r| (0..l).map(move |i| (r, i as u32, b_enc[i])))
            .filter(|e| e.2 > 0.0)
            .collect();
        best.sort_by(|p, q| q.2.total_cmp(&p.2).then((p.0, p.1).cmp(&(q.0, q.1))));
        best.truncate(b * k);
        best.sort_by(|p, q| p.0.cmp(&q.0).then(q.2.total_cmp(&p.2)).then(p.1.cmp(&q.1)));
        let inputs = EncoderInputs {
            x: &x,
            w_enc: &w_enc,
            b_enc: &b_enc,
            b_dec: None,
        };
        for isa in Isa::available() {
            let c = topk::encode_batch_topk_on(isa, SaeShape::new(b, dm, l), k, &inputs).unwrap();
            let got: Vec<(usize, u32, f32)> = (0..b)
                .flat_map(|r| {
                    let span = c.indptr[r] as usize..c.indptr[r + 1] as usize;
                    span.map(move |at| (r, at))
                })
                .map(|(r, at)| (r, c.indices[at] as u32, c.values[at]))
                .collect();
            assert_eq!(got, best, "{isa:?} k {k}");
        }
    }
}

/// Dense float64 batch top-k: the B·k best of relu(pre) by (value, flat index), positives only.
fn batch_topk_f64(pre: &[f64], b: usize, l: usize, k: usize) -> Vec<Vec<(f64, usize)>> {
    let relu: Vec<f64> = pre.iter().map(|p| p.max(0.0)).collect();
    let kept = stable_topk(&relu, b * k);
    let mut rows = vec![Vec::new(); b];
    for (v, flat) in kept {
        if v > 0.0 {
            rows[flat / l].push((v, flat % l));
        }
    }
    for r in &mut rows {
        r.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }
    rows
}

#[test]
fn batch_topk_and_jumprelu_match_dense_references() {
    fn run<E: Element>(isa: Isa, &(b, dm, l, k): &(usize, usize, usize, usize)) {
        for bias in [0.0, -0.6, -3.0] {
            let d = sae::<f64>(SaeShape::new(b, dm, l), (b + l) as u64, bias);
            let d = Sae::<E> {
                s: d.s,
                x: d.x.iter().map(|v| E::from_f64(*v)).collect(),
                w_enc: d.w_enc.iter().map(|v| E::from_f64(*v)).collect(),
                b_enc: d.b_enc.iter().map(|v| E::from_f64(*v)).collect(),
                b_dec: d.b_dec.iter().map(|v| E::from_f64(*v)).collect(),
            };
            let pre = d.pre(true);
            let what = format!("{isa:?} {:?} {b}x{dm}x{l} k{k} bias {bias}", E::DTYPE);
            let c = topk::encode_batch_topk_on(isa, d.s, k, &d.inputs(true)).unwrap();
            let want = batch_topk_f64(&pre, b, l, k);
            assert_eq!(c.indptr.len(), b + 1);
            for r in 0..b {
                let span = c.indptr[r] as usize..c.indptr[r + 1] as usize;
                let got: Vec<(f64, usize)> = c.values[span.clone()]
                    .iter()
                    .zip(&c.indices[span])
                    .map(|(v, i)| (v.to_f64(), *i as usize))
                    .collect();
                if E::DTYPE == neurokernels::DType::F64 {
                    assert_eq!(got.len(), want[r].len(), "{what}: row {r} count");
                    for (g, w) in got.iter().zip(&want[r]) {
                        assert_eq!(g.1, w.1, "{what}: row {r}");
                        assert!((g.0 - w.0).abs() <= 1e-9 * (1.0 + w.0.abs()), "{what}");
                    }
                } else {
                    // rounding may flip near-ties: check by meaning
                    for g in &got {
                        let at = pre[r * l + g.1];
                        assert!(
                            g.0 > 0.0 && (g.0 - at).abs() <= 1e-4 * (1.0 + at.abs()),
                            "{what}"
                        );
                    }
                }
            }
            let kept: usize = c.indptr[b] as usize;
            let positives = pre.iter().filter(|p| **p > 1e-4).count();
            assert!(
                kept <= b * k && kept >= positives.min(b * k) - positives.min(b * k) / 50,
                "{what}"
            );
            // jumprelu: thresholds spread over the pre-activations
            let theta: Vec<E> = (0..l)
                .map(|j| E::from_f64(0.1 + 0.4 * ((j * 7) % 5) as f64 / 5.0))
                .collect();
            let c = topk::encode_jumprelu_on(isa, d.s, &d.inputs(true), &theta).unwrap();
            if E::DTYPE != neurokernels::DType::F64 {
                continue;
            }
            for r in 0..b {
                let mut want: Vec<(f64, usize)> = (0..l)
                    .filter(|&j| pre[r * l + j] > theta[j].to_f64())
                    .map(|j| (pre[r * l + j], j))
                    .collect();
                want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let span = c.indptr[r] as usize..c.indptr[r + 1] as usize;
                let got: Vec<usize> = c.indices[span].iter().map(|&i| i as usize).collect();
                assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>(), "{what}");
            }
        }
    }
    for isa in Isa::available() {
        for shape in SHAPES {
            run::<f64>(isa, shape);
        }
    }
    // other dtypes: f64 inputs rounded, compared through the same f64 reference
    run::<f32>(Isa::active(), &(40, 16, 300, 6));
}

#[test]
fn decode_and_backward_match_direct_formulas() {
    fn run<E: Element>(isa: Isa, b: usize, dm: usize, l: usize, k: usize, repeats: bool) {
        let mut rng = Rng::new((b * 31 + dm + l) as u64);
        let d = sae::<E>(SaeShape::new(b, dm, l), (b * 3 + l) as u64, 0.0);
        let w_dec: Vec<E> = rng.vec(l * dm, -0.5, 0.5);
        let indices: Vec<i32> = (0..b * k)
            .map(|j| {
                if repeats {
                    (rng.next_u64() % 3) as i32
                } else {
                    ((j % k) * (l / k) + (rng.next_u64() as usize % (l / k))) as i32
                }
            })
            .collect();
        let values: Vec<E> = (0..b * k)
            .map(|j| {
                E::from_f64(if j % 4 == 3 {
                    0.0
                } else {
                    rng.uniform(0.0, 2.0)
                })
            })
            .collect();
        let d_xhat: Vec<E> = rng.vec(b * dm, -1.0, 1.0);
        let (x, we, wd, v, g, bd) = (
            to_f64(&d.x),
            to_f64(&d.w_enc),
            to_f64(&w_dec),
            to_f64(&values),
            to_f64(&d_xhat),
            to_f64(&d.b_dec),
        );
        let what = format!("{isa:?} {:?} b{b} dm{dm} l{l} k{k}", E::DTYPE);
        let tol = tol_of::<E>() * 5.0;
        let close = |got: &[E], want: &[f64], name: &str| {
            assert_eq!(got.len(), want.len(), "{what}: {name}");
            for (j, (g, w)) in to_f64(got).iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= tol * (1.0 + w.abs()),
                    "{what}: {name}[{j}] {g} vs {w}"
                );
            }
        };
        // decode
        let x_hat =
            topk::decode_on(isa, d.s, k, &indices, &values, &w_dec, Some(&d.b_dec)).unwrap();
        let mut want = vec![0.0; b * dm];
        for r in 0..b {
            for c in 0..dm {
                want[r * dm + c] = bd[c]
                    + (0..k)
                        .map(|j| v[r * k + j] * wd[indices[r * k + j] as usize * dm + c])
                        .sum::<f64>();
            }
        }
        close(&x_hat, &want, "x_hat");
        // backward
        let grads = topk::backward_on(
            isa,
            d.s,
            k,
            &BackwardInputs {
                x: &d.x,
                w_enc: &d.w_enc,
                b_enc: &d.b_enc,
                b_dec: Some(&d.b_dec),
                w_dec: &w_dec,
                indices: &indices,
                values: &values,
                d_xhat: &d_xhat,
            },
        )
        .unwrap();
        let (mut dwd, mut dwe, mut dbe, mut dx) = (
            vec![0.0; l * dm],
            vec![0.0; l * dm],
            vec![0.0; l],
            vec![0.0; b * dm],
        );
        for r in 0..b {
            for j in 0..k {
                let li = indices[r * k + j] as usize;
                let dp = if v[r * k + j] > 0.0 {
                    (0..dm)
                        .map(|c| g[r * dm + c] * wd[li * dm + c])
                        .sum::<f64>()
                } else {
                    0.0
                };
                dbe[li] += dp;
                for c in 0..dm {
                    dwd[li * dm + c] += v[r * k + j] * g[r * dm + c];
                    dwe[li * dm + c] += dp * (x[r * dm + c] - bd[c]);
                    dx[r * dm + c] += dp * we[li * dm + c];
                }
            }
        }
        let dbd: Vec<f64> = (0..dm)
            .map(|c| (0..b).map(|r| g[r * dm + c] - dx[r * dm + c]).sum())
            .collect();
        close(&grads.dw_dec, &dwd, "dw_dec");
        close(&grads.dw_enc, &dwe, "dw_enc");
        close(&grads.db_enc, &dbe, "db_enc");
        close(&grads.dx, &dx, "dx");
        close(&grads.db_dec, &dbd, "db_dec");
    }
    for isa in Isa::available() {
        for repeats in [false, true] {
            run::<f64>(isa, 1, 8, 20, 1, repeats);
            run::<f64>(isa, 7, 33, 100, 6, repeats);
            run::<f32>(isa, 12, 40, 64, 8, repeats);
            run::<bf16>(isa, 5, 17, 30, 3, repeats);
            run::<f16>(isa, 5, 17, 30, 3, repeats);
            // B·k >= 2L (latent order where w_dec exceeds the last-level cache; that path is
            // unit-tested directly in sparse.rs)
            run::<f32>(isa, 40, 40, 30, 4, repeats);
            run::<bf16>(isa, 20, 17, 30, 3, repeats);
        }
    }
}

/// The loss sum(decode(encode-derived values)·d_xhat) as a function of every input, to
/// check the backward by central differences in f64 (selection held fixed).
#[test]
fn backward_matches_finite_differences() {
    let (b, dm, l, k) = (3, 5, 9, 3);
    let s = SaeShape::new(b, dm, l);
    let d = sae::<f64>(s, 11, 0.3);
    let mut rng = Rng::new(5);
    let w_dec: Vec<f64> = rng.vec(l * dm, -0.5, 0.5);
    let d_xhat: Vec<f64> = rng.vec(b * dm, -1.0, 1.0);
    let indices = topk::encode(s, k, &d.inputs(true)).unwrap().indices;
    let loss = |x: &[f64], we: &[f64], be: &[f64], bd: &[f64], wd: &[f64]| -> f64 {
        let pre = pre_f64(x, we, be, Some(bd), s);
        let mut total = 0.0;
        for r in 0..b {
            for c in 0..dm {
                let mut xh = bd[c];
                for j in 0..k {
                    let li = indices[r * k + j] as usize;
                    xh += pre[r * l + li].max(0.0) * wd[li * dm + c];
                }
                total += xh * d_xhat[r * dm + c];
            }
        }
        total
    };
    let values: Vec<f64> = (0..b * k)
        .map(|j| {
            let pre = pre_f64(&d.x, &d.w_enc, &d.b_enc, Some(&d.b_dec), s);
            pre[(j / k) * l + indices[j] as usize].max(0.0)
        })
        .collect();
    let g = topk::backward(
        s,
        k,
        &BackwardInputs {
            x: &d.x,
            w_enc: &d.w_enc,
            b_enc: &d.b_enc,
            b_dec: Some(&d.b_dec),
            w_dec: &w_dec,
            indices: &indices,
            values: &values,
            d_xhat: &d_xhat,
        },
    )
    .unwrap();
    let h = 1e-6;
    let inputs = [
        ("x", d.x.clone(), &g.dx),
        ("w_enc", d.w_enc.clone(), &g.dw_enc),
        ("b_enc", d.b_enc.clone(), &g.db_enc),
        ("b_dec", d.b_dec.clone(), &g.db_dec),
        ("w_dec", w_dec.clone(), &g.dw_dec),
    ];
    for (which, (name, base, grad)) in inputs.iter().enumerate() {
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut all = [
                    d.x.clone(),
                    d.w_enc.clone(),
                    d.b_enc.clone(),
                    d.b_dec.clone(),
                    w_dec.clone(),
                ];
                all[which][i] += delta;
                loss(&all[0], &all[1], &all[2], &all[3], &all[4])
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{name}[{i}]: finite difference {fd}, backward {}",
                grad[i]
            );
            let _ = base;
        }
    }
}

#[test]
fn matching_pursuit_and_codebook_match_references() {
    let (b, dm, l, k) = (6, 12, 70, 5);
    let mut rng = Rng::new(9);
    let mut atoms: Vec<f64> = rng.vec(l * dm, -1.0, 1.0);
    for a in atoms.chunks_mut(dm) {
        let n = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        a.iter_mut().for_each(|v| *v /= n);
    }
    let x: Vec<f64> = rng.vec(b * dm, -1.0, 1.0);
    let b_dec: Vec<f64> = rng.vec(dm, -0.1, 0.1);
    let s = SaeShape::new(b, dm, l);
    for isa in Isa::available() {
        let mp = topk::encode_mp_on(isa, s, k, &x, &atoms, Some(&b_dec)).unwrap();
        for r in 0..b {
            let mut res: Vec<f64> = (0..dm).map(|c| x[r * dm + c] - b_dec[c]).collect();
            for step in 0..k {
                let dots: Vec<f64> = (0..l)
                    .map(|a| (0..dm).map(|c| res[c] * atoms[a * dm + c]).sum())
                    .collect();
                let (c, j) = stable_topk(&dots, 1)[0];
                assert_eq!(
                    mp.indices[r * k + step] as usize,
                    j,
                    "{isa:?} row {r} step {step}"
                );
                assert!((mp.values[r * k + step] - c).abs() < 1e-10);
                for (i, v) in res.iter_mut().enumerate() {
                    *v -= c * atoms[j * dm + i];
                }
            }
            for (got, want) in mp.residual[r * dm..(r + 1) * dm].iter().zip(&res) {
                assert!((got - want).abs() < 1e-10);
            }
        }
        for metric in [Metric::Dot, Metric::Cosine, Metric::L2] {
            let sel = topk::nearest_on(isa, metric, s, 4, &x, &atoms).unwrap();
            let (scores, idx) = (sel.values, sel.indices);
            let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
            let table: Vec<f64> = (0..b * l)
                .map(|f| {
                    let (xr, cr) = (
                        &x[(f / l) * dm..(f / l + 1) * dm],
                        &atoms[(f % l) * dm..(f % l + 1) * dm],
                    );
                    let dot: f64 = xr.iter().zip(cr).map(|(a, c)| a * c).sum();
                    match metric {
                        Metric::Dot => dot,
                        Metric::Cosine => dot / (norm(xr) * norm(cr)),
                        Metric::L2 => -xr
                            .iter()
                            .zip(cr)
                            .map(|(a, c)| (a - c) * (a - c))
                            .sum::<f64>(),
                    }
                })
                .collect();
            let signed: Vec<f64> = match metric {
                Metric::L2 => scores.iter().map(|v| -v).collect(),
                _ => scores.clone(),
            };
            check_topk(
                &signed,
                &idx,
                &table,
                b,
                4,
                1e-9,
                &format!("{isa:?} {metric:?}"),
            );
        }
    }
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let d = sae::<f32>(SaeShape::new(4, 8, 20), 1, 0.0);
    let names = |r: Result<TopK<f32>, Error>, want: &str| {
        let e = r.expect_err(want).to_string();
        assert!(e.contains(want), "{e:?} should name {want}");
    };
    names(topk::encode(d.s, 0, &d.inputs(false)), "k");
    names(topk::encode(d.s, 21, &d.inputs(false)), "k");
    names(
        topk::rows(&RowsParams::new(), RowsShape::new(4, 40), 3, &d.x),
        "x",
    );
    names(
        topk::rows(&RowsParams::new(), RowsShape::new(4, 8), 0, &d.x),
        "k",
    );
    let short = EncoderInputs {
        b_enc: &d.b_enc[..19],
        ..d.inputs(false)
    };
    names(topk::encode(d.s, 2, &short), "b_enc");
    let bad_dec = EncoderInputs {
        b_dec: Some(&d.b_dec[..7]),
        ..d.inputs(false)
    };
    names(topk::encode(d.s, 2, &bad_dec), "b_dec");
    names(
        topk::nearest(Metric::Dot, d.s, 2, &d.x, &d.w_enc[..100]),
        "codebook",
    );
    assert!(
        Metric::parse("cos")
            .unwrap_err()
            .to_string()
            .contains("metric")
    );
    let e = topk::encode_jumprelu(d.s, &d.inputs(false), &[f32::NAN; 20]).unwrap_err();
    assert!(e.to_string().contains("threshold"));
    let e = topk::encode_batch_topk(d.s, 0, &d.inputs(false)).unwrap_err();
    assert!(e.to_string().contains("k"));
    let w_dec = d.w_enc.clone();
    let values = vec![1.0f32; 8];
    for bad in [-1, 20] {
        let indices = vec![0, 1, bad, 3, 4, 5, 6, 7];
        let e = topk::decode(d.s, 2, &indices, &values, &w_dec, None).unwrap_err();
        assert!(e.to_string().contains("indices"), "{e}");
        let grads = topk::backward(
            d.s,
            2,
            &BackwardInputs {
                x: &d.x,
                w_enc: &d.w_enc,
                b_enc: &d.b_enc,
                b_dec: None,
                w_dec: &w_dec,
                indices: &indices,
                values: &values,
                d_xhat: &d.x,
            },
        );
        assert!(grads.unwrap_err().to_string().contains("indices"));
    }
    let e = topk::decode(d.s, 2, &[0; 8], &values[..7], &w_dec, None).unwrap_err();
    assert!(e.to_string().contains("values"));
    let e = topk::encode_mp(d.s, 0, &d.x, &w_dec, None).unwrap_err();
    assert!(e.to_string().contains("k"));
    // empty batch: empty outputs, no error
    let empty = SaeShape::new(0, 8, 20);
    let sel = topk::encode(
        empty,
        3,
        &EncoderInputs {
            x: &[],
            ..d.inputs(false)
        },
    )
    .unwrap();
    let (v, i) = (sel.values, sel.indices);
    assert!(v.is_empty() && i.is_empty());
}

/// Dm = 0 is a valid (empty) model dimension: the decoder-side ops and the codebook return
/// without panicking (the encoder's case is in `SHAPES`).
#[test]
fn a_zero_model_dimension_does_not_panic() {
    let s = SaeShape::new(3, 0, 5);
    let (k, indices, values) = (2, vec![0i32, 4, 1, 2, 3, 3], vec![1.0f32; 6]);
    for isa in Isa::available() {
        let x_hat = topk::decode_on(isa, s, k, &indices, &values, &[], None).unwrap();
        assert!(x_hat.is_empty(), "{isa:?}");
        for metric in [Metric::Dot, Metric::Cosine, Metric::L2] {
            let sel = topk::nearest_on::<f32>(isa, metric, s, k, &[], &[]).unwrap();
            let (v, i) = (sel.values, sel.indices);
            assert_eq!((v.len(), i.len()), (6, 6), "{isa:?} {metric:?}");
        }
    }
    let mp = topk::encode_mp(s, k, &[] as &[f32], &[], None).unwrap();
    assert_eq!((mp.values.len(), mp.indices.len()), (6, 6));
    assert!(mp.residual.is_empty());
}
