"""The example vLLM engine: a Deployment ``engine.name`` wired to the node's cache daemon.

Invariant: every path, UID and size the engine shares with the cache daemon comes from
``node_dirs`` and ``sizes`` (never written here a second time), so the connector's
``endpoint`` is the daemon's socket, ``SHOAL_CACHE_SHM_DIR`` is the directory of its arena,
the engine runs as the daemon's UID (the arena is 0600, the socket directory 0700), and
``hostPID`` is the daemon's (a contract: with it the daemon frees a killed engine's leases
through its pidfd, and both sides must see the same PID namespace).

The pod::

    initContainers: loader   native sidecar (restartPolicy: Always): `shoal loader serve` on
                             a Unix socket in a pod-local emptyDir (/run/shoal-pod/loader),
                             staging into the pod's /dev/shm (charged to the sidecar's
                             memory: tmpfs pages count where first written); a postStart
                             hook starts one detached prefetch of exactly
                             engine.loader.uri (its only allowed URI) and
                             the startupProbe passes once that staging is ``ready``, so vLLM
                             starts after the weights are staged and reads them from the
                             sidecar (peer+unix://...), never from the origin a second time
    containers:     vllm     --kv-transfer-config (ShoalConnector), --kv-events-config (zmq on
                             the node's gpu<slot> socket), --load-format shoal
    volumes:        the node dirs (hostPath, type Directory: the daemon makes them),
                    /dev/shm (emptyDir, Memory, sizes.engine_shm_bytes; Kubernetes' and
                    Docker's default 64 MiB is too small for NCCL and the staged weights),
                    home and /tmp (emptyDirs: the root filesystem is read-only)

One pod per node with KV events: the publisher binds ``ipc://<runtime_dir>/gpu<slot>.pub``
on the *node's* socket directory, so a second pod of this Deployment on the node would bind
the same path and one of them would publish nowhere. A required podAntiAffinity on this
Deployment's own labels (topologyKey ``kubernetes.io/hostname``) keeps them apart; another
Deployment on the same node takes another ``events_slot``. For the same reason the rollout
is ``maxSurge: 0`` (a surge pod could not schedule beside the pod it replaces, and with two
replicas the default 25% rounds to zero unavailable: the rollout would wait for ever).

The loader with an empty ``engine.loader.uri`` (the default values' hub model): there is
nothing to stream through the sidecar, so the pod has no sidecar and vLLM loads ``MODEL``
itself; the /dev/shm size still counts the loader's capacity (``sizes.derive`` counts it
whenever the loader is enabled). Set the URI, or ``loader.enabled: false``.

Settings the sidecar must have for the pod to work (``runtime_dir``, ``shm_dir``,
``listen``, ``allow``) are refused in ``engine.loader.settings``; every other loader key is
the user's.
"""

from __future__ import annotations

import json
import math
from typing import Any

from deploy import sizes
from deploy.components import node_dirs
from deploy.errors import ValuesError
from deploy.objects import (
    container_security,
    env,
    http_probe,
    labels,
    metadata,
    pod_security,
    selector,
    settings_env,
)
from deploy.values import Values

__all__ = [
    "INSTANCE_LABEL",
    "LOADER_METRICS_PORT",
    "LOADER_RUNTIME_DIR",
    "POD_RUN_DIR",
    "engine_selector",
    "loader_socket",
    "render",
    "vllm_args",
]

INSTANCE_LABEL = "app.kubernetes.io/instance"
# Pod-local (an emptyDir), not the node's runtime_dir. The sidecar makes its runtime_dir
# itself (mode 0700, its UID): it chmods it, and the emptyDir's own root is root's.
POD_RUN_DIR = "/run/shoal-pod"
LOADER_RUNTIME_DIR = f"{POD_RUN_DIR}/loader"
LOADER_METRICS_PORT = 9501
HOME = "/home/shoal"
_PROBE_PERIOD_S = 10
_LOADER_OWNED = ("runtime_dir", "shm_dir", "listen", "allow")

Obj = dict[str, Any]


def engine_selector(values: Values) -> dict[str, str]:
    """The labels the Service, the anti-affinity and the Deployment select these pods by."""
    return {**selector("engine"), INSTANCE_LABEL: values.engine.name}


def loader_socket(values: Values) -> str:
    name = str(values.engine.loader.settings.get("name", "default"))
    return f"{LOADER_RUNTIME_DIR}/shoal-loader-{name}.sock"


def _uses_loader(values: Values) -> bool:
    return values.engine.loader.enabled and bool(values.engine.loader.uri)


