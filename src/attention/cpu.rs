//! The CPU kernels of the attention family.
//!
//! Plan (FlashAttention-2 on cache-resident blocks):
//! - Keys are transposed once per (batch, KV head) into panels of FWD_BLOCK_K keys (BLOCK_K
//!   for the backward; `[D × w]`, contiguous, in the accumulator type); each query block is
//!   packed once into 6-row strips (`pack_queries`), so a score tile S = Q·Kᵀ is one
//!   register-tiled product (`matmul_packed`: 6 rows × 2 vectors, × 4 with 32 registers;
//!   broadcasts from consecutive addresses). Values are copied once to head-major rows (each
//!   head's rows contiguous) in the accumulator type. These copies come from the per-thread
//!   pool of `cpu::scratch`, so repeated calls do not fault their pages in again.
//! - Forward: a task owns (sequence, query head, block of BLOCK_Q rows) and walks only the
//!   key blocks some row of it can see (causal/window masks are per-row key intervals, so
//!   masked-out blocks are skipped entirely, and on an edge block each 6-row strip stops its
//!   products at the last key its rows see); per row an online softmax on base-2 scores
//!   log2(e)·s (exponentials are `exp2`), its running max m held while a block stays within
//!   2^MAX_SLACK of it (vector compares, no horizontal max or rescale) and its sum l kept as
//!   per-lane partial sums. A block every row sees whole (no softcap/ALiBi/bias) takes that
//!   step in the score tiles' epilogue, in registers (`scores_to_probs`), and is redone the
//!   general way if a score moves m; then O += P·V (`cpu::gemm::gemm_acc`, P read in place at a
//!   constant stride). o = O / l, lse = ln2·m + ln l; a row that saw no key gives o = 0,
//!   lse = −inf.
//! - Decode (split-KV): a task owns (sequence, chunk of SPLIT_CHUNK keys) and every query row
//!   of every head; block by block it scores the keys in place, key position by key position
//!   over every KV head (each key read once, front to back; four dot products reduced at
//!   once), then per head one online-softmax step and O += P·V with the value rows read in
//!   place; (O, m, l) per head; the chunks are merged in chunk order through their
//!   log-sum-exps.
//! - Backward: D = rowsum(dO∘O); S and dP read the head-major q and dO rows in place
//!   (`gemm_set`, strided A operands). Per key block of (sequence, KV head), over every query
//!   head of the group and every query block that sees the keys: P = e^(S − lse) (in base 2,
//!   one pass with dS, when only masks apply), dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − D) (∘ 1 − tanh² with
//!   softcap), dK += dSᵀ·Q. Two plans (`BackwardTasks`): per head, one task owns a
//!   (sequence, KV head), walks its key blocks in order and also adds dQ += dS·K into a
//!   task-local dQ (5 block products); per block, pass 1 owns (sequence, KV head, key block)
//!   for dK, dV and pass 2 owns (sequence, query head, query block) and recomputes S and dP
//!   for dQ (7 products, more tasks). Both add the same terms in the same order, every output
//!   element is written by one task: the bits depend neither on the plan nor on the thread
//!   count.
//! - top_keys: pass 1 is the forward without values (lse only); pass 2 recomputes score
//!   blocks and keeps each row's `top` largest scores in a sorted list (one compare rejects
//!   most keys), then writes p = e^(s − lse).
//!
//! Bound: 4·Sq·Sk·D flops per head for the forward (half with causal), about 2.5× that for
//! the backward (S and dP recomputed in both passes). The decode reads K and V once: at
//! Hq32 Hk8 Sk8192 D128 its best calls take ~1.3× a parallel read of the same bytes on the
//! AVX-512 VM, criterion's median ~1.7× (benches/RESULTS.md, "The split-KV decode in place").

use super::{
    AttentionGrads, AttentionInputs, AttentionParams, AttentionShape, BackwardTasks, Bias, Segment,
    Sizes, SplitKv,
};
use crate::cpu::gemm::{Strided, gemm_acc, gemm_acc_widening, gemm_set};
use crate::cpu::scratch::Scratch;
use crate::cpu::{Isa, SendPtr, Simd, SimdKernel, dispatch, prefetch};
use crate::element::{Accum, Element};
use rayon::prelude::*;

/// Query rows per block: ten register tiles of 6 rows.
const BLOCK_Q: usize = 60;
/// Keys per block of the backward: whole vectors on every ISA, and its score and dS tiles
/// (BLOCK_Q × BLOCK_K each) stay in L1.
const BLOCK_K: usize = 64;
/// Keys per block of the forward and top_keys, whose per-row work (row max, online-softmax
/// step, accumulator rescale) is paid once per block: 128 halves it against 64 (forward
/// B1 H8 S2048 D64, AVX-512, two threads: 188 → 236 GFLOP/s; 256 and 512 measured lower;
/// AVX2 the same), and the 30 KiB score tile still fits L1 beside the key panel's stream.
const FWD_BLOCK_K: usize = 128;
/// Keys per split-KV task.
const SPLIT_CHUNK: usize = 512;
/// The split-KV path is chosen (with `SplitKv::Auto`) when every sequence has at most this
/// many query rows per KV head (Sq · Hq/Hk).
const DECODE_ROWS: usize = 16;
/// [`BackwardTasks::Auto`] runs one task per (sequence, KV head) when there are at least
/// this many per rayon thread (enough to balance), else the two per-block passes.
const PER_HEAD_TASKS_PER_THREAD: usize = 4;

fn neg_inf<A: Accum>() -> A {
    A::from_f64(f64::NEG_INFINITY)
}

/// The score terms after `scale·q·k` and the masks, for one call.
struct ScoreRules<'a, A> {
    causal: bool,
    window_left: i64,
    window_right: i64,
    /// 0 = off.
    softcap: A,
    slopes: Option<&'a [A]>,
    bias: Option<Bias<'a, A>>,
    /// The full S axes (bias indexing).
    len_q: usize,
    len_k: usize,
}

impl<'a, A: Accum> ScoreRules<'a, A> {
    fn new<E: Element<Acc = A>>(
        params: &AttentionParams,
        shape: &AttentionShape,
        inputs: &AttentionInputs<'a, E>,
    ) -> Self {
        Self {
            causal: params.causal,
            window_left: params.window_left,
            window_right: params.window_right,
            softcap: A::from_f64(params.softcap),
            slopes: inputs.alibi_slopes,
            bias: inputs.bias,
            len_q: shape.len_q,
            len_k: shape.len_k,
        }
    }

    /// Whether any term besides the scale and the masks is on.
    fn has_terms(&self) -> bool {
        self.softcap != A::ZERO || self.slopes.is_some() || self.bias.is_some()
    }

    /// The keys `[lo, hi)` (sequence-local) that query row i of `seg` may see.
    fn visible(&self, seg: &Segment, i: usize) -> (usize, usize) {
        let diag = i as i64 + seg.k_len as i64 - seg.q_len as i64;
        let mut hi = seg.k_len as i64;
        let mut lo = 0i64;
        if self.causal {
            hi = hi.min(diag + 1);
        }
        if self.window_right >= 0 {
            hi = hi.min(diag.saturating_add(self.window_right).saturating_add(1));
        }
        if self.window_left >= 0 {
            lo = lo.max(diag.saturating_sub(self.window_left));
        }
        if lo >= hi {
            (0, 0)
        } else {
            (lo as usize, hi as usize)
        }
    }

    /// Applies softcap, ALiBi and bias to the scores of query row i (head hq) against keys
    /// j0.. of `seg`, and sets the entries outside the visible columns `[a, z)` to −inf. With
    /// softcap and `capd`, stores the derivative 1 − tanh² of each entry there.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        row: &mut [A],
        seg: &Segment,
        i: usize,
        hq: usize,
        j0: usize,
        (a, z): (usize, usize),
        capd: Option<&mut [A]>,
    ) {
        if self.has_terms() {
            let cap = self.softcap.to_f64();
            let slope = self.slopes.map(|s| s[hq].to_f64());
            let diag = i as i64 + seg.k_len as i64 - seg.q_len as i64;
            let bias_row = self.bias.map(|bias| {
                let bb = if bias.batch == 1 { 0 } else { seg.batch };
                let hb = if bias.heads == 1 { 0 } else { hq };
                let at = ((bb * bias.heads + hb) * self.len_q + seg.q_start + i) * self.len_k
                    + seg.k_start
                    + j0;
                &bias.data[at..at + row.len()]
            });
            let mut capd = capd;
            for c in a..z {
                let mut s = row[c];
                if cap != 0.0 {
                    let t = (s.to_f64() / cap).tanh();
                    s = A::from_f64(cap * t);
                    if let Some(d) = capd.as_deref_mut() {
                        d[c] = A::from_f64(1.0 - t * t);
                    }
                }
                if let Some(slope) = slope {
                    let dist = (diag - (j0 + c) as i64).unsigned_abs() as f64;
                    s = s - A::from_f64(slope * dist);
                }
                if let Some(b) = bias_row {
                    s = s + b[c];
                }
                row[c] = s;
            }
        }
        let ninf = neg_inf::<A>();
        row[..a].fill(ninf);
        row[z..].fill(ninf);
    }
}

/// The visible columns of key block `[j0, j0 + w)` for a row that sees `[lo, hi)`.
fn block_columns(j0: usize, w: usize, (lo, hi): (usize, usize)) -> (usize, usize) {
    let a = lo.saturating_sub(j0).min(w);
    let z = hi.saturating_sub(j0).min(w);
    if a >= z { (0, 0) } else { (a, z) }
}

/// Rows of a `[B, S, H, X]` tensor in the accumulator type, stored either in that layout or
/// head-major (`[B, H, S, X]`, each head's rows contiguous: the operand layout of the
/// products, whose strided rows would otherwise fall into a few L1 sets).
#[derive(Clone, Copy)]
struct Rows<'a, A> {
    data: &'a [A],
    len: usize,
    heads: usize,
    dim: usize,
    head_major: bool,
}

impl<A> Rows<'_, A> {
    fn at(&self, batch: usize, s: usize, head: usize) -> usize {
        if self.head_major {
            ((batch * self.heads + head) * self.len + s) * self.dim
        } else {
            ((batch * self.len + s) * self.heads + head) * self.dim
        }
    }
    /// The distance between consecutive rows of one head.
    fn stride(&self) -> usize {
        if self.head_major {
            self.dim
        } else {
            self.heads * self.dim
        }
    }
    /// Pointer to row (batch, s, head); only for rows inside the tensor (or dim 0).
    fn ptr(&self, batch: usize, s: usize, head: usize) -> *const A {
        let at = self.at(batch, s, head).min(self.data.len());
        self.data[at..].as_ptr()
    }
}

/// Sequence positions per task of the per-call copies below: each task reads a contiguous
/// piece of the input (every head of these positions) front to back.
const COPY_POSITIONS: usize = 64;

