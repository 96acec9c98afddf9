// Batched ridge: ridge.solve_batched (one small problem per block) and the fused pieces of
// ridge.cv (centering, per-alpha scaling, held-out scoring, alpha selection) around the
// cuBLAS products and the cuSOLVER eigendecompositions that src/ridge/cuda.rs drives.
#include "common.cuh"
#include "ridge.cuh"

namespace {

constexpr int NT = NK_RIDGE_THREADS;
constexpr int RC = NK_RIDGE_RHS_CHUNK;
constexpr int RT = NK_RIDGE_ROW_TILE;
constexpr int CV_COLS = NK_RIDGE_CV_COLS;
constexpr int CV_LANES = NK_RIDGE_CV_LANES;

// Index of (i, j), j <= i, in a packed lower triangle (row-major rows of length i + 1).
__device__ __forceinline__ int packed(int i, int j) { return i * (i + 1) / 2 + j; }

// IEEE round-to-nearest reciprocals: inline, unlike `/`, whose slow-path call spills
// registers around it.
__device__ __forceinline__ float rcp(float x) { return __frcp_rn(x); }
__device__ __forceinline__ double rcp(double x) { return __drcp_rn(x); }

// (i, j) of packed index k (k < 2^24, so 8k + 1 is exact in float); the two loops fix the
// square root's rounding.
__device__ __forceinline__ void unpack(int k, int& i, int& j) {
  int r = (int)((sqrtf(8.0f * (float)k + 1.0f) - 1.0f) * 0.5f);
  while (r > 0 && packed(r, 0) > k) --r;
  while (packed(r + 1, 0) <= k) ++r;
  i = r;
  j = k - packed(r, 0);
}

// ridge.solve_batched. Per problem g (x [n, p], y [n, t], alpha): the primal form when
// n >= p, factoring X^T X + alpha I (order m = p); the dual form when n < p, factoring
// X X^T + alpha I (order m = n), then w = X^T c.
//
// Plan: one block (NT threads) owns one problem. Dynamic shared memory holds, in the factor
// type F (f64, or f32 for f32 inputs whose f64 factor does not fit the device):
//   L     the packed lower triangle of the order-m matrix, m (m + 1) / 2
//   B     m x RC right-hand sides of the current pass
//   tile  RT x m slices of x staged for the Gram accumulation
// 1. Gram: RT rows (primal) or columns (dual) of x at a time into `tile`, every thread
//    accumulating packed entries (barrier after staging and after accumulating).
// 2. Cholesky, right-looking: per column j, the pivot (thread 0), the column scaling, the
//    packed trailing update spread over the block (three barriers per column). A pivot <= 0
//    or NaN sets status[g] = 1 and ends the factorization (the outputs are then garbage).
// 3. Right-hand sides RC at a time: L z = b and L^T x = z column-oriented, one barrier per
//    row: in step i every thread updates rows beyond i with row i's unscaled value times
//    1 / L_ii, and row i - 1 (no longer read) is scaled in the same step.
// Cost: (n m^2 + m^3 / 3 + 2 m^2 t) flops per problem against (n p + n t + p t) elements
// read or written: compute-bound for large m, latency-bound (barriers) for small m.
template <typename T, typename F>
__device__ void ridge_solve(const T* x, const T* y, const T* alpha, T* w, int* status, int n, int p, int t) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int failed;
  const bool primal = n >= p;
  const int m = primal ? p : n;
  const int tri = packed(m, 0);
  F* L = reinterpret_cast<F*>(smem_raw);
  F* B = L + tri;
  F* tile = B + m * RC;
  const long long g = blockIdx.x;
  const T* xg = x + g * (long long)n * p;
  const T* yg = y + g * (long long)n * t;
  T* wg = w + g * (long long)p * t;
  const int tid = threadIdx.x;

