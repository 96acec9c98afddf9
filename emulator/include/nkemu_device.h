// nkemu_device.h: the CUDA device model as host C++. `nkcc` force-includes it before a
// kernels/*.cu compiled for the host. Each CUDA thread of a block is a fiber of the host
// thread that runs the launch; static `__shared__` variables are `thread_local` (one copy per
// host thread, and a host thread runs one block at a time), poisoned by the runtime before
// every block; barriers and warp collectives are cooperative switches into the scheduler
// (src/runtime.cpp), which checks that every thread of the block (or lane of the mask) meets
// them. Every call that can fail carries its source site for the error message.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "nkemu_abi.h"

// ---- qualifiers (crt/host_defines.h maps them to GNU attributes for host code) ----
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__ __attribute__((used, visibility("default")))
#define __device__
#define __host__
#define __constant__ const
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
// A block-scope thread_local is implicitly static: one copy per host thread = per running
// block. Dynamic `extern __shared__ T x[];` is rewritten by nkcc into a pointer to the
// launch's dynamic shared memory.
#define __shared__ thread_local
// nkcc reads the bound from the preprocessed source (NKEMU_SCAN_BOUNDS); otherwise nothing.
#ifdef NKEMU_SCAN_BOUNDS
#define __launch_bounds__(...) nkemu_launch_bounds(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif

#define threadIdx (::nkemu::tl_thread_idx)
#define blockIdx (::nkemu::tl_block_idx)
#define blockDim (::nkemu::tl_block_dim)
#define gridDim (::nkemu::tl_grid_dim)
#define warpSize 32
#define NKEMU_HERE (::nkemu::Site{__FILE__, __LINE__})

#define __syncthreads() ::nkemu::sync_block(NKEMU_HERE)
#define __syncwarp(...) ::nkemu::sync_warp_default(NKEMU_HERE, ##__VA_ARGS__)
#define __shfl_sync(...) ::nkemu::shfl_idx(NKEMU_HERE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::nkemu::shfl_xor(NKEMU_HERE, __VA_ARGS__)
#define __shfl_down_sync(...) ::nkemu::shfl_down(NKEMU_HERE, __VA_ARGS__)
#define __shfl_up_sync(...) ::nkemu::shfl_up(NKEMU_HERE, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::nkemu::ballot(NKEMU_HERE, (mask), (pred))
#define __any_sync(mask, pred) (::nkemu::ballot(NKEMU_HERE, (mask), (pred)) != 0u)
#define __all_sync(mask, pred) (::nkemu::ballot(NKEMU_HERE, (mask), (pred)) == (unsigned)(mask))

namespace nkemu {
inline void sync_warp_default(Site s, unsigned mask = 0xffffffffu) { sync_warp(s, mask); }

template <typename T> inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a shuffle moves at most 8 bytes");
  unsigned long long b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(unsigned long long b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
// Every lane of `mask` publishes v, then reads lane `src`'s (its own where src is out of range).
template <typename T> inline T shfl_from(Site s, unsigned mask, T v, int src) {
  return from_bits<T>(warp_exchange(s, mask, to_bits(v), src));
}
inline int segment_base(int width) { return (int)tl_lane & ~(width - 1); }
template <typename T> inline T shfl_idx(Site s, unsigned mask, T v, int src, int width = 32) {
  return shfl_from(s, mask, v, segment_base(width) + (src & (width - 1)));
}
template <typename T> inline T shfl_xor(Site s, unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = (int)tl_lane;
  int src = lane ^ lane_mask;
  if (src >= segment_base(width) + width) src = lane;
  return shfl_from(s, mask, v, src);
}
template <typename T> inline T shfl_down(Site s, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)tl_lane;
  int src = lane + (int)delta;
  if (src >= segment_base(width) + width) src = lane;
  return shfl_from(s, mask, v, src);
}
template <typename T> inline T shfl_up(Site s, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = (int)tl_lane;
  int src = lane - (int)delta;
  if (src < segment_base(width)) src = lane;
  return shfl_from(s, mask, v, src);
}
}  // namespace nkemu

// ---- integer and bit intrinsics ----
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline float __int_as_float(int x) { return nkemu::from_bits<float>((unsigned)x); }
inline float __uint_as_float(unsigned x) { return nkemu::from_bits<float>(x); }
inline int __float_as_int(float x) { return (int)nkemu::to_bits(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)nkemu::to_bits(x); }
inline double __longlong_as_double(long long x) { return nkemu::from_bits<double>((unsigned long long)x); }
inline long long __double_as_longlong(double x) { return (long long)nkemu::to_bits(x); }

// ---- atomics: the fibers of a block share one host thread, but two launches on two host
// threads may share memory, so these are real atomic instructions ----
template <typename T> inline T atomicAdd(T* p, T v) {
  if constexpr (std::is_floating_point<T>::value) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED), want;
    do {
      want = old + v;
    } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
  }
}
template <typename T> inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
template <typename T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
template <typename T> inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T> inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T> inline T atomicCAS(T* p, T cmp, T v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- math: CUDA's device overloads of min/max; fast-math and explicitly rounded ops ----
template <typename A, typename B> inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B> inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)a < (C)b ? (C)b : (C)a;
}
// The GPU's __expf/__logf are approximations (ex2.approx/lg2.approx, ~2 ulp); the host takes
// the correctly rounded libm function, so tests compare with tolerances.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
// Round-to-nearest ops are IEEE on both sides; nkcc compiles with -ffp-contract=off so that
// a*b+c stays two roundings on the host, as nvcc keeps it for these intrinsics.
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

#include "nkemu_mma.h"
