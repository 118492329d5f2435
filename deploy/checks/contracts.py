"""Cross-object contracts the rendered manifests must keep (issue 16), one function each.

    one_uid          (a) every container of a pod mounting a node dir (``values.node_dirs``)
                     runs as ``values.run_as_user`` / ``run_as_group`` (init ``node-dirs``
                     excepted: it chowns them as root): the arena is 0600, the socket dir 0700
    one_shm_path     (b) the daemon's ``SHOAL_CACHE_SHM_DIR`` = every engine's = the host path
                     mounted there; the engine connector's endpoint is
                     ``ipc://<daemon runtime dir>/shoal-<name>.sock``, a host path in both
    same_host_pid    (c) ``hostPID`` equal on the daemon and the engines (pidfd lease release)
    dialed_services  (d) every in-cluster address a component dials (``SHOAL_*_URL``, Redis,
                     the router's engines, the cache's discovery Service, monitors' ports) is
                     a rendered Service with that port, selecting pods that expose it
    known_settings   (e) every ``SHOAL_<SECTION>_<KEY>`` names a field of that section's
                     settings class (a typo'd variable is otherwise ignored by the daemon)
    memory           (f) the daemon's limit covers shm + dram + io staging; an engine pod's
                     memory ``/dev/shm`` covers the loader's capacity; every container has a
                     memory limit and a request equal to it (or none, which defaults to it)
    listed_secrets   (g) every Secret referenced is in ``deploy.secrets.required_secrets``
                     with the keys used, and every listed one is referenced
    auth_beyond_loopback (i) a ``SHOAL_*_HOST`` beyond loopback has its auth (token file, API
                     keys, CurveZMQ dir) or its explicit insecure flag

    no_service_links (j) every pod sets ``enableServiceLinks: false``: a Service named like
                     a setting's prefix (``vllm`` -> ``VLLM_PORT=tcp://...``, which vLLM
                     refuses) would otherwise reach every container of the namespace
    alert_metrics    (h) every ``shoal_*`` series a rendered PrometheusRule reads is a metric
                     of the catalogue generated from the code (deploy/metrics_catalogue.py;
                     a histogram's ``_bucket``/``_sum``/``_count`` count as the histogram)
Pods are found by their ``app.kubernetes.io/component`` label (``cache``, ``engine``) and
containers by their command (``shoal <component> ...``), the conventions of deploy/objects.py.
(d) lives in services.py, (g) and (i) in credentials.py; this module runs them all.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

from deploy.checks import PodTemplate, Problem, all_containers, env_of, is_under, pod_templates
from deploy.checks.credentials import auth_beyond_loopback, listed_secrets
from deploy.checks.services import dialed_services
from deploy.objects import LABEL_COMPONENT
from deploy.values import Values
from shoal.config import parse_size

__all__ = [
    "CONTRACTS",
    "SECTIONS",
    "alert_metrics",
    "auth_beyond_loopback",
    "contract_problems",
    "dialed_services",
    "known_settings",
    "listed_secrets",
    "memory",
    "no_service_links",
    "one_shm_path",
    "one_uid",
    "parse_quantity",
    "same_host_pid",
]

Obj = dict[str, Any]


def _settings_classes() -> dict[str, type]:
    from control.autoscale.config import AutoscaleSettings
    from control.health.config import HealthSettings
    from control.ray.config import EnginesSettings
    from kvcache.config import CacheConfig
    from kvcache.connector.settings import ConnectorSettings
    from loader.sidecar.config import LoaderConfig
    from router.config import RouterSettings

    return {
        "CACHE": CacheConfig,
        "LOADER": LoaderConfig,
        "ROUTER": RouterSettings,
        "AUTOSCALE": AutoscaleSettings,
        "HEALTH": HealthSettings,
        "ENGINES": EnginesSettings,
        "CONNECTOR": ConnectorSettings,
    }


SECTIONS = tuple(
    sorted(("CACHE", "LOADER", "ROUTER", "AUTOSCALE", "HEALTH", "ENGINES", "CONNECTOR"))
)
NOT_SETTINGS = frozenset({"SHOAL_CONFIG"})  # SHOAL_* variables that are not settings


def _problem(at: str, message: str) -> Problem:
    return Problem("contract", at, message)


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _shoal(container: Obj) -> str:
    """``cache`` for ``shoal cache serve``; "" for a container not running shoal."""
    command = [str(c) for c in (container.get("command") or []) + (container.get("args") or [])]
    return command[1] if len(command) >= 2 and command[0].rsplit("/", 1)[-1] == "shoal" else ""


def _pods(objects: list[Obj], component: str) -> list[PodTemplate]:
    return [p for p in pod_templates(objects) if p.labels.get(LABEL_COMPONENT) == component]


def _host_paths(pod: PodTemplate, container: Obj) -> dict[str, str]:
    """mountPath -> host path, for the container's hostPath mounts."""
    volumes = {
        v["name"]: v["hostPath"]["path"] for v in pod.spec.get("volumes") or [] if "hostPath" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container.get("volumeMounts") or []
        if m.get("name") in volumes
    }


