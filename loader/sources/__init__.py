"""Checkpoint sources: ``base`` (the boundary), ``local``, ``s3``, ``http``.

``open_source(uri)`` picks one by scheme and returns it with the file the URI names, if it
names one (a URI ending in ``.safetensors`` or ``.json``)::

    /path/dir, file:///path/dir        LocalSource
    s3://bucket/prefix                 S3Source      (boto3; endpoint via AWS_ENDPOINT_URL)
    http://host/prefix, https://...    HttpSource
"""

from __future__ import annotations

import os
from typing import Any

from loader.sources.base import ObjectInfo, Source, check_relative_path

__all__ = ["ObjectInfo", "Source", "check_relative_path", "open_source"]


def open_source(uri: str, **options: Any) -> tuple[Source, str | None]:
    """The source rooted at ``uri`` (its folder, if ``uri`` names a file) and that file."""
    root, file = uri, None
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith((".safetensors", ".json")):
        root, file = uri.rstrip("/")[: -len(last)] or ".", last
    if root.startswith("s3://"):
        from loader.sources.s3 import S3Source

        return S3Source(root, **options), file
    if root.startswith(("http://", "https://")):
        from loader.sources.http import HttpSource

        return HttpSource(root, **options), file
    from loader.sources.local import LocalSource

    path = root.removeprefix("file://")
    return LocalSource(path or os.curdir, **options), file
