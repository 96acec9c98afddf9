// attention.forward, its split-KV decode and attention.top_keys on the GPU (SIMT; every
// dtype accumulates in Acc<T>: f32, or f64 for f64).
//
// Forward (FlashAttention-2 structure): a block owns (query tile of NK_ATTN_FWD_ROWS rows,
// query head, sequence); each warp owns 4 rows. The scaled query tile sits in shared
// memory; key and value tiles of BK keys pass through shared memory (K rows padded by one
// element, so lane j reading key j is conflict-free). Lane j scores key j against the
// warp's rows, the online softmax (running max m, per-lane partial sums l) lives in
// registers, and P·V is accumulated with each lane owning the value columns lane + 32t
// (p broadcast by shuffles). Only the key range some row of the tile sees (causal/window
// masks are per-row key intervals) is walked: masked-out tiles are never loaded.
//
// Split-KV decode: the same kernel with the keys cut into chunks of NK_ATTN_SPLIT_CHUNK,
// one block per (query tile, chunk), each writing its unnormalized (O, m, l); the merge
// kernel combines the chunks in chunk order (deterministic).
//
// top_keys: pass 1 is the forward without values (lse only); pass 2 (attn_top_keys_*)
// recomputes the scores with the same arithmetic and keeps each row's `top` best in a
// per-warp sorted list in shared memory (candidates inserted in key order, so ties keep the
// lower key first), then writes p = exp(s - lse).
#include "attention.cuh"

namespace attn {

template <typename T, int DMAX> struct FwdCfg {
  using A = typename Acc<T>::type;
  static constexpr int ROWS = NK_ATTN_FWD_ROWS;
  static constexpr int R = ROWS / WARPS;
  static constexpr int DT = DMAX / 32;
  static constexpr int BK =
      pow2_tile((SMEM_BUDGET - ROWS * DMAX * (int)sizeof(A)) / ((2 * DMAX + 1) * (int)sizeof(A)));
};

// The scaled rows [row0, row0 + ROWS) of query head h of g into sq[ROWS][DMAX], zero-padded
// past the head dim and past the sequence.
template <typename T, int DMAX, int ROWS>
__device__ __forceinline__ void load_queries(typename Acc<T>::type (*sq)[DMAX], const T* q,
                                             const Segment& g, int row0, int h, int len_q,
                                             int hq, int d, typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  for (int idx = threadIdx.x; idx < ROWS * DMAX; idx += THREADS) {
    const int r = idx / DMAX, c = idx % DMAX;
    const int i = row0 + r;
    A x = A(0);
    if (i < g.q_len && c < d)
      x = to_acc(q[(((long long)g.batch * len_q + g.q_start + i) * hq + h) * d + c]) * scale;
    sq[r][c] = x;
  }
}

// Rows [j0, j0 + BK) of head hk of a [B, Sk, Hk, width] tensor into s[BK][STRIDE], zeros
// past `width` and past key `jend` (sequence-local).
template <typename T, int BK, int DMAX, int STRIDE>
__device__ __forceinline__ void load_keys(typename Acc<T>::type (*s)[STRIDE], const T* x,
                                          const Segment& g, int j0, int jend, int hk, int len_k,
                                          int heads_kv, int width) {
  using A = typename Acc<T>::type;
  for (int idx = threadIdx.x; idx < BK * DMAX; idx += THREADS) {
    const int j = idx / DMAX, c = idx % DMAX;
    const int key = j0 + j;
    A y = A(0);
    if (key < jend && c < width)
      y = to_acc(x[(((long long)g.batch * len_k + g.k_start + key) * heads_kv + hk) * width + c]);
    s[j][c] = y;
  }
}

// Forward over one query tile and the keys [chunk·CHUNK, ...) of one chunk (the whole key
// axis when n_chunks = 1). With n_chunks = 1 writes o and lse; otherwise the chunk's
// unnormalized O to part_o [n_chunks, B·Sq, Hq, Dv] and (m, l) to part_ml
// [n_chunks, B·Sq, Hq, 2]. Grid: (query tiles · n_chunks, Hq, sequences).
template <typename T, int DMAX>
__device__ __forceinline__ void forward(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, Rules<typename Acc<T>::type> rules,
                                        const int* cu_q, const int* cu_k, T* __restrict__ o,
                                        typename Acc<T>::type* __restrict__ lse,
                                        typename Acc<T>::type* __restrict__ part_o,
                                        typename Acc<T>::type* __restrict__ part_ml, int batch,
                                        int hq, int hk, int d, int dv,
                                        typename Acc<T>::type scale, int n_chunks) {
  using Cfg = FwdCfg<T, DMAX>;
  using A = typename Cfg::A;
  constexpr int ROWS = Cfg::ROWS, R = Cfg::R, DT = Cfg::DT, BK = Cfg::BK;
  __shared__ A sq[ROWS][DMAX];
  __shared__ A sk[BK][DMAX + 1];
  __shared__ A sv[BK][DMAX];

  const int tile = blockIdx.x / n_chunks, chunk = blockIdx.x % n_chunks;
  const int h = blockIdx.y, h_kv = h / (hq / hk);
  const Segment g = segment(blockIdx.z, cu_q, cu_k, rules.len_q, rules.len_k);
  const int row0 = tile * ROWS;
  if (row0 >= g.q_len) return;  // uniform over the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_queries<T, DMAX, ROWS>(sq, q, g, row0, h, rules.len_q, hq, d, scale);

  int lo[R], hi[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row0 + warp * R + r;
    lo[r] = hi[r] = 0;
    if (i < g.q_len) rules.visible(g, i, lo[r], hi[r]);
  }
  int blo, bhi;
  rules.visible_union(g, row0, min(row0 + ROWS, g.q_len), blo, bhi);
  if (n_chunks > 1) {
    blo = max(blo, chunk * NK_ATTN_SPLIT_CHUNK);
    bhi = min(bhi, (chunk + 1) * NK_ATTN_SPLIT_CHUNK);
  }

  A m[R], lsum[R], acc[R][DT];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = neg_inf<A>();
    lsum[r] = A(0);
#pragma unroll
    for (int t = 0; t < DT; ++t) acc[r][t] = A(0);
  }