# --- (a) one UID/GID ------------------------------------------------------------------------


def one_uid(objects: list[Obj], values: Values) -> list[Problem]:
    dirs = (values.node_dirs.shm_dir, values.node_dirs.runtime_dir)
    want = {"runAsUser": values.run_as_user, "runAsGroup": values.run_as_group}
    problems = []
    for pod in pod_templates(objects):
        host = [v["hostPath"]["path"] for v in pod.spec.get("volumes") or [] if "hostPath" in v]
        if not any(is_under(path, d) or is_under(d, path) for path in host for d in dirs):
            continue
        inits = {c.get("name") for c in pod.spec.get("initContainers") or []}
        for container in all_containers(pod.spec):
            if container.get("name") == "node-dirs" and "node-dirs" in inits:
                continue
            context = {
                **(pod.spec.get("securityContext") or {}),
                **(container.get("securityContext") or {}),
            }
            for key, expected in want.items():
                if context.get(key) != expected:
                    problems.append(
                        _problem(
                            pod.where,
                            f"container {container.get('name')} mounts a node dir but runs with "
                            f"{key} {context.get(key)}, not {expected} (values.run_as_*)",
                        )
                    )
    return problems


# --- (b) one shm path, one socket; (c) hostPID ----------------------------------------------


def _daemons(objects: list[Obj]) -> list[tuple[PodTemplate, Obj]]:
    return [
        (pod, c)
        for pod in _pods(objects, "cache")
        for c in all_containers(pod.spec)
        if _shoal(c) == "cache"
    ]


def _engines(objects: list[Obj]) -> list[tuple[PodTemplate, Obj]]:
    return [
        (pod, c)
        for pod in _pods(objects, "engine")
        for c in all_containers(pod.spec)
        if not _shoal(c)
        and ("SHOAL_CACHE_SHM_DIR" in env_of(c) or _kv_transfer_config(c) is not None)
    ]


def _kv_transfer_config(container: Obj) -> Obj | None:
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    for i, word in enumerate(words):
        text = None
        if word == "--kv-transfer-config" and i + 1 < len(words):
            text = words[i + 1]
        elif word.startswith("--kv-transfer-config="):
            text = word.partition("=")[2]
        if text is not None:
            try:
                config = json.loads(text)
            except json.JSONDecodeError:
                return {}
            return config if isinstance(config, dict) else {}
    return None


