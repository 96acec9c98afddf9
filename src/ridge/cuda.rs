//! Batched ridge on the GPU (feature `cuda`).
//!
//! `ridge.solve_batched`: kernels/ridge.cu, one problem per block with its factor (order
//! m = min(n, p) ≤ 256) packed in dynamic shared memory. The factor is f64 wherever it fits
//! the device's shared memory (f64 elements always; f32 elements too, as on the CPU: orders
//! up to about 180 on an A100 and 215 on an H100); f32 elements of larger orders factor in
//! f32 (relative error about cond(XᵀX + αI) · m · 2⁻²⁴). Orders the kernel cannot hold
//! (m > 256, or an f64 factor that does not fit) go through cuBLAS and cuSOLVER: Gram matrices
//! and right-hand sides by strided-batched GEMM, `potrfBatched`, then two batched triangular
//! solves (cuBLAS `trsmBatched`: cuSOLVER's `potrsBatched` takes one right-hand side only),
//! in the element type.
//!
//! `ridge.cv` ([`cv_host`]): the CPU algorithm of [`super::cv()`] with the products in cuBLAS,
//! the eigendecompositions in cuSOLVER (`syevd`) and our kernels for the rest (centering and
//! splitting each target batch, scaling, the fused held-out scoring, the alpha selection).
//! Targets are copied from host memory one batch (`target_batch` columns) at a time, so y
//! need not fit on the device; what stays there is x's fold matrices and [A, t] f64 score
//! sums.
//!
//! `ridge.score` ([`score`]): one pass per column block for the means and one for the
//! sums, in f64, with the CPU's conventions for constant targets and predictions.
//!
//! `ridge.banded_cv` ([`banded_cv_host`]) and `ridge.split_scores` ([`split_scores_host`]):
//! the banded ops, in `cuda/banded.rs`, on the same products, decompositions and scoring.
//!
//! cuBLAS and cuSOLVER are loaded (dynamically) by the calls that need them, and only then:
//! an absent library is `Err(NoDevice)` naming it.

use super::cv::{CvFit, CvInputs, CvParams, CvProgress, CvScore, RidgeReal};
use super::{BatchedShape, check_finite, check_len};
use crate::cuda::config::{
    NK_RIDGE_CV_COLS, NK_RIDGE_CV_LANES, NK_RIDGE_CV_THREADS, NK_RIDGE_MAX_ORDER,
    NK_RIDGE_RHS_CHUNK, NK_RIDGE_ROW_TILE, NK_RIDGE_THREADS,
};
use crate::cuda::{CudaElement, Device, grid_x, i32_dim, i64_dim, read_ptr, write_ptr};
use crate::element::DType;
use crate::error::{Error, Result};
use cudarc::cublas::result::CublasError;
use cudarc::cublas::{CudaBlas, sys as blas_sys};
use cudarc::cusolver::{DnHandle, sys as solver_sys};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use std::sync::Arc;

mod banded;
pub use banded::{banded_cv_host, split_scores_host};

// ---------------------------------------------------------------------------------------------
// cuBLAS / cuSOLVER in the element type

/// The element types of the CUDA ridge ops (f32, f64): their cuBLAS and cuSOLVER routines.
/// Pointers are raw device addresses; every caller checks the extents first.
pub trait CudaRidgeReal: CudaElement + RidgeReal {
    /// C = op(A)·op(B), column-major.
    #[allow(clippy::too_many_arguments)]
    /// # Safety
    /// Every pointer is a live device allocation of this type on the handle's stream,
    /// holding the extents the sizes describe.
    #[doc(hidden)]
    unsafe fn gemm_raw(
        h: blas_sys::cublasHandle_t,
        ops: (blas_sys::cublasOperation_t, blas_sys::cublasOperation_t),
        mnk: (i32, i32, i32),
        a: (u64, i32, i64),
        b: (u64, i32, i64),
        c: (u64, i32, i64),
        batch: i32,
    ) -> std::result::Result<(), CublasError>;
    /// # Safety
    /// Every pointer is a live device allocation of this type on the handle's stream,
    /// holding the extents the sizes describe.
    #[doc(hidden)]
    unsafe fn syevd_buffer(
        h: solver_sys::cusolverDnHandle_t,
        n: i32,
        a: u64,
        w: u64,
        lwork: &mut i32,
    ) -> solver_sys::cusolverStatus_t;
    #[allow(clippy::too_many_arguments)]
    /// # Safety
    /// Every pointer is a live device allocation of this type on the handle's stream,
    /// holding the extents the sizes describe.
    #[doc(hidden)]
    unsafe fn syevd(
        h: solver_sys::cusolverDnHandle_t,
        n: i32,
        a: u64,
        w: u64,
        work: u64,
        lwork: i32,
        info: u64,
    ) -> solver_sys::cusolverStatus_t;
    /// # Safety
    /// Every pointer is a live device allocation of this type on the handle's stream,
    /// holding the extents the sizes describe.
    #[doc(hidden)]
    unsafe fn potrf_batched(
        h: solver_sys::cusolverDnHandle_t,
        n: i32,
        ptrs: u64,
        info: u64,
        batch: i32,
    ) -> solver_sys::cusolverStatus_t;
    /// B ← B·op(L)⁻¹ for lower triangular L (n×n), B m×n, all batched through pointer arrays.
    #[allow(clippy::too_many_arguments)]
    /// # Safety
    /// Every pointer is a live device allocation of this type on the handle's stream,
    /// holding the extents the sizes describe.
    #[doc(hidden)]
    unsafe fn trsm_right_lower_batched(
        h: blas_sys::cublasHandle_t,
        trans: blas_sys::cublasOperation_t,
        m: i32,
        n: i32,
        l_ptrs: u64,
        b_ptrs: u64,
        ldb: i32,
        batch: i32,
    ) -> blas_sys::cublasStatus_t;
}

