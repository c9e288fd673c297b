"""The numba.cuda kernels compile to PTX for sm_80 (A100) and sm_90 (H100) without a device, and
stay within a register budget.

``numba.cuda.compile_ptx`` needs NVVM and NVRTC (the ``nvidia-cuda-nvcc-cu12`` and
``nvidia-cuda-nvrtc-cu12`` wheels of the test extra), not a GPU. The register counts and spills
come from ``ptxas -v`` (shipped in the nvcc wheel) assembling the PTX for each architecture;
without ptxas the PTX itself is searched for local-memory traffic (``ld.local``/``st.local``),
which NVVM emits only for arrays it could not keep in registers (weaker: ptxas may still spill).

Budget: the fused statistics kernel, launched with up to 256 threads per block, must fit 255
registers (65,536 per SM / 256) and must not spill in float32 up to d = 7; every other kernel
compiles for both architectures. The sweep runs in two worker processes (it is ~1 minute of
NVVM time on one core). Run this file as a script to print the table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # compile_ptx does not exist in the simulator
    pytest.skip("compile_ptx is unavailable under NUMBA_ENABLE_CUDASIM", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")

ARCHS = ("sm_80", "sm_90")
DIMS = tuple(range(1, 11))


def ptxas_path() -> str | None:
    """ptxas from the nvidia-cuda-nvcc wheel, else one on PATH."""
    try:
        import nvidia.cuda_nvcc as nvcc  # noqa: PLC0415

        found = Path(next(iter(nvcc.__path__))) / "bin" / "ptxas"
        if found.exists():
            return str(found)
    except ImportError:
        pass
    return shutil.which("ptxas")


def compile_one(kind: str, d: int, fp32: bool, D: int = 0, du: int = 0, block: int = 0,
                cc: tuple[int, int] = (8, 0)) -> dict:  # fmt: skip
    """PTX of one kernel for ``cc``, and per architecture the registers and spilled bytes."""
    from xd_dask.kernels import _cuda  # noqa: PLC0415

    fn = _cuda.python_function(kind, d, fp32, D, du, block)
    ptx, _ = cuda.compile_ptx(fn, _cuda.signature(kind, d, fp32, D, du), cc=cc)
    out = {"target": re.search(r"\.target (sm_\d+)", ptx)[1], "local": "st.local" in ptx}
    ptxas = ptxas_path()
    if ptxas is None:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for arch in ARCHS if cc == (8, 0) else (f"sm_{cc[0]}{cc[1]}",):
            res = subprocess.run(
                [ptxas, f"-arch={arch}", "-v", str(src), "-o", os.devnull],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            regs = int(re.search(r"Used (\d+) registers", res.stderr)[1])
            spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", res.stderr))
            out[arch] = (regs, spill)
    return out


def _sweep() -> dict:
    jobs = {("stats", d, fp32, 0, 0, 256, (8, 0)) for d in DIMS for fp32 in (True, False)}
    jobs |= {("stats", 7, fp32, 0, 0, 256, (9, 0)) for fp32 in (True, False)}
    jobs |= {
        ("logdens", 7, True, 0, 0, 0, (8, 0)),
        ("stats_given", 7, True, 0, 0, 0, (8, 0)),
        ("row_lse", 0, True, 0, 0, 0, (8, 0)),
        ("stats", 2, True, 3, 0, 64, (8, 0)),
        ("logdens", 2, False, 3, 0, 0, (8, 0)),
        ("posterior", 3, True, 0, 2, 0, (8, 0)),
    }
    jobs = sorted(jobs, key=lambda j: -j[1])  # biggest first: the pool ends together
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        results = pool.map(_compile_job, jobs)
        return dict(zip(jobs, results, strict=True))


def _compile_job(job):
    return compile_one(*job[:6], cc=job[6])


pytestmark = pytest.mark.slow  # ~45-90 s of NVVM on two cores


@pytest.fixture(scope="module")
def sweep():
    try:
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # noqa: BLE001 - NVVM/NVRTC missing: say which
        pytest.skip(f"compile_ptx unavailable (NVVM/NVRTC wheels missing?): {exc}")
    return _sweep()


def test_every_kernel_compiles_for_sm80_and_sm90(sweep):
    for job, res in sweep.items():
        assert res["target"] == f"sm_{job[6][0]}{job[6][1]}", job
    assert {("stats", d, fp32) for (k, d, fp32, *_), _r in sweep.items() if k == "stats"} >= {
        ("stats", d, fp32) for d in DIMS for fp32 in (True, False)
    }


def test_register_budget(sweep):
    if ptxas_path() is None:  # only NVVM's own local arrays can be seen
        for (kind, d, fp32, *_), res in sweep.items():
            assert not (fp32 and d <= 7 and res["local"]), (kind, d)
        pytest.skip("no ptxas: registers not counted (PTX checked for local arrays only)")
    table = []
    for (kind, d, fp32, D, du, *_), res in sorted(sweep.items()):
        for arch in ARCHS:
            if arch not in res:
                continue
            regs, spill = res[arch]
            dt = "f32" if fp32 else "f64"
            table.append(
                f"{kind:>11} d={d:<2} D={D} du={du} {dt} {arch} (PTX {res['target']}): "
                f"{regs:>3} registers, {spill} B spilled"
            )
            assert regs <= 255, (kind, d, fp32, arch, regs)
            if kind == "stats" and fp32 and d <= 7:
                assert spill == 0, f"float32 fused statistics spill at d = {d} on {arch}"
    print("\n" + "\n".join(table))


if __name__ == "__main__":
    for line in sorted(f"{k}: {v}" for k, v in _sweep().items()):
        print(line)
