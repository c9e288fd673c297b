"""Applying a fitted model to a catalogue on the cluster: log-likelihoods and posteriors.

Workers read the partitions and write any per-row output themselves (one Parquet file per
partition, written atomically, at an absolute path: workers run in their own directories on real
clusters); the client receives only sums and the list of files written with their row counts,
and checks every listed file exists with that many rows before it writes ``_SUCCESS.json``.
The model's parameters travel whole (:class:`xd_dask.params.Params`): a background component
takes part in every score.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed import Client

from xd_dask.config import key, row_dtype
from xd_dask.distributed.apply_tasks import (
    PosteriorRequest,
    ScoreRequest,
    loglike,
    posterior_write,
)
from xd_dask.distributed.cluster import check_gpu_workers
from xd_dask.distributed.config import resolve_schema
from xd_dask.distributed.manifest import Manifest, build_manifest
from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.split import SIDES
from xd_dask.distributed.tasks import TaskOptions
from xd_dask.io import SchemaError
from xd_dask.io.writers import part_path
from xd_dask.model import XDModel
from xd_dask.utils import atomic_dir, atomic_path, get_logger

log = get_logger(__name__)

__all__ = ["ScoreResult", "posterior_catalog", "score_catalog"]


@dataclass
class ScoreResult:
    """Log-likelihood of a catalogue under a model.

    mean_loglike : mean log-likelihood per valid row; total_loglike : its sum; n_rows : valid rows
    (of the split's side, if any); n_read : rows read (both sides); dropped : rows dropped per
    reason (``on_bad="drop"``); files : per-partition Parquet files written (``out_dir``), in
    manifest order.
    """

    mean_loglike: float
    total_loglike: float
    n_rows: int
    n_read: int
    dropped: dict[str, int]
    files: list[str]


#: Bytes of per-row output one posterior task holds at most (the partitions of a posterior pass
#: are runs of row groups small enough): 1M rows in one file with responsibilities and top-3
#: took 4 GiB in one task.
POSTERIOR_TASK_BYTES = 256 << 20


def posterior_rows_per_task(
    n_features: int, n_components: int, groups: Sequence[str], top_k: int
) -> int:
    """Rows per posterior task so that its float64 outputs stay within
    :data:`POSTERIOR_TASK_BYTES` (inputs and the kernel's work arrays are of the same order)."""
    D, K = int(n_features), int(n_components)
    tri = D * (D + 1) // 2
    per_row = D + D * D  # the rows themselves (X, S)
    per_row += D * ("mean" in groups) + tri * ("cov" in groups) + 2 * ("map" in groups)
    per_row += K * ("resp" in groups) + int(top_k) * (2 + D + tri) + 2
    return max(1024, POSTERIOR_TASK_BYTES // (8 * per_row))


def _as_manifest(
    manifest: Manifest | str | os.PathLike | Sequence[str],
    schema: Any,
    max_rows_per_partition: int | None = None,
) -> Manifest:
    if isinstance(manifest, Manifest):
        return manifest
    return build_manifest(
        manifest, max_rows_per_partition=max_rows_per_partition, id_column=schema.id_column
    )


def _check_features(model: XDModel, schema: Any) -> None:
    """The catalogue must be read with the model's features (a SchemaError: bad input)."""
    if list(model.feature_names) != list(schema.features):
        raise SchemaError(
            f"the model's features {model.feature_names} differ from the schema's "
            f"{list(schema.features)}"
        )


def _runner(
    client, manifest, schema, on_bad, backend, gpu, dtype, fan_in, numba_threads, split=None
):
    if gpu:
        check_gpu_workers(client)
    if split is not None:
        fraction, side = split
        if side not in SIDES or not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"split must be (fraction in (0, 1), side in {SIDES}), got {split!r}")
        split = (float(fraction), str(side))
    opts = TaskOptions(schema, on_bad, row_dtype(dtype, gpu), backend, gpu, numba_threads, split)
    return PassRunner(client, manifest, opts, fan_in=fan_in), opts


def _check_parts(written: dict[str, int], out_dir: Path, tmp: Path, expected: list[str]) -> None:
    """Every part a pass reports is in the temporary directory with the rows it reports, and
    every partition has its part (OSError naming the first that is not)."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - the client reads footers only here

    missing = sorted(set(expected) - set(written))
    if missing:
        raise OSError(f"{out_dir}: no part was written for {missing[0]} ({len(missing)} missing)")
    for path, rows in written.items():
        p = Path(path)
        if p.parent != tmp or not p.is_file():
            raise OSError(
                f"{out_dir}: a worker reported {path} but it is not there (does the worker see "
                "the same file system at the same path?)"
            )
        got = pq.ParquetFile(p).metadata.num_rows
        if got != rows:
            raise OSError(f"{path}: holds {got} rows, the worker wrote {rows}")


#: The files a per-row output directory consists of (see :func:`xd_dask.utils.atomic_dir`).
_OWNED = r"{prefix}-\d+\.parquet|_SUCCESS\.json"


def score_catalog(
    model: XDModel,
    manifest: Manifest | str | os.PathLike | Sequence[str],
    schema: Any,
    client: Client,
    *,
    out_dir: str | os.PathLike | None = None,
    on_bad: str = key("catalog.on_bad").default,
    backend: str = key("fit.backend").default,
    gpu: bool = False,
    dtype: str = "float64",
    fan_in: int = key("fit.fan_in").default,
    numba_threads: int = key("fit.numba_threads").default,
    split: tuple[float, str] | None = None,
) -> ScoreResult:
    """Mean log-likelihood per row of a catalogue under ``model`` (``xd-score`` tasks).

    With ``out_dir``, workers also write ``score-<pid>.parquet`` (columns: the schema's id
    column under its own name, or ``row``; ``log_likelihood``; valid rows only) per partition,
    into a fresh directory that replaces ``out_dir`` when all are written
    (:func:`xd_dask.utils.atomic_dir`: no stale files of an earlier run remain; a directory
    holding other files is refused; a second writer gets LockError).

    split : None (every row) or (fraction, side): score only the "holdout" (or "train") side of
        the row-level split by source-id hash; ``(cfg.holdout_rows, "holdout")`` scores exactly
        the rows a fit with ``FitConfig.holdout_rows`` left out.
    """
    schema = resolve_schema(schema)
    manifest = _as_manifest(manifest, schema)
    _check_features(model, schema)
    runner, opts = _runner(
        client, manifest, schema, on_bad, backend, gpu, dtype, fan_in, numba_threads, split
    )
    with contextlib.ExitStack() as stack:
        tmp = None
        if out_dir is not None:
            tmp = Path(stack.enter_context(atomic_dir(out_dir, _OWNED.format(prefix="score"))))
            tmp = tmp.resolve()
        req = ScoreRequest(None if tmp is None else str(tmp))
        res = runner.run("score", (0,), loglike, req, params=model.params)
        ll = res.payload
        if ll.n == 0:
            raise ValueError("no valid rows to score (every row was dropped)")
        if tmp is not None:
            expected = [part_path(tmp, "score", p.pid) for p in manifest]
            _check_parts(res.files, Path(out_dir), tmp, expected)
    files = []
    if out_dir is not None:
        files = [part_path(out_dir, "score", p.pid) for p in manifest]
    result = ScoreResult(ll.ll / ll.n, ll.ll, ll.n, res.n_read, res.dropped, files)
    log.info("score: mean log-likelihood %.10g over %d rows", result.mean_loglike, ll.n)
    return result


def posterior_catalog(
    model: XDModel,
    manifest: Manifest | str | os.PathLike | Sequence[str],
    schema: Any,
    client: Client,
    out_dir: str | os.PathLike,
    *,
    on_bad: str = key("catalog.on_bad").default,
    gpu: bool = False,
    dtype: str = "float64",
    fan_in: int = key("fit.fan_in").default,
    columns: tuple[str, ...] = ("mean", "cov", "map"),
    top_k: int = 0,
    backend: str = key("fit.backend").default,
    max_rows_per_partition: int | None = None,
) -> list[str]:
    """Deconvolved per-row posteriors, written by the workers (``xd-posterior`` tasks).

    Each partition becomes ``<out_dir>/posterior-<pid>.parquet`` with one row per input row:
    the schema's id column under its own name (``row`` without one), ``mean_<f>``,
    ``cov_<f>_<g>`` (lower triangle), ``component``, ``component_prob`` (``columns`` and
    ``top_k`` choose more or fewer, and a model with a background component adds
    ``background_resp``: see :func:`xd_dask.distributed.apply_tasks.posterior_write`) and ``status``
    ("ok", or the reason ``on_bad="drop"`` dropped the row; its values are then null).
    ``_SUCCESS.json`` (files, rows written, valid rows, dropped counts) is written last. The
    files are written into a fresh directory beside ``out_dir`` which then replaces it
    (:func:`xd_dask.utils.atomic_dir`): a reader of ``out_dir`` never sees stale part files of
    an earlier run; a directory holding other files is refused (OutputError); a second writer
    gets LockError naming the first.

    Returns
    -------
    The Parquet files, in manifest order.

    Memory: files are split into runs of row groups of at most
    :func:`posterior_rows_per_task` rows (or ``max_rows_per_partition``), one task each, so a
    task's outputs stay within :data:`POSTERIOR_TASK_BYTES` whatever the file sizes (a file of
    one huge row group cannot be split: rewrite it with smaller row groups).
    """
    schema = resolve_schema(schema)
    rows = posterior_rows_per_task(model.n_features, model.n_components, columns, top_k)
    if max_rows_per_partition:
        rows = min(rows, int(max_rows_per_partition))
    manifest = _as_manifest(manifest, schema, rows)
    _check_features(model, schema)
    runner, opts = _runner(client, manifest, schema, on_bad, backend, gpu, dtype, fan_in, 1)
    out = Path(out_dir)
    with atomic_dir(out, _OWNED.format(prefix="posterior")) as tmp:
        tmp = Path(tmp).resolve()
        parts = [part_path(tmp, "posterior", p.pid) for p in manifest]
        req = PosteriorRequest(str(tmp), tuple(model.feature_names), tuple(columns), int(top_k))
        res = runner.run("posterior", (0,), posterior_write, req, params=model.params)
        _check_parts(res.files, out, tmp, parts)
        summary = {
            "files": [Path(f).name for f in parts],
            "rows": res.n_read,
            "rows_ok": res.n_used,
            "rows_read": res.n_read,
            "dropped": res.dropped,
            "features": list(model.feature_names),
            "model_metadata_method": model.metadata.get("method"),
        }
        with atomic_path(tmp / "_SUCCESS.json") as path:
            path.write_text(json.dumps(summary, indent=1))
    files = [part_path(out, "posterior", p.pid) for p in manifest]
    log.info("posterior: %d rows written to %d files in %s", res.n_read, len(files), out)
    return files
