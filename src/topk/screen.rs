//! bf16 screening for the encoder's top-k (x86-64, f32 accumulation), with results bit for
//! bit those of the AVX-512 path. Two back-ends do the bf16 products, over the same packed
//! tiles (`cpu::bf16tiles`) and with the same bound, candidates and rescoring: AMX tile
//! products (`cpu::amx`, preferred where present) and AVX512-BF16 `vdpbf16ps` register tiles
//! (`cpu::dpbf16`, where AVX512-BF16 is present but AMX is not, e.g. AMD Zen 4/5).
//!
//! The plain encoder is bound by its 2·B·L·Dm multiply-adds at AVX-512 FMA speed. AMX does
//! the same products in bf16 with f32 accumulation several times faster, `vdpbf16ps` twice
//! as many per instruction as an FMA, but bf16 scores are not the f32 scores and the
//! selection is exact. So the bf16 scores only screen: each
//! approximate score ṽ carries a rigorous bound |ṽ − v| ≤ e (below); each row keeps as
//! candidates the latents whose upper bound ṽ + e reaches τ, the k-th largest lower bound
//! ṽ − e among its candidates (at least k latents are known to score ≥ τ, so nothing whose
//! upper bound is below τ can be in the top k). At the end each row's candidates (~2k per
//! row on random data) are scored again with the plain path's arithmetic — the same
//! sequential f32 FMA chain over d, then fma(s, scale, shift) — and selected under the same
//! total order, so values, indices and ties equal the plain path's.
//!
//! The bound. With x̃, w̃ the bf16 values the tiles use (a bf16 denormal counts as zero, as
//! AMX and `vdpbf16ps` both treat denormal inputs), s − Σ x̃_d w̃_d = Σ (x_d − x̃_d) w_d +
//! Σ x̃_d (w_d − w̃_d) exactly, so by Cauchy–Schwarz it is at most ‖x − x̃‖‖w‖ +
//! ‖x̃‖‖w − w̃‖, with ‖x̃‖ ≤ ‖x‖ + ‖x − x̃‖; the residual norms come out of the packing
//! passes (for random data ~0.15% of the norms, where the worst case 2^-8 per element would
//! give ~2.6× more). Products of bf16 are exact in f32; an f32 sum of n = Dm terms, in any
//! order, errs by at most γ_n·Σ|terms| (γ_n ≈ n·2^-24) — once in the bf16 sum, once in the
//! exact chain: 2.1·γ_n‖x‖‖w‖ for both. Norms are taken plus δ = 2^-50, whose products cover
//! the absolute terms (flushed denormal products and partial sums, ≤ 2^-126 each) for
//! Dm ≤ 2^16. Through v = fma(s, scale, shift), rounded once on each side:
//! e = |scale|·(that)·(1 + 2^-19) + 2^-21·|ṽ| + 2^-100 (the last term covers denormal
//! roundings; it is a normal f32, as a denormal operand would make every FMA of the epilogue
//! take a microcode assist: 3× slower in all), with a further 2^-10 of margin on the latent
//! constants.
//! Both back-ends meet these assumptions: their products of two bf16 are exact in f32 (8-bit
//! significands), short of underflow, which they flush (< 2^-126 each, an absolute term);
//! their sums round to nearest even (`vdpbf16ps` whatever MXCSR says; AMX always), at most
//! one rounding per term added, and flush denormal results (absolute terms again). AMX sums
//! in its own order; `vdpbf16ps` adds each lane's depth pairs in order, one pair per
//! instruction (two roundings, or one if the pair is fused: fewer is no worse). The bound
//! holds for any order of the sum, so neither order matters.
//! Inputs whose norms are not finite or too large for that argument go the plain way: such
//! rows one by one, such latents (or scales, shifts) the whole call.

use super::encode::{Encoder, Selections};
use super::select::TopList;
use crate::cpu::Isa;
use crate::cpu::amx::{self, Tiles};
use crate::cpu::bf16tiles::{self, TILE_DEPTH, TILE_ELEMS, TILE_ROWS, lanes_mask};
use crate::cpu::dpbf16;
use crate::element::{Accum, Element};
use rayon::prelude::*;
use std::any::TypeId;
use std::arch::x86_64::*;

/// Latents packed to bf16 tiles at a time (3 MiB at Dm 768): each row block streams them.
const SUPER_LATENTS: usize = 2048;
/// Rows per task (their packed tiles, 768 KiB at Dm 768, stay in L2 while latents pass).
const MAX_ROW_BLOCK: usize = 512;
/// Below these sizes the plain path is as fast.
const MIN_ROWS: usize = 64;
const MIN_LATENTS: usize = 1024;
/// δ in the bound's absolute terms is sized for Dm up to this.
const MAX_DM: usize = 1 << 16;
/// A row with more candidates than this (after pruning) is scored the plain way instead
/// (e.g. a row with fewer than k positive pre-activations under ReLU, where every latent
/// stays a candidate).
const MIN_CANDIDATE_LIMIT: usize = 4096;

const DELTA: f64 = 1.0 / (1u64 << 50) as f64;
/// Rows with ‖x‖ at or above this go the plain way; latents need ‖w‖·|scale| below
/// `MAX_W_SCALED`, shifts below `MAX_SHIFT` (so no exact score can overflow).
const MAX_X_NORM: f64 = (1u64 << 60) as f64;
const MAX_W_SCALED: f64 = (1u64 << 40) as f64;
const MAX_SHIFT: f64 = 1e30;

/// The bf16 product back-end of one screening.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Product {
    /// AMX tile products (`cpu::amx`).
    Amx,
    /// AVX512-BF16 `vdpbf16ps` register tiles (`cpu::dpbf16`).
    Dpbf16,
}

