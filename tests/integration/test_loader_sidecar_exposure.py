"""What a real ``shoal loader serve`` admits from the network (M5): an allow-list path scope
that percent-encoded dot segments cannot leave (a real nginx decodes them), and a TCP port
other hosts can reach that needs client certificates unless the operator says otherwise."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("safetensors.torch")

from loader.errors import AccessDenied
from loader.sidecar import SidecarClient
from tests.integration.conftest import ENV, free_port, stop_process, wait_ready
from tests.integration.servers import running_nginx
from tests.integration.test_loader_sidecar import (
    assert_same,
    self_signed,
    small_model,
    start_sidecar,
    write_checkpoint,
)


def test_encoded_dot_segments_cannot_leave_the_allowed_path(tmp_path: Path) -> None:
    with running_nginx(tmp_path / "web") as nginx:
        for folder, seed in (("public/model", 1), ("private/model", 2)):
            write_checkpoint(nginx.root / folder, small_model(seed=seed))
        public = f"http://127.0.0.1:{nginx.port}/public"
        sidecar = start_sidecar(tmp_path, allow=public)
        try:
            with sidecar.client() as client:
                with client.load(public + "/model/") as loaded:  # inside: staged
                    assert_same(loaded.tensors, nginx.root / "public" / "model")
                for escape in ("%2e%2e", "%2E%2E", ".%2e", "%252e%252e"):
                    with pytest.raises(AccessDenied, match="refused"):
                        client.prefetch(f"{public}/{escape}/private/model/")
                with pytest.raises(AccessDenied, match="refused"):
                    client.prefetch(f"{public}%2f..%2fprivate/model/")
                staged = [info.uri for info in client.list()]
            assert staged == [public + "/model/"], staged  # the private model never staged
        finally:
            assert sidecar.stop() == 0, sidecar.log()


def serve(tmp: Path, listen: str, *flags: str) -> tuple[subprocess.Popen[bytes], Path]:
    cert, key, _ = self_signed(tmp)
    log = tmp / "serve.log"
    args = [sys.executable, "-m", "shoal", "loader", "serve", "--name", f"x{uuid.uuid4().hex[:8]}",
            "--runtime-dir", str(tmp / "run"), "--listen", listen, "--tls-cert", str(cert),
            "--tls-key", str(key), "--log-format", "text", *flags]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=ENV, stdout=out, stderr=subprocess.STDOUT), log


def test_a_port_other_hosts_reach_is_refused_without_client_certificates(tmp_path: Path) -> None:
    # Refused before anything is bound, so 0.0.0.0 sends no traffic off this host.
    process, log = serve(tmp_path, f"tcp://0.0.0.0:{free_port()}")
    try:
        code = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        code = None  # it served: stop it, then fail
        stop_process(process)
    assert code == 2, log.read_text()
    message = log.read_text()
    assert "without client certificates" in message and "--insecure-clients" in message
    assert "loader sidecar ready" not in message


def test_insecure_clients_serves_off_loopback_with_a_warning(tmp_path: Path) -> None:
    # A host name counts as reachable from other hosts; this one resolves to loopback, so
    # the port it binds takes no traffic from elsewhere.
    name = socket.gethostname()
    if not all(
        str(address[4][0]).startswith("127.") for address in socket.getaddrinfo(name, None)
    ):  # fmt: skip
        pytest.skip(f"host name {name} does not resolve to loopback only")
    port = free_port()
    process, log = serve(tmp_path, f"tcp://{name}:{port}", "--insecure-clients")
    try:
        wait_ready(process, log, "sidecar", lambda: "loader sidecar ready" in log.read_text(), 30)
        text = log.read_text()
        assert "WARNING" in text and "without client certificates (--insecure-clients)" in text
        pem = (tmp_path / "cert.pem").read_bytes()
        with SidecarClient(f"localhost:{port}", tls_ca=pem) as anonymous:  # no certificate
            assert anonymous.health().serving
            with pytest.raises(AccessDenied, match="--allow"):  # still deny-by-default
                anonymous.prefetch(str(tmp_path))
    finally:
        assert stop_process(process) == 0, log.read_text()
