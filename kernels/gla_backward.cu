// scan.gla_backward: gradients of sum(o * do) (+ sum(h_last * dh_last)) of gated linear
// attention, the CPU's recurrence (src/scan/gla.rs) chunk by chunk:
//   walking back with dS (from dh_last): dS += scale q[t]^T do[t]; dq[t] = scale S[t] do[t];
//   dk[t] = dS v[t]; dv[t] = dS^T k[t]; dg[t] = e^{g[t]} rowsum(dS o S[t-1]); dS *= e^{g[t]};
//   dh0 = dS at the end.
//
// Plan: one block per (value tile of 32 columns, head, batch), 8 warps; lane l owns column
// c0 + l and warp w the key rows w, w + 8, ... (R = KMAX / 8 of them), so S, dS, the chunk's
// starting state and one scratch row live in 4R registers per thread (no shared state).
//   1. forward once, storing the state at the start of every checkpoint segment (a segment is
//      `per` chunks of NK_GLA_BWD_CHUNK steps; the host picks `per` so the checkpoints fit
//      a memory budget) in global scratch, each thread its own elements (coalesced);
//   2. per chunk, last first: the chunk's starting state from its segment's checkpoint
//      (advancing through the earlier chunks of the segment), the chunk's q, k, e^g, v, do in
//      shared memory, then its steps backward, each recomputing its incoming state from the
//      chunk start (at most CHUNK - 1 rank-1 updates: no per-step states are stored).
//      dq, dk, dg are sums over the value columns: each warp reduces its R rows across its
//      lanes at once (a halving exchange, R + log2(32 / R) shuffles), the block writes this
//      tile's partial sums per chunk (coalesced) and a second kernel (scan_gla_bwd_sum_*) adds
//      the tiles in order. dv is a sum over key rows: per thread over its rows, then over the
//      8 warps in order through shared memory.
// Barriers: around every chunk load (the buffers are shared by all warps) and before the
// chunk's results are written out. Deterministic: every sum has a fixed order; no atomics.
// Bound: about (CHUNK / 2 + 2) K x 32 multiply-adds per step and tile, plus the reductions;
// parallelism B * H * ceil(V / 32) blocks. All math in f32 (f64 for f64).
#include "common.cuh"
#include "gla.cuh"

