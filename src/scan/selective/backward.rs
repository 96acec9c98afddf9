//! `scan.selective_backward` on the CPU: the gradients of Σ y·dy (no gradient flows into
//! h_last).
//!
//! Kernel plan: tasks are (batch, block of [`BLOCK`] channels) with the forward's layout:
//! states, A and the running sums as `[n][w]` rows, vectors across channels, Bm\[t,n\] and
//! Cm\[t,n\] broadcast. A task runs its forward once, keeping the state every [`CHUNK`]
//! steps, then takes the chunks in reverse: it re-runs a chunk from its checkpoint, keeping
//! the chunk's states and decays (2·CHUNK·N·w accumulators, an L2-sized block), and walks
//! its steps back:
//! gx\[t\] = Cm\[t\]·dy'\[t\] + exp(dt\[t+1\]·A)·gx\[t+1\] with dy' = dy·silu(z) (dy without z).
//! The walk takes four channel vectors at a time, so each state's dCm and dBm lane sums stay
//! in registers across them (one load and store per state and four vectors, not per vector).
//!
//! Memory: a block's row segments of delta, u, dy and z are a whole row of D apart per step,
//! a stride the hardware prefetchers do not follow, and each chunk's rows come from memory
//! (twice: the forward pass, then the reverse one). So every step of a chunk prefetches the
//! same step's rows of the chunk to be loaded next (the following one in the forward pass,
//! the preceding one while re-running in the reverse pass), and the rows are read and the
//! du, ddelta and dz rows written with vector loads and stores (widening and rounding per
//! dtype). Before this the loads' cache misses were over half the kernel's time.
//! Two exponentials per (step, channel, state) against the forward's one; what remains is
//! those, the reverse walk's loads and stores (L1/L2), the input rows' memory traffic and
//! the first-touch page faults of the fresh gradient outputs.
//!
//! Sums over channels (dBm, dCm) are taken per task (in lanes, channel vector by channel
//! vector, then the lanes folded in a fixed order) and then over tasks in task order; sums
//! over time (dA, dDskip, ddelta_bias) per task, then over batch in task order. The blocks
//! do not depend on the thread count, so neither do the results.

use super::{SelectiveInputs, SelectiveParams, SelectiveShape, softplus, vsoftplus};
use crate::cpu::{Isa, SendPtr, Simd, SimdKernel, dispatch, prefetch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result};
use crate::scan::check_len;
use rayon::prelude::*;

/// Gradients of `scan.selective`: `None` where the input was not given.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SelectiveGrads<E: Element> {
    /// `[B, T, D]`: the gradient of `u`.
    pub du: Vec<E>,
    /// `[B, T, D]`: the gradient of `delta`.
    pub ddelta: Vec<E>,
    /// `[D, N]`, accumulator type: the gradient of `a` (A).
    pub da: Vec<E::Acc>,
    /// `[B, T, N]`: the gradient of `bm`.
    pub dbm: Vec<E>,
    /// `[B, T, N]`: the gradient of `cm`.
    pub dcm: Vec<E>,
    /// `[D]`, accumulator type: the gradient of `dskip`, where it was given.
    pub ddskip: Option<Vec<E::Acc>>,
    /// `[B, T, D]`: the gradient of `z`, where it was given.
    pub dz: Option<Vec<E>>,
    /// `[D]`, accumulator type: the gradient of `delta_bias`, where it was given.
    pub ddelta_bias: Option<Vec<E::Acc>>,
    /// `[B, D, N]`, accumulator type: the gradient of `h0`, where it was given.
    pub dh0: Option<Vec<E::Acc>>,
}

/// Channels per task, whatever the thread count (the reductions' order depends on it).
/// A chunk's states and decays take 2·CHUNK·N·BLOCK accumulators: 256 KiB at N = 16 in f32.
const BLOCK: usize = 64;
/// Steps between checkpoints, and so the steps re-run and kept at once.
const CHUNK: usize = 32;

/// `scan.selective_backward` on the CPU: the gradients of Σ y·dy (no gradient flows into
/// h_last). Each (batch, channel block) re-runs its forward in chunks from stored states and
/// walks them in reverse: gx\[t\] = Cm\[t\]·dy'\[t\] + exp(dt\[t+1\]·A)·gx\[t+1\] with
/// dy' = dy·silu(z) (dy without z). Sums over channels (dBm, dCm) and over batch and time
/// (dA, dDskip, ddelta_bias) are taken in a fixed order: the result does not depend on the
/// thread count.
pub fn selective_backward<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    dy: &[E],
) -> Result<SelectiveGrads<E>> {
    selective_backward_on(Isa::active(), params, shape, inputs, dy)
}

/// [`selective_backward`] on a chosen instruction set.
#[doc(hidden)]
pub fn selective_backward_on<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    dy: &[E],
) -> Result<SelectiveGrads<E>> {
    // validated before allocating (and again, cheaply, by the call below)
    let sizes = inputs.validate(&shape)?;
    let (b, t_len, d) = (shape.batch, shape.len, shape.channels);
    check_len("dy", dy.len(), sizes.seq, &format!("[{b}, {t_len}, {d}]"))?;
    let zero = <E::Acc as Accum>::ZERO;
    let mut g = SelectiveGrads {
        du: vec![E::default(); sizes.seq],
        ddelta: vec![E::default(); sizes.seq],
        da: vec![zero; sizes.a],
        dbm: vec![E::default(); sizes.bc],
        dcm: vec![E::default(); sizes.bc],
        ddskip: inputs.dskip.map(|_| vec![zero; d]),
        dz: inputs.z.map(|_| vec![E::default(); sizes.seq]),
        ddelta_bias: inputs.delta_bias.map(|_| vec![zero; d]),
        dh0: inputs.h0.map(|_| vec![zero; sizes.states]),
    };
    E::scan_selective_backward_into(isa, params, shape, inputs, dy, g.as_mut())?;
    Ok(g)
}

