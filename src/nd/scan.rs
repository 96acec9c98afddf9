//! The scans on arrays: [`crate::scan`] (`linear`, `linear_complex` and their backwards),
//! [`crate::scan::selective`] and [`crate::scan::gla`], with every input's dims checked.
//!
//! Layouts: `linear` `a`, `b`, `h [B, T, D]` and `h0 [B, D]`; `linear_complex` the same with
//! a trailing axis of 2 (real, imaginary): `[B, T, D, 2]` and `[B, D, 2]`. `selective`
//! `u`, `delta`, `z [B, T, D]`, `A [D, N]`, `Bm`, `Cm [B, T, N]`, `Dskip`, `delta_bias [D]`,
//! `h0 [B, D, N]`. `gla` `q`, `k`, `g [B, T, H, K]`, `v [B, T, H, V]`, `h0 [B, H, K, V]`.
//! Options and semantics are the slice API's (see each function there).
//!
//! ```
//! use neurokernels::nd::ndarray::{Array, ArrayD};
//! use neurokernels::nd::scan;
//! use neurokernels::scan::ScanParams;
//!
//! let a: ArrayD<f32> = Array::from_elem(vec![1, 4, 2], 0.5); // [B, T, D]
//! let b: ArrayD<f32> = Array::ones(vec![1, 4, 2]);
//! let h = scan::linear(&ScanParams::new(), a.view(), b.view(), None)?;
//! assert_eq!(h[[0, 3, 1]], 1.875); // 1, 1.5, 1.75, 1.875
//!
//! // b with its T and D axes swapped
//! let err = scan::linear(&ScanParams::new(), a.view(), b.t(), None).unwrap_err();
//! assert!(err.to_string().starts_with("tensor `b`: expected [1, 4, 2]"));
//! # Ok::<(), neurokernels::Error>(())
//! ```

use super::{array, array_opt, dims, dims_opt, slice, slice_opt};
use crate::element::Element;
use crate::error::Result;
use crate::scan::gla::GlaShape;
use crate::scan::selective::SelectiveShape;
use crate::scan::{self as flat, ScanShape, gla as flat_gla, selective as flat_sel};
use ndarray::{Array, Array1, Array2, Array3, Array4, ArrayViewD, Dimension, Ix3, Ix4};

#[doc(no_inline)]
pub use crate::scan::ScanParams;
#[doc(no_inline)]
pub use crate::scan::gla::{GlaForm, GlaParams};
#[doc(no_inline)]
pub use crate::scan::selective::SelectiveParams;

