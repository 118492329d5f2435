"""The values the block store hands out: results, leases, events, statistics.

Frozen, slotted dataclasses and enums (STYLE 4): they cross into the daemon, the wire
replies, the cluster and the metrics, and carry no reference back into the store.
``kvcache.store`` re-exports them; import them from there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvcache.tiers import Tier

__all__ = [
    "BlockEvent",
    "EventKind",
    "Lease",
    "ReserveResult",
    "ReserveStatus",
    "StoreStats",
    "TierStats",
]


class ReserveStatus(enum.IntEnum):
    OK = 0  # a slot is reserved: write the payload there, then commit
    EXISTS = 1  # the block is already cached (or being written by another client)
    NO_SPACE = 2  # back-pressure: every evictable block is leased or reserved


class EventKind(enum.Enum):
    STORED = "stored"  # committed, or moved to another tier (``tier`` says which)
    REMOVED = "removed"
    CLEARED = "cleared"  # every block is gone (flush); no per-block REMOVED follows


@dataclass(frozen=True, slots=True)
class ReserveResult:
    status: ReserveStatus
    offset: int = -1


@dataclass(frozen=True, slots=True)
class Lease:
    """Read access to a committed block until released: in the arena (``tier`` SHM), or
    where it lies when leased with ``acquire(promote=False)``."""

    key: bytes
    offset: int
    nbytes: int
    checksum: int
    tier: Tier = Tier.SHM


@dataclass(frozen=True, slots=True)
class BlockEvent:
    kind: EventKind
    key: bytes
    tier: Tier | None = None


@dataclass(frozen=True, slots=True)
class TierStats:
    tier: str
    num_blocks: int
    used_bytes: int
    capacity_bytes: int
    fragmentation: float
    hits: int
    evictions: int
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    misses: int
    num_leases: int
    num_reservations: int
    num_sessions: int
    no_space: int
    checksum_failures: int
    io_errors: int
    dropped: int
    expired_reservations: int
    expired_leases: int = 0
    callback_errors: int = 0  # tier-move completions or readers parked on them that raised