macro_rules! ridge_real {
    ($t:ty, $gemm:ident, $evd_buf:ident, $evd:ident, $potrf:ident, $trsm:ident) => {
        impl CudaRidgeReal for $t {
            unsafe fn gemm_raw(
                h: blas_sys::cublasHandle_t,
                ops: (blas_sys::cublasOperation_t, blas_sys::cublasOperation_t),
                (m, n, k): (i32, i32, i32),
                a: (u64, i32, i64),
                b: (u64, i32, i64),
                c: (u64, i32, i64),
                batch: i32,
            ) -> std::result::Result<(), CublasError> {
                let (one, zero): ($t, $t) = (1.0, 0.0);
                // SAFETY: the caller checked every extent.
                unsafe {
                    cudarc::cublas::result::$gemm(
                        h,
                        ops.0,
                        ops.1,
                        m,
                        n,
                        k,
                        &one,
                        a.0 as *const $t,
                        a.1,
                        a.2,
                        b.0 as *const $t,
                        b.1,
                        b.2,
                        &zero,
                        c.0 as *mut $t,
                        c.1,
                        c.2,
                        batch,
                    )
                }
            }
            unsafe fn syevd_buffer(
                h: solver_sys::cusolverDnHandle_t,
                n: i32,
                a: u64,
                w: u64,
                lwork: &mut i32,
            ) -> solver_sys::cusolverStatus_t {
                // SAFETY: the caller passes an n×n matrix and n values.
                unsafe {
                    solver_sys::$evd_buf(
                        h,
                        solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                        solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                        n,
                        a as *const $t,
                        n,
                        w as *const $t,
                        lwork,
                    )
                }
            }
            unsafe fn syevd(
                h: solver_sys::cusolverDnHandle_t,
                n: i32,
                a: u64,
                w: u64,
                work: u64,
                lwork: i32,
                info: u64,
            ) -> solver_sys::cusolverStatus_t {
                // SAFETY: the caller passes an n×n matrix, n values, lwork of workspace.
                unsafe {
                    solver_sys::$evd(
                        h,
                        solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                        solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                        n,
                        a as *mut $t,
                        n,
                        w as *mut $t,
                        work as *mut $t,
                        lwork,
                        info as *mut i32,
                    )
                }
            }
            unsafe fn potrf_batched(
                h: solver_sys::cusolverDnHandle_t,
                n: i32,
                ptrs: u64,
                info: u64,
                batch: i32,
            ) -> solver_sys::cusolverStatus_t {
                // SAFETY: the caller passes `batch` pointers to n×n matrices and infos.
                unsafe {
                    solver_sys::$potrf(
                        h,
                        solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                        n,
                        ptrs as *mut *mut $t,
                        n,
                        info as *mut i32,
                        batch,
                    )
                }
            }
            unsafe fn trsm_right_lower_batched(
                h: blas_sys::cublasHandle_t,
                trans: blas_sys::cublasOperation_t,
                m: i32,
                n: i32,
                l_ptrs: u64,
                b_ptrs: u64,
                ldb: i32,
                batch: i32,
            ) -> blas_sys::cublasStatus_t {
                let one: $t = 1.0;
                // SAFETY: the caller passes `batch` pointers to n×n factors and m×n blocks.
                unsafe {
                    blas_sys::$trsm(
                        h,
                        blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                        blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                        trans,
                        blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                        m,
                        n,
                        &one,
                        l_ptrs as *const *const $t,
                        n,
                        b_ptrs as *const *mut $t,
                        ldb,
                        batch,
                    )
                }
            }
        }
    };
}
ridge_real!(
    f32,
    sgemm_strided_batched,
    cusolverDnSsyevd_bufferSize,
    cusolverDnSsyevd,
    cusolverDnSpotrfBatched,
    cublasStrsmBatched
);
ridge_real!(
    f64,
    dgemm_strided_batched,
    cusolverDnDsyevd_bufferSize,
    cusolverDnDsyevd,
    cusolverDnDpotrfBatched,
    cublasDtrsmBatched
);

const N: blas_sys::cublasOperation_t = blas_sys::cublasOperation_t::CUBLAS_OP_N;
const T: blas_sys::cublasOperation_t = blas_sys::cublasOperation_t::CUBLAS_OP_T;

/// A size of tensor `what` as the i32 the libraries and kernels take ([`i32_dim`]: at most
/// [`MAX_I32_EXTENT`](crate::cuda::MAX_I32_EXTENT), since the kernels' loops over rows and
/// columns step a tile past the end).
fn int(v: usize, what: &str) -> Result<i32> {
    i32_dim(what, "a size", v)
}

/// The cuBLAS and cuSOLVER handles of one call, on its stream.
struct Linalg {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
}

