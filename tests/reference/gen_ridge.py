"""Reference cases of the batched-ridge family: ``ridge.cv``,
``ridge.solve_batched``, ``ridge.score``, ``ridge.banded_cv`` and
``ridge.split_scores`` (loaded by ``generate.py``, see FAMILY_MODULES there;
all five ops have landed, so ``PENDING`` is empty). The banded-ridge cases
store himalaya's own float64 outputs (see ``build_banded_cv`` and
tests/reference/README.md, "Banded ridge"); the rest is described below.

Usage::

    python tests/reference/generate.py --pending --only ridge_ [--out DIR]

Inputs are drawn in float64 from fixed per-case seeds (numpy PCG64 seeded with
``crc32(case name) + 12345``), rounded to the case dtype first (every float
input F32, or F64 in the F64 cases; ``folds`` I32), and every reference is
computed in float64 from the rounded values with plain numpy, then cast to the
case dtype. The float64 linear algebra (matrix products, Cholesky solves) is
written out with numpy elementwise ops and sums in a fixed order, not BLAS or
LAPACK, whose CPU-dependent kernels round differently: the F64 files are then
the same bytes on any machine (with np.linalg/OpenBLAS they changed with
``OPENBLAS_CORETYPE``). Each reference is cross-checked in float64 against
independent libraries (asserted to agree to 1e-8 relative + 1e-10 absolute;
they agree to about 1e-13). No ``params`` key is ever left out (CASES.md gives no defaults
for ridge.cv); ridge.solve_batched and ridge.score have no params.

Scores (shared by ridge.cv and ridge.score; the Rust side follows these rules):

* ``r2 = 1 - SS_res / SS_tot`` per target column, ``SS_res = sum((y_true -
  y_pred)^2)``, ``SS_tot = sum((y_true - mean(y_true))^2)`` around the
  column's own mean (in ridge.cv: the held-out fold's own mean, not the
  training mean; this is what himalaya's ``r2_score`` does). Where ``SS_tot
  == 0`` exactly (a constant ``y_true`` column) ``r2 = 0`` (himalaya's rule;
  scikit-learn's ``r2_score`` gives 1.0 for a perfect prediction of a
  constant column, 0.0 otherwise).
* ``pearson = sum(a b) / sqrt(sum(a^2) sum(b^2))`` with ``a = y_true -
  mean(y_true)``, ``b = y_pred - mean(y_pred)``, per column. Where the
  denominator is 0 exactly (a constant ``y_true`` or a constant ``y_pred``
  column) ``pearson = 0`` (himalaya's ``correlation_score`` gives the same:
  its z-score divides by 1 where the std is 0).
* The constant columns of the cases hold dyadic values (1.5, -0.75, ...), so
  their means, and the training means in ridge.cv, are exact in F32 too: a
  two-pass ``sum((y - mean)^2)`` is exactly 0 and centered constant training
  targets are exactly 0 (so their predictions and weights are exactly 0).

``ridge.cv`` (``source``: "numpy VERSION float64 Cholesky solve (primal
n_train >= p, dual n_train < p); agrees with himalaya VERSION solve_ridge_cv_svd [and
solve_kernel_ridge_cv_eigenvalues] and scikit-learn VERSION Ridge"):

* Params ``{"score": "r2" | "pearson", "center": true | false}``.
* ``F = max(folds) + 1`` folds; fold ``f`` holds out the rows with
  ``folds == f`` and trains on all other rows. The ids need not be
  contiguous blocks (the ``inter`` cases shuffle them over the rows); every
  id ``0..F-1`` occurs, F >= 2; fold sizes differ in most cases.
* With ``center`` = true, ``x`` and ``y`` are centered with the TRAINING
  rows' column means of the fold (and the held-out rows shifted by the same
  training means, i.e. predicting with an intercept); with ``center`` =
  false nothing is centered and there is no intercept.
* Per fold and alpha: ``W = (Xtr^T Xtr + alpha I)^-1 Xtr^T Ytr`` (primal,
  ``n_train >= p``) or ``W = Xtr^T (Xtr Xtr^T + alpha I)^-1 Ytr`` (dual,
  ``n_train < p``; the same W in exact arithmetic), ``pred = Xte W``, and the
  score (the ``score`` param) of each target on the held-out rows.
* ``cv_scores [A, t]``: the plain (unweighted) mean over the F folds of the
  per-fold scores, whatever the fold sizes; rows in the order of ``alphas``.
* ``best_alpha [t]``: the alpha with the largest ``cv_scores`` of the target;
  among exact ties the largest alpha VALUE (``alphas`` need not be sorted:
  the ``shuf`` cases give them shuffled). The only exact ties in these cases
  are the constant target columns (score 0 for every alpha, so the largest
  alpha wins). Every other target's best mean score beats the runner-up by a
  margin asserted here (1e-4 absolute in F32 cases, about 100 times what a
  float32 implementation gets wrong; 1e-6 in F64), so that rounding cannot
  flip the choice (the refit ``w`` depends on it).
* ``w [p, t]``: refit on all n rows with each target's best alpha (primal or
  dual by ``n >= p``; centered with the means of all rows when ``center``);
  ``intercept [t] = mean(y) - mean(x) @ w`` with ``center``, zeros without
  (``out.intercept`` is always written).
* Cross-checks (float64, asserted): himalaya ``solve_ridge_cv_svd`` (numpy
  backend, ``cv = PredefinedSplit(folds)``, ``score_func`` = ``r2_score`` or
  ``correlation_score``, ``fit_intercept = center``). It returns only the
  best alpha's mean score, plus a tie-break slope ``1e-10 log(alpha)``, so it
  is run once per alpha (the slope subtracted) for the ``cv_scores`` table
  and once with all alphas for ``best_alpha``, ``w``, ``intercept``. Where
  ``n < p`` and ``center`` = false also himalaya's kernel form
  ``solve_kernel_ridge_cv_eigenvalues`` on ``K = X X^T`` (``w = X^T dual``).
  And scikit-learn ``Ridge(alpha, fit_intercept=center)`` per alpha and fold
  (scored with the rules above) and per target for the refit.
* Draws: ``x = randn(n, p) * logspace(0, -1, p) + 0.3 randn(p)`` (column
  scales from 1 down to 0.1, so that small alphas matter; column offsets, so
  that centering matters); ``y[:, j] = x @ w_j + sigma_j randn(n) + 0.5
  randn()`` with ``w_j = randn(p) / sqrt(p)`` and noise levels ``sigma_j =
  logspace(sig[0], sig[1], t)`` (the spec's ``sig``; roughly alpha* ~ p
  sigma^2, so different targets choose different alphas); ``alphas =
  logspace(-2, 4, A)`` (``[10]`` when A = 1), shuffled in the ``shuf``
  cases; ``folds`` are blocks of the spec's ``fold_sizes`` in order, shuffled
  over the rows in the ``inter`` cases; the ``const`` targets are set to 1.5,
  -0.75, ... (in this order).

``ridge.solve_batched`` (``source``: "numpy VERSION float64 Cholesky solve,
primal ... | dual ...; agrees with torch VERSION batched torch.linalg.solve
(both forms)"): ``w_g = (X_g^T X_g + alpha_g I)^-1 X_g^T Y_g`` when ``n >=
p``, ``w_g = X_g^T (X_g X_g^T + alpha_g I)^-1 Y_g`` when ``n < p`` (no
intercept, no centering), by the written-out Cholesky solve ``_spd_solve``;
cross-checked with batched ``torch.linalg.solve`` (float64) of the same form
and of the other form.
Draws: ``x = randn(G, n, p)``, ``y = x @ w + 0.3 randn(G, n, t)`` with ``w =
randn(G, p, t) / sqrt(p)``, ``alpha = logspace(-2, 2, G)`` shuffled.

``ridge.score`` (``source``: "numpy VERSION float64 two-pass; agrees with
scikit-learn VERSION r2_score, np.corrcoef and himalaya VERSION
r2_score/correlation_score"): ``r2`` and ``pearson`` per column by the rules
above; cross-checked with scikit-learn ``r2_score(multioutput="raw_values")``
(the constant ``y_true`` column has an imperfect prediction, so scikit-learn
also gives 0 there), ``np.corrcoef`` on the non-constant columns, and
himalaya's ``r2_score`` / ``correlation_score``. Draws: ``y_true = randn(n,
t) + 0.5 randn(t)``, ``y_pred = rho_j y_true + 0.5 randn(n, t) + 0.2
randn(t)`` with ``rho = [1, 0.5, 0, -0.5, 0.9, 0.2, ...]``; in the ``const``
cases column 1 of ``y_true`` is the constant 1.5 (r2 = pearson = 0) and
column 2 of ``y_pred`` the constant -0.75 (pearson = 0, r2 negative).

Self-check emulation (float32 for F32 cases, float64 for F64), from the stored
rounded inputs, by another route than the reference:

* ``ridge.cv``: per fold one eigendecomposition (``torch.linalg.eigh``) of the
  centered training Gram matrix (``Xtr^T Xtr`` when ``n_train >= p``, else
  the kernel ``Xtr Xtr^T``), reused for every alpha (``V diag(1/(s + alpha))
  V^T``), scores by the rules above in the working dtype, mean over folds,
  the same tie rule (the emulation is asserted to choose the same alphas, so
  ``best_alpha`` is in the checks and must match exactly), and the refit by
  the same eigen route.
* ``ridge.solve_batched``: two checks, one eigendecomposition
  (``torch.linalg.eigh``) and one Cholesky (``torch.linalg.cholesky`` and
  ``cholesky_solve``, what a batched kernel would do) of the same normal /
  kernel matrix.
* ``ridge.score``: ``r2`` as above; ``pearson`` as the mean of the products
  of z-scores (population std; himalaya's route).

All cases pass the CASES.md default tolerances of their dtype (worst ratios:
ridge.cv F32 about 0.18, solve_batched F32 0.05, score F32 0.005, every F64
case below 1e-4), so no case carries ``rtol``/``atol``. A float32 Cholesky
per alpha (dual where ``n_train < p``) also passes every F32 ridge.cv case
(worst 0.19); the primal form where ``n_train < p`` does not (1.8 in
``ridge_cv_f32_n30_p50_t6_a5_f3_r2``), so an F32 implementation must switch to
the dual (kernel) form there. The data are drawn well conditioned for that
reason: with alphas down to 1e-2 a fold with ``n_train`` close to ``p`` fails
float32 tolerances (``n36_p28``: ratio 10 on cv_scores), hence ``p`` = 30
with ``n_train`` 23..25 in the mixed case.

Cases (names ``ridge_cv_<dtype>_n<n>_p<p>_t<t>_a<A>_f<F>_<score>[_nc][_inter]
[_shuf][_const]``; ``nc``: center = false; ``inter``: shuffled fold ids;
``shuf``: shuffled alphas; ``const``: a constant target column;
``ridge_solve_batched_<dtype>_g<G>_n<n>_p<p>_t<t>``;
``ridge_score_<dtype>_n<n>_t<t>[_const]``): see ``CASES`` below.
"""

