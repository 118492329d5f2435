"""An OpenAI request body -> ``RouteRequest``: parsed once, bounded, validated for routing.

The proxy forwards the client's bytes as they are; this module only reads what routing
needs: the model, the prompt as text (for the approximate prefix index) and its size in
tokens, ``max_tokens``, ``stream``, the user and the session. Shapes understood:

* completions: ``prompt`` as a string, a list of strings (a batch, joined by newlines),
  a list of token ids, or a list of such lists;
* chat: ``messages`` rendered role by role, ``"<role>: <text>\\n"`` each, where a
  content given as parts keeps its text parts (images and audio count no text);
* embeddings: ``input`` in the completions prompt shapes.

Token counts are exact for token-id prompts and estimated as ``ceil(chars / 4)`` for text
(the common rule of thumb for English BPE vocabularies); the precise path tokenizes for
real. Everything else in the body is the engine's business: the router does not
re-validate sampling parameters (the engine answers 400 for them, and the proxy passes
that answer through).

Limits: a body over ``max_body_bytes`` is ``BadRequest`` 413 (checked against
Content-Length before reading and while reading); a header block over
``max_header_bytes`` is 400. Rejected: aiohttp's own ``client_max_size`` (it answers
413 with a text body, not OpenAI's error JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from router.errors import BadRequest
from router.types import RouteRequest

__all__ = [
    "ROUTES",
    "check_headers",
    "estimate_tokens",
    "parse_body",
    "render_messages",
    "to_route_request",
]

# request path -> RouteRequest.route
ROUTES = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
}
_DEFAULT_MAX_TOKENS = {"completions": 16, "chat": 256, "embeddings": 0}


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def check_headers(headers: Mapping[str, str], max_header_bytes: int) -> None:
    """``BadRequest`` (400) when the header block is larger than ``max_header_bytes``."""
    size = sum(len(k) + len(v) + 4 for k, v in headers.items())
    if size > max_header_bytes:
        raise BadRequest(
            f"request headers are {size} bytes; the limit is {max_header_bytes}", status=400
        )


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; ``BadRequest`` for anything else."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompt(value: Any, field: str) -> tuple[str, int, tuple[int, ...] | None]:
    """(text, tokens, token ids when exactly one tokenized prompt) of a prompt/input."""
    if isinstance(value, str):
        return value, estimate_tokens(value), None
    if _is_token_ids(value):
        return " ".join(map(str, value)), len(value), tuple(value)
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            text = "\n".join(value)
            return text, sum(estimate_tokens(p) for p in value), None
        if all(_is_token_ids(p) for p in value):
            text = "\n".join(" ".join(map(str, p)) for p in value)
            return text, sum(len(p) for p in value), None
    raise BadRequest(
        f"'{field}' must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequest("a message's content parts must be objects")
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    raise BadRequest("a message's content must be a string, a list of parts or null")


def render_messages(messages: Any) -> str:
    """Chat messages as one text, role by role (what the approximate index hashes)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    lines = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a string 'role'")
        lines.append(f"{message['role']}: {_content_text(message.get('content'))}\n")
    return "".join(lines)


def _int_field(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadRequest(f"'{name}' must be an integer >= 0")
        return value
    return None


def to_route_request(
    route: str,
    body: Mapping[str, Any],
    *,
    request_id: str,
    user: str = "",
    session_id: str = "",
    arrival_s: float = 0.0,
) -> RouteRequest:
    """What routing needs of ``body`` (already parsed by ``parse_body``).

    ``user`` (from a header or an API key) wins over the body's ``user`` field.
    """
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    messages: tuple[Mapping[str, Any], ...] = ()
    if route == "chat":
        text = render_messages(body.get("messages"))
        tokens, token_ids = estimate_tokens(text), None
        messages = tuple(body["messages"])  # the precise path renders the chat template
    elif route == "completions":
        if "prompt" not in body:
            raise BadRequest("'prompt' is required")
        text, tokens, token_ids = _prompt(body["prompt"], "prompt")
    elif route == "embeddings":
        if "input" not in body:
            raise BadRequest("'input' is required")
        text, tokens, token_ids = _prompt(body["input"], "input")
    else:
        raise AssertionError(f"unknown route {route!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    max_tokens = _int_field(body, "max_completion_tokens", "max_tokens")
    body_user = body.get("user", "")
    if not user and isinstance(body_user, str):
        user = body_user
    return RouteRequest(
        request_id=request_id,
        route=route,
        model=model,
        prompt_text=text,
        prompt_tokens=tokens,
        max_tokens=_DEFAULT_MAX_TOKENS[route] if max_tokens is None else max_tokens,
        user=user,
        session_id=session_id,
        stream=stream,
        arrival_s=arrival_s,
        token_ids=token_ids,
        messages=messages,
    )
