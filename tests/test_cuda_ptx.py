"""The numba.cuda kernels compile to PTX for sm_80 (A100) and sm_90 (H100) without a device, and
stay within a register budget.

``numba.cuda.compile_ptx`` needs NVVM and NVRTC (the ``nvidia-cuda-nvcc-cu12`` and
``nvidia-cuda-nvrtc-cu12`` wheels of the test extra), not a GPU. The register counts and spills
come from ``ptxas -v`` (shipped in the nvcc wheel) assembling the PTX for each architecture;
without ptxas the PTX itself is searched for local-memory traffic (``ld.local``/``st.local``),
which NVVM emits only for arrays it could not keep in registers (weaker: ptxas may still spill).

Budget: the fused statistics kernel, launched with up to 256 threads per block, must fit 255
registers (65,536 per SM / 256) and must not spill in float32 up to d = 7; every other kernel
(one sample per kind, :data:`xd_dask.kernels._cuda.PTX_SAMPLES`) compiles for both
architectures. Run this file as a script to print the table.

Time. ~95 % of a compile is numba-cuda typing and lowering the generated straight-line code
(~14 s for the d = 7 float64 statistics kernel on a loaded 2-core machine; NVVM ~1 s), so the
sweep runs in one process per core and its PTX is cached: a content-addressed cache (ccache's
rule) keyed by the exact generated source, the kernel's constants and signature, the target and
the versions of numba, numba-cuda, llvmlite, NVVM and the nvcc/nvrtc wheels; ptxas's report
likewise by the exact PTX, the architecture and ptxas's own version. A hit can only reproduce
what the same compiler made of the same input; a miss (any change, a fresh clone,
``XD_DASK_KERNEL_CACHE=off``) compiles and assembles. Cache: ``<XD_DASK_KERNEL_CACHE>/ptx``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # compile_ptx does not exist in the simulator
    pytest.skip("compile_ptx is unavailable under NUMBA_ENABLE_CUDASIM", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda")

ARCHS = ("sm_80", "sm_90")
DIMS = tuple(range(1, 11))
CACHE_FORMAT = "xd-dask ptx 1"


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


def _versions() -> str:
    """Every tool version the PTX depends on (part of the cache key)."""
    from numba.cuda.cudadrv import nvvm  # noqa: PLC0415

    names = ("numba", "numba-cuda", "llvmlite", "nvidia-cuda-nvcc-cu12", "nvidia-cuda-nvrtc-cu12")
    found = []
    for name in names:
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name}=?")
    nv = nvvm.NVVM()
    return " ".join([*found, f"nvvm={nv.get_version()} ir={nv.get_ir_version()}"])


def _cache_path(key_text: str, suffix: str) -> Path | None:
    """Where the output for ``key_text`` (everything the output depends on) is cached."""
    from xd_dask.utils import kernel_cache_dir  # noqa: PLC0415

    base = kernel_cache_dir("ptx")
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    return None if base is None else base / f"{key}{suffix}"


def _cached(path: Path | None, make) -> tuple[str, bool]:
    """(text, from the cache): the cached text, else ``make()``, stored atomically."""
    if path is not None and path.is_file():
        return path.read_text(), True
    text = make()
    if path is not None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return text, False


def ptx_of(kind: str, d: int, fp32: bool, D: int, du: int, block: int, cc) -> tuple[str, bool]:
    """(PTX, whether it came from the cache) of one kernel for compute capability ``cc``."""
    from xd_dask.kernels import _cuda  # noqa: PLC0415

    sig = _cuda.signature(kind, d, fp32, D, du)
    consts = sorted((k, repr(v)) for k, v in _cuda.namespace(fp32).items() if k != "cuda")
    key_text = "\n".join(
        [CACHE_FORMAT, _versions(), repr(cc), repr(sig), repr(consts),
         _cuda.source(kind, d, D, du, block)]
    )  # fmt: skip
    fn = _cuda.python_function(kind, d, fp32, D, du, block)
    return _cached(_cache_path(key_text, ".ptx"), lambda: cuda.compile_ptx(fn, sig, cc=cc)[0])


def ptxas_report(ptxas: str, ptx: str, arch: str) -> str:
    """``ptxas -v`` of ``ptx`` for ``arch`` (its stderr: registers and spills)."""

    def assemble() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            res = subprocess.run(
                [ptxas, f"-arch={arch}", "-v", str(src), "-o", os.devnull],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return res.stderr

    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return _cached(_cache_path("\n".join([CACHE_FORMAT, version, arch, ptx]), ".ptxas"),
                   assemble)[0]  # fmt: skip


def compile_one(kind: str, d: int, fp32: bool, D: int = 0, du: int = 0, block: int = 0,
                cc: tuple[int, int] = (8, 0)) -> dict:  # fmt: skip
    """PTX of one kernel for ``cc``, and per architecture the registers and spilled bytes."""
    ptx, cached = ptx_of(kind, d, fp32, D, du, block, cc)
    out = {
        "target": re.search(r"\.target (sm_\d+)", ptx)[1],
        "local": "st.local" in ptx,
        "cached": cached,
    }
    ptxas = ptxas_path()
    if ptxas is None:
        return out
    for arch in ARCHS if cc == (8, 0) else (f"sm_{cc[0]}{cc[1]}",):
        report = ptxas_report(ptxas, ptx, arch)
        regs = int(re.search(r"Used (\d+) registers", report)[1])
        spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", report))
        out[arch] = (regs, spill)
    return out


def _jobs() -> list[tuple]:
    from xd_dask.kernels import _cuda  # noqa: PLC0415

    jobs = {("stats", d, fp32, 0, 0, 256, (8, 0)) for d in DIMS for fp32 in (True, False)}
    jobs |= {("stats", 7, fp32, 0, 0, 256, (9, 0)) for fp32 in (True, False)}
    jobs |= {(*sample, (8, 0)) for sample in _cuda.PTX_SAMPLES}
    return sorted(jobs, key=lambda j: -j[1])  # biggest first: the pool ends together


def _sweep() -> dict:
    jobs = _jobs()
    with ProcessPoolExecutor(os.cpu_count() or 2, mp_context=get_context("spawn")) as pool:
        results = pool.map(_compile_job, jobs)
        return dict(zip(jobs, results, strict=True))


def _compile_job(job):
    return compile_one(*job[:6], cc=job[6])


pytestmark = pytest.mark.slow  # a cold cache: ~5 min of numba-cuda on two loaded cores


@pytest.fixture(scope="module")
def sweep():
    try:
        cuda.compile_ptx(lambda a: None, "void(float32[:])", cc=(8, 0))
    except Exception as exc:  # noqa: BLE001 - NVVM/NVRTC missing: say which
        pytest.skip(f"compile_ptx unavailable (NVVM/NVRTC wheels missing?): {exc}")
    return _sweep()


def test_every_kernel_compiles_for_sm80_and_sm90(sweep):
    from xd_dask.kernels import _cuda

    for job, res in sweep.items():
        assert res["target"] == f"sm_{job[6][0]}{job[6][1]}", job
    kinds = {job[0] for job in sweep}
    assert kinds >= {sample[0] for sample in _cuda.PTX_SAMPLES} >= {"logdens", "posterior"}
    assert {("stats", d, fp32) for (k, d, fp32, *_), _r in sweep.items() if k == "stats"} >= {
        ("stats", d, fp32) for d in DIMS for fp32 in (True, False)
    }
    print(f"\n{sum(r['cached'] for r in sweep.values())} of {len(sweep)} PTX from the cache")


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


def test_the_cache_key_follows_the_generated_source(tmp_path, monkeypatch):
    """A cached PTX is only ever the compile of the same source: another kernel (or the same
    kernel changed) misses and compiles, the identical one hits (the compiler is replaced by a
    recorder here: this tests the key, the sweep above the compiles)."""
    monkeypatch.setenv("XD_DASK_KERNEL_CACHE", str(tmp_path))
    from xd_dask.kernels import _cuda

    compiled = []

    def compile_ptx(fn, sig, cc):
        compiled.append((fn.__code__.co_filename, repr(sig), cc))
        return f".target sm_{cc[0]}{cc[1]} // {len(compiled)}", None

    monkeypatch.setattr(cuda, "compile_ptx", compile_ptx)
    ptx, cached = ptx_of("row_lse", 0, True, 0, 0, 0, (8, 0))
    assert not cached and len(compiled) == 1
    assert ptx_of("row_lse", 0, True, 0, 0, 0, (8, 0)) == (ptx, True) and len(compiled) == 1
    assert not ptx_of("row_lse", 0, True, 0, 0, 0, (9, 0))[1]  # another target
    assert not ptx_of("row_lse", 0, False, 0, 0, 0, (8, 0))[1]  # float64: another source
    assert not ptx_of("logdens", 2, True, 0, 0, 0, (8, 0))[1]
    monkeypatch.setattr(_cuda, "source", lambda *a: "def kernel(ld, K, lbg, lse):\n    pass\n")
    other, cached = ptx_of("row_lse", 0, True, 0, 0, 0, (8, 0))  # the same kernel, changed
    assert not cached and other != ptx and len(compiled) == 5
    monkeypatch.setenv("XD_DASK_KERNEL_CACHE", "off")
    assert not ptx_of("row_lse", 0, True, 0, 0, 0, (8, 0))[1] and len(compiled) == 6


if __name__ == "__main__":
    for line in sorted(f"{k}: {v}" for k, v in _sweep().items()):
        print(line)
