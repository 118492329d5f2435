"""gRPC hardening of the sidecar against a real server process (m19): the standard
``grpc.health.v1`` service, a bound on streaming calls that leaves threads for probes, and
HTTP/2 keepalive that notices a sidecar which stopped answering."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
pytest.importorskip("torch")
pytest.importorskip("safetensors")

from loader.errors import CapacityExceeded, SidecarUnavailable  # noqa: E402
from tests.integration.conftest import wait_until  # noqa: E402
from tests.integration.test_loader_sidecar import (  # noqa: E402
    MiB,
    big_model,
    start_sidecar,
    write_checkpoint,
)

SERVING = health_pb2.HealthCheckResponse.SERVING


def standard_health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_the_standard_health_service_answers_beside_the_custom_one(tmp_path: Path) -> None:
    sidecar = start_sidecar(tmp_path)
    try:
        assert standard_health(sidecar.config.target) == SERVING
        assert standard_health(sidecar.config.target, "shoal.loader.v1.Loader") == SERVING
        with sidecar.client() as client:
            assert client.health().serving  # the custom RPC stays for compatibility
        with pytest.raises(grpc.RpcError) as unknown:
            standard_health(sidecar.config.target, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        sidecar.stop()


def test_streams_past_the_bound_are_refused_and_probes_still_answer(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "models" / "slow", big_model(32 * MiB))
    sidecar = start_sidecar(tmp_path, workers=3, max_streams=1)
    client = sidecar.client()
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            client.prefetch(str(model), rate_bytes_per_s=4 * MiB)
        except BaseException as exc:  # the call is cancelled at the end of the test
            errors.append(exc)

    holder = threading.Thread(target=slow, daemon=True)
    holder.start()
    try:
        assert wait_until(lambda: any(i.bytes_done for i in client.list()), 20), sidecar.log()
        with sidecar.client() as other, pytest.raises(CapacityExceeded, match="streaming"):
            other.prefetch(str(model))
        for _ in range(5):  # unary calls and probes find a thread although streams wait
            assert client.health().num_stagings >= 1
            assert standard_health(sidecar.config.target) == SERVING
    finally:
        sidecar.stop()
        holder.join(10)
        client.close()


def test_a_sidecar_that_stops_answering_fails_a_waiting_call(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "models" / "frozen", big_model(32 * MiB))
    settings = {"keepalive_time_s": 1.0, "keepalive_timeout_s": 1.0}
    sidecar = start_sidecar(tmp_path, **settings)  # type: ignore[arg-type]
    client = sidecar.client(**settings)
    outcome: list[BaseException] = []

    def wait_for_staging() -> None:
        try:
            client.prefetch(str(model), rate_bytes_per_s=2 * MiB)  # ~16 s if it ran on
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_staging, daemon=True)
    waiter.start()
    try:
        assert wait_until(lambda: any(i.bytes_done for i in client.list()), 20), sidecar.log()
        os.kill(sidecar.process.pid, signal.SIGSTOP)  # alive, connection open, silent
        waiter.join(12)
        assert not waiter.is_alive(), "the call still waits on a sidecar that went silent"
        assert isinstance(outcome[0], SidecarUnavailable), outcome
    finally:
        sidecar.process.kill()  # SIGKILL works on a stopped process; shutdown is not tested
        sidecar.process.wait()
        client.close()
