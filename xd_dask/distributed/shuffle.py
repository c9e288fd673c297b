"""``xd-dask shuffle``: rewrite a catalogue into P files of randomly assigned rows, on the cluster.

Why: online EM and Adam update the model from waves of files; when files are sky regions (Gaia's
bulk files, make-catalog's) a wave is not a sample of the catalogue and the fit is biased
(DESIGN.md 4b). After a shuffle every file, and every row group of it, is a random sample.

How (:func:`shuffle_catalog`):

1. The input is listed (:func:`xd_dask.distributed.manifest.build_manifest`, files split into
   runs of row groups of at most ``chunk_rows`` rows) and read as a Dask DataFrame, one task per
   run (``dask.dataframe.from_map``), with Arrow-backed pandas columns (types, nulls and field
   metadata survive the round trip). Each row gets a key, ``splitmix64`` of its id salted by the
   seed (:func:`xd_dask.distributed.split.salted`); without an id column, of its position (file
   index, row) - then the assignment holds only while the input files are unchanged (logged).
2. Dask's own shuffle (``DataFrame.shuffle(on=key, npartitions=P)``; the P2P engine on a
   distributed cluster: disk-backed, memory per worker bounded by the input runs and the output
   files) moves each row to output partition ``hash(key) mod P``: random, and fixed by (ids, seed,
   P) alone.
3. Each output partition is sorted by (key, position) - an order that does not depend on which
   worker sent what, and that is random within the file - and written as ``part-<i>.parquet`` with
   the input's Arrow schema, row-group size (unless given) and compression, plus the key-value
   metadata ``xd_dask.shuffle`` (JSON: token, seed, partitions, key) and
   ``xd_dask.duplicate_free`` (the token: the files hold no id in common, so the manifest skips
   the cross-file duplicate check), which :func:`xd_dask.distributed.layout.detect_layout` reads.

The output is written into a temporary directory beside OUT that replaces OUT at the end
(:func:`xd_dask.utils.atomic_dir`: a failure leaves OUT as it was), and its bytes do not depend on
the number of workers. OUT must be on a
file system the workers share with the client (a local cluster, or a shared disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.distributed.catalog_files import DUPLICATE_FREE_KEY, open_file
from xd_dask.distributed.layout import SHUFFLE_KEY
from xd_dask.distributed.manifest import Manifest, Partition, build_manifest
from xd_dask.distributed.split import row_keys, salted
from xd_dask.outputs import atomic_dir
from xd_dask.utils import get_logger

log = get_logger(__name__)

__all__ = ["CHUNK_ROWS", "ShuffleError", "ShuffleResult", "shuffle_catalog"]

#: Input rows per read task (runs of whole row groups).
CHUNK_ROWS = 1 << 20
_KEY, _POS = "__xd_key", "__xd_pos"
#: Salt "purpose" of the shuffle key (strata use 23).
_PURPOSE = 29


class ShuffleError(ValueError):
    """The catalogue cannot be shuffled as asked (the message names the file or the option)."""


@dataclass(frozen=True)
class ShuffleResult:
    """What a shuffle wrote: the output directory, its files and rows per file, the key, the
    token recorded in the files and the seconds it took."""

    out: Path
    files: list[Path]
    rows: list[int]
    key: str
    token: str
    seconds: float


def _input_schema(manifest: Manifest) -> tuple[Any, int, str]:
    """(Arrow schema, largest row group, compression) of the input; every file must have the
    first file's schema."""
    schema, rg, codec, first = None, 1, "snappy", None
    for path in sorted({p.path for p in manifest}):
        with open_file(path) as fh:
            pf = pq.ParquetFile(fh)
            s, md = pf.schema_arrow, pf.metadata
        if schema is None:
            schema, first = s, path
            if md.num_row_groups and md.num_columns:
                codec = md.row_group(0).column(0).compression.lower()
        elif not s.remove_metadata().equals(schema.remove_metadata()):
            raise ShuffleError(
                f"{path}: its columns differ from those of {first} ({s.names} vs "
                f"{schema.names}); a catalogue to shuffle has one schema"
            )
        rg = max([rg] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    return schema, rg, "none" if codec == "uncompressed" else codec


def _read_run(
    part: Partition, file_index: int, first_row: int, id_column: str | None, seed: int
) -> Any:
    """One input run as a pandas DataFrame (Arrow-backed columns) plus the key and position."""
    import pandas as pd  # noqa: PLC0415 - 0.3 s; off the CLI's start-up path (as dask.dataframe)

    with open_file(part.path) as fh:
        pf = pq.ParquetFile(fh)
        groups = part.row_groups if part.row_groups is not None else range(pf.num_row_groups)
        table = pf.read_row_groups(list(groups))
    pos = (np.int64(file_index) << np.int64(40)) + first_row + np.arange(table.num_rows)
    if id_column is not None:
        ids = table.column(id_column).to_numpy(zero_copy_only=False).astype(np.int64)
        keys = row_keys(ids)
    else:
        keys = row_keys(pos)
    key = salted(keys, int(seed), _PURPOSE).view(np.int64)
    table = table.append_column(_KEY, pa.array(key)).append_column(_POS, pa.array(pos))
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def _write_part(
    df: Any,
    out_dir: str,
    schema: Any,
    row_group_size: int,
    compression: str,
    metadata: dict[bytes, bytes],
    partition_info: dict | None = None,
) -> Any:
    """Sort one output partition by (key, position), write it with the input's schema."""
    import pandas as pd  # noqa: PLC0415 - as in _read_run

    i = int(partition_info["number"]) if partition_info else 0
    df = df.sort_values([_KEY, _POS], kind="stable").drop(columns=[_KEY, _POS])
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    table = table.select(schema.names).cast(schema)
    table = table.replace_schema_metadata({**(schema.metadata or {}), **metadata})
    path = Path(out_dir) / f"part-{i:05d}.parquet"
    pq.write_table(
        table,
        path,
        row_group_size=max(1, int(row_group_size)),
        compression=compression,
    )
    return pd.DataFrame({"part": [i], "rows": [table.num_rows]})


def _id_column(manifest: Manifest, schema: Any, id_column: str | None) -> str | None:
    if id_column is None:
        log.warning("no id column given: rows are assigned to files by their position")
        return None
    if id_column not in schema.names:
        first = manifest[0].path
        log.warning(
            "%s has no id column %r: rows are assigned to files by their position (file, row), "
            "so the assignment holds only while the input files are unchanged",
            first,
            id_column,
        )
        return None
    if not str(schema.field(id_column).type).startswith(("int", "uint")):
        raise ShuffleError(
            f"{manifest[0].path}: id column {id_column!r} has type "
            f"{schema.field(id_column).type}, not an integer"
        )
    return id_column


def _out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        if not out.is_dir() or any(out.iterdir()):
            raise ShuffleError(f"{out} already exists; choose another OUT or --overwrite it")


#: The default output row groups: at least this many in the catalogue (64 waves per epoch of
#: fragments for 16 worker threads) ...
MIN_ROW_GROUPS = 1024
#: ... but no smaller than this many rows (Parquet reads stay efficient).
MIN_ROW_GROUP_ROWS = 4096


def default_row_group_size(n_rows: int, input_rows: int) -> int:
    """Rows per output row group: the input's, or fewer so that the catalogue has at least
    :data:`MIN_ROW_GROUPS` row groups (never under :data:`MIN_ROW_GROUP_ROWS`)."""
    return int(max(MIN_ROW_GROUP_ROWS, min(int(input_rows), -(-int(n_rows) // MIN_ROW_GROUPS))))


def shuffle_catalog(
    source: str | os.PathLike | list[str],
    out: str | os.PathLike,
    n_partitions: int,
    client: Any,
    *,
    seed: int = 0,
    id_column: str | None = "source_id",
    row_group_size: int | None = None,
    overwrite: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> ShuffleResult:
    """Rewrite the catalogue ``source`` into ``n_partitions`` files of randomly assigned rows
    (module docstring).

    Parameters
    ----------
    source : directory, glob, file, fsspec URL, or list of them (Parquet).
    out : output directory (local or shared by the workers; must not exist unless
        ``overwrite``, or be empty).
    n_partitions : P >= 1 output files.
    client : a connected ``distributed.Client``.
    seed : the assignment of rows to files derives from it (and the ids).
    id_column : the row-id column to hash; None, or a column the files lack: row positions.
    row_group_size : rows per output row group (default: the input's largest row group, but
        small enough that the catalogue has :data:`MIN_ROW_GROUPS` of them: online EM and Adam
        split files into runs of row groups so that an epoch makes its ``waves_per_epoch``
        updates whatever the number of files).
    overwrite : replace an existing ``out``.
    chunk_rows : input rows per read task (runs of whole row groups).

    Returns
    -------
    ShuffleResult
    """
    t0 = time.perf_counter()
    if int(n_partitions) < 1:
        raise ShuffleError(f"--partitions must be >= 1, got {n_partitions}")
    if row_group_size is not None and int(row_group_size) < 1:
        raise ShuffleError(f"--row-group-size must be >= 1, got {row_group_size}")
    out = Path(out).absolute()
    _out_dir(out, overwrite)
    manifest = build_manifest(source, max_rows_per_partition=chunk_rows, id_column=id_column)
    inside = [p.path for p in manifest if Path(p.path).absolute().is_relative_to(out)]
    if inside:
        raise ShuffleError(f"OUT {out} holds input files ({inside[0]}); choose another OUT")
    schema, rg, codec = _input_schema(manifest)
    key_col = _id_column(manifest, schema, id_column)
    token, meta_kv = _shuffle_metadata(manifest, int(seed), int(n_partitions), key_col)
    shuffled = _keyed_rows(manifest, key_col, int(seed)).shuffle(
        on=_KEY, npartitions=int(n_partitions), ignore_index=True
    )
    with atomic_dir(out, owned=r"part-\d{5}\.parquet") as tmp:
        written = shuffled.map_partitions(
            _write_part,
            str(tmp),
            schema,
            int(row_group_size or default_row_group_size(manifest.n_rows, rg)),
            codec,
            meta_kv,
            meta={"part": "int64", "rows": "int64"},
        )
        counts = client.compute(written).result().sort_values("part")
    rows = [int(r) for r in counts["rows"]]
    if sum(rows) != manifest.n_rows:  # pragma: no cover - Dask lost or duplicated rows
        raise ShuffleError(f"wrote {sum(rows)} rows of {manifest.n_rows}")
    paths = [out / f"part-{int(i):05d}.parquet" for i in counts["part"]]
    seconds = time.perf_counter() - t0
    log.info(
        "shuffled %d rows of %s into %d files in %s (%.1f s)",
        manifest.n_rows,
        manifest.source,
        len(paths),
        out,
        seconds,
    )
    return ShuffleResult(out, paths, rows, key_col or "row position", token, seconds)


def _shuffle_metadata(
    manifest: Manifest, seed: int, n_partitions: int, key_col: str | None
) -> tuple[str, dict[bytes, bytes]]:
    """(token, key-value metadata of every output file): the token derives from the input's
    fingerprint, the seed and the number of files."""
    token = hashlib.sha256(
        json.dumps([manifest.fingerprint, seed, n_partitions]).encode()
    ).hexdigest()[:32]
    meta_kv = {
        SHUFFLE_KEY: json.dumps(
            {
                "token": token,
                "seed": seed,
                "partitions": n_partitions,
                "key": key_col or "row position",
                "rows": manifest.n_rows,
            },
            sort_keys=True,
        ).encode(),
        DUPLICATE_FREE_KEY: token.encode(),
    }
    return token, meta_kv


def _keyed_rows(manifest: Manifest, key_col: str | None, seed: int) -> Any:
    """The input as a Dask DataFrame, one task per run (:func:`_read_run`: each row with its
    key and its position, file index << 40 + row in the file)."""
    import dask.dataframe as dd  # noqa: PLC0415 - heavy; off the CLI's start-up path

    files = sorted({p.path for p in manifest})
    file_index = {p: i for i, p in enumerate(files)}
    first_row, offsets = {}, {}
    for p in manifest:
        first_row[p.pid] = offsets.get(p.path, 0)
        offsets[p.path] = first_row[p.pid] + p.n_rows
    meta = _read_run(manifest[0], 0, 0, key_col, seed).iloc[:0]
    return dd.from_map(
        _read_run,
        list(manifest),
        [file_index[p.path] for p in manifest],
        [first_row[p.pid] for p in manifest],
        args=(key_col, seed),
        meta=meta,
        label="xd-shuffle-read",
        enforce_metadata=False,
    )
