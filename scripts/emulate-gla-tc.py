#!/usr/bin/env python3
"""Checks kernels/gla_tc.cu (scan.gla forward on tensor cores) without a GPU.

Emulates one block per (value tile, head, batch) on a flat float32 shared-memory array laid
out exactly as the kernel lays it out (the same offsets, row strides and wmma pointers: a
wrong ldm, offset or layout reads the wrong numbers), the per-channel running products, the
range check and the direct form, the wmma m16n16k8 products on split TF32 operands (hi.hi +
hi.lo + lo.hi, TF32 as cvt.rna: round to nearest, ties away, 10 mantissa bits), f32 elsewhere.
Compares o and h_last with the float64 recurrence S = diag(e^g) S + k^T v, o = scale q S.
Run (needs numpy):  PY=$(bash ../shared/anchors/setup.sh); $PY scripts/emulate-gla-tc.py
Exits non-zero when any case is off; `--mutate` flips one index to show that it would be.
"""
import sys

import numpy as np

C, VT, PAD, TPB = 16, 64, 4, 256
VLD, ALD = VT + PAD, C + PAD
F32 = np.float32
MUTATE = "--mutate" in sys.argv


def tf32(x):
    bits = np.asarray(x, dtype=F32).view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32)
    return bits.view(F32)


def split(m):
    hi = tf32(m)
    return hi, tf32(m.astype(F32) - hi)


def mma_split(acc, a, b):
    (ah, al), (bh, bl) = split(a), split(b)
    prod = ah.astype(np.float64) @ bh + ah.astype(np.float64) @ bl + al.astype(np.float64) @ bh
    return (acc.astype(np.float64) + prod).astype(F32)


def load(smem, ptr, ldm, rows, cols, col_major=False):
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return smem[ptr + (r + c * ldm if col_major else r * ldm + c)].copy()


def store(smem, ptr, ldm, m):
    r, c = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    smem[ptr + r * ldm + c] = m


