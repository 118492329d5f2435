"""One client's session with one cache daemon: trust, hello, the arena, and failure.

Life of a session (``ClientSession``; ``CacheClient`` and ``AsyncCacheClient`` drive it)::

    no session ──check_reachable──► hello ──► LIVE: token, epoch, arena mapped
        ▲  │ fails (timeout, ZMQ error, nothing listening, untrusted path)     │
        │  └──► DOWN for retry_interval_s: every call raises CacheUnavailable   │
        │        at once; after it, the next call probes (one probe per interval)
        ├── unknown_session (the daemon restarted, or the session expired) ◄────┤
        │     say hello again and retry the call once: no error, no miss        │
        └── a call fails midway (timeout, ZMQ error, rejection, cancel) ◄───────┘
              bye over a fresh socket, so the daemon frees what the call held now

Invariants:

1. Every request carries the token and epoch of the hello it follows, and the daemon
   honours it only from the connection that said hello (``kvcache.messages``): a client
   never acts on, and never ends, another client's session, even across daemon restarts.
2. Saying hello again to the same daemon instance keeps the arena mapping
   (``arena_generation`` unchanged, so views the connector pinned stay valid); a new
   instance's arena is mapped afresh and the generation moves on.
3. Before connecting, the socket's directory must be this user's own and private (uid,
   no group/other bits: mode 0700), the socket this user's, and the process listening on
   it this user's too (``SO_PEERCRED``); before mapping, the arena the daemon names must
   be a regular file directly in the expected shm directory, owned by this uid and
   private. Otherwise ``UntrustedEndpoint``: on a host without ``XDG_RUNTIME_DIR`` anyone
   could pre-create ``/tmp/shoal-<uid>/`` and pose as the daemon.
4. Clients do not prefault the arena unless asked (``populate``): the daemon populated
   it, and prefaulting in every engine process costs page tables the size of the arena.

Why fail fast: after the daemon died every reconnect would wait out the full timeout (the
connector's is 2 s: every engine step). A killed daemon leaves its socket file behind, and
a plain ``connect()`` to it is refused at once, which makes the probe cheap; at most one is
made per ``retry_interval_s``, and only the call that makes it can wait (for hello). A
daemon that (re)starts binds a new socket file, so a changed file ends the wait at once.

Why a pidfd: the probe only helps once a call has failed, and the first call after the
daemon died would still wait out the whole timeout (inside an engine step, for the
connector's save client). The hello reply names the daemon's ``pid`` and ``pid_ns``; a
client in the same pid namespace opens a pidfd on it (``os.pidfd_open``), which becomes
readable when the daemon exits. Every call checks it before it sends (one ``poll`` with
no wait), and every wait for a reply polls it beside the socket, so a daemon that died
before or during a call fails that call at once ("the cache daemon (pid N) exited") and
enters the DOWN state above (until the socket file changes: a new daemon). Each hello
opens a new pidfd and closes the previous one; ``close`` closes it. Where no pidfd can be
had (another pid namespace, an old kernel, a daemon that does not send its pid) the
client behaves as without it. Rejected: a heartbeat-driven liveness flag (it lags by a
beat, and the sync client's heartbeat thread does not own the call socket), and a
``SO_PEERCRED`` probe per call (a connect per call, where the pidfd costs one ``poll``).
A daemon whose pid was reused between its hello reply and ``pidfd_open`` is not watched
correctly; the io timeout still bounds every call.

Why a failed call's bye goes over a fresh socket (``_farewell``): the call's socket may
hold unsent requests or be at its high-water mark. The bye may overtake them, which is
harmless: once the session ended they meet ``unknown_session`` and hold nothing. It
lingers in the process-wide context, so no caller waits for it. ``close`` instead sends
its bye on the call socket, after the caller's one-way requests (a ``put(wait=False)``
commit must land before the session ends), with a short linger.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import select
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, TypeVar

import zmq

from kvcache import messages as m
from kvcache.arena import DATA_OFFSET, map_arena
from kvcache.config import CacheConfig
from kvcache.errors import (
    ArenaError,
    CacheUnavailable,
    ProtocolError,
    RequestRejected,
    UntrustedEndpoint,
)

__all__ = [
    "ClientSession",
    "SessionLost",
    "check_arena_path",
    "check_private_dir",
    "default_shm_dir",
]

R = TypeVar("R", bound=m.Request)

_FAREWELL_LINGER_MS = 2000  # a failed call's bye, in the background context
_CLOSE_LINGER_MS = 200  # close(): the bye and the caller's one-way requests get out
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class SessionLost(Exception):
    """The daemon does not know this session (it restarted, or the session expired).

    Internal to the client: the call says hello again and is retried once.
    """


def default_shm_dir() -> str:
    """Where clients expect the daemon's arena: ``$SHOAL_CACHE_SHM_DIR`` or the default."""
    return os.environ.get("SHOAL_CACHE_SHM_DIR") or CacheConfig().shm_dir


