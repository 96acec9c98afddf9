//! The tour: runs every implemented kernel family on built-in data, on the CPU and on CUDA
//! when a device is present, checks each result against a naive float64 reference, and
//! prints a table of throughput and error.
//!
//!     cargo run --release --example tour            (add --features cuda for the GPU rows)

use half::bf16;
use neurokernels::cpu::Isa;
use neurokernels::scan::{self, ScanParams, ScanShape};
use neurokernels::{Element, Result};
use std::time::Instant;

struct Row {
    op: &'static str,
    device: String,
    dtype: &'static str,
    shape: String,
    ms: f64,
    throughput: f64,
    max_err: f64,
}

/// Deterministic data in [lo, hi).
fn data<E: Element>(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<E> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            E::from_f64(lo + (hi - lo) * u)
        })
        .collect()
}

/// Median wall time of `runs` calls, in milliseconds (after one warm-up call).
fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

/// max |got - want| / max(1, |want|): relative for large values, absolute near zero.
fn max_error<E: Element>(got: &[E], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (g.to_f64() - w).abs() / w.abs().max(1.0))
        .fold(0.0, f64::max)
}

fn reference_forward(shape: ScanShape, a: &[f64], b: &[f64]) -> Vec<f64> {
    let (t_len, d) = (shape.len, shape.channels);
    let mut h = vec![0.0; a.len()];
    for bi in 0..shape.batch {
        let mut state = vec![0.0; d];
        for t in 0..t_len {
            let row = (bi * t_len + t) * d;
            for c in 0..d {
                state[c] = a[row + c] * state[c] + b[row + c];
                h[row + c] = state[c];
            }
        }
    }
    h
}

/// db of the backward (the gradient wrt b): g[t] = dh[t] + a[t+1] g[t+1].
fn reference_db(shape: ScanShape, a: &[f64], dh: &[f64]) -> Vec<f64> {
    let (t_len, d) = (shape.len, shape.channels);
    let mut db = vec![0.0; a.len()];
    for bi in 0..shape.batch {
        let mut gated = vec![0.0; d];
        for t in (0..t_len).rev() {
            let row = (bi * t_len + t) * d;
            for c in 0..d {
                let g = dh[row + c] + gated[c];
                db[row + c] = g;
                gated[c] = a[row + c] * g;
            }
        }
    }
    db
}

/// The complex scan: gates of modulus < 1 with random phases, checked against a float64 loop.
fn complex_rows(rows: &mut Vec<Row>, shape: ScanShape) -> Result<()> {
    let n = 2 * shape.numel("a")?;
    let mut a: Vec<f32> = data(n, 7, -1.0, 1.0);
    for pair in a.chunks_mut(2) {
        let norm = (pair[0] * pair[0] + pair[1] * pair[1]).sqrt().max(1e-3);
        let modulus = 0.5 + 0.5 * (pair[0].abs() % 1.0);
        pair[0] *= modulus / norm;
        pair[1] *= modulus / norm;
    }
    let b: Vec<f32> = data(n, 8, -1.0, 1.0);
    let (af, bf) = (to_f64(&a), to_f64(&b));
    let (t_len, d) = (shape.len, shape.channels);
    let mut want = vec![0.0; n];
    for bi in 0..shape.batch {
        for c in 0..d {
            let (mut re, mut im) = (0.0, 0.0);
            for t in 0..t_len {
                let k = 2 * ((bi * t_len + t) * d + c);
                (re, im) = (
                    af[k] * re - af[k + 1] * im + bf[k],
                    af[k] * im + af[k + 1] * re + bf[k + 1],
                );
                (want[k], want[k + 1]) = (re, im);
            }
        }
    }
    let mut h = vec![0f32; n];
    let ms = median_ms(5, || {
        scan::linear_complex_into(&ScanParams::new(), shape, &a, &b, None, &mut h)
    })?;
    rows.push(Row {
        op: "scan.linear_complex",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("{shape} x2"),
        ms,
        throughput: 3.0 * (n * 4) as f64 / ms / 1e6,
        max_err: max_error(&h, &want),
    });
    Ok(())
}

