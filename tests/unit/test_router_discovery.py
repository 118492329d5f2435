"""Engine discovery: static lists, files re-read on change, an HTTP list through an
injected fetch (the real GET is in tests/integration/test_router_http_discovery.py), DNS
through an injected resolver, Kubernetes EndpointSlices through a fake ``DiscoveryV1Api`` returning the
official client's own models (``kubernetes.client.V1EndpointSlice``...). Virtual time
decides when a source is read again; nothing here opens a socket."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from router.discovery import (
    MAX_DISCOVERY_BYTES,
    DnsDiscovery,
    FileDiscovery,
    HttpDiscovery,
    KubernetesDiscovery,
    MergedDiscovery,
    StaticDiscovery,
    make_discovery,
    parse_engine_list,
)
from router.types import EngineSpec
from shoal.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def urls(specs: Sequence[EngineSpec]) -> list[str]:
    return [spec.url for spec in specs]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- static -------------------------------------------------------------------------


def test_static_list_parses_streams_sorts_and_deduplicates() -> None:
    specs = parse_engine_list("http://b:8001/, http://a:8000=node-a/gpu1,http://b:8001")
    assert specs == [EngineSpec("http://a:8000", "node-a/gpu1"), EngineSpec("http://b:8001")]
    assert specs[0].node == "node-a" and specs[1].node == ""
    assert run(StaticDiscovery(specs).engines()) == specs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:8000", "not an http"),
        ("http://a:80=gpu1", "NODE/gpuI"),
        ("http://a:x", "malformed port"),
    ],
)
def test_static_list_names_the_bad_item(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_engine_list(text)


# -- file ---------------------------------------------------------------------------


def write(path: Path, content: Any, mtime_ns: int) -> None:
    """Write and stamp the file: equal sizes are told apart by the mtime alone."""
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_file_is_reread_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "engines.json"
    write(path, [{"url": "http://e1:8000", "stream": "n1/gpu0"}], 1_000_000_000)
    clock = Clock()
    source = FileDiscovery(path, interval_s=1.0, clock=clock)

    async def main() -> None:
        assert await source.engines() == [EngineSpec("http://e1:8000", "n1/gpu0")]
        write(path, [{"url": "http://e2:8000"}, "http://e1:8000"], 2_000_000_000)
        assert urls(await source.engines()) == ["http://e1:8000"]  # within the interval
        clock.now += 1.0
        assert await source.engines() == [
            EngineSpec("http://e1:8000"),
            EngineSpec("http://e2:8000"),
        ]
        reads = source.num_reads
        clock.now += 1.0
        assert urls(await source.engines()) == ["http://e1:8000", "http://e2:8000"]
        assert source.num_reads == reads + 1  # stat'ed, unchanged: the list is kept

    run(main())


def test_a_malformed_file_keeps_the_last_good_list_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "engines.json"
    write(path, ["http://e1:8000"], 1_000_000_000)
    clock = Clock()
    source = FileDiscovery(path, interval_s=1.0, log_interval_s=60.0, clock=clock)

    async def main() -> None:
        caplog.set_level(logging.WARNING, logger="shoal.router.discovery")
        for bad, mtime in (
            ('[{"url": ', 2),
            ('[{"url": "ftp://x"}]', 3),
            ('{"url": "http://x:1"}', 4),
        ):
            write(path, bad, mtime * 1_000_000_000)
            clock.now += 1.0
            assert urls(await source.engines()) == ["http://e1:8000"]
        clock.now += 1.0
        assert urls(await source.engines()) == ["http://e1:8000"]  # still bad: still counted
        assert source.num_failures == 4
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "keeping the last 1 engine" in warnings[0].getMessage()
        path.unlink()
        clock.now += 1.0
        assert urls(await source.engines()) == ["http://e1:8000"]  # gone: kept too
        write(path, "- url: http://e3:8000\n  stream: n3/gpu2\n", 5_000_000_000)
        clock.now += 1.0
        assert await source.engines() == [EngineSpec("http://e3:8000", "n3/gpu2")]  # YAML

    run(main())


def test_a_missing_or_malformed_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        FileDiscovery(tmp_path / "none.json")
    path = tmp_path / "engines.yaml"
    path.write_text("- {url: http://e1:8000, weight: 3}\n")
    with pytest.raises(ConfigError, match="only 'url' and a 'stream'"):
        FileDiscovery(path)


# -- dns ----------------------------------------------------------------------------


class FakeResolver:
    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.records[host]


def test_dns_resolves_every_record_with_the_urls_scheme_and_port() -> None:
    resolver = FakeResolver()
    resolver.records = {"vllm.svc": ["10.0.0.2", "10.0.0.1", "fd00::7"], "more.svc": ["10.0.1.1"]}
    clock = Clock()
    source = DnsDiscovery(
        ["http://vllm.svc:8000", "https://more.svc:9443"],
        resolve=resolver,
        interval_s=5,
        clock=clock,
    )

    async def main() -> None:
        assert urls(await source.engines()) == [
            "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://[fd00::7]:8000",
            "https://10.0.1.1:9443",
        ]  # fmt: skip
        assert resolver.calls == [("vllm.svc", 8000), ("more.svc", 9443)]
        resolver.records["vllm.svc"] = ["10.0.0.1"]
        clock.now += 4.9
        assert len(await source.engines()) == 4  # not yet due
        clock.now += 0.1
        assert urls(await source.engines()) == ["http://10.0.0.1:8000", "https://10.0.1.1:9443"]
        # a failure of any name, or no records, keeps the whole last list (never a partial one)
        resolver.records["more.svc"] = []
        clock.now += 5
        assert len(await source.engines()) == 2
        del resolver.records["vllm.svc"]
        clock.now += 5
        assert len(await source.engines()) == 2
        assert source.num_failures == 2

    run(main())


def test_dns_wants_a_port_and_no_stream() -> None:
    with pytest.raises(ConfigError, match="NAME:PORT"):
        DnsDiscovery(["http://vllm.svc"], resolve=FakeResolver())
    with pytest.raises(ConfigError, match="stream"):
        make_discovery("dns", engines="http://vllm.svc:8000=n/gpu0")


# -- k8s ----------------------------------------------------------------------------

client: Any
try:
    from kubernetes import client
except ImportError:  # the k8s extra; every other source is tested without it
    client = None

needs_k8s = pytest.mark.skipif(client is None, reason="the kubernetes client is missing")


def endpoint(ip: str, ready: bool | None = True) -> Any:
    conditions = None if ready is None else client.V1EndpointConditions(ready=ready)
    return client.V1Endpoint(addresses=[ip], conditions=conditions, node_name="node-1")


def endpoint_slice(name: str, endpoints: list[Any], ports: list[tuple[str | None, int]]) -> Any:
    return client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(name=name),
        endpoints=endpoints,
        ports=[client.DiscoveryV1EndpointPort(name=n, port=p) for n, p in ports],
    )


class FakeDiscoveryApi:
    """``DiscoveryV1Api.list_namespaced_endpoint_slice`` answering with real models."""

    def __init__(self) -> None:
        self.slices: list[Any] = []
        self.error: Exception | None = None
        self.calls: list[tuple[str, str, object]] = []

    def list_namespaced_endpoint_slice(
        self, namespace: str, *, label_selector: str, _request_timeout: object
    ) -> Any:
        self.calls.append((namespace, label_selector, _request_timeout))
        if self.error is not None:
            raise self.error
        return client.V1EndpointSliceList(items=self.slices)


@needs_k8s
def test_k8s_lists_ready_endpoints_of_every_slice_on_the_named_port() -> None:
    api = FakeDiscoveryApi()
    api.slices = [
        endpoint_slice("vllm-abc", [endpoint("10.1.0.1"), endpoint("10.1.0.2", ready=False),
                                    endpoint("10.1.0.3", ready=None)],
                       [("metrics", 9090), ("http", 8000)]),
        endpoint_slice("vllm-def", [endpoint("10.1.0.4"), endpoint("10.1.0.1")], [("http", 8000)]),
        endpoint_slice("vllm-unnamed", [endpoint("10.1.0.5")], [(None, 8001)]),
        endpoint_slice("vllm-other", [endpoint("10.1.0.6")], [("grpc", 5000)]),
    ]  # fmt: skip
    clock = Clock()
    source = KubernetesDiscovery("vllm", "serving", api=api, interval_s=5, clock=clock)

    async def main() -> None:
        assert urls(await source.engines()) == [
            "http://10.1.0.1:8000", "http://10.1.0.3:8000", "http://10.1.0.4:8000",
            "http://10.1.0.5:8001",
        ]  # fmt: skip
        assert api.calls == [("serving", "kubernetes.io/service-name=vllm", 5.0)]
        # an API error keeps the last list and is counted
        api.error = client.ApiException(status=403, reason="Forbidden")
        clock.now += 5
        assert len(await source.engines()) == 4
        assert source.num_failures == 1
        api.error = None
        api.slices = [endpoint_slice("vllm-abc", [endpoint("10.1.0.9")], [("http", 8000)])]
        clock.now += 5
        assert urls(await source.engines()) == ["http://10.1.0.9:8000"]
        await source.close()

    run(main())


KUBECONFIG = """
apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


