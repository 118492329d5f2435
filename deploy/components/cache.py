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

CurveZMQ (``cache.cluster.keys``; kvcache/cluster/security.py has the model). Keys are
admitted and revoked by editing a Secret, with no restart and no re-render: the kubelet
updates a Secret mounted whole (no ``items``, no ``subPath``) in place, keys added and
deleted, and the daemon re-reads ``members/*.key`` and ``operators/*.key`` every
``cluster_key_reload_s`` (KeyRing globs ``*.key``: the kubelet's ``..data`` and
``..<timestamp>`` entries do not match, and each ``NAME.key`` symlink reads as the file).
So ``/etc/shoal/curve`` is a tiny memory emptyDir holding nested mounts (the runtime sorts
mounts by depth and makes the mount points in the writable emptyDir)::

    /etc/shoal/curve/           emptyDir (medium Memory)                    shared, per_node
      cluster.key, .key_secret  subPath of Secret <secret> (0400): replaced shared, per_node
                                only by a cluster-keypair rotation, which restarts every member
      operators/                Secret <secret>-operators, whole: NAME.key  shared, per_node
      members/                  Secret <secret>-members, whole: NODE.key    per_node
    /var/lib/shoal/curve/       hostPath 0700: NODE.key_secret, made on the node  per_node

``shared`` (legacy layout, no ``members/``): ``cluster_curve_key`` is the cluster keypair.
``per_node``: a node's own keypair never leaves it. The init container ``curve-keygen``
(as ``run_as_user``) runs ``shoal cache keygen /var/lib/shoal/curve --member $NODE_NAME``
unless the key is there, logs the public key with the ``kubectl patch`` that admits it,
and waits until it is in ``members/``; ``cluster_curve_key`` is that node key. A new node
(or one whose key was removed) thus waits in Init with the command to run in its log,
instead of crash-looping in ``load_curve_keys``. Rejected: naming the nodes in the values
(``member_nodes``, for a nodeAffinity): admitting a node would need a re-render and a
DaemonSet roll, and the nodeSelector already picks the nodes. ``insecure``: no keys,
``cluster_insecure``. deploy/secrets.py gives the commands that create the three Secrets.

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
import re
import shlex
from typing import Any

from deploy import objects, sizes
from deploy.components import node_dirs
from deploy.errors import ValuesError
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
CURVE_DIR = "/etc/shoal/curve"
CURVE_VOLUME = "shoal-curve"  # the emptyDir the key mounts nest in
CLUSTER_KEYS = ("cluster.key", "cluster.key_secret")
NODE_KEY_DIR = "/var/lib/shoal/curve"  # per_node: this node's own keypair, made here
NODE_KEY_VOLUME = "shoal-node-key"
KEYGEN_POLL_S = 10
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


def curve_secrets(values: Values) -> dict[str, str]:
    """Role (``cluster``, ``operators``, ``members``) -> the Secret the pods mount for it
    (module docstring); empty when no keys are mounted."""
    cluster = values.cache.cluster
    if not values.cache.enabled or not cluster.enabled or _key_mode(values) == "insecure":
        return {}
    bad = [name for name in cluster.operators if not _KEY_NAME.fullmatch(name)]
    if bad:
        raise ValuesError(
            f"cache.cluster.operators: {bad} cannot name a Secret key (letters, digits, "
            "'.', '_', '-', starting with a letter or digit)"
        )
    roles = {"cluster": cluster.secret, "operators": f"{cluster.secret}-operators"}
    if cluster.keys == "per_node":
        roles["members"] = f"{cluster.secret}-members"
    return roles


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
    own = f"{CURVE_DIR}/cluster" if keys == "shared" else f"{NODE_KEY_DIR}/$(NODE_NAME)"
    return {"cluster_curve_dir": CURVE_DIR, "cluster_curve_key": f"{own}.key_secret"}


def _key_mode(values: Values) -> str:
    keys = values.cache.cluster.keys
    if keys not in KEY_MODES:
        raise ValuesError(f"cache.cluster.keys {keys!r}: expected one of {', '.join(KEY_MODES)}")
    return keys


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


def _own_dir(values: Values, path: str) -> str:
    uid, gid = values.run_as_user, values.run_as_group
    return f"mkdir -p {path} && chown {uid}:{gid} {path} && chmod 0700 {path}"


def _init_containers(values: Values, settings: dict[str, Any], ssd_dir: str) -> list[Obj]:
    """node_dirs' init container, plus the SSD directory and its free-space guard, and the
    node key directory; then, with per-node keys, ``curve-keygen`` (module docstring)."""
    init = node_dirs.init_container(values)
    steps: list[str] = []
    mounts: list[Obj] = []
    if ssd_dir:
        need = parse_size(settings.get("ssd_bytes", _default("ssd_bytes")))
        spill = f"shoal-{settings.get('name', _default('name'))}.spill"  # kvcache/daemon.py
        guard = ["python3", "-c", _SSD_GUARD, ssd_dir, str(need), spill]
        steps += [_own_dir(values, ssd_dir), shlex.join(guard)]
        mounts.append({"name": SSD_VOLUME, "mountPath": ssd_dir})
    members = curve_secrets(values).get("members")
    if members:
        steps.append(_own_dir(values, NODE_KEY_DIR))
        mounts.append({"name": NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR})
    if steps:
        init["command"] = [*init["command"][:-1], " && ".join([init["command"][-1], *steps])]
        init["volumeMounts"] = [*init["volumeMounts"], *mounts]
    return [init, _keygen_container(values, members)] if members else [init]


def _keygen_container(values: Values, members: str) -> Obj:
    """Make this node's keypair unless it exists, log how to admit it, wait until it is."""
    # A JSON merge patch of data.NODE.key, the public key file in base64: one line to paste.
    admit = (
        f"kubectl -n {values.namespace} patch secret {members} --type merge -p "
        """'{\\"data\\":{\\"$node.key\\":\\"$b64\\"}}'"""
    )
    script = f"""set -eu
dir={NODE_KEY_DIR}
node="$NODE_NAME"
if [ ! -s "$dir/$node.key_secret" ] || [ ! -s "$dir/members/$node.key" ]; then
  shoal cache keygen "$dir" --member "$node" --force >/dev/null
fi
key=$(grep public-key "$dir/members/$node.key" | cut -d '"' -f 2)
b64=$(base64 -w0 "$dir/members/$node.key")
n=0
until grep -qsF -e "$key" {CURVE_DIR}/members/*.key; do
  if [ $((n % 30)) -eq 0 ]; then
    echo "shoal: node $node: CurveZMQ public key $key is not in Secret {members}; admit it:"
    echo "  {admit}"
  fi
  n=$((n + 1))
  sleep {KEYGEN_POLL_S}
done
echo "shoal: node $node: key $key admitted"
"""
    return {
        "name": "curve-keygen",
        "image": values.image_ref,
        "imagePullPolicy": values.image.pull_policy,
        "command": ["sh", "-c", script],
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "securityContext": objects.container_security(),
        "volumeMounts": [
            {"name": NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR},
            {
                "name": _secret_volume("members"),
                "mountPath": f"{CURVE_DIR}/members",
                "readOnly": True,
            },
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}},
    }


def _secret_volume(role: str) -> str:
    return f"{CURVE_VOLUME}-{role}"


def _curve_volumes(values: Values) -> tuple[list[Obj], list[Obj]]:
    """(volumes, daemon mounts) of the key layout (module docstring); none without keys."""
    secrets = curve_secrets(values)
    if not secrets:
        return [], []
    volumes: list[Obj] = [
        {"name": CURVE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": _secret_volume("cluster"),
            "secret": {
                "secretName": secrets["cluster"],
                "defaultMode": 0o400,
                "items": [{"key": key, "path": key} for key in CLUSTER_KEYS],
            },
        },
    ]
    # Not readOnly: the nested mount points are made in it when the container starts.
    mounts: list[Obj] = [{"name": CURVE_VOLUME, "mountPath": CURVE_DIR}]
    mounts += [
        {"name": _secret_volume("cluster"), "mountPath": f"{CURVE_DIR}/{key}", "subPath": key,
         "readOnly": True}
        for key in CLUSTER_KEYS
    ]  # fmt: skip
    for role in ("operators", "members"):
        if role in secrets:  # whole Secrets: updated in place (admit and revoke)
            volumes.append(
                {
                    "name": _secret_volume(role),
                    "secret": {"secretName": secrets[role], "defaultMode": 0o444},
                }
            )
            mounts.append(
                {"name": _secret_volume(role), "mountPath": f"{CURVE_DIR}/{role}", "readOnly": True}
            )
    if "members" in secrets:
        volumes.append(
            {
                "name": NODE_KEY_VOLUME,
                "hostPath": {"path": NODE_KEY_DIR, "type": "DirectoryOrCreate"},
            }
        )
        mounts.append({"name": NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR, "readOnly": True})
    return volumes, mounts


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
    curve_volumes, curve_mounts = _curve_volumes(values)
    volumes += curve_volumes
    mounts += curve_mounts
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
        "initContainers": _init_containers(values, settings, ssd_dir),
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