impl Linalg {
    fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        // probe whether the shared libraries can be opened (cudarc's loaders panic when they
        // cannot)
        if !crate::cuda::library_present("cublas") {
            return Err(Error::NoDevice(
                "the cuBLAS library (libcublas) was not found; put its directory on LD_LIBRARY_PATH".into(),
            ));
        }
        if !crate::cuda::library_present("cusolver") {
            return Err(Error::NoDevice(
                "the cuSOLVER library (libcusolver) was not found; put its directory on LD_LIBRARY_PATH".into(),
            ));
        }
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| Error::Cuda(format!("cuBLAS: {e}")))?;
        let solver =
            DnHandle::new(stream.clone()).map_err(|e| Error::Cuda(format!("cuSOLVER: {e}")))?;
        Ok(Self {
            stream: stream.clone(),
            blas,
            solver,
        })
    }

    /// C = op(A)·op(B) for column-major matrices (`ld` their leading dimensions), after
    /// checking that every operand's extent lies inside its buffer.
    #[allow(clippy::too_many_arguments)]
    fn gemm<E: CudaRidgeReal>(
        &self,
        ops: (bool, bool),
        mnk: (usize, usize, usize),
        a: &CudaSlice<E>,
        lda: usize,
        b: &CudaSlice<E>,
        ldb: usize,
        c: &mut CudaSlice<E>,
        ldc: usize,
    ) -> Result<()> {
        self.gemm_at(ops, mnk, (a, 0, lda), (b, 0, ldb), (c, 0, ldc))
    }

    /// [`Linalg::gemm`] on operands that start `offset` elements into their buffers.
    #[allow(clippy::type_complexity)]
    fn gemm_at<E: CudaRidgeReal>(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, a_off, lda): (&CudaSlice<E>, usize, usize),
        (b, b_off, ldb): (&CudaSlice<E>, usize, usize),
        (c, c_off, ldc): (&mut CudaSlice<E>, usize, usize),
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (a_rows, a_cols) = if ta { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if tb { (n, k) } else { (k, n) };
        let rest = |len: usize, off: usize| len.saturating_sub(off);
        check_extent("gemm A", rest(a.len(), a_off), a_rows, a_cols, lda)?;
        check_extent("gemm B", rest(b.len(), b_off), b_rows, b_cols, ldb)?;
        check_extent("gemm C", rest(c.len(), c_off), m, n, ldc)?;
        let op = |t: bool| if t { T } else { N };
        let dims = (int(m, "x")?, int(n, "x")?, int(k, "x")?);
        let (lda, ldb, ldc) = (int(lda, "x")?, int(ldb, "x")?, int(ldc, "x")?);
        let bytes = |off: usize| (off * std::mem::size_of::<E>()) as u64;
        let (pa, _ga) = read_ptr(a, &self.stream);
        let (pb, _gb) = read_ptr(b, &self.stream);
        let (pc, _gc) = write_ptr(c, &self.stream);
        // SAFETY: the extents from the offsets were checked against the buffers' lengths
        // above.
        unsafe {
            E::gemm_raw(
                *self.blas.handle(),
                (op(ta), op(tb)),
                dims,
                (pa + bytes(a_off), lda, 0),
                (pb + bytes(b_off), ldb, 0),
                (pc + bytes(c_off), ldc, 0),
                1,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLAS gemm: {e}")))
    }

    /// The eigendecomposition of the symmetric `order`×`order` matrix in `a` (its lower
    /// triangle read): `a` becomes the eigenvectors (columns); returns the eigenvalues, in
    /// f64, clamped at 0 (rounding of a PSD Gram), as on the CPU.
    fn eigh<E: CudaRidgeReal>(
        &self,
        a: &mut CudaSlice<E>,
        order: usize,
        what: &str,
    ) -> Result<Vec<f64>> {
        check_extent("syevd A", a.len(), order, order, order)?;
        let n = int(order, "x")?;
        let mut values = self.stream.alloc_zeros::<E>(order.max(1))?;
        let mut info = self.stream.alloc_zeros::<i32>(1)?;
        let h = self.solver.cu();
        let mut lwork = 0i32;
        {
            let (pa, _ga) = read_ptr(a, &self.stream);
            let (pw, _gw) = read_ptr(&values, &self.stream);
            // SAFETY: a holds order² elements, values order.
            unsafe { E::syevd_buffer(h, n, pa, pw, &mut lwork) }
                .result()
                .map_err(|e| Error::Cuda(format!("cuSOLVER syevd_bufferSize: {e}")))?;
        }
        let mut work = self
            .stream
            .alloc_zeros::<E>(usize::try_from(lwork).unwrap_or(0).max(1))?;
        {
            let (pa, _ga) = write_ptr(a, &self.stream);
            let (pw, _gw) = write_ptr(&mut values, &self.stream);
            let (pk, _gk) = write_ptr(&mut work, &self.stream);
            let (pi, _gi) = write_ptr(&mut info, &self.stream);
            // SAFETY: sizes as above, lwork elements of workspace as the query asked.
            unsafe { E::syevd(h, n, pa, pw, pk, lwork, pi) }
                .result()
                .map_err(|e| Error::Cuda(format!("cuSOLVER syevd: {e}")))?;
        }
        let info = self.stream.clone_dtoh(&info)?;
        if info[0] != 0 {
            return Err(Error::invalid(
                "x",
                format!("{what}: eigendecomposition failed (syevd info {})", info[0]),
            ));
        }
        let values = self.stream.clone_dtoh(&values)?;
        Ok(values[..order]
            .iter()
            .map(|v| v.to_f64().max(0.0))
            .collect())
    }
}

/// `Err` (an internal error, never expected) unless a column-major rows×cols operand with
/// leading dimension `ld` lies inside `len` elements.
fn check_extent(what: &str, len: usize, rows: usize, cols: usize, ld: usize) -> Result<()> {
    let fits = ld >= rows.max(1)
        && (rows == 0
            || cols == 0
            || ld
                .checked_mul(cols - 1)
                .and_then(|v| v.checked_add(rows))
                .is_some_and(|need| need <= len));
    if fits {
        Ok(())
    } else {
        Err(Error::Cuda(format!(
            "internal: {what} [{rows} x {cols}, ld {ld}] exceeds its buffer of {len}"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// ridge.solve_batched

/// Shared-memory bytes of `ridge_solve_batched_*` for factor order m in factor elements of
/// `size` bytes (the layout in kernels/ridge.cuh).
fn solve_smem_bytes(m: usize, size: usize) -> usize {
    let (rc, rt) = (NK_RIDGE_RHS_CHUNK as usize, NK_RIDGE_ROW_TILE as usize);
    (m * (m + 1) / 2 + m * (rc + rt)) * size
}

/// How one `ridge.solve_batched` call factors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SolvePlan {
    /// Our kernel, the factor in shared memory in f64 (`true`) or f32.
    Kernel { f64_factor: bool, smem: usize },
    /// cuBLAS + cuSOLVER in the element type.
    Library,
}

fn solve_plan(dtype: DType, order: usize, smem_limit: usize) -> SolvePlan {
    if order <= NK_RIDGE_MAX_ORDER as usize {
        let wide = solve_smem_bytes(order, 8);
        if wide <= smem_limit {
            return SolvePlan::Kernel {
                f64_factor: true,
                smem: wide,
            };
        }
        let narrow = solve_smem_bytes(order, 4);
        if dtype == DType::F32 && narrow <= smem_limit {
            return SolvePlan::Kernel {
                f64_factor: false,
                smem: narrow,
            };
        }
    }
    SolvePlan::Library
}

/// `ridge.solve_batched` on the device: writes `w [G, p, t]` on `stream`, then waits for the
/// stream to report a failed factorization (a problem whose regularized Gram matrix is not
/// positive definite: NaN input, or alpha ≤ 0) as an `Err` naming the problem. The values of
/// x, y and alpha are not scanned on the device (the host convenience does that).
pub fn solve_batched<E: CudaRidgeReal>(
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
    if ws == 0 {
        return Ok(());
    }
    if n == 0 {
        // no samples: the dual solution Xᵀc of an empty X is 0, as on the CPU
        stream.memset_zeros(w)?;
        return Ok(());
    }
    let over = || Error::overflow("x", format!("{shape:?} does not fit the kernel's indices"));
    let (nn, pp, tt) = (
        i32_dim("x", "n (samples)", n)?,
        i32_dim("x", "p (features)", p)?,
        i32_dim("y", "t (targets)", t)?,
    );
    let order = n.min(p);
    let limit = device
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
    // 64 bytes kept for the kernel's static shared memory (one int)
    let dynamic_limit = usize::try_from(limit).unwrap_or(0).saturating_sub(64);
    let plan = solve_plan(E::DTYPE, order, dynamic_limit);
    let (f64_factor, smem) = match plan {
        SolvePlan::Kernel { f64_factor, smem } => (f64_factor, smem),
        SolvePlan::Library => {
            return solve_batched_library(device, stream, shape, x, y, alpha, w);
        }
    };
    let name = format!(
        "ridge_solve_batched_{}_{}",
        E::SUFFIX,
        if f64_factor { "f64" } else { "f32" }
    );
    let f = device.function("ridge", &name)?;
    // the kernel's static shared memory (one int) comes on top of the dynamic part
    let static_smem = f
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .unwrap_or(0);
    if smem + usize::try_from(static_smem).unwrap_or(0) > usize::try_from(limit).unwrap_or(0) {
        return solve_batched_library(device, stream, shape, x, y, alpha, w);
    }
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        int(smem, "x")?,
    )?;
    let blocks = grid_x("alpha", "G (problems)", g)?;
    let mut status: CudaSlice<i32> = stream.alloc_zeros::<i32>(g)?;
    {
        let (xp, _g1) = read_ptr(x, stream);
        let (yp, _g2) = read_ptr(y, stream);
        let (ap, _g3) = read_ptr(alpha, stream);
        let (wp, _g4) = write_ptr(w, stream);
        let (sp, _g5) = write_ptr(&mut status, stream);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (NK_RIDGE_THREADS, 1, 1),
            shared_mem_bytes: u32::try_from(smem).map_err(|_| over())?,
        };
        // SAFETY: arguments match ridge_solve_batched_* in kernels/ridge.cu; x, y, alpha, w
        // hold the validated element counts, status one int per problem, 1 ≤ min(n, p) ≤ 256
        // and the dynamic shared memory is the kernel's layout for that order.
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
        return Err(not_positive_definite(bad));
    }
    Ok(())
}

fn not_positive_definite(problem: usize) -> Error {
    Error::invalid(
        "x",
        format!("problem {problem}: the regularized Gram matrix is not positive definite"),
    )
}

/// Device addresses `base + i·stride` (elements of E) for i < count, uploaded: the pointer
/// arrays of the batched library routines.
fn pointer_array<E>(
    stream: &Arc<CudaStream>,
    base: u64,
    stride: usize,
    count: usize,
) -> Result<CudaSlice<u64>> {
    let step = (stride * std::mem::size_of::<E>()) as u64;
    let ptrs: Vec<u64> = (0..count as u64).map(|i| base + i * step).collect();
    Ok(stream.clone_htod(&ptrs)?)
}

/// `ridge.solve_batched` through cuBLAS and cuSOLVER, in the element type, for orders the
/// kernel cannot hold. Row-major outputs are column-major transposes, so the solves run from
/// the right: primal, Wᵀ (t×p) = (YᵀX)(XᵀX + αI)⁻¹; dual, Cᵀ (t×n) = Yᵀ(XXᵀ + αI)⁻¹ and
/// Wᵀ = CᵀX. With the factor L Lᵀ: B ← B·L⁻ᵀ, then B ← B·L⁻¹.
fn solve_batched_library<E: CudaRidgeReal>(
    device: &Device,
    stream: &Arc<CudaStream>,
    shape: BatchedShape,
    x: &CudaView<'_, E>,
    y: &CudaView<'_, E>,
    alpha: &CudaView<'_, E>,
    w: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    let BatchedShape {
        problems: g,
        samples: n,
        features: p,
        targets: t,
    } = shape;
    let la = Linalg::new(stream)?;
    let h = *la.blas.handle();
    let primal = n >= p;
    let m = n.min(p);
    let gram_len = g
        .checked_mul(m * m)
        .ok_or_else(|| Error::overflow("x", format!("{g} Gram matrices of order {m}")))?;
    let mut gram = stream.alloc_zeros::<E>(gram_len)?;
    let (gi, mi, ni, pi, ti) = (
        int(g, "x")?,
        int(m, "x")?,
        int(n, "x")?,
        int(p, "x")?,
        int(t, "y")?,
    );
    let (sx, sy, sw, sg) = (
        (n * p) as i64,
        (n * t) as i64,
        (p * t) as i64,
        (m * m) as i64,
    );
    // the dual's right-hand sides Cᵀ (t×n per problem, column-major = y's layout), solved
    // in place; the primal solves straight into w
    let mut dual_rhs = if primal {
        None
    } else {
        Some(stream.alloc_zeros::<E>(g * n * t)?)
    };
    let blas_err =
        |what: &'static str| move |e: CublasError| Error::Cuda(format!("cuBLAS {what}: {e}"));
    {
        let (xp, _g1) = read_ptr(x, stream);
        let (yp, _g2) = read_ptr(y, stream);
        let (gp, _g3) = write_ptr(&mut gram, stream);
        // x_g row-major [n, p] is column-major Xᵀ (p×n, ld p); y_g is Yᵀ (t×n, ld t)
        // SAFETY: every operand is one problem's slice of x, y, gram or w, `g` of them at
        // their strides, extents as the shapes were validated.
        unsafe {
            if primal {
                // XᵀX (p×p) = Xᵀ·(Xᵀ)ᵀ, and YᵀX (t×p) into w
                E::gemm_raw(
                    h,
                    (N, T),
                    (pi, pi, ni),
                    (xp, pi, sx),
                    (xp, pi, sx),
                    (gp, mi, sg),
                    gi,
                )
                .map_err(blas_err("gemm (Gram)"))?;
                let (wp, _g4) = write_ptr(w, stream);
                E::gemm_raw(
                    h,
                    (N, T),
                    (ti, pi, ni),
                    (yp, ti, sy),
                    (xp, pi, sx),
                    (wp, ti, sw),
                    gi,
                )
                .map_err(blas_err("gemm (right-hand sides)"))?;
            } else {
                // XXᵀ (n×n) = (Xᵀ)ᵀ·Xᵀ; Cᵀ starts as a copy of Yᵀ
                E::gemm_raw(
                    h,
                    (T, N),
                    (ni, ni, pi),
                    (xp, pi, sx),
                    (xp, pi, sx),
                    (gp, mi, sg),
                    gi,
                )
                .map_err(blas_err("gemm (kernel matrix)"))?;
            }
        }
    }
    if let Some(rhs) = dual_rhs.as_mut() {
        stream.memcpy_dtod(y, rhs)?;
    }
    // + αI on every diagonal
    add_alpha_diagonal(device, stream, &mut gram, alpha, g, m)?;
    let mut info = stream.alloc_zeros::<i32>(g)?;
    {
        let (gp, _g1) = write_ptr(&mut gram, stream);
        let (ip, _g2) = write_ptr(&mut info, stream);
        let gram_ptrs = pointer_array::<E>(stream, gp, m * m, g)?;
        let (pp_, _g3) = read_ptr(&gram_ptrs, stream);
        // SAFETY: g pointers to m×m matrices inside `gram`, g infos.
        unsafe { E::potrf_batched(la.solver.cu(), mi, pp_, ip, gi) }
            .result()
            .map_err(|e| Error::Cuda(format!("cuSOLVER potrfBatched: {e}")))?;
    }
    let info = stream.clone_dtoh(&info)?;
    if let Some(bad) = info.iter().position(|s| *s != 0) {
        return Err(not_positive_definite(bad));
    }
    {
        let (gp, _g1) = read_ptr(&gram, stream);
        let gram_ptrs = pointer_array::<E>(stream, gp, m * m, g)?;
        let (lp, _g2) = read_ptr(&gram_ptrs, stream);
        let (bp, _g3, stride) = match dual_rhs.as_mut() {
            Some(rhs) => {
                let (bp, guard) = write_ptr(rhs, stream);
                (bp, guard, n * t)
            }
            None => {
                let (bp, guard) = write_ptr(w, stream);
                (bp, guard, p * t)
            }
        };
        let b_ptrs = pointer_array::<E>(stream, bp, stride, g)?;
        let (bpp, _g4) = read_ptr(&b_ptrs, stream);
        for trans in [T, N] {
            // SAFETY: g factors (m×m) and g right-hand-side blocks (t×m, ld t).
            unsafe { E::trsm_right_lower_batched(h, trans, ti, mi, lp, bpp, ti, gi) }
                .result()
                .map_err(|e| Error::Cuda(format!("cuBLAS trsmBatched: {e}")))?;
        }
    }
    if let Some(rhs) = dual_rhs.as_ref() {
        // Wᵀ (t×p) = Cᵀ (t×n) · X (n×p), X being (Xᵀ)ᵀ
        let (cp, _g1) = read_ptr(rhs, stream);
        let (xp, _g2) = read_ptr(x, stream);
        let (wp, _g3) = write_ptr(w, stream);
        // SAFETY: per problem Cᵀ t×n (ld t), Xᵀ p×n (ld p), Wᵀ t×p (ld t), g of each.
        unsafe {
            E::gemm_raw(
                h,
                (N, T),
                (ti, pi, ni),
                (cp, ti, sy),
                (xp, pi, sx),
                (wp, ti, sw),
                gi,
            )
        }
        .map_err(blas_err("gemm (back-projection)"))?;
    }
    Ok(())
}

/// gram[g][i][i] += alpha[g] for every problem (a small kernel of ridge.cu).
fn add_alpha_diagonal<E: CudaRidgeReal>(
    device: &Device,
    stream: &Arc<CudaStream>,
    gram: &mut CudaSlice<E>,
    alpha: &CudaView<'_, E>,
    g: usize,
    m: usize,
) -> Result<()> {
    let f = device.function("ridge", &format!("ridge_add_diagonal_{}", E::SUFFIX))?;
    let total = g * m;
    let (gi, mi) = (int(g, "alpha")?, int(m, "x")?);
    let cfg = elementwise_config(total);
    let (gp, _g1) = write_ptr(gram, stream);
    let (ap, _g2) = read_ptr(alpha, stream);
    // SAFETY: gram holds g·m² elements, alpha g; the kernel touches the g·m diagonals.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&gp)
            .arg(&ap)
            .arg(&gi)
            .arg(&mi)
            .launch(cfg)?;
    }
    Ok(())
}

fn elementwise_config(total: usize) -> LaunchConfig {
    let threads = NK_RIDGE_CV_THREADS as usize;
    let blocks = total.div_ceil(threads).clamp(1, 4096) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (NK_RIDGE_CV_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Host in, host out on the device's default stream, with the CPU path's input checks
/// (lengths, NaN/Inf in x or y, alpha finite and > 0).
pub fn solve_batched_host<E: CudaRidgeReal>(
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
    let (xd, yd, ad) = (
        upload(stream, x)?,
        upload(stream, y)?,
        upload(stream, alpha)?,
    );
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

/// A host slice on the device; one zero element for an empty one (no empty allocations).
fn upload<E: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    v: &[E],
) -> Result<CudaSlice<E>> {
    if v.is_empty() {
        Ok(stream.alloc_zeros::<E>(1)?)
    } else {
        Ok(stream.clone_htod(v)?)
    }
}

// ---------------------------------------------------------------------------------------------
// ridge.score

/// `ridge.score` on the device: per target column of `y_true` and `y_pred` `[n, t]`, R² and
/// Pearson (the CPU's formulas and conventions, sums in f64, deterministic) into `r2` and
/// `pearson` `[t]` on `stream`. The values are not scanned for NaN/Inf on the device (the
/// host convenience does that).
#[allow(clippy::too_many_arguments)]
pub fn score<E: CudaRidgeReal>(
    device: &Device,
    stream: &Arc<CudaStream>,
    samples: usize,
    targets: usize,
    y_true: &CudaView<'_, E>,
    y_pred: &CudaView<'_, E>,
    r2: &mut impl DevicePtrMut<E>,
    pearson: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (n, t) = (samples, targets);
    super::check_score_lens(n, t, y_true.len(), y_pred.len())?;
    check_len("r2", r2.len(), t, &format!("[{t}]"))?;
    check_len("pearson", pearson.len(), t, &format!("[{t}]"))?;
    if t == 0 {
        return Ok(());
    }
    if n == 0 {
        // no samples: both scores 0, as on the CPU
        stream.memset_zeros(r2)?;
        stream.memset_zeros(pearson)?;
        return Ok(());
    }
    let nn = i32_dim("y_true", "n (samples)", n)?;
    let tt = i64_dim("y_true", "t (targets)", t)?;
    let f = device.function("ridge", &format!("ridge_score_{}", E::SUFFIX))?;
    let cfg = column_blocks(t)?;
    let (tp, _g1) = read_ptr(y_true, stream);
    let (pp, _g2) = read_ptr(y_pred, stream);
    let (rp, _g3) = write_ptr(r2, stream);
    let (qp, _g4) = write_ptr(pearson, stream);
    // SAFETY: arguments match ridge_score_* in kernels/ridge.cu; y_true and y_pred hold n·t
    // elements, r2 and pearson t, n ≥ 1, and the grid covers the t columns.
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&tp)
            .arg(&pp)
            .arg(&nn)
            .arg(&tt)
            .arg(&rp)
            .arg(&qp)
            .launch(cfg)?;
    }
    Ok(())
}

/// Host in, host out on the device's default stream, with the CPU path's input checks
/// (lengths, NaN/Inf in y_true or y_pred): `r2 [t]` and `pearson [t]` (`shape.features` is
/// not used).
pub fn score_host<E: CudaRidgeReal>(
    device: &Device,
    shape: super::RidgeShape,
    y_true: &[E],
    y_pred: &[E],
) -> Result<super::Scores<E>> {
    let (samples, targets) = (shape.samples, shape.targets);
    let len = super::check_score_inputs(samples, targets, y_true, y_pred)?;
    if targets == 0 {
        return Ok(super::Scores {
            r2: Vec::new(),
            pearson: Vec::new(),
        });
    }
    let stream = device.stream();
    let (td, pd) = (upload(stream, y_true)?, upload(stream, y_pred)?);
    let (mut r2, mut pearson) = (
        stream.alloc_zeros::<E>(targets)?,
        stream.alloc_zeros::<E>(targets)?,
    );
    score(
        device,
        stream,
        samples,
        targets,
        &td.slice(0..len),
        &pd.slice(0..len),
        &mut r2,
        &mut pearson,
    )?;
    Ok(super::Scores {
        r2: stream.clone_dtoh(&r2)?,
        pearson: stream.clone_dtoh(&pearson)?,
    })
}

// ---------------------------------------------------------------------------------------------
// ridge.cv

/// The ridge.cv kernels of kernels/ridge.cu for one element type.
struct CvKernels {
    split: CudaFunction,
    scale_cols: CudaFunction,
    scale_refit: CudaFunction,
    score: CudaFunction,
    select: CudaFunction,
}

impl CvKernels {
    /// The refit's `z[i, c] *= 1 / (values[i] + alphas[from + c])` for z column-major
    /// `[rank, k]` (each target's own alpha, f64 on the device).
    fn scale_refit<E: CudaRidgeReal>(
        &self,
        stream: &Arc<CudaStream>,
        z: &mut CudaSlice<E>,
        values: &CudaSlice<f64>,
        (alphas, from): (&CudaSlice<f64>, usize),
        (rank, k): (usize, usize),
    ) -> Result<()> {
        if z.len() < rank * k || values.len() < rank || alphas.len() < from + k {
            return Err(Error::Cuda(format!(
                "internal: refit scaling of [{rank}, {k}] on buffers too small"
            )));
        }
        let (ri, ki) = (int(rank, "x")?, int(k, "y")?);
        let (zp, _g1) = write_ptr(z, stream);
        let (vp, _g2) = read_ptr(values, stream);
        let (ap, _g3) = read_ptr(alphas, stream);
        let alphas_here = ap + (from * std::mem::size_of::<f64>()) as u64;
        // SAFETY: z holds rank × k, values rank and alphas from + k values, checked above.
        unsafe {
            stream
                .launch_builder(&self.scale_refit)
                .arg(&zp)
                .arg(&vp)
                .arg(&alphas_here)
                .arg(&ri)
                .arg(&ki)
                .launch(elementwise_config(rank * k))?;
        }
        Ok(())
    }

    fn load<E: CudaElement>(device: &Device) -> Result<Self> {
        let f = |op: &str| device.function("ridge", &format!("ridge_cv_{op}_{}", E::SUFFIX));
        Ok(Self {
            split: f("split")?,
            scale_cols: f("scale_cols")?,
            scale_refit: f("scale_refit")?,
            score: f("score")?,
            select: f("select")?,
        })
    }
}

/// Grid of the column-block kernels (split, score): NK_RIDGE_CV_COLS columns per block.
fn column_blocks(columns: usize) -> Result<LaunchConfig> {
    let blocks = grid_x(
        "y",
        "the target columns",
        columns.div_ceil(NK_RIDGE_CV_COLS as usize).max(1),
    )?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (NK_RIDGE_CV_COLS, NK_RIDGE_CV_LANES, 1),
        shared_mem_bytes: 0,
    })
}

