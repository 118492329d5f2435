"""The checkpoint sources against real servers on loopback: ``S3Source`` against s3rver,
``HttpSource`` against nginx. ``SourceContract`` is what every source must do; each
source's class inherits it and adds what only that source has (credentials, listing,
a server that ignores ranges, TLS)."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loader.errors import (
    AccessDenied,
    ObjectNotFound,
    SourceError,
    SourceUnavailable,
)
from loader.sources._ranged import Backoff
from loader.sources.base import ObjectInfo, Source
from loader.sources.http import INDEX_FILE, HttpSource
from loader.sources.s3 import S3Source
from tests.integration.conftest import free_port
from tests.integration.servers import (
    CuttingProxy,
    Nginx,
    S3rver,
    running_nginx,
    running_s3rver,
    self_signed_certificate,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 3 * MiB + 12345  # odd on purpose: the last range is not a round number
FAST: dict[str, Any] = {"max_attempts": 2, "backoff": Backoff(base_s=0.01, cap_s=0.05)}


class Store:
    """One test's corner of a running server: objects go in with ``put`` and come out
    through ``source``."""

    def put(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def source(self, *, port: int | None = None, **options: Any) -> Source:
        """A source on this corner, through loopback ``port`` (a proxy) if given."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def stop_server(self) -> None:
        raise NotImplementedError


def put_random(store: Store, path: str, size: int = SIZE) -> bytes:
    data = os.urandom(size)
    store.put(path, data)
    return data


def read(source: Source, path: str, offset: int, length: int) -> bytes:
    buffer = bytearray(length)
    source.read_into(path, offset, memoryview(buffer))
    return bytes(buffer)


