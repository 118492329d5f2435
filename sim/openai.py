"""vLLM's OpenAI request parsing and response shapes, for the simulator's server.

Response bodies copy what vLLM serializes: its pydantic models dumped the way
``serving.py`` dumps them (``vllm/entrypoints/openai/{completion,chat_completion}/``): a
streamed token chunk is ``model_dump_json(exclude_unset=True)`` of what vLLM sets, the final
usage chunk ``exclude_none=True`` (``choices: []``, usage without nulls, the system
fingerprint), a non-streaming response every field. Where 0.33's source and the CPU build
0.32 that the project serves differ, the bytes follow 0.32 as observed from a real
``vllm serve`` (no ``weight_versions``, no ``kv_transfer_params`` in stream chunks).
Errors are vLLM's ``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}``,
a validation message ending in ``(parameter=..., value=...)`` as vLLM's
``VLLMValidationError`` words it; unknown routes are FastAPI's ``{"detail": "Not Found"}``.
The ``system_fingerprint`` is ``shoal-sim-<8 hex of the served name>`` (vLLM's is
``vllm-<version>-<hash>``), so a client can tell a simulator from an engine.

Supported: a completion's prompt as text, token ids, or a list of either (a batch: one
engine request per prompt, ``<id>-<i>`` as vLLM's serving layer names them, each prompt
checked and its ``max_tokens`` clamped on its own), any ``n`` >= 1 (vLLM's checks: an int,
at least 1, at most ``VLLM_MAX_N_SEQUENCES`` = 16384, and 1 under greedy sampling,
``temperature`` = 0), ``max_tokens`` / ``max_completion_tokens``, ``stream``,
``stream_options.include_usage`` and ``continuous_usage_stats``, ``ignore_eos`` (always in
effect). Choice ``index`` is ``prompt * n + child``; usage counts each prompt's tokens once
and every choice's tokens (measured on vLLM 0.32). Rejected with a 400 as vLLM would reject
what it cannot do, or named as unsupported by the simulator: ``best_of``,
``logprobs``/``top_logprobs``, ``echo``, ``use_beam_search``.
Accepted and ignored: sampling knobs (temperature, top_p, seed, stop, ...), which do not
change a simulated step's cost.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sim import validation
from sim.errors import RequestError
from sim.tokens import Tokenizer, render_chat

__all__ = [
    "ParsedRequest",
    "Prompt",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "parse_request",
    "usage",
    "validation_error",
]

_UNSUPPORTED = (
    "best_of",
    "logprobs",
    "top_logprobs",
    "echo",
    "use_beam_search",
    "prompt_logprobs",
    "suffix",
)


_MAX_N = 16384  # vLLM's VLLM_MAX_N_SEQUENCES default
_GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy sampling


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt of a request: its token ids and its ``max_tokens`` (clamped to its room)."""

    ids: list[int]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    request_id: str
    model: str | None
    prompts: tuple[Prompt, ...]
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    created: int
    fingerprint: str
    return_token_ids: bool = False


def error_body(message: str, error_type: str, code: int, param: str | None = None) -> bytes:
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return json.dumps({"error": error}, separators=(",", ":")).encode()


def fingerprint(served_name: str) -> str:
    return "shoal-sim-" + hashlib.sha256(served_name.encode()).hexdigest()[:8]


def invalid(message: str, param: str, value: Any = None) -> RequestError:
    """A ``VLLMValidationError`` (400 BadRequestError) worded as vLLM words it."""
    detail = f"parameter={param}" + (f", value={value}" if value is not None else "")
    return RequestError(f"{message} ({detail})", 400, "BadRequestError", param)


def validation_error(detail: str, param: str | None = None) -> RequestError:
    """FastAPI's RequestValidationError as vLLM's handler words it (type "Bad Request")."""
    return RequestError(f"1 validation error:\n  {detail}", 400, "Bad Request", param)


def _int(
    body: dict[str, Any], name: str, default: int | None, *, nullable: bool = True
) -> int | None:
    """An int field as pydantic's lax mode reads it: ``2.0`` and ``"2"`` are 2."""
    if name not in body:
        return default
    value = body[name]
    if value is None and nullable:
        return None
    number, bad = validation.lax_int(value, f"body.{name}")
    if bad is not None:
        raise validation.refuse([bad])
    return number


