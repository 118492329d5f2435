"""Game day: a GPU goes bad under load, and the whole stack reacts, with real processes.

Cast (every one a real process, over real sockets):

* a one-machine Ray cluster (``ray_test_cluster``): ``node-a`` and ``node-b``, 2 fake GPUs each;
* ``shoal health watch --node node-a --nvml-mock node-a.toml`` and the same for ``node-b``;
* ``shoal engines serve --replicas 2 --tp 1 --discovery-file F --gpu-health <both watchers>``
  running two engine groups (simulated engines, stand-in workers on the fake GPUs);
* ``shoal router serve --discovery file F --gpu-health <both watchers>``;
* a steady load of streamed completions through the router (~5 a second, 2 at a time).

Then ``shoal health inject --xid 79`` on the GPU of one group (the one on node-a when
there is one, as ``shoal engines status --json`` says). What the test proves, each as an
observable state waited for with a deadline (never a sleep):

1. the router stops sending to the sick engine: once ``GET /router/engines`` no longer
   offers it (its GPU marked unhealthy by the router's own watcher poll, or its entry gone
   from the discovery file, whichever came first), no request sent afterwards is answered
   by it (``x-shoal-engine`` of every answer), and that happens within a few watcher and
   router intervals of the watcher reporting the GPU;
2. the fleet replaces the group: ``shoal_engines_group_failures_total{reason=
   "gpu_unhealthy"}`` counts it, and two groups are READY again, none on the sick GPU,
   exactly they in the discovery file, and the router sends load to the new one;
3. no request of the load failed, not even one in flight on the sick engine when it was
   stopped: before the fault the test keeps one long request (~9 s) in flight on the
   victim, and asserts that its engine stopped listening while it ran and that it still
   ended with ``[DONE]``. Why none can fail: the fleet stops a group on a sick GPU without
   a drain (the GPU is not trusted), but the engine's SIGTERM is graceful (it stops
   accepting, finishes what it has within ``--stop-grace-s``), and the router retries a
   request that is refused or reset before its first byte on another engine (and here it
   has stopped sending to the victim before the fleet stops it). Every answer must be a
   200 whose stream ends with ``[DONE]`` and carries no error event;
4. everything is torn down: the daemon exits 0 after SIGTERM and empties the discovery
   file, no placement group or actor is left, no engine still listens or runs, and after
   the cluster stops none of its Ray processes is alive.

The sick GPU and Ray. Ray does not know the GPU is sick, so a replacement may be placed
on it again. Here it is unlikely: the fleet starts the replacement in the very round that
stops the sick group, while the sick group still holds its GPU (its stop is in the
background: engine SIGTERM, actors killed, then the placement group removed), so Ray
places it on one of the two free, healthy GPUs. When it does land on the sick GPU anyway,
the fleet replaces it again after a crash-loop backoff (1, 2, 4 ... s); the test does not
depend on either: it waits for the end state (two ready groups on healthy GPUs) with a
deadline that covers several backoffs, and reports how many replacements it took. A group
placed on the sick GPU is never published: its GPUs are known in the poll that launches
its engine, so the fleet sees it STARTING on the sick GPU, and stops it, before it can be
READY. (Measured apart, with a node whose only free GPU was the sick one: replaced 5
times in 25 s, its starts backing off 1, 2, 4, 8 s, never in the discovery file. An XID stays in the watcher's ledger until ``POST /v1/clear``: clearing the mock
file alone does not heal the GPU.)

Measured here (2 shared cores): two groups ready 4.6-6 s after the daemon starts; after
the inject the watcher reports in 0.1-0.3 s, the router stops offering the engine 0-0.5 s
later (by its own GPU-health poll, before the discovery file changed), the fleet drops it
from the file and stops it at +0.6-0.8 s, the replacement is ready and published at
+2.6-2.8 s; about 57 requests, none failed; the module takes 25-35 s (58 s with two
busy loops competing for the cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from router.server import RouterProcess, running_router
from tests.integration.conftest import ENV, free_port
from tests.integration.ray_cluster import RayTestCluster, ray_test_cluster
from tests.integration.test_health_watch import WatcherProcess, start_watcher

pytestmark = pytest.mark.integration

ENGINE = f"{sys.executable} -m shoal sim engine --host {{host}} --port {{port}} --model {{model}}"
MODEL = "sim-7b"
INTERVAL_S = 0.5  # watchers, the router's GPU-health poll, the fleet's rounds and its poll
# "a couple of intervals": watcher check + router poll, with room for a loaded machine
ROUTER_REACTION_S = 8 * INTERVAL_S
# ~9 s on the simulator (8 ms a token): in flight from before the fault until well after
# the fleet stopped its engine, even on a loaded machine
LONG_TOKENS = 1100
STOP_GRACE_S = 30  # the engine's SIGTERM grace: the long request finishes inside it


# -- processes --------------------------------------------------------------------------


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # gone meanwhile
        return ""


def processes_with(*needles: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line holds all ``needles``."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            line = _cmdline(pid)
            if line and all(needle in line for needle in needles):
                found.append((int(pid), line))
    return found


def eventually(check: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.1)
    return result


def _raylet_pid(pid: str) -> int | None:
    """``RAY_RAYLET_PID`` in the process's environment: Ray workers carry it, and so do the
    engines their actors start."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours
        return None
    for item in environ:
        if item.startswith(b"RAY_RAYLET_PID="):
            value = item.split(b"=", 1)[1]
            return int(value) if value.isdigit() else None
    return None


