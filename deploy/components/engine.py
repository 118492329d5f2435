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
                             the gpu<slot> socket it claimed), --load-format shoal,
                             --shutdown-timeout engine.drain_s; HF_TOKEN from
                             engine.hf_token_secret, the loader's S3 Secret (the origin
                             fallback reads S3 itself)
    volumes:        the node dirs (hostPath, type Directory: the daemon makes them),
                    /dev/shm (emptyDir, Memory, sizes.engine_shm_bytes; Kubernetes' and
                    Docker's default 64 MiB is too small for NCCL and the staged weights),
                    home and /tmp (emptyDirs: the root filesystem is read-only)

Several engines per node, one KV-event socket each: the daemon follows the sockets
``ipc://<runtime_dir>/gpu0.pub .. gpu<N-1>.pub`` (N = ``cache.num_event_slots``) and each
engine pod claims a free slot when vLLM starts. The container runs ``sh -c`` over
``vllm serve ...`` (its arguments pass as ``"$@"``, never re-quoted): for i in 0..N-1 it opens
``<runtime_dir>/gpu$i.lock`` on fd 9 and tries ``flock -n 9`` (util-linux, in the vLLM
image); with the first lock it gets, it ``exec``s vLLM with ``--kv-events-config`` naming
``gpu$i``. fd 9 stays open in the exec'd vLLM, so the slot is held exactly as long as that
process lives: a crash or a restart frees it, with no state to clean up. With every slot
taken (more engines on the node than N), vLLM starts without KV events and says so in
one line of its log: it serves, and only prefix-aware routing does not see its GPU. A
lock on the node's own socket directory rather than a per-pod socket name: vLLM binds
the name it is given, and the daemon must know the names to subscribe to.
Rejected: a required podAntiAffinity (one engine per node: a 1-GPU engine left the other
GPUs of its node idle) and a per-Deployment slot (the same, per Deployment). Pods are
spread over nodes by preference (``topologySpreadConstraints``, ``ScheduleAnyway``). The
rollout is ``maxSurge: 0``: a GPU cluster rarely has a spare GPU for a surge pod, which
would wait Pending while the rollout waited for it.

Draining: a pod that is going away (scale-down, rollout, eviction) first sleeps
``PRESTOP_SLEEP_S`` in ``preStop`` (the routers poll EndpointSlices and drop it meanwhile;
a sleep action, GA in Kubernetes 1.32, needs no shell in the image), then SIGTERM makes vLLM
stop accepting and finish its running requests for up to ``engine.drain_s``
(``--shutdown-timeout``; vLLM's default 0 aborts them, and the router retries only before
the first byte). ``terminationGracePeriodSeconds`` = the sleep + ``drain_s`` + 15 s for
vLLM's own teardown.

The loader with an empty ``engine.loader.uri`` (the default values' hub model): there is
nothing to stream through the sidecar, so the pod has no sidecar and vLLM loads ``MODEL``
itself; the /dev/shm size and the memory limits then leave the loader's capacity out
(``sizes.derive`` counts it only when the loader runs: enabled and given a URI). Set the
URI, or ``loader.enabled: false``.

``engine.extra_args`` may not repeat a flag the deployment sets (``OWNED_FLAGS``, in any of
vLLM's spellings: ``--flag=value``, ``--flag.key``, underscores, ``-tp``): vLLM takes the
last copy while the Service, the probes and ``shoal deploy check`` go by the first.

Settings the sidecar must have for the pod to work (``runtime_dir``, ``shm_dir``,
``listen``, ``allow``) are refused in ``engine.loader.settings``; every other loader key is
the user's.
"""

from __future__ import annotations

import json
import math
import re

from deploy import objects, sizes
from deploy.components import node_dirs
from deploy.errors import ValuesError
from deploy.objects import (
    Obj,
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
    "OWNED_FLAGS",
    "POD_RUN_DIR",
    "PRESTOP_SLEEP_S",
    "engine_selector",
    "loader_metrics_port",
    "loader_socket",
    "render",
    "slot_script",
    "vllm_args",
    "vllm_command",
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
PRESTOP_SLEEP_S = 10
_TEARDOWN_S = 15
# The flags vllm_args sets -> the values field that sets them.
OWNED_FLAGS = {
    "--host": "nothing (vLLM listens on 0.0.0.0 for the Service)",
    "--port": "engine.port",
    "--tensor-parallel-size": "engine.gpus",
    "--served-model-name": "engine.model",
    "--kv-transfer-config": "engine.connector and engine.chunk_tokens",
    "--kv-events-config": "engine.kv_events (slots: cache.num_event_slots)",
    "--load-format": "engine.loader.uri",
    "--model-loader-extra-config": "engine.loader.uri and engine.loader.settings",
    "--shutdown-timeout": "engine.drain_s",
}
_SHORT_FLAGS = {"-tp": "--tensor-parallel-size"}
# Characters a runtime_dir may have to sit unquoted inside the slot script's double quotes.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9/._-]*$")


def engine_selector(values: Values) -> dict[str, str]:
    """The labels the Service, the spread, the PDB and the Deployment select these pods by."""
    return {**selector("engine"), INSTANCE_LABEL: values.engine.name}


def loader_socket(values: Values) -> str:
    name = str(values.engine.loader.settings.get("name", "default"))
    return f"{LOADER_RUNTIME_DIR}/shoal-loader-{name}.sock"


def _uses_loader(values: Values) -> bool:
    return values.engine.loader.enabled and bool(values.engine.loader.uri)


def loader_metrics_port(values: Values) -> int:
    """The loader sidecar's metrics port; 0 when the pod has no sidecar or it has none."""
    return int(_loader_settings(values)["metrics_port"]) if _uses_loader(values) else 0


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
    service = objects.service(values, engine.name, "engine", [("http", engine.port)],
                              selects=engine_selector(values), extra_labels=extra,
                              protocol=False)  # fmt: skip
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
    spec["terminationGracePeriodSeconds"] = PRESTOP_SLEEP_S + engine.drain_s + _TEARDOWN_S
    spec["topologySpreadConstraints"] = [{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": engine_selector(values)},
    }]  # fmt: skip
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


def _check_extra_args(values: Values) -> None:
    for arg in values.engine.extra_args:
        text = str(arg)
        if text.startswith("--"):
            key = "--" + text[2:].split("=", 1)[0].split(".", 1)[0].replace("_", "-")
        else:
            key = _SHORT_FLAGS.get(text.split("=", 1)[0], "")
        if key in OWNED_FLAGS:
            raise ValuesError(
                f"engine.extra_args: {text!r} repeats {key}, which the deployment sets "
                f"(vLLM would take the last copy, the Service and the checks the first); "
                f"set it with {OWNED_FLAGS[key]}"
            )


def vllm_args(values: Values) -> list[str]:
    """``vllm serve`` and its arguments (the JSON ones as compact JSON strings), all but
    ``--kv-events-config``, which ``slot_script`` adds once it has a slot."""
    engine = values.engine
    _check_extra_args(values)
    if engine.drain_s < 0:
        raise ValuesError(f"engine.drain_s {engine.drain_s}: must be >= 0 (0 = abort)")
    args = [
        "vllm", "serve", engine.model,
        "--host", "0.0.0.0", "--port", str(engine.port),
        "--tensor-parallel-size", str(engine.gpus),
        "--served-model-name", engine.model,
        "--shutdown-timeout", str(engine.drain_s),
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
    if _uses_loader(values):
        loader: Obj = {"model_weights": f"peer+unix://{loader_socket(values)}/{engine.loader.uri}"}
        s3_endpoint = engine.loader.settings.get("s3_endpoint")
        if s3_endpoint:  # the origin, should the sidecar fail mid-load (loader.sources.peer)
            loader["s3_endpoint"] = str(s3_endpoint)
        args += ["--load-format", "shoal", "--model-loader-extra-config", _json(loader)]
    return args + list(engine.extra_args)


def _events_slots(values: Values) -> int:
    """How many slots the engine may claim: the daemon's, when it runs and follows any."""
    engine, cache = values.engine, values.cache
    return cache.num_event_slots if engine.kv_events and cache.enabled else 0


def slot_script(values: Values) -> str:
    """The ``sh -c`` program that claims a KV-event slot and execs ``"$@"`` (vllm serve).

    The events JSON is written inside double quotes with ``$i`` in the two endpoints, so
    the rendered text holds the literal ``ipc://<runtime_dir>/gpu$i.pub`` (and ``.replay``).
    """
    run = values.node_dirs.runtime_dir
    if not _SAFE_PATH.match(run):
        raise ValuesError(
            f"node_dirs.runtime_dir {run!r}: use an absolute path of letters, digits and "
            "/._- (the engine's start script names it unquoted)"
        )
    slots = _events_slots(values)
    pub, replay = (f"ipc://{run}/gpu$i.{kind}" for kind in ("pub", "replay"))
    events = _json({"enable_kv_cache_events": True, "publisher": "zmq",
                    "endpoint": pub, "replay_endpoint": replay})  # fmt: skip
    quoted = '"' + events.replace('"', '\\"') + '"'
    return (
        f"i=0; while [ $i -lt {slots} ]; do "
        f"if command exec 9>{run}/gpu$i.lock && flock -n 9; then "
        f'exec "$@" --kv-events-config {quoted}; fi; '
        "exec 9>&-; i=$((i + 1)); done; "
        f'echo "shoal: no free KV-event slot in {run} (gpu0..gpu{slots - 1} are held): more '
        f"engines on this node than cache.num_event_slots ({slots}); starting vLLM without "
        'KV events (prefix-aware routing will not see this engine)" >&2; '
        'exec "$@"'
    )


def vllm_command(values: Values) -> list[str]:
    """The vllm container's command: ``vllm_args``, wrapped in ``slot_script`` when the
    engine publishes KV events to a daemon that follows slots."""
    args = vllm_args(values)
    if not _events_slots(values):
        return args
    return ["sh", "-c", slot_script(values), "vllm-slot", *args]


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
    if engine.hf_token_secret:
        environ.append({
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": engine.hf_token_secret, "key": "token"}},
        })  # fmt: skip
    startup_failures = max(1, math.ceil(engine.startup_s / _PROBE_PERIOD_S))
    memory = sizes.quantity(derived.engine_memory_bytes)
    container: Obj = {
        "name": "vllm",
        "image": engine.image,
        "command": vllm_command(values),
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
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
    }
    if _uses_loader(values) and engine.loader.s3_secret:
        # vLLM reads the origin itself should the sidecar fail mid-load (loader.sources.peer)
        container["envFrom"] = [{"secretRef": {"name": engine.loader.s3_secret}}]
    return container


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
    container = objects.shoal_container(
        values, "loader", ["shoal", "loader", "serve"],
        env=settings_env(LoaderConfig, "loader", settings, where="engine.loader.settings"),
        memory_bytes=sizes.derive(values).loader_memory_bytes, cpu="1",
        mounts=[
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "loader-run", "mountPath": POD_RUN_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        startup={
            "exec": {"command": ["sh", "-c", staged]},
            "periodSeconds": _PROBE_PERIOD_S,
            "failureThreshold": startup_failures,
            "timeoutSeconds": 10,
        },
        liveness={
            "exec": {"command": ["shoal", "loader", "health"]},
            "periodSeconds": 20,
            "failureThreshold": 3,
            "timeoutSeconds": 10,
        },
    )  # fmt: skip
    container["restartPolicy"] = "Always"  # a native sidecar
    container["lifecycle"] = {"postStart": {"exec": {"command": ["sh", "-c", start]}}}
    if loader_metrics_port(values):
        container["ports"] = [{"name": "metrics", "containerPort": loader_metrics_port(values)}]
    if loader.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": loader.s3_secret}}]
    return container
