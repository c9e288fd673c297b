"""Fault tolerance on a real 2-process cluster: killed fitting process, killed worker, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from tests.distributed_data import make_rows, schema, write_catalog
from xd_dask.distributed import (
    CheckpointError,
    FitConfig,
    fit_catalog,
    load_checkpoint,
    resume_fit,
)

pytestmark = pytest.mark.cluster
K = 3


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    X, S = make_rows(seed=7, n=2400, missing=0.05)
    root = tmp_path_factory.mktemp("faults") / "cat"
    write_catalog(root, X, S, 6)
    return str(root)


def _same(a, b, tol):
    np.testing.assert_allclose(a.weights, b.weights, rtol=0, atol=tol)
    np.testing.assert_allclose(a.means, b.means, rtol=0, atol=tol)
    np.testing.assert_allclose(a.covariances, b.covariances, rtol=0, atol=tol)


def _rule_config(catalog, checkpoint_dir, method: str = "online") -> FitConfig:
    """12 steps of each update rule: online EM in waves of one file (80 % of its rows), Adam in
    6 hash strata of every (persisted) partition per epoch, batch EM."""
    waves = {
        "online": dict(method="online", epochs=2, wave_size=1, subsample=0.8),
        "adam": dict(method="adam", epochs=2, waves_per_epoch=6),
        "em": dict(method="em", max_iter=12),
    }[method]
    return FitConfig(
        catalog=catalog,
        n_components=K,
        schema=schema(),
        seed=5,
        tol=0.0,
        checkpoint_dir=str(checkpoint_dir),
        **waves,
    )


_FIT_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from distributed import Client
    from xd_dask.distributed import FitConfig, fit_catalog

    config = FitConfig.from_dict(json.loads(sys.argv[2]))
    with Client(sys.argv[1]) as client:
        # a slow progress callback stretches the fit so that it can be killed half way
        fit_catalog(config, client, lambda event: time.sleep(0.4))
    """
)


