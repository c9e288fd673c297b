"""A fit's checkpoint history is appended, never rewritten (format 3), and a kill at any moment
leaves a checkpoint whose history is exactly the one it was written with."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from xd_dask.distributed.checkpoint import (
    HISTORY_NAME,
    CheckpointError,
    _append_history,
    load_checkpoint,
    save_checkpoint,
)
from xd_dask.optim.steps import LoopState
from xd_dask.params import Params

K, D = 3, 2


def _state(n: int) -> LoopState:
    rng = np.random.default_rng(0)
    p = Params(np.full(K, 1 / K), rng.normal(size=(K, D)), np.stack([np.eye(D)] * K))
    return LoopState(p, "online-em", history=[_entry(i) for i in range(n)])


def _entry(i: int) -> dict:
    return {"iteration": i, "wave_mean_loglike": -3.0 - 1.0 / (i + 7), "partitions": [i % 5, 4]}


def _save(d, st) -> None:
    save_checkpoint(d, st, {"seed": 1}, {"partitions": []})


def test_history_is_appended_in_place_and_reloads_exactly(tmp_path):
    st = _state(5)
    _save(tmp_path, st)
    f = tmp_path / HISTORY_NAME
    inode, before = os.stat(f).st_ino, f.read_bytes()
    for i in range(5, 12):
        st.history.append(_entry(i))
        _save(tmp_path, st)
        assert load_checkpoint(tmp_path)[0].history == st.history
    after = f.read_bytes()
    assert os.stat(f).st_ino == inode and after.startswith(before)  # appended, not rewritten
    assert [json.loads(x) for x in after.decode().splitlines()] == st.history
    header = json.loads(str(np.load(tmp_path / "checkpoint.npz")["header"]))
    assert header["format_version"] == 3 and header["history_length"] == 12
    assert "history" not in header


def test_a_kill_between_append_and_checkpoint_keeps_the_checkpoints_history(tmp_path):
    st = _state(4)
    _save(tmp_path, st)
    want = list(st.history)
    st.history.append(_entry(4))
    _append_history(tmp_path, st.history)  # the step's line, then the kill: no checkpoint
    with open(tmp_path / HISTORY_NAME, "a") as fh:
        fh.write('{"iteration": 5, "wave_mea')  # and a line cut by the kill
    assert load_checkpoint(tmp_path)[0].history == want


def test_a_rolled_back_step_leaves_the_file_after_its_checkpoint(tmp_path):
    st = _state(6)
    _save(tmp_path, st)
    st.history.pop()  # the loop's roll-back of a diverged step
    _save(tmp_path, st)
    lines = (tmp_path / HISTORY_NAME).read_text().splitlines()
    assert len(lines) == 5 and load_checkpoint(tmp_path)[0].history == st.history
    st.history.append(_entry(77))  # the next step replaces it
    _save(tmp_path, st)
    assert load_checkpoint(tmp_path)[0].history == st.history


def test_a_history_file_short_of_the_checkpoint_is_named(tmp_path):
    st = _state(6)
    _save(tmp_path, st)
    f = tmp_path / HISTORY_NAME
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(CheckpointError, match=r"history\.jsonl.*4 complete entries.*refers to 6"):
        load_checkpoint(tmp_path)
    f.unlink()
    with pytest.raises(CheckpointError, match=r"history\.jsonl: missing"):
        load_checkpoint(tmp_path)


def test_a_file_changed_by_someone_else_is_written_whole_again(tmp_path):
    st = _state(3)
    _save(tmp_path, st)
    (tmp_path / HISTORY_NAME).write_text("not this fit's history\n")
    st.history.append(_entry(3))
    _save(tmp_path, st)
    assert load_checkpoint(tmp_path)[0].history == st.history


def test_format_2_checkpoints_with_the_history_in_the_header_still_load(tmp_path):
    st = _state(3)
    _save(tmp_path, st)
    path = tmp_path / "checkpoint.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays.pop("header")))
    del header["history_length"]
    header |= {"format_version": 2, "history": st.history}
    (tmp_path / HISTORY_NAME).unlink()
    with open(path, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header)), **arrays)
    assert load_checkpoint(tmp_path)[0].history == st.history
