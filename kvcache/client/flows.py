"""The values callers see, and every client operation written once as a sans-I/O flow.

A flow is a generator that yields requests and receives replies; ``CacheClient``
(``kvcache.client.sync``) drives it with blocking ZeroMQ calls and ``AsyncCacheClient``
(``kvcache.client.aio``) with ``zmq.asyncio``, so both always speak the same protocol::

    put(keys, payloads)      reserve ──► copy payloads into the arena ──► commit      2 RTT
                             (commit one-way with wait=False: 1 RTT)
    get_into(keys, outs)     get (leases) ──► copy out + verify checksums ──► release  1 RTT
                                                                    (release is one-way)

Batches larger than ``pipeline_bytes`` (4 MiB) are cut into pieces and the request for
piece i+1 is in flight while piece i is copied, so the daemon's work and the round trip
hide behind the copy (the daemon runs on another core). Each copy checksums the bytes it
moves in the same pass (``kvcache.checksums``: compiled, one pass over DRAM).

Payloads are any C-contiguous buffer (bytes, bytearray, memoryview, numpy array; a torch
tensor via ``t.view(torch.uint8).numpy()``). The writer checksums (xxh3-64) the bytes it
landed in the arena, and readers verify the bytes they copied out (``verify_reads``), so
torn or corrupted bytes are a miss, never wrong data.

A flow builds its requests when it runs, from the session of that moment, and can be run
again from the start: a call that meets a restarted daemon is retried once, as a new flow
on the new session (a put is redone from the caller's payloads).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcache import messages as m
from kvcache.checksums import block_checksum, copy_checksum_source, get_from, put_into
from kvcache.client.session import ClientSession
from kvcache.errors import ProtocolError
from kvcache.keys import join_keys
from kvcache.store import ReserveStatus

__all__ = ["BlockView", "ClusterLookup", "PutResult", "Reservation"]

T = TypeVar("T")

_OK = bytes([ReserveStatus.OK])


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
    """A leased block: ``buffer`` is read-only arena memory until ``release``, or until
    the lease expires (the daemon's ``lease_ttl_s`` after this client's last get/release).

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


