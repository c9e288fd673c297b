"""Numba CPU emitter: Python source of the compiled XD kernels from :mod:`.algebra`.

For a fixed dimension ``d`` the per-pair algebra is placed inside a loop over the components of
one block, so that the compiler vectorises ACROSS components (one SIMD lane = one component).
Nothing here imports Numba; ``xd_dask.kernels._numba`` compiles the returned source with the
numeric constants of :func:`constants` and the runtime's functions (``_bits``, ``_log``,
``_rowexp``, ... of ``xd_dask.kernels._numba_runtime``).

Layout. Components are padded to ``Kp = n_blocks * B`` (``B`` lanes per block, a literal in the
generated code). Every per-component array is a flat 1-d array of blocks, each block holding
``rows x B`` values, entry (block, row q, lane l) at ``(block * rows + q) * B + l``. Within a
block all addresses differ by compile-time constants, which lets LLVM's loop vectoriser prove
the few runtime alias checks it needs (a 2-d array with a runtime row stride needs one check
per pair of rows and is not vectorised). The lane loops run to a runtime bound ``nl`` (== B):
with a literal bound LLVM unrolls them into scalar code instead of vectorising.

``P`` parameter blocks, rows as in :func:`.algebra.param_rows`.
``scr`` scratch blocks of one row, ``n_scr`` rows: ``u`` (``d``), packed ``T^-1`` (``npk``), a
    non-positive-pivot flag and, for the posterior, ``b_u`` (``du``). The log densities (then
    the responsibilities) are kept in a separate contiguous (Kp,) array ``ld``.
``acc`` accumulator blocks, ``n_acc`` rows: ``n_j``, ``a_j`` (``d``), packed ``C_j`` (``npk``).
The posterior's per-row sums over components are lane accumulators (one row of ``B`` per term),
summed across lanes once per row.

CPU-only choices a GPU emitter leaves behind: the lane-block layout, the bit-cast log-determinant
(:func:`logdet_bits`), the polynomial exp/log, the serial row max/exp, the scratch arrays.
"""

from __future__ import annotations

import math
import re

import numpy as np

from xd_dask.kernels.codegen import algebra as alg

__all__ = [
    "constants",
    "layout",
    "logdens_source",
    "logdet_bits",
    "moves_source",
    "posterior_source",
    "stats_source",
]


def constants(fp32: bool) -> dict:
    """The numeric globals the generated CPU code reads (Numba freezes them as constants): the
    compute dtype ``DT`` and its ``ONE``, ``ZERO``, ``HALF``, ``LN2``; the bit layout of
    :func:`logdet_bits` (``MSHIFT``, ``MMASK``, ``MONE``, ``EBIAS``); ``BG_OFF``."""
    dt = np.float32 if fp32 else np.float64
    return {
        "DT": dt,
        "ONE": dt(1.0),
        "ZERO": dt(0.0),
        "HALF": dt(0.5),
        "LN2": dt(math.log(2.0)),
        "MSHIFT": np.int32(23) if fp32 else 52,
        "MMASK": np.int32(0x007FFFFF) if fp32 else 0x000FFFFFFFFFFFFF,
        "MONE": np.int32(0x3F800000) if fp32 else 0x3FF0000000000000,
        "EBIAS": 127 if fp32 else 1023,
        "BG_OFF": alg.BG_OFF,
    }


def layout(d: int, du: int = 0, D: int = 0) -> dict[str, int]:
    """Row counts of the parameter, scratch and accumulator blocks for dimension ``d`` (and
    ``du`` unobserved fields for the posterior; with projections the parameters and the
    accumulators are ``D``-dimensional, the scratch ``d``-dimensional)."""
    npk = alg.npk(d)
    Dp = D or d
    return {
        "npk": npk,
        "n_par": alg.param_rows(Dp, du)["n"],
        "row_logw": Dp + alg.npk(Dp),
        "n_scr": d + npk + 1 + du,
        "row_bad": d + npk,
        "row_bu": d + npk + 1,
        "n_acc": 1 + Dp + alg.npk(Dp),
    }


