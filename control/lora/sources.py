"""Fetching an adapter into the directory engines read, through the loader's sources.

An adapter is a folder of two files (PEFT's layout, what vLLM's ``/v1/load_lora_adapter``
reads)::

    <source>/adapter_config.json         a JSON object with at least "r" (the rank)
    <source>/adapter_model.safetensors   safetensors whose header parses and whose tensors
                                         lie inside the file

Sources are the streaming loader's (``loader.sources.open_source``): a local path (or
``file://``), ``s3://bucket/prefix`` (boto3's credential chain, ``AWS_ENDPOINT_URL``),
``http(s)://host/prefix``. A local adapter is checked and then handed to engines as is
(its path must be readable where they run); a remote one is copied into
``<adapter_dir>/<name>/``.

Invariant: ``<adapter_dir>/<name>/`` is either absent or a complete, checked adapter. Files
are streamed into ``<adapter_dir>/.fetch-<name>+XXXX/``, checked there, and the folder is
renamed into place (a rename within one file system is atomic); a failure at any point
removes the temporary folder. A replaced adapter's old folder is renamed aside first and
removed after. So an engine never reads half an adapter, and a crash leaves at most a
``.fetch-*`` folder (removed the next time that name is fetched). The ``+`` after the
name is a character names cannot hold (``registry.NAME_PATTERN``), so one name's
``.fetch-<name>+*`` never matches another's staging folder (with ``-`` there, fetching
``a`` deleted ``a-b``'s folder mid-copy). Fetches of one name must not overlap (the
manager serialises them per name); fetches of different names may.

Errors: a missing file is ``AdapterFilesMissing``, a malformed one ``AdapterCorrupt``,
anything else the source raised (access denied, unreachable) ``AdapterSourceError``; each
names the source and the file. Blocking calls (the loader's sources are synchronous): the
manager runs them in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.lora.errors import (
    AdapterCorrupt,
    AdapterFilesMissing,
    AdapterSourceError,
    LoraConfigError,
)
from loader.errors import CheckpointError, ObjectNotFound, SourceError
from loader.plan import parse_header

__all__ = [
    "ADAPTER_FILES",
    "CONFIG_FILE",
    "MAX_CONFIG_BYTES",
    "WEIGHTS_FILE",
    "check_adapter",
    "fetch_adapter",
    "is_remote",
    "local_path",
]

log = logging.getLogger("shoal." + __name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 16 << 30  # far above any LoRA adapter; refuses a mistaken base model

OpenSource = Callable[[str], Any]


def is_remote(source: str) -> bool:
    return source.startswith(("s3://", "http://", "https://"))


def local_path(source: str) -> Path:
    """The folder a local source names (``file://`` stripped), made absolute."""
    return Path(source.removeprefix("file://")).expanduser().resolve()


def check_adapter(folder: Path, where: str = "") -> None:
    """``AdapterFilesMissing`` / ``AdapterCorrupt`` unless ``folder`` holds a valid adapter."""
    where = where or str(folder)
    if not folder.is_dir():
        raise AdapterFilesMissing(f"{where}: no such folder (an adapter is a folder of "
                                  f"{CONFIG_FILE} and {WEIGHTS_FILE})")  # fmt: skip
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise AdapterFilesMissing(f"{where}: {name} is missing")
    _check_config(folder / CONFIG_FILE, where)
    _check_weights(folder / WEIGHTS_FILE, where)


def _check_config(path: Path, where: str) -> None:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AdapterSourceError(f"{where}: cannot read {CONFIG_FILE}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterCorrupt(f"{where}: {CONFIG_FILE} is over {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterCorrupt(f"{where}: {CONFIG_FILE} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterCorrupt(f"{where}: {CONFIG_FILE} is not a JSON object")
    if not isinstance(config.get("r"), int) or isinstance(config.get("r"), bool):
        raise AdapterCorrupt(f'{where}: {CONFIG_FILE} has no integer rank "r"')
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterCorrupt(f"{where}: {CONFIG_FILE} peft_type {peft_type!r} is not LORA")


def _check_weights(path: Path, where: str) -> None:
    try:
        size = path.stat().st_size
        with path.open("rb") as file:

            def read(offset: int, length: int) -> bytes:
                file.seek(offset)
                data = file.read(length)
                if len(data) != length:
                    raise CheckpointError(f"{WEIGHTS_FILE}: truncated at byte {offset + len(data)}")
                return data

            header = parse_header(WEIGHTS_FILE, size, read)
    except CheckpointError as exc:
        raise AdapterCorrupt(f"{where}: {exc}") from None
    except (OSError, struct.error) as exc:
        raise AdapterCorrupt(f"{where}: {WEIGHTS_FILE} cannot be read: {exc}") from None
    if not header.tensors:
        raise AdapterCorrupt(f"{where}: {WEIGHTS_FILE} holds no tensors")


def _open(source: str) -> Any:
    from loader.sources import open_source

    root, file = open_source(source.rstrip("/") + "/")
    assert file is None, "a folder URI names no file"
    return root


def _copy(src: Any, name: str, dest: Path, limit: int, where: str) -> None:
    try:
        info = src.stat(name)
        if info.size > limit:
            raise AdapterCorrupt(f"{where}: {name} is {info.size} bytes, over {limit}")
        chunk = max(1 << 16, min(int(src.preferred_chunk_bytes), 16 << 20))
        buffer = bytearray(min(chunk, max(1, info.size)))
        with dest.open("wb") as out:
            offset = 0
            while offset < info.size:
                view = memoryview(buffer)[: min(len(buffer), info.size - offset)]
                src.read_into(name, offset, view)
                out.write(view)
                offset += len(view)
            out.flush()
            os.fsync(out.fileno())
    except ObjectNotFound:
        raise AdapterFilesMissing(f"{where}: {name} is missing") from None
    except SourceError as exc:
        raise AdapterSourceError(f"{where}: {name}: {exc}") from None
    except OSError as exc:
        raise AdapterSourceError(f"{where}: writing {dest}: {exc.strerror}") from None


def fetch_adapter(
    source: str, adapter_dir: Path, name: str, *, open_source: OpenSource = _open
) -> Path:
    """Copy the adapter at a remote ``source`` into ``adapter_dir/name`` (module docstring:
    atomic, checked); the folder. ``open_source(uri)`` is the loader's, injectable."""
    if not is_remote(source):
        raise LoraConfigError(f"{source}: not a remote source (s3://, http://, https://)")
    try:
        adapter_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoraConfigError(f"--adapter-dir {adapter_dir}: {exc.strerror}") from None
    for stale in adapter_dir.glob(f".fetch-{name}+*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        src = open_source(source)
    except ImportError as exc:
        raise AdapterSourceError(
            f"{source}: the loader's sources need pip install 'shoal[loader]' ({exc.name})"
        ) from None
    except SourceError as exc:
        raise AdapterSourceError(f"{source}: {exc}") from None
    staging = Path(tempfile.mkdtemp(prefix=f".fetch-{name}+", dir=adapter_dir))
    final = adapter_dir / name
    try:
        _copy(src, CONFIG_FILE, staging / CONFIG_FILE, MAX_CONFIG_BYTES, source)
        _copy(src, WEIGHTS_FILE, staging / WEIGHTS_FILE, MAX_WEIGHTS_BYTES, source)
        check_adapter(staging, source)
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide it from an engine's user
        aside = None
        if final.exists():
            aside = adapter_dir / f".fetch-{name}+old"
            shutil.rmtree(aside, ignore_errors=True)
            final.rename(aside)
        staging.rename(final)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        src.close()
    log.info("fetched adapter %s from %s into %s", name, source, final)
    return final
