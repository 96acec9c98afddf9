// The sparse top-k family on the GPU, part one: topk.rows, sae.decode, and the per-row
// merge of key lists that the fused encoders of kernels/sae.cu end with.
//
// Selection works on 64-bit order keys (kernels/select.cuh). A block keeps candidates in
// shared memory above a threshold key; when the buffer could overflow it is sorted
// (bitonic, descending) and cut to k, and the k-th key becomes the threshold.
// Smallest-first (topk.rows with largest = false) negates values and gives NaN the order 0,
// below every number.
//
// topk.rows: one block per row, NK_TOPK_THREADS elements per step (coalesced), bound by the
// read of x once the threshold has risen (few candidates pass). topk_keys: the same over
// rows of keys (the per-split top-k lists of the encoders), writing keys.
//
// sae.decode: one block per output row, threads over Dm (coalesced rows of w_dec), the k
// selected rows summed in order: deterministic.
#include "common.cuh"
#include "select.cuh"
#include "topk.cuh"

namespace {

constexpr int TPB = NK_TOPK_THREADS;

// The best k of n keys, key_of(i) giving the i-th (0 for none), into keys[0, k) descending;
// one block.
template <typename KeyOf>
__device__ void block_topk(KeyOf key_of, long long n, int k, nk_key* keys) {
  constexpr int CAP = NK_TOPK_CAPACITY;
  __shared__ int count;
  __shared__ nk_key threshold;
  if (threadIdx.x == 0) {
    count = 0;
    threshold = 0;  // open: every real key is > 0
  }
  __syncthreads();
  for (long long base = 0; base < n; base += TPB) {
    const long long i = base + threadIdx.x;
    if (i < n) {
      const nk_key key = key_of(i);
      if (key > threshold) {
        const int slot = atomicAdd(&count, 1);
        keys[slot] = key;
      }
    }
    __syncthreads();
    // every thread reads count before any appends again: a thread that read it after a
    // faster one's next atomicAdd could enter compact (and its barriers) alone
    const int filled = count;
    __syncthreads();
    if (filled + TPB > CAP) compact(keys, CAP, &count, &threshold, k, threadIdx.x, TPB, BlockSync{});
  }
  compact(keys, CAP, &count, &threshold, k, threadIdx.x, TPB, BlockSync{});
}

template <typename T>
__device__ void topk_rows(const T* x, T* values, int* indices, int n, int k, int largest) {
  __shared__ nk_key keys[NK_TOPK_CAPACITY];
  const long long row = blockIdx.x;
  const T* xr = x + row * (long long)n;
  block_topk(
      [&](long long i) {
        const float v = to_acc(xr[i]);
        const unsigned order = largest ? order_bits(v) : ((v != v) ? 0u : order_bits(-v));
        return make_key(order, (unsigned)i);
      },
      n, k, keys);
  for (int j = threadIdx.x; j < k; j += blockDim.x) {
    const nk_key key = keys[j];
    const unsigned order = (unsigned)(key >> 32);
    float v;
    if (largest) {
      v = from_order_bits(order);
    } else {
      v = order == 0u ? __int_as_float(0x7fc00000) : -from_order_bits(order);
    }
    values[row * k + j] = from_acc<T>(v);
    indices[row * k + j] = key_index(key);
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
      sae_decode_##SUFFIX(const int* indices, const T* values, const T* w, const T* b_dec, T* out, int k, int dm) { \
    sae_decode<T>(indices, values, w, b_dec, out, k, dm);                                                           \
  }

NK_TOPK_ENTRIES(f32, float)
NK_TOPK_ENTRIES(f16, __half)
NK_TOPK_ENTRIES(bf16, __nv_bfloat16)

// Per row, the best k of `per_row` keys (the encoders' per-split lists) into out [rows, k].
extern "C" __global__ void __launch_bounds__(TPB) topk_keys(const nk_key* in, nk_key* out, long long per_row, int k) {
  __shared__ nk_key keys[NK_TOPK_CAPACITY];
  const long long row = blockIdx.x;
  const nk_key* src = in + row * per_row;
  block_topk([&](long long i) { return src[i]; }, per_row, k, keys);
  for (int j = threadIdx.x; j < k; j += blockDim.x) out[row * k + j] = keys[j];
}
