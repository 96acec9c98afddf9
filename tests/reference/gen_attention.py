"""Reference cases of the fused-attention family: ``attention.forward``,
``attention.backward`` and ``attention.top_keys`` (CASES.md, "Fused attention").

Loaded by ``generate.py`` (see ``FAMILY_MODULES`` there); this module gives
``CASES`` (name -> spec), ``build(name, spec)`` -> (tensors, meta, checks) and
``PENDING`` (the ops whose Rust side has not landed: their files are written
only with ``generate.py --pending``).

Layouts: ``q [B, Sq, Hq, D]``, ``k [B, Sk, Hk, D]``, ``v [B, Sk, Hk, Dv]``,
``o``/``do [B, Sq, Hq, Dv]``, ``lse [B, Hq, Sq]``, ``alibi_slopes [Hq]``,
``bias [Bb, Hb, Sq, Sk]`` (Bb in {1, B}, Hb in {1, Hq}), ``cu_seqlens_q``,
``cu_seqlens_k [N+1]`` I32 (packed variable-length batches, then B = 1 and the
S axes hold the packed sequences one after the other). Query head h reads KV
head ``h // (Hq / Hk)`` (Hq a multiple of Hk).

The references are computed here in float64, independently of the Rust code:

* ``attention.forward`` (``source``: "torch VERSION float64 naive attention,
  cross-checked with scaled_dot_product_attention", without the second part
  in the softcap cases): the full score matrix per
  (batch, query head), in this order: ``s = scale * q.k`` (``scale`` null or
  absent = ``1/sqrt(D)``, D the head dim of q and k, not Dv); with ``softcap``
  > 0, ``s = softcap * tanh(s / softcap)``; with ``in.alibi_slopes``,
  ``s -= slope[h] * |i + Sk - Sq - j|``; with ``in.bias``, ``s += bias``
  (broadcast over Bb = 1 / Hb = 1); then the masks, aligned to the
  bottom-right corner: with ``causal`` query i sees key j only when
  ``j <= i + Sk - Sq``; ``window_left`` >= 0 requires
  ``j >= i + Sk - Sq - window_left``, ``window_right`` >= 0 requires
  ``j <= i + Sk - Sq + window_right`` (-1 = unbounded on that side; causal and
  a window both apply when both are given). With ``cu_seqlens``, a query only
  sees keys of its own sequence, and i, j, Sq, Sk in the ALiBi and mask
  formulas are the positions relative to the sequence start and that
  sequence's own lengths; ``bias`` is then indexed by the packed positions
  (``bias[0, h, cu_seqlens_q[n] + i, cu_seqlens_k[n] + j]``; its entries
  outside the sequences' diagonal blocks are never read). Sequences may be
  empty (equal consecutive cu_seqlens). ``o = softmax(s) v`` over the visible keys and
  ``lse = log(sum exp(s))`` over the visible keys (natural log). A query row
  that sees no key (causal with Sq > Sk, a narrow window, an empty key
  sequence) has ``o = 0`` and ``lse = -inf``; those cases carry the spec flag
  ``allow_neg_inf``. Wherever the scores can be written as an additive float
  mask (every case without softcap) the generator also runs
  ``torch.nn.functional.scaled_dot_product_attention`` in float64 with
  ``attn_mask`` = ALiBi + bias and -inf on the masked entries (and
  ``enable_gqa``) and asserts that it equals the naive ``o`` on every row
  that sees a key (to 1e-12).
* ``attention.backward`` (``source``: "torch VERSION autograd float64"):
  float64 autograd of ``sum(o * do)`` through the same naive forward, with
  q, k, v requiring grad (the KV heads are expanded to the query heads by
  indexing, so dk and dv come out summed over the query heads that share a KV
  head). Rows that see no key contribute nothing (their dq is 0; a key no
  query sees gets dk = dv = 0). Inputs: those of the forward plus ``in.o``
  (the forward output of the stored inputs, cast to the case dtype),
  ``in.do`` and ``in.lse`` (forward lse, F32); outputs ``out.dq``,
  ``out.dk``, ``out.dv`` in the dtypes of q, k, v. Where no row is empty and
  there is no softcap, the gradients are also asserted equal (to 1e-12) to
  float64 autograd through ``scaled_dot_product_attention``; in every
  backward case the FlashAttention-2 formulas of the self-check below, run in
  float64 from the exact o and lse, are asserted equal to the autograd result
  (to 1e-12).
* ``attention.top_keys`` (``source``: "torch VERSION float64 softmax, stable
  descending sort"): the exact softmax probabilities ``p = exp(s - lse)`` of
  the final scores (not renormalized over the kept keys), per (batch, query
  head, query row) the ``top`` visible keys with the largest p, in descending
  p (ties, which no case has, would go to the lower key index first).
  ``out.weights [B, Hq, Sq, top]`` F32 holds p, ``out.indices [B, Hq, Sq, top]``
  I32 the key positions: the index along the S axis of ``k`` (with
  ``cu_seqlens`` that is the packed position, ``cu_seqlens_k[n] + j``, not the
  position within the sequence). A row that sees fewer than ``top`` keys
  returns all its visible keys first (descending) and fills the remaining
  slots with weight 0 and index -1; a row that sees no key is all weight 0,
  index -1. Every visible key counts, even one whose p is tiny (no case has a
  p below 1e-30). ``top`` has no default (always in ``params``; 1 <= top,
  and top may exceed Sk). Inputs ``in.q``, ``in.k`` and the optional inputs
  (no v). To keep the selection unique, the generator asserts that along each
  row the sorted p of the first min(top + 1, visible) keys differ by more
  than 1e-5 relative (so a float32 implementation picks the same keys in the
  same order) and that the float32 emulation returns the same indices.

Dtypes: q, k, v, o, do, dq, dk, dv have the case dtype. The tensors the
contract lists as f32 (``alibi_slopes``, ``bias``, ``lse``, ``weights``) are F32
in F32/F16/BF16 cases and F64 in the F64 cases (as for the f32 parameters of
the scans, so that an F64 case can be checked at F64 tolerance).

Inputs are drawn in float64 from a fixed seed per description (numpy PCG64
seeded with ``crc32("attention:<desc>") + 12345``, where ``<desc>`` is the case
name without ``attention_<op>_`` and without a ``_top<n>`` suffix, so the
forward, backward and top_keys cases of one description see the same inputs),
rounded to the case dtype first; the reference is computed in float64 from the
rounded values and its outputs are cast to their dtype. Draws, in this order,
all made whether the case uses them or not: ``q``, ``k``, ``v`` standard
normal; ``do`` standard normal times 0.5; ``alibi_slopes`` uniform in
(0.05, 0.5); then ``bias`` (only where the case has one) standard normal times
0.5 in its broadcast shape.

Params are written with ``json.dumps`` in the key order causal, window_left,
window_right, softcap, scale, top; most cases write all keys, some only a
subset (the rest take the defaults: causal false, windows -1, softcap 0,
scale null), and the ``*_b2_sq5_sk3_h3_d7`` cases leave ``params`` out.

Self-check (what ``generate.py`` compares with the CASES.md default tolerance
of the case dtype; no case carries ``rtol``/``atol``): an emulation of the
implementation in float32 (float64 for F64 cases) from the stored, rounded
inputs:

* forward: a blocked online softmax (FlashAttention-2 style) per (batch,
  sequence) over key blocks of 16 with a running max ``m``, sum ``l`` and
  accumulator; masks and ALiBi computed per block from the sequence-local
  positions; ``o = acc / l`` and ``lse = m + log(l)``, or 0 and -inf where
  ``l = 0``. The -inf of lse must sit exactly where the reference has them
  (they are then left out of the ratio).
* backward: FlashAttention-2's formulas from the stored ``o`` (case dtype) and
  ``lse`` (F32): ``D = rowsum(do * o)``, ``P = exp(s - lse)`` on visible
  entries (0 elsewhere), ``dV = P^T dO``, ``dP = dO V^T``,
  ``dS = P * (dP - D)``, times ``1 - tanh(scale q.k / softcap)^2`` with
  softcap, ``dQ = scale dS K``, ``dK = scale dS^T Q``, dK and dV summed over
  the query heads of a KV head.
* top_keys: pass 1 is the emulated forward's lse; pass 2 walks the key blocks,
  ``p = exp(s - lse)``, and merges each block into a running top list.
"""

