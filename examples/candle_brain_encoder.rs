//! A small transformer brain encoder in candle, its attention run by `neurokernels::candle`:
//! token sequences (e.g. a stimulus' words or image patches) pass two self-attention layers,
//! then each voxel reads the tokens out by cross-attention (a learned query per voxel) and a
//! per-voxel linear map. Trained with Adam (written on candle `Var`s, below) on synthetic
//! voxel responses generated from known features: voxel v responds to the token at one
//! position p(v) through a random projection. It prints the loss falling, the held-out
//! Pearson correlation per voxel (`neurokernels::candle::ridge::score`), and the readout's
//! attention maps (`attention::top_keys`), which should find p(v).
//!
//! `cargo run --release --features candle --example candle_brain_encoder`

use neurokernels::candle::attention::{self, AttentionInputs, AttentionParams};
use neurokernels::candle::candle_core::{self, D, DType, Device, Module, Result, Tensor, Var};
use neurokernels::candle::ridge;

const TOKENS: usize = 12; // S: tokens per stimulus
const D_IN: usize = 16; // features per token
const D_MODEL: usize = 32;
const HEADS: usize = 4;
const HEAD_DIM: usize = D_MODEL / HEADS;
const LAYERS: usize = 2;
const VOXELS: usize = 24;
const TRAIN: usize = 2048;
const TEST: usize = 128;
const STEPS: usize = 250;

/// A small deterministic generator (splitmix64) for data and initial weights.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.next().max(1e-300), self.next());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    fn tensor(&mut self, dims: &[usize], std: f64) -> Result<Tensor> {
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.normal() * std) as f32).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
    }
}

/// Stimuli `[N, S, D_in]` and responses `[N, V]`: voxel v = tanh(token[p(v)]·u_v) + noise.
fn synthetic(rng: &mut Rng, n: usize, truth: &(Vec<usize>, Tensor)) -> Result<(Tensor, Tensor)> {
    let x = rng.tensor(&[n, TOKENS, D_IN], 1.0)?;
    let (pos, u) = truth; // u [V, D_in]
    let mut cols = Vec::with_capacity(VOXELS);
    for (v, &p) in pos.iter().enumerate() {
        let token = x.narrow(1, p, 1)?.squeeze(1)?; // [N, D_in]
        let drive = token.matmul(&u.narrow(0, v, 1)?.t()?)?; // [N, 1]
        cols.push(drive.tanh()?);
    }
    let clean = Tensor::cat(&cols, 1)?;
    let noise = rng.tensor(&[n, VOXELS], 0.1)?;
    Ok((x, (clean + noise)?))
}

/// A linear layer on Vars.
struct Linear {
    w: Var,
    b: Var,
}
impl Linear {
    fn new(rng: &mut Rng, i: usize, o: usize) -> Result<Self> {
        Ok(Self {
            w: Var::from_tensor(&rng.tensor(&[i, o], (1.0 / i as f64).sqrt())?)?,
            b: Var::from_tensor(&Tensor::zeros(o, DType::F32, &Device::Cpu)?)?,
        })
    }
    fn vars(&self) -> Vec<Var> {
        vec![self.w.clone(), self.b.clone()]
    }
}
impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(self.w.as_tensor())?
            .broadcast_add(self.b.as_tensor())
    }
}

/// Layer norm without affine parameters over the last dim.
fn norm(x: &Tensor) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)
}

