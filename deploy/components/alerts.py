"""The alerts of the PrometheusRule ``shoal`` (deploy/components/monitoring.py), as a table.

Invariant: each alert lists in ``metrics_used`` every Shoal metric its expression reads (by
the name Prometheus stores: counters end in ``_total``), and each exists in the code; the
contract checks (deploy/checks) and docs/operations.md's alert list (deploy/operations_doc.py)
read this table, which is why it is data and not text in the rule. Expressions name targets
by the fixed ``job`` labels the monitors set (monitoring.JOBS); ``$MAX_REPLICAS`` and
``$NAMESPACE`` are filled in at render time. ``needs`` says what must be rendered for an
alert to be in the rule; ``RUNBOOK`` + ``#anchor`` is its ``runbook_url``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ALERTS", "RUNBOOK", "Alert"]

RUNBOOK = "docs/operations.md"


@dataclass(frozen=True, slots=True)
class Alert:
    name: str
    expr: str
    for_: str  # the rule's ``for``
    severity: str  # critical (act now) or warning (act today)
    summary: str
    metrics_used: tuple[str, ...]  # every shoal_* name in expr, as Prometheus stores it
    description: str
    needs: str  # what must be rendered: cache, cluster, router, autoscaler, health, loader,
    #             engine_events (KV events on), connector (the engines' connector on)

    @property
    def anchor(self) -> str:
        """The alert's heading anchor in docs/operations.md (a heading named after it)."""
        return self.name.lower()


