"""Peer fetch, both sides: bringing blocks peers hold into the local store, and serving
ours to peers without disturbing this node's hot tier.

Requesting side (``PeerFetcher``): ``fetch()`` groups the missing keys of a chain by
holder (the hottest tier, then the node name), sends one request per holder and chunk,
and joins concurrent fetches of the same key (coalescing). The fetcher reserves a slot
per block, copies the frame in, checks the checksum and commits: the block is then a
local hit like any other. A fetch not answered within ``cluster_fetch_timeout_s``, or
aimed at a member declared dead, fails its keys at once: the engine sees a miss, never
an error or a hang. ``fetch_from`` (a drain's offer) fetches from one named member only,
at the address this node's view holds for it.

Serving side (``PeerServer``): blocks are leased where they lie (``acquire(promote=
False)``): a SHM or DRAM block goes out as a zero-copy frame of its mapping, leased
until ZeroMQ reports the frame sent; an SSD block is read by an I/O worker
(``BlockStore.read_leased``) into a page-aligned buffer, checksum verified, and the
reply goes out when the request's last read lands: the daemon's loop never waits for
the disk (review M3), and the lease holds the file slot until then. A block that fails
its read or checksum is left out of the reply (a miss there) and dropped from the store.
A reply whose reads land after ``cluster_fetch_timeout_s`` is not sent: the requester
has answered itself with misses by then. No block is promoted into SHM for a peer, so a
peer reading this node's warm blocks cannot push out the blocks its own engines use
(review m7); a local reader may still promote a block a peer is reading, and the slot
the peer reads stays allocated until its lease ends (``BlockStore._leave_slot``). One
request is answered with at most ``SERVE_REQUEST_BYTES`` of blocks, and at most
``SERVE_INFLIGHT_BYTES`` are leased or buffered for replies not yet sent; past either,
the rest of the keys are answered as not found (the requester sees misses, and may ask
again).
"""

from __future__ import annotations

import functools
import logging
import mmap
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvcache.cluster import messages as cm
from kvcache.cluster.metrics import ClusterMetrics
from kvcache.cluster.sync import ClusterView
from kvcache.cluster.transport import PeerLinks
from kvcache.errors import ProtocolError
from kvcache.keys import join_keys, split_keys
from kvcache.store import BlockStore, Lease, ReserveStatus
from kvcache.tiers import MemoryBacking, copy_hashing_target, padded

__all__ = ["PEER_SESSION", "PeerFetcher", "PeerServer"]

log = logging.getLogger("shoal." + __name__)

PEER_SESSION = 0  # store session under which peers lease blocks and fetches land
FETCH_CHUNK = 32  # keys per fetch request: bounds one reply (32 x the largest block)
MAX_FETCH_KEYS = 4 * FETCH_CHUNK  # the most keys one fetch request may ask for
_FETCH_WINDOW = 4  # fetch requests in flight per peer
SERVE_REQUEST_BYTES = 256 << 20  # block bytes in one fetch reply (at least one block)
SERVE_INFLIGHT_BYTES = 1 << 30  # block bytes leased for replies not yet sent


@dataclass(slots=True)
class _Waiter:
    remaining: set[bytes]
    on_done: Callable[[], None]