import json
import zlib

import numpy as np
import torch
import torch.nn.functional as F

PENDING = set()

TORCH_DTYPE = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}
F64 = torch.float64
KEY_BLOCK = 16  # key block of the emulated online softmax
DEFAULTS = dict(causal=False, window_left=-1, window_right=-1, softcap=0.0, scale=None)
PARAM_ORDER = ("causal", "window_left", "window_right", "softcap", "scale", "top")
OP_PREFIX = {
    "attention.forward": "attention_forward_",
    "attention.backward": "attention_backward_",
    "attention.top_keys": "attention_top_keys_",
}


# --------------------------------------------------------------------------
# Case list.
# --------------------------------------------------------------------------
def _num(x):
    return str(x).replace(".", "p")


def _desc(dtype, B, Sq, Sk, Hq, Hk, D, Dv, lens, prm, alibi, bias):
    if lens is not None:
        shape = "varlen_q{}_k{}".format("_".join(map(str, lens[0])), "_".join(map(str, lens[1])))
    else:
        shape = f"b{B}_sq{Sq}_sk{Sk}"
    d = f"{dtype}_{shape}_h{Hq}" + (f"_hk{Hk}" if Hk != Hq else "") + f"_d{D}"
    d += f"_dv{Dv}" if Dv != D else ""
    p = prm or {}
    if p.get("causal"):
        d += "_causal"
    if p.get("window_left", -1) >= 0:
        d += f"_wl{p['window_left']}"
    if p.get("window_right", -1) >= 0:
        d += f"_wr{p['window_right']}"
    if p.get("softcap", 0.0):
        d += f"_softcap{_num(p['softcap'])}"
    if p.get("scale") is not None:
        d += f"_scale{_num(p['scale'])}"
    if alibi:
        d += "_alibi"
    if bias is not None:
        d += "_bias" + bias
    return d


