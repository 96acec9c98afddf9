//! The attention family on the GPU (feature `cuda`): `attention.forward` (with the split-KV
//! decode), `attention.backward` and `attention.top_keys` (kernels/attention_fwd.cu,
//! kernels/attention_bwd.cu), in f32, f64, f16 and bf16, with every parameter of the
//! contract (causal and window masks, softcap, ALiBi, broadcast bias, GQA/MQA, cu_seqlens,
//! scale).
//!
//! The f16/bf16 forward with head dims up to 128 runs on tensor cores
//! (kernels/attention_fwd_tc.cu: mma.sync m16n8k16, the online softmax on the accumulator
//! registers, P packed to the input type for P·V); everything else (f32, f64, head dims
//! 192/256, the split-KV decode, the backward and top_keys) is SIMT. All accumulate in f32
//! (f64 for f64). Head dims
//! D and Dv up to 256 run on the instantiation for the next of 32, 64, 96, 128, 192, 256
//! (zero-padded); larger ones are `Err(Unsupported)`. top_keys keeps at most
//! [`NK_ATTN_MAX_TOP`] keys per query.
//!
//! Device-level entry points take device views and a stream (no host copies of the tensors);
//! `cu_seqlens` stay host slices (they are validated on the host and define the launch
//! grid) and are uploaded per call. The `_host` conveniences upload, run and download on the
//! device's default stream, with the CPU path's input checks.

use super::{
    AttentionGrads, AttentionInputs, AttentionParams, AttentionShape, CuSeqlens, InputLens,
    Segment, Sizes, SplitKv, check_backward_lens, check_top,
};
use crate::cuda::config::{
    NK_ATTN_BWD_KEYS, NK_ATTN_BWD_ROWS, NK_ATTN_DECODE_ROWS, NK_ATTN_FWD_ROWS, NK_ATTN_MAX_DIM,
    NK_ATTN_MAX_TOP, NK_ATTN_SPLIT_CHUNK, NK_ATTN_TC_MAX_DIM, NK_ATTN_TC_ROWS, NK_ATTN_THREADS,
    NK_ATTN_TOP_ROWS,
};
use crate::cuda::{CudaElement, Device, grid_x, grid_yz, i32_dim, read_ptr, scratch, write_ptr};
use crate::element::{Accum, DType};
use crate::error::{Error, Result, check_len};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use std::sync::Arc;

/// The head dims of the kernel instantiations.
const DIMS: [usize; 6] = [32, 64, 96, 128, 192, 256];

/// The additive bias on the device: `[Bb, Hb, Sq, Sk]`, Bb in {1, B}, Hb in {1, Hq}.
pub struct BiasView<'a, 'b, A> {
    /// `[Bb, Hb, Sq, Sk]`: the bias values, in the accumulator type.
    pub data: &'a CudaView<'b, A>,
    /// Bb: 1 (shared by every batch row) or B.
    pub batch: usize,
    /// Hb: 1 (shared by every query head) or Hq.
    pub heads: usize,
}

/// The device inputs of the attention ops. `v` is needed by forward and backward only.
pub struct AttentionViews<'a, 'b, E: CudaElement> {
    /// `[B, Sq, Hq, D]`: the queries.
    pub q: &'a CudaView<'b, E>,
    /// `[B, Sk, Hk, D]`: the keys.
    pub k: &'a CudaView<'b, E>,
    /// `[B, Sk, Hk, Dv]`: the values; required by forward and backward, unused by `top_keys`.
    pub v: Option<&'a CudaView<'b, E>>,
    /// `[Hq]`, accumulator type: ALiBi slopes, `s -= slope[h]·|i + Sk − Sq − j|`.
    pub alibi_slopes: Option<&'a CudaView<'b, E::Acc>>,
    /// Additive score bias `[Bb, Hb, Sq, Sk]`, accumulator type.
    pub bias: Option<BiasView<'a, 'b, E::Acc>>,
    /// Host offsets of the packed sequences (B = 1).
    pub cu_seqlens: Option<CuSeqlens<'a>>,
}

impl<E: CudaElement> AttentionViews<'_, '_, E> {
    fn lens(&self) -> InputLens {
        InputLens {
            q: self.q.len(),
            k: self.k.len(),
            v: self.v.map_or(0, |v| v.len()),
            alibi_slopes: self.alibi_slopes.map(|s| s.len()),
            bias: self.bias.as_ref().map(|b| (b.data.len(), b.batch, b.heads)),
        }
    }

