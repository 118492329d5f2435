"""Accelerator health: read each GPU's state, find what is wrong, say what to do about it.

::

    control/health/
      types.py      values: GpuSnapshot (one GPU's raw readings), XidEvent, Problem
                    (check, severity, detail, remedy), GpuHealth, NodeHealth (the JSON
                    every tool prints and the watcher serves)
      errors.py     HealthError and its subclasses
      backend.py    the GpuBackend Protocol and open_backend(): NVML or the fake
      nvml.py       NVML through nvidia-ml-py (the real GPUs)
      fake.py       a fake backend driven by a TOML file in the schema of AIBrix's NVML
                    mock (ai-accelerator-tool's gpu_mock_conf.toml), extended with XIDs,
                    temperature, throttle reasons and NVLink errors; re-read on change
      mockfile.py   reading, validating and editing those TOML files (``shoal health inject``)
      xid.py        the XID table (which codes are critical, what to do) and XidLedger,
                    the pure record of XIDs seen per GPU
      checks.py     pure: one GpuSnapshot (+ its XIDs) -> Problems; node-level checks
      report.py     collect(backend, ledger, ...) -> NodeHealth: one full check
      watch.py      ``shoal health watch``: the polling loop, the XID event thread,
                    GET /v1/gpus, /metrics (shoal_gpu_*), /healthz, and the actions
      cordon.py     cordoning the Kubernetes node (official client; dry-run by default)
      client.py     HealthFeed: polls several watchers' /v1/gpus for the Ray fleet
      metrics.py    shoal_gpu_* series
      config.py     HealthSettings (flags < SHOAL_HEALTH_* < [health] table)
      watch_cli.py  the ``watch`` verb (cli.py adds it: add_watch_parser)
      cli.py        ``shoal health check|watch|inject``

Pure modules (types, errors, xid, checks, mockfile) import no transport: unit-tested on
scripted snapshots and event queues. A GPU is *healthy* when it has no ``critical``
problem; ``warning`` problems are reported and exported but change no routing.

Wire contract (``GET /v1/gpus`` on the watcher, ``shoal health check --json``)::

    {"node": "node-a", "time": 1765000000.0, "healthy": false,
     "problems": [ node-level: nvml missing, GPU count ],
     "gpus": [{"index": 0, "uuid": "GPU-...", "healthy": false,
               "problems": [{"check": "xid", "severity": "critical",
                             "detail": "XID 79: GPU has fallen off the bus",
                             "remedy": "drain_node"}]}]}

Consumers name GPUs as ``NODE/gpuINDEX`` (the cache daemon's stream names): the router's
discovery entries list each engine's GPUs that way, the Ray fleet maps its workers' GPUs
to them.
"""
