//! AVX512-BF16 products: `vdpbf16ps` register tiles over the packed bf16 tiles of
//! `cpu::bf16tiles`, the screening back-end of the encoder (`topk::screen`) on CPUs with
//! AVX512-BF16 but no AMX (AMD Zen 4 and later, Intel Cooper Lake). One `vdpbf16ps` does 32
//! bf16 multiply-adds with f32 accumulation where an f32 FMA does 16.
//!
//! `vdpbf16ps` treats bf16 denormal inputs as zero and flushes denormal results to zero,
//! rounding to nearest even whatever MXCSR says — the same assumptions the screening's bound
//! makes for AMX (see `topk::screen`). (Were denormal inputs kept instead, each would differ
//! from the zero the bound assumes by under 2^-126, inside the bound's δ terms.)
//!
//! [`available`] checks the CPU once; `NEUROKERNELS_NO_BF16_SCREEN=1` or
//! [`set_bf16_screen_enabled`]`(false)` turns this back-end off (results are the same either
//! way; only the speed differs). AMX, where present, is preferred to it.

use super::Switch;
use super::bf16tiles::{TILE_DEPTH, TILE_ELEMS, TILE_ROWS};
use std::arch::x86_64::*;
use std::sync::OnceLock;

static DISABLED: Switch = Switch::new("NEUROKERNELS_NO_BF16_SCREEN");

/// Process-wide switch for the AVX512-BF16 screening of the top-k encoders (on by default
/// where the CPU has AVX512-BF16 and no usable AMX). Off, the encoders take their plain
/// AVX-512 path, with the same results. Same effect as `NEUROKERNELS_NO_BF16_SCREEN=1`.
pub fn set_bf16_screen_enabled(on: bool) {
    DISABLED.set(!on);
}

/// Whether the AVX512-BF16 products can run here now: CPU support and not switched off.
pub(crate) fn available() -> bool {
    !DISABLED.is_on() && supported()
}

/// CPU support (checked once), whatever the switch says: AVX-512F, AVX512-BW (the packers
/// use it) and AVX512-BF16.
pub(crate) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// Rows of one register tile: `ROWS` rows × 32 columns is 2·`ROWS` accumulators.
const ROWS: usize = 8;

/// C = A·B for a 32×32 block over `steps` depth steps of 32, stored as [`Tiles::store_32x32`]
/// stores it (four 16×16 f32 tiles 1 KiB apart at `c`: rows 0–15 × columns 0–15, rows 0–15
/// × 16–31, rows 16–31 × 0–15, rows 16–31 × 16–31): `a[i]` is the first of `steps`
/// consecutive packed A tiles of rows 16i..16i+16, `b[j]` likewise the B tiles of columns
/// 16j..16j+16. Each lane sums its products in depth-pair order.
///
/// [`Tiles::store_32x32`]: super::amx::Tiles::store_32x32
///
/// # Safety
/// AVX-512F and AVX512-BF16 are available ([`available`] implies them); each pointer is
/// valid for `steps` tiles (`steps · 1 KiB`); `c` is valid for 4 KiB of writes.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn product_32x32(
    a: [*const u16; 2],
    b: [*const u16; 2],
    steps: usize,
    c: *mut f32,
) {
    for (t, &a) in a.iter().enumerate() {
        for g in 0..TILE_ROWS / ROWS {
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            for s in 0..steps {
                // SAFETY: step s < steps of each operand (the contract); the A rows
                // g·ROWS.. of this tile, the B tiles' 16 depth pairs of 64 bytes.
                unsafe {
                    let rows = a.add(s * TILE_ELEMS + g * ROWS * TILE_DEPTH);
                    let (b0, b1) = (b[0].add(s * TILE_ELEMS), b[1].add(s * TILE_ELEMS));
                    for p in 0..TILE_DEPTH / 2 {
                        let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
                        let w0 = bh(_mm512_loadu_si512(b0.add(p * 32).cast()));
                        let w1 = bh(_mm512_loadu_si512(b1.add(p * 32).cast()));
                        for (i, acc) in acc.iter_mut().enumerate() {
                            // row i's depth pair p, broadcast to every column
                            let pair = rows.add(i * TILE_DEPTH + 2 * p).cast::<i32>();
                            let x = bh(_mm512_set1_epi32(pair.read_unaligned()));
                            acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                            acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let row = g * ROWS + i;
                for (h, v) in acc.iter().enumerate() {
                    // SAFETY: tile 2t + h, row `row` < 16: inside the 4 KiB at c
                    unsafe { _mm512_storeu_ps(c.add((2 * t + h) * 256 + row * 16), *v) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register-tile product equals the bf16-rounded product summed in f64 (to f32
    /// rounding), with rows, columns and depth not multiples of a tile.
    #[test]
    fn register_tile_product_matches_the_bf16_product() {
        if !supported() {
            eprintln!("no AVX512-BF16 here: vdpbf16ps product not run");
            return;
        }
        // SAFETY: AVX-512F/BW/BF16 checked above; the product gets the operands and output
        // `check_product` documents.
        unsafe {
            crate::cpu::bf16tiles::tests::check_product(|a, b, steps, c| {
                product_32x32(a, b, steps, c)
            })
        };
    }
}
