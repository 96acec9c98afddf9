// solver.cpp -> libcusolver.so: the cuSOLVER dense calls neurokernels makes (through cudarc),
// as reference code on the host: syevd (cyclic Jacobi in double; eigenvalues ascending,
// eigenvectors in A's columns, as cuSOLVER returns them) with its workspace query, and
// potrfBatched (Cholesky in double; info[i] = j when the leading minor of order j is not
// positive definite). Operands must lie inside device allocations.
#include <cmath>
#include <cstdio>
#include <vector>

#include "nkemu.h"

namespace {
enum Status { SUCCESS = 0, NOT_INITIALIZED = 1, INVALID_VALUE = 3, NOT_SUPPORTED = 9 };
enum Fill { LOWER = 0, UPPER = 1 };
enum EigMode { NOVECTOR = 0, VECTOR = 1 };
struct Handle {
  void* stream;
};

Status bad(const char* call, const char* what) {
  std::fprintf(stderr, "nkemu cuSOLVER: %s: %s\n", call, what);
  return INVALID_VALUE;
}

// The workspace cuSOLVER would ask for; the emulation uses none of it, but the caller's
// buffer of this size must exist.
int syevd_lwork(int n) { return n > 0 ? 2 * n * n + 6 * n + 1 : 1; }

template <typename T>
Status syevd(const char* call, int jobz, int uplo, int n, T* a, int lda, T* w, T* work, int lwork, int* info) {
  nkemu::note_call(call);
  if (n < 0 || lda < (n > 1 ? n : 1)) return bad(call, "n < 0 or lda < n");
  if (!nkemu::device_range_ok(info, sizeof(int))) return bad(call, "info outside a device allocation");
  if (n == 0) {
    *info = 0;
    return SUCCESS;
  }
  if (!nkemu::device_range_ok(a, sizeof(T) * ((long)lda * (n - 1) + n)) || !nkemu::device_range_ok(w, sizeof(T) * n))
    return bad(call, "A or W outside a device allocation");
  if (lwork < syevd_lwork(n) || !nkemu::device_range_ok(work, sizeof(T) * (size_t)lwork))
    return bad(call, "the workspace is smaller than the bufferSize query returned");
  // the symmetric matrix from the named triangle
  std::vector<double> m((size_t)n * n), v((size_t)n * n, 0.0);
  for (int c = 0; c < n; ++c)
    for (int r = 0; r < n; ++r) {
      const bool stored = uplo == LOWER ? r >= c : r <= c;
      m[(size_t)r + (size_t)c * n] = stored ? (double)a[r + (long)c * lda] : (double)a[c + (long)r * lda];
    }
  for (int i = 0; i < n; ++i) v[(size_t)i * n + i] = 1.0;
  // cyclic Jacobi: rotate away each off-diagonal element until the off-diagonal mass is negligible
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0, diag = 0;
    for (int c = 0; c < n; ++c)
      for (int r = 0; r < n; ++r) (r == c ? diag : off) += m[(size_t)r + (size_t)c * n] * m[(size_t)r + (size_t)c * n];
    if (off <= 1e-30 * diag || off == 0) break;
    for (int p = 0; p < n - 1; ++p)
      for (int q = p + 1; q < n; ++q) {
        const double apq = m[(size_t)p + (size_t)q * n];
        if (apq == 0) continue;
        const double app = m[(size_t)p + (size_t)p * n], aqq = m[(size_t)q + (size_t)q * n];
        const double theta = (aqq - app) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double mkp = m[(size_t)k + (size_t)p * n], mkq = m[(size_t)k + (size_t)q * n];
          m[(size_t)k + (size_t)p * n] = c * mkp - s * mkq;
          m[(size_t)k + (size_t)q * n] = s * mkp + c * mkq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double mpk = m[(size_t)p + (size_t)k * n], mqk = m[(size_t)q + (size_t)k * n];
          m[(size_t)p + (size_t)k * n] = c * mpk - s * mqk;
          m[(size_t)q + (size_t)k * n] = s * mpk + c * mqk;
        }
        for (int k = 0; k < n; ++k) {
          const double vkp = v[(size_t)k + (size_t)p * n], vkq = v[(size_t)k + (size_t)q * n];
          v[(size_t)k + (size_t)p * n] = c * vkp - s * vkq;
          v[(size_t)k + (size_t)q * n] = s * vkp + c * vkq;
        }
      }
  }
  std::vector<int> order((size_t)n);
  for (int i = 0; i < n; ++i) order[(size_t)i] = i;
  for (int i = 1; i < n; ++i)  // insertion sort, ascending eigenvalues
    for (int j = i; j > 0 && m[(size_t)order[j] * (n + 1)] < m[(size_t)order[j - 1] * (n + 1)]; --j)
      std::swap(order[(size_t)j], order[(size_t)j - 1]);
  for (int i = 0; i < n; ++i) {
    const int src = order[(size_t)i];
    w[i] = (T)m[(size_t)src * (n + 1)];
    if (jobz == VECTOR)
      for (int k = 0; k < n; ++k) a[k + (long)i * lda] = (T)v[(size_t)k + (size_t)src * n];
  }
  *info = 0;
  return SUCCESS;
}

