"""Layout and writing of a synthetic catalogue: HEALPix-range partitions, spill, Parquet, manifest.

Each chunk's rows are appended to one spill file per output partition; each partition is then
converted to Parquet in row groups. Memory is bounded by the chunk and row group sizes, whatever
n_rows; the spill needs about 130 bytes per row of temporary disk space.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xd_dask.codecache import numba_cache_ok
from xd_dask.io.healpix import ang2pix_nest, n_pixels
from xd_dask.io.synthetic import rows
from xd_dask.io.synthetic.columns import COLOUR, GAIA_COLUMNS, RECORD, SCHEMA, SOLVED, VALUE
from xd_dask.io.synthetic.model import draw_true, true_mixture
from xd_dask.io.synthetic.rows import PARTITION_LEVEL, ErrorModel, chunk_args, chunk_rng
from xd_dask.model import XDModel
from xd_dask.utils import atomic_path, get_logger

_CACHE = numba_cache_ok(__file__)  # Numba's on-disk cache only where no one else writes

__all__ = ["FORMAT", "MANIFEST", "TRUE_MODEL", "make_catalog", "partition_bounds", "partition_name"]

log = get_logger(__name__)

MANIFEST = "manifest.json"
TRUE_MODEL = "true_model.npz"
FORMAT = "xd-dask synthetic gaia catalogue"


# --------------------------------------------------------------------------- layout
def partition_bounds(
    n_partitions: int, seed: int, model: XDModel | None = None, n_pilot: int = 200_000
) -> np.ndarray:
    """(P + 1,) level-8 pixel boundaries: file p holds pixels [b[p], b[p+1]).

    Chosen at quantiles of a pilot sample of the true sky distribution, so files hold similar
    numbers of rows; strictly increasing.
    """
    npix = n_pixels(PARTITION_LEVEL)
    if not 1 <= n_partitions <= npix:
        raise ValueError(f"n_partitions must be in 1..{npix}, got {n_partitions}")
    model = true_mixture() if model is None else model
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,)))
    v = draw_true(rng, n_pilot, model)
    pix = np.sort(ang2pix_nest(PARTITION_LEVEL, v[:, 0], v[:, 1]))
    q = pix[(np.arange(1, n_partitions) * n_pilot) // n_partitions]
    b = np.concatenate([[0], q, [npix]]).astype(np.int64)
    for i in range(1, n_partitions):  # strictly increasing, room left for the rest
        b[i] = min(max(b[i], b[i - 1] + 1), npix - (n_partitions - i))
    return b


def partition_name(first: int, last: int) -> str:
    return f"GaiaSource_{first:06d}-{last:06d}.parquet"


# --------------------------------------------------------------------------- records -> Arrow
@numba.njit(cache=_CACHE, nogil=True)
def _group_by_partition(rec, part, n_partitions, out, counts):
    """Stable counting sort of rec[:n] by part into out; counts[p] = rows of partition p."""
    n = part.shape[0]
    for p in range(n_partitions):
        counts[p] = 0
    for i in range(n):
        counts[part[i]] += 1
    start = np.zeros(n_partitions, np.int64)
    for p in range(1, n_partitions):
        start[p] = start[p - 1] + counts[p - 1]
    for i in range(n):
        p = part[i]
        out[start[p]] = rec[i]
        start[p] += 1
    return 0


@numba.njit(cache=_CACHE, nogil=True)
def _records_to_columns(w64, w32, w16, i64, i32, i16, o64, o32, o16):
    """Transpose records read as words (w64 (n, r/8), w32 (n, r/4), w16 (n, r/2)) into column
    rows: o64[k] = w64[:, i64[k]], and likewise for 4- and 2-byte fields. One pass over the
    records, writing sequential column streams."""
    n = w64.shape[0]
    for i in range(n):
        for k in range(i64.shape[0]):
            o64[k, i] = w64[i, i64[k]]
        for k in range(i32.shape[0]):
            o32[k, i] = w32[i, i32[k]]
        for k in range(i16.shape[0]):
            o16[k, i] = w16[i, i16[k]]
    return 0


def _arrow_schema(generator_meta: dict[str, Any]) -> pa.Schema:
    fields = []
    for name, dt, unit, nullable in GAIA_COLUMNS:
        meta = {b"unit": unit.encode()} if unit else None
        fields.append(
            pa.field(name, pa.from_numpy_dtype(np.dtype(dt)), nullable=nullable, metadata=meta)
        )
    return pa.schema(fields, metadata={b"xd_dask": json.dumps(generator_meta).encode()})


def _word_index(size: int) -> np.ndarray:
    return np.array(
        [RECORD.fields[c[0]][1] // size for c in GAIA_COLUMNS if np.dtype(c[1]).itemsize == size],
        np.int64,
    )


_WORDS = {size: _word_index(size) for size in (8, 4, 2)}
_WORD_TYPES = {8: np.uint64, 4: np.uint32, 2: np.uint16}


def _to_table(rec: np.ndarray, schema: pa.Schema, scratch: dict | None = None) -> pa.Table:
    """Arrow table of records (NaN -> null in nullable columns), via one compiled transpose."""
    n = len(rec)
    raw = np.ascontiguousarray(rec).view(np.uint8).reshape(n, RECORD.itemsize)
    words, outs = [], []
    for size in (8, 4, 2):
        words.append(raw.view(_WORD_TYPES[size]))
        out = None if scratch is None else scratch.get(size)
        if out is None or out.shape[1] < n:
            out = np.empty((len(_WORDS[size]), n), _WORD_TYPES[size])
            if scratch is not None:
                scratch[size] = out
        outs.append(out[:, :n])
    _records_to_columns(*words, _WORDS[8], _WORDS[4], _WORDS[2], *outs)
    arrays, slot = [], {8: 0, 4: 0, 2: 0}
    for _, dt, _, nullable in GAIA_COLUMNS:
        size = np.dtype(dt).itemsize
        col = outs[(8, 4, 2).index(size)][slot[size]].view(dt)
        slot[size] += 1
        arrays.append(pa.array(col, mask=np.isnan(col)) if nullable else pa.array(col))
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_spill(path: Path, n_rows: int, block_rows: int) -> Iterator[np.ndarray]:
    """The records of a spill file, ``block_rows`` at a time (bounded memory)."""
    if n_rows == 0:
        return
    with open(path, "rb") as fh:
        for start in range(0, n_rows, block_rows):
            count = min(block_rows, n_rows - start)
            block = np.fromfile(fh, dtype=RECORD, count=count)
            if len(block) != count:
                raise OSError(f"{path}: spill file shorter than expected")
            yield block


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists():
        return
    ours = [*out.glob("GaiaSource_*.parquet"), out / MANIFEST, out / TRUE_MODEL]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a catalogue ({existing[0].name}, ...); use overwrite=True "
            "(--overwrite) to replace it"
        )
    for p in existing:  # remove the old catalogue's files (the manifest goes first)
        if p.name == MANIFEST:
            p.unlink()
    for p in existing:
        if p.exists():
            p.unlink()


# --------------------------------------------------------------------------- the catalogue
@dataclass
class _Writer:
    """One catalogue being written: the generation settings, the reused buffers, the tallies."""

    out: Path
    n_rows: int
    seed: int
    bounds: np.ndarray
    args: tuple
    arrow_schema: pa.Schema
    compression: str
    row_group_size: int
    progress: Callable[[int, int], None] | None
    n_two: int = 0
    n_nobp: int = 0

    def __post_init__(self) -> None:
        n_partitions = len(self.bounds) - 1
        self.names = [
            partition_name(int(self.bounds[p]), int(self.bounds[p + 1]) - 1)
            for p in range(n_partitions)
        ]
        self.counts = np.zeros(n_partitions, np.int64)
        size = min(rows.CHUNK_ROWS, max(self.n_rows, 1))
        self.rec = np.zeros(size, dtype=RECORD)  # buffers reused by every chunk
        self.part = np.zeros(size, np.int64)
        self.aux = np.empty((1, 26))
        self.scratch: dict = {}  # transpose buffers reused by every row group

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Generate the chunks in order into the reused buffers; yields rows, partitions."""
        chunk_rows = rows.CHUNK_ROWS
        for c in range((self.n_rows + chunk_rows - 1) // chunk_rows):
            n = min(chunk_rows, self.n_rows - c * chunk_rows)
            rows._gen_rows(chunk_rng(self.seed, c), n, c * chunk_rows, *self.args, self.bounds,
                           self.rec, self.part, self.aux, False)  # fmt: skip
            self.n_two += int(np.count_nonzero(self.rec[SOLVED][:n] == 3))
            self.n_nobp += int(np.count_nonzero(np.isnan(self.rec[VALUE[COLOUR]][:n])))
            yield self.rec[:n], self.part[:n]
            if self.progress is not None:
                self.progress(c * chunk_rows + n, self.n_rows)

    def write_partition(self, p: int, blocks: Iterable[np.ndarray]) -> None:
        """Write one output file atomically from an iterable of record blocks."""
        with atomic_path(self.out / self.names[p], suffix=".parquet") as tmp:
            with pq.ParquetWriter(
                tmp,
                self.arrow_schema,
                compression=self.compression,
                use_dictionary=False,
                write_statistics=[SCHEMA.id_column],
            ) as w:
                empty = True
                for block in blocks:
                    table = _to_table(block, self.arrow_schema, self.scratch)
                    w.write_table(table, row_group_size=self.row_group_size)
                    empty = False
                if empty:
                    w.write_table(_to_table(np.zeros(0, RECORD), self.arrow_schema))
            os.chmod(tmp, 0o644)

    def write_one(self) -> None:
        """One file: stream the chunks straight into it."""
        self.counts[0] = self.n_rows
        self.write_partition(0, (r for r, _ in self.chunks()))

    def write_spilled(self, t0: float) -> float:
        """Group each chunk by partition, spill, then convert each partition's spill file.
        Returns the generation time (seconds since ``t0`` when the last chunk was spilled)."""
        n_partitions = len(self.counts)
        grouped = np.zeros(len(self.rec), dtype=RECORD)
        chunk_counts = np.zeros(n_partitions, np.int64)
        spill = Path(tempfile.mkdtemp(prefix=".make-catalog-", dir=self.out))
        try:
            for block, block_part in self.chunks():
                _group_by_partition(block, block_part, n_partitions, grouped, chunk_counts)
                start = 0
                for p in np.flatnonzero(chunk_counts):
                    stop = start + int(chunk_counts[p])
                    with open(spill / f"{p}.bin", "ab") as fh:
                        grouped[start:stop].tofile(fh)
                    start = stop
                self.counts += chunk_counts
            t_gen = time.perf_counter() - t0
            for p in range(n_partitions):
                src = spill / f"{p}.bin"
                self.write_partition(p, _read_spill(src, int(self.counts[p]), self.row_group_size))
                src.unlink(missing_ok=True)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        return t_gen


def make_catalog(
    out_dir: str | os.PathLike,
    n_rows: int,
    n_partitions: int = 1,
    seed: int = 0,
    *,
    frac_two_param: float = 0.19,
    frac_missing_bp_rp: float = 0.03,
    row_group_size: int = 1 << 17,
    compression: str = "snappy",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    n_clusters: int = 0,
) -> dict[str, Any]:
    """Write a synthetic Gaia-DR3-like catalogue (see :mod:`xd_dask.io.synthetic`) and its true
    model.

    Parameters
    ----------
    out_dir : output directory (created).
    n_rows : total rows.
    n_partitions : number of Parquet files (HEALPix level-8 ranges).
    seed : random seed; (seed, n_rows) determine the rows, n_partitions only the layout.
    frac_two_param, frac_missing_bp_rp : target fractions of 2-parameter rows and rows without
        BP/RP photometry.
    row_group_size : rows per Parquet row group.
    compression : Parquet codec.
    overwrite : replace a catalogue already in ``out_dir``.
    progress : called as progress(rows_done, n_rows) during generation.
    n_clusters : add this many compact star clusters to the generating mixture
        (:func:`true_mixture`; 58 give a structured mixture of 64 components).

    Returns
    -------
    The manifest (also written to ``out_dir/manifest.json``).
    """
    if n_rows < 0 or n_rows >= 1 << 35:
        raise ValueError(f"n_rows must be in 0..2**35-1, got {n_rows}")
    if row_group_size < 1:
        raise ValueError("row_group_size must be >= 1")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = true_mixture(n_clusters, seed)
    errors = ErrorModel(frac_two_param=frac_two_param, frac_missing_bp_rp=frac_missing_bp_rp)
    errors.two_param_centre, errors.bp_rp_centre  # noqa: B018 - validates the fractions
    settings = {
        "seed": seed,
        "n_rows": n_rows,
        "schema": SCHEMA.name,
        "frac_two_param": frac_two_param,
        "frac_missing_bp_rp": frac_missing_bp_rp,
    }
    writer = _Writer(
        out, n_rows, seed, partition_bounds(n_partitions, seed, model), chunk_args(model, errors),
        _arrow_schema({"format": FORMAT, **settings}), compression, row_group_size, progress,
    )  # fmt: skip
    if n_partitions == 1:
        writer.write_one()
        t_gen = time.perf_counter() - t0
    else:
        t_gen = writer.write_spilled(t0)
    model.metadata.update({"seed": seed, "n_rows": n_rows})
    model.save(out / TRUE_MODEL)
    return _write_manifest(writer, settings, t0, t_gen)


def _write_manifest(w: _Writer, settings: dict[str, Any], t0: float, t_gen: float) -> dict:
    """Write ``manifest.json`` last (its presence marks a complete catalogue); returns it."""
    n_rows, n_partitions = w.n_rows, len(w.counts)
    files = [
        {"name": w.names[p], "n_rows": int(w.counts[p]),
         "healpix8": [int(w.bounds[p]), int(w.bounds[p + 1]) - 1]}
        for p in range(n_partitions)
    ]  # fmt: skip
    elapsed = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "version": 1,
        "schema": settings["schema"],
        "seed": settings["seed"],
        "n_rows": int(n_rows),
        "n_partitions": n_partitions,
        "chunk_rows": rows.CHUNK_ROWS,
        "partition_level": PARTITION_LEVEL,
        "frac_two_param": settings["frac_two_param"],
        "frac_missing_bp_rp": settings["frac_missing_bp_rp"],
        "observed_frac_two_param": w.n_two / n_rows if n_rows else 0.0,
        "observed_frac_missing_bp_rp": w.n_nobp / n_rows if n_rows else 0.0,
        "true_model": TRUE_MODEL,
        "files": files,
        "seconds": {"generate": round(t_gen, 3), "total": round(elapsed, 3)},
    }
    with atomic_path(w.out / MANIFEST, suffix=".json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    log.info(
        "make-catalog: %d rows in %d files under %s (%.1f s, %.0f rows/s)",
        n_rows,
        n_partitions,
        w.out,
        elapsed,
        n_rows / elapsed if elapsed > 0 else 0.0,
    )
    return manifest