/// Mamba's selective scan (softplus, D skip, z gate) against a float64 loop.
fn selective_rows(rows: &mut Vec<Row>) -> Result<()> {
    use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
    let (b, t, d, n) = (2, 512, 384, 16);
    let shape = SelectiveShape::new(b, t, d, n);
    let (u, delta, z): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        data(b * t * d, 11, -1.0, 1.0),
        data(b * t * d, 12, -1.0, 1.0),
        data(b * t * d, 13, -2.0, 2.0),
    );
    let a: Vec<f32> = data(d * n, 14, -2.0, -0.2);
    let (bm, cm): (Vec<f32>, Vec<f32>) = (
        data(b * t * n, 15, -1.0, 1.0),
        data(b * t * n, 16, -1.0, 1.0),
    );
    let dskip: Vec<f32> = data(d, 17, -1.0, 1.0);
    let inputs = SelectiveInputs {
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
    let params = SelectiveParams::new().delta_softplus(true);
    let mut y = vec![0f32; b * t * d];
    let mut h_last = vec![0f32; b * d * n];
    let ms = median_ms(3, || {
        selective::selective_into(&params, shape, &inputs, &mut y, &mut h_last)
    })?;
    let mut want = vec![0.0; b * t * d];
    for bi in 0..b {
        for c in 0..d {
            let mut x = vec![0.0f64; n];
            for ti in 0..t {
                let k = (bi * t + ti) * d + c;
                let dt = (delta[k] as f64).exp().ln_1p();
                let mut out = 0.0;
                for j in 0..n {
                    let r = (bi * t + ti) * n + j;
                    x[j] =
                        (dt * a[c * n + j] as f64).exp() * x[j] + dt * bm[r] as f64 * u[k] as f64;
                    out += cm[r] as f64 * x[j];
                }
                let zk = z[k] as f64;
                want[k] = (out + dskip[c] as f64 * u[k] as f64) * zk / (1.0 + (-zk).exp());
            }
        }
    }
    rows.push(Row {
        op: "scan.selective",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("[{b}, {t}, {d}] N{n}"),
        ms,
        throughput: (b * t * d) as f64 / ms / 1e3, // M channel-steps/s
        max_err: max_error(&y, &want),
    });
    Ok(())
}

/// Gated linear attention against a float64 recurrence.
fn gla_rows(rows: &mut Vec<Row>) -> Result<()> {
    use neurokernels::scan::gla::{self, GlaInputs, GlaParams, GlaShape};
    let (b, t, h, k, v) = (1, 1024, 4, 64, 64);
    let shape = GlaShape::new(b, t, h, k, v);
    let (q, kk, vv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        data(b * t * h * k, 21, -1.0, 1.0),
        data(b * t * h * k, 22, -1.0, 1.0),
        data(b * t * h * v, 23, -1.0, 1.0),
    );
    let g: Vec<f32> = data(b * t * h * k, 24, -0.2, 0.0);
    let inputs = GlaInputs {
        q: &q,
        k: &kk,
        v: &vv,
        g: &g,
        h0: None,
    };
    let mut o = Vec::new();
    let ms = median_ms(3, || {
        o = gla::gla(&GlaParams::new(), shape, &inputs)?.o;
        Ok(())
    })?;
    let scale = 1.0 / (k as f64).sqrt();
    let mut want = vec![0.0; b * t * h * v];
    for hi in 0..h {
        let mut st = vec![0.0f64; k * v];
        for ti in 0..t {
            let r = ti * h + hi;
            for i in 0..k {
                for j in 0..v {
                    st[i * v + j] = (g[r * k + i] as f64).exp() * st[i * v + j]
                        + kk[r * k + i] as f64 * vv[r * v + j] as f64;
                }
            }
            for j in 0..v {
                want[r * v + j] = scale
                    * (0..k)
                        .map(|i| q[r * k + i] as f64 * st[i * v + j])
                        .sum::<f64>();
            }
        }
    }
    rows.push(Row {
        op: "scan.gla",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("T{t} H{h} K{k} V{v}"),
        ms,
        throughput: (b * t * h) as f64 * 4.0 * (k * v) as f64 / ms / 1e6, // GFLOP/s
        max_err: max_error(&o, &want),
    });
    Ok(())
}