impl Product {
    /// The back-end to use now: AMX where available, else AVX512-BF16 where available (and
    /// neither switched off).
    fn chosen() -> Option<Product> {
        if amx::available() {
            Some(Product::Amx)
        } else if dpbf16::available() {
            Some(Product::Dpbf16)
        } else {
            None
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    lo: f32,
    up: f32,
    latent: u32,
}

/// A row's screening state.
struct RowState {
    /// Upper bounds must not be below this (NaN-safe compare) to make a candidate.
    admit: f32,
    candidates: Vec<Candidate>,
    /// Prune when `candidates` reaches this.
    cap: usize,
    /// Scored the plain way (non-finite or huge norm, or too many candidates).
    plain: bool,
}

/// `v` itself when W is f32.
fn as_f32<W: Element>(v: &[W]) -> Option<&[f32]> {
    (TypeId::of::<W>() == TypeId::of::<f32>()).then(|| bytemuck::cast_slice(v))
}

/// ‖v‖ + δ from Σ v² (with slack for the square root's rounding).
fn norm_plus_delta(squares: f64) -> f64 {
    squares.sqrt() * (1.0 + 2f64.powi(-40)) + DELTA
}

/// f32 up to which `x` (≥ 0) is rounded (the next f32 at or above it).
fn round_up(x: f64) -> f32 {
    let f = x as f32;
    if (f as f64) < x { f.next_up() } else { f }
}

/// The top-k selections of `enc`'s rows by bf16 screening and exact rescoring, or `None`
/// where it does not apply (neither AMX nor AVX512-BF16, not f32 accumulation, small sizes,
/// unusual inputs); the caller then runs the plain path. Identical to the plain path's
/// result otherwise.
pub(super) fn top_k<X, W>(
    enc: &Encoder<'_, X, W>,
    isa: Isa,
    k: usize,
    relu: bool,
) -> Option<Selections<W::Acc>>
where
    X: Element<Acc = W::Acc>,
    W: Element,
{
    let product = Product::chosen()?;
    screened(enc, isa, k, relu, product).map(|(out, _)| out)
}

/// [`top_k`] with the back-end `product`, with the number of rows that went the plain way.
/// `None` also where `product`'s CPU support is missing (the switches are the caller's).
fn screened<X, W>(
    enc: &Encoder<'_, X, W>,
    isa: Isa,
    k: usize,
    relu: bool,
    product: Product,
) -> Option<(Selections<W::Acc>, usize)>
where
    X: Element<Acc = W::Acc>,
    W: Element,
{
    let (rows, dm, latents) = (enc.rows, enc.dm, enc.latents);
    if isa != Isa::Avx512
        || TypeId::of::<W::Acc>() != TypeId::of::<f32>()
        || rows < MIN_ROWS
        || latents < MIN_LATENTS
        || dm == 0
        || dm > MAX_DM
        || k == 0
        || k > latents / 8
        || latents > u32::MAX as usize
        || !match product {
            Product::Amx => amx::permitted(),
            Product::Dpbf16 => dpbf16::supported(),
        }
    {
        return None;
    }
    // W::Acc is f32 here, so these conversions are exact
    let f = |a: W::Acc| a.to_f64() as f32;
    let scale: Vec<f32> = (0..latents)
        .map(|l| enc.scale.map_or(1.0, |s| f(s[l])))
        .collect();
    let shift: Vec<f32> = (0..latents)
        .map(|l| enc.shift.map_or(0.0, |s| f(s[l])))
        .collect();
    let xc = centered_rows(enc, f);
    let steps = dm.div_ceil(TILE_DEPTH);
    let row_pairs = rows.div_ceil(2 * TILE_ROWS);
    let pair_elems = 2 * steps * TILE_ELEMS;
    let mut a = vec![0u16; row_pairs * pair_elems];
    let mut row_norms = vec![[0f64; 2]; rows];
    a.par_chunks_mut(pair_elems)
        .zip(row_norms.par_chunks_mut(2 * TILE_ROWS))
        .enumerate()
        .for_each(|(p, (tiles, norms))| {
            let r0 = p * 2 * TILE_ROWS;
            let n = norms.len();
            // SAFETY: either back-end's support (checked on entry) implies AVX-512F/BW/BF16;
            // 32 rows' tiles, x rows r0..r0+n.
            unsafe { bf16tiles::pack_rows(&xc[r0 * dm..(r0 + n) * dm], n, dm, tiles, norms) };
        });
    // per row: ‖x‖ + δ and ‖x − x̃‖ + δ, rounded up (NaN where not finite)
    let xnorm: Vec<[f32; 2]> = row_norms.iter().map(|&n| row_constants(n)).collect();
    let limit = (latents / 8).max(MIN_CANDIDATE_LIMIT).max(16 * k);
    let mut states: Vec<RowState> = xnorm
        .iter()
        .map(|&[norm, residual]| RowState {
            admit: f32::NEG_INFINITY,
            candidates: Vec::new(),
            cap: (4 * k).max(64),
            plain: norm.is_nan() || residual.is_nan() || norm as f64 >= MAX_X_NORM,
        })
        .collect();
    let threads = rayon::current_num_threads();
    let block = (rows / (2 * threads))
        .next_multiple_of(2 * TILE_ROWS)
        .clamp(2 * TILE_ROWS, MAX_ROW_BLOCK);
    let bound = BoundConstants::new(dm);
    let mut b = Vec::new();
    let mut wide: Vec<f32> = Vec::new();
    let mut col_norms = Vec::new();
    let (mut wp, mut wq) = (Vec::new(), Vec::new());
    for l0 in (0..latents).step_by(SUPER_LATENTS) {
        let l1 = (l0 + SUPER_LATENTS).min(latents);
        let w_rows: &[f32] = match as_f32(&enc.w[l0 * dm..l1 * dm]) {
            Some(rows) => rows,
            None => {
                wide.clear();
                wide.par_extend(enc.w[l0 * dm..l1 * dm].par_iter().map(|v| f(v.to_acc())));
                &wide
            }
        };
        let col_pairs = (l1 - l0).div_ceil(2 * TILE_ROWS);
        b.resize(col_pairs * pair_elems, 0u16);
        col_norms.resize(l1 - l0, [0f64; 2]);
        b.par_chunks_mut(pair_elems)
            .zip(col_norms.par_chunks_mut(2 * TILE_ROWS))
            .enumerate()
            .for_each(|(p, (tiles, norms))| {
                let c0 = p * 2 * TILE_ROWS;
                let n = norms.len();
                // SAFETY: as for the rows
                unsafe {
                    bf16tiles::pack_columns(&w_rows[c0 * dm..(c0 + n) * dm], n, dm, tiles, norms)
                };
            });
        wp.clear();
        wq.clear();
        for (l, norms) in (l0..l1).zip(&col_norms) {
            let [p, q] = bound.latent(*norms, scale[l], shift[l])?;
            wp.push(p);
            wq.push(q);
        }
        let chunk = Chunk {
            b: &b,
            l0,
            n: l1 - l0,
            wp: &wp,
            wq: &wq,
            scale: &scale[l0..l1],
            shift: &shift[l0..l1],
        };
        states
            .par_chunks_mut(block)
            .enumerate()
            .for_each(|(i, states)| {
                let r0 = i * block;
                let task = Block {
                    a: &a[r0 / (2 * TILE_ROWS) * pair_elems..],
                    steps,
                    xnorm: &xnorm[r0..r0 + states.len()],
                    k,
                    relu,
                    limit,
                };
                match product {
                    Product::Amx => {
                        let tiles = Tiles::configure().expect("AMX is permitted (checked above)");
                        // SAFETY: AMX (hence AVX-512F) available; the tiles and slices as
                        // built above.
                        unsafe { task.screen(&tiles, &chunk, states) };
                    }
                    // SAFETY: AVX-512F/BF16 available (checked on entry); the slices as
                    // built above.
                    Product::Dpbf16 => unsafe { task.screen_dpbf16(&chunk, states) },
                }
            });
    }
    let mut out: Selections<W::Acc> = vec![Vec::new(); rows];
    let rescore = Rescore {
        w: enc.w,
        widened: as_f32(enc.w),
        dm,
        scale: &scale,
        shift: &shift,
        relu,
    };
    out.par_iter_mut()
        .zip(states.par_iter_mut())
        .enumerate()
        .for_each(|(r, (out, state))| {
            if state.plain {
                return;
            }
            prune(state, k, relu, usize::MAX);
            let mut picked: Vec<u32> = state.candidates.iter().map(|c| c.latent).collect();
            picked.sort_unstable();
            *out = rescore.top_k(&xc[r * dm..(r + 1) * dm], &picked, k)
        });
    let plain: Vec<usize> = (0..rows).filter(|&r| states[r].plain).collect();
    if !plain.is_empty() {
        let x: Vec<X> = plain
            .iter()
            .flat_map(|&r| enc.x[r * dm..(r + 1) * dm].iter().copied())
            .collect();
        let row_scale: Option<Vec<W::Acc>> =
            enc.row_scale.map(|s| plain.iter().map(|&r| s[r]).collect());
        let sub = Encoder {
            x: &x,
            rows: plain.len(),
            row_scale: row_scale.as_deref(),
            ..*enc
        };
        let again = sub.run_plain(isa, super::encode::Collect::TopK { k, relu });
        for (&r, sel) in plain.iter().zip(again) {
            out[r] = sel;
        }
    }
    Some((out, plain.len()))
}

/// A row's ‖x‖ + δ and ‖x − x̃‖ + δ, rounded up (NaN where not finite), from the packers'
/// squares.
fn row_constants(squares: [f64; 2]) -> [f32; 2] {
    squares.map(|sq| {
        let n = norm_plus_delta(sq);
        if n.is_finite() { round_up(n) } else { f32::NAN }
    })
}

/// The screened value ṽ = fma(s̃, scale, shift) of 16 bf16 products s̃ and its bound e
/// (|ṽ − v| ≤ e), from a row's [`row_constants`] `xn`, `xd` and the latents' scale, shift,
/// P and Q (`BoundConstants::latent`).
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn value_and_error(
    s: __m512,
    [scale, shift, wp, wq]: [__m512; 4],
    xn: __m512,
    xd: __m512,
) -> (__m512, __m512) {
    // SAFETY: register-only AVX-512F arithmetic (the contract)
    unsafe {
        let tiny = _mm512_set1_ps(2f32.powi(-100));
        let rel = _mm512_set1_ps(2f32.powi(-21));
        let v = _mm512_fmadd_ps(s, scale, shift);
        let e = _mm512_fmadd_ps(xd, wp, _mm512_fmadd_ps(xn, wq, tiny));
        (v, _mm512_fmadd_ps(_mm512_abs_ps(v), rel, e))
    }
}

/// The bound's constants for one Dm.
struct BoundConstants {
    /// 2.1·γ_n: the two f32 summations' error per ‖x‖‖w‖.
    sums: f64,
    /// Slack on every latent constant: the rounding of the epilogue's FMAs and of v
    /// ((1 + 2^-19)), and a margin ((1 + 2^-10)).
    slack: f64,
}

impl BoundConstants {
    fn new(dm: usize) -> Self {
        let gamma = dm as f64 * 2f64.powi(-24) / (1.0 - dm as f64 * 2f64.powi(-24));
        BoundConstants {
            sums: 2.1 * gamma,
            slack: (1.0 + 2f64.powi(-19)) * (1.0 + 2f64.powi(-10)),
        }
    }

    /// A latent's [P, Q] with e = ‖x − x̃‖'·P + ‖x‖'·Q (primes: + δ, as the rows' bounds):
    /// P = |scale|·(‖w‖' + ‖w − w̃‖'), Q = |scale|·(‖w − w̃‖' + 2.1γ_n‖w‖'), from
    /// |s̃ − s| ≤ ‖x − x̃‖‖w‖ + ‖x̃‖‖w − w̃‖ + 2.1γ_n‖x‖‖w‖ and ‖x̃‖ ≤ ‖x‖ + ‖x − x̃‖. `None`
    /// if the latent is unusable for the argument (not finite, or too large).
    fn latent(&self, squares: [f64; 2], scale: f32, shift: f32) -> Option<[f32; 2]> {
        let (w, residual) = (norm_plus_delta(squares[0]), norm_plus_delta(squares[1]));
        let sc = (scale as f64).abs();
        let usable =
            w * sc < MAX_W_SCALED && residual.is_finite() && (shift as f64).abs() < MAX_SHIFT;
        usable.then(|| {
            [
                round_up(sc * (w + residual) * self.slack),
                round_up(sc * (residual + self.sums * w) * self.slack),
            ]
        })
    }
}

/// The rows as the plain path computes them, (x − offset)·row_scale, in f32.
fn centered_rows<X, W>(enc: &Encoder<'_, X, W>, f: impl Fn(W::Acc) -> f32 + Sync) -> Vec<f32>
where
    X: Element<Acc = W::Acc>,
    W: Element,
{
    let dm = enc.dm;
    let mut xc = vec![0f32; enc.rows * dm];
    xc.par_chunks_mut(dm).enumerate().for_each(|(r, row)| {
        let scale = enc.row_scale.map_or(W::Acc::ONE, |s| s[r]);
        for (d, out) in row.iter_mut().enumerate() {
            *out = f(enc.centered(enc.x[r * dm + d], d, scale));
        }
    });
    xc
}

/// One super-chunk of latents, packed.
struct Chunk<'a> {
    b: &'a [u16],
    l0: usize,
    n: usize,
    /// The latents' bound constants P and Q (`BoundConstants::latent`).
    wp: &'a [f32],
    wq: &'a [f32],
    scale: &'a [f32],
    shift: &'a [f32],
}

/// One task: a block of rows (their packed tiles from `a`'s start) against a chunk.
struct Block<'a> {
    a: &'a [u16],
    steps: usize,
    /// Per row: ‖x‖ + δ and ‖x − x̃‖ + δ, rounded up.
    xnorm: &'a [[f32; 2]],
    k: usize,
    relu: bool,
    limit: usize,
}

#[repr(C, align(64))]
struct TileBuf([f32; 1024]);

/// The constants of one pair of latent tiles (32 latents) of a chunk.
struct LatentPair {
    cp: usize,
    latent0: u32,
    /// Valid lanes of each half of 16.
    valid: [u16; 2],
    /// scale, shift, P, Q per half (zero past the chunk's end).
    vectors: [[__m512; 4]; 2],
}

impl LatentPair {
    #[inline(always)]
    fn new(chunk: &Chunk<'_>, cp: usize) -> Self {
        let c0 = cp * 2 * TILE_ROWS;
        let mut pair = LatentPair {
            cp,
            latent0: (chunk.l0 + c0) as u32,
            valid: [0; 2],
            // SAFETY: AVX-512F (callers run under it)
            vectors: [[unsafe { _mm512_setzero_ps() }; 4]; 2],
        };
        for h in 0..2 {
            let first = c0 + h * TILE_ROWS;
            let n = chunk.n.saturating_sub(first).min(TILE_ROWS);
            let mask = lanes_mask(n);
            pair.valid[h] = mask;
            if n > 0 {
                // SAFETY: first + n <= chunk.n, within the constants' slices
                unsafe {
                    pair.vectors[h] = [
                        _mm512_maskz_loadu_ps(mask, chunk.scale.as_ptr().add(first)),
                        _mm512_maskz_loadu_ps(mask, chunk.shift.as_ptr().add(first)),
                        _mm512_maskz_loadu_ps(mask, chunk.wp.as_ptr().add(first)),
                        _mm512_maskz_loadu_ps(mask, chunk.wq.as_ptr().add(first)),
                    ];
                }
            }
        }
        pair
    }
}

impl Block<'_> {
    /// Screens the chunk's latents for the block's rows, 32 × 32 scores at a time.
    ///
    /// Software-pipelined: the next block's tile products are started before this block's
    /// scores are examined, so the AVX-512 epilogue runs while the AMX unit works (examined
    /// after the products, the epilogue's loads waited for the tile stores, and the products
    /// for the epilogue: ~3× slower).
    ///
    /// # Safety
    /// AMX is configured (`tiles`); `a` holds the block's row pairs and `chunk.b` the chunk's
    /// column pairs, each `2 · steps` tiles; `states` has one entry per row of the block.
    #[target_feature(enable = "avx512f")]
    unsafe fn screen(&self, tiles: &Tiles, chunk: &Chunk<'_>, states: &mut [RowState]) {
        let pair = 2 * self.steps * TILE_ELEMS;
        let tile = self.steps * TILE_ELEMS;
        let mut bufs = [TileBuf([0.0; 1024]), TileBuf([0.0; 1024])];
        let row_pairs = states.len().div_ceil(2 * TILE_ROWS);
        let blocks = chunk.n.div_ceil(2 * TILE_ROWS) * row_pairs;
        let start = |j: usize| {
            let (cp, rp) = (j / row_pairs, j % row_pairs);
            let a = self.a[rp * pair..].as_ptr();
            let b = chunk.b[cp * pair..].as_ptr();
            // SAFETY: the pairs hold 2·steps tiles each (see the contract)
            unsafe { tiles.start_32x32([a, a.add(tile)], [b, b.add(tile)], self.steps) };
        };
        start(0);
        let mut consts = LatentPair::new(chunk, 0);
        for j in 0..blocks {
            let buf = &mut bufs[j % 2];
            // SAFETY: 4 KiB buffer; block j was started
            unsafe { tiles.store_32x32(buf.0.as_mut_ptr()) };
            if j + 1 < blocks {
                start(j + 1);
            }
            let (cp, rp) = (j / row_pairs, j % row_pairs);
            if consts.cp != cp {
                consts = LatentPair::new(chunk, cp);
            }
            // SAFETY: AVX-512F (this function's feature)
            unsafe { self.examine(buf, &consts, rp, states) };
        }
    }

