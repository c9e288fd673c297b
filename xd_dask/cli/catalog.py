"""Catalogue commands: make-catalog, ingest, schema init.

Exit codes (:mod:`xd_dask.cli.app`): 0 success; 2 usage or configuration error (bad option
value, malformed schema, output already present without --overwrite); 1 the conversion or
generation failed (unreadable or truncated input, missing column, I/O error). Failures print one
line ``Error: ...`` on stderr (``-v`` shows progress and the traceback).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from xd_dask.cli.app import command, main

_overwrite = click.option(
    "--overwrite", is_flag=True, help="Replace outputs that already exist (default: refuse)."
)
_row_group = click.option(
    "--row-group-size",
    type=click.IntRange(min=1),
    default=1 << 17,
    show_default=True,
    help="Rows per Parquet row group (the unit of row_groups= fragments).",
)
_compression = click.option(
    "--compression",
    type=click.Choice(["snappy", "lz4", "zstd", "gzip", "none"]),
    default="snappy",
    show_default=True,
    help="Parquet compression codec.",
)


@command("make-catalog", usage=(ValueError,))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rows", "-n", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option(
    "--partitions",
    "-p",
    type=click.IntRange(min=1, max=786432),
    default=1,
    show_default=True,
    help="Number of Parquet files (contiguous HEALPix level-8 ranges, named like Gaia DR3 "
    "bulk files).",
)
@click.option(
    "--seed",
    "-s",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Random seed; the rows depend on (seed, rows) only, not on --partitions.",
)
@click.option(
    "--frac-two-param",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.19,
    show_default=True,
    help="Fraction of 2-parameter solutions (null parallax and proper motions).",
)
@click.option(
    "--frac-missing-bp-rp",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.03,
    show_default=True,
    help="Fraction of rows without BP and/or RP photometry (null bp_rp).",
)
@_row_group
@_compression
@_overwrite
def make_catalog_cmd(
    out: Path,
    rows: int,
    partitions: int,
    seed: int,
    frac_two_param: float,
    frac_missing_bp_rp: float,
    row_group_size: int,
    compression: str,
    overwrite: bool,
) -> None:
    """Write a synthetic Gaia-DR3-like catalogue to OUT, with its true mixture.

    OUT receives GaiaSource_<first>-<last>.parquet files (Gaia DR3 column names, units and
    dtypes; 2-parameter rows and missing BP/RP as nulls; correlated astrometric noise),
    true_model.npz (the generating mixture, an XDModel) and manifest.json. Memory use does not
    grow with --rows; temporary disk use is about 130 bytes per row.
    """
    from xd_dask.io.synthetic import make_catalog  # noqa: PLC0415

    t0 = time.perf_counter()
    manifest = make_catalog(
        out,
        rows,
        partitions,
        seed,
        frac_two_param=frac_two_param,
        frac_missing_bp_rp=frac_missing_bp_rp,
        row_group_size=row_group_size,
        compression=compression,
        overwrite=overwrite,
    )
    dt = time.perf_counter() - t0
    click.echo(
        f"Wrote {manifest['n_rows']} rows in {len(manifest['files'])} files to {out} "
        f"({dt:.1f} s, {manifest['n_rows'] / max(dt, 1e-9):,.0f} rows/s); true model "
        f"{out / manifest['true_model']}; 2-parameter rows "
        f"{manifest['observed_frac_two_param']:.1%}, missing BP/RP "
        f"{manifest['observed_frac_missing_bp_rp']:.1%}"
    )


_FORMATS = ["auto", "csv", "ecsv", "fits", "votable", "cds"]
_format = click.option(
    "--format",
    "fmt",
    type=click.Choice(_FORMATS),
    default="auto",
    show_default=True,
    help="Table format (auto: from the content and the file name).",
)
_readme = click.option(
    "--readme",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CDS ReadMe describing the table (default: a ReadMe beside it, if it describes it).",
)
_hdu = click.option("--hdu", default=None, help="FITS HDU index or name (default: first table).")


def _hdu_value(hdu: str | None) -> int | str | None:
    return int(hdu) if hdu is not None and hdu.isdigit() else hdu


@command("ingest", usage=(ValueError,))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "-o",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory for the Parquet files.",
)
@click.option(
    "--schema",
    default=None,
    help="Keep only this schema's columns (a packaged name or a TOML file). Default: ECSV files "
    "with the gaia_dr3 columns keep those, other tables keep every column.",
)
@_format
@_readme
@_hdu
@click.option(
    "--id-column",
    default=None,
    help="Row-id column to keep (default: the schema's, else a guess such as source_id or HIP; "
    "without one a row_index column is added).",
)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=1),
    default=1 << 20,
    show_default=True,
    help="Rows per Parquet file (tables other than Gaia ECSV files).",
)
@click.option(
    "--skip-existing", is_flag=True, help="Leave outputs that already exist and carry on."
)
@_row_group
@_compression
@_overwrite
def ingest_cmd(
    inputs: tuple[Path, ...],
    out_dir: Path,
    schema: str | None,
    fmt: str,
    readme: Path | None,
    hdu: str | None,
    id_column: str | None,
    rows_per_file: int,
    skip_existing: bool,
    row_group_size: int,
    compression: str,
    overwrite: bool,
) -> None:
    """Convert tables (FITS, VOTable, CSV, ECSV, CDS fixed width) to Parquet.

    INPUTS are files or directories of them. Gaia bulk files (gzip ECSV,
    GaiaSource_XXXXXX-YYYYYY.csv.gz) become OUT/GaiaSource_XXXXXX-YYYYYY.parquet with only the
    schema's columns. Other tables become OUT/<name>-00000.parquet, -00001, ... (--rows-per-file
    rows each) with every column (or the --schema's), units as field metadata and an id column.
    Streamed (bounded memory): CSV, ECSV, FITS, CDS with a separate ReadMe; read whole: VOTable
    and single-file CDS/MRT tables. Outputs are written atomically; nulls stay nulls.
    """
    from xd_dask.io.ingest import ingest_inputs  # noqa: PLC0415
    from xd_dask.io.schema import load_schema  # noqa: PLC0415

    t0 = time.perf_counter()
    sch = None if schema is None else load_schema(schema)
    opts = {"readme": readme, "hdu": _hdu_value(hdu), "rows_per_file": rows_per_file}
    if id_column is not None:
        opts["id_column"] = id_column
    written = ingest_inputs(
        inputs,
        out_dir,
        schema=sch,
        format=fmt,
        overwrite=overwrite,
        skip_existing=skip_existing,
        row_group_size=row_group_size,
        compression=compression,
        **opts,
    )
    dt = time.perf_counter() - t0
    rows = sum(_num_rows(p) for p in written)
    click.echo(
        f"Wrote {len(written)} Parquet file(s), {rows:,} rows, to {out_dir} ({dt:.1f} s, "
        f"{rows / max(dt, 1e-9):,.0f} rows/s)"
    )


def _num_rows(path: Path) -> int:
    import pyarrow.parquet as pq  # noqa: PLC0415

    return pq.ParquetFile(path).metadata.num_rows


@main.group("schema")
def schema_group() -> None:
    """Catalogue schemas: which columns are features and how their noise is obtained."""


@command("init", group=schema_group)
@click.argument("table", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the schema TOML here (default: print it).",
)
@click.option("--name", default=None, help="Schema name (default: from the table's file name).")
@_format
@_readme
@_hdu
@_overwrite
def schema_init_cmd(
    table: Path,
    output: Path | None,
    name: str | None,
    fmt: str,
    readme: Path | None,
    hdu: str | None,
    overwrite: bool,
) -> None:
    """Write a starter schema TOML for TABLE (any ingest format, or Parquet).

    Features are the columns with an error column (X with e_X, X_error, X_err, sigma_X, ...),
    correlations the *_corr (or CDS-style ABcor) columns of two features, units from the table's
    metadata, and an id column guess. The file is commented for you to edit (ranges, floors).
    """
    from xd_dask.io.schema_init import schema_init  # noqa: PLC0415
    from xd_dask.utils import atomic_path  # noqa: PLC0415

    if output is not None and output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    text = schema_init(table, fmt, readme=readme, hdu=_hdu_value(hdu), name=name)
    if output is None:
        click.echo(text, nl=False)
        return
    with atomic_path(output) as tmp:
        tmp.write_text(text, encoding="utf-8")
    click.echo(f"Wrote starter schema {output}; edit it, then use it as catalog.schema")
