"""Source generator for the compiled (Numba) XD statistics kernel.

For a fixed dimension ``d`` the per-pair algebra of DESIGN.md section 2 (``T = V_j + S_i``, its
LDL^T factorisation, ``log det T``, ``u = T^-1 w``, ``T^-1``) is written out as straight-line
scalar statements inside a loop over the components of one block, so that the compiler
vectorises ACROSS components (one SIMD lane = one component). Nothing here imports Numba;
``_numba.py`` compiles the returned source.

Layout. Components are padded to ``Kp = n_blocks * B`` (``B`` lanes per block, a literal in the
generated code). Every per-component array is a flat 1-d array of blocks, each block holding
``rows x B`` values, entry (block, row q, lane l) at ``(block * rows + q) * B + l``. Within a
block all addresses differ by compile-time constants, which lets LLVM's loop vectoriser prove
the few runtime alias checks it needs (a 2-d array with a runtime row stride needs one check
per pair of rows and is not vectorised). The lane loops run to a runtime bound ``nl`` (== B):
with a literal bound LLVM unrolls them into scalar code instead of vectorising.

``P`` parameter blocks, ``n_par`` rows: the means (``d``), the packed lower triangle of ``V_j``
    (``npk = d(d+1)/2``, entry (a, b), a >= b, at ``a(a+1)/2 + b``), the log weight.
``scr`` scratch blocks of one row, ``n_scr`` rows: ``u`` (``d``), packed ``T^-1`` (``npk``) and a
    non-positive-pivot flag. The log densities (then the unnormalised responsibilities) are kept
    in a separate contiguous (Kp,) array ``ld``.
``acc`` accumulator blocks, ``n_acc`` rows: ``n_j``, ``a_j`` (``d``), packed ``C_j`` (``npk``).
"""

from __future__ import annotations

import math

__all__ = ["layout", "stats_source", "logdens_source"]


def _tri(a: int, b: int) -> int:
    """Packed index of the lower-triangle entry (a, b), a >= b."""
    return a * (a + 1) // 2 + b


def layout(d: int) -> dict[str, int]:
    """Row counts of the parameter, scratch and accumulator blocks for dimension ``d``."""
    npk = d * (d + 1) // 2
    return {
        "npk": npk,
        "n_par": d + npk + 1,
        "row_logw": d + npk,
        "n_scr": d + npk + 1,
        "row_bad": d + npk,
        "n_acc": 1 + d + npk,
    }


def _pair_body(d: int, B: int, full: bool, ind: str) -> list[str]:
    """Straight-line statements for one (row, component) pair at lane ``l`` of a block.

    Expects in scope: row scalars ``x{a}``, ``s{a}_{b}`` (a >= b); the block views ``pb``
    (parameters), ``sb`` (scratch), ``lb`` (log densities). Writes the log density including the
    log weight to ``lb[l]`` and the pivot flag; with ``full`` also ``u`` and ``T^-1``.
    """
    lay = layout(d)
    out: list[str] = []
    emit = out.append

    def par(q: int) -> str:
        return f"pb[{q * B} + l]"

    def scr(q: int) -> str:
        return f"sb[{q * B} + l]"

    for a in range(d):
        emit(f"w{a} = x{a} - {par(a)}")
    for a in range(d):
        for b in range(a + 1):
            emit(f"t{a}_{b} = {par(d + _tri(a, b))} + s{a}_{b}")
    # LDL^T: T = L D L^T with unit lower L; e{i}_{k} = L_ik D_k.
    for j in range(d):
        expr = f"t{j}_{j}"
        for k in range(j):
            expr += f" - e{j}_{k} * l{j}_{k}"
        emit(f"D{j} = {expr}")
        emit(f"iD{j} = ONE / D{j}")
        for i in range(j + 1, d):
            expr = f"t{i}_{j}"
            for k in range(j):
                expr += f" - e{i}_{k} * l{j}_{k}"
            emit(f"e{i}_{j} = {expr}")
            emit(f"l{i}_{j} = e{i}_{j} * iD{j}")
    # Non-positive pivot flag: an indicator sum, so NaN in later pivots cannot hide a bad one.
    flags = " + ".join(f"(ONE if D{j} <= ZERO else ZERO)" for j in range(d))
    emit(f"{scr(lay['row_bad'])} = {flags}")
    # log det T = sum_k log D_k, from exponents and mantissas (no overflow, a single log).
    mant = []
    expo = []
    for j in range(d):
        emit(f"b{j} = _bits(D{j})")
        expo.append(f"(b{j} >> MSHIFT)")
        mant.append(f"_float((b{j} & MMASK) | MONE)")
    emit("ldm = _log(" + " * ".join(mant) + ")")
    emit("lde = " + " + ".join(expo) + f" - {d} * EBIAS")
    # Forward substitution z = L^-1 w; Mahalanobis distance sum_k z_k^2 / D_k.
    for i in range(d):
        expr = f"w{i}"
        for k in range(i):
            expr += f" - l{i}_{k} * z{k}"
        emit(f"z{i} = {expr}")
    emit("maha = " + " + ".join(f"z{k} * z{k} * iD{k}" for k in range(d)))
    emit(f"lb[l] = {par(lay['row_logw'])} - HALF * (CNORM + ldm + LN2 * DT(lde) + maha)")
    if not full:
        return [ind + s for s in out]
    # X = L^-1 (unit lower): X_ij = -(L_ij + sum_{j<k<i} L_ik X_kj).
    for j in range(d):
        for i in range(j + 1, d):
            expr = f"-l{i}_{j}"
            for k in range(j + 1, i):
                expr += f" - l{i}_{k} * X{k}_{j}"
            emit(f"X{i}_{j} = {expr}")
    # y = D^-1 z, u = X^T y.
    for k in range(d):
        emit(f"y{k} = z{k} * iD{k}")
    for j in range(d):
        expr = f"y{j}"
        for i in range(j + 1, d):
            expr += f" + X{i}_{j} * y{i}"
        emit(f"{scr(j)} = {expr}")
    # T^-1_ab = sum_{k >= a} X_ka X_kb / D_k (a >= b), with Y_ka = X_ka / D_k, X_kk = 1.
    for k in range(d):
        for a in range(k):
            emit(f"Y{k}_{a} = X{k}_{a} * iD{k}")
    for a in range(d):
        for b in range(a + 1):
            terms = []
            for k in range(a, d):
                yka = f"iD{k}" if k == a else f"Y{k}_{a}"
                terms.append(yka if k == b else f"{yka} * X{k}_{b}")
            emit(f"{scr(d + _tri(a, b))} = " + " + ".join(terms))
    return [ind + s for s in out]


