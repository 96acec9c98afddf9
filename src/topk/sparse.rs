//! The sparse side of a top-k SAE: `sae.decode` (a gather-and-sum over the selected rows of
//! w_dec) and `sae.backward` (gradients through the selected latents only).
//!
//! Decode is bound by reading w_dec. With few selections per latent (B·k < 2L) it gathers:
//! one task per block of rows; each output row accumulates in register-sized chunks of Dm,
//! reading its k selected rows side by side, so k gathers are in flight at once. With more,
//! and a w_dec larger than the last-level cache, a gather would read each selected row of
//! w_dec from DRAM about B·k/L times; decode
//! then goes in latent order instead (`decode_by_latent`): w_dec streams past once while the
//! outputs, in column slices that fit the cache, take each latent's contributions.
//!
//! Backward, deterministically: the per-(b, j) coefficients first (parallel over rows);
//! then the sparse row updates of dw_dec and dw_enc grouped by latent — a counting sort of
//! the B·k selections by latent, each latent's contributions summed in (b, j) order by the
//! one task that owns the latent — instead of racing atomics; dx parallel over rows; db_dec
//! as fixed-order column sums.

use crate::cpu::{Isa, Simd, SimdKernel, dispatch, last_level_cache_bytes, prefetch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_backed, check_len};
use rayon::prelude::*;

use super::SaeShape;

/// Every index in 0..latents, or an `Err` naming `indices`.
fn check_indices(indices: &[i32], latents: usize) -> Result<()> {
    match indices.iter().position(|&i| i < 0 || i as usize >= latents) {
        None => Ok(()),
        Some(p) => Err(Error::invalid(
            "indices",
            format!(
                "entry {p} is {}, outside 0..{latents} (the latents of the dictionary)",
                indices[p]
            ),
        )),
    }
}

/// The lengths of the common inputs of decode and backward (host slices or device views):
/// `indices`, `values [B, k]`, `w_dec [L, Dm]`, `[b_dec [Dm]]`.
pub(super) fn check_sparse_lengths(
    shape: SaeShape,
    k: usize,
    indices: usize,
    values: usize,
    w_dec: usize,
    b_dec: Option<usize>,
) -> Result<()> {
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    let bk = batch
        .checked_mul(k)
        .ok_or_else(|| Error::overflow("indices", "B·k overflows"))?;
    check_len("indices", indices, bk, &format!("[{batch}, {k}]"))?;
    check_len("values", values, bk, &format!("[{batch}, {k}]"))?;
    check_len("w_dec", w_dec, lw, &format!("[{latents}, {dm}]"))?;
    if let Some(b) = b_dec {
        check_len("b_dec", b, dm, &format!("[{dm}]"))?;
    }
    if bk == 0 {
        // rule 3 of crate::error: with k = 0, no input carries B of the [B, Dm] output
        check_backed(
            "values",
            "B (k = 0)",
            bx,
            w_dec.saturating_add(b_dec.unwrap_or(0)),
        )?;
    }
    Ok(())
}

