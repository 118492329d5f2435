"""Where the router's engines come from: one ``Discovery`` protocol, five sources.

Invariant: ``await engines()`` returns the whole current list of engines, sorted by URL
and de-duplicated, and never raises after construction. A source that cannot be read
(DNS failure, a malformed file, an API error) keeps its last good list, logs the failure
(once when it starts, then at most every ``log_interval_s``) and counts it
(``num_failures``), so a flaky source never empties the fleet. Bad configuration raises
``ConfigError`` at construction, with the fix in the message. Reads happen at most every
``interval_s``; between reads ``engines()`` answers from memory, so the pool may call it
as often as it likes.

Sources (``make_discovery`` picks one from ``--discovery``; ``--engines`` names what to
look up for the first three)::

    static  --engines http://h:8000,http://h:8001=node-a/gpu1     a fixed list
    dns     --engines http://vllm.serving.svc:8000                 every A/AAAA record of
            the name (a headless Service), with the URL's scheme and port; several names
            are merged. No records is a failure (the last list stays), as in
            ``kvcache.cluster.discovery``: scaling to zero looks like a DNS outage.
    k8s     --engines [NAMESPACE/]SERVICE[:PORT_NAME][@GPU_TYPE]   the Service's
            EndpointSlices (discovery.k8s.io/v1, label kubernetes.io/service-name=SERVICE)
            through the official client: ready endpoints only (``conditions.ready`` true or
            unset, as the API defines it), the port named PORT_NAME (default ``http``; a
            slice's only unnamed port also fits), merged across slices. Needs ``list`` on
            ``endpointslices`` in the namespace. NAMESPACE defaults to the pod's own.
            Several Services (comma-separated) are merged; ``@GPU_TYPE`` gives every
            engine of that Service its GPU type (one Service per placement pool).
    file    --discovery-file engines.yaml                           a JSON or YAML list of
            ``{url, stream?, gpu_type?, gpus?}`` (or bare URL strings), re-read when its
            mtime or size changes
    http    --engines http://shoal-engines-fleet.ns.svc:8093/v1/discovery
            --discovery-token-file T                              the same list as JSON from
            ``GET URL`` (``shoal engines serve`` publishes its ready groups there: the file
            a router in another pod cannot read), bearer token from T, at most
            ``MAX_DISCOVERY_BYTES``; polled every interval, never cached by mtime

Streams (``<node>/gpu<i>``, the cache daemon's name for an engine's GPU) come only from
static, file and http sources; dns and k8s engines have none (precise routing then sees no
GPU prefix for them, and falls back to node-cache and approximate signals). GPU types
(``"gpu_type": "A100"``, the placement plan's names, issue 14) come from file and http
entries (the placement planner's local pools write them) and from ``@GPU_TYPE`` after a
k8s Service (one Service per Kubernetes pool); static ``--engines`` has no spelling for them
(``URL=NODE/gpuI`` is taken by the stream), so static engines have none: the ``slo``
strategy then ignores the plan for them.

GPUs (``"gpus": ["node-a/gpu0", "node-a/gpu1"]``, the ``NODE/gpuI`` names the health
watchers report, issue 15) come from file and http entries (the Ray fleet publishes them
for its groups); an engine with a stream and no ``gpus`` runs on its stream's GPU (so
static ``--engines URL=NODE/gpuI`` names one). A ``gpus`` value that is not a list of at most
``MAX_ENGINE_GPUS`` such names makes the file malformed, like any other bad entry. dns and
k8s engines have none: the router never takes them out for GPU health; on Kubernetes the
health watcher cordons the node (``shoal health watch --cordon``) and the engine's pod is
replaced elsewhere, and the router's own ``/health`` checks remain.

Rejected: a Kubernetes watch (a poll every few seconds is simple to reason about, and a
missed watch event would silently freeze the list; the same choice as the cache cluster's
discovery); the ``Endpoints`` API (deprecated since Kubernetes 1.33; the router's fleet
can outgrow its 1000-address cap, which slices do not have).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from kvcache.cluster.discovery import DiscoveryError, _load_configuration, format_address
from router.types import EngineSpec
from shoal.bodies import read_capped
from shoal.config import read_secret
from shoal.errors import ConfigError

__all__ = [
    "DISCOVERY_KINDS",
    "MAX_DISCOVERY_BYTES",
    "MAX_ENGINE_GPUS",
    "Discovery",
    "DnsDiscovery",
    "FileDiscovery",
    "HttpDiscovery",
    "KubernetesDiscovery",
    "MergedDiscovery",
    "StaticDiscovery",
    "make_discovery",
    "parse_engine_list",
]

log = logging.getLogger("shoal." + __name__)

DISCOVERY_KINDS = ("static", "dns", "k8s", "file", "http")
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: what ``DnsDiscovery`` calls (tests inject one)."""

