// The sparse top-k family on the GPU: topk.rows, sae.encode (fused: scores never stored)
// and sae.decode.
//
// Selection, as on the CPU (src/topk/select.rs), works on 64-bit order keys: the value's
// f32 bits made monotonic (NaN canonical and on top, -0.0 as 0.0) above the complemented
// index, so "better" is one integer compare, ties go to the lower index, and the top k of a
// set is unique: candidates may arrive in any order (atomics) and the output is still
// deterministic. A block keeps candidates in shared memory above a threshold key; when the
// buffer could overflow it is sorted (bitonic, descending) and cut to k, and the k-th key
// becomes the threshold. Smallest-first (topk.rows with largest = false) negates values and
// gives NaN the order 0, below every number.
//
// topk.rows: one block per row, NK_TOPK_THREADS elements per step (coalesced), bound by the
// read of x once the threshold has risen (few candidates pass).
//
// sae.encode (SIMT; no tensor cores yet): one block per NK_TOPK_ENCODE_ROWS rows of x,
// held centered (x - b_dec) in shared memory as f32; each warp takes 8 latents per round,
// its lanes splitting Dm (coalesced reads of w_enc rows), a warp reduction per (row,
// latent), then bias, ReLU and the key filter; a barrier per round of 64 latents keeps the
// per-row buffers from overflowing. Bound: 2·B·L·Dm flops at SIMT rate, w_enc read once per
// block (L2-resident across blocks).
//
// sae.decode: one block per output row, threads over Dm (coalesced rows of w_dec), the k
// selected rows summed in order: deterministic.
#include "common.cuh"
#include "topk.cuh"

namespace {

constexpr int TPB = NK_TOPK_THREADS;
typedef unsigned long long u64;

__device__ __forceinline__ unsigned order_bits(float v) {
  if (v != v) return 0xffffffffu;
  const unsigned bits = __float_as_uint(v + 0.0f);  // -0.0 + 0.0 = +0.0
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float from_order_bits(unsigned order) {
  if (order == 0xffffffffu) return __int_as_float(0x7fc00000);
  return (order >> 31) ? __uint_as_float(order & 0x7fffffffu) : __uint_as_float(~order);
}

__device__ __forceinline__ u64 make_key(unsigned order, unsigned index) {
  return ((u64)order << 32) | (u64)(~index);
}

// Sorts keys[0, n) descending (n a power of two) with all threads of the block.
__device__ void bitonic_desc(u64* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = ((lo & size) == 0);
        const u64 a = keys[lo], b = keys[hi];
        if ((a < b) == desc) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
    }
  }
  __syncthreads();
}

// Sorts the candidates (unused slots hold key 0, the bottom), keeps k, sets the threshold
// to the k-th key when k are held. Called by the whole block.
__device__ void compact(u64* keys, int cap, int* count, u64* threshold, int k) {
  __syncthreads();
  const int n = *count;
  for (int i = n + threadIdx.x; i < cap; i += blockDim.x) keys[i] = 0;
  bitonic_desc(keys, cap);
  if (threadIdx.x == 0) {
    *count = min(n, k);
    if (n >= k) *threshold = keys[k - 1];
  }
  __syncthreads();
}

template <typename T>
__device__ void topk_rows(const T* x, T* values, int* indices, int n, int k, int largest) {
  constexpr int CAP = NK_TOPK_CAPACITY;
  __shared__ u64 keys[CAP];
  __shared__ int count;
  __shared__ u64 threshold;
  const long long row = blockIdx.x;
  const T* xr = x + row * (long long)n;
  if (threadIdx.x == 0) {
    count = 0;
    threshold = 0;  // open: every key is > 0 (the complemented index is never 0)
  }
  __syncthreads();
  for (int base = 0; base < n; base += TPB) {
    const int i = base + threadIdx.x;
    if (i < n) {
      float v = to_acc(xr[i]);
      unsigned order;
      if (largest) {
        order = order_bits(v);
      } else {
        order = (v != v) ? 0u : order_bits(-v);
      }
      const u64 key = make_key(order, (unsigned)i);
      if (key > threshold) {
        const int slot = atomicAdd(&count, 1);
        keys[slot] = key;
      }
    }
    __syncthreads();
    if (count + TPB > CAP) compact(keys, CAP, &count, &threshold, k);
  }
  compact(keys, CAP, &count, &threshold, k);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const u64 key = keys[j];
    const unsigned order = (unsigned)(key >> 32);
    float v;
    if (largest) {
      v = from_order_bits(order);
    } else {
      v = order == 0u ? __int_as_float(0x7fc00000) : -from_order_bits(order);
    }
    values[row * k + j] = from_acc<T>(v);
    indices[row * k + j] = (int)(~(unsigned)key);
  }
}

