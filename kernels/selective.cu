// scan.selective (Mamba-1's fused selective scan), forward.
//
// Plan: one thread owns one (batch, channel) and walks time in order, holding its N states
// and its row of A in registers (N up to the template's NMAX; the Rust side picks the
// smallest instantiation that fits). Threads of a warp take consecutive channels, so the
// loads of u, delta, z and the stores of y are coalesced; Bm[t, :] and Cm[t, :] are the same
// address across the warp (broadcast). Per step and state: one exp, three multiply-adds.
// Bound: the B·T·D·N exponentials; parallelism is B·D threads (no time chunks yet).
// Inputs: sequences in T (f32/f64/f16/bf16); A, Dskip, delta_bias, h0 in the accumulator type.
#include "common.cuh"
#include "selective.cuh"

namespace {

template <typename A>
__device__ __forceinline__ A softplus(A x) {
  return x > A(20) ? x : log1p(exp(x));
}

template <typename A>
__device__ __forceinline__ A silu(A z) {
  return z / (A(1) + exp(-z));
}

template <typename T, int NMAX>
__device__ void selective_forward(const T* u, const T* delta, const typename Acc<T>::type* a, const T* bm,
                                  const T* cm, const typename Acc<T>::type* dskip, const T* z,
                                  const typename Acc<T>::type* delta_bias, const typename Acc<T>::type* h0, T* y,
                                  typename Acc<T>::type* h_last, long long B, long long T_, long long D, int N,
                                  int softplus_on) {
  using A = typename Acc<T>::type;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= B * D) return;
  const long long b = idx / D, d = idx % D;
  A x[NMAX], a_row[NMAX];
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    x[j] = (j < N && h0) ? h0[idx * N + j] : A(0);
    a_row[j] = j < N ? a[d * N + j] : A(0);
  }
  const A bias = delta_bias ? delta_bias[d] : A(0);
  const A skip = dskip ? dskip[d] : A(0);
  for (long long t = 0; t < T_; ++t) {
    const long long at = (b * T_ + t) * D + d;
    const long long bc = (b * T_ + t) * N;
    A dt = to_acc(delta[at]) + bias;
    if (softplus_on) dt = softplus(dt);
    const A uv = to_acc(u[at]);
    const A dtu = dt * uv;
    A out = A(0);
#pragma unroll
    for (int j = 0; j < NMAX; ++j) {
      if (j < N) {
        x[j] = exp(dt * a_row[j]) * x[j] + dtu * to_acc(bm[bc + j]);
        out += to_acc(cm[bc + j]) * x[j];
      }
    }
    out += skip * uv;
    if (z) out *= silu(to_acc(z[at]));
    y[at] = from_acc<T>(out);
  }
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    if (j < N) h_last[idx * N + j] = x[j];
  }
}

}  // namespace

#define NK_SELECTIVE_ENTRY(T, NAME, NMAX)                                                                       \
  extern "C" __global__ void __launch_bounds__(NK_SELECTIVE_THREADS) scan_selective_fwd_n##NMAX##_##NAME(      \
      const T* u, const T* delta, const Acc<T>::type* a, const T* bm, const T* cm, const Acc<T>::type* dskip,   \
      const T* z, const Acc<T>::type* delta_bias, const Acc<T>::type* h0, T* y, Acc<T>::type* h_last,           \
      long long B, long long T_, long long D, int N, int softplus_on) {                                         \
    selective_forward<T, NMAX>(u, delta, a, bm, cm, dskip, z, delta_bias, h0, y, h_last, B, T_, D, N,           \
                               softplus_on);                                                                    \
  }

#define NK_SELECTIVE_ALL_N(T, NAME) \
  NK_SELECTIVE_ENTRY(T, NAME, 4)    \
  NK_SELECTIVE_ENTRY(T, NAME, 16)   \
  NK_SELECTIVE_ENTRY(T, NAME, 64)

NK_SELECTIVE_ALL_N(float, f32)
NK_SELECTIVE_ALL_N(__half, f16)
NK_SELECTIVE_ALL_N(__nv_bfloat16, bf16)
// f64 states take two registers each: 64 of them (plus A's row) would spill
NK_SELECTIVE_ENTRY(double, f64, 4)
NK_SELECTIVE_ENTRY(double, f64, 16)
NK_SELECTIVE_ENTRY(double, f64, 32)
