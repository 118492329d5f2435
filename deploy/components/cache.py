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

CurveZMQ (``cache.cluster.keys``; kvcache/cluster/security.py has the model). A Secret key
cannot hold ``/``, so the Secret is flat and ``items`` rebuild ``shoal cache keygen``'s
layout under ``/etc/shoal/curve`` (read-only, mode 0400; fsGroup adds group read)::

    Secret key             file                      keys
    cluster.key            cluster.key               shared, per_node
    cluster.key_secret     cluster.key_secret        shared, per_node  (every member's server key)
    operators.NAME.key     operators/NAME.key        shared, per_node  (cluster.operators)
    members.NODE.key       members/NODE.key          per_node          (cluster.member_nodes)
    NODE.key_secret        NODE.key_secret           per_node

``shared`` (legacy layout, no ``members/``): ``cluster_curve_key`` is the cluster keypair.
``per_node``: ``cluster_curve_key = /etc/shoal/curve/$(NODE_NAME).key_secret``, so a node
missing from ``member_nodes`` fails to start with keygen's advice. One DaemonSet has one pod
template, so every pod mounts every member's secret: per_node buys names pinned to keys and
revoking one node, not isolation between nodes (that needs a Secret per node, not rendered).
``insecure``: no keys, ``cluster_insecure``. ``curve_secret_keys`` lists what the Secret holds::

    kubectl create secret generic shoal-cache-curve --from-file=cluster.key=DIR/cluster.key \\
        --from-file=cluster.key_secret=DIR/cluster.key_secret \\
        --from-file=operators.admin.key=DIR/operators/admin.key [members.NODE.key=... ...]

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
operator token (runtime_dir) and the SSD tier (``ssd_dir``, a hostPath made here and chowned
by an extra step appended to the node-dirs init container); nothing uses ``/tmp``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from deploy import objects, sizes
from deploy.components import node_dirs
from deploy.errors import ValuesError
from deploy.values import Values
from kvcache.config import CacheConfig

__all__ = ["CURVE_DIR", "NAME", "STRUCTURAL", "curve_secret_keys", "render"]

NAME = "shoal-cache"
COMPONENT = "cache"
METRICS_PORT = 9500
CURVE_DIR = "/etc/shoal/curve"
CURVE_VOLUME = "shoal-curve"
SSD_VOLUME = "shoal-ssd"
GRACE_MARGIN_S = 10
KEY_MODES = ("shared", "per_node", "insecure")

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

# Kubernetes Secret keys are [-._a-zA-Z0-9]+; keygen names start alphanumeric.
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

Obj = dict[str, Any]


def render(values: Values) -> list[Obj]:
    if not values.cache.enabled:
        return []
    settings = daemon_settings(values)
    cluster = values.cache.cluster.enabled
    uses_api = cluster and settings["cluster_discovery"] == "k8s"
    out = [_service_account(values, uses_api)]
    if uses_api:
        out += _rbac(values)
    if cluster:
        out.append(_service(values))
    out.append(_daemon_set(values, settings, uses_api))
    return out


def curve_secret_keys(values: Values) -> list[str]:
    """The keys Secret ``cache.cluster.secret`` must hold (empty: no Secret is mounted)."""
    return [key for key, _path in _curve_items(values)]


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
            cluster_port=cluster.port, cluster_host="$(POD_IP)", **_curve_settings(values)
        )
    else:
        merged["cluster_port"] = 0
    merged.update(_engine_settings(values))
    return merged


def _curve_settings(values: Values) -> dict[str, Any]:
    keys = _key_mode(values)
    if keys == "insecure":
        return {"cluster_insecure": True}
    own = "cluster" if keys == "shared" else "$(NODE_NAME)"
    return {"cluster_curve_dir": CURVE_DIR, "cluster_curve_key": f"{CURVE_DIR}/{own}.key_secret"}


def _key_mode(values: Values) -> str:
    keys = values.cache.cluster.keys
    if keys not in KEY_MODES:
        raise ValuesError(f"cache.cluster.keys {keys!r}: expected one of {', '.join(KEY_MODES)}")
    return keys


def _curve_items(values: Values) -> list[tuple[str, str]]:
    """(Secret key, file under CURVE_DIR) for the key layout (module docstring)."""
    cluster = values.cache.cluster
    if not values.cache.enabled or not cluster.enabled or _key_mode(values) == "insecure":
        return []
    for where, names in (("operators", cluster.operators), ("member_nodes", cluster.member_nodes)):
        bad = [name for name in names if not _KEY_NAME.fullmatch(name)]
        if bad:
            raise ValuesError(
                f"cache.cluster.{where}: {bad} cannot name a Secret key (letters, digits, "
                "'.', '_', '-', starting with a letter or digit)"
            )
    items = [("cluster.key", "cluster.key"), ("cluster.key_secret", "cluster.key_secret")]
    items += [(f"operators.{name}.key", f"operators/{name}.key") for name in cluster.operators]
    if cluster.keys == "per_node":
        if not cluster.member_nodes:
            raise ValuesError(
                "cache.cluster.member_nodes: keys per_node needs the node names whose member "
                "keys the Secret holds (`shoal cache keygen DIR --member NODE` for each)"
            )
        if "cluster" in cluster.member_nodes:
            raise ValuesError(
                "cache.cluster.member_nodes: a node named 'cluster' would have the cluster "
                "keypair's file name; use per-node keys on other nodes or keys shared"
            )
        nodes = cluster.member_nodes
        items += [(f"members.{node}.key", f"members/{node}.key") for node in nodes]
        items += [(f"{node}.key_secret", f"{node}.key_secret") for node in nodes]
    return items


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