  // 1. the lower triangle of X^T X (primal) or X X^T (dual), plus alpha on the diagonal
  for (int k = tid; k < tri; k += NT) L[k] = F(0);
  if (tid == 0) failed = 0;
  const int inner = primal ? n : p;  // the summed dimension
  for (int r0 = 0; r0 < inner; r0 += RT) {
    const int rows = min(RT, inner - r0);
    for (int idx = tid; idx < rows * m; idx += NT) {
      // primal: tile[r][i] = x[r0 + r][i] (consecutive threads, consecutive i);
      // dual: tile[r][i] = x[i][r0 + r] (consecutive threads, consecutive r)
      int r, i;
      long long off;
      if (primal) {
        r = idx / m;
        i = idx % m;
        off = (long long)(r0 + r) * p + i;
      } else {
        r = idx % rows;
        i = idx / rows;
        off = (long long)i * p + r0 + r;
      }
      tile[r * m + i] = (F)to_acc(xg[off]);
    }
    __syncthreads();
    for (int k = tid; k < tri; k += NT) {
      int i, j;
      unpack(k, i, j);
      F acc = F(0);
      for (int r = 0; r < rows; ++r) acc += tile[r * m + i] * tile[r * m + j];
      L[k] += acc;
    }
    __syncthreads();
  }
  const F a = (F)to_acc(alpha[g]);
  for (int i = tid; i < m; i += NT) L[packed(i, i)] += a;
  __syncthreads();

  // 2. Cholesky, right-looking: column j, then the packed trailing lower triangle
  for (int j = 0; j < m; ++j) {
    if (tid == 0) {
      const F d = L[packed(j, j)];
      if (!(d > F(0))) failed = 1;
      L[packed(j, j)] = sqrt(d);
    }
    __syncthreads();
    if (failed) break;  // uniform: read after the barrier, only ever set to 1
    const F inv = rcp(L[packed(j, j)]);
    for (int i = j + 1 + tid; i < m; i += NT) L[packed(i, j)] *= inv;
    __syncthreads();
    const int rest = m - j - 1;
    const int rest_tri = packed(rest, 0);
    for (int k = tid; k < rest_tri; k += NT) {
      int a_, b_;
      unpack(k, a_, b_);
      const int i = j + 1 + a_, c = j + 1 + b_;
      L[packed(i, c)] -= L[packed(i, j)] * L[packed(c, j)];
    }
    __syncthreads();
  }
  if (tid == 0) status[g] = failed;
  if (failed) return;  // uniform (see above)

  // 3. right-hand sides, RC columns per pass
  for (int c0 = 0; c0 < t; c0 += RC) {
    const int tc = min(RC, t - c0);
    for (int idx = tid; idx < m * tc; idx += NT) {
      const int i = idx / tc, c = idx % tc;
      F acc = F(0);
      if (primal) {
        for (int r = 0; r < n; ++r) acc += (F)to_acc(xg[(long long)r * p + i]) * (F)to_acc(yg[(long long)r * t + c0 + c]);
      } else {
        acc = (F)to_acc(yg[(long long)i * t + c0 + c]);
      }
      B[i * RC + c] = acc;
    }
    __syncthreads();
    // L z = b: step i reads row i (final since step i - 1) and updates rows > i
    for (int i = 0; i < m; ++i) {
      const F inv = rcp(L[packed(i, i)]);
      const int below = m - i - 1;
      for (int idx = tid; idx < below * tc; idx += NT) {
        const int r = i + 1 + idx / tc, c = idx % tc;
        B[r * RC + c] -= L[packed(r, i)] * (B[i * RC + c] * inv);
      }
      if (i > 0 && tid < tc) B[(i - 1) * RC + tid] *= rcp(L[packed(i - 1, i - 1)]);
      __syncthreads();
    }
    if (tid < tc) B[(m - 1) * RC + tid] *= rcp(L[packed(m - 1, m - 1)]);
    __syncthreads();
    // L^T x = z: step i (descending) reads row i and updates rows < i
    for (int i = m - 1; i >= 0; --i) {
      const F inv = rcp(L[packed(i, i)]);
      for (int idx = tid; idx < i * tc; idx += NT) {
        const int r = idx / tc, c = idx % tc;
        B[r * RC + c] -= L[packed(i, r)] * (B[i * RC + c] * inv);
      }
      if (i < m - 1 && tid < tc) B[(i + 1) * RC + tid] *= rcp(L[packed(i + 1, i + 1)]);
      __syncthreads();
    }
    if (tid < tc) B[tid] *= rcp(L[0]);
    __syncthreads();
    if (primal) {
      for (int idx = tid; idx < p * tc; idx += NT) {  // p = m <= 256
        const int i = idx / tc, c = idx % tc;
        wg[(long long)i * t + c0 + c] = from_acc<T>((typename Acc<T>::type)B[i * RC + c]);
      }
    } else {
      // w = X^T c; p is unbounded here (m = n < p), so p * tc is 64-bit
      for (long long idx = tid; idx < (long long)p * tc; idx += NT) {
        const int k = (int)(idx / tc), c = (int)(idx % tc);
        F acc = F(0);
        for (int i = 0; i < n; ++i) acc += (F)to_acc(xg[(long long)i * p + k]) * B[i * RC + c];
        wg[(long long)k * t + c0 + c] = from_acc<T>((typename Acc<T>::type)acc);
      }
    }
    __syncthreads();
  }
}

