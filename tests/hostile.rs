//! Inputs that once crashed the process, each from its reproducer (issue 28): they now
//! return `Ok` with the defined result or an `Err` naming the tensor.

use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::topk::{self, EncoderInputs, Metric, SaeShape};

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

#[test]
fn top_keys_refuses_a_top_only_padding_could_fill() {
    // top = 2^40 with Sk = 1: an Err naming k, not a 16 TB allocation
    let shape = AttentionShape::new(1, 1, 1, 1, 1, 1, 0);
    let (q, k) = ([1.0f32], [1.0f32]);
    let inputs = AttentionInputs::new(&q, &k, &[]);
    let params = AttentionParams::new();
    let e = attention::top_keys(&params, shape, &inputs, 1 << 40).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    // padding past Sk stays available for small tops (a reference case uses Sk 1, top 2)
    let top = attention::top_keys(&params, shape, &inputs, 3).unwrap();
    assert_eq!(top.indices, [0, -1, -1]);
}

#[test]
fn empty_tensors_with_a_huge_dim_allocate_nothing() {
    let params = AttentionParams::new();
    // attention: B = 2^40 or usize::MAX with Sq = Sk = 0
    for batch in [1usize << 40, usize::MAX] {
        let shape = AttentionShape::new(batch, 0, 0, 1, 1, 4, 4);
        let inputs = AttentionInputs::new(&[] as &[f32], &[], &[]);
        let e = attention::forward(&params, shape, &inputs).unwrap_err();
        assert!(e.to_string().contains("`q`"), "{e}");
    }
    // attention backward with Sq = 0 and Hq = 2^63: no query, so zero key gradients at once
    let shape = AttentionShape::new(1, 0, 1, 1 << 63, 1, 1, 1);
    let inputs = AttentionInputs::new(&[] as &[f32], &[1.0], &[2.0]);
    let g = attention::backward(&params, shape, &inputs, &[], &[], &[]).unwrap();
    assert_eq!((g.dk, g.dv), (vec![0.0], vec![0.0]));

    // the SAE encoders: B = 2^62 rows of Dm = 0 columns
    let shape = SaeShape::new(1 << 62, 0, 2);
    let inputs = EncoderInputs {
        x: &[] as &[f32],
        w_enc: &[],
        b_enc: &[0.5, 1.0],
        b_dec: None,
    };
    for e in [
        topk::encode(shape, 1, &inputs).unwrap_err(),
        topk::encode_jumprelu(shape, &inputs, &[0.0, 0.0]).unwrap_err(),
        topk::nearest(Metric::Dot, shape, 1, &[] as &[f32], &[]).unwrap_err(),
        topk::encode_mp(shape, 1, &[] as &[f32], &[], None).unwrap_err(),
    ] {
        assert!(e.to_string().contains("`x`"), "{e}");
    }
    // B·k overflowing usize is an Err, not a wrapped length
    let shape = SaeShape::new(usize::MAX, 0, 2);
    assert!(topk::encode(shape, 2, &inputs).is_err());

    // ridge.score with no rows and usize::MAX targets
    let e = ridge::score(RidgeShape::new(0, 0, usize::MAX), &[] as &[f32], &[]).unwrap_err();
    assert!(e.to_string().contains("`y_true`"), "{e}");

    // GLA with B = 2^32 and T = K = 0: nothing to compute, and nothing iterated
    let shape = GlaShape::new(1 << 32, 0, 5, 0, 4);
    let inputs = GlaInputs {
        q: &[] as &[f32],
        k: &[],
        v: &[],
        g: &[],
        h0: None,
    };
    let out = gla::gla(&GlaParams::new(), shape, &inputs).unwrap();
    assert!(out.o.is_empty() && out.h_last.is_empty());
    // ... but with K = 1, h_last [B, H, K, V] would be sized by B alone
    let shape = GlaShape::new(1 << 32, 0, 5, 1, 4);
    let e = gla::gla(&GlaParams::new(), shape, &inputs).unwrap_err();
    assert!(e.to_string().contains("`h0`"), "{e}");

    // the scan backward's dh0 [B, D] with T = 0 and no h0
    let e = scan::linear_backward::<f32>(
        &ScanParams::new(),
        ScanShape::new(1 << 40, 0, 1),
        &[],
        &[],
        &[],
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`h0`"), "{e}");
}

#[test]
fn parameters_that_would_give_nan_are_refused() {
    // GLA scale NaN, inf, or past f32's range
    let inputs = GlaInputs {
        q: &[0.5f32],
        k: &[0.5],
        v: &[1.0],
        g: &[-0.1],
        h0: None,
    };
    let shape = GlaShape::new(1, 1, 1, 1, 1);
    for s in [f64::NAN, f64::INFINITY, 1e300] {
        let e = gla::gla(&GlaParams::new().scale(Some(s)), shape, &inputs).unwrap_err();
        assert!(e.to_string().contains("`scale`"), "{e}");
    }
    // attention: a scale or softcap finite in f64 but infinite in f32
    let shape = AttentionShape::new(1, 1, 1, 1, 1, 1, 1);
    let inputs = AttentionInputs::new(&[1.0f32], &[1.0], &[1.0]);
    let e =
        attention::forward(&AttentionParams::new().scale(Some(1e300)), shape, &inputs).unwrap_err();
    assert!(e.to_string().contains("`scale`"), "{e}");
    let e = attention::forward(&AttentionParams::new().softcap(1e300), shape, &inputs).unwrap_err();
    assert!(e.to_string().contains("`softcap`"), "{e}");
    // ... while f64 takes it
    let inputs = AttentionInputs::new(&[1.0f64], &[1.0], &[1.0]);
    assert!(attention::forward(&AttentionParams::new().scale(Some(1e300)), shape, &inputs).is_ok());

    // ridge.cv: a subnormal alpha (1/α overflows) is refused
    let (x, y) = ([1.0f64, 2.0, 3.0, 4.0], [1.0, 2.0, 2.5, 4.5]);
    let inputs = CvInputs {
        x: &x,
        y: &y,
        alphas: &[5e-324],
        folds: &[0, 1, 0, 1],
    };
    let e = ridge::cv(&CvParams::new(), RidgeShape::new(4, 1, 1), &inputs, None).unwrap_err();
    assert!(e.to_string().contains("`alphas`"), "{e}");
    // ... and the smallest normal one gives finite scores (−inf at worst, never NaN)
    let inputs = CvInputs {
        alphas: &[f64::MIN_POSITIVE, 1.0],
        ..inputs
    };
    let fit = ridge::cv(&CvParams::new(), RidgeShape::new(4, 1, 1), &inputs, None).unwrap();
    assert!(
        fit.cv_scores.iter().all(|s| !s.is_nan()),
        "{:?}",
        fit.cv_scores
    );
}
