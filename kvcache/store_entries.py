"""The store's records: one per block (``Entry``), per session, per tier's counters.

Internal to ``kvcache.store`` and the halves it inherits (``kvcache.store_file_moves``,
``kvcache.store_bulk``), which share them; nothing outside the store holds one (leases and
statistics leave as the frozen values of ``kvcache.store_values``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvcache.tiers import Tier

if TYPE_CHECKING:
    from kvcache.moves import Move

__all__ = ["Entry", "Session", "State", "TierCounters"]


class State(enum.IntEnum):
    RESERVED = 0
    COMMITTED = 1


class Entry:
    __slots__ = (
        "checksum",
        "deadline",
        "key",
        "landed",
        "lease_count",
        "move",
        "namespace",
        "nbytes",
        "offset",
        "owner",
        "parent",
        "state",
        "tier",
    )

    def __init__(
        self,
        key: bytes,
        parent: bytes | None,
        nbytes: int,
        offset: int,
        owner: int = 0,
        deadline: float = 0.0,
        namespace: str = "",
    ) -> None:
        self.key = key
        self.parent = parent
        self.nbytes = nbytes
        self.offset = offset
        self.tier = Tier.SHM
        self.state = State.RESERVED
        self.checksum = 0
        self.lease_count = 0
        self.owner = owner  # the writer's session while RESERVED
        self.deadline = deadline  # of the reservation
        self.namespace = namespace
        self.move: Move | None = None  # in flight to or from a file tier (kvcache.moves)
        self.landed = False  # promoted by a worker; its hit was counted on the file tier


@dataclass(slots=True)
class Session:
    namespace: str = ""
    leases: dict[bytes, list[Entry]] = field(default_factory=dict)
    reservations: dict[bytes, Entry] = field(default_factory=dict)
    lease_ttl_s: float | None = None  # None: leases last until released
    lease_deadline: float = 0.0  # renewed by every acquire and release


@dataclass(slots=True)
class TierCounters:
    hits: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
