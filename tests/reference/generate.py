#!/usr/bin/env python3
"""Regenerate the committed reference cases in ``tests/cases/``.

Usage::

    python tests/reference/generate.py [--out tests/cases] [--only PREFIX] [--pending]

Every case is a safetensors file in the format described in CASES.md: inputs
``in.NAME``, expected outputs ``out.NAME`` and header metadata ``op``,
``params`` (a JSON object; left out in a few cases so that the defaults are
exercised), ``source`` and, only where a case needs them, ``rtol``/``atol``.

The references are computed here, independently of the Rust code, with PyTorch
in float64:

* ``scan.linear``: a plain float64 loop over time,
  ``h[t] = a[t] * h[t-1] + b[t]`` with ``h[-1] = h0`` (zeros when absent); with
  ``reverse`` the loop runs from ``t = T-1`` down and ``h0`` enters at ``T-1``.
* ``scan.linear_backward``: torch autograd (float64) through that same loop,
  with ``a``, ``b`` and ``h0`` requiring grad and ``loss = sum(h * dh)``.
  ``dh0`` is always written (the gradient w.r.t. the zero initial state when the
  case has no ``h0``). ``in.h`` is the forward output of the stored inputs.
* ``scan.linear_complex``: the same loop in complex128; complex tensors are
  stored as real tensors with a trailing axis of 2 (real, imaginary).
* ``scan.linear_complex_backward`` (an extension op of the crate, beside the
  contract): torch autograd (complex128) of the real inner product
  ``loss = sum(Re(h) Re(dh) + Im(h) Im(dh))``; gradients follow PyTorch's
  convention (dL/dRe(z) + i dL/dIm(z)), see ``ref_complex_backward``.
* ``scan.selective``: a float64 loop over time of the Mamba-1 selective scan
  of CASES.md (softplus computed exactly, as logaddexp(x, 0)).
* ``scan.selective_backward``: torch autograd (float64) of ``sum(y * dy)``
  through that loop (no gradient into ``h_last``).
* ``scan.gla``: a float64 step-by-step loop of gated linear attention,
  ``S[t] = diag(exp(g[t])) S[t-1] + k[t]^T v[t]``, ``o[t] = scale q[t] S[t]``.
* ``scan.gla_backward``: torch autograd (float64) of ``sum(o * do)`` plus
  ``sum(h_last * dh_last)`` where ``dh_last`` is given. The hand-written
  backward of the self-check is also run in float64 and asserted equal to the
  autograd result (see ``emu_gla_backward``).

Inputs are drawn in float64 from fixed per-case seeds (numpy PCG64), rounded to
the case dtype first, and the reference is computed in float64 from the
rounded values; outputs are then cast to the case dtype (F64 cases stay float64
throughout). Gates ``a`` are uniform in (0.5, 1) (or in (-1, 1) for the
``neg`` cases); ``b``, ``dh`` and ``h0`` are standard normal times 0.5.
Complex gates have modulus uniform in (0.5, 1) and a uniform phase. For the
selective scan see ``draw_selective_inputs``; its ``A``, ``Dskip``,
``delta_bias`` and ``h0`` are F32 in every case but the F64 ones. For GLA see
``draw_gla_inputs``; its ``h0`` and ``dh_last`` are F32 (F64 in F64 cases).

As a self-check the script also runs an emulation of the implementation
(sequential loop and a chunked "time-parallel" scan; hand-written backward
formulas from the stored inputs; in float32 for F32/F16/BF16 inputs, float64
for F64, cast to the case dtype) and asserts that it passes the case's
tolerance (the CASES.md default of the case dtype, i.e. of ``a``, ``u`` or ``q``); it
prints the worst error ratio per case (``|got - want| / (atol + rtol *
|want|)``, must be <= 1) and, at the end, the worst per op and dtype.
"""

import argparse
import json
import os
import struct
import sys
import zlib

import numpy as np
import torch
from safetensors.torch import save_file

# Default tolerances by dtype (CASES.md, "Comparison"): (rtol, atol).
DEFAULT_TOL = {
    "f64": (1e-10, 1e-10),
    "f32": (1e-4, 1e-5),
    "f16": (2e-2, 2e-2),
    "bf16": (2e-2, 2e-2),
}
TORCH_DTYPE = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------
# Case list.  name -> (op, dtype, B, T, D, reverse, has_h0, gates, params_mode)
#   gates: "pos" = uniform(0.5, 1), "neg" = uniform(-1, 1)
#   params_mode: "explicit" writes {"reverse": ...}; "omit" leaves `params`
#   out (only used with reverse = False, so the default applies).
# --------------------------------------------------------------------------
def _c(op, dtype, B, T, D, reverse=False, h0=False, gates="pos", params="explicit"):
    return dict(op=op, dtype=dtype, B=B, T=T, D=D, reverse=reverse, h0=h0,
                gates=gates, params=params)


def _cases():
    cases = {}

    def both(desc, *args, fwd_only=False, **kw):
        cases["scan_linear_" + desc] = _c("scan.linear", *args, **kw)
        if not fwd_only:
            cases["scan_linear_backward_" + desc] = _c("scan.linear_backward", *args, **kw)

    # f32: primes, with/without h0, both directions, default params.
    both("f32_b3_t17_d13", "f32", 3, 17, 13, params="omit")
    both("f32_b3_t17_d13_h0", "f32", 3, 17, 13, h0=True)
    both("f32_b3_t17_d13_rev", "f32", 3, 17, 13, reverse=True)
    both("f32_b3_t17_d13_rev_h0", "f32", 3, 17, 13, reverse=True, h0=True)
    # Degenerate sizes.
    both("f32_b1_t1_d1_h0", "f32", 1, 1, 1, h0=True)
    both("f32_b2_t1_d5_rev_h0", "f32", 2, 1, 5, reverse=True, h0=True)
    both("f32_b5_t9_d1_rev", "f32", 5, 9, 1, reverse=True)
    # D not a multiple of 8/16, more batch rows than one SIMD lane group.
    # (backward in f16 to keep tests/cases under ~3 MB)
    both("f32_b4_t64_d130_h0", "f32", 4, 64, 130, h0=True, fwd_only=True)
    cases["scan_linear_backward_f16_b4_t64_d130_h0"] = _c(
        "scan.linear_backward", "f16", 4, 64, 130, h0=True)
    # Negative gates in (-1, 1).
    both("f32_neg_b3_t31_d37_h0", "f32", 3, 31, 37, h0=True, gates="neg")
    both("f64_neg_b2_t29_d11_rev_h0", "f64", 2, 29, 11, reverse=True, h0=True, gates="neg")
    # f64.
    both("f64_b2_t33_d21_h0", "f64", 2, 33, 21, h0=True)
    both("f64_b2_t33_d21_rev", "f64", 2, 33, 21, reverse=True)
    # f16 / bf16.
    both("f16_b3_t17_d13_h0", "f16", 3, 17, 13, h0=True)
    both("f16_b2_t40_d37_rev", "f16", 2, 40, 37, reverse=True)
    both("bf16_b3_t17_d13", "bf16", 3, 17, 13, params="omit")
    both("bf16_b2_t40_d37_rev_h0", "bf16", 2, 40, 37, reverse=True, h0=True)
    # Long sequences on few channels: the time-parallel path.
    both("f32_b1_t6000_d3_h0", "f32", 1, 6000, 3, h0=True)
    both("f32_b2_t4099_d5_rev", "f32", 2, 4099, 5, reverse=True, fwd_only=True)
    # (backward with B = 1 to keep tests/cases under ~3 MB)
    cases["scan_linear_backward_f32_b1_t4099_d3_rev"] = _c(
        "scan.linear_backward", "f32", 1, 4099, 3, reverse=True)
    both("f16_b1_t3001_d2_rev_h0", "f16", 1, 3001, 2, reverse=True, h0=True)
    both("bf16_b1_t2053_d3", "bf16", 1, 2053, 3)
    cases.update(_complex_cases())
    cases.update(_selective_cases())
    cases.update(_gla_cases())
    for module in FAMILY_MODULES:
        for name, spec in module.CASES.items():
            assert name not in cases, name
            cases[name] = dict(spec, family=module.__name__)
    return cases


