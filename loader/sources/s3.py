"""S3 and S3-compatible object stores (``s3://bucket/prefix``) as a checkpoint source.

Every read is one ranged ``GetObject`` (``Range: bytes=a-b``) whose body lands straight in
the caller's buffers, one after the other (``_ranged.fill_from_body``: the socket's
buffered reader fills each buffer, no intermediate ``bytes``). One boto3 client serves
all threads; its urllib3 pool holds ``concurrency`` connections, so the streamer's
``concurrency`` reads in flight never wait for a socket nor open one per read.

Failures, in layers:

1. botocore retries each request (``standard`` mode by default: 5xx, throttling,
   connection errors, with its own jittered backoff) up to ``max_attempts`` times;
2. a body cut short after the response began is resumed here with a ranged GET for the
   remainder (``max_attempts`` interruptions at most per read);
3. what is left is translated once, in ``_translate``: 404 / ``NoSuchKey`` /
   ``NoSuchBucket`` → ``ObjectNotFound``; 403 / ``AccessDenied`` / ``InvalidAccessKeyId``
   / ``SignatureDoesNotMatch`` / missing credentials → ``AccessDenied``; 5xx, throttling
   and connection errors → ``SourceUnavailable``; anything else → ``SourceError``. Every
   message names ``s3://bucket/key``.

``identity`` is the ETag. The first ``stat``, ``list`` or read of an object pins its ETag;
later reads send ``If-Match`` and compare the ETag of each response, so a checkpoint
replaced in the middle of a load fails the read instead of mixing old and new bytes.

Credentials, region and endpoint come from boto3's default chain (environment, shared
config/profile, container and instance roles, ``AWS_ENDPOINT_URL[_S3]``) unless given.
With a custom endpoint the client uses path-style addressing (``endpoint/bucket/key``),
which every S3-compatible store understands; virtual-hosted style needs wildcard DNS.

Chosen over the alternatives:

- *aiobotocore / aioboto3*: the streamer reads from a thread pool (the GIL is released in
  socket reads), and an event loop per source would add a second concurrency model for
  no gain in throughput; aiohttp also cannot read into a caller's buffer.
- *boto3's ``download_fileobj`` / s3transfer*: it decides ranges and threads itself and
  writes through a file object with copies; the streamer already owns both decisions.
- *hand-signed SigV4 over urllib3*: fewer layers, but boto3's credential chain (SSO,
  roles, IMDSv2, web identity) is what users expect and is not worth re-implementing.
- Response checksum validation is off (``when_required``): S3 publishes whole-object
  checksums, which a ranged read cannot check; integrity is the streamer's digest check.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from loader.errors import (
    AccessDenied,
    ObjectNotFound,
    SourceError,
    SourceUnavailable,
)
from loader.sources._ranged import (
    DEFAULT_BACKOFF,
    Backoff,
    check_content_range,
    fill_from_body,
    read_resuming,
    release,
)
from loader.sources.base import ObjectInfo, check_relative_path

__all__ = ["S3Source", "parse_s3_uri"]

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_DENIED = frozenset(
    {
        "401",
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "Forbidden",
    }
)
_TRANSIENT = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix``; the prefix is ``""`` or ends in ``/``."""
    if not uri.startswith("s3://"):
        raise SourceError(f"{uri!r} is not an S3 URI: write s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise SourceError(f"{uri!r} names no bucket: write s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Source:
    """Objects directly under ``s3://bucket/prefix/``, read with ranged GETs."""

    # A GET costs a round trip and the server's per-request work: 64 MiB ranges ran 20%
    # faster than 16 MiB ones on s3rver (bench/RESULTS.md, loader); on AWS a range this
    # size is still ~1 s per connection, so 16 in flight keep a link busy.
    preferred_chunk_bytes = 64 << 20

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        concurrency: int = 16,
        max_attempts: int = 5,
        retry_mode: Literal["standard", "adaptive"] = "standard",
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        addressing_style: Literal["auto", "path", "virtual"] | None = None,
        unsigned: bool = False,
        session: Any = None,
        client: Any = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``client`` (a boto3 S3 client) is used as given; else one is made from
        ``session`` (default: a new ``boto3.Session``) with the settings here.

        ``addressing_style=None`` means path style when an endpoint is configured (argument
        or ``AWS_ENDPOINT_URL[_S3]``), boto3's own choice otherwise. ``unsigned`` reads
        public buckets without credentials.
        """
        assert concurrency >= 1, f"concurrency must be positive, got {concurrency}"
        assert max_attempts >= 1, f"max_attempts must be positive, got {max_attempts}"
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self._etags: dict[str, str] = {}
        self._owns_client = client is None
        if client is None:
            client = _make_client(
                session,
                endpoint_url=endpoint_url,
                region=region,
                concurrency=concurrency,
                max_attempts=max_attempts,
                retry_mode=retry_mode,
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
                addressing_style=addressing_style,
                unsigned=unsigned,
            )
        self._client = client

    def stat(self, path: str) -> ObjectInfo:
        key = self._key(path)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.bucket, key) from exc
        info = ObjectInfo(path, int(head["ContentLength"]), str(head["ETag"]))
        self._etags[path] = info.identity
        return info

    def list(self) -> list[ObjectInfo]:
        infos: list[ObjectInfo] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            pages = paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", ()):
                    path = str(item["Key"])[len(self.prefix) :]
                    if path:  # the prefix itself, when a console made a "folder" object
                        infos.append(ObjectInfo(path, int(item["Size"]), str(item["ETag"])))
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.bucket, self.prefix) from exc
        infos.sort(key=lambda info: info.path)
        self._etags.update((info.path, info.identity) for info in infos)
        return infos

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        key = self._key(path)
        read_resuming(
            functools.partial(self._get_range, path, key),
            offset,
            buffers,
            max_attempts=self._max_attempts,
            backoff=self._backoff,
            describe=f"s3://{self.bucket}/{key}",
            sleep=self._sleep,
        )

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def _key(self, path: str) -> str:
        return self.prefix + check_relative_path(path)

    def _get_range(self, path: str, key: str, offset: int, views: Sequence[memoryview]) -> int:
        """One ranged GET filling ``views`` in turn; the number of bytes that landed."""
        length = sum(len(view) for view in views)
        describe = f"s3://{self.bucket}/{key}"
        etag = self._etags.get(path)
        request = {
            "Bucket": self.bucket,
            "Key": key,
            "Range": f"bytes={offset}-{offset + length - 1}",
        }
        if etag is not None:
            request["IfMatch"] = etag
        try:
            response = self._client.get_object(**request)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.bucket, key) from exc
        raw = getattr(response["Body"], "_raw_stream", response["Body"])
        landed = 0
        surplus = 0
        try:
            status = response["ResponseMetadata"]["HTTPStatusCode"]
            if status == 206:
                surplus = check_content_range(
                    response.get("ContentRange"), offset, length, describe
                )
            elif not (status == 200 and offset == 0 and response.get("ContentLength") == length):
                raise SourceError(f"{describe}: answered a ranged GET with HTTP {status}")
            seen = response.get("ETag")
            # The first response pins the version when no stat did; later ones must match.
            pinned = self._etags.setdefault(path, seen) if seen is not None else None
            if seen != pinned:
                raise SourceError(
                    f"{describe}: the object changed since it was first seen "
                    f"(ETag {pinned} became {seen}); stat it again"
                )
            landed = fill_from_body(raw, views)
        finally:
            release(raw, complete=landed == length and surplus == 0)
        return landed


def _make_client(
    session: Any,
    *,
    endpoint_url: str | None,
    region: str | None,
    concurrency: int,
    max_attempts: int,
    retry_mode: str,
    connect_timeout_s: float,
    read_timeout_s: float,
    addressing_style: str | None,
    unsigned: bool,
) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    if addressing_style is None:
        configured = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        addressing_style = "path" if configured or os.environ.get("AWS_ENDPOINT_URL") else "auto"
    config = Config(
        max_pool_connections=concurrency,
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        tcp_keepalive=True,
        s3={"addressing_style": addressing_style},
        signature_version=UNSIGNED if unsigned else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = session if session is not None else boto3.session.Session()
    # endpoint_url=None lets botocore read AWS_ENDPOINT_URL[_S3] and the profile's own.
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _translate(exc: ClientError | BotoCoreError, bucket: str, key: str) -> SourceError:
    """The loader's error for a botocore error met on ``s3://bucket/key``."""
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return AccessDenied(
            f"{where}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
        )
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return SourceUnavailable(f"{where}: {exc} (after retries)")
    if not isinstance(exc, ClientError):
        return SourceError(f"{where}: {exc}")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    detail = f"{code or status}: {error.get('Message') or 'no message'}"
    if code in _NOT_FOUND or status == 404:
        what = "no such bucket" if code == "NoSuchBucket" else "no such object"
        return ObjectNotFound(f"{where}: {what} ({detail})")
    if code in _DENIED or status in (401, 403):
        return AccessDenied(f"{where}: access denied ({detail}); check the credentials")
    if code == "PreconditionFailed" or status == 412:
        return SourceError(f"{where}: the object changed since it was listed; stat it again")
    if code in _TRANSIENT or status >= 500:
        return SourceUnavailable(f"{where}: still failing after retries ({detail})")
    return SourceError(f"{where}: {detail}")