    fn validate(
        &self,
        params: &AttentionParams,
        shape: &AttentionShape,
        with_v: bool,
    ) -> Result<(Sizes, Vec<Segment>)> {
        if with_v && self.v.is_none() {
            return Err(Error::invalid("v", "forward and backward need the values"));
        }
        super::check_params_fit::<E::Acc>(params)?;
        self.lens().validate(params, shape, self.cu_seqlens, with_v)
    }
}

/// The kernel instantiation (padded head dim) for D and Dv.
fn kernel_dim(shape: &AttentionShape) -> Result<usize> {
    let need = shape.head_dim.max(shape.value_dim);
    DIMS.iter().copied().find(|&d| d >= need).ok_or_else(|| {
        Error::Unsupported(format!(
            "attention on CUDA with head dims D = {}, Dv = {} (at most {NK_ATTN_MAX_DIM})",
            shape.head_dim, shape.value_dim
        ))
    })
}

/// The dims as the kernels' `int` arguments, and the instantiation's padded head dim.
struct KernelDims {
    dmax: usize,
    batch: i32,
    len_q: i32,
    len_k: i32,
    heads_q: i32,
    heads_kv: i32,
    d: i32,
    dv: i32,
}

/// `shape` within the kernels' limits, checked before anything is uploaded, allocated or
/// launched: D and Dv within an instantiation (`Err(Unsupported)`); B, Sq, Sk, Hq, Hk as
/// `int`s of at most [`MAX_I32_EXTENT`](crate::cuda::MAX_I32_EXTENT) (the kernels' row and
/// key counters are `int` and step up to one tile past Sq and Sk; their offsets are 64-bit);
/// Hq and B (the sequences without cu_seqlens) at most 65535, grid y and z.
/// `Err(Overflow)` naming `q`, `k` or `v` past them.
fn kernel_dims(shape: &AttentionShape) -> Result<KernelDims> {
    let s = shape;
    let dims = KernelDims {
        dmax: kernel_dim(s)?,
        batch: i32_dim("q", "B", s.batch)?,
        len_q: i32_dim("q", "Sq", s.len_q)?,
        len_k: i32_dim("k", "Sk", s.len_k)?,
        heads_q: i32_dim("q", "Hq", s.heads_q)?,
        heads_kv: i32_dim("k", "Hk", s.heads_kv)?,
        d: i32_dim("q", "D", s.head_dim)?,
        dv: i32_dim("v", "Dv", s.value_dim)?,
    };
    grid_yz("q", "Hq (query heads)", s.heads_q)?;
    grid_yz("q", "B (batch)", s.batch)?;
    Ok(dims)
}

/// The scalar arguments every score kernel shares.
struct Launch {
    /// The dims as `int`s, checked by [`kernel_dims`].
    dims: KernelDims,
    causal: i32,
    window_left: i64,
    window_right: i64,
    /// The most query and key rows of one sequence, and the number of sequences.
    max_q: usize,
    max_k: usize,
    sequences: usize,
}

impl Launch {
    fn new(params: &AttentionParams, shape: &AttentionShape, segments: &[Segment]) -> Result<Self> {
        let s = shape;
        // a window past Sq + Sk sees what an unbounded one does: clamped, no sum overflows
        let reach = (s.len_q as i64).saturating_add(s.len_k as i64);
        let window = |w: i64| if w < 0 { -1 } else { w.min(reach) };
        Ok(Launch {
            dims: kernel_dims(s)?,
            causal: params.causal as i32,
            window_left: window(params.window_left),
            window_right: window(params.window_right),
            max_q: segments.iter().map(|g| g.q_len).max().unwrap_or(0),
            max_k: segments.iter().map(|g| g.k_len).max().unwrap_or(0),
            sequences: segments.len(),
        })
    }

    /// Grid (x blocks, heads, sequences), or None when it is empty.
    fn grid(&self, x: usize, heads: usize, tensor: &str) -> Result<Option<(u32, u32, u32)>> {
        if x == 0 || heads == 0 || self.sequences == 0 {
            return Ok(None);
        }
        Ok(Some((
            grid_x(tensor, "row or key tiles", x)?,
            grid_yz(tensor, "heads", heads)?,
            // one grid layer per sequence (batch entry or cu_seqlens_q piece)
            grid_yz("q", "sequences", self.sequences)?,
        )))
    }
}

