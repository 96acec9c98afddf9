// ridge.solve_batched: many independent small ridge problems, one per block.
//
// Per problem g (x [n, p], y [n, t], alpha): the primal form when n >= p, factoring
// X^T X + alpha I (order p); the dual form when n < p, factoring X X^T + alpha I (order n),
// then w = X^T c. The factor (order <= NK_RIDGE_MAX_ORDER) lives in shared memory in f64
// whatever the element type (as on the CPU): built from the inputs, factored by a
// right-looking Cholesky (one column per step, the trailing update spread over the block),
// then the right-hand sides are solved NK_RIDGE_RHS_CHUNK columns at a time, one thread per
// column through both triangular solves. A pivot <= 0 (or NaN) sets status[g] = 1.
#include "common.cuh"
#include "ridge.cuh"

namespace {

constexpr int MO = NK_RIDGE_MAX_ORDER;
constexpr int RC = NK_RIDGE_RHS_CHUNK;
constexpr int RT = NK_RIDGE_ROW_TILE;

template <typename T>
__device__ void ridge_solve(const T* x, const T* y, const T* alpha, T* w, int* status, int n, int p, int t) {
  __shared__ double L[MO][MO + 1];
  __shared__ double B[MO][RC];
  __shared__ double tile[RT][MO];
  __shared__ int failed;
  const long long g = blockIdx.x;
  const T* xg = x + g * (long long)n * p;
  const T* yg = y + g * (long long)n * t;
  T* wg = w + g * (long long)p * t;
  const bool primal = n >= p;
  const int m = primal ? p : n;
  const int tid = threadIdx.x;

  // 1. the lower triangle of X^T X (primal) or X X^T (dual), plus alpha on the diagonal
  for (int idx = tid; idx < m * m; idx += NK_RIDGE_THREADS) L[idx / m][idx % m] = 0.0;
  if (tid == 0) failed = 0;
  __syncthreads();
  if (primal) {
    for (int r0 = 0; r0 < n; r0 += RT) {
      const int rows = min(RT, n - r0);
      for (int idx = tid; idx < rows * p; idx += NK_RIDGE_THREADS)
        tile[idx / p][idx % p] = (double)to_acc(xg[(long long)(r0 + idx / p) * p + idx % p]);
      __syncthreads();
      for (int idx = tid; idx < m * m; idx += NK_RIDGE_THREADS) {
        const int i = idx / m, j = idx % m;
        if (j > i) continue;
        double acc = 0.0;
        for (int r = 0; r < rows; ++r) acc += tile[r][i] * tile[r][j];
        L[i][j] += acc;
      }
      __syncthreads();
    }
  } else {
    for (int idx = tid; idx < m * m; idx += NK_RIDGE_THREADS) {
      const int i = idx / m, j = idx % m;
      if (j > i) continue;
      double acc = 0.0;
      for (int k = 0; k < p; ++k)
        acc += (double)to_acc(xg[(long long)i * p + k]) * (double)to_acc(xg[(long long)j * p + k]);
      L[i][j] = acc;
    }
    __syncthreads();
  }
  const double a = (double)to_acc(alpha[g]);
  for (int i = tid; i < m; i += NK_RIDGE_THREADS) L[i][i] += a;
  __syncthreads();

  // 2. Cholesky, right-looking: column j, then the trailing lower triangle
  for (int j = 0; j < m; ++j) {
    if (tid == 0) {
      const double d = L[j][j];
      if (!(d > 0.0)) failed = 1;
      L[j][j] = sqrt(d);
    }
    __syncthreads();
    const double inv = 1.0 / L[j][j];
    for (int i = j + 1 + tid; i < m; i += NK_RIDGE_THREADS) L[i][j] *= inv;
    __syncthreads();
    const int rest = m - j - 1;
    for (int idx = tid; idx < rest * rest; idx += NK_RIDGE_THREADS) {
      const int i = j + 1 + idx / rest, k = j + 1 + idx % rest;
      if (k <= i) L[i][k] -= L[i][j] * L[k][j];
    }
    __syncthreads();
  }
  if (tid == 0) status[g] = failed;

  // 3. right-hand sides, RC columns per pass
  for (int c0 = 0; c0 < t; c0 += RC) {
    const int tc = min(RC, t - c0);
    for (int idx = tid; idx < m * tc; idx += NK_RIDGE_THREADS) {
      const int i = idx / tc, c = idx % tc;
      double acc = 0.0;
      if (primal) {
        for (int r = 0; r < n; ++r)
          acc += (double)to_acc(xg[(long long)r * p + i]) * (double)to_acc(yg[(long long)r * t + c0 + c]);
      } else {
        acc = (double)to_acc(yg[(long long)i * t + c0 + c]);
      }
      B[i][c] = acc;
    }
    __syncthreads();
    if (tid < tc) {
      const int c = tid;
      for (int i = 0; i < m; ++i) {
        double v = B[i][c];
        for (int k = 0; k < i; ++k) v -= L[i][k] * B[k][c];
        B[i][c] = v / L[i][i];
      }
      for (int i = m - 1; i >= 0; --i) {
        double v = B[i][c];
        for (int k = i + 1; k < m; ++k) v -= L[k][i] * B[k][c];
        B[i][c] = v / L[i][i];
      }
    }
    __syncthreads();
    if (primal) {
      for (int idx = tid; idx < p * tc; idx += NK_RIDGE_THREADS) {
        const int i = idx / tc, c = idx % tc;
        wg[(long long)i * t + c0 + c] = from_acc<T>((typename Acc<T>::type)B[i][c]);
      }
    } else {
      // w = X^T c
      for (int idx = tid; idx < p * tc; idx += NK_RIDGE_THREADS) {
        const int k = idx / tc, c = idx % tc;
        double acc = 0.0;
        for (int i = 0; i < n; ++i) acc += (double)to_acc(xg[(long long)i * p + k]) * B[i][c];
        wg[(long long)k * t + c0 + c] = from_acc<T>((typename Acc<T>::type)acc);
      }
    }
    __syncthreads();
  }
}

}  // namespace

#define NK_RIDGE_ENTRY(T, NAME)                                                                                  \
  extern "C" __global__ void __launch_bounds__(NK_RIDGE_THREADS)                                                \
      ridge_solve_batched_##NAME(const T* x, const T* y, const T* alpha, T* w, int* status, int n, int p, int t) { \
    ridge_solve<T>(x, y, alpha, w, status, n, p, t);                                                             \
  }

NK_RIDGE_ENTRY(float, f32)
NK_RIDGE_ENTRY(double, f64)
