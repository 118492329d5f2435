"""The sidecar's ``shoal_loader_*`` Prometheus metrics, scraped from a real sidecar (M10)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("torch")
pytest.importorskip("safetensors")

from loader.errors import ObjectNotFound
from loader.sources.peer import PeerSource
from tests.integration.conftest import free_port
from tests.integration.test_loader_sidecar import (
    small_model,
    start_sidecar,
    write_checkpoint,
)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(shoal_loader_\S+) (\S+)$", line)
        if match:
            samples[match[1]] = float(match[2])
    return samples


def test_stagings_bytes_reads_errors_and_capacity_are_exported(tmp_path: Path) -> None:
    port = free_port()
    model = write_checkpoint(tmp_path / "models" / "m", small_model())
    sidecar = start_sidecar(tmp_path, metrics_port=port)
    try:
        before = scrape(port)
        assert before["shoal_loader_capacity_bytes"] == 256 << 20
        assert before["shoal_loader_checkpoints"] == 0
        with sidecar.client() as client:
            client.prefetch(str(model))
            with client.load(str(model)):
                pass
            with pytest.raises(ObjectNotFound):
                client.prefetch(str(tmp_path / "models" / "missing.safetensors"))
        peer = PeerSource(f"peer+unix://{sidecar.config.socket_path}{model}")
        header = bytearray(8)
        peer.read_into("model.safetensors", 0, memoryview(header))
        peer.close()
        after = scrape(port)
    finally:
        sidecar.stop()
    staged = (model / "model.safetensors").stat().st_size
    assert after['shoal_loader_stagings_total{outcome="ready"}'] == 1
    assert after['shoal_loader_stagings_total{outcome="failed"}'] == 1
    assert 0 < after['shoal_loader_staged_bytes_total{source="local"}'] <= staged
    assert after["shoal_loader_stage_seconds_count"] == 1
    assert after['shoal_loader_reads_served_total{rpc="Prefetch"}'] == 1
    assert after['shoal_loader_reads_served_total{rpc="Load"}'] == 1
    assert after['shoal_loader_reads_served_total{rpc="Read"}'] == 1
    raw = (model / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")  # a read in the header fetches it whole
    assert after["shoal_loader_read_bytes_served_total"] == header
    assert after['shoal_loader_errors_total{kind="ObjectNotFound"}'] == 1
    assert after["shoal_loader_checkpoints"] == 1
    assert after["shoal_loader_staged_bytes"] > 0


def test_metrics_are_off_by_default_and_a_busy_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="cannot serve metrics on 127.0.0.1"):
            start_sidecar(tmp_path, metrics_port=port)
