"""Per-row outputs as Parquet: log-likelihoods (``xd-dask score --per-row``) and deconvolved
posteriors (``xd-dask posterior``), one file per partition, written atomically by whoever holds
the rows (a worker, on a cluster).

Posterior files hold every input row: rows dropped under ``on_bad="drop"`` come back with null
values and their reason in the ``status`` column (:func:`with_status`, :mod:`.rowstatus`).
Columns are float64 whatever the reading dtype; the id column keeps the schema's name (``row``,
the row number in the file,
without one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.io.rowstatus import with_status
from xd_dask.utils import atomic_path

__all__ = ["POSTERIOR_GROUPS", "part_path", "posterior_columns", "with_status", "write_table"]

#: Column groups of a posterior file (:func:`posterior_columns`).
POSTERIOR_GROUPS = ("mean", "cov", "map", "resp")


def part_path(out_dir: str | os.PathLike, prefix: str, pid: int) -> str:
    """``<out_dir>/<prefix>-<pid:06d>.parquet``: the file of partition ``pid``."""
    return str(Path(out_dir) / f"{prefix}-{int(pid):06d}.parquet")


def write_table(table: pa.Table | dict[str, Any], out_path: str) -> int:
    """Write ``table`` (or its columns) to ``out_path`` atomically; returns the rows written.

    The directory must exist (the client makes it): a task that runs after its directory was
    removed fails instead of leaving a stray file there."""
    table = table if isinstance(table, pa.Table) else pa.table(table)
    with atomic_path(out_path, make_parent=False) as tmp:
        pq.write_table(table, tmp)
    return int(table.num_rows)


def posterior_columns(
    post: Any, ids: np.ndarray, id_name: str, feature_names: list[str], groups: tuple[str, ...]
) -> dict[str, Any]:
    """The columns of a posterior file from a :class:`xd_dask.kernels.PosteriorSummary`:

    - ``"mean"``: ``mean_<f>`` per feature, the mixture's mean;
    - ``"cov"``: ``cov_<f>_<g>`` for the lower triangle (f at or after g in feature order), the
      mixture's (moment-matched) covariance;
    - ``"map"``: ``component`` (the most probable component, int32) and ``component_prob`` (its
      responsibility);
    - ``"resp"``: ``resp_<j>``, every component's responsibility;

    with top-k components in ``post`` (t = 0 the most probable): ``top<t>_component`` (int32),
    ``top<t>_resp``, ``top<t>_mean_<f>``, ``top<t>_cov_<f>_<g>``, their own Gaussian posteriors;
    with a background component, ``background_resp`` (the mean and covariance are then those of
    the Gaussian part, the responsibilities the full ones).
    """
    unknown = set(groups) - set(POSTERIOR_GROUPS)
    if unknown:
        raise ValueError(f"unknown posterior column group(s) {sorted(unknown)}")
    names = list(feature_names)
    cols: dict[str, Any] = {id_name: pa.array(ids, pa.int64())}

    def add_gaussian(prefix: str, mean: np.ndarray, cov: np.ndarray, which) -> None:
        if "mean" in which:
            for i, f in enumerate(names):
                cols[f"{prefix}mean_{f}"] = mean[:, i]
        if "cov" in which:
            for i, f in enumerate(names):
                for j in range(i + 1):
                    cols[f"{prefix}cov_{f}_{names[j]}"] = cov[:, i, j]

    add_gaussian("", post.mean, post.cov, groups)
    if "map" in groups:
        cols["component"] = post.map_component.astype(np.int32)
        cols["component_prob"] = post.map_resp
    if "resp" in groups:
        for j in range(post.resp.shape[1]):
            cols[f"resp_{j}"] = post.resp[:, j]
    if post.background_resp is not None:
        cols["background_resp"] = post.background_resp
    for t in range(post.top_component.shape[1] if post.top_component is not None else 0):
        cols[f"top{t}_component"] = post.top_component[:, t].astype(np.int32)
        cols[f"top{t}_resp"] = post.top_resp[:, t]
        add_gaussian(f"top{t}_", post.top_mean[:, t], post.top_cov[:, t], ("mean", "cov"))
    return cols
