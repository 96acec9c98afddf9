//! The `ndarray` API (`neurokernels::nd`, feature `ndarray`): every op gives bit-identical
//! results to the slice API on the same data, a wrong layout is an `Err` naming the tensor
//! with both shapes, and a non-contiguous view gives the same result as its contiguous copy.

mod common;

use common::Rng;
use half::bf16;
use ndarray::{Array, ArrayD, ArrayViewD, Axis, Dimension, IxDyn, Slice, s};
use neurokernels::attention::{self, AttentionParams, AttentionShape, Bias, CuSeqlens};
use neurokernels::nd::{self, ndarray};
use neurokernels::ridge::{self, BatchedShape, CvParams, RidgeShape};
use neurokernels::scan::gla::{self, GlaParams, GlaShape};
use neurokernels::scan::selective::{self, SelectiveParams, SelectiveShape};
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::topk::{self, Metric, RowsParams, RowsShape, SaeShape};
use neurokernels::{Element, Error};
use std::fmt::Debug;

/// An array of `shape` holding `data` (row-major).
fn arr<T>(shape: &[usize], data: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), data).unwrap()
}

/// `got` has dims `shape` and the same bits as `want`, in standard layout.
#[track_caller]
fn same<T: Copy + Into<f64> + Debug, D: Dimension>(got: &Array<T, D>, shape: &[usize], want: &[T]) {
    assert_eq!(got.shape(), shape);
    let got = got.as_slice().expect("outputs are in standard layout");
    let bits = |x: &[T]| -> Vec<u64> { x.iter().map(|v| (*v).into().to_bits()).collect() };
    assert_eq!(bits(got), bits(want), "{got:?} != {want:?}");
}

/// The error is `Error::Shape` for `tensor`, and its message shows `expected` and `got`.
#[track_caller]
fn shape_err<T: Debug>(r: Result<T, Error>, tensor: &str, expected: &str, got: &str) {
    let err = r.expect_err("a wrong layout must be an error");
    let msg = err.to_string();
    match &err {
        Error::Shape { tensor: t, .. } => assert_eq!(t, tensor, "{msg}"),
        other => panic!("not a shape error: {other:?}"),
    }
    assert!(msg.contains(expected), "{msg} lacks {expected}");
    assert!(msg.contains(&format!("got {got}")), "{msg} lacks {got}");
}

/// A standard-layout copy of a view.
fn copy<T: Clone>(v: ArrayViewD<'_, T>) -> ArrayD<T> {
    v.as_standard_layout().into_owned()
}

