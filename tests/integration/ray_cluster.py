"""A real Ray cluster on this machine for the engine-group tests (``ray.cluster_utils``).

Each "node" is a real raylet with its own fake resources (``num_gpus``) and a
``shoal.node`` label naming it as the health watcher would. Nodes are added and removed
(``remove_node`` kills the raylet and its workers: a node dying under a group).

Notes from measuring it here: a head plus one node is up in about 4 s and gone in 2 s; an
actor holds 1 CPU *for scheduling* unless it says ``num_cpus=0``, so GPU-only actors on a
1-CPU node must say so or they never place; several clusters can run at once (every port
is picked free). The driver connects with ``ray.init(address=cluster.address)``; the
head has no GPUs, so groups land on added nodes only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.cluster_utils import Cluster

__all__ = ["FAST_NODE_DEATH", "RayTestCluster", "ray_test_cluster"]

# The GCS health-checks every raylet; by default a killed node is marked dead only after
# tens of seconds. These make it a few seconds (period x threshold; not lower: a raylet starved of CPU by
# parallel tests must not be declared dead).
FAST_NODE_DEATH: dict[str, Any] = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


@dataclass
class RayTestCluster:
    cluster: Cluster
    nodes: dict[str, Any] = field(default_factory=dict)  # name -> ray._private.node.Node

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_node(self, name: str, *, gpus: int = 2, cpus: int = 2, **resources: float) -> Any:
        """A node named ``name`` (label ``shoal.node``) with ``gpus`` fake GPUs."""
        node = self.cluster.add_node(
            num_cpus=cpus,
            num_gpus=gpus,
            resources=dict(resources) or None,
            labels={"shoal.node": name},
        )
        self.nodes[name] = node
        return node

    def kill_node(self, name: str) -> None:
        """The node's raylet and everything on it die at once (no graceful shutdown)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)


@contextlib.contextmanager
def ray_test_cluster(
    *, head_cpus: int = 2, system_config: dict[str, Any] | None = None
) -> Iterator[RayTestCluster]:
    """A head (no GPUs) and this process connected as the driver; everything torn down
    on exit, also on failure. ``system_config`` is the head's ``_system_config`` (e.g.
    ``FAST_NODE_DEATH``: the GCS marks a killed node dead in a few seconds)."""
    head_args: dict[str, Any] = {"num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False}
    if system_config:
        head_args["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            yield RayTestCluster(cluster)
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()  # type: ignore[no-untyped-call]