Fetch = Callable[[], Awaitable[tuple[int, bytes | None]]]
"""``() -> (status, body or None when over the cap)``: ``HttpDiscovery``'s GET (tests
inject one)."""


class Discovery(Protocol):
    async def engines(self) -> list[EngineSpec]: ...

    async def close(self) -> None: ...


class _ReadFailed(Exception):
    """A source could not be read this time; the message says why and what to check."""


def _check_url(url: str, where: str) -> str:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where}: {url!r} is not an http(s)://HOST:PORT URL")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise ValueError(f"{where}: {url!r} has a malformed port") from None
    return url


def _check_stream(stream: str, where: str) -> str:
    stream = stream.strip()
    node, sep, gpu = stream.partition("/")
    if stream and not (node and sep and gpu):
        raise ValueError(f"{where}: stream {stream!r} must be NODE/gpuI")
    return stream


MAX_ENGINE_GPUS = 64  # a tp x pp group of 8 x 8 GPUs
_GPU_NAME = re.compile(r"[^/\s]+/gpu[0-9]{1,4}")


def _check_gpus(gpus: Any, where: str) -> tuple[str, ...]:
    """A file entry's ``gpus``: a list of at most ``MAX_ENGINE_GPUS`` distinct
    ``NODE/gpuI`` names (the health watchers' ``control.health.types.gpu_name``)."""
    if not isinstance(gpus, list) or len(gpus) > MAX_ENGINE_GPUS:
        raise ValueError(f"{where}: gpus must be a list of at most {MAX_ENGINE_GPUS} names")
    for name in gpus:
        if not isinstance(name, str) or not _GPU_NAME.fullmatch(name):
            raise ValueError(f"{where}: gpus entry {name!r} must be NODE/gpuI (node-a/gpu0)")
    return tuple(dict.fromkeys(gpus))


_GPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_gpu_type(gpu_type: str, where: str) -> str:
    """A GPU type as profiles and plans name it (``A100``, ``H100-80GB``, ``l4``): letters,
    digits, ``.``, ``_`` and ``-``, at most 64, or empty (unknown)."""
    gpu_type = gpu_type.strip()
    if gpu_type and not _GPU_TYPE.fullmatch(gpu_type):
        raise ValueError(
            f"{where}: gpu_type {gpu_type!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(as the placement profiles name it)"
        )
    return gpu_type


def _canonical(specs: Iterable[EngineSpec]) -> list[EngineSpec]:
    """Sorted by URL; a URL named twice keeps its first stream."""
    seen: dict[str, EngineSpec] = {}
    for spec in specs:
        seen.setdefault(spec.url, spec)
    return sorted(seen.values(), key=lambda spec: spec.url)


def parse_engine_list(text: str) -> list[EngineSpec]:
    """``URL[=NODE/gpuI],...`` (``--engines``) -> specs; ``ConfigError`` naming a bad item."""
    specs: list[EngineSpec] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        url, _, stream = item.partition("=")
        try:
            specs.append(
                EngineSpec(_check_url(url, "--engines"), _check_stream(stream, "--engines"))
            )
        except ValueError as exc:
            raise ConfigError(f"{exc} (items are URL or URL=NODE/gpuI)") from None
    return _canonical(specs)


