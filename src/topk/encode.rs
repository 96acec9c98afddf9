//! The fused encoder: scores s[b, l] = (x[b]·w[l])·scale[l] + shift[l] for a batch of rows
//! against a large set of latents (SAE encoder rows, codebook entries, dictionary atoms),
//! selected on the fly so that the [B, L] score matrix never exists in memory.
//!
//! Plan. A task owns a range of rows and a chunk of latents. The rows of a group (up to
//! `PACK_BYTES` of them) are packed once, before the tasks, into panels laid out [d][row]
//! (two vectors of rows per step of d, zero rows past the end) that every latent chunk's task
//! reads; the task packs its chunk's weights into tiles laid out [d][latent of tile]. One
//! step of the dot product loads two vectors of rows and broadcasts one adjacent weight per
//! latent. The register tile is 12 latents × 2 vectors of rows on AVX-512 (24 of its 32
//! registers), 6 × 2 elsewhere: the scores are born in registers, scaled and shifted there,
//! and compared in one vector compare per vector of rows against the rows' current
//! thresholds; only lanes that pass leave the registers (for top-k, after the first 2k
//! latents of a row, a small fraction). Rows are the vector lanes, so the threshold vector is
//! simply the rows' thresholds loaded side by side.
//!
//! Cache use: for one panel, d runs in steps whose slice of the panel (`PANEL_STEP_BYTES`)
//! stays in L1 while every tile of the chunk passes over it, the weights streaming from L2
//! (the chunk, 512 latents × Dm, 1.5 MiB at Dm 768 f32, is packed once per task); between
//! steps a tile's partial sums wait in a buffer of MR × 2 vectors per tile. Bound: the
//! 2·B·L·Dm multiply-adds (FMA throughput), with memory traffic O(B·Dm·L/512 + L·Dm) and
//! extra memory O(group × Dm) for the packed rows (at most `PACK_BYTES`) plus one packed
//! chunk per thread.
//!
//! Determinism: every score is the same sequential sum over d whatever the task split, and
//! the selection is exact under a total order (see `select`), so results do not depend on
//! the thread count.

use super::select::{TopList, rank};
use crate::cpu::{Isa, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use rayon::prelude::*;

/// Latents per task chunk (packed once per task; streamed from L2 once per panel).
const LATENT_CHUNK: usize = 512;
/// A panel's slice of d stays in L1 up to this size while a chunk's tiles pass over it.
const PANEL_STEP_BYTES: usize = 24 << 10;

/// Bound on a group's packed rows: a group is packed once and shared by every latent chunk
/// (packed again per chunk, as before, the packing took ~8% of the time: a transposing copy
/// runs far slower per element than the FMA tiles).
const PACK_BYTES: usize = 32 << 20;

/// How scores are turned into per-row outputs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Collect<'a, A> {
    /// The best `k` of each row; with `relu`, values below zero count as zero (NaN stays).
    TopK { k: usize, relu: bool },
    /// Every score strictly above the latent's threshold (NaN never passes).
    Above { threshold: &'a [A] },
}

/// The inputs of one encoder run. `x [rows, dm]` enters as (x − offset)·row_scale.
pub(crate) struct Encoder<'a, X, W: Element> {
    pub x: &'a [X],
    pub rows: usize,
    pub dm: usize,
    pub offset: Option<&'a [W::Acc]>,
    pub row_scale: Option<&'a [W::Acc]>,
    pub w: &'a [W],
    pub latents: usize,
    pub scale: Option<&'a [W::Acc]>,
    pub shift: Option<&'a [W::Acc]>,
}

/// Per-row selections, each best first (ties: lower latent first).
pub(crate) type Selections<A> = Vec<Vec<(A, u32)>>;