    /// [`Block::screen`] with `vdpbf16ps` register tiles instead of AMX: each 32 × 32 block's
    /// scores are computed into a buffer, then examined.
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16 are available; `a` holds the block's row pairs and `chunk.b`
    /// the chunk's column pairs, each `2 · steps` tiles; `states` has one entry per row of
    /// the block.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn screen_dpbf16(&self, chunk: &Chunk<'_>, states: &mut [RowState]) {
        let pair = 2 * self.steps * TILE_ELEMS;
        let tile = self.steps * TILE_ELEMS;
        let mut buf = TileBuf([0.0; 1024]);
        let row_pairs = states.len().div_ceil(2 * TILE_ROWS);
        let col_pairs = chunk.n.div_ceil(2 * TILE_ROWS);
        for cp in 0..col_pairs {
            let consts = LatentPair::new(chunk, cp);
            let b = chunk.b[cp * pair..].as_ptr();
            for rp in 0..row_pairs {
                let a = self.a[rp * pair..].as_ptr();
                // SAFETY: the pairs hold 2·steps tiles each (see the contract); 4 KiB buffer
                unsafe {
                    dpbf16::product_32x32(
                        [a, a.add(tile)],
                        [b, b.add(tile)],
                        self.steps,
                        buf.0.as_mut_ptr(),
                    );
                    self.examine(&buf, &consts, rp, states);
                }
            }
        }
    }

    /// The epilogue of one 32 × 32 block: bounds, admission compare, candidates.
    ///
    /// # Safety
    /// The CPU has AVX-512F (`screen` and `screen_dpbf16` call it; either back-end's support
    /// implies it).
    #[target_feature(enable = "avx512f")]
    unsafe fn examine(&self, c: &TileBuf, consts: &LatentPair, rp: usize, states: &mut [RowState]) {
        let row0 = rp * 2 * TILE_ROWS;
        for i in 0..(states.len() - row0).min(2 * TILE_ROWS) {
            let row = row0 + i;
            let state = &mut states[row];
            if state.plain {
                continue;
            }
            let [norm, residual] = self.xnorm[row];
            let (xn, xd) = (_mm512_set1_ps(norm), _mm512_set1_ps(residual));
            for h in 0..2 {
                let valid = consts.valid[h];
                if valid == 0 {
                    continue;
                }
                // C tile (i / 16, h): rows 16·(i/16).., latents 16·h..
                let at = ((i / TILE_ROWS) * 2 + h) * 256 + (i % TILE_ROWS) * 16;
                // SAFETY: `at + 16 <= 1024`
                let s = unsafe { _mm512_loadu_ps(c.0.as_ptr().add(at)) };
                // SAFETY: AVX-512F (this function's feature)
                let (v, e) = unsafe { value_and_error(s, consts.vectors[h], xn, xd) };
                let up = _mm512_add_ps(v, e);
                let admit = _mm512_set1_ps(state.admit);
                let mask = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(up, admit) & valid;
                if mask != 0 {
                    let lo = _mm512_sub_ps(v, e);
                    let (mut ups, mut los) = ([0f32; 16], [0f32; 16]);
                    // SAFETY: 16 floats each
                    unsafe {
                        _mm512_storeu_ps(ups.as_mut_ptr(), up);
                        _mm512_storeu_ps(los.as_mut_ptr(), lo);
                    }
                    let latent0 = consts.latent0 + (h * TILE_ROWS) as u32;
                    self.admit(state, mask, [&ups, &los], latent0);
                }
            }
        }
    }

    /// Adds the lanes of `mask` as candidates, pruning when the list is full.
    #[inline(never)]
    fn admit(&self, state: &mut RowState, mask: u16, [ups, los]: [&[f32; 16]; 2], latent0: u32) {
        let mut bits = mask;
        while bits != 0 && !state.plain {
            let lane = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            state.candidates.push(Candidate {
                lo: los[lane],
                up: ups[lane],
                latent: latent0 + lane as u32,
            });
            if state.candidates.len() >= state.cap {
                prune(state, self.k, self.relu, self.limit);
            }
        }
    }
}

