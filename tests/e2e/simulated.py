"""The engine simulator (``shoal sim engine``) as a ``tests.e2e.engines.Engine``, so the
contract tests drive it through exactly the HTTP helpers they drive ``vllm serve`` with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sim.process import start_sim_engine
from tests.e2e.engines import LIVE, Engine
from tests.integration.conftest import free_port

VOCAB = 8192  # the tiny model's, so token-id prompts are valid for both


@contextlib.contextmanager
def running_simulator(
    workdir: Path,
    *,
    served_name: str,
    block_size: int,
    max_model_len: int,
    kv_events: Mapping[str, Any] | None = None,
    time_scale: float = 10.0,
    **flags: Any,
) -> Iterator[Engine]:
    """One simulated engine shaped like the tiny one, running ``time_scale`` times faster
    than real time (the contract checks shapes and counts, not durations)."""
    port = free_port()
    sim = start_sim_engine(
        port,
        served_model_name=served_name,
        block_size=block_size,
        max_model_len=max_model_len,
        kv_events_config=dict(kv_events) if kv_events is not None else None,
        vocab_size=VOCAB,
        time_scale=time_scale,
        log_path=workdir / f"sim-{port}.log",
        ready_timeout_s=60.0,
        **flags,
    )
    engine = Engine("sim", port, sim.process, sim.log_path)
    LIVE.append(engine)
    try:
        yield engine
    finally:
        with contextlib.suppress(ValueError):
            LIVE.remove(engine)
        sim.stop()