fn config(grid: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (NK_ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The optional inputs as device addresses (0 = absent), with the guards of their reads.
struct Optionals<'a> {
    slopes: u64,
    bias: u64,
    bias_batch: i32,
    bias_heads: i32,
    cu_q: u64,
    cu_k: u64,
    _guards: Vec<cudarc::driver::SyncOnDrop<'a>>,
}

/// cu_seqlens on the device (validated on the host first).
type DeviceCu = Option<(CudaSlice<i32>, CudaSlice<i32>)>;

fn upload_cu(stream: &Arc<CudaStream>, cu: Option<CuSeqlens<'_>>) -> Result<DeviceCu> {
    match cu {
        Some(cu) => Ok(Some((upload(stream, cu.q)?, upload(stream, cu.k)?))),
        None => Ok(None),
    }
}

fn optionals<'a, E: CudaElement>(
    stream: &'a Arc<CudaStream>,
    inputs: &'a AttentionViews<'_, '_, E>,
    cu: &'a DeviceCu,
) -> Optionals<'a> {
    let mut guards = Vec::new();
    let mut ptr = |p: Option<(u64, cudarc::driver::SyncOnDrop<'a>)>| match p {
        Some((p, g)) => {
            guards.push(g);
            p
        }
        None => 0,
    };
    let slopes = ptr(inputs.alibi_slopes.map(|s| read_ptr(s, stream)));
    let bias = ptr(inputs.bias.as_ref().map(|b| read_ptr(b.data, stream)));
    let cu_q = ptr(cu.as_ref().map(|(q, _)| read_ptr(q, stream)));
    let cu_k = ptr(cu.as_ref().map(|(_, k)| read_ptr(k, stream)));
    // Bb, Hb in {1, B}, {1, Hq}: validated, and B, Hq fit i32 (Launch::new)
    let (bias_batch, bias_heads) = inputs
        .bias
        .as_ref()
        .map_or((1, 1), |b| (b.batch as i32, b.heads as i32));
    Optionals {
        slopes,
        bias,
        bias_batch,
        bias_heads,
        cu_q,
        cu_k,
        _guards: guards,
    }
}