  for (int j0 = blo; j0 < bhi; j0 += BK) {
    __syncthreads();  // the previous tile is consumed (and sq is written, first time)
    load_keys<T, BK, DMAX, DMAX + 1>(sk, k, g, j0, bhi, h_kv, rules.len_k, hk, d);
    if (dv > 0) load_keys<T, BK, DMAX, DMAX>(sv, v, g, j0, bhi, h_kv, rules.len_k, hk, dv);
    __syncthreads();

    const int key = j0 + lane;
    A s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = A(0);
    if (lane < BK) {
      for (int c = 0; c < DMAX; ++c) {
        const A kc = sk[lane][c];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = fma(sq[warp * R + r][c], kc, s[r]);
      }
    }
    A p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = row0 + warp * R + r;
      A capd;
      if (lane < BK && key < bhi && key >= lo[r] && key < hi[r])
        s[r] = rules.apply(s[r], g, i, h, key, capd);
      else
        s[r] = neg_inf<A>();
      const A m_new = max(m[r], warp_max(s[r]));
      A corr = A(1);
      if (m_new == neg_inf<A>()) {
        p[r] = A(0);
      } else {
        corr = exp_acc(m[r] - m_new);  // 0 when m was -inf
        p[r] = exp_acc(s[r] - m_new);  // 0 for masked keys
      }
      m[r] = m_new;
      lsum[r] = lsum[r] * corr + p[r];
#pragma unroll
      for (int t = 0; t < DT; ++t) acc[r][t] *= corr;
    }
    if (dv > 0) {
#pragma unroll 4
      for (int jj = 0; jj < BK; ++jj) {
        A vv[DT];
#pragma unroll
        for (int t = 0; t < DT; ++t) vv[t] = sv[jj][lane + 32 * t];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const A pj = __shfl_sync(FULL, p[r], jj);
#pragma unroll
          for (int t = 0; t < DT; ++t) acc[r][t] = fma(pj, vv[t], acc[r][t]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = row0 + warp * R + r;
    const A l = warp_sum(lsum[r]);
    if (i >= g.q_len) continue;
    const long long row = (long long)g.batch * rules.len_q + g.q_start + i;  // packed row
    if (n_chunks > 1) {
      const long long at = ((long long)chunk * batch * rules.len_q + row) * hq + h;
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int c = lane + 32 * t;
        if (c < dv) part_o[at * dv + c] = acc[r][t];
      }
      if (lane == 0) {
        part_ml[at * 2] = m[r];
        part_ml[at * 2 + 1] = l;
      }
    } else {
      const bool seen = l > A(0);
      const A inv = seen ? A(1) / l : A(0);
#pragma unroll
      for (int t = 0; t < DT; ++t) {
        const int c = lane + 32 * t;
        if (c < dv) o[(row * hq + h) * dv + c] = from_acc<T>(acc[r][t] * inv);
      }
      if (lane == 0)
        lse[((long long)g.batch * hq + h) * rules.len_q + g.q_start + i] =
            seen ? m[r] + log_acc(l) : neg_inf<A>();
    }
  }
}

// Merges the chunks of the split-KV forward in chunk order. Grid: (B·Sq, Hq); threads over Dv.
template <typename T>
__device__ __forceinline__ void merge(const typename Acc<T>::type* __restrict__ part_o,
                                      const typename Acc<T>::type* __restrict__ part_ml,
                                      T* __restrict__ o, typename Acc<T>::type* __restrict__ lse,
                                      int batch, int len_q, int hq, int dv, int n_chunks) {
  using A = typename Acc<T>::type;
  const long long row = blockIdx.x;  // b·Sq + i
  const int h = blockIdx.y;
  const long long rows = (long long)batch * len_q;
  A m = neg_inf<A>();
  for (int c = 0; c < n_chunks; ++c) m = max(m, part_ml[((c * rows + row) * hq + h) * 2]);
  A l = A(0);
  if (m != neg_inf<A>())
    for (int c = 0; c < n_chunks; ++c) {
      const long long at = (c * rows + row) * hq + h;
      const A mc = part_ml[at * 2];
      if (mc != neg_inf<A>()) l += part_ml[at * 2 + 1] * exp_acc(mc - m);
    }
  const bool seen = l > A(0);
  const A inv = seen ? A(1) / l : A(0);
  for (int col = threadIdx.x; col < dv; col += THREADS) {
    A x = A(0);
    if (seen)
      for (int c = 0; c < n_chunks; ++c) {
        const long long at = (c * rows + row) * hq + h;
        const A mc = part_ml[at * 2];
        if (mc != neg_inf<A>()) x += part_o[at * dv + col] * exp_acc(mc - m);
      }
    o[(row * hq + h) * dv + col] = from_acc<T>(x * inv);
  }
  if (threadIdx.x == 0) {
    const long long b = row / len_q, i = row % len_q;
    lse[(b * hq + h) * len_q + i] = seen ? m + log_acc(l) : neg_inf<A>();
  }
}

template <typename T, int DMAX> struct TopCfg {
  using A = typename Acc<T>::type;
  static constexpr int ROWS = NK_ATTN_TOP_ROWS;  // one per warp
  static constexpr int BK = pow2_tile(
      (SMEM_BUDGET - ROWS * DMAX * (int)sizeof(A) - ROWS * NK_ATTN_MAX_TOP * ((int)sizeof(A) + 4)) /
      ((DMAX + 1) * (int)sizeof(A)));
};

// The `top` most attended keys of each query row (one warp per row), with p = exp(s - lse)
// from the forward's lse. Grid: (query tiles of NK_ATTN_TOP_ROWS, Hq, sequences).
template <typename T, int DMAX>
__device__ __forceinline__ void top_keys(const T* __restrict__ q, const T* __restrict__ k,
                                         Rules<typename Acc<T>::type> rules, const int* cu_q,
                                         const int* cu_k, const typename Acc<T>::type* __restrict__ lse,
                                         typename Acc<T>::type* __restrict__ weights,
                                         int* __restrict__ indices, int hq, int hk, int d,
                                         typename Acc<T>::type scale, int top) {
  using Cfg = TopCfg<T, DMAX>;
  using A = typename Cfg::A;
  constexpr int ROWS = Cfg::ROWS, BK = Cfg::BK, LT = NK_ATTN_MAX_TOP / 32;
  __shared__ A sq[ROWS][DMAX];
  __shared__ A sk[BK][DMAX + 1];
  __shared__ A list_s[ROWS][NK_ATTN_MAX_TOP];
  __shared__ int list_k[ROWS][NK_ATTN_MAX_TOP];

  const int h = blockIdx.y, h_kv = h / (hq / hk);
  const Segment g = segment(blockIdx.z, cu_q, cu_k, rules.len_q, rules.len_k);
  const int row0 = blockIdx.x * ROWS;
  if (row0 >= g.q_len) return;  // uniform over the block
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = row0 + warp;
  const bool row_ok = i < g.q_len;

  load_queries<T, DMAX, ROWS>(sq, q, g, row0, h, rules.len_q, hq, d, scale);
  int lo = 0, hi = 0;
  if (row_ok) rules.visible(g, i, lo, hi);
  int blo, bhi;
  rules.visible_union(g, row0, min(row0 + ROWS, g.q_len), blo, bhi);

  A* ls = list_s[warp];
  int* lk = list_k[warp];
  int len = 0;  // uniform over the warp
  for (int j0 = blo; j0 < bhi; j0 += BK) {
    __syncthreads();
    load_keys<T, BK, DMAX, DMAX + 1>(sk, k, g, j0, bhi, h_kv, rules.len_k, hk, d);
    __syncthreads();
    const int key = j0 + lane;
    A s = A(0);
    if (lane < BK)
      for (int c = 0; c < DMAX; ++c) s = fma(sq[warp][c], sk[lane][c], s);
    bool cand = false;
    if (row_ok && lane < BK && key < bhi && key >= lo && key < hi) {
      A capd;
      s = rules.apply(s, g, i, h, key, capd);
      cand = s != neg_inf<A>();  // a -inf bias masks the key
    }
    // candidates in key order (ascending lanes): an equal score lands after the earlier key
    unsigned pending = __ballot_sync(FULL, cand);
    while (pending != 0) {
      const int src = __ffs(pending) - 1;
      pending &= pending - 1;
      const A x = __shfl_sync(FULL, s, src);
      if (len == top && !(x > ls[len - 1])) continue;
      int pos = 0;  // entries >= x stay in front
      for (int base = 0; base < len; base += 32) {
        const int e = base + lane;
        pos += __popc(__ballot_sync(FULL, e < len && ls[e] >= x));
      }
      const int new_len = min(len + 1, top);
      A keep_s[LT];
      int keep_k[LT];
#pragma unroll
      for (int t = 0; t < LT; ++t) {
        const int e = lane + 32 * t;
        keep_s[t] = A(0);
        keep_k[t] = 0;
        if (e >= pos && e < len && e + 1 < new_len) {
          keep_s[t] = ls[e];
          keep_k[t] = lk[e];
        }
      }
      __syncwarp();
#pragma unroll
      for (int t = 0; t < LT; ++t) {
        const int e = lane + 32 * t;
        if (e >= pos && e < len && e + 1 < new_len) {
          ls[e + 1] = keep_s[t];
          lk[e + 1] = keep_k[t];
        }
      }
      if (lane == 0) {
        ls[pos] = x;
        lk[pos] = g.k_start + j0 + src;
      }
      len = new_len;
      __syncwarp();
    }
  }
  if (!row_ok) return;
  const long long at = (((long long)g.batch * hq + h) * rules.len_q + g.q_start + i);
  const A l = lse[at];
  for (int t = lane; t < top; t += 32) {
    A w = A(0);
    int key = -1;
    if (l != neg_inf<A>() && t < len) {
      w = exp_acc(ls[t] - l);
      key = lk[t];
    }
    weights[at * top + t] = w;
    indices[at * top + t] = key;
  }
}

}  // namespace attn