def _params(full=True, **kw):
    """The params dict to write: all keys (defaults filled in) or only `kw`."""
    base = dict(DEFAULTS) if full else {}
    base.update(kw)
    return {k: base[k] for k in PARAM_ORDER if k in base}


def _cases():
    cases = {}

    def add(ops, dtype, B, Sq, Sk, Hq, Hk, D, Dv=None, prm="full", lens=None, alibi=False,
            bias=None, top=None, **kw):
        """ops: string of f (forward), b (backward), t (top_keys).
        prm: "full" = all keys with the defaults updated by kw; "omit" = no params key;
        "partial" = only the keys in kw."""
        Dv = D if Dv is None else Dv
        if lens is not None:
            assert B == 1 and Sq == sum(lens[0]) and Sk == sum(lens[1])
            assert len(lens[0]) == len(lens[1])
        params = None if prm == "omit" else _params(full=(prm == "full"), **kw)
        assert prm != "omit" or not kw
        desc = _desc(dtype, B, Sq, Sk, Hq, Hk, D, Dv, lens, params, alibi, bias)
        eff = dict(DEFAULTS)
        eff.update(params or {})
        for op_char, op in (("f", "attention.forward"), ("b", "attention.backward"),
                            ("t", "attention.top_keys")):
            if op_char not in ops:
                continue
            p = params
            name = OP_PREFIX[op] + desc
            if op == "attention.top_keys":
                assert top is not None
                p = dict(params or {}, top=top)
                name += f"_top{top}"
            spec = dict(op=op, dtype=dtype, B=B, Sq=Sq, Sk=Sk, Hq=Hq, Hk=Hk, D=D, Dv=Dv,
                        lens=lens, alibi=alibi, bias=bias, params=p, eff=dict(eff, top=top),
                        seed="attention:" + desc)
            assert name not in cases, name
            cases[name] = spec

    # ---- f32: the basic shape and each feature on it ----
    add("fb", "f32", 2, 17, 23, 2, 2, 16)                        # all params at their defaults
    add("t", "f32", 2, 17, 23, 2, 2, 16, prm="partial", top=4)   # {"top": 4} only
    add("fb", "f32", 2, 5, 3, 3, 3, 7, prm="omit")               # no params key, primes
    add("ft", "f32", 2, 17, 23, 2, 2, 16, causal=True, top=8)    # Sq < Sk (top 8 > row 0's 7 keys)
    add("fbt", "f32", 2, 23, 17, 2, 2, 16, causal=True, top=5)   # Sq > Sk: 6 empty rows
    add("f", "f32", 2, 17, 23, 2, 2, 16, prm="partial", window_left=5)  # left window only
    add("fb", "f32", 2, 23, 17, 2, 2, 16, window_left=2, window_right=1)  # both: empty rows
    add("fb", "f32", 2, 17, 23, 2, 2, 16, causal=True, window_left=6)    # local causal
    add("fb", "f32", 2, 17, 23, 2, 2, 16, softcap=2.0, scale=0.5)
    add("f", "f32", 2, 17, 23, 2, 2, 16, scale=0.3)
    add("f", "f32", 2, 17, 23, 2, 2, 16, alibi=True)
    add("t", "f32", 2, 17, 23, 2, 2, 16, alibi=True, bias="b1", top=4)
    add("fb", "f32", 2, 23, 17, 4, 2, 16, causal=True, alibi=True)       # GQA + ALiBi, empty rows
    # Bias in each broadcast form.
    add("f", "f32", 2, 9, 11, 2, 2, 8, bias="11")
    add("f", "f32", 2, 9, 11, 2, 2, 8, bias="b1")
    add("f", "f32", 2, 9, 11, 2, 2, 8, bias="1h")
    add("fb", "f32", 2, 9, 11, 2, 2, 8, causal=True, bias="bh")
    # GQA, MQA, Dv != D.
    add("ft", "f32", 2, 17, 23, 4, 2, 16, top=1)
    add("fb", "f32", 2, 17, 23, 4, 1, 8, Dv=24)                 # MQA, Dv > D
    add("fb", "f32", 2, 17, 23, 2, 2, 16, Dv=8)                 # Dv < D
    add("t", "f32", 1, 9, 11, 2, 2, 8, top=11)                   # top = Sk: every key, sorted
    # Packed variable-length sequences.
    add("f", "f32", 1, 17, 23, 2, 2, 16, lens=((5, 1, 11), (7, 3, 13)))
    add("fbt", "f32", 1, 20, 21, 4, 2, 16, lens=((5, 4, 11), (7, 1, 13)), causal=True, top=3)
    add("f", "f32", 1, 11, 11, 2, 2, 8, lens=((3, 2, 0, 6), (4, 0, 2, 5)))  # empty sequences
    add("fb", "f32", 1, 17, 23, 4, 2, 16, lens=((5, 1, 11), (7, 3, 13)), window_left=3,
        window_right=2, alibi=True, bias="1h")
    # Odd and tiny sizes.
    add("f", "f32", 3, 1, 13, 3, 3, 5, causal=True)              # decode: one query
    add("fbt", "f32", 1, 13, 1, 1, 1, 3, causal=True, top=2)     # one key: 12 empty rows; top > Sk
    add("f", "f32", 1, 1, 1, 1, 1, 1)
    # Larger: not a multiple of 64/128 tiles; head dim 256.
    add("f", "f32", 1, 130, 130, 1, 1, 64)
    add("b", "f32", 1, 130, 130, 1, 1, 64, Dv=32, causal=True)
    add("fb", "f32", 1, 5, 7, 2, 1, 256)
    # ---- f64 ----
    add("ft", "f64", 2, 17, 23, 2, 2, 16, causal=True, top=4)
    add("fb", "f64", 2, 23, 17, 4, 2, 8, Dv=12, causal=True, window_left=4, softcap=3.0,
        alibi=True, bias="bh")
    add("f", "f64", 1, 20, 21, 4, 1, 8, lens=((5, 4, 11), (7, 1, 13)), causal=True)
    # ---- f16 / bf16 (lse, bias, alibi_slopes F32) ----
    add("fb", "f16", 2, 17, 23, 2, 2, 16)
    add("fb", "f16", 2, 23, 17, 4, 2, 16, causal=True, softcap=3.0, alibi=True, bias="1h")
    add("f", "f16", 1, 130, 130, 2, 2, 64, causal=True)
    add("fb", "bf16", 2, 17, 23, 2, 2, 16, scale=0.3)
    add("fb", "bf16", 1, 20, 21, 4, 1, 16, lens=((5, 4, 11), (7, 1, 13)), causal=True,
        bias="11")
    add("t", "bf16", 2, 17, 23, 2, 2, 16, softcap=2.0, window_left=5, top=3)
    return cases


