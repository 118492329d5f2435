"""The scale target: one Protocol, one implementation per place replicas live.

::

    Actuator.state()        -> ReplicaState (spec, ready, pending, ready endpoints)
    Actuator.scale(n)       ask for n replicas (idempotent; returns once asked, not ready)
    Actuator.close()

Implementations: ``kubernetes.py`` (a Deployment's or StatefulSet's scale subresource
through the official client), ``local.py`` (engine processes on this machine, published to
the router through its discovery file: what ``shoal up`` scales), ``memory.py`` (in-memory,
for tests and dry runs), and the Ray engine groups of the multi-node issue (issue 15), which
implement this same Protocol.

Invariant: ``scale`` never blocks on replicas becoming ready; readiness is observed through
``state()`` (``pending`` until ready), so the controller's round time stays bounded. A
target that cannot be read or scaled raises ``ActuatorError`` (``ActuatorNotFound`` when
it does not exist): the controller logs it and holds, it does not crash.
"""

from __future__ import annotations

from typing import Protocol

from control.autoscale.types import ReplicaState

__all__ = ["Actuator"]


class Actuator(Protocol):
    async def state(self) -> ReplicaState: ...

    async def scale(self, desired: int) -> None: ...

    async def close(self) -> None: ...
