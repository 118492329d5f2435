"""Engine-side client of the cache daemon: a sync ``CacheClient`` and an ``AsyncCacheClient``.

Each operation is written once, as a generator that yields requests and receives replies
(a "sans-I/O" flow); the sync client drives it with blocking ZeroMQ calls and the async
client with ``zmq.asyncio``, so both always speak the same protocol::

    put(keys, payloads)      reserve ──► copy payloads into the arena ──► commit      2 RTT
                             (commit one-way with wait=False: 1 RTT)
    get_into(keys, outs)     get (leases) ──► copy out + verify checksums ──► release  1 RTT
                                                                    (release is one-way)

Batches larger than ``pipeline_bytes`` (4 MiB) are cut into pieces and the request for
piece i+1 is in flight while piece i is copied, so the daemon's work and the round trip
hide behind the copy (the daemon runs on another core). Copies and checksums go in
256 KiB pieces that stay in L2 between the two passes (``kvcache.tiers``).

Payloads are any C-contiguous buffer (bytes, bytearray, memoryview, numpy array; a torch
tensor via ``t.view(torch.uint8).numpy()``). The writer checksums (xxh3-64) the bytes it
landed in the arena, and readers verify the bytes they copied out (``verify_reads``), so
torn or corrupted bytes are a miss, never wrong data.

Failures are the caller's to degrade: ``CacheUnavailable`` when the daemon is down, slow or
restarted (the next call reconnects by itself), ``RequestRejected`` for a refused request.
Shortage is a return value (``PutResult.no_space``, a short ``get``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from kvcache import messages as m
from kvcache.arena import DATA_OFFSET, map_arena
from kvcache.config import CacheConfig
from kvcache.errors import (
    ArenaError,
    CacheError,
    CacheUnavailable,
    ProtocolError,
    RequestRejected,
)
from kvcache.keys import join_keys
from kvcache.store import ReserveStatus
from kvcache.tiers import block_checksum, copy_hashing_target

__all__ = [
    "AsyncCacheClient",
    "BlockView",
    "CacheClient",
    "ClusterLookup",
    "PutResult",
    "Reservation",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Later:
    """Flow step: send ``request`` now; its reply is collected by a later ``_Collect``."""

    request: m.Request


@dataclass(frozen=True, slots=True)
class _Collect:
    """Flow step: wait for the reply to an earlier ``_Later`` request."""

    request_id: int


# A flow yields a Request (send, then wait for its reply if it expects one), or a _Later /
# _Collect pair, which lets a flow keep the next request in flight while it copies bytes.
_Step = m.Request | _Later | _Collect
_Flow = Generator[_Step, dict[str, Any] | None, T]


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: int  # blocks written and committed by this call
    existed: int  # blocks already cached (nothing written)
    no_space: int  # blocks refused: the cache is full of leased/reserved blocks

    @property
    def complete(self) -> bool:
        return self.no_space == 0


@dataclass(frozen=True, slots=True)
class ClusterLookup:
    """Where a chain lives: ``length`` blocks here, up to ``remote_length`` with peers'.

    ``runs`` lists ``(node, address, upto)``: fetching from that node alone would extend
    the local prefix to ``upto`` (longest first). ``gpu`` lists ``(engine stream, upto)``:
    the engine (``<node>/gpu<i>``, here or on a peer) holds ``keys[:upto]`` on its GPU, as
    its vLLM KV events say (longest first); those blocks are never fetched from a GPU.
    """

    length: int
    remote_length: int
    runs: tuple[tuple[str, str, int], ...]
    gpu: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Reservation:
    """A slot to fill: write ``len(buffer)`` bytes into ``buffer``, then commit."""

    key: bytes
    offset: int
    buffer: memoryview


@dataclass(frozen=True, slots=True)
class BlockView:
    """A leased block: ``buffer`` is read-only arena memory until ``release``.

    ``offset`` locates it in ``arena_memory()`` (for copies that address the arena as a
    whole, such as DMA from a pinned mapping).
    """

    key: bytes
    checksum: int
    buffer: memoryview
    offset: int = 0

    def verify(self) -> bool:
        return block_checksum(self.buffer) == self.checksum


def _as_bytes_view(payload: Any) -> memoryview:
    view = memoryview(payload)
    if not view.c_contiguous:
        raise ValueError("payloads must be C-contiguous buffers")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class _ClientFlows:
    """Everything but the socket: sessions, arena mapping and the operation flows."""

    def __init__(
        self, endpoint: str, namespace: str, name: str, verify_reads: bool, populate: bool
    ):
        self.endpoint = endpoint
        self.namespace = namespace
        self.name = name
        self.verify_reads = verify_reads
        self.populate = populate
        # A put/get larger than pipeline_bytes is cut into pieces, and up to pipeline_depth
        # piece requests are kept in flight while the client copies.
        self.pipeline_bytes = 4 << 20
        self.pipeline_depth = 4
        self.session = 0
        self.heartbeat_s = 10.0
        self.max_block_bytes = 0
        self._context: Any = None  # zmq.Context or zmq.asyncio.Context, set by the subclass
        self._socket: Any = None
        self._ids = itertools.count(1)
        self._early: dict[int, dict[str, Any]] = {}  # replies that arrived before awaited
        self._outstanding: set[int] = set()  # ids sent with a reply still to come
        self._mmap: mmap.mmap | None = None
        self._arena: memoryview | None = None
        self.arena_generation = 0  # bumped each time a (re)connect maps an arena

    def _next_id(self) -> int:
        return next(self._ids)

    def arena_memory(self) -> memoryview:
        """A new writable view of the arena's data region, which reservation and lease
        offsets index; it stays valid (the mapping lives while any view does) but goes
        stale when ``arena_generation`` changes. Raises ``CacheUnavailable`` if unmapped."""
        if self._mmap is None or self._arena is None:
            raise CacheUnavailable(f"no arena mapped from {self.endpoint}")
        return memoryview(self._mmap)[DATA_OFFSET : DATA_OFFSET + len(self._arena)]

    def _file_reply(self, reply: dict[str, Any]) -> None:
        """Keep a reply someone still waits for; drop late replies of abandoned requests."""
        if reply["id"] in self._outstanding:
            self._outstanding.discard(reply["id"])
            self._early[reply["id"]] = reply

    def _hello_flow(self) -> _Flow[None]:
        try:
            pid_ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            pid_ns = 0
        reply = yield m.HelloRequest(
            id=self._next_id(), session=0, pid=os.getpid(), pid_ns=pid_ns,
            namespace=self.namespace, client=self.name,
        )  # fmt: skip
        assert reply is not None
        try:
            mapping, header = map_arena(
                reply["arena_path"], reply["instance_id"], populate=self.populate
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"hello reply lacks {exc}") from None
        except ArenaError as exc:
            raise CacheUnavailable(f"cannot map the daemon's arena: {exc}") from None
        self._drop_arena()
        self.arena_generation += 1
        self._mmap = mapping
        self._arena = memoryview(mapping)[DATA_OFFSET : DATA_OFFSET + header.data_bytes]
        self.session = int(reply["session"])
        self.heartbeat_s = float(reply["heartbeat_s"])
        self.max_block_bytes = int(reply["max_block_bytes"])

    def _drop_arena(self) -> None:
        if self._arena is not None:
            self._arena.release()
            self._arena = None
        if self._mmap is not None:
            # A BlockView or Reservation may still reference the old mapping; it is then
            # unmapped when the last view is garbage-collected.
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None

    def _open_socket(self) -> Any:
        """A DEALER connected to the daemon; fails fast if its ipc socket does not exist."""
        path = self.endpoint.removeprefix("ipc://")
        if self.endpoint.startswith("ipc://") and not os.path.exists(path):
            raise CacheUnavailable(
                f"no cache daemon socket at {path}; is `shoal cache serve` running?"
            )
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        return socket

    def _abandon_session(self) -> None:
        """A call failed midway: end the session so the daemon frees what it held.

        The failed flow may hold reservations and leases (and requests in flight); a
        ``bye`` makes the daemon release all of them at once, and the next call starts a
        new session. Cheaper alternatives (undoing piece by piece) would need every flow
        to track partial state for a path that only errors take.
        """
        if self._socket is not None and self.session:
            # Best effort: if even this fails, the session TTL reclaims everything.
            with contextlib.suppress(zmq.ZMQError):
                self._socket.send(
                    m.ByeRequest(id=self._next_id(), session=self.session).encode(), zmq.NOBLOCK
                )
        self._reset()

    def _reset(self) -> None:
        """Drop the connection; the next call reconnects and says hello again."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = None
        self.session = 0
        self._early.clear()
        self._outstanding.clear()

    def _slot(self, offset: int, nbytes: int) -> memoryview:
        assert self._arena is not None, "arena used before hello"
        if offset < 0 or offset + nbytes > len(self._arena):
            raise ProtocolError(f"daemon sent slot {offset}+{nbytes} outside the arena")
        return self._arena[offset : offset + nbytes]

    # -- flows -----------------------------------------------------------------------

    def _lookup_flow(self, keys: Sequence[bytes]) -> _Flow[int]:
        reply = yield m.LookupRequest(
            id=self._next_id(), session=self.session, keys=join_keys(keys)
        )
        assert reply is not None
        return int(reply["length"])

    def _reserve_flow(
        self, keys: Sequence[bytes], sizes: Sequence[int], parent: bytes | None
    ) -> _Flow[list[Reservation | ReserveStatus]]:
        reply = yield self._reserve_request(keys, sizes, parent)
        statuses, offsets = _reserve_answer(reply, len(keys))
        out: list[Reservation | ReserveStatus] = []
        for key, size, status, offset in zip(keys, sizes, statuses, offsets, strict=True):
            if status == ReserveStatus.OK:
                out.append(Reservation(key, offset, self._slot(offset, size)))
            else:
                out.append(ReserveStatus(status))
        return out

    def _reserve_request(
        self, keys: Sequence[bytes], sizes: Sequence[int], parent: bytes | None
    ) -> m.ReserveRequest:
        return m.ReserveRequest(
            id=self._next_id(), session=self.session, keys=join_keys(keys),
            sizes=list(sizes), parent=parent,
        )  # fmt: skip

    def _commit_flow(
        self, keys: Sequence[bytes], checksums: Sequence[int], wait: bool = True
    ) -> _Flow[int]:
        reply = yield m.CommitRequest(
            id=self._next_id(), session=self.session, keys=join_keys(keys),
            checksums=list(checksums), reply=wait,
        )  # fmt: skip
        return len(keys) if reply is None else int(reply["committed"])

    def _put_flow(
        self, keys: Sequence[bytes], payloads: Sequence[Any], parent: bytes | None, wait: bool
    ) -> _Flow[PutResult]:
        """Reserve and copy one pipeline piece ahead (while this process copies piece i into
        the arena, the daemon reserves piece i+1), then commit everything at once. Holding
        every reservation until the end means a put never evicts its own earlier pieces:
        like an unpipelined batch, a chain that does not fit ends in NO_SPACE."""
        if len(keys) != len(payloads):
            raise ValueError(f"{len(keys)} keys but {len(payloads)} payloads")
        views = [_as_bytes_view(p) for p in payloads]
        pieces = _pieces([len(v) for v in views], self.pipeline_bytes)
        if not pieces:
            return PutResult(0, 0, 0)

        def reserve(lo: int, hi: int) -> m.ReserveRequest:
            sizes = [len(v) for v in views[lo:hi]]
            return self._reserve_request(keys[lo:hi], sizes, keys[lo - 1] if lo else parent)

        existed = no_space = 0
        full = False  # after a NO_SPACE the rest of the chain is useless: abort it
        written: list[bytes] = []
        checksums: list[int] = []
        in_flight: deque[tuple[m.ReserveRequest, int, int]] = deque()
        sent = 0
        while sent < len(pieces) or in_flight:
            while sent < len(pieces) and len(in_flight) < self.pipeline_depth and not full:
                request = reserve(*pieces[sent])
                yield _Later(request)
                in_flight.append((request, *pieces[sent]))
                sent += 1
            if not in_flight:
                break
            request, lo, hi = in_flight.popleft()
            reply = yield _Collect(request.id)
            statuses, offsets = _reserve_answer(reply, hi - lo)
            aborted: list[bytes] = []
            for i, status, offset in zip(range(lo, hi), statuses, offsets, strict=True):
                if status == ReserveStatus.EXISTS:
                    existed += 1
                elif status != ReserveStatus.OK or full:
                    no_space += 1
                    full = True
                    if status == ReserveStatus.OK:
                        aborted.append(keys[i])
                else:
                    view = views[i]
                    checksums.append(copy_hashing_target(view, self._slot(offset, len(view))))
                    written.append(keys[i])
            if aborted:
                yield m.AbortRequest(
                    id=self._next_id(), session=self.session, keys=join_keys(aborted)
                )
        no_space += sum(hi - lo for lo, hi in pieces[sent:])
        stored = (yield from self._commit_flow(written, checksums, wait)) if written else 0
        return PutResult(stored=stored, existed=existed, no_space=no_space)

    def _get_flow(self, keys: Sequence[bytes], prefix: bool) -> _Flow[list[BlockView | None]]:
        reply = yield m.GetRequest(
            id=self._next_id(), session=self.session, keys=join_keys(keys), prefix=prefix
        )
        assert reply is not None
        offsets, sizes, checksums = reply["offsets"], reply["sizes"], reply["checksums"]
        views: list[BlockView | None] = []
        for key, offset, size, checksum in zip(keys, offsets, sizes, checksums, strict=False):
            views.append(
                None
                if offset < 0
                else BlockView(key, checksum, self._slot(offset, size).toreadonly(), offset)
            )
        return views

    def _release_flow(self, keys: Sequence[bytes]) -> _Flow[None]:
        if keys:
            yield m.ReleaseRequest(id=self._next_id(), session=self.session, keys=join_keys(keys))

    def _get_into_flow(self, keys: Sequence[bytes], outs: Sequence[Any]) -> _Flow[int]:
        """Lease, copy out, verify, one pipeline piece ahead; leases go back one-way."""
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} output buffers")
        targets = [_as_bytes_view(out) for out in outs]
        pieces = _pieces([len(t) for t in targets], self.pipeline_bytes)
        if not pieces:
            return 0

        def get(lo: int, hi: int) -> m.GetRequest:
            return m.GetRequest(
                id=self._next_id(), session=self.session, keys=join_keys(keys[lo:hi]), prefix=True
            )

        served = 0
        gap = False  # past a miss or a bad block nothing more can be used
        leased: list[bytes] = []
        corrupt: list[bytes] = []
        in_flight: deque[tuple[m.GetRequest, int]] = deque()
        sent = 0
        while sent < len(pieces) or in_flight:
            while sent < len(pieces) and len(in_flight) < self.pipeline_depth and not gap:
                request = get(*pieces[sent])
                yield _Later(request)
                in_flight.append((request, pieces[sent][0]))
                sent += 1
            if not in_flight:
                break
            request, lo = in_flight.popleft()
            reply = yield _Collect(request.id)
            assert reply is not None
            offsets, sizes, checksums = reply["offsets"], reply["sizes"], reply["checksums"]
            leased.extend(keys[lo + j] for j, offset in enumerate(offsets) if offset >= 0)
            try:
                for j, (offset, size, checksum) in enumerate(
                    zip(offsets, sizes, checksums, strict=True)
                ):
                    target = targets[lo + j]
                    if gap or offset < 0 or size != len(target):
                        gap = True
                        break
                    source = self._slot(offset, size)
                    if self.verify_reads:
                        if copy_hashing_target(source, target) != checksum:
                            gap = True  # torn or corrupt: a miss, never wrong data
                            corrupt.append(keys[lo + j])
                            break
                    else:
                        target[:] = source
                    served += 1
            except ProtocolError:
                yield from self._release_flow(leased)
                raise
        yield from self._release_flow(leased)
        if corrupt:  # stop the daemon advertising bytes that fail their checksum
            yield m.DeleteRequest(id=self._next_id(), session=self.session, keys=join_keys(corrupt))
        return served

    def _locate_flow(self, keys: Sequence[bytes]) -> _Flow[ClusterLookup]:
        reply = yield m.LocateRequest(id=self._next_id(), session=self.session,
                                      keys=join_keys(keys))  # fmt: skip
        assert reply is not None
        runs = tuple((str(n), str(a), int(u)) for n, a, u in reply["runs"])
        gpu = tuple((str(n), int(u)) for n, u in reply.get("gpu", ()))
        return ClusterLookup(int(reply["length"]), int(reply["remote_length"]), runs, gpu)

    def _fetch_flow(self, keys: Sequence[bytes]) -> _Flow[int]:
        reply = yield m.FetchRequest(id=self._next_id(), session=self.session,
                                     keys=join_keys(keys))  # fmt: skip
        assert reply is not None
        return int(reply["length"])

    def _simple_flow(self, request: m.Request) -> _Flow[dict[str, Any]]:
        reply = yield request
        assert reply is not None
        return reply


