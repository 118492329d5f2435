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

Integrity (M5): the file table carries what the peer computed while staging: the SHA-256
of each file's header (the prefix it kept) and of each tensor's bytes. A read inside a
header is served from the whole header, fetched once and checked; every whole tensor the
streamer reads is checked against its digest (``published_digest``, which the streamer
consults), so bytes that changed between staging and serving, or a range served from the
wrong place, raise ``IntegrityError`` instead of loading. (The origin identity check of
``fallback`` stays.) A peer on another host is reached over TLS only, so the table and its
digests come from the peer the certificate names.

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
import hashlib
import threading
from collections.abc import Iterator, Sequence

from loader.errors import (
    IntegrityError,
    ObjectNotFound,
    SidecarUnavailable,
    SourceError,
    SourceUnavailable,
)
from loader.sidecar.client import PeerFiles, SidecarClient
from loader.sources._ranged import byte_view
from loader.sources.base import ObjectInfo, advance, check_relative_path

__all__ = ["PeerSource", "parse_peer_uri"]

SCHEMES = ("peer://", "peer+unix://")


def copy_into(views: Sequence[memoryview], data: memoryview) -> None:
    """Fill ``views`` in turn from ``data`` (exactly as many bytes as it has)."""
    for view in views:
        if not data:
            return
        take = min(len(view), len(data))
        view[:take] = data[:take]
        data = data[take:]


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
        self._prefixes: dict[str, bytes] = {}  # checked headers, by path

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

    def published_digest(self, path: str, offset: int, nbytes: int) -> str | None:
        """``sha256:<hex>`` of the tensor the peer staged at bytes ``[offset, offset +
        nbytes)`` of ``path``, or ``None`` if that range is no whole staged tensor."""
        found = self.files().tensors.get((path, offset, nbytes))
        return f"sha256:{found[1]}" if found else None

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        check_relative_path(path)
        token = self.files().token
        views = [byte_view(buffer) for buffer in buffers if len(buffer)]
        header = self.files().prefixes.get(path)
        if header is not None and offset < header[0] and views:
            prefix = self._checked_prefix(path, *header)
            taken = min(header[0] - offset, sum(len(v) for v in views))
            copy_into(views, memoryview(prefix)[offset : offset + taken])
            views, offset = advance(views, taken), offset + taken
        if not views:
            return
        with self._translated():
            self._client.read_into(self.checkpoint_uri, path, offset, views, token=token,
                                   timeout_s=self.timeout_s)  # fmt: skip

    def close(self) -> None:
        self._client.close()

    def _checked_prefix(self, path: str, nbytes: int, sha256: str) -> bytes:
        """The header bytes of ``path``, read whole once and checked against the digest."""
        with self._lock:
            held = self._prefixes.get(path)
        if held is not None:
            return held
        raw = bytearray(nbytes)
        with self._translated():
            self._client.read_into(self.checkpoint_uri, path, 0, memoryview(raw),
                                   token=self.files().token, timeout_s=self.timeout_s)  # fmt: skip
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise IntegrityError(
                f"{self.uri}: the header of {path} hashes to {actual}, the peer staged "
                f"{sha256}: refusing it"
            )
        with self._lock:
            self._prefixes[path] = bytes(raw)
        return bytes(raw)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """The peer being unreachable is this source being unavailable."""
        try:
            yield
        except SidecarUnavailable as exc:
            raise SourceUnavailable(f"peer {self.uri}: {exc}") from None
