"""A daemon's cluster member: its sockets, driven from the daemon's own loop.

The node adds sockets to the daemon's ZeroMQ poller and is called by the daemon thread
only, so the store, the index and the in-flight fetches need no lock::

       peers' PUB ──► SUB ──► ClusterView (index)      PUB ──► peers' SUB
                                                        ▲ EventLog batches, heartbeats
    peers' DEALER ──► ROUTER (port): sync / fetch / offer / status / evict / flush / drain
          DEALER per peer ──► peer's ROUTER: our sync requests and fetches

Engine streams: for each engine beside it (``engine_feed.py``) the node publishes one more
stream, ``<node>/gpu<i>``, with its own ``EventLog``, heartbeats and snapshots (the keys on
that engine's GPU), on the same PUB and ROUTER; peers index it as a member of its own
(``index.py`` explains why), never fetch from it and never hand it blocks in a drain.

Peer fetch: ``fetch()`` groups the missing keys of a chain by holder (preferring the
holder with the longest run, then the hottest tier), sends one request per holder and
chunk, and joins concurrent fetches of the same key (coalescing). The serving peer leases
the blocks and sends them as zero-copy frames of its arena, releasing the leases when
ZeroMQ reports the frames sent. The fetcher reserves a slot per block, copies the frame
in, checks the checksum and commits: the block is then a local hit like any other. A
fetch not answered within ``cluster_fetch_timeout_s``, or aimed at a member declared
dead, fails its keys at once: the engine sees a miss, never an error or a hang.

Scale: every node subscribes to every other node, so a node receives (and indexes) the
events of all N-1 peers and sends its own once (the PUB socket fans out in ZeroMQ's I/O
thread): per node O(N) messages for O(N) event sources, not O(N^2); the cluster as a
whole carries O(N^2) subscriptions, which at 1,000 nodes is where it stops being cheap.
The path there, which the wire format already allows: publish each batch split by key
range under topics ``shoal.ev.<shard>`` and let each member subscribe only to the shards
it indexes (consistent hashing over members, r replicas), so a lookup for a key asks
that shard's owners; or a fan-out tier of relay members per rack re-publishing merged
streams. Heartbeats stay all-to-all but are one small message per second per member.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from kvcache.cluster import messages as cm
from kvcache.cluster.base import Cluster, NullCluster
from kvcache.cluster.discovery import DiscoveryError, StaticDiscovery
from kvcache.cluster.index import PrefixMatch
from kvcache.cluster.metrics import ClusterMetrics
from kvcache.cluster.settings import ClusterSettings, bracket, cluster_settings, load_curve
from kvcache.cluster.sync import ClusterView, EventLog, SyncNeed, SyncReply, encode_events
from kvcache.errors import CacheError, ProtocolError
from kvcache.keys import join_keys, split_keys
from kvcache.store import BlockEvent, BlockStore, EventKind, ReserveStatus
from kvcache.tiers import MemoryBacking, copy_hashing_target
from kvcache.wire import peek_id

__all__ = ["Cluster", "ClusterMetrics", "ClusterNode", "NullCluster", "cluster_settings"]

log = logging.getLogger("shoal." + __name__)

PEER_SESSION = 0  # store session under which peers lease blocks and fetches land
_FETCH_CHUNK = 32  # keys per fetch request: bounds one reply (32 x the largest block)
_FETCH_WINDOW = 4  # fetch requests in flight per peer
_MAX_HOT_HANDOFF = 100_000


@dataclass(slots=True)
class _Waiter:
    remaining: set[bytes]
    on_done: Callable[[], None]


@dataclass(slots=True)
class _Pending:
    """One request we sent to a peer, awaiting its reply."""

    address: str
    deadline: float
    on_reply: Callable[[list[zmq.Frame]], None]
    on_fail: Callable[[str], None]


@dataclass(slots=True)
class _EngineStream:
    log: EventLog
    snapshot: Callable[[], list[bytes]]


@dataclass(slots=True)
class _Drain:
    on_done: Callable[[dict[str, Any]], None]
    outstanding: set[int] = field(default_factory=set)
    handed_off: int = 0
    peers: list[str] = field(default_factory=list)
    deadline: float = 0.0


class ClusterNode:
    """The real cluster member (see the module docstring)."""

    def __init__(
        self,
        settings: ClusterSettings,
        store: BlockStore,
        shm: MemoryBacking,
        context: zmq.Context[Any],
        registry: CollectorRegistry,
        *,
        on_leave: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._store = store
        self._shm = shm
        self._context = context
        self._clock = clock
        self._on_leave = on_leave
        self.metrics = ClusterMetrics(registry)
        self.epoch = time.time_ns()
        self.state = "active"
        self._log = EventLog(settings.node, settings.advertise, self.epoch)
        self._engines: dict[str, _EngineStream] = {}
        self.view = ClusterView(
            settings.node,
            member_timeout_s=settings.member_timeout_s,
            sync_timeout_s=self._sync_timeout_s(),
            on_applied=self._applied,
        )
        self._samples: deque[float] = deque(maxlen=100_000)
        self._curve = load_curve(settings.curve_dir) if settings.curve_dir else None
        self._authenticator: Any = None
        if self._curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._authenticator = ThreadAuthenticator(context)
            self._authenticator.start()
            self._authenticator.configure_curve(domain="*", location=settings.curve_dir)
        self._pub = self._server_socket(zmq.PUB, settings.port + 1)
        self._pub.setsockopt(zmq.SNDHWM, 10_000)
        self._router = self._server_socket(zmq.ROUTER, settings.port)
        self._sub = self._client_socket(zmq.SUB)
        for topic in (cm.TOPIC_EVENTS, cm.TOPIC_HEARTBEAT):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._poller: zmq.Poller | None = None
        self._subscribed: set[str] = set()
        self._dealers: dict[str, zmq.Socket[Any]] = {}
        self._dealer_address: dict[zmq.Socket[Any], str] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._inflight: dict[bytes, list[_Waiter]] = {}  # key -> waiters (coalescing)
        self._queued: dict[str, deque[list[tuple[bytes, bytes | None]]]] = {}  # per peer
        self._window: dict[str, int] = {}  # fetch requests in flight per peer
        self._sending: list[tuple[zmq.MessageTracker, list[bytes]]] = []
        self._drain: _Drain | None = None
        self._next_heartbeat = 0.0
        self._discovered: list[str] | None = None
        self._discovery_stop = threading.Event()
        self._discovery_thread: threading.Thread | None = None
        store.open_session(PEER_SESSION)
        if isinstance(settings.discovery, StaticDiscovery):
            self._discovered = settings.discovery.addresses()
        else:
            self._discovery_thread = threading.Thread(
                target=self._discover_loop, name="shoal-discovery", daemon=True
            )
            self._discovery_thread.start()
        log.info(
            "cluster member up",
            extra={"node": settings.node, "advertise": settings.advertise, "epoch": self.epoch,
                   "curve": self._curve is not None},
        )  # fmt: skip

    # -- sockets --------------------------------------------------------------------------

    def _server_socket(self, kind: int, port: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            public, secret = self._curve
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_server = True
        try:
            sock.bind(f"tcp://{bracket(self.settings.host)}:{port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise CacheError(
                f"cannot bind cluster port {self.settings.host}:{port}: {exc}"
            ) from None
        return sock

    def _client_socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            public, secret = self._curve
            sock.curve_secretkey = secret
            sock.curve_publickey = public
            sock.curve_serverkey = public  # one cluster keypair, shared through a Secret
        return sock  # type: ignore[no-any-return]

    def register(self, poller: zmq.Poller) -> None:
        self._poller = poller
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)

    def owns(self, sock: Any) -> bool:
        return sock is self._sub or sock is self._router or sock in self._dealer_address

    def handle(self, sock: Any) -> None:
        now = self._clock()
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                if sock is self._sub:
                    self._on_stream(frames, now)
                elif sock is self._router:
                    self._on_request(frames)
                else:
                    self._on_reply(frames)
            except ProtocolError as exc:
                self.metrics.dropped.labels("malformed").inc()
                log.warning("dropped a cluster frame", extra={"reason": str(exc)})

    def _dealer(self, address: str) -> zmq.Socket[Any]:
        sock = self._dealers.get(address)
        if sock is None:
            sock = self._client_socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(f"tcp://{address}")
            self._dealers[address] = sock
            self._dealer_address[sock] = address
            if self._poller is not None:
                self._poller.register(sock, zmq.POLLIN)
        return sock

    def _drop_dealer(self, address: str, reason: str) -> None:
        sock = self._dealers.pop(address, None)
        if sock is None:
            return
        del self._dealer_address[sock]
        if self._poller is not None:
            self._poller.unregister(sock)
        sock.close(linger=0)
        for request_id in [i for i, p in self._pending.items() if p.address == address]:
            self._pending.pop(request_id).on_fail(reason)

    def _request(
        self,
        address: str,
        request: cm.Request,
        on_reply: Callable[[list[zmq.Frame]], None],
        on_fail: Callable[[str], None],
        timeout_s: float,
    ) -> None:
        try:
            self._dealer(address).send(request.encode(), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # HWM reached: the peer is not reading
            on_fail(f"cannot send to {address}: {exc}")
            return
        self._pending[request.id] = _Pending(address, self._clock() + timeout_s, on_reply, on_fail)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    # -- the event stream -----------------------------------------------------------------

    def publish(self, events: list[BlockEvent], ts: float) -> None:
        if not events:
            return
        ops, keys = encode_events(
            (cm.OP_CLEARED if e.kind is EventKind.CLEARED
             else cm.OP_REMOVED if e.kind is EventKind.REMOVED
             else cm.op_for_tier(int(e.tier or 0)), e.key)
            for e in events
        )  # fmt: skip
        batch = self._log.append(ops, keys, ts)
        self._pub.send_multipart([cm.TOPIC_EVENTS, batch.encode()], zmq.NOBLOCK)
        self.metrics.events_published.inc(len(batch))

    def add_engine(self, stream: str, snapshot: Callable[[], list[bytes]]) -> None:
        """Publish ``stream`` (an engine's GPU keys); ``snapshot`` lists them all."""
        assert cm.is_engine_stream(stream), f"{stream!r} is not named <node>/<engine>"
        self._engines[stream] = _EngineStream(
            EventLog(stream, self.settings.advertise, self.epoch), snapshot
        )

    def publish_engine(self, stream: str, events: list[tuple[int, bytes]], ts: float) -> None:
        if not events:
            return
        ops, keys = encode_events(events)
        batch = self._engines[stream].log.append(ops, keys, ts)
        self._pub.send_multipart([cm.TOPIC_EVENTS, batch.encode()], zmq.NOBLOCK)
        self.metrics.events_published.inc(len(batch))

    def _heartbeat(self, state: str | None = None) -> None:
        for stream, engine in self._engines.items():
            beat = cm.Heartbeat(
                node=stream,
                epoch=self.epoch,
                seq=engine.log.seq,
                address=self.settings.advertise,
                state=state or self.state,
                ts=time.time(),
                interval_s=self.settings.heartbeat_s,
                stats={"engine": True},
            )
            self._pub.send_multipart([cm.TOPIC_HEARTBEAT, beat.encode()], zmq.NOBLOCK)
        stats = self._store.statistics()
        beat = cm.Heartbeat(
            node=self.settings.node,
            epoch=self.epoch,
            seq=self._log.seq,
            address=self.settings.advertise,
            state=state or self.state,
            ts=time.time(),
            interval_s=self.settings.heartbeat_s,
            stats={
                "tiers": [
                    {"tier": t.tier, "blocks": t.num_blocks, "used": t.used_bytes,
                     "capacity": t.capacity_bytes, "hits": t.hits}
                    for t in stats.tiers
                ],
                "misses": stats.misses,
                "sessions": stats.num_sessions,
            },
        )  # fmt: skip
        self._pub.send_multipart([cm.TOPIC_HEARTBEAT, beat.encode()], zmq.NOBLOCK)

    def _on_stream(self, frames: list[zmq.Frame], now: float) -> None:
        if len(frames) != 2:
            raise ProtocolError(f"stream message of {len(frames)} frames; expected 2")
        message = cm.decode_stream(frames[0].bytes, frames[1].buffer)
        if isinstance(message, cm.EventBatch):
            need = self.view.on_batch(message, now)
        else:
            need = self.view.on_heartbeat(message, now)
        if need is not None:
            self._sync(need)

    def _applied(self, batch: cm.EventBatch) -> None:
        age = max(0.0, time.time() - batch.ts)
        self.metrics.propagation.observe(age)
        self.metrics.events_applied.inc(len(batch))
        self._samples.append(age)

    def _sync(self, need: SyncNeed) -> None:
        if not need.address:
            return  # no address yet: the next heartbeat brings it and the retry uses it
        request = cm.SyncRequest(self._new_id(), need.node, need.epoch, need.after_seq)

        def on_reply(frames: list[zmq.Frame]) -> None:
            body = cm.decode_reply(frames[0].buffer)
            if not body["ok"]:
                log.warning("sync refused", extra={"peer": need.node, "error": body.get("error")})
                return
            reply = SyncReply.from_map(body)
            self.metrics.syncs.labels("snapshot" if reply.snapshot else "replay").inc()
            follow_up = self.view.on_sync_reply(need.node, reply, self._clock())
            if follow_up is not None:
                self._sync(follow_up)

        def on_fail(reason: str) -> None:
            log.info("sync unanswered; will retry", extra={"peer": need.node, "reason": reason})

        self._request(need.address, request, on_reply, on_fail, self._sync_timeout_s())

    def _sync_timeout_s(self) -> float:
        """How long a sync request may go unanswered before it is asked again."""
        return max(1.0, 4 * self.settings.fetch_timeout_s)

    # -- requests from peers and operators ------------------------------------------------

    def _on_request(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 2:
            self.metrics.dropped.labels("malformed").inc()
            return
        identity = frames[0].bytes
        try:
            request = cm.decode_request(frames[1].buffer)
        except ProtocolError as exc:
            self.metrics.dropped.labels(exc.code).inc()
            self._router_send([identity, cm.encode_error(0, exc.code, str(exc))])
            return
        try:
            self._serve(identity, request)
        except ValueError as exc:
            self._router_send([identity, cm.encode_error(request.id, "bad_request", str(exc))])

    def _router_send(self, frames: list[Any], *, track: bool = False) -> Any:
        try:
            return self._router.send_multipart(frames, zmq.NOBLOCK, copy=not track, track=track)
        except zmq.Again:
            self.metrics.dropped.labels("peer_not_reading").inc()
            return None

    def _reply(self, identity: bytes, request_id: int, **values: Any) -> None:
        self._router_send([identity, cm.encode_reply(request_id, **values)])

    def _serve(self, identity: bytes, request: cm.Request) -> None:
        if isinstance(request, cm.SyncRequest):
            self._serve_sync(identity, request)
        elif isinstance(request, cm.FetchRequest):
            self._serve_fetch(identity, request)
        elif isinstance(request, cm.OfferRequest):
            keys = split_keys(request.keys)
            self._fetch_from(
                request.source,
                keys,
                lambda: self._reply(
                    identity, request.id, fetched=sum(1 for k in keys if self._store.lookup([k]))
                ),
            )
        elif isinstance(request, cm.StatusRequest):
            self._reply(identity, request.id, **self.status())
        elif isinstance(request, cm.EvictRequest):
            evicted = self._store.evict(request.namespace, request.key_prefix)
            self._reply(identity, request.id, evicted=evicted)
        elif isinstance(request, cm.FlushRequest):
            self._reply(identity, request.id, flushed=self._store.clear())
        elif isinstance(request, cm.DrainRequest):
            self.drain(lambda result: self._reply(identity, request.id, **result))

    def _serve_sync(self, identity: bytes, request: cm.SyncRequest) -> None:
        engine = self._engines.get(request.stream)
        if engine is not None:
            # The daemon publishes engine changes every turn, so none are pending here.
            def snapshot() -> tuple[bytes, bytes]:
                keys = engine.snapshot()
                return join_keys(keys), bytes([cm.OP_ON_GPU - 1]) * len(keys)

            reply = engine.log.answer(request.epoch, request.after_seq, snapshot)
        elif request.stream in ("", self.settings.node):
            self._store_events_pending_flush()
            reply = self._log.answer(request.epoch, request.after_seq, self._snapshot)
        else:
            raise ValueError(f"no stream {request.stream!r} here")
        self._reply(identity, request.id, **reply.to_map())

    def _store_events_pending_flush(self) -> None:
        """Publish undrained store events first, so a snapshot matches the log's seq."""
        self.publish(self._store.take_events(), time.time())

    def _snapshot(self) -> tuple[bytes, bytes]:
        entries = self._store.snapshot()
        return join_keys([k for k, _ in entries]), bytes(int(t) for _, t in entries)

    def _serve_fetch(self, identity: bytes, request: cm.FetchRequest) -> None:
        keys = split_keys(request.keys)
        if len(keys) > 4 * _FETCH_CHUNK:
            raise ValueError(f"fetch of {len(keys)} keys; at most {4 * _FETCH_CHUNK} per request")
        leases = self._store.acquire(PEER_SESSION, keys, prefix=False)
        found = [(i, lease) for i, lease in enumerate(leases) if lease is not None]
        header = cm.encode_reply(
            request.id,
            found=[i for i, _ in found],
            sizes=[lease.nbytes for _, lease in found],
            checksums=[lease.checksum for _, lease in found],
            namespaces=[self._store.namespace_of(lease.key) for _, lease in found],
        )
        payloads = [self._shm.view(lease.offset, lease.nbytes) for _, lease in found]
        tracker = self._router_send([identity, header, *payloads], track=True)
        leased = [lease.key for _, lease in found]
        if tracker is None:
            self._store.release(PEER_SESSION, leased)
        else:
            self._sending.append((tracker, leased))
            self.metrics.served.inc(len(found))

    # -- peer fetch (the requesting side) ---------------------------------------------------

    def address_of(self, node: str) -> str:
        return self.view.address_of(node) or ""

    def locate(self, keys: Sequence[bytes], start: int) -> PrefixMatch:
        store = self._store
        return self.view.index.longest_prefix(keys, start, lambda k: store.lookup([k]) == 1)

    def gpu_runs(self, keys: Sequence[bytes]) -> tuple[tuple[str, int], ...]:
        return self.view.index.engine_runs(keys)

    def fetch(self, keys: Sequence[bytes], on_done: Callable[[], None]) -> None:
        """Bring the blocks of ``keys`` that peers hold into the local store, then call
        ``on_done`` (also on failure: the caller looks up what arrived)."""
        self._fetch_from(None, keys, on_done)

    def _fetch_from(
        self, source: str | None, keys: Sequence[bytes], on_done: Callable[[], None]
    ) -> None:
        waiter = _Waiter(set(), on_done)
        by_peer: dict[str, list[tuple[bytes, bytes | None]]] = {}
        parent: bytes | None = None
        for key in keys:
            chain_parent, parent = parent, key
            if self._store.lookup([key]):
                continue
            waiter.remaining.add(key)
            if key in self._inflight:
                self._inflight[key].append(waiter)
                continue
            address = source or self._holder_address(key)
            if address is None:
                waiter.remaining.discard(key)
                self.metrics.fetched.labels("no_holder").inc()
                continue
            self._inflight[key] = [waiter]
            by_peer.setdefault(address, []).append((key, chain_parent))
        if not waiter.remaining:
            on_done()
            return
        for address, wanted in by_peer.items():
            queue = self._queued.setdefault(address, deque())
            for lo in range(0, len(wanted), _FETCH_CHUNK):
                queue.append(wanted[lo : lo + _FETCH_CHUNK])
            self._pump(address)

    def _pump(self, address: str) -> None:
        """Send queued chunks to ``address`` while fewer than ``_FETCH_WINDOW`` are out.

        A window, not everything at once: each chunk's deadline starts when it is sent,
        so a long fetch from a healthy peer never times out its own tail, and what waits
        in our receive queue stays bounded.
        """
        queue = self._queued.get(address)
        while queue and self._window.get(address, 0) < _FETCH_WINDOW:
            self._window[address] = self._window.get(address, 0) + 1
            self._send_fetch(address, queue.popleft())
        if not queue:
            self._queued.pop(address, None)

    def _chunk_done(self, address: str, failed: bool) -> None:
        self._window[address] -= 1
        if failed:  # a peer that timed out or vanished will not do better for the rest
            for chunk in self._queued.pop(address, ()):
                for key, _ in chunk:
                    self._finish(key, False)
        self._pump(address)

    def _holder_address(self, key: bytes) -> str | None:
        holders = [h for h in self.view.index.holders(key) if self.view.is_live(h.node)]
        if not holders:
            return None
        best = min(holders, key=lambda h: (h.tier, h.node))
        return self.view.address_of(best.node)

    def _send_fetch(self, address: str, wanted: list[tuple[bytes, bytes | None]]) -> None:
        keys = [k for k, _ in wanted]
        parents = dict(wanted)
        request = cm.FetchRequest(self._new_id(), self.settings.node, join_keys(keys))

        def on_reply(frames: list[zmq.Frame]) -> None:
            body = cm.decode_reply(frames[0].buffer)
            landed: set[bytes] = set()
            try:
                if body["ok"]:
                    landed = self._land(keys, parents, body, frames[1:])
            finally:
                for key in keys:
                    self._finish(key, key in landed)
                self._chunk_done(address, failed=False)

        def on_fail(reason: str) -> None:
            log.info("peer fetch failed", extra={"peer": address, "reason": reason})
            for key in keys:
                self._finish(key, False)
            self._chunk_done(address, failed=True)

        self._request(address, request, on_reply, on_fail, self.settings.fetch_timeout_s)

    def _land(
        self,
        keys: list[bytes],
        parents: dict[bytes, bytes | None],
        body: dict[str, Any],
        payloads: list[zmq.Frame],
    ) -> set[bytes]:
        found, sizes, checksums = body.get("found"), body.get("sizes"), body.get("checksums")
        namespaces = body.get("namespaces")
        if not (isinstance(found, list) and isinstance(sizes, list) and isinstance(checksums, list)
                and isinstance(namespaces, list)
                and len(found) == len(sizes) == len(checksums) == len(namespaces) == len(payloads)
                and all(isinstance(i, int) and 0 <= i < len(keys) for i in found)):  # fmt: skip
            raise ProtocolError("fetch reply header does not match its payload frames")
        landed: set[bytes] = set()
        for index, nbytes, checksum, namespace, frame in zip(
            found, sizes, checksums, namespaces, payloads, strict=True
        ):
            key = keys[index]
            data = frame.buffer
            if len(data) != nbytes or not 0 < nbytes <= self._store.max_block_bytes:
                self.metrics.fetched.labels("bad_size").inc()
                continue
            (result,) = self._store.reserve(
                PEER_SESSION, [key], [nbytes], parents.get(key), namespace=str(namespace)
            )
            if result.status is ReserveStatus.EXISTS:
                landed.add(key)
                continue
            if result.status is not ReserveStatus.OK:
                self.metrics.fetched.labels("no_space").inc()
                continue
            # One pass: copy into the reserved slot, hashing what landed; a mismatch
            # aborts the reservation, so the bytes are never visible.
            if copy_hashing_target(data, self._shm.view(result.offset, nbytes)) != checksum:
                self._store.abort(PEER_SESSION, [key])
                self.metrics.fetched.labels("checksum").inc()
                log.warning("peer sent a block with a bad checksum", extra={"key": key.hex()})
                continue
            self._store.commit(PEER_SESSION, [key], [checksum])
            landed.add(key)
            self.metrics.fetched.labels("ok").inc()
            self.metrics.fetched_bytes.inc(nbytes)
        return landed

    def _finish(self, key: bytes, ok: bool) -> None:
        if not ok:
            self.metrics.fetched.labels("miss").inc()
        for waiter in self._inflight.pop(key, []):
            waiter.remaining.discard(key)
            if not waiter.remaining:
                waiter.on_done()

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        if not frames:
            return
        request_id = peek_id(frames[0].buffer)
        pending = self._pending.pop(request_id, None)
        if pending is None:
            self.metrics.dropped.labels("late_reply").inc()
            return
        try:
            pending.on_reply(frames)
        except ProtocolError as exc:
            pending.on_fail(str(exc))
            raise

    # -- drain ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.state != "active"

    def drain(self, on_done: Callable[[dict[str, Any]], None]) -> None:
        """Stop taking blocks, hand hot blocks to live peers, then leave the cluster."""
        if self._drain is not None:
            raise ValueError("a drain is already in progress")
        self.state = "draining"
        self._heartbeat()
        drain = _Drain(on_done, deadline=self._clock() + self.settings.drain_timeout_s)
        self._drain = drain
        peers = [n for n in self.view.nodes if not cm.is_engine_stream(n)
                 and (self.view.member_state(n) or "active") == "active"]  # fmt: skip
        drain.peers = peers
        keys = self._store.hot_keys(_MAX_HOT_HANDOFF)
        shares: dict[str, list[bytes]] = {p: [] for p in peers}
        for key in keys if peers else []:
            shares[peers[int.from_bytes(key[:4], "little") % len(peers)]].append(key)
        for peer, share in shares.items():
            address = self.view.address_of(peer)
            if not share or address is None:
                continue
            for lo in range(0, len(share), 4 * _FETCH_CHUNK):
                chunk = share[lo : lo + 4 * _FETCH_CHUNK]
                request = cm.OfferRequest(self._new_id(), self.settings.advertise, join_keys(chunk))
                drain.outstanding.add(request.id)
                answered = functools.partial(self._offer_answered, request.id)
                self._request(address, request, answered, answered, self.settings.drain_timeout_s)
        self._maybe_drained()

    def _offer_answered(self, request_id: int, frames: list[zmq.Frame] | str | None) -> None:
        drain = self._drain
        if drain is None:
            return
        drain.outstanding.discard(request_id)
        if isinstance(frames, list):
            body = cm.decode_reply(frames[0].buffer)
            fetched = body.get("fetched")
            if body["ok"] and isinstance(fetched, int):
                drain.handed_off += fetched
        self._maybe_drained()

    def _maybe_drained(self) -> None:
        drain = self._drain
        if drain is None or drain.outstanding:
            return
        self.state = "leaving"
        self._heartbeat("leaving")
        log.info("drained; leaving the cluster", extra={"handed_off": drain.handed_off})
        drain.on_done({"handed_off": drain.handed_off, "peers": drain.peers})
        self._on_leave()

    # -- housekeeping ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._release_sent()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.settings.heartbeat_s
        self._connect_discovered()
        dead, retries = self.view.expire(now)
        for node in dead:
            log.warning("peer declared dead", extra={"peer": node})
        for need in retries:
            self._sync(need)
        for request_id in [i for i, p in self._pending.items() if p.deadline <= now]:
            self._pending.pop(request_id).on_fail("timed out")
        live_addresses = {self.view.address_of(n) for n in self.view.nodes}
        for address in [a for a in self._dealers if a not in live_addresses
                        and a not in self._subscribed]:  # fmt: skip
            self._drop_dealer(address, "peer left")
        if self._drain is not None and now > self._drain.deadline and self._drain.outstanding:
            self._drain.outstanding.clear()
            self._maybe_drained()
        self.metrics.members.set(len(self.view.nodes))
        self.metrics.index_blocks.set(self.view.index.num_blocks())

    def _release_sent(self) -> None:
        if not self._sending:
            return
        still = []
        for tracker, keys in self._sending:
            if tracker.done:
                self._store.release(PEER_SESSION, keys)
            else:
                still.append((tracker, keys))
        self._sending = still

    def idle_step(self) -> bool:
        self._release_sent()
        return self.view.index.sweep()

    def _discover_loop(self) -> None:
        while not self._discovery_stop.is_set():
            try:
                self._discovered = self.settings.discovery.addresses()
            except DiscoveryError as exc:
                log.warning("discovery failed; keeping the last members", extra={"error": str(exc)})
            self._discovery_stop.wait(self.settings.discovery_interval_s)

    def _connect_discovered(self) -> None:
        discovered = self._discovered
        if discovered is None:
            return
        wanted = {a for a in discovered if a != self.settings.advertise}
        for address in wanted - self._subscribed:
            host, port = address.rsplit(":", 1)
            self._sub.connect(f"tcp://{host}:{int(port) + 1}")
            self._subscribed.add(address)
        for address in self._subscribed - wanted:
            host, port = address.rsplit(":", 1)
            self._sub.disconnect(f"tcp://{host}:{int(port) + 1}")
            self._subscribed.discard(address)

    # -- status ---------------------------------------------------------------------------

    def status(self, samples: bool = False) -> dict[str, Any]:
        now = self._clock()
        body: dict[str, Any] = {
            "enabled": True,
            "node": self.settings.node,
            "address": self.settings.advertise,
            "epoch": self.epoch,
            "seq": self._log.seq,
            "state": self.state,
            "index_blocks": self.view.index.num_blocks(),
            "gaps": self.view.num_gaps,
            "served_blocks": int(self.metrics.total("served_blocks")),
            "fetched_blocks": int(self.metrics.total("fetch_blocks", result="ok")),
            "dropped": int(self.metrics.total("messages_dropped")),
            "members": [asdict(member) for member in self.view.members(now)],
        }
        if samples:
            body["propagation_s"] = list(self._samples)
            self._samples.clear()
        return body

    def close(self) -> None:
        deadline = time.monotonic() + 1.0  # let zero-copy frames of the arena go out
        while self._sending and time.monotonic() < deadline:
            self._release_sent()
            time.sleep(0.005)
        self._discovery_stop.set()
        for address in list(self._dealers):
            self._drop_dealer(address, "shutting down")
        self._sub.close(linger=0)
        self._pub.close(linger=200)  # the "leaving" heartbeat of a drain
        self._router.close(linger=200)  # the reply to a remote drain
        if self._authenticator is not None:
            self._authenticator.stop()
        self._sending.clear()