// ridge.solve_batched through the libraries: gram[g] += alpha[g] I for g column-major m x m
// matrices. Elementwise over the g m diagonal entries, grid-stride.
template <typename T>
__device__ void add_diagonal(T* gram, const T* alpha, int g, int m) {
  const long long total = (long long)g * m;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const long long prob = k / m;
    const long long i = k % m;
    T* d = gram + prob * m * m + i * m + i;
    *d = from_acc<T>(to_acc(*d) + to_acc(alpha[prob]));
  }
}

// ridge.cv, step "split": one target batch yb [n, tb] (row-major, all rows) into the
// training rows y_train [n_tr, tb] (minus the training means when `center`) and the
// held-out rows a_test [n_te, tb] minus their own means, with the training means, the
// held-out means and SS_tot = sum a^2 (of the rounded a) per column, all in f64.
// Plan: a block is CV_COLS columns x CV_LANES row lanes; lane l sums rows l, l + LANES, ...
// (coalesced along the columns), the lanes' partials meet in shared memory and lane 0 adds
// them in a fixed order (deterministic). Two passes over each row set: means, then writes.
template <typename T>
__device__ void cv_split(const T* yb, const int* train_rows, int n_tr, const int* test_rows, int n_te, int tb, int center,
                         T* y_train, T* a_test, double* train_mean, double* test_mean, double* ss_tot) {
  __shared__ double part[CV_LANES][CV_COLS];
  __shared__ double mean_sh[CV_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * CV_COLS + tx;
  const bool active = c < tb;
  // mean of the rows `rows[0..count)` of column c into mean_sh[tx] (all threads reach the barriers)
  auto column_mean = [&](const int* rows, int count) {
    double acc = 0.0;
    if (active)
      for (int i = ty; i < count; i += CV_LANES) acc += (double)to_acc(yb[(long long)rows[i] * tb + c]);
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0) {
      double s = 0.0;
      for (int l = 0; l < CV_LANES; ++l) s += part[l][tx];
      mean_sh[tx] = s * (1.0 / (double)max(count, 1));
    }
    __syncthreads();
  };
  column_mean(train_rows, n_tr);
  const double tr_mean = mean_sh[tx];
  const double offset = center ? tr_mean : 0.0;
  if (active)
    for (int i = ty; i < n_tr; i += CV_LANES) {
      const double v = (double)to_acc(yb[(long long)train_rows[i] * tb + c]);
      y_train[(long long)i * tb + c] = from_acc<T>((typename Acc<T>::type)(v - offset));
    }
  __syncthreads();  // mean_sh is rewritten below
  column_mean(test_rows, n_te);
  const double te_mean = mean_sh[tx];
  double ss = 0.0;
  if (active)
    for (int i = ty; i < n_te; i += CV_LANES) {
      const double v = (double)to_acc(yb[(long long)test_rows[i] * tb + c]);
      const T a = from_acc<T>((typename Acc<T>::type)(v - te_mean));
      a_test[(long long)i * tb + c] = a;
      ss += (double)to_acc(a) * (double)to_acc(a);
    }
  part[ty][tx] = ss;
  __syncthreads();
  if (ty == 0 && active) {
    double s = 0.0;
    for (int l = 0; l < CV_LANES; ++l) s += part[l][tx];
    ss_tot[c] = s;
    train_mean[c] = tr_mean;
    test_mean[c] = te_mean;
  }
}

