// scan.selective (Mamba-1's fused selective scan), forward, chunked over time.
//
// x[t] = exp(dt[t] A) x[t-1] + dt[t] u[t] Bm[t];  y[t] = (Cm[t] . x[t] + Dskip u[t]) silu(z[t]).
// Time is cut into `chunks` chunks of `chunk_len` steps (the host picks the count so that
// B * D * chunks threads fill the GPU; one chunk when B * D alone does). Three launches:
//   1. scan_selective_fwd_summary_*: each (batch, channel, chunk) runs its chunk from a zero
//      state and stores the end state and sum(dt) (the chunk's decay is exp(A sum(dt)), one
//      exponential per state: no product of many small factors can underflow early);
//   2. scan_selective_fwd_carry_*: one thread per (batch, channel, state) chains the chunks in
//      order, storing the state entering each chunk (h0 or 0 for the first);
//   3. scan_selective_fwd_n*_*: each (batch, channel, chunk) reruns its chunk from its entering
//      state, writing y, and h_last from the last chunk. With one chunk only this launch runs,
//      from h0.
// Launches 1 and 3: one thread owns one (batch, channel, chunk), its N states and its row of
// A in registers (N up to the template's NMAX; the host picks the smallest instantiation that
// fits). A block is 128 consecutive channels of one (batch, chunk): loads of u, delta, z and
// stores of y are coalesced; the block stages the Bm and Cm rows of NK_SELECTIVE_STAGE steps
// in shared memory (one coalesced load, widened once), read back as broadcasts. Barriers:
// around each staging. Per step and state: one exp, three multiply-adds; launch 1 and 3 each
// pay them, so chunking doubles the exponentials for B * D * chunks-way parallelism instead of
// B * D. Deterministic: every sum has a fixed order.
// Inputs: sequences in T (f32/f64/f16/bf16); A, Dskip, delta_bias, h0 in the accumulator type.
#include "common.cuh"
#include "selective.cuh"

namespace {

template <typename A>
__device__ __forceinline__ A softplus(A x) {
  return x > A(20) ? x : log1p(exp(x));
}

template <typename A>
__device__ __forceinline__ A silu(A z) {
  return z / (A(1) + exp(-z));
}

// One (batch, channel, chunk). SUMMARY: from a zero state, writes end [B, chunks, D, N] and
// dt_sum [B, chunks, D]. Otherwise: from init (carries [B, chunks, D, N], else h0 [B, D, N],
// else zero), writes y and, for the last chunk, h_last.
template <typename T, int NMAX, bool SUMMARY>
__device__ void selective_chunk(const T* u, const T* delta, const typename Acc<T>::type* a, const T* bm,
                                const T* cm, const typename Acc<T>::type* dskip, const T* z,
                                const typename Acc<T>::type* delta_bias, const typename Acc<T>::type* h0,
                                const typename Acc<T>::type* carries, T* y, typename Acc<T>::type* h_last,
                                typename Acc<T>::type* end, typename Acc<T>::type* dt_sum, long long B, long long T_,
                                long long D, int N, int softplus_on, long long chunk_len) {
  using A = typename Acc<T>::type;
  constexpr int ST = NK_SELECTIVE_STAGE;
  __shared__ A sb[ST][NMAX], sc[ST][NMAX];
  // blockIdx.x = b * (channel blocks) + channel block: the batch is not limited to 65535
  const long long channel_blocks = (D + NK_SELECTIVE_THREADS - 1) / NK_SELECTIVE_THREADS;
  const long long b = blockIdx.x / channel_blocks;
  const long long d = (blockIdx.x % channel_blocks) * NK_SELECTIVE_THREADS + threadIdx.x;
  const long long c = blockIdx.y, chunks = gridDim.y;
  const bool active = d < D;
  const long long t_begin = c * chunk_len, t_end = min(T_, t_begin + chunk_len);
  const long long lane_id = b * D + d;                  // (batch, channel), when active
  const long long chunk_id = (b * chunks + c) * D + d;  // (batch, chunk, channel), when active
  A x[NMAX], a_row[NMAX];
#pragma unroll
  for (int j = 0; j < NMAX; ++j) {
    const bool ok = active && j < N;
    A init = A(0);
    if (!SUMMARY && ok) init = carries ? carries[chunk_id * N + j] : (h0 ? h0[lane_id * N + j] : A(0));
    x[j] = init;
    a_row[j] = ok ? a[d * N + j] : A(0);
  }
  const A bias = (active && delta_bias) ? delta_bias[d] : A(0);
  const A skip = (active && dskip) ? dskip[d] : A(0);
  A dts = A(0);
  for (long long t0 = t_begin; t0 < t_end; t0 += ST) {
    const int n = (int)min((long long)ST, t_end - t0);
    __syncthreads();  // every thread is done with the previous stage
    for (int i = threadIdx.x; i < n * N; i += NK_SELECTIVE_THREADS) {
      const int s = i / N, j = i % N;
      const long long at = (b * T_ + t0 + s) * N + j;
      sb[s][j] = to_acc(bm[at]);
      if (!SUMMARY) sc[s][j] = to_acc(cm[at]);
    }
    __syncthreads();
    if (!active) continue;
    for (int s = 0; s < n; ++s) {
      const long long at = (b * T_ + t0 + s) * D + d;
      A dt = to_acc(delta[at]) + bias;
      if (softplus_on) dt = softplus(dt);
      const A uv = to_acc(u[at]);
      const A dtu = dt * uv;
      dts += dt;
      A out = A(0);
#pragma unroll
      for (int j = 0; j < NMAX; ++j) {
        if (j < N) {
          x[j] = exp(dt * a_row[j]) * x[j] + dtu * sb[s][j];
          if (!SUMMARY) out += sc[s][j] * x[j];
        }
      }
      if (!SUMMARY) {
        out += skip * uv;
        if (z) out *= silu(to_acc(z[at]));
        y[at] = from_acc<T>(out);
      }
    }
  }
  if (!active) return;
  if (SUMMARY) {
#pragma unroll
    for (int j = 0; j < NMAX; ++j)
      if (j < N) end[chunk_id * N + j] = x[j];
    dt_sum[chunk_id] = dts;
  } else if (c == chunks - 1) {
#pragma unroll
    for (int j = 0; j < NMAX; ++j)
      if (j < N) h_last[lane_id * N + j] = x[j];
  }
}

// The state entering every chunk: one thread per (batch, channel, state), chunks in order.
template <typename A>
__device__ void selective_carry(const A* a, const A* h0, const A* end, const A* dt_sum, A* carries, long long B,
                                long long D, int N, long long chunks) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= B * D * N) return;
  const long long b = i / (D * N), dn = i % (D * N), d = dn / N;
  const A a_dn = a[dn];
  A carry = h0 ? h0[i] : A(0);
  for (long long c = 0; c < chunks; ++c) {
    const long long at = (b * chunks + c) * D * N + dn;
    carries[at] = carry;
    carry = exp(a_dn * dt_sum[(b * chunks + c) * D + d]) * carry + end[at];
  }
}

}  // namespace