CASES = _cases()


# --------------------------------------------------------------------------
# Input drawing.
# --------------------------------------------------------------------------
def _rng_key(key):
    # As generate._rng_key (not imported: generate imports this module).
    return np.random.Generator(np.random.PCG64(zlib.crc32(key.encode()) + 12345))


def _round(x64, dtype):
    return torch.from_numpy(np.ascontiguousarray(x64)).to(TORCH_DTYPE[dtype])


def _pdtype(dt):
    """The dtype of the contract's f32 tensors in a case of dtype `dt`."""
    return "f64" if dt == "f64" else "f32"


def draw_inputs(spec):
    rng = _rng_key(spec["seed"])
    B, Sq, Sk, Hq, Hk, D, Dv = (spec[n] for n in ("B", "Sq", "Sk", "Hq", "Hk", "D", "Dv"))
    dt, pdt = spec["dtype"], _pdtype(spec["dtype"])
    x = {}
    x["q"] = _round(rng.standard_normal((B, Sq, Hq, D)), dt)
    x["k"] = _round(rng.standard_normal((B, Sk, Hk, D)), dt)
    x["v"] = _round(rng.standard_normal((B, Sk, Hk, Dv)), dt)
    x["do"] = _round(0.5 * rng.standard_normal((B, Sq, Hq, Dv)), dt)
    slopes = rng.uniform(0.05, 0.5, size=(Hq,))
    x["alibi_slopes"] = _round(slopes, pdt) if spec["alibi"] else None
    x["bias"] = None
    if spec["bias"] is not None:
        Bb = B if spec["bias"][0] == "b" else 1
        Hb = Hq if spec["bias"][1] == "h" else 1
        x["bias"] = _round(0.5 * rng.standard_normal((Bb, Hb, Sq, Sk)), pdt)
    x["cu_seqlens_q"] = x["cu_seqlens_k"] = None
    if spec["lens"] is not None:
        for n, ls in zip(("cu_seqlens_q", "cu_seqlens_k"), spec["lens"]):
            x[n] = torch.tensor(np.concatenate([[0], np.cumsum(ls)]), dtype=torch.int32)
    return x


def _scale(spec):
    s = spec["eff"]["scale"]
    return 1.0 / np.sqrt(spec["D"]) if s is None else float(s)


