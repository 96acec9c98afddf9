//! ridge.solve_batched on the GPU against the CPU (skipped without a device): f32 and f64,
//! primal and dual problems, several right-hand-side passes, the order limit and a failed
//! factorization reported as an error.

#![cfg(feature = "cuda")]

mod common;

use common::{Rng, to_f64, worst_ratio};
use neurokernels::cuda::{CudaElement, Device};
use neurokernels::ridge::{self, BatchedShape};

fn device_or_skip(test: &str) -> Option<Device> {
    match Device::open(0) {
        Ok(d) => Some(d),
        Err(e) => {
            common::say_skipped(&format!("{test}: {e}"));
            None
        }
    }
}

fn check<E: CudaElement>(device: &Device, seed: u64, rtol: f64, atol: f64) {
    for (i, &(g, n, p, t)) in [
        (7, 80, 64, 3),
        (5, 20, 90, 37),
        (3, 1, 1, 1),
        (4, 64, 64, 16),
    ]
    .iter()
    .enumerate()
    {
        let s = BatchedShape::new(g, n, p, t);
        let mut rng = Rng::new(seed + i as u64);
        let x: Vec<E> = rng.vec(g * n * p, -1.0, 1.0);
        let y: Vec<E> = rng.vec(g * n * t, -1.0, 1.0);
        let alpha: Vec<E> = rng.vec(g, 0.05, 2.0);
        let want = ridge::solve_batched(s, &x, &y, &alpha).unwrap();
        let got = ridge::cuda::solve_batched_host(device, s, &x, &y, &alpha).unwrap();
        let r = worst_ratio(&to_f64(&got), &to_f64(&want), rtol, atol);
        assert!(r <= 1.0, "{} {s:?}: {r} x tolerance", E::DTYPE);
    }
}

#[test]
fn cuda_solve_batched_matches_cpu() {
    if let Some(dev) = device_or_skip("cuda_solve_batched_matches_cpu") {
        check::<f32>(&dev, 1, 1e-4, 1e-5);
        check::<f64>(&dev, 2, 1e-10, 1e-12);
    }
}

#[test]
fn cuda_solve_batched_limits_and_errors() {
    let Some(dev) = device_or_skip("cuda_solve_batched_limits_and_errors") else {
        return;
    };
    // min(n, p) = 65 is past the shared-memory factor
    let s = BatchedShape::new(1, 70, 65, 1);
    let (x, y) = (vec![0.5f32; 70 * 65], vec![0.5f32; 70]);
    let err = ridge::cuda::solve_batched_host(&dev, s, &x, &y, &[1.0]).unwrap_err();
    assert!(err.to_string().contains("= 65"), "{err}");
    // bad values are refused on the host, naming the tensor
    let s = BatchedShape::new(2, 4, 3, 1);
    let (x, y) = (vec![0.5f64; 24], vec![0.5f64; 8]);
    let err = ridge::cuda::solve_batched_host(&dev, s, &x, &y, &[1.0, -1.0]).unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");
}