namespace {

constexpr int kWarps = NK_GLA_THREADS / 32;

// Sums R (a power of two <= 32) values per lane over the warp's 32 lanes, all R at once: each
// halving stage sends the half of the values this lane does not keep to its partner. On return
// x[0] holds the full sum of row `returned value`; the 32 / R lanes that differ only in their
// low bits hold the same row.
// One halving stage: lanes whose bit OFF is set keep the upper WIDTH values, the others the lower.
template <typename A, int R, int WIDTH, int OFF>
__device__ __forceinline__ void halve_rows(A (&x)[R], int lane, int& row) {
  if constexpr (WIDTH >= 1) {
    const bool upper = (lane & OFF) != 0;
#pragma unroll
    for (int i = 0; i < WIDTH; ++i) {
      const A send = upper ? x[i] : x[i + WIDTH];
      const A keep = upper ? x[i + WIDTH] : x[i];
      x[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
    if (upper) row += WIDTH;
    halve_rows<A, R, WIDTH / 2, OFF / 2>(x, lane, row);
  }
}

template <typename A, int R>
__device__ __forceinline__ int warp_sum_rows(A (&x)[R], int lane) {
  int row = 0;
  halve_rows<A, R, R / 2, 16>(x, lane, row);
#pragma unroll
  for (int off = 16 / R; off >= 1; off /= 2) x[0] += __shfl_xor_sync(0xffffffffu, x[0], off);
  return row;
}

template <typename T, int KMAX>
__device__ void gla_backward(const T* q, const T* k, const T* v, const T* g, const T* d_o,
                             const typename Acc<T>::type* dh_last, T* dv, typename Acc<T>::type* dh0,
                             typename Acc<T>::type* parts, typename Acc<T>::type* checkpoints, long long B,
                             long long T_, int H, int K, int V, typename Acc<T>::type scale, long long per,
                             const typename Acc<T>::type* h0) {
  using A = typename Acc<T>::type;
  constexpr int CH = NK_GLA_BWD_CHUNK, VT = NK_GLA_VALUE_TILE, NT = NK_GLA_THREADS, W = kWarps;
  constexpr int R = KMAX / W;
  static_assert(VT == 32 && R >= 1 && R <= 32 && (R & (R - 1)) == 0, "a lane per column, R a power of two");
  // all reads of these rows within a warp are of one address (broadcast) or of consecutive columns
  __shared__ A sq[CH][KMAX], sk[CH][KMAX], sa[CH][KMAX];  // scale * q, k, e^g
  __shared__ A sv[CH][VT], sdo[CH][VT];
  __shared__ A sdq[CH][KMAX], sdk[CH][KMAX], sdg[CH][KMAX];  // this tile's partial sums
  __shared__ A sdv[CH][W][VT];                                // per-warp partial sums
  const int tid = threadIdx.x, lane = tid % 32, w = tid / 32;
  const int tile = blockIdx.x, tiles = gridDim.x, h = blockIdx.y;
  const long long b = blockIdx.z;
  const long long c0 = (long long)tile * VT, c = c0 + lane;  // 64-bit: c0 + 31 may pass 2^31
  const bool col_ok = c < V;
  const long long head = b * H + h;
  const long long chunks = (T_ + CH - 1) / CH;
  const long long segments = (chunks + per - 1) / per;
  const long long keys_total = B * T_ * H * K;
  A* ckpt = checkpoints + (head * tiles + tile) * segments * (long long)(KMAX * VT);

  A S[R], dS[R], S0[R], x[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int kk = w + W * r;
    const bool ok = col_ok && kk < K;
    S[r] = (h0 && ok) ? h0[(head * K + kk) * V + c] : A(0);
    dS[r] = (dh_last && ok) ? dh_last[(head * K + kk) * V + c] : A(0);
  }

  // chunk `ci`'s k and e^g (rows past K zero) and v (columns past V zero); with `all` also
  // scale * q and do. Returns its step count.
  auto load_chunk = [&](long long ci, bool all) -> int {
    const long long t0 = ci * CH;
    const int n = (int)min((long long)CH, T_ - t0);
    __syncthreads();  // every warp is done with the previous chunk's buffers
    for (int i = tid; i < n * KMAX; i += NT) {
      const int j = i / KMAX, kk = i % KMAX;
      const bool ok = kk < K;
      const long long at = ((b * T_ + t0 + j) * H + h) * K + kk;
      sk[j][kk] = ok ? to_acc(k[at]) : A(0);
      sa[j][kk] = ok ? exp(to_acc(g[at])) : A(0);
      if (all) sq[j][kk] = ok ? scale * to_acc(q[at]) : A(0);
    }
    for (int i = tid; i < n * VT; i += NT) {
      const int j = i / VT, cc = i % VT;
      const bool ok = c0 + cc < V;
      const long long at = ((b * T_ + t0 + j) * H + h) * V + c0 + cc;
      sv[j][cc] = ok ? to_acc(v[at]) : A(0);
      if (all) sdo[j][cc] = ok ? to_acc(d_o[at]) : A(0);
    }
    __syncthreads();
    return n;
  };
  // S through the first `n` steps of the loaded chunk
  auto advance = [&](int n) {
    for (int j = 0; j < n; ++j) {
      const A vj = sv[j][lane];
#pragma unroll
      for (int r = 0; r < R; ++r) S[r] = sa[j][w + W * r] * S[r] + sk[j][w + W * r] * vj;
    }
  };

  // 1. forward: the state entering every segment
  for (long long s = 0; s < segments; ++s) {
#pragma unroll
    for (int r = 0; r < R; ++r) ckpt[(s * R + r) * NT + tid] = S[r];
    if (s + 1 == segments) break;
    for (long long ci = s * per; ci < (s + 1) * per; ++ci) advance(load_chunk(ci, false));
  }

  // 2. backward over the chunks, last first
  const bool writer = (lane & (32 / R - 1)) == 0;
  for (long long ci = chunks - 1; ci >= 0; --ci) {
    const long long s = ci / per;
#pragma unroll
    for (int r = 0; r < R; ++r) S[r] = ckpt[(s * R + r) * NT + tid];
    for (long long cj = s * per; cj < ci; ++cj) advance(load_chunk(cj, false));
    const int n = load_chunk(ci, true);
#pragma unroll
    for (int r = 0; r < R; ++r) S0[r] = S[r];
    for (int i = n - 1; i >= 0; --i) {
#pragma unroll
      for (int r = 0; r < R; ++r) S[r] = S0[r];
      advance(i);  // S = the state before step i
      const A doc = sdo[i][lane], vc = sv[i][lane];
#pragma unroll
      for (int r = 0; r < R; ++r) dS[r] += sq[i][w + W * r] * doc;
      // dg = e^g * sum_c dS * S[t-1]
#pragma unroll
      for (int r = 0; r < R; ++r) x[r] = dS[r] * S[r];
      int row = warp_sum_rows<A, R>(x, lane);
      if (writer) sdg[i][w + W * row] = sa[i][w + W * row] * x[0];
      // dk = sum_c dS * v
#pragma unroll
      for (int r = 0; r < R; ++r) x[r] = dS[r] * vc;
      row = warp_sum_rows<A, R>(x, lane);
      if (writer) sdk[i][w + W * row] = x[0];
      // dq = scale * sum_c S[t] * do
#pragma unroll
      for (int r = 0; r < R; ++r) {
        S[r] = sa[i][w + W * r] * S[r] + sk[i][w + W * r] * vc;
        x[r] = S[r] * doc;
      }
      row = warp_sum_rows<A, R>(x, lane);
      if (writer) sdq[i][w + W * row] = scale * x[0];
      // dv = sum_rows k * dS: this warp's rows; then dS decays through the step
      A part = A(0);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        part += sk[i][w + W * r] * dS[r];
        dS[r] *= sa[i][w + W * r];
      }
      sdv[i][w][lane] = part;
    }
    __syncthreads();  // the chunk's partial sums are complete
    const long long t0 = ci * CH;
    for (int i = tid; i < n * K; i += NT) {
      const int j = i / K, kk = i % K;
      const long long at = ((b * T_ + t0 + j) * H + h) * K + kk;
      parts[(0LL * tiles + tile) * keys_total + at] = sdq[j][kk];
      parts[(1LL * tiles + tile) * keys_total + at] = sdk[j][kk];
      parts[(2LL * tiles + tile) * keys_total + at] = sdg[j][kk];
    }
    for (int i = tid; i < n * VT; i += NT) {
      const int j = i / VT, cc = i % VT;
      if (c0 + cc < V) {
        A sum = A(0);
#pragma unroll
        for (int ww = 0; ww < W; ++ww) sum += sdv[j][ww][cc];
        dv[((b * T_ + t0 + j) * H + h) * V + c0 + cc] = from_acc<T>(sum);
      }
    }
    // the next load_chunk opens with a barrier before it overwrites any buffer read here
  }

  if (dh0 && col_ok) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int kk = w + W * r;
      if (kk < K) dh0[(head * K + kk) * V + c] = dS[r];
    }
  }
}

