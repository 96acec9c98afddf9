//! Sparse top-k encoding on arrays: [`crate::topk`]'s `rows`, the SAE encoders, `nearest`,
//! `decode` and `backward`, with every input's dims checked.
//!
//! Layouts: `x [B, Dm]` (`rows`: `x [rows, N]`), `w_enc`, `w_dec`, `codebook [L, Dm]`,
//! `b_enc`, `threshold [L]`, `b_dec [Dm]`, and the selections `indices`, `values [B, k]`.
//! Order, ties and NaN handling are the slice API's. The CSR encoders return
//! [`crate::topk::Csr`] as the slice API does. `decode` and `backward` read `k` from the
//! dims of `indices` (the slice API's `k` argument there is the width of `indices`).
//!
//! ```
//! use neurokernels::nd::ndarray::{self, ArrayD, IxDyn};
//! use neurokernels::nd::topk::{self, RowsParams};
//!
//! let x = ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 3.0, 2.0, 0.0, -1.0, 5.0]).unwrap();
//! let top = topk::rows(&RowsParams::new(), 2, x.view())?;
//! assert_eq!(top.values, ndarray::arr2(&[[3.0, 2.0], [5.0, 0.0]]));
//! assert_eq!(top.indices, ndarray::arr2(&[[1, 2], [2, 0]]));
//!
//! // a matrix of rank 1 is refused, naming it
//! let flat = x.view().into_shape_with_order(IxDyn(&[6])).unwrap();
//! let err = topk::rows(&RowsParams::new(), 2, flat).unwrap_err();
//! assert_eq!(err.to_string(), "tensor `x`: expected rank 2 ([rows, N]), got [6]");
//! # Ok::<(), neurokernels::Error>(())
//! ```

use super::{array, dims, dims_opt, slice, slice_opt};
use crate::element::Element;
use crate::error::Result;
use crate::topk::{self as flat, RowsShape, SaeShape};
use ndarray::{Array1, Array2, ArrayViewD};

#[doc(no_inline)]
pub use crate::topk::{Csr, Metric, RowsParams};

/// `k` selected entries per row: `values [rows, k]`, best first, and their column (latent,
/// code) `indices [rows, k]`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TopK<E> {
    /// `[rows, k]`, best first.
    pub values: Array2<E>,
    /// `[rows, k]`: the column of each value.
    pub indices: Array2<i32>,
}

/// The flat selection as arrays of `[rows, k]`.
fn top_k<E>(rows: usize, k: usize, t: flat::TopK<E>) -> Result<TopK<E>> {
    Ok(TopK {
        values: array("values", [rows, k], t.values)?,
        indices: array("indices", [rows, k], t.indices)?,
    })
}

/// [`crate::topk::rows`] on arrays: the `k` largest (or smallest) entries of each row of
/// `x [rows, N]`, as `values [rows, k]` best first and their column `indices [rows, k]`.
pub fn rows<E: Element>(params: &RowsParams, k: usize, x: ArrayViewD<'_, E>) -> Result<TopK<E>> {
    let [r, n] = dims("x", &x, [None; 2], "[rows, N]")?;
    let t = flat::rows(params, RowsShape::new(r, n), k, &slice(&x))?;
    top_k(r, k, t)
}

/// The inputs of the SAE encoders, as [`crate::topk::EncoderInputs`].
#[derive(Clone, Debug)]
pub struct EncoderInputs<'a, E> {
    /// `[B, Dm]`: the rows to encode.
    pub x: ArrayViewD<'a, E>,
    /// `[L, Dm]`: the encoder weights, one row per latent.
    pub w_enc: ArrayViewD<'a, E>,
    /// `[L]`: the encoder bias.
    pub b_enc: ArrayViewD<'a, E>,
    /// `[Dm]`: the decoder bias, subtracted from x first (`None` = zeros).
    pub b_dec: Option<ArrayViewD<'a, E>>,
}

/// `x [B, Dm]`, `w [L, Dm]` (named `w_name`) and `b_dec [Dm]` checked: the shape.
fn sae_shape<E>(
    x: &ArrayViewD<'_, E>,
    w_name: &str,
    w: &ArrayViewD<'_, E>,
    b_dec: Option<&ArrayViewD<'_, E>>,
) -> Result<SaeShape> {
    let [b, dm] = dims("x", x, [None; 2], "[B, Dm]")?;
    let [l, _] = dims(w_name, w, [None, Some(dm)], "[L, Dm], Dm from x")?;
    dims_opt("b_dec", b_dec, [dm], "[Dm], Dm from x")?;
    Ok(SaeShape::new(b, dm, l))
}

