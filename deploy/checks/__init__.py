"""Checks of rendered manifests: each returns a list of ``Problem`` (empty = passed).

schema.py     every object against the Kubernetes OpenAPI schemas (kubernetes-validate,
              strict) for the two newest minor versions it knows; the Prometheus
              Operator's objects against that operator's published models
contracts.py  cross-object contracts the data plane relies on
rbac.py       the Kubernetes API calls Shoal's code makes, found in the code, against
              the rules each component's ServiceAccount is bound to
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Problem"]


@dataclass(frozen=True, slots=True)
class Problem:
    check: str  # schema, crd, contract, rbac
    where: str  # Kind/namespace/name (or a file) the problem is in
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: {self.message}"
