"""The vLLM KV connector: engines load and save KV chunks through the node daemon.

    layout.py     find the block axis of any paged KV tensor vLLM hands over
    plan.py       the per-step load/save plan the scheduler ships to workers (pure data)
    settings.py   ``kv_connector_extra_config`` keys
    extra_keys.py what besides token ids changes a chunk's KV (LoRA, multimodal, salt, embeds)
    identity.py   the model identity in block keys (commit or weights digest, never a branch)
    metrics.py    thread-safe counters and the ``shoal_connector_*`` family they feed
    scheduler.py  lookups off the scheduler thread; which chunks to load and save
    worker.py     copies between the paged cache and the shared-memory arena
    vllm.py       ``ShoalConnector``, the adapter to vLLM's ``KVConnectorBase_V1``

Only ``vllm.py`` imports vLLM, so the rest is usable (and tested) without it.
"""
