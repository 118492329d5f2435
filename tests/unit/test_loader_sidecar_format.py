"""The sidecar's pure pieces: segment layout and identity, the status table, and that the
committed generated code matches proto/loader.proto."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc")

from loader.errors import (  # noqa: E402
    AccessDenied,
    CapacityExceeded,
    CheckpointError,
    IntegrityError,
    LoaderError,
    ObjectNotFound,
    SidecarUnavailable,
    SourceError,
    SourceUnavailable,
    StagingConflict,
    UnknownCheckpoint,
)
from loader.plan import TensorPlan  # noqa: E402
from loader.sidecar.segment import DATA_OFFSET, StageSpec, layout  # noqa: E402
from loader.sidecar.status import status_for  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
Code = grpc.StatusCode


def plan(name: str, nbytes: int) -> TensorPlan:
    return TensorPlan(name, "model.safetensors", torch.uint8, (nbytes,), ((0, nbytes),))


def test_tensors_are_laid_out_page_aligned_after_the_header() -> None:
    offsets, size = layout([plan("a", 1), plan("b", 4096), plan("c", 0), plan("d", 4097)])
    assert offsets == [DATA_OFFSET, DATA_OFFSET + 4096, DATA_OFFSET + 8192, DATA_OFFSET + 8192]
    assert size == DATA_OFFSET + 4096 + 4096 + 8192


def test_identity_is_uri_and_tp_not_how_it_is_staged() -> None:
    spec = StageSpec("/models/a")
    assert (
        spec.checkpoint_id
        == StageSpec("/models/a", order="layers", rate_bytes_per_s=1).checkpoint_id
    )
    assert spec.checkpoint_id == StageSpec("/models/a", tp_size=1).checkpoint_id
    assert spec.checkpoint_id != StageSpec("/models/a", tp_rank=0, tp_size=2).checkpoint_id
    assert spec.checkpoint_id != StageSpec("/models/b").checkpoint_id
    for bad in ({"uri": "relative/path"}, {"uri": "/m", "tp_rank": 2, "tp_size": 2},
                {"uri": "/m", "order": "random"}, {"uri": ""}):  # fmt: skip
        with pytest.raises(ValueError):
            StageSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CheckpointError("x"), Code.INVALID_ARGUMENT),
        (ValueError("x"), Code.INVALID_ARGUMENT),
        (ObjectNotFound("x"), Code.NOT_FOUND),
        (UnknownCheckpoint("x"), Code.NOT_FOUND),
        (AccessDenied("x"), Code.PERMISSION_DENIED),
        (SourceUnavailable("x"), Code.UNAVAILABLE),
        (IntegrityError("x"), Code.DATA_LOSS),
        (CapacityExceeded("x"), Code.RESOURCE_EXHAUSTED),
        (StagingConflict("x"), Code.FAILED_PRECONDITION),
        (SourceError("x"), Code.FAILED_PRECONDITION),
        (LoaderError("x"), Code.FAILED_PRECONDITION),
        (SidecarUnavailable("x"), Code.FAILED_PRECONDITION),
        (RuntimeError("x"), Code.INTERNAL),
    ],
)
def test_each_loader_error_has_its_status_code(error: Exception, code: object) -> None:
    assert status_for(error)[0] == code


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools not installed (pip install grpcio-tools to check the generated code)",
)
def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    subprocess.run(["bash", str(REPO / "scripts" / "gen-proto"), str(tmp_path)], check=True,
                   env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})  # fmt: skip
    generated = tmp_path / "loader" / "sidecar" / "_proto"
    names = ["loader_pb2.py", "loader_pb2_grpc.py", "loader_pb2.pyi"]
    for name in names:
        committed = REPO / "loader" / "sidecar" / "_proto" / name
        assert (generated / name).read_text() == committed.read_text(), (
            f"{committed} is stale: run scripts/gen-proto"
        )
