"""Node-local KV-cache daemon and its engine client.

Layout (each module owns one noun; pure modules import no transport)::

    keys.py       chained 128-bit block keys over token chunks within a Namespace   (pure)
    allocator.py  slab allocator: offsets of page-aligned slots in a tier           (pure)
    eviction.py   pluggable eviction policies: LRU, S3-FIFO, Shoal's default        (pure)
    tier_policy.py  a tier's policy sized in the blocks it holds, updated lazily     (pure)
    checksums.py  xxh3-64 block checksums and the copies that compute them in one pass
    native/       the C sources of kvcache._copyhash (checksums.py's fast path)
    tiers.py      bytes of a tier (arena / DRAM / SSD file) and checksummed moves
                  (file I/O: the SSD tier reads and writes its spill file)
    store.py      block metadata: reservations, commits, leases, tier movement      (pure)
    store_file_moves.py  the store's file-tier half: moves and peer reads on I/O workers
    store_bulk.py  the store's whole-table work: statistics, snapshots, evict, flush (pure)
    store_entries.py  the store's per-block, per-session and per-tier records       (pure)
    store_values.py  what the store hands out: leases, results, events, statistics (pure)
    moves.py      a block in flight to or from a file tier, and its bytes jobs      (pure)
    io_workers.py where file-tier moves run: a thread pool off the daemon's loop
    arena.py      the /dev/shm arena file: create, lock, map, clean up after a crash
    messages.py   the engine <-> daemon wire protocol (versioned msgpack)
    daemon.py     the daemon: ZeroMQ ROUTER loop, client liveness, shutdown, probes
    client/       CacheClient (sync) and AsyncCacheClient, used by engine connectors
    metrics.py    Prometheus metrics (shoal_kvcache_*), /healthz and /readyz
    config.py     CacheConfig (flags / SHOAL_CACHE_* / [cache] in the TOML file)
    cli.py        `shoal cache serve|demo|stats|status|nodes|lookup|evict|flush|drain|keygen`
    keygen.py     `shoal cache keygen`: the cluster's CurveZMQ keypairs and allow-lists
    demo.py       the README's two-process demo (`shoal cache serve --demo`, `shoal cache
                  demo`: it ships in the package so a bare install can run it)
    wire.py       msgpack field validation shared by both wire protocols
    cluster/      cluster sync, cluster lookup, peer fetch, ops client (see its __init__)
    connector/    the vLLM KV connector (needs torch: ``pip install 'shoal[connector]'``)

Everything but ``connector/`` runs on the core install (no torch, no gRPC; checked by
import-linter). The eviction trace replay the benchmarks use is ``bench/eviction_replay.py``.
"""

from kvcache.client import AsyncCacheClient, BlockView, CacheClient, PutResult, Reservation
from kvcache.config import CacheConfig
from kvcache.errors import CacheError, CacheUnavailable, ProtocolError, RequestRejected
from kvcache.keys import BlockKey, Namespace, chain_keys

__all__ = [
    "AsyncCacheClient",
    "BlockKey",
    "BlockView",
    "CacheClient",
    "CacheConfig",
    "CacheError",
    "CacheUnavailable",
    "Namespace",
    "ProtocolError",
    "PutResult",
    "RequestRejected",
    "Reservation",
    "chain_keys",
]
