//! bf16 operands packed in 1 KiB tiles, shared by the two bf16 product back-ends of the
//! encoder's screening (`topk::screen`): AMX tile products (`cpu::amx`) and AVX512-BF16
//! `vdpbf16ps` register tiles (`cpu::dpbf16`). An A tile is 16 rows × 32 bf16 (row-major),
//! a B tile 16 pairs of depth × 16 columns × 2 bf16 (the VNNI layout TDPBF16PS reads; one
//! 64-byte row of it is exactly the B operand of one `vdpbf16ps` over 16 columns).
//!
//! The packers also return what the screening's error bound needs: upper bounds of each
//! row's ‖v‖² and ‖v − ṽ‖², ṽ the bf16 values the products use, with a bf16 denormal
//! counted as zero (both back-ends treat denormal inputs as zero).

use std::arch::x86_64::*;

/// bf16 values per tile row (64 bytes), i.e. the depth one tile step covers.
pub(crate) const TILE_DEPTH: usize = 32;
/// Rows (A) or columns (B, C) of a tile.
pub(crate) const TILE_ROWS: usize = 16;
/// u16 elements of one packed tile.
pub(crate) const TILE_ELEMS: usize = TILE_ROWS * TILE_DEPTH;

/// Transposes a 16×16 block of 32-bit values held as 16 row vectors (64 shuffles).
///
/// # Safety
/// AVX-512F is available (call it from a `#[target_feature(enable = "avx512f")]` fn whose
/// caller checked it).
#[inline(always)]
pub(crate) unsafe fn transpose16(r: &mut [__m512; 16]) {
    // SAFETY: register-only AVX-512F shuffles; the ISA per this fn's contract.
    unsafe {
        // 32-bit interleave of row pairs, within 128-bit lanes
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // 64-bit interleave: u[4q + c], lane L = column 4L + c of rows 4q..4q+4
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            let pd = |v: __m512| _mm512_castps_pd(v);
            let (a, b) = (pd(t[4 * q]), pd(t[4 * q + 2]));
            let (c, d) = (pd(t[4 * q + 1]), pd(t[4 * q + 3]));
            u[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            u[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
            u[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
        }
        // 4×4 transpose of 128-bit lanes: row 4L + c gathers lane L of u[c], u[4 + c], ...
        for c in 0..4 {
            let p0 = _mm512_shuffle_f32x4::<0x44>(u[c], u[4 + c]);
            let p1 = _mm512_shuffle_f32x4::<0xEE>(u[c], u[4 + c]);
            let p2 = _mm512_shuffle_f32x4::<0x44>(u[8 + c], u[12 + c]);
            let p3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + c], u[12 + c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(p0, p2);
            r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(p0, p2);
            r[8 + c] = _mm512_shuffle_f32x4::<0x88>(p1, p3);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(p1, p3);
        }
    }
}

/// Mask of the first `n` (≤ 16) lanes.
#[inline(always)]
pub(crate) fn lanes_mask(n: usize) -> u16 {
    if n >= 16 { u16::MAX } else { (1u16 << n) - 1 }
}

/// 32 f32 at `p` (the first `n` ≤ 32 of them; the rest zero) as 32 bf16, nearest even, and
/// the residuals' and values' squares added to `sums` (lane-wise: [Σ v², Σ (v − ṽ)²]), where
/// ṽ is the value the tile product uses (a bf16 denormal counts as zero: AMX and
/// `vdpbf16ps` treat it so).
///
/// # Safety
/// AVX-512F, AVX512-BW and AVX512-BF16 are available (the callers are `#[target_feature]`
/// fns with those features, whose callers checked
/// `amx::available` or `dpbf16::available`); `p` is valid for reads of
/// `n` values (lanes past `n` are masked off and never read).
#[inline(always)]
unsafe fn bf16x32(p: *const f32, n: usize, sums: &mut [__m512; 2]) -> __m512i {
    // SAFETY: the ISA and the n readable values per this fn's contract; the masked loads
    // touch only lanes < n. `wrapping_add`: with n <= 16 the second (fully masked) load's
    // address may lie past the end of p's allocation, where `add` would be UB.
    unsafe {
        let lo = _mm512_maskz_loadu_ps(lanes_mask(n), p);
        let hi = _mm512_maskz_loadu_ps(lanes_mask(n.saturating_sub(16)), p.wrapping_add(16));
        let packed = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        // the bf16 values back as f32: elements 0–15 (from lo) and 16–31 (from hi), each
        // widened to 32 bits and shifted into the f32's high half
        let widen = |half: __m256i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        };
        let back_lo = widen(_mm512_castsi512_si256(packed));
        let back_hi = widen(_mm512_extracti64x4_epi64::<1>(packed));
        let min_normal = _mm512_set1_ps(f32::MIN_POSITIVE);
        for (v, back) in [(lo, back_lo), (hi, back_hi)] {
            let normal = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(back), min_normal);
            let used = _mm512_maskz_mov_ps(normal, back);
            let residual = _mm512_sub_ps(v, used);
            sums[0] = _mm512_fmadd_ps(v, v, sums[0]);
            sums[1] = _mm512_fmadd_ps(residual, residual, sums[1]);
        }
        packed
    }
}

