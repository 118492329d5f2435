"""One structured log format for every Shoal daemon: JSON lines on stderr.

Each record carries ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg`` and any
``extra={...}`` fields passed by the caller, so operators can grep or ship the logs
without a parser per component. ``--log-format text`` gives a human format instead.

One logger tree: every module logs through ``logging.getLogger("shoal." + __name__)``
(``shoal.kvcache.daemon``, ``shoal.loader.sidecar.server``, ...), so an application
embedding Shoal configures all of it at ``shoal`` and any part at its package
(``tests/unit/test_logger_names.py`` keeps every module to that form).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from typing import Any

__all__ = ["JsonFormatter", "setup_logging"]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger once for a daemon process."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
