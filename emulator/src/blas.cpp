// blas.cpp -> libcublas.so: the cuBLAS calls neurokernels makes (through cudarc), as plain
// reference code on the host. Column-major as cuBLAS; every operand must lie inside a device
// allocation (an operand that does not is CUBLAS_STATUS_INVALID_VALUE and a message, where
// real cuBLAS would read out of bounds). Sums accumulate in double.
#include <cstdio>
#include <cstring>

#include "nkemu.h"

namespace {
enum Status { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum Op { OP_N = 0, OP_T = 1, OP_C = 2 };
enum Side { LEFT = 0, RIGHT = 1 };
enum Fill { LOWER = 0, UPPER = 1 };
enum Diag { NON_UNIT = 0, UNIT = 1 };
struct Handle {
  void* stream;
};

Status bad(const char* call, const char* what) {
  std::fprintf(stderr, "nkemu cuBLAS: %s: %s\n", call, what);
  return INVALID_VALUE;
}
// column-major element (r, c) of op(M), M stored with leading dimension ld
template <typename T> inline T at(const T* m, int ld, bool trans, long r, long c) {
  return trans ? m[c + r * (long)ld] : m[r + c * (long)ld];
}

template <typename T>
Status gemm_strided_batched(const char* call, int ta, int tb, int m, int n, int k, const T* alpha, const T* a, int lda,
                            long long sa, const T* b, int ldb, long long sb, const T* beta, T* c, int ldc, long long sc,
                            int batch) {
  nkemu::note_call(call);
  if (m < 0 || n < 0 || k < 0 || batch < 0 || ldc < (m > 1 ? m : 1)) return bad(call, "negative size or ldc < m");
  if (ta == OP_C || tb == OP_C) return NOT_SUPPORTED;
  const bool tra = ta == OP_T, trb = tb == OP_T;
  if (lda < ((tra ? k : m) > 1 ? (tra ? k : m) : 1) || ldb < ((trb ? n : k) > 1 ? (trb ? n : k) : 1))
    return bad(call, "lda or ldb below the operand's rows");
  for (int i = 0; i < batch; ++i) {
    const T* ai = a + i * sa;
    const T* bi = b + i * sb;
    T* ci = c + i * sc;
    const long a_extent = (long)lda * ((tra ? m : k) - 1) + (tra ? k : m);
    const long b_extent = (long)ldb * ((trb ? k : n) - 1) + (trb ? n : k);
    const long c_extent = (long)ldc * (n - 1) + m;
    if (m && n && k && (!nkemu::device_range_ok(ai, sizeof(T) * a_extent) || !nkemu::device_range_ok(bi, sizeof(T) * b_extent)))
      return bad(call, "A or B outside a device allocation");
    if (m && n && !nkemu::device_range_ok(ci, sizeof(T) * c_extent)) return bad(call, "C outside a device allocation");
    for (int col = 0; col < n; ++col)
      for (int row = 0; row < m; ++row) {
        double s = 0;
        for (int p = 0; p < k; ++p) s += (double)at(ai, lda, tra, row, p) * (double)at(bi, ldb, trb, p, col);
        T& out = ci[row + (long)col * ldc];
        // beta = 0 ignores C's old contents (they may be NaN), as cuBLAS does
        out = (T)((double)*alpha * s + (*beta == T(0) ? 0.0 : (double)*beta * (double)out));
      }
  }
  return SUCCESS;
}

// X op(A) = alpha B (side RIGHT) or op(A) X = alpha B (LEFT), A triangular; B [m, n] is
// overwritten by X. Solved in double, one column (RIGHT) or row (LEFT) at a time.
template <typename T>
Status trsm_batched(const char* call, int side, int uplo, int trans, int diag, int m, int n, const T* alpha,
                    const T* const* as, int lda, T* const* bs, int ldb, int batch) {
  nkemu::note_call(call);
  if (m < 0 || n < 0 || batch < 0) return bad(call, "negative size");
  if (trans == OP_C) return NOT_SUPPORTED;
  const int na = side == LEFT ? m : n;
  if (lda < (na > 1 ? na : 1) || ldb < (m > 1 ? m : 1)) return bad(call, "lda or ldb too small");
  if (batch && (!nkemu::device_range_ok(as, sizeof(T*) * batch) || !nkemu::device_range_ok(bs, sizeof(T*) * batch)))
    return bad(call, "the pointer arrays lie outside device allocations");
  // op(A) is lower triangular when (uplo LOWER) xor (transposed)
  const bool tr = trans == OP_T;
  const bool lower = (uplo == LOWER) != tr;
  for (int i = 0; i < batch; ++i) {
    const T* a = as[i];
    T* b = bs[i];
    if (m && n && (!nkemu::device_range_ok(a, sizeof(T) * ((long)lda * (na - 1) + na)) ||
                   !nkemu::device_range_ok(b, sizeof(T) * ((long)ldb * (n - 1) + m))))
      return bad(call, "A or B outside a device allocation");
    auto op_a = [&](int r, int c) -> double { return (double)at(a, lda, tr, r, c); };
    if (side == RIGHT) {
      // row by row of B: x op(A) = alpha b, op(A) [n, n]
      for (int r = 0; r < m; ++r) {
        double x[4096];
        double* xs = n <= 4096 ? x : new double[n];
        if (lower) {  // x_j = (b_j - sum_{l > j} x_l A_lj) / A_jj, from the last column back
          for (int j = n - 1; j >= 0; --j) {
            double s = (double)*alpha * (double)b[r + (long)j * ldb];
            for (int l = j + 1; l < n; ++l) s -= xs[l] * op_a(l, j);
            xs[j] = diag == UNIT ? s : s / op_a(j, j);
          }
        } else {
          for (int j = 0; j < n; ++j) {
            double s = (double)*alpha * (double)b[r + (long)j * ldb];
            for (int l = 0; l < j; ++l) s -= xs[l] * op_a(l, j);
            xs[j] = diag == UNIT ? s : s / op_a(j, j);
          }
        }
        for (int j = 0; j < n; ++j) b[r + (long)j * ldb] = (T)xs[j];
        if (xs != x) delete[] xs;
      }
    } else {
      for (int c = 0; c < n; ++c) {
        double x[4096];
        double* xs = m <= 4096 ? x : new double[m];
        if (lower) {
          for (int j = 0; j < m; ++j) {
            double s = (double)*alpha * (double)b[j + (long)c * ldb];
            for (int l = 0; l < j; ++l) s -= op_a(j, l) * xs[l];
            xs[j] = diag == UNIT ? s : s / op_a(j, j);
          }
        } else {
          for (int j = m - 1; j >= 0; --j) {
            double s = (double)*alpha * (double)b[j + (long)c * ldb];
            for (int l = j + 1; l < m; ++l) s -= op_a(j, l) * xs[l];
            xs[j] = diag == UNIT ? s : s / op_a(j, j);
          }
        }
        for (int j = 0; j < m; ++j) b[j + (long)c * ldb] = (T)xs[j];
        if (xs != x) delete[] xs;
      }
    }
  }
  return SUCCESS;
}
}  // namespace

extern "C" {
int cublasCreate_v2(Handle** h) {
  *h = new Handle{nullptr};
  return SUCCESS;
}
int cublasDestroy_v2(Handle* h) {
  delete h;
  return SUCCESS;
}
int cublasSetStream_v2(Handle* h, void* s) {
  if (!h) return NOT_INITIALIZED;
  h->stream = s;
  return SUCCESS;
}
int cublasGetStream_v2(Handle* h, void** s) {
  *s = h->stream;
  return SUCCESS;
}
int cublasSetMathMode(Handle*, int) { return SUCCESS; }
int cublasSetPointerMode_v2(Handle*, int mode) { return mode == 0 ? SUCCESS : NOT_SUPPORTED; }
int cublasSetWorkspace_v2(Handle*, void*, size_t) { return SUCCESS; }

int cublasSgemmStridedBatched(Handle*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                              long long sa, const float* b, int ldb, long long sb, const float* beta, float* c, int ldc,
                              long long sc, int batch) {
  return gemm_strided_batched("cublasSgemmStridedBatched", ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc,
                              sc, batch);
}
int cublasDgemmStridedBatched(Handle*, int ta, int tb, int m, int n, int k, const double* alpha, const double* a,
                              int lda, long long sa, const double* b, int ldb, long long sb, const double* beta,
                              double* c, int ldc, long long sc, int batch) {
  return gemm_strided_batched("cublasDgemmStridedBatched", ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc,
                              sc, batch);
}
int cublasSgemm_v2(Handle*, int ta, int tb, int m, int n, int k, const float* alpha, const float* a, int lda,
                   const float* b, int ldb, const float* beta, float* c, int ldc) {
  return gemm_strided_batched("cublasSgemm_v2", ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
}
int cublasDgemm_v2(Handle*, int ta, int tb, int m, int n, int k, const double* alpha, const double* a, int lda,
                   const double* b, int ldb, const double* beta, double* c, int ldc) {
  return gemm_strided_batched("cublasDgemm_v2", ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1);
}
int cublasStrsmBatched(Handle*, int side, int uplo, int trans, int diag, int m, int n, const float* alpha,
                       const float* const* a, int lda, float* const* b, int ldb, int batch) {
  return trsm_batched("cublasStrsmBatched", side, uplo, trans, diag, m, n, alpha, a, lda, b, ldb, batch);
}
int cublasDtrsmBatched(Handle*, int side, int uplo, int trans, int diag, int m, int n, const double* alpha,
                       const double* const* a, int lda, double* const* b, int ldb, int batch) {
  return trsm_batched("cublasDtrsmBatched", side, uplo, trans, diag, m, n, alpha, a, lda, b, ldb, batch);
}
}  // extern "C"
