"""numba.cuda emitter: Python source of the GPU XD kernels from :mod:`.algebra`.

The per-pair algebra is the CPU kernels' (:mod:`.emit_numba`), re-targeted: a component's
parameters are read from a (n_par, Kp) array ``P[q, j]`` (rows of :func:`.algebra.param_rows`,
re-read per row: preloading them all spills registers in float64 at d = 7), the pair's values
live in registers, the log-determinant comes from ``math.frexp`` (one ``log`` per pair, no
overflow), and the statistics are summed in float64 registers. Nothing here imports numba;
:mod:`xd_dask.kernels._cuda` compiles the source with ``cuda``, ``math`` and the numeric
constants of :func:`constants`.

Row inputs: ``x`` (n, d) centred values, ``S`` (n, npk(d)) the noise covariances as PACKED lower
triangles (entry (a, b), a >= b, at column :func:`.algebra.tri`), ``R`` (n, d, D) with
projections. Statistics partials: ``part`` (n_blocks, n_acc, Kp) float64, slot 0 = n_j, 1 + a =
a_j, 1 + D + tri(a, b) = C_j (D = d without projections); ``status`` records, per (block,
component), the first row whose T_ij has a non-positive pivot (-1: none).

Kernels (``D`` = 0: no projections):

- :func:`stats_fused_source`: one block of ``BLOCK`` threads (thread = component, K <= BLOCK)
  walks a slab of rows; per row the block reduces max and sum of the log densities in shared
  memory (log-sum-exp) and every thread adds its pair's terms with weight r_ij.
- For K above one block, two passes: :func:`logdens_source` (thread per pair, also the
  log-density kernel), :func:`row_lse_source` (thread per row: log sum_j exp), then
  :func:`stats_given_source` (K-tiled blocks: thread = component of the tile, reading the
  pass-one log densities and the row totals).
- :func:`posterior_source`: thread per row (DESIGN.md 4a, without projections).
"""

from __future__ import annotations

import math

import numpy as np

from xd_dask.kernels.codegen import algebra as alg

__all__ = [
    "constants",
    "logdet_frexp",
    "logdens_source",
    "n_acc",
    "posterior_source",
    "row_lse_source",
    "stats_fused_source",
    "stats_given_source",
]


def constants(fp32: bool) -> dict:
    """The numeric globals the generated GPU code reads (numba freezes them as compile-time
    constants): the compute dtype ``DT`` and its ``ONE``, ``ZERO``, ``HALF``, ``LN2``, ``NEG``
    (the padding log weight) and ``BG_OFF``."""
    dt = np.float32 if fp32 else np.float64
    return {**alg.scalar_constants(fp32), "NEG": dt(alg.PAD_LOGW)}


def n_acc(d: int, D: int = 0) -> int:
    """Rows of the statistics partials: n_j, a_j (D), packed C_j."""
    Dp = D or d
    return 1 + Dp + alg.npk(Dp)


def logdet_frexp(pivots: list[str]) -> tuple[list[str], str]:
    """log det = log(prod of mantissas) + ln 2 * (sum of exponents): one ``log`` per pair, and
    no overflow (mantissas in [0.5, 1)). A pair flagged ``bad`` (computed just before, see
    :func:`.algebra.pair_logdens`) takes log 1 instead: its value is never used, and the
    simulator's ``math.log`` raises where a device returns NaN."""
    lines = [f"fm{k}, fe{k} = math.frexp({p})" for k, p in enumerate(pivots)]
    prod = " * ".join(f"fm{k}" for k in range(len(pivots)))
    lines.append(f"ldm = math.log(ONE if bad > ZERO else {prod})")
    lines.append("lde = " + " + ".join(f"fe{k}" for k in range(len(pivots))))
    return lines, "ldm + LN2 * DT(lde)"


def _par(j: str = "jj"):
    return lambda q: f"P[{q}, {j}]"


