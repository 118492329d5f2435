"""A Kubernetes Deployment or StatefulSet as the scale target, through its scale subresource.

::

    state()   GET  .../{deployments|statefulsets}/NAME/scale   spec.replicas
              GET  .../{deployments|statefulsets}/NAME         status.readyReplicas, selector
              GET  /api/v1/namespaces/NS/pods?labelSelector=   ready pods' podIP:engine_port
    scale(n)  PATCH .../NAME/scale  {"spec": {"replicas": n}}

Through the official ``kubernetes`` client, unchanged (``AppsV1Api``, ``CoreV1Api``); its
calls block, so each runs in a thread (``asyncio.to_thread``) and the control loop's other
work (the HTTP endpoint, a wake) goes on meanwhile. The scale subresource is what
``kubectl scale`` and the HPA write, so this controller replaces an HPA on the same
workload without changing its manifest (one of them must own it, not both).

Replica counts come from the workload's status (``readyReplicas``; pending = spec - ready,
never negative); endpoints from its pods: Ready condition True, a pod IP, not being
deleted. A pod that is Ready but terminating is left out: it is draining, not serving.

Every call has a deadline: ``_request_timeout=(connect_timeout_s, read_timeout_s)`` on
the client's request (5 s, 15 s), and ``asyncio.timeout`` of their sum (and a second)
around the threaded call, in case the client's own deadline does not fire. A stalled API
server therefore fails a round with ``ActuatorError`` instead of hanging it while holding
the controller's lock (wakes would queue behind it, and SIGTERM would wait for it).

Errors are translated once, here: ``ApiException`` 404 -> ``ActuatorNotFound``, any other
status or a connection failure -> ``ActuatorError``, each message naming the target and
its namespace.

Namespace: ``--namespace``, else the pod's own (the service-account file), else
``default``. Credentials: in-cluster config when running in a pod, else ``~/.kube/config``;
tests pass an ``ApiClient`` configured for a local stand-in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as Urllib3Error

from control.autoscale.errors import ActuatorError, ActuatorNotFound
from control.autoscale.types import ReplicaState

__all__ = ["KubernetesActuator", "own_namespace"]

log = logging.getLogger("shoal." + __name__)

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

T = TypeVar("T")


def own_namespace() -> str:
    """The pod's own namespace when running in one, else ``default``."""
    try:
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def _default_api_client() -> k8s.ApiClient:
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
        except (k8s_config.ConfigException, OSError) as exc:
            raise ActuatorError(
                f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc})"
            ) from None
    return k8s.ApiClient()


def _selector(workload: Any) -> str:
    """The label selector of a Deployment/StatefulSet, as ``list pods`` takes it."""
    selector = workload.spec.selector
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expression in selector.match_expressions or ():
        values = ",".join(expression.values or ())
        operator = expression.operator
        if operator == "In":
            parts.append(f"{expression.key} in ({values})")
        elif operator == "NotIn":
            parts.append(f"{expression.key} notin ({values})")
        elif operator == "Exists":
            parts.append(expression.key)
        elif operator == "DoesNotExist":
            parts.append(f"!{expression.key}")
    return ",".join(parts)


def _ready_ip(pod: Any) -> str | None:
    """The pod's IP if it serves: Ready, with an IP, not being deleted; else ``None``."""
    if pod.metadata.deletion_timestamp is not None or not pod.status or not pod.status.pod_ip:
        return None
    ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())
    return str(pod.status.pod_ip) if ready else None


class KubernetesActuator:
    def __init__(
        self,
        kind: str,
        name: str,
        *,
        namespace: str = "",
        engine_port: int = 8000,
        api_client: k8s.ApiClient | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
    ) -> None:
        assert kind in ("deployment", "statefulset"), f"unknown workload kind {kind!r}"
        self.kind = kind
        self.name = name
        self.namespace = namespace or own_namespace()
        self.engine_port = engine_port
        self._api_client = api_client
        self._timeout = (connect_timeout_s, read_timeout_s)  # the client's _request_timeout
        self._apps: k8s.AppsV1Api | None = None
        self._core: k8s.CoreV1Api | None = None

    @property
    def _where(self) -> str:
        return f"{self.kind}/{self.name} in namespace {self.namespace}"

    def _apis(self) -> tuple[k8s.AppsV1Api, k8s.CoreV1Api]:
        if self._apps is None or self._core is None:
            if self._api_client is None:
                self._api_client = _default_api_client()
            self._apps = k8s.AppsV1Api(self._api_client)
            self._core = k8s.CoreV1Api(self._api_client)
        return self._apps, self._core

    async def _call(self, what: str, function: Callable[[], T]) -> T:
        deadline_s = sum(self._timeout) + 1.0
        try:
            async with asyncio.timeout(deadline_s):
                return await asyncio.to_thread(function)
        except TimeoutError:
            raise ActuatorError(
                f"{what} of {self._where}: no answer from the API server in {deadline_s:.0f} s"
            ) from None
        except ApiException as exc:
            reason = f"{exc.status} {exc.reason}"
            if exc.status == 404:
                raise ActuatorNotFound(f"{what}: {self._where} not found ({reason})") from None
            raise ActuatorError(f"{what} of {self._where} failed: {reason}") from None
        except (Urllib3Error, OSError) as exc:
            raise ActuatorError(
                f"{what} of {self._where}: cannot reach the API server ({exc})"
            ) from None

    async def state(self) -> ReplicaState:
        apps, core = self._apis()
        ns, t = self.namespace, self._timeout
        workload: Any
        if self.kind == "deployment":
            scale = await self._call(
                "read scale",
                lambda: apps.read_namespaced_deployment_scale(self.name, ns, _request_timeout=t),
            )
            workload = await self._call(
                "read", lambda: apps.read_namespaced_deployment(self.name, ns, _request_timeout=t)
            )
        else:
            scale = await self._call(
                "read scale",
                lambda: apps.read_namespaced_stateful_set_scale(self.name, ns, _request_timeout=t),
            )
            workload = await self._call(
                "read", lambda: apps.read_namespaced_stateful_set(self.name, ns, _request_timeout=t)
            )
        spec = int(scale.spec.replicas or 0) if scale.spec else 0
        ready = int((workload.status and workload.status.ready_replicas) or 0)
        selector = _selector(workload)
        pods = await self._call(
            "list pods",
            lambda: core.list_namespaced_pod(ns, label_selector=selector, _request_timeout=t),
        )
        ips = (_ready_ip(p) for p in pods.items)
        endpoints = tuple(sorted(f"http://{ip}:{self.engine_port}" for ip in ips if ip))
        return ReplicaState(
            spec=spec, ready=ready, pending=max(0, spec - ready), endpoints=endpoints
        )

    async def scale(self, desired: int) -> None:
        assert desired >= 0, f"scale to {desired} replicas"
        apps, _ = self._apis()
        body = {"spec": {"replicas": desired}}
        ns, t = self.namespace, self._timeout
        if self.kind == "deployment":
            await self._call(
                "scale",
                lambda: apps.patch_namespaced_deployment_scale(
                    self.name, ns, body, _request_timeout=t
                ),
            )
        else:
            await self._call(
                "scale",
                lambda: apps.patch_namespaced_stateful_set_scale(
                    self.name, ns, body, _request_timeout=t
                ),
            )
        log.info("scaled %s to %d replicas", self._where, desired)

    async def close(self) -> None:
        if self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)
