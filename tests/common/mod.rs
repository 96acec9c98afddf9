//! Helpers shared by the integration tests: a small deterministic RNG and the naive float64
//! references.
#![allow(dead_code)]

use neurokernels::Element;

pub mod attention;

/// xorshift64*: deterministic, dependency-free test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    pub fn vec<E: Element>(&mut self, n: usize, lo: f64, hi: f64) -> Vec<E> {
        (0..n).map(|_| E::from_f64(self.uniform(lo, hi))).collect()
    }
}

pub fn to_f64<E: Element>(x: &[E]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Naive float64 `scan.linear`.
pub fn scan_forward_f64(
    b_: usize,
    t_: usize,
    d_: usize,
    a: &[f64],
    b: &[f64],
    h0: Option<&[f64]>,
    reverse: bool,
) -> Vec<f64> {
    let mut h = vec![0.0; a.len()];
    for bi in 0..b_ {
        for c in 0..d_ {
            let mut s = h0.map_or(0.0, |h0| h0[bi * d_ + c]);
            for i in 0..t_ {
                let t = if reverse { t_ - 1 - i } else { i };
                let at = (bi * t_ + t) * d_ + c;
                s = a[at] * s + b[at];
                h[at] = s;
            }
        }
    }
    h
}

/// Naive float64 `scan.linear_backward`: (da, db, dh0).
#[allow(clippy::too_many_arguments)]
pub fn scan_backward_f64(
    b_: usize,
    t_: usize,
    d_: usize,
    a: &[f64],
    h: &[f64],
    dh: &[f64],
    h0: Option<&[f64]>,
    reverse: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut da, mut db, mut dh0) = (vec![0.0; a.len()], vec![0.0; a.len()], vec![0.0; b_ * d_]);
    for bi in 0..b_ {
        for c in 0..d_ {
            let mut g_next_gated = 0.0; // a[s+1] * g[s+1]
            for i in (0..t_).rev() {
                let t = if reverse { t_ - 1 - i } else { i };
                let at = (bi * t_ + t) * d_ + c;
                let g = dh[at] + g_next_gated;
                db[at] = g;
                let prev = if i == 0 {
                    h0.map_or(0.0, |h0| h0[bi * d_ + c])
                } else {
                    let tp = if reverse { t + 1 } else { t - 1 };
                    h[(bi * t_ + tp) * d_ + c]
                };
                da[at] = g * prev;
                g_next_gated = a[at] * g;
            }
            dh0[bi * d_ + c] = g_next_gated;
        }
    }
    (da, db, dh0)
}

/// Largest |got - want| / (atol + rtol |want|); <= 1 passes.
pub fn worst_ratio(got: &[f64], want: &[f64], rtol: f64, atol: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / (atol + rtol * w.abs()))
        .fold(0.0, f64::max)
}

/// CUDA device 0, or `None` (with `SKIPPED` on stderr) without one. Where
/// `NEUROKERNELS_REQUIRE_GPU` is set (scripts/cuda-emulator.sh sets it) a missing device fails
/// the test instead. On the project's emulator the first test to open it says so.
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub fn device_or_skip(test: &str) -> Option<neurokernels::cuda::Device> {
    use std::io::Write;
    match neurokernels::cuda::Device::open(0) {
        Ok(d) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            if d.is_emulated() {
                SAID.call_once(|| {
                    let name = d.name().unwrap_or_default();
                    let _ = writeln!(std::io::stderr(), "EMULATED GPU tests run on {name}");
                });
            }
            Some(d)
        }
        Err(e) => {
            assert!(
                std::env::var_os("NEUROKERNELS_REQUIRE_GPU").is_none(),
                "{test}: NEUROKERNELS_REQUIRE_GPU is set, but {e}"
            );
            say_skipped(&format!("{test}: {e}"));
            None
        }
    }
}

/// Prints a skip notice past libtest's output capture (which only catches the print
/// macros), so a test without its device says so in the test log instead of passing silently.
pub fn say_skipped(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {message}");
}

fn cmul(a: [f64; 2], x: [f64; 2]) -> [f64; 2] {
    [a[0] * x[0] - a[1] * x[1], a[0] * x[1] + a[1] * x[0]]
}

fn conj(a: [f64; 2]) -> [f64; 2] {
    [a[0], -a[1]]
}

fn at(v: &[f64], i: usize) -> [f64; 2] {
    [v[2 * i], v[2 * i + 1]]
}

fn put(v: &mut [f64], i: usize, x: [f64; 2]) {
    v[2 * i] = x[0];
    v[2 * i + 1] = x[1];
}

/// Naive float64 `scan.linear_complex` on interleaved [B, T, D, 2] data.
pub fn complex_forward_f64(
    b_: usize,
    t_: usize,
    d_: usize,
    a: &[f64],
    b: &[f64],
    h0: Option<&[f64]>,
    reverse: bool,
) -> Vec<f64> {
    let mut h = vec![0.0; a.len()];
    for bi in 0..b_ {
        for c in 0..d_ {
            let mut s = h0.map_or([0.0; 2], |h0| at(h0, bi * d_ + c));
            for i in 0..t_ {
                let t = if reverse { t_ - 1 - i } else { i };
                let k = (bi * t_ + t) * d_ + c;
                let m = cmul(at(a, k), s);
                s = [m[0] + at(b, k)[0], m[1] + at(b, k)[1]];
                put(&mut h, k, s);
            }
        }
    }
    h
}

/// Naive float64 backward of the complex scan (PyTorch's convention for complex gradients):
/// (da, db, dh0).
#[allow(clippy::too_many_arguments)]
pub fn complex_backward_f64(
    b_: usize,
    t_: usize,
    d_: usize,
    a: &[f64],
    h: &[f64],
    dh: &[f64],
    h0: Option<&[f64]>,
    reverse: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut da, mut db, mut dh0) = (
        vec![0.0; a.len()],
        vec![0.0; a.len()],
        vec![0.0; 2 * b_ * d_],
    );
    for bi in 0..b_ {
        for c in 0..d_ {
            let mut q = [0.0; 2]; // conj(a[s+1]) g[s+1]
            for i in (0..t_).rev() {
                let t = if reverse { t_ - 1 - i } else { i };
                let k = (bi * t_ + t) * d_ + c;
                let g = [at(dh, k)[0] + q[0], at(dh, k)[1] + q[1]];
                put(&mut db, k, g);
                let prev = if i == 0 {
                    h0.map_or([0.0; 2], |h0| at(h0, bi * d_ + c))
                } else {
                    let tp = if reverse { t + 1 } else { t - 1 };
                    at(h, (bi * t_ + tp) * d_ + c)
                };
                put(&mut da, k, cmul(conj(prev), g));
                q = cmul(conj(at(a, k)), g);
            }
            put(&mut dh0, bi * d_ + c, q);
        }
    }
    (da, db, dh0)
}

/// Complex gates with |a| in [lo, hi) and a random phase, interleaved.
pub fn complex_gates<E: Element>(rng: &mut Rng, channels: usize, lo: f64, hi: f64) -> Vec<E> {
    let mut v = Vec::with_capacity(2 * channels);
    for _ in 0..channels {
        let (r, phase) = (
            rng.uniform(lo, hi),
            rng.uniform(-std::f64::consts::PI, std::f64::consts::PI),
        );
        v.push(E::from_f64(r * phase.cos()));
        v.push(E::from_f64(r * phase.sin()));
    }
    v
}
