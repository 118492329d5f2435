"""The fake backend's TOML files: read, validate, and edit them atomically.

The schema is AIBrix's NVML mock (ai-accelerator-tool ``hack/gpu_mock_conf.toml``), so one
fault file serves both tools, extended with the readings Shoal checks that AIBrix lacks::

    version = "0.1.0"
    [gpus]
    card_count = 4              # node level, 0..64
    nvml_init_error = 9         # nvmlInit's return value (0 = none): NVML unavailable
    [gpus.0]                    # one card; cards not listed are healthy A100-like cards
    remapping_pending = true
    dram_ue = 7
    xids = [79]                 # Shoal: XIDs delivered once each through wait_xid
    temperature = 95            # Shoal: + slowdown_temp, shutdown_temp
    throttle_reasons = ["hw_slowdown"]   # Shoal: names or an NVML bitmask
    nvlink_errors = [0, 150]    # Shoal: CRC+replay+recovery per link
    fail_read = true            # Shoal: the GPU fell off the bus (every read fails)

AIBrix's keys: device_name, arch, pci, uuid, link_gen (current), link_width_current,
link_width_max, nvlink_active, remapping_failure, remapping_pending, sram_ue, dram_ue,
dram_ce, retired_page_sbe/dbe/pending, uncorrectable_agg_l1/l2/reg. Shoal's: link_gen_max,
ecc_volatile_sbe/dbe, ecc_aggregate_sbe/dbe, xids, temperature, slowdown_temp,
shutdown_temp, throttle_reasons, nvlink_errors, fail_read.

Invariant: ``parse`` accepts exactly this schema — an unknown key, a wrong type or a value
out of bounds raises ``MockFormatError`` naming the file and the key (AIBrix does not
sanitize; a typo there silently mocks nothing, here it is an error). ``inject`` edits the
raw TOML document (keeping keys it does not touch), validates the result with ``parse``
and replaces the file atomically (a temporary file in the same folder, then
``os.replace``), so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from control.health.checks import THROTTLE_REASONS
from control.health.errors import MockFormatError
from control.health.types import GpuSnapshot

__all__ = [
    "INJECTIONS",
    "MAX_CARDS",
    "Injection",
    "MockCard",
    "MockConfig",
    "apply_injection",
    "inject",
    "load",
    "loads",
    "parse",
    "to_snapshot",
]

MAX_CARDS = 64
MAX_LINKS = 36  # NVML_NVLINK_MAX_LINKS
MAX_XIDS = 1024
_COUNT_MAX = 2**40


@dataclass(frozen=True, slots=True)
class MockCard:
    """One card's readings; the defaults are a healthy A100 SXM4 80GB."""

    device_name: str = "NVIDIA A100-SXM4-80GB"
    arch: int = 7  # NVML_DEVICE_ARCH_AMPERE
    pci: str = ""
    uuid: str = ""
    link_gen: int = 4
    link_gen_max: int = 4
    link_width_current: int = 16
    link_width_max: int = 16
    nvlink_active: tuple[bool, ...] = (True,) * 12
    nvlink_errors: tuple[int, ...] = (0,) * 12
    remapping_failure: bool = False
    remapping_pending: bool = False
    sram_ue: int = 0
    dram_ue: int = 0
    dram_ce: int = 0
    retired_page_sbe: int = 0
    retired_page_dbe: int = 0
    retired_page_pending: bool = False
    uncorrectable_agg_l1: int = 0
    uncorrectable_agg_l2: int = 0
    uncorrectable_agg_reg: int = 0
    ecc_volatile_sbe: int = 0
    ecc_volatile_dbe: int = 0
    ecc_aggregate_sbe: int = 0
    ecc_aggregate_dbe: int = 0
    xids: tuple[int, ...] = ()
    temperature: int = 35
    slowdown_temp: int = 89
    shutdown_temp: int = 92
    throttle_reasons: int = 0
    fail_read: bool = False


