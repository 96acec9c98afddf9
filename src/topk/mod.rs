//! Sparse top-k encoding (CPU): `topk.rows`, the sparse-autoencoder ops `sae.encode`,
//! `sae.encode_batch_topk`, `sae.encode_jumprelu`, `sae.decode`, `sae.backward`,
//! `sae.encode_mp` (matching pursuit) and `codebook.nearest`, as CASES.md specifies them.
//!
//! The encoders never materialize the [B, L] pre-activations: scores are computed in
//! register tiles and selected on the fly ([`encode`] module docs). Element types f32, f16,
//! bf16 (accumulating in f32) and f64.
//!
//! Order and ties everywhere: larger first, and the lower index first among equal values.
//! NaN: `topk.rows` ranks NaN above every number (as torch.topk does: first with `largest`,
//! last without); `sae.encode` keeps NaN pre-activations (ReLU(NaN) = NaN, ranked first), so
//! a NaN row of `x` returns NaN values; the CSR encoders (`batch_topk`, `jumprelu`) never
//! keep a NaN; `codebook.nearest` ranks a NaN score first.
//!
//! Determinism: results are bit-identical whatever the thread count (exact selection under a
//! total order; the backward groups its sparse updates by latent and sums them in a fixed
//! order, no atomics).
//!
//! # Example
//!
//! One step of a top-k sparse autoencoder: encode (the dense `[B, L]` pre-activations are
//! never formed), decode, and the gradients of the reconstruction.
//!
//! ```
//! use neurokernels::topk::{self, BackwardInputs, EncoderInputs, SaeShape};
//!
//! // 2 rows of 3 features, 4 latents; latent l reads feature l % 3
//! let shape = SaeShape { batch: 2, dm: 3, latents: 4 };
//! let x = [1.0f32, 2.0, 3.0, 3.0, 2.0, 1.0];
//! let w_enc = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0];
//! let b_enc = [0.0f32; 4];
//! let inputs = EncoderInputs { x: &x, w_enc: &w_enc, b_enc: &b_enc, b_dec: None };
//!
//! let code = topk::encode(shape, 2, &inputs)?; // k = 2 per row, largest first
//! assert_eq!(code.indices, [2, 1, 0, 1]);
//! assert_eq!(code.values, [3.0, 2.0, 3.0, 2.0]);
//!
//! let w_dec = w_enc; // tied weights
//! let x_hat = topk::decode(shape, 2, &code.indices, &code.values, &w_dec, None)?;
//! assert_eq!(x_hat, [0.0, 2.0, 3.0, 3.0, 2.0, 0.0]);
//!
//! let d_xhat: Vec<f32> = x_hat.iter().zip(&x).map(|(r, x)| r - x).collect();
//! let grads = topk::backward(shape, 2, &BackwardInputs {
//!     x: &x, w_enc: &w_enc, b_enc: &b_enc, b_dec: None, w_dec: &w_dec,
//!     indices: &code.indices, values: &code.values, d_xhat: &d_xhat,
//! })?;
//! assert_eq!(grads.dw_enc.len(), w_enc.len()); // [L, Dm]
//! # Ok::<(), neurokernels::Error>(())
//! ```

#[cfg(feature = "cuda")]
pub mod cuda;
mod encode;
#[cfg(target_arch = "x86_64")]
mod screen;
mod select;
mod sparse;

pub(crate) use select::rows_impl;
pub use select::{RowsParams, RowsShape, rows, rows_on};
pub use sparse::{BackwardInputs, SaeGrads, backward, backward_on, decode, decode_on};
pub(crate) use sparse::{backward_impl, decode_impl};
#[cfg(feature = "candle")]
pub(crate) use sparse::{gather_rows, scatter_rows, selected_dots};

use crate::cpu::Isa;
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_backed, check_len};
use encode::{Collect, Encoder};
use select::rank;

/// Sizes of the SAE ops: `batch` rows of `dm` features against `latents` dictionary rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SaeShape {
    /// B, the rows of x.
    pub batch: usize,
    /// Dm, the model (input) dim: columns of x and of the dictionary.
    pub dm: usize,
    /// L, the latents (dictionary or codebook rows); must fit in i32.
    pub latents: usize,
}

