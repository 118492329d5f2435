"""OpenAI-compatible gateway choosing an engine per request by cache state and load.

Layout (issue 12)::

    router/
      types.py        values that cross module boundaries: RouteRequest, EngineView,
                      EngineMetrics, PrefixView, RouteDecision, RouteOutcome
      errors.py       the router's exception tree
      config.py       RouterSettings: flags < environment (SHOAL_ROUTER_*) < file
      requests.py     an OpenAI request body -> RouteRequest (bounded, validated)
      strategies/     routing policies: one small class each, one ``score`` hook;
                      base.py (Strategy, registry, weighted mixes), one module per family
      pipeline.py     filter -> score -> pick: header choice, mixes, the decision log
      engines.py      EnginePool: discovery results, health checks, circuit breakers
      scrape.py       engine /metrics scraped with explicit freshness (stale = unknown)
      ledger.py       in-flight accounting: in memory (one replica) or Redis (several)
      limits.py       per-user RPM/TPM and per-model RPS: in memory or Redis
      precise.py      the cluster index through the local cache daemon: which engine
                      holds which prefix on its GPU, in its node's cache or on a peer
      discovery.py    static, dns, k8s (EndpointSlices), file and http engine lists
      hold.py         requests held while no engine serves their model (scale from
                      zero, issue 13): bounded FIFOs with deadlines, the wake gate
      wake.py         asking the autoscaler for an engine while requests are held
      proxy.py        the aiohttp application: OpenAI routes, SSE passthrough, retries
      metrics.py      shoal_router_* Prometheus metrics
      server.py       one process per core (SO_REUSEPORT), uvloop, graceful stop
      cli.py          ``shoal router serve``
      up.py           ``shoal up``: the whole stack on one machine
      up_plan.py      what ``shoal up`` runs: command lines, environments, readiness
      stack.py        processes started in stages and stopped in reverse (process groups)
      demo.py         ``shoal up --demo``: a conversation through the router, turn by turn

Calls go down (proxy -> pipeline -> strategies); engines' state comes up as data
(``EngineView`` snapshots), so strategies are pure and unit-tested without sockets.
"""