/// One target batch split on the device: training rows (centered when asked), held-out rows
/// centered on their own means, and the per-column statistics.
struct Split<E> {
    y_train: CudaSlice<E>,
    a_test: CudaSlice<E>,
    train_mean: CudaSlice<f64>,
    test_mean: CudaSlice<f64>,
    ss_tot: CudaSlice<f64>,
}

/// The rows of a fold on the device (i32 row ids; one dummy id for an empty set).
fn upload_rows(stream: &Arc<CudaStream>, rows: &[usize]) -> Result<CudaSlice<i32>> {
    let ids: Vec<i32> = rows
        .iter()
        .map(|r| int(*r, "folds"))
        .collect::<Result<_>>()?;
    upload(stream, &ids)
}

/// Columns [t0, t0 + tb) of every row of y, uploaded as a row-major [n, tb] batch.
fn upload_batch<E: CudaRidgeReal>(
    stream: &Arc<CudaStream>,
    y: &[E],
    n: usize,
    t: usize,
    t0: usize,
    tb: usize,
) -> Result<CudaSlice<E>> {
    let mut batch = Vec::with_capacity(n * tb);
    for r in 0..n {
        batch.extend_from_slice(&y[r * t + t0..r * t + t0 + tb]);
    }
    upload(stream, &batch)
}

