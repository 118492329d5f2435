"""Prometheus Operator objects: what scrapes each component, and the alerts that matter.

::

    ServiceMonitor  shoal-router (Service shoal-router-admin, port ``admin``),
                    shoal-autoscaler, shoal-health, shoal-engines-fleet (their Services'
                    port ``http``); path /metrics
    PodMonitor      shoal-cache (port ``metrics``), shoal-engine (vLLM's ``http`` /metrics,
                    shoal_connector_* included; the loader sidecar's ``metrics``)
    PrometheusRule  shoal: ALERTS, for the components that are rendered

Every monitor carries ``monitoring.labels`` (what the operator's Prometheus selects
monitors by) and sets ``job`` to a fixed name (``JOBS``) with a relabeling, so the alerts
can name their targets (``up{job="shoal-cache"}``) whatever the namespace and object
names: the operator's default job is the Service's name for a ServiceMonitor but
``NAMESPACE/NAME`` for a PodMonitor.

``ALERTS`` (deploy/components/alerts.py) is a table, not text in the rule, so the contract
checks can verify it: each
alert lists in ``metrics_used`` every Shoal metric its expression reads (by the name
Prometheus stores: counters end in ``_total``), and each of those must exist in the code.
``$MAX_REPLICAS`` in an expression is replaced at render time by the autoscaler's
``max_replicas``, ``$NAMESPACE`` by ``values.namespace``. Each alert's ``runbook_url``
annotation points at its own heading under docs/operations.md#alerts (``RUNBOOK``), named
after the alert.

Two alerts read kube-state-metrics, not Shoal (``kube_daemonset_status_number_unavailable``,
``ShoalCacheDaemonSetUnavailable`` and ``ShoalHealthDaemonSetUnavailable``): a DaemonSet pod
that never starts (Pending, ContainerCreating on a missing mount, rejected) has no scrape
target, so ``up == 0`` cannot see it. kube-prometheus-stack ships kube-state-metrics;
without it these two never fire.

The PodMonitors add a ``node`` label (the pod's node) to every target, so
``ShoalCacheEngineFeedDown`` can compare, node by node, the engines that serve with the
KV-event feeds the node's daemon has: it fires for a node with fewer connected feeds than
running engines (a feed down, or more engines than ``cache.num_event_slots``), never for a
slot nobody uses, nor after a scale-down left one empty.

Rejected: recording rules and dashboards (operators have their own; the metrics are
documented), and alerts on engine internals (vLLM's own metrics have their own mixins).
"""

from __future__ import annotations

from control.autoscale.config import AutoscaleSettings
from deploy import objects
from deploy.components import autoscaler, router
from deploy.components.alerts import ALERTS, RUNBOOK, Alert
from deploy.objects import Obj
from deploy.values import Values

__all__ = ["ALERTS", "JOBS", "RUNBOOK", "Alert", "render"]

INTERVAL = "30s"

# component -> the job label its monitor sets
JOBS = {
    "cache": "shoal-cache",
    "engine": "shoal-engine",
    "loader": "shoal-loader",
    "router": "shoal-router",
    "autoscaler": "shoal-autoscaler",
    "health": "shoal-health",
    "fleet": "shoal-engines-fleet",
}


def _loader_runs(values: Values) -> bool:
    """The sidecar is rendered only with a ``uri`` (deploy.components.engine)."""
    loader = values.engine.loader
    return values.engine.enabled and loader.enabled and bool(loader.uri)


def _alert_on(values: Values, needs: str) -> bool:
    return {
        "cache": values.cache.enabled,
        "cluster": values.cache.enabled and values.cache.cluster.enabled,
        "router": values.router.enabled,
        "autoscaler": values.autoscaler.enabled,
        "health": values.health.enabled,
        "loader": _loader_runs(values),
        "engine_events": values.cache.enabled and values.engine.enabled and values.engine.kv_events,
        "connector": values.cache.enabled and values.engine.enabled and values.engine.connector,
    }[needs]


