//! The sparse top-k family on the GPU (feature `cuda`), in f32, f16 and bf16:
//! - `topk.rows`, `sae.decode` (kernels/topk.cu), device-level and host conveniences;
//! - `sae.encode` (device-level and host), `codebook.nearest`, `sae.encode_mp`,
//!   `sae.encode_jumprelu` and `sae.encode_batch_topk` (host conveniences) on one fused
//!   encoder (kernels/sae.cu: SIMT tiles for f32, wmma tensor-core tiles for f16/bf16; the
//!   scores are filtered into per-row candidates in shared memory and never stored), k ≤
//!   256 where the kernel keeps a top-k;
//! - `sae.backward` (host convenience): the selections are grouped by latent on the host
//!   (one counting sort of the indices, which the host holds), so every per-latent sum
//!   runs in (b, j) order on the device: deterministic, no atomics.
//!
//! f64 answers `Err(Unsupported)`.
//!
//! Device-level entry points take device views and a stream (no host copies); the `_host`
//! conveniences upload, run and download on the device's default stream, with the CPU
//! path's input checks. The CSR encoders need host round trips by nature (the output size
//! is known only after a counting pass), so they are host conveniences only.

use super::sparse::{BackwardInputs, SaeGrads, check_backward, group_by_latent};
use super::{
    Csr, EncoderInputs, MatchingPursuit, Metric, SaeShape, at_or_above, batch_threshold,
    check_batch_topk, check_index_range, check_jumprelu, check_k, check_mp, check_nearest,
    csr_with, may_hide_winners,
};
use crate::cuda::config::{
    NK_SAE_DEPTH, NK_SAE_LATENTS, NK_SAE_MAX_K, NK_SAE_ROWS, NK_SAE_THREADS, NK_TOPK_MAX_K,
    NK_TOPK_THREADS,
};
use crate::cuda::{CudaElement, Device, grid_x, grid_yz, i32_dim, i64_dim, read_ptr, write_ptr};
use crate::element::{DType, Element};
use crate::error::{Error, Result, check_len};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

fn no_f64<E: CudaElement>(op: &str) -> Result<()> {
    if E::DTYPE == DType::F64 {
        return Err(Error::Unsupported(format!(
            "{op} on CUDA in f64 (f32, f16 and bf16 only)"
        )));
    }
    Ok(())
}

/// A dim or count of `tensor` as a kernel's `int` ([`i32_dim`]: at most
/// [`MAX_I32_EXTENT`](crate::cuda::MAX_I32_EXTENT)).
fn to_i32(tensor: &str, n: usize) -> Result<i32> {
    i32_dim(tensor, "a dim", n)
}

/// `n` blocks along grid x ([`grid_x`]: at most 2^31 − 1).
fn blocks(tensor: &str, n: usize) -> Result<u32> {
    grid_x(tensor, "its rows", n)
}

/// Dm within the kernels' `int` model dim (their loops over Dm step a block or a tile past
/// it), checked before anything is uploaded: `Err(Overflow)` naming `tensor`.
fn check_dm(tensor: &str, shape: SaeShape) -> Result<i32> {
    i32_dim(tensor, "Dm", shape.dm)
}

/// topk.rows' checks on the device path, before anything is uploaded, allocated or
/// launched: k in 1..=N and at most NK_TOPK_MAX_K, x of `x_len` = rows·N elements, N within
/// the kernel's `int` (it indexes the row; the i32 indices hold positions in it) and one
/// block per row within grid x. Returns (N, k, blocks).
fn check_rows<E: CudaElement>(
    shape: super::RowsShape,
    k: usize,
    x_len: usize,
) -> Result<(i32, i32, u32)> {
    no_f64::<E>("topk.rows")?;
    let super::RowsShape { rows, cols: n } = shape;
    check_k("k", k, n, "the row length N")?;
    check_index_range("x", n)?;
    if k > NK_TOPK_MAX_K as usize {
        return Err(Error::Unsupported(format!(
            "topk.rows on CUDA with k = {k} (at most {NK_TOPK_MAX_K})"
        )));
    }
    let total = rows
        .checked_mul(n)
        .ok_or_else(|| Error::overflow("x", format!("[{rows}, {n}] overflows")))?;
    check_len("x", x_len, total, &format!("[{rows}, {n}]"))?;
    // k ≤ N, so rows·k ≤ rows·N fits
    Ok((to_i32("x", n)?, to_i32("k", k)?, blocks("x", rows)?))
}

/// `topk.rows` on the device: `values [rows, k]`, `indices [rows, k]` from `x [rows, n]`,
/// the same order as the CPU (ties to the lower index, NaN first with `largest`, last
/// without). k ≤ 512.
#[allow(clippy::too_many_arguments)]
pub fn rows<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &super::RowsParams,
    shape: super::RowsShape,
    k: usize,
    x: &CudaView<'_, E>,
    values: &mut impl DevicePtrMut<E>,
    indices: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (nn, kk, grid) = check_rows::<E>(shape, k, x.len())?;
    let rows = shape.rows;
    check_len("values", values.len(), rows * k, &format!("[{rows}, {k}]"))?;
    check_len(
        "indices",
        indices.len(),
        rows * k,
        &format!("[{rows}, {k}]"),
    )?;
    if rows == 0 {
        return Ok(());
    }
    let f = device.function("topk", &format!("topk_rows_{}", E::SUFFIX))?;
    let largest = params.largest as i32;
    let (xp, _g1) = read_ptr(x, stream);
    let (vp, _g2) = write_ptr(values, stream);
    let (ip, _g3) = write_ptr(indices, stream);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (NK_TOPK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match topk_rows_* in kernels/topk.cu; x holds rows·n elements,
    // values and indices rows·k, k ≤ NK_TOPK_MAX_K fits the shared candidates.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&xp)
            .arg(&vp)
            .arg(&ip)
            .arg(&nn)
            .arg(&kk)
            .arg(&largest)
            .launch(cfg)?;
    }
    Ok(())
}

/// The device inputs of `sae.encode`.
pub struct EncoderViews<'a, 'b, E> {
    /// `[B, Dm]`: the rows to encode.
    pub x: &'a CudaView<'b, E>,
    /// `[L, Dm]`: the encoder weights, one row per latent.
    pub w_enc: &'a CudaView<'b, E>,
    /// `[L]`: the encoder bias.
    pub b_enc: &'a CudaView<'b, E>,
    /// `[Dm]`: the decoder bias, subtracted from x first (`None` = zeros).
    pub b_dec: Option<&'a CudaView<'b, E>>,
}