/// Runs the split kernel on one uploaded batch `yb [n, tb]`.
#[allow(clippy::too_many_arguments)]
fn split_batch<E: CudaRidgeReal>(
    stream: &Arc<CudaStream>,
    kernels: &CvKernels,
    yb: &CudaSlice<E>,
    (train, n_tr): (&CudaSlice<i32>, usize),
    (test, n_te): (&CudaSlice<i32>, usize),
    tb: usize,
    center: bool,
) -> Result<Split<E>> {
    let mut s = Split {
        y_train: stream.alloc_zeros::<E>((n_tr * tb).max(1))?,
        a_test: stream.alloc_zeros::<E>((n_te * tb).max(1))?,
        train_mean: stream.alloc_zeros::<f64>(tb.max(1))?,
        test_mean: stream.alloc_zeros::<f64>(tb.max(1))?,
        ss_tot: stream.alloc_zeros::<f64>(tb.max(1))?,
    };
    let (ntr, nte, tbi, c) = (
        int(n_tr, "y")?,
        int(n_te, "y")?,
        int(tb, "y")?,
        i32::from(center),
    );
    let cfg = column_blocks(tb)?;
    {
        let (yp, _g1) = read_ptr(yb, stream);
        let (trp, _g2) = read_ptr(train, stream);
        let (tep, _g3) = read_ptr(test, stream);
        let (ytp, _g4) = write_ptr(&mut s.y_train, stream);
        let (ap, _g5) = write_ptr(&mut s.a_test, stream);
        let (tmp, _g6) = write_ptr(&mut s.train_mean, stream);
        let (temp, _g7) = write_ptr(&mut s.test_mean, stream);
        let (ssp, _g8) = write_ptr(&mut s.ss_tot, stream);
        // SAFETY: arguments match ridge_cv_split_*: yb holds [n, tb] with every row id < n, the
        // outputs [n_tr, tb], [n_te, tb] and tb values each.
        unsafe {
            stream
                .launch_builder(&kernels.split)
                .arg(&yp)
                .arg(&trp)
                .arg(&ntr)
                .arg(&tep)
                .arg(&nte)
                .arg(&tbi)
                .arg(&c)
                .arg(&ytp)
                .arg(&ap)
                .arg(&tmp)
                .arg(&temp)
                .arg(&ssp)
                .launch(cfg)?;
        }
    }
    Ok(s)
}

