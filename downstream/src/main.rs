//! One step of each kernel family, written as a user's crate writes it.
use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
use neurokernels::ridge::{self, CvInputs, CvParams, RidgeShape};
use neurokernels::scan::selective::{self, SelectiveInputs, SelectiveParams, SelectiveShape};
use neurokernels::topk::{self, BackwardInputs, EncoderInputs, SaeShape};

fn data(n: usize, seed: u32) -> Vec<f32> {
    let unit = |i: usize| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32;
    (0..n).map(|i| unit(i) / 16_777_216.0 - 0.5).collect()
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}

fn main() -> neurokernels::Result<()> {
    // attention forward + backward, grouped-query heads (8 query heads share 2 KV heads)
    let shape = AttentionShape::from_dims(&[1, 64, 8, 32], &[1, 64, 2, 32], Some(&[1, 64, 2, 32]))?;
    let (q, k, v) = (
        data(64 * 8 * 32, 1),
        data(64 * 2 * 32, 2),
        data(64 * 2 * 32, 3),
    );
    let inputs = AttentionInputs::new(&q, &k, &v);
    let params = AttentionParams::new().causal(true);
    let out = attention::forward(&params, shape, &inputs)?;
    let grads = attention::backward(&params, shape, &inputs, &out.o, &out.o, &out.lse)?;
    println!("attention: |dq| = {}", norm(&grads.dq));

    // a top-k SAE step: encode, decode, backward of the reconstruction error
    let (batch, dm, latents, kk) = (32, 64, 512, 8);
    let sae = SaeShape::new(batch, dm, latents);
    let (x, w_enc, b_enc) = (data(batch * dm, 4), data(latents * dm, 5), data(latents, 6));
    let w_dec = data(latents * dm, 7);
    let enc = EncoderInputs {
        x: &x,
        w_enc: &w_enc,
        b_enc: &b_enc,
        b_dec: None,
    };
    let code = topk::encode(sae, kk, &enc)?;
    let x_hat = topk::decode(sae, kk, &code.indices, &code.values, &w_dec, None)?;
    let d_xhat: Vec<f32> = x_hat.iter().zip(&x).map(|(a, b)| a - b).collect();
    let g = topk::backward(
        sae,
        kk,
        &BackwardInputs {
            x: &x,
            w_enc: &w_enc,
            b_enc: &b_enc,
            b_dec: None,
            w_dec: &w_dec,
            indices: &code.indices,
            values: &code.values,
            d_xhat: &d_xhat,
        },
    )?;
    println!("sae: |dw_enc| = {}", norm(&g.dw_enc));

    // ridge.cv: an alpha per target, then predictions and their scores
    let rs = RidgeShape {
        samples: 120,
        features: 10,
        targets: 50,
    };
    let (xr, yr) = (data(120 * 10, 8), data(120 * 50, 9));
    let alphas = [0.1f32, 1.0, 10.0];
    let folds: Vec<i32> = (0..120).map(|i| i % 3).collect();
    let cv_inputs = CvInputs {
        x: &xr,
        y: &yr,
        alphas: &alphas,
        folds: &folds,
    };
    let fit = ridge::cv(&CvParams::new(), rs, &cv_inputs, None)?;
    let y_hat = ridge::predict(rs, &xr, &fit.w, Some(&fit.intercept))?;
    let scores = ridge::score(rs, &yr, &y_hat)?;
    println!(
        "ridge: best alpha {} r2 {}",
        fit.best_alpha[0], scores.r2[0]
    );

    // Mamba's selective scan
    let ss = SelectiveShape {
        batch: 1,
        len: 128,
        channels: 16,
        state: 8,
    };
    let (u, delta, a) = (data(128 * 16, 10), data(128 * 16, 11), data(16 * 8, 12));
    let (bm, cm) = (data(128 * 8, 13), data(128 * 8, 14));
    let si = SelectiveInputs::new(&u, &delta, &a, &bm, &cm);
    let y = selective::selective(&SelectiveParams::new().delta_softplus(true), ss, &si)?.y;
    println!("selective: y[0] = {}", y[0]);
    Ok(())
}
