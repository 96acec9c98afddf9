//! x86-64 paths: AVX2+FMA+F16C (8 f32 lanes) and AVX-512F (16 f32 lanes).
//! Every method is `#[inline(always)]` and only ever runs inside `run_avx2`/`run_avx512`,
//! whose `#[target_feature]` makes the intrinsics compile to single instructions.

use super::{Simd, SimdKernel};
use half::{bf16, f16};
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub struct Avx2;

#[derive(Clone, Copy)]
pub struct Avx512;

/// Runs `kernel` compiled for AVX2 + FMA + F16C.
///
/// # Safety
///
/// The CPU supports avx2, fma and f16c (`dispatch` checks `Isa::Avx2.is_supported()`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_avx2<K: SimdKernel>(kernel: K) -> K::Output {
    kernel.run::<Avx2>()
}

/// Runs `kernel` compiled for AVX-512F (+ AVX2, FMA, F16C).
///
/// # Safety
///
/// The CPU supports avx512f, avx2, fma and f16c (`dispatch` checks
/// `Isa::Avx512.is_supported()`).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn run_avx512<K: SimdKernel>(kernel: K) -> K::Output {
    kernel.run::<Avx512>()
}

// SAFETY (every `unsafe {}` in the two impls below, one justification for the group): each
// method is an `unsafe fn` under the `Simd` trait contract (cpu/mod.rs): it runs only on a
// CPU with the ISA, because `dispatch` checked `Isa::is_supported` before entering
// `run_avx2`/`run_avx512`, the only callers of `Kernel::run::<Avx2/Avx512>`; and each
// pointer argument is valid for F32_LANES/F64_LANES elements (the loads/stores read or
// write exactly that many: 8 or 4 for AVX2, 16 or 8 for AVX-512; f16/bf16 loads read 16 or
// 32 bytes = F32_LANES halves). The blocks only forward those guarantees to the intrinsics;
// the few that spill a vector to memory do so into a local array of at least one vector.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Simd for Avx2 {
    type F32 = __m256;
    type F64 = __m256d;
    const F32_LANES: usize = 8;
    const F64_LANES: usize = 4;
    #[inline(always)]
    unsafe fn f32_load(p: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn f32_store(p: *mut f32, v: __m256) {
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn f32_splat(x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn f32_fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn f32_mul(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_add(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f16_load(p: *const f16) -> __m256 {
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn f16_store(p: *mut f16, v: __m256) {
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(p as *mut __m128i, h)
        }
    }
    #[inline(always)]
    unsafe fn bf16_load(p: *const bf16) -> __m256 {
        unsafe {
            let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
        }
    }
    #[inline(always)]
    unsafe fn bf16_store(p: *mut bf16, v: __m256) {
        unsafe {
            // round to nearest even on the top 16 bits; NaN becomes a quiet NaN
            let bits = _mm256_castps_si256(v);
            let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
            let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff));
            let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
            let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(0x40));
            let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
            let chosen = _mm256_blendv_epi8(rounded, quiet, is_nan);
            let packed = _mm256_packus_epi32(chosen, chosen);
            let ordered = _mm256_permute4x64_epi64::<0b1000>(packed);
            _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(ordered))
        }
    }
    #[inline(always)]
    unsafe fn f64_load(p: *const f64) -> __m256d {
        unsafe { _mm256_loadu_pd(p) }
    }
    #[inline(always)]
    unsafe fn f64_store(p: *mut f64, v: __m256d) {
        unsafe { _mm256_storeu_pd(p, v) }
    }
    #[inline(always)]
    unsafe fn f64_splat(x: f64) -> __m256d {
        unsafe { _mm256_set1_pd(x) }
    }
    #[inline(always)]
    unsafe fn f64_fma(a: __m256d, b: __m256d, c: __m256d) -> __m256d {
        unsafe { _mm256_fmadd_pd(a, b, c) }
    }
    #[inline(always)]
    unsafe fn f64_mul(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_mul_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_add(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_add_pd(a, b) }
    }
    // (a.re·x.re − a.im·x.im, a.re·x.im + a.im·x.re) per pair: fmaddsub subtracts in even
    // lanes and adds in odd ones; conj(a)·x flips both signs with fmsubadd.
    #[inline(always)]
    unsafe fn f32_cmul(a: __m256, x: __m256) -> __m256 {
        unsafe {
            let swapped = _mm256_permute_ps::<0b1011_0001>(x);
            _mm256_fmaddsub_ps(
                _mm256_moveldup_ps(a),
                x,
                _mm256_mul_ps(_mm256_movehdup_ps(a), swapped),
            )
        }
    }
    #[inline(always)]
    unsafe fn f32_cmul_conj(a: __m256, x: __m256) -> __m256 {
        unsafe {
            let swapped = _mm256_permute_ps::<0b1011_0001>(x);
            _mm256_fmsubadd_ps(
                _mm256_moveldup_ps(a),
                x,
                _mm256_mul_ps(_mm256_movehdup_ps(a), swapped),
            )
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul(a: __m256d, x: __m256d) -> __m256d {
        unsafe {
            let swapped = _mm256_permute_pd::<0b0101>(x);
            let im = _mm256_permute_pd::<0b1111>(a);
            _mm256_fmaddsub_pd(_mm256_movedup_pd(a), x, _mm256_mul_pd(im, swapped))
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul_conj(a: __m256d, x: __m256d) -> __m256d {
        unsafe {
            let swapped = _mm256_permute_pd::<0b0101>(x);
            let im = _mm256_permute_pd::<0b1111>(a);
            _mm256_fmsubadd_pd(_mm256_movedup_pd(a), x, _mm256_mul_pd(im, swapped))
        }
    }
    #[inline(always)]
    unsafe fn f32_exp(x: __m256) -> __m256 {
        use super::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
        unsafe {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(EXP_LO)),
                _mm256_set1_ps(EXP_HI),
            );
            let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(
                k,
                _mm256_set1_ps(LN2_LO),
                _mm256_fnmadd_ps(k, _mm256_set1_ps(LN2_HI), x),
            );
            let mut p = _mm256_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(k),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
        }
    }
    #[inline(always)]
    unsafe fn f32_exp2(x: __m256) -> __m256 {
        use super::{EXP2_HI, EXP2_LO, EXP2_POLY, EXP2_ROUND};
        unsafe {
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(EXP2_LO)),
                _mm256_set1_ps(EXP2_HI),
            );
            let round = _mm256_set1_ps(EXP2_ROUND);
            let t = _mm256_add_ps(x, round);
            let r = _mm256_sub_ps(x, _mm256_sub_ps(t, round));
            let mut p = _mm256_set1_ps(EXP2_POLY[0]);
            for c in &EXP2_POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
            }
            let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_castps_si256(t),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
        }
    }
    #[inline(always)]
    unsafe fn f32_exp2_x4(x: [__m256; 4]) -> [__m256; 4] {
        use super::{EXP2_HI, EXP2_LO, EXP2_POLY, EXP2_ROUND};
        // f32_exp2's steps, each applied to the four vectors before the next
        unsafe {
            let (lo, hi) = (_mm256_set1_ps(EXP2_LO), _mm256_set1_ps(EXP2_HI));
            let x = x.map(|v| _mm256_min_ps(_mm256_max_ps(v, lo), hi));
            let round = _mm256_set1_ps(EXP2_ROUND);
            let t = x.map(|v| _mm256_add_ps(v, round));
            let r: [__m256; 4] =
                std::array::from_fn(|i| _mm256_sub_ps(x[i], _mm256_sub_ps(t[i], round)));
            let mut p = [_mm256_set1_ps(EXP2_POLY[0]); 4];
            for c in &EXP2_POLY[1..] {
                let c = _mm256_set1_ps(*c);
                for i in 0..4 {
                    p[i] = _mm256_fmadd_ps(p[i], r[i], c);
                }
            }
            let bias = _mm256_set1_epi32(127);
            std::array::from_fn(|i| {
                let scale =
                    _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_castps_si256(t[i]), bias));
                _mm256_mul_ps(p[i], _mm256_castsi256_ps(scale))
            })
        }
    }
    #[inline(always)]
    unsafe fn f64_exp2(x: __m256d) -> __m256d {
        unsafe {
            let mut lanes = [0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), x);
            for v in &mut lanes {
                *v = v.exp2();
            }
            _mm256_loadu_pd(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f64_exp(x: __m256d) -> __m256d {
        unsafe {
            let mut lanes = [0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), x);
            for v in &mut lanes {
                *v = v.exp();
            }
            _mm256_loadu_pd(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f32_div(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_div(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_div_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_max(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_max(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_max_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_min(a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_min(a: __m256d, b: __m256d) -> __m256d {
        unsafe { _mm256_min_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_sum4(x: [__m256; 4]) -> [f32; 4] {
        // folds upper halves onto lower halves (the default's order), four inputs at once
        unsafe {
            // 256 -> 128 bits: [x0 folded | x1 folded], [x2 | x3]
            // (written out: a closure would not inherit the target features)
            let t01 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(x[0], x[1]),
                _mm256_permute2f128_ps::<0x31>(x[0], x[1]),
            );
            let t23 = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(x[2], x[3]),
                _mm256_permute2f128_ps::<0x31>(x[2], x[3]),
            );
            // 128 -> 64: per 128-bit block [x0, x0, x2, x2] and [x1, x1, x3, x3]
            let u = _mm256_add_ps(
                _mm256_shuffle_ps::<0x44>(t01, t23),
                _mm256_shuffle_ps::<0xEE>(t01, t23),
            );
            // 64 -> 32
            let w = _mm256_add_ps(u, _mm256_permute_ps::<0xB1>(u));
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), w);
            [out[0], out[4], out[2], out[6]]
        }
    }
    #[inline(always)]
    unsafe fn f32_mask_gt(a: __m256, b: __m256) -> u32 {
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b)) as u32 }
    }
    #[inline(always)]
    unsafe fn f64_mask_gt(a: __m256d, b: __m256d) -> u32 {
        unsafe { _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_GT_OQ>(a, b)) as u32 }
    }
    #[inline(always)]
    unsafe fn f32_mask_nle(a: __m256, b: __m256) -> u32 {
        unsafe { _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(a, b)) as u32 }
    }
    #[inline(always)]
    unsafe fn f64_mask_nle(a: __m256d, b: __m256d) -> u32 {
        unsafe { _mm256_movemask_pd(_mm256_cmp_pd::<_CMP_NLE_UQ>(a, b)) as u32 }
    }
}

// SAFETY: see the group comment above `impl Simd for Avx2`.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Simd for Avx512 {
    type F32 = __m512;
    type F64 = __m512d;
    const F32_LANES: usize = 16;
    const F64_LANES: usize = 8;
    const WIDE_TILES: bool = true;
    #[inline(always)]
    unsafe fn f32_load(p: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn f32_store(p: *mut f32, v: __m512) {
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn f32_splat(x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn f32_fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn f32_mul(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_add(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f16_load(p: *const f16) -> __m512 {
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn f16_store(p: *mut f16, v: __m512) {
        unsafe {
            let h = _mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_si256(p as *mut __m256i, h)
        }
    }
    #[inline(always)]
    unsafe fn bf16_load(p: *const bf16) -> __m512 {
        unsafe {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
    #[inline(always)]
    unsafe fn bf16_store(p: *mut bf16, v: __m512) {
        unsafe {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(0x40));
            let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let chosen = _mm512_mask_blend_epi32(is_nan, rounded, quiet);
            _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(chosen))
        }
    }
    #[inline(always)]
    unsafe fn f64_load(p: *const f64) -> __m512d {
        unsafe { _mm512_loadu_pd(p) }
    }
    #[inline(always)]
    unsafe fn f64_store(p: *mut f64, v: __m512d) {
        unsafe { _mm512_storeu_pd(p, v) }
    }
    #[inline(always)]
    unsafe fn f64_splat(x: f64) -> __m512d {
        unsafe { _mm512_set1_pd(x) }
    }
    #[inline(always)]
    unsafe fn f64_fma(a: __m512d, b: __m512d, c: __m512d) -> __m512d {
        unsafe { _mm512_fmadd_pd(a, b, c) }
    }
    #[inline(always)]
    unsafe fn f64_mul(a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_mul_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_add(a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_add_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_cmul(a: __m512, x: __m512) -> __m512 {
        unsafe {
            let swapped = _mm512_permute_ps::<0b1011_0001>(x);
            _mm512_fmaddsub_ps(
                _mm512_moveldup_ps(a),
                x,
                _mm512_mul_ps(_mm512_movehdup_ps(a), swapped),
            )
        }
    }
    #[inline(always)]
    unsafe fn f32_cmul_conj(a: __m512, x: __m512) -> __m512 {
        unsafe {
            let swapped = _mm512_permute_ps::<0b1011_0001>(x);
            _mm512_fmsubadd_ps(
                _mm512_moveldup_ps(a),
                x,
                _mm512_mul_ps(_mm512_movehdup_ps(a), swapped),
            )
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul(a: __m512d, x: __m512d) -> __m512d {
        unsafe {
            let swapped = _mm512_permute_pd::<0b0101_0101>(x);
            let im = _mm512_permute_pd::<0b1111_1111>(a);
            _mm512_fmaddsub_pd(_mm512_movedup_pd(a), x, _mm512_mul_pd(im, swapped))
        }
    }
    #[inline(always)]
    unsafe fn f64_cmul_conj(a: __m512d, x: __m512d) -> __m512d {
        unsafe {
            let swapped = _mm512_permute_pd::<0b0101_0101>(x);
            let im = _mm512_permute_pd::<0b1111_1111>(a);
            _mm512_fmsubadd_pd(_mm512_movedup_pd(a), x, _mm512_mul_pd(im, swapped))
        }
    }
    #[inline(always)]
    unsafe fn f32_exp(x: __m512) -> __m512 {
        use super::{EXP_HI, EXP_LO, EXP_POLY, LN2_HI, LN2_LO};
        unsafe {
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(EXP_LO)),
                _mm512_set1_ps(EXP_HI),
            );
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm512_fnmadd_ps(
                k,
                _mm512_set1_ps(LN2_LO),
                _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_HI), x),
            );
            let mut p = _mm512_set1_ps(EXP_POLY[0]);
            for c in &EXP_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            // p·2^k in one instruction (the same bits as building 2^k and multiplying)
            _mm512_scalef_ps(p, k)
        }
    }
    #[inline(always)]
    unsafe fn f32_exp2(x: __m512) -> __m512 {
        use super::{EXP2_HI, EXP2_LO, EXP2_POLY};
        unsafe {
            let x = _mm512_min_ps(
                _mm512_max_ps(x, _mm512_set1_ps(EXP2_LO)),
                _mm512_set1_ps(EXP2_HI),
            );
            // k = x rounded to nearest even, as EXP2_ROUND gives on the other ISAs; then
            // p·2^k by scalef: two instructions fewer, the same bits
            let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let r = _mm512_sub_ps(x, k);
            let mut p = _mm512_set1_ps(EXP2_POLY[0]);
            for c in &EXP2_POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
            }
            _mm512_scalef_ps(p, k)
        }
    }
    #[inline(always)]
    unsafe fn f64_exp2(x: __m512d) -> __m512d {
        unsafe {
            let mut lanes = [0f64; 8];
            _mm512_storeu_pd(lanes.as_mut_ptr(), x);
            for v in &mut lanes {
                *v = v.exp2();
            }
            _mm512_loadu_pd(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f64_exp(x: __m512d) -> __m512d {
        unsafe {
            let mut lanes = [0f64; 8];
            _mm512_storeu_pd(lanes.as_mut_ptr(), x);
            for v in &mut lanes {
                *v = v.exp();
            }
            _mm512_loadu_pd(lanes.as_ptr())
        }
    }
    #[inline(always)]
    unsafe fn f32_div(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_div(a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_div_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_max(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_max(a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_max_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_min(a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn f64_min(a: __m512d, b: __m512d) -> __m512d {
        unsafe { _mm512_min_pd(a, b) }
    }
    #[inline(always)]
    unsafe fn f32_sum4(x: [__m512; 4]) -> [f32; 4] {
        // folds upper halves onto lower halves (the default's order), four inputs at once
        unsafe {
            // 512 -> 256 bits: [x0 folded | x1 folded], [x2 | x3]
            // (written out: a closure would not inherit the target features)
            let t01 = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x[0], x[1]),
                _mm512_shuffle_f32x4::<0xEE>(x[0], x[1]),
            );
            let t23 = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x[2], x[3]),
                _mm512_shuffle_f32x4::<0xEE>(x[2], x[3]),
            );
            // 256 -> 128: one 128-bit block per input
            let u = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(t01, t23),
                _mm512_shuffle_f32x4::<0xDD>(t01, t23),
            );
            // 128 -> 64 -> 32 within each block
            let v = _mm512_add_ps(u, _mm512_permute_ps::<0x4E>(u));
            let w = _mm512_add_ps(v, _mm512_permute_ps::<0xB1>(v));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), w);
            [out[0], out[4], out[8], out[12]]
        }
    }
    #[inline(always)]
    unsafe fn f32_mask_gt(a: __m512, b: __m512) -> u32 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b) as u32 }
    }
    #[inline(always)]
    unsafe fn f64_mask_gt(a: __m512d, b: __m512d) -> u32 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_GT_OQ>(a, b) as u32 }
    }
    #[inline(always)]
    unsafe fn f32_mask_nle(a: __m512, b: __m512) -> u32 {
        unsafe { _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(a, b) as u32 }
    }
    #[inline(always)]
    unsafe fn f64_mask_nle(a: __m512d, b: __m512d) -> u32 {
        unsafe { _mm512_cmp_pd_mask::<_CMP_NLE_UQ>(a, b) as u32 }
    }
}
