"""The member's ZeroMQ sockets: how each is made (keys, roles, size limits) and the
requests it sends to peers, each awaiting its reply from *that* peer.

Socket roles (``security.py`` says why)::

    socket            bind/connect   CurveZMQ role, per-node keys   v2 (legacy) layout
    ROUTER  port      bind           server (cluster keypair)       server
    PUB     port + 1  bind           client (own member key)        server
    SUB               connect        server (cluster keypair)       client
    DEALER (per peer) connect        client (own member key)        client

Limits: every socket sets ``ZMQ_MAXMSGSIZE`` (a larger frame disconnects its sender
before it is allocated): ``MAX_REQUEST_BYTES`` where requests arrive, and where replies
and streams arrive enough for the largest block or snapshot (``max_reply_bytes``).

Pending requests are keyed by (peer address, request id): a reply is matched only
against what was sent on that peer's DEALER, so a peer cannot complete, fail or feed
bytes into a request sent to another peer (review m6). Ids are per node and never
reused within a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from kvcache.cluster import messages as cm
from kvcache.cluster.security import STREAM_DOMAIN, CurveKeys
from kvcache.cluster.settings import bracket
from kvcache.errors import CacheError, ProtocolError
from kvcache.wire import peek_id

__all__ = ["MAX_REQUEST_BYTES", "PeerLinks", "Sockets", "max_reply_bytes"]

log = logging.getLogger("shoal." + __name__)

MAX_REQUEST_BYTES = 1 << 20  # a fetch or offer of 128 keys is 2 KiB; status carries nothing
_MAX_STREAM_OR_REPLY = 256 << 20  # a snapshot of 16M blocks; a replay of the kept batches


def max_reply_bytes(max_block_bytes: int) -> int:
    """The largest frame a member accepts as a reply or on the stream."""
    return max(_MAX_STREAM_OR_REPLY, max_block_bytes + MAX_REQUEST_BYTES)


class Sockets:
    """Makes the member's sockets with its keys (``None``: no CurveZMQ) and limits."""

    def __init__(
        self, context: zmq.Context[Any], keys: CurveKeys | None, max_block_bytes: int
    ) -> None:
        self._context = context
        self.keys = keys
        self._max_in = max_reply_bytes(max_block_bytes)

    @property
    def streams_reversed(self) -> bool:
        """Per-node keys: the subscriber is the CurveZMQ server of each stream connection."""
        return self.keys is not None and self.keys.per_node

    def _socket(self, kind: int, max_in: int) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_in)
        return sock

    def _as_server(self, sock: zmq.Socket[Any], *, stream: bool = False) -> None:
        keys = self.keys
        if keys is not None:
            assert keys.server_secret is not None, "a member holds the cluster secret key"
            sock.curve_secretkey = keys.server_secret
            sock.curve_publickey = keys.server_public
            sock.curve_server = True
            if stream:
                sock.zap_domain = STREAM_DOMAIN.encode()

    def _as_client(self, sock: zmq.Socket[Any]) -> None:
        keys = self.keys
        if keys is not None:
            sock.curve_secretkey = keys.secret
            sock.curve_publickey = keys.public
            sock.curve_serverkey = keys.server_public

    def router(self, host: str, port: int) -> zmq.Socket[Any]:
        sock = self._socket(zmq.ROUTER, MAX_REQUEST_BYTES)
        self._as_server(sock)
        return _bind(sock, host, port)

    def pub(self, host: str, port: int) -> zmq.Socket[Any]:
        # It only receives subscriptions. Its queue per subscriber is ZeroMQ's default
        # 1,000 messages: v2 set 10,000 after bind, which ZeroMQ ignores (a listener copies
        # the options at bind), and the sync recovers what a slow subscriber loses.
        sock = self._socket(zmq.PUB, MAX_REQUEST_BYTES)
        if self.streams_reversed:
            self._as_client(sock)
        else:
            self._as_server(sock, stream=True)
        return _bind(sock, host, port)

    def sub(self) -> zmq.Socket[Any]:
        sock = self._socket(zmq.SUB, self._max_in)
        if self.streams_reversed:
            self._as_server(sock, stream=True)
        else:
            self._as_client(sock)
        return sock

    def dealer(self) -> zmq.Socket[Any]:
        sock = self._socket(zmq.DEALER, self._max_in)
        sock.setsockopt(zmq.SNDHWM, 1000)
        self._as_client(sock)
        return sock