impl<X: Element<Acc = W::Acc>, W: Element> Encoder<'_, X, W> {
    /// Runs the encoder and returns each row's selection: top-k by AMX screening and exact
    /// rescoring where that applies (`screen`, the same result), else the plain path.
    pub fn run(&self, isa: Isa, collect: Collect<'_, W::Acc>) -> Selections<W::Acc> {
        #[cfg(target_arch = "x86_64")]
        if let Collect::TopK { k, relu } = collect
            && let Some(out) = super::screen::top_k(self, isa, k, relu)
        {
            return out;
        }
        self.run_plain(isa, collect)
    }

    /// The plain path: every score by SIMD FMA tiles, selected on the fly.
    pub fn run_plain(&self, isa: Isa, collect: Collect<'_, W::Acc>) -> Selections<W::Acc> {
        let rows = self.rows;
        let chunks = self.latents.div_ceil(LATENT_CHUNK);
        let threads = rayon::current_num_threads();
        let mut out: Selections<W::Acc> = vec![Vec::new(); rows];
        if rows == 0 || self.latents == 0 {
            return out;
        }
        let panel_rows = dispatch(isa, PanelRows::<W::Acc>(std::marker::PhantomData));
        if chunks >= 2 * threads || rows < 256 {
            // Many latents: each group of rows is packed once, then one parallel fold over
            // latent chunks.
            let fit = PACK_BYTES / (self.dm.max(1) * std::mem::size_of::<W::Acc>());
            let group = fit.clamp(panel_rows, 8192) / panel_rows * panel_rows;
            for (g, out_group) in out.chunks_mut(group).enumerate() {
                let r0 = g * group;
                let r1 = r0 + out_group.len();
                let panels = self.pack(r0..r1, panel_rows);
                let sink = (0..chunks)
                    .into_par_iter()
                    // every piece of the fold starts its own lists, which admit far more
                    // candidates than lists warmed over earlier chunks: at most two pieces
                    // per thread (rayon would split far finer)
                    .with_min_len(chunks.div_ceil(2 * threads))
                    .fold(
                        || Sink::new(collect, r1 - r0),
                        |mut sink, c| {
                            self.task(isa, r0..r1, &panels, c, &mut sink);
                            sink
                        },
                    )
                    .reduce_with(|mut a, b| {
                        a.merge(b);
                        a
                    });
                if let Some(sink) = sink {
                    sink.finish(out_group);
                }
            }
        } else {
            // Few latents, many rows: parallel over groups of rows (each packed once),
            // latents in order.
            let group = rows
                .div_ceil(4 * threads)
                .max(64)
                .next_multiple_of(panel_rows);
            out.par_chunks_mut(group)
                .enumerate()
                .for_each(|(g, out_group)| {
                    let r0 = g * group;
                    let r1 = r0 + out_group.len();
                    let panels = self.pack(r0..r1, panel_rows);
                    let mut sink = Sink::new(collect, r1 - r0);
                    for c in 0..chunks {
                        self.task(isa, r0..r1, &panels, c, &mut sink);
                    }
                    sink.finish(out_group);
                });
        }
        out
    }

    fn task(
        &self,
        isa: Isa,
        rows: std::ops::Range<usize>,
        panels: &[W::Acc],
        chunk: usize,
        sink: &mut Sink<'_, W::Acc>,
    ) {
        dispatch(
            isa,
            Task {
                enc: self,
                rows,
                panels,
                chunk,
                sink,
            },
        )
    }

    /// One input value as the scores use it: (x − offset)·row scale (the screened path
    /// rescores with these same values, so both paths must take them from here).
    #[inline(always)]
    pub(crate) fn centered(&self, v: X, d: usize, row_scale: W::Acc) -> W::Acc {
        let centered = match self.offset {
            Some(o) => v.to_acc() - o[d],
            None => v.to_acc(),
        };
        centered * row_scale
    }

    /// Rows `rows` of x, minus the offset and times the row scale, into panels
    /// [panel][d][row of panel] of `panel_rows` rows each (rows past the end are zero);
    /// parallel over panels.
    fn pack(&self, rows: std::ops::Range<usize>, panel_rows: usize) -> Vec<W::Acc> {
        let dm = self.dm;
        let n = rows.len();
        let mut panels = vec![W::Acc::ZERO; n.div_ceil(panel_rows) * panel_rows * dm];
        if dm == 0 {
            return panels;
        }
        panels
            .par_chunks_mut(panel_rows * dm)
            .enumerate()
            .for_each(|(p, panel)| {
                let first = rows.start + p * panel_rows;
                for i in 0..panel_rows.min(rows.end - first) {
                    let row = &self.x[(first + i) * dm..(first + i + 1) * dm];
                    let scale = self.row_scale.map_or(W::Acc::ONE, |s| s[first + i]);
                    for (d, &v) in row.iter().enumerate() {
                        panel[d * panel_rows + i] = self.centered(v, d, scale);
                    }
                }
            });
        panels
    }
}

