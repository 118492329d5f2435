"""RBAC against the code: every Kubernetes API call a pod can make is granted, and no more.

Invariant: for each pod template, the calls its containers' code can make under the
rendered configuration equal what the Roles and ClusterRoles bound to its ServiceAccount
grant: a call without a rule fails in production (403), a rule without a call is privilege
nobody needs (least privilege), a mounted token without calls is a credential nobody needs.

How the calls are found (issue 16: "found by grepping the code's client calls"):

1. ``scan_calls(package)`` greps the package's ``.py`` files for
   ``.(list|read|patch|create|replace|delete|watch)_...`` names that are methods of one of
   ``kubernetes.client``'s ``*Api`` classes. No ``(`` is required: a method is also passed
   as a function (``api.patch_node, self.node_name, body`` in control/health/cordon.py).
2. ``api_method(name)`` maps the method to what RBAC sees, read from the client's own
   source (its ``_<name>_serialize``, or ``<name>_with_http_info`` in older clients): the
   HTTP method and path, e.g. ``PATCH /apis/apps/v1/namespaces/{namespace}/deployments/
   {name}/scale`` -> (``apps``, ``deployments/scale``, ``patch``); GET with ``{name}`` is
   ``get``, without it ``list``. A name on several classes (``list_namespaced_event`` in
   core and events.k8s.io) maps to each; any one granted satisfies the call.
3. Which code runs in a container: its command, ``shoal <component> ...`` (``PACKAGES``);
   calls the configuration cannot reach are dropped by ``CONDITIONS`` (the container's
   ``SHOAL_*`` env: cache discovery k8s, router discovery k8s, health cordon *applied*
   (a dry run only logs), an autoscaler's target kind: ``deployment/NAME`` calls only the
   deployment methods, ``statefulset/NAME`` only the statefulset ones, ``ray:``/``local``
   none), and each namespaced
   call happens in the namespaces ``NAMESPACES`` derives from the env.

Rejected: a hand-kept table of calls per component (it drifts: the point of the issue);
importing the packages and tracing calls (needs every optional dependency, finds less).
A ``resourceNames`` rule counts for verbs on one named object (get, patch, update, delete),
and only when the object the code touches is among its names: ``NAMES`` derives that name
from the env as ``NAMESPACES`` derives the namespace (the cache's discovery Service, the
autoscaler's ``deployment/NAME`` or ``statefulset/NAME``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.checks import (
    PodTemplate,
    Problem,
    all_containers,
    env_of,
    pod_templates,
    shoal_component,
    where,
)

__all__ = [
    "CONDITIONS",
    "NAMES",
    "NAMESPACES",
    "PACKAGES",
    "ApiCall",
    "Grant",
    "api_method",
    "rbac_problems",
    "scan_calls",
]

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]

# `shoal <component>` -> the packages whose Kubernetes calls that container can make.
PACKAGES: dict[str, tuple[str, ...]] = {
    "cache": ("kvcache/cluster",),
    "router": ("router",),
    "autoscale": ("control/autoscale",),
    "health": ("control/health",),
    "engines": ("control/ray",),
}


def _is(name: str, *accepted: str) -> Callable[[dict[str, str]], bool]:
    return lambda env: env.get(name, "").lower() in accepted


def _prefix(name: str, *prefixes: str) -> Callable[[dict[str, str]], bool]:
    return lambda env: env.get(name, "").startswith(prefixes)


# (command component, method-name pattern, when the code makes such a call).
CONDITIONS: tuple[tuple[str, str, Callable[[dict[str, str]], bool]], ...] = (
    ("cache", r".*", _is("SHOAL_CACHE_CLUSTER_DISCOVERY", "k8s")),
    ("router", r".*endpoint_slice.*", _is("SHOAL_ROUTER_DISCOVERY", "k8s")),
    (
        "health",
        r"patch_node",
        lambda env: (
            _is("SHOAL_HEALTH_CORDON", "true")(env)
            and _is("SHOAL_HEALTH_CORDON_APPLY", "true")(env)
        ),
    ),
    ("autoscale", r".*deployment.*", _prefix("SHOAL_AUTOSCALE_TARGET", "deployment/")),
    ("autoscale", r".*stateful_set.*", _prefix("SHOAL_AUTOSCALE_TARGET", "statefulset/")),
    ("autoscale", r".*", _prefix("SHOAL_AUTOSCALE_TARGET", "deployment/", "statefulset/")),
)


def _router_namespaces(env: dict[str, str], own: str) -> set[str]:
    names = set()
    for item in env.get("SHOAL_ROUTER_ENGINES", "").split(","):
        where_, _, _ = item.strip().partition("@")
        namespace, _, _ = where_.partition(":")[0].rpartition("/")
        names.add(namespace or own)
    return names


def _own_namespace(env: dict[str, str], own: str) -> set[str]:
    return {own}


# Command component -> the namespaces its namespaced calls go to (the code's defaults).
NAMESPACES: dict[str, Callable[[dict[str, str], str], set[str]]] = {
    "cache": lambda env, own: {env.get("SHOAL_CACHE_CLUSTER_K8S_NAMESPACE", "default")},
    "router": _router_namespaces,
    "autoscale": lambda env, own: {env.get("SHOAL_AUTOSCALE_NAMESPACE") or own},
}


def _target_name(env: dict[str, str]) -> str | None:
    kind, _, name = env.get("SHOAL_AUTOSCALE_TARGET", "").partition("/")
    return name if kind in ("deployment", "statefulset") and name else None


# Command component -> the name of the one object its named calls touch (None: not known).
NAMES: dict[str, Callable[[dict[str, str]], str | None]] = {
    "cache": lambda env: env.get("SHOAL_CACHE_CLUSTER_K8S_SERVICE") or None,
    "autoscale": _target_name,
}

_CALL = re.compile(r"\.((?:list|read|patch|create|replace|delete|watch)_\w+)")


@dataclass(frozen=True, slots=True)
class Grant:
    """What RBAC checks for one request: (apiGroup, resource[/subresource], verb)."""

    group: str
    resource: str
    verb: str
    namespaced: bool

    def __str__(self) -> str:
        return f"{self.verb} {self.resource}" + (f".{self.group}" if self.group else "")


@dataclass(frozen=True, slots=True)
class ApiCall:
    method: str  # the client method, e.g. read_namespaced_endpoints
    where: str  # file:line of its first use
    grants: tuple[Grant, ...]  # any one suffices


@functools.cache
def _api_classes() -> dict[str, list[type]]:
    from kubernetes import client

    methods: dict[str, list[type]] = {}
    for name in sorted(dir(client)):
        cls = getattr(client, name)
        if not (name.endswith("Api") and isinstance(cls, type)):
            continue
        for method in dir(cls):
            if _CALL.fullmatch("." + method) and not method.endswith("_with_http_info"):
                methods.setdefault(method, []).append(cls)
    return methods


def _grant_of(http_method: str, path: str) -> Grant:
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    watch = bool(rest) and rest[0] == "watch"
    rest = rest[1:] if watch else rest
    namespaced = len(rest) >= 3 and rest[0] == "namespaces" and rest[1] == "{namespace}"
    rest = rest[2:] if namespaced else rest
    named = len(rest) >= 2 and rest[1].startswith("{")
    resource = rest[0] + (f"/{rest[2]}" if named and len(rest) >= 3 else "")
    verb = {
        "GET": "watch" if watch else ("get" if named else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[http_method]
    return Grant(group, resource, verb, namespaced)


@functools.cache
def api_method(name: str) -> tuple[Grant, ...]:
    """What calling ``kubernetes.client`` method ``name`` needs (empty: no such method)."""
    grants: list[Grant] = []
    for cls in _api_classes().get(name, []):
        source_of = getattr(cls, f"_{name}_serialize", None) or getattr(
            cls, f"{name}_with_http_info"
        )
        source = inspect.getsource(source_of)
        new = re.search(r"method='(\w+)',\s*resource_path='([^']+)'", source)
        old = re.search(r"'(/[^']+)',\s*'(GET|POST|PUT|PATCH|DELETE)'", source)
        assert new or old, f"cannot find the HTTP method and path of {cls.__name__}.{name}"
        http_method, path = (new.group(1), new.group(2)) if new else (old.group(2), old.group(1))  # type: ignore[union-attr]
        grant = _grant_of(http_method, path)
        if grant not in grants:
            grants.append(grant)
    return tuple(grants)


@functools.cache
def scan_calls(package: str, root: Path = REPO) -> tuple[ApiCall, ...]:
    """The Kubernetes client calls in ``root/package``'s ``.py`` files, by method name."""
    found: dict[str, ApiCall] = {}
    for path in sorted((root / package).rglob("*.py")):
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for match in _CALL.finditer(line):
                method = match.group(1)
                grants = api_method(method)
                if grants and method not in found:
                    at = f"{path.relative_to(root)}:{line_no}"
                    found[method] = ApiCall(method, at, grants)
    return tuple(found[name] for name in sorted(found))