/// `x [B, S, H, X]` as head-major rows (`[B, H, S, X]`) in its accumulator type. Tasks
/// take runs of positions of every head, so the input is read in memory order (read head by
/// head, its rows sit `H·X` apart, a stride the prefetchers barely follow: 3–6 GB/s).
fn head_major<E: Element>(
    x: &[E],
    batch: usize,
    len: usize,
    heads: usize,
    dim: usize,
) -> Scratch<E::Acc> {
    let mut out = Scratch::take(batch * heads * len * dim, <E::Acc as Accum>::ZERO);
    if out.is_empty() {
        return out;
    }
    let dst = SendPtr(out.as_mut_ptr());
    let runs = len.div_ceil(COPY_POSITIONS);
    (0..batch * runs).into_par_iter().for_each(|task| {
        let (b, s0) = (task / runs, task % runs * COPY_POSITIONS);
        for s in s0..len.min(s0 + COPY_POSITIONS) {
            for h in 0..heads {
                let src = &x[((b * len + s) * heads + h) * dim..][..dim];
                // SAFETY: row (b, h, s) of out lies inside it, and only this task (the one
                // holding position s of batch b) writes it.
                let row = unsafe {
                    std::slice::from_raw_parts_mut(
                        dst.get().add(((b * heads + h) * len + s) * dim),
                        dim,
                    )
                };
                for (y, x) in row.iter_mut().zip(src) {
                    *y = x.to_acc();
                }
            }
        }
    });
    out
}

/// Key (or value) panels: for each (batch, head) and each sequence, blocks of `block` rows
/// transposed to `[dim × w]` (w = the block's width), block j0 of a sequence starting at
/// element `(k_start + j0)·dim` of its (batch, head) part. One task per block of a sequence,
/// every head, reading the block's rows in memory order 16 positions at a time: a panel
/// line (16 consecutive columns) is written whole while the 16 rows are in L1.
fn panels<E: Element>(
    x: &[E],
    batch: usize,
    len: usize,
    heads: usize,
    dim: usize,
    segments: &[Segment],
    block: usize,
) -> Scratch<E::Acc> {
    const GROUP: usize = 16;
    // entries outside every segment's key range are never read
    let mut out = Scratch::take(batch * heads * len * dim, <E::Acc as Accum>::ZERO);
    if out.is_empty() {
        return out;
    }
    let dst = SendPtr(out.as_mut_ptr());
    let jobs: Vec<(Segment, usize)> = segments
        .iter()
        .flat_map(|seg| (0..seg.k_len).step_by(block).map(move |j0| (*seg, j0)))
        .collect();
    jobs.into_par_iter().for_each(|(seg, j0)| {
        let w = block.min(seg.k_len - j0);
        let first = seg.k_start + j0;
        for c0 in (0..w).step_by(GROUP) {
            let group = GROUP.min(w - c0);
            for h in 0..heads {
                let base = ((seg.batch * heads + h) * len + first) * dim;
                // SAFETY: the panel of block j0 of (seg, h) is dim × w values from base,
                // inside out; only this task (the block's) writes it.
                let panel = unsafe { std::slice::from_raw_parts_mut(dst.get().add(base), dim * w) };
                let row = |c: usize| &x[((seg.batch * len + first + c) * heads + h) * dim..][..dim];
                let rows: [&[E]; GROUP] = std::array::from_fn(|i| row(c0 + i.min(group - 1)));
                for p in 0..dim {
                    let line = &mut panel[p * w + c0..p * w + c0 + group];
                    for (y, src) in line.iter_mut().zip(&rows) {
                        *y = src[p].to_acc();
                    }
                }
            }
        }
    });
    out
}

/// Start of the panel of key block j0 of `seg` for (batch, head).
fn panel_at(shape: &AttentionShape, dim: usize, seg: &Segment, head: usize, j0: usize) -> usize {
    ((seg.batch * shape.heads_kv + head) * shape.len_k + seg.k_start + j0) * dim
}

// ---------------------------------------------------------------------------------------
// Vector helpers on rows of the accumulator type.
// ---------------------------------------------------------------------------------------

/// The lane-wise maximum of x's whole vectors (−inf lanes when there are none) and the
/// maximum of the values past them (−inf when none). NaN never wins a comparison here.
#[inline(always)]
fn split_max<S: Simd, A: Accum>(x: &[A]) -> (A::V<S>, A) {
    let chunks = x.chunks_exact(A::lanes::<S>());
    let mut tail_max = neg_inf::<A>();
    for v in chunks.remainder() {
        if *v > tail_max {
            tail_max = *v;
        }
    }
    // SAFETY: each chunk holds `lanes` values.
    let top = unsafe {
        let mut top = A::vsplat::<S>(neg_inf::<A>());
        for c in chunks {
            top = A::vmax::<S>(top, A::vload::<S>(c.as_ptr()));
        }
        top
    };
    (top, tail_max)
}

/// The largest lane of `top` and `rest`.
#[inline(always)]
fn lanes_max<S: Simd, A: Accum>(top: A::V<S>, rest: A) -> A {
    let mut buf = [neg_inf::<A>(); 16];
    // SAFETY: buf holds 16 values, the most lanes of any ISA.
    unsafe { A::vstore::<S>(buf.as_mut_ptr(), top) };
    let mut best = rest;
    for v in &buf[..A::lanes::<S>()] {
        if *v > best {
            best = *v;
        }
    }
    best
}

/// x = e^(x − m) in place.
#[inline(always)]
fn exp_shifted<S: Simd, A: Accum>(x: &mut [A], m: A) {
    let lanes = A::lanes::<S>();
    let neg_m = A::ZERO - m;
    let mut chunks = x.chunks_exact_mut(lanes);
    // SAFETY: each chunk holds `lanes` values.
    unsafe {
        let shift = A::vsplat::<S>(neg_m);
        for c in &mut chunks {
            let e = A::vexp::<S>(A::vadd::<S>(A::vload::<S>(c.as_ptr()), shift));
            A::vstore::<S>(c.as_mut_ptr(), e);
        }
    }
    for v in chunks.into_remainder() {
        *v = (*v + neg_m).exp();
    }
}

/// One row of the backward's P and dS from its raw scores q·k (in `p`) and dO·v (in `ds`)
/// when only the masks apply: p = 2^(factor·s − lse2) (factor = scale·log2(e), lse2 =
/// log2(e)·lse, so no separate scale pass and the cheaper 2^x) and dS = p·(dP − delta) on
/// the visible columns `[a, z)`, 0 on the others.
#[inline(always)]
fn probs_and_ds_row<S: Simd, A: Accum>(
    p: &mut [A],
    ds: &mut [A],
    (a, z): (usize, usize),
    factor: A,
    lse2: A,
    delta: A,
) {
    let lanes = A::lanes::<S>();
    let (neg_lse2, neg_delta) = (A::ZERO - lse2, A::ZERO - delta);
    let (pv, dv) = (&mut p[a..z], &mut ds[a..z]);
    let mut c = 0;
    // SAFETY: c + lanes ≤ the visible width, within both rows.
    unsafe {
        let (f, shift, minus) = (
            A::vsplat::<S>(factor),
            A::vsplat::<S>(neg_lse2),
            A::vsplat::<S>(neg_delta),
        );
        while c + lanes <= pv.len() {
            let e = A::vexp2::<S>(A::vfma::<S>(A::vload::<S>(pv.as_ptr().add(c)), f, shift));
            A::vstore::<S>(pv.as_mut_ptr().add(c), e);
            let g = A::vadd::<S>(A::vload::<S>(dv.as_ptr().add(c)), minus);
            A::vstore::<S>(dv.as_mut_ptr().add(c), A::vmul::<S>(e, g));
            c += lanes;
        }
    }
    for (x, g) in pv[c..].iter_mut().zip(dv[c..].iter_mut()) {
        *x = (*x * factor + neg_lse2).exp2();
        *g = *x * (*g + neg_delta);
    }
    p[..a].fill(A::ZERO);
    p[z..].fill(A::ZERO);
    ds[..a].fill(A::ZERO);
    ds[z..].fill(A::ZERO);
}

#[inline(always)]
fn scale_row<S: Simd, A: Accum>(x: &mut [A], c: A) {
    let lanes = A::lanes::<S>();
    let mut chunks = x.chunks_exact_mut(lanes);
    // SAFETY: each chunk holds `lanes` values.
    unsafe {
        let cv = A::vsplat::<S>(c);
        for ch in &mut chunks {
            A::vstore::<S>(
                ch.as_mut_ptr(),
                A::vmul::<S>(A::vload::<S>(ch.as_ptr()), cv),
            );
        }
    }
    for v in chunks.into_remainder() {
        *v = *v * c;
    }
}

/// Rows per register tile of [`matmul_packed`].
const MR: usize = 6;

/// Rows row0.. of (seg, head hq) of q, times `scale`, packed for [`matmul_packed`] as they
/// are read: strips of MR rows, p-major (element (i, p) at (i / MR)·MR·D + p·MR + i % MR), so
/// the register tiles broadcast from consecutive addresses with one pointer bump per step
/// (the layout of BLAS micro-kernels). Rows past `rows` in the last strip are zero (the tiles
/// of a short strip never read them). One pass: a row-major copy packed afterwards cost ~2%
/// of the forward.
fn pack_queries<E: Element>(
    q: &[E],
    sh: &AttentionShape,
    seg: &Segment,
    (hq, row0, rows): (usize, usize, usize),
    scale: E::Acc,
) -> Vec<E::Acc> {
    let d = sh.head_dim;
    let mut pack = vec![<E::Acc as Accum>::ZERO; rows.div_ceil(MR) * MR * d];
    for r in 0..rows {
        let at = ((seg.batch * sh.len_q + seg.q_start + row0 + r) * sh.heads_q + hq) * d;
        let strip = &mut pack[r / MR * MR * d..][..MR * d];
        for (p, x) in q[at..at + d].iter().enumerate() {
            strip[p * MR + r % MR] = x.to_acc() * scale;
        }
    }
    pack
}

/// C = A·B over `m × n` with inner dimension `k` (C += A·B with `accumulate`), A packed by
/// [`pack_queries`], B rows `b_stride` apart. Tiles of MR rows × 2 vectors (12 accumulators);
/// the sum over p runs in order, so a given ISA always gives the same bits.
///
/// # Safety
/// `pack` holds the packed m × k values of A; B (k rows of n at `b_stride`) and C (m rows of
/// n at `c_stride`) must be valid, and C must not overlap B or `pack`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_packed<S: Simd, A: Accum>(
    m: usize,
    n: usize,
    k: usize,
    pack: &[A],
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    accumulate: bool,
) {
    let strips = m.div_ceil(MR);
    debug_assert!(pack.len() >= strips * MR * k);
    for strip in 0..strips {
        let rows = MR.min(m - strip * MR);
        // SAFETY: strip < strips = ceil(m / MR): the packed strip starts inside `pack`
        // (len >= strips·MR·k, asserted in debug; pack_queries sizes it so) and row
        // strip·MR < m of C (this fn's contract).
        let (ap, cp) = unsafe {
            (
                pack.as_ptr().add(strip * MR * k),
                c.add(strip * MR * c_stride),
            )
        };
        // SAFETY: strip_product's contract: `rows` rows of C from cp, the strip's MR·k packed
        // values at ap, B as given to this fn; the ISA is this fn's caller's guarantee.
        unsafe {
            match rows {
                6 => strip_product::<S, A, 6>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
                5 => strip_product::<S, A, 5>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
                4 => strip_product::<S, A, 4>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
                3 => strip_product::<S, A, 3>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
                2 => strip_product::<S, A, 2>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
                _ => strip_product::<S, A, 1>(n, k, ap, b, b_stride, cp, c_stride, accumulate),
            }
        }
    }
}