/// `sae.encode` on the device (see [`super::encode`]): `values [B, k]`, `indices [B, k]`.
/// k ≤ 256 (larger: `Err(Unsupported)`).
pub fn encode<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    shape: SaeShape,
    inputs: EncoderViews<'_, '_, E>,
    k: usize,
    values: &mut impl DevicePtrMut<E>,
    indices: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    device.check_stream(stream)?;
    no_f64::<E>("sae.encode")?;
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    check_len("x", inputs.x.len(), bx, &format!("[{batch}, {dm}]"))?;
    check_len(
        "w_enc",
        inputs.w_enc.len(),
        lw,
        &format!("[{latents}, {dm}]"),
    )?;
    check_len(
        "b_enc",
        inputs.b_enc.len(),
        latents,
        &format!("[{latents}]"),
    )?;
    if let Some(b) = inputs.b_dec {
        check_len("b_dec", b.len(), dm, &format!("[{dm}]"))?;
    }
    check_k("k", k, latents, "the number of latents L")?;
    check_select_k("sae.encode", k)?;
    check_device_latents("w_enc", latents)?;
    check_dm("x", shape)?;
    check_len(
        "values",
        values.len(),
        batch * k,
        &format!("[{batch}, {k}]"),
    )?;
    check_len(
        "indices",
        indices.len(),
        batch * k,
        &format!("[{batch}, {k}]"),
    )?;
    if batch == 0 {
        return Ok(());
    }
    let shift = to_f32(device, stream, inputs.b_enc)?;
    let offset = inputs
        .b_dec
        .map(|b| to_f32(device, stream, b))
        .transpose()?;
    let keys = {
        let (xp, _g1) = read_ptr(inputs.x, stream);
        let (wp, _g2) = read_ptr(inputs.w_enc, stream);
        let (sp, _g3) = read_ptr(&shift, stream);
        let offset = offset.as_ref().map(|o| read_ptr(o, stream));
        let epilogue = Epilogue {
            offset: offset.as_ref().map_or(0, |(p, _)| *p),
            shift: sp,
            ..Epilogue::default()
        };
        let run = Select::new::<E>(device, stream, shape, xp, wp, epilogue)?;
        run.top_k(k, true)?
    };
    keys_out::<E>(device, stream, &keys, batch, k, None, values, indices)
}

/// `sae.decode` on the device: `x_hat [B, Dm]`. The indices are not range-checked on the
/// device (the host convenience checks them); an out-of-range index is undefined behaviour
/// of the kernel, so callers of this entry point must pass indices in 0..L.
///
/// # Safety
/// Every entry of `indices` must lie in `0..shape.latents`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    shape: SaeShape,
    k: usize,
    indices: &CudaView<'_, i32>,
    values: &CudaView<'_, E>,
    w_dec: &CudaView<'_, E>,
    b_dec: Option<&CudaView<'_, E>>,
    x_hat: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    no_f64::<E>("sae.decode")?;
    super::sparse::check_sparse_lengths(
        shape,
        k,
        indices.len(),
        values.len(),
        w_dec.len(),
        b_dec.map(|b| b.len()),
    )?;
    check_dm("w_dec", shape)?;
    let (bx, _) = shape.sizes()?;
    let SaeShape { batch, dm, .. } = shape;
    check_len("x_hat", x_hat.len(), bx, &format!("[{batch}, {dm}]"))?;
    if bx == 0 {
        return Ok(());
    }
    let f = device.function("topk", &format!("sae_decode_{}", E::SUFFIX))?;
    let (kk, d) = (to_i32("indices", k)?, to_i32("w_dec", dm)?);
    let (ip, _g1) = read_ptr(indices, stream);
    let (vp, _g2) = read_ptr(values, stream);
    let (wp, _g3) = read_ptr(w_dec, stream);
    let b_dec = b_dec.map(|b| read_ptr(b, stream));
    let bp: u64 = b_dec.as_ref().map_or(0, |(p, _)| *p);
    let (op, _g5) = write_ptr(x_hat, stream);
    let cfg = LaunchConfig {
        grid_dim: (blocks("x_hat", batch)?, 1, 1),
        block_dim: (NK_TOPK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match sae_decode_* in kernels/topk.cu; lengths validated above and
    // the indices in range by this function's contract.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&ip)
            .arg(&vp)
            .arg(&wp)
            .arg(&bp)
            .arg(&op)
            .arg(&kk)
            .arg(&d)
            .launch(cfg)?;
    }
    Ok(())
}

/// Uploads a host slice (one zero element for an empty one: no empty device allocation).
fn upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    v: &[T],
) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        Ok(stream.alloc_zeros::<T>(1)?)
    } else {
        Ok(stream.clone_htod(v)?)
    }
}

/// [`rows`] with host slices, on the device's default stream.
pub fn rows_host<E: CudaElement>(
    device: &Device,
    params: &super::RowsParams,
    shape: super::RowsShape,
    k: usize,
    x: &[E],
) -> Result<super::TopK<E>> {
    check_rows::<E>(shape, k, x.len())?;
    let stream = device.stream();
    let out = shape.rows * k; // k ≤ N: rows·k ≤ rows·N = x.len() (check_rows)
    let xd = upload(stream, x)?;
    let mut v = stream.alloc_zeros::<E>(out.max(1))?;
    let mut i = stream.alloc_zeros::<i32>(out.max(1))?;
    self::rows(
        device,
        stream,
        params,
        shape,
        k,
        &xd.slice(0..x.len()),
        &mut v.slice_mut(0..out),
        &mut i.slice_mut(0..out),
    )?;
    let (mut values, mut indices) = (stream.clone_dtoh(&v)?, stream.clone_dtoh(&i)?);
    values.truncate(out);
    indices.truncate(out);
    Ok(super::TopK { values, indices })
}