/// τ = the k-th largest lower bound (of the ReLU'd value, where `relu`) among the candidates;
/// drops those whose upper bound is below it and sets the admission bound. A row left with
/// more than `limit` candidates goes the plain way. (A fresh `lows` per prune measured ~6%
/// faster overall than threading one scratch vector down from the task.)
fn prune(state: &mut RowState, k: usize, relu: bool, limit: usize) {
    let cands = &mut state.candidates;
    if cands.len() >= k {
        let mut lows: Vec<f32> = Vec::with_capacity(cands.len());
        lows.extend(cands.iter().map(|c| {
            // NaN bounds nothing; ReLU'd values are ≥ 0 whatever the bound
            let lo = if c.lo.is_nan() {
                f32::NEG_INFINITY
            } else {
                c.lo
            };
            if relu { lo.max(0.0) } else { lo }
        }));
        let (_, &mut tau, _) = lows.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        // under ReLU with τ = 0 every latent may still tie at zero: keep all
        let keep_all = relu && tau <= 0.0;
        if !keep_all {
            // a NaN upper bound stays
            cands.retain(|c| c.up.is_nan() || c.up >= tau);
        }
        state.admit = if keep_all { f32::NEG_INFINITY } else { tau };
    }
    state.cap = (2 * cands.len()).max(4 * k).max(64);
    if cands.len() > limit {
        state.plain = true;
        state.candidates = Vec::new();
    }
}

