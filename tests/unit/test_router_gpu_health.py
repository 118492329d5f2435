"""GPU health in the router without sockets (issue 15): engines' GPUs from discovery, the
watcher poller's parsing and memory on virtual time, and the pool's rule."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity
from router.config import RouterSettings
from router.discovery import FileDiscovery, parse_engine_list
from router.engines import EnginePool, parse_engines
from router.gpu_health import STALE_INTERVALS, GpuHealthPoller
from router.metrics import RouterMetrics
from router.scrape import MetricsScraper
from router.types import EngineSpec
from shoal.errors import ConfigError

A, B = "http://watch-a:8094", "http://watch-b:8094"
XID79 = Problem("xid", Severity.CRITICAL, "XID 79: fallen off the bus", Remedy.DRAIN_NODE)
WARM = Problem("temperature", Severity.WARNING, "84 C")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


WALL = 1.7e9  # the poller's wall clock; reports are checked then unless told otherwise


def node(name: str, gpus: int, sick: dict[int, Problem] | None = None, at: float = WALL) -> bytes:
    sick = sick or {}
    doc = NodeHealth(
        name,
        at,
        tuple(GpuHealth(i, f"GPU-{i}", (sick[i],) if i in sick else ()) for i in range(gpus)),
    )
    return json.dumps(doc.to_json()).encode()


# ---- engines' GPUs ---------------------------------------------------------------------


def test_an_engine_with_a_stream_and_no_gpus_runs_on_its_stream() -> None:
    assert EngineSpec("http://e:1", "n/gpu3").gpus == ("n/gpu3",)
    assert EngineSpec("http://e:1").gpus == ()
    assert EngineSpec("http://e:1", "n/gpu3", gpus=("n/gpu4", "n/gpu5")).gpus == (
        "n/gpu4",
        "n/gpu5",
    )
    # static --engines URL=NODE/gpuI (both parsers)
    assert [s.gpus for s in parse_engines("http://e:1=n/gpu0,http://e:2")] == [("n/gpu0",), ()]
    assert [s.gpus for s in parse_engine_list("http://e:1=n/gpu0,http://e:2")] == [("n/gpu0",), ()]


def write(path: Path, content: object, mtime_s: int) -> None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))


def test_file_entries_carry_gpus_and_a_bad_gpus_value_is_a_discovery_failure(
    tmp_path: Path,
) -> None:
    path = tmp_path / "engines.json"
    good = [
        {"url": "http://e1:8000", "gpus": ["node-a/gpu0", "node-a/gpu1", "node-a/gpu0"]},
        {"url": "http://e2:8000", "stream": "node-b/gpu2"},
    ]
    write(path, good, 1)
    clock = Clock()
    source = FileDiscovery(path, interval_s=1.0, clock=clock)

    async def engines() -> list[EngineSpec]:
        return await source.engines()

    import asyncio

    assert [s.gpus for s in asyncio.run(engines())] == [
        ("node-a/gpu0", "node-a/gpu1"),  # repeats dropped, order kept
        ("node-b/gpu2",),
    ]
    for mtime, bad in enumerate(
        (
            "node-a/gpu0",  # not a list
            ["node-a"],  # no /gpuI
            ["node-a/gpu"],
            ["node-a/cpu0"],
            ["a/b/gpu0"],
            [0],
            [f"node-a/gpu{i}" for i in range(65)],  # over 64
        ),
        start=2,
    ):
        write(path, [{"url": "http://e9:8000", "gpus": bad}], mtime)
        clock.now += 1.0
        assert [s.url for s in asyncio.run(engines())] == ["http://e1:8000", "http://e2:8000"]
    assert source.num_failures == 7
    write(path, [{"url": "http://e1:8000", "gpus": ["x/gpu1"]}], 20)
    clock.now += 1.0
    assert asyncio.run(engines()) == [EngineSpec("http://e1:8000", gpus=("x/gpu1",))]
    write(path, [{"url": "http://e1:8000", "gpus": "n/gpu0"}], 21)
    with pytest.raises(ConfigError, match="gpus must be a list"):
        FileDiscovery(path)  # at start: the configuration error names it


def test_settings_split_and_check_the_watcher_urls() -> None:
    settings = RouterSettings(
        engines="http://e:1", gpu_health=" http://a:1/, http://b:2,http://a:1"
    )
    assert settings.gpu_health_urls == ("http://a:1", "http://b:2")
    assert RouterSettings(engines="http://e:1").gpu_health_urls == ()
    with pytest.raises(ValueError, match="gpu_health 'a:1'"):
        RouterSettings(engines="http://e:1", gpu_health="a:1")
    with pytest.raises(ValueError, match="gpu_health_interval_s"):
        RouterSettings(engines="http://e:1", gpu_health_interval_s=0)


# ---- the poller ------------------------------------------------------------------------


def poller(clock: Clock, *urls: str) -> tuple[GpuHealthPoller, list[frozenset[str]], list[str]]:
    changes: list[frozenset[str]] = []
    polls: list[str] = []
    p = GpuHealthPoller(urls, interval_s=5.0, clock=clock, wall=lambda: WALL,
                        on_change=changes.append, on_poll=polls.append)  # fmt: skip
    return p, changes, polls


def test_the_unhealthy_set_is_the_union_of_critical_gpus_over_watchers() -> None:
    clock = Clock()
    p, changes, polls = poller(clock, A, B)
    p.accept(A, node("node-a", 2, {1: XID79}))
    p.accept(B, node("node-b", 4, {0: WARM, 3: XID79}))  # a warning is not unhealthy
    assert p.settle() == frozenset({"node-a/gpu1", "node-b/gpu3"})
    assert p.settle() == frozenset({"node-a/gpu1", "node-b/gpu3"})
    assert changes == [frozenset({"node-a/gpu1", "node-b/gpu3"})]  # told once
    p.accept(A, node("node-a", 2))
    p.settle()
    assert changes[-1] == frozenset({"node-b/gpu3"})
    assert polls == ["ok", "ok", "ok"]
    # a critical node-level problem: every GPU the node lists
    doc = NodeHealth("node-a", WALL, (GpuHealth(0), GpuHealth(1)),
                     (Problem("gpu_count", Severity.CRITICAL, "2 of 4 GPUs"),))  # fmt: skip
    p.accept(A, json.dumps(doc.to_json()).encode())
    assert p.settle() == frozenset({"node-a/gpu0", "node-a/gpu1", "node-b/gpu3"})


def test_a_malformed_or_failed_poll_keeps_the_last_good_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.router.gpu_health")
    clock = Clock()
    p, changes, polls = poller(clock, A)
    p.accept(A, node("node-a", 2, {0: XID79}))
    assert p.settle() == {"node-a/gpu0"}
    for body in (
        b"{",
        b"[]",
        b'{"node": "a/b"}',
        b"\xff",
        json.dumps({"node": "n", "gpus": [{}]}).encode(),
    ):
        clock.now += 1.0
        assert p.accept(A, body) is None
        assert p.settle() == {"node-a/gpu0"}
    p.fail(A, "unreachable", "refused")
    p.fail(A, "bad_status", "answered 503")
    assert p.settle() == {"node-a/gpu0"}
    assert polls == ["ok"] + ["malformed"] * 5 + ["unreachable", "bad_status"]
    assert changes == [frozenset({"node-a/gpu0"})]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keeping its last report" in warnings[0].getMessage()
    p.accept(A, node("node-a", 2))  # answers again: healthy now
    assert p.settle() == frozenset()
    assert any("answers" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_wrong_types_deep_nesting_and_old_reports_are_malformed_or_stale_never_fatal() -> None:
    clock = Clock()
    p, changes, polls = poller(clock, A)
    p.accept(A, node("node-a", 2, {0: XID79}))
    assert p.settle() == {"node-a/gpu0"}
    typed = {"node": "n", "gpus": [{"index": 0, "problems": [{"check": "x", "severity": []}]}]}
    remedy = {"node": "n", "problems": [{"check": "x", "severity": "critical", "remedy": {}}]}
    for body in (json.dumps(typed).encode(), json.dumps(remedy).encode(), b"[" * 100_000):
        assert p.accept(A, body) is None  # before the fix: TypeError / RecursionError
    # 15 s (3 intervals) + 30 s of allowed skew: 45 s old is still fresh, 46 s is not
    assert p.accept(A, node("node-a", 2, {0: XID79}, at=WALL - 45.0)) is not None
    assert p.accept(A, node("node-a", 2, at=WALL - 46.0)) is None
    assert p.settle() == {"node-a/gpu0"}  # the last good report stays
    assert polls == ["ok", "malformed", "malformed", "malformed", "ok", "stale"]
    p.accept(A, node("node-a", 2))  # a later good report still changes the set
    assert p.settle() == frozenset()
    assert changes == [frozenset({"node-a/gpu0"}), frozenset()]


def test_a_round_that_raises_is_logged_counted_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    polls: list[str] = []
    p = GpuHealthPoller([A], interval_s=0.01, on_poll=polls.append)
    rounds: list[int] = []

    async def poll_once() -> frozenset[str]:
        rounds.append(1)
        if len(rounds) == 1:
            raise TypeError("a bug in one round")
        return frozenset()

    async def body() -> None:
        p.poll_once = poll_once  # type: ignore[method-assign]
        p.start(None)  # type: ignore[arg-type]  # the stand-in round needs no session
        async with asyncio.timeout(5):
            while len(rounds) < 3:
                await asyncio.sleep(0.01)
        await p.close()  # no TypeError comes back here either

    asyncio.run(body())
    assert polls[0] == "error" and len(rounds) >= 3
    assert any("polling goes on" in r.getMessage() for r in caplog.records)


def test_a_watcher_unreadable_for_three_intervals_is_forgotten() -> None:
    clock = Clock()
    p, changes, _ = poller(clock, A, B)
    p.accept(A, node("node-a", 2, {1: XID79}))
    p.accept(B, node("node-b", 1, {0: XID79}))
    assert p.settle() == {"node-a/gpu1", "node-b/gpu0"}
    clock.now += STALE_INTERVALS * 5.0  # exactly 3 intervals: still remembered
    p.fail(A, "unreachable", "refused")
    p.accept(B, node("node-b", 1, {0: XID79}))
    assert p.settle() == {"node-a/gpu1", "node-b/gpu0"}
    clock.now += 0.5  # past 3 intervals since A's last answer: unknown is not sick
    p.fail(A, "unreachable", "refused")
    assert p.settle() == {"node-b/gpu0"}
    assert p.reports().keys() == {B}
    assert [row["node"] for row in p.status()] == [None, "node-b"]
    assert changes == [frozenset({"node-a/gpu1", "node-b/gpu0"}), frozenset({"node-b/gpu0"})]
    clock.now += 1.0
    p.accept(A, node("node-a", 2, {1: XID79}))  # back, still sick
    assert p.settle() == {"node-a/gpu1", "node-b/gpu0"}


def test_a_watcher_never_read_names_nothing() -> None:
    clock = Clock()
    p, changes, polls = poller(clock, A)
    p.fail(A, "bad_status", "answered 503 (no check yet)")
    assert p.settle() == frozenset() and changes == [] and polls == ["bad_status"]


def test_a_dns_name_is_every_address_and_one_that_leaves_is_forgotten_after_3_intervals() -> None:
    clock = Clock()
    answers = {"shoal-health.ns.svc": ["10.0.0.1", "10.0.0.2"]}
    bodies = {"http://10.0.0.1:8094": node("node-a", 2, {1: XID79}),
              "http://10.0.0.2:8094": node("node-b", 1)}  # fmt: skip
    fetched: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        assert port == 8094
        return answers[host]

    async def fetch(url: str) -> None:  # the watcher's answer, as _fetch hands it on
        fetched.append(url)
        p.accept(url, bodies[url])

    p = GpuHealthPoller(["dns+http://shoal-health.ns.svc:8094"], interval_s=5.0, clock=clock,
                        wall=lambda: WALL, resolve=resolve)  # fmt: skip
    p._fetch = fetch  # type: ignore[method-assign]  # no sockets in unit tests
    assert p.urls == []  # nothing resolved before the first round
    assert asyncio.run(p.poll_once()) == {"node-a/gpu1"}
    assert fetched == ["http://10.0.0.1:8094", "http://10.0.0.2:8094"]
    assert {r.node for r in p.reports().values()} == {"node-a", "node-b"}
    answers["shoal-health.ns.svc"] = ["10.0.0.2"]  # node-a's watcher pod went away
    fetched.clear()
    clock.now += STALE_INTERVALS * 5.0  # 3 intervals: its report still counts
    assert asyncio.run(p.poll_once()) == {"node-a/gpu1"}
    assert fetched == ["http://10.0.0.2:8094"]  # no longer polled
    clock.now += 0.5  # past 3 intervals since it last answered: unknown is not sick
    assert asyncio.run(p.poll_once()) == frozenset()
    assert p.urls == ["http://10.0.0.2:8094"]  # forgotten, and gone from the status
    assert [row["node"] for row in p.status()] == ["node-b"]


# ---- the pool --------------------------------------------------------------------------


def pool(clock: Clock) -> EnginePool:
    settings = RouterSettings(engines="http://e:1")
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    specs = [
        EngineSpec("http://a0", "node-a/gpu0"),
        EngineSpec("http://a1", "node-a/gpu1"),
        EngineSpec("http://tp2", gpus=("node-b/gpu0", "node-b/gpu1")),
        EngineSpec("http://dns"),  # no GPUs known
    ]
    p = EnginePool(specs, settings, clock=clock, scraper=scraper)
    for engine in p._engines.values():  # what passing health checks record
        engine.healthy = engine.checked = True
        engine.cards = ({"id": "m"},)
        engine.models = frozenset({"m"})
    return p


def test_an_engine_with_any_unhealthy_gpu_is_not_routable_and_each_change_is_told_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.router.engines")
    clock = Clock()
    p = pool(clock)
    told: list[tuple[str, bool]] = []
    p.on_health_change = lambda engine, healthy: told.append((engine, healthy))
    assert p.num_healthy() == 4 and p.num_gpu_unhealthy() == 0
    p.set_unhealthy_gpus({"node-a/gpu1", "node-b/gpu1", "node-z/gpu0"})
    assert [e for e in p.engine_ids if p.allows(e)] == ["http://a0", "http://dns"]
    assert [e for e in p.engine_ids if p.is_healthy(e)] == ["http://a0", "http://dns"]
    assert p.num_healthy() == 2 and p.num_gpu_unhealthy() == 2
    assert told == [("http://a1", False), ("http://tp2", False)]
    p.set_unhealthy_gpus({"node-a/gpu1", "node-b/gpu1", "node-b/gpu0"})  # tp2 stays out
    assert told == [("http://a1", False), ("http://tp2", False)]
    rows = {row["id"]: row for row in p.status({})}
    assert (rows["http://tp2"]["healthy"], rows["http://tp2"]["gpu_healthy"]) == (True, False)
    assert rows["http://tp2"]["unhealthy_gpus"] == ["node-b/gpu0", "node-b/gpu1"]
    assert rows["http://a0"]["gpu_healthy"] and rows["http://a0"]["unhealthy_gpus"] == []
    assert rows["http://dns"]["gpus"] == [] and rows["http://dns"]["gpu_healthy"]
    p.set_unhealthy_gpus(set())
    assert all(p.allows(e) for e in p.engine_ids) and p.num_gpu_unhealthy() == 0
    assert told[2:] == [("http://a1", True), ("http://tp2", True)]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GPU node-a/gpu1 unhealthy" in m for m in messages) == 1
    assert sum("healthy again" in m for m in messages) == 2


def test_every_engine_of_a_model_on_sick_gpus_is_no_healthy_engine() -> None:
    clock = Clock()
    p = pool(clock)
    p.set_engines([EngineSpec("http://a0", "node-a/gpu0"), EngineSpec("http://a1", "node-a/gpu1")])
    assert [c["id"] for c in p.model_cards()] == ["m"]
    p.set_unhealthy_gpus({"node-a/gpu0", "node-a/gpu1"})
    assert p.num_healthy() == 0 and p.model_cards() == []  # as with no healthy engine
    assert not any(p.allows(e) for e in p.engine_ids)


def test_an_engine_that_joins_or_changes_gpus_is_judged_against_the_current_set() -> None:
    clock = Clock()
    p = pool(clock)
    p.set_unhealthy_gpus({"node-c/gpu0"})
    p.set_engines([EngineSpec("http://c0", "node-c/gpu0"), EngineSpec("http://a0", "node-a/gpu0")])
    assert {r["id"]: r["unhealthy_gpus"] for r in p.status({})} == {
        "http://a0": [],
        "http://c0": ["node-c/gpu0"],  # a newcomer on a sick GPU
    }
    p._engines["http://c0"].healthy = True
    assert not p.allows("http://c0")
    p.set_engines([EngineSpec("http://c0", "node-c/gpu1"), EngineSpec("http://a0", "node-a/gpu0")])
    assert p.allows("http://c0")  # moved to a healthy GPU


def test_the_metrics_report_engines_out_and_polls_by_result() -> None:
    clock = Clock()
    p = pool(clock)
    metrics = RouterMetrics()
    metrics.watch_gpu_health(p.num_gpu_unhealthy, ("ok", "unreachable", "bad_status", "malformed"))
    poll = GpuHealthPoller([A], clock=clock, wall=lambda: WALL, on_change=p.set_unhealthy_gpus,
                           on_poll=metrics.count_gpu_health_poll)  # fmt: skip
    poll.accept(A, node("node-a", 2, {0: XID79, 1: XID79}))
    poll.accept(A, b"nonsense")
    poll.settle()
    text = metrics.render().decode()
    assert "shoal_router_engines_gpu_unhealthy 2.0" in text
    assert 'shoal_router_gpu_health_polls_total{result="ok"} 1.0' in text
    assert 'shoal_router_gpu_health_polls_total{result="malformed"} 1.0' in text
    assert 'shoal_router_gpu_health_polls_total{result="unreachable"} 0.0' in text
