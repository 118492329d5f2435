"""Reading an HTTP reply body whole, up to a cap: every body Shoal fetches from a peer it
does not control (engines' ``/v1/models`` and ``/metrics``, a wake's answer, the router's
request sizes, the planner's plan, the LoRA manager's engine calls).

Invariant: ``read_capped`` returns the complete body (every byte up to EOF) when it is at
most ``limit`` bytes, and ``None`` as soon as more than ``limit`` bytes arrived (or the
``Content-Length`` says there will be), never holding more than ``limit`` plus one chunk
in memory.

Why a loop: aiohttp's ``StreamReader.read(n)`` returns what is buffered, up to ``n``
bytes, not ``n`` bytes: one call cuts a 100 KB ``/v1/models`` at whatever the first
network read held (issue 14's review, finding 1). Rejected: ``reply.json()`` /
``reply.read()`` (no cap: an engine answering gigabytes fills the router's memory) and
aiohttp's ``read_bufsize`` (a buffer size, not a limit on the body).

An over-cap body is a shortage, not an error (STYLE.md 6): the caller logs it and treats
the poll as failed. The reply is duck-typed (aiohttp's ``ClientResponse`` fits), so this
core module needs no HTTP library.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Reply", "read_capped"]


class _Stream(Protocol):
    async def readany(self) -> bytes: ...


class Reply(Protocol):
    """What ``read_capped`` reads: aiohttp's ``ClientResponse`` has both."""

    @property
    def content_length(self) -> int | None: ...

    @property
    def content(self) -> _Stream: ...


async def read_capped(reply: Reply, limit: int) -> bytes | None:
    """``reply``'s whole body, or ``None`` when it is over ``limit`` bytes."""
    assert limit >= 0, "a byte count"
    length = reply.content_length
    if length is not None and length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await reply.content.readany()
        if not chunk:  # EOF
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