/// One strip of R packed rows of A against all n columns of B.
///
/// # Safety
/// The CPU supports `S`; `ap` holds a packed strip (k × MR values); B (k rows of n at
/// `b_stride`) readable; C (R rows of n at `c_stride`) writable, not overlapping A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strip_product<S: Simd, A: Accum, const R: usize>(
    n: usize,
    k: usize,
    ap: *const A,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    accumulate: bool,
) {
    let lanes = A::lanes::<S>();
    let mut j = 0;
    // SAFETY: columns j..j + NV·lanes <= n (the loop conditions) and then col < n, rows
    // r < R, p < k: all inside the extents of this fn's contract.
    unsafe {
        while S::WIDE_TILES && j + 4 * lanes <= n {
            micro::<S, A, R, 4>(k, ap, b.add(j), b_stride, c.add(j), c_stride, accumulate);
            j += 4 * lanes;
        }
        while j + 2 * lanes <= n {
            micro::<S, A, R, 2>(k, ap, b.add(j), b_stride, c.add(j), c_stride, accumulate);
            j += 2 * lanes;
        }
        if j + lanes <= n {
            micro::<S, A, R, 1>(k, ap, b.add(j), b_stride, c.add(j), c_stride, accumulate);
            j += lanes;
        }
        // columns past the last whole vector, one at a time (same order over p)
        for col in j..n {
            for r in 0..R {
                let out = c.add(r * c_stride + col);
                let mut acc = if accumulate { *out } else { A::ZERO };
                for p in 0..k {
                    acc = acc + *ap.add(p * MR + r) * *b.add(p * b_stride + col);
                }
                *out = acc;
            }
        }
    }
}

/// The register tile: R rows × NV vectors of C over the packed strip.
///
/// # Safety
/// As [`strip_product`], for the NV·lanes columns from `b` and `c`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<S: Simd, A: Accum, const R: usize, const NV: usize>(
    k: usize,
    ap: *const A,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    accumulate: bool,
) {
    let lanes = A::lanes::<S>();
    // SAFETY: C accesses are r < R rows × v < NV vectors, in bounds per this fn's contract;
    // tile_sums gets the same strip and B.
    unsafe {
        let mut acc = [[A::vsplat::<S>(A::ZERO); NV]; R];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = A::vload::<S>(c.add(r * c_stride + v * lanes));
                }
            }
        }
        tile_sums::<S, A, R, NV>(k, ap, b, b_stride, &mut acc);
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                A::vstore::<S>(c.add(r * c_stride + v * lanes), *x);
            }
        }
    }
}

/// acc += the R × NV tile of (packed strip) · B over k, in order over p.
///
/// # Safety
/// The CPU supports `S`; `ap` holds k × MR packed values (R <= MR used); B holds k rows of
/// NV·lanes values at `b_stride`.
#[inline(always)]
unsafe fn tile_sums<S: Simd, A: Accum, const R: usize, const NV: usize>(
    k: usize,
    ap: *const A,
    b: *const A,
    b_stride: usize,
    acc: &mut [[A::V<S>; NV]; R],
) {
    let lanes = A::lanes::<S>();
    // SAFETY: step p reads ap[p·MR + r] (r < R <= MR) and B row p's NV vectors, p < k: in
    // bounds per this fn's contract. After the last step a_at is at most one past the
    // strip; b_at is advanced with `wrapping_add`, as row k (never read) may lie further
    // than one past the end of B's buffer, where `add` would be UB.
    unsafe {
        let (mut a_at, mut b_at) = (ap, b);
        for _ in 0..k {
            let mut bv = [A::vsplat::<S>(A::ZERO); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = A::vload::<S>(b_at.add(v * lanes));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = A::vsplat::<S>(*a_at.add(r));
                for (v, y) in row.iter_mut().enumerate() {
                    *y = A::vfma::<S>(x, bv[v], *y);
                }
            }
            a_at = a_at.add(MR);
            b_at = b_at.wrapping_add(b_stride);
        }
    }
}

/// The score product of a key block fused with its online-softmax step, for blocks whose
/// rows see every key and whose running max m may stay (see [`MAX_SLACK`]): C = A·B as
/// [`matmul_packed`] computes it (base-2 scores), then in each register tile's epilogue
/// p = 2^(s − m) of its row stored in place of the score and added to the row's lane sums
/// (`sums_in` plus the block's, written to `sums`: the caller keeps `sums_in` if the block
/// fails) — the bits of [`online_step`] when it holds m, without the passes over the stored
/// scores. `n` must be a multiple of the vector width. Returns false as soon as a score
/// passes m + MAX_SLACK; C and `sums` are then partly written and the caller redoes the
/// block the general way.
///
/// # Safety
/// As [`matmul_packed`]; `m` and `sums` hold the `rows` rows' values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_to_probs<S: Simd, A: Accum>(
    rows: usize,
    n: usize,
    k: usize,
    pack: &[A],
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    m: &[A],
    (sums_in, sums): (&[[A; L_LANES]], &mut [[A; L_LANES]]),
) -> bool {
    debug_assert!(n.is_multiple_of(A::lanes::<S>()) && m.len() >= rows);
    debug_assert!(sums_in.len() >= rows && sums.len() >= rows);
    for strip in 0..rows.div_ceil(MR) {
        let (r0, r) = (strip * MR, MR.min(rows - strip * MR));
        // SAFETY: r0 < rows: the strip starts inside `pack` and C, as in matmul_packed.
        let (ap, cp) = unsafe { (pack.as_ptr().add(r0 * k), c.add(r0 * c_stride)) };
        let m = &m[r0..r0 + r];
        let sums = (&sums_in[r0..r0 + r], &mut sums[r0..r0 + r]);
        // SAFETY: strip_to_probs's contract: r rows of C from cp, the packed strip at ap, B
        // as given to this fn (n a multiple of lanes), m and sums sliced to the r rows.
        let held = unsafe {
            match r {
                6 => strip_to_probs::<S, A, 6>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
                5 => strip_to_probs::<S, A, 5>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
                4 => strip_to_probs::<S, A, 4>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
                3 => strip_to_probs::<S, A, 3>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
                2 => strip_to_probs::<S, A, 2>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
                _ => strip_to_probs::<S, A, 1>(n, k, ap, b, b_stride, cp, c_stride, m, sums),
            }
        };
        if !held {
            return false;
        }
    }
    true
}

/// One strip of [`scores_to_probs`]: the tiles left to right, as [`strip_product`] runs
/// them, so each row's lane sums take its vectors in column order (the first tile adds to
/// `sums_in`, the later ones to what the earlier wrote to `sums`).
///
/// # Safety
/// As [`strip_product`], with n a multiple of the vector width; `m`, `sums_in` and `sums`
/// hold R rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strip_to_probs<S: Simd, A: Accum, const R: usize>(
    n: usize,
    k: usize,
    ap: *const A,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    m: &[A],
    (sums_in, sums): (&[[A; L_LANES]], &mut [[A; L_LANES]]),
) -> bool {
    let lanes = A::lanes::<S>();
    let mut j = 0;
    let mut held = true;
    // the tiles of NV vectors while `wide` allows them and NV vectors remain
    macro_rules! tiles {
        ($nv:literal, $wide:expr) => {
            while held && $wide && j + $nv * lanes <= n {
                let first = (j == 0).then_some(sums_in);
                // SAFETY: j + NV·lanes <= n (loop condition): column j of B and C in bounds.
                let (bj, cj) = unsafe { (b.add(j), c.add(j)) };
                let sums = (first, &mut *sums);
                // SAFETY: tile_to_probs's contract: the NV·lanes columns from j of this
                // fn's B and C (in bounds, see above), the same strip, m and sums.
                held = unsafe {
                    tile_to_probs::<S, A, R, $nv>(k, ap, bj, b_stride, cj, c_stride, m, sums)
                };
                j += $nv * lanes;
            }
        };
    }
    tiles!(4, S::WIDE_TILES);
    tiles!(2, true);
    tiles!(1, true);
    held
}

/// One register tile of [`strip_to_probs`]: the scores computed as `micro` computes them,
/// then, still in registers, s → 2^(s − m) of its row, stored to C and added to the row's
/// lane sums (read from `sums_in` if given, else from `sums`; written to `sums`); false if a
/// score passed m + MAX_SLACK.
///
/// # Safety
/// As [`micro`] (NV·lanes columns); `m`, `sums` (and `sums_in`) hold R rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_to_probs<S: Simd, A: Accum, const R: usize, const NV: usize>(
    k: usize,
    ap: *const A,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    m: &[A],
    (sums_in, sums): (Option<&[[A; L_LANES]]>, &mut [[A; L_LANES]]),
) -> bool {
    let lanes = A::lanes::<S>();
    let mut over = 0u32;
    // SAFETY: C accesses are r < R rows × v < NV vectors (this fn's contract); the lane-sum
    // loads/stores use [A; L_LANES] arrays, L_LANES = 16 >= lanes on every ISA, through
    // pointers from the whole arrays.
    unsafe {
        let mut acc = [[A::vsplat::<S>(A::ZERO); NV]; R];
        tile_sums::<S, A, R, NV>(k, ap, b, b_stride, &mut acc);
        for (r, row) in acc.iter().enumerate() {
            let shift = A::vsplat::<S>(A::ZERO - m[r]);
            let bound = A::vsplat::<S>(m[r] + A::from_f64(MAX_SLACK));
            let mut l = A::vload::<S>(sums_in.map_or(sums[r].as_ptr(), |s| s[r].as_ptr()));
            for (v, x) in row.iter().enumerate() {
                over |= A::vmask_gt::<S>(*x, bound);
                let e = A::vexp2::<S>(A::vadd::<S>(*x, shift));
                A::vstore::<S>(c.add(r * c_stride + v * lanes), e);
                l = A::vadd::<S>(l, e);
            }
            A::vstore::<S>(sums[r].as_mut_ptr(), l);
        }
    }
    over == 0
}

/// Partial sums of the softmax denominator l kept per row: one per vector lane (the most any
/// ISA has for f32), added up in lane order once, when the row is finished. A horizontal sum
/// per row and key block instead was ~10% of the AVX-512 forward (a chain of 16 dependent adds).
const L_LANES: usize = 16;

/// l of a row from its [`L_LANES`] partial sums.
#[inline(always)]
fn lane_total<A: Accum>(l: &[A; L_LANES]) -> A {
    l.iter().fold(A::ZERO, |s, x| s + *x)
}

/// One online-softmax step for one row of base-2 scores (log2(e)·s): the block's scores
/// (masked to −inf outside `[a, z)`) become p = 2^(s − m_new) = e^(natural s − natural
/// m_new) (0 outside), m and the partial sums of l advance; returns the factor 2^(m − m_new)
/// the row's accumulator must be multiplied by (1 when unchanged).
#[inline(always)]
fn online_step<S: Simd, A: Accum>(
    row: &mut [A],
    (a, z): (usize, usize),
    m: &mut A,
    l: &mut [A; L_LANES],
) -> A {
    let (top, tail_max) = split_max::<S, A>(&row[a..z]);
    let bound = *m + A::from_f64(MAX_SLACK);
    let held = *m != neg_inf::<A>()
        // SAFETY: vector compare of two register values.
        && unsafe { A::vmask_gt::<S>(top, A::vsplat::<S>(bound)) } == 0
        && tail_max <= bound;
    // held: m stays (p ≤ 2^MAX_SLACK), no horizontal max, alpha = 1 (no rescale)
    let m_new = if held {
        *m
    } else {
        let block_max = lanes_max::<S, A>(top, tail_max);
        if block_max > *m { block_max } else { *m }
    };
    if m_new == neg_inf::<A>() {
        // nothing finite yet (a bias of −inf): the row contributes nothing
        row.fill(A::ZERO);
        return A::ONE;
    }
    let alpha = if *m == neg_inf::<A>() {
        A::ZERO
    } else if *m == m_new {
        A::ONE
    } else {
        (*m - m_new).exp2()
    };
    exp2_into_sums::<S, A>(&mut row[a..z], m_new, alpha, l);
    row[..a].fill(A::ZERO);
    row[z..].fill(A::ZERO);
    *m = m_new;
    alpha
}

