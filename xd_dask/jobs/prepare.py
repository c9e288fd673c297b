"""What a fit checks and lists before a cluster starts, and its output directory's life.

:func:`prepare_fit` reads only the catalogue's Parquet footers: the schema, the training and
held-out manifests, the schema's columns in the files, the held-out choice against the file
layout, whether the data can support the model (free parameters against rows), and the fit's
:class:`~xd_dask.distributed.FitConfig`. Every refusal it raises is a usage error (exit 2 in the
CLI), found in seconds, before workers start.

:func:`fit_output` holds the output directory for the run: its lock (a second writer is refused
naming the first), stale temporaries removed, an old fit's checkpoints refused (or deleted with
``overwrite``), and after a failure nothing of this run left behind: checkpoints of a fresh fit,
and the directory itself when the run created it. (An interrupted run, Ctrl-C or a kill, keeps
its checkpoints: ``xd-dask resume`` continues it.)

The other commands that start a cluster check in the same way first: :func:`replan` (``xd-dask
select``: the plan of each K from one listing), :func:`prepare_apply` (``score``, ``posterior``:
schema, the model's features, listing, columns and units, the output directory) and
:func:`check_unlocked` (a lock another run holds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xd_dask.distributed.checkpoint import CheckpointError, load_checkpoint
from xd_dask.distributed.layout import detect_layout
from xd_dask.distributed.manifest import Manifest, build_manifest
from xd_dask.io.reader import CatalogError, check_units, require_columns
from xd_dask.io.schema import SchemaError, load_schema
from xd_dask.jobs.config import ConfigError, JobConfig
from xd_dask.locks import OUTPUT_LOCK, FileLock, is_locked, output_lock
from xd_dask.params import Params
from xd_dask.utils import TMP_SUFFIX, OutputError, get_logger, remove_stale_temporaries

log = get_logger(__name__)

__all__ = [
    "CHECKPOINT_DIR",
    "ApplyPlan",
    "FitPlan",
    "HoldoutMismatchWarning",
    "check_holdout",
    "check_model_size",
    "check_unlocked",
    "fit_output",
    "load_schema_checked",
    "manifest_of",
    "prepare_apply",
    "prepare_fit",
    "replan",
]

CHECKPOINT_DIR = "checkpoints"


@dataclass
class FitPlan:
    """A checked fit, ready to run on a cluster.

    out : the output directory.  schema : the catalogue schema.
    train : the training sources (paths) and ``manifest`` their partitions.
    holdout : the held-out partitions (None: no held-out score); ``split`` the row split they
        are scored with (``(fraction, "holdout")`` for ``catalog.holdout_rows``), ``held_desc``
        how they are described in the outputs.
    resume : continue the checkpoints in ``out``.
    """

    cfg: JobConfig
    out: Path
    schema: Any
    train: Any
    manifest: Manifest
    holdout: Manifest | None
    split: tuple[float, str] | None
    held_desc: str | None
    resume: bool = False

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR


def load_schema_checked(spec: str) -> Any:
    """The catalogue schema for ``catalog.schema``; a bad schema is a config error (exit 2)."""
    try:
        return load_schema(spec or None)
    except SchemaError as exc:
        raise ConfigError(f"catalog.schema: {exc}") from None


def manifest_of(sources: Any, cfg: JobConfig, schema: Any) -> Manifest:
    """The partitions of ``sources`` as the job lists them."""
    return build_manifest(
        sources,
        max_rows_per_partition=cfg.catalog.max_rows_per_partition or None,
        id_column=schema.id_column,
    )


def _check_columns(manifest: Manifest, schema: Any, what: str) -> None:
    """The schema's columns are in the first file, in the schema's units (its footer): else a
    usage error naming the file, the column (and both units), before any row is read. (A later
    file that differs is named by the worker that reads it.)"""
    import pyarrow.parquet as pq  # noqa: PLC0415 - footers only

    path = manifest[0].path
    if "://" in path:
        return  # remote: the first read names it
    arrow = pq.ParquetFile(path).schema_arrow
    try:
        check_units(path, arrow, require_columns(path, list(arrow.names), schema), schema)
    except CatalogError as exc:
        raise SchemaError(f"{what}: {exc}") from None


def _held_out_files(cfg: JobConfig, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(training files, held-out files): the seeded choice of ``catalog.holdout_fraction``.

    Only on files that are a random sample (``xd-dask shuffle``): whole files of a sky-ordered
    catalogue are sky regions, and a held-out score of them is biased (measured: -32.46 held
    out vs -17.22 training on 24 HEALPix files). Otherwise ConfigError naming holdout_rows."""
    cat = cfg.catalog
    layout = detect_layout(manifest)
    if layout.kind != "shuffled":
        raise ConfigError(
            f"catalog.holdout_fraction ({cfg.source('catalog.holdout_fraction')}) holds out whole "
            f"files, and the files of {cat.path!r} are not known to be a random sample "
            f"({layout.kind}: {layout.evidence}): the held-out rows would be sky regions, not a "
            f"sample. Set catalog.holdout_rows = {cat.holdout_fraction:g} instead (rows chosen "
            "by a hash of their id, from every file), or fit files written by `xd-dask shuffle`"
        )
    files = sorted({p.path for p in manifest})
    if len(files) < 2:
        raise ConfigError(
            f"catalog.holdout_fraction = {cat.holdout_fraction} needs at least 2 files in "
            f"{cat.path!r} (found {len(files)}); set catalog.holdout_rows instead"
        )
    n_hold = min(len(files) - 1, max(1, round(cat.holdout_fraction * len(files))))
    rng = np.random.default_rng([int(cfg.fit.seed), 7])
    held = set(rng.choice(len(files), size=n_hold, replace=False).tolist())
    train = [f for i, f in enumerate(files) if i not in held]
    hold = [f for i, f in enumerate(files) if i in held]
    log.info("holding out %d of %d files for scoring", len(hold), len(files))
    return train, hold


