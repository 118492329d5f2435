"""Finding the cache daemons of a cluster: one ``Discovery`` protocol, four sources.

Invariant: ``addresses()`` either returns the whole current membership, as sorted,
de-duplicated ``"host:port"`` strings (IPv6 hosts bracketed: ``"[fd00::1]:7100"``), or raises
``DiscoveryError``. It never returns a partial or guessed list, so a caller that keeps its
last good list on ``DiscoveryError`` never drops live peers because a lookup failed. The list
may include this node; telling itself apart is the caller's job.

::

    CacheError (kvcache.errors)
     └── DiscoveryError       the source could not be read (DNS failure, API error, no
                              credentials, kubernetes client missing); message names the fix

Sources, picked by ``make_discovery`` from the ``cluster_discovery`` setting:

``static``  ``StaticDiscovery``: a fixed list (``cluster_peers``), checked at construction.
``dns``     ``DnsDiscovery``: the A/AAAA records of a headless Service (``clusterIP: None``),
            each with one configured port. Needs no API access and no RBAC. A Service with no
            ready pods has no records, which DNS reports as a failure, so scaling to zero is
            seen as an error (the caller keeps its last list) rather than as an empty cluster.
``k8s``     ``KubernetesDiscovery``: one GET of the Service's ``Endpoints`` object through the
            official client; sees only *ready* pods and takes the port by name, so the port
            can differ between deployments. Needs ``get`` on ``endpoints`` in the namespace.

``InMemoryDiscovery`` is the test double: ``set()`` the membership, ``fail()`` the next reads.
``StaticDiscovery(())`` is the null source.

Rejected: ``EndpointSlice`` instead of ``Endpoints`` (deprecated since Kubernetes 1.33 but
still served). Slices need a label-selected list and a merge across slices to answer the
same question; Endpoints is one object per Service, and a cache cluster stays far below its
1000-address cap. Also rejected: watching instead of polling; a poll every few seconds is
simple to reason about, and a missed watch event would silently freeze the membership.

The ``kubernetes`` package is optional (``pip install shoal[k8s]``) and imported only when a
``KubernetesDiscovery`` is built, so the other sources work without it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from kvcache.errors import CacheError

__all__ = [
    "DISCOVERY_KINDS",
    "Discovery",
    "DiscoveryError",
    "DnsDiscovery",
    "InMemoryDiscovery",
    "KubernetesDiscovery",
    "Resolver",
    "StaticDiscovery",
    "format_address",
    "make_discovery",
    "parse_address",
]

DISCOVERY_KINDS = ("static", "dns", "k8s")

# A DNS name or an IPv4 address; IPv6 addresses must come bracketed.
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


class DiscoveryError(CacheError):
    """The membership source could not be read; the message names the fix."""


class Discovery(Protocol):
    """Where the addresses of a cluster's cache daemons come from."""

    def addresses(self) -> list[str]:
        """Sorted, de-duplicated ``"host:port"`` strings of the cluster's daemons.

        May include this node. Raises ``DiscoveryError`` when the source cannot be read
        (the caller keeps its last list).
        """
        ...


class Resolver(Protocol):
    """The part of ``socket.getaddrinfo`` that ``DnsDiscovery`` calls."""

    def __call__(
        self, host: str, port: int, family: int = 0, type: int = 0
    ) -> Iterable[tuple[int, int, int, str, tuple[Any, ...]]]: ...


