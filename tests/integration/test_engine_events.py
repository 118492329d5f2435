"""Real daemon processes subscribed to vLLM's own ZmqEventPublisher (in this process),
publishing real KVEventBatch objects over real sockets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    ENV,
    DaemonProcess,
    cluster_ports,
    free_port,
    start_daemon,
    stop_all,
    wait_until,
)

kv = pytest.importorskip("vllm.distributed.kv_events")

pytestmark = pytest.mark.integration

NS = Namespace(model="engine-events-test@1")
B = 16  # vLLM block_size, and Shoal chunk_tokens here
TOKENS = list(range(100, 100 + 8 * B))
KEYS = chain_keys(NS, TOKENS, B)


def h(index: int, generation: str = "") -> bytes:
    """vLLM's default external block hash: 32 bytes of sha256."""
    return hashlib.sha256(f"{generation}block {index}".encode()).digest()


def stored(first: int, count: int, generation: str = "") -> Any:
    """BlockStored of blocks ``first .. first+count-1`` of TOKENS' chain."""
    return kv.BlockStored(
        block_hashes=[h(i, generation) for i in range(first, first + count)],
        parent_block_hash=h(first - 1, generation) if first else None,
        token_ids=TOKENS[first * B : (first + count) * B],
        block_size=B,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        group_idx=0,
    )


def batch(*events: Any) -> Any:
    return kv.KVEventBatch(ts=time.time(), events=list(events))


@contextlib.contextmanager
def publisher(port: int, replay_port: int | None = None) -> Iterator[Any]:
    """vLLM's publisher as ``vllm serve --kv-events-config`` builds it (binding tcp://*)."""
    replay = f"tcp://*:{replay_port}" if replay_port else None
    pub = kv.ZmqEventPublisher(0, endpoint=f"tcp://*:{port}", replay_endpoint=replay)
    try:
        yield pub
    finally:
        pub.shutdown()


def drop_in_flight(pub: Any, lost: Any) -> None:
    """A batch the PUB socket lost on the wire (as ZeroMQ does at its high-water mark):
    numbered and kept for replay by the publisher, never delivered to the subscriber."""
    pub._event_queue.join()  # the publisher thread is idle: no seq is being taken
    seq = next(pub._seq_gen)
    pub._buffer.append((seq, msgspec.msgpack.Encoder().encode(lost)))


def engine_settings(port: int, replay_port: int | None = None) -> dict[str, object]:
    settings: dict[str, object] = {
        "engine_events": f"tcp://127.0.0.1:{port}",
        "engine_model": NS.model,
        "engine_chunk_tokens": B,
        "engine_replay_timeout_s": 0.5,
    }
    if replay_port:
        settings["engine_events_replay"] = f"tcp://127.0.0.1:{replay_port}"
    return settings


def engine(node: DaemonProcess) -> dict[str, Any]:
    with node.client(heartbeat=False) as client:
        (status,) = client.cluster_status()["engines"]
        return dict(status)


def gpu(node: DaemonProcess) -> tuple[tuple[str, int], ...]:
    with node.client(heartbeat=False) as client:
        return client.locate(KEYS).gpu


def gpu_upto(node: DaemonProcess) -> int:
    runs = gpu(node)
    return runs[0][1] if runs else 0


def connected(node: DaemonProcess) -> bool:
    return bool(engine(node)["connected"])


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