def _bind(sock: zmq.Socket[Any], host: str, port: int) -> zmq.Socket[Any]:
    try:
        sock.bind(f"tcp://{bracket(host)}:{port}")
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise CacheError(f"cannot bind cluster port {host}:{port}: {exc}") from None
    return sock


@dataclass(slots=True)
class _Pending:
    """One request we sent to a peer, awaiting its reply."""

    deadline: float
    on_reply: Callable[[list[zmq.Frame]], None]
    on_fail: Callable[[str], None]


class PeerLinks:
    """One DEALER per peer address and the requests in flight on each."""

    def __init__(self, sockets: Sockets, clock: Callable[[], float]) -> None:
        self._sockets = sockets
        self._clock = clock
        self._poller: zmq.Poller | None = None
        self._dealers: dict[str, zmq.Socket[Any]] = {}
        self._address_of: dict[zmq.Socket[Any], str] = {}
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._next_id = 1
        self.num_late = 0  # replies to nothing we wait for (late, or not this peer's)

    def register(self, poller: zmq.Poller) -> None:
        self._poller = poller
        for sock in self._dealers.values():
            poller.register(sock, zmq.POLLIN)

    def owns(self, sock: Any) -> bool:
        return sock in self._address_of

    @property
    def addresses(self) -> list[str]:
        return list(self._dealers)

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _dealer(self, address: str) -> zmq.Socket[Any]:
        sock = self._dealers.get(address)
        if sock is None:
            sock = self._sockets.dealer()
            sock.connect(f"tcp://{address}")
            self._dealers[address] = sock
            self._address_of[sock] = address
            if self._poller is not None:
                self._poller.register(sock, zmq.POLLIN)
        return sock

    def drop(self, address: str, reason: str) -> None:
        """Close the peer's DEALER; its requests in flight fail with ``reason``."""
        sock = self._dealers.pop(address, None)
        if sock is None:
            return
        del self._address_of[sock]
        if self._poller is not None:
            self._poller.unregister(sock)
        sock.close(linger=0)
        for key in [k for k in self._pending if k[0] == address]:
            self._pending.pop(key).on_fail(reason)

    def request(
        self,
        address: str,
        request: cm.Request,
        on_reply: Callable[[list[zmq.Frame]], None],
        on_fail: Callable[[str], None],
        timeout_s: float,
        *,
        version: int = cm.VERSION,
    ) -> None:
        """Send ``request`` (encoded for a member speaking ``version``) to ``address``."""
        try:
            self._dealer(address).send(request.encode(version), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # HWM reached: the peer is not reading
            on_fail(f"cannot send to {address}: {exc}")
            return
        self._pending[(address, request.id)] = _Pending(
            self._clock() + timeout_s, on_reply, on_fail
        )

    def on_reply(self, sock: Any, frames: list[zmq.Frame]) -> None:
        """A reply arrived on ``sock``: complete the request it answers, if ours to it."""
        if not frames:
            return
        address = self._address_of[sock]
        pending = self._pending.pop((address, peek_id(frames[0].buffer)), None)
        if pending is None:
            self.num_late += 1
            return
        try:
            pending.on_reply(frames)
        except ProtocolError as exc:  # the request fails; the loop counts the frame
            pending.on_fail(str(exc))
            raise

    def expire(self, now: float) -> None:
        for key in [k for k, p in self._pending.items() if p.deadline <= now]:
            self._pending.pop(key).on_fail("timed out")

    def close(self) -> None:
        for address in list(self._dealers):
            self.drop(address, "shutting down")