/// The rows of a packed panel on the chosen ISA: two vectors of `A`.
struct PanelRows<A>(std::marker::PhantomData<A>);

impl<A: Accum> SimdKernel for PanelRows<A> {
    type Output = usize;
    #[inline(always)]
    fn run<S: Simd>(self) -> usize {
        2 * A::lanes::<S>()
    }
}

/// Per-row state of a collection over one range of rows (indexed from the range start).
pub(crate) struct Sink<'a, A: Accum> {
    collect: Collect<'a, A>,
    lists: Vec<TopList<A>>,
    above: Vec<Vec<(A, u32)>>,
}

impl<'a, A: Accum> Sink<'a, A> {
    fn new(collect: Collect<'a, A>, rows: usize) -> Self {
        match collect {
            Collect::TopK { k, .. } => Self {
                collect,
                lists: vec![TopList::new(k); rows],
                above: Vec::new(),
            },
            Collect::Above { .. } => Self {
                collect,
                lists: Vec::new(),
                above: vec![Vec::new(); rows],
            },
        }
    }

    fn merge(&mut self, other: Sink<'a, A>) {
        for (a, b) in self.lists.iter_mut().zip(&other.lists) {
            a.merge(b);
        }
        for (a, b) in self.above.iter_mut().zip(other.above) {
            a.extend(b);
        }
    }

    fn finish(self, out: &mut [Vec<(A, u32)>]) {
        match self.collect {
            Collect::TopK { .. } => {
                for (o, list) in out.iter_mut().zip(self.lists) {
                    *o = list.into_sorted();
                }
            }
            Collect::Above { .. } => {
                for (o, mut list) in out.iter_mut().zip(self.above) {
                    list.sort_unstable_by(|a, b| rank(*b, *a));
                    *o = list;
                }
            }
        }
    }
}

struct Task<'e, 's, 'a, X, W: Element> {
    enc: &'e Encoder<'e, X, W>,
    rows: std::ops::Range<usize>,
    /// The rows' panels, packed by `Encoder::pack`.
    panels: &'e [W::Acc],
    chunk: usize,
    sink: &'s mut Sink<'a, W::Acc>,
}

impl<X: Element<Acc = W::Acc>, W: Element> SimdKernel for Task<'_, '_, '_, X, W> {
    type Output = ();
    #[inline(always)]
    fn run<S: Simd>(self) {
        // 12 latents × 2 vectors = 24 accumulators of AVX-512's 32 registers; 6 × 2 of 16
        if S::WIDE_TILES {
            self.tiles::<S, 12>()
        } else {
            self.tiles::<S, 6>()
        }
    }
}

