"""Ranged reads over HTTP, shared by the S3 and HTTP sources: a response body lands in the
caller's buffers (one range, filling each buffer in turn), and a body cut short is resumed
from where it stopped.

Invariant: ``read_resuming`` returns only when every byte of the buffers came from a
response whose ``Content-Range`` (or whole-object length) matched what was asked for;
otherwise it raises. A connection that drops mid-body costs one more ranged request for the
remainder, not a restart of the whole range.

Why read through ``response._fp``: urllib3's ``HTTPResponse.readinto`` reads into a fresh
``bytes`` and copies it into the buffer (urllib3 2.8). The standard library
``http.client.HTTPResponse`` underneath reads straight from the socket's buffered reader
into the given memory, and both botocore and our HTTP source open responses with
``decode_content=False``, so bypassing urllib3's decoding layer changes no byte. Where the
attribute is missing (another urllib3, a test double) we fall back to ``read`` + copy.
"""

from __future__ import annotations

import http.client
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import urllib3

from loader.errors import SourceError, SourceUnavailable
from loader.sources.base import advance

__all__ = [
    "DEFAULT_BACKOFF",
    "Backoff",
    "BodyInterrupted",
    "byte_view",
    "check_content_range",
    "fill_from_body",
    "read_resuming",
    "release",
]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class BodyInterrupted(Exception):
    """A response body ended or failed before the promised length: worth another request.

    Internal to the sources; it never leaves ``read_resuming``.
    """


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt ``k`` waits ``U(0, min(cap, base*2^k))``."""

    base_s: float = 0.1
    cap_s: float = 5.0

    def delay_s(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.cap_s, self.base_s * 2.0**attempt)


DEFAULT_BACKOFF = Backoff()


def byte_view(buffer: memoryview) -> memoryview:
    """``buffer`` as a flat, writable view of unsigned bytes."""
    view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
    assert not view.readonly, "read_into needs a writable buffer"
    return view


def check_content_range(header: str | None, offset: int, length: int, describe: str) -> int:
    """How many bytes past the requested ``[offset, offset + length)`` the body carries,
    from its ``Content-Range``; ``SourceError`` unless the body starts at ``offset`` and
    covers the whole range.

    A longer body is accepted because its first ``length`` bytes are still exactly the
    ones asked for (s3rver 3.7 answers ``bytes=0-0`` with the whole object, labelled so);
    the caller must then drop the connection instead of reusing it.
    """
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match is None:
        raise SourceError(f"{describe}: unusable Content-Range {header!r} in a 206 response")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if first != offset or last < offset + length - 1:
        size = f" (object size {total})" if total != "*" else ""
        raise SourceError(
            f"{describe}: asked for bytes {offset}-{offset + length - 1}, "
            f"server sent {first}-{last}{size}"
        )
    return last - (offset + length - 1)


def fill_from_body(response: object, views: Sequence[memoryview]) -> int:
    """Read the body of a urllib3 response into ``views``, one after the other; the number
    of bytes that landed.

    Reads until every view is full or the body ends; a failure after some bytes landed is
    ``BodyInterrupted`` carrying the count in ``args[1]``.
    """
    fp = getattr(response, "_fp", None)
    filled = 0
    try:
        for view in views:
            done = 0
            if isinstance(fp, http.client.HTTPResponse):
                while done < len(view):
                    count = fp.readinto(view[done:])
                    if not count:
                        break
                    done += count
                    filled += count
            else:
                read: Callable[[int], bytes] = response.read  # type: ignore[attr-defined]
                while done < len(view):
                    chunk = read(min(len(view) - done, 1 << 20))
                    if not chunk:
                        break
                    view[done : done + len(chunk)] = chunk
                    done += len(chunk)
                    filled += len(chunk)
            if done < len(view):
                break  # the body ended
    except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError, ValueError) as exc:
        # ValueError: http.client reading from a response whose socket was closed under it;
        # urllib3's errors (ProtocolError, ReadTimeoutError) come from the read() fallback.
        raise BodyInterrupted(f"{type(exc).__name__}: {exc}", filled) from exc
    return filled


def release(response: object, *, complete: bool) -> None:
    """Give a response's connection back to its pool if its body was read to the end, else
    close it (a connection with unread body bytes cannot carry the next request)."""
    fp = getattr(response, "_fp", None)
    if isinstance(fp, http.client.HTTPResponse) and not fp.isclosed():
        # We read around urllib3 and stopped at the promised length: a chunked body's
        # terminator may still be unread, so this connection is not clean for reuse.
        complete = False
    if complete:
        release_conn = getattr(response, "release_conn", None)
        if release_conn is not None:
            release_conn()
    else:
        close = getattr(response, "close", None)
        if close is not None:
            close()
        release_conn = getattr(response, "release_conn", None)
        if release_conn is not None:
            release_conn()


def read_resuming(
    read_once: Callable[[int, Sequence[memoryview]], int],
    offset: int,
    views: Sequence[memoryview],
    *,
    max_attempts: int,
    backoff: Backoff,
    describe: str,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Fill ``views`` (any writable buffers, seen as bytes) in turn with bytes
    ``[offset, offset + total length)`` using ``read_once``.

    ``read_once(offset, views)`` issues one ranged request for all of ``views`` and returns
    how many bytes landed at their front (fewer when the body was cut short) or raises
    ``BodyInterrupted`` (its ``args[1]`` is the count that landed) or a ``SourceError``,
    which passes through. After ``max_attempts`` interruptions in total the read fails
    with ``SourceUnavailable``.
    """
    assert offset >= 0, f"negative offset {offset} for {describe}"
    rest = [byte_view(view) for view in views if len(view)]
    total = sum(len(view) for view in rest)
    done = 0
    interruptions = 0
    while rest:
        try:
            landed = read_once(offset + done, rest)
            reason = "the body ended early"
        except BodyInterrupted as exc:
            landed = int(exc.args[1])
            reason = str(exc.args[0])
        done += landed
        rest = advance(rest, landed)
        if not rest:
            return
        interruptions += 1
        if interruptions >= max_attempts:
            raise SourceUnavailable(
                f"{describe}: {done} of {total} bytes after {interruptions} "
                f"interrupted responses (last: {reason})"
            )
        sleep(backoff.delay_s(interruptions))
