// The sparse top-k family on the GPU, part two: the fused encoder behind sae.encode,
// sae.encode_batch_topk, sae.encode_jumprelu, sae.encode_mp and codebook.nearest, and the
// kernels of sae.backward.
//
// sae_select: scores s[b, l] = fma(((x[b] − offset)·row_scale[b])·w[l], scale[l], shift[l])
// for a tile of NK_SAE_ROWS rows against a range of latents (blockIdx.y picks the range,
// so small batches still fill the GPU), NK_SAE_LATENTS latents at a time: the operand tiles
// (NK_SAE_DEPTH model dims) staged in shared memory as f32, each thread a 2 × 4 register
// tile whose dot products run over d in order (the CPU encoder's order, so the scores match
// it); for f16/bf16 one 16×16×16 tensor-core fragment per warp instead (wmma, f32
// accumulate; b_dec is then folded into the shift on the host side, shift − b_dec·w[l], as
// the operands stay in their 16-bit type, and row_scale is applied to the product). Then
// the tile's scores go to shared memory and each warp filters its rows:
// - top-k modes: a key (select.cuh) enters the row's candidate buffer when it beats the
//   row's threshold (one compare; warp-aggregated appends); a full buffer is sorted by the
//   warp that owns the row and cut to k. Out: the best k keys of every (row, latent range),
//   [rows, ranges, k], merged by topk_keys in kernels/topk.cu when there are several ranges.
// - above modes (JumpReLU thresholds, BatchTopK's global threshold): s > theta[l] counts
//   (pass 1: per-row counts) or is written at the row's CSR offset (pass 2: unordered
//   within the row; the host sorts each row).
// The [B, L] scores never exist: memory beyond inputs and outputs is O(rows × ranges × k).
// Bound: 2·B·L·Dm flops (SIMT FMA rate for f32, tensor cores for f16/bf16), w read once
// per row tile (from L2 while row tiles share it).
//
// Backward (sae_bwd_*): dpre per selection (a warp per (b, j)), dw_dec/dw_enc/db_enc per
// latent from the selections grouped by latent (the grouping is built on the host, so each
// latent's sum runs in (b, j) order: deterministic, no atomics), dx per row, db_dec per
// column summed over rows in order.
#include <mma.h>

#include "common.cuh"
#include "sae.cuh"
#include "select.cuh"

namespace {

constexpr int TPB = NK_SAE_THREADS;
constexpr int BM = NK_SAE_ROWS;
constexpr int BN = NK_SAE_LATENTS;
constexpr int BK = NK_SAE_DEPTH;
constexpr int WARPS = TPB / 32;
constexpr unsigned FULL = 0xffffffffu;
// the register tile: rows ty + 16·i (i < TR), latents tx + 16·j (j < TL)
constexpr int TR = BM / 16, TL = BN / 16;
static_assert(TPB == 256 && BM % 16 == 0 && BN % 32 == 0, "tile geometry");
// tensor-core tiles: one 16×16 fragment of the score tile per warp; operand rows padded to
// TC_LD elements (a multiple of 8, rows 32-byte aligned as wmma loads need)
constexpr int TC_LD = BK + 8;
static_assert((BM / 16) * (BN / 16) == WARPS && BK % 16 == 0, "tensor-core tile geometry");

enum Mode { TOPK = 0, TOPK_RELU = 1, ABOVE_COUNT = 2, ABOVE_WRITE = 3 };

// Sums v over the block (every thread gets the total), in a fixed order.
__device__ float block_sum(float v) {
  __shared__ float partial[WARPS];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL, v, off);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < WARPS; ++w) total += partial[w];
  return total;
}