/// Exact rescoring of candidates with the plain path's arithmetic.
struct Rescore<'a, W: Element> {
    w: &'a [W],
    /// `w` itself when W is f32.
    widened: Option<&'a [f32]>,
    dm: usize,
    scale: &'a [f32],
    shift: &'a [f32],
    relu: bool,
}

impl<W: Element> Rescore<'_, W> {
    /// The best k of `latents` (sorted) for the row `x`, best first.
    fn top_k(&self, x: &[f32], latents: &[u32], k: usize) -> Vec<(W::Acc, u32)> {
        let dm = self.dm;
        let mut list = TopList::<W::Acc>::new(k);
        let mut scratch = Vec::new();
        for group in latents.chunks(16) {
            let rows: [*const f32; 16] = match self.widened {
                Some(w) => std::array::from_fn(|i| {
                    let l = group[i.min(group.len() - 1)] as usize;
                    w[l * dm..].as_ptr()
                }),
                None => {
                    scratch.clear();
                    for &l in group {
                        let row = &self.w[l as usize * dm..(l as usize + 1) * dm];
                        scratch.extend(row.iter().map(|v| v.to_acc().to_f64() as f32));
                    }
                    std::array::from_fn(|i| scratch[i.min(group.len() - 1) * dm..].as_ptr())
                }
            };
            // SAFETY: AVX-512F is available (either back-end implies it); each pointer has dm
            // floats.
            let sums = unsafe { sequential_dots(x, &rows, dm) };
            for (&l, &s) in group.iter().zip(&sums) {
                let l = l as usize;
                let v = s.mul_add(self.scale[l], self.shift[l]);
                let v = if self.relu && v <= 0.0 { 0.0 } else { v };
                list.push(W::Acc::from_f64(v as f64), l as u32);
            }
        }
        list.into_sorted()
    }
}

/// Σ_d rows[i][d]·x[d] for 16 rows as the plain path sums: one FMA at a time in d order from
/// +0 (lane i is row i; rows' blocks of 16 transposed in registers).
///
/// # Safety
/// AVX-512F; each `rows[i]` is valid for `dm` floats, `x.len() >= dm`.
#[target_feature(enable = "avx512f")]
unsafe fn sequential_dots(x: &[f32], rows: &[*const f32; 16], dm: usize) -> [f32; 16] {
    let mut acc = _mm512_setzero_ps();
    let mut d0 = 0;
    while d0 < dm {
        let rem = (dm - d0).min(16);
        let mask = lanes_mask(rem);
        // SAFETY: the first `rem` floats at d0 of each row (masked load)
        let mut r: [__m512; 16] =
            std::array::from_fn(|i| unsafe { _mm512_maskz_loadu_ps(mask, rows[i].add(d0)) });
        // SAFETY: AVX-512F
        unsafe { bf16tiles::transpose16(&mut r) };
        if rem == 16 {
            for (j, v) in r.iter().enumerate() {
                acc = _mm512_fmadd_ps(*v, _mm512_set1_ps(x[d0 + j]), acc);
            }
        } else {
            for (j, v) in r.iter().enumerate().take(rem) {
                acc = _mm512_fmadd_ps(*v, _mm512_set1_ps(x[d0 + j]), acc);
            }
        }
        d0 += 16;
    }
    let mut out = [0f32; 16];
    // SAFETY: 16 floats
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
    out
}