// ridge.cv: dst = src diag(1 / (values + alpha)) for a column-major [rows x cols] matrix
// (the held-out projection scaled for one alpha); the factor is rounded to T first, as on
// the CPU. Elementwise, grid-stride.
template <typename T>
__device__ void cv_scale_cols(const T* src, T* dst, const double* values, double alpha, int rows, int cols) {
  const long long total = (long long)rows * cols;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const int j = (int)(k / rows);
    const T f = from_acc<T>((typename Acc<T>::type)(1.0 / (values[j] + alpha)));
    dst[k] = from_acc<T>(to_acc(src[k]) * to_acc(f));
  }
}

// ridge.banded_cv: dst[i, j] = src[i, j] * row_scale[i] * col_scale[j] for column-major
// [rows x cols] matrices, in f64 then rounded to T as on the CPU (D G D with both scales,
// D V with col_scale null). dst may be src. Elementwise, grid-stride.
template <typename T>
__device__ void banded_scale(T* dst, const T* src, const double* row_scale, const double* col_scale, int rows,
                             int cols) {
  const long long total = (long long)rows * cols;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(k % rows);
    const int j = (int)(k / rows);
    double v = (double)to_acc(src[k]) * row_scale[i];
    if (col_scale) v *= col_scale[j];
    dst[k] = from_acc<T>((typename Acc<T>::type)v);
  }
}

// ridge.banded_cv: one candidate's kernel from the per-space ones, dst[k] = sum_s gamma[s]
// mats[s len + k] (mats [S, len], contiguous), summed in f64 in space order and rounded once,
// as on the CPU. Elementwise, grid-stride.
template <typename T>
__device__ void banded_mix(T* dst, const T* mats, const double* gamma, int spaces, long long len) {
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < len; k += (long long)gridDim.x * blockDim.x) {
    double v = 0.0;
    for (int s = 0; s < spaces; ++s) v += gamma[s] * (double)to_acc(mats[s * len + k]);
    dst[k] = from_acc<T>((typename Acc<T>::type)v);
  }
}

// ridge.cv refit: z[i, c] *= 1 / (values[i] + chosen[c]) for z column-major [rank x tb]
// (each target's own alpha). Elementwise, grid-stride.
template <typename T>
__device__ void cv_scale_refit(T* z, const double* values, const double* chosen, int rank, int tb) {
  const long long total = (long long)rank * tb;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total; k += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(k % rank);
    const long long c = k / rank;
    const T f = from_acc<T>((typename Acc<T>::type)(1.0 / (values[i] + chosen[c])));
    z[k] = from_acc<T>(to_acc(z[k]) * to_acc(f));
  }
}

