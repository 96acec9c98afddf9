//! CUDA launches of kernels/scan.cu. Takes device buffers and a stream; never copies to the
//! host. See the kernel file for the plan; the geometry constants come from kernels/scan.cuh.

use super::{LinearGrads, Numbers, ScanParams, ScanShape};
use crate::cuda::config::{NK_SCAN_LANES, NK_SCAN_STEPS, NK_SCAN_WARPS};
use crate::cuda::{CudaElement, Device, grid_x, grid_yz, read_ptr, scratch, write_ptr};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

/// With this many (batch, channel group) blocks the single pass keeps enough loads in flight
/// (about two 256-thread blocks per SM of an H100, 16 loads each): no time chunks, so each
/// input is read once. Below it, time is cut into chunks at the cost of one extra read.
/// Untuned on hardware so far.
const SINGLE_PASS_BLOCKS: usize = 256;
/// Blocks to aim for when cutting time into chunks (a few waves on 132 SMs).
const TARGET_BLOCKS: usize = 1024;
/// Shortest time chunk worth a block of its own.
const MIN_CHUNK: usize = 1024;

/// (chunks, steps per chunk) for a shape.
fn chunking(shape: ScanShape) -> (usize, usize) {
    let groups = shape.channels.div_ceil(NK_SCAN_LANES as usize);
    let blocks = (shape.batch * groups).max(1);
    let tile = (NK_SCAN_WARPS * NK_SCAN_STEPS) as usize;
    let max_chunks = shape.len.div_ceil(MIN_CHUNK).clamp(1, 65_535);
    let wanted = if blocks >= SINGLE_PASS_BLOCKS {
        1
    } else {
        TARGET_BLOCKS.div_ceil(blocks)
    };
    let chunks = wanted.clamp(1, max_chunks);
    let chunk_len = shape.len.div_ceil(chunks).next_multiple_of(tile).max(tile);
    (shape.len.div_ceil(chunk_len).max(1), chunk_len)
}

/// The main and summary kernels' grid: x = B·⌈D/32⌉ (batch, channel group) blocks (the
/// kernels split blockIdx.x by the `int` group count, so it must fit grid x), y = the time
/// chunks (at most 65535 by `chunking`). All offsets in kernels/scan.cu are 64-bit.
fn grid(shape: ScanShape, chunks: usize) -> Result<LaunchConfig> {
    let groups = shape.channels.div_ceil(NK_SCAN_LANES as usize);
    let x = shape
        .batch
        .checked_mul(groups)
        .ok_or_else(|| Error::overflow("a", format!("{shape} overflows")))?;
    Ok(LaunchConfig {
        grid_dim: (
            grid_x("a", "B·⌈D/32⌉ (batch, channel group)", x)?,
            grid_yz("a", "time chunks", chunks)?,
            1,
        ),
        block_dim: (NK_SCAN_LANES, NK_SCAN_WARPS, 1),
        shared_mem_bytes: 0,
    })
}

/// The carry kernel's grid: a thread per (batch, channel) state.
fn carry_grid(states: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x("a", "B·D", states.div_ceil(256))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// What every launch of one call shares.
struct Launch<'a> {
    /// Entry-point prefix: `scan_linear` or `scan_linear_complex`.
    prefix: &'static str,
    /// Accumulators per channel state (1 real, 2 complex).
    width: usize,
    device: &'a Device,
    stream: &'a Arc<CudaStream>,
    cfg: LaunchConfig,
    shape: ScanShape,
    chunks: usize,
    t_len: i64,
    d: i64,
    chunk: i64,
    reverse: i32,
}

