"""Contracts (g) and (i): every Secret used is projected and listed; every listener beyond
loopback has its auth.

(g) Every Secret a pod references (a volume, a projected source, ``envFrom``,
``secretKeyRef``) is listed by ``deploy.secrets.required_secrets`` with the keys used, and
every listed Secret and key is projected somewhere: that list is what ``shoal deploy
secrets`` tells an operator to create. Every ``SHOAL_*`` setting that is a path (``PATHS``:
``*_FILE``, ``*_DIR``, ``*_API_KEYS``, ``*_CURVE_*``) lies under one of its container's
mounts; where the deepest such mount is a Secret's, the file is one the volume projects (a
volume with ``items`` projects those paths only; a whole-Secret volume projects every key,
so the path names the key). Mounts nest (an emptyDir with whole-Secret mounts inside it),
and a path under a hostPath or emptyDir mount is the node's or the pod's (keys generated on
the node): fine. Otherwise the daemon fails at start on a file that is not there.

(i) A ``SHOAL_*_HOST`` beyond loopback has its auth (``AUTH``: the token file, API keys or
CurveZMQ directory) or its explicit insecure flag set to true, as the daemons themselves
refuse to start otherwise; this catches it at render time. ``*_METRICS_HOST`` listeners are
open by design (``/metrics`` for Prometheus).
"""

from __future__ import annotations

import re
from typing import Any

from deploy.checks import (
    PodTemplate,
    Problem,
    all_containers,
    contract_problem,
    env_of,
    is_under,
    pod_templates,
)
from deploy.values import Values
from shoal.config import is_loopback  # the daemons' own rule for "needs auth"

__all__ = ["AUTH", "PATHS", "auth_beyond_loopback", "listed_secrets"]

Obj = dict[str, Any]
PATHS = re.compile(r"SHOAL_\w+(?:_FILE|_DIR|_API_KEYS|_CURVE_\w+)")


def _secret_volumes(pod: PodTemplate) -> dict[str, list[tuple[str, dict[str, str] | None]]]:
    """volume name -> (secret, {path in volume: key} or None for every key) per source."""
    volumes: dict[str, list[tuple[str, dict[str, str] | None]]] = {}
    for volume in pod.spec.get("volumes") or []:
        sources = [volume] + [s for s in (volume.get("projected") or {}).get("sources") or []]
        for source in sources:
            secret = source.get("secret")
            if secret:
                items = secret.get("items") or []
                paths = {str(i["path"]): str(i["key"]) for i in items} if items else None
                name = str(secret.get("secretName") or secret.get("name"))
                volumes.setdefault(volume["name"], []).append((name, paths))
    return volumes


def _pattern(relative: str) -> re.Pattern[str]:
    """A path with ``$(VAR)`` (expanded by the kubelet per pod) matches any of that shape."""
    parts = re.split(r"(\$\([A-Za-z_][A-Za-z0-9_]*\))", relative)
    return re.compile("".join(".+" if p.startswith("$(") else re.escape(p) for p in parts))


def _keys_at(relative: str, items: dict[str, str]) -> list[str]:
    """The Secret keys a file path in its volume names: through ``items`` when the volume
    maps them (``_pattern``), else the path itself (a whole Secret mounted as files). A path
    no item maps comes back as itself; ``_path_uses`` names it as not projected."""
    if not items:
        return [relative]
    pattern = _pattern(relative)
    return [key for path, key in items.items() if pattern.fullmatch(path)] or [relative]


def _path_uses(pod: PodTemplate, container: Obj, secrets: Any) -> tuple[list[Any], list[str]]:
    """(secret, key, how) for each path setting in a Secret's mount; messages for paths
    under no mount or not projected."""
    uses, messages = [], []
    mounts = sorted(
        ((str(m["mountPath"]), str(m["name"])) for m in container.get("volumeMounts") or []),
        key=lambda m: len(m[0]),
        reverse=True,
    )
    for name, text in env_of(container).items():
        if not PATHS.fullmatch(name) or not text.startswith("/"):
            continue
        mount = next(((path, volume) for path, volume in mounts if is_under(text, path)), None)
        if mount is None:
            messages.append(f"{name}={text} lies under none of its mounts {[m for m, _ in mounts]}")
            continue
        path, volume = mount
        if volume not in secrets or text == path:
            continue  # the node's, the pod's, or the mount itself (a directory setting)
        relative = text[len(path.rstrip("/")) + 1 :]
        keys = []
        for secret, items in secrets[volume]:
            if items is None:
                keys += [(secret, k) for k in _keys_at(relative, {}) if "/" not in k]
            else:
                pattern = _pattern(relative)
                keys += [
                    (secret, k)
                    for p, k in items.items()
                    if pattern.fullmatch(p) or (name.endswith("_DIR") and is_under(p, relative))
                ]
        if not keys:
            messages.append(f"{name}={text}: file {relative} is not projected by volume {volume}")
        uses += [(secret, key, f"env {name}") for secret, key in keys]
    return uses, messages


