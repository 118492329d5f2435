"""Trace loading for the autoscaling simulator: Azure 2023 CSV, Mooncake JSONL, synthetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.autoscale.errors import TraceError
from control.autoscale.simulate.traces import COPY_JITTER_S, load_trace

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces"

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestAzure:
    def test_arrivals_are_rebased_to_the_first_request_and_keep_100ns_precision(
        self, tmp_path: Path
    ) -> None:
        trace = load_trace(str(write(tmp_path, "conv.csv", AZURE)))
        assert trace.name == "conv"
        assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 4.314579, 4.541877])
        assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
            (374, 44),
            (396, 109),
            (879, 1),  # zero generated tokens still returns one (EOS)
        ]

    def test_a_wrong_header_names_the_file_and_line_1(self, tmp_path: Path) -> None:
        path = write(tmp_path, "bad.csv", "time,in,out\n1,2,3\n")
        with pytest.raises(TraceError, match=r"bad\.csv:1: expected the header"):
            load_trace(str(path))

    def test_a_bad_row_names_its_line(self, tmp_path: Path) -> None:
        path = write(tmp_path, "bad.csv", AZURE + "2023-11-16 18:15:52.0,many,3\n")
        with pytest.raises(TraceError, match=r"bad\.csv:5: ContextTokens must be an integer"):
            load_trace(str(path))

    def test_a_bad_timestamp_names_its_line(self, tmp_path: Path) -> None:
        path = write(tmp_path, "bad.csv", AZURE.replace("18:15:50", "yesterday"))
        with pytest.raises(TraceError, match=r"bad\.csv:3: bad TIMESTAMP"):
            load_trace(str(path))


class TestMooncake:
    def test_timestamps_are_milliseconds(self, tmp_path: Path) -> None:
        text = (
            '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0]}\n'
            '{"timestamp": 2500, "input_length": 100, "output_length": 3}\n'
        )
        trace = load_trace(str(write(tmp_path, "m.jsonl", text)))
        assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
            (0.0, 6758, 500),
            (2.5, 100, 3),
        ]

    def test_a_line_that_is_not_json_is_named(self, tmp_path: Path) -> None:
        path = write(
            tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{oops\n'
        )
        with pytest.raises(TraceError, match=r"m\.jsonl:2: not JSON"):
            load_trace(str(path))

    def test_a_missing_field_is_named(self, tmp_path: Path) -> None:
        path = write(tmp_path, "m.jsonl", '{"timestamp": 0, "input_length": 1}\n')
        with pytest.raises(TraceError, match=r"m\.jsonl:1: missing output_length"):
            load_trace(str(path))


def test_an_unknown_format_or_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="unknown format"):
        load_trace(str(write(tmp_path, "t.txt", "x")))
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(str(tmp_path / "absent.csv"))
    with pytest.raises(TraceError, match="holds no requests"):
        load_trace(str(write(tmp_path, "empty.jsonl", "\n")))


class TestSynthetic:
    def test_the_same_string_gives_the_same_trace(self) -> None:
        assert load_trace("synthetic:step") == load_trace("synthetic:step")
        assert load_trace("synthetic:step:seed=1") != load_trace("synthetic:step")

    def test_a_step_declares_its_load_step_and_its_rates(self) -> None:
        trace = load_trace("synthetic:step:base=2,peak=20,at=300,hold=900,duration=1800")
        assert trace.load_step_s == 300
        before = sum(1 for r in trace.requests if r.arrival_s < 300) / 300
        during = sum(1 for r in trace.requests if 300 <= r.arrival_s < 1200) / 900
        after = sum(1 for r in trace.requests if r.arrival_s >= 1200) / 600
        # Poisson counts: 600, 18,000 and 1,200 expected; 5 sigma is well inside 15%.
        assert before == pytest.approx(2, rel=0.15)
        assert during == pytest.approx(20, rel=0.05)
        assert after == pytest.approx(2, rel=0.15)

    def test_tokens_are_drawn_around_the_means(self) -> None:
        trace = load_trace("synthetic:ramp:prompt=400,output=50")
        assert all(200 <= r.prompt_tokens <= 600 for r in trace.requests)
        assert all(25 <= r.output_tokens <= 75 for r in trace.requests)

    def test_diurnal_declares_no_step(self) -> None:
        assert load_trace("synthetic:diurnal").load_step_s is None

    @pytest.mark.parametrize(
        ("source", "message"),
        [
            ("synthetic:nope", "unknown synthetic trace 'nope'"),
            ("synthetic:step:pek=3", "bad parameter 'pek=3'"),
            ("synthetic:step:peak=x", "peak must be a number"),
            ("synthetic:step:base=0,peak=0", "give no requests"),
        ],
    )
    def test_bad_parameters_are_named(self, source: str, message: str) -> None:
        with pytest.raises(TraceError, match=message):
            load_trace(source)


class TestScaling:
    def test_rate_scale_compresses_time(self) -> None:
        plain = load_trace("synthetic:step")
        fast = load_trace("synthetic:step", rate_scale=4)
        assert fast.duration_s == plain.duration_s / 4
        assert fast.load_step_s == 75
        assert [r.arrival_s for r in fast.requests] == pytest.approx(
            [r.arrival_s / 4 for r in plain.requests]
        )

    def test_copies_multiply_the_rate_on_the_same_clock(self) -> None:
        plain = load_trace("synthetic:spike")
        tripled = load_trace("synthetic:spike", copies=3)
        assert len(tripled.requests) == 3 * len(plain.requests)
        assert tripled.duration_s == plain.duration_s
        arrivals = [r.arrival_s for r in tripled.requests]
        assert arrivals == sorted(arrivals)
        # every original arrival is there, and every copy within the jitter of one
        originals = {r.arrival_s for r in plain.requests}
        assert originals <= set(arrivals)

    def test_fractional_copies_add_that_share_of_requests(self) -> None:
        plain = load_trace("synthetic:step")
        more = load_trace("synthetic:step", copies=1.5)
        assert len(more.requests) == pytest.approx(1.5 * len(plain.requests), rel=0.03)
        assert COPY_JITTER_S > 0

    def test_a_window_is_rebased_and_keeps_a_step_inside_it(self) -> None:
        window = load_trace("synthetic:step", start_s=200, duration_s=400)
        assert window.duration_s == 400
        assert window.load_step_s == 100
        assert all(0 <= r.arrival_s < 400 for r in window.requests)
        assert load_trace("synthetic:step", start_s=400).load_step_s is None

    def test_bad_scales_and_windows_are_rejected(self) -> None:
        with pytest.raises(TraceError, match="rate scale"):
            load_trace("synthetic:step", rate_scale=0)
        with pytest.raises(TraceError, match="copies"):
            load_trace("synthetic:step", copies=-1)
        with pytest.raises(TraceError, match="past the trace's end"):
            load_trace("synthetic:step", start_s=5000)


@pytest.mark.skipif(not SHARED.exists(), reason="the shared traces are not on this machine")
@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("azure2023_conv.csv", 19366),
        ("azure2023_code.csv", 8819),
        ("mooncake_conversation.jsonl", 12031),
    ],
)
def test_the_shared_traces_load_whole(name: str, count: int) -> None:
    trace = load_trace(str(SHARED / name))
    assert len(trace.requests) == count
    assert 3400 < trace.duration_s < 3600  # an hour each
