"""``shoal load SOURCE``: stream a checkpoint, with a progress bar and a final summary.

Exit codes: 0 loaded; 1 the checkpoint is bad (malformed, digest mismatch, missing object,
refused); 2 usage; 3 the source is unreachable (kept failing past the retries).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def register(subparsers: Any) -> None:
    load = subparsers.add_parser(
        "load",
        help="stream a safetensors checkpoint from disk, S3 or HTTP, tensor by tensor",
        description="Stream a safetensors checkpoint (a file, a folder, or the shards of "
        "model.safetensors.index.json) from a local path, s3://bucket/prefix, http(s):// or "
        "a peer loader sidecar that holds it staged, tensor by tensor, and report throughput.",
    )
    load.add_argument(
        "source",
        help="path, file://, s3://bucket/prefix, http(s):// URL, or a peer sidecar holding "
        "one: peer://host:port/<uri>, peer+unix:///path/NAME.sock/<uri>",
    )
    load.add_argument("--device", default="cpu", help="where tensors land: cpu, cuda, cuda:1")
    load.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="reads in flight (16)",
    )
    load.add_argument(
        "--chunk-bytes", default="0",
        help="largest single read (0: the source's, 16MiB local and peer, 64MiB S3 and HTTP)",
    )  # fmt: skip
    load.add_argument("--max-inflight", default="1GiB", help="memory bound (1GiB)")
    load.add_argument("--rate", default="0", help="bytes per second, e.g. 500MB/s (0: unlimited)")
    load.add_argument("--order", choices=["file", "layers", "priority"], default="file")
    load.add_argument(
        "--priority", default="", help="with --order priority: names, comma-separated"
    )
    load.add_argument("--tp-rank", type=int, default=0, help="tensor-parallel rank to read for")
    load.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size (1: whole)")
    load.add_argument("--digests", help="JSON file: {tensor name: 'sha256:<hex>'}")
    load.add_argument(
        "--direct", choices=["auto", "on", "off"], default="auto",
        help="O_DIRECT reads of local files: auto = for files not in the page cache",
    )  # fmt: skip
    load.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (or AWS_ENDPOINT_URL)")
    load.add_argument("--cache-dir", help="write remote checkpoints through to this local cache")
    load.add_argument(
        "--redirect-host", action="append", default=[], metavar="HOST",
        help="an http(s) source may be redirected to HOST (repeat; * for any); by default "
        "only redirects to the source's own host are followed",
    )  # fmt: skip
    load.add_argument("--tls-ca", help="PEM CA bundle verifying a peer:// sidecar over TLS")
    load.add_argument("--tls-cert", help="PEM client certificate for a peer requiring mTLS")
    load.add_argument("--tls-key", help="PEM private key of --tls-cert")
    load.add_argument(
        "--no-fallback", action="store_true",
        help="fail if the peer cannot serve the checkpoint instead of reading its origin",
    )  # fmt: skip
    load.add_argument("--json", action="store_true", help="print one JSON summary for scripts")
    load.set_defaults(func=_load)


def _load(args: argparse.Namespace) -> int:
    from loader.checkpoint import open_checkpoint
    from loader.errors import LoaderError, SourceUnavailable
    from loader.plan import tp_slice_rule
    from loader.sources import open_source
    from loader.stream import Streamer, StreamOptions
    from shoal.config import parse_rate, parse_size

    try:
        options = StreamOptions(
            concurrency=args.concurrency,
            chunk_bytes=parse_size(args.chunk_bytes),
            max_inflight_bytes=parse_size(args.max_inflight),
            rate_bytes_per_s=parse_rate(args.rate),
            order=args.order,
            priority=tuple(n for n in args.priority.split(",") if n),
            digests=_digests(args.digests) if args.digests else {},
        )
        slice_for = tp_slice_rule(args.tp_rank, args.tp_size)
    except (ValueError, OSError) as exc:
        print(f"shoal load: {exc}", file=sys.stderr)
        return 2
    source_options: dict[str, Any] = {}
    if args.direct != "auto":
        source_options["direct"] = args.direct == "on"
    if args.s3_endpoint:
        source_options["endpoint_url"] = args.s3_endpoint
    if args.cache_dir:
        source_options["cache_dir"] = args.cache_dir
    for name in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(args, name):
            source_options[name] = getattr(args, name)
    if args.no_fallback:
        source_options["fallback"] = False
    if args.redirect_host and ("http://" in args.source or "https://" in args.source):
        source_options["redirect_hosts"] = list(args.redirect_host)
    try:
        source, file = open_source(args.source, **source_options)
        try:
            checkpoint = open_checkpoint(source, file, concurrency=args.concurrency)
            plans = checkpoint.plan(slice_for)
            total = sum(p.nbytes for p in plans)
            bar = _bar(total, len(plans), quiet=args.json)
            done = [0]

            def progress(p: Any) -> None:
                if bar is not None:
                    bar.update(p.bytes_done - done[0])
                    bar.set_postfix_str(f"{p.tensors_done}/{p.tensors_total} tensors")
                done[0] = p.bytes_done

            streamer = Streamer(source, plans, options, device=args.device, on_progress=progress)
            for _name, _tensor in streamer:
                pass  # a real engine keeps them; the command measures and drops them
            if bar is not None:
                bar.close()
        finally:
            source.close()
    except SourceUnavailable as exc:
        print(f"shoal load: {exc}", file=sys.stderr)
        return 3
    except LoaderError as exc:
        print(f"shoal load: {exc}", file=sys.stderr)
        return 1
    stats = streamer.statistics()
    summary = {
        "source": args.source,
        "files": len(checkpoint.headers),
        "tensors": stats.tensors,
        "bytes": stats.bytes_read,
        "seconds": round(stats.elapsed_s, 4),
        "gbps": round(stats.gbps, 3),
        "first_tensor_ms": None
        if stats.first_tensor_s is None
        else round(stats.first_tensor_s * 1000, 2),
        "reads": stats.num_reads,
        "peak_held_bytes": stats.peak_held_bytes,
        "tp": f"{args.tp_rank}/{args.tp_size}",
    }
    if args.json:
        print(json.dumps(summary))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _digests(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: digests must be a JSON object of name -> 'sha256:<hex>'")
    return data


def _bar(total: int, tensors: int, *, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{tensors} tensors",
        file=sys.stderr, disable=None, dynamic_ncols=True,
    )  # fmt: skip