def _segments(spec):
    """(q_start, q_end, k_start, k_end) of each sequence (one per batch row when not packed)."""
    if spec["lens"] is None:
        return [(0, spec["Sq"], 0, spec["Sk"])]
    cq = np.concatenate([[0], np.cumsum(spec["lens"][0])])
    ck = np.concatenate([[0], np.cumsum(spec["lens"][1])])
    return [(int(cq[n]), int(cq[n + 1]), int(ck[n]), int(ck[n + 1])) for n in range(len(cq) - 1)]


# --------------------------------------------------------------------------
# The naive float64 reference.
# --------------------------------------------------------------------------
def visibility(spec):
    """vis [Sq, Sk] bool (query i may see key j) and rel [Sq, Sk] = i + Sk - Sq - j with
    sequence-local i, j and the sequence's own Sq, Sk (meaningful where vis)."""
    Sq, Sk, prm = spec["Sq"], spec["Sk"], spec["eff"]
    seq_q = torch.zeros(Sq, dtype=torch.int64)
    seq_k = torch.zeros(Sk, dtype=torch.int64)
    start_q = torch.zeros(Sq, dtype=torch.int64)
    start_k = torch.zeros(Sk, dtype=torch.int64)
    len_q = torch.full((Sq,), Sq, dtype=torch.int64)  # own sequence's lengths, per query row
    len_k = torch.full((Sq,), Sk, dtype=torch.int64)
    for n, (q0, q1, k0, k1) in enumerate(_segments(spec)):
        seq_q[q0:q1], start_q[q0:q1] = n, q0
        len_q[q0:q1], len_k[q0:q1] = q1 - q0, k1 - k0
        seq_k[k0:k1], start_k[k0:k1] = n, k0
    i = torch.arange(Sq) - start_q
    j = torch.arange(Sk) - start_k
    rel = (i + len_k - len_q)[:, None] - j[None, :]
    vis = seq_q[:, None] == seq_k[None, :]
    if prm["causal"]:
        vis &= rel >= 0
    if prm["window_left"] >= 0:
        vis &= rel <= prm["window_left"]
    if prm["window_right"] >= 0:
        vis &= rel >= -prm["window_right"]
    return vis, rel


def _kv_heads(spec):
    return torch.arange(spec["Hq"]) // (spec["Hq"] // spec["Hk"])


def extra_scores(spec, x, rel):
    """ALiBi + bias term [B or 1, Hq or 1, Sq, Sk] (float64) or None."""
    add = None
    if x["alibi_slopes"] is not None:
        add = -x["alibi_slopes"].to(F64)[None, :, None, None] * rel.abs().to(F64)[None, None]
    if x["bias"] is not None:
        b = x["bias"].to(F64)
        add = b if add is None else add + b
    return add


def naive_forward(spec, x, q, k, v):
    """float64, full score matrix. Returns o [B,Sq,Hq,Dv], lse [B,Hq,Sq], P [B,Hq,Sq,Sk]
    (probabilities, 0 on masked entries) and vis [Sq,Sk]."""
    prm = spec["eff"]
    vis, rel = visibility(spec)
    kh = _kv_heads(spec)
    kr, vr = k[:, :, kh], v[:, :, kh]  # expand KV heads to the query heads
    s = _scale(spec) * torch.einsum("bihd,bjhd->bhij", q, kr)
    if prm["softcap"] > 0:
        s = prm["softcap"] * torch.tanh(s / prm["softcap"])
    add = extra_scores(spec, x, rel)
    if add is not None:
        s = s + add
    s = torch.where(vis, s, -torch.inf)
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    lpos = l > 0
    safe_l = torch.where(lpos, l, torch.ones_like(l))
    P = p / safe_l
    o = torch.einsum("bhij,bjhd->bihd", P, vr)
    lse = torch.where(lpos, m + torch.log(safe_l), torch.full_like(l, -torch.inf))[..., 0]
    return o, lse, P, vis


def sdpa_forward(spec, x, q, k, v):
    """torch's scaled_dot_product_attention with the same masks/ALiBi/bias as a float mask."""
    vis, rel = visibility(spec)
    B, Sq, Sk, Hq = spec["B"], spec["Sq"], spec["Sk"], spec["Hq"]
    add = extra_scores(spec, x, rel)
    mask = torch.zeros(B, Hq, Sq, Sk, dtype=F64) if add is None else add.expand(B, Hq, Sq, Sk)
    mask = torch.where(vis, mask, -torch.inf)
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=_scale(spec), enable_gqa=spec["Hq"] != spec["Hk"])
    return o.transpose(1, 2)


def ref_backward(spec, x, do, fwd):
    qkv = [x[n].to(F64).clone().requires_grad_(True) for n in ("q", "k", "v")]
    o = fwd(spec, x, *qkv)
    o = o[0] if isinstance(o, tuple) else o
    (o * do.to(F64)).sum().backward()
    return [t.grad for t in qkv]


