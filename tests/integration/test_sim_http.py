"""A simulated engine process over real sockets: vLLM's OpenAI routes, SSE shape, usage,
metrics names and labels, and vLLM-style errors."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from sim.process import SimEngineProcess, running_sim_engine
from tests.integration.conftest import free_port, wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-sim"


@pytest.fixture(scope="module")
def engine() -> Iterator[SimEngineProcess]:
    with running_sim_engine(
        free_port(),
        served_model_name=MODEL,
        model="/models/tiny",
        time_scale=50,
        max_model_len=512,
        num_gpu_blocks=256,
        max_request_bytes=4096,
    ) as handle:
        yield handle


def post(engine: SimEngineProcess, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    status, raw = engine.request("POST", path, body)
    return status, json.loads(raw)


def stream(engine: SimEngineProcess, path: str, body: dict[str, Any]) -> list[str]:
    """The SSE ``data:`` payloads of one streamed response, in order."""
    req = urllib.request.Request(
        engine.url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        text = reply.read().decode()
    events = text.split("\n\n")
    assert events[-1] == "", "every event ends with a blank line"
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e[len("data: ") :] for e in events[:-1]]


def test_streamed_completion_has_vllms_chunks_usage_and_done(engine: SimEngineProcess) -> None:
    body = {
        "model": MODEL,
        "prompt": "the quick brown fox",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    *chunks, done = stream(engine, "/v1/completions", body)
    assert done == "[DONE]"
    tokens = [json.loads(c) for c in chunks[:-1]]
    usage = json.loads(chunks[-1])
    assert len(tokens) == 5
    ids = {t["id"] for t in tokens} | {usage["id"]}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for t in tokens:
        assert t["object"] == "text_completion" and t["model"] == MODEL
        (choice,) = t["choices"]
        assert set(choice) == {
            "index",
            "text",
            "logprobs",
            "finish_reason",
            "stop_reason",
            "prompt_token_ids",
            "token_ids",
        }
        assert choice["text"]
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 4 + ["length"]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert usage["system_fingerprint"].startswith("shoal-sim-")


def test_streamed_chat_starts_with_the_role_and_ends_with_usage(engine: SimEngineProcess) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    *chunks, done = stream(engine, "/v1/chat/completions", body)
    assert done == "[DONE]"
    parsed = [json.loads(c) for c in chunks]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in parsed
    )
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0] for c in parsed[1:-1]]
    assert len(deltas) == 3 and all(set(d["delta"]) == {"content"} for d in deltas)
    assert [d["finish_reason"] for d in deltas] == [None, None, "length"]
    final = parsed[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 3
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 3


def test_without_include_usage_no_usage_chunk_is_sent(engine: SimEngineProcess) -> None:
    *chunks, done = stream(
        engine,
        "/v1/completions",
        {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "stream": True},
    )
    assert done == "[DONE]" and len(chunks) == 2
    assert all("usage" not in json.loads(c) for c in chunks)


def test_non_streaming_answers_have_vllms_fields(engine: SimEngineProcess) -> None:
    status, body = post(
        engine, "/v1/completions", {"model": MODEL, "prompt": [11, 12, 13, 14], "max_tokens": 4}
    )
    assert status == 200 and body["object"] == "text_completion"
    assert body["usage"] == {
        "prompt_tokens": 4,
        "total_tokens": 8,
        "completion_tokens": 4,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert body["choices"][0]["finish_reason"] == "length"
    status, chat = post(
        engine,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert status == 200 and chat["object"] == "chat.completion" and chat["model"] == MODEL
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["completion_tokens"] == 2


def test_the_same_prompt_gives_the_same_text(engine: SimEngineProcess) -> None:
    texts = {
        post(engine, "/v1/completions", {"prompt": "same words", "max_tokens": 6})[1]["choices"][0][
            "text"
        ]
        for _ in range(2)
    }
    assert len(texts) == 1


def test_models_lists_the_served_name_with_vllms_card(engine: SimEngineProcess) -> None:
    models = json.loads(engine.get("/v1/models"))
    assert models["object"] == "list"
    (card,) = models["data"]
    assert (card["id"], card["object"], card["owned_by"], card["root"], card["parent"]) == (
        MODEL,
        "model",
        "vllm",
        "/models/tiny",
        None,
    )
    assert card["max_model_len"] == 512 and card["permission"][0]["object"] == "model_permission"


def error_of(status: int, body: dict[str, Any]) -> tuple[int, str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return status, body["error"]["type"], body["error"]["param"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "nope", "prompt": "x"}, (404, "NotFoundError", "model")),
        ({"model": MODEL}, (400, "BadRequestError", "prompt")),
        ({"prompt": []}, (400, "BadRequestError", None)),
        ({"prompt": "x", "n": 0}, (400, "BadRequestError", None)),
        ({"prompt": "x", "n": 2, "temperature": 0}, (400, "BadRequestError", None)),
        (
            {"prompt": "x", "stream_options": {"include_usage": True}},
            (400, "BadRequestError", "stream_options"),
        ),
        ({"prompt": list(range(600))}, (400, "BadRequestError", "input_tokens")),
        ({"prompt": [1, 10**9]}, (400, "BadRequestError", None)),
        ({"prompt": "x", "max_tokens": 513}, (400, "BadRequestError", "max_tokens")),
        ({"prompt": ""}, (400, "BadRequestError", "prompt")),
        ({"prompt": [[]]}, (400, "BadRequestError", None)),
        ({"prompt": list(range(20, 532))}, (400, "BadRequestError", "max_tokens")),
        ({"prompt": [-1, 20]}, (400, "Bad Request", "body.prompt.0")),
        ({"prompt": [20, "a"]}, (400, "Bad Request", "body.prompt.1")),
        ({"prompt": "x", "n": None}, (400, "Bad Request", "body.n")),
        ({"prompt": "x", "max_tokens": 0}, (400, "BadRequestError", "max_tokens")),
        ({"prompt": {"text": "x"}}, (400, "Bad Request", "body.prompt")),
    ],
)
def test_bad_requests_get_vllms_error_json(
    engine: SimEngineProcess, body: dict[str, Any], expected: tuple[int, str, str]
) -> None:
    assert error_of(*post(engine, "/v1/completions", body)) == expected


def test_vllms_wording_for_bad_prompts(engine: SimEngineProcess) -> None:
    """The messages a real ``vllm serve`` (the CPU build) answers for these prompts."""
    cases: list[tuple[Any, str]] = [
        ("", "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"),
        ([[]], "The decoder prompt cannot be empty"),
        # max_tokens is clamped to the room the prompt leaves: none.
        (
            list(range(20, 532)),
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            list(range(20, 533)),
            "This model's maximum context length is 512 tokens. However, your prompt contains "
            "at least 513 input tokens, which exceeds this limit even without any output tokens. "
            "Please reduce the length of the input prompt. (parameter=input_tokens, value=513)",
        ),
        ([20, 10**9], "Token id 1000000000 is out of vocabulary"),
        (
            {"a": 1},
            "4 validation errors:\n"
            "  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
            "'input': '<dict of 1 items>'}\n"
            "  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
            "'input': '<dict of 1 items>'}\n"
            "  {'type': 'string_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid "
            "string', 'input': '<dict of 1 items>'}\n"
            "  {'type': 'list_type', 'loc': 'body.prompt', 'msg': 'Input should be a valid list', "
            "'input': '<dict of 1 items>'}",
        ),
    ]
    for prompt, message in cases:
        status, body = post(engine, "/v1/completions", {"prompt": prompt})
        assert (status, body["error"]["message"]) == (400, message)


def test_chat_messages_are_validated_as_vllm_does(engine: SimEngineProcess) -> None:
    status, body = post(engine, "/v1/chat/completions", {"messages": []})
    assert (status, body["error"]["type"], body["error"]["message"]) == (
        400,
        "BadRequestError",
        "Cannot apply chat template to an empty conversation. Provide at least one message.",
    )
    status, body = post(engine, "/v1/chat/completions", {"messages": [5]})
    assert error_of(status, body) == (
        400,
        "Bad Request",
        "body.messages.0.ChatCompletionDeveloperMessageParam",
    )
    assert body["error"]["message"].startswith("8 validation errors:")


def test_integral_floats_and_numeric_strings_are_ints_as_pydantic_reads_them(
    engine: SimEngineProcess,
) -> None:
    for value in (3.0, "3"):
        status, body = post(engine, "/v1/completions", {"prompt": "x", "max_tokens": value})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
    status, body = post(engine, "/v1/completions", {"prompt": "x", "max_tokens": 2.5})
    assert error_of(status, body) == (400, "Bad Request", "body.max_tokens")
    assert "got a number with a fractional part" in body["error"]["message"]
    status, body = post(engine, "/v1/completions", {"prompt": "x", "max_tokens": None})
    assert status == 200 and body["usage"]["completion_tokens"] == 16, "null is the default"


def test_max_tokens_past_the_prompts_room_is_clamped_as_vllm_does(engine: SimEngineProcess) -> None:
    status, body = post(
        engine, "/v1/completions", {"prompt": list(range(1, 501)), "max_tokens": 100}
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 12  # 512 - 500


def test_malformed_json_wrong_type_and_oversized_bodies(engine: SimEngineProcess) -> None:
    cases = [
        (b"{nope", "application/json", 400, "Bad Request"),
        (b'{"prompt": "x"}', "text/plain", 400, "Bad Request"),
        (
            b'{"prompt": "' + b"x" * 5000 + b'"}',
            "application/json",
            413,
            "Request Entity Too Large",
        ),
    ]
    for data, media, status, kind in cases:
        req = urllib.request.Request(
            engine.url + "/v1/completions", data=data, headers={"Content-Type": media}
        )
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(req, timeout=10)
        body = json.loads(raised.value.read())
        assert error_of(raised.value.code, body)[:2] == (status, kind)
    # Nested past the parser's depth: FastAPI's answer, as the real engine gives it.
    req = urllib.request.Request(
        engine.url + "/v1/completions",
        data=b"[" * 2000 + b"]" * 2000,
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as nested:
        urllib.request.urlopen(req, timeout=10)
    assert nested.value.code == 400
    assert json.loads(nested.value.read()) == {"detail": "There was an error parsing the body"}
    assert engine.healthy()


def test_metrics_have_vllms_names_and_labels(engine: SimEngineProcess) -> None:
    post(engine, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 3})
    text = engine.get("/metrics")
    labels = f'engine="0",model_name="{MODEL}"'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:external_prefix_cache_hits_total",
    ):
        assert re.search(rf"^{name}\{{{labels}\}} ", text, re.M), name
    success = re.search(
        rf'^vllm:request_success_total\{{engine="0",finished_reason="length",'
        rf'model_name="{MODEL}"\}} (\S+)',
        text,
        re.M,
    )
    assert success and float(success.group(1)) >= 1
    ttft_buckets = re.findall(
        r'vllm:time_to_first_token_seconds_bucket\{engine="0",le="([^"]+)"', text
    )
    assert ttft_buckets[:3] == ["0.001", "0.005", "0.01"] and ttft_buckets[-1] == "+Inf"
    assert 'vllm:cache_config_info{block_size="16"' in text
    assert re.search(
        r'^vllm:prompt_tokens_by_source_total\{engine="0",model_name="tiny-sim",'
        r'source="local_compute"\} [1-9]',
        text,
        re.M,
    )
    assert (
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny-sim",reason="capacity"}'
        in text
    )


def test_a_client_that_hangs_up_aborts_its_request(engine: SimEngineProcess) -> None:
    body = json.dumps({"prompt": [3, 4], "max_tokens": 400, "stream": True}).encode()
    engine.set_faults(slowdown=50.0)  # 400 tokens take seconds: the hang-up comes first
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as conn:
        conn.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    pattern = r"^shoal_sim_client_aborts_total\{.*\} (\S+)"

    def aborted() -> float:
        found = re.search(pattern, engine.get("/metrics"), re.M)
        return float(found.group(1)) if found else 0.0

    assert wait_until(lambda: aborted() >= 1)
    engine.set_faults(slowdown=1.0)
    assert wait_until(
        lambda: (
            'vllm:num_requests_running{engine="0",model_name="tiny-sim"} 0.0'
            in engine.get("/metrics")
        )
    )


def test_unknown_routes_and_lora_routes_without_enable_lora_are_fastapis_404(
    engine: SimEngineProcess,
) -> None:
    for path in ("/v1/nothing", "/v1/load_lora_adapter"):
        status, raw = engine.request("POST", path, {"lora_name": "a", "lora_path": "/x"})
        assert (status, json.loads(raw)) == (404, {"detail": "Not Found"})


def test_two_live_requests_may_share_an_x_request_id(engine: SimEngineProcess) -> None:
    """vLLM maps one external id to several internal requests; a router that forwards its
    own X-Request-Id (a retry, a hedge) must get each answer, not a hang or the other's
    tokens."""
    results: dict[int, tuple[int, dict[str, Any]]] = {}

    def ask(max_tokens: int) -> None:
        req = urllib.request.Request(
            engine.url + "/v1/completions",
            data=json.dumps(
                {"prompt": f"shared id {max_tokens}", "max_tokens": max_tokens}
            ).encode(),
            headers={"Content-Type": "application/json", "X-Request-Id": "router-7"},
        )
        with urllib.request.urlopen(req, timeout=10) as reply:
            results[max_tokens] = (reply.status, json.loads(reply.read()))

    threads = [threading.Thread(target=ask, args=(n,)) for n in (20, 60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert sorted(results) == [20, 60], "a request with a shared id never got its answer"
    for max_tokens, (status, body) in results.items():
        assert status == 200 and body["id"] == "cmpl-router-7"
        assert body["usage"]["completion_tokens"] == max_tokens
        assert len(body["choices"][0]["text"].split()) == max_tokens


def test_a_client_that_hangs_up_aborts_every_child_of_its_request(
    engine: SimEngineProcess,
) -> None:
    """n = 3 over two prompts is six engine requests; a hang-up aborts all six."""
    pattern = r"^shoal_sim_client_aborts_total\{.*\} (\S+)"

    def aborted() -> float:
        found = re.search(pattern, engine.get("/metrics"), re.M)
        return float(found.group(1)) if found else 0.0

    def running() -> float:
        found = re.search(r"^vllm:num_requests_running\{.*\} (\S+)", engine.get("/metrics"), re.M)
        assert found
        return float(found.group(1))

    before = aborted()
    body = json.dumps(
        {"prompt": [[3, 4], [5, 6, 7]], "n": 3, "max_tokens": 400, "stream": True}
    ).encode()
    engine.set_faults(slowdown=50.0)  # 400 tokens take seconds: the hang-up comes first
    try:
        with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as conn:
            conn.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            while b"data: {" not in received:
                chunk = conn.recv(4096)
                assert chunk, "the engine closed the stream"
                received += chunk
            assert running() == 6
        assert wait_until(lambda: aborted() - before == 6)
    finally:
        engine.set_faults(slowdown=1.0)
    assert wait_until(lambda: running() == 0)


def test_n_children_sample_different_texts_and_the_first_is_the_prompts_own(
    engine: SimEngineProcess,
) -> None:
    body: dict[str, Any] = {"prompt": "same words", "max_tokens": 6}
    _, one = post(engine, "/v1/completions", body)
    _, three = post(engine, "/v1/completions", body | {"n": 3})
    texts = [c["text"] for c in three["choices"]]
    assert texts[0] == one["choices"][0]["text"]
    assert len(set(texts)) == 3
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]


def test_n_past_vllms_limit_is_refused(engine: SimEngineProcess) -> None:
    status, body = post(engine, "/v1/completions", {"prompt": "x", "n": 16385})
    assert error_of(status, body) == (400, "BadRequestError", None)
    assert body["error"]["message"].startswith("n must be at most 16384, got 16385.")


def test_a_batch_with_one_bad_prompt_is_refused_whole(engine: SimEngineProcess) -> None:
    status, body = post(engine, "/v1/completions", {"prompt": [[20, 21], []]})
    assert error_of(status, body) == (400, "BadRequestError", None)
    assert body["error"]["message"] == "The decoder prompt cannot be empty"
