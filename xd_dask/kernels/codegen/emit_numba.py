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

Kernels: the statistics pass (:func:`stats_source`); the densities pass
(:func:`densities_source`), whose ``mode`` gives the log densities or the split-and-merge sums
from one compiled variant per (d, dtype[, D]); the posterior (:mod:`.emit_numba_posterior`,
whose per-row sums over components are lane accumulators summed across lanes once per row).

CPU-only choices a GPU emitter leaves behind: the lane-block layout, the bit-cast log-determinant
(:func:`logdet_bits`), the polynomial exp/log, the serial row max/exp, the scratch arrays.
"""

from __future__ import annotations

import math
import re

import numpy as np

from xd_dask.kernels.codegen import algebra as alg

__all__ = [
    "MODE_LOGDENS",
    "MODE_MOVES",
    "constants",
    "densities_source",
    "layout",
    "logdet_bits",
    "stats_source",
]


def constants(fp32: bool) -> dict:
    """The numeric globals the generated CPU code reads (Numba freezes them as constants): the
    compute dtype ``DT`` and its ``ONE``, ``ZERO``, ``HALF``, ``LN2``; the bit layout of
    :func:`logdet_bits` (``MSHIFT``, ``MMASK``, ``MONE``, ``EBIAS``); ``BG_OFF``."""
    return {
        **alg.scalar_constants(fp32),
        "MSHIFT": np.int32(23) if fp32 else 52,
        "MMASK": np.int32(0x007FFFFF) if fp32 else 0x000FFFFFFFFFFFFF,
        "MONE": np.int32(0x3F800000) if fp32 else 0x3FF0000000000000,
        "EBIAS": 127 if fp32 else 1023,
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


#: The modes of the densities kernel (:func:`densities_source`, its ``mode`` argument): one
#: compiled kernel per (d, dtype[, D]) gives the log densities and the split-and-merge sums.
MODE_LOGDENS, MODE_MOVES = 1, 2

STATS_ARGS = "P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum"
DENS_ARGS = "P, K, nl, r0, r1, lbg, mode, out, logw, macc, RR, status"


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
    src = _header(f"{args}, {STATS_ARGS}", d, B, 0, D)
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


def densities_source(d: int, B: int, fp32: bool, D: int = 0) -> str:
    """Source of ``kernel(x, S, rw, P, K, nl, r0, r1, lbg, mode, out, logw, macc, RR, status)``
    (with projections ``kernel(x, S, R, rw, ...)``): the log-density pair pass of rows
    ``r0 <= i < r1``, then by ``mode``

    - ``MODE_LOGDENS``: ``out[i, j] = log alpha_j + log N_ij`` (``out`` (n, K), compute dtype);
    - ``MODE_MOVES``: the split-and-merge sums (:func:`_moves_row`) into ``macc`` and ``RR``,
      ``logw`` (K,) the finite log weights, ``lbg`` the background as in :func:`stats_source`.

    Arrays a mode does not use may be empty. At a non-positive pivot it writes the first
    offending (row, component) to ``status`` and stops.
    """
    args = "x, S, R, rw" if D else "x, S, rw"
    src = _header(f"{args}, {DENS_ARGS}", d, B, 0, D)
    src += ["    lp = np.empty(Kp)", "    rr = np.empty(Kp)", "    nz = np.empty(Kp, np.int64)"]
    src += ["    for i in range(r0, r1):"]
    src += _pair_pass(d, B, layout(d)["n_scr"], False, 0, D)
    src += [
        f"        if mode == {MODE_LOGDENS}:",
        "            for k in range(K):",
        "                out[i, k] = ld[k]",
        "            continue",
        *_indent(_moves_row(), 8),
        "    return 0.0",
        "",
    ]
    return "\n".join(src)


def _moves_row() -> list[str]:
    """The split-and-merge sums of row i (DESIGN.md 4c), after its pair pass: the
    responsibilities (log-sum-exp with the background), then over the components whose
    w_i r_ij is not zero (flushed, see ``_rowexp``) the terms of :data:`.algebra.MOVE_SUMS`
    (``macc``, term t of component k at ``t * K + k``) and the products of those components'
    responsibilities (``RR`` (K * K), sum_i w_i r_ij r_ik at ``j * K + k``, lower triangle
    j >= k only: the rows of RR a row touches, few where components are separated)."""
    return [
        "wi = rw[i]",
        "if wi > 0.0:",
        "    for k in range(Kp):",
        "        lp[k] = float(ld[k])",
        "    mx = _rowmax(ld, Kp)",
        "    if lbg > BG_OFF:",
        "        mx = max(mx, DT(lbg))",
        "    tot = _rowexp(ld, mx, Kp)",
        "    if lbg > BG_OFF:",
        "        tot += math.exp(lbg - float(mx))",
        "    lse = float(mx) + math.log(tot)",
        "    lw = math.log(wi)",
        "    m = 0",
        "    for k in range(K):",
        "        e = float(ld[k])",
        "        if e > 0.0:",
        "            r = e / tot",
        "            wr = wi * r",
        "            lr = lp[k] - lse",
        "            logn = lp[k] - logw[k]",
        *_indent(alg.move_terms("macc", "k", "K"), 12),
        "            rr[m] = r",
        "            nz[m] = k",
        "            m += 1",
        "    for a in range(m):",
        "        wa = wi * rr[a]",
        "        row = nz[a] * K",
        "        for b in range(a + 1):",
        "            RR[row + nz[b]] += wa * rr[b]",
    ]


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
