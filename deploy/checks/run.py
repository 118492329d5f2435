"""``check_all``: every check of rendered manifests, in one list of problems.

Order: schemas first (a malformed object makes the other checks' messages noise), then the
contracts, then RBAC. Every check runs even when an earlier one found problems, so one
``shoal deploy check`` shows everything to fix.
"""

from __future__ import annotations

from typing import Any

from deploy.checks import Problem
from deploy.checks.contracts import contract_problems
from deploy.checks.rbac import rbac_problems
from deploy.checks.schema import schema_problems
from deploy.values import Values

__all__ = ["check_all"]


def check_all(
    objects: list[dict[str, Any]],
    values: Values,
    *,
    kubernetes_versions: list[str] | None = None,
    crds: bool = True,
) -> list[Problem]:
    """Schema (built-in kinds, and CRDs unless ``crds`` is false), contracts, RBAC."""
    problems = schema_problems(objects, kubernetes_versions=kubernetes_versions, crds=crds)
    problems += contract_problems(objects, values)
    problems += rbac_problems(objects)
    return problems