def logdet_bits(pivots: list[str]) -> tuple[list[str], str]:
    """log det = sum_k log D_k from exponent bits and one log of the product of the mantissas
    (no overflow, one log per pair, vectorisable)."""
    lines, mant, expo = [], [], []
    for j, p in enumerate(pivots):
        lines.append(f"b{j} = _bits({p})")
        expo.append(f"(b{j} >> MSHIFT)")
        mant.append(f"_float((b{j} & MMASK) | MONE)")
    lines.append("ldm = _log(" + " * ".join(mant) + ")")
    lines.append("lde = " + " + ".join(expo) + f" - {len(pivots)} * EBIAS")
    return lines, "ldm + LN2 * DT(lde)"


def _lane(B: int):
    """Accessor of block row q at lane ``l``."""
    return lambda q: f"pb[{q * B} + l]"


def _indent(lines: list[str], n: int) -> list[str]:
    return [" " * n + s for s in lines]


def _store_in_place(lines: list[str], targets: dict[str, str]) -> list[str]:
    """Assignments to the names in ``targets`` become stores to their targets, where they are
    computed (the order in which the kernel writes its scratch matters to LLVM's schedule:
    collecting the stores at the end made the statistics pass 5-15 % slower)."""
    out = []
    for line in lines:
        name, _, expr = line.partition(" = ")
        out.append(f"{targets[name]} = {expr}" if name in targets else line)
    return out


def _pair_body(d: int, B: int, full: bool, D: int = 0) -> list[str]:
    """One (row, component) pair at lane ``l``: log density into ``lb[l]``, pivot flag and
    (``full``) u and T^-1 into the scratch block ``sb`` (``D``: projections)."""
    body = alg.pair_logdens(d, _lane(B), logdet_bits, D)
    if full:
        body += alg.pair_inverse(d)
    targets = {"bad": f"sb[{layout(d)['row_bad'] * B} + l]", "logp": "lb[l]"}
    if full:
        targets |= {f"u{a}": f"sb[{a * B} + l]" for a in range(d)}
        for a in range(d):
            for b in range(a + 1):
                targets[f"ti{a}_{b}"] = f"sb[{(d + alg.tri(a, b)) * B} + l]"
    return _store_in_place(body, targets)


def _scratch_row(d: int, name: str) -> int:
    """Scratch row of ``u{a}`` or ``ti{a}_{b}``."""
    if name.startswith("ti"):
        a, b = map(int, name[2:].split("_"))
        return d + alg.tri(a, b)
    return int(name[1:])


def _scratch_loads(d: int, B: int, lane: str = "l", ti: bool = True) -> list[str]:
    lines = [f"u{a} = sb[{a * B} + {lane}]" for a in range(d)]
    if ti:
        for a in range(d):
            for b in range(a + 1):
                lines.append(f"ti{a}_{b} = sb[{(d + alg.tri(a, b)) * B} + {lane}]")
    return lines


def _row_loads(d: int, ind: str, D: int = 0) -> list[str]:
    lines = [ind + f"x{a} = x[i, {a}]" for a in range(d)]
    for a in range(d):
        for b in range(a + 1):
            lines.append(ind + f"s{a}_{b} = S[i, {a}, {b}]")
    lines += [ind + f"R{a}_{e} = R[i, {a}, {e}]" for a in range(d) for e in range(D)]
    return lines


def _pair_pass(d: int, B: int, nS: int, full: bool, du: int = 0, D: int = 0) -> list[str]:
    """Body of the row loop: load the row, loop over blocks and lanes, check the pivots."""
    nP = layout(d, du, D)["n_par"]
    src = _row_loads(d, " " * 8, D)
    src += [
        "        for blk in range(nblk):",
        f"            pb = P[blk * {nP * B}:(blk + 1) * {nP * B}]",
        f"            sb = scr[blk * {nS * B}:(blk + 1) * {nS * B}]",
        f"            lb = ld[blk * {B}:(blk + 1) * {B}]",
        "            for l in range(nl):",
    ]
    src += _indent(_pair_body(d, B, full, D), 16)
    bad = f"scr[(k // {B}) * {nS * B} + {layout(d)['row_bad'] * B} + k % {B}]"
    src += [
        "        nbad = ZERO",
        "        for k in range(K):",
        f"            nbad += {bad}",
        "        if nbad > ZERO:",
        "            for k in range(K):",
        f"                if {bad} > ZERO:",
        "                    status[0] = i",
        "                    status[1] = k",
        "                    break",
        "            break",
    ]
    return src


