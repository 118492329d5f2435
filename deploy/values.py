"""The values schema of ``shoal deploy render``: what an operator says about their cluster.

One frozen dataclass per part, each field declared with ``value(default, help)`` so that
``shoal deploy values`` prints the defaults as a commented YAML file and a typo'd key is an
error naming the path and the keys that exist (never a silently ignored setting). Keys are
snake_case, as in ``shoal.toml``; a component's ``settings`` table takes exactly the keys of
that component's ``[section]`` (the same names, checked against the same dataclass the
daemon parses, and given to the container as ``SHOAL_<SECTION>_<KEY>``).

Structural choices live here as fields; everything a daemon already has a setting for stays
in its ``settings`` table, so there is one name for each knob.

Precedence: defaults < the values file < ``--set path.to.key=VALUE`` (YAML-typed value).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from deploy.errors import ValuesError
from shoal.config import parse_size

__all__ = [
    "AutoscalerValues",
    "CacheClusterValues",
    "CacheValues",
    "EngineValues",
    "FleetValues",
    "HealthValues",
    "ImageValues",
    "LoaderValues",
    "MonitoringValues",
    "NodeDirs",
    "RedisValues",
    "RouterValues",
    "Values",
    "defaults_yaml",
    "load_values",
    "parse_values",
    "value",
]

T = TypeVar("T")


def value(default: Any, help: str, *, size: bool = False) -> Any:
    """One values field: its default, one line of help, and whether it is a byte size."""
    if isinstance(default, dict | list):
        factory = (lambda d=default: type(d)(d)) if default else type(default)
        return field(default_factory=factory, metadata={"help": help, "size": size})
    if dataclasses.is_dataclass(default):
        cls = type(default)
        return field(default_factory=cls, metadata={"help": help, "size": size})
    return field(default=default, metadata={"help": help, "size": size})


@dataclass(frozen=True, slots=True)
class ImageValues:
    repository: str = value(
        "ghcr.io/shoal-project/shoal", "image with shoal installed (deploy/Dockerfile)"
    )
    tag: str = value("", "image tag; empty = this shoal's version")
    pull_policy: str = value("IfNotPresent", "imagePullPolicy of every Shoal container")


@dataclass(frozen=True, slots=True)
class NodeDirs:
    shm_dir: str = value(
        "/dev/shm/shoal",
        "host directory (on a tmpfs) holding the cache arena; shared by the daemon and engines",
    )
    runtime_dir: str = value(
        "/run/shoal",
        "host directory for the daemon's socket and the engines' KV-event sockets (mode 0700, "
        "owned by run_as_user; an init container makes it so)",
    )


@dataclass(frozen=True, slots=True)
class CacheClusterValues:
    enabled: bool = value(True, "join the node daemons into one cache cluster")
    port: int = value(7400, "cluster port (ROUTER); the stream (PUB) is port + 1")
    keys: str = value(
        "shared",
        "CurveZMQ keys: shared (one cluster keypair for every member, from `shoal cache keygen "
        "DIR`), per_node (a member key per node, from `keygen DIR --member NODE`), or insecure "
        "(no authentication: only where the operator says so)",
    )
    secret: str = value("shoal-cache-curve", "Secret holding the CurveZMQ key files")
    member_nodes: list[str] = value(
        [], "per_node keys: the Kubernetes node names that have a member key in the Secret"
    )
    operators: list[str] = value(
        ["admin"], "operator key names in the Secret (NAME.key), allowed to evict, flush, drain"
    )


@dataclass(frozen=True, slots=True)
class CacheValues:
    enabled: bool = value(True, "run the node cache daemon as a DaemonSet")
    settings: dict[str, Any] = value(
        {"shm_bytes": "8GiB", "dram_bytes": "16GiB"},
        "[cache] settings (README: Configuration), given as SHOAL_CACHE_* variables",
    )
    cluster: CacheClusterValues = value(CacheClusterValues(), "the cache cluster")
    memory_overhead_bytes: int = value(
        "1GiB", "memory beyond shm + dram + io staging (index, Python, buffers)", size=True
    )
    cpu: str = value("2", "CPU request of the daemon")
    share_host_pid: bool = value(
        False,
        "hostPID on the daemon and the engines, so a killed engine's leases are freed at once "
        "(pidfd); off, they are freed after session_ttl_s",
    )
    node_selector: dict[str, str] = value({}, "nodeSelector: the nodes with engines")
    tolerations: list[dict[str, Any]] = value([], "tolerations (e.g. for GPU taints)")
    drain_s: float = value(
        20.0, "preStop: seconds the daemon gets to hand its hot blocks to peers before SIGTERM"
    )
    num_event_slots: int = value(
        1,
        "KV-event sockets (gpu0 .. gpuN-1) the daemon follows on each node: one per engine pod "
        "on a node (engine.events_slot < this); 0 = follow none",
    )


@dataclass(frozen=True, slots=True)
class LoaderValues:
    enabled: bool = value(True, "run the loader sidecar and load weights with --load-format shoal")
    uri: str = value("", "where the weights are: s3://bucket/prefix, https://..., or a path")
    settings: dict[str, Any] = value(
        {"capacity_bytes": "32GiB"}, "[loader] settings, given as SHOAL_LOADER_* variables"
    )
    s3_secret: str = value("", "Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://")


@dataclass(frozen=True, slots=True)
class EngineValues:
    enabled: bool = value(True, "run the example vLLM engine Deployment")
    name: str = value("vllm", "Deployment name (the autoscaler's target)")
    image: str = value(
        "ghcr.io/shoal-project/vllm-shoal:0.1.0", "vLLM image with shoal (deploy/Dockerfile.engine)"
    )
    model: str = value("Qwen/Qwen3-0.6B", "the model vLLM serves (--served-model-name too)")
    replicas: int = value(2, "engine replicas (left out of the manifest when the autoscaler runs)")
    gpus: int = value(1, "GPUs per replica (= --tensor-parallel-size)")
    gpu_type: str = value(
        "", "GPU type name for the router (k8s discovery @GPU_TYPE); empty = none"
    )
    port: int = value(8000, "vLLM's HTTP port")
    cpu: str = value("8", "CPU request")
    memory_bytes: int = value(
        "48GiB", "memory beyond /dev/shm (weights in flight, Python)", size=True
    )
    shm_bytes: int = value("4GiB", "the engine pod's own /dev/shm (NCCL, vLLM IPC)", size=True)
    extra_args: list[str] = value([], "more vllm serve arguments")
    chunk_tokens: int = value(256, "tokens per Shoal KV chunk (a multiple of vLLM's block size)")
    connector: bool = value(True, "save and load KV through the node's cache daemon")
    kv_events: bool = value(True, "publish KV events to the node's cache daemon")
    events_slot: int = value(
        0, "which gpuN event socket this Deployment's pods use on a node (one pod per node)"
    )
    loader: LoaderValues = value(LoaderValues(), "the loader sidecar")
    node_selector: dict[str, str] = value({}, "nodeSelector")
    tolerations: list[dict[str, Any]] = value([], "tolerations")
    startup_s: int = value(1800, "seconds vLLM may take to start (startupProbe)")


@dataclass(frozen=True, slots=True)
class RedisValues:
    enabled: bool = value(True, "run Redis for state shared by router replicas")
    url: str = value("", "an external Redis instead (redis://...); empty = the one rendered here")
    image: str = value("redis:7.4-alpine", "Redis image")
    memory_bytes: int = value("512MiB", "Redis memory limit (maxmemory is 80% of it)", size=True)


@dataclass(frozen=True, slots=True)
class RouterValues:
    enabled: bool = value(True, "run the router")
    replicas: int = value(2, "router replicas (they share in-flight counts through Redis)")
    port: int = value(8080, "the router's HTTP port")
    service_type: str = value(
        "ClusterIP", "Service type of the router (ClusterIP, LoadBalancer, NodePort)"
    )
    api_keys_secret: str = value(
        "shoal-router-api-keys",
        "Secret with key api-keys (KEY USER lines); empty = no auth (needs insecure_no_auth)",
    )
    insecure_no_auth: bool = value(False, "serve without API keys (anyone who reaches it)")
    precise: bool = value(
        False,
        "precise prefix routing: a cache-daemon sidecar in each router pod joins the cluster",
    )
    settings: dict[str, Any] = value({}, "[router] settings, given as SHOAL_ROUTER_* variables")
    cpu: str = value("2", "CPU request")
    memory_bytes: int = value("2GiB", "memory limit", size=True)
    admin_port: int = value(
        9091,
        "the router's admin port (/metrics, /router/engines, /v1/request_sizes): Service "
        "shoal-router-admin, never the public one",
    )


@dataclass(frozen=True, slots=True)
class AutoscalerValues:
    enabled: bool = value(True, "run the autoscaler against the engine Deployment")
    settings: dict[str, Any] = value(
        {"min_replicas": 1, "max_replicas": 8},
        "[autoscale] settings, given as SHOAL_AUTOSCALE_* variables",
    )
    cpu: str = value("100m", "CPU request of the controller")
    memory_bytes: int = value("256MiB", "memory request and limit of the controller", size=True)


@dataclass(frozen=True, slots=True)
class HealthValues:
    enabled: bool = value(True, "run the GPU health watcher on every GPU node")
    cordon: bool = value(True, "cordon a node whose GPU needs draining")
    cordon_apply: bool = value(False, "really cordon (else a dry run that logs)")
    settings: dict[str, Any] = value({}, "[health] settings, given as SHOAL_HEALTH_* variables")
    node_selector: dict[str, str] = value(
        {"nvidia.com/gpu.present": "true"}, "nodeSelector: the GPU nodes"
    )
    tolerations: list[dict[str, Any]] = value(
        [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "tolerations",
    )
    cpu: str = value("50m", "CPU request of the watcher")
    memory_bytes: int = value("128MiB", "memory request and limit of the watcher", size=True)
    runtime_class: str = value(
        "nvidia",
        "runtimeClassName exposing the NVIDIA driver (NVML) to the watcher without a GPU "
        "request; empty = none (the node's default runtime does it)",
    )


@dataclass(frozen=True, slots=True)
class FleetValues:
    enabled: bool = value(False, "run `shoal engines serve` (multi-node engines on Ray)")
    ray_address: str = value("", "the Ray cluster (e.g. a KubeRay head: ray://HEAD:10001)")
    settings: dict[str, Any] = value({}, "[engines] settings, given as SHOAL_ENGINES_* variables")
    cpu: str = value("500m", "CPU request of the fleet daemon")
    memory_bytes: int = value(
        "1GiB", "memory request and limit of the fleet daemon (a Ray client)", size=True
    )


@dataclass(frozen=True, slots=True)
class MonitoringValues:
    service_monitors: bool = value(True, "ServiceMonitors for the Prometheus Operator")
    pod_monitors: bool = value(True, "PodMonitors (engines, the cache daemon)")
    rules: bool = value(True, "a PrometheusRule with Shoal's alerts (docs/operations.md)")
    labels: dict[str, str] = value(
        {"release": "prometheus"}, "labels the Prometheus Operator selects monitors by"
    )
    namespace: str = value("monitoring", "namespace Prometheus runs in (NetworkPolicy ingress)")


@dataclass(frozen=True, slots=True)
class Values:
    namespace: str = value("shoal", "namespace of every object")
    create_namespace: bool = value(True, "render the Namespace too")
    run_as_user: int = value(
        10001,
        "the UID of every Shoal container and of the engines (the socket directory is 0700 and "
        "the arena 0600: they must be one user)",
    )
    run_as_group: int = value(10001, "the GID of every Shoal container and of the engines")
    image: ImageValues = value(ImageValues(), "the Shoal image")
    node_dirs: NodeDirs = value(NodeDirs(), "host directories the cache daemon shares with engines")
    cache: CacheValues = value(CacheValues(), "the node cache daemon")
    engine: EngineValues = value(EngineValues(), "the example vLLM engine")
    router: RouterValues = value(RouterValues(), "the router")
    redis: RedisValues = value(RedisValues(), "Redis")
    autoscaler: AutoscalerValues = value(AutoscalerValues(), "the autoscaler")
    health: HealthValues = value(HealthValues(), "the GPU health watcher")
    fleet: FleetValues = value(FleetValues(), "the Ray engine fleet")
    monitoring: MonitoringValues = value(MonitoringValues(), "Prometheus Operator objects")
    network_policies: bool = value(
        True, "NetworkPolicies keeping cluster and engine ports internal"
    )
    pod_disruption_budgets: bool = value(True, "PodDisruptionBudgets for the router and engines")

    @property
    def image_ref(self) -> str:
        from shoal import __version__

        return f"{self.image.repository}:{self.image.tag or __version__}"


# --- parsing ------------------------------------------------------------------------------


def _convert(tp: Any, raw: Any, path: str, *, size: bool) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, Mapping):
            raise ValuesError(f"{path}: expected a mapping, got {type(raw).__name__}")
        return _build(tp, raw, path)  # type: ignore[arg-type]
    if size:
        try:
            return parse_size(raw)
        except ValueError as exc:
            raise ValuesError(f"{path}: {exc}") from None
    if tp is bool:
        if not isinstance(raw, bool):
            raise ValuesError(f"{path}: expected true or false, got {raw!r}")
        return raw
    if tp is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValuesError(f"{path}: expected an integer, got {raw!r}")
        return raw
    if tp is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValuesError(f"{path}: expected a number, got {raw!r}")
        return float(raw)
    if tp is str:
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            raise ValuesError(f"{path}: expected a string, got {raw!r}")
        return str(raw)
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise ValuesError(f"{path}: expected a mapping, got {type(raw).__name__}")
        _, value_tp = typing.get_args(tp)
        return {
            str(key): _convert(value_tp, item, f"{path}.{key}", size=False)
            for key, item in raw.items()
        }
    if origin is list:
        if not isinstance(raw, list):
            raise ValuesError(f"{path}: expected a list, got {type(raw).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, item, f"{path}[{i}]", size=False) for i, item in enumerate(raw)]
    if tp is Any or isinstance(tp, types.UnionType):
        return raw
    raise AssertionError(f"values field {path} has a type the parser does not know: {tp}")


def _build(cls: type[T], raw: Mapping[str, Any], path: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = path or "the top level"
        raise ValuesError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        size = bool(f.metadata.get("size"))
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], sub, size=size)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, sub)
        elif size:
            kwargs[name] = _convert(hints[name], f.default, sub, size=True)
    return cls(**kwargs)


def parse_values(document: Mapping[str, Any] | None) -> Values:
    """Values from a parsed YAML mapping (None or {} = every default)."""
    values = _build(Values, document or {}, "")
    for key in ("run_as_user", "run_as_group"):
        if getattr(values, key) <= 0:
            raise ValuesError(
                f"{key} must be a non-root id (every pod runs with runAsNonRoot; the arena "
                "and sockets belong to that one id), e.g. 10001"
            )
    return values


def _set(document: dict[str, Any], assignment: str) -> None:
    import yaml

    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ValuesError(f"--set {assignment!r}: expected path.to.key=VALUE")
    try:
        parsed = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ValuesError(f"--set {assignment!r}: the value is not YAML: {exc}") from None
    keys = path.split(".")
    node = document
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValuesError(f"--set {assignment!r}: {key} is not a mapping")
        node = child
    node[keys[-1]] = parsed


def load_values(path: str | Path | None = None, assignments: list[str] | None = None) -> Values:
    """Values from a YAML file (optional) with ``--set`` assignments applied on top."""
    import yaml

    document: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ValuesError(f"cannot read values file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValuesError(f"values file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValuesError(f"values file {path}: the top level must be a mapping")
        document = loaded or {}
    for assignment in assignments or []:
        _set(document, assignment)
    return parse_values(document)


def _plain(value_: Any, size: bool) -> Any:
    if size and isinstance(value_, int):
        from deploy.sizes import human_bytes

        return human_bytes(value_)
    return value_


def defaults_yaml() -> str:
    """Every default, as a commented YAML values file (``shoal deploy values``)."""
    import yaml

    lines: list[str] = ["# shoal deploy values: every key with its default (snake_case)."]

    def emit(cls: type[Any], instance: Any, indent: int) -> None:
        pad = "  " * indent
        for f in dataclasses.fields(cls):
            current = getattr(instance, f.name)
            lines.append(f"{pad}# {f.metadata['help']}")
            if dataclasses.is_dataclass(current):
                lines.append(f"{pad}{f.name}:")
                emit(type(current), current, indent + 1)
                continue
            plain = _plain(current, bool(f.metadata.get("size")))
            dumped = yaml.safe_dump({f.name: plain}, default_flow_style=True, sort_keys=False)
            lines.append(pad + dumped.strip().removeprefix("{").removesuffix("}"))

    emit(Values, parse_values({}), 0)
    return "\n".join(lines) + "\n"
