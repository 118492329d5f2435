"""All components rendered in apply order; YAML out; a kustomize base on disk.

Order: Namespace, then cluster-scoped RBAC, then each component's ServiceAccount, RBAC,
ConfigMaps, Services, workloads, then policies and monitors. ``kubectl apply -f`` of one
stream, or ``kubectl apply -k DIR`` of the written base, creates them in that order.

Each component module has ``render(values) -> list[dict]`` and returns nothing when it is
disabled; ``COMPONENTS`` is the one list of them (the file name each writes to with
``--out``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from deploy.values import Values

__all__ = ["COMPONENTS", "dump_yaml", "render", "write_base"]

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


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    import yaml

    return "".join(
        "---\n" + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=100)
        for obj in objects
    )


def write_base(values: Values, directory: Path) -> list[Path]:
    """One YAML file per component and a ``kustomization.yaml`` listing them in order."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, objects in render_by_file(values).items():
        path = directory / f"{stem}.yaml"
        path.write_text(dump_yaml(objects))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [path.name for path in written],
    }
    header = "# Rendered by `shoal deploy render`; overlay it with kustomize, do not edit.\n"
    (directory / "kustomization.yaml").write_text(
        header + yaml.safe_dump(kustomization, sort_keys=False)
    )
    written.append(directory / "kustomization.yaml")
    return written