impl<E: Element> SelectiveGrads<E> {
    /// These gradients as the buffers of [`selective_backward_into`] (e.g. allocated once by
    /// [`selective_backward`], then reused every step).
    pub fn as_mut(&mut self) -> SelectiveGradsMut<'_, E> {
        SelectiveGradsMut {
            du: &mut self.du,
            ddelta: &mut self.ddelta,
            da: &mut self.da,
            dbm: &mut self.dbm,
            dcm: &mut self.dcm,
            ddskip: self.ddskip.as_deref_mut(),
            dz: self.dz.as_deref_mut(),
            ddelta_bias: self.ddelta_bias.as_deref_mut(),
            dh0: self.dh0.as_deref_mut(),
        }
    }
}

/// The gradients of `scan.selective`, written into the caller's buffers by
/// [`selective_backward_into`]; shapes as [`SelectiveGrads`]. Each optional buffer is given
/// exactly when its input is (`ddskip` with `dskip`, `dz` with `z`, `ddelta_bias` with
/// `delta_bias`, `dh0` with `h0`). Every value is overwritten.
#[derive(Debug)]
pub struct SelectiveGradsMut<'a, E: Element> {
    /// `[B, T, D]`: the gradient of `u`.
    pub du: &'a mut [E],
    /// `[B, T, D]`: the gradient of `delta`.
    pub ddelta: &'a mut [E],
    /// `[D, N]`, accumulator type: the gradient of `a`.
    pub da: &'a mut [E::Acc],
    /// `[B, T, N]`: the gradient of `bm`.
    pub dbm: &'a mut [E],
    /// `[B, T, N]`: the gradient of `cm`.
    pub dcm: &'a mut [E],
    /// `[D]`, accumulator type: the gradient of `dskip`.
    pub ddskip: Option<&'a mut [E::Acc]>,
    /// `[B, T, D]`: the gradient of `z`.
    pub dz: Option<&'a mut [E]>,
    /// `[D]`, accumulator type: the gradient of `delta_bias`.
    pub ddelta_bias: Option<&'a mut [E::Acc]>,
    /// `[B, D, N]`, accumulator type: the gradient of `h0`.
    pub dh0: Option<&'a mut [E::Acc]>,
}

/// [`selective_backward`] into the caller's buffers (no allocation of the gradients: a
/// training loop reuses them, and their pages are not faulted in again each call).
pub fn selective_backward_into<E: Element>(
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    dy: &[E],
    grads: SelectiveGradsMut<'_, E>,
) -> Result<()> {
    E::scan_selective_backward_into(Isa::active(), params, shape, inputs, dy, grads)
}

/// [`selective_backward_into`] on a chosen instruction set.
#[doc(hidden)]
pub fn selective_backward_into_on<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    dy: &[E],
    grads: SelectiveGradsMut<'_, E>,
) -> Result<()> {
    E::scan_selective_backward_into(isa, params, shape, inputs, dy, grads)
}

/// `Err` naming `tensor` unless an optional gradient buffer is given exactly when its input
/// is, with `len` values.
fn check_optional<T>(
    tensor: &str,
    buf: &Option<&mut [T]>,
    input_given: bool,
    len: usize,
    dims: &str,
) -> Result<()> {
    match (buf, input_given) {
        (Some(x), true) => check_len(tensor, x.len(), len, dims),
        (None, false) => Ok(()),
        (Some(_), false) => Err(Error::shape(
            tensor,
            "absent (its input is not given)",
            "a buffer",
        )),
        (None, true) => Err(Error::shape(tensor, format!("a buffer of {dims}"), "none")),
    }
}

/// The outputs tasks write directly: rows `[B, T, D]` and `dh0 [B, D, N]`, each task its
/// own channels.
struct Outputs<E: Element> {
    du: SendPtr<E>,
    ddelta: SendPtr<E>,
    dz: Option<SendPtr<E>>,
    dh0: Option<SendPtr<E::Acc>>,
}

impl<E: Element> Clone for Outputs<E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E: Element> Copy for Outputs<E> {}

/// One task's sums, reduced over tasks in task order.
struct Partials<A> {
    /// `[T, N]`, summed over the block's channels.
    dbm: Vec<A>,
    dcm: Vec<A>,
    /// `[w, N]`, `[w]`, `[w]`: summed over time.
    da: Vec<A>,
    ddskip: Vec<A>,
    ddelta_bias: Vec<A>,
}