// The tensor-core score tile: sc[r][c] = x[row0 + r]·w[l0 + c] (f32 accumulate), zero
// rows/latents/depth past the ends. xs [BM][TC_LD] and ws [BN][TC_LD] are staging tiles.
template <typename T>
__device__ void score_tile_tensor(const T* x, const T* w, long long row0, int nrows, int l0, int l_end, int dm, T* xs,
                                  T* ws, float* sc, int sc_ld) {
  using namespace nvcuda;
  const int warp = threadIdx.x >> 5;
  const int fi = warp / (BN / 16), fj = warp % (BN / 16);
  // staged as raw 16-bit patterns (0 is +0.0 in both types)
  const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);
  const unsigned short* wb = reinterpret_cast<const unsigned short*>(w);
  unsigned short* xsb = reinterpret_cast<unsigned short*>(xs);
  unsigned short* wsb = reinterpret_cast<unsigned short*>(ws);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int d0 = 0; d0 < dm; d0 += BK) {
    __syncthreads();  // the last step's fragment loads are done
    for (int e = threadIdx.x; e < BM * BK; e += TPB) {
      const int r = e / BK, d = e % BK;
      xsb[r * TC_LD + d] = (r < nrows && d0 + d < dm) ? xb[(row0 + r) * dm + d0 + d] : (unsigned short)0;
    }
    for (int e = threadIdx.x; e < BN * BK; e += TPB) {
      const int c = e / BK, d = e % BK;
      wsb[c * TC_LD + d] = (l0 + c < l_end && d0 + d < dm) ? wb[(long long)(l0 + c) * dm + d0 + d] : (unsigned short)0;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      // A = x rows (row-major M×K); B = w rows read as a column-major K×N matrix
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(a, xs + fi * 16 * TC_LD + kk, TC_LD);
      wmma::load_matrix_sync(b, ws + fj * 16 * TC_LD + kk, TC_LD);
      wmma::mma_sync(acc, a, b, acc);
    }
  }
  wmma::store_matrix_sync(sc + fi * 16 * sc_ld + fj * 16, acc, sc_ld, wmma::mem_row_major);
}

