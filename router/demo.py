"""``shoal up --demo``: a short conversation through the router, turn by turn.

Two conversations of three turns each (two tenants: different system prompts) go
through the router as chat clients send them (each turn resends the whole history). For every turn
the demo prints the engine the router chose (``x-shoal-engine``), the prompt's size and
how much of it the engine served from cache (``usage.prompt_tokens_details.cached_tokens``,
which ``shoal up`` engines report: ``--enable-prompt-tokens-details``). What it shows:
turn 1 of a conversation is computed in full wherever it lands; turns 2 and 3 go to the
engine holding the conversation's prefix and find all but the last, partial, block of
their history cached.

Invariant: the demo only reads; it never fails ``shoal up``: an error is printed as the
demo's outcome and the stack keeps serving (as ``shoal cache serve --demo`` does).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from shoal.cli_format import table as text_table

__all__ = ["DemoTurn", "demo_json", "render_demo", "run_demo", "safe_demo"]

# Two tenants, each with a long system prompt (a few hundred tokens for any model), so the
# cached share is visible; a conversation is (system prompt, its three questions).
_LIBRARY = (
    "You are the help desk of a small public library. Answer in one short sentence, kindly, "
    "and never invent an opening hour. The library opens at nine and closes at six on "
    "weekdays, and at noon on Saturdays. Members may borrow ten books for three weeks and "
    "renew them twice online. Laptops can be reserved at the front desk for two hours. "
)
_BAKERY = (
    "You take orders for a bakery. Reply in one short sentence and always confirm the pick-up "
    "time. Bread is baked at five every morning; croissants sell out by ten. Cakes need two "
    "days' notice, and a deposit of a third of the price is paid when ordering. The shop is "
    "closed on Mondays, and gluten-free loaves are baked on Thursdays only. "
)
CONVERSATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (_LIBRARY * 6, ("When do you open on Saturday?", "And until when?", "Can I renew online?")),
    (_BAKERY * 6, ("Can I order a cake for Friday?", "How much deposit?", "Any croissants?")),
)
MAX_TOKENS = 16

Post = Callable[[str, Mapping[str, Any]], tuple[str, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class DemoTurn:
    conversation: int  # 1-based
    turn: int  # 1-based
    engine: str  # the component name (engine-0), or the URL the router named
    prompt_tokens: int
    cached_tokens: int | None  # None: the engine did not say


def post_json(url: str, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(``x-shoal-engine``, the JSON answer) of one POST."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        return reply.headers.get("x-shoal-engine", "?"), json.loads(reply.read())


def run_demo(
    router_url: str, model: str, engine_names: Mapping[str, str], *, post: Post = post_json
) -> list[DemoTurn]:
    """Send the conversations' turns interleaved (turn 1 of each, then turn 2 of each, ...),
    as concurrent users would: each conversation must still find its own engine."""
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": system}] for system, _ in CONVERSATIONS
    ]
    turns: list[DemoTurn] = []
    for turn in range(len(CONVERSATIONS[0][1])):
        for index, (_, questions) in enumerate(CONVERSATIONS):
            history = histories[index]
            history.append({"role": "user", "content": questions[turn]})
            engine, answer = post(
                f"{router_url}/v1/chat/completions",
                {"model": model, "messages": history, "max_tokens": MAX_TOKENS,
                 "temperature": 0.0},
            )  # fmt: skip
            text = answer["choices"][0]["message"].get("content") or ""
            history.append({"role": "assistant", "content": text})
            usage = answer.get("usage") or {}
            details = usage.get("prompt_tokens_details") or {}
            cached = details.get("cached_tokens")
            turns.append(
                DemoTurn(
                    index + 1,
                    turn + 1,
                    engine_names.get(engine, engine),
                    int(usage.get("prompt_tokens", 0)),
                    None if cached is None else int(cached),
                )
            )
    return turns


def render_demo(turns: Sequence[DemoTurn]) -> list[str]:
    rows = []
    for t in sorted(turns, key=lambda t: (t.conversation, t.turn)):
        cached = "?" if t.cached_tokens is None else str(t.cached_tokens)
        share = (
            f"{t.cached_tokens / t.prompt_tokens:.0%}"
            if t.cached_tokens is not None and t.prompt_tokens
            else "?"
        )
        rows.append([str(t.conversation), str(t.turn), t.engine, str(t.prompt_tokens), cached,
                     share])  # fmt: skip
    headers = ("CONVERSATION", "TURN", "ENGINE", "PROMPT TOKENS", "FROM CACHE", "SHARE")
    return text_table(headers, rows, ">><>>>")


def demo_json(turns: Sequence[DemoTurn]) -> dict[str, Any]:
    return {"demo": [asdict(t) for t in turns]}


def safe_demo(
    router_url: str, model: str, engine_names: Mapping[str, str]
) -> tuple[list[DemoTurn], str]:
    """``run_demo``, with an HTTP or connection failure as a message instead of a raise."""
    try:
        return run_demo(router_url, model, engine_names), ""
    except urllib.error.HTTPError as exc:
        return [], f"the router answered {exc.code}: {exc.read()[:300]!r}"
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return [], f"{type(exc).__name__}: {exc}"