/// [`check_sparse_lengths`] of host slices, and every index in 0..L.
pub(super) fn check_sparse<E: Element>(
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    values: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<()> {
    check_sparse_lengths(
        shape,
        k,
        indices.len(),
        values.len(),
        w_dec.len(),
        b_dec.map(<[E]>::len),
    )?;
    check_indices(indices, shape.latents)
}

/// `sae.decode`: x_hat\[b\] = Σ_j values\[b, j\]·w_dec\[indices\[b, j\]\] + b_dec (repeated indices
/// add up); returns `x_hat [B, Dm]`. `k` is the width of `indices`/`values`.
pub fn decode<E: Element>(
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    values: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<Vec<E>> {
    E::topk_decode(Isa::active(), shape, k, indices, values, w_dec, b_dec)
}

/// [`decode`] on a chosen ISA.
#[doc(hidden)]
pub fn decode_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    values: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<Vec<E>> {
    E::topk_decode(isa, shape, k, indices, values, w_dec, b_dec)
}

/// The CPU decode, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn decode_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    values: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<Vec<E>> {
    isa.check()?;
    check_sparse(shape, k, indices, values, w_dec, b_dec)?;
    let dm = shape.dm;
    if shape.batch * dm == 0 {
        return Ok(Vec::new());
    }
    let coef: Vec<E::Acc> = values.iter().map(|v| v.to_acc()).collect();
    let bias: Option<Vec<E::Acc>> = b_dec.map(|b| b.iter().map(|v| v.to_acc()).collect());
    if in_latent_order(
        indices.len(),
        shape.latents,
        size_of_val(w_dec),
        last_level_cache_bytes(),
    ) {
        let inputs = DecodeInputs {
            k,
            indices,
            coef: &coef,
            w_dec,
            bias: bias.as_deref(),
        };
        let mut out = vec![E::default(); shape.batch * dm];
        decode_by_latent(isa, shape, inputs, BY_LATENT_TASK_BYTES, &mut out);
        return Ok(out);
    }
    // Every element is written by the gather, so the output starts uninitialized (zeroing
    // 12 MiB first cost ~10% of the call at the bench size).
    let mut out: Vec<E> = Vec::with_capacity(shape.batch * dm);
    let rows_per_task = 16;
    out.spare_capacity_mut()[..shape.batch * dm]
        .par_chunks_mut(rows_per_task * dm)
        .enumerate()
        .for_each(|(t, block)| {
            let b0 = t * rows_per_task;
            let n = block.len() / dm;
            dispatch(
                isa,
                Gather {
                    dm,
                    rows: &indices[b0 * k..(b0 + n) * k],
                    coef: &coef[b0 * k..(b0 + n) * k],
                    matrix: w_dec,
                    bias: bias.as_deref(),
                    out: block,
                },
            )
        });
    // SAFETY: the gather wrote all batch·dm elements (every column block of every row).
    unsafe { out.set_len(shape.batch * dm) };
    Ok(out)
}

/// Whether decode walks w_dec in latent order ([`decode_by_latent`]) rather than gathering:
/// where the B·k `selections` number at least `BY_LATENT_MIN_REUSE` times the `latents` (each
/// selected row of w_dec is then read once for two or more selections) and w_dec does not fit
/// in half the last-level cache (unknown: assumed not to). Latent order saves DRAM reads at the
/// price of read-modify-writes of cache-resident outputs; where w_dec stays in the cache the
/// gather reads it from there and is faster (bench size, B·k = 4L, 100 MB w_dec: AMD EPYC VM,
/// 32 MiB L3, latent order 1–12% faster; Xeon VM, 480 MiB L3, gather 11.4 against 16.5 ms).
fn in_latent_order(
    selections: usize,
    latents: usize,
    w_dec_bytes: usize,
    llc: Option<usize>,
) -> bool {
    selections >= BY_LATENT_MIN_REUSE * latents && llc.is_none_or(|c| w_dec_bytes > c / 2)
}

/// See [`in_latent_order`]. (At one selection per latent the two orders measured the same; at
/// four, the bench size, latent order took 1–25% less time on the AMD VM: benches/RESULTS.md.)
const BY_LATENT_MIN_REUSE: usize = 2;

/// The accumulators of one latent-order task ([rows, slice width]) are kept under this many
/// bytes, so that they stay in the last-level cache while w_dec streams past them.
const BY_LATENT_TASK_BYTES: usize = 4 << 20;

/// The narrowest column slice of a latent-order task, in elements (a cache line of f32).
const BY_LATENT_MIN_WIDTH: usize = 16;

/// The inputs of decode, widened: `coef` is `values` in the accumulator type.
#[derive(Clone, Copy)]
struct DecodeInputs<'a, E: Element> {
    k: usize,
    indices: &'a [i32],
    coef: &'a [E::Acc],
    w_dec: &'a [E],
    bias: Option<&'a [E::Acc]>,
}