fn rand<E: Element>(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> ArrayD<E> {
    arr(shape, rng.vec(shape.iter().product(), lo, hi))
}

/// As [`rand`], in the accumulator type.
fn rand_acc<E: Element>(rng: &mut Rng, shape: &[usize], lo: f64, hi: f64) -> ArrayD<E::Acc> {
    rand::<E>(rng, shape, lo, hi).mapv(|x| x.to_acc())
}

fn flat<T: Clone>(a: &ArrayD<T>) -> &[T] {
    a.as_slice().unwrap()
}

// ---------------------------------------------------------------------------------------
// scan

fn check_linear<E: Element + Into<f64>>(seed: u64) {
    let mut rng = Rng::new(seed);
    let (b_, t, d) = (2, 7, 5);
    let sh = ScanShape::new(b_, t, d);
    let a = rand::<E>(&mut rng, &[b_, t, d], 0.2, 1.0);
    let b = rand::<E>(&mut rng, &[b_, t, d], -1.0, 1.0);
    let h0 = rand::<E>(&mut rng, &[b_, d], -1.0, 1.0);
    let dh = rand::<E>(&mut rng, &[b_, t, d], -1.0, 1.0);
    for params in [ScanParams::new(), ScanParams::new().reverse(true)] {
        let want = scan::linear(&params, sh, flat(&a), flat(&b), Some(flat(&h0))).unwrap();
        let h = nd::scan::linear(&params, a.view(), b.view(), Some(h0.view())).unwrap();
        same(&h, &[b_, t, d], &want);
        let want = scan::linear_backward(&params, sh, flat(&a), &want, flat(&dh), None).unwrap();
        let hd = h.view().into_dyn();
        let g = nd::scan::linear_backward(&params, a.view(), hd, dh.view(), None).unwrap();
        same(&g.da, &[b_, t, d], &want.da);
        same(&g.db, &[b_, t, d], &want.db);
        same(&g.dh0, &[b_, d], &want.dh0);
    }
}

#[test]
fn scan_linear_matches_slices() {
    check_linear::<f32>(1);
    check_linear::<f64>(2);
    check_linear::<bf16>(3);
}

#[test]
fn scan_linear_complex_matches_slices() {
    let mut rng = Rng::new(4);
    let (b_, t, d) = (2, 6, 3);
    let sh = ScanShape::new(b_, t, d);
    let a = rand::<f32>(&mut rng, &[b_, t, d, 2], -0.7, 0.7);
    let b = rand::<f32>(&mut rng, &[b_, t, d, 2], -1.0, 1.0);
    let h0 = rand::<f32>(&mut rng, &[b_, d, 2], -1.0, 1.0);
    let dh = rand::<f32>(&mut rng, &[b_, t, d, 2], -1.0, 1.0);
    let p = ScanParams::new();
    let want = scan::linear_complex(&p, sh, flat(&a), flat(&b), Some(flat(&h0))).unwrap();
    let h = nd::scan::linear_complex(&p, a.view(), b.view(), Some(h0.view())).unwrap();
    same(&h, &[b_, t, d, 2], &want);
    let wg =
        scan::linear_complex_backward(&p, sh, flat(&a), &want, flat(&dh), Some(flat(&h0))).unwrap();
    let hd = h.view().into_dyn();
    let g =
        nd::scan::linear_complex_backward(&p, a.view(), hd, dh.view(), Some(h0.view())).unwrap();
    same(&g.da, &[b_, t, d, 2], &wg.da);
    same(&g.db, &[b_, t, d, 2], &wg.db);
    same(&g.dh0, &[b_, d, 2], &wg.dh0);

    // the trailing axis must be 2
    let a3 = rand::<f32>(&mut rng, &[b_, t, d, 3], -0.7, 0.7);
    let r = nd::scan::linear_complex(&p, a3.view(), b.view(), None);
    shape_err(r, "a", "[2, 6, 3, 2]", "[2, 6, 3, 3]");
    let r = nd::scan::linear_complex(
        &p,
        a.view(),
        b.view(),
        Some(h0.slice(s![.., .., 0]).into_dyn()),
    );
    shape_err(r, "h0", "rank 3 ([B, D, 2]", "[2, 3]");
}

#[test]
fn scan_wrong_layouts() {
    let mut rng = Rng::new(5);
    let a = rand::<f32>(&mut rng, &[2, 6, 3], 0.2, 1.0);
    let p = ScanParams::new();
    // b as [B, D, T]: the same element count
    let b = rand::<f32>(&mut rng, &[2, 3, 6], -1.0, 1.0);
    let r = nd::scan::linear(&p, a.view(), b.view(), None);
    shape_err(r, "b", "[2, 6, 3] ([B, T, D], as a)", "[2, 3, 6]");
    // b of another size, h0 [D, B], and a of rank 2
    let b = rand::<f32>(&mut rng, &[2, 5, 3], -1.0, 1.0);
    shape_err(
        nd::scan::linear(&p, a.view(), b.view(), None),
        "b",
        "[2, 6, 3]",
        "[2, 5, 3]",
    );
    let b = rand::<f32>(&mut rng, &[2, 6, 3], -1.0, 1.0);
    let h0 = rand::<f32>(&mut rng, &[3, 2], -1.0, 1.0);
    let r = nd::scan::linear(&p, a.view(), b.view(), Some(h0.view()));
    shape_err(r, "h0", "[2, 3] ([B, D], B and D from a)", "[3, 2]");
    let a2 = rand::<f32>(&mut rng, &[12, 3], 0.2, 1.0);
    let r = nd::scan::linear(&p, a2.view(), b.view(), None);
    shape_err(r, "a", "rank 3 ([B, T, D])", "[12, 3]");
    // backward: dh of another shape
    let h = nd::scan::linear(&p, a.view(), b.view(), None)
        .unwrap()
        .into_dyn();
    let dh = rand::<f32>(&mut rng, &[2, 6, 4], -1.0, 1.0);
    let r = nd::scan::linear_backward(&p, a.view(), h.view(), dh.view(), None);
    shape_err(r, "dh", "[2, 6, 3]", "[2, 6, 4]");
}

#[test]
fn scan_non_contiguous_views() {
    let mut rng = Rng::new(6);
    let p = ScanParams::new();
    // a stored [B, D, T] and viewed [B, T, D]; b every other step of a longer sequence
    let a_bdt = rand::<f32>(&mut rng, &[2, 3, 8], 0.2, 1.0);
    let a = a_bdt.view().permuted_axes(IxDyn(&[0, 2, 1]));
    let b_long = rand::<f32>(&mut rng, &[2, 16, 3], -1.0, 1.0);
    let b = b_long.slice_axis(Axis(1), Slice::new(0, None, 2));
    assert!(!a.is_standard_layout() && !b.is_standard_layout());
    let h = nd::scan::linear(&p, a.clone(), b.clone(), None).unwrap();
    let (ac, bc) = (copy(a.clone()), copy(b.clone()));
    assert_eq!(h, nd::scan::linear(&p, ac.view(), bc.view(), None).unwrap());
    let want = scan::linear(&p, ScanShape::new(2, 8, 3), flat(&ac), flat(&bc), None).unwrap();
    same(&h, &[2, 8, 3], &want);
}

struct SelData {
    u: ArrayD<f32>,
    delta: ArrayD<f32>,
    a: ArrayD<f32>,
    bm: ArrayD<f32>,
    cm: ArrayD<f32>,
    dskip: ArrayD<f32>,
    z: ArrayD<f32>,
    delta_bias: ArrayD<f32>,
    h0: ArrayD<f32>,
    dy: ArrayD<f32>,
}

fn sel_data(b: usize, t: usize, d: usize, n: usize) -> SelData {
    let mut rng = Rng::new(7);
    SelData {
        u: rand::<f32>(&mut rng, &[b, t, d], -1.0, 1.0),
        delta: rand::<f32>(&mut rng, &[b, t, d], -1.0, 0.5),
        a: rand_acc::<f32>(&mut rng, &[d, n], -2.0, -0.1),
        bm: rand::<f32>(&mut rng, &[b, t, n], -1.0, 1.0),
        cm: rand::<f32>(&mut rng, &[b, t, n], -1.0, 1.0),
        dskip: rand_acc::<f32>(&mut rng, &[d], -1.0, 1.0),
        z: rand::<f32>(&mut rng, &[b, t, d], -1.0, 1.0),
        delta_bias: rand_acc::<f32>(&mut rng, &[d], -0.5, 0.5),
        h0: rand_acc::<f32>(&mut rng, &[b, d, n], -1.0, 1.0),
        dy: rand::<f32>(&mut rng, &[b, t, d], -1.0, 1.0),
    }
}

#[test]
fn scan_selective_matches_slices() {
    let (b, t, d, n) = (2, 9, 5, 4);
    let x = sel_data(b, t, d, n);
    let sh = SelectiveShape::new(b, t, d, n);
    let p = SelectiveParams::new().delta_softplus(true);
    for full in [false, true] {
        let mut fi = selective::SelectiveInputs::new(
            flat(&x.u),
            flat(&x.delta),
            flat(&x.a),
            flat(&x.bm),
            flat(&x.cm),
        );
        let mut ni = nd::scan::SelectiveInputs::new(
            x.u.view(),
            x.delta.view(),
            x.a.view(),
            x.bm.view(),
            x.cm.view(),
        );
        if full {
            fi = fi
                .dskip(Some(flat(&x.dskip)))
                .z(Some(flat(&x.z)))
                .delta_bias(Some(flat(&x.delta_bias)))
                .h0(Some(flat(&x.h0)));
            ni = ni
                .dskip(Some(x.dskip.view()))
                .z(Some(x.z.view()))
                .delta_bias(Some(x.delta_bias.view()))
                .h0(Some(x.h0.view()));
        }
        let want = selective::selective(&p, sh, &fi).unwrap();
        let out = nd::scan::selective(&p, &ni).unwrap();
        same(&out.y, &[b, t, d], &want.y);
        same(&out.h_last, &[b, d, n], &want.h_last);

        let wg = selective::selective_backward(&p, sh, &fi, flat(&x.dy)).unwrap();
        let g = nd::scan::selective_backward(&p, &ni, x.dy.view()).unwrap();
        same(&g.du, &[b, t, d], &wg.du);
        same(&g.ddelta, &[b, t, d], &wg.ddelta);
        same(&g.da, &[d, n], &wg.da);
        same(&g.dbm, &[b, t, n], &wg.dbm);
        same(&g.dcm, &[b, t, n], &wg.dcm);
        assert_eq!(g.ddskip.is_some(), full);
        assert_eq!(g.dz.is_some(), full);
        assert_eq!(g.ddelta_bias.is_some(), full);
        assert_eq!(g.dh0.is_some(), full);
        if full {
            same(
                g.ddskip.as_ref().unwrap(),
                &[d],
                wg.ddskip.as_ref().unwrap(),
            );
            same(g.dz.as_ref().unwrap(), &[b, t, d], wg.dz.as_ref().unwrap());
            same(
                g.ddelta_bias.as_ref().unwrap(),
                &[d],
                wg.ddelta_bias.as_ref().unwrap(),
            );
            same(
                g.dh0.as_ref().unwrap(),
                &[b, d, n],
                wg.dh0.as_ref().unwrap(),
            );
        }
    }
}

#[test]
fn scan_selective_wrong_layouts_and_strides() {
    let (b, t, d, n) = (2, 9, 5, 4);
    let x = sel_data(b, t, d, n);
    let p = SelectiveParams::new();
    let inputs = |bm| {
        nd::scan::SelectiveInputs::new(x.u.view(), x.delta.view(), x.a.view(), bm, x.cm.view())
    };
    // Bm as [B, N, T]
    let bm_bnt = copy(x.bm.view().permuted_axes(IxDyn(&[0, 2, 1])));
    shape_err(
        nd::scan::selective(&p, &inputs(bm_bnt.view())),
        "Bm",
        "[2, 9, 4] ([B, T, N]",
        "[2, 4, 9]",
    );
    // A transposed, [N, D]
    let ni = nd::scan::SelectiveInputs::new(
        x.u.view(),
        x.delta.view(),
        x.a.t(),
        x.bm.view(),
        x.cm.view(),
    );
    shape_err(
        nd::scan::selective(&p, &ni),
        "A",
        "[5, 5] ([D, N], D from u)",
        "[4, 5]",
    );
    // z and h0 of wrong shapes
    let ni = inputs(x.bm.view()).z(Some(x.u.slice(s![.., 1.., ..]).into_dyn()));
    shape_err(nd::scan::selective(&p, &ni), "z", "[2, 9, 5]", "[2, 8, 5]");
    let ni = inputs(x.bm.view()).h0(Some(x.a.view()));
    shape_err(nd::scan::selective(&p, &ni), "h0", "rank 3", "[5, 4]");
    // dy of another shape
    let r = nd::scan::selective_backward(
        &p,
        &inputs(x.bm.view()),
        x.u.slice(s![..1, .., ..]).into_dyn(),
    );
    shape_err(r, "dy", "[2, 9, 5]", "[1, 9, 5]");

    // Bm stored [B, N, T] and viewed back as [B, T, N]: not contiguous, same result
    let bm_view = bm_bnt.view().permuted_axes(IxDyn(&[0, 2, 1]));
    assert!(!bm_view.is_standard_layout());
    let strided = nd::scan::selective(&p, &inputs(bm_view)).unwrap();
    assert_eq!(
        strided,
        nd::scan::selective(&p, &inputs(x.bm.view())).unwrap()
    );
}

#[test]
fn scan_gla_matches_slices() {
    let mut rng = Rng::new(8);
    let (b, t, h, k, v) = (2, 19, 2, 4, 3);
    let sh = GlaShape::new(b, t, h, k, v);
    let q = rand::<f32>(&mut rng, &[b, t, h, k], -1.0, 1.0);
    let kk = rand::<f32>(&mut rng, &[b, t, h, k], -1.0, 1.0);
    let vv = rand::<f32>(&mut rng, &[b, t, h, v], -1.0, 1.0);
    let g = rand::<f32>(&mut rng, &[b, t, h, k], -1.0, 0.0);
    let h0 = rand_acc::<f32>(&mut rng, &[b, h, k, v], -1.0, 1.0);
    let d_o = rand::<f32>(&mut rng, &[b, t, h, v], -1.0, 1.0);
    let dh_last = rand_acc::<f32>(&mut rng, &[b, h, k, v], -1.0, 1.0);
    let p = GlaParams::new();
    let fi = gla::GlaInputs {
        q: flat(&q),
        k: flat(&kk),
        v: flat(&vv),
        g: flat(&g),
        h0: Some(flat(&h0)),
    };
    let ni = nd::scan::GlaInputs {
        q: q.view(),
        k: kk.view(),
        v: vv.view(),
        g: g.view(),
        h0: Some(h0.view()),
    };
    let want = gla::gla(&p, sh, &fi).unwrap();
    let out = nd::scan::gla(&p, &ni).unwrap();
    same(&out.o, &[b, t, h, v], &want.o);
    same(&out.h_last, &[b, h, k, v], &want.h_last);
    let wg = gla::gla_backward(&p, sh, &fi, flat(&d_o), Some(flat(&dh_last))).unwrap();
    let gr = nd::scan::gla_backward(&p, &ni, d_o.view(), Some(dh_last.view())).unwrap();
    same(&gr.dq, &[b, t, h, k], &wg.dq);
    same(&gr.dk, &[b, t, h, k], &wg.dk);
    same(&gr.dv, &[b, t, h, v], &wg.dv);
    same(&gr.dg, &[b, t, h, k], &wg.dg);
    same(
        gr.dh0.as_ref().unwrap(),
        &[b, h, k, v],
        wg.dh0.as_ref().unwrap(),
    );

    // v as [B, H, T, V]; g of another key dim; do of another V
    let v_bhtv = copy(vv.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    let bad = nd::scan::GlaInputs {
        v: v_bhtv.view(),
        ..ni.clone()
    };
    shape_err(
        nd::scan::gla(&p, &bad),
        "v",
        "[2, 19, 2, 3] ([B, T, H, V], B, T and H from q)",
        "[2, 2, 19, 3]",
    );
    let bad = nd::scan::GlaInputs {
        g: vv.view(),
        ..ni.clone()
    };
    shape_err(
        nd::scan::gla(&p, &bad),
        "g",
        "[2, 19, 2, 4]",
        "[2, 19, 2, 3]",
    );
    let r = nd::scan::gla_backward(&p, &ni, q.view(), None);
    shape_err(r, "do", "[2, 19, 2, 3]", "[2, 19, 2, 4]");

    // k viewed through a permutation: the same result as its copy
    let k_perm = copy(kk.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    let k_view = k_perm.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
    assert!(!k_view.is_standard_layout());
    let strided = nd::scan::GlaInputs {
        k: k_view,
        ..ni.clone()
    };
    assert_eq!(nd::scan::gla(&p, &strided).unwrap(), out);
}

// ---------------------------------------------------------------------------------------
// attention

struct Att<E: Element> {
    q: ArrayD<E>,
    k: ArrayD<E>,
    v: ArrayD<E>,
    slopes: ArrayD<E::Acc>,
    bias: ArrayD<E::Acc>,
    d_o: ArrayD<E>,
}

/// Attention data of dims `[B, Sq, Sk, Hq, Hk, D, Dv]`.
fn att<E: Element>(seed: u64, [b, sq, sk, hq, hk, d, dv]: [usize; 7]) -> Att<E> {
    let mut rng = Rng::new(seed);
    Att {
        q: rand::<E>(&mut rng, &[b, sq, hq, d], -1.0, 1.0),
        k: rand::<E>(&mut rng, &[b, sk, hk, d], -1.0, 1.0),
        v: rand::<E>(&mut rng, &[b, sk, hk, dv], -1.0, 1.0),
        slopes: rand_acc::<E>(&mut rng, &[hq], 0.0, 0.5),
        bias: rand_acc::<E>(&mut rng, &[1, hq, sq, sk], -1.0, 1.0),
        d_o: rand::<E>(&mut rng, &[b, sq, hq, dv], -1.0, 1.0),
    }
}

fn check_attention<E: Element + Into<f64>>(seed: u64)
where
    E::Acc: Into<f64>,
{
    let (b, sq, sk, hq, hk, d, dv) = (2, 11, 13, 4, 2, 8, 6);
    let x = att::<E>(seed, [b, sq, sk, hq, hk, d, dv]);
    let sh = AttentionShape::new(b, sq, sk, hq, hk, d, dv);
    let params = AttentionParams::new().causal(true).softcap(5.0);
    let fi = attention::AttentionInputs::new(flat(&x.q), flat(&x.k), flat(&x.v))
        .alibi_slopes(Some(flat(&x.slopes)))
        .bias(Some(Bias {
            data: flat(&x.bias),
            batch: 1,
            heads: hq,
        }));
    let ni = nd::attention::AttentionInputs::new(x.q.view(), x.k.view(), x.v.view())
        .alibi_slopes(Some(x.slopes.view()))
        .bias(Some(x.bias.view()));

    let want = attention::forward(&params, sh, &fi).unwrap();
    let out = nd::attention::forward(&params, &ni).unwrap();
    same(&out.o, &[b, sq, hq, dv], &want.o);
    same(&out.lse, &[b, hq, sq], &want.lse);

    let wg = attention::backward(&params, sh, &fi, &want.o, flat(&x.d_o), &want.lse).unwrap();
    let (o, lse) = (out.o.view().into_dyn(), out.lse.view().into_dyn());
    let g = nd::attention::backward(&params, &ni, o, x.d_o.view(), lse).unwrap();
    same(&g.dq, &[b, sq, hq, d], &wg.dq);
    same(&g.dk, &[b, sk, hk, d], &wg.dk);
    same(&g.dv, &[b, sk, hk, dv], &wg.dv);

    let wt = attention::top_keys(&params, sh, &fi, 3).unwrap();
    let t = nd::attention::top_keys(&params, &ni, 3).unwrap();
    same(&t.weights, &[b, hq, sq, 3], &wt.weights);
    same(&t.indices, &[b, hq, sq, 3], &wt.indices);
}

#[test]
fn attention_matches_slices() {
    check_attention::<f32>(10);
    check_attention::<f64>(11);
    check_attention::<bf16>(12);
}

#[test]
fn attention_packed_matches_slices() {
    let (tq, tk, hq, hk, d, dv) = (9, 12, 2, 1, 4, 5);
    let x = att::<f32>(13, [1, tq, tk, hq, hk, d, dv]);
    let (cu_q, cu_k) = (vec![0i32, 4, 4, 9], vec![0i32, 5, 7, 12]);
    let sh = AttentionShape::new(1, tq, tk, hq, hk, d, dv);
    let params = AttentionParams::new().causal(true);
    let fi = attention::AttentionInputs::new(flat(&x.q), flat(&x.k), flat(&x.v))
        .cu_seqlens(Some(CuSeqlens { q: &cu_q, k: &cu_k }));
    let (cq, ck) = (arr(&[4], cu_q.clone()), arr(&[4], cu_k.clone()));
    let ni = nd::attention::AttentionInputs::new(x.q.view(), x.k.view(), x.v.view()).cu_seqlens(
        Some(nd::attention::CuSeqlens {
            q: cq.view(),
            k: ck.view(),
        }),
    );
    let want = attention::forward(&params, sh, &fi).unwrap();
    let out = nd::attention::forward(&params, &ni).unwrap();
    same(&out.o, &[1, tq, hq, dv], &want.o);
    same(&out.lse, &[1, hq, tq], &want.lse);
    let wg = attention::backward(&params, sh, &fi, &want.o, flat(&x.d_o), &want.lse).unwrap();
    let (o, lse) = (out.o.view().into_dyn(), out.lse.view().into_dyn());
    let g = nd::attention::backward(&params, &ni, o, x.d_o.view(), lse).unwrap();
    same(&g.dq, &[1, tq, hq, d], &wg.dq);
    same(&g.dk, &[1, tk, hk, d], &wg.dk);
    same(&g.dv, &[1, tk, hk, dv], &wg.dv);
    let wt = attention::top_keys(&params, sh, &fi, 2).unwrap();
    let t = nd::attention::top_keys(&params, &ni, 2).unwrap();
    same(&t.weights, &[1, hq, tq, 2], &wt.weights);
    same(&t.indices, &[1, hq, tq, 2], &wt.indices);

    // cu_seqlens_k of another length; bad contents are the slice API's errors
    let ck3 = arr(&[3], vec![0i32, 5, 12]);
    let bad = ni.clone().cu_seqlens(Some(nd::attention::CuSeqlens {
        q: cq.view(),
        k: ck3.view(),
    }));
    shape_err(
        nd::attention::forward(&params, &bad),
        "cu_seqlens_k",
        "[4]",
        "[3]",
    );
    let ck_bad = arr(&[4], vec![0i32, 5, 7, 11]);
    let bad = ni.clone().cu_seqlens(Some(nd::attention::CuSeqlens {
        q: cq.view(),
        k: ck_bad.view(),
    }));
    let err = nd::attention::forward(&params, &bad).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref name, .. } if name == "cu_seqlens_k"),
        "{err}"
    );
}

