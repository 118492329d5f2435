"""Checkpoint sources: ``base`` (the boundary), ``local``, ``s3``, ``http``.

``open_source(uri)`` picks one by scheme and returns it with the file the URI names, if it
names one (a URI ending in ``.safetensors`` or ``.json``)::

    /path/dir, file:///path/dir        LocalSource
    s3://bucket/prefix                 S3Source      (boto3; endpoint via AWS_ENDPOINT_URL)
    http://host/prefix, https://...    HttpSource
    (cache_dir=...)                    CachedSource in front of a remote one
"""

from __future__ import annotations

import os
from typing import Any

from loader.sources.base import ObjectInfo, Source, check_relative_path

__all__ = ["ObjectInfo", "Source", "check_relative_path", "open_source"]


def open_source(
    uri: str, *, cache_dir: str | None = None, **options: Any
) -> tuple[Source, str | None]:
    """The source rooted at ``uri`` (its folder, if ``uri`` names a file) and that file.

    ``cache_dir`` puts a write-through disk cache (``CachedSource``) in front of a remote
    source; local files are read in place."""
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
