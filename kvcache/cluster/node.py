"""A daemon's cluster member: its sockets, driven from the daemon's own loop.

The node adds sockets to the daemon's ZeroMQ poller and is called by the daemon thread
only, so the store, the index and the in-flight fetches need no lock::

       peers' PUB ──► SUB ──► ClusterView (index)      PUB ──► peers' SUB
                                                        ▲ EventLog batches, heartbeats
    peers' DEALER ──► ROUTER (port): sync / fetch / offer / status   (members' keys)
 operators' DEALER ──► ROUTER (port): status / evict / flush / drain  (operators' keys)
          DEALER per peer ──► peer's ROUTER: our sync requests and fetches (transport.py)

Security (``security.py`` holds the whole model): the bind is refused off loopback without
CurveZMQ unless ``cluster_insecure`` is said; each request on the ROUTER is authorised by
its verb against the key it came with (a member's key for peer verbs, an operator's for
operator verbs; without CurveZMQ, operator verbs carry the local operator token); with
per-node keys a stream message is applied only if its key speaks for the member it names.
An ``offer`` is taken only from a member that the view shows draining, and the blocks are
fetched from that member's known address (an offer that arrives before the draining
heartbeat is held until it does, or ``member_timeout_s``).

Engine streams: for each engine beside it (``engine_feed.py``) the node publishes one more
stream, ``<node>/gpu<i>``, with its own ``EventLog``, heartbeats and snapshots (the keys on
that engine's GPU), on the same PUB and ROUTER; peers index it as a member of its own
(``index.py`` explains why), never fetch from it and never hand it blocks in a drain.

Peer fetch, both sides, lives in ``fetch.py``: the fetcher groups missing keys by holder,
coalesces and checks checksums; the server leases blocks where they lie (no promotion
into SHM for a peer) within a per-request and an in-flight byte bound.

Loop costs of whole-store work (review M3), measured at 1M blocks on a shared 2-core box:
a full snapshot for a peer (a member joining, restarting, or more than 4,096 batches
behind) is built and sent whole: ~0.17 s of this loop to build the 16 MiB reply
(``BlockStore.snapshot_columns``; ~1 s before it) and ~15 ms to encode it; the peer
spends ~5 ms decoding it and ~0.4 s applying it to its index, on its own loop. It is not
streamed in pieces: pieces of a table that changes between them are only consistent
with a cursor over the store and the events published meanwhile stitched in by seq, a
protocol change v2 and v3 members would both have to learn, for an event that is rare
and bounded by the store's size. A drain's ``hot_keys`` pass: ~25 ms. An operator's
``flush`` detaches the table in ~40 ms and frees its slots in idle steps
(``BlockStore.clear``); an operator's ``evict`` scans in steps of 4,096 blocks, one per
idle step or housekeeping tick, and replies when done.

Versions: the node reads v2 and v3 (``messages.py``), sends each peer requests in the
version its heartbeats announce (v2 until heard), and answers in the request's version.

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
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from kvcache.cluster import messages as cm
from kvcache.cluster.base import Cluster, NullCluster
from kvcache.cluster.discovery import DiscoveryError, StaticDiscovery
from kvcache.cluster.fetch import MAX_FETCH_KEYS, PEER_SESSION, PeerFetcher, PeerServer
from kvcache.cluster.index import PrefixMatch
from kvcache.cluster.metrics import ClusterMetrics
from kvcache.cluster.security import (
    MEMBER,
    OPERATOR,
    STREAM_DOMAIN,
    Identities,
    KeyRing,
    check_bind,
    load_curve_keys,
    operator_token,
)
from kvcache.cluster.settings import ClusterSettings, cluster_settings
from kvcache.cluster.sync import ClusterView, EventLog, SyncNeed, SyncReply, encode_events
from kvcache.cluster.transport import PeerLinks, Sockets
from kvcache.errors import CacheError, ProtocolError
from kvcache.keys import KEY_BYTES, join_keys, split_keys
from kvcache.scans import StepScans
from kvcache.store import BlockEvent, BlockStore, EventKind
from kvcache.tiers import MemoryBacking

__all__ = ["PEER_SESSION", "Cluster", "ClusterMetrics", "ClusterNode", "NullCluster",
           "cluster_settings"]  # fmt: skip

log = logging.getLogger("shoal." + __name__)

_OFFER_CHUNK = MAX_FETCH_KEYS  # keys per offer a drain sends
_MAX_HOT_HANDOFF = 100_000
_MAX_HELD_OFFERS = 256  # offers waiting for their member's draining heartbeat


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


@dataclass(frozen=True, slots=True)
class _HeldOffer:
    """An offer from a member not (yet) seen draining: its heartbeat may be on the way."""

    deadline: float
    identity: bytes
    request: cm.OfferRequest
    version: int
    user_id: str | None


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
        self._clock = clock
        self._on_leave = on_leave
        keys = (
            load_curve_keys(settings.curve_dir, settings.curve_key) if settings.curve_dir else None
        )
        check_bind(settings.host, curve=keys is not None, insecure=settings.insecure)
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
        # Without CurveZMQ, operator verbs over TCP need the runtime dir's token.
        self._token = (
            operator_token(Path(settings.runtime_dir))
            if keys is None and settings.runtime_dir
            else ""
        )
        self._ring: KeyRing | None = None
        self._identities: Identities | None = None
        self._authenticator: Any = None
        self._next_reload = clock() + settings.key_reload_s
        if keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._ring = KeyRing(settings.curve_dir, keys)
            if keys.per_node:
                self._ring.check_own(keys.public, settings.node)
                self._identities = Identities(self._ring, self.view.is_live)
            self._authenticator = ThreadAuthenticator(context)
            self._authenticator.start()
            for domain in ("*", STREAM_DOMAIN):
                self._authenticator.configure_curve_callback(domain, self._ring)
        self._sockets = Sockets(context, keys, settings.max_block_bytes)
        try:
            self._pub = self._sockets.pub(settings.host, settings.port + 1)
            try:
                self._router = self._sockets.router(settings.host, settings.port)
            except CacheError:
                self._pub.close(linger=0)
                raise
        except CacheError:
            if self._authenticator is not None:
                self._authenticator.stop()
            raise
        self._sub = self._sockets.sub()
        for topic in (cm.TOPIC_EVENTS, cm.TOPIC_HEARTBEAT):
            self._sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._links = PeerLinks(self._sockets, clock)
        self._proto: dict[str, int] = {}  # member address -> the version it speaks
        self._fetcher = PeerFetcher(
            settings.node, store, shm, self.view, self._links, self.metrics,
            timeout_s=settings.fetch_timeout_s, version_of=self._version_of,
        )  # fmt: skip
        self._server = PeerServer(
            store, self.metrics, self._router_send,
            reply_timeout_s=settings.fetch_timeout_s, clock=clock,
        )  # fmt: skip
        self._held_offers: list[_HeldOffer] = []
        # Operators' evicts: one bounded step each per idle step or tick (review M3).
        self._scans = StepScans()  # operators' evicts, one step per idle turn
        self._drain: _Drain | None = None
        self._next_heartbeat = 0.0
        self._subscribed: set[str] = set()
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
                   "curve": keys is not None, "per_node_keys": self._identities is not None,
                   "protocol": cm.VERSION},
        )  # fmt: skip

    # -- sockets --------------------------------------------------------------------------

    def register(self, poller: zmq.Poller) -> None:
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        self._links.register(poller)

    def owns(self, sock: Any) -> bool:
        return sock is self._sub or sock is self._router or self._links.owns(sock)

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
                    self._links.on_reply(sock, frames)
            except ProtocolError as exc:
                self.metrics.dropped.labels("malformed").inc()
                log.warning("dropped a cluster frame", extra={"reason": str(exc)})

    def _version_of(self, address: str) -> int:
        """The protocol version to speak to the member at ``address`` (v2 until heard)."""
        return min(cm.VERSION, self._proto.get(address, cm.MIN_VERSION))

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
                proto=cm.VERSION,
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
            proto=cm.VERSION,
        )  # fmt: skip
        self._pub.send_multipart([cm.TOPIC_HEARTBEAT, beat.encode()], zmq.NOBLOCK)

    def _on_stream(self, frames: list[zmq.Frame], now: float) -> None:
        if len(frames) != 2:
            raise ProtocolError(f"stream message of {len(frames)} frames; expected 2")
        message = cm.decode_stream(frames[0].bytes, frames[1].buffer)
        if self._identities is not None and not self._identities.admit(
            message.node, _user_id(frames[1])
        ):
            self.metrics.dropped.labels("impersonation").inc()
            return
        if isinstance(message, cm.EventBatch):
            need = self.view.on_batch(message, now)
        else:
            self._proto[message.address] = message.proto
            need = self.view.on_heartbeat(message, now)
            if self._held_offers:
                self._retry_held_offers(now)
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
        request = cm.SyncRequest(self._links.new_id(), need.node, need.epoch, need.after_seq)

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

        self._links.request(need.address, request, on_reply, on_fail, self._sync_timeout_s(),
                            version=self._version_of(need.address))  # fmt: skip

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
            request, version = cm.decode_request_versioned(frames[1].buffer)
        except ProtocolError as exc:
            self.metrics.dropped.labels(exc.code).inc()
            self._router_send([identity, cm.encode_error(0, exc.code, str(exc),
                                                         version=cm.MIN_VERSION)])  # fmt: skip
            return
        user_id = _user_id(frames[1]) if self._ring is not None else None
        refusal = self._refusal(request, user_id)
        if refusal is not None:
            self.metrics.dropped.labels("forbidden").inc()
            log.warning("refused a cluster request", extra={"op": request.op, "reason": refusal})
            self._router_send([identity, cm.encode_error(request.id, "forbidden", refusal,
                                                         version=version)])  # fmt: skip
            return
        try:
            self._serve(identity, request, version, user_id)
        except ValueError as exc:
            self._router_send([identity, cm.encode_error(request.id, "bad_request", str(exc),
                                                         version=version)])  # fmt: skip

    def _refusal(self, request: cm.Request, user_id: str | None) -> str | None:
        """Why ``request`` (sent with key ``user_id``) is not allowed, or ``None``."""
        operator_verb = request.op in cm.OPERATOR_OPS
        if self._ring is not None:
            role = self._ring.role(user_id)
            if operator_verb and role != OPERATOR:
                return (f"{request.op} is an operator verb: it needs a key listed in "
                        f"{self.settings.curve_dir}/operators/")  # fmt: skip
            if not operator_verb and request.op != "status" and role != MEMBER:
                return f"{request.op} is a peer verb: it needs a member key"
            if role is None:
                return "this key is no longer allowed"
            return None
        if operator_verb:
            token = str(getattr(request, "token", "")).encode()  # bytes: any str compares
            if not self._token or not hmac.compare_digest(token, self._token.encode()):
                return (f"{request.op} is an operator verb: without CurveZMQ it needs the local "
                        "operator token (shoal cache commands read it from the runtime dir), "
                        "or use CurveZMQ operator keys")  # fmt: skip
        return None

    def _router_send(self, frames: list[Any], *, track: bool = False) -> Any:
        try:
            return self._router.send_multipart(frames, zmq.NOBLOCK, copy=not track, track=track)
        except zmq.Again:
            self.metrics.dropped.labels("peer_not_reading").inc()
            return None

    def _serve(
        self, identity: bytes, request: cm.Request, version: int, user_id: str | None
    ) -> None:
        def reply(**values: Any) -> None:
            self._router_send([identity, cm.encode_reply(request.id, version=version, **values)])

        if isinstance(request, cm.SyncRequest):
            reply(**self._sync_answer(request).to_map())
        elif isinstance(request, cm.FetchRequest):
            self._server.serve(identity, request, version)
        elif isinstance(request, cm.OfferRequest):
            if len(request.keys) > MAX_FETCH_KEYS * KEY_BYTES:
                raise ValueError(f"offer of more than {MAX_FETCH_KEYS} keys")
            self._serve_offer(_HeldOffer(self._clock() + self.settings.member_timeout_s,
                                         identity, request, version, user_id))  # fmt: skip
        elif isinstance(request, cm.StatusRequest):
            reply(**self.status())
        elif isinstance(request, cm.EvictRequest):  # a scan: in steps, between requests
            steps = self._store.evict_steps(request.namespace, request.key_prefix)
            self._scans.start(steps, lambda evicted: reply(evicted=evicted))
        elif isinstance(request, cm.FlushRequest):
            reply(flushed=self._store.clear())
        elif isinstance(request, cm.DrainRequest):
            self.drain(lambda result: reply(**result))

    def _sync_answer(self, request: cm.SyncRequest) -> SyncReply:
        engine = self._engines.get(request.stream)
        if engine is not None:
            # The daemon publishes engine changes every turn, so none are pending here.
            def snapshot() -> tuple[bytes, bytes]:
                keys = engine.snapshot()
                return join_keys(keys), bytes([cm.OP_ON_GPU - 1]) * len(keys)

            return engine.log.answer(request.epoch, request.after_seq, snapshot)
        if request.stream in ("", self.settings.node):
            self._store_events_pending_flush()
            return self._log.answer(request.epoch, request.after_seq, self._snapshot)
        raise ValueError(f"no stream {request.stream!r} here")

    def _store_events_pending_flush(self) -> None:
        """Publish undrained store events first, so a snapshot matches the log's seq."""
        self.publish(self._store.take_events(), time.time())

    def _snapshot(self) -> tuple[bytes, bytes]:
        return self._store.snapshot_columns()

    # -- offers (a draining member hands us its blocks) ------------------------------------

    def _offering_member(self, offer: _HeldOffer) -> str | None:
        """The member ``offer`` comes from, by its key or its name, else by its address."""
        request, view = offer.request, self.view
        if self._identities is not None:
            node = self._identities.node_of(offer.user_id or "")
            return node if node is not None and request.node in ("", node) else None
        if request.node:
            return request.node
        return next((n for n in view.nodes if view.address_of(n) == request.source), None)

    def _serve_offer(self, offer: _HeldOffer) -> bool:
        """Fetch an offer's keys from its draining member; ``False`` if it is held."""
        node = self._offering_member(offer)
        state = self.view.member_state(node) if node is not None else None
        if node is not None and state == "draining" and not cm.is_engine_stream(node):
            keys = split_keys(offer.request.keys)

            def done() -> None:
                fetched = sum(1 for k in keys if self._store.lookup([k]))
                self._router_send([offer.identity, cm.encode_reply(
                    offer.request.id, version=offer.version, fetched=fetched)])  # fmt: skip

            self._fetcher.fetch(keys, done, holder=node)
            return True
        if self._clock() < offer.deadline and (
            offer in self._held_offers or len(self._held_offers) < _MAX_HELD_OFFERS
        ):
            if offer not in self._held_offers:
                self._held_offers.append(offer)
            return False
        self.metrics.dropped.labels("forbidden").inc()
        log.warning("refused an offer from a member not draining", extra={"node": node})
        self._router_send([offer.identity, cm.encode_error(
            offer.request.id, "forbidden", "offers are taken from draining members only",
            version=offer.version)])  # fmt: skip
        return True

    def _retry_held_offers(self, now: float) -> None:
        held, self._held_offers = self._held_offers, []
        for offer in held:
            if not self._serve_offer(offer):
                self._held_offers.append(offer)

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
        self._fetcher.fetch(keys, on_done)

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
            for lo in range(0, len(share), _OFFER_CHUNK):
                chunk = share[lo : lo + _OFFER_CHUNK]
                request = cm.OfferRequest(self._links.new_id(), self.settings.advertise,
                                          join_keys(chunk), node=self.settings.node)  # fmt: skip
                drain.outstanding.add(request.id)
                answered = functools.partial(self._offer_answered, request.id)
                self._links.request(address, request, answered, answered,
                                    self.settings.drain_timeout_s,
                                    version=self._version_of(address))  # fmt: skip
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

    def _step_scans(self) -> bool:
        """One step of each operator's evict; a finished one replies. True if any remain."""
        return self._scans.step()

    def tick(self, now: float) -> None:
        self._server.release_sent()
        self._step_scans()
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.settings.heartbeat_s
        if self._ring is not None and now >= self._next_reload:
            self._ring.reload()
            self._next_reload = now + self.settings.key_reload_s
        self._connect_discovered()
        dead, retries = self.view.expire(now)
        for node in dead:
            log.warning("peer declared dead", extra={"peer": node})
        for need in retries:
            self._sync(need)
        self._links.expire(now)
        if self._held_offers:
            self._retry_held_offers(now)
        live_addresses = {self.view.address_of(n) for n in self.view.nodes}
        if len(self._proto) > 2 * len(live_addresses) + 16:  # heard from, gone since
            self._proto = {a: v for a, v in self._proto.items() if a in live_addresses}
        for address in [a for a in self._links.addresses if a not in live_addresses
                        and a not in self._subscribed]:  # fmt: skip
            self._links.drop(address, "peer left")
        if self._drain is not None and now > self._drain.deadline and self._drain.outstanding:
            self._drain.outstanding.clear()
            self._maybe_drained()
        self.metrics.members.set(len(self.view.nodes))
        self.metrics.index_blocks.set(self.view.index.num_blocks())

    def idle_step(self) -> bool:
        self._server.release_sent()
        scanning = self._step_scans()
        return self.view.index.sweep() or scanning

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
            "protocol": cm.VERSION,
            "curve": self._ring is not None,
            "members": [asdict(member) for member in self.view.members(now)],
        }
        if samples:
            body["propagation_s"] = list(self._samples)
            self._samples.clear()
        return body

    def close(self) -> None:
        deadline = time.monotonic() + 1.0  # let zero-copy frames of the arena go out
        while self._server.sending and time.monotonic() < deadline:
            self._server.release_sent()
            time.sleep(0.005)
        self._discovery_stop.set()
        self._links.close()
        self._sub.close(linger=0)
        self._pub.close(linger=200)  # the "leaving" heartbeat of a drain
        self._router.close(linger=200)  # the reply to a remote drain
        if self._authenticator is not None:
            self._authenticator.stop()
        self._server.close()


def _user_id(frame: zmq.Frame) -> str | None:
    """The CurveZMQ key (z85) the ZAP handler admitted for the frame's connection."""
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP on this connection
        return None
    return value if isinstance(value, str) else None
