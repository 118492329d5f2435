"""Discovery returns the whole membership, sorted and de-duplicated, or raises DiscoveryError.

Every source passes ``DiscoveryContract``. The Kubernetes source is driven through the real
``kubernetes`` client against a small HTTP server on 127.0.0.1 that serves Endpoints objects
the way the API server does, so the client's URL building, (de)serialisation and error
mapping are exercised, not mocked.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from kvcache.cluster.discovery import (
    Discovery,
    DiscoveryError,
    DnsDiscovery,
    InMemoryDiscovery,
    KubernetesDiscovery,
    StaticDiscovery,
    format_address,
    make_discovery,
    parse_address,
)
from kvcache.errors import CacheError

# --- factories --------------------------------------------------------------------------


def addrinfo(*hosts: str, port: int = 7100) -> list[tuple[Any, ...]]:
    """What getaddrinfo answers for ``hosts``: one stream record per host."""
    records: list[tuple[Any, ...]] = []
    for host in hosts:
        if ":" in host:
            records.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (host, port, 0, 0)))
        else:
            records.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (host, port)))
    return records


def endpoints(*subsets: dict[str, Any], name: str = "shoal-cache") -> dict[str, Any]:
    """A v1 Endpoints object as the API server serialises it."""
    return {
        "kind": "Endpoints",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "serving", "resourceVersion": "42"},
        "subsets": list(subsets),
    }


def subset(
    ready: Iterable[str],
    not_ready: Iterable[str] = (),
    ports: Iterable[tuple[str | None, int]] = (("metrics", 9500), ("cluster", 7100)),
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "addresses": [{"ip": ip, "nodeName": "node-1"} for ip in ready],
        "ports": [
            {"port": port, "protocol": "TCP", **({"name": name} if name else {})}
            for name, port in ports
        ],
    }
    if not_ready:
        result["notReadyAddresses"] = [{"ip": ip} for ip in not_ready]
    return result


# --- a tiny Kubernetes API server -----------------------------------------------------


class FakeApiServer:
    """Serves ``GET /api/v1/namespaces/<ns>/endpoints/<name>`` from ``objects``; 404 else."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.paths.append(self.path)
                parts = self.path.split("?")[0].strip("/").split("/")
                found = None
                if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[4] == "endpoints":
                    found = owner.objects.get((parts[3], parts[5]))
                if found is None:
                    status, body = 404, self._not_found(parts[-1])
                else:
                    status, body = 200, found
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            @staticmethod
            def _not_found(name: str) -> dict[str, Any]:
                return {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": f'endpoints "{name}" not found',
                    "reason": "NotFound",
                    "code": 404,
                }

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest's captured output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    try:
        yield server
    finally:
        server.close()


@contextmanager
def core_api(url: str) -> Iterator[Any]:
    """A real CoreV1Api for ``url`` that gives up at once instead of retrying."""
    configuration = kubernetes.client.Configuration(host=url)
    configuration.retries = 0
    api_client: Any = kubernetes.client.ApiClient(configuration)
    try:
        yield kubernetes.client.CoreV1Api(api_client)
    finally:
        api_client.close()


