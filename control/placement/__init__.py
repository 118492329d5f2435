"""Heterogeneous GPU placement by integer linear programming (issue 14, after Mélange).

Layout::

    control/placement/
      types.py        values: Slos, GpuProfile, Workload, Limits, Plan
      errors.py       the exception tree
      formats.py      AIBrix's profile JSON, Mélange's example input, the workload JSON,
                      rebinning a request-size histogram onto a profile's ticks
      problem.py      one solve's numbers: cells with traffic, slice loads, replica bounds
      solver.py       the Mélange ILP through HiGHS (highspy), its LP bound; availability
                      caps and minimum replicas
      greedy.py       the greedy placement: the fallback and the ILP's first incumbent
      profile.py      the profiler: sweep an OpenAI endpoint over (input, output, rate),
                      keep the highest rate meeting every SLO; resumable (``shoal profile``)
      loadgen.py      the profiler's open-loop Poisson load over HTTP (aiohttp)
      profile_cli.py  ``shoal profile`` and its ProfileSettings
      smoothing.py    plan smoothing between solves (no flapping)
      planner.py      the live loop: the router's request-size histogram -> solve ->
                      per-GPU-type replica targets through the autoscaler's actuators;
                      the wake from zero
      sizes.py        the router's GET /v1/request_sizes read into a Workload (aiohttp)
      server.py       the planner's HTTP endpoint: /metrics, /status, GET /v1/plan,
                      POST /v1/wake
      metrics.py      shoal_placement_* Prometheus metrics
      config.py       PlacementSettings (``shoal placement run``), pools per GPU type
      cli.py          ``shoal placement solve|run|status``
      run_cli.py      the ``run`` and ``status`` verbs cli.py adds (``add_verbs``)

The solver, greedy, problem, formats, smoothing and types are pure: no sockets, no clock
of their own (import-linter checks they import no transport). Calls go down (planner -> solver,
planner -> actuator); what the fleet does comes up as data (a ``Workload``). profile.py
is pure but for its state file: its load generator (loadgen.py) is injected.
"""
