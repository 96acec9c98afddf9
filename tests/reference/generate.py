#!/usr/bin/env python3
"""Regenerate the committed reference cases in ``tests/cases/``.

Usage::

    python tests/reference/generate.py [--out tests/cases] [--only PREFIX]

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

Inputs are drawn in float64 from fixed per-case seeds (numpy PCG64), rounded to
the case dtype first, and the reference is computed in float64 from the
rounded values; outputs are then cast to the case dtype (F64 cases stay float64
throughout). Gates ``a`` are uniform in (0.5, 1) (or in (-1, 1) for the
``neg`` cases); ``b``, ``dh`` and ``h0`` are standard normal times 0.5.

As a self-check the script also runs an emulation of the implementation
(sequential loop and a chunked "time-parallel" scan, in float32 for
F32/F16/BF16 inputs, float64 for F64, cast to the case dtype) and asserts that it
passes the case's tolerance; it prints the worst error ratio per case
(``|got - want| / (atol + rtol * |want|)``, must be <= 1).
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
    return cases


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
def build(name, spec):
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


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "cases"))
    ap.add_argument("--only", default="", help="only cases whose name starts with this")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    failed = []
    total = 0
    for name, spec in _cases().items():
        if not name.startswith(args.only):
            continue
        tensors, meta, worst = build(name, spec)
        path = os.path.join(args.out, name + ".safetensors")
        save_file(tensors, path, metadata=meta)
        canonicalize_header(path)
        size = os.path.getsize(path)
        total += size
        status = "ok" if worst <= 1.0 else "TOLERANCE EXCEEDED"
        print(f"{name:48s} {size:9d} B  worst emu/tol ratio {worst:.3g}  {status}")
        if worst > 1.0:
            failed.append(name)
    print(f"total {total} bytes")
    if failed:
        print("self-check failed for: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
