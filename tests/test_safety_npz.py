"""Model files and checkpoints are refused from their declared sizes (issue 19, point 8).

- a real model file with 600,000 extra zip directory entries (zip64 end records, as any zip
  tool writes for that many): on main it loads (7.5 s and +270 MB here, 35 s and 430 MB in the
  issue); it must be refused after reading the end of the file only;
- a checkpoint whose array member declares more than it holds: a stored member whose .npy
  header declares 3 GiB in a 3 MB file, and a deflated member of 640 MiB of zeros (under 1 MB
  on disk). On main ``load_checkpoint`` allocates what is declared (a process allowed 512 MiB
  more address space dies with MemoryError); it must be refused with CheckpointError before
  any allocation.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npformat

from xd_dask.model import ModelFileError, XDModel
from xd_dask.params import Params
from xd_dask.utils import BoundedReadError, bounded_zip, read_npz

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIB = 1 << 30


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _with_junk_entries(path: Path, n: int) -> None:
    """Append ``n`` directory entries (empty stored files ``j000000`` ...) to the zip ``path``,
    ending it with zip64 end records as zip tools do beyond 65,535 entries."""
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        cd_offset = zf.start_dir
    eocd = data.rindex(b"PK\x05\x06")
    (n_old,) = struct.unpack_from("<H", data, eocd + 10)
    body, old_cd = data[:cd_offset], data[cd_offset:eocd]
    row = np.dtype(
        [
            ("head", "S4"),
            ("ver", "<u2", 2),
            ("flags", "<u2", 2),
            ("time", "<u2", 2),
            ("crc", "<u4"),
            ("sizes", "<u4", 2),
            ("lens", "<u2", 5),
            ("attr", "<u4"),
            ("offset", "<u4"),
            ("name", "S7"),
        ]  # fmt: skip
    )
    junk = np.zeros(n, row)
    junk["head"] = b"PK\x01\x02"
    junk["ver"] = 20
    junk["lens"][:, 0] = 7  # file name length
    junk["name"] = np.char.add(b"j", np.char.zfill(np.arange(n).astype("S6"), 6))
    cd = old_cd + junk.tobytes()
    total = n_old + n
    eocd64_at = len(body) + len(cd)
    tail = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, total, total, len(cd),
                       cd_offset)  # fmt: skip
    tail += struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd64_at, 1)
    tail += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF,
                        0xFFFFFFFF, 0)  # fmt: skip
    path.write_bytes(body + cd + tail)


def test_a_model_file_with_600k_directory_entries_is_refused_from_its_end(tmp_path):
    path = tmp_path / "model.npz"
    XDModel(Params(np.array([0.5, 0.5]), np.zeros((2, 3)), np.stack([np.eye(3)] * 2))).save(path)
    _with_junk_entries(path, 600_000)
    # a valid zip: zipfile lists its 600,005 entries (in ~15 s; not repeated here)
    read0, t0 = _rchar(), time.perf_counter()
    with pytest.raises(ModelFileError, match="declares 600005 entries"):
        XDModel.load(path)
    seconds, read = time.perf_counter() - t0, _rchar() - read0
    assert seconds < 1.0, seconds
    assert read < 128 << 10, f"read {read} bytes of a {path.stat().st_size}-byte file"
    # the command line: one Error line, exit 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [str(BIN / "xd-dask"), "info", str(path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: ") and "600005 entries" in proc.stderr


def _npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # magic, header length and header


def _checkpoint(directory: Path, kind: str) -> Path:
    """A checkpoint.npz whose ``params.means`` declares more than it holds: ``stored`` (a .npy
    header declaring 3 GiB; 3 MB of data) or ``deflated`` (640 MiB of zeros, < 1 MB on disk)."""
    directory.mkdir()
    path = directory / "checkpoint.npz"
    header = {"format": "xd-dask-checkpoint", "format_version": 2}
    n = (3 * GIB if kind == "stored" else 640 << 20) // 8
    with zipfile.ZipFile(path, "w", allowZip64=True, compresslevel=1) as zf:
        with zf.open("header.npy", "w") as fh:
            np.lib.format.write_array(fh, np.array(json.dumps(header)))
        if kind == "deflated":
            info = zipfile.ZipInfo("params.means.npy")
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as fh:
                fh.write(_npy_header((n,)))
                zeros = bytes(64 << 20)
                for _ in range(n * 8 // len(zeros)):
                    fh.write(zeros)
        else:
            zf.writestr("params.means.npy", _npy_header((n,)) + bytes(3 << 20))
    return path


LOAD = textwrap.dedent(
    """
    import resource, sys
    from xd_dask.distributed.checkpoint import CheckpointError, load_checkpoint
    vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1])
    limit = vm * 1024 + (512 << 20)  # 512 MiB more address space than the process has now
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        load_checkpoint(sys.argv[1])
    except CheckpointError as exc:
        print("CheckpointError:", exc)
    """
)


@pytest.mark.parametrize("kind", ["deflated", "stored"])
def test_a_checkpoint_declaring_gigabytes_is_refused_before_allocating(tmp_path, kind):
    path = _checkpoint(tmp_path / "checkpoints", kind)
    assert path.stat().st_size < 8 << 20  # a few MB
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(path.parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("CheckpointError:"), proc.stdout
    if kind == "deflated":
        assert "compressed members declare more than" in proc.stdout
    else:
        assert "declares shape (402653184,) of float64 (3221225472 bytes)" in proc.stdout


def test_bounded_zip_reads_ordinary_zips_like_zipfile(tmp_path):
    """Archives with a comment, with zip64 records and with data before them (as zipfile
    accepts them) pass; their members read back unchanged."""
    arrays = {"a": np.arange(12.0).reshape(3, 4), "b": np.array("text")}
    plain = tmp_path / "plain.npz"
    np.savez(plain, **arrays)
    commented = tmp_path / "commented.npz"
    with zipfile.ZipFile(commented, "w") as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr)
        zf.comment = b"written by hand; " * 100
    prefixed = tmp_path / "prefixed.npz"
    prefixed.write_bytes(b"#!/bin/sh\n" * 100 + plain.read_bytes())
    for path in (plain, commented, prefixed):
        got = read_npz(path, max_entries=2)
        assert set(got) == {"a", "b"}
        np.testing.assert_array_equal(got["a"], arrays["a"])
        assert str(got["b"]) == "text"
    with pytest.raises(BoundedReadError, match="declares 2 entries"):
        with bounded_zip(plain, max_entries=1):
            pass
