"""What the daemon needs of its cluster member, and the member of a cluster of one.

The daemon talks to ``Cluster`` only; ``ClusterNode`` (``node.py``) is the real one,
``NullCluster`` is what runs when ``cluster_port`` is 0, so the daemon has no
``if clustered:`` branches (every remote answer is simply empty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

from kvcache.cluster.index import PrefixMatch
from kvcache.store import BlockEvent

__all__ = ["Cluster", "NullCluster"]


class Cluster(Protocol):
    """What the daemon calls; ``ClusterNode`` is the real one, ``NullCluster`` is off."""

    def register(self, poller: zmq.Poller) -> None: ...
    def owns(self, sock: Any) -> bool: ...
    def handle(self, sock: Any) -> None: ...
    def publish(self, events: list[BlockEvent], ts: float) -> None: ...
    def add_engine(self, stream: str, snapshot: Callable[[], list[bytes]]) -> None: ...
    def publish_engine(self, stream: str, events: list[tuple[int, bytes]], ts: float) -> None: ...
    def tick(self, now: float) -> None: ...
    def idle_step(self) -> bool: ...
    def locate(self, keys: Sequence[bytes], start: int) -> PrefixMatch: ...
    def gpu_runs(self, keys: Sequence[bytes]) -> tuple[tuple[str, int], ...]: ...
    def address_of(self, node: str) -> str: ...
    def fetch(self, keys: Sequence[bytes], on_done: Callable[[], None]) -> None: ...
    def drain(self, on_done: Callable[[dict[str, Any]], None]) -> None: ...
    def status(self, samples: bool = False) -> dict[str, Any]: ...
    @property
    def draining(self) -> bool: ...
    def close(self) -> None: ...


class NullCluster:
    """Cluster sync off (the single-machine default): every remote answer is empty."""

    draining = False

    def register(self, poller: zmq.Poller) -> None:
        pass

    def owns(self, sock: Any) -> bool:
        return False

    def handle(self, sock: Any) -> None:
        raise AssertionError("NullCluster owns no socket")

    def publish(self, events: list[BlockEvent], ts: float) -> None:
        pass

    def add_engine(self, stream: str, snapshot: Callable[[], list[bytes]]) -> None:
        pass

    def publish_engine(self, stream: str, events: list[tuple[int, bytes]], ts: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def idle_step(self) -> bool:
        return False

    def locate(self, keys: Sequence[bytes], start: int) -> PrefixMatch:
        return PrefixMatch(start, 0, ())

    def gpu_runs(self, keys: Sequence[bytes]) -> tuple[tuple[str, int], ...]:
        return ()

    def address_of(self, node: str) -> str:
        return ""

    def fetch(self, keys: Sequence[bytes], on_done: Callable[[], None]) -> None:
        on_done()

    def drain(self, on_done: Callable[[dict[str, Any]], None]) -> None:
        on_done({"handed_off": 0, "peers": []})

    def status(self, samples: bool = False) -> dict[str, Any]:
        return {"enabled": False, "members": []}

    def close(self) -> None:
        pass