def one_shm_path(objects: list[Obj], values: Values) -> list[Problem]:
    from kvcache.config import CacheConfig

    problems: list[Problem] = []
    for pod, daemon in _daemons(objects):
        env = env_of(daemon)
        shm_dir = env.get("SHOAL_CACHE_SHM_DIR", _default(CacheConfig, "shm_dir"))
        runtime_dir = env.get("SHOAL_CACHE_RUNTIME_DIR", "")
        socket = f"ipc://{runtime_dir}/shoal-{env.get('SHOAL_CACHE_NAME', 'default')}.sock"
        if not runtime_dir:
            problems.append(
                _problem(
                    pod.where,
                    "the cache daemon has no "
                    "SHOAL_CACHE_RUNTIME_DIR (its default depends on $XDG_"
                    "RUNTIME_DIR, which engines cannot know)",
                )
            )
        for owner, container, role in [(pod, daemon, "daemon")] + [
            (p, c, "engine") for p, c in _engines(objects)
        ]:
            mounts = _host_paths(owner, container)
            name = f"{role} container {container.get('name')}"
            theirs = env_of(container).get("SHOAL_CACHE_SHM_DIR")
            if role == "engine" and theirs != shm_dir:
                problems.append(
                    _problem(
                        owner.where,
                        f"{name}: SHOAL_CACHE_SHM_DIR {theirs!r} != the daemon's {shm_dir!r}",
                    )
                )
            if mounts.get(shm_dir) != shm_dir:
                problems.append(
                    _problem(
                        owner.where,
                        f"{name}: {shm_dir} is not the host path {shm_dir} mounted at the same "
                        f"path (mounted: {mounts.get(shm_dir)})",
                    )
                )
            if runtime_dir and mounts.get(runtime_dir) != runtime_dir:
                problems.append(
                    _problem(
                        owner.where,
                        f"{name}: the runtime dir {runtime_dir} is not a host path mounted at the "
                        "same path",
                    )
                )
            config = _kv_transfer_config(container) if role == "engine" else None
            if config is not None:
                endpoint = (config.get("kv_connector_extra_config") or {}).get("endpoint")
                if endpoint != socket:
                    problems.append(
                        _problem(
                            owner.where,
                            f"{name}: the connector endpoint {endpoint!r} != the daemon's socket "
                            f"{socket!r}",
                        )
                    )
    return problems


def same_host_pid(objects: list[Obj], values: Values) -> list[Problem]:
    daemons = {bool(p.spec.get("hostPID", False)) for p in _pods(objects, "cache")}
    problems = []
    for pod in _pods(objects, "engine"):
        mine = bool(pod.spec.get("hostPID", False))
        if daemons and daemons != {mine}:
            problems.append(
                _problem(
                    pod.where,
                    f"hostPID {mine} differs from the cache daemon's {sorted(daemons)} (leases "
                    "of a killed engine are freed by pidfd only when both see the host's PIDs)",
                )
            )
    return problems


# --- (e) known settings ---------------------------------------------------------------------


def known_settings(objects: list[Obj], values: Values) -> list[Problem]:
    classes = _settings_classes()
    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            for item in container.get("env") or []:
                name = str(item.get("name", ""))
                if not name.startswith("SHOAL_") or name in NOT_SETTINGS:
                    continue
                section = next((s for s in SECTIONS if name.startswith(f"SHOAL_{s}_")), None)
                at = f"{pod.where} container {container.get('name')}"
                if section is None:
                    problems.append(
                        _problem(at, f"{name}: no settings section {SECTIONS} reads it")
                    )
                    continue
                key = name.removeprefix(f"SHOAL_{section}_").lower()
                fields = {f.name for f in dataclasses.fields(classes[section])}
                if key not in fields:
                    problems.append(
                        _problem(at, f"{name}: {classes[section].__name__} has no setting {key!r}")
                    )
    return problems


# --- (f) memory -----------------------------------------------------------------------------

_SUFFIXES = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "": 1,
}


def parse_quantity(text: Any) -> int:
    """Bytes of a Kubernetes memory quantity (``8192Mi``, ``8G``, ``1e9``, ``1024``)."""
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([KMGTP]i|[kMGTP])?", str(text).strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {text!r}")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2) or ""])


def _memory(container: Obj, kind: str) -> int | None:
    value = ((container.get("resources") or {}).get(kind) or {}).get("memory")
    return None if value is None else parse_quantity(value)


