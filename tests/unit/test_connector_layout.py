"""Layout detection, chunk geometry and connector settings (pure; no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from kvcache.connector.layout import LayoutError, detect_layout
from kvcache.connector.plan import KEEP, ChunkGeometry
from kvcache.connector.settings import ConnectorSettings

N, B, H, D = 12, 16, 4, 8


def _mark_blocks(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """Fill block b with value b so a layout's ``blocks[b]`` can be checked."""
    shape = [1] * tensor.dim()
    shape[axis] = tensor.shape[axis]
    return tensor.copy_(
        torch.arange(tensor.shape[axis], dtype=tensor.dtype).view(shape).expand_as(tensor)
    )


@pytest.mark.parametrize(
    ("name", "make", "axis", "payload", "contiguous"),
    [
        ("flash", lambda: torch.zeros(2, N, B, H, D), 1, (2, B, H, D), False),
        ("flashinfer", lambda: torch.zeros(N, 2, B, H, D), 0, (2, B, H, D), True),
        ("hnd", lambda: torch.zeros(2, N, H, B, D).transpose(2, 3), 1, (2, H, B, D), False),
        ("mla", lambda: torch.zeros(N, B, 64), 0, (B, 64), True),
        # vLLM 0.33: an int8 [B, H, N, C] view with LBNHC strides (tokens before heads)
        (
            "lbnhc",
            lambda: torch.zeros(N, B, H, 2 * D * 2, dtype=torch.int8).transpose(1, 2),
            0,
            (B, H, 2 * D * 2),
            True,
        ),
    ],
)
def test_the_block_axis_and_memory_order_are_found_in_every_layout(
    name: str, make: object, axis: int, payload: tuple[int, ...], contiguous: bool
) -> None:
    tensor = make()  # type: ignore[operator]
    layout = detect_layout(name, tensor, N)
    assert layout.block_axis == axis
    assert layout.payload_shape == payload
    assert layout.contiguous is contiguous
    assert layout.block_bytes == torch.Size(payload).numel() * tensor.element_size()
    _mark_blocks(tensor, axis)
    for b in (0, 5, N - 1):
        assert torch.all(layout.blocks[b] == b)
    # A write through the view lands in the engine's tensor.
    layout.blocks[3].fill_(-1)
    assert torch.all(tensor.select(axis, 3) == -1)


def test_a_kernel_block_split_is_regrouped_into_manager_blocks() -> None:
    tensor = torch.zeros(N * 2, H, B // 2, 16, dtype=torch.int8)  # 2 kernel blocks per block
    layout = detect_layout("split", tensor, N)
    assert layout.blocks.shape == (N, 2, H, B // 2, 16)
    assert layout.contiguous


def test_equal_sizes_pick_the_outermost_axis_for_blocks() -> None:
    tensor = torch.zeros(N, 2, N, H, D)  # block_size == num_blocks
    assert detect_layout("tie", tensor, N).block_axis == 0


def test_a_tensor_without_the_block_count_is_rejected() -> None:
    with pytest.raises(LayoutError, match="no axis"):
        detect_layout("bad", torch.zeros(2, 7, B, H, D), N)
    with pytest.raises(LayoutError, match="positive"):
        detect_layout("bad", torch.zeros(2, N), 0)


def test_chunks_map_to_whole_vllm_blocks() -> None:
    geometry = ChunkGeometry(block_size=16, chunk_tokens=64)
    table = list(range(100, 120))
    assert geometry.blocks_per_chunk == 4
    assert geometry.chunk_blocks(table, 1) == (104, 105, 106, 107)
    assert geometry.chunk_blocks(table, 1, keep_below_token=96) == (KEEP, KEEP, 106, 107)
    assert geometry.chunk_blocks(table, 5) is None  # the table ends at block 20
    assert geometry.full_chunks(191) == 2
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        ChunkGeometry(block_size=16, chunk_tokens=40)


def test_settings_come_from_extra_config_then_environment() -> None:
    settings = ConnectorSettings.from_extra_config(
        {"chunk_tokens": "128", "shoal_peer_fetch": "false", "lookup_wait_ms": 0},
        environ={"SHOAL_CONNECTOR_SAVE_DECODE": "no", "SHOAL_CONNECTOR_CHUNK_TOKENS": "64"},
    )
    assert settings.chunk_tokens == 128  # the extra config wins over the environment
    assert settings.peer_fetch is False and settings.save_decode is False
    assert settings.lookup_wait_ms == 0.0
    assert ConnectorSettings().chunk_tokens_for(16) == 256
    assert ConnectorSettings().chunk_tokens_for(48) == 288  # rounded up to whole blocks


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"chunk_size": 16}, "unknown key 'chunk_size'"),
        ({"chunk_tokens": "lots"}, "chunk_tokens must be a int"),
        ({"peer_fetch": "maybe"}, "peer_fetch must be a bool"),
        ({"chunk_tokens": True}, "chunk_tokens must be a int"),
    ],
)
def test_bad_settings_name_the_key(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectorSettings.from_extra_config(extra, environ={})


def test_a_step_plan_survives_pickling_as_vllm_ships_it_to_workers() -> None:
    import pickle

    from kvcache.connector.plan import LoadJob, SaveJob, StepPlan

    plan = StepPlan(
        loads=[LoadJob("a", 0, ((b"k" * 16,), (b"K" * 16,)), ((KEEP, 7),))],
        saves=[SaveJob("b", 2, ((b"s" * 16,), (b"S" * 16,)), (b"p" * 16, None), ((3, 4),))],
    )
    assert pickle.loads(pickle.dumps(plan)) == plan


class _FakeRegistrar:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def register(self, address: int, nbytes: int) -> bool:
        self.calls.append(("register", address))
        return True

    def unregister(self, address: int) -> None:
        self.calls.append(("unregister", address))


class _FakeClient:
    """What _Mapping reads of a CacheClient: its arena and the arena's generation."""

    def __init__(self) -> None:
        self.arena_generation = 1
        self._arena = bytearray(4096)

    def reconnect(self) -> None:  # the client said hello again and mapped a new arena
        self.arena_generation += 1
        self._arena = bytearray(4096)

    def arena_memory(self) -> memoryview:
        return memoryview(self._arena)


def test_a_pinned_mapping_is_unregistered_before_it_is_dropped_and_only_then() -> None:
    """M9: register A; the client's arena changes -> unregister A, then register B; a new
    client object (whose generation count restarts) is a change too; close -> unregister
    the current mapping only."""
    from kvcache.connector.worker import _Mapping

    registrar = _FakeRegistrar()
    mapping = _Mapping(registrar)
    client = _FakeClient()
    a = mapping.follow(client, lambda: None).data_ptr()  # type: ignore[arg-type]
    assert mapping.follow(client, lambda: None).data_ptr() == a  # type: ignore[arg-type]
    client.reconnect()
    synced: list[str] = []
    b = mapping.follow(client, lambda: synced.append("sync")).data_ptr()  # type: ignore[arg-type]
    assert synced == ["sync"]  # copies on the old mapping were waited for first
    other = _FakeClient()  # a new client after a failure: generation 1 again
    c = mapping.follow(other, lambda: None).data_ptr()  # type: ignore[arg-type]
    mapping.release()
    mapping.release()  # idempotent: nothing unregistered twice
    assert registrar.calls == [
        ("register", a), ("unregister", a), ("register", b), ("unregister", b),
        ("register", c), ("unregister", c),
    ]  # fmt: skip