/// Decode in latent order: the selections of a group of rows sorted by latent (a counting
/// sort), then each task owns a column slice of the group's outputs, accumulated in a
/// cache-resident buffer, and walks w_dec once, adding each latent's row slice into the rows
/// that selected it. With B·k ≥ L a gather reads each w_dec row about B·k/L times from DRAM;
/// this reads it once (B·k = 4L at the bench size: ~4× fewer DRAM bytes), and the
/// read-modify-writes of the outputs hit the cache.
///
/// Each output sums the bias, then its selections in ascending latent order (a latent chosen
/// twice: in k order), whatever the number of threads, slices or groups. `task_bytes` bounds
/// a task's accumulators ([`BY_LATENT_TASK_BYTES`]; tests pass less to force many groups).
fn decode_by_latent<E: Element>(
    isa: Isa,
    shape: SaeShape,
    inputs: DecodeInputs<'_, E>,
    task_bytes: usize,
    out: &mut [E],
) {
    let SaeShape { batch, dm, latents } = shape;
    let k = inputs.k;
    let acc_bytes = size_of::<E::Acc>();
    let min_width = BY_LATENT_MIN_WIDTH.min(dm);
    let group_rows = (task_bytes / (min_width * acc_bytes)).clamp(1, batch);
    let threads = rayon::current_num_threads();
    for g0 in (0..batch).step_by(group_rows) {
        let rows = group_rows.min(batch - g0);
        let picks = g0 * k..(g0 + rows) * k;
        let (start, by_latent) = group_by_latent(&inputs.indices[picks.clone()], latents);
        let present: Vec<u32> = (0..latents as u32)
            .filter(|&l| start[l as usize] < start[l as usize + 1])
            .collect();
        // the group's selections in latent order: (row in the group, coefficient)
        let coef = &inputs.coef[picks];
        let sorted: Vec<(u32, E::Acc)> = by_latent
            .iter()
            .map(|&flat| ((flat / k) as u32, coef[flat]))
            .collect();
        // as many slices as keep a task's accumulators under the budget, rounded up to a
        // multiple of the thread count (equal shares), each a whole number of cache lines wide
        let by_cache = (rows * dm * acc_bytes).div_ceil(task_bytes);
        let slices = by_cache
            .next_multiple_of(threads)
            .min(dm.div_ceil(min_width));
        let width = dm.div_ceil(slices).next_multiple_of(min_width).min(dm);
        let slices = dm.div_ceil(width);
        let sums: Vec<Vec<E::Acc>> = (0..slices)
            .into_par_iter()
            .map(|s| {
                let cols = s * width..((s + 1) * width).min(dm);
                let mut acc = vec![E::Acc::ZERO; rows * cols.len()];
                if let Some(bias) = inputs.bias {
                    for row in acc.chunks_exact_mut(cols.len()) {
                        row.copy_from_slice(&bias[cols.clone()]);
                    }
                }
                dispatch(
                    isa,
                    LatentSlice {
                        present: &present,
                        start: &start,
                        sorted: &sorted,
                        w_dec: inputs.w_dec,
                        dm,
                        cols,
                        acc: &mut acc,
                    },
                );
                acc
            })
            .collect();
        out[g0 * dm..(g0 + rows) * dm]
            .par_chunks_mut(dm)
            .enumerate()
            .for_each(|(r, dst)| {
                for (s, sum) in sums.iter().enumerate() {
                    let w = sum.len() / rows;
                    let src = &sum[r * w..(r + 1) * w];
                    for (o, &a) in dst[s * width..s * width + w].iter_mut().zip(src) {
                        *o = E::from_acc(a);
                    }
                }
            });
    }
}

/// One latent-order task: acc[row] += coef·w_dec[latent, cols] for every selection, walking
/// the selected latents in order. w_dec's slices are prefetched a few selected latents ahead
/// (the only DRAM stream), the accumulator rows a few selections ahead (random rows, in
/// cache).
struct LatentSlice<'a, E: Element> {
    /// The latents selected at least once, ascending.
    present: &'a [u32],
    start: &'a [usize],
    sorted: &'a [(u32, E::Acc)],
    w_dec: &'a [E],
    dm: usize,
    cols: std::ops::Range<usize>,
    acc: &'a mut [E::Acc],
}

/// How far ahead [`LatentSlice`] prefetches: latents of w_dec, and selections' accumulators.
const LATENT_PREFETCH: usize = 4;
const PICK_PREFETCH: usize = 2;

impl<E: Element> SimdKernel for LatentSlice<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let width = self.cols.len();
        let w_base = self.w_dec.as_ptr();
        let acc_base = self.acc.as_mut_ptr();
        for (i, &l) in self.present.iter().enumerate() {
            if let Some(&ahead) = self.present.get(i + LATENT_PREFETCH) {
                prefetch(
                    w_base.wrapping_add(ahead as usize * self.dm + self.cols.start),
                    width,
                );
            }
            let l = l as usize;
            let (first, last) = (self.start[l], self.start[l + 1]);
            let src = &self.w_dec[l * self.dm + self.cols.start..l * self.dm + self.cols.end];
            for p in first..last {
                if let Some(&(row, _)) = self.sorted.get(p + PICK_PREFETCH) {
                    prefetch(acc_base.wrapping_add(row as usize * width), width);
                }
                let (row, c) = self.sorted[p];
                let dst = &mut self.acc[row as usize * width..(row as usize + 1) * width];
                // SAFETY: axpy reads and writes within both slices.
                unsafe { axpy::<S, E>(c, src, dst) };
            }
        }
    }
}

