"""Who may do what on the cluster port (review C4, m8): real daemons, real keys, real sockets."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

from kvcache.cluster.admin import ClusterAdmin
from kvcache.cluster.security import TOKEN_FILE, read_operator_token
from kvcache.errors import CacheUnavailable, RequestRejected
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    ENV,
    REPO,
    DaemonProcess,
    cluster_ports,
    members,
    start_daemon,
    stop_all,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration

NS = Namespace(model="cluster-security@1")
BLOCK = 16 << 10


def shoal(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal", "cache", *args], env=env or ENV,
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


def listening_hosts(port: int) -> set[str]:
    """The addresses something listens on at TCP ``port`` (from /proc/net/tcp)."""
    hosts = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            hosts.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return hosts


def dealer(port: int, **curve: bytes) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in curve.items():
        setattr(sock, option, value)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def call(sock: zmq.Socket[bytes], body: dict[str, Any], timeout_ms: int = 5000) -> dict[str, Any]:
    sock.send(msgpack.packb(body))
    assert sock.poll(timeout_ms), f"no reply to {body.get('op')}"
    reply: dict[str, Any] = msgpack.unpackb(sock.recv())
    return reply


def put_blocks(node: DaemonProcess, count: int) -> list[bytes]:
    keys: list[bytes] = list(chain_keys(NS, list(range(16 * count)), 16))
    with node.client(heartbeat=False) as writer:
        assert writer.put(keys, [np.full(BLOCK, i, np.uint8) for i in range(count)]).complete
    return keys


# -- binding -------------------------------------------------------------------------------


def test_a_non_loopback_bind_without_curve_is_refused_naming_the_fix(tmp_path: Path) -> None:
    port = cluster_ports(1)[0]
    result = shoal("serve", "--name", f"t{uuid.uuid4().hex[:8]}", "--runtime-dir",
                   str(tmp_path / "run"), "--shm-bytes", "8MiB", "--dram-bytes", "0",
                   "--metrics-port", "0", "--cluster-port", str(port),
                   "--cluster-host", "0.0.0.0")  # fmt: skip
    assert result.returncode == 1, result.stderr
    for fix in ("without CurveZMQ", "--cluster-curve-dir", "--cluster-insecure", "127.0.0.1"):
        assert fix in result.stderr
    assert not listening_hosts(port)


def test_an_explicitly_insecure_bind_starts_and_warns(tmp_path: Path) -> None:
    port = cluster_ports(1)[0]
    name = f"t{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "insecure.log"
    args = [sys.executable, "-m", "shoal", "cache", "serve", "--name", name, "--runtime-dir",
            str(tmp_path / "run"), "--shm-bytes", "8MiB", "--dram-bytes", "0",
            "--metrics-port", "0", "--log-format", "text", "--cluster-port", str(port),
            "--cluster-host", "0.0.0.0", "--cluster-node", "open"]  # fmt: skip
    env = {**ENV, "SHOAL_CACHE_CLUSTER_INSECURE": "true"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(
            process, log_path, "daemon", lambda: "cache daemon ready" in log_path.read_text()
        )
        text = log_path.read_text()
        assert "WARNING" in text and "without CurveZMQ (--cluster-insecure)" in text
        assert listening_hosts(port) == {"0.0.0.0"}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_cluster_port_binds_loopback_unless_a_host_is_given(tmp_path: Path) -> None:
    port = cluster_ports(1)[0]
    node = start_daemon(tmp_path, cluster_port=port, cluster_node="solo")
    try:
        assert listening_hosts(port) == {"127.0.0.1"}
        assert listening_hosts(port + 1) == {"127.0.0.1"}
    finally:
        node.stop()


# -- operator verbs without CurveZMQ -------------------------------------------------------


@pytest.fixture
def open_node(tmp_path: Path) -> Iterator[tuple[DaemonProcess, int]]:
    port = cluster_ports(1)[0]
    node = start_daemon(tmp_path, cluster_port=port, cluster_node="a")  # the defaults
    yield node, port
    stop_all([node])


def test_the_anonymous_flush_and_drain_of_the_review_repro_are_refused(
    open_node: tuple[DaemonProcess, int],
) -> None:
    node, port = open_node
    keys = put_blocks(node, 4)
    sock = dealer(port)
    # unauth_drain.py, frame for frame: a v2 flush and a v2 drain from an anonymous peer.
    for request in ({"v": 2, "id": 1, "op": "flush"}, {"v": 2, "id": 2, "op": "drain"},
                    {"v": 3, "id": 3, "op": "drain", "token": "guess"},
                    {"v": 3, "id": 4, "op": "flush", "token": "\u00e9t\u00e9"}):  # fmt: skip
        reply = call(sock, request)
        assert (reply["ok"], reply["code"]) == (False, "forbidden"), reply
        assert "operator token" in reply["error"]
    sock.close()
    assert node.process.poll() is None, "the daemon is still running"
    with node.client(heartbeat=False) as reader:
        assert reader.lookup(keys) == 4, "nothing was flushed"
        assert reader.cluster_status()["state"] == "active", "nor drained"


def test_a_local_operator_with_the_runtime_dir_token_may_flush(
    open_node: tuple[DaemonProcess, int],
) -> None:
    node, port = open_node
    keys = put_blocks(node, 3)
    runtime = node.config.runtime_path
    assert stat.S_IMODE((runtime / TOKEN_FILE).stat().st_mode) == 0o600
    with ClusterAdmin(f"127.0.0.1:{port}", token=read_operator_token(runtime)) as admin:
        assert admin.flush() == 3
    with node.client(heartbeat=False) as reader:
        assert reader.lookup(keys) == 0


def test_a_frame_over_the_size_limit_drops_its_sender_unanswered(
    open_node: tuple[DaemonProcess, int],
) -> None:
    _, port = open_node
    sock = dealer(port)
    try:
        sock.send(msgpack.packb({"v": 2, "id": 1, "op": "status", "pad": b"x" * (2 << 20)}))
        # The daemon keeps serving others: a fresh connection is answered.
        other = dealer(port)
        try:
            assert call(other, {"v": 2, "id": 7, "op": "status"}, timeout_ms=10_000)["id"] == 7
        finally:
            other.close()
        # ZeroMQ drops the sender's connection before the frame is allocated and the DEALER
        # reconnects. A request sent while the old pipe was still closing is lost with it, so
        # ask until answered: the first reply the sender ever gets is not to the big frame.
        deadline = time.monotonic() + 20
        request_id = 2
        while True:
            sock.send(msgpack.packb({"v": 2, "id": request_id, "op": "status"}))
            if sock.poll(500):
                reply = msgpack.unpackb(sock.recv())
                break
            assert time.monotonic() < deadline, "the sender was never answered again"
            request_id += 1
        assert reply["id"] >= 2 and reply["node"] == "a"
    finally:
        sock.close()


# -- per-node CurveZMQ keys ----------------------------------------------------------------


def keygen(directory: Path, *args: str) -> None:
    made = shoal("keygen", str(directory), *args)
    assert made.returncode == 0, made.stderr


def curve_client(directory: Path, name: str) -> dict[str, bytes]:
    public, secret = zmq.auth.load_certificate(str(directory / f"{name}.key_secret"))
    server, _ = zmq.auth.load_certificate(str(directory / "cluster.key"))
    assert secret is not None
    return {"curve_publickey": public, "curve_secretkey": secret, "curve_serverkey": server}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[list[DaemonProcess], Path, list[int]]]:
    keys = tmp_path / "keys"
    keygen(keys)
    for member in ("a", "b", "t"):
        keygen(keys, "--member", member)
    keygen(keys, "--operator", "alice")
    ports = cluster_ports(3)  # a, b, and t: the test plays member t
    common: dict[str, Any] = {"cluster_peers": ",".join(f"127.0.0.1:{p}" for p in ports),
              "cluster_heartbeat_s": 0.2, "cluster_member_timeout_s": 1.5,
              "cluster_curve_dir": str(keys), "cluster_key_reload_s": 0.2}  # fmt: skip
    nodes = []
    try:
        for name, port in zip(("a", "b"), ports, strict=False):
            nodes.append(start_daemon(tmp_path, cluster_port=port, cluster_node=name,
                                      cluster_curve_key=str(keys / f"{name}.key_secret"),
                                      **common))  # fmt: skip
        assert wait_until(lambda: members(nodes[0]) == {"b"}, timeout=10)
        assert wait_until(lambda: members(nodes[1]) == {"a"}, timeout=10)
        yield nodes, keys, ports
    finally:
        stop_all(nodes)


def test_operator_verbs_need_an_operator_key_and_peer_verbs_a_member_key(
    secured: tuple[list[DaemonProcess], Path, list[int]],
) -> None:
    (a, _), keys, ports = secured
    blocks = put_blocks(a, 2)
    address = f"127.0.0.1:{ports[0]}"
    with ClusterAdmin(address, curve_dir=str(keys), curve_key=str(keys / "b.key_secret")) as b:
        assert b.status()["node"] == "a", "a member may ask for status"
        with pytest.raises(RequestRejected, match="operator verb") as refused:
            b.flush()
        assert refused.value.code == "forbidden"
    alice_socket = dealer(ports[0], **curve_client(keys, "alice"))
    fetch = {"v": 3, "id": 1, "op": "fetch", "node": "alice", "keys": blocks[0]}
    assert call(alice_socket, fetch)["code"] == "forbidden", "an operator may not fetch KV"
    alice_socket.close()
    with ClusterAdmin(address, curve_dir=str(keys), curve_key=str(keys / "alice.key_secret")) as op:
        assert op.flush() == 2
        # Rotation: a key taken out of operators/ is refused from the next request on.
        (keys / "operators" / "alice.key").unlink()
        assert wait_until(lambda: _refused(op), timeout=5)


def _refused(admin: ClusterAdmin) -> bool:
    try:
        admin.evict(key_prefix="00")
    except RequestRejected:
        return True
    return False


def test_a_member_cannot_speak_for_another_member_on_the_stream(
    secured: tuple[list[DaemonProcess], Path, list[int]],
) -> None:
    (_, b), keys, ports = secured
    # The test is member t: its PUB binds t's stream port as the CurveZMQ *client* of each
    # subscriber's connection (per-node keys reverse the stream's roles), with t's key.
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    for option, value in curve_client(keys, "t").items():
        setattr(pub, option, value)
    pub.bind(f"tcp://127.0.0.1:{ports[2] + 1}")

    def beat(node: str, state: str = "active") -> None:
        body = {"v": 2, "t": "heartbeat", "node": node, "epoch": time.time_ns(), "seq": 0,
                "address": f"127.0.0.1:{ports[2]}", "state": state, "ts": time.time(),
                "interval_s": 0.2, "stats": {}, "proto": 3}  # fmt: skip
        pub.send_multipart([b"shoal.hb", msgpack.packb(body)])

    def heard_as_t() -> bool:
        beat("t")
        return "t" in members(b)

    try:
        assert wait_until(heard_as_t, timeout=10), "member t is heard in its own name"
        dropped = int(_status(b)["dropped"])
        for _ in range(20):
            beat("a", "leaving")  # in member a's name: a forged goodbye
            beat("t")
            time.sleep(0.05)
        assert wait_until(lambda: int(_status(b)["dropped"]) >= dropped + 20)
        assert "a" in members(b), "a forged leaving did not drop member a"
    finally:
        pub.close(linger=0)


def _status(node: DaemonProcess) -> dict[str, Any]:
    with node.client(heartbeat=False) as c:
        status: dict[str, Any] = c.cluster_status()
        return status


def test_a_member_without_its_own_keypair_is_refused_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keygen(keys)
    keygen(keys, "--member", "a")
    port = cluster_ports(1)[0]
    result = shoal("serve", "--name", f"t{uuid.uuid4().hex[:8]}", "--runtime-dir",
                   str(tmp_path / "run"), "--shm-bytes", "8MiB", "--dram-bytes", "0",
                   "--metrics-port", "0", "--cluster-port", str(port),
                   "--cluster-curve-dir", str(keys))  # fmt: skip
    assert result.returncode == 1
    assert "--member NAME" in result.stderr and "cluster_curve_key" in result.stderr


def test_an_unreachable_admin_names_curve_when_the_key_is_missing(
    secured: tuple[list[DaemonProcess], Path, list[int]],
) -> None:
    _, _, ports = secured
    with (
        ClusterAdmin(f"127.0.0.1:{ports[0]}", timeout_s=0.5) as admin,
        pytest.raises(CacheUnavailable, match="CurveZMQ"),
    ):
        admin.status()


def test_an_operator_drains_a_member_whose_blocks_its_peer_takes_by_key(
    secured: tuple[list[DaemonProcess], Path, list[int]],
) -> None:
    (a, b), keys, ports = secured
    blocks = put_blocks(a, 6)
    with b.client(heartbeat=False) as reader:
        assert wait_until(lambda: reader.locate(blocks).remote_length == 6)
    address = f"127.0.0.1:{ports[0]}"
    with ClusterAdmin(address, curve_dir=str(keys), curve_key=str(keys / "alice.key_secret"),
                      timeout_s=30) as operator:  # fmt: skip
        result = operator.drain(timeout_s=30)
    assert result == {"handed_off": 6, "peers": ["b"]}
    assert a.process.wait(timeout=10) == 0
    with b.client(heartbeat=False) as reader:
        assert reader.lookup(blocks) == 6, "b fetched a's blocks, offered under a's key"
