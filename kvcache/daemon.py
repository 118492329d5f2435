"""The node-local cache daemon: one thread, one ROUTER socket, the store, the arena.

Why one thread: every request is metadata work of microseconds (the payload moves through
shared memory, copied by the client), so a single loop over a ZeroMQ poller keeps the store
lock-free and the order of operations total. Demotion copies between memory tiers (SHM →
DRAM) run inline on the request that needed the room; they are DRAM-speed and bounded by
the batch. Disk I/O never runs on the loop: SSD spills and SSD reads run on a pool of
``io_threads`` workers (``kvcache.io_workers``); their completions wake the poller
through a pipe and are applied on the loop thread, and a ``get`` that needs an SSD block
is answered when its read lands, while the loop serves everyone else.

Client liveness, so a crashed engine cannot pin memory forever:

* A client in the daemon's pid namespace is watched through a pidfd registered in the same
  poller: kill -9 of the client makes the fd readable and its session (leases and
  reservations) is closed on the next loop turn.
* Any client (also one in another container) must send a request at least every
  ``session_ttl_s``; the client library heartbeats from a background thread. An idle
  session past its TTL is closed (a client that comes back says hello again, by itself).
* Leases expire ``lease_ttl_s`` after the session's last get/release, whatever its
  heartbeats say (``BlockStore.expire_leases``): an engine whose I/O thread hangs while
  its heartbeat thread lives cannot pin blocks forever.
* A reservation not committed within ``reservation_ttl_s`` is reclaimed, whatever its
  session does (a writer stuck mid-copy).

Sessions are random 64-bit tokens (``secrets``), bound to the ROUTER identity of the
connection that said hello and to this daemon's ``epoch`` (from the arena's instance id),
both checked on every request (``kvcache.messages`` has the rules): after a restart a stale
client meets ``unknown_session`` and says hello again instead of acting on whichever
session now has its old number. Tokens are secrets and are never logged; logs name a
session by its ``serial``, a counter. ``evict``, ``flush`` and ``drain`` need a session
whose hello declared the ``operator`` role.

Engines' GPU prefixes: with ``engine_events`` the daemon also subscribes to its engines'
vLLM KV events (``kvcache.cluster.engine_feed``), in the same poller and loop turn, and
publishes what each engine holds on its GPU as a cluster stream of its own; ``locate``
answers those holders next to the daemons'.

Bad input never stops the loop: oversized, malformed or wrong-version frames and invalid
requests get an error reply (``kvcache.messages.ErrorCode``) and a counted metric.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import secrets
import select
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

from kvcache import checksums
from kvcache import messages as m
from kvcache.allocator import SlabAllocator
from kvcache.arena import DATA_OFFSET, Arena
from kvcache.cluster.base import Cluster, NullCluster
from kvcache.cluster.engine_feed import EngineFeed, NullEngineFeed, ZmqEngineFeed, engine_settings
from kvcache.cluster.node import ClusterNode
from kvcache.cluster.settings import cluster_settings, node_name
from kvcache.config import CacheConfig
from kvcache.errors import CacheError, ProtocolError
from kvcache.io_workers import InlineIo, IoWorkers, ThreadIo
from kvcache.keys import Namespace, split_keys
from kvcache.metrics import CacheMetrics, ProbeServer
from kvcache.scans import StepScans
from kvcache.store import BlockStore, ReserveStatus
from kvcache.tiers import FileBacking, MemoryBacking, Tier, TierStore

__all__ = ["CacheDaemon"]

log = logging.getLogger("shoal." + __name__)

_HOUSEKEEPING_S = 0.1
_IDLE_STEP = 16  # deferred eviction records applied per step when idle
_IDLE_SLICE_S = 100e-6  # idle steps between two polls (see _idle_slice)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(slots=True)
class _Client:
    session_id: int  # the secret token
    serial: int  # what logs call the session
    identity: bytes  # ROUTER identity of the connection that said hello
    role: str
    pid: int
    namespace: str
    name: str
    last_seen: float
    pidfd: int = -1


# How many times a get waits for file-tier reads before it answers with what is in memory.
_GET_PREPARE_ROUNDS = 4

# Accepted from any connection that knows the token and epoch: the client heartbeats from
# its own thread's socket, and ends a failed call's session over a fresh one.
_ANY_CONNECTION = (m.HeartbeatRequest, m.ByeRequest)


def freeze_survivors() -> None:
    """Collect the objects made since the last tick, then freeze the survivors.

    Block metadata is long-lived and acyclic (freed by reference counting), yet a full
    collection walks all of it: 20-350 ms stalls at 0.1-1M blocks, measured by
    bench/cluster.py. Freezing takes what survived out of every later collection (an O(1)
    list splice). Before freezing, the young generations (only what was allocated since
    the last tick, ~100 ms ago: cheap) are collected, so a reference cycle that is garbage
    by the end of the tick it was made in (an exception's traceback, a closure) is freed,
    never frozen. Residual risk, accepted: a cycle that lives longer than one tick and
    is dropped later stays; the daemon's own structures form none, and the
    ``shoal_kvcache_resident_bytes`` and ``shoal_kvcache_gc_frozen_objects`` gauges make a
    slow leak visible. Rejected: an occasional full collection (the stall this avoids).
    """
    gc.collect(1)
    gc.freeze()


def _keep_malloc_arenas() -> None:
    """Stop glibc returning freed memory to the kernel on every large free.

    ZeroMQ allocates each received frame (a 1 MiB peer-fetch block) with malloc; by
    default glibc serves those with mmap and unmaps them on free, so every frame costs
    page faults again (10-28k per 256 MiB, halving peer-fetch throughput in
    bench/cluster.py). Keeping them in the heap makes the buffers reused.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 1 << 30)


