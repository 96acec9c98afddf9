//! Fused attention on the CPU (and on the GPU in `attention::cuda`, feature `cuda`): `attention.forward`,
//! `attention.backward` and `attention.top_keys` (CASES.md, "Fused attention").
//!
//! Layouts: `q [B, Sq, Hq, D]`, `k [B, Sk, Hk, D]`, `v [B, Sk, Hk, Dv]`, `o [B, Sq, Hq, Dv]`,
//! `lse [B, Hq, Sq]`; query head h reads KV head `h / (Hq / Hk)` (GQA/MQA). Scores, in this
//! order: `s = scale·q·k`; softcap `c·tanh(s / c)`; ALiBi `s -= slope[h]·|i + Sk − Sq − j|`;
//! `s += bias`; then the causal and window masks, aligned to the bottom-right corner. With
//! `cu_seqlens` (packed variable-length sequences, B = 1) i, j, Sq, Sk are each sequence's own
//! positions and lengths, and `bias` is indexed by packed positions. A query row that sees no
//! key gives `o = 0` and `lse = −inf`.
//!
//! The tensors the contract lists as f32 (`alibi_slopes`, `bias`, `lse`, top_keys `weights`)
//! are in the accumulator type here: f32 for f32/f16/bf16 inputs, f64 for f64 inputs.
//!
//! Every call validates its inputs first and returns an [`Error`] naming the tensor; results
//! are bit-identical whatever the rayon thread count (see `cpu` for the plan of each kernel).
//!
//! # Example
//!
//! Causal attention with grouped-query heads (4 query heads share 2 KV heads), its
//! backward, and the keys each query attends to most.
//!
//! ```
//! use neurokernels::attention::{self, AttentionInputs, AttentionParams, AttentionShape};
//!
//! let (b, s, hq, hk, d) = (1, 16, 4, 2, 8);
//! let shape = AttentionShape::from_dims(&[b, s, hq, d], &[b, s, hk, d], Some(&[b, s, hk, d]))?;
//! let q: Vec<f32> = (0..b * s * hq * d).map(|i| (i % 7) as f32 * 0.1).collect();
//! let k: Vec<f32> = (0..b * s * hk * d).map(|i| (i % 5) as f32 * 0.1).collect();
//! let v: Vec<f32> = (0..b * s * hk * d).map(|i| (i % 3) as f32).collect();
//! let inputs = AttentionInputs::new(&q, &k, &v);
//! let params = AttentionParams::new().causal(true);
//!
//! let out = attention::forward(&params, shape, &inputs)?;
//! assert_eq!(out.o.len(), b * s * hq * d); // o [B, Sq, Hq, Dv]
//! assert_eq!(out.o[..d], v[..d]); // causal: query 0 sees only key 0, so o = v of key 0
//!
//! let d_o = vec![1.0f32; out.o.len()];
//! let grads = attention::backward(&params, shape, &inputs, &out.o, &d_o, &out.lse)?;
//! assert_eq!(grads.dk.len(), k.len());
//!
//! let top = attention::top_keys(&params, shape, &inputs, 2)?;
//! assert!((top.weights[0] - 1.0).abs() < 1e-6); // query 0 sees only key 0
//! assert_eq!(top.indices[..2], [0, -1]); // padded: fewer visible keys than `top`
//!
//! // k and v swapped is caught by the shapes when they differ; a wrong layout is an error
//! assert!(AttentionShape::from_dims(&[b, s, hq, d], &[b, s, hk, d + 1], None).is_err());
//! # Ok::<(), neurokernels::Error>(())
//! ```

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::cpu::Isa;
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_backed, check_len};

/// Which forward path runs: the split-KV decode path (parallel over key chunks, merged
/// through their log-sum-exps) or the query-block path. Both are exact; they differ in
/// rounding only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SplitKv {
    /// Split-KV when each KV head has few query rows (at most 16 over its query heads) and
    /// at least two key chunks.
    #[default]
    Auto,
    /// Always the query-block path.
    Never,
    /// Always the split-KV path.
    Always,
}

