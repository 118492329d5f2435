"""A fleet of Ray engine groups as the scale target, through ``shoal engines serve``'s API.

::

    state()   GET  URL/v1/fleet   spec.replicas, ready, pending, endpoints
    scale(n)  POST URL/v1/scale   {"replicas": n}

The fleet has one owner, the engines daemon; this actuator asks it, as the Kubernetes
actuator asks the API server's scale subresource (``--target ray:URL`` for the autoscaler,
``--pool TYPE=ray:URL`` for the placement planner). Rejected: driving Ray from the
autoscaler's process (two reconcilers of one set of placement groups would fight, and the
autoscaler would need Ray installed and a driver connection).

Invariant (actuators/base.py): ``scale`` returns once the daemon accepted the count, never
waiting for groups to be ready; readiness is seen through ``state()``.

Errors are translated once, here: the daemon unreachable, a timeout, an answer that is
not the expected JSON, a 5xx, or a 400 (a count over its ``--max-replicas``) ->
``ActuatorError``; a 404 (no such API at that URL: not an engines daemon) ->
``ActuatorNotFound``; each message naming the URL. Bodies are read with
``read_capped`` (1 MiB: a fleet's JSON with hundreds of groups stays far under it).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from control.autoscale.errors import ActuatorError, ActuatorNotFound
from control.autoscale.types import ReplicaState
from shoal.bodies import read_capped

__all__ = ["RayFleetActuator"]

MAX_BODY_BYTES = 1 << 20


def _message(body: bytes) -> str:
    try:
        answer = json.loads(body)
    except ValueError:
        return body[:200].decode("utf-8", errors="replace")
    return str(answer.get("error", answer)) if isinstance(answer, dict) else str(answer)


class RayFleetActuator:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 10.0) -> None:
        assert url.startswith(("http://", "https://")), f"an engines daemon's URL, got {url!r}"
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        where = f"engines daemon {self.url}{path}"
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.request(method, self.url + path, json=body) as reply:
                    raw = await read_capped(reply, MAX_BODY_BYTES)
                    if raw is None:
                        raise ActuatorError(f"{where}: answer over {MAX_BODY_BYTES} bytes")
                    if reply.status == 404:
                        raise ActuatorNotFound(
                            f"{where}: 404 (is this a `shoal engines serve` URL?)"
                        )
                    if reply.status >= 300:
                        raise ActuatorError(f"{where}: HTTP {reply.status}: {_message(raw)}")
                    return json.loads(raw)
        except TimeoutError:
            raise ActuatorError(f"{where}: no answer in {self._timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise ActuatorError(f"{where}: {type(exc).__name__}: {exc}") from None
        except ValueError:
            raise ActuatorError(f"{where}: the answer is not JSON") from None

    async def state(self) -> ReplicaState:
        answer = await self._call("GET", "/v1/fleet")
        try:
            return ReplicaState(
                spec=int(answer["spec"]["replicas"]),
                ready=int(answer["ready"]),
                pending=int(answer["pending"]),
                endpoints=tuple(str(url) for url in answer.get("endpoints", ())),
            )
        except (KeyError, TypeError, ValueError):
            raise ActuatorError(
                f"engines daemon {self.url}/v1/fleet: no spec.replicas, ready, pending in "
                "its answer"
            ) from None

    async def scale(self, desired: int) -> None:
        assert desired >= 0, "the controller bounds the count"
        await self._call("POST", "/v1/scale", {"replicas": desired})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
