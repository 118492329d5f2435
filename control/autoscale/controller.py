"""The control loop: actuator state -> scrape -> policy -> actuator, one round per interval.

One round::

    state    = await actuator.state()                 # spec, ready, pending, endpoints
    samples  = await scraper.scrape(state.endpoints)  # + scraper.scrape_router()
    decision = policy.decide(ScaleInput(...))
    await actuator.scale(decision.desired)            # unless --dry-run or unchanged
    log one structured line; update shoal_autoscale_*

Invariants:

* ``min_replicas <= desired <= max_replicas`` for every decision acted on, whatever the
  policy answered (a policy holding at ``spec`` on unknown metrics must still start the
  first replica of a fresh target);
* the loop never dies of its target: an ``ActuatorError`` in ``state()`` or ``scale()`` is
  logged, counted (``shoal_autoscale_actuator_errors_total``) and the round holds; the next
  round tries again. A failed scrape is an unknown sample (``scrape.py``), not an error.
  Any exception from ``policy.decide`` (a policy bug, arithmetic on a value it did not
  expect) is logged with its traceback, counted (``shoal_autoscale_policy_errors_total``)
  and the round holds at ``spec`` (bounds still applied).
* time and sleeping are injected (``clock``, ``sleep``), so tests drive rounds on virtual
  time with the memory actuator; the policy sees ``now_s`` from the same clock.
* a wake (``POST /v1/wake``, the router holding a request for a model with no engine)
  scales to ``max(1, min_replicas)`` at once when nothing is ready or pending; it does not
  wait for the next round (scale from zero costs one engine start, not a round more).
  Rounds and wakes take one lock, so they never interleave ``state``/``scale`` calls.
  Wakes are cheap to send (any client of the router can make one per made-up model name),
  so they are cheap to answer: with ``model`` set, a wake for another model raises
  ``WrongModel`` (HTTP 404) without touching the target; a wake within one interval of
  the last state read answers from that state (no ``state()`` call: three API calls on
  Kubernetes); and at most one wake is in flight: concurrent ones share its answer
  instead of queueing on the lock.

Rejected: running the policy in the scrape's callback (rounds would follow scrape
latency, not the interval); scaling on every wake (one held request must not scale a
running fleet: the policy owns every decision but the first replica).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, TextIO

from control.autoscale.actuators.base import Actuator
from control.autoscale.config import AutoscaleSettings, policy_spec, read_token
from control.autoscale.errors import ActuatorError, WrongModel
from control.autoscale.metrics import AutoscaleMetrics
from control.autoscale.policies.base import Policy, make_policy
from control.autoscale.types import Decision, ReplicaSample, ReplicaState, ScaleInput
from shoal.errors import ConfigError

__all__ = ["Controller", "RoundRecord", "make_actuator", "serve"]

log = logging.getLogger("shoal." + __name__)


class Source(Protocol):
    """What the controller reads metrics from (``scrape.Scraper``; a fake in unit tests)."""

    num_failures: int

    async def scrape(self, endpoints: Iterable[str]) -> tuple[ReplicaSample, ...]: ...

    async def scrape_router(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round, as the decision log and ``/status`` show it. ``decision`` is ``None``
    when the actuator's state could not be read (the round held)."""

    now_s: float
    state: ReplicaState | None
    decision: Decision | None
    scaled: bool = False  # scale() was called (not a dry run, desired changed)
    error: str = ""
    num_failed_scrapes: int = 0
    router: dict[str, float] | None = None
    samples: tuple[ReplicaSample, ...] = ()

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["samples"] = [
            {"replica_id": s.replica_id, "ok": s.ok, "values": dict(s.values)} for s in self.samples
        ]
        if self.state is not None:
            out["state"]["endpoints"] = list(self.state.endpoints)
        if self.decision is not None:
            out["decision"]["per_metric"] = dict(self.decision.per_metric)
        return out


