"""Autoscaling on LLM signals straight from the engines (issue 13).

Layout::

    control/autoscale/
      types.py        values: ReplicaSample, ReplicaState, ScaleInput, PolicySpec, Decision
      errors.py       the exception tree
      policies/       kpa, apa, hpa, aibrix-kpa, shoal: one class, one ``decide`` hook
      capacity.py     how many requests/s of a token mix one replica serves within an SLO
      scrape.py       engines' and the router's /metrics, concurrently, with timeouts
      actuators/      Kubernetes scale subresource, local processes, memory (one Protocol)
      controller.py   the control loop: scrape -> policy -> actuator, the decision log
      metrics.py      shoal_autoscale_* Prometheus metrics
      config.py       AutoscaleSettings: flags < SHOAL_AUTOSCALE_* < [autoscale] file table
      server.py       the controller's HTTP endpoint: /metrics, /status, POST /v1/wake
      simulate/       the trace simulator behind ``shoal autoscale simulate``
      cli.py          ``shoal autoscale run|simulate|status``

Calls go down (controller -> policy, controller -> actuator); what replicas do comes up as
data (``ScaleInput``). Policies, capacity and the simulator are pure: no sockets, no
clock (import-linter checks they import no transport).
"""