# Families written as their own modules (tests/reference/gen_*.py). Each module has
# `CASES` (name -> spec dict with at least `op` and `dtype`), `build(name, spec)` returning
# (tensors, meta, checks) like build_gla, and `PENDING` (its ops whose Rust side has not
# landed). A module that does not exist yet is simply absent.
FAMILY_MODULES = []
for _module_name in ("gen_attention", "gen_topk", "gen_ridge"):
    try:
        FAMILY_MODULES.append(__import__(_module_name))
    except ModuleNotFoundError as e:
        if e.name != _module_name:
            raise


# --------------------------------------------------------------------------
# Input drawing.
# --------------------------------------------------------------------------
def _rng(name):
    # Stable per-case seed from the case's description (shared by the forward
    # and backward case of one description, so they see the same a, b, h0).
    desc = name.replace("scan_linear_backward_", "").replace("scan_linear_", "")
    return np.random.Generator(np.random.PCG64(zlib.crc32(desc.encode()) + 12345))


def _round(x64, dtype):
    """float64 numpy -> torch tensor rounded to `dtype` (kept in that dtype)."""
    return torch.from_numpy(x64).to(TORCH_DTYPE[dtype])


def draw_inputs(name, spec):
    rng = _rng(name)
    B, T, D = spec["B"], spec["T"], spec["D"]
    if spec["gates"] == "pos":
        a = rng.uniform(0.5, 1.0, size=(B, T, D))
    else:
        a = rng.uniform(-1.0, 1.0, size=(B, T, D))
    b = 0.5 * rng.standard_normal((B, T, D))
    h0 = 0.5 * rng.standard_normal((B, D))
    dh = 0.5 * rng.standard_normal((B, T, D))
    dt = spec["dtype"]
    out = dict(a=_round(a, dt), b=_round(b, dt), dh=_round(dh, dt))
    out["h0"] = _round(h0, dt) if spec["h0"] else None
    return out


# --------------------------------------------------------------------------
# References (float64).
# --------------------------------------------------------------------------
def scan_loop(a, b, h0, reverse):
    """h[t] = a[t]*h[t-1] + b[t] along axis 1 (reverse: from the end)."""
    B, T, D = a.shape
    h_prev = h0 if h0 is not None else torch.zeros(B, D, dtype=a.dtype)
    hs = [None] * T
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        h_prev = a[:, t] * h_prev + b[:, t]
        hs[t] = h_prev
    return torch.stack(hs, dim=1)


def ref_forward(inp, reverse):
    a = inp["a"].to(torch.float64)
    b = inp["b"].to(torch.float64)
    h0 = inp["h0"].to(torch.float64) if inp["h0"] is not None else None
    return scan_loop(a, b, h0, reverse)


def ref_backward(inp, reverse):
    a = inp["a"].to(torch.float64).clone().requires_grad_(True)
    b = inp["b"].to(torch.float64).clone().requires_grad_(True)
    B, _, D = a.shape
    if inp["h0"] is not None:
        h0 = inp["h0"].to(torch.float64).clone()
    else:
        h0 = torch.zeros(B, D, dtype=torch.float64)
    h0.requires_grad_(True)
    dh = inp["dh"].to(torch.float64)
    h = scan_loop(a, b, h0, reverse)
    (h * dh).sum().backward()
    return h.detach(), a.grad, b.grad, h0.grad


# --------------------------------------------------------------------------
# Emulations of the implementation, used only for the self-check.
# --------------------------------------------------------------------------
def _acc_dtype(dtype):
    return torch.float64 if dtype == "f64" else torch.float32


def emu_forward_chunked(a, b, h0, reverse, chunks):
    """Time-parallel scan as in algorithms.md: per-chunk scan from zero, chunk
    product of a, sequential carries, then h += (prod of a up to t) * carry."""
    if reverse:
        a, b = a.flip(1), b.flip(1)
    B, T, D = a.shape
    bounds = np.linspace(0, T, chunks + 1).astype(int)
    local, prods = [], []
    for c in range(chunks):
        s, e = bounds[c], bounds[c + 1]
        if e == s:
            continue
        local.append(scan_loop(a[:, s:e], b[:, s:e], None, False))
        prods.append(torch.cumprod(a[:, s:e], dim=1))
    carry = h0 if h0 is not None else torch.zeros(B, D, dtype=a.dtype)
    outs = []
    for lc, pc in zip(local, prods):
        outs.append(lc + pc * carry.unsqueeze(1))
        carry = outs[-1][:, -1]
    h = torch.cat(outs, dim=1)
    return h.flip(1) if reverse else h


def emu_backward(a, h, dh, h0, reverse):
    """Formulas of algorithms.md in the accumulation dtype, from the stored h."""
    if reverse:
        a, h, dh = a.flip(1), h.flip(1), dh.flip(1)
    B, T, D = a.shape
    g = torch.empty_like(dh)
    acc = torch.zeros(B, D, dtype=a.dtype)
    for t in range(T - 1, -1, -1):
        nxt = a[:, t + 1] * acc if t + 1 < T else torch.zeros_like(acc)
        acc = dh[:, t] + nxt
        g[:, t] = acc
    h_init = h0 if h0 is not None else torch.zeros(B, D, dtype=a.dtype)
    h_prev = torch.cat([h_init.unsqueeze(1), h[:, :-1]], dim=1)
    da, db, dh0 = g * h_prev, g.clone(), a[:, 0] * g[:, 0]
    if reverse:
        da, db = da.flip(1), db.flip(1)
    return da, db, dh0