/// `attention.forward` on the device: `o [B, Sq, Hq, Dv]` and `lse [B, Hq, Sq]` (see
/// [`super::forward`]). The split-KV decode runs where the CPU would run it
/// ([`SplitKv::Auto`]: at most NK_ATTN_DECODE_ROWS query rows per KV head and a sequence of at
/// least two chunks of NK_ATTN_SPLIT_CHUNK keys).
pub fn forward<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionViews<'_, '_, E>,
    o: &mut impl DevicePtrMut<E>,
    lse: &mut impl DevicePtrMut<E::Acc>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (sizes, segments) = inputs.validate(params, &shape, true)?;
    let s = shape;
    check_len(
        "o",
        o.len(),
        sizes.o,
        &format!("[{}, {}, {}, {}]", s.batch, s.len_q, s.heads_q, s.value_dim),
    )?;
    check_len(
        "lse",
        lse.len(),
        sizes.lse,
        &format!("[{}, {}, {}]", s.batch, s.heads_q, s.len_q),
    )?;
    let launch = Launch::new(params, &shape, &segments)?;
    if sizes.lse == 0 {
        return Ok(());
    }
    let chunk = NK_ATTN_SPLIT_CHUNK as usize;
    let g = shape.group();
    let split = match params.split_kv {
        SplitKv::Always => true,
        SplitKv::Never => false,
        SplitKv::Auto => {
            segments
                .iter()
                .all(|s| s.q_len * g <= NK_ATTN_DECODE_ROWS as usize)
                && segments.iter().any(|s| s.k_len >= 2 * chunk)
        }
    };
    let n_chunks = if split {
        launch.max_k.div_ceil(chunk).max(1)
    } else {
        1
    };
    // f16/bf16 on tensor cores (head dims up to NK_ATTN_TC_MAX_DIM, not the split-KV decode)
    let tensor = matches!(E::DTYPE, DType::F16 | DType::BF16)
        && n_chunks == 1
        && launch.dims.dmax <= NK_ATTN_TC_MAX_DIM as usize;
    let rows = if tensor {
        NK_ATTN_TC_ROWS
    } else {
        NK_ATTN_FWD_ROWS
    };
    let tiles = launch.max_q.div_ceil(rows as usize);
    let Some(grid) = launch.grid(
        tiles
            .checked_mul(n_chunks)
            .ok_or_else(|| Error::overflow("k", "split-KV grid"))?,
        shape.heads_q,
        "q",
    )?
    else {
        return Ok(());
    };
    // the chunks' partial results: O [n_chunks, B·Sq, Hq, Dv] and (m, l)
    let (mut part_o, mut part_ml) = if n_chunks > 1 {
        let over = || Error::overflow("o", format!("{n_chunks} split-KV chunks of {shape:?}"));
        let po = n_chunks.checked_mul(sizes.o).ok_or_else(over)?;
        let pm = n_chunks
            .checked_mul(sizes.lse)
            .and_then(|n| n.checked_mul(2))
            .ok_or_else(over)?;
        (
            Some(scratch::<E::Acc>(stream, po)?),
            Some(scratch::<E::Acc>(stream, pm)?),
        )
    } else {
        (None, None)
    };
    let cu = upload_cu(stream, inputs.cu_seqlens)?;
    let opt = optionals(stream, inputs, &cu);
    let f = if tensor {
        device.function(
            "attention_fwd_tc",
            &format!("attn_fwd_tc_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?
    } else {
        device.function(
            "attention_fwd",
            &format!("attn_fwd_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?
    };
    let scale = E::Acc::from_f64(shape.scale(params));
    let softcap = E::Acc::from_f64(params.softcap);
    let batch = launch.dims.batch;
    let chunks = i32_dim("k", "split-KV chunks", n_chunks)?;
    let (qp, _g1) = read_ptr(inputs.q, stream);
    let (kp, _g2) = read_ptr(inputs.k, stream);
    let v = inputs.v.ok_or_else(|| Error::invalid("v", "missing"))?;
    let (vp, _g3) = read_ptr(v, stream);
    let (op, _g4) = write_ptr(o, stream);
    let (lp, _g5) = write_ptr(lse, stream);
    let po = part_o.as_mut().map(|p| write_ptr(p, stream));
    let pm = part_ml.as_mut().map(|p| write_ptr(p, stream));
    let (pop, pmp) = (
        po.as_ref().map_or(0, |(p, _)| *p),
        pm.as_ref().map_or(0, |(p, _)| *p),
    );
    let mut b = stream.launch_builder(&f);
    b.arg(&qp)
        .arg(&kp)
        .arg(&vp)
        .arg(&opt.slopes)
        .arg(&opt.bias)
        .arg(&opt.bias_batch)
        .arg(&opt.bias_heads)
        .arg(&opt.cu_q)
        .arg(&opt.cu_k)
        .arg(&op)
        .arg(&lp)
        .arg(&pop)
        .arg(&pmp)
        .arg(&batch)
        .arg(&launch.dims.len_q)
        .arg(&launch.dims.len_k)
        .arg(&launch.dims.heads_q)
        .arg(&launch.dims.heads_kv)
        .arg(&launch.dims.d)
        .arg(&launch.dims.dv)
        .arg(&scale)
        .arg(&softcap)
        .arg(&launch.causal)
        .arg(&launch.window_left)
        .arg(&launch.window_right)
        .arg(&chunks);
    // SAFETY: arguments match attn_fwd_d*_* in kernels/attention_fwd.cu (and attn_fwd_tc_d*_*
    // in kernels/attention_fwd_tc.cu, the same list); every view holds the
    // validated element count, cu_seqlens were checked (monotone, ending at Sq and Sk), the
    // head dims fit the instantiation, and the partial buffers hold n_chunks rows each.
    unsafe { b.launch(config(grid))? };
    if n_chunks > 1 {
        let rows = shape.batch * shape.len_q;
        let merge = device.function("attention_fwd", &format!("attn_merge_{}", E::SUFFIX))?;
        let mgrid = (
            grid_x("q", "B·Sq", rows)?,
            grid_yz("q", "Hq (query heads)", shape.heads_q)?,
            1,
        );
        let mut b = stream.launch_builder(&merge);
        b.arg(&pop)
            .arg(&pmp)
            .arg(&op)
            .arg(&lp)
            .arg(&batch)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.dv)
            .arg(&chunks);
        // SAFETY: arguments match attn_merge_* in kernels/attention_fwd.cu; the partial
        // buffers were filled for every (chunk, row, head) by the launch above.
        unsafe { b.launch(config(mgrid))? };
    }
    Ok(())
}

/// `attention.backward` on the device from the forward's `o`, its `lse` and the upstream
/// `do`: `dq`, `dk`, `dv` with the shapes of q, k, v (see [`super::backward`]). No atomics:
/// the bits do not depend on scheduling.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionViews<'_, '_, E>,
    o: &CudaView<'_, E>,
    d_o: &CudaView<'_, E>,
    lse: &CudaView<'_, E::Acc>,
    dq: &mut impl DevicePtrMut<E>,
    dk: &mut impl DevicePtrMut<E>,
    dv: &mut impl DevicePtrMut<E>,
) -> Result<()> {
    device.check_stream(stream)?;
    let (sizes, segments) = inputs.validate(params, &shape, true)?;
    let s = shape;
    check_backward_lens(&s, sizes, o.len(), d_o.len(), lse.len())?;
    check_len(
        "dq",
        dq.len(),
        sizes.q,
        &format!("[{}, {}, {}, {}]", s.batch, s.len_q, s.heads_q, s.head_dim),
    )?;
    check_len(
        "dk",
        dk.len(),
        sizes.k,
        &format!("[{}, {}, {}, {}]", s.batch, s.len_k, s.heads_kv, s.head_dim),
    )?;
    check_len(
        "dv",
        dv.len(),
        sizes.v,
        &format!(
            "[{}, {}, {}, {}]",
            s.batch, s.len_k, s.heads_kv, s.value_dim
        ),
    )?;
    let launch = Launch::new(params, &shape, &segments)?;
    let cu = upload_cu(stream, inputs.cu_seqlens)?;
    let opt = optionals(stream, inputs, &cu);
    let scale = E::Acc::from_f64(shape.scale(params));
    let softcap = E::Acc::from_f64(params.softcap);
    let v = inputs.v.ok_or_else(|| Error::invalid("v", "missing"))?;
    let mut dsum = scratch::<E::Acc>(stream, sizes.lse)?;
    let (qp, _g1) = read_ptr(inputs.q, stream);
    let (kp, _g2) = read_ptr(inputs.k, stream);
    let (vp, _g3) = read_ptr(v, stream);
    let (op, _g4) = read_ptr(o, stream);
    let (dop, _g5) = read_ptr(d_o, stream);
    let (lp, _g6) = read_ptr(lse, stream);
    let (dsp, _g7) = write_ptr(&mut dsum, stream);
    let (dqp, _g8) = write_ptr(dq, stream);
    let (dkp, _g9) = write_ptr(dk, stream);
    let (dvp, _g10) = write_ptr(dv, stream);

    // 1. D = rowsum(dO ∘ O)
    if sizes.lse > 0 {
        let f = device.function("attention_bwd", &format!("attn_bwd_dot_{}", E::SUFFIX))?;
        let pairs = sizes.lse as i64;
        let warps = (NK_ATTN_THREADS / 32) as usize;
        let grid = (grid_x("q", "B·Hq·Sq", sizes.lse.div_ceil(warps))?, 1, 1);
        let mut b = stream.launch_builder(&f);
        b.arg(&op)
            .arg(&dop)
            .arg(&dsp)
            .arg(&pairs)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.dv);
        // SAFETY: arguments match attn_bwd_dot_* in kernels/attention_bwd.cu; o and do hold
        // B·Sq·Hq·Dv elements and dsum B·Hq·Sq.
        unsafe { b.launch(config(grid))? };
    }
    // 2. dK, dV per key tile over the query heads of each KV head's group
    if let Some(grid) = launch.grid(
        launch.max_k.div_ceil(NK_ATTN_BWD_KEYS as usize),
        shape.heads_kv,
        "k",
    )? {
        let f = device.function(
            "attention_bwd",
            &format!("attn_bwd_dkdv_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&dop)
            .arg(&lp)
            .arg(&dsp)
            .arg(&opt.slopes)
            .arg(&opt.bias)
            .arg(&opt.bias_batch)
            .arg(&opt.bias_heads)
            .arg(&opt.cu_q)
            .arg(&opt.cu_k)
            .arg(&dkp)
            .arg(&dvp)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.len_k)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.heads_kv)
            .arg(&launch.dims.d)
            .arg(&launch.dims.dv)
            .arg(&scale)
            .arg(&softcap)
            .arg(&launch.causal)
            .arg(&launch.window_left)
            .arg(&launch.window_right);
        // SAFETY: arguments match attn_bwd_dkdv_d*_* in kernels/attention_bwd.cu; lengths
        // validated above, cu_seqlens checked, head dims fit the instantiation.
        unsafe { b.launch(config(grid))? };
    }
    // 3. dQ per query tile
    if let Some(grid) = launch.grid(
        launch.max_q.div_ceil(NK_ATTN_BWD_ROWS as usize),
        shape.heads_q,
        "q",
    )? {
        let f = device.function(
            "attention_bwd",
            &format!("attn_bwd_dq_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&vp)
            .arg(&dop)
            .arg(&lp)
            .arg(&dsp)
            .arg(&opt.slopes)
            .arg(&opt.bias)
            .arg(&opt.bias_batch)
            .arg(&opt.bias_heads)
            .arg(&opt.cu_q)
            .arg(&opt.cu_k)
            .arg(&dqp)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.len_k)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.heads_kv)
            .arg(&launch.dims.d)
            .arg(&launch.dims.dv)
            .arg(&scale)
            .arg(&softcap)
            .arg(&launch.causal)
            .arg(&launch.window_left)
            .arg(&launch.window_right);
        // SAFETY: arguments match attn_bwd_dq_d*_* in kernels/attention_bwd.cu; as above.
        unsafe { b.launch(config(grid))? };
    }
    Ok(())
}

