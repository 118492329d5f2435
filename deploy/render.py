"""All components rendered in apply order; YAML out; a kustomize base on disk.

Order: Namespace, then cluster-scoped RBAC, then each component's ServiceAccount, RBAC,
ConfigMaps, Services, workloads, then policies and monitors. ``kubectl apply -f`` of one
stream, or ``kubectl apply -k DIR`` of the written base, creates them in that order.

Each component module has ``render(values) -> list[dict]`` and returns nothing when it is
disabled; ``COMPONENTS`` is the one list of them (the file name each writes to with
``--out``).

YAML out is read by YAML 1.1 parsers (kubectl and the API server go through go-yaml v2), which
take ``y``, ``n``, ``on``, ``0700``, ``1_000`` or ``1e3`` unquoted as booleans and numbers;
PyYAML leaves some of those plain (``y``, ``n``, ``1e3``). ``dump_yaml`` quotes every
string such a resolver would read as something else, so a label value stays a string.

``--out DIR`` owns the directory: every file it writes starts with ``HEADER``; a later render
deletes its own files that are no longer rendered (a disabled component must not linger for
``kubectl apply -f DIR``) and refuses a directory holding anything it did not write.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import yaml

from deploy.errors import ValuesError
from deploy.values import Values

__all__ = ["COMPONENTS", "HEADER", "dump_yaml", "render", "write_base"]

HEADER = "# Rendered by `shoal deploy render`; overlay it with kustomize, do not edit.\n"

# (file stem, module): the file each component's objects go to with --out.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("namespace", "deploy.components.namespace"),
    ("cache", "deploy.components.cache"),
    ("redis", "deploy.components.redis"),
    ("engine", "deploy.components.engine"),
    ("router", "deploy.components.router"),
    ("autoscaler", "deploy.components.autoscaler"),
    ("health", "deploy.components.health"),
    ("fleet", "deploy.components.fleet"),
    ("policies", "deploy.components.policies"),
    ("monitoring", "deploy.components.monitoring"),
)


def render_by_file(values: Values) -> dict[str, list[dict[str, Any]]]:
    """Each component's objects, keyed by its file stem, in apply order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for stem, module_name in COMPONENTS:
        module = importlib.import_module(module_name)
        objects = module.render(values)
        if objects:
            out[stem] = objects
    return out


def render(values: Values) -> list[dict[str, Any]]:
    """Every object, in apply order."""
    return [obj for objects in render_by_file(values).values() for obj in objects]


# Plain scalars a YAML 1.1 resolver (go-yaml v2's included) reads as a non-string: its
# booleans, nulls, ints in any base (underscores allowed), floats (with or without a dot,
# as Go's resolver takes ``1e3``), base-60 numbers, and the ``=`` and ``<<`` keys.
_YAML11_WORDS = frozenset({
    "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off",
    "OFF", "true", "True", "TRUE", "false", "False", "FALSE", "~", "null", "Null", "NULL", "=",
    "<<", ".inf", ".Inf", ".INF", "-.inf", "-.Inf", "-.INF", "+.inf", "+.Inf", "+.INF", ".nan",
    ".NaN", ".NAN",
})  # fmt: skip
_YAML11_NUMBER = re.compile(
    r"[-+]?(0[bB][01]+|0[oO]?[0-7]+|0[xX][0-9a-fA-F]+|[0-9]+(:[0-5]?[0-9])*(\.[0-9]*)?"
    r"|(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?)"
)


def _yaml11_non_string(text: str) -> bool:
    return text in _YAML11_WORDS or bool(_YAML11_NUMBER.fullmatch(text.replace("_", "")))


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML ships no types
    """SafeDumper that quotes every string a YAML 1.1 reader would not read back as
    that string (PyYAML quotes most already; ``y``, ``n`` and ``1e3`` it leaves plain)."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "'" if _yaml11_non_string(text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump(document: Any) -> str:
    text = yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return str(text)


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    """One YAML stream, each object after ``---``, safe for YAML 1.1 readers."""
    return "".join("---\n" + _dump(obj) for obj in objects)


def _own_files(directory: Path) -> list[Path]:
    """The files in ``directory`` an earlier ``write_base`` wrote; a ``ValuesError`` when
    it holds anything else (``--out`` would otherwise mix with, or delete, other files)."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise ValuesError(f"--out {directory}: not a directory")
    own: list[Path] = []
    foreign: list[str] = []
    for entry in sorted(directory.iterdir()):
        if entry.suffix == ".yaml" and entry.is_file() and _has_header(entry):
            own.append(entry)
        else:
            foreign.append(entry.name)
    if foreign:
        raise ValuesError(
            f"--out {directory}: holds files `shoal deploy render` did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); give an empty "
            "or new directory (the base is rewritten whole, stale files deleted)"
        )
    return own


def _has_header(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as file:
            return file.readline() == HEADER
    except OSError:
        return False


def write_base(values: Values, directory: Path) -> list[Path]:
    """One YAML file per component and a ``kustomization.yaml`` listing them in order.

    Files an earlier render wrote and this one does not are deleted."""
    by_file = render_by_file(values)  # render first: bad values leave the directory as it was
    stale = _own_files(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for stem, objects in by_file.items():
            path = directory / f"{stem}.yaml"
            path.write_text(HEADER + dump_yaml(objects))
            written.append(path)
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [path.name for path in written],
        }
        path = directory / "kustomization.yaml"
        path.write_text(HEADER + _dump(kustomization))
        written.append(path)
        for old in stale:
            if old not in written:
                old.unlink()
    except OSError as exc:
        raise ValuesError(f"--out {directory}: cannot write: {exc.strerror}") from None
    return written
