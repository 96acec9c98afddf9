//! CPU kernels of `scan.linear`, `scan.linear_complex` and their backward passes.
//!
//! Work is laid out in *logical* time s = 0..T, the order the recurrence runs in
//! (t = s forward, t = T-1-s in reverse), so one set of loops serves both directions. The
//! kernels are generic over an [`Algebra`]: real numbers (one float per channel) or complex
//! numbers (interleaved re/im pairs, two floats per channel); spans and rows count floats.
//!
//! Two plans, chosen from the shape alone (so results never depend on the thread count):
//! - channel-parallel: tasks are (batch, channel block) over the whole sequence. For each
//!   step the task reads one contiguous row segment of `a` and `b`, so a full-width block
//!   streams memory sequentially; the running state lives in a small buffer in L1.
//! - time-parallel, when B·D is too small to give enough tasks: time is cut into rounds of
//!   `TIME_PIECES` pieces sized to stay in L2. Per round: (1) each piece but the last is
//!   scanned from zero in parallel, keeping its end state and gate product; (2) a short
//!   sequential pass turns those into each piece's incoming carry; (3) every piece is
//!   re-scanned from its carry in parallel, writing outputs while its inputs are still in
//!   cache. DRAM traffic stays one read of each input and one write of each output.
//!
//! Backward: with q[s] = conj(a[s])·g[s], g[s] = dh[s] + q[s+1] (g = dL/dh including the
//! future, as dL/dRe + i·dL/dIm for complex), q[s] = conj(a[s])·(q[s+1] + dh[s]) is itself a
//! linear scan in reverse logical time; db[s] = g[s], da[s] = conj(h[s-1])·g[s]
//! (h[-1] = h0), dh0 = q[0]. For real numbers conj is the identity.

use crate::cpu::{Isa, SendConstPtr, SendPtr, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use crate::scan::ScanShape;
use rayon::prelude::*;

/// Channel-parallel tasks to aim for when a batch row must be split (shape-based, so the
/// plan, and with it the rounding, never depends on the thread count).
const TARGET_TASKS: usize = 8;
/// Shortest contiguous row segment (bytes) a split may leave: shorter segments restart the
/// hardware prefetcher at every step (each step jumps a whole row) and lose half the
/// bandwidth (measured: 512 of 1024 f32 channels ran at 45% of copy, full rows at 80%+).
const MIN_SEGMENT_BYTES: usize = 16 * 1024;
/// Pieces per round of the time-parallel plan.
const TIME_PIECES: usize = 8;
/// Input bytes (a and b) of one time piece: fits a core's L2 with room to spare.
const PIECE_BYTES: usize = 192 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    Channels { block: usize },
    Time { piece_len: usize },
}

/// Full rows when the batch alone gives enough tasks; otherwise split rows into segments
/// that stay long, or else cut time into cache-sized pieces when the sequence is long.
pub(crate) fn plan(shape: ScanShape, elem_bytes: usize) -> Plan {
    let ScanShape {
        batch,
        len,
        channels,
    } = shape;
    if batch >= TARGET_TASKS || channels == 0 {
        return Plan::Channels {
            block: channels.max(1),
        };
    }
    let blocks_per_batch = TARGET_TASKS.div_ceil(batch.max(1));
    let block = channels
        .div_ceil(blocks_per_batch)
        .next_multiple_of(16)
        .min(channels);
    let piece_len = (PIECE_BYTES / (2 * channels * elem_bytes)).max(64);
    if block * elem_bytes >= MIN_SEGMENT_BYTES || len < 2 * TIME_PIECES * piece_len {
        Plan::Channels { block }
    } else {
        Plan::Time { piece_len }
    }
}

/// Where one task works: per-batch base pointers are added by the caller.
#[derive(Clone, Copy)]
struct Span {
    /// Channels per row (D) and sequence length (T).
    d: usize,
    t_len: usize,
    reverse: bool,
    /// Channel block [c0, c0 + w).
    c0: usize,
    w: usize,
    /// Logical steps [s0, s1).
    s0: usize,
    s1: usize,
}

impl Span {
    /// Offset of row `s` (logical), channel c0.
    #[inline(always)]
    fn row(&self, s: usize) -> usize {
        let t = if self.reverse { self.t_len - 1 - s } else { s };
        t * self.d + self.c0
    }
}

/// The numbers a scan runs over. Vector operations act on whole channels (a vector holds
/// `lanes / WIDTH` of them); the per-channel operations serve row tails and ISAs whose
/// vectors are narrower than one channel.
pub(crate) trait Algebra: Copy + Send + Sync + 'static {
    /// Floats per channel.
    const WIDTH: usize;
    /// The same, as the API's shape bookkeeping names it.
    const NUMBERS: crate::scan::Numbers;
    /// a·x + b.
    ///
    /// # Safety
    ///
    /// The `v*` methods are register-only; like the [`Accum`] methods they call, they need
    /// a CPU that supports `S` (true inside a `SimdKernel::run` entered by `dispatch`).
    unsafe fn vmul_add<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>, b: A::V<S>) -> A::V<S>;
    /// a·x.
    ///
    /// # Safety
    ///
    /// As [`Algebra::vmul_add`].
    unsafe fn vmul<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S>;
    /// conj(a)·x.
    ///
    /// # Safety
    ///
    /// As [`Algebra::vmul_add`].
    unsafe fn vmul_conj<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S>;
    fn mul<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2];
    fn mul_conj<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2];
    /// The multiplicative identity, for products of gates.
    fn one<A: Accum>() -> [A; 2];
}

#[derive(Clone, Copy)]
pub(crate) struct Real;

#[derive(Clone, Copy)]
pub(crate) struct Complex;

// SAFETY (the `unsafe {}` blocks of both impls): register-only Accum calls whose contract
// (the CPU supports S) is the calling method's own (Algebra's # Safety).
#[allow(clippy::undocumented_unsafe_blocks)]
impl Algebra for Real {
    const WIDTH: usize = 1;
    const NUMBERS: crate::scan::Numbers = crate::scan::Numbers::Real;
    #[inline(always)]
    unsafe fn vmul_add<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>, b: A::V<S>) -> A::V<S> {
        unsafe { A::vfma::<S>(a, x, b) }
    }
    #[inline(always)]
    unsafe fn vmul<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S> {
        unsafe { A::vmul::<S>(a, x) }
    }
    #[inline(always)]
    unsafe fn vmul_conj<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S> {
        unsafe { A::vmul::<S>(a, x) }
    }
    #[inline(always)]
    fn mul<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2] {
        [a[0] * x[0], A::ZERO]
    }
    #[inline(always)]
    fn mul_conj<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2] {
        [a[0] * x[0], A::ZERO]
    }
    #[inline(always)]
    fn one<A: Accum>() -> [A; 2] {
        [A::ONE, A::ZERO]
    }
}