template <typename TX, typename TW, bool TENSOR>
__device__ void sae_select(const TX* x, const TW* w, const float* offset, const float* row_scale,
                           const float* scale, const float* shift, const float* theta, float theta_all,
                           long long rows, int dm, int latents, int range_len, int mode, int k, int cap,
                           nk_key* keys_out, int* counts, const long long* offsets, int* cursors) {
  extern __shared__ __align__(128) unsigned char smem[];
  const bool topk = mode == TOPK || mode == TOPK_RELU;
  nk_key* keys = reinterpret_cast<nk_key*>(smem);        // [BM][cap], top-k modes only
  nk_key* threshold = keys + (topk ? BM * cap : 0);       // [BM]
  int* count = reinterpret_cast<int*>(threshold + BM);   // [BM]
  // SIMT: f32 xs [BK][BM + 1], ws [BK][BN + 1], sc [BM][BN + 1]; tensor cores: TW xs
  // [BM][TC_LD], ws [BN][TC_LD], then f32 sc [BM][BN + 4] (smaller; the host sizes the
  // SIMT layout). Every region starts 128-byte aligned: the regions before are multiples.
  constexpr int SC = TENSOR ? BN + 4 : BN + 1;
  float* xs = reinterpret_cast<float*>(count + BM);
  float* ws = xs + BK * (BM + 1);
  TW* xs_t = reinterpret_cast<TW*>(xs);
  TW* ws_t = xs_t + BM * TC_LD;
  float* sc = TENSOR ? reinterpret_cast<float*>(ws_t + BN * TC_LD) : ws + BK * (BN + 1);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tx = tid % 16, ty = tid / 16;
  const long long row0 = (long long)blockIdx.x * BM;
  const int nrows = (int)min((long long)BM, rows - row0);
  const int l_begin = blockIdx.y * range_len;
  const int l_end = min(latents, l_begin + range_len);
  if (tid < BM) {
    count[tid] = 0;
    threshold[tid] = 0;  // open: every real key is > 0
  }

  for (int l0 = l_begin; l0 < l_end; l0 += BN) {
    __syncthreads();  // the last tile's readers of sc are done (the depth loop may be empty)
    if constexpr (TENSOR) {
      score_tile_tensor<TW>(x, w, row0, nrows, l0, l_end, dm, xs_t, ws_t, sc, SC);
      __syncthreads();
      for (int e = tid; e < BM * BN; e += TPB) {
        const int r = e / BN, c = e % BN, l = l0 + c;
        float v = sc[r * SC + c];
        if (row_scale && r < nrows) v *= row_scale[row0 + r];
        if (l < l_end) v = fmaf(v, scale ? scale[l] : 1.0f, shift ? shift[l] : 0.0f);
        sc[r * SC + c] = v;
      }
    } else {
      float acc[TR][TL];
#pragma unroll
      for (int i = 0; i < TR; ++i)
#pragma unroll
        for (int j = 0; j < TL; ++j) acc[i][j] = 0.0f;
      for (int d0 = 0; d0 < dm; d0 += BK) {
        __syncthreads();  // the last step's readers of xs and ws are done
        // lanes walk d (coalesced global reads); the +1 pads keep the transposed stores
        // free of bank conflicts
        for (int e = tid; e < BM * BK; e += TPB) {
          const int r = e / BK, d = e % BK;
          float v = 0.0f;
          if (r < nrows && d0 + d < dm) {
            v = to_acc(x[(row0 + r) * dm + d0 + d]);
            if (offset) v -= offset[d0 + d];
            if (row_scale) v *= row_scale[row0 + r];
          }
          xs[d * (BM + 1) + r] = v;
        }
        for (int e = tid; e < BN * BK; e += TPB) {
          const int c = e / BK, d = e % BK;
          float v = 0.0f;
          if (l0 + c < l_end && d0 + d < dm) v = to_acc(w[(long long)(l0 + c) * dm + d0 + d]);
          ws[d * (BN + 1) + c] = v;
        }
        __syncthreads();
        const int depth = min(BK, dm - d0);
        for (int d = 0; d < depth; ++d) {
          float a[TR], b[TL];
#pragma unroll
          for (int i = 0; i < TR; ++i) a[i] = xs[d * (BM + 1) + ty + 16 * i];
#pragma unroll
          for (int j = 0; j < TL; ++j) b[j] = ws[d * (BN + 1) + tx + 16 * j];
#pragma unroll
          for (int i = 0; i < TR; ++i)
#pragma unroll
            for (int j = 0; j < TL; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
      }
#pragma unroll
      for (int j = 0; j < TL; ++j) {
        const int c = tx + 16 * j, l = l0 + c;
        const float mul = (scale && l < l_end) ? scale[l] : 1.0f;
        const float add = (shift && l < l_end) ? shift[l] : 0.0f;
#pragma unroll
        for (int i = 0; i < TR; ++i) sc[(ty + 16 * i) * SC + c] = fmaf(acc[i][j], mul, add);
      }
    }
    __syncthreads();

    // each warp filters its rows (warp, warp + WARPS, ...)
    for (int r = warp; r < nrows; r += WARPS) {
      for (int c0 = 0; c0 < BN; c0 += 32) {
        const int l = l0 + c0 + lane;
        bool pass = false;
        nk_key key = 0;
        if (l < l_end) {
          const float s = sc[r * SC + c0 + lane];
          if (topk) {
            // ReLU keeps NaN (it ranks first)
            const float z = (mode == TOPK_RELU && !(s != s)) ? fmaxf(s, 0.0f) : s;
            key = make_key(order_bits(z), (unsigned)l);
            pass = key > threshold[r];
          } else {
            pass = s > (theta ? theta[l] : theta_all);  // NaN never passes
            key = make_key(order_bits(s), (unsigned)l);
          }
        }
        const unsigned ballot = __ballot_sync(FULL, pass);
        if (ballot == 0) continue;
        const int before = __popc(ballot & ((1u << lane) - 1u));
        const int total = __popc(ballot);
        if (mode == ABOVE_COUNT) {
          if (lane == 0) count[r] += total;
        } else if (mode == ABOVE_WRITE) {
          int base = 0;
          if (lane == 0) base = atomicAdd(&cursors[row0 + r], total);
          base = __shfl_sync(FULL, base, 0);
          if (pass) keys_out[offsets[row0 + r] + base + before] = key;
        } else {
          const int at = count[r];
          if (pass) keys[r * cap + at + before] = key;
          __syncwarp();
          if (lane == 0) count[r] = at + total;
          __syncwarp();
        }
      }
      if (topk && count[r] + BN > cap) {
        compact(keys + r * cap, cap, &count[r], &threshold[r], k, lane, 32, WarpSync{});
      }
    }
  }

  if (topk) {
    const long long ranges = gridDim.y;
    for (int r = warp; r < nrows; r += WARPS) {
      compact(keys + r * cap, cap, &count[r], &threshold[r], k, lane, 32, WarpSync{});
      nk_key* dst = keys_out + ((row0 + r) * ranges + blockIdx.y) * (long long)k;
      for (int j = lane; j < k; j += 32) dst[j] = keys[r * cap + j];
    }
  } else if (mode == ABOVE_COUNT) {
    __syncthreads();
    if (tid < nrows && count[tid] > 0) atomicAdd(&counts[row0 + tid], count[tid]);
  }
}

// out[l] = shift[l] − offset·w[l] (a block per latent): b_dec folded into the shift for the
// tensor-core encoder, whose operands stay in their 16-bit type.
template <typename T>
__device__ void sae_fold_offset(const T* w, const float* offset, const float* shift, float* out, int dm) {
  const long long l = blockIdx.x;
  float s = 0.0f;
  for (int d = threadIdx.x; d < dm; d += TPB) s = fmaf(offset[d], to_acc(w[l * dm + d]), s);
  s = block_sum(s);
  if (threadIdx.x == 0) out[l] = (shift ? shift[l] : 0.0f) - s;
}

// keys [n] (n = rows·k) → values and indices; with x_norms (codebook l2), the value is
// the squared distance max(|x|² − s, 0) (NaN stays).
template <typename T>
__device__ void sae_keys_out(const nk_key* keys, long long n, int k, const float* x_norms, T* values, int* indices) {
  const long long i = (long long)blockIdx.x * TPB + threadIdx.x;
  if (i >= n) return;
  const nk_key key = keys[i];
  float v = key_value(key);
  if (x_norms) {
    v = x_norms[i / k] - v;
    if (v < 0.0f) v = 0.0f;
  }
  values[i] = from_acc<T>(v);
  indices[i] = key_index(key);
}

// One value per row of m [rows, dm], a block per row: 0 → Σ v², 1 → 1/|v| (0 for a zero
// row), 2 → −Σ v².
template <typename T>
__device__ void sae_row_norms(const T* m, int dm, int mode, float* out) {
  const long long row = blockIdx.x;
  float s = 0.0f;
  for (int d = threadIdx.x; d < dm; d += TPB) {
    const float v = to_acc(m[row * dm + d]);
    s = fmaf(v, v, s);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    if (mode == 1) {
      const float norm = sqrtf(s);
      out[row] = norm > 0.0f ? 1.0f / norm : 0.0f;
    } else {
      out[row] = mode == 2 ? -s : s;
    }
  }
}

// Matching pursuit: residual [B, dm] = x − b_dec in f32.
template <typename T>
__device__ void sae_mp_start(const T* x, const float* offset, float* residual, long long n, int dm) {
  const long long i = (long long)blockIdx.x * TPB + threadIdx.x;
  if (i >= n) return;
  const float v = to_acc(x[i]);
  residual[i] = offset ? v - offset[i % dm] : v;
}

// One matching-pursuit step per row (a block per row): the best atom j and its score c
// from best [B] (top-1 keys), recorded at `step`, and r −= c·w[j] (product, then
// difference: the CPU's rounding).
template <typename T>
__device__ void sae_mp_step(const nk_key* best, const T* w, float* residual, T* values, int* indices, int k, int step,
                            int dm) {
  const long long b = blockIdx.x;
  const nk_key key = best[b];
  const float c = key_value(key);
  const long long j = key_index(key);
  if (threadIdx.x == 0) {
    values[b * k + step] = from_acc<T>(c);
    indices[b * k + step] = (int)j;
  }
  for (int d = threadIdx.x; d < dm; d += TPB) {
    const long long at = b * dm + d;
    residual[at] = __fsub_rn(residual[at], __fmul_rn(c, to_acc(w[j * dm + d])));
  }
}

template <typename T>
__device__ void sae_to_f32(const T* in, float* out, long long n) {
  const long long i = (long long)blockIdx.x * TPB + threadIdx.x;
  if (i < n) out[i] = to_acc(in[i]);
}

template <typename T>
__device__ void sae_from_f32(const float* in, T* out, long long n) {
  const long long i = (long long)blockIdx.x * TPB + threadIdx.x;
  if (i < n) out[i] = from_acc<T>(in[i]);
}

// dpre[b, j] = d_xhat[b]·w_dec[idx] where values[b, j] > 0, else 0; a warp per (b, j),
// lanes over Dm, a fixed reduction order.
template <typename T>
__device__ void sae_bwd_dpre(const T* d_xhat, const T* w_dec, const int* indices, const T* values, float* dpre,
                             long long n, int k, int dm) {
  const long long flat = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (flat >= n) return;
  const float v = to_acc(values[flat]);
  if (!(v > 0.0f)) {
    if (lane == 0) dpre[flat] = 0.0f;
    return;
  }
  const long long b = flat / k, l = indices[flat];
  float s = 0.0f;
  for (int d = lane; d < dm; d += 32) s = fmaf(to_acc(d_xhat[b * dm + d]), to_acc(w_dec[l * dm + d]), s);
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL, s, off);
  if (lane == 0) dpre[flat] = s;
}

// Per latent l (a block each): dw_dec[l] = Σ v·d_xhat[b], dw_enc[l] = Σ dpre·x[b] −
// (Σ dpre)·b_dec, db_enc[l] = Σ dpre over the selections of l, in the order of by_latent
// (ascending flat index b·k + j); zero rows for latents never selected.
template <typename T>
__device__ void sae_bwd_latent(const int* start, const int* by_latent, const T* values, const float* dpre,
                               const T* d_xhat, const T* x, const float* b_dec, T* dw_dec, T* dw_enc, T* db_enc, int k,
                               int dm) {
  const long long l = blockIdx.x;
  const int first = start[l], last = start[l + 1];
  float bias = 0.0f;
  for (int p = first; p < last; ++p) bias += dpre[by_latent[p]];
  for (int d = threadIdx.x; d < dm; d += TPB) {
    float acc_dec = 0.0f, acc_enc = 0.0f;
    for (int p = first; p < last; ++p) {
      const long long flat = by_latent[p], b = flat / k;
      acc_dec = fmaf(to_acc(values[flat]), to_acc(d_xhat[b * dm + d]), acc_dec);
      acc_enc = fmaf(dpre[flat], to_acc(x[b * dm + d]), acc_enc);
    }
    // rounded as the CPU rounds it (a product, then a difference: no contracted fma, which
    // differs most where x ≈ b_dec makes the two terms nearly cancel)
    if (b_dec) acc_enc = __fsub_rn(acc_enc, __fmul_rn(bias, to_acc(b_dec[d])));
    dw_dec[l * dm + d] = from_acc<T>(acc_dec);
    dw_enc[l * dm + d] = from_acc<T>(acc_enc);
  }
  if (threadIdx.x == 0) db_enc[l] = from_acc<T>(bias);
}

// dx[b] = Σ_j dpre·w_enc[idx] (selections with dpre = 0 skipped), kept in f32 too for db_dec;
// a block per row.
template <typename T>
__device__ void sae_bwd_dx(const int* indices, const float* dpre, const T* w_enc, T* dx, float* dx_acc, int k, int dm) {
  const long long b = blockIdx.x;
  for (int d = threadIdx.x; d < dm; d += TPB) {
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) {
      const float dp = dpre[b * k + j];
      if (dp != 0.0f) acc = fmaf(dp, to_acc(w_enc[(long long)indices[b * k + j] * dm + d]), acc);
    }
    dx[b * dm + d] = from_acc<T>(acc);
    dx_acc[b * dm + d] = acc;
  }
}

