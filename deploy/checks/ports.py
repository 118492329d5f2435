"""Contracts (k) and (l): what is targeted is listened on, and what is dialed is admitted.

(k) ``listen_ports``: each port a Service, probe or monitor targets on a container is one
its process listens on (``SHOAL_<SECTION>_PORT`` and friends, ``LISTENERS``; vLLM's last
``--port``), on a host beyond loopback; and a process listening beyond loopback does so on
a declared containerPort. A Service in front of a process listening elsewhere passes (d)
and fails only at run time, as a connection refused.

(l) ``policies_and_selectors``: every NetworkPolicy's podSelector selects a rendered pod
template, every port its rules name is a containerPort (name or number) of those pods, and
every dial (d) finds is admitted by the policies selecting its target, if any (a named port
a pod lacks matches nothing; a policy that forgets a dialer cuts it off silently). Every
probe port resolves to a port of its container; every PodDisruptionBudget selects a pod
template; every workload's selector matches its own template (the API server refuses it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from deploy.checks import (
    PodTemplate,
    Problem,
    all_containers,
    command_words,
    contract_problem,
    env_of,
    flag_values,
    pod_templates,
    shoal_component,
    where,
)
from deploy.checks.node import engines
from deploy.checks.services import dials, selects
from deploy.values import Values
from shoal.config import is_loopback

__all__ = ["LISTENERS", "listen_ports", "policies_and_selectors"]

Obj = dict[str, Any]
# `shoal <component>` -> (port setting, host setting, offset) of each socket it listens on.
LISTENERS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "cache": (
        ("cluster_port", "cluster_host", 0),
        ("cluster_port", "cluster_host", 1),  # the PUB stream
        ("metrics_port", "metrics_host", 0),
    ),
    "loader": (("metrics_port", "metrics_host", 0),),
    "router": (("port", "host", 0), ("admin_port", "admin_host", 0)),  # admin: 0 = none
    **{c: (("port", "host", 0),) for c in ("autoscale", "health", "engines")},
}
VLLM_DEFAULTS = ("0.0.0.0", 8000)  # vLLM binds every address when --host is not given
_PROBES = ("livenessProbe", "readinessProbe", "startupProbe")


def _settings_class(component: str) -> type:
    from deploy.checks.contracts import _settings_classes

    return _settings_classes()[component.upper()]


def _listeners(container: Obj, is_engine: bool) -> list[tuple[int, str]] | None:
    """(port, host) of each socket the container's process listens on; None: not known."""
    if is_engine:
        words = command_words(container)
        ports, hosts = flag_values(words, "--port"), flag_values(words, "--host")
        port = ports[-1] if ports else str(VLLM_DEFAULTS[1])
        return [(int(port) if port.isdigit() else -1, hosts[-1] if hosts else VLLM_DEFAULTS[0])]
    component = shoal_component(container)
    if component not in LISTENERS:
        return None
    cls, env = _settings_class(component), env_of(container)
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    found = []
    for port_key, host_key, offset in LISTENERS[component]:
        text = env.get(f"SHOAL_{component.upper()}_{port_key.upper()}", str(defaults[port_key]))
        host = env.get(f"SHOAL_{component.upper()}_{host_key.upper()}", str(defaults[host_key]))
        if text.isdigit() and int(text) > 0:
            found.append((int(text) + offset, host))
    return found


def _port_number(container: Obj, port: Any) -> int | None:
    for item in container.get("ports") or []:
        if port in (item.get("containerPort"), item.get("name")):
            return int(item["containerPort"])
    return None


