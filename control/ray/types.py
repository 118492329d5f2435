"""Values that cross the Ray modules (frozen, slotted; STYLE.md §4).

An engine group is one engine instance over ``tensor_parallel x pipeline_parallel`` GPUs
(vLLM's world size), in one Ray placement group: one ``{GPU: 1}`` bundle per worker, the
first also holding the driver's CPUs, as vLLM lays it out. ``GroupStatus`` is what a
group reports each poll; ``FleetSpec`` is what a fleet of identical groups should be.

Phases::

    waiting --placed--> starting --engine /health 200--> ready --stop--> stopping -> stopped
       |                   |                               |
       +--deadline-------->+--node/actor died, engine exit-+--> failed (reason)

``reason`` (failed only): ``capacity_timeout``, ``node_died``, ``worker_died``,
``driver_died``, ``engine_exited``, ``start_timeout``, ``gpu_unhealthy``,
``engine_unhealthy`` (a ready engine's /health failed several polls in a row),
``unreachable`` (the fleet got no status from the group several rounds in a row).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "FAILURE_REASONS",
    "STRATEGIES",
    "WORKER_MODES",
    "FleetSpec",
    "GroupPhase",
    "GroupSpec",
    "GroupStatus",
]

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
FAILURE_REASONS = (
    "capacity_timeout",
    "node_died",
    "worker_died",
    "driver_died",
    "engine_exited",
    "start_timeout",
    "gpu_unhealthy",
    "engine_unhealthy",
    "unreachable",
)

WORKER_MODES = ("standin", "vllm")


class GroupPhase(enum.StrEnum):
    WAITING = "waiting"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One engine group's template. ``engine_command`` is run by the driver actor with
    ``{port}``, ``{model}``, ``{tp}``, ``{pp}`` replaced; ``accelerator_type`` adds Ray's
    ``accelerator_type:T`` resource to every bundle (the node must advertise it).
    ``revision`` names the template (the fleet's rolling update replaces groups whose
    revision differs)."""

    model: str
    engine_command: str
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    strategy: str = "PACK"
    accelerator_type: str = ""
    driver_cpus: float = 1.0
    gpus_per_worker: float = 1.0
    wait_deadline_s: float = 600.0  # elastic wait for capacity, then CapacityTimeout
    ready_timeout_s: float = 900.0  # placed -> engine /health 200
    gpu_type: str = ""  # the router's and placement plan's GPU type name
    env: Mapping[str, str] = field(default_factory=dict)
    revision: str = "1"
    # "standin": one stand-in worker actor per bundle records where vLLM's workers would
    # sit (CPU tests); "vllm": no stand-ins, vLLM places its own workers in the group
    # (control/ray/vllm.py)
    workers: str = "standin"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


@dataclass(frozen=True, slots=True)
class GroupStatus:
    group_id: str
    phase: GroupPhase
    revision: str = "1"
    created: float = 0.0  # the fleet's monotonic clock
    url: str = ""  # the engine's base URL once starting
    nodes: tuple[str, ...] = ()  # node names, bundle order (first = driver's)
    gpus: tuple[str, ...] = ()  # NODE/gpuI of every worker, bundle order
    waiting_for: str = ""  # while waiting: what capacity is missing
    reason: str = ""  # when failed: one of FAILURE_REASONS
    detail: str = ""  # human-readable: the error, the exit code, the node


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """``replicas`` groups of ``template``. A rolling update keeps at most
    ``replicas + max_surge`` groups and at least ``replicas - max_unavailable`` ready."""

    template: GroupSpec
    replicas: int = 1
    max_surge: int = 1
    max_unavailable: int = 0
