// Shared device helpers: accumulator types and element conversions.
// Lines of the form `#define NK_<NAME> <integer>` in any kernels/*.cuh are exported by
// build.rs as Rust constants (crate::cuda::config::NK_<NAME>), so launch geometry is
// defined once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The type kernels accumulate in: f32 for f32/f16/bf16, f64 for f64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
