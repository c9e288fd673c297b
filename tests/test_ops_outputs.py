"""Output files: errors name the path, stale temporaries are cleaned (issue 10, point 6)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from xd_dask.utils import atomic_path, remove_stale_temporaries


def test_a_write_error_names_the_output_and_leaves_nothing(tmp_path):
    """A real "file too large" from the kernel (RLIMIT_FSIZE; the same path as a full disk):
    the OSError keeps its errno and names the model file."""
    target = tmp_path / "model.npz"
    code = """
import resource, signal, sys
import numpy as np
from xd_dask.model import XDModel
from xd_dask.params import Params
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
m = XDModel(Params(np.full(100, 0.01), np.zeros((100, 7)), np.broadcast_to(np.eye(7), (100, 7, 7))))
try:
    m.save(sys.argv[1])
except OSError as exc:
    print(type(exc).__name__, exc.errno, exc.filename, exc, sep="|")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=60
    )
    kind, errno, filename, text = proc.stdout.strip().split("|")
    assert (kind, int(errno), filename) == ("OSError", 27, str(target)), proc.stdout + proc.stderr
    assert str(target) in text and "File too large" in text
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


def test_errors_that_already_name_the_target_are_unchanged(tmp_path):
    target = tmp_path / "x.json"
    err = PermissionError(13, "Permission denied", str(target))
    try:
        with atomic_path(target):
            raise err
    except PermissionError as exc:
        assert exc is err


def test_stale_temporaries_are_removed_and_outputs_kept(tmp_path):
    keep = ["model.npz", "report.json", ".xd-dask.lock", "checkpoints"]
    (tmp_path / "model.npz").write_bytes(b"m")
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / ".xd-dask.lock").write_text("")
    (tmp_path / "checkpoints").mkdir()
    stale = [".checkpoint.npz.abc123.npz.tmp", ".model.npz.x1y2.npz.tmp", ".post.q9.tmp"]
    for name in stale[:2]:
        (tmp_path / name).write_bytes(np.arange(3).tobytes())
    (tmp_path / stale[2]).mkdir()
    (tmp_path / stale[2] / "posterior-000000.parquet").write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
