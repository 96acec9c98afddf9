//! The CPU ops on [`ndarray`] arrays (feature `ndarray`): a checked layout for every tensor.
//!
//! The slice API takes flat row-major slices and a shape struct, so a tensor in the wrong
//! layout (`[B, H, S, D]` where `[B, S, H, D]` is expected, or `k` and `v` swapped) is
//! accepted whenever the element counts agree. Here each op takes views instead and reads
//! the shape from their dims: every input's dims are checked against the op's layout, and a
//! wrong rank or dim is [`Error::Shape`] naming the tensor and showing both shapes, e.g.
//! ``tensor `v`: expected [1, 512, 2, 64] ([B, Sk, Hk, Dv], B, Sk, Hk from k), got [1, 2,
//! 512, 64]``. The first tensor of an op fixes the sizes the others are checked against (the
//! layout in the message says which tensor each dim comes from).
//!
//! | family | module | ops |
//! |---|---|---|
//! | linear-recurrence scans | [`nd::scan`](scan) | `linear`, `linear_backward`, `linear_complex`, `linear_complex_backward`, `selective`, `selective_backward`, `gla`, `gla_backward` |
//! | fused attention | [`nd::attention`](attention) | `forward`, `backward`, `top_keys` |
//! | sparse top-k encoding | [`nd::topk`](topk) | `rows`, `encode`, `encode_batch_topk`, `encode_jumprelu`, `encode_mp`, `nearest`, `decode`, `backward` |
//! | batched ridge | [`nd::ridge`](ridge) | `cv`, `predict`, `score`, `solve_batched` |
//!
//! Each function has the name of the slice function it wraps ([`crate::scan::linear`] is
//! [`nd::scan::linear`](scan::linear)) and takes the same options (`&Params`, `Metric`) and
//! counts to keep (`k`, `top`), then the inputs as views, or an `…Inputs` struct of views
//! with the fields and builder methods of the slice API's. It returns arrays: an
//! [`Array`] of the documented shape for one tensor, or a struct with the
//! name and fields of the slice API's (`AttentionOut { o, lse }`, `TopK { values, indices }`,
//! …) holding arrays. The CSR outputs stay [`crate::topk::Csr`]. Results are bit-identical
//! to the slice API's on the same data: after the checks, each op calls it.
//!
//! - **Views.** Inputs are dynamic-rank views, [`ArrayViewD`] (`a.view()` of an
//!   [`ArrayD`](ndarray::ArrayD), `a.view().into_dyn()` of an `Array3`), so a wrong rank is
//!   an `Err` like any wrong dim rather than a compile error; outputs have fixed ranks
//!   ([`Array3`](ndarray::Array3), …; `.into_dyn()` to pass one back in).
//! - **Layouts.** A view in standard layout (row-major and contiguous: what `Array::zeros`
//!   and `from_shape_vec` give) is passed to the kernels in place. Any other view (a
//!   transpose `.t()`, a stepped slice `s![.., ..;2]`, a permuted axis, column-major data)
//!   is first copied into standard layout, as
//!   [`as_standard_layout`](ndarray::ArrayRef::as_standard_layout) does: the op sees the
//!   view's logical elements in row-major order, so the result is the same as for a
//!   contiguous copy, at the cost of that copy. Keep large inputs contiguous to avoid it.
//! - **Element types** and accumulator-type tensors are those of the slice API: `E:`
//!   [`Element`](crate::Element) (`ridge::cv` and `ridge::predict`:
//!   [`RidgeReal`](crate::ridge::RidgeReal)), and the tensors the slice API keeps in
//!   `E::Acc` (`lse`, states, `A` of the selective scan, attention's bias) are views and
//!   arrays of `E::Acc`.
//! - **Versions.** [`ndarray`] is re-exported here (`neurokernels::nd::ndarray`): use it, or
//!   the same major version, so that your arrays are the types these functions take.
//! - Packed variable-length attention (`cu_seqlens`) is supported: the packed tensors are
//!   views with B = 1 (`q [1, total_q, Hq, D]`), see [`nd::attention`](attention).
//! - The CUDA entry points have no array API.
//!
//! # Example
//!
//! Grouped-query causal attention on arrays; then `v` laid out `[B, Hk, Sk, Dv]` instead of
//! `[B, Sk, Hk, Dv]`, which the slice API would accept (the element counts agree).
//!
//! ```
//! use neurokernels::attention::AttentionParams;
//! use neurokernels::nd::attention::{self, AttentionInputs};
//! use neurokernels::nd::ndarray::{self, Array, Axis};
//! use neurokernels::Error;
//!
//! let (b, s, hq, hk, d) = (1, 16, 4, 2, 8);
//! let q = Array::from_shape_fn(vec![b, s, hq, d], |i| (i[3] % 7) as f32 * 0.1);
//! let k = Array::from_shape_fn(vec![b, s, hk, d], |i| (i[1] % 5) as f32 * 0.1);
//! let v = Array::from_shape_fn(vec![b, s, hk, d], |i| (i[1] + i[3]) as f32);
//! let params = AttentionParams::new().causal(true);
//!
//! let out = attention::forward(&params, &AttentionInputs::new(q.view(), k.view(), v.view()))?;
//! assert_eq!(out.o.shape(), [b, s, hq, d]); // o [B, Sq, Hq, Dv]
//! assert_eq!(out.lse.shape(), [b, hq, s]); // lse [B, Hq, Sq]
//! // causal: query 0 sees only key 0, so its output is v of key 0 (KV head 0 for head 1)
//! assert_eq!(out.o.slice(ndarray::s![0, 0, 1, ..]), v.slice(ndarray::s![0, 0, 0, ..]));
//!
//! // v with its seq and head axes swapped: same element count, wrong layout
//! let v_bhsd = v.view().permuted_axes(vec![0, 2, 1, 3]).as_standard_layout().into_owned();
//! let err = attention::forward(&params, &AttentionInputs::new(q.view(), k.view(), v_bhsd.view()))
//!     .unwrap_err();
//! assert!(matches!(&err, Error::Shape { tensor, .. } if tensor == "v"));
//! assert_eq!(
//!     err.to_string(),
//!     "tensor `v`: expected [1, 16, 2, 8] ([B, Sk, Hk, Dv], B, Sk, Hk from k), got [1, 2, 16, 8]"
//! );
//!
//! // a non-contiguous view (every other query) is copied, with the same result
//! let every_other = q.slice_axis(Axis(1), ndarray::Slice::new(0, None, 2));
//! let copy = every_other.as_standard_layout().into_owned();
//! let strided = attention::forward(&params, &AttentionInputs::new(every_other, k.view(), v.view()))?;
//! let contiguous = attention::forward(&params, &AttentionInputs::new(copy.view(), k.view(), v.view()))?;
//! assert_eq!(strided, contiguous);
//! # Ok::<(), neurokernels::Error>(())
//! ```

