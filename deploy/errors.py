"""Errors of ``shoal deploy``::

ShoalError (shoal.errors)
└── DeployError            anything this package refuses
    ├── ValuesError        a values file or --set names an unknown key or a bad value
    │                      (also a ConfigError: `shoal` exits 2)
    └── CheckError         rendered manifests failed the schema or contract checks
"""

from __future__ import annotations

from shoal.errors import ConfigError, ShoalError

__all__ = ["CheckError", "DeployError", "ValuesError"]


class DeployError(ShoalError):
    """Something ``shoal deploy`` refuses."""


class ValuesError(DeployError, ConfigError):
    """A values file (or ``--set``) has an unknown key or a value of the wrong form."""


class CheckError(DeployError):
    """Rendered manifests failed a check; ``problems`` lists each as one line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s):\n" + "\n".join(problems))
        self.problems = problems
