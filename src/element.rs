//! The element types kernels accept (f32, f64, f16, bf16) and the accumulator types they
//! compute in: f32 for f32/f16/bf16, f64 for f64.

use crate::cpu::Simd;
use half::{bf16, f16};
use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Sub};

/// The dtype of a tensor, as named in reference cases and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float (`f32`).
    F32,
    /// 64-bit IEEE float (`f64`).
    F64,
    /// 16-bit IEEE half float ([`f16`](struct@f16)).
    F16,
    /// 16-bit bfloat ([`bf16`]).
    BF16,
}

impl DType {
    /// The lowercase name used in messages and by `Display`: `"f32"`, `"f64"`, `"f16"`, `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Bytes per element: 4, 8, 2 or 2.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The largest finite value: 3.40e38, 1.80e308, 65504 or 3.39e38.
    pub fn max_finite(self) -> f64 {
        match self {
            DType::F32 => f32::MAX as f64,
            DType::F64 => f64::MAX,
            DType::F16 => half::f16::MAX.to_f64(),
            DType::BF16 => half::bf16::MAX.to_f64(),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// An accumulator type (f32 or f64) and its SIMD vector operations for each ISA.
///
/// # Safety
///
/// The `unsafe fn v*` methods forward to the matching [`Simd`] method of `S` and carry its
/// contract (see [`Simd`]): they run only on a CPU that supports `S` (inside `dispatch`),
/// and a pointer is valid for `lanes::<S>()` elements.
pub trait Accum:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Default
    + PartialEq
    + PartialOrd
    + Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    /// 0.0.
    const ZERO: Self;
    /// 1.0.
    const ONE: Self;
    /// The SIMD vector of this accumulator on ISA `S`.
    #[doc(hidden)]
    type V<S: Simd>: Copy;
    #[doc(hidden)]
    fn lanes<S: Simd>() -> usize;
    #[doc(hidden)]
    unsafe fn vload<S: Simd>(p: *const Self) -> Self::V<S>;
    #[doc(hidden)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: Self::V<S>);
    #[doc(hidden)]
    unsafe fn vsplat<S: Simd>(x: Self) -> Self::V<S>;
    /// a * b + c (fused where the ISA has FMA).
    #[doc(hidden)]
    unsafe fn vfma<S: Simd>(a: Self::V<S>, b: Self::V<S>, c: Self::V<S>) -> Self::V<S>;
    #[doc(hidden)]
    unsafe fn vmul<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    #[doc(hidden)]
    unsafe fn vadd<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    /// a·x on interleaved complex pairs.
    #[doc(hidden)]
    unsafe fn vcmul<S: Simd>(a: Self::V<S>, x: Self::V<S>) -> Self::V<S>;
    /// conj(a)·x on interleaved complex pairs.
    #[doc(hidden)]
    unsafe fn vcmul_conj<S: Simd>(a: Self::V<S>, x: Self::V<S>) -> Self::V<S>;
    /// e^x per lane (see [`Simd::f32_exp`]).
    #[doc(hidden)]
    unsafe fn vexp<S: Simd>(x: Self::V<S>) -> Self::V<S>;
    /// 2^x per lane (see [`Simd::f32_exp2`]).
    #[doc(hidden)]
    unsafe fn vexp2<S: Simd>(x: Self::V<S>) -> Self::V<S>;
    /// `vexp2` of four vectors, interleaved (see [`Simd::f32_exp2_x4`]).
    #[doc(hidden)]
    unsafe fn vexp2_x4<S: Simd>(x: [Self::V<S>; 4]) -> [Self::V<S>; 4];
    /// The lane sums of four vectors (see [`Simd::f32_sum4`]).
    #[doc(hidden)]
    unsafe fn vsum4<S: Simd>(x: [Self::V<S>; 4]) -> [Self; 4];
    #[doc(hidden)]
    unsafe fn vdiv<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    #[doc(hidden)]
    unsafe fn vmax<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    #[doc(hidden)]
    unsafe fn vmin<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S>;
    /// Lane bits of a > b (ordered: NaN gives 0).
    #[doc(hidden)]
    unsafe fn vmask_gt<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> u32;
    /// Lane bits of !(a <= b) (NaN on either side gives 1).
    #[doc(hidden)]
    unsafe fn vmask_nle<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> u32;
    /// A value and an index as one unsigned integer ordered as selection ranks them: larger
    /// value first (NaN canonical and above every number, -0.0 equal to 0.0), then lower
    /// index first; the value's bits made monotonic above the complemented index.
    #[doc(hidden)]
    type OrderKey: Ord + Copy + Send + Sync + Debug;
    #[doc(hidden)]
    fn order_key(self, index: u32) -> Self::OrderKey;
    /// The inverse of `order_key` (NaN comes back canonical, -0.0 as 0.0).
    #[doc(hidden)]
    fn from_order_key(key: Self::OrderKey) -> (Self, u32);
    /// The scalar e^x matching `vexp`.
    fn exp(self) -> Self;
    /// The scalar 2^x matching `vexp2`.
    fn exp2(self) -> Self;
    /// `x` converted from f64 (`as` cast: rounded to nearest for f32).
    fn from_f64(x: f64) -> Self;
    /// `self` widened to f64 (exact).
    fn to_f64(self) -> f64;
}

macro_rules! impl_accum {
    ($t:ty, $v:ident, $lanes:ident, $load:ident, $store:ident, $splat:ident, $fma:ident, $mul:ident, $add:ident, $cmul:ident, $cmulc:ident, $exp:ident, $sexp:expr, $exp2:ident, $exp2x4:ident, $sexp2:expr, $sum4:ident, $div:ident, $max:ident, $min:ident, $gt:ident, $nle:ident, $key:ty, $bits:ty) => {
        // SAFETY (every `unsafe {}` in this impl): each `v*` method is an `unsafe fn` that
        // forwards its arguments unchanged to the `Simd` method of the same contract (ISA
        // checked by `dispatch`; pointers valid for `lanes::<S>()` = S::F32_LANES or
        // S::F64_LANES elements of $t), so the caller's guarantee is the callee's.
        #[allow(clippy::undocumented_unsafe_blocks)]
        impl Accum for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            type V<S: Simd> = S::$v;
            #[inline(always)]
            fn lanes<S: Simd>() -> usize {
                S::$lanes
            }
            #[inline(always)]
            unsafe fn vload<S: Simd>(p: *const Self) -> Self::V<S> {
                unsafe { S::$load(p) }
            }
            #[inline(always)]
            unsafe fn vstore<S: Simd>(p: *mut Self, v: Self::V<S>) {
                unsafe { S::$store(p, v) }
            }
            #[inline(always)]
            unsafe fn vsplat<S: Simd>(x: Self) -> Self::V<S> {
                unsafe { S::$splat(x) }
            }
            #[inline(always)]
            unsafe fn vfma<S: Simd>(a: Self::V<S>, b: Self::V<S>, c: Self::V<S>) -> Self::V<S> {
                unsafe { S::$fma(a, b, c) }
            }
            #[inline(always)]
            unsafe fn vmul<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                unsafe { S::$mul(a, b) }
            }
            #[inline(always)]
            unsafe fn vadd<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                unsafe { S::$add(a, b) }
            }
            #[inline(always)]
            unsafe fn vcmul<S: Simd>(a: Self::V<S>, x: Self::V<S>) -> Self::V<S> {
                unsafe { S::$cmul(a, x) }
            }
            #[inline(always)]
            unsafe fn vcmul_conj<S: Simd>(a: Self::V<S>, x: Self::V<S>) -> Self::V<S> {
                unsafe { S::$cmulc(a, x) }
            }
            #[inline(always)]
            unsafe fn vexp<S: Simd>(x: Self::V<S>) -> Self::V<S> {
                unsafe { S::$exp(x) }
            }
            #[inline(always)]
            unsafe fn vexp2<S: Simd>(x: Self::V<S>) -> Self::V<S> {
                unsafe { S::$exp2(x) }
            }
            #[inline(always)]
            unsafe fn vexp2_x4<S: Simd>(x: [Self::V<S>; 4]) -> [Self::V<S>; 4] {
                unsafe { S::$exp2x4(x) }
            }
            #[inline(always)]
            unsafe fn vsum4<S: Simd>(x: [Self::V<S>; 4]) -> [Self; 4] {
                unsafe { S::$sum4(x) }
            }
            #[inline(always)]
            unsafe fn vdiv<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                unsafe { S::$div(a, b) }
            }
            #[inline(always)]
            unsafe fn vmax<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                unsafe { S::$max(a, b) }
            }
            #[inline(always)]
            unsafe fn vmin<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> Self::V<S> {
                unsafe { S::$min(a, b) }
            }
            #[inline(always)]
            unsafe fn vmask_gt<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> u32 {
                unsafe { S::$gt(a, b) }
            }
            #[inline(always)]
            unsafe fn vmask_nle<S: Simd>(a: Self::V<S>, b: Self::V<S>) -> u32 {
                unsafe { S::$nle(a, b) }
            }
            type OrderKey = $key;
            #[inline(always)]
            fn order_key(self, index: u32) -> $key {
                const TOP: u32 = <$bits>::BITS - 1;
                let bits = (self + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
                let order: $bits = if self.is_nan() {
                    <$bits>::MAX
                } else if bits >> TOP == 1 {
                    !bits
                } else {
                    bits | 1 << TOP
                };
                (order as $key) << 32 | (!index) as $key
            }
            #[inline(always)]
            fn from_order_key(key: $key) -> (Self, u32) {
                const TOP: u32 = <$bits>::BITS - 1;
                let order = (key >> 32) as $bits;
                let value = if order == <$bits>::MAX {
                    <$t>::NAN
                } else if order >> TOP == 1 {
                    <$t>::from_bits(order & !(1 << TOP))
                } else {
                    <$t>::from_bits(!order)
                };
                (value, !(key as u32))
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $sexp(self)
            }
            #[inline(always)]
            fn exp2(self) -> Self {
                $sexp2(self)
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_accum!(
    f32,
    F32,
    F32_LANES,
    f32_load,
    f32_store,
    f32_splat,
    f32_fma,
    f32_mul,
    f32_add,
    f32_cmul,
    f32_cmul_conj,
    f32_exp,
    crate::cpu::exp_f32,
    f32_exp2,
    f32_exp2_x4,
    crate::cpu::exp2_f32,
    f32_sum4,
    f32_div,
    f32_max,
    f32_min,
    f32_mask_gt,
    f32_mask_nle,
    u64,
    u32
);
impl_accum!(
    f64,
    F64,
    F64_LANES,
    f64_load,
    f64_store,
    f64_splat,
    f64_fma,
    f64_mul,
    f64_add,
    f64_cmul,
    f64_cmul_conj,
    f64_exp,
    f64::exp,
    f64_exp2,
    f64_exp2_x4,
    f64::exp2,
    f64_sum4,
    f64_div,
    f64_max,
    f64_min,
    f64_mask_gt,
    f64_mask_nle,
    u128,
    u64
);

/// A tensor element type: f32, f64, f16 or bf16. Sealed.
pub trait Element:
    sealed::Sealed
    + crate::dispatch::Kernels
    + Copy
    + Send
    + Sync
    + Default
    + PartialEq
    + Debug
    + bytemuck::Pod
    + 'static
{
    /// The type kernels accumulate in.
    type Acc: Accum;
    /// This type's [`DType`].
    const DTYPE: DType;
    /// `self` widened to the accumulator type (exact).
    fn to_acc(self) -> Self::Acc;
    /// `x` rounded from the accumulator type to this type (to nearest even; identity for
    /// f32 and f64).
    fn from_acc(x: Self::Acc) -> Self;
    /// `self` widened to f64 (exact).
    fn to_f64(self) -> f64;
    /// `x` rounded from f64 to this type (to nearest).
    fn from_f64(x: f64) -> Self;
    /// Loads `Acc::lanes::<S>()` elements, widened to the accumulator.
    ///
    /// # Safety
    ///
    /// As [`Simd`]'s loads: the CPU supports `S`, and `p` is valid for reads of
    /// `Acc::lanes::<S>()` elements of `Self`.
    #[doc(hidden)]
    unsafe fn vload<S: Simd>(p: *const Self) -> <Self::Acc as Accum>::V<S>;
    /// Stores `Acc::lanes::<S>()` elements, rounded to nearest even.
    ///
    /// # Safety
    ///
    /// As [`Simd`]'s stores: the CPU supports `S`, and `p` is valid for writes of
    /// `Acc::lanes::<S>()` elements of `Self`.
    #[doc(hidden)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: <Self::Acc as Accum>::V<S>);
}

impl Element for f32 {
    type Acc = f32;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::F32 {
        // SAFETY: this fn's contract (ISA present, F32_LANES elements readable) is f32_load's.
        unsafe { S::f32_load(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::F32) {
        // SAFETY: this fn's contract is f32_store's.
        unsafe { S::f32_store(p, v) }
    }
}

impl Element for f64 {
    type Acc = f64;
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::F64 {
        // SAFETY: this fn's contract (ISA present, F64_LANES elements readable) is f64_load's.
        unsafe { S::f64_load(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::F64) {
        // SAFETY: this fn's contract is f64_store's.
        unsafe { S::f64_store(p, v) }
    }
}

impl Element for f16 {
    type Acc = f32;
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        crate::cpu::f16_to_f32(self)
    }
    #[inline(always)]
    fn from_acc(x: f32) -> Self {
        crate::cpu::f32_to_f16(x)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        crate::cpu::f16_to_f32(self) as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::F32 {
        // SAFETY: this fn's contract (ISA present, F32_LANES halves readable) is f16_load's.
        unsafe { S::f16_load(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::F32) {
        // SAFETY: this fn's contract is f16_store's.
        unsafe { S::f16_store(p, v) }
    }
}

impl Element for bf16 {
    type Acc = f32;
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        crate::cpu::bf16_to_f32(self)
    }
    #[inline(always)]
    fn from_acc(x: f32) -> Self {
        crate::cpu::f32_to_bf16(x)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        crate::cpu::bf16_to_f32(self) as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    #[inline(always)]
    unsafe fn vload<S: Simd>(p: *const Self) -> S::F32 {
        // SAFETY: this fn's contract (ISA present, F32_LANES values readable) is bf16_load's.
        unsafe { S::bf16_load(p) }
    }
    #[inline(always)]
    unsafe fn vstore<S: Simd>(p: *mut Self, v: S::F32) {
        // SAFETY: this fn's contract is bf16_store's.
        unsafe { S::bf16_store(p, v) }
    }
}

/// `x` as its accumulator type when the element type is its own accumulator (f32, f64);
/// `None` for f16 and bf16. `Some` also tells the caller that `E` and `E::Acc` are one type.
pub(crate) fn as_acc<E: Element>(x: &[E]) -> Option<&[E::Acc]> {
    if matches!(E::DTYPE, DType::F32 | DType::F64) {
        debug_assert_eq!(size_of::<E>(), size_of::<E::Acc>());
        // SAFETY: f32 and f64 are their own accumulator types (see the impls above), so E and
        // E::Acc are the same type here.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<E::Acc>(), x.len()) })
    } else {
        None
    }
}

/// `x` in its accumulator type: borrowed for f32 and f64, a widened copy for f16 and bf16
/// (converted in parallel when large).
pub(crate) fn widened<E: Element>(x: &[E]) -> std::borrow::Cow<'_, [E::Acc]> {
    use rayon::prelude::*;
    if let Some(same) = as_acc(x) {
        std::borrow::Cow::Borrowed(same)
    } else if x.len() >= 1 << 16 {
        std::borrow::Cow::Owned(x.par_iter().map(|v| v.to_acc()).collect())
    } else {
        std::borrow::Cow::Owned(x.iter().map(|v| v.to_acc()).collect())
    }
}