/// [`encode`] with host slices, on the device's default stream.
pub fn encode_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    k: usize,
    inputs: &super::EncoderInputs<'_, E>,
) -> Result<super::TopK<E>> {
    // checked here too: the uploads below slice by these lengths, the outputs by B·k
    inputs.validate(shape)?;
    check_k("k", k, shape.latents, "the number of latents L")?;
    check_select_k("sae.encode", k)?;
    check_device_latents("w_enc", shape.latents)?;
    check_dm("x", shape)?;
    let stream = device.stream();
    let out = shape
        .batch
        .checked_mul(k)
        .ok_or_else(|| Error::overflow("values", format!("[{}, {k}]", shape.batch)))?;
    let (x, w, b) = (
        upload(stream, inputs.x)?,
        upload(stream, inputs.w_enc)?,
        upload(stream, inputs.b_enc)?,
    );
    let b_dec = inputs.b_dec.map(|b| upload(stream, b)).transpose()?;
    let b_dec_view = b_dec.as_ref().map(|b| b.slice(0..shape.dm));
    let mut v = stream.alloc_zeros::<E>(out.max(1))?;
    let mut i = stream.alloc_zeros::<i32>(out.max(1))?;
    encode(
        device,
        stream,
        shape,
        EncoderViews {
            x: &x.slice(0..inputs.x.len()),
            w_enc: &w.slice(0..inputs.w_enc.len()),
            b_enc: &b.slice(0..inputs.b_enc.len()),
            b_dec: b_dec_view.as_ref(),
        },
        k,
        &mut v.slice_mut(0..out),
        &mut i.slice_mut(0..out),
    )?;
    let (mut values, mut indices) = (stream.clone_dtoh(&v)?, stream.clone_dtoh(&i)?);
    values.truncate(out);
    indices.truncate(out);
    Ok(super::TopK { values, indices })
}

/// [`decode`] with host slices (the indices checked against L first), on the device's
/// default stream.
pub fn decode_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    k: usize,
    indices: &[i32],
    values: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<Vec<E>> {
    super::sparse::check_sparse(shape, k, indices, values, w_dec, b_dec)?;
    check_dm("w_dec", shape)?;
    let stream = device.stream();
    let out = shape.batch * shape.dm;
    let (id, vd, wd) = (
        upload(stream, indices)?,
        upload(stream, values)?,
        upload(stream, w_dec)?,
    );
    let bd = b_dec.map(|b| upload(stream, b)).transpose()?;
    let bd_view = bd.as_ref().map(|b| b.slice(0..shape.dm));
    let mut xd = stream.alloc_zeros::<E>(out.max(1))?;
    // SAFETY: check_sparse verified every index lies in 0..L.
    unsafe {
        decode(
            device,
            stream,
            shape,
            k,
            &id.slice(0..indices.len()),
            &vd.slice(0..values.len()),
            &wd.slice(0..w_dec.len()),
            bd_view.as_ref(),
            &mut xd.slice_mut(0..out),
        )?;
    }
    let mut x_hat = stream.clone_dtoh(&xd)?;
    x_hat.truncate(out);
    Ok(x_hat)
}

/// k within what the fused encoder keeps per row, or `Err(Unsupported)`.
fn check_select_k(op: &str, k: usize) -> Result<()> {
    if k > NK_SAE_MAX_K as usize {
        return Err(Error::Unsupported(format!(
            "{op} on CUDA with k = {k} (at most {NK_SAE_MAX_K})"
        )));
    }
    Ok(())
}

/// `n` as the kernels' `long long`.
fn to_i64(tensor: &str, n: usize) -> Result<i64> {
    i64_dim(tensor, "an element count", n)
}

/// Grid of one thread per element of an n-element buffer.
fn elementwise(tensor: &str, n: usize, threads: u32) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks(tensor, n.div_ceil(threads as usize))?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block of NK_SAE_THREADS per item.
fn per_item(tensor: &str, n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (blocks(tensor, n)?, 1, 1),
        block_dim: (NK_SAE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A device buffer of E as f32 (for the encoder's epilogue vectors).
fn to_f32<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    v: &CudaView<'_, E>,
) -> Result<CudaSlice<f32>> {
    let n = v.len();
    let mut out = stream.alloc_zeros::<f32>(n.max(1))?;
    if n > 0 {
        let f = device.function("sae", &format!("sae_to_f32_{}", E::SUFFIX))?;
        let nn = to_i64("x", n)?;
        let (ip, _g1) = read_ptr(v, stream);
        let (op, _g2) = write_ptr(&mut out, stream);
        // SAFETY: arguments match sae_to_f32_* in kernels/sae.cu; both hold n elements.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&ip)
                .arg(&op)
                .arg(&nn)
                .launch(elementwise("x", n, NK_SAE_THREADS)?)?;
        }
    }
    Ok(out)
}

/// The value and index a selection key holds (kernels/select.cuh).
fn key_parts(key: u64) -> (f32, u32) {
    let order = (key >> 32) as u32;
    let value = if order == u32::MAX {
        f32::NAN
    } else if order >> 31 == 1 {
        f32::from_bits(order & 0x7fff_ffff)
    } else {
        f32::from_bits(!order)
    };
    (value, !(key as u32))
}

/// keys [rows, k] → `values [rows, k]`, `indices [rows, k]`; with `x_norms`, the value is
/// the squared distance max(|x|² − s, 0) (codebook l2).
#[allow(clippy::too_many_arguments)]
fn keys_out<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    keys: &CudaSlice<u64>,
    rows: usize,
    k: usize,
    x_norms: Option<&CudaSlice<f32>>,
    values: &mut impl DevicePtrMut<E>,
    indices: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    let n = rows * k;
    let f = device.function("sae", &format!("sae_keys_out_{}", E::SUFFIX))?;
    let (nn, kk) = (to_i64("values", n)?, to_i32("k", k)?);
    let (kp, _g1) = read_ptr(keys, stream);
    let norms = x_norms.map(|v| read_ptr(v, stream));
    let np: u64 = norms.as_ref().map_or(0, |(p, _)| *p);
    let (vp, _g3) = write_ptr(values, stream);
    let (ip, _g4) = write_ptr(indices, stream);
    // SAFETY: arguments match sae_keys_out_* in kernels/sae.cu; keys, values and indices
    // hold rows·k elements, x_norms (when given) one per row.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&kp)
            .arg(&nn)
            .arg(&kk)
            .arg(&np)
            .arg(&vp)
            .arg(&ip)
            .launch(elementwise("values", n, NK_SAE_THREADS)?)?;
    }
    Ok(())
}

/// The f32 epilogue vectors of the fused encoder, as device addresses (0: absent):
/// s = fma(((x − offset)·row_scale)·w, scale, shift).
#[derive(Clone, Copy, Default)]
struct Epilogue {
    offset: u64,
    row_scale: u64,
    scale: u64,
    shift: u64,
}

