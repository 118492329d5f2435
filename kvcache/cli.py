"""``shoal cache ...``: run the node daemon, inspect it, and operate the cluster it is in.

::

    serve    run the daemon in the foreground            demo    two engines share a prefix
    stats    tiers, hits, leases (--watch refreshes)     status  cluster view + local tiers
    nodes    short member list                           lookup  where a prompt prefix lives
    evict    drop blocks by namespace / key prefix       flush   drop every block (--yes)
    drain    hand a node's hot blocks to peers, then it leaves
    keygen   create the CurveZMQ cluster keypair; --member / --operator: one's own keypair

Every verb that talks to a daemon starts at the local one (``--name``, ``--runtime-dir``,
``--config`` pick it, as for ``serve``) over its ipc socket. Other members are reached over
their cluster port (``kvcache.cluster.admin.ClusterAdmin``) at the address the local
daemon's cluster view holds for them, so an operator names a member, never an address, and
``--cluster-curve-dir`` supplies the key when the cluster uses CurveZMQ. Rejected: letting
the local daemon relay operator requests to peers (a drain that outlives the relay would
have no one to answer to, and the daemon's loop would grow an operator's concerns).

Exit codes (``shoal.cli_format``): 0 success; 1 the command failed (demo mismatch, request
refused); 2 bad usage or configuration (unknown node, flush without --yes, no tokenizer);
3 a daemon is unreachable (the local one, or a member the command needed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kvcache.keygen import keygen_command
from shoal.cli_format import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, table
from shoal.config import add_flags, load_config
from shoal.logs import setup_logging

__all__ = ["register"]

T = TypeVar("T")


def register(subparsers: Any) -> None:
    from kvcache.config import CacheConfig

    cache = subparsers.add_parser(
        "cache",
        help="node-local KV-cache daemon",
        description="Run the node-local KV-cache daemon, inspect it, operate its cluster.",
    )
    verbs = cache.add_subparsers(dest="verb", required=True, metavar="VERB")
    configured: list[Any] = []

    def verb(name: str, help: str, func: Callable[..., int], *, json: bool = True) -> Any:
        parser = verbs.add_parser(name, help=help, description=help)
        parser.set_defaults(func=func)
        if json:
            parser.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name != "keygen":  # keygen talks to no daemon
            configured.append(parser)
        return parser

    serve = verb("serve", "run the cache daemon in the foreground", _serve, json=False)
    serve.add_argument("--demo", action="store_true", help="once ready, run the two-process demo")
    verb("demo", "two engine processes share a prefix via a running daemon", _demo, json=False)

    stats = verb("stats", "tiers, blocks, hit counts and leases of a running daemon", _stats)
    stats.add_argument(
        "--watch", action="store_true", help="refresh until Ctrl-C (with --json: one object a line)"
    )
    stats.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between refreshes with --watch (default: 2)",
    )
    stats.add_argument(
        "--count", type=int, default=0, metavar="N", help="stop after N refreshes (implies --watch)"
    )

    verb("status", "this node's cluster view: members, sync lag, hits; local tiers", _status)
    verb("nodes", "the cluster's members: node, address, state, last heard", _nodes)

    lookup = verb("lookup", "where a prompt prefix is cached: here, and on which peers", _lookup)
    prompt = lookup.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--tokens", metavar="IDS", help="comma-separated token ids: 1,2,3,...")
    prompt.add_argument("--text", help="prompt text, tokenized with --tokenizer")
    lookup.add_argument(
        "--tokenizer",
        metavar="NAME",
        help="Hugging Face tokenizer (hub name or local directory) for --text; needs "
        "transformers (HF_HUB_OFFLINE=1 keeps it off the network)",
    )
    lookup.add_argument(
        "--model",
        help="namespace: model (and revision); omitted: the namespace this daemon keys its "
        "engines' KV events in, as their connectors said hello with (layout included)",
    )
    lookup.add_argument("--dtype", help="namespace: KV dtype (bfloat16); needs --model")
    lookup.add_argument("--layout", help="namespace: KV layout (default); needs --model")
    lookup.add_argument("--tp-rank", type=int, help="namespace: tensor-parallel rank (0)")
    lookup.add_argument("--tp-size", type=int, help="namespace: tensor-parallel size (1)")
    lookup.add_argument("--extra", help="namespace: extra discriminator (''); needs --model")
    lookup.add_argument(
        "--chunk-tokens",
        type=int,
        help="tokens per block, as the engines key them (default: the engines' with no "
        "--model, else 256, the connector's)",
    )

    evict = verb("evict", "remove blocks by namespace and/or key prefix (here by default)", _evict)
    evict.add_argument(
        "--namespace",
        default="",
        help="namespace label engines connect with, e.g. MODEL/bfloat16/default/"
        "tp0of1 (see `lookup`)",
    )
    evict.add_argument(
        "--key-prefix", default="", metavar="HEX", help="blocks whose hex key starts with HEX"
    )
    _where_flags(evict)

    flush = verb("flush", "remove every cached block (here by default); needs --yes", _flush)
    _where_flags(flush)
    flush.add_argument("--yes", action="store_true", help="really drop every block")

    drain = verb(
        "drain", "stop NODE taking blocks, hand its hot blocks to peers; it then exits", _drain
    )
    drain.add_argument("node", metavar="NODE", help="member name (see `shoal cache nodes`)")
    drain.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the hand-off (default: 120)",
    )

    keygen = verb("keygen", "create the CurveZMQ cluster keypair in DIR", keygen_command)
    keygen.add_argument("dir", metavar="DIR", help="directory for cluster.key and .key_secret")
    keygen.add_argument("--force", action="store_true", help="replace an existing keypair")
    role = keygen.add_mutually_exclusive_group()
    role.add_argument("--member", metavar="NODE", help="instead: a member's own keypair")
    role.add_argument("--operator", metavar="NAME", help="instead: an operator's own keypair")

    for parser in configured:  # last, so each verb's own options lead its usage line
        add_flags(parser, CacheConfig, "cache")


def _where_flags(parser: Any) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--node", metavar="NODE", help="act on this member instead of this node")
    where.add_argument("--all", action="store_true", help="act on this node and every member")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds a member may take to answer (default: 5)")  # fmt: skip


# -- plumbing shared by the verbs ------------------------------------------------------------


class _Exit(Exception):
    """End the command with ``code`` after printing ``message`` to stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> Any:
    from kvcache.config import CacheConfig

    return load_config(CacheConfig, "cache", flags=args)


