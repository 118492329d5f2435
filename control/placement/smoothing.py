"""Plan smoothing between solves: scale up at once, scale down late, move between types rarely.

The solver answers each round's optimum for that round's workload; acted on raw, a fleet
would flap: a few long requests in one window move replicas to the big GPU type, the next
window moves them back, and each move costs engine starts (a vLLM replica takes tens of
seconds to get ready) for a saving of a few percent. ``Smoother.smooth`` turns the
sequence of optima into replica targets in two steps:

1. **Hysteresis on the mix.** The new optimum replaces the mix in force (the last mix
   adopted, not the stabilised targets of step 2) only when it is at least
   ``min_saving`` (a fraction, e.g. 0.05) cheaper than that mix, *or* that mix no longer
   serves the workload. Whether it serves is asked of the caller (``fit``: the solver
   with the counts of the mix as availability caps; ``None`` when infeasible), so this
   module stays pure and needs no capacity model of its own. When the mix is kept, the
   plan to serve is ``fit``'s answer: the current counts, with the cells' shares spread
   over them (the router must not send traffic to a type the fleet does not run).
2. **Stabilisation per GPU type** (Kubernetes HPA's ``scaleDown.stabilizationWindowSeconds``):
   the target of a type is the largest count any adopted mix asked for within the last
   ``scale_down_delay_s`` (``t >= now - delay``). A larger count takes effect in the
   round it appears; a smaller one only once it has held for the whole delay. A move
   between types therefore runs both pools for one delay: the new type starts at once,
   the old one drains after the delay, and the targets always serve every mix adopted
   within the window (they are at least each of them, type by type).

Invariants: ``targets[g] >= mix[g]`` for every type (never below what the adopted mix
needs); with ``scale_down_delay_s = 0`` and ``min_saving = 0`` the targets are exactly
each round's optimum (given a truthful ``fit``: an optimum is never dearer than a mix that
serves); time is the caller's (``now_s``, monotonic seconds), never read here.
A round without an optimum (the solver failed) does not call ``smooth``: the planner keeps
the last targets, so a failing solver never scales anything down.

Rejected: smoothing the rate before solving (an EWMA of the request rate lags scale-up
exactly when it matters, and does nothing against mix flapping at a steady rate); a
per-type cool-down after every change (AIBrix's optimizer has none and flaps; a cool-down
also delays scale-up, which a max over a window does not); comparing costs of the
*stabilised* targets (during a move they hold both mixes, so the old mix would always
look expensive and every small saving would pass).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from control.placement.types import Plan

__all__ = ["Smoothed", "Smoother", "mix_cost"]


def mix_cost(gpus: Mapping[str, int], costs: Mapping[str, float]) -> float:
    """What ``gpus`` replicas cost per hour at ``costs`` (a type without a cost is free)."""
    return sum(n * costs.get(gpu, 0.0) for gpu, n in gpus.items())


@dataclass(frozen=True, slots=True)
class Smoothed:
    """One round's answer: the plan to serve, the mix adopted, the targets to act on.

    ``reason``: ``"first"`` (no mix in force yet), ``"adopted"`` (the optimum replaced the
    mix: saving at least ``min_saving``), ``"unchanged"`` (the optimum is the mix),
    ``"scale-up"`` (the optimum has at least the mix's count of every type: adopted
    without asking ``fit``), ``"no-longer-serves"`` (the mix in force cannot serve the
    workload: the optimum replaced it whatever its saving), ``"held"`` (the optimum saves less than
    ``min_saving``; the mix stays). ``delayed`` lists the types whose target stays above
    the mix because a larger count is still within the scale-down delay.
    """

    plan: Plan
    mix: Mapping[str, int]
    targets: Mapping[str, int]
    reason: str
    saving: float | None = None  # (cost(mix in force) - cost(optimum)) / cost(mix in force)
    delayed: tuple[str, ...] = field(default=())


class Smoother:
    """Keeps the mix in force and the adopted mixes of the last ``scale_down_delay_s``."""

    def __init__(
        self,
        gpus: tuple[str, ...],
        costs: Mapping[str, float],
        *,
        scale_down_delay_s: float = 300.0,
        min_saving: float = 0.05,
    ) -> None:
        assert scale_down_delay_s >= 0, f"scale_down_delay_s={scale_down_delay_s} < 0"
        assert 0 <= min_saving < 1, f"min_saving={min_saving} is not a fraction in [0, 1)"
        self.gpus = gpus
        self.costs = dict(costs)
        self.scale_down_delay_s = scale_down_delay_s
        self.min_saving = min_saving
        self.mix: dict[str, int] | None = None  # the mix in force
        self._adopted: deque[tuple[float, dict[str, int]]] = deque()  # (now_s, mix), oldest first

    def _full(self, gpus: Mapping[str, int]) -> dict[str, int]:
        return {gpu: int(gpus.get(gpu, 0)) for gpu in self.gpus}

    def smooth(
        self,
        now_s: float,
        optimum: Plan,
        fit: Callable[[Mapping[str, int]], Plan | None],
    ) -> Smoothed:
        """The targets after this round's ``optimum``; ``fit(mix)`` answers the plan that
        serves this round's workload within ``mix`` (``None``: it cannot). ``fit`` is
        called at most once, only when the optimum is cheaper by less than ``min_saving``
        (or dearer) and does not merely add replicas."""
        proposed = self._full(optimum.gpus)
        plan, reason, saving = optimum, "adopted", None
        if self.mix is None:
            reason = "first"
        elif proposed == self.mix:
            reason = "unchanged"
        elif all(proposed[gpu] >= self.mix[gpu] for gpu in self.gpus):
            reason = "scale-up"  # more of some type, less of none: nothing to weigh
        else:
            current_cost = mix_cost(self.mix, self.costs)
            new_cost = mix_cost(proposed, self.costs)
            saving = (current_cost - new_cost) / current_cost if current_cost > 0 else None
            if saving is not None and saving < self.min_saving:
                held = fit(self.mix)
                if held is None:
                    reason = "no-longer-serves"
                else:
                    plan, reason = self._held_plan(held), "held"
                    proposed = dict(self.mix)
        self.mix = proposed
        return self._stabilised(now_s, plan, reason, saving)

    def seed(self, now_s: float, running: Mapping[str, int]) -> None:
        """Take the replicas already running as the mix in force, adopted at ``now_s``: a
        restarted planner weighs its first optimum against the fleet it finds, and scales
        that fleet down only after the delay (never at once on an empty first window)."""
        assert self.mix is None, "seed() before the first smooth()"
        self.mix = self._full(running)
        self._adopted.append((now_s, dict(self.mix)))

    def wake(self, now_s: float, gpu: str, n: int) -> None:
        """A wake from zero: at least ``n`` of ``gpu`` joins the mix in force, adopted at
        ``now_s``, so the following rounds (whose window is still empty: nothing could
        finish) keep it for the scale-down delay instead of undoing it at once."""
        assert self.mix is not None, "seed() before wake()"
        self.mix = {**self.mix, gpu: max(self.mix.get(gpu, 0), n)}
        self._adopted.append((now_s, dict(self.mix)))

    def _held_plan(self, fitted: Plan) -> Plan:
        assert self.mix is not None
        return replace(fitted, gpus=dict(self.mix), cost=mix_cost(self.mix, self.costs))

    def _window(self, now_s: float) -> dict[str, int]:
        while self._adopted and self._adopted[0][0] < now_s - self.scale_down_delay_s:
            self._adopted.popleft()
        return {gpu: max(mix[gpu] for _, mix in self._adopted) for gpu in self.gpus}

    def _stabilised(self, now_s: float, plan: Plan, reason: str, saving: float | None) -> Smoothed:
        assert self.mix is not None
        self._adopted.append((now_s, dict(self.mix)))
        targets = self._window(now_s)
        delayed = tuple(gpu for gpu in self.gpus if targets[gpu] > self.mix[gpu])
        return Smoothed(plan, dict(self.mix), targets, reason, saving, delayed)