#define NK_ATTN_FWD_ENTRY(T, NAME, DMAX)                                                               \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_fwd_d##DMAX##_##NAME(             \
      const T* q, const T* k, const T* v, const Acc<T>::type* slopes, const Acc<T>::type* bias,       \
      int bias_batch, int bias_heads, const int* cu_q, const int* cu_k, T* o, Acc<T>::type* lse,      \
      Acc<T>::type* part_o, Acc<T>::type* part_ml, int batch, int len_q, int len_k, int hq, int hk,   \
      int d, int dv, Acc<T>::type scale, Acc<T>::type softcap, int causal, long long window_left,     \
      long long window_right, int n_chunks) {                                                         \
    const attn::Rules<Acc<T>::type> rules{causal, window_left, window_right, softcap, slopes, bias,   \
                                          bias_batch, bias_heads, len_q, len_k};                      \
    attn::forward<T, DMAX>(q, k, v, rules, cu_q, cu_k, o, lse, part_o, part_ml, batch, hq, hk, d, dv, \
                           scale, n_chunks);                                                          \
  }                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_top_keys_d##DMAX##_##NAME(        \
      const T* q, const T* k, const Acc<T>::type* slopes, const Acc<T>::type* bias, int bias_batch,   \
      int bias_heads, const int* cu_q, const int* cu_k, const Acc<T>::type* lse,                      \
      Acc<T>::type* weights, int* indices, int len_q, int len_k, int hq, int hk, int d,               \
      Acc<T>::type scale, Acc<T>::type softcap, int causal, long long window_left,                    \
      long long window_right, int top) {                                                              \
    const attn::Rules<Acc<T>::type> rules{causal, window_left, window_right, softcap, slopes, bias,   \
                                          bias_batch, bias_heads, len_q, len_k};                      \
    attn::top_keys<T, DMAX>(q, k, rules, cu_q, cu_k, lse, weights, indices, hq, hk, d, scale, top);   \
  }

