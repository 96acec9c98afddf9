//! The one-lane "vector" ISA: plain Rust, always built. Multiply-add is unfused here (no FMA
//! is assumed), so it differs from the SIMD paths by rounding only.

use super::Simd;
use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
use half::{bf16, f16};
use std::cmp::Ordering;

#[derive(Clone, Copy)]
pub struct Scalar;

// SAFETY (every `unsafe {}` in this impl, one justification for the group): the only unsafe
// operations are the one-element reads and writes of the load/store methods, whose pointer
// the `Simd` trait contract (cpu/mod.rs) requires to be valid for F32_LANES = F64_LANES = 1
// element. No ISA is needed.
#[allow(clippy::undocumented_unsafe_blocks)]
impl Simd for Scalar {
    type F32 = f32;
    type F64 = f64;
    const F32_LANES: usize = 1;
    const F64_LANES: usize = 1;
    #[inline(always)]
    unsafe fn f32_load(p: *const f32) -> f32 {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn f32_store(p: *mut f32, v: f32) {
        unsafe { *p = v }
    }
    #[inline(always)]
    unsafe fn f32_splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn f32_fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn f32_mul(a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    unsafe fn f32_add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    unsafe fn f16_load(p: *const f16) -> f32 {
        f16_to_f32(unsafe { *p })
    }
    #[inline(always)]
    unsafe fn f16_store(p: *mut f16, v: f32) {
        unsafe { *p = f32_to_f16(v) }
    }
    #[inline(always)]
    unsafe fn bf16_load(p: *const bf16) -> f32 {
        bf16_to_f32(unsafe { *p })
    }
    #[inline(always)]
    unsafe fn bf16_store(p: *mut bf16, v: f32) {
        unsafe { *p = f32_to_bf16(v) }
    }
    #[inline(always)]
    unsafe fn f64_load(p: *const f64) -> f64 {
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn f64_store(p: *mut f64, v: f64) {
        unsafe { *p = v }
    }
    #[inline(always)]
    unsafe fn f64_splat(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    unsafe fn f64_fma(a: f64, b: f64, c: f64) -> f64 {
        a * b + c
    }
    #[inline(always)]
    unsafe fn f64_mul(a: f64, b: f64) -> f64 {
        a * b
    }
    #[inline(always)]
    unsafe fn f64_add(a: f64, b: f64) -> f64 {
        a + b
    }
    // One lane holds no complex pair: complex kernels never take the vector path on this
    // ISA (they check lanes >= 2), so these are the real products and are not called.
    #[inline(always)]
    unsafe fn f32_cmul(a: f32, x: f32) -> f32 {
        a * x
    }
    #[inline(always)]
    unsafe fn f32_cmul_conj(a: f32, x: f32) -> f32 {
        a * x
    }
    #[inline(always)]
    unsafe fn f64_cmul(a: f64, x: f64) -> f64 {
        a * x
    }
    #[inline(always)]
    unsafe fn f64_cmul_conj(a: f64, x: f64) -> f64 {
        a * x
    }
    #[inline(always)]
    unsafe fn f32_exp(x: f32) -> f32 {
        super::exp_f32(x)
    }
    #[inline(always)]
    unsafe fn f64_exp(x: f64) -> f64 {
        x.exp()
    }
    #[inline(always)]
    unsafe fn f32_exp2(x: f32) -> f32 {
        super::exp2_f32(x)
    }
    #[inline(always)]
    unsafe fn f64_exp2(x: f64) -> f64 {
        x.exp2()
    }
    #[inline(always)]
    unsafe fn f32_div(a: f32, b: f32) -> f32 {
        a / b
    }
    #[inline(always)]
    unsafe fn f64_div(a: f64, b: f64) -> f64 {
        a / b
    }
    #[inline(always)]
    unsafe fn f32_max(a: f32, b: f32) -> f32 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn f64_max(a: f64, b: f64) -> f64 {
        a.max(b)
    }
    #[inline(always)]
    unsafe fn f32_min(a: f32, b: f32) -> f32 {
        a.min(b)
    }
    #[inline(always)]
    unsafe fn f64_min(a: f64, b: f64) -> f64 {
        a.min(b)
    }
    #[inline(always)]
    unsafe fn f32_mask_gt(a: f32, b: f32) -> u32 {
        (a > b) as u32
    }
    #[inline(always)]
    unsafe fn f64_mask_gt(a: f64, b: f64) -> u32 {
        (a > b) as u32
    }
    #[inline(always)]
    unsafe fn f32_mask_nle(a: f32, b: f32) -> u32 {
        // not (a <= b): true for NaN on either side
        !matches!(a.partial_cmp(&b), Some(Ordering::Less | Ordering::Equal)) as u32
    }
    #[inline(always)]
    unsafe fn f64_mask_nle(a: f64, b: f64) -> u32 {
        // not (a <= b): true for NaN on either side
        !matches!(a.partial_cmp(&b), Some(Ordering::Less | Ordering::Equal)) as u32
    }
}
