"""Several real daemon processes on loopback, each with its own cluster port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import DaemonProcess, free_port, start_daemon, wait_until

pytestmark = pytest.mark.integration

NS = Namespace(model="cluster-test@1")
BLOCK = 64 << 10


def payload(key: bytes, nbytes: int = BLOCK) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def cluster_ports(count: int) -> list[int]:
    """Ports p with p and p + 1 free (ROUTER and PUB)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 1 < 65535 and port not in ports and port + 1 not in ports:
            ports.append(port)
    return ports


def start_cluster(tmp_path: Path, count: int, **settings: object) -> list[DaemonProcess]:
    ports = cluster_ports(count)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [
        start_daemon(
            tmp_path,
            name=f"n{i}-{os.getpid()}",
            cluster_port=port,
            cluster_host="127.0.0.1",
            cluster_node=f"node{i}",
            cluster_peers=peers,
            cluster_heartbeat_s=0.2,
            cluster_member_timeout_s=1.0,
            **settings,
        )
        for i, port in enumerate(ports)
    ]


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    nodes = start_cluster(tmp_path, 3)
    yield nodes
    for node in nodes:
        node.stop()


def members(node: DaemonProcess) -> set[str]:
    with node.client(heartbeat=False) as c:
        return {m["node"] for m in c.cluster_status()["members"]}


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