impl SaeShape {
    /// From the dims in field order (B, Dm, L).
    pub fn new(batch: usize, dm: usize, latents: usize) -> Self {
        Self { batch, dm, latents }
    }

    /// (B·Dm, L·Dm), checked; L must fit the i32 indices.
    fn sizes(&self) -> Result<(usize, usize)> {
        check_index_range("w", self.latents)?;
        let over = |t: &str| Error::overflow(t, format!("{self:?} overflows"));
        let bx = self
            .batch
            .checked_mul(self.dm)
            .filter(|n| n.checked_mul(8).is_some())
            .ok_or_else(|| over("x"))?;
        let lw = self
            .latents
            .checked_mul(self.dm)
            .filter(|n| n.checked_mul(8).is_some())
            .ok_or_else(|| over("w"))?;
        Ok((bx, lw))
    }
}

/// `k` selected entries per row: `values [rows, k]`, best first, and their column (latent,
/// code) `indices [rows, k]`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct TopK<E> {
    /// `[rows, k]`, best first.
    pub values: Vec<E>,
    /// `[rows, k]`: the column of each value.
    pub indices: Vec<i32>,
}

/// A sparse [B, L] matrix in compressed rows: row b holds `indices[indptr[b]..indptr[b+1]]`
/// with their `values`, in descending value order.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Csr<E> {
    /// `[B+1]`: row b's entries are `indptr[b]..indptr[b+1]`; `indptr[0] = 0`, `indptr[B]` = nnz.
    pub indptr: Vec<i32>,
    /// `[nnz]`: the latent (column) of each entry.
    pub indices: Vec<i32>,
    /// `[nnz]`: the entries' values, descending within each row.
    pub values: Vec<E>,
}

/// The inputs of the SAE encoders: `x [B, Dm]`, `w_enc [L, Dm]`, `b_enc [L]`, optional
/// `b_dec [Dm]` (subtracted from x first).
#[derive(Clone, Copy, Debug)]
pub struct EncoderInputs<'a, E> {
    /// `[B, Dm]`: the rows to encode.
    pub x: &'a [E],
    /// `[L, Dm]`: the encoder weights, one row per latent.
    pub w_enc: &'a [E],
    /// `[L]`: the encoder bias.
    pub b_enc: &'a [E],
    /// `[Dm]`: the decoder bias, subtracted from x first (`None` = zeros).
    pub b_dec: Option<&'a [E]>,
}

/// `k` in 1..=n, or an `Err` naming `k`.
pub(crate) fn check_k(name: &str, k: usize, n: usize, what: &str) -> Result<()> {
    if k == 0 || k > n {
        return Err(Error::invalid(
            name,
            format!("must be in 1..={n} ({what}), got {k}"),
        ));
    }
    Ok(())
}

/// Positions along an axis of length n must fit the i32 index outputs.
pub(crate) fn check_index_range(tensor: &str, n: usize) -> Result<()> {
    if n > i32::MAX as usize {
        return Err(Error::overflow(
            tensor,
            format!("{n} entries along the indexed axis do not fit i32 indices"),
        ));
    }
    Ok(())
}

/// Rules 3 and 4 of [`crate::error`]: with Dm = 0, x (and every weight matrix) is empty, so
/// B (and L, but for a bias) is carried by no input: the B·L scores, times `steps` passes,
/// are bounded by the `inputs` elements.
fn check_rows_backed(shape: SaeShape, steps: usize, inputs: usize) -> Result<()> {
    if shape.dm > 0 {
        return Ok(());
    }
    let work = shape
        .batch
        .saturating_mul(shape.latents.max(1))
        .saturating_mul(steps.max(1));
    check_backed("x", "B and L (x has Dm = 0 columns)", work, inputs)
}

/// The element count B·k of `[B, k]` outputs, checked.
fn out_len(shape: SaeShape, k: usize, tensor: &str) -> Result<usize> {
    shape
        .batch
        .checked_mul(k)
        .ok_or_else(|| Error::overflow(tensor, format!("[B = {}, k = {k}]", shape.batch)))
}

fn widen<E: Element>(v: &[E]) -> Vec<E::Acc> {
    v.iter().map(|x| x.to_acc()).collect()
}