/// Modes of sae_select (kernels/sae.cu).
const MODE_TOPK: i32 = 0;
const MODE_TOPK_RELU: i32 = 1;
const MODE_ABOVE_COUNT: i32 = 2;
const MODE_ABOVE_WRITE: i32 = 3;

/// Blocks the fused encoder aims for: two per SM of a 132-SM H100/H200, so that small
/// batches split the latent axis into ranges.
const TARGET_BLOCKS: usize = 264;

/// One fused-encoder problem: `x` (rows × Dm, element type by `kernel`) against `w`
/// (latents × Dm), with its epilogue; the addresses stay valid while the caller holds
/// their guards. On tensor cores (f16/bf16 rows) the offset is folded into the shift,
/// shift − offset·w[l], once per problem (`folded`).
struct Select<'a> {
    device: &'a Device,
    stream: &'a Arc<CudaStream>,
    kernel: String,
    shape: SaeShape,
    x: u64,
    w: u64,
    epilogue: Epilogue,
    folded: Option<CudaSlice<f32>>,
    /// Row tiles × latent ranges of range_len latents.
    row_tiles: usize,
    ranges: usize,
    range_len: usize,
}

/// The most latents (or codebook entries) the fused CUDA encoder takes: its int arithmetic
/// adds a latent range (up to L) to a range start, which must stay below 2^31.
const MAX_DEVICE_LATENTS: usize = 1 << 30;

/// `n` latents (rows of `tensor`) within what the fused encoder's indices can address.
fn check_device_latents(tensor: &str, n: usize) -> Result<()> {
    check_index_range(tensor, n)?;
    if n > MAX_DEVICE_LATENTS {
        return Err(Error::overflow(
            tensor,
            format!("{n} rows: the CUDA encoders take at most 2^30"),
        ));
    }
    Ok(())
}

