//! CPU SIMD dispatch: the instruction set is detected once at run time and cached; a scalar
//! path is always built. `NEUROKERNELS_FORCE_SCALAR=1` or [`set_force_scalar`] makes
//! [`Isa::active`] answer [`Isa::Scalar`], so tests and users can compare the two paths.
//!
//! Kernels are written once, generic over a [`Simd`] token, and entered through
//! `dispatch`, which calls them inside a `#[target_feature]` function so the generic body
//! (all `#[inline(always)]`) is compiled for that ISA (the matrixmultiply/gemm pattern).

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16tiles;
mod convert;
#[cfg(target_arch = "x86_64")]
pub(crate) mod dpbf16;
pub(crate) mod gemm;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
pub(crate) mod scratch;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "x86_64")]
pub use amx::set_amx_enabled;
pub use convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// Process-wide switch for the AMX paths; there is no AMX off x86-64, so this does nothing.
#[cfg(not(target_arch = "x86_64"))]
pub fn set_amx_enabled(_on: bool) {}

#[cfg(target_arch = "x86_64")]
pub use dpbf16::set_bf16_screen_enabled;

/// Process-wide switch for the AVX512-BF16 screening; there is no AVX512-BF16 off x86-64, so
/// this does nothing.
#[cfg(not(target_arch = "x86_64"))]
pub fn set_bf16_screen_enabled(_on: bool) {}

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// A CPU instruction set the kernels have a path for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, one lane; always available.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C: 8 f32 lanes.
    Avx2,
    /// x86-64 AVX-512F: 16 f32 lanes.
    Avx512,
    /// aarch64 NEON: 4 f32 lanes.
    Neon,
}

static FORCE_SCALAR: Switch = Switch::new("NEUROKERNELS_FORCE_SCALAR");

/// Process-wide switch: when on, [`Isa::active`] is [`Isa::Scalar`] whatever the CPU has.
/// Same effect as the environment variable `NEUROKERNELS_FORCE_SCALAR=1`.
pub fn set_force_scalar(on: bool) {
    FORCE_SCALAR.set(on);
}

/// A process-wide flag turned on by its setter or by an environment variable (any value but
/// empty or "0", read once): the crate's switches (forced scalar path, no AMX, no bf16
/// screening) all work this way.
pub(crate) struct Switch {
    set: AtomicBool,
    env: &'static str,
    from_env: OnceLock<bool>,
}

impl Switch {
    pub(crate) const fn new(env: &'static str) -> Self {
        Self {
            set: AtomicBool::new(false),
            env,
            from_env: OnceLock::new(),
        }
    }

    pub(crate) fn set(&self, on: bool) {
        self.set.store(on, Ordering::Relaxed);
    }

    pub(crate) fn is_on(&self) -> bool {
        self.set.load(Ordering::Relaxed)
            || *self.from_env.get_or_init(|| {
                std::env::var(self.env)
                    .map(|v| !v.is_empty() && v != "0")
                    .unwrap_or(false)
            })
    }
}

/// The largest CPU cache of this machine (the last level, shared), in bytes, as Linux's
/// sysfs reports it for cpu 0 (read once); `None` where the system does not say.
pub(crate) fn last_level_cache_bytes() -> Option<usize> {
    static BYTES: OnceLock<Option<usize>> = OnceLock::new();
    *BYTES.get_or_init(|| {
        let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
        dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("size")).ok())
            .filter_map(|size| parse_cache_size(&size))
            .max()
    })
}

/// A sysfs cache size such as "2048K", "32M" or "512" (bytes).
fn parse_cache_size(text: &str) -> Option<usize> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    digits.parse::<usize>().ok()?.checked_mul(scale)
}

impl Isa {
    /// The best ISA this CPU supports (detected once).
    pub fn detected() -> Isa {
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            [Isa::Avx512, Isa::Avx2, Isa::Neon]
                .into_iter()
                .find(|isa| isa.is_supported())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// The ISA kernels use: [`Isa::detected`], unless scalar is forced.
    pub fn active() -> Isa {
        if FORCE_SCALAR.is_on() {
            Isa::Scalar
        } else {
            Isa::detected()
        }
    }

    /// Every ISA this CPU can run, scalar first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Whether this CPU can run `self` (AVX2 and AVX-512 also need FMA and F16C, AVX-512
    /// also AVX2); scalar always can.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            // avx2 too: `run_avx512` enables it (every AVX-512F CPU has it, but the
            // `#[target_feature]` contract needs it checked, not assumed)
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// `Err` if this CPU cannot run `self`.
    pub fn check(self) -> Result<Isa> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(Error::Unsupported(format!(
                "ISA {} on this CPU",
                self.name()
            )))
        }
    }

    /// The lowercase name: `"scalar"`, `"avx2"`, `"avx512"` or `"neon"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }
}

