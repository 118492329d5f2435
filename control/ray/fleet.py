"""EngineFleet: ``replicas`` engine groups of one template, kept so by a control loop.

One round (``reconcile_once``)::

    poll every group at once (each within poll_timeout_s; a poll that times out or fails
      keeps the last status, stale: not ready; STALE_ROUNDS in a row -> unreachable)
      -> read the health feed's unhealthy GPUs
      -> reconcile (pure: control/ray/reconcile.py) -> stops, starts
      -> stops: lost groups (failed, on a sick GPU) and unready ones stop in the background
         now; ready ones leaving (scale down, rolling update) leave the discovery file now
         and stop drain_s later (requests already routed to them finish)
      -> starts (after a crash-loop backoff when new groups keep failing before ready)
      -> the discovery list: exactly the ready groups, written atomically to the file
         (when there is one) and served by ``discovery()`` (``GET /v1/discovery``)

Invariants:

* the discovery file (and ``discovery()``, the same list) lists exactly the groups
  whose last poll said ``ready`` and that the fleet keeps: a group found failed, or on an
  unhealthy GPU, leaves it in the round that saw it, before anything is stopped (the
  router reads ``--discovery file`` or ``http``); a
  group whose poll timed out or failed is stale: it counts as not ready at once
  (``state()``, the rolling update's capacity), stays in the file only for the round of
  its first failed poll (one slow poll does not flap the router), and after
  ``UNREACHABLE_POLLS`` failed polls in a row it is replaced (``unreachable``);
* no exception from one group ends the loop: any error from a poll is a counted poll
  failure (an unexpected one logged with its traceback, once per streak);
* a group whose stop failed is kept and its stop retried every round (``stop_errors``);
  the fleet never forgets a group that may still hold GPUs;
* a round is bounded: polls have a timeout, stops run in background tasks (each within
  its grace), starts only create the placement group (``GroupLike.start`` returns at once);
* every group the fleet created is stopped exactly once, by a stop it owns (``close()``
  waits for the background ones);
* ``state()`` is ``ReplicaState(spec=replicas, ready=ready groups (any revision: they
  serve), pending=waiting+starting groups of the current template, endpoints=ready URLs)``.

Choices: one place changes the group table (the round), so the file, the counts and the
statuses cannot disagree; ``scale`` and ``update`` only change the spec and take effect at
the next round. Drains are timed by rounds, not by a timer per group, so virtual time
drives them in tests; a drain ends at the first round after ``drain_s``. The health feed is
read, not polled: its owner (``shoal engines serve``) runs ``HealthFeed.poll`` on its own
interval, so a slow watcher cannot stretch a round. Ray does not know a GPU is sick, so a
replacement may land on the same GPU: it is replaced again, and such losses before ready
back off the next start like a crash loop (1, 2, 4 ... s, at most ``MAX_BACKOFF_S``); the
node itself leaves the pool by the watcher's cordon. Rejected: restarting the engine inside
a group whose worker died (vLLM does not heal a lost Ray worker, vllm #16259: the whole
group is replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from control.autoscale.types import ReplicaState
from control.ray.errors import RayGroupError
from control.ray.reconcile import GPU_UNHEALTHY, Stop, reconcile
from control.ray.types import FleetSpec, GroupPhase, GroupSpec, GroupStatus

__all__ = ["EngineFleet", "FleetCounters", "GroupLike", "HealthLike"]

log = logging.getLogger("shoal." + __name__)

# New groups that fail before ever getting ready are replaced after 1, 2, 4 ... s, at most
# this (a template that cannot start must not churn placement groups every round).
MAX_BACKOFF_S = 60.0
UNREACHABLE_POLLS = 3  # failed polls in a row before a group is replaced (unreachable)
UNREACHABLE = "unreachable"


class GroupLike(Protocol):
    """One engine group as the fleet drives it (``control.ray.group.RayEngineGroup``)."""

    @property
    def group_id(self) -> str: ...

    @property
    def spec(self) -> GroupSpec: ...

    async def start(self) -> None: ...

    async def poll(self) -> GroupStatus: ...

    async def stop(self, grace_s: float = 30.0) -> None: ...


class HealthLike(Protocol):
    """What the fleet reads of ``control.health.client.HealthFeed``."""

    def unhealthy_gpus(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class FleetCounters:
    """Totals since the fleet began (for ``shoal_engines_*`` metrics)."""

    rounds: int = 0
    groups_started: int = 0
    groups_stopped: int = 0
    groups_replaced: Mapping[str, int] = field(default_factory=dict)  # by failure reason
    groups_retired: Mapping[str, int] = field(default_factory=dict)  # scale_down/outdated
    start_errors: int = 0
    poll_failures: int = 0
    stop_errors: int = 0
    updates: int = 0
    scales: int = 0
    discovery_writes: int = 0


@dataclass
class _Member:
    group: GroupLike
    created: float
    status: GroupStatus
    failed_polls: int = 0  # in a row; > 0: the status is stale

    @property
    def serving(self) -> bool:
        """Ready as of this round's poll (counts as capacity)."""
        return self.status.phase is GroupPhase.READY and self.failed_polls == 0

    @property
    def listed(self) -> bool:
        """In the discovery file: ready, and no more than one poll behind."""
        return (
            self.status.phase is GroupPhase.READY
            and self.failed_polls <= 1
            and bool(self.status.url)
        )


