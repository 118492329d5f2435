"""Files placement reads and writes: AIBrix's GPU profile JSON, Mélange's example input,
the workload JSON, and request-size histograms moved onto a profile's ticks.

Invariant: every file read here becomes a checked value (``GpuProfile``, ``Workload``) or
raises ``ProfileFormatError`` whose message names the file and the field; nothing half-read
leaves this module. What is written reads back equal (``load_profile(profile_to_json(p))``
is ``p``), and AIBrix's optimizer reads it too.

AIBrix's profile (``gen_profile.py`` in its ``gpu_optimizer/optimizer/profiling``)::

    {"gpu": "A100", "cost": 3.67,
     "tputs": [[r, ...], ...],              rows: output ticks, columns: input ticks
     "indexes": [[out ticks], [in ticks]],
     "slos": {"percentile": 99, "ttft": s, "tpot": s, "e2e": s},   optional
     "created": unix time,                  optional
     "e2e": [[...]], "ttft": [[...]]}       optional: latencies at the chosen rates (ignored)

``slos.percentile`` 0 is AIBrix's "the mean" and is kept as 0. AIBrix's throughput SLOs
(``tput``, ``tt``) and ``tpat`` shaped how the profile was measured and are already in
``tputs``; they are accepted and not kept.

What is written stays inside AIBrix's own schema, so its readers take it: the Go
``ModelGPUProfile`` (``pkg/cache/model_gpu_profile.go``: gpu, cost, tputs, indexes,
created, e2e, ttft, tpot, slos {percentile, tput, tt, e2e, ttft, tpat, tpot}) and the
optimizer's ``GPUProfile`` (``gpu_optimizer/optimizer/types.py``: gpu, cost, tputs,
indexes, created; since v0.4.0 it drops other keys, before that a plain dataclass refused
them). So ``slos.percentile`` is written as an integer when it is one (Go reads an ``int``:
``50.0`` would not decode) and the profile's ``model`` is not written: AIBrix keeps the
model in the profile's Redis key, not in the file. ``model`` is still read (files written
before this rule carry it).

Mélange's example input (``melange/config/example.json``)::

    {"gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]}, ...},
     "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
     "total_request_rate": 30.0, "slice_factor": 1}

It has no ticks: its buckets are named by their ordinal (ticks 1..n). Mélange's README
calls its rows input sizes, AIBrix feeds the same solver ``[out][in]`` matrices; the
optimum does not depend on the orientation, so the matrices are kept as given.

The workload JSON: ``{"rate": R, "histogram": [[share]], "indexes": [out_ticks,
in_ticks], "slice_factor": k}`` (``slice_factor`` optional, 4). The router's
``/v1/request_sizes`` answer (``rate``, ``counts``, ``out_edges``, ``in_edges``) is read
as a workload too, its edges as ticks.

Rejected: pydantic or jsonschema for the checks (one more dependency for four keys);
guessing the orientation of a Mélange matrix from its values (there is nothing to guess
from).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from control.placement.errors import ProfileFormatError
from control.placement.types import GpuProfile, Matrix, Plan, Slos, Workload

__all__ = [
    "MelangeInput",
    "count_requests",
    "load_melange",
    "load_profile",
    "load_profiles",
    "load_workload",
    "plan_to_json",
    "profile_from_json",
    "profile_to_json",
    "rebin",
    "workload_from_json",
    "workload_to_json",
]

logger = logging.getLogger("shoal." + __name__)
_T = TypeVar("_T")

_SLO_KEYS = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s"}
_AIBRIX_OTHER_SLOS = frozenset({"tput", "tt", "tpat"})


@dataclass(frozen=True, slots=True)
class MelangeInput:
    """Mélange's example input: its GPU types and the workload they are asked to serve."""

    profiles: tuple[GpuProfile, ...]
    workload: Workload


def load_profile(path: str | Path) -> GpuProfile:
    """One GPU type's profile from an AIBrix profile file (or a Mélange input holding one
    GPU type)."""
    profiles = load_profiles(path)
    if len(profiles) != 1:
        names = ", ".join(p.gpu for p in profiles)
        raise ProfileFormatError(
            f"{path}: holds {len(profiles)} GPU types ({names}); read it with load_profiles"
        )
    return profiles[0]


