"""Which adapters go on which engines: a pure function of engines, budgets and traffic.

Invariants of ``place(input) -> Placement``, per base model (an adapter only ever goes on
engines serving its base; unhealthy engines are left out and left alone):

1. no engine holds more than its budget: pinned adapters, adapters the manager does not
   know (``foreign``: loaded by someone else) and placed adapters together;
2. every *active* adapter (traffic in the rate window, or used within ``idle_unload_s``)
   is on at least one engine, unless every budget is taken by hotter copies (it is then
   ``unplaced``: the coldest lose, see 4);
3. an adapter's copies follow its traffic: ``ceil(rate / per_copy)`` engines, at most
   every engine of its base, where one copy carries at most
   ``per_copy = min(replica_rate, max(replica_rate - fair, balance * fair))`` requests/s
   and ``fair`` = the base's adapter traffic / its healthy engines. ``replica_rate`` is
   capacity (what one engine's copy takes); the second term is balance: placing copies
   greedily on the least loaded engine leaves the busiest at most ``fair + per_copy``, so
   the busiest engine stays within ``max(replica_rate, (1 + balance) * fair)`` — under
   capacity while the fleet has room, within ``balance`` of even once it has not.
   Without it an adapter of 9.3 req/s (under replica_rate 10) kept one copy and its
   engine served 39-48% of 4 engines' requests (bench/lora.py). Rejected: replicating an
   adapter when its engine is overloaded (depends on where it sits, so the copy that
   fixes the overload removes its own reason: flapping) and ``rate > fair`` alone (never
   fires for that 9.3 req/s adapter, 0.93 of fair). It is pessimistic with few adapters
   (one adapter of 8 req/s on 2 idle engines gets 2 copies); ``balance`` 0 turns it off.
   A copy already loaded stays while the rate is above ``1 - hysteresis`` of what it
   would take to add it (no flapping at the boundary);
4. slots go by rate per copy (D'Hondt: an adapter's k-th copy scores ``rate / k``), up
   to the copies each adapter wants, so a wanted extra copy of a hot adapter outranks the
   only copy of a cold one; ties by incumbency, then the more recently used, then name.
   *Slot hysteresis*: a copy that holds a slot now (loaded there, or placed there and
   lost to a restart) scores ``rate / k / (1 - hysteresis) + rate_resolution``, so a
   challenger takes an incumbent's slot only when its rate per copy exceeds the
   incumbent's by that margin (``--hysteresis`` 0.2: 1.25x) *and* by one request over the
   rate window (``rate_resolution`` = 1 / ``--rate-window-s``). The second term is what
   stops the swaps bench/lora.py measured (rounds adding 27% more loads than wakes alone
   at 5 s rates): at the edge of the budgets adapters have 0-2 requests in a window, and
   2 against 1 beats any ratio; the ratio alone changed nothing measurable there. The
   copy that loses its slot is the coldest (within the margin) and, among equally cold
   ones, the least recently used (LRU);
5. few moves: a copy that keeps its slot stays on the engine holding it (the slot is
   reserved for it; a new copy takes a free slot, else the reserved slot of the weakest
   holder still waiting, which has lost it); an adapter the manager placed on an engine
   that no longer holds it (the engine restarted) goes back there (``restore``); new
   copies go to the engine with the least traffic assigned, then the fewest adapters,
   then the smallest URL (bin-packing by traffic). A plan applied is stable: the greedy
   pass is repeated from its own result until two passes agree (``_settle``);
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
from dataclasses import replace

from control.lora.types import EngineState, Move, MoveReason, Placement, PlacementInput, Usage

__all__ = ["choose_wake", "is_active", "per_copy_rate", "place", "priority"]

_NEVER = -math.inf


def is_active(usage: Usage | None, now_s: float, idle_unload_s: float) -> bool:
    """Traffic in the rate window, or used less than ``idle_unload_s`` ago."""
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


def per_copy_rate(inp: PlacementInput, total_rate: float, num_engines: int) -> float:
    """Requests/s one copy may carry (invariant 3): capacity, and balance once the
    base's adapter traffic ``total_rate`` leaves its engines little headroom."""
    if inp.balance <= 0 or total_rate <= 0 or num_engines <= 0:
        return inp.replica_rate
    fair = total_rate / num_engines
    return min(inp.replica_rate, max(inp.replica_rate - fair, inp.balance * fair))


