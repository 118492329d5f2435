"""The connector's worker side against real daemon processes: chunk size vs the daemon's
slab (M8), refused requests (M8), arena mappings across a daemon restart (M9), a killed
daemon costing a step no io timeout (found on the real engine)."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvcache.client import CacheClient
from kvcache.config import CacheConfig
from kvcache.connector.plan import ChunkGeometry, LoadJob, SaveJob, StepPlan
from kvcache.connector.settings import ConnectorSettings
from kvcache.connector.worker import ChunkTooLarge, ConnectorWorker
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import DaemonProcess, start_daemon

GEOMETRY = ChunkGeometry(block_size=16, chunk_tokens=32)


def small_cache() -> dict[str, torch.Tensor]:
    """One layer, (2, 32 blocks, 16 tokens, 2 heads, 8): 4 KiB per block, 8 KiB a chunk."""
    values = torch.arange(2 * 32 * 16 * 2 * 8, dtype=torch.float32).view(2, 32, 16, 2, 8)
    return {"layer.0": values}


def big_cache() -> dict[str, torch.Tensor]:
    """One layer whose 512-token chunk is 16 MiB (the test daemons' slab is 8 MiB)."""
    return {"layer.0": torch.zeros(2, 40, 16, 64, 128, dtype=torch.bfloat16)}


def save(
    worker: ConnectorWorker, keys: Sequence[bytes], blocks: tuple[tuple[int, ...], ...]
) -> None:
    worker.bind(StepPlan(saves=[SaveJob("r", 0, (tuple(keys),), (None,), blocks)]))
    for layer in worker.layers:
        worker.save_layer(layer)
    worker.finish()
    worker.flush()
    worker.unbind()


def test_a_chunk_larger_than_the_daemons_slab_fails_registration_naming_both_sizes(
    daemon: DaemonProcess,
) -> None:
    worker = ConnectorWorker(
        ConnectorSettings(endpoint=daemon.endpoint), ChunkGeometry(16, 512), rank=0
    )
    try:
        with pytest.raises(ChunkTooLarge) as raised:
            worker.register(big_cache(), num_blocks=40)
        message = str(raised.value)
        assert str(16 << 20) in message and str(8 << 20) in message
        assert "chunk_tokens" in message and "--slab-bytes" in message
        assert "(to at most 256)" in message  # 8 MiB holds 256 tokens of this model
    finally:
        worker.close()


def test_a_daemon_reached_after_registration_is_checked_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = "late-daemon"
    endpoint = CacheConfig(name=name, runtime_dir=str(tmp_path / "run")).endpoint
    settings = ConnectorSettings(endpoint=endpoint, retry_after_s=0.01)
    worker = ConnectorWorker(settings, ChunkGeometry(16, 512), rank=0)
    worker.register(big_cache(), num_blocks=40)  # no daemon yet: nothing to compare with
    node = start_daemon(tmp_path, name=name)
    try:
        time.sleep(0.02)  # past retry_after_s of the failed first connect
        keys = chain_keys(Namespace("m"), list(range(512)), 512)
        with caplog.at_level(logging.ERROR, logger="shoal.kvcache.connector"):
            save(worker, keys, (tuple(range(32)),))
            time.sleep(0.02)
            save(worker, keys, (tuple(range(32)),))
        assert worker.stats["oversized"] == 2  # refused at each connection
        assert worker.stats["saved_chunks"] == 0
        errors = [r for r in caplog.records if "--slab-bytes" in r.getMessage()]
        assert len(errors) == 1  # logged once, counted every time
        with node.client() as c:
            assert c.lookup(keys) == 0
    finally:
        worker.close()
        node.stop()


def test_a_refused_save_is_counted_and_skipped_not_treated_as_a_dead_daemon(
    daemon: DaemonProcess,
) -> None:
    def lying_client() -> CacheClient:
        # The daemon's slab is 8 MiB; pretend it is larger so the save reaches the daemon
        # and is refused there (bad_request), as it would be by any other invalid request.
        client = CacheClient(daemon.endpoint, timeout_s=5)
        client.max_block_bytes = 1 << 40
        return client

    settings = ConnectorSettings(endpoint=daemon.endpoint, retry_after_s=60)
    worker = ConnectorWorker(settings, ChunkGeometry(16, 512), 0, client_factory=lying_client)
    try:
        worker.register(big_cache(), num_blocks=40)
        keys = chain_keys(Namespace("m"), list(range(512)), 512)
        save(worker, keys, (tuple(range(32)),))
        stats = worker.stats
        assert stats["rejected"] == 1
        assert stats["daemon_failures"] == 0
        assert worker.down_until == 0.0  # no back-off: the daemon is fine
        # The next step's saves and loads still talk to the daemon (one is refused again).
        save(worker, keys, (tuple(range(32)),))
        assert worker.stats["rejected"] == 2
        assert worker.stats["daemon_failures"] == 0
    finally:
        worker.close()


class FakeRegistrar:
    """Records cudaHostRegister/Unregister calls (there is no GPU here)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.live: set[int] = set()

    def register(self, address: int, nbytes: int) -> bool:
        assert address not in self.live
        self.calls.append(("register", address))
        self.live.add(address)
        return True

    def unregister(self, address: int) -> None:
        assert address in self.live, "unregistering an address that is not registered"
        self.calls.append(("unregister", address))
        self.live.remove(address)


def test_pinned_arenas_follow_a_daemon_restart_and_saves_land_in_the_new_arena(
    tmp_path: Path,
) -> None:
    name = "restarted"
    node = start_daemon(tmp_path, name=name)
    registrar = FakeRegistrar()
    settings = ConnectorSettings(endpoint=node.endpoint, retry_after_s=0.01, io_timeout_s=1)
    worker = ConnectorWorker(settings, GEOMETRY, 0, registrar=registrar)
    cache = small_cache()
    try:
        worker.register(cache, num_blocks=32)
        first = chain_keys(Namespace("m"), list(range(32)), 32)
        save(worker, first, ((2, 3),))
        assert [c[0] for c in registrar.calls] == ["register"]
        a = registrar.calls[0][1]

        node.stop()
        node = start_daemon(tmp_path, name=name)
        second = chain_keys(Namespace("m"), list(range(100, 132)), 32)
        deadline = time.monotonic() + 10
        while worker.stats["saved_chunks"] < 2 and time.monotonic() < deadline:
            save(worker, second, ((4, 5),))  # the first try may meet the dead session
            time.sleep(0.02)
        assert worker.stats["saved_chunks"] == 2
        # A was unregistered before its mapping went, then the new arena B registered.
        assert registrar.calls[:2] == [("register", a), ("unregister", a)]
        assert registrar.calls[2][0] == "register"
        b = registrar.calls[2][1]
        assert b != a

        # What was saved after the restart is the engine's bytes, in the new arena (a
        # worker still writing through the old mapping would commit the new arena's zeros).
        blocks = worker.layers["layer.0"].blocks
        expected = blocks[torch.tensor([4, 5])].contiguous().view(torch.uint8).numpy()
        with node.client() as c:
            view = c.get(second)[0]
            assert view is not None and view.verify()
            assert bytes(view.buffer) == expected.tobytes()
            c.release([view])
    finally:
        calls_before_close = len(registrar.calls)
        worker.close()
        node.stop()
    closing = registrar.calls[calls_before_close:]
    assert ("unregister", a) not in closing  # never the dropped mapping's address
    assert registrar.live == set()  # every current mapping unregistered exactly once


def test_after_the_daemon_is_killed_the_next_step_does_not_wait_for_the_io_timeout(
    tmp_path: Path,
) -> None:
    node = start_daemon(tmp_path)
    settings = ConnectorSettings(endpoint=node.endpoint, io_timeout_s=5, retry_after_s=60)
    worker = ConnectorWorker(settings, GEOMETRY, 0)
    try:
        worker.register(small_cache(), num_blocks=32)  # connects the load client
        saved = chain_keys(Namespace("m"), list(range(32)), 32)
        save(worker, saved, ((2, 3),))  # connects the save client
        assert worker.stats["saved_chunks"] == 1
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)

        # One engine step with a load (load client) and a save (save client).
        fresh = chain_keys(Namespace("m"), list(range(100, 132)), 32)
        worker.bind(
            StepPlan(
                loads=[LoadJob("a", 0, (tuple(saved),), ((6, 7),))],
                saves=[SaveJob("b", 0, (tuple(fresh),), (None,), ((4, 5),))],
            )
        )
        started = time.monotonic()
        worker.start_loads()
        loaded = time.monotonic()
        for layer in worker.layers:
            worker.wait_layer(layer)
            worker.save_layer(layer)
        worker.finish()
        stepped = time.monotonic()
        worker.flush()
        worker.unbind()
        assert loaded - started < 0.5, f"the load waited {loaded - started:.3f}s"
        assert stepped - loaded < 0.5, f"the save waited {stepped - loaded:.3f}s"
        assert worker.take_load_errors() == {6, 7}, "vLLM recomputes what was not loaded"
        stats = worker.stats
        assert stats["daemon_failures"] == 2  # each client found out on its own
        assert (stats["saved_chunks"], stats["save_skipped"]) == (1, 1)
    finally:
        worker.close()
        if node.process.poll() is None:
            node.stop()