/// How the CPU backward splits its work. Both plans give the same bits: every dQ, dK and dV
/// element sums the same terms in the same order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackwardTasks {
    /// [`PerHead`](Self::PerHead) when there are at least four (sequence, KV head) pairs per
    /// rayon thread, else [`PerBlock`](Self::PerBlock).
    #[default]
    Auto,
    /// One task per (sequence, KV head), one pass: S = Q·Kᵀ and dP = dO·Vᵀ are computed once
    /// per block pair and feed dV, dK and dQ (a task-local dQ for the group's query heads).
    PerHead,
    /// Two passes for more parallelism: tasks per key block (dK, dV), then per query block
    /// (dQ); S and dP are computed in both (7 block products instead of 5).
    PerBlock,
}

/// Parameters of the attention ops (CASES.md names and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionParams {
    /// Causal mask aligned bottom-right: query i sees key j when j <= i + Sk − Sq.
    pub causal: bool,
    /// Keys left of the diagonal a query sees; −1 = unbounded.
    pub window_left: i64,
    /// Keys right of the diagonal a query sees; −1 = unbounded.
    pub window_right: i64,
    /// `s = softcap·tanh(s / softcap)`; 0 = off.
    pub softcap: f64,
    /// Score scale; `None` = 1/sqrt(D).
    pub scale: Option<f64>,
    /// The forward's path (not a contract parameter).
    pub split_kv: SplitKv,
    /// The CPU backward's task split (not a contract parameter).
    pub backward_tasks: BackwardTasks,
}

impl Default for AttentionParams {
    fn default() -> Self {
        Self {
            causal: false,
            window_left: -1,
            window_right: -1,
            softcap: 0.0,
            scale: None,
            split_kv: SplitKv::Auto,
            backward_tasks: BackwardTasks::Auto,
        }
    }
}

impl AttentionParams {
    /// The defaults: no causal or window mask, no softcap, scale 1/sqrt(D), both paths `Auto`.
    pub fn new() -> Self {
        Self::default()
    }
    /// Causal mask (default false): query i sees key j only when j <= i + Sk − Sq.
    pub fn causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }
    /// Left window (default −1 = unbounded): query i sees no key j < i + Sk − Sq − `keys`.
    pub fn window_left(mut self, keys: i64) -> Self {
        self.window_left = keys;
        self
    }
    /// Right window (default −1 = unbounded): query i sees no key j > i + Sk − Sq + `keys`.
    pub fn window_right(mut self, keys: i64) -> Self {
        self.window_right = keys;
        self
    }
    /// Score softcap (default 0 = off): `s = softcap·tanh(s / softcap)`, applied after the
    /// scale and before ALiBi, bias and masks. Must be finite and >= 0.
    pub fn softcap(mut self, softcap: f64) -> Self {
        self.softcap = softcap;
        self
    }
    /// Score scale (default `None` = 1/sqrt(D)); must be finite in the accumulator type
    /// (|scale| <= 3.4e38 for f32, f16 and bf16). The outputs are defined while the scaled
    /// scores `scale·q·k` stay finite there: a scale so large that they overflow (1e30
    /// with |q·k| > 1e9 in f32) gives NaN or infinite outputs, and very large scales give
    /// gradients of a near-hard maximum, dominated by rounding.
    pub fn scale(mut self, scale: Option<f64>) -> Self {
        self.scale = scale;
        self
    }
    /// The forward's path (default [`SplitKv::Auto`]); changes rounding only.
    pub fn split_kv(mut self, split_kv: SplitKv) -> Self {
        self.split_kv = split_kv;
        self
    }
    /// The CPU backward's task split (default [`BackwardTasks::Auto`]); same bits either way.
    pub fn backward_tasks(mut self, tasks: BackwardTasks) -> Self {
        self.backward_tasks = tasks;
        self
    }

    /// The range checks that do not depend on the element type.
    fn validate(&self) -> Result<()> {
        if let Some(s) = self.scale
            && !s.is_finite()
        {
            return Err(Error::invalid("scale", format!("must be finite, got {s}")));
        }
        if !(self.softcap.is_finite() && self.softcap >= 0.0) {
            return Err(Error::invalid(
                "softcap",
                format!("must be >= 0 and finite (0 = off), got {}", self.softcap),
            ));
        }
        for (name, w) in [
            ("window_left", self.window_left),
            ("window_right", self.window_right),
        ] {
            if w < -1 {
                return Err(Error::invalid(
                    name,
                    format!("must be >= 0 or -1 (unbounded), got {w}"),
                ));
            }
        }
        Ok(())
    }
}

