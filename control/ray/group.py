"""RayEngineGroup: one engine instance over tp x pp GPUs in one Ray placement group.

Invariant: a group either holds its whole placement group or nothing. Actors are started
only once Ray reports the placement group CREATED (every bundle reserved), so a group that
cannot be placed before ``wait_deadline_s`` has started nothing, and its placement group
is removed; a group that fails later (node, worker or driver lost, engine exited or
unhealthy, start timeout) is FAILED with a reason at once and tears itself down in the
background (engine stopped, actors killed, placement group removed). vLLM cannot heal
a lost Ray worker (vllm #16259), so a failure is final: the fleet replaces the group.

Life cycle (``poll()`` advances it; nothing runs between polls)::

    start(): placement_group(bundles_for(spec), strategy, name=group_id)   -> WAITING
    WAITING:  placement group CREATED?
                yes: driver actor in bundle 0, a stand-in worker per bundle
                     (workers="vllm": a GPU probe task per bundle)         -> STARTING
                no:  waiting_for from the node table; past the deadline:
                     placement group removed            -> FAILED capacity_timeout
    STARTING: every bundle's worker/probe answered (its node, its GPU ids)
                -> the driver runs the engine command ({port} {host} {model} {tp}
                   {pp} {group} {placement_group}: the placement group's id, hex)
              engine GET /health == 200                                    -> READY
              (not within ready_timeout_s after placement    -> FAILED start_timeout)
    STARTING/READY, every poll: placement group not CREATED (Ray is rescheduling a lost
              node's bundles) or a group node dead in the node table -> node_died;
              an actor ping fails -> node_died if that actor's node is dead (GCS, or its
              raylet refuses connections), else worker_died / driver_died;
              the engine process exited -> engine_exited (code, log tail)
    READY, every poll: engine GET /health (HEALTH_TIMEOUT_S); UNHEALTHY_POLLS failures
              in a row -> engine_unhealthy (the process lives, but does not serve)

Node death is read from Ray's own state, not only from the engine's health: the
placement group table (RESCHEDULING once the GCS marks the node dead), ``ray.nodes()``,
and, since the GCS notices a dead node only after its health checks fail (seconds to
tens of seconds; tune with ``health_check_period_ms`` / ``health_check_failure_threshold``),
a TCP probe of the node's raylet when one of its actors stops answering: a refused or
unanswered raylet port means the node is gone, and the reason is ``node_died`` rather
than the actor's death that the node's loss caused.

The actors belong to the process that created them (not detached): if that process dies,
Ray kills them, and the engine dies with its driver (``actors.py``). ``poll()`` never
raises for the group's own failure, only ``RayUnavailable`` when the cluster itself
cannot be reached.

Concurrency: blocking Ray calls run in two bounded thread pools of this module, not
asyncio's default one: ``POLL_THREADS`` for starts and polls, ``STOP_THREADS`` for
teardowns, so stops (each up to its grace) cannot starve the polls of the other groups
(``size_pools(max_groups)``: ``shoal engines serve`` sizes both for its largest fleet).
One operation runs on a group at a time, and its *thread's completion* ends it: the
group's lock is released by the thread's done-callback, not when the caller stops
waiting (a caller's timeout cancels the wait, never the thread, so a second thread can
never run beside it on the same group). Each thread applies its own outcome (a poll's
failure sets FAILED, ``start`` records the placement group) so nothing is lost when its
caller gave up. A failure found by a poll sets FAILED at once and the teardown runs as a
background task (the poll returns promptly). A READY group's engine ``/health`` is read
every poll; ``UNHEALTHY_POLLS`` failures in a row fail the group ``engine_unhealthy``.
Teardown steps are each guarded (engine stop, actor kills, placement group removal): a
Ray error in one is logged and the rest still run; ``stop()`` raises ``RayUnavailable``
only when the placement group could not be removed (the caller retries). Rejected:
awaiting ObjectRefs directly (the placement group table and node table reads have no
async form, so a pool is needed anyway; one mechanism for every call).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from control.ray.actors import EngineDriver, StandinWorker, bundle_probe
from control.ray.bundles import NodeResources, bundles_for, waiting_message
from control.ray.errors import RayUnavailable
from control.ray.types import GroupPhase, GroupSpec, GroupStatus

__all__ = ["RayEngineGroup", "connect", "size_pools"]

T = TypeVar("T")

log = logging.getLogger("shoal." + __name__)

PING_TIMEOUT_S = 5.0  # an actor that does not answer a trivial call in this long is lost
HEALTH_TIMEOUT_S = 2.0
RAYLET_PROBE_TIMEOUT_S = 1.0
FAILURE_GRACE_S = 2.0  # engine SIGTERM grace when the group tears itself down on failure
UNHEALTHY_POLLS = 3  # a READY engine whose /health fails this many polls in a row failed
# One thread per group polled at once (a fleet of up to POLL_THREADS groups polls all of
# them in parallel); teardowns have their own pool, so slow stops cannot hold the threads
# the polls need. ``size_pools`` raises both to the fleet's most groups.
POLL_THREADS = 32
STOP_THREADS = 16
_sizes = {"poll": POLL_THREADS, "stop": STOP_THREADS}
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def size_pools(max_groups: int) -> None:
    """Size the poll and stop pools for a fleet of at most ``max_groups`` groups (each
    can be polled, or stopped, at once: ``close()`` stops them all). Never shrinks them;
    threads are created only when needed. A pool already used is replaced (its running
    calls finish in their threads)."""
    with _pools_lock:
        for kind in ("poll", "stop"):
            if max_groups > _sizes[kind]:
                _sizes[kind] = max_groups
                old = _pools.pop(kind, None)
                if old is not None:
                    old.shutdown(wait=False)


def _pool(kind: str) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        if kind not in _pools:
            _pools[kind] = concurrent.futures.ThreadPoolExecutor(_sizes[kind], f"shoal-ray-{kind}")
        return _pools[kind]


_Driver: Any = ray.remote(max_restarts=0)(EngineDriver)
_Worker: Any = ray.remote(max_restarts=0)(StandinWorker)
_probe: Any = ray.remote(max_retries=0)(bundle_probe)


def connect(address: str | None) -> None:
    """``ray.init`` once per process (``None``: a local or ``RAY_ADDRESS`` cluster). An
    address with no cluster behind it fails only after Ray's own GCS connect timeout
    (about a minute; ``RAY_gcs_rpc_server_reconnect_timeout_s`` shortens it)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, RayError) as exc:
        raise RayUnavailable(f"cannot connect to Ray at {address or 'auto'}: {exc}") from exc