def cluster_processes(session: str, raylets: set[int]) -> list[tuple[int, str]]:
    """The live processes of one Ray cluster: its daemons (their command lines name the
    session), its workers and whatever they started (their ``RAY_RAYLET_PID`` is one of
    its raylets; workers rename themselves ``ray::...``, so the session is not there)."""
    found = processes_with(session)
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _raylet_pid(pid) in raylets:
            found.append((int(pid), _cmdline(pid)))
    return found


def cluster_ids(c: RayTestCluster) -> tuple[str, set[int]]:
    """The cluster's session name and the pids of its raylets."""
    nodes: list[Any] = [c.cluster.head_node, *c.nodes.values()]
    raylets = {info.process.pid for node in nodes for info in node.all_processes["raylet"]}
    return str(nodes[0].session_name), raylets


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayTestCluster]:
    """The Ray cluster; on exit, every process of it is checked gone."""
    with ray_test_cluster() as c:
        c.add_node("node-a", gpus=2)
        c.add_node("node-b", gpus=2)
        session, raylets = cluster_ids(c)
        assert len(raylets) == 3 and processes_with(session), "Ray's processes are found"
        yield c
    eventually(
        lambda: not cluster_processes(session, raylets), f"every process of {session} gone", 30
    )


def http(url: str, data: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, method="POST" if body else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as reply:
            return reply.status, dict(reply.headers.items()), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def get_json(url: str) -> Any:
    status, _, body = http(url)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def refuses(url: str) -> bool:
    try:
        http(url + "/health")
    except OSError:
        return True
    return False


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args], capture_output=True, text=True, env=ENV,
        timeout=60,
    )  # fmt: skip


