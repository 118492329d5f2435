"""Fault knobs of a simulated engine, for tests of what runs on top of it.

Set at start (``--fault-*`` flags) or at runtime (``POST /sim/faults``, loopback clients
only; ``GET /sim/faults`` reads them). A JSON body sets only the keys it names::

    {"slowdown": 4.0,        every step takes 4x its profile time (1.0 = off)
     "hang": "requests",     "requests": completions are accepted and never answered,
                             /health, /metrics, /v1/models keep answering (a wedged engine
                             core behind a live API server, as vLLM's is when its core
                             stalls); "all": /health and /metrics hang too (a frozen
                             process; /sim/faults itself still answers, so a test can
                             undo it); "off" (default)
     "fail_next": 3,         the next 3 completion requests get HTTP 500 with vLLM's error
                             JSON (type "InternalServerError"), without reaching the engine
     "die_after_chunks": 5,  the next streaming response ends after 5 SSE chunks:
     "die_mode": "close",    "close" drops the connection (no [DONE]); "exit" ends the
                             whole process with exit code 70 (a crashed engine)
     "fail_lora_loads": 2}   the next 2 POST /v1/load_lora_adapter get HTTP 500 (vLLM's
                             error JSON), the adapter not loaded (a LoRA manager's retries)

``fail_next``, ``fail_lora_loads`` and ``die_after_chunks`` are consumed as they fire;
the rest stays until changed. Each firing counts in ``shoal_sim_faults_total{kind}``
(an adapter load failure as ``fail``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sim.errors import RequestError

__all__ = ["DIE_EXIT_CODE", "Faults"]

DIE_EXIT_CODE = 70
_HANG = ("off", "requests", "all")
_DIE = ("close", "exit")


@dataclass(slots=True)
class Faults:
    slowdown: float = 1.0
    hang: str = "off"
    fail_next: int = 0
    die_after_chunks: int = 0
    die_mode: str = "close"
    fail_lora_loads: int = 0

    def __post_init__(self) -> None:
        self.update({})

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a ``POST /sim/faults`` body; ``RequestError`` (400) on a bad one."""
        unknown = sorted(set(changes) - set(asdict(self)))
        if unknown:
            raise RequestError(f"unknown fault keys {unknown}", param=unknown[0])
        merged = {**asdict(self), **changes}
        slowdown, hang = merged["slowdown"], merged["hang"]
        fail_next, die, mode = merged["fail_next"], merged["die_after_chunks"], merged["die_mode"]
        if not isinstance(slowdown, int | float) or isinstance(slowdown, bool) or slowdown <= 0:
            raise RequestError("slowdown must be a number > 0", param="slowdown")
        if hang not in _HANG:
            raise RequestError(f"hang must be one of {_HANG}", param="hang")
        lora = merged["fail_lora_loads"]
        for name, value in (("fail_next", fail_next), ("die_after_chunks", die),
                            ("fail_lora_loads", lora)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError(f"{name} must be an int >= 0", param=name)
        if mode not in _DIE:
            raise RequestError(f"die_mode must be one of {_DIE}", param="die_mode")
        self.slowdown, self.hang, self.fail_next = float(slowdown), hang, fail_next
        self.die_after_chunks, self.die_mode = die, mode
        self.fail_lora_loads = lora

    def take_lora_failure(self) -> bool:
        """True (and one fewer left) when this adapter load must fail."""
        if self.fail_lora_loads <= 0:
            return False
        self.fail_lora_loads -= 1
        return True

    def take_failure(self) -> bool:
        """True (and one fewer left) when this request must fail."""
        if self.fail_next <= 0:
            return False
        self.fail_next -= 1
        return True

    def take_die(self) -> int:
        """Chunks the next stream may send before it dies; 0 = it does not."""
        chunks, self.die_after_chunks = self.die_after_chunks, 0
        return chunks

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