impl<'a> Select<'a> {
    /// The encoder of rows of E: f32 on SIMT tiles, f16/bf16 on tensor cores.
    fn new<E: CudaElement>(
        device: &'a Device,
        stream: &'a Arc<CudaStream>,
        shape: SaeShape,
        x: u64,
        w: u64,
        epilogue: Epilogue,
    ) -> Result<Self> {
        let mut run = Self::build(device, stream, E::SUFFIX, shape, x, w, epilogue);
        // (no latents: nothing to fold, and a launch of zero blocks is an error)
        if E::DTYPE != DType::F32 && epilogue.offset != 0 && shape.latents > 0 {
            let mut folded = stream.alloc_zeros::<f32>(shape.latents)?;
            let f = device.function("sae", &format!("sae_fold_offset_{}", E::SUFFIX))?;
            let d = to_i32("x", shape.dm)?;
            let (fp, guard) = write_ptr(&mut folded, stream);
            // SAFETY: arguments match sae_fold_offset_* in kernels/sae.cu; w holds L·Dm
            // elements, the offset Dm, the shift (when non-null) and `folded` L.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&w)
                    .arg(&epilogue.offset)
                    .arg(&epilogue.shift)
                    .arg(&fp)
                    .arg(&d)
                    .launch(per_item("w", shape.latents)?)?;
            }
            drop(guard);
            run.epilogue.offset = 0;
            run.epilogue.shift = fp;
            run.folded = Some(folded);
        }
        Ok(run)
    }

    /// The encoder of f32 rows (a matching-pursuit residual) against a dictionary of E.
    fn residual<E: CudaElement>(
        device: &'a Device,
        stream: &'a Arc<CudaStream>,
        shape: SaeShape,
        x: u64,
        w: u64,
    ) -> Self {
        let suffix = format!("residual_{}", E::SUFFIX);
        Self::build(device, stream, &suffix, shape, x, w, Epilogue::default())
    }

    /// `suffix` picks `sae_select_<suffix>`.
    fn build(
        device: &'a Device,
        stream: &'a Arc<CudaStream>,
        suffix: &str,
        shape: SaeShape,
        x: u64,
        w: u64,
        epilogue: Epilogue,
    ) -> Self {
        let bn = NK_SAE_LATENTS as usize;
        let row_tiles = shape.batch.div_ceil(NK_SAE_ROWS as usize).max(1);
        let tiles = shape.latents.div_ceil(bn).max(1);
        let wanted = TARGET_BLOCKS.div_ceil(row_tiles).clamp(1, tiles);
        let range_len = tiles.div_ceil(wanted) * bn;
        Select {
            device,
            stream,
            kernel: format!("sae_select_{suffix}"),
            shape,
            x,
            w,
            epilogue,
            folded: None,
            row_tiles,
            ranges: shape.latents.div_ceil(range_len).max(1),
            range_len,
        }
    }

    /// One launch of sae_select. `cap` > 0 in the top-k modes (the per-row candidate
    /// buffer); theta/theta_all in the above modes.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        mode: i32,
        k: usize,
        theta: u64,
        theta_all: f32,
        keys_out: u64,
        counts: u64,
        offsets: u64,
        cursors: u64,
    ) -> Result<()> {
        let (bm, bn, bk) = (
            NK_SAE_ROWS as usize,
            NK_SAE_LATENTS as usize,
            NK_SAE_DEPTH as usize,
        );
        let cap = if mode <= MODE_TOPK_RELU {
            (k + bn).next_power_of_two()
        } else {
            0
        };
        // sae_select's layout: keys [bm][cap], thresholds [bm] u64, counts [bm] i32, then
        // f32 xs [bk][bm + 1], ws [bk][bn + 1], scores [bm][bn + 1]
        let smem =
            bm * cap * 8 + bm * 8 + bm * 4 + 4 * (bk * (bm + 1) + bk * (bn + 1) + bm * (bn + 1));
        let f = self.device.function("sae", &self.kernel)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            to_i32("w", smem)?,
        )?;
        let SaeShape { batch, dm, latents } = self.shape;
        let (rows, d, l, range_len) = (
            to_i64("x", batch)?,
            to_i32("x", dm)?,
            to_i32("w", latents)?,
            to_i32("w", self.range_len)?,
        );
        let (kk, cc) = (to_i32("k", k)?, to_i32("k", cap)?);
        let e = self.epilogue;
        let cfg = LaunchConfig {
            grid_dim: (
                blocks("x", self.row_tiles)?,
                grid_yz("w", "latent ranges", self.ranges)?,
                1,
            ),
            block_dim: (NK_SAE_THREADS, 1, 1),
            shared_mem_bytes: to_i32("w", smem)? as u32,
        };
        // SAFETY: arguments match sae_select_* in kernels/sae.cu; x and w hold rows·Dm and
        // L·Dm elements, the epilogue vectors (when non-null) Dm, rows, L, L elements, the
        // outputs the sizes their mode writes (keys [rows, ranges, k] or the CSR offsets'
        // total), and the dynamic shared memory is the kernel's layout for this cap.
        unsafe {
            self.stream
                .launch_builder(&f)
                .arg(&self.x)
                .arg(&self.w)
                .arg(&e.offset)
                .arg(&e.row_scale)
                .arg(&e.scale)
                .arg(&e.shift)
                .arg(&theta)
                .arg(&theta_all)
                .arg(&rows)
                .arg(&d)
                .arg(&l)
                .arg(&range_len)
                .arg(&mode)
                .arg(&kk)
                .arg(&cc)
                .arg(&keys_out)
                .arg(&counts)
                .arg(&offsets)
                .arg(&cursors)
                .launch(cfg)?;
        }
        Ok(())
    }

    /// Each row's best k keys, descending: `[rows, k]` (k ≤ NK_SAE_MAX_K).
    fn top_k(&self, k: usize, relu: bool) -> Result<CudaSlice<u64>> {
        let stream = self.stream;
        let batch = self.shape.batch;
        let per_row = self.ranges * k;
        let mut keys = stream.alloc_zeros::<u64>((batch * per_row).max(1))?;
        {
            let (kp, _g) = write_ptr(&mut keys, stream);
            let mode = if relu { MODE_TOPK_RELU } else { MODE_TOPK };
            self.launch(mode, k, 0, 0.0, kp, 0, 0, 0)?;
        }
        if self.ranges == 1 {
            return Ok(keys);
        }
        debug_assert!(k <= NK_TOPK_MAX_K as usize);
        let mut best = stream.alloc_zeros::<u64>((batch * k).max(1))?;
        {
            let f = self.device.function("topk", "topk_keys")?;
            let (pr, kk) = (to_i64("x", per_row)?, to_i32("k", k)?);
            let (ip, _g1) = read_ptr(&keys, stream);
            let (op, _g2) = write_ptr(&mut best, stream);
            let cfg = LaunchConfig {
                grid_dim: (blocks("x", batch)?, 1, 1),
                block_dim: (NK_TOPK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match topk_keys in kernels/topk.cu; `keys` holds rows·per_row
            // keys, `best` rows·k, and k ≤ NK_TOPK_MAX_K fits its candidate buffer.
            unsafe {
                stream
                    .launch_builder(&f)
                    .arg(&ip)
                    .arg(&op)
                    .arg(&pr)
                    .arg(&kk)
                    .launch(cfg)?;
            }
        }
        Ok(best)
    }

    /// Every (row, latent) whose score is > theta[l] (or > theta_all without `theta`), as
    /// per-row lists of keys, descending: a counting pass, the CSR offsets on the host, a
    /// writing pass, and each row sorted on the host.
    fn above(&self, theta: u64, theta_all: f32) -> Result<Vec<Vec<u64>>> {
        let stream = self.stream;
        let batch = self.shape.batch;
        let mut counts = stream.alloc_zeros::<i32>(batch.max(1))?;
        {
            let (cp, _g) = write_ptr(&mut counts, stream);
            self.launch(MODE_ABOVE_COUNT, 0, theta, theta_all, 0, cp, 0, 0)?;
        }
        let counts = stream.clone_dtoh(&counts)?;
        let mut offsets = Vec::with_capacity(batch);
        let mut nnz = 0usize;
        for &c in &counts[..batch] {
            offsets.push(to_i64("indices", nnz)?);
            nnz += c as usize;
        }
        check_index_range("indices", nnz)?;
        let offsets_d = stream.clone_htod(&offsets)?;
        let mut cursors = stream.alloc_zeros::<i32>(batch.max(1))?;
        let mut keys = stream.alloc_zeros::<u64>(nnz.max(1))?;
        {
            let (op, _g1) = read_ptr(&offsets_d, stream);
            let (cp, _g2) = write_ptr(&mut cursors, stream);
            let (kp, _g3) = write_ptr(&mut keys, stream);
            self.launch(MODE_ABOVE_WRITE, 0, theta, theta_all, kp, 0, op, cp)?;
        }
        let keys = stream.clone_dtoh(&keys)?;
        Ok((0..batch)
            .map(|b| {
                let at = offsets[b] as usize;
                let mut row = keys[at..at + counts[b] as usize].to_vec();
                row.sort_unstable_by(|a, b| b.cmp(a));
                row
            })
            .collect())
    }
}

/// Per-row key lists as (value, latent) pairs.
fn pairs(rows: &[Vec<u64>]) -> Vec<Vec<(f32, u32)>> {
    rows.iter()
        .map(|row| row.iter().map(|&key| key_parts(key)).collect())
        .collect()
}

/// CSR of per-row (value, latent) lists from the device, each already descending.
fn csr_of<E: Element>(rows: &[Vec<(f32, u32)>]) -> Result<Csr<E>> {
    csr_with(rows, |v| E::from_f64(f64::from(v)))
}

/// A host vector of E as f32 on the device.
fn upload_f32<E: Element>(stream: &Arc<CudaStream>, v: &[E]) -> Result<CudaSlice<f32>> {
    let wide: Vec<f32> = v.iter().map(|x| x.to_f64() as f32).collect();
    upload(stream, &wide)
}

/// The inputs every host encoder uploads: x, w, b_enc (as the f32 shift), b_dec (as the
/// f32 offset).
struct EncoderUpload<E: CudaElement> {
    x: CudaSlice<E>,
    w: CudaSlice<E>,
    shift: CudaSlice<f32>,
    offset: Option<CudaSlice<f32>>,
}

impl<E: CudaElement> EncoderUpload<E> {
    fn new(stream: &Arc<CudaStream>, inputs: &EncoderInputs<'_, E>) -> Result<Self> {
        Ok(EncoderUpload {
            x: upload(stream, inputs.x)?,
            w: upload(stream, inputs.w_enc)?,
            shift: upload_f32(stream, inputs.b_enc)?,
            offset: inputs.b_dec.map(|b| upload_f32(stream, b)).transpose()?,
        })
    }

    /// Runs `f` on a [`Select`] over these inputs (ReLU encoders' epilogue).
    fn with_select<T>(
        &self,
        device: &Device,
        stream: &Arc<CudaStream>,
        shape: SaeShape,
        f: impl FnOnce(&Select<'_>) -> Result<T>,
    ) -> Result<T> {
        let (xp, _g1) = read_ptr(&self.x, stream);
        let (wp, _g2) = read_ptr(&self.w, stream);
        let (sp, _g3) = read_ptr(&self.shift, stream);
        let offset = self.offset.as_ref().map(|o| read_ptr(o, stream));
        let epilogue = Epilogue {
            offset: offset.as_ref().map_or(0, |(p, _)| *p),
            shift: sp,
            ..Epilogue::default()
        };
        f(&Select::new::<E>(device, stream, shape, xp, wp, epilogue)?)
    }
}

/// [`super::encode_jumprelu`] on the device: the fused encoder's two passes (count, then
/// write at the rows' CSR offsets), each row sorted on the host.
pub fn encode_jumprelu_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    inputs: &EncoderInputs<'_, E>,
    threshold: &[E],
) -> Result<Csr<E>> {
    no_f64::<E>("sae.encode_jumprelu")?;
    check_jumprelu(shape, inputs, threshold)?;
    check_device_latents("w_enc", shape.latents)?;
    check_dm("x", shape)?;
    if shape.batch == 0 {
        return csr_of(&[]);
    }
    let stream = device.stream();
    let up = EncoderUpload::new(stream, inputs)?;
    let theta = upload_f32(stream, threshold)?;
    let rows = up.with_select(device, stream, shape, |run| {
        let (tp, _g) = read_ptr(&theta, stream);
        run.above(tp, 0.0)
    })?;
    csr_of(&pairs(&rows))
}

/// [`super::encode_batch_topk`] on the device. Each row's best m = min(2k, L, 256) first
/// (the fused top-k encoder); the (B·k)-th best positive entry of that pool is a lower
/// bound t of the batch threshold (the pool is a subset of all entries). When a row's m-th
/// entry still beats t (it may hide more winners), one above pass collects every entry ≥
/// t (or every positive one when the pool is smaller than B·k), which holds all winners;
/// the B·k best of it are the answer. Exact, as on the CPU.
pub fn encode_batch_topk_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    k: usize,
    inputs: &EncoderInputs<'_, E>,
) -> Result<Csr<E>> {
    no_f64::<E>("sae.encode_batch_topk")?;
    let budget = check_batch_topk(shape, inputs, k)?;
    let SaeShape { batch, latents, .. } = shape;
    check_device_latents("w_enc", latents)?;
    check_dm("x", shape)?;
    if batch == 0 {
        return csr_of(&[]);
    }
    let stream = device.stream();
    let up = EncoderUpload::new(stream, inputs)?;
    let m = (2 * k).min(latents).min(NK_SAE_MAX_K as usize);
    let keys = up.with_select(device, stream, shape, |run| run.top_k(m, true))?;
    let keys = stream.clone_dtoh(&keys)?;
    let lists: Vec<Vec<(f32, u32)>> = keys
        .chunks(m)
        .take(batch)
        .map(|row| row.iter().map(|&key| key_parts(key)).collect())
        .collect();
    // positives only: NaN and non-positive values are never kept
    let kept: Vec<Vec<(f32, u32)>> = lists
        .iter()
        .map(|row| row.iter().copied().filter(|(v, _)| *v > 0.0).collect())
        .collect();
    let bound = batch_threshold(&kept, budget);
    let open = m < latents
        && (lists.iter().enumerate())
            .any(|(b, row)| may_hide_winners(row.last().copied(), b, bound));
    let pool = if open {
        // s ≥ t.value is s > the next float below it (t.value > 0, a pool entry)
        let theta = bound.map_or(0.0, |(v, _, _)| f32::from_bits(v.to_bits() - 1));
        pairs(&up.with_select(device, stream, shape, |run| run.above(0, theta))?)
    } else {
        kept
    };
    let threshold = batch_threshold(&pool, budget);
    csr_of(&at_or_above(pool, threshold))
}