/// `attention.top_keys` on the device: `weights [B, Hq, Sq, top]` (exact softmax
/// probabilities, descending, ties to the lower key) and `indices` (key positions along the S
/// axis of k; −1 with weight 0 past a row's visible keys). `top` ≤ [`NK_ATTN_MAX_TOP`];
/// `inputs.v` is not read.
#[allow(clippy::too_many_arguments)]
pub fn top_keys<E: CudaElement>(
    device: &Device,
    stream: &Arc<CudaStream>,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionViews<'_, '_, E>,
    top: usize,
    weights: &mut impl DevicePtrMut<E::Acc>,
    indices: &mut impl DevicePtrMut<i32>,
) -> Result<()> {
    device.check_stream(stream)?;
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
    if top > NK_ATTN_MAX_TOP as usize {
        return Err(Error::Unsupported(format!(
            "attention.top_keys on CUDA with top = {top} (at most {NK_ATTN_MAX_TOP})"
        )));
    }
    let s = shape;
    let dims = format!("[{}, {}, {}, {top}]", s.batch, s.heads_q, s.len_q);
    check_len("weights", weights.len(), out, &dims)?;
    check_len("indices", indices.len(), out, &dims)?;
    let launch = Launch::new(params, &shape, &segments)?;
    if out == 0 {
        return Ok(());
    }
    let cu = upload_cu(stream, inputs.cu_seqlens)?;
    let opt = optionals(stream, inputs, &cu);
    let scale = E::Acc::from_f64(shape.scale(params));
    let softcap = E::Acc::from_f64(params.softcap);
    let mut lse = scratch::<E::Acc>(stream, sizes.lse)?;
    let (qp, _g1) = read_ptr(inputs.q, stream);
    let (kp, _g2) = read_ptr(inputs.k, stream);
    let (lp, _g3) = write_ptr(&mut lse, stream);
    let (wp, _g4) = write_ptr(weights, stream);
    let (ip, _g5) = write_ptr(indices, stream);
    let null = 0u64;
    let (batch, one) = (launch.dims.batch, 1i32);

    // pass 1: the forward without values (Dv = 0) gives lse
    let tiles = launch.max_q.div_ceil(NK_ATTN_FWD_ROWS as usize);
    if let Some(grid) = launch.grid(tiles, shape.heads_q, "q")? {
        let f = device.function(
            "attention_fwd",
            &format!("attn_fwd_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&null)
            .arg(&opt.slopes)
            .arg(&opt.bias)
            .arg(&opt.bias_batch)
            .arg(&opt.bias_heads)
            .arg(&opt.cu_q)
            .arg(&opt.cu_k)
            .arg(&null)
            .arg(&lp)
            .arg(&null)
            .arg(&null)
            .arg(&batch)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.len_k)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.heads_kv)
            .arg(&launch.dims.d)
            .arg(&launch.dims.dv)
            .arg(&scale)
            .arg(&softcap)
            .arg(&launch.causal)
            .arg(&launch.window_left)
            .arg(&launch.window_right)
            .arg(&one);
        // SAFETY: arguments match attn_fwd_d*_*; with Dv = 0 and one chunk the kernel reads
        // neither v nor the partial buffers and writes only lse (B·Hq·Sq elements).
        unsafe { b.launch(config(grid))? };
    }
    // pass 2: the top keys of each row against that lse
    let rows = launch.max_q.div_ceil(NK_ATTN_TOP_ROWS as usize);
    if let Some(grid) = launch.grid(rows, shape.heads_q, "q")? {
        let f = device.function(
            "attention_fwd",
            &format!("attn_top_keys_d{}_{}", launch.dims.dmax, E::SUFFIX),
        )?;
        let top_i = i32_dim("top", "top", top)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&qp)
            .arg(&kp)
            .arg(&opt.slopes)
            .arg(&opt.bias)
            .arg(&opt.bias_batch)
            .arg(&opt.bias_heads)
            .arg(&opt.cu_q)
            .arg(&opt.cu_k)
            .arg(&lp)
            .arg(&wp)
            .arg(&ip)
            .arg(&launch.dims.len_q)
            .arg(&launch.dims.len_k)
            .arg(&launch.dims.heads_q)
            .arg(&launch.dims.heads_kv)
            .arg(&launch.dims.d)
            .arg(&scale)
            .arg(&softcap)
            .arg(&launch.causal)
            .arg(&launch.window_left)
            .arg(&launch.window_right)
            .arg(&top_i);
        // SAFETY: arguments match attn_top_keys_d*_*; weights and indices hold B·Hq·Sq·top
        // elements, top ≤ NK_ATTN_MAX_TOP fits the per-warp lists.
        unsafe { b.launch(config(grid))? };
    }
    Ok(())
}

