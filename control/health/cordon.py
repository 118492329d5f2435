"""Cordoning the Kubernetes node when one of its GPUs needs the node drained.

::

    decide(health)            pure: the GPUs whose remedy is drain_node, or that could not be
                              read at all (critical ``unreadable``); empty: nothing to do
    Cordoner.observe(health)  after each check: a GPU decide() names in ``after_checks``
                              consecutive checks (default 3, ``--cordon-after-checks``):
                              dry run -> log and count once;
                              apply -> PATCH /api/v1/nodes/NAME {"spec": {"unschedulable": true}}
                              (CoreV1Api.patch_node, what ``kubectl cordon`` sends) until one
                              succeeds; an API error is logged, counted and retried next round

Invariant: at most one successful patch per watcher process, and only after
``after_checks`` consecutive checks in which the same GPU's strongest critical remedy is
``drain_node`` or it was unreadable; the watcher never uncordons.

Choices:

* Persistence before acting. One bad reading (a transient NVML error on one round, one
  ``link_width`` sample) must not cordon a node for good, and the router and the fleet
  already stop using the GPU from the first critical report; so the cordon waits for the
  same GPU to be named in ``after_checks`` checks in a row (about 15 s at the default
  5 s interval). A GPU whose handle cannot be read is ``reset_gpu`` in the report (a
  single failed ``nvmlDeviceGetHandleByIndex`` is often transient) and counts toward the
  cordon like ``drain_node``: unreadable for ``after_checks`` checks, it is treated as
  fallen off the bus. Rejected: skipping the wait for XID 79/64 (a critical XID stays in
  the ledger, so it reaches ``after_checks`` within those same 15 s anyway).

* Only ``drain_node`` cordons. ``reset_gpu`` does not: a reset concerns one GPU, which the
  router and the Ray fleet already stop using from ``/v1/gpus``; cordoning the node would
  strand its healthy GPUs too. Node-level problems (NVML missing or lost) do not cordon
  either: they are as often the watcher's own deployment (no driver mounted into its pod)
  as the node's, and a bad DaemonSet rollout must not cordon the whole cluster.
* Never uncordon. A GPU that reads healthy again after a driver reload can fall off the
  bus again within the hour; whether the hardware was fixed is an operator's call
  (``kubectl uncordon``). The watcher also cannot know whether the node was cordoned for
  another reason, by someone else, and would undo their decision.
* Dry run by default (``--cordon`` alone): the decision is logged and counted
  (``shoal_gpu_cordon_actions_total{result="dry_run"}``) once, so an operator can watch
  what it would do before granting it ``patch`` on nodes (``--cordon-apply``).
* Cordon, not drain: evicting pods is the cluster's job (a drain controller, the node's
  own lifecycle); a cordon only stops new pods from landing on bad hardware.

Through the official ``kubernetes`` client, unchanged; its calls block, so each runs in a
thread with the client's own request timeout and an ``asyncio.timeout`` around it, as the
autoscaler's Kubernetes actuator does. Credentials: in-cluster config, else kubeconfig;
tests pass an ``ApiClient`` configured for a local stand-in API server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from control.health.errors import HealthError
from control.health.metrics import HealthMetrics
from control.health.types import NodeHealth, Remedy, Severity

__all__ = ["CordonError", "Cordoner", "decide"]

log = logging.getLogger("shoal." + __name__)


class CordonError(HealthError):
    """The node could not be cordoned (no credentials, API error, timeout)."""


def decide(health: NodeHealth) -> tuple[int, ...]:
    """Indices of the GPUs whose strongest critical remedy is ``drain_node``, or that have
    a critical ``unreadable`` problem (remedy ``reset_gpu`` until it persists)."""
    return tuple(
        g.index
        for g in health.gpus
        if g.remedy is Remedy.DRAIN_NODE
        or any(p.check == "unreadable" and p.severity is Severity.CRITICAL for p in g.problems)
    )


def _default_api_client() -> Any:
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
        except (k8s_config.ConfigException, OSError) as exc:
            raise CordonError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc})"
            ) from None
    return k8s.ApiClient()


class Cordoner:
    def __init__(
        self,
        node_name: str,
        *,
        apply: bool,
        metrics: HealthMetrics,
        api_client_factory: Callable[[], Any] = _default_api_client,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        after_checks: int = 3,
    ) -> None:
        assert node_name, "the Kubernetes node name (--kube-node or NODE_NAME)"
        assert after_checks >= 1, "cordon after at least one check"
        self.after_checks = after_checks
        self._streaks: dict[int, int] = {}  # GPU -> consecutive checks decide() named it
        self.node_name = node_name
        self.apply = apply
        self._metrics = metrics
        self._factory = api_client_factory
        self._api_client: Any = None
        self._timeouts = (connect_timeout_s, read_timeout_s)
        self.done = False  # cordoned (apply), or the dry run's decision was logged

    async def observe(self, health: NodeHealth) -> str | None:
        """Act on one check; the result counted (``applied``, ``dry_run``, ``error``), or
        ``None`` when nothing was to be done. Never raises for an API failure."""
        if self.done:
            return None
        named = decide(health)
        self._streaks = {i: self._streaks.get(i, 0) + 1 for i in named}
        gpus = tuple(i for i in named if self._streaks[i] >= self.after_checks)
        if not gpus:
            if named:
                log.info("drain_node on %s: cordon after %d checks in a row",
                         ", ".join(f"gpu{i} ({self._streaks[i]})" for i in named),
                         self.after_checks)  # fmt: skip
            return None
        why = ", ".join(f"gpu{i}" for i in gpus)
        if not self.apply:
            log.warning(
                "dry run: would cordon node %s (drain_node on %s); --cordon-apply to do it",
                self.node_name,
                why,
            )
            self.done = True
            return self._count("dry_run")
        try:
            await self._patch()
        except CordonError as exc:
            log.warning("cordoning node %s failed, retrying next round: %s", self.node_name, exc)
            return self._count("error")
        log.warning("cordoned node %s: drain_node on %s", self.node_name, why)
        self.done = True
        return self._count("applied")

    def _count(self, result: str) -> str:
        self._metrics.cordon_actions.labels(result=result).inc()
        return result

    async def _patch(self) -> None:
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        if self._api_client is None:
            self._api_client = await asyncio.to_thread(self._factory)
        api = k8s.CoreV1Api(self._api_client)
        body = {"spec": {"unschedulable": True}}
        try:
            async with asyncio.timeout(sum(self._timeouts) + 1.0):
                await asyncio.to_thread(
                    api.patch_node, self.node_name, body, _request_timeout=self._timeouts
                )
        except ApiException as exc:
            raise CordonError(f"PATCH node {self.node_name}: {exc.status} {exc.reason}") from None
        except (Urllib3Error, OSError) as exc:
            raise CordonError(f"PATCH node {self.node_name}: {exc}") from None
        except TimeoutError:
            raise CordonError(f"PATCH node {self.node_name}: no answer in time") from None

    async def close(self) -> None:
        if self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)
            self._api_client = None
