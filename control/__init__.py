"""The control plane: autoscaling, ILP placement over heterogeneous GPUs, Ray orchestration.

::

    control/
      autoscale/   autoscaling on engine metrics: policies, controller, actuators,
                   the trace simulator (issue 13)
      placement/   cost-optimal GPU types by ILP (Mélange), the profiler that feeds it,
                   the live planning loop (issue 14)
      lora/        LoRA adapters placed, loaded and evicted by traffic (issue 14)
      health/      accelerator health: NVML and a fake backend, checks, the watcher and
                   its actions (issue 15)
      ray/         multi-node engines: engine groups on Ray placement groups, the fleet,
                   `shoal engines` (issue 15)
"""