class PeerFetcher:
    """The requesting side of peer fetch (module docstring)."""

    def __init__(
        self,
        node: str,
        store: BlockStore,
        shm: MemoryBacking,
        view: ClusterView,
        links: PeerLinks,
        metrics: ClusterMetrics,
        *,
        timeout_s: float,
        version_of: Callable[[str], int],
    ) -> None:
        self._node = node
        self._store = store
        self._shm = shm
        self._view = view
        self._links = links
        self.metrics = metrics
        self._timeout_s = timeout_s
        self._version_of = version_of  # the protocol version a member speaks
        self._inflight: dict[bytes, list[_Waiter]] = {}  # key -> waiters (coalescing)
        self._queued: dict[str, deque[list[tuple[bytes, bytes | None]]]] = {}  # per peer
        self._window: dict[str, int] = {}  # fetch requests in flight per peer

    def fetch(
        self, keys: Sequence[bytes], on_done: Callable[[], None], *, holder: str | None = None
    ) -> None:
        """Bring the blocks of ``keys`` that peers hold (``holder`` only, if named) into
        the local store, then call ``on_done`` (also on failure: the caller looks up what
        arrived)."""
        waiter = _Waiter(set(), on_done)
        by_peer: dict[str, list[tuple[bytes, bytes | None]]] = {}
        parent: bytes | None = None
        only = self._view.address_of(holder) if holder is not None else None
        for key in keys:
            chain_parent, parent = parent, key
            if self._store.lookup([key]):
                continue
            waiter.remaining.add(key)
            if key in self._inflight:
                self._inflight[key].append(waiter)
                continue
            address = only if holder is not None else self._holder_address(key)
            if not address:
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
            for lo in range(0, len(wanted), FETCH_CHUNK):
                queue.append(wanted[lo : lo + FETCH_CHUNK])
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
            self._send(address, queue.popleft())
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
        view = self._view
        holders = [h for h in view.index.holders(key) if view.is_live(h.node)]
        if not holders:
            return None
        best = min(holders, key=lambda h: (h.tier, h.node))
        return view.address_of(best.node)

    def _send(self, address: str, wanted: list[tuple[bytes, bytes | None]]) -> None:
        keys = [k for k, _ in wanted]
        parents = dict(wanted)
        request = cm.FetchRequest(self._links.new_id(), self._node, join_keys(keys))

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

        self._links.request(address, request, on_reply, on_fail, self._timeout_s,
                            version=self._version_of(address))  # fmt: skip

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
        store = self._store
        # One reserve and one commit per run of chained blocks (each the parent of the
        # next, one namespace), not per block: the store's per-call work is paid once.
        runs: list[list[_Arrival]] = []
        in_run: set[bytes] = set()
        for index, nbytes, checksum, namespace, frame in zip(
            found, sizes, checksums, namespaces, payloads, strict=True
        ):
            key = keys[index]
            data = frame.buffer
            if len(data) != nbytes or not 0 < nbytes <= store.max_block_bytes:
                self.metrics.fetched.labels("bad_size").inc()
                continue
            arrival = _Arrival(key, nbytes, checksum, str(namespace), data)
            last = runs[-1][-1] if runs else None
            if (last is None or key in in_run or parents.get(key) != last.key
                    or arrival.namespace != last.namespace):  # fmt: skip
                runs.append([arrival])
                in_run = {key}
            else:
                runs[-1].append(arrival)
                in_run.add(key)
        for run in runs:
            results = store.reserve(
                PEER_SESSION,
                [arrival.key for arrival in run],
                [arrival.nbytes for arrival in run],
                parents.get(run[0].key),
                namespace=run[0].namespace,
            )
            good: list[bytes] = []
            good_checksums: list[int] = []
            bad: list[bytes] = []
            nbytes_good = 0
            for arrival, result in zip(run, results, strict=True):
                if result.status is ReserveStatus.EXISTS:
                    landed.add(arrival.key)
                    continue
                if result.status is not ReserveStatus.OK:
                    self.metrics.fetched.labels("no_space").inc()
                    continue
                # One pass: copy into the reserved slot, hashing exactly what landed; a
                # mismatch aborts the reservation, so the bytes are never visible.
                slot = self._shm.view(result.offset, arrival.nbytes)
                if copy_hashing_target(arrival.data, slot) != arrival.checksum:
                    bad.append(arrival.key)
                    self.metrics.fetched.labels("checksum").inc()
                    log.warning(
                        "peer sent a block with a bad checksum", extra={"key": arrival.key.hex()}
                    )
                    continue
                good.append(arrival.key)
                good_checksums.append(arrival.checksum)
                nbytes_good += arrival.nbytes
            if bad:
                store.abort(PEER_SESSION, bad)
            if good:
                store.commit(PEER_SESSION, good, good_checksums)
                landed.update(good)
                self.metrics.fetched.labels("ok").inc(len(good))
                self.metrics.fetched_bytes.inc(nbytes_good)
        return landed

    def _finish(self, key: bytes, ok: bool) -> None:
        if not ok:
            self.metrics.fetched.labels("miss").inc()
        for waiter in self._inflight.pop(key, []):
            waiter.remaining.discard(key)
            if not waiter.remaining:
                waiter.on_done()


@dataclass(frozen=True, slots=True)
class _Arrival:
    """One block of a fetch reply, its header fields checked, not yet landed."""

    key: bytes
    nbytes: int
    checksum: int
    namespace: str
    data: Any  # the frame's buffer


@dataclass(slots=True)
class _Reply:
    """One fetch reply being put together: memory blocks go out as views of their slots,
    file-tier blocks once their reads (on the I/O workers) land in ``buffers``."""

    identity: bytes
    request_id: int
    version: int
    deadline: float  # past it the requester has given up: no reply is sent
    found: list[tuple[int, Lease]]
    payloads: list[Any]
    pinned: list[Lease]  # leased until ZeroMQ reports the frames sent
    nbytes: int  # counted in ``PeerServer.leased_bytes`` from the start
    reading: int = 0  # file reads not yet landed
    failed: set[int] = field(default_factory=set)  # positions in ``found`` not readable