impl<E: Element> EncoderInputs<'_, E> {
    fn validate(&self, shape: SaeShape) -> Result<()> {
        let (bx, lw) = shape.sizes()?;
        let SaeShape { batch, dm, latents } = shape;
        check_len("x", self.x.len(), bx, &format!("[{batch}, {dm}]"))?;
        check_len("w_enc", self.w_enc.len(), lw, &format!("[{latents}, {dm}]"))?;
        check_len("b_enc", self.b_enc.len(), latents, &format!("[{latents}]"))?;
        if let Some(b) = self.b_dec {
            check_len("b_dec", b.len(), dm, &format!("[{dm}]"))?;
        }
        check_rows_backed(shape, 1, self.b_enc.len())
    }

    fn encoder<'s>(
        &'s self,
        shape: SaeShape,
        b_dec: &'s Option<Vec<E::Acc>>,
        b_enc: &'s [E::Acc],
    ) -> Encoder<'s, E, E> {
        Encoder {
            x: self.x,
            rows: shape.batch,
            dm: shape.dm,
            offset: b_dec.as_deref(),
            row_scale: None,
            w: self.w_enc,
            latents: shape.latents,
            scale: None,
            shift: Some(b_enc),
        }
    }
}

/// `sae.encode`: per row, the `k` largest of ReLU((x − b_dec)·W_encᵀ + b_enc), descending,
/// with their latent indices (`values [B, k]`, `indices [B, k]`). Where fewer than k are
/// positive the rest are zeros at the lowest latents with a non-positive pre-activation.
pub fn encode<E: Element>(
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<TopK<E>> {
    E::topk_encode(Isa::active(), shape, k, inputs)
}

/// [`encode`] on a chosen ISA.
#[doc(hidden)]
pub fn encode_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<TopK<E>> {
    E::topk_encode(isa, shape, k, inputs)
}

/// The CPU encoder, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn encode_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<TopK<E>> {
    isa.check()?;
    inputs.validate(shape)?;
    check_k("k", k, shape.latents, "the number of latents L")?;
    out_len(shape, k, "values")?;
    let b_dec = inputs.b_dec.map(widen);
    let b_enc = widen(inputs.b_enc);
    let enc = inputs.encoder(shape, &b_dec, &b_enc);
    let picked = enc.run(isa, Collect::TopK { k, relu: true });
    Ok(dense_topk::<E>(&picked, shape.batch, k, |v| v))
}

/// Per-row selections (each exactly k long) as `values [rows, k]`, `indices [rows, k]`.
fn dense_topk<E: Element>(
    picked: &[Vec<(E::Acc, u32)>],
    rows: usize,
    k: usize,
    map: impl Fn(E::Acc) -> E::Acc,
) -> TopK<E> {
    let mut values = vec![E::default(); rows * k];
    let mut indices = vec![0i32; rows * k];
    for (b, row) in picked.iter().enumerate() {
        for (j, &(v, i)) in row.iter().take(k).enumerate() {
            values[b * k + j] = E::from_acc(map(v));
            indices[b * k + j] = i as i32;
        }
    }
    TopK { values, indices }
}

/// CSR of per-row (value, latent) lists, each already descending.
fn csr<E: Element>(rows: &[Vec<(E::Acc, u32)>]) -> Result<Csr<E>> {
    csr_with(rows, E::from_acc)
}

/// [`csr`] of values in any type, each converted by `value`.
fn csr_with<E: Element, A: Copy>(rows: &[Vec<(A, u32)>], value: impl Fn(A) -> E) -> Result<Csr<E>> {
    let nnz: usize = rows.iter().map(Vec::len).sum();
    check_index_range("indices", nnz)?;
    let mut out = Csr {
        indptr: Vec::with_capacity(rows.len() + 1),
        indices: Vec::with_capacity(nnz),
        values: Vec::with_capacity(nnz),
    };
    out.indptr.push(0);
    for row in rows {
        for &(v, i) in row {
            out.indices.push(i as i32);
            out.values.push(value(v));
        }
        out.indptr.push(out.indices.len() as i32);
    }
    Ok(out)
}

