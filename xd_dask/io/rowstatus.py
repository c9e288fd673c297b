"""Every input row in a per-row output, with its status: the rows ``on_bad="drop"`` dropped
are kept as rows whose values are null and whose ``status`` names the reason.

The reader (:func:`xd_dask.io.read_partition`) returns the valid rows and counts the others. To
place the dropped rows, the partition's columns are read again and their status computed with the
reader's rules (:func:`xd_dask.io.build_covariance` for values and errors, then a null id is
``missing_id`` and a later copy of a valid row's id is ``duplicate_id``); the valid rows found so
must be exactly the reader's (same count, same ids, in order), else an error says so. The second
read happens only for partitions that had dropped rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xd_dask.io.covariance import build_covariance
from xd_dask.io.reader import open_parquet, require_columns
from xd_dask.io.rows import BAD_REASONS

__all__ = ["STATUS_COLUMN", "with_status"]

STATUS_COLUMN = "status"
OK = "ok"


def _row_numbers(pf: Any, row_groups: Any) -> np.ndarray:
    """(n,) row numbers within the file of the rows read (all row groups or the selected)."""
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    groups = range(pf.num_row_groups) if row_groups is None else row_groups
    parts = [np.arange(starts[g], starts[g] + sizes[g], dtype=np.int64) for g in groups]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _statuses(
    path: str, row_groups: Any, schema: Any, dtype: Any, filesystem: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (n,) int64, id is null (n,) bool, reason code (n,) int) of every row read."""
    pf = open_parquet(path, filesystem)
    found = require_columns(path, pf.schema_arrow.names, schema)
    columns = [found[c] for c in schema.required_columns()]
    if row_groups is None:
        table = pf.read(columns=columns, use_threads=False)
    else:
        table = pf.read_row_groups(list(row_groups), columns=columns, use_threads=False)
    reason = build_covariance(table, schema, dtype=dtype).reason.astype(np.int16)
    if not schema.id_column:
        return _row_numbers(pf, row_groups), np.zeros(table.num_rows, bool), reason
    col = table.column(found[schema.id_column])
    null = pc.is_null(col).to_numpy(zero_copy_only=False)
    ids = pc.fill_null(col, 0).to_numpy().astype(np.int64, copy=False)
    reason[null & (reason == 0)] = BAD_REASONS.index("missing_id")
    valid = np.flatnonzero(reason == 0)
    _, first = np.unique(ids[valid], return_index=True)
    later = np.ones(valid.size, bool)
    later[first] = False
    reason[valid[later]] = BAD_REASONS.index("duplicate_id")
    return ids, null, reason


def _expand(column: Any, kept: np.ndarray, n: int) -> pa.Array:
    """A column of the kept rows placed at positions ``kept`` of ``n`` rows (null elsewhere)."""
    arr = pa.array(column) if not isinstance(column, pa.Array) else column
    index = np.full(n, -1, dtype=np.int64)
    index[kept] = np.arange(kept.size)
    return arr.take(pa.array(index, mask=index < 0))


def with_status(
    cols: dict[str, Any],
    id_name: str,
    n_dropped: int,
    reread: tuple[str, Any, Any, Any, Any] | None,
) -> pa.Table:
    """The per-row output table of a partition: ``cols`` (the valid rows' columns, the id column
    ``id_name`` first) plus a ``status`` column; with ``n_dropped`` > 0 the dropped rows are
    added in their file order with null values and their reason as status, found by reading the
    partition again: ``reread = (path, row_groups, schema, dtype, filesystem)`` (None: the rows
    are not in a file any more, an error)."""
    table = pa.table(cols)
    if n_dropped == 0:
        status = pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(table.num_rows, np.int32)), pa.array([OK])
        )
        return table.append_column(STATUS_COLUMN, status)
    if reread is None:
        raise ValueError("the status of dropped rows needs the partition, not a persisted block")
    path = reread[0]
    ids, null, reason = _statuses(*reread)
    kept = np.flatnonzero(reason == 0)
    ours = table.column(id_name).to_numpy()
    if kept.size != table.num_rows or not np.array_equal(ids[kept], ours):
        raise ValueError(
            f"{path}: the rows found valid for the status column ({kept.size}) differ "
            f"from the rows the reader kept ({table.num_rows})"
        )
    n = reason.size
    out = {name: _expand(table.column(name).combine_chunks(), kept, n) for name in cols}
    out[id_name] = pa.array(ids, pa.int64(), mask=null)
    names = [OK, *BAD_REASONS[1:]]
    out[STATUS_COLUMN] = pa.DictionaryArray.from_arrays(
        pa.array(reason.astype(np.int32)), pa.array(names)
    )
    return pa.table(out)