/// out[b] = Σ_j coef[b, j]·matrix[rows[b, j]] (+ bias), for a block of output rows.
///
/// Column block by column block (256 bytes of f32, kept in registers) over all k gathered rows, so
/// the k rows are read side by side: k independent streams in flight instead of one row at
/// a time. No software prefetch: on the Xeon VM, prefetching the next row's blocks made the
/// gather ~10% slower (the hardware prefetchers follow each row's pieces on their own).
/// `out` may start uninitialized; every element of it is written.
struct Gather<'a, E: Element> {
    dm: usize,
    rows: &'a [i32],
    coef: &'a [E::Acc],
    matrix: &'a [E],
    bias: Option<&'a [E::Acc]>,
    out: &'a mut [std::mem::MaybeUninit<E>],
}

/// Vectors per column block of [`Gather`] (at most): 8 of 256 bits, and 4 of 512 bits, so a
/// block reads 256 bytes of each f32 row either way. On the Xeon VM (B4096 D768 L32768 k32,
/// alternating driver runs, same checksum) AVX-512 gathered 3–6% faster with 4 than with 8;
/// 2, 16 and 24 were slower.
const GATHER_VECTORS: usize = 8;

impl<E: Element> SimdKernel for Gather<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let dm = self.dm;
        let n = self.out.len() / dm;
        let k = self.rows.len() / n.max(1);
        let lanes = E::Acc::lanes::<S>();
        let vectors = if S::WIDE_TILES {
            GATHER_VECTORS / 2
        } else {
            GATHER_VECTORS
        };
        let block = vectors * lanes;
        let base = self.matrix.as_ptr();
        for b in 0..n {
            let picks = &self.rows[b * k..(b + 1) * k];
            let coefs = &self.coef[b * k..(b + 1) * k];
            let dst = &mut self.out[b * dm..(b + 1) * dm];
            let mut col = 0;
            while col < dm {
                let width = (dm - col).min(block);
                if width == block {
                    // SAFETY: every row index was checked < L, and col + block <= dm.
                    unsafe {
                        let mut full = [E::Acc::vsplat::<S>(E::Acc::ZERO); GATHER_VECTORS];
                        let acc = &mut full[..vectors];
                        if let Some(bias) = self.bias {
                            for (v, a) in acc.iter_mut().enumerate() {
                                *a = E::Acc::vload::<S>(bias.as_ptr().add(col + v * lanes));
                            }
                        }
                        for (&r, &c) in picks.iter().zip(coefs) {
                            let src = base.add(r as usize * dm + col);
                            let cv = E::Acc::vsplat::<S>(c);
                            for (v, a) in acc.iter_mut().enumerate() {
                                *a = E::Acc::vfma::<S>(cv, E::vload::<S>(src.add(v * lanes)), *a);
                            }
                        }
                        let dst = dst.as_mut_ptr().cast::<E>();
                        for (v, a) in acc.iter().enumerate() {
                            E::vstore::<S>(dst.add(col + v * lanes), *a);
                        }
                    }
                } else {
                    for (i, o) in dst[col..col + width].iter_mut().enumerate() {
                        let mut acc = self.bias.map_or(E::Acc::ZERO, |bias| bias[col + i]);
                        for (&r, &c) in picks.iter().zip(coefs) {
                            acc = acc + c * self.matrix[r as usize * dm + col + i].to_acc();
                        }
                        o.write(E::from_acc(acc));
                    }
                }
                col += width;
            }
        }
    }
}

