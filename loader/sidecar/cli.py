"""``shoal loader ...``: run the loader sidecar and operate it.

::

    serve      run the sidecar in the foreground
    prefetch   stage a checkpoint in the sidecar's shared memory (progress on stderr;
               --detach: return at once and let it stage with nobody waiting)
    list       staged checkpoints: id, state (staging, ready, failed), size, age, URI, error
    evict      unlink a staged checkpoint's segment and forget it (a detached staging:
               cancel it; a failed one: forget it)
    health     serving, staged bytes, capacity

Every verb but ``serve`` talks to the sidecar that ``--name``/``--runtime-dir``/``--listen``
(or ``--config``) name, as ``serve`` does; ``--tls-ca`` verifies a TCP sidecar.

Exit codes: 0 success; 1 the sidecar refused (not found, capacity, bad checkpoint, ...);
2 bad usage or configuration; 3 the sidecar, or the source behind it, is unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from shoal.cli_format import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from shoal.cli_format import table as text_table
from shoal.config import add_flags, load_config
from shoal.logs import setup_logging

__all__ = ["register"]


def register(subparsers: Any) -> None:
    from loader.sidecar.config import LoaderConfig

    group = subparsers.add_parser(
        "loader",
        help="the loader sidecar: stage checkpoints in shared memory for engines",
        description="Run the loader sidecar (gRPC) and operate it.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        parser = verbs.add_parser(name, help=help, description=help)
        parser.set_defaults(func=func)
        if name != "serve":
            parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        return parser

    serve = verb("serve", "run the loader sidecar in the foreground", _serve)
    serve.description = (
        "Run the loader sidecar in the foreground. On a Unix socket (the default) or a "
        "loopback TCP address any local user may ask it to stage anything (--allow narrows "
        "it). On a TCP address other hosts can reach it needs --tls-cert/--tls-key and "
        "--tls-client-ca (mutual TLS): without client certificates any host that reaches "
        "the port could Read, Evict and Prefetch staged weights, so it refuses to start "
        "unless --insecure-clients is given (then it logs a warning). There --allow is "
        "deny-by-default."
    )
    prefetch = verb("prefetch", "stage a checkpoint in the sidecar's shared memory", _prefetch)
    prefetch.add_argument("uri", help="absolute path, file://, s3://bucket/prefix or http(s)://")
    prefetch.add_argument("--tp-rank", type=int, default=0, help="tensor-parallel rank")
    prefetch.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size")
    prefetch.add_argument("--order", choices=["file", "layers"], default="file")
    prefetch.add_argument("--rate", default="0", help="at most this many bytes/s (0: sidecar's)")
    prefetch.add_argument(
        "--detach", action="store_true",
        help="return once the sidecar accepted it; it stages on (watch with list)",
    )  # fmt: skip
    listing = verb("list", "staged checkpoints of a running sidecar", _list)
    evict = verb("evict", "unlink a staged checkpoint and forget it", _evict)
    evict.add_argument("checkpoint_id", metavar="ID", help="checkpoint id (see `list`)")
    health = verb("health", "is the sidecar serving; staged bytes and capacity", _health)
    for parser in (serve, prefetch, listing, evict, health):
        add_flags(parser, LoaderConfig, "loader")


def _config(args: argparse.Namespace) -> Any:
    from loader.sidecar.config import LoaderConfig

    return load_config(LoaderConfig, "loader", flags=args)


def _command(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[[argparse.Namespace], int]:
    """Run a verb with a client; map the loader's errors to a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        from loader.errors import LoaderError, SidecarUnavailable, SourceUnavailable
        from loader.sidecar.client import SidecarClient

        config = _config(args)
        try:
            with SidecarClient(
                config.target,
                tls_ca=config.tls_ca or None,
                tls_cert=config.tls_client_cert or None,
                tls_key=config.tls_client_key or None,
                timeout_s=config.timeout_s,
                shm_dir=config.shm_dir,
                keepalive_time_s=config.keepalive_time_s,
                keepalive_timeout_s=config.keepalive_timeout_s,
            ) as client:
                return fn(args, client)
        except (SidecarUnavailable, SourceUnavailable) as exc:
            message, code = str(exc), EXIT_UNREACHABLE
            if isinstance(exc, SidecarUnavailable):
                message += "; is `shoal loader serve` running (same --name/--listen)?"
        except ValueError as exc:
            message, code = str(exc), EXIT_USAGE
        except LoaderError as exc:
            message, code = f"refused: {exc}", EXIT_FAILED
        print(f"shoal loader {args.verb}: {message}", file=sys.stderr)
        return code

    run.__name__ = fn.__name__
    return run