import json
import zlib

import numpy as np
import torch

PENDING: set = set()

_TORCH_DTYPE = {"f32": torch.float32, "f64": torch.float64}
_NP_DTYPE = {"f32": np.float32, "f64": np.float64}


# --------------------------------------------------------------------------
# Case list.
# --------------------------------------------------------------------------
def _cv(dtype, n, p, t, A, fold_sizes, score="r2", center=True, inter=False,
        shuf=False, const=(), sig=(-1.5, 1.5)):
    return dict(op="ridge.cv", dtype=dtype, n=n, p=p, t=t, A=A,
                fold_sizes=tuple(fold_sizes), score=score, center=center,
                inter=inter, shuf=shuf, const=tuple(const), sig=sig)


def _sb(dtype, G, n, p, t):
    return dict(op="ridge.solve_batched", dtype=dtype, G=G, n=n, p=p, t=t)


def _bcv(dtype, n, sizes, t, A, C, fold_sizes, score="r2", center=True):
    return dict(op="ridge.banded_cv", dtype=dtype, n=n, sizes=tuple(sizes), t=t, A=A, C=C,
                fold_sizes=tuple(fold_sizes), score=score, center=center)


def _ss(dtype, n, sizes, t, score):
    return dict(op="ridge.split_scores", dtype=dtype, n=n, sizes=tuple(sizes), t=t,
                score=score)


def _sc(dtype, n, t, const=False):
    return dict(op="ridge.score", dtype=dtype, n=n, t=t, const=const)


