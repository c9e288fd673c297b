"""Fit checkpoints: everything needed to continue a fit exactly, in one atomically written file.

``<checkpoint_dir>/checkpoint.npz`` holds the arrays (parameters; the online-EM running estimate)
and a JSON header (format, config, manifest, position, history, counters, random state). It is
replaced after every iteration / wave with ``atomic_path``, so a crash leaves the previous
complete checkpoint.

Randomness: every random choice of a fit is drawn from a generator seeded by
``(seed, purpose, epoch, partition id)``; the header stores the seed, the epoch and wave position
and the current epoch's partition order, which together are the whole random state.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.distributed.tasks import Params
from xd_dask.em import OnlineState
from xd_dask.utils import atomic_path

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "FitState", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_NAME = "xd-dask-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not belong to this catalogue."""


@dataclass
class FitState:
    """The position of a fit after an iteration (batch EM) or a wave (online EM).

    iteration : batch-EM iterations done, or online-EM waves done (the step counter t).
    epoch, wave : online EM, the next wave to run is ``wave`` of epoch ``epoch`` (0-based).
    counts : rows read / used and dropped per reason in the last complete pass over the
        catalogue, ``{"read": int, "used": int, "dropped": {reason: int}}``;
        ``epoch_counts`` the same for the current, incomplete epoch (online EM).
    """

    params: Params
    online: OnlineState | None = None
    iteration: int = 0
    epoch: int = 0
    wave: int = 0
    wave_size: int = 0
    order: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    epoch_counts: dict = field(default_factory=dict)
    reseeded: list[dict] = field(default_factory=list)
    init_info: dict = field(default_factory=dict)
    converged: bool = False
    finished: bool = False
    retries: int = 0
    max_gathered_bytes: int = 0


def save_checkpoint(
    directory: str | Path, state: FitState, config: dict[str, Any], manifest: dict[str, Any]
) -> Path:
    """Write ``state`` (plus the fit's config and manifest) to ``directory``, atomically."""
    path = Path(directory) / CHECKPOINT_NAME
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "manifest": manifest,
        "position": {
            "iteration": state.iteration,
            "epoch": state.epoch,
            "wave": state.wave,
            "wave_size": state.wave_size,
            "order": [int(i) for i in state.order],
        },
        "random_state": {
            "seed": config.get("seed"),
            "epoch": state.epoch,
            "wave": state.wave,
            "epoch_order": [int(i) for i in state.order],
        },
        "history": state.history,
        "counts": state.counts,
        "epoch_counts": state.epoch_counts,
        "reseeded": state.reseeded,
        "init_info": state.init_info,
        "converged": state.converged,
        "finished": state.finished,
        "retries": state.retries,
        "max_gathered_bytes": state.max_gathered_bytes,
    }
    arrays = {
        "weights": state.params.weights,
        "means": state.params.means,
        "covariances": state.params.covariances,
    }
    if state.online is not None:
        arrays |= {
            "online_s": state.online.s,
            "online_mu": state.online.mu,
            "online_sigma": state.online.sigma,
        }
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)
    return path


def load_checkpoint(directory: str | Path) -> tuple[FitState, dict[str, Any], dict[str, Any]]:
    """Read a checkpoint; returns (state, config dict, manifest dict)."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here")
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            arrays = {k: np.array(z[k]) for k in z.files if k != "header"}
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({exc})") from None
    if header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not an xd-dask checkpoint")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format is newer than this xd-dask")
    online = None
    if "online_s" in arrays:
        online = OnlineState(arrays["online_s"], arrays["online_mu"], arrays["online_sigma"])
    pos = header["position"]
    state = FitState(
        params=Params(arrays["weights"], arrays["means"], arrays["covariances"]),
        online=online,
        iteration=int(pos["iteration"]),
        epoch=int(pos["epoch"]),
        wave=int(pos["wave"]),
        wave_size=int(pos["wave_size"]),
        order=[int(i) for i in pos["order"]],
        history=header["history"],
        counts=header["counts"],
        epoch_counts=header["epoch_counts"],
        reseeded=header["reseeded"],
        init_info=header["init_info"],
        converged=bool(header["converged"]),
        finished=bool(header["finished"]),
        retries=int(header["retries"]),
        max_gathered_bytes=int(header["max_gathered_bytes"]),
    )
    return state, header["config"], header["manifest"]