def _header(name_args: str, d: int, B: int, du: int = 0, D: int = 0) -> list[str]:
    lay = layout(d, du, D)
    return [
        f"def kernel({name_args}):",
        f"    nblk = P.shape[0] // {lay['n_par'] * B}",
        f"    Kp = nblk * {B}",
        f"    CNORM = DT({d * math.log(2.0 * math.pi)!r})",
        f"    scr = np.empty(nblk * {lay['n_scr'] * B}, DT)",
        "    ld = np.empty(Kp, DT)",
    ]


def stats_source(d: int, B: int, fp32: bool, D: int = 0) -> str:
    """Source of ``kernel(x, S, rw, P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum)
    -> ll``; with projections (``D``), ``kernel(x, S, R, rw, ...)``, ``R`` (n, d, D) in the
    compute dtype, D-dimensional parameters and accumulators (R^T u, R^T (u u^T - T^-1) R).

    Handles rows ``r0 <= i < r1``: adds their sums to the float64 accumulator blocks ``acc64``
    and returns their weighted log-likelihood. At a non-positive pivot it writes the first
    offending (row, component) to ``status`` and stops. In float32 the sums are kept in float32
    for at most ``flush_rows`` rows at a time, then added into ``acc64``.

    ``lbg`` (float64) is the log density of a uniform background component including its
    weight (DESIGN.md 4d), the same for every row of the pattern; it joins each row's
    normalisation and ``bgsum[0]`` accumulates the rows' weighted background responsibilities.
    ``lbg <= BG_OFF`` switches the background off (the code path is then skipped, so results
    are bit-identical to a kernel without it).
    """
    lay = layout(d, 0, D)
    nS, nA = lay["n_scr"], lay["n_acc"]
    args = "x, S, R, rw" if D else "x, S, rw"
    src = _header(f"{args}, P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum", d, B, 0, D)
    src += [f"    acc = np.zeros(nblk * {nA * B}, DT)" if fp32 else "    acc = acc64"]
    src += ["    llsum = 0.0", "    cnt = 0", "    for i in range(r0, r1):"]
    src += _pair_pass(d, B, nS, True, 0, D)
    src += [
        "        mx = _rowmax(ld, Kp)",
        "        if lbg > BG_OFF:",
        "            mx = max(mx, DT(lbg))",
        "        tot = _rowexp(ld, mx, Kp)",
        "        if lbg > BG_OFF:",
        "            ebg = math.exp(lbg - float(mx))",
        "            tot += ebg",
        "            bgsum[0] += rw[i] * ebg / tot",
        "        llsum += rw[i] * (float(mx) + math.log(tot))",
        "        c = DT(rw[i] / tot)",
        "        for blk in range(nblk):",
        f"            sb = scr[blk * {nS * B}:(blk + 1) * {nS * B}]",
        f"            ab = acc[blk * {nA * B}:(blk + 1) * {nA * B}]",
        f"            lb = ld[blk * {B}:(blk + 1) * {B}]",
        "            for l in range(nl):",
        "                r = c * lb[l]",
    ]
    if D:
        src += _indent(_projected_terms(d, B, D), 16)
        return "\n".join(src + _stats_tail(fp32))
    loaded: set[str] = set()
    for slot, expr in alg.stats_terms(d):
        if expr is None:
            src.append(" " * 16 + (f"ab[{slot * B} + l] += r" if slot else "ab[l] += r"))
            continue
        # Load u just before its first use (keeps the register pressure low), T^-1 in place.
        for name in re.findall(r"\bu[0-9]+\b", expr):
            if name not in loaded:
                src.append(" " * 16 + f"{name} = sb[{_scratch_row(d, name) * B} + l]")
                loaded.add(name)
        expr = re.sub(
            r"\bti[0-9]+_[0-9]+\b", lambda t: f"sb[{_scratch_row(d, t[0]) * B} + l]", expr
        )
        src.append(" " * 16 + f"ab[{slot * B} + l] += r * {expr}")
    return "\n".join(src + _stats_tail(fp32))


def _projected_terms(d: int, B: int, D: int) -> list[str]:
    """The accumulation of one lane's D-space statistics terms (projections): u and T^-1 from
    the scratch block, then :func:`.algebra.stats_terms_projected`."""
    lines, terms = alg.stats_terms_projected(d, D)
    src = _scratch_loads(d, B) + lines
    for slot, expr in terms:
        src.append(f"ab[{slot * B} + l] += r * {expr}" if slot else "ab[l] += r")
    return src