/// How far (base 2) a block's scores may rise above a row's running max m before m moves.
/// The softmax is exact for any m (o = Σ 2^(s−m)·v / Σ 2^(s−m), lse = ln2·m + ln l), so m
/// only has to keep 2^(s − m) finite: with m held while every score is ≤ m + 8, p ≤ 256,
/// and a block proves that with vector compares alone (no horizontal max, no rescale). NaN
/// scores do not move m; they propagate to o either way.
const MAX_SLACK: f64 = 8.0;

/// x = 2^(x − m) in place and l = alpha·l + x, lane by lane: vector lane i adds into l[i],
/// the i-th value past the last whole vector too.
#[inline(always)]
fn exp2_into_sums<S: Simd, A: Accum>(x: &mut [A], m: A, alpha: A, l: &mut [A; L_LANES]) {
    let lanes = A::lanes::<S>();
    debug_assert!(lanes <= L_LANES);
    let neg_m = A::ZERO - m;
    let mut chunks = x.chunks_exact_mut(lanes);
    // SAFETY: each chunk holds `lanes` values, l at least `lanes`.
    unsafe {
        let shift = A::vsplat::<S>(neg_m);
        let mut acc = A::vmul::<S>(A::vload::<S>(l.as_ptr()), A::vsplat::<S>(alpha));
        for c in &mut chunks {
            let e = A::vexp2::<S>(A::vadd::<S>(A::vload::<S>(c.as_ptr()), shift));
            A::vstore::<S>(c.as_mut_ptr(), e);
            acc = A::vadd::<S>(acc, e);
        }
        A::vstore::<S>(l.as_mut_ptr(), acc);
    }
    for (t, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = (*v + neg_m).exp2();
        l[t] = l[t] + *v;
    }
}

// ---------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------

/// What every forward task reads. The forward's online softmax runs on base-2 scores
/// log2(e)·s, so its exponentials are 2^x (see `Simd::f32_exp2`); m is in those units.
struct Forward<'a, E: Element> {
    shape: AttentionShape,
    rules: ScoreRules<'a, E::Acc>,
    /// The factor the queries are loaded with: the softmax scale, times log2(e) when no
    /// softcap/ALiBi/bias term needs the natural scores (see [`Forward::base2_scores`]).
    scale: E::Acc,
    q: &'a [E],
    k: &'a [E],
    /// The values as given, `[B, Sk, Hk, Dv]` (read by the split-KV path).
    v_in: &'a [E],
    /// Key panels (query-block path only).
    kt: &'a [E::Acc],
    /// Head-major value rows (query-block path only).
    v: Rows<'a, E::Acc>,
}

impl<E: Element> Forward<'_, E> {
    /// A row of scores against keys j0.. (visible columns `cols`) made ready for
    /// [`online_step`]: softcap, ALiBi and bias applied to the natural scores, then scaled by
    /// log2(e); without those terms the queries already carry log2(e) (one multiply fewer).
    #[inline(always)]
    fn base2_scores<S: Simd>(
        &self,
        row: &mut [E::Acc],
        seg: &Segment,
        i: usize,
        hq: usize,
        j0: usize,
        cols: (usize, usize),
    ) {
        self.rules.apply(row, seg, i, hq, j0, cols, None);
        if self.rules.has_terms() {
            let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
            scale_row::<S, E::Acc>(&mut row[cols.0..cols.1], log2e);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: &AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    segments: &[Segment],
    sizes: Sizes,
) -> (Vec<E>, Vec<E::Acc>) {
    let mut lse = vec![neg_inf::<E::Acc>(); sizes.lse];
    if sizes.lse == 0 {
        // no query rows or heads: o is empty too
        return (Vec::new(), lse);
    }
    // o starts uninitialized: both paths write every row of every sequence and query head
    // (the sequences cover the query axis), and zeroing first was ~1.5% of the forward
    let mut o: Vec<E> = Vec::with_capacity(sizes.o);
    let g = shape.group();
    let split = match params.split_kv {
        SplitKv::Always => true,
        SplitKv::Never => false,
        SplitKv::Auto => {
            segments.iter().all(|s| s.q_len * g <= DECODE_ROWS)
                && segments.iter().any(|s| s.k_len >= 2 * SPLIT_CHUNK)
        }
    };
    // the split path reads each value row once, in place (f16/bf16 widened block by block);
    // the block path reads each value block once per query block, from head-major rows
    let (v_rows, kt_panels);
    let (v, kt): (&[E::Acc], &[E::Acc]) = if split {
        (&[], &[])
    } else {
        v_rows = head_major(
            inputs.v,
            shape.batch,
            shape.len_k,
            shape.heads_kv,
            shape.value_dim,
        );
        kt_panels = panels(
            inputs.k,
            shape.batch,
            shape.len_k,
            shape.heads_kv,
            shape.head_dim,
            segments,
            FWD_BLOCK_K,
        );
        (&v_rows, &kt_panels)
    };
    let rules = ScoreRules::new(params, shape, inputs);
    let query_factor = if rules.has_terms() {
        shape.scale(params)
    } else {
        shape.scale(params) * std::f64::consts::LOG2_E
    };
    let ctx = Forward {
        shape: *shape,
        rules,
        scale: E::Acc::from_f64(query_factor),
        q: inputs.q,
        k: inputs.k,
        v_in: inputs.v,
        kt,
        v: Rows {
            data: v,
            len: shape.len_k,
            heads: shape.heads_kv,
            dim: shape.value_dim,
            head_major: true,
        },
    };
    let (op, lp) = (SendPtr(o.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    if split {
        split_kv(isa, &ctx, segments, op, lp);
    } else {
        let tasks: Vec<(usize, usize, usize)> = segments
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                (0..shape.heads_q)
                    .flat_map(move |h| (0..s.q_len).step_by(BLOCK_Q).map(move |r| (si, h, r)))
            })
            .collect();
        tasks.into_par_iter().for_each(|(si, hq, row0)| {
            let seg = segments[si];
            // SAFETY: the task writes only rows row0.. of (seg, hq) in o and lse.
            dispatch(
                isa,
                QueryBlock {
                    ctx: &ctx,
                    seg,
                    hq,
                    row0,
                    rows: BLOCK_Q.min(seg.q_len - row0),
                    o: op,
                    lse: lp,
                },
            )
        });
    }
    // SAFETY: every one of the sizes.o elements has been written (see above).
    unsafe { o.set_len(sizes.o) };
    (o, lse)
}

/// A block of query rows of one head against every key block it sees.
struct QueryBlock<'a, E: Element> {
    ctx: &'a Forward<'a, E>,
    seg: Segment,
    hq: usize,
    row0: usize,
    rows: usize,
    o: SendPtr<E>,
    lse: SendPtr<E::Acc>,
}

impl<E: Element> SimdKernel for QueryBlock<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            ctx,
            seg,
            hq,
            row0,
            rows,
            o,
            lse,
        } = self;
        let sh = &ctx.shape;
        let (d, dv) = (sh.head_dim, sh.value_dim);
        let hk = hq / sh.group();
        let zero = <E::Acc as Accum>::ZERO;
        // the queries are the A operand of every score tile: packed once
        let qpack = pack_queries(ctx.q, sh, &seg, (hq, row0, rows), ctx.scale);
        // the rows of the block this thread likely runs next (rayon hands each thread runs
        // of consecutive tasks): far apart in q, so without a hint they would arrive one
        // cache miss at a time when that block starts
        for r in row0 + rows..seg.q_len.min(row0 + 2 * rows) {
            let at = ((seg.batch * sh.len_q + seg.q_start + r) * sh.heads_q + hq) * d;
            prefetch(ctx.q[at..].as_ptr(), d);
        }
        let vis: Vec<(usize, usize)> = (0..rows)
            .map(|r| ctx.rules.visible(&seg, row0 + r))
            .collect();
        let mut m = vec![neg_inf::<E::Acc>(); rows];
        let mut l = vec![[zero; L_LANES]; rows];
        // l plus a fused block's sums, swapped in only if the block holds m
        let mut trial = l.clone();
        // the keys every row sees, and whether every row has seen one (m finite): blocks
        // inside the former are whole for every row
        let common = vis
            .iter()
            .fold((0, usize::MAX), |(a, z), &(lo, hi)| (a.max(lo), z.min(hi)));
        let mut started = false;
        // from the thread's pool (zeroing fresh ones was ~1% of the forward); every score is
        // written before it is read
        let mut acc = Scratch::filled(rows * dv, zero);
        let mut s = Scratch::take(rows * FWD_BLOCK_K, zero);
        let (lo, hi) = union(&vis);
        let mut j0 = lo - lo % FWD_BLOCK_K;
        while j0 < hi {
            let w = FWD_BLOCK_K.min(seg.k_len - j0);
            let panel = &ctx.kt[panel_at(sh, d, &seg, hk, j0)..];
            // A block every row sees whole, past each row's first, with no score terms: the
            // products' epilogues turn the scores into probabilities while m holds (the
            // common case once m has settled), with the bits of the general path below.
            let whole = common.0 <= j0 && j0 + w <= common.1;
            started = started || m.iter().all(|&x| x != neg_inf::<E::Acc>());
            let fused = whole
                && started
                && !ctx.rules.has_terms()
                && w.is_multiple_of(<E::Acc as Accum>::lanes::<S>());
            let held = fused && {
                // SAFETY: qpack holds the rows' strips, the panel is d × w, s rows ×
                // FWD_BLOCK_K; m, l and trial hold the rows.
                let held = unsafe {
                    scores_to_probs::<S, E::Acc>(
                        rows,
                        w,
                        d,
                        &qpack,
                        panel.as_ptr(),
                        w,
                        s.as_mut_ptr(),
                        FWD_BLOCK_K,
                        &m,
                        (&l, &mut trial),
                    )
                };
                if held {
                    std::mem::swap(&mut l, &mut trial);
                }
                held
            };
            if !held {
                // Each strip of MR rows computes the block's columns up to the last one its rows
                // see (whole vectors), so a block on a causal or window edge skips the products
                // of keys past it; the rows' other entries are set by `base2_scores`.
                for (strip, strip_vis) in vis.chunks(MR).enumerate() {
                    let r0 = strip * MR;
                    let need = strip_width(j0, w, strip_vis, <E::Acc as Accum>::lanes::<S>());
                    if need == 0 {
                        continue;
                    }
                    // SAFETY: qpack holds the rows' strips (strip r0 / MR at r0·d), the panel is
                    // d × w with need ≤ w, s rows × FWD_BLOCK_K.
                    unsafe {
                        matmul_packed::<S, E::Acc>(
                            MR.min(rows - r0),
                            need,
                            d,
                            &qpack[r0 * d..],
                            panel.as_ptr(),
                            w,
                            s[r0 * FWD_BLOCK_K..].as_mut_ptr(),
                            FWD_BLOCK_K,
                            false,
                        )
                    };
                }
                for r in 0..rows {
                    let row = &mut s[r * FWD_BLOCK_K..r * FWD_BLOCK_K + w];
                    let cols = block_columns(j0, w, vis[r]);
                    if cols.0 >= cols.1 {
                        row.fill(zero);
                        continue;
                    }
                    ctx.base2_scores::<S>(row, &seg, row0 + r, hq, j0, cols);
                    let alpha = online_step::<S, E::Acc>(row, cols, &mut m[r], &mut l[r]);
                    if alpha != <E::Acc as Accum>::ONE {
                        scale_row::<S, E::Acc>(&mut acc[r * dv..(r + 1) * dv], alpha);
                    }
                }
            }
            // O += P·V per strip over the keys its rows see (P is 0 past them). P is read in
            // place: its row stride is a constant, so the tile's broadcasts need no packing.
            for (strip, strip_vis) in vis.chunks(MR).enumerate() {
                let r0 = strip * MR;
                let need = strip_width(j0, w, strip_vis, 1);
                if need == 0 {
                    continue;
                }
                // SAFETY: s is rows × w (stride FWD_BLOCK_K), need ≤ w value rows exist, acc
                // is rows × dv.
                unsafe {
                    gemm_acc::<S, E::Acc>(
                        MR.min(rows - r0),
                        dv,
                        need,
                        Strided {
                            ptr: s[r0 * FWD_BLOCK_K..].as_ptr(),
                            row_stride: FWD_BLOCK_K,
                            inner_stride: 1,
                        },
                        ctx.v.ptr(seg.batch, seg.k_start + j0, hk),
                        ctx.v.stride(),
                        acc[r0 * dv..].as_mut_ptr(),
                        dv,
                        false,
                    )
                };
            }
            j0 += w;
        }
        for r in 0..rows {
            let qi = seg.q_start + row0 + r;
            let out = ((seg.batch * sh.len_q + qi) * sh.heads_q + hq) * dv;
            let (row_o, row_lse) =
                finish_row(&mut acc[r * dv..(r + 1) * dv], m[r], lane_total(&l[r]));
            for (c, x) in row_o.iter().enumerate() {
                // SAFETY: row (batch, qi, hq) of o belongs to this task.
                unsafe { *o.get().add(out + c) = E::from_acc(*x) };
            }
            // SAFETY: entry (batch, hq, qi) of lse belongs to this task.
            unsafe { *lse.get().add((seg.batch * sh.heads_q + hq) * sh.len_q + qi) = row_lse };
        }
    }
}

