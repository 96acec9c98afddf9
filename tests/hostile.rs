//! Inputs that once crashed the process, each from its reproducer (issue 28): they now
//! return `Ok` with the defined result or an `Err` naming the tensor.

use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
use neurokernels::scan::{self, ScanParams, ScanShape};

#[test]
fn attention_backward_with_head_dim_zero() {
    // D = 0: every score is 0, so each query averages the values it sees
    let shape = AttentionShape::new(1, 1, 1, 1, 1, 0, 1);
    let (q, k, v) = ([0f32; 0], [0f32; 0], [1.0f32]);
    let inputs = AttentionInputs::new(&q, &k, &v);
    let params = AttentionParams::new();
    let out = attention::forward(&params, shape, &inputs).unwrap();
    assert_eq!(out.o, [1.0]);
    let g = attention::backward(&params, shape, &inputs, &out.o, &[1.0], &out.lse).unwrap();
    assert!(g.dq.is_empty() && g.dk.is_empty());
    assert_eq!(g.dv, [1.0]);
}

#[test]
fn gla_backward_with_no_value_or_key_columns() {
    let inputs = GlaInputs {
        q: &[0.5f32],
        k: &[0.5],
        v: &[],
        g: &[-0.1],
        h0: None,
    };
    let shape = GlaShape::new(1, 1, 1, 1, 0);
    let out = gla::gla(&GlaParams::new(), shape, &inputs).unwrap();
    assert!(out.o.is_empty() && out.h_last.is_empty());
    let g = gla::gla_backward(&GlaParams::new(), shape, &inputs, &[], None).unwrap();
    assert_eq!((g.dq, g.dk, g.dg), (vec![0.0], vec![0.0], vec![0.0]));
    assert!(g.dv.is_empty());
    // K = 0: o is zero, so are the gradients
    let inputs = GlaInputs {
        q: &[],
        k: &[],
        v: &[1.0f32, 2.0],
        g: &[],
        h0: Some(&[]),
    };
    let shape = GlaShape::new(1, 1, 1, 0, 2);
    assert_eq!(
        gla::gla(&GlaParams::new(), shape, &inputs).unwrap().o,
        [0.0, 0.0]
    );
    let g = gla::gla_backward(&GlaParams::new(), shape, &inputs, &[1.0, 1.0], None).unwrap();
    assert_eq!((g.dv, g.dh0), (vec![0.0, 0.0], Some(vec![])));
}

#[test]
fn allocating_scans_check_inputs_before_sizing_outputs() {
    // a huge shape the (empty) inputs do not back: an Err naming `a`, not a 4 TB allocation
    let huge = ScanShape::new(1, 1 << 40, 1);
    let p = ScanParams::new();
    let named_a = |e: neurokernels::Error| assert!(e.to_string().contains("`a`"), "{e}");
    named_a(scan::linear::<f32>(&p, huge, &[], &[], None).unwrap_err());
    named_a(scan::linear_complex::<f32>(&p, huge, &[], &[], None).unwrap_err());
    named_a(scan::linear_backward::<f32>(&p, huge, &[], &[], &[], None).unwrap_err());
    named_a(scan::linear_complex_backward::<f32>(&p, huge, &[], &[], &[], None).unwrap_err());
}

#[test]
fn cv_refuses_a_fold_id_no_sample_can_fill() {
    let inputs = CvInputs {
        x: &[1.0f32, 2.0],
        y: &[1.0, 2.0],
        alphas: &[1.0],
        folds: &[0, i32::MAX],
    };
    let e = ridge::cv(&CvParams::new(), RidgeShape::new(2, 1, 1), &inputs, None).unwrap_err();
    assert!(e.to_string().contains("`folds`"), "{e}");
}
