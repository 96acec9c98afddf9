//! scan.linear and scan.linear_backward on the CPU: every ISA this machine has, every dtype,
//! both directions, with and without h0, odd sizes and both work plans (channel-parallel and
//! time-parallel), against a naive float64 reference; plus determinism and bad input.

mod common;

use common::{Rng, scan_backward_f64, scan_forward_f64, to_f64, worst_ratio};
use half::{bf16, f16};
use neurokernels::cpu::Isa;
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::{Element, Error};

/// Shapes: tiny and odd ones, ones that are not a multiple of any vector width, narrow rows
/// held in registers, and (the last three) long sequences on few channels, which take the
/// time-parallel plan.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 17, 13),
    (2, 33, 37),
    (4, 64, 130),
    (1, 5, 300),
    // rows of 1 to 4 vectors: the state lives in registers
    (2, 40, 8),
    (3, 29, 16),
    (1, 50, 32),
    (1, 140_000, 3),
    (2, 70_001, 3),
    (1, 140_000, 6),
];

fn tolerance<E: Element>() -> (f64, f64) {
    match E::DTYPE {
        neurokernels::DType::F64 => (1e-10, 1e-12),
        neurokernels::DType::F32 => (1e-4, 1e-5),
        _ => (1e-2, 1e-2),
    }
}

fn check_dtype<E: Element>(seed: u64, shapes: &[(usize, usize, usize)]) {
    let (rtol, atol) = tolerance::<E>();
    for (k, &(bsz, t, d)) in shapes.iter().enumerate() {
        let n = bsz * t * d;
        let mut rng = Rng::new(seed + k as u64);
        let a: Vec<E> = rng.vec(n, 0.5, 1.0);
        let b: Vec<E> = rng.vec(n, -1.0, 1.0);
        let h0: Vec<E> = rng.vec(bsz * d, -1.0, 1.0);
        let dh: Vec<E> = rng.vec(n, -1.0, 1.0);
        let shape = ScanShape::new(bsz, t, d);
        for isa in Isa::available() {
            for reverse in [false, true] {
                for with_h0 in [false, true] {
                    let what = format!(
                        "{} {isa:?} {shape} reverse={reverse} h0={with_h0}",
                        E::DTYPE
                    );
                    let params = ScanParams::new().reverse(reverse);
                    let h0_opt = with_h0.then_some(h0.as_slice());
                    let mut h = vec![E::from_f64(f64::NAN); n];
                    scan::linear_into_on(isa, &params, shape, &a, &b, h0_opt, &mut h).unwrap();
                    let h0_f = with_h0.then(|| to_f64(&h0));
                    let want = scan_forward_f64(
                        bsz,
                        t,
                        d,
                        &to_f64(&a),
                        &to_f64(&b),
                        h0_f.as_deref(),
                        reverse,
                    );
                    let r = worst_ratio(&to_f64(&h), &want, rtol, atol);
                    assert!(r <= 1.0, "forward {what}: error {r} x tolerance");

                    let (mut da, mut db, mut dh0) = (
                        vec![E::from_f64(f64::NAN); n],
                        vec![E::from_f64(f64::NAN); n],
                        vec![E::from_f64(f64::NAN); bsz * d],
                    );
                    scan::linear_backward_into_on(
                        isa, &params, shape, &a, &h, &dh, h0_opt, &mut da, &mut db, &mut dh0,
                    )
                    .unwrap();
                    let (wda, wdb, wdh0) = scan_backward_f64(
                        bsz,
                        t,
                        d,
                        &to_f64(&a),
                        &to_f64(&h),
                        &to_f64(&dh),
                        h0_f.as_deref(),
                        reverse,
                    );
                    for (name, got, want) in
                        [("da", &da, &wda), ("db", &db, &wdb), ("dh0", &dh0, &wdh0)]
                    {
                        let r = worst_ratio(&to_f64(got), want, rtol, atol);
                        assert!(r <= 1.0, "backward {name} {what}: error {r} x tolerance");
                    }
                }
            }
        }
    }
}

#[test]
fn f32_matches_f64_reference_on_every_isa() {
    check_dtype::<f32>(1, SHAPES);
}

#[test]
fn f64_matches_f64_reference_on_every_isa() {
    check_dtype::<f64>(2, SHAPES);
}

#[test]
fn f16_matches_f64_reference_on_every_isa() {
    check_dtype::<f16>(3, SHAPES);
}

#[test]
fn bf16_matches_f64_reference_on_every_isa() {
    check_dtype::<bf16>(4, SHAPES);
}