# --------------------------------------------------------------------------
# Emulations of an implementation (self-check).
# --------------------------------------------------------------------------
def _block_scores(spec, x, b, qs, qe, ks, ke, j0, j1, qh, acc):
    """Final scores [Hq, Lq, j1-j0] of a key block of one sequence (local positions),
    masked entries -inf, and the visible mask; also the pre-softcap scores."""
    prm = spec["eff"]
    Lq, Lk = qe - qs, ke - ks
    kh = _kv_heads(spec)
    kk = x["k"][b, ks + j0:ks + j1].to(acc)[:, kh].transpose(0, 1)  # [Hq, n, D]
    raw = _scale(spec) * (qh @ kk.transpose(-1, -2))
    s = raw
    if prm["softcap"] > 0:
        s = prm["softcap"] * torch.tanh(raw / prm["softcap"])
    ii = torch.arange(Lq)[:, None]
    jj = torch.arange(j0, j1)[None, :]
    diag = ii + Lk - Lq  # the key aligned with query ii (bottom-right)
    if x["alibi_slopes"] is not None:
        s = s - x["alibi_slopes"].to(acc)[:, None, None] * (diag - jj).abs().to(acc)
    if x["bias"] is not None:
        bb = x["bias"][min(b, x["bias"].shape[0] - 1), :, qs:qe, ks + j0:ks + j1].to(acc)
        s = s + bb
    ok = torch.ones(Lq, j1 - j0, dtype=torch.bool)
    if prm["causal"]:
        ok &= jj <= diag
    if prm["window_left"] >= 0:
        ok &= jj >= diag - prm["window_left"]
    if prm["window_right"] >= 0:
        ok &= jj <= diag + prm["window_right"]
    s = torch.where(ok, s, -torch.inf)
    return s, ok, raw


def emu_forward(spec, x, acc):
    """Blocked online softmax (key blocks of KEY_BLOCK) in `acc`."""
    B, Sq, Hq, Dv = spec["B"], spec["Sq"], spec["Hq"], spec["Dv"]
    kh = _kv_heads(spec)
    o = torch.zeros(B, Sq, Hq, Dv, dtype=acc)
    lse = torch.full((B, Hq, Sq), -torch.inf, dtype=acc)
    for b in range(B):
        for qs, qe, ks, ke in _segments(spec):
            Lq, Lk = qe - qs, ke - ks
            if Lq == 0:
                continue
            qh = x["q"][b, qs:qe].to(acc).transpose(0, 1)  # [Hq, Lq, D]
            m = torch.full((Hq, Lq), -torch.inf, dtype=acc)
            l = torch.zeros(Hq, Lq, dtype=acc)
            a = torch.zeros(Hq, Lq, Dv, dtype=acc)
            for j0 in range(0, Lk, KEY_BLOCK):
                j1 = min(j0 + KEY_BLOCK, Lk)
                s, _, _ = _block_scores(spec, x, b, qs, qe, ks, ke, j0, j1, qh, acc)
                vv = x["v"][b, ks + j0:ks + j1].to(acc)[:, kh].transpose(0, 1)  # [Hq, n, Dv]
                m_new = torch.maximum(m, s.amax(-1))
                m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
                alpha = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe[..., None])
                l = l * alpha + p.sum(-1)
                a = a * alpha[..., None] + p @ vv
                m = m_new
            pos = l > 0
            safe = torch.where(pos, l, torch.ones_like(l))
            o[b, qs:qe] = torch.where(pos[..., None], a / safe[..., None], 0.0).transpose(0, 1)
            lse[b, :, qs:qe] = torch.where(pos, m + torch.log(safe), -torch.inf)
    return o, lse


def emu_backward(spec, x, o, lse, do, acc):
    """FlashAttention-2 backward formulas in `acc` from the given o and lse."""
    prm = spec["eff"]
    B, Hq, Hk = spec["B"], spec["Hq"], spec["Hk"]
    kh = _kv_heads(spec)
    q, k, v = (x[n].to(acc) for n in ("q", "k", "v"))
    o, lse, do = o.to(acc), lse.to(acc), do.to(acc)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(B):
        for qs, qe, ks, ke in _segments(spec):
            if qe == qs or ke == ks:
                continue
            qh = q[b, qs:qe].transpose(0, 1)                      # [Hq, Lq, D]
            s, ok, raw = _block_scores(spec, x, b, qs, qe, ks, ke, 0, ke - ks, qh, acc)
            P = torch.where(ok, torch.exp(s - lse[b, :, qs:qe, None]), 0.0)
            doh = do[b, qs:qe].transpose(0, 1)                    # [Hq, Lq, Dv]
            Dr = (doh * o[b, qs:qe].transpose(0, 1)).sum(-1)      # [Hq, Lq]
            kk = k[b, ks:ke][:, kh].transpose(0, 1)               # [Hq, Lk, D]
            vv = v[b, ks:ke][:, kh].transpose(0, 1)               # [Hq, Lk, Dv]
            dvh = P.transpose(-1, -2) @ doh                       # [Hq, Lk, Dv]
            dP = doh @ vv.transpose(-1, -2)
            dS = P * (dP - Dr[..., None])
            if prm["softcap"] > 0:
                dS = dS * (1 - torch.tanh(raw / prm["softcap"]) ** 2)
            dq[b, qs:qe] = (_scale(spec) * dS @ kk).transpose(0, 1)
            dkh = _scale(spec) * dS.transpose(-1, -2) @ qh         # [Hq, Lk, D]
            dk[b, ks:ke] += torch.zeros(Hk, ke - ks, k.shape[-1], dtype=acc).index_add_(
                0, kh, dkh).transpose(0, 1)
            dv[b, ks:ke] += torch.zeros(Hk, ke - ks, v.shape[-1], dtype=acc).index_add_(
                0, kh, dvh).transpose(0, 1)
    return dq, dk, dv


