"""vLLM KV events from a simulated engine, in vLLM's own wire format.

``--kv-events-config`` takes vLLM's JSON (``vllm/config/kv_events.py`` ``KVEventsConfig``):
``enable_kv_cache_events``, ``publisher`` ("zmq" or "null"), ``endpoint`` (default
``tcp://*:5557``), ``replay_endpoint``, ``buffer_steps`` (10,000), ``hwm``, ``topic``.
As in vLLM's ``ZmqEventPublisher``: an endpoint with ``*`` or ``::``, or an ipc/inproc one,
is bound, any other is connected to. One message per engine step that changed the cache::

    PUB     [topic, seq (8 bytes big-endian, from 0), msgpack [ts, [event, ...], dp_rank 0]]
    event   {"type": "BlockStored", "block_hashes": [int64...], "parent_block_hash": int|nil,
             "token_ids": [...], "block_size": B, "lora_id": int|nil, "medium": "GPU",
             "lora_name": str|nil, ("extra_keys": [[lora_name], ...] with an adapter),
             "group_idx": 0}
          | {"type": "BlockRemoved", "block_hashes": [int64], "medium": "GPU", "group_idx": 0}
          | {"type": "AllBlocksCleared"}
    ROUTER  replay: [identity, b"", start_seq (8 bytes)] -> [identity, b"", topic, seq,
            payload] for each kept batch with seq >= start_seq, then
            [identity, b"", b"", (-1 as 8 signed bytes), b""]

Field order and omission follow msgspec's encoding of vLLM's tagged structs with
``omit_defaults`` (fields left at their default are not sent); a unit test compares the
bytes with msgspec's encoding of vLLM's own classes. Block hashes are 64-bit
ints, vLLM's default (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``). Not simulated: 0.33's
``BlockStored`` for blocks *reused* from the prefix cache (``emit_cached_block_events``,
which 0.32, the CPU build, does not send either) and data-parallel ranks other than 0.

``ZmqEventPublisher`` (asyncio sockets, in the engine's loop), ``NullEventPublisher`` and
``MemoryEventPublisher`` (tests) share the ``EventPublisher`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio

from shoal.errors import ConfigError
from sim.blocks import AllCleared, CacheEvent, Removed, Stored, external_hash

__all__ = [
    "END_SEQ",
    "EventPublisher",
    "KVEventsConfig",
    "MemoryEventPublisher",
    "NullEventPublisher",
    "ZmqEventPublisher",
    "encode_batch",
    "make_publisher",
    "parse_kv_events_config",
]

log = logging.getLogger("shoal." + __name__)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True, slots=True)
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""


def parse_kv_events_config(text: str) -> KVEventsConfig:
    """vLLM's ``--kv-events-config`` JSON; unknown keys are an error, as in vLLM."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--kv-events-config is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--kv-events-config must be a JSON object")
    known = set(KVEventsConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"--kv-events-config: unknown keys {unknown}")
    enabled = bool(raw.get("enable_kv_cache_events", False))
    publisher = raw.get("publisher") or ("zmq" if enabled else "null")
    if publisher not in ("zmq", "null"):
        raise ConfigError(f"--kv-events-config: publisher must be zmq or null, not {publisher}")
    return KVEventsConfig(**{**raw, "publisher": publisher})


def _event(event: CacheEvent) -> dict[str, Any]:
    if isinstance(event, Stored):
        body: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": [external_hash(h) for h in event.block_hashes],
            "parent_block_hash": (
                external_hash(event.parent_block_hash) if event.parent_block_hash else None
            ),
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": event.lora_id,
            "medium": "GPU",
            "lora_name": event.lora_name,
        }
        if event.lora_name:
            body["extra_keys"] = [[event.lora_name] for _ in event.block_hashes]
        body["group_idx"] = 0
        return body
    if isinstance(event, Removed):
        return {
            "type": "BlockRemoved",
            "block_hashes": [external_hash(h) for h in event.block_hashes],
            "medium": "GPU",
            "group_idx": 0,
        }
    assert isinstance(event, AllCleared), f"unknown cache event {event!r}"
    return {"type": "AllBlocksCleared"}


def encode_batch(events: Sequence[CacheEvent], ts: float) -> bytes:
    """One ``KVEventBatch`` payload: msgpack ``[ts, [event, ...], 0]`` (the publisher fills
    in its data-parallel rank, 0 for an engine without data parallelism)."""
    return bytes(msgpack.packb([ts, [_event(e) for e in events], 0], use_bin_type=True))


class EventPublisher(Protocol):
    async def start(self) -> None: ...

    async def publish(self, events: Sequence[CacheEvent]) -> None: ...

    async def close(self) -> None: ...


class NullEventPublisher:
    async def start(self) -> None:
        return None

    async def publish(self, events: Sequence[CacheEvent]) -> None:
        return None

    async def close(self) -> None:
        return None


class MemoryEventPublisher:
    """Keeps every payload it would have sent (tests)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def start(self) -> None:
        return None

    async def publish(self, events: Sequence[CacheEvent]) -> None:
        if events:
            self.payloads.append(encode_batch(events, time.time()))

    async def close(self) -> None:
        return None


def _binds(endpoint: str) -> bool:
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqEventPublisher:
    """vLLM's PUB + replay ROUTER, on asyncio sockets; see the module docstring."""

    def __init__(self, config: KVEventsConfig) -> None:
        self.config = config
        self._context = zmq.asyncio.Context()
        self._pub: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._topic = config.topic.encode()
        self._seq = 0
        self._replay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._pub = self._context.socket(zmq.PUB)
            self._pub.setsockopt(zmq.LINGER, 0)
            self._pub.set_hwm(self.config.hwm)
            if _binds(self.config.endpoint):
                self._pub.bind(self.config.endpoint)
            else:
                self._pub.connect(self.config.endpoint)
            if self.config.replay_endpoint:
                self._replay = self._context.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(self.config.replay_endpoint)
                self._replay_task = asyncio.create_task(self._serve_replay())
        except zmq.ZMQError as exc:
            await self.close()
            raise ConfigError(f"--kv-events-config: cannot open sockets: {exc}") from None

    async def publish(self, events: Sequence[CacheEvent]) -> None:
        if not events or self._pub is None:
            return
        payload = encode_batch(events, time.time())
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            await self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload])
        except zmq.ZMQError as exc:  # kept for replay: a subscriber sees a gap and asks
            log.warning("kv events: batch %d not sent: %s", seq, exc)

    async def _serve_replay(self) -> None:
        assert self._replay is not None, "started with a replay endpoint"
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("kv events: invalid replay request of %d frames", len(frames))
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= start_seq:
                    await self._replay.send_multipart(
                        [identity, b"", self._topic, seq.to_bytes(8, "big"), payload]
                    )
            await self._replay.send_multipart([identity, b"", b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        for socket in (self._pub, self._replay):
            if socket is not None:
                socket.close(linger=0)
        self._context.term()


def make_publisher(config: KVEventsConfig | None) -> EventPublisher:
    if config is None or not config.enable_kv_cache_events or config.publisher == "null":
        return NullEventPublisher()
    return ZmqEventPublisher(config)