def err_ratio(got, want, rtol, atol):
    got = got.to(torch.float64)
    want = want.to(torch.float64)
    return float(((got - want).abs() / (atol + rtol * want.abs())).max())


# --------------------------------------------------------------------------
# Case construction.
# --------------------------------------------------------------------------
def build_linear(name, spec):
    dt = spec["dtype"]
    tdt = TORCH_DTYPE[dt]
    acc = _acc_dtype(dt)
    rev = spec["reverse"]
    inp = draw_inputs(name, spec)
    rtol, atol = DEFAULT_TOL[dt]
    meta = {"op": spec["op"]}
    if spec["params"] == "explicit":
        meta["params"] = json.dumps({"reverse": rev})
    else:
        assert not rev
    tv = torch.__version__.split("+")[0]

    tensors = {"in.a": inp["a"]}
    checks = []  # (label, got, want)
    h0_acc = inp["h0"].to(acc) if inp["h0"] is not None else None
    if spec["op"] == "scan.linear":
        tensors["in.b"] = inp["b"]
        if inp["h0"] is not None:
            tensors["in.h0"] = inp["h0"]
        h = ref_forward(inp, rev).to(tdt)
        tensors["out.h"] = h
        meta["source"] = f"torch {tv} float64 loop"
        a_acc, b_acc = inp["a"].to(acc), inp["b"].to(acc)
        seq = scan_loop(a_acc, b_acc, h0_acc, rev).to(tdt)
        checks.append(("h seq", seq, h))
        nchunk = 2 if spec["T"] < 64 else 16
        par = emu_forward_chunked(a_acc, b_acc, h0_acc, rev, nchunk).to(tdt)
        checks.append(("h par", par, h))
    else:
        h64, da, db, dh0 = ref_backward(inp, rev)
        h_st = h64.to(tdt)  # the stored forward output
        tensors["in.h"] = h_st
        tensors["in.dh"] = inp["dh"]
        if inp["h0"] is not None:
            tensors["in.h0"] = inp["h0"]
        tensors["out.da"] = da.to(tdt)
        tensors["out.db"] = db.to(tdt)
        tensors["out.dh0"] = dh0.to(tdt)
        meta["source"] = f"torch {tv} autograd float64"
        eda, edb, edh0 = emu_backward(inp["a"].to(acc), h_st.to(acc),
                                      inp["dh"].to(acc), h0_acc, rev)
        checks += [("da", eda.to(tdt), tensors["out.da"]),
                   ("db", edb.to(tdt), tensors["out.db"]),
                   ("dh0", edh0.to(tdt), tensors["out.dh0"])]

    # Per-case tolerance overrides would go here (with a comment saying why);
    # none is needed: the self-check below passes with the defaults.
    worst = max(err_ratio(g, w, rtol, atol) for _, g, w in checks)
    for t in tensors.values():
        assert torch.isfinite(t.to(torch.float64)).all(), name
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return tensors, meta, worst


# ==========================================================================
# scan.linear_complex and scan.linear_complex_backward.
# ==========================================================================
# Complex tensors are stored as real tensors with a trailing axis of 2 (real,
# imaginary). name -> spec as for scan.linear, with `family` = "complex" and
# `seed` = "linear_complex:<desc>" (shared by the forward and the backward case
# of one description).
def _cx(op, dtype, B, T, D, reverse=False, h0=False, params="explicit"):
    return dict(family="complex", op=op, dtype=dtype, B=B, T=T, D=D,
                reverse=reverse, h0=h0, params=params)


def _complex_cases():
    cases = {}

    def both(desc, *args, **kw):
        for op, prefix in (("scan.linear_complex", "scan_linear_complex_"),
                           ("scan.linear_complex_backward", "scan_linear_complex_backward_")):
            cases[prefix + desc] = dict(_cx(op, *args, **kw), seed="linear_complex:" + desc)

    both("f32_b3_t17_d13", "f32", 3, 17, 13, params="omit")
    both("f32_b3_t17_d13_rev_h0", "f32", 3, 17, 13, reverse=True, h0=True)
    both("f32_b1_t1_d1_h0", "f32", 1, 1, 1, h0=True)
    both("f32_b2_t40_d37_rev", "f32", 2, 40, 37, reverse=True)
    both("f64_b3_t17_d13_h0", "f64", 3, 17, 13, h0=True)
    both("f16_b2_t40_d37_rev_h0", "f16", 2, 40, 37, reverse=True, h0=True)
    both("bf16_b3_t17_d13_h0", "bf16", 3, 17, 13, h0=True)
    # Long T on few channels: the time-parallel path.
    both("f32_b1_t3000_d3_h0", "f32", 1, 3000, 3, h0=True)
    return cases


def _rng_key(key):
    return np.random.Generator(np.random.PCG64(zlib.crc32(key.encode()) + 12345))


def draw_complex_inputs(spec):
    """Gates with |a| uniform in (0.5, 1) and phase uniform in (-pi, pi);
    b, h0, dh with real and imaginary parts standard normal times 0.5."""
    rng = _rng_key(spec["seed"])
    B, T, D = spec["B"], spec["T"], spec["D"]
    mag = rng.uniform(0.5, 1.0, size=(B, T, D))
    phase = rng.uniform(-np.pi, np.pi, size=(B, T, D))
    a = np.stack([mag * np.cos(phase), mag * np.sin(phase)], axis=-1)
    b = 0.5 * rng.standard_normal((B, T, D, 2))
    h0 = 0.5 * rng.standard_normal((B, D, 2))
    dh = 0.5 * rng.standard_normal((B, T, D, 2))
    dt = spec["dtype"]
    out = dict(a=_round(a, dt), b=_round(b, dt), dh=_round(dh, dt))
    out["h0"] = _round(h0, dt) if spec["h0"] else None
    return out


def _to_complex(x, real_dtype):
    """[..., 2] real tensor -> complex tensor (complex128 for float64,
    complex64 for float32)."""
    if x is None:
        return None
    return torch.view_as_complex(x.to(real_dtype).contiguous())


def _to_real(z, dtype):
    """complex tensor -> [..., 2] real tensor in the case dtype."""
    return torch.view_as_real(z.detach()).to(TORCH_DTYPE[dtype]).contiguous()


