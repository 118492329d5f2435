"""Sessions between engines and the daemon: identity, restarts, idleness, failure, trust.

Real daemon processes and real ipc sockets; a few tests put a stand-in daemon (a bare
ROUTER) behind the socket to hand the client answers a real daemon never gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from kvcache import messages as m
from kvcache.client import AsyncCacheClient, CacheClient
from kvcache.connector.scheduler import LookupService
from kvcache.connector.settings import ConnectorSettings
from kvcache.errors import (
    CacheUnavailable,
    ProtocolError,
    RequestRejected,
    UntrustedEndpoint,
)
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import DaemonProcess, run_client, start_daemon, wait_until

pytestmark = pytest.mark.integration

NS = Namespace(model="session-model@1")
BLOCK = 256 << 10


def keys_for(start: int, num_blocks: int) -> list[bytes]:
    return list(chain_keys(NS, list(range(start, start + 16 * num_blocks)), 16))


def blocks(num_blocks: int, first_byte: int = 1) -> list[np.ndarray]:
    return [np.full(BLOCK, first_byte + i, dtype=np.uint8) for i in range(num_blocks)]


def raw_socket(endpoint: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def ask(sock: zmq.Socket[bytes], **body: Any) -> dict[str, Any]:
    sock.send(msgpack.packb({"v": m.VERSION, "id": 1, **body}))
    assert sock.poll(5000), "the daemon answers every request"
    reply = msgpack.unpackb(sock.recv(), raw=False)
    assert isinstance(reply, dict)
    return reply


def restart(handle: DaemonProcess, tmp_path: Path) -> DaemonProcess:
    """kill -9 the daemon, then start a new one under the same name (a DaemonSet restart)."""
    handle.process.send_signal(signal.SIGKILL)
    handle.process.wait(timeout=10)
    return start_daemon(tmp_path, name=handle.config.name)


# -- C1: sessions are bound to their connection and to the daemon instance -------------


def test_after_a_restart_stale_clients_say_hello_again_and_never_meet_each_others_sessions(
    tmp_path: Path,
) -> None:
    first = start_daemon(tmp_path)
    a = first.client(heartbeat=False, verify_reads=False)
    b = first.client(heartbeat=False, verify_reads=False)
    second = restart(first, tmp_path)
    try:
        keys = keys_for(0, 4)
        # Neither client noticed the restart; their calls just work (no error, no miss).
        assert b.lookup(keys) == 0
        written = blocks(4)
        assert a.put(keys, written).stored == 4, "the put is redone on the new daemon's arena"
        outs = [np.zeros(BLOCK, dtype=np.uint8) for _ in keys]
        assert b.get_into(keys, outs) == 4
        for out, block in zip(outs, written, strict=True):
            np.testing.assert_array_equal(out, block)  # verify_reads=False: the bytes A wrote
        b_session = b.session
        a.close()  # ends A's session only
        assert b.stats()["num_sessions"] == 1
        assert b.session == b_session, "B kept its session: A's bye did not end it"
        b.close()
    finally:
        assert second.stop() == 0


def test_a_session_token_is_honoured_only_on_its_connection_and_daemon(
    daemon: DaemonProcess,
) -> None:
    with daemon.client(heartbeat=False) as owner:
        assert owner.session and owner.epoch
        sock = raw_socket(daemon.endpoint)
        try:
            stolen = ask(sock, op="lookup", session=owner.session, epoch=owner.epoch, keys=b"")
            assert (stolen["ok"], stolen["code"]) == (False, "unknown_session")
            other_daemon = ask(sock, op="bye", session=owner.session, epoch=owner.epoch + 1)
            assert (other_daemon["ok"], other_daemon["code"]) == (False, "unknown_session")
        finally:
            sock.close()
        session = owner.session
        assert owner.stats()["num_sessions"] == 1
        assert owner.session == session, "the owner's session survived both attempts"


def test_the_heartbeat_thread_notices_a_restart_and_the_next_call_says_hello_first(
    tmp_path: Path,
) -> None:
    first = start_daemon(tmp_path, session_ttl_s=1.5)  # heartbeats every 0.5 s
    client = first.client()
    old = client.session
    second = restart(first, tmp_path)
    try:
        assert wait_until(lambda: client._stale_session == old, timeout=10)
        assert client.lookup(keys_for(0, 1)) == 0
        assert client.session not in (0, old)
        client.close()
    finally:
        assert second.stop() == 0


def test_the_async_client_also_says_hello_again_after_a_restart(tmp_path: Path) -> None:
    first = start_daemon(tmp_path)

    async def before() -> AsyncCacheClient:
        return await AsyncCacheClient.connect(first.endpoint)

    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(before())
        second = restart(first, tmp_path)
        try:
            keys = keys_for(0, 2)
            assert loop.run_until_complete(client.put(keys, blocks(2))).stored == 2
            assert loop.run_until_complete(client.lookup(keys)) == 2
            loop.run_until_complete(client.close())
        finally:
            assert second.stop() == 0
    finally:
        loop.close()


# -- M2: idle clients keep hitting -----------------------------------------------------


def test_a_lookup_client_without_heartbeats_hits_after_its_session_expired(
    tmp_path: Path,
) -> None:
    handle = start_daemon(tmp_path, session_ttl_s=1.0)
    service: LookupService | None = None
    try:
        keys = keys_for(0, 4)
        with handle.client() as writer:
            assert writer.put(keys, blocks(4)).stored == 4
        service = LookupService(ConnectorSettings(endpoint=handle.endpoint, peer_fetch=False))
        first = service.submit([keys])
        assert first.done.wait(5) and first.hits == 4
        # The scheduler's client is idle past the TTL: the daemon drops its session.
        assert wait_until(lambda: "client timed out" in handle.log(), timeout=10)
        after_idle = service.submit([keys])
        assert after_idle.done.wait(5)
        assert (after_idle.hits, service.failures) == (4, 0)
    finally:
        if service is not None:
            service.close()
        assert handle.stop() == 0


# -- M4: leases expire on their own; a failed call frees what it held --------------------

HUNG_READER = """
import sys, time
from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
keys = chain_keys(Namespace(model="session-model@1"), list(range(16 * 4)), 16)
client = CacheClient(sys.argv[1])  # its heartbeat thread keeps running
print(sum(b is not None for b in client.get(keys)), flush=True)
time.sleep(600)  # the reading thread hangs, holding its leases
"""


def test_a_hung_readers_leases_expire_while_its_heartbeat_keeps_the_session(
    tmp_path: Path,
) -> None:
    handle = start_daemon(tmp_path, session_ttl_s=1.5, lease_ttl_s=2.0)
    try:
        keys = keys_for(0, 4)
        with handle.client() as observer:
            assert observer.put(keys, blocks(4)).stored == 4
            with run_client(HUNG_READER, handle.endpoint) as reader:
                assert reader.stdout is not None
                assert reader.stdout.readline().strip() == "4"
                assert wait_until(lambda: observer.stats()["num_leases"] == 0, timeout=15)
                stats = observer.stats()
                assert reader.poll() is None
                assert stats["num_sessions"] == 2, "the reader's session lives on"
                assert stats["expired_leases"] == 4
    finally:
        assert handle.stop() == 0


def test_a_call_that_times_out_ends_its_session_at_once(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 4)
    with daemon.client() as observer:
        assert observer.put(keys, blocks(4)).stored == 4
        reader = daemon.client(heartbeat=False, timeout_s=0.5)
        assert all(reader.get(keys))
        assert observer.stats()["num_leases"] == 4
        os.kill(daemon.process.pid, signal.SIGSTOP)  # a daemon too slow to answer
        try:
            with pytest.raises(CacheUnavailable, match="no reply"):
                reader.lookup(keys)
        finally:
            os.kill(daemon.process.pid, signal.SIGCONT)
        # The failed call's bye frees the leases now, not after the session TTL (30 s).
        assert wait_until(lambda: observer.stats()["num_leases"] == 0, timeout=5)
        reader.close()


# -- found on the real engine: a dead daemon must not cost every call the timeout ---------


def test_after_a_daemon_died_calls_fail_at_once_until_it_is_back(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path)
    client = handle.client(heartbeat=False, timeout_s=2.0)  # retry_interval_s: 1 s
    keys = keys_for(0, 1)
    assert client.lookup(keys) == 0
    handle.process.send_signal(signal.SIGKILL)
    handle.process.wait(timeout=10)
    with pytest.raises(CacheUnavailable):
        client.lookup(keys)  # the first call finds out: it may wait out the timeout

    def failure_seconds() -> float:
        started = time.monotonic()
        with pytest.raises(CacheUnavailable):
            client.lookup(keys)
        return time.monotonic() - started

    assert failure_seconds() < 0.5, "known down: no wait at all"
    time.sleep(1.1)  # past retry_interval_s: the next call probes the socket
    assert failure_seconds() < 0.5, "nothing listens on the socket a killed daemon left"
    assert failure_seconds() < 0.5
    second = start_daemon(tmp_path, name=handle.config.name)
    try:
        # The new daemon bound a new socket file: no waiting out retry_interval_s.
        assert client.lookup(keys) == 0
        client.close()
    finally:
        assert second.stop() == 0


def kill(handle: DaemonProcess) -> None:
    handle.process.send_signal(signal.SIGKILL)
    handle.process.wait(timeout=10)


def pidfds() -> int:
    """How many pidfds this process holds open."""
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(entry) == "anon_inode:[pidfd]"
    return count


def failure_seconds(call: Callable[[], object], match: str) -> float:
    started = time.monotonic()
    with pytest.raises(CacheUnavailable, match=match):
        call()
    return time.monotonic() - started


def test_the_first_call_after_the_daemon_was_killed_fails_at_once(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path)
    baseline = pidfds()
    client = handle.client(heartbeat=False, timeout_s=5.0)
    keys = keys_for(0, 1)
    closed = False
    try:
        for _ in range(2):  # the second time watches the daemon the client said hello to
            assert client.lookup(keys) == 0
            assert pidfds() == baseline + 1, "one pidfd: on the daemon the client talks to"
            pid = handle.process.pid
            kill(handle)
            seconds = failure_seconds(lambda: client.lookup(keys), rf"pid {pid}\) exited")
            assert seconds < 0.5, f"{seconds:.3f}s: the call waited for the io timeout"
            assert failure_seconds(lambda: client.lookup(keys), "exited") < 0.5
            handle = start_daemon(tmp_path, name=handle.config.name)
        assert client.lookup(keys) == 0, "a new daemon on the same name: hello again"
        assert client.put(keys, blocks(1)).stored == 1
        closed = True
        client.close()
        assert pidfds() == baseline, "close() closes the pidfd"
    finally:
        if not closed:
            client.close()
        if handle.process.poll() is None:
            assert handle.stop() == 0


def test_a_call_waiting_for_its_reply_fails_as_soon_as_the_daemon_is_killed(
    tmp_path: Path,
) -> None:
    handle = start_daemon(tmp_path)
    client = handle.client(heartbeat=False, timeout_s=5.0)
    keys = keys_for(0, 1)
    assert client.lookup(keys) == 0
    outcome: list[tuple[BaseException | None, float]] = []

    def waiting_call() -> None:
        try:
            client.lookup(keys)
        except CacheUnavailable as exc:
            outcome.append((exc, time.monotonic()))
        else:
            outcome.append((None, time.monotonic()))

    os.kill(handle.process.pid, signal.SIGSTOP)  # the request is sent, no reply comes
    caller = threading.Thread(target=waiting_call)
    caller.start()
    try:
        assert wait_until(lambda: bool(client._outstanding)), "the lookup was sent"
        time.sleep(0.1)  # and its caller waits for the reply
        killed = time.monotonic()
        kill(handle)
        caller.join(timeout=10)
        [(error, failed)] = outcome
        assert isinstance(error, CacheUnavailable) and "exited" in str(error), error
        assert failed - killed < 0.5, f"{failed - killed:.3f}s after the kill"
        handle = start_daemon(tmp_path, name=handle.config.name)
        assert client.lookup(keys) == 0
    finally:
        if handle.process.poll() is None:
            os.kill(handle.process.pid, signal.SIGCONT)
        caller.join(timeout=10)
        client.close()
        if handle.process.poll() is None:
            assert handle.stop() == 0


def test_the_async_client_also_fails_at_once_when_the_daemon_dies(tmp_path: Path) -> None:
    handle = start_daemon(tmp_path)
    keys = keys_for(0, 1)

    async def scenario(client: AsyncCacheClient) -> None:
        nonlocal handle
        assert await client.lookup(keys) == 0
        # Killed between two calls: the next call fails at once.
        pid = handle.process.pid
        kill(handle)
        started = time.monotonic()
        with pytest.raises(CacheUnavailable, match=rf"pid {pid}\) exited"):
            await client.lookup(keys)
        assert time.monotonic() - started < 0.5
        handle = start_daemon(tmp_path, name=handle.config.name)
        assert await client.lookup(keys) == 0, "a new daemon on the same name: hello again"
        # Killed while a call waits for its reply: it fails at once, too.
        os.kill(handle.process.pid, signal.SIGSTOP)
        waiting = asyncio.ensure_future(client.lookup(keys))
        while not client._outstanding:  # until the lookup was sent
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # and its reply is awaited
        killed = time.monotonic()
        kill(handle)
        with pytest.raises(CacheUnavailable, match="exited"):
            await waiting
        assert time.monotonic() - killed < 0.5
        handle = start_daemon(tmp_path, name=handle.config.name)
        assert await client.lookup(keys) == 0

    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(AsyncCacheClient.connect(handle.endpoint, timeout_s=5.0))
    try:
        loop.run_until_complete(scenario(client))
    finally:
        if handle.process.poll() is None:
            os.kill(handle.process.pid, signal.SIGCONT)
        loop.run_until_complete(client.close())
        loop.close()
        if handle.process.poll() is None:
            assert handle.stop() == 0


# -- M6: clients trust only a private runtime directory and arena ------------------------


def test_a_socket_directory_others_can_use_is_refused(daemon: DaemonProcess) -> None:
    runtime = Path(daemon.config.runtime_dir)
    runtime.chmod(0o755)
    try:
        with pytest.raises(UntrustedEndpoint, match="mode 0755.*must be owned by uid"):
            daemon.client()
    finally:
        runtime.chmod(0o700)
    daemon.client().close()


@contextlib.contextmanager
def stand_in_daemon(
    directory: Path, answer: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[str]:
    """A bare ROUTER in a private directory, answering every request with ``answer``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    endpoint = f"ipc://{directory}/stand-in.sock"
    router: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, frame = router.recv_multipart()
                request = msgpack.unpackb(frame, raw=False)
                router.send_multipart([identity, msgpack.packb(answer(request))])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(timeout=5)
        router.close()