/// The dims of `a [B, T, D]` (real) or `a [B, T, D, 2]` (complex), and those of `b` checked
/// against them: the scan's shape.
fn scan_shape<E>(
    complex: bool,
    a: &ArrayViewD<'_, E>,
    others: &[(&str, &ArrayViewD<'_, E>)],
) -> Result<ScanShape> {
    let [bs, t, d] = if complex {
        let [bs, t, d, _] = dims("a", a, [None, None, None, Some(2)], COMPLEX)?;
        [bs, t, d]
    } else {
        dims("a", a, [None; 3], "[B, T, D]")?
    };
    for (name, view) in others {
        if complex {
            dims(name, view, [bs, t, d, 2].map(Some), COMPLEX_AS_A)?;
        } else {
            dims(name, view, [bs, t, d].map(Some), "[B, T, D], as a")?;
        }
    }
    Ok(ScanShape::new(bs, t, d))
}

const COMPLEX: &str = "[B, T, D, 2], real and imaginary last";
const COMPLEX_AS_A: &str = "[B, T, D, 2], as a";

/// The state's dims: `[B, D]`, or `[B, D, 2]` for complex scans.
fn check_state<E>(
    complex: bool,
    s: ScanShape,
    name: &str,
    h0: Option<&ArrayViewD<'_, E>>,
) -> Result<()> {
    if complex {
        dims_opt(
            name,
            h0,
            [s.batch, s.channels, 2],
            "[B, D, 2], B and D from a",
        )
    } else {
        dims_opt(name, h0, [s.batch, s.channels], "[B, D], B and D from a")
    }
}

/// The forward of both kinds of numbers.
fn forward<E: Element, D: Dimension>(
    complex: bool,
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    b: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
    out: impl FnOnce(ScanShape, Vec<E>) -> Result<Array<E, D>>,
) -> Result<Array<E, D>> {
    let s = scan_shape(complex, &a, &[("b", &b)])?;
    check_state(complex, s, "h0", h0.as_ref())?;
    let (a, b, h0) = (slice(&a), slice(&b), slice_opt(h0.as_ref()));
    let h = if complex {
        flat::linear_complex(params, s, &a, &b, h0.as_deref())?
    } else {
        flat::linear(params, s, &a, &b, h0.as_deref())?
    };
    out(s, h)
}

/// [`crate::scan::linear`] on arrays: `h [B, T, D]`, the state after every step, of
/// h\[t\] = a\[t\]·h\[t-1\] + b\[t\] (reversed in time with `params.reverse`).
///
/// `a`, `b`: `[B, T, D]`; `h0`: `[B, D]`, the state before the first step (zeros when
/// `None`). A wrong rank or dim is an `Err` naming the tensor.
pub fn linear<E: Element>(
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    b: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
) -> Result<Array3<E>> {
    forward(false, params, a, b, h0, |s, h| {
        array("h", [s.batch, s.len, s.channels], h)
    })
}

/// [`crate::scan::linear_complex`] on arrays: the same recurrence over complex numbers,
/// `a`, `b` and the returned `h` `[B, T, D, 2]` (real, imaginary last), `h0 [B, D, 2]`.
pub fn linear_complex<E: Element>(
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    b: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
) -> Result<Array4<E>> {
    forward(true, params, a, b, h0, |s, h| {
        array("h", [s.batch, s.len, s.channels, 2], h)
    })
}

/// Gradients of [`linear`] (`D` = [`Ix3`](type@Ix3): `da`, `db [B, T, D]`, `dh0 [B, D]`) and of
/// [`linear_complex`] (`D` = [`Ix4`](type@Ix4): `[B, T, D, 2]` and `[B, D, 2]`).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LinearGrads<E, D: Dimension = Ix3> {
    /// `[B, T, D]` (complex: `[B, T, D, 2]`): the gradient with respect to `a`.
    pub da: Array<E, D>,
    /// `[B, T, D]` (complex: `[B, T, D, 2]`): the gradient with respect to `b`.
    pub db: Array<E, D>,
    /// `[B, D]` (complex: `[B, D, 2]`): the gradient with respect to the initial state (also
    /// when `h0` was `None`).
    pub dh0: Array<E, D::Smaller>,
}

/// The backward of both kinds of numbers: the flat gradients and the checked shape.
fn backward<E: Element>(
    complex: bool,
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    h: ArrayViewD<'_, E>,
    dh: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
) -> Result<(ScanShape, flat::LinearGrads<E>)> {
    let s = scan_shape(complex, &a, &[("h", &h), ("dh", &dh)])?;
    check_state(complex, s, "h0", h0.as_ref())?;
    let (a, h, dh, h0) = (slice(&a), slice(&h), slice(&dh), slice_opt(h0.as_ref()));
    let g = if complex {
        flat::linear_complex_backward(params, s, &a, &h, &dh, h0.as_deref())?
    } else {
        flat::linear_backward(params, s, &a, &h, &dh, h0.as_deref())?
    };
    Ok((s, g))
}

/// [`crate::scan::linear_backward`] on arrays: from `a`, the forward's `h` and the upstream
/// `dh` (all `[B, T, D]`) and `h0 [B, D]` (as given to the forward), the gradients `da`,
/// `db [B, T, D]` and `dh0 [B, D]`.
pub fn linear_backward<E: Element>(
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    h: ArrayViewD<'_, E>,
    dh: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
) -> Result<LinearGrads<E>> {
    let (s, g) = backward(false, params, a, h, dh, h0)?;
    let seq = [s.batch, s.len, s.channels];
    Ok(LinearGrads {
        da: array("da", seq, g.da)?,
        db: array("db", seq, g.db)?,
        dh0: array("dh0", [s.batch, s.channels], g.dh0)?,
    })
}

/// [`crate::scan::linear_complex_backward`] on arrays: `a`, `h`, `dh [B, T, D, 2]` and
/// `h0 [B, D, 2]` give `da`, `db [B, T, D, 2]` and `dh0 [B, D, 2]` (PyTorch's convention for
/// complex gradients, as the slice API).
pub fn linear_complex_backward<E: Element>(
    params: &ScanParams,
    a: ArrayViewD<'_, E>,
    h: ArrayViewD<'_, E>,
    dh: ArrayViewD<'_, E>,
    h0: Option<ArrayViewD<'_, E>>,
) -> Result<LinearGrads<E, Ix4>> {
    let (s, g) = backward(true, params, a, h, dh, h0)?;
    let seq = [s.batch, s.len, s.channels, 2];
    Ok(LinearGrads {
        da: array("da", seq, g.da)?,
        db: array("db", seq, g.db)?,
        dh0: array("dh0", [s.batch, s.channels, 2], g.dh0)?,
    })
}

/// The inputs of [`selective`]: sequences in the element type, parameters (`a`, `dskip`,
/// `delta_bias`, `h0`) in its accumulator type (f32, or f64 for f64 sequences), as
/// [`crate::scan::selective::SelectiveInputs`]. Errors name them `u`, `delta`, `A`, `Bm`,
/// `Cm`, `Dskip`, `z`, `delta_bias` and `h0`.
#[derive(Clone, Debug)]
pub struct SelectiveInputs<'a, E: Element> {
    /// `[B, T, D]`: the input sequence.
    pub u: ArrayViewD<'a, E>,
    /// `[B, T, D]`: the step sizes before `delta_bias` and softplus.
    pub delta: ArrayViewD<'a, E>,
    /// `[D, N]`, accumulator type: the state matrix A.
    pub a: ArrayViewD<'a, E::Acc>,
    /// `[B, T, N]`: the input projection Bm.
    pub bm: ArrayViewD<'a, E>,
    /// `[B, T, N]`: the output projection Cm.
    pub cm: ArrayViewD<'a, E>,
    /// `[D]`, accumulator type: the skip weight, `y += Dskip·u` (default none).
    pub dskip: Option<ArrayViewD<'a, E::Acc>>,
    /// `[B, T, D]`: the gate, `y ·= silu(z)` (default none).
    pub z: Option<ArrayViewD<'a, E>>,
    /// `[D]`, accumulator type: added to delta before the softplus (default none).
    pub delta_bias: Option<ArrayViewD<'a, E::Acc>>,
    /// `[B, D, N]`, accumulator type: the state before the first step (default none = zeros).
    pub h0: Option<ArrayViewD<'a, E::Acc>>,
}

