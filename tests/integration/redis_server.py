"""A real ``redis-server`` for the router's tests: its own port (loopback) and unix socket,
no persistence, optionally a password; started and stopped by the test (SIGKILL, so a
test can also use ``stop_redis`` as an outage)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_all
from tests.integration.conftest import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def require_redis() -> None:
    """Skip (fail in CI) when ``scripts/setup-router-servers`` has not run."""
    if Path(REDIS_SERVER).exists():
        return
    message = "redis-server is missing: run scripts/setup-router-servers"
    if require_all():
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class RedisProcess:
    process: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    password: str
    log_path: Path
    tls_port: int = 0  # with ``tls=True``: a TLS port beside the plain one
    ca_path: Path | None = None  # the CA that signed its certificate

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def tls_url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"rediss://{auth}127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.ca_path}"

    @property
    def unix_url(self) -> str:
        query = f"?password={self.password}" if self.password else ""
        return f"unix://{self.socket_path}{query}"


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed (openssl)."""
    if shutil.which("openssl") is None:
        message = "the openssl command is missing: run scripts/setup-router-servers"
        if require_all():
            pytest.fail(message)
        pytest.skip(message)
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    cert, key, csr = directory / "server.crt", directory / "server.key", directory / "server.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=shoal-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", ext],
    ]  # fmt: skip
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def start_redis(
    tmp_path: Path, port: int | None = None, password: str = "", tls: bool = False
) -> RedisProcess:
    require_redis()
    port = port or free_port()
    socket_path = tmp_path / f"redis-{port}.sock"
    log_path = tmp_path / f"redis-{port}.log"
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
            "--dir", str(tmp_path), "--logfile", str(log_path)]  # fmt: skip
    if password:
        args += ["--requirepass", password]
    tls_port, ca = 0, None
    if tls:
        ca, cert, key = make_certificates(tmp_path / f"tls-{port}")
        tls_port = free_port()
        args += ["--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                 "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                 "--tls-auth-clients", "no"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            log = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise RuntimeError(f"redis-server did not start:\n{log}")
        time.sleep(0.02)
    return RedisProcess(process, port, socket_path, password, log_path, tls_port, ca)


def stop_redis(server: RedisProcess) -> None:
    if server.process.poll() is None:
        server.process.kill()
    server.process.wait(timeout=10)


@contextlib.contextmanager
def running_redis(
    tmp_path: Path, port: int | None = None, password: str = "", tls: bool = False
) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path, port, password, tls)
    try:
        yield server
    finally:
        stop_redis(server)
