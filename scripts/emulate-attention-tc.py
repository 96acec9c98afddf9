#!/usr/bin/env python3
"""Checks the register-fragment index arithmetic of kernels/attention_fwd_tc.cu without a GPU.

Emulates one warp (16 query rows) lane by lane: the A/B fragments built from the staged
shared-memory tiles exactly as the kernel indexes them, mma.m16n8k16 with the operand and
accumulator layouts of the PTX ISA (groupID = lane / 4, threadID_in_group = lane % 4), the
masking and the quad-reduced online softmax, P repacked from the accumulator layout into the
A operand, and the final normalization; compares O and lse with a float64 reference (the
emulation itself runs in float64, so only index mistakes show). Needs numpy:
    PY=$(bash ../shared/anchors/setup.sh); $PY scripts/emulate-attention-tc.py
"""
import numpy as np
rng = np.random.default_rng(0)

def mma16816(d, a, b):
    # a: per lane 4 regs, each a pair (lo, hi) of values; b: per lane 2 regs of pairs; d: per lane 4 floats
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2*t:2*t+2] = a[lane][0]; A[g+8, 2*t:2*t+2] = a[lane][1]
        A[g, 2*t+8:2*t+10] = a[lane][2]; A[g+8, 2*t+8:2*t+10] = a[lane][3]
        B[2*t:2*t+2, g] = b[lane][0]; B[2*t+8:2*t+10, g] = b[lane][1]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane][0] += C[g, 2*t]; d[lane][1] += C[g, 2*t+1]
        d[lane][2] += C[g+8, 2*t]; d[lane][3] += C[g+8, 2*t+1]

def run(DMAX, BK, nkeys, causal_shift=None):
    LD = DMAX + 8
    Q = rng.standard_normal((16, DMAX)); K = rng.standard_normal((nkeys, DMAX)); V = rng.standard_normal((nkeys, DMAX))
    scale = 1 / np.sqrt(DMAX)
    NS, NO = BK // 8, DMAX // 8
    sq = np.zeros(16 * LD); 
    for r in range(16): sq[r*LD:r*LD+DMAX] = Q[r]
    m = [[-np.inf]*2 for _ in range(32)]; lsum = [[0.0]*2 for _ in range(32)]
    acc = [[[0.0]*4 for _ in range(NO)] for _ in range(32)]
    def visible(i, key):
        return True if causal_shift is None else key <= i + causal_shift
    for j0 in range(0, nkeys, BK):
        sk = np.zeros(BK * LD); sv = np.zeros(BK * LD)
        for r in range(BK):
            if j0 + r < nkeys:
                sk[r*LD:r*LD+DMAX] = K[j0+r]; sv[r*LD:r*LD+DMAX] = V[j0+r]
        s = [[[0.0]*4 for _ in range(NS)] for _ in range(32)]
        for kk in range(DMAX // 16):
            a = []; b = [[None]*32 for _ in range(NS)]
            for lane in range(32):
                g, t = lane // 4, lane % 4
                qa = g * LD + 16*kk + 2*t
                a.append([sq[qa:qa+2], sq[qa+8*LD:qa+8*LD+2], sq[qa+8:qa+10], sq[qa+8*LD+8:qa+8*LD+10]])
                for n in range(NS):
                    kb = (8*n + g) * LD + 16*kk + 2*t
                    b[n][lane] = [sk[kb:kb+2], sk[kb+8:kb+10]]
            for n in range(NS):
                d = [s[lane][n] for lane in range(32)]
                mma16816(d, a, b[n])
        # softmax
        corr = [[0, 0] for _ in range(32)]
        tmax = [[-np.inf]*2 for _ in range(32)]
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for n in range(NS):
                for e in range(4):
                    r = e // 2; key = j0 + 8*n + 2*t + (e & 1); i = g + 8*r
                    x = -np.inf
                    if key < nkeys and visible(i, key): x = scale * s[lane][n][e]
                    s[lane][n][e] = x; tmax[lane][r] = max(tmax[lane][r], x)
        for r in range(2):
            for xor in (1, 2):
                new = [max(tmax[l][r], tmax[l ^ xor][r]) for l in range(32)]
                for l in range(32): tmax[l][r] = new[l]
            for lane in range(32):
                mn = max(m[lane][r], tmax[lane][r])
                corr[lane][r] = 1.0 if mn == -np.inf else np.exp(m[lane][r] - mn)
                m[lane][r] = mn; lsum[lane][r] *= corr[lane][r]
        for lane in range(32):
            for n in range(NS):
                for e in range(4):
                    r = e // 2
                    p = 0.0 if m[lane][r] == -np.inf else np.exp(s[lane][n][e] - m[lane][r])
                    s[lane][n][e] = p; lsum[lane][r] += p
            for n in range(NO):
                acc[lane][n][0] *= corr[lane][0]; acc[lane][n][1] *= corr[lane][0]
                acc[lane][n][2] *= corr[lane][1]; acc[lane][n][3] *= corr[lane][1]
        for kk in range(BK // 16):
            a = []; bs = [[None]*32 for _ in range(NO)]
            for lane in range(32):
                g, t = lane // 4, lane % 4
                S = s[lane]
                a.append([np.array(S[2*kk][0:2]), np.array(S[2*kk][2:4]), np.array(S[2*kk+1][0:2]), np.array(S[2*kk+1][2:4])])
                vb = (16*kk + 2*t) * LD + g
                for n in range(NO):
                    col = vb + 8*n
                    bs[n][lane] = [np.array([sv[col], sv[col+LD]]), np.array([sv[col+8*LD], sv[col+9*LD]])]
            for n in range(NO):
                d = [acc[lane][n] for lane in range(32)]
                mma16816(d, a, bs[n])
    out = np.zeros((16, DMAX)); lse = np.zeros(16)
    for r in range(2):
        l = [lsum[lane][r] for lane in range(32)]
        for xor in (1, 2): l = [l[x] + l[x ^ xor] for x in range(32)]
        for lane in range(32):
            g, t = lane // 4, lane % 4; i = g + 8*r
            for n in range(NO):
                for e in range(2):
                    c = 8*n + 2*t + e
                    out[i, c] = acc[lane][n][2*r+e] / l[lane]
            if t == 0: lse[i] = m[lane][r] + np.log(l[lane])
    S = scale * Q @ K.T
    if causal_shift is not None:
        for i in range(16):
            for j in range(nkeys):
                if not visible(i, j): S[i, j] = -np.inf
    mx = S.max(1, keepdims=True); P = np.exp(S - mx); L = P.sum(1, keepdims=True)
    ref = (P / L) @ V; ref_lse = (mx + np.log(L))[:, 0]
    err = max(np.abs(out - ref).max(), np.abs(lse - ref_lse).max())
    print(f"D{DMAX} BK{BK} keys {nkeys} causal shift {causal_shift}: max error {err:.2e}")
    assert err < 1e-12, "fragment arithmetic does not match the reference"

run(32, 64, 100)
run(64, 64, 130, causal_shift=5)
run(128, 32, 75)
run(96, 32, 40, causal_shift=20)