@dataclass(frozen=True, slots=True)
class MockConfig:
    version: str = "0.1.0"
    card_count: int = 8
    nvml_init_error: int = 0
    cards: Mapping[int, MockCard] = field(default_factory=dict)

    def card(self, index: int) -> MockCard:
        """Card ``index`` as listed, or a healthy one with an id derived from the index."""
        listed = self.cards.get(index, MockCard())
        return replace(
            listed,
            pci=listed.pci or f"00000000:{0x10 + index:02X}:00.0",
            uuid=listed.uuid or f"GPU-00000000-0000-4000-8000-{index:012d}",
        )


# key -> (kind, max); kinds: int, bool, str, bools, ints, throttle
_CARD_KEYS: dict[str, tuple[str, int]] = {
    "device_name": ("str", 256),
    "arch": ("int", 64),
    "pci": ("str", 64),
    "uuid": ("str", 128),
    "link_gen": ("int", 16),
    "link_gen_max": ("int", 16),
    "link_width_current": ("int", 64),
    "link_width_max": ("int", 64),
    "nvlink_active": ("bools", MAX_LINKS),
    "nvlink_errors": ("ints", MAX_LINKS),
    "remapping_failure": ("bool", 0),
    "remapping_pending": ("bool", 0),
    "retired_page_pending": ("bool", 0),
    "fail_read": ("bool", 0),
    "xids": ("ints", MAX_XIDS),
    "temperature": ("int", 200),
    "slowdown_temp": ("int", 200),
    "shutdown_temp": ("int", 200),
    "throttle_reasons": ("throttle", 0),
    **{
        name: ("int", _COUNT_MAX)
        for name in (
            "sram_ue",
            "dram_ue",
            "dram_ce",
            "retired_page_sbe",
            "retired_page_dbe",
            "uncorrectable_agg_l1",
            "uncorrectable_agg_l2",
            "uncorrectable_agg_reg",
            "ecc_volatile_sbe",
            "ecc_volatile_dbe",
            "ecc_aggregate_sbe",
            "ecc_aggregate_dbe",
        )
    },
}
_NODE_KEYS = ("card_count", "nvml_init_error")


def load(path: Path) -> MockConfig:
    """Read and validate ``path``; ``MockFormatError`` for anything wrong with it."""
    return parse(_read_doc(path), str(path))


def loads(data: bytes, source: str) -> MockConfig:
    """Validate a file's bytes (``source`` names it in errors)."""
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MockFormatError(f"{source}: not valid TOML: {exc}") from None
    return parse(doc, source)


def parse(doc: Mapping[str, Any], source: str) -> MockConfig:
    def bad(key: str, why: str) -> MockFormatError:
        return MockFormatError(f"{source}: {key}: {why}")

    for key in doc:
        if key not in ("version", "gpus"):
            raise bad(key, "unknown key (expected version and [gpus])")
    version = doc.get("version", "0.1.0")
    if not isinstance(version, str):
        raise bad("version", "must be a string")
    gpus = doc.get("gpus", {})
    if not isinstance(gpus, Mapping):
        raise bad("gpus", "must be a table")
    card_count = _int(gpus.get("card_count", 8), MAX_CARDS, "gpus.card_count", bad)
    init_error = _int(gpus.get("nvml_init_error", 0), 999, "gpus.nvml_init_error", bad)
    cards: dict[int, MockCard] = {}
    for key, value in gpus.items():
        if key in _NODE_KEYS:
            continue
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 3):
            raise bad(
                f"gpus.{key}", f"unknown key (expected {', '.join(_NODE_KEYS)} or a card index)"
            )
        index = int(key)
        if index >= card_count:
            raise bad(f"gpus.{key}", f"card index beyond card_count = {card_count}")
        if not isinstance(value, Mapping):
            raise bad(f"gpus.{key}", "must be a table")
        cards[index] = _card(value, f"gpus.{key}", bad)
    return MockConfig(version, card_count, init_error, cards)


