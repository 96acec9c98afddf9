// scan.gla forward on tensor cores, for f16/bf16 inputs (the f32/f64 forward is gla.cu).
//
// Same chunked form as gla.cu and the CPU (src/scan/gla/chunked.rs), in chunks of C = 16
// steps; one block per (value tile of 64 columns, head, batch) walks time chunk by chunk
// with its state slice S [Kp x 64] (K rounded up to 16) in shared memory as f32. Per chunk,
// with P[t] = running product of e^{g} from the chunk start and R[t] = running product of
// e^{g} after t to the chunk's end (per key channel; both <= 1 for gates <= 0):
//   Q~ = scale q P,  K^ = k / P,  K~ = k R,
//   A  = Q~ K^T masked to tau <= t    (when every P lies in [e^-40, 1]; a chunk with stronger
//        or -inf gates forms A directly from running sums of log-gates, never -inf - -inf),
//   o  = Q~ S + A v,
//   S  = diag(P_last) S + K~^T v.
// The three products run on tensor cores (wmma m16n16k8, TF32 operands, f32 accumulation),
// with every f32 operand split into a TF32 high part and a TF32 remainder and the three
// significant cross products summed (hi.hi + hi.lo + lo.hi): close to f32 accuracy. Why TF32
// and not the inputs' 16-bit type: the operands are the f32 state and gate-scaled rows, which
// f16 cannot hold (the state of a long sequence with gates near 1 exceeds 65504; K^ reaches
// e^40 |k|) and bf16 holds to 3 digits only; the states stay f32 as the contract promises.
//
// Per chunk: load (q, k, g, v as f32) | per-channel P, R, range check | [direct A] | scale the
// rows | warp 0: A; warps 4-7: o tiles = Q~ S | warps 4-7: o += A v; all warps: S tiles |
// write o. Parallelism: B * H * ceil(V / 64) blocks, sequential over chunks.
// scripts/emulate-gla-tc.py replays this block on a flat shared-memory array (same offsets,
// strides and wmma pointers) in numpy against the float64 recurrence.
#include <mma.h>

#include "common.cuh"
#include "gla.cuh"

namespace {

using namespace nvcuda;

constexpr int C = NK_GLA_TC_CHUNK;
constexpr int VT = NK_GLA_TC_VALUE_TILE;
constexpr int PAD = NK_GLA_TC_PAD;
constexpr int TPB = NK_GLA_THREADS;
constexpr int WARPS = TPB / 32;
constexpr int VLD = VT + PAD;  // row stride of v, o and S tiles (floats)
constexpr int ALD = C + PAD;   // row stride of A
static_assert(C == 16 && VT % 16 == 0 && PAD % 4 == 0 && WARPS == 8, "tile geometry");
static_assert(C * C == TPB, "the direct intra-chunk form gives each thread one (t, tau) pair");
static_assert(VT / 16 == 4, "warps 4-7 own the four 16-column output tiles");

using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// hi = TF32(x), lo = TF32(x - hi), element by element (the fragment layout does not matter).
template <typename F>
__device__ __forceinline__ void split_tf32(F& hi, F& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    const float h = wmma::__float_to_tf32(x);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(x - h);
  }
}

// acc += a b with split operands: a_hi b_hi + a_hi b_lo + a_lo b_hi (a_lo b_lo is below f32's
// rounding of the sum).
template <typename FA, typename FB>
__device__ __forceinline__ void mma_split(FragC& acc, FA& a, FB& b) {
  FA a_lo;
  FB b_lo;
  split_tf32(a, a_lo);
  split_tf32(b, b_lo);
  wmma::mma_sync(acc, a, b, acc);
  wmma::mma_sync(acc, a, b_lo, acc);
  wmma::mma_sync(acc, a_lo, b, acc);
}

