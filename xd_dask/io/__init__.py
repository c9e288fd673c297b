"""Catalogue I/O: schemas, the covariance builder, partition readers, ingest, synthetic data.

A schema's ``features`` are the D true features (the model's space); its ``observed`` are the d
columns of X (the same without a projection; see :mod:`xd_dask.io.projection` for the contract).

Public entry points::

    load_schema(spec=None) -> CatalogSchema          # None / "gaia_dr3": packaged Gaia DR3 schema
    plain_schema(features, errors, correlations=None, id_column=None) -> CatalogSchema
    read_partition(path, schema, *, on_bad="error", dtype=np.float64, filesystem=None,
                   row_groups=None) -> CatalogBlock  # X (n, d), X_cov (n, d, d), ids, counts,
                                                     # R (n, d, D) or None (projections)
    build_covariance(table, schema, *, dtype) -> BuildResult
    ingest(inputs, out_dir, schema=None) -> list of written paths   # Gaia ECSV -> Parquet
    ingest_table(path, out_dir, format="auto", ...) -> list of parts # FITS/VOTable/CSV/ECSV/CDS
    schema_init(table, ...) -> str                    # a starter schema TOML for a table
    make_catalog(out_dir, n_rows, n_partitions, seed, ...) -> manifest dict
"""

from xd_dask.io.covariance import BAD_REASONS, BuildResult, build_covariance
from xd_dask.io.ingest import ingest, ingest_table
from xd_dask.io.reader import CatalogBlock, CatalogError, empty_counts, read_partition
from xd_dask.io.schema import CatalogSchema, SchemaError, load_schema, plain_schema
from xd_dask.io.schema_init import schema_init

__all__ = [
    "BAD_REASONS",
    "BuildResult",
    "CatalogBlock",
    "CatalogError",
    "CatalogSchema",
    "SchemaError",
    "build_covariance",
    "empty_counts",
    "ingest",
    "ingest_table",
    "load_schema",
    "make_catalog",
    "plain_schema",
    "read_partition",
    "schema_init",
]


def __getattr__(name: str):
    """The generator loads on first use: its Numba kernels and scipy.stats take ~2 s to import,
    which every ``import xd_dask.io`` would otherwise pay."""
    if name == "make_catalog":
        from xd_dask.io.synthetic import make_catalog  # noqa: PLC0415 - ~2 s import, see above

        return make_catalog
    raise AttributeError(f"module 'xd_dask.io' has no attribute {name!r}")
