"""The simulated engine's HTTP server: vLLM's OpenAI routes over ``engine.Engine``.

::

    GET  /health                 200, empty body (vLLM's); hangs under the "all" hang fault
    GET  /metrics                Prometheus text of this engine's registry (metrics.py)
    GET  /v1/models              the served model and loaded adapters (models.py)
    POST /v1/completions         openai.py: streaming SSE or one JSON body
    POST /v1/chat/completions
    POST /v1/load_lora_adapter   {lora_name, lora_path, load_inplace?} -> 200 text
    POST /v1/unload_lora_adapter {lora_name}                          -> 200 text
    POST /reset_prefix_cache     vLLM's dev-mode route: 200, or 400 while blocks are in use
    GET|POST /sim/faults         faults.py (loopback clients only, else 403)

One asyncio process per engine: the aiohttp server and the engine loop share the event
loop (uvloop when importable). ``handler_cancellation`` is on, so a client that hangs up
cancels its handler and the handler's ``finally`` aborts the request in the engine.

Errors: every refusal is vLLM's error JSON with vLLM's status, ``type`` and ``param``;
a body over ``--max-request-bytes`` is a 413 in the same shape (vLLM itself sets no limit;
the simulator needs one as any server does); a body nested past the JSON parser's depth is
FastAPI's 400 ``{"detail": "There was an error parsing the body"}`` (what the real engine
answers); any other exception is logged and
answered as vLLM's last-resort handler does (500, "InternalServerError"), so a bug in one
request never takes the engine down. Chosen over FastAPI (what vLLM uses): aiohttp
is one small dependency and a simulated engine must start in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shoal.errors import ConfigError
from sim import openai
from sim.config import SimConfig
from sim.engine import Engine, RequestHandle, SimClock, TokenOut
from sim.errors import RequestError
from sim.events import make_publisher
from sim.faults import DIE_EXIT_CODE, Faults
from sim.metrics import SimMetrics
from sim.models import ModelRegistry
from sim.scheduler import SchedulerConfig
from sim.tokens import FileTokenizer, HashTokenizer, Tokenizer

__all__ = ["SimServer", "build_engine", "serve"]

log = logging.getLogger("shoal." + __name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_STREAMING = "shoal_sim_streaming"  # request key: the response's headers are sent


def _error(exc: RequestError) -> web.Response:
    return web.Response(
        body=openai.error_body(exc.message, exc.error_type, exc.status, exc.param),
        status=exc.status,
        content_type="application/json",
    )


def build_engine(config: SimConfig) -> Engine:
    scheduler_config = SchedulerConfig(
        num_gpu_blocks=config.num_blocks,
        block_size=config.block_size,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        max_loras=config.max_loras,
        max_cpu_loras=config.cpu_loras,
        vocab_size=config.vocab_size,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    metrics = SimMetrics(
        config.name,
        config.max_model_len,
        config.max_loras if config.enable_lora else None,
        config.cache_info(),
    )
    return Engine(
        scheduler_config,
        config.profile,
        metrics,
        clock=SimClock(config.time_scale),
        faults=Faults(**config.faults),
        publisher=make_publisher(config.kv_events),
    )


class SimServer:
    """The routes of one simulated engine; ``app()`` builds the aiohttp application."""

    def __init__(self, config: SimConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.tokenizer: Tokenizer = (
            FileTokenizer(config.tokenizer)
            if config.tokenizer
            else HashTokenizer(config.vocab_size)
        )
        if engine is None:
            config = _with_vocab(config, self.tokenizer.vocab_size)
            self.config = config
            engine = build_engine(config)
        self.engine = engine
        self.models = ModelRegistry(config.name, config.model, config.max_model_len)
        for name, path in config.lora_modules:
            self.models.load({"lora_name": name, "lora_path": path})
        self._engine_task: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.max_request_bytes, middlewares=[self._errors]
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        if self.config.enable_lora:
            app.router.add_post("/v1/load_lora_adapter", self.load_lora)
            app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_get("/sim/faults", self.get_faults)
        app.router.add_post("/sim/faults", self.set_faults)
        app.cleanup_ctx.append(self._lifecycle)
        return app

    async def _lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.engine.publisher.start()
        self._engine_task = asyncio.create_task(self.engine.run(), name="sim-engine")
        self._engine_task.add_done_callback(_engine_died)
        yield
        self._engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._engine_task
        await self.engine.publisher.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as exc:
            return _error(exc)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(
                RequestError(
                    exc.text or "Request Entity Too Large", 413, "Request Entity Too Large"
                )
            )
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed, web.HTTPBadRequest) as exc:
            # FastAPI's own answers, which vLLM leaves as they are
            return _json({"detail": exc.reason}, exc.status)
        except (web.HTTPException, ConnectionError):
            raise
        except Exception:  # vLLM's safety net: a bug answers 500 JSON, the engine serves on
            if request.get(_STREAMING):
                raise  # headers are out: only dropping the connection is left
            log.exception("unexpected error in %s %s", request.method, request.path)
            return _error(RequestError("Internal Server Error", 500, "InternalServerError"))

    # -- plain routes ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.engine.faults.hang == "all":
            await _forever()
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        if self.engine.faults.hang == "all":
            await _forever()
        body = generate_latest(self.engine.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(self.models.model_list())

    async def load_lora(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        if self.engine.faults.take_lora_failure():
            self.engine.metrics.faults["fail"].inc()
            raise RequestError(
                "simulated adapter load failure (fault fail_lora_loads)", 500,
                "InternalServerError",
            )  # fmt: skip
        adapter = self.models.load(body)
        return web.Response(text=f"Success: LoRA adapter '{adapter.name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        adapter = self.models.unload(await _json_body(request))
        self.engine.scheduler.forget_lora(adapter.lora_int_id)
        return web.Response(text=f"Success: LoRA adapter '{adapter.name}' removed successfully.")

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        if not self.engine.scheduler.pool.reset_prefix_cache():
            raise RequestError(
                "Failed to reset prefix cache: blocks are in use", 400, "BadRequestError"
            )
        await self.engine.publisher.publish(self.engine.scheduler.pool.take_events())
        return web.Response(status=200)

    async def get_faults(self, request: web.Request) -> web.Response:
        _loopback_only(request)
        return _json(self.engine.faults.to_json())

    async def set_faults(self, request: web.Request) -> web.Response:
        _loopback_only(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise RequestError("faults must be a JSON object", 400, "Bad Request")
        self.engine.faults.update(body)
        return _json(self.engine.faults.to_json())

    # -- completions ----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self.engine.metrics.open_requests.inc()
        try:
            return await self._generate_open(request, chat=chat)
        finally:
            self.engine.metrics.open_requests.dec()

    async def _generate_open(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        arrival = self.engine.clock.now()
        body = await _json_body(request)
        parsed = openai.parse_request(
            body,
            chat=chat,
            tokenizer=self.tokenizer,
            max_model_len=self.config.max_model_len,
            request_id=request.headers.get("X-Request-Id"),
            served_name=self.config.name,
        )
        adapter = self.models.resolve(parsed.model)
        faults = self.engine.faults
        if faults.take_failure():
            self.engine.metrics.faults["fail"].inc()
            raise RequestError(
                "simulated engine failure (fault fail_next)", 500, "InternalServerError"
            )
        if faults.hang != "off":
            self.engine.metrics.faults["hang"].inc()
            await _forever()
        model = adapter.name if adapter else self.config.name
        lora = (adapter.lora_int_id, adapter.name) if adapter else None
        queue: asyncio.Queue[TokenOut] = asyncio.Queue()
        handles: list[RequestHandle] = []
        try:
            for i, prompt in enumerate(parsed.prompts):
                # vLLM's completion serving names each prompt's request "<id>-<i>"
                rid = parsed.request_id if chat else f"{parsed.request_id}-{i}"
                handles += self.engine.submit_group(
                    rid,
                    prompt.ids,
                    prompt.max_tokens,
                    parsed.n,
                    lora,
                    arrival,
                    queue=queue,
                    first_index=i * parsed.n,
                )
            if parsed.stream:
                return await self._stream(request, parsed, handles, queue, model, chat)
            return await self._collect(parsed, handles, queue, model, chat)
        finally:
            for handle in handles:
                self.engine.abort(handle)  # a no-op once finished

    def _cached(self, handles: list[RequestHandle]) -> int | None:
        """vLLM reports the cached tokens of the last request output it handled (the last
        prompt's), not a sum: the last choice's request's, here."""
        if not self.config.enable_prompt_tokens_details:
            return None
        return max(0, handles[-1].request.num_cached_tokens)

    def _prompt_tokens(self, parsed: openai.ParsedRequest) -> int:
        """Usage counts each prompt once, whatever ``n`` (measured on vLLM)."""
        return sum(len(p.ids) for p in parsed.prompts)

    async def _collect(
        self,
        parsed: openai.ParsedRequest,
        handles: list[RequestHandle],
        queue: asyncio.Queue[TokenOut],
        model: str,
        chat: bool,
    ) -> web.Response:
        ids: list[list[int]] = [[] for _ in handles]
        finish: list[str] = ["" for _ in handles]
        live = len(handles)
        while live:
            out = await queue.get()
            ids[out.index].append(out.token_id)
            if out.finish_reason is not None:
                finish[out.index] = out.finish_reason
                live -= 1
        outputs = [
            (openai.detokenize(self.tokenizer, got), reason)
            for got, reason in zip(ids, finish, strict=True)
        ]
        num_out = sum(len(got) for got in ids)
        usage = openai.usage(self._prompt_tokens(parsed), num_out, self._cached(handles), full=True)
        make = openai.chat_response if chat else openai.completion_response
        return _json(make(parsed, model, outputs, usage))

    async def _stream(
        self,
        request: web.Request,
        parsed: openai.ParsedRequest,
        handles: list[RequestHandle],
        queue: asyncio.Queue[TokenOut],
        model: str,
        chat: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        request[_STREAMING] = True
        die_after = self.engine.faults.take_die()
        sent = 0

        async def send(data: bytes) -> None:
            nonlocal sent
            await response.write(data)
            sent += 1
            if die_after and sent >= die_after:
                self._die(request)

        # a choice's prompt tokens, for continuous usage: its own prompt's
        prompt_of = [len(parsed.prompts[h.index // parsed.n].ids) for h in handles]
        if chat:  # vLLM sends the role first, one chunk per choice
            for index, prompt in enumerate(prompt_of):
                first_usage = openai.usage(prompt, 0, None, full=False)
                await send(
                    openai.sse(
                        openai.chat_chunk(
                            parsed,
                            model,
                            None,
                            None,
                            first=True,
                            usage_body=first_usage if parsed.continuous_usage else None,
                            index=index,
                        )
                    )
                )
        num_out = [0 for _ in handles]
        live = len(handles)
        while live:
            out = await queue.get()
            i = out.index
            num_out[i] += 1
            text = self.tokenizer.decode_one(out.token_id)
            running = openai.usage(prompt_of[i], num_out[i], None, full=False)
            step_usage = running if parsed.continuous_usage else None
            stamp = not parsed.include_usage  # else the usage chunk is the final message
            if chat:
                chunk = openai.chat_chunk(
                    parsed,
                    model,
                    text,
                    out.finish_reason,
                    usage_body=step_usage,
                    final_fingerprint=stamp,
                    index=i,
                )
            else:
                chunk = openai.completion_chunk(
                    parsed,
                    model,
                    text,
                    out.finish_reason,
                    step_usage,
                    final_fingerprint=stamp,
                    token_ids=[out.token_id],
                    index=i,
                )
            await send(openai.sse(chunk))
            if out.finish_reason is not None:
                live -= 1
        if parsed.include_usage:
            final = openai.usage(
                self._prompt_tokens(parsed), sum(num_out), self._cached(handles), full=False
            )
            await send(openai.sse(openai.usage_chunk(parsed, model, chat, final)))
        await send(openai.sse("[DONE]"))
        await response.write_eof()
        return response

    def _die(self, request: web.Request) -> None:
        faults = self.engine.faults
        if faults.die_mode == "exit":
            self.engine.metrics.faults["exit"].inc()
            log.warning("fault: exiting mid-stream (exit code %d)", DIE_EXIT_CODE)
            os._exit(DIE_EXIT_CODE)
        self.engine.metrics.faults["die_stream"].inc()
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("fault: stream closed mid-response")


def _json(body: Any, status: int = 200) -> web.Response:
    """Compact JSON, as FastAPI's JSONResponse (vLLM) writes it."""
    return web.Response(
        text=json.dumps(body, separators=(",", ":")),
        status=status,
        content_type="application/json",
    )


def _engine_died(task: asyncio.Task[None]) -> None:
    """A crashed engine loop ends the process, as a dead engine core ends ``vllm serve``:
    requests must not wait forever on a server that still answers /health."""
    if task.cancelled():
        return
    exc = task.exception()
    log.critical("engine loop died: %r", exc, exc_info=exc)
    os._exit(1)


async def _forever() -> None:
    await asyncio.Event().wait()


def _loopback_only(request: web.Request) -> None:
    remote = request.remote or ""
    try:
        loopback = ipaddress.ip_address(remote).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise RequestError("the fault API answers loopback clients only", 403, "Forbidden")


async def _json_body(request: web.Request) -> Any:
    media = request.content_type.lower()
    if media != "application/json":
        raise openai.validation_error("Unsupported Media Type: Only 'application/json' is allowed")
    raw = await request.read()
    try:
        return json.loads(raw)
    except RecursionError:  # nested past the parser's stack: FastAPI's answer, as vLLM's
        raise web.HTTPBadRequest(reason="There was an error parsing the body") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        position = getattr(exc, "pos", getattr(exc, "start", 0))
        detail = {
            "type": "json_invalid",
            "loc": f"body.{position}",
            "msg": "JSON decode error",
            "input": "<dict of 0 items>",
            "ctx": {"error": getattr(exc, "msg", str(exc))},
        }
        raise openai.validation_error(str(detail), f"body.{position}") from None


def _with_vocab(config: SimConfig, vocab_size: int) -> SimConfig:
    return config if vocab_size == config.vocab_size else replace(config, vocab_size=vocab_size)


def serve(config: SimConfig) -> int:
    """Run one simulated engine until SIGTERM/SIGINT; the process's exit code."""
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(_serve(config))
    return int(uvloop.run(_serve(config)))


async def _serve(config: SimConfig) -> int:
    server = SimServer(config)
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "simulated engine %s ready on http://%s:%d (time scale %g, %d blocks of %d)",
        config.name,
        config.host,
        config.port,
        config.time_scale,
        config.num_blocks,
        config.block_size,
    )
    await stop.wait()
    await runner.cleanup()
    return 0
