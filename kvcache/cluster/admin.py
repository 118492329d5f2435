"""An operator's blocking client of one daemon's cluster ROUTER: status, evict, flush, drain.

``shoal cache evict|flush|drain --node NODE`` reach members other than the local daemon
through this class; the local daemon is reached through ``CacheClient`` instead (its ipc
socket needs no network path and no key)::

    ClusterAdmin ── DEALER ──tcp──► member's ROUTER (cluster port)   kvcache.cluster.messages
                    (CurveZMQ client with the operator's own keypair when curve_dir is set)

Authorisation (``security.py``): with CurveZMQ, evict / flush / drain need this
process's key (``curve_key``, default ``<curve_dir>/node.key_secret``) in the member's
``operators/`` allow-list; without it they carry ``token``, the local operator token of
the runtime dir (``read_operator_token``). A member still on protocol v2 is asked again
in v2 when it refuses v3 as ``version``.

One request is outstanding at a time, and replies are matched by id: a reply that
arrives after its request timed out is read and dropped by the next call. A silent peer
(down, firewalled, or expecting CurveZMQ that this client did not offer: a failed Curve
handshake is silent in ZeroMQ) is a ``CacheUnavailable`` naming the address once the
timeout passes; an error reply is ``RequestRejected``.

Rejected: reusing the daemon's ``ClusterNode`` dealers (they live on the daemon's loop
thread, and an operator's command has no loop), and a REQ socket (its strict send/recv
lockstep breaks after one timeout, forcing a reconnect per failure).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

import zmq

from kvcache.cluster import messages as cm
from kvcache.cluster.security import load_curve_keys
from kvcache.cluster.transport import max_reply_bytes
from kvcache.errors import CacheUnavailable, RequestRejected

__all__ = ["ClusterAdmin"]


class ClusterAdmin:
    """Requests to the member at ``address`` (``host:port`` or ``tcp://host:port``)."""

    def __init__(
        self,
        address: str,
        *,
        curve_dir: str = "",
        curve_key: str = "",
        token: str = "",
        timeout_s: float = 5.0,
    ) -> None:
        self.address = address if "://" in address else f"tcp://{address}"
        self.timeout_s = timeout_s
        self._token = token
        # Loaded before any socket exists, so a bad key directory leaks nothing.
        keys = load_curve_keys(curve_dir, curve_key, member=False) if curve_dir else None
        self._ids = itertools.count(1)
        self._context: zmq.Context[Any] = zmq.Context()
        self._socket: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes(0))
        if keys is not None:
            self._socket.curve_secretkey = keys.secret
            self._socket.curve_publickey = keys.public
            self._socket.curve_serverkey = keys.server_public
        try:
            self._socket.connect(self.address)
        except zmq.ZMQError as exc:
            self.close()
            raise CacheUnavailable(
                f"cannot connect to cluster member {self.address}: {exc}"
            ) from None

    # -- requests -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The member's own view: node, epoch, seq, state, members (as ``cluster_status``)."""
        return self._call(cm.StatusRequest(self._new_id()))

    def evict(self, namespace: str = "", key_prefix: str = "") -> int:
        """Remove the member's blocks of ``namespace`` whose hex key starts with ``key_prefix``."""
        reply = self._call(cm.EvictRequest(self._new_id(), namespace, key_prefix, self._token))
        return int(reply["evicted"])

    def flush(self) -> int:
        """Remove every committed block the member holds."""
        return int(self._call(cm.FlushRequest(self._new_id(), self._token))["flushed"])

    def drain(self, timeout_s: float = 120.0) -> dict[str, Any]:
        """Stop the member taking blocks, hand its hot blocks to peers, and let it leave.

        The member answers when the hand-off is done (``handed_off``, ``peers``) and then
        exits; waits up to ``timeout_s``.
        """
        reply = self._call(cm.DrainRequest(self._new_id(), self._token), timeout_s=timeout_s)
        return {"handed_off": int(reply["handed_off"]), "peers": list(reply["peers"])}

    # -- transport ------------------------------------------------------------------------

    def _new_id(self) -> int:
        return next(self._ids)

    def _call(self, request: cm.Request, *, timeout_s: float | None = None) -> dict[str, Any]:
        reply = self._exchange(request, cm.VERSION, timeout_s)
        if not reply["ok"] and reply.get("code") == "version":  # a member still on v2
            request = dataclasses.replace(request, id=self._new_id())
            reply = self._exchange(request, cm.MIN_VERSION, timeout_s)
        if not reply["ok"]:
            raise RequestRejected(str(reply.get("code")), str(reply.get("error")))
        return reply

    def _exchange(
        self, request: cm.Request, version: int, timeout_s: float | None
    ) -> dict[str, Any]:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            self._socket.send(request.encode(version), zmq.NOBLOCK)
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._socket.poll(int(remaining * 1000) + 1):
                    raise CacheUnavailable(
                        f"no reply from cluster member {self.address} within {timeout:g}s "
                        "(is it running, is the address reachable, and does it expect "
                        "CurveZMQ keys (--cluster-curve-dir)?)"
                    )
                reply = cm.decode_reply(self._socket.recv())
                if reply["id"] in (request.id, 0):  # 0: a frame it could not read at all
                    break  # anything else is the late reply of a request that timed out
        except zmq.Again:
            raise CacheUnavailable(
                f"cluster member {self.address} is not accepting requests (send queue full)"
            ) from None
        except zmq.ZMQError as exc:
            raise CacheUnavailable(f"cluster member {self.address}: {exc}") from None
        return reply

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> ClusterAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
