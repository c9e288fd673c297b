"""A table written as Parquet parts ``<stem>-NNNNN.parquet`` that appear together or not at all."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.utils import atomic_path, get_logger

__all__ = ["ParquetParts", "existing_parts"]

log = get_logger(__name__)


class ParquetParts:
    """Parquet parts ``<stem>-NNNNN.parquet`` of at most ``rows_per_file`` rows in row groups of
    ``row_group_size`` rows (the last of a part smaller), each written to a temporary file
    (:func:`xd_dask.utils.atomic_path`) renamed into place only when every part has been written
    (:meth:`commit`); :meth:`abort` removes them."""

    def __init__(
        self, out_dir: Path, stem: str, rows_per_file: int, row_group_size: int, compression: str
    ) -> None:
        self.out_dir, self.stem = out_dir, stem
        self.rows_per_file, self.row_group_size = rows_per_file, row_group_size
        self.compression = None if compression == "none" else compression
        self.stack = contextlib.ExitStack()
        self.paths: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.pending: list[pa.Table] = []  # rows of the current part not yet in a row group
        self.in_part = 0
        self.n_rows = 0

    def _flush(self, whole: bool) -> None:
        """Write the pending rows as full row groups (and, if ``whole``, the remainder)."""
        n = sum(t.num_rows for t in self.pending)
        k = n if whole else n - n % self.row_group_size
        if k == 0 or self.writer is None:
            return
        rows = pa.concat_tables(self.pending)
        self.writer.write_table(rows.slice(0, k), row_group_size=self.row_group_size)
        self.pending = [rows.slice(k)] if k < n else []

    def _new_part(self, schema: pa.Schema) -> None:
        if self.writer is not None:
            self._flush(whole=True)
            self.writer.close()
        target = self.out_dir / f"{self.stem}-{len(self.paths):05d}.parquet"
        tmp = self.stack.enter_context(atomic_path(target, suffix=".parquet"))
        self.writer = pq.ParquetWriter(tmp, schema, compression=self.compression)
        self.paths.append(target)
        self.schema, self.in_part = schema, 0

    def write(self, table: pa.Table) -> None:
        if self.schema is not None and not table.schema.equals(self.schema):
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                log.info("%s: column types change at row %d: new part", self.stem, self.n_rows)
                self._new_part(table.schema)
        while table.num_rows:
            if self.writer is None or self.in_part >= self.rows_per_file:
                self._new_part(self.schema or table.schema)
            take = min(table.num_rows, self.rows_per_file - self.in_part)
            self.pending.append(table.slice(0, take))
            self._flush(whole=False)
            table = table.slice(take)
            self.in_part += take
            self.n_rows += take

    def commit(self) -> list[Path]:
        if self.writer is not None:
            self._flush(whole=True)
            self.writer.close()
        self.stack.close()  # renames every temporary part onto its name
        return self.paths

    def abort(self, exc: BaseException) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.stack.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary parts


def existing_parts(out_dir: Path, stem: str) -> list[Path]:
    pattern = re.compile(rf"{re.escape(stem)}-\d{{5}}\.parquet")
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))
