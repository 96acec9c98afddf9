// scan.gla (gated linear attention, matrix-valued state), forward, in chunks.
//
// Plan: one block per (value tile of 32 columns, head, batch) walks time in chunks of
// NK_GLA_CHUNK steps; its slice of the state S (K x 32) lives in shared memory. Per chunk
// (the CPU's chunked form, src/scan/gla/chunked.rs):
//   P[t] = e^{G[t]} (running products of e^{g} over the chunk, per key channel),
//   R[t] = e^{G_last - G[t]},
//   A[t, tau] = scale * sum_k q[t,k] k[tau,k] e^{G[t,k] - G[tau,k]}  (tau <= t),
//   o[t] = (scale q[t] * P[t]) S + sum_tau A[t, tau] v[tau],
//   S = diag(P_last) S + (k * R)^T v.
// A is factored as (scale q P / P_last) . (k R) when every P lies in [e^-40, e^40]; a chunk
// with stronger gates (or -inf / NaN) forms each exponent as a running sum of log-gates
// instead. All arithmetic in f32 (f64 for f64); f16/bf16 are widened on load.
// Parallelism is B * H * ceil(V / 32) blocks (no split over chunks yet).
#include "common.cuh"
#include "gla.cuh"

namespace {

template <typename T, int KMAX>
__device__ void gla_forward(const T* q, const T* k, const T* v, const T* g, const typename Acc<T>::type* h0, T* o,
                            typename Acc<T>::type* h_last, long long B, long long T_, int H, int K, int V,
                            typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  constexpr int CH = NK_GLA_CHUNK, VT = NK_GLA_VALUE_TILE, W = NK_GLA_THREADS / 32;
  constexpr int KP = KMAX + 1;  // padded rows: threads reading different rows hit different banks
  __shared__ A sq[CH][KP], sk[CH][KP], sg[CH][KP], sp[CH][KP];
  __shared__ A ss[KMAX][VT], sv[CH][VT], sa[CH][CH];
  __shared__ int s_direct;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long long b = blockIdx.z;
  const int h = blockIdx.y;
  const long long c0 = (long long)blockIdx.x * VT, c = c0 + lane;  // 64-bit: c0 + 31 may pass 2^31
  const bool col_ok = c < V;
  const long long head = b * H + h;
  const A lo = exp(A(-40)), hi = exp(A(40));

  for (int kk = warp; kk < K; kk += W) ss[kk][lane] = (h0 && col_ok) ? h0[(head * K + kk) * V + c] : A(0);

  for (long long t0 = 0; t0 < T_; t0 += CH) {
    const int n = (int)min((long long)CH, T_ - t0);
    __syncthreads();  // the previous chunk is done with every buffer
    for (int i = threadIdx.x; i < n * K; i += NK_GLA_THREADS) {
      const int j = i / K, kk = i % K;
      const long long at = ((b * T_ + t0 + j) * H + h) * K + kk;
      sq[j][kk] = to_acc(q[at]);
      sk[j][kk] = to_acc(k[at]);
      sg[j][kk] = to_acc(g[at]);
    }
    for (int i = threadIdx.x; i < n * VT; i += NK_GLA_THREADS) {
      const int j = i / VT, cc = i % VT;
      sv[j][cc] = c0 + cc < V ? to_acc(v[((b * T_ + t0 + j) * H + h) * V + c0 + cc]) : A(0);
    }
    if (threadIdx.x == 0) s_direct = 0;
    __syncthreads();
    for (int kk = threadIdx.x; kk < K; kk += NK_GLA_THREADS) {
      A p = A(1);
      bool out_of_range = false;
      for (int j = 0; j < n; ++j) {
        p *= exp(sg[j][kk]);
        sp[j][kk] = p;
        out_of_range |= !(p >= lo && p <= hi);
      }
      if (out_of_range) s_direct = 1;
    }
    __syncthreads();
    const bool direct = s_direct != 0;
    if (direct) {
      // A from the raw rows, exponents as running sums of log-gates
      for (int i = threadIdx.x; i < CH * CH; i += NK_GLA_THREADS) {
        const int t = i / CH, tau = i % CH;
        A acc = A(0);
        if (t < n && tau <= t) {
          for (int kk = 0; kk < K; ++kk) {
            A span = A(0);
            for (int u = tau + 1; u <= t; ++u) span += sg[u][kk];
            acc += sq[t][kk] * sk[tau][kk] * exp(span);
          }
        }
        sa[t][tau] = scale * acc;
      }
      __syncthreads();
      // R[t] as running products from the end (the raw gates are no longer needed)
      for (int kk = threadIdx.x; kk < K; kk += NK_GLA_THREADS) {
        A r = A(1);
        for (int j = n - 1; j >= 0; --j) {
          const A e = exp(sg[j][kk]);
          sg[j][kk] = r;
          r *= e;
        }
      }
    } else {
      for (int i = threadIdx.x; i < n * K; i += NK_GLA_THREADS) {
        const int j = i / K, kk = i % K;
        sg[j][kk] = sp[n - 1][kk] / sp[j][kk];
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * K; i += NK_GLA_THREADS) {
      const int j = i / K, kk = i % K;
      sq[j][kk] *= scale * sp[j][kk];
      sk[j][kk] *= sg[j][kk];
    }
    __syncthreads();
    if (!direct) {
      for (int i = threadIdx.x; i < CH * CH; i += NK_GLA_THREADS) {
        const int t = i / CH, tau = i % CH;
        A acc = A(0);
        if (t < n && tau <= t)
          for (int kk = 0; kk < K; ++kk) acc += sq[t][kk] / sp[n - 1][kk] * sk[tau][kk];
        sa[t][tau] = acc;
      }
      __syncthreads();
    }
    // o[t] for this block's columns: one step per warp
    for (int t = warp; t < n; t += W) {
      A acc = A(0);
      for (int kk = 0; kk < K; ++kk) acc += sq[t][kk] * ss[kk][lane];
      for (int tau = 0; tau <= t; ++tau) acc += sa[t][tau] * sv[tau][lane];
      if (col_ok) o[((b * T_ + t0 + t) * H + h) * V + c] = from_acc<T>(acc);
    }
    __syncthreads();  // every read of S is done before it advances
    for (int kk = warp; kk < K; kk += W) {
      A s = ss[kk][lane] * sp[n - 1][kk];
      for (int j = 0; j < n; ++j) s += sk[j][kk] * sv[j][lane];
      ss[kk][lane] = s;
    }
  }
  __syncthreads();
  for (int kk = warp; kk < K; kk += W)
    if (col_ok) h_last[(head * K + kk) * V + c] = ss[kk][lane];
}

}  // namespace

#define NK_GLA_ENTRY(T, NAME, KMAX)                                                                               \
  extern "C" __global__ void __launch_bounds__(NK_GLA_THREADS, 1)                                                \
      scan_gla_fwd_##NAME(const T* q, const T* k, const T* v, const T* g, const Acc<T>::type* h0, T* o,         \
                          Acc<T>::type* h_last, long long B, long long T_, int H, int K, int V,                  \
                          Acc<T>::type scale) {                                                                   \
    gla_forward<T, KMAX>(q, k, v, g, h0, o, h_last, B, T_, H, K, V, scale);                                       \
  }

// f16/bf16 run on tensor cores (gla_tc.cu)
NK_GLA_ENTRY(float, f32, NK_GLA_MAX_KEY)
NK_GLA_ENTRY(double, f64, NK_GLA_MAX_KEY_F64)