/// The eigenvalues of a decomposition on the device (f64).
fn upload_values(stream: &Arc<CudaStream>, values: &[f64]) -> Result<CudaSlice<f64>> {
    upload(stream, values)
}

/// One fold on the device: the held-out projection and what turns a target batch into Z.
struct DeviceFold<E> {
    primal: bool,
    rank: usize,
    n_tr: usize,
    n_te: usize,
    values: CudaSlice<f64>,
    /// X_te V (primal) or X_te Xᵀ U (dual): n_te × rank, column-major.
    proj: CudaSlice<E>,
    /// Primal: Vᵀ X_trᵀ (p × n_tr); dual: U (n_tr × n_tr). Z = this · Y_tr (transposed for the
    /// dual).
    to_z: CudaSlice<E>,
    train: CudaSlice<i32>,
    test: CudaSlice<i32>,
}

impl<E: CudaRidgeReal> DeviceFold<E> {
    fn new(
        la: &Linalg,
        params: &CvParams,
        p: usize,
        inputs: &CvInputs<'_, E>,
        train: &[usize],
        test: &[usize],
    ) -> Result<Self> {
        let stream = &la.stream;
        let (n_tr, n_te) = (train.len(), test.len());
        let x_mean = params.center.then(|| super::cv::means(inputs.x, p, train));
        // row-major [rows, p] = column-major Xᵀ (p × rows, ld p)
        let x_tr = upload(
            stream,
            &super::cv::rows_of(inputs.x, p, train, 0, p, x_mean.as_deref()),
        )?;
        let x_te = upload(
            stream,
            &super::cv::rows_of(inputs.x, p, test, 0, p, x_mean.as_deref()),
        )?;
        let primal = n_tr >= p;
        let rank = if primal { p } else { n_tr };
        let mut gram = stream.alloc_zeros::<E>(rank * rank)?;
        let mut proj = stream.alloc_zeros::<E>(n_te * rank)?;
        let (values, to_z) = if primal {
            // XᵀX = Xᵀ·(Xᵀ)ᵀ, then V; proj = X_te V; to_z = Vᵀ X_trᵀ
            la.gemm(
                (false, true),
                (p, p, n_tr),
                &x_tr,
                p,
                &x_tr,
                p,
                &mut gram,
                p,
            )?;
            let values = la.eigh(&mut gram, p, "training Gram matrix")?;
            la.gemm(
                (true, false),
                (n_te, p, p),
                &x_te,
                p,
                &gram,
                p,
                &mut proj,
                n_te,
            )?;
            let mut to_z = stream.alloc_zeros::<E>(p * n_tr)?;
            la.gemm(
                (true, false),
                (p, n_tr, p),
                &gram,
                p,
                &x_tr,
                p,
                &mut to_z,
                p,
            )?;
            (values, to_z)
        } else {
            // XXᵀ = (Xᵀ)ᵀ·Xᵀ, then U; proj = (X_te X_trᵀ) U; to_z = U
            la.gemm(
                (true, false),
                (n_tr, n_tr, p),
                &x_tr,
                p,
                &x_tr,
                p,
                &mut gram,
                n_tr,
            )?;
            let values = la.eigh(&mut gram, n_tr, "training kernel matrix")?;
            let mut cross = stream.alloc_zeros::<E>(n_te * n_tr)?;
            la.gemm(
                (true, false),
                (n_te, n_tr, p),
                &x_te,
                p,
                &x_tr,
                p,
                &mut cross,
                n_te,
            )?;
            la.gemm(
                (false, false),
                (n_te, n_tr, n_tr),
                &cross,
                n_te,
                &gram,
                n_tr,
                &mut proj,
                n_te,
            )?;
            (values, gram)
        };
        Ok(Self {
            primal,
            rank,
            n_tr,
            n_te,
            values: upload_values(stream, &values)?,
            proj,
            to_z,
            train: upload_rows(stream, train)?,
            test: upload_rows(stream, test)?,
        })
    }