def _max_replicas(values: Values) -> int:
    merged = autoscaler.settings(values)
    return int(merged.get("max_replicas", AutoscaleSettings().max_replicas))


def _job(name: str) -> list[Obj]:
    return [{"action": "replace", "targetLabel": "job", "replacement": name}]


def _node() -> Obj:
    """The pod's node as label ``node`` (ShoalCacheEngineFeedDown joins on it)."""
    return {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
            "targetLabel": "node"}  # fmt: skip


def _meta(values: Values, name: str, component: str) -> Obj:
    return objects.metadata(values, name, component, extra_labels=values.monitoring.labels)


def _service_monitor(values: Values, component: str, name: str) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(values, name, component),
        "spec": {
            "selector": {"matchLabels": {**objects.selector(component), **(
                router.ADMIN_LABELS if component == "router" else {})}},
            "namespaceSelector": {"matchNames": [values.namespace]},
            "endpoints": [{  # the router's /metrics is on its admin port (router.ADMIN_NAME)
                "port": "admin" if component == "router" else "http", "path": "/metrics",
                "interval": INTERVAL,
                "relabelings": _job(JOBS[component]),
            }],
        },
    }  # fmt: skip


def _endpoint(port: str, job: str) -> Obj:
    relabelings = [*_job(job), _node()]
    return {"port": port, "path": "/metrics", "interval": INTERVAL, "relabelings": relabelings}


def _pod_monitor(values: Values, component: str, name: str, endpoints: list[Obj]) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta(values, name, component),
        "spec": {
            "selector": {"matchLabels": objects.selector(component)},
            "namespaceSelector": {"matchNames": [values.namespace]},
            "podMetricsEndpoints": endpoints,
        },
    }


def service_monitors(values: Values) -> list[Obj]:
    if not values.monitoring.service_monitors:
        return []
    on = (
        ("router", values.router.enabled),
        ("autoscaler", values.autoscaler.enabled),
        ("health", values.health.enabled),
        ("fleet", values.fleet.enabled),
    )
    return [_service_monitor(values, c, JOBS[c]) for c, enabled in on if enabled]


def pod_monitors(values: Values) -> list[Obj]:
    if not values.monitoring.pod_monitors:
        return []
    out = []
    if values.cache.enabled:
        cache = [_endpoint("metrics", JOBS["cache"])]
        out.append(_pod_monitor(values, "cache", "shoal-cache", cache))
    if values.engine.enabled:
        engine = [_endpoint("http", JOBS["engine"])]
        if _loader_runs(values):
            engine.append(_endpoint("metrics", JOBS["loader"]))
        out.append(_pod_monitor(values, "engine", "shoal-engine", engine))
    return out


def rule_group(values: Values) -> list[Obj]:
    """The alerting rules of the components that are rendered."""
    max_replicas = str(_max_replicas(values)) if values.autoscaler.enabled else ""
    rules = []
    for alert in ALERTS:
        if not _alert_on(values, alert.needs):
            continue
        rule: Obj = {
            "alert": alert.name,
            "expr": alert.expr.replace("$MAX_REPLICAS", max_replicas).replace(
                "$NAMESPACE", values.namespace
            ),
            "labels": {"severity": alert.severity},
            "annotations": {
                "summary": alert.summary,
                "description": alert.description,
                "runbook_url": f"{RUNBOOK}#{alert.anchor}",
            },
        }
        if alert.for_ != "0m":  # fire at once: the event itself is the problem
            rule["for"] = alert.for_
        rules.append(rule)
    return rules


def prometheus_rule(values: Values) -> list[Obj]:
    if not values.monitoring.rules:
        return []
    rules = rule_group(values)
    if not rules:
        return []
    return [{
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": _meta(values, "shoal", "monitoring"),
        "spec": {"groups": [{"name": "shoal", "rules": rules}]},
    }]  # fmt: skip


def render(values: Values) -> list[Obj]:
    return [*service_monitors(values), *pod_monitors(values), *prometheus_rule(values)]