def load_profiles(path: str | Path) -> tuple[GpuProfile, ...]:
    """The profiles in an AIBrix profile file (one object, a list of them, or JSON lines,
    as AIBrix's FileProfileReader reads) or a Mélange input (``gpu_info``)."""
    data = _read_json(path)
    if isinstance(data, dict) and "gpu_info" in data:
        return load_melange(path).profiles
    items = data if isinstance(data, list) else [data]
    return tuple(profile_from_json(item, source=str(path)) for item in items)


def profile_from_json(data: Any, *, source: str = "profile") -> GpuProfile:
    """A profile from AIBrix's JSON object (``source`` names it in errors)."""
    obj = _object(data, source, "the profile")
    gpu = _string(obj, "gpu", source)
    where = f"{source} ({gpu})"
    indexes = obj.get("indexes")
    if not isinstance(indexes, list) or len(indexes) != 2:
        raise ProfileFormatError(f"{where}: field 'indexes' must be [out_ticks, in_ticks]")
    out_ticks = _ticks(indexes[0], where, "indexes[0] (output ticks)")
    in_ticks = _ticks(indexes[1], where, "indexes[1] (input ticks)")
    created = obj.get("created")
    if created is not None:
        created = _number(created, where, "created")
    model = obj.get("model", "")
    if not isinstance(model, str):
        raise ProfileFormatError(f"{where}: field 'model' must be a string")
    return _build(
        where,
        lambda: GpuProfile(
            gpu=gpu,
            cost=_number(obj.get("cost"), where, "cost"),
            tputs=_matrix(obj.get("tputs"), where, "tputs"),
            out_ticks=out_ticks,
            in_ticks=in_ticks,
            slos=_slos(obj.get("slos"), where),
            created=created,
            model=model,
        ),
    )


def profile_to_json(profile: GpuProfile) -> dict[str, Any]:
    """AIBrix's profile JSON object for ``profile`` (``load_profile`` reads it back)."""
    percentile = float(profile.slos.percentile)
    slos: dict[str, float] = {
        "percentile": int(percentile) if percentile.is_integer() else percentile
    }
    for key, attribute in _SLO_KEYS.items():
        value = getattr(profile.slos, attribute)
        if value is not None:
            slos[key] = value
    out: dict[str, Any] = {
        "gpu": profile.gpu,
        "cost": profile.cost,
        "tputs": [list(row) for row in profile.tputs],
        "indexes": [list(profile.out_ticks), list(profile.in_ticks)],
        "slos": slos,
    }
    if profile.created is not None:
        out["created"] = profile.created
    return out  # no "model": outside AIBrix's schema (module docstring)


def load_melange(path: str | Path) -> MelangeInput:
    """Mélange's example input: its GPU types and its workload, on ordinal ticks."""
    source = str(path)
    obj = _object(_read_json(path), source, "Mélange's input")
    info = obj.get("gpu_info")
    if not isinstance(info, dict) or not info:
        raise ProfileFormatError(f"{source}: field 'gpu_info' must be a non-empty object")
    distribution = _matrix(obj.get("workload_distribution"), source, "workload_distribution")
    if not distribution or not distribution[0]:
        raise ProfileFormatError(f"{source}: field 'workload_distribution' is empty")
    out_ticks = tuple(range(1, len(distribution) + 1))
    in_ticks = tuple(range(1, len(distribution[0]) + 1))
    profiles = [
        _melange_gpu(source, gpu, entry, out_ticks, in_ticks) for gpu, entry in info.items()
    ]
    workload = _build(
        source,
        lambda: Workload(
            rate=_number(obj.get("total_request_rate"), source, "total_request_rate"),
            histogram=distribution,
            out_ticks=out_ticks,
            in_ticks=in_ticks,
            slice_factor=_integer(obj.get("slice_factor", 4), source, "slice_factor"),
        ),
    )
    return MelangeInput(tuple(profiles), workload)


