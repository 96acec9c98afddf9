//! `ridge.solve_batched` on the GPU (feature `cuda`): kernels/ridge.cu, one problem per block
//! with its factor (order ≤ 64: p when n ≥ p, n otherwise) in shared memory in f64, f32 and
//! f64 elements. Larger orders are `Err(Unsupported)` (they would go to cuSOLVER, which this
//! build does not bind yet); `ridge.cv` has no CUDA path yet.

use super::{BatchedShape, check_finite, check_len};
use crate::cuda::config::{NK_RIDGE_MAX_ORDER, NK_RIDGE_THREADS};
use crate::cuda::{CudaElement, Device, read_ptr, write_ptr};
use crate::element::DType;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtrMut, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// `ridge.solve_batched` on the device: writes `w [G, p, t]` on `stream`, then waits for the
/// stream to report a failed factorization (a problem whose regularized Gram matrix is not
/// positive definite: NaN input, or alpha ≤ 0) as an `Err` naming the problem. The values of
/// x, y and alpha are not scanned on the device (the host convenience does that).
pub fn solve_batched<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    shape: BatchedShape,
    x: &CudaView<'_, E>,
    y: &CudaView<'_, E>,
    alpha: &CudaView<'_, E>,
    w: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (xs, ys, ws) = shape.sizes()?;
    let BatchedShape {
        problems: g,
        samples: n,
        features: p,
        targets: t,
    } = shape;
    check_len("x", x.len(), xs, &format!("[{g}, {n}, {p}]"))?;
    check_len("y", y.len(), ys, &format!("[{g}, {n}, {t}]"))?;
    check_len("alpha", alpha.len(), g, &format!("[{g}]"))?;
    check_len("w", w.len(), ws, &format!("[{g}, {p}, {t}]"))?;
    if !matches!(E::DTYPE, DType::F32 | DType::F64) {
        return Err(Error::Unsupported(format!(
            "ridge.solve_batched on CUDA in {} (f32 and f64 only)",
            E::DTYPE
        )));
    }
    let order = n.min(p);
    if order > NK_RIDGE_MAX_ORDER as usize {
        return Err(Error::Unsupported(format!(
            "ridge.solve_batched on CUDA with min(n, p) = {order} (at most {NK_RIDGE_MAX_ORDER})"
        )));
    }
    if ws == 0 {
        return Ok(());
    }
    let over = || Error::overflow("x", format!("{shape:?} does not fit the kernel's indices"));
    let blocks = u32::try_from(g).map_err(|_| over())?;
    let (nn, pp, tt) = (
        i32::try_from(n).map_err(|_| over())?,
        i32::try_from(p).map_err(|_| over())?,
        i32::try_from(t).map_err(|_| over())?,
    );
    let mut status: CudaSlice<i32> = stream.alloc_zeros::<i32>(g)?;
    let f = device.function("ridge", &format!("ridge_solve_batched_{}", E::SUFFIX))?;
    {
        let (xp, _g1) = read_ptr(x, stream);
        let (yp, _g2) = read_ptr(y, stream);
        let (ap, _g3) = read_ptr(alpha, stream);
        let (wp, _g4) = write_ptr(w, stream);
        let (sp, _g5) = write_ptr(&mut status, stream);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (NK_RIDGE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match ridge_solve_batched_* in kernels/ridge.cu; x, y, alpha, w
        // hold the validated element counts, status one int per problem, and min(n, p) fits
        // the kernel's shared factor.
        unsafe {
            stream
                .launch_builder(&f)
                .arg(&xp)
                .arg(&yp)
                .arg(&ap)
                .arg(&wp)
                .arg(&sp)
                .arg(&nn)
                .arg(&pp)
                .arg(&tt)
                .launch(cfg)?;
        }
    }
    let status = stream.clone_dtoh(&status)?;
    if let Some(bad) = status.iter().position(|s| *s != 0) {
        return Err(Error::invalid(
            "x",
            format!("problem {bad}: the regularized Gram matrix is not positive definite"),
        ));
    }
    Ok(())
}

/// Host in, host out on the device's default stream, with the CPU path's input checks
/// (lengths, NaN/Inf in x or y, alpha finite and > 0).
pub fn solve_batched_host<E: CudaElement>(
    device: &Device,
    shape: BatchedShape,
    x: &[E],
    y: &[E],
    alpha: &[E],
) -> Result<Vec<E>> {
    let (xs, ys, ws) = shape.sizes()?;
    let (g, n, p, t) = (shape.problems, shape.samples, shape.features, shape.targets);
    check_len("x", x.len(), xs, &format!("[{g}, {n}, {p}]"))?;
    check_len("y", y.len(), ys, &format!("[{g}, {n}, {t}]"))?;
    check_len("alpha", alpha.len(), g, &format!("[{g}]"))?;
    check_finite("x", x)?;
    check_finite("y", y)?;
    super::check_alpha(alpha)?;
    if ws == 0 {
        return Ok(Vec::new());
    }
    let stream = device.stream();
    // n = 0 leaves x and y empty: upload one element so no device allocation is empty
    let up = |v: &[E]| -> Result<CudaSlice<E>> {
        if v.is_empty() {
            Ok(stream.alloc_zeros::<E>(1)?)
        } else {
            Ok(stream.clone_htod(v)?)
        }
    };
    let (xd, yd, ad) = (up(x)?, up(y)?, up(alpha)?);
    let mut wd = stream.alloc_zeros::<E>(ws)?;
    solve_batched(
        device,
        stream,
        shape,
        &xd.slice(0..xs),
        &yd.slice(0..ys),
        &ad.slice(0..g),
        &mut wd,
    )?;
    Ok(stream.clone_dtoh(&wd)?)
}
