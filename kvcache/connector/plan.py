"""What the scheduler side tells the workers each step: which chunks to load and to save.

Pure data (no vLLM, no torch): it is pickled into vLLM's ``SchedulerOutput`` and shipped to
every worker process. Keys are sent for every tensor-parallel rank (16 bytes per chunk and
rank) so a worker never hashes tokens and all ranks agree on the chunk boundaries.

Block-size mapping: a Shoal chunk is ``chunk_tokens`` tokens and must be a whole number
``k`` of vLLM blocks (``block_size`` tokens). Chunk ``c`` covers vLLM blocks
``c*k .. c*k+k-1`` of the request's block table. When vLLM already holds the first blocks
of a chunk (its own prefix cache ended mid-chunk), those blocks are marked ``KEEP`` and not
written: they may be shared with running requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["KEEP", "ChunkGeometry", "LoadJob", "SaveJob", "StepPlan"]

KEEP = -1
"""A block id in a load job meaning "vLLM already holds this block: leave it"."""


@dataclass(frozen=True, slots=True)
class ChunkGeometry:
    block_size: int  # vLLM tokens per block
    chunk_tokens: int  # Shoal tokens per chunk

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.chunk_tokens <= 0:
            raise ValueError("block_size and chunk_tokens must be positive")
        if self.chunk_tokens % self.block_size:
            raise ValueError(
                f"chunk_tokens ({self.chunk_tokens}) must be a multiple of vLLM's block size "
                f"({self.block_size}); e.g. {self.block_size * max(1, 256 // self.block_size)}"
            )

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_tokens // self.block_size

    def full_chunks(self, num_tokens: int) -> int:
        return num_tokens // self.chunk_tokens

    def chunk_blocks(
        self, block_table: list[int], chunk: int, keep_below_token: int = 0
    ) -> tuple[int, ...] | None:
        """vLLM block ids of ``chunk``; blocks holding tokens below ``keep_below_token`` are
        ``KEEP``. None if the block table does not reach that far."""
        k = self.blocks_per_chunk
        first = chunk * k
        if first + k > len(block_table):
            return None
        keep_blocks = keep_below_token // self.block_size
        return tuple(KEEP if first + j < keep_blocks else block_table[first + j] for j in range(k))


@dataclass(frozen=True, slots=True)
class LoadJob:
    """Copy chunks ``keys[rank][i]`` into vLLM blocks ``block_ids[i]`` (``KEEP`` = skip)."""

    req_id: str
    first_chunk: int
    keys: tuple[tuple[bytes, ...], ...]  # [rank][chunk]
    block_ids: tuple[tuple[int, ...], ...]  # [chunk][block in chunk]


@dataclass(frozen=True, slots=True)
class SaveJob:
    """Copy vLLM blocks ``block_ids[i]`` out as chunk ``keys[rank][i]``."""

    req_id: str
    first_chunk: int
    keys: tuple[tuple[bytes, ...], ...]  # [rank][chunk]
    parents: tuple[bytes | None, ...]  # [rank]: the key before keys[rank][0]
    block_ids: tuple[tuple[int, ...], ...]  # [chunk][block in chunk]


@dataclass(slots=True)
class StepPlan:
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.loads or self.saves)
