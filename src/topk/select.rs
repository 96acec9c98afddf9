//! Per-row top-k selection: a candidate list with a running threshold, and `topk.rows`.
//!
//! The order everywhere is "larger value first, lower index first among equal values", with
//! NaN above every number (as torch.topk ranks it) and -0.0 equal to 0.0. Under this strict
//! total order on (value, index) the top k of a set is unique, so lists built over any split
//! of the input and merged in any order give the same result: the kernels split work by
//! thread count freely and stay deterministic.
//!
//! A [`TopList`] collects up to 2k candidates and then compacts to the best k
//! (`select_nth_unstable`, O(k)), after which its threshold is the k-th best value. Scans
//! visit indices in ascending order, so a later value equal to the threshold loses the tie
//! and a candidate needs to be strictly better: `!(v <= threshold)`, which also lets NaN
//! through. Until the first compaction the threshold is NaN, which lets everything through.

use super::TopK;
use crate::cpu::{Isa, Simd, SimdKernel, dispatch};
use crate::element::{Accum, Element};
use crate::error::{Error, Result, check_len};
use rayon::prelude::*;
use std::cmp::Ordering;

/// Index flag of a NaN in a smallest-first scan. There NaN must rank after every number,
/// +inf included, so it enters the list as −inf (the negated values' bottom) with this bit
/// set in its index: among −inf entries the flagged ones then rank last. A list whose k-th
/// entry is such a stand-in reports a NaN threshold (accept all), since a later −inf (an
/// original +inf) still beats it.
pub(crate) const NAN_LAST: u32 = 1 << 31;

/// The order of selection: `Greater` means `a` ranks before `b`.
#[inline(always)]
pub(crate) fn rank<A: Accum>(a: (A, u32), b: (A, u32)) -> Ordering {
    #[allow(clippy::eq_op)]
    let nan = |x: A| x != x;
    let by_value = match (nan(a.0), nan(b.0)) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal),
    };
    by_value.then(b.1.cmp(&a.1))
}

/// The best `k` (value, index) pairs seen so far, as unsorted order keys, with the
/// threshold a new candidate must beat.
#[derive(Clone, Debug)]
pub(crate) struct TopList<A: Accum> {
    k: usize,
    keys: Vec<A::OrderKey>,
    /// NaN while fewer than k are held (accept all), else the k-th best value.
    threshold: A,
}

impl<A: Accum> TopList<A> {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            keys: Vec::with_capacity(2 * k),
            threshold: A::from_f64(f64::NAN),
        }
    }

    #[inline(always)]
    pub fn threshold(&self) -> A {
        self.threshold
    }

    /// Adds a candidate (the caller may skip values with `v <= threshold` first).
    #[inline(always)]
    pub fn push(&mut self, value: A, index: u32) {
        self.keys.push(value.order_key(index));
        if self.keys.len() >= 2 * self.k {
            self.compact();
        }
    }

    /// Keeps the best k, after which the k-th best sits at k−1 and gives the threshold (a
    /// NaN stand-in of a smallest-first scan there keeps the threshold open, see
    /// [`NAN_LAST`]).
    fn compact(&mut self) {
        let k = self.k;
        self.keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        self.keys.truncate(k);
        let (value, index) = A::from_order_key(self.keys[k - 1]);
        self.threshold = if index & NAN_LAST != 0 {
            A::from_f64(f64::NAN)
        } else {
            value
        };
    }

    /// Adds every candidate of `other` (a list over another part of the same row).
    pub fn merge(&mut self, other: &TopList<A>) {
        for &key in &other.keys {
            self.keys.push(key);
            if self.keys.len() >= 2 * self.k {
                self.compact();
            }
        }
    }

    /// The best min(k, seen) pairs, best first.
    pub fn into_sorted(mut self) -> Vec<(A, u32)> {
        self.keys.sort_unstable_by(|a, b| b.cmp(a));
        self.keys.truncate(self.k);
        self.keys.into_iter().map(A::from_order_key).collect()
    }
}

/// Options of `topk.rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RowsParams {
    /// The largest values (default, `true`) or the smallest.
    pub largest: bool,
}

impl Default for RowsParams {
    fn default() -> Self {
        Self { largest: true }
    }
}

impl RowsParams {
    /// The defaults: the largest values.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest values (`true`) or the smallest (`false`).
    pub fn largest(mut self, largest: bool) -> Self {
        self.largest = largest;
        self
    }
}