@pytest.fixture
def api(api_server: FakeApiServer) -> Iterator[Any]:
    with core_api(api_server.url) as api:
        yield api


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("cache-0.shoal.serving.svc:7100", ("cache-0.shoal.serving.svc", 7100)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("[::1]:7000", ("::1", 7000)),
        ("[fd00::a:2]:65535", ("fd00::a:2", 65535)),
        ("localhost:07000", ("localhost", 7000)),
    ],
)
def test_addresses_parse_into_host_and_port(text: str, parsed: tuple[str, int]) -> None:
    assert parse_address(text) == parsed


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("cache-0", "host:port"),
        ("cache-0:", "host:port"),
        ("cache-0:http", "host:port"),
        ("cache-0:0", "1..65535"),
        ("cache-0:65536", "1..65535"),
        (":7000", "host:port"),
        ("::1:7000", r"brackets, as \[::1\]:7000"),
        ("[cache-0]:7000", "not an IPv6 address"),
        ("cache 0:7000", "host:port"),
        ("-cache:7000", "host:port"),
    ],
)
def test_bad_addresses_are_named_with_the_expected_form(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as raised:
        parse_address(text)
    assert repr(text) in str(raised.value)


def test_ipv6_hosts_are_formatted_in_brackets() -> None:
    assert format_address("::1", 7000) == "[::1]:7000"
    assert format_address("10.0.0.1", 7000) == "10.0.0.1:7000"
    assert format_address(*parse_address("[fd00::1]:7100")) == "[fd00::1]:7100"


# --- the contract every source keeps --------------------------------------------------


class DiscoveryContract:
    """Every source returns its whole membership sorted, de-duplicated and normalised."""

    def make(self, addresses: list[str]) -> Discovery:
        raise NotImplementedError

    def test_an_empty_membership_is_an_empty_list(self) -> None:
        assert self.make([]).addresses() == []

    def test_addresses_come_sorted_and_de_duplicated(self) -> None:
        discovery = self.make(["10.0.0.3:7100", "10.0.0.1:7100", "10.0.0.3:7100"])
        assert discovery.addresses() == ["10.0.0.1:7100", "10.0.0.3:7100"]

    def test_ipv6_addresses_come_bracketed(self) -> None:
        discovery = self.make(["[fd00::2]:7100", "10.0.0.1:7100"])
        assert discovery.addresses() == ["10.0.0.1:7100", "[fd00::2]:7100"]

    def test_every_read_returns_a_fresh_list(self) -> None:
        discovery = self.make(["10.0.0.1:7100"])
        first = discovery.addresses()
        first.append("10.9.9.9:7100")
        assert discovery.addresses() == ["10.0.0.1:7100"]


class TestStaticDiscovery(DiscoveryContract):
    def make(self, addresses: list[str]) -> Discovery:
        return StaticDiscovery(addresses)

    def test_entries_are_validated_when_built(self) -> None:
        with pytest.raises(ValueError, match="'cache-1:x'"):
            StaticDiscovery(["cache-0:7100", "cache-1:x"])

    def test_entries_are_normalised(self) -> None:
        assert StaticDiscovery(["b:07100", "a:7100", "b:7100"]).addresses() == [
            "a:7100",
            "b:7100",
        ]

    def test_one_string_is_not_a_list_of_addresses(self) -> None:
        with pytest.raises(TypeError, match="not one string"):
            StaticDiscovery("cache-0:7100")


class TestInMemoryDiscovery(DiscoveryContract):
    def make(self, addresses: list[str]) -> Discovery:
        return InMemoryDiscovery(addresses)

    def test_set_replaces_the_membership(self) -> None:
        discovery = InMemoryDiscovery(["a:1"])
        discovery.set(["c:1", "b:1"])
        assert discovery.addresses() == ["b:1", "c:1"]

    def test_fail_raises_until_the_next_set(self) -> None:
        discovery = InMemoryDiscovery(["a:1"])
        discovery.fail("api server down")
        for _ in range(2):
            with pytest.raises(DiscoveryError, match="api server down"):
                discovery.addresses()
        discovery.set(["b:1"])
        assert discovery.addresses() == ["b:1"]
        assert discovery.num_reads == 3

    def test_set_validates(self) -> None:
        with pytest.raises(ValueError, match="'b'"):
            InMemoryDiscovery().set(["b"])


class TestDnsDiscovery(DiscoveryContract):
    def make(self, addresses: list[str]) -> Discovery:
        # Each address must share the DNS port; the contract uses 7100 throughout.
        hosts = [parse_address(address)[0] for address in addresses]
        return DnsDiscovery("shoal-cache", 7100, resolve=lambda *_, **__: addrinfo(*hosts))

    def test_the_name_port_and_stream_type_are_asked_for(self) -> None:
        calls: list[tuple[Any, ...]] = []

        def resolve(host: str, port: int, family: int = 0, type: int = 0) -> list[Any]:
            calls.append((host, port, type))
            return addrinfo("10.0.0.1")

        DnsDiscovery("shoal-cache.serving.svc", 7100, resolve=resolve).addresses()
        assert calls == [("shoal-cache.serving.svc", 7100, socket.SOCK_STREAM)]

    def test_records_of_every_socket_type_collapse_to_one_address(self) -> None:
        records = addrinfo("10.0.0.2", "10.0.0.1") * 3  # as for SOCK_STREAM, DGRAM and RAW
        discovery = DnsDiscovery("shoal-cache", 7100, resolve=lambda *_, **__: records)
        assert discovery.addresses() == ["10.0.0.1:7100", "10.0.0.2:7100"]

    def test_the_configured_port_is_used_for_every_record(self) -> None:
        discovery = DnsDiscovery(
            "shoal-cache", 7200, resolve=lambda *_, **__: addrinfo("fd00::1", port=9)
        )
        assert discovery.addresses() == ["[fd00::1]:7200"]

    @pytest.mark.parametrize(
        "error",
        [
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            OSError(101, "Network is unreachable"),
        ],
    )
    def test_resolver_failures_are_discovery_errors(self, error: OSError) -> None:
        def resolve(*_: Any, **__: Any) -> list[Any]:
            raise error

        discovery = DnsDiscovery("shoal-cache", 7100, resolve=resolve)
        with pytest.raises(DiscoveryError, match="headless Service") as raised:
            discovery.addresses()
        assert isinstance(raised.value, CacheError)
        assert raised.value.__cause__ is error

    def test_localhost_resolves_through_the_system_resolver(self) -> None:
        found = DnsDiscovery("localhost", 7100).addresses()
        assert found
        assert set(found) <= {"127.0.0.1:7100", "[::1]:7100"}

    def test_bad_settings_are_refused_when_built(self) -> None:
        with pytest.raises(ValueError, match="DNS name"):
            DnsDiscovery("", 7100)
        with pytest.raises(ValueError, match="1..65535"):
            DnsDiscovery("shoal-cache", 0)


class TestKubernetesDiscovery(DiscoveryContract):
    @pytest.fixture(autouse=True)
    def _server(self, api_server: FakeApiServer, api: Any) -> None:
        self.server = api_server
        self.api = api

    def make(self, addresses: list[str]) -> Discovery:
        ips = [parse_address(address)[0] for address in addresses]
        self.server.objects["serving", "shoal-cache"] = endpoints(*[subset(ips)] if ips else [])
        return KubernetesDiscovery("shoal-cache", "serving", api=self.api)

    def test_only_ready_addresses_on_the_named_port_are_peers(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(
            subset(["10.0.0.2", "10.0.0.1"], not_ready=["10.0.0.3"])
        )
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=self.api)
        assert discovery.addresses() == ["10.0.0.1:7100", "10.0.0.2:7100"]
        assert self.server.paths == ["/api/v1/namespaces/serving/endpoints/shoal-cache"]

    def test_each_subset_uses_its_own_port(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(
            subset(["10.0.0.1"]),
            subset(["10.0.1.1", "fd00::1"], ports=[("cluster", 7200), ("metrics", 9500)]),
        )
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=self.api)
        assert discovery.addresses() == ["10.0.0.1:7100", "10.0.1.1:7200", "[fd00::1]:7200"]

    def test_the_port_name_is_configurable(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(subset(["10.0.0.1"]))
        discovery = KubernetesDiscovery("shoal-cache", "serving", "metrics", api=self.api)
        assert discovery.addresses() == ["10.0.0.1:9500"]

    def test_a_lone_unnamed_port_is_used(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(
            subset(["10.0.0.1"], ports=[(None, 7300)])
        )
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=self.api)
        assert discovery.addresses() == ["10.0.0.1:7300"]

    def test_a_missing_port_name_is_an_error_naming_the_fix(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(
            subset(["10.0.0.1"], ports=[("http", 80), ("metrics", 9500)])
        )
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=self.api)
        with pytest.raises(DiscoveryError, match="name the daemons' Service port 'cluster'"):
            discovery.addresses()

    def test_a_subset_with_only_unready_addresses_adds_nobody(self) -> None:
        self.server.objects["serving", "shoal-cache"] = endpoints(
            {"notReadyAddresses": [{"ip": "10.0.0.3"}], "ports": [{"name": "x", "port": 1}]}
        )
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=self.api)
        assert discovery.addresses() == []

    def test_a_missing_service_is_a_discovery_error_with_status(self) -> None:
        discovery = KubernetesDiscovery("no-such-service", "serving", api=self.api)
        with pytest.raises(DiscoveryError, match="404 Not Found") as raised:
            discovery.addresses()
        assert "cluster_k8s_service" in str(raised.value)
        assert isinstance(raised.value.__cause__, kubernetes.client.ApiException)


def test_an_unreachable_api_server_is_a_discovery_error() -> None:
    with core_api(f"http://127.0.0.1:{unused_port()}") as api:
        discovery = KubernetesDiscovery("shoal-cache", "serving", api=api)
        with pytest.raises(DiscoveryError, match="cannot reach the Kubernetes API"):
            discovery.addresses()


def test_the_client_is_built_from_the_kubeconfig_outside_a_cluster(
    api_server: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(  # JSON is YAML, so this is a valid kubeconfig
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": api_server.url}}],
                "users": [{"name": "test", "user": {"token": "secret"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
                "current-context": "test",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api_server.objects["serving", "shoal-cache"] = endpoints(subset(["10.0.0.1"]))
    default_before = kubernetes.client.Configuration._default
    discovery = KubernetesDiscovery("shoal-cache", "serving")
    try:
        assert discovery.addresses() == ["10.0.0.1:7100"]
    finally:
        discovery.close()
    assert kubernetes.client.Configuration._default is default_before  # no global state


def test_missing_credentials_are_a_discovery_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(DiscoveryError, match="KUBECONFIG"):
        KubernetesDiscovery("shoal-cache", "serving")


def test_a_missing_kubernetes_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # makes `import kubernetes` fail
    with pytest.raises(DiscoveryError, match=r"pip install shoal\[k8s\]"):
        KubernetesDiscovery("shoal-cache", "serving", api=object())


# --- the factory ------------------------------------------------------------------------


def settings(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "peers": "",
        "dns_name": "",
        "k8s_service": "",
        "k8s_namespace": "",
        "port": 7100,
    }
    return base | overrides


def test_static_peers_are_a_comma_separated_list() -> None:
    discovery = make_discovery("static", **settings(peers=" b:7100, a:7100,,[::1]:7000 "))
    assert isinstance(discovery, StaticDiscovery)
    assert discovery.addresses() == ["[::1]:7000", "a:7100", "b:7100"]


def test_a_bad_static_peer_names_the_setting_and_the_entry() -> None:
    with pytest.raises(ValueError, match=r"cluster_peers: address 'b:x'"):
        make_discovery("static", **settings(peers="a:7100,b:x"))


def test_dns_discovery_uses_the_cluster_port() -> None:
    discovery = make_discovery("dns", **settings(dns_name="shoal-cache.serving.svc", port=7200))
    assert isinstance(discovery, DnsDiscovery)
    assert (discovery.name, discovery.port) == ("shoal-cache.serving.svc", 7200)


def test_k8s_discovery_reads_the_named_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, api_server: FakeApiServer
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": api_server.url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api_server.objects["prod", "shoal"] = endpoints(subset(["10.0.0.1"]))
    discovery = make_discovery("k8s", **settings(k8s_service="shoal", k8s_namespace="prod"))
    assert isinstance(discovery, KubernetesDiscovery)
    try:
        assert discovery.addresses() == ["10.0.0.1:7100"]
    finally:
        discovery.close()


@pytest.mark.parametrize(
    ("kind", "overrides", "complaint"),
    [
        ("static", {}, "cluster_peers is required with cluster_discovery=static"),
        ("dns", {}, "cluster_dns_name is required with cluster_discovery=dns"),
        ("k8s", {"k8s_namespace": "prod"}, "cluster_k8s_service is required"),
        ("k8s", {"k8s_service": "shoal"}, "cluster_k8s_namespace is required"),
        ("consul", {}, "cluster_discovery 'consul' must be one of static, dns, k8s"),
    ],
)
def test_a_missing_setting_is_named(kind: str, overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        make_discovery(kind, **settings(**overrides))
