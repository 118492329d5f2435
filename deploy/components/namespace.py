"""The Namespace every object lives in (when ``create_namespace``).

Labelled for the Pod Security admission controller at ``privileged`` enforce level,
because the cache daemon and the engines mount host paths (the shared arena and socket
directory) and the health watcher reads the host's NVIDIA devices; ``restricted`` is what
every Shoal pod *asks* for in its own security context, so the audit and warn levels are
set to it and name the exceptions.
"""

from __future__ import annotations

from typing import Any

from deploy.objects import metadata
from deploy.values import Values

__all__ = ["render"]


def render(values: Values) -> list[dict[str, Any]]:
    if not values.create_namespace:
        return []
    meta = metadata(values, values.namespace, "namespace", namespaced=False)
    meta["labels"].update(
        {
            "pod-security.kubernetes.io/enforce": "privileged",
            "pod-security.kubernetes.io/audit": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        }
    )
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": meta}]