class Controller:
    def __init__(
        self,
        policy: Policy,
        actuator: Actuator,
        source: Source,
        *,
        interval_s: float = 2.0,
        min_replicas: int = 1,
        max_replicas: int | None = None,
        dry_run: bool = False,
        target: str = "",
        model: str = "",
        policy_name: str = "",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        out: TextIO | None = None,
        history: int = 20,
    ) -> None:
        self.policy = policy
        self.actuator = actuator
        self.source = source
        self.interval_s = interval_s
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.dry_run = dry_run
        self.target = target
        self.model = model
        self.policy_name = policy_name or getattr(policy, "name", type(policy).__name__)
        self.metrics = AutoscaleMetrics()
        self._clock = clock
        self._sleep = sleep
        self._out = out
        self._lock = asyncio.Lock()
        self._failures_seen = 0
        self.last_state: ReplicaState | None = None
        self._state_at: float | None = None  # clock() when last_state was read
        self._waking: asyncio.Task[int] | None = None  # the one wake in flight
        self.history: deque[RoundRecord] = deque(maxlen=history)

    async def run_round(self) -> RoundRecord:
        """One round; never raises for the target's or the engines' failures."""
        async with self._lock:
            started = self._clock()
            record = await self._round(started)
            self.metrics.round_seconds.observe(max(0.0, self._clock() - started))
        self.history.append(record)
        self._log(record)
        return record

    async def _round(self, now: float) -> RoundRecord:
        try:
            state = await self.actuator.state()
        except ActuatorError as exc:
            self.metrics.actuator_errors.inc()
            return RoundRecord(now, None, None, error=f"state: {exc}")
        self._remember(state)
        samples, router = await asyncio.gather(
            self.source.scrape(state.endpoints), self.source.scrape_router()
        )
        self._count_scrape_failures()
        observation = ScaleInput(
            now_s=now,
            spec_replicas=state.spec,
            ready_replicas=state.ready,
            pending_replicas=state.pending,
            samples=samples,
            router=router,
        )
        error = ""
        try:
            decision = self._bounded(self.policy.decide(observation))
        except Exception as exc:  # a policy bug must not end the loop (the invariant)
            log.exception(
                "policy %s failed; holding at %d this round", self.policy_name, state.spec
            )
            self.metrics.policy_errors.inc()
            error = f"policy: {type(exc).__name__}: {exc}"
            held = Decision(desired=state.spec, recommendation=None, reason="policy error")
            decision = self._bounded(held)
        self.metrics.observe(state, decision)
        failed = observation.num_failed
        if self.dry_run or decision.desired == state.spec:
            return RoundRecord(now, state, decision, False, error, failed, router, samples)
        try:
            await self.actuator.scale(decision.desired)
        except ActuatorError as exc:
            self.metrics.actuator_errors.inc()
            error = "; ".join(filter(None, (error, f"scale: {exc}")))
            return RoundRecord(now, state, decision, False, error, failed, router, samples)
        return RoundRecord(now, state, decision, True, error, failed, router, samples)

    def _bounded(self, decision: Decision) -> Decision:
        """The bounds again, after the policy: a policy that holds on unknown metrics keeps
        ``spec`` as is, and a fresh target at 0 below ``min_replicas`` would never start."""
        low, high = self.min_replicas, self.max_replicas
        if decision.desired < low:
            return replace(decision, desired=low, bounds=decision.bounds or "min-replicas")
        if high is not None and decision.desired > high:
            return replace(decision, desired=high, bounds=decision.bounds or "max-replicas")
        return decision

    def _count_scrape_failures(self) -> None:
        total = self.source.num_failures
        if total > self._failures_seen:
            self.metrics.scrape_failures.inc(total - self._failures_seen)
        self._failures_seen = total

    def _log(self, record: RoundRecord) -> None:
        if record.decision is None or record.state is None:
            log.warning("round held: %s", record.error)
            if self._out is not None:
                print(json.dumps({"now_s": record.now_s, "error": record.error}), file=self._out)
            return
        d, s = record.decision, record.state
        fields = {
            "spec": s.spec,
            "ready": s.ready,
            "pending": s.pending,
            "recommendation": d.recommendation,
            "desired": d.desired,
            "per_metric": dict(d.per_metric),
            "panic": d.panic,
            "bounds": d.bounds,
            "reason": d.reason,
            "failed_scrapes": record.num_failed_scrapes,
            "router": record.router or {},
            "scaled": record.scaled,
            "dry_run": self.dry_run,
        }
        log.info(
            "decision desired=%d (spec %d, ready %d, pending %d) recommendation=%s per_metric=%s "
            "panic=%s bounds=%s reason=%s%s",
            d.desired, s.spec, s.ready, s.pending, d.recommendation, dict(d.per_metric),
            d.panic, d.bounds or "-", d.reason, f" error={record.error}" if record.error else "",
            extra={"decision": fields},
        )  # fmt: skip
        if self._out is not None:
            line = {"now_s": round(record.now_s, 3), **fields}
            print(json.dumps(line, default=str), file=self._out, flush=True)

    def _remember(self, state: ReplicaState) -> None:
        self.last_state = state
        self._state_at = self._clock()

    def _fresh_state(self) -> ReplicaState | None:
        """The last state read if it is less than one interval old, else ``None``."""
        if self._state_at is None or self._clock() - self._state_at >= self.interval_s:
            return None
        return self.last_state

    async def wake(self, model: str = "") -> int:
        """Scale from zero at once if nothing is ready or starting; the desired count.
        ``WrongModel`` for a model other than ``self.model`` (when set)."""
        if self.model and model and model != self.model:
            self.metrics.wakes.labels(result="wrong-model").inc()
            raise WrongModel(f"this controller scales model {self.model}, not {model}")
        desired = max(1, self.min_replicas)
        cached = self._fresh_state()
        if cached is not None and (cached.ready + cached.pending > 0 or cached.spec >= desired):
            self.metrics.wakes.labels(result="cached").inc()
            return cached.spec
        if self._waking is None or self._waking.done():
            self._waking = asyncio.ensure_future(self._wake(model, desired))
        return await asyncio.shield(self._waking)  # one in flight; the others share it

    async def _wake(self, model: str, desired: int) -> int:
        async with self._lock:
            state = self._fresh_state()
            if state is None:
                try:
                    state = await self.actuator.state()
                except ActuatorError as exc:
                    self.metrics.actuator_errors.inc()
                    raise ActuatorError(f"wake for {model or 'the model'}: {exc}") from exc
                self._remember(state)
            if state.ready + state.pending > 0 or state.spec >= desired:
                self.metrics.wakes.labels(result="already").inc()
                return state.spec
            log.info("wake for %s: scaling from zero to %d", model or "the model", desired)
            if not self.dry_run:
                try:
                    await self.actuator.scale(desired)
                except ActuatorError:
                    self.metrics.actuator_errors.inc()
                    raise
                self._remember(replace(state, spec=desired, pending=desired - state.ready))
            self.metrics.wakes.labels(result="scaled").inc()
            self.metrics.desired.set(desired)
            return desired

    def status(self) -> dict[str, Any]:
        state = self.last_state
        return {
            "target": self.target,
            "policy": self.policy_name,
            "dry_run": self.dry_run,
            "interval_s": self.interval_s,
            "replicas": (
                {"spec": state.spec, "ready": state.ready, "pending": state.pending}
                if state is not None
                else None
            ),
            "endpoints": list(state.endpoints) if state is not None else [],
            "decisions": [record.as_json() for record in self.history],
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            started = self._clock()
            await self.run_round()
            delay = max(0.0, self.interval_s - (self._clock() - started))
            sleeper = asyncio.ensure_future(self._sleep(delay))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleeper, stopper):
                task.cancel()


