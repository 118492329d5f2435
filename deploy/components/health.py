"""The health component's Kubernetes objects (to be built)."""

from __future__ import annotations

from typing import Any

from deploy.values import Values

__all__ = ["render"]


def render(values: Values) -> list[dict[str, Any]]:
    return []
