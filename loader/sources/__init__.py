"""Checkpoint sources: ``base`` (the boundary), ``local``, ``s3``, ``http``, ``peer``
(``fallback``: a peer backed by its origin), ``cache`` (a disk cache in front of another).

``open_source(uri)`` picks one by scheme and returns it with the file the URI names, if it
names one (a URI ending in ``.safetensors`` or ``.json``)::

    /path/dir, file:///path/dir        LocalSource
    s3://bucket/prefix                 S3Source      (boto3; endpoint via AWS_ENDPOINT_URL)
    http://host/prefix, https://...    HttpSource
    peer://host:port/<uri>,            PeerSource    (a sidecar holding <uri> staged whole;
    peer+unix:///x.sock/<uri>                         the URI names the checkpoint as staged)
    (cache_dir=...)                    CachedSource in front of a remote one

The peer fallback: when the peer cannot serve the checkpoint (it does not hold it, is still
staging it, holds it only sliced, or cannot be reached) and ``<uri>`` has a scheme
(``s3://``, ``http(s)://``, ``file://``), ``open_source`` asks the peer for its file table
up front and, failing that, opens ``<uri>`` itself: the origin serves this load, and the log
says which one did. A peer that fails in the middle of the load hands the rest of it to the
origin too (``PeerWithFallback``: each file is checked to be the one the peer staged). A
bare path after the peer's address names a folder on the *peer's* host, so it has no
fallback. ``fallback=False`` raises the peer's error instead.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from loader.errors import SourceUnavailable, StagingConflict, UnknownCheckpoint
from loader.sources.base import ObjectInfo, Source, check_relative_path

if TYPE_CHECKING:
    from loader.sources.peer import PeerSource

__all__ = ["ObjectInfo", "Source", "check_relative_path", "open_source"]

log = logging.getLogger("shoal." + __name__)


def open_source(
    uri: str,
    *,
    cache_dir: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    fallback: bool = True,
    **options: Any,
) -> tuple[Source, str | None]:
    """The source rooted at ``uri`` (its folder, if ``uri`` names a file) and that file.

    ``cache_dir`` puts a write-through disk cache (``CachedSource``) in front of a remote
    source; local files are read in place. ``tls_ca`` verifies a ``peer://`` sidecar's
    certificate, and ``tls_cert`` + ``tls_key`` are this client's for one that requires
    mutual TLS; ``fallback`` is the peer fallback above (``options`` go to the origin)."""
    if uri.startswith(("peer://", "peer+unix://")):
        from loader.sources.peer import PeerSource

        peer = PeerSource(uri, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)
        return _open_peer(peer, cache_dir, fallback, options)
    root, file = uri, None
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith((".safetensors", ".json")):
        root, file = uri.rstrip("/")[: -len(last)] or ".", last
    remote: Source | None = None
    if root.startswith("s3://"):
        from loader.sources.s3 import S3Source

        remote = S3Source(root, **options)
    elif root.startswith(("http://", "https://")):
        from loader.sources.http import HttpSource

        remote = HttpSource(root, **options)
    if remote is not None:
        if cache_dir:
            from loader.sources.cache import CachedSource

            return CachedSource(remote, cache_dir), file
        return remote, file
    from loader.sources.local import LocalSource

    path = root.removeprefix("file://")
    return LocalSource(path or os.curdir, **options), file


def _open_peer(
    peer: PeerSource, cache_dir: str | None, fallback: bool, options: dict[str, Any]
) -> tuple[Source, str | None]:
    origin = peer.checkpoint_uri
    if not fallback or "://" not in origin:
        return _cached(peer, cache_dir), None
    try:
        files = peer.files()
    except (UnknownCheckpoint, StagingConflict, SourceUnavailable) as exc:
        peer.close()
        log.warning("the peer cannot serve %s (%s); reading it from its origin", peer.uri, exc)
        return open_source(origin, cache_dir=cache_dir, **options)
    except BaseException:
        peer.close()
        raise
    log.info("peer %s serves %s (%d files)", peer.target, origin, len(files.files))
    from loader.sources.fallback import PeerWithFallback

    def open_origin() -> Source:
        return open_source(origin, **options)[0]

    return _cached(PeerWithFallback(peer, open_origin), cache_dir), None


def _cached(source: Source, cache_dir: str | None) -> Source:
    if not cache_dir:
        return source
    from loader.sources.cache import CachedSource

    return CachedSource(source, cache_dir)
