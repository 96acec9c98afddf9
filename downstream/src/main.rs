//! One step of each kernel family, written as a user's crate writes it: attention forward and
//! backward with grouped-query heads, a top-k SAE step, ridge.cv with predictions and scores,
//! and Mamba's selective scan. `downstream [REPEATS]` times the steps (the inputs are made
//! once, outside the timing) and prints the median step time.
use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
use neurokernels::topk::{self, BackwardInputs, EncoderInputs, SaeShape};
use std::time::Instant;

fn data(n: usize, seed: u32) -> Vec<f32> {
    let unit = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32;
    (0..n).map(|i| unit(i) / 16_777_216.0 - 0.5).collect()
}

/// Every input, made once.
struct Inputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    x: Vec<f32>,
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    w_dec: Vec<f32>,
    d_xhat: Vec<f32>,
    xr: Vec<f32>,
    yr: Vec<f32>,
    folds: Vec<i32>,
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    bm: Vec<f32>,
    cm: Vec<f32>,
}

const ATTENTION_Q: [usize; 4] = [1, 512, 8, 64]; // [B, S, Hq, D]
const ATTENTION_KV: [usize; 4] = [1, 512, 2, 64]; // [B, S, Hk, D]: 4 query heads per KV head
const SAE: SaeShape = SaeShape {
    batch: 256,
    dm: 256,
    latents: 4096,
};
const SAE_K: usize = 32;
const RIDGE: RidgeShape = RidgeShape {
    samples: 600,
    features: 60,
    targets: 2000,
};
const MAMBA: SelectiveShape = SelectiveShape {
    batch: 1,
    len: 1024,
    channels: 256,
    state: 16,
};

impl Inputs {
    fn new() -> Self {
        let numel = |dims: &[usize]| dims.iter().product::<usize>();
        let (b, t, d, n) = (MAMBA.batch, MAMBA.len, MAMBA.channels, MAMBA.state);
        Inputs {
            q: data(numel(&ATTENTION_Q), 1),
            k: data(numel(&ATTENTION_KV), 2),
            v: data(numel(&ATTENTION_KV), 3),
            x: data(SAE.batch * SAE.dm, 4),
            w_enc: data(SAE.latents * SAE.dm, 5),
            b_enc: data(SAE.latents, 6),
            w_dec: data(SAE.latents * SAE.dm, 7),
            d_xhat: data(SAE.batch * SAE.dm, 8),
            xr: data(RIDGE.samples * RIDGE.features, 9),
            yr: data(RIDGE.samples * RIDGE.targets, 10),
            folds: (0..RIDGE.samples as i32).map(|i| i % 3).collect(),
            u: data(b * t * d, 11),
            delta: data(b * t * d, 12),
            a: data(d * n, 13).iter().map(|v| v - 1.0).collect(),
            bm: data(b * t * n, 14),
            cm: data(b * t * n, 15),
        }
    }
}

/// One step of each family; returns a line per family.
fn step(inp: &Inputs) -> neurokernels::Result<Vec<String>> {
    let shape = AttentionShape::from_dims(&ATTENTION_Q, &ATTENTION_KV, Some(&ATTENTION_KV))?;
    let inputs = AttentionInputs::new(&inp.q, &inp.k, &inp.v);
    let params = AttentionParams::new().causal(true);
    let out = attention::forward(&params, shape, &inputs)?;
    let grads = attention::backward(&params, shape, &inputs, &out.o, &out.o, &out.lse)?;

    let enc = EncoderInputs {
        x: &inp.x,
        w_enc: &inp.w_enc,
        b_enc: &inp.b_enc,
        b_dec: None,
    };
    let code = topk::encode(SAE, SAE_K, &enc)?;
    let x_hat = topk::decode(SAE, SAE_K, &code.indices, &code.values, &inp.w_dec, None)?;
    let sae = topk::backward(
        SAE,
        SAE_K,
        &BackwardInputs {
            x: &inp.x,
            w_enc: &inp.w_enc,
            b_enc: &inp.b_enc,
            b_dec: None,
            w_dec: &inp.w_dec,
            indices: &code.indices,
            values: &code.values,
            d_xhat: &inp.d_xhat,
        },
    )?;

    let cv_inputs = CvInputs {
        x: &inp.xr,
        y: &inp.yr,
        alphas: &[0.1, 1.0, 10.0, 100.0],
        folds: &inp.folds,
    };
    let fit = ridge::cv(&CvParams::new(), RIDGE, &cv_inputs, None)?;
    let y_hat = ridge::predict(RIDGE, &inp.xr, &fit.w, Some(&fit.intercept))?;
    let scores = ridge::score(RIDGE, &inp.yr, &y_hat)?;

    let mamba = SelectiveInputs::new(&inp.u, &inp.delta, &inp.a, &inp.bm, &inp.cm);
    let params = SelectiveParams::new().delta_softplus(true);
    let y = selective::selective(&params, MAMBA, &mamba)?.y;
    Ok(vec![
        format!("attention: dq[0] = {}", grads.dq[0]),
        format!("sae: x_hat[0] = {} dw_enc[0] = {}", x_hat[0], sae.dw_enc[0]),
        format!(
            "ridge: best alpha {} r2 {}",
            fit.best_alpha[0], scores.r2[0]
        ),
        format!("selective: y[0] = {}", y[0]),
    ])
}

fn main() -> neurokernels::Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1);
    let inputs = Inputs::new();
    let mut times = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        lines = step(&inputs)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    for line in lines {
        println!("{line}");
    }
    times.sort_by(f64::total_cmp);
    println!("median step: {:.1} ms", times[times.len() / 2]);
    Ok(())
}
