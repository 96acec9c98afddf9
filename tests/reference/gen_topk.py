"""Reference cases of the sparse top-k family: ``topk.rows``, ``sae.encode``,
``sae.encode_batch_topk``, ``sae.encode_jumprelu``, ``sae.decode``,
``sae.backward``, ``sae.encode_mp`` and ``codebook.nearest`` (a family module of
``generate.py``; see ``FAMILY_MODULES`` there).

Case names start with ``topk_``, ``sae_`` or ``codebook_``
(``generate.py --pending --only sae_`` etc.). Every op is in ``PENDING`` until
its Rust side lands (all eight have).

Inputs are drawn in float64 from a fixed per-case seed (numpy PCG64 seeded
from the CRC32 of the case name, as ``_rng_key`` in generate.py; cases whose
draw must avoid near-ties redraw from ``"<name>#1"``, ``"<name>#2"``, ... until
the draw is accepted, see ``_draw``), rounded to the case dtype first; every
reference is computed in float64 from the rounded values and its float outputs
are cast to the case dtype (F64 cases stay float64). Index outputs are I32.
All float inputs of a case, ``threshold`` included, have the case dtype.

Ties and order (the Rust implementation follows these rules):

* A *stable* order is used everywhere: among equal values the lower index
  comes first (top-k outputs, CSR rows, the batch-wide selection of BatchTopK
  by flat index ``b*L + l``, the argmax of matching pursuit). The references
  are ``torch.sort(..., stable=True)`` (checked against ``torch.topk``'s values).
  Outputs compared by meaning (CASES.md "Comparison": sorted values must match
  and every index must point at its value) accept any tie order; the cases
  store the lower-index-first order.
* NaN: no case holds a NaN (generate.py never writes one). torch.topk treats
  NaN as larger than every number (first with ``largest``, last without);
  that is the suggested behaviour, but it is not tested.
* -inf is covered by the ``topk_rows_*_neginf_*`` cases (``allow_neg_inf``):
  -inf entries are ordinary values, the smallest of all (rows whose finite
  count is below k return -inf values with the indices of -inf entries, lower
  index first in the stored order; a row of only -inf returns indices 0..k-1).
  +inf does not occur in any case.

The ops and their references (``source`` metadata "torch VERSION ..."):

* ``topk.rows`` (``float64 stable sort``): ``x [R, N]`` -> ``values [R, k]``,
  ``indices [R, k]``; params ``{"k": k, "largest": bool}`` (``largest`` is
  left out in ``topk_rows_f32_r3_n37_k5_default``: default true). Sorted
  descending with ``largest``, ascending without. Draws: standard normal;
  ``ties`` cases: integers 0..9 (many exact ties, at the k-th place too);
  ``neginf`` cases: standard normal with about 40% of the entries -inf, row 0
  all -inf, row 1 with exactly 3 finite entries (k = 8).
* ``sae.encode`` (``float64 dense pre-activations, relu, stable top-k``):
  ``pre[b, l] = (x[b] - b_dec) . w_enc[l] + b_enc[l]`` (``b_dec`` = 0 when
  absent), ``z = relu(pre)``; the output is the top k of the row ``z[b]``:
  ``values [B, k]`` descending and ``indices [B, k]``. The parenthesization
  of CASES.md's ``TopK(ReLU(x - b_dec) W_enc^T + b_enc)`` is read as
  ``TopK(ReLU((x - b_dec) W_enc^T + b_enc))``: the ReLU acts on the
  pre-activations, not on ``x - b_dec``. Where a row has fewer than k positive
  pre-activations the remaining values are 0 and their indices are latents
  with ``pre <= 0`` -- in the stored order, the lowest such latent indices in
  ascending order (the stable order above applied to ``z``). For the
  comparison by meaning the "input" an index points into is the row ``z[b]``
  (relu of the float64 pre-activation of the stored inputs), so a 0 value may
  come with any latent whose pre-activation is <= 0 (within the tolerance).
  Draws: ``x`` standard normal, ``w_enc`` standard normal / sqrt(Dm),
  ``b_enc`` 0.1 randn, ``b_dec`` 0.1 randn; ``sparse`` cases: ``b_enc`` =
  -2.2 + 0.1 randn (about 1.5% positive pre-activations, fewer than k in most
  rows) and row 0 of ``x`` equal to ``b_dec`` (zeros without it), so that
  ``pre[0] = b_enc`` exactly: an all-zero row (values 0, indices 0..k-1).
* ``sae.encode_batch_topk`` (``float64 dense pre-activations, relu, batch
  top-k``): ``z`` as above; the B*k largest entries of the whole ``z [B, L]``
  (stable order by flat index ``b*L + l``) of which only the strictly positive
  are kept (zeros are never output, so a batch with fewer than B*k positive
  pre-activations keeps exactly its positive ones and a row may be empty).
  CSR output: ``indptr [B+1]``, ``indices [nnz]`` (latent index), ``values
  [nnz]``, each row descending (lower latent first among equal values).
  Params ``{"k": k}``. The draws are accepted only where no selection
  decision is within 1e-4 of a flip (the B*k-th and (B*k+1)-th largest differ
  by more than 1e-4, every kept value exceeds 1e-4, and where fewer than B*k
  are positive every pre-activation is outside (-1e-4, 1e-4), the exact
  all-zero row 0 of the ``sparse`` case apart), so ``indptr`` is exact for
  any float32-accumulating kernel. Draws as ``sae.encode`` (the ``sparse``
  case must have fewer than B*k positive pre-activations: row 0 is empty and
  the batch keeps fewer than B*k entries).
* ``sae.encode_jumprelu`` (``float64 dense pre-activations, jumprelu``): keep
  ``pre[b, l]`` where ``pre[b, l] > threshold[l]`` (strictly greater); the
  value kept is the pre-activation itself (``z * H(z - theta)``; every
  threshold in the cases is >= 0, so the values are positive). No params.
  CSR output as above, each row descending. Draws as ``sae.encode`` plus
  ``threshold`` uniform in (0.5, 1.5) (``sparse``: (2, 3) with the usual
  ``b_enc`` and row 0 of ``x`` equal to ``b_dec``: a few kept entries, some
  rows empty, row 0 among them);
  accepted only where every ``|pre - threshold|`` exceeds 1e-4 except the
  designed exact entries of the ``exact`` case: there ``b_enc`` is uniform in
  (0.3, 1), row 0 of ``x`` equals ``b_dec`` (so ``pre[0] = b_enc`` exactly),
  and ``threshold[l]`` is ``b_enc[l]`` for l = 0 mod 3 (pre == threshold:
  *not* kept), 0 for l = 1 mod 3 (kept), ``b_enc[l] - 0.25`` otherwise (kept).
* ``sae.decode`` (``float64 embedding_bag``): ``x_hat[b] = sum_j
  values[b, j] * w_dec[indices[b, j]] + b_dec`` with
  ``F.embedding_bag(mode="sum", per_sample_weights=values)``; repeated
  indices within a row add up. No params. Draws: ``w_dec`` standard normal /
  sqrt(Dm) * 2, ``values`` uniform in (0, 2) with about 10% set to 0,
  ``indices`` distinct per row (``rep`` cases: drawn with replacement from few
  latents, and row 0 = one latent k times), ``b_dec`` 0.1 randn.
* ``sae.backward`` (``float64 autograd``): gradients of
  ``loss = sum(x_hat * d_xhat)``, where ``x_hat`` is ``sae.decode`` of the
  given ``indices`` and ``values`` and the values are tied to the encoder as
  follows. The decoder uses the given ``values`` (forward value); the encoder
  gradient flows back through ``v[b, j] = relu(pre[b, indices[b, j]])`` with
  the ReLU mask taken from the given values (``values[b, j] > 0``), i.e.
  ``dpre[b, j] = (d_xhat[b] . w_dec[indices[b, j]]) * [values[b, j] > 0]``.
  So ``dw_dec[l] = sum_{(b,j): idx=l} values[b,j] d_xhat[b]``,
  ``db_enc[l] = sum dpre``, ``dw_enc[l] = sum dpre (x[b] - b_dec)``,
  ``dx[b] = sum_j dpre[b, j] w_enc[idx[b, j]]``,
  ``db_dec = sum_b d_xhat[b] - sum_b dx[b]`` (b_dec enters both the encoder
  input and the decoder output). ``out.db_dec`` is always written (without
  ``in.b_dec`` it is the gradient w.r.t. a zero b_dec). The autograd graph
  uses ``v = values + (m*pre_sel - stopgrad(m*pre_sel))``; the case also runs
  autograd with the recomputed ``v = relu(pre_sel)`` and asserts both agree
  (to 1e-12 in F64, within the case tolerance otherwise: the given values are
  the rounded encoder values, so both readings pass). ``indices``/``values``
  are the ``sae.encode`` reference of the stored inputs (values rounded to the
  case dtype; the ``sparse`` case has zero values, i.e. masked latents).
  Draws as ``sae.encode`` plus ``w_dec`` standard normal / sqrt(Dm) and
  ``d_xhat`` standard normal. Outputs have the case dtype.
* ``sae.encode_mp`` (``float64 matching pursuit loop``): ``r = x - b_dec``;
  k times: ``j = argmax_l r . w_dec[l]`` (the signed dot product, not its
  absolute value; lowest index among ties), ``c = r . w_dec[j]``, record
  ``(j, c)``, ``r -= c * w_dec[j]``. Outputs ``values [B, k]``, ``indices
  [B, k]`` in selection order and ``residual [B, Dm]``. Params ``{"k": k}``.
  Draws: ``x`` standard normal, atoms standard normal normalized to unit norm
  in float64 *before* rounding (the rounded F16 atoms are used as they are,
  not renormalized), ``b_dec`` 0.1 randn; accepted only where at every step
  the best and second-best dot differ by more than 1e-3 (order is unique).
* ``codebook.nearest`` (``float64 dense scores, stable top-k``): ``dot``:
  ``x . c_l`` descending; ``cosine``: ``x . c_l / (|x| |c_l|)`` descending;
  ``l2``: ``|x - c_l|^2`` (squared distance) ascending. Outputs ``scores
  [B, k]`` best first, ``indices [B, k]``. Params ``{"k": k, "metric": m}``
  (both always written). No zero rows occur (cosine of a zero vector is not
  covered). Draws: ``x`` standard normal, codebook rows standard normal times
  a per-row factor uniform in (0.5, 2); ``dup`` cases: the last 4 codebook
  rows are copies of rows 0..3 (times 2 for cosine, an exact tie in cosine)
  and ``x[b]`` is near row ``b % 4`` (0.7 * row + 0.05 randn), so the best two
  are an exact tie, stored lower index first.

Self-check (emulation in float32 from the stored inputs, float64 for F64
cases, by a different route): ``topk.rows``: tile-by-tile (16 columns) top-k
with a running merge; ``sae.encode`` / ``batch_topk`` / ``jumprelu``: a
blocked GEMM 64 latents at a time (torch matmul), with a running top-k merge
(batch top-k: per-row running top-min(L, B*k), then a batch-wide selection);
``sae.decode``: a gather-and-accumulate loop over the k slots;
``sae.backward``: the hand-written formulas above with index_add (also run in
float64 and asserted equal to the autograd result); ``sae.encode_mp``: the
scores updated with the Gram matrix ``dots -= c * (W W^T)[j]`` instead of
recomputed (its indices are asserted equal to the reference's);
``codebook.nearest``: matmul forms (``|x|^2 - 2 x.c + |c|^2`` for l2, unit
vectors first for cosine). Checks compare values, never indices: the sorted
values, and "values at indices" (the emulation's values against the float64
reference score at the emulation's own indices, the comparison by meaning);
CSR outputs also compare ``indptr`` (exactly equal) and ``encode_mp`` its
``residual``. No case needs ``rtol``/``atol`` metadata.
"""

