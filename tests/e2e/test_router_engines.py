"""The router in front of real ``vllm serve`` engines, all brought up by ``shoal up``.

One ``shoal up`` per module (a real subprocess, as a user runs it: cache daemon, loader
sidecar, two vLLM engines with Shoal's connector, KV events and ``--load-format shoal``,
the router), so the two engines start once for every test here. Each engine computes on
its own core and admits at most ``MAX_NUM_SEQS`` requests at a time, so a handful of long
requests saturates it.

- A conversation's turns land where their prefix is: turn 2 of a chat whose long system
  prompt turn 1 computed goes to the engine that served turn 1 (``x-shoal-engine``), whose
  own prefix cache then serves every whole block turn 1 computed
  (``vllm:prefix_cache_hits_total``, and the answer's ``cached_tokens``).
- The second engine loads from the cache daemon when the first is saturated: once engine
  X computed a 1,100-token prompt (and its connector saved four 256-token chunks to the
  daemon), a burst of long requests sharing that prompt is sent through the router; X
  takes the first, and once its queue makes it slower the router sends the rest to the
  other engine, which loads the prompt's chunks from the daemon instead of computing them
  (``vllm:external_prefix_cache_hits_total`` rises by whole chunks).
- The module's teardown is ``shoal up``'s Ctrl-C: it must exit 0 with every process it
  listed (and their process groups: vLLM's engine cores) gone.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kvcache.client import CacheClient
from tests.e2e.engines import (
    BLOCK_SIZE,
    CHUNK,
    EXTERNAL_HITS,
    LIVE,
    LOCAL_HITS,
    Engine,
    random_prompt,
    require_engine,
)
from tests.integration.conftest import ENV, wait_until
from tests.integration.test_router_up import alive, group_members, read_line, unique_workdir

pytest.importorskip("aiohttp")
pytest.importorskip("router.server")
pytest.importorskip("router.strategies.shoal")  # the default: prefix and load priced together

MAX_NUM_SEQS = 2
ENGINE_ARGS = f"--max-num-seqs {MAX_NUM_SEQS}"
TEXT = (
    "the of and to a in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could people"
)


@dataclass
class Served:
    """What ``shoal up --json`` reported, with handles on its engines."""

    process: subprocess.Popen[str]
    described: dict[str, Any]
    engines: dict[str, Engine]  # by URL
    cache_socket: Path

    @property
    def router(self) -> str:
        return str(self.described["router"])

    @property
    def model(self) -> str:
        return str(self.described["model"])

    def pids(self) -> list[int]:
        return [int(c["pid"]) for c in self.described["components"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_engine()
    workdir = tmp_path_factory.mktemp("up")
    stderr_path = workdir / "up.stderr"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "shoal", "up", "--port", "0", "--workdir", str(unique_workdir(workdir)),
             "--json", f"--engine-args={ENGINE_ARGS}"],
            env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    engines: list[Engine] = []
    line = ""
    try:
        line = read_line(process, timeout=420)
        assert line, f"shoal up did not come up:\n{stderr_path.read_text()}"
        described = json.loads(line)
        for component in described["components"]:
            if component["component"].startswith("engine-"):
                port = int(component["address"].rsplit(":", 1)[1])
                engine = Engine(component["component"], port, process, Path(component["log"]))  # type: ignore[arg-type]
                engines.append(engine)
                LIVE.append(engine)  # their log tails join a failing test's report
        (cache,) = (c for c in described["components"] if c["component"] == "cache")
        socket_path = Path(cache["address"].removeprefix("ipc://"))
        yield Served(process, described, {e.url: e for e in engines}, socket_path)
    finally:
        for engine in engines:
            LIVE.remove(engine)
        pids = [int(c["pid"]) for c in json.loads(line)["components"]] if line else []
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        code = process.wait(timeout=120)  # its stop is bounded well below this
        assert process.stdout is not None
        process.stdout.close()
        left = [pid for pid in pids if alive(pid) or group_members(pid)]
        if pids:  # it came up: Ctrl-C must stop it cleanly (a failed start reported above)
            assert (code, left) == (0, []), stderr_path.read_text()


def post(served: Served, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the engine that served it, the answer) of one request through the router."""
    request = urllib.request.Request(
        served.router + path,
        data=json.dumps({"model": served.model, **body}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as reply:
        assert reply.status == 200
        return reply.headers["x-shoal-engine"], json.loads(reply.read())


def prose(seed: int, words: int) -> str:
    rng, vocabulary = random.Random(seed), TEXT.split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def cached_tokens(answer: dict[str, Any]) -> int:
    details = answer["usage"].get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def test_a_conversations_second_turn_goes_where_its_first_turn_left_its_prefix(
    served: Served,
) -> None:
    conversations = [
        [{"role": "system", "content": prose(seed, 900)},
         {"role": "user", "content": f"Question {seed}: what is the word of the day?"}]
        for seed in (11, 12, 13)
    ]  # fmt: skip
    first: list[tuple[str, int]] = []
    for messages in conversations:
        engine, answer = post(served, "/v1/chat/completions",
                              {"messages": messages, "max_tokens": 8, "ignore_eos": True})  # fmt: skip
        assert engine in served.engines
        first.append((engine, answer["usage"]["prompt_tokens"]))
        messages += [
            {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
            {"role": "user", "content": "And the one after that?"},
        ]
    for messages, (engine, turn_one_tokens) in zip(conversations, first, strict=True):
        hits_before = served.engines[engine].metric(LOCAL_HITS)
        # The router must see both engines idle: a scrape taken while the last answer ran
        # says one request running there until the next scrape, and turn 2 then went to
        # the other engine, which loads the prefix from the cache daemon (one CI run of
        # 2026-12-06, as in the test below). Wait for scrapes taken after that answer.
        answered_at = time.monotonic()
        for url in served.engines:
            idle = partial(scraped_since, served, url, answered_at)
            assert wait_until(idle, timeout=30)
        second, answer = post(served, "/v1/chat/completions",
                              {"messages": messages, "max_tokens": 8, "ignore_eos": True})  # fmt: skip
        assert second == engine, f"turn 2 went to {second}, turn 1 to {engine}"
        # Every whole block of turn 1's prompt but (at most) the one its last token, the
        # assistant's header, shares with the answer (BPE may merge across that border).
        least = (turn_one_tokens // BLOCK_SIZE - 1) * BLOCK_SIZE
        assert least >= 5 * BLOCK_SIZE
        assert served.engines[engine].metric(LOCAL_HITS) - hits_before >= least
        assert cached_tokens(answer) >= least


def scraped_since(served: Served, engine_url: str, since: float) -> bool:
    """Whether the router's last scrape of ``engine_url`` is newer than ``since``
    (``time.monotonic()`` here; the router reports the scrape's age)."""
    with urllib.request.urlopen(served.router + "/router/engines", timeout=5) as reply:
        rows = json.loads(reply.read())["engines"]
    (row,) = [r for r in rows if r["url"] == engine_url]
    age = row["metrics_age_s"]
    return age is not None and age < time.monotonic() - since


def stored_blocks(socket_path: Path) -> int:
    with CacheClient(f"ipc://{socket_path}", heartbeat=False) as client:
        return sum(int(tier["num_blocks"]) for tier in client.stats()["tiers"])


def test_the_second_engine_loads_from_the_cache_daemon_when_the_first_is_saturated(
    served: Served,
) -> None:
    prompt = random_prompt(21, 1100)  # four whole 256-token chunks and 76 tokens more
    before = stored_blocks(served.cache_socket)
    warm, _ = post(served, "/v1/completions",
                   {"prompt": prompt, "max_tokens": 1, "ignore_eos": True})  # fmt: skip
    answered_at = time.monotonic()
    (other,) = set(served.engines) - {warm}
    assert wait_until(lambda: stored_blocks(served.cache_socket) >= before + 4, timeout=30)
    # The router must see `warm` idle: a scrape taken while the warm-up ran says one request
    # running there until the next one, and the burst's first request then went elsewhere
    # (one CI run of 2026-12-06). Wait for a scrape taken after the answer.
    assert wait_until(lambda: scraped_since(served, warm, answered_at), timeout=30)
    loaded_before = served.engines[other].metric(EXTERNAL_HITS)

    # A burst sharing the prompt (each its own last tokens), long enough to queue on `warm`.
    chosen: dict[int, str] = {}  # burst index -> the engine that served it
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            engine, answer = post(served, "/v1/completions", {
                "prompt": [*prompt, 4 + i, 5 + i], "max_tokens": 256, "ignore_eos": True})  # fmt: skip
            assert answer["usage"]["completion_tokens"] == 256
            chosen[i] = engine
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4 * MAX_NUM_SEQS)]
    for thread in threads:
        thread.start()
        time.sleep(0.2)  # in order: the router sees each one's predecessors in flight
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    order = [chosen[i] for i in range(len(threads))]
    assert order[0] == warm, order  # affinity while `warm` is idle ...
    assert other in order, order  # ... released once its queue made it the slower one
    loaded = served.engines[other].metric(EXTERNAL_HITS) - loaded_before
    assert loaded >= 4 * CHUNK, loaded  # the whole chunks `warm` saved, not recomputed
    assert loaded % CHUNK == 0, loaded