/// The scale and softcap must also be finite in the accumulator type `A` the kernels compute
/// in (1e300 is finite in f64 and infinite in f32, where it would turn every score to NaN).
fn check_params_fit<A: Accum>(params: &AttentionParams) -> Result<()> {
    let fits = |x: f64| A::from_f64(x).to_f64().is_finite();
    if let Some(s) = params.scale
        && !fits(s)
    {
        return Err(Error::invalid(
            "scale",
            format!(
                "{s:e} overflows the {}-bit accumulator",
                8 * std::mem::size_of::<A>()
            ),
        ));
    }
    if !fits(params.softcap) {
        return Err(Error::invalid(
            "softcap",
            format!(
                "{:e} overflows the {}-bit accumulator",
                params.softcap,
                8 * std::mem::size_of::<A>()
            ),
        ));
    }
    Ok(())
}

/// The dims of `q [B, Sq, Hq, D]`, `k [B, Sk, Hk, D]` and `v [B, Sk, Hk, Dv]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// B, the batch size (1 with cu_seqlens).
    pub batch: usize,
    /// Sq, the query length (the packed total with cu_seqlens).
    pub len_q: usize,
    /// Sk, the key/value length (the packed total with cu_seqlens).
    pub len_k: usize,
    /// Hq, the query heads: a multiple of `heads_kv`.
    pub heads_q: usize,
    /// Hk, the key/value heads (Hk = Hq: MHA; 1: MQA; else GQA).
    pub heads_kv: usize,
    /// D, the head dim of q and k.
    pub head_dim: usize,
    /// Dv, the head dim of v and o (unused by `top_keys`).
    pub value_dim: usize,
}

impl AttentionShape {
    /// From the dims in field order (B, Sq, Sk, Hq, Hk, D, Dv); prefer named fields or
    /// [`from_dims`](Self::from_dims), which cannot misorder them.
    pub fn new(
        batch: usize,
        len_q: usize,
        len_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
        value_dim: usize,
    ) -> Self {
        Self {
            batch,
            len_q,
            len_k,
            heads_q,
            heads_kv,
            head_dim,
            value_dim,
        }
    }

    /// From the dims of q, k and (optionally; top_keys has none) v.
    pub fn from_dims(q: &[usize], k: &[usize], v: Option<&[usize]>) -> Result<Self> {
        let [b, sq, hq, d] = *q else {
            return Err(Error::shape("q", "rank 4 [B, Sq, Hq, D]", format!("{q:?}")));
        };
        let [kb, sk, hk, kd] = *k else {
            return Err(Error::shape("k", "rank 4 [B, Sk, Hk, D]", format!("{k:?}")));
        };
        if kb != b || kd != d {
            return Err(Error::shape(
                "k",
                format!("[{b}, Sk, Hk, {d}] (batch and head dim of q)"),
                format!("{k:?}"),
            ));
        }
        let dv = match v {
            None => 0,
            Some(&[vb, vs, vh, dv]) if (vb, vs, vh) == (b, sk, hk) => dv,
            Some(v) => {
                return Err(Error::shape(
                    "v",
                    format!("[{b}, {sk}, {hk}, Dv]"),
                    format!("{v:?}"),
                ));
            }
        };
        Ok(Self::new(b, sq, sk, hq, hk, d, dv))
    }

