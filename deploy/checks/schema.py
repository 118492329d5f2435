"""Every rendered object against its schema: Kubernetes' OpenAPI, or the Prometheus Operator's.

Invariant: an object passes only if ``kubectl apply --validate=strict`` would accept it on
each Kubernetes version checked, so a typo'd field fails CI instead of being dropped by the
API server at apply time.

* Built-in kinds: ``kubernetes_validate.validate(obj, version, strict=True)`` (strict: no
  unknown fields) for the two newest minor versions the installed kubernetes-validate knows
  (derived from ``utils.all_versions()``, so upgrading it moves the window; the issue asks
  for N and N-1), or the versions given.
* Kinds it has no schema for (``monitoring.coreos.com``): ``crd_validate.mjs`` under node,
  with the operator's published models (@kubernetes-models/prometheus-operator, ajv
  validators generated from its CRDs), installed by ``scripts/setup-deploy-check`` into
  ``.cache/deploy-check``. Rejected: vendoring the CRDs' OpenAPI into the repository (a few
  MB of YAML to keep in step by hand) and a cluster's dry-run (CI has no cluster).
* Those models, like the CRDs themselves, accept unknown fields: the API server prunes
  them silently, so a misspelt ``intervall`` would leave a monitor scraping at the default
  with nobody told. ``monitor_field_problems`` therefore also holds the fields we set to a
  short list of the ones Shoal uses (``KNOWN_FIELDS``); using another field means adding it
  here, on purpose.

Without node or the install the CRD check is one problem ("crd validator unavailable")
unless the caller opts out (``crds=False``, ``shoal deploy check --skip-crds``); in CI
(``CI=true``) scripts/test installs it first, so it always runs there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy.checks import Problem, where

__all__ = [
    "CRD_KINDS",
    "KNOWN_FIELDS",
    "crd_problems",
    "default_install_dir",
    "default_versions",
    "known_minors",
    "kubernetes_problems",
    "monitor_field_problems",
    "schema_problems",
]

Obj = dict[str, Any]

CRD_GROUP = "monitoring.coreos.com"
CRD_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def default_install_dir() -> Path:
    """Where scripts/setup-deploy-check put the models: ``SHOAL_DEPLOY_CHECK_DIR``, else a
    source checkout's ``.cache/deploy-check``, else ``$XDG_CACHE_HOME/shoal/deploy-check``
    (an installed shoal: ``npm install --prefix`` that directory). Read at each call, so a
    test or the CLI can set the variable."""
    if configured := os.environ.get("SHOAL_DEPLOY_CHECK_DIR"):
        return Path(configured)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache" / "deploy-check"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "shoal" / "deploy-check"


def __getattr__(name: str) -> Any:
    """``INSTALL_DIR``: ``default_install_dir()`` at the time it is read (older callers)."""
    if name == "INSTALL_DIR":
        return default_install_dir()
    raise AttributeError(name)


VALIDATOR = Path(__file__).resolve().with_name("crd_validate.mjs")
NODE_TIMEOUT_S = 60.0

# The fields Shoal sets in Prometheus Operator objects, per JSON path (``[]`` = list items).
KNOWN_FIELDS: dict[str, frozenset[str]] = {
    "": frozenset({"apiVersion", "kind", "metadata", "spec"}),
    "ServiceMonitor.spec": frozenset({"selector", "namespaceSelector", "endpoints"}),
    "PodMonitor.spec": frozenset({"selector", "namespaceSelector", "podMetricsEndpoints"}),
    "PrometheusRule.spec": frozenset({"groups"}),
    "endpoint": frozenset({"port", "path", "interval", "scheme", "scrapeTimeout", "relabelings"}),
    "group": frozenset({"name", "rules"}),
    "rule": frozenset({"alert", "expr", "for", "labels", "annotations", "record"}),
}


def known_minors() -> list[str]:
    """Every ``major.minor`` version kubernetes-validate has schemas for, newest first."""
    from kubernetes_validate import utils

    minors: list[str] = []
    for version in reversed(utils.all_versions()):
        minor = utils.major_minor(version)
        if minor not in minors:
            minors.append(minor)
    return minors


def default_versions() -> list[str]:
    """The two newest ``major.minor`` versions kubernetes-validate has schemas for."""
    return known_minors()[:2]


def check_versions(versions: Iterable[str]) -> None:
    """``ConfigError`` (a usage error: exit 2) naming the known minors, for a version
    kubernetes-validate has no schemas for."""
    from shoal.errors import ConfigError

    known = known_minors()
    unknown = [v for v in versions if v not in known and ".".join(v.split(".")[:2]) not in known]
    if unknown:
        raise ConfigError(
            f"--kubernetes-version {', '.join(unknown)}: kubernetes-validate has no schemas "
            f"for it; known: {', '.join(known)}"
        )


def _json_path(parts: Iterable[Any]) -> str:
    text = "$"
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _is_crd(obj: Obj) -> bool:
    return str(obj.get("apiVersion", "")).startswith(CRD_GROUP + "/")


def kubernetes_problems(objects: list[Obj], versions: list[str]) -> list[Problem]:
    """Built-in kinds against the strict OpenAPI schemas of each version in ``versions``."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    problems: list[Problem] = []
    for obj in objects:
        if _is_crd(obj):
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except ValidationError as exc:
                problems.append(
                    Problem(
                        "schema",
                        where(obj),
                        f"Kubernetes {version}: {_json_path(exc.absolute_path)}: {exc.message}",
                    )
                )
            except SchemaNotFoundError as exc:
                problems.append(
                    Problem("schema", where(obj), f"Kubernetes {version}: {exc.message}")
                )
    return problems


