//! Fused attention on arrays: [`crate::attention`]'s `forward`, `backward` and `top_keys`,
//! with every input's dims checked.
//!
//! Layouts: `q [B, Sq, Hq, D]`, `k [B, Sk, Hk, D]`, `v [B, Sk, Hk, Dv]`, `o [B, Sq, Hq, Dv]`,
//! `lse [B, Hq, Sq]`; `alibi_slopes [Hq]`, `bias [Bb, Hb, Sq, Sk]` with Bb in {1, B} and
//! Hb in {1, Hq} (broadcast over the axes of size 1). Params, masks and GQA/MQA are the
//! slice API's.
//!
//! Packed variable-length sequences ([`AttentionInputs::cu_seqlens`]) are views with
//! B = 1: `q [1, total_q, Hq, D]`, `k [1, total_k, Hk, D]`, `v [1, total_k, Hk, Dv]`, and
//! the outputs `o [1, total_q, Hq, Dv]`, `lse [1, Hq, total_q]` and top_keys'
//! `[1, Hq, total_q, top]` (the slice API's packed layouts, with the batch axis of 1);
//! `bias` is indexed by packed positions, `[Bb, Hb, total_q, total_k]`. The cumulative
//! lengths are 1-D `i32` views, checked by the slice API (from 0, non-decreasing, ending at
//! the packed lengths).

use super::{array, dims, dims_opt, slice, slice_opt};
use crate::attention::{self as flat, AttentionShape, Bias};
use crate::element::Element;
use crate::error::Result;
use ndarray::{Array3, Array4, ArrayViewD};
use std::borrow::Cow;

#[doc(no_inline)]
pub use crate::attention::{AttentionParams, BackwardTasks, SplitKv};

/// Packed variable-length sequences: sequence n holds query rows `q[n]..q[n+1]` and key rows
/// `k[n]..k[n+1]` of the S axes (B = 1), as [`crate::attention::CuSeqlens`].
#[derive(Clone, Debug)]
pub struct CuSeqlens<'a> {
    /// `[N+1]`: cumulative query lengths, from 0, non-decreasing, ending at Sq (errors name
    /// it `cu_seqlens_q`).
    pub q: ArrayViewD<'a, i32>,
    /// `[N+1]`: cumulative key lengths, from 0, non-decreasing, ending at Sk (errors name it
    /// `cu_seqlens_k`).
    pub k: ArrayViewD<'a, i32>,
}

/// The inputs of the attention ops, as [`crate::attention::AttentionInputs`]: `v` is
/// neither read nor checked by [`top_keys`].
#[derive(Clone, Debug)]
pub struct AttentionInputs<'a, E: Element> {
    /// `[B, Sq, Hq, D]`: the queries.
    pub q: ArrayViewD<'a, E>,
    /// `[B, Sk, Hk, D]`: the keys.
    pub k: ArrayViewD<'a, E>,
    /// `[B, Sk, Hk, Dv]`: the values (ignored by `top_keys`).
    pub v: ArrayViewD<'a, E>,
    /// `[Hq]`, accumulator type: ALiBi slopes, `s -= slope[h]·|i + Sk − Sq − j|` (default none).
    pub alibi_slopes: Option<ArrayViewD<'a, E::Acc>>,
    /// `[Bb, Hb, Sq, Sk]`, accumulator type: an additive score bias, Bb in {1, B}, Hb in
    /// {1, Hq} (default none).
    pub bias: Option<ArrayViewD<'a, E::Acc>>,
    /// Packed variable-length sequences, with B = 1 (default none).
    pub cu_seqlens: Option<CuSeqlens<'a>>,
}

