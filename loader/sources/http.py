"""Plain HTTP(S) servers (``https://host/prefix/``) as a checkpoint source: ``HEAD`` for
``stat``, one ``Range`` GET per read.

Invariant: a read returns only bytes the server declared, in ``Content-Range``, to be the
requested range of the object ``stat`` saw. A server that ignores ``Range`` (``200`` with
the whole body) fails the read with ``SourceError`` unless the whole body is exactly the
range asked for; a ``206`` for some other range, a body cut short and retried past the
limit, or an object replaced since ``stat`` or the first read pinned its ETag (``If-Match``
on strong ETags, and the ETag of every response compared) all fail too. Never wrong bytes.

``identity`` is the ETag, else ``<size>@<Last-Modified>``. A server that sends neither
cannot tell us when bytes change, so ``stat`` refuses it rather than hand a cache key that
could serve stale weights. (nginx's ETag is ``mtime-size`` in whole seconds: a file
replaced by another of the same size within the same second keeps its ETag.)

HTTP has no listing: ``list`` answers only for a checkpoint that publishes
``model.safetensors.index.json`` (the index and the shards its ``weight_map`` names) or is
one ``model.safetensors``; otherwise name the file.

Redirects are followed here, not by urllib3 (M5): one to the same scheme, host and port
always (up to ``_MAX_REDIRECTS``), one to another host only if that host is in
``redirect_hosts`` (``"*"``: any; a hub redirecting to its CDN names the CDN), and never from
``https`` down to ``http``. Otherwise the read fails with ``AccessDenied`` naming the
target: a sidecar fetching for clients must not be steered to internal addresses (SSRF) by
whoever controls an allowed server. A redirect keeps the ``Range`` header; headers given
to the source (``Authorization``) go only to the source's own host.

Built on urllib3 directly: one ``PoolManager`` (thread-safe, ``concurrency`` connections
per host) with urllib3's ``Retry`` for connection errors, 5xx and 429 (with backoff and
``Retry-After``), TLS verification on by default with an optional CA bundle. A body that breaks off
mid-read is resumed for the remainder (``_ranged.read_resuming``). Rejected: *httpx*
(another dependency, and its ``iter_bytes`` yields fresh ``bytes``: no read into a caller's
buffer); *aiohttp* (an event loop for what the streamer does from threads; same copy);
*requests* (a session is not documented thread-safe, and it is urllib3 underneath anyway).
"""

from __future__ import annotations

import functools
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence

import urllib3
from urllib3.exceptions import (
    HTTPError as Urllib3Error,
)
from urllib3.exceptions import (
    LocationValueError,
    MaxRetryError,
    SSLError,
)