// SAFETY: as for `impl Algebra for Real`.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Algebra for Complex {
    const WIDTH: usize = 2;
    const NUMBERS: crate::scan::Numbers = crate::scan::Numbers::Complex;
    #[inline(always)]
    unsafe fn vmul_add<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>, b: A::V<S>) -> A::V<S> {
        unsafe { A::vadd::<S>(A::vcmul::<S>(a, x), b) }
    }
    #[inline(always)]
    unsafe fn vmul<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S> {
        unsafe { A::vcmul::<S>(a, x) }
    }
    #[inline(always)]
    unsafe fn vmul_conj<S: Simd, A: Accum>(a: A::V<S>, x: A::V<S>) -> A::V<S> {
        unsafe { A::vcmul_conj::<S>(a, x) }
    }
    #[inline(always)]
    fn mul<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2] {
        [a[0] * x[0] - a[1] * x[1], a[0] * x[1] + a[1] * x[0]]
    }
    #[inline(always)]
    fn mul_conj<A: Accum>(a: [A; 2], x: [A; 2]) -> [A; 2] {
        [a[0] * x[0] + a[1] * x[1], a[0] * x[1] - a[1] * x[0]]
    }
    #[inline(always)]
    fn one<A: Accum>() -> [A; 2] {
        [A::ONE, A::ZERO]
    }
}

#[inline(always)]
fn add2<A: Accum>(x: [A; 2], y: [A; 2]) -> [A; 2] {
    [x[0] + y[0], x[1] + y[1]]
}

/// Reads one channel (F::WIDTH values) as accumulators.
///
/// # Safety
///
/// `p` is valid for reads of F::WIDTH values and was derived from the whole buffer (a
/// `*const` made from `&x[i]` may not reach x[i + 1], the imaginary part).
#[inline(always)]
unsafe fn load_channel<E: Element, F: Algebra>(p: *const E) -> [E::Acc; 2] {
    // SAFETY: p.add(i) for i < F::WIDTH, readable per this fn's contract.
    unsafe {
        let mut v = [<E::Acc as Accum>::ZERO; 2];
        for (i, x) in v.iter_mut().take(F::WIDTH).enumerate() {
            *x = (*p.add(i)).to_acc();
        }
        v
    }
}

/// Writes one channel (F::WIDTH values), rounded to E.
///
/// # Safety
///
/// `p` is valid for writes of F::WIDTH values and was derived from the whole buffer.
#[inline(always)]
unsafe fn store_channel<E: Element, F: Algebra>(p: *mut E, v: [E::Acc; 2]) {
    // SAFETY: p.add(i) for i < F::WIDTH, writable per this fn's contract.
    unsafe {
        for (i, x) in v.iter().take(F::WIDTH).enumerate() {
            *p.add(i) = E::from_acc(*x);
        }
    }
}

/// Reads one channel of a kernel's state buffer (`state`, `end`, `prod`: raw pointers
/// the kernels hold). Safe code indexes a slice instead: [`channel_of`].
///
/// # Safety
///
/// As [`load_channel`]: `p` is valid for F::WIDTH reads and derived from the whole
/// buffer (never from a reference to one element).
#[inline(always)]
unsafe fn load_state<A: Accum, F: Algebra>(p: *const A) -> [A; 2] {
    // SAFETY: p.add(i) for i < F::WIDTH, readable per this fn's contract.
    unsafe {
        let mut v = [A::ZERO; 2];
        for (i, x) in v.iter_mut().take(F::WIDTH).enumerate() {
            *x = *p.add(i);
        }
        v
    }
}

/// Writes one channel of a kernel's state buffer ([`set_channel`] for slices).
///
/// # Safety
///
/// As [`store_channel`].
#[inline(always)]
unsafe fn store_state<A: Accum, F: Algebra>(p: *mut A, v: [A; 2]) {
    // SAFETY: p.add(i) for i < F::WIDTH, writable per this fn's contract.
    unsafe {
        for (i, x) in v.iter().take(F::WIDTH).enumerate() {
            *p.add(i) = *x;
        }
    }
}

/// The channel (F::WIDTH values) at offset `i` of a state buffer, bounds-checked.
#[inline(always)]
fn channel_of<A: Accum, F: Algebra>(buf: &[A], i: usize) -> [A; 2] {
    let mut v = [A::ZERO; 2];
    v[..F::WIDTH].copy_from_slice(&buf[i..i + F::WIDTH]);
    v
}

/// Writes the channel at offset `i` of a state buffer, bounds-checked.
#[inline(always)]
fn set_channel<A: Accum, F: Algebra>(buf: &mut [A], i: usize, v: [A; 2]) {
    buf[i..i + F::WIDTH].copy_from_slice(&v[..F::WIDTH]);
}

/// Floats the vector loop covers of a w-float span: whole vectors, and only when a vector
/// holds whole channels (a one-lane ISA runs complex numbers in the channel loop).
#[inline(always)]
fn vector_floats<F: Algebra>(w: usize, lanes: usize) -> usize {
    if lanes >= F::WIDTH && lanes.is_multiple_of(F::WIDTH) {
        w - w % lanes
    } else {
        0
    }
}

/// Fills a buffer of states with the multiplicative identity.
fn fill_one<A: Accum, F: Algebra>(buf: &mut [A]) {
    let one = F::one::<A>();
    for chunk in buf.chunks_mut(F::WIDTH) {
        chunk.copy_from_slice(&one[..F::WIDTH]);
    }
}

/// Widest row span (in vectors) kept in registers for the whole span. Narrow rows do little
/// work per step, so per-step loads and stores of the state would dominate them.
const MAX_REGISTER_VECTORS: usize = 4;

