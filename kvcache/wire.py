"""Msgpack framing shared by Shoal's wire protocols (engine↔daemon, daemon↔daemon).

Each protocol module (``kvcache.messages``, ``kvcache.cluster.messages``) defines its
messages as frozen dataclasses; this module turns frames into validated field values and
back. A field is validated against its annotation (kept as a string by ``__future__``
annotations), so adding a field to a message is one line and can never skip validation:
an annotation with no validator is an ``AssertionError`` at the first decode.

Every failure is a ``ProtocolError`` whose message names the message, the field and what
was expected, and whose ``code`` is the error code a server answers with.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import msgpack

from kvcache.errors import ProtocolError
from kvcache.keys import KEY_BYTES

__all__ = [
    "check_field",
    "decode_fields",
    "decode_reply",
    "encode_error",
    "encode_reply",
    "pack",
    "peek_id",
    "unpack_map",
]

_INT = int
_NUMBER = (int, float)


def pack(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def unpack_map(frame: bytes | memoryview, what: str, version: int) -> dict[str, Any]:
    """Decode one msgpack map and check its ``v`` (version) field."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(body).__name__}")
    if type(body.get("v")) is not int or body["v"] != version:  # True == 1, 1.0 == 1
        raise ProtocolError(
            f"{what} has protocol version {body.get('v')!r}; expected {version}", "version"
        )
    return body


def _is_count(value: Any) -> bool:
    return isinstance(value, _INT) and not isinstance(value, bool) and value >= 0


def check_field(value: Any, annotation: str, name: str, what: str) -> Any:
    """Validate one field value against its annotation; returns it unchanged."""
    ok: bool
    if annotation == "int":
        ok = _is_count(value)
    elif annotation == "float":
        ok = isinstance(value, _NUMBER) and not isinstance(value, bool)
    elif annotation == "str":
        ok = isinstance(value, str)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "bytes":
        ok = isinstance(value, bytes)
    elif annotation == "bytes | None":
        ok = value is None or (isinstance(value, bytes) and len(value) == KEY_BYTES)
    elif annotation == "list[int]":
        ok = isinstance(value, list) and all(_is_count(v) for v in value)
    elif annotation == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif annotation == "dict[str, Any]":
        ok = isinstance(value, dict)
    else:  # pragma: no cover - a new field type without a validator is a bug here
        raise AssertionError(f"no validator for annotation {annotation!r}")
    if not ok:
        raise ProtocolError(
            f"{what}: field {name!r} must be {annotation}, got {type(value).__name__}"
        )
    if name == "keys" and len(value) % KEY_BYTES:
        raise ProtocolError(f"{what}: keys must be a multiple of {KEY_BYTES} bytes")
    return value


def decode_fields(cls: type[Any], body: dict[str, Any], what: str) -> dict[str, Any]:
    """The validated constructor arguments of dataclass ``cls`` taken from ``body``."""
    values = {}
    for f in fields(cls):
        if f.name not in body:
            raise ProtocolError(f"{what}: missing field {f.name!r}")
        values[f.name] = check_field(body[f.name], str(f.type), f.name, what)
    return values


def encode_reply(version: int, request_id: int, **values: Any) -> bytes:
    return pack({"v": version, "id": request_id, "ok": True, **values})


def encode_error(version: int, request_id: int, code: str, message: str) -> bytes:
    return pack({"v": version, "id": request_id, "ok": False, "code": code, "error": message})


def decode_reply(frame: bytes | memoryview, what: str, version: int) -> dict[str, Any]:
    """Parse a reply frame into its map; the caller checks ``ok`` and its fields."""
    body = unpack_map(frame, what, version)
    if type(body.get("id")) is not int or not isinstance(body.get("ok"), bool):  # not a bool id
        raise ProtocolError(f"{what} lacks an integer 'id' or a boolean 'ok'")
    return body


def peek_id(frame: bytes | memoryview) -> int:
    """Best-effort request id of a frame that failed to decode (0 if unknown)."""
    try:
        body = msgpack.unpackb(frame, raw=False)
    except (ValueError, msgpack.UnpackException, TypeError):
        return 0
    if isinstance(body, dict) and isinstance(body.get("id"), int):
        return int(body["id"])
    return 0