// ridge.cv, fused held-out scoring of one alpha for one target batch: from the predictions
// pred [n_te, tb] (row-major, without the training mean) and the centered held-out targets
// a [n_te, tb], per column: S = sum pred, Q = sum pred^2, X = sum a pred (f64); then
// ss_pred = max(Q - S^2 / n_te, 0), shift = S / n_te + offset - test_mean and
//   R2 = 1 - (ss_tot - 2 X + ss_pred + n_te shift^2) / ss_tot   (0 when ss_tot == 0)
//   Pearson = X / sqrt(ss_tot ss_pred)                          (0 when that is 0)
// added to sums[c] (the batch's slice of this alpha's row). Same block plan as cv_split; one
// thread adds each column (no atomics: deterministic).
template <typename T>
__device__ void cv_score(const T* pred, const T* a, const double* train_mean, int use_offset, const double* test_mean,
                         const double* ss_tot, int n_te, int tb, int pearson, double* sums) {
  __shared__ double part[3][CV_LANES][CV_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * CV_COLS + tx;
  const bool active = c < tb;
  double s = 0.0, q = 0.0, x = 0.0;
  if (active)
    for (int i = ty; i < n_te; i += CV_LANES) {
      const double v = (double)to_acc(pred[(long long)i * tb + c]);
      s += v;
      q += v * v;
      x += (double)to_acc(a[(long long)i * tb + c]) * v;
    }
  part[0][ty][tx] = s;
  part[1][ty][tx] = q;
  part[2][ty][tx] = x;
  __syncthreads();
  if (ty == 0 && active) {
    s = q = x = 0.0;
    for (int l = 0; l < CV_LANES; ++l) {
      s += part[0][l][tx];
      q += part[1][l][tx];
      x += part[2][l][tx];
    }
    const double count = (double)n_te;
    const double ss_pred = fmax(q - s * s / count, 0.0);
    const double tot = ss_tot[c];
    double score;
    if (pearson) {
      const double denom = sqrt(tot * ss_pred);
      score = denom == 0.0 ? 0.0 : x / denom;
    } else {
      const double shift = s / count + (use_offset ? train_mean[c] : 0.0) - test_mean[c];
      score = tot == 0.0 ? 0.0 : 1.0 - (tot - 2.0 * x + ss_pred + count * shift * shift) / tot;
    }
    sums[c] += score;
  }
}

// ridge.score: per column c of y_true and y_pred [n, t] (row-major), in f64,
//   R2 = 1 - sum (y - p)^2 / sum (y - mean y)^2         (0 when the target is constant)
//   Pearson = sum (y - mean y)(p - mean p) / sqrt(sum (y - mean y)^2 sum (p - mean p)^2)
//                                                       (0 when either is constant)
// the CPU's formulas. Same block plan as cv_split (CV_COLS columns x CV_LANES row lanes,
// coalesced along the columns; lane partials added by lane 0 in a fixed order): one pass
// for the two means, one for the four sums.
template <typename T>
__device__ void score_columns(const T* y_true, const T* y_pred, int n, long long t, T* r2, T* pearson) {
  __shared__ double part[4][CV_LANES][CV_COLS];
  __shared__ double mean_sh[2][CV_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const long long c = blockIdx.x * (long long)CV_COLS + tx;
  const bool active = c < t;
  double st = 0.0, sp = 0.0;
  if (active)
    for (int i = ty; i < n; i += CV_LANES) {
      st += (double)to_acc(y_true[(long long)i * t + c]);
      sp += (double)to_acc(y_pred[(long long)i * t + c]);
    }
  part[0][ty][tx] = st;
  part[1][ty][tx] = sp;
  __syncthreads();
  if (ty == 0) {
    st = sp = 0.0;
    for (int l = 0; l < CV_LANES; ++l) {
      st += part[0][l][tx];
      sp += part[1][l][tx];
    }
    mean_sh[0][tx] = st / (double)max(n, 1);  // divided, as on the CPU
    mean_sh[1][tx] = sp / (double)max(n, 1);
  }
  __syncthreads();
  const double mean_t = mean_sh[0][tx], mean_p = mean_sh[1][tx];
  double ss_tot = 0.0, ss_res = 0.0, ss_pred = 0.0, cross = 0.0;
  if (active)
    for (int i = ty; i < n; i += CV_LANES) {
      const double yt = (double)to_acc(y_true[(long long)i * t + c]);
      const double yp = (double)to_acc(y_pred[(long long)i * t + c]);
      const double a = yt - mean_t, b = yp - mean_p;
      ss_tot += a * a;
      ss_res += (yt - yp) * (yt - yp);
      ss_pred += b * b;
      cross += a * b;
    }
  // (lane 0 read the first partials before the barrier above: `part` is free)
  part[0][ty][tx] = ss_tot;
  part[1][ty][tx] = ss_res;
  part[2][ty][tx] = ss_pred;
  part[3][ty][tx] = cross;
  __syncthreads();
  if (ty == 0 && active) {
    ss_tot = ss_res = ss_pred = cross = 0.0;
    for (int l = 0; l < CV_LANES; ++l) {
      ss_tot += part[0][l][tx];
      ss_res += part[1][l][tx];
      ss_pred += part[2][l][tx];
      cross += part[3][l][tx];
    }
    const double r = ss_tot == 0.0 ? 0.0 : 1.0 - ss_res / ss_tot;
    const double denom = sqrt(ss_tot * ss_pred);
    const double q = denom == 0.0 ? 0.0 : cross / denom;
    r2[c] = from_acc<T>((typename Acc<T>::type)r);
    pearson[c] = from_acc<T>((typename Acc<T>::type)q);
  }
}

// ridge.split_scores for one target batch: y [n, tb] and the spaces' predictions q [S, n, tb]
// (row-major), per column c and space s, with a = y - mean y, q~_s = q_s - mean q_s and
// tot = sum_s q~_s (in f64):
//   r2[s, c] = (2 sum a q~_s - sum q~_s tot) / sum a^2      (0 when sum a^2 == 0)
//   pearson[s, c] = (sum a q~_s / n) / (sd(a) sd(tot))      (population sd; 0 read as 1)
// the CPU's formulas. Same block plan as cv_split (CV_COLS columns x CV_LANES row lanes,
// lane partials added by lane 0 in a fixed order). means [S + 1, tb] is scratch: the block
// writes its columns' means there and reads them back after a barrier. A pass per mean, one
// for sum a^2 and sum tot^2, and one per space for its two sums (tot recomputed: S^2 n work
// per column, small against the products that made q).
// The centered total prediction sum_s (q_s[at] - mean_s[c]) of one row and column.
template <typename T>
__device__ __forceinline__ double split_total(const T* q, const double* means, int spaces, long long plane,
                                              long long at, int tb, int c) {
  double tot = 0.0;
  for (int s = 0; s < spaces; ++s) tot += (double)to_acc(q[s * plane + at]) - means[(long long)s * tb + c];
  return tot;
}

template <typename T>
__device__ void split_columns(const T* y, const T* q, int spaces, int n, int tb, double* means, T* r2, T* pearson) {
  __shared__ double part[2][CV_LANES][CV_COLS];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c = blockIdx.x * CV_COLS + tx;
  const bool active = c < tb;
  const long long plane = (long long)n * tb;
  // means: space s < S reads q[s], s == S reads y
  for (int s = 0; s <= spaces; ++s) {
    const T* v = s < spaces ? q + s * plane : y;
    double sum = 0.0;
    if (active)
      for (int i = ty; i < n; i += CV_LANES) sum += (double)to_acc(v[(long long)i * tb + c]);
    part[0][ty][tx] = sum;
    __syncthreads();
    if (ty == 0 && active) {
      sum = 0.0;
      for (int l = 0; l < CV_LANES; ++l) sum += part[0][l][tx];
      means[(long long)s * tb + c] = sum / (double)n;
    }
    __syncthreads();
  }
  double ss_a = 0.0, ss_tot = 0.0;
  const double mean_y = active ? means[(long long)spaces * tb + c] : 0.0;
  if (active)
    for (int i = ty; i < n; i += CV_LANES) {
      const double a = (double)to_acc(y[(long long)i * tb + c]) - mean_y;
      const double tot = split_total(q, means, spaces, plane, (long long)i * tb + c, tb, c);
      ss_a += a * a;
      ss_tot += tot * tot;
    }
  part[0][ty][tx] = ss_a;
  part[1][ty][tx] = ss_tot;
  __syncthreads();
  __shared__ double ss_sh[2][CV_COLS];
  if (ty == 0) {
    ss_a = ss_tot = 0.0;
    for (int l = 0; l < CV_LANES; ++l) {
      ss_a += part[0][l][tx];
      ss_tot += part[1][l][tx];
    }
    ss_sh[0][tx] = ss_a;
    ss_sh[1][tx] = ss_tot;
  }
  __syncthreads();
  ss_a = ss_sh[0][tx];
  ss_tot = ss_sh[1][tx];
  double sd_a = sqrt(ss_a / (double)n), sd_pred = sqrt(ss_tot / (double)n);
  if (sd_a == 0.0) sd_a = 1.0;
  if (sd_pred == 0.0) sd_pred = 1.0;
  // the divisions once per column, out of the loop over spaces (within an ulp of the CPU's
  // (2 inter - shared) / ss_a and inter / n / (sd_a sd_pred))
  const double inv_ss_a = ss_a == 0.0 ? 0.0 : 1.0 / ss_a;
  const double inv_n_sd = 1.0 / ((double)n * (sd_a * sd_pred));
  for (int s = 0; s < spaces; ++s) {
    double inter = 0.0, shared = 0.0;
    if (active) {
      const double mean_s = means[(long long)s * tb + c];
      for (int i = ty; i < n; i += CV_LANES) {
        const double a = (double)to_acc(y[(long long)i * tb + c]) - mean_y;
        const double qs = (double)to_acc(q[s * plane + (long long)i * tb + c]) - mean_s;
        inter += a * qs;
        shared += qs * split_total(q, means, spaces, plane, (long long)i * tb + c, tb, c);
      }
    }
    part[0][ty][tx] = inter;
    part[1][ty][tx] = shared;
    __syncthreads();
    if (ty == 0 && active) {
      inter = shared = 0.0;
      for (int l = 0; l < CV_LANES; ++l) {
        inter += part[0][l][tx];
        shared += part[1][l][tx];
      }
      const double r = (2.0 * inter - shared) * inv_ss_a;
      r2[(long long)s * tb + c] = from_acc<T>((typename Acc<T>::type)r);
      pearson[(long long)s * tb + c] = from_acc<T>((typename Acc<T>::type)(inter * inv_n_sd));
    }
    __syncthreads();
  }
}

// ridge.cv selection: per target c, cv_scores[a, c] = sums[a, c] / folds and the best alpha
// (the highest mean score, the largest alpha among equal scores; alphas scanned in order,
// as on the CPU). One thread per target, grid-stride.
template <typename T>
__device__ void cv_select(const double* sums, const double* alphas, int n_alphas, long long t, int folds, T* cv_scores,
                          T* best_alpha, double* chosen) {
  for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < t; c += (long long)gridDim.x * blockDim.x) {
    const double inv_folds = rcp((double)folds);
    int best = 0;
    double best_score = 0.0;
    for (int a = 0; a < n_alphas; ++a) {
      const double sc = sums[a * t + c] * inv_folds;
      cv_scores[a * t + c] = from_acc<T>((typename Acc<T>::type)sc);
      if (a == 0 || sc > best_score || (sc == best_score && alphas[a] > alphas[best])) {
        best = a;
        best_score = sc;
      }
    }
    best_alpha[c] = from_acc<T>((typename Acc<T>::type)alphas[best]);
    chosen[c] = alphas[best];
  }
}

}  // namespace