    /// Query heads per KV head.
    pub(crate) fn group(&self) -> usize {
        self.heads_q / self.heads_kv.max(1)
    }

    fn validate(&self) -> Result<Sizes> {
        if self.heads_kv == 0 && self.heads_q != 0 {
            return Err(Error::shape("k", "at least one KV head", "Hk = 0"));
        }
        if self.heads_kv != 0 && !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::shape(
                "q",
                format!("Hq a multiple of Hk = {} (GQA/MQA)", self.heads_kv),
                format!("Hq = {}", self.heads_q),
            ));
        }
        let over = |t: &str| Error::overflow(t, format!("{self:?}"));
        let prod = |t: &str, dims: &[usize]| -> Result<usize> {
            let n = dims
                .iter()
                .try_fold(1usize, |acc, d| acc.checked_mul(*d))
                .ok_or_else(|| over(t))?;
            // every buffer is also indexed in bytes of f64 and with i32-sized offsets
            n.checked_mul(8).ok_or_else(|| over(t))?;
            Ok(n)
        };
        let s = self;
        Ok(Sizes {
            q: prod("q", &[s.batch, s.len_q, s.heads_q, s.head_dim])?,
            k: prod("k", &[s.batch, s.len_k, s.heads_kv, s.head_dim])?,
            v: prod("v", &[s.batch, s.len_k, s.heads_kv, s.value_dim])?,
            o: prod("o", &[s.batch, s.len_q, s.heads_q, s.value_dim])?,
            lse: prod("lse", &[s.batch, s.heads_q, s.len_q])?,
        })
    }

    fn scale(&self, params: &AttentionParams) -> f64 {
        params
            .scale
            .unwrap_or(1.0 / (self.head_dim.max(1) as f64).sqrt())
    }
}

/// Element counts of the tensors of one call.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    q: usize,
    k: usize,
    v: usize,
    o: usize,
    lse: usize,
}

/// An additive bias `[Bb, Hb, Sq, Sk]` with Bb in {1, B} and Hb in {1, Hq} (broadcast over
/// the axes of size 1).
#[derive(Clone, Copy, Debug)]
pub struct Bias<'a, T> {
    /// `[Bb, Hb, Sq, Sk]`: the bias values, in the accumulator type.
    pub data: &'a [T],
    /// Bb: 1 (shared by every batch row) or B.
    pub batch: usize,
    /// Hb: 1 (shared by every query head) or Hq.
    pub heads: usize,
}

/// Packed variable-length sequences: sequence n holds query rows
/// `q[n]..q[n+1]` and key rows `k[n]..k[n+1]` of the S axes (B = 1).
#[derive(Clone, Copy, Debug)]
pub struct CuSeqlens<'a> {
    /// `[N+1]`: cumulative query lengths, from 0, non-decreasing, ending at Sq.
    pub q: &'a [i32],
    /// `[N+1]`: cumulative key lengths, from 0, non-decreasing, ending at Sk.
    pub k: &'a [i32],
}

/// The inputs of the attention ops. `v` is not read by `top_keys` (pass `&[]`).
#[derive(Clone, Copy, Debug)]
pub struct AttentionInputs<'a, E: Element> {
    /// `[B, Sq, Hq, D]`: the queries.
    pub q: &'a [E],
    /// `[B, Sk, Hk, D]`: the keys.
    pub k: &'a [E],
    /// `[B, Sk, Hk, Dv]`: the values (ignored by `top_keys`).
    pub v: &'a [E],
    /// `[Hq]`, accumulator type: ALiBi slopes, `s -= slope[h]·|i + Sk − Sq − j|` (default none).
    pub alibi_slopes: Option<&'a [E::Acc]>,
    /// Additive score bias `[Bb, Hb, Sq, Sk]`, accumulator type (default none).
    pub bias: Option<Bias<'a, E::Acc>>,
    /// Packed variable-length sequences, with B = 1 (default none).
    pub cu_seqlens: Option<CuSeqlens<'a>>,
}