impl<E: Element> EncoderInputs<'_, E> {
    /// Checks every input's dims and runs `op` on the slice API's inputs.
    fn run<R>(
        &self,
        op: impl FnOnce(SaeShape, &flat::EncoderInputs<'_, E>) -> Result<R>,
    ) -> Result<R> {
        let s = sae_shape(&self.x, "w_enc", &self.w_enc, self.b_dec.as_ref())?;
        dims("b_enc", &self.b_enc, [Some(s.latents)], "[L], L from w_enc")?;
        let (x, w_enc, b_enc) = (slice(&self.x), slice(&self.w_enc), slice(&self.b_enc));
        let b_dec = slice_opt(self.b_dec.as_ref());
        let inputs = flat::EncoderInputs {
            x: &x,
            w_enc: &w_enc,
            b_enc: &b_enc,
            b_dec: b_dec.as_deref(),
        };
        op(s, &inputs)
    }
}

/// [`crate::topk::encode`] (`sae.encode`) on arrays: per row, the `k` largest
/// ReLU((x − b_dec)·W_encᵀ + b_enc), descending, as `values [B, k]` and `indices [B, k]`.
pub fn encode<E: Element>(k: usize, inputs: &EncoderInputs<'_, E>) -> Result<TopK<E>> {
    inputs.run(|s, inputs| top_k(s.batch, k, flat::encode(s, k, inputs)?))
}

/// [`crate::topk::encode_batch_topk`] (`sae.encode_batch_topk`) on arrays: the B·k largest
/// positive pre-activations over the whole batch, as a [`Csr`] `[B, L]` matrix.
pub fn encode_batch_topk<E: Element>(k: usize, inputs: &EncoderInputs<'_, E>) -> Result<Csr<E>> {
    inputs.run(|s, inputs| flat::encode_batch_topk(s, k, inputs))
}

/// [`crate::topk::encode_jumprelu`] (`sae.encode_jumprelu`) on arrays: the pre-activations
/// above `threshold [L]` (strictly), as a [`Csr`] `[B, L]` matrix.
pub fn encode_jumprelu<E: Element>(
    inputs: &EncoderInputs<'_, E>,
    threshold: ArrayViewD<'_, E>,
) -> Result<Csr<E>> {
    inputs.run(|s, inputs| {
        dims(
            "threshold",
            &threshold,
            [Some(s.latents)],
            "[L], L from w_enc",
        )?;
        flat::encode_jumprelu(s, inputs, &slice(&threshold))
    })
}

/// The outputs of [`encode_mp`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct MatchingPursuit<E> {
    /// `[B, k]`: the coefficient of each step, in selection order.
    pub values: Array2<E>,
    /// `[B, k]`: the atom of each step.
    pub indices: Array2<i32>,
    /// `[B, Dm]`: what is left of x − b_dec.
    pub residual: Array2<E>,
}

/// [`crate::topk::encode_mp`] (`sae.encode_mp`) on arrays: `k` steps of matching pursuit of
/// `x [B, Dm]` (minus `b_dec [Dm]`) over the atoms `w_dec [L, Dm]`; returns `values`,
/// `indices [B, k]` and `residual [B, Dm]`.
pub fn encode_mp<E: Element>(
    k: usize,
    x: ArrayViewD<'_, E>,
    w_dec: ArrayViewD<'_, E>,
    b_dec: Option<ArrayViewD<'_, E>>,
) -> Result<MatchingPursuit<E>> {
    let s = sae_shape(&x, "w_dec", &w_dec, b_dec.as_ref())?;
    let b_dec = slice_opt(b_dec.as_ref());
    let mp = flat::encode_mp(s, k, &slice(&x), &slice(&w_dec), b_dec.as_deref())?;
    Ok(MatchingPursuit {
        values: array("values", [s.batch, k], mp.values)?,
        indices: array("indices", [s.batch, k], mp.indices)?,
        residual: array("residual", [s.batch, s.dm], mp.residual)?,
    })
}

/// [`crate::topk::nearest`] (`codebook.nearest`) on arrays: per row of `x [B, Dm]`, the `k`
/// best rows of `codebook [L, Dm]` by `metric`, as `values` (the scores) and
/// `indices [B, k]`.
pub fn nearest<E: Element>(
    metric: Metric,
    k: usize,
    x: ArrayViewD<'_, E>,
    codebook: ArrayViewD<'_, E>,
) -> Result<TopK<E>> {
    let s = sae_shape(&x, "codebook", &codebook, None)?;
    let t = flat::nearest(metric, s, k, &slice(&x), &slice(&codebook))?;
    top_k(s.batch, k, t)
}

/// `indices [B, k]` and `values [B, k]` checked: (B, k).
fn selection<E>(
    indices: &ArrayViewD<'_, i32>,
    values: &ArrayViewD<'_, E>,
    b: Option<usize>,
) -> Result<(usize, usize)> {
    let layout = if b.is_some() {
        "[B, k], B from x"
    } else {
        "[B, k]"
    };
    let [b, k] = dims("indices", indices, [b, None], layout)?;
    dims("values", values, [Some(b), Some(k)], "[B, k], as indices")?;
    Ok((b, k))
}