import json
import zlib

import numpy as np
import torch
import torch.nn.functional as F

PENDING: set = set()  # every op of the family has landed

# The same constants as generate.py (reimplemented here: generate.py imports this module).
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
I32 = torch.int32
F64 = torch.float64

# Selection decisions (CSR membership, matching-pursuit argmax) must be at least this far
# from a flip in the float64 reference for a draw to be accepted.
SELECT_MARGIN = 1e-4
MP_MARGIN = 1e-3


# --------------------------------------------------------------------------
# Case list.
# --------------------------------------------------------------------------
def _topk(dtype, R, N, k, largest=True, draw="normal", params="explicit"):
    return dict(op="topk.rows", dtype=dtype, R=R, N=N, k=k, largest=largest, draw=draw,
                params=params, allow_neg_inf=(draw == "neginf"))


def _sae(op, dtype, B, Dm, L, k=None, bdec=True, draw="typ"):
    return dict(op=op, dtype=dtype, B=B, Dm=Dm, L=L, k=k, bdec=bdec, draw=draw)


def _cb(dtype, metric, B, Dm, L, k, draw="typ"):
    return dict(op="codebook.nearest", dtype=dtype, metric=metric, B=B, Dm=Dm, L=L, k=k,
                draw=draw)


def _cases():
    c = {}
    # topk.rows
    c["topk_rows_f32_r4_n37_k5"] = _topk("f32", 4, 37, 5)
    c["topk_rows_f32_r4_n37_k5_smallest"] = _topk("f32", 4, 37, 5, largest=False)
    c["topk_rows_f32_r3_n37_k5_default"] = _topk("f32", 3, 37, 5, params="omit")
    c["topk_rows_f32_ties_r4_n40_k7"] = _topk("f32", 4, 40, 7, draw="ties")
    c["topk_rows_f32_ties_r4_n40_k7_smallest"] = _topk("f32", 4, 40, 7, largest=False,
                                                       draw="ties")
    c["topk_rows_f32_r5_n19_k1"] = _topk("f32", 5, 19, 1)
    c["topk_rows_f32_r5_n19_k1_smallest"] = _topk("f32", 5, 19, 1, largest=False)
    c["topk_rows_f32_r3_n19_k19"] = _topk("f32", 3, 19, 19)
    c["topk_rows_f32_r2_n1_k1"] = _topk("f32", 2, 1, 1)
    c["topk_rows_f32_r7_n1003_k50"] = _topk("f32", 7, 1003, 50)
    c["topk_rows_f32_r2_n4099_k256_smallest"] = _topk("f32", 2, 4099, 256, largest=False)
    c["topk_rows_f32_neginf_r4_n20_k8"] = _topk("f32", 4, 20, 8, draw="neginf")
    c["topk_rows_f32_neginf_r4_n20_k8_smallest"] = _topk("f32", 4, 20, 8, largest=False,
                                                         draw="neginf")
    c["topk_rows_f16_r4_n37_k5"] = _topk("f16", 4, 37, 5)
    c["topk_rows_bf16_r4_n130_k9_smallest"] = _topk("bf16", 4, 130, 9, largest=False)
    c["topk_rows_f64_r3_n37_k5"] = _topk("f64", 3, 37, 5)

    # sae.encode
    enc = "sae.encode"
    c["sae_encode_f32_b5_dm32_l1000_k32_bdec"] = _sae(enc, "f32", 5, 32, 1000, 32)
    c["sae_encode_f32_b4_dm48_l257_k16"] = _sae(enc, "f32", 4, 48, 257, 16, bdec=False)
    c["sae_encode_f32_b1_dm32_l257_k1_bdec"] = _sae(enc, "f32", 1, 32, 257, 1)
    c["sae_encode_f32_b3_dm16_l37_k37_bdec"] = _sae(enc, "f32", 3, 16, 37, 37)
    c["sae_encode_f32_sparse_b6_dm32_l257_k12_bdec"] = _sae(enc, "f32", 6, 32, 257, 12,
                                                            draw="sparse")
    c["sae_encode_f32_sparse_b4_dm16_l100_k8"] = _sae(enc, "f32", 4, 16, 100, 8, bdec=False,
                                                      draw="sparse")
    c["sae_encode_f32_b8_dm16_l2053_k64_bdec"] = _sae(enc, "f32", 8, 16, 2053, 64)
    c["sae_encode_f16_b4_dm64_l300_k16_bdec"] = _sae(enc, "f16", 4, 64, 300, 16)
    c["sae_encode_bf16_b4_dm64_l300_k16_bdec"] = _sae(enc, "bf16", 4, 64, 300, 16)
    c["sae_encode_f64_b3_dm32_l257_k16_bdec"] = _sae(enc, "f64", 3, 32, 257, 16)

    # sae.encode_batch_topk
    btk = "sae.encode_batch_topk"
    c["sae_encode_batch_topk_f32_b6_dm32_l257_k8_bdec"] = _sae(btk, "f32", 6, 32, 257, 8)
    c["sae_encode_batch_topk_f32_sparse_b5_dm16_l100_k10"] = _sae(btk, "f32", 5, 16, 100, 10,
                                                                  bdec=False, draw="sparse")
    c["sae_encode_batch_topk_f32_b1_dm16_l50_k7_bdec"] = _sae(btk, "f32", 1, 16, 50, 7)
    c["sae_encode_batch_topk_f16_b4_dm32_l200_k6_bdec"] = _sae(btk, "f16", 4, 32, 200, 6)
    c["sae_encode_batch_topk_bf16_b4_dm32_l130_k4"] = _sae(btk, "bf16", 4, 32, 130, 4,
                                                           bdec=False)
    c["sae_encode_batch_topk_f64_b3_dm16_l60_k5_bdec"] = _sae(btk, "f64", 3, 16, 60, 5)

    # sae.encode_jumprelu
    jr = "sae.encode_jumprelu"
    c["sae_encode_jumprelu_f32_b6_dm32_l257_bdec"] = _sae(jr, "f32", 6, 32, 257)
    c["sae_encode_jumprelu_f32_exact_b4_dm16_l100"] = _sae(jr, "f32", 4, 16, 100, bdec=False,
                                                           draw="exact")
    c["sae_encode_jumprelu_f32_exact_b3_dm16_l61_bdec"] = _sae(jr, "f32", 3, 16, 61,
                                                               draw="exact")
    c["sae_encode_jumprelu_f32_sparse_b6_dm16_l100_bdec"] = _sae(jr, "f32", 6, 16, 100,
                                                                 draw="sparse")
    c["sae_encode_jumprelu_f16_b4_dm32_l200_bdec"] = _sae(jr, "f16", 4, 32, 200)
    c["sae_encode_jumprelu_bf16_b4_dm32_l130"] = _sae(jr, "bf16", 4, 32, 130, bdec=False)
    c["sae_encode_jumprelu_f64_b3_dm16_l60_bdec"] = _sae(jr, "f64", 3, 16, 60)

    # sae.decode
    dec = "sae.decode"
    c["sae_decode_f32_b6_k16_l300_dm48_bdec"] = _sae(dec, "f32", 6, 48, 300, 16)
    c["sae_decode_f32_rep_b5_k12_l40_dm33"] = _sae(dec, "f32", 5, 33, 40, 12, bdec=False,
                                                   draw="rep")
    c["sae_decode_f32_b1_k1_l10_dm5_bdec"] = _sae(dec, "f32", 1, 5, 10, 1)
    c["sae_decode_f16_rep_b4_k16_l200_dm64_bdec"] = _sae(dec, "f16", 4, 64, 200, 16,
                                                         draw="rep")
    c["sae_decode_bf16_b4_k16_l200_dm64"] = _sae(dec, "bf16", 4, 64, 200, 16, bdec=False)
    c["sae_decode_f64_b3_k8_l100_dm24_bdec"] = _sae(dec, "f64", 3, 24, 100, 8)

    # sae.backward
    bwd = "sae.backward"
    c["sae_backward_f32_b6_dm32_l257_k8_bdec"] = _sae(bwd, "f32", 6, 32, 257, 8)
    c["sae_backward_f32_sparse_b5_dm16_l60_k8"] = _sae(bwd, "f32", 5, 16, 60, 8, bdec=False,
                                                       draw="sparse")
    c["sae_backward_f32_b1_dm8_l20_k1_bdec"] = _sae(bwd, "f32", 1, 8, 20, 1)
    c["sae_backward_f64_b4_dm24_l100_k6_bdec"] = _sae(bwd, "f64", 4, 24, 100, 6)
    c["sae_backward_bf16_b4_dm32_l130_k8_bdec"] = _sae(bwd, "bf16", 4, 32, 130, 8)

    # sae.encode_mp
    mp = "sae.encode_mp"
    c["sae_encode_mp_f32_b4_dm32_l300_k5_bdec"] = _sae(mp, "f32", 4, 32, 300, 5)
    c["sae_encode_mp_f32_b3_dm16_l64_k1"] = _sae(mp, "f32", 3, 16, 64, 1, bdec=False)
    c["sae_encode_mp_f32_b2_dm13_l37_k5"] = _sae(mp, "f32", 2, 13, 37, 5, bdec=False)
    c["sae_encode_mp_f16_b4_dm32_l200_k5_bdec"] = _sae(mp, "f16", 4, 32, 200, 5)
    c["sae_encode_mp_f64_b3_dm16_l64_k5_bdec"] = _sae(mp, "f64", 3, 16, 64, 5)

    # codebook.nearest
    c["codebook_nearest_f32_dot_b5_dm24_l300_k8"] = _cb("f32", "dot", 5, 24, 300, 8)
    c["codebook_nearest_f32_cosine_b5_dm24_l300_k8"] = _cb("f32", "cosine", 5, 24, 300, 8)
    c["codebook_nearest_f32_l2_b5_dm24_l300_k8"] = _cb("f32", "l2", 5, 24, 300, 8)
    c["codebook_nearest_f32_l2_dup_b4_dm16_l64_k4"] = _cb("f32", "l2", 4, 16, 64, 4,
                                                          draw="dup")
    c["codebook_nearest_f32_cosine_dup_b4_dm16_l64_k4"] = _cb("f32", "cosine", 4, 16, 64, 4,
                                                              draw="dup")
    c["codebook_nearest_f32_dot_b3_dm8_l5_k5"] = _cb("f32", "dot", 3, 8, 5, 5)
    c["codebook_nearest_f32_l2_b2_dm7_l33_k1"] = _cb("f32", "l2", 2, 7, 33, 1)
    c["codebook_nearest_f32_cosine_b1_dm13_l1000_k16"] = _cb("f32", "cosine", 1, 13, 1000, 16)
    c["codebook_nearest_f16_cosine_b4_dm32_l200_k6"] = _cb("f16", "cosine", 4, 32, 200, 6)
    c["codebook_nearest_f64_l2_b3_dm16_l64_k4"] = _cb("f64", "l2", 3, 16, 64, 4)
    return c


