//! scan.linear_complex and its backward on the CPU: every ISA, dtype, direction, with and
//! without h0, odd sizes, rows held in registers and the time-parallel plan, against naive
//! float64 complex loops; plus the identity with two real scans when the gates are real,
//! determinism, and bad input.

mod common;

use common::{Rng, complex_backward_f64, complex_forward_f64, complex_gates, to_f64, worst_ratio};
use half::{bf16, f16};
use neurokernels::cpu::Isa;
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::{DType, Element};

const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (3, 17, 13),
    // rows of 8, 16 and 32 floats: one, two and four AVX2 vectors held in registers
    (2, 40, 4),
    (2, 33, 8),
    (1, 50, 16),
    (4, 64, 65),
    // long sequences on few channels: the time-parallel plan
    (1, 140_000, 3),
    (2, 70_001, 2),
];

fn tolerance<E: Element>() -> (f64, f64) {
    match E::DTYPE {
        DType::F64 => (1e-10, 1e-12),
        DType::F32 => (1e-4, 1e-5),
        _ => (1e-2, 1e-2),
    }
}

fn check<E: Element>(seed: u64) {
    let (rtol, atol) = tolerance::<E>();
    for (k, &(bsz, t, d)) in SHAPES.iter().enumerate() {
        let n = 2 * bsz * t * d;
        let shape = ScanShape::new(bsz, t, d);
        let mut rng = Rng::new(seed + k as u64);
        let a: Vec<E> = complex_gates(&mut rng, n / 2, 0.5, 1.0);
        let b: Vec<E> = rng.vec(n, -1.0, 1.0);
        let h0: Vec<E> = rng.vec(2 * bsz * d, -1.0, 1.0);
        let dh: Vec<E> = rng.vec(n, -1.0, 1.0);
        for isa in Isa::available() {
            for reverse in [false, true] {
                for with_h0 in [false, true] {
                    let what = format!(
                        "{} {isa:?} {shape} reverse={reverse} h0={with_h0}",
                        E::DTYPE
                    );
                    let p = ScanParams::new().reverse(reverse);
                    let h0_opt = with_h0.then_some(h0.as_slice());
                    let mut h = vec![E::from_f64(f64::NAN); n];
                    scan::linear_complex_into_on(isa, &p, shape, &a, &b, h0_opt, &mut h).unwrap();
                    let h0_f = with_h0.then(|| to_f64(&h0));
                    let want = complex_forward_f64(
                        bsz,
                        t,
                        d,
                        &to_f64(&a),
                        &to_f64(&b),
                        h0_f.as_deref(),
                        reverse,
                    );
                    let r = worst_ratio(&to_f64(&h), &want, rtol, atol);
                    assert!(r <= 1.0, "forward {what}: {r} x tolerance");

                    let nan = E::from_f64(f64::NAN);
                    let (mut da, mut db, mut dh0) =
                        (vec![nan; n], vec![nan; n], vec![nan; 2 * bsz * d]);
                    scan::linear_complex_backward_into_on(
                        isa, &p, shape, &a, &h, &dh, h0_opt, &mut da, &mut db, &mut dh0,
                    )
                    .unwrap();
                    let (wda, wdb, wdh0) = complex_backward_f64(
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
                        assert!(r <= 1.0, "backward {name} {what}: {r} x tolerance");
                    }
                }
            }
        }
    }
}

#[test]
fn f32_matches_f64_reference_on_every_isa() {
    check::<f32>(11);
}

#[test]
fn f64_matches_f64_reference_on_every_isa() {
    check::<f64>(12);
}

#[test]
fn f16_matches_f64_reference_on_every_isa() {
    check::<f16>(13);
}

#[test]
fn bf16_matches_f64_reference_on_every_isa() {
    check::<bf16>(14);
}

