//! The attention tests' configurations and inputs, shared by tests/attention.rs (CPU) and
//! tests/attention_cuda.rs (GPU against CPU).

use super::Rng;
use neurokernels::Element;
use neurokernels::attention::{AttentionInputs, AttentionParams, AttentionShape, Bias, CuSeqlens};
use neurokernels::element::Accum;

/// One test configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub d: usize,
    pub dv: usize,
    pub params: AttentionParams,
    pub alibi: bool,
    /// (Bb, Hb) of the bias.
    pub bias: Option<(usize, usize)>,
    /// Packed sequence lengths (q, k); then b = 1.
    pub lens: Option<(Vec<usize>, Vec<usize>)>,
}

pub fn config(b: usize, sq: usize, sk: usize, hq: usize, hk: usize, d: usize, dv: usize) -> Config {
    Config {
        b,
        sq,
        sk,
        hq,
        hk,
        d,
        dv,
        params: AttentionParams::new(),
        alibi: false,
        bias: None,
        lens: None,
    }
}

impl Config {
    pub fn with(mut self, params: AttentionParams) -> Self {
        self.params = params;
        self
    }
    pub fn alibi(mut self) -> Self {
        self.alibi = true;
        self
    }
    pub fn bias(mut self, bb: usize, hb: usize) -> Self {
        self.bias = Some((bb, hb));
        self
    }
    pub fn varlen(mut self, q: &[usize], k: &[usize]) -> Self {
        self.b = 1;
        self.sq = q.iter().sum();
        self.sk = k.iter().sum();
        self.lens = Some((q.to_vec(), k.to_vec()));
        self
    }
    pub fn shape(&self) -> AttentionShape {
        AttentionShape::new(self.b, self.sq, self.sk, self.hq, self.hk, self.d, self.dv)
    }
    pub fn cu(&self) -> Option<(Vec<i32>, Vec<i32>)> {
        self.lens.as_ref().map(|(q, k)| {
            let cum = |l: &Vec<usize>| {
                std::iter::once(0)
                    .chain(l.iter().scan(0, |s, x| {
                        *s += *x as i32;
                        Some(*s)
                    }))
                    .collect()
            };
            (cum(q), cum(k))
        })
    }
    /// (batch, q_start, q_len, k_start, k_len) of each sequence.
    pub fn segments(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        match self.cu() {
            None => (0..self.b).map(|b| (b, 0, self.sq, 0, self.sk)).collect(),
            Some((q, k)) => (0..q.len() - 1)
                .map(|n| {
                    let (q0, k0) = (q[n] as usize, k[n] as usize);
                    (0, q0, q[n + 1] as usize - q0, k0, k[n + 1] as usize - k0)
                })
                .collect(),
        }
    }
}

/// Inputs drawn in f64 and rounded to E (the reference reads the rounded values).
pub struct Data<E: Element> {
    pub q: Vec<E>,
    pub k: Vec<E>,
    pub v: Vec<E>,
    pub d_o: Vec<E>,
    pub slopes: Vec<E::Acc>,
    pub bias: Vec<E::Acc>,
    pub cu: Option<(Vec<i32>, Vec<i32>)>,
}

pub fn draw<E: Element>(c: &Config, seed: u64) -> Data<E> {
    let mut rng = Rng::new(seed);
    let bias_len = c.bias.map_or(0, |(bb, hb)| bb * hb * c.sq * c.sk);
    Data {
        q: rng.vec(c.b * c.sq * c.hq * c.d, -1.5, 1.5),
        k: rng.vec(c.b * c.sk * c.hk * c.d, -1.5, 1.5),
        v: rng.vec(c.b * c.sk * c.hk * c.dv, -1.0, 1.0),
        d_o: rng.vec(c.b * c.sq * c.hq * c.dv, -0.5, 0.5),
        slopes: (0..c.hq)
            .map(|_| E::Acc::from_f64(rng.uniform(0.05, 0.5)))
            .collect(),
        bias: (0..bias_len)
            .map(|_| E::Acc::from_f64(rng.uniform(-1.0, 1.0)))
            .collect(),
        cu: c.cu(),
    }
}

impl<E: Element> Data<E> {
    pub fn inputs<'a>(&'a self, c: &Config) -> AttentionInputs<'a, E> {
        AttentionInputs::new(&self.q, &self.k, &self.v)
            .alibi_slopes(c.alibi.then_some(&self.slopes[..]))
            .bias(c.bias.map(|(bb, hb)| Bias {
                data: &self.bias[..],
                batch: bb,
                heads: hb,
            }))
            .cu_seqlens(self.cu.as_ref().map(|(q, k)| CuSeqlens { q, k }))
    }
}