/// acc / l and the natural lse ln2·m + ln l (m in base-2 units), or zeros and −inf for a
/// row that saw no key.
#[inline(always)]
fn finish_row<A: Accum>(acc: &mut [A], m: A, l: A) -> (&[A], A) {
    if l > A::ZERO {
        let inv = A::ONE / l;
        for x in acc.iter_mut() {
            *x = *x * inv;
        }
        let lse = m.to_f64() * std::f64::consts::LN_2 + l.to_f64().ln();
        (acc, A::from_f64(lse))
    } else {
        acc.fill(A::ZERO);
        (acc, neg_inf::<A>())
    }
}

/// The smallest lo and largest hi over the rows that see a key ((0, 0) if none does).
fn union(vis: &[(usize, usize)]) -> (usize, usize) {
    let mut lo = usize::MAX;
    let mut hi = 0;
    for &(a, b) in vis {
        if a < b {
            lo = lo.min(a);
            hi = hi.max(b);
        }
    }
    if lo >= hi { (0, 0) } else { (lo, hi) }
}

/// The columns of key block `[j0, j0 + w)` the product of a strip of rows (their visible
/// ranges `strip`) must cover: up to the last one any of its rows sees, rounded up to a
/// multiple of `round` (at most w), or 0 when its rows see none.
fn strip_width(j0: usize, w: usize, strip: &[(usize, usize)], round: usize) -> usize {
    let end = strip
        .iter()
        .map(|&v| block_columns(j0, w, v).1)
        .max()
        .unwrap_or(0);
    end.next_multiple_of(round).min(w)
}

/// Rows row0.. of (seg, head hq) of q, times `scale`, as `[rows × D]`.
fn load_queries<E: Element>(
    q: &[E],
    sh: &AttentionShape,
    seg: &Segment,
    hq: usize,
    row0: usize,
    rows: usize,
    scale: E::Acc,
) -> Vec<E::Acc> {
    let d = sh.head_dim;
    let mut out = Vec::with_capacity(rows * d);
    for r in 0..rows {
        let at = ((seg.batch * sh.len_q + seg.q_start + row0 + r) * sh.heads_q + hq) * d;
        out.extend(q[at..at + d].iter().map(|x| x.to_acc() * scale));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Split-KV decode.
// ---------------------------------------------------------------------------------------

fn split_kv<E: Element>(
    isa: Isa,
    ctx: &Forward<'_, E>,
    segments: &[Segment],
    o: SendPtr<E>,
    lse: SendPtr<E::Acc>,
) {
    let sh = &ctx.shape;
    let (g, dv, hk_n) = (sh.group(), sh.value_dim, sh.heads_kv);
    let rows_max = segments.iter().map(|s| s.q_len * g).max().unwrap_or(0);
    // one task per (segment, chunk of keys), over every KV head: the chunk's rows of K and V
    // are then read front to back (the rows of one head alone are Hk·D apart, a new page
    // every few rows, which the hardware prefetchers do not follow)
    let chunks = |s: &Segment| s.k_len.div_ceil(SPLIT_CHUNK).max(1);
    let tasks: Vec<(usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| (0..chunks(s)).map(move |c| (si, c)))
        .collect();
    let per_head = rows_max * (dv + 2);
    let per = hk_n * per_head;
    if per == 0 {
        return;
    }
    // from the thread's pool: a fresh buffer of this size (0.27 MB at Hq32 Sk8192 Dv128) costs
    // a page fault per 4 KiB on every call
    let mut partial = Scratch::filled(tasks.len() * per, <E::Acc as Accum>::ZERO);
    partial
        .par_chunks_mut(per)
        .zip(tasks.par_iter())
        .for_each(|(part, &(si, c))| {
            let seg = segments[si];
            let k0 = c * SPLIT_CHUNK;
            dispatch(
                isa,
                KvChunk {
                    ctx,
                    seg,
                    keys: (k0, (k0 + SPLIT_CHUNK).min(seg.k_len)),
                    rows_max,
                    part,
                },
            )
        });
    // merge each (segment, KV head) over its chunks, in chunk order
    let mut first = 0;
    let groups: Vec<(usize, usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            let (at, n) = (first, chunks(s));
            first += n;
            (0..hk_n).map(move |h| (si, h, at, n))
        })
        .collect();
    groups.into_par_iter().for_each(|(si, hk, at, n)| {
        let seg = segments[si];
        let rows = seg.q_len * g;
        let zero = <E::Acc as Accum>::ZERO;
        let mut acc = vec![zero; dv];
        for r in 0..rows {
            let part = |c: usize| {
                let start = (at + c) * per + hk * per_head;
                &partial[start..start + per_head]
            };
            let m_of = |c: usize| part(c)[rows_max * dv + r];
            let l_of = |c: usize| part(c)[rows_max * dv + rows_max + r];
            let mut m = neg_inf::<E::Acc>();
            for c in 0..n {
                if m_of(c) > m {
                    m = m_of(c);
                }
            }
            acc.fill(zero);
            let mut l = zero;
            if m != neg_inf::<E::Acc>() {
                for c in 0..n {
                    if m_of(c) == neg_inf::<E::Acc>() {
                        continue;
                    }
                    let f = (m_of(c) - m).exp2();
                    l = l + l_of(c) * f;
                    for (x, y) in acc.iter_mut().zip(&part(c)[r * dv..(r + 1) * dv]) {
                        *x = *x + *y * f;
                    }
                }
            }
            let (row_o, row_lse) = finish_row(&mut acc, m, l);
            let (gi, i) = (r / seg.q_len, r % seg.q_len);
            let (hq, qi) = (hk * g + gi, seg.q_start + i);
            let out = ((seg.batch * sh.len_q + qi) * sh.heads_q + hq) * dv;
            for (c, x) in row_o.iter().enumerate() {
                // SAFETY: the rows of (seg, the query heads of hk) belong to this group.
                unsafe { *o.get().add(out + c) = E::from_acc(*x) };
            }
            // SAFETY: as above.
            unsafe { *lse.get().add((seg.batch * sh.heads_q + hq) * sh.len_q + qi) = row_lse };
        }
    });
}

/// Keys per block of the split-KV path: the scores of every head for the block, then per head
/// one online-softmax step and O += P·V.
const DECODE_BLOCK: usize = 32;
/// How many key positions ahead of the scores the split-KV path touches the next key rows.
const DECODE_OPEN_AHEAD: usize = 4;

/// Every query row of every head against the keys `keys` of `seg`: for each KV head hk,
/// writes its unnormalized O (`[rows_max × Dv]`), then m and l (`rows_max` each) to its part
/// of `part`. Row r of head hk is query head hk·G + r / Sq, query r % Sq.
///
/// K and V are read in place (f16/bf16 widened in registers as they are loaded), key position
/// by key position over every KV head, so the chunk's rows are read front to back: one head's
/// rows alone are Hk·D apart, a new page every few rows, which the hardware prefetchers do not
/// follow.
struct KvChunk<'a, E: Element> {
    ctx: &'a Forward<'a, E>,
    seg: Segment,
    keys: (usize, usize),
    rows_max: usize,
    part: &'a mut [E::Acc],
}