impl<'a, E: Element> SelectiveInputs<'a, E> {
    /// The required inputs; the optional ones are `None` until set. `u`, `delta [B, T, D]`;
    /// `a [D, N]`; `bm`, `cm [B, T, N]`.
    pub fn new(
        u: ArrayViewD<'a, E>,
        delta: ArrayViewD<'a, E>,
        a: ArrayViewD<'a, E::Acc>,
        bm: ArrayViewD<'a, E>,
        cm: ArrayViewD<'a, E>,
    ) -> Self {
        Self {
            u,
            delta,
            a,
            bm,
            cm,
            dskip: None,
            z: None,
            delta_bias: None,
            h0: None,
        }
    }

    /// The skip weight `Dskip [D]`: y += Dskip·u.
    pub fn dskip(mut self, dskip: Option<ArrayViewD<'a, E::Acc>>) -> Self {
        self.dskip = dskip;
        self
    }

    /// The gate `z [B, T, D]`: y ·= silu(z).
    pub fn z(mut self, z: Option<ArrayViewD<'a, E>>) -> Self {
        self.z = z;
        self
    }

    /// `delta_bias [D]`, added to delta before the softplus.
    pub fn delta_bias(mut self, delta_bias: Option<ArrayViewD<'a, E::Acc>>) -> Self {
        self.delta_bias = delta_bias;
        self
    }

