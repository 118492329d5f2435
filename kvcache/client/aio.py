"""``AsyncCacheClient``: the asyncio client (works under uvloop).

It drives the same flows as ``CacheClient`` with ``zmq.asyncio``, one call at a time (an
``asyncio.Lock``: replies are matched by id, and the heartbeat task shares the socket;
concurrent engine steps use one client each). The session rules are the sync client's:
hello when there is none (at once ``CacheUnavailable`` while the daemon is known down),
one transparent retry after ``unknown_session``, a bye over a fresh socket when a call
fails or is cancelled midway. Its heartbeat is a task on the same socket, so a heartbeat
that meets ``unknown_session`` simply says hello again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from kvcache import messages as m
from kvcache.client.flows import (
    BlockView,
    ClusterLookup,
    PutResult,
    _ClientFlows,
    _Collect,
    _Flow,
    _Later,
)
from kvcache.client.session import SessionLost
from kvcache.config import CacheConfig
from kvcache.errors import CacheError, CacheUnavailable
from kvcache.keys import join_keys

__all__ = ["AsyncCacheClient"]

T = TypeVar("T")


class AsyncCacheClient(_ClientFlows):
    """asyncio client; create with ``await AsyncCacheClient.connect()`` (same keyword
    arguments as ``CacheClient``, less ``heartbeat``)."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        namespace: str = "",
        name: str = "shoal-async-client",
        role: str = m.ENGINE,
        timeout_s: float = 5.0,
        verify_reads: bool = True,
        populate: bool = False,
        shm_dir: str | None = None,
        retry_interval_s: float = 1.0,
    ) -> None:
        super().__init__(
            endpoint or CacheConfig().endpoint,
            namespace=namespace,
            name=name,
            role=role,
            timeout_s=timeout_s,
            verify_reads=verify_reads,
            populate=populate,
            shm_dir=shm_dir,
            retry_interval_s=retry_interval_s,
        )
        self._context = zmq.asyncio.Context()
        self._lock = asyncio.Lock()
        self._heartbeat_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, endpoint: str | None = None, **kwargs: Any) -> AsyncCacheClient:
        client = cls(endpoint, **kwargs)
        try:
            await client._connect()
        except BaseException:
            client._reset()
            client._drop_arena()
            client._unwatch_daemon()
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

    # -- transport -------------------------------------------------------------------

    async def _connect(self) -> None:
        self._check_reachable()
        if self._socket is None:
            self._socket = self._open_socket()
        await self._drive(self._hello_flow())
        self._down_until = 0.0

    async def _call(self, make_flow: Callable[[], _Flow[T]]) -> T:
        async with self._lock:
            if self._needs_hello():
                await self._connect()
            try:
                return await self._drive(make_flow())
            except SessionLost:
                self._forget_session()  # the daemon restarted or dropped us: not an error
            await self._connect()
            try:
                return await self._drive(make_flow())
            except SessionLost as exc:
                self._forget_session()
                raise CacheUnavailable(
                    f"the cache daemon at {self.endpoint} dropped a session right after "
                    f"granting it ({exc})"
                ) from None

    async def _send(self, request: m.Request) -> int:
        assert self._socket is not None, "sending on a closed socket"
        if request.expects_reply:
            self._outstanding.add(request.id)
        try:
            await self._socket.send(request.encode())
        except zmq.ZMQError as exc:
            raise self._transport_failed(exc) from None
        return request.id

    async def _await(self, request_id: int) -> dict[str, Any]:
        assert self._socket is not None, "awaiting a reply on a closed socket"
        try:
            deadline = time.monotonic() + self.timeout_s
            while (reply := self._take_reply(request_id)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out()
                if await self._poll(int(remaining * 1000) + 1):
                    self._file_reply(self._decode(await self._socket.recv()))
            return reply
        except zmq.ZMQError as exc:
            raise self._transport_failed(exc) from None

    async def _poll(self, timeout_ms: int) -> bool:
        """Wait until the call socket is readable (True) or ``timeout_ms`` passed (False);
        raises ``CacheUnavailable`` as soon as the watched daemon exits (the pidfd is
        watched through the event loop's reader, as any file descriptor)."""
        if self._pidfd < 0:
            return bool(await self._socket.poll(timeout_ms))
        poller = zmq.asyncio.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._pidfd, zmq.POLLIN)
        ready = dict(await poller.poll(timeout_ms))
        if self._socket in ready:
            return True  # replies first: a daemon that answered, then died, answered
        if self._pidfd in ready:
            raise self._daemon_gone()
        return False

    async def _drive(self, flow: _Flow[T]) -> T:
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
        except SessionLost:
            raise  # nothing to end: the daemon does not know the session
        except BaseException:  # also cancellation: leases must not outlive the call
            if sent:
                self._abandon_session()
            raise

    # -- public API ------------------------------------------------------------------

    async def heartbeat(self) -> None:
        await self._call(lambda: self._simple_flow(m.HeartbeatRequest))

    async def lookup(self, keys: Sequence[bytes]) -> int:
        return await self._call(lambda: self._lookup_flow(keys))

    async def put(
        self,
        keys: Sequence[bytes],
        payloads: Sequence[Any],
        parent: bytes | None = None,
        *,
        wait: bool = True,
    ) -> PutResult:
        return await self._call(lambda: self._put_flow(keys, payloads, parent, wait))

    async def get_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        return await self._call(lambda: self._get_into_flow(keys, outs))

    async def get(self, keys: Sequence[bytes], *, prefix: bool = True) -> list[BlockView | None]:
        return await self._call(lambda: self._get_flow(keys, prefix))

    async def release(self, blocks: Sequence[BlockView]) -> None:
        await self._call(lambda: self._release_flow([b.key for b in blocks]))

    async def delete(self, keys: Sequence[bytes]) -> int:
        reply = await self._call(lambda: self._simple_flow(m.DeleteRequest, keys=join_keys(keys)))
        return int(reply["deleted"])

    async def locate(self, keys: Sequence[bytes]) -> ClusterLookup:
        return await self._call(lambda: self._locate_flow(keys))

    async def fetch(self, keys: Sequence[bytes]) -> int:
        return await self._call(lambda: self._fetch_flow(keys))

    async def stats(self) -> dict[str, Any]:
        return dict((await self._call(lambda: self._simple_flow(m.StatsRequest)))["stats"])

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        bye = self._bye_request()
        if bye is not None:
            try:
                await self._socket.send(bye)
            except zmq.ZMQError:
                self._farewell(self.session, self.epoch)
        self._close_socket_after_bye()
        self._drop_arena()
        self._unwatch_daemon()
        self._context.term()
