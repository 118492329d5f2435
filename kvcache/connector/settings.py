"""The connector's settings: ``kv_connector_extra_config`` keys, with ``SHOAL_CONNECTOR_*``
environment variables as the fallback and defaults last (the file of ``shoal cache serve``
is the daemon's, not the engine's; the engine's configuration is its ``--kv-transfer-config``).

=====================  ==========================================  =====================
key                    meaning                                     default
=====================  ==========================================  =====================
endpoint               the node daemon's engine socket             the daemon's default
chunk_tokens           tokens per Shoal chunk (multiple of         256 rounded up to a
                       vLLM's block size); equal on every engine   multiple of the block
                       that should share                           size
model_id               model identity in block keys (name it by    repo@resolved commit,
                       an immutable revision or weights id;        or dir@weights-digest
                       never a branch such as @main)               (connector.identity)
namespace_extra        anything else that changes KV bytes         ""
lookup_wait_ms         how long the scheduler waits inline for     1.0
                       lookups in one step (all requests of the
                       step together) before answering "not yet"
lookup_timeout_s       the lookup thread's daemon timeout          0.5
io_timeout_s           the workers' daemon timeout (load/save)     2.0
peer_fetch             fetch chunks peers hold before loading      true
save                   save computed chunks at all                 true
save_decode            also save chunks completed while decoding   true
retry_after_s          after the daemon failed, answer misses      1.0
                       without asking it for this long
=====================  ==========================================  =====================

A request can opt out of saving with ``kv_transfer_params={"shoal_save": false}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shoal.config import parse_bool

__all__ = ["ConnectorSettings"]


@dataclass(frozen=True, slots=True)
class ConnectorSettings:
    endpoint: str = ""
    chunk_tokens: int = 0  # 0: derived from the block size
    model_id: str = ""
    namespace_extra: str = ""
    lookup_wait_ms: float = 1.0
    lookup_timeout_s: float = 0.5
    io_timeout_s: float = 2.0
    peer_fetch: bool = True
    save: bool = True
    save_decode: bool = True
    retry_after_s: float = 1.0

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ConnectorSettings:
        """Parse ``kv_connector_extra_config`` (keys may carry a ``shoal_`` prefix);
        raises ``ValueError`` naming the key for an unknown key or a bad value."""
        environ = os.environ if environ is None else environ
        extra = dict(extra or {})
        values: dict[str, Any] = {}
        known = {f.name: f for f in fields(cls)}
        for raw_key, raw in extra.items():
            key = raw_key.removeprefix("shoal_")
            if key not in known:
                raise ValueError(
                    f"kv_connector_extra_config: unknown key {raw_key!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
            values[key] = raw
        for name in known:
            env = environ.get(f"SHOAL_CONNECTOR_{name.upper()}")
            if name not in values and env is not None:
                values[name] = env
        parsed = {name: _coerce(name, known[name].type, value) for name, value in values.items()}
        settings = cls(**parsed)
        if settings.chunk_tokens < 0:
            raise ValueError("kv_connector_extra_config: chunk_tokens must be positive")
        return settings

    def chunk_tokens_for(self, block_size: int) -> int:
        if self.chunk_tokens:
            return self.chunk_tokens
        return block_size * max(1, -(-256 // block_size))


def _coerce(name: str, kind: Any, value: Any) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            return parse_bool(value if isinstance(value, bool) else str(value))
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"kv_connector_extra_config: {name} must be a {kind}, got {value!r}"
        ) from None