def emu_top_keys(spec, x, acc):
    """Pass 1: lse of the emulated forward; pass 2: per key block p = exp(s - lse),
    merged into a running top list (masked entries -1, never ahead of a visible key)."""
    top, B, Sq, Hq = spec["eff"]["top"], spec["B"], spec["Sq"], spec["Hq"]
    _, lse = emu_forward(spec, x, acc)
    w = torch.zeros(B, Hq, Sq, top, dtype=acc)
    idx = torch.full((B, Hq, Sq, top), -1, dtype=torch.int64)
    for b in range(B):
        for qs, qe, ks, ke in _segments(spec):
            Lq = qe - qs
            if Lq == 0:
                continue
            qh = x["q"][b, qs:qe].to(acc).transpose(0, 1)
            cv = torch.full((Hq, Lq, top), -1.0, dtype=acc)
            ci = torch.full((Hq, Lq, top), -1, dtype=torch.int64)
            for j0 in range(0, ke - ks, KEY_BLOCK):
                j1 = min(j0 + KEY_BLOCK, ke - ks)
                s, ok, _ = _block_scores(spec, x, b, qs, qe, ks, ke, j0, j1, qh, acc)
                p = torch.where(ok, torch.exp(s - lse[b, :, qs:qe, None]), -1.0)
                jj = torch.arange(ks + j0, ks + j1).expand(Hq, Lq, j1 - j0)
                allv, alli = torch.cat([cv, p], -1), torch.cat([ci, jj], -1)
                cv, sel = torch.topk(allv, min(top, allv.shape[-1]), dim=-1)
                ci = torch.gather(alli, -1, sel)
                if cv.shape[-1] < top:  # pad (only when top exceeds the keys seen so far)
                    pad = top - cv.shape[-1]
                    cv = torch.cat([cv, torch.full((Hq, Lq, pad), -1.0, dtype=acc)], -1)
                    ci = torch.cat([ci, torch.full((Hq, Lq, pad), -1, dtype=torch.int64)], -1)
            w[b, :, qs:qe] = torch.where(cv >= 0, cv, 0.0)
            idx[b, :, qs:qe] = torch.where(cv >= 0, ci, -1)
    return w, idx


def ref_top_keys(spec, P, vis):
    """Exact top list from the float64 probabilities; asserts a unique selection."""
    top = spec["eff"]["top"]
    keyed = torch.where(vis, P, torch.full_like(P, -1.0))
    vals, order = torch.sort(keyed, dim=-1, descending=True, stable=True)
    nvis = vis.sum(-1)  # [Sq]
    n = min(top + 1, P.shape[-1])
    head = vals[..., :n]
    for r in range(n - 1):
        both = (r + 1) < nvis  # rows where entries r and r+1 are both visible keys
        gap = (head[..., r] - head[..., r + 1]) / head[..., r].clamp_min(1e-300)
        assert bool((gap[..., both] > 1e-5).all()), ("near tie in top_keys", spec["seed"], r)
    assert bool((torch.where(vis, P, 1.0) > 1e-30).all()), "tiny probability in top_keys"
    vals, order = vals[..., :top], order[..., :top]
    if top > P.shape[-1]:
        pad = top - P.shape[-1]
        vals = torch.cat([vals, torch.full(vals.shape[:-1] + (pad,), -1.0, dtype=F64)], -1)
        order = torch.cat([order, torch.zeros(order.shape[:-1] + (pad,), dtype=order.dtype)], -1)
    w = torch.where(vals >= 0, vals, 0.0)
    idx = torch.where(vals >= 0, order, -1)
    return w, idx


# --------------------------------------------------------------------------
# Case construction.
# --------------------------------------------------------------------------
def _ratio(got, want, tol):
    got, want = got.to(F64), want.to(F64)
    return float(((got - want).abs() / (tol + tol * want.abs())).max())


def _valid_rows(vis):
    return vis.any(-1)  # [Sq]


