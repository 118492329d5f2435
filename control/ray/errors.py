"""One exception tree for Ray engine groups (STYLE.md §5)."""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = ["CapacityTimeout", "GroupFailed", "RayGroupError", "RayUnavailable"]


class RayGroupError(ShoalError):
    """Base of every engine-group error."""


class RayUnavailable(RayGroupError):
    """Ray cannot be reached (no cluster at the address, ``ray`` not installed)."""


class CapacityTimeout(RayGroupError):
    """The group's placement group was not placed before its deadline. ``waiting_for``
    says what was missing (resources, nodes); nothing of the group was started."""

    def __init__(self, message: str, waiting_for: str = "") -> None:
        super().__init__(message)
        self.waiting_for = waiting_for


class GroupFailed(RayGroupError):
    """A started group is lost: its node died, a worker or the driver died, the engine
    exited, or a GPU of it became unhealthy. ``reason`` is one of GroupStatus's reasons."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason
