"""Synthetic Gaia-DR3-like catalogues drawn from a known mixture (``xd-dask make-catalog``).

What is written
---------------
Parquet files with Gaia DR3 column names, units and dtypes (float64 positions, parallax and proper
motions; float32 errors, correlations and photometry; int16 ``astrometric_params_solved``),
``source_id`` encoding the level-12 HEALPix index of the position as Gaia does
(``source_id >> 35``), laid out like the DR3 bulk files: each file holds one contiguous range of
level-8 HEALPix pixels and is named ``GaiaSource_<first>-<last>.parquet`` after it. Beside them:
``true_model.npz`` (the generating mixture, :class:`xd_dask.model.XDModel`) and
``manifest.json`` (files, row counts, seed, schema, generator settings), written last.

Modules
-------
:mod:`~xd_dask.io.synthetic.columns`: the Gaia columns written, named after the packaged
``gaia_dr3`` schema (value, error, correlation and flux-over-error columns, zero points).
:mod:`~xd_dask.io.synthetic.model`: the generating mixture (:func:`true_mixture`) and draws of true
values from it, truncated to the sky box.
:mod:`~xd_dask.io.synthetic.rows`: the Gaia-like error model and missingness (:class:`ErrorModel`)
and the compiled row generator (:func:`generate_chunk`).
:mod:`~xd_dask.io.synthetic.write`: the HEALPix-range layout (:func:`partition_bounds`), the spill
and the Parquet files, the true model and the manifest (:func:`make_catalog`).

Streaming
---------
Rows are generated in chunks of :data:`CHUNK_ROWS` with a random stream per chunk
(``SeedSequence(seed, spawn_key=(chunk,))``), so the catalogue depends on (seed, n_rows) only, not
on the number of partitions. Each chunk's rows are appended to one spill file per output partition;
each partition is then converted to Parquet in row groups. Memory is bounded by the chunk and row
group sizes, whatever n_rows; the spill needs about 130 bytes per row of temporary disk space.
"""

from xd_dask.io.synthetic.columns import GAIA_COLUMNS, MAS_PER_DEG, ZP_BP, ZP_G, ZP_RP
from xd_dask.io.synthetic.model import DELTA, star_clusters, true_mixture
from xd_dask.io.synthetic.rows import CHUNK_ROWS, PARTITION_LEVEL, ErrorModel, generate_chunk
from xd_dask.io.synthetic.write import (
    FORMAT,
    MANIFEST,
    TRUE_MODEL,
    make_catalog,
    partition_bounds,
    partition_name,
)

__all__ = [
    "CHUNK_ROWS",
    "DELTA",
    "FORMAT",
    "GAIA_COLUMNS",
    "MANIFEST",
    "MAS_PER_DEG",
    "PARTITION_LEVEL",
    "TRUE_MODEL",
    "ZP_BP",
    "ZP_G",
    "ZP_RP",
    "ErrorModel",
    "generate_chunk",
    "make_catalog",
    "partition_bounds",
    "partition_name",
    "star_clusters",
    "true_mixture",
]