def _wanted_copies(rate: float, current: int, per_copy: float, hysteresis: float,
                   num_engines: int) -> int:  # fmt: skip
    if rate <= 0:
        return 1
    up = math.ceil(rate / per_copy)
    stay = math.ceil(rate / (per_copy * (1.0 - hysteresis)))
    return max(1, min(num_engines, max(up, min(current, stay))))


class _Group:
    """Placement of one base model's adapters on its healthy engines: one greedy pass over
    copies, the largest rate per copy first (invariant 4), each put where it stays."""

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
        self.pins = {n: sum(1 for e in self.engines if n in e.pinned) for n in names}
        # where each adapter holds a slot now: loaded there, then placed there last round
        # and lost (a restarted engine: restored there first); pinned copies hold none
        self.holds = {
            n: [e.url for e in self.engines if n in e.loaded and n not in e.pinned]
            + [e.url for e in self.engines
               if n in e.assigned and n not in e.loaded and n not in e.pinned]
            for n in names
        }  # fmt: skip
        self.wanted: dict[str, int] = {}  # copies each active adapter asks for
        self.count = dict.fromkeys(self.active, 0)  # copies placed so far (run())
        self.reserved = dict.fromkeys(self.room, 0)  # slots held by copies not placed yet

    def rate(self, name: str) -> float:
        return self.inp.usage.get(name, Usage()).rate

    def _want(self) -> dict[str, int]:
        """Copies wanted per active adapter (invariant 3), at most one per engine with
        room for it."""
        total = sum(self.rate(n) for n in self.active)
        per_copy = per_copy_rate(self.inp, total, len(self.engines))
        wanted = {}
        for n in self.active:
            reach = self.pins[n] + sum(
                1 for e in self.engines if n not in e.pinned and self.room[e.url] > 0
            )
            current = len({*self.holds[n]}) + self.pins[n]
            limit = max(1, min(len(self.engines), reach))
            wanted[n] = _wanted_copies(self.rate(n), current, per_copy, self.inp.hysteresis,
                                       limit)  # fmt: skip
        return wanted

    def run(self) -> tuple[dict[str, frozenset[str]], dict[str, int], list[str]]:
        self.wanted = wanted = self._want()
        keep = 1.0 / (1.0 - self.inp.hysteresis)
        share = {n: self.rate(n) / wanted[n] for n in self.active}
        for e in self.engines:  # pinned copies carry their share of the traffic too
            for n in e.pinned:
                if n in share:
                    self.load[e.url] += share[n]
        # a slot an active adapter holds is reserved for it: a new copy takes a free slot,
        # else the reserved slot of the weakest holder still waiting (it has lost it: every
        # copy still waiting scores below the new one, which came first)
        for n in self.active:
            for url in {*self.holds[n]}:
                self.reserved[url] += 1
        self.reserved = {url: min(self.room[url], r) for url, r in self.reserved.items()}
        count = self.count
        blocked: set[str] = set()  # no engine left for its next copy
        while any(r > 0 for r in self.room.values()):
            best: tuple[float, bool, tuple[float, float, str]] | None = None
            pick = ""
            for n in self.active:
                if n in blocked or self.pins[n] + count[n] >= wanted[n]:
                    continue
                key = self._key(n, keep)
                if best is None or key < best:
                    best, pick = key, n
            if not pick:
                break
            target = self._target(pick, keep)
            if target is None:
                blocked.add(pick)
                continue
            self.placed[target].add(pick)
            self.room[target] -= 1
            self.load[target] += share[pick]
            count[pick] += 1
        desired = {
            e.url: frozenset(self.placed[e.url] | {n for n in e.pinned if n in self.managed})
            for e in self.engines
        }
        unplaced = sorted(n for n in self.active if count[n] + self.pins[n] == 0)
        replicas = {n: count[n] + self.pins[n] for n in self.active}
        return desired, replicas, unplaced

    def _key(self, name: str, keep: float) -> tuple[float, bool, tuple[float, float, str]]:
        """Rank of ``name``'s next copy, smallest first: rate per copy (boosted while it
        holds a slot not yet used), incumbency, then ``priority``."""
        copy = self.pins[name] + self.count[name] + 1
        incumbent = self._waiting(name) != []
        score = self.rate(name) / copy
        if incumbent:
            score = score * keep + self.inp.rate_resolution
        return (-score, not incumbent, priority(name, self.inp.usage))

    def _waiting(self, name: str) -> list[str]:
        """Engines where ``name`` holds a slot it has not taken yet (room permitting)."""
        return [u for u in self.holds[name] if name not in self.placed[u] and self.room[u] > 0]

    def _target(self, name: str, keep: float) -> str | None:
        """Where the next copy of ``name`` goes: an engine where it holds a slot; else the
        least loaded engine with a free slot (then the fewest adapters, then URL); else the
        slot of the weakest holder still waiting (one wanting no more copies first), which
        loses it. None: no engine without a copy has room."""
        waiting = self._waiting(name)
        if waiting:
            self.reserved[waiting[0]] = max(0, self.reserved[waiting[0]] - 1)
            return waiting[0]
        open_ = [e.url for e in self.engines if name not in self.placed[e.url]
                 and name not in e.pinned and self.room[e.url] > 0]  # fmt: skip
        free = [u for u in open_ if self.room[u] > self.reserved[u]]
        if free:
            return min(free, key=lambda u: (self.load[u], len(self.placed[u]), u))
        holders = []
        for n in self.active:
            if n == name:
                continue
            done = self.pins[n] + self.count[n] >= self.wanted[n]
            for u in self._waiting(n):
                if u in open_:
                    holders.append(((not done, self._key(n, keep)), u, n))
        if not holders:
            return None
        _, url, loser = max(holders)  # reservations of holders wanting no more copies first
        self.holds[loser].remove(url)
        self.reserved[url] = max(0, self.reserved[url] - 1)
        return url