def _pieces(sizes: Sequence[int], piece_bytes: int) -> list[tuple[int, int]]:
    """Split a batch into consecutive [lo, hi) ranges of about ``piece_bytes`` each."""
    pieces: list[tuple[int, int]] = []
    lo = total = 0
    for i, nbytes in enumerate(sizes):
        total += nbytes
        if total >= piece_bytes:
            pieces.append((lo, i + 1))
            lo, total = i + 1, 0
    if lo < len(sizes):
        pieces.append((lo, len(sizes)))
    return pieces


def _reserve_answer(reply: dict[str, Any] | None, num_keys: int) -> tuple[bytes, list[int]]:
    """Statuses and offsets of a reserve reply, checked against the request's size."""
    assert reply is not None, "reserve always expects a reply"
    statuses, offsets = reply["statuses"], reply["offsets"]
    if len(statuses) != num_keys or len(offsets) != num_keys:
        raise ProtocolError("reserve reply does not match the request")
    return statuses, offsets


def _raise_for_error(reply: dict[str, Any]) -> None:
    if reply["ok"]:
        return
    code, message = str(reply.get("code")), str(reply.get("error"))
    if code == m.ErrorCode.UNKNOWN_SESSION:
        raise CacheUnavailable(f"daemon restarted or dropped this session ({message})")
    raise RequestRejected(code, message)


