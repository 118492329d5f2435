"""The autoscaler's live run: a real ``shoal autoscale run --target local`` on the wall clock.

::

    python bench/autoscale_live.py [--policy shoal] [--quick] [--json] [--seed N]

What runs (all real processes on this machine)::

    client (open-loop Poisson, streaming)  ->  shoal router serve --discovery file F
                                                   |  re-reads F every 0.5 s
    shoal autoscale run --target local  ----writes F, starts/stops----> shoal sim engine x N
         scrapes each engine's /metrics and the router's, every --interval-s

Load: ``base_rps`` for ``warmup_s``, a step to ``step_rps`` for ``step_s``, back to
``base_rps`` for ``cool_s``. Engines are ``shoal sim engine`` with a small
``--max-num-seqs`` so one replica saturates at a few requests per second (the machine's
cores, not the model, would otherwise be the limit).

Figures, the same keys as the simulator's per-policy rows (``bench/autoscale.py``):

* ``first_response_s``: from the step to the first decision asking for more replicas than
  were asked for at the step (the controller's decisions, read from its ``/status``; its
  clock and ours are both CLOCK_MONOTONIC);
* ``full_scaleup_s``: from the step until as many replicas are *ready* as the most the
  controller asked for during the step;
* ``oscillations_per_hour``: direction changes of the desired count over the run, per hour;
* ``replica_seconds``: engines running (ready + pending) integrated over the run;
* ``slo_attainment``: share of requests answered in full with TTFT <= ``ttft_slo_s`` and
  mean time per output token <= ``tpot_slo_s``;
* ``ttft_p99_ms``: p99 TTFT of the answered requests.

Every policy here reads the engines' metrics straight from the scrape, ``hpa`` included:
the live run has no Prometheus, adapter or 15 s sync in between, so it measures the
formulas and windows on real processes; the HPA's pipeline delay is the simulator's to
model (``shoal autoscale simulate``). The cool-down is shorter than the HPA's 300 s
scale-down window, so scale-down shows in the simulator, not here.

``run_live(...) -> dict`` is what ``bench/autoscale.py --live`` calls. A figure that did not
happen (no scale-up) is ``None``, never 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

import aiohttp  # noqa: E402

from control.autoscale.actuators.local import free_port, write_discovery_file  # noqa: E402
from shoal.processes import shoal_env  # noqa: E402

__all__ = ["run_live"]

MODEL = "sim-7b"


@dataclass(frozen=True, slots=True)
class Outcome:
    sent_s: float
    ok: bool
    ttft_s: float | None
    tpot_s: float | None


async def _request(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> Outcome:
    sent = time.monotonic()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    first: float | None = None
    chunks = 0
    done = False
    try:
        async with session.post(url + "/v1/completions", json=body) as reply:
            if reply.status != 200:
                await reply.read()
                return Outcome(sent, False, None, None)
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                if line == b"data: [DONE]":
                    done = True
                    break
                if first is None:
                    first = time.monotonic()
                chunks += 1
    except (aiohttp.ClientError, TimeoutError):
        return Outcome(sent, False, None, None)
    end = time.monotonic()
    ttft = None if first is None else first - sent
    tpot = (end - first) / (chunks - 1) if first is not None and chunks > 1 else None
    return Outcome(sent, done and first is not None, ttft, tpot)


async def _load(
    url: str, phases: list[tuple[float, float]], max_tokens: int, prompt_words: int, seed: int
) -> list[Outcome]:
    """Open-loop Poisson arrivals: ``phases`` of (seconds, requests per second)."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Outcome]] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.monotonic()
        at = 0.0
        for seconds, rps in phases:
            end = at + seconds
            while rps > 0:
                at += rng.expovariate(rps)
                if at >= end:
                    break
                delay = start + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                words = " ".join(f"w{rng.randrange(5000)}" for _ in range(prompt_words))
                tasks.append(asyncio.create_task(_request(session, url, words, max_tokens)))
            at = end
        return list(await asyncio.gather(*tasks))


