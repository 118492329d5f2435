"""A read parked on an SSD promotion whose answer fails: the client gets an error reply
and the daemon goes on (a real daemon on its loop thread, real socket, real spill file).

Before, the exception left ``run_completions`` into the loop: the daemon stopped and
every client timed out.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from kvcache.client import CacheClient
from kvcache.config import CacheConfig
from kvcache.daemon import CacheDaemon
from kvcache.errors import RequestRejected
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import wait_until

pytestmark = pytest.mark.integration

NS = Namespace(model="io-failures@1")
BLOCK = 256 << 10


def key(i: int) -> bytes:
    (only,) = chain_keys(NS, list(range(16 * i, 16 * i + 16)), 16)
    return only


def test_a_parked_get_whose_answer_fails_gets_an_error_reply_and_the_daemon_lives_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = CacheConfig(
        name=f"io{id(tmp_path) % 100000}", runtime_dir=str(tmp_path / "run"),
        shm_bytes=2 << 20, slab_bytes=1 << 20, dram_bytes=0,
        ssd_dir=str(tmp_path / "ssd"), ssd_bytes=16 << 20, metrics_port=0,
    )  # fmt: skip
    (tmp_path / "ssd").mkdir()
    daemon = CacheDaemon(config)
    loop = threading.Thread(target=daemon.serve_forever, name="daemon-loop")
    loop.start()
    try:
        with CacheClient(config.endpoint, timeout_s=5) as client:
            for i in range(12):  # SHM holds 8: the first ones spill to the SSD
                assert client.put([key(i)], [np.full(BLOCK, i, dtype=np.uint8)]).stored == 1
            assert wait_until(lambda: client.stats()["tiers"][1]["num_blocks"] >= 4)
            assert wait_until(lambda: daemon._io.num_pending == 0)

            def broken(*args: object) -> object:
                raise RuntimeError("a bug answering a parked get")

            monkeypatch.setattr(daemon, "_leases", broken)
            with pytest.raises(RequestRejected, match="a bug answering a parked get"):
                client.get([key(0)])  # parked on its SSD read; answered when it lands
            monkeypatch.undo()
            assert loop.is_alive(), "the daemon's loop survived"
            assert client.lookup([key(11)]) == 1
            (view,) = client.get([key(1)])  # another parked get: answered normally
            assert view is not None and bytes(view.buffer[:4]) == bytes([1] * 4)
            client.release([view])
    finally:
        daemon.stop()
        loop.join(30)
    assert not loop.is_alive()
