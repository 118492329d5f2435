"""Real object-storage and HTTP servers on loopback, for the loader's source tests.

- ``running_s3rver``: the npm package ``s3rver`` under Node, the real S3 REST API (SigV4
  requests, ranged GETs, list-objects-v2, ETags that are MD5s). It checks that an access key
  exists (``S3RVER`` / ``S3RVER`` is the only one) but does not verify SigV4 signatures.
- ``running_nginx``: Debian's ``nginx-light`` serving a directory with ranges, plus two
  locations that misbehave on purpose: ``/norange/`` ignores ``Range`` (``max_ranges 0``)
  and ``/unavailable/`` answers 503; two redirect: ``/moved/X`` to ``/X`` on the same host,
  ``/away/X`` to ``http://localhost:PORT/X`` (the same server under another host name).
- ``CuttingProxy``: a TCP proxy that breaks the first connections after a given number of
  response bytes, to make a server's body end early.

``scripts/setup-loader-servers`` installs both servers (CI runs it from ``scripts/test``).
Without them the tests skip and say so; once that script has run, a server that fails to
start is an error, not a skip.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REPO, free_port

NODE_DIR = REPO / ".cache" / "node"
S3RVER_JS = NODE_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
S3RVER_KEY = "S3RVER"  # s3rver's one account: access key id and secret
SETUP_HINT = "run scripts/setup-loader-servers"


def _installed_or_skip(what: str, *paths: Path | None) -> None:
    if all(path is not None and path.exists() for path in paths):
        return
    if (NODE_DIR / ".installed").exists() and shutil.which("nginx"):
        pytest.fail(f"{what} is missing although {SETUP_HINT} ran; run it again")
    pytest.skip(f"{what} is not installed here: {SETUP_HINT}")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 15.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    _stop(process)
    raise RuntimeError(f"{what} did not listen on port {port} within 15 s:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill the server and every process it started (nginx's workers outlive a killed
    master and keep serving); each server runs in its own session for this."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@dataclass
class S3rver:
    endpoint: str
    bucket: str
    process: subprocess.Popen[bytes]

    @staticmethod
    def session(key: str = S3RVER_KEY) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=key, aws_secret_access_key=S3RVER_KEY, region_name="us-east-1"
        )

    @functools.cached_property
    def client(self) -> Any:
        from botocore.config import Config

        # s3rver predates the aws-chunked checksum trailers boto3 sends by default.
        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return self.session().client("s3", endpoint_url=self.endpoint, config=config)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def stop(self) -> None:
        _stop(self.process)


@contextlib.contextmanager
def running_s3rver(folder: Path, bucket: str = "checkpoints") -> Iterator[S3rver]:
    """s3rver on a free loopback port, storing under ``folder``, with ``bucket`` created."""
    node = shutil.which("node")
    _installed_or_skip("s3rver (Node)", Path(node) if node else None, S3RVER_JS)
    assert node is not None
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / "s3rver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [node, str(S3RVER_JS), "--directory", str(folder / "data"), "--address",
             "127.0.0.1", "--port", str(port), "--silent", "--configure-bucket", bucket],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_port(port, process, log, "s3rver")
        yield S3rver(f"http://127.0.0.1:{port}", bucket, process)
    finally:
        _stop(process)


_NGINX_CONF = """\
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        {ssl}
        root {root};
        location /norange/ {{ alias {root}/; max_ranges 0; }}
        location /unavailable/ {{ return 503; }}
        location ~ ^/moved/(.*)$ {{ return 302 /$1; }}
        location ~ ^/away/(.*)$ {{ return 302 http://localhost:{plain_port}/$1; }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str  # ends in "/"; files under ``root`` are at ``url + relative path``
    root: Path
    port: int
    process: subprocess.Popen[bytes]

    def put(self, path: str, data: bytes) -> None:
        """Replace ``root/path`` atomically, as a deployment would, with a newer mtime.

        nginx's ETag is ``mtime-size`` in whole seconds, so the new file's mtime is set past
        the old one's: a replacement in the same second would otherwise look unchanged.
        """
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = target.stat().st_mtime if target.exists() else time.time()
        staging = target.with_name(f".{target.name}.tmp")
        staging.write_bytes(data)
        stamp = max(time.time(), previous + 2)
        os.utime(staging, (stamp, stamp))
        staging.replace(target)

    def stop(self) -> None:
        _stop(self.process)


@contextlib.contextmanager
def running_nginx(folder: Path, *, tls: tuple[Path, Path] | None = None) -> Iterator[Nginx]:
    """nginx serving ``folder/root`` on a free loopback port; ``tls`` = (cert, key) PEMs."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )
    _installed_or_skip("nginx", Path(nginx) if nginx else None)
    assert nginx is not None
    tmp = folder / "nginx"
    root = folder / "root"
    tmp.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        _NGINX_CONF.format(
            # As root, workers would run as nobody and could not read pytest's 0700 tmp dirs.
            user="user root;" if os.geteuid() == 0 else "",
            tmp=tmp,
            root=root,
            port=f"{port} ssl" if tls else port,
            plain_port=port,
            ssl=ssl,
        )
    )
    log = tmp / "error.log"
    log.touch()
    process = subprocess.Popen(
        [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(log), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, process, log, "nginx")
        scheme = "https" if tls else "http"
        yield Nginx(f"{scheme}://127.0.0.1:{port}/", root, port, process)
    finally:
        _stop(process)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the ``openssl`` command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class CuttingProxy:
    """Forwards loopback TCP to ``upstream_port``; the first ``num_cuts`` connections are
    closed after ``cut_after`` bytes of response, the rest pass untouched."""

    def __init__(self, upstream_port: int, *, cut_after: int, num_cuts: int) -> None:
        self._upstream_port = upstream_port
        self._cut_after = cut_after
        self._cuts_left = num_cuts
        self._num_connections = 0
        self._lock = threading.Lock()
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def num_cuts_left(self) -> int:
        with self._lock:
            return self._cuts_left

    @property
    def num_connections(self) -> int:
        with self._lock:
            return self._num_connections

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            with self._lock:
                cut = self._cuts_left > 0
                self._cuts_left -= cut
                self._num_connections += 1
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            limit = self._cut_after if cut else None
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while limit is None or sent < limit:
                chunk = source.recv(1 << 16 if limit is None else min(1 << 16, limit - sent))
                if not chunk:
                    break
                sink.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