def _unknown(kind_where: str, node: Any, known: frozenset[str], path: str) -> list[Problem]:
    if not isinstance(node, dict):
        return []
    extra = sorted(set(node) - known)
    if not extra:
        return []
    return [
        Problem(
            "crd",
            kind_where,
            f"{path}: field(s) {extra} are not among the fields Shoal uses {sorted(known)} "
            "(the API server would prune an unknown one silently; extend KNOWN_FIELDS if it "
            "is meant)",
        )
    ]


def monitor_field_problems(objects: list[Obj]) -> list[Problem]:
    """Fields set in monitors and rules outside ``KNOWN_FIELDS`` (module docstring: why)."""
    problems: list[Problem] = []
    for obj in objects:
        if not _is_crd(obj) or obj.get("kind") not in CRD_KINDS:
            continue
        kind, at = str(obj["kind"]), where(obj)
        spec = obj.get("spec") or {}
        problems += _unknown(at, obj, KNOWN_FIELDS[""], "$")
        problems += _unknown(at, spec, KNOWN_FIELDS[f"{kind}.spec"], "$.spec")
        for key in ("endpoints", "podMetricsEndpoints"):
            for i, endpoint in enumerate(spec.get(key) or []):
                problems += _unknown(at, endpoint, KNOWN_FIELDS["endpoint"], f"$.spec.{key}[{i}]")
        for i, group in enumerate(spec.get("groups") or []):
            problems += _unknown(at, group, KNOWN_FIELDS["group"], f"$.spec.groups[{i}]")
            for j, rule in enumerate((group or {}).get("rules") or []):
                path = f"$.spec.groups[{i}].rules[{j}]"
                problems += _unknown(at, rule, KNOWN_FIELDS["rule"], path)
    return problems


def crd_problems(objects: list[Obj], install_dir: Path | None = None) -> list[Problem]:
    """Prometheus Operator objects against the operator's models (needs node, the install
    in ``install_dir``, default ``default_install_dir()``)."""
    crds = [obj for obj in objects if _is_crd(obj)]
    if not crds:
        return []
    install_dir = default_install_dir() if install_dir is None else install_dir
    node = shutil.which("node")
    if node is None or not (install_dir / "node_modules").is_dir():
        return [
            Problem(
                "crd", str(install_dir), "crd validator unavailable: run scripts/setup-deploy-check"
            )
        ]
    try:
        result = subprocess.run(
            [node, str(VALIDATOR), str(install_dir)],
            input=json.dumps(crds),
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return [Problem("crd", str(VALIDATOR), f"no answer from node in {NODE_TIMEOUT_S:.0f} s")]
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return [
            Problem(
                "crd",
                str(VALIDATOR),
                f"crd validator failed (exit {result.returncode}): {tail[0]} "
                "(run scripts/setup-deploy-check)",
            )
        ]
    return [
        Problem("crd", where(crds[item["index"]]), f"{CRD_GROUP}/v1: {item['error']}")
        for item in json.loads(result.stdout or "[]")
    ]


def schema_problems(
    objects: list[Obj], *, kubernetes_versions: list[str] | None = None, crds: bool = True
) -> list[Problem]:
    """Every schema check: built-in kinds, then (unless ``crds`` is false) the CRD kinds."""
    check_versions(kubernetes_versions or [])
    problems = kubernetes_problems(objects, kubernetes_versions or default_versions())
    problems += monitor_field_problems(objects)
    if crds:
        problems += crd_problems(objects)
    return problems