def _needed(pod: PodTemplate) -> list[tuple[ApiCall, str | None, str | None]]:
    """(call, namespace or None for cluster-scoped, the object's name or None) the pod's
    containers can make."""
    needed: list[tuple[ApiCall, str | None, str | None]] = []
    for container in all_containers(pod.spec):
        component, env = shoal_component(container), env_of(container)
        if not component:
            continue
        name = NAMES[component](env) if component in NAMES else None
        for package in PACKAGES.get(component, ()):
            for call in scan_calls(package):
                if any(
                    c == component and re.fullmatch(p, call.method) and not when(env)
                    for c, p, when in CONDITIONS
                ):
                    continue
                if any(g.namespaced for g in call.grants):
                    where_to = NAMESPACES.get(component, _own_namespace)
                    needed += [(call, ns, name) for ns in sorted(where_to(env, pod.namespace))]
                else:
                    needed.append((call, None, name))
    return needed


def _matching(rule: Obj, grant: Grant, name: str | None) -> tuple[str, str, str] | None:
    """The rule's (apiGroup, resource, verb) entries that grant ``grant`` on the object
    ``name`` (None: not known), or None."""
    names = rule.get("resourceNames")
    if names and (grant.verb not in ("get", "patch", "update", "delete") or name not in names):
        return None
    base, _, sub = grant.resource.partition("/")
    patterns = (grant.resource, f"{base}/*", f"*/{sub}", "*") if sub else (grant.resource, "*")
    group = next((g for g in (grant.group, "*") if g in (rule.get("apiGroups") or [])), None)
    resource = next((r for r in patterns if r in (rule.get("resources") or [])), None)
    verb = next((v for v in (grant.verb, "*") if v in (rule.get("verbs") or [])), None)
    if group is None or resource is None or verb is None:
        return None
    return group, resource, verb