/// acc += c·src (src widened to the accumulator).
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`).
#[inline(always)]
unsafe fn axpy<S: Simd, E: Element>(c: E::Acc, src: &[E], acc: &mut [E::Acc]) {
    let lanes = E::Acc::lanes::<S>();
    let n = src.len().min(acc.len());
    let mut d = 0;
    // SAFETY: d + lanes <= n <= both lengths, pointers from the whole slices; the ISA per
    // this fn's contract.
    unsafe {
        let cv = E::Acc::vsplat::<S>(c);
        while d + lanes <= n {
            let a = E::Acc::vload::<S>(acc.as_ptr().add(d));
            let x = E::vload::<S>(src.as_ptr().add(d));
            E::Acc::vstore::<S>(acc.as_mut_ptr().add(d), E::Acc::vfma::<S>(cv, x, a));
            d += lanes;
        }
    }
    for i in d..n {
        acc[i] = acc[i] + c * src[i].to_acc();
    }
}

/// dot(a, b) in the accumulator type, in a fixed order (lane-wise, then lanes in order).
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`).
#[inline(always)]
unsafe fn dot<S: Simd, E: Element>(a: &[E], b: &[E]) -> E::Acc {
    let lanes = E::Acc::lanes::<S>();
    let n = a.len().min(b.len());
    let mut d = 0;
    let mut total = E::Acc::ZERO;
    // SAFETY: d + lanes <= n <= both lengths, pointers from the whole slices; `buf` holds
    // 64 >= lanes values; the ISA per this fn's contract.
    unsafe {
        let mut acc = E::Acc::vsplat::<S>(E::Acc::ZERO);
        while d + lanes <= n {
            acc = E::Acc::vfma::<S>(
                E::vload::<S>(a.as_ptr().add(d)),
                E::vload::<S>(b.as_ptr().add(d)),
                acc,
            );
            d += lanes;
        }
        let mut buf = [E::Acc::ZERO; 64];
        E::Acc::vstore::<S>(buf.as_mut_ptr(), acc);
        for v in &buf[..lanes] {
            total = total + *v;
        }
    }
    for i in d..n {
        total = total + a[i].to_acc() * b[i].to_acc();
    }
    total
}

/// The gradients of `sae.backward`, each with the shape of its parameter.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SaeGrads<E> {
    /// `[L, Dm]`: the gradient of `w_dec`.
    pub dw_dec: Vec<E>,
    /// `[Dm]`: the gradient of `b_dec` (at b_dec = 0 when it was not given).
    pub db_dec: Vec<E>,
    /// `[L, Dm]`: the gradient of `w_enc`.
    pub dw_enc: Vec<E>,
    /// `[L]`: the gradient of `b_enc`.
    pub db_enc: Vec<E>,
    /// `[B, Dm]`: the gradient of `x`.
    pub dx: Vec<E>,
}

/// The inputs of `sae.backward`: the encoder's (`x`, `w_enc`, `b_enc`, `b_dec`), the
/// decoder's `w_dec`, the selection (`indices`, `values [B, k]`) and `d_xhat [B, Dm]`.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a, E> {
    /// `[B, Dm]`: the encoded rows.
    pub x: &'a [E],
    /// `[L, Dm]`: the encoder weights.
    pub w_enc: &'a [E],
    /// `[L]`: the encoder bias (its length is checked; its gradient does not depend on it).
    pub b_enc: &'a [E],
    /// `[Dm]`: the decoder bias, subtracted from x by the encoder (`None` = zeros).
    pub b_dec: Option<&'a [E]>,
    /// `[L, Dm]`: the decoder weights.
    pub w_dec: &'a [E],
    /// `[B, k]`: the selected latents, each in 0..L.
    pub indices: &'a [i32],
    /// `[B, k]`: the selected values (after ReLU); an entry <= 0 passes no gradient to the encoder.
    pub values: &'a [E],
    /// `[B, Dm]`: the gradient of the loss with respect to the reconstruction x_hat.
    pub d_xhat: &'a [E],
}

/// `sae.backward`: gradients of sum(x_hat·d_xhat) where x_hat = decode(indices, values) and
/// the values come from the encoder, v[b, j] = ReLU(pre[b, indices[b, j]]) with the ReLU's
/// mask read from the given values (values > 0). With dpre\[b, j\] = (d_xhat\[b\]·w_dec\[idx\])·
/// `[v > 0]`: dw_dec\[l\] = Σ v·d_xhat\[b\], db_enc\[l\] = Σ dpre, dw_enc\[l\] = Σ dpre·(x\[b\] − b_dec),
/// dx\[b\] = Σ_j dpre·w_enc\[idx\], db_dec = Σ_b d_xhat\[b\] − Σ_b dx\[b\] (always returned; without
/// `b_dec` it is the gradient at b_dec = 0). Latents never selected get zero rows.
pub fn backward<E: Element>(
    shape: SaeShape,
    k: usize,
    inputs: &BackwardInputs<'_, E>,
) -> Result<SaeGrads<E>> {
    E::topk_backward(Isa::active(), shape, k, inputs)
}

