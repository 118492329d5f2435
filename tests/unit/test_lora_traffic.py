"""Adapters' rates over a sliding window of router counter samples (control/lora/traffic.py),
on virtual time: a sample every 5 s as the manager's rounds scrape."""

from __future__ import annotations

from control.lora.traffic import RateWindow


def window_of(window_s: float, samples: list[tuple[float, dict[str, float]]]) -> RateWindow:
    window = RateWindow(window_s)
    for t, totals in samples:
        window.add(t, totals)
    return window


class TestWindow:
    def test_one_sample_gives_no_rate(self) -> None:
        assert window_of(60, [(0, {"sql": 10})]).rates() == {}

    def test_rate_over_the_whole_history_while_it_is_shorter_than_the_window(self) -> None:
        window = window_of(60, [(0, {"sql": 10}), (5, {"sql": 20}), (10, {"sql": 20})])
        assert window.rates() == {"sql": 1.0}  # 10 requests over 10 s

    def test_rate_over_the_last_window_only(self) -> None:
        # 2 req/s for the first 60 s, then silence: 60 s later the rate is 0, exactly
        samples = [(float(t), {"sql": 2.0 * min(t, 60)}) for t in range(0, 125, 5)]
        window = window_of(60, samples[:13])
        assert window.rates() == {"sql": 2.0}
        window = window_of(60, samples[:19])  # t = 90: from t = 30 (60 requests) to 120
        assert window.rates() == {"sql": 1.0}
        window = window_of(60, samples)
        assert window.rates() == {"sql": 0.0}

    def test_baseline_is_the_newest_sample_at_least_a_window_old(self) -> None:
        # rounds slip by a few ms: the window still spans one full window, never less
        window = window_of(5, [(0, {"sql": 0}), (5.003, {"sql": 10}), (10.01, {"sql": 30})])
        assert window.rates() == {"sql": 20 / (10.01 - 5.003)}

    def test_a_window_shorter_than_the_interval_is_since_the_previous_sample(self) -> None:
        window = window_of(1, [(0, {"sql": 0}), (5, {"sql": 10}), (10, {"sql": 40})])
        assert window.rates() == {"sql": 6.0}

    def test_reset_counter_is_rated_from_after_the_reset(self) -> None:
        # the router restarted between t = 5 and t = 10: sql from 10 on; chat (no label
        # before its first request) from the start
        samples = [(0.0, {"sql": 100.0}), (5.0, {"sql": 110.0}), (10.0, {"sql": 4.0}),
                   (15.0, {"sql": 14.0, "chat": 3.0})]  # fmt: skip
        assert window_of(60, samples).rates() == {"sql": 2.0, "chat": 0.2}

    def test_a_reset_in_the_newest_sample_gives_no_rate(self) -> None:
        window = window_of(60, [(0, {"sql": 100}), (5, {"sql": 110}), (10, {"sql": 3})])
        assert window.rates() == {}

    def test_a_name_missing_from_the_newest_sample_has_no_rate(self) -> None:
        window = window_of(60, [(0, {"sql": 1, "chat": 1}), (5, {"sql": 6})])
        assert window.rates() == {"sql": 1.0}

    def test_a_name_that_appears_later_counted_zero_before(self) -> None:
        window = window_of(60, [(0, {"sql": 0}), (5, {"sql": 5, "chat": 2}), (10, {"chat": 12})])
        assert window.rates() == {"chat": 1.2}  # 12 requests since t = 0

    def test_stale_samples_give_no_rate_after_a_window(self) -> None:
        window = window_of(60, [(0, {"sql": 0}), (5, {"sql": 10})])
        assert window.rates(now_s=65) == {"sql": 2.0}  # the scrapes failed since t = 5
        assert window.rates(now_s=65.5) == {}

    def test_memory_is_one_window_of_samples(self) -> None:
        window = window_of(60, [(float(t), {"sql": float(t)}) for t in range(0, 1000, 5)])
        assert len(window._samples) == 13  # t = 935 (the baseline) .. 995