impl Launch<'_> {
    /// The carry entering every time chunk, `[B, chunks, D]`: chunk summaries
    /// (`scan_linear_<pass>_summary`, reading the gates and `beta` — b forward, dh backward),
    /// then the sequential chain over chunks from `init` (h0, or 0 for none).
    fn chunk_carries<E: CudaElement>(
        &self,
        pass: &str,
        a: u64,
        beta: u64,
        init: u64,
    ) -> Result<CudaSlice<E::Acc>> {
        let per_chunk = self.shape.batch * self.shape.channels * self.chunks * self.width;
        let mut prods = scratch::<E::Acc>(self.stream, per_chunk)?;
        let mut ends = scratch::<E::Acc>(self.stream, per_chunk)?;
        let mut carries = scratch::<E::Acc>(self.stream, per_chunk)?;
        let summary = self.device.function(
            "scan",
            &format!("{}_{pass}_summary_{}", self.prefix, E::SUFFIX),
        )?;
        let chain = self
            .device
            .function("scan", &format!("{}_carry_{}", self.prefix, E::SUFFIX))?;
        let (batch, chunks) = (self.shape.batch as i64, self.chunks as i64);
        // SAFETY: argument lists and types match the kernels in kernels/scan.cu; every buffer
        // holds the element counts the caller validated.
        unsafe {
            self.stream
                .launch_builder(&summary)
                .arg(&a)
                .arg(&beta)
                .arg(&mut prods)
                .arg(&mut ends)
                .arg(&self.t_len)
                .arg(&self.d)
                .arg(&self.chunk)
                .arg(&self.reverse)
                .launch(self.cfg)?;
            self.stream
                .launch_builder(&chain)
                .arg(&prods)
                .arg(&ends)
                .arg(&init)
                .arg(&mut carries)
                .arg(&batch)
                .arg(&self.d)
                .arg(&chunks)
                .launch(carry_grid(self.shape.batch * self.shape.channels)?)?;
        }
        Ok(carries)
    }
}

fn prefix(numbers: Numbers) -> &'static str {
    match numbers {
        Numbers::Real => "scan_linear",
        Numbers::Complex => "scan_linear_complex",
    }
}

/// `scan.linear` on the GPU: writes `h [B, T, D]` from `a`, `b` and the optional `h0 [B, D]`,
/// all on `stream` (which must belong to `device`).
#[allow(clippy::too_many_arguments)]
pub fn linear<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    b: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    h: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    forward(Numbers::Real, device, stream, params, shape, a, b, h0, h)
}

/// `scan.linear_complex` on the GPU: `a`, `b`, `h` are `[B, T, D, 2]` (re, im interleaved),
/// `h0` is `[B, D, 2]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_complex<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    b: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    h: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    forward(Numbers::Complex, device, stream, params, shape, a, b, h0, h)
}

/// `scan.linear_backward` on the GPU: writes `da`, `db` (`[B, T, D]`) and `dh0` (`[B, D]`).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    h: &impl DevicePtr<E>,
    dh: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    da: &mut impl DevicePtrMut<E>,
    db: &mut impl DevicePtrMut<E>,
    dh0: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    backward(
        Numbers::Real,
        device,
        stream,
        params,
        shape,
        a,
        h,
        dh,
        h0,
        da,
        db,
        dh0,
    )
}

/// Backward of [`linear_complex`] (gradients as dL/dRe + i·dL/dIm, like PyTorch).
#[allow(clippy::too_many_arguments)]
pub fn linear_complex_backward<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    h: &impl DevicePtr<E>,
    dh: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    da: &mut impl DevicePtrMut<E>,
    db: &mut impl DevicePtrMut<E>,
    dh0: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    backward(
        Numbers::Complex,
        device,
        stream,
        params,
        shape,
        a,
        h,
        dh,
        h0,
        da,
        db,
        dh0,
    )
}

/// Allocating convenience: uploads the inputs, runs [`linear`] on the device's default
/// stream and returns `h` on the host.
pub fn linear_host<E: CudaElement>(
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    forward_host(Numbers::Real, device, params, shape, a, b, h0)
}

/// Allocating convenience for [`linear_complex`].
pub fn linear_complex_host<E: CudaElement>(
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    forward_host(Numbers::Complex, device, params, shape, a, b, h0)
}

/// Allocating convenience for [`linear_backward`]: host in, host out.
pub fn linear_backward_host<E: CudaElement>(
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    backward_host(Numbers::Real, device, params, shape, a, h, dh, h0)
}

/// Allocating convenience for [`linear_complex_backward`].
pub fn linear_complex_backward_host<E: CudaElement>(
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    backward_host(Numbers::Complex, device, params, shape, a, h, dh, h0)
}

