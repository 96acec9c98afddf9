// Exact top-k selection on 64-bit order keys, shared by kernels/topk.cu and kernels/sae.cu.
//
// A key is the value's f32 bits made monotonic (NaN canonical and on top, -0.0 as 0.0)
// above the complemented index, so "better" is one integer compare, ties go to the lower
// index, and the top k of a set is unique: candidates may arrive in any order and the
// result is still deterministic. Key 0 is below every real key (the complemented index of
// a real entry is never 0), so it marks an empty slot.
#pragma once

typedef unsigned long long nk_key;

__device__ __forceinline__ unsigned order_bits(float v) {
  if (v != v) return 0xffffffffu;
  const unsigned bits = __float_as_uint(v + 0.0f);  // -0.0 + 0.0 = +0.0
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_order_bits(unsigned order) {
  if (order == 0xffffffffu) return __int_as_float(0x7fc00000);
  return (order >> 31) ? __uint_as_float(order & 0x7fffffffu) : __uint_as_float(~order);
}

__device__ __forceinline__ nk_key make_key(unsigned order, unsigned index) {
  return ((nk_key)order << 32) | (nk_key)(~index);
}

__device__ __forceinline__ float key_value(nk_key key) { return from_order_bits((unsigned)(key >> 32)); }
__device__ __forceinline__ int key_index(nk_key key) { return (int)(~(unsigned)key); }

// Sorts keys[0, n) descending (n a power of two), the `threads` threads numbered `t` from 0
// taking part (a block or a warp); `sync` is that group's barrier.
template <typename Sync>
__device__ __forceinline__ void bitonic_desc(nk_key* keys, int n, int t, int threads, Sync sync) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      sync();
      for (int i = t; i < n / 2; i += threads) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = ((lo & size) == 0);
        const nk_key a = keys[lo], b = keys[hi];
        if ((a < b) == desc) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
    }
  }
  sync();
}

struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};
struct WarpSync {
  __device__ void operator()() const { __syncwarp(); }
};

// Sorts one candidate buffer (`cap` slots, a power of two; slots past *count are cleared to
// 0, the bottom), keeps the best k, and sets the threshold to the k-th key once k are held.
// Called by every thread of the group (t, threads, sync as for bitonic_desc).
template <typename Sync>
__device__ void compact(nk_key* keys, int cap, int* count, nk_key* threshold, int k, int t, int threads, Sync sync) {
  sync();
  const int n = *count;
  for (int i = n + t; i < cap; i += threads) keys[i] = 0;
  bitonic_desc(keys, cap, t, threads, sync);
  if (t == 0) {
    *count = min(n, k);
    if (n >= k) *threshold = keys[k - 1];
  }
  sync();
}
