"""The placement exception tree (STYLE.md §7)::

    ShoalError
      PlacementError
        ProfileFormatError    (also ConfigError) a profile or workload file that cannot be
                              read, or whose ticks do not match; the message names the file
        Infeasible            no mix of the GPU types (within their availability) serves the
                              workload: ``buckets`` names the (out, in) cells no type can
                              serve, empty when only the availability caps are short
        SolverError           the solver library failed or is missing (the greedy fallback
                              answers instead where it can; the plan says so)
        ProfilerError         the profiler could not measure (endpoint down, every rate fails)
        SizesUnavailable      the router's request sizes could not be read (down, refused,
                              a malformed or oversized answer)
        WrongModel            a wake for a model the planner does not plan for

Foreign errors (``highspy`` status codes, ``aiohttp.ClientError``, ``OSError``) are
translated once, in the module that calls the foreign library.
"""

from __future__ import annotations

from shoal.errors import ConfigError, ShoalError

__all__ = [
    "Infeasible",
    "PlacementError",
    "ProfileFormatError",
    "ProfilerError",
    "SizesUnavailable",
    "SolverError",
    "WrongModel",
]


class PlacementError(ShoalError):
    """Base of every error placement raises on purpose."""


class ProfileFormatError(PlacementError, ConfigError):
    """A profile or workload that cannot be read or does not fit the others."""


class Infeasible(PlacementError):
    """No mix of GPU types within their availability serves the workload."""

    def __init__(self, message: str, buckets: tuple[tuple[int, int], ...] = ()) -> None:
        super().__init__(message)
        self.buckets = buckets  # (out_tick, in_tick) cells no GPU type can serve


class SolverError(PlacementError):
    """The solver library failed or is not installed."""


class ProfilerError(PlacementError):
    """The profiler could not measure the endpoint."""


class SizesUnavailable(PlacementError):
    """The router's request sizes could not be read (down, refused, a malformed answer)."""


class WrongModel(PlacementError):
    """A wake for a model other than ``--model``: answered 404, nothing scaled."""