def _melange_gpu(
    source: str, gpu: str, entry: Any, out_ticks: tuple[int, ...], in_ticks: tuple[int, ...]
) -> GpuProfile:
    where = f"{source} (gpu_info.{gpu})"
    fields = _object(entry, where, "the GPU's entry")
    return _build(
        where,
        lambda: GpuProfile(
            gpu=gpu,
            cost=_number(fields.get("cost"), where, "cost"),
            tputs=_matrix(fields.get("tputs"), where, "tputs"),
            out_ticks=out_ticks,
            in_ticks=in_ticks,
        ),
    )


def load_workload(path: str | Path) -> Workload:
    """The workload JSON (or a router's ``/v1/request_sizes`` answer, or Mélange's input)."""
    data = _read_json(path)
    if isinstance(data, dict) and "gpu_info" in data:
        return load_melange(path).workload
    return workload_from_json(data, source=str(path))


def workload_from_json(data: Any, *, source: str = "workload") -> Workload:
    """A workload from its JSON object, or from a router's ``/v1/request_sizes`` answer."""
    obj = _object(data, source, "the workload")
    if "counts" in obj:  # the router's request-size histogram: edges are the ticks
        histogram = _matrix(obj.get("counts"), source, "counts")
        out_ticks = _ticks(obj.get("out_edges"), source, "out_edges")
        in_ticks = _ticks(obj.get("in_edges"), source, "in_edges")
    else:
        histogram = _matrix(obj.get("histogram"), source, "histogram")
        indexes = obj.get("indexes")
        if not isinstance(indexes, list) or len(indexes) != 2:
            raise ProfileFormatError(f"{source}: field 'indexes' must be [out_ticks, in_ticks]")
        out_ticks = _ticks(indexes[0], source, "indexes[0] (output ticks)")
        in_ticks = _ticks(indexes[1], source, "indexes[1] (input ticks)")
    return _build(
        source,
        lambda: Workload(
            rate=_number(obj.get("rate"), source, "rate"),
            histogram=histogram,
            out_ticks=out_ticks,
            in_ticks=in_ticks,
            slice_factor=_integer(obj.get("slice_factor", 4), source, "slice_factor"),
        ),
    )


def workload_to_json(workload: Workload) -> dict[str, Any]:
    """The workload JSON object (``load_workload`` reads it back)."""
    return {
        "rate": workload.rate,
        "histogram": [list(row) for row in workload.histogram],
        "indexes": [list(workload.out_ticks), list(workload.in_ticks)],
        "slice_factor": workload.slice_factor,
    }


def rebin(
    counts: Sequence[Sequence[float]],
    out_edges: Sequence[int],
    in_edges: Sequence[int],
    out_ticks: Sequence[int],
    in_ticks: Sequence[int],
) -> Matrix:
    """``counts`` on bins ending at ``out_edges`` x ``in_edges`` moved onto the cells of
    ``out_ticks`` x ``in_ticks``.

    A bin is represented by its upper edge (its longest request), which goes to the cell
    of the smallest tick >= that edge; above the last tick, the last cell. Never optimistic
    below the last tick: every request lands in a cell whose tick is at least its length.
    """
    if len(counts) != len(out_edges) or any(len(row) != len(in_edges) for row in counts):
        raise ProfileFormatError(
            f"counts must be {len(out_edges)} rows (output edges) of {len(in_edges)} (input edges)"
        )
    out_map = [_cell(edge, out_ticks) for edge in out_edges]
    in_map = [_cell(edge, in_ticks) for edge in in_edges]
    moved = [[0.0] * len(in_ticks) for _ in out_ticks]
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                moved[out_map[i]][in_map[j]] += float(count)
    return tuple(tuple(row) for row in moved)


def count_requests(
    sizes: Iterable[tuple[int, int]], out_ticks: Sequence[int], in_ticks: Sequence[int]
) -> Matrix:
    """Requests ``(output tokens, input tokens)`` counted per cell of the ticks (each in
    the cell of the smallest tick >= its length; above the last tick, the last cell)."""
    counts = [[0.0] * len(in_ticks) for _ in out_ticks]
    for output_tokens, input_tokens in sizes:
        counts[_cell(output_tokens, out_ticks)][_cell(input_tokens, in_ticks)] += 1.0
    return tuple(tuple(row) for row in counts)