def _serve(args: argparse.Namespace) -> int:
    from loader.errors import LoaderError
    from loader.sidecar.server import SidecarServer

    config = _config(args)
    setup_logging(config.log_level, config.log_format)
    try:
        server = SidecarServer(config)
    except ValueError as exc:  # settings it must not serve with (check_serving)
        print(f"shoal loader serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (LoaderError, OSError) as exc:
        print(f"shoal loader serve: {exc}", file=sys.stderr)
        return EXIT_FAILED
    server.serve_forever()
    return 0


@_command
def _prefetch(args: argparse.Namespace, client: Any) -> int:
    from shoal.config import parse_rate

    rate = parse_rate(args.rate)
    last = [0.0]

    def progress(p: Any) -> None:
        now = time.monotonic()
        if not args.json and now - last[0] >= 0.5:
            last[0] = now
            gbps = p.bytes_done / p.elapsed_s / 1e9 if p.elapsed_s > 0 else 0.0
            print(f"{p.bytes_done}/{p.bytes_total} bytes, {p.tensors_done}/{p.tensors_total} "
                  f"tensors, {gbps:.2f} GB/s", file=sys.stderr, flush=True)  # fmt: skip

    spec = {"tp_rank": args.tp_rank, "tp_size": args.tp_size, "order": args.order,
            "rate_bytes_per_s": rate}  # fmt: skip
    if args.detach:
        accepted = {"checkpoint_id": client.prefetch_detached(args.uri, **spec),
                    "state": "staging in the background (shoal loader list)"}  # fmt: skip
        print(json.dumps(accepted) if args.json else _pairs(accepted))
        return 0
    result = client.prefetch(args.uri, on_progress=None if args.json else progress, **spec)
    table = result.table
    summary = {
        "checkpoint_id": table.checkpoint_id, "origin": result.origin,
        "segment": table.segment_path, "bytes": table.segment_bytes,
        "tensors": len(table.tensors), "staging_s": round(table.staging_s, 4),
    }  # fmt: skip
    print(json.dumps(summary) if args.json else _pairs(summary))
    return 0


@_command
def _list(args: argparse.Namespace, client: Any) -> int:
    rows = [
        {
            "checkpoint_id": i.checkpoint_id,
            "state": i.state,
            "bytes": i.bytes,
            "bytes_done": i.bytes_done,
            "age_s": round(i.age_s, 3),
            "loads": i.num_loads,
            "tp": f"{i.tp_rank}/{i.tp_size}",
            "uri": i.uri,
            "error": i.error,
        }
        for i in client.list()
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    header = ["ID", "STATE", "BYTES", "AGE_S", "LOADS", "TP", "URI", "ERROR"]
    cells = [[r["checkpoint_id"], r["state"], str(r["bytes"]), f"{r['age_s']:.1f}",
              str(r["loads"]), r["tp"], r["uri"], r["error"]] for r in rows]  # fmt: skip
    print("\n".join(text_table(header, cells, "<" * len(header))))
    return 0


@_command
def _evict(args: argparse.Namespace, client: Any) -> int:
    freed = client.evict(args.checkpoint_id)
    result = {"checkpoint_id": args.checkpoint_id, "bytes_freed": freed}
    print(json.dumps(result) if args.json else _pairs(result))
    return 0


@_command
def _health(args: argparse.Namespace, client: Any) -> int:
    health = client.health()
    result = {f: getattr(health, f) for f in health.__dataclass_fields__}
    print(json.dumps(result) if args.json else _pairs(result))
    return 0 if health.serving else EXIT_FAILED


def _pairs(values: dict[str, Any]) -> str:
    width = max(len(k) for k in values)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in values.items())