template <typename T> Status potrf_batched(const char* call, int uplo, int n, T** as, int lda, int* info, int batch) {
  nkemu::note_call(call);
  if (n < 0 || batch < 0 || lda < (n > 1 ? n : 1)) return bad(call, "n < 0, batch < 0 or lda < n");
  if (batch && (!nkemu::device_range_ok(as, sizeof(T*) * batch) || !nkemu::device_range_ok(info, sizeof(int) * batch)))
    return bad(call, "the pointer array or info outside device allocations");
  for (int b = 0; b < batch; ++b) {
    T* a = as[b];
    if (n && !nkemu::device_range_ok(a, sizeof(T) * ((long)lda * (n - 1) + n))) return bad(call, "A outside a device allocation");
    // element (r, c) of the stored triangle, as the lower factor L (upper: U = L^T)
    auto el = [&](int r, int c) -> T& { return uplo == LOWER ? a[r + (long)c * lda] : a[c + (long)r * lda]; };
    info[b] = 0;
    for (int j = 0; j < n && !info[b]; ++j) {
      double d = (double)el(j, j);
      for (int k = 0; k < j; ++k) d -= (double)el(j, k) * (double)el(j, k);
      if (!(d > 0)) {
        info[b] = j + 1;
        break;
      }
      const double ljj = std::sqrt(d);
      el(j, j) = (T)ljj;
      for (int i = j + 1; i < n; ++i) {
        double s = (double)el(i, j);
        for (int k = 0; k < j; ++k) s -= (double)el(i, k) * (double)el(j, k);
        el(i, j) = (T)(s / ljj);
      }
    }
  }
  return SUCCESS;
}
}  // namespace

extern "C" {
int cusolverDnCreate(Handle** h) {
  *h = new Handle{nullptr};
  return SUCCESS;
}
int cusolverDnDestroy(Handle* h) {
  delete h;
  return SUCCESS;
}
int cusolverDnSetStream(Handle* h, void* s) {
  if (!h) return NOT_INITIALIZED;
  h->stream = s;
  return SUCCESS;
}
int cusolverDnGetStream(Handle* h, void** s) {
  *s = h->stream;
  return SUCCESS;
}
int cusolverDnSsyevd_bufferSize(Handle*, int, int, int n, const float*, int, const float*, int* lwork) {
  *lwork = syevd_lwork(n);
  return SUCCESS;
}
int cusolverDnDsyevd_bufferSize(Handle*, int, int, int n, const double*, int, const double*, int* lwork) {
  *lwork = syevd_lwork(n);
  return SUCCESS;
}
int cusolverDnSsyevd(Handle*, int jobz, int uplo, int n, float* a, int lda, float* w, float* work, int lwork, int* info) {
  return syevd("cusolverDnSsyevd", jobz, uplo, n, a, lda, w, work, lwork, info);
}
int cusolverDnDsyevd(Handle*, int jobz, int uplo, int n, double* a, int lda, double* w, double* work, int lwork,
                     int* info) {
  return syevd("cusolverDnDsyevd", jobz, uplo, n, a, lda, w, work, lwork, info);
}
int cusolverDnSpotrfBatched(Handle*, int uplo, int n, float** a, int lda, int* info, int batch) {
  return potrf_batched("cusolverDnSpotrfBatched", uplo, n, a, lda, info, batch);
}
int cusolverDnDpotrfBatched(Handle*, int uplo, int n, double** a, int lda, int* info, int batch) {
  return potrf_batched("cusolverDnDpotrfBatched", uplo, n, a, lda, info, batch);
}
}  // extern "C"