// db_dec[d] = Σ_b (d_xhat[b, d] − dx[b, d]), rows in order; a thread per column.
template <typename T>
__device__ void sae_bwd_db_dec(const T* d_xhat, const float* dx_acc, T* db_dec, long long batch, int dm) {
  const long long d = (long long)blockIdx.x * TPB + threadIdx.x;  // the last block passes dm
  if (d >= dm) return;
  float s = 0.0f;
  for (long long b = 0; b < batch; ++b) s += to_acc(d_xhat[b * dm + d]) - dx_acc[b * dm + d];
  db_dec[d] = from_acc<T>(s);
}

}  // namespace

#define NK_SAE_SELECT(SUFFIX, TX, TW, TENSOR)                                                                              \
  extern "C" __global__ void __launch_bounds__(TPB, 1) sae_select_##SUFFIX(                                         \
      const TX* x, const TW* w, const float* offset, const float* row_scale, const float* scale, const float* shift, \
      const float* theta, float theta_all, long long rows, int dm, int latents, int range_len, int mode, int k,    \
      int cap, nk_key* keys_out, int* counts, const long long* offsets, int* cursors) {                            \
    sae_select<TX, TW, TENSOR>(x, w, offset, row_scale, scale, shift, theta, theta_all, rows, dm, latents, range_len, mode, \
                       k, cap, keys_out, counts, offsets, cursors);                                                \
  }