impl<X: Element<Acc = W::Acc>, W: Element> Task<'_, '_, '_, X, W> {
    /// The task on tiles of `MR` latents × one panel.
    #[inline(always)]
    fn tiles<S: Simd, const MR: usize>(self) {
        let enc = self.enc;
        let dm = enc.dm;
        let panel_rows = 2 * W::Acc::lanes::<S>();
        let l0 = self.chunk * LATENT_CHUNK;
        let l1 = (l0 + LATENT_CHUNK).min(enc.latents);
        let tiles = (l1 - l0).div_ceil(MR);
        let weights = pack_tiles::<W, MR>(&enc.w[l0 * dm..l1 * dm], dm, tiles);
        let one = W::Acc::ONE;
        let scale: Vec<W::Acc> = enc.scale.map_or(vec![one; l1 - l0], |s| s[l0..l1].to_vec());
        let shift: Vec<W::Acc> = enc
            .shift
            .map_or(vec![W::Acc::ZERO; l1 - l0], |s| s[l0..l1].to_vec());
        // dm in steps whose slice of a panel stays in L1 while every tile of the chunk
        // passes over it; the partial scores wait in `partial` between steps
        let step_max = (PANEL_STEP_BYTES / (panel_rows * std::mem::size_of::<W::Acc>())).max(1);
        let step = dm.div_ceil(dm.div_ceil(step_max).max(1)).max(1);
        let mut partial = vec![W::Acc::ZERO; tiles * MR * panel_rows];
        let mut thresholds = vec![W::Acc::ZERO; panel_rows];
        let n_rows = self.rows.len();
        for p in 0..n_rows.div_ceil(panel_rows) {
            let row0 = p * panel_rows;
            let valid = (n_rows - row0).min(panel_rows);
            if let Collect::TopK { .. } = self.sink.collect {
                // the rows' thresholds, side by side as the lanes
                let lists = &self.sink.lists[row0..row0 + valid];
                for (t, list) in thresholds.iter_mut().zip(lists) {
                    *t = list.threshold();
                }
            }
            let panel = &self.panels[row0 * dm..(row0 + panel_rows) * dm];
            // at least one step: with dm = 0 the scores are the shifts
            let mut d0 = 0;
            loop {
                let d1 = (d0 + step).min(dm);
                for t in 0..tiles {
                    let part = &mut partial[t * MR * panel_rows..(t + 1) * MR * panel_rows];
                    let w = &weights[(t * dm + d0) * MR..(t * dm + d1) * MR];
                    // SAFETY: `w` holds MR weights per step of d0..d1, the panel's slice two
                    // vectors of rows per step, `part` MR × two vectors.
                    let acc = unsafe {
                        product::<S, W::Acc, MR>(
                            w,
                            &panel[d0 * panel_rows..],
                            d1 - d0,
                            part,
                            d0 == 0,
                        )
                    };
                    if d1 < dm {
                        // SAFETY: `part` holds MR × two vectors
                        unsafe { store_tile::<S, W::Acc, MR>(acc, part) };
                        continue;
                    }
                    let latents = (l1 - l0 - t * MR).min(MR);
                    let ctx = TileCtx {
                        latent0: (l0 + t * MR) as u32,
                        scale: &scale[t * MR..t * MR + latents],
                        shift: &shift[t * MR..t * MR + latents],
                        valid,
                        row0,
                    };
                    // SAFETY: the sink has a list per row of the range (row0 + valid <= len)
                    unsafe {
                        collect_tile::<S, W::Acc, MR>(&acc, &ctx, self.sink, &mut thresholds)
                    };
                }
                if d1 == dm {
                    break;
                }
                d0 = d1;
            }
        }
    }
}

/// Latent rows `w [n, dm]`, widened, as `tiles` tiles laid out [tile][d][latent of tile]
/// (latents past `n` are zero), so a step of d reads MR adjacent weights.
fn pack_tiles<W: Element, const MR: usize>(w: &[W], dm: usize, tiles: usize) -> Vec<W::Acc> {
    let mut packed = vec![W::Acc::ZERO; tiles * dm * MR];
    for (l, row) in w.chunks_exact(dm.max(1)).enumerate() {
        let tile = &mut packed[(l / MR) * dm * MR..];
        for (d, v) in row.iter().enumerate() {
            tile[d * MR + l % MR] = v.to_acc();
        }
    }
    packed
}

/// MR latents × two vectors of rows over `steps` steps of d, starting from zero (`fresh`)
/// or from the partial sums in `part`.
///
/// # Safety
/// `w` holds `steps · MR` values, `panel` at least `steps · 2 · lanes`, `part` `MR · 2 · lanes`.
#[inline(always)]
unsafe fn product<S: Simd, A: Accum, const MR: usize>(
    w: &[A],
    panel: &[A],
    steps: usize,
    part: &[A],
    fresh: bool,
) -> [[A::V<S>; 2]; MR] {
    let lanes = A::lanes::<S>();
    debug_assert!(w.len() >= steps * MR && panel.len() >= steps * 2 * lanes);
    // SAFETY: reads w[p·MR + r], panel[p·2·lanes ..+ 2·lanes] (p < steps) and part's MR·2
    // vectors: within the lengths of this fn's contract, through pointers from the whole
    // slices; the ISA is the caller's (`run` under dispatch).
    unsafe {
        let mut acc = [[A::vsplat::<S>(A::ZERO); 2]; MR];
        if !fresh {
            for (r, row) in acc.iter_mut().enumerate() {
                row[0] = A::vload::<S>(part.as_ptr().add(2 * r * lanes));
                row[1] = A::vload::<S>(part.as_ptr().add((2 * r + 1) * lanes));
            }
        }
        let (w, panel) = (w.as_ptr(), panel.as_ptr());
        for d in 0..steps {
            let b0 = A::vload::<S>(panel.add(d * 2 * lanes));
            let b1 = A::vload::<S>(panel.add(d * 2 * lanes + lanes));
            for (r, row) in acc.iter_mut().enumerate() {
                let a = A::vsplat::<S>(*w.add(d * MR + r));
                row[0] = A::vfma::<S>(a, b0, row[0]);
                row[1] = A::vfma::<S>(a, b1, row[1]);
            }
        }
        acc
    }
}