impl<E: Element> SimdKernel for KvChunk<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            ctx,
            seg,
            keys,
            rows_max,
            part,
        } = self;
        let sh = &ctx.shape;
        let (d, dv, g, hk_n) = (sh.head_dim, sh.value_dim, sh.group(), sh.heads_kv);
        let rows = seg.q_len * g;
        let per_head = rows_max * (dv + 2);
        let zero = <E::Acc as Accum>::ZERO;
        // queries of every head, [Hk][rows × D], scaled
        let mut qbuf = Vec::with_capacity(hk_n * rows * d);
        for hq in 0..sh.heads_q {
            qbuf.extend(load_queries(ctx.q, sh, &seg, hq, 0, seg.q_len, ctx.scale));
        }
        let vis: Vec<(usize, usize)> = (0..rows)
            .map(|r| ctx.rules.visible(&seg, r % seg.q_len))
            .collect();
        for h in 0..hk_n {
            part[h * per_head + rows_max * dv..h * per_head + rows_max * dv + rows_max]
                .fill(neg_inf::<E::Acc>());
        }
        // elements per key position: the rows of every KV head
        let (key_len, value_len) = (hk_n * d, hk_n * dv);
        // scores, [Hk][rows][DECODE_BLOCK]
        let mut s = vec![zero; hk_n * rows * DECODE_BLOCK];
        // l's partial sums per (head, row), totalled into `part` at the end
        let mut lsum = vec![[zero; L_LANES]; hk_n * rows];
        let mut cols = Vec::with_capacity(rows);
        let mut j0 = keys.0;
        while j0 < keys.1 {
            let w = DECODE_BLOCK.min(keys.1 - j0);
            cols.clear();
            cols.extend(vis.iter().map(|&v| block_columns(j0, w, v)));
            if cols.iter().all(|c| c.0 >= c.1) {
                j0 += w;
                continue;
            }
            // the block's first key position along [B·Sk]
            let first = seg.batch * sh.len_k + seg.k_start + j0;
            let kblock = &ctx.k[first * key_len..(first + w) * key_len];
            let vblock = &ctx.v_in[first * value_len..(first + w) * value_len];
            for c in 0..w {
                // each key position's rows are a page (4 KiB at Hk8 D128) that the hardware
                // prefetchers reach only by a miss: open the key page a few positions
                // ahead, and each head's value rows of this key for the block's P·V
                // (~10%; prefetching whole rows measured no faster)
                let ahead = (first + c + DECODE_OPEN_AHEAD) * key_len;
                prefetch(ctx.k.as_ptr().wrapping_add(ahead), 1);
                for h in 0..hk_n {
                    let at = (first + c) * value_len + h * dv;
                    prefetch(ctx.v_in.as_ptr().wrapping_add(at), 1);
                }
                for h in 0..hk_n {
                    let krow = &kblock[(c * hk_n + h) * d..][..d];
                    let qh = &qbuf[h * rows * d..(h + 1) * rows * d];
                    let mut r0 = 0;
                    while r0 < rows {
                        let nr = 4.min(rows - r0);
                        let q4 = &qh[r0 * d..(r0 + nr) * d];
                        // the common head dims with their loops unrolled
                        let dots = match (nr, d) {
                            (4, 128) => dots::<S, E, 4, 128>(krow, q4),
                            (4, 64) => dots::<S, E, 4, 64>(krow, q4),
                            (4, _) => dots::<S, E, 4, 0>(krow, q4),
                            (3, _) => dots::<S, E, 3, 0>(krow, q4),
                            (2, _) => dots::<S, E, 2, 0>(krow, q4),
                            _ => dots::<S, E, 1, 0>(krow, q4),
                        };
                        for (rr, x) in dots.into_iter().take(nr).enumerate() {
                            s[(h * rows + r0 + rr) * DECODE_BLOCK + c] = x;
                        }
                        r0 += nr;
                    }
                }
            }
            for hk in 0..hk_n {
                let sh_scores = &mut s[hk * rows * DECODE_BLOCK..(hk + 1) * rows * DECODE_BLOCK];
                let (acc, rest) =
                    part[hk * per_head..(hk + 1) * per_head].split_at_mut(rows_max * dv);
                let m = &mut rest[..rows_max];
                let l = &mut lsum[hk * rows..(hk + 1) * rows];
                for r in 0..rows {
                    let row = &mut sh_scores[r * DECODE_BLOCK..r * DECODE_BLOCK + w];
                    let cols = cols[r];
                    if cols.0 >= cols.1 {
                        row.fill(zero);
                        continue;
                    }
                    let hq = hk * g + r / seg.q_len;
                    ctx.base2_scores::<S>(row, &seg, r % seg.q_len, hq, j0, cols);
                    let alpha = online_step::<S, E::Acc>(row, cols, &mut m[r], &mut l[r]);
                    if alpha != <E::Acc as Accum>::ONE {
                        scale_row::<S, E::Acc>(&mut acc[r * dv..(r + 1) * dv], alpha);
                    }
                }
                // SAFETY: the scores are rows × w (stride DECODE_BLOCK); value row c of head
                // hk is vblock[c·Hk·Dv + hk·Dv..][..Dv], c < w; acc is rows × dv.
                unsafe {
                    gemm_acc_widening::<S, E>(
                        rows,
                        dv,
                        w,
                        Strided {
                            ptr: sh_scores.as_ptr(),
                            row_stride: DECODE_BLOCK,
                            inner_stride: 1,
                        },
                        vblock.as_ptr().wrapping_add(hk * dv),
                        value_len,
                        acc.as_mut_ptr(),
                        dv,
                    )
                };
            }
            j0 += w;
        }
        for hk in 0..hk_n {
            let l = &mut part[hk * per_head + rows_max * (dv + 1)..(hk + 1) * per_head];
            for (x, sums) in l.iter_mut().zip(&lsum[hk * rows..(hk + 1) * rows]) {
                *x = lane_total(sums);
            }
        }
    }
}

/// The dot products of `key` (`[D]`, widened as it is loaded) with the NR ≤ 4 rows of
/// `queries` (`[NR × D]`): two vector accumulators per row over pairs of whole vectors, one
/// after, the four reductions in one `vsum4`, then the scalar tail. Entries NR.. of the
/// result are unused. D = the head dim when it is known at compile time (loops unrolled),
/// else 0.
#[inline(always)]
fn dots<S: Simd, E: Element, const NR: usize, const D: usize>(
    key: &[E],
    queries: &[E::Acc],
) -> [E::Acc; 4] {
    type A<E> = <E as Element>::Acc;
    let d = if D > 0 { D } else { key.len() };
    assert!(key.len() == d);
    assert!(queries.len() >= NR * d);
    let lanes = A::<E>::lanes::<S>();
    // SAFETY: every vector load reads [p, p + lanes) with p + lanes <= d, of `key` and of
    // a query row (checked above to lie in `queries`).
    unsafe {
        let mut accs = [[A::<E>::vsplat::<S>(A::<E>::ZERO); 2]; 4];
        let mut p = 0;
        while p + 2 * lanes <= d {
            let k1 = E::vload::<S>(key.as_ptr().add(p));
            let k2 = E::vload::<S>(key.as_ptr().add(p + lanes));
            for (rr, a) in accs.iter_mut().enumerate().take(NR) {
                let qp = queries.as_ptr().add(rr * d + p);
                a[0] = A::<E>::vfma::<S>(A::<E>::vload::<S>(qp), k1, a[0]);
                a[1] = A::<E>::vfma::<S>(A::<E>::vload::<S>(qp.add(lanes)), k2, a[1]);
            }
            p += 2 * lanes;
        }
        if p + lanes <= d {
            let k1 = E::vload::<S>(key.as_ptr().add(p));
            for (rr, a) in accs.iter_mut().enumerate().take(NR) {
                let qp = queries.as_ptr().add(rr * d + p);
                a[0] = A::<E>::vfma::<S>(A::<E>::vload::<S>(qp), k1, a[0]);
            }
            p += lanes;
        }
        let mut t = A::<E>::vsum4::<S>([
            A::<E>::vadd::<S>(accs[0][0], accs[0][1]),
            A::<E>::vadd::<S>(accs[1][0], accs[1][1]),
            A::<E>::vadd::<S>(accs[2][0], accs[2][1]),
            A::<E>::vadd::<S>(accs[3][0], accs[3][1]),
        ]);
        for (rr, x) in t.iter_mut().enumerate().take(NR) {
            for pp in p..d {
                *x = *x + queries[rr * d + pp] * key[pp].to_acc();
            }
        }
        t
    }
}

// ---------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------

/// What both backward passes read.
struct Backward<'a, E: Element> {
    shape: AttentionShape,
    rules: ScoreRules<'a, E::Acc>,
    scale: E::Acc,
    q: Rows<'a, E::Acc>,
    k: Rows<'a, E::Acc>,
    d_o: Rows<'a, E::Acc>,
    kt: &'a [E::Acc],
    vt: &'a [E::Acc],
    lse: &'a [E::Acc],
    /// rowsum(dO∘O), `[B, Hq, Sq]` as lse.
    delta: &'a [E::Acc],
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: &AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    segments: &[Segment],
    sizes: Sizes,
    o: &[E],
    d_o: &[E],
    lse: &[E::Acc],
) -> AttentionGrads<E> {
    let mut grads = AttentionGrads {
        dq: vec![E::default(); sizes.q],
        dk: vec![E::default(); sizes.k],
        dv: vec![E::default(); sizes.v],
    };
    let sh = shape;
    let (d, dv) = (sh.head_dim, sh.value_dim);
    let zero = <E::Acc as Accum>::ZERO;
    // D = rowsum(dO∘O), in the layout of lse. This and the tasks' dQ accumulators come from
    // the thread's scratch pool: fresh megabytes cost a page fault per 4 KiB on every call.
    let mut delta = Scratch::filled(sizes.lse, zero);
    if dv > 0 {
        delta.par_iter_mut().enumerate().for_each(|(at, x)| {
            let (bh, i) = (at / sh.len_q.max(1), at % sh.len_q.max(1));
            let (b, h) = (bh / sh.heads_q, bh % sh.heads_q);
            let row = ((b * sh.len_q + i) * sh.heads_q + h) * dv;
            *x = o[row..row + dv]
                .iter()
                .zip(&d_o[row..row + dv])
                .fold(zero, |s, (a, b)| s + a.to_acc() * b.to_acc());
        });
    }
    let q = head_major(inputs.q, sh.batch, sh.len_q, sh.heads_q, d);
    let k = head_major(inputs.k, sh.batch, sh.len_k, sh.heads_kv, d);
    let dov = head_major(d_o, sh.batch, sh.len_q, sh.heads_q, dv);
    let kt = panels(
        inputs.k,
        sh.batch,
        sh.len_k,
        sh.heads_kv,
        d,
        segments,
        BLOCK_K,
    );
    let vt = panels(
        inputs.v,
        sh.batch,
        sh.len_k,
        sh.heads_kv,
        dv,
        segments,
        BLOCK_K,
    );
    let rows = |data, len, heads, dim| Rows {
        data,
        len,
        heads,
        dim,
        head_major: true,
    };
    let ctx = Backward {
        shape: *sh,
        rules: ScoreRules::new(params, sh, inputs),
        scale: E::Acc::from_f64(sh.scale(params)),
        q: rows(&q, sh.len_q, sh.heads_q, d),
        k: rows(&k, sh.len_k, sh.heads_kv, d),
        d_o: rows(&dov, sh.len_q, sh.heads_q, dv),
        kt: &kt,
        vt: &vt,
        lse,
        delta: &delta,
    };
    let (dqp, dkp, dvp) = (
        SendPtr(grads.dq.as_mut_ptr()),
        SendPtr(grads.dk.as_mut_ptr()),
        SendPtr(grads.dv.as_mut_ptr()),
    );
    let per_head = match params.backward_tasks {
        BackwardTasks::PerHead => true,
        BackwardTasks::PerBlock => false,
        BackwardTasks::Auto => {
            segments.len() * sh.heads_kv >= PER_HEAD_TASKS_PER_THREAD * rayon::current_num_threads()
        }
    };
    if per_head {
        let head_tasks: Vec<(usize, usize)> = (0..segments.len())
            .flat_map(|si| (0..sh.heads_kv).map(move |h| (si, h)))
            .collect();
        head_tasks.into_par_iter().for_each(|(si, hk)| {
            // SAFETY: the task writes only (seg, hk)'s key rows of dk and dv and the rows of
            // (seg, query heads of hk's group) of dq.
            dispatch(
                isa,
                HeadGrads {
                    ctx: &ctx,
                    seg: segments[si],
                    hk,
                    dq: dqp,
                    dk: dkp,
                    dv: dvp,
                },
            )
        });
        return grads;
    }
    let key_tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..sh.heads_kv)
                .flat_map(move |h| (0..s.k_len).step_by(BLOCK_K).map(move |j| (si, h, j)))
        })
        .collect();
    key_tasks.into_par_iter().for_each(|(si, hk, j0)| {
        // SAFETY: the task writes only key rows j0.. of (seg, hk) in dk and dv.
        dispatch(
            isa,
            KeyBlockGrads {
                ctx: &ctx,
                seg: segments[si],
                hk,
                j0,
                dk: dkp,
                dv: dvp,
            },
        )
    });
    let query_tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..sh.heads_q)
                .flat_map(move |h| (0..s.q_len).step_by(BLOCK_Q).map(move |r| (si, h, r)))
        })
        .collect();
    query_tasks.into_par_iter().for_each(|(si, hq, row0)| {
        // SAFETY: the task writes only rows row0.. of (seg, hq) in dq.
        dispatch(
            isa,
            QueryBlockGrads {
                ctx: &ctx,
                seg: segments[si],
                hq,
                row0,
                dq: dqp,
            },
        )
    });
    grads
}