def _prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """The token ids of each prompt of a completion request's ``prompt``."""
    errors = validation.prompt_errors(prompt)
    if errors:
        raise validation.refuse(errors)
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(p, str) for p in prompt) and prompt:
        return [tokenizer.encode(p) for p in prompt]
    if all(isinstance(p, list) for p in prompt) and prompt:
        return [[int(t) for t in p] for p in prompt]
    return [[int(t) for t in prompt]]  # one prompt of ids (lax ints), maybe empty


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    prompts = _prompts(prompt, tokenizer)
    if not prompts or prompt == []:
        raise RequestError("You must pass at least one prompt", 400, "BadRequestError")
    for ids in prompts:
        if ids and (min(ids) < 0 or max(ids) >= tokenizer.vocab_size):  # vLLM's renderer
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise RequestError(f"Token id {bad} is out of vocabulary", 400, "BadRequestError")
        if not ids:  # vLLM's input processor
            raise RequestError("The decoder prompt cannot be empty", 400, "BadRequestError")
    return prompts


def _check_n(n: int, body: dict[str, Any]) -> None:
    """vLLM's ``SamplingParams`` checks of ``n`` (``VLLMValidationError`` with no param)."""
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}.", 400, "BadRequestError")
    if n > _MAX_N:
        raise RequestError(
            f"n must be at most {_MAX_N}, got {n}. To increase this limit, set the "
            "VLLM_MAX_N_SEQUENCES environment variable.",
            400,
            "BadRequestError",
        )
    temperature = body.get("temperature")
    if (
        n > 1
        and isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature < _GREEDY_EPS
    ):
        raise RequestError(
            f"n must be 1 when using greedy sampling, got {n}.", 400, "BadRequestError"
        )


def parse_request(
    body: Any,
    *,
    chat: bool,
    tokenizer: Tokenizer,
    max_model_len: int,
    request_id: str | None,
    served_name: str = "",
) -> ParsedRequest:
    """A completion or chat request as the engine needs it; ``RequestError`` otherwise."""
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        raise validation.refuse([validation.error("model_attributes_type", "body", msg, body)])
    if chat:
        if "messages" not in body:
            missing = validation.error("missing", "body.messages", "Field required", body)
            raise validation.refuse([missing])
        messages = body["messages"]
        errors = validation.message_errors(messages)
        if errors:
            raise validation.refuse(errors)
        if not messages:
            raise RequestError(
                "Cannot apply chat template to an empty conversation. Provide at least one "
                "message.",
                400,
                "BadRequestError",
            )
        prompts = [tokenizer.encode(render_chat(messages))]
    else:
        if body.get("prompt") is None or body.get("prompt") == "":
            raise invalid(
                "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
            )
        prompts = _prompt_ids(body["prompt"], tokenizer)
    # completions declare ``n: int = 1``, chat ``n: int | None = 1`` (null is 1)
    n = _int(body, "n", 1, nullable=chat)
    n = 1 if n is None else n
    for name in _UNSUPPORTED:
        value = body.get(name)
        if value is None or value is False or (name == "best_of" and value == 1):
            continue
        raise RequestError(f"the simulator does not support '{name}'", 400, "BadRequestError", name)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("Stream options can only be defined when `stream=True`.", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise validation_error("stream_options must be an object", "body.stream_options")
    options = options or {}
    param = "max_tokens"
    max_tokens = _int(body, "max_completion_tokens", None) if chat else None
    if max_tokens is not None:
        param = "max_completion_tokens"
    else:
        max_tokens = _int(body, "max_tokens", None if chat else 16)
        if max_tokens is None and not chat:
            max_tokens = 16  # a completion's explicit null is the default too (measured)
    if max_tokens is not None and max_tokens > max_model_len:
        raise invalid(
            f"{param}={max_tokens} cannot be greater than max_model_len="
            f"{max_model_len}. Please request fewer output tokens.",
            param,
            max_tokens,
        )
    checked = tuple(_fit(ids, max_tokens, max_model_len) for ids in prompts)
    _check_n(n, body)  # vLLM builds the SamplingParams after the prompt's checks
    prefix = "chatcmpl-" if chat else "cmpl-"
    return ParsedRequest(
        request_id=prefix + (request_id or secrets.token_hex(8)),
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        prompts=checked,
        n=n,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        continuous_usage=bool(options.get("include_usage"))
        and bool(options.get("continuous_usage_stats")),
        created=int(time.time()),
        fingerprint=fingerprint(served_name),
        return_token_ids=bool(body.get("return_token_ids")),
    )


def _fit(prompt_ids: list[int], max_tokens: int | None, max_model_len: int) -> Prompt:
    """One prompt against the context: refused when it does not fit, else its max_tokens."""
    if len(prompt_ids) > max_model_len:
        # vLLM's tokenizer stops at max_model_len + 1 tokens, hence "at least" then.
        qualifier = "at least " if len(prompt_ids) == max_model_len + 1 else ""
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains {qualifier}{len(prompt_ids)} input tokens, which exceeds this "
            "limit even without any output tokens. Please reduce the length of the input "
            "prompt.",
            "input_tokens",
            len(prompt_ids),
        )
    # Within max_model_len vLLM clamps max_tokens to the room the prompt leaves
    # (``get_max_tokens``), then its SamplingParams refuse fewer than 1 (a prompt of
    # max_model_len tokens gets "got 0"), whichever field the client used.
    room = max_model_len - len(prompt_ids)
    max_tokens = min(room, max_tokens) if max_tokens is not None else room
    if max_tokens < 1:
        raise invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
    return Prompt(prompt_ids, max_tokens)


