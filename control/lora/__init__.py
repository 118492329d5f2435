"""LoRA adapter management (issue 14): adapters where their traffic is.

Layout::

    control/lora/
      types.py        values: AdapterSpec, EngineAdapters, Placement, the manager's view
      errors.py       the exception tree
      sources.py      fetching an adapter (local path, s3://, http(s)://) through the
                      streaming loader into the adapter directory engines read
      registry.py     the registered adapters and pins, in an atomic JSON state file
      traffic.py      adapters' requests/s from the router's arrivals counter
      placement.py    pure: which adapters go on which engines, by traffic, within each
                      engine's budget (bin-packing hot adapters, replicating the hottest,
                      evicting the least recently used)
      engines.py      vLLM's runtime LoRA API: /v1/load_lora_adapter,
                      /v1/unload_lora_adapter, /v1/models (what is loaded)
      manager.py      the loop: observe engines and traffic, place, load and unload;
                      reload after restarts and on scale-out; load on demand (a wake)
      inflight.py     moves in flight and per-name exclusion: the manager decides and
                      claims synchronously and does its I/O with no shared lock held
      server.py       the manager's HTTP endpoint: /metrics, /status, the adapter API,
                      POST /v1/wake (the router asks for an adapter no engine holds)
      metrics.py      shoal_lora_* Prometheus metrics
      config.py       LoraSettings: flags < SHOAL_LORA_* < [lora] file table
      cli.py          ``shoal lora serve|register|list|load|unload|status``

``placement.py``, ``types.py`` and ``errors.py`` are pure (import-linter checks they
import no transport). Calls go down (manager -> placement, manager -> engines); what the
engines hold and the traffic come up as data (``PlacementInput``).
"""