impl<E: Element> Backward<'_, E> {
    /// For rows row0..row0+rows of (seg, hq) against key block j0 (width w): P in `p` and
    /// dS in `ds` (both rows × BLOCK_K); false if no row sees a key of the block.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn probs_and_ds<S: Simd>(
        &self,
        seg: &Segment,
        hq: usize,
        row0: usize,
        rows: usize,
        j0: usize,
        w: usize,
        p: &mut [E::Acc],
        ds: &mut [E::Acc],
        capd: &mut [E::Acc],
    ) -> bool {
        let sh = &self.shape;
        let (d, dv) = (sh.head_dim, sh.value_dim);
        let hk = hq / sh.group();
        let zero = <E::Acc as Accum>::ZERO;
        let ninf = neg_inf::<E::Acc>();
        let lse_at = (seg.batch * sh.heads_q + hq) * sh.len_q + seg.q_start + row0;
        let cols: Vec<(usize, usize)> = (0..rows)
            .map(|r| {
                let c = block_columns(j0, w, self.rules.visible(seg, row0 + r));
                if self.lse[lse_at + r] == ninf {
                    (0, 0)
                } else {
                    c
                }
            })
            .collect();
        if cols.iter().all(|c| c.0 >= c.1) {
            return false;
        }
        let q_first = seg.q_start + row0;
        // S and dP read the query and dO rows in place as the products' A operands (strided
        // broadcasts, as the forward's P·V does). Packed copies of both were 8 MB at B1 H8
        // S2048 D64, built serially, and kept a head's rows from fitting L2 beside its dQ.
        // SAFETY: the rows row0..row0 + rows of (seg, hq) exist in q (× D) and dO (× Dv);
        // the panels exist; p and ds are rows × BLOCK_K.
        unsafe {
            gemm_set::<S, E::Acc>(
                rows,
                w,
                d,
                Strided {
                    ptr: self.q.ptr(seg.batch, q_first, hq),
                    row_stride: self.q.stride(),
                    inner_stride: 1,
                },
                self.kt[panel_at(sh, d, seg, hk, j0)..].as_ptr(),
                w,
                p.as_mut_ptr(),
                BLOCK_K,
            );
            gemm_set::<S, E::Acc>(
                rows,
                w,
                dv,
                Strided {
                    ptr: self.d_o.ptr(seg.batch, q_first, hq),
                    row_stride: self.d_o.stride(),
                    inner_stride: 1,
                },
                self.vt[panel_at(sh, dv, seg, hk, j0)..].as_ptr(),
                w,
                ds.as_mut_ptr(),
                BLOCK_K,
            );
        }
        let softcap = self.rules.softcap != zero;
        let terms = self.rules.has_terms();
        let log2e = E::Acc::from_f64(std::f64::consts::LOG2_E);
        for r in 0..rows {
            let prow = &mut p[r * BLOCK_K..r * BLOCK_K + w];
            let dsrow = &mut ds[r * BLOCK_K..r * BLOCK_K + w];
            let (a, z) = cols[r];
            if a >= z {
                prow.fill(zero);
                dsrow.fill(zero);
                continue;
            }
            let (lse, delta) = (self.lse[lse_at + r], self.delta[lse_at + r]);
            if !terms {
                // the masks only: one pass, in base 2
                probs_and_ds_row::<S, E::Acc>(
                    prow,
                    dsrow,
                    (a, z),
                    self.scale * log2e,
                    lse * log2e,
                    delta,
                );
                continue;
            }
            scale_row::<S, E::Acc>(prow, self.scale);
            let capd_row = &mut capd[..w];
            self.rules.apply(
                prow,
                seg,
                row0 + r,
                hq,
                j0,
                (a, z),
                softcap.then_some(capd_row),
            );
            exp_shifted::<S, E::Acc>(&mut prow[a..z], lse);
            prow[..a].fill(zero);
            prow[z..].fill(zero);
            for (x, p) in dsrow.iter_mut().zip(prow.iter()) {
                *x = *p * (*x - delta);
            }
            if softcap {
                // the chain rule through softcap·tanh(s / softcap), on the visible keys (the
                // others have p = 0)
                for (x, t) in dsrow[a..z].iter_mut().zip(&capd[a..z]) {
                    *x = *x * *t;
                }
            }
        }
        true
    }
}

/// The scratch buffers of one backward task.
struct GradScratch<A> {
    p: Vec<A>,
    ds: Vec<A>,
    capd: Vec<A>,
    dk: Vec<A>,
    dv: Vec<A>,
}

impl<A: Accum> GradScratch<A> {
    fn new(d: usize, dv: usize) -> Self {
        Self {
            p: vec![A::ZERO; BLOCK_Q * BLOCK_K],
            ds: vec![A::ZERO; BLOCK_Q * BLOCK_K],
            capd: vec![A::ZERO; BLOCK_K],
            dk: vec![A::ZERO; BLOCK_K * d],
            dv: vec![A::ZERO; BLOCK_K * dv],
        }
    }
}

impl<E: Element> Backward<'_, E> {
    /// dK and dV of key block j0 of (seg, KV head hk), summed over the query heads of the
    /// group and every query block that sees the keys, written to `dk` and `dv`. With
    /// `dq_acc` (the group's dQ, `[g × q_len × D]` by query head, then row) dS·K of every
    /// block pair is added there too, the term the per-block pass 2 adds in the same order.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn key_block_grads<S: Simd>(
        &self,
        seg: &Segment,
        hk: usize,
        j0: usize,
        (dk, dv): (SendPtr<E>, SendPtr<E>),
        mut dq_acc: Option<&mut [E::Acc]>,
        scratch: &mut GradScratch<E::Acc>,
    ) {
        let sh = &self.shape;
        let (d, dvd, g) = (sh.head_dim, sh.value_dim, sh.group());
        let w = BLOCK_K.min(seg.k_len - j0);
        let zero = <E::Acc as Accum>::ZERO;
        let GradScratch {
            p,
            ds,
            capd,
            dk: dk_acc,
            dv: dv_acc,
        } = scratch;
        dk_acc[..w * d].fill(zero);
        dv_acc[..w * dvd].fill(zero);
        for hq in hk * g..(hk + 1) * g {
            let mut row0 = 0;
            while row0 < seg.q_len {
                let rows = BLOCK_Q.min(seg.q_len - row0);
                let sees = (0..rows).any(|r| {
                    let c = block_columns(j0, w, self.rules.visible(seg, row0 + r));
                    c.0 < c.1
                });
                if sees && self.probs_and_ds::<S>(seg, hq, row0, rows, j0, w, p, ds, capd) {
                    let q_first = seg.q_start + row0;
                    // SAFETY: p and ds are rows × w (stride BLOCK_K), read transposed; the
                    // dO and q rows exist; dv_acc is w × Dv, dk_acc w × D.
                    unsafe {
                        gemm_acc::<S, E::Acc>(
                            w,
                            dvd,
                            rows,
                            Strided {
                                ptr: p.as_ptr(),
                                row_stride: 1,
                                inner_stride: BLOCK_K,
                            },
                            self.d_o.ptr(seg.batch, q_first, hq),
                            self.d_o.stride(),
                            dv_acc.as_mut_ptr(),
                            dvd,
                            false,
                        );
                        gemm_acc::<S, E::Acc>(
                            w,
                            d,
                            rows,
                            Strided {
                                ptr: ds.as_ptr(),
                                row_stride: 1,
                                inner_stride: BLOCK_K,
                            },
                            self.q.ptr(seg.batch, q_first, hq),
                            self.q.stride(),
                            dk_acc.as_mut_ptr(),
                            d,
                            false,
                        );
                    }
                    if let Some(dq) = dq_acc.as_deref_mut() {
                        let at = ((hq - hk * g) * seg.q_len + row0) * d;
                        let dq_rows = &mut dq[at..at + rows * d];
                        // SAFETY: ds is rows × w (stride BLOCK_K); the key rows exist;
                        // dq_rows is rows × D.
                        unsafe { self.add_ds_times_k::<S>(seg, hk, j0, rows, w, ds, dq_rows) };
                    }
                }
                row0 += rows;
            }
        }
        for c in 0..w {
            let key = seg.k_start + j0 + c;
            let at_k = ((seg.batch * sh.len_k + key) * sh.heads_kv + hk) * d;
            for (p, x) in dk_acc[c * d..(c + 1) * d].iter().enumerate() {
                // SAFETY: key row (batch, key, hk) of dk belongs to this task.
                unsafe { *dk.get().add(at_k + p) = E::from_acc(*x * self.scale) };
            }
            let at_v = ((seg.batch * sh.len_k + key) * sh.heads_kv + hk) * dvd;
            for (p, x) in dv_acc[c * dvd..(c + 1) * dvd].iter().enumerate() {
                // SAFETY: as above, in dv.
                unsafe { *dv.get().add(at_v + p) = E::from_acc(*x) };
            }
        }
    }

    /// dq_rows += dS·K for key block j0 (width w) of (seg, hk).
    ///
    /// # Safety
    /// ds holds rows × w at stride BLOCK_K; dq_rows is rows × D.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn add_ds_times_k<S: Simd>(
        &self,
        seg: &Segment,
        hk: usize,
        j0: usize,
        rows: usize,
        w: usize,
        ds: &[E::Acc],
        dq_rows: &mut [E::Acc],
    ) {
        debug_assert!(dq_rows.len() >= rows * self.shape.head_dim);
        // SAFETY: gemm_acc's contract: A = ds (rows × w at stride BLOCK_K, per this fn's
        // contract), B = w key rows of K from key k_start + j0 (inside the segment's keys,
        // validated by the attention shape checks), C = dq_rows (rows × D, a separate
        // buffer); the ISA is the caller's (`run` under dispatch).
        unsafe {
            gemm_acc::<S, E::Acc>(
                rows,
                self.shape.head_dim,
                w,
                Strided {
                    ptr: ds.as_ptr(),
                    row_stride: BLOCK_K,
                    inner_stride: 1,
                },
                self.k.ptr(seg.batch, seg.k_start + j0, hk),
                self.k.stride(),
                dq_rows.as_mut_ptr(),
                self.shape.head_dim,
                false,
            )
        };
    }

    /// Writes rows row0.. of (seg, hq) of dq: scale · acc (`rows × D`).
    fn store_dq(&self, seg: &Segment, hq: usize, row0: usize, acc: &[E::Acc], dq: SendPtr<E>) {
        let (sh, d) = (&self.shape, self.shape.head_dim);
        if d == 0 {
            return; // dq has no element
        }
        for (r, row) in acc.chunks_exact(d).enumerate() {
            let at = ((seg.batch * sh.len_q + seg.q_start + row0 + r) * sh.heads_q + hq) * d;
            for (p, x) in row.iter().enumerate() {
                // SAFETY: row (batch, query, hq) of dq belongs to the calling task.
                unsafe { *dq.get().add(at + p) = E::from_acc(*x * self.scale) };
            }
        }
    }
}

/// Pass 1 of [`BackwardTasks::PerBlock`]: dK and dV of one key block of (seg, KV head hk).
struct KeyBlockGrads<'a, E: Element> {
    ctx: &'a Backward<'a, E>,
    seg: Segment,
    hk: usize,
    j0: usize,
    dk: SendPtr<E>,
    dv: SendPtr<E>,
}

