"""The values schema of ``shoal deploy render``: what an operator says about their cluster.

One frozen dataclass per part, each field declared with ``value(default, help)`` so that
``shoal deploy values`` prints the defaults as a commented YAML file and a typo'd key is an
error naming the path and the keys that exist (never a silently ignored setting). Keys are
snake_case, as in ``shoal.toml``; a component's ``settings`` table takes exactly the keys of
that component's ``[section]`` (the same names, checked against the same dataclass the
daemon parses, and given to the container as ``SHOAL_<SECTION>_<KEY>``).

Structural choices live here as fields; everything a daemon already has a setting for stays
in its ``settings`` table, so there is one name for each knob.

Precedence: defaults < the values file < ``--set path.to.key=VALUE`` (YAML-typed value;
``\\.`` escapes a dot in a key, as in Helm; a list is set whole).

A string field takes only a YAML string: unquoted ``1.10``, ``0700`` and ``yes`` arrive as
1.1, 448 and true, and turning them back into text would render what nobody wrote (only a
CPU quantity takes a plain integer). Names, quantities and ranges are checked here, under
the key to change, rather than by the API server at apply or by a daemon under another key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

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

MiB, GiB = 1 << 20, 1 << 30

# What Kubernetes accepts (apimachinery validation): names of namespaces are RFC 1123 labels,
# of Services RFC 1035 labels (a letter first), of Secrets and RuntimeClasses RFC 1123
# subdomains; a CPU request is a quantity. The schema check cannot see these: the OpenAPI
# schemas type them as plain strings, and the API server refuses them only at apply.
_DNS = {
    "label": (re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"), 63, "an RFC 1123 label"),
    "service": (re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?"), 63, "an RFC 1035 label"),
    "subdomain": (
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
        253,
        "an RFC 1123 subdomain",
    ),
}
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?\d+)?")


def value(default: Any, help: str, *, size: bool = False, quantity: bool = False,
          dns: str = "", optional: bool = False) -> Any:  # fmt: skip
    """One values field: its default and one line of help, plus what form it must have.

    ``size``: a byte size (``"8GiB"`` or an integer), kept as an int. ``quantity``: a
    Kubernetes quantity (``"500m"``, ``"2"``; a plain YAML integer is accepted too).
    ``dns``: a Kubernetes name, one of ``_DNS``; ``optional``: empty means none.
    """
    assert not dns or dns in _DNS, f"value(dns={dns!r}): not one of {sorted(_DNS)}"
    assert not size or isinstance(default, int), f"size default {default!r} must be an int"
    meta = {"help": help, "size": size, "quantity": quantity, "dns": dns, "optional": optional}
    if isinstance(default, dict | list):
        factory = (lambda d=default: type(d)(d)) if default else type(default)
        return field(default_factory=factory, metadata=meta)
    if dataclasses.is_dataclass(default):
        cls = type(default)
        return field(default_factory=cls, metadata=meta)
    return field(default=default, metadata=meta)


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
    secret: str = value(
        "shoal-cache-curve", "Secret holding the CurveZMQ key files", dns="subdomain"
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
        1 * GiB, "memory beyond shm + dram + io staging (index, Python, buffers)", size=True
    )
    cpu: str = value("2", "CPU request of the daemon", quantity=True)
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
        8,
        "KV-event sockets (gpu0 .. gpuN-1) the daemon follows on each node: each engine pod "
        "claims a free one at start, so this bounds the engines per node with KV events; "
        "0 = follow none",
    )


@dataclass(frozen=True, slots=True)
class LoaderValues:
    enabled: bool = value(True, "run the loader sidecar and load weights with --load-format shoal")
    uri: str = value("", "where the weights are: s3://bucket/prefix, https://..., or a path")
    settings: dict[str, Any] = value(
        {"capacity_bytes": "32GiB"}, "[loader] settings, given as SHOAL_LOADER_* variables"
    )
    s3_secret: str = value(
        "",
        "Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://",
        dns="subdomain",
        optional=True,
    )


@dataclass(frozen=True, slots=True)
class EngineValues:
    enabled: bool = value(True, "run the example vLLM engine Deployment")
    name: str = value(
        "vllm", "Deployment and Service name (the autoscaler's target)", dns="service"
    )
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
    cpu: str = value("8", "CPU request", quantity=True)
    memory_bytes: int = value(
        48 * GiB, "memory beyond /dev/shm (weights in flight, Python)", size=True
    )
    shm_bytes: int = value(4 * GiB, "the engine pod's own /dev/shm (NCCL, vLLM IPC)", size=True)
    extra_args: list[str] = value([], "more vllm serve arguments")
    chunk_tokens: int = value(256, "tokens per Shoal KV chunk (a multiple of vLLM's block size)")
    connector: bool = value(True, "save and load KV through the node's cache daemon")
    kv_events: bool = value(True, "publish KV events to the node's cache daemon")
    loader: LoaderValues = value(LoaderValues(), "the loader sidecar")
    node_selector: dict[str, str] = value({}, "nodeSelector")
    tolerations: list[dict[str, Any]] = value([], "tolerations")
    startup_s: int = value(1800, "seconds vLLM may take to start (startupProbe)")
    drain_s: int = value(
        120,
        "seconds vLLM lets in-flight requests finish on SIGTERM (--shutdown-timeout; "
        "0 = abort them)",
    )
    hf_token_secret: str = value(
        "", "Secret with key token, given to vLLM as HF_TOKEN (gated Hub models); empty = none"
    )


@dataclass(frozen=True, slots=True)
class RedisValues:
    enabled: bool = value(True, "run Redis for state shared by router replicas")
    url: str = value(
        "", "an external Redis instead (redis:// or rediss://); empty = the one rendered here"
    )
    image: str = value("redis:7.4-alpine", "Redis image")
    memory_bytes: int = value(512 * MiB, "Redis memory limit (maxmemory is 80% of it)", size=True)


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
        dns="subdomain",
        optional=True,
    )
    insecure_no_auth: bool = value(False, "serve without API keys (anyone who reaches it)")
    precise: bool = value(
        False,
        "precise prefix routing (not yet supported on Kubernetes: the render refuses it)",
    )
    settings: dict[str, Any] = value({}, "[router] settings, given as SHOAL_ROUTER_* variables")
    cpu: str = value("2", "CPU request", quantity=True)
    memory_bytes: int = value(2 * GiB, "memory limit", size=True)
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
    cpu: str = value("100m", "CPU request of the controller", quantity=True)
    memory_bytes: int = value(256 * MiB, "memory request and limit of the controller", size=True)


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
    cpu: str = value("50m", "CPU request of the watcher", quantity=True)
    memory_bytes: int = value(128 * MiB, "memory request and limit of the watcher", size=True)
    runtime_class: str = value(
        "nvidia",
        "runtimeClassName exposing the NVIDIA driver (NVML) to the watcher without a GPU "
        "request; empty = none (the node's default runtime does it)",
        dns="subdomain",
        optional=True,
    )


@dataclass(frozen=True, slots=True)
class FleetValues:
    enabled: bool = value(False, "run `shoal engines serve` (multi-node engines on Ray)")
    ray_address: str = value("", "the Ray cluster (e.g. a KubeRay head: ray://HEAD:10001)")
    settings: dict[str, Any] = value({}, "[engines] settings, given as SHOAL_ENGINES_* variables")
    cpu: str = value("500m", "CPU request of the fleet daemon", quantity=True)
    memory_bytes: int = value(
        1 * GiB, "memory request and limit of the fleet daemon (a Ray client)", size=True
    )


@dataclass(frozen=True, slots=True)
class MonitoringValues:
    service_monitors: bool = value(True, "ServiceMonitors for the Prometheus Operator")
    pod_monitors: bool = value(True, "PodMonitors (engines, the cache daemon)")
    rules: bool = value(True, "a PrometheusRule with Shoal's alerts (docs/operations.md)")
    labels: dict[str, str] = value(
        {"release": "prometheus"}, "labels the Prometheus Operator selects monitors by"
    )
    namespace: str = value(
        "monitoring", "namespace Prometheus runs in (NetworkPolicy ingress)", dns="label"
    )


@dataclass(frozen=True, slots=True)
class Values:
    namespace: str = value("shoal", "namespace of every object", dns="label")
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


# Keys earlier releases took, each with what replaces it (a clearer error than "unknown key").
RETIRED = {
    "cache.cluster.member_nodes": (
        "each node makes its own key (per_node) and is admitted by adding its public key to "
        "Secret <cache.cluster.secret>-members (docs/operations.md, Rotating keys); remove it"
    ),
    "engine.events_slot": (
        "each engine pod claims a free KV-event slot on its node at start (up to "
        "cache.num_event_slots); remove it"
    ),
}


# --- parsing ------------------------------------------------------------------------------


_NO_META: Mapping[str, Any] = {}


def _kind(raw: Any) -> str:
    if raw is None:
        return "null (an empty value or ~)"
    if isinstance(raw, bool):
        return f"the boolean {str(raw).lower()}"
    if isinstance(raw, int | float):
        return f"the number {raw!r}"
    return "a mapping" if isinstance(raw, Mapping) else f"a {type(raw).__name__}"


def _string(raw: Any, path: str, meta: Mapping[str, Any]) -> str:
    """``raw`` if it is a string. YAML turns unquoted ``1.10`` into 1.1, ``0700`` into 448
    and ``yes`` into true, so coercing back would render something the user never wrote;
    only a quantity takes a plain integer (``cpu: 2``), whose text cannot have changed
    meaning."""
    if isinstance(raw, int) and not isinstance(raw, bool) and meta.get("quantity"):
        raw = str(raw)
    if not isinstance(raw, str):
        hint = ""
        if isinstance(raw, bool | int | float):
            hint = (
                "; YAML reads unquoted 1.10 as 1.1, 0700 as 448 and yes as true: quote it as "
                f'you mean it ({path.rsplit(".", 1)[-1]}: "..." in a file, '
                f"--set '{path}=\"...\"')"
            )
        raise ValuesError(f"{path}: expected a string, got {_kind(raw)}{hint}")
    if meta.get("quantity") and not _QUANTITY.fullmatch(raw):
        raise ValuesError(
            f'{path}: {raw!r} is not a Kubernetes quantity; use e.g. "2", "500m", "1.5"'
        )
    dns = meta.get("dns")
    if dns and (raw or not meta.get("optional")):
        pattern, limit, what = _DNS[dns]
        if not pattern.fullmatch(raw) or len(raw) > limit:
            raise ValuesError(
                f"{path}: {raw!r} is not a valid Kubernetes name: it must be {what} (lower "
                f"case letters, digits and '-'{', dots' if dns == 'subdomain' else ''}, "
                f"at most {limit} characters, starting and ending with a letter or digit)"
            )
    return raw


def _convert(tp: Any, raw: Any, path: str, meta: Mapping[str, Any] = _NO_META) -> Any:
    origin = typing.get_origin(tp)
    if raw is None and (dataclasses.is_dataclass(tp) or origin in (dict, list)):
        raw = [] if origin is list else {}  # `settings:` or `settings: ~` = empty
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, Mapping):
            raise ValuesError(f"{path}: expected a mapping, got {_kind(raw)}")
        return _build(tp, raw, path)  # type: ignore[arg-type]
    if meta.get("size"):
        try:
            if not isinstance(raw, str | int | float):
                raise ValueError(f"{_kind(raw)} is not a size; use e.g. 4096, 64KiB, 1.5GiB")
            num_bytes = parse_size(raw)
        except ValueError as exc:
            raise ValuesError(f"{path}: {exc}") from None
        if num_bytes < 0:
            raise ValuesError(f"{path}: a size must be >= 0, got {raw!r}")
        return num_bytes
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
        return _string(raw, path, meta)
    if origin is dict:
        if not isinstance(raw, Mapping):
            raise ValuesError(f"{path}: expected a mapping, got {_kind(raw)}")
        _, value_tp = typing.get_args(tp)
        bad = [key for key in raw if not isinstance(key, str)]
        if bad:
            raise ValuesError(f"{path}: key {bad[0]!r} is not a string; quote it")
        return {key: _convert(value_tp, item, f"{path}.{key}") for key, item in raw.items()}
    if origin is list:
        if not isinstance(raw, list):
            raise ValuesError(f"{path}: expected a list, got {_kind(raw)}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, item, f"{path}[{i}]") for i, item in enumerate(raw)]
    if tp is Any or isinstance(tp, types.UnionType):
        return raw
    raise AssertionError(f"values field {path} has a type the parser does not know: {tp}")


def _build(cls: type[T], raw: Mapping[str, Any], path: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    for name in unknown:
        retired = RETIRED.get(f"{path}.{name}" if path else name)
        if retired:
            raise ValuesError(f"{path}.{name}: no longer used: {retired}")
    if unknown:
        where = path or "the top level"
        raise ValuesError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name in raw:
            sub = f"{path}.{name}" if path else name
            kwargs[name] = _convert(hints[name], raw[name], sub, f.metadata)
    return cls(**kwargs)


def _check_ranges(values: Values) -> None:
    """What the daemons would refuse later under another key's name (a cache setting, a
    vLLM flag), refused here under the key to change."""
    for key in ("run_as_user", "run_as_group"):
        if getattr(values, key) <= 0:
            raise ValuesError(
                f"{key} must be a non-root id (every pod runs with runAsNonRoot; the arena "
                "and sockets belong to that one id), e.g. 10001"
            )
    engine = values.engine
    if engine.gpus < 1:
        raise ValuesError(f"engine.gpus: must be >= 1 (--tensor-parallel-size), got {engine.gpus}")
    for key, replicas in (("engine.replicas", engine.replicas),
                          ("router.replicas", values.router.replicas)):  # fmt: skip
        if replicas < 0:
            raise ValuesError(f"{key}: must be >= 0, got {replicas}")
    if not engine.model.strip() and (engine.enabled or values.fleet.enabled):
        raise ValuesError(
            "engine.model: empty; name the model the engines serve (e.g. Qwen/Qwen3-0.6B)"
        )
    url = values.redis.url
    if url and (urlsplit(url).scheme not in ("redis", "rediss") or not urlsplit(url).hostname):
        raise ValuesError(
            f"redis.url: {url!r} is not a Redis URL; use redis://HOST:PORT/DB "
            "(or rediss:// for TLS), or leave it empty for the Redis rendered here"
        )


def parse_values(document: Mapping[str, Any] | None) -> Values:
    """Values from a parsed YAML mapping (None or {} = every default)."""
    values = _build(Values, document or {}, "")
    _check_ranges(values)
    return values


def _keys(path: str, assignment: str) -> list[str]:
    """``a.b\\.c.d`` -> ``["a", "b.c", "d"]``: a backslash escapes a dot, as in Helm, so
    label keys like ``nvidia.com/gpu.present`` can be set."""
    keys = [key.replace("\0", ".") for key in path.replace("\\.", "\0").split(".")]
    for key in keys:
        if not key:
            raise ValuesError(f"--set {assignment!r}: empty key in {path!r}")
        if "[" in key:
            whole = path.split("[", 1)[0]
            raise ValuesError(f"--set {assignment!r}: lists are set whole: --set '{whole}=[x, y]'")
    return keys


def _set(document: dict[str, Any], assignment: str) -> None:
    import yaml

    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ValuesError(f"--set {assignment!r}: expected path.to.key=VALUE")
    keys = _keys(path, assignment)
    try:
        parsed = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ValuesError(f"--set {assignment!r}: the value is not YAML: {exc}") from None
    node = document
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
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

    emit(Values, Values(), 0)
    return "\n".join(lines) + "\n"
