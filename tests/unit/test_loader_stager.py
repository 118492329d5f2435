"""The sidecar's ``Stager`` in process, where a race can be held open on purpose."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from loader.sidecar import staging  # noqa: E402
from loader.sidecar.segment import StageSpec  # noqa: E402
from loader.sidecar.staging import Stager  # noqa: E402
from loader.sources import open_source  # noqa: E402


def test_evicting_a_detached_staging_after_its_last_read_leaves_nothing_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    safetensors_torch.save_file({"w": torch.ones(4096)}, str(model / "model.safetensors"))
    shm = tmp_path / "shm"
    shm.mkdir()
    stager = Stager(shm, "t-", 1 << 30, open_source=open_source)
    read_all = threading.Event()
    go_on = threading.Event()
    real = staging.staged_files

    def slow_files(*args: object) -> object:  # runs after the last read, before "ready"
        read_all.set()
        assert go_on.wait(10)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(staging, "staged_files", slow_files)
    spec = StageSpec(str(model))
    stager.stage(spec, detach=True).release()
    assert read_all.wait(10)
    assert stager.evict(spec.checkpoint_id) == 0  # cancels: it is still staging
    go_on.set()
    again = stager.stage(spec)  # must not spin on the cancelled entry; stages afresh
    try:
        assert again.wait(10) and again.result().segment_bytes > 0
        assert [i.state for i in stager.list()] == ["ready"]
        assert len(list(shm.iterdir())) == 1  # the cancelled staging's segment is gone
    finally:
        again.release()
        stager.close()
    assert stager.statistics().staged_bytes == 0