impl<'a, E: Element> AttentionInputs<'a, E> {
    /// q, k, v without optional inputs.
    pub fn new(q: &'a [E], k: &'a [E], v: &'a [E]) -> Self {
        Self {
            q,
            k,
            v,
            alibi_slopes: None,
            bias: None,
            cu_seqlens: None,
        }
    }
    /// Sets the ALiBi slopes `[Hq]` (default none).
    pub fn alibi_slopes(mut self, slopes: Option<&'a [E::Acc]>) -> Self {
        self.alibi_slopes = slopes;
        self
    }
    /// Sets the additive bias `[Bb, Hb, Sq, Sk]` (default none).
    pub fn bias(mut self, bias: Option<Bias<'a, E::Acc>>) -> Self {
        self.bias = bias;
        self
    }
    /// Sets the packed sequences' cumulative lengths (default none; requires B = 1).
    pub fn cu_seqlens(mut self, cu: Option<CuSeqlens<'a>>) -> Self {
        self.cu_seqlens = cu;
        self
    }

    /// Checks every input against `shape` and returns the sequences to run.
    fn validate(
        &self,
        params: &AttentionParams,
        shape: &AttentionShape,
        with_v: bool,
    ) -> Result<(Sizes, Vec<Segment>)> {
        let lens = InputLens {
            q: self.q.len(),
            k: self.k.len(),
            v: self.v.len(),
            alibi_slopes: self.alibi_slopes.map(<[_]>::len),
            bias: self.bias.map(|b| (b.data.len(), b.batch, b.heads)),
        };
        check_params_fit::<E::Acc>(params)?;
        lens.validate(params, shape, self.cu_seqlens, with_v)
    }
}

/// The lengths of the inputs of one call (host slices or device buffers alike).
#[derive(Clone, Copy, Debug)]
struct InputLens {
    q: usize,
    k: usize,
    v: usize,
    alibi_slopes: Option<usize>,
    /// (length, Bb, Hb)
    bias: Option<(usize, usize, usize)>,
}

