//! Small matrix products on cache-resident blocks, for fused kernels (GLA's chunks; later
//! attention tiles): C[m×n] += A[m×k]·B[k×n] with B and C row-major (n contiguous) and A
//! read through any strides (so Aᵀ needs no copy). Register tiles of up to 6 rows × 2
//! vectors: each step of the inner dimension loads two vectors of B, broadcasts one element
//! of A per row and issues 12 independent multiply-adds (enough in flight to cover the FMA
//! latency on the two FMA pipes). The summation order over the inner dimension is
//! sequential and the same on every ISA, so results are reproducible for a given ISA.

use crate::cpu::Simd;
use crate::element::{Accum, Element};

/// Operand A of [`gemm_acc`]: element (i, p) is at `ptr + i·row_stride + p·inner_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<A> {
    pub ptr: *const A,
    pub row_stride: usize,
    pub inner_stride: usize,
}

/// Operand B of the products: `k` rows of `n` values at a row stride, read in the accumulator
/// type (as stored, or widened from f16/bf16 as each vector is loaded).
///
/// # Safety
///
/// For every method: the pointer was derived from the whole B buffer and `p < k`,
/// `col (+ lanes for vload) <= n` of the product's B (so the address is in bounds); `vload`
/// also needs a CPU supporting `S` (inside `dispatch`).
trait RowsB<A: Accum>: Copy {
    /// `lanes` values of row p from column `col`.
    unsafe fn vload<S: Simd>(self, p: usize, col: usize) -> A::V<S>;
    /// The value at row p, column `col`.
    unsafe fn get(self, p: usize, col: usize) -> A;
    /// The same rows from column `col` on.
    unsafe fn at_col(self, col: usize) -> Self;
}

/// What a product's C starts from before A·B is added.
#[derive(Clone, Copy)]
enum Start<A> {
    Zero,
    /// C's own values.
    C,
    /// `from[i][j]·scale[j]` (`from` at row stride `stride`; may be C itself): a state
    /// decayed per column and updated in one pass over it instead of two.
    Scaled {
        from: *const A,
        stride: usize,
        scale: *const A,
    },
}

impl<A: Accum> Start<A> {
    /// The same start moved by `rows` rows and `cols` columns (address arithmetic only:
    /// reads happen in `tile`, within the product's bounds).
    #[inline(always)]
    fn offset(self, rows: usize, cols: usize) -> Self {
        match self {
            Self::Scaled {
                from,
                stride,
                scale,
            } => Self::Scaled {
                from: from.wrapping_add(rows * stride + cols),
                stride,
                scale: scale.wrapping_add(cols),
            },
            other => other,
        }
    }
}

/// B stored in the accumulator type.
#[derive(Clone, Copy)]
struct Plain<A> {
    ptr: *const A,
    stride: usize,
}

// SAFETY (the blocks of this impl and of `Widening`'s): the offsets are in bounds of B by
// the RowsB contract (p < k, col + lanes <= n), and the ISA is the caller's guarantee.
#[allow(clippy::undocumented_unsafe_blocks)]
impl<A: Accum> RowsB<A> for Plain<A> {
    #[inline(always)]
    unsafe fn vload<S: Simd>(self, p: usize, col: usize) -> A::V<S> {
        unsafe { A::vload::<S>(self.ptr.add(p * self.stride + col)) }
    }
    #[inline(always)]
    unsafe fn get(self, p: usize, col: usize) -> A {
        unsafe { *self.ptr.add(p * self.stride + col) }
    }
    #[inline(always)]
    unsafe fn at_col(self, col: usize) -> Self {
        Self {
            ptr: unsafe { self.ptr.add(col) },
            ..self
        }
    }
}

/// B stored as elements E, widened to E::Acc as it is loaded.
#[derive(Clone, Copy)]
struct Widening<E> {
    ptr: *const E,
    stride: usize,
}