/// The forward launches for real or complex numbers.
#[allow(clippy::too_many_arguments)]
fn forward<E: CudaElement>(
    numbers: Numbers,
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    b: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    h: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (n, _) = super::validate_forward::<E>(
        numbers,
        &shape,
        a.len(),
        b.len(),
        h0.map(|x| x.len()),
        h.len(),
    )?;
    if n == 0 {
        return Ok(());
    }
    let (chunks, chunk_len) = chunking(shape);
    let cfg = grid(shape, chunks)?;
    let (t_len, d, chunk) = (shape.len as i64, shape.channels as i64, chunk_len as i64);
    let reverse = params.reverse as i32;
    let (a_ptr, _a_guard) = read_ptr(a, stream);
    let (b_ptr, _b_guard) = read_ptr(b, stream);
    let h0_view = h0.map(|x| read_ptr(x, stream));
    let h0_ptr = h0_view.as_ref().map_or(0u64, |(p, _)| *p);

    let launch = Launch {
        prefix: prefix(numbers),
        width: numbers.width(),
        device,
        stream,
        cfg,
        shape,
        chunks,
        t_len,
        d,
        chunk,
        reverse,
    };
    let carries = if chunks > 1 {
        Some(launch.chunk_carries::<E>("fwd", a_ptr, b_ptr, h0_ptr)?)
    } else {
        None
    };
    let carries_ptr = carries.as_ref().map(|c| read_ptr(c, stream));
    let carries_raw = carries_ptr.as_ref().map_or(0u64, |(p, _)| *p);
    let (h_ptr, _h_guard) = write_ptr(h, stream);
    let main = device.function("scan", &format!("{}_fwd_{}", prefix(numbers), E::SUFFIX))?;
    // SAFETY: as above.
    unsafe {
        stream
            .launch_builder(&main)
            .arg(&a_ptr)
            .arg(&b_ptr)
            .arg(&h0_ptr)
            .arg(&carries_raw)
            .arg(&h_ptr)
            .arg(&t_len)
            .arg(&d)
            .arg(&chunk)
            .arg(&reverse)
            .launch(cfg)?;
    }
    Ok(())
}

/// The backward launches for real or complex numbers.
#[allow(clippy::too_many_arguments)]
fn backward<E: CudaElement>(
    numbers: Numbers,
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &ScanParams,
    shape: ScanShape,
    a: &impl DevicePtr<E>,
    h: &impl DevicePtr<E>,
    dh: &impl DevicePtr<E>,
    h0: Option<&CudaView<'_, E>>,
    da: &mut impl DevicePtrMut<E>,
    db: &mut impl DevicePtrMut<E>,
    dh0: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    let lens = (a.len(), h.len(), dh.len(), h0.map(|x| x.len()));
    let (n, _) = super::validate_backward::<E>(
        numbers,
        &shape,
        lens.0,
        lens.1,
        lens.2,
        lens.3,
        da.len(),
        db.len(),
        dh0.len(),
    )?;
    if shape.len == 0 {
        stream.memset_zeros(dh0)?;
        return Ok(());
    }
    if n == 0 {
        return Ok(());
    }
    let (chunks, chunk_len) = chunking(shape);
    let cfg = grid(shape, chunks)?;
    let (t_len, d, chunk) = (shape.len as i64, shape.channels as i64, chunk_len as i64);
    let reverse = params.reverse as i32;
    let (a_ptr, _a_guard) = read_ptr(a, stream);
    let (h_ptr, _h_guard) = read_ptr(h, stream);
    let (dh_ptr, _dh_guard) = read_ptr(dh, stream);
    let h0_view = h0.map(|x| read_ptr(x, stream));
    let h0_ptr = h0_view.as_ref().map_or(0u64, |(p, _)| *p);

    let launch = Launch {
        prefix: prefix(numbers),
        width: numbers.width(),
        device,
        stream,
        cfg,
        shape,
        chunks,
        t_len,
        d,
        chunk,
        reverse,
    };
    let carries = if chunks > 1 {
        Some(launch.chunk_carries::<E>("bwd", a_ptr, dh_ptr, 0)?)
    } else {
        None
    };
    let carries_ptr = carries.as_ref().map(|c| read_ptr(c, stream));
    let carries_raw = carries_ptr.as_ref().map_or(0u64, |(p, _)| *p);
    let (da_ptr, _da_guard) = write_ptr(da, stream);
    let (db_ptr, _db_guard) = write_ptr(db, stream);
    let (dh0_ptr, _dh0_guard) = write_ptr(dh0, stream);
    let main = device.function("scan", &format!("{}_bwd_{}", prefix(numbers), E::SUFFIX))?;
    // SAFETY: as in `forward`.
    unsafe {
        stream
            .launch_builder(&main)
            .arg(&a_ptr)
            .arg(&h_ptr)
            .arg(&dh_ptr)
            .arg(&h0_ptr)
            .arg(&carries_raw)
            .arg(&da_ptr)
            .arg(&db_ptr)
            .arg(&dh0_ptr)
            .arg(&t_len)
            .arg(&d)
            .arg(&chunk)
            .arg(&reverse)
            .launch(cfg)?;
    }
    Ok(())
}

