"""``CacheClient``: the blocking client, one per thread (ZeroMQ sockets are not thread-safe).

It drives the flows of ``kvcache.client.flows`` with blocking ZeroMQ calls over one
DEALER socket. Every public call goes through ``_call``: say hello if there is no live
session (failing at once while the daemon is known down), run the flow, and if the daemon
answers ``unknown_session`` (it restarted, or the session expired while idle) say hello
again and run the flow once more from the start.

A background thread heartbeats over its own socket so an idle client keeps its session
(and its pidfd watch); it renews no lease (``kvcache.store``). When a heartbeat meets
``unknown_session`` the thread only flags the session stale, and the next call says hello
before it sends anything, since the call socket belongs to the caller's thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import zmq

from kvcache import messages as m
from kvcache.client.flows import (
    BlockView,
    ClusterLookup,
    PutResult,
    Reservation,
    _ClientFlows,
    _Collect,
    _Flow,
    _Later,
)
from kvcache.client.session import SessionLost
from kvcache.config import CacheConfig
from kvcache.errors import CacheUnavailable, ProtocolError
from kvcache.keys import join_keys
from kvcache.store import ReserveStatus
from kvcache.tiers import block_checksum

__all__ = ["CacheClient"]

T = TypeVar("T")


class CacheClient(_ClientFlows):
    """Blocking client; one per thread (ZeroMQ sockets are not thread-safe).

    ``role`` is ``"engine"`` (the default) or ``"operator"`` (may also evict, flush and
    drain). ``populate`` prefaults the arena mapping (off: the daemon populated it).
    ``shm_dir`` is where the daemon's arena must lie (default ``$SHOAL_CACHE_SHM_DIR`` or
    /dev/shm). After a failure, calls raise ``CacheUnavailable`` at once for
    ``retry_interval_s`` before the next reconnect attempt.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        namespace: str = "",
        name: str = "shoal-client",
        role: str = m.ENGINE,
        timeout_s: float = 5.0,
        verify_reads: bool = True,
        populate: bool = False,
        heartbeat: bool = True,
        shm_dir: str | None = None,
        retry_interval_s: float = 1.0,
    ) -> None:
        super().__init__(
            endpoint or CacheConfig().endpoint,
            namespace=namespace,
            name=name,
            role=role,
            timeout_s=timeout_s,
            verify_reads=verify_reads,
            populate=populate,
            shm_dir=shm_dir,
            retry_interval_s=retry_interval_s,
        )
        self._context = zmq.Context()
        self._heartbeat = heartbeat
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._poller: tuple[Any, int, zmq.Poller] | None = None  # (socket, pidfd, poller)
        try:
            self._connect()
        except BaseException:
            self._reset()
            self._drop_arena()
            self._unwatch_daemon()
            self._context.term()
            raise

    # -- transport -------------------------------------------------------------------

    def _connect(self) -> None:
        """Say hello (on the current socket, or a new one); fails fast while down."""
        self._check_reachable()
        if self._socket is None:
            self._socket = self._open_socket()
        self._drive(self._hello_flow())
        self._down_until = 0.0
        if self._heartbeat and self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name="shoal-cache-heartbeat", daemon=True
            )
            self._heartbeat_thread.start()

    def _call(self, make_flow: Callable[[], _Flow[T]]) -> T:
        if self._needs_hello():
            self._connect()
        try:
            return self._drive(make_flow())
        except SessionLost:
            self._forget_session()  # the daemon restarted or dropped us: not an error
        self._connect()
        try:
            return self._drive(make_flow())
        except SessionLost as exc:
            self._forget_session()
            raise CacheUnavailable(
                f"the cache daemon at {self.endpoint} dropped a session right after "
                f"granting it ({exc})"
            ) from None

    def _send(self, request: m.Request) -> int:
        assert self._socket is not None, "sending on a closed socket"
        if request.expects_reply:
            self._outstanding.add(request.id)
        try:
            self._socket.send(request.encode(), copy=False)
        except zmq.ZMQError as exc:
            raise self._transport_failed(exc) from None
        return request.id

    def _await(self, request_id: int) -> dict[str, Any]:
        assert self._socket is not None, "awaiting a reply on a closed socket"
        try:
            deadline = time.monotonic() + self.timeout_s
            while (reply := self._take_reply(request_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out()
                if self._poll(int(remaining * 1000) + 1):
                    self._file_reply(self._decode(self._socket.recv()))
            return reply
        except zmq.ZMQError as exc:
            raise self._transport_failed(exc) from None

    def _poll(self, timeout_ms: int) -> bool:
        """Wait until the call socket is readable (True) or ``timeout_ms`` passed (False);
        raises ``CacheUnavailable`` as soon as the watched daemon exits."""
        if self._pidfd < 0:
            return bool(self._socket.poll(timeout_ms))
        if self._poller is None or self._poller[:2] != (self._socket, self._pidfd):
            poller = zmq.Poller()
            poller.register(self._socket, zmq.POLLIN)
            poller.register(self._pidfd, zmq.POLLIN)
            self._poller = (self._socket, self._pidfd, poller)
        ready = dict(self._poller[2].poll(timeout_ms))
        if self._socket in ready:
            return True  # replies first: a daemon that answered, then died, answered
        if self._pidfd in ready:
            raise self._daemon_gone()
        return False

    def _drive(self, flow: _Flow[T]) -> T:
        reply: dict[str, Any] | None = None
        sent = False
        try:
            while True:
                step = flow.send(reply)
                sent = True
                if isinstance(step, _Collect):
                    reply = self._await(step.request_id)
                elif isinstance(step, _Later):
                    self._send(step.request)
                    reply = None
                else:
                    request_id = self._send(step)
                    reply = self._await(request_id) if step.expects_reply else None
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except SessionLost:
            raise  # nothing to end: the daemon does not know the session
        except BaseException:
            if sent:
                self._abandon_session()
            raise

    def _heartbeat_loop(self) -> None:
        """Beat every ``heartbeat_s``; the replies that came meanwhile are read first, so
        a forgotten session is flagged one beat later, and nothing here ever waits."""
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        sent: dict[int, int] = {}  # heartbeat id -> the session it was for
        ids = itertools.count(1)
        try:
            while not self._heartbeat_stop.wait(self.heartbeat_s):
                while socket.poll(0):
                    try:
                        reply = self._decode(socket.recv())
                    except ProtocolError:
                        continue  # the next call meets (and reports) the same problem
                    beat_session = sent.pop(reply["id"], 0)
                    if not reply["ok"] and reply.get("code") == m.ErrorCode.UNKNOWN_SESSION:
                        self._stale_session = beat_session  # the next call says hello first
                if len(sent) > 64:  # replies that never came (the daemon is down)
                    sent.clear()
                session, epoch = self._credentials
                if session:
                    request_id = next(ids)
                    sent[request_id] = session
                    request = m.HeartbeatRequest(id=request_id, session=session, epoch=epoch)
                    socket.send(request.encode())
        finally:
            socket.close(linger=0)

    # -- public API ------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` cached (any tier), in one round trip."""
        return self._call(lambda: self._lookup_flow(keys))

    def put(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Any],
        parent: bytes | None = None,
        *,
        wait: bool = True,
    ) -> PutResult:
        """Store a chain of blocks (``parent`` = key before ``keys[0]``).

        Two round trips; with ``wait=False`` the commit is one-way (one round trip): the
        blocks become visible as soon as the daemon reads it, later requests on this client
        are ordered after it, and ``stored`` counts the blocks sent for commit.
        """
        return self._call(lambda: self._put_flow(keys, payloads, parent, wait))

    def get_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        """Copy the longest cached, verified prefix of ``keys`` into ``outs``; return its length.

        ``outs`` past that length may hold anything (a corrupt block is copied, then fails
        its check): use only the first ``n``."""
        return self._call(lambda: self._get_into_flow(keys, outs))

    def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int], parent: bytes | None = None
    ) -> list[Reservation | ReserveStatus]:
        return self._call(lambda: self._reserve_flow(keys, sizes, parent))

    def commit(
        self, reservations: Sequence[Reservation], checksums: Sequence[int] | None = None
    ) -> int:
        """Publish filled reservations. Checksums are computed from the arena bytes unless
        given (a writer that hashed each piece right after writing it, while it was still
        in cache); a wrong one makes the block fail every reader's verification.

        Reservations made before the daemon restarted commit nothing (0): their bytes
        went to the old arena."""
        if checksums is None:
            checksums = [block_checksum(r.buffer) for r in reservations]
        elif len(checksums) != len(reservations):
            raise ValueError(f"{len(reservations)} reservations but {len(checksums)} checksums")
        keys = [r.key for r in reservations]
        return self._call(lambda: self._commit_flow(keys, checksums))

    def abort(self, keys: Sequence[bytes]) -> None:
        self._call(lambda: self._simple_flow(m.AbortRequest, keys=join_keys(keys)))

    def get(self, keys: Sequence[bytes], *, prefix: bool = True) -> list[BlockView | None]:
        """Lease blocks for zero-copy reads; ``release`` them when done (leases expire
        ``lease_ttl_s`` after this client's last get/release)."""
        return self._call(lambda: self._get_flow(keys, prefix))

    def release(self, blocks: Sequence[BlockView]) -> None:
        self._call(lambda: self._release_flow([b.key for b in blocks]))

    def delete(self, keys: Sequence[bytes]) -> int:
        reply = self._call(lambda: self._simple_flow(m.DeleteRequest, keys=join_keys(keys)))
        return int(reply["deleted"])

    def stats(self) -> dict[str, Any]:
        return dict(self._call(lambda: self._simple_flow(m.StatsRequest))["stats"])

    # -- cluster ---------------------------------------------------------------------

    def locate(self, keys: Sequence[bytes]) -> ClusterLookup:
        """Longest prefix of ``keys`` cached here and, beyond it, on peers (one round trip)."""
        return self._call(lambda: self._locate_flow(keys))

    def fetch(self, keys: Sequence[bytes]) -> int:
        """Bring peers' blocks of the chain here; returns the local prefix length after.

        A dead or slow peer costs at most the daemon's ``cluster_fetch_timeout_s``; its
        blocks stay misses.
        """
        return self._call(lambda: self._fetch_flow(keys))

    def cluster_status(self, *, samples: bool = False) -> dict[str, Any]:
        """Members, epochs, sync state and (``samples``) propagation samples since last call."""
        reply = self._call(lambda: self._simple_flow(m.ClusterRequest, samples=samples))
        return dict(reply["cluster"])

    # -- operator verbs (role="operator") ---------------------------------------------

    def evict(self, namespace: str = "", key_prefix: str = "") -> int:
        reply = self._call(
            lambda: self._simple_flow(m.EvictRequest, namespace=namespace, key_prefix=key_prefix)
        )
        return int(reply["evicted"])

    def flush(self) -> int:
        return int(self._call(lambda: self._simple_flow(m.FlushRequest))["flushed"])

    def drain(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Stop the daemon taking blocks, hand hot blocks to peers, leave; waits for it."""
        saved, self.timeout_s = self.timeout_s, timeout_s
        try:
            reply = self._call(lambda: self._simple_flow(m.DrainRequest))
        finally:
            self.timeout_s = saved
        return {"handed_off": reply["handed_off"], "peers": reply["peers"]}

    def close(self) -> None:
        """End the session (after this client's one-way requests) and unmap the arena."""
        self._heartbeat_stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2)
        bye = self._bye_request()
        if bye is not None:
            try:
                self._socket.send(bye, zmq.NOBLOCK)
            except zmq.ZMQError:  # at the high-water mark: a socket of its own then
                self._farewell(self.session, self.epoch)
        self._close_socket_after_bye()
        self._drop_arena()
        self._unwatch_daemon()
        self._poller = None
        self._context.term()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