class _Polled:
    """A source read at most every ``interval_s``, keeping its last good list."""

    what = "engines"

    def __init__(self, *, interval_s: float, log_interval_s: float,
                 clock: Callable[[], float]) -> None:  # fmt: skip
        if interval_s <= 0:
            raise ConfigError(f"discovery interval must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._specs: list[EngineSpec] = []
        self._read_at = -math.inf
        self._failing_since: float | None = None
        self._logged_at = -math.inf
        self.num_reads = 0
        self.num_failures = 0

    async def _read(self) -> list[EngineSpec] | None:
        """The current list, None when unchanged since the last read; raises
        ``_ReadFailed``."""
        raise NotImplementedError

    async def engines(self) -> list[EngineSpec]:
        now = self._clock()
        if now - self._read_at < self.interval_s:
            return list(self._specs)
        self._read_at = now
        self.num_reads += 1
        try:
            specs = await self._read()
        except _ReadFailed as exc:
            self._failed(str(exc), now)
            return list(self._specs)
        if self._failing_since is not None:
            log.info("%s readable again", self.what)
            self._failing_since = None
        if specs is not None:
            specs = _canonical(specs)
            if specs != self._specs:
                log.info("engines changed", extra={"source": self.what,
                                                   "engines": [s.url for s in specs]})  # fmt: skip
            self._specs = specs
        return list(self._specs)

    def _failed(self, reason: str, now: float) -> None:
        self.num_failures += 1
        if self._failing_since is None or now - self._logged_at >= self.log_interval_s:
            self._failing_since = self._failing_since if self._failing_since is not None else now
            self._logged_at = now
            log.warning("cannot read %s (%s); keeping the last %d engine(s)",
                        self.what, reason, len(self._specs))  # fmt: skip

    async def close(self) -> None:
        """Nothing to release (sources with connections override this)."""


class StaticDiscovery:
    """A fixed list, checked when built."""

    def __init__(self, specs: Iterable[EngineSpec]) -> None:
        self._specs = _canonical(specs)

    async def engines(self) -> list[EngineSpec]:
        return list(self._specs)

    async def close(self) -> None:
        pass


async def _getaddrinfo(host: str, port: int) -> list[str]:
    records = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for family, _t, _p, _c, sockaddr in records
            if family in (socket.AF_INET, socket.AF_INET6)]  # fmt: skip