@needs_k8s
def test_make_discovery_reads_the_k8s_service_from_engines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no Kubernetes credentials"):
        make_discovery("k8s", engines="serving/vllm:api")
    (tmp_path / "kubeconfig").write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    source = make_discovery("k8s", engines="serving/vllm:api")
    assert isinstance(source, KubernetesDiscovery)
    assert (source.namespace, source.service, source.port_name) == ("serving", "vllm", "api")
    run(source.close())
    with pytest.raises(ConfigError, match="SERVICE"):
        make_discovery("k8s", engines=" , ")
    # one Service per GPU type (the placement planner's Kubernetes pools)
    merged = make_discovery("k8s", engines="serving/llama-a100@A100,serving/llama-l4:api@L4")
    assert isinstance(merged, MergedDiscovery)
    assert [(d.service, d.port_name, d.gpu_type) for d in merged.sources] == [  # type: ignore[attr-defined]
        ("llama-a100", "http", "A100"), ("llama-l4", "api", "L4")]  # fmt: skip
    run(merged.close())
    with pytest.raises(ConfigError, match="gpu_type 'A100 80GB'"):
        make_discovery("k8s", engines="serving/llama@A100 80GB")


@needs_k8s
def test_k8s_services_per_gpu_type_are_merged_and_one_failing_keeps_its_last_list() -> None:
    a100, l4 = FakeDiscoveryApi(), FakeDiscoveryApi()
    a100.slices = [endpoint_slice("a", [endpoint("10.1.0.1")], [("http", 8000)])]
    l4.slices = [
        endpoint_slice("b", [endpoint("10.2.0.1"), endpoint("10.2.0.2")], [("http", 8000)])
    ]
    clock = Clock()
    source = MergedDiscovery([
        KubernetesDiscovery("llama-a100", "serving", gpu_type="A100", api=a100, clock=clock),
        KubernetesDiscovery("llama-l4", "serving", gpu_type="L4", api=l4, clock=clock),
    ])  # fmt: skip

    async def main() -> None:
        first = await source.engines()
        assert [(e.url, e.gpu_type) for e in first] == [
            ("http://10.1.0.1:8000", "A100"), ("http://10.2.0.1:8000", "L4"),
            ("http://10.2.0.2:8000", "L4"),
        ]  # fmt: skip
        l4.error = client.ApiException(status=503, reason="Unavailable")
        a100.slices = [endpoint_slice("a", [endpoint("10.1.0.9")], [("http", 8000)])]
        clock.now += 5
        second = await source.engines()
        assert [(e.url, e.gpu_type) for e in second] == [
            ("http://10.1.0.9:8000", "A100"), ("http://10.2.0.1:8000", "L4"),
            ("http://10.2.0.2:8000", "L4"),
        ]  # fmt: skip
        await source.close()

    run(main())