def _stats_tail(fp32: bool) -> list[str]:
    src = []
    if fp32:
        src += [
            "        cnt += 1",
            "        if cnt == flush_rows:",
            "            _flush(acc, acc64)",
            "            cnt = 0",
            "    _flush(acc, acc64)",
        ]
    return src + ["    return llsum", ""]


def logdens_source(d: int, B: int, fp32: bool, D: int = 0) -> str:
    """Source of ``kernel(x, S, P, K, nl, r0, r1, out, status)``: ``out[i, j] = log a_j + log N_ij``
    for rows ``r0 <= i < r1`` (stops at a non-positive pivot, see :func:`stats_source`); with
    projections (``D``) ``kernel(x, S, R, P, ...)``.
    """
    args = "x, S, R, P" if D else "x, S, P"
    src = _header(f"{args}, K, nl, r0, r1, out, status", d, B, 0, D)
    src += ["    for i in range(r0, r1):"]
    src += _pair_pass(d, B, layout(d)["n_scr"], False, 0, D)
    src += [
        "        for k in range(K):",
        "            out[i, k] = ld[k]",
        "    return 0.0",
        "",
    ]
    return "\n".join(src)


def moves_source(d: int, B: int, fp32: bool, D: int = 0) -> str:
    """Source of ``kernel(x, S, rw, P, K, nl, r0, r1, lbg, logw, acc, RR, status)`` (with
    projections ``kernel(x, S, R, rw, ...)``): the split-and-merge sums of rows ``r0 <= i <
    r1`` (DESIGN.md 4c), added to the float64 arrays ``acc`` (term t of :data:`.algebra.
    MOVE_SUMS` for component k at ``t * K + k``) and ``RR`` (K * K, entry (j, k) at ``j * K +
    k``: sum_i w_i r_ij r_ik, lower triangle j >= k only). ``logw`` (K,) float64 holds the
    packed log weights (finite), ``lbg`` the background as in :func:`stats_source`.

    Per row: the log-density pass, the responsibilities (log-sum-exp with the background), then
    over the components whose w_i r_ij is not zero (flushed, see ``_rowexp``) the table's
    terms, and the products of those components' responsibilities (the rows of RR a row
    touches: few where components are separated, all where they overlap).
    """
    args = "x, S, R, rw" if D else "x, S, rw"
    src = _header(f"{args}, P, K, nl, r0, r1, lbg, logw, acc, RR, status", d, B, 0, D)
    src += ["    lp = np.empty(Kp)", "    rr = np.empty(Kp)", "    nz = np.empty(Kp, np.int64)"]
    src += ["    for i in range(r0, r1):"]
    src += _pair_pass(d, B, layout(d)["n_scr"], False, 0, D)
    src += [
        "        wi = rw[i]",
        "        if wi <= 0.0:",
        "            continue",
        "        for k in range(Kp):",
        "            lp[k] = float(ld[k])",
        "        mx = _rowmax(ld, Kp)",
        "        if lbg > BG_OFF:",
        "            mx = max(mx, DT(lbg))",
        "        tot = _rowexp(ld, mx, Kp)",
        "        if lbg > BG_OFF:",
        "            tot += math.exp(lbg - float(mx))",
        "        lse = float(mx) + math.log(tot)",
        "        lw = math.log(wi)",
        "        m = 0",
        "        for k in range(K):",
        "            e = float(ld[k])",
        "            if e > 0.0:",
        "                r = e / tot",
        "                wr = wi * r",
        "                lr = lp[k] - lse",
        "                logn = lp[k] - logw[k]",
        *_indent(alg.move_terms("acc", "k", "K"), 16),
        "                rr[m] = r",
        "                nz[m] = k",
        "                m += 1",
        "        for a in range(m):",
        "            wa = wi * rr[a]",
        "            row = nz[a] * K",
        "            for b in range(a + 1):",
        "                RR[row + nz[b]] += wa * rr[b]",
        "    return 0.0",
        "",
    ]
    return "\n".join(src)


POSTERIOR_ARGS = (
    "x, S, xorig, rows, cols, c0, P, K, nl, r0, r1, lbg, topk, tau, "
    "mean, cov, mapc, mapr, bgr, resp, tidx, tresp, tmean, tcov, tight, status"
)


def _accumulate(terms: list[tuple[str, str]], acc: str, B: int, op: str) -> list[str]:
    return [f"{acc}[{t * B} + l] {op} r * ({expr})" for t, (_, expr) in enumerate(terms)]