class SourceContract:
    """What every ``Source`` does; subclasses provide ``store`` and ``private_store`` (one
    whose server the test may stop)."""

    def test_stat_reports_size_and_an_identity(self, store: Store) -> None:
        put_random(store, "a.safetensors")
        info = store.source().stat("a.safetensors")
        assert info.path == "a.safetensors"
        assert info.size == SIZE
        assert info.identity

    def test_missing_object_is_object_not_found(self, store: Store) -> None:
        source = store.source()
        with pytest.raises(ObjectNotFound, match="missing.safetensors"):
            source.stat("missing.safetensors")
        with pytest.raises(ObjectNotFound, match="missing.safetensors"):
            read(source, "missing.safetensors", 0, 10)

    def test_ranged_reads_are_exact_at_odd_offsets_and_lengths(self, store: Store) -> None:
        data = put_random(store, "a.safetensors")
        source = store.source()
        ranges = [
            (0, 1),
            (0, 8),
            (1, 7),
            (12345, 54321),
            (MiB - 3, 7),  # across a MiB boundary
            (SIZE - 1, 1),  # the last byte
            (SIZE - 4099, 4099),  # the tail
            (0, SIZE),  # the whole object in one read
            (5, 0),  # nothing at all
        ]
        for offset, length in ranges:
            assert read(source, "a.safetensors", offset, length) == data[offset : offset + length]

    def test_reads_land_in_a_typed_view_of_the_caller_memory(self, store: Store) -> None:
        data = put_random(store, "a.safetensors", 4096)
        target = memoryview(bytearray(1024)).cast("I")  # what a tensor's buffer looks like
        store.source().read_into("a.safetensors", 1000, target)
        assert target.tobytes() == data[1000:2024]

    def test_a_read_past_the_end_is_a_source_error(self, store: Store) -> None:
        put_random(store, "a.safetensors", 1000)
        source = store.source()
        with pytest.raises(SourceError, match="a.safetensors"):
            read(source, "a.safetensors", 990, 20)
        with pytest.raises(SourceError, match="a.safetensors"):
            read(source, "a.safetensors", 1000, 1)

    def test_sixteen_concurrent_reads_fill_slices_of_one_buffer(self, store: Store) -> None:
        data = put_random(store, "a.safetensors")
        source = store.source(concurrency=16)
        buffer = bytearray(SIZE)
        view = memoryview(buffer)
        bounds = [SIZE * i // 16 + (i % 3) for i in range(16)] + [SIZE]
        bounds[0] = 0
        with ThreadPoolExecutor(16) as pool:
            for future in [
                pool.submit(source.read_into, "a.safetensors", lo, view[lo:hi])
                for lo, hi in itertools.pairwise(bounds)
            ]:
                future.result()
        assert buffer == data

    def test_list_names_the_checkpoint_sorted(self, store: Store) -> None:
        shards = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
        index = b'{"metadata": {}, "weight_map": {"a": "%s", "b": "%s", "c": "%s"}}' % (
            shards[0].encode(),
            shards[1].encode(),
            shards[0].encode(),
        )
        store.put(INDEX_FILE, index)
        for shard in shards:
            put_random(store, shard, 1000)
        source = store.source()
        listed = source.list()
        assert [info.path for info in listed] == sorted([INDEX_FILE, *shards])
        assert listed == [source.stat(info.path) for info in listed]

    def test_paths_outside_the_root_are_refused_before_any_request(self, store: Store) -> None:
        nobody_listens = free_port()
        source = store.source(port=nobody_listens, **FAST)
        for path in ["../secret", "a/../../b", "/etc/passwd", "a//b", "./a", "a\\b", ""]:
            with pytest.raises(AccessDenied, match="refusing"):
                source.stat(path)
            with pytest.raises(AccessDenied, match="refusing"):
                read(source, path, 0, 1)

    def test_identity_changes_when_the_object_is_replaced(self, store: Store) -> None:
        put_random(store, "a.safetensors", 4096)
        source = store.source()
        before = source.stat("a.safetensors")
        replacement = put_random(store, "a.safetensors", 4096)
        after = source.stat("a.safetensors")
        assert after.size == before.size
        assert after.identity != before.identity
        assert read(source, "a.safetensors", 0, 4096) == replacement

    def test_a_read_after_an_unseen_replacement_fails_instead_of_mixing(self, store: Store) -> None:
        put_random(store, "a.safetensors", 4096)
        source = store.source()
        source.stat("a.safetensors")
        unstated = store.source()
        read(unstated, "a.safetensors", 0, 10)  # the first read pins the version too
        put_random(store, "a.safetensors", 4096)
        with pytest.raises(SourceError, match="changed"):
            read(source, "a.safetensors", 0, 100)
        with pytest.raises(SourceError, match="changed"):
            read(unstated, "a.safetensors", 100, 100)

    def test_sequential_reads_reuse_one_pooled_connection(self, store: Store) -> None:
        data = put_random(store, "a.safetensors")
        source = store.source()
        source.stat("a.safetensors")
        with CuttingProxy(store.port, cut_after=0, num_cuts=0) as proxy:
            source = store.source(port=proxy.port)
            source.stat("a.safetensors")
            for offset in range(1, SIZE - 4096, SIZE // 20):
                assert read(source, "a.safetensors", offset, 4096) == data[offset : offset + 4096]
            assert proxy.num_connections == 1

    def test_a_body_cut_short_is_resumed_for_the_remainder(self, store: Store) -> None:
        data = put_random(store, "a.safetensors")
        with CuttingProxy(store.port, cut_after=200_000, num_cuts=2) as proxy:
            source = store.source(port=proxy.port, max_attempts=3, backoff=FAST["backoff"])
            assert read(source, "a.safetensors", 777, 2 * MiB) == data[777 : 777 + 2 * MiB]
            assert proxy.num_cuts_left == 0

    def test_a_scatter_read_fills_each_buffer_in_turn(self, store: Store) -> None:
        data = put_random(store, "a.safetensors")
        sizes = [1, 100_000, 0, 300_001, 5]
        buffers = [bytearray(n) for n in sizes]
        source = store.source()
        source.read_scatter("a.safetensors", 4097, [memoryview(b) for b in buffers])
        assert b"".join(buffers) == data[4097 : 4097 + sum(sizes)]

    def test_a_scatter_read_cut_short_resumes_inside_the_buffer_it_stopped_in(
        self, store: Store
    ) -> None:
        data = put_random(store, "a.safetensors")
        sizes = [150_000, 150_000, 1 * MiB, 3]  # 200,000 response bytes end in the second
        buffers = [bytearray(n) for n in sizes]
        with CuttingProxy(store.port, cut_after=200_000, num_cuts=2) as proxy:
            source = store.source(port=proxy.port, max_attempts=3, backoff=FAST["backoff"])
            source.read_scatter("a.safetensors", 11, [memoryview(b) for b in buffers])
            assert proxy.num_cuts_left == 0
        assert b"".join(buffers) == data[11 : 11 + sum(sizes)]

    def test_bodies_cut_short_past_the_attempts_are_unavailable(self, store: Store) -> None:
        put_random(store, "a.safetensors")
        with CuttingProxy(store.port, cut_after=200_000, num_cuts=100) as proxy:
            source = store.source(port=proxy.port, **FAST)
            with pytest.raises(SourceUnavailable, match="a.safetensors"):
                read(source, "a.safetensors", 0, 2 * MiB)

    def test_a_stopped_server_is_unavailable_within_a_bound(self, private_store: Store) -> None:
        put_random(private_store, "a.safetensors", 4096)
        source = private_store.source(connect_timeout_s=1.0, read_timeout_s=2.0, **FAST)
        assert read(source, "a.safetensors", 0, 10)  # a pooled connection exists now
        private_store.stop_server()
        started = time.monotonic()
        with pytest.raises(SourceUnavailable, match="a.safetensors"):
            read(source, "a.safetensors", 0, 10)
        with pytest.raises(SourceUnavailable, match="a.safetensors"):
            source.stat("a.safetensors")
        assert time.monotonic() - started < 8.0


# --- S3 through s3rver ------------------------------------------------------------------


@dataclass
class S3Store(Store):
    server: S3rver
    prefix: str

    def put(self, path: str, data: bytes) -> None:
        self.server.put(self.prefix + path, data)

    def source(self, *, port: int | None = None, **options: Any) -> S3Source:
        endpoint = f"http://127.0.0.1:{port}" if port else self.server.endpoint
        return S3Source(
            f"s3://{self.server.bucket}/{self.prefix}",
            endpoint_url=endpoint,
            session=self.server.session(),
            **options,
        )

    @property
    def port(self) -> int:
        return int(self.server.endpoint.rpartition(":")[2])

    def stop_server(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3rver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3rver]:
    with running_s3rver(tmp_path_factory.mktemp("s3rver")) as server:
        yield server


class TestS3Source(SourceContract):
    @pytest.fixture
    def store(self, s3rver: S3rver) -> S3Store:
        return S3Store(s3rver, f"{uuid.uuid4().hex}/model/")

    @pytest.fixture
    def private_store(self, tmp_path: Path) -> Iterator[S3Store]:
        with running_s3rver(tmp_path / "s3rver") as server:
            yield S3Store(server, "model/")

    def test_list_is_flat_sorted_and_stays_under_the_prefix(self, store: S3Store) -> None:
        for path in ["b.bin", "a.bin", "c.bin", "sub/d.bin"]:
            put_random(store, path, 10)
        store.server.put(store.prefix.rstrip("/") + "-sibling/e.bin", b"x")
        listed = store.source().list()
        assert [info.path for info in listed] == ["a.bin", "b.bin", "c.bin"]
        assert all(info.size == 10 and info.identity.startswith('"') for info in listed)

    def test_an_unknown_access_key_is_access_denied(self, store: S3Store) -> None:
        put_random(store, "a.bin", 10)
        source = S3Source(
            f"s3://{store.server.bucket}/{store.prefix}",
            endpoint_url=store.server.endpoint,
            session=store.server.session(key="NOT-A-KEY"),
            **FAST,
        )
        with pytest.raises(AccessDenied, match=r"s3://.*/a\.bin.*InvalidAccessKeyId|403"):
            source.stat("a.bin")
        with pytest.raises(AccessDenied, match="InvalidAccessKeyId"):
            read(source, "a.bin", 0, 5)

    def test_a_missing_bucket_is_object_not_found(self, s3rver: S3rver) -> None:
        source = S3Source(
            "s3://no-such-bucket/model", endpoint_url=s3rver.endpoint, session=s3rver.session()
        )
        with pytest.raises(ObjectNotFound, match="no-such-bucket"):
            read(source, "a.bin", 0, 5)
        with pytest.raises(ObjectNotFound, match="no-such-bucket"):
            source.list()

    def test_credentials_and_endpoint_come_from_the_default_chain(
        self, store: S3Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        data = put_random(store, "a.bin", 1000)
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "S3RVER")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S3RVER")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", store.server.endpoint)
        source = S3Source(f"s3://{store.server.bucket}/{store.prefix}", concurrency=7)
        assert read(source, "a.bin", 10, 20) == data[10:30]
        config = source._client.meta.config
        assert config.max_pool_connections == 7
        assert config.s3 == {"addressing_style": "path"}
        source.close()

    def test_a_uri_without_a_bucket_is_refused(self) -> None:
        with pytest.raises(SourceError, match="s3://bucket/prefix"):
            S3Source("s3:///model")
        with pytest.raises(SourceError, match="not an S3 URI"):
            S3Source("https://bucket/model")


# --- HTTP through nginx -----------------------------------------------------------------


@dataclass
class NginxStore(Store):
    server: Nginx
    prefix: str

    def put(self, path: str, data: bytes) -> None:
        self.server.put(self.prefix + path, data)

    def source(self, *, port: int | None = None, **options: Any) -> HttpSource:
        url = self.server.url if port is None else f"http://127.0.0.1:{port}/"
        return HttpSource(url + self.prefix, **options)

    @property
    def port(self) -> int:
        return self.server.port

    def stop_server(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


class TestHttpSource(SourceContract):
    @pytest.fixture
    def store(self, nginx: Nginx) -> NginxStore:
        return NginxStore(nginx, f"{uuid.uuid4().hex}/model/")

    @pytest.fixture
    def private_store(self, tmp_path: Path) -> Iterator[NginxStore]:
        with running_nginx(tmp_path) as server:
            yield NginxStore(server, "model/")

    def test_a_server_that_ignores_range_is_refused(self, store: NginxStore) -> None:
        data = put_random(store, "a.bin", 5000)
        source = HttpSource(f"{store.server.url}norange/{store.prefix}")
        with pytest.raises(SourceError, match="ignored the Range header"):
            read(source, "a.bin", 10, 100)
        with pytest.raises(SourceError, match="ignored the Range header"):
            read(source, "a.bin", 0, 100)
        assert read(source, "a.bin", 0, 5000) == data  # the whole body is the range asked

    def test_a_persistent_503_is_unavailable_after_the_retries(self, nginx: Nginx) -> None:
        source = HttpSource(f"{nginx.url}unavailable/", **FAST)
        with pytest.raises(SourceUnavailable, match="503"):
            source.stat("a.bin")
        with pytest.raises(SourceUnavailable, match="503"):
            read(source, "a.bin", 0, 10)

    def test_list_without_an_index_names_the_fix(self, store: NginxStore) -> None:
        put_random(store, "weights.safetensors", 10)
        with pytest.raises(SourceError, match="cannot list"):
            store.source().list()
        put_random(store, "model.safetensors", 10)
        assert store.source().list() == [store.source().stat("model.safetensors")]

    def test_tls_is_verified_and_a_ca_bundle_trusts_a_private_ca(self, tmp_path: Path) -> None:
        cert, key = self_signed_certificate(tmp_path)
        with running_nginx(tmp_path, tls=(cert, key)) as server:
            data = os.urandom(1000)
            server.put("a.bin", data)
            with pytest.raises(SourceError, match="ca_bundle"):
                HttpSource(server.url, **FAST).stat("a.bin")
            source = HttpSource(server.url, ca_bundle=str(cert))
            assert source.stat("a.bin").size == 1000
            assert read(source, "a.bin", 1, 998) == data[1:999]

    def test_a_redirect_to_the_same_host_is_followed_with_its_range(
        self, store: NginxStore
    ) -> None:
        data = put_random(store, "a.bin", 5000)
        source = HttpSource(f"{store.server.url}moved/{store.prefix}")
        assert source.stat("a.bin").size == 5000
        assert read(source, "a.bin", 17, 1000) == data[17:1017]

    def test_a_redirect_to_another_host_is_refused_unless_allowed(self, store: NginxStore) -> None:
        data = put_random(store, "a.bin", 5000)
        url = f"{store.server.url}away/{store.prefix}"  # 127.0.0.1 -> localhost
        with pytest.raises(AccessDenied, match="another host.*localhost"):
            HttpSource(url).stat("a.bin")
        with pytest.raises(AccessDenied, match="another host"):
            read(HttpSource(url), "a.bin", 0, 10)
        allowed = HttpSource(url, redirect_hosts=["localhost"])
        assert read(allowed, "a.bin", 3, 100) == data[3:103]

    def test_credentials_do_not_follow_a_redirect_to_another_host(self, store: NginxStore) -> None:
        source = HttpSource(f"{store.server.url}away/{store.prefix}", redirect_hosts=["*"],
                            headers={"Authorization": "Bearer secret"})  # fmt: skip
        put_random(store, "a.bin", 10)
        sent: list[dict[str, str]] = []
        request = source._pool.request

        def spy(method: str, url: str, **kwargs: Any) -> Any:
            sent.append({"url": url, **kwargs["headers"]})
            return request(method, url, **kwargs)

        source._pool.request = spy  # type: ignore[method-assign]
        source.stat("a.bin")
        assert sent[0]["Authorization"] == "Bearer secret" and "127.0.0.1" in sent[0]["url"]
        assert "localhost" in sent[1]["url"] and "Authorization" not in sent[1]

    def test_identity_is_the_etag(self, store: NginxStore) -> None:
        put_random(store, "a.bin", 10)
        info = store.source().stat("a.bin")
        assert info == ObjectInfo("a.bin", 10, info.identity)
        assert info.identity.startswith('"')
