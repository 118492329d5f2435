"""Engine-side client of the cache daemon: a sync ``CacheClient`` and an ``AsyncCacheClient``.

Layout::

    session.py  one session with one daemon: trust checks (socket dir, arena path), hello
                and the arena mapping, fail-fast after a failure, ending a session (bye)
    flows.py    the values callers see (PutResult, Reservation, BlockView, ClusterLookup)
                and every operation written once as a sans-I/O flow
    sync.py     CacheClient: drives the flows with blocking ZeroMQ calls
    aio.py      AsyncCacheClient: drives the same flows with zmq.asyncio

Failures are the caller's to degrade: ``CacheUnavailable`` when the daemon is down, slow,
or not trustworthy (``UntrustedEndpoint``); a daemon that restarted or dropped an idle
session is not a failure (the call says hello again and is retried once);
``RequestRejected`` for a refused request. Shortage is a return value
(``PutResult.no_space``, a short ``get``).
"""

from kvcache.client.aio import AsyncCacheClient
from kvcache.client.flows import BlockView, ClusterLookup, PutResult, Reservation
from kvcache.client.sync import CacheClient

__all__ = [
    "AsyncCacheClient",
    "BlockView",
    "CacheClient",
    "ClusterLookup",
    "PutResult",
    "Reservation",
]
