"""Small Parquet catalogues for the distributed tests (plain columns, known generating mixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.mixtures import draw_noisy, known_mixture_3d

D = 3
FEATURES = [f"x{i}" for i in range(D)]


def make_rows(seed: int, n: int, missing: float = 0.0, noise_scale: float = 0.5):
    """Noisy rows of the known 3-d mixture: X (n, 3) with NaN = missing, S (n, 3, 3)."""
    rng = np.random.default_rng(seed)
    w, m, V = known_mixture_3d()
    X, S, _, _ = draw_noisy(rng, w, m, V, n, noise_scale=noise_scale)
    if missing:
        miss = rng.random(X.shape) < missing
        miss[miss.all(axis=1), 0] = False
        X[miss] = np.nan
    return X, S


def write_catalog(
    out_dir: str | Path,
    X: np.ndarray,
    S: np.ndarray,
    n_parts: int,
    *,
    row_group_size: int | None = None,
    first_id: int = 1000,
) -> list[Path]:
    """Write rows as ``n_parts`` Parquet files: source_id, x_i, x_i_error, x_i_x_j_corr."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n, d = X.shape
    err = np.sqrt(np.diagonal(S, axis1=1, axis2=2))  # (n, d)
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    paths = []
    for p in range(n_parts):
        s, e = bounds[p], bounds[p + 1]
        cols = {"source_id": np.arange(first_id + s, first_id + e, dtype=np.int64)}
        for i in range(d):
            cols[f"x{i}"] = X[s:e, i]
            cols[f"x{i}_error"] = err[s:e, i]
        for i in range(d):
            for j in range(i + 1, d):
                cols[f"x{i}_x{j}_corr"] = S[s:e, i, j] / (err[s:e, i] * err[s:e, j])
        path = out / f"part-{p:04d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def rows_as_written(X: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (X, S) a reader rebuilds from the written columns (errors and correlations);
    rows and columns of S for missing fields are 0."""
    err = np.sqrt(np.diagonal(S, axis1=1, axis2=2))
    corr = S / (err[:, :, None] * err[:, None, :])
    S2 = corr * err[:, :, None] * err[:, None, :]
    idx = np.arange(S.shape[1])
    S2[:, idx, idx] = err**2
    obs = ~np.isnan(X)
    S2 *= obs[:, :, None] & obs[:, None, :]
    return X.copy(), S2


def schema():
    """The plain schema of :func:`write_catalog` catalogues."""
    from xd_dask.io import plain_schema

    corr = {(f"x{i}", f"x{j}"): f"x{i}_x{j}_corr" for i in range(D) for j in range(i + 1, D)}
    return plain_schema(
        FEATURES,
        [f"x{i}_error" for i in range(D)],
        correlations=corr,
        id_column="source_id",
        nan_is_null=True,
    )