ALERTS: tuple[Alert, ...] = (
    Alert(
        name="ShoalCacheDaemonDown",
        expr='up{job="shoal-cache"} == 0',
        for_="5m",
        severity="critical",
        summary="Cache daemon {{ $labels.pod }} does not answer scrapes",
        metrics_used=(),
        description=(
            "The engines on its node cannot save or load KV blocks (they recompute prefixes) "
            "and its cluster peers lose its blocks. Check the pod's events and logs (an OOM "
            "kill: the arena, DRAM tier and staging must fit the memory limit)."
        ),
        needs="cache",
    ),
    Alert(
        name="ShoalCacheChecksumFailures",
        expr="increase(shoal_kvcache_checksum_failures_total[15m]) > 0",
        for_="0m",
        severity="warning",
        summary="Cache daemon {{ $labels.pod }} dropped blocks with bad checksums",
        metrics_used=("shoal_kvcache_checksum_failures_total",),
        description=(
            "Stored KV blocks failed their checksum and were dropped (served as misses, never "
            "as data). Repeated failures point at memory or disk corruption on the node, or "
            "a writer that does not follow the block layout."
        ),
        needs="cache",
    ),
    Alert(
        name="ShoalCacheNoSpace",
        expr="rate(shoal_kvcache_no_space_total[10m]) > 0",
        for_="15m",
        severity="warning",
        summary="Cache daemon {{ $labels.pod }} keeps refusing reservations for lack of space",
        metrics_used=("shoal_kvcache_no_space_total",),
        description=(
            "Writers were refused slots for 15 minutes: every slot is leased or reserved. The "
            "arena is too small for the engines' working set, or leases are not released "
            "(compare shoal_kvcache_leases and shoal_kvcache_reservations with capacity)."
        ),
        needs="cache",
    ),
    Alert(
        name="ShoalCacheIOErrors",
        expr="increase(shoal_kvcache_io_errors_total[15m]) > 0",
        for_="0m",
        severity="warning",
        summary="Cache daemon {{ $labels.pod }} has SSD tier I/O errors",
        metrics_used=("shoal_kvcache_io_errors_total",),
        description=(
            "SSD tier reads or writes failed and the blocks involved were dropped (misses, "
            "not errors). The disk behind ssd_dir is failing or full."
        ),
        needs="cache",
    ),
    Alert(
        name="ShoalCacheEngineFeedDown",
        expr=(
            'count by (node) (up{job="shoal-engine"} == 1) > sum by (node) '
            '(shoal_kvcache_engine_connected{job="shoal-cache"})'
        ),
        for_="10m",
        severity="warning",
        summary="Node {{ $labels.node }} runs more engines than its cache daemon hears from",
        metrics_used=("shoal_kvcache_engine_connected",),
        description=(
            "An engine on this node publishes no KV events the daemon receives: lookups and "
            "the router do not know what it holds on its GPU (prefix-aware routing degrades "
            "to the daemons' tiers). A feed is down, or the node runs more engines than "
            "cache.num_event_slots."
        ),
        needs="engine_events",
    ),
    Alert(
        name="ShoalCacheDaemonSetUnavailable",
        expr=(
            'kube_daemonset_status_number_unavailable{namespace="$NAMESPACE",'
            'daemonset="shoal-cache"} > 0'
        ),
        for_="15m",
        severity="critical",
        summary="{{ $value }} node(s) have no available cache daemon (kube-state-metrics)",
        metrics_used=(),
        description=(
            "A cache daemon pod is not available: Pending, stuck creating, or crash-looping. "
            "Engine pods on such a node wait (their host directories do not exist) or serve "
            "without the cache. Needs kube-state-metrics."
        ),
        needs="cache",
    ),
    Alert(
        name="ShoalHealthDaemonSetUnavailable",
        expr=(
            'kube_daemonset_status_number_unavailable{namespace="$NAMESPACE",'
            'daemonset="shoal-health"} > 0'
        ),
        for_="15m",
        severity="warning",
        summary="{{ $value }} GPU node(s) have no available health watcher (kube-state-metrics)",
        metrics_used=(),
        description=(
            "A GPU health watcher pod is not available, so that node's GPU faults go unseen "
            "(no cordon, no report to the router). Needs kube-state-metrics."
        ),
        needs="health",
    ),
    Alert(
        name="ShoalCacheClusterPeerMissing",
        expr=(
            'shoal_kvcache_cluster_members{job="shoal-cache"} '
            '< scalar(count(up{job="shoal-cache"} == 1)) - 1'
        ),
        for_="10m",
        severity="warning",
        summary="Cache daemon {{ $labels.pod }} sees fewer peers than there are daemons",
        metrics_used=("shoal_kvcache_cluster_members",),
        description=(
            "A running member is missing from this daemon's view: a partition, a member that "
            "cannot authenticate (keys), or a NetworkPolicy dropping the cluster or stream "
            "port. Blocks on the missing member are not found from here."
        ),
        needs="cluster",
    ),
    Alert(
        name="ShoalCacheClusterUnauthorized",
        expr=(
            "increase(shoal_kvcache_cluster_messages_dropped_total"
            '{reason=~"impersonation|forbidden"}[10m]) > 0'
        ),
        for_="0m",
        severity="critical",
        summary="Cache daemon {{ $labels.pod }} dropped cluster messages: {{ $labels.reason }}",
        metrics_used=("shoal_kvcache_cluster_messages_dropped_total",),
        description=(
            "A peer sent messages in another member's name (impersonation) or asked for what "
            "its key does not allow (forbidden). A stale or leaked key, or a misconfigured "
            "member: see the daemon's log for the key and the operation."
        ),
        needs="cluster",
    ),
    Alert(
        name="ShoalRouterNoEngine",
        expr=(
            'sum by (job) (rate(shoal_router_rejected_total{reason="no_engine_available"}[5m])) > 0'
        ),
        for_="5m",
        severity="critical",
        summary="The router answers 503: no healthy engine serves a requested model",
        metrics_used=("shoal_router_rejected_total",),
        description=(
            "Requests are refused because no healthy engine lists their model: engines down, "
            "discovery finding none, every GPU reported unhealthy, or a scale from zero that "
            "did not come (see ShoalAutoscalerActuatorErrors)."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalRouterDown",
        expr='up{job="shoal-router"} == 0',
        for_="5m",
        severity="critical",
        summary="Router replica {{ $labels.pod }} does not answer scrapes",
        metrics_used=(),
        description=(
            "Clients behind the router's Service reach the other replicas; with every replica "
            "down the API is down."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalRouterErrorRate",
        expr=(
            'sum by (job) (rate(shoal_router_requests_total{status=~"5.."}[5m])) '
            "/ sum by (job) (rate(shoal_router_requests_total[5m])) > 0.05"
        ),
        for_="10m",
        severity="warning",
        summary="Over 5% of the router's answers are 5xx",
        metrics_used=("shoal_router_requests_total",),
        description=(
            "Engines failing (shoal_router_upstream_errors_total by engine and kind), "
            "timeouts, or requests refused for want of engines."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalRouterEngineBreakerOpen",
        expr="max by (engine) (shoal_router_breaker_state) == 2",
        for_="5m",
        severity="warning",
        summary="Engine {{ $labels.engine }} has been cut off by the router's circuit breaker",
        metrics_used=("shoal_router_breaker_state",),
        description=(
            "The router stopped sending requests to this engine after repeated failures and "
            "its probes keep failing: the engine is up (discovery lists it) but does not "
            "serve. Check its logs; a restart of that pod usually clears it."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalRouterSharedStateDegraded",
        expr="max by (part) (shoal_router_shared_state_degraded) == 1",
        for_="5m",
        severity="warning",
        summary="Router replicas cannot reach Redis ({{ $labels.part }})",
        metrics_used=("shoal_router_shared_state_degraded",),
        description=(
            "Each replica decides on its own view: in-flight counts and rate limits are per "
            "replica until Redis answers again."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalRouterRequestsHeld",
        expr="sum by (model) (shoal_router_held_requests) > 0",
        for_="5m",
        severity="warning",
        summary="Requests for {{ $labels.model }} wait for a first engine",
        metrics_used=("shoal_router_held_requests",),
        description=(
            "Scale from zero is not producing an engine: requests are held until "
            "hold_timeout_s and then answered 503."
        ),
        needs="router",
    ),
    Alert(
        name="ShoalAutoscalerAtMaxReplicas",
        expr="max(shoal_autoscale_desired_replicas) >= $MAX_REPLICAS",
        for_="15m",
        severity="warning",
        summary="The autoscaler has wanted its maximum replicas for 15 minutes",
        metrics_used=("shoal_autoscale_desired_replicas",),
        description=(
            "Load would take more engines than max_replicas allows: latency SLOs are at risk. "
            "Raise autoscaler max_replicas (and check there are GPUs for them) or shed load."
        ),
        needs="autoscaler",
    ),
    Alert(
        name="ShoalAutoscalerDown",
        expr='up{job="shoal-autoscaler"} == 0',
        for_="5m",
        severity="warning",
        summary="The autoscaler does not answer scrapes",
        metrics_used=(),
        description=(
            "The engine Deployment keeps its current replicas and scale from zero stops until "
            "the controller is back."
        ),
        needs="autoscaler",
    ),
    Alert(
        name="ShoalAutoscalerActuatorErrors",
        expr="rate(shoal_autoscale_actuator_errors_total[5m]) > 0",
        for_="10m",
        severity="critical",
        summary="The autoscaler cannot read or scale its target",
        metrics_used=("shoal_autoscale_actuator_errors_total",),
        description=(
            "Calls to the scale target fail: the Deployment is missing or renamed, the RBAC "
            "does not allow the call, or the API server is unreachable. Scaling (and scale "
            "from zero) has stopped; the controller's log names the call and the status."
        ),
        needs="autoscaler",
    ),
    Alert(
        name="ShoalGpuUnhealthy",
        expr="shoal_gpu_healthy == 0",
        for_="1m",
        severity="critical",
        summary="GPU {{ $labels.node }}/gpu{{ $labels.gpu }} is unhealthy",
        metrics_used=("shoal_gpu_healthy",),
        description=(
            "The health watcher reports a critical problem on this GPU (shoal_gpu_problems "
            "names the check): the router and the fleet stop using it. A critical XID clears "
            "only by POST /v1/clear after the GPU was reset or replaced."
        ),
        needs="health",
    ),
    Alert(
        name="ShoalGpuXidErrors",
        expr="increase(shoal_gpu_xid_events_total[10m]) > 0",
        for_="0m",
        severity="warning",
        summary="GPU {{ $labels.node }}/gpu{{ $labels.gpu }} reported XID {{ $labels.xid }}",
        metrics_used=("shoal_gpu_xid_events_total",),
        description=(
            "NVML reported an XID event. The watcher's table classes each code; a critical "
            "one also makes the GPU unhealthy (ShoalGpuUnhealthy)."
        ),
        needs="health",
    ),
    Alert(
        name="ShoalLoaderStagingFailures",
        expr='increase(shoal_loader_stagings_total{outcome="failed"}[15m]) > 0',
        for_="0m",
        severity="warning",
        summary="Loader sidecar {{ $labels.pod }} failed to stage weights",
        metrics_used=("shoal_loader_stagings_total",),
        description=(
            "Staging a checkpoint into shared memory failed (shoal_loader_errors_total names "
            "the error: access denied, not found, capacity): its engine cannot start with "
            "--load-format shoal until it succeeds."
        ),
        needs="loader",
    ),
    Alert(
        name="ShoalConnectorDaemonUnavailable",
        expr=(
            "sum by (pod) "
            '(rate(shoal_connector_failures_total{reason="daemon_unavailable"}[5m])) > 0'
        ),
        for_="10m",
        severity="warning",
        summary="Engine {{ $labels.pod }} cannot reach its node's cache daemon",
        metrics_used=("shoal_connector_failures_total",),
        description=(
            "The engine serves without the cache (every prefix recomputed). The daemon is "
            "down on that node, or the engine pod does not share its host directories or its "
            "user."
        ),
        needs="connector",
    ),
)