pub mod attention;
pub mod ridge;
pub mod scan;
pub mod topk;

/// The `ndarray` these functions take, re-exported so that a user's crate gets the matching
/// version.
pub use ndarray;

use crate::error::{Error, Result};
use ndarray::{Array, ArrayViewD, Dim, Dimension, IntoDimension, Ix};
use std::borrow::Cow;

/// The dims of `view`, checked: rank N, and each dim equal to `expected`'s where that is
/// `Some` (a `None` dim is free: read from this tensor). `layout` names the dims and where
/// the fixed ones come from (e.g. `"[B, Sk, Hk, Dv], B, Sk, Hk from k"`); it is shown in
/// the error, after the expected dims (the free ones filled in from `view`).
fn dims<T, const N: usize>(
    tensor: &str,
    view: &ArrayViewD<'_, T>,
    expected: [Option<usize>; N],
    layout: &str,
) -> Result<[usize; N]> {
    let got = view.shape();
    let Ok(got_n) = <[usize; N]>::try_from(got) else {
        return Err(Error::shape(
            tensor,
            format!("rank {N} ({layout})"),
            format!("{got:?}"),
        ));
    };
    let want: [usize; N] = std::array::from_fn(|i| expected[i].unwrap_or(got_n[i]));
    if want == got_n {
        Ok(got_n)
    } else {
        Err(Error::shape(
            tensor,
            format!("{want:?} ({layout})"),
            format!("{got:?}"),
        ))
    }
}

/// [`dims`] with every dim fixed, for an optional tensor (`Ok` when it is `None`).
fn dims_opt<T, const N: usize>(
    tensor: &str,
    view: Option<&ArrayViewD<'_, T>>,
    expected: [usize; N],
    layout: &str,
) -> Result<()> {
    match view {
        Some(v) => dims(tensor, v, expected.map(Some), layout).map(drop),
        None => Ok(()),
    }
}

/// The elements of `view` in row-major order: borrowed when the view is in standard layout,
/// else copied (as `as_standard_layout` does).
fn slice<'a, T: Clone>(view: &ArrayViewD<'a, T>) -> Cow<'a, [T]> {
    match view.to_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(view.iter().cloned().collect()),
    }
}

/// [`slice`] of an optional view.
fn slice_opt<'a, T: Clone>(view: Option<&ArrayViewD<'a, T>>) -> Option<Cow<'a, [T]>> {
    view.map(slice)
}

/// The output `tensor` as an array of `shape`, or an `Err` naming it (never expected: the
/// slice API sized it from the same dims).
fn array<T, const N: usize>(
    tensor: &str,
    shape: [usize; N],
    data: Vec<T>,
) -> Result<Array<T, Dim<[Ix; N]>>>
where
    [usize; N]: IntoDimension<Dim = Dim<[Ix; N]>>,
    Dim<[Ix; N]>: Dimension,
{
    let len = data.len();
    Array::from_shape_vec(shape, data).map_err(|e| {
        Error::shape(
            tensor,
            format!("{shape:?} (the output's layout)"),
            format!("{len} elements ({e})"),
        )
    })
}

/// [`array`] of an optional output.
fn array_opt<T, const N: usize>(
    tensor: &str,
    shape: [usize; N],
    data: Option<Vec<T>>,
) -> Result<Option<Array<T, Dim<[Ix; N]>>>>
where
    [usize; N]: IntoDimension<Dim = Dim<[Ix; N]>>,
    Dim<[Ix; N]>: Dimension,
{
    data.map(|d| array(tensor, shape, d)).transpose()
}