#[test]
fn attention_wrong_layouts() {
    let (b, s, hq, hk, d) = (1, 16, 4, 2, 8);
    let x = att::<f32>(14, [b, s, s, hq, hk, d, d]);
    let params = AttentionParams::new();
    let run = |q: ArrayViewD<'_, f32>, k: ArrayViewD<'_, f32>, v: ArrayViewD<'_, f32>| {
        nd::attention::forward(&params, &nd::attention::AttentionInputs::new(q, k, v))
    };
    // v as [B, Hk, Sk, Dv]: heads and sequence swapped, same element count
    let v_bhsd = copy(x.v.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    let err = run(x.q.view(), x.k.view(), v_bhsd.view()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor `v`: expected [1, 16, 2, 8] ([B, Sk, Hk, Dv], B, Sk, Hk from k), got [1, 2, 16, 8]"
    );
    // k as [B, Hk, Sk, D] agrees with q on B and D (Sk = 2, Hk = 16): caught against v
    let k_bhsd = copy(x.k.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    shape_err(
        run(x.q.view(), k_bhsd.view(), x.v.view()),
        "v",
        "[1, 2, 16, 8]",
        "[1, 16, 2, 8]",
    );
    // k and v with mismatched sequence lengths, and a k whose head dim is not q's
    let v_short = x.v.slice(s![.., ..15, .., ..]).into_dyn();
    shape_err(
        run(x.q.view(), x.k.view(), v_short),
        "v",
        "[1, 16, 2, 8]",
        "[1, 15, 2, 8]",
    );
    let k_narrow = x.k.slice(s![.., .., .., ..6]).into_dyn();
    shape_err(
        run(x.q.view(), k_narrow, x.v.view()),
        "k",
        "[1, 16, 2, 8] ([B, Sk, Hk, D], B and D from q)",
        "[1, 16, 2, 6]",
    );
    // k and v swapped where Dv differs from D
    let y = att::<f32>(15, [b, s, s, hq, hk, d, 4]);
    shape_err(
        run(y.q.view(), y.v.view(), y.k.view()),
        "k",
        "[1, 16, 2, 8]",
        "[1, 16, 2, 4]",
    );
    // q of rank 3
    let q3 = copy(x.q.view())
        .into_shape_with_order(IxDyn(&[s, hq, d]))
        .unwrap();
    shape_err(
        run(q3.view(), x.k.view(), x.v.view()),
        "q",
        "rank 4 ([B, Sq, Hq, D])",
        "[16, 4, 8]",
    );
    // optional inputs: slopes per KV head, a bias of the wrong key length
    let ni = nd::attention::AttentionInputs::new(x.q.view(), x.k.view(), x.v.view());
    let slopes = arr(&[hk], vec![0.1f32; hk]);
    let bad = ni.clone().alibi_slopes(Some(slopes.view()));
    shape_err(
        nd::attention::forward(&params, &bad),
        "alibi_slopes",
        "[4] ([Hq]",
        "[2]",
    );
    let bias = x.bias.slice(s![.., .., .., ..8]).into_dyn();
    let bad = ni.clone().bias(Some(bias));
    shape_err(
        nd::attention::forward(&params, &bad),
        "bias",
        "[1, 4, 16, 16]",
        "[1, 4, 16, 8]",
    );
    // the backward's o, do and lse
    let out = nd::attention::forward(&params, &ni).unwrap();
    let (o, lse) = (out.o.view().into_dyn(), out.lse.view().into_dyn());
    let lse_t = out.lse.view().reversed_axes().into_dyn();
    shape_err(
        nd::attention::backward(&params, &ni, o.clone(), x.d_o.view(), lse_t),
        "lse",
        "[1, 4, 16] ([B, Hq, Sq]",
        "[16, 4, 1]",
    );
    let do_swapped = copy(x.d_o.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    shape_err(
        nd::attention::backward(&params, &ni, o, do_swapped.view(), lse),
        "do",
        "[1, 16, 4, 8]",
        "[1, 4, 16, 8]",
    );
}

#[test]
fn attention_non_contiguous_views() {
    let (b, s, hq, hk, d) = (2, 10, 2, 2, 8);
    let x = att::<f32>(16, [b, 2 * s, s, hq, hk, d, d]);
    let params = AttentionParams::new().causal(true);
    // every other query; k stored [B, Hk, Sk, D] and viewed back
    let q = x.q.slice_axis(Axis(1), Slice::new(0, None, 2));
    let k_stored = copy(x.k.view().permuted_axes(IxDyn(&[0, 2, 1, 3])));
    let k = k_stored.view().permuted_axes(IxDyn(&[0, 2, 1, 3]));
    assert!(!q.is_standard_layout() && !k.is_standard_layout());
    let strided = nd::attention::forward(
        &params,
        &nd::attention::AttentionInputs::new(q.clone(), k.clone(), x.v.view()),
    )
    .unwrap();
    let (qc, kc) = (copy(q), copy(k));
    let ci = nd::attention::AttentionInputs::new(qc.view(), kc.view(), x.v.view());
    assert_eq!(strided, nd::attention::forward(&params, &ci).unwrap());
    let sh = AttentionShape::new(b, s, s, hq, hk, d, d);
    let want = attention::forward(
        &params,
        sh,
        &attention::AttentionInputs::new(flat(&qc), flat(&kc), flat(&x.v)),
    )
    .unwrap();
    same(&strided.o, &[b, s, hq, d], &want.o);
}

// ---------------------------------------------------------------------------------------
// topk

struct Sae {
    x: ArrayD<f32>,
    w_enc: ArrayD<f32>,
    b_enc: ArrayD<f32>,
    b_dec: ArrayD<f32>,
    w_dec: ArrayD<f32>,
    threshold: ArrayD<f32>,
}

fn sae(b: usize, dm: usize, l: usize) -> Sae {
    let mut rng = Rng::new(20);
    Sae {
        x: rand::<f32>(&mut rng, &[b, dm], -1.0, 1.0),
        w_enc: rand::<f32>(&mut rng, &[l, dm], -1.0, 1.0),
        b_enc: rand::<f32>(&mut rng, &[l], -0.2, 0.2),
        b_dec: rand::<f32>(&mut rng, &[dm], -0.2, 0.2),
        w_dec: rand::<f32>(&mut rng, &[l, dm], -1.0, 1.0),
        threshold: rand::<f32>(&mut rng, &[l], 0.0, 1.0),
    }
}

#[test]
fn topk_rows_matches_slices() {
    let mut rng = Rng::new(21);
    let x = rand::<f32>(&mut rng, &[6, 40], -1.0, 1.0);
    for params in [RowsParams::new(), RowsParams::new().largest(false)] {
        let want = topk::rows(&params, RowsShape::new(6, 40), 5, flat(&x)).unwrap();
        let got = nd::topk::rows(&params, 5, x.view()).unwrap();
        same(&got.values, &[6, 5], &want.values);
        same(&got.indices, &[6, 5], &want.indices);
    }
    // f64 and a transposed view (rows of the transpose are columns of the stored matrix)
    let x64 = rand::<f64>(&mut rng, &[30, 4], -1.0, 1.0);
    let got = nd::topk::rows(&RowsParams::new(), 3, x64.t()).unwrap();
    assert!(!x64.t().is_standard_layout());
    let xc = copy(x64.t());
    assert_eq!(
        got,
        nd::topk::rows(&RowsParams::new(), 3, xc.view()).unwrap()
    );
    let want = topk::rows(&RowsParams::new(), RowsShape::new(4, 30), 3, flat(&xc)).unwrap();
    same(&got.values, &[4, 3], &want.values);
    // x of the wrong rank
    let x3 = arr(&[2, 3, 40], flat(&x).to_vec());
    shape_err(
        nd::topk::rows(&RowsParams::new(), 5, x3.view()),
        "x",
        "rank 2 ([rows, N])",
        "[2, 3, 40]",
    );
    let x1 = arr(&[240], flat(&x).to_vec());
    shape_err(
        nd::topk::rows(&RowsParams::new(), 5, x1.view()),
        "x",
        "rank 2",
        "[240]",
    );
}

#[test]
fn topk_encoders_match_slices() {
    let (b, dm, l, k) = (7, 12, 40, 4);
    let d = sae(b, dm, l);
    let sh = SaeShape::new(b, dm, l);
    let fi = topk::EncoderInputs {
        x: flat(&d.x),
        w_enc: flat(&d.w_enc),
        b_enc: flat(&d.b_enc),
        b_dec: Some(flat(&d.b_dec)),
    };
    let ni = nd::topk::EncoderInputs {
        x: d.x.view(),
        w_enc: d.w_enc.view(),
        b_enc: d.b_enc.view(),
        b_dec: Some(d.b_dec.view()),
    };

    let want = topk::encode(sh, k, &fi).unwrap();
    let got = nd::topk::encode(k, &ni).unwrap();
    same(&got.values, &[b, k], &want.values);
    same(&got.indices, &[b, k], &want.indices);

    let want = topk::encode_batch_topk(sh, k, &fi).unwrap();
    assert_eq!(nd::topk::encode_batch_topk(k, &ni).unwrap(), want);
    let want = topk::encode_jumprelu(sh, &fi, flat(&d.threshold)).unwrap();
    assert_eq!(
        nd::topk::encode_jumprelu(&ni, d.threshold.view()).unwrap(),
        want
    );

    let want = topk::encode_mp(sh, k, flat(&d.x), flat(&d.w_dec), Some(flat(&d.b_dec))).unwrap();
    let got = nd::topk::encode_mp(k, d.x.view(), d.w_dec.view(), Some(d.b_dec.view())).unwrap();
    same(&got.values, &[b, k], &want.values);
    same(&got.indices, &[b, k], &want.indices);
    same(&got.residual, &[b, dm], &want.residual);

    for metric in [Metric::Dot, Metric::Cosine, Metric::L2] {
        let want = topk::nearest(metric, sh, k, flat(&d.x), flat(&d.w_dec)).unwrap();
        let got = nd::topk::nearest(metric, k, d.x.view(), d.w_dec.view()).unwrap();
        same(&got.values, &[b, k], &want.values);
        same(&got.indices, &[b, k], &want.indices);
    }

    // wrong layouts: w_enc transposed, b_enc of length Dm, x of rank 3, a short threshold
    let bad = nd::topk::EncoderInputs {
        w_enc: d.w_enc.t(),
        ..ni.clone()
    };
    shape_err(
        nd::topk::encode(k, &bad),
        "w_enc",
        "[12, 12] ([L, Dm], Dm from x)",
        "[12, 40]",
    );
    let bad = nd::topk::EncoderInputs {
        b_enc: d.b_dec.view(),
        ..ni.clone()
    };
    shape_err(
        nd::topk::encode(k, &bad),
        "b_enc",
        "[40] ([L], L from w_enc)",
        "[12]",
    );
    let x3 = arr(&[1, b, dm], flat(&d.x).to_vec());
    let bad = nd::topk::EncoderInputs {
        x: x3.view(),
        ..ni.clone()
    };
    shape_err(
        nd::topk::encode_batch_topk(k, &bad),
        "x",
        "rank 2 ([B, Dm])",
        "[1, 7, 12]",
    );
    let r = nd::topk::encode_jumprelu(&ni, d.threshold.slice(s![..39]).into_dyn());
    shape_err(r, "threshold", "[40]", "[39]");
    shape_err(
        nd::topk::nearest(Metric::Dot, k, d.x.view(), d.w_dec.t()),
        "codebook",
        "[12, 12]",
        "[12, 40]",
    );
    let r = nd::topk::encode_mp(k, d.x.view(), d.w_dec.view(), Some(d.b_enc.view()));
    shape_err(r, "b_dec", "[12] ([Dm], Dm from x)", "[40]");

    // non-contiguous: every other feature of a wider x and w_enc, against their copies
    let (xw, ww) = (sae(b, 2 * dm, l).x, sae(b, 2 * dm, l).w_enc);
    let (xs, ws) = (
        xw.slice(s![.., ..;2]).into_dyn(),
        ww.slice(s![.., ..;2]).into_dyn(),
    );
    assert!(!xs.is_standard_layout());
    let strided = nd::topk::EncoderInputs {
        x: xs.clone(),
        w_enc: ws.clone(),
        b_enc: d.b_enc.view(),
        b_dec: None,
    };
    let (xc, wc) = (copy(xs), copy(ws));
    let contiguous = nd::topk::EncoderInputs {
        x: xc.view(),
        w_enc: wc.view(),
        b_enc: d.b_enc.view(),
        b_dec: None,
    };
    assert_eq!(
        nd::topk::encode(k, &strided).unwrap(),
        nd::topk::encode(k, &contiguous).unwrap()
    );
    assert_eq!(
        nd::topk::encode_batch_topk(k, &strided).unwrap(),
        nd::topk::encode_batch_topk(k, &contiguous).unwrap()
    );
}

#[test]
fn topk_decode_and_backward_match_slices() {
    let (b, dm, l, k) = (6, 10, 30, 3);
    let d = sae(b, dm, l);
    let sh = SaeShape::new(b, dm, l);
    let ni = nd::topk::EncoderInputs {
        x: d.x.view(),
        w_enc: d.w_enc.view(),
        b_enc: d.b_enc.view(),
        b_dec: Some(d.b_dec.view()),
    };
    let code = nd::topk::encode(k, &ni).unwrap();
    let (idx, val) = (
        code.indices.view().into_dyn(),
        code.values.view().into_dyn(),
    );
    let (fidx, fval) = (
        code.indices.as_slice().unwrap(),
        code.values.as_slice().unwrap(),
    );

    let want = topk::decode(sh, k, fidx, fval, flat(&d.w_dec), Some(flat(&d.b_dec))).unwrap();
    let x_hat = nd::topk::decode(
        idx.clone(),
        val.clone(),
        d.w_dec.view(),
        Some(d.b_dec.view()),
    )
    .unwrap();
    same(&x_hat, &[b, dm], &want);

    let d_xhat: ArrayD<f32> = &x_hat.clone().into_dyn() - &d.x;
    let want = topk::backward(
        sh,
        k,
        &topk::BackwardInputs {
            x: flat(&d.x),
            w_enc: flat(&d.w_enc),
            b_enc: flat(&d.b_enc),
            b_dec: Some(flat(&d.b_dec)),
            w_dec: flat(&d.w_dec),
            indices: fidx,
            values: fval,
            d_xhat: flat(&d_xhat),
        },
    )
    .unwrap();
    let ni = nd::topk::BackwardInputs {
        x: d.x.view(),
        w_enc: d.w_enc.view(),
        b_enc: d.b_enc.view(),
        b_dec: Some(d.b_dec.view()),
        w_dec: d.w_dec.view(),
        indices: idx.clone(),
        values: val.clone(),
        d_xhat: d_xhat.view(),
    };
    let g = nd::topk::backward(&ni).unwrap();
    same(&g.dw_dec, &[l, dm], &want.dw_dec);
    same(&g.db_dec, &[dm], &want.db_dec);
    same(&g.dw_enc, &[l, dm], &want.dw_enc);
    same(&g.db_enc, &[l], &want.db_enc);
    same(&g.dx, &[b, dm], &want.dx);

    // wrong layouts: values transposed, w_dec transposed, d_xhat of another batch
    shape_err(
        nd::topk::decode(
            idx.clone(),
            code.values.t().into_dyn(),
            d.w_dec.view(),
            None,
        ),
        "values",
        "[6, 3] ([B, k], as indices)",
        "[3, 6]",
    );
    shape_err(
        nd::topk::decode(
            idx.clone(),
            val.clone(),
            d.w_dec.view(),
            Some(d.b_enc.view()),
        ),
        "b_dec",
        "[10]",
        "[30]",
    );
    let bad = nd::topk::BackwardInputs {
        w_dec: d.w_dec.t(),
        ..ni.clone()
    };
    shape_err(
        nd::topk::backward(&bad),
        "w_dec",
        "[30, 10] ([L, Dm], as w_enc)",
        "[10, 30]",
    );
    let bad = nd::topk::BackwardInputs {
        d_xhat: d_xhat.slice(s![1.., ..]).into_dyn(),
        ..ni.clone()
    };
    shape_err(nd::topk::backward(&bad), "d_xhat", "[6, 10]", "[5, 10]");
    let idx_more = code.indices.slice(s![..5, ..]).into_dyn();
    let bad = nd::topk::BackwardInputs {
        indices: idx_more,
        ..ni.clone()
    };
    shape_err(
        nd::topk::backward(&bad),
        "indices",
        "[6, 3] ([B, k], B from x)",
        "[5, 3]",
    );

    // a transposed w_dec stored [Dm, L] decodes as its copy
    let w_stored = copy(d.w_dec.t());
    let got = nd::topk::decode(idx, val, w_stored.t(), None).unwrap();
    let want = topk::decode(sh, k, fidx, fval, flat(&d.w_dec), None).unwrap();
    same(&got, &[b, dm], &want);
}

// ---------------------------------------------------------------------------------------
// ridge

#[test]
fn ridge_matches_slices() {
    let (n, p, t) = (30, 4, 3);
    let mut rng = Rng::new(30);
    let x = rand::<f64>(&mut rng, &[n, p], -1.0, 1.0);
    let y = rand::<f64>(&mut rng, &[n, t], -1.0, 1.0);
    let alphas = arr(&[3], vec![0.1f64, 1.0, 10.0]);
    let folds = arr(&[n], (0..n as i32).map(|r| r % 3).collect());
    let sh = RidgeShape::new(n, p, t);
    let params = CvParams::new();
    let want = ridge::cv(
        &params,
        sh,
        &ridge::CvInputs {
            x: flat(&x),
            y: flat(&y),
            alphas: flat(&alphas),
            folds: flat(&folds),
        },
        None,
    )
    .unwrap();
    let ni = nd::ridge::CvInputs {
        x: x.view(),
        y: y.view(),
        alphas: alphas.view(),
        folds: folds.view(),
    };
    let fit = nd::ridge::cv(&params, &ni, None).unwrap();
    same(&fit.cv_scores, &[3, t], &want.cv_scores);
    same(&fit.best_alpha, &[t], &want.best_alpha);
    same(&fit.w, &[p, t], &want.w);
    same(&fit.intercept, &[t], &want.intercept);

    let want_y = ridge::predict(sh, flat(&x), &want.w, Some(&want.intercept)).unwrap();
    let (w, b) = (fit.w.view().into_dyn(), fit.intercept.view().into_dyn());
    let y_hat = nd::ridge::predict(x.view(), w.clone(), Some(b.clone())).unwrap();
    same(&y_hat, &[n, t], &want_y);
    let want_s = ridge::score(sh, flat(&y), &want_y).unwrap();
    let sc = nd::ridge::score(y.view(), y_hat.view().into_dyn()).unwrap();
    same(&sc.r2, &[t], &want_s.r2);
    same(&sc.pearson, &[t], &want_s.pearson);

    // f32 solve_batched
    let g = 3;
    let xb = rand::<f32>(&mut rng, &[g, n, p], -1.0, 1.0);
    let yb = rand::<f32>(&mut rng, &[g, n, t], -1.0, 1.0);
    let alpha = arr(&[g], vec![0.5f32, 1.0, 2.0]);
    let want = ridge::solve_batched(
        BatchedShape::new(g, n, p, t),
        flat(&xb),
        flat(&yb),
        flat(&alpha),
    )
    .unwrap();
    let wb = nd::ridge::solve_batched(xb.view(), yb.view(), alpha.view()).unwrap();
    same(&wb, &[g, p, t], &want);

    // wrong sample counts and layouts
    let y_short = y.slice(s![..n - 1, ..]).into_dyn();
    let bad = nd::ridge::CvInputs {
        y: y_short.clone(),
        ..ni.clone()
    };
    shape_err(
        nd::ridge::cv(&params, &bad, None),
        "y",
        "[30, 3] ([n, t], n from x)",
        "[29, 3]",
    );
    shape_err(
        nd::ridge::score(y.view(), y_short),
        "y_pred",
        "[30, 3] ([n, t], as y_true)",
        "[29, 3]",
    );
    let bad = nd::ridge::CvInputs {
        folds: folds.slice(s![..20]).into_dyn(),
        ..ni.clone()
    };
    shape_err(
        nd::ridge::cv(&params, &bad, None),
        "folds",
        "[30] ([n], n from x)",
        "[20]",
    );
    let bad = nd::ridge::CvInputs {
        x: x.t(),
        ..ni.clone()
    };
    shape_err(nd::ridge::cv(&params, &bad, None), "y", "[4, 3]", "[30, 3]");
    shape_err(
        nd::ridge::predict(x.view(), fit.w.t().into_dyn(), None),
        "w",
        "[4, 4] ([p, t], p from x)",
        "[3, 4]",
    );
    shape_err(
        nd::ridge::predict(x.view(), w, Some(alphas.slice(s![..2]).into_dyn())),
        "intercept",
        "[3]",
        "[2]",
    );
    let yb_t = copy(yb.view().permuted_axes(IxDyn(&[0, 2, 1])));
    shape_err(
        nd::ridge::solve_batched(xb.view(), yb_t.view(), alpha.view()),
        "y",
        "[3, 30, 30] ([G, n, t], G and n from x)",
        "[3, 3, 30]",
    );
    shape_err(
        nd::ridge::solve_batched(xb.view(), yb.view(), arr(&[2], vec![1.0f32, 2.0]).view()),
        "alpha",
        "[3]",
        "[2]",
    );

    // non-contiguous: x stored [p, n] and transposed; every other row of a longer y
    let x_stored = copy(x.t());
    let y_long = rand::<f64>(&mut rng, &[2 * n, t], -1.0, 1.0);
    let y_strided = y_long.slice(s![..;2, ..]).into_dyn();
    assert!(!x_stored.t().is_standard_layout() && !y_strided.is_standard_layout());
    let strided = nd::ridge::CvInputs {
        x: x_stored.t(),
        y: y_strided.clone(),
        ..ni.clone()
    };
    let yc = copy(y_strided);
    let contiguous = nd::ridge::CvInputs {
        y: yc.view(),
        ..ni.clone()
    };
    assert_eq!(
        nd::ridge::cv(&params, &strided, None).unwrap(),
        nd::ridge::cv(&params, &contiguous, None).unwrap()
    );
    assert_eq!(
        nd::ridge::predict(x_stored.t(), fit.w.view().into_dyn(), Some(b.clone())).unwrap(),
        y_hat
    );
}

#[test]
fn banded_ridge_matches_slices() {
    let (n, p, t, spaces) = (36, 6, 3, 2);
    let mut rng = Rng::new(31);
    let x = rand::<f64>(&mut rng, &[n, p], -1.0, 1.0);
    let y = rand::<f64>(&mut rng, &[n, t], -1.0, 1.0);
    let groups = arr(&[p], vec![0i32, 1, 0, 1, 1, 0]);
    let alphas = arr(&[3], vec![0.1f64, 1.0, 10.0]);
    let gammas = arr(&[3, spaces], vec![0.5f64, 0.5, 0.9, 0.1, 0.2, 0.8]);
    let folds = arr(&[n], (0..n as i32).map(|r| r % 3).collect());
    let shape = ridge::BandedShape::new(n, p, t, spaces);
    let params = CvParams::new();
    let want = ridge::banded_cv(
        &params,
        shape,
        &ridge::BandedInputs {
            x: flat(&x),
            groups: flat(&groups),
            y: flat(&y),
            alphas: flat(&alphas),
            gammas: flat(&gammas),
            folds: flat(&folds),
        },
        None,
    )
    .unwrap();
    let ni = nd::ridge::BandedInputs {
        x: x.view(),
        groups: groups.view(),
        y: y.view(),
        alphas: alphas.view(),
        gammas: gammas.view(),
        folds: folds.view(),
    };
    let fit = nd::ridge::banded_cv(&params, &ni, None).unwrap();
    same(&fit.cv_scores, &[3, t], &want.cv_scores);
    same(&fit.deltas, &[spaces, t], &want.deltas);
    same(&fit.best_alpha, &[t], &want.best_alpha);
    assert_eq!(
        fit.best_candidate.as_slice().unwrap(),
        &want.best_candidate[..]
    );
    same(&fit.w, &[p, t], &want.w);
    same(&fit.intercept, &[t], &want.intercept);

    let want_s = ridge::split_scores(shape, flat(&x), flat(&groups), &want.w, flat(&y)).unwrap();
    let w = fit.w.view().into_dyn();
    let split =
        nd::ridge::split_scores(x.view(), groups.view(), spaces, w.clone(), y.view()).unwrap();
    same(&split.r2, &[spaces, t], &want_s.r2);
    same(&split.pearson, &[spaces, t], &want_s.pearson);

    // wrong layouts name the tensor
    let bad = nd::ridge::BandedInputs {
        groups: groups.slice(s![..4]).into_dyn(),
        ..ni.clone()
    };
    shape_err(
        nd::ridge::banded_cv(&params, &bad, None),
        "groups",
        "[6] ([p], p from x)",
        "[4]",
    );
    let flat_gammas = arr(&[6], flat(&gammas).to_vec());
    let bad = nd::ridge::BandedInputs {
        gammas: flat_gammas.view(),
        ..ni.clone()
    };
    shape_err(
        nd::ridge::banded_cv(&params, &bad, None),
        "gammas",
        "rank 2",
        "[6]",
    );
    shape_err(
        nd::ridge::split_scores(x.view(), groups.view(), spaces, w, x.view()),
        "y",
        "[36, 3] ([n, t], n from x and t from w)",
        "[36, 6]",
    );
}

#[test]
fn ridge_cv_progress_is_forwarded() {
    let (n, p, t) = (12, 2, 2);
    let mut rng = Rng::new(31);
    let x = rand::<f32>(&mut rng, &[n, p], -1.0, 1.0);
    let y = rand::<f32>(&mut rng, &[n, t], -1.0, 1.0);
    let alphas = arr(&[2], vec![1.0f32, 2.0]);
    let folds = arr(&[n], (0..n as i32).map(|r| r % 2).collect());
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let progress = |_: nd::ridge::CvProgress| {
        calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let ni = nd::ridge::CvInputs {
        x: x.view(),
        y: y.view(),
        alphas: alphas.view(),
        folds: folds.view(),
    };
    nd::ridge::cv(&CvParams::new(), &ni, Some(&progress)).unwrap();
    assert!(calls.load(std::sync::atomic::Ordering::Relaxed) >= 3); // two folds and the refit
}