// Min one block per SM: the factor's shared memory allows one or two anyway, and without it
// ptxas caps the registers at 40 and spills around the solves' barriers.
#define NK_RIDGE_ENTRY(T, NAME, F, FNAME)                                                                          \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_THREADS, 1)                                               \
      ridge_solve_batched_##NAME##_##FNAME(const T* x, const T* y, const T* alpha, T* w, int* status, int n, int p, \
                                           int t) {                                                               \
    ridge_solve<T, F>(x, y, alpha, w, status, n, p, t);                                                           \
  }

NK_RIDGE_ENTRY(float, f32, double, f64)
NK_RIDGE_ENTRY(float, f32, float, f32)
NK_RIDGE_ENTRY(double, f64, double, f64)

#define NK_RIDGE_CV_ENTRIES(T, NAME)                                                                                  \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_add_diagonal_##NAME(T* gram, const T* alpha, int g, int m) {                                             \
    add_diagonal<T>(gram, alpha, g, m);                                                                              \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_COLS * NK_RIDGE_CV_LANES)                                 \
      ridge_cv_split_##NAME(const T* yb, const int* train_rows, int n_tr, const int* test_rows, int n_te, int tb,    \
                            int center, T* y_train, T* a_test, double* train_mean, double* test_mean, double* ss_tot) { \
    cv_split<T>(yb, train_rows, n_tr, test_rows, n_te, tb, center, y_train, a_test, train_mean, test_mean, ss_tot);  \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_cv_scale_cols_##NAME(const T* src, T* dst, const double* values, double alpha, int rows, int cols) {    \
    cv_scale_cols<T>(src, dst, values, alpha, rows, cols);                                                           \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_cv_scale_refit_##NAME(T* z, const double* values, const double* chosen, int rank, int tb) {             \
    cv_scale_refit<T>(z, values, chosen, rank, tb);                                                                  \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_COLS * NK_RIDGE_CV_LANES)                                 \
      ridge_cv_score_##NAME(const T* pred, const T* a, const double* train_mean, int use_offset,                     \
                            const double* test_mean, const double* ss_tot, int n_te, int tb, int pearson,            \
                            double* sums) {                                                                           \
    cv_score<T>(pred, a, train_mean, use_offset, test_mean, ss_tot, n_te, tb, pearson, sums);                        \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_cv_select_##NAME(const double* sums, const double* alphas, int n_alphas, long long t, int folds,         \
                             T* cv_scores, T* best_alpha, double* chosen) {                                          \
    cv_select<T>(sums, alphas, n_alphas, t, folds, cv_scores, best_alpha, chosen);                                   \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_banded_scale_##NAME(T* dst, const T* src, const double* row_scale, const double* col_scale, int rows,    \
                                int cols) {                                                                           \
    banded_scale<T>(dst, src, row_scale, col_scale, rows, cols);                                                     \
  }                                                                                                                   \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_THREADS)                                                  \
      ridge_banded_mix_##NAME(T* dst, const T* mats, const double* gamma, int spaces, long long len) {               \
    banded_mix<T>(dst, mats, gamma, spaces, len);                                                                    \
  }

