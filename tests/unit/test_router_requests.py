"""An OpenAI body -> RouteRequest: shapes understood, estimates, limits."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

from router.errors import BadRequest
from router.requests import (
    check_headers,
    estimate_tokens,
    parse_body,
    render_messages,
    to_route_request,
)
from router.types import RouteRequest


def route(
    kind: str, body: Mapping[str, object], user: str = "", session_id: str = ""
) -> RouteRequest:
    return to_route_request(
        kind,
        parse_body(json.dumps(body).encode()),
        request_id="r1",
        user=user,
        session_id=session_id,
    )


def test_a_string_prompt_is_its_text_and_a_quarter_of_its_length_in_tokens() -> None:
    request = route("completions", {"model": "m", "prompt": "x" * 40, "max_tokens": 7})
    assert request.route == "completions"
    assert request.model == "m"
    assert request.prompt_text == "x" * 40
    assert request.prompt_tokens == 10
    assert request.max_tokens == 7
    assert request.token_ids is None


def test_estimates_round_up() -> None:
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_token_ids_are_counted_exactly_and_kept() -> None:
    request = route("completions", {"model": "m", "prompt": [5, 6, 7]})
    assert request.prompt_tokens == 3
    assert request.token_ids == (5, 6, 7)
    assert request.prompt_text == "5 6 7"


def test_a_batch_of_prompts_is_joined_and_summed() -> None:
    text = route("completions", {"model": "m", "prompt": ["abcd", "efghijkl"]})
    assert text.prompt_text == "abcd\nefghijkl"
    assert text.prompt_tokens == 3
    ids = route("completions", {"model": "m", "prompt": [[1, 2], [3, 4, 5]]})
    assert ids.prompt_tokens == 5
    assert ids.token_ids is None


def test_chat_messages_render_role_by_role_with_text_parts_only() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "},
                                     {"type": "image_url", "image_url": {"url": "x"}},
                                     {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None},
    ]  # fmt: skip
    assert render_messages(messages) == "system: be brief\nuser: hi there\nassistant: \n"
    request = route("chat", {"model": "m", "messages": messages, "stream": True})
    assert request.route == "chat"
    assert request.stream is True
    assert request.max_tokens == 256
    assert request.messages == tuple(messages)  # for the precise path's chat template


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 3, "max_tokens": 9}  # fmt: skip
    assert route("chat", body).max_tokens == 3


def test_embeddings_read_input() -> None:
    request = route("embeddings", {"model": "e", "input": ["aaaa", "bbbb"]})
    assert request.prompt_tokens == 2
    assert request.max_tokens == 0


def test_user_from_the_caller_wins_over_the_body() -> None:
    body = {"model": "m", "prompt": "x", "user": "body-user"}
    assert route("completions", body).user == "body-user"
    assert route("completions", body, user="key-user").user == "key-user"
    assert route("completions", body, session_id="s").session_id == "s"


@pytest.mark.parametrize(
    ("kind", "body", "words"),
    [
        ("completions", {"model": "m"}, "'prompt' is required"),
        ("completions", {"model": "m", "prompt": 3}, "'prompt' must be"),
        ("completions", {"model": "m", "prompt": [1, "a"]}, "'prompt' must be"),
        ("completions", {"model": "m", "prompt": []}, "'prompt' must be"),
        ("completions", {"model": 5, "prompt": "x"}, "'model' must be a string"),
        ("completions", {"model": "m", "prompt": "x", "stream": "yes"}, "'stream'"),
        ("completions", {"model": "m", "prompt": "x", "max_tokens": -1}, "'max_tokens'"),
        ("chat", {"model": "m", "messages": []}, "'messages' must be a non-empty list"),
        ("chat", {"model": "m", "messages": [{"content": "x"}]}, "'role'"),
        ("chat", {"model": "m", "messages": [{"role": "u", "content": 3}]}, "content"),
        ("embeddings", {"model": "m"}, "'input' is required"),
    ],
)
def test_malformed_bodies_are_bad_requests(kind: str, body: dict[str, object], words: str) -> None:
    with pytest.raises(BadRequest, match=words) as caught:
        route(kind, body)
    assert caught.value.status == 400


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_a_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_body(raw)
    assert caught.value.status == 400


def test_oversized_headers_are_400() -> None:
    check_headers({"a": "b" * 90}, 100)
    with pytest.raises(BadRequest, match="limit is 100") as caught:
        check_headers({"a": "b" * 100}, 100)
    assert caught.value.status == 400
