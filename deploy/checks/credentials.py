"""Contracts (g) and (i): every Secret used is listed; every listener beyond loopback has auth.

(g) Every Secret a pod references (a volume, a projected source, ``envFrom``,
``secretKeyRef``; a ``SHOAL_*`` path inside a mounted Secret names its key) is listed by
``deploy.secrets.required_secrets`` with the keys used, and every listed Secret is used:
that list is what ``shoal deploy secrets`` tells an operator to create.

(i) A ``SHOAL_*_HOST`` beyond loopback has its auth (``AUTH``: the token file, API keys or
CurveZMQ directory) or its explicit insecure flag set to true, as the daemons themselves
refuse to start otherwise; this catches it at render time. ``*_METRICS_HOST`` listeners are
open by design (``/metrics`` for Prometheus).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from deploy.checks import PodTemplate, Problem, all_containers, env_of, is_under, pod_templates
from deploy.values import Values

__all__ = ["AUTH", "auth_beyond_loopback", "listed_secrets"]

Obj = dict[str, Any]


def _problem(at: str, message: str) -> Problem:
    return Problem("contract", at, message)


def _secret_uses(pod: PodTemplate) -> list[tuple[str, str | None, str]]:
    """(secret, key or None for the whole Secret, how) for each reference in the pod."""
    uses: list[tuple[str, str | None, str]] = []
    mounted: dict[str, str] = {}  # volume name -> secret name
    item_paths: dict[str, dict[str, str]] = {}  # volume name -> {path in volume: key}
    for volume in pod.spec.get("volumes") or []:
        sources = [volume] + [s for s in (volume.get("projected") or {}).get("sources") or []]
        for source in sources:
            secret = source.get("secret")
            if not secret:
                continue
            name = str(secret.get("secretName") or secret.get("name"))
            items = secret.get("items") or []
            uses += [(name, str(i["key"]), f"volume {volume['name']}") for i in items]
            uses += [] if items else [(name, None, f"volume {volume['name']}")]
            mounted[volume["name"]] = name
            item_paths[volume["name"]] = {str(i["path"]): str(i["key"]) for i in items}
    for container in all_containers(pod.spec):
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                uses.append((str(source["secretRef"]["name"]), None, "envFrom"))
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                uses.append((str(ref["name"]), str(ref["key"]), f"env {item['name']}"))
        paths = {
            m["mountPath"]: m["name"]
            for m in container.get("volumeMounts") or []
            if m.get("name") in mounted
        }
        for name, text in env_of(container).items():  # a file of a mounted Secret: its key
            for path, volume in paths.items():
                if is_under(text, path) and text != path:
                    relative = text[len(path.rstrip("/")) + 1 :]
                    uses += [
                        (mounted[volume], key, f"env {name}")
                        for key in _keys_at(relative, item_paths.get(volume, {}))
                    ]
    return uses


def _keys_at(relative: str, items: dict[str, str]) -> list[str]:
    """The Secret keys a file path in its volume names: through ``items`` when the volume
    maps them (a ``$(VAR)`` in the path, expanded by the kubelet per pod, matches any item
    path of that shape), else the path's first part (a whole Secret mounted as files). A
    path no item maps comes back as itself, so the listing check names it."""
    if not items:
        return [relative.split("/", maxsplit=1)[0]]
    if "$(" in relative:
        pattern = re.compile(
            "".join(".+" if part.startswith("$(") else re.escape(part)
                    for part in re.split(r"(\$\([A-Za-z_][A-Za-z0-9_]*\))", relative))
        )  # fmt: skip
        matched = [key for path, key in items.items() if pattern.fullmatch(path)]
    else:
        matched = [items[relative]] if relative in items else []
    return matched or [relative]


def listed_secrets(objects: list[Obj], values: Values) -> list[Problem]:
    from deploy.secrets import required_secrets

    listed = {spec.name: spec for spec in required_secrets(values)}
    problems, referenced = [], set()
    for pod in pod_templates(objects):
        referenced_here: set[str] = set()
        for secret, key, how in _secret_uses(pod):
            referenced.add(secret)
            if secret not in listed:
                if secret not in referenced_here:  # once per pod
                    problems.append(
                        _problem(
                            pod.where,
                            f"{how} uses Secret {secret}, which deploy.secrets does not list",
                        )
                    )
                referenced_here.add(secret)
            elif key is not None and key not in listed[secret].keys:
                problems.append(
                    _problem(
                        pod.where,
                        f"{how} uses key {key} of Secret {secret}; deploy.secrets lists "
                        f"{list(listed[secret].keys)}",
                    )
                )
    for name in sorted(set(listed) - referenced):
        problems.append(
            _problem(
                f"Secret/{values.namespace}/{name}",
                "listed by deploy.secrets but no rendered object uses it",
            )
        )
    return problems


# --- (i) auth beyond loopback ---------------------------------------------------------------

# Listener variable -> (variables any of which is its auth, its explicit insecure flag).
AUTH: dict[str, tuple[tuple[str, ...], str]] = {
    "SHOAL_CACHE_CLUSTER_HOST": (
        ("SHOAL_CACHE_CLUSTER_CURVE_DIR",),
        "SHOAL_CACHE_CLUSTER_INSECURE",
    ),
    "SHOAL_ROUTER_HOST": (("SHOAL_ROUTER_API_KEYS",), "SHOAL_ROUTER_INSECURE_NO_AUTH"),
    "SHOAL_ROUTER_ADMIN_HOST": (
        ("SHOAL_ROUTER_ADMIN_TOKEN_FILE",),
        "SHOAL_ROUTER_INSECURE_NO_AUTH",
    ),
    "SHOAL_AUTOSCALE_HOST": (
        ("SHOAL_AUTOSCALE_AUTH_TOKEN_FILE",),
        "SHOAL_AUTOSCALE_INSECURE_NO_AUTH",
    ),
    "SHOAL_HEALTH_HOST": (("SHOAL_HEALTH_AUTH_TOKEN_FILE",), "SHOAL_HEALTH_INSECURE_NO_AUTH"),
    "SHOAL_ENGINES_HOST": (("SHOAL_ENGINES_AUTH_TOKEN_FILE",), "SHOAL_ENGINES_INSECURE_NO_AUTH"),
}
OPEN_LISTENERS = re.compile(r"SHOAL_\w+_METRICS_HOST")  # /metrics is open by design


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def auth_beyond_loopback(objects: list[Obj], values: Values) -> list[Problem]:
    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            env, at = env_of(container), f"{pod.where} container {container.get('name')}"
            for name, host in env.items():
                if not re.fullmatch(r"SHOAL_\w+_HOST", name) or OPEN_LISTENERS.fullmatch(name):
                    continue
                if _loopback(host):
                    continue
                if name not in AUTH:
                    problems.append(
                        _problem(at, f"{name}={host} listens beyond loopback with no known auth")
                    )
                    continue
                auth, insecure = AUTH[name]
                if not any(env.get(a) for a in auth) and env.get(insecure) != "true":
                    problems.append(
                        _problem(
                            at,
                            f"{name}={host} listens beyond loopback without {' or '.join(auth)} "
                            f"(or {insecure}=true)",
                        )
                    )
    return problems
