//! aarch64 NEON path: 4 f32 lanes, 2 f64 lanes. f16 goes through the scalar bit-exact
//! conversions (the NEON f16 vector types are not stable in Rust); bf16 is widened and
//! rounded with integer vector ops.

use super::convert::{f16_to_f32, f32_to_f16};
use super::{Simd, SimdKernel};
use half::{bf16, f16};
use std::arch::aarch64::*;

#[derive(Clone, Copy)]
pub struct Neon;

/// Runs `kernel` compiled for NEON.
///
/// # Safety
///
/// The CPU supports neon (`dispatch` checks `Isa::Neon.is_supported()`).
#[target_feature(enable = "neon")]
pub(super) unsafe fn run_neon<K: SimdKernel>(kernel: K) -> K::Output {
    kernel.run::<Neon>()
}

// SAFETY (every `unsafe {}` in this impl, one justification for the group): each method is
// an `unsafe fn` under the `Simd` trait contract (cpu/mod.rs): it runs only where NEON is
// present, because `dispatch` checked `Isa::Neon.is_supported()` before entering
// `run_neon`, the only caller of `Kernel::run::<Neon>`; and each pointer argument is valid
// for F32_LANES (4) or F64_LANES (2) elements, exactly what the loads/stores touch. The
// blocks only forward those guarantees to the intrinsics; spills go to local arrays of at
// least one vector.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Simd for Neon {
    type F32 = float32x4_t;
    type F64 = float64x2_t;
    const F32_LANES: usize = 4;
    const F64_LANES: usize = 2;
    #[inline(always)]
    unsafe fn f32_load(p: *const f32) -> float32x4_t {
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn f32_store(p: *mut f32, v: float32x4_t) {
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn f32_splat(x: f32) -> float32x4_t {
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn f32_fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn f32_mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn f16_load(p: *const f16) -> float32x4_t {
        unsafe {
            let lanes = [
                f16_to_f32(*p),
                f16_to_f32(*p.add(1)),
                f16_to_f32(*p.add(2)),
                f16_to_f32(*p.add(3)),
            ];
            vld1q_f32(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f16_store(p: *mut f16, v: float32x4_t) {
        unsafe {
            let mut lanes = [0f32; 4];
            vst1q_f32(lanes.as_mut_ptr(), v);
            for (i, x) in lanes.iter().enumerate() {
                *p.add(i) = f32_to_f16(*x);
            }
        }
    }
    #[inline(always)]
    unsafe fn bf16_load(p: *const bf16) -> float32x4_t {
        unsafe {
            let wide = vmovl_u16(vld1_u16(p as *const u16));
            vreinterpretq_f32_u32(vshlq_n_u32::<16>(wide))
        }
    }
    #[inline(always)]
    unsafe fn bf16_store(p: *mut bf16, v: float32x4_t) {
        unsafe {
            let bits = vreinterpretq_u32_f32(v);
            let lsb = vandq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(1));
            let bias = vaddq_u32(lsb, vdupq_n_u32(0x7fff));
            let rounded = vshrq_n_u32::<16>(vaddq_u32(bits, bias));
            let quiet = vorrq_u32(vshrq_n_u32::<16>(bits), vdupq_n_u32(0x40));
            let not_nan = vceqq_f32(v, v);
            let chosen = vbslq_u32(not_nan, rounded, quiet);
            vst1_u16(p as *mut u16, vmovn_u32(chosen))
        }
    }
    #[inline(always)]
    unsafe fn f64_load(p: *const f64) -> float64x2_t {
        unsafe { vld1q_f64(p) }
    }
    #[inline(always)]
    unsafe fn f64_store(p: *mut f64, v: float64x2_t) {
        unsafe { vst1q_f64(p, v) }
    }
    #[inline(always)]
    unsafe fn f64_splat(x: f64) -> float64x2_t {
        unsafe { vdupq_n_f64(x) }
    }
    #[inline(always)]
    unsafe fn f64_fma(a: float64x2_t, b: float64x2_t, c: float64x2_t) -> float64x2_t {
        unsafe { vfmaq_f64(c, a, b) }
    }
    #[inline(always)]
    unsafe fn f64_mul(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vmulq_f64(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_add(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vaddq_f64(a, b) }
    }
    // Complex pairs: re parts duplicated (trn1), im parts duplicated (trn2), x with re/im
    // swapped (rev64); the sign vector subtracts in even lanes.
    #[inline(always)]
    unsafe fn f32_cmul(a: float32x4_t, x: float32x4_t) -> float32x4_t {
        unsafe {
            let sign = vld1q_f32([-1.0f32, 1.0, -1.0, 1.0].as_ptr());
            let cross = vmulq_f32(vmulq_f32(vtrn2q_f32(a, a), vrev64q_f32(x)), sign);
            vfmaq_f32(cross, vtrn1q_f32(a, a), x)
        }
    }
    #[inline(always)]
    unsafe fn f32_cmul_conj(a: float32x4_t, x: float32x4_t) -> float32x4_t {
        unsafe {
            let sign = vld1q_f32([1.0f32, -1.0, 1.0, -1.0].as_ptr());
            let cross = vmulq_f32(vmulq_f32(vtrn2q_f32(a, a), vrev64q_f32(x)), sign);
            vfmaq_f32(cross, vtrn1q_f32(a, a), x)
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul(a: float64x2_t, x: float64x2_t) -> float64x2_t {
        unsafe {
            let sign = vld1q_f64([-1.0f64, 1.0].as_ptr());
            let cross = vmulq_f64(
                vmulq_f64(vdupq_laneq_f64::<1>(a), vextq_f64::<1>(x, x)),
                sign,
            );
            vfmaq_f64(cross, vdupq_laneq_f64::<0>(a), x)
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul_conj(a: float64x2_t, x: float64x2_t) -> float64x2_t {
        unsafe {
            let sign = vld1q_f64([1.0f64, -1.0].as_ptr());
            let cross = vmulq_f64(
                vmulq_f64(vdupq_laneq_f64::<1>(a), vextq_f64::<1>(x, x)),
                sign,
            );
            vfmaq_f64(cross, vdupq_laneq_f64::<0>(a), x)
        }
    }
    #[inline(always)]
    unsafe fn f32_exp(x: float32x4_t) -> float32x4_t {
        use super::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
        unsafe {
            let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(EXP_LO)), vdupq_n_f32(EXP_HI));
            let k = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(std::f32::consts::LOG2_E)));
            let r = vfmsq_f32(vfmsq_f32(x, k, vdupq_n_f32(LN2_HI)), k, vdupq_n_f32(LN2_LO));
            let mut p = vdupq_n_f32(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = vfmaq_f32(vdupq_n_f32(*c), p, r);
            }
            let scale = vshlq_n_s32::<23>(vaddq_s32(vcvtnq_s32_f32(k), vdupq_n_s32(127)));
            vmulq_f32(p, vreinterpretq_f32_s32(scale))
        }
    }
    #[inline(always)]
    unsafe fn f64_exp(x: float64x2_t) -> float64x2_t {
        unsafe { vld1q_f64([vgetq_lane_f64::<0>(x).exp(), vgetq_lane_f64::<1>(x).exp()].as_ptr()) }
    }
    #[inline(always)]
    unsafe fn f32_exp2(x: float32x4_t) -> float32x4_t {
        use super::{EXP2_HI, EXP2_LO, EXP2_POLY, EXP2_ROUND};
        unsafe {
            let x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(EXP2_LO)), vdupq_n_f32(EXP2_HI));
            let t = vaddq_f32(x, vdupq_n_f32(EXP2_ROUND));
            let r = vsubq_f32(x, vsubq_f32(t, vdupq_n_f32(EXP2_ROUND)));
            let mut p = vdupq_n_f32(EXP2_POLY[0]);
            for c in &EXP2_POLY[1..] {
                p = vfmaq_f32(vdupq_n_f32(*c), p, r);
            }
            let scale = vshlq_n_u32::<23>(vaddq_u32(vreinterpretq_u32_f32(t), vdupq_n_u32(127)));
            vmulq_f32(p, vreinterpretq_f32_u32(scale))
        }
    }
    #[inline(always)]
    unsafe fn f64_exp2(x: float64x2_t) -> float64x2_t {
        unsafe {
            vld1q_f64([vgetq_lane_f64::<0>(x).exp2(), vgetq_lane_f64::<1>(x).exp2()].as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f32_div(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vdivq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_div(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vdivq_f64(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_max(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vmaxq_f64(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_min(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        unsafe { vminq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_min(a: float64x2_t, b: float64x2_t) -> float64x2_t {
        unsafe { vminq_f64(a, b) }
    }
    // NEON has no movemask: the comparison lanes (all ones or zero) are masked with each
    // lane's bit and summed across.
    #[inline(always)]
    unsafe fn f32_mask_gt(a: float32x4_t, b: float32x4_t) -> u32 {
        unsafe { f32_bits(vcgtq_f32(a, b)) }
    }
    #[inline(always)]
    unsafe fn f64_mask_gt(a: float64x2_t, b: float64x2_t) -> u32 {
        unsafe { f64_bits(vcgtq_f64(a, b)) }
    }
    #[inline(always)]
    unsafe fn f32_mask_nle(a: float32x4_t, b: float32x4_t) -> u32 {
        unsafe { f32_bits(vmvnq_u32(vcleq_f32(a, b))) }
    }
    #[inline(always)]
    unsafe fn f64_mask_nle(a: float64x2_t, b: float64x2_t) -> u32 {
        unsafe { f64_bits(veorq_u64(vcleq_f64(a, b), vdupq_n_u64(u64::MAX))) }
    }
}

/// Lane i's comparison result (all ones or zero) as bit i.
///
/// # Safety
///
/// NEON is available (called only from `Simd for Neon` methods, see their contract).
#[inline(always)]
unsafe fn f32_bits(m: uint32x4_t) -> u32 {
    const BITS: [u32; 4] = [1, 2, 4, 8];
    // SAFETY: NEON per this fn's contract; the load reads the 4 values of BITS.
    unsafe { vaddvq_u32(vandq_u32(m, vld1q_u32(BITS.as_ptr()))) }
}

/// [`f32_bits`] for two f64 lanes.
///
/// # Safety
///
/// As [`f32_bits`].
#[inline(always)]
unsafe fn f64_bits(m: uint64x2_t) -> u32 {
    const BITS: [u64; 2] = [1, 2];
    // SAFETY: NEON per this fn's contract; the load reads the 2 values of BITS.
    unsafe { vaddvq_u64(vandq_u64(m, vld1q_u64(BITS.as_ptr()))) as u32 }
}