#define NK_ATTN_FWD_TYPE(T, NAME)                                                                      \
  NK_ATTN_FWD_ENTRY(T, NAME, 32)                                                                       \
  NK_ATTN_FWD_ENTRY(T, NAME, 64)                                                                       \
  NK_ATTN_FWD_ENTRY(T, NAME, 96)                                                                       \
  NK_ATTN_FWD_ENTRY(T, NAME, 128)                                                                      \
  NK_ATTN_FWD_ENTRY(T, NAME, 192)                                                                      \
  NK_ATTN_FWD_ENTRY(T, NAME, 256)                                                                      \
  extern "C" __global__ void __launch_bounds__(NK_ATTN_THREADS, 1) attn_merge_##NAME(                     \
      const Acc<T>::type* part_o, const Acc<T>::type* part_ml, T* o, Acc<T>::type* lse, int batch,    \
      int len_q, int hq, int dv, int n_chunks) {                                                      \
    attn::merge<T>(part_o, part_ml, o, lse, batch, len_q, hq, dv, n_chunks);                          \
  }

NK_ATTN_FWD_TYPE(float, f32)
NK_ATTN_FWD_TYPE(double, f64)
NK_ATTN_FWD_TYPE(__half, f16)
NK_ATTN_FWD_TYPE(__nv_bfloat16, bf16)