def _subset(full: Manifest, files: list[str]) -> Manifest:
    """The partitions of ``files``, renumbered 0, 1, ..."""
    parts = [p for p in full if p.path in set(files)]
    return Manifest(tuple(dataclasses.replace(p, pid=i) for i, p in enumerate(parts)), full.source)


def _sources(cfg: JobConfig, schema: Any) -> tuple[Any, Manifest, Any, Any, Any]:
    """(training sources, their manifest, held-out manifest or None, held-out split, a
    description of the held-out rows): each catalogue is listed once here."""
    cat = cfg.catalog
    manifest = manifest_of(cat.path, cfg, schema)
    _check_columns(manifest, schema, "catalog.path")
    if cat.holdout_fraction > 0:
        train, hold = _held_out_files(cfg, manifest)
        return train, _subset(manifest, train), _subset(manifest, hold), None, hold
    if cat.holdout:
        held = manifest_of(cat.holdout, cfg, schema)
        check_holdout(cfg, schema, manifest, held)
        return cat.path, manifest, held, None, cat.holdout
    if cat.holdout_rows > 0:
        return cat.path, manifest, manifest, (cat.holdout_rows, "holdout"), cat.path
    return cat.path, manifest, None, None, None


def check_holdout(cfg: JobConfig, schema: Any, train: Any, holdout_manifest: Any) -> None:
    """A separate held-out catalogue must be readable with the schema (else ConfigError) and
    should look like the catalogue: files whose columns differ from the catalogue's give a
    warning naming the difference (e.g. a demo job's synthetic held-out set scored against a
    model of a real catalogue)."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - footers only

    def columns(path: str) -> list[str]:
        if "://" in path:  # remote: leave it to the read
            return []
        return list(pq.ParquetFile(path).schema_arrow.names)

    held = holdout_manifest[0].path
    held_cols = columns(held)
    if held_cols:
        try:
            require_columns(held, held_cols, schema)
        except CatalogError as exc:
            raise ConfigError(f"catalog.holdout ({cfg.source('catalog.holdout')}): {exc}") from None
    train_cols = columns(train[0].path)
    if (
        held_cols
        and train_cols
        and {c.lower() for c in held_cols} != {c.lower() for c in train_cols}
    ):
        only_h = sorted(set(held_cols) - set(train_cols))[:5]
        only_t = sorted(set(train_cols) - set(held_cols))[:5]
        warnings.warn(
            f"the held-out catalogue {cfg.catalog.holdout!r} ({cfg.source('catalog.holdout')}) "
            f"does not look like the catalogue {cfg.catalog.path!r}: its files have "
            f"{len(held_cols)} columns against {len(train_cols)} (only in the held-out set: "
            f"{only_h}; only in the catalogue: {only_t}); is it a sample of the same catalogue?",
            HoldoutMismatchWarning,
            stacklevel=2,
        )


class HoldoutMismatchWarning(UserWarning):
    """A held-out catalogue does not look like a sample of the fitted catalogue."""


def check_model_size(cfg: JobConfig, n_features: int, n_rows: int) -> None:
    """Refuse a model with at least as many free parameters as training rows (it would
    memorise them: 5 rows, K = 4, D = 7 has 139 parameters and "converges" to a mean
    log-likelihood of +17 per row)."""
    K = int(cfg.fit.n_components)
    D = int(n_features)
    bg = cfg.fit.background
    p = Params(np.ones(K), np.zeros((K, D)), np.zeros((K, D, D))).n_free + int(bg)
    if p >= n_rows:
        raise ConfigError(
            f"fit.n_components = {K} ({cfg.source('fit.n_components')}) in {D} features has {p} "
            f"free parameters, as many as or more than the {n_rows} training rows: the mixture "
            "would memorise the rows, not describe them. Use fewer components or more rows"
        )
    if K > n_rows:
        raise ConfigError(f"fit.n_components = {K} is more than the {n_rows} training rows")


def _check_checkpoints(out: Path, resume: bool, overwrite: bool) -> None:
    """A resume needs the checkpoints of ``out``; a fresh fit refuses them unless
    ``overwrite``."""
    ckpt = out / CHECKPOINT_DIR
    if resume and not ckpt.is_dir():
        raise ConfigError(f"{out} is not the output directory of a checkpointed fit")
    if not resume and ckpt.exists() and not overwrite:
        raise ConfigError(
            f"{out} already holds the checkpoints of a fit: continue it with "
            f"`xd-dask resume {out}`, or pass --overwrite, or choose another --out"
        )


def _training_rows(manifest: Manifest, split: tuple[float, str] | None) -> int:
    rows = manifest.n_rows
    return rows if split is None else int(rows * (1.0 - split[0]))


def prepare_fit(
    cfg: JobConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> FitPlan:
    """Check and list a fit before a cluster starts (module docstring); returns its plan."""
    out = Path(out_dir if out_dir is not None else cfg.output.dir)
    check_unlocked(out / OUTPUT_LOCK, f"output directory {out}")  # a running fit first
    _check_checkpoints(out, resume, overwrite)
    schema = load_schema_checked(cfg.catalog.schema)
    train, manifest, holdout, split, held_desc = _sources(cfg, schema)
    if not resume:
        check_model_size(cfg, len(schema.features), _training_rows(manifest, split))
    return FitPlan(cfg, out, schema, train, manifest, holdout, split, held_desc, resume)


def replan(plan: FitPlan, cfg: JobConfig, out_dir: str | Path, *, overwrite: bool = False):
    """The plan of ``plan``'s catalogue for the fit settings ``cfg`` (e.g. another K) into
    ``out_dir``: the output's checkpoints, its lock and the model size are checked again, the
    catalogue is not listed again (``xd-dask select`` plans every K before a cluster starts)."""
    out = Path(out_dir)
    check_unlocked(out / OUTPUT_LOCK, f"output directory {out}")
    _check_checkpoints(out, False, overwrite)
    check_model_size(cfg, len(plan.schema.features), _training_rows(plan.manifest, plan.split))
    return dataclasses.replace(plan, cfg=cfg, out=out, resume=False)


def check_unlocked(lock_file: Path, what: str) -> None:
    """LockError naming the holder when another process holds ``lock_file`` (nothing is
    created when it is free: the run takes the lock itself later)."""
    if not is_locked(lock_file):
        return
    FileLock(lock_file, what).acquire(timeout=0).release()  # raises naming the holder


@dataclass
class ApplyPlan:
    """A checked ``score`` or ``posterior`` run: the schema and the catalogue's partitions."""

    schema: Any
    manifest: Manifest