/// Uploads a host slice (one zero element for an empty one: no empty device allocation).
fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    v: &[T],
) -> Result<CudaSlice<T>> {
    if v.is_empty() {
        Ok(stream.alloc_zeros::<T>(1)?)
    } else {
        Ok(stream.clone_htod(v)?)
    }
}

/// Host inputs on the device, and views of them.
struct Uploaded<E: CudaElement> {
    q: CudaSlice<E>,
    k: CudaSlice<E>,
    v: CudaSlice<E>,
    slopes: Option<CudaSlice<E::Acc>>,
    bias: Option<CudaSlice<E::Acc>>,
    lens: (usize, usize, usize, usize, usize),
}

impl<E: CudaElement> Uploaded<E> {
    fn new(stream: &Arc<CudaStream>, inputs: &AttentionInputs<'_, E>) -> Result<Self> {
        Ok(Uploaded {
            q: upload(stream, inputs.q)?,
            k: upload(stream, inputs.k)?,
            v: upload(stream, inputs.v)?,
            slopes: inputs.alibi_slopes.map(|s| upload(stream, s)).transpose()?,
            bias: inputs.bias.map(|b| upload(stream, b.data)).transpose()?,
            lens: (
                inputs.q.len(),
                inputs.k.len(),
                inputs.v.len(),
                inputs.alibi_slopes.map_or(0, <[_]>::len),
                inputs.bias.map_or(0, |b| b.data.len()),
            ),
        })
    }