/// Naive f64 causal attention of one (query head, KV head) pair, rows [B, S, H, D] layout:
/// returns o for head h and the probabilities of each row.
#[allow(clippy::too_many_arguments)]
fn attention_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sq: usize,
    sk: usize,
    (hq, hk): (usize, usize),
    (h, kvh): (usize, usize),
    d: usize,
    causal: bool,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let scale = 1.0 / (d as f64).sqrt();
    let mut o = vec![0.0; sq * d];
    let mut probs = Vec::with_capacity(sq);
    for i in 0..sq {
        let seen = if causal {
            (i + sk - sq + 1).min(sk)
        } else {
            sk
        };
        let s: Vec<f64> = (0..seen)
            .map(|j| {
                scale
                    * (0..d)
                        .map(|e| q[(i * hq + h) * d + e] as f64 * k[(j * hk + kvh) * d + e] as f64)
                        .sum::<f64>()
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
        for (j, pj) in p.iter().enumerate() {
            for e in 0..d {
                o[i * d + e] += pj * v[(j * hk + kvh) * d + e] as f64;
            }
        }
        probs.push(p);
    }
    (o, probs)
}

fn attention_rows(rows: &mut Vec<Row>) -> Result<()> {
    use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
    // prefill: causal forward, forward + backward, top_keys (checked on head 0)
    let (s, h, d) = (1024, 4, 64);
    let shape = AttentionShape::new(1, s, s, h, h, d, d);
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        data(s * h * d, 41, -1.0, 1.0),
        data(s * h * d, 42, -1.0, 1.0),
        data(s * h * d, 43, -1.0, 1.0),
    );
    let inputs = AttentionInputs::new(&q, &k, &v);
    let params = AttentionParams::new().causal(true);
    let (want, probs) = attention_reference(&q, &k, &v, s, s, (h, h), (0, 0), d, true);
    let head0 = |o: &[f32]| -> Vec<f32> {
        (0..s)
            .flat_map(|i| o[i * h * d..i * h * d + d].to_vec())
            .collect()
    };
    let mut o = Vec::new();
    let mut lse = Vec::new();
    let ms = median_ms(3, || {
        let out = attention::forward(&params, shape, &inputs)?;
        (o, lse) = (out.o, out.lse);
        Ok(())
    })?;
    let flops = 4.0 * (h * s * s * d) as f64 / 2.0;
    rows.push(Row {
        op: "attention.forward",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("S{s} H{h} D{d} causal"),
        ms,
        throughput: flops / ms / 1e6,
        max_err: max_error(&head0(&o), &want),
    });
    let d_o: Vec<f32> = data(s * h * d, 44, -0.5, 0.5);
    let mut dv = Vec::new();
    let ms = median_ms(3, || {
        dv = attention::backward(&params, shape, &inputs, &o, &d_o, &lse)?.dv;
        Ok(())
    })?;
    // dV of KV head 0 = Σ_i P[i, j] dO[i] over the rows of query head 0
    let mut want_dv = vec![0.0; s * d];
    for (i, p) in probs.iter().enumerate() {
        for (j, pj) in p.iter().enumerate() {
            for e in 0..d {
                want_dv[j * d + e] += pj * d_o[(i * h) * d + e] as f64;
            }
        }
    }
    rows.push(Row {
        op: "attention.backward",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("S{s} H{h} D{d} causal"),
        ms,
        throughput: 2.5 * flops / ms / 1e6,
        max_err: max_error(&head0(&dv), &want_dv),
    });
    let top = 8;
    let mut weights = Vec::new();
    let ms = median_ms(3, || {
        weights = attention::top_keys(&params, shape, &inputs, top)?.weights;
        Ok(())
    })?;
    let mut want_w = Vec::new();
    for p in &probs {
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        sorted.resize(top, 0.0);
        want_w.extend(sorted);
    }
    rows.push(Row {
        op: "attention.top_keys",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("S{s} H{h} D{d} top{top}"),
        ms,
        throughput: 2.0 * flops / ms / 1e6,
        max_err: max_error(&weights[..s * top], &want_w),
    });
    // decode: one query per head against a long KV cache, grouped-query heads (split-KV)
    let (hq, hk, sk, d) = (32, 8, 8192, 128);
    let shape = AttentionShape::new(1, 1, sk, hq, hk, d, d);
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        data(hq * d, 45, -1.0, 1.0),
        data(sk * hk * d, 46, -1.0, 1.0),
        data(sk * hk * d, 47, -1.0, 1.0),
    );
    let inputs = AttentionInputs::new(&q, &k, &v);
    let ms = median_ms(5, || {
        o = attention::forward(&AttentionParams::new(), shape, &inputs)?.o;
        Ok(())
    })?;
    let (want, _) = attention_reference(&q, &k, &v, 1, sk, (hq, hk), (5, 1), d, false);
    rows.push(Row {
        op: "attention.forward",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("decode Hq{hq} Hk{hk} Sk{sk}"),
        ms,
        throughput: (2 * hk * sk * d * 4) as f64 / ms / 1e6, // GB/s of K and V
        max_err: max_error(&o[5 * d..6 * d], &want),
    });
    Ok(())
}

