"""Row selection declared by a schema: which rows of a catalogue belong to the sample fitted.

A schema's ``[selection]`` table lists cuts; a row is SELECTED when every cut's value is finite
and inside the cut's inclusive range. Rows outside the selection are not bad rows: the builder
marks them ``not_selected`` (:data:`xd_dask.io.rows.BAD_REASONS`), the reader drops and counts them
under that reason whatever ``on_bad`` says, and their other faults (a null error, a parallax <= 0)
are never reported, since such rows are not part of the sample.

TOML layout::

    [selection]
    description = "..."               # what the sample is and where the cuts come from

    [[selection.cut]]
    name = "parallax_snr"             # names the cut in messages and the README
    ratio = ["Plx", "e_Plx"]          # value = Plx / e_Plx
    min = 10.0                        # inclusive bounds; give min, max or both

    [[selection.cut]]
    name = "single_5p"
    column = "Sn"                     # value = the column
    min = 5
    max = 5

    [[selection.cut]]
    name = "main_sequence"            # value = M_Hp - 5 (B-V): a band in the colour-magnitude
    terms = [                         # diagram between two lines of slope 5
        { absolute_magnitude = ["Hpmag", "Plx"], parallax_unit = "mas" },
        { column = "B-V", scale = -5.0 },
    ]
    min = -1.0
    max = 3.0

A cut's value is one quantity (``column``, ``ratio`` or ``absolute_magnitude`` in the cut itself)
or the sum of ``terms``, each one of those quantities times ``scale`` (default 1):

- ``column = "c"``: the column's value;
- ``ratio = ["a", "b"]``: a / b;
- ``absolute_magnitude = ["m", "plx"]``: m + 5 log10(plx [arcsec]) + 5 = m + 5 log10(plx/100)
  for plx in mas (``parallax_unit``: "mas" default, "arcsec", "uas").

A null, NaN or infinite value, a zero denominator or a parallax <= 0 in an absolute magnitude makes
the value non-finite: the row is not selected. Column names are matched case-insensitively.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xd_dask.io.rows import BAD_REASONS, BuildResult, resolve_columns

__all__ = [
    "NOT_SELECTED",
    "Cut",
    "Selection",
    "SelectionError",
    "apply_selection",
    "parse_selection",
    "selection_mask",
]

#: Reason code of a row outside the schema's selection.
NOT_SELECTED = BAD_REASONS.index("not_selected")
#: Parallax units of ``absolute_magnitude`` terms: the factor to arcsec.
_PLX_IN_ARCSEC = {"mas": 1e-3, "arcsec": 1.0, "uas": 1e-6}
_QUANTITIES = ("column", "ratio", "absolute_magnitude")
_TERM_KEYS = {*_QUANTITIES, "scale", "parallax_unit"}
_CUT_KEYS = {*_QUANTITIES, "parallax_unit", "name", "terms", "min", "max", "description"}


class SelectionError(ValueError):
    """A ``[selection]`` table is malformed (the message names the schema and the cut)."""


@dataclass(frozen=True)
class Term:
    """``scale`` x one quantity: kind "column" (columns = (c,)), "ratio" (a, b) or
    "absolute_magnitude" (m, plx) with ``plx_scale`` converting the parallax to arcsec."""

    kind: str
    columns: tuple[str, ...]
    scale: float = 1.0
    plx_scale: float = 1e-3


@dataclass(frozen=True)
class Cut:
    """One cut: the row is kept when ``lo <= sum(terms) <= hi`` (and the sum is finite)."""

    name: str
    terms: tuple[Term, ...]
    lo: float = -math.inf
    hi: float = math.inf
    description: str = ""

    def text(self) -> str:
        """The cut as a formula, e.g. ``10 <= Plx/e_Plx``."""
        parts = []
        for t in self.terms:
            q = {
                "column": lambda c: c[0],
                "ratio": lambda c: f"{c[0]}/{c[1]}",
                "absolute_magnitude": lambda c: f"M({c[0]}, {c[1]})",
            }[t.kind](t.columns)
            parts.append(q if t.scale == 1.0 else f"{t.scale:g}*{q}")
        expr = " + ".join(parts).replace("+ -", "- ")
        lo = f"{self.lo:g} <= " if math.isfinite(self.lo) else ""
        hi = f" <= {self.hi:g}" if math.isfinite(self.hi) else ""
        return f"{lo}{expr}{hi}"


@dataclass(frozen=True)
class Selection:
    """The cuts of a schema's ``[selection]`` (all must hold)."""

    cuts: tuple[Cut, ...]
    description: str = ""

    def columns(self) -> list[str]:
        """Every column a cut reads, in order, no repeats (case-insensitive)."""
        seen: set[str] = set()
        out = []
        for cut in self.cuts:
            for t in cut.terms:
                for c in t.columns:
                    if c.lower() not in seen:
                        seen.add(c.lower())
                        out.append(c)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped table; ``parse_selection(s.to_dict()) == s``."""
        cuts = []
        for cut in self.cuts:
            terms = []
            for t in cut.terms:
                d: dict[str, Any] = {
                    t.kind: t.columns[0] if t.kind == "column" else list(t.columns)
                }
                if t.scale != 1.0:
                    d["scale"] = t.scale
                if t.kind == "absolute_magnitude":
                    d["parallax_unit"] = next(
                        u for u, s in _PLX_IN_ARCSEC.items() if s == t.plx_scale
                    )
                terms.append(d)
            c: dict[str, Any] = {"name": cut.name, "terms": terms}
            if math.isfinite(cut.lo):
                c["min"] = cut.lo
            if math.isfinite(cut.hi):
                c["max"] = cut.hi
            if cut.description:
                c["description"] = cut.description
            cuts.append(c)
        out: dict[str, Any] = {"cut": cuts}
        if self.description:
            out["description"] = self.description
        return out


# --------------------------------------------------------------------------- parsing
def _bound(c: Mapping[str, Any], key: str, where: str, default: float) -> float:
    if key not in c:
        return default
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        raise SelectionError(f"{where}: {key!r} must be a number")
    return float(v)


def _columns(v: Any, n: int, key: str, where: str) -> tuple[str, ...]:
    vals = [v] if n == 1 and isinstance(v, str) else v
    if (
        not isinstance(vals, Sequence)
        or isinstance(vals, str)
        or len(vals) != n
        or not all(isinstance(x, str) and x for x in vals)
    ):
        what = "a column name" if n == 1 else f"a list of {n} column names"
        raise SelectionError(f"{where}: {key!r} must be {what}")
    return tuple(vals)


def _parse_term(t: Any, where: str, allowed: set[str]) -> Term:
    if not isinstance(t, Mapping):
        raise SelectionError(f"{where}: expected a table")
    unknown = set(t) - allowed
    if unknown:
        raise SelectionError(f"{where}: unknown key(s) {sorted(unknown)}")
    kinds = [k for k in _QUANTITIES if k in t]
    if len(kinds) != 1:
        raise SelectionError(f"{where}: give exactly one of {list(_QUANTITIES)} (got {kinds})")
    kind = kinds[0]
    cols = _columns(t[kind], 1 if kind == "column" else 2, kind, where)
    scale = _bound(t, "scale", where, 1.0)
    if not math.isfinite(scale) or scale == 0.0:
        raise SelectionError(f"{where}: 'scale' must be a finite non-zero number")
    unit = t.get("parallax_unit", "mas")
    if "parallax_unit" in t and kind != "absolute_magnitude":
        raise SelectionError(f"{where}: 'parallax_unit' applies to 'absolute_magnitude' only")
    if unit not in _PLX_IN_ARCSEC:
        raise SelectionError(f"{where}: 'parallax_unit' must be one of {sorted(_PLX_IN_ARCSEC)}")
    return Term(kind, cols, scale, _PLX_IN_ARCSEC[unit])


def parse_selection(s: Any, source: str = "<dict>") -> Selection:
    """Check and parse a ``[selection]`` table (layout in the module docstring)."""
    where = f"{source}: [selection]"
    if not isinstance(s, Mapping):
        raise SelectionError(f"{where}: expected a table")
    unknown = set(s) - {"cut", "description"}
    if unknown:
        raise SelectionError(f"{where}: unknown key(s) {sorted(unknown)}")
    raw = s.get("cut")
    if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
        raise SelectionError(f"{where}: at least one [[selection.cut]] is required")
    cuts, names = [], set()
    for i, c in enumerate(raw):
        at = f"{where} cut[{i}]"
        if not isinstance(c, Mapping):
            raise SelectionError(f"{at}: expected a table")
        unknown = set(c) - _CUT_KEYS
        if unknown:
            raise SelectionError(f"{at}: unknown key(s) {sorted(unknown)}")
        name = c.get("name", f"cut{i}")
        if not isinstance(name, str) or not name or name in names:
            raise SelectionError(f"{at}: 'name' must be a non-empty string, unique among the cuts")
        names.add(name)
        at = f"{where} cut {name!r}"
        if "terms" in c:
            if set(c) & {*_QUANTITIES, "parallax_unit"}:
                raise SelectionError(f"{at}: give 'terms' or one quantity, not both")
            ts = c["terms"]
            if not isinstance(ts, Sequence) or isinstance(ts, str) or not ts:
                raise SelectionError(f"{at}: 'terms' must be a non-empty list of tables")
            terms = tuple(_parse_term(t, f"{at} term[{j}]", _TERM_KEYS) for j, t in enumerate(ts))
        else:
            quantity = {k: c[k] for k in (*_QUANTITIES, "parallax_unit") if k in c}
            terms = (_parse_term(quantity, at, _TERM_KEYS - {"scale"}),)
        lo, hi = _bound(c, "min", at, -math.inf), _bound(c, "max", at, math.inf)
        if "min" not in c and "max" not in c:
            raise SelectionError(f"{at}: give 'min', 'max' or both")
        if not lo <= hi:
            raise SelectionError(f"{at}: min ({lo!r}) is above max ({hi!r})")
        cuts.append(Cut(name, terms, lo, hi, str(c.get("description", ""))))
    return Selection(tuple(cuts), str(s.get("description", "")))


# --------------------------------------------------------------------------- evaluation
def _values(table: pa.Table, name: str) -> np.ndarray:
    """(n,) float64 values of a column, NaN for nulls."""
    col = table.column(name)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        if not pa.types.is_decimal(col.type):
            raise TypeError(f"selection column {name!r} has non-numeric type {col.type}")
    col = pc.cast(col, pa.float64(), safe=False)
    return np.asarray(pc.fill_null(col, math.nan).to_numpy(), dtype=np.float64)


def cut_values(table: pa.Table, cut: Cut, found: Mapping[str, str]) -> np.ndarray:
    """(n,) float64 value of ``cut`` per row (NaN/inf where it cannot be evaluated)."""
    total = np.zeros(table.num_rows)
    with np.errstate(divide="ignore", invalid="ignore"):
        for t in cut.terms:
            a = _values(table, found[t.columns[0]])
            if t.kind == "column":
                v = a
            else:
                b = _values(table, found[t.columns[1]])
                if t.kind == "ratio":
                    v = a / b
                else:  # m + 5 log10(plx [arcsec]) + 5; plx <= 0 gives NaN / -inf
                    plx = np.where(b > 0, b * t.plx_scale, np.nan)
                    v = a + 5.0 * np.log10(plx) + 5.0
            total += t.scale * v
    return total


def selection_mask(data: pa.Table, selection: Selection) -> np.ndarray:
    """(n,) bool: True for the rows that pass every cut of ``selection``.

    Raises KeyError naming a missing column, TypeError for a non-numeric one.
    """
    found, missing = resolve_columns(data.column_names, selection.columns())
    if missing:
        raise KeyError(f"missing selection column(s) {missing}")
    keep = np.ones(data.num_rows, bool)
    for cut in selection.cuts:
        v = cut_values(data, cut, found)
        keep &= np.isfinite(v) & (v >= cut.lo) & (v <= cut.hi)
    return keep


def apply_selection(result: BuildResult, data: pa.Table, selection: Selection) -> int:
    """Mark the rows of ``result`` outside ``selection`` as ``not_selected`` (whatever else they
    were; their bad column is cleared); returns how many."""
    out = ~selection_mask(data, selection)
    result.reason[out] = NOT_SELECTED
    result.bad_column[out] = -1
    return int(out.sum())