def test_make_discovery_names_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="needs --engines"):
        make_discovery("static")
    with pytest.raises(ConfigError, match="--discovery-file"):
        make_discovery("file")
    with pytest.raises(ConfigError, match="must be one of"):
        make_discovery("consul", engines="x")


def test_file_entries_may_name_their_gpu_type_and_a_malformed_one_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "engines.json"
    path.write_text(
        json.dumps(
            [
                {"url": "http://e1:8000", "gpu_type": "A100"},
                {"url": "http://e2:8000", "stream": "n2/gpu0", "gpu_type": " H100-80GB "},
                "http://e3:8000",
            ]
        )
    )
    specs = run(FileDiscovery(path).engines())
    assert specs == [
        EngineSpec("http://e1:8000", "", "A100"),
        EngineSpec("http://e2:8000", "n2/gpu0", "H100-80GB"),
        EngineSpec("http://e3:8000"),
    ]
    for bad in ('"A100 x"', '"a/b"', "3", '"' + "x" * 65 + '"'):
        path.write_text(f'[{{"url": "http://e1:8000", "gpu_type": {bad}}}]')
        with pytest.raises(ConfigError, match="gpu_type"):
            FileDiscovery(path)


# -- http ---------------------------------------------------------------------------


class Replies:
    """``HttpDiscovery``'s fetch: the scripted (status, body) or exception, calls counted."""

    def __init__(self, reply: tuple[int, bytes | None] | BaseException) -> None:
        self.reply = reply
        self.calls = 0

    async def __call__(self) -> tuple[int, bytes | None]:
        self.calls += 1
        if isinstance(self.reply, BaseException):
            raise self.reply
        return self.reply