impl<E: Element> SimdKernel for KeyBlockGrads<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let sh = &self.ctx.shape;
        let mut scratch = GradScratch::new(sh.head_dim, sh.value_dim);
        self.ctx.key_block_grads::<S>(
            &self.seg,
            self.hk,
            self.j0,
            (self.dk, self.dv),
            None,
            &mut scratch,
        );
    }
}

/// [`BackwardTasks::PerHead`]: dK, dV of every key block of (seg, KV head hk) and dQ of the
/// group's query heads, in one pass.
struct HeadGrads<'a, E: Element> {
    ctx: &'a Backward<'a, E>,
    seg: Segment,
    hk: usize,
    dq: SendPtr<E>,
    dk: SendPtr<E>,
    dv: SendPtr<E>,
}

impl<E: Element> SimdKernel for HeadGrads<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            ctx,
            seg,
            hk,
            dq,
            dk,
            dv,
        } = self;
        let sh = &ctx.shape;
        let (d, g) = (sh.head_dim, sh.group());
        let mut scratch = GradScratch::new(d, sh.value_dim);
        let head_len = seg.q_len * d;
        let mut dq_acc = Scratch::filled(g * head_len, <E::Acc as Accum>::ZERO);
        for j0 in (0..seg.k_len).step_by(BLOCK_K) {
            ctx.key_block_grads::<S>(&seg, hk, j0, (dk, dv), Some(&mut dq_acc), &mut scratch);
        }
        if head_len > 0 {
            for (i, acc) in dq_acc.chunks_exact(head_len).enumerate() {
                ctx.store_dq(&seg, hk * g + i, 0, acc, dq);
            }
        }
    }
}

/// Pass 2 of [`BackwardTasks::PerBlock`]: dQ of one block of query rows of (seg, hq), over
/// every key block they see.
struct QueryBlockGrads<'a, E: Element> {
    ctx: &'a Backward<'a, E>,
    seg: Segment,
    hq: usize,
    row0: usize,
    dq: SendPtr<E>,
}

impl<E: Element> SimdKernel for QueryBlockGrads<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            ctx,
            seg,
            hq,
            row0,
            dq,
        } = self;
        let sh = &ctx.shape;
        let hk = hq / sh.group();
        let rows = BLOCK_Q.min(seg.q_len - row0);
        let mut dq_acc = Scratch::filled(rows * sh.head_dim, <E::Acc as Accum>::ZERO);
        let mut scratch = GradScratch::new(0, 0);
        let GradScratch { p, ds, capd, .. } = &mut scratch;
        let vis: Vec<(usize, usize)> = (0..rows)
            .map(|r| ctx.rules.visible(&seg, row0 + r))
            .collect();
        let (lo, hi) = union(&vis);
        let mut j0 = lo - lo % BLOCK_K;
        while j0 < hi {
            let w = BLOCK_K.min(seg.k_len - j0);
            if ctx.probs_and_ds::<S>(&seg, hq, row0, rows, j0, w, p, ds, capd) {
                // SAFETY: ds is rows × w (stride BLOCK_K); dq_acc is rows × D.
                unsafe { ctx.add_ds_times_k::<S>(&seg, hk, j0, rows, w, ds, &mut dq_acc) };
            }
            j0 += w;
        }
        ctx.store_dq(&seg, hq, row0, &dq_acc, dq);
    }
}

// ---------------------------------------------------------------------------------------
// top_keys.
// ---------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(super) fn top_keys<E: Element>(
    isa: Isa,
    params: &AttentionParams,
    shape: &AttentionShape,
    inputs: &AttentionInputs<'_, E>,
    segments: &[Segment],
    sizes: Sizes,
    top: usize,
    out_len: usize,
) -> (Vec<E::Acc>, Vec<i32>) {
    // pass 1: the forward without values gives lse
    let no_values = AttentionParams {
        split_kv: SplitKv::Never,
        ..*params
    };
    let lse_inputs = AttentionInputs { v: &[], ..*inputs };
    let (_, lse) = forward(isa, &no_values, shape, &lse_inputs, segments, sizes);
    let mut weights = vec![<E::Acc as Accum>::ZERO; out_len];
    let mut indices = vec![-1i32; out_len];
    if out_len == 0 {
        return (weights, indices);
    }
    let kt = panels(
        inputs.k,
        shape.batch,
        shape.len_k,
        shape.heads_kv,
        shape.head_dim,
        segments,
        FWD_BLOCK_K,
    );
    let ctx = TopContext {
        shape: *shape,
        rules: ScoreRules::new(params, shape, inputs),
        scale: E::Acc::from_f64(shape.scale(params)),
        q: inputs.q,
        kt: &kt,
        lse: &lse,
        top,
    };
    let (wp, ip) = (SendPtr(weights.as_mut_ptr()), SendPtr(indices.as_mut_ptr()));
    let tasks: Vec<(usize, usize, usize)> = segments
        .iter()
        .enumerate()
        .flat_map(|(si, s)| {
            (0..shape.heads_q)
                .flat_map(move |h| (0..s.q_len).step_by(BLOCK_Q).map(move |r| (si, h, r)))
        })
        .collect();
    tasks.into_par_iter().for_each(|(si, hq, row0)| {
        // SAFETY: the task writes only the rows row0.. of (seg, hq) of weights and indices.
        dispatch(
            isa,
            TopBlock {
                ctx: &ctx,
                seg: segments[si],
                hq,
                row0,
                weights: wp,
                indices: ip,
            },
        )
    });
    (weights, indices)
}

struct TopContext<'a, E: Element> {
    shape: AttentionShape,
    rules: ScoreRules<'a, E::Acc>,
    scale: E::Acc,
    q: &'a [E],
    kt: &'a [E::Acc],
    lse: &'a [E::Acc],
    top: usize,
}

struct TopBlock<'a, E: Element> {
    ctx: &'a TopContext<'a, E>,
    seg: Segment,
    hq: usize,
    row0: usize,
    weights: SendPtr<E::Acc>,
    indices: SendPtr<i32>,
}

impl<E: Element> SimdKernel for TopBlock<'_, E> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        let Self {
            ctx,
            seg,
            hq,
            row0,
            weights,
            indices,
        } = self;
        let sh = &ctx.shape;
        let d = sh.head_dim;
        let hk = hq / sh.group();
        let rows = BLOCK_Q.min(seg.q_len - row0);
        let zero = <E::Acc as Accum>::ZERO;
        let ninf = neg_inf::<E::Acc>();
        let vis: Vec<(usize, usize)> = (0..rows)
            .map(|r| ctx.rules.visible(&seg, row0 + r))
            .collect();
        // per row: (score, key position) in descending score, ties in key order
        let mut lists: Vec<Vec<(E::Acc, usize)>> = vis
            .iter()
            .map(|&(lo, hi)| Vec::with_capacity(ctx.top.min(hi - lo)))
            .collect();
        let mut s = vec![zero; rows * FWD_BLOCK_K];

        // the queries are the A operand of every score tile: packed once
        let qpack = pack_queries(ctx.q, sh, &seg, (hq, row0, rows), ctx.scale);
        let (lo, hi) = union(&vis);
        let mut j0 = lo - lo % FWD_BLOCK_K;
        while j0 < hi {
            let w = FWD_BLOCK_K.min(seg.k_len - j0);
            // SAFETY: qpack holds the rows' strips, the panel d × w, s rows × FWD_BLOCK_K.
            unsafe {
                matmul_packed::<S, E::Acc>(
                    rows,
                    w,
                    d,
                    &qpack,
                    ctx.kt[panel_at(sh, d, &seg, hk, j0)..].as_ptr(),
                    w,
                    s.as_mut_ptr(),
                    FWD_BLOCK_K,
                    false,
                )
            };
            for (r, list) in lists.iter_mut().enumerate() {
                let (a, z) = block_columns(j0, w, vis[r]);
                if a >= z {
                    continue;
                }
                let row = &mut s[r * FWD_BLOCK_K..r * FWD_BLOCK_K + w];
                ctx.rules.apply(row, &seg, row0 + r, hq, j0, (a, z), None);
                for (c, &x) in row.iter().enumerate().take(z).skip(a) {
                    if x == ninf {
                        continue; // a −inf bias masks the key
                    }
                    let full = list.len() == ctx.top;
                    if full
                        && list.last().is_some_and(|last| {
                            x.partial_cmp(&last.0) != Some(std::cmp::Ordering::Greater)
                        })
                    {
                        continue;
                    }
                    if full {
                        list.pop();
                    }
                    // after every entry >= x: ties keep the lower key first
                    let at = list.partition_point(|e| e.0 >= x);
                    list.insert(at, (x, seg.k_start + j0 + c));
                }
            }
            j0 += w;
        }
        for (r, list) in lists.iter().enumerate() {
            let qi = seg.q_start + row0 + r;
            let lse_row = ctx.lse[(seg.batch * sh.heads_q + hq) * sh.len_q + qi];
            let at = ((seg.batch * sh.heads_q + hq) * sh.len_q + qi) * ctx.top;
            if lse_row == ninf {
                continue; // no key seen: the padding (0, −1) is already there
            }
            for (t, &(x, key)) in list.iter().enumerate() {
                let p = (x.to_f64() - lse_row.to_f64()).exp();
                // SAFETY: row (batch, hq, qi) of weights and indices belongs to this task;
                // key < Sk fits in i32 (checked by the caller).
                unsafe {
                    *weights.get().add(at + t) = E::Acc::from_f64(p);
                    *indices.get().add(at + t) = key as i32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// The per-call copies against their index formulas: odd dims, several heads and
    /// batches, sequences (packed and per batch row) whose lengths are not multiples of the
    /// block or of the 16-position groups the panels are written in, and a widened dtype.
    #[test]
    fn copies_match_their_index_formulas() {
        let (heads, dim) = (3, 5);
        let value = |i: usize| (i % 251) as f32 - 100.0; // exact in bf16 and f32
        for (batch, len, segments) in [
            // packed sequences of one batch row, one of them empty
            (1, 86, vec![(0, 17), (17, 0), (17, 53), (70, 16)]),
            // a batch of whole sequences
            (2, 70, vec![(0, 70)]),
        ] {
            let segs: Vec<Segment> = (0..batch)
                .flat_map(|b| {
                    segments.iter().map(move |&(k_start, k_len)| Segment {
                        batch: b,
                        q_start: 0,
                        q_len: 1,
                        k_start,
                        k_len,
                    })
                })
                .collect();
            let n = batch * len * heads * dim;
            let x: Vec<bf16> = (0..n).map(|i| bf16::from_f32(value(i))).collect();
            let at = |b: usize, s: usize, h: usize, p: usize| ((b * len + s) * heads + h) * dim + p;
            let rows = head_major(&x, batch, len, heads, dim);
            for b in 0..batch {
                for s in 0..len {
                    for h in 0..heads {
                        for p in 0..dim {
                            let got = rows[((b * heads + h) * len + s) * dim + p];
                            assert_eq!(got, value(at(b, s, h, p)), "head_major at {b} {s} {h} {p}");
                        }
                    }
                }
            }
            for block in [16, 64, 128] {
                let kt = panels(&x, batch, len, heads, dim, &segs, block);
                for seg in &segs {
                    for h in 0..heads {
                        for j0 in (0..seg.k_len).step_by(block) {
                            let w = block.min(seg.k_len - j0);
                            let base = ((seg.batch * heads + h) * len + seg.k_start + j0) * dim;
                            for c in 0..w {
                                for p in 0..dim {
                                    let want = value(at(seg.batch, seg.k_start + j0 + c, h, p));
                                    assert_eq!(kt[base + p * w + c], want, "panel {block} {seg:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
