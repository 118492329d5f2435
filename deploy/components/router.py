"""The router: ``shoal-router`` Deployment and Services, with EndpointSlice discovery RBAC.

::

    Service  shoal-router        http (router.port): the OpenAI API, router.service_type
    Service  shoal-router-admin  admin (router.admin_port), ClusterIP: /metrics,
                                 /router/engines, /v1/request_sizes; labelled
                                 ADMIN_LABELS too, so the ServiceMonitor selects only it

The admin routes are not the OpenAI API and carry no API key (router/proxy.py), so they
never share the public port (a LoadBalancer would publish engine addresses and traffic
shape): ``--admin-port`` moves them to a second listener that only the admin Service
names, ``--admin-token-file`` (the control token) guards all of them but ``/metrics``,
which Prometheus and the autoscaler scrape without one, and the NetworkPolicy admits the
admin port only from the monitoring namespace and the autoscaler (policies.py).

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

With ``health.enabled`` and engines that carry GPU names (``http`` discovery, the Ray
fleet's ``gpus``; also ``file`` and ``static`` if the user sets them) the router polls every
watcher of the DaemonSet through its headless Service, ``dns+http://shoal-health.NS.svc:8094``
(no cluster domain: the pod's DNS search path completes it, so a cluster whose domain is
not ``cluster.local`` works), with the control token. k8s- and dns-discovered engines have
no GPU names (``router/discovery.py``): the router could never take one out for a sick
GPU, so it does not poll at all (no traffic, no token); those engines rely on the
watcher's node cordon and the router's own ``/health`` checks.

Shutdown: a terminating pod keeps getting new connections until every kube-proxy and load
balancer has seen its endpoint go (seconds), while aiohttp stops accepting on SIGTERM. So
a ``preStop`` sleeps ``PRESTOP_SLEEP_S`` first; SIGTERM then gives requests in flight
``shutdown_timeout_s``; the grace period covers both plus ``GRACE_MARGIN_S``.

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
``redis.url``; ``admin_port``, ``admin_host``: router.admin_port, the admin Service's
target; ``autoscaler_token_file``, ``gpu_health_token_file``, ``discovery_token_file``,
``admin_token_file``, ``cache_socket``: mounted files), which are refused there.
``engines``, ``discovery``, ``gpu_health``, ``autoscaler_url`` and the rest are the
user's.

Probes: readiness is ``/health`` (200 with a healthy engine, or while requests may be held
for one: ``RouterSettings.holds``, true with k8s discovery); liveness is a TCP connect,
since ``/health`` reports the engines, not the router (an engine outage must not restart
every router).
"""

from __future__ import annotations

import math

from deploy import objects
from deploy.components.fleet import NAME as FLEET_NAME
from deploy.components.fleet import PORT as FLEET_PORT
from deploy.components.health import watchers_url
from deploy.errors import ValuesError
from deploy.objects import CONTROL_TOKEN_DIR, CONTROL_TOKEN_FILE, Obj, http_probe, settings_env
from deploy.values import Values

__all__ = [
    "ADMIN_LABELS",
    "ADMIN_NAME",
    "API_KEYS_DIR",
    "CONTROL_TOKEN_DIR",
    "NAME",
    "admin_url",
    "fleet_discovery_url",
    "grace_period_s",
    "redis_url",
    "render",
    "router_settings",
]

NAME = "shoal-router"
ADMIN_NAME = "shoal-router-admin"
ADMIN_LABELS = {"shoal.dev/endpoint": "admin"}  # what the ServiceMonitor selects it by
PRESTOP_SLEEP_S = 10  # endpoint removal reaching kube-proxy and load balancers
GRACE_MARGIN_S = 5
GPU_NAMED_DISCOVERY = ("http", "file", "static")  # router/discovery.py: engines with gpus
API_KEYS_DIR = "/etc/shoal/router-api-keys"
AUTOSCALER_PORT = 8090
_OWNED = ("host", "port", "api_keys", "insecure_no_auth", "redis", "autoscaler_token_file",
          "gpu_health_token_file", "discovery_token_file", "cache_socket", "admin_port",
          "admin_host", "admin_token_file")  # fmt: skip


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


_TOKEN_FILES = ("autoscaler_token_file", "gpu_health_token_file", "discovery_token_file",
                "admin_token_file")  # fmt: skip