/// `sae.encode_batch_topk`: the B·k largest ReLU pre-activations over the whole batch (ties:
/// lower flat index b·L + l first), of which the strictly positive are kept; CSR out, each
/// row descending. NaN pre-activations are never kept.
pub fn encode_batch_topk<E: Element>(
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<Csr<E>> {
    E::topk_encode_batch_topk(Isa::active(), shape, k, inputs)
}

/// [`encode_batch_topk`] on a chosen ISA.
#[doc(hidden)]
pub fn encode_batch_topk_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<Csr<E>> {
    E::topk_encode_batch_topk(isa, shape, k, inputs)
}

/// The CPU batch top-k, validated (instantiated per dtype in [`crate::dispatch`]).
///
/// A global threshold by selection without the dense matrix: each row first keeps its best
/// m = 2k (exact per-row lists from the fused encoder); the (B·k)-th best positive entry of
/// that pool is the candidate threshold. A row whose m-th kept entry still ranks above the
/// threshold may hide more winners, so only such rows are encoded again with m doubled,
/// until none is left (m reaches L at worst). The result is exact.
pub(crate) fn encode_batch_topk_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<Csr<E>> {
    isa.check()?;
    let budget = check_batch_topk(shape, inputs, k)?;
    let SaeShape { batch, dm, latents } = shape;
    let b_dec = inputs.b_dec.map(widen);
    let b_enc = widen(inputs.b_enc);
    // positives only: NaN and non-positive values can never be kept
    let positive = |row: Vec<(E::Acc, u32)>| -> Vec<(E::Acc, u32)> {
        row.into_iter().filter(|(v, _)| *v > E::Acc::ZERO).collect()
    };
    let mut m = (2 * k).min(latents);
    let first = inputs
        .encoder(shape, &b_dec, &b_enc)
        .run(isa, Collect::TopK { k: m, relu: true });
    // each list's last entry (its m-th best; NaN ranks first): the entries past the list
    // rank below it
    let mut last: Vec<Option<(E::Acc, u32)>> =
        first.iter().map(|row| row.last().copied()).collect();
    let mut kept: Vec<Vec<(E::Acc, u32)>> = first.into_iter().map(positive).collect();
    let mut depth = vec![m; batch]; // how many each row's list was allowed to hold
    loop {
        let threshold = batch_threshold(&kept, budget);
        let open: Vec<usize> = (0..batch)
            .filter(|&b| depth[b] < latents && may_hide_winners(last[b], b, threshold))
            .collect();
        if open.is_empty() {
            return csr::<E>(&at_or_above(kept, threshold));
        }
        m = (2 * m).min(latents);
        let x: Vec<E> = open
            .iter()
            .flat_map(|&b| inputs.x[b * dm..(b + 1) * dm].iter().copied())
            .collect();
        let sub = EncoderInputs { x: &x, ..*inputs };
        let again = sub
            .encoder(SaeShape::new(open.len(), dm, latents), &b_dec, &b_enc)
            .run(isa, Collect::TopK { k: m, relu: true });
        for (&b, row) in open.iter().zip(again) {
            last[b] = row.last().copied();
            kept[b] = positive(row);
            depth[b] = m;
        }
    }
}

/// The inputs of `sae.encode_batch_topk` checked; returns the budget B·k.
fn check_batch_topk<E: Element>(
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    k: usize,
) -> Result<usize> {
    inputs.validate(shape)?;
    check_k("k", k, shape.latents, "the number of latents L")?;
    out_len(shape, k, "k")
}

/// Strict order of batch entries (value, row, latent): larger value, then lower flat index.
fn beats<A: Accum>(a: (A, usize, u32), b: (A, usize, u32)) -> bool {
    match rank((a.0, 0), (b.0, 0)) {
        std::cmp::Ordering::Equal => (a.1, a.2) < (b.1, b.2),
        o => o == std::cmp::Ordering::Greater,
    }
}

/// Whether row b's top-m list, whose last (m-th best) entry is `last`, may leave out entries
/// of the batch top-k: when that entry is positive and ranks above the (candidate)
/// `threshold`, or is NaN (NaN ranks first, so the whole list is NaN, which is never kept,
/// and nothing is known of what follows). Shared by the CPU and CUDA batch top-k.
fn may_hide_winners<A: Accum>(
    last: Option<(A, u32)>,
    b: usize,
    threshold: Option<(A, usize, u32)>,
) -> bool {
    last.is_some_and(|(v, l)| {
        v.to_f64().is_nan() || (v > A::ZERO && threshold.is_none_or(|t| beats((v, b, l), t)))
    })
}

/// The entries of each row that rank at or above `threshold` (all of them without one).
fn at_or_above<A: Accum>(
    rows: Vec<Vec<(A, u32)>>,
    threshold: Option<(A, usize, u32)>,
) -> Vec<Vec<(A, u32)>> {
    let Some(t) = threshold else {
        return rows;
    };
    rows.into_iter()
        .enumerate()
        .map(|(b, row)| {
            row.into_iter()
                .filter(|&(v, l)| !beats(t, (v, b, l)))
                .collect()
        })
        .collect()
}

/// The `budget`-th best entry of the pool, or `None` when the pool is smaller.
fn batch_threshold<A: Accum>(kept: &[Vec<(A, u32)>], budget: usize) -> Option<(A, usize, u32)> {
    let mut pool: Vec<(A, usize, u32)> = kept
        .iter()
        .enumerate()
        .flat_map(|(b, row)| row.iter().map(move |&(v, l)| (v, b, l)))
        .collect();
    if pool.len() < budget || budget == 0 {
        return None;
    }
    let order = |a: &(A, usize, u32), b: &(A, usize, u32)| {
        if beats(*a, *b) {
            std::cmp::Ordering::Less
        } else if beats(*b, *a) {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    };
    let (_, t, _) = pool.select_nth_unstable_by(budget - 1, order);
    Some(*t)
}

/// `sae.encode_jumprelu`: keeps pre\[b, l\] where pre > threshold\[l\] (strictly), the value kept
/// being the pre-activation; CSR out, each row descending. A NaN pre-activation is never
/// kept; a NaN threshold is an error.
pub fn encode_jumprelu<E: Element>(
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    threshold: &[E],
) -> Result<Csr<E>> {
    E::topk_encode_jumprelu(Isa::active(), shape, inputs, threshold)
}

/// [`encode_jumprelu`] on a chosen ISA.
#[doc(hidden)]
pub fn encode_jumprelu_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    threshold: &[E],
) -> Result<Csr<E>> {
    E::topk_encode_jumprelu(isa, shape, inputs, threshold)
}

/// The CPU JumpReLU encoder, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn encode_jumprelu_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    threshold: &[E],
) -> Result<Csr<E>> {
    isa.check()?;
    check_jumprelu(shape, inputs, threshold)?;
    let b_dec = inputs.b_dec.map(widen);
    let b_enc = widen(inputs.b_enc);
    let theta = widen(threshold);
    let picked = inputs
        .encoder(shape, &b_dec, &b_enc)
        .run(isa, Collect::Above { threshold: &theta });
    csr::<E>(&picked)
}

