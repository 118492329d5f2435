"""The node cache daemon on Kubernetes: one ``shoal cache serve`` per node, as a DaemonSet.

Objects (when ``cache.enabled``), in apply order::

    ServiceAccount shoal-cache    token mounted only with k8s discovery (it reads the API)
    Role + RoleBinding            get on core endpoints/shoal-cache: the one call
                                  kvcache/cluster/discovery.py makes (read_namespaced_endpoints)
    Service shoal-cache           headless, publishNotReadyAddresses; ports cluster (P),
                                  stream (P+1), metrics (9500); only with the cluster on
    DaemonSet shoal-cache         init node-dirs, then the daemon

Invariant: the daemon's settings are derived here, not typed twice. The structural ones
(``STRUCTURAL``: directories, bind addresses, ports, node name, discovery target, keys,
engine sockets) come from the values and a user's ``cache.settings`` may not set them (the
render refuses, naming the values field to use), because a different value there would
break a contract another object relies on (the engines' paths, the Service's port names).
The rest is the user's: their key wins over a default derived here (``engine_model``,
``engine_chunk_tokens``, ``engine_tp_size``, ``log_format``, ``cluster_discovery`` =
``k8s`` or ``dns``).

Cluster addresses. Discovery (``k8s``: the Service's Endpoints, port named ``cluster``;
``dns``: the headless Service's records with the configured port) yields ``podIP:port``, and
a member tells itself apart by comparing that with its advertised address
(``ClusterNode._connect_discovered``). So the daemon binds ``cluster_host = $(POD_IP)``
(downward API) and leaves ``cluster_advertise`` empty: it defaults to the bind address,
bracketed for IPv6, which is exactly what discovery reports. Rejected: ``0.0.0.0``, whose
advertised address is whatever the pod's hostname resolves to. ``publishNotReadyAddresses``
lets starting members find each other (the daemon is ready only once it joined).

CurveZMQ (``cache.cluster.keys``: ``shared``, ``per_node`` or ``insecure``): the key
Secrets, their mounts and the per-node ``curve-keygen`` init container are
deploy/components/cache_keys.py's.

SSD tier (``ssd_dir``, a hostPath). Before the daemon ``posix_fallocate``s ``ssd_bytes``,
the node-dirs init container refuses to go on unless the directory's filesystem has that
much free, counting the old spill file (``shoal-<name>.spill``, truncated at start): a
missing NVMe mount then stops the pod with a message instead of filling the root disk.

Lifecycle. ``preStop`` runs ``shoal cache drain <this node>`` over the local ipc socket
(no token, no key), bounded by ``cache.drain_s``: hot blocks go to peers and the daemon
leaves and exits; SIGTERM then finds it gone (or drains within ``shutdown_timeout_s``), so
``terminationGracePeriodSeconds = drain_s + shutdown_timeout_s + 10``. The exec runs ``sh``
because the kubelet expands ``$(VAR)`` in env and command, not in hooks; the hook inherits
the container's ``SHOAL_CACHE_*``, so it finds the same runtime dir. Updates roll one node
at a time (``maxUnavailable: 1``): a restarted daemon starts with an empty arena, and its
node's engines, after failing fast for ``retry_interval_s``, say hello to the new daemon and
map the new arena (kvcache/client/session.py); draining one node at a time keeps the
cluster able to take its hot blocks.

Probes: ``/healthz`` (liveness: the loop turns) and ``/readyz`` (arena reserved, socket
bound, cluster joined; 503 while draining). The probe port opens only once the arena is
reserved and prefaulted, so the startup probe allows 60 s + 2 s per GiB of arena.

Memory: request = limit = ``sizes.derive(values).daemon_memory_bytes`` (the arena's tmpfs
pages are charged to the daemon that prefaults them: deploy/sizes.py). ``hostPID``
(``cache.share_host_pid``) breaks the restricted and baseline Pod Security profiles.

The root filesystem stays read-only: the daemon writes only its arena (shm_dir), socket and
operator token (runtime_dir) and the SSD tier (``ssd_dir``, made and chowned by steps
appended to the node-dirs init container, as is ``/var/lib/shoal/curve``); no ``/tmp``.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from typing import Any

from deploy import objects, sizes
from deploy.components import cache_keys, node_dirs
from deploy.components.cache_keys import CLUSTER_KEYS, CURVE_DIR, NODE_KEY_DIR, curve_secrets
from deploy.errors import ValuesError
from deploy.objects import Obj
from deploy.values import Values
from kvcache.config import CacheConfig
from shoal.config import parse_size

__all__ = [
    "CLUSTER_KEYS",
    "CURVE_DIR",
    "NAME",
    "NODE_KEY_DIR",
    "STRUCTURAL",
    "curve_secrets",
    "render",
]

NAME = "shoal-cache"
COMPONENT = "cache"
METRICS_PORT = 9500
SSD_VOLUME = "shoal-ssd"
GRACE_MARGIN_S = 10
# Settings derived from the values; a user's cache.settings may not set them.
STRUCTURAL: dict[str, str] = {
    "shm_dir": "node_dirs.shm_dir",
    "runtime_dir": "node_dirs.runtime_dir",
    "metrics_host": "(fixed: 0.0.0.0)",
    "metrics_port": "(fixed: 9500, the port named metrics)",
    "cluster_port": "cache.cluster.port",
    "cluster_host": "(the pod IP)",
    "cluster_advertise": "(the pod IP)",
    "cluster_node": "(the Kubernetes node name)",
    "cluster_peers": "(discovery through the Service)",
    "cluster_dns_name": "(the Service)",
    "cluster_k8s_service": "(the Service)",
    "cluster_k8s_namespace": "namespace",
    "cluster_curve_dir": "cache.cluster.keys",
    "cluster_curve_key": "cache.cluster.keys",
    "cluster_insecure": "cache.cluster.keys",
    "engine_events": "cache.num_event_slots",
    "engine_events_replay": "cache.num_event_slots",
}

# The SSD guard (module docstring): argv = directory, bytes needed, spill file name.
_SSD_GUARD = """import os, sys
d, need, spill = sys.argv[1], int(sys.argv[2]), sys.argv[3]
st = os.statvfs(d)
free = st.f_bavail * st.f_frsize
try:
    free += os.stat(os.path.join(d, spill)).st_blocks * 512