def _neg_inf_check(label, got, want):
    """The -inf entries must coincide; they are then left out of the ratio (as 0)."""
    gi, wi = torch.isneginf(got.to(F64)), torch.isneginf(want.to(F64))
    assert torch.equal(gi, wi), ("-inf positions differ", label)
    return (label, torch.where(gi, torch.zeros_like(got), got),
            torch.where(wi, torch.zeros_like(want), want))


def build(name, spec):
    dt = spec["dtype"]
    tdt = TORCH_DTYPE[dt]
    acc = F64 if dt == "f64" else torch.float32
    pdt = TORCH_DTYPE[_pdtype(dt)]
    op = spec["op"]
    x = draw_inputs(spec)
    x64 = {n: (t.to(F64) if t is not None and t.is_floating_point() else t) for n, t in x.items()}
    meta = {"op": op}
    if spec["params"] is not None:
        meta["params"] = json.dumps(spec["params"])
    tv = torch.__version__.split("+")[0]
    has_softcap = spec["eff"]["softcap"] > 0

    tensors = {"in.q": x["q"], "in.k": x["k"]}
    if op != "attention.top_keys":
        tensors["in.v"] = x["v"]
    for n in ("alibi_slopes", "bias", "cu_seqlens_q", "cu_seqlens_k"):
        if x[n] is not None:
            tensors["in." + n] = x[n]

    o64, lse64, P64, vis = naive_forward(spec, x, x64["q"], x64["k"], x64["v"])
    rows = _valid_rows(vis)
    empty_rows = not bool(rows.all())
    if not has_softcap:
        o_sd = sdpa_forward(spec, x, x64["q"], x64["k"], x64["v"])
        assert _ratio(o_sd[:, rows], o64[:, rows], 1e-12) <= 1.0, (name, "sdpa")
    assert bool(torch.isneginf(lse64[..., ~rows]).all()) and bool((o64[:, ~rows] == 0).all())
    assert bool(torch.isfinite(lse64[..., rows]).all())

    checks = []
    if op == "attention.forward":
        tensors["out.o"] = o64.to(tdt)
        tensors["out.lse"] = lse64.to(pdt)
        meta["source"] = f"torch {tv} float64 naive attention" + (
            "" if has_softcap else ", cross-checked with scaled_dot_product_attention")
        eo, e_lse = emu_forward(spec, x, acc)
        checks.append(("o", eo.to(tdt), tensors["out.o"]))
        checks.append(_neg_inf_check("lse", e_lse.to(pdt), tensors["out.lse"]))
    elif op == "attention.backward":
        o_st, lse_st = o64.to(tdt), lse64.to(pdt)
        tensors["in.o"] = o_st
        tensors["in.do"] = x["do"]
        tensors["in.lse"] = lse_st
        grads = ref_backward(spec, x, x["do"], naive_forward)
        if not has_softcap and not empty_rows:
            g_sd = ref_backward(spec, x, x["do"], sdpa_forward)
            for gn, gs, gr in zip(("dq", "dk", "dv"), g_sd, grads):
                assert _ratio(gs, gr, 1e-12) <= 1.0, (name, "sdpa", gn)
        # The FA2 formulas equal the autograd gradient (float64, exact o and lse).
        e64 = emu_backward(spec, x, o64, lse64, x64["do"], F64)
        for gn, ge, gr in zip(("dq", "dk", "dv"), e64, grads):
            assert _ratio(ge, gr, 1e-12) <= 1.0, (name, "fa2 formulas", gn)
        emu = emu_backward(spec, x, o_st, lse_st, x["do"], acc)
        for gn, gr, ge in zip(("dq", "dk", "dv"), grads, emu):
            tensors["out." + gn] = gr.to(tdt)
            checks.append((gn, ge.to(tdt), tensors["out." + gn]))
        meta["source"] = f"torch {tv} autograd float64"
    else:
        w, idx = ref_top_keys(spec, P64, vis)
        tensors["out.weights"] = w.to(pdt)
        tensors["out.indices"] = idx.to(torch.int32)
        ew, eidx = emu_top_keys(spec, x, acc)
        assert torch.equal(eidx.to(torch.int32), tensors["out.indices"]), (name, "indices")
        checks.append(("weights", ew.to(pdt), tensors["out.weights"]))
        checks.append(("indices", eidx.to(torch.int32), tensors["out.indices"]))
        meta["source"] = f"torch {tv} float64 softmax, stable descending sort"
    for t in tensors.values():
        assert not torch.isnan(t.to(F64)).any(), name
    return tensors, meta, checks


# Rows with lse = -inf: generate.py accepts -inf in those cases only.
for _name, _spec in CASES.items():
    _vis, _ = visibility(_spec)
    _spec["allow_neg_inf"] = (not bool(_vis.any(-1).all())
                              and _spec["op"] != "attention.top_keys")
del _name, _spec, _vis