@contextmanager
def engines_daemon(
    cluster: RayTestCluster, tmp_path: Path, port: int, discovery: Path, health: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal engines serve`` as the game day runs it; SIGTERM (then kill) on exit."""
    command = [
        sys.executable, "-m", "shoal", "engines", "serve", "--ray-address", cluster.address,
        "--model", MODEL, "--engine-command", ENGINE, "--tp", "1", "--replicas", "2",
        "--port", str(port), "--interval-s", str(INTERVAL_S), "--discovery-file", str(discovery),
        "--gpu-health", health, "--gpu-health-interval-s", str(INTERVAL_S),
        "--drain-s", "0", "--stop-grace-s", str(STOP_GRACE_S), "--ready-timeout-s", "60",
    ]  # fmt: skip
    with open(tmp_path / "engines.log", "wb") as log:
        process = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the load ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # "steady" (the background load) or "long" (one request kept in flight)
    sent: float  # time.monotonic() before the request left
    done: float
    status: int  # 0: no HTTP answer at all
    engine: str  # x-shoal-engine: the engine that answered
    complete: bool  # 200, the stream ended with [DONE], no error event in it
    detail: str


class Load:
    """``workers`` clients, each sending a short streamed completion (16 tokens, ~0.15 s
    on the simulator), then pausing ``pause_s``; and, on demand, ``long()`` requests
    (``LONG_TOKENS``, several seconds) whose engine is known as soon as the router
    forwards the engine's headers (``in_flight()``)."""

    def __init__(self, router: RouterProcess, *, workers: int = 2, pause_s: float = 0.2) -> None:
        self._url = router.url + "/v1/completions"
        self._pause_s = pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []
        self._in_flight: dict[int, tuple[str, float, str]] = {}  # id -> (kind, sent, engine)
        self._seq = 0
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a load client hangs"

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def in_flight(self) -> list[tuple[str, float, str]]:
        """(kind, sent, engine) of the requests whose answer has begun and not ended."""
        with self._lock:
            return list(self._in_flight.values())

    def long(self) -> None:
        """One long request, in a thread of its own (joined by ``__exit__``)."""
        thread = threading.Thread(target=self._send, args=("long", LONG_TOKENS), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, worker: int) -> None:
        while not self._stop.is_set():
            self._send("steady", 16)
            self._stop.wait(self._pause_s)

    def _send(self, kind: str, max_tokens: int) -> None:
        with self._lock:
            self._seq += 1
            seq = self._seq
        body = json.dumps({"model": MODEL, "prompt": f"game day {seq}: is the GPU fine?",
                           "max_tokens": max_tokens, "stream": True}).encode()  # fmt: skip
        request = urllib.request.Request(self._url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        sent = time.monotonic()
        engine = ""
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, engine = reply.status, reply.headers.get("x-shoal-engine", "")
                with self._lock:
                    self._in_flight[seq] = (kind, sent, engine)
                answer = reply.read()
        except urllib.error.HTTPError as exc:
            status, answer = exc.code, exc.read()
        except OSError as exc:
            status, answer = 0, repr(exc).encode()
        complete = status == 200 and answer.endswith(b"data: [DONE]\n\n")
        complete = complete and b'"error"' not in answer
        detail = answer[-300:].decode(errors="replace")
        outcome = Outcome(kind, sent, time.monotonic(), status, engine, complete, detail)
        with self._lock:
            self._in_flight.pop(seq, None)
            self._outcomes.append(outcome)


# -- the game day -----------------------------------------------------------------------


def longs(load: Load) -> int:
    """Long requests under way (their engine known) or answered."""
    return sum(1 for f in load.in_flight() if f[0] == "long") + sum(
        1 for o in load.outcomes() if o.kind == "long"
    )


def sick_in(report: dict[str, Any], index: int) -> bool:
    return any(g["index"] == index and not g["healthy"] for g in report.get("gpus", []))


@dataclass
class Reaction:
    """First times (``time.monotonic()`` after the read that showed it) of each step of
    the reaction to the sick GPU, as seen from outside: the watcher's report, the router's
    engine list, the discovery file, the fleet's groups, and the load's answers."""

    victim: dict[str, Any]  # the group on the sick GPU, as /v1/fleet showed it
    sick_gpu: str
    urls_before: set[str]
    seen: dict[str, float]
    router_saw_gpu: bool = False  # the router marked the victim gpu-unhealthy (before the
    # discovery file dropped it); False: the file was faster
    new_urls: frozenset[str] = frozenset()

    STEPS = ("watch", "router", "unpublished", "replaced", "victim_closed", "ready", "served")

    def done(self) -> bool:
        return set(self.STEPS) <= set(self.seen)

    def mark(self, step: str, happened: bool) -> None:
        if happened and step not in self.seen:
            self.seen[step] = time.monotonic()

    def timeline(self, since: float) -> str:
        return ", ".join(f"{s} +{self.seen[s] - since:.2f} s" for s in self.STEPS if s in self.seen)


def test_a_gpu_going_bad_under_load_is_routed_around_and_replaced_without_a_failed_request(
    cluster: RayTestCluster, tmp_path: Path
) -> None:
    watchers: dict[str, WatcherProcess] = {}
    engine_urls: set[str] = set()  # every engine the fleet ever showed, for the teardown
    try:
        for node in ("node-a", "node-b"):
            watchers[node] = start_watcher(tmp_path, node, cards=2, interval_s=INTERVAL_S)
        health = ",".join(w.url for w in watchers.values())
        discovery = tmp_path / "engines.json"
        port = free_port()
        fleet_url = f"http://127.0.0.1:{port}"
        log = tmp_path / "engines.log"
        with engines_daemon(cluster, tmp_path, port, discovery, health) as daemon:

            def groups() -> list[dict[str, Any]]:
                assert daemon.poll() is None, log.read_text()[-4000:]
                answer: list[dict[str, Any]] = get_json(fleet_url + "/v1/fleet")["groups"]
                engine_urls.update(g["url"] for g in answer if g.get("url"))
                return answer

            def two_ready() -> list[dict[str, Any]] | None:
                """The fleet as ``shoal engines status --json`` shows it, once it has
                exactly two groups and both are ready."""
                assert daemon.poll() is None, log.read_text()[-4000:]
                out = shoal("engines", "status", "--url", fleet_url, "--json")
                if out.returncode != 0:  # not listening yet
                    return None
                answer: list[dict[str, Any]] = json.loads(out.stdout)["groups"]
                engine_urls.update(g["url"] for g in answer if g.get("url"))
                ready = [g for g in answer if g["phase"] == "ready"]
                return answer if len(ready) == len(answer) == 2 else None

            started = time.monotonic()
            before = eventually(two_ready, "two groups ready", 90)
            print(f"\nfleet: two groups ready {time.monotonic() - started:.1f} s after start")
            engines = [p for p in cluster_processes(*cluster_ids(cluster)) if "sim engine" in p[1]]
            assert len(engines) == 2, "the teardown check sees the engines as the cluster's"
            on_a = [g for g in before if g["gpus"][0].startswith("node-a/")]
            victim = (on_a or before)[0]
            (sick_gpu,) = victim["gpus"]  # tp 1: one GPU, "NODE/gpuI"
            node, index = sick_gpu.split("/gpu")[0], int(sick_gpu.split("/gpu")[1])
            urls = {g["url"] for g in before}
            eventually(lambda: {e["url"] for e in json.loads(discovery.read_text())} == urls,
                       "both published", 30)  # fmt: skip
            with running_router(
                free_port(),
                discovery="file",
                discovery_file=discovery,
                discovery_interval_s=0.25,
                health_interval_s=INTERVAL_S,
                gpu_health=health,
                gpu_health_interval_s=INTERVAL_S,
                strategy="round-robin",
                ready_timeout_s=60.0,
            ) as router:

                def engine_rows() -> dict[str, dict[str, Any]]:
                    rows = get_json(router.url + "/router/engines")["engines"]
                    return {row["url"]: row for row in rows}

                def offered() -> set[str]:
                    return {
                        u for u, r in engine_rows().items() if r["healthy"] and r["gpu_healthy"]
                    }

                eventually(lambda: offered() == urls, "the router offering both engines", 30)
                with Load(router) as load:

                    def served_by(url: str, after: float = 0.0) -> bool:
                        return any(o.engine == url and o.sent > after and o.complete
                                   for o in load.outcomes())  # fmt: skip

                    eventually(lambda: all(served_by(u) for u in urls), "load on both", 30)
                    # a long request in flight on the victim when its engine is stopped
                    for tries in range(1, 11):
                        load.long()
                        eventually(lambda n=tries: longs(load) == n, "a long request", 15)  # type: ignore[misc]
                        if any(f[0] == "long" and f[2] == victim["url"] for f in load.in_flight()):
                            break
                    else:
                        raise AssertionError("10 long requests, none on the victim")
                    reaction = Reaction(victim, sick_gpu, urls, {})
                    t_inject = time.monotonic()
                    injected = shoal("health", "inject", "--nvml-mock", str(watchers[node].mock),
                                     "--gpu", str(index), "--xid", "79")  # fmt: skip
                    assert injected.returncode == 0, injected.stderr

                    def step() -> bool:
                        reaction.mark("victim_closed", refuses(victim["url"]))
                        report = get_json(watchers[node].url + "/v1/gpus")
                        reaction.mark("watch", sick_in(report, index))
                        row = engine_rows().get(victim["url"])
                        if "router" not in reaction.seen and row is not None:
                            reaction.router_saw_gpu |= not row["gpu_healthy"]
                        reaction.mark(
                            "router", row is None or not (row["healthy"] and row["gpu_healthy"])
                        )
                        published = json.loads(discovery.read_text())
                        reaction.mark(
                            "unpublished", victim["url"] not in {e["url"] for e in published}
                        )
                        now = groups()
                        reaction.mark("replaced", victim["id"] not in {g["id"] for g in now})
                        ready = [g for g in now if g["phase"] == "ready"]
                        reaction.mark(
                            "ready",
                            len(ready) == len(now) == 2
                            and all(sick_gpu not in g["gpus"] for g in ready)
                            and sorted((e["url"], e["gpus"]) for e in published)
                            == sorted((g["url"], g["gpus"]) for g in ready),
                        )
                        if "ready" in reaction.seen:
                            reaction.new_urls = frozenset(g["url"] for g in ready) - urls
                            reaction.mark(
                                "served",
                                bool(reaction.new_urls)
                                and all(
                                    served_by(u, reaction.seen["ready"]) for u in reaction.new_urls
                                ),
                            )
                        return reaction.done()

                    try:
                        eventually(step, "the whole reaction", 75)
                    finally:
                        print(f"reaction after inject: {reaction.timeline(t_inject)}")
                    eventually(lambda: all(f[2] != victim["url"] for f in load.in_flight()),
                               "the victim's last request answered", STOP_GRACE_S)  # fmt: skip
                outcomes = load.outcomes()
                after = groups()
            _, _, metrics_body = http(fleet_url + "/metrics")
            metrics = metrics_body.decode()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        for watcher in watchers.values():
            watcher.stop()

    seen = reaction.seen
    failed = [o for o in outcomes if not o.complete]
    on_victim = [o for o in outcomes if o.engine == victim["url"]]
    print(
        f"router: victim out {seen['router'] - seen['watch']:.2f} s after the watcher said so "
        f"({'its GPU marked sick' if reaction.router_saw_gpu else 'dropped from the file'}); "
        f"load: {len(outcomes)} requests, {len(failed)} failed, {len(on_victim)} on the victim, "
        f"{sum(1 for o in outcomes if o.engine in reaction.new_urls)} on the replacement"
    )
    # (1) the router stopped sending to the sick engine, soon after the watcher saw it
    assert seen["router"] - seen["watch"] <= ROUTER_REACTION_S, reaction.timeline(t_inject)
    assert on_victim and any(o.sent < t_inject for o in on_victim), "the victim had load"
    late = [o for o in on_victim if o.sent > seen["router"]]
    assert late == [], late
    # (2) the fleet replaced the group, because of the GPU, on a healthy GPU
    gpu_unhealthy = metric(metrics, "shoal_engines_group_failures_total", reason="gpu_unhealthy")
    replacements = metric(metrics, "shoal_engines_replacements_total")
    print(f"fleet: {gpu_unhealthy:.0f} replacement(s) for gpu_unhealthy "
          f"({gpu_unhealthy - 1:.0f} of a replacement Ray placed on the sick GPU again)")  # fmt: skip
    assert gpu_unhealthy >= 1 and replacements == gpu_unhealthy, metrics
    (survivor,) = [g for g in before if g["id"] != victim["id"]]
    assert survivor["id"] in {g["id"] for g in after}, "the healthy group was left alone"
    (new,) = [g for g in after if g["id"] != survivor["id"]]
    assert new["phase"] == "ready" and sick_gpu not in new["gpus"], after
    assert new["url"] in reaction.new_urls and new["url"] != victim["url"]
    # (3) not one request failed, not even those in flight on the victim when it stopped
    assert failed == [], failed
    assert len(outcomes) >= 10
    # ... the long one in flight on the victim when its engine stopped listening included
    long_on_victim = [o for o in outcomes if o.kind == "long" and o.engine == victim["url"]]
    assert any(o.sent < seen["victim_closed"] < o.done for o in long_on_victim), (
        long_on_victim,
        reaction.timeline(t_inject),
    )
    # (4) nothing is left: the file is empty, no placement group, actor or engine remains
    assert json.loads(discovery.read_text()) == []
    eventually(lambda: fleet_groups_alive() == ([], []), "every group removed", 30)
    assert victim["url"] in engine_urls and new["url"] in engine_urls
    for url in engine_urls:
        eventually(lambda u=url: refuses(u), f"{url} closed", 30)  # type: ignore[misc]
        engine_port = url.rsplit(":", 1)[1]
        assert processes_with("sim engine", f"--port {engine_port}") == []
    for watcher in watchers.values():
        assert watcher.proc.poll() is not None
    assert router.process.poll() is not None


def fleet_groups_alive() -> tuple[list[str], list[str]]:
    """Placement groups not removed, and actors alive, as the test's own driver sees them."""
    groups = [
        pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"
    ]
    actors = [
        info["Name"] or actor_id
        for actor_id, info in ray._private.state.actors().items()
        if info["State"] == "ALIVE"
    ]
    return groups, actors