def _write_cov(D: int, dst: str, src, ind: str) -> list[str]:
    """Store the local lower-triangle entries ``src(p, q)`` (p >= q) into both triangles of
    ``dst`` at the global columns ``c_{p}``."""
    lines = []
    for p in range(D):
        for q in range(p + 1):
            lines.append(ind + f"{dst}c_{p}, c_{q}] = {src(p, q)}")
            if p != q:
                lines.append(ind + f"{dst}c_{q}, c_{p}] = {src(p, q)}")
    return lines


def _tightness(d: int, var, noise) -> list[str]:
    """``tq = 1.0`` if some observed field has ``var(a) < tau * noise(a)``: a posterior far
    tighter than the noise, where B = S - S T^-1 S cancels (see ``_numba_posterior``). Without
    division (zero-noise fields have var = 0 and never count)."""
    return [f"tq = 1.0 if {var(a)} < tau * {noise(a)} else tq" for a in range(d)]


def _lane_tree(B: int, arr: str, base: str, name: str) -> list[str]:
    """``{name}0`` = the float64 sum of ``arr[base:base + B]`` as an explicit balanced tree:
    straight-line, so the SLP vectoriser turns it into a few vector adds (a reduction loop of
    B = 16 trips is left scalar by the loop vectoriser, and costs ~13 ns per pair at K = 16)."""
    h = B // 2
    lines = [
        f"{name}{k} = float({arr}[{base} + {k}]) + float({arr}[{base} + {k + h}])" for k in range(h)
    ]
    while h > 1:
        h //= 2
        lines += [f"{name}{k} = {name}{k} + {name}{k + h}" for k in range(h)]
    return lines


#: Rows per batch of the vectorised row finalisation (SIMD lane = row).
ROW_BATCH = 32


def posterior_source(d: int, du: int, B: int, fp32: bool, topk: bool = False) -> str:
    """Source of ``kernel(x, S, xorig, rows, cols, c0, P, K, nl, r0, r1, lbg, topk, tau, mean,
    cov, mapc, mapr, bgr, resp, tidx, tresp, tmean, tcov, tight, status)``: per-row posteriors
    of one missingness pattern (``d`` observed fields, ``du`` unobserved), DESIGN.md 4a.

    Row ``i`` (``r0 <= i < r1``) of the pattern is row ``rows[i]`` of the outputs; local field
    ``p`` (observed first, then unobserved) is column ``cols[p]``. ``x`` (n, d) and ``S`` are the
    centred observed values in the compute dtype, ``xorig`` (N, D) the caller's values (same
    dtype; the posterior mean of an observed field is ``xorig - S ubar``, in float64), ``c0``
    (D,) the centre in local order (added to the unobserved means). Writes, in float64:
    ``mean`` (N, D), ``cov`` (N, D, D), the most probable component ``mapc`` and its
    responsibility ``mapr``, the
    background responsibility ``bgr`` (0 when ``lbg <= BG_OFF``), all responsibilities into
    ``resp`` (N, K) unless it has no rows, for the ``topk`` most probable components their
    index, responsibility, mean and covariance (``tidx``, ``tresp``, ``tmean``, ``tcov``; only
    in the variant generated with ``topk``, whose scalar code doubles the compile time), and
    per pattern row ``tight[i]`` = 1.0 when an observed field's posterior variance (mixture or
    top-k) is below ``tau`` times its noise variance, else 0.0. Responsibilities include the
    background in their normalisation; the mean and covariance are those of the Gaussian part
    (the mixture given "not background").

    Per row: the pair pass (as in the statistics kernel), the responsibilities, ONE pass over
    the components accumulating the terms of :func:`.algebra.posterior_cov_terms` in lane
    accumulators (the first block assigns), and the top-k components. Every ``ROW_BATCH`` rows,
    the lane sums (an explicit tree, read long after the stores: summing right after the
    vector stores stalls on store forwarding) and the finalisation
    :func:`.algebra.posterior_row`, vectorised across the rows (SIMD lane = row), then the
    stores into the outputs.
    """
    D = d + du
    lay = layout(d, du)
    RB = ROW_BATCH
    cov_lines, cov_terms = alg.posterior_cov_terms(d, du, _lane(B))
    nT = len(cov_terms)
    nO = d + du + alg.npk(D) + 1  # per batch row: shift, bbu, cov (local lower), tightness
    src = _header(POSTERIOR_ARGS, d, B, du)
    src += [
        f"    accb = np.empty({RB * nT * B}, DT)",
        f"    rb = np.empty({nT * RB})",
        f"    sv = np.empty({alg.npk(d) * RB})",
        f"    ur = np.empty({D * RB})",
        f"    ob = np.empty({nO * RB})",
        f"    bi = np.empty({RB}, np.int64)",
        "    tmp = np.empty(Kp, DT)",
        "    want_resp = resp.shape[0] > 0",
    ]
    src += [f"    c_{p} = cols[{p}]" for p in range(D)]
    src += [
        "    i0 = r0",
        "    while i0 < r1:",
        f"        i1 = min(i0 + {RB}, r1)",
        "        nb = 0",
        "        for i in range(i0, i1):",
        "            ri = rows[i]",
    ]
    src += _indent(_pair_pass(d, B, lay["n_scr"], True, du), 4)
    src += _indent(_post_responsibilities(d, du, B, lay), 12)
    src += _indent(_post_components(d, du, B, lay, cov_lines, cov_terms), 12)
    src += _indent(_post_topk(d, du, B, lay) if topk else ["tight[i] = 0.0"], 12)
    src += _indent(_post_batch(d, du, B, cov_terms, nO), 8)
    src += [
        "        if status[0] >= 0:",
        "            break",
        "        i0 = i1",
        "    return 0.0",
        "",
    ]
    return "\n".join(src)