def memory(objects: list[Obj], values: Values) -> list[Problem]:
    from kvcache.config import CacheConfig
    from loader.sidecar.config import LoaderConfig

    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            at = f"{pod.where} container {container.get('name')}"
            limit, request = _memory(container, "limits"), _memory(container, "requests")
            if limit is None:
                problems.append(_problem(at, "has no memory limit"))
                continue
            if request is not None and request != limit:
                problems.append(
                    _problem(at, f"memory request {request} != limit {limit} (they must be equal)")
                )
            if _shoal(container) == "cache" and pod.labels.get(LABEL_COMPONENT) == "cache":
                env = env_of(container)
                need = sum(
                    parse_size(env.get(f"SHOAL_CACHE_{key.upper()}", _default(CacheConfig, key)))
                    for key in ("shm_bytes", "dram_bytes", "io_staging_bytes")
                )
                if limit < need:
                    problems.append(
                        _problem(
                            at,
                            f"memory limit {limit} < shm + dram + io staging = {need} (the arena "
                            "is charged to the daemon's cgroup)",
                        )
                    )
        loaders = [c for c in all_containers(pod.spec) if _shoal(c) == "loader"]
        if not loaders:
            continue
        env = env_of(loaders[0])
        capacity = parse_size(
            env.get("SHOAL_LOADER_CAPACITY_BYTES", _default(LoaderConfig, "capacity_bytes"))
        )
        shm = _dev_shm_size(pod, env.get("SHOAL_LOADER_SHM_DIR", "/dev/shm"))
        if shm is None or shm < capacity:
            problems.append(
                _problem(
                    pod.where,
                    f"the loader stages up to {capacity} bytes in its shm dir, but its memory "
                    f"emptyDir sizeLimit is {shm}",
                )
            )
    return problems


def _dev_shm_size(pod: PodTemplate, path: str) -> int | None:
    """sizeLimit of the memory emptyDir mounted at ``path`` (None: no such volume)."""
    memory_dirs = {
        v["name"]: v["emptyDir"]
        for v in pod.spec.get("volumes") or []
        if (v.get("emptyDir") or {}).get("medium") == "Memory"
    }
    for container in all_containers(pod.spec):
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath") == path and mount.get("name") in memory_dirs:
                limit = memory_dirs[mount["name"]].get("sizeLimit")
                return None if limit is None else parse_quantity(limit)
    return None


def no_service_links(objects: list[Obj], values: Values) -> list[Problem]:
    return [
        _problem(pod.where, "enableServiceLinks is not false: every Service of the namespace "
                 "becomes <NAME>_PORT=tcp://... variables in its containers (a Service vllm "
                 "sets VLLM_PORT, which vLLM refuses at start)")
        for pod in pod_templates(objects)
        if pod.spec.get("enableServiceLinks") is not False
    ]  # fmt: skip


_SERIES = re.compile(r"\bshoal_[a-z0-9_]+")


def alert_metrics(objects: list[Obj], values: Values) -> list[Problem]:
    from deploy.metrics_catalogue import catalogue

    known: set[str] = set()
    for metric in catalogue():
        known.add(metric.name)
        if metric.type in ("histogram", "summary"):
            known.update(f"{metric.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    problems: list[Problem] = []
    for obj in objects:
        if obj.get("kind") != "PrometheusRule":
            continue
        where = f"PrometheusRule/{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
        for group in obj.get("spec", {}).get("groups", []):
            for rule in group.get("rules", []):
                for series in sorted(set(_SERIES.findall(str(rule.get("expr", ""))))):
                    if series not in known:
                        problems.append(_problem(where, (
                            f"{rule.get('alert') or rule.get('record')}: {series} is not a "
                            "metric Shoal exports (deploy/metrics_catalogue.py)"
                        )))  # fmt: skip
    return problems


CONTRACTS: tuple[Callable[[list[Obj], Values], list[Problem]], ...] = (
    one_uid,
    one_shm_path,
    same_host_pid,
    dialed_services,
    known_settings,
    memory,
    listed_secrets,
    auth_beyond_loopback,
    alert_metrics,
    no_service_links,
)


def contract_problems(objects: list[Obj], values: Values) -> list[Problem]:
    """Every contract, in the module docstring's order."""
    return [problem for contract in CONTRACTS for problem in contract(objects, values)]