/// Gaussian elimination with partial pivoting: A (m×m) X = B (m×r), all f64.
fn solve_dense(mut a: Vec<f64>, mut b: Vec<f64>, m: usize, r: usize) -> Vec<f64> {
    for c in 0..m {
        let pivot = (c..m)
            .max_by(|i, j| a[i * m + c].abs().total_cmp(&a[j * m + c].abs()))
            .unwrap();
        for k in 0..m {
            a.swap(c * m + k, pivot * m + k);
        }
        for k in 0..r {
            b.swap(c * r + k, pivot * r + k);
        }
        for i in c + 1..m {
            let f = a[i * m + c] / a[c * m + c];
            for k in c..m {
                a[i * m + k] -= f * a[c * m + k];
            }
            for k in 0..r {
                b[i * r + k] -= f * b[c * r + k];
            }
        }
    }
    for c in (0..m).rev() {
        for k in 0..r {
            let mut v = b[c * r + k];
            for j in c + 1..m {
                v -= a[c * m + j] * b[j * r + k];
            }
            b[c * r + k] = v / a[c * m + c];
        }
    }
    b
}

/// (XᵀX + αI)⁻¹ XᵀY in f64 for row-major x [n, p], y [n, t].
fn ridge_reference(x: &[f64], y: &[f64], n: usize, p: usize, t: usize, alpha: f64) -> Vec<f64> {
    let mut gram = vec![0.0; p * p];
    let mut rhs = vec![0.0; p * t];
    for i in 0..n {
        for a in 0..p {
            for b in 0..p {
                gram[a * p + b] += x[i * p + a] * x[i * p + b];
            }
            for c in 0..t {
                rhs[a * t + c] += x[i * p + a] * y[i * t + c];
            }
        }
    }
    for a in 0..p {
        gram[a * p + a] += alpha;
    }
    solve_dense(gram, rhs, p, t)
}