/// [`crate::topk::decode`] (`sae.decode`) on arrays: x_hat\[b\] = Σ_j values\[b, j\]·
/// w_dec\[indices\[b, j\]\] + b_dec, from `indices`, `values [B, k]`, `w_dec [L, Dm]` and
/// `b_dec [Dm]`; returns `x_hat [B, Dm]`.
pub fn decode<E: Element>(
    indices: ArrayViewD<'_, i32>,
    values: ArrayViewD<'_, E>,
    w_dec: ArrayViewD<'_, E>,
    b_dec: Option<ArrayViewD<'_, E>>,
) -> Result<Array2<E>> {
    let (b, k) = selection(&indices, &values, None)?;
    let [l, dm] = dims("w_dec", &w_dec, [None; 2], "[L, Dm]")?;
    dims_opt("b_dec", b_dec.as_ref(), [dm], "[Dm], Dm from w_dec")?;
    let b_dec = slice_opt(b_dec.as_ref());
    let (indices, values, w_dec) = (slice(&indices), slice(&values), slice(&w_dec));
    let s = SaeShape::new(b, dm, l);
    let x_hat = flat::decode(s, k, &indices, &values, &w_dec, b_dec.as_deref())?;
    array("x_hat", [b, dm], x_hat)
}

/// The inputs of [`backward`], as [`crate::topk::BackwardInputs`].
#[derive(Clone, Debug)]
pub struct BackwardInputs<'a, E> {
    /// `[B, Dm]`: the encoded rows.
    pub x: ArrayViewD<'a, E>,
    /// `[L, Dm]`: the encoder weights.
    pub w_enc: ArrayViewD<'a, E>,
    /// `[L]`: the encoder bias.
    pub b_enc: ArrayViewD<'a, E>,
    /// `[Dm]`: the decoder bias, subtracted from x by the encoder (`None` = zeros).
    pub b_dec: Option<ArrayViewD<'a, E>>,
    /// `[L, Dm]`: the decoder weights.
    pub w_dec: ArrayViewD<'a, E>,
    /// `[B, k]`: the selected latents, each in 0..L.
    pub indices: ArrayViewD<'a, i32>,
    /// `[B, k]`: the selected values (after ReLU).
    pub values: ArrayViewD<'a, E>,
    /// `[B, Dm]`: the gradient of the loss with respect to the reconstruction x_hat.
    pub d_xhat: ArrayViewD<'a, E>,
}

/// The gradients of [`backward`], each with the shape of its parameter.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SaeGrads<E> {
    /// `[L, Dm]`: the gradient of `w_dec`.
    pub dw_dec: Array2<E>,
    /// `[Dm]`: the gradient of `b_dec` (at b_dec = 0 when it was not given).
    pub db_dec: Array1<E>,
    /// `[L, Dm]`: the gradient of `w_enc`.
    pub dw_enc: Array2<E>,
    /// `[L]`: the gradient of `b_enc`.
    pub db_enc: Array1<E>,
    /// `[B, Dm]`: the gradient of `x`.
    pub dx: Array2<E>,
}

/// [`crate::topk::backward`] (`sae.backward`) on arrays: the gradients of
/// sum(x_hat·d_xhat) for the selection `indices`, `values [B, k]` (k read from their dims).
pub fn backward<E: Element>(inputs: &BackwardInputs<'_, E>) -> Result<SaeGrads<E>> {
    let i = inputs;
    let s = sae_shape(&i.x, "w_enc", &i.w_enc, i.b_dec.as_ref())?;
    let (b, dm, l) = (s.batch, s.dm, s.latents);
    dims("b_enc", &i.b_enc, [Some(l)], "[L], L from w_enc")?;
    dims("w_dec", &i.w_dec, [l, dm].map(Some), "[L, Dm], as w_enc")?;
    let (_, k) = selection(&i.indices, &i.values, Some(b))?;
    dims("d_xhat", &i.d_xhat, [b, dm].map(Some), "[B, Dm], as x")?;
    let (x, w_enc, b_enc) = (slice(&i.x), slice(&i.w_enc), slice(&i.b_enc));
    let (w_dec, indices, values) = (slice(&i.w_dec), slice(&i.indices), slice(&i.values));
    let (d_xhat, b_dec) = (slice(&i.d_xhat), slice_opt(i.b_dec.as_ref()));
    let g = flat::backward(
        s,
        k,
        &flat::BackwardInputs {
            x: &x,
            w_enc: &w_enc,
            b_enc: &b_enc,
            b_dec: b_dec.as_deref(),
            w_dec: &w_dec,
            indices: &indices,
            values: &values,
            d_xhat: &d_xhat,
        },
    )?;
    Ok(SaeGrads {
        dw_dec: array("dw_dec", [l, dm], g.dw_dec)?,
        db_dec: array("db_dec", [dm], g.db_dec)?,
        dw_enc: array("dw_enc", [l, dm], g.dw_enc)?,
        db_enc: array("db_enc", [l], g.db_enc)?,
        dx: array("dx", [b, dm], g.dx)?,
    })
}
