"""A peer fetching this node's SSD blocks must not stall the node's own clients (review
M3): the reads run on the daemon's I/O workers, the reply goes out when they land.

Node A's spill file sleeps ``delay`` seconds on every read and write (the slow-disk
wrapper of test_daemon_ops); node B fetches A's SSD blocks while another client of A
looks up, and that lookup is answered at once.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from kvcache.config import CacheConfig
from tests.integration.conftest import (
    ENV,
    DaemonProcess,
    cluster_ports,
    start_daemon,
    stop_process,
    wait_ready,
    wait_until,
)
from tests.integration.test_daemon_ops import BLOCK, SLOW_DISK_DAEMON, blocks, keys_for

pytestmark = pytest.mark.integration


def ssd_stats(node: DaemonProcess) -> dict[str, int]:
    with node.client(heartbeat=False) as client:
        return next(t for t in client.stats()["tiers"] if t["tier"] == "ssd")


def test_a_peers_fetch_of_ssd_blocks_does_not_block_another_clients_lookup(
    tmp_path: Path,
) -> None:
    delay = 1.5
    port_a, port_b = cluster_ports(2)
    peers = f"127.0.0.1:{port_a},127.0.0.1:{port_b}"
    cluster = ["--cluster-host", "127.0.0.1", "--cluster-peers", peers,
               "--cluster-heartbeat-s", "0.2", "--cluster-member-timeout-s", "3",
               "--cluster-fetch-timeout-s", "30"]  # fmt: skip
    name = f"slowa{uuid.uuid4().hex[:8]}"
    args = ["cache", "serve", "--name", name, "--runtime-dir", str(tmp_path / "run"),
            "--shm-bytes", "8MiB", "--dram-bytes", "0", "--slab-bytes", "8MiB",
            "--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "32MiB", "--metrics-port", "0",
            "--log-format", "text", "--policy", "lru", "--cluster-port", str(port_a),
            "--cluster-node", "node0", *cluster]  # fmt: skip
    log = tmp_path / "daemon-a.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_DISK_DAEMON, str(delay), *args],
            env=ENV, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    a = DaemonProcess(CacheConfig(name=name, runtime_dir=str(tmp_path / "run")), process, log)
    b: DaemonProcess | None = None
    try:
        wait_ready(process, log, "daemon", lambda: "cache daemon ready" in log.read_text())
        b = start_daemon(tmp_path, cluster_port=port_b, cluster_node="node1",
                         cluster_host="127.0.0.1", cluster_peers=peers,
                         cluster_heartbeat_s=0.2, cluster_member_timeout_s=3,
                         cluster_fetch_timeout_s=30)  # fmt: skip
        keys = keys_for(0, 40)
        with a.client(timeout_s=60) as writer:
            assert writer.put(keys[:32], blocks(keys[:32])).stored == 32
            # 8 more push the first 8 down to A's SSD: 8 slow writes on its workers
            assert writer.put(keys[32:], blocks(keys[32:]), parent=keys[31]).stored == 8
        assert wait_until(lambda: ssd_stats(a)["bytes_in"] == 8 * BLOCK, timeout=30)
        on_ssd = keys[:8]
        done: dict[str, float] = {}
        with b.client(timeout_s=60) as reader:
            assert wait_until(lambda: reader.locate(on_ssd).remote_length == 8, timeout=20)

            def fetch() -> None:
                started = time.monotonic()
                done["fetched"] = reader.fetch(on_ssd)
                done["seconds"] = time.monotonic() - started

            worker = threading.Thread(target=fetch)
            latencies: list[float] = []
            with a.client(timeout_s=60) as other:
                worker.start()
                try:
                    while worker.is_alive():  # A's lookups, all through the peer's fetch
                        started = time.monotonic()
                        assert other.lookup(keys) == 40
                        latencies.append(time.monotonic() - started)
                        time.sleep(0.05)
                finally:
                    worker.join(timeout=60)
            assert len(latencies) > 10 and max(latencies) < delay / 2, (
                f"A's lookups took up to {max(latencies):.2f}s during a peer's read"
            )
            assert done["fetched"] == 8, done
            assert done["seconds"] >= delay, "the fetch did wait for the slow disk"
            outs = [np.empty(BLOCK, dtype=np.uint8) for _ in on_ssd]
            assert reader.get_into(on_ssd, outs) == 8
            for out, want in zip(outs, blocks(keys)[:8], strict=True):
                assert np.array_equal(out, want)
        ssd = ssd_stats(a)
        assert ssd["num_blocks"] == 8 and ssd["hits"] == 8, "served from the SSD, not promoted"
    finally:
        if b is not None:
            b.stop()
        assert stop_process(process) == 0, a.log()