template <typename T>
__device__ void gla_forward_tc(const T* q, const T* k, const T* v, const T* g, const float* h0, T* o, float* h_last,
                               long long B, long long T_, int H, int K, int V, float scale) {
  const int kp = (K + 15) / 16 * 16;  // key channels, padded with zero channels
  const int kld = kp + PAD;           // row stride of the [C][kp] tiles
  extern __shared__ __align__(128) float smem[];
  // every region's size is a multiple of 32 bytes, so each starts 32-byte aligned (wmma)
  float* sq = smem;           // [C][kld]: q, then Q~
  float* sk = sq + C * kld;   // [C][kld]: k, then K~
  float* sg = sk + C * kld;   // [C][kld]: g, then K^ (factored A)
  float* sa = sg + C * kld;   // [C][ALD]: A
  float* sv = sa + C * ALD;   // [C][VLD]: v
  float* so = sv + C * VLD;   // [C][VLD]: o of the chunk
  float* ss = so + C * VLD;   // [kp][VLD]: the state slice
  float* sp_last = ss + kp * VLD;  // [kp]: P at the chunk's end
  int* s_direct = reinterpret_cast<int*>(sp_last + kp);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const long long b = blockIdx.z;
  const int h = blockIdx.y;
  const long long c0 = (long long)blockIdx.x * VT;  // 64-bit: c0 + VT - 1 may pass 2^31
  const long long head = b * H + h;

  for (int e = tid; e < kp * VT; e += TPB) {
    const int r = e / VT, c = e % VT;
    ss[r * VLD + c] = (h0 && r < K && c0 + c < V) ? h0[(head * K + r) * V + c0 + c] : 0.0f;
  }

  for (long long t0 = 0; t0 < T_; t0 += C) {
    const int n = (int)min((long long)C, T_ - t0);
    __syncthreads();  // the previous chunk is done with every buffer
    // rows past the sequence's end are zero (g = 0: they leave P and R unchanged)
    for (int e = tid; e < C * kp; e += TPB) {
      const int j = e / kp, kk = e % kp;
      const bool in = j < n && kk < K;
      const long long at = ((b * T_ + t0 + j) * H + h) * K + kk;
      sq[j * kld + kk] = in ? to_acc(q[at]) : 0.0f;
      sk[j * kld + kk] = in ? to_acc(k[at]) : 0.0f;
      sg[j * kld + kk] = in ? to_acc(g[at]) : 0.0f;
    }
    for (int e = tid; e < C * VT; e += TPB) {
      const int j = e / VT, c = e % VT;
      sv[j * VLD + c] = (j < n && c0 + c < V) ? to_acc(v[((b * T_ + t0 + j) * H + h) * V + c0 + c]) : 0.0f;
    }
    if (tid == 0) *s_direct = 0;
    __syncthreads();

    // one thread per key channel: P and R as running products of e^{g} (a -inf gate gives
    // exact zeros), kept in registers until every channel has been range-checked
    float p[C], r[C];
    if (tid < kp) {
      float e[C];
#pragma unroll
      for (int j = 0; j < C; ++j) e[j] = expf(sg[j * kld + tid]);
      float run = 1.0f;
      bool out_of_range = false;
#pragma unroll
      for (int j = 0; j < C; ++j) {
        run *= e[j];
        p[j] = run;
        out_of_range |= !(run >= 4.2483543e-18f && run <= 2.3538527e+17f);  // e^-40, e^40
      }
      run = 1.0f;
#pragma unroll
      for (int j = C - 1; j >= 0; --j) {
        r[j] = run;
        run *= e[j];
      }
      if (out_of_range) *s_direct = 1;
    }
    __syncthreads();
    const bool direct = *s_direct != 0;

    if (direct) {
      // A[t][tau] = scale sum_k q[t,k] k[tau,k] e^{g[tau+1,k] + ... + g[t,k]}, from the raw rows
      const int t = tid / C, tau = tid % C;
      float acc = 0.0f;
      if (tau <= t) {
        for (int kk = 0; kk < K; ++kk) {
          float span = 0.0f;
          for (int u = tau + 1; u <= t; ++u) span += sg[u * kld + kk];
          acc += sq[t * kld + kk] * sk[tau * kld + kk] * expf(span);
        }
      }
      sa[t * ALD + tau] = scale * acc;
      __syncthreads();  // the raw rows are read before they are scaled
    }
    if (tid < kp) {
#pragma unroll
      for (int j = 0; j < C; ++j) {
        const float kj = sk[j * kld + tid];
        sq[j * kld + tid] *= scale * p[j];
        if (!direct) sg[j * kld + tid] = kj / p[j];
        sk[j * kld + tid] = kj * r[j];
      }
      sp_last[tid] = p[C - 1];
    }
    __syncthreads();

    // warp 0: A = Q~ K^T (factored form); warps 4-7: their o tile = Q~ S
    FragC o_acc;
    if (warp == 0 && !direct) {
      FragC a_acc;
      wmma::fill_fragment(a_acc, 0.0f);
      for (int k0 = 0; k0 < kp; k0 += 8) {
        FragA a;
        FragBT bt;  // K^ [tau][k] read as the column-major k x tau matrix K^T
        wmma::load_matrix_sync(a, sq + k0, kld);
        wmma::load_matrix_sync(bt, sg + k0, kld);
        mma_split(a_acc, a, bt);
      }
      wmma::store_matrix_sync(sa, a_acc, ALD, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < C * C; e += 32)
        if (e % C > e / C) sa[(e / C) * ALD + e % C] = 0.0f;
    } else if (warp >= 4) {
      const int col = (warp - 4) * 16;
      wmma::fill_fragment(o_acc, 0.0f);
      for (int k0 = 0; k0 < kp; k0 += 8) {
        FragA a;
        FragB bs;
        wmma::load_matrix_sync(a, sq + k0, kld);
        wmma::load_matrix_sync(bs, ss + k0 * VLD + col, VLD);
        mma_split(o_acc, a, bs);
      }
    }
    __syncthreads();

    // warps 4-7: o += A v; every warp: its S tiles, S = diag(P_last) S + K~^T v
    if (warp >= 4) {
      const int col = (warp - 4) * 16;
      for (int k0 = 0; k0 < C; k0 += 8) {
        FragA a;
        FragB bv;
        wmma::load_matrix_sync(a, sa + k0, ALD);
        wmma::load_matrix_sync(bv, sv + k0 * VLD + col, VLD);
        mma_split(o_acc, a, bv);
      }
      wmma::store_matrix_sync(so + col, o_acc, VLD, wmma::mem_row_major);
    }
    const int state_tiles = (kp / 16) * (VT / 16);
    for (int tile = warp; tile < state_tiles; tile += WARPS) {
      const int row = (tile / (VT / 16)) * 16, col = (tile % (VT / 16)) * 16;
      float* st = ss + row * VLD + col;
      for (int e = lane; e < 256; e += 32) st[(e / 16) * VLD + e % 16] *= sp_last[row + e / 16];
      __syncwarp();
      FragC s_acc;
      wmma::load_matrix_sync(s_acc, st, VLD, wmma::mem_row_major);
      for (int k0 = 0; k0 < C; k0 += 8) {
        FragAT at;  // K~ [tau][k] read as the column-major k x tau matrix K~^T
        FragB bv;
        wmma::load_matrix_sync(at, sk + k0 * kld + row, kld);
        wmma::load_matrix_sync(bv, sv + k0 * VLD + col, VLD);
        mma_split(s_acc, at, bv);
      }
      wmma::store_matrix_sync(st, s_acc, VLD, wmma::mem_row_major);
    }
    __syncthreads();

    for (int e = tid; e < n * VT; e += TPB) {
      const int j = e / VT, c = e % VT;
      if (c0 + c < V) o[((b * T_ + t0 + j) * H + h) * V + c0 + c] = from_acc<T>(so[j * VLD + c]);
    }
  }
  __syncthreads();
  for (int e = tid; e < K * VT; e += TPB) {
    const int r = e / VT, c = e % VT;
    if (c0 + c < V) h_last[(head * K + r) * V + c0 + c] = ss[r * VLD + c];
  }
}

}  // namespace

// Same arguments as scan_gla_fwd_* (gla.cu), so the host swaps only the name; dynamic shared
// memory: 4 * (3 C (Kp + PAD) + C (C + PAD) + 2 C (VT + PAD) + Kp (VT + PAD) + Kp) + 4 bytes.
#define NK_GLA_TC_ENTRY(T, NAME)                                                                              \
  extern "C" __global__ void __launch_bounds__(NK_GLA_THREADS, 1)                                            \
      scan_gla_fwd_tc_##NAME(const T* q, const T* k, const T* v, const T* g, const float* h0, T* o,          \
                             float* h_last, long long B, long long T_, int H, int K, int V, float scale) {   \
    gla_forward_tc<T>(q, k, v, g, h0, o, h_last, B, T_, H, K, V, scale);                                      \
  }

NK_GLA_TC_ENTRY(__half, f16)
NK_GLA_TC_ENTRY(__nv_bfloat16, bf16)