template <typename T>
__device__ void sae_encode(const T* x, const T* w, const T* b_enc, const T* b_dec, T* values, int* indices,
                           long long batch, int dm, int latents, int k) {
  constexpr int R = NK_TOPK_ENCODE_ROWS, CAP = NK_TOPK_ENCODE_CAPACITY, W = TPB / 32, PER_WARP = 8;
  __shared__ float xs[R][NK_TOPK_ENCODE_MAX_DM];
  __shared__ u64 keys[R][CAP];
  __shared__ int count[R];
  __shared__ u64 threshold[R];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long long row0 = (long long)blockIdx.x * R;
  const int rows = (int)min((long long)R, batch - row0);
  for (int idx = threadIdx.x; idx < R * dm; idx += TPB) {
    const int r = idx / dm, d = idx % dm;
    float v = 0.0f;
    if (r < rows) v = to_acc(x[(row0 + r) * dm + d]) - (b_dec ? to_acc(b_dec[d]) : 0.0f);
    xs[r][d] = v;
  }
  if (threadIdx.x < R) {
    count[threadIdx.x] = 0;
    threshold[threadIdx.x] = 0;
  }
  __syncthreads();
  for (int l0 = 0; l0 < latents; l0 += W * PER_WARP) {
    for (int j = 0; j < PER_WARP; ++j) {
      const int l = l0 + warp * PER_WARP + j;
      if (l >= latents) break;
      const T* wl = w + (long long)l * dm;
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = 0.0f;
      for (int d = lane; d < dm; d += 32) {
        const float wv = to_acc(wl[d]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] = fmaf(xs[r][d], wv, acc[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
      }
      if (lane < rows) {
        // lane r files row r's score: ReLU keeps NaN (it ranks first)
        float s = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) if (r == lane) s = acc[r];
        s += to_acc(b_enc[l]);
        const float z = (s != s) ? s : fmaxf(s, 0.0f);
        const u64 key = make_key(order_bits(z), (unsigned)l);
        if (key > threshold[lane]) {
          const int slot = atomicAdd(&count[lane], 1);
          keys[lane][slot] = key;
        }
      }
    }
    __syncthreads();
    for (int r = 0; r < rows; ++r) {
      if (count[r] + W * PER_WARP > CAP) compact(keys[r], CAP, &count[r], &threshold[r], k);
    }
  }
  for (int r = 0; r < rows; ++r) {
    compact(keys[r], CAP, &count[r], &threshold[r], k);
    for (int j = threadIdx.x; j < k; j += TPB) {
      const u64 key = keys[r][j];
      values[(row0 + r) * k + j] = from_acc<T>(from_order_bits((unsigned)(key >> 32)));
      indices[(row0 + r) * k + j] = (int)(~(unsigned)key);
    }
  }
}

template <typename T>
__device__ void sae_decode(const int* indices, const T* values, const T* w, const T* b_dec, T* out, int k, int dm) {
  using A = typename Acc<T>::type;
  const long long b = blockIdx.x;
  for (int d = threadIdx.x; d < dm; d += TPB) {
    A acc = b_dec ? to_acc(b_dec[d]) : A(0);
    for (int j = 0; j < k; ++j) {
      const long long l = indices[b * k + j];
      acc += to_acc(values[b * k + j]) * to_acc(w[l * dm + d]);
    }
    out[b * dm + d] = from_acc<T>(acc);
  }
}

}  // namespace

#define NK_TOPK_ENTRIES(SUFFIX, T)                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      topk_rows_##SUFFIX(const T* x, T* values, int* indices, int n, int k, int largest) {                          \
    topk_rows<T>(x, values, indices, n, k, largest);                                                                \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_encode_##SUFFIX(const T* x, const T* w, const T* b_enc, const T* b_dec, T* values, int* indices,          \
                          long long batch, int dm, int latents, int k) {                                            \
    sae_encode<T>(x, w, b_enc, b_dec, values, indices, batch, dm, latents, k);                                      \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_decode_##SUFFIX(const int* indices, const T* values, const T* w, const T* b_dec, T* out, int k, int dm) { \
    sae_decode<T>(indices, values, w, b_dec, out, k, dm);                                                           \
  }

NK_TOPK_ENTRIES(f32, float)
NK_TOPK_ENTRIES(f16, __half)
NK_TOPK_ENTRIES(bf16, __nv_bfloat16)