@dataclass
class _Bound:
    role: Obj  # the Role or ClusterRole
    namespace: str | None  # None: cluster-wide (a ClusterRoleBinding)


def _bindings(objects: list[Obj]) -> dict[tuple[str, str], list[_Bound]]:
    """(namespace, ServiceAccount) -> the roles bound to it, with their scope."""
    roles = {
        (o["kind"], (o["metadata"].get("namespace")), o["metadata"]["name"]): o
        for o in objects
        if o.get("kind") in ("Role", "ClusterRole")
    }
    bound: dict[tuple[str, str], list[_Bound]] = {}
    for binding in objects:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        namespace = binding["metadata"].get("namespace")
        ref = binding.get("roleRef") or {}
        role = roles.get(
            (ref.get("kind"), namespace if ref.get("kind") == "Role" else None, ref.get("name"))
        )
        if role is None:
            continue  # an unrendered role: the check says its calls are missing
        scope = None if binding["kind"] == "ClusterRoleBinding" else namespace
        for subject in binding.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                key = (str(subject.get("namespace", namespace)), str(subject.get("name")))
                bound.setdefault(key, []).append(_Bound(role, scope))
    return bound


def _automounts(pod: PodTemplate, accounts: dict[tuple[str, str], Obj], sa: str) -> bool:
    if "automountServiceAccountToken" in pod.spec:
        return bool(pod.spec["automountServiceAccountToken"])
    account = accounts.get((pod.namespace, sa)) or {}
    return bool(account.get("automountServiceAccountToken", True))


def rbac_problems(objects: list[Obj]) -> list[Problem]:
    """Calls without rules, rules without calls, tokens without calls (module docstring)."""
    problems: list[Problem] = []
    bound = _bindings(objects)
    accounts = {
        (o["metadata"].get("namespace", "default"), o["metadata"]["name"]): o
        for o in objects
        if o.get("kind") == "ServiceAccount"
    }
    used: set[tuple[int, int, str, str, str]] = set()  # (role, rule index, group, res, verb)
    for pod in pod_templates(objects):
        sa = str(pod.spec.get("serviceAccountName") or "default")
        needed = _needed(pod)
        mounted = _automounts(pod, accounts, sa)
        if needed and not mounted:
            problems.append(
                Problem(
                    "rbac",
                    pod.where,
                    f"calls the Kubernetes API ({needed[0][0].method}) but mounts no token",
                )
            )
        if not needed and mounted:
            problems.append(
                Problem(
                    "rbac",
                    pod.where,
                    "automounts a ServiceAccount token but "
                    "makes no Kubernetes API call: automountServiceAccountToken: "
                    "false",
                )
            )
        for call, namespace, name in needed:
            granted = False
            for b in bound.get((pod.namespace, sa), []):
                if b.namespace is not None and b.namespace != namespace:
                    continue
                for index, rule in enumerate(b.role.get("rules") or []):
                    for grant in call.grants:
                        entry = _matching(rule, grant, name)
                        if entry is not None:
                            granted = True
                            used.add((id(b.role), index, *entry))
            if not granted:
                scope = f"in namespace {namespace}" if namespace else "cluster-wide"
                grants = " or ".join(map(str, call.grants))
                problems.append(
                    Problem(
                        "rbac",
                        pod.where,
                        (
                            f"ServiceAccount {sa} may not {grants} {scope}, "
                            f"which {call.method} ({call.where}) needs"
                        ),
                    )
                )
    return problems + _unused(objects, used)


def _unused(objects: list[Obj], used: set[tuple[int, int, str, str, str]]) -> list[Problem]:
    """Every (apiGroup, resource, verb) of a rule that no needed call matched; wildcards."""
    problems: list[Problem] = []
    for role in objects:
        if role.get("kind") not in ("Role", "ClusterRole"):
            continue
        for index, rule in enumerate(role.get("rules") or []):
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    for verb in rule.get("verbs") or []:
                        label = f"{verb} {resource}" + (f".{group}" if group else "")
                        if "*" in (group, verb) or "*" in resource:
                            message = f"a wildcard ({label}) grants more than the code calls"
                        elif (id(role), index, group, resource, verb) not in used:
                            message = (
                                f"{label}: no call of the pods bound to it needs it "
                                "(least privilege: remove it)"
                            )
                        else:
                            continue
                        problems.append(Problem("rbac", where(role), f"rules[{index}] {message}"))
    return problems
