"""The daemon as engines see it: real processes, real ipc sockets, real shared memory."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from kvcache.client import AsyncCacheClient, CacheClient, Reservation
from kvcache.errors import CacheUnavailable
from kvcache.keys import Namespace, chain_keys
from kvcache.messages import VERSION as V
from tests.integration.conftest import (
    ENV,
    DaemonProcess,
    free_port,
    run_client,
    start_daemon,
    wait_until,
)

pytestmark = pytest.mark.integration

NS = Namespace(model="test-model@1")
BLOCK = 256 << 10


def payload(key: bytes, nbytes: int = BLOCK) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def keys_for(start: int, num_blocks: int) -> list[bytes]:
    return list(chain_keys(NS, list(range(start, start + 16 * num_blocks)), 16))


WRITER = """
import sys, numpy as np
from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
keys = chain_keys(Namespace(model="test-model@1"), list(range(16 * 40)), 16)
def payload(key):
    return np.random.default_rng(int.from_bytes(key[:8], "little")).integers(0, 256, 256 << 10, dtype=np.uint8)
with CacheClient(sys.argv[1]) as client:
    result = client.put(keys, [payload(k) for k in keys])
    print(result.stored, result.existed, result.no_space)
"""


def test_a_block_written_by_one_process_is_read_bit_identically_by_another(
    daemon: DaemonProcess,
) -> None:
    with run_client(WRITER, daemon.endpoint) as writer:
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert out.split() == ["40", "0", "0"]

    keys = keys_for(0, 40)
    with daemon.client() as reader:
        assert reader.lookup([*keys, *keys_for(10_000, 3)]) == 40
        outs = [np.empty(BLOCK, dtype=np.uint8) for _ in keys]
        assert reader.get_into(keys, outs) == 40
        for key, out in zip(keys, outs, strict=True):
            np.testing.assert_array_equal(out, payload(key))
        stats = reader.stats()
    assert stats["num_leases"] == 0, "get_into hands its leases back"
    assert stats["tiers"][0]["hits"] == 40


def test_a_second_writer_of_the_same_prefix_writes_nothing(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 8)
    with daemon.client() as first, daemon.client() as second:
        assert first.put(keys, [payload(k) for k in keys]).stored == 8
        again = second.put(keys, [payload(k) for k in keys])
    assert (again.stored, again.existed) == (0, 8)


LEASE_HOLDER = """
import sys, time
from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
keys = chain_keys(Namespace(model="test-model@1"), list(range(16 * 40)), 16)
client = CacheClient(sys.argv[1])
blocks = client.get(keys)
print(sum(b is not None for b in blocks), flush=True)
time.sleep(600)
"""


def test_kill_9_of_a_client_holding_leases_releases_them(daemon: DaemonProcess) -> None:
    with run_client(WRITER, daemon.endpoint) as writer:
        writer.communicate(timeout=60)
    assert writer.returncode == 0
    with run_client(LEASE_HOLDER, daemon.endpoint) as holder, daemon.client() as observer:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "40"
        assert observer.stats()["num_leases"] == 40
        # Deleting a leased block hides it but keeps its bytes for the reader...
        assert observer.delete(keys_for(0, 1)) == 1
        assert observer.lookup(keys_for(0, 1)) == 0
        assert observer.stats()["num_leases"] == 40
        assert observer.stats()["tiers"][0]["used_bytes"] == 40 * BLOCK
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # ...and a dead reader's leases are reclaimed promptly (pidfd), not after a TTL,
        # which also frees the deleted block's slot.
        assert wait_until(lambda: observer.stats()["num_leases"] == 0, timeout=3)
        stats = observer.stats()
        assert stats["num_sessions"] == 1
        assert stats["tiers"][0]["used_bytes"] == 39 * BLOCK


HALF_WRITER = """
import sys, time
from kvcache.client import CacheClient, Reservation
from kvcache.keys import Namespace, chain_keys
keys = chain_keys(Namespace(model="test-model@1"), list(range(16 * 4)), 16)
client = CacheClient(sys.argv[1])
slots = client.reserve(keys, [256 << 10] * 4)
assert all(isinstance(s, Reservation) for s in slots), slots
slots[0].buffer[: 128 << 10] = b"\\xab" * (128 << 10)   # half of one block, then die
print("reserved", flush=True)
time.sleep(600)
"""


def test_kill_9_mid_write_never_serves_half_written_bytes(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 4)
    with run_client(HALF_WRITER, daemon.endpoint) as writer, daemon.client() as observer:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "reserved"
        assert observer.stats()["num_reservations"] == 4
        assert observer.lookup(keys) == 0, "reserved blocks are invisible until committed"
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        assert wait_until(lambda: observer.stats()["num_reservations"] == 0, timeout=3)
        assert observer.lookup(keys) == 0
        # The slots are free again and the keys can be written properly.
        assert observer.put(keys, [payload(k) for k in keys]).stored == 4
        outs = [np.empty(BLOCK, dtype=np.uint8) for _ in keys]
        assert observer.get_into(keys, outs) == 4
        np.testing.assert_array_equal(outs[0], payload(keys[0]))


def test_an_uncommitted_reservation_expires_even_if_its_writer_lives(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path, reservation_ttl_s=0.3)
    try:
        keys = keys_for(0, 2)
        with handle.client() as client:
            slots = client.reserve(keys, [BLOCK, BLOCK])
            assert all(isinstance(s, Reservation) for s in slots)
            assert wait_until(lambda: client.stats()["num_reservations"] == 0, timeout=3)
            assert client.commit([s for s in slots if isinstance(s, Reservation)]) == 0
            assert client.lookup(keys) == 0
    finally:
        assert handle.stop() == 0


def test_a_corrupted_block_is_a_miss_never_wrong_data(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 3)
    with daemon.client() as writer, daemon.client() as reader:
        slots = writer.reserve(keys, [BLOCK] * 3)
        assert all(isinstance(s, Reservation) for s in slots)
        for slot in slots:
            assert isinstance(slot, Reservation)
            slot.buffer[:] = payload(slot.key)
        assert writer.commit(slots) == 3  # type: ignore[arg-type]
        slots[1].buffer[100:108] = b"garbage!"  # type: ignore[union-attr]  # a buggy writer
        outs = [np.empty(BLOCK, dtype=np.uint8) for _ in keys]
        assert reader.get_into(keys, outs) == 1, "served up to the corrupt block, not past it"
        np.testing.assert_array_equal(outs[0], payload(keys[0]))
        # The reader reported the bad block: it is no longer advertised to anyone.
        assert writer.lookup(keys) == 1


def _raw_request(
    endpoint: str, frames: list[bytes], sock: zmq.Socket[bytes] | None = None
) -> dict[str, Any]:
    """One request over ``sock`` (a session is bound to its connection), or a new socket."""
    own = sock is None
    if sock is None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "the daemon must answer bad input, not drop it"
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert isinstance(reply, dict)
        return reply
    finally:
        if own:
            sock.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xc1\xff not msgpack"], "malformed"),
        ([msgpack.packb([1, 2, 3])], "malformed"),
        ([msgpack.packb({"v": 99, "id": 7, "op": "lookup"})], "version"),
        ([msgpack.packb({"v": V, "id": 7, "op": "explode", "session": 1, "epoch": 1})], "unknown_op"),
        ([msgpack.packb({"v": V, "id": 7, "op": "lookup", "session": 1, "epoch": 1})], "malformed"),
        ([msgpack.packb({"v": V, "id": 7, "op": "lookup", "session": 1, "epoch": 1, "keys": b"x" * 17})], "malformed"),
        ([msgpack.packb({"v": V, "id": 7, "op": "lookup", "session": 424242, "epoch": 1, "keys": b""})], "unknown_session"),
        ([msgpack.packb({"v": V, "id": 7, "op": "lookup", "session": 1, "epoch": 1, "keys": b"k" * (2 << 20)})], "too_large"),
        ([b"part one", b"part two"], "malformed"),
    ],
    ids=["garbage", "not-a-map", "version", "unknown-op", "missing-field", "ragged-keys",
         "unknown-session", "oversized", "multipart"],
)  # fmt: skip
def test_bad_messages_get_an_error_reply_and_the_daemon_stays_up(
    daemon: DaemonProcess, frames: list[bytes], code: str
) -> None:
    reply = _raw_request(daemon.endpoint, frames)
    assert reply["ok"] is False
    assert reply["code"] == code
    with daemon.client() as client:
        keys = keys_for(0, 1)
        assert client.put(keys, [payload(keys[0])]).stored == 1


def test_a_bad_block_size_is_rejected_with_a_reason(daemon: DaemonProcess) -> None:
    from kvcache.errors import RequestRejected

    with daemon.client() as client, pytest.raises(RequestRejected, match="bad_request.*outside"):
        client.reserve(keys_for(0, 1), [64 << 20])


def test_a_full_arena_is_back_pressure_not_a_crash(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path, shm_bytes="8MiB", dram_bytes=0)
    try:
        with handle.client() as holder, handle.client() as writer:
            first = keys_for(0, 32)  # 32 x 256 KiB = the whole arena
            assert holder.put(first, [payload(k) for k in first]).stored == 32
            leases = holder.get(first)
            assert all(lease is not None for lease in leases)
            more = keys_for(100_000, 4)
            result = writer.put(more, [payload(k) for k in more])
            assert (result.stored, result.no_space) == (0, 4)
            holder.release([lease for lease in leases if lease is not None])
            assert holder.stats()["num_leases"] == 0  # release is one-way: order it first
            # Unpinned, the old blocks are evictable again.
            assert writer.put(more, [payload(k) for k in more]).stored == 4
    finally:
        assert handle.stop() == 0


def test_blocks_spill_through_dram_and_ssd_and_come_back_intact(tmp_path: Path) -> None:
    handle = start_daemon(
        tmp_path,
        shm_bytes="8MiB",
        dram_bytes="8MiB",
        ssd_dir=str(tmp_path / "ssd"),
        ssd_bytes="32MiB",
    )
    try:
        keys = keys_for(0, 96)  # 24 MiB: a third fits in SHM, a third in DRAM, a third on SSD
        with handle.client() as client:
            for start in range(0, 96, 16):
                batch = keys[start : start + 16]
                parent = keys[start - 1] if start else None
                assert client.put(batch, [payload(k) for k in batch], parent=parent).stored == 16
            tiers = {t["tier"]: t for t in client.stats()["tiers"]}
            assert tiers["ssd"]["num_blocks"] > 0 and tiers["dram"]["num_blocks"] > 0
            assert client.lookup(keys) == 96
            outs = [np.empty(BLOCK, dtype=np.uint8) for _ in range(16)]
            for start in range(0, 96, 16):
                batch = keys[start : start + 16]
                assert client.get_into(batch, outs) == 16
                for key, out in zip(batch, outs, strict=True):
                    np.testing.assert_array_equal(out, payload(key))
            tiers = {t["tier"]: t for t in client.stats()["tiers"]}
            assert tiers["ssd"]["hits"] > 0, "the oldest blocks came back from the SSD tier"
            assert sum(t["hits"] for t in tiers.values()) == 96
    finally:
        assert handle.stop() == 0
    assert not (tmp_path / "ssd" / f"shoal-{handle.config.name}.spill").exists()


def test_a_crashed_daemon_leaves_an_arena_the_next_one_replaces(tmp_path: Path) -> None:
    first = start_daemon(tmp_path)
    client = first.client()
    keys = keys_for(0, 2)
    client.put(keys, [payload(k) for k in keys])
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    assert first.config.arena_path.exists(), "kill -9 leaves the arena behind"
    with pytest.raises(CacheUnavailable):
        client.timeout_s = 1
        client.lookup(keys)
    second = start_daemon(tmp_path, name=first.config.name)
    try:
        assert "removing stale arena" in second.log()
        # The old client reconnects by itself and sees the new, empty daemon.
        assert client.lookup(keys) == 0
        assert client.put(keys, [payload(k) for k in keys]).stored == 2
        client.close()
    finally:
        assert second.stop() == 0


def test_a_second_daemon_cannot_take_a_live_daemons_name(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="held by a running daemon"):
        start_daemon(tmp_path, name=daemon.config.name)
    with daemon.client() as client:
        assert client.lookup(keys_for(0, 1)) == 0


def test_the_arena_and_socket_are_private_to_the_daemons_user(daemon: DaemonProcess) -> None:
    assert daemon.config.arena_path.stat().st_mode & 0o777 == 0o600
    assert daemon.config.socket_path.stat().st_mode & 0o777 == 0o600
    assert Path(daemon.config.runtime_dir).stat().st_mode & 0o777 == 0o700


def test_prometheus_endpoint_exports_shoal_metrics(tmp_path: Path) -> None:
    port = free_port()
    handle = start_daemon(tmp_path, metrics_port=port)
    try:
        keys = keys_for(0, 4)
        with handle.client() as client:
            client.put(keys, [payload(k) for k in keys])
            client.get_into(keys, [np.empty(BLOCK, dtype=np.uint8) for _ in keys])
            client.lookup(keys_for(50_000, 1))

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        assert wait_until(lambda: 'shoal_kvcache_hits_total{tier="shm"} 4.0' in scrape(), timeout=3)
        text = scrape()
        for name in (
            "shoal_kvcache_bytes_in_total", "shoal_kvcache_evictions_total",
            "shoal_kvcache_leases", "shoal_kvcache_fragmentation_ratio",
            "shoal_kvcache_request_seconds_bucket", "shoal_kvcache_misses_total",
        ):  # fmt: skip
            assert name in text
    finally:
        assert handle.stop() == 0


def test_the_async_client_speaks_the_same_protocol(daemon: DaemonProcess) -> None:
    async def scenario() -> tuple[int, int, int]:
        client = await AsyncCacheClient.connect(daemon.endpoint)
        keys = keys_for(0, 6)
        result = await client.put(keys, [payload(k) for k in keys])
        outs = [np.empty(BLOCK, dtype=np.uint8) for _ in keys]
        served = await client.get_into(keys, outs)
        for key, out in zip(keys, outs, strict=True):
            np.testing.assert_array_equal(out, payload(key))
        found = await client.lookup(keys)
        await client.close()
        return result.stored, served, found

    assert asyncio.run(scenario()) == (6, 6, 6)


def test_a_client_without_a_daemon_fails_fast_and_clearly(tmp_path: Path) -> None:
    with pytest.raises(CacheUnavailable, match="is `shoal cache serve` running"):
        CacheClient(f"ipc://{tmp_path}/nothing.sock")


def test_cli_serve_demo_runs_two_processes_and_stats_reads_the_daemon(tmp_path: Path) -> None:
    name = f"demo{os.getpid()}"
    common = ["--name", name, "--runtime-dir", str(tmp_path / "run"), "--metrics-port", "0"]
    serve = subprocess.Popen(
        [sys.executable, "-m", "shoal", "cache", "serve", "--demo", "--shm-bytes", "64MiB",
         "--dram-bytes", "64MiB", "--log-format", "text", *common],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert serve.stdout is not None
    lines = []
    for line in serve.stdout:
        lines.append(line)
        if "--- demo " in line and "against" not in line:
            break
    output = "".join(lines)
    assert "demo passed" in output, output
    assert "stored 64" in output and "bytes identical: True" in output, output
    stats = subprocess.run(
        [sys.executable, "-m", "shoal", "cache", "stats", "--json", *common],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert stats.returncode == 0, stats.stderr
    assert '"hits": 64' in stats.stdout
    serve.send_signal(signal.SIGTERM)
    serve.stdout.close()
    assert serve.wait(timeout=10) == 0
    unreachable = subprocess.run(
        [sys.executable, "-m", "shoal", "cache", "stats", *common],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert unreachable.returncode == 3
    assert "shoal cache serve" in unreachable.stderr


def test_a_pipelined_put_that_runs_out_of_space_aborts_the_rest_of_its_chain(
    tmp_path: Path,
) -> None:
    handle = start_daemon(tmp_path, shm_bytes="8MiB", dram_bytes=0)
    try:
        with handle.client() as holder, handle.client() as writer:
            pinned = keys_for(0, 24)  # 6 of the 8 MiB, leased below
            assert holder.put(pinned, [payload(k) for k in pinned]).stored == 24
            leases = holder.get(pinned)
            writer.pipeline_bytes = 1 << 20  # 4 blocks per piece: the put spans 4 pieces
            chain = keys_for(100_000, 16)
            result = writer.put(chain, [payload(k) for k in chain])
            assert result.stored == 8 and result.no_space == 8, result
            stats = writer.stats()
            assert stats["num_reservations"] == 0, "reservations past the gap were aborted"
            assert writer.lookup(chain) == 8
            outs = [np.empty(BLOCK, dtype=np.uint8) for _ in chain]
            assert writer.get_into(chain, outs) == 8
            for key, out in zip(chain[:8], outs, strict=False):
                np.testing.assert_array_equal(out, payload(key))
            holder.release([lease for lease in leases if lease is not None])
    finally:
        assert handle.stop() == 0


def test_a_one_way_commit_is_visible_to_the_next_request(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 20)
    with daemon.client() as writer, daemon.client() as reader:
        writer.pipeline_bytes = 1 << 20
        result = writer.put(keys, [payload(k) for k in keys], wait=False)
        assert result.stored == 20
        assert writer.lookup(keys) == 20  # ordered after the commits on the same socket
        outs = [np.empty(BLOCK, dtype=np.uint8) for _ in keys]
        assert reader.get_into(keys, outs) == 20
        for key, out in zip(keys, outs, strict=True):
            np.testing.assert_array_equal(out, payload(key))


def test_bad_values_past_the_decoder_get_an_error_and_the_daemon_stays_up(
    daemon: DaemonProcess,
) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        hello = _raw_request(
            daemon.endpoint,
            [msgpack.packb({"v": V, "id": 1, "op": "hello", "session": 0, "epoch": 0,
                            "pid": 2**40, "pid_ns": os.stat("/proc/self/ns/pid").st_ino,
                            "namespace": "", "client": "fuzz", "role": "engine"})],
            sock,
        )  # fmt: skip
        assert hello["ok"] is True, "an unwatchable pid falls back to the session TTL"
        key = keys_for(0, 1)[0]
        self_parent = _raw_request(
            daemon.endpoint,
            [msgpack.packb({"v": V, "id": 2, "op": "reserve", "session": hello["session"],
                            "epoch": hello["epoch"], "keys": key, "sizes": [BLOCK],
                            "parent": key})],
            sock,
        )  # fmt: skip
    finally:
        sock.close()
    assert (self_parent["ok"], self_parent["code"]) == (False, "bad_request")
    with daemon.client() as client:
        assert client.put([key], [payload(key)]).stored == 1
    assert daemon.process.poll() is None


def test_a_put_that_fails_midway_leaves_no_reservations_behind(daemon: DaemonProcess) -> None:
    from kvcache.errors import RequestRejected

    keys = keys_for(0, 8)
    payloads: list[np.ndarray] = [payload(k) for k in keys]
    payloads[6] = np.zeros(64 << 20, dtype=np.uint8)  # larger than a slab: rejected
    with daemon.client() as writer, daemon.client() as observer:
        writer.pipeline_bytes = 1 << 20  # the bad block is in a later piece
        with pytest.raises(RequestRejected, match="outside"):
            writer.put(keys, payloads)
        assert wait_until(lambda: observer.stats()["num_reservations"] == 0, timeout=3)
        # The writer recovers with a new session and the keys are free to store.
        assert writer.put(keys[:4], [payload(k) for k in keys[:4]]).stored == 4
