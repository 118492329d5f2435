"""Checks of rendered manifests: each returns a list of ``Problem`` (empty = passed).

    schema.py     every object against the Kubernetes OpenAPI schemas (kubernetes-validate,
                  strict) for the two newest minor versions it knows; the Prometheus
                  Operator's objects against that operator's published models
                  (crd_validate.mjs, run with node)
    contracts.py  cross-object contracts the data plane relies on (runs them all; node.py,
                  services.py, ports.py, credentials.py and alerts.py hold most of them)
    rbac.py       the Kubernetes API calls Shoal's code makes, found in the code, against
                  the rules each component's ServiceAccount is bound to
    run.py        ``check_all``: every check, in that order

The helpers here read rendered objects the way every check needs them: an object's name as
``Kind/namespace/name``, the pod templates of workloads, a container's literal environment.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PodTemplate",
    "Problem",
    "all_containers",
    "command_words",
    "contract_problem",
    "env_of",
    "flag_values",
    "is_under",
    "pod_templates",
    "shoal_component",
    "where",
]

Obj = dict[str, Any]

WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job")


@dataclass(frozen=True, slots=True)
class Problem:
    check: str  # schema, crd, contract, rbac
    where: str  # Kind/namespace/name (or a file) the problem is in
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"


def contract_problem(at: str, message: str) -> Problem:
    """A problem of the ``contract`` check (every cross-object contract reports these)."""
    return Problem("contract", at, message)


def where(obj: Obj) -> str:
    """``Kind/namespace/name`` (``Kind/name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    parts = [str(obj.get("kind", "?")), meta.get("namespace"), str(meta.get("name", "?"))]
    return "/".join(part for part in parts if part)


@dataclass(frozen=True, slots=True)
class PodTemplate:
    owner: Obj  # the workload (or the Pod itself)
    namespace: str
    labels: dict[str, str]
    spec: Obj  # the pod spec

    @property
    def where(self) -> str:
        return where(self.owner)


def pod_templates(objects: list[Obj]) -> Iterator[PodTemplate]:
    """The pod spec of every workload (and bare Pod) among ``objects``."""
    for obj in objects:
        kind = obj.get("kind")
        namespace = str((obj.get("metadata") or {}).get("namespace", "default"))
        if kind == "Pod":
            labels = (obj.get("metadata") or {}).get("labels") or {}
            yield PodTemplate(obj, namespace, dict(labels), obj.get("spec") or {})
        elif kind in WORKLOAD_KINDS or kind == "CronJob":
            spec = obj.get("spec") or {}
            if kind == "CronJob":
                spec = (spec.get("jobTemplate") or {}).get("spec") or {}
            template = spec.get("template") or {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            yield PodTemplate(obj, namespace, dict(labels), template.get("spec") or {})


def all_containers(pod_spec: Obj, *, init: bool = True) -> list[Obj]:
    """The pod's containers, init containers (native sidecars among them) first."""
    inits = list(pod_spec.get("initContainers") or []) if init else []
    return inits + list(pod_spec.get("containers") or [])


def env_of(container: Obj) -> dict[str, str]:
    """The container's literal ``env`` values (``valueFrom`` entries are left out)."""
    return {
        str(item["name"]): str(item["value"])
        for item in container.get("env") or []
        if "value" in item and "name" in item
    }


def is_under(path: str, directory: str) -> bool:
    """``path`` is ``directory`` or inside it (by path components, not by prefix)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def command_words(container: Obj) -> list[str]:
    """The container's command and args as words; a ``sh -c SCRIPT`` is split the way the
    shell would (quotes removed, ``$VAR`` left as written)."""
    words = [str(w) for w in (container.get("command") or []) + (container.get("args") or [])]
    if len(words) >= 3 and words[0].rsplit("/", 1)[-1] in ("sh", "bash") and words[1] == "-c":
        try:  # `;`, `&&`, `|` are words of their own, never glued to a flag's value
            lexer = shlex.shlex(words[2], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            return list(lexer) + words[3:]
        except ValueError:
            return words[2].split() + words[3:]
    return words


def flag_values(words: list[str], flag: str) -> list[str]:
    """Every value given to ``flag`` (``--flag V`` or ``--flag=V``), in order: a program
    that reads flags with argparse (vLLM) uses the last one."""
    found = []
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            found.append(words[i + 1])
        elif word.startswith(flag + "="):
            found.append(word.partition("=")[2])
    return found


def shoal_component(container: Obj) -> str:
    """``cache`` for ``shoal cache serve``; "" for a container not running shoal."""
    command = [str(c) for c in (container.get("command") or []) + (container.get("args") or [])]
    return command[1] if len(command) >= 2 and command[0].rsplit("/", 1)[-1] == "shoal" else ""
