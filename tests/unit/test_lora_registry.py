"""The adapter registry (state file) and adapter sources (check, atomic fetch)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from control.lora.errors import (
    AdapterConflict,
    AdapterCorrupt,
    AdapterFilesMissing,
    AdapterNotFound,
    AdapterSourceError,
    LoraConfigError,
    StateFileError,
)
from control.lora.registry import Registry
from control.lora.sources import check_adapter, fetch_adapter
from control.lora.types import AdapterSpec
from loader.errors import ObjectNotFound, SourceUnavailable
from loader.sources.base import ObjectInfo
from tests.unit.lora_factories import adapter_bytes, write_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class MemorySource:
    """A loader ``Source`` over a dict; ``fail_at`` = (file, offset) breaks a read there."""

    preferred_chunk_bytes = 16

    def __init__(self, files: dict[str, bytes], fail_at: tuple[str, int] | None = None):
        self.uri = "mem://adapters/"
        self.files = files
        self.fail_at = fail_at
        self.closed = False

    def stat(self, path: str) -> ObjectInfo:
        if path not in self.files:
            raise ObjectNotFound(f"{self.uri}{path}: no such object")
        return ObjectInfo(path, len(self.files[path]), "etag")

    def list(self) -> list[ObjectInfo]:
        return [self.stat(p) for p in sorted(self.files)]

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        failing = self.fail_at is not None and self.fail_at[0] == path
        if failing and self.fail_at is not None and offset + len(buffer) > self.fail_at[1]:
            raise SourceUnavailable(f"{self.uri}{path}: connection reset")
        buffer[:] = self.files[path][offset : offset + len(buffer)]

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True


def fetch(tmp_path: Path, source: MemorySource, name: str = "sql") -> Path:
    return fetch_adapter("s3://bucket/sql", tmp_path / "dir", name, open_source=lambda _: source)


class TestCheck:
    def test_valid_adapter_passes(self, tmp_path: Path) -> None:
        check_adapter(write_adapter(tmp_path / "a"))

    @pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
    def test_missing_file(self, tmp_path: Path, missing: str) -> None:
        folder = write_adapter(tmp_path / "a", replace={missing: None})
        with pytest.raises(AdapterFilesMissing, match=missing):
            check_adapter(folder)

    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(AdapterFilesMissing, match="no such folder"):
            check_adapter(tmp_path / "nothing")

    @pytest.mark.parametrize(
        ("config", "why"),
        [(b"{not json", "not JSON"), (b"[1]", "not a JSON object"),
         (b'{"r": "4"}', "integer rank"), (b'{"r": 4, "peft_type": "IA3"}', "not LORA")],
    )  # fmt: skip
    def test_corrupt_config(self, tmp_path: Path, config: bytes, why: str) -> None:
        folder = write_adapter(tmp_path / "a", replace={CONFIG: config})
        with pytest.raises(AdapterCorrupt, match=why):
            check_adapter(folder)

    def test_truncated_weights(self, tmp_path: Path) -> None:
        weights = adapter_bytes()[WEIGHTS]
        folder = write_adapter(tmp_path / "a", replace={WEIGHTS: weights[:-4]})
        with pytest.raises(AdapterCorrupt, match=WEIGHTS):
            check_adapter(folder)

    def test_weights_that_are_not_safetensors(self, tmp_path: Path) -> None:
        folder = write_adapter(tmp_path / "a", replace={WEIGHTS: b"\xff" * 64})
        with pytest.raises(AdapterCorrupt, match="header length"):
            check_adapter(folder)


class TestFetch:
    def test_fetch_copies_both_files_into_the_named_folder(self, tmp_path: Path) -> None:
        files = adapter_bytes()
        source = MemorySource(dict(files))
        folder = fetch(tmp_path, source)
        assert folder == tmp_path / "dir" / "sql"
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
        assert source.closed
        assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["sql"]

    def test_missing_remote_file(self, tmp_path: Path) -> None:
        files = adapter_bytes()
        del files[WEIGHTS]
        with pytest.raises(AdapterFilesMissing, match=WEIGHTS):
            fetch(tmp_path, MemorySource(files))
        assert list((tmp_path / "dir").iterdir()) == []

    def test_broken_read_leaves_nothing_half_written(self, tmp_path: Path) -> None:
        source = MemorySource(adapter_bytes(), fail_at=(WEIGHTS, 32))
        with pytest.raises(AdapterSourceError, match="connection reset"):
            fetch(tmp_path, source)
        assert list((tmp_path / "dir").iterdir()) == []

    def test_corrupt_remote_adapter_is_refused_and_the_old_copy_kept(self, tmp_path: Path) -> None:
        good = adapter_bytes()
        fetch(tmp_path, MemorySource(dict(good)))
        bad = {**good, CONFIG: b"{"}
        with pytest.raises(AdapterCorrupt):
            fetch(tmp_path, MemorySource(bad))
        folder = tmp_path / "dir" / "sql"
        assert (folder / CONFIG).read_bytes() == good[CONFIG]
        assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["sql"]

    def test_refetch_replaces_the_copy(self, tmp_path: Path) -> None:
        fetch(tmp_path, MemorySource(adapter_bytes(rank=4)))
        fetch(tmp_path, MemorySource(adapter_bytes(rank=8)))
        config = json.loads((tmp_path / "dir" / "sql" / CONFIG).read_text())
        assert config["r"] == 8
        assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["sql"]

    def test_fetching_a_name_leaves_a_longer_names_staging_folder_alone(
        self, tmp_path: Path
    ) -> None:
        # "a" is fetched while "a-b" is mid-copy (from inside a-b's read, deterministically):
        # a's cleanup of its own stale staging folders must not match a-b's
        inner: list[Path] = []

        class Interleaved(MemorySource):
            def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
                if path == WEIGHTS and not inner:
                    inner.append(fetch(tmp_path, MemorySource(adapter_bytes()), name="a"))
                super().read_into(path, offset, buffer)

        folder = fetch(tmp_path, Interleaved(adapter_bytes()), name="a-b")
        assert inner == [tmp_path / "dir" / "a"]
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == adapter_bytes()
        assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["a", "a-b"]


class TestRegistry:
    def test_local_adapter_registered_as_is_and_persisted(self, tmp_path: Path) -> None:
        folder = write_adapter(tmp_path / "sql")
        state = tmp_path / "state.json"
        registry = Registry(tmp_path / "dir", state, clock=lambda: 123.0)
        spec = registry.prepare("sql-lora", "llama", str(folder))
        assert spec == AdapterSpec("sql-lora", "llama", str(folder), str(folder), 123.0)
        registry.add(spec)
        registry.pin("http://a:8000", "sql-lora")
        again = Registry(tmp_path / "dir", state)
        assert again.adapters == {"sql-lora": spec}
        assert again.pins == {("http://a:8000", "sql-lora")}
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("state")] == ["state.json"]

    def test_remote_adapter_fetched_into_the_adapter_dir(self, tmp_path: Path) -> None:
        def fake_fetch(source: str, adapter_dir: Path, name: str) -> Path:
            return write_adapter(adapter_dir / name)

        registry = Registry(tmp_path / "dir", None, fetch=fake_fetch, clock=lambda: 1.0)
        spec = registry.prepare("sql", "llama", "s3://bucket/sql")
        assert spec.path == str(tmp_path / "dir" / "sql")

    def test_same_registration_twice_is_accepted_a_different_one_is_a_conflict(
        self, tmp_path: Path
    ) -> None:
        folder = write_adapter(tmp_path / "sql")
        registry = Registry(tmp_path / "dir")
        registry.add(registry.prepare("sql", "llama", str(folder)))
        assert registry.check_new("sql", "llama", str(folder)) == registry.adapters["sql"]
        with pytest.raises(AdapterConflict, match="remove it first"):
            registry.check_new("sql", "other-base", str(folder))

    @pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "a b", "x" * 129])
    def test_bad_names(self, tmp_path: Path, name: str) -> None:
        with pytest.raises(LoraConfigError, match="adapter name"):
            Registry(tmp_path).check_new(name, "llama", "/x")

    def test_remove_forgets_adapter_and_pins(self, tmp_path: Path) -> None:
        registry = Registry(tmp_path / "dir", tmp_path / "s.json")
        registry.add(registry.prepare("sql", "llama", str(write_adapter(tmp_path / "sql"))))
        registry.pin("http://a:8000", "sql")
        registry.remove("sql")
        assert Registry(tmp_path / "dir", tmp_path / "s.json").adapters == {}
        assert registry.pins == set()
        with pytest.raises(AdapterNotFound):
            registry.remove("sql")

    @pytest.mark.parametrize(
        "text",
        [
            '{"version": 1, "adapters": [{"name": "x"}]}',
            "[1]",
            '{"version": 2}',
            '{"version": 1, "adapters": [{"name": "../etc", "base_model": "b", '
            '"source": "s3://b/x", "path": "/p"}]}',
        ],
    )
    def test_corrupt_state_file_refuses_to_start(self, tmp_path: Path, text: str) -> None:
        state = tmp_path / "s.json"
        state.write_text(text)
        with pytest.raises(StateFileError, match="move it aside"):
            Registry(tmp_path, state)
