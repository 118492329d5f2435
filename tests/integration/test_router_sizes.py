"""The request-size histogram through a real router and a simulated engine (issue 14):
JSON answers, streams with and without usage, chat; ``GET /v1/request_sizes`` and the
token histograms in ``/metrics``; bad windows are 400s naming the bounds."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.server import RouterProcess, running_router
from router.sizes import bin_of
from sim.process import running_sim_engine
from tests.integration.conftest import free_port
from tests.integration.test_router_hold import MODEL, metric


def sizes(router: RouterProcess, query: str) -> tuple[int, Any]:
    status, _, body = router.request("GET", "/v1/request_sizes" + query)
    return status, json.loads(body)


def cells(document: dict[str, Any]) -> dict[tuple[int, int], int]:
    return {(i, j): n for i, row in enumerate(document["counts"]) for j, n in enumerate(row) if n}


def test_finished_requests_land_in_the_cells_of_their_prompt_and_completion_tokens() -> None:
    with running_sim_engine(free_port(), time_scale=20.0) as engine, running_router(
        free_port(), engines=[engine.url], strategy="least-request"
    ) as router:  # fmt: skip
        expected: dict[tuple[int, int], int] = {}

        def send(path: str, body: dict[str, Any], prompt: int, completion: int) -> bytes:
            status, _, answer = router.request("POST", path, {"model": MODEL, **body})
            assert status == 200, answer
            cell = (bin_of(completion), bin_of(prompt))
            expected[cell] = expected.get(cell, 0) + 1
            return answer

        # token-id prompts: the router and the engine count them alike
        answer = send("/v1/completions", {"prompt": [7] * 300, "max_tokens": 40}, 300, 40)
        assert json.loads(answer)["usage"]["completion_tokens"] == 40
        streamed = send("/v1/completions",
                        {"prompt": [7] * 20, "max_tokens": 10, "stream": True}, 20, 10)  # fmt: skip
        assert b'"usage"' not in streamed  # no usage: the router counted the token events
        send("/v1/completions", {"prompt": [7] * 3000, "max_tokens": 100, "stream": True,
             "stream_options": {"include_usage": True}}, 3000, 100)  # fmt: skip
        chat = {"messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 5}
        status, _, answer = router.request("POST", "/v1/chat/completions", {"model": MODEL, **chat})
        assert status == 200
        chat_prompt = json.loads(answer)["usage"]["prompt_tokens"]
        chat_cell = (bin_of(5), bin_of(chat_prompt))
        expected[chat_cell] = expected.get(chat_cell, 0) + 1

        status, document = sizes(router, f"?model={MODEL}&window_s=60")
        assert status == 200, document
        assert (document["model"], document["window_s"], document["count"]) == (MODEL, 60.0, 4)
        assert cells(document) == expected
        # the rates' span has a floor of one 10 s slot; span_s is rounded to ms
        rate = 4 / max(document["span_s"], 10.0)
        assert 0 < document["span_s"] <= 60 and document["rate"] == pytest.approx(rate, rel=0.01)
        assert (document["arrivals"], document["arrival_rate"]) == (4, document["rate"])
        assert document["out_edges"] == document["in_edges"] == [2**k for k in range(4, 16)]
        status, everything = sizes(router, "")  # every model, the default window
        assert (status, everything["model"], everything["window_s"]) == (200, None, 300.0)
        assert cells(everything) == expected
        assert sizes(router, "?model=another")[1]["count"] == 0
        # a request no engine can serve is refused: an arrival, not a finished request
        status, _, _ = router.request(
            "POST", "/v1/completions", {"model": "another", "prompt": "x", "max_tokens": 1}
        )
        assert status != 200
        refused = sizes(router, "?model=another")[1]
        assert (refused["count"], refused["arrivals"]) == (0, 1)

        assert metric(router, "shoal_router_request_prompt_tokens_count", model=MODEL) == 4
        assert metric(router, "shoal_router_request_completion_tokens_sum", model=MODEL) == 155
        assert metric(router, "shoal_router_request_prompt_tokens_bucket", model=MODEL,
                      le="512.0") == 3  # 300, 20 and the chat's  # fmt: skip


def test_a_window_the_router_cannot_answer_is_a_400_naming_the_bounds() -> None:
    with running_sim_engine(free_port(), time_scale=20.0) as engine, running_router(
        free_port(), engines=[engine.url]
    ) as router:  # fmt: skip
        for query, words in (
            ("?window_s=abc", "number of seconds"),
            ("?window_s=5", "between 10 and 600"),
            ("?window_s=100000", "between 10 and 600"),
            ("?window_s=nan", "between 10 and 600"),
        ):
            status, document = sizes(router, query)
            assert status == 400 and words in document["error"]["message"], query
