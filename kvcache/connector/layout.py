"""The paged KV layout of one attention layer, read off the tensor vLLM hands the connector.

vLLM has shipped many layouts and keeps adding them, so nothing here assumes one:

    flash-attn (≤0.11)      (2, num_blocks, block_size, heads, head_dim)      K/V outermost
    flashinfer              (num_blocks, 2, block_size, heads, head_dim)
    HND variants            the same shapes with strides permuted (heads before tokens)
    MLA                     (num_blocks, block_size, latent_dim)              no K/V axis
    0.33 layout views       (blocks[*kernel], heads, states, content bytes)   int8, strides
                            from a named layout (LBNHC, BLNHC, ...), possibly one buffer
                            shared by all layers

The only thing the connector needs is *the block axis*: the axis whose size is the number
of KV blocks (or a multiple of it, when 0.33 splits a block into kernel blocks, which is
undone by a view). Everything else in a block is payload, copied as the engine stores it.
The block axis is moved first and the payload axes are ordered by decreasing stride, so a
block's payload is read in memory order: one contiguous run for the common layouts, a few
runs (one per K/V half) when K/V is the outer axis. The bytes a chunk holds are therefore
the engine's own physical layout; engines share chunks only when the namespace says their
layouts are equal (``kvcache.connector.settings``), so no transposition is ever needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LayerLayout", "LayoutError", "detect_layout"]


class LayoutError(ValueError):
    """A KV tensor whose block axis cannot be found (the connector then stays off)."""


@dataclass(frozen=True)
class LayerLayout:
    """How to address block ``b`` of one layer: ``blocks[b]`` is its payload."""

    name: str
    blocks: torch.Tensor  # a view: block axis first, payload axes in memory order
    block_axis: int  # in the original tensor
    payload_shape: tuple[int, ...]
    contiguous: bool  # each block's payload is one contiguous run

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def block_bytes(self) -> int:
        return math.prod(self.payload_shape) * self.blocks.element_size()

    def describe(self) -> str:
        shape = "x".join(str(n) for n in self.payload_shape)
        runs = "contiguous" if self.contiguous else "strided"
        return f"{self.name}: block axis {self.block_axis}, payload {shape} {self.dtype} ({runs})"


def detect_layout(name: str, tensor: torch.Tensor, num_blocks: int) -> LayerLayout:
    """The layout of ``tensor`` (one layer's paged KV cache holding ``num_blocks`` blocks).

    The block axis is the axis of size ``num_blocks``; when several axes have that size
    (a tiny cache whose block count equals, say, the head count) the one with the largest
    stride wins, since vLLM never puts blocks inside heads or tokens. A leading axis of
    ``num_blocks * r`` is 0.33's kernel-block split of each block into ``r`` and is
    regrouped. Raises ``LayoutError`` when no axis fits.
    """
    if num_blocks <= 0:
        raise LayoutError(f"{name}: num_blocks must be positive, got {num_blocks}")
    if tensor.dim() < 2:
        raise LayoutError(
            f"{name}: a KV cache has at least 2 axes, got shape {tuple(tensor.shape)}"
        )
    candidates = [d for d in range(tensor.dim()) if tensor.shape[d] == num_blocks]
    if not candidates and tensor.shape[0] % num_blocks == 0 and tensor.shape[0] > num_blocks:
        tensor = tensor.view(num_blocks, tensor.shape[0] // num_blocks, *tensor.shape[1:])
        candidates = [0]
    if not candidates:
        raise LayoutError(
            f"{name}: no axis of {tuple(tensor.shape)} holds the {num_blocks} KV blocks"
        )
    strides = tuple(int(s) for s in tensor.stride())
    block_axis = max(candidates, key=lambda d: (strides[d], -d))
    payload = [d for d in range(tensor.dim()) if d != block_axis]
    # Memory order: decreasing stride; size-1 axes carry no order and go last.
    payload.sort(key=lambda d: (tensor.shape[d] == 1, -strides[d], d))
    blocks = tensor.permute(block_axis, *payload)
    payload_shape = tuple(blocks.shape[1:])
    return LayerLayout(
        name=name,
        blocks=blocks,
        block_axis=block_axis,
        payload_shape=payload_shape,
        contiguous=_dense(blocks),
    )


def _dense(blocks: torch.Tensor) -> bool:
    """Whether every ``blocks[b]`` is one contiguous run of memory."""
    expected = 1
    for size, stride in reversed(list(zip(blocks.shape[1:], blocks.stride()[1:], strict=True))):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True