impl<'a, E: Element> AttentionInputs<'a, E> {
    /// q, k, v without optional inputs.
    pub fn new(q: ArrayViewD<'a, E>, k: ArrayViewD<'a, E>, v: ArrayViewD<'a, E>) -> Self {
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
    pub fn alibi_slopes(mut self, slopes: Option<ArrayViewD<'a, E::Acc>>) -> Self {
        self.alibi_slopes = slopes;
        self
    }

    /// Sets the additive bias `[Bb, Hb, Sq, Sk]` (default none); Bb and Hb are read from its
    /// dims.
    pub fn bias(mut self, bias: Option<ArrayViewD<'a, E::Acc>>) -> Self {
        self.bias = bias;
        self
    }

    /// Sets the packed sequences' cumulative lengths (default none; requires B = 1).
    pub fn cu_seqlens(mut self, cu: Option<CuSeqlens<'a>>) -> Self {
        self.cu_seqlens = cu;
        self
    }

    /// Checks every input's dims (`v` only `with_v`) and runs `op` on the slice API's inputs.
    fn run<R>(
        &self,
        with_v: bool,
        op: impl FnOnce(AttentionShape, &flat::AttentionInputs<'_, E>) -> Result<R>,
    ) -> Result<R> {
        let [b, sq, hq, d] = dims("q", &self.q, [None; 4], "[B, Sq, Hq, D]")?;
        let [_, sk, hk, _] = dims(
            "k",
            &self.k,
            [Some(b), None, None, Some(d)],
            "[B, Sk, Hk, D], B and D from q",
        )?;
        let dv = if with_v {
            let [.., dv] = dims(
                "v",
                &self.v,
                [Some(b), Some(sk), Some(hk), None],
                "[B, Sk, Hk, Dv], B, Sk, Hk from k",
            )?;
            dv
        } else {
            0
        };
        dims_opt(
            "alibi_slopes",
            self.alibi_slopes.as_ref(),
            [hq],
            "[Hq], Hq from q",
        )?;
        let bias_dims = match &self.bias {
            Some(bias) => Some(dims(
                "bias",
                bias,
                [None, None, Some(sq), Some(sk)],
                "[Bb, Hb, Sq, Sk], Sq from q, Sk from k",
            )?),
            None => None,
        };
        if let Some(cu) = &self.cu_seqlens {
            dims("cu_seqlens_q", &cu.q, [None], "[N+1]")?;
            let n = cu.q.len();
            dims(
                "cu_seqlens_k",
                &cu.k,
                [Some(n)],
                "[N+1], N+1 from cu_seqlens_q",
            )?;
        }
        let (q, k) = (slice(&self.q), slice(&self.k));
        let v = if with_v {
            slice(&self.v)
        } else {
            Cow::Borrowed(&[][..])
        };
        let slopes = slice_opt(self.alibi_slopes.as_ref());
        let bias = slice_opt(self.bias.as_ref());
        let cu = self
            .cu_seqlens
            .as_ref()
            .map(|cu| (slice(&cu.q), slice(&cu.k)));
        let inputs = flat::AttentionInputs::new(&q, &k, &v)
            .alibi_slopes(slopes.as_deref())
            .bias(
                bias.as_deref()
                    .zip(bias_dims)
                    .map(|(data, [bb, hb, ..])| Bias {
                        data,
                        batch: bb,
                        heads: hb,
                    }),
            )
            .cu_seqlens(cu.as_ref().map(|(q, k)| flat::CuSeqlens { q, k }));
        op(AttentionShape::new(b, sq, sk, hq, hk, d, dv), &inputs)
    }
}

/// The outputs of [`forward`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionOut<E: Element> {
    /// `[B, Sq, Hq, Dv]` (packed: `[1, total_q, Hq, Dv]`): the attention output.
    pub o: Array4<E>,
    /// `[B, Hq, Sq]` (packed: `[1, Hq, total_q]`), accumulator type: the natural-log sum of
    /// exp of each query's scores; −inf for a query that sees no key.
    pub lse: Array3<E::Acc>,
}

/// `[B, Sq, Hq, Dv]`.
fn o_dims(s: &AttentionShape) -> [usize; 4] {
    [s.batch, s.len_q, s.heads_q, s.value_dim]
}

/// `[B, Hq, Sq]`.
fn lse_dims(s: &AttentionShape) -> [usize; 3] {
    [s.batch, s.heads_q, s.len_q]
}

/// [`crate::attention::forward`] on arrays: returns `o [B, Sq, Hq, Dv]` and
/// `lse [B, Hq, Sq]`.
pub fn forward<E: Element>(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_, E>,
) -> Result<AttentionOut<E>> {
    inputs.run(true, |s, inputs| {
        let out = flat::forward(params, s, inputs)?;
        Ok(AttentionOut {
            o: array("o", o_dims(&s), out.o)?,
            lse: array("lse", lse_dims(&s), out.lse)?,
        })
    })
}

/// The gradients of [`backward`], each with the shape of its input.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionGrads<E> {
    /// `[B, Sq, Hq, D]`: the gradient of `q`.
    pub dq: Array4<E>,
    /// `[B, Sk, Hk, D]`: the gradient of `k`, summed over the query heads that share each
    /// KV head.
    pub dk: Array4<E>,
    /// `[B, Sk, Hk, Dv]`: the gradient of `v`, summed over the query heads that share each
    /// KV head.
    pub dv: Array4<E>,
}

