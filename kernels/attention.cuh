// Launch geometry and limits of kernels/attention_fwd.cu and kernels/attention_bwd.cu,
// exported to Rust by build.rs, plus the device helpers both files share.
#pragma once
// Threads per block of every attention kernel (4 warps).
#define NK_ATTN_THREADS 128
// Forward: query rows per block (4 per warp).
#define NK_ATTN_FWD_ROWS 16
// top_keys: query rows per block (one per warp) and the largest `top` it keeps.
#define NK_ATTN_TOP_ROWS 4
#define NK_ATTN_MAX_TOP 128
// Backward: keys per block of the dK/dV kernel and query rows per block of the dQ kernel.
#define NK_ATTN_BWD_KEYS 8
#define NK_ATTN_BWD_ROWS 8
// Head dims are padded up to a kernel instantiation of 32, 64, 96, 128, 192 or 256.
#define NK_ATTN_MAX_DIM 256
// Tensor-core forward (attention_fwd_tc.cu, f16/bf16): query rows per block (16 per warp)
// and the largest padded head dim it takes.
#define NK_ATTN_TC_ROWS 64
#define NK_ATTN_TC_MAX_DIM 128
// Split-KV decode: keys per chunk, and the query rows per KV head (Sq·Hq/Hk) at most for
// which it is chosen (as on the CPU).
#define NK_ATTN_SPLIT_CHUNK 512
#define NK_ATTN_DECODE_ROWS 16

#include "common.cuh"
#include <math_constants.h>

namespace attn {

constexpr int THREADS = NK_ATTN_THREADS;
constexpr int WARPS = THREADS / 32;
constexpr unsigned FULL = 0xffffffffu;
// Static shared memory per block (no opt-in needed).
constexpr int SMEM_BUDGET = 48 * 1024;

// The largest of 32, 16, 8, 4, 2, 1 that is <= n (1 when n < 1).
constexpr int pow2_tile(int n) {
  return n >= 32 ? 32 : n >= 16 ? 16 : n >= 8 ? 8 : n >= 4 ? 4 : n >= 2 ? 2 : 1;
}

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
  return x;
}
template <typename A> __device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(FULL, x, o));
  return x;
}

// One sequence: its batch row and its query and key rows along the S axes.
struct Segment {
  int batch, q_start, q_len, k_start, k_len;
};

// Sequence `s` of the call: from cu_seqlens (packed, batch 0) or the batch row s.
__device__ __forceinline__ Segment segment(int s, const int* cu_q, const int* cu_k, int len_q,
                                           int len_k) {
  Segment g;
  if (cu_q != nullptr) {
    g.batch = 0;
    g.q_start = cu_q[s];
    g.q_len = cu_q[s + 1] - g.q_start;
    g.k_start = cu_k[s];
    g.k_len = cu_k[s + 1] - g.k_start;
  } else {
    g.batch = s;
    g.q_start = 0;
    g.q_len = len_q;
    g.k_start = 0;
    g.k_len = len_k;
  }
  return g;
}

// The score rules after scale·q·k (CASES.md order: softcap, ALiBi, bias, then the masks).
// Windows arrive clamped to [-1, Sq + Sk] by the host, so no sum below overflows.
template <typename A> struct Rules {
  int causal;
  long long window_left, window_right;  // -1 = unbounded
  A softcap;                            // 0 = off
  const A* slopes;                      // [Hq] or null
  const A* bias;                        // [Bb, Hb, Sq, Sk] or null
  int bias_batch, bias_heads;
  int len_q, len_k;  // the full S axes (bias indexing)

  // Keys [lo, hi) (sequence-local) that query row i of g sees; lo = hi = 0 for none.
  __device__ __forceinline__ void visible(const Segment& g, int i, int& lo, int& hi) const {
    const long long diag = (long long)i + g.k_len - g.q_len;
    long long h = g.k_len, l = 0;
    if (causal) h = min(h, diag + 1);
    if (window_right >= 0) h = min(h, diag + window_right + 1);
    if (window_left >= 0) l = max(l, diag - window_left);
    if (l >= h) {
      lo = 0;
      hi = 0;
    } else {
      lo = (int)l;
      hi = (int)h;
    }
  }

  // The union [lo, hi) of the keys that rows [r0, r1) of g see (lo = hi = 0 for none).
  __device__ __forceinline__ void visible_union(const Segment& g, int r0, int r1, int& lo,
                                                int& hi) const {
    lo = 0x7fffffff;
    hi = 0;
    for (int i = r0; i < r1; ++i) {
      int a, b;
      visible(g, i, a, b);
      if (a < b) {
        lo = min(lo, a);
        hi = max(hi, b);
      }
    }
    if (lo >= hi) lo = hi = 0;
  }

  // The final score of `s` = scale·q·k for query row i (head h) and key j of g; with
  // softcap, `capd` receives 1 - tanh² (the derivative the backward needs).
  __device__ __forceinline__ A apply(A s, const Segment& g, int i, int h, int j, A& capd) const {
    capd = A(1);
    if (softcap != A(0)) {
      const A t = tanh_acc(s / softcap);
      s = softcap * t;
      capd = A(1) - t * t;
    }
    if (slopes != nullptr) {
      const long long dist = (long long)i + g.k_len - g.q_len - j;
      s -= slopes[h] * (A)(dist < 0 ? -dist : dist);
    }
    if (bias != nullptr) {
      const long long bb = bias_batch == 1 ? 0 : g.batch;
      const long long hb = bias_heads == 1 ? 0 : h;
      s += bias[((bb * bias_heads + hb) * len_q + g.q_start + i) * (long long)len_k + g.k_start + j];
    }
    return s;
  }
};

}  // namespace attn