// SAFETY: see `impl RowsB for Plain`.
#[allow(clippy::undocumented_unsafe_blocks)]
impl<E: Element> RowsB<E::Acc> for Widening<E> {
    #[inline(always)]
    unsafe fn vload<S: Simd>(self, p: usize, col: usize) -> <E::Acc as Accum>::V<S> {
        unsafe { E::vload::<S>(self.ptr.add(p * self.stride + col)) }
    }
    #[inline(always)]
    unsafe fn get(self, p: usize, col: usize) -> E::Acc {
        unsafe { (*self.ptr.add(p * self.stride + col)).to_acc() }
    }
    #[inline(always)]
    unsafe fn at_col(self, col: usize) -> Self {
        Self {
            ptr: unsafe { self.ptr.add(col) },
            ..self
        }
    }
}

/// C += A·B over `m × n` with inner dimension `k`. With `lower_triangular` (a causal A:
/// A[i][p] = 0 for p > i) a tile of rows stops the inner loop after its last row's diagonal;
/// the entries above the diagonal inside a tile are still read, so they must hold zeros.
///
/// # Safety
/// The CPU supports `S` (call inside a `SimdKernel::run` entered by `dispatch`). A (m × k
/// through its strides), B (k rows of `n` at `b_stride`) and C (m rows of `n` at
/// `c_stride`) must be valid for reads (C also writes), each pointer derived from its whole
/// buffer, and C must not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_acc<S: Simd, A: Accum>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<A>,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    lower_triangular: bool,
) {
    let b = Plain {
        ptr: b,
        stride: b_stride,
    };
    // SAFETY: this fn's contract is product's.
    unsafe { product::<S, A, _>(m, n, k, a, b, c, c_stride, lower_triangular, Start::C) }
}

/// C = from∘scale + A·B over `m × n` with inner dimension `k`, where row i of `from` (at
/// `from_stride`) is multiplied element-wise by `scale` (n values): [`gemm_acc`] on a C
/// first set to that, with the same bits, in one pass. `from` may be C itself (same
/// stride): each value is read before its place is written.
///
/// # Safety
/// As [`gemm_acc`] (not triangular); `from` is valid for reading m rows of n at
/// `from_stride` and `scale` for n values, neither overlapping A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_scaled_acc<S: Simd, A: Accum>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<A>,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
    (from, from_stride, scale): (*const A, usize, *const A),
) {
    let b = Plain {
        ptr: b,
        stride: b_stride,
    };
    let start = Start::Scaled {
        from,
        stride: from_stride,
        scale,
    };
    // SAFETY: this fn's contract is product's.
    unsafe { product::<S, A, _>(m, n, k, a, b, c, c_stride, false, start) }
}

/// [`gemm_acc`] with B stored as elements E (f16/bf16 widened as they are loaded; for f32
/// and f64 the same code as `gemm_acc`), no triangular A.
///
/// # Safety
/// As [`gemm_acc`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_acc_widening<S: Simd, E: Element>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<E::Acc>,
    b: *const E,
    b_stride: usize,
    c: *mut E::Acc,
    c_stride: usize,
) {
    let b = Widening {
        ptr: b,
        stride: b_stride,
    };
    // SAFETY: this fn's contract is product's.
    unsafe { product::<S, E::Acc, _>(m, n, k, a, b, c, c_stride, false, Start::C) }
}

/// C = A·B over `m × n` with inner dimension `k`: [`gemm_acc`] into a C whose old values are
/// never read (the same bits as zeroing C first, without the pass over it).
///
/// # Safety
/// As [`gemm_acc`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_set<S: Simd, A: Accum>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<A>,
    b: *const A,
    b_stride: usize,
    c: *mut A,
    c_stride: usize,
) {
    let b = Plain {
        ptr: b,
        stride: b_stride,
    };
    // SAFETY: this fn's contract is product's.
    unsafe { product::<S, A, _>(m, n, k, a, b, c, c_stride, false, Start::Zero) }
}