def ref_complex_backward(inp, reverse):
    """torch autograd (complex128) of the real inner product
    loss = sum(Re(h) Re(dh) + Im(h) Im(dh)).

    PyTorch's convention for a real loss L: the gradient of a complex tensor z
    is dL/dRe(z) + i dL/dIm(z). With g the gradient w.r.t. h[s] accumulated
    through the recurrence (s in scan order: s = t forward, s = T-1-t in
    reverse) this gives
        g[s]  = dh[s] + conj(a[s+1]) * g[s+1]      (g[T] = 0)
        db[s] = g[s]
        da[s] = g[s] * conj(h[s-1])                 (h[-1] = h0)
        dh0   = conj(a[0]) * g[0]
    The self-check (emu_complex_backward) verifies this identity against the
    autograd result for every case.
    """
    a = _to_complex(inp["a"], torch.float64).clone().requires_grad_(True)
    b = _to_complex(inp["b"], torch.float64).clone().requires_grad_(True)
    B, _, D = a.shape
    if inp["h0"] is not None:
        h0 = _to_complex(inp["h0"], torch.float64).clone()
    else:
        h0 = torch.zeros(B, D, dtype=torch.complex128)
    h0.requires_grad_(True)
    dh = _to_complex(inp["dh"], torch.float64)
    h = scan_loop(a, b, h0, reverse)
    (h.real * dh.real + h.imag * dh.imag).sum().backward()
    return h.detach(), a.grad, b.grad, h0.grad


def emu_complex_backward(a, h, dh, h0, reverse):
    """The formulas of ref_complex_backward's docstring, from the stored h."""
    if reverse:
        a, h, dh = a.flip(1), h.flip(1), dh.flip(1)
    B, T, D = a.shape
    g = torch.empty_like(dh)
    acc = torch.zeros(B, D, dtype=a.dtype)
    for t in range(T - 1, -1, -1):
        nxt = a[:, t + 1].conj() * acc if t + 1 < T else torch.zeros_like(acc)
        acc = dh[:, t] + nxt
        g[:, t] = acc
    h_init = h0 if h0 is not None else torch.zeros(B, D, dtype=a.dtype)
    h_prev = torch.cat([h_init.unsqueeze(1), h[:, :-1]], dim=1)
    da, db, dh0 = g * h_prev.conj(), g.clone(), a[:, 0].conj() * g[:, 0]
    if reverse:
        da, db = da.flip(1), db.flip(1)
    return da, db, dh0


def build_complex(name, spec):
    dt = spec["dtype"]
    acc = _acc_dtype(dt)
    rev = spec["reverse"]
    inp = draw_complex_inputs(spec)
    meta = {"op": spec["op"]}
    if spec["params"] == "explicit":
        meta["params"] = json.dumps({"reverse": rev})
    else:
        assert not rev
    tv = torch.__version__.split("+")[0]

    tensors = {"in.a": inp["a"]}
    checks = []
    a_acc = _to_complex(inp["a"], acc)
    h0_acc = _to_complex(inp["h0"], acc)
    if spec["op"] == "scan.linear_complex":
        tensors["in.b"] = inp["b"]
        if inp["h0"] is not None:
            tensors["in.h0"] = inp["h0"]
        h0_64 = _to_complex(inp["h0"], torch.float64)
        h = scan_loop(_to_complex(inp["a"], torch.float64),
                      _to_complex(inp["b"], torch.float64), h0_64, rev)
        tensors["out.h"] = _to_real(h, dt)
        meta["source"] = f"torch {tv} complex128 loop"
        b_acc = _to_complex(inp["b"], acc)
        checks.append(("h seq", _to_real(scan_loop(a_acc, b_acc, h0_acc, rev), dt),
                       tensors["out.h"]))
        nchunk = 2 if spec["T"] < 64 else 16
        par = emu_forward_chunked(a_acc, b_acc, h0_acc, rev, nchunk)
        checks.append(("h par", _to_real(par, dt), tensors["out.h"]))
    else:
        h64, da, db, dh0 = ref_complex_backward(inp, rev)
        h_st = _to_real(h64, dt)  # the stored forward output
        tensors["in.h"] = h_st
        tensors["in.dh"] = inp["dh"]
        if inp["h0"] is not None:
            tensors["in.h0"] = inp["h0"]
        tensors["out.da"] = _to_real(da, dt)
        tensors["out.db"] = _to_real(db, dt)
        tensors["out.dh0"] = _to_real(dh0, dt)
        meta["source"] = f"torch {tv} autograd complex128"
        eda, edb, edh0 = emu_complex_backward(a_acc, _to_complex(h_st, acc),
                                              _to_complex(inp["dh"], acc), h0_acc, rev)
        checks += [("da", _to_real(eda, dt), tensors["out.da"]),
                   ("db", _to_real(edb, dt), tensors["out.db"]),
                   ("dh0", _to_real(edh0, dt), tensors["out.dh0"])]
    return tensors, meta, checks


# ==========================================================================
# scan.selective and scan.selective_backward (Mamba-1 selective scan).
# ==========================================================================
# name -> spec with `family` = "selective", sizes B, T, D, N, flags for the
# optional inputs (dskip, z, bias = delta_bias, h0), `softplus`, the A draw
# ("unif": A = -uniform(0.5, 2); "exp": A = -exp(0.5 * randn)), and `seed` =
# "selective:<desc>" (a forward and a backward case with the same description
# see the same inputs).
def _sel(op, dtype, B, T, D, N, dskip=False, z=False, bias=False, h0=False,
         softplus=False, A="unif", params="explicit"):
    return dict(family="selective", op=op, dtype=dtype, B=B, T=T, D=D, N=N,
                dskip=dskip, z=z, bias=bias, h0=h0, softplus=softplus, A=A,
                params=params)


_ALL_OPT = dict(dskip=True, z=True, bias=True, h0=True)  # every optional input


