//! Two research workloads on the scan kernels, each checked against a direct computation.
//!
//! 1. LightNet's additive recurrence ("You Only Scan Once") over a 2-D grid: an H×W feature
//!    map is flattened row-major into one sequence, and every position attends to all
//!    positions before it with weights normalized along each key channel,
//!    o[t] = scale · Σ_i q[t,i] · Σ_{τ<=t} softmax_{τ'<=t}(k[τ',i])[τ] · v[τ].
//!    Through `scan.gla`: z = logcumsumexp(k) along time, k' = exp(k − z),
//!    g = z[t−1] − z[t] (<= 0), then gated linear attention on (q, k', v, g). Direct: the
//!    double sum with explicit prefix normalizers, in float64.
//! 2. An LRU layer (complex diagonal recurrence): h[t] = λ ⊙ h[t−1] + B·x[t] with |λ| < 1,
//!    y[t] = Re(C·h[t]), over a long sequence through `scan.linear_complex`; direct: the
//!    same loop in float64 complex arithmetic.
//!
//!     cargo run --release --example lightnet_recurrence

use neurokernels::Result;
use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
use neurokernels::scan::{self, ScanParams, ScanShape};
use std::time::Instant;

fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            lo + (hi - lo)
                * ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64)
        })
        .collect()
}

fn lightnet() -> Result<()> {
    let (height, width, heads, kd, vd) = (24, 24, 2, 16, 16);
    let t_len = height * width; // the grid, row-major
    let shape = GlaShape::new(1, t_len, heads, kd, vd);
    let (q, k, v) = (
        values(t_len * heads * kd, 1, -1.0, 1.0),
        values(t_len * heads * kd, 2, -2.0, 2.0),
        values(t_len * heads * vd, 3, -1.0, 1.0),
    );
    // z = logcumsumexp(k) per (head, channel), stably: running max plus log of the scaled sum
    let mut k_norm = vec![0.0; k.len()];
    let mut g = vec![0.0; k.len()];
    for hi in 0..heads {
        for i in 0..kd {
            let mut z_prev = f64::NEG_INFINITY;
            for t in 0..t_len {
                let at = (t * heads + hi) * kd + i;
                let z = if z_prev == f64::NEG_INFINITY {
                    k[at]
                } else {
                    let m = z_prev.max(k[at]);
                    m + ((z_prev - m).exp() + (k[at] - m).exp()).ln()
                };
                k_norm[at] = (k[at] - z).exp();
                g[at] = if t == 0 { 0.0 } else { z_prev - z };
                z_prev = z;
            }
        }
    }
    let scale = 1.0 / (kd as f64).sqrt();
    let to32 = |x: &[f64]| x.iter().map(|v| *v as f32).collect::<Vec<f32>>();
    let (q32, k32, v32, g32) = (to32(&q), to32(&k_norm), to32(&v), to32(&g));
    let inputs = GlaInputs {
        q: &q32,
        k: &k32,
        v: &v32,
        g: &g32,
        h0: None,
    };
    let start = Instant::now();
    let o = gla::gla(&GlaParams::new(), shape, &inputs)?.o;
    let ms = start.elapsed().as_secs_f64() * 1e3;

    // direct: prefix-softmax weights per key channel, in float64
    let mut worst: f64 = 0.0;
    for hi in 0..heads {
        let mut norm = vec![0.0; kd]; // Σ_{τ<=t} exp(k[τ, i])
        let mut acc = vec![0.0; kd * vd]; // Σ_{τ<=t} exp(k[τ, i]) v[τ]
        for t in 0..t_len {
            let r = t * heads + hi;
            for i in 0..kd {
                let e = k[r * kd + i].exp();
                norm[i] += e;
                for j in 0..vd {
                    acc[i * vd + j] += e * v[r * vd + j];
                }
            }
            for j in 0..vd {
                let want = scale
                    * (0..kd)
                        .map(|i| q[r * kd + i] * acc[i * vd + j] / norm[i])
                        .sum::<f64>();
                worst = worst.max((o[r * vd + j] as f64 - want).abs() / want.abs().max(1.0));
            }
        }
    }
    println!(
        "LightNet on a {height}x{width} grid ({heads} heads, K={kd}, V={vd}) through scan.gla: {ms:.2} ms, max error vs direct {worst:.2e}"
    );
    assert!(
        worst < 1e-4,
        "LightNet recurrence disagrees with the direct computation: {worst}"
    );
    Ok(())
}

fn lru() -> Result<()> {
    let (t_len, d_in, d_state) = (100_000, 4, 32);
    // λ = r·e^{iθ} per state channel, |λ| in (0.9, 0.999); B [d_state, d_in], C [d_state]
    let (r, theta) = (
        values(d_state, 4, 0.9, 0.999),
        values(d_state, 5, -0.5, 0.5),
    );
    let (b_re, b_im) = (
        values(d_state * d_in, 6, -0.5, 0.5),
        values(d_state * d_in, 7, -0.5, 0.5),
    );
    let (c_re, c_im) = (values(d_state, 8, -1.0, 1.0), values(d_state, 9, -1.0, 1.0));
    let x = values(t_len * d_in, 10, -1.0, 1.0);
    // scan inputs [1, T, d_state, 2]: a = λ at every step, b = B·x[t]
    let mut a = vec![0f32; 2 * t_len * d_state];
    let mut b = vec![0f32; 2 * t_len * d_state];
    for t in 0..t_len {
        for s in 0..d_state {
            let at = 2 * (t * d_state + s);
            a[at] = (r[s] * theta[s].cos()) as f32;
            a[at + 1] = (r[s] * theta[s].sin()) as f32;
            let (mut re, mut im) = (0.0, 0.0);
            for i in 0..d_in {
                re += b_re[s * d_in + i] * x[t * d_in + i];
                im += b_im[s * d_in + i] * x[t * d_in + i];
            }
            b[at] = re as f32;
            b[at + 1] = im as f32;
        }
    }
    let start = Instant::now();
    let h = scan::linear_complex(
        &ScanParams::new(),
        ScanShape::new(1, t_len, d_state),
        &a,
        &b,
        None,
    )?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    // y[t] = Re(Σ_s C[s]·h[t, s]) against the same recurrence in float64
    let mut state = vec![(0.0f64, 0.0f64); d_state];
    let mut worst: f64 = 0.0;
    for t in 0..t_len {
        let (mut y, mut want) = (0.0, 0.0);
        for s in 0..d_state {
            let at = 2 * (t * d_state + s);
            let (lr, li) = (a[at] as f64, a[at + 1] as f64);
            let (hr, hi) = state[s];
            state[s] = (
                lr * hr - li * hi + b[at] as f64,
                lr * hi + li * hr + b[at + 1] as f64,
            );
            want += c_re[s] * state[s].0 - c_im[s] * state[s].1;
            y += c_re[s] * h[at] as f64 - c_im[s] * h[at + 1] as f64;
        }
        worst = worst.max((y - want).abs() / want.abs().max(1.0));
    }
    println!(
        "LRU layer, T={t_len}, {d_state} complex states, through scan.linear_complex: {ms:.2} ms, max error vs direct {worst:.2e}"
    );
    assert!(
        worst < 1e-3,
        "LRU scan disagrees with the direct loop: {worst}"
    );
    Ok(())
}

fn main() -> Result<()> {
    lightnet()?;
    lru()
}
