"""PodDisruptionBudgets and NetworkPolicies: what may take a pod away, and who may dial it.

PodDisruptionBudgets (``pod_disruption_budgets``), each ``maxUnavailable: 1``:

* the router: with N replicas a drain may take one at a time; ``maxUnavailable`` rather
  than ``minAvailable`` so a single-replica router can still be drained (a budget that
  allows nothing blocks ``kubectl drain`` forever).
* the engines: a restarted engine is minutes of model loading and an empty GPU prefix
  cache; a drain of several GPU nodes at once (an upgrade, a scale-down) must not take
  every replica of a model in the same minute, so engines leave one at a time and the
  router moves their traffic meanwhile. The budget selects this Deployment's pods
  (``engine.engine_selector``, with the instance label): another engine Deployment or the
  Ray fleet's engines have budgets of their own, not a share of this one.
* none for the DaemonSets (the cache daemon, the health watcher). A budget gates only
  the Eviction API; a DaemonSet's rolling update deletes pods without asking it, and node
  drains leave DaemonSet pods alone (``kubectl drain --ignore-daemonsets``, the cluster
  autoscaler's and Karpenter's drains), since the controller would put them straight back.
  Where a drain does evict the cache daemon, its node is leaving: the arena dies with it
  and the preStop drain hands hot blocks to peers either way, so holding the eviction
  back protects nothing and would stall a multi-node drain behind it. Node-pressure
  evictions ignore budgets anyway.

NetworkPolicies (``network_policies``), ingress only, selecting each component's pods by
``objects.selector`` and naming ports by name (a named port a pod lacks matches nothing),
except the loader sidecar's metrics port, given by number (9501 unless its settings say
otherwise): it is declared on a native sidecar, an *init* container, whose named ports
several CNIs do not resolve (Calico before 3.28.1, projectcalico/calico#8881), which would
drop its scrapes silently::

    cache       cluster, stream   <- cache pods (+ router pods, reserved for
                                     router.precise, which the render refuses today)
                metrics           <- the monitoring namespace
    engine      http              <- router, autoscaler (scrapes), fleet, monitoring
                9501              <- monitoring (the loader sidecar's metrics, when it has one)
    redis       redis             <- router
    autoscaler  http              <- router (wakes), monitoring
    health      http              <- router, fleet (GPU reports), monitoring
    fleet       http              <- autoscaler (target ray:URL), router (/v1/discovery),
                                     monitoring
    router      http              <- anywhere: it is the API
                admin             <- autoscaler (scrapes /metrics), monitoring
                cluster, stream   <- cache and router pods (reserved for router.precise,
                                     which the render refuses today)

Peers are pods of this namespace (``podSelector``) and the monitoring namespace by its
``kubernetes.io/metadata.name`` label; rules name only components that are rendered.
Assumptions: the pods are on the pod network (a hostNetwork pod is outside every policy,
and its peers' node addresses match no podSelector), and the kubelet's probes come from
the node, which the common CNIs (Calico, Cilium) always allow.

Rejected: egress policies. Every pod needs DNS (kube-dns, by label in kube-system), the
engines and the loader reach object stores and model hubs at addresses no selector
names, and the controllers call the API server, whose address is the node's or a cloud
endpoint (not a pod): an egress policy that allows all of that is either wide open or
breaks on the first cluster that differs, so egress is left to the operator's own policy.
"""

from __future__ import annotations

from typing import Any

from deploy import objects
from deploy.components import engine
from deploy.values import Values

__all__ = ["network_policies", "pod_disruption_budgets", "render"]

Obj = dict[str, Any]


def _pdb(values: Values, name: str, component: str, pods: dict[str, str]) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": objects.metadata(values, name, component),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": pods}},
    }


