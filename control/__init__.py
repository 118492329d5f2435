"""The control plane: autoscaling, ILP placement over heterogeneous GPUs, Ray orchestration.

::

    control/
      autoscale/   autoscaling on engine metrics: policies, controller, actuators,
                   the trace simulator (issue 13)

Placement (issue 14) and Ray engine groups (issue 15) land beside it.
"""
