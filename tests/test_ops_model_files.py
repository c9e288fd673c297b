"""Crafted model files are refused before any array is read (issue 10, point 5).

Each file is built member by member (a zip of .npy members, as ``numpy.savez`` writes them) with
one thing wrong. Loading must raise ModelFileError naming the file; a subprocess loads them all
under tracemalloc and reports the peak allocation and the time (bounded memory: the 1.7 GB that a
declared (2000, 7, 7000) array would take must never be allocated).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.lib import format as npformat

from xd_dask.cli import main
from xd_dask.model import FORMAT_NAME, ModelFileError, XDModel
from xd_dask.params import Params

K, D = 2000, 7


def _npy(arr: np.ndarray | None = None, *, header: dict | None = None, data: bytes = b"") -> bytes:
    """A .npy member: a real array, or a hand-written header followed by ``data``."""
    buf = io.BytesIO()
    if arr is not None:
        npformat.write_array(buf, arr, allow_pickle=False)
        return buf.getvalue()
    npformat.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def _text(obj) -> bytes:
    return _npy(np.array(obj if isinstance(obj, str) else json.dumps(obj)))


def _good_members() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    header = {
        "format": FORMAT_NAME,
        "format_version": 1,
        "n_components": K,
        "n_features": D,
        "feature_names": [f"f{i}" for i in range(D)],
    }
    return {
        "header": _text(header),
        "metadata": _text({"history": [1.0, 2.0]}),
        "weights": _npy(np.full(K, 1.0 / K)),
        "means": _npy(rng.normal(size=(K, D))),
        "covariances": _npy(np.broadcast_to(np.eye(D), (K, D, D)).copy()),
    }


def _write(path, members: dict[str, bytes], compress: dict[str, int] | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data, (compress or {}).get(name, zipfile.ZIP_STORED))
    return path


def _header(**change) -> bytes:
    h = json.loads(str(np.load(io.BytesIO(_good_members()["header"]))))
    h.update(change)
    return _text(h)


def _crafted() -> dict[str, tuple[dict[str, bytes], dict[str, int] | None, str]]:
    """{name: (members, compression, expected message)}"""
    good = _good_members()
    cov_bytes = np.zeros((K, D, D)).tobytes()  # the real data: (2000, 7, 7) float64
    huge = {"descr": "<f8", "fortran_order": False, "shape": (K, D, 7000)}
    liar = {"descr": "<f8", "fortran_order": False, "shape": (K, D, D)}
    return {
        "huge_shape": (
            good | {"covariances": _npy(header=huge, data=cov_bytes)},
            None,
            r"shape \(2000, 7, 7000\); expected \(2000, 7, 7\)",
        ),
        "short_data": (
            good | {"covariances": _npy(header=liar, data=cov_bytes[:1000])},
            None,
            "holds 1000 bytes",
        ),
        "header_list": (good | {"header": _text([1, 2, 3])}, None, "must be a JSON object"),
        "header_string": (good | {"header": _text('"xd"')}, None, "must be a JSON object"),
        "version_string": (
            good | {"header": _header(format_version="2")},
            None,
            "format_version must be an integer",
        ),
        "version_newer": (good | {"header": _header(format_version=7)}, None, "newer"),
        "k_not_int": (good | {"header": _header(n_components=2000.5)}, None, "positive integers"),
        "names_wrong": (good | {"header": _header(feature_names="abc")}, None, "feature_names"),
        "deep_header": (
            good | {"header": _text("[" * 50_000 + "]" * 50_000)},
            None,
            "nested too deeply",
        ),
        "deep_metadata": (
            good | {"metadata": _text({"a": json.loads("[" * 100 + "]" * 100)})},
            None,
            "nested deeper than",
        ),
        "huge_text": (
            good
            | {
                "metadata": _npy(
                    header={"descr": "<U100000000", "fortran_order": False, "shape": ()},
                    data=b"\0" * 400,
                )
            },
            None,
            "declares 400000000 bytes",
        ),
        "object_dtype": (
            good | {"weights": _npy(header={"descr": "|O", "fortran_order": False, "shape": (K,)})},
            None,
            "dtype object",
        ),
        "compressed_bomb": (
            good | {"covariances": _npy(np.zeros((K, D, 700)))},
            {"covariances": zipfile.ZIP_DEFLATED},
            "compressed",
        ),
        "missing_means": (
            {k: v for k, v in good.items() if k != "means"},
            None,
            "no means",
        ),
    }


def test_the_good_members_make_a_loadable_model(tmp_path):
    model = XDModel.load(_write(tmp_path / "good.npz", _good_members()))
    assert model.n_components == K and model.metadata == {"history": [1.0, 2.0]}


@pytest.mark.parametrize("name", sorted(_crafted()))
def test_crafted_model_file_is_refused(tmp_path, name):
    members, compress, match = _crafted()[name]
    path = _write(tmp_path / f"{name}.npz", members, compress)
    with pytest.raises(ModelFileError, match=match) as err:
        XDModel.load(path)
    assert str(path) in str(err.value)


def test_crafted_files_fail_fast_with_bounded_memory(tmp_path):
    paths = [
        str(_write(tmp_path / f"{name}.npz", members, compress))
        for name, (members, compress, _) in _crafted().items()
    ]
    code = """
import json, sys, time, tracemalloc
from xd_dask.model import ModelFileError, XDModel
out = {}
for path in sys.argv[1:]:
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        XDModel.load(path)
        kind = "loaded"
    except ModelFileError:
        kind = "ModelFileError"
    except BaseException as exc:
        kind = type(exc).__name__
    out[path] = (kind, time.perf_counter() - t0, tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
print(json.dumps(out))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for path, (kind, seconds, peak) in res.items():
        assert kind == "ModelFileError", path
        assert peak < 50e6, (path, peak)  # the declared arrays would need up to 1.7 GB
        assert seconds < 10, (path, seconds)
    # the deep-nesting and huge-shape cases are the expensive ones: report their figures
    worst = max(res.values(), key=lambda r: r[2])
    print(f"largest peak {worst[2] / 1e6:.1f} MB, slowest {max(r[1] for r in res.values()):.3f} s")


def test_cli_exits_2_on_a_crafted_model(tmp_path):
    members, compress, _ = _crafted()["huge_shape"]
    path = _write(tmp_path / "crafted.npz", members, compress)
    res = CliRunner().invoke(main, ["info", str(path)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and "crafted.npz" in lines[0] and "7000" in lines[0]


def test_save_refuses_what_load_would_refuse_and_stores_floats(tmp_path):
    from xd_dask.kernels import Background

    deep: dict = {}
    node = deep
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    w, m, V = [1.0], np.zeros((1, 2)), np.eye(2)[None]
    with pytest.raises(ValueError, match="too deeply nested"):
        XDModel(Params(w, m, V), metadata=deep).save(tmp_path / "deep.npz")
    assert not (tmp_path / "deep.npz").exists()
    bg = Background(0.25, [-10, -20], [10, 20])  # integer box edges
    back = XDModel(Params([0.75], m, V, bg)).save(tmp_path / "bg.npz")
    np.testing.assert_array_equal(XDModel.load(back).background.lo, [-10.0, -20.0])