/// Vector operations of one ISA, as a zero-sized token type. Loads and stores are
/// unaligned; `*_LANES` elements are read or written per call.
///
/// # Safety
///
/// Every method is an `unsafe fn` with the same contract:
/// - the CPU supports the implementing ISA. Inside the crate this holds because the methods
///   are only reached through [`SimdKernel::run`], which [`dispatch`] enters for an ISA only
///   after [`Isa::is_supported`] said yes (the scalar token needs nothing);
/// - a pointer argument is valid for reads (loads) or writes (stores) of `F32_LANES`
///   (f32/f16/bf16 methods) or `F64_LANES` (f64 methods) consecutive elements, and derived
///   from the whole buffer it points into (not from a reference to one element).
///
/// Register-only methods (arithmetic, compares) have no requirement beyond the first.
#[doc(hidden)]
pub trait Simd: Copy + 'static {
    type F32: Copy;
    type F64: Copy;
    const F32_LANES: usize;
    const F64_LANES: usize;
    /// Whether register tiles of 6 rows × 4 vectors (24 accumulators, 29 live registers)
    /// fit the register file: true with 32 vector registers (AVX-512). NEON has 32 too but
    /// keeps the 6 × 2 tiles until it is measured on such a machine.
    const WIDE_TILES: bool = false;
    unsafe fn f32_load(p: *const f32) -> Self::F32;
    unsafe fn f32_store(p: *mut f32, v: Self::F32);
    unsafe fn f32_splat(x: f32) -> Self::F32;
    unsafe fn f32_fma(a: Self::F32, b: Self::F32, c: Self::F32) -> Self::F32;
    unsafe fn f32_mul(a: Self::F32, b: Self::F32) -> Self::F32;
    unsafe fn f32_add(a: Self::F32, b: Self::F32) -> Self::F32;
    unsafe fn f16_load(p: *const f16) -> Self::F32;
    unsafe fn f16_store(p: *mut f16, v: Self::F32);
    unsafe fn bf16_load(p: *const bf16) -> Self::F32;
    unsafe fn bf16_store(p: *mut bf16, v: Self::F32);
    unsafe fn f64_load(p: *const f64) -> Self::F64;
    unsafe fn f64_store(p: *mut f64, v: Self::F64);
    unsafe fn f64_splat(x: f64) -> Self::F64;
    unsafe fn f64_fma(a: Self::F64, b: Self::F64, c: Self::F64) -> Self::F64;
    unsafe fn f64_mul(a: Self::F64, b: Self::F64) -> Self::F64;
    unsafe fn f64_add(a: Self::F64, b: Self::F64) -> Self::F64;
    /// Complex products on interleaved (re, im) lane pairs: a·x and conj(a)·x. Only used
    /// where a vector holds whole pairs (F32_LANES/F64_LANES >= 2); the one-lane scalar ISA
    /// handles complex numbers in its channel loop instead.
    unsafe fn f32_cmul(a: Self::F32, x: Self::F32) -> Self::F32;
    unsafe fn f32_cmul_conj(a: Self::F32, x: Self::F32) -> Self::F32;
    unsafe fn f64_cmul(a: Self::F64, x: Self::F64) -> Self::F64;
    unsafe fn f64_cmul_conj(a: Self::F64, x: Self::F64) -> Self::F64;
    /// e^x per lane: relative error under 2e-7 for f32 (range reduction to
    /// [-ln2/2, ln2/2], degree-6 polynomial); inputs below -87.3 give (nearly) zero, above
    /// 88.7 are clamped. f64 lanes use the scalar `f64::exp`.
    unsafe fn f32_exp(x: Self::F32) -> Self::F32;
    unsafe fn f64_exp(x: Self::F64) -> Self::F64;
    /// 2^x per lane: relative error under 3e-7 for f32 (x = k + r by adding and subtracting
    /// 1.5·2^23, so r in [-1/2, 1/2] exactly; degree-5 minimax polynomial); inputs are
    /// clamped to [-126, 127]. Fewer multiplies than [`Simd::f32_exp`]: kernels that can
    /// fold log2(e) into an operand they scale anyway use this one. f64 lanes use `f64::exp2`.
    unsafe fn f32_exp2(x: Self::F32) -> Self::F32;
    unsafe fn f64_exp2(x: Self::F64) -> Self::F64;
    /// [`Simd::f32_exp2`] of four vectors, each lane bit-identical to it. ISAs override it to
    /// issue the four evaluations step by step side by side: one evaluation is a chain of
    /// ~13 dependent operations, and the out-of-order window alone does not overlap enough
    /// of them (measured on AVX2: 2.5 vs 3.0 ns per vector in an isolated selective-scan
    /// loop; ~3% in the whole selective scan).
    ///
    /// The default spells the four calls out: a closure (`x.map(..)`) is a function of its
    /// own that does not inherit the `#[target_feature]` of the kernel it sits in, so its
    /// vector intrinsics are not inlined (AVX-512's selective scan ran 16× slower so).
    #[inline(always)]
    unsafe fn f32_exp2_x4(x: [Self::F32; 4]) -> [Self::F32; 4] {
        // SAFETY: register-only calls on this ISA, which the caller guarantees (trait contract).
        unsafe {
            [
                Self::f32_exp2(x[0]),
                Self::f32_exp2(x[1]),
                Self::f32_exp2(x[2]),
                Self::f32_exp2(x[3]),
            ]
        }
    }
    #[inline(always)]
    unsafe fn f64_exp2_x4(x: [Self::F64; 4]) -> [Self::F64; 4] {
        // SAFETY: as f32_exp2_x4.
        unsafe {
            [
                Self::f64_exp2(x[0]),
                Self::f64_exp2(x[1]),
                Self::f64_exp2(x[2]),
                Self::f64_exp2(x[3]),
            ]
        }
    }
    /// The lane sums of four vectors, each folded upper half onto lower half until one lane
    /// is left (lane i + lane i + n/2, then i + n/4, …): ISAs may override it with shuffles
    /// that add in that same order. Kernels that need many dot products at once (the
    /// split-KV decode's scores) reduce four at a time this way instead of one lane at a time.
    #[inline(always)]
    unsafe fn f32_sum4(x: [Self::F32; 4]) -> [f32; 4] {
        let mut buf = [[0f32; 16]; 4];
        for (b, v) in buf.iter_mut().zip(x) {
            // SAFETY: each buffer holds 16 >= F32_LANES values.
            unsafe { Self::f32_store(b.as_mut_ptr(), v) };
        }
        buf.map(|b| fold_halves(b, Self::F32_LANES))
    }
    /// [`Simd::f32_sum4`] for f64 lanes.
    #[inline(always)]
    unsafe fn f64_sum4(x: [Self::F64; 4]) -> [f64; 4] {
        let mut buf = [[0f64; 16]; 4];
        for (b, v) in buf.iter_mut().zip(x) {
            // SAFETY: each buffer holds 16 >= F64_LANES values.
            unsafe { Self::f64_store(b.as_mut_ptr(), v) };
        }
        buf.map(|b| fold_halves(b, Self::F64_LANES))
    }
    unsafe fn f32_div(a: Self::F32, b: Self::F32) -> Self::F32;
    unsafe fn f64_div(a: Self::F64, b: Self::F64) -> Self::F64;
    unsafe fn f32_max(a: Self::F32, b: Self::F32) -> Self::F32;
    unsafe fn f64_max(a: Self::F64, b: Self::F64) -> Self::F64;
    unsafe fn f32_min(a: Self::F32, b: Self::F32) -> Self::F32;
    unsafe fn f64_min(a: Self::F64, b: Self::F64) -> Self::F64;
    /// Bit i set where lane i of `a` > lane i of `b` (false where either is NaN).
    unsafe fn f32_mask_gt(a: Self::F32, b: Self::F32) -> u32;
    unsafe fn f64_mask_gt(a: Self::F64, b: Self::F64) -> u32;
    /// Bit i set where !(a[i] <= b[i]): greater, or either is NaN (a filter that lets NaN
    /// through, and lets everything through against a NaN threshold).
    unsafe fn f32_mask_nle(a: Self::F32, b: Self::F32) -> u32;
    unsafe fn f64_mask_nle(a: Self::F64, b: Self::F64) -> u32;
}