fn ridge_rows(rows: &mut Vec<Row>) -> Result<()> {
    use neurokernels::ridge::{self, BatchedShape, CvInputs, CvParams, RidgeShape};
    // many small independent problems
    let (g, n, p, t) = (256, 128, 32, 8);
    let (x, y): (Vec<f32>, Vec<f32>) = (
        data(g * n * p, 31, -1.0, 1.0),
        data(g * n * t, 32, -1.0, 1.0),
    );
    let alpha: Vec<f32> = data(g, 33, 0.5, 2.0);
    let mut w = Vec::new();
    let ms = median_ms(3, || {
        w = ridge::solve_batched(BatchedShape::new(g, n, p, t), &x, &y, &alpha)?;
        Ok(())
    })?;
    let mut want = Vec::with_capacity(g * p * t);
    for gi in 0..g {
        want.extend(ridge_reference(
            &to_f64(&x[gi * n * p..(gi + 1) * n * p]),
            &to_f64(&y[gi * n * t..(gi + 1) * n * t]),
            n,
            p,
            t,
            alpha[gi] as f64,
        ));
    }
    rows.push(Row {
        op: "ridge.solve_batched",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("G{g} n{n} p{p} t{t}"),
        ms,
        throughput: (g * 2 * n * p * (p + t)) as f64 / ms / 1e6, // GFLOP/s of the products
        max_err: max_error(&w, &want),
    });

    // one design, many targets, an alpha per target by 3-fold cross-validation
    let (n, p, t) = (600, 60, 2000);
    let x: Vec<f32> = data(n * p, 34, -1.0, 1.0);
    let noise: Vec<f32> = data(n * t, 35, -1.0, 1.0);
    let y: Vec<f32> = (0..n * t)
        .map(|i| {
            let (r, c) = (i / t, i % t);
            noise[i] + (c % 7) as f32 * 0.3 * x[r * p + c % p]
        })
        .collect();
    let alphas: Vec<f32> = (0..8).map(|i| 10f32.powi(i - 2)).collect();
    let folds: Vec<i32> = (0..n).map(|i| (i % 3) as i32).collect();
    let inputs = CvInputs {
        x: &x,
        y: &y,
        alphas: &alphas,
        folds: &folds,
    };
    let mut fit = None;
    let ms = median_ms(3, || {
        fit = Some(ridge::cv(
            &CvParams::new(),
            RidgeShape::new(n, p, t),
            &inputs,
            None,
        )?);
        Ok(())
    })?;
    let fit = fit.expect("ran");
    // reference refit of every target at its chosen alpha, centered, in f64
    let mean = |v: &[f32], width: usize, c: usize| {
        (0..n).map(|r| v[r * width + c] as f64).sum::<f64>() / n as f64
    };
    let xm: Vec<f64> = (0..p).map(|c| mean(&x, p, c)).collect();
    let ym: Vec<f64> = (0..t).map(|c| mean(&y, t, c)).collect();
    let xc: Vec<f64> = (0..n * p).map(|i| x[i] as f64 - xm[i % p]).collect();
    let mut want = vec![0.0; p * t];
    for alpha in &alphas {
        let cols: Vec<usize> = (0..t).filter(|c| fit.best_alpha[*c] == *alpha).collect();
        if cols.is_empty() {
            continue;
        }
        let yc: Vec<f64> = (0..n)
            .flat_map(|r| cols.iter().map(move |c| (r, *c)))
            .map(|(r, c)| y[r * t + c] as f64 - ym[c])
            .collect();
        let wa = ridge_reference(&xc, &yc, n, p, cols.len(), *alpha as f64);
        for (k, c) in cols.iter().enumerate() {
            for a in 0..p {
                want[a * t + c] = wa[a * cols.len() + k];
            }
        }
    }
    rows.push(Row {
        op: "ridge.cv",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("n{n} p{p} t{t} A8 F3"),
        ms,
        // the held-out predictions dominate: 2·n_te·p·t per alpha and fold
        throughput: (3 * alphas.len() * 2 * (n / 3) * p * t) as f64 / ms / 1e6,
        max_err: max_error(&fit.w, &want),
    });
    Ok(())
}