/// How many vectors of `lanes` cover a w-float span exactly, if it is narrow enough to live
/// in registers and the vectors hold whole channels.
#[inline(always)]
fn register_vectors<F: Algebra>(w: usize, lanes: usize) -> Option<usize> {
    (vector_floats::<F>(w, lanes) == w && w / lanes <= MAX_REGISTER_VECTORS && w > 0)
        .then_some(w / lanes)
}

/// The instruction set for a forward row span of `w` floats in the channel plan: AVX2 instead
/// of AVX-512 when the span is too wide for registers and E is stored in its accumulator
/// type. That loop streams a and b in and h out (memory-bound, so wider vectors compute
/// nothing faster), and on rows 16 bytes past a 64-byte boundary, as large `Vec`s are, every
/// 512-bit access splits a cache line: B8 T4096 D512 complex 26.7–27.8 → 21.8 ms, the real
/// scan at D1024 26.2–26.9 → 23.2–23.7 ms (Intel Xeon, two threads; a C model of the loop
/// agrees). The register path (narrow spans) and the backward stay faster with AVX-512.
/// (`Isa::Avx512`'s detection includes AVX2; it is checked again here all the same, as
/// `dispatch` does for whatever ISA it is given.)
fn streaming_isa<E: Element>(isa: Isa, w: usize) -> Isa {
    let zmm_lanes = 64 / size_of::<E::Acc>();
    let plain = size_of::<E>() == size_of::<E::Acc>();
    let wide = w > MAX_REGISTER_VECTORS * zmm_lanes;
    if isa == Isa::Avx512 && plain && wide && Isa::Avx2.is_supported() {
        Isa::Avx2
    } else {
        isa
    }
}

/// Signed element step between consecutive logical rows, and the first row's offset.
#[inline(always)]
fn row_walk(span: &Span, descending: bool) -> (isize, isize) {
    let step = span.d as isize;
    let forward_in_memory = span.reverse == descending;
    let first = if descending {
        span.row(span.s1 - 1)
    } else {
        span.row(span.s0)
    };
    (if forward_in_memory { step } else { -step }, first as isize)
}

/// ForwardApply with the state of N vectors held in registers.
///
/// # Safety (this fn and the three other `*_registers` fns)
///
/// The CPU supports `S` (they run inside the kernel's `run`, entered by `dispatch`); the
/// kernel's pointers satisfy its struct's invariant (see [`ForwardApply`]); and
/// `N · lanes == span.w` (checked by `register_vectors`, the only way in via
/// `try_registers!`), so the vector accesses cover exactly the span's w floats.
#[inline(always)]
unsafe fn forward_apply_registers<S: Simd, E: Element, F: Algebra, const N: usize>(
    k: ForwardApply<E, F>,
) {
    let lanes = E::Acc::lanes::<S>();
    let (step, mut row) = row_walk(&k.span, false);
    // SAFETY: per this fn's contract: rows s0..s1 of the span (row_walk starts at s0 and
    // steps one row per step) and floats c0..c0 + N·lanes = c0 + w of each are in bounds of
    // a, b, h; `state` holds w values.
    unsafe {
        let mut st = [E::Acc::vsplat::<S>(<E::Acc as Accum>::ZERO); N];
        for (i, v) in st.iter_mut().enumerate() {
            *v = E::Acc::vload::<S>(k.state.add(i * lanes));
        }
        for _ in k.span.s0..k.span.s1 {
            let (ar, br, hr) = (k.a.offset(row), k.b.offset(row), k.h.offset(row));
            for (i, v) in st.iter_mut().enumerate() {
                *v = F::vmul_add::<S, E::Acc>(
                    E::vload::<S>(ar.add(i * lanes)),
                    *v,
                    E::vload::<S>(br.add(i * lanes)),
                );
                E::vstore::<S>(hr.add(i * lanes), *v);
            }
            row += step;
        }
        for (i, v) in st.iter().enumerate() {
            E::Acc::vstore::<S>(k.state.add(i * lanes), *v);
        }
    }
}

/// ForwardSummary with end state and gate product in registers.
///
/// # Safety
///
/// As [`forward_apply_registers`], for [`ForwardSummary`]'s pointers.
#[inline(always)]
unsafe fn forward_summary_registers<S: Simd, E: Element, F: Algebra, const N: usize>(
    k: ForwardSummary<E, F>,
) {
    let lanes = E::Acc::lanes::<S>();
    let (step, mut row) = row_walk(&k.span, false);
    // SAFETY: as in forward_apply_registers; `end` and `prod` hold w values.
    unsafe {
        let mut end = [E::Acc::vsplat::<S>(<E::Acc as Accum>::ZERO); N];
        let mut prod = end;
        for i in 0..N {
            end[i] = E::Acc::vload::<S>(k.end.add(i * lanes));
            prod[i] = E::Acc::vload::<S>(k.prod.add(i * lanes));
        }
        for _ in k.span.s0..k.span.s1 {
            let (ar, br) = (k.a.offset(row), k.b.offset(row));
            for i in 0..N {
                let av = E::vload::<S>(ar.add(i * lanes));
                end[i] = F::vmul_add::<S, E::Acc>(av, end[i], E::vload::<S>(br.add(i * lanes)));
                prod[i] = F::vmul::<S, E::Acc>(av, prod[i]);
            }
            row += step;
        }
        for i in 0..N {
            E::Acc::vstore::<S>(k.end.add(i * lanes), end[i]);
            E::Acc::vstore::<S>(k.prod.add(i * lanes), prod[i]);
        }
    }
}

/// BackwardSummary with q and the gate product in registers.
///
/// # Safety
///
/// As [`forward_apply_registers`], for [`BackwardSummary`]'s pointers.
#[inline(always)]
unsafe fn backward_summary_registers<S: Simd, E: Element, F: Algebra, const N: usize>(
    k: BackwardSummary<E, F>,
) {
    let lanes = E::Acc::lanes::<S>();
    let (step, mut row) = row_walk(&k.span, true);
    // SAFETY: as in forward_apply_registers (rows s1-1 down to s0); `end` and `prod` hold w
    // values.
    unsafe {
        let mut end = [E::Acc::vsplat::<S>(<E::Acc as Accum>::ZERO); N];
        let mut prod = end;
        for i in 0..N {
            end[i] = E::Acc::vload::<S>(k.end.add(i * lanes));
            prod[i] = E::Acc::vload::<S>(k.prod.add(i * lanes));
        }
        for _ in k.span.s0..k.span.s1 {
            let (ar, dhr) = (k.a.offset(row), k.dh.offset(row));
            for i in 0..N {
                let av = E::vload::<S>(ar.add(i * lanes));
                let g = E::Acc::vadd::<S>(E::vload::<S>(dhr.add(i * lanes)), end[i]);
                end[i] = F::vmul_conj::<S, E::Acc>(av, g);
                prod[i] = F::vmul_conj::<S, E::Acc>(av, prod[i]);
            }
            row += step;
        }
        for i in 0..N {
            E::Acc::vstore::<S>(k.end.add(i * lanes), end[i]);
            E::Acc::vstore::<S>(k.prod.add(i * lanes), prod[i]);
        }
    }
}

