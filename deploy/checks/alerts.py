"""Contract (h): every PrometheusRule expression is PromQL that reads what Shoal exports.

Invariant: each rule's ``expr`` parses (Prometheus refuses to load a whole rule group over
one bad expression); every ``shoal_*`` series it reads is a metric of the catalogue
generated from the code (deploy/metrics_catalogue.py; a histogram's ``_bucket``/``_sum``/
``_count`` count as the histogram); every label it matches on a ``shoal_*`` series, and
every ``by``/``without``/``on``/``ignoring`` label over only ``shoal_*`` series, is one of
those metrics' labels or a target label Prometheus adds (``TARGET_LABELS``); every
``job="..."`` it matches is a job a rendered monitor scrapes under (its ``job`` relabelling,
else the operator's default). A misspelt label or job makes an alert that never fires, and
nothing says so. Series Shoal does not export (``up``, ``kube_*``, ``vllm:*``) are not
checked beyond their ``job``.

Parsed with promql-parser (the Rust PromQL parser's Python binding; the ``deploy`` extra).
"""

from __future__ import annotations

from typing import Any

from deploy.checks import Problem, contract_problem, where
from deploy.values import Values

__all__ = ["TARGET_LABELS", "alert_metrics", "monitor_jobs"]

Obj = dict[str, Any]
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "container", "service", "endpoint", "__name__"}
)
_LABEL_MAKERS = frozenset({"label_replace", "label_join"})


def _series_labels() -> dict[str, frozenset[str]]:
    """Every series name Shoal exports -> its labels (with the target labels)."""
    from deploy.metrics_catalogue import catalogue

    known: dict[str, frozenset[str]] = {}
    for metric in catalogue():
        labels = frozenset(metric.labels) | TARGET_LABELS
        known[metric.name] = labels
        if metric.type in ("histogram", "summary"):
            extra = "le" if metric.type == "histogram" else "quantile"
            known[metric.name] = labels | {extra}
            known[f"{metric.name}_bucket"] = labels | {extra}
            known.update({f"{metric.name}{s}": labels for s in ("_sum", "_count")})
    return known


def _relabelled(objects: list[Obj]) -> frozenset[str]:
    """Every ``targetLabel`` a rendered monitor's relabelings set (e.g. ``node``)."""
    found: set[str] = set()
    for monitor in objects:
        if monitor.get("kind") not in ("ServiceMonitor", "PodMonitor"):
            continue
        spec = monitor.get("spec") or {}
        for endpoint in (spec.get("endpoints") or []) + (spec.get("podMetricsEndpoints") or []):
            found.update(
                str(r["targetLabel"]) for r in endpoint.get("relabelings") or []
                if r.get("targetLabel") and not str(r["targetLabel"]).startswith("__")
            )  # fmt: skip
    return frozenset(found)


def monitor_jobs(objects: list[Obj]) -> set[str]:
    """The ``job`` label of each rendered monitor's targets: its relabelled job, else the
    operator's default (a ServiceMonitor: the Service's name; a PodMonitor:
    ``namespace/name``)."""
    jobs: set[str] = set()
    for monitor in objects:
        kind, spec = monitor.get("kind"), monitor.get("spec") or {}
        if kind not in ("ServiceMonitor", "PodMonitor"):
            continue
        key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        for endpoint in spec.get(key) or []:
            relabelled = [
                str(r.get("replacement"))
                for r in endpoint.get("relabelings") or []
                if r.get("targetLabel") == "job" and r.get("action", "replace") == "replace"
            ]
            if relabelled:
                jobs.add(relabelled[-1])
            elif kind == "PodMonitor":
                meta = monitor.get("metadata") or {}
                jobs.add(f"{meta.get('namespace', 'default')}/{meta.get('name')}")
            else:
                selector = (spec.get("selector") or {}).get("matchLabels") or {}
                jobs.update(
                    str(o["metadata"]["name"])
                    for o in objects
                    if o.get("kind") == "Service"
                    and selector
                    and all(
                        (o["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items()
                    )
                )
    return jobs


def _nodes(expr: Any) -> list[Any]:
    import promql_parser

    found: list[Any] = []
    promql_parser.walk(expr, found.append)
    return found


def _visible(expr: Any, known: dict[str, frozenset[str]]) -> frozenset[str] | None:
    """The labels the series under ``expr`` can carry; None when unknown (a series Shoal
    does not export, or a function that makes labels)."""
    import promql_parser

    labels: set[str] = set()
    for node in _nodes(expr):
        if isinstance(node, promql_parser.Call) and node.func.name in _LABEL_MAKERS:
            return None
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None or node.name not in known:
                return None
            labels |= known[node.name]
    return frozenset(labels)


def _expr_problems(text: str, known: dict[str, frozenset[str]], jobs: set[str]) -> list[str]:
    import promql_parser

    try:
        expr = promql_parser.parse(text)
    except ValueError as exc:
        return [f"not valid PromQL: {exc}"]
    messages: list[str] = []
    for node in _nodes(expr):
        if isinstance(node, promql_parser.VectorSelector):
            name = str(node.name or "")
            if name.startswith("shoal_") and name not in known:
                messages.append(
                    f"{name} is not a metric Shoal exports (deploy/metrics_catalogue.py)"
                )
                continue
            for matcher in node.matchers.matchers:
                if name in known and matcher.name not in known[name]:
                    messages.append(
                        f"{name} has no label {matcher.name!r} (it has "
                        f"{sorted(known[name] - TARGET_LABELS)})"
                    )
                if (
                    matcher.name == "job"
                    and jobs
                    and str(matcher.op).endswith("Equal")
                    and "Not" not in str(matcher.op)
                    and matcher.value not in jobs
                ):
                    messages.append(
                        f"job {matcher.value!r} is not a job any monitor scrapes ({sorted(jobs)})"
                    )
        grouping: list[str] = []
        scope: list[Any] = []
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping, scope = list(node.modifier.labels), [node.expr]
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            grouping = list(matching.labels) if matching is not None else []
            grouping += list(node.modifier.group_labels or [])
            scope = [node.lhs, node.rhs]
        visible = [_visible(s, known) for s in scope]
        if grouping and all(v is not None for v in visible):
            union = frozenset().union(*[v for v in visible if v is not None])
            messages += [
                f"groups by {label!r}, which no series it reads carries"
                for label in grouping
                if label not in union
            ]
    return messages


def alert_metrics(objects: list[Obj], values: Values) -> list[Problem]:
    known, jobs = _series_labels(), monitor_jobs(objects)
    added = _relabelled(objects)  # labels the rendered monitors put on every target
    known = {name: labels | added for name, labels in known.items()}
    problems: list[Problem] = []
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        for group in (obj.get("spec") or {}).get("groups") or []:
            for rule in group.get("rules") or []:
                name = rule.get("alert") or rule.get("record")
                for message in _expr_problems(str(rule.get("expr", "")), known, jobs):
                    problems.append(contract_problem(where(obj), f"{name}: {message}"))
    return problems