def check_private_dir(path: Path) -> None:
    """Refuse a socket directory this user does not own or others may use."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CacheUnavailable(
            f"cannot inspect the daemon's directory {path}: {exc.strerror}"
        ) from None
    uid = os.getuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise UntrustedEndpoint(
            f"refusing the cache daemon socket in {path}: that directory is owned by uid "
            f"{info.st_uid} with mode {stat.S_IMODE(info.st_mode):04o}, but must be owned by "
            f"uid {uid} with mode 0700 (anyone else who can write there can pose as the "
            "daemon); remove it and restart `shoal cache serve`, or use another --runtime-dir"
        )


def _check_socket_file(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CacheUnavailable(
            f"no cache daemon socket at {path}; is `shoal cache serve` running?"
        ) from None
    except OSError as exc:
        raise CacheUnavailable(f"cannot inspect {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise UntrustedEndpoint(
            f"refusing {path}: it is not a socket owned by uid {os.getuid()} (owner uid "
            f"{info.st_uid}); another user may be posing as the cache daemon"
        )


def check_arena_path(path: str, shm_dir: str) -> Path:
    """The arena a hello reply names, once checked: a private regular file of this uid
    directly in ``shm_dir`` (not a symlink, not elsewhere)."""
    arena = Path(path)
    expected = Path(os.path.realpath(shm_dir))
    if not arena.is_absolute() or Path(os.path.realpath(arena.parent)) != expected:
        raise UntrustedEndpoint(
            f"the cache daemon named the arena {path}, which is not in {shm_dir}; if the "
            "daemon really runs with another --shm-dir, give the client that directory "
            "(shm_dir=..., or SHOAL_CACHE_SHM_DIR)"
        )
    try:
        info = os.lstat(arena)
    except OSError as exc:
        raise CacheUnavailable(f"cannot inspect the arena {path}: {exc.strerror}") from None
    uid = os.getuid()
    if not stat.S_ISREG(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        kind = "a regular file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise UntrustedEndpoint(
            f"refusing the arena {path}: it must be a regular file owned by uid {uid} with "
            f"mode 0600, and is {kind} owned by uid {info.st_uid} with mode "
            f"{stat.S_IMODE(info.st_mode):04o}"
        )
    return arena


def _listening(path: Path) -> bool:
    """Whether something listens on the unix socket ``path`` (a daemon killed with -9
    leaves its socket file, and connecting to it is refused at once).

    Raises ``UntrustedEndpoint`` if the listener runs as another uid (``SO_PEERCRED``);
    True when it cannot be told (then hello decides).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        code = probe.connect_ex(str(path))
        if code in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if code == 0:
            raw = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            pid, uid, _ = _PEERCRED.unpack(raw)
            if uid != os.getuid():
                raise UntrustedEndpoint(
                    f"refusing {path}: the process listening on it (pid {pid}) runs as uid "
                    f"{uid}, not as this user (uid {os.getuid()}); it is not your cache daemon"
                )
    except OSError:  # e.g. a path too long for sun_path: ZeroMQ and hello decide
        return True
    finally:
        probe.close()
    return True