class PeerServer:
    """The serving side of peer fetch (module docstring)."""

    def __init__(
        self,
        store: BlockStore,
        metrics: ClusterMetrics,
        send: Callable[..., Any],
        *,
        request_bytes: int = SERVE_REQUEST_BYTES,
        inflight_bytes: int = SERVE_INFLIGHT_BYTES,
        reply_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self.metrics = metrics
        self._send = send  # (frames, track=...) -> MessageTracker | None
        self._request_bytes = request_bytes
        self._inflight_bytes = inflight_bytes
        self._reply_timeout_s = reply_timeout_s
        self._clock = clock
        self._sending: list[tuple[zmq.MessageTracker, list[Lease], int]] = []
        self._closed = False
        self.leased_bytes = 0  # block bytes leased or buffered for replies not yet sent

    def serve(self, identity: bytes, request: cm.FetchRequest, version: int) -> None:
        keys = split_keys(request.keys)
        if len(keys) > MAX_FETCH_KEYS:
            raise ValueError(f"fetch of {len(keys)} keys; at most {MAX_FETCH_KEYS} per request")
        store = self._store
        leases = store.acquire(PEER_SESSION, keys, prefix=False, promote=False)
        reply = _Reply(identity, request.id, version, self._clock() + self._reply_timeout_s,
                       [], [], [], 0)  # fmt: skip
        unsent: list[Lease] = []  # leased, then not sent (over a bound): released now
        reads: list[tuple[int, Lease, memoryview]] = []
        request_left = self._request_bytes
        for index, lease in enumerate(leases):
            if lease is None:
                continue
            over_request = lease.nbytes > request_left and reply.found  # one block always goes
            over_inflight = self.leased_bytes + reply.nbytes + lease.nbytes > self._inflight_bytes
            if over_request or over_inflight:
                unsent.append(lease)
                self.metrics.dropped.labels("serve_bound").inc()
                continue
            request_left -= lease.nbytes
            reply.nbytes += lease.nbytes
            backing = store.backing(lease.tier)
            if isinstance(backing, MemoryBacking):
                reply.payloads.append(backing.view(lease.offset, lease.nbytes))
            else:  # a file tier: read on an I/O worker, the lease held until it lands
                buffer = memoryview(mmap.mmap(-1, padded(lease.nbytes)))  # page aligned
                reply.payloads.append(buffer[: lease.nbytes])
                reads.append((len(reply.found), lease, buffer))
            reply.pinned.append(lease)
            reply.found.append((index, lease))
        store.release_leases(PEER_SESSION, unsent)
        self.leased_bytes += reply.nbytes
        if not reads:
            self._finish(reply)
            return
        reply.reading = len(reads)
        for position, lease, buffer in reads:
            store.read_leased(lease, buffer, functools.partial(self._read, reply, position))

    def _read(self, reply: _Reply, position: int, ok: bool) -> None:
        """One file read of ``reply`` landed (on the loop thread)."""
        if not ok:
            reply.failed.add(position)
            log.warning("cannot read a block for a peer",
                        extra={"key": reply.found[position][1].key.hex()})  # fmt: skip
        reply.reading -= 1
        if not reply.reading:
            self._finish(reply)

    def _finish(self, reply: _Reply) -> None:
        """Send ``reply`` (without the blocks that could not be read), unless too late."""
        store = self._store
        if self._closed:  # the daemon is stopping: its socket is gone
            store.release_leases(PEER_SESSION, reply.pinned)
            return
        if self._clock() > reply.deadline:  # the requester has given up on it
            self.metrics.dropped.labels("serve_late").inc()
            self._done_with(reply.pinned, reply.nbytes)
            return
        kept = [i for i in range(len(reply.found)) if i not in reply.failed]
        found = [reply.found[i] for i in kept]
        header = cm.encode_reply(
            reply.request_id,
            version=reply.version,
            found=[index for index, _ in found],
            sizes=[lease.nbytes for _, lease in found],
            checksums=[lease.checksum for _, lease in found],
            namespaces=[store.namespace_of(lease.key) for _, lease in found],
        )
        payloads = [reply.payloads[i] for i in kept]
        tracker = self._send([reply.identity, header, *payloads], track=True)
        if tracker is None:
            self._done_with(reply.pinned, reply.nbytes)
            return
        # A file block's lease ends now (its bytes are in our buffer); the buffer stays
        # counted in ``leased_bytes`` until ZeroMQ has sent it.
        in_memory: list[Lease] = []
        read: list[Lease] = []
        for lease in reply.pinned:
            (in_memory if isinstance(store.backing(lease.tier), MemoryBacking) else read).append(
                lease
            )
        store.release_leases(PEER_SESSION, read)
        self._sending.append((tracker, in_memory, reply.nbytes))
        self.metrics.served.inc(len(found))

    def _done_with(self, leases: list[Lease], nbytes: int) -> None:
        self._store.release_leases(PEER_SESSION, leases)
        self.leased_bytes -= nbytes

    def release_sent(self) -> None:
        if not self._sending:
            return
        still = []
        for tracker, leases, nbytes in self._sending:
            if tracker.done:
                self._done_with(leases, nbytes)
            else:
                still.append((tracker, leases, nbytes))
        self._sending = still

    @property
    def sending(self) -> bool:
        return bool(self._sending)

    def close(self) -> None:
        """Replies whose reads land after this (the socket is gone) are dropped."""
        self._closed = True
        self._sending.clear()
        self.leased_bytes = 0