@pytest.mark.parametrize("method", ["online", "adam", "em"])
def test_sigkill_fitting_process_then_resume_equals_uninterrupted(
    cluster, client, catalog, tmp_path, method
):
    reference = fit_catalog(_rule_config(catalog, tmp_path / "ref", method), client)
    assert reference.metadata["n_iter"] == 12  # 2 epochs x 6 waves, or 12 iterations

    ck = tmp_path / "ck"
    cfg = _rule_config(catalog, ck, method).to_dict()
    proc = subprocess.Popen(
        [sys.executable, "-c", _FIT_SCRIPT, cluster.scheduler_address, json.dumps(cfg)],
        cwd=os.getcwd(),
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while done < 4:  # kill in epoch 1, after at least four waves
            assert proc.poll() is None, "the fit ended before it could be killed"
            assert time.monotonic() < deadline, "the fit made no progress"
            time.sleep(0.05)
            try:
                done = load_checkpoint(ck)[0].iteration
            except Exception:  # no checkpoint yet
                done = 0
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(ck)[0]
    assert not state.finished and 4 <= state.iteration < 12

    resumed = resume_fit(ck, client)
    _same(resumed, reference, 0.0)  # bit for bit
    assert resumed.metadata["n_iter"] == 12
    assert resumed.metadata["waves"] == reference.metadata["waves"]
    steps = [h["iteration"] for h in resumed.metadata["history"] if not h.get("final")]
    assert steps == list(range(1, 13))
    # resuming a finished fit returns the same model without running anything
    _same(resume_fit(ck, client), reference, 0.0)


class _Interrupt(Exception):
    pass


def _as_format_1(ck) -> None:
    """Rewrite a (batch-EM) checkpoint in the layout of checkpoint format 1 (xd-dask before the
    one fitting loop): arrays weights / means / covariances, bookkeeping at the top level."""
    path = ck / "checkpoint.npz"
    with np.load(path) as z:
        header = json.loads(str(z["header"]))
        arrays = {k: z[f"params.{k}"] for k in ("weights", "means", "covariances")}
    info = header.pop("info")
    n = header.pop("history_length")  # format 1 kept the history in its header
    header["history"] = [json.loads(x) for x in (ck / "history.jsonl").read_text().splitlines()][:n]
    header["format_version"] = 1
    header["position"]["wave_size"] = info["wave_size"]
    header |= {
        "init_info": info["init"],
        "retries": info["retries"],
        "max_gathered_bytes": info["max_gathered_bytes"],
    }
    del header["rule"]
    with open(path, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)


@pytest.mark.parametrize("background", [False, True])
def test_interrupted_batch_fit_resumes_exactly(client, catalog, tmp_path, background):
    def config(ck):
        return FitConfig(
            catalog=catalog,
            n_components=K,
            schema=schema(),
            max_iter=8,
            tol=0.0,
            seed=2,
            checkpoint_dir=str(ck),
            background=background,
        )

    reference = fit_catalog(config(tmp_path / "ref"), client)

    def stop_at_4(event):
        if event["iteration"] == 4:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit_catalog(config(tmp_path / "ck"), client, stop_at_4)
    assert load_checkpoint(tmp_path / "ck")[0].iteration == 4
    shutil.copytree(tmp_path / "ck", tmp_path / "ck1")
    resumed = resume_fit(tmp_path / "ck", client)
    _same(resumed, reference, 1e-10)
    ref_ll = [h["mean_loglike"] for h in reference.metadata["history"]]
    assert [h["mean_loglike"] for h in resumed.metadata["history"]] == ref_ll
    if background:
        assert resumed.background == reference.background is not None
        return
    # a checkpoint written by the previous format resumes to the same model
    _as_format_1(tmp_path / "ck1")
    assert load_checkpoint(tmp_path / "ck1")[0].previous is None
    _same(resume_fit(tmp_path / "ck1", client), reference, 1e-10)
    with np.load(tmp_path / "ck1" / "checkpoint.npz") as z:
        header = json.loads(str(z["header"])) | {"format_version": 99}
        arrays = {k: z[k] for k in z.files if k != "header"}
    with open(tmp_path / "ck1" / "checkpoint.npz", "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(CheckpointError, match="format 99 is newer than this xd-dask"):
        resume_fit(tmp_path / "ck1", client)


class _KillWorkerOnce(WorkerPlugin):
    """SIGKILLs the worker process that starts executing an ``xd-estep`` task of ``label``."""

    def __init__(self, marker: str, label: int) -> None:
        self.marker = marker
        self.label = label

    def transition(self, key, start, finish, **kwargs):
        if (
            finish == "executing"
            and isinstance(key, tuple)
            and str(key[0]).startswith("xd-estep-")
            and key[1] == self.label
        ):
            try:  # exactly one kill across all workers and restarts
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("persist", [False, True])
def test_worker_killed_mid_iteration_costs_only_a_retry(client, catalog, tmp_path, persist):
    def config():
        return FitConfig(
            catalog=catalog,
            n_components=K,
            schema=schema(),
            max_iter=6,
            tol=0.0,
            seed=3,
            persist=persist,
        )

    reference = fit_catalog(config(), client)
    marker = tmp_path / "killed"
    before = set(client.run(os.getpid).values())
    client.register_plugin(_KillWorkerOnce(str(marker), label=3), name="xd-test-kill")
    try:
        model = fit_catalog(config(), client)
    finally:
        client.unregister_worker_plugin("xd-test-kill")
    assert marker.exists(), "no worker was killed"
    assert int(marker.read_text()) in before
    _same(model, reference, 1e-12)
    client.wait_for_workers(2, timeout=60)
    assert int(marker.read_text()) not in set(client.run(os.getpid).values())


def test_resume_refuses_a_changed_catalogue_and_fit_refuses_a_used_checkpoint(
    client, catalog, tmp_path
):
    import shutil

    from xd_dask.distributed import CheckpointError, ManifestError

    cat = tmp_path / "cat"
    shutil.copytree(catalog, cat)
    cfg = FitConfig(
        catalog=str(cat),
        n_components=K,
        schema=schema(),
        max_iter=5,
        tol=0.0,
        checkpoint_dir=str(tmp_path / "ck"),
    )

    def stop(event):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        fit_catalog(cfg, client, stop)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        fit_catalog(cfg, client)
    sorted(cat.glob("*.parquet"))[-1].unlink()
    with pytest.raises(ManifestError, match="changed since the checkpoint"):
        resume_fit(tmp_path / "ck", client)


def test_format_1_online_checkpoint_is_read_as_online_em_state(tmp_path):
    """The online-EM arrays of a format-1 checkpoint become the OnlineEM rule's state."""
    from tests.mixtures import known_mixture_3d

    w, m, V = known_mixture_3d()
    header = {
        "format": "xd-dask-checkpoint",
        "format_version": 1,
        "config": {"method": "online", "seed": 5},
        "manifest": {},
        "position": {"iteration": 7, "epoch": 1, "wave": 3, "wave_size": 2, "order": [2, 0, 1]},
        "history": [{"iteration": 7, "mean_loglike": -3.5}],
        "counts": {},
        "epoch_counts": {"read": 4},
        "reseeded": [],
        "init_info": {"method": "kmeans"},
        "converged": False,
        "finished": False,
        "retries": 1,
        "max_gathered_bytes": 99,
    }
    arrays = {"weights": w, "means": m, "covariances": V}
    arrays |= {"online_s": w * 0.5, "online_mu": m + 1.0, "online_sigma": 2.0 * V}
    with open(tmp_path / "checkpoint.npz", "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)
    state = load_checkpoint(tmp_path)[0]
    assert state.rule == "online-em" and state.previous is None
    np.testing.assert_array_equal(state.rule_state["mu"], m + 1.0)
    np.testing.assert_array_equal(state.rule_state["sigma"], 2.0 * V)
    assert float(state.rule_state["s_bg"]) == 0.0
    assert (state.iteration, state.epoch, state.wave, state.order) == (7, 1, 3, [2, 0, 1])
    assert state.info == {
        "init": {"method": "kmeans"},
        "wave_size": 2,
        "retries": 1,
        "max_gathered_bytes": 99,
    }