impl InputLens {
    /// Checks every input against `shape` and returns the sequences to run.
    fn validate(
        &self,
        params: &AttentionParams,
        shape: &AttentionShape,
        cu_seqlens: Option<CuSeqlens<'_>>,
        with_v: bool,
    ) -> Result<(Sizes, Vec<Segment>)> {
        params.validate()?;
        let sizes = shape.validate()?;
        let AttentionShape {
            batch: b,
            len_q: sq,
            len_k: sk,
            heads_q: hq,
            heads_kv: hk,
            head_dim: d,
            value_dim: dv,
        } = *shape;
        check_len("q", self.q, sizes.q, &format!("[{b}, {sq}, {hq}, {d}]"))?;
        check_len("k", self.k, sizes.k, &format!("[{b}, {sk}, {hk}, {d}]"))?;
        if with_v {
            check_len("v", self.v, sizes.v, &format!("[{b}, {sk}, {hk}, {dv}]"))?;
        }
        if let Some(slopes) = self.alibi_slopes {
            check_len("alibi_slopes", slopes, hq, &format!("[{hq}]"))?;
        }
        if let Some((len, bb, hb)) = self.bias {
            if !(bb == 1 || bb == b) || !(hb == 1 || hb == hq) {
                return Err(Error::shape(
                    "bias",
                    format!("[Bb, Hb, {sq}, {sk}] with Bb in {{1, {b}}} and Hb in {{1, {hq}}}"),
                    format!("[{bb}, {hb}, {sq}, {sk}]"),
                ));
            }
            let n = [bb, hb, sq, sk]
                .iter()
                .try_fold(1usize, |acc, x| acc.checked_mul(*x))
                .ok_or_else(|| Error::overflow("bias", format!("{shape:?}")))?;
            check_len("bias", len, n, &format!("[{bb}, {hb}, {sq}, {sk}]"))?;
        }
        // rule 3 of crate::error: B·Hq·Sq is carried by q, Dv by v, B by any of q, k, v
        let v_len = if with_v { self.v } else { 0 };
        let bias_len = self.bias.map_or(0, |b| b.0);
        let inputs = [
            self.q,
            self.k,
            v_len,
            bias_len,
            self.alibi_slopes.unwrap_or(0),
        ]
        .iter()
        .fold(0usize, |acc, n| acc.saturating_add(*n));
        if self.q == 0 {
            let out = sizes.lse.max(if with_v { sizes.o } else { 0 });
            check_backed("q", "B·Hq·Sq", out, inputs)?;
        }
        if with_v && self.v == 0 {
            check_backed("v", "Dv", sizes.o, inputs)?;
        }
        if self.k == 0 && v_len == 0 {
            // rule 4: with no key or value data Sk is carried by no input (bias aside), and
            // the B·Hq·Sq·Sk scores would be a loop over nothing
            check_backed("k", "Sk", sizes.lse.saturating_mul(sk), inputs)?;
        }
        if cu_seqlens.is_none() && self.q == 0 && self.k == 0 && v_len == 0 {
            check_backed("q", "B", b, inputs)?;
        }
        let segments = match cu_seqlens {
            None => (0..b)
                .map(|batch| Segment {
                    batch,
                    q_start: 0,
                    q_len: sq,
                    k_start: 0,
                    k_len: sk,
                })
                .collect(),
            Some(cu) => {
                if b != 1 {
                    return Err(Error::shape(
                        "q",
                        "batch 1 with cu_seqlens (packed sequences)",
                        format!("batch {b}"),
                    ));
                }
                if cu.q.len() != cu.k.len() {
                    return Err(Error::shape(
                        "cu_seqlens_k",
                        format!("{} entries, as cu_seqlens_q", cu.q.len()),
                        format!("{} entries", cu.k.len()),
                    ));
                }
                let q = offsets("cu_seqlens_q", cu.q, sq)?;
                let k = offsets("cu_seqlens_k", cu.k, sk)?;
                q.windows(2)
                    .zip(k.windows(2))
                    .map(|(q, k)| Segment {
                        batch: 0,
                        q_start: q[0],
                        q_len: q[1] - q[0],
                        k_start: k[0],
                        k_len: k[1] - k[0],
                    })
                    .collect()
            }
        };
        Ok((sizes, segments))
    }
}

/// Checks cumulative sequence lengths: at least one entry, starting at 0, non-decreasing,
/// ending at `len` (the S axis they split).
fn offsets(name: &str, cu: &[i32], len: usize) -> Result<Vec<usize>> {
    if cu.is_empty() {
        return Err(Error::shape(name, "N + 1 >= 1 entries", "0 entries"));
    }
    if cu[0] != 0 {
        return Err(Error::invalid(
            name,
            format!("must start at 0, got {}", cu[0]),
        ));
    }
    let mut out = Vec::with_capacity(cu.len());
    for (n, &x) in cu.iter().enumerate() {
        let prev = out.last().copied().unwrap_or(0);
        let Ok(x) = usize::try_from(x) else {
            return Err(Error::invalid(name, format!("entry {n} is negative ({x})")));
        };
        if x < prev {
            return Err(Error::invalid(
                name,
                format!("must be non-decreasing: entry {n} = {x} < {prev}"),
            ));
        }
        if x > len {
            return Err(Error::invalid(
                name,
                format!("entry {n} = {x} is past the end of the sequence axis ({len})"),
            ));
        }
        out.push(x);
    }
    if out.last() != Some(&len) {
        return Err(Error::invalid(
            name,
            format!(
                "must end at the sequence axis length {len}, ends at {}",
                out.last().copied().unwrap_or(0)
            ),
        ));
    }
    Ok(out)
}