def make_actuator(settings: AutoscaleSettings) -> Actuator:
    """The actuator ``--target`` names; a bad target raises ``ConfigError`` naming the forms."""
    target = settings.target
    if target == "memory":
        from control.autoscale.actuators.memory import MemoryActuator

        return MemoryActuator(settings.min_replicas)
    if target == "local":
        from control.autoscale.actuators.local import LocalActuator

        if not settings.engine_command or "{port}" not in settings.engine_command:
            raise ConfigError(
                "--target local needs --engine-command with {port} in it, e.g. "
                "'shoal sim engine --port {port}'"
            )
        return LocalActuator(
            settings.engine_command,
            discovery_file=settings.discovery_file,
            ready_timeout_s=settings.engine_ready_timeout_s,
            drain_s=settings.drain_s,
            kill_grace_s=settings.engine_stop_grace_s,
        )
    if target.startswith("ray:"):
        from control.autoscale.actuators.ray import RayFleetActuator

        url = target.removeprefix("ray:")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--target {target!r}: use ray:URL with the engines daemon's URL, e.g. "
                "ray:http://127.0.0.1:8093"
            )
        token = (
            read_token(settings.target_token_file, "--target-token-file")
            if settings.target_token_file
            else None
        )
        return RayFleetActuator(url, token)
    kind, _, name = target.partition("/")
    if kind in ("deployment", "statefulset") and name:
        from control.autoscale.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(
            kind, name, namespace=settings.namespace, engine_port=settings.engine_port
        )
    raise ConfigError(
        f"--target {target!r}: use deployment/NAME, statefulset/NAME, local, ray:URL or memory"
    )


async def _serve(settings: AutoscaleSettings) -> int:
    from control.autoscale.scrape import Scraper
    from control.autoscale.server import start_server

    spec = policy_spec(settings)
    policy = make_policy(settings.policy, spec)
    actuator = make_actuator(settings)
    source = Scraper(
        timeout_s=settings.scrape_timeout_s, router_url=settings.router_url, model=settings.model
    )
    controller = Controller(
        policy,
        actuator,
        source,
        interval_s=settings.interval_s,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        dry_run=settings.dry_run,
        target=settings.target,
        model=settings.model,
        policy_name=settings.policy,
        out=sys.stdout if settings.dry_run else None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        if settings.port:
            token = read_token(settings.auth_token_file) if settings.auth_token_file else None
            runner = await start_server(controller, settings.host, settings.port, token)
        log.info(
            "autoscaler running: policy %s, target %s, every %.1f s%s",
            settings.policy, settings.target, settings.interval_s,
            " (dry run)" if settings.dry_run else "",
        )  # fmt: skip
        await controller.run(stop)
    finally:
        log.info("autoscaler stopping")
        if runner is not None:
            await runner.cleanup()
        await source.close()
        await actuator.close()
    return 0


def serve(settings: AutoscaleSettings) -> int:
    """Run the controller until SIGTERM/SIGINT; the exit code (0 on a clean stop)."""
    if not settings.target:
        raise ConfigError(
            "--target is required: deployment/NAME, statefulset/NAME, local, ray:URL, memory"
        )
    return asyncio.run(_serve(settings))