class CacheClient(_ClientFlows):
    """Blocking client; one per thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        namespace: str = "",
        name: str = "shoal-client",
        timeout_s: float = 5.0,
        verify_reads: bool = True,
        populate: bool = True,
        heartbeat: bool = True,
    ) -> None:
        super().__init__(
            endpoint or CacheConfig().endpoint, namespace, name, verify_reads, populate
        )
        self.timeout_s = timeout_s
        self._context = zmq.Context()
        self._heartbeat = heartbeat
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        try:
            self._connect()
        except BaseException:
            self._reset()
            self._context.term()
            raise

    # -- transport -------------------------------------------------------------------

    def _connect(self) -> None:
        self._socket = self._open_socket()
        try:
            self._drive(self._hello_flow())
        except BaseException:
            self._reset()
            raise
        if self._heartbeat and self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name="shoal-cache-heartbeat", daemon=True
            )
            self._heartbeat_thread.start()

    def _send(self, request: m.Request) -> int:
        if self._socket is None:
            self._connect()
            request = _with_session(request, self.session)
        assert self._socket is not None
        if request.expects_reply:
            self._outstanding.add(request.id)
        try:
            self._socket.send(request.encode(), copy=False)
        except zmq.ZMQError as exc:
            self._reset()
            raise CacheUnavailable(f"cache daemon at {self.endpoint}: {exc}") from None
        return request.id

    def _await(self, request_id: int) -> dict[str, Any]:
        assert self._socket is not None, "awaiting a reply on a closed socket"
        try:
            deadline = time.monotonic() + self.timeout_s
            while (reply := self._early.pop(request_id, None)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CacheUnavailable(
                        f"no reply from the cache daemon at {self.endpoint} "
                        f"within {self.timeout_s}s"
                    )
                if self._socket.poll(int(remaining * 1000) + 1):
                    self._file_reply(m.decode_reply(self._socket.recv()))
            _raise_for_error(reply)
            return reply
        except zmq.ZMQError as exc:
            self._reset()
            raise CacheUnavailable(f"cache daemon at {self.endpoint}: {exc}") from None
        except CacheUnavailable:
            self._reset()
            raise

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
        except BaseException:
            if sent:
                self._abandon_session()
            raise

    def _heartbeat_loop(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)
        try:
            while not self._heartbeat_stop.wait(self.heartbeat_s):
                if self.session:
                    socket.send(m.HeartbeatRequest(id=0, session=self.session).encode())
                    while socket.poll(0):
                        socket.recv()  # replies are only drained
        finally:
            socket.close(linger=0)

    # -- public API ------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` cached (any tier), in one round trip."""
        return self._drive(self._lookup_flow(keys))

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
        return self._drive(self._put_flow(keys, payloads, parent, wait))

    def get_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        """Copy the longest cached, verified prefix of ``keys`` into ``outs``; return its length."""
        return self._drive(self._get_into_flow(keys, outs))

    def reserve(
        self, keys: Sequence[bytes], sizes: Sequence[int], parent: bytes | None = None
    ) -> list[Reservation | ReserveStatus]:
        return self._drive(self._reserve_flow(keys, sizes, parent))

    def commit(
        self, reservations: Sequence[Reservation], checksums: Sequence[int] | None = None
    ) -> int:
        """Publish filled reservations. Checksums are computed from the arena bytes unless
        given (a writer that hashed each piece right after writing it, while it was still
        in cache); a wrong one makes the block fail every reader's verification."""
        if checksums is None:
            checksums = [block_checksum(r.buffer) for r in reservations]
        elif len(checksums) != len(reservations):
            raise ValueError(f"{len(reservations)} reservations but {len(checksums)} checksums")
        return self._drive(self._commit_flow([r.key for r in reservations], checksums))

    def abort(self, keys: Sequence[bytes]) -> None:
        self._drive(
            self._simple_flow(
                m.AbortRequest(id=self._next_id(), session=self.session, keys=join_keys(keys))
            )
        )

    def get(self, keys: Sequence[bytes], *, prefix: bool = True) -> list[BlockView | None]:
        """Lease blocks for zero-copy reads; ``release`` them when done."""
        return self._drive(self._get_flow(keys, prefix))

    def release(self, blocks: Sequence[BlockView]) -> None:
        self._drive(self._release_flow([b.key for b in blocks]))

    def delete(self, keys: Sequence[bytes]) -> int:
        reply = self._drive(
            self._simple_flow(
                m.DeleteRequest(id=self._next_id(), session=self.session, keys=join_keys(keys))
            )
        )
        return int(reply["deleted"])

    def stats(self) -> dict[str, Any]:
        reply = self._drive(
            self._simple_flow(m.StatsRequest(id=self._next_id(), session=self.session))
        )
        return dict(reply["stats"])

    # -- cluster ---------------------------------------------------------------------

    def locate(self, keys: Sequence[bytes]) -> ClusterLookup:
        """Longest prefix of ``keys`` cached here and, beyond it, on peers (one round trip)."""
        return self._drive(self._locate_flow(keys))

    def fetch(self, keys: Sequence[bytes]) -> int:
        """Bring peers' blocks of the chain here; returns the local prefix length after.

        A dead or slow peer costs at most the daemon's ``cluster_fetch_timeout_s``; its
        blocks stay misses.
        """
        return self._drive(self._fetch_flow(keys))

    def cluster_status(self, *, samples: bool = False) -> dict[str, Any]:
        """Members, epochs, sync state and (``samples``) propagation samples since last call."""
        request = m.ClusterRequest(id=self._next_id(), session=self.session, samples=samples)
        return dict(self._drive(self._simple_flow(request))["cluster"])

    def evict(self, namespace: str = "", key_prefix: str = "") -> int:
        request = m.EvictRequest(
            id=self._next_id(), session=self.session, namespace=namespace, key_prefix=key_prefix
        )
        return int(self._drive(self._simple_flow(request))["evicted"])

    def flush(self) -> int:
        request = m.FlushRequest(id=self._next_id(), session=self.session)
        return int(self._drive(self._simple_flow(request))["flushed"])

    def drain(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Stop the daemon taking blocks, hand hot blocks to peers, leave; waits for it."""
        saved, self.timeout_s = self.timeout_s, timeout_s
        try:
            request = m.DrainRequest(id=self._next_id(), session=self.session)
            reply = self._drive(self._simple_flow(request))
        finally:
            self.timeout_s = saved
        return {"handed_off": reply["handed_off"], "peers": reply["peers"]}

    def close(self) -> None:
        self._heartbeat_stop.set()
        if self._socket is not None and self.session:
            # On failure the daemon notices through the pidfd or the session TTL.
            with contextlib.suppress(zmq.ZMQError):
                self._socket.send(
                    m.ByeRequest(id=self._next_id(), session=self.session).encode(), zmq.NOBLOCK
                )
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=1)
        self._reset()
        self._drop_arena()
        self._context.term()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_session(request: m.Request, session: int) -> m.Request:
    """The same request for a new session (after a transparent reconnect)."""
    return dataclasses.replace(request, session=session)


class AsyncCacheClient(_ClientFlows):
    """asyncio client (works under uvloop); create with ``await AsyncCacheClient.connect()``."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        namespace: str = "",
        name: str = "shoal-async-client",
        timeout_s: float = 5.0,
        verify_reads: bool = True,
        populate: bool = True,
    ) -> None:
        super().__init__(
            endpoint or CacheConfig().endpoint, namespace, name, verify_reads, populate
        )
        self.timeout_s = timeout_s
        self._context = zmq.asyncio.Context()
        # One request in flight at a time: replies are matched by id, and the heartbeat
        # task shares the socket. Concurrent engines steps use one client each.
        self._lock = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, endpoint: str | None = None, **kwargs: Any) -> AsyncCacheClient:
        client = cls(endpoint, **kwargs)
        try:
            await client._open()
        except BaseException:
            client._reset()
            client._context.term()
            raise
        client._heartbeat_task = asyncio.get_running_loop().create_task(client._heartbeat_loop())
        return client

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.heartbeat()
            except CacheError:
                continue  # the next real call reconnects

    async def _open(self) -> None:
        self._socket = self._open_socket()
        try:
            await self._drive_unlocked(self._hello_flow())
        except BaseException:
            self._reset()
            raise

    async def _send(self, request: m.Request) -> int:
        if self._socket is None:
            await self._open()
            request = _with_session(request, self.session)
        assert self._socket is not None
        if request.expects_reply:
            self._outstanding.add(request.id)
        try:
            await self._socket.send(request.encode())
        except zmq.ZMQError as exc:
            self._reset()
            raise CacheUnavailable(f"cache daemon at {self.endpoint}: {exc}") from None
        return request.id

    async def _await(self, request_id: int) -> dict[str, Any]:
        assert self._socket is not None, "awaiting a reply on a closed socket"
        try:
            deadline = time.monotonic() + self.timeout_s
            while (reply := self._early.pop(request_id, None)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CacheUnavailable(
                        f"no reply from the cache daemon at {self.endpoint} "
                        f"within {self.timeout_s}s"
                    )
                if await self._socket.poll(int(remaining * 1000) + 1):
                    self._file_reply(m.decode_reply(await self._socket.recv()))
            _raise_for_error(reply)
            return reply
        except zmq.ZMQError as exc:
            self._reset()
            raise CacheUnavailable(f"cache daemon at {self.endpoint}: {exc}") from None
        except CacheUnavailable:
            self._reset()
            raise

    async def _drive(self, flow: _Flow[T]) -> T:
        async with self._lock:
            return await self._drive_unlocked(flow)

    async def _drive_unlocked(self, flow: _Flow[T]) -> T:
        reply: dict[str, Any] | None = None
        sent = False
        try:
            while True:
                step = flow.send(reply)
                sent = True
                if isinstance(step, _Collect):
                    reply = await self._await(step.request_id)
                elif isinstance(step, _Later):
                    await self._send(step.request)
                    reply = None
                else:
                    request_id = await self._send(step)
                    reply = await self._await(request_id) if step.expects_reply else None
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except BaseException:  # also cancellation: leases must not outlive the call
            if sent:
                self._abandon_session()
            raise

    async def heartbeat(self) -> None:
        await self._drive(
            self._simple_flow(m.HeartbeatRequest(id=self._next_id(), session=self.session))
        )

    async def lookup(self, keys: Sequence[bytes]) -> int:
        return await self._drive(self._lookup_flow(keys))

    async def put(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Any],
        parent: bytes | None = None,
        *,
        wait: bool = True,
    ) -> PutResult:
        return await self._drive(self._put_flow(keys, payloads, parent, wait))

    async def get_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        return await self._drive(self._get_into_flow(keys, outs))

    async def get(self, keys: Sequence[bytes], *, prefix: bool = True) -> list[BlockView | None]:
        return await self._drive(self._get_flow(keys, prefix))

    async def release(self, blocks: Sequence[BlockView]) -> None:
        await self._drive(self._release_flow([b.key for b in blocks]))

    async def delete(self, keys: Sequence[bytes]) -> int:
        reply = await self._drive(
            self._simple_flow(
                m.DeleteRequest(id=self._next_id(), session=self.session, keys=join_keys(keys))
            )
        )
        return int(reply["deleted"])

    async def locate(self, keys: Sequence[bytes]) -> ClusterLookup:
        return await self._drive(self._locate_flow(keys))

    async def fetch(self, keys: Sequence[bytes]) -> int:
        return await self._drive(self._fetch_flow(keys))

    async def stats(self) -> dict[str, Any]:
        reply = await self._drive(
            self._simple_flow(m.StatsRequest(id=self._next_id(), session=self.session))
        )
        return dict(reply["stats"])

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        if self._socket is not None and self.session:
            # On failure the daemon notices through the pidfd or the session TTL.
            with contextlib.suppress(zmq.ZMQError):
                await self._socket.send(
                    m.ByeRequest(id=self._next_id(), session=self.session).encode()
                )
        self._reset()
        self._drop_arena()
        self._context.term()