    /// Z (rank × tb, column-major) of a split batch: Vᵀ X_trᵀ Y_tr or Uᵀ Y_tr.
    fn z(&self, la: &Linalg, split: &Split<E>, tb: usize) -> Result<CudaSlice<E>> {
        let mut z = la.stream.alloc_zeros::<E>(self.rank * tb)?;
        // y_train row-major [n_tr, tb] is column-major Y_trᵀ (tb × n_tr, ld tb)
        let rank = self.rank;
        if self.primal {
            la.gemm(
                (false, true),
                (rank, tb, self.n_tr),
                &self.to_z,
                rank,
                &split.y_train,
                tb,
                &mut z,
                rank,
            )?;
        } else {
            la.gemm(
                (true, true),
                (rank, tb, self.n_tr),
                &self.to_z,
                rank,
                &split.y_train,
                tb,
                &mut z,
                rank,
            )?;
        }
        Ok(z)
    }
}

/// Everything one `cv_host` call shares between its steps.
struct CvRun<'a, E> {
    la: Linalg,
    kernels: CvKernels,
    params: &'a CvParams,
    inputs: &'a CvInputs<'a, E>,
    n: usize,
    p: usize,
    t: usize,
}

impl<E: CudaRidgeReal> CvRun<'_, E> {
    fn stream(&self) -> &Arc<CudaStream> {
        &self.la.stream
    }

    /// Adds each alpha's held-out score of targets [t0, t0 + tb) of fold `fold` into
    /// `sums [A, t]`, which starts `base` values into its buffer.
    fn score_batch(
        &self,
        fold: &DeviceFold<E>,
        t0: usize,
        tb: usize,
        (sums, base): (&mut CudaSlice<f64>, usize),
    ) -> Result<()> {
        let rows_end = self.inputs.alphas.len() * self.t;
        if base
            .checked_add(rows_end)
            .is_none_or(|end| end > sums.len())
        {
            return Err(Error::Cuda(format!(
                "internal: score sums of {} values cannot hold [{base}, {base} + {rows_end})",
                sums.len()
            )));
        }
        let stream = self.stream();
        let yb = upload_batch(stream, self.inputs.y, self.n, self.t, t0, tb)?;
        let split = split_batch(
            stream,
            &self.kernels,
            &yb,
            (&fold.train, fold.n_tr),
            (&fold.test, fold.n_te),
            tb,
            self.params.center,
        )?;
        let z = fold.z(&self.la, &split, tb)?;
        let (n_te, rank) = (fold.n_te, fold.rank);
        let mut scaled = stream.alloc_zeros::<E>(n_te * rank)?;
        let mut pred = stream.alloc_zeros::<E>(n_te * tb)?;
        let (rows, cols) = (int(n_te, "x")?, int(rank, "x")?);
        let (ntei, tbi) = (int(n_te, "x")?, int(tb, "y")?);
        let use_offset = i32::from(self.params.center);
        let pearson = i32::from(self.params.score == CvScore::Pearson);
        for (a, alpha) in self.inputs.alphas.iter().enumerate() {
            let alpha = alpha.to_f64();
            {
                let (sp, _g1) = read_ptr(&fold.proj, stream);
                let (dp, _g2) = write_ptr(&mut scaled, stream);
                let (vp, _g3) = read_ptr(&fold.values, stream);
                // SAFETY: proj and scaled hold n_te × rank, values rank.
                unsafe {
                    stream
                        .launch_builder(&self.kernels.scale_cols)
                        .arg(&sp)
                        .arg(&dp)
                        .arg(&vp)
                        .arg(&alpha)
                        .arg(&rows)
                        .arg(&cols)
                        .launch(elementwise_config(n_te * rank))?;
                }
            }
            // predictions, row-major [n_te, tb] = column-major (tb × n_te) = Zᵀ · scaledᵀ
            self.la.gemm(
                (true, true),
                (tb, n_te, rank),
                &z,
                rank,
                &scaled,
                n_te,
                &mut pred,
                tb,
            )?;
            let offset = (base + a * self.t + t0) * std::mem::size_of::<f64>();
            let (pp, _g1) = read_ptr(&pred, stream);
            let (ap, _g2) = read_ptr(&split.a_test, stream);
            let (tmp, _g3) = read_ptr(&split.train_mean, stream);
            let (temp, _g4) = read_ptr(&split.test_mean, stream);
            let (ssp, _g5) = read_ptr(&split.ss_tot, stream);
            let (sums_p, _g6) = write_ptr(sums, stream);
            let row = sums_p + offset as u64;
            // SAFETY: pred and a_test hold [n_te, tb], the statistics tb values, and the
            // kernel adds into sums[base + a·t + t0 .. + tb) ⊂ [0, base + A·t), inside the
            // buffer (checked above).
            unsafe {
                stream
                    .launch_builder(&self.kernels.score)
                    .arg(&pp)
                    .arg(&ap)
                    .arg(&tmp)
                    .arg(&use_offset)
                    .arg(&temp)
                    .arg(&ssp)
                    .arg(&ntei)
                    .arg(&tbi)
                    .arg(&pearson)
                    .arg(&row)
                    .launch(column_blocks(tb)?)?;
            }
        }
        Ok(())
    }

    /// Refit on all rows with each target's alpha (`chosen [t]` on the device):
    /// (w [p, t], intercept [t]).
    fn refit(
        &self,
        chosen: &CudaSlice<f64>,
        progress: Option<&(dyn Fn(CvProgress) + Sync)>,
        n_folds: usize,
    ) -> Result<(Vec<E>, Vec<E>)> {
        let (n, p, t) = (self.n, self.p, self.t);
        let la = &self.la;
        let stream = self.stream();
        let all: Vec<usize> = (0..n).collect();
        let x_mean = self
            .params
            .center
            .then(|| super::cv::means(self.inputs.x, p, &all));
        let xc = upload(
            stream,
            &super::cv::rows_of(self.inputs.x, p, &all, 0, p, x_mean.as_deref()),
        )?;
        let primal = n >= p;
        let rank = if primal { p } else { n };
        let mut gram = stream.alloc_zeros::<E>(rank * rank)?;
        // W = back · (Z ∘ 1/(s + α_target)); Z = to_z · Y (primal) or Uᵀ Y (dual)
        let (values, to_z, back) = if primal {
            la.gemm((false, true), (p, p, n), &xc, p, &xc, p, &mut gram, p)?;
            let values = la.eigh(&mut gram, p, "Gram matrix of all rows")?;
            let mut to_z = stream.alloc_zeros::<E>(p * n)?;
            la.gemm((true, false), (p, n, p), &gram, p, &xc, p, &mut to_z, p)?;
            (values, to_z, gram)
        } else {
            la.gemm((true, false), (n, n, p), &xc, p, &xc, p, &mut gram, n)?;
            let values = la.eigh(&mut gram, n, "kernel matrix of all rows")?;
            let mut back = stream.alloc_zeros::<E>(p * n)?;
            la.gemm((false, false), (p, n, n), &xc, p, &gram, n, &mut back, p)?;
            (values, gram, back)
        };
        let values = upload_values(stream, &values)?;
        let rows = upload_rows(stream, &all)?;
        let no_rows = upload_rows(stream, &[])?;
        let mut w = vec![E::default(); p * t];
        let mut y_mean = vec![0.0f64; t];
        let batch = self.params.target_batch;
        let mut t0 = 0;
        while t0 < t {
            let tb = batch.min(t - t0);
            let yb = upload_batch(stream, self.inputs.y, n, t, t0, tb)?;
            let split = split_batch(
                stream,
                &self.kernels,
                &yb,
                (&rows, n),
                (&no_rows, 0),
                tb,
                self.params.center,
            )?;
            let mut z = stream.alloc_zeros::<E>(rank * tb)?;
            la.gemm(
                (!primal, true),
                (rank, tb, n),
                &to_z,
                rank,
                &split.y_train,
                tb,
                &mut z,
                rank,
            )?;
            self.kernels
                .scale_refit(stream, &mut z, &values, (chosen, t0), (rank, tb))?;
            // row-major [p, tb] = column-major (tb × p) = Zᵀ · backᵀ
            let mut wb = stream.alloc_zeros::<E>(p * tb)?;
            la.gemm((true, true), (tb, p, rank), &z, rank, &back, p, &mut wb, tb)?;
            let wb = stream.clone_dtoh(&wb)?;
            for r in 0..p {
                w[r * t + t0..r * t + t0 + tb].copy_from_slice(&wb[r * tb..(r + 1) * tb]);
            }
            let means = stream.clone_dtoh(&split.train_mean)?;
            y_mean[t0..t0 + tb].copy_from_slice(&means[..tb]);
            t0 += tb;
            if let Some(report) = progress {
                report(CvProgress {
                    fold: n_folds,
                    folds: n_folds,
                    targets_done: t0,
                    targets: t,
                });
            }
        }
        let intercept = super::cv::intercepts(x_mean.as_deref(), Some(&y_mean), &w, p, t);
        Ok((w, intercept))
    }
}