def render(values: Values) -> list[Obj]:
    engine = values.engine
    if not engine.enabled:
        return []
    extra = {INSTANCE_LABEL: engine.name}
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(values, engine.name, "engine", extra_labels=extra),
        "automountServiceAccountToken": False,
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(values, engine.name, "engine", extra_labels=extra),
        "spec": {
            "selector": engine_selector(values),
            "ports": [{"name": "http", "port": engine.port, "targetPort": "http"}],
        },
    }
    return [account, service, _deployment(values)]


def _deployment(values: Values) -> Obj:
    engine = values.engine
    pod_labels = {**labels("engine"), INSTANCE_LABEL: engine.name}
    spec: Obj = {
        "serviceAccountName": engine.name,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "hostPID": values.cache.share_host_pid,
        "securityContext": pod_security(values),
    }
    if _uses_loader(values):
        spec["initContainers"] = [_loader(values)]
    spec["containers"] = [_vllm(values)]
    spec["volumes"] = _volumes(values)
    if engine.kv_events:
        spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": engine_selector(values)},
             "topologyKey": "kubernetes.io/hostname"},
        ]}}  # fmt: skip
    if engine.node_selector:
        spec["nodeSelector"] = dict(engine.node_selector)
    if engine.tolerations:
        spec["tolerations"] = [dict(t) for t in engine.tolerations]
    deployment_spec: Obj = {
        "selector": {"matchLabels": engine_selector(values)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
        },
        "template": {"metadata": {"labels": pod_labels}, "spec": spec},
    }
    # With the autoscaler on, replicas are its to set: a manifest that names them would undo
    # its decision on every `kubectl apply` (the HPA rule). Created without the field, the
    # Deployment starts at 1 and the autoscaler raises it to min_replicas within a round.
    if not values.autoscaler.enabled:
        deployment_spec = {"replicas": engine.replicas, **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(
            values, engine.name, "engine", extra_labels={INSTANCE_LABEL: engine.name}
        ),
        "spec": deployment_spec,
    }


