"""The manifest refuses a changed catalogue and duplicated files or ids (issue 10.6, issue 8.4)."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.distributed_data import make_rows, write_catalog
from xd_dask.distributed.manifest import (
    DUPLICATE_FREE_KEY,
    CatalogueChangedError,
    Manifest,
    ManifestError,
    build_manifest,
    check_unchanged,
)


@pytest.fixture
def cat(tmp_path):
    X, S = make_rows(seed=3, n=600)
    write_catalog(tmp_path / "cat", X, S, 3)
    return tmp_path / "cat"


def _rewrite(path, change):
    """Rewrite one Parquet file with ``change(table) -> table`` (same writer settings)."""
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _set_value(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    col = table[column].to_numpy().copy()
    col[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(col))


def test_a_changed_value_with_the_same_rows_is_seen_and_named(cat):
    saved = build_manifest(cat)
    victim = sorted(cat.glob("*.parquet"))[1]
    check_unchanged(saved, build_manifest(cat), "the checkpoint")  # nothing changed: no error
    _rewrite(victim, lambda t: _set_value(t, "x1", 17, 1e3))  # same rows, one value changed
    now = build_manifest(cat)
    assert now.n_rows == saved.n_rows and [p.n_rows for p in now] == [p.n_rows for p in saved]
    with pytest.raises(CatalogueChangedError) as err:
        check_unchanged(saved, now, "the checkpoint in out/checkpoints")
    text = str(err.value)
    assert victim.name in text and "footer changed with the same 200 rows" in text
    assert "the checkpoint in out/checkpoints" in text
    others = [p for p in sorted(cat.glob("*.parquet")) if p != victim]
    assert not any(str(p) in text for p in others)


def test_rows_removed_and_new_files_are_named(cat):
    saved = build_manifest(cat)
    files = sorted(cat.glob("*.parquet"))
    _rewrite(files[0], lambda t: t.slice(0, 150))
    files[2].unlink()
    X, S = make_rows(seed=4, n=50)
    write_catalog(cat / "more", X, S, 1, first_id=10_000)
    with pytest.raises(CatalogueChangedError) as err:
        check_unchanged(saved, build_manifest(cat), "the checkpoint")
    text = str(err.value)
    assert f"{files[0]}: 150 rows now, 200 then" in text
    assert f"{files[2]}: removed" in text
    assert f"{cat / 'more' / 'part-0000.parquet'}: new file" in text


def test_manifests_of_older_versions_load_and_compare_structure_only(cat, caplog):
    saved = build_manifest(cat)
    legacy = {
        "partitions": [{k: v for k, v in p.to_dict().items() if k != "footer"} for p in saved]
    }
    old = Manifest.from_dict(legacy)  # an old checkpoint's manifest: no footer checksums
    assert all(p.footer is None for p in old)
    with caplog.at_level(logging.WARNING, logger="xd_dask"):
        check_unchanged(old, build_manifest(cat), "an old checkpoint")
    assert "older xd-dask without footer checksums" in caplog.text
    _rewrite(sorted(cat.glob("*.parquet"))[0], lambda t: t.slice(0, 10))
    with pytest.raises(CatalogueChangedError, match="10 rows now, 200 then"):
        check_unchanged(old, build_manifest(cat), "an old checkpoint")


def test_the_same_file_listed_twice_is_an_error_naming_both(cat, tmp_path):
    first = sorted(cat.glob("*.parquet"))[0]
    with pytest.raises(ManifestError, match="listed twice") as err:
        build_manifest([str(cat), str(first)])
    assert str(first) in str(err.value) and "part-0000.parquet" in str(err.value)
    link = cat / "sub"
    link.mkdir()
    os.symlink(first, link / "alias.parquet")  # a symbolic link inside the catalogue
    with pytest.raises(ManifestError, match="alias.parquet"):
        build_manifest(cat)
    (link / "alias.parquet").unlink()
    shutil.copy(first, cat / "copy-of-first.parquet")  # a copy: byte-identical footer
    with pytest.raises(ManifestError, match="identical Parquet footers") as err:
        build_manifest(cat)
    assert "copy-of-first.parquet" in str(err.value) and str(first) in str(err.value)


def _ids_file(path, ids, token: bytes | None = None):
    table = pa.table({"source_id": np.asarray(ids, dtype=np.int64), "x0": np.arange(len(ids))})
    if token is not None:
        table = table.replace_schema_metadata({DUPLICATE_FREE_KEY: token})
    pq.write_table(table, path)


def test_overlapping_id_ranges_are_checked_exactly(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _ids_file(d / "a.parquet", [1, 5, 9, 13])
    _ids_file(d / "b.parquet", [2, 6, 10, 14])  # overlaps a's range, no id in common
    _ids_file(d / "c.parquet", [100, 101])  # its own range
    assert build_manifest(d).n_rows == 10
    _ids_file(d / "e.parquet", [50, 7, 13])  # 13 is also in a.parquet
    with pytest.raises(ManifestError) as err:
        build_manifest(d)
    text = str(err.value)
    assert "duplicate source_id 13" in text
    assert str(d / "a.parquet") in text and str(d / "e.parquet") in text
    assert "b.parquet" not in text and "c.parquet" not in text
    assert build_manifest(d, id_column=None).n_rows == 13  # the check can be switched off


def test_files_declared_duplicate_free_together_are_not_read(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _ids_file(d / "a.parquet", [1, 5, 9], token=b"shuffle-1")
    _ids_file(d / "b.parquet", [2, 5, 10], token=b"shuffle-1")  # the writer's promise is trusted
    assert build_manifest(d).n_rows == 6
    _ids_file(d / "b.parquet", [2, 5, 10], token=b"shuffle-2")  # different writers: checked
    with pytest.raises(ManifestError, match="duplicate source_id 5"):
        build_manifest(d)