from loader.errors import (
    AccessDenied,
    LoaderError,
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
from loader.sources.base import INDEX_FILE, MAX_INDEX_BYTES, ObjectInfo, check_relative_path

__all__ = ["HttpSource"]

SINGLE_FILE = "model.safetensors"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class HttpSource:
    """Objects under an ``http://`` or ``https://`` URL prefix, read with ranged GETs."""

    preferred_chunk_bytes = 64 << 20  # a request per range costs a round trip: as S3Source

    def __init__(
        self,
        uri: str,
        *,
        concurrency: int = 16,
        max_attempts: int = 5,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        verify_tls: bool = True,
        ca_bundle: str | None = None,
        headers: Mapping[str, str] | None = None,
        redirect_hosts: Sequence[str] = (),
        backoff: Backoff = DEFAULT_BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``headers`` go with every request to the source's host (e.g. ``Authorization``).
        ``ca_bundle`` is a PEM file of trusted CAs. ``redirect_hosts``: hosts (``host`` or
        ``host:port``; ``"*"`` for any) a redirect may lead to besides the source's own."""
        assert concurrency >= 1, f"concurrency must be positive, got {concurrency}"
        assert max_attempts >= 1, f"max_attempts must be positive, got {max_attempts}"
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SourceError(f"{uri!r} is not an HTTP(S) URL: write https://host/prefix/")
        if parts.query or parts.fragment:
            raise SourceError(f"{uri!r}: a source URL takes no query or fragment")
        self.uri = uri if uri.endswith("/") else uri + "/"
        try:
            self._origin = _origin(parts)
        except ValueError as exc:
            raise SourceError(f"{uri!r}: {exc}") from None
        self._redirect_hosts = frozenset(h.lower() for h in redirect_hosts)
        self._headers = {**(headers or {}), "Accept-Encoding": "identity"}
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self._etags: dict[str, str] = {}
        self._retries = urllib3.Retry(
            total=max_attempts - 1,
            status_forcelist=_RETRY_STATUSES,
            allowed_methods=frozenset({"HEAD", "GET"}),
            backoff_factor=backoff.base_s,
            backoff_max=backoff.cap_s,
            backoff_jitter=backoff.base_s,
            raise_on_status=False,  # the last response is answered below, with its status
            respect_retry_after_header=True,
            redirect=False,  # followed in _request, where the target is checked
        )
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=concurrency,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            retries=self._retries,
            cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
            ca_certs=ca_bundle,
        )

    def stat(self, path: str) -> ObjectInfo:
        url = self._url(path)
        response = self._request("HEAD", url, preload=True)  # no body: the pool has it back
        length = response.headers.get("Content-Length")
        if response.status in (405, 501) or (response.status == 200 and length is None):
            return self._stat_by_range(path, url)  # no HEAD here: ask for the first byte
        self._check_status(response, url)
        assert length is not None
        info = ObjectInfo(path, int(length), self._identity(response, int(length), url))
        self._remember(info)
        return info

    def list(self) -> list[ObjectInfo]:
        try:
            index = self.stat(INDEX_FILE)
        except ObjectNotFound:
            try:
                return [self.stat(SINGLE_FILE)]
            except ObjectNotFound:
                raise SourceError(
                    f"{self.uri}: HTTP servers cannot list a directory, and neither "
                    f"{INDEX_FILE} nor {SINGLE_FILE} is there; name the checkpoint's file"
                ) from None
        if index.size > MAX_INDEX_BYTES:
            raise SourceError(f"{self.uri}{INDEX_FILE}: {index.size} bytes is not an index")
        text = bytearray(index.size)
        self.read_into(INDEX_FILE, 0, memoryview(text))
        try:
            weight_map = json.loads(text)["weight_map"]
            shards = {check_relative_path(str(name)) for name in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{self.uri}{INDEX_FILE}: not a safetensors index ({exc})") from exc
        infos = [index, *(self.stat(shard) for shard in shards)]
        return sorted(infos, key=lambda info: info.path)

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        url = self._url(path)
        read_resuming(
            functools.partial(self._get_range, path, url),
            offset,
            buffers,
            max_attempts=self._max_attempts,
            backoff=self._backoff,
            describe=url,
            sleep=self._sleep,
        )

    def close(self) -> None:
        self._pool.clear()

    def _url(self, path: str) -> str:
        return self.uri + urllib.parse.quote(check_relative_path(path))

    def _remember(self, info: ObjectInfo) -> None:
        if _is_strong(info.identity):
            self._etags[info.path] = info.identity

    def _get_range(self, path: str, url: str, offset: int, views: Sequence[memoryview]) -> int:
        """One ranged GET filling ``views`` in turn; the number of bytes that landed."""
        length = sum(len(view) for view in views)
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        etag = self._etags.get(path)
        if etag is not None:
            headers["If-Match"] = etag
        response = self._request("GET", url, headers)
        landed = 0
        surplus = 0
        try:
            if response.status == 206:
                surplus = check_content_range(
                    response.headers.get("Content-Range"), offset, length, url
                )
            elif response.status == 200:
                size = response.headers.get("Content-Length")
                if offset != 0 or size is None or int(size) != length:
                    raise SourceError(
                        f"{url}: the server ignored the Range header (200 with "
                        f"{size or 'unknown'} bytes for {length} at offset {offset}); "
                        "it cannot serve ranged reads"
                    )
            else:
                self._check_status(response, url)
            seen = response.headers.get("ETag")
            # The first response pins the version when no stat did; later ones must match.
            pinned = self._etags.setdefault(path, seen) if seen and _is_strong(seen) else None
            if pinned is not None and seen != pinned:
                raise SourceError(
                    f"{url}: the object changed since it was first seen "
                    f"(ETag {pinned} became {seen}); stat it again"
                )
            landed = fill_from_body(response, views)
        finally:
            release(response, complete=landed == length and surplus == 0)
        return landed

    def _stat_by_range(self, path: str, url: str) -> ObjectInfo:
        response = self._request("GET", url, {"Range": "bytes=0-0"})
        try:
            self._check_status(response, url)
            content_range = response.headers.get("Content-Range", "")
            total = content_range.rpartition("/")[2]
            if response.status != 206 or not total.isdigit():
                raise SourceError(f"{url}: the server reports no size (no HEAD, no ranges)")
            size = int(total)
            info = ObjectInfo(path, size, self._identity(response, size, url))
        finally:
            release(response, complete=False)
        self._remember(info)
        return info

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        preload: bool = False,
    ) -> urllib3.BaseHTTPResponse:
        for _ in range(_MAX_REDIRECTS + 1):
            own = _origin(urllib.parse.urlsplit(url)) == self._origin
            sent = {**self._headers, **(headers or {})} if own else {
                k: v for k, v in {**self._headers, **(headers or {})}.items()
                if k.lower() not in ("authorization", "cookie", "proxy-authorization")
            }  # fmt: skip
            try:
                response = self._pool.request(
                    method, url, headers=sent, preload_content=preload, decode_content=False,
                    retries=self._retries, redirect=False,
                )  # fmt: skip
            except (MaxRetryError, SSLError, LocationValueError, Urllib3Error) as exc:
                raise _translate(exc, url) from exc
            location = response.headers.get("Location")
            if response.status not in _REDIRECT_STATUSES or not location:
                return response
            release(response, complete=False)
            url = self._redirect_target(url, location)
        raise SourceError(f"{url}: more than {_MAX_REDIRECTS} redirects")

    def _redirect_target(self, url: str, location: str) -> str:
        """The absolute URL a redirect leads to, or ``AccessDenied`` if it may not."""
        target = urllib.parse.urljoin(url, location)
        parts = urllib.parse.urlsplit(target)
        try:
            there = _origin(parts)
        except ValueError:  # a port that is not a number
            raise AccessDenied(f"{url}: refusing the redirect to {target!r}") from None
        if parts.scheme not in ("http", "https") or parts.username or parts.password:
            raise AccessDenied(f"{url}: refusing the redirect to {target!r}")
        if self._origin[0] == "https" and parts.scheme != "https":
            raise AccessDenied(f"{url}: refusing the redirect from https down to {target}")
        if there[1:] == self._origin[1:] or "*" in self._redirect_hosts:
            return target
        host, port = there[1], there[2]
        if host in self._redirect_hosts or f"{host}:{port}" in self._redirect_hosts:
            return target
        raise AccessDenied(
            f"{url}: the server redirects to another host ({target}); a source follows "
            f"redirects to its own host only: name {host} in redirect_hosts "
            "(shoal load --redirect-host, the sidecar's --redirect-hosts) to allow it"
        )

    @staticmethod
    def _check_status(response: urllib3.BaseHTTPResponse, url: str) -> None:
        status = response.status
        if status in (200, 206):
            return
        if status in (404, 410):
            raise ObjectNotFound(f"{url}: no such object (HTTP {status})")
        if status in (401, 403):
            raise AccessDenied(f"{url}: access denied (HTTP {status}); check the headers/token")
        if status == 412:
            raise SourceError(f"{url}: the object changed since it was listed; stat it again")
        if status == 416:
            raise SourceError(f"{url}: range not satisfiable (HTTP 416): past the object's end")
        if status in _RETRY_STATUSES:
            raise SourceUnavailable(f"{url}: HTTP {status} persisted after retries")
        raise SourceError(f"{url}: unexpected HTTP {status}")

    @staticmethod
    def _identity(response: urllib3.BaseHTTPResponse, size: int, url: str) -> str:
        etag = response.headers.get("ETag")
        if etag:
            return etag
        modified = response.headers.get("Last-Modified")
        if modified:
            return f"{size}@{modified}"
        raise SourceError(
            f"{url}: the server sends neither ETag nor Last-Modified, so a changed object "
            "could not be told from the old one; serve it from a server that does"
        )


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port defaulted: what "the same host" means."""
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _is_strong(etag: str | None) -> bool:
    """Whether ``etag`` is a strong ETag, the only kind ``If-Match`` can compare."""
    return etag is not None and etag.startswith('"')


def _translate(exc: Urllib3Error, url: str) -> LoaderError:
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    if isinstance(reason, SSLError):
        return SourceError(
            f"{url}: TLS failed ({reason}); pass ca_bundle= for a private CA, "
            "or verify_tls=False to trust any certificate"
        )
    if isinstance(exc, LocationValueError):
        return SourceError(f"{url}: {exc}")
    return SourceUnavailable(f"{url}: {reason} (after retries)")