def _ind(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def _row_loads(d: int, D: int) -> list[str]:
    lines = [f"x{a} = x[i, {a}]" for a in range(d)]
    lines += [f"s{a}_{b} = S[i, {alg.tri(a, b)}]" for a in range(d) for b in range(a + 1)]
    lines += [f"R{a}_{e} = R[i, {a}, {e}]" for a in range(d) for e in range(D)]
    return lines


def _pair(d: int, D: int, full: bool, j: str = "jj") -> list[str]:
    lines = alg.pair_logdens(d, _par(j), logdet_frexp, D)
    return lines + (alg.pair_inverse(d) if full else [])


def _terms(d: int, D: int) -> tuple[list[str], list[tuple[int, str | None]]]:
    if D:
        return alg.stats_terms_projected(d, D)
    return [], alg.stats_terms(d)


def _accumulate(d: int, D: int) -> list[str]:
    """``acc{slot} += r * term`` in float64 (``r`` float64)."""
    lines, terms = _terms(d, D)
    out = list(lines)
    for slot, expr in terms:
        out.append(f"acc{slot} += r" if expr is None else f"acc{slot} += r * float({expr})")
    return out


def _rows_arg(D: int) -> str:
    return "x, S, R" if D else "x, S"


def _tree(block: int, op: str) -> list[str]:
    """Shared-memory tree reduction of ``sm[:block]`` into ``sm[0]`` (``op`` "max" or "+")."""
    out = []
    s = block // 2
    while s >= 1:
        expr = f"max(sm[j], sm[j + {s}])" if op == "max" else f"sm[j] + sm[j + {s}]"
        out += [f"if j < {s}:", f"    sm[j] = {expr}", "cuda.syncthreads()"]
        s //= 2
    return out


def _slab() -> list[str]:
    return [
        "n = x.shape[0]",
        "r0 = blk * rows_per_block",
        "r1 = min(r0 + rows_per_block, n)",
    ]


def stats_fused_source(d: int, block: int, D: int = 0) -> str:
    """``kernel(x, S, [R,] rw, P, K, rows_per_block, lbg, part, llp, bgp, status)``, launched
    with ``block`` threads (a power of two >= K) per block: block ``b`` adds the statistics of
    rows ``[b * rows_per_block, (b + 1) * rows_per_block)`` into ``part[b]``, their weighted
    log-likelihood into ``llp[b]`` and background responsibilities into ``bgp[b]`` (``lbg`` the
    background's log density, ``<= BG_OFF``: none)."""
    nA = n_acc(d, D)
    src = [
        f"def kernel({_rows_arg(D)}, rw, P, K, rows_per_block, lbg, part, llp, bgp, status):",
        f"    CNORM = DT({cnorm(d)!r})",
        "    j = cuda.threadIdx.x",
        "    blk = cuda.blockIdx.x",
        f"    sm = cuda.shared.array({block}, DT)",
        *_ind(_slab(), 4),
        "    act = j < K",
        "    jj = j if act else 0",
        *[f"    acc{k} = 0.0" for k in range(nA)],
        "    ll = 0.0",
        "    bgs = 0.0",
        "    first = -1",
        "    for i in range(r0, r1):",
        *_ind(_row_loads(d, D), 8),
        *_ind(_pair(d, D, True), 8),
        "        if act and bad > ZERO and first < 0:",
        "            first = i",
        "        lpv = logp if act else NEG",
        "        sm[j] = lpv",
        "        cuda.syncthreads()",
        *_ind(_tree(block, "max"), 8),
        "        mx = sm[0]",
        "        if lbg > BG_OFF:",
        "            mx = max(mx, DT(lbg))",
        "        cuda.syncthreads()",
        "        e = math.exp(lpv - mx) if act else ZERO",
        "        sm[j] = e",
        "        cuda.syncthreads()",
        *_ind(_tree(block, "+"), 8),
        "        tot = float(sm[0])",
        "        cuda.syncthreads()",
        "        ebg = 0.0",
        "        if lbg > BG_OFF:",
        "            ebg = math.exp(lbg - float(mx))",
        "            tot += ebg",
        "        wi = rw[i]",
        "        if j == 0:",
        "            ll += wi * (float(mx) + math.log(tot))",
        "            bgs += wi * ebg / tot",
        "        r = wi * float(e) / tot",
        *_ind(_accumulate(d, D), 8),
        "    if act:",
        *[f"        part[blk, {k}, j] = acc{k}" for k in range(nA)],
        "        status[blk, j] = first",
        "    if j == 0:",
        "        llp[blk] = ll",
        "        bgp[blk] = bgs",
        "",
    ]
    return "\n".join(src)


def logdens_source(d: int, D: int = 0) -> str:
    """``kernel(x, S, [R,] P, K, out, status)``: thread per pair (p = i K + j), ``out[i, j]`` =
    log alpha_j + log N_ij in the compute dtype; ``status[j]`` is lowered (atomic min) to the
    first row whose pair with component j is not positive definite (initialised to n)."""
    src = [
        f"def kernel({_rows_arg(D)}, P, K, out, status):",
        f"    CNORM = DT({cnorm(d)!r})",
        "    p = cuda.grid(1)",
        "    n = x.shape[0]",
        "    if p >= n * K:",
        "        return",
        "    i = p // K",
        "    jj = p - i * K",
        *_ind(_row_loads(d, D), 4),
        *_ind(_pair(d, D, False), 4),
        "    out[i, jj] = logp",
        "    if bad > ZERO:",
        "        cuda.atomic.min(status, jj, i)",
        "",
    ]
    return "\n".join(src)


def row_lse_source() -> str:
    """``kernel(ld, K, lbg, lse)``: thread per row, ``lse[i]`` = log (sum_j exp ld[i, j] (+ the
    background's exp lbg)) in float64."""
    src = [
        "def kernel(ld, K, lbg, lse):",
        "    i = cuda.grid(1)",
        "    if i >= ld.shape[0]:",
        "        return",
        "    mx = float(ld[i, 0])",
        "    for k in range(1, K):",
        "        mx = max(mx, float(ld[i, k]))",
        "    if lbg > BG_OFF:",
        "        mx = max(mx, lbg)",
        "    tot = 0.0",
        "    for k in range(K):",
        "        tot += math.exp(float(ld[i, k]) - mx)",
        "    if lbg > BG_OFF:",
        "        tot += math.exp(lbg - mx)",
        "    lse[i] = mx + math.log(tot)",
        "",
    ]
    return "\n".join(src)


def stats_given_source(d: int, D: int = 0) -> str:
    """``kernel(x, S, [R,] rw, P, K, rows_per_block, ld, lse, part)``, K-tiled: block (b, t)
    of ``blockDim.x`` threads handles components ``t * blockDim.x + threadIdx.x`` over the rows
    of slab b, with r_ij = rw_i exp(ld[i, j] - lse[i]) from the first pass."""
    nA = n_acc(d, D)
    src = [
        f"def kernel({_rows_arg(D)}, rw, P, K, rows_per_block, ld, lse, part):",
        f"    CNORM = DT({cnorm(d)!r})",
        "    blk = cuda.blockIdx.x",
        "    j = cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x",
        "    if j >= K:",
        "        return",
        "    jj = j",
        *_ind(_slab(), 4),
        *[f"    acc{k} = 0.0" for k in range(nA)],
        "    for i in range(r0, r1):",
        *_ind(_row_loads(d, D), 8),
        *_ind(_pair(d, D, True), 8),
        "        r = rw[i] * math.exp(float(ld[i, j]) - lse[i])",
        *_ind(_accumulate(d, D), 8),
        *[f"    part[blk, {k}, j] = acc{k}" for k in range(nA)],
        "",
    ]
    return "\n".join(src)


# --------------------------------------------------------------------------- posterior
POSTERIOR_ARGS = (
    "x, S, xorig, rows, cols, c0, P, K, lbg, tau, mean, cov, mapc, mapr, bgr, resp, tight, status"
)


def posterior_source(d: int, du: int) -> str:
    """``kernel(x, S, xorig, rows, cols, c0, P, K, lbg, tau, mean, cov, mapc, mapr, bgr, resp,
    tight, status)``: thread per row ``i`` of one missingness pattern (``d`` observed fields,
    ``du`` unobserved; parameters with the rows of :func:`.algebra.param_rows` (d, du)); the
    outputs as in :func:`.emit_numba.posterior_source` without top-k (written at row
    ``rows[i]``, local field p at column ``cols[p]``, ``resp`` skipped when it has no rows).

    Three passes over the components: log densities (online log-sum-exp and the most probable
    component), that component's u and b_u (the shift of the centred moments), then the terms
    of :func:`.algebra.posterior_cov_terms` summed in float64; the row finalisation
    :func:`.algebra.posterior_row` in float64. ``status`` as in :func:`logdens_source`.
    """
    D = d + du
    cov_lines, cov_terms = alg.posterior_cov_terms(d, du, _par("k"))
    src = [
        f"def kernel({POSTERIOR_ARGS}):",
        f"    CNORM = DT({cnorm(d)!r})",
        "    i = cuda.grid(1)",
        "    if i >= x.shape[0]:",
        "        return",
        "    ri = rows[i]",
        *_ind(_row_loads(d, 0), 4),
        "    mx = NEG",
        "    tot = 0.0",
        "    kmax = 0",
        "    for k in range(K):",
        *_ind(alg.pair_logdens(d, _par("k"), logdet_frexp), 8),
        "        if bad > ZERO:",
        "            cuda.atomic.min(status, k, i)",
        "        if logp > mx:",
        "            tot = tot * math.exp(float(mx - logp)) + 1.0",
        "            mx = logp",
        "            kmax = k",
        "        else:",
        "            tot += math.exp(float(logp - mx))",
        "    bmx = float(mx)",
        "    g = 1.0",
        "    rbg = 0.0",
        "    if lbg > BG_OFF:",
        "        t = lbg - bmx",
        "        if t > 0.0:",
        "            a = tot * math.exp(-t)",
        "            g = a / (a + 1.0)",
        "            rbg = 1.0 / (a + 1.0)",
        "        else:",
        "            eb = math.exp(t)",
        "            g = tot / (tot + eb)",
        "            rbg = eb / (tot + eb)",
        "    k = kmax",
        *_ind(_pair(d, 0, True, "k"), 4),
        *[f"    uref{a} = u{a}" for a in range(d)],
        *_ind(alg.posterior_bu(d, du, _par("k"), "u", "buref"), 4),
        *[f"    acc_{name} = 0.0" for name, _ in cov_terms],
        "    want_resp = resp.shape[0] > 0",
        "    for k in range(K):",
        *_ind(_pair(d, 0, True, "k"), 8),
        "        r = math.exp(float(logp) - bmx) / tot",
        "        if want_resp:",
        "            resp[ri, k] = r * g",
        *_ind(cov_lines, 8),
        *[f"        acc_{name} += r * float({expr})" for name, expr in cov_terms],
        "    mapc[ri] = kmax",
        "    mapr[ri] = g / tot",
        "    bgr[ri] = rbg",
        *[f"    S{a}_{b} = float(s{a}_{b})" for a in range(d) for b in range(a + 1)],
        *[f"    UREF{a} = float(uref{a})" for a in range(d)],
        *[f"    BUREF{c} = float(buref{c})" for c in range(du)],
        *_ind(alg.posterior_row(d, du), 4),
        *[f"    c_{p} = cols[{p}]" for p in range(D)],
        *[f"    mean[ri, c_{a}] = float(xorig[ri, c_{a}]) - shift{a}" for a in range(d)],
        *[f"    mean[ri, c_{d + c}] = bbu{c} + c0[{d + c}]" for c in range(du)],
    ]
    for p in range(D):
        for q in range(p + 1):
            src.append(f"    cov[ri, c_{p}, c_{q}] = cov{p}_{q}")
            if p != q:
                src.append(f"    cov[ri, c_{q}, c_{p}] = cov{p}_{q}")
    src.append("    tq = 0.0")
    src += [f"    tq = 1.0 if cov{a}_{a} < tau * S{a}_{a} else tq" for a in range(d)]
    src += ["    tight[i] = tq", ""]
    return "\n".join(src)


def cnorm(d: int) -> float:
    """d log 2 pi (the generated code's ``CNORM``)."""
    return d * math.log(2.0 * math.pi)
