"""Numba CPU emitter, the posterior kernel (DESIGN.md 4a): Python source from :mod:`.algebra`,
placed in the lane-block loops of :mod:`.emit_numba` (same layout, pair pass and runtime names).
"""

from __future__ import annotations

from xd_dask.kernels.codegen import algebra as alg
from xd_dask.kernels.codegen.emit_numba import (
    _header,
    _indent,
    _lane,
    _pair_pass,
    _scratch_loads,
    layout,
)

__all__ = ["ROW_BATCH", "component_program", "posterior_source"]


POSTERIOR_ARGS = (
    "x, S, xorig, rows, cols, c0, P, K, nl, r0, r1, lbg, topk, tau, "
    "mean, cov, mapc, mapr, bgr, resp, tidx, tresp, tmean, tcov, tight, status"
)


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
    the components summing the terms of :func:`.algebra.posterior_cov_terms` (over the lane
    blocks, then across the lanes by the float64 halving tree) and the top-k components. With
    every field observed that pass runs in vector registers (``_comp_sums``, eight terms at a
    time; float32 kernels sum up to ``F32_CHUNK`` blocks, and the first level of the lane
    tree, in float32 before widening); with unobserved fields through float64 lane
    accumulators (one row's, in L1; the first block assigns; float64 in float32 kernels too,
    since a float32 store read back as two float64 halves stalls on store forwarding) and
    their vector lane sums (``_lanesum``). Every ``ROW_BATCH`` rows, the finalisation
    :func:`.algebra.posterior_row`, vectorised across the rows (SIMD lane = row), then the
    stores into the outputs.
    """
    D = d + du
    lay = layout(d, du)
    RB = ROW_BATCH
    cov_terms = alg.posterior_cov_terms(d, du, _lane(B))[1]
    nT = len(cov_terms)
    nO = d + du + alg.npk(D) + 1  # per batch row: shift, bbu, cov (local lower), tightness
    src = _header(POSTERIOR_ARGS, d, B, du)
    src += [f"    acc = np.empty({nT * B})"] if du else []  # lane accumulators (loop form)
    src += [
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
    src += _indent(_post_components(d, du, B, lay), 12)
    src += _indent(_post_topk(d, du, B, lay) if topk else ["tight[i] = 0.0"], 12)
    src += _indent(_post_batch(d, du, cov_terms, nO), 8)
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


def component_program(d: int, B: int, du: int = 0) -> tuple[list[str], list[str]]:
    """One lane of the component pass (``d`` observed fields, ``du`` unobserved): the statements
    and the terms whose sums over the components the finalisation needs (``r * (...)``, in the
    order of :func:`.algebra.posterior_cov_terms`). ``_comp_sums`` compiles them to vector IR
    (every field observed); the loop form runs them per lane."""
    cov_lines, cov_terms = alg.posterior_cov_terms(d, du, _lane(B))
    return ["r = lb[l]", *_scratch_loads(d, B), *cov_lines], [f"r * ({e})" for _, e in cov_terms]


def _post_components(d, du, B, lay) -> list[str]:
    """One pass over the components: the row's sums of the terms into slot ``nb`` of the batch
    (``rb``), then its S and shift. With every field observed in vector registers
    (``_comp_sums``); with unobserved fields through lane accumulators (the first block
    assigns) and their lane sums."""
    nP, nS, RB = lay["n_par"], lay["n_scr"], ROW_BATCH
    if du == 0:
        src = [f"_comp_sums(scr, ld, sk + lk, nblk, rb, nb, {d}, {B}, {nS}, {RB})"]
    else:
        src = [
            "for blk in range(nblk):",
            f"    pb = P[blk * {nP * B}:(blk + 1) * {nP * B}]",
            f"    sb = scr[blk * {nS * B}:(blk + 1) * {nS * B}]",
            f"    lb = ld[blk * {B}:(blk + 1) * {B}]",
        ]
        body, terms = component_program(d, B, du)
        for op in ("=", "+="):  # the first block assigns
            src += ["    if blk == 0:" if op == "=" else "    else:", "        for l in range(nl):"]
            src += _indent(body + [f"acc[{t * B} + l] {op} {e}" for t, e in enumerate(terms)], 12)
        src += [f"rb[{t * RB} + nb] = _lanesum(acc, {t * B}, {B})" for t in range(len(terms))]
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


def _post_batch(d: int, du: int, cov_terms, nO: int) -> list[str]:
    """The batch's finalisation vectorised across rows, and the stores."""
    RB, D = ROW_BATCH, d + du
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
    src = ["for ib in range(nb):"] + _indent(fin, 4)

    def obv(p: int, q: int) -> str:
        return f"ob[{(d + du + alg.tri(p, q)) * RB} + ib]"

    out = ["i = bi[ib]", "ri = rows[i]"]
    out += [f"mean[ri, c_{a}] = float(xorig[ri, c_{a}]) - ob[{a * RB} + ib]" for a in range(d)]
    out += [f"mean[ri, c_{d + c}] = ob[{(d + c) * RB} + ib] + c0[{d + c}]" for c in range(du)]
    out += _write_cov(D, "cov[ri, ", obv, "")
    out += [f"tight[i] = max(tight[i], ob[{(nO - 1) * RB} + ib])"]
    return src + ["for ib in range(nb):"] + _indent(out, 4)
