"""Catalogue commands: make-catalog, ingest (registered on xd_dask.cli.main).

Exit codes: 0 success; 2 usage or configuration error (bad option value, malformed schema,
output already present without --overwrite); 1 the conversion or generation failed (unreadable
or truncated input, missing column, I/O error). Failures print one line ``Error: ...`` on stderr
(``-v`` also shows progress, ``-vv`` the traceback).
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path

import click

from xd_dask.cli import main

EXIT_FAILURE, EXIT_USAGE = 1, 2


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO
    pkg = logging.getLogger("xd_dask")
    if not any(getattr(h, "_xd_dask_catalog", False) for h in pkg.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._xd_dask_catalog = True  # type: ignore[attr-defined]
        pkg.addHandler(handler)
    pkg.setLevel(level)


def _restore_logging() -> None:
    pkg = logging.getLogger("xd_dask")
    for h in list(pkg.handlers):
        if getattr(h, "_xd_dask_catalog", False):
            pkg.removeHandler(h)
    pkg.setLevel(logging.NOTSET)


def _fail(exc: BaseException, code: int, verbose: int) -> None:
    if verbose >= 2:
        traceback.print_exc()
    message = " ".join(str(exc).split()) or type(exc).__name__
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


_verbose = click.option(
    "-v", "--verbose", count=True, help="-v: progress messages; -vv: also tracebacks on errors."
)
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


@main.command("make-catalog")
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
@_verbose
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
    verbose: int,
) -> None:
    """Write a synthetic Gaia-DR3-like catalogue to OUT, with its true mixture.

    OUT receives GaiaSource_<first>-<last>.parquet files (Gaia DR3 column names, units and
    dtypes; 2-parameter rows and missing BP/RP as nulls; correlated astrometric noise),
    true_model.npz (the generating mixture, an XDModel) and manifest.json. Memory use does not
    grow with --rows; temporary disk use is about 130 bytes per row.
    """
    from xd_dask.io.synthetic import make_catalog  # noqa: PLC0415

    _logging(verbose)
    t0 = time.perf_counter()
    try:
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
    except (FileExistsError, ValueError) as exc:
        _fail(exc, EXIT_USAGE, verbose)
    except (OSError, MemoryError) as exc:
        _fail(exc, EXIT_FAILURE, verbose)
    finally:
        _restore_logging()
    dt = time.perf_counter() - t0
    click.echo(
        f"Wrote {manifest['n_rows']} rows in {len(manifest['files'])} files to {out} "
        f"({dt:.1f} s, {manifest['n_rows'] / max(dt, 1e-9):,.0f} rows/s); true model "
        f"{out / manifest['true_model']}; 2-parameter rows "
        f"{manifest['observed_frac_two_param']:.1%}, missing BP/RP "
        f"{manifest['observed_frac_missing_bp_rp']:.1%}"
    )


@main.command("ingest")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    "-o",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory for the Parquet files (one per input).",
)
@click.option(
    "--schema",
    default="gaia_dr3",
    show_default=True,
    help="Schema whose columns are kept: a packaged name or a TOML file.",
)
@click.option(
    "--skip-existing", is_flag=True, help="Leave outputs that already exist and carry on."
)
@_row_group
@_compression
@_overwrite
@_verbose
def ingest_cmd(
    inputs: tuple[Path, ...],
    out_dir: Path,
    schema: str,
    skip_existing: bool,
    row_group_size: int,
    compression: str,
    overwrite: bool,
    verbose: int,
) -> None:
    """Convert Gaia bulk files (gzip ECSV, GaiaSource_XXXXXX-YYYYYY.csv.gz) to Parquet.

    INPUTS are files or directories of *.csv.gz / *.ecsv(.gz) files. Each input becomes
    OUT/GaiaSource_XXXXXX-YYYYYY.parquet with only the schema's columns; files are streamed
    (bounded memory) and written atomically. Nulls (empty, 'null', 'nan') stay nulls.
    """
    from xd_dask.io.ingest import ingest  # noqa: PLC0415
    from xd_dask.io.reader import CatalogError  # noqa: PLC0415
    from xd_dask.io.schema import SchemaError, load_schema  # noqa: PLC0415

    _logging(verbose)
    t0 = time.perf_counter()
    try:
        sch = load_schema(schema)
        written = ingest(
            inputs,
            out_dir,
            sch,
            overwrite=overwrite,
            skip_existing=skip_existing,
            row_group_size=row_group_size,
            compression=compression,
        )
    except (SchemaError, FileExistsError) as exc:
        _fail(exc, EXIT_USAGE, verbose)
    except (CatalogError, OSError, MemoryError) as exc:
        _fail(exc, EXIT_FAILURE, verbose)
    finally:
        _restore_logging()
    click.echo(
        f"Wrote {len(written)} Parquet file(s) to {out_dir} "
        f"({time.perf_counter() - t0:.1f} s, schema {sch.name})"
    )