def _selective_cases():
    cases = {}

    def fwd(desc, *args, **kw):
        cases["scan_selective_" + desc] = dict(
            _sel("scan.selective", *args, **kw), seed="selective:" + desc)

    def bwd(desc, *args, **kw):
        cases["scan_selective_backward_" + desc] = dict(
            _sel("scan.selective_backward", *args, **kw), seed="selective:" + desc)

    # Forward.
    fwd("f32_b2_t33_d13_n16_all_sp", "f32", 2, 33, 13, 16, softplus=True, A="exp", **_ALL_OPT)
    fwd("f32_b3_t17_d37_n4", "f32", 3, 17, 37, 4, params="omit")
    fwd("f32_b1_t1_d5_n1_h0", "f32", 1, 1, 5, 1, h0=True)
    fwd("f32_b2_t19_d37_n1_z_sp", "f32", 2, 19, 37, 1, z=True, softplus=True, A="exp")
    fwd("f32_b1_t300_d6_n16_dskip_bias_sp", "f32", 1, 300, 6, 16, dskip=True, bias=True,
        softplus=True)
    fwd("f64_b2_t29_d11_n8_all_sp", "f64", 2, 29, 11, 8, softplus=True, A="exp", **_ALL_OPT)
    fwd("f16_b2_t40_d37_n16_all_sp", "f16", 2, 40, 37, 16, softplus=True, **_ALL_OPT)
    fwd("bf16_b2_t40_d24_n8_dskip_z", "bf16", 2, 40, 24, 8, dskip=True, z=True, A="exp")
    fwd("bf16_b1_t300_d8_n4_all_sp", "bf16", 1, 300, 8, 4, softplus=True, **_ALL_OPT)
    # Backward (small: T <= 64, D <= 24, N <= 8).
    bwd("f32_b2_t33_d13_n8_all_sp", "f32", 2, 33, 13, 8, softplus=True, A="exp", **_ALL_OPT)
    bwd("f32_b3_t17_d7_n4", "f32", 3, 17, 7, 4, params="omit")
    bwd("f32_b1_t1_d5_n1_h0", "f32", 1, 1, 5, 1, h0=True)
    bwd("f64_b2_t29_d11_n8_all_sp", "f64", 2, 29, 11, 8, softplus=True, A="exp", **_ALL_OPT)
    bwd("f16_b2_t40_d24_n8_z_sp", "f16", 2, 40, 24, 8, z=True, softplus=True)
    bwd("bf16_b2_t64_d16_n4_dskip_bias_h0", "bf16", 2, 64, 16, 4, dskip=True, bias=True,
        h0=True)
    return cases


SELECTIVE_OPTIONAL = ("Dskip", "z", "delta_bias", "h0")
_SEL_FLAG = {"Dskip": "dskip", "z": "z", "delta_bias": "bias", "h0": "h0"}


def draw_selective_inputs(spec):
    """u, Bm, Cm, z, Dskip standard normal; h0 and dy standard normal times 0.5;
    delta uniform in (0.2, 0.8) (softplus cases: 0.5 * randn, and delta_bias
    0.5 + 0.1 * randn, so softplus(delta + delta_bias) is around 1; without
    softplus delta_bias is uniform in (-0.1, 0.1)); A as the spec says.
    All are drawn (in this order) whether the case uses them or not.
    u, delta, Bm, Cm, z, dy have the case dtype; A, Dskip, delta_bias, h0 are
    F32 (F64 in F64 cases)."""
    rng = _rng_key(spec["seed"])
    B, T, D, N = spec["B"], spec["T"], spec["D"], spec["N"]
    sp = spec["softplus"]
    x = {}
    x["u"] = rng.standard_normal((B, T, D))
    x["delta"] = 0.5 * rng.standard_normal((B, T, D)) if sp else rng.uniform(0.2, 0.8, (B, T, D))
    if spec["A"] == "unif":
        x["A"] = -rng.uniform(0.5, 2.0, (D, N))
    else:
        x["A"] = -np.exp(0.5 * rng.standard_normal((D, N)))
    x["Bm"] = rng.standard_normal((B, T, N))
    x["Cm"] = rng.standard_normal((B, T, N))
    x["Dskip"] = rng.standard_normal(D)
    x["z"] = rng.standard_normal((B, T, D))
    x["delta_bias"] = 0.5 + 0.1 * rng.standard_normal(D) if sp else rng.uniform(-0.1, 0.1, D)
    x["h0"] = 0.5 * rng.standard_normal((B, D, N))
    x["dy"] = 0.5 * rng.standard_normal((B, T, D))
    dt = spec["dtype"]
    pdt = "f64" if dt == "f64" else "f32"
    out = {}
    for k, v in x.items():
        if k in SELECTIVE_OPTIONAL and not spec[_SEL_FLAG[k]]:
            out[k] = None
        else:
            out[k] = _round(v, pdt if k in ("A", "Dskip", "delta_bias", "h0") else dt)
    return out


def _exact_softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))