def block(q, k, v, g, h0, o, h_last, b, h, c0, T, H, K, V, scale):
    kp = (K + 15) // 16 * 16
    kld = kp + PAD
    sq, sk, sg = 0, C * kld, 2 * C * kld
    sa = 3 * C * kld
    sv = sa + C * ALD
    so = sv + C * VLD
    ss = so + C * VLD
    sp_last = ss + kp * VLD
    smem = np.full(sp_last + kp, np.nan, dtype=F32)  # NaN: a read of an unwritten float shows
    scale = F32(scale)
    r_, c_ = np.meshgrid(np.arange(kp), np.arange(VT), indexing="ij")
    ok = (r_ < K) & (c0 + c_ < V)
    smem[ss + r_ * VLD + c_] = np.where(ok, h0[b, h][np.minimum(r_, K - 1), np.minimum(c0 + c_, V - 1)] if h0 is not None else 0, 0)
    for t0 in range(0, T, C):
        n = min(C, T - t0)
        j_, kk_ = np.meshgrid(np.arange(C), np.arange(kp), indexing="ij")
        inn = (j_ < n) & (kk_ < K)
        tj, kc = np.minimum(t0 + j_, T - 1), np.minimum(kk_, K - 1)
        for base, x in ((sq, q), (sk, k), (sg, g)):
            smem[base + j_ * kld + kk_] = np.where(inn, x[b, tj, h, kc], 0)
        j_, c_ = np.meshgrid(np.arange(C), np.arange(VT), indexing="ij")
        smem[sv + j_ * VLD + c_] = np.where((j_ < n) & (c0 + c_ < V), v[b, np.minimum(t0 + j_, T - 1), h, np.minimum(c0 + c_, V - 1)], 0)
        # per-channel running products (thread tid < kp owns channel tid)
        e = np.exp(smem[sg + np.arange(C)[:, None] * kld + np.arange(kp)[None, :]])
        p = np.cumprod(e, axis=0, dtype=F32)
        r = np.ones_like(p)
        for j in range(C - 2, -1, -1):
            r[j] = r[j + 1] * e[j + 1]
        direct = not np.all((p >= F32(4.2483543e-18)) & (p <= F32(2.3538527e17)))
        if direct:
            rows = smem[sq : sq + C * kld].reshape(C, kld)[:, :K]
            krow = smem[sk : sk + C * kld].reshape(C, kld)[:, :K]
            graw = smem[sg : sg + C * kld].reshape(C, kld)[:, :K]
            for t in range(C):
                for tau in range(C):
                    acc = F32(0)
                    if tau <= t:
                        span = graw[tau + 1 : t + 1].sum(axis=0, dtype=F32) if t > tau else np.zeros(K, F32)
                        acc = (rows[t] * krow[tau] * np.exp(span)).sum(dtype=F32)
                    smem[sa + t * ALD + tau] = scale * acc
        for j in range(C):
            at = np.arange(kp)
            kj = smem[sk + j * kld + at].copy()
            smem[sq + j * kld + at] *= scale * p[j]
            if not direct:
                smem[sg + j * kld + at] = kj / p[j]
            smem[sk + j * kld + at] = kj * (p[j] if MUTATE else r[j])
        smem[sp_last + np.arange(kp)] = p[C - 1]
        if not direct:
            acc = np.zeros((16, 16), F32)
            for k0 in range(0, kp, 8):
                a = load(smem, sq + k0, kld, 16, 8)
                bt = load(smem, sg + k0, kld, 8, 16, col_major=True)
                acc = mma_split(acc, a, bt)
            store(smem, sa, ALD, acc)
            for e_ in range(C * C):
                if e_ % C > e_ // C:
                    smem[sa + (e_ // C) * ALD + e_ % C] = 0
        o_acc = []
        for w in range(4):
            col = w * 16
            acc = np.zeros((16, 16), F32)
            for k0 in range(0, kp, 8):
                acc = mma_split(acc, load(smem, sq + k0, kld, 16, 8), load(smem, ss + k0 * VLD + col, VLD, 8, 16))
            o_acc.append(acc)
        for w in range(4):
            col = w * 16
            acc = o_acc[w]
            for k0 in range(0, C, 8):
                acc = mma_split(acc, load(smem, sa + k0, ALD, 16, 8), load(smem, sv + k0 * VLD + col, VLD, 8, 16))
            store(smem, so + col, VLD, acc)
        for tile in range((kp // 16) * (VT // 16)):
            row, col = (tile // (VT // 16)) * 16, (tile % (VT // 16)) * 16
            st = ss + row * VLD + col
            for e_ in range(256):
                smem[st + (e_ // 16) * VLD + e_ % 16] *= smem[sp_last + row + e_ // 16]
            acc = load(smem, st, VLD, 16, 16)
            for k0 in range(0, C, 8):
                at = load(smem, sk + k0 * kld + row, kld, 16, 8, col_major=True)
                acc = mma_split(acc, at, load(smem, sv + k0 * VLD + col, VLD, 8, 16))
            store(smem, st, VLD, acc)
        for j in range(n):
            for cc in range(VT):
                if c0 + cc < V:
                    o[b, t0 + j, h, c0 + cc] = smem[so + j * VLD + cc]
    for rr in range(K):
        for cc in range(VT):
            if c0 + cc < V:
                h_last[b, h, rr, c0 + cc] = smem[ss + rr * VLD + cc]


def reference(q, k, v, g, h0, scale, dtype):
    """The recurrence step by step in `dtype` (float64: the reference; float32: what plain f32
    arithmetic reaches, the yardstick for the emulated kernel's error)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    o = np.zeros((B, T, H, V), dtype)
    hl = np.zeros((B, H, K, V), dtype)
    for b in range(B):
        for h in range(H):
            S = h0[b, h].astype(dtype) if h0 is not None else np.zeros((K, V), dtype)
            for t in range(T):
                S = np.exp(g[b, t, h].astype(dtype))[:, None] * S + np.outer(k[b, t, h], v[b, t, h]).astype(dtype)
                o[b, t, h] = dtype(scale) * q[b, t, h].astype(dtype) @ S
            hl[b, h] = S
    return o, hl


def case(name, B, T, H, K, V, gate_lo, with_h0, neg_inf=False, seed=0):
    rng = np.random.default_rng(seed)
    # inputs as f16 values (what the kernel widens): round through float16
    rnd = lambda *s, lo=-1.0, hi=1.0: rng.uniform(lo, hi, s).astype(np.float16).astype(F32)
    q, k, g = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, K, lo=gate_lo, hi=0.0)
    v = rnd(B, T, H, V)
    if neg_inf:
        g[0, min(5, T - 1), 0, 1 % K] = -np.inf
    h0 = rng.uniform(-1, 1, (B, H, K, V)).astype(F32) if with_h0 else None
    scale = 0.4
    o = np.full((B, T, H, V), np.nan, F32)
    hl = np.full((B, H, K, V), np.nan, F32)
    for b in range(B):
        for h in range(H):
            for c0 in range(0, V, VT):
                block(q, k, v, g, h0, o, hl, b, h, c0, T, H, K, V, scale)
    want_o, want_h = reference(q, k, v, g, h0, scale, np.float64)
    f32_o, f32_h = reference(q, k, v, g, h0, scale, np.float32)
    err = lambda got, want: np.max(np.abs(got - want) / (np.abs(want) + 1e-3 * np.max(np.abs(want)) + 1e-30))
    eo, eh = err(o, want_o), err(hl, want_h)
    # pass: within twice what the plain f32 recurrence reaches (or 2e-5)
    bound = 2 * max(err(f32_o, want_o), err(f32_h, want_h), 1e-5)
    good = np.isfinite(o).all() and np.isfinite(hl).all() and max(eo, eh) <= bound
    print(f"{name:46s} rel err o {eo:.1e} h_last {eh:.1e} (bound {bound:.1e}) {'ok' if good else 'FAIL'}")
    return good


cases = [
    case("B1 T1 H1 K1 V1", 1, 1, 1, 1, 1, -0.1, False),
    case("B2 T37 H2 K16 V40 h0", 2, 37, 2, 16, 40, -0.2, True, seed=1),
    case("B1 T70 H1 K128 V33 h0", 1, 70, 1, 128, 33, -0.05, True, seed=2),
    case("B1 T29 H2 K8 V64 strong gates, -inf (direct)", 1, 29, 2, 8, 64, -9.0, True, neg_inf=True, seed=3),
    case("B1 T45 H1 K40 V130 h0 (three value tiles)", 1, 45, 1, 40, 130, -0.3, True, seed=4),
    case("B1 T4000 H1 K24 V20 gates near 1", 1, 4000, 1, 24, 20, -1e-3, False, seed=5),
]
ok = all(cases)
print("all ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
