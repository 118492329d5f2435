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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.placement.profile import CellResult, SweepSpec, TrialResult
from control.placement.types import Slos
from shoal.cli_format import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNREACHABLE, table
from shoal.config import add_flags, load_config, read_secret, setting
from shoal.errors import ConfigError

__all__ = ["ProfileSettings", "register", "settings_from_args"]

_HELP = "measure an endpoint's highest request rate within an SLO per request size"


@dataclass(frozen=True, slots=True)
class ProfileSettings:
    """``shoal profile``'s settings: flags < ``SHOAL_PROFILE_*`` < ``[profile]`` in the TOML
    file (``shoal.config``). Required: url, gpu, cost, input_ticks, output_ticks, out and
    at least one SLO (0 = that latency is not checked)."""

    url: str = setting("", "the OpenAI endpoint, e.g. http://127.0.0.1:8000 (required)")
    model: str = setting("", "the model name to send; empty = the first the endpoint lists")
    gpu: str = setting("", "the GPU type's name in the profile, e.g. A100 (required)")
    cost: str = setting("", "cost of one replica per hour, e.g. 3.67 (required)")
    input_ticks: str = setting("", "prompt lengths in tokens, e.g. 128,512,2048 (required)")
    output_ticks: str = setting("", "output lengths in tokens, e.g. 32,128,512 (required)")
    ttft_slo_s: float = setting(0.0, "time-to-first-token target, seconds (0 = none)")
    tpot_slo_s: float = setting(0.0, "time-per-output-token target, seconds (0 = none)")
    e2e_slo_s: float = setting(0.0, "end-to-end latency target, seconds (0 = none)")
    percentile: float = setting(99.0, "the percentile of each latency held to its target")
    out: str = setting("", "the profile JSON to write (AIBrix's format; required)")
    state: str = setting("", "resumable state file; empty = <out>.state.json")
    duration_s: float = setting(20.0, "measurement window per trial, seconds, at least")
    warmup_s: float = setting(5.0, "warm-up per trial, seconds, at least")
    min_requests: int = setting(40, "arrivals a trial's window expects, at least")
    start_rate: float = setting(1.0, "first rate of a row's first cell, requests/s")
    min_rate: float = setting(0.05, "below this rate a cell is 0, requests/s")
    max_rate: float = setting(1000.0, "the most requests/s ever offered")
    precision: float = setting(0.05, "relative precision of each cell's rate")
    seed: int = setting(0, "seed of arrivals and prompts")
    time_scale: float = setting(1.0, "endpoint seconds per wall second (a simulator's)")
    max_token_id: int = setting(8000, "prompt token ids are drawn from [100, this)")
    api_key_file: str = setting("", "file holding a bearer token for the endpoint")

    def __post_init__(self) -> None:
        for name in ("url", "gpu", "cost", "input_ticks", "output_ticks", "out"):
            if not getattr(self, name):
                raise ConfigError(f"shoal profile needs --{name.replace('_', '-')}")
        if self.max_token_id <= 100:
            raise ConfigError("--max-token-id must be above 100")

    @property
    def slos(self) -> Slos:
        return Slos(
            self.ttft_slo_s or None,
            self.tpot_slo_s or None,
            self.e2e_slo_s or None,
            self.percentile,
        )

    def spec(self, model: str) -> SweepSpec:
        """The sweep these settings ask for (``ProfileFormatError`` when inconsistent)."""
        try:
            cost = float(self.cost)
        except ValueError:
            raise ConfigError(f"--cost takes a number, got {self.cost!r}") from None
        return SweepSpec(
            gpu=self.gpu,
            cost=cost,
            model=model,
            in_ticks=_ticks("--input-ticks", self.input_ticks),
            out_ticks=_ticks("--output-ticks", self.output_ticks),
            slos=self.slos,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            min_requests=self.min_requests,
            precision=self.precision,
            start_rate=self.start_rate,
            min_rate=self.min_rate,
            max_rate=self.max_rate,
            seed=self.seed,
            time_scale=self.time_scale,
        )


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help=_HELP,
        description="Sweep an OpenAI endpoint over input/output lengths and request rates; "
        "write AIBrix's GPU profile JSON (the highest rate meeting every SLO per cell).",
    )
    add_flags(parser, ProfileSettings, "profile")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=_main)


def settings_from_args(args: argparse.Namespace) -> ProfileSettings:
    skip = ("func", "component", "json", "quiet")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return load_config(ProfileSettings, "profile", flags=flags)


def _ticks(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _main(args: argparse.Namespace) -> int:
    from control.placement.errors import ProfilerError

    settings = settings_from_args(args)
    try:
        return asyncio.run(_profile(args, settings))
    except ProfilerError as exc:
        print(f"shoal profile: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _profile(args: argparse.Namespace, settings: ProfileSettings) -> int:
    from control.placement.errors import ProfilerError
    from control.placement.loadgen import HttpLoad
    from control.placement.profile import SweepState

    api_key = read_secret(settings.api_key_file, "--api-key-file") if settings.api_key_file else ""
    # checked before the endpoint is asked anything: bad flags are exit 2, not 3
    spec = settings.spec(settings.model)
    load = HttpLoad(
        settings.url,
        settings.model,
        spec.slos,
        time_scale=settings.time_scale,
        seed=settings.seed,
        max_token_id=settings.max_token_id,
        api_key=api_key,
    )
    async with load:
        if not settings.model:
            models = await load.models()
            if not models:
                raise ProfilerError(f"{settings.url} lists no model")
            load.model = models[0]
            spec = dataclasses.replace(spec, model=models[0])
        await load.check()
        state = SweepState(spec, Path(settings.state or settings.out + ".state.json"))
        return await _sweep(args, settings.out, spec, state, load)


async def _sweep(args: argparse.Namespace, out: str, spec: SweepSpec, state: Any, load: Any) -> int:
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
            probe=load.probe,
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
    write_json(Path(out), data)
    if args.json:
        summary = {
            "out": out,
            "model": spec.model,  # not in the profile: AIBrix's schema has no place for it
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
        print(f"wrote {out} ({spec.gpu}, {len(cells)} cells)")
    if not any(c.rate > 0 for c in cells):
        print("shoal profile: no cell met the SLO at any rate tried", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _Progress:
    """Cells done and the trial in flight on stderr: a tqdm bar on a terminal (when tqdm is
    installed), else one line per finished cell (logs of a long sweep stay readable)."""

    def __init__(self, total: int, *, quiet: bool) -> None:
        self._bar: Any = None
        self._lines = not quiet
        self._total = total
        self._done = 0
        if quiet or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)
        self._lines = False

    def trial(self, out_tick: int, in_tick: int, trial: TrialResult) -> None:
        verdict = "ok" if trial.passed else "miss"
        if self._bar is not None:
            self._bar.set_postfix_str(f"out {out_tick} in {in_tick}: {trial.rate:.3g}/s {verdict}")

    def cell(self, cell: CellResult, resumed: bool) -> None:
        self._done += 1
        text = (
            f"cell {self._done}/{self._total} out {cell.out_tick} in {cell.in_tick}: "
            f"{cell.rate:.3g} req/s"
            + (" (saved earlier)" if resumed else f", {len(cell.trials)} trials")
            + (f" ({cell.note})" if cell.note else "")
        )
        if self._bar is not None:
            self._bar.update(1)
            if not resumed and cell.rate == 0:
                self._bar.write(text)
        elif self._lines:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