/// One sequence: its batch row and its query and key rows along the S axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub batch: usize,
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

/// The outputs of `attention.forward`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionOut<E: Element> {
    /// `[B, Sq, Hq, Dv]` (packed `[total_q, Hq, Dv]` with cu_seqlens).
    pub o: Vec<E>,
    /// `[B, Hq, Sq]` (packed `[Hq, total_q]`): the natural-log sum of exp of each query's
    /// scaled scores (after softcap, bias and masks), in the accumulator type; −inf for a
    /// query that sees no key (its `o` row is 0). The backward takes it as given.
    pub lse: Vec<E::Acc>,
}

/// The gradients of `attention.backward`, each with the shape of its input.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionGrads<E> {
    /// `[B, Sq, Hq, D]`: the gradient of `q`.
    pub dq: Vec<E>,
    /// `[B, Sk, Hk, D]`: the gradient of `k`, summed over the query heads that share each KV head.
    pub dk: Vec<E>,
    /// `[B, Sk, Hk, Dv]`: the gradient of `v`, summed over the query heads that share each KV
    /// head.
    pub dv: Vec<E>,
}

/// The outputs of `attention.top_keys`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TopKeys<A> {
    /// `[B, Hq, Sq, top]` (packed `[Hq, total_q, top]`): softmax probabilities, descending.
    pub weights: Vec<A>,
    /// `[B, Hq, Sq, top]`: each weight's key position along the S axis of k; −1 for padding.
    pub indices: Vec<i32>,
}

/// `attention.forward` on the CPU: returns `o [B, Sq, Hq, Dv]` and `lse [B, Hq, Sq]`.
pub fn forward<E: Element>(
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
) -> Result<AttentionOut<E>> {
    E::attention_forward(Isa::active(), params, shape, inputs)
}

/// [`forward`] on a chosen instruction set.
#[doc(hidden)]
pub fn forward_on<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
) -> Result<AttentionOut<E>> {
    E::attention_forward(isa, params, shape, inputs)
}

/// The CPU forward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn forward_impl<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
) -> Result<AttentionOut<E>> {
    let isa = isa.check()?;
    let (sizes, segments) = inputs.validate(params, &shape, true)?;
    let segments = with_queries(segments, sizes);
    let (o, lse) = cpu::forward(isa, params, &shape, inputs, &segments, sizes);
    Ok(AttentionOut { o, lse })
}

/// `attention.backward` on the CPU from the forward's `o`, its `lse` and the upstream `do`
/// (`o` and `do` `[B, Sq, Hq, Dv]`, `lse` `[B, Hq, Sq]`): the gradients of Σ o·do.
pub fn backward<E: Element>(
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    o: &[E],
    d_o: &[E],
    lse: &[E::Acc],
) -> Result<AttentionGrads<E>> {
    E::attention_backward(Isa::active(), params, shape, inputs, o, d_o, lse)
}

/// [`backward`] on a chosen instruction set.
#[doc(hidden)]
pub fn backward_on<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    o: &[E],
    d_o: &[E],
    lse: &[E::Acc],
) -> Result<AttentionGrads<E>> {
    E::attention_backward(isa, params, shape, inputs, o, d_o, lse)
}

/// The CPU backward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn backward_impl<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    o: &[E],
    d_o: &[E],
    lse: &[E::Acc],
) -> Result<AttentionGrads<E>> {
    let isa = isa.check()?;
    let (sizes, segments) = inputs.validate(params, &shape, true)?;
    let s = &shape;
    check_backward_lens(s, sizes, o.len(), d_o.len(), lse.len())?;
    let segments = with_queries(segments, sizes);
    Ok(cpu::backward(
        isa, params, s, inputs, &segments, sizes, o, d_o, lse,
    ))
}