    /// The state before the first step, `h0 [B, D, N]` (zeros when `None`).
    pub fn h0(mut self, h0: Option<ArrayViewD<'a, E::Acc>>) -> Self {
        self.h0 = h0;
        self
    }

    /// Checks every input's dims and runs `op` on the slice API's inputs.
    fn run<R>(
        &self,
        op: impl FnOnce(SelectiveShape, &flat_sel::SelectiveInputs<'_, E>) -> Result<R>,
    ) -> Result<R> {
        let [b, t, d] = dims("u", &self.u, [None; 3], "[B, T, D]")?;
        let seq = [b, t, d];
        dims("delta", &self.delta, seq.map(Some), "[B, T, D], as u")?;
        let [_, n] = dims("A", &self.a, [Some(d), None], "[D, N], D from u")?;
        let bc = [b, t, n].map(Some);
        dims("Bm", &self.bm, bc, "[B, T, N], B and T from u, N from A")?;
        dims("Cm", &self.cm, bc, "[B, T, N], B and T from u, N from A")?;
        dims_opt("Dskip", self.dskip.as_ref(), [d], "[D], D from u")?;
        dims_opt("z", self.z.as_ref(), seq, "[B, T, D], as u")?;
        dims_opt("delta_bias", self.delta_bias.as_ref(), [d], "[D], D from u")?;
        dims_opt(
            "h0",
            self.h0.as_ref(),
            [b, d, n],
            "[B, D, N], B and D from u, N from A",
        )?;
        let (u, delta, a) = (slice(&self.u), slice(&self.delta), slice(&self.a));
        let (bm, cm) = (slice(&self.bm), slice(&self.cm));
        let dskip = slice_opt(self.dskip.as_ref());
        let z = slice_opt(self.z.as_ref());
        let delta_bias = slice_opt(self.delta_bias.as_ref());
        let h0 = slice_opt(self.h0.as_ref());
        let inputs = flat_sel::SelectiveInputs::new(&u, &delta, &a, &bm, &cm)
            .dskip(dskip.as_deref())
            .z(z.as_deref())
            .delta_bias(delta_bias.as_deref())
            .h0(h0.as_deref());
        op(SelectiveShape::new(b, t, d, n), &inputs)
    }
}

/// The outputs of [`selective`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SelectiveOut<E: Element> {
    /// `[B, T, D]`: the output sequence.
    pub y: Array3<E>,
    /// `[B, D, N]`: the state after the last step, in the accumulator type.
    pub h_last: Array3<E::Acc>,
}

/// [`crate::scan::selective::selective`] (Mamba-1's fused selective scan) on arrays:
/// returns `y [B, T, D]` and `h_last [B, D, N]`.
pub fn selective<E: Element>(
    params: &SelectiveParams,
    inputs: &SelectiveInputs<'_, E>,
) -> Result<SelectiveOut<E>> {
    inputs.run(|s, inputs| {
        let out = flat_sel::selective(params, s, inputs)?;
        Ok(SelectiveOut {
            y: array("y", [s.batch, s.len, s.channels], out.y)?,
            h_last: array("h_last", [s.batch, s.channels, s.state], out.h_last)?,
        })
    })
}