def _command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn ``_Exit`` and refused requests into a message on stderr and an exit code."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from kvcache.errors import CacheError, CacheUnavailable, RequestRejected

        try:
            return fn(args)
        except _Exit as exc:
            message, code = str(exc), exc.code
        except CacheUnavailable as exc:  # a member beyond the local daemon
            message, code = str(exc), EXIT_UNREACHABLE
        except RequestRejected as exc:
            message, code = f"refused: {exc}", EXIT_FAILED
        except CacheError as exc:
            message, code = str(exc), EXIT_FAILED
        print(f"shoal cache {args.verb}: {message}", file=sys.stderr)
        return code

    return run


@contextlib.contextmanager
def _local(config: Any, verb: str) -> Iterator[Any]:
    """A client of the local daemon; unreachable is exit 3 with what to do about it."""
    from kvcache.client import CacheClient
    from kvcache.errors import CacheUnavailable

    try:
        with CacheClient(
            config.endpoint,
            name=f"shoal-cache-{verb}",
            role="operator",
            heartbeat=False,
            shm_dir=config.shm_dir,
        ) as client:
            yield client
    except CacheUnavailable as exc:
        start = (
            "start it with `shoal cache serve` (same --name, --runtime-dir or --config as "
            "this command)"
        )
        if not config.socket_path.exists():
            raise _Exit(
                EXIT_UNREACHABLE, f"no cache daemon at {config.endpoint}; {start}"
            ) from None
        raise _Exit(
            EXIT_UNREACHABLE,
            f"the cache daemon at {config.endpoint} does not answer ({exc}); "
            f"is it running? If not, {start}",
        ) from None


