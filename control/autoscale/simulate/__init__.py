"""The trace simulator: replay a request trace against simulated replicas under a policy.

Layout (see each module's docstring)::

    traces.py     Azure 2023 CSV, Mooncake JSONL and synthetic step/ramp/spike traces
    replicas.py   simulated replicas: a continuous-batching capacity model (sim.profile)
    pipeline.py   each policy's control pipeline as it really is: scrape intervals,
                  HPA's Prometheus + adapter + sync delay, pod start time
    run.py        the replay loop and its figures (first response, full scale-up,
                  oscillations/hour, replica-seconds, SLO attainment, p99 TTFT)
    command.py    ``shoal autoscale simulate``
"""