/// [`backward`] on a chosen ISA.
#[doc(hidden)]
pub fn backward_on<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &BackwardInputs<'_, E>,
) -> Result<SaeGrads<E>> {
    E::topk_backward(isa, shape, k, inputs)
}

/// The CPU backward, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn backward_impl<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    inputs: &BackwardInputs<'_, E>,
) -> Result<SaeGrads<E>> {
    isa.check()?;
    let BackwardInputs {
        x,
        w_enc,
        b_enc: _,
        b_dec,
        w_dec,
        indices,
        values,
        d_xhat,
    } = *inputs;
    check_backward(shape, k, inputs)?;
    let (_, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    let zero = E::Acc::ZERO;

    // dpre[b, j], parallel over rows
    let mut dpre = vec![zero; batch * k];
    if k > 0 {
        dpre.par_chunks_mut(k).enumerate().for_each(|(b, row)| {
            let g = &d_xhat[b * dm..(b + 1) * dm];
            for (j, out) in row.iter_mut().enumerate() {
                if values[b * k + j].to_acc() > zero {
                    let l = indices[b * k + j] as usize;
                    *out = dispatch(isa, Dot(g, &w_dec[l * dm..(l + 1) * dm]));
                }
            }
        });
    }

    let (start, by_latent) = group_by_latent(indices, latents);

    let centered: Option<Vec<E::Acc>> = b_dec.map(|b| b.iter().map(|v| v.to_acc()).collect());
    let mut dw_dec = vec![E::default(); lw];
    let mut dw_enc = vec![E::default(); lw];
    let mut db_enc = vec![E::default(); latents];
    if dm > 0 {
        dw_dec
            .par_chunks_mut(dm)
            .zip(dw_enc.par_chunks_mut(dm))
            .zip(db_enc.par_iter_mut())
            .enumerate()
            .with_min_len(64)
            .for_each_init(
                || (vec![zero; dm], vec![zero; dm]),
                |(acc_dec, acc_enc), (l, ((dwd, dwe), dbe))| {
                    let picks = &by_latent[start[l]..start[l + 1]];
                    if picks.is_empty() {
                        return;
                    }
                    acc_dec.fill(zero);
                    acc_enc.fill(zero);
                    let mut bias = zero;
                    for &flat in picks {
                        let b = flat / k;
                        let dp = dpre[flat];
                        bias = bias + dp;
                        let rows = b * dm..(b + 1) * dm;
                        dispatch(
                            isa,
                            Axpy(values[flat].to_acc(), &d_xhat[rows.clone()], acc_dec),
                        );
                        dispatch(isa, Axpy(dp, &x[rows], acc_enc));
                    }
                    // Σ dp·(x − b_dec) = Σ dp·x − (Σ dp)·b_dec
                    let offset = centered.as_deref();
                    for d in 0..dm {
                        dwd[d] = E::from_acc(acc_dec[d]);
                        let enc = match offset {
                            Some(c) => acc_enc[d] - bias * c[d],
                            None => acc_enc[d],
                        };
                        dwe[d] = E::from_acc(enc);
                    }
                    *dbe = E::from_acc(bias);
                },
            );
    } else {
        for (l, dbe) in db_enc.iter_mut().enumerate() {
            let sum = by_latent[start[l]..start[l + 1]]
                .iter()
                .fold(zero, |s, &f| s + dpre[f]);
            *dbe = E::from_acc(sum);
        }
    }

    let dx_acc = gather_rows(isa, shape, k, indices, &dpre, w_enc);

    // db_dec = Σ_b (d_xhat[b] − dx[b]), column by column in row order
    let db_dec: Vec<E> = (0..dm)
        .into_par_iter()
        .map(|d| {
            let mut s = zero;
            for b in 0..batch {
                s = s + (d_xhat[b * dm + d].to_acc() - dx_acc[b * dm + d]);
            }
            E::from_acc(s)
        })
        .collect();
    Ok(SaeGrads {
        dw_dec,
        db_dec,
        dw_enc,
        db_enc,
        dx: dx_acc.into_iter().map(E::from_acc).collect(),
    })
}

/// out[b] = Σ_j coef[b, j]·w[indices[b, j]] (`[B, Dm]`, accumulator type), parallel over
/// rows, the j in order; a zero coefficient adds nothing. Indices must lie in 0..L.
pub(crate) fn gather_rows<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    coef: &[E::Acc],
    w: &[E],
) -> Vec<E::Acc> {
    let (batch, dm) = (shape.batch, shape.dm);
    let zero = E::Acc::ZERO;
    let mut out = vec![zero; batch * dm];
    if dm > 0 {
        out.par_chunks_mut(dm).enumerate().for_each(|(b, acc)| {
            for j in 0..k {
                let c = coef[b * k + j];
                if c != zero {
                    let l = indices[b * k + j] as usize;
                    dispatch(isa, Axpy(c, &w[l * dm..(l + 1) * dm], acc));
                }
            }
        });
    }
    out
}

