"""Who may speak on the cluster port, with which keys, and which verbs each may send.

The security model (review C4, m8)::

    port       socket   who connects            what they may send
    port       ROUTER   members (DEALER)        sync, fetch, offer, status      "peer verbs"
                        operators (ClusterAdmin) status, evict, flush, drain  "operator verbs"
    port + 1   PUB      members (SUB)           (nothing: they receive the stream)

Binding. ``cluster_host`` defaults to ``127.0.0.1``. A non-loopback bind without CurveZMQ
is refused at start with an error naming the two ways out (``cluster_curve_dir``, or
``cluster_insecure`` said explicitly, which then logs a WARNING at every start). Every
cluster socket, server and client, sets ``ZMQ_MAXMSGSIZE``: a peer sending a larger
frame is disconnected by ZeroMQ before the frame is allocated.

Without CurveZMQ (loopback, or ``cluster_insecure``): peer verbs are open to whoever
reaches the port: on loopback, every local user may read cached KV and the stream's key
metadata (use CurveZMQ on a machine shared with users the cache must not trust).
Operator verbs need the *local operator token*: a random secret the first daemon writes
to ``<runtime_dir>/shoal-cluster-operator.token`` (mode 0600 in the 0700 runtime dir),
which every daemon and ``shoal cache`` command with that runtime dir reads. Reaching the
token takes the daemon's UID, which can signal the daemon anyway; an anonymous local
process (``unauth_drain.py``) cannot flush or drain. A ``drain`` or ``flush`` of the
*local* daemon goes over its ipc socket and needs no token.

With CurveZMQ (``cluster_curve_dir`` = DIR)::

    DIR/cluster.key_secret   the cluster *server* keypair: every member holds it and is the
    DIR/cluster.key          CurveZMQ server with it; operators hold only the public half
    DIR/members/*.key        allow-list: public keys of members (zmq.auth certificate files;
                             metadata ``node = NAME`` pins a key to one member name)
    DIR/operators/*.key      allow-list: public keys of operators (never members)
    cluster_curve_key        this process's own keypair (member or operator);
                             default DIR/node.key_secret

A ZAP handler (``zmq.auth.thread.ThreadAuthenticator`` with ``KeyRing`` as its
credentials provider) admits a client key that is in either allow-list (on the stream's
sockets, ZAP domain ``shoal-stream``, a member's key only), and ZeroMQ puts
the key on every message of that connection (``User-Id``). Each request is authorised by
that key against the allow-lists *as they are now*: peer verbs need a member key,
operator verbs an operator key. So one member's key cannot flush another member, and an
operator's laptop cannot pose as a member. ``KeyRing.reload`` re-reads both directories
(the node does so every ``cluster_key_reload_s``; cheap: a directory listing and a few
small files): a key removed there is refused from the next request on, a key added there
is admitted at its next connection, without a restart. Rotating the server keypair
itself needs a restart of every member.

Identity. The stream's roles are reversed with per-node keys: a subscriber is the
CurveZMQ *server* of its connection to a publisher (the publisher the client, with its
member key), so every stream message carries the publisher's authenticated key as well.
``Identities`` ties a member name to the key that speaks for it: to the key whose
certificate names it, else to the first key heard for it while it is live; a key speaks
for one member (and that member's engine streams) at a time. A batch, heartbeat or
``leaving`` in the name of another member is dropped and counted (``impersonation``); an
``offer`` is taken only from the key of the member it names. Members are trusted to
serve correct bytes; what a key cannot do is act in another member's name.

Legacy layout (DIR without ``members/``, as ``shoal cache keygen DIR`` made for v2): the
cluster keypair is also every member's client key and the only member key, the stream
roles are v2's (so v2 and v3 members with that layout form one cluster), names are not
tied to keys (everyone holds the same key), and operator verbs still need a key from
``DIR/operators/``. Switching a cluster to per-node keys is done with every member on
v3: members with different layouts do not hear each other's streams.

What the shared server keypair leaves: a server proves only "a member", so a member in
a position to take over another's address could answer connections meant for it (a
client proves exactly which key it is). Operators never hold the server secret.

Rejected: a separate operator socket or port (a second port to open, route and firewall,
for what the key on each message already tells); a server keypair per member (a client
must know the server's public key before it connects, and discovery yields addresses,
not keys); signing stream messages (a MAC per batch, when the connection is authenticated
already).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvcache.errors import CacheError
from shoal.config import is_loopback

__all__ = [
    "CurveKeys",
    "Identities",
    "KeyRing",
    "check_bind",
    "is_loopback",
    "load_curve_keys",
    "operator_token",
    "read_operator_token",
]

log = logging.getLogger("shoal." + __name__)

SERVER_KEY = "cluster.key_secret"
SERVER_PUBLIC_KEY = "cluster.key"
DEFAULT_OWN_KEY = "node.key_secret"
MEMBERS_DIR = "members"
OPERATORS_DIR = "operators"
TOKEN_FILE = "shoal-cluster-operator.token"

MEMBER = "member"
OPERATOR = "operator"
STREAM_DOMAIN = "shoal-stream"  # ZAP domain of the stream's server sockets: members only


def check_bind(host: str, *, curve: bool, insecure: bool) -> None:
    """Refuse a non-loopback cluster bind without CurveZMQ unless the operator said so."""
    if curve or is_loopback(host):
        return
    if not insecure:
        raise CacheError(
            f"refusing to bind the cluster port on {host} without CurveZMQ: anyone who can "
            "reach it could read, flush or drain this cache. Give --cluster-curve-dir DIR "
            "(keys from `shoal cache keygen`), bind --cluster-host 127.0.0.1, or say "
            "--cluster-insecure on a network you trust"
        )
    log.warning(
        "cluster port bound without CurveZMQ (--cluster-insecure): peers are not "
        "authenticated and the operator token travels in clear text",
        extra={"host": host},
    )


# -- keys --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """The keys a cluster process uses (module docstring)."""

    server_public: bytes  # keys as zmq.auth certificates hold them: z85 text, 40 bytes
    server_secret: bytes | None  # members only; an operator holds no server secret
    public: bytes  # this process's client key
    secret: bytes
    per_node: bool  # DIR has members/ (else the v2 single-keypair layout)


def _load(path: Path, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CacheError(
            f"cannot load the {what} {path}: {exc}; create it with `shoal cache keygen`"
        ) from None


def load_curve_keys(directory: str, own_key: str = "", *, member: bool = True) -> CurveKeys:
    """The keys in ``directory`` for a member (``member``) or an operator."""
    root = Path(directory)
    per_node = (root / MEMBERS_DIR).is_dir()
    server_file = root / SERVER_KEY
    if not member and not server_file.exists():  # an operator needs the public half only
        server_file = root / SERVER_PUBLIC_KEY
    server_public, server_secret = _load(server_file, "cluster CurveZMQ key")
    if member and server_secret is None:
        raise CacheError(f"{server_file} holds no secret key; a member needs it")
    own = Path(own_key) if own_key else root / DEFAULT_OWN_KEY
    if own_key or own.exists():
        public, secret = _load(own, "own CurveZMQ keypair")
        if secret is None:
            raise CacheError(f"{own} holds no secret key; point cluster_curve_key at a keypair")
    elif per_node:
        raise CacheError(
            f"{root} lists members ({MEMBERS_DIR}/) but this process has no keypair: create "
            f"one with `shoal cache keygen {root} --member NAME` (or --operator NAME) and "
            "give it as cluster_curve_key"
        )
    else:  # the v2 layout: everyone uses the cluster keypair
        if server_secret is None:
            raise CacheError(f"{root / SERVER_KEY} holds no secret key")
        public, secret = server_public, server_secret
    return CurveKeys(server_public, server_secret if member else None, public, secret, per_node)


class KeyRing:
    """The member and operator allow-lists of a key directory, re-readable at any time.

    ``callback`` runs on the ZAP thread; every other method on the daemon's thread. A
    reload swaps whole dicts, which the ZAP thread reads with one attribute load.
    """

    def __init__(self, directory: str, keys: CurveKeys) -> None:
        self._root = Path(directory)
        self._keys = keys
        self._lock = threading.Lock()
        self._members: dict[bytes, str] = {}  # z85 key -> pinned node name ("" = any)
        self._operators: frozenset[bytes] = frozenset()
        self.reload()

    def reload(self) -> bool:
        """Re-read the allow-lists; ``True`` if they changed. A bad file is skipped, loudly."""
        members: dict[bytes, str] = {}
        if self._keys.per_node:
            for path in sorted((self._root / MEMBERS_DIR).glob("*.key")):
                public = self._public_key(path)
                if public is not None:
                    members[public] = _pinned_node(path)
        else:
            members[self._keys.server_public] = ""
        operators = frozenset(
            public
            for path in sorted((self._root / OPERATORS_DIR).glob("*.key"))
            if (public := self._public_key(path)) is not None
        )
        operators -= members.keys()  # a key is one or the other, never both
        with self._lock:
            changed = members != self._members or operators != self._operators
            self._members, self._operators = members, operators
        if changed:
            log.info("cluster keys loaded",
                     extra={"members": len(members), "operators": len(operators)})  # fmt: skip
        return changed

    @staticmethod
    def _public_key(path: Path) -> bytes | None:
        import zmq.auth

        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            log.warning("skipped an unreadable key file", extra={"path": str(path),
                                                                 "error": str(exc)})  # fmt: skip
            return None
        return public

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a member's key, or on the ROUTER an operator's too (an operator
        has no business on the stream)."""
        if domain == STREAM_DOMAIN:
            return key in self._members
        return key in self._members or key in self._operators

    def role(self, user_id: str | bytes | None) -> str | None:
        """``MEMBER``, ``OPERATOR`` or ``None`` for the key a message came with."""
        key = user_id.encode() if isinstance(user_id, str) else user_id
        if key is None:
            return None
        if key in self._members:
            return MEMBER
        return OPERATOR if key in self._operators else None

    def check_own(self, public: bytes, node: str) -> None:
        """Fail fast if peers would refuse this member's own key or name."""
        if public not in self._members:
            raise CacheError(
                f"this node's public key is not in {self._root / MEMBERS_DIR}/: peers would "
                "refuse it; copy its .key file there (on every member)"
            )
        pinned = self._members[public]
        if pinned and pinned != node:
            raise CacheError(
                f"this node's key is pinned to node {pinned!r} but it runs as {node!r}: set "
                f"cluster_node to {pinned!r} or use that node's key"
            )

    def pinned_node(self, user_id: str) -> str:
        """The member name the key's certificate names ("" if none)."""
        return self._members.get(user_id.encode(), "")