def _secret_uses(pod: PodTemplate) -> tuple[list[tuple[str, str | None, str]], list[str]]:
    """(secret, key or None for the whole Secret, how) for each reference in the pod, and
    messages for path settings that no mount or projection provides."""
    uses: list[tuple[str, str | None, str]] = []
    messages: list[str] = []
    secrets = _secret_volumes(pod)
    for volume, sources in secrets.items():
        for secret, items in sources:
            if items is None:
                uses.append((secret, None, f"volume {volume}"))
            uses += [(secret, key, f"volume {volume}") for key in (items or {}).values()]
    for container in all_containers(pod.spec):
        for source in container.get("envFrom") or []:
            if "secretRef" in source:
                uses.append((str(source["secretRef"]["name"]), None, "envFrom"))
        for item in container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                uses.append((str(ref["name"]), str(ref["key"]), f"env {item['name']}"))
        found, missing = _path_uses(pod, container, secrets)
        uses += found
        messages += [f"container {container.get('name')}: {m}" for m in missing]
    return uses, messages


def listed_secrets(objects: list[Obj], values: Values) -> list[Problem]:
    from deploy.secrets import required_secrets

    listed = {spec.name: spec for spec in required_secrets(values)}
    problems, referenced = [], set()
    projected: set[tuple[str, str | None]] = set()
    for pod in pod_templates(objects):
        uses, messages = _secret_uses(pod)
        problems += [contract_problem(pod.where, message) for message in messages]
        referenced_here: set[str] = set()
        for secret, key, how in uses:
            referenced.add(secret)
            projected.add((secret, key))
            if secret not in listed:
                if secret not in referenced_here:  # once per pod
                    problems.append(
                        contract_problem(
                            pod.where,
                            (f"{how} uses Secret {secret}, which deploy.secrets does not list"),
                        )
                    )
                referenced_here.add(secret)
            elif key is not None and key not in listed[secret].keys:
                problems.append(
                    contract_problem(
                        pod.where,
                        (
                            f"{how} uses key {key} of Secret {secret}; deploy.secrets lists "
                            f"{list(listed[secret].keys)}"
                        ),
                    )
                )
    for name in sorted(listed):
        at = f"Secret/{values.namespace}/{name}"
        if name not in referenced:
            problems.append(
                contract_problem(at, "listed by deploy.secrets but no rendered object uses it")
            )
        elif (name, None) not in projected:
            problems += [
                contract_problem(
                    at, f"key {key} is listed by deploy.secrets but no pod projects it"
                )
                for key in listed[name].keys
                if (name, key) not in projected
            ]
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


def auth_beyond_loopback(objects: list[Obj], values: Values) -> list[Problem]:
    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            env, at = env_of(container), f"{pod.where} container {container.get('name')}"
            for name, host in env.items():
                if not re.fullmatch(r"SHOAL_\w+_HOST", name) or OPEN_LISTENERS.fullmatch(name):
                    continue
                if is_loopback(host):
                    continue
                if name not in AUTH:
                    problems.append(
                        contract_problem(
                            at, f"{name}={host} listens beyond loopback with no known auth"
                        )
                    )
                    continue
                auth, insecure = AUTH[name]
                if not any(env.get(a) for a in auth) and env.get(insecure) != "true":
                    problems.append(
                        contract_problem(
                            at,
                            f"{name}={host} listens beyond loopback without {' or '.join(auth)} "
                            f"(or {insecure}=true)",
                        )
                    )
    return problems