def _status(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/status", timeout=2) as reply:
            data = json.loads(reply.read())
            return data if isinstance(data, dict) else None
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return None


async def _watch(
    url: str, stop: asyncio.Event, every_s: float
) -> tuple[list[Any], dict[float, Any]]:
    """(time, spec, ready, pending) samples and decisions by their ``now_s``."""
    samples: list[tuple[float, int, int, int]] = []
    decisions: dict[float, Any] = {}
    while not stop.is_set():
        status = await asyncio.to_thread(_status, url)
        now = time.monotonic()
        if status and status.get("replicas"):
            r = status["replicas"]
            samples.append((now, r["spec"], r["ready"], r["pending"]))
            for record in status.get("decisions", []):
                if record.get("decision"):
                    decisions[record["now_s"]] = record["decision"]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
    return samples, decisions


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _figures(
    outcomes: list[Outcome],
    samples: list[tuple[float, int, int, int]],
    decisions: dict[float, Any],
    *,
    step_at: float,
    step_end: float,
    run_start: float,
    run_end: float,
    ttft_slo_s: float,
    tpot_slo_s: float,
) -> dict[str, Any]:
    ordered = [decisions[t] | {"now_s": t} for t in sorted(decisions)]
    before = [d for d in ordered if d["now_s"] < step_at]
    spec_at_step = before[-1]["desired"] if before else 1
    during = [d for d in ordered if step_at <= d["now_s"] <= step_end]
    first_up = next((d["now_s"] for d in during if d["desired"] > spec_at_step), None)
    peak = max((d["desired"] for d in during), default=spec_at_step)
    full = None
    if peak > spec_at_step:
        full = next((t for t, _, ready, _ in samples if t >= step_at and ready >= peak), None)
    changes = 0
    last_direction = 0
    for previous, current in itertools.pairwise(ordered):
        delta = current["desired"] - previous["desired"]
        direction = (delta > 0) - (delta < 0)
        if direction and last_direction and direction != last_direction:
            changes += 1
        last_direction = direction or last_direction
    replica_seconds = 0.0
    inside = [s for s in samples if run_start <= s[0] <= run_end]
    for (t0, _, ready, pending), (t1, *_rest) in itertools.pairwise(inside):
        replica_seconds += (ready + pending) * (t1 - t0)
    answered = [o for o in outcomes if o.ok and o.ttft_s is not None]
    within = [
        o for o in answered
        if o.ttft_s is not None and o.ttft_s <= ttft_slo_s
        and (o.tpot_s is None or o.tpot_s <= tpot_slo_s)
    ]  # fmt: skip
    p99 = _percentile([o.ttft_s for o in answered if o.ttft_s is not None], 0.99)
    hours = (run_end - run_start) / 3600
    return {
        "first_response_s": None if first_up is None else round(first_up - step_at, 2),
        "full_scaleup_s": None if full is None else round(full - step_at, 2),
        "oscillations_per_hour": round(changes / hours, 1) if hours > 0 else None,
        "replica_seconds": round(replica_seconds, 1),
        "slo_attainment": round(len(within) / len(outcomes), 4) if outcomes else None,
        "ttft_p99_ms": None if p99 is None else round(p99 * 1000, 1),
        "requests": len(outcomes),
        "requests_ok": len(answered),
        "peak_desired": peak,
        "replicas_at_step": spec_at_step,
    }


def run_live(
    policy: str = "shoal",
    *,
    quick: bool = False,
    base_rps: float = 1.0,
    step_rps: float = 6.0,
    warmup_s: float | None = None,
    step_s: float | None = None,
    cool_s: float | None = None,
    max_replicas: int = 4,
    max_num_seqs: int = 4,
    max_tokens: int = 128,
    prompt_words: int = 64,
    ttft_slo_s: float = 1.0,
    tpot_slo_s: float = 0.1,
    interval_s: float = 2.0,
    drain_s: float = 3.0,
    metrics: str = "requests_waiting:2,kv_cache_usage:0.7",
    options: str = "",
    seed: int = 0,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """One live run under ``policy``; the figures (module docstring) plus the run's shape.

    Phases not given: 40 s warm-up, a 60 s step, 40 s after it; ``quick``: 35, 40 and 20 s
    (about two minutes with the starts). The warm-up outlasts the policies' trend and
    stable windows, so the step, not the start of the load, is what they answer.
    """
    short = (35.0, 40.0, 20.0) if quick else (40.0, 60.0, 40.0)
    warmup_s = short[0] if warmup_s is None else warmup_s
    step_s = short[1] if step_s is None else step_s
    cool_s = short[2] if cool_s is None else cool_s
    work = Path(workdir or tempfile.mkdtemp(prefix="shoal-autoscale-live-"))
    work.mkdir(parents=True, exist_ok=True)
    discovery = work / "engines.json"
    write_discovery_file(discovery, [])
    engine = f"{sys.executable} -m shoal sim engine --port {{port}} --max-num-seqs {max_num_seqs}"
    if policy == "shoal" and "max_num_seqs" not in options:
        options = ",".join(filter(None, [options, f"max_num_seqs={max_num_seqs}"]))
    router_port = free_port(set())
    controller_port = free_port({router_port})
    router_url = f"http://127.0.0.1:{router_port}"
    # Both are processes, started from the checkout (cwd): bench/router.py would shadow the
    # router package for a child started in bench/.
    router = _spawn(
        ["router", "serve", "--host", "127.0.0.1", "--port", str(router_port),
         "--discovery", "file", "--discovery-file", str(discovery),
         "--discovery-interval-s", "0.5", "--health-interval-s", "0.5",
         "--strategy", "least-request"],
        work / "router.log",
    )  # fmt: skip
    controller: subprocess.Popen[bytes] | None = None
    try:
        _wait_listening(router, router_url, work / "router.log")
        command = [
            "autoscale", "run", "--target", "local",
            "--engine-command", engine, "--discovery-file", str(discovery),
            "--policy", policy, "--metrics", metrics, "--min-replicas", "1",
            "--max-replicas", str(max_replicas), "--interval-s", str(interval_s),
            "--drain-s", str(drain_s), "--router-url", router_url, "--model", MODEL,
            "--port", str(controller_port), "--ttft-slo-s", str(ttft_slo_s),
            "--tpot-slo-s", str(tpot_slo_s), "--log-format", "json",
        ]  # fmt: skip
        if options:
            command += ["--options", options]
        controller = _spawn(command, work / "autoscale.log")
        result = asyncio.run(
            _drive(
                controller, f"http://127.0.0.1:{controller_port}", router_url,
                work=work, base_rps=base_rps, step_rps=step_rps, warmup_s=warmup_s,
                step_s=step_s, cool_s=cool_s, max_tokens=max_tokens,
                prompt_words=prompt_words, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
                seed=seed, shape={
                    "policy": policy, "base_rps": base_rps, "step_rps": step_rps,
                    "warmup_s": warmup_s, "step_s": step_s, "cool_s": cool_s,
                    "max_replicas": max_replicas, "max_num_seqs": max_num_seqs,
                    "interval_s": interval_s, "workdir": str(work),
                },
            )
        )  # fmt: skip
    finally:
        if controller is not None:
            _stop(controller)  # first: it stops the engines it started
        _stop(router)
    if workdir is None:  # the logs are kept when asked for, or when the run failed
        shutil.rmtree(work, ignore_errors=True)
        del result["run"]["workdir"]
    return result


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "shoal", *args],
            stdout=log, stderr=subprocess.STDOUT, env=shoal_env(), cwd=REPO,
        )  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_listening(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    """Until ``url`` answers anything (the router's /health is 503 without engines)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited: {log_path.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not listening in 30 s; see {log_path}")


async def _drive(
    controller: subprocess.Popen[bytes],
    controller_url: str,
    router_url: str,
    *,
    work: Path,
    shape: dict[str, Any],
    base_rps: float,
    step_rps: float,
    warmup_s: float,
    step_s: float,
    cool_s: float,
    max_tokens: int,
    prompt_words: int,
    ttft_slo_s: float,
    tpot_slo_s: float,
    seed: int,
) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:  # one engine ready behind the router before the load starts
        if controller.poll() is not None:
            raise RuntimeError(f"autoscaler exited: {(work / 'autoscale.log').read_text()}")
        status = await asyncio.to_thread(_status, controller_url)
        if status and (status.get("replicas") or {}).get("ready", 0) >= 1:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("no engine ready in 120 s; see " + str(work))
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.5)  # the router re-reads the discovery file every 0.5 s
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(controller_url, stop, 0.25))
    run_start = time.monotonic()
    step_at = run_start + warmup_s
    phases = [(warmup_s, base_rps), (step_s, step_rps), (cool_s, base_rps)]
    outcomes = await _load(router_url, phases, max_tokens, prompt_words, seed)
    run_end = time.monotonic()
    stop.set()
    samples, decisions = await watcher
    figures = _figures(
        outcomes, samples, decisions, step_at=step_at, step_end=step_at + step_s,
        run_start=run_start, run_end=run_end, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
    )  # fmt: skip
    return {**figures, "run": shape}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default="shoal")
    parser.add_argument("--quick", action="store_true", help="a shorter run (about 2 minutes)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run_live(args.policy, quick=args.quick, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            if key != "run":
                print(f"{key:>24}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