#[test]
fn real_gates_make_two_independent_real_scans() {
    // with Im(a) = 0 the real and imaginary parts evolve separately
    let (bsz, t, d) = (2, 300, 5);
    let shape = ScanShape::new(bsz, t, d);
    let mut rng = Rng::new(3);
    let ar: Vec<f32> = rng.vec(bsz * t * d, 0.5, 1.0);
    let (br, bi): (Vec<f32>, Vec<f32>) = (
        rng.vec(bsz * t * d, -1.0, 1.0),
        rng.vec(bsz * t * d, -1.0, 1.0),
    );
    let interleave = |re: &[f32], im: &[f32]| {
        re.iter()
            .zip(im)
            .flat_map(|(x, y)| [*x, *y])
            .collect::<Vec<f32>>()
    };
    let a = interleave(&ar, &vec![0.0; ar.len()]);
    let b = interleave(&br, &bi);
    let h = scan::linear_complex(&ScanParams::new(), shape, &a, &b, None).unwrap();
    let hr = scan::linear(&ScanParams::new(), shape, &ar, &br, None).unwrap();
    let hi = scan::linear(&ScanParams::new(), shape, &ar, &bi, None).unwrap();
    let r = worst_ratio(&to_f64(&h), &to_f64(&interleave(&hr, &hi)), 1e-6, 1e-7);
    assert!(r <= 1.0, "{r}");
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let shape = ScanShape::new(1, 140_000, 3);
    let n = 2 * 140_000 * 3;
    let mut rng = Rng::new(8);
    let a: Vec<f32> = complex_gates(&mut rng, n / 2, 0.5, 1.0);
    let b: Vec<f32> = rng.vec(n, -1.0, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let isa = Isa::detected();
        pool.install(|| {
            let mut h = vec![0f32; n];
            scan::linear_complex_into_on(isa, &ScanParams::new(), shape, &a, &b, None, &mut h)
                .unwrap();
            let (mut da, mut db, mut dh0) = (vec![0f32; n], vec![0f32; n], vec![0f32; 6]);
            scan::linear_complex_backward_into_on(
                isa,
                &ScanParams::new(),
                shape,
                &a,
                &h,
                &b,
                None,
                &mut da,
                &mut db,
                &mut dh0,
            )
            .unwrap();
            (h, da, db, dh0)
        })
    };
    let one = run(1);
    assert!(run(2) == one && run(5) == one);
}

#[test]
fn bad_input_is_an_error_naming_the_tensor() {
    let shape = ScanShape::new(2, 3, 4);
    let ok = vec![0.5f32; 48];
    let mut out = vec![0f32; 48];
    let p = ScanParams::new();
    let name = |r: neurokernels::Result<()>| r.unwrap_err().to_string();
    // a real-sized buffer is half of what a complex scan needs
    assert!(
        name(scan::linear_complex_into(
            &p,
            shape,
            &ok[..24],
            &ok,
            None,
            &mut out
        ))
        .contains("`a`")
    );
    assert!(
        name(scan::linear_complex_into(
            &p,
            shape,
            &ok,
            &ok,
            Some(&ok[..8]),
            &mut out
        ))
        .contains("`h0`")
    );
    assert!(
        name(scan::linear_complex_into(
            &p,
            shape,
            &ok,
            &ok,
            None,
            &mut out[..47]
        ))
        .contains("`h`")
    );
    assert!(
        ScanShape::from_complex_dims("a", &[2, 3, 4])
            .unwrap_err()
            .to_string()
            .contains("`a`")
    );
    assert!(ScanShape::from_complex_dims("a", &[2, 3, 4, 3]).is_err());
    assert_eq!(
        ScanShape::from_complex_dims("a", &[2, 3, 4, 2]).unwrap(),
        shape
    );
    let (mut da, mut db, mut dh0) = (vec![0f32; 48], vec![0f32; 48], vec![0f32; 16]);
    assert!(
        name(scan::linear_complex_backward_into(
            &p,
            shape,
            &ok,
            &ok,
            &ok,
            None,
            &mut da,
            &mut db,
            &mut dh0[..8]
        ))
        .contains("`dh0`")
    );
    let huge = ScanShape::new(usize::MAX / 4, 2, 2);
    assert!(
        name(scan::linear_complex_into(
            &p, huge, &ok, &ok, None, &mut out
        ))
        .contains("`a`")
    );
}