/// Pre-norm self-attention + MLP block; attention by `neurokernels::candle::attention`.
struct Block {
    qkv: Linear,
    out: Linear,
    up: Linear,
    down: Linear,
}
impl Block {
    fn new(rng: &mut Rng) -> Result<Self> {
        Ok(Self {
            qkv: Linear::new(rng, D_MODEL, 3 * D_MODEL)?,
            out: Linear::new(rng, D_MODEL, D_MODEL)?,
            up: Linear::new(rng, D_MODEL, 2 * D_MODEL)?,
            down: Linear::new(rng, 2 * D_MODEL, D_MODEL)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let qkv = self
            .qkv
            .forward(&norm(x)?)?
            .reshape((b, s, 3, HEADS, HEAD_DIM))?;
        // narrowed views are strided: the op makes them contiguous
        let (q, k, v) = (
            qkv.narrow(2, 0, 1)?.squeeze(2)?,
            qkv.narrow(2, 1, 1)?.squeeze(2)?,
            qkv.narrow(2, 2, 1)?.squeeze(2)?,
        );
        let o = attention::forward(&AttentionParams::new(), &AttentionInputs::new(&q, &k, &v))?; // [B, S, H, Dh]
        let x = (x + self.out.forward(&o.reshape((b, s, D_MODEL))?)?)?;
        let h = self.up.forward(&norm(&x)?)?.gelu()?;
        x + self.down.forward(&h)?
    }
    fn vars(&self) -> Vec<Var> {
        [&self.qkv, &self.out, &self.up, &self.down]
            .iter()
            .flat_map(|l| l.vars())
            .collect()
    }
}

/// Tokens -> blocks -> per-voxel cross-attention readout.
struct Encoder {
    embed: Linear,
    pos: Var,
    blocks: Vec<Block>,
    kv: Linear,
    voxel_q: Var,   // [V, H, Dh]
    readout_w: Var, // [V, D_model]
    readout_b: Var, // [V]
}
impl Encoder {
    fn new(rng: &mut Rng) -> Result<Self> {
        Ok(Self {
            embed: Linear::new(rng, D_IN, D_MODEL)?,
            pos: Var::from_tensor(&rng.tensor(&[TOKENS, D_MODEL], 0.5)?)?,
            blocks: (0..LAYERS)
                .map(|_| Block::new(rng))
                .collect::<Result<_>>()?,
            kv: Linear::new(rng, D_MODEL, 2 * D_MODEL)?,
            voxel_q: Var::from_tensor(&rng.tensor(&[VOXELS, HEADS, HEAD_DIM], 0.5)?)?,
            readout_w: Var::from_tensor(&rng.tensor(&[VOXELS, D_MODEL], 0.2)?)?,
            readout_b: Var::from_tensor(&Tensor::zeros(VOXELS, DType::F32, &Device::Cpu)?)?,
        })
    }

    /// The tokens' keys and values for the readout, `[B, S, H, Dh]` each.
    fn tokens(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let mut h = self.embed.forward(x)?.broadcast_add(self.pos.as_tensor())?;
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        let kv = self
            .kv
            .forward(&norm(&h)?)?
            .reshape((b, s, 2, HEADS, HEAD_DIM))?;
        Ok((
            kv.narrow(2, 0, 1)?.squeeze(2)?,
            kv.narrow(2, 1, 1)?.squeeze(2)?,
        ))
    }

    /// The voxel queries broadcast over the batch, `[B, V, H, Dh]` (a strided view).
    fn queries(&self, b: usize) -> Result<Tensor> {
        self.voxel_q
            .as_tensor()
            .unsqueeze(0)?
            .broadcast_as((b, VOXELS, HEADS, HEAD_DIM))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let (k, v) = self.tokens(x)?;
        let q = self.queries(b)?;
        let o = attention::forward(&AttentionParams::new(), &AttentionInputs::new(&q, &k, &v))?;
        let o = o.reshape((b, VOXELS, D_MODEL))?;
        o.broadcast_mul(self.readout_w.as_tensor())?
            .sum(D::Minus1)?
            .broadcast_add(self.readout_b.as_tensor())
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = self.embed.vars();
        v.push(self.pos.clone());
        for b in &self.blocks {
            v.extend(b.vars());
        }
        v.extend(self.kv.vars());
        v.extend([
            self.voxel_q.clone(),
            self.readout_w.clone(),
            self.readout_b.clone(),
        ]);
        v
    }
}

/// Adam on candle Vars (β1 0.9, β2 0.999, ε 1e-8).
struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    lr: f64,
    t: i32,
}
impl Adam {
    fn new(vars: Vec<Var>, lr: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            v: m.clone(),
            m,
            vars,
            lr,
            t: 0,
        })
    }
    fn step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var) else { continue };
            self.m[i] = ((&self.m[i] * b1)? + (g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + 1e-8)?)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let start = std::time::Instant::now();
    let mut rng = Rng(2026);
    let truth = (
        (0..VOXELS)
            .map(|v| (v * 5 + 3) % TOKENS)
            .collect::<Vec<_>>(),
        rng.tensor(&[VOXELS, D_IN], 0.25)?,
    );
    let (x_train, y_train) = synthetic(&mut rng, TRAIN, &truth)?;
    let (x_test, y_test) = synthetic(&mut rng, TEST, &truth)?;
    let model = Encoder::new(&mut rng)?;
    let n_params: usize = model.vars().iter().map(|v| v.elem_count()).sum();
    println!(
        "brain encoder: {LAYERS} layers, {HEADS} heads, d_model {D_MODEL}, {VOXELS} voxels, {n_params} parameters; {TRAIN} train / {TEST} test stimuli of {TOKENS} tokens"
    );
    let mut adam = Adam::new(model.vars(), 3e-3)?;
    let batch = 64;
    let mut first = None;
    let mut last = 0.0;
    for step in 0..STEPS {
        let at = (step * batch) % TRAIN;
        let xb = x_train.narrow(0, at, batch)?;
        let yb = y_train.narrow(0, at, batch)?;
        let loss = (model.forward(&xb)? - &yb)?.sqr()?.mean_all()?;
        adam.step(&loss)?;
        let l = loss.to_scalar::<f32>()? as f64;
        first.get_or_insert(l);
        last = l;
        if step % 50 == 0 || step == STEPS - 1 {
            println!("step {step:4}  train mse {l:.4}");
        }
    }
    let first = first.unwrap_or(f64::NAN);

    let pred = model.forward(&x_test)?;
    let (r2, pearson) = ridge::score(&y_test, &pred)?;
    let r = pearson.to_vec1::<f32>()?;
    let mean_r = r.iter().map(|&x| x as f64).sum::<f64>() / r.len() as f64;
    let mean_r2 = r2.mean_all()?.to_scalar::<f32>()?;
    println!(
        "held-out: mean Pearson r {mean_r:.3} over {VOXELS} voxels (min {:.3}), mean R² {mean_r2:.3}",
        r.iter().cloned().fold(f32::INFINITY, f32::min)
    );

    // the readout's attention maps: which tokens each voxel's query reads most (head 0)
    let (k, v) = model.tokens(&x_test.narrow(0, 0, 8)?)?;
    let q = model.queries(8)?;
    let (w, idx) = attention::top_keys(
        &AttentionParams::new(),
        &AttentionInputs::new(&q, &k, &v),
        3,
    )?;
    // [B, H, V, top]: the weight each token gets among a query's top 3, averaged
    let (wv4, wi4) = (to4::<f32>(&w)?, to4::<i64>(&idx)?);
    let mut found = 0;
    println!(
        "readout attention (top-3 weights from top_keys, mean over heads and 8 test stimuli): voxel: true token -> top tokens (weight)"
    );
    for vox in 0..VOXELS {
        let mut per_token = [0.0f64; TOKENS];
        for b in 0..8 {
            for h in 0..HEADS {
                for j in 0..3 {
                    let t = wi4[b][h][vox][j];
                    if t >= 0 {
                        per_token[t as usize] += wv4[b][h][vox][j] as f64 / (8 * HEADS) as f64;
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..TOKENS).collect();
        order.sort_by(|a, b| per_token[*b].total_cmp(&per_token[*a]));
        if order[0] == truth.0[vox] {
            found += 1;
        }
        if vox < 6 {
            let tops: Vec<String> = order[..3]
                .iter()
                .map(|&t| format!("{t} ({:.2})", per_token[t]))
                .collect();
            println!(
                "  voxel {vox:2}: true {:2} -> {}",
                truth.0[vox],
                tops.join(", ")
            );
        }
    }
    println!("attention peaks on the true token for {found}/{VOXELS} voxels");
    println!(
        "train mse {first:.4} -> {last:.4} in {STEPS} steps, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    if !(last < 0.5 * first && mean_r > 0.5 && 2 * found >= VOXELS) {
        return Err(candle_core::Error::Msg(format!(
            "training did not converge: mse {first:.4} -> {last:.4}, held-out r {mean_r:.3}, attention on the true token for {found}/{VOXELS}"
        )));
    }
    Ok(())
}

/// A `[B, H, V, top]` tensor as nested vectors.
fn to4<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<Vec<Vec<Vec<T>>>>> {
    (0..t.dim(0)?).map(|b| t.get(b)?.to_vec3::<T>()).collect()
}
