"""Which adapters go on which engines: a pure function of engines, budgets and traffic.

Invariants of ``place(input) -> Placement``, per base model (an adapter only ever goes on
engines serving its base; unhealthy engines are left out and left alone):

1. no engine holds more than its budget: pinned adapters, adapters the manager does not
   know (``foreign``: loaded by someone else) and placed adapters together;
2. every *active* adapter (traffic this round, or used within ``idle_unload_s``) is on at
   least one engine, unless every budget is taken by hotter ones (it is then
   ``unplaced``: the coldest lose, see 4);
3. an adapter's copies follow its traffic: ``ceil(rate / replica_rate)`` engines, at most
   every engine of its base; a copy already loaded stays while the rate is above
   ``1 - hysteresis`` of what it would take to add it (no flapping at the boundary);
4. when budgets are short, slots go in priority order — hotter first (requests/s), then
   the more recently used, then by name — first one copy each, then extra copies by the
   largest rate per copy (D'Hondt). The adapter that loses its slot is therefore the
   coldest and, among equally cold ones, the least recently used (LRU eviction);
5. few moves: what is loaded stays loaded when it is still wanted (kept first, before
   anything new is placed); an adapter the manager placed on an engine that no longer
   holds it (the engine restarted) goes back to that engine (``restore``) before going
   anywhere else; new copies go to the engine with the least traffic assigned, then the
   fewest adapters, then the smallest URL (bin-packing by traffic);
6. an inactive adapter is unloaded everywhere (``idle``); pinned adapters are never
   unloaded by placement (an operator's ``shoal lora load``, until ``unload``).

``choose_wake`` answers where an adapter goes *now* (a wake from the router, a load
without an engine): the engine with room and the least traffic, else the engine whose
coldest unpinned adapter is the coldest anywhere, which is evicted for it.

Everything is deterministic (sorted inputs, names break ties), so tests state exact
moves. Rejected: an ILP (the instance is tiny and a plan must be explainable per move);
proportional sharing of every slot (it would fill every budget with copies of cold
adapters, so each new adapter would cost an eviction).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from control.lora.types import EngineState, Move, MoveReason, Placement, PlacementInput, Usage

__all__ = ["choose_wake", "is_active", "place", "priority"]

_NEVER = -math.inf


def is_active(usage: Usage | None, now_s: float, idle_unload_s: float) -> bool:
    """Traffic this round, or used less than ``idle_unload_s`` ago."""
    if usage is None:
        return False
    if usage.rate > 0:
        return True
    return usage.last_used_s is not None and now_s - usage.last_used_s < idle_unload_s


def priority(name: str, usage: Mapping[str, Usage]) -> tuple[float, float, str]:
    """Sort key, hottest first: higher rate, then more recently used, then name."""
    u = usage.get(name, Usage())
    last = u.last_used_s if u.last_used_s is not None else _NEVER
    return (-u.rate, -last, name)


def _wanted_copies(rate: float, current: int, inp: PlacementInput, num_engines: int) -> int:
    if rate <= 0:
        return 1
    up = math.ceil(rate / inp.replica_rate)
    stay = math.ceil(rate / (inp.replica_rate * (1.0 - inp.hysteresis)))
    return max(1, min(num_engines, max(up, min(current, stay))))


class _Group:
    """Placement of one base model's adapters on its healthy engines."""

    def __init__(self, inp: PlacementInput, engines: list[EngineState], names: list[str]):
        self.inp = inp
        self.engines = sorted(engines, key=lambda e: e.url)
        self.managed = set(inp.adapters)
        self.active = [n for n in names if is_active(inp.usage.get(n), inp.now_s,
                                                      inp.idle_unload_s)]  # fmt: skip
        self.active.sort(key=lambda n: priority(n, inp.usage))
        self.names = names
        # per engine: slots for placed (not pinned) adapters, and what is placed there
        self.room: dict[str, int] = {}
        self.placed: dict[str, set[str]] = {}
        self.load: dict[str, float] = {}
        for e in self.engines:
            pinned = {n for n in e.pinned if n in self.managed}
            foreign = {n for n in e.loaded if n not in self.managed}
            self.room[e.url] = max(0, e.budget - len(pinned) - len(foreign))
            self.placed[e.url] = set()
            self.load[e.url] = 0.0
        self.reasons: dict[tuple[str, str], MoveReason] = {}
        self.wanted: dict[str, int] = {}  # copies each active adapter asks for (run())

    def rate(self, name: str) -> float:
        return self.inp.usage.get(name, Usage()).rate

    def allocate(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies wanted per active adapter and copies granted (slots beyond pins)."""
        pins = {n: sum(1 for e in self.engines if n in e.pinned) for n in self.names}
        loaded = {n: sum(1 for e in self.engines if n in e.loaded or n in e.pinned)
                  for n in self.names}  # fmt: skip
        wanted = {
            n: _wanted_copies(self.rate(n), loaded[n], self.inp, len(self.engines))
            for n in self.active
        }
        left = sum(self.room.values())
        granted = dict.fromkeys(self.active, 0)
        for n in self.active:  # one copy each, hottest first
            if pins[n] == 0 and left > 0:
                granted[n], left = 1, left - 1
        while left > 0:  # extra copies by the largest rate per copy
            best: tuple[float, tuple[float, float, str]] | None = None
            pick = ""
            for n in self.active:
                copies = granted[n] + pins[n]
                if copies == 0 or copies >= wanted[n]:
                    continue
                key = (-self.rate(n) / copies, priority(n, self.inp.usage))
                if best is None or key < best:
                    best, pick = key, n
            if not pick:
                break
            granted[pick] += 1
            left -= 1
        return wanted, granted

    def _put(self, url: str, name: str, share: float) -> None:
        self.placed[url].add(name)
        self.room[url] -= 1
        self.load[url] += share

    def run(self) -> tuple[dict[str, frozenset[str]], dict[str, int], list[str]]:
        self.wanted, granted = self.allocate()
        pins = {n: sum(1 for e in self.engines if n in e.pinned) for n in self.names}
        share = {n: self.rate(n) / max(1, granted[n] + pins[n]) for n in self.active}
        for e in self.engines:  # pinned copies carry their share of the traffic too
            for n in e.pinned:
                if n in share:
                    self.load[e.url] += share[n]
        count = dict.fromkeys(self.active, 0)
        # keep what is loaded, then restore what the manager placed (hottest first)
        for stage in ("loaded", "assigned"):
            for n in self.active:
                for e in self.engines:
                    if count[n] >= granted[n]:
                        break
                    if n in e.pinned or n in self.placed[e.url] or self.room[e.url] <= 0:
                        continue
                    if stage == "loaded" and n in e.loaded:
                        self._put(e.url, n, share[n])
                        count[n] += 1
                    elif stage == "assigned" and n in e.assigned and n not in e.loaded:
                        self._put(e.url, n, share[n])
                        self.reasons[(e.url, n)] = "restore"
                        count[n] += 1
        # first copies, then extra copies, each on the least loaded engine with room
        for first in (True, False):
            for n in self.active:
                while count[n] < granted[n]:
                    if first and (count[n] > 0 or pins[n] > 0):
                        break
                    target = self._emptiest(n)
                    if target is None:
                        break
                    self._put(target, n, share[n])
                    self.reasons[(target, n)] = "place" if first else "replicate"
                    count[n] += 1
                    if first:
                        break
        desired = {
            e.url: frozenset(self.placed[e.url] | {n for n in e.pinned if n in self.managed})
            for e in self.engines
        }
        unplaced = sorted(n for n in self.active if count[n] + pins[n] == 0)
        replicas = {n: count[n] + pins[n] for n in self.active}
        return desired, replicas, unplaced

    def _emptiest(self, name: str) -> str | None:
        candidates = [e.url for e in self.engines
                      if self.room[e.url] > 0 and name not in self.placed[e.url]
                      and name not in e.pinned]  # fmt: skip
        if not candidates:
            return None
        return min(candidates, key=lambda url: (self.load[url], len(self.placed[url]), url))


def place(inp: PlacementInput) -> Placement:
    """Desired adapters per healthy engine and the moves there (module docstring)."""
    assert inp.replica_rate > 0, "replica_rate must be > 0"
    assert 0 <= inp.hysteresis < 1, "hysteresis must be in [0, 1)"
    healthy = [e for e in inp.engines if e.healthy]
    desired: dict[str, frozenset[str]] = {}
    replicas: dict[str, int] = {}
    unplaced: list[str] = []
    loads: list[Move] = []
    unloads: list[Move] = []
    for base in sorted({e.base_model for e in healthy}):
        engines = [e for e in healthy if e.base_model == base]
        names = sorted(n for n, b in inp.adapters.items() if b == base)
        group = _Group(inp, engines, names)
        group_desired, group_replicas, group_unplaced = group.run()
        desired.update(group_desired)
        replicas.update(group_replicas)
        unplaced += group_unplaced
        active = set(group.active)
        for e in group.engines:
            want = group_desired[e.url]
            for n in sorted(want - e.loaded):
                loads.append(Move(e.url, n, group.reasons.get((e.url, n), "restore")))
            for n in sorted((e.loaded & set(names)) - want):
                reason: MoveReason
                if n not in active:
                    reason = "idle"
                elif group_replicas.get(n, 0) < group.wanted[n]:
                    reason = "evict"
                else:
                    reason = "shrink"
                unloads.append(Move(e.url, n, reason))
    return Placement(
        desired=desired,
        loads=tuple(sorted(loads)),
        unloads=tuple(sorted(unloads)),
        unplaced=tuple(sorted(unplaced)),
        replicas=replicas,
    )


def choose_wake(inp: PlacementInput, name: str) -> tuple[str, str | None] | None:
    """Where ``name`` goes now: ``(engine, None)`` for an engine with room (least traffic,
    then fewest adapters, then URL), ``(engine, victim)`` when every budget is full (the
    coldest unpinned managed adapter anywhere, by ``priority``; ties by engine URL), or
    ``None`` when no healthy engine of its base can take it. The caller checks first that
    no engine holds it already."""
    base = inp.adapters.get(name)
    assert base is not None, f"choose_wake for unregistered adapter {name!r}"
    engines = sorted((e for e in inp.engines if e.healthy and e.base_model == base),
                     key=lambda e: e.url)  # fmt: skip
    if not engines:
        return None

    def traffic(e: EngineState) -> float:
        return sum(inp.usage.get(n, Usage()).rate for n in e.loaded | e.pinned)

    free = [e for e in engines if len(e.loaded | e.pinned) < e.budget]
    if free:
        best = min(free, key=lambda e: (traffic(e), len(e.loaded | e.pinned), e.url))
        return best.url, None
    victims: list[tuple[tuple[float, float, str], str, str]] = []
    for e in engines:
        movable = [n for n in e.loaded if n in inp.adapters and n not in e.pinned and n != name]
        if movable:
            coldest = max(movable, key=lambda n: priority(n, inp.usage))
            victims.append((priority(coldest, inp.usage), e.url, coldest))
    if not victims:
        return None
    lowest = max(v[0] for v in victims)
    _, url, victim = min(v for v in victims if v[0] == lowest)
    return url, victim