/// Per-row values of `m [rows, dm]` on the device (sae_row_norms): mode 0 → Σv², 1 → 1/|v|
/// (0 for a zero row), 2 → −Σv².
fn row_norms<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    m: &CudaSlice<E>,
    rows: usize,
    dm: usize,
    mode: i32,
) -> Result<CudaSlice<f32>> {
    let mut out = stream.alloc_zeros::<f32>(rows.max(1))?;
    if rows > 0 {
        let f = device.function("sae", &format!("sae_row_norms_{}", E::SUFFIX))?;
        let d = to_i32("x", dm)?;
        let (mp, _g1) = read_ptr(m, stream);
        let (op, _g2) = write_ptr(&mut out, stream);
        // SAFETY: arguments match sae_row_norms_* in kernels/sae.cu; m holds rows·dm
        // elements, out one per row.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&mp)
                .arg(&d)
                .arg(&mode)
                .arg(&op)
                .launch(per_item("x", rows)?)?;
        }
    }
    Ok(out)
}

/// [`super::nearest`] on the device: the norms on the device, then the fused encoder with
/// the metric's epilogue (cosine: both sides scaled by inverse norms; l2: 2x·c − |c|²,
/// turned into |x|² − s, clamped at 0). k ≤ 256.
pub fn nearest_host<E: CudaElement>(
    device: &Device,
    metric: Metric,
    shape: SaeShape,
    k: usize,
    x: &[E],
    codebook: &[E],
) -> Result<super::TopK<E>> {
    no_f64::<E>("codebook.nearest")?;
    check_nearest(shape, x, codebook, k)?;
    check_select_k("codebook.nearest", k)?;
    let SaeShape { batch, dm, latents } = shape;
    check_device_latents("codebook", latents)?;
    check_dm("x", shape)?;
    if batch == 0 {
        return Ok(super::TopK {
            values: Vec::new(),
            indices: Vec::new(),
        });
    }
    let stream = device.stream();
    let (xd, cd) = (upload(stream, x)?, upload(stream, codebook)?);
    let (mut row_scale, mut scale, mut shift, mut x_norms) = (None, None, None, None);
    match metric {
        Metric::Dot => {}
        Metric::Cosine => {
            row_scale = Some(row_norms(device, stream, &xd, batch, dm, 1)?);
            scale = Some(row_norms(device, stream, &cd, latents, dm, 1)?);
        }
        Metric::L2 => {
            // ranking by 2x·c − |c|² is ranking by −|x − c|²
            x_norms = Some(row_norms(device, stream, &xd, batch, dm, 0)?);
            shift = Some(row_norms(device, stream, &cd, latents, dm, 2)?);
            scale = Some(upload(stream, &vec![2.0f32; latents])?);
        }
    }
    let keys = {
        let (xp, _g1) = read_ptr(&xd, stream);
        let (cp, _g2) = read_ptr(&cd, stream);
        let guards = [&row_scale, &scale, &shift].map(|v| v.as_ref().map(|v| read_ptr(v, stream)));
        let ptr = |i: usize| guards[i].as_ref().map_or(0, |(p, _)| *p);
        let epilogue = Epilogue {
            row_scale: ptr(0),
            scale: ptr(1),
            shift: ptr(2),
            offset: 0,
        };
        Select::new::<E>(device, stream, shape, xp, cp, epilogue)?.top_k(k, false)?
    };
    let out = batch * k;
    let mut v = stream.alloc_zeros::<E>(out)?;
    let mut i = stream.alloc_zeros::<i32>(out)?;
    keys_out::<E>(
        device,
        stream,
        &keys,
        batch,
        k,
        x_norms.as_ref(),
        &mut v,
        &mut i,
    )?;
    Ok(super::TopK {
        values: stream.clone_dtoh(&v)?,
        indices: stream.clone_dtoh(&i)?,
    })
}