/// Host in, host out, on the device's default stream.
fn forward_host<E: CudaElement>(
    numbers: Numbers,
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
) -> Result<Vec<E>> {
    let stream = device.stream();
    let (n, _) = super::validate_forward::<E>(
        numbers,
        &shape,
        a.len(),
        b.len(),
        h0.map(<[E]>::len),
        a.len(),
    )?;
    let a_d = stream.clone_htod(a)?;
    let b_d = stream.clone_htod(b)?;
    let h0_d = h0.map(|x| stream.clone_htod(x)).transpose()?;
    let mut h_d = stream.alloc_zeros::<E>(n.max(1))?;
    let mut h_view = h_d.slice_mut(0..n);
    forward(
        numbers,
        device,
        stream,
        params,
        shape,
        &a_d,
        &b_d,
        h0_d.as_ref().map(|x| x.as_view()).as_ref(),
        &mut h_view,
    )?;
    Ok(stream.clone_dtoh(&h_d.slice(0..n))?)
}

/// Host in, host out, on the device's default stream.
#[allow(clippy::too_many_arguments)]
fn backward_host<E: CudaElement>(
    numbers: Numbers,
    device: &Device,
    params: &ScanParams,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
) -> Result<LinearGrads<E>> {
    let stream = device.stream();
    let (_, states) = numbers.sizes::<E>(&shape)?;
    let lens = (a.len(), h.len(), dh.len(), h0.map(<[E]>::len));
    let (n, s) = super::validate_backward::<E>(
        numbers,
        &shape,
        lens.0,
        lens.1,
        lens.2,
        lens.3,
        a.len(),
        a.len(),
        states,
    )?;
    if n == 0 {
        // nothing to launch; with no step the initial state reaches no output
        let zero = <E::Acc as crate::element::Accum>::ZERO;
        return Ok(LinearGrads {
            da: Vec::new(),
            db: Vec::new(),
            dh0: vec![E::from_acc(zero); s],
        });
    }
    let a_d = stream.clone_htod(a)?;
    let h_d = stream.clone_htod(h)?;
    let dh_d = stream.clone_htod(dh)?;
    let h0_d = h0.map(|x| stream.clone_htod(x)).transpose()?;
    let mut da_d = stream.alloc_zeros::<E>(n.max(1))?;
    let mut db_d = stream.alloc_zeros::<E>(n.max(1))?;
    let mut dh0_d = stream.alloc_zeros::<E>(s.max(1))?;
    {
        let mut da_v = da_d.slice_mut(0..n);
        let mut db_v = db_d.slice_mut(0..n);
        let mut dh0_v = dh0_d.slice_mut(0..s);
        backward(
            numbers,
            device,
            stream,
            params,
            shape,
            &a_d,
            &h_d,
            &dh_d,
            h0_d.as_ref().map(|x| x.as_view()).as_ref(),
            &mut da_v,
            &mut db_v,
            &mut dh0_v,
        )?;
    }
    Ok(LinearGrads {
        da: stream.clone_dtoh(&da_d.slice(0..n))?,
        db: stream.clone_dtoh(&db_d.slice(0..n))?,
        dh0: stream.clone_dtoh(&dh0_d.slice(0..s))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_sequence_exactly() {
        for (b, t, d) in [
            (1, 1, 1),
            (1, 100_003, 16),
            (2, 50_000, 33),
            (8, 4096, 1024),
            (1, 262_144, 16),
            (3, 65, 7),
        ] {
            let shape = ScanShape::new(b, t, d);
            let (chunks, len) = chunking(shape);
            assert!((1..=65_535).contains(&chunks), "{shape}");
            assert!(
                chunks * len >= t && (chunks - 1) * len < t,
                "{shape}: {chunks} x {len}"
            );
            assert_eq!(len % (NK_SCAN_WARPS * NK_SCAN_STEPS) as usize, 0);
        }
        // enough blocks: one pass, each input read once
        assert_eq!(chunking(ScanShape::new(8, 4096, 1024)).0, 1);
        // one block: time must provide the parallelism
        assert!(chunking(ScanShape::new(1, 262_144, 16)).0 >= 64);
    }
}