/// The body of the three products.
///
/// # Safety
/// As [`gemm_acc`] (B through any [`RowsB`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn product<S: Simd, A: Accum, B: RowsB<A>>(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<A>,
    b: B,
    c: *mut A,
    c_stride: usize,
    lower_triangular: bool,
    start: Start<A>,
) {
    let lanes = A::lanes::<S>();
    let inner = |row0: usize, rows: usize| {
        if lower_triangular {
            k.min(row0 + rows)
        } else {
            k
        }
    };
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(6);
        let kk = inner(i, rows);
        // SAFETY: row i < m of A and of C, in bounds by this fn's contract.
        let a_ptr = unsafe { a.ptr.add(i * a.row_stride) };
        let a_at = Strided { ptr: a_ptr, ..a };
        // SAFETY: as above.
        let c_at = unsafe { c.add(i * c_stride) };
        let start_at = start.offset(i, 0);
        let mut j = 0;
        // 32 registers: 4-vector tiles, so a row strip reads B once per 4 vectors of C
        while S::WIDE_TILES && j + 4 * lanes <= n {
            // SAFETY: rows i..i + rows <= m, columns j..j + 4·lanes <= n, inner kk <= k:
            // inside A, B and C per this fn's contract; the ISA likewise.
            unsafe {
                tile_rows::<S, A, B, 4>(
                    rows,
                    kk,
                    a_at,
                    b.at_col(j),
                    (c_at.add(j), c_stride),
                    start_at.offset(0, j),
                )
            };
            j += 4 * lanes;
        }
        while j + 2 * lanes <= n {
            // SAFETY: as above, columns j..j + 2·lanes <= n.
            unsafe {
                tile_rows::<S, A, B, 2>(
                    rows,
                    kk,
                    a_at,
                    b.at_col(j),
                    (c_at.add(j), c_stride),
                    start_at.offset(0, j),
                )
            };
            j += 2 * lanes;
        }
        if j + lanes <= n {
            // SAFETY: as above, columns j..j + lanes <= n.
            unsafe {
                tile_rows::<S, A, B, 1>(
                    rows,
                    kk,
                    a_at,
                    b.at_col(j),
                    (c_at.add(j), c_stride),
                    start_at.offset(0, j),
                )
            };
            j += lanes;
        }
        // columns past the last whole vector, one at a time (same order over p)
        for col in j..n {
            for r in 0..rows {
                // SAFETY: row i + r < m, column col < n, p < kk <= k: in bounds per this
                // fn's contract.
                unsafe {
                    let out = c_at.add(r * c_stride + col);
                    let mut acc = match start_at {
                        Start::Zero => A::ZERO,
                        Start::C => *out,
                        Start::Scaled {
                            from,
                            stride,
                            scale,
                        } => *from.add(r * stride + col) * *scale.add(col),
                    };
                    for p in 0..kk {
                        let x = *a_at.ptr.add(r * a.row_stride + p * a.inner_stride);
                        acc = acc + x * b.get(p, col);
                    }
                    *out = acc;
                }
            }
        }
        i += rows;
    }
}

/// [`tile`] for a strip of `rows` (1..=6) rows.
///
/// # Safety
/// As [`tile`], for `rows` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_rows<S: Simd, A: Accum, B: RowsB<A>, const NV: usize>(
    rows: usize,
    k: usize,
    a: Strided<A>,
    b: B,
    c: (*mut A, usize),
    start: Start<A>,
) {
    // SAFETY: this fn's contract is tile's with MR = rows (the `_` arm is rows = 1).
    unsafe {
        match rows {
            6 => tile::<S, A, B, 6, NV>(k, a, b, c, start),
            5 => tile::<S, A, B, 5, NV>(k, a, b, c, start),
            4 => tile::<S, A, B, 4, NV>(k, a, b, c, start),
            3 => tile::<S, A, B, 3, NV>(k, a, b, c, start),
            2 => tile::<S, A, B, 2, NV>(k, a, b, c, start),
            _ => tile::<S, A, B, 1, NV>(k, a, b, c, start),
        }
    }
}