def _card(table: Mapping[str, Any], where: str, bad: Any) -> MockCard:
    values: dict[str, Any] = {}
    for key, value in table.items():
        spec = _CARD_KEYS.get(key)
        if spec is None:
            raise bad(f"{where}.{key}", "unknown key")
        kind, top = spec
        name = f"{where}.{key}"
        if kind == "int":
            values[key] = _int(value, top, name, bad)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise bad(name, "must be true or false")
            values[key] = value
        elif kind == "str":
            if not isinstance(value, str) or len(value) > top:
                raise bad(name, f"must be a string of at most {top} characters")
            values[key] = value
        elif kind == "bools":
            if not isinstance(value, list) or len(value) > top:
                raise bad(name, f"must be a list of at most {top} booleans")
            if not all(isinstance(v, bool) for v in value):
                raise bad(name, "must hold only true or false")
            values[key] = tuple(value)
        elif kind == "ints":
            if not isinstance(value, list) or len(value) > top:
                raise bad(name, f"must be a list of at most {top} integers")
            values[key] = tuple(_int(v, _COUNT_MAX, name, bad) for v in value)
        else:
            values[key] = _throttle(value, name, bad)
    return MockCard(**values)


def _int(value: Any, top: int, name: str, bad: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, "must be an integer")
    if not 0 <= value <= top:
        raise bad(name, f"must be in [0, {top}]")
    return value