    /// Runs `f` on views of the uploads.
    fn with_views<R>(
        &self,
        inputs: &AttentionInputs<'_, E>,
        f: impl FnOnce(&AttentionViews<'_, '_, E>) -> Result<R>,
    ) -> Result<R> {
        let (nq, nk, nv, ns, nb) = self.lens;
        let q = self.q.slice(0..nq);
        let k = self.k.slice(0..nk);
        let v = self.v.slice(0..nv);
        let slopes = self.slopes.as_ref().map(|s| s.slice(0..ns));
        let bias = self.bias.as_ref().map(|b| b.slice(0..nb));
        let views = AttentionViews {
            q: &q,
            k: &k,
            v: Some(&v),
            alibi_slopes: slopes.as_ref(),
            bias: bias.as_ref().zip(inputs.bias).map(|(data, b)| BiasView {
                data,
                batch: b.batch,
                heads: b.heads,
            }),
            cu_seqlens: inputs.cu_seqlens,
        };
        f(&views)
    }
}

fn download<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    x: &CudaSlice<T>,
    len: usize,
) -> Result<Vec<T>> {
    let mut out = stream.clone_dtoh(x)?;
    out.truncate(len);
    Ok(out)
}

/// [`forward`] with host slices, on the device's default stream.
pub fn forward_host<E: CudaElement>(
    device: &Device,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
) -> Result<super::AttentionOut<E>> {
    // checked here too: the uploads below are sized by these lengths
    let (sizes, _) = inputs.validate(params, &shape, true)?;
    kernel_dims(&shape)?;
    let stream = device.stream();
    let up = Uploaded::new(stream, inputs)?;
    let mut o = stream.alloc_zeros::<E>(sizes.o.max(1))?;
    let mut lse = stream.alloc_zeros::<E::Acc>(sizes.lse.max(1))?;
    up.with_views(inputs, |views| {
        forward(
            device,
            stream,
            params,
            shape,
            views,
            &mut o.slice_mut(0..sizes.o),
            &mut lse.slice_mut(0..sizes.lse),
        )
    })?;
    Ok(super::AttentionOut {
        o: download(stream, &o, sizes.o)?,
        lse: download(stream, &lse, sizes.lse)?,
    })
}