/// The CPU backward into the caller's buffers, validated (instantiated per dtype in
/// [`crate::dispatch`]).
pub(crate) fn selective_backward_into_impl<E: Element>(
    isa: Isa,
    params: &SelectiveParams,
    shape: SelectiveShape,
    inputs: &SelectiveInputs<'_, E>,
    dy: &[E],
    g: SelectiveGradsMut<'_, E>,
) -> Result<()> {
    isa.check()?;
    let sizes = inputs.validate(&shape)?;
    let (b, t_len, d, n) = (shape.batch, shape.len, shape.channels, shape.state);
    let seq_dims = format!("[{b}, {t_len}, {d}]");
    check_len("dy", dy.len(), sizes.seq, &seq_dims)?;
    let SelectiveGradsMut {
        du,
        ddelta,
        da,
        dbm: dbm_out,
        dcm: dcm_out,
        mut ddskip,
        mut dz,
        mut ddelta_bias,
        mut dh0,
    } = g;
    check_len("du", du.len(), sizes.seq, &seq_dims)?;
    check_len("ddelta", ddelta.len(), sizes.seq, &seq_dims)?;
    check_len("da", da.len(), sizes.a, &format!("[{d}, {n}]"))?;
    let bc_dims = format!("[{b}, {t_len}, {n}]");
    check_len("dbm", dbm_out.len(), sizes.bc, &bc_dims)?;
    check_len("dcm", dcm_out.len(), sizes.bc, &bc_dims)?;
    let d_dims = format!("[{d}]");
    check_optional("ddskip", &ddskip, inputs.dskip.is_some(), d, &d_dims)?;
    check_optional("dz", &dz, inputs.z.is_some(), sizes.seq, &seq_dims)?;
    check_optional(
        "ddelta_bias",
        &ddelta_bias,
        inputs.delta_bias.is_some(),
        d,
        &d_dims,
    )?;
    let state_dims = format!("[{b}, {d}, {n}]");
    check_optional("dh0", &dh0, inputs.h0.is_some(), sizes.states, &state_dims)?;
    let zero = <E::Acc as Accum>::ZERO;
    // the sums start from zero; the rows are every one written by the tasks below, or are
    // zero when there is no step or no channel
    da.fill(zero);
    for v in [ddskip.as_deref_mut(), ddelta_bias.as_deref_mut()]
        .into_iter()
        .flatten()
    {
        v.fill(zero);
    }
    let (mut dbm, mut dcm) = (vec![zero; sizes.bc], vec![zero; sizes.bc]);
    // no step or no channel: every gradient is zero (y is empty), and the batch is not
    // iterated (rule 4 of crate::error)
    if t_len > 0 && d > 0 {
        let blocks = d.div_ceil(BLOCK);
        let out = Outputs {
            du: SendPtr(du.as_mut_ptr()),
            ddelta: SendPtr(ddelta.as_mut_ptr()),
            dz: dz.as_mut().map(|v| SendPtr(v.as_mut_ptr())),
            dh0: dh0.as_mut().map(|v| SendPtr(v.as_mut_ptr())),
        };
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..blocks).map(move |k| (bi, k * BLOCK)))
            .collect();
        let partials: Vec<Partials<E::Acc>> = tasks
            .par_iter()
            .map(|&(bi, d0)| {
                let kernel = BackwardBlock {
                    params: *params,
                    shape,
                    inputs,
                    dy,
                    bi,
                    d0,
                    w: BLOCK.min(d - d0),
                    out,
                };
                dispatch(isa, kernel)
            })
            .collect();
        // the sums over tasks, in task order (batch-major, then block)
        let add = |to: &mut [E::Acc], from: &[E::Acc]| {
            for (x, y) in to.iter_mut().zip(from) {
                *x = *x + *y;
            }
        };
        for (&(bi, d0), part) in tasks.iter().zip(&partials) {
            let rows = bi * t_len * n..(bi + 1) * t_len * n;
            add(&mut dbm[rows.clone()], &part.dbm);
            add(&mut dcm[rows], &part.dcm);
            let w = part.ddskip.len();
            add(&mut da[d0 * n..(d0 + w) * n], &part.da);
            if let Some(v) = ddskip.as_deref_mut() {
                add(&mut v[d0..d0 + w], &part.ddskip);
            }
            if let Some(v) = ddelta_bias.as_deref_mut() {
                add(&mut v[d0..d0 + w], &part.ddelta_bias);
            }
        }
    } else {
        du.fill(E::default());
        ddelta.fill(E::default());
        if let Some(v) = dz {
            v.fill(E::default());
        }
        if let Some(v) = dh0 {
            v.fill(zero);
        }
    }
    for (to, from) in dbm_out.iter_mut().zip(dbm) {
        *to = E::from_acc(from);
    }
    for (to, from) in dcm_out.iter_mut().zip(dcm) {
        *to = E::from_acc(from);
    }
    Ok(())
}

/// One task: batch `bi`, channels [d0, d0 + w).
struct BackwardBlock<'a, E: Element> {
    params: SelectiveParams,
    shape: SelectiveShape,
    inputs: &'a SelectiveInputs<'a, E>,
    dy: &'a [E],
    bi: usize,
    d0: usize,
    w: usize,
    out: Outputs<E>,
}

/// A chunk's per-step rows, `[CHUNK][wp]` (channels padded to whole vectors with zeros, so
/// every channel takes the vector path and padded lanes carry zero gradients), and its
/// states and decays, `[CHUNK + 1][n][wp]` and `[CHUNK][n][wp]`.
struct ChunkRows<A> {
    /// delta + delta_bias, before the softplus.
    pre: Vec<A>,
    dt: Vec<A>,
    u: Vec<A>,
    dtu: Vec<A>,
    /// d(dt)/d(delta): the softplus slope (unused without softplus).
    slope: Vec<A>,
    /// dy, then dy' = dy·silu(z) once the gate is through.
    g: Vec<A>,
    z: Vec<A>,
    /// Σ_n Cm·x, then the gradient of delta.
    y: Vec<A>,
    du: Vec<A>,
    dz: Vec<A>,
    /// `[CHUNK][n]`
    bm: Vec<A>,
    cm: Vec<A>,
    states: Vec<A>,
    decay: Vec<A>,
}