def _nodes_by_id() -> dict[str, dict[str, Any]]:
    return {str(node["NodeID"]): node for node in ray.nodes()}  # type: ignore[no-untyped-call]


def _name_of(node: dict[str, Any]) -> str:
    """The node's ``shoal.node`` label, else the hostname Ray recorded for it (Ray takes
    it from ``socket.gethostname()`` on that node: control.health.types.default_node_name,
    the watcher's default too), else its node id."""
    labels = node.get("Labels") or {}
    return str(labels.get("shoal.node") or node.get("NodeManagerHostname") or node["NodeID"])


def _raylet_answers(node: dict[str, Any]) -> bool:
    try:
        with socket.create_connection(
            (str(node["NodeManagerAddress"]), int(node["NodeManagerPort"])),
            timeout=RAYLET_PROBE_TIMEOUT_S,
        ):
            return True
    except OSError:
        return False


def _all_done(refs: list[Any]) -> bool:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(done) == len(refs)


class _Failure(Exception):
    """Internal: the group failed with ``reason`` (caught in poll, never escapes)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class RayEngineGroup:
    def __init__(
        self, spec: GroupSpec, group_id: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.spec = spec
        self.group_id = group_id
        self._bundles = bundles_for(spec)  # raises ValueError for a bad spec, before Ray
        self._clock = clock
        self._created = clock()
        self._placed_at = 0.0
        self._phase = GroupPhase.WAITING
        self._pg: PlacementGroup | None = None
        self._driver: Any = None
        self._workers: list[Any] = []
        self._where_refs: list[Any] = []  # workers' (or probes') where(), bundle order
        self._engine_ref: Any = None  # the driver's start_engine() while pending
        self._pg_hex = ""
        self._actor_nodes: dict[int, str] = {}  # actor slot (-1 driver, i worker) -> node id
        self._node_ids: tuple[str, ...] = ()
        self._url = ""
        self._nodes: tuple[str, ...] = ()
        self._gpus: tuple[str, ...] = ()
        self._waiting_for = ""
        self._reason = ""
        self._detail = ""
        self._lost_node = ""  # a node found dead: its actors are not asked to stop
        self._unhealthy_polls = 0  # READY: /health failures in a row
        self._torn_down = False
        self._teardown_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def status(self) -> GroupStatus:
        return GroupStatus(
            group_id=self.group_id,
            phase=self._phase,
            revision=self.spec.revision,
            created=self._created,
            url=self._url,
            nodes=self._nodes,
            gpus=self._gpus,
            waiting_for=self._waiting_for if self._phase is GroupPhase.WAITING else "",
            reason=self._reason,
            detail=self._detail,
        )

    async def start(self) -> None:
        """Ask Ray for the placement group and return; ``poll()`` does the rest. The
        thread records the placement group itself: a caller that gives up waiting leaves
        it recorded, so ``stop()`` (which waits for that thread) removes it."""
        assert self._pg is None, f"group {self.group_id} started twice"
        self._created = self._clock()
        await self._locked("poll", self._start_sync)

    async def poll(self) -> GroupStatus:
        if self._pg is None or self._phase not in (
            GroupPhase.WAITING,
            GroupPhase.STARTING,
            GroupPhase.READY,
        ):
            return self.status()
        await self._locked("poll", self._poll_sync)
        return self.status()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Engine SIGTERM (SIGKILL after ``grace_s``), actors killed, placement group
        removed. Idempotent; a failed group is torn down and stays FAILED. Raises
        ``RayUnavailable`` when the placement group could not be removed (retry)."""
        await self._locked("stop", self._stop_sync, grace_s)

    # -- one operation at a time, ended by its thread ----------------------------------

    async def _locked(self, kind: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the ``kind`` pool, holding the group's lock until the thread
        ends, not until the caller stops waiting (module docstring)."""
        await self._lock.acquire()
        try:
            future = asyncio.get_running_loop().run_in_executor(_pool(kind), fn, *args)
        except BaseException:
            self._lock.release()
            raise
        future.add_done_callback(self._finished)
        return await asyncio.shield(future)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._lock.release()
        if not future.cancelled():
            future.exception()  # retrieved: a caller still waiting gets it through shield
        if (
            self._phase is GroupPhase.FAILED
            and self._pg is not None
            and not self._torn_down
            and self._teardown_task is None
        ):
            self._teardown_task = asyncio.get_running_loop().create_task(
                self._teardown_in_background()
            )

    async def _teardown_in_background(self) -> None:
        try:
            await self._locked("stop", self._stop_sync, FAILURE_GRACE_S)
        except RayUnavailable as exc:  # stop() (the fleet's) tries again
            log.warning("group %s: teardown after failure incomplete: %s", self.group_id, exc)
        except Exception:  # a task nobody awaits: logged, and stop() tries again
            log.exception("group %s: teardown after failure raised", self.group_id)

    # -- the operations (sync, in a pool thread, under the lock) -----------------------

    def _start_sync(self) -> None:
        try:
            pg = placement_group(self._bundles, strategy=self.spec.strategy, name=self.group_id)
        except RayError as exc:
            raise RayUnavailable(f"group {self.group_id}: placement group: {exc}") from exc
        self._pg, self._pg_hex = pg, pg.id.hex()
        log.info(
            "group %s: placement group asked: %s %s",
            self.group_id,
            self.spec.strategy,
            self._bundles,
        )

    def _poll_sync(self) -> None:
        if self._phase not in (GroupPhase.WAITING, GroupPhase.STARTING, GroupPhase.READY):
            return  # a stop or a failure came first
        try:
            self._advance()
        except _Failure as failure:
            log.warning("group %s failed (%s): %s", self.group_id, failure.reason, failure.detail)
            self._reason, self._detail = failure.reason, failure.detail
            self._phase = GroupPhase.FAILED  # before the teardown (_finished schedules it)
        except RayError as exc:
            raise RayUnavailable(f"group {self.group_id}: Ray failed: {exc}") from exc

    def _stop_sync(self, grace_s: float) -> None:
        if self._phase not in (GroupPhase.STOPPED, GroupPhase.FAILED):
            self._phase = GroupPhase.STOPPING
        self._teardown(grace_s)  # raises RayUnavailable: the phase stays, stop is retried
        self._torn_down = True
        if self._phase is GroupPhase.STOPPING:
            self._phase = GroupPhase.STOPPED
            log.info("group %s stopped", self.group_id)

    # -- the life cycle (sync, in a thread) ------------------------------------------------

    def _advance(self) -> None:
        assert self._pg is not None, "poll before start"
        if self._phase is GroupPhase.WAITING:
            self._wait_for_placement(self._pg)
            return
        self._check_alive(self._pg)
        if self._phase is GroupPhase.STARTING:
            self._wait_for_engine()
        elif self._healthy():
            self._unhealthy_polls = 0
        else:
            self._unhealthy_polls += 1
            if self._unhealthy_polls >= UNHEALTHY_POLLS:
                raise _Failure(
                    "engine_unhealthy",
                    f"GET {self._url}/health failed {self._unhealthy_polls} polls in a row",
                )

    def _wait_for_placement(self, pg: PlacementGroup) -> None:
        table = placement_group_table(pg)
        if table.get("state") == "CREATED":
            self._placed_at = self._clock()
            self._node_ids = tuple(
                str(table["bundles_to_node_id"][i]) for i in range(len(self._bundles))
            )
            nodes = _nodes_by_id()
            self._nodes = tuple(_name_of(nodes[n]) if n in nodes else n for n in self._node_ids)
            self._launch(pg)
            self._phase = GroupPhase.STARTING
            log.info(
                "group %s placed on %s after %.1f s",
                self.group_id,
                ",".join(self._nodes),
                self._placed_at - self._created,
            )
            return
        self._waiting_for = waiting_message(self.spec, self._cluster_resources())
        waited = self._clock() - self._created
        if waited >= self.spec.wait_deadline_s:
            raise _Failure(
                "capacity_timeout",
                f"not placed in {self.spec.wait_deadline_s:g} s: {self._waiting_for}",
            )

    @staticmethod
    def _cluster_resources() -> list[NodeResources]:
        free = ray._private.state.available_resources_per_node()  # type: ignore[no-untyped-call]
        return [
            NodeResources(
                name=_name_of(node),
                total=dict(node.get("Resources") or {}),
                free=dict(free.get(str(node["NodeID"]), {})),
            )
            for node in ray.nodes()  # type: ignore[no-untyped-call]
            if node.get("Alive")
        ]

    def _launch(self, pg: PlacementGroup) -> None:
        spec = self.spec

        def in_bundle(index: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(
                placement_group=pg,
                placement_group_bundle_index=index,
                placement_group_capture_child_tasks=True,
            )

        self._driver = _Driver.options(
            num_cpus=spec.driver_cpus, num_gpus=0, scheduling_strategy=in_bundle(0)
        ).remote()
        for index in range(len(self._bundles)):
            options = {
                "num_cpus": 0,
                "num_gpus": spec.gpus_per_worker,
                "scheduling_strategy": in_bundle(index),
            }
            if spec.workers == "standin":
                worker = _Worker.options(**options).remote()
                self._workers.append(worker)
                self._where_refs.append(worker.where.remote())
            else:  # vLLM places its own workers; a probe task reads each bundle's GPUs
                self._where_refs.append(_probe.options(**options).remote())

    def _start_engine(self) -> None:
        """Once every bundle's worker (or probe) answered: the engine command, on the
        driver. Not earlier: a vLLM engine would take the bundles' GPUs from the probes."""
        spec = self.spec
        values = {
            "model": spec.model,
            "tp": str(spec.tensor_parallel),
            "pp": str(spec.pipeline_parallel),
            "group": self.group_id,
            "placement_group": self._pg_hex,
        }
        self._engine_ref = self._driver.start_engine.remote(
            spec.engine_command, values, dict(spec.env)
        )

    def _wait_for_engine(self) -> None:
        if self._where_refs and _all_done(self._where_refs):
            self._take_where()
            self._start_engine()
        if self._engine_ref is not None and _all_done([self._engine_ref]):
            self._take_engine()
        if self._url and self._healthy():
            self._phase = GroupPhase.READY
            log.info(
                "group %s ready at %s after %.1f s placed",
                self.group_id,
                self._url,
                self._clock() - self._placed_at,
            )
            return
        if self._clock() - self._placed_at >= self.spec.ready_timeout_s:
            raise _Failure(
                "start_timeout",
                f"engine not healthy {self.spec.ready_timeout_s:g} s after placement"
                + (f" at {self._url}" if self._url else " (actors not started)"),
            )

    def _take_where(self) -> None:
        refs, self._where_refs = self._where_refs, []
        gpus: list[str] = []
        for index, ref in enumerate(refs):
            try:
                where = ray.get(ref)
            except RayError as exc:  # the worker (or probe) or its node lost
                raise self._actor_lost(index, exc) from exc
            self._actor_nodes[index] = str(where["node_id"])
            gpus += [f"{where['node_name']}/gpu{i}" for i in where["gpu_ids"]]
        self._gpus = tuple(gpus)

    def _take_engine(self) -> None:
        ref, self._engine_ref = self._engine_ref, None
        try:
            started = ray.get(ref)
        except RayTaskError as exc:
            raise _Failure("engine_exited", f"engine command failed to start: {exc}") from exc
        except RayActorError as exc:
            raise self._actor_lost(-1, exc) from exc
        self._actor_nodes[-1] = str(started["node_id"])
        self._url = f"http://{started['host']}:{started['port']}"
        log.info(
            "group %s: engine pid %s at %s, GPUs %s",
            self.group_id,
            started["pid"],
            self._url,
            ",".join(self._gpus),
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self._url + "/health", timeout=HEALTH_TIMEOUT_S) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
            return False  # refused, timed out, not HTTP (BadStatusLine), a bad URL

    def _check_alive(self, pg: PlacementGroup) -> None:
        state = placement_group_table(pg).get("state")
        nodes = _nodes_by_id()
        for node_id, name in zip(self._node_ids, self._nodes, strict=True):
            node = nodes.get(node_id)
            if node is None or not node.get("Alive"):
                self._lost_node = node_id
                raise _Failure("node_died", f"node {name} ({node_id[:12]}) is dead in Ray")
        if state != "CREATED":
            raise _Failure("node_died", f"placement group is {state}: a node of it was lost")
        if self._where_refs or self._engine_ref is not None:
            return  # still starting: their answers come through _wait_for_engine
        pings = {-1: self._driver.engine_state.remote()}
        for index, worker in enumerate(self._workers):
            pings[index] = worker.ping.remote()
        for slot, ref in pings.items():
            try:
                answer = ray.get(ref, timeout=PING_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as exc:
                raise self._actor_lost(slot, exc) from exc
            if slot == -1 and answer["returncode"] is not None:
                raise _Failure(
                    "engine_exited",
                    f"engine exited with {answer['returncode']}; log tail:\n{answer['log_tail']}",
                )

    def _actor_lost(self, slot: int, exc: BaseException) -> _Failure:
        """An actor's death, blamed on its node when the node is gone."""
        node_id = self._actor_nodes.get(slot) or self._node_ids[max(slot, 0)]
        node = _nodes_by_id().get(node_id)
        name = _name_of(node) if node else node_id[:12]
        if node is None or not node.get("Alive") or not _raylet_answers(node):
            self._lost_node = node_id
            return _Failure("node_died", f"node {name} ({node_id[:12]}) is gone: {exc}")
        who = "driver" if slot == -1 else f"worker {slot}"
        reason = "driver_died" if slot == -1 else "worker_died"
        return _Failure(reason, f"{who} on {name} lost: {type(exc).__name__}: {exc}")

    def _teardown(self, grace_s: float) -> None:
        """Engine stopped, actors killed, placement group removed; safe to repeat. Each
        step is guarded: a Ray error is logged and the next step still runs; the
        placement group removal is always attempted, and its failure raises
        ``RayUnavailable`` (removing it also kills any actor left in it)."""
        driver, workers = self._driver, list(self._workers)
        # the driver sits in bundle 0: its node is known even before it answered
        driver_node = self._actor_nodes.get(-1) or (self._node_ids[0] if self._node_ids else "")
        if driver is not None and driver_node != self._lost_node:
            try:
                ray.get(driver.stop_engine.remote(grace_s), timeout=grace_s + 10.0)
            except (RayActorError, GetTimeoutError) as exc:
                log.info(
                    "group %s: driver gone before stop (%s); the engine dies with it",
                    self.group_id,
                    type(exc).__name__,
                )
            except RayError as exc:
                log.warning("group %s: engine stop failed: %r", self.group_id, exc)
        for actor in [driver, *workers]:
            if actor is None:
                continue
            try:
                ray.kill(actor, no_restart=True)
            except (RayError, ValueError) as exc:  # ValueError: not an actor handle
                log.warning("group %s: actor kill failed: %r", self.group_id, exc)
        self._driver, self._workers = None, []
        self._where_refs, self._engine_ref = [], None
        if self._pg is None:
            return
        try:
            if placement_group_table(self._pg).get("state") != "REMOVED":
                remove_placement_group(self._pg)
        except (RayError, ConnectionError) as exc:
            raise RayUnavailable(
                f"group {self.group_id}: placement group {self._pg_hex} not removed: {exc!r}"
            ) from exc