fn to_f64<E: Element>(x: &[E]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn scan_rows<E: Element + MaybeCuda>(
    rows: &mut Vec<Row>,
    shape: ScanShape,
    cuda: &CudaHandle,
) -> Result<()> {
    let n = shape.numel("a")?;
    let (a, b, dh): (Vec<E>, Vec<E>, Vec<E>) = (
        data(n, 1, 0.5, 1.0),
        data(n, 2, -1.0, 1.0),
        data(n, 3, -1.0, 1.0),
    );
    let (af, bf, dhf) = (to_f64(&a), to_f64(&b), to_f64(&dh));
    let want_h = reference_forward(shape, &af, &bf);
    let want_db = reference_db(shape, &af, &dhf);
    let p = ScanParams::new();
    let bytes = (n * std::mem::size_of::<E>()) as f64;
    let dtype = E::DTYPE.name();

    let mut h = vec![E::default(); n];
    let ms = median_ms(5, || scan::linear_into(&p, shape, &a, &b, None, &mut h))?;
    let device = format!("cpu ({})", Isa::active().name());
    rows.push(Row {
        op: "scan.linear",
        device: device.clone(),
        dtype,
        shape: shape.to_string(),
        ms,
        throughput: 3.0 * bytes / ms / 1e6,
        max_err: max_error(&h, &want_h),
    });
    let (mut da, mut db, mut dh0) = (
        vec![E::default(); n],
        vec![E::default(); n],
        vec![E::default(); shape.state_numel("dh0")?],
    );
    let ms = median_ms(5, || {
        scan::linear_backward_into(&p, shape, &a, &h, &dh, None, &mut da, &mut db, &mut dh0)
    })?;
    rows.push(Row {
        op: "scan.linear_backward",
        device,
        dtype,
        shape: shape.to_string(),
        ms,
        throughput: 5.0 * bytes / ms / 1e6,
        max_err: max_error(&db, &want_db),
    });
    E::cuda_rows(rows, cuda, shape, &a, &b, &dh, &want_h, &want_db)
}

#[cfg(feature = "cuda")]
type CudaHandle = Option<neurokernels::cuda::Device>;
#[cfg(not(feature = "cuda"))]
type CudaHandle = Option<()>;

/// The GPU rows, where the build and the machine have CUDA.
trait MaybeCuda: Element {
    #[allow(clippy::too_many_arguments)]
    fn cuda_rows(
        rows: &mut Vec<Row>,
        cuda: &CudaHandle,
        shape: ScanShape,
        a: &[Self],
        b: &[Self],
        dh: &[Self],
        want_h: &[f64],
        want_db: &[f64],
    ) -> Result<()>;
}

#[cfg(feature = "cuda")]
impl<E: neurokernels::cuda::CudaElement> MaybeCuda for E {
    fn cuda_rows(
        rows: &mut Vec<Row>,
        cuda: &CudaHandle,
        shape: ScanShape,
        a: &[E],
        b: &[E],
        dh: &[E],
        want_h: &[f64],
        want_db: &[f64],
    ) -> Result<()> {
        let Some(device) = cuda else { return Ok(()) };
        let stream = device.stream().clone();
        let n = a.len();
        let (a_d, b_d, dh_d) = (
            stream.clone_htod(a)?,
            stream.clone_htod(b)?,
            stream.clone_htod(dh)?,
        );
        let mut h_d = stream.alloc_zeros::<E>(n)?;
        let (mut da_d, mut db_d) = (stream.alloc_zeros::<E>(n)?, stream.alloc_zeros::<E>(n)?);
        let mut dh0_d = stream.alloc_zeros::<E>(shape.state_numel("dh0")?)?;
        let p = ScanParams::new();
        let bytes = std::mem::size_of_val(a) as f64;
        let name = format!("cuda ({})", device.name()?);
        let ms = median_ms(20, || {
            scan::cuda::linear(device, &stream, &p, shape, &a_d, &b_d, None, &mut h_d)?;
            Ok(stream.synchronize()?)
        })?;
        let h = stream.clone_dtoh(&h_d)?;
        rows.push(Row {
            op: "scan.linear",
            device: name.clone(),
            dtype: E::DTYPE.name(),
            shape: shape.to_string(),
            ms,
            throughput: 3.0 * bytes / ms / 1e6,
            max_err: max_error(&h, want_h),
        });
        let ms = median_ms(20, || {
            scan::cuda::linear_backward(
                device, &stream, &p, shape, &a_d, &h_d, &dh_d, None, &mut da_d, &mut db_d,
                &mut dh0_d,
            )?;
            Ok(stream.synchronize()?)
        })?;
        let db = stream.clone_dtoh(&db_d)?;
        rows.push(Row {
            op: "scan.linear_backward",
            device: name,
            dtype: E::DTYPE.name(),
            shape: shape.to_string(),
            ms,
            throughput: 5.0 * bytes / ms / 1e6,
            max_err: max_error(&db, want_db),
        });
        Ok(())
    }
}

#[cfg(not(feature = "cuda"))]
impl<E: Element> MaybeCuda for E {
    fn cuda_rows(
        _: &mut Vec<Row>,
        _: &CudaHandle,
        _: ScanShape,
        _: &[E],
        _: &[E],
        _: &[E],
        _: &[f64],
        _: &[f64],
    ) -> Result<()> {
        Ok(())
    }
}

fn open_cuda() -> (CudaHandle, String) {
    #[cfg(feature = "cuda")]
    {
        match neurokernels::cuda::Device::open(0) {
            Ok(d) => (Some(d), String::new()),
            Err(e) => (None, format!("CUDA rows skipped: {e}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        (
            None,
            "CUDA rows skipped: built without `--features cuda`".to_string(),
        )
    }
}

/// The sparse top-k family: the fused SAE encoder (GFLOP/s of its product), row top-k and
/// the sparse decode (GB/s of what they must read), against dense float64 references.
fn topk_rows(rows: &mut Vec<Row>) -> Result<()> {
    use neurokernels::topk::{self, EncoderInputs, RowsParams, RowsShape, SaeShape};
    let (b, dm, l, k) = (256, 256, 8192, 32);
    let x: Vec<f32> = data(b * dm, 41, -1.0, 1.0);
    let w: Vec<f32> = data(l * dm, 42, -0.1, 0.1);
    let b_enc: Vec<f32> = data(l, 43, -0.05, 0.05);
    let s = SaeShape::new(b, dm, l);
    let inputs = EncoderInputs {
        x: &x,
        w_enc: &w,
        b_enc: &b_enc,
        b_dec: None,
    };
    let mut picked = None;
    let ms = median_ms(3, || {
        picked = Some(topk::encode(s, k, &inputs)?);
        Ok(())
    })?;
    let picked = picked.expect("ran");
    // reference: every pre-activation in f64, relu, sorted; compare the k best values
    let (xf, wf) = (to_f64(&x), to_f64(&w));
    let mut want = Vec::with_capacity(b * k);
    for r in 0..b {
        let mut z: Vec<f64> = (0..l)
            .map(|j| {
                let dot: f64 = (0..dm).map(|d| xf[r * dm + d] * wf[j * dm + d]).sum();
                (dot + b_enc[j] as f64).max(0.0)
            })
            .collect();
        z.sort_by(|a, c| c.total_cmp(a));
        want.extend_from_slice(&z[..k]);
    }
    rows.push(Row {
        op: "sae.encode",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("B{b} D{dm} L{l} k{k}"),
        ms,
        throughput: (2 * b * l * dm) as f64 / ms / 1e6,
        max_err: max_error(&picked.values, &want),
    });

    let (r, n) = (256, 32768);
    let m: Vec<f32> = data(r * n, 44, -1.0, 1.0);
    let mut top = None;
    let ms = median_ms(3, || {
        top = Some(topk::rows(&RowsParams::new(), RowsShape::new(r, n), k, &m)?);
        Ok(())
    })?;
    let top = top.expect("ran");
    let mut want = Vec::with_capacity(r * k);
    for row in m.chunks(n) {
        let mut v = to_f64(row);
        v.sort_by(|a, c| c.total_cmp(a));
        want.extend_from_slice(&v[..k]);
    }
    rows.push(Row {
        op: "topk.rows",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("R{r} N{n} k{k}"),
        ms,
        throughput: (r * n * 4) as f64 / ms / 1e6,
        max_err: max_error(&top.values, &want),
    });

    let w_dec: Vec<f32> = data(l * dm, 45, -1.0, 1.0);
    let mut x_hat = Vec::new();
    let ms = median_ms(3, || {
        x_hat = topk::decode(s, k, &picked.indices, &picked.values, &w_dec, None)?;
        Ok(())
    })?;
    let wd = to_f64(&w_dec);
    let want: Vec<f64> = (0..b * dm)
        .map(|i| {
            let (row, d) = (i / dm, i % dm);
            (0..k)
                .map(|j| {
                    let at = row * k + j;
                    picked.values[at] as f64 * wd[picked.indices[at] as usize * dm + d]
                })
                .sum()
        })
        .collect();
    rows.push(Row {
        op: "sae.decode",
        device: format!("cpu ({})", Isa::active().name()),
        dtype: "f32",
        shape: format!("B{b} D{dm} L{l} k{k}"),
        ms,
        throughput: (b * k * dm * 4) as f64 / ms / 1e6,
        max_err: max_error(&x_hat, &want),
    });
    Ok(())
}

fn main() -> Result<()> {
    let (cuda, cuda_note) = open_cuda();
    let mut rows = Vec::new();
    // a channel-parallel shape and a long sequence on few channels (time-parallel on CPU)
    for shape in [ScanShape::new(4, 2048, 512), ScanShape::new(1, 131_072, 16)] {
        scan_rows::<f32>(&mut rows, shape, &cuda)?;
        scan_rows::<bf16>(&mut rows, shape, &cuda)?;
    }
    complex_rows(&mut rows, ScanShape::new(4, 2048, 256))?;
    selective_rows(&mut rows)?;
    gla_rows(&mut rows)?;
    ridge_rows(&mut rows)?;
    topk_rows(&mut rows)?;
    attention_rows(&mut rows)?;
    println!("neurokernels tour: each result checked against a naive float64 reference");
    println!(
        "(max error = max |got - ref| / max(1, |ref|); throughput: GB/s for the memory-bound scans,\n \
         each tensor read or written once; M channel-steps/s for scan.selective; GFLOP/s for scan.gla,\n \
         ridge, sae.encode and attention (GB/s of K and V for the decode); GB/s read for topk.rows\n \
         and sae.decode; ridge.cv's max error is its refit against an f64 solve at the chosen alphas)\n"
    );
    println!(
        "{:<22} {:<22} {:<5} {:<20} {:>9} {:>11} {:>10}",
        "op", "device", "dtype", "shape", "ms", "throughput", "max error"
    );
    for r in &rows {
        println!(
            "{:<22} {:<22} {:<5} {:<20} {:>9.3} {:>11.2} {:>10.2e}",
            r.op, r.device, r.dtype, r.shape, r.ms, r.throughput, r.max_err
        );
    }
    if !cuda_note.is_empty() {
        println!("\n{cuda_note}");
    }
    Ok(())
}