def pod_disruption_budgets(values: Values) -> list[Obj]:
    if not values.pod_disruption_budgets:
        return []
    out = []
    if values.router.enabled:
        out.append(_pdb(values, "shoal-router", "router", objects.selector("router")))
    if values.engine.enabled:  # this Deployment's pods only, not every engine's
        out.append(_pdb(values, values.engine.name, "engine", engine.engine_selector(values)))
    return out


def _pods(component: str) -> Obj:
    return {"podSelector": {"matchLabels": objects.selector(component)}}


def _namespace(name: str) -> Obj:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _ports(*names: str | int) -> list[Obj]:
    return [{"port": name, "protocol": "TCP"} for name in names]


def _rule(ports: list[Obj], peers: list[Obj] | None) -> Obj | None:
    """An ingress rule; ``peers=None`` admits every source, ``[]`` none (no rule at all:
    an empty ``from`` would admit every source)."""
    if peers is None:
        return {"ports": ports}
    return {"ports": ports, "from": peers} if peers else None


def _policy(values: Values, name: str, component: str, rules: list[Obj | None]) -> Obj:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": objects.metadata(values, name, component),
        "spec": {
            "podSelector": {"matchLabels": objects.selector(component)},
            "policyTypes": ["Ingress"],
            "ingress": [rule for rule in rules if rule is not None],
        },
    }


def _fleet_on(values: Values) -> bool:
    return values.fleet.enabled


def _redis_on(values: Values) -> bool:
    return values.redis.enabled and not values.redis.url


def network_policies(values: Values) -> list[Obj]:
    if not values.network_policies:
        return []

    def monitoring() -> Obj:
        return _namespace(values.monitoring.namespace)

    def peers(*components: str) -> list[Obj]:
        on = {
            "cache": values.cache.enabled,
            "router": values.router.enabled,
            "autoscaler": values.autoscaler.enabled,
            "fleet": _fleet_on(values),
        }
        return [_pods(c) for c in components if on[c]]

    out = []
    members = ("cache", "router") if values.router.precise else ("cache",)
    if values.cache.enabled:
        out.append(
            _policy(values, "shoal-cache", "cache", [
                _rule(_ports("cluster", "stream"), peers(*members)),
                _rule(_ports("metrics"), [monitoring()]),
            ])
        )  # fmt: skip
    if values.engine.enabled:
        rules: list[Obj | None] = [
            _rule(_ports("http"), [*peers("router", "autoscaler", "fleet"), monitoring()])
        ]
        loader_port = engine.loader_metrics_port(values)
        if loader_port:  # by number: see the module docstring
            rules.append(_rule(_ports(loader_port), [monitoring()]))
        out.append(_policy(values, values.engine.name, "engine", rules))
    if _redis_on(values):
        out.append(_policy(values, "shoal-redis", "redis", [
            _rule(_ports("redis"), peers("router")),
        ]))  # fmt: skip
    if values.autoscaler.enabled:
        out.append(_policy(values, "shoal-autoscaler", "autoscaler", [
            _rule(_ports("http"), [*peers("router"), monitoring()]),
        ]))  # fmt: skip
    if values.health.enabled:
        out.append(_policy(values, "shoal-health", "health", [
            _rule(_ports("http"), [*peers("router", "fleet"), monitoring()]),
        ]))  # fmt: skip
    if _fleet_on(values):
        out.append(_policy(values, "shoal-engines-fleet", "fleet", [
            _rule(_ports("http"), [*peers("autoscaler", "router"), monitoring()]),
        ]))  # fmt: skip
    if values.router.enabled:
        rules = [
            _rule(_ports("http"), None),
            _rule(_ports("admin"), [*peers("autoscaler"), monitoring()]),
        ]
        if values.router.precise and values.cache.enabled:
            rules.append(_rule(_ports("cluster", "stream"), peers(*members)))
        out.append(_policy(values, "shoal-router", "router", rules))
    return out


def render(values: Values) -> list[Obj]:
    return [*pod_disruption_budgets(values), *network_policies(values)]