def test_a_prefix_on_the_engines_gpu_is_visible_here_and_on_a_peer(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    port, replay_port = ports
    cluster = cluster_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in cluster)
    common = {"cluster_host": "127.0.0.1", "cluster_peers": peers, "cluster_heartbeat_s": 0.2,
              "cluster_member_timeout_s": 1.0}  # fmt: skip
    nodes: list[DaemonProcess] = []
    with publisher(port, replay_port) as pub:
        try:
            nodes.append(start_daemon(tmp_path, cluster_port=cluster[0], cluster_node="node0",
                                      **common, **engine_settings(port, replay_port)))  # fmt: skip
            nodes.append(start_daemon(tmp_path, cluster_port=cluster[1], cluster_node="node1",
                                      **common))  # fmt: skip
            a, b = nodes
            assert wait_until(lambda: connected(a))
            pub.publish(batch(stored(0, 4)))
            assert wait_until(lambda: gpu(a) == (("node0/gpu0", 4),))
            assert wait_until(lambda: gpu(b) == (("node0/gpu0", 4),), timeout=5)
            with b.client(heartbeat=False) as client:
                found = client.locate(KEYS)
            assert found.remote_length == 0 and found.runs == (), "a GPU is never fetched from"

            pub.publish(batch(kv.BlockRemoved(block_hashes=[h(2)], medium="GPU")))
            assert wait_until(lambda: gpu_upto(b) == 2)
            assert gpu_upto(a) == 2

            lookup = subprocess.run(
                [sys.executable, "-m", "shoal", "cache", "lookup", "--name", b.config.name,
                 "--runtime-dir", str(b.config.runtime_path), "--model", NS.model,
                 "--chunk-tokens", str(B), "--tokens", ",".join(map(str, TOKENS)), "--json"],
                env=ENV, capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            assert json.loads(lookup.stdout)["gpu"] == [{"engine": "node0/gpu0", "upto": 2}]
            with b.client(heartbeat=False) as client:
                members = {m["node"]: m for m in client.cluster_status()["members"]}
            assert members["node0/gpu0"]["num_blocks"] == 3  # keys 0, 1 and 3

            a.stop()  # its engines' streams go silent with it: peers forget them
            assert wait_until(lambda: gpu(b) == (), timeout=5)
        finally:
            stop_all(nodes)


def test_batches_published_before_the_daemon_connected_are_replayed(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    port, replay_port = ports
    with publisher(port, replay_port) as pub:
        pub.publish(batch(stored(0, 2)))  # seq 0: no subscriber yet, lost on the wire
        pub._event_queue.join()
        node = start_daemon(tmp_path, **engine_settings(port, replay_port))
        try:
            assert wait_until(lambda: connected(node))
            pub.publish(batch(stored(2, 2)))  # seq 1: joined late, so replay from 0
            assert wait_until(lambda: gpu_upto(node) == 4)
            status = engine(node)
            assert status["replays"] == 1 and status["resets"] == 0 and status["seq"] == 1
        finally:
            node.stop()


def test_a_batch_lost_in_flight_is_recovered_through_replay(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    port, replay_port = ports
    with publisher(port, replay_port) as pub:
        node = start_daemon(tmp_path, **engine_settings(port, replay_port))
        try:
            assert wait_until(lambda: connected(node))
            pub.publish(batch(stored(0, 2)))
            assert wait_until(lambda: gpu_upto(node) == 2)
            drop_in_flight(pub, batch(stored(2, 2)))
            pub.publish(batch(stored(4, 2)))  # a gap: seq 2 follows seq 0
            assert wait_until(lambda: gpu_upto(node) == 6)
            status = engine(node)
            assert (status["gaps"], status["replays"], status["resets"]) == (1, 1, 0)
        finally:
            node.stop()


def test_a_gap_the_dead_replay_endpoint_cannot_fill_resets_the_engine(
    tmp_path: Path, ports: tuple[int, int]
) -> None:
    port, replay_port = ports
    with publisher(port) as pub:  # vLLM without a replay endpoint; the daemon is told one
        node = start_daemon(tmp_path, **engine_settings(port, replay_port))
        try:
            assert wait_until(lambda: connected(node))
            pub.publish(batch(stored(0, 2)))
            assert wait_until(lambda: gpu_upto(node) == 2)
            drop_in_flight(pub, batch(kv.BlockRemoved(block_hashes=[h(1)], medium="GPU")))
            pub.publish(batch(stored(4, 1)))
            # The lost batch may have removed anything: after the replay times out the
            # engine's entries are gone (a miss), not kept (possibly wrong).
            assert wait_until(lambda: engine(node)["resets"] == 1)
            assert gpu(node) == ()
            assert not engine(node)["replaying"]
        finally:
            node.stop()


def test_a_publisher_restart_clears_the_old_entries(tmp_path: Path, ports: tuple[int, int]) -> None:
    port, replay_port = ports
    node = start_daemon(tmp_path, **engine_settings(port, replay_port))
    try:
        assert not connected(node), "no publisher yet: the daemon runs and waits"
        with publisher(port, replay_port) as pub:
            assert wait_until(lambda: connected(node))
            pub.publish(batch(stored(0, 3)))
            assert wait_until(lambda: gpu_upto(node) == 3)
        assert wait_until(lambda: not connected(node))
        assert gpu(node) == (), "a dead publisher's GPU is not trusted"
        with publisher(port, replay_port) as pub:  # the restarted engine: seq from 0 again
            assert wait_until(lambda: connected(node))
            pub.publish(batch(stored(0, 1, generation="new")))
            assert wait_until(lambda: engine(node)["seq"] == 0)
            assert gpu_upto(node) == 1
        assert engine(node)["resets"] >= 1
    finally:
        node.stop()


def test_garbage_frames_are_counted_and_dropped(tmp_path: Path, ports: tuple[int, int]) -> None:
    port, metrics_port = ports
    node = start_daemon(tmp_path, metrics_port=metrics_port, **engine_settings(port))
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        pub.bind(f"tcp://127.0.0.1:{port}")
        assert wait_until(lambda: connected(node))
        encoder = msgspec.msgpack.Encoder()
        seq = [n.to_bytes(8, "big") for n in range(3)]
        pub.send_multipart([b"", b"two frames"])
        pub.send_multipart([b"", b"short", b"x"])
        pub.send_multipart([b"", seq[0], b"\xc1 not msgpack"])
        pub.send_multipart([b"", seq[1], encoder.encode([1.0, [["BlockLeased", [1]]]])])
        pub.send_multipart([b"", seq[2], encoder.encode(batch(stored(0, 2)))])
        assert wait_until(lambda: gpu_upto(node) == 2)
        status = engine(node)
        assert status["dropped"] == 4 and status["resets"] == 2
        metrics = _dropped_by_reason(metrics_port)
        assert metrics == {"frames": 1, "seq": 1, "malformed": 1, "unknown_event": 1}
    finally:
        pub.close()
        context.term()
        assert node.stop() == 0, node.log()


def _dropped_by_reason(metrics_port: int) -> dict[str, int]:
    """shoal_kvcache_engine_dropped_total by reason, from the daemon's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(
        r'shoal_kvcache_engine_dropped_total\{engine="gpu0",reason="(\w+)"\} (\S+)', text
    )
    return {reason: int(float(value)) for reason, value in found}