/// The shape `[rows, cols]` of the matrix `topk.rows` selects from, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowsShape {
    /// Rows, each selected from independently.
    pub rows: usize,
    /// Entries per row (N).
    pub cols: usize,
}

impl RowsShape {
    /// `[rows, cols]`.
    pub fn new(rows: usize, cols: usize) -> Self {
        Self { rows, cols }
    }

    /// From a matrix's dims, which must have rank 2.
    pub fn from_dims(dims: &[usize]) -> Result<Self> {
        match *dims {
            [rows, cols] => Ok(Self { rows, cols }),
            _ => Err(Error::shape("x", "rank 2 [rows, N]", format!("{dims:?}"))),
        }
    }
}

/// `topk.rows`: the `k` largest (or smallest) entries of each row of `x [rows, N]`:
/// `values [rows, k]` best first and their column `indices [rows, k]`. Ties go to the lower
/// index; NaN ranks above every number (first with `largest`, last without, as torch.topk).
pub fn rows<E: Element>(
    params: &RowsParams,
    shape: RowsShape,
    k: usize,
    x: &[E],
) -> Result<TopK<E>> {
    E::topk_rows(Isa::active(), params, shape, k, x)
}

/// [`rows`] on a chosen ISA (tests compare every ISA with the scalar path).
#[doc(hidden)]
pub fn rows_on<E: Element>(
    isa: Isa,
    params: &RowsParams,
    shape: RowsShape,
    k: usize,
    x: &[E],
) -> Result<TopK<E>> {
    E::topk_rows(isa, params, shape, k, x)
}

/// The CPU row top-k, validated (instantiated per dtype in [`crate::dispatch`]).
pub(crate) fn rows_impl<E: Element>(
    isa: Isa,
    params: &RowsParams,
    shape: RowsShape,
    k: usize,
    x: &[E],
) -> Result<TopK<E>> {
    let RowsShape { rows, cols: n } = shape;
    isa.check()?;
    super::check_k("k", k, n, "the row length N")?;
    super::check_index_range("x", n)?;
    let total = rows
        .checked_mul(n)
        .ok_or_else(|| Error::overflow("x", format!("[{rows}, {n}] overflows")))?;
    check_len("x", x.len(), total, &format!("[{rows}, {n}]"))?;
    let out_len = rows * k;
    let mut values = vec![E::default(); out_len];
    let mut indices = vec![0i32; out_len];
    if out_len == 0 {
        return Ok(TopK { values, indices });
    }
    // Few long rows: split each row into column chunks (merged exactly, see the module doc).
    let threads = rayon::current_num_threads();
    let chunks = if rows >= 4 * threads {
        1
    } else {
        (4 * threads).div_ceil(rows).min(n.div_ceil(8192)).max(1)
    };
    let chunk_len = n.div_ceil(chunks);
    let sign = if params.largest { 1.0 } else { -1.0 };
    values
        .par_chunks_mut(k)
        .zip(indices.par_chunks_mut(k))
        .enumerate()
        .for_each(|(r, (vals, idxs))| {
            let row = &x[r * n..(r + 1) * n];
            let lists: Vec<TopList<E::Acc>> = (0..chunks)
                .into_par_iter()
                .map(|c| {
                    let start = (c * chunk_len).min(n);
                    let end = ((c + 1) * chunk_len).min(n);
                    dispatch(
                        isa,
                        ScanRow {
                            row: &row[start..end],
                            first_index: start as u32,
                            k,
                            sign: E::Acc::from_f64(sign),
                            nan_last: !params.largest,
                        },
                    )
                })
                .collect();
            let mut lists = lists.into_iter();
            let mut best = lists.next().unwrap_or_else(|| TopList::new(k));
            for other in lists {
                best.merge(&other);
            }
            for (j, (v, i)) in best.into_sorted().into_iter().enumerate() {
                vals[j] = if i & NAN_LAST != 0 {
                    E::from_f64(f64::NAN)
                } else {
                    E::from_acc(v * E::Acc::from_f64(sign))
                };
                idxs[j] = (i & !NAN_LAST) as i32;
            }
        });
    Ok(TopK { values, indices })
}

/// Pushes `value` if it beats the list's threshold; with `nan_last`, a NaN enters as the
/// flagged −inf stand-in of [`NAN_LAST`].
#[inline(always)]
fn offer<A: Accum>(list: &mut TopList<A>, value: A, index: u32, nan_last: bool) {
    #[allow(clippy::eq_op)]
    if nan_last && value != value {
        list.push(A::from_f64(f64::NEG_INFINITY), index | NAN_LAST);
        return;
    }
    // the threshold may have risen since a vector compare let this value through
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(value <= list.threshold()) {
        list.push(value, index);
    }
}

