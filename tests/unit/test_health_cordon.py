"""Which checks cordon the node, and the dry run (no API client is ever made)."""

from __future__ import annotations

import asyncio

from control.health.cordon import Cordoner, decide
from control.health.metrics import HealthMetrics
from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity


def gpu(index: int, *problems: tuple[Severity, Remedy]) -> GpuHealth:
    return GpuHealth(index, f"GPU-{index}", tuple(Problem("x", s, "d", r) for s, r in problems))


CRIT, WARN = Severity.CRITICAL, Severity.WARNING


def test_only_a_critical_drain_node_remedy_cordons() -> None:
    health = NodeHealth(
        "node-a",
        1.0,
        (
            gpu(0, (WARN, Remedy.DRAIN_NODE)),  # a warning changes nothing
            gpu(1, (CRIT, Remedy.RESET_GPU)),  # one GPU's reset: the fleet moves off it
            gpu(2, (CRIT, Remedy.RESET_GPU), (CRIT, Remedy.DRAIN_NODE)),
            gpu(3),
            gpu(4, (CRIT, Remedy.DRAIN_NODE)),
        ),
        (Problem("nvml", CRIT, "NVML lost"),),  # node-level: never cordons
    )
    assert decide(health) == (2, 4)
    # a GPU that cannot be read is reset_gpu, but counts toward the cordon
    unread = GpuHealth(
        5, "", (Problem("unreadable", CRIT, "handle: Unknown Error", Remedy.RESET_GPU),)
    )
    assert decide(NodeHealth("node-a", 1.0, (gpu(0), unread))) == (5,)
    assert decide(NodeHealth("node-a", 1.0, (gpu(0),), (Problem("nvml", CRIT, "x"),))) == ()


def test_the_dry_run_logs_and_counts_once_and_makes_no_client() -> None:
    metrics = HealthMetrics()

    def no_client() -> object:
        raise AssertionError("a dry run must not talk to the API server")

    cordoner = Cordoner("node-a", apply=False, metrics=metrics, api_client_factory=no_client)
    assert cordoner.after_checks == 3  # the default
    sick = NodeHealth("node-a", 1.0, (gpu(0, (CRIT, Remedy.DRAIN_NODE)),))
    fine = NodeHealth("node-a", 1.0, (gpu(0),))

    async def body() -> list[str | None]:
        results = [await cordoner.observe(r) for r in (fine, sick, sick, fine, sick, sick)]
        results.append(await cordoner.observe(sick))  # the third in a row
        results.append(await cordoner.observe(sick))
        await cordoner.close()
        return results

    # a blip (two bad checks, then a good one) does nothing; three in a row act once
    assert asyncio.run(body()) == [None, None, None, None, None, None, "dry_run", None]
    get = metrics.registry.get_sample_value
    assert get("shoal_gpu_cordon_actions_total", {"result": "dry_run"}) == 1.0
    assert get("shoal_gpu_cordon_actions_total", {"result": "applied"}) == 0.0


def test_the_streak_is_per_gpu_and_an_unreadable_gpu_cordons_only_when_it_persists() -> None:
    metrics = HealthMetrics()
    cordoner = Cordoner("node-a", apply=False, metrics=metrics, after_checks=2)
    unread = Problem("unreadable", CRIT, "handle: Unknown Error", Remedy.RESET_GPU)
    zero = NodeHealth("node-a", 1.0, (GpuHealth(0, "", (unread,)), gpu(1)))
    one = NodeHealth("node-a", 1.0, (gpu(0), gpu(1, (CRIT, Remedy.DRAIN_NODE))))

    async def body() -> list[str | None]:
        # gpu0, then gpu1, then gpu0: no GPU twice in a row; then gpu0 twice
        return [await cordoner.observe(r) for r in (zero, one, zero, zero)]

    assert asyncio.run(body()) == [None, None, None, "dry_run"]
