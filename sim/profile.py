"""Step-time profile: how long one engine step takes, from what the step holds.

The model (one forward pass of a continuous-batching engine)::

    t_step = c0                                   fixed cost: launch, sampling, scheduling
           + c_prefill * prefill_tokens           prompt tokens computed in this step
           + c_decode  * decode_seqs              requests generating one token this step
           + c_kv      * context_tokens           sum over scheduled requests of the context
                                                  they attend over (computed + new tokens)
           + c_attn    * prefill_attention        query-key pairs of the prefill tokens: a chunk
                                                  of n new tokens after c computed ones pairs
                                                  n * c + n * (n + 1) / 2 (causal attention)
           + lora_load_s * adapters_loaded        adapters brought into the CPU LoRA cache

    and, outside the steps, each request becomes schedulable ``c_request`` after it
    arrives: the API server's work before the engine core sees it (parsing, tokenization,
    the hop to the engine-core process). It adds to TTFT but never to a step, as in vLLM,
    whose API server runs beside the engine core. Without it a fit must push that latency
    into ``c0``, and decode steps come out too slow or prefills too fast.

``prefill_tokens`` and ``c_kv * context_tokens`` separate the linear (MLP, projections) and
the attention (KV read) costs of a step; ``c_decode`` is the per-sequence cost of a decode
(its token's MLP work plus per-sequence overhead). ``c_attn`` prices the prefill's own
attention compute, quadratic in the prompt: on a GPU it is small below a few thousand
tokens, but on the tiny CPU engine it is a third of a 1,024-token prefill (measured
TTFTs of 14, 34 and 70 ms at 128, 512 and 1,024 tokens are not a line), and a profile
without it came out 21% long at 512 tokens when calibrated on that engine.

Default coefficients (``DEFAULT_PROFILE``, "a 7B model on one GPU") are a roofline estimate
for Llama-2-7B (bf16, 6.7e9 parameters, 32 layers, 4096 hidden, no GQA) on one
A100-80GB (2.0 TB/s HBM, 312 TFLOP/s dense bf16):

* c0 = 8 ms: reading 13.5 GB of weights once per step is 6.7 ms at peak bandwidth, plus
  ~1.3 ms of launch, sampling and scheduler work (vLLM's measured batch-1 TPOT for 7B on an
  A100 is 10-13 ms; the remaining per-token cost below brings batch-1 decode to ~8.2 ms
  plus the KV read);
* c_prefill = 0.09 ms/token: 2 * 6.7e9 FLOP per token at ~50% of peak (chunked prefill
  MFU reported for vLLM and by Vidur's profiles of 7B models);
* c_decode = 0.15 ms/seq: the same FLOPs per token at the far lower MFU of small decode
  batches, plus per-sequence sampling and detokenization;
* c_kv = 0.26 us/token: a token's KV in 32 layers x 2 x 4096 x 2 bytes = 512 KiB read
  once per step at 2.0 TB/s;
* c_request = 3 ms: the order of what the tiny CPU engine's API server adds (calibrated:
  3-6 ms; a GPU host's frontend does the same work).
* c_attn = 3.4 ns per query-key pair: QK^T and PV are 2 x 2 x 4096 FLOP per pair and
  layer, 5.2e5 FLOP over 32 layers, at ~50% of peak (1.7 ms of a 1,000-token prefill).

They make a 1,000-token prompt's TTFT ~100 ms and batch-32 decode at 1k context ~21 ms per
step; ``shoal sim calibrate`` replaces them with measured values for a real engine.

A profile file is JSON: ``{"c0_s": .., "c_prefill_s": .., "c_decode_s": .., "c_kv_s": ..,
"c_request_s": .., "c_attn_s": .., "lora_load_s": .., "source": "..."}`` (``c_attn_s``,
``c_request_s`` and ``lora_load_s`` may be left out: 0); unknown keys are an error (a
typo would otherwise silently keep a default).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from sim.errors import ProfileError

__all__ = ["DEFAULT_PROFILE", "StepProfile", "StepShape", "load_profile"]


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step computes: the features the profile prices."""

    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    adapters_loaded: int = 0
    prefill_attention: float = 0.0  # query-key pairs of this step's prefill tokens

    @property
    def empty(self) -> bool:
        return self.prefill_tokens == 0 and self.decode_seqs == 0


@dataclass(frozen=True, slots=True)
class StepProfile:
    c0_s: float
    c_prefill_s: float
    c_decode_s: float
    c_kv_s: float
    lora_load_s: float = 0.0
    c_request_s: float = 0.0
    c_attn_s: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        costs = ("c0_s", "c_prefill_s", "c_decode_s", "c_kv_s", "lora_load_s", "c_request_s")
        for name in (*costs, "c_attn_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"profile {name} must be a finite number >= 0, got {value!r}")

    def step_s(self, shape: StepShape) -> float:
        """Simulated seconds one step of ``shape`` takes."""
        return (
            self.c0_s
            + self.c_prefill_s * shape.prefill_tokens
            + self.c_decode_s * shape.decode_seqs
            + self.c_kv_s * shape.context_tokens
            + self.lora_load_s * shape.adapters_loaded
            + self.c_attn_s * shape.prefill_attention
        )

    def scaled(self, factor: float) -> StepProfile:
        """Every cost times ``factor`` (the slow-down fault)."""
        return StepProfile(
            c0_s=self.c0_s * factor,
            c_prefill_s=self.c_prefill_s * factor,
            c_decode_s=self.c_decode_s * factor,
            c_kv_s=self.c_kv_s * factor,
            lora_load_s=self.lora_load_s * factor,
            c_request_s=self.c_request_s * factor,
            c_attn_s=self.c_attn_s * factor,
            source=self.source,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


DEFAULT_PROFILE = StepProfile(
    c0_s=8e-3,
    c_prefill_s=9e-5,
    c_decode_s=1.5e-4,
    c_kv_s=2.6e-7,
    lora_load_s=5e-3,
    c_request_s=3e-3,
    c_attn_s=3.4e-9,
    source="roofline: Llama-2-7B bf16 on one A100-80GB (sim/profile.py)",
)


def load_profile(path: str | Path) -> StepProfile:
    """A profile from a JSON file; ``ProfileError`` names what is wrong."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"profile {path} must be a JSON object")
    known = {f.name for f in fields(StepProfile)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProfileError(f"profile {path}: unknown keys {unknown} (known: {sorted(known)})")
    missing = sorted({"c0_s", "c_prefill_s", "c_decode_s", "c_kv_s"} - set(raw))
    if missing:
        raise ProfileError(f"profile {path}: missing {missing}")
    return StepProfile(**raw)