def _own_pid_namespace() -> int:
    """The inode of this process's pid namespace (0: not known)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _raise_for_error(reply: dict[str, Any]) -> None:
    if reply["ok"]:
        return
    code, message = str(reply.get("code")), str(reply.get("error"))
    if code == m.ErrorCode.UNKNOWN_SESSION:
        raise SessionLost(message)
    raise RequestRejected(code, message)


class ClientSession:
    """Session and connection state shared by the sync and async clients (no I/O loop)."""

    def __init__(
        self,
        endpoint: str,
        *,
        namespace: str,
        name: str,
        role: str,
        timeout_s: float,
        verify_reads: bool,
        populate: bool,
        shm_dir: str | None,
        retry_interval_s: float,
    ) -> None:
        if role not in m.ROLES:
            raise ValueError(f"role {role!r} must be one of {', '.join(m.ROLES)}")
        self.endpoint = endpoint
        self.namespace = namespace
        self.name = name
        self.role = role
        self.timeout_s = timeout_s
        self.verify_reads = verify_reads
        self.populate = populate
        self.shm_dir = shm_dir or default_shm_dir()
        self.retry_interval_s = retry_interval_s
        self.session = 0  # the token of the live session; 0: none
        self.epoch = 0  # the daemon's epoch, from the same hello
        self._credentials = (0, 0)  # (session, epoch) in one read, for the heartbeat thread
        self._stale_session = 0  # set by the heartbeat thread: the daemon forgot this token
        self.heartbeat_s = 10.0
        self.max_block_bytes = 0
        self._context: Any = None  # zmq.Context or zmq.asyncio.Context, set by the subclass
        self._socket: Any = None
        self._ids = itertools.count(1)
        self._early: dict[int, dict[str, Any]] = {}  # replies that arrived before awaited
        self._outstanding: set[int] = set()  # ids sent with a reply still to come
        self._mmap: mmap.mmap | None = None
        self._arena: memoryview | None = None
        self._instance_id = b""
        self.arena_generation = 0  # bumped each time a hello maps a new daemon's arena
        self._down_until = 0.0  # monotonic; before it, calls fail at once
        self._down_reason = ""
        self._down_socket: tuple[int, int] | None = None  # the socket file that failed
        self._daemon_pid = 0  # the pid the last hello reply named (0: not watched)
        self._pidfd = -1  # a pidfd on it, readable once it exited (-1: none)
        self._exit_poll: select.poll | None = None  # polls _pidfd alone, without waiting
        self._daemon_socket: tuple[int, int] | None = None  # its socket file, at hello

    # -- requests and replies --------------------------------------------------------

    def _next_id(self) -> int:
        return next(self._ids)

    def _request(self, cls: type[R], **fields: Any) -> R:
        """A request of this session (id, token and epoch filled in)."""
        return cls(id=next(self._ids), session=self.session, epoch=self.epoch, **fields)

    def _hello_request(self) -> m.HelloRequest:
        return m.HelloRequest(
            id=next(self._ids), session=0, epoch=0, pid=os.getpid(),
            pid_ns=_own_pid_namespace(),
            namespace=self.namespace, client=self.name, role=self.role,
        )  # fmt: skip

    def _decode(self, frame: bytes) -> dict[str, Any]:
        try:
            return m.decode_reply(frame)
        except ProtocolError as exc:
            if exc.code != m.ErrorCode.VERSION:
                raise
            raise ProtocolError(
                f"the cache daemon at {self.endpoint} speaks another engine protocol version "
                f"({exc}; this client speaks {m.VERSION}): run the daemon and its clients "
                "from the same Shoal release",
                exc.code,
            ) from None

    def _file_reply(self, reply: dict[str, Any]) -> None:
        """Keep a reply someone still waits for; drop late replies of abandoned requests."""
        if reply["id"] in self._outstanding:
            self._outstanding.discard(reply["id"])
            self._early[reply["id"]] = reply

    def _take_reply(self, request_id: int) -> dict[str, Any] | None:
        """The reply to ``request_id`` if it arrived; raises for an error reply."""
        reply = self._early.pop(request_id, None)
        if reply is not None:
            _raise_for_error(reply)
        return reply

    def _timed_out(self) -> CacheUnavailable:
        message = f"no reply from the cache daemon at {self.endpoint} within {self.timeout_s}s"
        self._mark_down(message)
        return CacheUnavailable(message)

    def _transport_failed(self, exc: zmq.ZMQError) -> CacheUnavailable:
        message = f"cache daemon at {self.endpoint}: {exc}"
        self._mark_down(message)
        return CacheUnavailable(message)

    # -- reaching the daemon ---------------------------------------------------------

    def _socket_path(self) -> Path | None:
        if not self.endpoint.startswith("ipc://"):
            return None
        return Path(self.endpoint.removeprefix("ipc://"))

    def _socket_file_id(self) -> tuple[int, int] | None:
        """(inode, mtime) of the ipc socket file: a daemon that starts binds a new one."""
        path = self._socket_path()
        try:
            info = os.stat(path) if path is not None else None
        except OSError:
            return None
        return None if info is None else (info.st_ino, info.st_mtime_ns)

    def _mark_down(self, reason: str, socket_file: tuple[int, int] | None = None) -> None:
        """Fail calls at once for ``retry_interval_s``, or until the socket file is no
        longer ``socket_file`` (default: the one there now)."""
        self._down_until = time.monotonic() + self.retry_interval_s
        self._down_reason = reason
        self._down_socket = socket_file or self._socket_file_id()

    # -- watching the daemon's process -------------------------------------------------

    def _watch_daemon(self, reply: dict[str, Any]) -> None:
        """Watch the daemon that answered hello through a pidfd, if it runs in this pid
        namespace; whatever pidfd watched a daemon before is closed."""
        self._unwatch_daemon()
        pid, pid_ns = reply.get("pid"), reply.get("pid_ns")
        if not isinstance(pid, int) or not isinstance(pid_ns, int) or pid <= 0:
            return  # a daemon that does not say (an older release)
        if not pid_ns or pid_ns != _own_pid_namespace():
            return  # its pid means nothing here: the io timeout bounds calls
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:  # gone already (the next call finds out), or no pidfd support
            return
        self._daemon_pid = pid
        self._exit_poll = select.poll()
        self._exit_poll.register(self._pidfd, select.POLLIN)
        self._daemon_socket = self._socket_file_id()

    def _unwatch_daemon(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1
        self._daemon_pid = 0
        self._exit_poll = None

    def _daemon_exited(self) -> bool:
        """Whether the watched daemon has exited (never waits; False if not watched)."""
        return self._exit_poll is not None and bool(self._exit_poll.poll(0))

    def _daemon_gone(self) -> CacheUnavailable:
        """The watched daemon exited: its session is gone with it (nothing to say bye
        to), and calls fail at once until a new daemon binds the socket."""
        message = f"the cache daemon (pid {self._daemon_pid}) exited"
        dead_socket = self._daemon_socket
        self._unwatch_daemon()
        self._forget_session()
        self._mark_down(message, dead_socket)
        return CacheUnavailable(f"{message}; cache daemon at {self.endpoint} unavailable")

    def _check_reachable(self) -> None:
        """Raise ``CacheUnavailable`` at once while the daemon is known down (unless a new
        daemon has bound its socket since), or if its socket is missing, untrusted or
        refuses connections (which marks it down)."""
        now = time.monotonic()
        if now < self._down_until:
            current = self._socket_file_id()
            if current is None or current == self._down_socket:
                raise CacheUnavailable(
                    f"cache daemon at {self.endpoint} unavailable ({self._down_reason}); "
                    f"not trying again for {self._down_until - now:.2f}s"
                )
        path = self._socket_path()
        if path is None:
            return
        try:
            _check_socket_file(path)
            check_private_dir(path.parent)
            if not _listening(path):
                raise CacheUnavailable(
                    f"nothing listens on {path} (the cache daemon died?); is "
                    "`shoal cache serve` running?"
                )
        except CacheUnavailable as exc:
            self._mark_down(str(exc))
            raise

    def _open_socket(self) -> Any:
        socket_ = self._context.socket(zmq.DEALER)
        socket_.setsockopt(zmq.LINGER, 0)
        socket_.connect(self.endpoint)
        return socket_

    def _accept_hello(self, reply: dict[str, Any]) -> None:
        """Take the session a hello reply grants; map its arena unless already mapped."""
        try:
            token, epoch = int(reply["session"]), int(reply["epoch"])
            path, instance_id = str(reply["arena_path"]), bytes(reply["instance_id"])
            heartbeat_s, max_block_bytes = (
                float(reply["heartbeat_s"]),
                int(reply["max_block_bytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"hello reply lacks or mistypes {exc}") from None
        # Held before the checks below, so a failure among them still ends the session.
        self.session, self.epoch = token, epoch
        self._credentials = (token, epoch)
        self.heartbeat_s = heartbeat_s
        self.max_block_bytes = max_block_bytes
        self._watch_daemon(reply)
        if self._mmap is not None and instance_id == self._instance_id:
            return  # the same daemon: keep the mapping (and the generation)
        arena = check_arena_path(path, self.shm_dir)
        try:
            mapping, header = map_arena(arena, instance_id, populate=self.populate)
        except ArenaError as exc:
            raise CacheUnavailable(f"cannot map the daemon's arena: {exc}") from None
        self._drop_arena()
        self.arena_generation += 1
        self._mmap = mapping
        self._arena = memoryview(mapping)[DATA_OFFSET : DATA_OFFSET + header.data_bytes]
        self._instance_id = instance_id

    def arena_memory(self) -> memoryview:
        """A new writable view of the arena's data region, which reservation and lease
        offsets index; it stays valid (the mapping lives while any view does) but goes
        stale when ``arena_generation`` changes. Raises ``CacheUnavailable`` if unmapped."""
        if self._mmap is None or self._arena is None:
            raise CacheUnavailable(f"no arena mapped from {self.endpoint}")
        return memoryview(self._mmap)[DATA_OFFSET : DATA_OFFSET + len(self._arena)]

    def _slot(self, offset: int, nbytes: int) -> memoryview:
        assert self._arena is not None, "arena used before hello"
        if offset < 0 or offset + nbytes > len(self._arena):
            raise ProtocolError(f"daemon sent slot {offset}+{nbytes} outside the arena")
        return self._arena[offset : offset + nbytes]

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
        self._instance_id = b""

    # -- ending sessions -------------------------------------------------------------

    def _needs_hello(self) -> bool:
        """Whether the call must say hello first; a daemon seen to have exited drops the
        connection (the hello then fails at once, unless a new daemon is there)."""
        if self._daemon_exited():
            self._daemon_gone()
            self._reset()
        if self._stale_session and self._stale_session == self.session:
            self._forget_session()  # the heartbeat thread met unknown_session
        return self._socket is None or not self.session

    def _forget_session(self) -> None:
        """The daemon no longer knows the session: drop it, keep the socket and arena."""
        self.session = self.epoch = 0
        self._credentials = (0, 0)
        self._early.clear()
        self._outstanding.clear()

    def _reset(self) -> None:
        """Drop the connection; the next call reconnects and says hello again."""
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = None
        self._forget_session()

    def _abandon_session(self) -> None:
        """A call failed midway: end the session so the daemon frees what it held now.

        The failed call may hold reservations and leases (and requests in flight); a
        ``bye`` makes the daemon release all of them at once, and the next call starts a
        new session. Cheaper alternatives (undoing piece by piece) would need every flow
        to track partial state for a path that only errors take.
        """
        session, epoch = self._credentials
        self._reset()
        if session:
            self._farewell(session, epoch)

    def _farewell(self, session: int, epoch: int) -> None:
        """``bye`` over a fresh socket of the process-wide context, lingering there."""
        farewell: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        try:
            farewell.connect(self.endpoint)
            farewell.send(m.ByeRequest(id=0, session=session, epoch=epoch).encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # best effort: the lease, reservation and session TTLs reclaim it all
        finally:
            farewell.close(linger=_FAREWELL_LINGER_MS)

    def _bye_request(self) -> bytes | None:
        """The bye ``close`` sends on the call socket, if a live session has one to send."""
        if self._socket is None or not self.session:
            return None
        return m.ByeRequest(id=0, session=self.session, epoch=self.epoch).encode()

    def _close_socket_after_bye(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=_CLOSE_LINGER_MS)
            self._socket = None
        self._forget_session()
