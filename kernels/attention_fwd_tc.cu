// attention.forward on tensor cores for f16/bf16, head dims up to 128 (FlashAttention-2
// structure, mma.sync.m16n8k16 with f32 accumulation); the SIMT kernels of
// attention_fwd.cu keep f32, f64, head dims 192/256 and the split-KV decode.
//
// A block (4 warps) owns NK_ATTN_TC_ROWS = 64 query rows of one head and sequence; each warp
// owns 16 of them. Q, K and V tiles are staged in shared memory in their 16-bit type (rows
// padded by 8 elements: the fragment loads below are free of bank conflicts). Per key tile:
// S = Q·Kᵀ lands in registers in the mma accumulator layout (thread (g, t) = (lane / 4,
// lane % 4) holds rows g and g + 8, columns 2t and 2t + 1 of every 8-key slice), so the
// scale, the score rules (softcap, ALiBi, bias, masks) and the online softmax run on
// registers, with row maxima and sums reduced over the 4 threads of a row (shuffles). The
// accumulator layout of two 8-key slices is exactly the A-operand layout of the next
// product, so P is packed to f16/bf16 in registers and O += P·V follows without shared
// memory. O stays in registers (rows g, g + 8) and is rescaled row by row. Only the key
// range some row of the tile sees is walked (causal/window tiles are skipped).
//
// Numerics as FlashAttention: f32 scores and accumulators, P rounded to the input type for
// the second product; lse in f32.
#include "attention.cuh"

namespace attn {

constexpr int TC_ROWS = NK_ATTN_TC_ROWS;
static_assert(TC_ROWS == 16 * WARPS, "one 16-row mma tile per warp");

// Keys per tile: 64 for head dims up to 64, else 32 (static shared memory under 48 KiB).
template <int DMAX> struct TcCfg {
  static constexpr int BK = DMAX <= 64 ? 64 : 32;
  static constexpr int LD = DMAX + 8;  // padded row, in elements
};

template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// Two 16-bit elements as one register (lo in the low half).
template <typename T> __device__ __forceinline__ unsigned pair(T lo, T hi) {
  const unsigned short a = *reinterpret_cast<unsigned short*>(&lo);
  const unsigned short b = *reinterpret_cast<unsigned short*>(&hi);
  return (unsigned)a | ((unsigned)b << 16);
}

// d (16×8, f32) += a (16×16, row-major) · b (16×8, column-major).
template <typename T> __device__ __forceinline__ void mma16816(float* d, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void mma16816<__half>(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Rows [r0, r0 + n) of a [*, heads, width] tensor (row stride heads·width, head `hh`) into
// s[n][LD] as raw 16-bit elements, zeros past `valid` rows and past `width`.
template <typename T, int DMAX, int LD>
__device__ __forceinline__ void stage(T* s, const T* src, long long first_row, int n, int valid, int heads, int hh,
                                      int width) {
  const T zero = from_acc<T>(0.0f);
  for (int idx = threadIdx.x; idx < n * DMAX; idx += THREADS) {
    const int r = idx / DMAX, c = idx % DMAX;
    T y = zero;
    if (r < valid && c < width) y = src[((first_row + r) * heads + hh) * (long long)width + c];
    s[r * LD + c] = y;
  }
}

template <typename T, int DMAX>
__device__ __forceinline__ void forward_tc(const T* __restrict__ q, const T* __restrict__ k,
                                           const T* __restrict__ v, Rules<float> rules, const int* cu_q,
                                           const int* cu_k, T* __restrict__ o, float* __restrict__ lse, int hq,
                                           int hk, int d, int dv, float scale) {
  constexpr int BK = TcCfg<DMAX>::BK, LD = TcCfg<DMAX>::LD;
  constexpr int NS = BK / 8;    // 8-key slices of S per tile
  constexpr int NO = DMAX / 8;  // 8-column slices of O
  __shared__ __align__(16) T sq[TC_ROWS * LD];
  __shared__ __align__(16) T sk[BK * LD];
  __shared__ __align__(16) T sv[BK * LD];

  const int h = blockIdx.y, h_kv = h / (hq / hk);
  const Segment seg = segment(blockIdx.z, cu_q, cu_k, rules.len_q, rules.len_k);
  const int row0 = blockIdx.x * TC_ROWS;
  if (row0 >= seg.q_len) return;  // uniform over the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int wr = warp * 16;  // the warp's first row in the tile

  stage<T, DMAX, LD>(sq, q, (long long)seg.batch * rules.len_q + seg.q_start + row0, TC_ROWS,
                     seg.q_len - row0, hq, h, d);

  // this thread's two rows: i[0] = row g, i[1] = row g + 8 of the warp's 16
  int row_i[2], lo[2], hi[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_i[r] = row0 + wr + g + 8 * r;
    lo[r] = hi[r] = 0;
    if (row_i[r] < seg.q_len) rules.visible(seg, row_i[r], lo[r], hi[r]);
  }
  int blo, bhi;
  rules.visible_union(seg, row0, min(row0 + TC_ROWS, seg.q_len), blo, bhi);

  float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, lsum[2] = {0.0f, 0.0f};
  float acc[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;

  const long long kv_row0 = (long long)seg.batch * rules.len_k + seg.k_start;
  for (int j0 = blo; j0 < bhi; j0 += BK) {
    __syncthreads();  // the last tile is consumed (and sq is written, the first time)
    stage<T, DMAX, LD>(sk, k, kv_row0 + j0, BK, bhi - j0, hk, h_kv, d);
    stage<T, DMAX, LD>(sv, v, kv_row0 + j0, BK, bhi - j0, hk, h_kv, dv);
    __syncthreads();

    // S = Q·Kᵀ for the warp's 16 rows and the tile's BK keys
    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < DMAX / 16; ++kk) {
      const T* qa = sq + (wr + g) * LD + 16 * kk + 2 * t;
      const unsigned a[4] = {*reinterpret_cast<const unsigned*>(qa),
                             *reinterpret_cast<const unsigned*>(qa + 8 * LD),
                             *reinterpret_cast<const unsigned*>(qa + 8),
                             *reinterpret_cast<const unsigned*>(qa + 8 * LD + 8)};
#pragma unroll
      for (int n = 0; n < NS; ++n) {
        const T* kb = sk + (8 * n + g) * LD + 16 * kk + 2 * t;
        const unsigned b[2] = {*reinterpret_cast<const unsigned*>(kb), *reinterpret_cast<const unsigned*>(kb + 8)};
        mma16816<T>(s[n], a, b);
      }
    }

    // scale, rules and masks; the online softmax of rows g (e < 2) and g + 8 (e >= 2)
    float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, key = j0 + 8 * n + 2 * t + (e & 1);
        float x = -CUDART_INF_F;
        if (key < bhi && key >= lo[r] && key < hi[r]) {
          float capd;
          x = rules.apply(scale * s[n][e], seg, row_i[r], h, key, capd);
        }
        s[n][e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // the 4 threads of a row are lanes 4g .. 4g + 3
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(FULL, tile_max[r], 2));
      const float m_new = fmaxf(m[r], tile_max[r]);
      corr[r] = m_new == -CUDART_INF_F ? 1.0f : __expf(m[r] - m_new);  // 0 when m was -inf
      m[r] = m_new;
      lsum[r] *= corr[r];
    }
#pragma unroll
    for (int n = 0; n < NS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const float p = m[r] == -CUDART_INF_F ? 0.0f : __expf(s[n][e] - m[r]);  // 0 for masked keys
        s[n][e] = p;
        lsum[r] += p;
      }
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      acc[n][0] *= corr[0];
      acc[n][1] *= corr[0];
      acc[n][2] *= corr[1];
      acc[n][3] *= corr[1];
    }

    // O += P·V: two 8-key slices of P (accumulator layout) are one A operand
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const unsigned a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const T* vb = sv + (16 * kk + 2 * t) * LD + g;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        const T* col = vb + 8 * n;
        const unsigned b[2] = {pair<T>(col[0], col[LD]), pair<T>(col[8 * LD], col[9 * LD])};
        mma16816<T>(acc[n], a, b);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lsum[r];
    l += __shfl_xor_sync(FULL, l, 1);
    l += __shfl_xor_sync(FULL, l, 2);
    const int i = row_i[r];
    if (i >= seg.q_len) continue;
    const long long row = (long long)seg.batch * rules.len_q + seg.q_start + i;  // packed row
    const bool seen = l > 0.0f;
    const float inv = seen ? 1.0f / l : 0.0f;
#pragma unroll
    for (int n = 0; n < NO; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * n + 2 * t + e;
        if (c < dv) o[(row * hq + h) * dv + c] = from_acc<T>(acc[n][2 * r + e] * inv);
      }
    if (t == 0)
      lse[((long long)seg.batch * hq + h) * rules.len_q + seg.q_start + i] =
          seen ? m[r] + logf(l) : -CUDART_INF_F;
  }
}

}  // namespace attn