def _throttle(value: Any, name: str, bad: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _int(value, 0xFFFF_FFFF, name, bad)
    if not isinstance(value, list):
        raise bad(name, "must be a bitmask or a list of reason names")
    mask = 0
    for reason in value:
        if reason not in THROTTLE_REASONS:
            raise bad(name, f"unknown reason {reason!r} (one of {', '.join(THROTTLE_REASONS)})")
        mask |= THROTTLE_REASONS[reason]
    return mask


def to_snapshot(config: MockConfig, index: int) -> GpuSnapshot:
    """What a backend reads from card ``index`` (the file's names mapped onto NVML's)."""
    c = config.card(index)
    return GpuSnapshot(
        index=index,
        uuid=c.uuid,
        name=c.device_name,
        pci_bus_id=c.pci,
        architecture=c.arch,
        link_gen_current=c.link_gen,
        link_gen_max=c.link_gen_max,
        link_width_current=c.link_width_current,
        link_width_max=c.link_width_max,
        ecc_volatile_sbe=c.ecc_volatile_sbe,
        ecc_volatile_dbe=c.ecc_volatile_dbe,
        ecc_aggregate_sbe=c.ecc_aggregate_sbe,
        ecc_aggregate_dbe=c.ecc_aggregate_dbe,
        sram_ue=c.sram_ue,
        dram_ue=c.dram_ue,
        dram_ce=c.dram_ce,
        uncorrectable_l1=c.uncorrectable_agg_l1,
        uncorrectable_l2=c.uncorrectable_agg_l2,
        uncorrectable_reg=c.uncorrectable_agg_reg,
        retired_pages_sbe=c.retired_page_sbe,
        retired_pages_dbe=c.retired_page_dbe,
        retired_pages_pending=c.retired_page_pending,
        remapped_rows_correctable=0,
        remapped_rows_uncorrectable=0,
        remapping_pending=c.remapping_pending,
        remapping_failure=c.remapping_failure,
        temperature_c=c.temperature,
        slowdown_temp_c=c.slowdown_temp,
        shutdown_temp_c=c.shutdown_temp,
        throttle_reasons=c.throttle_reasons,
        nvlink_active=c.nvlink_active,
        nvlink_errors=c.nvlink_errors,
    )


# ---- editing (``shoal health inject``) ----

INJECTIONS = (
    "xid",
    "ecc_dbe",
    "ecc_sbe",
    "remap_pending",
    "remap_failure",
    "link_width",
    "temperature",
    "throttle",
    "nvlink_down",
    "fail_read",
    "nvml_init_error",
    "card_count",
    "clear",
)


@dataclass(frozen=True, slots=True)
class Injection:
    """One fault: ``kind`` (one of ``INJECTIONS``) on card ``gpu`` (None: node level, or
    for ``clear`` every card), with ``value`` where the kind takes one."""

    kind: str
    gpu: int | None = 0
    value: int | str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INJECTIONS:
            raise ValueError(f"unknown injection {self.kind!r}")


def apply_injection(doc: dict[str, Any], inj: Injection) -> dict[str, Any]:
    """``doc`` (a raw TOML document, edited in place and returned) with ``inj`` applied."""
    gpus = doc.setdefault("gpus", {})
    if inj.kind == "nvml_init_error":
        gpus["nvml_init_error"] = inj.value
        return doc
    if inj.kind == "card_count":
        assert isinstance(inj.value, int), "card_count takes a number"
        gpus["card_count"] = inj.value
        for key in [k for k in gpus if k.isdigit() and int(k) >= inj.value]:
            del gpus[key]
        return doc
    if inj.kind == "clear":
        if inj.gpu is None:
            for key in [k for k in gpus if k not in _NODE_KEYS]:
                del gpus[key]
            gpus.pop("nvml_init_error", None)
        else:
            gpus.pop(str(inj.gpu), None)
        return doc
    assert inj.gpu is not None, f"{inj.kind} applies to one card"
    card = gpus.setdefault(str(inj.gpu), {})
    if inj.kind == "xid":
        card["xids"] = [*card.get("xids", []), inj.value]
    elif inj.kind in ("ecc_dbe", "ecc_sbe"):
        bit = inj.kind[-3:]
        card[f"ecc_volatile_{bit}"] = inj.value
        card[f"ecc_aggregate_{bit}"] = max(
            int(card.get(f"ecc_aggregate_{bit}", 0)), int(inj.value or 0)
        )
    elif inj.kind == "remap_pending":
        card["remapping_pending"] = True
    elif inj.kind == "remap_failure":
        card["remapping_failure"] = True
    elif inj.kind == "link_width":
        card["link_width_current"] = inj.value
    elif inj.kind == "temperature":
        card["temperature"] = inj.value
    elif inj.kind == "throttle":
        old = card.get("throttle_reasons", [])
        if isinstance(old, int):
            card["throttle_reasons"] = old | THROTTLE_REASONS.get(str(inj.value), 0)
        if isinstance(old, list):
            card["throttle_reasons"] = [*old, inj.value] if inj.value not in old else old
    elif inj.kind == "nvlink_down":
        links = list(card.get("nvlink_active", MockCard().nvlink_active))
        assert isinstance(inj.value, int), "nvlink_down takes a link number"
        if inj.value >= len(links):
            links.extend([True] * (inj.value + 1 - len(links)))
        links[inj.value] = False
        card["nvlink_active"] = links
    elif inj.kind == "fail_read":
        card["fail_read"] = True
    return doc


def inject(path: Path, inj: Injection, *, new_card_count: int = 8) -> MockConfig:
    """Apply ``inj`` to the file at ``path`` (created with ``new_card_count`` healthy cards
    when missing) atomically; the validated result. ``MockFormatError`` leaves the file as
    it was."""
    if path.exists():
        doc = _read_doc(path)
        parse(doc, str(path))  # refuse to edit a file that is already malformed
    else:
        doc = {"version": "0.1.0", "gpus": {"card_count": new_card_count}}
    config = parse(apply_injection(doc, inj), str(path))
    _write_atomically(path, doc)
    return config


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise MockFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise MockFormatError(f"{path}: not valid TOML: {exc}") from None


def _write_atomically(path: Path, doc: Mapping[str, Any]) -> None:
    import tomli_w

    data = tomli_w.dumps(doc).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