/// Gradients of [`selective`]: `None` where the input was not given.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SelectiveGrads<E: Element> {
    /// `[B, T, D]`: the gradient of `u`.
    pub du: Array3<E>,
    /// `[B, T, D]`: the gradient of `delta`.
    pub ddelta: Array3<E>,
    /// `[D, N]`, accumulator type: the gradient of `a` (A).
    pub da: Array2<E::Acc>,
    /// `[B, T, N]`: the gradient of `bm`.
    pub dbm: Array3<E>,
    /// `[B, T, N]`: the gradient of `cm`.
    pub dcm: Array3<E>,
    /// `[D]`, accumulator type: the gradient of `dskip`, where it was given.
    pub ddskip: Option<Array1<E::Acc>>,
    /// `[B, T, D]`: the gradient of `z`, where it was given.
    pub dz: Option<Array3<E>>,
    /// `[D]`, accumulator type: the gradient of `delta_bias`, where it was given.
    pub ddelta_bias: Option<Array1<E::Acc>>,
    /// `[B, D, N]`, accumulator type: the gradient of `h0`, where it was given.
    pub dh0: Option<Array3<E::Acc>>,
}

/// [`crate::scan::selective::selective_backward`] on arrays: the gradients of Σ y·dy, with
/// `dy [B, T, D]`.
pub fn selective_backward<E: Element>(
    params: &SelectiveParams,
    inputs: &SelectiveInputs<'_, E>,
    dy: ArrayViewD<'_, E>,
) -> Result<SelectiveGrads<E>> {
    inputs.run(|s, inputs| {
        let seq = [s.batch, s.len, s.channels];
        dims("dy", &dy, seq.map(Some), "[B, T, D], as u")?;
        let g = flat_sel::selective_backward(params, s, inputs, &slice(&dy))?;
        let (bc, d) = ([s.batch, s.len, s.state], [s.channels]);
        Ok(SelectiveGrads {
            du: array("du", seq, g.du)?,
            ddelta: array("ddelta", seq, g.ddelta)?,
            da: array("da", [s.channels, s.state], g.da)?,
            dbm: array("dbm", bc, g.dbm)?,
            dcm: array("dcm", bc, g.dcm)?,
            ddskip: array_opt("ddskip", d, g.ddskip)?,
            dz: array_opt("dz", seq, g.dz)?,
            ddelta_bias: array_opt("ddelta_bias", d, g.ddelta_bias)?,
            dh0: array_opt("dh0", [s.batch, s.channels, s.state], g.dh0)?,
        })
    })
}

/// The inputs of [`gla`], as [`crate::scan::gla::GlaInputs`]; `h0` is in the accumulator
/// type (f32, f64 for f64).
#[derive(Clone, Debug)]
pub struct GlaInputs<'a, E: Element> {
    /// `[B, T, H, K]`: the queries.
    pub q: ArrayViewD<'a, E>,
    /// `[B, T, H, K]`: the keys.
    pub k: ArrayViewD<'a, E>,
    /// `[B, T, H, V]`: the values.
    pub v: ArrayViewD<'a, E>,
    /// `[B, T, H, K]`: the log-gates, <= 0.
    pub g: ArrayViewD<'a, E>,
    /// `[B, H, K, V]`, accumulator type: the initial state (`None` = zeros).
    pub h0: Option<ArrayViewD<'a, E::Acc>>,
}

impl<E: Element> GlaInputs<'_, E> {
    /// Checks every input's dims and runs `op` on the slice API's inputs.
    fn run<R>(
        &self,
        op: impl FnOnce(GlaShape, &flat_gla::GlaInputs<'_, E>) -> Result<R>,
    ) -> Result<R> {
        let [b, t, h, k] = dims("q", &self.q, [None; 4], "[B, T, H, K]")?;
        let keys = [b, t, h, k].map(Some);
        dims("k", &self.k, keys, "[B, T, H, K], as q")?;
        dims("g", &self.g, keys, "[B, T, H, K], as q")?;
        let [.., v] = dims(
            "v",
            &self.v,
            [Some(b), Some(t), Some(h), None],
            "[B, T, H, V], B, T and H from q",
        )?;
        let state = [b, h, k, v];
        dims_opt(
            "h0",
            self.h0.as_ref(),
            state,
            "[B, H, K, V], K from q, V from v",
        )?;
        let (q, k_, v_, g) = (
            slice(&self.q),
            slice(&self.k),
            slice(&self.v),
            slice(&self.g),
        );
        let h0 = slice_opt(self.h0.as_ref());
        let inputs = flat_gla::GlaInputs {
            q: &q,
            k: &k_,
            v: &v_,
            g: &g,
            h0: h0.as_deref(),
        };
        op(GlaShape::new(b, t, h, k, v), &inputs)
    }
}