/// BackwardApply with q in registers (h[s-1] is read from memory as in the general loop).
///
/// # Safety
///
/// As [`forward_apply_registers`], for [`BackwardApply`]'s pointers.
#[inline(always)]
unsafe fn backward_apply_registers<S: Simd, E: Element, F: Algebra, const N: usize>(
    k: BackwardApply<E, F>,
) {
    let lanes = E::Acc::lanes::<S>();
    let zero = <E::Acc as Accum>::ZERO;
    let (step, mut row) = row_walk(&k.span, true);
    // SAFETY: as in forward_apply_registers (rows s1-1 down to s0); `prev_row` is asked for
    // row s-1 only when s > 0 (else h0's row or null), and `state` holds w values.
    unsafe {
        let mut q = [E::Acc::vsplat::<S>(zero); N];
        for (i, v) in q.iter_mut().enumerate() {
            *v = E::Acc::vload::<S>(k.state.add(i * lanes));
        }
        for s in (k.span.s0..k.span.s1).rev() {
            // h[s-1] is the next row of this descending walk
            let prev = k.prev_row(s, row + step);
            let (ar, dhr, dar, dbr) = (
                k.a.offset(row),
                k.dh.offset(row),
                k.da.offset(row),
                k.db.offset(row),
            );
            for (i, v) in q.iter_mut().enumerate() {
                let g = E::Acc::vadd::<S>(E::vload::<S>(dhr.add(i * lanes)), *v);
                E::vstore::<S>(dbr.add(i * lanes), g);
                let hp = if prev.is_null() {
                    E::Acc::vsplat::<S>(zero)
                } else {
                    E::vload::<S>(prev.add(i * lanes))
                };
                E::vstore::<S>(dar.add(i * lanes), F::vmul_conj::<S, E::Acc>(hp, g));
                *v = F::vmul_conj::<S, E::Acc>(E::vload::<S>(ar.add(i * lanes)), g);
            }
            row += step;
        }
        for (i, v) in q.iter().enumerate() {
            E::Acc::vstore::<S>(k.state.add(i * lanes), *v);
        }
    }
}

/// Runs `$kernel` through its register variant when the span is narrow enough.
macro_rules! try_registers {
    ($kernel:ident, $self:ident, $S:ident, $E:ident, $F:ident) => {
        match register_vectors::<$F>($self.span.w, $E::Acc::lanes::<$S>()) {
            // SAFETY: we are in the kernel's `run` (entered by `dispatch`: ISA checked), its
            // pointers satisfy the struct's invariant, and register_vectors just said
            // N · lanes == span.w: the register fn's contract (the same for every arm).
            Some(1) => return unsafe { $kernel::<$S, $E, $F, 1>($self) },
            // SAFETY: as the arm above
            Some(2) => return unsafe { $kernel::<$S, $E, $F, 2>($self) },
            // SAFETY: as the arm above
            Some(3) => return unsafe { $kernel::<$S, $E, $F, 3>($self) },
            // SAFETY: as the arm above
            Some(4) => return unsafe { $kernel::<$S, $E, $F, 4>($self) },
            _ => {}
        }
    };
}

/// Forward over a span from the carry in `state` (w floats), writing h; leaves the last
/// state in `state`.
///
/// Invariant of this and the three other kernel structs below (their safe `run`
/// dereferences the raw pointers on it; they are built only in [`forward`] and
/// [`backward`], which justify it where they compute the pointers): for every logical step
/// s in span.s0..span.s1, each tensor pointer plus `span.row(s)` (and h0 plus c0) starts w
/// in-bounds elements of one batch's `[T, D]` block; the state pointers (`state`, `end`,
/// `prod`) hold w accumulators of a buffer the task owns; and no other thread or live
/// reference touches the parts this kernel writes while it runs.
#[derive(Clone, Copy)]
struct ForwardApply<E: Element, F: Algebra> {
    span: Span,
    a: *const E,
    b: *const E,
    h: *mut E,
    state: *mut E::Acc,
    algebra: std::marker::PhantomData<F>,
}

impl<E: Element, F: Algebra> SimdKernel for ForwardApply<E, F> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        try_registers!(forward_apply_registers, self, S, E, F);
        let Self {
            span,
            a,
            b,
            h,
            state,
            ..
        } = self;
        let lanes = E::Acc::lanes::<S>();
        let vec_end = vector_floats::<F>(span.w, lanes);
        // SAFETY: the struct's invariant (established where `forward` builds the kernel):
        // every row offset of the span plus w is in bounds of a, b and h, `state` holds w
        // values, and only this task writes its part of h; c < w in both loops (the channel
        // loop reads F::WIDTH values at c, and w is a multiple of F::WIDTH). The ISA was
        // checked by `dispatch`, which entered this `run`.
        unsafe {
            for s in span.s0..span.s1 {
                let row = span.row(s);
                let (ar, br, hr) = (a.add(row), b.add(row), h.add(row));
                let mut c = 0;
                while c < vec_end {
                    let prev = E::Acc::vload::<S>(state.add(c));
                    let next = F::vmul_add::<S, E::Acc>(
                        E::vload::<S>(ar.add(c)),
                        prev,
                        E::vload::<S>(br.add(c)),
                    );
                    E::Acc::vstore::<S>(state.add(c), next);
                    E::vstore::<S>(hr.add(c), next);
                    c += lanes;
                }
                while c < span.w {
                    let x = load_state::<E::Acc, F>(state.add(c));
                    let next = add2(
                        F::mul(load_channel::<E, F>(ar.add(c)), x),
                        load_channel::<E, F>(br.add(c)),
                    );
                    store_state::<E::Acc, F>(state.add(c), next);
                    store_channel::<E, F>(hr.add(c), next);
                    c += F::WIDTH;
                }
            }
        }
    }
}

