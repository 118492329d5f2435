"""Values the LoRA manager passes between its parts (STYLE.md §4): frozen, slotted, pure.

* ``AdapterSpec``   one registered adapter: the name clients send as ``model``, the base
                    model it extends (an engine's served name, the ``/v1/models`` card with
                    ``parent`` null), where it came from, and the ``lora_path`` engines read.
* ``EngineState``   one engine as placement sees it: its base model, whether it answered
                    this round, its budget (adapters it may hold), what it holds now, what
                    the manager last placed there (to restore after a restart) and what an
                    operator pinned there (``shoal lora load``).
* ``Usage``         one adapter's traffic: requests/s this round, when it was last used.
* ``PlacementInput`` everything ``placement.place`` reads; ``Placement`` what it answers:
                    the desired adapters per engine and the moves that get there.

``lora_path`` must be readable by the engine that loads it: a local source is handed over
as is (the engines run on this node, or the path is on a volume they share); a remote
source is fetched into ``--adapter-dir`` first, which must then be such a path too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AdapterSpec",
    "EngineState",
    "Move",
    "Placement",
    "PlacementInput",
    "Usage",
]


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    name: str  # what clients send as "model"; what vLLM lists in /v1/models
    base_model: str  # the engines' served base model name
    source: str  # as registered: a local path, s3://bucket/prefix, http(s)://host/prefix
    path: str  # the lora_path engines load (the source itself when local)
    registered_at: float = 0.0  # unix time

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_model": self.base_model,
            "source": self.source,
            "path": self.path,
            "registered_at": self.registered_at,
        }


@dataclass(frozen=True, slots=True)
class EngineState:
    """One engine this round. ``loaded`` may hold adapters the manager does not know (loaded
    by someone else, ``--lora-modules``): they use budget and are left alone."""

    url: str
    base_model: str
    budget: int  # adapters it may hold at once
    loaded: frozenset[str] = frozenset()
    assigned: frozenset[str] = frozenset()  # what the manager placed here last (restore)
    pinned: frozenset[str] = frozenset()  # loaded by an operator: kept until unloaded
    healthy: bool = True


@dataclass(frozen=True, slots=True)
class Usage:
    rate: float = 0.0  # requests/s over the rate window (router arrivals + wakes)
    last_used_s: float | None = None  # on the manager's clock; None = never seen used


@dataclass(frozen=True, slots=True)
class PlacementInput:
    engines: tuple[EngineState, ...]
    adapters: Mapping[str, str]  # registered adapter name -> base model
    usage: Mapping[str, Usage] = field(default_factory=dict)
    now_s: float = 0.0
    idle_unload_s: float = 600.0  # no traffic for this long: unloaded everywhere
    replica_rate: float = 10.0  # requests/s one engine's copy takes before another is added
    hysteresis: float = 0.2  # a replica stays while the rate is above (1 - h) of its share;
    # a slot's holder keeps it until a challenger's rate per copy is 1 / (1 - h) times its own
    balance: float = 0.5  # a copy carries at most this share of an engine's fair share of
    # the adapter traffic once the fleet is near replica_rate per engine; 0 = off (placement)
    rate_resolution: float = 0.0  # req/s of one request over the rate window: a challenger
    # must beat a slot's holder by more than that as well (the manager: 1 / rate_window_s)


MoveReason = Literal["place", "replicate", "restore", "idle", "evict", "shrink"]


@dataclass(frozen=True, slots=True, order=True)
class Move:
    engine: str
    adapter: str
    reason: MoveReason


@dataclass(frozen=True, slots=True)
class Placement:
    """``desired[url]`` = the managed adapters that engine should hold (pinned and foreign
    ones not included); ``loads`` and ``unloads`` turn what is loaded into it, sorted.
    ``unplaced`` = adapters with traffic that found no room anywhere (hotter ones filled
    every budget), by name."""

    desired: Mapping[str, frozenset[str]]
    loads: tuple[Move, ...] = ()
    unloads: tuple[Move, ...] = ()
    unplaced: tuple[str, ...] = ()
    replicas: Mapping[str, int] = field(default_factory=dict)  # adapter -> engines wanted
