// nkemu_mma.h: tensor-core instructions as warp collectives.
// - `nvcuda::wmma`: CUDA leaves the fragment layout unspecified, so kernels may only load,
//   store, fill and transform fragments element-wise; here lane l holds logical elements
//   l*num_elements .. (l+1)*num_elements-1 of the tile in row-major order.
// - PTX `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32`: kernels do depend on
//   its register layout, so it follows the PTX ISA's documented fragment layouts (section
//   "Matrix Fragments for mma.m16n8k16 with floating point type"). nkcc rewrites the inline
//   `asm` statement into a call of nkemu_ptx::<opcode with '.' -> '_'>.
// Products of f16/bf16/tf32 operands are exact in f32; the sum of a dot product is taken in
// f64 and rounded once (the hardware's internal order and rounding are unspecified).
#pragma once

namespace nkemu {
inline float tf32_round(float x) {  // cvt.rna.tf32.f32: nearest, ties away, 10-bit mantissa
  unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return __uint_as_float(u);
}
inline float tf32_truncate(float x) { return __uint_as_float(__float_as_uint(x) & 0xffffe000u); }
inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace nkemu

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };
inline float __float_to_tf32(float x) { return nkemu::tf32_round(x); }

template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct dims<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct dims<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
template <typename T> struct storage {
  using type = T;
};
template <> struct storage<precision::tf32> {
  using type = float;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = dims<Use, M, N, K>::rows, cols = dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];
  // the logical (row, col) of element i held by `lane`
  static void at(int lane, int i, int& r, int& c) {
    const int e = lane * num_elements + i;
    r = e / cols;
    c = e % cols;
  }
};

template <typename U, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<U, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}

template <typename U, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<U, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<U, M, N, K, T, L>;
  nkemu::sync_warp(NKEMU_HERE, 0xffffffffu);
  for (int i = 0; i < F::num_elements; ++i) {
    int r, c;
    F::at((int)nkemu::tl_lane, i, r, c);
    f.x[i] = std::is_same<L, col_major>::value ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
  }
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void>& f, const T* p, unsigned ldm, layout_t l) {
  using F = fragment<accumulator, M, N, K, T, void>;
  nkemu::sync_warp(NKEMU_HERE, 0xffffffffu);
  for (int i = 0; i < F::num_elements; ++i) {
    int r, c;
    F::at((int)nkemu::tl_lane, i, r, c);
    f.x[i] = l == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
  }
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T, void>& f, unsigned ldm, layout_t l) {
  using F = fragment<accumulator, M, N, K, T, void>;
  nkemu::sync_warp(NKEMU_HERE, 0xffffffffu);
  for (int i = 0; i < F::num_elements; ++i) {
    int r, c;
    F::at((int)nkemu::tl_lane, i, r, c);
    (l == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f.x[i];
  }
  nkemu::sync_warp(NKEMU_HERE, 0xffffffffu);
}

// d = a b + c over the warp.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC, void>& c) {
  using FA = fragment<matrix_a, M, N, K, TA, LA>;
  using FB = fragment<matrix_b, M, N, K, TB, LB>;
  using FC = fragment<accumulator, M, N, K, TC, void>;
  constexpr bool tf32 = std::is_same<TA, precision::tf32>::value;
  struct Mine {
    const FA* a;
    const FB* b;
  } mine{&a, &b};
  void* const* lanes = nkemu::warp_gather(NKEMU_HERE, &mine);
  const int lane = (int)nkemu::tl_lane;
  float out[FC::num_elements];
  for (int i = 0; i < FC::num_elements; ++i) {
    int r, cc;
    FC::at(lane, i, r, cc);
    double s = (double)c.x[i];
    for (int k = 0; k < K; ++k) {
      const int ea = r * K + k, eb = k * N + cc;  // row-major positions in A [M, K] and B [K, N]
      const FA* fa = ((const Mine*)lanes[ea / FA::num_elements])->a;
      const FB* fb = ((const Mine*)lanes[eb / FB::num_elements])->b;
      float av = nkemu::widen(fa->x[ea % FA::num_elements]);
      float bv = nkemu::widen(fb->x[eb % FB::num_elements]);
      if (tf32) {  // the unit reads 10 mantissa bits whatever the register holds
        av = nkemu::tf32_truncate(av);
        bv = nkemu::tf32_truncate(bv);
      }
      s += (double)av * (double)bv;
    }
    out[i] = (float)s;
  }
  nkemu::warp_release(NKEMU_HERE);  // every lane has read a and b
  for (int i = 0; i < FC::num_elements; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

namespace nkemu_ptx {
// One 16-bit element of a 32-bit register holding two (low half first).
template <bool BF16> inline float half_of(unsigned reg, int high) {
  const unsigned short h = (unsigned short)(high ? reg >> 16 : reg & 0xffffu);
  if (BF16) return __uint_as_float((unsigned)h << 16);
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
struct M16N8K16 {
  unsigned a[4], b[2];
};
// PTX ISA, mma.m16n8k16 with .f16/.bf16 operands: groupID g = lane >> 2, t = lane % 4.
//   A (16x16, row): a0 (g, 2t..2t+1), a1 (g+8, 2t..2t+1), a2 (g, 2t+8..2t+9), a3 (g+8, 2t+8..2t+9)
//   B (16x8, col):  b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
//   C, D (16x8):    c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// So A's element (row, k) sits in lane (row % 8)*4 + (k % 8)/2, register (row >= 8) + 2*(k >= 8),
// half k % 2; B's (k, n) in lane n*4 + (k % 8)/2, register k >= 8, half k % 2.
template <bool BF16>
inline void mma_m16n8k16(float* d0, float* d1, float* d2, float* d3, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                         unsigned b0, unsigned b1, float c0, float c1, float c2, float c3) {
  const M16N8K16 mine{{a0, a1, a2, a3}, {b0, b1}};
  void* const* lanes = nkemu::warp_gather(NKEMU_HERE, (void*)&mine);
  const int lane = (int)nkemu::tl_lane;
  const int g = lane >> 2, t = lane & 3;
  const float c[4] = {c0, c1, c2, c3};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    double s = c[i];
    for (int k = 0; k < 16; ++k) {
      const M16N8K16* pa = (const M16N8K16*)lanes[(row % 8) * 4 + (k % 8) / 2];
      const M16N8K16* pb = (const M16N8K16*)lanes[col * 4 + (k % 8) / 2];
      const float av = half_of<BF16>(pa->a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
      const float bv = half_of<BF16>(pb->b[k >= 8 ? 1 : 0], k & 1);
      s += (double)av * (double)bv;
    }
    out[i] = (float)s;
  }
  nkemu::warp_release(NKEMU_HERE);
  *d0 = out[0];
  *d1 = out[1];
  *d2 = out[2];
  *d3 = out[3];
}
inline void mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(float* d0, float* d1, float* d2, float* d3, unsigned a0,
                                                               unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                                               unsigned b1, float c0, float c1, float c2, float c3) {
  mma_m16n8k16<false>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
inline void mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(float* d0, float* d1, float* d2, float* d3,
                                                                 unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                                 unsigned b0, unsigned b1, float c0, float c1, float c2,
                                                                 float c3) {
  mma_m16n8k16<true>(d0, d1, d2, d3, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3);
}
}  // namespace nkemu_ptx
