"""The router: ``shoal-router`` Deployment and Service, with EndpointSlice discovery RBAC.

Invariant: the router finds the engines the way their owner sees them, and replicas share
one view of in-flight requests and rate limits through Redis. Engines come from one source:

- the engine Deployment (``engine.enabled``): ``discovery: k8s``, the engine Service's
  EndpointSlices, ready endpoints only. ``router.discovery`` makes exactly one API call,
  ``list_namespaced_endpoint_slice``, so the Role grants ``list`` on
  ``discovery.k8s.io/endpointslices`` and nothing else (it polls; it never gets or
  watches);
- the Ray fleet (``fleet.enabled``): ``discovery: http``, the fleet daemon's ``GET
  /v1/discovery`` (its ready groups with their GPUs) behind the control token. The router
  then calls no Kubernetes API: no Role, no service-account token in the pod.

With ``health.enabled`` the router polls every watcher of the DaemonSet through its
headless Service, ``dns+http://shoal-health.NS.svc.cluster.local:8094`` (every address the
name resolves to, re-resolved each poll), with the control token. Only fleet engines carry
GPU names (``gpus``), so only they are taken out for a sick GPU; Deployment engines rely on
the watcher's cordon (``router/discovery.py``).

Refused values (``ValuesError``, naming the fix):

- several replicas without Redis: without ``--redis`` each replica keeps its own ledger
  and limiter (``router/server.py``), so in-flight counts split N ways and every rate
  limit is multiplied by N;
- neither an API-key Secret nor ``insecure_no_auth`` (the router listens beyond loopback
  and refuses to start without one), or both (say which);
- ``fleet.enabled`` with ``engine.enabled``: two sources of engines for one router (the
  Deployment's Service and the fleet's list); turn one off;
- ``precise``: precise prefix routing needs a cache daemon in the router pod that joins
  the cache cluster with the DaemonSet's keys and settings; that sidecar is not rendered
  yet (and k8s-discovered engines carry no stream, so precise routing would see no GPU
  prefix for them: ``router/discovery.py``).

Settings: ``router.settings`` is merged over what is derived here, except the keys the
pod's shape decides (``host``, ``port``: the Service's target; ``api_keys``,
``insecure_no_auth``: ``router.api_keys_secret``/``insecure_no_auth``; ``redis``:
``redis.url``; ``autoscaler_token_file``, ``gpu_health_token_file``,
``discovery_token_file``, ``cache_socket``: mounted files), which are refused there.
``engines``, ``discovery``, ``gpu_health``, ``autoscaler_url`` and the rest are the
user's.

Probes: readiness is ``/health`` (200 with a healthy engine, or while requests may be held
for one: ``RouterSettings.holds``, true with k8s discovery); liveness is a TCP connect,
since ``/health`` reports the engines, not the router (an engine outage must not restart
every router).
"""

from __future__ import annotations

from typing import Any

from deploy.components.fleet import NAME as FLEET_NAME
from deploy.components.fleet import PORT as FLEET_PORT
from deploy.components.fleet import health_url
from deploy.errors import ValuesError
from deploy.objects import (
    container_security,
    http_probe,
    labels,
    metadata,
    pod_security,
    selector,
    settings_env,
)
from deploy.sizes import quantity
from deploy.values import Values

__all__ = [
    "API_KEYS_DIR",
    "CONTROL_TOKEN_DIR",
    "NAME",
    "fleet_discovery_url",
    "redis_url",
    "render",
    "router_settings",
]

NAME = "shoal-router"
API_KEYS_DIR = "/etc/shoal/router-api-keys"
CONTROL_TOKEN_DIR = "/etc/shoal/control-token"
CONTROL_TOKEN_SECRET = "shoal-control-token"
CONTROL_TOKEN_FILE = f"{CONTROL_TOKEN_DIR}/token"
AUTOSCALER_PORT = 8090
_OWNED = ("host", "port", "api_keys", "insecure_no_auth", "redis", "autoscaler_token_file",
          "gpu_health_token_file", "discovery_token_file", "cache_socket")  # fmt: skip

Obj = dict[str, Any]


def redis_url(values: Values) -> str:
    """The Redis the replicas share: ``redis.url``, else the rendered ``shoal-redis``."""
    if values.redis.url:
        return values.redis.url
    if values.redis.enabled:
        return f"redis://shoal-redis.{values.namespace}.svc:6379/0"
    return ""


def fleet_discovery_url(values: Values) -> str:
    """The Ray fleet daemon's list of ready engine groups."""
    return f"http://{FLEET_NAME}.{values.namespace}.svc:{FLEET_PORT}/v1/discovery"


_TOKEN_FILES = ("autoscaler_token_file", "gpu_health_token_file", "discovery_token_file")