/// The transpose of [`gather_rows`]: per latent l, `out[l] = Σ coef[b, j]·rows[b]` over the
/// selections of l in row order (`[L, Dm]`, rounded to E), and `sums[l] = Σ coef[b, j]`
/// (accumulator type); parallel over latents, so the result does not depend on the thread
/// count. Indices must lie in 0..L.
#[cfg(feature = "candle")]
pub(crate) fn scatter_rows<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    coef: &[E::Acc],
    rows: &[E],
) -> (Vec<E>, Vec<E::Acc>) {
    let SaeShape { dm, latents, .. } = shape;
    let zero = E::Acc::ZERO;
    let (start, by_latent) = group_by_latent(indices, latents);
    let mut out = vec![E::default(); latents * dm];
    let mut sums = vec![zero; latents];
    let sum_of = |picks: &[usize]| picks.iter().fold(zero, |s, &f| s + coef[f]);
    if dm == 0 {
        for (l, sum) in sums.iter_mut().enumerate() {
            *sum = sum_of(&by_latent[start[l]..start[l + 1]]);
        }
        return (out, sums);
    }
    out.par_chunks_mut(dm)
        .zip(sums.par_iter_mut())
        .enumerate()
        .with_min_len(64)
        .for_each_init(
            || vec![zero; dm],
            |acc, (l, (row, sum))| {
                let picks = &by_latent[start[l]..start[l + 1]];
                if picks.is_empty() {
                    return;
                }
                acc.fill(zero);
                for &flat in picks {
                    let b = flat / k;
                    dispatch(isa, Axpy(coef[flat], &rows[b * dm..(b + 1) * dm], acc));
                }
                for (o, a) in row.iter_mut().zip(acc.iter()) {
                    *o = E::from_acc(*a);
                }
                *sum = sum_of(picks);
            },
        );
    (out, sums)
}

/// d[b, j] = g[b]·w[indices[b, j]] for every selection (`[B, k]`, accumulator type),
/// parallel over rows. Indices must lie in 0..L.
#[cfg(feature = "candle")]
pub(crate) fn selected_dots<E: Element>(
    isa: Isa,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    g: &[E],
    w: &[E],
) -> Vec<E::Acc> {
    let dm = shape.dm;
    let mut out = vec![E::Acc::ZERO; shape.batch * k];
    if k > 0 {
        out.par_chunks_mut(k).enumerate().for_each(|(b, row)| {
            let gb = &g[b * dm..(b + 1) * dm];
            for (j, o) in row.iter_mut().enumerate() {
                let l = indices[b * k + j] as usize;
                *o = dispatch(isa, Dot(gb, &w[l * dm..(l + 1) * dm]));
            }
        });
    }
    out
}

/// Every input of `sae.backward` checked: lengths, and every index in 0..L.
pub(super) fn check_backward<E: Element>(
    shape: SaeShape,
    k: usize,
    inputs: &BackwardInputs<'_, E>,
) -> Result<()> {
    let i = inputs;
    check_sparse(shape, k, i.indices, i.values, i.w_dec, i.b_dec)?;
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    check_len("x", i.x.len(), bx, &format!("[{batch}, {dm}]"))?;
    check_len("w_enc", i.w_enc.len(), lw, &format!("[{latents}, {dm}]"))?;
    check_len("b_enc", i.b_enc.len(), latents, &format!("[{latents}]"))?;
    check_len("d_xhat", i.d_xhat.len(), bx, &format!("[{batch}, {dm}]"))?;
    if bx == 0 && lw == 0 {
        // rule 3 of crate::error: x and the weights are empty, so only b_dec carries the Dm
        // of db_dec [Dm]
        check_backed("x", "Dm (B = L = 0)", dm, i.b_dec.map_or(0, <[E]>::len))?;
    }
    Ok(())
}