def parse_address(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into ``(host, port)``; IPv6 comes unbracketed.

    Raises ``ValueError`` naming the entry and the expected form.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"address {text!r} must be host:port with a port in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"address {text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"address {text!r}: write IPv6 addresses in brackets, as [::1]:7000")
    elif not _HOST.fullmatch(host):
        raise ValueError(f"address {text!r} must be host:port, e.g. cache-0.shoal:7100")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The ``"host:port"`` form of ``(host, port)``, bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _canonical(addresses: Iterable[str]) -> list[str]:
    """Validate, normalise (``"h:07000"`` -> ``"h:7000"``), de-duplicate and sort."""
    return sorted({format_address(*parse_address(address)) for address in addresses})


class StaticDiscovery:
    """A fixed list of addresses, validated when built; never fails to read."""

    def __init__(self, addresses: Sequence[str]) -> None:
        if isinstance(addresses, str):  # a lone "h:p" would iterate as characters
            raise TypeError("StaticDiscovery takes a sequence of addresses, not one string")
        self._addresses = _canonical(addresses)

    def addresses(self) -> list[str]:
        return list(self._addresses)


class DnsDiscovery:
    """Every A/AAAA record of ``name`` (a headless Service), each paired with ``port``.

    ``resolve`` defaults to ``socket.getaddrinfo`` (the system resolver, so ``/etc/hosts``
    and the pod's search domains apply); tests inject a fake.
    """

    def __init__(self, name: str, port: int, *, resolve: Resolver = socket.getaddrinfo) -> None:
        if not name:
            raise ValueError("DnsDiscovery needs a DNS name, e.g. shoal-cache.serving.svc")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} must be in 1..65535")
        self.name = name
        self.port = port
        self._resolve = resolve

    def addresses(self) -> list[str]:
        try:
            records = self._resolve(self.name, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror is an OSError
            raise DiscoveryError(
                f"cannot resolve {self.name!r}: {exc}; check that cluster_dns_name names a "
                "headless Service (clusterIP: None) with ready pods"
            ) from exc
        hosts = {
            # sockaddr[0] is the address; an IPv6 scope stays attached as "fe80::1%eth0".
            str(sockaddr[0])
            for family, _type, _proto, _canonname, sockaddr in records
            if family in (socket.AF_INET, socket.AF_INET6)
        }
        return sorted(format_address(host, self.port) for host in hosts)


class KubernetesDiscovery:
    """The ready addresses of a Service's ``Endpoints``, on the port named ``port_name``.

    ``api`` is a ``kubernetes.client.CoreV1Api``; left out, one is built from the pod's
    service account (``load_incluster_config``) or, outside a cluster, from the kubeconfig
    (``$KUBECONFIG`` or ``~/.kube/config``), and ``close()`` releases its connections.
    Not-ready addresses are left out: a pod failing its readiness probe is not a peer.
    When a subset has exactly one port and it is unnamed, that port is used.
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        port_name: str = "cluster",
        *,
        api: Any = None,
        request_timeout_s: float = 5.0,
    ) -> None:
        try:
            import kubernetes
            import urllib3
        except ImportError as exc:
            raise DiscoveryError(
                "cluster_discovery=k8s needs the kubernetes client: pip install shoal[k8s]"
            ) from exc
        if not service or not namespace:
            raise ValueError("KubernetesDiscovery needs a Service name and its namespace")
        self.service = service
        self.namespace = namespace
        self.port_name = port_name
        self._request_timeout_s = request_timeout_s
        self._api_exception: type[Exception] = kubernetes.client.ApiException
        self._transport_errors: tuple[type[Exception], ...] = (
            urllib3.exceptions.HTTPError,
            OSError,
        )
        self._owned_api_client: Any = None
        if api is None:
            api_client = kubernetes.client.ApiClient(_load_configuration(kubernetes))
            self._owned_api_client = api_client
            api = kubernetes.client.CoreV1Api(api_client)
        self._api: Any = api

    def addresses(self) -> list[str]:
        where = f"Endpoints {self.namespace}/{self.service}"
        try:
            endpoints = self._api.read_namespaced_endpoints(
                self.service, self.namespace, _request_timeout=self._request_timeout_s
            )
        except self._api_exception as exc:
            status = getattr(exc, "status", None)
            reason = getattr(exc, "reason", None)
            raise DiscoveryError(
                f"cannot read {where}: {status} {reason}; {_hint(status)}"
            ) from exc
        except self._transport_errors as exc:
            raise DiscoveryError(
                f"cannot reach the Kubernetes API for {where}: {exc}; check the API server "
                "address and that the pod can reach it"
            ) from exc
        except ValueError as exc:  # an unparsable reply (JSON or model validation)
            raise DiscoveryError(f"malformed reply reading {where}: {exc}") from exc
        found: set[str] = set()
        for subset in endpoints.subsets or ():
            ready = subset.addresses or ()
            if not ready:
                continue
            port = self._pick_port(subset.ports or ())
            if port is None:
                raise DiscoveryError(
                    f"{where} has no port named {self.port_name!r}; name the daemons' "
                    f"Service port {self.port_name!r}"
                )
            found.update(format_address(str(address.ip), port) for address in ready)
        return sorted(found)

    def _pick_port(self, ports: Iterable[Any]) -> int | None:
        ports = list(ports)
        for port in ports:
            if port.name == self.port_name:
                return int(port.port)
        if len(ports) == 1 and not ports[0].name:
            return int(ports[0].port)
        return None

    def close(self) -> None:
        """Release the connections of the API client built here (an injected one is kept)."""
        if self._owned_api_client is not None:
            self._owned_api_client.close()
            self._owned_api_client = None


def _load_configuration(kubernetes: Any) -> Any:
    """The pod's service-account configuration, else the kubeconfig's; never the global one."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        try:
            # $KUBECONFIG is read here, not at import as the client's default path is.
            kubernetes.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
            )
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise DiscoveryError(
                f"no Kubernetes credentials ({exc}); run in a pod with a service account "
                "or point KUBECONFIG at a kubeconfig"
            ) from exc
    return configuration


