// scan.selective_backward (Mamba-1's selective scan), the gradients of sum(y * dy).
//
// Plan: one thread per (batch, channel), its N states in registers, as the forward. Blocks
// are (channel block, batch), so a block's threads share the batch row. Three phases in
// one kernel:
//   1. the forward once, storing the state at the start of every chunk of NK_SELECTIVE_BWD_CHUNK
//      steps (checkpoints: chunks * N * B * D values, laid out so a warp's stores coalesce);
//   2. per chunk, last first: re-run the chunk from its checkpoint, storing each step's
//      incoming state (CHUNK * N * B * D values of scratch, coalesced), then
//   3. walk the chunk backward: gx[t] = Cm[t] * g[t] + exp(dt[t+1] A) gx[t+1], with
//      g = dy * silu(z) (dy without z); du, ddelta, dz per element; dBm and dCm (sums over
//      channels) reduced in the block in a fixed order (xor-butterfly shuffles, then the
//      warps in order) into per-block partials; dA, dDskip, ddelta_bias summed over time in
//      registers into per-(batch, channel) partials.
// A second kernel sums the partials in a fixed order: results do not depend on scheduling.
#include "common.cuh"
#include "selective.cuh"

namespace {

template <typename A>
__device__ __forceinline__ A softplus_b(A x) {
  return x > A(20) ? x : log1p(exp(x));
}

template <typename A>
__device__ __forceinline__ A sigmoid_b(A x) {
  return A(1) / (A(1) + exp(-x));
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int NMAX>
__device__ void selective_backward(const T* u, const T* delta, const typename Acc<T>::type* a, const T* bm,
                                   const T* cm, const typename Acc<T>::type* dskip, const T* z,
                                   const typename Acc<T>::type* delta_bias, const typename Acc<T>::type* h0,
                                   const T* dy, T* du, T* ddelta, T* dz, typename Acc<T>::type* dh0,
                                   typename Acc<T>::type* checkpoints, typename Acc<T>::type* steps,
                                   typename Acc<T>::type* dbm_part, typename Acc<T>::type* dcm_part,
                                   typename Acc<T>::type* da_part, typename Acc<T>::type* dskip_part,
                                   typename Acc<T>::type* dbias_part, long long B, long long T_, long long D,
                                   int N, int softplus_on) {
  using A = typename Acc<T>::type;
  constexpr int WARPS = NK_SELECTIVE_THREADS / 32;
  __shared__ A warp_parts[2][WARPS][NMAX];
  const long long b = blockIdx.y;
  const long long d = (long long)blockIdx.x * NK_SELECTIVE_THREADS + threadIdx.x;
  const bool active = d < D;
  const long long lane_id = b * D + d;  // this thread's (batch, channel), when active
  const long long BD = B * D;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  A a_row[NMAX], x[NMAX];
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    a_row[j] = (active && j < N) ? a[d * N + j] : A(0);
    x[j] = (active && j < N && h0) ? h0[lane_id * N + j] : A(0);
  }
  const A bias = (active && delta_bias) ? delta_bias[d] : A(0);
  const A skip = (active && dskip) ? dskip[d] : A(0);
  auto step_dt = [&](long long at, A* slope) {
    A v = to_acc(delta[at]) + bias;
    *slope = A(1);
    if (softplus_on) {
      *slope = sigmoid_b(v);
      v = softplus_b(v);
    }
    return v;
  };

  // 1. forward, keeping the state at every chunk start
  const long long chunks = (T_ + NK_SELECTIVE_BWD_CHUNK - 1) / NK_SELECTIVE_BWD_CHUNK;
  if (active) {
    for (long long c = 0; c < chunks; ++c) {
#pragma unroll
      for (int j = 0; j < NMAX; ++j)
        if (j < N) checkpoints[(c * N + j) * BD + lane_id] = x[j];
      const long long t1 = min(T_, (c + 1) * NK_SELECTIVE_BWD_CHUNK);
      for (long long t = c * NK_SELECTIVE_BWD_CHUNK; t < t1; ++t) {
        const long long at = (b * T_ + t) * D + d, bc = (b * T_ + t) * N;
        A slope;
        const A dt = step_dt(at, &slope);
        const A dtu = dt * to_acc(u[at]);
#pragma unroll
        for (int j = 0; j < NMAX; ++j)
          if (j < N) x[j] = exp(dt * a_row[j]) * x[j] + dtu * to_acc(bm[bc + j]);
      }
    }
  }

  A gx_next[NMAX], da_acc[NMAX];
#pragma unroll
  for (int j = 0; j < NMAX; ++j) gx_next[j] = da_acc[j] = A(0);
  A dskip_acc = A(0), dbias_acc = A(0);
  const long long blocks_d = gridDim.x;
  for (long long c = chunks - 1; c >= 0; --c) {
    const long long t0 = c * NK_SELECTIVE_BWD_CHUNK, t1 = min(T_, t0 + NK_SELECTIVE_BWD_CHUNK);
    // 2. re-run the chunk, storing each step's incoming state; x ends as the chunk's last state
    if (active) {
#pragma unroll
      for (int j = 0; j < NMAX; ++j)
        if (j < N) x[j] = checkpoints[(c * N + j) * BD + lane_id];
      for (long long t = t0; t < t1; ++t) {
        const long long at = (b * T_ + t) * D + d, bc = (b * T_ + t) * N;
        A slope;
        const A dt = step_dt(at, &slope);
        const A dtu = dt * to_acc(u[at]);
#pragma unroll
        for (int j = 0; j < NMAX; ++j) {
          if (j < N) {
            steps[((t - t0) * N + j) * BD + lane_id] = x[j];
            x[j] = exp(dt * a_row[j]) * x[j] + dtu * to_acc(bm[bc + j]);
          }
        }
      }
    }
    // 3. backward through the chunk; x holds the state after step t
    for (long long t = t1 - 1; t >= t0; --t) {
      const long long at = (b * T_ + t) * D + d, bc = (b * T_ + t) * N;
      A dbm_mine[NMAX], dcm_mine[NMAX];
#pragma unroll
      for (int j = 0; j < NMAX; ++j) dbm_mine[j] = dcm_mine[j] = A(0);
      if (active) {
        A slope;
        const A dt = step_dt(at, &slope);
        const A uv = to_acc(u[at]);
        A y = skip * uv;
#pragma unroll
        for (int j = 0; j < NMAX; ++j)
          if (j < N) y += to_acc(cm[bc + j]) * x[j];
        A g = to_acc(dy[at]);
        if (z) {
          const A zv = to_acc(z[at]);
          const A s = sigmoid_b(zv);
          dz[at] = from_acc<T>(g * y * s * (A(1) + zv * (A(1) - s)));
          g *= zv * s;
        }
        A du_v = g * skip, ddt = A(0);
        dskip_acc += g * uv;
#pragma unroll
        for (int j = 0; j < NMAX; ++j) {
          if (j < N) {
            const A bj = to_acc(bm[bc + j]), cj = to_acc(cm[bc + j]);
            const A x_prev = steps[((t - t0) * N + j) * BD + lane_id];
            const A decay = exp(dt * a_row[j]);
            const A gx = cj * g + gx_next[j];
            dcm_mine[j] = g * x[j];
            dbm_mine[j] = gx * dt * uv;
            du_v += gx * dt * bj;
            const A through_decay = gx * x_prev * decay;
            ddt += gx * bj * uv + through_decay * a_row[j];
            da_acc[j] += through_decay * dt;
            gx_next[j] = decay * gx;
            x[j] = x_prev;
          }
        }
        du[at] = from_acc<T>(du_v);
        const A dd = ddt * slope;
        ddelta[at] = from_acc<T>(dd);
        dbias_acc += dd;
      }
      // dBm[b, t, :] and dCm[b, t, :]: this block's channels, summed in a fixed order
#pragma unroll
      for (int j = 0; j < NMAX; ++j) {
        if (j < N) {
          const A sb = warp_sum(dbm_mine[j]), sc = warp_sum(dcm_mine[j]);
          if (lane == 0) {
            warp_parts[0][warp][j] = sb;
            warp_parts[1][warp][j] = sc;
          }
        }
      }
      __syncthreads();
      if (threadIdx.x < N) {
        A sb = A(0), sc = A(0);
        for (int w = 0; w < WARPS; ++w) {
          sb += warp_parts[0][w][threadIdx.x];
          sc += warp_parts[1][w][threadIdx.x];
        }
        const long long part = ((b * T_ + t) * blocks_d + blockIdx.x) * N + threadIdx.x;
        dbm_part[part] = sb;
        dcm_part[part] = sc;
      }
      __syncthreads();
    }
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < NMAX; ++j) {
      if (j < N) {
        da_part[lane_id * N + j] = da_acc[j];
        if (dh0) dh0[lane_id * N + j] = gx_next[j];
      }
    }
    dskip_part[lane_id] = dskip_acc;
    dbias_part[lane_id] = dbias_acc;
  }
}