/// Vector sigmoid 1 / (1 + e^-x).
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`).
#[inline(always)]
unsafe fn vsigmoid<S: Simd, A: Accum>(x: A::V<S>) -> A::V<S> {
    // SAFETY: register-only vector operations; the ISA per this fn's contract.
    unsafe {
        let one = A::vsplat::<S>(A::ONE);
        let e = A::vexp::<S>(A::vmul::<S>(x, A::vsplat::<S>(A::from_f64(-1.0))));
        A::vdiv::<S>(one, A::vadd::<S>(one, e))
    }
}

impl<E: Element> BackwardBlock<'_, E> {
    /// Asks for step `t`'s row segments of delta and u (with `full` also dy and z) ahead of
    /// [`Self::load`]: the block's segments are a whole row of D apart per step, a stride the
    /// hardware prefetchers do not follow, and the chunks are loaded from memory (twice: the
    /// forward pass, then the reverse one).
    #[inline(always)]
    fn prefetch_step(&self, t: usize, full: bool) {
        let row = (self.bi * self.shape.len + t) * self.shape.channels + self.d0;
        prefetch(self.inputs.delta[row..].as_ptr(), self.w);
        prefetch(self.inputs.u[row..].as_ptr(), self.w);
        if full {
            prefetch(self.dy[row..].as_ptr(), self.w);
            if let Some(z) = self.inputs.z {
                prefetch(z[row..].as_ptr(), self.w);
            }
        }
    }

    /// Steps [t0, t0 + len) of the block into `rows`: dt, dt·u, Bm, and with `full` also
    /// the softplus slope, Cm, dy and z.
    #[inline(always)]
    fn load<S: Simd>(
        &self,
        rows: &mut ChunkRows<E::Acc>,
        wp: usize,
        t0: usize,
        len: usize,
        full: bool,
    ) {
        let (inputs, (bi, d0, w)) = (self.inputs, (self.bi, self.d0, self.w));
        let (t_len, d, n) = (self.shape.len, self.shape.channels, self.shape.state);
        let lanes = E::Acc::lanes::<S>();
        // whole vectors of the block's channels, widened by vector loads; the rest one by one
        let vw = w / lanes * lanes;
        for i in 0..len {
            let row = (bi * t_len + t0 + i) * d + d0;
            let at = i * wp;
            // SAFETY: c + lanes <= vw <= w: row + c + lanes <= B·T·D (the inputs' validated
            // length), d0 + c + lanes <= D (delta_bias), at + c + lanes <= CHUNK·wp (rows).
            unsafe {
                let mut c = 0;
                while c < vw {
                    let mut v = E::vload::<S>(inputs.delta.as_ptr().add(row + c));
                    if let Some(bias) = inputs.delta_bias {
                        v = E::Acc::vadd::<S>(v, E::Acc::vload::<S>(bias.as_ptr().add(d0 + c)));
                    }
                    E::Acc::vstore::<S>(rows.pre.as_mut_ptr().add(at + c), v);
                    let u = E::vload::<S>(inputs.u.as_ptr().add(row + c));
                    E::Acc::vstore::<S>(rows.u.as_mut_ptr().add(at + c), u);
                    if full {
                        let g = E::vload::<S>(self.dy.as_ptr().add(row + c));
                        E::Acc::vstore::<S>(rows.g.as_mut_ptr().add(at + c), g);
                        if let Some(z) = inputs.z {
                            let z = E::vload::<S>(z.as_ptr().add(row + c));
                            E::Acc::vstore::<S>(rows.z.as_mut_ptr().add(at + c), z);
                        }
                    }
                    c += lanes;
                }
            }
            for c in vw..w {
                let mut v = inputs.delta[row + c].to_acc();
                if let Some(bias) = inputs.delta_bias {
                    v = v + bias[d0 + c];
                }
                rows.pre[at + c] = v;
                rows.u[at + c] = inputs.u[row + c].to_acc();
            }
            if full {
                for c in vw..w {
                    rows.g[at + c] = self.dy[row + c].to_acc();
                }
                if let Some(z) = inputs.z {
                    for c in vw..w {
                        rows.z[at + c] = z[row + c].to_acc();
                    }
                }
            }
            let bc = (bi * t_len + t0 + i) * n;
            for j in 0..n {
                rows.bm[i * n + j] = inputs.bm[bc + j].to_acc();
                if full {
                    rows.cm[i * n + j] = inputs.cm[bc + j].to_acc();
                }
            }
        }
        let m = len * wp;
        let softplus_on = self.params.delta_softplus;
        // f64 keeps the exact scalar softplus, as the forward (the vector one is f32-accurate)
        let vector_softplus = std::mem::size_of::<E::Acc>() == 4;
        if softplus_on && !vector_softplus {
            for i in 0..m {
                rows.dt[i] = softplus(rows.pre[i]);
            }
        }
        let mut i = 0;
        // SAFETY: i + lanes <= m = len·wp (wp a multiple of lanes), within every buffer's
        // CHUNK·wp values.
        unsafe {
            while i < m {
                let v = E::Acc::vload::<S>(rows.pre.as_ptr().add(i));
                let dt = match (softplus_on, vector_softplus) {
                    (false, _) => v,
                    (true, true) => vsoftplus::<S, E::Acc>(v),
                    (true, false) => E::Acc::vload::<S>(rows.dt.as_ptr().add(i)),
                };
                E::Acc::vstore::<S>(rows.dt.as_mut_ptr().add(i), dt);
                let u = E::Acc::vload::<S>(rows.u.as_ptr().add(i));
                E::Acc::vstore::<S>(rows.dtu.as_mut_ptr().add(i), E::Acc::vmul::<S>(dt, u));
                if full && softplus_on {
                    let s = vsigmoid::<S, E::Acc>(v);
                    E::Acc::vstore::<S>(rows.slope.as_mut_ptr().add(i), s);
                }
                i += lanes;
            }
        }
    }
}

/// One step of the recurrence for channels [c, c + V·lanes) of `[n][wp]` rows:
/// x_out = 2^(dt·a_t)·x_in + dt·u·Bm\[j\] for every state j; with `keep`, the decays go to
/// `decay` and Σ_j Cm\[j\]·x_out to `y`.
///
/// # Safety
/// The CPU supports `S`; c + V·lanes <= wp; `x_in`, `x_out`, `a_t` (and with `keep`,
/// `decay`) point to n·wp values, `dt`, `dtu` (and `y`) to wp, `bm`, `cm` to n; `x_in` and
/// `x_out` are the same or disjoint.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn advance<S: Simd, A: Accum, const V: usize>(
    n: usize,
    wp: usize,
    c: usize,
    a_t: *const A,
    (dt, dtu): (*const A, *const A),
    (bm, cm): (*const A, *const A),
    (x_in, x_out): (*const A, *mut A),
    keep: Option<(*mut A, *mut A)>,
) {
    let lanes = A::lanes::<S>();
    // plain loops, no closures: a closure does not inherit the kernel's target features
    // (see `Simd::f32_exp2_x4`)
    // SAFETY: every index is below c + V·lanes <= wp, or j·wp + that, below n·wp.
    unsafe {
        let zero = A::vsplat::<S>(A::ZERO);
        let (mut dtv, mut dtuv, mut yv) = ([zero; V], [zero; V], [zero; V]);
        for v in 0..V {
            dtv[v] = A::vload::<S>(dt.add(c + v * lanes));
            dtuv[v] = A::vload::<S>(dtu.add(c + v * lanes));
        }
        for j in 0..n {
            let at = j * wp + c;
            let mut decay = [zero; V];
            for v in 0..V {
                decay[v] = A::vmul::<S>(dtv[v], A::vload::<S>(a_t.add(at + v * lanes)));
            }
            let decay = vexp2_n::<S, A, V>(decay);
            let (b_j, c_j) = (A::vsplat::<S>(*bm.add(j)), A::vsplat::<S>(*cm.add(j)));
            for v in 0..V {
                let k = at + v * lanes;
                let input = A::vmul::<S>(dtuv[v], b_j);
                let xv = A::vfma::<S>(decay[v], A::vload::<S>(x_in.add(k)), input);
                A::vstore::<S>(x_out.add(k), xv);
                if let Some((dec, _)) = keep {
                    A::vstore::<S>(dec.add(k), decay[v]);
                    yv[v] = A::vfma::<S>(c_j, xv, yv[v]);
                }
            }
        }
        if let Some((_, y)) = keep {
            for (v, yv) in yv.iter().enumerate() {
                A::vstore::<S>(y.add(c + v * lanes), *yv);
            }
        }
    }
}

/// 2^x of V vectors: four side by side through `vexp2_x4`, else one by one.
///
/// # Safety
/// The CPU supports `S`.
#[inline(always)]
unsafe fn vexp2_n<S: Simd, A: Accum, const V: usize>(mut x: [A::V<S>; V]) -> [A::V<S>; V] {
    // SAFETY: register-only vector operations on this ISA (this fn's contract).
    unsafe {
        if V == 4 {
            let y = A::vexp2_x4::<S>([x[0], x[1], x[2], x[3]]);
            x[..4].copy_from_slice(&y);
        } else {
            for v in x.iter_mut() {
                *v = A::vexp2::<S>(*v);
            }
        }
    }
    x
}

/// An unaligned vector load of `p[k..k + lanes]`.
///
/// # Safety
/// The CPU supports `S`; k + lanes <= p.len().
#[inline(always)]
unsafe fn ld<S: Simd, A: Accum>(p: &[A], k: usize) -> A::V<S> {
    // SAFETY: per this fn's contract.
    unsafe { A::vload::<S>(p.as_ptr().add(k)) }
}

/// [`advance`] over all `wp` channels: four vectors at a time (their decays through the
/// exp2 side by side), then one.
///
/// # Safety
/// As [`advance`], for c = 0 to wp.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn advance_all<S: Simd, A: Accum>(
    n: usize,
    wp: usize,
    a_t: *const A,
    steps: (*const A, *const A),
    bc: (*const A, *const A),
    x: (*const A, *mut A),
    keep: Option<(*mut A, *mut A)>,
) {
    let lanes = A::lanes::<S>();
    let mut c = 0;
    // SAFETY: c + 4·lanes (then c + lanes) <= wp; the rest per this fn's contract.
    unsafe {
        while c + 4 * lanes <= wp {
            advance::<S, A, 4>(n, wp, c, a_t, steps, bc, x, keep);
            c += 4 * lanes;
        }
        while c < wp {
            advance::<S, A, 1>(n, wp, c, a_t, steps, bc, x, keep);
            c += lanes;
        }
    }
}

impl<E: Element> SimdKernel for BackwardBlock<'_, E> {
    type Output = Partials<E::Acc>;
    #[inline(always)]
    fn run<S: Simd>(self) -> Partials<E::Acc> {
        let (inputs, (bi, d0, w)) = (self.inputs, (self.bi, self.d0, self.w));
        let (t_len, d, n) = (self.shape.len, self.shape.channels, self.shape.state);
        let zero = <E::Acc as Accum>::ZERO;
        let lanes = E::Acc::lanes::<S>();
        let wp = w.div_ceil(lanes) * lanes;
        let nw = n * wp;
        // A as [n][wp] rows, as is and times log2(e) (the decay is 2^(dt·log2(e)·A), as in
        // the forward); the state before the first step; Dskip. Padded channels stay zero.
        let log2e = <E::Acc as Accum>::from_f64(std::f64::consts::LOG2_E);
        let (mut a, mut a_t, mut x) = (vec![zero; nw], vec![zero; nw], vec![zero; nw]);
        let mut dskip = vec![zero; wp];
        for c in 0..w {
            for j in 0..n {
                a[j * wp + c] = inputs.a[(d0 + c) * n + j];
                a_t[j * wp + c] = log2e * a[j * wp + c];
                if let Some(h0) = inputs.h0 {
                    x[j * wp + c] = h0[(bi * d + d0 + c) * n + j];
                }
            }
            if let Some(v) = inputs.dskip {
                dskip[c] = v[d0 + c];
            }
        }
        let buf = |len: usize| vec![zero; len];
        let mut rows = ChunkRows {
            pre: buf(CHUNK * wp),
            dt: buf(CHUNK * wp),
            u: buf(CHUNK * wp),
            dtu: buf(CHUNK * wp),
            slope: buf(CHUNK * wp),
            g: buf(CHUNK * wp),
            z: buf(CHUNK * wp),
            y: buf(CHUNK * wp),
            du: buf(CHUNK * wp),
            dz: buf(CHUNK * wp),
            bm: buf(CHUNK * n),
            cm: buf(CHUNK * n),
            states: buf((CHUNK + 1) * nw),
            decay: buf(CHUNK * nw),
        };

        // the forward once, keeping the state at the start of every chunk
        let chunks = t_len.div_ceil(CHUNK);
        let mut checkpoints = vec![zero; chunks * nw];
        for k in 0..chunks {
            let (t0, len) = (k * CHUNK, CHUNK.min(t_len - k * CHUNK));
            checkpoints[k * nw..(k + 1) * nw].copy_from_slice(&x);
            self.load::<S>(&mut rows, wp, t0, len, false);
            for i in 0..len {
                let at = i * wp;
                // the next chunk's rows, one step's per step; the last chunk's dy and z for
                // the reverse pass, which starts there
                if t0 + CHUNK + i < t_len {
                    self.prefetch_step(t0 + CHUNK + i, t0 + CHUNK + i >= (chunks - 1) * CHUNK);
                }
                // SAFETY: the rows of step i < CHUNK and `x`, `a_t` of n·wp values (advance's
                // contract); x updated in place.
                unsafe {
                    advance_all::<S, E::Acc>(
                        n,
                        wp,
                        a_t.as_ptr(),
                        (rows.dt.as_ptr().add(at), rows.dtu.as_ptr().add(at)),
                        (rows.bm.as_ptr().add(i * n), rows.cm.as_ptr()),
                        (x.as_ptr(), x.as_mut_ptr()),
                        None,
                    );
                }
            }
        }

        // gx: the state gradient flowing back into the current step, exp(dt[t+1]·A)·gx[t+1]
        let (mut gx, mut da) = (vec![zero; nw], vec![zero; nw]);
        let (mut ddskip, mut dbias) = (vec![zero; wp], vec![zero; wp]);
        let (mut dbm, mut dcm) = (vec![zero; t_len * n], vec![zero; t_len * n]);
        // per state, the lanes of the step's dCm and dBm sums; padded to whole groups of four
        let groups = n.div_ceil(4);
        let (mut lanes_c, mut lanes_b) = (buf(4 * groups * lanes), buf(4 * groups * lanes));
        for k in (0..chunks).rev() {
            let (t0, len) = (k * CHUNK, CHUNK.min(t_len - k * CHUNK));
            self.load::<S>(&mut rows, wp, t0, len, true);
            // re-run the chunk, keeping its states (states[i] before step t0 + i) and decays
            rows.states[..nw].copy_from_slice(&checkpoints[k * nw..(k + 1) * nw]);
            for i in 0..len {
                let (at, st) = (i * wp, i * nw);
                // the previous chunk's rows (every chunk but the last is CHUNK steps long)
                if k > 0 {
                    self.prefetch_step((k - 1) * CHUNK + i, true);
                }
                let states = rows.states.as_mut_ptr();
                // SAFETY: step i < CHUNK: rows at i·wp, Bm/Cm at i·n, states i and i + 1 of
                // CHUNK + 1 (disjoint), decays i of CHUNK, each of n·wp values.
                unsafe {
                    advance_all::<S, E::Acc>(
                        n,
                        wp,
                        a_t.as_ptr(),
                        (rows.dt.as_ptr().add(at), rows.dtu.as_ptr().add(at)),
                        (rows.bm.as_ptr().add(i * n), rows.cm.as_ptr().add(i * n)),
                        (states.add(st), states.add(st + nw)),
                        Some((rows.decay.as_mut_ptr().add(st), rows.y.as_mut_ptr().add(at))),
                    );
                }
            }
            self.gate::<S>(&mut rows, &dskip, len * wp);
            for i in (0..len).rev() {
                let (at, st, t) = (i * wp, i * nw, t0 + i);
                let mut c = 0;
                while c < wp {
                    let p = Walk {
                        n,
                        wp,
                        c,
                        at,
                        st,
                        i,
                    };
                    let (sums, step_sums, lane_sums) = (
                        (&mut gx[..], &mut da[..]),
                        (&mut ddskip[..], &mut dbias[..]),
                        (&mut lanes_c[..], &mut lanes_b[..]),
                    );
                    // SAFETY: c + V·lanes <= wp (four vectors while they fit, then one);
                    // rows of step i at i·wp + c; states i and i + 1 and decays i at (i or
                    // i + 1)·nw + j·wp + c, within (CHUNK + 1)·nw; gx, da, a of n·wp values;
                    // the lanes buffers hold 4·groups·lanes >= n·lanes values; Bm, Cm of
                    // step i at i·n + j.
                    unsafe {
                        if c + 4 * lanes <= wp {
                            self.walk::<S, 4>(&mut rows, p, &a, &dskip, sums, step_sums, lane_sums);
                            c += 4 * lanes;
                        } else {
                            self.walk::<S, 1>(&mut rows, p, &a, &dskip, sums, step_sums, lane_sums);
                            c += lanes;
                        }
                    }
                }
                // the step's sums over channels: lanes folded four states at a time
                for q in 0..groups {
                    // SAFETY: vectors 4q..4q + 4 of the lanes buffers (4·groups·lanes values).
                    unsafe {
                        let at = 4 * q * lanes;
                        let sc = E::Acc::vsum4::<S>([
                            ld::<S, E::Acc>(&lanes_c, at),
                            ld::<S, E::Acc>(&lanes_c, at + lanes),
                            ld::<S, E::Acc>(&lanes_c, at + 2 * lanes),
                            ld::<S, E::Acc>(&lanes_c, at + 3 * lanes),
                        ]);
                        let sb = E::Acc::vsum4::<S>([
                            ld::<S, E::Acc>(&lanes_b, at),
                            ld::<S, E::Acc>(&lanes_b, at + lanes),
                            ld::<S, E::Acc>(&lanes_b, at + 2 * lanes),
                            ld::<S, E::Acc>(&lanes_b, at + 3 * lanes),
                        ]);
                        for r in 0..4.min(n - 4 * q) {
                            dcm[t * n + 4 * q + r] = sc[r];
                            dbm[t * n + 4 * q + r] = sb[r];
                        }
                    }
                }
                lanes_c.fill(zero);
                lanes_b.fill(zero);
            }
            // this task's rows of du, ddelta and dz (see selective_backward_into_impl): whole
            // vectors rounded by vector stores, the rest one by one
            let vw = w / lanes * lanes;
            for i in 0..len {
                let row = (bi * t_len + t0 + i) * d + d0;
                // SAFETY: rows bi, channels [d0, d0 + w) of [B, T, D] outputs: this task's
                // own, disjoint from every other task's; row + c (+ lanes for the vectors,
                // c + lanes <= vw <= w) <= B·T·D; i·wp + c + lanes <= CHUNK·wp (rows).
                unsafe {
                    let mut c = 0;
                    while c < vw {
                        let at = i * wp + c;
                        E::vstore::<S>(
                            self.out.du.get().add(row + c),
                            ld::<S, E::Acc>(&rows.du, at),
                        );
                        E::vstore::<S>(
                            self.out.ddelta.get().add(row + c),
                            ld::<S, E::Acc>(&rows.y, at),
                        );
                        if let Some(dz) = self.out.dz {
                            E::vstore::<S>(dz.get().add(row + c), ld::<S, E::Acc>(&rows.dz, at));
                        }
                        c += lanes;
                    }
                    for c in vw..w {
                        let at = i * wp + c;
                        *self.out.du.get().add(row + c) = E::from_acc(rows.du[at]);
                        *self.out.ddelta.get().add(row + c) = E::from_acc(rows.y[at]);
                        if let Some(dz) = self.out.dz {
                            *dz.get().add(row + c) = E::from_acc(rows.dz[at]);
                        }
                    }
                }
            }
        }
        if let Some(dh0) = self.out.dh0 {
            for c in 0..w {
                for j in 0..n {
                    // SAFETY: entries (bi, d0 + c, j) of dh0 [B, D, N]: this task's own.
                    unsafe { *dh0.get().add((bi * d + d0 + c) * n + j) = gx[j * wp + c] };
                }
            }
        }
        let mut da_rows = vec![zero; w * n];
        for c in 0..w {
            for j in 0..n {
                da_rows[c * n + j] = da[j * wp + c];
            }
        }
        ddskip.truncate(w);
        dbias.truncate(w);
        Partials {
            dbm,
            dcm,
            da: da_rows,
            ddskip,
            ddelta_bias: dbias,
        }
    }
}

/// Where [`BackwardBlock::walk`] works: step i of the chunk (rows at `at` = i·wp, states at
/// `st` = i·nw), channels [c, c + lanes).
#[derive(Clone, Copy)]
struct Walk {
    n: usize,
    wp: usize,
    c: usize,
    at: usize,
    st: usize,
    i: usize,
}

impl<E: Element> BackwardBlock<'_, E> {
    /// The gate and skip of a chunk's `m` row values: y = Σ_n C·x + Dskip·u; with z,
    /// dz = dy·y·silu'(z) and dy' = dy·silu(z) (in `g`), else dy' = dy.
    #[inline(always)]
    fn gate<S: Simd>(&self, rows: &mut ChunkRows<E::Acc>, dskip: &[E::Acc], m: usize) {
        let (lanes, wp) = (E::Acc::lanes::<S>(), dskip.len());
        let has_z = self.inputs.z.is_some();
        let one = <E::Acc as Accum>::ONE;
        let mut i = 0;
        // SAFETY: i + lanes <= m <= CHUNK·wp (every row buffer's length), i % wp + lanes <=
        // wp (dskip's length), as wp is a multiple of lanes.
        unsafe {
            let one = E::Acc::vsplat::<S>(one);
            while i < m {
                let y = E::Acc::vfma::<S>(
                    ld::<S, E::Acc>(dskip, i % wp),
                    ld::<S, E::Acc>(&rows.u, i),
                    ld::<S, E::Acc>(&rows.y, i),
                );
                let dy = ld::<S, E::Acc>(&rows.g, i);
                if has_z {
                    let z = ld::<S, E::Acc>(&rows.z, i);
                    let s = vsigmoid::<S, E::Acc>(z);
                    // silu'(z) = s·(1 + z·(1 - s))
                    let slope = E::Acc::vmul::<S>(
                        s,
                        E::Acc::vfma::<S>(
                            z,
                            E::Acc::vadd::<S>(
                                one,
                                E::Acc::vmul::<S>(s, E::Acc::vsplat::<S>(E::Acc::from_f64(-1.0))),
                            ),
                            one,
                        ),
                    );
                    let dz = E::Acc::vmul::<S>(E::Acc::vmul::<S>(dy, y), slope);
                    E::Acc::vstore::<S>(rows.dz.as_mut_ptr().add(i), dz);
                    let silu = E::Acc::vmul::<S>(z, s);
                    E::Acc::vstore::<S>(rows.g.as_mut_ptr().add(i), E::Acc::vmul::<S>(dy, silu));
                }
                i += lanes;
            }
        }
    }

    /// One reverse step for V channel vectors from c: every state's gx = Cm·dy' + gx_next,
    /// its contributions to dCm and dBm (lanes, held in registers across the V vectors and
    /// added in channel order, as one vector at a time would), dA, and the channels' du and
    /// ddelta (into the `du` and `y` rows), dDskip and ddelta_bias; then gx_next = decay·gx.
    ///
    /// # Safety
    /// The CPU supports `S`; c + V·lanes <= wp; the indices of `p` are as in the caller's
    /// SAFETY comment.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn walk<S: Simd, const V: usize>(
        &self,
        rows: &mut ChunkRows<E::Acc>,
        p: Walk,
        a: &[E::Acc],
        dskip: &[E::Acc],
        (gx, da): (&mut [E::Acc], &mut [E::Acc]),
        (ddskip, dbias): (&mut [E::Acc], &mut [E::Acc]),
        (lanes_c, lanes_b): (&mut [E::Acc], &mut [E::Acc]),
    ) {
        let Walk {
            n,
            wp,
            c,
            at,
            st,
            i,
        } = p;
        let lanes = E::Acc::lanes::<S>();
        // SAFETY: indices per this fn's contract.
        unsafe {
            let ld = ld::<S, E::Acc>;
            let zero = E::Acc::vsplat::<S>(E::Acc::ZERO);
            let (mut g, mut dt, mut dtu) = ([zero; V], [zero; V], [zero; V]);
            for v in 0..V {
                let k = at + c + v * lanes;
                g[v] = ld(&rows.g, k);
                dt[v] = ld(&rows.dt, k);
                dtu[v] = ld(&rows.dtu, k);
            }
            let (mut sb, mut sa) = ([zero; V], [zero; V]);
            let (now, prev) = (
                rows.states.as_ptr().add(st + n * wp),
                rows.states.as_ptr().add(st),
            );
            let dec = rows.decay.as_ptr().add(st);
            for j in 0..n {
                let (b_j, c_j) = (
                    E::Acc::vsplat::<S>(rows.bm[i * n + j]),
                    E::Acc::vsplat::<S>(rows.cm[i * n + j]),
                );
                let (lc, lb) = (
                    lanes_c.as_mut_ptr().add(j * lanes),
                    lanes_b.as_mut_ptr().add(j * lanes),
                );
                let (mut lcv, mut lbv) = (E::Acc::vload::<S>(lc), E::Acc::vload::<S>(lb));
                for v in 0..V {
                    let k = j * wp + c + v * lanes;
                    let decay = E::Acc::vload::<S>(dec.add(k));
                    let gxv = E::Acc::vfma::<S>(c_j, g[v], ld(gx, k));
                    lcv = E::Acc::vfma::<S>(g[v], E::Acc::vload::<S>(now.add(k)), lcv);
                    lbv = E::Acc::vfma::<S>(gxv, dtu[v], lbv);
                    sb[v] = E::Acc::vfma::<S>(gxv, b_j, sb[v]);
                    let through_decay = E::Acc::vmul::<S>(
                        E::Acc::vmul::<S>(gxv, E::Acc::vload::<S>(prev.add(k))),
                        decay,
                    );
                    sa[v] = E::Acc::vfma::<S>(through_decay, ld(a, k), sa[v]);
                    E::Acc::vstore::<S>(
                        da.as_mut_ptr().add(k),
                        E::Acc::vfma::<S>(through_decay, dt[v], ld(da, k)),
                    );
                    E::Acc::vstore::<S>(gx.as_mut_ptr().add(k), E::Acc::vmul::<S>(decay, gxv));
                }
                E::Acc::vstore::<S>(lc, lcv);
                E::Acc::vstore::<S>(lb, lbv);
            }
            for v in 0..V {
                let (cv, k) = (c + v * lanes, at + c + v * lanes);
                let u = ld(&rows.u, k);
                // du = dt·Σ gx·Bm + dy'·Dskip; ddt = u·Σ gx·Bm + Σ gx·x_prev·decay·A
                let du = E::Acc::vfma::<S>(g[v], ld(dskip, cv), E::Acc::vmul::<S>(dt[v], sb[v]));
                E::Acc::vstore::<S>(rows.du.as_mut_ptr().add(k), du);
                let mut dd = E::Acc::vfma::<S>(u, sb[v], sa[v]);
                if self.params.delta_softplus {
                    dd = E::Acc::vmul::<S>(dd, ld(&rows.slope, k));
                }
                E::Acc::vstore::<S>(rows.y.as_mut_ptr().add(k), dd);
                E::Acc::vstore::<S>(
                    dbias.as_mut_ptr().add(cv),
                    E::Acc::vadd::<S>(ld(dbias, cv), dd),
                );
                E::Acc::vstore::<S>(
                    ddskip.as_mut_ptr().add(cv),
                    E::Acc::vfma::<S>(g[v], u, ld(ddskip, cv)),
                );
            }
        }
    }
}