class _ClientFlows(ClientSession):
    """The operation flows over a ``ClientSession``; subclasses add the I/O loop."""

    # A put/get is cut into pieces that grow from pipeline_first_bytes to pipeline_bytes
    # (doubling), and up to pipeline_depth piece requests are kept in flight while the
    # client copies: a small first piece starts the copying after one short round trip,
    # large later pieces keep the messages few (each costs the client ~0.1-0.2 ms of
    # CPU in ZeroMQ and the flow; 16 pieces of 4 MiB per 64 MiB call cost ~3 ms of a
    # ~9 ms call). Measured in issue 17 (bench/kvcache.py).
    pipeline_first_bytes = 2 << 20
    pipeline_bytes = 16 << 20
    pipeline_depth = 4

    def _hello_flow(self) -> _Flow[None]:
        reply = yield self._hello_request()
        assert reply is not None
        self._accept_hello(reply)

    # -- flows -----------------------------------------------------------------------

    def _lookup_flow(self, keys: Sequence[bytes]) -> _Flow[int]:
        reply = yield self._request(m.LookupRequest, keys=join_keys(keys))
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
        return self._request(
            m.ReserveRequest,
            keys=join_keys(keys),
            sizes=list(sizes),
            parent=parent,
        )

    def _commit_flow(
        self, keys: Sequence[bytes], checksums: Sequence[int], wait: bool = True
    ) -> _Flow[int]:
        reply = yield self._request(
            m.CommitRequest,
            keys=join_keys(keys),
            checksums=list(checksums),
            reply=wait,
        )
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
        pieces = _pieces([len(v) for v in views], self.pipeline_bytes, self.pipeline_first_bytes)
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
            if not full and not statuses.strip(_OK):  # every slot reserved: one batch copy
                checksums.extend(self._put_into(offsets, views[lo:hi]))
                written.extend(keys[lo:hi])
                continue
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
                    checksums.append(copy_checksum_source(view, self._slot(offset, len(view))))
                    written.append(keys[i])
            if aborted:
                yield self._request(m.AbortRequest, keys=join_keys(aborted))
        no_space += sum(hi - lo for lo, hi in pieces[sent:])
        stored = (yield from self._commit_flow(written, checksums, wait)) if written else 0
        return PutResult(stored=stored, existed=existed, no_space=no_space)

    def _put_into(self, offsets: Sequence[int], views: Sequence[memoryview]) -> list[int]:
        """Copy a piece's payloads into their reserved slots in one call; their checksums."""
        assert self._arena is not None, "arena used before hello"
        try:
            return put_into(self._arena, offsets, views)
        except ValueError as error:  # a slot outside the arena: the daemon is wrong
            raise ProtocolError(f"daemon sent a slot outside the arena: {error}") from None

    def _get_from(
        self,
        offsets: Sequence[int],
        sizes: Sequence[int],
        checksums: Sequence[int],
        targets: Sequence[memoryview],
    ) -> tuple[int, bool]:
        """Copy a piece's leased blocks out in one call, in order, verifying each (when
        ``verify_reads``); stops at the first missing, mis-sized or corrupt block."""
        assert self._arena is not None, "arena used before hello"
        try:
            return get_from(self._arena, offsets, sizes, checksums, targets, self.verify_reads)
        except ValueError as error:
            raise ProtocolError(f"daemon sent a block outside the arena: {error}") from None

    def _get_flow(self, keys: Sequence[bytes], prefix: bool) -> _Flow[list[BlockView | None]]:
        reply = yield self._request(m.GetRequest, keys=join_keys(keys), prefix=prefix)
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
            yield self._request(m.ReleaseRequest, keys=join_keys(keys))

    def _get_into_flow(self, keys: Sequence[bytes], outs: Sequence[Any]) -> _Flow[int]:
        """Lease, copy out, verify, one pipeline piece ahead; leases go back one-way."""
        if len(keys) != len(outs):
            raise ValueError(f"{len(keys)} keys but {len(outs)} output buffers")
        targets = [_as_bytes_view(out) for out in outs]
        pieces = _pieces([len(t) for t in targets], self.pipeline_bytes, self.pipeline_first_bytes)
        if not pieces:
            return 0

        def get(lo: int, hi: int) -> m.GetRequest:
            return self._request(m.GetRequest, keys=join_keys(keys[lo:hi]), prefix=True)

        served = 0
        gap = False  # past a miss or a bad block nothing more can be used
        leased: list[bytes] = []
        corrupt: list[bytes] = []
        in_flight: deque[tuple[m.GetRequest, int, int]] = deque()
        sent = 0
        while sent < len(pieces) or in_flight:
            while sent < len(pieces) and len(in_flight) < self.pipeline_depth and not gap:
                request = get(*pieces[sent])
                yield _Later(request)
                in_flight.append((request, *pieces[sent]))
                sent += 1
            if not in_flight:
                break
            request, lo, hi = in_flight.popleft()
            reply = yield _Collect(request.id)
            assert reply is not None
            offsets, sizes, checksums = reply["offsets"], reply["sizes"], reply["checksums"]
            leased.extend(keys[lo + j] for j, offset in enumerate(offsets) if offset >= 0)
            if gap:
                continue
            try:
                if not len(offsets) == len(sizes) == len(checksums):
                    raise ProtocolError("get reply fields differ in length")
                count, bad = self._get_from(offsets, sizes, checksums, targets[lo:hi])
            except ProtocolError:
                yield from self._release_flow(leased)
                raise
            served += count
            if count < hi - lo:  # past a miss or a bad block nothing more can be used
                gap = True
                if bad:  # torn or corrupt: a miss, never wrong data
                    corrupt.append(keys[lo + count])
        yield from self._release_flow(leased)
        if corrupt:  # stop the daemon advertising bytes that fail their checksum
            yield self._request(m.DeleteRequest, keys=join_keys(corrupt))
        return served

    def _locate_flow(self, keys: Sequence[bytes]) -> _Flow[ClusterLookup]:
        reply = yield self._request(m.LocateRequest, keys=join_keys(keys))
        assert reply is not None
        runs = tuple((str(n), str(a), int(u)) for n, a, u in reply["runs"])
        gpu = tuple((str(n), int(u)) for n, u in reply.get("gpu", ()))
        return ClusterLookup(int(reply["length"]), int(reply["remote_length"]), runs, gpu)

    def _fetch_flow(self, keys: Sequence[bytes]) -> _Flow[int]:
        reply = yield self._request(m.FetchRequest, keys=join_keys(keys))
        assert reply is not None
        return int(reply["length"])

    def _simple_flow(self, cls: type[m.Request], **fields: Any) -> _Flow[dict[str, Any]]:
        reply = yield self._request(cls, **fields)
        assert reply is not None
        return reply


def _pieces(
    sizes: Sequence[int], piece_bytes: int, first_bytes: int | None = None
) -> list[tuple[int, int]]:
    """Split a batch into consecutive [lo, hi) ranges: the first of about ``first_bytes``,
    each next one twice the last, up to ``piece_bytes`` (all ``piece_bytes`` when no
    ``first_bytes``)."""
    pieces: list[tuple[int, int]] = []
    target = min(first_bytes or piece_bytes, piece_bytes)
    lo = total = 0
    for i, nbytes in enumerate(sizes):
        total += nbytes
        if total >= target:
            pieces.append((lo, i + 1))
            lo, total = i + 1, 0
            target = min(2 * target, piece_bytes)
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