def router_settings(values: Values) -> Obj:
    """The ``[router]`` settings of the pod (checked by ``settings_env``)."""
    router = values.router
    owned = sorted(set(_OWNED) & set(router.settings))
    if owned:
        raise ValuesError(
            f"router.settings: {owned} are set from the values (router.port, "
            "router.api_keys_secret, router.insecure_no_auth, redis.url, autoscaler.enabled, "
            "health.enabled, fleet.enabled); "
            "remove them"
        )
    if router.precise:
        raise ValuesError(
            "router.precise: not yet supported on Kubernetes (it needs a cache-daemon sidecar "
            "joining the cache cluster in each router pod); set router.precise: false"
        )
    if router.api_keys_secret and router.insecure_no_auth:
        raise ValuesError(
            "router: api_keys_secret and insecure_no_auth are both set; empty "
            "api_keys_secret to serve without auth, or set insecure_no_auth: false"
        )
    if not router.api_keys_secret and not router.insecure_no_auth:
        raise ValuesError(
            "router: no API keys (api_keys_secret is empty) and insecure_no_auth is false: "
            "the router refuses to listen beyond loopback without one; name the Secret "
            "(key api-keys, KEY USER lines) or set insecure_no_auth: true"
        )
    shared = redis_url(values)
    if router.replicas > 1 and not shared:
        raise ValuesError(
            f"router.replicas is {router.replicas} but Redis is off (redis.enabled false, no "
            "redis.url): replicas need shared state for in-flight counts and rate limits; "
            "enable Redis, give redis.url, or set router.replicas: 1"
        )
    if values.fleet.enabled and values.engine.enabled:
        raise ValuesError(
            "fleet.enabled and engine.enabled are both true: the router takes its engines from "
            "one source; set engine.enabled: false to serve the Ray fleet's engines, or "
            "fleet.enabled: false to serve the engine Deployment's"
        )
    derived: Obj = {"discovery": "k8s", "log_format": "json"}
    if values.engine.enabled:
        gpu = f"@{values.engine.gpu_type}" if values.engine.gpu_type else ""
        derived["engines"] = f"{values.namespace}/{values.engine.name}:http{gpu}"
    if values.fleet.enabled:
        derived["discovery"] = "http"
        derived["engines"] = fleet_discovery_url(values)
    if values.health.enabled:
        derived["gpu_health"] = health_url(values)
    if values.autoscaler.enabled:
        derived["autoscaler_url"] = (
            f"http://shoal-autoscaler.{values.namespace}.svc:{AUTOSCALER_PORT}"
        )
    merged = {**derived, **router.settings, "host": "0.0.0.0", "port": router.port}
    if not merged.get("engines"):
        raise ValuesError(
            "router: no engines to route to (engine.enabled is false and router.settings has "
            "no engines); give router.settings.engines, e.g. NAMESPACE/SERVICE:http"
        )
    if shared:
        merged["redis"] = shared
    if router.api_keys_secret:
        merged["api_keys"] = f"{API_KEYS_DIR}/api-keys"
    else:
        merged["insecure_no_auth"] = True
    if values.autoscaler.enabled:
        merged["autoscaler_token_file"] = CONTROL_TOKEN_FILE
    if values.health.enabled and merged.get("gpu_health"):  # the watchers' token
        merged["gpu_health_token_file"] = CONTROL_TOKEN_FILE
    if values.fleet.enabled and merged.get("discovery") == "http":  # the fleet's token
        merged["discovery_token_file"] = CONTROL_TOKEN_FILE
    return merged


def render(values: Values) -> list[Obj]:
    if not values.router.enabled:
        return []
    settings = router_settings(values)
    lists_slices = settings.get("discovery") == "k8s"  # the only Kubernetes API call
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(values, NAME, "router"),
        "automountServiceAccountToken": False,  # the pod mounts it when it lists slices
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(values, NAME, "router"),
        "rules": [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(values, NAME, "router"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": values.namespace}],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(values, NAME, "router"),
        "spec": {
            "type": values.router.service_type,
            "selector": selector("router"),
            "ports": [{"name": "http", "port": values.router.port, "targetPort": "http"}],
        },
    }
    rbac = [role, binding] if lists_slices else []
    return [account, *rbac, service, _deployment(values, settings, lists_slices)]


def _deployment(values: Values, settings: Obj, lists_slices: bool) -> Obj:
    from router.config import RouterSettings

    router = values.router
    memory = quantity(router.memory_bytes)
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {}}]
    if router.api_keys_secret:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {
            "secretName": router.api_keys_secret, "defaultMode": 0o440,
            "items": [{"key": "api-keys", "path": "api-keys"}]}})  # fmt: skip
    if any(settings.get(name) for name in _TOKEN_FILES):
        mounts.append({"name": "control-token", "mountPath": CONTROL_TOKEN_DIR, "readOnly": True})
        volumes.append({"name": "control-token", "secret": {
            "secretName": CONTROL_TOKEN_SECRET, "defaultMode": 0o440,
            "items": [{"key": "token", "path": "token"}]}})  # fmt: skip
    container = {
        "name": "router",
        "image": values.image_ref,
        "imagePullPolicy": values.image.pull_policy,
        "command": ["shoal", "router", "serve"],
        "env": settings_env(RouterSettings, "router", settings, where="router.settings"),
        "ports": [{"name": "http", "containerPort": router.port}],
        "resources": {
            "requests": {"cpu": router.cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "securityContext": container_security(),
        "volumeMounts": mounts,
        "readinessProbe": http_probe("/health", "http", period_s=5),
        "livenessProbe": {
            "tcpSocket": {"port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
            "timeoutSeconds": 2,
        },
    }
    spread = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": selector("router")},
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(values, NAME, "router"),
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": selector("router")},
            "template": {
                "metadata": {"labels": labels("router")},
                "spec": {
                    "serviceAccountName": NAME,
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": lists_slices,  # --discovery k8s
                    "securityContext": pod_security(values),
                    "topologySpreadConstraints": [spread],
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }
