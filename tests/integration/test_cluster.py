"""Several real daemon processes on loopback, each with its own cluster port."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from kvcache.client import CacheClient
from kvcache.cluster.messages import VERSION
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    DaemonProcess,
    cluster_ports,
    members,
    start_cluster,
    start_daemon,
    stop_all,
    wait_until,
)

pytestmark = pytest.mark.integration

NS = Namespace(model="cluster-test@1")
BLOCK = 64 << 10


def payload(key: bytes, nbytes: int = BLOCK) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    nodes = start_cluster(tmp_path, 3)
    yield nodes
    stop_all(nodes)


def test_a_block_stored_on_a_is_visible_on_b_and_c_and_fetched_bit_identically(
    trio: list[DaemonProcess],
) -> None:
    a, b, c = trio
    assert wait_until(lambda: members(a) == {"node1", "node2"}, timeout=10)
    keys = chain_keys(NS, list(range(16 * 8)), 16)
    blocks = [payload(k) for k in keys]
    with a.client() as writer:
        assert writer.put(keys, blocks).complete
    for node in (b, c):
        with node.client() as reader:
            assert wait_until(lambda r=reader: r.locate(keys).remote_length == 8)
            found = reader.locate(keys)
            assert found.length == 0
            assert found.runs[0][0] == "node0" and found.runs[0][2] == 8
    with b.client() as reader:
        assert reader.fetch(keys) == 8
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        assert reader.get_into(keys, outs) == 8
        for got, want in zip(outs, blocks, strict=True):
            assert np.array_equal(got, want)
    # B now holds the blocks too, and C learns that.
    with c.client() as other:
        assert wait_until(lambda: {r[0] for r in other.locate(keys).runs} == {"node0", "node1"})


def status(node: DaemonProcess) -> dict[str, object]:
    with node.client(heartbeat=False) as c:
        return c.cluster_status()


def test_kill_9_of_a_holder_turns_into_misses_and_its_entries_are_dropped(
    trio: list[DaemonProcess],
) -> None:
    a, b, c = trio
    assert wait_until(lambda: members(a) == {"node1", "node2"}, timeout=10)
    keys = chain_keys(NS, list(range(16 * 16)), 16)
    with a.client() as writer:
        writer.put(keys, [payload(k) for k in keys])
    with b.client() as reader:
        assert wait_until(lambda: reader.locate(keys).remote_length == 16)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=5)
        started = time.monotonic()
        # Fetching from the dead holder fails fast into misses, never an error.
        assert reader.fetch(keys) == 0
        assert time.monotonic() - started < 2.0
        # Within the member timeout (1 s here) B and C forget A's blocks.
        assert wait_until(lambda: reader.locate(keys).remote_length == 0, timeout=3)
    assert wait_until(lambda: members(c) == {"node1"}, timeout=3)


def test_a_restarted_member_comes_back_with_a_new_epoch_and_everyone_converges(
    tmp_path: Path,
) -> None:
    nodes = start_cluster(tmp_path, 3)
    a, b, c = nodes
    try:
        assert wait_until(lambda: members(b) == {"node0", "node2"}, timeout=10)
        first_epoch = next(m["epoch"] for m in status(b)["members"] if m["node"] == "node0")  # type: ignore[attr-defined,index]
        old = chain_keys(NS, list(range(16 * 4)), 16)
        with a.client() as writer:
            writer.put(old, [payload(k) for k in old])
        with b.client() as reader:
            assert wait_until(lambda: reader.locate(old).remote_length == 4)
        argv = list(a.process.args)  # type: ignore[arg-type]
        a.process.send_signal(signal.SIGKILL)
        a.process.wait(timeout=5)
        restarted = start_daemon(tmp_path, **_settings_from_argv(argv))
        nodes[0] = restarted
        new = chain_keys(NS, list(range(1000, 1000 + 16 * 3)), 16)
        with restarted.client() as writer:
            writer.put(new, [payload(k) for k in new])
        for node in (b, c):
            with node.client() as reader:
                assert wait_until(lambda r=reader: r.locate(new).remote_length == 3, timeout=5)
                assert reader.locate(old).remote_length == 0  # the old epoch's blocks are gone
        epoch = next(m["epoch"] for m in status(b)["members"] if m["node"] == "node0")  # type: ignore[attr-defined,index]
        assert epoch > first_epoch
    finally:
        stop_all(nodes)


def _settings_from_argv(argv: list[str]) -> dict[str, object]:
    """The --flag value pairs a daemon was started with (to restart it identically)."""
    flags = argv[argv.index("serve") + 1 :]
    return {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}


def test_a_paused_subscriber_catches_up_by_snapshot(tmp_path: Path) -> None:
    a, b = start_cluster(tmp_path, 2, cluster_member_timeout_s=30, cluster_heartbeat_s=0.2)
    try:
        assert wait_until(lambda: members(b) == {"node0"}, timeout=10)
        b.process.send_signal(signal.SIGSTOP)
        keys = chain_keys(NS, list(range(16 * 600)), 16)
        churn = chain_keys(NS, list(range(10**6, 10**6 + 16 * 64)), 16)
        block = np.zeros(4096, np.uint8)
        try:
            with a.client() as writer:
                # 12,000 batches of 64 events: past A's replay log, its per-subscriber
                # queue (1,000 messages) and the socket buffers, so B must lose some.
                for _ in range(6000):
                    writer.put(churn, [block] * len(churn))
                    writer.delete(churn)
                writer.put(keys, [block] * len(keys))
                writer.delete(keys[:100])
        finally:
            b.process.send_signal(signal.SIGCONT)
        with b.client() as reader:
            assert wait_until(lambda: reader.locate(keys[100:]).remote_length == 500, timeout=20)
            assert reader.locate(keys[:100]).remote_length == 0
            node0 = next(m for m in reader.cluster_status()["members"] if m["node"] == "node0")
            assert node0["num_blocks"] == 500
            assert node0["num_syncs"] >= 1
    finally:
        stop_all([a, b])


def test_concurrent_fetches_of_the_same_blocks_are_coalesced(tmp_path: Path) -> None:
    a, b = start_cluster(tmp_path, 2, cluster_fetch_timeout_s=5)
    keys = chain_keys(NS, list(range(16 * 32)), 16)
    readers: list[CacheClient] = []
    try:
        with a.client() as writer:
            writer.put(keys, [payload(k) for k in keys])
        readers = [b.client() for _ in range(4)]
        assert wait_until(lambda: readers[0].locate(keys).remote_length == 32)
        # A is paused, so all four fetches are in flight on B at the same time.
        a.process.send_signal(signal.SIGSTOP)
        try:
            ids = [r._send(r._fetch_flow(keys).send(None)) for r in readers]
            time.sleep(0.3)
        finally:
            a.process.send_signal(signal.SIGCONT)
        lengths = [r._await(i)["length"] for r, i in zip(readers, ids, strict=True)]
        assert lengths == [32] * 4
        assert status(a)["served_blocks"] == 32, "each block crossed the network once"
    finally:
        for r in readers:
            r.close()
        stop_all([a, b])


def _raw_dealer(address: str, **curve: bytes) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in curve.items():
        setattr(sock, option, value)
    sock.connect(f"tcp://{address}")
    return sock


def test_garbage_on_cluster_sockets_is_counted_and_dropped(tmp_path: Path) -> None:
    rogue_port = cluster_ports(1)[0]
    rogue_pub = zmq.Context.instance().socket(zmq.PUB)
    rogue_pub.setsockopt(zmq.LINGER, 0)
    rogue_pub.bind(f"tcp://127.0.0.1:{rogue_port + 1}")
    a, b = start_cluster(tmp_path, 2, extra_peers=f"127.0.0.1:{rogue_port}")
    try:
        assert wait_until(lambda: members(b) == {"node0"}, timeout=10)
        address_a = status(a)["address"]
        dealer = _raw_dealer(str(address_a))
        for frame in (b"\xc1", b"not msgpack", msgpack.packb({"v": 99, "op": "status", "id": 1}),
                      msgpack.packb({"v": VERSION, "op": "fetch", "id": 2, "node": "x", "keys": b"123"}),
                      msgpack.packb({"v": VERSION, "op": "nope", "id": 3})):  # fmt: skip
            dealer.send(frame)
            assert dealer.poll(2000), "the daemon answers bad requests with an error"
            assert msgpack.unpackb(dealer.recv())["ok"] is False
        dealer.send_multipart([b"two", b"frames"])
        for frames in ([b"shoal.ev", b"\x00garbage"], [b"shoal.hb", msgpack.packb({"v": 2})],
                       [b"shoal.ev"], [b"shoal.hb", msgpack.packb({"v": 1, "t": "heartbeat"})]):  # fmt: skip
            for _ in range(20):
                rogue_pub.send_multipart(frames)
            time.sleep(0.02)
        dealer.close()
        keys = chain_keys(NS, list(range(16 * 2)), 16)
        with a.client() as writer:
            writer.put(keys, [payload(k) for k in keys])
        with b.client() as reader:
            assert wait_until(lambda: reader.locate(keys).remote_length == 2)
        assert a.process.poll() is None and b.process.poll() is None
        assert status(b)["dropped"] > 0  # type: ignore[operator]
    finally:
        rogue_pub.close(linger=0)
        stop_all([a, b])


def test_curve_keys_admit_members_and_refuse_an_unauthenticated_peer(tmp_path: Path) -> None:
    keys_dir = tmp_path / "curve"
    keys_dir.mkdir()
    zmq.auth.create_certificates(str(keys_dir), "cluster")
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    zmq.auth.create_certificates(str(other_dir), "cluster")
    ports = cluster_ports(3)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    common = {"cluster_host": "127.0.0.1", "cluster_peers": peers, "cluster_heartbeat_s": 0.2,
              "cluster_member_timeout_s": 1.0}  # fmt: skip
    a = start_daemon(tmp_path, cluster_port=ports[0], cluster_node="a",
                     cluster_curve_dir=str(keys_dir), **common)  # fmt: skip
    b = start_daemon(tmp_path, cluster_port=ports[1], cluster_node="b",
                     cluster_curve_dir=str(keys_dir), **common)  # fmt: skip
    rogue = start_daemon(tmp_path, cluster_port=ports[2], cluster_node="rogue",
                         cluster_curve_dir=str(other_dir), **common)  # fmt: skip
    try:
        assert wait_until(lambda: members(a) == {"b"}, timeout=10)
        assert wait_until(lambda: members(b) == {"a"}, timeout=10)
        time.sleep(1.0)
        assert members(rogue) == set(), "a peer with other keys hears nothing"
        assert "rogue" not in members(a)
        for curve in ({}, _curve_client(other_dir)):
            dealer = _raw_dealer(f"127.0.0.1:{ports[0]}", **curve)
            dealer.send(msgpack.packb({"v": VERSION, "op": "status", "id": 1}))
            assert not dealer.poll(1000), "an unauthenticated request gets no answer"
            dealer.close()
        dealer = _raw_dealer(f"127.0.0.1:{ports[0]}", **_curve_client(keys_dir))
        dealer.send(msgpack.packb({"v": VERSION, "op": "status", "id": 1}))
        assert dealer.poll(5000)
        assert msgpack.unpackb(dealer.recv())["node"] == "a"
        dealer.close()
    finally:
        stop_all([a, b, rogue])


def _curve_client(directory: Path) -> dict[str, bytes]:
    public, secret = zmq.auth.load_certificate(str(directory / "cluster.key_secret"))
    assert secret is not None
    return {"curve_publickey": public, "curve_secretkey": secret, "curve_serverkey": public}


def test_drain_hands_hot_blocks_to_peers_then_the_node_leaves(trio: list[DaemonProcess]) -> None:
    a, b, c = trio
    assert wait_until(lambda: members(a) == {"node1", "node2"}, timeout=10)
    keys = chain_keys(NS, list(range(16 * 40)), 16)
    with a.client(role="operator") as writer:
        writer.put(keys, [payload(k) for k in keys])
        assert wait_until(lambda: all(status(n)["index_blocks"] == 40 for n in (b, c)))
        result = writer.drain(timeout_s=30)
        assert sorted(result["peers"]) == ["node1", "node2"]
        assert result["handed_off"] == 40
    assert a.process.wait(timeout=10) == 0, "a drained daemon exits cleanly"
    # Every block now lives on B or C, and both know it; A is gone from their views.
    assert wait_until(lambda: members(b) == {"node2"} and members(c) == {"node1"}, timeout=5)
    with b.client() as reader:
        held_here = reader.lookup(keys)
        assert wait_until(lambda: reader.locate(keys).remote_length == 40)
        assert reader.fetch(keys) == 40
        outs = [np.zeros(BLOCK, np.uint8) for _ in keys]
        assert reader.get_into(keys, outs) == 40
        assert all(np.array_equal(o, payload(k)) for o, k in zip(outs, keys, strict=True))
    assert 0 < held_here < 40, "the blocks were shared out between the two peers"
