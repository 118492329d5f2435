"""Pure: a GroupSpec -> its placement group's bundles, and what a waiting group waits for.

Invariant: a group's placement group has exactly ``world_size`` bundles, bundle ``i``
holding worker ``i``'s GPUs, bundle 0 also the driver's CPUs; nothing else of the group
asks Ray for resources outside these bundles (the driver and every worker actor are
scheduled *into* a bundle), so "placed" means "the whole engine fits" and a group never
half-starts.

Layout, as vLLM builds it (``vllm/executor/ray_utils.py`` ``initialize_ray_cluster``)::

    bundle 0: {GPU: g, CPU: driver_cpus [, accelerator_type:T: 0.001]}   <- driver + worker 0
    bundle 1: {GPU: g [, accelerator_type:T: 0.001]}                     <- worker 1
    ...
    bundle world-1                                                       <- worker world-1

1. ``g`` is ``spec.gpus_per_worker`` (1 unless fractional GPUs are asked for).
2. ``accelerator_type:T`` is Ray's own per-node resource (``ray start
   --resources='{"accelerator_type:H100": 1}'``, set automatically on real GPU nodes);
   0.001 per bundle pins every bundle to such a node without using the resource up.
3. The driver's bundle. vLLM creates its placement group *from* the driver process, which
   already runs on some node, and pins bundle 0 there with ``node:IP: 0.001``. Shoal
   creates the group before any driver exists and then starts the driver actor *in*
   bundle 0 (``placement_group_bundle_index=0``), so bundle 0 is the driver's node by
   construction and needs no pin: pinning it would tie the whole group to one chosen node
   and make it wait for that node's GPUs when others are free. ``driver_node_ip`` (for a
   caller whose driver does already sit on a node, as vLLM's does) adds the pin.

The "waiting for" message is computed from the cluster's per-node free and total
resources (``NodeResources``), so the user sees which resource is missing and where,
e.g. ``4 bundles of {GPU: 1}: 2 GPUs free on 1 node (node-a); STRICT_SPREAD needs 4 nodes
with a free GPU, 1 has one``. It explains; it does not predict Ray's scheduler (another
pending group may take the capacity first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from control.ray.types import STRATEGIES, WORKER_MODES, GroupSpec

__all__ = ["NodeResources", "bundles_for", "check_spec", "waiting_message"]

ACCELERATOR_SHARE = 0.001  # per bundle: pins to the node type without consuming it


@dataclass(frozen=True, slots=True)
class NodeResources:
    """One alive Ray node: its name (``shoal.node`` label, else hostname) and resources."""

    name: str
    total: Mapping[str, float] = field(default_factory=dict)
    free: Mapping[str, float] = field(default_factory=dict)


def check_spec(spec: GroupSpec) -> None:
    """Raise ValueError naming the fix for a spec no placement group can be built from."""
    if spec.strategy not in STRATEGIES:
        raise ValueError(f"strategy {spec.strategy!r}: use one of {', '.join(STRATEGIES)}")
    if spec.tensor_parallel < 1 or spec.pipeline_parallel < 1:
        raise ValueError(
            f"tensor_parallel={spec.tensor_parallel}, pipeline_parallel="
            f"{spec.pipeline_parallel}: both must be at least 1"
        )
    if spec.gpus_per_worker <= 0:
        raise ValueError(f"gpus_per_worker={spec.gpus_per_worker}: must be above 0")
    if spec.workers not in WORKER_MODES:
        raise ValueError(f"workers {spec.workers!r}: use one of {', '.join(WORKER_MODES)}")
    if spec.workers == "vllm" and spec.gpus_per_worker > 1:
        raise ValueError(  # vllm/v1/executor/ray_utils.py: "bundle cannot have more than 1"
            f"gpus_per_worker={spec.gpus_per_worker:g} with workers='vllm': vLLM's Ray "
            "executor rejects a bundle with more than one GPU: set gpus_per_worker=1 "
            "(or a fraction) and raise tensor_parallel/pipeline_parallel instead"
        )
    if spec.driver_cpus < 0:
        raise ValueError(f"driver_cpus={spec.driver_cpus}: must be 0 or more")


def bundles_for(spec: GroupSpec, *, driver_node_ip: str = "") -> list[dict[str, float]]:
    """The placement group's bundles (see the module docstring's layout)."""
    check_spec(spec)
    bundles: list[dict[str, float]] = []
    for index in range(spec.world_size):
        bundle: dict[str, float] = {"GPU": spec.gpus_per_worker}
        if index == 0:
            if spec.driver_cpus > 0:
                bundle["CPU"] = spec.driver_cpus
            if driver_node_ip:
                bundle[f"node:{driver_node_ip}"] = ACCELERATOR_SHARE
        if spec.accelerator_type:
            bundle[f"accelerator_type:{spec.accelerator_type}"] = ACCELERATOR_SHARE
        bundles.append(bundle)
    return bundles


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _gpu_text(count: float) -> str:
    return f"{_amount(count)} GPU" if count == 1 else f"{_amount(count)} GPUs"


def waiting_message(spec: GroupSpec, nodes: Sequence[NodeResources]) -> str:
    """What the group's placement group waits for, given the alive nodes' resources."""
    g = spec.gpus_per_worker
    world = spec.world_size
    accel = f"accelerator_type:{spec.accelerator_type}" if spec.accelerator_type else ""
    shape = f"{{GPU: {_amount(g)}}}"
    head = f"{_plural(world, 'bundle')} of {shape}"
    if spec.driver_cpus > 0:
        head += f" (the first with {_amount(spec.driver_cpus)} CPU)"
    eligible = [n for n in nodes if not accel or n.total.get(accel, 0.0) > 0]
    with_gpus = [n for n in eligible if n.free.get("GPU", 0.0) >= g]
    free = sum(n.free.get("GPU", 0.0) for n in with_gpus)
    names = ", ".join(n.name for n in with_gpus)
    where = f" ({names})" if names else ""
    parts = [f"{head}: {_gpu_text(free)} free on {_plural(len(with_gpus), 'node')}{where}"]
    if accel:
        verb = "has" if len(eligible) == 1 else "have"
        parts.append(f"{len(eligible)} of {_plural(len(nodes), 'node')} {verb} {accel}")
    if spec.strategy == "STRICT_SPREAD":
        have = len(with_gpus)
        parts.append(
            f"STRICT_SPREAD needs {_plural(world, 'node')} with a free GPU, "
            f"{have} {'has' if have == 1 else 'have'} one"
        )
    elif spec.strategy == "STRICT_PACK":
        most = max((n.free.get("GPU", 0.0) for n in eligible), default=0.0)
        parts.append(
            f"STRICT_PACK needs {_gpu_text(world * g)} on one node, "
            f"the most free on one node is {_amount(most)}"
        )
    else:
        slots = sum(int(n.free.get("GPU", 0.0) // g) for n in eligible)
        parts.append(f"{spec.strategy} needs {_plural(world, 'free GPU slot')}, {slots} free")
    if spec.driver_cpus > 0 and not any(
        n.free.get("CPU", 0.0) >= spec.driver_cpus for n in with_gpus
    ):
        parts.append(f"no node with a free GPU has {_amount(spec.driver_cpus)} CPU free")
    return "; ".join(parts)