/// One register tile: MR rows × NV vectors of C over `k`, added to C's values with
/// its `start`. C is (pointer, row stride).
///
/// # Safety
/// The CPU supports `S`; A's MR rows × k, B's k rows × NV·lanes columns and C's MR rows ×
/// NV·lanes columns are in bounds (C writable, not overlapping A or B).
#[inline(always)]
unsafe fn tile<S: Simd, A: Accum, B: RowsB<A>, const MR: usize, const NV: usize>(
    k: usize,
    a: Strided<A>,
    b: B,
    (c, c_stride): (*mut A, usize),
    start: Start<A>,
) {
    let lanes = A::lanes::<S>();
    // SAFETY: every access is r < MR, p < k, v < NV of the extents this fn's contract covers.
    unsafe {
        let mut acc = [[A::vsplat::<S>(A::ZERO); NV]; MR];
        match start {
            Start::Zero => {}
            Start::C => {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = A::vload::<S>(c.add(r * c_stride + v * lanes));
                    }
                }
            }
            Start::Scaled {
                from,
                stride,
                scale,
            } => {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        let at = v * lanes;
                        let y = A::vload::<S>(from.add(r * stride + at));
                        *x = A::vmul::<S>(y, A::vload::<S>(scale.add(at)));
                    }
                }
            }
        }
        for p in 0..k {
            let mut bv = [A::vsplat::<S>(A::ZERO); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = b.vload::<S>(p, v * lanes);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let x = A::vsplat::<S>(*a.ptr.add(r * a.row_stride + p * a.inner_stride));
                for (v, y) in row.iter_mut().enumerate() {
                    *y = A::vfma::<S>(x, bv[v], *y);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                A::vstore::<S>(c.add(r * c_stride + v * lanes), *x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{Isa, SimdKernel, dispatch};

    struct Case<'a> {
        m: usize,
        n: usize,
        k: usize,
        transposed_a: bool,
        lower: bool,
        /// gemm_set (C = A·B) instead of gemm_acc
        set: bool,
        a: &'a [f64],
        b: &'a [f64],
        c: &'a mut [f64],
    }

    impl SimdKernel for Case<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self) {
            let a = if self.transposed_a {
                // stored [k][m]: element (i, p) at p·m + i
                Strided {
                    ptr: self.a.as_ptr(),
                    row_stride: 1,
                    inner_stride: self.m,
                }
            } else {
                Strided {
                    ptr: self.a.as_ptr(),
                    row_stride: self.k,
                    inner_stride: 1,
                }
            };
            let (b, c) = (self.b.as_ptr(), self.c.as_mut_ptr());
            // SAFETY: the buffers have the sizes built in the test; C is separate.
            unsafe {
                if self.set {
                    gemm_set::<S, f64>(self.m, self.n, self.k, a, b, self.n + 3, c, self.n + 1)
                } else {
                    gemm_acc::<S, f64>(
                        self.m,
                        self.n,
                        self.k,
                        a,
                        b,
                        self.n + 3,
                        c,
                        self.n + 1,
                        self.lower,
                    )
                }
            }
        }
    }

    /// Every ISA against a naive triple loop: sizes around the tile edges, A transposed or
    /// not, padded B and C strides, the lower-triangular mode; C starts non-zero (gemm_acc
    /// adds to it; gemm_set overwrites the m × n entries, NaN there first, and leaves the
    /// padding).
    #[test]
    fn matches_naive_product() {
        let mut seed = 1u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 16, 5),
            (7, 17, 9),
            (16, 64, 64),
            (13, 3, 16),
            (64, 40, 16),
        ] {
            for (transposed_a, lower, set) in (0..8).map(|i| (i & 1 == 1, i & 2 == 2, i & 4 == 4)) {
                if lower && (m != k || set) {
                    continue;
                }
                let mut a: Vec<f64> = (0..m * k).map(|_| next()).collect();
                if lower {
                    for i in 0..m {
                        for p in i + 1..k {
                            let at = if transposed_a { p * m + i } else { i * k + p };
                            a[at] = 0.0;
                        }
                    }
                }
                let b: Vec<f64> = (0..k * (n + 3)).map(|_| next()).collect();
                let mut c0: Vec<f64> = (0..m * (n + 1)).map(|_| next()).collect();
                let mut want = c0.clone();
                if set {
                    for i in 0..m {
                        c0[i * (n + 1)..i * (n + 1) + n].fill(f64::NAN);
                        want[i * (n + 1)..i * (n + 1) + n].fill(0.0);
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        for p in 0..k {
                            let x = if transposed_a {
                                a[p * m + i]
                            } else {
                                a[i * k + p]
                            };
                            want[i * (n + 1) + j] += x * b[p * (n + 3) + j];
                        }
                    }
                }
                for isa in Isa::available() {
                    let mut c = c0.clone();
                    dispatch(
                        isa,
                        Case {
                            m,
                            n,
                            k,
                            transposed_a,
                            lower,
                            set,
                            a: &a,
                            b: &b,
                            c: &mut c,
                        },
                    );
                    for (got, w) in c.iter().zip(&want) {
                        assert!(
                            (got - w).abs() <= 1e-12 * (1.0 + w.abs()),
                            "{isa:?} m{m} n{n} k{k} transposed {transposed_a} lower {lower} set {set}"
                        );
                    }
                }
            }
        }
    }

    struct Scaled<'a> {
        m: usize,
        n: usize,
        k: usize,
        in_place: bool,
        a: &'a [f64],
        b: &'a [f64],
        from: &'a [f64],
        scale: &'a [f64],
        c: &'a mut [f64],
    }

    impl SimdKernel for Scaled<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self) {
            let a = Strided {
                ptr: self.a.as_ptr(),
                row_stride: self.k,
                inner_stride: 1,
            };
            let c = self.c.as_mut_ptr();
            let from = match self.in_place {
                true => c.cast_const(),
                false => self.from.as_ptr(),
            };
            // SAFETY: A m×k, B k×n, C and `from` m×n (stride n), scale n values, as built in
            // the test; C overlaps only itself.
            unsafe {
                gemm_scaled_acc::<S, f64>(
                    self.m,
                    self.n,
                    self.k,
                    a,
                    self.b.as_ptr(),
                    self.n,
                    c,
                    self.n,
                    (from, self.n, self.scale.as_ptr()),
                )
            }
        }
    }

    /// gemm_scaled_acc: C = from∘scale + A·B on every ISA, `from` separate or C itself,
    /// sizes around the tile edges, bit for bit the scaling pass followed by gemm_acc.
    #[test]
    fn scaled_start_is_scaling_then_product() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        for &(m, n, k) in &[(1, 1, 1), (7, 17, 9), (16, 64, 16), (64, 40, 5)] {
            let a: Vec<f64> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f64> = (0..k * n).map(|_| next()).collect();
            let from: Vec<f64> = (0..m * n).map(|_| next()).collect();
            let scale: Vec<f64> = (0..n).map(|_| next()).collect();
            for isa in Isa::available() {
                // the scaling pass, then gemm_acc (Case's B and C are padded)
                let scaled: Vec<f64> = (0..m * n).map(|i| from[i] * scale[i % n]).collect();
                let mut c_pad = padded(&scaled, m, n, 1);
                dispatch(
                    isa,
                    Case {
                        m,
                        n,
                        k,
                        transposed_a: false,
                        lower: false,
                        set: false,
                        a: &a,
                        b: &padded(&b, k, n, 3),
                        c: &mut c_pad,
                    },
                );
                let want = unpadded(&c_pad, m, n, 1);
                for in_place in [false, true] {
                    let mut c = match in_place {
                        true => from.clone(),
                        false => vec![f64::NAN; m * n],
                    };
                    dispatch(
                        isa,
                        Scaled {
                            m,
                            n,
                            k,
                            in_place,
                            a: &a,
                            b: &b,
                            from: &from,
                            scale: &scale,
                            c: &mut c,
                        },
                    );
                    assert_eq!(c, want, "{isa:?} m{m} n{n} k{k} in place {in_place}");
                }
            }
        }
    }

    /// Rows of `n` values re-laid at a row stride of n + pad (the pad values NaN).
    fn padded(x: &[f64], rows: usize, n: usize, pad: usize) -> Vec<f64> {
        let mut out = vec![f64::NAN; rows * (n + pad)];
        for (to, from) in out.chunks_exact_mut(n + pad).zip(x.chunks_exact(n)) {
            to[..n].copy_from_slice(from);
        }
        out
    }

    fn unpadded(x: &[f64], rows: usize, n: usize, pad: usize) -> Vec<f64> {
        (x.chunks_exact(n + pad).take(rows))
            .flat_map(|r| r[..n].iter().copied())
            .collect()
    }
}