def _targets(objects: list[Obj], pod: PodTemplate) -> dict[str, list[tuple[Any, str]]]:
    """container name -> (port as targeted, by what) for every Service, monitor and probe."""
    found: dict[str, list[tuple[Any, str]]] = {}
    wanted: list[tuple[Any, str]] = []
    for obj in objects:
        spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
        if meta.get("namespace", "default") != pod.namespace:
            continue
        if obj.get("kind") == "Service" and selects(spec.get("selector") or {}, pod.labels):
            wanted += [
                (p.get("targetPort", p.get("port")), where(obj)) for p in spec.get("ports") or []
            ]
        if obj.get("kind") == "PodMonitor" and selects(
            (spec.get("selector") or {}).get("matchLabels") or {}, pod.labels
        ):
            wanted += [(e.get("port"), where(obj)) for e in spec.get("podMetricsEndpoints") or []]
    for container in all_containers(pod.spec):
        mine = [(port, by) for port, by in wanted if _port_number(container, port) is not None]
        for probe in _PROBES:
            action = next(
                (
                    v
                    for k, v in (container.get(probe) or {}).items()
                    if k in ("httpGet", "tcpSocket", "grpc")
                ),
                None,
            )
            if action is not None:
                mine.append((action.get("port"), probe))
        found[str(container.get("name"))] = mine
    return found


def listen_ports(objects: list[Obj], values: Values) -> list[Problem]:
    problems: list[Problem] = []
    engine_containers = {id(c) for _, c in engines(objects)}
    for pod in pod_templates(objects):
        targets = _targets(objects, pod)
        for container in all_containers(pod.spec):
            listeners = _listeners(container, id(container) in engine_containers)
            if listeners is None:
                continue
            at = f"{pod.where} container {container.get('name')}"
            declared = {int(p["containerPort"]) for p in container.get("ports") or []}
            for port, by in targets.get(str(container.get("name")), []):
                number = _port_number(container, port) if not isinstance(port, int) else port
                if number is None:
                    continue  # an unresolvable probe port: (l) names it
                hosts = [host for bound, host in listeners if bound == number]
                if not hosts:
                    problems.append(
                        contract_problem(
                            at,
                            f"{by} targets port {port} ({number}), but "
                            f"the process listens on {sorted(p for p, _ in listeners)}",
                        )
                    )
                elif all(is_loopback(h) for h in hosts):
                    problems.append(
                        contract_problem(
                            at,
                            f"{by} targets port {port} ({number}), but "
                            f"the process listens on {hosts[0]} only",
                        )
                    )
            for bound, host in listeners:
                if not is_loopback(host) and bound not in declared:
                    problems.append(
                        contract_problem(
                            at,
                            f"listens on {host}:{bound}, which is not a "
                            f"declared containerPort {sorted(declared)}",
                        )
                    )
    return problems


# --- (l) policies, probes, selectors --------------------------------------------------------


def _match_labels(selector: Obj | None) -> dict[str, str]:
    return dict((selector or {}).get("matchLabels") or {})


def _selected(pods: list[PodTemplate], selector: Obj | None, namespace: str) -> list[PodTemplate]:
    labels = _match_labels(selector)
    return [
        p
        for p in pods
        if p.namespace == namespace and all(p.labels.get(k) == v for k, v in labels.items())
    ]


def _ports_of(pods: list[PodTemplate]) -> set[Any]:
    return {
        key
        for pod in pods
        for container in all_containers(pod.spec)
        for item in container.get("ports") or []
        for key in (item.get("containerPort"), item.get("name"))
    }


def _admits(policy: Obj, dialer: PodTemplate, port_keys: set[Any]) -> bool:
    namespace = policy["metadata"].get("namespace", "default")
    for rule in (policy.get("spec") or {}).get("ingress") or []:
        ports = rule.get("ports") or []
        if ports and not any(p.get("port") in port_keys for p in ports):
            continue
        peers = rule.get("from") or []
        if not peers:
            return True
        for peer in peers:
            if "ipBlock" in peer:
                continue
            names = _match_labels(peer.get("namespaceSelector"))
            if "namespaceSelector" not in peer and dialer.namespace != namespace:
                continue
            if names and names != {"kubernetes.io/metadata.name": dialer.namespace}:
                continue
            pod_labels = _match_labels(peer.get("podSelector"))
            if all(dialer.labels.get(k) == v for k, v in pod_labels.items()):
                return True
    return False