CASES = _cases()


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------
def _rng_key(key):
    return np.random.Generator(np.random.PCG64(zlib.crc32(key.encode()) + 12345))


def _round(x64, dtype):
    """float64 numpy -> torch tensor rounded to `dtype` (kept in that dtype)."""
    return torch.from_numpy(np.ascontiguousarray(x64)).to(TORCH_DTYPE[dtype])


def _acc(dtype):
    return F64 if dtype == "f64" else torch.float32


def _params(**kw):
    return json.dumps(kw, separators=(",", ":"))


def _source(what):
    return f"torch {torch.__version__.split('+')[0]} {what}"


def _draw(name, draw_fn, accept_fn, tries=200):
    """The first accepted draw from the seeds name, name#1, name#2, ..."""
    for attempt in range(tries):
        key = name if attempt == 0 else f"{name}#{attempt}"
        d = draw_fn(_rng_key(key))
        if accept_fn(d):
            return d
    raise RuntimeError(f"{name}: no accepted draw in {tries} tries")


def _stable_topk(z, k, largest=True):
    """Top k along the last axis, ties by the lower index first."""
    vals, idx = torch.sort(z, dim=-1, descending=largest, stable=True)
    vals, idx = vals[..., :k], idx[..., :k]
    tv = torch.topk(z, k, dim=-1, largest=largest).values
    assert torch.equal(vals, tv), "stable sort and torch.topk disagree on values"
    return vals, idx