#[cfg(test)]
mod tests {
    use super::super::encode::Collect;
    use super::*;
    use half::bf16;

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }

    /// The screened result equals the plain path's, bit for bit (values and indices).
    /// Returns how many rows went the plain way.
    fn assert_same<X, W>(
        enc: &Encoder<'_, X, W>,
        k: usize,
        relu: bool,
        product: Product,
        what: &str,
    ) -> usize
    where
        X: Element<Acc = W::Acc>,
        W: Element,
    {
        let (screened, plain_rows) =
            screened(enc, Isa::Avx512, k, relu, product).expect("screening applies");
        let plain = enc.run_plain(Isa::Avx512, Collect::TopK { k, relu });
        assert_eq!(screened.len(), plain.len());
        for (r, (a, b)) in screened.iter().zip(&plain).enumerate() {
            let bits = |v: &[(W::Acc, u32)]| -> Vec<(u64, u32)> {
                v.iter().map(|&(x, i)| (x.to_f64().to_bits(), i)).collect()
            };
            assert_eq!(bits(a), bits(b), "{what}: row {r}");
        }
        plain_rows
    }

    /// An encoder of rows `x [rows, dm]` against `w`, without offset, scales or shift.
    fn bare<'a, E: Element>(x: &'a [E], w: &'a [E], rows: usize, dm: usize) -> Encoder<'a, E, E> {
        Encoder {
            x,
            rows,
            dm,
            offset: None,
            row_scale: None,
            w,
            latents: w.len() / dm,
            scale: None,
            shift: None,
        }
    }

    /// The back-ends this CPU can run, whatever the switches say (each test runs them all).
    fn products() -> Vec<Product> {
        let mut out = Vec::new();
        if Isa::Avx512.is_supported() {
            if amx::permitted() {
                out.push(Product::Amx);
            }
            if dpbf16::supported() {
                out.push(Product::Dpbf16);
            }
        }
        if out.is_empty() {
            eprintln!("neither AMX nor AVX512-BF16 here: the screened encoder is not run");
        }
        out
    }

    #[test]
    fn screened_top_k_is_the_plain_top_k() {
        for product in products() {
            // sizes off every tile: rows 200 (not /32), Dm 100 (not /32), L 3001 (not /16)
            let (rows, dm, latents) = (200, 100, 3001);
            let mut x = data(rows * dm, 1, 2.0);
            let mut w = data(latents * dm, 2, 0.3);
            // an exact tie: latent 2900 repeats latent 7
            let copy = w[7 * dm..8 * dm].to_vec();
            w[2900 * dm..2901 * dm].copy_from_slice(&copy);
            let b_enc = data(latents, 3, 0.2);
            let b_dec = data(dm, 4, 0.5);
            // rows the plain way: all-negative pre-activations under ReLU, a NaN, a huge norm
            for v in &mut x[3 * dm..4 * dm] {
                *v = 0.0;
            }
            x[10 * dm + 5] = f32::NAN;
            x[11 * dm] = 1e30;
            let mut neg = b_enc.clone();
            neg[..].iter_mut().for_each(|v| *v = -v.abs() - 1.0);
            for k in [1, 7, 32, 300] {
                let enc = Encoder {
                    offset: Some(&b_dec),
                    shift: Some(&b_enc),
                    ..bare(&x, &w, rows, dm)
                };
                // only the NaN row and the huge one go the plain way
                assert_eq!(
                    assert_same(&enc, k, true, product, &format!("sae k={k}")),
                    2
                );
                assert_eq!(
                    assert_same(&enc, k, false, product, &format!("no relu k={k}")),
                    2
                );
                // every row below zero but the zero row's shifts: ReLU zeros tie everywhere
                let all_negative = Encoder {
                    shift: Some(&neg),
                    ..enc
                };
                // (the zero row keeps every latent as a candidate: 3001 are under the limit)
                assert_eq!(
                    assert_same(&all_negative, k, true, product, &format!("negative k={k}")),
                    2
                );
            }
            // scale and shift per latent, a row scale (codebook.nearest's l2 and cosine forms)
            let scale: Vec<f32> = (0..latents).map(|l| 0.5 + (l % 7) as f32 * 0.25).collect();
            let row_scale: Vec<f32> = (0..rows).map(|r| 1.0 + (r % 5) as f32).collect();
            let enc = Encoder {
                row_scale: Some(&row_scale),
                scale: Some(&scale),
                shift: Some(&b_enc),
                ..bare(&x, &w, rows, dm)
            };
            assert_eq!(assert_same(&enc, 5, false, product, "scaled"), 2);
        }
    }

    #[test]
    fn screened_top_k_in_bf16_is_the_plain_top_k() {
        for product in products() {
            let (rows, dm, latents) = (70, 64, 2048);
            let to = |v: Vec<f32>| -> Vec<bf16> { v.into_iter().map(bf16::from_f32).collect() };
            let x = to(data(rows * dm, 5, 2.0));
            let w = to(data(latents * dm, 6, 0.3));
            let b_enc: Vec<f32> = data(latents, 7, 0.2);
            let enc = Encoder {
                shift: Some(&b_enc),
                ..bare(&x, &w, rows, dm)
            };
            assert_eq!(assert_same(&enc, 16, true, product, "bf16"), 0);
        }
    }

    /// A row with fewer than k positive scores under ReLU keeps every latent as a candidate;
    /// past the candidate limit it goes the plain way, with the same result.
    #[test]
    fn rows_without_positives_go_the_plain_way() {
        for product in products() {
            let (rows, dm, latents) = (64, 32, 40_000);
            let mut x = data(rows * dm, 10, 1.0);
            let w = data(latents * dm, 11, 1.0);
            let shift = vec![-1.0f32; latents];
            for v in &mut x[..dm] {
                *v = 0.0;
            }
            let enc = Encoder {
                shift: Some(&shift),
                ..bare(&x, &w, rows, dm)
            };
            assert_eq!(assert_same(&enc, 8, true, product, "zero row"), 1);
        }
    }

    /// A latent whose bf16 score errs by its whole bound (all residuals aligned) must stay a
    /// candidate against latents its screened score trails: latent A (every weight `WORST`,
    /// screened ~0.3 low against rows of ones) truly beats latents B and B' (weights 1, exact
    /// in bf16, shifted to just below A), which the screening sees ~0.3 ahead. With a bound
    /// even slightly short of A's error, B and B' would take A's place in the top k.
    #[test]
    fn a_latent_at_its_bound_stays_a_candidate() {
        let (rows, dm, latents) = (64, 77, 1024);
        let x = vec![1.0f32; rows * dm];
        let mut w = data(latents * dm, 40, 0.01);
        let (a, b, b2) = (10, 500, 1023);
        w[a * dm..(a + 1) * dm].fill(WORST);
        w[b * dm..(b + 1) * dm].fill(1.0);
        w[b2 * dm..(b2 + 1) * dm].fill(1.0);
        // the plain path's exact scores: s_A by the FMA chain, s_B = dm
        let s_a = (0..dm).fold(0f32, |acc, _| 1f32.mul_add(WORST, acc));
        let mut shift = vec![0f32; latents];
        // v_B one ulp below v_A, v_B' two (exact differences: all lie in [64, 128))
        shift[b] = s_a.next_down() - dm as f32;
        shift[b2] = s_a.next_down().next_down() - dm as f32;
        let v = |l: usize, s: f32| s.mul_add(1.0, shift[l]);
        assert!(v(b2, dm as f32) < v(b, dm as f32) && v(b, dm as f32) < v(a, s_a));
        let enc = Encoder {
            shift: Some(&shift),
            ..bare(&x, &w, rows, dm)
        };
        for product in products() {
            for k in [1, 2, 3] {
                let what = format!("{product:?} k={k}");
                assert_eq!(assert_same(&enc, k, true, product, &what), 0, "{what}");
            }
        }
    }

    /// AMX is preferred; the AVX512-BF16 back-end runs where AMX is absent, unless switched
    /// off.
    #[test]
    fn the_switch_turns_the_bf16_screening_off() {
        if amx::available() {
            assert_eq!(Product::chosen(), Some(Product::Amx));
            return;
        }
        if !dpbf16::available() {
            eprintln!("no AVX512-BF16 here (or NEUROKERNELS_NO_BF16_SCREEN): not run");
            assert_eq!(Product::chosen(), None);
            return;
        }
        assert_eq!(Product::chosen(), Some(Product::Dpbf16));
        crate::cpu::set_bf16_screen_enabled(false);
        let off = Product::chosen();
        crate::cpu::set_bf16_screen_enabled(true);
        assert_eq!(off, None);
        assert_eq!(Product::chosen(), Some(Product::Dpbf16));
    }

    /// Unusable latents (a huge row) make the whole call go the plain way.
    #[test]
    fn huge_latents_are_not_screened() {
        for product in products() {
            let (rows, dm, latents) = (64, 32, 1024);
            let x = data(rows * dm, 8, 1.0);
            for bad in [1e20, f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                let mut w = data(latents * dm, 9, 1.0);
                w[5 * dm + 3] = bad;
                let enc = bare(&x, &w, rows, dm);
                assert!(screened(&enc, Isa::Avx512, 4, true, product).is_none());
                // the public path then runs the plain one: the same as with screening off
                let got = enc.run(Isa::Avx512, Collect::TopK { k: 4, relu: true });
                let want = enc.run_plain(Isa::Avx512, Collect::TopK { k: 4, relu: true });
                let bits = |s: &Selections<f32>| -> Vec<Vec<(u32, u32)>> {
                    s.iter()
                        .map(|r| r.iter().map(|&(v, i)| (v.to_bits(), i)).collect())
                        .collect()
                };
                assert_eq!(bits(&got), bits(&want), "latent value {bad}");
            }
        }
    }

    /// `1 + 2^-8 − 2^-23`: bf16 rounds it down by almost half its ulp, the largest residual.
    const WORST: f32 = 1.0 + 1.0 / 256.0 - 1.0 / 8_388_608.0;

    /// 32 rows built to sit at the bound or to stress its absolute terms, `dm` wide.
    fn adversarial_rows(dm: usize, seed: u64) -> Vec<f32> {
        let mut x = data(32 * dm, seed, 2.0);
        let row = |x: &mut Vec<f32>, r: usize, f: &dyn Fn(usize, f32) -> f32| {
            for d in 0..dm {
                x[r * dm + d] = f(d, x[r * dm + d]);
            }
        };
        // residuals all aligned with the aligned latents (Cauchy–Schwarz tight), both signs
        row(&mut x, 0, &|_, _| WORST);
        row(&mut x, 1, &|_, _| -3.0 * WORST);
        // halfway cases: bf16 rounds to even
        row(&mut x, 2, &|d, _| 1.0 + (1 + 2 * (d % 2)) as f32 / 256.0);
        // values one ulp apart from row 3's
        row(&mut x, 3, &|_, v| v.next_up());
        // huge (‖x‖ ≈ 2^57, still screened) and tiny norms, denormals, a zero row
        row(&mut x, 4, &|_, v| v * 2f32.powi(55));
        row(&mut x, 5, &|_, v| v * 2f32.powi(-110));
        row(&mut x, 6, &|d, v| if d % 2 == 0 { v * 1e-39 } else { v });
        row(&mut x, 7, &|_, v| v * 1e-39);
        row(&mut x, 8, &|_, _| 0.0);
        // a wide range within the row; cancellation (exact score ≪ Σ|terms|)
        row(&mut x, 9, &|d, v| {
            if d % 2 == 0 { v * 2f32.powi(30) } else { v }
        });
        row(&mut x, 10, &|d, _| if d % 2 == 0 { 1e6 } else { -1e6 });
        row(&mut x, 11, &|d, _| if d % 2 == 0 { WORST } else { -WORST });
        x
    }

    /// 32 latents to match [`adversarial_rows`], with their scale and shift.
    fn adversarial_latents(dm: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut w = data(32 * dm, seed, 0.3);
        let mut scale = vec![1.0f32; 32];
        let mut shift = data(32, seed + 1, 0.2);
        let row = |w: &mut Vec<f32>, l: usize, f: &dyn Fn(usize, f32) -> f32| {
            for d in 0..dm {
                w[l * dm + d] = f(d, w[l * dm + d]);
            }
        };
        row(&mut w, 0, &|_, _| WORST);
        row(&mut w, 1, &|_, _| -WORST);
        row(&mut w, 2, &|d, _| if d % 2 == 0 { WORST } else { -WORST });
        row(&mut w, 3, &|_, _| 1.0);
        row(&mut w, 4, &|_, v| v.next_down());
        row(&mut w, 5, &|_, v| v * 1e-39);
        row(&mut w, 6, &|_, v| v * 2f32.powi(-100));
        // huge weights, tiny scale (‖w‖·|scale| stays small)
        row(&mut w, 7, &|_, v| v * 2f32.powi(30));
        scale[7] = 2f32.powi(-25);
        // negative, fractional and large scales; large and tiny shifts
        scale[8] = -3.0;
        scale[9] = 0.1;
        scale[10] = 2f32.powi(20);
        shift[11] = 1e20;
        shift[12] = -1e-30;
        shift[13] = 0.0;
        (w, scale, shift)
    }

    /// One 32 × 32 block by `product`: the 4 KiB of scores and the packers' squares.
    fn block_product(
        product: Product,
        x: &[f32],
        w: &[f32],
        dm: usize,
    ) -> (TileBuf, Vec<[f64; 2]>, Vec<[f64; 2]>) {
        let steps = dm.div_ceil(TILE_DEPTH);
        let t = steps * TILE_ELEMS;
        let (mut a, mut b) = (vec![0u16; 2 * t], vec![0u16; 2 * t]);
        let (mut xn, mut wn) = (vec![[0.0; 2]; 32], vec![[0.0; 2]; 32]);
        let mut c = TileBuf([0.0; 1024]);
        // SAFETY: `product` is supported here (`products`), which implies AVX-512F/BW/BF16;
        // 32 rows and columns of dm, two tile rows / columns of `steps` tiles, 4 KiB out.
        unsafe {
            bf16tiles::pack_rows(x, 32, dm, &mut a, &mut xn);
            bf16tiles::pack_columns(w, 32, dm, &mut b, &mut wn);
            let (a, b) = ([a.as_ptr(), a[t..].as_ptr()], [b.as_ptr(), b[t..].as_ptr()]);
            match product {
                Product::Amx => {
                    let tiles = Tiles::configure().expect("AMX permitted (products)");
                    tiles.start_32x32(a, b, steps);
                    tiles.store_32x32(c.0.as_mut_ptr());
                }
                Product::Dpbf16 => dpbf16::product_32x32(a, b, steps, c.0.as_mut_ptr()),
            }
        }
        (c, xn, wn)
    }

    /// The bound itself: for every score of adversarial rows and latents, the exact value
    /// (the plain path's FMA chain) lies within [ṽ − e, ṽ + e] as the screening computes
    /// them. Dm off every tile size; several Dm so the sums' length varies.
    #[test]
    fn the_bound_holds_on_adversarial_rows() {
        for product in products() {
            let mut worst = 0f64;
            for (dm, seed) in [(77, 20), (1, 22), (768, 24), (1000, 26)] {
                let x = adversarial_rows(dm, seed);
                let (w, scale, shift) = adversarial_latents(dm, seed + 100);
                let (c, xn, wn) = block_product(product, &x, &w, dm);
                let bound = BoundConstants::new(dm);
                for r in 0..32 {
                    let [n, res] = row_constants(xn[r]);
                    for l in 0..32 {
                        let [p, q] = bound
                            .latent(wn[l], scale[l], shift[l])
                            .expect("usable latent");
                        let s = c.0[((r / 16) * 2 + l / 16) * 256 + (r % 16) * 16 + l % 16];
                        // SAFETY: AVX-512F (`products` checked it)
                        let (v, e) = unsafe {
                            let set = _mm512_set1_ps;
                            let (v, e) = value_and_error(
                                set(s),
                                [set(scale[l]), set(shift[l]), set(p), set(q)],
                                set(n),
                                set(res),
                            );
                            (_mm512_cvtss_f32(v), _mm512_cvtss_f32(e))
                        };
                        let dot =
                            (0..dm).fold(0f32, |acc, d| x[r * dm + d].mul_add(w[l * dm + d], acc));
                        let exact = dot.mul_add(scale[l], shift[l]);
                        let what =
                            format!("{product:?} dm {dm} row {r} latent {l}: {exact} vs {v} ± {e}");
                        assert!(v - e <= exact && exact <= v + e, "{what}");
                        worst = worst.max((exact as f64 - v as f64).abs() / e as f64);
                    }
                }
            }
            // the aligned rows and latents come near the bound (a test that can fail if
            // the bound is loose by orders of magnitude, too)
            eprintln!("{product:?}: largest |v - ṽ| / e = {worst:.3}");
            assert!(worst > 0.25, "{product:?}: {worst}");
        }
    }

    /// The encoder on rows built to sit at the bound, with near-ties at the k-th value:
    /// the screened top-k equals the plain one bit for bit, whatever the back-end.
    #[test]
    fn screened_top_k_is_the_plain_top_k_on_adversarial_rows() {
        // rows 97, Dm 77, L 2053: none a multiple of a tile
        let (rows, dm, latents) = (97, 77, 2053);
        let mut x = data(rows * dm, 30, 1.0);
        let mut w = data(latents * dm, 31, 0.3);
        // latents 96..: the adversarial ones
        let (adv_w, adv_scale, _) = adversarial_latents(dm, 32);
        w[96 * dm..128 * dm].copy_from_slice(&adv_w);
        // a family of near-ties: latent u, 64 copies each one ulp off in one element, 9
        // exact copies; rows 20..40 point at u so the k-th value falls inside the family
        let u = data(dm, 33, 0.3);
        for j in 0..73 {
            let l = 200 + 7 * j;
            w[l * dm..(l + 1) * dm].copy_from_slice(&u);
            if j < 64 {
                let e = &mut w[l * dm + j % dm];
                *e = if j % 2 == 0 {
                    e.next_up()
                } else {
                    e.next_down()
                };
            }
        }
        let noise = data(rows * dm, 34, 1e-6);
        for r in 20..40 {
            for d in 0..dm {
                x[r * dm + d] = (1.0 + r as f32) * u[d] + noise[r * dm + d];
            }
        }
        // rows 40..52: the adversarial rows; 52: row 21 one ulp up everywhere
        x[40 * dm..72 * dm].copy_from_slice(&adversarial_rows(dm, 35));
        for d in 0..dm {
            x[52 * dm + d] = x[21 * dm + d].next_up();
        }
        // the plain way: a norm ≥ 2^60, ±inf, NaN
        for d in 0..dm {
            x[80 * dm + d] = 2f32.powi(60);
        }
        x[81 * dm + 3] = f32::INFINITY;
        x[82 * dm] = f32::NEG_INFINITY;
        x[83 * dm + 76] = f32::NAN;
        // shifts mostly negative, three positive: the zero, tiny and denormal rows have
        // fewer than k positive pre-activations under ReLU
        let mut shift: Vec<f32> = data(latents, 36, 0.1)
            .iter()
            .map(|v| -v.abs() - 0.01)
            .collect();
        shift[5] = 0.3;
        shift[700] = 0.3;
        shift[2052] = 1e-3;
        let mut scale = vec![1.0f32; latents];
        scale[96..128].copy_from_slice(&adv_scale);
        for product in products() {
            for k in [1, 9, 32, 33, 80] {
                for relu in [true, false] {
                    let enc = Encoder {
                        shift: Some(&shift),
                        ..bare(&x, &w, rows, dm)
                    };
                    let what = format!("{product:?} k={k} relu={relu}");
                    assert_eq!(assert_same(&enc, k, relu, product, &what), 4, "{what}");
                    let scaled = Encoder {
                        scale: Some(&scale),
                        ..enc
                    };
                    let what = format!("{what} scaled");
                    assert_eq!(assert_same(&scaled, k, relu, product, &what), 4, "{what}");
                }
            }
        }
    }
}
