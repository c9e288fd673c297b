"""Step sizes lambda_t of online EM (and the shape of Adam's learning rate over the steps).

Defaults, ranges and the rule ``floor <= lambda0`` come from the key table (``fit.step.*`` in
:mod:`xd_dask.config`), the same checks a job file gets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xd_dask.config import cross_key_errors, key

__all__ = ["StepSchedule"]


def _default(leaf: str):
    return key(f"fit.step.{leaf}").default


@dataclass(frozen=True)
class StepSchedule:
    """Step sizes lambda_t for online EM, t = 0, 1, 2, ... (waves).

    kind="power": lambda_t = min(1, (t + t0)^-kappa), kappa in (0.5, 1] (Cappe & Moulines).
    kind="halving": lambda_t = lambda0 for t < hold, then halved every ``every`` waves, never below
    ``floor`` (the constant-then-halved schedule of Ritchie & Murray 2019).
    kind="incremental": no schedule (incremental EM, :class:`xd_dask.optim.online.OnlineEM`);
    lambda_t = 1 / (t + 1), the running average of the first epoch, is only nominal.
    """

    kind: str = _default("kind")
    kappa: float = _default("kappa")
    t0: float = _default("t0")
    lambda0: float = _default("lambda0")
    hold: int = _default("hold")
    every: int = _default("every")
    floor: float = _default("floor")

    def __post_init__(self) -> None:
        values = {f"fit.step.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in values.items():
            err = key(name).validate(value)
            if err:
                raise ValueError(f"{name} {err}")
        for _, err in cross_key_errors(values.get, values):
            raise ValueError(err)

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError("wave index must be >= 0")
        if self.kind == "incremental":
            return 1.0 / (t + 1.0)
        if self.kind == "power":
            return min(1.0, (t + self.t0) ** (-self.kappa))
        if t < self.hold:
            return self.lambda0
        halvings = 1 + (t - self.hold) // self.every
        return max(self.floor, self.lambda0 * 0.5**halvings)