FLEET = [
    {"url": "http://10.0.0.2:8000", "gpus": ["node-b/gpu0", "node-b/gpu1"], "gpu_type": "H100"},
    {"url": "http://10.0.0.1:8000", "gpus": ["node-a/gpu0"]},
]


def test_http_entries_parse_as_the_files_and_are_read_every_interval() -> None:
    clock = Clock()
    replies = Replies((200, json.dumps(FLEET).encode()))
    source = HttpDiscovery("http://fleet:8093", interval_s=5.0, clock=clock, fetch=replies)
    assert source.url == "http://fleet:8093/v1/discovery"  # the base URL is completed
    specs = run(source.engines())
    assert specs == [
        EngineSpec("http://10.0.0.1:8000", gpus=("node-a/gpu0",)),
        EngineSpec("http://10.0.0.2:8000", "", "H100", ("node-b/gpu0", "node-b/gpu1")),
    ]
    clock.now += 4.9
    run(source.engines())
    assert replies.calls == 1  # answered from memory within the interval
    replies.reply = (200, json.dumps(FLEET[1:]).encode())  # a group left
    clock.now += 0.1
    assert urls(run(source.engines())) == ["http://10.0.0.1:8000"]
    assert replies.calls == 2 and source.num_failures == 0


@pytest.mark.parametrize(
    ("reply", "logged"),
    [
        (ConnectionRefusedError(111, "refused"), "unreachable"),
        (TimeoutError(), "unreachable"),
        ((401, b'{"error": "missing or wrong bearer token"}'), "answered 401 {\"error"),
        ((200, None), f"over {MAX_DISCOVERY_BYTES} bytes"),
        ((200, b"{not json"), "not JSON"),
        ((200, b"\xff"), "not JSON"),
        ((200, b"[" * 100_000), "not JSON"),
        ((200, b'{"url": "http://e:1"}'), "must hold a list"),
        ((200, b'[{"url": "http://e:1", "gpus": ["gpu0"]}]'), "entry 0: gpus entry 'gpu0'"),
        ((200, b'[{"url": "http://e:1", "weight": 2}]'), "entry 0: only 'url'"),
    ],
    ids=["refused", "timeout", "401", "too-big", "bad-json", "not-utf8", "too-deep",
         "not-a-list", "bad-gpus", "unknown-key"],
)  # fmt: skip
def test_a_failed_or_malformed_http_read_keeps_the_last_good_list(
    reply: tuple[int, bytes | None] | BaseException, logged: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    clock = Clock()
    replies = Replies((200, json.dumps(FLEET).encode()))
    source = HttpDiscovery("http://fleet:8093/v1/discovery", interval_s=1.0, clock=clock,
                           fetch=replies)  # fmt: skip
    good = run(source.engines())
    assert len(good) == 2
    replies.reply = reply
    for _ in range(3):
        clock.now += 1.0
        assert run(source.engines()) == good
    assert source.num_failures == 3 and replies.calls == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per streak (log_interval_s)
    assert logged in warnings[0] and "keeping the last 2 engine(s)" in warnings[0]


def test_an_http_source_that_never_answered_has_no_engines_and_no_error() -> None:
    replies = Replies(ConnectionRefusedError(111, "refused"))
    source = HttpDiscovery("http://fleet:8093/v1/discovery", fetch=replies)
    assert run(source.engines()) == [] and source.num_failures == 1  # fleet not up yet


def test_make_discovery_http_wants_one_url_and_reads_the_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    source = make_discovery("http", engines="http://fleet:8093/v1/discovery",
                            token_file=str(token), interval_s=2.0)  # fmt: skip
    assert isinstance(source, HttpDiscovery)
    assert source._headers == {"Authorization": "Bearer s3cret"}
    assert source.interval_s == 2.0
    with pytest.raises(ConfigError, match="one --engines URL"):
        make_discovery("http")
    with pytest.raises(ConfigError, match="one --engines URL"):
        make_discovery("http", engines="http://a:1,http://b:2")
    with pytest.raises(ConfigError, match="--discovery http: 'fleet:8093'"):
        make_discovery("http", engines="fleet:8093")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="--discovery-token-file .* is empty"):
        make_discovery("http", engines="http://a:1", token_file=str(tmp_path / "empty"))