def _volumes(values: Values) -> list[Obj]:
    derived = sizes.derive(values)
    volumes: list[Obj] = [
        {"name": "dshm",
         "emptyDir": {"medium": "Memory", "sizeLimit": sizes.quantity(derived.engine_shm_bytes)}},
        {"name": "home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]  # fmt: skip
    if values.engine.connector or values.engine.kv_events:
        volumes += node_dirs.volumes(values, create=False)
    if _uses_loader(values):
        volumes.append({"name": "loader-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    return volumes


def vllm_args(values: Values) -> list[str]:
    """``vllm serve`` and its arguments (the JSON ones as compact JSON strings)."""
    engine = values.engine
    args = [
        "vllm", "serve", engine.model,
        "--host", "0.0.0.0", "--port", str(engine.port),
        "--tensor-parallel-size", str(engine.gpus),
        "--served-model-name", engine.model,
    ]  # fmt: skip
    if engine.connector:
        transfer = {
            "kv_connector": "ShoalConnector",
            "kv_connector_module_path": "kvcache.connector.vllm",
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {
                "chunk_tokens": engine.chunk_tokens,
                "endpoint": node_dirs.daemon_socket(values),
            },
        }
        args += ["--kv-transfer-config", _json(transfer)]
    if engine.kv_events:
        pub, replay = node_dirs.event_endpoints(values, engine.events_slot)
        events = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": pub, "replay_endpoint": replay}  # fmt: skip
        args += ["--kv-events-config", _json(events)]
    if _uses_loader(values):
        loader: Obj = {"model_weights": f"peer+unix://{loader_socket(values)}/{engine.loader.uri}"}
        s3_endpoint = engine.loader.settings.get("s3_endpoint")
        if s3_endpoint:  # the origin, should the sidecar fail mid-load (loader.sources.peer)
            loader["s3_endpoint"] = str(s3_endpoint)
        args += ["--load-format", "shoal", "--model-loader-extra-config", _json(loader)]
    return args + list(engine.extra_args)


def _json(document: Obj) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=False)


def _vllm(values: Values) -> Obj:
    engine = values.engine
    derived = sizes.derive(values)
    environ = [env("HOME", HOME), env("HF_HOME", f"{HOME}/.cache/huggingface")]
    mounts: list[Obj] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "home", "mountPath": HOME},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if engine.connector:  # the connector maps the daemon's arena from here
        environ.append(env("SHOAL_CACHE_SHM_DIR", values.node_dirs.shm_dir))
    if engine.connector or engine.kv_events:
        mounts += node_dirs.mounts(values)
    if _uses_loader(values):
        mounts.append({"name": "loader-run", "mountPath": POD_RUN_DIR})
    startup_failures = max(1, math.ceil(engine.startup_s / _PROBE_PERIOD_S))
    memory = sizes.quantity(derived.engine_memory_bytes)
    return {
        "name": "vllm",
        "image": engine.image,
        "command": vllm_args(values),
        "env": environ,
        "ports": [{"name": "http", "containerPort": engine.port}],
        "resources": {
            "requests": {"cpu": engine.cpu, "memory": memory, "nvidia.com/gpu": str(engine.gpus)},
            "limits": {"memory": memory, "nvidia.com/gpu": str(engine.gpus)},
        },
        "securityContext": container_security(),
        "volumeMounts": mounts,
        "startupProbe": http_probe(
            "/health", "http", period_s=_PROBE_PERIOD_S, failures=startup_failures
        ),
        "readinessProbe": http_probe("/health", "http", period_s=5),
        "livenessProbe": http_probe("/health", "http", period_s=10, failures=3),
    }


def _loader_settings(values: Values) -> Obj:
    loader = values.engine.loader
    if "," in loader.uri or any(c.isspace() for c in loader.uri):
        raise ValuesError(f"engine.loader.uri {loader.uri!r}: one URI, no commas or spaces")
    owned = sorted(set(_LOADER_OWNED) & set(loader.settings))
    if owned:
        raise ValuesError(
            f"engine.loader.settings: {owned} are set by the deployment (the sidecar serves a "
            "Unix socket in a pod-local directory, stages into the pod's /dev/shm and allows "
            "exactly engine.loader.uri); remove them"
        )
    return {
        "log_format": "json",
        "metrics_port": LOADER_METRICS_PORT,
        "metrics_host": "0.0.0.0",
        **loader.settings,
        "runtime_dir": LOADER_RUNTIME_DIR,
        "shm_dir": "/dev/shm",
        "allow": loader.uri,
    }


def _loader(values: Values) -> Obj:
    """The native sidecar: started before vLLM, running beside it, stopped after it."""
    from loader.sidecar.config import LoaderConfig

    loader = values.engine.loader
    settings = _loader_settings(values)
    # Started once the socket answers; detached, so the hook returns at once (a hook
    # that waited for the staging would hold the kubelet's sync of this pod). The URI is
    # the allow-list's one entry, read from the environment: no quoting of it in a script.
    start = (
        "i=0; while [ $i -lt 120 ]; do shoal loader health >/dev/null 2>&1 && "
        'exec shoal loader prefetch --detach "$SHOAL_LOADER_ALLOW"; '
        "i=$((i + 1)); sleep 1; done; exit 1"
    )
    # Ready = the one allowed checkpoint is staged; a failed staging never becomes ready,
    # the probe gives up, the kubelet restarts the sidecar and postStart stages it again.
    staged = 'shoal loader list --json | grep -q \'"state": "ready"\''
    startup_failures = max(1, math.ceil(values.engine.startup_s / _PROBE_PERIOD_S))
    # tmpfs pages are charged to the cgroup that first writes them: the sidecar's (vLLM
    # reads the staging through the sidecar's Read RPC and maps nothing).
    memory = sizes.quantity(sizes.derive(values).loader_memory_bytes)
    container: Obj = {
        "name": "loader",
        "image": values.image_ref,
        "imagePullPolicy": values.image.pull_policy,
        "restartPolicy": "Always",
        "command": ["shoal", "loader", "serve"],
        "env": settings_env(LoaderConfig, "loader", settings, where="engine.loader.settings"),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "loader-run", "mountPath": POD_RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "resources": {"requests": {"cpu": "1", "memory": memory}, "limits": {"memory": memory}},
        "lifecycle": {"postStart": {"exec": {"command": ["sh", "-c", start]}}},
        "startupProbe": {
            "exec": {"command": ["sh", "-c", staged]},
            "periodSeconds": _PROBE_PERIOD_S,
            "failureThreshold": startup_failures,
            "timeoutSeconds": 10,
        },
        "livenessProbe": {
            "exec": {"command": ["shoal", "loader", "health"]},
            "periodSeconds": 20,
            "failureThreshold": 3,
            "timeoutSeconds": 10,
        },
    }
    if int(settings["metrics_port"]):
        container["ports"] = [{"name": "metrics", "containerPort": int(settings["metrics_port"])}]
    if loader.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": loader.s3_secret}}]
    return container
