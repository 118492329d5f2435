"""The daemon's subscription to its engines' vLLM KV events, driven from the daemon loop.

Per engine (one vLLM publisher each; ``engine_events``), three sockets in the daemon's
poller, read without blocking and at most 256 messages per socket and turn::

    vLLM PUB ──► SUB ────────► EngineSequence ──► decode_batch ──► GpuPrefixTracker
    vLLM ROUTER (replay) ◄──► DEALER (one per replay; a late answer dies with it)
    SUB's monitor (PAIR) ──► connected / disconnected: a drop resets the engine

The trackers' changes are drained by the daemon every turn (``take_events``) and
published as the engine's own cluster stream ``<node>/gpu<i>`` (``ClusterNode``), so
peers index them like a member's; ``gpu_runs`` answers this node's own lookups directly.
Every malformed message is a counted drop (``shoal_kvcache_engine_dropped_total``), every
stream state that cannot be trusted a counted reset to "nothing on the GPU"
(``..._resets_total``): a lookup then misses, it never names a GPU without the prefix.

vLLM's publisher binds (``tcp://*:5557``) and this side connects; a publisher that is
down is simply not connected yet (ZeroMQ retries), and one that dies is noticed by the
monitor. ``NullEngineFeed`` runs when no engine is configured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
from prometheus_client import CollectorRegistry, Counter
from zmq.utils.monitor import recv_monitor_message

from kvcache.cluster.engine_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineSequence,
    Step,
    decode_batch,
    decode_seq,
)
from kvcache.cluster.gpu_prefixes import GpuPrefixTracker
from kvcache.cluster.messages import engine_stream
from kvcache.cluster.metrics import EngineMetrics
from kvcache.config import CacheConfig
from kvcache.errors import CacheError, ProtocolError
from kvcache.keys import Namespace

__all__ = ["EngineFeed", "EngineSettings", "NullEngineFeed", "ZmqEngineFeed", "engine_settings"]

log = logging.getLogger("shoal." + __name__)

_PER_TURN = 256
_EVENT_KINDS = {BlockStored: "stored", BlockRemoved: "removed", AllBlocksCleared: "cleared"}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    node: str  # this daemon's node name; streams are <node>/gpu<i>
    endpoints: tuple[str, ...]
    replay_endpoints: tuple[str, ...]  # empty, or one per endpoint
    topic: str
    namespace: Namespace
    chunk_tokens: int
    replay_timeout_s: float = 2.0


def engine_settings(config: CacheConfig, node: str) -> EngineSettings:
    return EngineSettings(
        node=node,
        endpoints=tuple(config.engine_endpoints),
        replay_endpoints=tuple(config.engine_replay_endpoints),
        topic=config.engine_events_topic,
        namespace=config.engine_namespace(),
        chunk_tokens=config.engine_chunk_tokens,
        replay_timeout_s=config.engine_replay_timeout_s,
    )


class EngineFeed(Protocol):
    """What the daemon calls; ``ZmqEngineFeed`` is the real one, ``NullEngineFeed`` off."""

    @property
    def streams(self) -> list[str]: ...
    def register(self, poller: zmq.Poller) -> None: ...
    def owns(self, sock: Any) -> bool: ...
    def handle(self, sock: Any) -> None: ...
    def tick(self, now: float) -> None: ...
    def take_events(self) -> list[tuple[str, list[tuple[int, bytes]]]]: ...
    def snapshot(self, stream: str) -> list[bytes]: ...
    def gpu_runs(self, keys: Sequence[bytes]) -> list[tuple[str, int]]: ...
    def status(self) -> list[dict[str, Any]]: ...
    def learn_namespace(self, namespace: Namespace) -> bool: ...
    def close(self) -> None: ...


class NullEngineFeed:
    """No engine configured: nothing to subscribe to, nothing on any GPU."""

    streams: list[str] = []

    def register(self, poller: zmq.Poller) -> None:
        pass

    def owns(self, sock: Any) -> bool:
        return False

    def handle(self, sock: Any) -> None:
        raise AssertionError("NullEngineFeed owns no socket")

    def tick(self, now: float) -> None:
        pass

    def take_events(self) -> list[tuple[str, list[tuple[int, bytes]]]]:
        return []

    def snapshot(self, stream: str) -> list[bytes]:
        return []

    def gpu_runs(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        return []

    def status(self) -> list[dict[str, Any]]:
        return []

    def learn_namespace(self, namespace: Namespace) -> bool:
        return False

    def close(self) -> None:
        pass


class _Engine:
    """One vLLM publisher: its sockets, sequence and tracker."""

    def __init__(self, name: str, stream: str, endpoint: str, replay_endpoint: str,
                 sequence: EngineSequence, tracker: GpuPrefixTracker) -> None:  # fmt: skip
        self.name = name
        self.stream = stream
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.sequence = sequence
        self.tracker = tracker
        self.sub: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.dealer: zmq.Socket[Any] | None = None
        self.connected = False


class ZmqEngineFeed:
    """The real feed (see the module docstring); called by the daemon thread only."""

    def __init__(
        self,
        settings: EngineSettings,
        context: zmq.Context[Any],
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._context = context
        self._clock = clock
        self.metrics = EngineMetrics(registry)
        self._poller: zmq.Poller | None = None
        self._owner: dict[Any, _Engine] = {}
        self._engines: list[_Engine] = []
        replays = settings.replay_endpoints or ("",) * len(settings.endpoints)
        try:
            for index, (endpoint, replay) in enumerate(
                zip(settings.endpoints, replays, strict=True)
            ):
                name = f"gpu{index}"
                engine = _Engine(
                    name,
                    engine_stream(settings.node, name),
                    endpoint,
                    replay,
                    EngineSequence(bool(replay), settings.replay_timeout_s),
                    GpuPrefixTracker(settings.namespace, settings.chunk_tokens),
                )
                self._engines.append(engine)
                self._subscribe(engine)
        except zmq.ZMQError as exc:
            self.close()
            raise CacheError(f"cannot subscribe to vLLM KV events: {exc}") from None
        log.info(
            "subscribed to engines' KV events",
            extra={"engines": {e.name: e.endpoint for e in self._engines},
                   "namespace": settings.namespace.label(),
                   "chunk_tokens": settings.chunk_tokens},
        )  # fmt: skip

    @property
    def streams(self) -> list[str]:
        return [e.stream for e in self._engines]

    # -- sockets --------------------------------------------------------------------------

    def _subscribe(self, engine: _Engine) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)  # vLLM's own PUB high-water mark
        sub.setsockopt(zmq.SUBSCRIBE, self.settings.topic.encode())
        engine.sub = sub
        self._owner[sub] = engine
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        engine.monitor = monitor
        self._owner[monitor] = engine
        sub.connect(engine.endpoint)

    def register(self, poller: zmq.Poller) -> None:
        self._poller = poller
        for engine in self._engines:
            poller.register(engine.sub, zmq.POLLIN)
            poller.register(engine.monitor, zmq.POLLIN)

    def owns(self, sock: Any) -> bool:
        return sock in self._owner

    def handle(self, sock: Any) -> None:
        now = self._clock()
        engine = self._owner[sock]
        if sock is engine.monitor:
            self._on_monitor(engine)
            return
        for _ in range(_PER_TURN):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if sock is engine.sub:
                    self._on_live(engine, frames, now)
                else:
                    self._on_replay(engine, frames)
            except ProtocolError as exc:
                self.metrics.dropped.labels(engine.name, exc.code).inc()
                log.warning("dropped a vLLM KV-event message",
                            extra={"engine": engine.name, "reason": str(exc)})  # fmt: skip
            if engine.dealer is None and sock is not engine.sub:
                return  # the replay ended and its socket is closed

    def _on_live(self, engine: _Engine, frames: list[bytes], now: float) -> None:
        if len(frames) != 3:
            raise ProtocolError(f"vLLM event message of {len(frames)} frames; expected 3", "frames")
        seq = _seq(frames[1])
        gaps = engine.sequence.num_gaps
        step = engine.sequence.on_batch(seq, frames[2], now)
        if engine.sequence.num_gaps != gaps:
            self.metrics.gaps.labels(engine.name).inc()
        self._run(engine, step)

    def _on_replay(self, engine: _Engine, frames: list[bytes]) -> None:
        if len(frames) != 4 or frames[0]:
            raise ProtocolError(f"vLLM replay message of {len(frames)} frames", "frames")
        if frames[2] == END_SEQ:
            self._close_dealer(engine)
            self.metrics.replays.labels(engine.name, "complete").inc()
            self._run(engine, engine.sequence.on_replay_end())
            return
        engine.sequence.on_replayed(_seq(frames[2]), frames[3])

    def _on_monitor(self, engine: _Engine) -> None:
        assert engine.monitor is not None, "a monitor event for a closed engine"
        for _ in range(_PER_TURN):
            try:
                event = recv_monitor_message(engine.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                engine.connected = True
                log.info("engine publisher connected", extra={"engine": engine.name})
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                engine.connected = False
                log.warning("engine publisher disconnected; its GPU entries are dropped",
                            extra={"engine": engine.name})  # fmt: skip
                self._close_dealer(engine)
                self._run(engine, engine.sequence.on_disconnect())

    def _ask_replay(self, engine: _Engine, start: int) -> None:
        self._close_dealer(engine)
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(engine.replay_endpoint)
        engine.dealer = dealer
        self._owner[dealer] = engine
        if self._poller is not None:
            self._poller.register(dealer, zmq.POLLIN)
        # Not sent (no room): the replay times out into a hole like any lost answer.
        with contextlib.suppress(zmq.Again):
            dealer.send_multipart([b"", start.to_bytes(8, "big")], zmq.NOBLOCK)
        log.info("asked a vLLM replay", extra={"engine": engine.name, "from_seq": start})

    def _close_dealer(self, engine: _Engine) -> None:
        dealer, engine.dealer = engine.dealer, None
        if dealer is None:
            return
        del self._owner[dealer]
        if self._poller is not None:
            self._poller.unregister(dealer)
        dealer.close(linger=0)

    # -- applying -------------------------------------------------------------------------

    def _run(self, engine: _Engine, step: Step) -> None:
        if step.reset is not None:
            self._reset(engine, step.reset.value)
        for _, payload in step.batches:
            try:
                batch = decode_batch(payload)
            except ProtocolError as exc:
                # A batch we cannot read is a hole replay cannot fill (it would send the
                # same bytes): forget the engine and go on from the next batch.
                self.metrics.dropped.labels(engine.name, exc.code).inc()
                log.warning("dropped an unreadable vLLM KV-event batch",
                            extra={"engine": engine.name, "reason": str(exc)})  # fmt: skip
                self._reset(engine, "malformed")
                continue
            engine.tracker.apply(batch.events)
            self.metrics.batches.labels(engine.name).inc()
            for event in batch.events:
                self.metrics.events.labels(engine.name, _EVENT_KINDS[type(event)]).inc()
        if step.replay_from is not None:
            self.metrics.replays.labels(engine.name, "asked").inc()
            self._ask_replay(engine, step.replay_from)

    def _reset(self, engine: _Engine, reason: str) -> None:
        engine.tracker.clear()
        self.metrics.resets.labels(engine.name, reason).inc()

    # -- the daemon's calls ---------------------------------------------------------------

    def tick(self, now: float) -> None:
        for engine in self._engines:
            step = engine.sequence.expire(now)
            if step is not None:
                log.warning("a vLLM replay timed out", extra={"engine": engine.name})
                self._close_dealer(engine)
                self.metrics.replays.labels(engine.name, "timeout").inc()
                self._run(engine, step)
            stats = engine.tracker.statistics()
            self.metrics.gpu_keys.labels(engine.name).set(stats.num_keys)
            self.metrics.connected.labels(engine.name).set(int(engine.connected))
            for reason, count in engine.tracker.take_skipped().items():
                self.metrics.skipped.labels(engine.name, reason).inc(count)

    def take_events(self) -> list[tuple[str, list[tuple[int, bytes]]]]:
        out = []
        for engine in self._engines:
            events = engine.tracker.take_events()
            if events:
                out.append((engine.stream, events))
        return out

    def snapshot(self, stream: str) -> list[bytes]:
        for engine in self._engines:
            if engine.stream == stream:
                return engine.tracker.snapshot()
        raise ValueError(f"no engine stream {stream!r} here")

    def gpu_runs(self, keys: Sequence[bytes]) -> list[tuple[str, int]]:
        runs = [(e.stream, e.tracker.run_length(keys)) for e in self._engines]
        return [(stream, upto) for stream, upto in runs if upto]

    def status(self) -> list[dict[str, Any]]:
        out = []
        for engine in self._engines:
            stats = engine.tracker.statistics()
            out.append({
                "engine": engine.name,
                "stream": engine.stream,
                "endpoint": engine.endpoint,
                "replay_endpoint": engine.replay_endpoint,
                # what its GPU prefixes are keyed in (learned from a connector's hello
                # unless --engine-layout was given): ``shoal cache lookup`` keys in it
                "namespace": self.settings.namespace.to_wire(),
                "chunk_tokens": self.settings.chunk_tokens,
                "connected": engine.connected,
                "seq": -1 if engine.sequence.last is None else engine.sequence.last,
                "replaying": engine.sequence.replaying,
                "gpu_blocks": stats.num_blocks,
                "gpu_keys": stats.num_keys,
                "gaps": engine.sequence.num_gaps,
                "replays": engine.sequence.num_replays,
                "skipped": stats.skipped,
                "dropped": int(_total(self.metrics, "dropped", engine.name)),
                "resets": int(_total(self.metrics, "resets", engine.name)),
            })  # fmt: skip
        return out

    def learn_namespace(self, namespace: Namespace) -> bool:
        """Key the engines' GPU prefixes in ``namespace`` from now on (the daemon learned it
        from a connector's hello); what was mapped in the old one is cleared on each
        stream. False if nothing changed."""
        if namespace == self.settings.namespace:
            return False
        self.settings = dataclasses.replace(self.settings, namespace=namespace)
        for engine in self._engines:
            engine.tracker = GpuPrefixTracker(namespace, self.settings.chunk_tokens)
            engine.tracker.clear()  # publishes "cleared": peers drop the old keys
        return True

    def close(self) -> None:
        for engine in self._engines:
            self._close_dealer(engine)
            if engine.sub is not None:
                if engine.monitor is not None:
                    engine.sub.disable_monitor()
                    engine.monitor.close(linger=0)
                engine.sub.close(linger=0)
            engine.sub = engine.monitor = None
        self._owner.clear()


def _seq(frame: bytes) -> int:
    try:
        return decode_seq(frame)
    except ProtocolError as exc:
        raise ProtocolError(str(exc), "seq") from None


def _total(metrics: EngineMetrics, name: str, engine: str) -> float:
    counter: Counter = getattr(metrics, name)
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("engine") == engine
    )