// out[i] = sum over p < parts of in[(i / inner * parts + p) * inner + i % inner], in order:
// the partials of dBm/dCm ([B*T, blocks, N] -> [B*T, N]) and of dA/dDskip/ddelta_bias
// ([B, D*N] -> [D*N], inner = D*N, outer 1).
template <typename T>
__device__ void sum_parts(const typename Acc<T>::type* in, T* out, long long outer, long long parts,
                          long long inner) {
  using A = typename Acc<T>::type;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= outer * inner) return;
  const long long o = i / inner, r = i % inner;
  A s = A(0);
  for (long long p = 0; p < parts; ++p) s += in[(o * parts + p) * inner + r];
  out[i] = from_acc<T>(s);
}

}  // namespace

#define NK_SELECTIVE_BWD_ENTRY(T, NAME, NMAX)                                                                    \
  extern "C" __global__ void __launch_bounds__(NK_SELECTIVE_THREADS) scan_selective_bwd_n##NMAX##_##NAME(       \
      const T* u, const T* delta, const Acc<T>::type* a, const T* bm, const T* cm, const Acc<T>::type* dskip,    \
      const T* z, const Acc<T>::type* delta_bias, const Acc<T>::type* h0, const T* dy, T* du, T* ddelta, T* dz,  \
      Acc<T>::type* dh0, Acc<T>::type* checkpoints, Acc<T>::type* steps, Acc<T>::type* dbm_part,                 \
      Acc<T>::type* dcm_part, Acc<T>::type* da_part, Acc<T>::type* dskip_part, Acc<T>::type* dbias_part,         \
      long long B, long long T_, long long D, int N, int softplus_on) {                                          \
    selective_backward<T, NMAX>(u, delta, a, bm, cm, dskip, z, delta_bias, h0, dy, du, ddelta, dz, dh0,          \
                                checkpoints, steps, dbm_part, dcm_part, da_part, dskip_part, dbias_part, B, T_, \
                                D, N, softplus_on);                                                              \
  }

#define NK_SUM_PARTS_ENTRY(T, NAME)                                                                             \
  extern "C" __global__ void scan_selective_sum_parts_##NAME(const Acc<T>::type* in, T* out, long long outer, \
                                                             long long parts, long long inner) {                \
    sum_parts<T>(in, out, outer, parts, inner);                                                                 \
  }

NK_SELECTIVE_BWD_ENTRY(float, f32, 4)
NK_SELECTIVE_BWD_ENTRY(float, f32, 16)
NK_SELECTIVE_BWD_ENTRY(__half, f16, 4)
NK_SELECTIVE_BWD_ENTRY(__half, f16, 16)
NK_SELECTIVE_BWD_ENTRY(__nv_bfloat16, bf16, 4)
NK_SELECTIVE_BWD_ENTRY(__nv_bfloat16, bf16, 16)
NK_SELECTIVE_BWD_ENTRY(double, f64, 4)
NK_SELECTIVE_BWD_ENTRY(double, f64, 16)

NK_SUM_PARTS_ENTRY(float, f32)
NK_SUM_PARTS_ENTRY(__half, f16)
NK_SUM_PARTS_ENTRY(__nv_bfloat16, bf16)
NK_SUM_PARTS_ENTRY(double, f64)