/// The sum of `x[..n]` (n a power of two) folded upper half onto lower half: the order of
/// [`Simd::f32_sum4`].
#[inline(always)]
fn fold_halves<T: Copy + std::ops::Add<Output = T>>(mut x: [T; 16], mut n: usize) -> T {
    while n > 1 {
        n /= 2;
        for i in 0..n {
            x[i] = x[i] + x[i + n];
        }
    }
    x[0]
}

/// Coefficients of e^r ≈ 1 + r + r²/2 + … + r⁶/720 on |r| <= ln2/2, highest first.
pub(crate) const EXP_POLY: [f32; 7] = [
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];
pub(crate) const EXP_LO: f32 = -87.3;
pub(crate) const EXP_HI: f32 = 88.7;
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;

/// 2^r on [-1/2, 1/2], highest degree first: the minimax polynomial for relative error
/// (7.5e-8 in exact arithmetic, under 3e-7 evaluated in f32 with FMA).
pub(crate) const EXP2_POLY: [f32; 6] = [
    1.327_647_2e-3,
    9.675_541e-3,
    5.550_713e-2,
    0.240_221_2,
    0.693_146_94,
    1.000_000_1,
];
pub(crate) const EXP2_LO: f32 = -126.0;
pub(crate) const EXP2_HI: f32 = 127.0;
/// 1.5·2^23: x + this rounds x to an integer k (to nearest, ties to even) and leaves k in the
/// low mantissa bits, so (bits + 127) << 23 is the f32 2^k.
pub(crate) const EXP2_ROUND: f32 = 12_582_912.0;

