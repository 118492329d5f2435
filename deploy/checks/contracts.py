"""Cross-object contracts the rendered manifests must keep (issue 16), one function each.

    one_uid          (a) node.py: one UID/GID on the node dirs, the init's chown the same,
                     runAsNonRoot on every pod that mounts them
    one_shm_path     (b) node.py: one shm dir, one daemon socket, the KV-events endpoints
                     the daemon follows
    same_host_pid    (c) node.py: ``hostPID`` equal on the daemon and the engines
    dialed_services  (d) services.py: every in-cluster address a component dials is a
                     rendered Service with that port, selecting pods that expose it
    known_settings   (e) every ``SHOAL_<SECTION>_<KEY>`` names a field of that section's
                     settings class, sits on a container that reads that section (a typo'd or
                     misplaced variable is otherwise ignored), and the container's settings
                     load (``load_config``: a bad value fails here, not at the pod's start)
    memory           (f) the daemon's limit covers shm + dram + io staging; an engine pod's
                     ``/dev/shm``, its vllm and loader limits are at least what
                     ``sizes.derive(values)`` says; the loader's capacity fits ``/dev/shm``;
                     every container has a memory limit and a request equal to it (or none)
    listed_secrets   (g) credentials.py: every Secret file used is projected, mounted and
                     listed by ``deploy.secrets``; every path setting lies under a mount
    alert_metrics    (h) alerts.py: every PrometheusRule expression parses, reads series
                     Shoal exports with their labels, and jobs the monitors scrape
    auth_beyond_loopback (i) credentials.py: a listener beyond loopback has its auth
    no_service_links (j) every pod sets ``enableServiceLinks: false``: a Service named like
                     a setting's prefix (``vllm`` -> ``VLLM_PORT=tcp://...``, which vLLM
                     refuses) would otherwise reach every container of the namespace
    listen_ports     (k) ports.py: a process listens on the containerPort that is targeted,
                     beyond loopback when something targets it
    policies_and_selectors (l) ports.py: NetworkPolicies select pods, name their ports and
                     admit every dial of (d); probes, PDBs and workload selectors resolve

Pods are found by their ``app.kubernetes.io/component`` label (``cache``, ``engine``) and
containers by their command (``shoal <component> ...``), the conventions of deploy/objects.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from deploy.checks import (
    Problem,
    all_containers,
    contract_problem,
    env_of,
    pod_templates,
    shoal_component,
)
from deploy.checks.alerts import alert_metrics
from deploy.checks.credentials import auth_beyond_loopback, listed_secrets
from deploy.checks.node import default_of, engines, one_shm_path, one_uid, same_host_pid
from deploy.checks.ports import listen_ports, policies_and_selectors
from deploy.checks.services import dialed_services
from deploy.objects import LABEL_COMPONENT
from deploy.values import Values
from shoal.config import parse_size
from shoal.errors import ConfigError

__all__ = [
    "CONTRACTS",
    "READS",
    "SECTIONS",
    "alert_metrics",
    "auth_beyond_loopback",
    "contract_problems",
    "dialed_services",
    "known_settings",
    "listed_secrets",
    "listen_ports",
    "memory",
    "no_service_links",
    "one_shm_path",
    "one_uid",
    "parse_quantity",
    "policies_and_selectors",
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


SECTIONS = ("AUTOSCALE", "CACHE", "CONNECTOR", "ENGINES", "HEALTH", "LOADER", "ROUTER")
NOT_SETTINGS = frozenset({"SHOAL_CONFIG"})  # SHOAL_* variables that are not settings
# `shoal <component>` -> the settings section it loads; "" = not shoal (vLLM with the
# connector, which reads its own section and the daemon's shm dir, nothing else of CACHE).
READS: dict[str, str] = {
    "cache": "CACHE",
    "loader": "LOADER",
    "router": "ROUTER",
    "autoscale": "AUTOSCALE",
    "health": "HEALTH",
    "engines": "ENGINES",
    "": "CONNECTOR",
}
ENGINE_ALSO_READS = frozenset({"SHOAL_CACHE_SHM_DIR"})
_KUBELET_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_STAND_IN = "10.0.0.1"  # for $(POD_IP), $(NODE_NAME), valueFrom: an address is also a name


# --- (e) known settings ---------------------------------------------------------------------


def _section_of(name: str) -> str | None:
    return next((s for s in SECTIONS if name.startswith(f"SHOAL_{s}_")), None)


def known_settings(objects: list[Obj], values: Values) -> list[Problem]:
    from shoal.config import load_config

    classes = _settings_classes()
    problems = []
    for pod in pod_templates(objects):
        for container in all_containers(pod.spec):
            component, at = (
                shoal_component(container),
                f"{pod.where} container {container.get('name')}",
            )
            reads = READS.get(component)
            environ: dict[str, str] = {}
            for item in container.get("env") or []:
                name = str(item.get("name", ""))
                if not name.startswith("SHOAL_") or name in NOT_SETTINGS:
                    continue
                section = _section_of(name)
                if section is None:
                    problems.append(
                        contract_problem(at, f"{name}: no settings section {SECTIONS} reads it")
                    )
                    continue
                key = name.removeprefix(f"SHOAL_{section}_").lower()
                if key not in {f.name for f in dataclasses.fields(classes[section])}:
                    problems.append(
                        contract_problem(
                            at, f"{name}: {classes[section].__name__} has no setting {key!r}"
                        )
                    )
                elif (
                    reads is not None
                    and section != reads
                    and not (not component and name in ENGINE_ALSO_READS)
                ):
                    runs = f"shoal {component}" if component else "no shoal command"
                    problems.append(
                        contract_problem(
                            at,
                            f"{name}: the container runs {runs}, which "
                            f"reads SHOAL_{reads}_*, not this",
                        )
                    )
                elif section == reads:
                    text = str(item.get("value", _STAND_IN))
                    environ[name] = _KUBELET_VARIABLE.sub(_STAND_IN, text)
            if reads is not None and environ:
                try:
                    load_config(classes[reads], reads.lower(), environ=environ)
                except ConfigError as exc:
                    problems.append(contract_problem(at, f"its settings do not load: {exc}"))
    return problems


# --- (f) memory -----------------------------------------------------------------------------

_SUFFIXES = {
    **{s: 1 << (10 * (i + 1)) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: 10 ** (3 * (i + 1)) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "m": Decimal("0.001"),
    "": 1,
}
_QUANTITY = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|([KMGTPE]i|[mkMGTPE]))?"
)


def parse_quantity(text: Any) -> int:
    """Bytes of a Kubernetes quantity (``8192Mi``, ``8G``, ``1e9``, ``500m``, ``1Ei``),
    rounded up; ``ValueError`` for anything else."""
    match = _QUANTITY.fullmatch(str(text).strip())
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number + (exponent or "")) * Decimal(_SUFFIXES[suffix or ""])
    except InvalidOperation:
        raise ValueError(f"not a Kubernetes quantity: {text!r}") from None
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def _memory(container: Obj, kind: str) -> int | None:
    value = ((container.get("resources") or {}).get(kind) or {}).get("memory")
    return None if value is None else parse_quantity(value)


def _dev_shm_size(spec: Obj, path: str) -> int | None:
    """sizeLimit of the memory emptyDir mounted at ``path`` (None: no such volume)."""
    memory_dirs = {
        v["name"]: v["emptyDir"]
        for v in spec.get("volumes") or []
        if (v.get("emptyDir") or {}).get("medium") == "Memory"
    }
    for container in all_containers(spec):
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath") == path and mount.get("name") in memory_dirs:
                limit = memory_dirs[mount["name"]].get("sizeLimit")
                return None if limit is None else parse_quantity(limit)
    return None


def memory(objects: list[Obj], values: Values) -> list[Problem]:
    problems = []
    for pod in pod_templates(objects):
        try:
            problems += _pod_memory(objects, pod, values)
        except ValueError as exc:  # a malformed quantity
            problems.append(contract_problem(pod.where, str(exc)))
    return problems


def _pod_memory(objects: list[Obj], pod: Any, values: Values) -> list[Problem]:
    from deploy.sizes import derive
    from kvcache.config import CacheConfig
    from loader.sidecar.config import LoaderConfig

    problems = []
    derived = derive(values)
    engine_pod = pod.labels.get(LABEL_COMPONENT) == "engine"
    vllm = [c for p, c in engines(objects) if p.owner is pod.owner]
    for container in all_containers(pod.spec):
        at = f"{pod.where} container {container.get('name')}"
        limit, request = _memory(container, "limits"), _memory(container, "requests")
        if limit is None:
            problems.append(contract_problem(at, "has no memory limit"))
            continue
        if request is not None and request != limit:
            problems.append(
                contract_problem(
                    at, f"memory request {request} != limit {limit} (they must be equal)"
                )
            )
        if shoal_component(container) == "cache" and pod.labels.get(LABEL_COMPONENT) == "cache":
            env = env_of(container)
            need = sum(
                parse_size(env.get(f"SHOAL_CACHE_{key.upper()}", default_of(CacheConfig, key)))
                for key in ("shm_bytes", "dram_bytes", "io_staging_bytes")
            )
            if limit < need:
                problems.append(
                    contract_problem(
                        at,
                        f"memory limit {limit} < shm + dram + io staging = "
                        f"{need} (the arena is charged to the daemon's cgroup)",
                    )
                )
        want = derived.engine_memory_bytes if any(c is container for c in vllm) else 0
        if engine_pod and shoal_component(container) == "loader":
            want = derived.loader_memory_bytes
        if limit < want:
            problems.append(
                contract_problem(
                    at, f"memory limit {limit} < {want}, what sizes.derive(values) gives it"
                )
            )
    shm = _dev_shm_size(pod.spec, "/dev/shm")
    if engine_pod and vllm and (shm or 0) < derived.engine_shm_bytes:
        problems.append(
            contract_problem(
                pod.where,
                f"/dev/shm sizeLimit {shm} < engine_shm_bytes "
                f"{derived.engine_shm_bytes} (sizes.derive(values))",
            )
        )
    loaders = [c for c in all_containers(pod.spec) if shoal_component(c) == "loader"]
    if loaders:
        env = env_of(loaders[0])
        capacity = parse_size(
            env.get("SHOAL_LOADER_CAPACITY_BYTES", default_of(LoaderConfig, "capacity_bytes"))
        )
        staged = _dev_shm_size(pod.spec, env.get("SHOAL_LOADER_SHM_DIR", "/dev/shm"))
        if staged is None or staged < capacity:
            problems.append(
                contract_problem(
                    pod.where,
                    (
                        f"the loader stages up to {capacity} bytes in its shm dir, but its memory "
                        f"emptyDir sizeLimit is {staged}"
                    ),
                )
            )
    return problems


# --- (j) service links ----------------------------------------------------------------------


def no_service_links(objects: list[Obj], values: Values) -> list[Problem]:
    return [
        contract_problem(
            pod.where,
            "enableServiceLinks is not false: every Service of the namespace "
            "becomes <NAME>_PORT=tcp://... variables in its containers (a Service vllm "
            "sets VLLM_PORT, which vLLM refuses at start)",
        )
        for pod in pod_templates(objects)
        if pod.spec.get("enableServiceLinks") is not False
    ]


CONTRACTS: tuple[Callable[[list[Obj], Values], list[Problem]], ...] = (
    one_uid,
    one_shm_path,
    same_host_pid,
    dialed_services,
    known_settings,
    memory,
    listed_secrets,
    alert_metrics,
    auth_beyond_loopback,
    no_service_links,
    listen_ports,
    policies_and_selectors,
)


def contract_problems(objects: list[Obj], values: Values) -> list[Problem]:
    """Every contract, in the module docstring's order."""
    return [problem for contract in CONTRACTS for problem in contract(objects, values)]