/// Forward over a span from a zero state, writing nothing: leaves the end state in `end` and
/// the product of the gates in `prod` (preset to zero and one by the caller).
#[derive(Clone, Copy)]
struct ForwardSummary<E: Element, F: Algebra> {
    span: Span,
    a: *const E,
    b: *const E,
    end: *mut E::Acc,
    prod: *mut E::Acc,
    algebra: std::marker::PhantomData<F>,
}

impl<E: Element, F: Algebra> SimdKernel for ForwardSummary<E, F> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        try_registers!(forward_summary_registers, self, S, E, F);
        let Self {
            span,
            a,
            b,
            end,
            prod,
            ..
        } = self;
        let lanes = E::Acc::lanes::<S>();
        let vec_end = vector_floats::<F>(span.w, lanes);
        // SAFETY: as ForwardApply; end and prod hold w values.
        unsafe {
            for s in span.s0..span.s1 {
                let row = span.row(s);
                let (ar, br) = (a.add(row), b.add(row));
                let mut c = 0;
                while c < vec_end {
                    let av = E::vload::<S>(ar.add(c));
                    let e = F::vmul_add::<S, E::Acc>(
                        av,
                        E::Acc::vload::<S>(end.add(c)),
                        E::vload::<S>(br.add(c)),
                    );
                    E::Acc::vstore::<S>(end.add(c), e);
                    E::Acc::vstore::<S>(
                        prod.add(c),
                        F::vmul::<S, E::Acc>(av, E::Acc::vload::<S>(prod.add(c))),
                    );
                    c += lanes;
                }
                while c < span.w {
                    let av = load_channel::<E, F>(ar.add(c));
                    let e = add2(
                        F::mul(av, load_state::<E::Acc, F>(end.add(c))),
                        load_channel::<E, F>(br.add(c)),
                    );
                    store_state::<E::Acc, F>(end.add(c), e);
                    store_state::<E::Acc, F>(
                        prod.add(c),
                        F::mul(av, load_state::<E::Acc, F>(prod.add(c))),
                    );
                    c += F::WIDTH;
                }
            }
        }
    }
}

/// Backward over a span in descending logical time from the carry q in `state`, writing
/// da and db; leaves q at the span's first step in `state`.
#[derive(Clone, Copy)]
struct BackwardApply<E: Element, F: Algebra> {
    span: Span,
    a: *const E,
    h: *const E,
    dh: *const E,
    /// This batch's h0 row (channel 0), or null for a zero initial state.
    h0: *const E,
    da: *mut E,
    db: *mut E,
    state: *mut E::Acc,
    algebra: std::marker::PhantomData<F>,
}

impl<E: Element, F: Algebra> BackwardApply<E, F> {
    /// h[s-1] at this span's first channel (row `prev_row` of h), h0 for s = 0, or null for
    /// a zero initial state.
    ///
    /// # Safety
    ///
    /// When s > 0, `prev_row` is the offset of logical row s - 1 (`span.row(s - 1)`), so it
    /// is in bounds of h by the struct's invariant; h0 (non-null) holds the batch's D values.
    #[inline(always)]
    unsafe fn prev_row(&self, s: usize, prev_row: isize) -> *const E {
        // SAFETY: per this fn's contract (h.offset only for s > 0; h0.add(c0) with c0 < D).
        unsafe {
            if s > 0 {
                self.h.offset(prev_row)
            } else if self.h0.is_null() {
                std::ptr::null()
            } else {
                self.h0.add(self.span.c0)
            }
        }
    }
}

impl<E: Element, F: Algebra> SimdKernel for BackwardApply<E, F> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        try_registers!(backward_apply_registers, self, S, E, F);
        let span = self.span;
        let Self {
            a,
            dh,
            da,
            db,
            state,
            ..
        } = self;
        let lanes = E::Acc::lanes::<S>();
        let zero = <E::Acc as Accum>::ZERO;
        let vec_end = vector_floats::<F>(span.w, lanes);
        // SAFETY: as ForwardApply; h0 (when not null) holds the batch's row.
        unsafe {
            for s in (span.s0..span.s1).rev() {
                let row = span.row(s);
                let prev = if s > 0 {
                    self.prev_row(s, span.row(s - 1) as isize)
                } else {
                    self.prev_row(0, 0)
                };
                let (ar, dhr, dar, dbr) = (a.add(row), dh.add(row), da.add(row), db.add(row));
                let mut c = 0;
                while c < vec_end {
                    let g = E::Acc::vadd::<S>(
                        E::vload::<S>(dhr.add(c)),
                        E::Acc::vload::<S>(state.add(c)),
                    );
                    E::vstore::<S>(dbr.add(c), g);
                    let hp = if prev.is_null() {
                        E::Acc::vsplat::<S>(zero)
                    } else {
                        E::vload::<S>(prev.add(c))
                    };
                    E::vstore::<S>(dar.add(c), F::vmul_conj::<S, E::Acc>(hp, g));
                    E::Acc::vstore::<S>(
                        state.add(c),
                        F::vmul_conj::<S, E::Acc>(E::vload::<S>(ar.add(c)), g),
                    );
                    c += lanes;
                }
                while c < span.w {
                    let g = add2(
                        load_channel::<E, F>(dhr.add(c)),
                        load_state::<E::Acc, F>(state.add(c)),
                    );
                    store_channel::<E, F>(dbr.add(c), g);
                    let hp = if prev.is_null() {
                        [zero; 2]
                    } else {
                        load_channel::<E, F>(prev.add(c))
                    };
                    store_channel::<E, F>(dar.add(c), F::mul_conj(hp, g));
                    store_state::<E::Acc, F>(
                        state.add(c),
                        F::mul_conj(load_channel::<E, F>(ar.add(c)), g),
                    );
                    c += F::WIDTH;
                }
            }
        }
    }
}

/// Backward summary of a span from q = 0: q = conj(a)·(dh + q) in descending logical time,
/// and the product of conj(a).
#[derive(Clone, Copy)]
struct BackwardSummary<E: Element, F: Algebra> {
    span: Span,
    a: *const E,
    dh: *const E,
    end: *mut E::Acc,
    prod: *mut E::Acc,
    algebra: std::marker::PhantomData<F>,
}

