//! The fused encoder: scores s[b, l] = (x[b]·w[l])·scale[l] + shift[l] for a batch of rows
//! against a large set of latents (SAE encoder rows, codebook entries, dictionary atoms),
//! selected on the fly so that the [B, L] score matrix never exists in memory.
//!
//! Plan. A task owns a range of rows and a chunk of latents. The rows of a group (up to
//! `PACK_BYTES` of them) are packed once, before the tasks, into panels laid out [d][row]
//! (two vectors of rows per step of d, zero rows past the end) that every latent chunk's task
//! reads, so one step of the dot product loads two vectors of rows and
//! broadcasts one weight per latent. The register tile is 6 latents × 2 vectors of rows
//! (12 accumulators) over the whole model dimension: the scores are born in registers,
//! scaled and shifted there, and compared in one vector compare per 8 (AVX2) rows against
//! the rows' current thresholds; only lanes that pass leave the registers (for top-k, after
//! the first 2k latents of a row, a small fraction). Rows are the vector lanes, so the
//! threshold vector is simply the rows' thresholds loaded side by side.
//!
//! Cache use: a block of 4 panels (64 rows × Dm on AVX2; 196 KiB at Dm 768) stays in L2
//! while a task walks its latent chunk; the chunk (512 latents, widened once per task) is
//! re-read from L3 once per row block; the 6 weight rows of a tile sit in L1. Bound: the
//! 2·B·L·Dm multiply-adds (FMA throughput), with memory traffic O(B·Dm·L/512 + L·Dm) and
//! extra memory O(group × Dm) for the packed rows (at most `PACK_BYTES`).
//!
//! Determinism: every score is the same sequential sum over d whatever the task split, and
//! the selection is exact under a total order (see `select`), so results do not depend on
//! the thread count.