def _pinned_node(path: Path) -> str:
    """The ``node`` metadata of a zmq.auth certificate file, if any."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    in_metadata = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith((" ", "\t")):
            in_metadata = stripped == "metadata"
            continue
        if in_metadata and "=" in stripped:
            name, _, value = stripped.partition("=")
            if name.strip() == "node":
                return value.strip().strip('"')
    return ""


class Identities:
    """Which authenticated key speaks for which member name (module docstring).

    ``is_live`` tells whether a member is still in the view: a name is bound to a key
    while its member lives, so a restarted member (a new epoch, the same key) keeps it,
    and a member that left or died frees it.
    """

    def __init__(self, ring: KeyRing, is_live: Any) -> None:
        self._ring = ring
        self._is_live = is_live
        self._key_of: dict[str, str] = {}  # member (node) name -> key
        self._node_of: dict[str, str] = {}  # key -> member name
        self.num_refused = 0

    def admit(self, stream: str, user_id: str | None) -> bool:
        """May the key ``user_id`` speak for ``stream`` (a member or one of its engines)?"""
        node = stream.split("/", 1)[0]
        if user_id is None or self._ring.role(user_id) != MEMBER:
            self.num_refused += 1
            return False
        pinned = self._ring.pinned_node(user_id)
        if pinned and pinned != node:
            self.num_refused += 1
            return False
        holder = self._key_of.get(node)
        if holder == user_id:
            return True
        if holder is not None and self._is_live(node) and not self._pinned_to(node, user_id):
            self.num_refused += 1
            return False
        spoken = self._node_of.get(user_id)
        if spoken is not None and spoken != node and self._is_live(spoken):
            self.num_refused += 1
            return False
        if holder is not None:
            self._node_of.pop(holder, None)
        if spoken is not None:
            self._key_of.pop(spoken, None)
        self._key_of[node], self._node_of[user_id] = user_id, node
        return True

    def _pinned_to(self, node: str, user_id: str) -> bool:
        """A certificate naming ``node`` outranks whoever was heard for it first."""
        return self._ring.pinned_node(user_id) == node

    def node_of(self, user_id: str) -> str | None:
        return self._node_of.get(user_id)


# -- the local operator token ------------------------------------------------------------


def operator_token(runtime_dir: Path) -> str:
    """The runtime dir's operator token, created (mode 0600) if this is the first daemon."""
    path = runtime_dir / TOKEN_FILE
    token = read_operator_token(runtime_dir)
    if token:
        return token
    # Written aside and linked into place: a daemon starting at the same moment sees
    # either no token or a whole one, and the loser of the race adopts the winner's.
    scratch = runtime_dir / f".{TOKEN_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        os.link(scratch, path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CacheError(f"cannot create the operator token {path}: {exc}") from None
    finally:
        scratch.unlink(missing_ok=True)
    token = read_operator_token(runtime_dir)
    if not token:
        raise CacheError(f"{path} holds no operator token; remove it and restart")
    return token


def read_operator_token(runtime_dir: Path) -> str:
    """The operator token of ``runtime_dir`` ("" if there is none or it is unreadable)."""
    try:
        return (runtime_dir / TOKEN_FILE).read_text().strip()
    except OSError:
        return ""