impl<E: Element, F: Algebra> SimdKernel for BackwardSummary<E, F> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        try_registers!(backward_summary_registers, self, S, E, F);
        let Self {
            span,
            a,
            dh,
            end,
            prod,
            ..
        } = self;
        let lanes = E::Acc::lanes::<S>();
        let vec_end = vector_floats::<F>(span.w, lanes);
        // SAFETY: as ForwardSummary.
        unsafe {
            for s in (span.s0..span.s1).rev() {
                let row = span.row(s);
                let (ar, dhr) = (a.add(row), dh.add(row));
                let mut c = 0;
                while c < vec_end {
                    let av = E::vload::<S>(ar.add(c));
                    let g = E::Acc::vadd::<S>(
                        E::vload::<S>(dhr.add(c)),
                        E::Acc::vload::<S>(end.add(c)),
                    );
                    E::Acc::vstore::<S>(end.add(c), F::vmul_conj::<S, E::Acc>(av, g));
                    E::Acc::vstore::<S>(
                        prod.add(c),
                        F::vmul_conj::<S, E::Acc>(av, E::Acc::vload::<S>(prod.add(c))),
                    );
                    c += lanes;
                }
                while c < span.w {
                    let av = load_channel::<E, F>(ar.add(c));
                    let g = add2(
                        load_channel::<E, F>(dhr.add(c)),
                        load_state::<E::Acc, F>(end.add(c)),
                    );
                    store_state::<E::Acc, F>(end.add(c), F::mul_conj(av, g));
                    store_state::<E::Acc, F>(
                        prod.add(c),
                        F::mul_conj(av, load_state::<E::Acc, F>(prod.add(c))),
                    );
                    c += F::WIDTH;
                }
            }
        }
    }
}

fn state_from<E: Element>(h0: Option<&[E]>, len: usize) -> Vec<E::Acc> {
    match h0 {
        Some(h0) => h0.iter().map(|x| x.to_acc()).collect(),
        None => vec![<E::Acc as Accum>::ZERO; len],
    }
}

/// Channel blocks of every batch, as (batch, c0, w).
fn channel_tasks(shape: ScanShape, block: usize) -> Vec<(usize, usize, usize)> {
    let d = shape.channels;
    (0..shape.batch)
        .flat_map(|bi| {
            (0..d)
                .step_by(block)
                .map(move |c0| (bi, c0, block.min(d - c0)))
        })
        .collect()
}

/// Logical step range of piece `p` of the round [lo, hi): forward pieces ascend from lo,
/// backward pieces descend from hi (piece 0 runs first in the recurrence's order).
fn piece_range(
    lo: usize,
    hi: usize,
    p: usize,
    piece_len: usize,
    descending: bool,
) -> (usize, usize) {
    if descending {
        let top = hi.saturating_sub(p * piece_len).max(lo);
        (top.saturating_sub(piece_len).max(lo), top)
    } else {
        let start = (lo + p * piece_len).min(hi);
        (start, (start + piece_len).min(hi))
    }
}

/// The time-parallel plan for either direction. Rounds of TIME_PIECES pieces run in the
/// recurrence's order; `summary(batch, s0, s1, end, prod)` reduces a piece from a zero state,
/// `apply(batch, s0, s1, state)` runs it from its carry (left in `state`). Each round is one
/// parallel phase: every piece is applied and, in the same task, the piece of the next round
/// is summarized (its inputs then wait in cache for the next phase). Between phases a short
/// sequential pass chains the carries: carry[p+1] = prod[p]·carry[p] + end[p].
/// `carry` holds the state entering the first round and is left with the final state.
fn time_parallel<A: Accum, F: Algebra>(
    shape: ScanShape,
    piece_len: usize,
    descending: bool,
    carry: &mut [A],
    summary: impl Fn(usize, usize, usize, &mut [A], &mut [A]) + Sync,
    apply: impl Fn(usize, usize, usize, &mut [A]) + Sync,
) {
    let (batch, t_len, d) = (shape.batch, shape.len, shape.channels);
    let round_len = TIME_PIECES * piece_len;
    let rounds: Vec<(usize, usize)> = (0..t_len.div_ceil(round_len))
        .map(|r| {
            if descending {
                let hi = t_len - r * round_len;
                (hi.saturating_sub(round_len), hi)
            } else {
                (r * round_len, ((r + 1) * round_len).min(t_len))
            }
        })
        .collect();
    let pieces = |round: usize, p: usize| {
        let (lo, hi) = rounds[round];
        piece_range(lo, hi, p, piece_len, descending)
    };
    let items = batch * TIME_PIECES;
    let mut ends = vec![A::ZERO; items * d];
    let mut prods = vec![A::ZERO; items * d];
    fill_one::<A, F>(&mut prods);
    let mut states = vec![A::ZERO; items * d];
    // summaries of the first round (the last piece's is never needed)
    let summarize = |round: usize, i: usize, end: &mut [A], prod: &mut [A]| {
        let (bi, p) = (i / TIME_PIECES, i % TIME_PIECES);
        if p + 1 < TIME_PIECES {
            end.fill(A::ZERO);
            fill_one::<A, F>(prod);
            let (s0, s1) = pieces(round, p);
            summary(bi, s0, s1, end, prod);
        }
    };
    ends.par_chunks_mut(d)
        .zip(prods.par_chunks_mut(d))
        .enumerate()
        .for_each(|(i, (end, prod))| summarize(0, i, end, prod));
    for round in 0..rounds.len() {
        for bi in 0..batch {
            let first = bi * TIME_PIECES * d;
            states[first..first + d].copy_from_slice(&carry[bi * d..(bi + 1) * d]);
            for p in 1..TIME_PIECES {
                let (prev, next) = (first + (p - 1) * d, first + p * d);
                // Safe, bounds-checked indexing: this pass touches B·TIME_PIECES·D values per
                // round (nothing next to the scan itself). A channel is F::WIDTH values, so
                // it is read as a sub-slice, never through a pointer made from one element.
                for c in (0..d).step_by(F::WIDTH) {
                    let (i, j) = (prev + c, next + c);
                    let carried = add2(
                        F::mul(
                            channel_of::<A, F>(&prods, i),
                            channel_of::<A, F>(&states, i),
                        ),
                        channel_of::<A, F>(&ends, i),
                    );
                    set_channel::<A, F>(&mut states, j, carried);
                }
            }
        }
        let next_round = round + 1 < rounds.len();
        states
            .par_chunks_mut(d)
            .zip(ends.par_chunks_mut(d))
            .zip(prods.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, ((state, end), prod))| {
                let (s0, s1) = pieces(round, i % TIME_PIECES);
                apply(i / TIME_PIECES, s0, s1, state);
                if next_round {
                    summarize(round + 1, i, end, prod);
                }
            });
        for bi in 0..batch {
            let last = (bi * TIME_PIECES + TIME_PIECES - 1) * d;
            carry[bi * d..(bi + 1) * d].copy_from_slice(&states[last..last + d]);
        }
    }
}

