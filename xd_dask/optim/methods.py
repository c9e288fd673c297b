"""The method table: one entry per fitting method (``fit.method``).

An entry (:class:`Method`) says how to build the method's update rule from the settings, whether
it is full-batch (one step = a pass over every row: batch EM) or runs on waves (online EM, Adam),
and which of the method-specific keys apply to it. Everything that depends on the method asks its
entry -- the configuration's choices of ``fit.method``, the checks that name settings which do not
apply, the fit's schedule, the progress lines, checkpoints -- instead of comparing names.

Adding a method is one :func:`register` call (a test module can do it): the rule must follow
:class:`xd_dask.optim.rules.UpdateRule`; its factory gets a :class:`Settings` (dotted key ->
value, table defaults for keys not given) and the planned number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from xd_dask.config import KEYS, key
from xd_dask.optim.adam import Adam, adam_schedule
from xd_dask.optim.batch import BatchEM
from xd_dask.optim.online import OnlineEM
from xd_dask.optim.rules import UpdateRule
from xd_dask.optim.schedule import StepSchedule

__all__ = [
    "BATCH_KEYS",
    "WAVE_KEYS",
    "InapplicableSettingWarning",
    "Method",
    "Settings",
    "inapplicable",
    "method",
    "method_names",
    "register",
    "step_schedule",
    "unregister",
]

#: Keys of full-batch methods (batch EM's iteration limit).
BATCH_KEYS = ("fit.max_iter",)
#: Keys of methods on waves: epochs, how waves are drawn, subsampling, split-and-merge on waves.
WAVE_KEYS = (
    "fit.epochs",
    "fit.waves",
    "fit.waves_per_epoch",
    "fit.wave_size",
    "fit.subsample",
    "fit.split_merge_every",
    "fit.split_merge_trial_waves",
)


class InapplicableSettingWarning(UserWarning):
    """A setting was given that the chosen fitting method does not use."""


#: The online-EM step schedule's keys.
STEP_KEYS = tuple(f"fit.step.{leaf}" for leaf in StepSchedule.__dataclass_fields__)


class Settings(Mapping[str, Any]):
    """Dotted key -> value (``settings["fit.reg_covar"]``); a table key not given has its
    default. What a rule factory reads."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> Any:
        if name in self._values:
            return self._values[name]
        return key(name).default  # KeyError for names that are not keys

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def step_schedule(settings: Mapping[str, Any]) -> StepSchedule:
    """The online-EM step schedule of ``settings`` (``fit.step.*``)."""
    return StepSchedule(**{name.rsplit(".", 1)[1]: settings[name] for name in STEP_KEYS})


Factory = Callable[[Settings, int], UpdateRule]


@dataclass(frozen=True)
class Method:
    """One fitting method.

    name : the ``fit.method`` value.  summary : a few words (progress lines, reports).
    full_batch : a step is a pass over every row (iterations, ``max_iter``/``tol``); else the
        method runs on waves (epochs).
    keys : the method-specific keys that apply to it (every other method-specific key of the
        table is refused or warned about when set).
    build : ``build(settings, planned_steps) -> UpdateRule``.
    """

    name: str
    summary: str
    full_batch: bool
    keys: tuple[str, ...]
    build: Factory

    @property
    def step_noun(self) -> str:
        """What a step is called: "iteration" (full batch) or "wave"."""
        return "iteration" if self.full_batch else "wave"

    def rule(self, settings: Mapping[str, Any] | None = None, planned_steps: int = 1) -> UpdateRule:
        """The update rule for ``settings`` (table defaults where not given)."""
        return self.build(Settings(settings), int(planned_steps))


_TABLE: dict[str, Method] = {}


def register(entry: Method) -> Method:
    """Add (or replace) a method; returns it."""
    unknown = [k for k in entry.keys if k not in _key_names()]
    if unknown:
        raise ValueError(
            f"method {entry.name!r} names keys that are not in the key table: {unknown}"
        )
    _TABLE[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a method (the built-in ones stay unless replaced)."""
    _TABLE.pop(name, None)


def _key_names() -> set[str]:
    return {k.name for k in KEYS}


def method(name: str) -> Method:
    """The entry of ``name``; ValueError naming the methods there are."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(
            f"unknown fit method {name!r}; the methods are {', '.join(method_names())}"
        ) from None


def method_names() -> tuple[str, ...]:
    """The registered methods, in registration order (the choices of ``fit.method``)."""
    return tuple(_TABLE)


def specific_keys() -> set[str]:
    """Keys that apply to some methods only."""
    return {k for m in _TABLE.values() for k in m.keys}


def inapplicable(name: str, given: Iterable[str]) -> list[str]:
    """The keys among ``given`` that are method-specific but do not apply to method ``name``."""
    entry = method(name)
    return sorted(k for k in set(given) & specific_keys() if k not in entry.keys)


def _adam(s: Settings, planned: int) -> Adam:
    """Adam with a budget schedule (``fit.tol = 0``), else halving on plateaus of 10 tol."""
    if s["fit.tol"] > 0:
        return Adam(s["fit.learning_rate"], plateau=10.0 * s["fit.tol"])
    return Adam(s["fit.learning_rate"], adam_schedule(planned))


register(
    Method(
        "em",
        "batch EM",
        True,
        BATCH_KEYS,
        lambda s, n: BatchEM(s["fit.reg_covar"]),
    )
)
register(
    Method(
        "online",
        "online EM",
        False,
        (*WAVE_KEYS, *STEP_KEYS),
        lambda s, n: OnlineEM(step_schedule(s), s["fit.reg_covar"]),
    )
)
register(
    Method(
        "adam",
        "Adam",
        False,
        (*WAVE_KEYS, "fit.learning_rate"),
        _adam,
    )
)