/// The scalar twin of the vector 2^x (same steps and polynomial; unfused multiply-adds, as a
/// software fma would be slow, so a lane may differ from it in the last bit).
#[inline(always)]
pub(crate) fn exp2_f32(x: f32) -> f32 {
    let x = x.clamp(EXP2_LO, EXP2_HI);
    let t = x + EXP2_ROUND;
    let r = x - (t - EXP2_ROUND);
    let mut p = EXP2_POLY[0];
    for c in &EXP2_POLY[1..] {
        p = p * r + c;
    }
    p * f32::from_bits(t.to_bits().wrapping_add(127) << 23)
}

/// The scalar twin of the vector exp (same reduction and polynomial), so every ISA, the
/// scalar one included, computes the same function.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let k = (x * std::f32::consts::LOG2_E).round();
    let r = x - k * LN2_HI - k * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

pub(crate) use scalar::Scalar;

/// Asks the cache hierarchy for the bytes `[p, p + len)` ahead of use (a hint: no effect on
/// results, never faults). Used where a kernel walks rows far apart in memory, a pattern the
/// hardware prefetchers do not follow.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = len * size_of::<T>();
        let mut at = 0;
        while at < bytes {
            // SAFETY: prefetch is a hint and does not access memory architecturally; the
            // address is formed with wrapping arithmetic and never dereferenced.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>().wrapping_add(at)) };
            at += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// A kernel body, generic over the ISA. `run` must be `#[inline(always)]` (and so must
/// everything its hot loops call) so that it compiles inside [`dispatch`]'s
/// `#[target_feature]` wrappers.
pub(crate) trait SimdKernel {
    type Output;
    fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `kernel` on `isa`. The caller has checked that the CPU supports `isa`
/// ([`Isa::check`]); an unsupported one falls back to scalar rather than faulting.
pub(crate) fn dispatch<K: SimdKernel>(isa: Isa, kernel: K) -> K::Output {
    // Each arm's guard checks with `is_supported` that the CPU has every feature its
    // `#[target_feature]` wrapper enables. This is the one place the crate enters SIMD
    // kernels, so every `Simd` method runs on a CPU that supports its ISA.
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see above (avx2, fma, f16c checked by the guard).
        Isa::Avx2 if Isa::Avx2.is_supported() => unsafe { x86::run_avx2(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: see above (avx512f, avx2, fma, f16c checked by the guard).
        Isa::Avx512 if Isa::Avx512.is_supported() => unsafe { x86::run_avx512(kernel) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: see above (neon checked by the guard).
        Isa::Neon if Isa::Neon.is_supported() => unsafe { neon::run_neon(kernel) },
        _ => kernel.run::<Scalar>(),
    }
}

/// A raw pointer that may cross threads. Kernels use it to let parallel tasks write
/// disjoint, interleaved parts of one output; each use states why the parts are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: the wrapper only carries the address; every dereference is an `unsafe` block at
// the use site, which states why the tasks' parts are disjoint (no data race). T is one of
// the crate's plain numeric types (Send + Sync) wherever it is used.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as Send: sharing the wrapper shares only the address.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer. A method, not `.0`, so closures capture the whole (Send) wrapper.
    #[inline(always)]
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// The read-only counterpart of [`SendPtr`].
#[derive(Clone, Copy)]
pub(crate) struct SendConstPtr<T>(pub *const T);
// SAFETY: as SendPtr; reads through it happen while the source slice is borrowed shared
// by the calling op, so nothing writes the pointee meanwhile.
unsafe impl<T> Send for SendConstPtr<T> {}
// SAFETY: as Send.
unsafe impl<T> Sync for SendConstPtr<T> {}

impl<T> SendConstPtr<T> {
    /// The pointer (see [`SendPtr::get`]).
    #[inline(always)]
    pub fn get(self) -> *const T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cache_size("2048K\n"), Some(2 << 20));
        assert_eq!(parse_cache_size("32M"), Some(32 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size(""), None);
    }

    /// exp (or 2^x with `base2`) over a grid of inputs, on `isa`, through the vector path.
    struct ExpGrid<'a>(&'a mut [f32], bool);
    impl SimdKernel for ExpGrid<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self) {
            let lanes = S::F32_LANES;
            for chunk in self.0.chunks_exact_mut(lanes) {
                // SAFETY: run through `dispatch` (ISA checked); each chunk holds `lanes` values.
                unsafe {
                    let x = S::f32_load(chunk.as_ptr());
                    let y = if self.1 {
                        S::f32_exp2(x)
                    } else {
                        S::f32_exp(x)
                    };
                    S::f32_store(chunk.as_mut_ptr(), y)
                };
            }
        }
    }

    #[test]
    fn vector_exp_is_accurate_on_every_isa() {
        let inputs: Vec<f32> = (0..160_000)
            .map(|i| -87.0 + i as f32 * (175.0 / 160_000.0))
            .collect();
        for isa in Isa::available() {
            let mut got = inputs.clone();
            dispatch(isa, ExpGrid(&mut got, false));
            for (x, y) in inputs.iter().zip(&got) {
                let want = (*x as f64).exp();
                let rel = ((*y as f64) - want).abs() / want;
                assert!(
                    rel < 3e-7,
                    "{isa:?}: exp({x}) = {y}, want {want} (rel {rel:e})"
                );
                if isa == Isa::Scalar {
                    assert_eq!(exp_f32(*x).to_bits(), y.to_bits());
                }
            }
        }
        // far below the range: (nearly) zero, never NaN or negative
        let mut low = vec![-1000.0f32; 16];
        dispatch(Isa::detected(), ExpGrid(&mut low, false));
        assert!(low.iter().all(|v| *v >= 0.0 && *v < 1e-37));
    }

    #[test]
    fn vector_exp2_is_accurate_on_every_isa() {
        // the whole range, with fine steps across a few integers (the reduction's ties)
        let inputs: Vec<f32> = (0..160_000)
            .map(|i| -125.9 + i as f32 * (252.8 / 160_000.0))
            .chain((0..40_000).map(|i| -2.0 + i as f32 / 10_000.0))
            .collect();
        for isa in Isa::available() {
            let mut got = inputs.clone();
            dispatch(isa, ExpGrid(&mut got, true));
            for (x, y) in inputs.iter().zip(&got) {
                let want = (*x as f64).exp2();
                let rel = ((*y as f64) - want).abs() / want;
                assert!(
                    rel < 3e-7,
                    "{isa:?}: 2^{x} = {y}, want {want} (rel {rel:e})"
                );
                let scalar = exp2_f32(*x) as f64;
                assert!(
                    (scalar - want).abs() / want < 3e-7,
                    "scalar 2^{x} = {scalar}"
                );
            }
        }
        // out of range: clamped to 2^-126 (nearly zero) and 2^127, never NaN or infinite
        let mut ends = [vec![-1000.0f32; 16], vec![1000.0f32; 16]].concat();
        dispatch(Isa::detected(), ExpGrid(&mut ends, true));
        assert!(ends[..16].iter().all(|v| *v > 0.0 && *v < 1.2e-38));
        assert!(ends[16..].iter().all(|v| v.is_finite() && *v > 1e38));
    }

    /// f32_exp2_x4 over a grid, four vectors at a time.
    struct Exp2x4<'a>(&'a mut [f32]);
    impl SimdKernel for Exp2x4<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self) {
            let lanes = S::F32_LANES;
            for chunk in self.0.chunks_exact_mut(4 * lanes) {
                // SAFETY: run through `dispatch` (ISA checked); vector i reads and writes
                // lanes i·lanes..(i+1)·lanes of a 4·lanes chunk.
                unsafe {
                    let x = std::array::from_fn(|i| S::f32_load(chunk.as_ptr().add(i * lanes)));
                    for (i, y) in S::f32_exp2_x4(x).into_iter().enumerate() {
                        S::f32_store(chunk.as_mut_ptr().add(i * lanes), y);
                    }
                };
            }
        }
    }

    #[test]
    fn vector_exp2_x4_equals_exp2_bit_for_bit_on_every_isa() {
        let inputs: Vec<f32> = (0..65_536)
            .map(|i| -130.0 + i as f32 * (260.0 / 65_536.0))
            .chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0].repeat(16))
            .collect();
        for isa in Isa::available() {
            let (mut one, mut four) = (inputs.clone(), inputs.clone());
            dispatch(isa, ExpGrid(&mut one, true));
            dispatch(isa, Exp2x4(&mut four));
            for ((x, a), b) in inputs.iter().zip(&one).zip(&four) {
                assert_eq!(a.to_bits(), b.to_bits(), "{isa:?}: 2^{x}");
            }
        }
    }

    /// `f32_sum4`/`f64_sum4` of vectors loaded from `x` (4 × 16 values), per ISA.
    struct Sum4<'a>(&'a [f32], &'a [f64]);
    impl SimdKernel for Sum4<'_> {
        type Output = ([f32; 4], [f64; 4], usize, usize);
        #[inline(always)]
        fn run<S: Simd>(self) -> Self::Output {
            // SAFETY: each of the four loads reads at most 16 values of a 64-value slice.
            unsafe {
                let a = std::array::from_fn(|i| S::f32_load(self.0.as_ptr().add(16 * i)));
                let b = std::array::from_fn(|i| S::f64_load(self.1.as_ptr().add(16 * i)));
                (S::f32_sum4(a), S::f64_sum4(b), S::F32_LANES, S::F64_LANES)
            }
        }
    }

    #[test]
    fn sum4_folds_halves_in_the_documented_order_on_every_isa() {
        // magnitudes far apart, so any other order of the additions changes the bits
        let f32s: Vec<f32> = (0..64)
            .map(|i| {
                (1.0 + i as f32 / 7.0) * [1e-7, 1.0, 1e7, -3e3][i % 4] * 1.37f32.powi(i as i32 % 11)
            })
            .collect();
        let f64s: Vec<f64> = f32s.iter().map(|&x| x as f64 * (1.0 + 1e-12)).collect();
        for isa in Isa::available() {
            let (a, b, f32_lanes, f64_lanes) = dispatch(isa, Sum4(&f32s, &f64s));
            for r in 0..4 {
                let mut x = [0f32; 16];
                x.copy_from_slice(&f32s[16 * r..16 * r + 16]);
                let want = fold_halves(x, f32_lanes);
                assert_eq!(a[r].to_bits(), want.to_bits(), "{isa:?} f32 vector {r}");
                let mut y = [0f64; 16];
                y.copy_from_slice(&f64s[16 * r..16 * r + 16]);
                let want = fold_halves(y, f64_lanes);
                assert_eq!(b[r].to_bits(), want.to_bits(), "{isa:?} f64 vector {r}");
            }
        }
    }
}
