"""``shoal profile``: sweep an OpenAI endpoint and write one GPU type's profile (AIBrix JSON).

::

    shoal profile --url http://127.0.0.1:8000 --model M --gpu A100 --cost 3.67 \\
        --input-ticks 128,512,2048 --output-ticks 32,128,512 \\
        --ttft-slo-s 1 --tpot-slo-s 0.1 --percentile 99 --out A100.json

Each finished cell is saved to ``--state`` (default ``<out>.state.json``); rerunning the
same command skips them (Ctrl-C leaves a usable state). The method is in
``control/placement/profile.py``. A progress bar (tqdm, when installed) counts cells.

Exit codes (``shoal.cli_format``): 0 profile written; 1 no cell met the SLO at any rate;
2 bad flags, or a state file from other settings; 3 the endpoint cannot be reached or does
not serve the model; 130 interrupted (the state keeps the finished cells).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from shoal.cli_format import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNREACHABLE, table
from shoal.errors import ConfigError

__all__ = ["register"]

_HELP = "measure an endpoint's highest request rate within an SLO per request size"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help=_HELP,
        description="Sweep an OpenAI endpoint over input/output lengths and request rates; "
        "write AIBrix's GPU profile JSON (the highest rate meeting every SLO per cell).",
    )
    a = parser.add_argument
    a("--url", required=True, help="the endpoint, e.g. http://127.0.0.1:8000")
    a("--model", default="", help="the model name to send (default: the first listed)")
    a("--gpu", required=True, help="the GPU type's name in the profile, e.g. A100")
    a("--cost", type=float, required=True, help="cost of one replica per hour")
    a("--input-ticks", required=True, help="prompt lengths in tokens, e.g. 128,512,2048")
    a("--output-ticks", required=True, help="output lengths in tokens, e.g. 32,128,512")
    a("--ttft-slo-s", type=float, help="time-to-first-token target, seconds")
    a("--tpot-slo-s", type=float, help="time-per-output-token target, seconds")
    a("--e2e-slo-s", type=float, help="end-to-end latency target, seconds")
    a("--percentile", type=float, default=99.0, help="of each latency (default %(default)s)")
    a("--out", required=True, help="the profile JSON to write")
    a("--state", help="resumable state file (default: <out>.state.json)")
    a("--duration-s", type=float, default=20.0, help="measurement window per trial, at least")
    a("--warmup-s", type=float, default=5.0, help="warm-up per trial, at least")
    a("--min-requests", type=int, default=40, help="arrivals a window expects, at least")
    a("--start-rate", type=float, default=1.0, help="first rate tried per cell (requests/s)")
    a("--min-rate", type=float, default=0.05, help="below this a cell is 0 (requests/s)")
    a("--max-rate", type=float, default=1000.0, help="the most offered (requests/s)")
    a("--precision", type=float, default=0.05, help="relative precision of each rate")
    a("--seed", type=int, default=0, help="seed of arrivals and prompts")
    a("--time-scale", type=float, default=1.0, help="endpoint seconds per wall second "
      "(a simulator's --time-scale)")  # fmt: skip
    a("--max-token-id", type=int, default=8000, help="prompt ids are drawn below this")
    a("--api-key-file", default="", help="file with a bearer token for the endpoint")
    a("--quiet", action="store_true", help="no progress bar")
    a("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_main)


def _ticks(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    from control.placement.errors import ProfilerError

    try:
        return asyncio.run(_profile(args))
    except ProfilerError as exc:
        print(f"shoal profile: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _profile(args: argparse.Namespace) -> int:
    from control.placement.errors import ProfilerError
    from control.placement.loadgen import HttpLoad
    from control.placement.profile import SweepSpec, SweepState
    from control.placement.types import Slos

    if args.max_token_id <= 100:
        raise ConfigError("--max-token-id must be above 100")
    try:
        api_key = Path(args.api_key_file).read_text().strip() if args.api_key_file else ""
    except OSError as exc:
        raise ConfigError(
            f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}"
        ) from None
    slos = Slos(args.ttft_slo_s, args.tpot_slo_s, args.e2e_slo_s, args.percentile)
    # checked before the endpoint is asked anything: bad flags are exit 2, not 3
    spec = SweepSpec(
        gpu=args.gpu,
        cost=args.cost,
        model=args.model,
        in_ticks=_ticks("--input-ticks", args.input_ticks),
        out_ticks=_ticks("--output-ticks", args.output_ticks),
        slos=slos,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        min_requests=args.min_requests,
        precision=args.precision,
        start_rate=args.start_rate,
        min_rate=args.min_rate,
        max_rate=args.max_rate,
        seed=args.seed,
        time_scale=args.time_scale,
    )
    load = HttpLoad(
        args.url,
        args.model,
        slos,
        time_scale=args.time_scale,
        seed=args.seed,
        max_token_id=args.max_token_id,
        api_key=api_key,
    )
    async with load:
        if not args.model:
            models = await load.models()
            if not models:
                raise ProfilerError(f"{args.url} lists no model")
            load.model = models[0]
            spec = dataclasses.replace(spec, model=models[0])
        await load.check()
        state = SweepState(spec, Path(args.state or args.out + ".state.json"))
        return await _sweep(args, spec, state, load)


async def _sweep(args: argparse.Namespace, spec: Any, state: Any, load: Any) -> int:
    from control.placement.errors import ProfilerError
    from control.placement.profile import aibrix_profile, run_sweep, to_gpu_profile, write_json

    bar = _Progress(len(spec.cells), quiet=args.quiet or args.json)
    resumed = sum(1 for o, i in spec.cells if state.done(o, i) is not None)
    try:
        cells = await run_sweep(
            spec,
            load.trial,
            state,
            on_trial=bar.trial,
            on_cell=bar.cell,
        )
    except (KeyboardInterrupt, asyncio.CancelledError, ProfilerError) as exc:
        bar.close()
        done = sum(1 for o, i in spec.cells if state.done(o, i) is not None)
        why = "interrupted" if not isinstance(exc, ProfilerError) else str(exc)
        print(
            f"shoal profile: {why}; {done} of {len(spec.cells)} cells saved in "
            f"{state.path}: rerun the same command to resume",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE if isinstance(exc, ProfilerError) else EXIT_INTERRUPTED
    bar.close()
    profile = to_gpu_profile(spec, cells, created=time.time())
    data = aibrix_profile(profile, cells)
    write_json(Path(args.out), data)
    if args.json:
        summary = {
            "out": args.out,
            "state": str(state.path),
            "resumed_cells": resumed,
            "profile": data,
            "cells": [
                {
                    "out_tick": c.out_tick,
                    "in_tick": c.in_tick,
                    "rate": c.rate,
                    "num_trials": len(c.trials),
                    "note": c.note,
                }
                for c in cells
            ],
        }
        print(json.dumps(summary, indent=2))
    else:
        rows = [
            [str(c.out_tick), str(c.in_tick), f"{c.rate:.3g}", str(len(c.trials)), c.note]
            for c in cells
        ]
        for line in table(["out", "in", "req/s", "trials", "note"], rows, ">>>><"):
            print(line)
        print(f"wrote {args.out} ({spec.gpu}, {len(cells)} cells)")
    if not any(c.rate > 0 for c in cells):
        print("shoal profile: no cell met the SLO at any rate tried", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _Progress:
    """Cells done, and the trial in flight, on stderr (tqdm when installed)."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self._bar: Any = None
        if quiet:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=total, unit="cell", file=sys.stderr, disable=None, dynamic_ncols=True
        )

    def trial(self, out_tick: int, in_tick: int, trial: Any) -> None:
        verdict = "ok" if trial.passed else "miss"
        text = f"out {out_tick} in {in_tick}: {trial.rate:.3g}/s {verdict}"
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def cell(self, cell: Any, resumed: bool) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if not resumed and cell.rate == 0:
                self._bar.write(f"out {cell.out_tick} in {cell.in_tick}: 0 ({cell.note})")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
