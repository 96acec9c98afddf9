//! Scalar f16/bf16 <-> f32 conversions, bit-exact with the hardware ones (round to nearest
//! even, NaN kept quiet), written without run-time feature checks so they inline into loops.

use half::{bf16, f16};

/// `x` widened to f32 (exact; NaN stays NaN, made quiet).
#[inline(always)]
pub fn f16_to_f32(x: f16) -> f32 {
    let h = x.to_bits() as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let bits = if exp == 0 {
        // zero or subnormal: man * 2^-24 is exact in f32
        let magnitude = man as f32 * (1.0 / 16_777_216.0);
        return if sign != 0 { -magnitude } else { magnitude };
    } else if exp == 31 {
        let quiet = if man != 0 { 0x0040_0000 } else { 0 };
        sign | 0x7f80_0000 | (man << 13) | quiet
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// `x` rounded to f16, to nearest even (overflow gives ±inf; NaN stays NaN, made quiet).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> f16 {
    let f = x.to_bits();
    let sign = ((f >> 16) & 0x8000) as u16;
    let abs = f & 0x7fff_ffff;
    let bits = if abs >= 0x7f80_0000 {
        // inf, or NaN kept quiet with its top payload bits
        let nan = if abs > 0x7f80_0000 {
            0x0200 | ((abs >> 13) & 0x3ff) as u16
        } else {
            0
        };
        0x7c00 | nan
    } else if abs >= 0x477f_f000 {
        0x7c00 // >= 65520 rounds to infinity
    } else if abs < 0x3880_0000 {
        // below the smallest normal 2^-14: subnormal result, value = m * 2^-24
        let e = abs >> 23;
        if e < 102 {
            0
        } else {
            let m = (abs & 0x7f_ffff) | 0x80_0000;
            let shift = 126 - e;
            let half = 1u32 << (shift - 1);
            let rem = m & ((1u32 << shift) - 1);
            let q = m >> shift;
            (if rem > half || (rem == half && (q & 1) == 1) {
                q + 1
            } else {
                q
            }) as u16
        }
    } else {
        let r = abs - 0x3800_0000;
        ((r + 0x0fff + ((r >> 13) & 1)) >> 13) as u16
    };
    f16::from_bits(sign | bits)
}

/// `x` widened to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

/// `x` rounded to bf16, to nearest even (NaN stays NaN, made quiet).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> bf16 {
    let f = x.to_bits();
    if x.is_nan() {
        return bf16::from_bits(((f >> 16) as u16) | 0x0040);
    }
    let rounded = f.wrapping_add(0x7fff + ((f >> 16) & 1)) >> 16;
    bf16::from_bits(rounded as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_roundtrip_matches_half_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let ours = f16_to_f32(h);
            let theirs = h.to_f32();
            assert!(
                ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()),
                "{bits:#06x}: {ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn f32_to_f16_matches_half_on_many_values() {
        let mut x: u32 = 0x1234_5678;
        let specials = [
            0.0f32,
            -0.0,
            65504.0,
            65519.99,
            65520.0,
            6.1e-5,
            5.96e-8,
            2.98e-8,
            2.99e-8,
            1e-10,
            f32::INFINITY,
            -f32::INFINITY,
        ];
        for v in specials {
            assert_eq!(f32_to_f16(v).to_bits(), f16::from_f32(v).to_bits(), "{v}");
        }
        for _ in 0..2_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_nan() {
                assert!(f32_to_f16(v).is_nan());
                continue;
            }
            assert_eq!(
                f32_to_f16(v).to_bits(),
                f16::from_f32(v).to_bits(),
                "{v:e} ({x:#x})"
            );
        }
    }

    #[test]
    fn bf16_matches_half() {
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_nan() {
                assert!(f32_to_bf16(v).is_nan());
                continue;
            }
            assert_eq!(
                f32_to_bf16(v).to_bits(),
                bf16::from_f32(v).to_bits(),
                "{v:e}"
            );
            let b = bf16::from_bits(x as u16);
            if !b.is_nan() {
                assert_eq!(bf16_to_f32(b).to_bits(), b.to_f32().to_bits());
            }
        }
    }
}
