"""``shoal autoscale status``: a running controller's replicas and last decisions.

Reads ``GET /status`` (urllib: no event loop for one request). Prints a table, or the JSON
as is with ``--json``; exit 3 (``EXIT_UNREACHABLE``) when the controller cannot be reached.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from control.autoscale.config import read_token
from shoal.cli_format import EXIT_UNREACHABLE, EXIT_USAGE, table
from shoal.errors import ConfigError

__all__ = ["fetch_status", "render", "show"]


def fetch_status(url: str, timeout_s: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """The controller's ``/status``; ``OSError`` when it cannot be reached or read."""
    request = urllib.request.Request(url.rstrip("/") + "/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            data = json.loads(reply.read())
    except (urllib.error.URLError, json.JSONDecodeError, ValueError) as exc:
        raise OSError(str(exc)) from None
    if not isinstance(data, dict):
        raise OSError(f"{url}/status is not a JSON object")
    return data


def render(status: dict[str, Any]) -> list[str]:
    replicas = status.get("replicas") or {}
    lines = [
        f"target {status.get('target')}  policy {status.get('policy')}"
        f"{'  (dry run)' if status.get('dry_run') else ''}",
        f"replicas: spec {replicas.get('spec', '?')}  ready {replicas.get('ready', '?')}  "
        f"pending {replicas.get('pending', '?')}",
        "",
    ]

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    rows = []
    for record in status.get("decisions", [])[-10:]:
        decision = record.get("decision") or {}
        state = record.get("state") or {}
        rows.append(
            [
                f"{record.get('now_s', 0):.1f}",
                cell(state.get("ready")),
                cell(state.get("pending")),
                cell(decision.get("recommendation")),
                cell(decision.get("desired")),
                "yes" if decision.get("panic") else "",
                decision.get("bounds") or "",
                record.get("error") or decision.get("reason", ""),
            ]
        )
    headers = ["t_s", "ready", "pending", "recommend", "desired", "panic", "bounds", "reason"]
    return lines + table(headers, rows, ">>>>><<<")


def show(url: str, *, as_json: bool = False, token_file: str = "") -> int:
    try:
        token = read_token(token_file, "--token-file") if token_file else None
    except ConfigError as exc:
        print(f"shoal autoscale status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = fetch_status(url, token=token)
    except OSError as exc:
        print(f"shoal autoscale status: cannot reach {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(render(status)))
    return 0
