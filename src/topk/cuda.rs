//! The sparse top-k family on the GPU (feature `cuda`): `topk.rows`, `sae.encode` and
//! `sae.decode` (kernels/topk.cu), in f32, f16 and bf16. The encoder is a SIMT kernel (no
//! tensor cores yet) that keeps each row's candidates in shared memory, so the [B, L]
//! pre-activations never exist; it takes k ≤ 256 and Dm ≤ 1024. f64 and the other ops of
//! the family (batch_topk, jumprelu, backward, matching pursuit, codebook) run on the CPU
//! only so far: they answer `Err(Unsupported)` here.
//!
//! Device-level entry points take device views and a stream (no host copies); the `_host`
//! conveniences upload, run and download on the device's default stream, with the CPU
//! path's input checks.

use super::{SaeShape, check_index_range, check_k};
use crate::cuda::config::{
    NK_TOPK_ENCODE_MAX_DM, NK_TOPK_ENCODE_MAX_K, NK_TOPK_ENCODE_ROWS, NK_TOPK_MAX_K,
    NK_TOPK_THREADS,
};
use crate::cuda::{CudaElement, Device, read_ptr, write_ptr};
use crate::element::DType;
use crate::error::{Error, Result, check_len};
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

fn to_i32(tensor: &str, n: usize) -> Result<i32> {
    i32::try_from(n)
        .map_err(|_| Error::overflow(tensor, format!("{n} does not fit the kernel's indices")))
}

fn blocks(tensor: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::overflow(tensor, format!("{n} blocks are too many")))
}

/// `topk.rows` on the device: `values [rows, k]`, `indices [rows, k]` from `x [rows, n]`,
/// the same order as the CPU (ties to the lower index, NaN first with `largest`, last
/// without). k ≤ 512.
#[allow(clippy::too_many_arguments)]
pub fn rows<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    rows: usize,
    n: usize,
    x: &CudaView<'_, E>,
    params: super::RowsParams,
    values: &mut impl DevicePtrMut<E>,
    indices: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    device.check_stream(stream)?;
    no_f64::<E>("topk.rows")?;
    let k = params.k;
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
    check_len("x", x.len(), total, &format!("[{rows}, {n}]"))?;
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
    let (nn, kk, largest) = (to_i32("x", n)?, to_i32("k", k)?, params.largest as i32);
    let (xp, _g1) = read_ptr(x, stream);
    let (vp, _g2) = write_ptr(values, stream);
    let (ip, _g3) = write_ptr(indices, stream);
    let cfg = LaunchConfig {
        grid_dim: (blocks("x", rows)?, 1, 1),
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
    pub x: &'a CudaView<'b, E>,
    pub w_enc: &'a CudaView<'b, E>,
    pub b_enc: &'a CudaView<'b, E>,
    pub b_dec: Option<&'a CudaView<'b, E>>,
}

/// `sae.encode` on the device (see [`super::encode`]): `values [B, k]`, `indices [B, k]`.
/// k ≤ 256 and Dm ≤ 1024 (others: `Err(Unsupported)`).
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
    if k > NK_TOPK_ENCODE_MAX_K as usize || dm > NK_TOPK_ENCODE_MAX_DM as usize {
        return Err(Error::Unsupported(format!(
            "sae.encode on CUDA with k = {k}, Dm = {dm} (at most k = {NK_TOPK_ENCODE_MAX_K}, \
             Dm = {NK_TOPK_ENCODE_MAX_DM})"
        )));
    }
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
    let f = device.function("topk", &format!("sae_encode_{}", E::SUFFIX))?;
    let grid = blocks("x", batch.div_ceil(NK_TOPK_ENCODE_ROWS as usize))?;
    let (bb, d, l, kk) = (
        batch as i64,
        to_i32("x", dm)?,
        to_i32("w_enc", latents)?,
        to_i32("k", k)?,
    );
    let (xp, _g1) = read_ptr(inputs.x, stream);
    let (wp, _g2) = read_ptr(inputs.w_enc, stream);
    let (bp, _g3) = read_ptr(inputs.b_enc, stream);
    let b_dec = inputs.b_dec.map(|b| read_ptr(b, stream));
    let dp: u64 = b_dec.as_ref().map_or(0, |(p, _)| *p);
    let (vp, _g5) = write_ptr(values, stream);
    let (ip, _g6) = write_ptr(indices, stream);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (NK_TOPK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match sae_encode_* in kernels/topk.cu; the views hold the validated
    // counts, b_dec is null or Dm long, and k, Dm fit the kernel's shared buffers.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&xp)
            .arg(&wp)
            .arg(&bp)
            .arg(&dp)
            .arg(&vp)
            .arg(&ip)
            .arg(&bb)
            .arg(&d)
            .arg(&l)
            .arg(&kk)
            .launch(cfg)?;
    }
    Ok(())
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
    rows: usize,
    n: usize,
    x: &[E],
    params: super::RowsParams,
) -> Result<(Vec<E>, Vec<i32>)> {
    let stream = device.stream();
    let out = rows.saturating_mul(params.k);
    let xd = upload(stream, x)?;
    let mut v = stream.alloc_zeros::<E>(out.max(1))?;
    let mut i = stream.alloc_zeros::<i32>(out.max(1))?;
    self::rows(
        device,
        stream,
        rows,
        n,
        &xd.slice(0..x.len()),
        params,
        &mut v.slice_mut(0..out),
        &mut i.slice_mut(0..out),
    )?;
    let (mut v, mut i) = (stream.clone_dtoh(&v)?, stream.clone_dtoh(&i)?);
    v.truncate(out);
    i.truncate(out);
    Ok((v, i))
}

/// [`encode`] with host slices, on the device's default stream.
pub fn encode_host<E: CudaElement>(
    device: &Device,
    shape: SaeShape,
    inputs: super::EncoderInputs<'_, E>,
    k: usize,
) -> Result<(Vec<E>, Vec<i32>)> {
    // checked here too: the uploads below slice by these lengths
    inputs.validate(shape)?;
    let stream = device.stream();
    let out = shape.batch * k;
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
    let (mut v, mut i) = (stream.clone_dtoh(&v)?, stream.clone_dtoh(&i)?);
    v.truncate(out);
    i.truncate(out);
    Ok((v, i))
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
