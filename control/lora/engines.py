"""vLLM's runtime LoRA API, as the manager calls it: one ``EngineApi`` protocol, an HTTP
implementation and an in-memory one.

::

    GET  /v1/models               base model = the card with parent null; adapters = the
                                  cards whose parent is that base
    GET  /metrics                 vllm:lora_requests_info{max_lora="N"}: the engine's
                                  --max-loras, the default budget (optional)
    POST /v1/load_lora_adapter    {"lora_name", "lora_path"}: 200 loaded; 400 "has already
                                  been loaded" is success too (idempotent)
    POST /v1/unload_lora_adapter  {"lora_name"}: 200 unloaded; 404 "cannot be found" is
                                  success (it is not there, which is what was asked)

Invariant: a call either succeeds or raises one of ``errors.EngineError``: no answer in
``timeout_s`` (or refused, or broken) is ``EngineUnreachable``; the route itself missing
(FastAPI's ``{"detail": "Not Found"}``: vLLM without ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
or ``--enable-lora``) is ``LoraUpdatesDisabled``; any other error status is
``LoadRejected`` with the engine's message and status. ``load`` and ``unload`` answer
whether they changed anything (False = it was loaded / absent already).

Real vLLM checks that ``lora_path`` exists and holds an adapter when it loads it (the
simulator does not): the path is read by the engine's process, so it must be on the
engine's node or on a volume both share (``types.py``).

Bodies are read with ``shoal.bodies.read_capped``: until EOF, refused (``AnswerTooLarge``,
logged) once past the cap. ``StreamReader.read(n)`` alone returns what is buffered (one
network read), not the body up to ``n``: a /v1/models of 113 KB (1000 adapters) failed
half its polls and vLLM's /metrics (hundreds of KB) never gave its ``max_lora`` (issue
14 review, finding 1).

Rejected: urllib in threads (the manager polls every engine each round and loads
concurrently; one aiohttp session keeps connections); retrying inside the client (the
manager owns retries, with backoff across rounds, and counts them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from control.lora.errors import (
    AnswerTooLarge,
    EngineUnreachable,
    LoadRejected,
    LoraUpdatesDisabled,
)
from shoal.bodies import Reply, read_capped

__all__ = [
    "EngineApi",
    "EngineModels",
    "HttpEngineApi",
    "MemoryEngineApi",
    "parse_models",
    "read_body",
]

log = logging.getLogger("shoal." + __name__)

_MAX_BODY = 4 << 20


async def read_body(reply: Reply, limit: int, what: str) -> bytes:
    """``reply``'s whole body (``shoal.bodies.read_capped``: until EOF); ``AnswerTooLarge``
    naming ``what`` when it is over ``limit`` bytes."""
    body = await read_capped(reply, limit)
    if body is None:
        raise AnswerTooLarge(f"{what}: the answer is over {limit} bytes; refused")
    return body


@dataclass(frozen=True, slots=True)
class EngineModels:
    base_model: str
    adapters: frozenset[str]
    max_loras: int | None = None  # from /metrics when asked for and exported


class EngineApi(Protocol):
    async def models(self, url: str, *, with_budget: bool = False) -> EngineModels: ...

    async def load(self, url: str, name: str, path: str) -> bool: ...

    async def unload(self, url: str, name: str) -> bool: ...

    async def close(self) -> None: ...


def parse_models(body: Any, url: str = "") -> EngineModels:
    """``/v1/models`` JSON as ``EngineModels``; ``LoadRejected`` when it is not a model list."""
    cards = body.get("data") if isinstance(body, dict) else None
    if not isinstance(cards, list):
        raise LoadRejected(f"{url}/v1/models is not an OpenAI model list", 200)
    bases = [c.get("id") for c in cards if isinstance(c, dict) and c.get("parent") is None]
    base = next((b for b in bases if isinstance(b, str)), "")
    adapters = frozenset(
        c["id"] for c in cards
        if isinstance(c, dict) and isinstance(c.get("id"), str) and base
        and c.get("parent") == base
    )  # fmt: skip
    return EngineModels(base, adapters)


def parse_max_loras(text: str) -> int | None:
    """``max_lora`` of ``vllm:lora_requests_info`` in exposition text, if exported."""
    for line in text.splitlines():
        if line.startswith("vllm:lora_requests_info{"):
            _, _, rest = line.partition('max_lora="')
            value, sep, _ = rest.partition('"')
            if sep and value.isdigit():
                return int(value)
    return None


def _message(body: bytes) -> tuple[str, bool]:
    """(the error message, whether it is FastAPI's bare route-not-found)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace"), False
    if isinstance(data, dict):
        if data.get("detail") == "Not Found":
            return "Not Found", True
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"]), False
        if "message" in data:
            return str(data["message"]), False
    return body[:200].decode(errors="replace"), False


class HttpEngineApi:
    def __init__(self, *, timeout_s: float = 30.0, poll_timeout_s: float = 2.0) -> None:
        self.timeout_s = timeout_s  # a load reads the adapter from disk: generous
        self.poll_timeout_s = poll_timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def _call(
        self, method: str, url: str, path: str, body: Any, timeout_s: float
    ) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session.request(method, url + path, json=body) as reply:
                    body = await read_body(reply, _MAX_BODY, url + path)
                    return reply.status, body
        except AnswerTooLarge as exc:
            log.warning("%s", exc)
            raise
        except TimeoutError:
            raise EngineUnreachable(f"{url}{path}: no answer in {timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise EngineUnreachable(f"{url}{path}: {type(exc).__name__}: {exc}") from None

    async def models(self, url: str, *, with_budget: bool = False) -> EngineModels:
        status, body = await self._call("GET", url, "/v1/models", None, self.poll_timeout_s)
        if status != 200:
            raise LoadRejected(f"{url}/v1/models answered {status}", status)
        try:
            models = parse_models(json.loads(body), url)
        except ValueError:
            raise LoadRejected(f"{url}/v1/models is not JSON", status) from None
        if not with_budget:
            return models
        try:
            status, text = await self._call("GET", url, "/metrics", None, self.poll_timeout_s)
        except AnswerTooLarge:  # logged; the models answered: the budget is just unknown
            return models
        budget = parse_max_loras(text.decode(errors="replace")) if status == 200 else None
        return EngineModels(models.base_model, models.adapters, budget)

    async def load(self, url: str, name: str, path: str) -> bool:
        body = {"lora_name": name, "lora_path": path}
        status, reply = await self._call("POST", url, "/v1/load_lora_adapter", body, self.timeout_s)
        if status == 200:
            return True
        message, missing_route = _message(reply)
        if status == 404 and missing_route:
            raise LoraUpdatesDisabled(
                f"{url} has no /v1/load_lora_adapter: start it with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        if status == 400 and "already been loaded" in message:
            return False
        raise LoadRejected(f"{url}: loading {name} from {path}: {status} {message}", status)

    async def unload(self, url: str, name: str) -> bool:
        status, reply = await self._call(
            "POST", url, "/v1/unload_lora_adapter", {"lora_name": name}, self.timeout_s
        )
        if status == 200:
            return True
        message, missing_route = _message(reply)
        if status == 404 and missing_route:
            raise LoraUpdatesDisabled(
                f"{url} has no /v1/unload_lora_adapter: start it with --enable-lora and "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
            )
        if status == 404:
            return False
        raise LoadRejected(f"{url}: unloading {name}: {status} {message}", status)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class MemoryEngineApi:
    """Engines as dictionaries, for unit tests of the manager: ``engines[url]`` = (base,
    loaded adapters); ``fail_loads[url]`` = how many next loads there fail; an URL in
    ``down`` is unreachable. ``calls`` records ("load"|"unload", url, name) in order."""

    def __init__(self, engines: dict[str, tuple[str, set[str]]], budget: int | None = None):
        self.engines = engines
        self.budget = budget
        self.fail_loads: dict[str, int] = {}
        self.down: set[str] = set()
        self.calls: list[tuple[str, str, str]] = []

    def _engine(self, url: str) -> tuple[str, set[str]]:
        if url in self.down or url not in self.engines:
            raise EngineUnreachable(f"{url}: down")
        return self.engines[url]

    async def models(self, url: str, *, with_budget: bool = False) -> EngineModels:
        base, loaded = self._engine(url)
        return EngineModels(base, frozenset(loaded), self.budget if with_budget else None)

    async def load(self, url: str, name: str, path: str) -> bool:
        _, loaded = self._engine(url)
        self.calls.append(("load", url, name))
        if self.fail_loads.get(url, 0) > 0:
            self.fail_loads[url] -= 1
            raise LoadRejected(f"{url}: loading {name}: 500 injected", 500)
        if name in loaded:
            return False
        loaded.add(name)
        return True

    async def unload(self, url: str, name: str) -> bool:
        _, loaded = self._engine(url)
        self.calls.append(("unload", url, name))
        if name not in loaded:
            return False
        loaded.discard(name)
        return True

    async def close(self) -> None:
        pass