def _policy_problems(objects: list[Obj], pods: list[PodTemplate]) -> list[Problem]:
    problems: list[Problem] = []
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    for policy in policies:
        spec, namespace = policy.get("spec") or {}, policy["metadata"].get("namespace", "default")
        chosen = _selected(pods, spec.get("podSelector"), namespace)
        if not chosen:
            problems.append(
                contract_problem(where(policy), "its podSelector selects no rendered pod")
            )
            continue
        ports = _ports_of(chosen)
        for rule in spec.get("ingress") or []:
            for item in rule.get("ports") or []:
                if item.get("port") is not None and item["port"] not in ports:
                    problems.append(
                        contract_problem(
                            where(policy),
                            f"port {item['port']!r} is no "
                            "containerPort of the pods it selects (it matches nothing)",
                        )
                    )
    for dialer in pods:
        for container in all_containers(dialer.spec):
            for dial in dials(dialer, container):
                services = [
                    o
                    for o in objects
                    if o.get("kind") == "Service"
                    and o["metadata"].get("name") == dial.service
                    and o["metadata"].get("namespace", "default") == dial.namespace
                ]
                if not services:
                    continue  # (d) names it
                spec = services[0].get("spec") or {}
                sports = [
                    p
                    for p in spec.get("ports") or []
                    if dial.port in (p.get("port"), p.get("name"))
                ]
                targets = [
                    p
                    for p in pods
                    if p.namespace == dial.namespace
                    and selects(spec.get("selector") or {}, p.labels)
                ]
                if not sports or not targets:
                    continue
                target_port = sports[0].get("targetPort", sports[0].get("port"))
                dialed = f"{dial.namespace}/{dial.service}:{dial.port} ({dial.why})"
                for target in targets:
                    number = next(
                        (
                            _port_number(c, target_port)
                            for c in all_containers(target.spec)
                            if _port_number(c, target_port) is not None
                        ),
                        None,
                    )
                    keys = {target_port, number} | {
                        item.get("name")
                        for c in all_containers(target.spec)
                        for item in c.get("ports") or []
                        if item.get("containerPort") == number
                    }
                    guarding = [
                        p
                        for p in policies
                        if target
                        in _selected(
                            pods, (p.get("spec") or {}).get("podSelector"), target.namespace
                        )
                        and "Ingress" in ((p.get("spec") or {}).get("policyTypes") or ["Ingress"])
                    ]
                    if guarding and not any(_admits(p, dialer, keys) for p in guarding):
                        problems.append(
                            contract_problem(
                                f"{dialer.where} container {container.get('name')}",
                                (
                                    f"dials {dialed}, "
                                    f"but no NetworkPolicy selecting {target.where} admits it"
                                ),
                            )
                        )
    return problems


def policies_and_selectors(objects: list[Obj], values: Values) -> list[Problem]:
    pods = list(pod_templates(objects))
    problems = _policy_problems(objects, pods)
    for pod in pods:
        for container in all_containers(pod.spec):
            for probe in _PROBES:
                for kind, action in (container.get(probe) or {}).items():
                    if kind not in ("httpGet", "tcpSocket", "grpc"):
                        continue
                    port = action.get("port")
                    if not isinstance(port, int) and _port_number(container, port) is None:
                        problems.append(
                            contract_problem(
                                f"{pod.where} container {container.get('name')}",
                                f"{probe} port {port!r} is not a port of the container",
                            )
                        )
        selector = ((pod.owner.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if (
            pod.owner.get("kind") != "Pod"
            and selector is not None
            and not all(pod.labels.get(k) == v for k, v in selector.items())
        ):
            problems.append(
                contract_problem(
                    pod.where, f"selector {selector} does not match its template's labels"
                )
            )
    for pdb in objects:
        if pdb.get("kind") == "PodDisruptionBudget":
            spec, namespace = pdb.get("spec") or {}, pdb["metadata"].get("namespace", "default")
            if not _selected(pods, spec.get("selector"), namespace):
                problems.append(
                    contract_problem(
                        where(pdb), "its selector selects no rendered pod (it protects nothing)"
                    )
                )
    return problems
