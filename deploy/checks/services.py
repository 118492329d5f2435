"""Contract (d): a Service for every in-cluster address a component dials.

Invariant: every address a rendered container dials inside the cluster names a rendered
Service in that namespace with that port (by number or name), and the Service selects a
rendered pod template with a container exposing the port it targets. A missing Service or
port is otherwise found only at run time, as a connection refused in some pod's log.

Where the addresses come from (the container's ``SHOAL_*`` env): every ``*_URL`` and
``*GPU_HEALTH`` variable (comma-separated URLs), ``SHOAL_ROUTER_REDIS``, an autoscaler's
``ray:URL`` target, the router's engines (``[NS/]SERVICE[:PORT_NAME]`` with discovery k8s,
URLs with static or dns), the cache's k8s discovery Service and cluster port; and every
ServiceMonitor's and PodMonitor's port names. A host that is an IP, ``localhost`` or a name
outside the cluster (``*.example.com``) is not checked.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from deploy.checks import (
    PodTemplate,
    Problem,
    all_containers,
    contract_problem,
    env_of,
    pod_templates,
    where,
)
from deploy.values import Values

__all__ = ["dialed_services", "dials", "selects"]

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _Dial:
    namespace: str
    service: str
    port: int | str  # number or port name
    why: str  # the variable or object that dials it


def _service_host(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, service) for an in-cluster Service name; None for anything else."""
    if not host or host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    labels = host.split(".")
    if len(labels) == 1:
        return namespace, labels[0]
    if len(labels) == 2 or labels[2] == "svc":
        return labels[1], labels[0]
    return None  # an external name


_DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}


def _dials_of_url(url: str, namespace: str, why: str) -> list[_Dial]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    service = _service_host(parts.hostname or "", namespace)
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    return [_Dial(*service, port, why)] if service and port else []


def dials(pod: PodTemplate, container: Obj) -> list[_Dial]:
    env, ns, found = env_of(container), pod.namespace, []
    for name, text in env.items():
        if name.endswith("_URL") or name in ("SHOAL_ROUTER_REDIS",) or name.endswith("GPU_HEALTH"):
            for url in filter(None, (u.strip() for u in text.split(","))):
                found += _dials_of_url(url, ns, name)
    if env.get("SHOAL_AUTOSCALE_TARGET", "").startswith("ray:"):
        found += _dials_of_url(env["SHOAL_AUTOSCALE_TARGET"][4:], ns, "SHOAL_AUTOSCALE_TARGET")
    engines = [e.strip() for e in env.get("SHOAL_ROUTER_ENGINES", "").split(",") if e.strip()]
    discovery = env.get("SHOAL_ROUTER_DISCOVERY", "static")
    for item in engines:
        if discovery == "k8s":
            location, _, port_name = item.partition("@")[0].partition(":")
            namespace, _, service = location.rpartition("/")
            found.append(
                _Dial(namespace or ns, service, port_name or "http", "SHOAL_ROUTER_ENGINES")
            )
        elif discovery in ("static", "dns"):
            found += _dials_of_url(item.partition("=")[0], ns, "SHOAL_ROUTER_ENGINES")
    if env.get("SHOAL_CACHE_CLUSTER_DISCOVERY") == "k8s":
        port = env.get("SHOAL_CACHE_CLUSTER_PORT", "0")
        found.append(
            _Dial(
                env.get("SHOAL_CACHE_CLUSTER_K8S_NAMESPACE", "default"),
                env.get("SHOAL_CACHE_CLUSTER_K8S_SERVICE", ""),
                int(port) if port.isdigit() else port,
                "SHOAL_CACHE_CLUSTER_K8S_SERVICE",
            )
        )
    return found


def _exposes(pod: PodTemplate, port: int | str) -> bool:
    for container in all_containers(pod.spec):
        for item in container.get("ports") or []:
            if port in (item.get("containerPort"), item.get("name")):
                return True
    return False


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _service_problems(objects: list[Obj], dial: _Dial, at: str) -> list[Problem]:
    services = [
        o
        for o in objects
        if o.get("kind") == "Service"
        and o["metadata"].get("name") == dial.service
        and o["metadata"].get("namespace", "default") == dial.namespace
    ]
    target = f"{dial.namespace}/{dial.service}:{dial.port} ({dial.why})"
    if not services:
        return [contract_problem(at, f"dials {target}: no such Service is rendered")]
    spec = services[0].get("spec") or {}
    ports = [p for p in spec.get("ports") or [] if dial.port in (p.get("port"), p.get("name"))]
    if not ports:
        return [contract_problem(at, f"dials {target}: the Service has no such port")]
    target_port = ports[0].get("targetPort", ports[0].get("port"))
    pods = [
        p
        for p in pod_templates(objects)
        if p.namespace == dial.namespace and selects(spec.get("selector") or {}, p.labels)
    ]
    if not any(_exposes(p, target_port) for p in pods):
        return [
            contract_problem(
                at,
                f"dials {target}: the Service selects no rendered pod exposing port {target_port}",
            )
        ]
    return []


def _monitor_problems(objects: list[Obj]) -> list[Problem]:
    problems = []
    for monitor in objects:
        kind, spec = monitor.get("kind"), monitor.get("spec") or {}
        if kind not in ("ServiceMonitor", "PodMonitor"):
            continue
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        names = (spec.get("namespaceSelector") or {}).get("matchNames") or [
            monitor["metadata"].get("namespace", "default")
        ]
        key = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
        for endpoint in spec.get(key) or []:
            port = endpoint.get("port")
            if kind == "ServiceMonitor":
                found = [
                    o
                    for o in objects
                    if o.get("kind") == "Service"
                    and o["metadata"].get("namespace", "default") in names
                    and selects(selector, o["metadata"].get("labels") or {})
                ]
                if not found:
                    problems.append(contract_problem(where(monitor), "selects no Service"))
                for service in found:
                    dial = _Dial(
                        service["metadata"].get("namespace", "default"),
                        service["metadata"]["name"],
                        port,
                        f"{kind} port",
                    )
                    problems += _service_problems(objects, dial, where(monitor))
            elif not any(
                _exposes(p, port)
                for p in pod_templates(objects)
                if p.namespace in names and selects(selector, p.labels)
            ):
                problems.append(
                    contract_problem(
                        where(monitor),
                        f"port {port!r}: no selected pod has a container port of that name",
                    )
                )
    return problems


def dialed_services(objects: list[Obj], values: Values) -> list[Problem]:
    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            for dial in dials(pod, container):
                at = f"{pod.where} container {container.get('name')}"
                problems += _service_problems(objects, dial, at)
    return problems + _monitor_problems(objects)