def prepare_apply(
    model: Any, cfg: JobConfig, catalogue: str, out_dir: str | Path | None, owned: str | None
) -> ApplyPlan:
    """Check a run that applies ``model`` to ``catalogue`` before a cluster starts: the schema
    (``catalog.schema``) has the model's features, the catalogue lists, its first file has the
    columns in the schema's units, and the output directory ``out_dir`` (files matching the
    regular expression ``owned``) is free: not locked by another run, not a file, holding no
    file the command did not write. Every refusal is a usage error (exit 2 in the CLI)."""
    schema = load_schema_checked(cfg.catalog.schema)
    if list(model.feature_names) != list(schema.features):
        raise SchemaError(
            f"the model's features {model.feature_names} differ from the features "
            f"{list(schema.features)} of schema {schema.name!r} ({cfg.source('catalog.schema')})"
            "; give the schema the model was fitted with (--schema)"
        )
    manifest = build_manifest(catalogue, id_column=schema.id_column)  # one partition per file
    _check_columns(manifest, schema, "the catalogue")
    if out_dir is not None and owned is not None:
        check_output_dir(Path(out_dir), owned)
    return ApplyPlan(schema, manifest)


def check_output_dir(target: Path, owned: str) -> None:
    """The checks :func:`xd_dask.utils.atomic_dir` makes when it starts, made early: its lock
    (``.<name>.lock`` beside it) free, ``target`` a directory (or absent) holding only files
    matching ``owned`` (and temporaries)."""
    check_unlocked(target.parent / f".{target.name}.lock", f"output directory {target}")
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        raise OutputError(f"{target} exists and is not a directory; choose another output")
    foreign = sorted(
        e.name
        for e in target.iterdir()
        if not (re.fullmatch(owned, e.name) and e.is_file()) and not _temporary(e.name)
    )
    if foreign:
        raise OutputError(
            f"{target} holds files this command did not write (e.g. {foreign[0]!r}); refusing "
            "to replace it: choose a new or empty output directory"
        )


