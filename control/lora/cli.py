"""``shoal lora ...``: run the LoRA manager, or ask a running one.

::

    serve                           the manager in the foreground (LoraSettings flags)
    register NAME SOURCE --base-model M   fetch/check and register an adapter
    list                            registered adapters, where they are loaded, traffic
    load NAME [--engine URL]        load now (pinned there until unload)
    unload NAME [--engine URL]      unload now (from every engine without --engine)
    remove NAME                     unload everywhere and forget it
    status                          engines, adapters, load failures, last rounds

Client verbs take ``--url`` (default http://127.0.0.1:8092), ``--token-file`` (the
manager's ``--auth-token-file``) and ``--json`` (the server's JSON as is). Exit codes
(``shoal.cli_format``): 0 success; 1 the manager refused (the message says why: unknown
adapter, no engine, corrupt files); 2 bad flags or settings; 3 the manager could not be
reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from shoal.config import add_flags, load_config

__all__ = ["register", "request", "settings_from_args"]

DEFAULT_URL = "http://127.0.0.1:8092"


def register(subparsers: Any) -> None:
    from control.lora.config import LoraSettings

    group = subparsers.add_parser(
        "lora",
        help="LoRA adapters placed on engines by traffic",
        description="Register LoRA adapters, place them on engines by traffic, load on demand.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    serve = verbs.add_parser("serve", help="run the manager",
                             description="Run the LoRA manager's loop and HTTP API.")  # fmt: skip
    add_flags(serve, LoraSettings, "lora")
    serve.set_defaults(func=_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        verb: argparse.ArgumentParser = verbs.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + "."
        )
        verb.add_argument("--url", default=DEFAULT_URL, help="the manager (default %(default)s)")
        verb.add_argument(
            "--token-file", default="", help="the manager's --auth-token-file, if it has one"
        )
        verb.add_argument("--json", action="store_true", help="print JSON for scripts")
        return verb

    reg = client("register", "register an adapter (fetched or checked now)")
    reg.add_argument("name", help="the model name clients will send")
    reg.add_argument("source", help="a local folder, s3://bucket/prefix or http(s)://host/prefix")
    reg.add_argument("--base-model", required=True, help="the engines' served base model")
    reg.set_defaults(func=_register)
    client("list", "registered adapters and where they are loaded").set_defaults(func=_list)
    for name, help in (("load", "load an adapter now (pinned there)"),
                       ("unload", "unload an adapter now")):  # fmt: skip
        verb = client(name, help)
        verb.add_argument("name")
        verb.add_argument("--engine", default="", help="this engine's URL (default: chosen)")
        verb.set_defaults(func=_load if name == "load" else _unload)
    remove = client("remove", "unload an adapter everywhere and forget it")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)
    client("status", "the manager's engines, adapters and last rounds").set_defaults(func=_status)


def settings_from_args(args: argparse.Namespace) -> Any:
    from control.lora.config import LoraSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "verb", "component")}
    return load_config(LoraSettings, "lora", flags=flags)


def _serve(args: argparse.Namespace) -> int:
    from control.lora.server import serve
    from shoal.logs import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    return int(serve(settings))


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request(url: str, method: str, path: str, body: Any = None, token: str | None = None,
            timeout_s: float = 120.0) -> Any:  # fmt: skip
    """One call to the manager: its JSON; ``Refused`` for an error status, ``OSError``
    when it cannot be reached or answers something else than JSON."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.loads(exc.read()).get("error", exc.reason))
        except (ValueError, AttributeError):
            message = str(exc.reason)
        raise Refused(exc.code, message) from None
    except (urllib.error.URLError, ValueError) as exc:
        raise OSError(str(exc)) from None


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The manager's answer, or an exit code after printing why."""
    from shoal.cli_format import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
    from shoal.config import read_secret
    from shoal.errors import ConfigError

    where = f"shoal lora {args.verb}"
    try:
        token = read_secret(args.token_file, "--token-file") if args.token_file else None
    except ConfigError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return _Exit(EXIT_USAGE)
    try:
        return request(args.url, method, path, body, token)
    except Refused as exc:
        print(f"{where}: {exc} (HTTP {exc.status})", file=sys.stderr)
        return _Exit(EXIT_FAILED)
    except OSError as exc:
        print(f"{where}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return _Exit(EXIT_UNREACHABLE)


class _Exit(int):
    """An exit code standing in for an answer."""


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _done(args: argparse.Namespace, answer: Any, text: str) -> int:
    if isinstance(answer, _Exit):
        return int(answer)
    print(json.dumps(answer, indent=2) if args.json else text.format(**answer))
    return 0


def _engines(answer: Any) -> str:
    return ", ".join(answer.get("engines", [])) or "none"


def _register(args: argparse.Namespace) -> int:
    from control.lora.sources import is_remote, local_path

    # a relative folder means this shell's, not the manager's working directory
    source = args.source if is_remote(args.source) else str(local_path(args.source))
    body = {"name": args.name, "base_model": args.base_model, "source": source}
    answer = _call(args, "POST", "/v1/adapters", body)
    return _done(args, answer, "registered {name} (base {base_model}) at {path}")


def _load(args: argparse.Namespace) -> int:
    body = {"engine": args.engine} if args.engine else {}
    answer = _call(args, "POST", f"/v1/adapters/{_quoted(args.name)}/load", body)
    if isinstance(answer, _Exit):
        return int(answer)
    return _done(args, answer, f"{args.name} loaded on {_engines(answer)}")


def _unload(args: argparse.Namespace) -> int:
    body = {"engine": args.engine} if args.engine else {}
    answer = _call(args, "POST", f"/v1/adapters/{_quoted(args.name)}/unload", body)
    if isinstance(answer, _Exit):
        return int(answer)
    return _done(args, answer, f"{args.name} unloaded from {_engines(answer)}")


def _remove(args: argparse.Namespace) -> int:
    answer = _call(args, "DELETE", f"/v1/adapters/{_quoted(args.name)}")
    if isinstance(answer, _Exit):
        return int(answer)
    return _done(args, answer, f"{args.name} removed (unloaded from {_engines(answer)})")


def _adapter_rows(adapters: list[dict[str, Any]]) -> list[str]:
    from shoal.cli_format import table

    rows = [
        [
            a.get("name", ""),
            a.get("base_model", ""),
            f"{a.get('rate', 0):.2f}",
            "-" if a.get("idle_s") is None else f"{a['idle_s']:.0f}",
            ", ".join(a.get("engines", [])) or "-",
            ", ".join(a.get("pinned", [])) or "",
            a.get("source", ""),
        ]
        for a in adapters
    ]
    headers = ["name", "base", "req/s", "idle_s", "engines", "pinned", "source"]
    return table(headers, rows, "<<>><<<")


def _list(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", "/v1/adapters")
    if isinstance(answer, _Exit):
        return int(answer)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print("\n".join(_adapter_rows(answer.get("adapters", []))))
    return 0


def _status(args: argparse.Namespace) -> int:
    from shoal.cli_format import table

    answer = _call(args, "GET", "/status")
    if isinstance(answer, _Exit):
        return int(answer)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    rows = [
        [e["url"], "yes" if e["healthy"] else "no", e.get("base_model", ""),
         f"{len(e.get('loaded', []))}/{e.get('budget', '?')}", ", ".join(e.get("loaded", [])),
         e.get("error", "")]
        for e in answer.get("engines", [])
    ]  # fmt: skip
    lines = table(["engine", "healthy", "base", "held", "adapters", "error"], rows, "<<<><<")
    lines += ["", *_adapter_rows(answer.get("adapters", []))]
    failures = answer.get("failures", [])
    if failures:
        lines += ["", "load failures:"] + [
            f"  {f['adapter']} on {f['engine']}: {f['count']} in a row, retry in "
            f"{f['retry_in_s']:.0f} s"
            for f in failures
        ]
    print("\n".join(lines))
    return 0