/// The inputs of `sae.encode_jumprelu` checked: lengths, and no NaN threshold.
fn check_jumprelu<E: Element>(
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    threshold: &[E],
) -> Result<()> {
    inputs.validate(shape)?;
    let l = shape.latents;
    check_len("threshold", threshold.len(), l, &format!("[{l}]"))?;
    if let Some(i) = threshold.iter().position(|t| t.to_f64().is_nan()) {
        return Err(Error::invalid("threshold", format!("is NaN at latent {i}")));
    }
    Ok(())
}

/// The outputs of `sae.encode_mp`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct MatchingPursuit<E> {
    /// `[B, k]`: the coefficient of each step, in selection order.
    pub values: Vec<E>,
    /// `[B, k]`: the atom of each step.
    pub indices: Vec<i32>,
    /// `[B, Dm]`: what is left of x − b_dec.
    pub residual: Vec<E>,
}

/// `sae.encode_mp`: matching pursuit over the atoms `w_dec [L, Dm]` (assumed unit-norm, used
/// as given; an atom of norm above √2 grows the residual at each step it is chosen, which
/// over many steps can overflow the accumulator, so normalize the atoms): r = x − b_dec; k times j = argmax_l r·w_dec\[l\] (the signed dot; lowest index
/// among ties), c = r·w_dec\[j\], r −= c·w_dec\[j\].
///
/// Each step is one pass of the fused encoder (top-1 per row, the scores never stored):
/// 2·B·L·Dm flops and one read of w_dec per block of rows, then an O(B·Dm) residual update
/// that reads only the chosen atoms. The residual stays in the accumulator type between
/// steps.
pub fn encode_mp<E: Element>(
    shape: SaeShape,
    k: usize,
    x: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<MatchingPursuit<E>> {
    E::topk_encode_mp(Isa::active(), shape, k, x, w_dec, b_dec)
}

/// [`encode_mp`] on a chosen ISA.
#[doc(hidden)]
pub fn encode_mp_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    x: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<MatchingPursuit<E>> {
    E::topk_encode_mp(isa, shape, k, x, w_dec, b_dec)
}

/// The CPU matching pursuit, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn encode_mp_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    x: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<MatchingPursuit<E>>
where
    E::Acc: Element<Acc = E::Acc>,
{
    isa.check()?;
    check_mp(shape, x, w_dec, b_dec, k)?;
    let SaeShape { batch, dm, latents } = shape;
    let mut residual: Vec<E::Acc> = x
        .iter()
        .enumerate()
        .map(|(i, v)| match b_dec {
            Some(b) => v.to_acc() - b[i % dm.max(1)].to_acc(),
            None => v.to_acc(),
        })
        .collect();
    let mut values = vec![E::default(); batch * k];
    let mut indices = vec![0i32; batch * k];
    for step in 0..k {
        let best = Encoder::<E::Acc, E> {
            x: &residual,
            rows: batch,
            dm,
            offset: None,
            row_scale: None,
            w: w_dec,
            latents,
            scale: None,
            shift: None,
        }
        .run(isa, Collect::TopK { k: 1, relu: false });
        for (b, pick) in best.iter().enumerate() {
            let Some(&(c, j)) = pick.first() else {
                continue;
            };
            values[b * k + step] = E::from_acc(c);
            indices[b * k + step] = j as i32;
            let atom = &w_dec[j as usize * dm..(j as usize + 1) * dm];
            for (r, a) in residual[b * dm..(b + 1) * dm].iter_mut().zip(atom) {
                *r = *r - c * a.to_acc();
            }
        }
    }
    Ok(MatchingPursuit {
        values,
        indices,
        residual: residual.into_iter().map(E::from_acc).collect(),
    })
}

/// The inputs of `sae.encode_mp` checked.
fn check_mp<E: Element>(
    shape: SaeShape,
    x: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
    k: usize,
) -> Result<()> {
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    check_len("x", x.len(), bx, &format!("[{batch}, {dm}]"))?;
    check_len("w_dec", w_dec.len(), lw, &format!("[{latents}, {dm}]"))?;
    if let Some(b) = b_dec {
        check_len("b_dec", b.len(), dm, &format!("[{dm}]"))?;
    }
    check_k("k", k, latents.max(1), "the number of steps")?;
    if latents == 0 {
        return Err(Error::invalid("w_dec", "has no atoms (L = 0)"));
    }
    out_len(shape, k, "values")?;
    check_rows_backed(shape, k, 0)
}

/// The score of `codebook.nearest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Metric {
    /// x·c, largest first.
    #[default]
    Dot,
    /// x·c / (|x| |c|), largest first (a zero vector has cosine 0 with everything).
    Cosine,
    /// |x − c|², smallest first (computed as |x|² + |c|² − 2x·c, norms once, clamped at 0).
    L2,
}