def test_an_arena_outside_the_shm_dir_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "planted.arena"
    planted.write_bytes(b"\0" * 8192)
    planted.chmod(0o600)

    def hello(request: dict[str, Any]) -> dict[str, Any]:
        return {"v": m.VERSION, "id": request["id"], "ok": True, "session": 5, "epoch": 7,
                "arena_path": str(planted), "instance_id": b"i" * 16, "arena_bytes": 4096,
                "max_block_bytes": 4096, "heartbeat_s": 10.0}  # fmt: skip

    with (
        stand_in_daemon(tmp_path / "run", hello) as endpoint,
        pytest.raises(UntrustedEndpoint, match="not in /dev/shm"),
    ):
        CacheClient(endpoint, heartbeat=False, timeout_s=2)


def test_a_daemon_of_another_protocol_version_is_named_as_such(tmp_path: Path) -> None:
    def old_daemon(request: dict[str, Any]) -> dict[str, Any]:
        return {"v": 1, "id": request["id"], "ok": False, "code": "version",
                "error": f"request has protocol version {request['v']}; expected 1"}  # fmt: skip

    with (
        stand_in_daemon(tmp_path / "run", old_daemon) as endpoint,
        pytest.raises(ProtocolError, match="another engine protocol version.*same Shoal"),
    ):
        CacheClient(endpoint, heartbeat=False, timeout_s=2)


