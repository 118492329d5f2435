"""A vLLM-compatible engine simulator: one asyncio process per simulated engine.

Layout (pure modules import no transport)::

    profile.py    step-time model and its coefficients (defaults: 7B on one A100)  (pure)
    tokens.py     hashed-word tokenizer, tokenizer.json, deterministic outputs     (pure)
    blocks.py     KV block pool and prefix cache over chained block hashes         (pure)
    scheduler.py  continuous batching, chunked prefill, preemption, LoRA slots     (pure)
    engine.py     the step loop in simulated time (asyncio)
    metrics.py    vLLM's Prometheus series (names, labels, buckets of vLLM 0.33)
    events.py     vLLM KV events on ZeroMQ (PUB + replay ROUTER), vLLM's wire format
    openai.py     request parsing and response shapes of vLLM's OpenAI server
    models.py     /v1/models and runtime LoRA adapters
    faults.py     fault knobs (slow down, hang, fail next N, die mid-stream)
    server.py     the aiohttp server: routes, errors, the process's event loop
    config.py     SimConfig: `shoal sim engine` flags as one value
    calibrate.py  `shoal sim calibrate`: measure an engine, fit a profile (numpy)
    process.py    start engines as processes (tests, benchmarks): running_sim_engine
    cli.py        `shoal sim engine|calibrate`
"""

from __future__ import annotations

__all__: list[str] = []