/// `attention.top_keys` on the CPU: the exact softmax probabilities `[B, Hq, Sq, top]` of each
/// query's `top` most attended keys (descending; ties to the lower key) and their key
/// positions along the S axis of k (packed positions with cu_seqlens). A row with fewer
/// visible keys than `top` is padded with weight 0 and index −1. `top` may exceed Sk, as
/// long as the padded outputs are no larger than q and k together (or 2^20 elements): a `top`
/// of 2^40 is an `Err`, not a 16 TB allocation.
pub fn top_keys<E: Element>(
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    top: usize,
) -> Result<TopKeys<E::Acc>> {
    E::attention_top_keys(Isa::active(), params, shape, inputs, top)
}

/// [`top_keys`] on a chosen instruction set.
#[doc(hidden)]
pub fn top_keys_on<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    top: usize,
) -> Result<TopKeys<E::Acc>> {
    E::attention_top_keys(isa, params, shape, inputs, top)
}

/// The CPU top keys, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn top_keys_impl<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    top: usize,
) -> Result<TopKeys<E::Acc>> {
    let isa = isa.check()?;
    let shape = AttentionShape {
        value_dim: 0,
        ..shape
    };
    let (sizes, segments) = inputs.validate(params, &shape, false)?;
    let out = check_top(
        &shape,
        sizes,
        top,
        inputs.q.len().saturating_add(inputs.k.len()),
    )?;
    let segments = with_queries(segments, sizes);
    let (weights, indices) = cpu::top_keys(isa, params, &shape, inputs, &segments, sizes, top, out);
    Ok(TopKeys { weights, indices })
}

/// The sequences that have query rows: one without any adds nothing to any output (its key
/// gradients are zero), so the CPU paths never loop over its heads or size scratch by its
/// dims (rule 4 of crate::error). With no query head (Hq = 0) none has.
fn with_queries(mut segments: Vec<Segment>, sizes: Sizes) -> Vec<Segment> {
    segments.retain(|s| s.q_len > 0 && sizes.lse > 0);
    segments
}

/// The lengths of the backward's `o`, `do` and `lse`.
fn check_backward_lens(
    s: &AttentionShape,
    sizes: Sizes,
    o: usize,
    d_o: usize,
    lse: usize,
) -> Result<()> {
    let o_dims = format!("[{}, {}, {}, {}]", s.batch, s.len_q, s.heads_q, s.value_dim);
    check_len("o", o, sizes.o, &o_dims)?;
    check_len("do", d_o, sizes.o, &o_dims)?;
    check_len(
        "lse",
        lse,
        sizes.lse,
        &format!("[{}, {}, {}]", s.batch, s.heads_q, s.len_q),
    )
}

/// Checks `top` and returns the element count of top_keys' outputs. A `top` past Sk only
/// pads, so its outputs may then hold no more than q and k together (`inputs` elements) or
/// [`crate::error::UNBACKED_LIMIT`].
fn check_top(shape: &AttentionShape, sizes: Sizes, top: usize, inputs: usize) -> Result<usize> {
    if top == 0 {
        return Err(Error::invalid("top", "must be at least 1"));
    }
    if i32::try_from(shape.len_k).is_err() {
        return Err(Error::overflow(
            "k",
            "key positions do not fit in i32 indices",
        ));
    }
    let out = sizes
        .lse
        .checked_mul(top)
        .filter(|n| n.checked_mul(8).is_some())
        .ok_or_else(|| {
            Error::overflow(
                "weights",
                format!("[B·Hq·Sq = {}] × top = {top}", sizes.lse),
            )
        })?;
    if top > shape.len_k {
        check_backed("k", "a `top` past Sk", out, inputs)?;
    }
    Ok(out)
}