def _inf_safe(got, want):
    """Infinite entries must agree exactly; replace them by 0 in both so that
    the ratio of the finite ones can be computed."""
    got, want = got.to(F64).clone(), want.to(F64).clone()
    inf = torch.isinf(got) | torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), "infinite entries differ"
    got[inf] = 0.0
    want[inf] = 0.0
    return got, want


def _check_indices_point(values64, indices, input64):
    """The stored indices point at their values (float64, exact)."""
    got = torch.gather(input64, -1, indices.long())
    assert torch.equal(got, values64), "reference indices do not point at their values"


# --------------------------------------------------------------------------
# topk.rows
# --------------------------------------------------------------------------
def _draw_topk(name, spec):
    rng = _rng_key(name)
    R, N = spec["R"], spec["N"]
    x = rng.standard_normal((R, N))
    ints = rng.integers(0, 10, (R, N)).astype(np.float64)
    mask = rng.uniform(0.0, 1.0, (R, N)) < 0.4
    if spec["draw"] == "ties":
        x = ints
    elif spec["draw"] == "neginf":
        assert R >= 2 and N >= 4 and spec["k"] > 3
        x[mask] = -np.inf
        x[0, :] = -np.inf
        x[1, :] = -np.inf
        x[1, [1, N // 2, N - 2]] = rng.standard_normal(3)
    return _round(x, spec["dtype"])


def _emu_topk_blocked(x, k, largest, tile=16):
    """Tile-by-tile top-k of each column block, merged into a running top-k."""
    R, N = x.shape
    cv = x[:, :0]
    ci = torch.zeros((R, 0), dtype=torch.long)
    for c0 in range(0, N, tile):
        blk = x[:, c0:c0 + tile]
        v, i = torch.topk(blk, min(k, blk.shape[1]), dim=1, largest=largest)
        cv = torch.cat([cv, v], 1)
        ci = torch.cat([ci, i + c0], 1)
        v, j = torch.topk(cv, min(k, cv.shape[1]), dim=1, largest=largest)
        cv, ci = v, ci.gather(1, j)
    return cv, ci


def build_topk(name, spec):
    dt, k, largest = spec["dtype"], spec["k"], spec["largest"]
    x = _draw_topk(name, spec)
    x64 = x.to(F64)
    vals, idx = _stable_topk(x64, k, largest)
    _check_indices_point(vals, idx, x64)
    tdt = TORCH_DTYPE[dt]
    tensors = {"in.x": x, "out.values": vals.to(tdt), "out.indices": idx.to(I32)}
    meta = {"op": spec["op"], "source": _source("float64 stable sort")}
    meta["params"] = (_params(k=k, largest=largest) if spec["params"] == "explicit"
                      else _params(k=k))
    if spec["params"] != "explicit":
        assert largest
    ev, ei = _emu_topk_blocked(x.to(_acc(dt)), k, largest)
    at = torch.gather(x64, 1, ei)
    checks = [("values", *_inf_safe(ev.to(tdt), tensors["out.values"])),
              ("values at indices", *_inf_safe(ev.to(tdt), at))]
    return tensors, meta, checks


# --------------------------------------------------------------------------
# SAE inputs and encoders.
# --------------------------------------------------------------------------
def _sae_raw(rng, spec):
    """All draws of an SAE case, in this order, whether used or not."""
    B, Dm, L = spec["B"], spec["Dm"], spec["L"]
    d = {}
    d["x"] = rng.standard_normal((B, Dm))
    d["w_enc"] = rng.standard_normal((L, Dm)) / np.sqrt(Dm)
    d["b_enc"] = 0.1 * rng.standard_normal(L)
    d["b_dec"] = 0.1 * rng.standard_normal(Dm)
    d["w_dec"] = rng.standard_normal((L, Dm)) / np.sqrt(Dm)
    d["d_xhat"] = rng.standard_normal((B, Dm))
    d["threshold"] = rng.uniform(0.5, 1.5, L)
    d["u"] = rng.uniform(0.0, 1.0, L)  # spare uniforms (b_enc of the exact case)
    return d


def _draw_sae(rng, spec):
    """Encoder inputs rounded to the case dtype (b_dec None when absent), with the
    variants described in the module docstring."""
    dt, draw = spec["dtype"], spec["draw"]
    d = _sae_raw(rng, spec)
    if draw == "sparse" and spec["op"] == "sae.encode_jumprelu":
        d["threshold"] = 2.0 + d["threshold"] - 0.5  # high thresholds instead
    elif draw == "sparse":
        d["b_enc"] = -2.2 + d["b_enc"]
    if draw == "exact":
        d["b_enc"] = 0.3 + 0.7 * d["u"]
    out = {n: _round(d[n], dt) for n in ("x", "w_enc", "b_enc", "b_dec", "w_dec", "d_xhat",
                                         "threshold")}
    if not spec["bdec"]:
        out["b_dec"] = None
    if draw in ("sparse", "exact"):
        # Row 0 of x is b_dec (zeros without it): pre[0] = b_enc exactly.
        out["x"][0] = out["b_dec"] if out["b_dec"] is not None else 0.0
    if draw == "exact":
        thr = out["b_enc"].clone()
        thr[1::3] = 0.0
        thr[2::3] = _round(d["b_enc"][2::3] - 0.25, dt).to(thr.dtype)
        out["threshold"] = thr
    return out


def _pre64(p):
    """Dense float64 pre-activations, (x - b_dec) . w_enc[l] + b_enc[l], as an
    explicit product-and-sum (no GEMM)."""
    x = p["x"].to(F64)
    if p["b_dec"] is not None:
        x = x - p["b_dec"].to(F64)
    w = p["w_enc"].to(F64)
    return (x[:, None, :] * w[None, :, :]).sum(-1) + p["b_enc"].to(F64)


def _emu_pre_tiles(p, acc, tile=64):
    """Yields (l0, pre tile) of a blocked GEMM in the accumulation dtype."""
    x = p["x"].to(acc)
    if p["b_dec"] is not None:
        x = x - p["b_dec"].to(acc)
    w, b = p["w_enc"].to(acc), p["b_enc"].to(acc)
    L = w.shape[0]
    for l0 in range(0, L, tile):
        yield l0, x @ w[l0:l0 + tile].T + b[l0:l0 + tile]


def _emu_encode(p, k, acc):
    """Running top-k of relu(pre) over latent tiles."""
    B = p["x"].shape[0]
    cv = torch.zeros((B, 0), dtype=acc)
    ci = torch.zeros((B, 0), dtype=torch.long)
    for l0, pre in _emu_pre_tiles(p, acc):
        z = torch.relu(pre)
        cv = torch.cat([cv, z], 1)
        ci = torch.cat([ci, torch.arange(l0, l0 + z.shape[1]).expand(B, -1)], 1)
        v, j = torch.topk(cv, min(k, cv.shape[1]), dim=1)
        cv, ci = v, ci.gather(1, j)
    return cv, ci


def _csr_from_mask(vals64, keep):
    """CSR of the kept entries, each row descending, lower index first among ties."""
    B = vals64.shape[0]
    indptr, inds, vals = [0], [], []
    for b in range(B):
        cols = torch.nonzero(keep[b]).flatten()
        v = vals64[b, cols]
        order = torch.sort(v, descending=True, stable=True).indices
        inds.append(cols[order])
        vals.append(v[order])
        indptr.append(indptr[-1] + len(cols))
    return (torch.tensor(indptr, dtype=I32), torch.cat(inds).to(I32), torch.cat(vals))


def _batch_topk_keep(z, k):
    """Mask of the B*k largest of z (stable by flat index) that are > 0."""
    B, L = z.shape
    flat = z.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[:B * k]
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order] = True
    keep &= flat > 0
    return keep.reshape(B, L)


def _accept_batch_topk(p, spec):
    pre = _pre64(p)
    B = pre.shape[0]
    rows = torch.ones(B, dtype=torch.bool)
    if spec["draw"] == "sparse":
        rows[0] = False  # the exact all-zero row
    z = torch.relu(pre)
    t = B * spec["k"]
    s = torch.sort(z.reshape(-1), descending=True).values
    npos = int((s > 0).sum())
    if npos >= t:
        if t < s.numel() and s[t - 1] - s[t] <= SELECT_MARGIN:
            return False
    else:
        if (pre[rows].abs() <= SELECT_MARGIN).any():
            return False
    kept = s[:min(t, npos)]
    if kept.numel() and kept.min() <= SELECT_MARGIN:
        return False
    if spec["draw"] == "sparse" and npos >= t:
        return False  # the sparse cases must have fewer positives than B*k
    return True


def _accept_jumprelu(p, spec):
    pre = _pre64(p)
    thr = p["threshold"].to(F64)
    gap = (pre - thr).abs()
    if spec["draw"] == "exact":
        gap = gap[1:]
    if (gap <= SELECT_MARGIN).any():
        return False
    if spec["draw"] == "sparse":
        counts = (pre > thr).sum(1)
        return bool((counts == 0).any() and (counts > 0).any())
    return True


def _emu_batch_topk(p, k, acc):
    B, L = p["x"].shape[0], p["w_enc"].shape[0]
    kk = min(L, B * k)
    cv, ci = _emu_encode(p, kk, acc)  # per-row candidates
    flat = cv.reshape(-1)
    sel = torch.topk(flat, min(B * k, flat.numel())).indices
    keep = torch.zeros((B, L), dtype=torch.bool)
    zv = torch.zeros((B, L), dtype=acc)
    rows = sel // kk
    cols = ci.reshape(-1)[sel]
    vals = flat[sel]
    pos = vals > 0
    keep[rows[pos], cols[pos]] = True
    zv[rows[pos], cols[pos]] = vals[pos]
    return keep, zv


def _emu_jumprelu(p, acc):
    thr = p["threshold"].to(acc)
    parts_keep, parts_val = [], []
    for l0, pre in _emu_pre_tiles(p, acc):
        t = thr[l0:l0 + pre.shape[1]]
        parts_keep.append(pre > t)
        parts_val.append(pre)
    return torch.cat(parts_keep, 1), torch.cat(parts_val, 1)


def _csr_checks(dt, ref, emu, pre_at):
    """Checks of a CSR output: indptr exact, values, values at the emulation's indices."""
    (rip, rind, rval), (eip, eind, evl) = ref, emu
    assert torch.equal(rip, eip), f"CSR row counts differ: {rip.tolist()} vs {eip.tolist()}"
    tdt = TORCH_DTYPE[dt]
    rows = torch.repeat_interleave(torch.arange(len(eip) - 1), eip[1:] - eip[:-1])
    at = pre_at[rows, eind.long()]
    return [("indptr", eip.to(F64), rip.to(F64)),
            ("values", evl.to(tdt), rval.to(tdt)),
            ("values at indices", evl.to(tdt), at)]


def build_sae_encoders(name, spec):
    dt, op = spec["dtype"], spec["op"]
    acc, tdt = _acc(dt), TORCH_DTYPE[dt]
    if op == "sae.encode_batch_topk":
        p = _draw(name, lambda r: _draw_sae(r, spec), lambda p: _accept_batch_topk(p, spec))
    elif op == "sae.encode_jumprelu":
        p = _draw(name, lambda r: _draw_sae(r, spec), lambda p: _accept_jumprelu(p, spec))
    else:
        p = _draw_sae(_rng_key(name), spec)
    tensors = {"in.x": p["x"], "in.w_enc": p["w_enc"], "in.b_enc": p["b_enc"]}
    if p["b_dec"] is not None:
        tensors["in.b_dec"] = p["b_dec"]
    meta = {"op": op}
    pre = _pre64(p)
    z = torch.relu(pre)
    if op == "sae.encode":
        k = spec["k"]
        vals, idx = _stable_topk(z, k)
        _check_indices_point(vals, idx, z)
        if spec["draw"] == "sparse":
            assert (vals == 0).any() and bool((vals[0] == 0).all()), name
            assert idx[0].tolist() == list(range(k)), name
        tensors["out.values"] = vals.to(tdt)
        tensors["out.indices"] = idx.to(I32)
        meta["params"] = _params(k=k)
        meta["source"] = _source("float64 dense pre-activations, relu, stable top-k")
        ev, ei = _emu_encode(p, k, acc)
        checks = [("values", ev.to(tdt), tensors["out.values"]),
                  ("values at indices", ev.to(tdt), torch.gather(z, 1, ei))]
    elif op == "sae.encode_batch_topk":
        k = spec["k"]
        keep = _batch_topk_keep(z, k)
        ref = _csr_from_mask(z, keep)
        if spec["draw"] == "sparse":
            assert ref[0][1] == 0, name  # row 0 is empty
        ekeep, ez = _emu_batch_topk(p, k, acc)
        emu = _csr_from_mask(ez, ekeep)
        meta["params"] = _params(k=k)
        meta["source"] = _source("float64 dense pre-activations, relu, batch top-k")
        checks = _csr_checks(dt, ref, emu, z)
    else:
        tensors["in.threshold"] = p["threshold"]
        thr = p["threshold"].to(F64)
        assert (thr >= 0).all()
        keep = pre > thr
        ref = _csr_from_mask(pre, keep)
        if spec["draw"] == "exact":
            L = spec["L"]
            want0 = [l for l in range(L) if l % 3 != 0]
            assert sorted(ref[1][:ref[0][1]].tolist()) == want0, name
        ekeep, epre = _emu_jumprelu(p, acc)
        emu = _csr_from_mask(epre, ekeep)
        meta["source"] = _source("float64 dense pre-activations, jumprelu")
        checks = _csr_checks(dt, ref, emu, pre)
    if op != "sae.encode":
        indptr, inds, vals = ref
        tensors["out.indptr"] = indptr
        tensors["out.indices"] = inds
        tensors["out.values"] = vals.to(tdt)
    return tensors, meta, checks


# --------------------------------------------------------------------------
# sae.decode
# --------------------------------------------------------------------------
def _draw_decode(name, spec):
    rng = _rng_key(name)
    B, Dm, L, k = spec["B"], spec["Dm"], spec["L"], spec["k"]
    w_dec = 2.0 * rng.standard_normal((L, Dm)) / np.sqrt(Dm)
    b_dec = 0.1 * rng.standard_normal(Dm)
    values = rng.uniform(0.0, 2.0, (B, k))
    values[rng.uniform(0.0, 1.0, (B, k)) < 0.1] = 0.0
    if spec["draw"] == "rep":
        few = rng.choice(L, size=min(L, 5), replace=False)
        idx = few[rng.integers(0, len(few), (B, k))]
        idx[0, :] = few[0]
    else:
        idx = np.stack([rng.choice(L, size=k, replace=False) for _ in range(B)])
    dt = spec["dtype"]
    return dict(indices=torch.from_numpy(idx.astype(np.int32)), values=_round(values, dt),
                w_dec=_round(w_dec, dt), b_dec=_round(b_dec, dt) if spec["bdec"] else None)


def decode64(indices, values, w_dec, b_dec):
    x_hat = F.embedding_bag(indices.long(), w_dec.to(F64), mode="sum",
                            per_sample_weights=values.to(F64))
    return x_hat + b_dec.to(F64) if b_dec is not None else x_hat


def _emu_decode(indices, values, w_dec, b_dec, acc):
    """Gather-and-accumulate over the k slots, in the accumulation dtype."""
    B, k = indices.shape
    w, v = w_dec.to(acc), values.to(acc)
    out = torch.zeros((B, w.shape[1]), dtype=acc)
    for j in range(k):
        out = out + v[:, j:j + 1] * w[indices[:, j].long()]
    return out + b_dec.to(acc) if b_dec is not None else out


def build_decode(name, spec):
    dt = spec["dtype"]
    p = _draw_decode(name, spec)
    if spec["draw"] == "rep":
        assert len(set(p["indices"][0].tolist())) == 1
    tensors = {"in.indices": p["indices"], "in.values": p["values"], "in.w_dec": p["w_dec"]}
    if p["b_dec"] is not None:
        tensors["in.b_dec"] = p["b_dec"]
    x_hat = decode64(p["indices"], p["values"], p["w_dec"], p["b_dec"])
    # embedding_bag equals the dense sum (float64, to rounding).
    dense = (p["values"].to(F64)[:, :, None] * p["w_dec"].to(F64)[p["indices"].long()]).sum(1)
    if p["b_dec"] is not None:
        dense = dense + p["b_dec"].to(F64)
    assert torch.allclose(dense, x_hat, rtol=1e-13, atol=1e-13), name
    tdt = TORCH_DTYPE[dt]
    tensors["out.x_hat"] = x_hat.to(tdt)
    meta = {"op": spec["op"], "source": _source("float64 embedding_bag")}
    e = _emu_decode(p["indices"], p["values"], p["w_dec"], p["b_dec"], _acc(dt))
    return tensors, meta, [("x_hat", e.to(tdt), tensors["out.x_hat"])]


# --------------------------------------------------------------------------
# sae.backward
# --------------------------------------------------------------------------
BWD_GRADS = ("w_dec", "b_dec", "w_enc", "b_enc", "x")


def ref_sae_backward(p, indices, values, d_xhat, recompute=False):
    """float64 autograd of sum(x_hat * d_xhat). The decoder uses the given values
    (forward); the encoder gradient flows through relu(pre_sel) with the ReLU
    mask of the given values. With `recompute`, v = relu(pre_sel) instead (the
    other reading of the contract; used only to assert both agree)."""
    Dm = p["x"].shape[1]
    t = {n: p[n].to(F64).clone().requires_grad_(True)
         for n in ("x", "w_enc", "b_enc", "w_dec")}
    b_dec = p["b_dec"].to(F64) if p["b_dec"] is not None else torch.zeros(Dm, dtype=F64)
    t["b_dec"] = b_dec.clone().requires_grad_(True)
    idx = indices.long()
    v_given = values.to(F64)
    xc = t["x"] - t["b_dec"]
    pre_sel = (xc[:, None, :] * t["w_enc"][idx]).sum(-1) + t["b_enc"][idx]
    if recompute:
        v = torch.relu(pre_sel)
    else:
        m = (v_given > 0).to(F64)
        enc = m * pre_sel
        v = v_given + (enc - enc.detach())
    x_hat = (v[:, :, None] * t["w_dec"][idx]).sum(1) + t["b_dec"]
    (x_hat * d_xhat.to(F64)).sum().backward()
    return {n: t[n].grad for n in BWD_GRADS}


def emu_sae_backward(p, indices, values, d_xhat, acc):
    """The hand-written backward (see the module docstring) with index_add."""
    B, Dm = p["x"].shape
    L = p["w_enc"].shape[0]
    k = indices.shape[1]
    idx = indices.long()
    flat = idx.reshape(-1)
    x, w_enc, w_dec = p["x"].to(acc), p["w_enc"].to(acc), p["w_dec"].to(acc)
    b_dec = p["b_dec"].to(acc) if p["b_dec"] is not None else torch.zeros(Dm, dtype=acc)
    v, g = values.to(acc), d_xhat.to(acc)
    xc = x - b_dec
    dv = torch.einsum("bd,bkd->bk", g, w_dec[idx]) * (v > 0).to(acc)
    dw_dec = torch.zeros((L, Dm), dtype=acc).index_add_(
        0, flat, (v[:, :, None] * g[:, None, :]).reshape(B * k, Dm))
    db_enc = torch.zeros(L, dtype=acc).index_add_(0, flat, dv.reshape(-1))
    dw_enc = torch.zeros((L, Dm), dtype=acc).index_add_(
        0, flat, (dv[:, :, None] * xc[:, None, :]).reshape(B * k, Dm))
    dx = torch.einsum("bk,bkd->bd", dv, w_enc[idx])
    db_dec = g.sum(0) - dx.sum(0)
    return dict(w_dec=dw_dec, b_dec=db_dec, w_enc=dw_enc, b_enc=db_enc, x=dx)


def build_backward(name, spec):
    dt = spec["dtype"]
    tdt, acc = TORCH_DTYPE[dt], _acc(dt)
    rtol, atol = DEFAULT_TOL[dt]
    p = _draw_sae(_rng_key(name), spec)
    z = torch.relu(_pre64(p))
    vals64, idx = _stable_topk(z, spec["k"])
    indices, values = idx.to(I32), vals64.to(tdt)
    if spec["draw"] == "sparse":
        assert (values == 0).any() and (values > 0).any(), name
    tensors = {"in.x": p["x"], "in.w_enc": p["w_enc"], "in.b_enc": p["b_enc"]}
    if p["b_dec"] is not None:
        tensors["in.b_dec"] = p["b_dec"]
    tensors.update({"in.w_dec": p["w_dec"], "in.indices": indices, "in.values": values,
                    "in.d_xhat": p["d_xhat"]})
    grads = ref_sae_backward(p, indices, values, p["d_xhat"])
    # The other reading (values recomputed by the encoder) gives the same gradients:
    # to rounding in F64, within the case tolerance otherwise.
    rec = ref_sae_backward(p, indices, values, p["d_xhat"], recompute=True)
    p64 = {n: (v.to(F64) if v is not None else None) for n, v in p.items()}
    emu64 = emu_sae_backward(p64, indices, values, p["d_xhat"], F64)
    for n in BWD_GRADS:
        assert _ratio(emu64[n], grads[n], 1e-12, 1e-12) <= 1.0, (name, n)
        if dt == "f64":
            assert _ratio(rec[n], grads[n], 1e-12, 1e-12) <= 1.0, (name, n)
        else:
            assert _ratio(rec[n].to(tdt), grads[n].to(tdt), rtol, atol) <= 1.0, (name, n)
    emu = emu_sae_backward(p, indices, values, p["d_xhat"], acc)
    checks = []
    for n in BWD_GRADS:
        tensors["out.d" + n] = grads[n].to(tdt)
        checks.append(("d" + n, emu[n].to(tdt), tensors["out.d" + n]))
    meta = {"op": spec["op"], "source": _source("autograd float64")}
    return tensors, meta, checks


def _ratio(got, want, rtol, atol):
    got, want = got.to(F64), want.to(F64)
    return float(((got - want).abs() / (atol + rtol * want.abs())).max())


# --------------------------------------------------------------------------
# sae.encode_mp
# --------------------------------------------------------------------------
def _draw_mp(rng, spec):
    B, Dm, L, dt = spec["B"], spec["Dm"], spec["L"], spec["dtype"]
    x = rng.standard_normal((B, Dm))
    w = rng.standard_normal((L, Dm))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    b_dec = 0.1 * rng.standard_normal(Dm)
    return dict(x=_round(x, dt), w_dec=_round(w, dt),
                b_dec=_round(b_dec, dt) if spec["bdec"] else None)


def mp64(p, k, margins=None):
    """Matching pursuit, float64 loop with the scores recomputed at every step."""
    x, w = p["x"].to(F64), p["w_dec"].to(F64)
    r = x - p["b_dec"].to(F64) if p["b_dec"] is not None else x.clone()
    B = r.shape[0]
    vals = torch.zeros((B, k), dtype=F64)
    inds = torch.zeros((B, k), dtype=torch.long)
    for t in range(k):
        for b in range(B):
            dots = (r[b][None, :] * w).sum(-1)
            s = torch.sort(dots, descending=True, stable=True)
            j = int(s.indices[0])
            if margins is not None and len(dots) > 1:
                margins.append(float(s.values[0] - s.values[1]))
            c = dots[j]
            vals[b, t], inds[b, t] = c, j
            r[b] = r[b] - c * w[j]
    return vals, inds, r


def _emu_mp(p, k, acc):
    """Matching pursuit with the scores updated through the Gram matrix."""
    x, w = p["x"].to(acc), p["w_dec"].to(acc)
    r = x - p["b_dec"].to(acc) if p["b_dec"] is not None else x.clone()
    dots = r @ w.T
    G = w @ w.T
    B = r.shape[0]
    vals = torch.zeros((B, k), dtype=acc)
    inds = torch.zeros((B, k), dtype=torch.long)
    rows = torch.arange(B)
    for t in range(k):
        j = torch.argmax(dots, dim=1)
        c = dots[rows, j]
        vals[:, t], inds[:, t] = c, j
        r = r - c[:, None] * w[j]
        dots = dots - c[:, None] * G[j]
    return vals, inds, r


def build_mp(name, spec):
    dt, k = spec["dtype"], spec["k"]
    tdt = TORCH_DTYPE[dt]

    def accept(p):
        margins = []
        mp64(p, k, margins)
        return min(margins) > MP_MARGIN

    p = _draw(name, lambda r: _draw_mp(r, spec), accept)
    vals, inds, res = mp64(p, k)
    tensors = {"in.x": p["x"], "in.w_dec": p["w_dec"]}
    if p["b_dec"] is not None:
        tensors["in.b_dec"] = p["b_dec"]
    tensors.update({"out.values": vals.to(tdt), "out.indices": inds.to(I32),
                    "out.residual": res.to(tdt)})
    meta = {"op": spec["op"], "params": _params(k=k),
            "source": _source("float64 matching pursuit loop")}
    ev, ei, er = _emu_mp(p, k, _acc(dt))
    assert torch.equal(ei, inds), f"{name}: emulated selection differs"
    checks = [("values", ev.to(tdt), tensors["out.values"]),
              ("residual", er.to(tdt), tensors["out.residual"])]
    return tensors, meta, checks


# --------------------------------------------------------------------------
# codebook.nearest
# --------------------------------------------------------------------------
DUP = 4


def _draw_codebook(name, spec):
    rng = _rng_key(name)
    B, Dm, L, dt = spec["B"], spec["Dm"], spec["L"], spec["dtype"]
    x = rng.standard_normal((B, Dm))
    cb = rng.standard_normal((L, Dm)) * rng.uniform(0.5, 2.0, (L, 1))
    noise = 0.05 * rng.standard_normal((B, Dm))
    if spec["draw"] == "dup":
        assert L >= 2 * DUP
        factor = 2.0 if spec["metric"] == "cosine" else 1.0
        cb[L - DUP:] = factor * cb[:DUP]
        x = 0.7 * cb[np.arange(B) % DUP] + noise
    return _round(x, dt), _round(cb, dt)


def scores64(x, cb, metric):
    x, cb = x.to(F64), cb.to(F64)
    if metric == "l2":
        return ((x[:, None, :] - cb[None, :, :]) ** 2).sum(-1)
    dot = (x[:, None, :] * cb[None, :, :]).sum(-1)
    if metric == "dot":
        return dot
    assert metric == "cosine"
    nx = torch.sqrt((x * x).sum(-1))
    nc = torch.sqrt((cb * cb).sum(-1))
    return dot / (nx[:, None] * nc[None, :])


def _emu_scores(x, cb, metric, acc):
    x, cb = x.to(acc), cb.to(acc)
    if metric == "dot":
        return x @ cb.T
    if metric == "cosine":
        return (x / x.norm(dim=1, keepdim=True)) @ (cb / cb.norm(dim=1, keepdim=True)).T
    return (x * x).sum(1)[:, None] - 2.0 * (x @ cb.T) + (cb * cb).sum(1)[None, :]


def build_codebook(name, spec):
    dt, k, metric = spec["dtype"], spec["k"], spec["metric"]
    tdt = TORCH_DTYPE[dt]
    x, cb = _draw_codebook(name, spec)
    largest = metric != "l2"
    s = scores64(x, cb, metric)
    vals, idx = _stable_topk(s, k, largest)
    _check_indices_point(vals, idx, s)
    if spec["draw"] == "dup":
        L = spec["L"]
        for b in range(spec["B"]):
            j = b % DUP
            assert idx[b, :2].tolist() == [j, L - DUP + j], (name, idx[b].tolist())
            assert vals[b, 0] == vals[b, 1], name
    tensors = {"in.x": x, "in.codebook": cb, "out.scores": vals.to(tdt),
               "out.indices": idx.to(I32)}
    meta = {"op": spec["op"], "params": _params(k=k, metric=metric),
            "source": _source("float64 dense scores, stable top-k")}
    es = _emu_scores(x, cb, metric, _acc(dt))
    ev, ei = torch.topk(es, k, dim=1, largest=largest)
    checks = [("scores", ev.to(tdt), tensors["out.scores"]),
              ("scores at indices", ev.to(tdt), torch.gather(s, 1, ei))]
    return tensors, meta, checks


# --------------------------------------------------------------------------
def build(name, spec):
    op = spec["op"]
    if op == "topk.rows":
        return build_topk(name, spec)
    if op in ("sae.encode", "sae.encode_batch_topk", "sae.encode_jumprelu"):
        return build_sae_encoders(name, spec)
    if op == "sae.decode":
        return build_decode(name, spec)
    if op == "sae.backward":
        return build_backward(name, spec)
    if op == "sae.encode_mp":
        return build_mp(name, spec)
    if op == "codebook.nearest":
        return build_codebook(name, spec)
    raise ValueError(f"{name}: unknown op {op}")
