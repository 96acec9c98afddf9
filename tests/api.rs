//! The API convention's own pieces: `ridge::predict`, the shape constructors from dims, the
//! selective scan's input builder, and errors that used to be silent.

mod common;

use common::Rng;
use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
use neurokernels::topk::{self, RowsParams, RowsShape};

fn message<T: std::fmt::Debug>(r: neurokernels::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn predict_matches_a_float64_product() {
    let (n, p, t) = (37, 11, 19);
    let shape = RidgeShape::new(n, p, t);
    let mut rng = Rng::new(3);
    for with_intercept in [false, true] {
        let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
        let w: Vec<f64> = rng.vec(p * t, -1.0, 1.0);
        let b: Vec<f64> = rng.vec(t, -1.0, 1.0);
        let intercept = with_intercept.then_some(&b[..]);
        let y = ridge::predict(shape, &x, &w, intercept).unwrap();
        for r in 0..n {
            for c in 0..t {
                let want = (0..p).map(|j| x[r * p + j] * w[j * t + c]).sum::<f64>()
                    + if with_intercept { b[c] } else { 0.0 };
                assert!((y[r * t + c] - want).abs() < 1e-12, "({r}, {c})");
            }
        }
        // f32 too, to f32 rounding
        let (x32, w32): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|v| *v as f32).collect(),
            w.iter().map(|v| *v as f32).collect(),
        );
        let y32 = ridge::predict(shape, &x32, &w32, None).unwrap();
        let y64 = ridge::predict(shape, &x, &w, None).unwrap();
        for (a, b) in y32.iter().zip(&y64) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }
    // no features: y is the intercept
    let y = ridge::predict(
        RidgeShape::new(2, 0, 3),
        &[],
        &[],
        Some(&[1.0f32, 2.0, 3.0]),
    )
    .unwrap();
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
}

#[test]
fn predict_refits_what_cv_chose() {
    let (n, p, t) = (90, 6, 4);
    let shape = RidgeShape::new(n, p, t);
    let mut rng = Rng::new(9);
    let x: Vec<f64> = rng.vec(n * p, -1.0, 1.0);
    let y: Vec<f64> = (0..n * t)
        .map(|i| x[(i / t) * p + i % t] * 2.0 + 0.5)
        .collect();
    let folds: Vec<i32> = (0..n as i32).map(|i| i % 3).collect();
    let inputs = CvInputs {
        x: &x,
        y: &y,
        alphas: &[1e-6, 1.0],
        folds: &folds,
    };
    let fit = ridge::cv(&CvParams::new(), shape, &inputs, None).unwrap();
    let y_hat = ridge::predict(shape, &x, &fit.w, Some(&fit.intercept)).unwrap();
    let scores = ridge::score(shape, &y, &y_hat).unwrap();
    assert!(
        scores.r2.iter().all(|r2| *r2 > 0.999_999),
        "{:?}",
        scores.r2
    );
}

#[test]
fn predict_names_the_wrong_tensor() {
    let s = RidgeShape::new(2, 3, 4);
    let (x, w, b) = ([0f32; 6], [0f32; 12], [0f32; 4]);
    assert!(message(ridge::predict(s, &x[..5], &w, None)).contains("`x`"));
    assert!(message(ridge::predict(s, &x, &w[..11], None)).contains("`w`"));
    assert!(message(ridge::predict(s, &x, &w, Some(&b[..3]))).contains("`intercept`"));
    let huge = RidgeShape::new(usize::MAX, 2, 1);
    assert!(ridge::predict::<f32>(huge, &[], &[], None).is_err());
}

#[test]
fn target_batch_zero_is_an_error_not_a_silent_one() {
    let shape = RidgeShape::new(6, 1, 1);
    let (x, y) = ([1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0f32; 6]);
    let inputs = CvInputs {
        x: &x,
        y: &y,
        alphas: &[1.0],
        folds: &[0, 0, 0, 1, 1, 1],
    };
    let e = message(ridge::cv(
        &CvParams::new().target_batch(0),
        shape,
        &inputs,
        None,
    ));
    assert!(e.contains("target_batch"), "{e}");
    assert!(ridge::cv(&CvParams::new().target_batch(1), shape, &inputs, None).is_ok());
}

#[test]
fn shapes_from_dims_check_each_tensor() {
    assert_eq!(
        RidgeShape::from_dims(&[5, 3], &[5, 7]).unwrap(),
        RidgeShape::new(5, 3, 7)
    );
    let e = message(RidgeShape::from_dims(&[5, 3], &[4, 7]));
    assert!(
        e.contains("`y`") && e.contains("[5, t]") && e.contains("[4, 7]"),
        "{e}"
    );
    assert!(message(RidgeShape::from_dims(&[5], &[5, 7])).contains("`x`"));
    assert_eq!(RowsShape::from_dims(&[2, 9]).unwrap(), RowsShape::new(2, 9));
    assert!(message(RowsShape::from_dims(&[2, 9, 1])).contains("`x`"));
}

#[test]
fn rows_takes_options_shape_count_inputs() {
    let x = [3.0f32, 1.0, 2.0, -1.0, 5.0, 0.0];
    let best = topk::rows(&RowsParams::new(), RowsShape::new(2, 3), 2, &x).unwrap();
    assert_eq!(
        (best.values, best.indices),
        (vec![3.0, 2.0, 5.0, 0.0], vec![0, 2, 1, 2])
    );
    let least = topk::rows(
        &RowsParams::new().largest(false),
        RowsShape::new(2, 3),
        1,
        &x,
    );
    assert_eq!(least.unwrap().values, [1.0, -1.0]);
    assert!(message(topk::rows(&RowsParams::new(), RowsShape::new(2, 3), 4, &x)).contains("`k`"));
}

#[test]
fn selective_inputs_builder_equals_the_literal() {
    let s = SelectiveShape::new(1, 5, 3, 2);
    let mut rng = Rng::new(5);
    let (u, delta, z): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        rng.vec(15, -1.0, 1.0),
        rng.vec(15, -1.0, 1.0),
        rng.vec(15, -1.0, 1.0),
    );
    let (a, bm, cm): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        rng.vec(6, -2.0, -0.5),
        rng.vec(10, -1.0, 1.0),
        rng.vec(10, -1.0, 1.0),
    );
    let dskip: Vec<f32> = rng.vec(3, -1.0, 1.0);
    let built = SelectiveInputs::new(&u, &delta, &a, &bm, &cm)
        .dskip(Some(&dskip))
        .z(Some(&z));
    let literal = SelectiveInputs {
        u: &u,
        delta: &delta,
        a: &a,
        bm: &bm,
        cm: &cm,
        dskip: Some(&dskip),
        z: Some(&z),
        delta_bias: None,
        h0: None,
    };
    let p = SelectiveParams::new();
    let (one, two) = (
        selective::selective(&p, s, &built).unwrap(),
        selective::selective(&p, s, &literal).unwrap(),
    );
    assert_eq!(one, two);
    // the caller's buffers get the same values
    let (mut y, mut h) = (vec![0f32; 15], vec![0f32; 6]);
    selective::selective_into(&p, s, &built, &mut y, &mut h).unwrap();
    assert_eq!((y, h), (one.y, one.h_last));
}