class CacheDaemon:
    """Owns the arena, the tiers, the store and the control socket."""

    def __init__(self, config: CacheConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        if config.cluster_port:
            _keep_malloc_arenas()
        self._stop = threading.Event()
        self._shutdown = threading.Event()  # SIGTERM: drain, then stop
        self._shutdown_deadline: float | None = None
        self._left_cluster = False
        self._ready = False
        self._last_turn = time.monotonic()  # read by /healthz from the HTTP thread
        self._clients: dict[int, _Client] = {}
        self._pidfds: dict[int, int] = {}  # pidfd -> session id
        self._by_identity: dict[bytes, int] = {}  # ROUTER identity -> its session
        self._next_serial = 1
        self._pid_ns = _pid_namespace()
        self.metrics = CacheMetrics()
        runtime = config.runtime_path
        runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
        if runtime.stat().st_uid != os.getuid() or runtime.stat().st_mode & 0o077:
            raise CacheError(
                f"runtime dir {runtime} must be owned by this user with mode 0700 "
                "(it is what keeps the control socket private)"
            )
        self.arena = Arena(config.arena_path, config.shm_bytes, populate=config.populate)
        # Nonzero: 0 is what hello carries.
        self.epoch = int.from_bytes(self.arena.header.instance_id[:8], "little") or 1
        tiers = [
            TierStore(
                Tier.SHM,
                SlabAllocator(config.shm_bytes, config.slab_bytes),
                MemoryBacking(self.arena.mmap, DATA_OFFSET),
            )
        ]
        if config.dram_bytes:
            tiers.append(
                TierStore(
                    Tier.DRAM,
                    SlabAllocator(config.dram_bytes, config.slab_bytes),
                    MemoryBacking.anonymous(config.dram_bytes),
                )
            )
        if config.ssd_dir:
            path = Path(config.ssd_dir) / f"shoal-{config.name}.spill"
            try:
                backing = FileBacking(path, config.ssd_bytes)
            except OSError as exc:
                self.arena.close()
                raise CacheError(f"cannot create SSD spill file {path}: {exc}") from None
            tiers.append(
                TierStore(Tier.SSD, SlabAllocator(config.ssd_bytes, config.slab_bytes), backing)
            )
        self._tiers = tiers
        # File-tier moves (SSD spill and reads) run on workers; memory copies stay inline.
        self._io: IoWorkers = InlineIo()
        self._io_fd = -1
        if any(not tier.in_memory for tier in tiers):
            threads = ThreadIo(config.io_threads)
            self._io, self._io_fd = threads, threads.fileno()
        self.store = BlockStore(
            tiers,
            policy=config.policy,
            reservation_ttl_s=config.reservation_ttl_s,
            clock=clock,
            io=self._io,
            max_staging_bytes=config.io_staging_bytes,
            record_events=bool(config.cluster_port),  # only a cluster member publishes them
        )
        self._metrics_server: ProbeServer | None = None
        self.engines: EngineFeed = NullEngineFeed()
        self._engine_namespace_learned = False
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Hard cap far above the soft cap: frames between the two get an error reply.
        self._socket.setsockopt(zmq.MAXMSGSIZE, config.max_request_bytes * 4)
        config.socket_path.unlink(missing_ok=True)
        try:
            self._socket.bind(config.endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise CacheError(f"cannot bind {config.endpoint}: {exc}") from None
        os.chmod(config.socket_path, 0o600)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        if self._io_fd >= 0:
            self._poller.register(self._io_fd, select.POLLIN)
        self._identity = b""  # of the request being handled, for replies sent later
        # Long scans (an operator's evict) advance one bounded step per loop turn.
        self._tasks = StepScans()  # long scans (operators' evicts), one step a turn
        self.cluster: Cluster = NullCluster()
        if config.cluster_port:
            shm = tiers[0].backing
            assert isinstance(shm, MemoryBacking), "the SHM tier is backed by the arena mapping"
            try:
                self.cluster = ClusterNode(
                    cluster_settings(config),
                    self.store,
                    shm,
                    self._context,
                    self.metrics.registry,
                    on_leave=self._cluster_left,
                    clock=clock,
                )
            except (CacheError, ValueError) as exc:
                self.close()
                raise CacheError(f"cannot join the cluster: {exc}") from None
        self.cluster.register(self._poller)
        if config.engine_events:
            try:
                self.engines = ZmqEngineFeed(
                    engine_settings(config, node_name(config)),
                    self._context,
                    self.metrics.registry,
                    clock=clock,
                )
            except CacheError:
                self.close()
                raise
            for stream in self.engines.streams:
                self.cluster.add_engine(stream, functools.partial(self.engines.snapshot, stream))
        self.engines.register(self._poller)
        self._handlers: dict[type[m.Request], Callable[[Any], dict[str, Any] | None]] = {
            m.HelloRequest: self._hello,
            m.LookupRequest: self._lookup,
            m.ReserveRequest: self._reserve,
            m.CommitRequest: self._commit,
            m.AbortRequest: self._abort,
            m.GetRequest: self._get,
            m.ReleaseRequest: self._release,
            m.DeleteRequest: self._delete,
            m.StatsRequest: self._stats,
            m.HeartbeatRequest: lambda request: {},
            m.ByeRequest: self._bye,
            m.LocateRequest: self._locate,
            m.FetchRequest: self._fetch,
            m.ClusterRequest: self._cluster_status,
            m.EvictRequest: self._evict,
            m.FlushRequest: lambda r: {"flushed": self.store.clear()},
            m.DrainRequest: self._drain,
        }
        if config.metrics_port:
            try:
                self._metrics_server = ProbeServer(
                    config.metrics_host,
                    config.metrics_port,
                    self.metrics.registry,
                    health=self._healthy,
                    ready=self._readiness,
                )
            except OSError as exc:
                self.close()
                raise CacheError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: "
                    f"{exc.strerror}; another daemon or process holds that port: choose "
                    "another --metrics-port (0 = off)"
                ) from None
        self._ready = True
        log.info(
            "cache daemon ready",
            extra={
                "endpoint": config.endpoint,
                "arena": str(config.arena_path),
                "tiers": [t.tier.label for t in tiers],
                "shm_bytes": config.shm_bytes,
                "dram_bytes": config.dram_bytes,
                "checksums": checksums.IMPLEMENTATION,
            },
        )

    # -- lifecycle -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until ``stop()``, or SIGTERM/SIGINT (when called from the main thread).

        The first signal shuts down gracefully (``_begin_shutdown``); a second one stops
        at once.
        """
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.request_shutdown())
        try:
            self._loop()
        finally:  # whatever happened, remove the arena and the socket
            self.close()

    def _loop(self) -> None:
        next_housekeeping = 0.0
        while not self._stop.is_set():
            self._step_tasks()
            ready = self._poller.poll(timeout=0)
            while not ready and self._idle_slice():
                ready = self._poller.poll(timeout=0)  # idle: bookkeeping in small slices
            if not ready:  # a long scan in progress goes on at once
                ready = self._poller.poll(timeout=0 if self._tasks else int(_HOUSEKEEPING_S * 1000))
            # Exits first: a pidfd number freed by a bye in this batch may be reused by a
            # hello in the same batch, and its stale event must not close the new session.
            turn_started = time.time()
            self._last_turn = time.monotonic()
            for sock_or_fd, _ in sorted(ready, key=lambda event: event[0] is self._socket):
                if sock_or_fd is self._socket:
                    self._drain_socket()
                elif sock_or_fd == self._io_fd and isinstance(self._io, ThreadIo):
                    self._io.run_completions()  # replies to reads parked on them go out
                elif isinstance(sock_or_fd, int):
                    self._client_exited(sock_or_fd)
                elif self.cluster.owns(sock_or_fd):
                    self.cluster.handle(sock_or_fd)
                elif self.engines.owns(sock_or_fd):
                    self.engines.handle(sock_or_fd)
            # Events go out every turn, not every housekeeping tick: propagation latency
            # is one loop turn, and a busy turn batches many events into one message.
            self.cluster.publish(self.store.take_events(), turn_started)
            for stream, events in self.engines.take_events():
                self.cluster.publish_engine(stream, events, turn_started)
            now = self._clock()
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + _HOUSEKEEPING_S

    def _idle_slice(self) -> bool:
        """Deferred bookkeeping (eviction records, a flush's reclaim, the cluster's idle
        work) in small steps for up to ``_IDLE_SLICE_S``; True if more remains.

        A time slice, not one step, between two polls: a poll costs as much as a few
        records, so polling after every 16 spent a tenth of the idle work on polls
        (issue 17); a request arriving meanwhile waits one slice at most.
        """
        deadline = time.perf_counter() + _IDLE_SLICE_S
        while self.store.flush_policies(limit=_IDLE_STEP) or self.cluster.idle_step():
            if time.perf_counter() >= deadline:
                return True
        return False

    def stop(self) -> None:
        self._stop.set()

    def request_shutdown(self) -> None:
        """Graceful stop (SIGTERM): the loop drains, then exits; a second call stops now."""
        if self._shutdown.is_set():
            self._stop.set()
        self._shutdown.set()

    def _begin_shutdown(self, now: float) -> None:
        """Stop taking new blocks; let leases and writes in flight finish, and a cluster
        member hand its hot blocks to peers and leave, until ``shutdown_timeout_s``."""
        self._shutdown_deadline = now + self.config.shutdown_timeout_s
        log.info(
            "shutting down: no new reservations; waiting for leases and writes in flight",
            extra={"timeout_s": self.config.shutdown_timeout_s},
        )
        if isinstance(self.cluster, NullCluster):
            self._left_cluster = True
        elif not self.cluster.draining:
            self.cluster.drain(lambda result: log.info("handed off to peers", extra=result))

    def _shutdown_finished(self, now: float) -> bool:
        assert self._shutdown_deadline is not None, "checked only once a shutdown began"
        stats = self.store.statistics()
        settled = stats.num_leases == 0 and stats.num_reservations == 0
        settled = settled and self._io.num_pending == 0  # moves in flight land first
        if settled and self._left_cluster:
            return True
        if now >= self._shutdown_deadline:
            log.warning(
                "shutdown timeout: exiting with work in flight",
                extra={"leases": stats.num_leases, "reservations": stats.num_reservations,
                       "left_cluster": self._left_cluster},
            )  # fmt: skip
            return True
        return False

    def _cluster_left(self) -> None:
        self._left_cluster = True
        if self._shutdown_deadline is None:  # a drain asked for over the wire: stop now
            self.stop()

    def _healthy(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self._last_turn
        if stalled > self.config.health_stall_s:
            return False, f"loop stalled for {stalled:.1f} s"
        return True, "ok"

    def _readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, "starting"
        if self._shutdown.is_set():
            return False, "shutting down"
        if self.cluster.draining:
            return False, "draining"
        return True, "ok"

    def close(self) -> None:
        self.engines.close()
        self.cluster.close()
        for pidfd in list(self._pidfds):
            os.close(pidfd)
        self._pidfds.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        # Moves in flight finish first: they touch the tiers closed below, and a read
        # that lands still answers its client over the socket closed next. Bounded:
        # a job hung on a dead disk is abandoned after ThreadIo's close timeout.
        self._io.close()
        # A short linger: the reply to a drain (sent just before stopping) must get out.
        self._socket.close(linger=200)
        self._context.term()
        self.config.socket_path.unlink(missing_ok=True)
        for tier in self._tiers:
            tier.close()  # the SHM tier releases its view of the arena mapping first
        self.arena.close()
        log.info("cache daemon stopped", extra={"daemon": self.config.name})

    # -- loop ------------------------------------------------------------------------

    def _drain_socket(self) -> None:
        for _ in range(256):  # bounded, so housekeeping and pidfds are never starved
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.metrics.protocol_errors.labels(m.ErrorCode.MALFORMED).inc()
                if frames:
                    self._send(
                        frames[0], m.encode_error(0, m.ErrorCode.MALFORMED, "one frame expected")
                    )
                continue
            identity, frame = frames
            self._identity = identity
            reply = self._handle(identity, frame)
            if reply is not None:
                self._send(identity, reply)

    def _send(self, identity: bytes, reply: bytes) -> None:
        try:
            self._socket.send_multipart([identity, reply], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a reply to a client that stopped reading")

    def _handle(self, identity: bytes, frame: bytes) -> bytes | None:
        started = time.perf_counter()
        if len(frame) > self.config.max_request_bytes:
            return self._error(
                m.peek_id(frame[:64]),
                m.ErrorCode.TOO_LARGE,
                f"request of {len(frame)} bytes exceeds {self.config.max_request_bytes}",
            )
        try:
            request = m.decode_request(frame)
        except ProtocolError as exc:
            return self._error(m.peek_id(frame), m.ErrorCode(exc.code), str(exc))
        if not isinstance(request, m.HelloRequest):
            client = self._authorise(request, identity)
            if client is None:
                return self._error(
                    request.id,
                    m.ErrorCode.UNKNOWN_SESSION,
                    "session unknown to this daemon (it restarted, or the session expired "
                    "or ended); say hello",
                )
            if isinstance(request, m.OPERATOR_VERBS) and client.role != m.OPERATOR:
                return self._error(
                    request.id,
                    m.ErrorCode.FORBIDDEN,
                    f"{request.op} is an operator verb and this session said hello as "
                    f"{client.role!r}; use `shoal cache {request.op}` (role {m.OPERATOR!r})",
                )
            client.last_seen = self._clock()
        try:
            result = self._handlers[type(request)](request)
        except ValueError as exc:
            return self._error(request.id, m.ErrorCode.BAD_REQUEST, str(exc))
        except Exception as exc:  # the daemon outlives any one request; logged, counted, answered
            log.exception("request failed", extra={"op": request.op})
            return self._error(request.id, m.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self.metrics.request_latency(request.op).observe(time.perf_counter() - started)
        if not request.expects_reply or result is None:
            return None
        return m.encode_reply(request.id, **result)

    def _authorise(self, request: m.Request, identity: bytes) -> _Client | None:
        """The session a request may act on: live token, this daemon's epoch, and the
        connection that said hello (heartbeat and bye: any connection with the token)."""
        client = self._clients.get(request.session)
        if client is None or request.epoch != self.epoch:
            return None
        if client.identity != identity and not isinstance(request, _ANY_CONNECTION):
            return None
        return client

    def _error(self, request_id: int, code: m.ErrorCode, message: str) -> bytes:
        self.metrics.protocol_errors.labels(code).inc()
        log.warning("rejected request", extra={"code": str(code), "reason": message})
        return m.encode_error(request_id, code, message)

    def _housekeeping(self, now: float) -> None:
        if self._shutdown.is_set():
            if self._shutdown_deadline is None:
                self._begin_shutdown(now)
            if self._shutdown_finished(now):
                self._stop.set()
        self.store.expire()
        if expired := self.store.expire_leases():
            log.warning("leases expired: their reader made no get/release for lease_ttl_s",
                        extra={"leases": expired})  # fmt: skip
        ttl = self.config.session_ttl_s
        for client in [c for c in self._clients.values() if now - c.last_seen > ttl]:
            log.info("client timed out", extra={"session": client.serial, "pid": client.pid})
            self.metrics.sessions_ended.labels("ttl").inc()
            self._close_session(client.session_id)
        self.cluster.publish(self.store.take_events(), time.time())
        self.engines.tick(now)
        for stream, events in self.engines.take_events():  # a replay timed out into a reset
            self.cluster.publish_engine(stream, events, time.time())
        self.cluster.tick(now)
        freeze_survivors()
        self.metrics.update(self.store.statistics())

    def _client_exited(self, pidfd: int) -> None:
        session_id = self._pidfds.get(pidfd)
        client = self._clients.get(session_id) if session_id is not None else None
        if client is not None:
            log.info("client exited; releasing its leases", extra={"session": client.serial})
            self.metrics.sessions_ended.labels("exit").inc()
            self._close_session(client.session_id)

    def _close_session(self, session_id: int) -> None:
        client = self._clients.pop(session_id, None)
        if client is None:
            return
        if self._by_identity.get(client.identity) == session_id:
            del self._by_identity[client.identity]
        if client.pidfd >= 0:
            self._poller.unregister(client.pidfd)
            del self._pidfds[client.pidfd]
            os.close(client.pidfd)
        self.store.close_session(session_id)

    # -- handlers --------------------------------------------------------------------

    def _hello(self, request: m.HelloRequest) -> dict[str, Any]:
        if request.role not in m.ROLES:
            raise ValueError(f"role {request.role!r} must be one of {', '.join(m.ROLES)}")
        identity = self._identity
        # One session per connection: a client saying hello again (its session expired, or
        # a heartbeat found it unknown) leaves nothing behind under its old token.
        if (previous := self._by_identity.get(identity)) is not None:
            self._close_session(previous)
        session_id = 0
        while not session_id or session_id in self._clients:
            session_id = secrets.randbits(64)
        serial, self._next_serial = self._next_serial, self._next_serial + 1
        client = _Client(session_id, serial, identity, request.role, request.pid,
                         request.namespace, request.client, self._clock())  # fmt: skip
        if request.pid_ns == self._pid_ns and request.pid > 0:
            try:
                client.pidfd = os.pidfd_open(request.pid)
            except (OSError, OverflowError):
                client.pidfd = -1  # not visible: the session TTL covers it
            else:
                self._pidfds[client.pidfd] = session_id
                self._poller.register(client.pidfd, select.POLLIN)
        self._clients[session_id] = client
        self._by_identity[identity] = session_id
        self.store.open_session(
            session_id,
            self._learn_namespace(request.namespace),
            lease_ttl_s=self.config.lease_ttl_s,
        )
        log.info(
            "client connected",
            extra={"session": serial, "pid": request.pid, "client": request.client,
                   "namespace": request.namespace, "role": request.role},
        )  # fmt: skip
        return {
            "session": session_id,
            "epoch": self.epoch,
            "arena_path": str(self.arena.path),
            "instance_id": self.arena.header.instance_id,
            "arena_bytes": self.arena.data_bytes,
            "max_block_bytes": self.store.max_block_bytes,
            "heartbeat_s": self.config.session_ttl_s / 3,
            "pid": os.getpid(),  # a client in this pid namespace watches it (pidfd)
            "pid_ns": self._pid_ns,
        }

    def _learn_namespace(self, text: str) -> str:
        """A connector's hello carries its key namespace (``Namespace.to_wire``); without
        ``--engine-layout`` the engines' KV events are keyed in the first one that matches
        ``engine_model`` / ``engine_tp_rank`` (stage 0). Returns the session's label."""
        namespace = Namespace.from_wire(text)
        if namespace is None:
            return text
        wanted = self.config
        if (
            wanted.engine_layout == "default"  # not given: learn it
            and not self._engine_namespace_learned
            and namespace.tp_rank == wanted.engine_tp_rank
            and namespace.pp_rank == 0
            and _names_model(wanted.engine_model, namespace.model)
        ) and self.engines.learn_namespace(namespace):
            self._engine_namespace_learned = True
            log.info("engines' key namespace learned from a connector",
                     extra={"namespace": namespace.label()})  # fmt: skip
        return namespace.label()

    def _lookup(self, request: m.LookupRequest) -> dict[str, Any]:
        return {"length": self.store.lookup(split_keys(request.keys))}

    def _reserve(self, request: m.ReserveRequest) -> dict[str, Any]:
        keys = split_keys(request.keys)
        if self.cluster.draining or self._shutdown.is_set():  # no new blocks when leaving
            return {"statuses": bytes([ReserveStatus.NO_SPACE] * len(keys)),
                    "offsets": [0] * len(keys)}  # fmt: skip
        statuses, offsets = self.store.reserve_columns(
            request.session, keys, request.sizes, request.parent
        )
        return {"statuses": statuses, "offsets": offsets}

    def _commit(self, request: m.CommitRequest) -> dict[str, Any]:
        keys = split_keys(request.keys)
        return {"committed": self.store.commit(request.session, keys, request.checksums)}

    def _abort(self, request: m.AbortRequest) -> dict[str, Any]:
        self.store.abort(request.session, split_keys(request.keys))
        return {}

    def _get(self, request: m.GetRequest) -> dict[str, Any] | None:
        keys, identity = split_keys(request.keys), self._identity
        rounds = 0

        def resume() -> None:  # on the loop thread, once the blocks' file reads landed
            nonlocal rounds
            if request.session not in self._clients:
                return  # it left (bye, exit) meanwhile
            # A block whose demotion landed while we waited is on the file tier again:
            # bring it up too rather than answer a miss (bounded: a thrashing tier misses).
            rounds += 1
            try:
                if rounds < _GET_PREPARE_ROUNDS and not self.store.prepare(
                    keys, resume, prefix=request.prefix
                ):
                    return
                reply = m.encode_reply(request.id, **self._leases(request, keys))
            except Exception as exc:  # outside _handle's try: answered here, like there
                log.exception("parked get failed", extra={"op": request.op})
                reply = self._error(
                    request.id, m.ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                )
            self._send(identity, reply)

        if not self.store.prepare(keys, resume, prefix=request.prefix):
            return None  # no reply yet: the loop goes on serving others meanwhile
        return self._leases(request, keys)

    def _leases(self, request: m.GetRequest, keys: Sequence[bytes]) -> dict[str, Any]:
        offsets, sizes, checksums = self.store.acquire_columns(
            request.session, keys, prefix=request.prefix
        )
        return {"offsets": offsets, "sizes": sizes, "checksums": checksums}

    def _release(self, request: m.ReleaseRequest) -> None:
        self.store.release(request.session, split_keys(request.keys))

    def _delete(self, request: m.DeleteRequest) -> dict[str, Any]:
        return {"deleted": self.store.delete(split_keys(request.keys))}

    def _stats(self, request: m.StatsRequest) -> dict[str, Any]:
        stats = self.store.statistics()
        body = asdict(stats)
        body["tiers"] = [asdict(t) for t in stats.tiers]
        body["name"] = self.config.name
        body["pid"] = os.getpid()
        return {"stats": body}

    def _locate(self, request: m.LocateRequest) -> dict[str, Any]:
        keys = split_keys(request.keys)
        length = self.store.lookup(keys)
        match = self.cluster.locate(keys, length)
        runs = [[node, self.cluster.address_of(node), upto] for node, upto in match.runs]
        gpu = sorted([*self.engines.gpu_runs(keys), *self.cluster.gpu_runs(keys)],
                     key=lambda run: (-run[1], run[0]))  # fmt: skip
        return {"length": length, "remote_length": length + match.length, "runs": runs,
                "gpu": [list(run) for run in gpu]}  # fmt: skip

    def _cluster_status(self, request: m.ClusterRequest) -> dict[str, Any]:
        status = self.cluster.status(samples=request.samples)
        return {"cluster": {**status, "engines": self.engines.status()}}

    def _fetch(self, request: m.FetchRequest) -> None:
        identity, keys = self._identity, split_keys(request.keys)

        def done() -> None:
            self._send(identity, m.encode_reply(request.id, length=self.store.lookup(keys)))

        self.cluster.fetch(keys, done)

    def _evict(self, request: m.EvictRequest) -> None:
        identity = self._identity

        def done(evicted: int) -> None:
            self._send(identity, m.encode_reply(request.id, evicted=evicted))

        self._tasks.start(self.store.evict_steps(request.namespace, request.key_prefix), done)

    def _step_tasks(self) -> None:
        """One step of each long scan; a finished one sends its reply."""
        self._tasks.step()

    def _drain(self, request: m.DrainRequest) -> None:
        identity = self._identity
        self.cluster.drain(
            lambda result: self._send(identity, m.encode_reply(request.id, **result))
        )

    def _bye(self, request: m.ByeRequest) -> dict[str, Any]:
        self.metrics.sessions_ended.labels("bye").inc()
        self._close_session(request.session)
        return {}


def _names_model(configured: str, identity: str) -> bool:
    """Whether ``--engine-model`` names the model a connector identifies as ``identity``
    (``MODEL@REVISION`` or ``DIR@weights-...``): exactly, or without the revision."""
    name = identity.split("@", 1)[0]
    return bool(configured) and (
        configured in (identity, name) or os.path.basename(configured.rstrip("/")) == name
    )