def test_a_client_of_another_protocol_version_gets_a_version_error(
    daemon: DaemonProcess,
) -> None:
    sock = raw_socket(daemon.endpoint)
    try:
        sock.send(msgpack.packb({"v": 1, "id": 3, "op": "hello", "session": 0}))
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()
    assert (reply["ok"], reply["code"]) == (False, "version")
    assert f"protocol version 1; expected {m.VERSION}" in reply["error"]


# -- m4: clients do not prefault the arena -----------------------------------------------


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mapping of ``path`` (from /proc/self/smaps)."""
    rss, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
    return rss


def test_a_client_maps_the_arena_without_prefaulting_it(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        assert client.lookup(keys_for(0, 1)) == 0
        assert _mapped_rss_kib(daemon.config.arena_path) < 1024, "64 MiB arena, untouched"
        keys = keys_for(0, 1)
        assert client.put(keys, blocks(1)).stored == 1
        assert _mapped_rss_kib(daemon.config.arena_path) >= BLOCK >> 10, "what it touched"


# -- m20: operator verbs need an operator session ----------------------------------------


def test_operator_verbs_are_refused_to_engine_sessions(daemon: DaemonProcess) -> None:
    keys = keys_for(0, 2)
    with daemon.client() as engine, daemon.client(role="operator") as operator:
        assert engine.put(keys, blocks(2)).stored == 2
        for verb in (engine.flush, lambda: engine.evict(NS.model), engine.drain):
            with pytest.raises(RequestRejected) as refused:
                verb()
            assert refused.value.code == "forbidden"
            assert "operator" in refused.value.message
        assert engine.lookup(keys) == 2, "nothing was dropped, and the engine goes on"
        assert operator.flush() == 2
        assert engine.lookup(keys) == 0
    with pytest.raises(ValueError, match="role"):
        daemon.client(role="admin")


IMPOSTOR = """
import os, socket, sys, time
os.setgid(65534)
os.setuid(65534)  # nobody
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen()
print("listening", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(os.getuid() != 0, reason="starting a listener as another user needs root")
def test_a_socket_served_by_another_user_is_refused() -> None:
    # The impostor binds where it may write, and the socket is then moved into a private
    # directory and chowned to this user: only SO_PEERCRED can tell who listens.
    drop = Path(tempfile.mkdtemp(prefix="shoal-drop-", dir="/tmp"))  # nobody can reach it
    drop.chmod(0o777)
    runtime = drop / "run"
    runtime.mkdir(mode=0o700)
    try:
        with run_client(IMPOSTOR, str(drop / "x.sock")) as impostor:
            assert impostor.stdout is not None and impostor.stderr is not None
            assert impostor.stdout.readline().strip() == "listening", impostor.stderr.read()
            os.rename(drop / "x.sock", runtime / "x.sock")
            os.chown(runtime / "x.sock", os.getuid(), os.getgid())
            with pytest.raises(UntrustedEndpoint, match="runs as uid 65534"):
                CacheClient(f"ipc://{runtime}/x.sock", heartbeat=False, timeout_s=2)
    finally:
        shutil.rmtree(drop)