/// [`super::encode_mp`] on the device: the residual in f32 on the device; each step one
/// top-1 run of the fused encoder on the residual (sae_select_residual_*), then a step
/// kernel that records (j, c) and subtracts c·w_dec\[j\].
pub fn encode_mp_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    k: usize,
    x: &[E],
    w_dec: &[E],
    b_dec: Option<&[E]>,
) -> Result<MatchingPursuit<E>> {
    no_f64::<E>("sae.encode_mp")?;
    check_mp(shape, x, w_dec, b_dec, k)?;
    let SaeShape { batch, dm, latents } = shape;
    check_device_latents("w_dec", latents)?;
    check_dm("x", shape)?;
    let (bx, _) = shape.sizes()?;
    if batch == 0 {
        return Ok(MatchingPursuit {
            values: Vec::new(),
            indices: Vec::new(),
            residual: Vec::new(),
        });
    }
    let stream = device.stream();
    let (xd, wd) = (upload(stream, x)?, upload(stream, w_dec)?);
    let offset = b_dec.map(|b| upload_f32(stream, b)).transpose()?;
    let mut residual = stream.alloc_zeros::<f32>(bx.max(1))?;
    let (n, d) = (to_i64("x", bx)?, to_i32("x", dm)?);
    if bx > 0 {
        let f = device.function("sae", &format!("sae_mp_start_{}", E::SUFFIX))?;
        let (xp, _g1) = read_ptr(&xd, stream);
        let op = offset.as_ref().map(|o| read_ptr(o, stream));
        let opp: u64 = op.as_ref().map_or(0, |(p, _)| *p);
        let (rp, _g3) = write_ptr(&mut residual, stream);
        // SAFETY: arguments match sae_mp_start_* in kernels/sae.cu; x and residual hold
        // B·Dm elements, the offset (when given) Dm.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&xp)
                .arg(&opp)
                .arg(&rp)
                .arg(&n)
                .arg(&d)
                .launch(elementwise("x", bx, NK_SAE_THREADS)?)?;
        }
    }
    let out = batch * k;
    let mut values = stream.alloc_zeros::<E>(out)?;
    let mut indices = stream.alloc_zeros::<i32>(out)?;
    let step_fn = device.function("sae", &format!("sae_mp_step_{}", E::SUFFIX))?;
    let kk = to_i32("k", k)?;
    for step in 0..k {
        let best = {
            let (rp, _g1) = read_ptr(&residual, stream);
            let (wp, _g2) = read_ptr(&wd, stream);
            Select::residual::<E>(device, stream, shape, rp, wp).top_k(1, false)?
        };
        let s = to_i32("k", step)?;
        let (bp, _g1) = read_ptr(&best, stream);
        let (wp, _g2) = read_ptr(&wd, stream);
        let (rp, _g3) = write_ptr(&mut residual, stream);
        let (vp, _g4) = write_ptr(&mut values, stream);
        let (ip, _g5) = write_ptr(&mut indices, stream);
        // SAFETY: arguments match sae_mp_step_* in kernels/sae.cu; best holds one key per
        // row (a latent in 0..L), w_dec L·Dm elements, residual B·Dm, values and indices
        // B·k, and step < k.
        unsafe {
            stream
                .launch_builder(&step_fn)
                .arg(&bp)
                .arg(&wp)
                .arg(&rp)
                .arg(&vp)
                .arg(&ip)
                .arg(&kk)
                .arg(&s)
                .arg(&d)
                .launch(per_item("x", batch)?)?;
        }
    }
    let mut r_out = stream.alloc_zeros::<E>(bx.max(1))?;
    if bx > 0 {
        let f = device.function("sae", &format!("sae_from_f32_{}", E::SUFFIX))?;
        let (ip, _g1) = read_ptr(&residual, stream);
        let (op, _g2) = write_ptr(&mut r_out, stream);
        // SAFETY: arguments match sae_from_f32_* in kernels/sae.cu; both hold B·Dm elements.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&ip)
                .arg(&op)
                .arg(&n)
                .launch(elementwise("x", bx, NK_SAE_THREADS)?)?;
        }
    }
    let mut residual = stream.clone_dtoh(&r_out)?;
    residual.truncate(bx);
    Ok(MatchingPursuit {
        values: stream.clone_dtoh(&values)?,
        indices: stream.clone_dtoh(&indices)?,
        residual,
    })
}