// Same arguments as attn_fwd_d*_* (attention_fwd.cu), so the host swaps the name only; the
// split-KV buffers and n_chunks are unused (the host runs the decode on the SIMT kernels).
#define NK_ATTN_TC_ENTRY(T, NAME, DMAX)                                                                \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS) attn_fwd_tc_d##DMAX##_##NAME(           \
      const T* q, const T* k, const T* v, const float* slopes, const float* bias, int bias_batch,      \
      int bias_heads, const int* cu_q, const int* cu_k, T* o, float* lse, float* part_o,               \
      float* part_ml, int batch, int len_q, int len_k, int hq, int hk, int d, int dv, float scale,    \
      float softcap, int causal, long long window_left, long long window_right, int n_chunks) {       \
    const attn::Rules<float> rules{causal, window_left, window_right, softcap, slopes, bias,           \
                                   bias_batch, bias_heads, len_q, len_k};                             \
    attn::forward_tc<T, DMAX>(q, k, v, rules, cu_q, cu_k, o, lse, hq, hk, d, dv, scale);              \
  }

#define NK_ATTN_TC_TYPE(T, NAME) \
  NK_ATTN_TC_ENTRY(T, NAME, 32)  \
  NK_ATTN_TC_ENTRY(T, NAME, 64)  \
  NK_ATTN_TC_ENTRY(T, NAME, 96)  \
  NK_ATTN_TC_ENTRY(T, NAME, 128)

NK_ATTN_TC_TYPE(__half, f16)
NK_ATTN_TC_TYPE(__nv_bfloat16, bf16)