def _hint(status: object) -> str:
    if status == 404:
        return "check that cluster_k8s_service and cluster_k8s_namespace name the daemons' Service"
    if status in (401, 403):
        return "grant the pod's service account 'get' on endpoints in that namespace (RBAC)"
    return "check the Kubernetes API server"


class InMemoryDiscovery:
    """A membership the test sets: ``set()`` replaces it, ``fail()`` makes reads raise."""

    def __init__(self, addresses: Iterable[str] = ()) -> None:
        self._addresses = _canonical(addresses)
        self._failure: str | None = None
        self.num_reads = 0

    def set(self, addresses: Iterable[str]) -> None:
        """Replace the membership and clear any ``fail()``."""
        self._addresses = _canonical(addresses)
        self._failure = None

    def fail(self, message: str = "discovery source unavailable") -> None:
        """Make every read raise ``DiscoveryError(message)`` until the next ``set()``."""
        self._failure = message

    def addresses(self) -> list[str]:
        self.num_reads += 1
        if self._failure is not None:
            raise DiscoveryError(self._failure)
        return list(self._addresses)


def make_discovery(
    kind: str,
    *,
    peers: str,
    dns_name: str,
    k8s_service: str,
    k8s_namespace: str,
    port: int,
) -> Discovery:
    """The source named by ``cluster_discovery``, built from the matching settings.

    ``peers`` is a comma-separated ``"host:port"`` list; ``port`` is the daemons' cluster
    port, used by ``dns`` (``k8s`` reads the port from the Service). Raises ``ValueError``
    naming the setting that is missing or malformed.
    """
    if kind == "static":
        entries = [entry.strip() for entry in peers.split(",") if entry.strip()]
        if not entries:
            raise ValueError("cluster_peers is required with cluster_discovery=static")
        try:
            return StaticDiscovery(entries)
        except ValueError as exc:
            raise ValueError(f"cluster_peers: {exc}") from None
    if kind == "dns":
        if not dns_name:
            raise ValueError("cluster_dns_name is required with cluster_discovery=dns")
        return DnsDiscovery(dns_name, port)
    if kind == "k8s":
        if not k8s_service:
            raise ValueError("cluster_k8s_service is required with cluster_discovery=k8s")
        if not k8s_namespace:
            raise ValueError("cluster_k8s_namespace is required with cluster_discovery=k8s")
        return KubernetesDiscovery(k8s_service, k8s_namespace)
    raise ValueError(f"cluster_discovery {kind!r} must be one of {', '.join(DISCOVERY_KINDS)}")
