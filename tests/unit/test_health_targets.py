"""Which watchers the GPU health pollers read: fixed URLs as given, ``dns+http://NAME:PORT``
as every address of NAME at each resolution (an injected resolver; no DNS, no sockets),
the last good answer kept when resolution fails, and the URL forms checked up front."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

import pytest

from control.health.targets import WatcherTargets, check_watcher_url
from control.ray.config import gpu_health_urls
from router.config import RouterSettings
from shoal.errors import ConfigError


class Resolver:
    """Answers per host set by the test: addresses, or an exception to raise."""

    def __init__(self) -> None:
        self.answers: dict[str, Sequence[str] | BaseException] = {}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        answer = self.answers[host]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def current(targets: WatcherTargets) -> list[str]:
    return asyncio.run(targets.current())


def test_fixed_urls_come_first_then_every_address_of_each_name_sorted() -> None:
    resolver = Resolver()
    resolver.answers["shoal-health.ns.svc"] = ["10.0.0.9", "10.0.0.7", "fd00::3", "10.0.0.7"]
    resolver.answers["other"] = ["10.1.0.1"]
    targets = WatcherTargets(
        ["http://node-a:8094/", "dns+http://shoal-health.ns.svc:8094", "http://node-a:8094",
         "dns+https://other:9000"],
        resolve=resolver,
    )  # fmt: skip
    assert targets.resolves
    assert targets.current_nowait() == ["http://node-a:8094"]  # nothing resolved yet
    assert current(targets) == [
        "http://node-a:8094",
        "http://10.0.0.7:8094",
        "http://10.0.0.9:8094",
        "http://[fd00::3]:8094",
        "https://10.1.0.1:9000",
    ]
    assert sorted(resolver.calls) == [("other", 9000), ("shoal-health.ns.svc", 8094)]


def test_fixed_urls_alone_never_resolve() -> None:
    resolver = Resolver()
    targets = WatcherTargets(["http://a:1", "https://b:2/v1/gpus"], resolve=resolver)
    assert not targets.resolves
    assert current(targets) == ["http://a:1", "https://b:2/v1/gpus"]
    assert resolver.calls == []


def test_each_call_resolves_again_and_follows_the_answer() -> None:
    resolver = Resolver()
    targets = WatcherTargets(["dns+http://w:8094"], resolve=resolver)
    resolver.answers["w"] = ["10.0.0.1", "10.0.0.2"]
    assert current(targets) == ["http://10.0.0.1:8094", "http://10.0.0.2:8094"]
    resolver.answers["w"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced: a new address
    assert current(targets) == ["http://10.0.0.2:8094", "http://10.0.0.3:8094"]
    assert len(resolver.calls) == 2 and targets.num_resolutions == 2


@pytest.mark.parametrize(
    "failure",
    [socket.gaierror(socket.EAI_NONAME, "Name or service not known"), TimeoutError(), []],
    ids=["nxdomain", "timeout", "no-records"],
)
def test_a_failed_resolution_keeps_the_last_addresses_and_logs_once_per_streak(
    failure: BaseException | list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="shoal.control.health.targets")
    resolver = Resolver()
    targets = WatcherTargets(["dns+http://w:8094"], resolve=resolver)
    resolver.answers["w"] = ["10.0.0.1"]
    assert current(targets) == ["http://10.0.0.1:8094"]
    resolver.answers["w"] = failure
    assert current(targets) == ["http://10.0.0.1:8094"]
    assert current(targets) == ["http://10.0.0.1:8094"]
    assert targets.num_failures == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot resolve w" in warnings[0]
    resolver.answers["w"] = ["10.0.0.4"]
    assert current(targets) == ["http://10.0.0.4:8094"]
    assert any("resolves again" in r.getMessage() for r in caplog.records)


def test_a_name_that_never_resolved_polls_nothing() -> None:
    resolver = Resolver()
    resolver.answers["w"] = socket.gaierror(socket.EAI_AGAIN, "temporary failure")
    targets = WatcherTargets(["dns+http://w:8094"], resolve=resolver)
    assert current(targets) == []


def test_a_slow_resolver_times_out_without_blocking_the_loop() -> None:
    async def hang(host: str, port: int) -> Sequence[str]:
        await asyncio.sleep(10)
        return ["10.0.0.1"]

    targets = WatcherTargets(["dns+http://w:8094"], resolve=hang, timeout_s=0.05)

    async def body() -> list[str]:
        async with asyncio.timeout(2):
            return await targets.current()

    assert asyncio.run(body()) == [] and targets.num_failures == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("node-a:8094", "give http"),
        ("ftp://a:1", "give http"),
        ("dns+http://w", "a dns. URL is"),
        ("dns+http://w:8094/v1/gpus", "a dns. URL is"),
        ("http://a:99999", "malformed port"),
    ],
)
def test_bad_urls_are_refused_by_both_settings(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_watcher_url(url)
    with pytest.raises(ValueError, match=message):
        RouterSettings(engines="http://e:1", gpu_health=url)
    with pytest.raises(ConfigError, match=message):
        gpu_health_urls(url)


def test_both_settings_accept_dns_urls() -> None:
    text = "http://a:1,dns+http://shoal-health.ns.svc.cluster.local:8094/"
    expected = ("http://a:1", "dns+http://shoal-health.ns.svc.cluster.local:8094")
    assert RouterSettings(engines="http://e:1", gpu_health=text).gpu_health_urls == expected
    assert gpu_health_urls(text) == expected