/// The outputs of [`gla`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct GlaOut<E: Element> {
    /// `[B, T, H, V]`: o\[t\] = scale·q\[t\]·S\[t\].
    pub o: Array4<E>,
    /// `[B, H, K, V]`: the state after the last step, in the accumulator type.
    pub h_last: Array4<E::Acc>,
}

/// [`crate::scan::gla::gla`] (gated linear attention) on arrays: returns `o [B, T, H, V]`
/// and `h_last [B, H, K, V]`.
pub fn gla<E: Element>(params: &GlaParams, inputs: &GlaInputs<'_, E>) -> Result<GlaOut<E>> {
    inputs.run(|s, inputs| {
        let out = flat_gla::gla(params, s, inputs)?;
        Ok(GlaOut {
            o: array("o", [s.batch, s.len, s.heads, s.value_dim], out.o)?,
            h_last: array("h_last", state_dims(s), out.h_last)?,
        })
    })
}

/// `[B, H, K, V]`.
fn state_dims(s: GlaShape) -> [usize; 4] {
    [s.batch, s.heads, s.key_dim, s.value_dim]
}

/// Gradients of [`gla`], each with the shape of its input.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct GlaGrads<E: Element> {
    /// `[B, T, H, K]`: the gradient of `q`.
    pub dq: Array4<E>,
    /// `[B, T, H, K]`: the gradient of `k`.
    pub dk: Array4<E>,
    /// `[B, T, H, V]`: the gradient of `v`.
    pub dv: Array4<E>,
    /// `[B, T, H, K]`: the gradient of the log-gates `g`.
    pub dg: Array4<E>,
    /// `[B, H, K, V]`, in the accumulator type; `Some` only where `h0` was given.
    pub dh0: Option<Array4<E::Acc>>,
}

/// [`crate::scan::gla::gla_backward`] on arrays: the gradients of Σ o·do (+ Σ h_last·dh_last
/// when given), with `d_o [B, T, H, V]` (named `do` in errors) and `dh_last [B, H, K, V]`
/// (accumulator type).
pub fn gla_backward<E: Element>(
    params: &GlaParams,
    inputs: &GlaInputs<'_, E>,
    d_o: ArrayViewD<'_, E>,
    dh_last: Option<ArrayViewD<'_, E::Acc>>,
) -> Result<GlaGrads<E>> {
    inputs.run(|s, inputs| {
        let vv = [s.batch, s.len, s.heads, s.value_dim];
        dims("do", &d_o, vv.map(Some), "[B, T, H, V], as v")?;
        let state = state_dims(s);
        dims_opt(
            "dh_last",
            dh_last.as_ref(),
            state,
            "[B, H, K, V], K from q, V from v",
        )?;
        let dh_last = slice_opt(dh_last.as_ref());
        let g = flat_gla::gla_backward(params, s, inputs, &slice(&d_o), dh_last.as_deref())?;
        let qk = [s.batch, s.len, s.heads, s.key_dim];
        Ok(GlaGrads {
            dq: array("dq", qk, g.dq)?,
            dk: array("dk", qk, g.dk)?,
            dv: array("dv", vv, g.dv)?,
            dg: array("dg", qk, g.dg)?,
            dh0: array_opt("dh0", state, g.dh0)?,
        })
    })
}