/// Lane sums of `v` in f64 (each lane an f32 sum of at most `terms` squares): an upper bound
/// of the exact sum, inflated by the f32 summation error.
///
/// # Safety
/// AVX-512F is available.
#[inline(always)]
unsafe fn upper_sum(v: __m512, terms: usize) -> f64 {
    let mut lanes = [0f32; 16];
    // SAFETY: AVX-512F per this fn's contract; the store writes the 16 lanes of `lanes`.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), v) };
    let sum: f64 = lanes.iter().map(|&x| x as f64).sum();
    sum * (1.0 + (terms + 1) as f64 * f32::EPSILON as f64)
}

/// Rows `x [n, dm]` (f32) as packed A tiles [row tile][depth step][16 rows][32], bf16; rows
/// past `n` (up to `tiles · 16`) and depth past `dm` are zero. `norms[i]` gets upper bounds
/// of row i's ‖x‖² and ‖x − x̃‖² (x̃ the values the tiles hold).
///
/// # Safety
/// The CPU has AVX-512F, AVX512-BW and AVX512-BF16 (`amx::available` and
/// `dpbf16::available` imply it);
/// `x.len() >= n · dm`;
/// `out.len() == row_tiles · steps · TILE_ELEMS` with `steps = dm.div_ceil(32)`;
/// `norms.len() >= n`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_rows(
    x: &[f32],
    n: usize,
    dm: usize,
    out: &mut [u16],
    norms: &mut [[f64; 2]],
) {
    let steps = dm.div_ceil(TILE_DEPTH);
    debug_assert!(x.len() >= n * dm && out.len().is_multiple_of(steps * TILE_ELEMS));
    for (t, tile_row) in out.chunks_exact_mut(steps * TILE_ELEMS).enumerate() {
        for i in 0..TILE_ROWS {
            let row = t * TILE_ROWS + i;
            let mut sums = [_mm512_setzero_ps(); 2];
            for s in 0..steps {
                let d0 = s * TILE_DEPTH;
                let width = (dm - d0).min(TILE_DEPTH);
                let dst = tile_row[s * TILE_ELEMS + i * TILE_DEPTH..].as_mut_ptr();
                // SAFETY: row < n reads x[row·dm + d0 .. + width]; the store is 64 bytes
                // inside this tile.
                unsafe {
                    let v = if row < n {
                        bf16x32(x.as_ptr().add(row * dm + d0), width, &mut sums)
                    } else {
                        _mm512_setzero_si512()
                    };
                    _mm512_storeu_si512(dst.cast(), v);
                }
            }
            if row < n {
                // SAFETY: AVX-512F
                norms[row] =
                    unsafe { [upper_sum(sums[0], steps * 2), upper_sum(sums[1], steps * 2)] };
            }
        }
    }
}