/// # Safety
/// `part` holds `MR · 2 · lanes` values.
#[inline(always)]
unsafe fn store_tile<S: Simd, A: Accum, const MR: usize>(acc: [[A::V<S>; 2]; MR], part: &mut [A]) {
    let lanes = A::lanes::<S>();
    debug_assert!(part.len() >= MR * 2 * lanes);
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: within `part` (see above)
        unsafe {
            A::vstore::<S>(part.as_mut_ptr().add(2 * r * lanes), row[0]);
            A::vstore::<S>(part.as_mut_ptr().add((2 * r + 1) * lanes), row[1]);
        }
    }
}

struct TileCtx<'a, A> {
    latent0: u32,
    /// The tile's real latents' scale and shift (the rest of the tile is padding).
    scale: &'a [A],
    shift: &'a [A],
    /// Real rows in this panel (the rest are padding).
    valid: usize,
    /// The panel's first row, as an index into the sink's rows.
    row0: usize,
}

/// The fused scale/shift, compare and collection of one finished tile's scores.
///
/// # Safety
/// The sink has a list per row `row0 .. row0 + valid`; `thresholds` holds two vectors.
#[inline(always)]
unsafe fn collect_tile<S: Simd, A: Accum, const MR: usize>(
    acc: &[[A::V<S>; 2]; MR],
    ctx: &TileCtx<'_, A>,
    sink: &mut Sink<'_, A>,
    thresholds: &mut [A],
) {
    let lanes = A::lanes::<S>();
    let valid_bits = |v: usize| -> u32 {
        let first = v * lanes;
        let n = ctx.valid.saturating_sub(first).min(lanes);
        if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
    };
    let valid = [valid_bits(0), valid_bits(1)];
    let mut buf = [A::ZERO; 64];
    for (r, row) in acc.iter().enumerate().take(ctx.scale.len()) {
        let latent = ctx.latent0 + r as u32;
        // SAFETY: vector ops on registers, loads within `thresholds` (two vectors)
        unsafe {
            let mul = A::vsplat::<S>(ctx.scale[r]);
            let add = A::vsplat::<S>(ctx.shift[r]);
            for v in 0..2 {
                let s = A::vfma::<S>(row[v], mul, add);
                let mask = match sink.collect {
                    Collect::TopK { .. } => {
                        A::vmask_nle::<S>(s, A::vload::<S>(thresholds.as_ptr().add(v * lanes)))
                    }
                    Collect::Above { threshold } => {
                        A::vmask_gt::<S>(s, A::vsplat::<S>(threshold[latent as usize]))
                    }
                } & valid[v];
                if mask == 0 {
                    continue;
                }
                A::vstore::<S>(buf.as_mut_ptr(), s);
                let mut bits = mask;
                while bits != 0 {
                    let lane = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let i = v * lanes + lane;
                    let value = buf[lane];
                    match sink.collect {
                        Collect::TopK { relu, .. } => {
                            let list = &mut sink.lists[ctx.row0 + i];
                            #[allow(clippy::neg_cmp_op_on_partial_ord)]
                            if !(value <= list.threshold()) {
                                let kept = if relu && value <= A::ZERO {
                                    A::ZERO
                                } else {
                                    value
                                };
                                list.push(kept, latent);
                                thresholds[i] = list.threshold();
                            }
                        }
                        Collect::Above { .. } => sink.above[ctx.row0 + i].push((value, latent)),
                    }
                }
            }
        }
    }
}