/// [`backward`] with host slices, on the device's default stream.
pub fn backward_host<E: CudaElement>(
    device: &Device,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    o: &[E],
    d_o: &[E],
    lse: &[E::Acc],
) -> Result<AttentionGrads<E>> {
    let (sizes, _) = inputs.validate(params, &shape, true)?;
    check_backward_lens(&shape, sizes, o.len(), d_o.len(), lse.len())?;
    kernel_dims(&shape)?;
    let stream = device.stream();
    let up = Uploaded::new(stream, inputs)?;
    let (od, dod, ld) = (
        upload(stream, o)?,
        upload(stream, d_o)?,
        upload(stream, lse)?,
    );
    let mut dq = stream.alloc_zeros::<E>(sizes.q.max(1))?;
    let mut dk = stream.alloc_zeros::<E>(sizes.k.max(1))?;
    let mut dv = stream.alloc_zeros::<E>(sizes.v.max(1))?;
    up.with_views(inputs, |views| {
        backward(
            device,
            stream,
            params,
            shape,
            views,
            &od.slice(0..o.len()),
            &dod.slice(0..d_o.len()),
            &ld.slice(0..lse.len()),
            &mut dq.slice_mut(0..sizes.q),
            &mut dk.slice_mut(0..sizes.k),
            &mut dv.slice_mut(0..sizes.v),
        )
    })?;
    Ok(AttentionGrads {
        dq: download(stream, &dq, sizes.q)?,
        dk: download(stream, &dk, sizes.k)?,
        dv: download(stream, &dv, sizes.v)?,
    })
}

/// [`top_keys`] with host slices, on the device's default stream.
pub fn top_keys_host<E: CudaElement>(
    device: &Device,
    params: &AttentionParams,
    shape: AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    top: usize,
) -> Result<super::TopKeys<E::Acc>> {
    let shape = AttentionShape {
        value_dim: 0,
        ..shape
    };
    let (sizes, _) = inputs.validate(params, &shape, false)?;
    let out = check_top(
        &shape,
        sizes,
        top,
        inputs.q.len().saturating_add(inputs.k.len()),
    )?;
    kernel_dims(&shape)?;
    let stream = device.stream();
    let up = Uploaded::new(stream, inputs)?;
    let mut w = stream.alloc_zeros::<E::Acc>(out.max(1))?;
    let mut i = stream.alloc_zeros::<i32>(out.max(1))?;
    up.with_views(inputs, |views| {
        top_keys(
            device,
            stream,
            params,
            shape,
            views,
            top,
            &mut w.slice_mut(0..out),
            &mut i.slice_mut(0..out),
        )
    })?;
    Ok(super::TopKeys {
        weights: download(stream, &w, out)?,
        indices: download(stream, &i, out)?,
    })
}
