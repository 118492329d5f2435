"""Reading a reply body whole, up to a cap: what the router fetches from engines and
targets it does not control (``/v1/models`` polled every 0.5 s while requests are held,
a wake's answer).

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
the poll as failed.
"""

from __future__ import annotations

import aiohttp

__all__ = ["MODELS_MAX_BYTES", "WAKE_MAX_BYTES", "read_capped"]

MODELS_MAX_BYTES = 4 << 20  # /v1/models: ~100 bytes a card; 4 MiB is ~40,000 adapters
WAKE_MAX_BYTES = 64 << 10  # a wake's answer: a short JSON object


async def read_capped(reply: aiohttp.ClientResponse, limit: int) -> bytes | None:
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
