"""The daemon as an orchestrator sees it: probes, metrics, a busy port, SIGTERM.

Real daemon processes and real HTTP requests, but for the stalled-loop probe, which
drives an in-process daemon's /healthz (a real HTTP request too) without its loop.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from kvcache.config import CacheConfig
from kvcache.daemon import CacheDaemon
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    DaemonProcess,
    free_port,
    run_client,
    start_daemon,
    wait_until,
)

pytestmark = pytest.mark.integration

NS = Namespace(model="ops-model@1")
BLOCK = 256 << 10


def keys_for(start: int, num_blocks: int) -> list[bytes]:
    return list(chain_keys(NS, list(range(start, start + 16 * num_blocks)), 16))


def blocks(keys: list[bytes]) -> list[np.ndarray]:
    return [np.full(BLOCK, i % 251, dtype=np.uint8) for i, _ in enumerate(keys)]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} not exported")


HOLD_A_SESSION = """
import sys, time
from kvcache.client import CacheClient
client = CacheClient(sys.argv[1], heartbeat=True)
client.lookup([b"k" * 16])
print("connected", flush=True)
time.sleep(600)
"""


def test_probes_answer_and_store_errors_and_session_ends_are_exported(tmp_path: Path) -> None:
    port = free_port()
    handle = start_daemon(tmp_path, metrics_port=port, shm_bytes="8MiB", dram_bytes=0)
    try:
        assert http_get(port, "/healthz") == (200, "ok\n")
        assert http_get(port, "/readyz") == (200, "ok\n")
        with run_client(HOLD_A_SESSION, handle.endpoint) as process:
            assert process.stdout is not None and process.stdout.readline() == "connected\n"
            process.kill()
        keys = keys_for(0, 40)  # 10 MiB through an 8 MiB arena without a lower tier
        with handle.client() as client:
            for start in (0, 20):  # one put cannot evict its own reservations
                batch, parent = keys[start : start + 20], keys[start - 1] if start else None
                assert client.put(batch, blocks(batch), parent=parent).stored == 20

        def scrape() -> str:
            return http_get(port, "/metrics")[1]

        assert wait_until(lambda: "shoal_kvcache_dropped_total 8.0" in scrape())
        text = scrape()
        bye = metric(text, 'shoal_kvcache_sessions_ended_total{reason="bye"}')
        assert bye == 2, "start_daemon's readiness probe and this test's client said bye"
        assert metric(text, 'shoal_kvcache_sessions_ended_total{reason="exit"}') == 1
        assert metric(text, "shoal_kvcache_io_errors_total") == 0
        assert metric(text, "shoal_kvcache_resident_bytes") > 1 << 20
        assert metric(text, "shoal_kvcache_gc_frozen_objects") > 0
        assert http_get(port, "/nope")[0] == 404
    finally:
        assert handle.stop() == 0


def test_a_silent_session_dropped_by_its_ttl_is_counted(tmp_path: Path) -> None:
    port = free_port()
    handle = start_daemon(tmp_path, metrics_port=port, session_ttl_s=1)
    try:
        silent = handle.client(heartbeat=False)
        silent.lookup(keys_for(0, 1))
        assert wait_until(
            lambda: 'sessions_ended_total{reason="ttl"} 1.0' in http_get(port, "/metrics")[1],
            timeout=10,
        )
        silent.close()
    finally:
        assert handle.stop() == 0


def test_a_busy_metrics_port_is_a_one_line_error_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            start_daemon(tmp_path, metrics_port=port)
    log = str(failed.value).split("\n", 1)[1].strip()
    assert "Traceback" not in log
    assert log.splitlines()[-1].startswith(
        f"shoal cache serve: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert "--metrics-port" in log


def test_healthz_fails_when_the_loop_stops_turning(tmp_path: Path) -> None:
    port = free_port()
    config = CacheConfig(
        name=f"h{port}", runtime_dir=str(tmp_path / "run"), shm_bytes=4 << 20, dram_bytes=0,
        metrics_port=port, health_stall_s=0.5,
    )  # fmt: skip
    daemon = CacheDaemon(config)
    try:
        assert http_get(port, "/healthz")[0] == 200
        time.sleep(0.8)  # the loop never runs here: it is as stuck as a loop can be
        status, body = http_get(port, "/healthz")
        assert status == 503 and body.startswith("loop stalled for"), body
        assert http_get(port, "/readyz")[0] == 200, "stalled is unhealthy, not unready"
    finally:
        daemon.close()


def wait_exit(handle: DaemonProcess, timeout: float) -> int | None:
    try:
        return handle.process.wait(timeout=timeout)
    except Exception:
        return None


def test_sigterm_takes_no_new_blocks_and_exits_once_the_leases_in_flight_are_back(
    tmp_path: Path,
) -> None:
    port = free_port()
    handle = start_daemon(tmp_path, metrics_port=port, shutdown_timeout_s=60)
    try:
        keys = keys_for(0, 4)
        with handle.client() as reader, handle.client() as writer:
            assert reader.put(keys, blocks(keys)).stored == 4
            leases = reader.get(keys)
            handle.process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: http_get(port, "/readyz") == (503, "shutting down\n"))
            more = keys_for(1000, 2)
            result = writer.put(more, blocks(more))
            assert (result.stored, result.no_space) == (0, 2), "no new blocks while leaving"
            assert writer.lookup(keys) == 4, "reads still served while draining"
            assert handle.process.poll() is None, "exited with a reader mid-lease"
            reader.release([lease for lease in leases if lease is not None])
            assert wait_exit(handle, timeout=10) == 0
        assert "shutting down" in handle.log()
        assert "shutdown timeout" not in handle.log()
    finally:
        handle.stop()


def test_sigterm_with_a_lease_never_returned_exits_0_at_the_shutdown_timeout(
    tmp_path: Path,
) -> None:
    handle = start_daemon(tmp_path, shutdown_timeout_s=1)
    try:
        keys = keys_for(0, 2)
        with handle.client() as reader:
            reader.put(keys, blocks(keys))
            assert all(lease is not None for lease in reader.get(keys))
            started = time.monotonic()
            handle.process.send_signal(signal.SIGTERM)
            assert wait_exit(handle, timeout=10) == 0
            assert time.monotonic() - started >= 0.9, "waited for the lease until the timeout"
        assert "shutdown timeout: exiting with work in flight" in handle.log()
    finally:
        handle.stop()


def test_a_block_over_max_block_bytes_is_a_bad_request_naming_sizes_not_an_outage(
    tmp_path: Path,
) -> None:
    from kvcache.errors import CacheUnavailable, RequestRejected

    handle = start_daemon(tmp_path, slab_bytes="8MiB")
    try:
        with handle.client() as client:
            with pytest.raises(RequestRejected) as rejected:
                client.reserve(keys_for(0, 1), [9 << 20])
            assert not isinstance(rejected.value, CacheUnavailable)
            assert rejected.value.code == "bad_request"
            assert str(9 << 20) in rejected.value.message
            assert str(8 << 20) in rejected.value.message
            assert "max_block_bytes" in rejected.value.message
            keys = keys_for(0, 2)  # the same session goes on working
            assert client.put(keys, blocks(keys)).stored == 2
    finally:
        assert handle.stop() == 0


SLOW_DISK_DAEMON = """
import sys, time
from kvcache import tiers
delay = float(sys.argv[1])
write, read_into = tiers.FileBacking.write, tiers.FileBacking.read_into
def slow_write(self, offset, data):
    time.sleep(delay)
    write(self, offset, data)
