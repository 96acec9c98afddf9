// attention.backward on the GPU (SIMT, FlashAttention-2 structure, P recomputed from lse;
// every dtype accumulates in Acc<T>). Deterministic: every output element is written by one
// warp, summing in a fixed order, and no kernel uses atomics.
//
// 1. attn_bwd_dot_*: D = rowsum(dO ∘ O) per (query row, head), a warp per pair.
// 2. attn_bwd_dkdv_d*_*: a block owns NK_ATTN_BWD_KEYS keys of one KV head (KR per warp,
//    each lane holding the columns lane + 32t of its keys' K, V, dK and dV in registers) and
//    walks every query head of the GQA group and every query tile that sees one of its keys;
//    query tiles (scaled q, dO, lse, D) pass through shared memory. Per (row, key): s and
//    dP are warp reductions, P = exp(s - lse), dV += P·dO, dS = P·(dP - D) (·(1 - tanh²)
//    with softcap), dK += dS·scale·q.
// 3. attn_bwd_dq_d*_*: a block owns NK_ATTN_BWD_ROWS query rows of one head (QR per warp,
//    q, dO and dQ in registers) and walks the key tiles they see through shared memory:
//    dQ += dS·scale·k.
#include "attention.cuh"

namespace attn {

template <typename T, int DMAX> struct BwdCfg {
  using A = typename Acc<T>::type;
  static constexpr int DT = DMAX / 32;
  static constexpr int KR = NK_ATTN_BWD_KEYS / WARPS;  // keys per warp
  static constexpr int QR = NK_ATTN_BWD_ROWS / WARPS;  // rows per warp (dQ)
  // query rows per shared tile of the dK/dV kernel (q and dO)
  static constexpr int QT = pow2_tile((SMEM_BUDGET - 4096) / (2 * DMAX * (int)sizeof(A)));
  // keys per shared tile of the dQ kernel (K and V)
  static constexpr int BK = pow2_tile(SMEM_BUDGET / (2 * DMAX * (int)sizeof(A)));
};

// D = rowsum(dO ∘ O) into dsum [B, Hq, Sq]. Grid: ceil(B·Sq·Hq / WARPS).
template <typename T>
__device__ __forceinline__ void bwd_dot(const T* __restrict__ o, const T* __restrict__ d_o,
                                        typename Acc<T>::type* __restrict__ dsum, long long pairs,
                                        int len_q, int hq, int dv) {
  using A = typename Acc<T>::type;
  const long long pair = (long long)blockIdx.x * WARPS + threadIdx.x / 32;  // (b·Sq + i)·Hq + h
  const int lane = threadIdx.x % 32;
  if (pair >= pairs) return;  // uniform over the warp
  A x = A(0);
  for (int c = lane; c < dv; c += 32) x += to_acc(d_o[pair * dv + c]) * to_acc(o[pair * dv + c]);
  x = warp_sum(x);
  const long long h = pair % hq, row = pair / hq, b = row / len_q, i = row % len_q;
  if (lane == 0) dsum[(b * hq + h) * len_q + i] = x;
}

// The columns lane + 32t of row `row` of a [.., width] tensor (zeros past width).
template <typename T, int DT>
__device__ __forceinline__ void load_slice(typename Acc<T>::type (&out)[DT], const T* x,
                                           long long row, int width, int lane,
                                           typename Acc<T>::type mul) {
#pragma unroll
  for (int t = 0; t < DT; ++t) {
    const int c = lane + 32 * t;
    out[t] = c < width ? to_acc(x[row * width + c]) * mul : typename Acc<T>::type(0);
  }
}

template <typename A, int DT> __device__ __forceinline__ A dot_slices(const A (&x)[DT], const A (&y)[DT]) {
  A s = A(0);
#pragma unroll
  for (int t = 0; t < DT; ++t) s = fma(x[t], y[t], s);
  return warp_sum(s);
}

// dK, dV of NK_ATTN_BWD_KEYS keys of KV head blockIdx.y. Grid: (key tiles, Hk, sequences).
template <typename T, int DMAX>
__device__ __forceinline__ void bwd_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                         const T* __restrict__ v, const T* __restrict__ d_o,
                                         const typename Acc<T>::type* __restrict__ lse,
                                         const typename Acc<T>::type* __restrict__ dsum,
                                         Rules<typename Acc<T>::type> rules, const int* cu_q,
                                         const int* cu_k, T* __restrict__ dk, T* __restrict__ dv_out,
                                         int hq, int hk, int d, int dv,
                                         typename Acc<T>::type scale) {
  using Cfg = BwdCfg<T, DMAX>;
  using A = typename Cfg::A;
  constexpr int DT = Cfg::DT, KR = Cfg::KR, QT = Cfg::QT;
  __shared__ A sq[QT][DMAX];
  __shared__ A sdo[QT][DMAX];
  __shared__ A slse[QT], sdsum[QT];

  const int h_kv = blockIdx.y, group = hq / hk;
  const Segment g = segment(blockIdx.z, cu_q, cu_k, rules.len_q, rules.len_k);
  const int key0 = blockIdx.x * NK_ATTN_BWD_KEYS;
  if (key0 >= g.k_len) return;  // uniform over the block
  const int key_end = min(key0 + NK_ATTN_BWD_KEYS, g.k_len);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  A kr[KR][DT], vr[KR][DT], dkr[KR][DT], dvr[KR][DT];
#pragma unroll
  for (int e = 0; e < KR; ++e) {
    const int key = key0 + warp * KR + e;
    const long long row = ((long long)g.batch * rules.len_k + g.k_start + key) * hk + h_kv;
    if (key < key_end) {
      load_slice<T, DT>(kr[e], k, row, d, lane, A(1));
      load_slice<T, DT>(vr[e], v, row, dv, lane, A(1));
    } else {
#pragma unroll
      for (int t = 0; t < DT; ++t) kr[e][t] = vr[e][t] = A(0);
    }
#pragma unroll
    for (int t = 0; t < DT; ++t) dkr[e][t] = dvr[e][t] = A(0);
  }

  for (int h = h_kv * group; h < (h_kv + 1) * group; ++h) {
    for (int row0 = 0; row0 < g.q_len; row0 += QT) {
      const int row_end = min(row0 + QT, g.q_len);
      int lo, hi;
      rules.visible_union(g, row0, row_end, lo, hi);
      if (lo >= hi || hi <= key0 || lo >= key_end) continue;  // uniform: no row sees a key
      __syncthreads();  // the previous tile is consumed
      for (int idx = threadIdx.x; idx < QT * DMAX; idx += THREADS) {
        const int r = idx / DMAX, c = idx % DMAX;
        const int i = row0 + r;
        const long long row = ((long long)g.batch * rules.len_q + g.q_start + i) * hq + h;
        A x = A(0), y = A(0);
        if (i < row_end) {
          if (c < d) x = to_acc(q[row * d + c]) * scale;
          if (c < dv) y = to_acc(d_o[row * dv + c]);
        }
        sq[r][c] = x;
        sdo[r][c] = y;
      }
      for (int r = threadIdx.x; r < QT; r += THREADS) {
        const long long at = ((long long)g.batch * hq + h) * rules.len_q + g.q_start + row0 + r;
        slse[r] = row0 + r < row_end ? lse[at] : neg_inf<A>();
        sdsum[r] = row0 + r < row_end ? dsum[at] : A(0);
      }
      __syncthreads();
      for (int r = 0; r < row_end - row0; ++r) {
        const int i = row0 + r;
        const A l = slse[r];
        if (l == neg_inf<A>()) continue;  // the row saw no key: P = 0
        int vlo, vhi;
        rules.visible(g, i, vlo, vhi);
        A qs[DT], dos[DT];
#pragma unroll
        for (int t = 0; t < DT; ++t) {
          qs[t] = sq[r][lane + 32 * t];
          dos[t] = sdo[r][lane + 32 * t];
        }
#pragma unroll
        for (int e = 0; e < KR; ++e) {
          const int key = key0 + warp * KR + e;
          if (key >= key_end || key < vlo || key >= vhi) continue;  // uniform over the warp
          A capd;
          const A s = rules.apply(dot_slices<A, DT>(qs, kr[e]), g, i, h, key, capd);
          if (s == neg_inf<A>()) continue;
          const A p = exp_acc(s - l);
          const A dp = dot_slices<A, DT>(dos, vr[e]);
          const A ds = p * (dp - sdsum[r]) * capd;
#pragma unroll
          for (int t = 0; t < DT; ++t) {
            dvr[e][t] = fma(p, dos[t], dvr[e][t]);
            dkr[e][t] = fma(ds, qs[t], dkr[e][t]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < KR; ++e) {
    const int key = key0 + warp * KR + e;
    if (key >= key_end) continue;
    const long long row = ((long long)g.batch * rules.len_k + g.k_start + key) * hk + h_kv;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      const int c = lane + 32 * t;
      if (c < d) dk[row * d + c] = from_acc<T>(dkr[e][t]);
      if (c < dv) dv_out[row * dv + c] = from_acc<T>(dvr[e][t]);
    }
  }
}

// dQ of NK_ATTN_BWD_ROWS query rows of head blockIdx.y. Grid: (query tiles, Hq, sequences).
template <typename T, int DMAX>
__device__ __forceinline__ void bwd_dq(const T* __restrict__ q, const T* __restrict__ k,
                                       const T* __restrict__ v, const T* __restrict__ d_o,
                                       const typename Acc<T>::type* __restrict__ lse,
                                       const typename Acc<T>::type* __restrict__ dsum,
                                       Rules<typename Acc<T>::type> rules, const int* cu_q,
                                       const int* cu_k, T* __restrict__ dq, int hq, int hk, int d,
                                       int dv, typename Acc<T>::type scale) {
  using Cfg = BwdCfg<T, DMAX>;
  using A = typename Cfg::A;
  constexpr int DT = Cfg::DT, QR = Cfg::QR, BK = Cfg::BK;
  __shared__ A sk[BK][DMAX];
  __shared__ A sv[BK][DMAX];

  const int h = blockIdx.y, h_kv = h / (hq / hk);
  const Segment g = segment(blockIdx.z, cu_q, cu_k, rules.len_q, rules.len_k);
  const int row0 = blockIdx.x * NK_ATTN_BWD_ROWS;
  if (row0 >= g.q_len) return;  // uniform over the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  A qs[QR][DT], dos[QR][DT], dqr[QR][DT], l[QR], dsum_r[QR];
  int lo[QR], hi[QR];
#pragma unroll
  for (int e = 0; e < QR; ++e) {
    const int i = row0 + warp * QR + e;
    lo[e] = hi[e] = 0;
    l[e] = neg_inf<A>();
    dsum_r[e] = A(0);
#pragma unroll
    for (int t = 0; t < DT; ++t) qs[e][t] = dos[e][t] = dqr[e][t] = A(0);
    if (i < g.q_len) {
      const long long row = ((long long)g.batch * rules.len_q + g.q_start + i) * hq + h;
      load_slice<T, DT>(qs[e], q, row, d, lane, scale);
      load_slice<T, DT>(dos[e], d_o, row, dv, lane, A(1));
      const long long at = ((long long)g.batch * hq + h) * rules.len_q + g.q_start + i;
      l[e] = lse[at];
      dsum_r[e] = dsum[at];
      rules.visible(g, i, lo[e], hi[e]);
    }
  }
  int blo, bhi;
  rules.visible_union(g, row0, min(row0 + NK_ATTN_BWD_ROWS, g.q_len), blo, bhi);

  for (int j0 = blo; j0 < bhi; j0 += BK) {
    __syncthreads();  // the previous tile is consumed
    for (int idx = threadIdx.x; idx < BK * DMAX; idx += THREADS) {
      const int j = idx / DMAX, c = idx % DMAX;
      const int key = j0 + j;
      const long long row = ((long long)g.batch * rules.len_k + g.k_start + key) * hk + h_kv;
      A x = A(0), y = A(0);
      if (key < bhi) {
        if (c < d) x = to_acc(k[row * d + c]);
        if (c < dv) y = to_acc(v[row * dv + c]);
      }
      sk[j][c] = x;
      sv[j][c] = y;
    }
    __syncthreads();
    for (int j = 0; j < BK && j0 + j < bhi; ++j) {
      const int key = j0 + j;
      A ks[DT], vs[DT];
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        ks[t] = sk[j][lane + 32 * t];
        vs[t] = sv[j][lane + 32 * t];
      }
#pragma unroll
      for (int e = 0; e < QR; ++e) {
        const int i = row0 + warp * QR + e;
        // uniform over the warp; a row past the sequence has lo = hi = 0
        if (key < lo[e] || key >= hi[e] || l[e] == neg_inf<A>()) continue;
        A capd;
        const A s = rules.apply(dot_slices<A, DT>(qs[e], ks), g, i, h, key, capd);
        if (s == neg_inf<A>()) continue;
        const A p = exp_acc(s - l[e]);
        const A dp = dot_slices<A, DT>(dos[e], vs);
        const A ds = p * (dp - dsum_r[e]) * capd;
#pragma unroll
        for (int t = 0; t < DT; ++t) dqr[e][t] = fma(ds, ks[t], dqr[e][t]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < QR; ++e) {
    const int i = row0 + warp * QR + e;
    if (i >= g.q_len) continue;
    const long long row = ((long long)g.batch * rules.len_q + g.q_start + i) * hq + h;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
      const int c = lane + 32 * t;
      if (c < d) dq[row * d + c] = from_acc<T>(dqr[e][t] * scale);
    }
  }
}

}  // namespace attn

#define NK_ATTN_BWD_ENTRY(T, NAME, DMAX)                                                               \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_bwd_dkdv_d##DMAX##_##NAME(        \
      const T* q, const T* k, const T* v, const T* d_o, const Acc<T>::type* lse,                      \
      const Acc<T>::type* dsum, const Acc<T>::type* slopes, const Acc<T>::type* bias, int bias_batch, \
      int bias_heads, const int* cu_q, const int* cu_k, T* dk, T* dv_out, int len_q, int len_k,       \
      int hq, int hk, int d, int dv, Acc<T>::type scale, Acc<T>::type softcap, int causal,            \
      long long window_left, long long window_right) {                                                \
    const attn::Rules<Acc<T>::type> rules{causal, window_left, window_right, softcap, slopes, bias,   \
                                          bias_batch, bias_heads, len_q, len_k};                      \
    attn::bwd_dkdv<T, DMAX>(q, k, v, d_o, lse, dsum, rules, cu_q, cu_k, dk, dv_out, hq, hk, d, dv,    \
                            scale);                                                                   \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_bwd_dq_d##DMAX##_##NAME(          \
      const T* q, const T* k, const T* v, const T* d_o, const Acc<T>::type* lse,                      \
      const Acc<T>::type* dsum, const Acc<T>::type* slopes, const Acc<T>::type* bias, int bias_batch, \
      int bias_heads, const int* cu_q, const int* cu_k, T* dq, int len_q, int len_k, int hq, int hk,  \
      int d, int dv, Acc<T>::type scale, Acc<T>::type softcap, int causal, long long window_left,     \
      long long window_right) {                                                                       \
    const attn::Rules<Acc<T>::type> rules{causal, window_left, window_right, softcap, slopes, bias,   \
                                          bias_batch, bias_heads, len_q, len_k};                      \
    attn::bwd_dq<T, DMAX>(q, k, v, d_o, lse, dsum, rules, cu_q, cu_k, dq, hq, hk, d, dv, scale);      \
  }

#define NK_ATTN_BWD_TYPE(T, NAME)                                                                      \
  NK_ATTN_BWD_ENTRY(T, NAME, 32)                                                                       \
  NK_ATTN_BWD_ENTRY(T, NAME, 64)                                                                       \
  NK_ATTN_BWD_ENTRY(T, NAME, 96)                                                                       \
  NK_ATTN_BWD_ENTRY(T, NAME, 128)                                                                      \
  NK_ATTN_BWD_ENTRY(T, NAME, 192)                                                                      \
  NK_ATTN_BWD_ENTRY(T, NAME, 256)                                                                      \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_bwd_dot_##NAME(                   \
      const T* o, const T* d_o, Acc<T>::type* dsum, long long pairs, int len_q, int hq, int dv) {     \
    attn::bwd_dot<T>(o, d_o, dsum, pairs, len_q, hq, dv);                                             \
  }

NK_ATTN_BWD_TYPE(float, f32)
NK_ATTN_BWD_TYPE(double, f64)
NK_ATTN_BWD_TYPE(__half, f16)
NK_ATTN_BWD_TYPE(__nv_bfloat16, bf16)
