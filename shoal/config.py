"""Layered configuration shared by every component: defaults < file < environment < flags.

A component describes its settings once, as a frozen dataclass whose fields carry a help
text (``setting(default, "help")``). From that one description this module derives:

* command-line flags: field ``arena_bytes`` becomes ``--arena-bytes``;
* environment variables: ``SHOAL_<SECTION>_<FIELD>``, e.g. ``SHOAL_CACHE_ARENA_BYTES``;
* a TOML file section: ``[cache]`` with ``arena_bytes = "1GiB"`` (file named by
  ``--config`` or ``SHOAL_CONFIG``);
* the reference table in the README (``render_reference``).

Byte sizes accept ``4096``, ``64KiB``, ``1.5GiB``, ``500MB``; booleans accept
``1/0/true/false/yes/no/on/off``. A bad value raises ``ConfigError`` naming its source
(flag, variable or file) and the expected form. TOML was chosen over YAML because the
parser ships with Python (``tomllib``) and has no implicit typing surprises.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from shoal.errors import ConfigError

__all__ = [
    "add_flags",
    "default_runtime_dir",
    "is_loopback",
    "load_config",
    "parse_bool",
    "parse_rate",
    "parse_size",
    "read_secret",
    "render_reference",
    "setting",
]

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}  # fmt: skip


def default_runtime_dir() -> str:
    """Where daemons put their sockets: ``$XDG_RUNTIME_DIR/shoal-UID`` (or ``/tmp/...``)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"shoal-{os.getuid()}")


def setting(default: Any, help: str, *, size: bool = False) -> Any:
    """Declare one configuration field; ``size=True`` accepts human byte sizes."""
    return dataclasses.field(default=default, metadata={"help": help, "size": size})


def parse_size(text: str | int | float) -> int:
    """Parse ``"64KiB"``-style sizes (binary and decimal units) into bytes."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size; use e.g. 4096, 64KiB, 1.5GiB or 500MB")
    if isinstance(text, int | float):
        return int(text)
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size; use e.g. 4096, 64KiB, 1.5GiB or 500MB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "").lower()])


def parse_rate(text: str) -> float:
    """Parse ``"500MB/s"``-style rates (a size per second) into bytes per second."""
    return float(parse_size(text.strip().removesuffix("/s")))


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{text!r} is not a boolean; use true/false, yes/no, on/off or 1/0")


def _convert(field: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    kind = field.type if isinstance(field.type, type) else str(field.type)
    try:
        if field.metadata.get("size"):
            return parse_size(raw)
        if kind in (bool, "bool"):
            return parse_bool(raw)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in ("str | None", "Path | None") and raw in ("", None):
            return None
        if kind in (Path, "Path", "Path | None"):
            return Path(raw)
        return str(raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(section: str, name: str) -> str:
    return f"SHOAL_{section.upper()}_{name.upper()}"


def add_flags(parser: argparse.ArgumentParser, cls: type[Any], section: str) -> None:
    """Add one flag per field of ``cls``; unset flags stay absent from the namespace.

    Also ``--config FILE``, so the file can follow the verb (``shoal cache stats --config
    f``) as well as lead (``shoal --config f cache stats``, the top-level flag); given
    twice, the later wins. A parser that already has ``--config`` keeps its own.
    """
    group = parser.add_argument_group(f"{section} settings (also {_env(section, '<NAME>')})")
    with contextlib.suppress(argparse.ArgumentError):  # an earlier add_flags added it
        group.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="TOML configuration file (also SHOAL_CONFIG)",
        )
    for field in dataclasses.fields(cls):
        kind = field.type if isinstance(field.type, type) else str(field.type)
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        if kind in (bool, "bool"):
            group.add_argument(
                _flag(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                _flag(field.name), dest=field.name, default=argparse.SUPPRESS, help=help_text
            )


def load_config(
    cls: type[T],
    section: str,
    *,
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
) -> T:
    """Build ``cls`` from defaults, then the file section, then environment, then flags."""
    environ = os.environ if environ is None else environ
    flag_values = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    path = config_path or flag_values.get("config") or environ.get("SHOAL_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        file_values = document.get(section, {})
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(file_values) - set(fields)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {sorted(unknown)} in [{section}]; "
            f"valid keys: {sorted(fields)}"
        )
    values: dict[str, Any] = {}
    for name, field in fields.items():
        if name in flag_values:
            values[name] = _convert(field, flag_values[name], f"flag {_flag(name)}")
        elif _env(section, name) in environ:
            values[name] = _convert(field, environ[_env(section, name)], _env(section, name))
        elif name in file_values:
            values[name] = _convert(field, file_values[name], f"{path} [{section}] {name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section} settings: {exc}") from None


def render_reference(cls: type[Any], section: str) -> str:
    """A Markdown table of every setting: flag, variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        rows.append(
            f"| `{_flag(field.name)}` | `{_env(section, field.name)}` | `{field.default!r}` "
            f"| {field.metadata.get('help', '')} |"
        )
    return "\n".join(rows)


def read_secret(path: str | Path, flag: str) -> str:
    """The secret (a bearer token) in the file ``path``, surrounding whitespace dropped;
    ``ConfigError`` naming ``flag`` when the file cannot be read or holds nothing."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{flag} {path} is empty")
    return secret


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this host;
    a name other than localhost may resolve anywhere, so it is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