def _admin(config: Any, address: str, timeout_s: float) -> Any:
    from kvcache.cluster.admin import ClusterAdmin
    from kvcache.cluster.security import read_operator_token
    from kvcache.errors import CacheError, CacheUnavailable

    try:
        return ClusterAdmin(
            address,
            curve_dir=config.cluster_curve_dir,
            curve_key=config.cluster_curve_key,
            token=read_operator_token(config.runtime_path),  # operator verbs without Curve
            timeout_s=timeout_s,
        )
    except CacheUnavailable:
        raise
    except CacheError as exc:  # the key directory
        raise _Exit(EXIT_USAGE, str(exc)) from None


@dataclass(frozen=True, slots=True)
class _Target:
    node: str
    address: str  # the member's cluster address; "" = the local daemon, over ipc


def _targets(
    cluster: dict[str, Any], config: Any, node: str | None, everywhere: bool
) -> list[_Target]:
    """The daemons a command acts on (from this node's view ``cluster``): this one, the
    member ``node``, or all of them."""
    own = str(cluster.get("node") or config.name)
    members = {str(m["node"]): str(m["address"]) for m in cluster.get("members", [])}
    if everywhere:
        return [_Target(own, ""), *(_Target(n, a) for n, a in sorted(members.items()))]
    if node is None or node == own:
        return [_Target(own, "")]
    if node not in members:
        known = ", ".join([f"{own} (this node)", *sorted(members)])
        hint = "" if cluster.get("enabled") else "; this daemon runs without a cluster"
        raise _Exit(EXIT_USAGE, f"unknown node {node!r}; known members: {known}{hint}")
    return [_Target(node, members[node])]


def _on_each(
    client: Any,
    config: Any,
    timeout_s: float,
    targets: Sequence[_Target],
    local: Callable[[Any], int],
    remote: Callable[[Any], int],
) -> tuple[list[tuple[_Target, int]], list[tuple[_Target, str]]]:
    """Run one operation on every target; unreachable members are collected, not fatal."""
    from kvcache.errors import CacheUnavailable

    done: list[tuple[_Target, int]] = []
    failed: list[tuple[_Target, str]] = []
    for target in targets:
        if not target.address:
            done.append((target, local(client)))
            continue
        try:
            with _admin(config, target.address, timeout_s) as admin:
                done.append((target, remote(admin)))
        except CacheUnavailable as exc:
            failed.append((target, str(exc)))
    return done, failed


def _report_counts(
    args: argparse.Namespace,
    what: str,
    done: list[tuple[_Target, int]],
    failed: list[tuple[_Target, str]],
) -> int:
    total = sum(count for _, count in done)
    if args.json:
        nodes = [{"node": t.node, "address": t.address, what: n} for t, n in done]
        unreachable = [{"node": t.node, "address": t.address, "error": e} for t, e in failed]
        print(json.dumps({"nodes": nodes, "total": total, "unreachable": unreachable}))
    else:
        rows = [[t.node, t.address or "(this node)", str(n)] for t, n in done]
        rows.append(["total", "", str(total)])
        print("\n".join(table(["NODE", "ADDRESS", what.upper()], rows, "<<>")))
    for target, error in failed:
        print(f"shoal cache {args.verb}: {target.node} unreachable: {error}", file=sys.stderr)
    return EXIT_UNREACHABLE if failed else 0


# -- serve, demo ----------------------------------------------------------------------------


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


# -- inspection -------------------------------------------------------------------------------