def _lane_at(k: str, B: int, lay: dict[str, int]) -> list[str]:
    """Scalar access to component ``k``: its lane ``lk`` and its blocks' offsets ``pk``, ``sk``."""
    return [
        f"lk = {k} % {B}",
        f"pk = ({k} // {B}) * {lay['n_par'] * B}",
        f"sk = ({k} // {B}) * {lay['n_scr'] * B}",
    ]


def _post_responsibilities(d: int, du: int, B: int, lay: dict[str, int]) -> list[str]:
    """The row's responsibilities (in ``ld``), its most probable component and the shift
    ``uref``/``buref`` (its u and b_u)."""
    src = [
        "mx = _rowmax(ld, Kp)",
        "kmax = _first_at(ld, mx, K)",
        "tot = _rowexp(ld, mx, Kp)",
        "g, rbg = _bg_split(tot, float(mx), lbg)",
        "cr = DT(1.0 / tot)",
        "for k in range(Kp):",
        "    ld[k] *= cr",
        "mapc[ri] = kmax",
        "mapr[ri] = float(ld[kmax]) * g",
        "bgr[ri] = rbg",
        "if want_resp:",
        "    for k in range(K):",
        "        resp[ri, k] = float(ld[k]) * g",
    ]
    src += _lane_at("kmax", B, lay)
    src += [f"uref{a} = scr[sk + {a * B} + lk]" for a in range(d)]
    src += alg.posterior_bu(d, du, lambda q: f"P[pk + {q * B} + lk]", "uref", "buref")
    return src


def _post_components(d, du, B, lay, cov_lines, cov_terms) -> list[str]:
    """One pass over the components: the row's lane accumulators (slot ``nb`` of the batch;
    the first block assigns), then the row's S and shift into the batch."""
    nP, nS, nT, RB = lay["n_par"], lay["n_scr"], len(cov_terms), ROW_BATCH
    src = [
        "for blk in range(nblk):",
        f"    pb = P[blk * {nP * B}:(blk + 1) * {nP * B}]",
        f"    sb = scr[blk * {nS * B}:(blk + 1) * {nS * B}]",
        f"    lb = ld[blk * {B}:(blk + 1) * {B}]",
        f"    acc = accb[nb * {nT * B}:(nb + 1) * {nT * B}]",
    ]
    body = ["r = lb[l]"] + _scratch_loads(d, B) + cov_lines
    src += ["    if blk == 0:", "        for l in range(nl):"]
    src += _indent(body + _accumulate(cov_terms, "acc", B, "="), 12)
    src += ["    else:", "        for l in range(nl):"]
    src += _indent(body + _accumulate(cov_terms, "acc", B, "+="), 12)
    src += [
        f"sv[{alg.tri(a, b) * RB} + nb] = float(s{a}_{b})" for a in range(d) for b in range(a + 1)
    ]
    src += [f"ur[{a * RB} + nb] = float(uref{a})" for a in range(d)]
    src += [f"ur[{(d + c) * RB} + nb] = float(buref{c})" for c in range(du)]
    src += ["bi[nb] = i", "nb += 1"]
    return src