pub(crate) fn forward<E: Element, F: Algebra>(
    isa: Isa,
    reverse: bool,
    shape: ScanShape,
    a: &[E],
    b: &[E],
    h0: Option<&[E]>,
    h: &mut [E],
) {
    let ScanShape {
        batch,
        len: t_len,
        channels: d,
    } = shape;
    // Every pointer offset below relies on these lengths (`shape` counts floats: D·width
    // per row). The entry point (forward_on in scan/mod.rs) checked them already with
    // named errors (validate_forward); re-checking costs O(1) and keeps this safe fn sound
    // for any caller.
    let n = shape
        .numel("a")
        .expect("scan shape validated by validate_forward");
    assert!(a.len() == n && b.len() == n && h.len() == n);
    assert!(h0.is_none_or(|h0| h0.len() == batch * d));
    let (ap, bp, hp) = (
        SendConstPtr(a.as_ptr()),
        SendConstPtr(b.as_ptr()),
        SendPtr(h.as_mut_ptr()),
    );
    let batch_stride = t_len * d;
    // The start of batch bi's [T, D] block of a, b and h.
    let batch_ptrs = move |bi: usize| {
        assert!(bi < batch);
        let base = bi * batch_stride;
        // SAFETY: bi < B (asserted; channel_tasks and time_parallel only give such bi), so
        // base + T·D <= B·T·D = n, the length of a, b and h (asserted on entry): each
        // offset stays inside its slice, and the block [base, base + T·D) too. The pointers
        // come from the whole slices (`as_ptr`/`as_mut_ptr`), so they may reach all of it.
        unsafe { (ap.get().add(base), bp.get().add(base), hp.get().add(base)) }
    };
    match plan(shape, E::DTYPE.size_bytes()) {
        Plan::Channels { block } => {
            channel_tasks(shape, block)
                .into_par_iter()
                .for_each(|(bi, c0, w)| {
                    let mut state = match h0 {
                        Some(h0) => state_from(Some(&h0[bi * d + c0..bi * d + c0 + w]), w),
                        None => state_from::<E>(None, w),
                    };
                    let (a, b, h) = batch_ptrs(bi);
                    let span = Span {
                        d,
                        t_len,
                        reverse,
                        c0,
                        w,
                        s0: 0,
                        s1: t_len,
                    };
                    // The kernel's invariant: rows t·D + c0 .. + w with t < T and
                    // c0 + w <= D (channel_tasks) lie in batch bi's block; `state` holds w
                    // values; tasks own disjoint (batch, channel block) parts of h, and
                    // nothing else borrows h while the tasks run (`h` is &mut here).
                    let kernel = ForwardApply {
                        span,
                        a,
                        b,
                        h,
                        state: state.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(streaming_isa::<E>(isa, w), kernel);
                });
        }
        Plan::Time { piece_len } => {
            let mut carry = state_from(h0, batch * d);
            let span = Span {
                d,
                t_len,
                reverse,
                c0: 0,
                w: d,
                s0: 0,
                s1: 0,
            };
            time_parallel::<E::Acc, F>(
                shape,
                piece_len,
                false,
                &mut carry,
                |bi, s0, s1, end: &mut [E::Acc], prod: &mut [E::Acc]| {
                    let (a, b, _) = batch_ptrs(bi);
                    // The kernel's invariant: whole rows (c0 = 0, w = D) of steps
                    // s0..s1 <= T (piece_range stays inside the round, the round inside
                    // 0..T); `end` and `prod` are this piece's D-value chunks. Writes
                    // nothing in a tensor.
                    debug_assert!(s1 <= t_len && end.len() == d && prod.len() == d);
                    let kernel = ForwardSummary {
                        span: Span { s0, s1, ..span },
                        a,
                        b,
                        end: end.as_mut_ptr(),
                        prod: prod.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(isa, kernel);
                },
                |bi, s0, s1, state: &mut [E::Acc]| {
                    let (a, b, h) = batch_ptrs(bi);
                    // The kernel's invariant: as the summary's, with `state` this piece's
                    // D-value chunk; pieces own disjoint (batch, time range) parts of h,
                    // and nothing else borrows h while they run.
                    debug_assert!(s1 <= t_len && state.len() == d);
                    let kernel = ForwardApply {
                        span: Span { s0, s1, ..span },
                        a,
                        b,
                        h,
                        state: state.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(isa, kernel);
                },
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<E: Element, F: Algebra>(
    isa: Isa,
    reverse: bool,
    shape: ScanShape,
    a: &[E],
    h: &[E],
    dh: &[E],
    h0: Option<&[E]>,
    da: &mut [E],
    db: &mut [E],
    dh0: &mut [E],
) {
    let ScanShape {
        batch,
        len: t_len,
        channels: d,
    } = shape;
    // As in `forward`: the pointer offsets below rely on these lengths, which the entry point
    // (backward_on in scan/mod.rs, validate_backward) checked; re-checked here in O(1).
    let n = shape
        .numel("a")
        .expect("scan shape validated by validate_backward");
    assert!(a.len() == n && h.len() == n && dh.len() == n && da.len() == n && db.len() == n);
    assert!(h0.is_none_or(|h0| h0.len() == batch * d) && dh0.len() == batch * d);
    let (ap, hp, dhp) = (
        SendConstPtr(a.as_ptr()),
        SendConstPtr(h.as_ptr()),
        SendConstPtr(dh.as_ptr()),
    );
    let h0p = SendConstPtr(h0.map_or(std::ptr::null(), <[E]>::as_ptr));
    let (dap, dbp) = (SendPtr(da.as_mut_ptr()), SendPtr(db.as_mut_ptr()));
    let batch_stride = t_len * d;
    // The start of batch bi's [T, D] block of a, h, dh, da and db.
    let batch_ptrs = move |bi: usize| {
        assert!(bi < batch);
        let base = bi * batch_stride;
        // SAFETY: bi < B (asserted), so base + T·D <= B·T·D = n, the length of all five
        // slices (asserted on entry); the pointers come from the whole slices.
        unsafe {
            (
                ap.get().add(base),
                hp.get().add(base),
                dhp.get().add(base),
                dap.get().add(base),
                dbp.get().add(base),
            )
        }
    };
    // Batch bi's row of h0 [B, D], or null for a zero initial state.
    let h0_row = move |bi: usize| {
        if h0p.get().is_null() {
            std::ptr::null()
        } else {
            assert!(bi < batch);
            // SAFETY: bi < B and h0.len() == B·D (asserted on entry): the row is in bounds.
            unsafe { h0p.get().add(bi * d) }
        }
    };
    match plan(shape, E::DTYPE.size_bytes()) {
        Plan::Channels { block } => {
            let dh0p = SendPtr(dh0.as_mut_ptr());
            channel_tasks(shape, block)
                .into_par_iter()
                .for_each(|(bi, c0, w)| {
                    let mut state = vec![<E::Acc as Accum>::ZERO; w];
                    let (a, h, dh, da, db) = batch_ptrs(bi);
                    let span = Span {
                        d,
                        t_len,
                        reverse,
                        c0,
                        w,
                        s0: 0,
                        s1: t_len,
                    };
                    // The kernel's invariant: rows t·D + c0 .. + w with t < T and
                    // c0 + w <= D (channel_tasks) lie in batch bi's block, and h0's row holds
                    // D values; tasks own disjoint (batch, channel block) parts of da and db,
                    // which nothing else borrows while the tasks run.
                    let kernel = BackwardApply {
                        span,
                        a,
                        h,
                        dh,
                        h0: h0_row(bi),
                        da,
                        db,
                        state: state.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(isa, kernel);
                    for (c, q) in state.iter().enumerate() {
                        // SAFETY: bi·D + c0 + c < B·D = dh0.len() (bi < B, c0 + w <= D,
                        // c < w); tasks own disjoint (batch, channel block) parts of dh0.
                        unsafe { *dh0p.get().add(bi * d + c0 + c) = E::from_acc(*q) };
                    }
                });
        }
        Plan::Time { piece_len } => {
            let mut carry = vec![<E::Acc as Accum>::ZERO; batch * d];
            let span = Span {
                d,
                t_len,
                reverse,
                c0: 0,
                w: d,
                s0: 0,
                s1: 0,
            };
            time_parallel::<E::Acc, F>(
                shape,
                piece_len,
                true,
                &mut carry,
                |bi, s0, s1, end: &mut [E::Acc], prod: &mut [E::Acc]| {
                    let (a, _, dh, _, _) = batch_ptrs(bi);
                    // The kernel's invariant: whole rows (c0 = 0, w = D) of steps
                    // s0..s1 <= T (piece_range stays inside the round, the round inside
                    // 0..T); `end` and `prod` are this piece's D-value chunks. Writes
                    // nothing in a tensor.
                    debug_assert!(s1 <= t_len && end.len() == d && prod.len() == d);
                    let kernel = BackwardSummary {
                        span: Span { s0, s1, ..span },
                        a,
                        dh,
                        end: end.as_mut_ptr(),
                        prod: prod.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(isa, kernel);
                },
                |bi, s0, s1, state: &mut [E::Acc]| {
                    let (a, h, dh, da, db) = batch_ptrs(bi);
                    // The kernel's invariant: as the summary's, with `state` this piece's
                    // D-value chunk and h0's row D values; pieces own disjoint (batch, time
                    // range) parts of da and db, which nothing else borrows meanwhile.
                    debug_assert!(s1 <= t_len && state.len() == d);
                    let kernel = BackwardApply {
                        span: Span { s0, s1, ..span },
                        a,
                        h,
                        dh,
                        h0: h0_row(bi),
                        da,
                        db,
                        state: state.as_mut_ptr(),
                        algebra: std::marker::PhantomData::<F>,
                    };
                    dispatch(isa, kernel);
                },
            );
            for (out, q) in dh0.iter_mut().zip(&carry) {
                *out = E::from_acc(*q);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_both_paths_for_the_tested_shapes() {
        // tests/scan_linear.rs relies on these shapes taking the time-parallel plan
        for (shape, bytes) in [
            (ScanShape::new(1, 140_000, 3), 4),
            (ScanShape::new(2, 70_001, 3), 8),
            (ScanShape::new(1, 140_000, 3), 8),
            (ScanShape::new(1, 140_000, 6), 2),
            (ScanShape::new(1, 262_144, 16), 4),
        ] {
            assert!(
                matches!(plan(shape, bytes), Plan::Time { .. }),
                "{shape} x {bytes}B"
            );
        }
        assert_eq!(
            plan(ScanShape::new(8, 4096, 1024), 4),
            Plan::Channels { block: 1024 }
        );
        assert_eq!(
            plan(ScanShape::new(3, 17, 13), 4),
            Plan::Channels { block: 13 }
        );
        assert_eq!(
            plan(ScanShape::new(64, 100, 1024), 4),
            Plan::Channels { block: 1024 }
        );
        assert_eq!(
            plan(ScanShape::new(1, 100, 1 << 20), 4),
            Plan::Channels { block: 1 << 17 }
        );
        assert!(matches!(
            plan(ScanShape::new(2, 4096, 1024), 4),
            Plan::Time { .. }
        ));
    }

    #[test]
    fn piece_ranges_tile_a_round_in_both_directions() {
        for (lo, hi, len) in [(0, 100, 16), (32, 40, 16), (0, 128, 16)] {
            let mut covered = vec![0; hi];
            for p in 0..TIME_PIECES {
                for desc in [false, true] {
                    let (s0, s1) = piece_range(lo, hi, p, len, desc);
                    assert!(lo <= s0 && s0 <= s1 && s1 <= hi);
                    for c in &mut covered[s0..s1] {
                        *c += 1;
                    }
                }
            }
            assert!(covered[lo..hi].iter().all(|&c| c == 2) || hi - lo > TIME_PIECES * len);
        }
    }
}