@_command
def _stats(args: argparse.Namespace) -> int:
    config = _config(args)
    watch = args.watch or args.count > 0
    if args.interval <= 0 or args.count < 0:
        raise _Exit(EXIT_USAGE, "--interval must be positive and --count not negative")
    clear = watch and not args.json and sys.stdout.isatty()
    with _local(config, "stats") as client, contextlib.suppress(KeyboardInterrupt):
        # Ctrl-C is the normal way to end --watch: exit 0, not 130.
        for refresh in itertools.count(1):
            stats = client.stats()
            if args.json:
                print(json.dumps(stats), flush=True)
            else:
                if clear:
                    print("\x1b[H\x1b[2J", end="")
                if watch:
                    print(time.strftime("%H:%M:%S"), f"(every {args.interval:g}s; Ctrl-C stops)")
                print("\n".join(stats_lines(stats)), flush=True)
            if not watch or refresh == args.count:
                break
            time.sleep(args.interval)
    return 0


@_command
def _status(args: argparse.Namespace) -> int:
    config = _config(args)
    with _local(config, "status") as client:
        cluster = client.cluster_status()
        stats = client.stats()
    if args.json:
        print(json.dumps({"cluster": cluster, "local": stats}))
    else:
        print("\n".join(status_lines(cluster, stats)))
    return 0


@_command
def _nodes(args: argparse.Namespace) -> int:
    config = _config(args)
    with _local(config, "nodes") as client:
        cluster = client.cluster_status()
    fields = ("node", "address", "state", "last_heard_s")
    own = {"node": config.name, "address": "", "state": "active", **cluster, "last_heard_s": 0.0}
    rows = [{f: member[f] for f in fields} | {"self": member is own}
            for member in [own, *cluster.get("members", [])]]  # fmt: skip
    if args.json:
        print(json.dumps(rows))
        return 0
    if not cluster.get("enabled"):
        print("cluster: disabled (this daemon runs alone; --cluster-port turns it on)")
    cells = [[r["node"], r["address"] or "-", r["state"], _heard(r)] for r in rows]
    print("\n".join(table(["NODE", "ADDRESS", "STATE", "HEARD"], cells, "<<<<")))
    return 0


@_command
def _lookup(args: argparse.Namespace) -> int:
    from kvcache.client import ClusterLookup
    from kvcache.keys import chain_keys

    config = _config(args)
    parts = (args.dtype, args.layout, args.tp_rank, args.tp_size, args.extra)
    try:
        if args.model is None and any(part is not None for part in parts):
            raise ValueError("--dtype, --layout, --tp-rank, --tp-size and --extra need --model")
        if args.chunk_tokens is not None and args.chunk_tokens <= 0:
            raise ValueError(f"--chunk-tokens must be positive, got {args.chunk_tokens}")
        namespace = None if args.model is None else _given_namespace(args)
        tokens = _tokens(args)
        if any(not 0 <= token < 2**32 for token in tokens):
            raise ValueError("token ids must be in [0, 2**32)")
    except ValueError as exc:
        raise _Exit(EXIT_USAGE, str(exc)) from None
    with _local(config, "lookup") as client:
        chunk_tokens = args.chunk_tokens
        if namespace is None:  # the engines' own, as the daemon learned it
            namespace, learned_chunk = _engines_namespace(client.cluster_status())
            chunk_tokens = chunk_tokens or learned_chunk
        chunk_tokens = chunk_tokens or 256
        keys = chain_keys(namespace, tokens, chunk_tokens)
        found = client.locate(keys) if keys else ClusterLookup(0, 0, ())
    result = {
        "namespace": namespace.label(),
        "num_tokens": len(tokens),
        "chunk_tokens": chunk_tokens,
        "num_blocks": len(keys),
        "local_blocks": found.length,
        "remote_blocks": found.remote_length,
        "holders": [{"node": n, "address": a, "upto": u} for n, a, u in found.runs],
        "gpu": [{"engine": n, "upto": u} for n, u in found.gpu],
        "keys": [key.hex() for key in keys],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lookup_lines(result)))
    return 0


def _given_namespace(args: argparse.Namespace) -> Any:
    """The namespace ``--model`` and the other namespace flags name, with their defaults."""
    from kvcache.keys import Namespace

    return Namespace(
        args.model,
        "bfloat16" if args.dtype is None else args.dtype,
        "default" if args.layout is None else args.layout,
        args.tp_rank or 0,
        1 if args.tp_size is None else args.tp_size,
        args.extra or "",
    )