/// [`crate::attention::backward`] on arrays: from the forward's `o [B, Sq, Hq, Dv]` and
/// `lse [B, Hq, Sq]` and the upstream `d_o [B, Sq, Hq, Dv]` (named `do` in errors), the
/// gradients of Σ o·do.
pub fn backward<E: Element>(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_, E>,
    o: ArrayViewD<'_, E>,
    d_o: ArrayViewD<'_, E>,
    lse: ArrayViewD<'_, E::Acc>,
) -> Result<AttentionGrads<E>> {
    inputs.run(true, |s, inputs| {
        let layout = "[B, Sq, Hq, Dv], B, Sq, Hq from q, Dv from v";
        dims("o", &o, o_dims(&s).map(Some), layout)?;
        dims("do", &d_o, o_dims(&s).map(Some), layout)?;
        let lse_layout = "[B, Hq, Sq], from q";
        dims("lse", &lse, lse_dims(&s).map(Some), lse_layout)?;
        let (o, d_o, lse) = (slice(&o), slice(&d_o), slice(&lse));
        let g = flat::backward(params, s, inputs, &o, &d_o, &lse)?;
        let (b, sk, hk) = (s.batch, s.len_k, s.heads_kv);
        Ok(AttentionGrads {
            dq: array("dq", [b, s.len_q, s.heads_q, s.head_dim], g.dq)?,
            dk: array("dk", [b, sk, hk, s.head_dim], g.dk)?,
            dv: array("dv", [b, sk, hk, s.value_dim], g.dv)?,
        })
    })
}

/// The outputs of [`top_keys`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TopKeys<A> {
    /// `[B, Hq, Sq, top]` (packed: `[1, Hq, total_q, top]`): softmax probabilities,
    /// descending.
    pub weights: Array4<A>,
    /// `[B, Hq, Sq, top]`: each weight's key position along the S axis of k; −1 for padding.
    pub indices: Array4<i32>,
}

/// [`crate::attention::top_keys`] on arrays: the softmax probabilities of each query's `top`
/// most attended keys and their positions, both `[B, Hq, Sq, top]`. `inputs.v` is not read.
pub fn top_keys<E: Element>(
    params: &AttentionParams,
    inputs: &AttentionInputs<'_, E>,
    top: usize,
) -> Result<TopKeys<E::Acc>> {
    inputs.run(false, |s, inputs| {
        let out = flat::top_keys(params, s, inputs, top)?;
        let dims = [s.batch, s.heads_q, s.len_q, top];
        Ok(TopKeys {
            weights: array("weights", dims, out.weights)?,
            indices: array("indices", dims, out.indices)?,
        })
    })
}