/// `ridge.cv` on the GPU, host in, host out, on the device's default stream: the same inputs,
/// checks, algorithm and outputs as the CPU [`super::cv()`] (agreement to the element type's
/// rounding; the products and decompositions are cuBLAS's and cuSOLVER's). y stays in host
/// memory and is copied one batch of `params.target_batch` targets at a time (once per fold
/// and once for the refit). Degenerate shapes with nothing to decompose (p = 0 or t = 0) run
/// the CPU path.
pub fn cv_host<E: CudaRidgeReal>(
    device: &Device,
    params: &CvParams,
    shape: super::RidgeShape,
    inputs: &CvInputs<'_, E>,
    progress: Option<&(dyn Fn(CvProgress) + Sync)>,
) -> Result<CvFit<E>> {
    let (n, p, t) = (shape.samples, shape.features, shape.targets);
    let fold_rows = super::cv::check_inputs(params, n, p, t, inputs)?;
    if p == 0 || t == 0 {
        return super::cv(params, shape, inputs, progress);
    }
    // every size the libraries and kernels see as i32
    int(n, "x")?;
    int(p, "x")?;
    int(params.target_batch.min(t), "y")?;
    let n_alphas = inputs.alphas.len();
    let a_len = int(n_alphas, "alphas")?;
    let n_folds = fold_rows.len();
    let stream = device.stream();
    let run = CvRun {
        la: Linalg::new(stream)?,
        kernels: CvKernels::load::<E>(device)?,
        params,
        inputs,
        n,
        p,
        t,
    };
    let mut sums = stream.alloc_zeros::<f64>(n_alphas * t)?;
    let batch = params.target_batch;
    for (f, test) in fold_rows.iter().enumerate() {
        let train: Vec<usize> = (0..n).filter(|i| inputs.folds[*i] as usize != f).collect();
        let fold = DeviceFold::new(&run.la, params, p, inputs, &train, test)?;
        let mut t0 = 0;
        while t0 < t {
            let tb = batch.min(t - t0);
            run.score_batch(&fold, t0, tb, (&mut sums, 0))?;
            t0 += tb;
            if let Some(report) = progress {
                report(CvProgress {
                    fold: f,
                    folds: n_folds,
                    targets_done: t0,
                    targets: t,
                });
            }
        }
    }
    // mean over folds and the best alpha of every target
    let alphas: Vec<f64> = inputs.alphas.iter().map(|a| a.to_f64()).collect();
    let alphas_d = upload(stream, &alphas)?;
    let mut cv_scores = stream.alloc_zeros::<E>(n_alphas * t)?;
    let mut best_alpha = stream.alloc_zeros::<E>(t)?;
    let mut chosen = stream.alloc_zeros::<f64>(t)?;
    {
        let (sp, _g1) = read_ptr(&sums, stream);
        let (ap, _g2) = read_ptr(&alphas_d, stream);
        let (cp, _g3) = write_ptr(&mut cv_scores, stream);
        let (bp, _g4) = write_ptr(&mut best_alpha, stream);
        let (chp, _g5) = write_ptr(&mut chosen, stream);
        let (tt, folds) = (i64_dim("y", "t (targets)", t)?, int(n_folds, "folds")?);
        // SAFETY: sums and cv_scores hold A·t values, alphas A, best_alpha and chosen t.
        unsafe {
            stream
                .launch_builder(&run.kernels.select)
                .arg(&sp)
                .arg(&ap)
                .arg(&a_len)
                .arg(&tt)
                .arg(&folds)
                .arg(&cp)
                .arg(&bp)
                .arg(&chp)
                .launch(elementwise_config(t))?;
        }
    }
    let (w, intercept) = run.refit(&chosen, progress, n_folds)?;
    Ok(CvFit {
        cv_scores: stream.clone_dtoh(&cv_scores)?,
        best_alpha: stream.clone_dtoh(&best_alpha)?,
        w,
        intercept,
    })
}