#define NK_RIDGE_SCORE_ENTRY(T, NAME)                                                                 \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_COLS * NK_RIDGE_CV_LANES)                 \
      ridge_score_##NAME(const T* y_true, const T* y_pred, int n, long long t, T* r2, T* pearson) { \
    score_columns<T>(y_true, y_pred, n, t, r2, pearson);                                             \
  }

// Min one block per SM: without it ptxas caps the registers at 40 and spills around the
// per-space loop's barriers (as for the solve kernels above).
#define NK_RIDGE_SPLIT_ENTRY(T, NAME)                                                                      \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_CV_COLS * NK_RIDGE_CV_LANES, 1)                   \
      ridge_split_scores_##NAME(const T* y, const T* q, int spaces, int n, int tb, double* means, T* r2, \
                                T* pearson) {                                                            \
    split_columns<T>(y, q, spaces, n, tb, means, r2, pearson);                                            \
  }

NK_RIDGE_SPLIT_ENTRY(float, f32)
NK_RIDGE_SPLIT_ENTRY(double, f64)

NK_RIDGE_SCORE_ENTRY(float, f32)
NK_RIDGE_SCORE_ENTRY(double, f64)

NK_RIDGE_CV_ENTRIES(float, f32)
NK_RIDGE_CV_ENTRIES(double, f64)