def _service_account(values: Values, uses_api: bool) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": objects.metadata(values, NAME, COMPONENT),
        "automountServiceAccountToken": uses_api,
    }


def _rbac(values: Values) -> list[Obj]:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": objects.metadata(values, NAME, COMPONENT),
        # KubernetesDiscovery.addresses: CoreV1Api.read_namespaced_endpoints(NAME, ns).
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["endpoints"],
                "resourceNames": [NAME],
                "verbs": ["get"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": objects.metadata(values, NAME, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": values.namespace}],
    }
    return [role, binding]


def _ports(values: Values) -> list[tuple[str, int]]:
    ports = [("metrics", METRICS_PORT)]
    if values.cache.cluster.enabled:
        port = values.cache.cluster.port
        ports = [("cluster", port), ("stream", port + 1), *ports]
    return ports


def _service(values: Values) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": objects.metadata(values, NAME, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": objects.selector(COMPONENT),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in _ports(values)
            ],
        },
    }


def _init_container(values: Values, ssd_dir: str) -> Obj:
    """node_dirs' init container, plus the SSD directory when there is one."""
    init = node_dirs.init_container(values)
    if ssd_dir:
        uid, gid = values.run_as_user, values.run_as_group
        step = f"mkdir -p {ssd_dir} && chown {uid}:{gid} {ssd_dir} && chmod 0700 {ssd_dir}"
        init["command"] = [*init["command"][:-1], f"{init['command'][-1]} && {step}"]
        init["volumeMounts"] = [*init["volumeMounts"], {"name": SSD_VOLUME, "mountPath": ssd_dir}]
    return init


def _prestop(values: Values) -> Obj:
    # $SHOAL_CACHE_CLUSTER_NODE is the container's own setting (the node name); hooks get
    # no $(VAR) expansion, hence the shell.
    drain = f'exec shoal cache drain "$SHOAL_CACHE_CLUSTER_NODE" --timeout {values.cache.drain_s:g}'
    return {"exec": {"command": ["sh", "-c", drain]}}


def _daemon_set(values: Values, settings: dict[str, Any], uses_api: bool) -> Obj:
    derived = sizes.derive(values)
    memory = sizes.quantity(derived.daemon_memory_bytes)
    ssd_dir = str(settings.get("ssd_dir", ""))
    if ssd_dir and not ssd_dir.startswith("/"):
        raise ValuesError(f"cache.settings.ssd_dir {ssd_dir!r}: must be an absolute host path")
    env = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    if values.cache.cluster.enabled:
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env += objects.settings_env(CacheConfig, "cache", settings, where="cache.settings")
    volumes = node_dirs.volumes(values, create=True)
    mounts = node_dirs.mounts(values)
    items = _curve_items(values)
    if items:
        volumes.append(
            {
                "name": CURVE_VOLUME,
                "secret": {
                    "secretName": values.cache.cluster.secret,
                    "defaultMode": 0o400,
                    "items": [{"key": key, "path": path} for key, path in items],
                },
            }
        )
        mounts.append({"name": CURVE_VOLUME, "mountPath": CURVE_DIR, "readOnly": True})
    if ssd_dir:
        volumes.append(
            {"name": SSD_VOLUME, "hostPath": {"path": ssd_dir, "type": "DirectoryOrCreate"}}
        )
        mounts.append({"name": SSD_VOLUME, "mountPath": ssd_dir})
    startup_s = 60 + 2 * math.ceil(derived.arena_bytes / (1 << 30))
    container: Obj = {
        "name": "cache",
        "image": values.image_ref,
        "imagePullPolicy": values.image.pull_policy,
        "command": ["shoal", "cache", "serve"],
        "env": env,
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in _ports(values)
        ],
        "resources": {
            "requests": {"cpu": values.cache.cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "securityContext": objects.container_security(),
        "volumeMounts": mounts,
        "startupProbe": objects.http_probe(
            "/readyz", "metrics", period_s=5, failures=math.ceil(startup_s / 5)
        ),
        "livenessProbe": objects.http_probe("/healthz", "metrics", period_s=10, failures=3),
        "readinessProbe": objects.http_probe("/readyz", "metrics", period_s=5, failures=2),
    }
    if values.cache.cluster.enabled:
        container["lifecycle"] = {"preStop": _prestop(values)}
    shutdown_s = float(settings.get("shutdown_timeout_s", _default("shutdown_timeout_s")))
    pod: Obj = {
        "serviceAccountName": NAME,
        "automountServiceAccountToken": uses_api,
        "enableServiceLinks": False,
        "hostPID": values.cache.share_host_pid,
        "securityContext": objects.pod_security(values),
        "terminationGracePeriodSeconds": math.ceil(
            values.cache.drain_s + shutdown_s + GRACE_MARGIN_S
        ),
        "initContainers": [_init_container(values, ssd_dir)],
        "containers": [container],
        "volumes": volumes,
    }
    if values.cache.node_selector:
        pod["nodeSelector"] = dict(values.cache.node_selector)
    if values.cache.tolerations:
        pod["tolerations"] = [dict(t) for t in values.cache.tolerations]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": objects.metadata(values, NAME, COMPONENT),
        "spec": {
            "selector": {"matchLabels": objects.selector(COMPONENT)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": objects.labels(COMPONENT)}, "spec": pod},
        },
    }
