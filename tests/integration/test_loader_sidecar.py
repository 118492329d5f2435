"""The loader sidecar as engines and operators use it: a real ``shoal loader serve`` process,
real gRPC clients in this process and in others, real segments in /dev/shm."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader.errors import (  # noqa: E402
    AccessDenied,
    CapacityExceeded,
    CheckpointError,
    IntegrityError,
    ObjectNotFound,
    SidecarUnavailable,
    SourceUnavailable,
    UnknownCheckpoint,
)
from loader.sidecar import SidecarClient  # noqa: E402
from loader.sidecar._proto import loader_pb2 as pb  # noqa: E402
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc  # noqa: E402
from loader.sidecar.config import LoaderConfig  # noqa: E402
from loader.sidecar.segment import StagingInfo  # noqa: E402
from tests.integration.conftest import (  # noqa: E402
    ENV,
    free_port,
    spawn_serve,
    stop_process,
    wait_ready,
    wait_until,
)

MiB = 1 << 20


@dataclass
class Sidecar:
    config: LoaderConfig
    process: subprocess.Popen[bytes]
    log_path: Path
    tls_ca: bytes | None = None

    def client(self, **kwargs: object) -> SidecarClient:
        return SidecarClient(self.config.target, tls_ca=self.tls_ca, **kwargs)  # type: ignore[arg-type]

    def segments(self) -> list[Path]:
        return sorted(Path(self.config.shm_dir).glob(f"{self.config.segment_prefix()}*"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        flags = ["--name", self.config.name, "--runtime-dir", self.config.runtime_dir]
        if self.config.listen:
            flags += ["--listen", self.config.listen]
        return subprocess.run(
            [sys.executable, "-m", "shoal", "loader", *args, *flags],
            env=ENV, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def stop(self) -> int:
        return stop_process(self.process)


def start_sidecar(tmp: Path, tls_ca: bytes | None = None, **settings: object) -> Sidecar:
    name = f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, object] = {
        "name": name,
        "runtime_dir": str(tmp / "run"),
        "capacity_bytes": "256MiB",
        "chunk_bytes": "1MiB",
        "progress_interval_s": 0.05,
        "log_format": "text",
        **settings,
    }
    log_path = tmp / f"sidecar-{name}.log"
    process = spawn_serve("loader", values, log_path)
    config = LoaderConfig(
        name=name, runtime_dir=str(tmp / "run"), listen=str(values.get("listen", "")),
        tls_cert=str(values.get("tls_cert", "")), tls_key=str(values.get("tls_key", "")),
    )  # fmt: skip
    sidecar = Sidecar(config, process, log_path, tls_ca)
    wait_ready(process, log_path, "sidecar", lambda: "loader sidecar ready" in sidecar.log(), 30)
    return sidecar


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    return folder


def small_model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16()}
    for i in range(3):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(32, 32, generator=g)
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(32, 48, generator=g).half()
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(32)
    tensors["model.mask"] = torch.tensor([True, False, True])
    tensors["model.empty"] = torch.empty(0, 4)
    return tensors


def big_model(nbytes: int) -> dict[str, torch.Tensor]:
    per = 4 * MiB
    return {f"model.layers.{i}.mlp.up_proj.weight": torch.full((per // 4,), float(i))
            for i in range(nbytes // per)}  # fmt: skip


def assert_same(loaded: dict[str, torch.Tensor], path: Path) -> None:
    expected = safetensors_torch.load_file(str(path / "model.safetensors"))
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sidecar")


@pytest.fixture(scope="module")
def sidecar(base: Path) -> Iterator[Sidecar]:
    handle = start_sidecar(base, allow=f"{base / 'models'},http://127.0.0.1:*")
    yield handle
    assert handle.stop() == 0, handle.log()
    assert handle.segments() == [], "a clean exit unlinks every segment"
    assert handle.config.socket_path is not None and not handle.config.socket_path.exists()


# -- staging and mapping -------------------------------------------------------------------


def test_load_maps_the_staged_bytes_zero_copy(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "zero-copy", small_model())
    with sidecar.client() as client:
        seen: list[int] = []
        staged = client.prefetch(str(model), on_progress=lambda p: seen.append(p.bytes_done))
        assert staged.origin == "staged"
        assert seen and seen[-1] == sum(t.nbytes for t in staged.table.tensors)
        segment = Path(staged.table.segment_path)
        assert segment in sidecar.segments()
        assert segment.stat().st_mode & 0o777 == 0o600
        assert all(t.offset % 4096 == 0 for t in staged.table.tensors)

        with client.load(str(model)) as loaded:
            assert loaded.origin == "cached"
            assert loaded.checkpoint_id == staged.table.checkpoint_id
            assert_same(loaded.tensors, model)
            start, end = loaded.address_range
            for name, tensor in loaded.tensors.items():
                if tensor.numel():
                    assert start <= tensor.data_ptr() < end, f"{name} was copied"
            # A writer gets private pages: the sidecar's copy, and other engines', stay intact.
            loaded.tensors["model.layers.0.input_layernorm.weight"].fill_(7.0)
        with client.load(str(model)) as again:
            assert_same(again.tensors, model)
        info = {i.checkpoint_id: i for i in client.list()}[staged.table.checkpoint_id]
        assert (info.state, info.num_loads, info.bytes) == ("ready", 2, staged.table.segment_bytes)


def test_a_client_in_another_process_loads_the_same_segment(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "other-process", small_model(seed=3))
    code = (
        "import sys, json\n"
        "from loader.sidecar import SidecarClient\n"
        "from safetensors.torch import load_file\n"
        "import torch\n"
        "with SidecarClient(sys.argv[1]) as c, c.load(sys.argv[2]) as loaded:\n"
        "    expected = load_file(sys.argv[2] + '/model.safetensors')\n"
        "    same = all(torch.equal(loaded.tensors[n], t) for n, t in expected.items())\n"
        "    print(json.dumps({'same': same, 'origin': loaded.origin,\n"
        "                      'segment': loaded.table.segment_path}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, sidecar.config.target, str(model)],
                          env=ENV, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["same"] and report["origin"] == "staged"
    with sidecar.client() as client, client.load(str(model)) as loaded:
        assert loaded.origin == "cached" and loaded.table.segment_path == report["segment"]


def test_tp_ranks_stage_their_own_slices(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "tp", small_model(seed=5))
    expected = safetensors_torch.load_file(str(model / "model.safetensors"))
    with sidecar.client() as client:
        ranks = [client.load(str(model), tp_rank=r, tp_size=2, order="layers") for r in (0, 1)]
        assert ranks[0].checkpoint_id != ranks[1].checkpoint_id
        q = "model.layers.1.self_attn.q_proj.weight"
        down = "model.layers.2.mlp.down_proj.weight"
        assert torch.equal(torch.cat([r.tensors[q] for r in ranks], 0), expected[q])
        assert torch.equal(torch.cat([r.tensors[down] for r in ranks], 1), expected[down])
        for loaded in ranks:
            loaded.close()


def test_evict_unlinks_but_mappings_already_held_stay_valid(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "evict", small_model(seed=7))
    with sidecar.client() as client:
        loaded = client.load(str(model))
        before = client.health()
        freed = client.evict(loaded.checkpoint_id)
        assert freed == loaded.table.segment_bytes
        assert not Path(loaded.table.segment_path).exists()
        after = client.health()
        assert after.staged_bytes == before.staged_bytes - freed
        assert loaded.checkpoint_id not in {i.checkpoint_id for i in client.list()}
        assert_same(loaded.tensors, model)  # still mapped: the pages live until unmapped
        loaded.close()
        with pytest.raises(UnknownCheckpoint):
            client.evict(loaded.checkpoint_id)
        assert client.load(str(model)).origin == "staged"  # staged afresh


def test_concurrent_prefetches_of_one_checkpoint_are_coalesced(
    sidecar: Sidecar, base: Path
) -> None:
    model = write_checkpoint(base / "models" / "coalesce", big_model(24 * MiB))
    results: list[str] = []
    with sidecar.client() as client:
        stagings = client.health().num_stagings
        first = threading.Thread(
            target=lambda: results.append(
                client.prefetch(str(model), rate_bytes_per_s=8 * MiB).origin
            )
        )
        first.start()
        assert wait_until(lambda: any(i.state == "staging" for i in client.list()), 10)
        second = sidecar.cli("prefetch", str(model), "--order", "layers", "--json")
        first.join(30)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout)["origin"] == "joined"
        assert results == ["staged"]
        assert client.health().num_stagings == stagings + 1


def test_a_killed_client_leaks_no_staging_memory(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "killed", big_model(48 * MiB))
    with sidecar.client() as client:
        before = client.health()
        segments = set(sidecar.segments())
        victim = subprocess.Popen(
            [sys.executable, "-m", "shoal", "loader", "prefetch", str(model), "--rate", "8MiB",
             "--name", sidecar.config.name, "--runtime-dir", sidecar.config.runtime_dir],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:

            def staging() -> bool:
                return any(i.state == "staging" and i.bytes_done > 0 for i in client.list())

            assert wait_until(staging, 20), sidecar.log()
            assert client.health().staging_bytes > 48 * MiB
            assert set(sidecar.segments()) - segments, "the partial segment is in /dev/shm"
        finally:
            victim.kill()
            victim.wait()

        def released() -> bool:
            health = client.health()
            return health.staging_bytes == 0 and health.num_checkpoints == before.num_checkpoints

        assert wait_until(released, 10), sidecar.log()
        assert set(sidecar.segments()) == segments
        assert client.health().staged_bytes == before.staged_bytes
        assert "cancelling" in sidecar.log()


# -- errors ------------------------------------------------------------------------------


def raw_status(sidecar: Sidecar, request: pb.StageRequest) -> tuple[object, str, str | None]:
    """Status code, message and shoal-error name a plain gRPC client sees."""
    with grpc.insecure_channel(sidecar.config.target) as channel:
        stub = pb_grpc.LoaderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Prefetch(request, timeout=30))
    error = caught.value
    names = [v for k, v in error.trailing_metadata() or () if k == "shoal-error"]
    return error.code(), error.details(), names[0] if names else None


def test_errors_map_to_status_codes_and_back(sidecar: Sidecar, base: Path) -> None:
    models = base / "models"
    good = write_checkpoint(models / "digests", small_model(seed=9))
    (models / "bad").mkdir()
    (models / "bad" / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not json")
    outside = write_checkpoint(base / "outside", small_model())
    digests = {"model.mask": "sha256:" + "0" * 64}
    codes = grpc.StatusCode
    cases = [
        (pb.StageRequest(uri=str(models / "missing.safetensors")), codes.NOT_FOUND,
         ObjectNotFound, "missing.safetensors"),
        (pb.StageRequest(uri=str(models / "bad")), codes.INVALID_ARGUMENT, CheckpointError,
         "model.safetensors"),
        (pb.StageRequest(uri=str(outside)), codes.PERMISSION_DENIED, AccessDenied, "outside"),
        (pb.StageRequest(uri=str(models / ".." / "outside")), codes.PERMISSION_DENIED,
         AccessDenied, "allowed roots"),
        (pb.StageRequest(uri=str(good), digests=digests), codes.DATA_LOSS, IntegrityError,
         "model.mask"),
    ]  # fmt: skip
    with sidecar.client() as client:
        for request, code, error, words in cases:
            status, message, name = raw_status(sidecar, request)
            assert (status, name) == (code, error.__name__), request
            assert words in message
            with pytest.raises(error, match=words.replace(".", r"\.")):
                client.prefetch(request.uri, digests=dict(request.digests))
        status, message, _ = raw_status(sidecar, pb.StageRequest(uri=str(good), tp_rank=3,
                                                                  tp_size=2))  # fmt: skip
        assert status == codes.INVALID_ARGUMENT and "tp rank 3" in message
        with pytest.raises(UnknownCheckpoint, match="no staged checkpoint"):
            client.evict("0123456789abcdef")
        assert client.health().staging_bytes == 0
    # Failed stagings left nothing half-written behind: every segment is a ready checkpoint.
    with sidecar.client() as client:
        ready = {i.checkpoint_id for i in client.list() if i.state == "ready"}
    assert {p.name.rsplit("-", 1)[1] for p in sidecar.segments()} == ready


def test_an_unreachable_source_is_unavailable(sidecar: Sidecar) -> None:
    pytest.importorskip("loader.sources.http")
    uri = f"http://127.0.0.1:{free_port()}/model.safetensors"
    status, message, name = raw_status(sidecar, pb.StageRequest(uri=uri))
    assert (status, name) == (grpc.StatusCode.UNAVAILABLE, "SourceUnavailable"), message
    with sidecar.client() as client, pytest.raises(SourceUnavailable):
        client.prefetch(uri)


def test_cli_verbs_and_exit_codes(sidecar: Sidecar, base: Path, tmp_path: Path) -> None:
    model = write_checkpoint(base / "models" / "cli", small_model(seed=11))
    staged = sidecar.cli("prefetch", str(model), "--json")
    assert staged.returncode == 0, staged.stderr
    checkpoint_id = json.loads(staged.stdout)["checkpoint_id"]
    listed = sidecar.cli("list", "--json")
    assert listed.returncode == 0 and checkpoint_id in {r["checkpoint_id"] for r in
                                                        json.loads(listed.stdout)}  # fmt: skip
    assert checkpoint_id in sidecar.cli("list").stdout
    health = sidecar.cli("health", "--json")
    assert health.returncode == 0 and json.loads(health.stdout)["serving"] is True
    evicted = sidecar.cli("evict", checkpoint_id, "--json")
    assert evicted.returncode == 0 and json.loads(evicted.stdout)["bytes_freed"] > 0
    refused = sidecar.cli("evict", checkpoint_id)
    assert refused.returncode == 1 and "no staged checkpoint" in refused.stderr
    missing = sidecar.cli("prefetch", str(base / "models" / "nope"))
    assert missing.returncode == 1 and "refused" in missing.stderr
    assert sidecar.cli("prefetch", str(model), "--tp-rank", "2", "--tp-size", "2").returncode == 2
    nobody = subprocess.run(
        [sys.executable, "-m", "shoal", "loader", "health", "--name", "nobody",
         "--runtime-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert nobody.returncode == 3 and "shoal loader serve" in nobody.stderr


def test_a_sidecar_that_is_not_running_is_unavailable(tmp_path: Path) -> None:
    with SidecarClient(f"unix:{tmp_path / 'none.sock'}") as client:
        with pytest.raises(SidecarUnavailable):
            client.health()
        with pytest.raises(SidecarUnavailable):
            client.prefetch(str(tmp_path))


def test_a_second_sidecar_of_the_same_name_is_refused(sidecar: Sidecar) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "loader", "serve", "--name", sidecar.config.name,
         "--runtime-dir", sidecar.config.runtime_dir],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1 and "another loader sidecar" in done.stderr


# -- TCP with TLS, and a capacity bound ------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "cert.pem").write_bytes(pem)
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp / "cert.pem", tmp / "key.pem", pem


def test_tls_over_tcp_and_the_capacity_bound(tmp_path: Path) -> None:
    cert, key, pem = self_signed(tmp_path)
    port = free_port()
    sidecar = start_sidecar(
        tmp_path, tls_ca=pem, listen=f"tcp://localhost:{port}", tls_cert=cert, tls_key=key,
        capacity_bytes="4MiB",
    )  # fmt: skip
    try:
        model = write_checkpoint(tmp_path / "small", small_model(seed=13))
        with sidecar.client() as client, client.load(str(model)) as loaded:
            assert_same(loaded.tensors, model)
        too_big = write_checkpoint(tmp_path / "big", big_model(8 * MiB))
        with sidecar.client() as client:
            with pytest.raises(CapacityExceeded, match=r"needs 8\.0 MiB .* of its 4\.0 MiB"):
                client.prefetch(str(too_big))
            health = client.health()
            assert health.capacity_bytes == 4 * MiB and health.staging_bytes == 0
        assert not any("big" in p.name for p in sidecar.segments())
        # Without the CA the client cannot verify the sidecar: TLS fails, nothing is sent.
        with SidecarClient(sidecar.config.target) as plain, pytest.raises(SidecarUnavailable):
            plain.health()
        listed = sidecar.cli("list", "--json", "--tls-ca", str(cert))
        assert listed.returncode == 0 and len(json.loads(listed.stdout)) == 1
    finally:
        assert sidecar.stop() == 0, sidecar.log()
    assert sidecar.segments() == []


def wait_for_state(client: SidecarClient, checkpoint_id: str, state: str) -> StagingInfo:
    deadline = time.monotonic() + 20
    while True:
        found = [i for i in client.list() if i.checkpoint_id == checkpoint_id]
        if found and found[0].state == state:
            return found[0]
        assert time.monotonic() < deadline, f"{checkpoint_id} never became {state}: {found}"
        time.sleep(0.02)


def mine(client: SidecarClient, checkpoint_id: str) -> list[StagingInfo]:
    return [i for i in client.list() if i.checkpoint_id == checkpoint_id]


def test_a_detached_prefetch_stages_on_with_nobody_waiting(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "detached", big_model(8 * MiB))
    with sidecar.client() as client:
        checkpoint_id = client.prefetch_detached(str(model), rate_bytes_per_s=2 * MiB)
        assert wait_for_state(client, checkpoint_id, "staging").bytes_done < 8 * MiB
    with sidecar.client() as client:  # the caller is gone: it goes on all the same
        wait_for_state(client, checkpoint_id, "ready")
        with client.load(str(model)) as loaded:
            assert loaded.origin == "cached"
            assert_same(loaded.tensors, model)
        assert client.evict(checkpoint_id) > 0


def test_a_failed_detached_prefetch_keeps_its_error_until_evicted(
    sidecar: Sidecar, base: Path
) -> None:
    model = write_checkpoint(base / "models" / "detached-bad", small_model(seed=31))
    name = next(iter(safetensors_torch.load_file(str(model / "model.safetensors"))))
    wrong = {name: "sha256:" + "0" * 64}  # fails after every byte landed in its segment
    with sidecar.client() as client:
        checkpoint_id = client.prefetch_detached(str(model), digests=wrong)
        failed = wait_for_state(client, checkpoint_id, "failed")
        assert failed.error.startswith("IntegrityError") and name in failed.error
        assert failed.bytes == 0 and client.health().staging_bytes == 0  # reservation back
        listed = json.loads(sidecar.cli("list", "--json").stdout)
        assert [r["error"] for r in listed if r["checkpoint_id"] == checkpoint_id] == [failed.error]
        assert client.evict(checkpoint_id) == 0
        assert mine(client, checkpoint_id) == []
    assert not any(checkpoint_id in p.name for p in sidecar.segments())  # unlinked at failure


def test_evicting_a_detached_staging_cancels_it(sidecar: Sidecar, base: Path) -> None:
    model = write_checkpoint(base / "models" / "detached-slow", big_model(16 * MiB))
    started = sidecar.cli("prefetch", str(model), "--detach", "--rate", "2MiB", "--json")
    assert started.returncode == 0, started.stderr
    checkpoint_id = json.loads(started.stdout)["checkpoint_id"]
    with sidecar.client() as client:
        wait_for_state(client, checkpoint_id, "staging")
        assert client.evict(checkpoint_id) == 0
        deadline = time.monotonic() + 10
        while mine(client, checkpoint_id) or any(
            checkpoint_id in p.name for p in sidecar.segments()
        ):
            assert time.monotonic() < deadline, (client.list(), sidecar.segments())
            time.sleep(0.02)


def test_mutual_tls_admits_only_clients_with_a_certificate_its_ca_signed(
    tmp_path: Path,
) -> None:
    cert, key, pem = self_signed(tmp_path)
    (tmp_path / "client").mkdir()
    (tmp_path / "stranger").mkdir()
    client_cert, client_key, _ = self_signed(tmp_path / "client")
    stranger_cert, stranger_key, _ = self_signed(tmp_path / "stranger")
    sidecar = start_sidecar(
        tmp_path, tls_ca=pem, listen=f"tcp://localhost:{free_port()}", tls_cert=cert,
        tls_key=key, tls_client_ca=client_cert,
    )  # fmt: skip
    try:
        with sidecar.client() as anonymous, pytest.raises(SidecarUnavailable):
            anonymous.health()  # the handshake fails: no request reaches the service
        stranger = sidecar.client(tls_cert=stranger_cert, tls_key=stranger_key)
        with stranger, pytest.raises(SidecarUnavailable):
            stranger.health()
        with sidecar.client(tls_cert=client_cert, tls_key=client_key) as member:
            assert member.health().capacity_bytes > 0
        tls = ["--tls-ca", str(cert), "--tls-client-cert", str(client_cert)]
        listed = sidecar.cli("list", "--json", *tls, "--tls-client-key", str(client_key))
        assert listed.returncode == 0, listed.stderr
        refused = sidecar.cli("list", "--json", "--tls-ca", str(cert))
        assert refused.returncode == 3, refused.stderr
    finally:
        assert sidecar.stop() == 0, sidecar.log()


def test_tcp_without_tls_is_refused_off_loopback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "loader", "serve", "--listen", "tcp://0.0.0.0:7000",
         "--runtime-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "--tls-cert" in done.stderr


def test_segments_of_a_killed_sidecar_are_removed_by_the_next(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "m", small_model())
    first = start_sidecar(tmp_path)
    with first.client() as client:
        client.prefetch(str(model))
    left = first.segments()
    first.process.kill()
    first.process.wait()
    assert left and all(p.exists() for p in left)
    second = start_sidecar(tmp_path, name=first.config.name)
    try:
        assert not any(p.exists() for p in left)
        assert "removed segments a dead sidecar left" in second.log()
    finally:
        assert second.stop() == 0