impl Metric {
    /// The metric named `"dot"`, `"cosine"` or `"l2"` (the contract's `metric` param); any
    /// other name is `Err(InvalidArgument)`.
    pub fn parse(name: &str) -> Result<Metric> {
        match name {
            "dot" => Ok(Metric::Dot),
            "cosine" => Ok(Metric::Cosine),
            "l2" => Ok(Metric::L2),
            other => Err(Error::invalid(
                "metric",
                format!("must be \"dot\", \"cosine\" or \"l2\", got {other:?}"),
            )),
        }
    }
}

/// `codebook.nearest`: per row of `x [B, Dm]`, the `k` best codebook rows (`codebook [L,
/// Dm]`) by `metric`: `scores [B, k]` best first and `indices [B, k]`.
pub fn nearest<E: Element>(
    metric: Metric,
    shape: SaeShape,
    k: usize,
    x: &[E],
    codebook: &[E],
) -> Result<TopK<E>> {
    E::topk_nearest(Isa::active(), metric, shape, k, x, codebook)
}

/// [`nearest`] on a chosen ISA.
#[doc(hidden)]
pub fn nearest_on<E: Element>(
    isa: Isa,
    metric: Metric,
    shape: SaeShape,
    k: usize,
    x: &[E],
    codebook: &[E],
) -> Result<TopK<E>> {
    E::topk_nearest(isa, metric, shape, k, x, codebook)
}

