"""k-means on the start's sample (:mod:`xd_dask.optim.kmeans`, step 2): seeded k-means++ starts
run by Lloyd steps together on a subset of the sample, the best refined on all of it. NumPy on
one BLAS thread (the client's share of the machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np
from threadpoolctl import ThreadpoolController

from xd_dask.codecache import numba_cache_ok
from xd_dask.utils import get_logger

log = get_logger(__name__)

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["kmeans_plusplus", "lloyd", "nearest", "sample_kmeans"]

#: Seeded k-means++ starts on the sample; the lowest inertia is kept.
N_INIT = 10
#: Lloyd iterations on the sample (at most).
SAMPLE_LLOYD_ITER = 100
#: The starts run to convergence on this many rows of the sample (at least
#: :data:`SELECT_ROWS_PER_CENTRE` per centre), not on all of it (:func:`sample_kmeans`).
SELECT_ROWS = 2048
SELECT_ROWS_PER_CENTRE = 32
#: The starts of lowest cost on the whole sample that Lloyd steps then refine there.
N_REFINE = 3
#: Lloyd steps on the sample stop when the centres move by at most this (summed squared shift,
#: relative to the mean column variance: scikit-learn's ``tol``).
SAMPLE_TOL = 1e-4

#: Rows of the sample whose density decides where trimmed k-means may put its seeds.
SEED_ROWS = 2000
#: The density proxy: distance to the SEED_NEIGHBOUR-th nearest of the seed rows.
SEED_NEIGHBOUR = 10


def _dense_rows(Zs: np.ndarray, trim: float, rng: np.random.Generator) -> np.ndarray:
    """The densest (1 - ``trim``) of a random subset of the sample's rows (distance to their
    :data:`SEED_NEIGHBOUR`-th nearest neighbour in the subset): where seeds may go. k-means++
    alone picks far rows first, i.e. the outliers a background is for."""
    sub = Zs[rng.choice(Zs.shape[0], min(SEED_ROWS, Zs.shape[0]), replace=False)]
    sq = np.sum(sub * sub, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (sub @ sub.T)  # (m, m)
    k = min(SEED_NEIGHBOUR, sub.shape[0] - 1)
    kth = np.partition(d2, k, axis=1)[:, k]
    return sub[kth <= np.quantile(kth, 1.0 - trim)]


def _sqdist(Z: np.ndarray, z2: np.ndarray, C: np.ndarray) -> np.ndarray:
    """(n, m) squared distances of the rows Z (n, D; ``z2`` their squared norms) to C (m, D)."""
    d2 = Z @ (-2.0 * C.T)
    d2 += z2[:, None]
    d2 += np.einsum("ij,ij->i", C, C)[None, :]
    return np.maximum(d2, 0.0, out=d2)


def kmeans_plusplus(Z: np.ndarray, K: int, n_starts: int, rng: np.random.Generator) -> np.ndarray:
    """``n_starts`` independent sets of K seeds (n_starts, K, D) among the rows of Z (n, D) by
    greedy k-means++ (Arthur & Vassilvitskii 2007, with scikit-learn's 2 + log K candidates per
    seed): each next seed is the candidate, drawn with probability proportional to the squared
    distance to the nearest seed so far, that leaves the lowest summed squared distance. The
    starts advance together (one array operation per seed for all of them)."""
    n, D = Z.shape
    S, trials = int(n_starts), 2 + int(np.log(K))
    z2 = np.einsum("ij,ij->i", Z, Z)
    seeds = np.empty((S, K, D))
    seeds[:, 0] = Z[rng.integers(n, size=S)]
    closest = _sqdist(Z, z2, seeds[:, 0])  # (n, S): to the nearest seed of each start
    cols = np.arange(S)
    for k in range(1, K):
        cum = np.cumsum(closest, axis=0)  # (n, S)
        total = cum[-1]
        u = rng.random((S, trials)) * total[:, None]
        cand = np.stack([np.searchsorted(cum[:, j], u[j]) for j in range(S)])  # (S, trials)
        anywhere = rng.integers(n, size=cand.shape)  # when every row sits on a seed already
        flat = np.where(total[:, None] > 0, np.minimum(cand, n - 1), anywhere).ravel()
        d2 = _sqdist(Z, z2, Z[flat]).reshape(n, S, trials)  # to every candidate
        np.minimum(d2, closest[:, :, None], out=d2)
        best = np.argmin(d2.sum(axis=0), axis=1)  # (S,)
        pick = flat.reshape(S, trials)[cols, best]
        seeds[:, k] = Z[pick]
        closest = d2[:, cols, best]
    return seeds


#: Rows the compiled loops take at once: each (set, centre) sweeps the block's columns (held
#: column-major, so that the sweep over rows is one vector operation per column).
ROW_BLOCK = 256


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _nearest_block(ZT, a, m, C, best, arg):  # pragma: no cover - compiled
    """best[r], arg[r] for the rows a .. a + m - 1 of ZT (D, n): the squared distance to the
    nearest of the centres C (K, D) and its index (the first of equals), each distance summed
    over the columns in order as differences (no |z|^2 - 2 z.c + |c|^2 cancellation)."""
    K, D = C.shape
    acc = np.empty(m)
    b, g = best[:m], arg[:m]
    b[:], g[:] = np.inf, 0
    for k in range(K):
        acc[:] = 0.0
        for j in range(D):
            c, zj = C[k, j], ZT[j, a : a + m]
            for r in range(m):
                t = zj[r] - c
                acc[r] += t * t
        for r in range(m):
            lt = acc[r] < b[r]
            b[r] = acc[r] if lt else b[r]
            g[r] = k if lt else g[r]


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _sweep(Z, ZT, centres, labels, d2, counts, sums):  # pragma: no cover - compiled
    """One sweep over the rows of ZT (D, n: the rows column-major; Z the same rows row-major,
    read only for the sums) for S sets of K centres (S, K, D): d2[s, i] each row's squared
    distance to its nearest centre of set s (:func:`_nearest_block`), its index into
    labels[i, s] unless ``labels`` has no rows, and unless ``counts`` is empty one Lloyd step's
    sums: counts[s K + k], sums[s K + k] the rows nearest to centre k of set s and their sum
    (added in row order)."""
    D, n = ZT.shape
    S, K = centres.shape[0], centres.shape[1]
    want_labels, want_sums = labels.shape[0] > 0, counts.shape[0] > 0
    best, arg = np.empty(ROW_BLOCK), np.empty(ROW_BLOCK, dtype=np.int64)
    for a in range(0, n, ROW_BLOCK):
        m = min(ROW_BLOCK, n - a)
        for s in range(S):
            _nearest_block(ZT, a, m, centres[s], best, arg)
            for r in range(m):
                d2[s, a + r] = best[r]
                if want_labels:
                    labels[a + r, s] = arg[r]
                if want_sums:
                    b = s * K + arg[r]
                    counts[b] += 1.0
                    zi, sb = Z[a + r], sums[b]
                    for j in range(D):
                        sb[j] += zi[j]


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def _bin_sums(Z, bins, n_bins, counts, sums):  # pragma: no cover - compiled
    """counts[b], sums[b]: rows and summed rows of Z (n, D) per bin, bins (n, S) in
    0 .. n_bins - 1 (a row once per set); a bin of n_bins or more is left out."""
    n, D = Z.shape
    for i in range(n):
        for s in range(bins.shape[1]):
            b = bins[i, s]
            if b < n_bins:
                counts[b] += 1.0
                for j in range(D):
                    sums[b, j] += Z[i, j]


#: :func:`nearest` runs compiled loops up to this K x D, BLAS products on one thread above it
#: (measured on 20,000 rows, 3 sets: loops / BLAS 0.22 at K = 8, D = 7; 0.37 at K = 16, D = 7;
#: 0.56 at K = 64, D = 7; 0.47 at K = 256, D = 20; level at K = 256, D = 7).
LOOP_KD = 1024
#: Empty outputs: what :func:`_sweep` is not asked for.
_NO_LABELS = np.empty((0, 0), dtype=np.int64)
_NONE, _NONE2 = np.empty(0), np.empty((0, 0))
#: Distances held at once by the BLAS path (rows x sets x K), so that a step stays in cache.
LLOYD_BLOCK = 1 << 15


def warm_up() -> None:
    """Load the compiled loops (from Numba's cache, or compile them): the first call in a
    process costs ~0.35 s (Numba's CPU target), ten times a small table's whole start.
    :func:`xd_dask.distributed.connect` runs this in a thread while the cluster starts."""
    Z = np.zeros((2, 2))
    lloyd(Z, Z[None], 0.0, max_iter=1)
    lloyd(Z, Z[None], 0.0, max_iter=1, trim=0.5)


def nearest(
    Z: np.ndarray, centres: np.ndarray, ZT: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n, S), squared distances (n, S)) of the rows Z (n, D) to the nearest of the K
    centres of each of S sets (S, K, D): compiled loops for small K x D (:data:`LOOP_KD`; the
    start of a small table spends most of its time here; ``ZT`` is Z column-major, if the
    caller holds it; the distances are then a view of an (S, n) array), else blocked BLAS
    products."""
    S, K, D = centres.shape
    n = Z.shape[0]
    if K * D <= LOOP_KD:
        if ZT is None:
            ZT = _columns(Z)
        labels, d2 = np.empty((n, S), dtype=np.int64), np.empty((S, n))
        C = np.ascontiguousarray(centres, dtype=np.float64)
        _sweep(_NONE2, ZT, C, labels, d2, _NONE, _NONE2)  # Z row-major: for sums only
        return labels, d2.T
    C = centres.reshape(S * K, D)
    cT, c2 = -2.0 * C.T, np.einsum("ij,ij->i", C, C)
    labels, d2 = np.empty((n, S), dtype=np.int64), np.empty((n, S))
    step = max(1, LLOYD_BLOCK // (S * K))
    first = np.arange(min(step, n) * S).reshape(-1, S) * K  # flat index of each (row, set)'s k=0
    for a in range(0, n, step):
        z = Z[a : a + step]
        d = z @ cT  # (m, S K)
        d += c2
        lab = np.argmin(d.reshape(z.shape[0], S, K), axis=2)  # (m, S)
        labels[a : a + step] = lab
        d2[a : a + step] = np.take(d, first[: z.shape[0]] + lab)
    d2 += np.einsum("ij,ij->i", Z, Z)[:, None]
    return labels, np.maximum(d2, 0.0, out=d2)


def _columns(Z: np.ndarray) -> np.ndarray:
    """Z (n, D) as float64 held column-major: (D, n) C-contiguous (what the loops sweep)."""
    return np.ascontiguousarray(np.asarray(Z, dtype=np.float64).T)


def lloyd(
    Z: np.ndarray,
    centres: np.ndarray,
    tol: float,
    *,
    trim: float = 0.0,
    max_iter: int = SAMPLE_LLOYD_ITER,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps on the rows Z (n, D) for S sets of K centres (S, K, D) at once; returns
    (centres (S, K, D), cost (S,)): each set's summed squared distance of the rows to their
    nearest centre.

    Without ``trim`` (plain k-means) an empty cluster takes the row farthest from its centre
    (as scikit-learn's). With ``trim`` (trimmed k-means, module docstring) every step leaves out
    of each set's means the fraction ``trim`` of rows farthest from their centres (and of its
    cost); an empty cluster keeps its centre. Stops when no set's centres move by more than
    ``tol`` (summed squared shift), at most ``max_iter`` steps (0: the cost of ``centres``).
    """
    S, K, D = centres.shape
    n = Z.shape[0]
    n_keep = max(K, int(np.ceil((1.0 - trim) * n)))
    Z = np.ascontiguousarray(Z, dtype=np.float64)
    ZT = _columns(Z) if K * D <= LOOP_KD else None
    centres = np.ascontiguousarray(centres, dtype=np.float64)
    for _ in range(int(max_iter)):
        new = _step(Z, ZT, centres, trim, n_keep)
        shift = np.sum((new - centres) ** 2, axis=(1, 2))  # (S,)
        centres = new
        if np.all(shift <= tol):
            break
    if ZT is not None:  # distances only: writing nearest()'s labels would triple the cost
        d2 = np.empty((S, n))
        _sweep(_NONE2, ZT, centres, _NO_LABELS, d2, _NONE, _NONE2)
    else:
        d2 = np.ascontiguousarray(nearest(Z, centres)[1].T)  # a sum over axis 0 of (n, S) is slow
    if trim > 0:
        d2 = np.partition(d2, n_keep - 1, axis=1)[:, :n_keep]
    return centres, np.sum(d2, axis=1)


def _step(Z: np.ndarray, ZT: np.ndarray | None, C: np.ndarray, trim: float, n_keep: int):
    """One Lloyd step of :func:`lloyd` for the sets of centres C (A, K, D): their new centres."""
    A, K, D = C.shape
    n = Z.shape[0]
    counts, sums = np.zeros(A * K), np.zeros((A * K, D))
    if ZT is not None and trim <= 0:  # one sweep: nearest centres and their sums
        d2_sets = np.empty((A, n))  # the sweep's stores run along the rows of each set
        _sweep(Z, ZT, C, _NO_LABELS, d2_sets, counts, sums)
        d2 = d2_sets.T
    else:
        labels, d2 = nearest(Z, C, ZT)
        bins = labels + (np.arange(A) * K)[None, :]  # bins of set s are s K .. s K + K - 1
        if trim > 0:  # the n_keep nearest rows of each set
            far = np.argpartition(d2, n_keep - 1, axis=0)[n_keep:]  # (n - n_keep, A)
            bins[far, np.arange(A)[None, :]] = A * K  # a bin past the last: left out
        _bin_sums(Z, bins, A * K, counts, sums)
    new = (sums / np.maximum(counts, 1.0)[:, None]).reshape(A, K, D)
    empty = (counts == 0).reshape(A, K)
    if empty.any():
        new[empty] = C[empty]
        if trim <= 0:
            for s_, k_ in zip(*np.nonzero(empty), strict=True):  # farthest rows first
                i = int(np.argmax(d2[:, s_]))
                new[s_, k_], d2[i, s_] = Z[i], -1.0
    return new


def sample_kmeans(Zs: np.ndarray, K: int, seed: int, trim: float = 0.0) -> np.ndarray:
    """Centres (K, D) of k-means on the sample Zs (n, D; standardised): the lowest cost of
    :data:`N_INIT` seeded k-means++ starts (:func:`kmeans_plusplus`). The starts run by Lloyd
    steps (:func:`lloyd`, all at once) on a seeded subset of ``max(SELECT_ROWS,
    SELECT_ROWS_PER_CENTRE K)`` rows (the whole sample if smaller); the :data:`N_REFINE` of
    them with the lowest cost on the whole sample continue there. Lloyd stops when the centres
    move by at most :data:`SAMPLE_TOL` x the mean column variance (scikit-learn's rule).
    Measured on 200,000 Gaia-like rows, 24 seeds each, K = 8 and 16: the start's mean
    log-likelihood equals that of scikit-learn's best of 10 full runs (within its seed-to-seed
    spread), at a third to a half of its CPU time and without its seconds of import. The centres
    come sorted by their coordinates (the first, then the next), so that a few rows more or less
    in the sample change neither the clusters nor their order.

    With ``trim`` (trimmed k-means, module docstring) the seeds are drawn among the dense rows
    (:func:`_dense_rows`) and the Lloyd steps leave out the farthest rows. NumPy on one BLAS
    thread: the client shares the machine with workers (threads spinning against them made
    k-means on 2 busy cores 20x slower).
    """
    rng = np.random.default_rng([int(seed), 19 if trim > 0 else 17])
    n = Zs.shape[0]
    m = max(SELECT_ROWS, SELECT_ROWS_PER_CENTRE * int(K))
    with _one_blas_thread():
        tol = SAMPLE_TOL * float(np.mean(np.var(_columns(Zs), axis=1)))
        sub = Zs if m >= n else Zs[np.sort(rng.choice(n, m, replace=False))]
        seeds_from = sub
        if trim > 0:
            seeds_from = _dense_rows(Zs, trim, rng)
            if seeds_from.shape[0] < K:
                seeds_from = Zs
        centres, cost = lloyd(sub, kmeans_plusplus(seeds_from, K, N_INIT, rng), tol, trim=trim)
        if sub is not Zs:  # the best few on the whole sample, refined there
            cost = lloyd(Zs, centres, tol, trim=trim, max_iter=0)[1]
            best = centres[np.argsort(cost, kind="stable")[:N_REFINE]]
            centres, cost = lloyd(Zs, best, tol, trim=trim)
    best = centres[int(np.argmin(cost))]
    return best[np.lexsort(best.T[::-1])]


_BLAS: Any = None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside the block (threadpoolctl's controller, made once: finding the
    loaded libraries costs milliseconds)."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=1, user_api="blas"):
        yield