/// The selections grouped by latent (a counting sort): latent l's flat positions b·k + j
/// are `by_latent[start[l]..start[l + 1]]`, ascending. Indices must lie in 0..latents.
pub(super) fn group_by_latent(indices: &[i32], latents: usize) -> (Vec<usize>, Vec<usize>) {
    let mut start = vec![0usize; latents + 1];
    for &l in indices {
        start[l as usize + 1] += 1;
    }
    for l in 0..latents {
        start[l + 1] += start[l];
    }
    let mut fill = start.clone();
    let mut by_latent = vec![0usize; indices.len()];
    for (flat, &l) in indices.iter().enumerate() {
        by_latent[fill[l as usize]] = flat;
        fill[l as usize] += 1;
    }
    (start, by_latent)
}

struct Dot<'a, E>(&'a [E], &'a [E]);
impl<E: Element> SimdKernel for Dot<'_, E> {
    type Output = E::Acc;
    #[inline(always)]
    fn run<S: Simd>(self) -> E::Acc {
        // SAFETY: dot reads within both slices.
        unsafe { dot::<S, E>(self.0, self.1) }
    }
}

struct Axpy<'a, E: Element>(E::Acc, &'a [E], &'a mut [E::Acc]);
impl<E: Element> SimdKernel for Axpy<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // SAFETY: axpy reads and writes within both slices.
        unsafe { axpy::<S, E>(self.0, self.1, self.2) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_order_only_with_reuse_and_a_dictionary_larger_than_the_cache() {
        let mib = 1 << 20;
        // B·k = 4L, 100 MB w_dec: latent order under a 32 MiB cache or an unknown one
        assert!(in_latent_order(
            4 * 32768,
            32768,
            100_000_000,
            Some(32 * mib)
        ));
        assert!(in_latent_order(4 * 32768, 32768, 100_000_000, None));
        // the same dictionary resident in a 480 MiB cache: gather
        assert!(!in_latent_order(
            4 * 32768,
            32768,
            100_000_000,
            Some(480 * mib)
        ));
        // less than two selections per latent: gather whatever the cache
        assert!(!in_latent_order(32768, 32768, 100_000_000, Some(mib)));
        assert!(!in_latent_order(32768, 32768, 100_000_000, None));
    }

    /// Decode in latent order equals the float64 formula, and gives the same bits whatever
    /// the split into row groups and column slices (the sum order does not depend on it).
    #[test]
    fn latent_order_decode_is_exact_and_independent_of_the_split() {
        let (batch, dm, latents, k) = (37, 100, 23, 5);
        let shape = SaeShape::new(batch, dm, latents);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as usize
        };
        let indices: Vec<i32> = (0..batch * k).map(|_| (next() % latents) as i32).collect();
        let coef: Vec<f32> = (0..batch * k)
            .map(|_| (next() % 1000) as f32 / 500.0)
            .collect();
        let w_dec: Vec<f32> = (0..latents * dm)
            .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        let bias: Vec<f32> = (0..dm).map(|c| c as f32 * 0.01 - 0.3).collect();
        let inputs = DecodeInputs {
            k,
            indices: &indices,
            coef: &coef,
            w_dec: &w_dec,
            bias: Some(&bias),
        };
        for isa in Isa::available() {
            let mut whole = vec![0.0f32; batch * dm];
            decode_by_latent(isa, shape, inputs, BY_LATENT_TASK_BYTES, &mut whole);
            for r in 0..batch {
                for c in 0..dm {
                    let want = bias[c] as f64
                        + (0..k)
                            .map(|j| {
                                coef[r * k + j] as f64
                                    * w_dec[indices[r * k + j] as usize * dm + c] as f64
                            })
                            .sum::<f64>();
                    let got = whole[r * dm + c] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{isa:?} [{r}, {c}]"
                    );
                }
            }
            // 256 bytes: groups of 4 rows, slices of 16 columns (the last 4 wide)
            for task_bytes in [256, 1000, 6400] {
                let mut split = vec![0.0f32; batch * dm];
                decode_by_latent(isa, shape, inputs, task_bytes, &mut split);
                assert_eq!(split, whole, "{isa:?} task_bytes {task_bytes}");
            }
        }
    }
}
