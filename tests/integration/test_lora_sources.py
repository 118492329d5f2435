"""Adapters fetched from real servers through the loader's sources: nginx (HTTP) and
s3rver (S3), into ``--adapter-dir``; and registered through the manager's API."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.lora.errors import AdapterCorrupt, AdapterFilesMissing
from control.lora.sources import fetch_adapter
from tests.integration.lora_process import running_lora_manager, write_discovery
from tests.integration.servers import Nginx, S3rver, running_nginx, running_s3rver
from tests.unit.lora_factories import adapter_bytes

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3rver]:
    with running_s3rver(tmp_path_factory.mktemp("s3rver")) as server:
        yield server


def publish(nginx: Nginx, files: dict[str, bytes]) -> str:
    prefix = f"adapters/{uuid.uuid4().hex}"
    for name, data in files.items():
        nginx.put(f"{prefix}/{name}", data)
    return nginx.url + prefix


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestHttp:
    def test_fetched_into_the_adapter_dir(self, nginx: Nginx, tmp_path: Path) -> None:
        files = adapter_bytes()
        folder = fetch_adapter(publish(nginx, files), tmp_path, "sql")
        assert folder == tmp_path / "sql"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
        assert listing(tmp_path) == ["sql"]

    def test_missing_weights(self, nginx: Nginx, tmp_path: Path) -> None:
        files = adapter_bytes()
        del files[WEIGHTS]
        with pytest.raises(AdapterFilesMissing, match=WEIGHTS):
            fetch_adapter(publish(nginx, files), tmp_path, "sql")
        assert listing(tmp_path) == []

    def test_corrupt_weights_leave_nothing(self, nginx: Nginx, tmp_path: Path) -> None:
        files = {**adapter_bytes(), WEIGHTS: adapter_bytes()[WEIGHTS][:20]}
        with pytest.raises(AdapterCorrupt, match=WEIGHTS):
            fetch_adapter(publish(nginx, files), tmp_path, "sql")
        assert listing(tmp_path) == []


class TestS3:
    @pytest.fixture(autouse=True)
    def credentials(self, s3rver: S3rver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3rver.endpoint)

    def put(self, s3rver: S3rver, files: dict[str, bytes]) -> str:
        prefix = f"{uuid.uuid4().hex}/sql"
        for name, data in files.items():
            s3rver.put(f"{prefix}/{name}", data)
        return f"s3://{s3rver.bucket}/{prefix}"

    def test_fetched_into_the_adapter_dir(self, s3rver: S3rver, tmp_path: Path) -> None:
        files = adapter_bytes(rank=8)
        folder = fetch_adapter(self.put(s3rver, files), tmp_path / "dir", "sql")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files

    def test_missing_config(self, s3rver: S3rver, tmp_path: Path) -> None:
        files = adapter_bytes()
        del files[CONFIG]
        with pytest.raises(AdapterFilesMissing, match=CONFIG):
            fetch_adapter(self.put(s3rver, files), tmp_path / "dir", "sql")
        assert listing(tmp_path / "dir") == []


def test_registered_through_the_api_and_loaded_from_the_copy(nginx: Nginx, tmp_path: Path) -> None:
    from sim.process import running_sim_engine
    from tests.integration.conftest import free_port

    good = publish(nginx, adapter_bytes())
    bad = publish(nginx, {**adapter_bytes(), CONFIG: b"{"})
    with running_sim_engine(free_port(), model="llama", enable_lora=True) as engine:
        discovery = tmp_path / "engines.json"
        write_discovery(discovery, [engine.url])
        flags = {"discovery": "file", "discovery_file": discovery, "interval_s": 0.3}
        with running_lora_manager(tmp_path, **flags) as manager:
            body = {"name": "sql", "base_model": "llama", "source": good}
            status, answer = manager.request("POST", "/v1/adapters", body)
            assert status == 201, answer
            copy = tmp_path / "adapters" / "sql"
            assert answer["path"] == str(copy)
            assert listing(copy) == [CONFIG, WEIGHTS]
            body = {"name": "broken", "base_model": "llama", "source": bad}
            status, answer = manager.request("POST", "/v1/adapters", body)
            assert status == 422 and "not JSON" in answer["error"], answer
            assert not (tmp_path / "adapters" / "broken").exists()
            assert manager.request("POST", "/v1/wake", {"model": "sql"})[0] == 202
            cards = json.loads(engine.get("/v1/models"))["data"]
            assert {c["id"]: c["root"] for c in cards if c["parent"]} == {"sql": str(copy)}
            status, _ = manager.request("DELETE", "/v1/adapters/sql")
            assert status == 200
            assert not copy.exists()
            cards = json.loads(engine.get("/v1/models"))["data"]
            assert [c["id"] for c in cards] == ["llama"]