CASES = {
    # ridge.cv: names ridge_cv_<dtype>_n<n>_p<p>_t<t>_a<A>_f<F>_<score>[_nc][_inter][_shuf][_const]
    # (nc: center = false; inter: interleaved fold ids; shuf: alphas not sorted;
    # const: constant target columns).
    # The main case: n >= p, contiguous folds of unequal sizes 14, 20, 26.
    "ridge_cv_f32_n60_p12_t7_a5_f3_r2": _cv("f32", 60, 12, 7, 5, (14, 20, 26),
                                           sig=(-1.0, 1.0)),
    # n < p: every fold and the refit in dual form.
    "ridge_cv_f32_n30_p50_t6_a5_f3_r2": _cv("f32", 30, 50, 6, 5, (8, 10, 12),
                                           sig=(-1.0, 1.0)),
    # n >= p overall but n_train (23..25) < p in every fold (dual in the folds, primal
    # refit); p = 30 rather than 28: n_train closer to p is too ill-conditioned for F32.
    "ridge_cv_f32_n36_p30_t4_a5_f3_r2": _cv("f32", 36, 30, 4, 5, (11, 12, 13),
                                           sig=(-1.0, 1.0)),
    # Pearson, with a constant target column (centered: predictions exactly 0).
    "ridge_cv_f32_n60_p12_t6_a5_f3_pearson_const": _cv(
        "f32", 60, 12, 6, 5, (18, 20, 22), score="pearson", const=(2,), sig=(-1.5, 0.5)),
    # No centering / no intercept, with a constant target column.
    "ridge_cv_f32_n60_p12_t6_a5_f3_r2_nc_const": _cv(
        "f32", 60, 12, 6, 5, (25, 15, 20), center=False, const=(4,)),
    # One target, interleaved fold ids, 4 folds, alphas in shuffled order.
    "ridge_cv_f32_n40_p8_t1_a5_f4_r2_inter_shuf": _cv(
        "f32", 40, 8, 1, 5, (9, 10, 10, 11), inter=True, shuf=True, sig=(0.0, 0.0)),
    # One alpha.
    "ridge_cv_f32_n40_p8_t5_a1_f3_r2": _cv("f32", 40, 8, 5, 1, (12, 13, 15)),
    # Interleaved folds, pearson, no centering, more alphas in shuffled order.
    "ridge_cv_f32_n48_p10_t5_a7_f4_pearson_nc_inter_shuf": _cv(
        "f32", 48, 10, 5, 7, (10, 11, 12, 15), score="pearson", center=False, inter=True,
        shuf=True, sig=(-1.0, 0.5)),
    # F64.
    "ridge_cv_f64_n60_p12_t7_a5_f3_r2": _cv("f64", 60, 12, 7, 5, (14, 20, 26)),
    "ridge_cv_f64_n30_p50_t5_a5_f3_pearson_nc_inter_const": _cv(
        "f64", 30, 50, 5, 5, (9, 10, 11), score="pearson", center=False, inter=True,
        const=(1,), sig=(-1.0, 0.5)),
    # ridge.solve_batched: ridge_solve_batched_<dtype>_g<G>_n<n>_p<p>_t<t>
    "ridge_solve_batched_f32_g5_n24_p10_t3": _sb("f32", 5, 24, 10, 3),
    "ridge_solve_batched_f32_g5_n10_p24_t1": _sb("f32", 5, 10, 24, 1),
    "ridge_solve_batched_f32_g5_n24_p10_t1": _sb("f32", 5, 24, 10, 1),
    "ridge_solve_batched_f32_g5_n10_p24_t3": _sb("f32", 5, 10, 24, 3),
    "ridge_solve_batched_f64_g5_n24_p10_t1": _sb("f64", 5, 24, 10, 1),
    "ridge_solve_batched_f64_g5_n10_p24_t3": _sb("f64", 5, 10, 24, 3),
    # ridge.score: ridge_score_<dtype>_n<n>_t<t>[_const]
    "ridge_score_f32_n50_t6_const": _sc("f32", 50, 6, const=True),
    "ridge_score_f32_n1000_t3": _sc("f32", 1000, 3),
    "ridge_score_f64_n50_t6_const": _sc("f64", 50, 6, const=True),
    # ridge.banded_cv: ridge_banded_cv_<dtype>_n<n>_p<p>_s<S>_t<t>_a<A>_c<C>_f<F>_<score>[_nc]
    # (groups interleaved, not contiguous; the first candidate is the uniform weights, as
    # in himalaya's random search, the others fixed draws).
    "ridge_banded_cv_f32_n60_p12_s2_t6_a5_c4_f3_r2": _bcv("f32", 60, (5, 7), 6, 5, 4,
                                                        (18, 20, 22)),
    "ridge_banded_cv_f32_n30_p50_s2_t5_a5_c4_f3_pearson": _bcv(
        "f32", 30, (20, 30), 5, 5, 4, (9, 10, 11), score="pearson"),
    "ridge_banded_cv_f32_n60_p16_s4_t6_a5_c5_f3_pearson": _bcv(
        "f32", 60, (3, 4, 4, 5), 6, 5, 5, (18, 20, 22), score="pearson"),
    "ridge_banded_cv_f64_n60_p16_s4_t6_a5_c5_f3_r2": _bcv("f64", 60, (3, 4, 4, 5), 6, 5, 5,
                                                        (18, 20, 22)),
    "ridge_banded_cv_f64_n30_p48_s4_t5_a5_c5_f3_pearson": _bcv(
        "f64", 30, (10, 12, 12, 14), 5, 5, 5, (9, 10, 11), score="pearson"),
    "ridge_banded_cv_f64_n40_p10_s2_t5_a5_c4_f3_r2_nc": _bcv(
        "f64", 40, (4, 6), 5, 5, 4, (12, 13, 15), center=False),
    "ridge_banded_cv_f32_n24_p40_s2_t4_a5_c4_f3_r2": _bcv("f32", 24, (15, 25), 4, 5, 4,
                                                        (7, 8, 9)),
    # ridge.split_scores: ridge_split_scores_<dtype>_n<n>_p<p>_s<S>_t<t>_<score>
    "ridge_split_scores_f32_n50_p12_s2_t6_r2": _ss("f32", 50, (5, 7), 6, "r2"),
    "ridge_split_scores_f32_n50_p12_s2_t6_pearson": _ss("f32", 50, (5, 7), 6, "pearson"),
    "ridge_split_scores_f64_n50_p16_s4_t6_r2": _ss("f64", 50, (3, 4, 4, 5), 6, "r2"),
    "ridge_split_scores_f64_n50_p16_s4_t6_pearson": _ss("f64", 50, (3, 4, 4, 5), 6,
                                                      "pearson"),
}
for _spec in CASES.values():
    if _spec["op"] in ("ridge.cv", "ridge.banded_cv"):
        assert len(_spec["fold_sizes"]) >= 2 and sum(_spec["fold_sizes"]) == _spec["n"]

# Dyadic constants for constant target columns (exact means in F32).
_CONSTS = (1.5, -0.75, 2.25, 0.5)


def _rng_key(key):
    return np.random.Generator(np.random.PCG64(zlib.crc32(key.encode()) + 12345))


def _round(x64, dtype):
    """float64 numpy -> numpy array rounded to `dtype`, returned as float64."""
    return np.asarray(x64, dtype=np.float64).astype(_NP_DTYPE[dtype]).astype(np.float64)


def _t(x64, dtype):
    return torch.from_numpy(np.ascontiguousarray(x64, dtype=_NP_DTYPE[dtype]))