def _engines_namespace(cluster: dict[str, Any]) -> tuple[Any, int]:
    """The namespace and chunk size this daemon keys its engines' KV events in."""
    from kvcache.keys import Namespace

    engines = cluster.get("engines") or []
    learned = {(e.get("namespace", ""), e.get("chunk_tokens", 0)) for e in engines}
    if not learned:
        raise _Exit(
            EXIT_USAGE,
            "no --model, and this daemon follows no engine's KV events (--engine-events) "
            "to take the namespace from: give --model (and --layout ...)",
        )
    wire, chunk_tokens = min(learned)  # one: a daemon keys all its engines in one namespace
    namespace = Namespace.from_wire(str(wire))
    if namespace is None:
        raise _Exit(EXIT_FAILED, f"the daemon named no readable engine namespace: {wire!r}")
    return namespace, int(chunk_tokens)


def _tokens(args: argparse.Namespace) -> list[int]:
    """Token ids from ``--tokens`` or from ``--text`` through ``--tokenizer``."""
    if args.tokens is not None:
        try:
            return [int(t) for t in re.split(r"[,\s]+", args.tokens.strip()) if t]
        except ValueError:
            raise ValueError(
                f"--tokens wants comma-separated integers, got {args.tokens!r}"
            ) from None
    if not args.tokenizer:
        raise ValueError("--text needs --tokenizer NAME (a Hugging Face tokenizer)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(
            "--text needs the `transformers` package (pip install transformers); "
            "or pass token ids with --tokens"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load tokenizer {args.tokenizer!r}: {exc}") from None
    # Special tokens included, as an engine tokenizes a prompt it is sent.
    return [int(t) for t in tokenizer.encode(args.text)]


# -- operations -------------------------------------------------------------------------------


@_command
def _evict(args: argparse.Namespace) -> int:
    config = _config(args)
    if not args.namespace and not args.key_prefix:
        raise _Exit(EXIT_USAGE, "say what to evict: --namespace NS and/or --key-prefix HEX")
    prefix = args.key_prefix.lower()
    if not re.fullmatch(r"[0-9a-f]*", prefix):
        raise _Exit(EXIT_USAGE, f"--key-prefix must be hexadecimal, got {args.key_prefix!r}")
    with _local(config, "evict") as client:
        targets = _targets(client.cluster_status(), config, args.node, args.all)
        done, failed = _on_each(
            client,
            config,
            args.timeout,
            targets,
            lambda c: int(c.evict(args.namespace, prefix)),
            lambda a: int(a.evict(args.namespace, prefix)),
        )
    return _report_counts(args, "evicted", done, failed)


@_command
def _flush(args: argparse.Namespace) -> int:
    config = _config(args)
    if not args.yes:
        where = "every member" if args.all else (args.node or "this node")
        raise _Exit(EXIT_USAGE, f"refusing to drop every block on {where} without --yes")
    with _local(config, "flush") as client:
        targets = _targets(client.cluster_status(), config, args.node, args.all)
        done, failed = _on_each(
            client,
            config,
            args.timeout,
            targets,
            lambda c: int(c.flush()),
            lambda a: int(a.flush()),
        )
    return _report_counts(args, "flushed", done, failed)


@_command
def _drain(args: argparse.Namespace) -> int:
    from kvcache.client import CacheClient
    from kvcache.errors import CacheUnavailable

    config = _config(args)
    with _local(config, "drain") as client:
        cluster = client.cluster_status()
    if not cluster.get("enabled"):
        raise _Exit(EXIT_USAGE, "this daemon runs without a cluster: no peers to drain to")
    (target,) = _targets(cluster, config, args.node, everywhere=False)

    def drain() -> dict[str, Any]:  # runs in _waiting's thread, on its own connection
        if target.address:
            with _admin(config, target.address, args.timeout) as admin:
                return dict(admin.drain(args.timeout))
        with CacheClient(config.endpoint, name="shoal-cache-drain", role="operator",
                         heartbeat=False, shm_dir=config.shm_dir) as local:  # fmt: skip
            return local.drain(args.timeout)

    try:
        result = _waiting(drain, f"draining {target.node}")
    except CacheUnavailable as exc:  # reached a moment ago: no "start the daemon" advice
        raise _Exit(EXIT_UNREACHABLE, f"{target.node}: {exc}") from None
    except KeyboardInterrupt:
        raise _Exit(130, f"interrupted; {target.node} goes on draining and leaves when done "
                         "(`shoal cache nodes` shows it gone)") from None  # fmt: skip
    handed_off, peers = int(result["handed_off"]), [str(p) for p in result["peers"]]
    if args.json:
        print(json.dumps({"node": target.node, "handed_off": handed_off, "peers": peers}))
    elif peers:
        print(
            f"drained {target.node}: handed {handed_off} blocks to {', '.join(peers)}; "
            "it has left the cluster"
        )
    else:
        print(f"drained {target.node}: no live peers, nothing handed off; it has left the cluster")
    return 0


def _waiting(work: Callable[[], T], label: str) -> T:
    """Run ``work`` in a thread (its sockets its own); on a terminal, spin while it runs."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome.append((False, exc))

    # A daemon thread: Ctrl-C ends the command at once, abandoning the wait (not the drain).
    thread = threading.Thread(target=run, name="shoal-cache-wait", daemon=True)
    thread.start()
    spin = sys.stdout.isatty()
    started = time.monotonic()
    for frame in itertools.cycle("|/-\\"):
        thread.join(0.1)
        if not thread.is_alive():
            break
        if spin:
            print(f"\r{frame} {label} ({time.monotonic() - started:.0f}s)", end="", flush=True)
    if spin:
        print("\r\x1b[K", end="", flush=True)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


# -- rendering (pure) --------------------------------------------------------------------------


def size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def ago(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _heard(member: dict[str, Any]) -> str:
    return "(this node)" if member["self"] else f"{ago(member['last_heard_s'])} ago"


def hit_ratio(stats: dict[str, Any]) -> str:
    """hits / (hits + misses) over a heartbeat-shaped ``{tiers: [{hits}], misses}``."""
    hits = sum(int(t.get("hits", 0)) for t in stats.get("tiers", []))
    total = hits + int(stats.get("misses", 0))
    return f"{hits / total:.1%}" if total else "-"


def _started(epoch_ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ns / 1e9))


def _as_heartbeat(stats: dict[str, Any]) -> dict[str, Any]:
    """The local ``stats()`` in the shape peers' heartbeats carry."""
    tiers = [{"tier": t["tier"], "blocks": t["num_blocks"], "used": t["used_bytes"],
              "capacity": t["capacity_bytes"], "hits": t["hits"]}
             for t in stats["tiers"]]  # fmt: skip
    return {"tiers": tiers, "misses": stats["misses"]}


def stats_lines(stats: dict[str, Any]) -> list[str]:
    rows = [[t["tier"], str(t["num_blocks"]), size(t["used_bytes"]), size(t["capacity_bytes"]),
             f"{t['fragmentation']:.1%}", str(t["hits"]), str(t["evictions"])]
            for t in stats["tiers"]]  # fmt: skip
    return [
        f"daemon {stats['name']} (pid {stats['pid']}): {stats['num_sessions']} sessions, "
        f"{stats['num_leases']} leases, {stats['num_reservations']} reservations",
        *table(["TIER", "BLOCKS", "USED", "CAPACITY", "FRAG", "HITS", "EVICTED"], rows, "<>>>>>>"),
        f"misses {stats['misses']}, no-space {stats['no_space']}, "
        f"checksum failures {stats['checksum_failures']}",
    ]


def status_lines(cluster: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """This node's cluster view, one row per member (this node first), then local tiers."""
    disabled = "cluster: disabled (this daemon runs alone; --cluster-port turns it on)"
    if not cluster.get("enabled"):
        return [disabled, "", *engine_lines(cluster), *stats_lines(stats)]
    own = {key: cluster[key] for key in ("node", "address", "state", "epoch")} | {
        "num_blocks": sum(t["num_blocks"] for t in stats["tiers"]),
        "stats": _as_heartbeat(stats),
        "stream": "self",
    }
    members = [own, *cluster["members"]]
    tiers = list(dict.fromkeys(t["tier"] for m in members for t in m["stats"].get("tiers", [])))
    usage = [f"{t.upper()} USED/CAP" for t in tiers]
    headers = ["NODE", "ADDRESS", "STATE", "EPOCH (START)", "BLOCKS", *usage,
               "HIT RATIO", "LAG", "HEARD", "STREAM"]  # fmt: skip
    rows = [_member_row(member, tiers, peer=member is not own) for member in members]
    return [
        f"node {cluster['node']} at {cluster['address']}: {cluster['state']}, "
        f"epoch {cluster['epoch']} (started {_started(cluster['epoch'])}), seq {cluster['seq']}",
        f"{_count(len(cluster['members']), 'peer')}; {cluster['index_blocks']} peer blocks "
        f"indexed, {_count(cluster['gaps'], 'stream gap')} so far",
        "",
        *table(headers, rows, "<<<<>" + ">" * len(tiers) + ">>><"),
        "",
        *engine_lines(cluster),
        *stats_lines(stats),
    ]


def engine_lines(cluster: dict[str, Any]) -> list[str]:
    """This node's engines (vLLM KV events): connection, stream position, GPU keys."""
    engines = cluster.get("engines") or []
    if not engines:
        return []
    rows = [[e["stream"], e["endpoint"], "yes" if e["connected"] else "no",
             "replaying" if e["replaying"] else "-" if e["seq"] < 0 else str(e["seq"]),
             str(e["gpu_keys"]),
             str(e["gaps"]), str(e["resets"]), str(e["dropped"])]
            for e in engines]  # fmt: skip
    headers = ["ENGINE", "EVENTS FROM", "CONNECTED", "SEQ", "GPU KEYS", "GAPS", "RESETS",
               "DROPPED"]  # fmt: skip
    return [*table(headers, rows, "<<<>>>>>"), ""]


def _member_row(member: dict[str, Any], tiers: Sequence[str], *, peer: bool) -> list[str]:
    """One status row; sync lag is the batches announced (heartbeat seq) but not applied."""
    by_tier = {t["tier"]: t for t in member["stats"].get("tiers", [])}
    usage = [f"{size(by_tier[t]['used'])}/{size(by_tier[t]['capacity'])}" if t in by_tier
             else "-" for t in tiers]  # fmt: skip
    lag = str(member["published_seq"] - member["applied_seq"]) if peer else "-"
    heard = ago(member["last_heard_s"]) if peer else "-"
    ratio = hit_ratio(member["stats"]) if member["stats"] else "-"
    return [member["node"], member["address"], member["state"], _started(member["epoch"]),
            str(member["num_blocks"]), *usage, ratio, lag, heard, member["stream"]]  # fmt: skip


def lookup_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"namespace {result['namespace']}: {result['num_tokens']} tokens, "
        f"{result['num_blocks']} blocks of {result['chunk_tokens']} tokens",
        f"cached here:      {result['local_blocks']} leading blocks",
        f"with peers' help: {result['remote_blocks']} leading blocks",
    ]
    if result["num_blocks"] == 0:
        lines.append("(fewer tokens than one block: nothing to look up)")
    if result["holders"]:
        rows = [[h["node"], h["address"], str(h["upto"])] for h in result["holders"]]
        lines += ["", *table(["HOLDER", "ADDRESS", "UPTO"], rows, "<<>")]
    if result.get("gpu"):
        rows = [[g["engine"], str(g["upto"])] for g in result["gpu"]]
        lines += ["", *table(["ON ENGINE GPU", "UPTO"], rows, "<>")]
    return lines