def write_discovery(path: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """``entries`` as a JSON list into ``path`` atomically (temp file in the same
    directory, then ``os.replace``): the router never reads half a list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump([dict(entry) for entry in entries], handle)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _entry(status: GroupStatus, spec: GroupSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"url": status.url, "gpus": list(status.gpus)}
    if spec.gpu_type:
        entry["gpu_type"] = spec.gpu_type
    return entry


def _next_revision(revision: str) -> str:
    return str(int(revision) + 1) if revision.isdigit() else f"{revision}.1"


class EngineFleet:
    """``spec.replicas`` groups of ``spec.template`` (module docstring). ``group_factory``
    makes a group (``RayEngineGroup``); ``discovery_file`` gets the ready groups
    (``[{"url", "gpus", "gpu_type"?}]``); ``health`` is read each round
    (``unhealthy_gpus()``, and ``reports()`` when it has one, for nodes to drain);
    ``clock`` drives creation times, drains and backoff; a group's poll may take
    ``poll_timeout_s``, its start ``start_timeout_s``, its stop ``stop_grace_s``;
    a ready group leaving stays ``drain_s`` out of the file before it is stopped."""

    def __init__(
        self,
        spec: FleetSpec,
        *,
        group_factory: Callable[[GroupSpec, str], GroupLike],
        discovery_file: Path | None = None,
        health: HealthLike | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_timeout_s: float = 10.0,
        start_timeout_s: float = 30.0,
        drain_s: float = 10.0,
        stop_grace_s: float = 30.0,
        id_prefix: str = "group",
    ) -> None:
        assert spec.replicas >= 0, f"replicas {spec.replicas} < 0"
        self._spec = spec
        self._factory = group_factory
        self._discovery = discovery_file
        self._health = health
        self._clock = clock
        self._poll_timeout_s = poll_timeout_s
        self._start_timeout_s = start_timeout_s
        self._drain_s = drain_s
        self._stop_grace_s = stop_grace_s
        self._id_prefix = id_prefix
        self._seq = 0
        self._members: dict[str, _Member] = {}  # groups the fleet keeps, by id
        self._draining: dict[str, tuple[_Member, float]] = {}  # id -> (member, stop at)
        self._stopping: dict[str, asyncio.Task[None]] = {}  # background stops
        self._stop_failed: dict[str, tuple[_Member, str]] = {}  # retried every round
        self._published: list[dict[str, Any]] | None = None
        self._listed: list[dict[str, Any]] = []  # what GET /v1/discovery serves
        self._failing_in_a_row = 0  # new groups that failed before ready since one got ready
        self._start_after = float("-inf")  # crash-loop backoff: no start before this
        self._drain_nodes_logged: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._replaced: Counter[str] = Counter()
        self._retired: Counter[str] = Counter()
        if discovery_file is not None and not discovery_file.exists():
            write_discovery(discovery_file, [])  # the router's file source needs it
            self._published = []

    # -- spec --------------------------------------------------------------------------

    @property
    def spec(self) -> FleetSpec:
        return self._spec

    def scale(self, replicas: int) -> None:
        """Ask for ``replicas`` groups; the next round acts on it."""
        if replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {replicas}")
        if replicas != self._spec.replicas:
            log.info("fleet scaled %d -> %d groups", self._spec.replicas, replicas)
            self._counts["scales"] += 1
        self._spec = replace(self._spec, replicas=replicas)

    def update(self, template: GroupSpec) -> str:
        """Roll the fleet to ``template``; returns its revision. A template that differs
        from the current one under the same revision gets the next revision (so a caller
        cannot change groups without the fleet noticing)."""
        current = self._spec.template
        if template == current:
            return current.revision
        if template.revision == current.revision:
            template = replace(template, revision=_next_revision(current.revision))
        log.info("fleet update: revision %s -> %s", current.revision, template.revision)
        self._spec = replace(self._spec, template=template)
        self._counts["updates"] += 1
        self._failing_in_a_row, self._start_after = 0, float("-inf")
        return template.revision

    # -- the round ---------------------------------------------------------------------

    async def _poll(self, member: _Member) -> GroupStatus:
        gid = member.group.group_id
        try:
            async with asyncio.timeout(self._poll_timeout_s):
                status = await member.group.poll()
        except TimeoutError:
            return self._poll_failed(member, f"no status in {self._poll_timeout_s:.1f} s")
        except RayGroupError as exc:
            return self._poll_failed(member, f"poll failed ({exc})")
        except Exception as exc:  # one group's bug must not end the loop: counted, traced
            if member.failed_polls == 0:
                log.exception("group %s: poll raised", gid)
            return self._poll_failed(member, f"poll raised {exc!r}")
        member.failed_polls = 0
        # the fleet's own clock and template are the truth for ordering and revisions
        return replace(status, created=member.created, revision=member.group.spec.revision)

    def _poll_failed(self, member: _Member, why: str) -> GroupStatus:
        """The last status, stale; after UNREACHABLE_POLLS in a row: failed, unreachable."""
        self._counts["poll_failures"] += 1
        member.failed_polls += 1
        gid = member.group.group_id
        if member.failed_polls >= UNREACHABLE_POLLS and member.status.phase in (
            GroupPhase.WAITING,
            GroupPhase.STARTING,
            GroupPhase.READY,
        ):
            detail = f"{member.failed_polls} polls in a row got no status; last: {why}"
            return replace(
                member.status, phase=GroupPhase.FAILED, reason=UNREACHABLE, detail=detail
            )
        log.warning(
            "group %s: %s; its last status (%s) is stale (%d in a row)",
            gid, why, member.status.phase, member.failed_polls,
        )  # fmt: skip
        return member.status

    def _observe(self, member: _Member, status: GroupStatus) -> None:
        before = member.status
        member.status = status
        if status.phase is before.phase:
            return
        gid = status.group_id
        if status.phase is GroupPhase.READY:
            self._failing_in_a_row, self._start_after = 0, float("-inf")
            log.info(
                "group %s ready after %.1f s at %s on %s",
                gid, self._clock() - member.created, status.url, ",".join(status.gpus),
            )  # fmt: skip
        elif status.phase is GroupPhase.FAILED:
            log.warning("group %s failed (%s): %s", gid, status.reason, status.detail)
            if before.phase is not GroupPhase.READY:
                self._back_off(status)
        elif status.phase is GroupPhase.WAITING and status.waiting_for:
            log.info("group %s waiting for %s", gid, status.waiting_for)
        else:
            log.info("group %s %s -> %s", gid, before.phase, status.phase)

    def _back_off(self, status: GroupStatus) -> None:
        """A group of the current template was lost before it got ready: the next start
        waits 1, 2, 4 ... s (a template that cannot start, or a sick GPU Ray keeps
        placing groups on, must not churn placement groups every round)."""
        if status.revision != self._spec.template.revision:
            return
        self._failing_in_a_row += 1
        exponent = min(self._failing_in_a_row - 1, 16)  # 2**16 > MAX_BACKOFF_S; no overflow
        backoff_s = min(MAX_BACKOFF_S, 2.0**exponent)
        self._start_after = self._clock() + backoff_s

    def _check_drain_nodes(self) -> None:
        """Nodes the health feed says to drain are logged once each (the cordon itself is
        the watcher's ``--cordon``; groups on their sick GPUs are replaced anyway)."""
        reports = getattr(self._health, "reports", None)
        if reports is None:
            return
        for node_health in reports().values():
            node = node_health.node
            sick = [g for g in node_health.gpus if not g.healthy and g.remedy == "drain_node"]
            if sick and node not in self._drain_nodes_logged:
                self._drain_nodes_logged.add(node)
                log.warning(
                    "health: node %s should be drained (gpu%d); its groups on sick GPUs "
                    "are replaced, new ones may land there until it is cordoned",
                    node, sick[0].index,
                )  # fmt: skip

    async def reconcile_once(self) -> None:
        """One control round (module docstring)."""
        self._counts["rounds"] += 1
        members = list(self._members.values())
        statuses = await asyncio.gather(*(self._poll(m) for m in members))
        for member, status in zip(members, statuses, strict=True):
            self._observe(member, status)
        unhealthy = self._health.unhealthy_gpus() if self._health is not None else frozenset()
        if self._health is not None:
            self._check_drain_nodes()
        now = self._clock()
        for gid, (member, stop_at) in list(self._draining.items()):
            if now >= stop_at:  # its GPUs are free for this round's starts
                del self._draining[gid]
                self._stop_in_background(member, "drained")
        self._retry_failed_stops()
        actions = reconcile(
            self._spec,
            [m.status for m in self._members.values()],
            unhealthy=unhealthy,
            num_draining=len(self._draining),
            stale=frozenset(gid for gid, m in self._members.items() if m.failed_polls),
        )
        for stop in actions.stops:
            self._apply_stop(stop, now)
        self._publish()  # out of the router before anything new happens
        if now >= self._start_after:
            for _ in range(actions.num_start):
                await self._start(now)
        elif actions.num_start:
            log.info(
                "%d group(s) to start wait %.1f s more (%d new groups failed before ready)",
                actions.num_start, self._start_after - now, self._failing_in_a_row,
            )  # fmt: skip

    def _apply_stop(self, stop: Stop, now: float) -> None:
        member = self._members.pop(stop.group_id)
        if stop.replaced:
            self._replaced[stop.reason] += 1
            log.warning("group %s is replaced (%s)", stop.group_id, stop.reason)
            if stop.reason == GPU_UNHEALTHY and member.status.phase is not GroupPhase.READY:
                self._back_off(member.status)
        else:
            self._retired[stop.reason] += 1
        if stop.drain:
            log.info(
                "group %s leaves discovery (%s); stops in %.1f s",
                stop.group_id,
                stop.reason,
                self._drain_s,
            )
            self._draining[stop.group_id] = (member, now + self._drain_s)
        else:
            self._stop_in_background(member, stop.reason)

    def _stop_in_background(self, member: _Member, why: str) -> None:
        gid = member.group.group_id
        assert gid not in self._stopping, f"group {gid} stopped twice"
        self._stopping[gid] = asyncio.create_task(self._stop(member, why))

    async def _stop(self, member: _Member, why: str) -> None:
        gid = member.group.group_id
        try:
            async with asyncio.timeout(self._stop_grace_s + 30.0):
                await member.group.stop(grace_s=self._stop_grace_s)
        except (RayGroupError, TimeoutError, OSError) as exc:
            self._stop_failed_with(member, why, repr(exc))
        except Exception as exc:  # a task nobody awaits: counted, traced, retried
            log.exception("group %s: stop raised", gid)
            self._stop_failed_with(member, why, repr(exc))
        else:
            self._counts["groups_stopped"] += 1
            log.info("group %s stopped (%s)", gid, why)
        finally:
            self._stopping.pop(gid, None)

    def _stop_failed_with(self, member: _Member, why: str, error: str) -> None:
        gid = member.group.group_id
        self._counts["stop_errors"] += 1
        self._stop_failed[gid] = (member, why)
        log.error("group %s: stop failed (%s): %s; retried next round", gid, why, error)

    def _retry_failed_stops(self) -> None:
        for gid, (member, why) in list(self._stop_failed.items()):
            if gid not in self._stopping:
                del self._stop_failed[gid]
                self._stop_in_background(member, why)

    async def _start(self, now: float) -> None:
        self._seq += 1
        gid = f"{self._id_prefix}-{self._seq}"
        template = self._spec.template
        group = self._factory(template, gid)
        status = GroupStatus(gid, GroupPhase.WAITING, template.revision, now)
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await group.start()
        except (RayGroupError, TimeoutError) as exc:  # a timed-out start's thread runs on:
            self._counts["start_errors"] += 1  # the group's stop waits for it
            self._replaced["start_failed"] += 1
            log.error("group %s: start failed (%r); stopping what it made", gid, exc)
            self._back_off(status)
            self._stop_in_background(_Member(group, now, status), "start failed")
            return
        self._counts["groups_started"] += 1
        log.info("group %s started (revision %s)", gid, template.revision)
        self._members[gid] = _Member(group, now, status)

    def _publish(self) -> None:
        entries = [_entry(m.status, m.group.spec) for m in self._members.values() if m.listed]
        self._listed = entries
        if self._discovery is None or entries == self._published:
            return
        try:
            write_discovery(self._discovery, entries)
        except OSError as exc:  # retried next round; the router keeps the last good list
            log.error("cannot write the discovery file %s: %s", self._discovery, exc)
            self._published = None
            return
        self._counts["discovery_writes"] += 1
        self._published = entries
        log.info("discovery: %d ready group(s): %s", len(entries), [e["url"] for e in entries])

    async def run(self, interval_s: float) -> None:
        """Rounds every ``interval_s`` until cancelled."""
        while True:
            started = self._clock()
            await self.reconcile_once()
            await asyncio.sleep(max(0.0, interval_s - (self._clock() - started)))

    # -- views -------------------------------------------------------------------------

    def discovery(self) -> list[dict[str, Any]]:
        """The discovery list as of the last round (``[{"url", "gpus", "gpu_type"?}]``,
        exactly what the file holds when it could be written): what ``shoal engines
        serve`` answers at ``GET /v1/discovery`` for routers that cannot read the file."""
        return [dict(entry, gpus=list(entry["gpus"])) for entry in self._listed]

    def state(self) -> ReplicaState:
        ready = [m.status for m in self._members.values() if m.serving]
        revision = self._spec.template.revision
        pending = sum(
            1
            for m in self._members.values()
            if m.status.phase in (GroupPhase.WAITING, GroupPhase.STARTING)
            and m.status.revision == revision
        )
        return ReplicaState(
            spec=self._spec.replicas,
            ready=len(ready),
            pending=pending,
            endpoints=tuple(s.url for s in ready),
        )

    def status(self) -> list[GroupStatus]:
        """Every group the fleet holds: kept ones as last polled, draining ones and
        those whose stop failed (retried) as ``stopping`` (oldest first)."""
        kept = [m.status for m in self._members.values()]
        leaving = [m for m, _ in self._draining.values()]
        leaving += [m for m, _ in self._stop_failed.values()]
        draining = [replace(m.status, phase=GroupPhase.STOPPING) for m in leaving]
        return sorted(kept + draining, key=lambda s: (s.created, s.group_id))

    def counters(self) -> FleetCounters:
        c = self._counts
        return FleetCounters(
            rounds=c["rounds"],
            groups_started=c["groups_started"],
            groups_stopped=c["groups_stopped"],
            groups_replaced=dict(self._replaced),
            groups_retired=dict(self._retired),
            start_errors=c["start_errors"],
            poll_failures=c["poll_failures"],
            stop_errors=c["stop_errors"],
            updates=c["updates"],
            scales=c["scales"],
            discovery_writes=c["discovery_writes"],
        )

    @property
    def num_stopping(self) -> int:
        """Groups draining, being stopped in the background, or whose stop failed."""
        stopping = set(self._stopping) | set(self._stop_failed)
        return len(self._draining) + len(stopping)

    async def close(self) -> None:
        """Stop every group (draining ones at once, failed stops once more), empty the
        discovery file, and wait for every stop. Groups whose stop fails again are
        logged (and still listed by ``status()``)."""
        members, self._members = list(self._members.values()), {}
        draining, self._draining = [m for m, _ in self._draining.values()], {}
        self._publish()
        for member in members + draining:
            self._stop_in_background(member, "fleet closed")
        await asyncio.gather(*list(self._stopping.values()), return_exceptions=True)
        self._retry_failed_stops()
        await asyncio.gather(*list(self._stopping.values()), return_exceptions=True)
        for gid, (_member, why) in self._stop_failed.items():
            log.error("group %s (%s) could not be stopped; it may hold GPUs", gid, why)