_MAX_PASSES = 4


def _settle(
    inp: PlacementInput, engines: list[EngineState], names: list[str]
) -> tuple[_Group, tuple[dict[str, frozenset[str]], dict[str, int], list[str]]]:
    """A greedy pass, then again from its result as if applied, until two agree (at most
    ``_MAX_PASSES``): a pass may leave a copy blocked (every engine with room had one
    already) that the next pass, the first's copies being incumbents in other slots,
    places. Settling here keeps invariant 5's promise that a plan applied is stable."""
    group = _Group(inp, engines, names)
    result = group.run()
    for _ in range(_MAX_PASSES - 1):
        applied = [
            replace(e, loaded=result[0][e.url] | {n for n in e.loaded if n not in group.managed},
                    assigned=result[0][e.url])
            for e in engines
        ]  # fmt: skip
        again = _Group(inp, applied, names)
        again_result = again.run()
        if again_result[0] == result[0]:
            break
        group, result = again, again_result
    return group, result


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
        group, (group_desired, group_replicas, group_unplaced) = _settle(inp, engines, names)
        desired.update(group_desired)
        replicas.update(group_replicas)
        unplaced += group_unplaced
        active = set(group.active)
        copies = {n for e in engines for n in e.loaded | e.pinned}  # somewhere already
        for e in sorted(engines, key=lambda e: e.url):
            want = group_desired[e.url]
            for n in sorted(want - e.loaded):
                reason: MoveReason
                if n in e.assigned or n in e.pinned:
                    reason = "restore"
                else:
                    reason = "replicate" if n in copies else "place"
                copies.add(n)
                loads.append(Move(e.url, n, reason))
            for n in sorted((e.loaded & set(names)) - want):
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
