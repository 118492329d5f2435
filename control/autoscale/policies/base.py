"""Autoscaling policies: one small class each, one ``decide`` hook (STYLE.md §11).

A policy is built from a ``PolicySpec`` (targets, replica bounds, its own tunables) and is
called once per control round with a ``ScaleInput``; it answers a ``Decision``. It keeps
its own windows (stable/panic averages, recommendation history) but does no I/O and reads
no clock: time is ``ScaleInput.now_s``, so tests drive it on virtual time and the trace
simulator replays hours in seconds.

Shared rules every policy follows (tests/unit/test_autoscale_policy_contract.py):

* **multi-metric**: each target's metric gives its own recommendation; the largest known
  one wins (``largest_known``), as Kubernetes' HPA does;
* **unknown holds**: a metric no replica reported recommends ``None``; when every metric
  is unknown the policy keeps ``spec_replicas`` (``Decision.recommendation is None``);
* **pending counts**: replicas asked for and still starting count toward capacity, so a
  policy does not ask again for what is already on its way;
* bounds last: ``min_replicas <= desired <= max_replicas`` always (``clamp``), and a
  desired count above zero with zero ready replicas is allowed (scale from zero).

The registry maps the names the CLI and the simulator accept (``kpa``, ``apa``, ``hpa``,
``aibrix-kpa``, ``shoal``) to classes; ``make_policy`` builds one and rejects unknown
option names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar, Protocol, TypeVar

from control.autoscale.errors import PolicyConfigError
from control.autoscale.types import Decision, PolicySpec, ScaleInput

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyOptions",
    "clamp",
    "largest_known",
    "make_policy",
    "register",
]


class Policy(Protocol):
    """``decide`` is called once per round, with ``now_s`` never decreasing."""

    name: ClassVar[str]

    def decide(self, observation: ScaleInput) -> Decision: ...


POLICIES: dict[str, Callable[[PolicySpec], Policy]] = {}

P = TypeVar("P")


def register(name: str) -> Callable[[type[P]], type[P]]:
    def add(cls: type[P]) -> type[P]:
        assert name not in POLICIES, f"policy {name!r} registered twice"
        POLICIES[name] = cls  # type: ignore[assignment]
        return cls

    return add


def make_policy(name: str, spec: PolicySpec) -> Policy:
    """Build the policy ``name``; unknown names and options raise ``PolicyConfigError``."""
    import control.autoscale.policies  # noqa: F401  (registers every policy module)

    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise PolicyConfigError(f"unknown autoscaling policy {name!r}; known: {known}") from None
    return factory(spec)


class PolicyOptions:
    """Reads a policy's tunables from ``PolicySpec.options`` with defaults; ``check()``
    after the last read raises on any option the policy never asked for (a typo)."""

    def __init__(self, policy: str, options: Mapping[str, float | str]) -> None:
        self._policy = policy
        self._options = dict(options)
        self._read: set[str] = set()

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        self._read.add(name)
        raw = self._options.get(name, default)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise PolicyConfigError(
                f"policy {self._policy}: option {name} must be a number, got {raw!r}"
            ) from None
        if minimum is not None and value < minimum:
            raise PolicyConfigError(
                f"policy {self._policy}: option {name} must be >= {minimum}, got {value}"
            )
        return value

    def text(self, name: str, default: str) -> str:
        self._read.add(name)
        return str(self._options.get(name, default))

    def check(self) -> None:
        unknown = sorted(set(self._options) - self._read)
        if unknown:
            raise PolicyConfigError(
                f"policy {self._policy}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self._read))}"
            )


def largest_known(recommendations: Iterable[int | None]) -> int | None:
    """The largest recommendation that is not ``None``; ``None`` if all are unknown."""
    known = [r for r in recommendations if r is not None]
    return max(known) if known else None


def clamp(desired: int, spec: PolicySpec) -> tuple[int, str]:
    """``desired`` within the spec's replica bounds, and the bound that applied ("")."""
    if desired > spec.max_replicas:
        return spec.max_replicas, "max-replicas"
    if desired < spec.min_replicas:
        return spec.min_replicas, "min-replicas"
    return desired, ""