// out[which][e] = sum over tiles, in tile order, of parts[which][tile][e], for which in
// (dq, dk, dg) and e < n = B * T * H * K.
template <typename T>
__device__ void gla_backward_sum(const typename Acc<T>::type* parts, T* dq, T* dk, T* dg, long long n, int tiles) {
  using A = typename Acc<T>::type;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < 3 * n; i += stride) {
    const long long which = i / n, e = i % n;
    A s = A(0);
    for (int p = 0; p < tiles; ++p) s += parts[(which * tiles + p) * n + e];
    T* out = which == 0 ? dq : (which == 1 ? dk : dg);
    out[e] = from_acc<T>(s);
  }
}

}  // namespace

#define NK_GLA_BWD_ENTRY(T, NAME, KMAX)                                                                          \
  extern "C" __global__ void __launch_bounds__(NK_GLA_THREADS, 1) scan_gla_bwd_k##KMAX##_##NAME(                \
      const T* q, const T* k, const T* v, const T* g, const T* d_o, const Acc<T>::type* dh_last, T* dv,         \
      Acc<T>::type* dh0, Acc<T>::type* parts, Acc<T>::type* checkpoints, long long B, long long T_, int H, int K, \
      int V, Acc<T>::type scale, long long per, const Acc<T>::type* h0) {                                        \
    gla_backward<T, KMAX>(q, k, v, g, d_o, dh_last, dv, dh0, parts, checkpoints, B, T_, H, K, V, scale, per, h0); \
  }

#define NK_GLA_BWD_SUM_ENTRY(T, NAME)                                                                            \
  extern "C" __global__ void scan_gla_bwd_sum_##NAME(const Acc<T>::type* parts, T* dq, T* dk, T* dg,           \
                                                      long long n, int tiles) {                                  \
    gla_backward_sum<T>(parts, dq, dk, dg, n, tiles);                                                            \
  }

NK_GLA_BWD_ENTRY(float, f32, 32)
NK_GLA_BWD_ENTRY(float, f32, 64)
NK_GLA_BWD_ENTRY(float, f32, 128)
NK_GLA_BWD_ENTRY(__half, f16, 32)
NK_GLA_BWD_ENTRY(__half, f16, 64)
NK_GLA_BWD_ENTRY(__half, f16, 128)
NK_GLA_BWD_ENTRY(__nv_bfloat16, bf16, 32)
NK_GLA_BWD_ENTRY(__nv_bfloat16, bf16, 64)
NK_GLA_BWD_ENTRY(__nv_bfloat16, bf16, 128)
NK_GLA_BWD_ENTRY(double, f64, 32)
NK_GLA_BWD_ENTRY(double, f64, 64)

NK_GLA_BWD_SUM_ENTRY(float, f32)
NK_GLA_BWD_SUM_ENTRY(__half, f16)
NK_GLA_BWD_SUM_ENTRY(__nv_bfloat16, bf16)
NK_GLA_BWD_SUM_ENTRY(double, f64)