def admin_url(values: Values) -> str:
    """The admin Service (``/metrics``, ``/router/engines``, ``/v1/request_sizes``)."""
    return f"http://{ADMIN_NAME}.{values.namespace}.svc:{values.router.admin_port}"


def router_settings(values: Values) -> Obj:
    """The ``[router]`` settings of the pod (checked by ``settings_env``)."""
    router = values.router
    owned = sorted(set(_OWNED) & set(router.settings))
    if owned:
        raise ValuesError(
            f"router.settings: {owned} are set from the values (router.port, "
            "router.api_keys_secret, router.insecure_no_auth, redis.url, router.admin_port, "
            "autoscaler.enabled, health.enabled, fleet.enabled); remove them"
        )
    if not 0 < router.admin_port < 65536 or router.admin_port == router.port:
        raise ValuesError(
            f"router.admin_port {router.admin_port} must be 1..65535 and differ from "
            f"router.port ({router.port})"
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
    if values.autoscaler.enabled:
        derived["autoscaler_url"] = (
            f"http://shoal-autoscaler.{values.namespace}.svc:{AUTOSCALER_PORT}"
        )
    merged = {**derived, **router.settings, "host": "0.0.0.0", "port": router.port,
              "admin_port": router.admin_port, "admin_host": "0.0.0.0",
              "admin_token_file": CONTROL_TOKEN_FILE}  # fmt: skip
    if values.health.enabled and merged["discovery"] in GPU_NAMED_DISCOVERY:
        merged.setdefault("gpu_health", watchers_url(values))
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
    # the pod mounts the token when it lists slices
    account = objects.service_account(values, NAME, "router", automount=False)
    rules = [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
    ]
    role = objects.role(values, NAME, "router", rules)
    binding = objects.role_binding(values, NAME, "router")
    service = objects.service(values, NAME, "router", [("http", values.router.port)],
                              service_type=values.router.service_type, protocol=False)  # fmt: skip
    admin = objects.service(
        values, ADMIN_NAME, "router", [("admin", values.router.admin_port)],
        service_type="ClusterIP",  # never router.service_type: in-cluster readers only
        extra_labels=ADMIN_LABELS, protocol=False,
    )  # fmt: skip
    rbac = [role, binding] if lists_slices else []
    return [account, *rbac, service, admin, _deployment(values, settings, lists_slices)]


def grace_period_s(settings: Obj) -> int:
    """``terminationGracePeriodSeconds``: the preStop sleep, then ``shutdown_timeout_s``
    for requests in flight, then a margin for the process to exit."""
    from router.config import RouterSettings

    shutdown_s = float(settings.get("shutdown_timeout_s", RouterSettings().shutdown_timeout_s))
    return PRESTOP_SLEEP_S + math.ceil(shutdown_s) + GRACE_MARGIN_S


def _deployment(values: Values, settings: Obj, lists_slices: bool) -> Obj:
    from router.config import RouterSettings

    router = values.router
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {}}]
    if router.api_keys_secret:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {
            "secretName": router.api_keys_secret, "defaultMode": 0o440,
            "items": [{"key": "api-keys", "path": "api-keys"}]}})  # fmt: skip
    if any(settings.get(name) for name in _TOKEN_FILES):
        mounts.append(objects.control_token_mount())
        volumes.append(objects.control_token_volume())
    container = objects.shoal_container(
        values, "router", ["shoal", "router", "serve"],
        env=settings_env(RouterSettings, "router", settings, where="router.settings"),
        memory_bytes=router.memory_bytes, cpu=router.cpu,
        ports=[("http", router.port), ("admin", router.admin_port)], protocol=False,
        mounts=mounts,
        liveness={
            "tcpSocket": {"port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 3,
            "timeoutSeconds": 2,
        },
        readiness=http_probe("/health", "http", period_s=5),
    )  # fmt: skip
    container["lifecycle"] = {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}}
    spread = {
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": objects.selector("router")},
    }
    pod = objects.pod_spec(values, NAME, automount=lists_slices,  # --discovery k8s
                           grace_s=grace_period_s(settings))  # fmt: skip
    pod["topologySpreadConstraints"] = [spread]
    pod["containers"] = [container]
    pod["volumes"] = volumes
    return objects.deployment(values, NAME, "router", pod, replicas=router.replicas)