/// Bytes ahead of the scan that [`ScanRow`] asks the cache hierarchy for (topk.rows R4096
/// N32768 on the Xeon VM: 2 KiB 40.3–40.8 ms, 4 KiB 38.8–39.2, none 44–46; another day 4 KiB
/// 32.5–34.0 against 8 KiB 30.7–32.7 in alternating runs, 16 KiB no better than 8).
const SCAN_AHEAD: usize = 8192;

/// One row (or part of one) into a [`TopList`], values multiplied by `sign` (−1 selects the
/// smallest). The vector loop compares four vectors at once with the threshold and touches
/// the list only where a lane passes.
struct ScanRow<'a, E: Element> {
    row: &'a [E],
    first_index: u32,
    k: usize,
    sign: E::Acc,
    /// Smallest-first: NaN ranks last (see [`NAN_LAST`]).
    nan_last: bool,
}

impl<E: Element> SimdKernel for ScanRow<'_, E> {
    type Output = TopList<E::Acc>;
    #[inline(always)]
    fn run<S: Simd>(self) -> TopList<E::Acc> {
        type A<E> = <E as Element>::Acc;
        let lanes = A::<E>::lanes::<S>();
        let n = self.row.len();
        let mut list = TopList::new(self.k);
        let p = self.row.as_ptr();
        let mut j = 0;
        // SAFETY: every load reads lanes elements inside the row (j + 4·lanes <= n).
        unsafe {
            let sign = A::<E>::vsplat::<S>(self.sign);
            let mut thr = A::<E>::vsplat::<S>(list.threshold());
            let mut buf = [A::<E>::ZERO; 64];
            while j + 4 * lanes <= n {
                // a stream the hardware prefetchers alone leave ~25% below the read
                // bandwidth on the Xeon VM (a 512 MiB read loop: 28 → 22.5 ms)
                crate::cpu::prefetch(p.wrapping_add(j + SCAN_AHEAD / size_of::<E>()), 4 * lanes);
                let v: [_; 4] = std::array::from_fn(|u| {
                    A::<E>::vmul::<S>(E::vload::<S>(p.add(j + u * lanes)), sign)
                });
                let m: [u32; 4] = std::array::from_fn(|u| A::<E>::vmask_nle::<S>(v[u], thr));
                if m[0] | m[1] | m[2] | m[3] != 0 {
                    for u in 0..4 {
                        if m[u] == 0 {
                            continue;
                        }
                        A::<E>::vstore::<S>(buf.as_mut_ptr(), v[u]);
                        let mut bits = m[u];
                        while bits != 0 {
                            let lane = bits.trailing_zeros() as usize;
                            bits &= bits - 1;
                            let at = self.first_index + (j + u * lanes + lane) as u32;
                            offer(&mut list, buf[lane], at, self.nan_last);
                        }
                    }
                    thr = A::<E>::vsplat::<S>(list.threshold());
                }
                j += 4 * lanes;
            }
        }
        for (t, e) in self.row.iter().enumerate().skip(j) {
            let at = self.first_index + t as u32;
            offer(&mut list, e.to_acc() * self.sign, at, self.nan_last);
        }
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Order keys compare exactly as `rank`, and decode to the value (NaN stays NaN, -0.0
    /// comes back as 0.0) and the index.
    #[test]
    fn order_keys_follow_rank() {
        fn check<A: Accum>(values: &[A]) {
            for (i, &a) in values.iter().enumerate() {
                for (j, &b) in values.iter().enumerate() {
                    let (ia, ib) = (i as u32 * 7, j as u32 * 5 + 1);
                    assert_eq!(
                        a.order_key(ia).cmp(&b.order_key(ib)),
                        rank((a, ia), (b, ib)),
                        "{a:?}@{ia} vs {b:?}@{ib}"
                    );
                }
                let (v, idx) = A::from_order_key(a.order_key(i as u32));
                assert_eq!(idx, i as u32);
                #[allow(clippy::eq_op)]
                let nan = a != a;
                assert!(if nan { v != v } else { v == a }, "{a:?} -> {v:?}");
            }
        }
        let f: Vec<f64> = vec![
            0.0,
            -0.0,
            1.5,
            -1.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
            1e-310,
            -1e-310,
            f64::MAX,
            f64::MIN,
        ];
        check::<f64>(&f);
        check::<f32>(&f.iter().map(|v| *v as f32).collect::<Vec<_>>());
    }
}