use super::select::{TopList, rank};
use crate::cpu::{Isa, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use rayon::prelude::*;

/// Latents per task chunk (widened once per task; re-read from L3 once per row block).
const LATENT_CHUNK: usize = 512;
/// Latents per register tile.
const TILE_LATENTS: usize = 6;
/// Panels (of two vectors of rows) per row block.
const PANELS_PER_BLOCK: usize = 4;
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
    /// Runs the encoder and returns each row's selection.
    pub fn run(&self, isa: Isa, collect: Collect<'_, W::Acc>) -> Selections<W::Acc> {
        let rows = self.rows;
        let chunks = self.latents.div_ceil(LATENT_CHUNK);
        let threads = rayon::current_num_threads();
        let mut out: Selections<W::Acc> = vec![Vec::new(); rows];
        if rows == 0 || self.latents == 0 {
            return out;
        }
        let panel_rows = dispatch(isa, PanelRows::<W::Acc>(std::marker::PhantomData));
        let block_rows = PANELS_PER_BLOCK * panel_rows;
        if chunks >= 2 * threads || rows < 256 {
            // Many latents: each group of rows is packed once, then one parallel fold over
            // latent chunks.
            let fit = PACK_BYTES / (self.dm.max(1) * std::mem::size_of::<W::Acc>());
            let group = fit.clamp(block_rows, 8192) / block_rows * block_rows;
            for (g, out_group) in out.chunks_mut(group).enumerate() {
                let r0 = g * group;
                let r1 = r0 + out_group.len();
                let panels = self.pack(r0..r1, panel_rows);
                let sink = (0..chunks)
                    .into_par_iter()
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
                .next_multiple_of(block_rows);
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

    /// Rows `rows` of x, minus the offset and times the row scale, into panels
    /// [panel][d][row of panel] of `panel_rows` rows each (rows past the end are zero);
    /// parallel over panels.
    fn pack(&self, rows: std::ops::Range<usize>, panel_rows: usize) -> Vec<W::Acc> {
        let dm = self.dm;
        let n = rows.len();
        let mut panels = vec![W::Acc::ZERO; n.div_ceil(panel_rows) * panel_rows * dm];
        panels
            .par_chunks_mut(panel_rows * dm)
            .enumerate()
            .for_each(|(p, panel)| {
                let first = rows.start + p * panel_rows;
                for i in 0..panel_rows.min(rows.end - first) {
                    let row = &self.x[(first + i) * dm..(first + i + 1) * dm];
                    let scale = self.row_scale.map_or(W::Acc::ONE, |s| s[first + i]);
                    for (d, v) in row.iter().enumerate() {
                        let centered = match self.offset {
                            Some(o) => v.to_acc() - o[d],
                            None => v.to_acc(),
                        };
                        panel[d * panel_rows + i] = centered * scale;
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
        let enc = self.enc;
        let dm = enc.dm;
        let lanes = W::Acc::lanes::<S>();
        let panel_rows = 2 * lanes;
        let block_rows = PANELS_PER_BLOCK * panel_rows;
        let l0 = self.chunk * LATENT_CHUNK;
        let l1 = (l0 + LATENT_CHUNK).min(enc.latents);
        let widen = |w: &[W]| w.iter().map(|v| v.to_acc()).collect::<Vec<W::Acc>>();
        let weights = widen(&enc.w[l0 * dm..l1 * dm]);
        let one = W::Acc::ONE;
        let scale: Vec<W::Acc> = enc.scale.map_or(vec![one; l1 - l0], |s| s[l0..l1].to_vec());
        let shift: Vec<W::Acc> = enc
            .shift
            .map_or(vec![W::Acc::ZERO; l1 - l0], |s| s[l0..l1].to_vec());
        let mut thresholds = vec![W::Acc::ZERO; block_rows];
        let mut r = self.rows.start;
        while r < self.rows.end {
            let n_rows = (self.rows.end - r).min(block_rows);
            let n_panels = n_rows.div_ceil(panel_rows);
            let local0 = r - self.rows.start;
            // this block's panels (block_rows is a multiple of panel_rows)
            let panels = &self.panels[local0 * dm..];
            let mut t = 0;
            while t < l1 - l0 {
                let tile = (l1 - l0 - t).min(TILE_LATENTS);
                for p in 0..n_panels {
                    let row0 = p * panel_rows;
                    let valid = (n_rows - row0).min(panel_rows);
                    let ctx = TileCtx {
                        dm,
                        w: weights[t * dm..].as_ptr(),
                        panel: panels[p * panel_rows * dm..].as_ptr(),
                        latent0: (l0 + t) as u32,
                        scale: &scale[t..t + tile],
                        shift: &shift[t..t + tile],
                        valid,
                        row0: local0 + row0,
                    };
                    // SAFETY: `weights` holds `tile` rows of dm from t, the panel 2·lanes·dm
                    // values; the sink has a list per row of the range (row0 + valid <= len).
                    unsafe {
                        match tile {
                            6 => tile_run::<S, W::Acc, 6>(&ctx, self.sink, &mut thresholds),
                            5 => tile_run::<S, W::Acc, 5>(&ctx, self.sink, &mut thresholds),
                            4 => tile_run::<S, W::Acc, 4>(&ctx, self.sink, &mut thresholds),
                            3 => tile_run::<S, W::Acc, 3>(&ctx, self.sink, &mut thresholds),
                            2 => tile_run::<S, W::Acc, 2>(&ctx, self.sink, &mut thresholds),
                            _ => tile_run::<S, W::Acc, 1>(&ctx, self.sink, &mut thresholds),
                        }
                    }
                }
                t += tile;
            }
            r += n_rows;
        }
    }
}

struct TileCtx<'a, A> {
    dm: usize,
    w: *const A,
    panel: *const A,
    latent0: u32,
    scale: &'a [A],
    shift: &'a [A],
    /// Real rows in this panel (the rest are padding).
    valid: usize,
    /// The panel's first row, as an index into the sink's rows.
    row0: usize,
}

/// One register tile: MR latents × one panel, over the whole model dimension, then the
/// fused scale/shift, compare and collection.
#[inline(always)]
unsafe fn tile_run<S: Simd, A: Accum, const MR: usize>(
    ctx: &TileCtx<'_, A>,
    sink: &mut Sink<'_, A>,
    thresholds: &mut [A],
) {
    let lanes = A::lanes::<S>();
    let dm = ctx.dm;
    unsafe {
        let mut acc = [[A::vsplat::<S>(A::ZERO); 2]; MR];
        for d in 0..dm {
            let b0 = A::vload::<S>(ctx.panel.add(d * 2 * lanes));
            let b1 = A::vload::<S>(ctx.panel.add(d * 2 * lanes + lanes));
            for (r, row) in acc.iter_mut().enumerate() {
                let a = A::vsplat::<S>(*ctx.w.add(r * dm + d));
                row[0] = A::vfma::<S>(a, b0, row[0]);
                row[1] = A::vfma::<S>(a, b1, row[1]);
            }
        }
        let valid_bits = |v: usize| -> u32 {
            let first = v * lanes;
            let n = ctx.valid.saturating_sub(first).min(lanes);
            if n >= 32 { u32::MAX } else { (1u32 << n) - 1 }
        };
        let valid = [valid_bits(0), valid_bits(1)];
        let mut buf = [A::ZERO; 64];
        let top_k = match sink.collect {
            Collect::TopK { relu, .. } => {
                // the rows' thresholds, side by side as the lanes
                let lists = &sink.lists[ctx.row0..ctx.row0 + ctx.valid];
                for (t, list) in thresholds.iter_mut().zip(lists) {
                    *t = list.threshold();
                }
                Some(relu)
            }
            Collect::Above { .. } => None,
        };
        for (r, row) in acc.iter().enumerate() {
            let latent = ctx.latent0 + r as u32;
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
                    match top_k {
                        Some(relu) => {
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
                        None => sink.above[ctx.row0 + i].push((value, latent)),
                    }
                }
            }
        }
    }
}
