"""The key type of the configuration table (:mod:`xd_dask.config`): :class:`Key`, choices a
registry provides (:class:`Provided`) and the extra checks some keys use.

This module imports nothing from the package.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]  # an extra check: returns an error text, or None


# --------------------------------------------------------------------------- the key type
_UNSET_DEFAULT = object()


@dataclass(frozen=True)
class Provided:
    """Choices that a registry elsewhere in the package provides: ``function`` of ``module``
    returns them (the method table gives ``fit.method``'s, the kernel registry ``fit.backend``'s).
    Read when first needed, so this module imports nothing from the package."""

    module: str
    function: str

    def names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.function)())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, value: object) -> bool:
        return value in self.names()

    def __len__(self) -> int:
        return len(self.names())


@dataclass(frozen=True)
class Key:
    """One setting.

    Parameters
    ----------
    name : dotted name, ``section.key`` (``fit.step.kappa``: section ``fit.step``).
    default : the default; its type (bool, int, float, str, list of str) is the key's type.
    help : one line (command-line help; the comment beside the key in job.toml).
    lo, hi, lo_open, hi_open : numeric range (closed unless open).
    choices : the allowed strings (a tuple, or :class:`Provided` by a registry).
    check : a further check of a string value (returns an error text or None).
    unset : the value that means "not set / automatic" where FitConfig takes None for it.
    fit : the FitConfig field: "" = the last part of the name for ``fit.*`` keys (none for
        others), a name, or None (not a FitConfig field).
    flag : command-line flag(s), e.g. ``"-k/--n-components"`` (None: only ``--set``).
    doc : further lines of documentation for job.toml.
    job : False for FitConfig-only keys (engine settings a job file does not set).
    """

    name: str
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | Provided | None = None
    check: Check | None = None
    unset: Any = _UNSET_DEFAULT
    fit: str | None = ""
    flag: str | None = None
    doc: str = ""
    job: bool = True

    @property
    def section(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[1]

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def has_unset(self) -> bool:
        return self.unset is not _UNSET_DEFAULT

    @property
    def field(self) -> str | None:
        """The FitConfig field this key fills (None: not a FitConfig field)."""
        if self.fit is None:
            return None
        if self.fit:
            return self.fit
        if self.section == "fit":
            return self.leaf
        return None

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``integer >= 1``, ``number in (0, 0.5]``."""
        t = self.type
        if t is bool:
            return "true or false"
        if t is list:
            return "list of names"
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if t is str:
            return "string"
        what = "integer" if t is int else "number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"{what} in {left}{lo:g}, {hi:g}{right}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi:g}"
        return what

    def validate(self, v: Any) -> str | None:
        """An error text (``must be ...``) for a bad value, None for a good one."""
        t = self.type
        if t is bool:
            return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
        if t is list:
            if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
                return f"must be a list of names, got {v!r}"
            return None
        if t is str:
            if not isinstance(v, str):
                return f"must be a string, got {v!r}"
            if self.choices is not None and v not in self.choices:
                return f"must be one of {', '.join(repr(c) for c in self.choices)}, got {v!r}"
            return self.check(v) if self.check is not None else None
        if t is int and (isinstance(v, bool) or not isinstance(v, int)):
            return f"must be an integer, got {v!r}"
        if t is float and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
        ):
            return f"must be a finite number, got {v!r}"
        if self.has_unset and v == self.unset:
            return None
        lo, hi = self.lo, self.hi
        both = f" ({self.allowed()})" if lo is not None and hi is not None else ""
        if lo is not None and (v <= lo if self.lo_open else v < lo):
            return f"must be {'>' if self.lo_open else '>='} {lo:g}{both}, got {v:g}"
        if hi is not None and (v >= hi if self.hi_open else v > hi):
            return f"must be {'<' if self.hi_open else '<='} {hi:g}{both}, got {v:g}"
        return None

    def typed(self, v: Any) -> Any:
        """The value in the key's type (an integer given for a float key becomes a float)."""
        return float(v) if self.type is float and not isinstance(v, bool) else v


def K(name: str, default: Any, help: str, **kw: Any) -> Key:  # noqa: N802 - reads as a table
    return Key(name, default, help, **kw)


def row_dtype(dtype: str, gpu: bool) -> str:
    """The row precision a ``fit.dtype`` value means: "auto" is "float32" on GPU workers (device
    memory and fp32 throughput; statistics still sum in float64) and "float64" on CPU workers."""
    if dtype == "auto":
        return "float32" if gpu else "float64"
    return dtype