/// Columns given as rows `w [n, dm]` (f32) as packed B tiles [column tile][depth step]
/// [16 depth pairs][16 columns][2], bf16; columns past `n` and depth past `dm` are zero.
/// `norms` as for [`pack_rows`], per column.
///
/// # Safety
/// As [`pack_rows`], with `out.len() == col_tiles · steps · TILE_ELEMS`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_columns(
    w: &[f32],
    n: usize,
    dm: usize,
    out: &mut [u16],
    norms: &mut [[f64; 2]],
) {
    let steps = dm.div_ceil(TILE_DEPTH);
    debug_assert!(w.len() >= n * dm && out.len().is_multiple_of(steps * TILE_ELEMS));
    for (t, tile_col) in out.chunks_exact_mut(steps * TILE_ELEMS).enumerate() {
        let mut sums = [[_mm512_setzero_ps(); 2]; 16];
        for s in 0..steps {
            let d0 = s * TILE_DEPTH;
            let width = (dm - d0).min(TILE_DEPTH);
            // SAFETY: reads inside w's rows (col < n), writes the 1 KiB tile.
            unsafe {
                // one vector per column: its 16 depth pairs as 32-bit lanes
                let mut r = [_mm512_setzero_ps(); 16];
                for (j, v) in r.iter_mut().enumerate() {
                    let col = t * TILE_ROWS + j;
                    if col < n {
                        let p = w.as_ptr().add(col * dm + d0);
                        *v = _mm512_castsi512_ps(bf16x32(p, width, &mut sums[j]));
                    }
                }
                // → one vector per depth pair, the 16 columns side by side
                transpose16(&mut r);
                let dst = tile_col[s * TILE_ELEMS..].as_mut_ptr().cast::<f32>();
                for (p, v) in r.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(p * 16), *v);
                }
            }
        }
        for (j, sums) in sums.iter().enumerate() {
            let col = t * TILE_ROWS + j;
            if col < n {
                // SAFETY: AVX-512F
                norms[col] =
                    unsafe { [upper_sum(sums[0], steps * 2), upper_sum(sums[1], steps * 2)] };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn bf16_round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    #[test]
    fn transpose16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: transpose16 not run");
            return;
        }
        /// # Safety
        /// The CPU has AVX-512F.
        #[target_feature(enable = "avx512f")]
        unsafe fn run(a: &[f32; 256]) -> [f32; 256] {
            // SAFETY: AVX-512F is enabled on this fn (checked by the caller); each row
            // 16·i..16·i+16 lies in the 256-value arrays, and the pointers come from the whole
            // arrays (a pointer made from `&a[16 * i]` may only touch that one element).
            unsafe {
                let mut r: [__m512; 16] =
                    std::array::from_fn(|i| _mm512_loadu_ps(a.as_ptr().add(16 * i)));
                transpose16(&mut r);
                let mut out = [0f32; 256];
                for (i, v) in r.iter().enumerate() {
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * i), *v);
                }
                out
            }
        }
        let a: [f32; 256] = std::array::from_fn(|i| i as f32);
        // SAFETY: AVX-512F checked above
        let t = unsafe { run(&a) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[16 * j + i], a[16 * i + j], "element ({i}, {j})");
            }
        }
    }

    /// Packs rows and columns (sizes off every tile), checks the packers' norms, runs
    /// `product` (a 32 × 32 block: `a`, `b` the two tile rows / columns, `steps`, 4 KiB out
    /// in the AMX store layout) and checks it against the bf16-rounded product summed in f64
    /// (to f32 rounding). Both product back-ends run it.
    ///
    /// # Safety
    /// AVX-512F, AVX512-BW and AVX512-BF16 are available; `product` is safe to call with
    /// pointers to two `steps`-tile operands each and 4 KiB of output.
    pub(crate) unsafe fn check_product(
        product: impl FnOnce([*const u16; 2], [*const u16; 2], usize, *mut f32),
    ) {
        let (n_rows, n_cols, dm): (usize, usize, usize) = (29, 21, 70);
        let x: Vec<f32> = (0..n_rows * dm)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let w: Vec<f32> = (0..n_cols * dm)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 9.0)
            .collect();
        let steps = dm.div_ceil(TILE_DEPTH);
        let mut a = vec![0u16; 2 * steps * TILE_ELEMS];
        let mut b = vec![0u16; 2 * steps * TILE_ELEMS];
        let mut c = vec![0f32; 1024];
        let (mut xn, mut wn) = (vec![[0.0; 2]; n_rows], vec![[0.0; 2]; n_cols]);
        // SAFETY: the ISA per this fn's contract; buffers sized as documented.
        unsafe {
            pack_rows(&x, n_rows, dm, &mut a, &mut xn);
            pack_columns(&w, n_cols, dm, &mut b, &mut wn);
        }
        for (r, n) in xn.iter().enumerate() {
            let row = &x[r * dm..(r + 1) * dm];
            let sq: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
            let res: f64 = row
                .iter()
                .map(|&v| (v as f64 - bf16_round(v) as f64).powi(2))
                .sum();
            assert!(
                n[0] >= sq && n[0] <= sq * 1.001,
                "row {r}: {} vs {sq}",
                n[0]
            );
            assert!(
                n[1] >= res && n[1] <= res * 1.001 + 1e-30,
                "row {r}: {} vs {res}",
                n[1]
            );
        }
        for (l, n) in wn.iter().enumerate() {
            let row = &w[l * dm..(l + 1) * dm];
            let res: f64 = row
                .iter()
                .map(|&v| (v as f64 - bf16_round(v) as f64).powi(2))
                .sum();
            assert!(
                n[1] >= res && n[1] <= res * 1.001 + 1e-30,
                "column {l}: {} vs {res}",
                n[1]
            );
        }
        let t = steps * TILE_ELEMS;
        // SAFETY: two tile rows / columns of `steps` tiles each; 4 KiB out
        product(
            [a.as_ptr(), a[t..].as_ptr()],
            [b.as_ptr(), b[t..].as_ptr()],
            steps,
            c.as_mut_ptr(),
        );
        for r in 0..32 {
            for l in 0..32 {
                let terms: Vec<f64> = if r < n_rows && l < n_cols {
                    (0..dm)
                        .map(|d| {
                            bf16_round(x[r * dm + d]) as f64 * bf16_round(w[l * dm + d]) as f64
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let want: f64 = terms.iter().sum();
                let magnitude: f64 = terms.iter().map(|t| t.abs()).sum();
                let tile = (r / 16) * 2 + l / 16;
                let got = c[tile * 256 + (r % 16) * 16 + l % 16] as f64;
                // f32 accumulation: at most dm roundings of partial sums bounded by magnitude
                let bound = dm as f64 * f32::EPSILON as f64 * magnitude;
                assert!((got - want).abs() <= bound, "({r}, {l}): {got} vs {want}");
            }
        }
    }
}