#[test]
fn simd_and_scalar_agree_closely() {
    let shape = ScanShape::new(3, 300, 77);
    let n = 3 * 300 * 77;
    let mut rng = Rng::new(9);
    let a: Vec<f32> = rng.vec(n, 0.5, 1.0);
    let b: Vec<f32> = rng.vec(n, -1.0, 1.0);
    let mut scalar = vec![0f32; n];
    scan::linear_into_on(
        Isa::Scalar,
        &ScanParams::new(),
        shape,
        &a,
        &b,
        None,
        &mut scalar,
    )
    .unwrap();
    for isa in Isa::available() {
        let mut h = vec![0f32; n];
        scan::linear_into_on(isa, &ScanParams::new(), shape, &a, &b, None, &mut h).unwrap();
        let r = worst_ratio(&to_f64(&h), &to_f64(&scalar), 1e-5, 1e-6);
        assert!(r <= 1.0, "{isa:?} vs scalar: {r}");
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    for (bsz, t, d) in [(4, 500, 300), (1, 140_000, 3)] {
        let n = bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let mut rng = Rng::new(5);
        let a: Vec<f32> = rng.vec(n, 0.5, 1.0);
        let b: Vec<f32> = rng.vec(n, -1.0, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // an explicit ISA: another test flips the process-wide force-scalar switch
            let isa = Isa::detected();
            let p = ScanParams::new();
            pool.install(|| {
                let mut h = vec![0f32; n];
                scan::linear_into_on(isa, &p, shape, &a, &b, None, &mut h).unwrap();
                let (mut da, mut db, mut dh0) = (vec![0f32; n], vec![0f32; n], vec![0f32; bsz * d]);
                scan::linear_backward_into_on(
                    isa, &p, shape, &a, &h, &b, None, &mut da, &mut db, &mut dh0,
                )
                .unwrap();
                (h, da, db, dh0)
            })
        };
        let one = run(1);
        for threads in [2, 3, 7] {
            assert!(
                run(threads) == one,
                "{shape}: {threads} threads differ from 1"
            );
        }
    }
}

#[test]
fn force_scalar_switch_selects_scalar() {
    neurokernels::cpu::set_force_scalar(true);
    assert_eq!(Isa::active(), Isa::Scalar);
    neurokernels::cpu::set_force_scalar(false);
    assert!(Isa::available().contains(&Isa::active()));
}

fn expect_tensor_error<T: std::fmt::Debug>(result: Result<T, Error>, tensor: &str) {
    let err = result.expect_err("bad input must be an Err");
    let text = err.to_string();
    assert!(
        text.contains(&format!("`{tensor}`")),
        "error does not name `{tensor}`: {text}"
    );
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let shape = ScanShape::new(2, 3, 4);
    let ok = vec![0.5f32; 24];
    let state = [0f32; 8];
    let mut out = vec![0f32; 24];
    let p = ScanParams::new();
    // wrong rank
    expect_tensor_error(ScanShape::from_dims("a", &[2, 3]), "a");
    expect_tensor_error(ScanShape::from_dims("a", &[2, 3, 4, 1]), "a");
    // mismatched shapes
    expect_tensor_error(
        scan::linear_into(&p, shape, &ok[..23], &ok, None, &mut out),
        "a",
    );
    expect_tensor_error(
        scan::linear_into(&p, shape, &ok, &ok[..20], None, &mut out),
        "b",
    );
    expect_tensor_error(
        scan::linear_into(&p, shape, &ok, &ok, None, &mut out[..1]),
        "h",
    );
    // h0 of the wrong shape
    expect_tensor_error(
        scan::linear_into(&p, shape, &ok, &ok, Some(&state[..7]), &mut out),
        "h0",
    );
    // lengths that overflow
    let huge = ScanShape::new(usize::MAX / 2, 3, 1);
    expect_tensor_error(scan::linear_into(&p, huge, &ok, &ok, None, &mut out), "a");
    let huge_bytes = ScanShape::new(1, usize::MAX / 4, 1);
    expect_tensor_error(scan::linear::<f32>(&p, huge_bytes, &[], &[], None), "a");
    // backward: each tensor
    let (mut da, mut db, mut dh0) = (vec![0f32; 24], vec![0f32; 24], vec![0f32; 8]);
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok[..5],
            &ok,
            None,
            &mut da,
            &mut db,
            &mut dh0,
        ),
        "h",
    );
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok[..5],
            None,
            &mut da,
            &mut db,
            &mut dh0,
        ),
        "dh",
    );
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok,
            Some(&state[..3]),
            &mut da,
            &mut db,
            &mut dh0,
        ),
        "h0",
    );
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok,
            None,
            &mut da[..3],
            &mut db,
            &mut dh0,
        ),
        "da",
    );
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok,
            None,
            &mut da,
            &mut db[..3],
            &mut dh0,
        ),
        "db",
    );
    expect_tensor_error(
        scan::linear_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok,
            None,
            &mut da,
            &mut db,
            &mut dh0[..3],
        ),
        "dh0",
    );
}

#[test]
fn empty_inputs_are_ok_no_ops() {
    let p = ScanParams::new();
    // empty batch
    scan::linear_into::<f32>(&p, ScanShape::new(0, 5, 3), &[], &[], Some(&[]), &mut []).unwrap();
    let g = scan::linear_backward::<f32>(&p, ScanShape::new(0, 5, 3), &[], &[], &[], None).unwrap();
    assert!(g.da.is_empty() && g.dh0.is_empty());
    // no channels
    scan::linear_into::<f32>(&p, ScanShape::new(2, 5, 0), &[], &[], None, &mut []).unwrap();
    // no steps: h0 reaches no output, so its gradient is zero
    let mut dh0 = vec![f32::NAN; 6];
    scan::linear_backward_into::<f32>(
        &p,
        ScanShape::new(2, 0, 3),
        &[],
        &[],
        &[],
        Some(&[1.0; 6]),
        &mut [],
        &mut [],
        &mut dh0,
    )
    .unwrap();
    assert_eq!(dh0, vec![0.0; 6]);
}

#[test]
fn nan_and_inf_propagate_without_panicking() {
    let shape = ScanShape::new(1, 4, 9);
    let mut a = vec![0.5f32; 36];
    let b = vec![1.0f32; 36];
    a[9] = f32::NAN; // t = 1, channel 0
    a[10] = f32::INFINITY; // t = 1, channel 1
    let h = scan::linear(&ScanParams::new(), shape, &a, &b, None).unwrap();
    assert!(h[0].is_finite() && h[9].is_nan() && h[27].is_nan());
    assert!(h[10].is_infinite());
    assert!(h[11].is_finite());
}