def _err_ratio(got, want, rtol, atol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float((np.abs(got - want) / (atol + rtol * np.abs(want))).max())


def _assert_close(got, want, what, rtol=1e-8, atol=1e-10):
    r = _err_ratio(got, want, rtol, atol)
    assert r <= 1.0, (what, r)


# --------------------------------------------------------------------------
# Scores (float64 reference rules; see the docstring).
# --------------------------------------------------------------------------
def r2_ref(yt, yp):
    ss_res = ((yt - yp) ** 2).sum(0)
    ss_tot = ((yt - yt.mean(0)) ** 2).sum(0)
    out = np.zeros(yt.shape[1])
    nz = ss_tot != 0
    out[nz] = 1.0 - ss_res[nz] / ss_tot[nz]
    return out


def pearson_ref(yt, yp):
    a = yt - yt.mean(0)
    b = yp - yp.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    out = np.zeros(yt.shape[1])
    nz = den != 0
    out[nz] = (a * b).sum(0)[nz] / den[nz]
    return out


_SCORE_REF = {"r2": r2_ref, "pearson": pearson_ref}


def _emu_r2(yt, yp):
    ss_res = ((yt - yp) ** 2).sum(0)
    ss_tot = ((yt - yt.mean(0)) ** 2).sum(0)
    return torch.where(ss_tot == 0, torch.zeros_like(ss_tot),
                       1.0 - ss_res / torch.where(ss_tot == 0, torch.ones_like(ss_tot), ss_tot))


def _emu_pearson(yt, yp):
    """Mean of the products of z-scores (population std; std 0 -> divide by 1,
    which gives 0)."""
    def z(v):
        c = v - v.mean(0)
        s = torch.sqrt((c * c).mean(0))
        return c / torch.where(s == 0, torch.ones_like(s), s)
    return (z(yt) * z(yp)).mean(0)


_SCORE_EMU = {"r2": _emu_r2, "pearson": _emu_pearson}


# --------------------------------------------------------------------------
# Plain float64 ridge.
# --------------------------------------------------------------------------
# The float64 reference avoids BLAS/LAPACK (whose kernels, chosen by CPU, round
# differently): products and the Cholesky solve are written out with numpy
# elementwise ops and sums in a fixed order, so the F64 files are the same bytes
# on every machine.
def _mm(A, B):
    """A @ B for 2-D float64 arrays: contiguous-axis sums of elementwise products."""
    return (A[:, None, :] * np.ascontiguousarray(B.T)[None, :, :]).sum(-1)


def _spd_solve(M, B):
    """M^-1 B for a symmetric positive definite M, by Cholesky M = L L^T."""
    n = M.shape[0]
    L = np.zeros_like(M)
    for j in range(n):
        L[j, j] = np.sqrt(M[j, j] - (L[j, :j] * L[j, :j]).sum())
        L[j + 1:, j] = (M[j + 1:, j] - (L[j + 1:, :j] * L[j, :j]).sum(-1)) / L[j, j]
    Z = np.zeros_like(B)
    for i in range(n):
        Z[i] = (B[i] - (L[i, :i, None] * Z[:i]).sum(0)) / L[i, i]
    out = np.zeros_like(B)
    for i in range(n - 1, -1, -1):
        out[i] = (Z[i] - (L[i + 1:, i, None] * out[i + 1:]).sum(0)) / L[i, i]
    return out


def ridge_solve_ref(X, Y, alpha):
    """(X^T X + alpha I)^-1 X^T Y for n >= p, X^T (X X^T + alpha I)^-1 Y for n < p."""
    n, p = X.shape
    if n >= p:
        return _spd_solve(_mm(X.T, X) + alpha * np.eye(p), _mm(X.T, Y))
    return _mm(X.T, _spd_solve(_mm(X, X.T) + alpha * np.eye(n), Y))


def _best_alpha_index(cv, alphas):
    """Per target: the largest alpha among those with the maximal mean score."""
    A, t = cv.shape
    idx = np.empty(t, dtype=np.int64)
    for j in range(t):
        m = cv[:, j].max()
        cands = np.flatnonzero(cv[:, j] == m)
        idx[j] = cands[np.argmax(alphas[cands])]
    return idx


def ridge_cv_ref(X, Y, alphas, folds, score, center):
    n, p = X.shape
    t = Y.shape[1]
    A = len(alphas)
    F = int(folds.max()) + 1
    score_fn = _SCORE_REF[score]
    scores = np.zeros((F, A, t))
    for f in range(F):
        te = folds == f
        tr = ~te
        Xtr, Xte, Ytr, Yte = X[tr], X[te], Y[tr], Y[te]
        if center:
            mx, my = Xtr.mean(0), Ytr.mean(0)
            Xtr, Xte, Ytr, Yte = Xtr - mx, Xte - mx, Ytr - my, Yte - my
        for a in range(A):
            scores[f, a] = score_fn(Yte, _mm(Xte, ridge_solve_ref(Xtr, Ytr, alphas[a])))
    cv = scores.mean(0)
    best = _best_alpha_index(cv, alphas)
    Xc, Yc = X, Y
    if center:
        mx, my = X.mean(0), Y.mean(0)
        Xc, Yc = X - mx, Y - my
    W = np.zeros((p, t))
    for a in np.unique(best):
        sel = best == a
        W[:, sel] = ridge_solve_ref(Xc, Yc[:, sel], alphas[a])
    intercept = my - _mm(mx[None, :], W)[0] if center else np.zeros(t)
    return dict(cv_scores=cv, best_idx=best, best_alpha=alphas[best], w=W,
                intercept=intercept, fold_scores=scores)


# --------------------------------------------------------------------------
# Cross-checks (float64).
# --------------------------------------------------------------------------
def _himalaya_cv(X, Y, alphas, folds, score, center):
    import warnings
    from himalaya.backend import set_backend
    from himalaya.ridge import solve_ridge_cv_svd
    from himalaya.scoring import correlation_score, r2_score
    from sklearn.model_selection import PredefinedSplit

    set_backend("numpy", on_error="raise")
    score_func = {"r2": r2_score, "pearson": correlation_score}[score]
    cv = PredefinedSplit(folds)
    kw = dict(fit_intercept=center, score_func=score_func, cv=cv, warn=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve_ridge_cv_svd(X.copy(), Y.copy(), alphas=alphas.copy(), **kw)
        rows = []
        for a in alphas:
            r = solve_ridge_cv_svd(X.copy(), Y.copy(), alphas=np.array([a]), **kw)
            # its selection adds a tie-break slope of 1e-10 log(alpha) to the mean
            rows.append(np.asarray(r[2])[0] - 1e-10 * np.log(a))
    out = dict(cv_scores=np.stack(rows), best_alpha=np.asarray(res[0]), w=np.asarray(res[1]))
    out["intercept"] = np.asarray(res[3]) if center else np.zeros(Y.shape[1])
    return out


def _himalaya_kernel_cv(X, Y, alphas, folds, score):
    import warnings
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import solve_kernel_ridge_cv_eigenvalues
    from himalaya.scoring import correlation_score, r2_score
    from sklearn.model_selection import PredefinedSplit

    set_backend("numpy", on_error="raise")
    score_func = {"r2": r2_score, "pearson": correlation_score}[score]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best, dual, _ = solve_kernel_ridge_cv_eigenvalues(
            X @ X.T, Y.copy(), alphas=alphas.copy(), score_func=score_func,
            cv=PredefinedSplit(folds), fit_intercept=False)
    return dict(best_alpha=np.asarray(best), w=X.T @ np.asarray(dual))


def _sklearn_cv(X, Y, alphas, folds, score, center, best_alpha):
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score

    F = int(folds.max()) + 1
    t = Y.shape[1]
    scores = np.zeros((F, len(alphas), t))
    for f in range(F):
        te = folds == f
        Yte = Y[te]
        const = ((Yte - Yte.mean(0)) ** 2).sum(0) == 0
        for a, alpha in enumerate(alphas):
            pred = Ridge(alpha=alpha, fit_intercept=center).fit(X[~te], Y[~te]).predict(X[te])
            pred = pred.reshape(Yte.shape)
            if score == "r2":
                s = r2_score(Yte, pred, multioutput="raw_values")
            else:
                s = np.array([np.corrcoef(Yte[:, j], pred[:, j])[0, 1] if not const[j]
                              and np.ptp(pred[:, j]) > 0 else 0.0 for j in range(t)])
            s[const] = 0.0  # the contract's rule (sklearn gives 1.0 for a perfect fit)
            scores[f, a] = s
    W = np.zeros((X.shape[1], t))
    b = np.zeros(t)
    for j in range(t):
        m = Ridge(alpha=best_alpha[j], fit_intercept=center).fit(X, Y[:, j])
        W[:, j] = m.coef_
        b[j] = m.intercept_ if center else 0.0
    return dict(cv_scores=scores.mean(0), w=W, intercept=b)


# --------------------------------------------------------------------------
# Emulations (float32 for F32 cases, float64 for F64).
# --------------------------------------------------------------------------
def _eig_ridge(Xtr, Ytr, Xte, alphas):
    """Predictions on Xte for every alpha (list), and the weights, from one
    eigendecomposition of the Gram matrix (primal when n_train >= p, else the
    kernel)."""
    n, p = Xtr.shape
    if n >= p:
        s, V = torch.linalg.eigh(Xtr.T @ Xtr)
        B = V.T @ (Xtr.T @ Ytr)
        Ws = [V @ (B / (s + a)[:, None]) for a in alphas]
    else:
        s, U = torch.linalg.eigh(Xtr @ Xtr.T)
        B = U.T @ Ytr
        Ws = [Xtr.T @ (U @ (B / (s + a)[:, None])) for a in alphas]
    preds = [Xte @ W for W in Ws] if Xte is not None else None
    return preds, Ws


def emu_ridge_cv(X, Y, alphas, folds, score, center):
    """X, Y, alphas: torch tensors in the working dtype; folds numpy."""
    A = alphas.shape[0]
    F = int(folds.max()) + 1
    fn = _SCORE_EMU[score]
    per_fold = []
    for f in range(F):
        te = torch.from_numpy(folds == f)
        Xtr, Xte, Ytr, Yte = X[~te], X[te], Y[~te], Y[te]
        if center:
            mx, my = Xtr.mean(0), Ytr.mean(0)
            Xtr, Xte, Ytr, Yte = Xtr - mx, Xte - mx, Ytr - my, Yte - my
        preds, _ = _eig_ridge(Xtr, Ytr, Xte, [alphas[a] for a in range(A)])
        per_fold.append(torch.stack([fn(Yte, P) for P in preds]))
    cv = torch.stack(per_fold).mean(0)
    best = _best_alpha_index(cv.numpy(), alphas.numpy())
    Xc, Yc = X, Y
    if center:
        mx, my = X.mean(0), Y.mean(0)
        Xc, Yc = X - mx, Y - my
    _, Ws = _eig_ridge(Xc, Yc, None, [alphas[a] for a in range(A)])
    W = torch.stack([Ws[best[j]][:, j] for j in range(Y.shape[1])], dim=1)
    intercept = my - mx @ W if center else torch.zeros(Y.shape[1], dtype=X.dtype)
    return dict(cv_scores=cv, best_idx=best, w=W, intercept=intercept)


def emu_solve_batched_eigh(x, y, alpha):
    G, n, p = x.shape
    xT = x.transpose(1, 2)
    if n >= p:
        s, V = torch.linalg.eigh(xT @ x)
        return V @ ((V.transpose(1, 2) @ (xT @ y)) / (s + alpha[:, None])[:, :, None])
    s, U = torch.linalg.eigh(x @ xT)
    return xT @ (U @ ((U.transpose(1, 2) @ y) / (s + alpha[:, None])[:, :, None]))


def emu_solve_batched(x, y, alpha):
    G, n, p = x.shape
    if n >= p:
        M = x.transpose(1, 2) @ x + alpha[:, None, None] * torch.eye(p, dtype=x.dtype)
        L = torch.linalg.cholesky(M)
        return torch.cholesky_solve(x.transpose(1, 2) @ y, L)
    M = x @ x.transpose(1, 2) + alpha[:, None, None] * torch.eye(n, dtype=x.dtype)
    L = torch.linalg.cholesky(M)
    return x.transpose(1, 2) @ torch.cholesky_solve(y, L)


# --------------------------------------------------------------------------
# Draws.
# --------------------------------------------------------------------------
def draw_cv_inputs(name, spec):
    rng = _rng_key(name)
    n, p, t, A = spec["n"], spec["p"], spec["t"], spec["A"]
    x = rng.standard_normal((n, p)) * np.logspace(0, -1, p) + 0.3 * rng.standard_normal(p)
    w = rng.standard_normal((p, t)) / np.sqrt(p)
    lo, hi = spec["sig"]
    sig = np.logspace(lo, hi, t) if t > 1 else np.array([10.0 ** lo])
    y = _mm(x, w) + sig * rng.standard_normal((n, t)) + 0.5 * rng.standard_normal(t)
    for k, j in enumerate(spec["const"]):
        y[:, j] = _CONSTS[k]
    alphas = np.logspace(-2, 4, A) if A > 1 else np.array([10.0])
    if spec["shuf"]:
        alphas = alphas[rng.permutation(A)]
    sizes = spec["fold_sizes"]
    folds = np.repeat(np.arange(len(sizes)), sizes)
    if spec["inter"]:
        folds = folds[rng.permutation(n)]
    dt = spec["dtype"]
    return dict(x=_round(x, dt), y=_round(y, dt), alphas=_round(alphas, dt),
                folds=folds.astype(np.int32))


def draw_sb_inputs(name, spec):
    rng = _rng_key(name)
    G, n, p, t = spec["G"], spec["n"], spec["p"], spec["t"]
    x = rng.standard_normal((G, n, p))
    w = rng.standard_normal((G, p, t)) / np.sqrt(p)
    y = np.stack([_mm(x[g], w[g]) for g in range(G)]) + 0.3 * rng.standard_normal((G, n, t))
    alpha = np.logspace(-2, 2, G)[rng.permutation(G)]
    dt = spec["dtype"]
    return dict(x=_round(x, dt), y=_round(y, dt), alpha=_round(alpha, dt))


def draw_score_inputs(name, spec):
    rng = _rng_key(name)
    n, t = spec["n"], spec["t"]
    yt = rng.standard_normal((n, t)) + 0.5 * rng.standard_normal(t)
    rho = np.array([1.0, 0.5, 0.0, -0.5, 0.9, 0.2, -1.0, 0.7])[:t]
    yp = rho * yt + 0.5 * rng.standard_normal((n, t)) + 0.2 * rng.standard_normal(t)
    if spec["const"]:
        yt[:, 1] = 1.5
        yp[:, 2] = -0.75
    dt = spec["dtype"]
    return dict(y_true=_round(yt, dt), y_pred=_round(yp, dt))


# --------------------------------------------------------------------------
# Builders.
# --------------------------------------------------------------------------
def _versions():
    import himalaya
    import sklearn
    return dict(np=np.__version__, torch=torch.__version__.split("+")[0],
                himalaya=himalaya.__version__, sklearn=sklearn.__version__)


_MARGIN = {"f32": 1e-4, "f64": 1e-6}


def build_cv(name, spec):
    dt = spec["dtype"]
    tdt = _TORCH_DTYPE[dt]
    inp = draw_cv_inputs(name, spec)
    X, Y, alphas, folds = inp["x"], inp["y"], inp["alphas"], inp["folds"]
    score, center = spec["score"], spec["center"]
    ref = ridge_cv_ref(X, Y, alphas, folds, score, center)

    # Choices must be clear: constant targets tie exactly (score 0 everywhere);
    # every other target's best alpha beats the runner-up by a margin.
    cv = ref["cv_scores"]
    const = set(spec["const"])
    for j in range(Y.shape[1]):
        if j in const:
            assert np.all(cv[:, j] == 0.0), (name, j, cv[:, j])
            assert ref["best_alpha"][j] == alphas.max(), (name, j)
        elif len(alphas) > 1:
            s = np.sort(cv[:, j])[::-1]
            assert s[0] - s[1] > _MARGIN[dt], (name, j, s[0] - s[1], cv[:, j])

    # Cross-checks (float64).
    hm = _himalaya_cv(X, Y, alphas, folds, score, center)
    _assert_close(hm["cv_scores"], ref["cv_scores"], (name, "himalaya cv_scores"))
    _assert_close(hm["best_alpha"], ref["best_alpha"], (name, "himalaya best_alpha"), atol=0)
    _assert_close(hm["w"], ref["w"], (name, "himalaya w"))
    _assert_close(hm["intercept"], ref["intercept"], (name, "himalaya intercept"))
    extra = ""
    if X.shape[0] < X.shape[1] and not center:
        hk = _himalaya_kernel_cv(X, Y, alphas, folds, score)
        _assert_close(hk["best_alpha"], ref["best_alpha"], (name, "kernel best"), atol=0)
        _assert_close(hk["w"], ref["w"], (name, "himalaya kernel w"))
        extra = " and solve_kernel_ridge_cv_eigenvalues"
    sk = _sklearn_cv(X, Y, alphas, folds, score, center, ref["best_alpha"])
    _assert_close(sk["cv_scores"], ref["cv_scores"], (name, "sklearn cv_scores"))
    _assert_close(sk["w"], ref["w"], (name, "sklearn w"))
    _assert_close(sk["intercept"], ref["intercept"], (name, "sklearn intercept"))

    v = _versions()
    meta = {
        "op": "ridge.cv",
        "params": json.dumps({"score": score, "center": center}),
        "source": (f"numpy {v['np']} float64 Cholesky solve (primal n_train >= p, "
                   f"dual n_train < p); "
                   f"agrees with himalaya {v['himalaya']} solve_ridge_cv_svd{extra} and "
                   f"scikit-learn {v['sklearn']} Ridge"),
    }
    tensors = {
        "in.x": _t(X, dt), "in.y": _t(Y, dt), "in.alphas": _t(alphas, dt),
        "in.folds": torch.from_numpy(folds.copy()),
        "out.cv_scores": _t(ref["cv_scores"], dt),
        "out.best_alpha": _t(ref["best_alpha"], dt),
        "out.w": _t(ref["w"], dt),
        "out.intercept": _t(ref["intercept"], dt),
    }
    emu = emu_ridge_cv(tensors["in.x"], tensors["in.y"], tensors["in.alphas"], folds,
                       score, center)
    assert np.array_equal(emu["best_idx"], ref["best_idx"]), (name, emu["best_idx"],
                                                               ref["best_idx"])
    best_emu = tensors["in.alphas"][torch.from_numpy(emu["best_idx"])]
    checks = [("cv_scores", emu["cv_scores"].to(tdt), tensors["out.cv_scores"]),
              ("best_alpha", best_emu, tensors["out.best_alpha"]),
              ("w", emu["w"].to(tdt), tensors["out.w"]),
              ("intercept", emu["intercept"].to(tdt), tensors["out.intercept"])]
    return tensors, meta, checks


def build_solve_batched(name, spec):
    dt = spec["dtype"]
    tdt = _TORCH_DTYPE[dt]
    inp = draw_sb_inputs(name, spec)
    x, y, alpha = inp["x"], inp["y"], inp["alpha"]
    G, n, p = x.shape
    W = np.stack([ridge_solve_ref(x[g], y[g], alpha[g]) for g in range(G)])
    # Cross-check 1: batched torch.linalg.solve (float64), same form.
    xt, yt, at = (torch.from_numpy(v) for v in (x, y, alpha))
    xT = xt.transpose(1, 2)
    reg = lambda k: at[:, None, None] * torch.eye(k, dtype=xt.dtype)  # noqa: E731
    primal = torch.linalg.solve(xT @ xt + reg(p), xT @ yt)
    dual = xT @ torch.linalg.solve(xt @ xT + reg(n), yt)
    # Cross-check 2: the other form.
    Wt, W2 = (primal, dual) if n >= p else (dual, primal)
    _assert_close(Wt.numpy(), W, (name, "torch.linalg.solve"))
    _assert_close(W2.numpy(), W, (name, "other form"), rtol=1e-7, atol=1e-9)
    v = _versions()
    form = "primal (X^T X + alpha I)^-1 X^T Y" if n >= p else "dual X^T (X X^T + alpha I)^-1 Y"
    meta = {
        "op": "ridge.solve_batched",
        "source": (f"numpy {v['np']} float64 Cholesky solve, {form}; agrees with torch "
                   f"{v['torch']} "
                   f"batched torch.linalg.solve (both forms)"),
    }
    tensors = {"in.x": _t(x, dt), "in.y": _t(y, dt), "in.alpha": _t(alpha, dt),
               "out.w": _t(W, dt)}
    args = (tensors["in.x"], tensors["in.y"], tensors["in.alpha"])
    return tensors, meta, [("w eigh", emu_solve_batched_eigh(*args).to(tdt), tensors["out.w"]),
                           ("w cholesky", emu_solve_batched(*args).to(tdt), tensors["out.w"])]


def build_score(name, spec):
    import warnings
    from himalaya.backend import set_backend
    from himalaya.scoring import correlation_score, r2_score as h_r2
    from sklearn.metrics import r2_score

    dt = spec["dtype"]
    tdt = _TORCH_DTYPE[dt]
    inp = draw_score_inputs(name, spec)
    yt, yp = inp["y_true"], inp["y_pred"]
    r2 = r2_ref(yt, yp)
    pr = pearson_ref(yt, yp)
    _assert_close(r2_score(yt, yp, multioutput="raw_values"), r2, (name, "sklearn r2"))
    const = (np.ptp(yt, axis=0) == 0) | (np.ptp(yp, axis=0) == 0)
    assert const.sum() == (2 if spec["const"] else 0), (name, const)
    cc = np.array([0.0 if const[j] else np.corrcoef(yt[:, j], yp[:, j])[0, 1]
                   for j in range(yt.shape[1])])
    _assert_close(cc, pr, (name, "np.corrcoef"))
    set_backend("numpy", on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_close(h_r2(yt, yp), r2, (name, "himalaya r2"))
        _assert_close(correlation_score(yt, yp), pr, (name, "himalaya correlation"))
    v = _versions()
    meta = {
        "op": "ridge.score",
        "source": (f"numpy {v['np']} float64 two-pass; agrees with scikit-learn {v['sklearn']} "
                   f"r2_score, np.corrcoef and himalaya {v['himalaya']} r2_score/"
                   f"correlation_score"),
    }
    tensors = {"in.y_true": _t(yt, dt), "in.y_pred": _t(yp, dt),
               "out.r2": _t(r2, dt), "out.pearson": _t(pr, dt)}
    et, ep = tensors["in.y_true"], tensors["in.y_pred"]
    checks = [("r2", _emu_r2(et, ep).to(tdt), tensors["out.r2"]),
              ("pearson", _emu_pearson(et, ep).to(tdt), tensors["out.pearson"])]
    return tensors, meta, checks


def build(name, spec):
    op = spec["op"]
    if op == "ridge.cv":
        return build_cv(name, spec)
    if op == "ridge.solve_batched":
        return build_solve_batched(name, spec)
    if op == "ridge.score":
        return build_score(name, spec)
    if op == "ridge.banded_cv":
        return build_banded_cv(name, spec)
    if op == "ridge.split_scores":
        return build_split_scores(name, spec)
    raise ValueError(op)


# --------------------------------------------------------------------------
# Banded ridge (ridge.banded_cv, ridge.split_scores).
# --------------------------------------------------------------------------
def _groups(rng, sizes):
    """Interleaved space ids: sizes[s] columns of space s, in a shuffled order."""
    g = np.repeat(np.arange(len(sizes)), sizes)
    return g[rng.permutation(len(g))].astype(np.int32)


def draw_banded_inputs(name, spec):
    """x: per-space columns with their own scales; y: each target driven by the spaces
    with target-dependent weights and noise, so that targets prefer different candidates."""
    rng = _rng_key(name)
    n, sizes, t, A, C = spec["n"], spec["sizes"], spec["t"], spec["A"], spec["C"]
    S, p = len(sizes), sum(sizes)
    groups = _groups(rng, sizes)
    x = rng.standard_normal((n, p)) * np.logspace(0, -0.5, p) + 0.3 * rng.standard_normal(p)
    mix = rng.dirichlet(np.full(S, 0.5), size=t)  # [t, S]: each target's space weights
    w = rng.standard_normal((p, t)) / np.sqrt(p) * np.sqrt(3.0 * mix[:, groups].T)
    sig = np.logspace(-1.0, 0.3, t)
    y = _mm(x, w) + sig * rng.standard_normal((n, t)) + 0.5 * rng.standard_normal(t)
    alphas = np.logspace(-2, 3, A)
    gammas = np.vstack([np.full((1, S), 1.0 / S), rng.dirichlet(np.full(S, 1.0), size=C - 1)])
    sizes_f = spec["fold_sizes"]
    folds = np.repeat(np.arange(len(sizes_f)), sizes_f)
    folds = folds[rng.permutation(n)]
    dt = spec["dtype"]
    # gamma rows are rounded to the dtype, then renormalized in float64 (still within the
    # simplex tolerance after the dtype rounding)
    gammas = _round(gammas, dt)
    return dict(x=_round(x, dt), y=_round(y, dt), alphas=_round(alphas, dt),
                gammas=gammas, groups=groups, folds=folds.astype(np.int32))


def banded_cv_ref(X, Y, groups, alphas, gammas, folds, score, center):
    """float64: ridge_cv_ref on the columns scaled by sqrt(gamma) for each candidate, then
    per target the best candidate (the earliest among equal scores)."""
    C, S = gammas.shape
    per = [ridge_cv_ref(X * np.sqrt(g[groups]), Y, alphas, folds, score, center)
           for g in gammas]
    best_cv = np.stack([r["cv_scores"].max(0) for r in per])  # [C, t]
    best_c = np.argmax(best_cv, axis=0)  # first maximum: the earliest candidate
    t = Y.shape[1]
    W = np.zeros((X.shape[1], t))
    intercept = np.zeros(t)
    best_alpha = np.zeros(t)
    for j in range(t):
        r, g = per[best_c[j]], gammas[best_c[j]]
        W[:, j] = r["w"][:, j] * np.sqrt(g[groups])
        intercept[j] = r["intercept"][j] if center else 0.0
        best_alpha[j] = r["best_alpha"][j]
    with np.errstate(divide="ignore"):
        deltas = np.log(gammas[best_c].T / best_alpha[None, :])
    return dict(cv_scores=best_cv, deltas=deltas, w=W, intercept=intercept, best_c=best_c,
                per=per)


def _himalaya_banded(X, Y, groups, alphas, gammas, folds, score, center, dtype):
    """himalaya's solve_group_ridge_random_search with the candidates given, in `dtype`;
    returns outputs in the original column order, cv_scores without its tie-break slope."""
    import warnings
    from himalaya.backend import set_backend
    from himalaya.ridge import solve_group_ridge_random_search
    from himalaya.scoring import correlation_score, r2_score
    from sklearn.model_selection import PredefinedSplit

    set_backend("numpy", on_error="raise")
    npdt = _NP_DTYPE[dtype]
    S = gammas.shape[1]
    order = np.concatenate([np.flatnonzero(groups == s) for s in range(S)])
    Xs = [X[:, groups == s].astype(npdt) for s in range(S)]
    score_func = {"r2": r2_score, "pearson": correlation_score}[score]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve_group_ridge_random_search(
            Xs, Y.astype(npdt), n_iter=gammas.astype(npdt), alphas=alphas.astype(npdt),
            fit_intercept=center, score_func=score_func, cv=PredefinedSplit(folds),
            return_weights=True, progress_bar=False, warn=False)
    deltas, coef, cv_scores = (np.asarray(v, dtype=np.float64) for v in res[:3])
    W = np.zeros_like(coef)
    W[order] = coef
    intercept = np.asarray(res[3], dtype=np.float64) if center else np.zeros(Y.shape[1])
    return dict(cv_scores=cv_scores, deltas=deltas, w=W, intercept=intercept)


def _banded_margins_ok(ref, dt):
    """Choices must be clear: per target the best candidate beats the next one, and within
    it the best alpha beats the runner-up, by a margin."""
    for j in range(ref["w"].shape[1]):
        s = np.sort(ref["cv_scores"][:, j])[::-1]
        cv = np.sort(ref["per"][ref["best_c"][j]]["cv_scores"][:, j])[::-1]
        if s[0] - s[1] <= _MARGIN[dt] or (len(cv) > 1 and cv[0] - cv[1] <= _MARGIN[dt]):
            return False
    return True


def build_banded_cv(name, spec):
    dt = spec["dtype"]
    score, center = spec["score"], spec["center"]
    # the first draw (seeds name, name#1, ...) whose choices are clear
    for attempt in range(100):
        inp = draw_banded_inputs(name if attempt == 0 else f"{name}#{attempt}", spec)
        X, Y, groups, alphas, gammas, folds = (
            inp[k] for k in ("x", "y", "groups", "alphas", "gammas", "folds"))
        ref = banded_cv_ref(X, Y, groups, alphas, gammas, folds, score, center)
        if _banded_margins_ok(ref, dt):
            break
    else:
        raise AssertionError((name, "no draw with clear choices"))
    # The stored outputs are himalaya's (float64), without its 1e-10 log(alpha) slope
    # (cv_scores per candidate at that candidate's best alpha; the reference tells which).
    hm = _himalaya_banded(X, Y, groups, alphas, gammas, folds, score, center, "f64")
    best_idx = np.stack([r["best_idx"] for r in ref["per"]])  # [C, t]
    hm["cv_scores"] = hm["cv_scores"] - 1e-10 * np.log(alphas[best_idx])
    for k in ("cv_scores", "deltas", "w", "intercept"):
        _assert_close(hm[k], ref[k], (name, "numpy reference " + k))
    v = _versions()
    meta = {
        "op": "ridge.banded_cv",
        "params": json.dumps({"score": score, "center": center}),
        "source": (f"himalaya {v['himalaya']} solve_group_ridge_random_search (BandedRidgeCV's "
                   f"solver, numpy backend, float64, the candidates given as n_iter; cv_scores "
                   f"without its 1e-10 log(alpha) tie-break slope); agrees with a numpy float64 "
                   f"Cholesky ridge per candidate (ridge_cv_ref on the scaled columns)"),
    }
    tensors = {
        "in.x": _t(X, dt), "in.groups": torch.from_numpy(groups.copy()),
        "in.y": _t(Y, dt), "in.alphas": _t(alphas, dt), "in.gammas": _t(gammas, dt),
        "in.folds": torch.from_numpy(folds.copy()),
        "out.cv_scores": _t(hm["cv_scores"], dt), "out.deltas": _t(hm["deltas"], dt),
        "out.w": _t(hm["w"], dt), "out.intercept": _t(hm["intercept"], dt),
    }
    # self-check: himalaya itself run in the case dtype (F32), the numpy reference (F64)
    if dt == "f64":
        hd = ref
    else:
        hd = _himalaya_banded(X, Y, groups, alphas, gammas, folds, score, center, dt)
        hd["cv_scores"] = hd["cv_scores"] - 1e-10 * np.log(alphas[best_idx])
    tdt = _TORCH_DTYPE[dt]
    checks = [(k, torch.from_numpy(hd[k]).to(tdt), tensors["out." + k])
              for k in ("cv_scores", "deltas", "w", "intercept")]
    return tensors, meta, checks


def split_scores_ref(X, groups, W, Y):
    """float64, written out: a = y - mean(y), q_s = X_s w_s centered; r2_s = sum(2 a q_s -
    q_s sum_s' q_s') / sum(a^2); pearson_s = mean(a q_s) / (std(a) std(sum q))."""
    S = int(groups.max()) + 1
    a = Y - Y.mean(0)
    q = np.stack([_mm(X[:, groups == s], W[groups == s]) for s in range(S)])
    q = q - q.mean(1, keepdims=True)
    tot = q.sum(0)
    sst = (a ** 2).sum(0)
    r2 = np.stack([(2 * a * q[s] - q[s] * tot).sum(0) / sst for s in range(S)])
    sd_a = np.sqrt((a ** 2).mean(0))
    sd_p = np.sqrt((tot ** 2).mean(0))
    pr = np.stack([(a * q[s]).mean(0) / (sd_a * sd_p) for s in range(S)])
    return r2, pr, q


def build_split_scores(name, spec):
    """w from a banded fit (himalaya, float64) on the first half of the rows; x and y are the
    other half (held out), so the split scores are those of a test set."""
    import warnings
    from himalaya.backend import set_backend
    from himalaya.scoring import correlation_score_split, r2_score_split

    dt = spec["dtype"]
    fit_spec = dict(spec, A=5, C=4, fold_sizes=(spec["n"] // 2,) * 2)
    inp = draw_banded_inputs(name, fit_spec)
    X, Y, groups = inp["x"], inp["y"], inp["groups"]
    n = spec["n"]
    tr, te = slice(0, n // 2), slice(n // 2, n)
    folds = np.repeat([0, 1], [n // 4, n // 2 - n // 4]).astype(np.int32)
    hm = _himalaya_banded(X[tr], Y[tr], groups, inp["alphas"], inp["gammas"], folds, "r2",
                          True, "f64")
    W = _round(hm["w"], dt)
    Xte, Yte = X[te], Y[te]
    r2, pr, q = split_scores_ref(Xte, groups, W, Yte)
    set_backend("numpy", on_error="raise")
    S = len(spec["sizes"])
    qraw = np.stack([_mm(Xte[:, groups == s], W[groups == s]) for s in range(S)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h_r2 = np.asarray(r2_score_split(Yte - Yte.mean(0), q))
        h_pr = np.asarray(correlation_score_split(Yte, qraw))
    _assert_close(h_r2, r2, (name, "himalaya r2_score_split"))
    _assert_close(h_pr, pr, (name, "himalaya correlation_score_split"))
    # the r2 split sums to the R² of the prediction shifted to the targets' mean
    joint = 1 - ((Yte - Yte.mean(0) - q.sum(0)) ** 2).sum(0) / ((Yte - Yte.mean(0)) ** 2).sum(0)
    _assert_close(r2.sum(0), joint, (name, "r2 split sums to the joint R2"))
    v = _versions()
    score = spec["score"]
    meta = {
        "op": "ridge.split_scores",
        "params": json.dumps({"score": score}),
        "source": (f"himalaya {v['himalaya']} "
                   + ("r2_score_split of y - mean(y) and the per-space predictions centered "
                      "over the rows" if score == "r2" else "correlation_score_split")
                   + " (numpy backend, float64; in.intercept, the fit's, shifts every "
                   "prediction by a constant and so does not enter); agrees with a numpy "
                   "float64 evaluation of the same formula"),
    }
    want = h_r2 if score == "r2" else h_pr
    tensors = {"in.x": _t(Xte, dt), "in.groups": torch.from_numpy(groups.copy()),
               "in.w": _t(W, dt), "in.intercept": _t(hm["intercept"], dt),
               "in.y": _t(Yte, dt), "out.scores": _t(want, dt)}
    # self-check: the formulas on the dtype's inputs, in the dtype (torch)
    tdt = _TORCH_DTYPE[dt]
    xt, wt, yt = tensors["in.x"], tensors["in.w"], tensors["in.y"]
    a = yt - yt.mean(0)
    qs = torch.stack([xt[:, torch.from_numpy(groups == s)] @ wt[torch.from_numpy(groups == s)]
                      for s in range(S)])
    qs = qs - qs.mean(1, keepdim=True)
    tot = qs.sum(0)
    if score == "r2":
        emu = torch.stack([(2 * a * qs[s] - qs[s] * tot).sum(0) / (a ** 2).sum(0)
                           for s in range(S)])
    else:
        emu = torch.stack([(a * qs[s]).mean(0) / ((a ** 2).mean(0).sqrt()
                                                  * (tot ** 2).mean(0).sqrt())
                           for s in range(S)])
    return tensors, meta, [(score, emu.to(tdt), tensors["out.scores"])]
