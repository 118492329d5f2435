"""The rolling request-size histogram (router/sizes.py) on virtual time, and the token
counts read from an answer's bytes as they pass the proxy."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.errors import BadRequest
from router.sizes import EDGES, OTHER_MODEL, RequestSizes, ResponseTokens, bin_of


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cells(
    sizes: RequestSizes, model: str | None = None, window_s: float = 300.0
) -> dict[tuple[int, int], int]:
    counts = sizes.snapshot(model, window_s).counts
    return {(i, j): n for i, row in enumerate(counts) for j, n in enumerate(row) if n}


def test_edges_are_powers_of_two_and_a_length_goes_to_the_smallest_edge_at_or_above_it() -> None:
    assert EDGES == (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    assert [bin_of(n) for n in (0, 1, 16, 17, 32, 33, 1000, 1024, 1025)] == [
        0,
        0,
        0,
        1,
        1,
        2,
        6,
        6,
        7,
    ]
    assert bin_of(32768) == 11 and bin_of(10**6) == 11  # above the last edge: the last bin


def test_a_request_counts_in_the_cell_of_its_completion_row_and_prompt_column() -> None:
    clock = Clock()
    sizes = RequestSizes(clock=clock)
    sizes.record("m", prompt_tokens=100, completion_tokens=20)
    sizes.record("m", prompt_tokens=128, completion_tokens=32)
    sizes.record("m", prompt_tokens=5000, completion_tokens=1)
    assert cells(sizes, "m") == {(1, 3): 2, (0, 9): 1}
    snapshot = sizes.snapshot("m", 300.0).to_json()
    assert snapshot["count"] == 3 and snapshot["model"] == "m"
    assert snapshot["out_edges"] == snapshot["in_edges"] == list(EDGES)
    assert len(snapshot["counts"]) == 12 and all(len(row) == 12 for row in snapshot["counts"])
    json.dumps(snapshot)  # what the endpoint answers


def test_models_are_kept_apart_and_no_model_sums_them_all() -> None:
    sizes = RequestSizes(clock=Clock())
    sizes.record("a", 10, 10)
    sizes.record("b", 10, 10)
    sizes.record("b", 3000, 300)
    assert cells(sizes, "a") == {(0, 0): 1}
    assert cells(sizes, "b") == {(0, 0): 1, (5, 8): 1}
    assert cells(sizes) == {(0, 0): 2, (5, 8): 1}
    assert sizes.snapshot("never-seen", 300.0).count == 0


def test_the_window_covers_whole_slots_and_its_span_and_rate_say_what_was_covered() -> None:
    clock = Clock(1000.0)
    sizes = RequestSizes(slot_s=10.0, max_window_s=600.0, clock=clock)
    # one request at each of t = +5, +15, ..., +295 (30 slots of 10 s, one each)
    for k in range(30):
        clock.now = 1000.0 + 10 * k + 5
        sizes.record("m", 50, 50)
    clock.now = 1300.0  # slot 30 starts; nothing in it yet
    whole = sizes.snapshot("m", 300.0)
    assert (whole.count, whole.span_s) == (30, 300.0)
    assert whole.rate == pytest.approx(0.1)
    recent = sizes.snapshot("m", 100.0)  # slots starting at or after 1200: 20..30
    assert (recent.count, recent.span_s) == (10, 100.0)
    clock.now = 1304.0  # a window of 100 s now starts with slot 21 (1210 >= 1204)
    partial = sizes.snapshot("m", 100.0)
    assert (partial.count, partial.span_s) == (9, 94.0)
    assert partial.rate == pytest.approx(9 / 94.0)


def test_right_after_start_the_span_is_the_time_since_start_not_the_window() -> None:
    clock = Clock(50.0)
    sizes = RequestSizes(clock=clock)
    clock.now = 62.0
    sizes.record("m", 20, 20)
    sizes.record("m", 20, 20)
    snapshot = sizes.snapshot(None, 300.0)
    assert (snapshot.count, snapshot.span_s, snapshot.rate) == (2, 12.0, 2 / 12.0)
    clock.now = 50.0
    assert RequestSizes(clock=clock).snapshot().rate == 0.0  # no time covered: no rate


def test_slots_older_than_the_ring_are_forgotten_when_their_place_is_reused() -> None:
    clock = Clock(0.0)
    sizes = RequestSizes(slot_s=10.0, max_window_s=60.0, clock=clock)
    sizes.record("m", 20, 20)  # slot 0 at ring place 0
    clock.now = 70.0  # slot 7 reuses ring place 0 (7 places)
    assert sizes.snapshot("m", 60.0).count == 0  # slot 0 is out of every window
    sizes.record("m", 40, 40)
    assert cells(sizes, "m", 60.0) == {(2, 2): 1}  # the old count is gone, not added


def test_a_model_idle_longer_than_the_ring_reads_as_zero_not_old_counts() -> None:
    clock = Clock(0.0)
    sizes = RequestSizes(slot_s=10.0, max_window_s=60.0, clock=clock)
    for _ in range(5):
        sizes.record("m", 20, 20)
    clock.now = 1000.0
    assert sizes.snapshot("m", 60.0).count == 0


@pytest.mark.parametrize("window_s", [0.0, 5.0, 601.0, float("nan"), float("inf"), -10.0])
def test_a_window_outside_the_ring_is_a_bad_request_naming_the_bounds(window_s: float) -> None:
    sizes = RequestSizes(slot_s=10.0, max_window_s=600.0, clock=Clock())
    with pytest.raises(BadRequest, match="between 10 and 600 seconds") as refused:
        sizes.snapshot(None, window_s)
    assert refused.value.status == 400


def test_models_beyond_the_bound_share_one_histogram() -> None:
    sizes = RequestSizes(max_models=2, clock=Clock())
    for model in ("a", "b", "c", "d"):
        sizes.record(model, 20, 20)
    sizes.record("a", 20, 20)
    assert sizes.models() == ["a", "b", OTHER_MODEL]
    assert sizes.snapshot("a").count == 2
    assert sizes.snapshot(OTHER_MODEL).count == 2
    assert sizes.snapshot(None).count == 5


# ---- token counts from the answer's bytes ------------------------------------------------


def test_a_json_answer_reports_the_usage_block() -> None:
    body = json.dumps(
        {"choices": [{"text": 'say "prompt_tokens": 999'}],
         "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}}
    ).encode()  # fmt: skip
    tokens = ResponseTokens(stream=False)
    for start in range(0, len(body), 9):  # in small pieces, as the engine may send it
        tokens.feed(body[start : start + 9])
    assert (tokens.prompt_tokens(), tokens.completion_tokens()) == (12, 7)


def test_an_answer_without_usage_has_no_prompt_count_and_no_completion_tokens() -> None:
    tokens = ResponseTokens(stream=False)
    tokens.feed(b'{"error": "nope"}')
    assert (tokens.prompt_tokens(), tokens.completion_tokens()) == (None, 0)


def _sse(*events: Any) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def test_a_chat_stream_without_usage_counts_one_token_per_content_event() -> None:
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    token = {"choices": [{"delta": {"content": 'x "role"'}, "finish_reason": None}]}
    last = {"choices": [{"delta": {"content": "y"}, "finish_reason": "length"}]}
    body = _sse(role, token, token, token, last)
    for size in (1, 7, 64, len(body)):  # a pattern split across pieces counts once
        tokens = ResponseTokens(stream=True)
        for start in range(0, len(body), size):
            tokens.feed(body[start : start + size])
        assert (tokens.prompt_tokens(), tokens.completion_tokens()) == (None, 4)


def test_a_stream_with_a_usage_chunk_reports_the_usage() -> None:
    token = {"choices": [{"text": "a", "finish_reason": None}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3}}
    tokens = ResponseTokens(stream=True)
    tokens.feed(_sse(token, token, usage))
    assert (tokens.prompt_tokens(), tokens.completion_tokens()) == (40, 3)


def test_the_rate_has_a_floor_of_one_slot_right_after_start() -> None:
    # review finding 5: 10 requests in the first 0.2 s read as 50 req/s
    clock = Clock(50.0)
    sizes = RequestSizes(slot_s=10.0, clock=clock)
    clock.now = 50.2
    for _ in range(10):
        sizes.record("m", 20, 20)
        sizes.record_arrival("m")
    snapshot = sizes.snapshot("m", 300.0)
    assert snapshot.span_s == pytest.approx(0.2)  # what was covered, as agreed
    assert snapshot.rate == pytest.approx(1.0)  # 10 over one 10 s slot
    assert snapshot.to_json()["arrival_rate"] == pytest.approx(1.0)


def test_arrivals_count_every_request_received_finished_or_not() -> None:
    clock = Clock(1000.0)
    sizes = RequestSizes(slot_s=10.0, clock=clock)
    clock.now = 1005.0
    for _ in range(30):  # 30 received, 10 finished (the rest refused or held)
        sizes.record_arrival("m")
    for _ in range(10):
        sizes.record("m", 100, 20)
    sizes.record_arrival("other")
    clock.now = 1020.0
    answer = sizes.snapshot("m", 300.0).to_json()
    assert (answer["count"], answer["arrivals"]) == (10, 30)
    assert (answer["rate"], answer["arrival_rate"]) == (0.5, 1.5)
    assert sum(map(sum, answer["counts"])) == 10  # arrivals are not in the shape
    assert sizes.snapshot(None, 300.0).arrivals == 31
    clock.now = 1000.0 + 700.0  # beyond the ring: forgotten like the counts
    assert sizes.snapshot("m", 300.0).arrivals == 0