except FileNotFoundError:
    pass
if free < need:
    sys.exit(f"shoal: refusing to start the SSD tier: {d} has {free >> 30} GiB free (its old "
             f"spill file counted), ssd_bytes needs {need >> 30} GiB. Is the NVMe mounted "
             "there? Without it the spill file would fill the root disk of this node.")
"""


def render(values: Values) -> list[Obj]:
    if not values.cache.enabled:
        return []
    settings = daemon_settings(values)
    cluster = values.cache.cluster.enabled
    uses_api = cluster and settings["cluster_discovery"] == "k8s"
    out = [objects.service_account(values, NAME, COMPONENT, automount=uses_api)]
    if uses_api:
        # KubernetesDiscovery.addresses: CoreV1Api.read_namespaced_endpoints(NAME, ns).
        rules = [{"apiGroups": [""], "resources": ["endpoints"], "resourceNames": [NAME],
                  "verbs": ["get"]}]  # fmt: skip
        out += [
            objects.role(values, NAME, COMPONENT, rules),
            objects.role_binding(values, NAME, COMPONENT),
        ]
    if cluster:
        out.append(
            objects.service(
                values, NAME, COMPONENT, _ports(values), headless=True, publish_not_ready=True
            )
        )
    out.append(_daemon_set(values, settings, uses_api))
    return out


def daemon_settings(values: Values) -> dict[str, Any]:
    """The daemon's ``[cache]`` settings: the user's table plus the structural ones."""
    user = dict(values.cache.settings)
    taken = sorted(set(user) & set(STRUCTURAL))
    if taken:
        where = ", ".join(f"{key} (set by {STRUCTURAL[key]})" for key in taken)
        raise ValuesError(f"cache.settings: {where}: the deploy derives these; remove them")
    cluster = values.cache.cluster
    merged: dict[str, Any] = {"log_format": "json", **user}
    merged.update(
        shm_dir=values.node_dirs.shm_dir,
        runtime_dir=values.node_dirs.runtime_dir,
        metrics_host="0.0.0.0",
        metrics_port=METRICS_PORT,
        cluster_node="$(NODE_NAME)",
    )
    if cluster.enabled:
        merged.setdefault("cluster_discovery", "k8s")
        discovery = merged["cluster_discovery"]
        if discovery == "k8s":
            merged.update(cluster_k8s_service=NAME, cluster_k8s_namespace=values.namespace)
        elif discovery == "dns":
            merged["cluster_dns_name"] = f"{NAME}.{values.namespace}.svc"
        else:
            raise ValuesError(
                f"cache.settings.cluster_discovery {discovery!r}: on Kubernetes use k8s or dns "
                "(peers come from the Service shoal-cache)"
            )
        merged.update(
            cluster_port=cluster.port, cluster_host="$(POD_IP)", **cache_keys.curve_settings(values)
        )
    else:
        merged["cluster_port"] = 0
    merged.update(_engine_settings(values))
    return merged


def _engine_settings(values: Values) -> dict[str, Any]:
    """KV-event subscriptions: the example engine's (or the user's own engines', when they
    name ``engine_model``) sockets gpu0 .. gpuN-1 in the runtime dir."""
    engine, cache = values.engine, values.cache
    ours = engine.enabled and engine.kv_events
    if cache.num_event_slots < 0:
        raise ValuesError(f"cache.num_event_slots {cache.num_event_slots}: must be >= 0")
    if not cache.num_event_slots or not (ours or "engine_model" in cache.settings):
        return {}
    slots = [node_dirs.event_endpoints(values, slot) for slot in range(cache.num_event_slots)]
    derived: dict[str, Any] = {}
    if ours:
        derived = {
            "engine_model": engine.model,
            "engine_chunk_tokens": engine.chunk_tokens,
            "engine_tp_size": engine.gpus,
        }
    return {
        **derived,
        **{k: v for k, v in cache.settings.items() if k in derived},  # the user's win
        "engine_events": ",".join(pub for pub, _ in slots),
        "engine_events_replay": ",".join(replay for _, replay in slots),
    }


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(CacheConfig) if f.name == name)


# --- objects ------------------------------------------------------------------------------


def _ports(values: Values) -> list[tuple[str, int]]:
    ports = [("metrics", METRICS_PORT)]
    if values.cache.cluster.enabled:
        port = values.cache.cluster.port
        ports = [("cluster", port), ("stream", port + 1), *ports]
    return ports


def _init_containers(values: Values, settings: dict[str, Any], ssd_dir: str) -> list[Obj]:
    """node_dirs' init container, plus the SSD directory and its free-space guard, and the
    node key directory; then, with per-node keys, ``curve-keygen`` (cache_keys.py)."""
    init = node_dirs.init_container(values)
    steps: list[str] = []
    mounts: list[Obj] = []
    if ssd_dir:
        need = parse_size(settings.get("ssd_bytes", _default("ssd_bytes")))
        spill = f"shoal-{settings.get('name', _default('name'))}.spill"  # kvcache/daemon.py
        guard = ["python3", "-c", _SSD_GUARD, ssd_dir, str(need), spill]
        steps += [objects.own_dir_script(values, ssd_dir), shlex.join(guard)]
        mounts.append({"name": SSD_VOLUME, "mountPath": ssd_dir})
    members = curve_secrets(values).get("members")
    if members:
        steps.append(objects.own_dir_script(values, NODE_KEY_DIR))
        mounts.append({"name": cache_keys.NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR})
    if steps:
        init["command"] = [*init["command"][:-1], " && ".join([init["command"][-1], *steps])]
        init["volumeMounts"] = [*init["volumeMounts"], *mounts]
    return [init, cache_keys.keygen_container(values, members)] if members else [init]


def _prestop(values: Values) -> Obj:
    # $SHOAL_CACHE_CLUSTER_NODE is the container's own setting (the node name); hooks get
    # no $(VAR) expansion, hence the shell.
    drain = f'exec shoal cache drain "$SHOAL_CACHE_CLUSTER_NODE" --timeout {values.cache.drain_s:g}'
    return {"exec": {"command": ["sh", "-c", drain]}}


def _daemon_set(values: Values, settings: dict[str, Any], uses_api: bool) -> Obj:
    derived = sizes.derive(values)
    ssd_dir = str(settings.get("ssd_dir", ""))
    if ssd_dir and not ssd_dir.startswith("/"):
        raise ValuesError(f"cache.settings.ssd_dir {ssd_dir!r}: must be an absolute host path")
    env = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    if values.cache.cluster.enabled:
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env += objects.settings_env(CacheConfig, "cache", settings, where="cache.settings")
    volumes = node_dirs.volumes(values, create=True)
    mounts = node_dirs.mounts(values)
    curve_volumes, curve_mounts = cache_keys.volumes_and_mounts(values)
    volumes += curve_volumes
    mounts += curve_mounts
    if ssd_dir:
        volumes.append(
            {"name": SSD_VOLUME, "hostPath": {"path": ssd_dir, "type": "DirectoryOrCreate"}}
        )
        mounts.append({"name": SSD_VOLUME, "mountPath": ssd_dir})
    startup_s = 60 + 2 * math.ceil(derived.arena_bytes / (1 << 30))
    container = objects.shoal_container(
        values, "cache", ["shoal", "cache", "serve"], env=env,
        memory_bytes=derived.daemon_memory_bytes, cpu=values.cache.cpu, ports=_ports(values),
        mounts=mounts,
        startup=objects.http_probe(
            "/readyz", "metrics", period_s=5, failures=math.ceil(startup_s / 5)
        ),
        liveness=objects.http_probe("/healthz", "metrics", period_s=10, failures=3),
        readiness=objects.http_probe("/readyz", "metrics", period_s=5, failures=2),
    )  # fmt: skip
    if values.cache.cluster.enabled:
        container["lifecycle"] = {"preStop": _prestop(values)}
    shutdown_s = float(settings.get("shutdown_timeout_s", _default("shutdown_timeout_s")))
    grace_s = math.ceil(values.cache.drain_s + shutdown_s + GRACE_MARGIN_S)
    pod = objects.pod_spec(values, NAME, automount=uses_api,
                           host_pid=values.cache.share_host_pid, grace_s=grace_s)  # fmt: skip
    pod["initContainers"] = _init_containers(values, settings, ssd_dir)
    pod["containers"] = [container]
    pod["volumes"] = volumes
    if values.cache.node_selector:
        pod["nodeSelector"] = dict(values.cache.node_selector)
    if values.cache.tolerations:
        pod["tolerations"] = [dict(t) for t in values.cache.tolerations]
    return objects.daemon_set(values, NAME, COMPONENT, pod)