def plan_to_json(plan: Plan, out_ticks: Sequence[int], in_ticks: Sequence[int]) -> dict[str, Any]:
    """``Plan.to_json()`` plus each GPU type's share of every cell, the ticks, and the
    cells left unserved (``unserved`` [[out_tick, in_tick]], ``unserved_share``)."""
    out = plan.to_json()
    out["unserved"] = [list(cell) for cell in plan.unserved]
    out["unserved_share"] = plan.unserved_share
    out["assignment"] = {
        gpu: [list(row) for row in shares] for gpu, shares in sorted(plan.assignment.items())
    }
    out["indexes"] = [list(out_ticks), list(in_ticks)]
    return out


def _cell(length: float, ticks: Sequence[int]) -> int:
    return min(bisect.bisect_left(ticks, length), len(ticks) - 1)


def _read_json(path: str | Path) -> Any:
    """A JSON document, or JSON lines (AIBrix writes profiles both ways)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ProfileFormatError(f"{path}: not UTF-8 text") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            try:
                return [json.loads(line) for line in lines]
            except json.JSONDecodeError:
                pass  # report the whole-document error below: it names the first bad byte
        raise ProfileFormatError(
            f"{path}: not JSON (line {first.lineno}, column {first.colno}: {first.msg})"
        ) from first


def _build(where: str, make: Callable[[], _T]) -> _T:
    """``make()``, with the types' own checks prefixed by the file that failed them."""
    try:
        return make()
    except ProfileFormatError as exc:
        message = str(exc)
        if message.startswith(where):
            raise
        raise ProfileFormatError(f"{where}: {message}") from exc


def _object(data: Any, where: str, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ProfileFormatError(f"{where}: {what} must be a JSON object")
    return data


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise ProfileFormatError(f"{where}: field '{key}' must be a non-empty string")
    return value


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileFormatError(f"{where}: field '{key}' must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ProfileFormatError(f"{where}: field '{key}' must be finite, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, key: str) -> int:
    number = _number(value, where, key)
    if number != int(number):
        raise ProfileFormatError(f"{where}: field '{key}' must be an integer, got {value!r}")
    return int(number)


def _ticks(value: Any, where: str, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ProfileFormatError(f"{where}: field '{key}' must be a non-empty list of integers")
    return tuple(_integer(v, where, key) for v in value)


def _matrix(value: Any, where: str, key: str) -> Matrix:
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise ProfileFormatError(f"{where}: field '{key}' must be a list of lists of numbers")
    return tuple(tuple(_number(v, where, key) for v in row) for row in value)


def _slos(value: Any, where: str) -> Slos:
    if value is None:
        return Slos()
    obj = _object(value, where, "field 'slos'")
    targets: dict[str, float] = {}
    for key, item in obj.items():
        if key == "percentile":
            percentile = _number(item, where, "slos.percentile")
            if not 0 <= percentile <= 100:
                raise ProfileFormatError(
                    f"{where}: field 'slos.percentile' must be 0 (the mean) to 100, got {item!r}"
                )
            targets["percentile"] = percentile
        elif key in _SLO_KEYS:
            seconds = _number(item, where, f"slos.{key}")
            if seconds <= 0:
                raise ProfileFormatError(f"{where}: field 'slos.{key}' must be > 0 seconds")
            targets[_SLO_KEYS[key]] = seconds
        elif key in _AIBRIX_OTHER_SLOS:
            logger.debug("%s: AIBrix SLO %r already shaped tputs; not kept", where, key)
        else:
            raise ProfileFormatError(
                f"{where}: unknown field 'slos.{key}' (known: percentile, "
                f"{', '.join(sorted(_SLO_KEYS))}, {', '.join(sorted(_AIBRIX_OTHER_SLOS))})"
            )
    return Slos(**targets)
