"""``shoal up``: the whole serving stack on one machine, in the foreground.

::

    shoal up                      # cache daemon, loader sidecar, 2 vLLM engines, the router
    shoal up --engines 3 --model ~/models/llama-3.2-1b --port 9000
    shoal up --engines sim        # simulated engines (no vLLM needed), 2 of them
    shoal up --engines sim:4      # 4 simulated engines
    shoal up --demo               # then a short conversation through the router (router.demo)
    shoal up --engines sim:4 --autoscale --min-replicas 0
                                  # 0..4 simulated engines started and stopped by
                                  # `shoal autoscale run` (its default policy); requests
                                  # wait in the router while none is up (scale from zero)
    shoal up --autoscale kpa      # 1..2 vLLM engines under Knative's KPA

What runs, wired to what, is ``router.up_plan``'s; how processes start and stop is
``router.stack``'s (stages spawned together, awaited in order, stopped in reverse, every
process in its own session with its log in ``--workdir``). This module is the command:
flags, progress, the table, waiting, and the exit.

Invariant: the table printed (and ``--json``) lists exactly the processes running, each
ready; when ``shoal up`` returns, none of them is left (``Stack.stop``: whole process
groups, the engines' core processes included, each waited for before any SIGKILL).

Choices:

- Progress goes to stderr (each component ready in turn, with the elapsed time), the table
  (or one line of JSON) to stdout, so ``shoal up --json | head -1`` is the contract
  scripts read.
- The default workdir is a new ``up-XXXX`` folder in the runtime dir (where daemons put
  sockets; ipc paths must stay under ~100 bytes): removed after a clean stop, kept (and
  named) when something failed. An explicit ``--workdir`` is never removed. The daemon's
  arena lock file (kept by the daemon by design) is dropped once its arena is gone.
- SIGINT and SIGTERM both stop the stack, even where SIGINT was inherited ignored (a
  script's background job); while stopping, both are ignored: the stop is bounded.
- Exit codes (``shoal.cli_format``): 0 stopped by Ctrl-C/SIGTERM after it was up;
  2 bad flags or missing set-up (the message names the fix); 1 a component failed to
  start or died (its log tail is printed, everything else is stopped); 130 interrupted
  while starting.

Rejected: starting the router in-process (its workers are processes of their own; one
supervisor over plain processes is simpler to stop); reusing ``running_router`` and the
test fixtures (each waits on its own; here every process shares one plan, one log folder
and one stop order).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from router.stack import Job, RunningStep, Service, Stack, StartFailed, Step, exit_text, log_tail
from router.up_plan import (
    DEFAULT_MODEL,
    REPO,
    SETUP_HINT,
    UpOptions,
    UpPlan,
    check_setup,
    connector_config,
    default_engine_python,
    engine_cpus,
    kv_events_config,
    plan_stack,
    vllm_command,
    vllm_env,
)
from shoal.cli_format import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from shoal.cli_format import table as text_table
from shoal.config import default_runtime_dir
from shoal.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "REPO",
    "UpOptions",
    "UpPlan",
    "check_setup",
    "connector_config",
    "default_engine_python",
    "describe",
    "engine_cpus",
    "kv_events_config",
    "options_from_args",
    "plan_stack",
    "register",
    "render",
    "run",
    "vllm_command",
    "vllm_env",
]


# --- output --------------------------------------------------------------------------------


def describe(plan: UpPlan, running: Sequence[RunningStep]) -> dict[str, Any]:
    """The ``--json`` object (and what the table shows)."""
    return {
        "router": plan.router_url,
        "autoscaler": plan.autoscaler_url or None,
        "model": plan.served_name,
        "workdir": str(plan.workdir),
        "components": [
            {
                "component": item.name,
                "pid": item.pid,
                "address": item.step.address,
                "detail": item.step.detail,
                "log": str(item.step.log_path),
                "ready_s": round(item.ready_after_s or 0.0, 1),
            }
            for item in running
            if isinstance(item.step, Service)
        ],
        "curl": plan.example_curl(),
    }


def render(described: Mapping[str, Any]) -> list[str]:
    rows = [
        [c["component"], str(c["pid"]), c["address"], c["detail"], c["log"]]
        for c in described["components"]
    ]
    lines = text_table(("COMPONENT", "PID", "ADDRESS", "DETAIL", "LOG"), rows, "<><<<")
    scaled = []
    if described.get("autoscaler"):
        scaled = [
            "",
            f"Engines come and go with load: `shoal autoscale status --url "
            f"{described['autoscaler']}` shows them; a request that finds none waits for one.",
        ]
    return [
        *lines,
        *scaled,
        "",
        f"Router: {described['router']}  (model {described['model']!r}; the response header "
        "x-shoal-engine names the engine that served it)",
        f"  {described['curl']}",
        "",
        "Ctrl-C stops everything.",
    ]


# --- the command ---------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="the whole stack on one machine: cache daemon, loader sidecar, engines and the router",
        description=(
            "Start a cache daemon, the loader sidecar, N engines (vLLM with Shoal's KV "
            "connector, KV events and --load-format shoal; or simulated ones) and the router "
            "in front, print what runs where, and stop everything on Ctrl-C."
        ),
    )
    a = up.add_argument
    a(
        "--engines",
        default="2",
        metavar="N|sim|sim:N",
        help="how many vLLM engines (default 2), or simulated ones: sim (2) or sim:N",
    )
    a(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"model folder the engines serve (default: the tiny model {SETUP_HINT} builds)",
    )
    a("--served-model-name", default="", help="the name clients send (default: the folder's)")
    a("--port", type=int, default=8080, help="the router's port (default 8080; 0 = any free)")
    a("--host", default="127.0.0.1", help="the router's address (default loopback)")
    a("--strategy", default="shoal", help="the router's strategy or weighted mix (default shoal)")
    a(
        "--workdir",
        type=Path,
        help="logs and sockets (default: a new up-XXXX in the runtime "
        "dir, removed after a clean stop)",
    )
    a(
        "--no-loader",
        dest="loader",
        action="store_false",
        help="engines load weights with vLLM's own loader (no sidecar)",
    )
    a("--cpu-per-engine", type=int, default=1, help="cores each engine computes on (default 1)")
    a(
        "--engine-python",
        type=Path,
        help="interpreter with vLLM (default: .venv-engine/bin/python here, else this one)",
    )
    a(
        "--engine-args",
        default="",
        metavar="'FLAGS'",
        help="more engine flags, one string: --engine-args='--max-num-seqs 4'",
    )
    a(
        "--router-args",
        default="",
        metavar="'FLAGS'",
        help="more `shoal router serve` flags, one string: --router-args='--workers 2'",
    )
    a("--kv-cache-bytes", type=int, default=128 << 20, help="each vLLM engine's KV cache")
    a("--max-model-len", type=int, default=2048)
    a("--cache-shm-bytes", default="512MiB", help="the cache daemon's shared-memory tier")
    a("--chunk-tokens", type=int, default=256, help="tokens per Shoal cache key (default 256)")
    a("--ready-timeout-s", type=float, default=300.0, help="how long an engine may take to start")
    a(
        "--autoscale",
        nargs="?",
        const="",
        default=None,
        metavar="POLICY",
        help="engines started and stopped by `shoal autoscale run` (kpa, apa, hpa, aibrix-kpa "
        "or shoal; default its own), from --min-replicas up to --engines N; the router holds "
        "requests while none is up",
    )
    a(
        "--min-replicas",
        type=int,
        default=1,
        help="with --autoscale: fewest engines (default 1; 0 = scale to zero when idle)",
    )
    a(
        "--autoscale-args",
        default="",
        metavar="'FLAGS'",
        help="more `shoal autoscale run` flags, one string: --autoscale-args='--interval-s 1'",
    )
    a("--json", action="store_true", help="print what runs where as one line of JSON")
    a(
        "--demo",
        action="store_true",
        help="once up, send a short conversation through the "
        "router and show each turn's engine and cached prompt tokens",
    )
    up.set_defaults(func=_up)  # fmt: skip


def options_from_args(args: argparse.Namespace) -> UpOptions:
    text = str(args.engines).strip().lower()
    sim = text == "sim" or text.startswith("sim:")
    count = text.removeprefix("sim").removeprefix(":") or "2"
    try:
        num_engines = int(count)
    except ValueError:
        raise ConfigError(f"--engines takes N, sim or sim:N, got {args.engines!r}") from None
    return UpOptions(
        num_engines=num_engines,
        sim=sim,
        model=Path(args.model).expanduser(),
        served_model_name=args.served_model_name,
        port=args.port,
        host=args.host,
        strategy=args.strategy,
        loader=args.loader,
        cpu_per_engine=args.cpu_per_engine,
        engine_python=args.engine_python,
        engine_args=tuple(shlex.split(args.engine_args)),
        router_args=tuple(shlex.split(args.router_args)),
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        cache_shm_bytes=args.cache_shm_bytes,
        chunk_tokens=args.chunk_tokens,
        engine_ready_timeout_s=args.ready_timeout_s,
        autoscale=args.autoscale,
        min_replicas=args.min_replicas,
        autoscale_args=tuple(shlex.split(args.autoscale_args)),
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block, even where SIGINT was
    inherited ignored (a background job of a script: ``kill -INT`` must still stop it)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _up(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    check_setup(options)
    temporary = args.workdir is None
    if temporary:
        runtime = Path(default_runtime_dir())
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="up-", dir=runtime))
    else:
        workdir = Path(args.workdir).expanduser().resolve()
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    code = run(options, workdir, as_json=args.json, demo=args.demo)
    _drop_arena_lock(workdir.name)
    if temporary and code in (0, EXIT_USAGE):  # EXIT_USAGE: nothing ever ran
        shutil.rmtree(workdir, ignore_errors=True)
    elif code not in (0, EXIT_USAGE):
        _say(f"shoal up: logs kept in {workdir}")
    return code


def _drop_arena_lock(name: str) -> None:
    """The daemon keeps its arena's lock file by design (``kvcache.arena``: a new daemon of
    the same name takes it); once the arena itself is gone (a clean exit removes it) this
    run's daemon is, and its name is this workdir's: the lock would only pile up."""
    arena = Path(os.environ.get("SHOAL_CACHE_SHM_DIR") or "/dev/shm") / f"shoal-{name}.arena"
    if not arena.exists():
        arena.with_name(arena.name + ".lock").unlink(missing_ok=True)


def run(options: UpOptions, workdir: Path, *, as_json: bool = False, demo: bool = False) -> int:
    """Start the plan, print it, wait for Ctrl-C/SIGTERM or a death, stop everything."""
    try:
        plan = plan_stack(options, workdir)
    except ConfigError as exc:
        _say(f"shoal up: {exc}")
        return EXIT_USAGE
    for directory in plan.directories:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path, text in plan.files:
        path.write_text(text)
    began = time.monotonic()
    what = "simulated" if options.sim else "vLLM"
    count = str(options.num_engines)
    if options.autoscale is not None:
        count = f"{options.min_replicas}..{options.num_engines} autoscaled"
    _say(
        f"shoal up: {count} {what} engines serving {plan.served_name!r} behind "
        f"the router on {plan.router_url}; logs in {workdir}"
    )

    def on_stage(steps: Sequence[Step]) -> None:
        names = ", ".join(step.name for step in steps)
        slow = (
            " (vLLM on CPU: 20-90 s)"
            if any(s.name.startswith("engine") for s in steps) and not options.sim
            else ""
        )
        _say(f"[{time.monotonic() - began:6.1f}s] starting {names}{slow}")

    def on_ready(item: RunningStep) -> None:
        verb = "done" if isinstance(item.step, Job) else f"ready (pid {item.pid})"
        _say(f"[{time.monotonic() - began:6.1f}s] {item.name} {verb} in {item.ready_after_s:.1f} s")

    stack = Stack(plan.stages, on_stage=on_stage, on_ready=on_ready)
    up = False
    try:
        with _signals_interrupt():
            try:
                stack.start()
                up = True
                described = describe(plan, stack.running)
                if as_json:
                    print(json.dumps(described), flush=True)
                else:
                    print("\n".join(render(described)), flush=True)
                if demo:
                    _demo(plan, stack.running, as_json)
                while (dead := stack.exited()) is None:
                    time.sleep(0.5)
                code = dead.process.returncode
                _say(
                    f"shoal up: {dead.name} {exit_text(code)}; its log "
                    f"{dead.step.log_path}, last lines:\n{log_tail(dead.step.log_path)}"
                )
                return EXIT_FAILED
            except StartFailed as exc:
                _say(f"shoal up: {exc}")
                return EXIT_FAILED
            except KeyboardInterrupt:
                return 0 if up else EXIT_INTERRUPTED
    finally:
        _stop(stack, began)


def _demo(plan: UpPlan, running: Sequence[RunningStep], as_json: bool) -> None:
    from router.demo import demo_json, render_demo, safe_demo

    names = {item.step.address: item.name for item in running if isinstance(item.step, Service)}
    _say("shoal up: demo: two conversations of three turns through the router")
    turns, error = safe_demo(plan.router_url, plan.served_name, names)
    if error:
        _say(f"shoal up: demo FAILED ({error}); the stack keeps serving")
    elif as_json:
        print(json.dumps(demo_json(turns)), flush=True)
    else:
        print("\n".join(["", *render_demo(turns), ""]), flush=True)


def _stop(stack: Stack, began: float) -> None:
    names = ", ".join(item.name for item in reversed(stack.running))
    if names:
        _say(f"[{time.monotonic() - began:6.1f}s] stopping {names}")
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.stop()  # bounded (router.stack): a second Ctrl-C cannot make it leak
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if names:
        _say(f"[{time.monotonic() - began:6.1f}s] stopped")