def _temporary(name: str) -> bool:
    """A temporary of an interrupted writer (``.<name>.<random>.tmp``, :mod:`xd_dask.utils`)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX) and len(name) > len(TMP_SUFFIX) + 1


@contextlib.contextmanager
def fit_output(plan: FitPlan, overwrite: bool = False) -> Iterator[Path]:
    """Hold the plan's output directory for a run (module docstring)."""
    out = plan.out
    created = not out.exists()
    ckpt = plan.checkpoint_dir
    fresh_checkpoints = False
    try:
        with output_lock(out):
            if not plan.resume and ckpt.exists():
                if not overwrite:
                    raise ConfigError(
                        f"{out} already holds the checkpoints of a fit: continue it with "
                        f"`xd-dask resume {out}`, or pass --overwrite, or choose another --out"
                    )
                shutil.rmtree(ckpt)
            fresh_checkpoints = not plan.resume
            for directory in (out, ckpt):
                remove_stale_temporaries(directory)
            yield out
    except Exception:
        if fresh_checkpoints and ckpt.exists():
            steps = _checkpointed_steps(ckpt)
            if steps:
                log.warning(
                    "the fit failed after %d step(s); its checkpoints are kept in %s: continue "
                    "it with `xd-dask resume %s` once the cause is fixed",
                    steps,
                    ckpt,
                    out,
                )
            else:
                shutil.rmtree(ckpt, ignore_errors=True)
        if created:
            _remove_if_only_lock(out)
        raise


def _checkpointed_steps(ckpt: Path) -> int:
    """Steps (iterations / waves) a fit's checkpoint holds; 0 when none or unreadable: a fit
    that fails before its first step leaves nothing, one that fails later keeps what resume
    needs (hours of a nightly fit are not thrown away with a lost cluster)."""
    try:
        return int(load_checkpoint(ckpt)[0].iteration)
    except (CheckpointError, OSError):
        return 0


def _remove_if_only_lock(out: Path) -> None:
    """Remove a directory this run created when it holds nothing but the (released) lock."""
    try:
        left = {p.name for p in out.iterdir()}
    except OSError:
        return
    if left <= {OUTPUT_LOCK}:
        with contextlib.suppress(OSError):
            (out / OUTPUT_LOCK).unlink(missing_ok=True)
            out.rmdir()