#define NK_SAE_ENTRIES(SUFFIX, T, TENSOR)                                                                           \
  NK_SAE_SELECT(SUFFIX, T, T, TENSOR)                                                                               \
  NK_SAE_SELECT(residual_##SUFFIX, float, T, false)                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_keys_out_##SUFFIX(const nk_key* keys, long long n, int k, const float* x_norms, T* values, int* indices) { \
    sae_keys_out<T>(keys, n, k, x_norms, values, indices);                                                          \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_row_norms_##SUFFIX(const T* m, int dm, int mode, float* out) { \
    sae_row_norms<T>(m, dm, mode, out);                                                                             \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_mp_start_##SUFFIX(const T* x, const float* offset, float* residual, long long n, int dm) {                \
    sae_mp_start<T>(x, offset, residual, n, dm);                                                                    \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_mp_step_##SUFFIX(                                          \
      const nk_key* best, const T* w, float* residual, T* values, int* indices, int k, int step, int dm) {          \
    sae_mp_step<T>(best, w, residual, values, indices, k, step, dm);                                                \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_from_f32_##SUFFIX(const float* in, T* out, long long n) {   \
    sae_from_f32<T>(in, out, n);                                                                                    \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_to_f32_##SUFFIX(const T* in, float* out, long long n) {     \
    sae_to_f32<T>(in, out, n);                                                                                      \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_bwd_dpre_##SUFFIX(                                         \
      const T* d_xhat, const T* w_dec, const int* indices, const T* values, float* dpre, long long n, int k, int dm) { \
    sae_bwd_dpre<T>(d_xhat, w_dec, indices, values, dpre, n, k, dm);                                                \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB) sae_bwd_latent_##SUFFIX(                                       \
      const int* start, const int* by_latent, const T* values, const float* dpre, const T* d_xhat, const T* x,      \
      const float* b_dec, T* dw_dec, T* dw_enc, T* db_enc, int k, int dm) {                                         \
    sae_bwd_latent<T>(start, by_latent, values, dpre, d_xhat, x, b_dec, dw_dec, dw_enc, db_enc, k, dm);             \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_bwd_dx_##SUFFIX(const int* indices, const float* dpre, const T* w_enc, T* dx, float* dx_acc, int k, int dm) { \
    sae_bwd_dx<T>(indices, dpre, w_enc, dx, dx_acc, k, dm);                                                         \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(TPB)                                                                 \
      sae_bwd_db_dec_##SUFFIX(const T* d_xhat, const float* dx_acc, T* db_dec, long long batch, int dm) {           \
    sae_bwd_db_dec<T>(d_xhat, dx_acc, db_dec, batch, dm);                                                           \
  }

// f32 on SIMT tiles (the CPU's order of operations), f16/bf16 on tensor cores
NK_SAE_ENTRIES(f32, float, false)
NK_SAE_ENTRIES(f16, __half, true)
NK_SAE_ENTRIES(bf16, __nv_bfloat16, true)

// b_dec folded into the score shift: f16/bf16 only (the f32 tiles subtract b_dec from x instead)
#define NK_SAE_FOLD_OFFSET(SUFFIX, T)                                                                               \
  extern "C" __global__ void __launch_bounds__(TPB) sae_fold_offset_##SUFFIX(                                      \
      const T* w, const float* offset, const float* shift, float* out, int dm) {                                    \
    sae_fold_offset<T>(w, offset, shift, out, dm);                                                                  \
  }
NK_SAE_FOLD_OFFSET(f16, __half)
NK_SAE_FOLD_OFFSET(bf16, __nv_bfloat16)
