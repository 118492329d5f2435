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

import threading
from collections.abc import Callable
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
_INT_ONLY = {int}  # exactly int: bool (a subclass) and msgpack's other types are refused
_NUMBER = (int, float)


_local = threading.local()


def pack(body: dict[str, Any]) -> bytes:
    """One msgpack frame. A ``Packer`` kept per thread (``packb`` builds one per call: a
    third of a small reply's encoding, issue 17); per thread, because a Packer is not
    thread-safe and a client packs heartbeats on a thread of their own."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    packed: bytes = packer.pack(body)  # resets itself when packing fails
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


def _are_counts(values: list[Any]) -> bool:
    """Every item a non-negative ``int`` (not a bool), checked in C-speed passes: a
    reserve's sizes or a commit's checksums are one list of up to thousands (issue 17)."""
    return not values or (set(map(type, values)) == _INT_ONLY and min(values) >= 0)


_VALIDATORS: dict[str, Callable[[Any], bool]] = {
    "int": _is_count,
    "float": lambda v: isinstance(v, _NUMBER) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "bytes": lambda v: isinstance(v, bytes),
    "bytes | None": lambda v: v is None or (isinstance(v, bytes) and len(v) == KEY_BYTES),
    "list[int]": lambda v: isinstance(v, list) and _are_counts(v),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
}


def _validator(annotation: str) -> Callable[[Any], bool]:
    validator = _VALIDATORS.get(annotation)
    if validator is None:  # pragma: no cover - a new field type without a validator is a bug
        raise AssertionError(f"no validator for annotation {annotation!r}")
    return validator


def check_field(value: Any, annotation: str, name: str, what: str) -> Any:
    """Validate one field value against its annotation; returns it unchanged."""
    return _checked(value, _validator(annotation), annotation, name, what)


def _checked(
    value: Any, validator: Callable[[Any], bool], annotation: str, name: str, what: str
) -> Any:
    if not validator(value):
        raise ProtocolError(
            f"{what}: field {name!r} must be {annotation}, got {type(value).__name__}"
        )
    if name == "keys" and len(value) % KEY_BYTES:
        raise ProtocolError(f"{what}: keys must be a multiple of {KEY_BYTES} bytes")
    return value


_FieldSpecs = tuple[tuple[str, str, Callable[[Any], bool]], ...]
_SPECS: dict[type[Any], _FieldSpecs] = {}  # one entry per message class


def _field_specs(cls: type[Any]) -> _FieldSpecs:
    """(name, annotation, validator) of each field of message class ``cls``, read once
    per class: ``dataclasses.fields`` costs microseconds a call, on every request."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = _SPECS[cls] = tuple((f.name, str(f.type), _validator(str(f.type)))
                                    for f in fields(cls))  # fmt: skip
    return specs


def decode_fields(cls: type[Any], body: dict[str, Any], what: str) -> dict[str, Any]:
    """The validated constructor arguments of dataclass ``cls`` taken from ``body``."""
    values = {}
    for name, annotation, validator in _field_specs(cls):
        if name not in body:
            raise ProtocolError(f"{what}: missing field {name!r}")
        values[name] = _checked(body[name], validator, annotation, name, what)
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
