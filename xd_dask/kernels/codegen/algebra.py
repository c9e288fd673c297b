"""Target-neutral algebra of the XD kernels (DESIGN.md sections 2, 3 and 4a).

For a fixed dimension every function here returns straight-line statements ``name = expression``
over named scalars, for ONE (row i, component j) pair or for one row. Nothing here knows about
SIMD lanes, blocks, threads or arrays: an emitter (:mod:`.emit_numba`; a numba.cuda emitter
later) says where a component's parameters live (the ``par`` accessor: ``par(q)`` is the
expression for parameter row ``q`` of :func:`param_rows`), stores the named results where its
layout wants them and puts into scope the names below.

Names an emitter provides
    row inputs  ``x{a}`` (observed, centred value), ``s{a}_{b}`` (noise covariance, a >= b),
                and with projections ``R{a}_{e}`` (entry (a, e) of the row's d x D R_i);
    constants   ``ONE``, ``ZERO``, ``HALF``, ``CNORM`` (= d log 2 pi), all in the compute dtype;
    the log-determinant, through the ``logdet`` hook of :func:`pair_logdens`.

Names the pair algebra defines (per pair, compute dtype)
    ``w{a}`` = x - m_j;  ``t{a}_{b}`` = T = V_j + S_i;  LDL^T of T: pivots ``D{j}``,
    ``iD{j}`` = 1 / D, unit-lower ``l{i}_{j}``;  ``bad`` = number of pivots <= 0;
    ``z`` = L^-1 w;  ``maha``;  ``logp`` = log alpha_j + log N(x_i | m_j, T);
    ``u{a}`` = T^-1 w;  ``ti{a}_{b}`` = T^-1.

Projections (the ``D`` argument; DESIGN.md 2-3): the parameters are D-dimensional
(:func:`param_rows` of D) and seen through the row's R_i: ``pm{a}`` = R m_j, ``RV{a}_{e}`` =
R V_j, ``pt{a}_{b}`` = R V_j R^T, then w = x - R m and T = R V R^T + S as above; the statistics
are carried back to the D-space, R^T u and R^T (u u^T - T^-1) R (:func:`stats_terms_projected`).

Posterior (DESIGN.md 4a, R = I on the observed fields o, d of them; du unobserved fields)
    per component  b_o = x - S u,  b_u = m_u + V_uo u,
                   B_oo = S - S T^-1 S,  B_uo = G B_oo,  B_uu = C + G B_oo G^T,
    with G = V_uo V_oo^-1 and C = V_uu - V_uo V_oo^-1 V_ou (per component, precomputed). In
    noise-whitened coordinates S T^-1 S is bounded by S whatever the spread of V/S across the
    fields (Gaia: 1e20 for ra, 1e1 for parallax), so B_oo loses nothing where the component is at
    least as wide as the noise; where it is much narrower (B_oo << S) the difference cancels
    (relative error ~eps S/B) and the caller recomputes such rows in a stable form (the
    closed-form Joseph form of :mod:`xd_dask.kernels.reference_posterior`). V T^-1 S, although
    free of the S << V cancellation, is NOT used: its terms grow like sqrt(V_aa/V_bb) between
    fields of different V/S (measured on a Gaia row: 8e-8 correlation units in float64, 15 in
    float32). Zero-noise fields come out exact (b = x, B = 0).
    Mixture (moment-matched), in one pass over the components with moments shifted to the most
    probable component * (its u and b_u are ``uref{a}`` / ``buref{c}``; a shift to one of the
    points cannot cancel catastrophically): e_j = u_j - u_*, f_j = b_uj - b_u*, and the sums
        DU = sum r e,  DB = sum r f,  A = sum r (T_j^-1 - e e^T),
        H = sum r (G_j - G_j S T_j^-1 - f e^T),  WF = sum r (C_j + G_j B_oo,j G_j^T + f f^T)
    give ubar = u_* + DU, bbar_u = b_u* + DB and
        mean_o = x - S ubar (b_oj - bbar_o = -S (u_j - ubar), never x - x),  mean_u = bbar_u,
        cov_oo = S - S (A + DU DU^T) S,  cov_uo = (H + DB DU^T) S,  cov_uu = WF - DB DB^T.
    Sums over components are "terms": (name, expression) pairs the emitter accumulates with the
    component's responsibility r as weight; the row finalisation (:func:`posterior_row`) reads
    the accumulated sums as ``acc_<name>`` and the shift as ``UREF{a}`` / ``BUREF{c}`` (float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

__all__ = [
    "BG_OFF",
    "PAD_LOGW",
    "scalar_constants",
    "tri",
    "npk",
    "ldlt",
    "param_rows",
    "projection",
    "pair_logdens",
    "pair_inverse",
    "stats_terms",
    "stats_terms_projected",
    "posterior_bu",
    "posterior_cov_terms",
    "posterior_row",
    "component_posterior",
    "MOVE_SUMS",
    "move_terms",
]

Par = Callable[[int], str]

#: Log weight of padding components and the finite stand-in of a zero weight (log 0) in the
#: packed parameters: their responsibilities flush to exactly zero (the fast-math code assumes
#: no infinities).
PAD_LOGW = -1.0e30
#: A background log density (the ``lbg`` argument of the generated kernels) at or below this
#: means "no background component"; callers pass ``2 * BG_OFF`` for none.
BG_OFF = -1.0e29


def scalar_constants(fp32: bool) -> dict:
    """The numeric globals every emitter's generated code reads (frozen as compile-time
    constants): the compute dtype ``DT`` and its ``ONE``, ``ZERO``, ``HALF``, ``LN2``, and
    ``BG_OFF``."""
    dt = np.float32 if fp32 else np.float64
    return {
        "DT": dt,
        "ONE": dt(1.0),
        "ZERO": dt(0.0),
        "HALF": dt(0.5),
        "LN2": dt(math.log(2.0)),
        "BG_OFF": BG_OFF,
    }


def tri(a: int, b: int) -> int:
    """Packed index of the lower-triangle entry (a, b), a >= b."""
    return a * (a + 1) // 2 + b


def npk(d: int) -> int:
    """Number of entries of a packed lower triangle of a d x d matrix."""
    return d * (d + 1) // 2


def _sym(prefix: str, a: int, b: int) -> str:
    """Name of entry (a, b) of a symmetric matrix stored as its lower triangle."""
    return f"{prefix}{max(a, b)}_{min(a, b)}"


def param_rows(d: int, du: int = 0) -> dict[str, int]:
    """Rows of one component's parameter vector (the layout every emitter packs).

    ``mean`` (d rows: m_o), ``cov`` (npk(d): packed lower V_oo), ``logw`` (1: log alpha), and for
    the posterior with ``du`` unobserved fields: ``mu`` (du: m_u), ``vuo`` (du * d: V_uo, row
    c at ``vuo + c * d``), ``g`` (du * d: G = V_uo V_oo^-1), ``cu`` (npk(du): packed lower C).
    ``n`` is the total.
    """
    k = npk(d)
    rows = {"mean": 0, "cov": d, "logw": d + k}
    q = d + k + 1
    if du:
        rows |= {"mu": q, "vuo": q + du, "g": q + du + du * d, "cu": q + du + 2 * du * d}
        q += du + 2 * du * d + npk(du)
    rows["n"] = q
    return rows


# --------------------------------------------------------------------------- per pair
def projection(d: int, D: int, par: Par) -> list[str]:
    """With the row's ``R{a}_{e}`` (d x D) in scope: ``pm{a}`` = (R m)_a, ``RV{a}_{e}`` =
    (R V)_ae and the packed ``pt{a}_{b}`` = (R V R^T)_ab (a >= b) of a D-dimensional component
    (parameter rows of :func:`param_rows` of D)."""
    lay = param_rows(D)

    def v(e: int, f: int) -> str:
        return par(lay["cov"] + tri(max(e, f), min(e, f)))

    out = [
        f"pm{a} = " + " + ".join(f"R{a}_{e} * {par(lay['mean'] + e)}" for e in range(D))
        for a in range(d)
    ]
    out += _product("RV", d, D, D, lambda a, f: f"R{a}_{f}", v)
    out += [
        f"pt{a}_{b} = " + " + ".join(f"RV{a}_{e} * R{b}_{e}" for e in range(D))
        for a in range(d)
        for b in range(a + 1)
    ]
    return out


def ldlt(
    d: int, entry: Callable[[int, int], str], recip: Callable[[str], str] | None = None
) -> list[str]:
    """LDL^T of the symmetric d x d matrix whose entry (a, b), a >= b, is the expression
    ``entry(a, b)``: T = L D L^T with unit lower L. Defines the pivots ``D{j}``, their
    reciprocals ``iD{j}`` (``recip(pivot)``, default ``ONE / pivot``), ``e{i}_{j}`` = L_ij D_j
    and ``l{i}_{j}`` = L_ij (i > j). No square roots; log det T = sum_j log D_j, and T is
    positive definite iff every pivot is > 0."""
    recip = recip or (lambda p: f"ONE / {p}")
    out: list[str] = []
    emit = out.append
    for j in range(d):
        expr = entry(j, j)
        for k in range(j):
            expr += f" - e{j}_{k} * l{j}_{k}"
        emit(f"D{j} = {expr}")
        emit(f"iD{j} = {recip(f'D{j}')}")
        for i in range(j + 1, d):
            expr = entry(i, j)
            for k in range(j):
                expr += f" - e{i}_{k} * l{j}_{k}"
            emit(f"e{i}_{j} = {expr}")
            emit(f"l{i}_{j} = e{i}_{j} * iD{j}")
    return out


def pair_logdens(
    d: int, par: Par, logdet: Callable[[list[str]], tuple[list[str], str]], D: int = 0
) -> list[str]:
    """w, T = V + S, its LDL^T, the pivot flag ``bad``, z = L^-1 w, ``maha`` and ``logp``.

    ``logdet(pivots)`` returns (statements, expression) for sum_k log D_k; the expression is
    substituted into ``logp`` (the CPU emitter uses exponent bits and one log of the product of
    mantissas; a GPU emitter ``frexp``). With ``D`` (projections) the component is
    D-dimensional and w = x - R m, T = R V R^T + S (:func:`projection`).
    """
    out: list[str] = []
    emit = out.append
    if D:
        lay = param_rows(D)
        out += projection(d, D, par)
        mean, cov = (lambda a: f"pm{a}"), (lambda a, b: f"pt{a}_{b}")
    else:
        lay = param_rows(d)
        mean = lambda a: par(lay["mean"] + a)
        cov = lambda a, b: par(lay["cov"] + tri(a, b))
    for a in range(d):
        emit(f"w{a} = x{a} - {mean(a)}")
    for a in range(d):
        for b in range(a + 1):
            emit(f"t{a}_{b} = {cov(a, b)} + s{a}_{b}")
    out += ldlt(d, lambda a, b: f"t{a}_{b}")
    # Non-positive pivot flag: an indicator sum, so NaN in later pivots cannot hide a bad one.
    emit("bad = " + " + ".join(f"(ONE if D{j} <= ZERO else ZERO)" for j in range(d)))
    ld_lines, ld_expr = logdet([f"D{j}" for j in range(d)])
    out += ld_lines
    # Forward substitution z = L^-1 w; Mahalanobis distance sum_k z_k^2 / D_k.
    for i in range(d):
        expr = f"w{i}"
        for k in range(i):
            expr += f" - l{i}_{k} * z{k}"
        emit(f"z{i} = {expr}")
    emit("maha = " + " + ".join(f"z{k} * z{k} * iD{k}" for k in range(d)))
    emit(f"logp = {par(lay['logw'])} - HALF * (CNORM + {ld_expr} + maha)")
    return out


def pair_inverse(d: int) -> list[str]:
    """After :func:`pair_logdens`: ``u{a}`` = T^-1 w and the packed ``ti{a}_{b}`` = T^-1."""
    out: list[str] = []
    emit = out.append
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
        emit(f"u{j} = {expr}")
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
            emit(f"ti{a}_{b} = " + " + ".join(terms))
    return out


def stats_terms(d: int) -> list[tuple[int, str | None]]:
    """Terms of the sufficient statistics (DESIGN.md 3), to be added with weight r_ij:
    (slot, expression) with slot 0 = n_j (expression None: r itself), 1 + a = a_j[a],
    1 + d + tri(a, b) = C_j[a, b]; over ``u{a}`` and ``ti{a}_{b}``."""
    out: list[tuple[int, str | None]] = [(0, None)]
    out += [(1 + a, f"u{a}") for a in range(d)]
    for a in range(d):
        for b in range(a + 1):
            out.append((1 + d + tri(a, b), f"(u{a} * u{b} - ti{a}_{b})"))
    return out


def stats_terms_projected(d: int, D: int) -> tuple[list[str], list[tuple[int, str | None]]]:
    """The statistics' terms carried to the D-space through the row's ``R{a}_{e}``:
    statements over ``u{a}`` and ``ti{a}_{b}`` (``Ru{e}`` = (R^T u)_e, ``G{a}_{b}`` = u u^T -
    T^-1, ``GR{a}_{f}`` = (G R)_af) and (slot, expression) pairs as in :func:`stats_terms` with
    D for d: a_j[e] += r (R^T u)_e, C_j[e, f] += r (R^T G R)_ef."""
    lines = [f"Ru{e} = " + " + ".join(f"R{a}_{e} * u{a}" for a in range(d)) for e in range(D)]
    lines += [f"G{a}_{b} = u{a} * u{b} - ti{a}_{b}" for a in range(d) for b in range(a + 1)]
    lines += _product("GR", d, D, d, lambda a, b: _sym("G", a, b), lambda b, f: f"R{b}_{f}")
    out: list[tuple[int, str | None]] = [(0, None)]
    out += [(1 + e, f"Ru{e}") for e in range(D)]
    for e in range(D):
        for f in range(e + 1):
            expr = " + ".join(f"R{a}_{e} * GR{a}_{f}" for a in range(d))
            out.append((1 + D + tri(e, f), f"({expr})"))
    return lines, out


# --------------------------------------------------------------------------- moves
#: The split-and-merge criteria's per-component sums over rows (DESIGN.md 4c), beside the
#: K x K sum_i w_i r_ij r_ik that every backend accumulates: (name, f) for
#: sum_i w_i r_ij f_ij over the pairs with w_i r_ij > 0, where f is an expression in the
#: per-pair float64 names ``lr`` = log r_ij (the background in the normalisation), ``lw`` =
#: log w_i and ``logn`` = log N(x_i | R_i m_j, T_ij). Every backend evaluates this table (the
#: emitters generate it, the reference evaluates it on arrays), so a further sum is one entry
#: here (plus where its result is used).
MOVE_SUMS: tuple[tuple[str, str], ...] = (
    ("n", "1.0"),  # sum w r
    ("flogf", "lr + lw"),  # sum w r log(w r)
    ("flogp", "logn"),  # sum w r log N
)


def move_terms(acc: str, k: str, n_comp: str) -> list[str]:
    """Statements adding each :data:`MOVE_SUMS` term of component ``k`` (with ``wr`` = w_i r_ij
    and the names of the table in scope) to the float64 array ``acc`` (term t of component k at
    ``t * n_comp + k``)."""
    return [f"{acc}[{t} * {n_comp} + {k}] += wr * ({f})" for t, (_, f) in enumerate(MOVE_SUMS)]


# --------------------------------------------------------------------------- posterior
def posterior_bu(d: int, du: int, par: Par, u: str = "u", bu: str = "bu") -> list[str]:
    """``{bu}{c}`` = m_u + V_uo ``{u}`` (the component's posterior mean of the unobserved fields,
    centred frame)."""
    lay = param_rows(d, du)
    lines = []
    for c in range(du):
        expr = par(lay["mu"] + c)
        for a in range(d):
            expr += f" + {par(lay['vuo'] + c * d + a)} * {u}{a}"
        lines.append(f"{bu}{c} = {expr}")
    return lines


def _product(out: str, n: int, m: int, p: int, left, right) -> list[str]:
    """``{out}{i}_{j}`` = sum_k left(i, k) * right(k, j) for an (n x p) by (p x m) product."""
    return [
        f"{out}{i}_{j} = " + " + ".join(f"{left(i, k)} * {right(k, j)}" for k in range(p))
        for i in range(n)
        for j in range(m)
    ]


def _z_lines(d: int, du: int, par: Par, s: str = "s") -> list[str]:
    """Z = G S and ZT = Z T^-1 (du x d each): ``Z{c}_{b}``, ``ZT{c}_{b}``."""
    g = param_rows(d, du)["g"]
    lines = _product("Z", du, d, d, lambda c, a: par(g + c * d + a), lambda a, b: _sym(s, a, b))
    lines += _product("ZT", du, d, d, lambda c, k: f"Z{c}_{k}", lambda k, b: _sym("ti", k, b))
    return lines


def _w_lines(d: int, du: int, par: Par) -> list[str]:
    """W = C + Z G^T - ZT Z^T (lower du x du) = C + G B_oo G^T: ``W{c}_{c2}``."""
    lay = param_rows(d, du)
    lines = []
    for c in range(du):
        for c2 in range(c + 1):
            zg = " + ".join(f"Z{c}_{b} * {par(lay['g'] + c2 * d + b)}" for b in range(d))
            ztz = " - ".join(f"ZT{c}_{b} * Z{c2}_{b}" for b in range(d))
            lines.append(f"W{c}_{c2} = {par(lay['cu'] + tri(c, c2))} + {zg} - {ztz}")
    return lines


def posterior_cov_terms(d: int, du: int, par: Par) -> tuple[list[str], list[tuple[str, str]]]:
    """Per pair, with ``u{a}``, ``ti{a}_{b}`` and the row's shift ``uref{a}``, ``buref{c}``
    (compute dtype) in scope: the statements and the terms whose r-weighted sums the row
    finalisation needs (names ``DU``, ``A``, ``DB``, ``H``, ``WF``; see the module docstring)."""
    lay = param_rows(d, du)
    lines = [f"e{a} = u{a} - uref{a}" for a in range(d)]
    terms = [(f"DU{a}", f"e{a}") for a in range(d)]
    terms += [(f"A{a}_{b}", f"ti{a}_{b} - e{a} * e{b}") for a in range(d) for b in range(a + 1)]
    if du:
        lines += posterior_bu(d, du, par)
        lines += [f"f{c} = bu{c} - buref{c}" for c in range(du)]
        lines += _z_lines(d, du, par)
        lines += _w_lines(d, du, par)
        g = lay["g"]
        terms += [(f"DB{c}", f"f{c}") for c in range(du)]
        terms += [
            (f"H{c}_{a}", f"{par(g + c * d + a)} - ZT{c}_{a} - f{c} * e{a}")
            for c in range(du)
            for a in range(d)
        ]
        terms += [
            (f"WF{c}_{c2}", f"W{c}_{c2} + f{c} * f{c2}") for c in range(du) for c2 in range(c + 1)
        ]
    return lines, terms


def _shift(d: int, s: str, v: str) -> list[str]:
    """``shift{a}`` = (S {v})_a: the posterior mean of the observed fields is x - shift."""
    return [
        f"shift{a} = " + " + ".join(f"{_sym(s, a, b)} * {v}{b}" for b in range(d)) for a in range(d)
    ]


def _s_minus_sas(d: int, s: str, A: str) -> list[str]:
    """``cov{a}_{b}`` (a >= b) = (S - S A S)_ab for symmetric A stored as ``{A}{a}_{b}``, through
    ``ST`` = S A (full d x d)."""
    lines = _product("ST", d, d, d, lambda a, k: _sym(s, a, k), lambda k, b: _sym(A, k, b))
    for a in range(d):
        for b in range(a + 1):
            sts = " - ".join(f"ST{a}_{k} * {_sym(s, k, b)}" for k in range(d))
            lines.append(f"cov{a}_{b} = {_sym(s, a, b)} - {sts}")
    return lines


def posterior_row(d: int, du: int, s: str = "S") -> list[str]:
    """Per row, from the accumulated ``acc_<name>`` sums, the shift ``UREF{a}`` / ``BUREF{c}``
    and the noise ``{s}{a}_{b}`` (a >= b; all float64): ``shift{a}`` (mean_o = x - shift),
    ``bbu{c}`` (mean_u, centred frame) and the moment-matched covariance ``cov{p}_{q}``
    (p >= q) in local order (observed fields first, then the unobserved ones: p = d + c)."""
    lines = [f"ub{a} = UREF{a} + acc_DU{a}" for a in range(d)]
    lines += [f"bbu{c} = BUREF{c} + acc_DB{c}" for c in range(du)]
    lines += _shift(d, s, "ub")
    # Ac = A + DU DU^T (the centred sum), cov_oo = S - S Ac S.
    for a in range(d):
        for b in range(a + 1):
            lines.append(f"Ac{a}_{b} = acc_A{a}_{b} + acc_DU{a} * acc_DU{b}")
    lines += _s_minus_sas(d, s, "Ac")
    for c in range(du):
        for a in range(d):
            lines.append(f"Hc{c}_{a} = acc_H{c}_{a} + acc_DB{c} * acc_DU{a}")
        for a in range(d):
            terms = " + ".join(f"Hc{c}_{k} * {_sym(s, k, a)}" for k in range(d))
            lines.append(f"cov{d + c}_{a} = {terms}")
        for c2 in range(c + 1):
            lines.append(f"cov{d + c}_{d + c2} = acc_WF{c}_{c2} - acc_DB{c} * acc_DB{c2}")
    return lines


def component_posterior(d: int, du: int, par: Par, s: str = "S") -> list[str]:
    """One component's Gaussian posterior (for the top-k output), with ``u{a}``, ``ti{a}_{b}``
    (compute dtype) and the noise ``{s}{a}_{b}`` (float64) in scope: ``shift{a}`` (b_o = x -
    shift), ``bu{c}`` and ``cov{p}_{q}`` (p >= q, local order), B_oo = S - S T^-1 S."""
    lay = param_rows(d, du)
    lines = _shift(d, s, "u") + posterior_bu(d, du, par) + _s_minus_sas(d, s, "ti")
    if du:
        g = lay["g"]
        for c in range(du):
            for a in range(d):
                lines.append(
                    f"cov{d + c}_{a} = "
                    + " + ".join(f"{par(g + c * d + k)} * {_sym('cov', k, a)}" for k in range(d))
                )
        for c in range(du):
            for c2 in range(c + 1):
                gbg = " + ".join(f"cov{d + c}_{k} * {par(g + c2 * d + k)}" for k in range(d))
                lines.append(f"cov{d + c}_{d + c2} = {par(lay['cu'] + tri(c, c2))} + {gbg}")
    return lines
