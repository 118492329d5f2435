"""Factories for the autoscaler's values, and a service scaled on virtual time (issue 13).

``observe`` builds one round's ``ScaleInput`` from per-replica values; ``drive`` runs a
policy over a script of rounds; ``VirtualService`` closes the loop (the policy's desired
count is applied, new replicas start after ``start_s``), for tests of what a policy does
over time rather than in one round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from control.autoscale.policies.base import Policy, make_policy
from control.autoscale.types import (
    REQUESTS_RUNNING,
    Decision,
    MetricTarget,
    PolicySpec,
    ReplicaSample,
    ScaleInput,
)

__all__ = ["VirtualService", "drive", "make_spec", "observe", "policy", "sample"]

Values = float | Mapping[str, float]


def make_spec(
    *targets: tuple[str, float],
    min_replicas: int = 1,
    max_replicas: int = 10,
    **options: float | str,
) -> PolicySpec:
    """A spec on ``targets`` (default: 1 running request per replica)."""
    pairs = targets or ((REQUESTS_RUNNING, 1.0),)
    return PolicySpec(
        targets=tuple(MetricTarget(m, t) for m, t in pairs),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        options=options,
    )


def policy(name: str, *targets: tuple[str, float], **kwargs: float | str | int) -> Policy:
    """``make_policy(name, make_spec(...))``."""
    return make_policy(name, make_spec(*targets, **kwargs))  # type: ignore[arg-type]


def sample(index: int, values: Values = 0.0, *, ok: bool = True) -> ReplicaSample:
    """Replica ``r{index}``; a float is the value of ``REQUESTS_RUNNING``."""
    mapping = {REQUESTS_RUNNING: values} if isinstance(values, float | int) else dict(values)
    return ReplicaSample(replica_id=f"r{index}", values=mapping if ok else {}, ok=ok)


def observe(
    now_s: float,
    *,
    ready: int,
    per_replica: Values | Sequence[Values] = 0.0,
    pending: int = 0,
    spec: int | None = None,
    failed: int = 0,
    router: Mapping[str, float] | None = None,
) -> ScaleInput:
    """One round: ``ready`` replicas report ``per_replica`` (one value for all, or one per
    replica), the last ``failed`` of them failed their scrape; ``spec`` defaults to
    ``ready + pending``."""
    if isinstance(per_replica, Sequence):
        values = list(per_replica)
        assert len(values) == ready, "one value per ready replica"
    else:
        values = [per_replica] * ready
    samples = tuple(sample(i, v, ok=i < ready - failed) for i, v in enumerate(values))
    return ScaleInput(
        now_s=now_s,
        spec_replicas=ready + pending if spec is None else spec,
        ready_replicas=ready,
        pending_replicas=pending,
        samples=samples,
        router=dict(router or {}),
    )


def drive(
    subject: Policy, times: Iterable[float], round_at: Callable[[float], ScaleInput]
) -> list[Decision]:
    """The policy's decisions for ``round_at(t)`` at each ``t``, in order."""
    return [subject.decide(round_at(t)) for t in times]


class VirtualService:
    """Replicas scaled by a policy on virtual time.

    ``load`` is the service-wide total of the metric (e.g. 6 running requests); each ready
    replica reports ``load / ready``. The desired count is applied at once: extra replicas
    are pending for ``start_s`` and then ready; removals take pending replicas first.
    """

    def __init__(
        self,
        subject: Policy,
        *,
        ready: int,
        metric: str = REQUESTS_RUNNING,
        start_s: float = 0.0,
        now_s: float = 0.0,
    ) -> None:
        self.policy = subject
        self.metric = metric
        self.start_s = start_s
        self.now_s = now_s
        self.ready = ready
        self.starting: list[float] = []  # ready-at times of pending replicas
        self.decisions: list[Decision] = []

    @property
    def spec(self) -> int:
        return self.ready + len(self.starting)

    def step(
        self,
        load: float,
        *,
        dt_s: float = 1.0,
        failed: bool = False,
        router: Mapping[str, float] | None = None,
    ) -> Decision:
        self.ready += sum(1 for t in self.starting if t <= self.now_s)
        self.starting = [t for t in self.starting if t > self.now_s]
        per = load / self.ready if self.ready else 0.0
        round_ = observe(
            self.now_s,
            ready=self.ready,
            per_replica={self.metric: per},
            pending=len(self.starting),
            failed=self.ready if failed else 0,
            router=router,
        )
        decision = self.policy.decide(round_)
        self.decisions.append(decision)
        if decision.desired > self.spec:
            self.starting += [self.now_s + self.start_s] * (decision.desired - self.spec)
        while decision.desired < self.spec:
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1
        self.now_s += dt_s
        return decision

    def run(self, load: float, seconds: float, **kwargs: float | bool) -> list[Decision]:
        end_s = self.now_s + seconds
        out = []
        while self.now_s < end_s - 1e-9:
            out.append(self.step(load, **kwargs))  # type: ignore[arg-type]
        return out
