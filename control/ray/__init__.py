"""Multi-node engines on Ray: engine groups, a fleet of them, ``shoal engines``.

::

    control/ray/
      types.py      values: GroupSpec (one engine over tp x pp GPUs), GroupPhase,
                    GroupStatus, FleetSpec (replicas, max surge / unavailable)
      errors.py     RayGroupError and its subclasses (CapacityTimeout names what it waited for)
      bundles.py    pure: GroupSpec -> placement-group bundles, strategy, the driver's
                    bundle; the "waiting for" message from the cluster's free resources
      group.py      RayEngineGroup: one placement group, the driver actor in bundle 0
                    running the engine command (vLLM with --distributed-executor-backend
                    ray, or a stand-in), worker actors recording where vLLM's workers
                    would sit; elastic wait with a deadline; death of node or actor seen
                    from Ray's own state
      actors.py     the driver actor (starts the engine command: own process group,
                    dies with the actor) and the stand-in worker actor; group.py places them
      vllm.py       the real vLLM launch inside a group (command, environment, and how
                    vLLM is made to use the group instead of creating its own)
      reconcile.py  pure: the fleet's desired spec + its groups' statuses -> actions
                    (start, stop), rolling update with max surge / max unavailable,
                    removal order (unready first, then newest), replacement of failed groups
      fleet.py      EngineFleet: the loop that polls groups, applies reconcile's actions,
                    publishes ready engines to the router's discovery file (with their
                    GPUs as NODE/gpuI) and replaces groups on unhealthy GPUs
                    (control.health.client.HealthFeed)
      server.py     ``shoal engines serve``'s HTTP API: GET /v1/fleet, POST /v1/scale,
                    POST /v1/update, /metrics (shoal_engines_*), /healthz
      metrics.py, config.py (EnginesSettings), cli.py (``shoal engines serve|status|
                    scale|update``)

The autoscaler's and the placement planner's Ray target is
``control/autoscale/actuators/ray.py``: the Actuator Protocol over ``shoal engines
serve``'s HTTP API (a fleet has one owner, the daemon; the autoscaler asks it, as it asks
Kubernetes' scale subresource).

Node names: a Ray node's name is its ``shoal.node`` label when set (``ray start --labels
'{"shoal.node": "node-a"}'``; tests set it), else its hostname; GPUs are named
``NODE/gpuI`` with I the index Ray gave the worker (``ray.get_gpu_ids()``), the names the
health watcher (``shoal health watch --node NODE``) reports.
"""
