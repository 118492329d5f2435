"""A ring of host staging slots between the readers and a device.

::

    reader threads ──read──► slot i (pinned host) ──copy_ on the copy stream──► device tensor
                                  ▲                                                  │
                                  └──── free again once slot i's copy event is done ─┘

The ring is the only host memory a device load uses (``num_slots * slot_bytes``, the
streamer's in-flight bound), and it is allocated once: pinned memory is expensive to
allocate and register, so a load reuses it slot after slot. Copies are queued on a side
stream as reads complete, so the DMA of one slot overlaps the reads into the others; a slot
goes back to the free list when its copy's event has completed. ``publish()`` makes the
caller's current stream wait for every queued copy, so a tensor handed out is safe to use in
that stream without a host synchronisation.

On a CPU device (used by tests, and by a CPU-only engine that still wants a bounded host
footprint) the same ring works with plain memory and synchronous copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["StagingRing"]


class StagingRing:
    def __init__(self, device: torch.device, num_slots: int, slot_bytes: int) -> None:
        if num_slots < 1 or slot_bytes < 1:
            raise ValueError("a staging ring needs at least one slot of at least one byte")
        self.device = device
        self.slot_bytes = slot_bytes
        self._cuda = device.type == "cuda"
        self._buffer = torch.empty(num_slots * slot_bytes, dtype=torch.uint8, pin_memory=self._cuda)
        self._free: deque[int] = deque(range(num_slots))
        self._busy: deque[tuple[int, Any]] = deque()  # (slot, event) in copy order
        self._stream: Any = torch.cuda.Stream(device) if self._cuda else None  # type: ignore[no-untyped-call]
        self.num_slots = num_slots

    @property
    def nbytes(self) -> int:
        return self._buffer.numel()

    def try_acquire(self) -> int | None:
        """A free slot, or None if every slot is being read into or copied from."""
        self.reclaim()
        return self._free.popleft() if self._free else None

    def wait_for_slot(self) -> int:
        """Block until a copy finishes and its slot is free (only when copies are queued)."""
        slot = self.try_acquire()
        if slot is not None:
            return slot
        assert self._busy, "no free slot and no copy in flight: a slot leaked"
        held, event = self._busy.popleft()
        if event is not None:
            event.synchronize()
        return held

    def view(self, slot: int, nbytes: int) -> memoryview:
        start = slot * self.slot_bytes
        assert nbytes <= self.slot_bytes, f"a read of {nbytes} bytes exceeds the slot"
        return memoryview(self._buffer[start : start + nbytes].numpy())  # type: ignore[arg-type]

    def release(self, slot: int) -> None:
        """Give back a slot that was acquired but never copied from (a failed read)."""
        self._free.append(slot)

    def copy_out(self, slot: int, pieces: Sequence[tuple[torch.Tensor, int, int, int]]) -> None:
        """Queue ``dest[dest_offset : +n] = slot[src_offset : +n]`` for each piece; the slot
        is free again once the copies are done."""
        base = slot * self.slot_bytes
        if not self._cuda:
            for dest, dest_offset, src_offset, length in pieces:
                dest[dest_offset : dest_offset + length].copy_(
                    self._buffer[base + src_offset : base + src_offset + length]
                )
            self._free.append(slot)
            return
        with torch.cuda.stream(self._stream):
            for dest, dest_offset, src_offset, length in pieces:
                dest[dest_offset : dest_offset + length].copy_(
                    self._buffer[base + src_offset : base + src_offset + length], non_blocking=True
                )
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        self._busy.append((slot, event))

    def reclaim(self) -> None:
        while self._busy and (self._busy[0][1] is None or self._busy[0][1].query()):
            self._free.append(self._busy.popleft()[0])

    def publish(self) -> None:
        """Order the caller's current stream after every queued copy."""
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def drain(self) -> None:
        if self._cuda:
            self._stream.synchronize()
        self.reclaim()