def usage(prompt: int, completion: int, cached: int | None, *, full: bool) -> dict[str, Any]:
    """UsageInfo: ``full`` = every field (non-streaming), else without nulls."""
    body: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    elif full:
        body["prompt_tokens_details"] = None
    if full:
        body["completion_tokens_details"] = None
    return body


def completion_chunk(
    req: ParsedRequest,
    model: str,
    text: str,
    finish: str | None,
    usage_body: dict[str, Any] | None = None,
    final_fingerprint: bool = False,
    token_ids: list[int] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": req.request_id,
        "object": "text_completion",
        "created": req.created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "prompt_token_ids": None,
                "token_ids": token_ids if req.return_token_ids else None,
            }
        ],
    }
    if usage_body is not None:
        chunk["usage"] = usage_body
    if finish is not None and final_fingerprint:
        chunk["system_fingerprint"] = req.fingerprint
    return chunk


def chat_chunk(
    req: ParsedRequest,
    model: str,
    text: str | None,
    finish: str | None,
    *,
    first: bool = False,
    usage_body: dict[str, Any] | None = None,
    final_fingerprint: bool = False,
    index: int = 0,
) -> dict[str, Any]:
    if first:
        choice: dict[str, Any] = {
            "index": index,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    elif finish is None:
        choice = {
            "index": index,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
    else:
        choice = {
            "index": index,
            "delta": {"content": text},
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": None,
        }
    chunk: dict[str, Any] = {
        "id": req.request_id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": model,
        "choices": [choice],
    }
    if usage_body is not None:
        chunk["usage"] = usage_body
    if first:
        chunk["prompt_token_ids"] = None
        chunk["prompt_text"] = None
    elif finish is not None and final_fingerprint:
        chunk["system_fingerprint"] = req.fingerprint
    return chunk


def usage_chunk(
    req: ParsedRequest, model: str, chat: bool, usage_body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": req.request_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": req.created,
        "model": model,
        "choices": [],
        "usage": usage_body,
        "system_fingerprint": req.fingerprint,
    }


def completion_response(
    req: ParsedRequest,
    model: str,
    outputs: Sequence[tuple[str, str]],
    usage_body: dict[str, Any],
) -> dict[str, Any]:
    """``outputs``: (text, finish_reason) of each choice, in ``index`` order."""
    return {
        "id": req.request_id,
        "object": "text_completion",
        "created": req.created,
        "model": model,
        "choices": [
            {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
            for index, (text, finish) in enumerate(outputs)
        ],
        "service_tier": None,
        "system_fingerprint": req.fingerprint,
        "usage": usage_body,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_response(
    req: ParsedRequest,
    model: str,
    outputs: Sequence[tuple[str, str]],
    usage_body: dict[str, Any],
) -> dict[str, Any]:
    """``outputs``: (text, finish_reason) of each choice, in ``index`` order."""
    return {
        "id": req.request_id,
        "object": "chat.completion",
        "created": req.created,
        "model": model,
        "choices": [
            {
                "index": index,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
            for index, (text, finish) in enumerate(outputs)
        ],
        "service_tier": None,
        "system_fingerprint": req.fingerprint,
        "usage": usage_body,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": None,
        "ec_transfer_params": None,
        "metrics": None,
    }


def sse(chunk: dict[str, Any] | str) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def detokenize(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    return "".join(tokenizer.decode_one(t) for t in ids)
