"""Request-body validation errors worded as a real ``vllm serve`` words them.

vLLM's request models are pydantic models in lax mode behind FastAPI; a body they refuse is
answered by vLLM's ``validation_exception_handler``
(``vllm/entrypoints/serve/exception_handling/handlers/validation.py``): 400, type
``"Bad Request"``, ``param`` the dotted ``loc`` of the first error, and a message
``"<n> validation error(s):\\n  {error}\\n  ..."`` listing at most 10 errors, each error's
``input`` summarized (a container as ``"<list of 2 items>"``, anything else as its
``str``, cut at 200 characters).

Emulated here: lax ints (``True``, ``2.0``, ``"2"`` and ``"2.0"`` are ints; ``2.5`` and
``"x"`` are errors, as ``pydantic.TypeAdapter(int)`` decides), and
the union vLLM declares for a completion's ``prompt``, whose errors list each branch's
failures in the branch order the real engine reports (checked against the CPU build:
``list[int >= 0] | list[list[int]] | str | list[str]``); a chat message that is not an
object gets the eight errors of vLLM's message union. The error *lists* match the real
engine's for these shapes; other shapes get a shorter, correctly typed list.

Rejected: importing vLLM's pydantic models (vLLM is not a dependency of the simulator).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from sim.errors import RequestError

__all__ = ["RequestErrors", "lax_int", "message_errors", "prompt_errors", "refuse", "summarize"]

RequestErrors = list[dict[str, Any]]
_MAX_REPORTED = 10
_MAX_INPUT_CHARS = 200
_MAX_ERROR_CHARS = 1000
_MESSAGE_TYPES = (
    "ChatCompletionDeveloperMessageParam",
    "ChatCompletionSystemMessageParam",
    "ChatCompletionUserMessageParam",
    "ChatCompletionAssistantMessageParam",
    "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam",
    "CustomChatCompletionMessageParam",
)
_INT_TEXT = re.compile(r"([+-]?\d+)(?:\.0*)?")


def summarize(value: Any) -> str:
    """vLLM's ``_summarize_error_input``."""
    if isinstance(value, list | tuple | set | frozenset | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = "None" if value is None else str(value)
    if len(text) > _MAX_INPUT_CHARS:
        return text[:_MAX_INPUT_CHARS] + "...[truncated]"
    return text


def error(kind: str, loc: str, msg: str, value: Any, **ctx: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": summarize(value)}
    if ctx:
        found["ctx"] = ctx
    return found


def refuse(errors: RequestErrors) -> RequestError:
    """The 400 vLLM's validation handler answers for ``errors`` (at least one)."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    message = f"{count} validation {label}:\n"
    message += "".join(f"  {str(e)[:_MAX_ERROR_CHARS]}\n" for e in errors[:_MAX_REPORTED])
    if count > _MAX_REPORTED:
        message += f"  ...and {count - _MAX_REPORTED} more {label}\n"
    return RequestError(message.rstrip(), 400, "Bad Request", str(errors[0]["loc"]))


def lax_int(value: Any, loc: str) -> tuple[int | None, dict[str, Any] | None]:
    """(the int pydantic's lax mode reads from ``value``, None) or (None, its error):
    bools, integral floats and strings such as ``" 7 "`` or ``"7.0"`` are ints."""
    if isinstance(value, int):
        return int(value), None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, error("finite_number", loc, "Input should be a finite number", value)
        if not value.is_integer():
            msg = "Input should be a valid integer, got a number with a fractional part"
            return None, error("int_from_float", loc, msg, value)
        if abs(value) >= 2**63:
            msg = "Unable to parse input string as an integer, exceeded maximum size"
            return None, error("int_parsing_size", loc, msg, value)
        return int(value), None
    if isinstance(value, str):
        digits = _INT_TEXT.fullmatch(value.strip())
        if digits:
            return int(digits.group(1)), None
        msg = "Input should be a valid integer, unable to parse string as an integer"
        return None, error("int_parsing", loc, msg, value)
    return None, error("int_type", loc, "Input should be a valid integer", value)


def _not_list(value: Any, loc: str) -> RequestErrors:
    return [error("list_type", loc, "Input should be a valid list", value)]


def _ints(items: Sequence[Any], loc: str, *, nonnegative: bool) -> RequestErrors:
    found = []
    for i, item in enumerate(items):
        number, bad = lax_int(item, f"{loc}.{i}")
        if bad is None and nonnegative and number is not None and number < 0:
            msg = "Input should be greater than or equal to 0"
            bad = error("greater_than_equal", f"{loc}.{i}", msg, item, ge=0)
        if bad is not None:
            found.append(bad)
    return found


def prompt_errors(prompt: Any) -> RequestErrors:
    """Why no branch of vLLM's ``prompt`` union accepts ``prompt``; empty when one does."""
    loc = "body.prompt"
    if isinstance(prompt, str):
        return []
    if not isinstance(prompt, list):
        msg = "Input should be a valid string"
        return [
            *_not_list(prompt, loc),
            *_not_list(prompt, loc),
            error("string_type", loc, msg, prompt),
            *_not_list(prompt, loc),
        ]
    ids = _ints(prompt, loc, nonnegative=True)
    nested: RequestErrors = []
    for i, item in enumerate(prompt):
        if isinstance(item, list):
            nested += _ints(item, f"{loc}.{i}", nonnegative=False)
        else:
            nested += _not_list(item, f"{loc}.{i}")
    texts = [
        error("string_type", f"{loc}.{i}", "Input should be a valid string", item)
        for i, item in enumerate(prompt)
        if not isinstance(item, str)
    ]
    if not ids or not nested or not texts:
        return []
    whole = error("string_type", loc, "Input should be a valid string", prompt)
    return [*ids, *nested, whole, *texts]


def message_errors(messages: Any) -> RequestErrors:
    """Why vLLM's chat ``messages`` field refuses ``messages``; empty when it accepts it."""
    loc = "body.messages"
    if not isinstance(messages, list):
        return _not_list(messages, loc)
    found: RequestErrors = []
    for i, message in enumerate(messages):
        if isinstance(message, dict):
            continue
        msg = "Input should be a valid dictionary"
        found += [error("dict_type", f"{loc}.{i}.{t}", msg, message) for t in _MESSAGE_TYPES]
        msg = "Input should be a valid dictionary or object to extract fields from"
        found.append(error("model_attributes_type", f"{loc}.{i}.Message", msg, message))
    return found