def _post_topk(d: int, du: int, B: int, lay: dict[str, int]) -> list[str]:
    """The ``topk`` most probable components' own posteriors (scalar code, per row), and the
    row's tightness over them (``tight[i]``)."""
    src = [
        "tq = 0.0",
        "if topk > 0:",
        "    for k in range(Kp):",
        "        tmp[k] = ld[k]",
        "    for t in range(topk):",
        "        k = _argmax(tmp, K)",
        "        tmp[k] = -ONE",
        "        tidx[ri, t] = k",
        "        tresp[ri, t] = float(ld[k]) * g",
    ]
    body = _lane_at("k", B, lay)
    body += [f"S{a}_{b} = float(s{a}_{b})" for a in range(d) for b in range(a + 1)]
    body += [f"u{a} = scr[sk + {a * B} + lk]" for a in range(d)]
    body += [
        f"ti{a}_{b} = scr[sk + {(d + alg.tri(a, b)) * B} + lk]"
        for a in range(d)
        for b in range(a + 1)
    ]
    body += alg.component_posterior(d, du, lambda q: f"P[pk + {q * B} + lk]")
    body += [f"tmean[ri, t, c_{a}] = float(xorig[ri, c_{a}]) - shift{a}" for a in range(d)]
    body += [f"tmean[ri, t, c_{d + c}] = bu{c} + c0[{d + c}]" for c in range(du)]
    body += _write_cov(d + du, "tcov[ri, t, ", lambda p, q: f"cov{p}_{q}", "")
    body += _tightness(d, lambda a: f"cov{a}_{a}", lambda a: f"S{a}_{a}")
    return src + _indent(body, 8) + ["tight[i] = tq"]


def _post_batch(d: int, du: int, B: int, cov_terms, nO: int) -> list[str]:
    """The batch's lane sums, its finalisation vectorised across rows, and the stores."""
    RB, nT, D = ROW_BATCH, len(cov_terms), d + du
    src = [
        "for ib in range(nb):",
        f"    for t in range({nT}):",
        f"        q0 = (ib * {nT} + t) * {B}",
    ]
    src += _indent(_lane_tree(B, "accb", "q0", "h"), 8)
    src += [f"        rb[t * {RB} + ib] = h0"]
    fin = [f"acc_{name} = rb[{t * RB} + ib]" for t, (name, _) in enumerate(cov_terms)]
    fin += [f"S{a}_{b} = sv[{alg.tri(a, b) * RB} + ib]" for a in range(d) for b in range(a + 1)]
    fin += [f"UREF{a} = ur[{a * RB} + ib]" for a in range(d)]
    fin += [f"BUREF{c} = ur[{(d + c) * RB} + ib]" for c in range(du)]
    fin += alg.posterior_row(d, du)
    fin += [f"ob[{a * RB} + ib] = shift{a}" for a in range(d)]
    fin += [f"ob[{(d + c) * RB} + ib] = bbu{c}" for c in range(du)]
    fin += [
        f"ob[{(d + du + alg.tri(p, q)) * RB} + ib] = cov{p}_{q}"
        for p in range(D)
        for q in range(p + 1)
    ]
    fin += ["tq = 0.0", *_tightness(d, lambda a: f"cov{a}_{a}", lambda a: f"S{a}_{a}")]
    fin += [f"ob[{(nO - 1) * RB} + ib] = tq"]
    src += ["for ib in range(nb):"] + _indent(fin, 4)

    def obv(p: int, q: int) -> str:
        return f"ob[{(d + du + alg.tri(p, q)) * RB} + ib]"

    out = ["i = bi[ib]", "ri = rows[i]"]
    out += [f"mean[ri, c_{a}] = float(xorig[ri, c_{a}]) - ob[{a * RB} + ib]" for a in range(d)]
    out += [f"mean[ri, c_{d + c}] = ob[{(d + c) * RB} + ib] + c0[{d + c}]" for c in range(du)]
    out += _write_cov(D, "cov[ri, ", obv, "")
    out += [f"tight[i] = max(tight[i], ob[{(nO - 1) * RB} + ib])"]
    return src + ["for ib in range(nb):"] + _indent(out, 4)