def _row_loads(d: int, ind: str) -> list[str]:
    lines = [ind + f"x{a} = x[i, {a}]" for a in range(d)]
    for a in range(d):
        for b in range(a + 1):
            lines.append(ind + f"s{a}_{b} = S[i, {a}, {b}]")
    return lines


def _pair_pass(d: int, B: int, full: bool) -> list[str]:
    """Body of the row loop: load the row, loop over blocks and lanes, check the pivots."""
    lay = layout(d)
    nP, nS = lay["n_par"], lay["n_scr"]
    src = _row_loads(d, " " * 8)
    src += [
        "        for blk in range(nblk):",
        f"            pb = P[blk * {nP * B}:(blk + 1) * {nP * B}]",
        f"            sb = scr[blk * {nS * B}:(blk + 1) * {nS * B}]",
        f"            lb = ld[blk * {B}:(blk + 1) * {B}]",
        "            for l in range(nl):",
    ]
    src += _pair_body(d, B, full, " " * 16)
    bad = f"scr[(k // {B}) * {nS * B} + {lay['row_bad'] * B} + k % {B}]"
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


def _header(name_args: str, d: int, B: int) -> list[str]:
    lay = layout(d)
    return [
        f"def kernel({name_args}):",
        f"    nblk = P.shape[0] // {lay['n_par'] * B}",
        f"    Kp = nblk * {B}",
        f"    CNORM = DT({d * math.log(2.0 * math.pi)!r})",
        f"    scr = np.empty(nblk * {lay['n_scr'] * B}, DT)",
        "    ld = np.empty(Kp, DT)",
    ]


def stats_source(d: int, B: int, fp32: bool) -> str:
    """Source of ``kernel(x, S, rw, P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum)
    -> ll``.

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
    lay = layout(d)
    nS, nA = lay["n_scr"], lay["n_acc"]
    src = _header("x, S, rw, P, K, nl, r0, r1, flush_rows, acc64, status, lbg, bgsum", d, B)
    src += [f"    acc = np.zeros(nblk * {nA * B}, DT)" if fp32 else "    acc = acc64"]
    src += ["    llsum = 0.0", "    cnt = 0", "    for i in range(r0, r1):"]
    src += _pair_pass(d, B, True)
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
        "                ab[l] += r",
    ]
    ind = " " * 16
    for a in range(d):
        src.append(ind + f"u{a} = sb[{a * B} + l]")
        src.append(ind + f"ab[{(1 + a) * B} + l] += r * u{a}")
    for a in range(d):
        for b in range(a + 1):
            q = d + _tri(a, b)
            src.append(ind + f"ab[{(1 + q) * B} + l] += r * (u{a} * u{b} - sb[{q * B} + l])")
    if fp32:
        src += [
            "        cnt += 1",
            "        if cnt == flush_rows:",
            "            _flush(acc, acc64)",
            "            cnt = 0",
            "    _flush(acc, acc64)",
        ]
    src += ["    return llsum", ""]
    return "\n".join(src)


def logdens_source(d: int, B: int, fp32: bool) -> str:
    """Source of ``kernel(x, S, P, K, nl, r0, r1, out, status)``: ``out[i, j] = log a_j + log N_ij``
    for rows ``r0 <= i < r1`` (stops at a non-positive pivot, see :func:`stats_source`).
    """
    src = _header("x, S, P, K, nl, r0, r1, out, status", d, B)
    src += ["    for i in range(r0, r1):"]
    src += _pair_pass(d, B, False)
    src += [
        "        for k in range(K):",
        "            out[i, k] = ld[k]",
        "    return 0.0",
        "",
    ]
    return "\n".join(src)