/// [`super::backward`] on the device. The selections are grouped by latent on the host
/// (a counting sort of `indices`, as the CPU does), so each latent's sums run in (b, j)
/// order on the device: deterministic, no atomics.
pub fn backward_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    k: usize,
    inputs: &BackwardInputs<'_, E>,
) -> Result<SaeGrads<E>> {
    no_f64::<E>("sae.backward")?;
    check_backward(shape, k, inputs)?;
    let (bx, lw) = shape.sizes()?;
    let SaeShape { batch, dm, latents } = shape;
    let bk = batch * k;
    check_index_range("indices", bk)?;
    check_index_range("w_dec", latents)?;
    check_dm("x", shape)?;
    let (start, by_latent) = group_by_latent(inputs.indices, latents);
    // both fit i32: entries ≤ B·k, checked above
    let start: Vec<i32> = start.into_iter().map(|v| v as i32).collect();
    let by_latent: Vec<i32> = by_latent.into_iter().map(|v| v as i32).collect();
    let stream = device.stream();
    let up = |v: &[E]| upload(stream, v);
    let (x, w_enc, w_dec, values, d_xhat) = (
        up(inputs.x)?,
        up(inputs.w_enc)?,
        up(inputs.w_dec)?,
        up(inputs.values)?,
        up(inputs.d_xhat)?,
    );
    let indices = upload(stream, inputs.indices)?;
    let (start, by_latent) = (upload(stream, &start)?, upload(stream, &by_latent)?);
    let b_dec = inputs.b_dec.map(|b| upload_f32(stream, b)).transpose()?;
    let (kk, d) = (to_i32("indices", k)?, to_i32("x", dm)?);
    let function = |name: &str| device.function("sae", &format!("sae_bwd_{name}_{}", E::SUFFIX));

    let mut dpre = stream.alloc_zeros::<f32>(bk.max(1))?;
    if bk > 0 {
        let f = function("dpre")?;
        let n = to_i64("indices", bk)?;
        let (gp, _g1) = read_ptr(&d_xhat, stream);
        let (wp, _g2) = read_ptr(&w_dec, stream);
        let (ip, _g3) = read_ptr(&indices, stream);
        let (vp, _g4) = read_ptr(&values, stream);
        let (dp, _g5) = write_ptr(&mut dpre, stream);
        // a warp per selection
        let cfg = LaunchConfig {
            grid_dim: (
                blocks("indices", bk.div_ceil(NK_SAE_THREADS as usize / 32))?,
                1,
                1,
            ),
            block_dim: (NK_SAE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match sae_bwd_dpre_* in kernels/sae.cu; indices (checked in
        // 0..L) and values hold B·k entries, d_xhat B·Dm, w_dec L·Dm, dpre B·k.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&gp)
                .arg(&wp)
                .arg(&ip)
                .arg(&vp)
                .arg(&dp)
                .arg(&n)
                .arg(&kk)
                .arg(&d)
                .launch(cfg)?;
        }
    }

    let mut dw_dec = stream.alloc_zeros::<E>(lw.max(1))?;
    let mut dw_enc = stream.alloc_zeros::<E>(lw.max(1))?;
    let mut db_enc = stream.alloc_zeros::<E>(latents.max(1))?;
    if latents > 0 {
        let f = function("latent")?;
        let (sp, _g1) = read_ptr(&start, stream);
        let (lp, _g2) = read_ptr(&by_latent, stream);
        let (vp, _g3) = read_ptr(&values, stream);
        let (dp, _g4) = read_ptr(&dpre, stream);
        let (gp, _g5) = read_ptr(&d_xhat, stream);
        let (xp, _g6) = read_ptr(&x, stream);
        let bd = b_dec.as_ref().map(|b| read_ptr(b, stream));
        let bp: u64 = bd.as_ref().map_or(0, |(p, _)| *p);
        let (o1, _g8) = write_ptr(&mut dw_dec, stream);
        let (o2, _g9) = write_ptr(&mut dw_enc, stream);
        let (o3, _g10) = write_ptr(&mut db_enc, stream);
        // SAFETY: arguments match sae_bwd_latent_* in kernels/sae.cu; start holds L + 1
        // offsets into by_latent (B·k flat positions), values/dpre B·k entries, d_xhat and
        // x B·Dm, b_dec (when given) Dm, dw_dec/dw_enc L·Dm, db_enc L.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&sp)
                .arg(&lp)
                .arg(&vp)
                .arg(&dp)
                .arg(&gp)
                .arg(&xp)
                .arg(&bp)
                .arg(&o1)
                .arg(&o2)
                .arg(&o3)
                .arg(&kk)
                .arg(&d)
                .launch(per_item("w_dec", latents)?)?;
        }
    }

    let mut dx = stream.alloc_zeros::<E>(bx.max(1))?;
    let mut dx_acc = stream.alloc_zeros::<f32>(bx.max(1))?;
    if bx > 0 {
        let f = function("dx")?;
        let (ip, _g1) = read_ptr(&indices, stream);
        let (dp, _g2) = read_ptr(&dpre, stream);
        let (wp, _g3) = read_ptr(&w_enc, stream);
        let (o1, _g4) = write_ptr(&mut dx, stream);
        let (o2, _g5) = write_ptr(&mut dx_acc, stream);
        // SAFETY: arguments match sae_bwd_dx_* in kernels/sae.cu; indices (in 0..L) and
        // dpre hold B·k entries, w_enc L·Dm, dx and dx_acc B·Dm.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&ip)
                .arg(&dp)
                .arg(&wp)
                .arg(&o1)
                .arg(&o2)
                .arg(&kk)
                .arg(&d)
                .launch(per_item("x", batch)?)?;
        }
    }

    let mut db_dec = stream.alloc_zeros::<E>(dm.max(1))?;
    if dm > 0 {
        let f = function("db_dec")?;
        let bb = to_i64("x", batch)?;
        let (gp, _g1) = read_ptr(&d_xhat, stream);
        let (ap, _g2) = read_ptr(&dx_acc, stream);
        let (op, _g3) = write_ptr(&mut db_dec, stream);
        // SAFETY: arguments match sae_bwd_db_dec_* in kernels/sae.cu; d_xhat and dx_acc
        // hold B·Dm elements (dx_acc zeros when B = 0 is never read), db_dec Dm.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&gp)
                .arg(&ap)
                .arg(&op)
                .arg(&bb)
                .arg(&d)
                .launch(elementwise("x", dm, NK_SAE_THREADS)?)?;
        }
    }
    let down = |v: &CudaSlice<E>, n: usize| -> Result<Vec<E>> {
        let mut h = stream.clone_dtoh(v)?;
        h.truncate(n);
        Ok(h)
    };
    Ok(SaeGrads {
        dw_dec: down(&dw_dec, lw)?,
        db_dec: down(&db_dec, dm)?,
        dw_enc: down(&dw_enc, lw)?,
        db_enc: down(&db_enc, latents)?,
        dx: down(&dx, bx)?,
    })
}