def selective_forward(p, softplus, softplus_fn):
    """The math of CASES.md; `p` maps names to tensors of one float dtype (None
    for absent optional inputs). Returns y [B, T, D] and x[T-1] [B, D, N]."""
    u, delta, A, Bm, Cm = p["u"], p["delta"], p["A"], p["Bm"], p["Cm"]
    B, T, D = u.shape
    dt = delta + p["delta_bias"] if p["delta_bias"] is not None else delta
    if softplus:
        dt = softplus_fn(dt)
    x = p["h0"] if p["h0"] is not None else torch.zeros(B, D, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(T):
        x = torch.exp(dt[:, t, :, None] * A) * x \
            + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((x * Cm[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if p["Dskip"] is not None:
        y = y + p["Dskip"] * u
    if p["z"] is not None:
        y = y * (p["z"] * torch.sigmoid(p["z"]))
    return y, x


SELECTIVE_GRAD_INPUTS = ("u", "delta", "A", "Bm", "Cm") + SELECTIVE_OPTIONAL


def ref_selective_backward(p, softplus):
    """float64 autograd of sum(y * dy); no gradient flows into h_last."""
    q = {k: (v.to(torch.float64).clone().requires_grad_(True) if v is not None else None)
         for k, v in p.items() if k != "dy"}
    y, _ = selective_forward(q, softplus, _exact_softplus)
    (y * p["dy"].to(torch.float64)).sum().backward()
    return {k: q[k].grad for k in SELECTIVE_GRAD_INPUTS if q[k] is not None}


def emu_selective_backward(p, softplus):
    """Hand-written backward (what the implementation computes), in the dtype
    of `p`. Per (b, d, n), with alpha[t] = exp(dt[t] A), x[t] = alpha[t] x[t-1]
    + dt[t] Bm[t] u[t]:
        gy = dy * silu(z) (dy without z); dz = dy * y_pre * silu'(z)
        gx[t] = gy[t] Cm[t] + alpha[t+1] gx[t+1]          (gx[T] = 0)
        dCm[t] = sum_d gy[t] x[t];  dBm[t] = sum_d gx[t] dt[t] u[t]
        du[t] = gy[t] Dskip + sum_n gx[t] dt[t] Bm[t];  dDskip = sum_{b,t} gy u
        s[t] = gx[t] x[t-1] alpha[t]   (gradient w.r.t. dt[t] A)
        ddt[t] = sum_n (s[t] A + gx[t] Bm[t] u[t]);  dA = sum_{b,t} s[t] dt[t]
        ddelta = ddt * sigmoid(delta + delta_bias) with softplus, else ddt
        ddelta_bias = sum_{b,t} ddelta;  dh0 = alpha[0] gx[0]
    """
    u, delta, A, Bm, Cm, dy = p["u"], p["delta"], p["A"], p["Bm"], p["Cm"], p["dy"]
    B, T, D = u.shape
    N = A.shape[1]
    pre = delta + p["delta_bias"] if p["delta_bias"] is not None else delta
    dt = torch.nn.functional.softplus(pre) if softplus else pre
    x = p["h0"] if p["h0"] is not None else torch.zeros(B, D, N, dtype=u.dtype)
    xs, alphas = [x], []
    ys = []
    for t in range(T):
        alpha = torch.exp(dt[:, t, :, None] * A)
        x = alpha * x + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        xs.append(x)
        alphas.append(alpha)
        ys.append((x * Cm[:, t, None, :]).sum(-1))
    y_pre = torch.stack(ys, dim=1)
    if p["Dskip"] is not None:
        y_pre = y_pre + p["Dskip"] * u
    g = {}
    if p["z"] is not None:
        sz = torch.sigmoid(p["z"])
        g["z"] = dy * y_pre * sz * (1 + p["z"] * (1 - sz))
        gy = dy * p["z"] * sz
    else:
        gy = dy
    du = gy * p["Dskip"] if p["Dskip"] is not None else torch.zeros_like(u)
    if p["Dskip"] is not None:
        g["Dskip"] = (gy * u).sum((0, 1))
    ddt = torch.zeros_like(u)
    dA = torch.zeros_like(A)
    dBm = torch.zeros_like(Bm)
    dCm = torch.zeros_like(Cm)
    gx = torch.zeros(B, D, N, dtype=u.dtype)
    for t in range(T - 1, -1, -1):
        if t + 1 < T:
            gx = gx * alphas[t + 1]
        gx = gx + gy[:, t, :, None] * Cm[:, t, None, :]
        dCm[:, t] = (gy[:, t, :, None] * xs[t + 1]).sum(1)
        s = gx * xs[t] * alphas[t]
        gxb = (gx * Bm[:, t, None, :]).sum(-1)
        ddt[:, t] = (s * A).sum(-1) + gxb * u[:, t]
        dA += (s * dt[:, t, :, None]).sum(0)
        dBm[:, t] = (gx * (dt[:, t] * u[:, t])[:, :, None]).sum(1)
        du[:, t] += gxb * dt[:, t]
    ddelta = ddt * torch.sigmoid(pre) if softplus else ddt
    g.update(u=du, delta=ddelta, A=dA, Bm=dBm, Cm=dCm)
    if p["delta_bias"] is not None:
        g["delta_bias"] = ddelta.sum((0, 1))
    if p["h0"] is not None:
        g["h0"] = alphas[0] * gx
    return g


def build_selective(name, spec):
    dt = spec["dtype"]
    acc = _acc_dtype(dt)
    sp = spec["softplus"]
    inp = draw_selective_inputs(spec)
    meta = {"op": spec["op"]}
    if spec["params"] == "explicit":
        meta["params"] = json.dumps({"delta_softplus": sp})
    else:
        assert not sp
    tv = torch.__version__.split("+")[0]
    pdt = TORCH_DTYPE["f64" if dt == "f64" else "f32"]

    tensors = {"in." + k: v for k, v in inp.items() if v is not None and k != "dy"}
    p64 = {k: (v.to(torch.float64) if v is not None else None) for k, v in inp.items()}
    pacc = {k: (v.to(acc) if v is not None else None) for k, v in inp.items()}
    checks = []
    if spec["op"] == "scan.selective":
        y, h_last = selective_forward(p64, sp, _exact_softplus)
        tensors["out.y"] = y.to(TORCH_DTYPE[dt])
        tensors["out.h_last"] = h_last.to(pdt)
        meta["source"] = f"torch {tv} float64 loop"
        ey, eh = selective_forward(pacc, sp, torch.nn.functional.softplus)
        checks += [("y", ey.to(TORCH_DTYPE[dt]), tensors["out.y"]),
                   ("h_last", eh.to(pdt), tensors["out.h_last"])]
    else:
        tensors["in.dy"] = inp["dy"]
        grads = ref_selective_backward(p64, sp)
        emu = emu_selective_backward(pacc, sp)
        assert sorted(grads) == sorted(emu), (sorted(grads), sorted(emu))
        for k in SELECTIVE_GRAD_INPUTS:
            if k in grads:
                odt = inp[k].dtype  # each gradient has its input's dtype
                tensors["out.d" + k] = grads[k].to(odt)
                checks.append(("d" + k, emu[k].to(odt), tensors["out.d" + k]))
        meta["source"] = f"torch {tv} autograd float64"
    return tensors, meta, checks


# ==========================================================================
# scan.gla and scan.gla_backward (gated linear attention, matrix state).
# ==========================================================================
# name -> spec with `family` = "gla", sizes B, T, H, K, V, flags `h0` and
# `dhl` (in.dh_last, backward only), the gate draw `gates` ("typ":
# logsigmoid(randn + 3), gates near 1; "strong": logsigmoid(randn - 2), gates
# near 0; "zero": g = 0, pure linear attention; "neg30": "typ" with some
# entries set to -30, see draw_gla_inputs), `scale` ("omit": no `params` key;
# "null": {"scale": null}; a float: {"scale": x}) and `seed` = "gla:<desc>"
# (a forward and a backward case with the same description see the same
# inputs).
def _gla(op, dtype, B, T, H, K, V, h0=False, dhl=False, gates="typ", scale="omit"):
    return dict(family="gla", op=op, dtype=dtype, B=B, T=T, H=H, K=K, V=V, h0=h0,
                dhl=dhl, gates=gates, scale=scale)


def _gla_cases():
    cases = {}

    def fwd(desc, *args, **kw):
        cases["scan_gla_" + desc] = dict(_gla("scan.gla", *args, **kw), seed="gla:" + desc)

    def bwd(desc, *args, **kw):
        cases["scan_gla_backward_" + desc] = dict(
            _gla("scan.gla_backward", *args, **kw), seed="gla:" + desc)

    # Forward.
    fwd("f32_b1_t1_h1_k1_v1", "f32", 1, 1, 1, 1, 1)
    fwd("f32_b2_t33_h3_k8_v5", "f32", 2, 33, 3, 8, 5, scale=0.3)
    fwd("f32_b1_t70_h2_k16_v16_h0", "f32", 1, 70, 2, 16, 16, h0=True, scale="null")
    fwd("f32_b1_t200_h1_k64_v64_h0", "f32", 1, 200, 1, 64, 64, h0=True)
    fwd("f32_strong_b2_t33_h3_k8_v5_h0", "f32", 2, 33, 3, 8, 5, h0=True, gates="strong")
    fwd("f32_zero_b2_t50_h2_k8_v12", "f32", 2, 50, 2, 8, 12, gates="zero")
    fwd("f32_neg30_b1_t40_h2_k8_v8_h0", "f32", 1, 40, 2, 8, 8, h0=True, gates="neg30",
        scale=1.0)
    fwd("f64_b2_t33_h3_k8_v5_h0", "f64", 2, 33, 3, 8, 5, h0=True, scale=0.3)
    fwd("f16_strong_b2_t48_h2_k16_v8", "f16", 2, 48, 2, 16, 8, gates="strong")
    fwd("bf16_b1_t70_h2_k16_v16_h0", "bf16", 1, 70, 2, 16, 16, h0=True)
    # Backward.
    bwd("f32_b1_t1_h1_k1_v1_h0_dhl", "f32", 1, 1, 1, 1, 1, h0=True, dhl=True)
    bwd("f32_b2_t33_h3_k8_v5", "f32", 2, 33, 3, 8, 5, scale=0.3)
    bwd("f32_b1_t70_h2_k16_v16_h0_dhl", "f32", 1, 70, 2, 16, 16, h0=True, dhl=True,
        scale="null")
    # (V = 32 in the long backward to keep tests/cases small)
    bwd("f32_b1_t200_h1_k64_v32_h0", "f32", 1, 200, 1, 64, 32, h0=True)
    bwd("f32_strong_b2_t33_h3_k8_v5_h0", "f32", 2, 33, 3, 8, 5, h0=True, gates="strong")
    bwd("f32_zero_b2_t50_h2_k8_v12", "f32", 2, 50, 2, 8, 12, gates="zero")
    bwd("f32_neg30_b1_t40_h2_k8_v8_h0_dhl", "f32", 1, 40, 2, 8, 8, h0=True, dhl=True,
        gates="neg30", scale=1.0)
    bwd("f64_b2_t33_h3_k8_v5_h0_dhl", "f64", 2, 33, 3, 8, 5, h0=True, dhl=True, scale=0.3)
    bwd("f16_strong_b2_t48_h2_k16_v8", "f16", 2, 48, 2, 16, 8, gates="strong")
    bwd("bf16_b1_t70_h2_k16_v16_h0", "bf16", 1, 70, 2, 16, 16, h0=True)
    return cases


def _logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def draw_gla_inputs(spec):
    """q, k, do standard normal times 0.5; v standard normal; h0, dh_last
    standard normal times 0.5; g as the spec's `gates` says ("neg30": the
    "typ" gates, then g = -30 where a uniform draw is below 0.03, in every
    head and batch row at t = 0 for key channel 0 (h0 is forgotten there), and
    in batch 0, head 0, channel 0 for three consecutive steps t = 5, 6, 7 (a
    cumulative log-gate of -90, whose exp(+90) overflows float32)).
    All are drawn (in this order) whether the case uses them or not.
    q, k, v, g, do have the case dtype; h0 and dh_last are F32 (F64 in F64
    cases)."""
    rng = _rng_key(spec["seed"])
    B, T, H, K, V = spec["B"], spec["T"], spec["H"], spec["K"], spec["V"]
    x = {}
    x["q"] = 0.5 * rng.standard_normal((B, T, H, K))
    x["k"] = 0.5 * rng.standard_normal((B, T, H, K))
    x["v"] = rng.standard_normal((B, T, H, V))
    graw = rng.standard_normal((B, T, H, K))
    mask = rng.uniform(0.0, 1.0, (B, T, H, K))
    x["h0"] = 0.5 * rng.standard_normal((B, H, K, V))
    x["do"] = 0.5 * rng.standard_normal((B, T, H, V))
    x["dh_last"] = 0.5 * rng.standard_normal((B, H, K, V))
    gates = spec["gates"]
    if gates == "typ":
        g = _logsigmoid(graw + 3.0)
    elif gates == "strong":
        g = _logsigmoid(graw - 2.0)
    elif gates == "zero":
        g = np.zeros_like(graw)
    else:
        assert gates == "neg30" and T >= 8, spec
        g = _logsigmoid(graw + 3.0)
        g[mask < 0.03] = -30.0
        g[:, 0, :, 0] = -30.0
        g[0, 5:8, 0, 0] = -30.0
    x["g"] = g
    dt = spec["dtype"]
    pdt = "f64" if dt == "f64" else "f32"
    out = {}
    for name in ("q", "k", "v", "g", "h0", "do", "dh_last"):
        if (name == "h0" and not spec["h0"]) or (name == "dh_last" and not spec["dhl"]):
            out[name] = None
        else:
            out[name] = _round(x[name], pdt if name in ("h0", "dh_last") else dt)
    return out


def _gla_scale(spec):
    return 1.0 / np.sqrt(spec["K"]) if spec["scale"] in ("omit", "null") else spec["scale"]


def gla_forward(q, k, v, g, h0, scale):
    """Step-by-step loop in the dtype of the inputs: S[t] = diag(exp(g[t]))
    S[t-1] + k[t]^T v[t] (S[-1] = h0 or zeros), o[t] = scale q[t] S[t].
    Returns o [B, T, H, V] and the states [S[-1], S[0], ..., S[T-1]]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else torch.zeros(B, H, K, V, dtype=q.dtype)
    states, os_ = [S], []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        states.append(S)
        os_.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(os_, dim=1), states


GLA_GRAD_INPUTS = ("q", "k", "v", "g", "h0")


def ref_gla_backward(p, scale):
    """float64 autograd of sum(o * do) + sum(h_last * dh_last) (the second
    term only where dh_last is given); no gradient w.r.t. an absent h0."""
    q = {n: p[n].to(torch.float64).clone().requires_grad_(True)
         for n in GLA_GRAD_INPUTS if p[n] is not None}
    o, states = gla_forward(q["q"], q["k"], q["v"], q["g"], q.get("h0"), scale)
    loss = (o * p["do"].to(torch.float64)).sum()
    if p["dh_last"] is not None:
        loss = loss + (states[-1] * p["dh_last"].to(torch.float64)).sum()
    loss.backward()
    return {n: t.grad for n, t in q.items()}


def emu_gla_backward(p, scale):
    """The backward of the implementation, in the dtype of `p`: recompute the
    states, then walk back with dS (from dh_last, or zeros):
        dS += scale q[t]^T do[t];  dq[t] = scale S[t] do[t]
        dk[t] = dS v[t];  dv[t] = dS^T k[t]
        dg[t] = exp(g[t]) * rowsum(dS * S[t-1]);  dS = diag(exp(g[t])) dS
    and dh0 = dS at the end (only where h0 is given)."""
    q, k, v, g, do = p["q"], p["k"], p["v"], p["g"], p["do"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    _, states = gla_forward(q, k, v, g, p["h0"], scale)
    dS = p["dh_last"] if p["dh_last"] is not None else torch.zeros(B, H, K, V, dtype=q.dtype)
    dq, dk, dv, dg = (torch.zeros_like(x) for x in (q, k, v, g))
    for t in range(T - 1, -1, -1):
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]
        dq[:, t] = scale * torch.einsum("bhkv,bhv->bhk", states[t + 1], do[:, t])
        dk[:, t] = torch.einsum("bhkv,bhv->bhk", dS, v[:, t])
        dv[:, t] = torch.einsum("bhkv,bhk->bhv", dS, k[:, t])
        eg = torch.exp(g[:, t])
        dg[:, t] = eg * (dS * states[t]).sum(-1)
        dS = eg[..., None] * dS
    grads = dict(q=dq, k=dk, v=dv, g=dg)
    if p["h0"] is not None:
        grads["h0"] = dS
    return grads


def build_gla(name, spec):
    dt = spec["dtype"]
    acc = _acc_dtype(dt)
    inp = draw_gla_inputs(spec)
    meta = {"op": spec["op"]}
    if spec["scale"] == "null":
        meta["params"] = json.dumps({"scale": None})
    elif spec["scale"] != "omit":
        meta["params"] = json.dumps({"scale": spec["scale"]})
    scale = _gla_scale(spec)
    tv = torch.__version__.split("+")[0]
    pdt = TORCH_DTYPE["f64" if dt == "f64" else "f32"]

    names = ("q", "k", "v", "g", "h0")
    if spec["op"] == "scan.gla_backward":
        names += ("do", "dh_last")
    tensors = {"in." + n: inp[n] for n in names if inp[n] is not None}
    p64 = {n: (v.to(torch.float64) if v is not None else None) for n, v in inp.items()}
    pacc = {n: (v.to(acc) if v is not None else None) for n, v in inp.items()}
    checks = []
    if spec["op"] == "scan.gla":
        o, states = gla_forward(p64["q"], p64["k"], p64["v"], p64["g"], p64["h0"], scale)
        tensors["out.o"] = o.to(TORCH_DTYPE[dt])
        tensors["out.h_last"] = states[-1].to(pdt)
        meta["source"] = f"torch {tv} float64 loop"
        eo, est = gla_forward(pacc["q"], pacc["k"], pacc["v"], pacc["g"], pacc["h0"], scale)
        checks += [("o", eo.to(TORCH_DTYPE[dt]), tensors["out.o"]),
                   ("h_last", est[-1].to(pdt), tensors["out.h_last"])]
    else:
        grads = ref_gla_backward(p64, scale)
        # The hand-written formulas must be the autograd gradient: in float64
        # they agree to rounding (checked here far below the F64 tolerance).
        emu64 = emu_gla_backward(p64, scale)
        assert sorted(grads) == sorted(emu64), (sorted(grads), sorted(emu64))
        for n in grads:
            assert err_ratio(emu64[n], grads[n], 1e-12, 1e-12) <= 1.0, (name, n)
        emu = emu_gla_backward(pacc, scale)
        for n in GLA_GRAD_INPUTS:
            if n in grads:
                odt = inp[n].dtype  # each gradient has its input's dtype
                tensors["out.d" + n] = grads[n].to(odt)
                checks.append(("d" + n, emu[n].to(odt), tensors["out.d" + n]))
        meta["source"] = f"torch {tv} autograd float64"
    return tensors, meta, checks


def build(name, spec):
    family = spec.get("family", "linear")
    if family == "linear":
        return build_linear(name, spec)
    if family == "complex":
        tensors, meta, checks = build_complex(name, spec)
    elif family == "gla":
        tensors, meta, checks = build_gla(name, spec)
    elif family in {m.__name__ for m in FAMILY_MODULES}:
        module = next(m for m in FAMILY_MODULES if m.__name__ == family)
        tensors, meta, checks = module.build(name, spec)
    else:
        tensors, meta, checks = build_selective(name, spec)
    # Tolerances are the CASES.md defaults of the case dtype; no override is
    # needed: the self-check passes with them.
    rtol, atol = DEFAULT_TOL[spec["dtype"]]
    worst = max(err_ratio(g, w, rtol, atol) for _, g, w in checks)
    for k, t in tensors.items():
        # lse = -inf of a query row that sees no key is the one expected non-finite value;
        # NaN is never written.
        finite = torch.isfinite(t.to(torch.float64)) | (t.to(torch.float64) == -torch.inf)
        assert finite.all() if spec.get("allow_neg_inf") else torch.isfinite(t.to(torch.float64)).all(), (name, k)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return tensors, meta, worst


def canonicalize_header(path):
    """safetensors writes `__metadata__` from a hash map, so its key order
    varies from run to run. Rewrite the header with the metadata keys sorted
    (same length, same tensors and offsets) so that the files are
    byte-for-byte reproducible."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        assert len(new) <= n, (path, len(new), n)
        new += b" " * (n - len(new))
        f.seek(8)
        f.write(new)


# Ops whose cases are ready but whose Rust implementation has not landed yet: their files
# are written only with --pending (tests/cases must hold only cases the crate can run).
PENDING_OPS: set = set().union(*(m.PENDING for m in FAMILY_MODULES))


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "cases"))
    ap.add_argument("--only", default="", help="only cases whose name starts with this")
    ap.add_argument("--pending", action="store_true", help="also write cases of ops not yet implemented")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    failed = []
    total = 0
    summary = {}  # (op, dtype) -> worst ratio
    for name, spec in _cases().items():
        if not name.startswith(args.only):
            continue
        if spec["op"] in PENDING_OPS and not args.pending:
            continue
        tensors, meta, worst = build(name, spec)
        key = (spec["op"], spec["dtype"])
        summary[key] = max(summary.get(key, 0.0), worst)
        path = os.path.join(args.out, name + ".safetensors")
        save_file(tensors, path, metadata=meta)
        canonicalize_header(path)
        size = os.path.getsize(path)
        total += size
        status = "ok" if worst <= 1.0 else "TOLERANCE EXCEEDED"
        print(f"{name:58s} {size:9d} B  worst emu/tol ratio {worst:.3g}  {status}")
        if worst > 1.0:
            failed.append(name)
    print(f"total {total} bytes")
    for (op, dt), worst in sorted(summary.items()):
        print(f"worst emu/tol ratio  {op:32s} {dt:5s} {worst:.3g}")
    if failed:
        print("self-check failed for: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