def slow_read_into(self, offset, out):
    time.sleep(delay)
    read_into(self, offset, out)
tiers.FileBacking.write, tiers.FileBacking.read_into = slow_write, slow_read_into
from shoal.cli import main
sys.exit(main(sys.argv[2:]))
"""


def timed_lookup(handle: DaemonProcess, keys: list[bytes]) -> tuple[int, float]:
    with handle.client() as client:
        started = time.monotonic()
        found = client.lookup(keys)
        return found, time.monotonic() - started


def test_a_slow_ssd_tier_does_not_block_other_clients_lookups(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    from tests.integration.conftest import ENV, stop_process, wait_ready

    delay = 1.5
    name = f"slow{uuid.uuid4().hex[:8]}"
    config = CacheConfig(name=name, runtime_dir=str(tmp_path / "run"))
    args = ["cache", "serve", "--name", name, "--runtime-dir", str(tmp_path / "run"),
            "--shm-bytes", "8MiB", "--dram-bytes", "0", "--slab-bytes", "8MiB",
            "--ssd-dir", str(tmp_path / "ssd"), "--ssd-bytes", "32MiB", "--metrics-port", "0",
            "--log-format", "text", "--policy", "lru"]  # fmt: skip
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_DISK_DAEMON, str(delay), *args],
            env=ENV, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    handle = DaemonProcess(config, process, log)
    try:
        wait_ready(process, log, "daemon", lambda: "cache daemon ready" in log.read_text())
        keys = keys_for(0, 40)
        done: dict[str, object] = {}
        go_get = threading.Event()

        def put_then_get() -> None:
            with handle.client(timeout_s=60) as writer:
                first = writer.put(keys[:32], blocks(keys[:32])).stored
                # 8 more evict 8 blocks to the SSD: 8 slow writes
                second = writer.put(keys[32:], blocks(keys[32:]), parent=keys[31]).stored
                done["put"] = (first, second)
                go_get.wait(60)
                outs = [np.empty(BLOCK, dtype=np.uint8) for _ in range(2)]
                done["got"] = writer.get_into(keys[:2], outs)  # on the SSD: slow reads
                done["intact"] = all(
                    np.array_equal(out, block)
                    for out, block in zip(outs, blocks(keys[:2]), strict=True)
                )

        worker = threading.Thread(target=put_then_get)
        worker.start()
        try:
            assert wait_until(lambda: "put" in done, timeout=60)
            found, seconds = timed_lookup(handle, keys)
            assert found == 40 and seconds < delay / 2, f"lookup took {seconds:.2f}s during writes"
            time.sleep(2 * delay + 1)  # 8 writes on 4 workers: on the SSD for good now
            go_get.set()
            time.sleep(0.3)  # the get has reached the daemon and waits on its disk reads
            found, seconds = timed_lookup(handle, keys)
            assert found == 40 and seconds < delay / 2, f"lookup took {seconds:.2f}s during a read"
        finally:
            go_get.set()
            worker.join(timeout=60)
        assert done["put"] == (32, 8)
        assert done["got"] == 2 and done["intact"], done
        with handle.client() as client:
            assert {t["tier"]: t["hits"] for t in client.stats()["tiers"]}["ssd"] == 2
    finally:
        assert stop_process(process) == 0, handle.log()


def test_an_operators_evict_runs_in_steps_and_answers_with_the_count(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path)
    try:
        doomed, kept = keys_for(0, 12), keys_for(50_000, 4)
        other = Namespace(model="ops-other@1")
        with (
            handle.client(namespace=NS.label()) as client,
            handle.client(namespace=other.label()) as second,
        ):
            assert client.put(doomed, blocks(doomed)).stored == 12
            assert second.put(kept, blocks(kept)).stored == 4
            with handle.client(role="operator") as operator:
                assert operator.evict(namespace=NS.label()) == 12
            assert client.lookup(doomed) == 0 and client.lookup(kept) == 4
    finally:
        assert handle.stop() == 0


def test_sigterm_on_a_cluster_member_hands_its_blocks_to_a_peer_then_exits_0(
    tmp_path: Path,
) -> None:
    from tests.integration.conftest import start_cluster, stop_all, wait_for_members

    nodes = start_cluster(tmp_path, 2)
    try:
        wait_for_members(nodes)
        leaving, staying = nodes
        keys = keys_for(0, 4)
        with leaving.client() as client:
            assert client.put(keys, blocks(keys)).stored == 4
        leaving.process.send_signal(signal.SIGTERM)
        assert wait_exit(leaving, timeout=20) == 0
        assert "drained; leaving the cluster" in leaving.log()
        with staying.client() as client:
            assert client.lookup(keys) == 4, "handed off before the member left"
    finally:
        stop_all(nodes)