#define NK_SELECTIVE_ENTRY(T, NAME, NMAX)                                                                         \
  extern "C" __global__ void __launch_bounds__(NK_SELECTIVE_THREADS) scan_selective_fwd_n##NMAX##_##NAME(        \
      const T* u, const T* delta, const Acc<T>::type* a, const T* bm, const T* cm, const Acc<T>::type* dskip,     \
      const T* z, const Acc<T>::type* delta_bias, const Acc<T>::type* h0, const Acc<T>::type* carries, T* y,      \
      Acc<T>::type* h_last, long long B, long long T_, long long D, int N, int softplus_on, long long chunk_len) { \
    selective_chunk<T, NMAX, false>(u, delta, a, bm, cm, dskip, z, delta_bias, h0, carries, y, h_last, nullptr,   \
                                    nullptr, B, T_, D, N, softplus_on, chunk_len);                               \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(NK_SELECTIVE_THREADS, 1)                                          \
      scan_selective_fwd_summary_n##NMAX##_##NAME(const T* u, const T* delta, const Acc<T>::type* a, const T* bm, \
                                                  const Acc<T>::type* delta_bias, Acc<T>::type* end,             \
                                                  Acc<T>::type* dt_sum, long long B, long long T_, long long D,  \
                                                  int N, int softplus_on, long long chunk_len) {                 \
    selective_chunk<T, NMAX, true>(u, delta, a, bm, nullptr, nullptr, nullptr, delta_bias, nullptr, nullptr,      \
                                   nullptr, nullptr, end, dt_sum, B, T_, D, N, softplus_on, chunk_len);          \
  }

#define NK_SELECTIVE_CARRY_ENTRY(A, NAME)                                                                        \
  extern "C" __global__ void scan_selective_fwd_carry_##NAME(const A* a, const A* h0, const A* end,              \
                                                              const A* dt_sum, A* carries, long long B,          \
                                                              long long D, int N, long long chunks) {            \
    selective_carry<A>(a, h0, end, dt_sum, carries, B, D, N, chunks);                                            \
  }

#define NK_SELECTIVE_ALL_N(T, NAME) \
  NK_SELECTIVE_ENTRY(T, NAME, 4)    \
  NK_SELECTIVE_ENTRY(T, NAME, 16)   \
  NK_SELECTIVE_ENTRY(T, NAME, 64)

NK_SELECTIVE_ALL_N(float, f32)
NK_SELECTIVE_ALL_N(__half, f16)
NK_SELECTIVE_ALL_N(__nv_bfloat16, bf16)
// f64 states take two registers each: 64 of them (plus A's row) would spill
NK_SELECTIVE_ENTRY(double, f64, 4)
NK_SELECTIVE_ENTRY(double, f64, 16)
NK_SELECTIVE_ENTRY(double, f64, 32)

NK_SELECTIVE_CARRY_ENTRY(float, f32)
NK_SELECTIVE_CARRY_ENTRY(double, f64)