/// The CPU nearest codes, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn nearest_impl<E: Element>(
    isa: Isa,
    metric: Metric,
    shape: SaeShape,
    k: usize,
    x: &[E],
    codebook: &[E],
) -> Result<TopK<E>> {
    isa.check()?;
    check_nearest(shape, x, codebook, k)?;
    let SaeShape { batch, dm, latents } = shape;
    let sq_norms = |m: &[E], rows: usize| -> Vec<E::Acc> {
        (0..rows)
            .map(|r| {
                m[r * dm..(r + 1) * dm]
                    .iter()
                    .fold(E::Acc::ZERO, |s, v| s + v.to_acc() * v.to_acc())
            })
            .collect()
    };
    let inverse = |n: Vec<E::Acc>| -> Vec<E::Acc> {
        n.into_iter()
            .map(|s| {
                let norm = E::Acc::from_f64(s.to_f64().sqrt());
                if norm > E::Acc::ZERO {
                    E::Acc::ONE / norm
                } else {
                    E::Acc::ZERO
                }
            })
            .collect()
    };
    let mut enc = Encoder::<E, E> {
        x,
        rows: batch,
        dm,
        offset: None,
        row_scale: None,
        w: codebook,
        latents,
        scale: None,
        shift: None,
    };
    let collect = Collect::TopK { k, relu: false };
    match metric {
        Metric::Dot => Ok(dense_topk::<E>(&enc.run(isa, collect), batch, k, |v| v)),
        Metric::Cosine => {
            let row_scale = inverse(sq_norms(x, batch));
            let scale = inverse(sq_norms(codebook, latents));
            enc.row_scale = Some(&row_scale);
            enc.scale = Some(&scale);
            Ok(dense_topk::<E>(&enc.run(isa, collect), batch, k, |v| v))
        }
        Metric::L2 => {
            // ranking by 2x·c − |c|² is ranking by −|x − c|²
            let x_norms = sq_norms(x, batch);
            let two = vec![E::Acc::from_f64(2.0); latents];
            let shift: Vec<E::Acc> = sq_norms(codebook, latents)
                .into_iter()
                .map(|n| E::Acc::ZERO - n)
                .collect();
            enc.scale = Some(&two);
            enc.shift = Some(&shift);
            let picked = enc.run(isa, collect);
            let mut scores = vec![E::default(); batch * k];
            let mut indices = vec![0i32; batch * k];
            for (b, row) in picked.iter().enumerate() {
                for (j, &(s, i)) in row.iter().take(k).enumerate() {
                    let d = x_norms[b] - s;
                    let d = if d < E::Acc::ZERO { E::Acc::ZERO } else { d };
                    scores[b * k + j] = E::from_acc(d);
                    indices[b * k + j] = i as i32;
                }
            }
            Ok(TopK {
                values: scores,
                indices,
            })
        }
    }
}

/// The inputs of `codebook.nearest` checked.
fn check_nearest<E: Element>(shape: SaeShape, x: &[E], codebook: &[E], k: usize) -> Result<()> {
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    check_len("x", x.len(), bx, &format!("[{batch}, {dm}]"))?;
    check_len(
        "codebook",
        codebook.len(),
        lw,
        &format!("[{latents}, {dm}]"),
    )?;
    check_k("k", k, latents, "the number of codebook rows L")?;
    out_len(shape, k, "values")?;
    check_rows_backed(shape, 1, 0)
}
