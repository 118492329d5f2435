"""A peer Shoal sidecar that already holds a checkpoint, as a checkpoint source: in the 1→N
case of a scale-out the N new replicas read from one that staged the checkpoint instead of
all hitting object storage (issue 5).

URI forms (the checkpoint URI is exactly the one the peer staged, ``shoal loader prefetch``)::

    peer://HOST:PORT/<checkpoint uri>                   TCP; TLS with tls_ca (the PEM bundle
                                                        verifying the peer's certificate),
                                                        required unless HOST is loopback
    peer+unix:///PATH/NAME.sock/<checkpoint uri>        the peer's Unix socket: the path up
                                                        to the first segment ending in .sock

    peer://10.0.0.5:7070/s3://bucket/llama-1b/
    peer+unix:///run/user/1000/shoal-1000/shoal-loader-default.sock/s3://bucket/llama-1b/
    peer://localhost:7070/models/llama-1b               a folder on the *peer's* host

The peer presents the checkpoint's files as they were at the origin (index, shards: their
sizes and origin identities, header bytes and tensor bytes; ``loader.sidecar.files``), so
``open_checkpoint``, ``Streamer``, ``shoal load`` and the vLLM loader read it like any other
source. Each ``read_into`` is one ``Read`` call whose chunks land straight in the caller's
buffer (one copy, out of protobuf's message), with a deadline (``timeout_s``); the streamer's
threads give the concurrency (a gRPC channel is thread-safe and multiplexes them).

The first call asks the peer for the file table once (``Files``) and keeps its staging
token: a read after the peer evicted and staged the checkpoint again fails instead of mixing
two stagings. Errors: a peer that does not hold the checkpoint raises ``UnknownCheckpoint``;
one still staging it, or that cannot be reached or dies mid-load, ``SourceUnavailable``
(no retries: a peer is a shortcut, and ``open_source`` falls back to the origin, at the
start of a load or in its middle through ``fallback.PeerWithFallback``); one that holds it
only sliced for tensor parallelism, ``StagingConflict``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from loader.errors import ObjectNotFound, SidecarUnavailable, SourceError, SourceUnavailable
from loader.sidecar.client import PeerFiles, SidecarClient
from loader.sources._ranged import byte_view
from loader.sources.base import ObjectInfo, check_relative_path

__all__ = ["PeerSource", "parse_peer_uri"]

SCHEMES = ("peer://", "peer+unix://")


def parse_peer_uri(uri: str) -> tuple[str, str]:
    """(gRPC target, checkpoint URI) of a ``peer://`` or ``peer+unix://`` URI, or
    ``SourceError`` naming the form expected."""
    if uri.startswith("peer+unix://"):
        rest = uri.removeprefix("peer+unix://")
        cut = rest.find(".sock/")
        if not rest.startswith("/") or cut < 0:
            raise SourceError(
                f"{uri!r}: write peer+unix:///path/to/NAME.sock/<checkpoint uri> (an "
                "absolute socket path whose file name ends in .sock)"
            )
        target, inner = f"unix:{rest[: cut + 5]}", rest[cut + 6 :]
    elif uri.startswith("peer://"):
        rest = uri.removeprefix("peer://")
        address, _, inner = rest.partition("/")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SourceError(f"{uri!r}: write peer://host:port/<checkpoint uri>")
        target = address
    else:
        raise SourceError(f"{uri!r} is not a peer URI ({' or '.join(SCHEMES)})")
    if not inner.strip("/"):
        raise SourceError(f"{uri!r} names no checkpoint after the peer's address")
    if "://" not in inner:
        inner = "/" + inner.lstrip("/")  # a path on the peer's host, absolute as staged
    return target, inner


class PeerSource:
    """The files of one checkpoint a peer sidecar staged whole."""

    preferred_chunk_bytes = 16 << 20  # a Read streams 2 MiB messages over one channel
    reads_holes = False  # the peer holds tensor bytes only: never join over a gap

    def __init__(
        self,
        uri: str,
        *,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """``timeout_s`` bounds each call: the file table, and each ranged read."""
        self.uri = uri
        self.target, self.checkpoint_uri = parse_peer_uri(uri)
        self.timeout_s = timeout_s
        if not tls_ca and not self.target.startswith("unix:"):
            from loader.sidecar.config import is_loopback

            if not is_loopback(self.target.rpartition(":")[0]):
                raise SourceError(
                    f"{uri}: a peer on another host is read over TLS only (without it, any "
                    "machine on the path could hand this engine its own weights); give "
                    "tls_ca (shoal load --tls-ca, the vLLM extra config's tls_ca), or read "
                    "the checkpoint from its origin"
                )
        self._client = SidecarClient(
            self.target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, timeout_s=timeout_s
        )
        self._lock = threading.Lock()
        self._held: PeerFiles | None = None

    def files(self) -> PeerFiles:
        """The peer's file table for the checkpoint (asked once, then kept)."""
        with self._lock:
            if self._held is None:
                with self._translated():
                    self._held = self._client.files(self.checkpoint_uri)
            return self._held

    def stat(self, path: str) -> ObjectInfo:
        check_relative_path(path)
        for info in self.files().files:
            if info.path == path:
                return info
        raise ObjectNotFound(f"{self.uri}: the peer's staging has no file {path!r}")

    def list(self) -> list[ObjectInfo]:
        return sorted(self.files().files, key=lambda info: info.path)

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        check_relative_path(path)
        token = self.files().token
        if not len(buffer):
            return
        with self._translated():
            self._client.read_into(self.checkpoint_uri, path, offset, byte_view(buffer),
                                   token=token, timeout_s=self.timeout_s)  # fmt: skip

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        check_relative_path(path)
        token = self.files().token
        views = [byte_view(buffer) for buffer in buffers if len(buffer)]
        if not views:
            return
        with self._translated():
            self._client.read_into(self.checkpoint_uri, path, offset, views, token=token,
                                   timeout_s=self.timeout_s)  # fmt: skip

    def close(self) -> None:
        self._client.close()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The peer being unreachable is this source being unavailable."""
        try:
            yield
        except SidecarUnavailable as exc:
            raise SourceUnavailable(f"peer {self.uri}: {exc}") from None