class DnsDiscovery(_Polled):
    """Every A/AAAA record of each URL's host, with that URL's scheme and port."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        resolve: Resolve = _getaddrinfo,
        interval_s: float = 5.0,
        timeout_s: float = 2.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, log_interval_s=log_interval_s, clock=clock)
        if not urls:
            raise ConfigError(
                "--discovery dns needs --engines http://NAME:PORT (a headless Service)"
            )
        self._targets: list[tuple[str, str, int]] = []
        for url in urls:
            if "=" in url:
                raise ConfigError(
                    f"--discovery dns: {url!r} names a stream; resolved engines have none"
                )
            try:
                parts = urlsplit(_check_url(url, "--discovery dns"))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if parts.port is None or parts.path:
                raise ConfigError(
                    f"--discovery dns: {url!r} must be scheme://NAME:PORT (a port, no path)"
                )
            self._targets.append((parts.scheme, str(parts.hostname), parts.port))
        self.what = "DNS " + ", ".join(f"{host}:{port}" for _s, host, port in self._targets)
        self._resolve = resolve
        self.timeout_s = timeout_s

    async def _read(self) -> list[EngineSpec]:
        specs: list[EngineSpec] = []
        for scheme, host, port in self._targets:
            try:
                addresses = await asyncio.wait_for(self._resolve(host, port), self.timeout_s)
            except (TimeoutError, OSError) as exc:  # socket.gaierror is an OSError
                raise _ReadFailed(f"{host}: {exc or 'timed out'}") from None
            if not addresses:
                raise _ReadFailed(f"{host} has no A/AAAA records")
            specs += [EngineSpec(f"{scheme}://{format_address(a, port)}") for a in addresses]
        return specs


class FileDiscovery(_Polled):
    """A JSON or YAML list of ``{url, stream?, gpu_type?, gpus?}`` objects or URL strings,
    re-read when the file's mtime or size changes. Missing or malformed at construction:
    ``ConfigError``; later: the last good list stays."""

    def __init__(
        self,
        path: str | Path,
        *,
        interval_s: float = 1.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, log_interval_s=log_interval_s, clock=clock)
        self.path = Path(path)
        self.what = f"discovery file {self.path}"
        self._stamp: tuple[int, int] | None = None
        self._bad: str | None = None  # why the file as last stamped is unusable
        try:
            self._specs = _canonical(self._load())
        except _ReadFailed as exc:
            raise ConfigError(f"--discovery-file: {exc}") from None
        self._read_at = clock()

    async def _read(self) -> list[EngineSpec] | None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise _ReadFailed(f"cannot stat it: {exc.strerror}") from None
        if (stat.st_mtime_ns, stat.st_size) == self._stamp:
            if self._bad is not None:
                raise _ReadFailed(self._bad)
            return None
        try:
            specs = self._load()
        except _ReadFailed as exc:
            self._bad = str(exc)
            raise
        self._bad = None
        return specs

    def _load(self) -> list[EngineSpec]:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise _ReadFailed(f"cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise _ReadFailed(f"{self.path} is not UTF-8 text") from None
        self._stamp = (stat.st_mtime_ns, stat.st_size)  # a bad version is not re-parsed
        return _parse_entries(_parse_document(text, self.path), str(self.path))


def _parse_entries(document: Any, source: str) -> list[EngineSpec]:
    """A parsed discovery document (the file's, or ``GET /v1/discovery``'s) -> specs;
    ``_ReadFailed`` naming ``source`` and the first bad entry."""
    if not isinstance(document, list):
        raise _ReadFailed(f"{source} must hold a list of {{url, stream}} entries")
    specs: list[EngineSpec] = []
    for index, item in enumerate(document):
        where = f"{source} entry {index}"
        entry = {"url": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
            raise _ReadFailed(f"{where} must be a URL or an object with a 'url' string")
        unknown = set(entry) - {"url", "stream", "gpu_type", "gpus"}
        stream, gpu_type = entry.get("stream", ""), entry.get("gpu_type", "")
        if unknown or not isinstance(stream, str) or not isinstance(gpu_type, str):
            raise _ReadFailed(
                f"{where}: only 'url' and a 'stream' string, a 'gpu_type' string and "
                "a 'gpus' list of NODE/gpuI names are allowed"
            )
        try:
            specs.append(
                EngineSpec(
                    _check_url(entry["url"], where),
                    _check_stream(stream, where),
                    _check_gpu_type(gpu_type, where),
                    _check_gpus(entry.get("gpus", []), where),
                )
            )
        except ValueError as exc:
            raise _ReadFailed(str(exc)) from None
    return specs


def _parse_document(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        if path.suffix not in (".yaml", ".yml") and text.lstrip()[:1] in ("[", "{"):
            raise _ReadFailed(f"{path} is not valid JSON: {json_error}") from None
    try:
        import yaml
    except ImportError:
        raise _ReadFailed(f"{path} is not JSON, and reading YAML needs PyYAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _ReadFailed(f"{path} is not valid YAML: {exc}") from None


MAX_DISCOVERY_BYTES = 4 << 20  # ~20k entries with a 64-GPU list each; a bigger reply is refused


class HttpDiscovery(_Polled):
    """``GET URL`` (``shoal engines serve``'s ``/v1/discovery``, or anything serving the
    file format as JSON) every ``interval_s``, with ``Authorization: Bearer TOKEN`` when a
    token is given. The reply is parsed exactly as a discovery file's entries. A refused
    connection, a timeout, a non-200, a body over ``MAX_DISCOVERY_BYTES`` or a malformed
    list: the last good list stays (``_Polled``). The first read happens at the first
    ``engines()`` and may fail like any other: the fleet may start after the router.
    ``fetch`` replaces the HTTP call in tests (``_get`` is the real one)."""

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        interval_s: float = 5.0,
        timeout_s: float = 5.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        fetch: Fetch | None = None,
    ) -> None:
        super().__init__(interval_s=interval_s, log_interval_s=log_interval_s, clock=clock)
        try:
            self.url = _check_url(url, "--discovery http")
        except ValueError as exc:
            raise ConfigError(f"{exc} (give --engines http://FLEET:8093/v1/discovery)") from None
        if not urlsplit(self.url).path:
            self.url += "/v1/discovery"  # the base URL of shoal engines serve
        self.what = f"discovery URL {self.url}"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._fetch: Fetch = fetch if fetch is not None else self._get

    async def _get(self) -> tuple[int, bytes | None]:
        """``GET url`` over aiohttp: (status, body or None over the cap)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        async with self._session.get(self.url) as reply:
            return reply.status, await read_capped(reply, MAX_DISCOVERY_BYTES)

    async def _read(self) -> list[EngineSpec]:
        try:
            status, body = await self._fetch()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _ReadFailed(f"unreachable: {exc!r}") from None
        if status != 200:
            raise _ReadFailed(f"answered {status} {(body or b'')[:200].decode(errors='replace')}")
        if body is None:
            raise _ReadFailed(f"the answer is over {MAX_DISCOVERY_BYTES} bytes")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:  # JSON, UTF-8; nested too deep
            raise _ReadFailed(f"not JSON: {exc}") from None
        return _parse_entries(document, self.url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class KubernetesDiscovery(_Polled):
    """The ready endpoints of a Service's EndpointSlices (module docstring).

    ``api`` is a ``kubernetes.client.DiscoveryV1Api`` (tests pass a fake); left out, one
    is built from the pod's service account or the kubeconfig, and ``close()`` releases
    its connections. The client is synchronous: each poll runs in a worker thread.
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        port_name: str = "http",
        *,
        gpu_type: str = "",
        scheme: str = "http",
        api: Any = None,
        interval_s: float = 5.0,
        request_timeout_s: float = 5.0,
        log_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s=interval_s, log_interval_s=log_interval_s, clock=clock)
        try:
            import kubernetes
            import urllib3
        except ImportError:
            raise ConfigError(
                "--discovery k8s needs the kubernetes client: pip install shoal[k8s]"
            ) from None
        if not service or not namespace:
            raise ConfigError("--discovery k8s needs a Service name and its namespace")
        self.service, self.namespace, self.port_name, self.scheme = (
            service, namespace, port_name, scheme)  # fmt: skip
        try:
            self.gpu_type = _check_gpu_type(gpu_type, f"Service {namespace}/{service}")
        except ValueError as exc:
            raise ConfigError(f"--engines: {exc}") from None
        self.what = f"EndpointSlices of Service {namespace}/{service}"
        self._request_timeout_s = request_timeout_s
        self._api_exception: type[Exception] = kubernetes.client.ApiException
        self._transport_errors: tuple[type[Exception], ...] = (
            urllib3.exceptions.HTTPError, OSError)  # fmt: skip
        self._owned_api_client: Any = None
        if api is None:
            try:
                configuration = _load_configuration(kubernetes)
            except DiscoveryError as exc:
                raise ConfigError(f"--discovery k8s: {exc}") from None
            self._owned_api_client = kubernetes.client.ApiClient(configuration)
            api = kubernetes.client.DiscoveryV1Api(self._owned_api_client)
        self._api: Any = api

    async def _read(self) -> list[EngineSpec]:
        return await asyncio.to_thread(self._read_slices)

    def _read_slices(self) -> list[EngineSpec]:
        try:
            slices = self._api.list_namespaced_endpoint_slice(
                self.namespace,
                label_selector=f"kubernetes.io/service-name={self.service}",
                _request_timeout=self._request_timeout_s,
            )
        except self._api_exception as exc:
            status = getattr(exc, "status", None)
            raise _ReadFailed(f"{status} {getattr(exc, 'reason', '')}; {_hint(status)}") from None
        except self._transport_errors as exc:
            raise _ReadFailed(f"cannot reach the Kubernetes API: {exc}") from None
        except ValueError as exc:  # an unparsable reply
            raise _ReadFailed(f"malformed reply: {exc}") from None
        specs: list[EngineSpec] = []
        for endpoint_slice in slices.items or ():
            port = self._pick_port(endpoint_slice.ports or ())
            if port is None:
                continue  # a slice of another port set; a Service without the port has none
            for endpoint in endpoint_slice.endpoints or ():
                conditions = endpoint.conditions
                if conditions is not None and conditions.ready is False:
                    continue
                if endpoint.addresses:  # "consumers must only use the first" (API docs)
                    host = format_address(str(endpoint.addresses[0]), port)
                    specs.append(EngineSpec(f"{self.scheme}://{host}", gpu_type=self.gpu_type))
        return specs

    def _pick_port(self, ports: Iterable[Any]) -> int | None:
        ports = list(ports)
        for port in ports:
            if port.name == self.port_name and port.port is not None:
                return int(port.port)
        if len(ports) == 1 and not ports[0].name and ports[0].port is not None:
            return int(ports[0].port)
        return None

    async def close(self) -> None:
        if self._owned_api_client is not None:
            self._owned_api_client.close()
            self._owned_api_client = None


def _hint(status: object) -> str:
    if status == 404:
        return "check the namespace in --engines NAMESPACE/SERVICE"
    if status in (401, 403):
        return "grant the router's service account 'list' on endpointslices (RBAC)"
    return "check the Kubernetes API server"


def _own_namespace() -> str:
    try:
        return _SA_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


class MergedDiscovery:
    """Several sources as one (``--discovery k8s`` with one Service per GPU type): their
    lists concatenated and made canonical. Each source keeps its own last good list, so one
    failing Service never empties the others' engines."""

    def __init__(self, sources: Sequence[Discovery]) -> None:
        self.sources = list(sources)

    async def engines(self) -> list[EngineSpec]:
        lists = await asyncio.gather(*(source.engines() for source in self.sources))
        return _canonical(spec for specs in lists for spec in specs)

    async def close(self) -> None:
        for source in self.sources:
            await source.close()


def make_discovery(
    kind: str,
    *,
    engines: str = "",
    discovery_file: str = "",
    interval_s: float = 5.0,
    token_file: str = "",
) -> Discovery:
    """The source ``--discovery KIND`` names, from ``--engines`` / ``--discovery-file`` /
    ``--discovery-token-file`` (module docstring); ``ConfigError`` naming what is missing
    or malformed."""
    items = [item.strip() for item in engines.split(",") if item.strip()]
    if kind == "static":
        if not items:
            raise ConfigError("--discovery static needs --engines URL[,URL...]")
        return StaticDiscovery(parse_engine_list(engines))
    if kind == "dns":
        return DnsDiscovery(items, interval_s=interval_s)
    if kind == "k8s":
        if not items:
            raise ConfigError(
                "--discovery k8s needs --engines [NAMESPACE/]SERVICE[:PORT_NAME][@GPU_TYPE],..."
            )
        sources: list[Discovery] = []
        for item in items:
            where, _, gpu_type = item.partition("@")
            where, _, port_name = where.partition(":")
            namespace, _, service = where.rpartition("/")
            sources.append(
                KubernetesDiscovery(
                    service,
                    namespace or _own_namespace(),
                    port_name or "http",
                    gpu_type=gpu_type,
                    interval_s=interval_s,
                )
            )
        return sources[0] if len(sources) == 1 else MergedDiscovery(sources)
    if kind == "file":
        if not discovery_file:
            raise ConfigError("--discovery file needs --discovery-file F")
        return FileDiscovery(discovery_file, interval_s=min(interval_s, 1.0))
    if kind == "http":
        if len(items) != 1:
            raise ConfigError("--discovery http needs one --engines URL (its /v1/discovery)")
        token = read_secret(token_file, "--discovery-token-file") if token_file else ""
        return HttpDiscovery(items[0], token=token, interval_s=interval_s,
                             timeout_s=min(interval_s, 5.0))  # fmt: skip
    raise ConfigError(f"--discovery {kind!r} must be one of {', '.join(DISCOVERY_KINDS)}")
