"""``shoal cache ...``: run the node daemon and inspect it.

Exit codes: 0 success, 1 the command failed (demo mismatch), 2 bad usage or
configuration, 3 the daemon is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from shoal.config import add_flags, load_config
from shoal.logs import setup_logging

__all__ = ["register"]

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def register(subparsers: Any) -> None:
    from kvcache.config import CacheConfig

    cache = subparsers.add_parser("cache", help="node-local KV-cache daemon")
    verbs = cache.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser("serve", help="run the cache daemon in the foreground")
    serve.add_argument("--demo", action="store_true", help="once ready, run the two-process demo")
    add_flags(serve, CacheConfig, "cache")
    serve.set_defaults(func=_serve)

    demo = verbs.add_parser("demo", help="two engine processes share a prefix via a running daemon")
    add_flags(demo, CacheConfig, "cache")
    demo.set_defaults(func=_demo)

    stats = verbs.add_parser(
        "stats", help="tiers, blocks, hit counts and leases of a running daemon"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    add_flags(stats, CacheConfig, "cache")
    stats.set_defaults(func=_stats)


def _config(args: argparse.Namespace) -> Any:
    from kvcache.config import CacheConfig

    return load_config(CacheConfig, "cache", flags=args)


def _serve(args: argparse.Namespace) -> int:
    from kvcache.daemon import CacheDaemon
    from kvcache.demo import run_demo
    from kvcache.errors import CacheError

    config = _config(args)
    setup_logging(config.log_level, config.log_format)
    try:
        daemon = CacheDaemon(config)
    except CacheError as exc:
        print(f"shoal cache serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.demo:

        def demo() -> None:
            time.sleep(0.2)
            print(f"--- demo against {config.endpoint} ---", flush=True)
            ok = run_demo(config.endpoint)
            verdict = "passed" if ok else "FAILED"
            print(f"--- demo {verdict}; daemon keeps serving (Ctrl-C stops) ---", flush=True)

        threading.Thread(target=demo, daemon=True).start()
    daemon.serve_forever()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvcache.demo import run_demo

    config = _config(args)
    if not config.socket_path.exists():
        print(f"no daemon at {config.endpoint}; start `shoal cache serve` first", file=sys.stderr)
        return EXIT_UNREACHABLE
    return 0 if run_demo(config.endpoint) else EXIT_FAILED


def _stats(args: argparse.Namespace) -> int:
    from kvcache.client import CacheClient
    from kvcache.errors import CacheUnavailable

    config = _config(args)
    try:
        with CacheClient(
            config.endpoint, name="shoal-cache-stats", heartbeat=False, populate=False
        ) as c:
            stats = c.stats()
    except CacheUnavailable as exc:
        print(f"shoal cache stats: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(stats))
        return 0
    print(f"daemon {stats['name']} (pid {stats['pid']}): {stats['num_sessions']} sessions, "
          f"{stats['num_leases']} leases, {stats['num_reservations']} reservations")  # fmt: skip
    print(
        f"{'tier':<6}{'blocks':>10}{'used':>12}{'capacity':>12}{'frag':>7}"
        f"{'hits':>10}{'evicted':>10}"
    )
    for tier in stats["tiers"]:
        print(
            f"{tier['tier']:<6}{tier['num_blocks']:>10}{_size(tier['used_bytes']):>12}"
            f"{_size(tier['capacity_bytes']):>12}{tier['fragmentation']:>7.1%}{tier['hits']:>10}"
            f"{tier['evictions']:>10}"
        )
    print(f"misses {stats['misses']}, no-space {stats['no_space']}, "
          f"checksum failures {stats['checksum_failures']}")  # fmt: skip
    return 0


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
