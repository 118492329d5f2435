"""``shoal autoscale simulate``: replay a trace against simulated replicas under one policy.

::

    shoal autoscale simulate --trace FILE|synthetic:NAME[:k=v,...]
        --policy kpa|apa|hpa|aibrix-kpa|shoal [--json] [--rate-scale X] [--copies N]
        [--start-time-s S] [--duration-s S] [--slo ttft=1,tpot=0.1]
        [--metrics kv_cache_usage:0.7,requests_waiting:4] [--options NAME=VALUE,...]
        [--min-replicas N] [--max-replicas N] [--initial-replicas N]
        [--model-size 7b | --start-delay-s S] [--scrape-failure-rate F] [--profile FILE] [--seed N]

A table by default; ``--json`` prints one object with the figures (``first_response_s``,
``full_scaleup_s``, ``oscillations_per_hour``, ``replica_seconds``, ``slo_attainment``,
``ttft_p99_ms``) and the run's context (load step, target, requests, ...). Every policy
gets the same ``--metrics`` targets (the controller's default) unless told otherwise;
the shoal policy is also told the ``--slo`` and the pod start time (``deployment_options``).
Exit codes (``shoal.cli_format``): 0 done, 2 bad flags, policy options or trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from control.autoscale.config import AutoscaleSettings, parse_metrics, parse_options
from control.autoscale.errors import PolicyConfigError, TraceError
from control.autoscale.types import PolicySpec
from shoal.cli_format import EXIT_USAGE, table
from shoal.errors import ConfigError

__all__ = [
    "DEFAULT_METRICS",
    "add_arguments",
    "deployment_options",
    "main",
    "parse_slo",
]

DEFAULT_METRICS = AutoscaleSettings().metrics  # the controller's default targets


def parse_slo(text: str) -> tuple[float, float]:
    """``ttft=SECONDS,tpot=SECONDS`` (either may be left out: 1.0 and 0.1)."""
    slo = {"ttft": 1.0, "tpot": 0.1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in slo:
            raise ConfigError(f"bad --slo item {item!r}: use ttft=SECONDS,tpot=SECONDS")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ConfigError(f"--slo {name} must be a number of seconds, got {value!r}") from None
        if not slo[name] > 0:
            raise ConfigError(f"--slo {name} must be > 0")
    return slo["ttft"], slo["tpot"]


def deployment_options(policy: str, slo: Any, start_delay_s: float) -> dict[str, float | str]:
    """What an operator tells the shoal policy about its deployment: the SLO the run is
    scored on and the pod start time (``--options`` overrides either). The other
    policies take no SLO: they scale on their metric targets."""
    if policy != "shoal":
        return {}
    return {"ttft_slo_s": slo.ttft_s, "tpot_slo_s": slo.tpot_s, "start_time_s": start_delay_s}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from control.autoscale.simulate.run import MODEL_BYTES

    parser.add_argument(
        "--trace", required=True, help="Azure 2023 .csv, Mooncake .jsonl or synthetic:NAME"
    )
    parser.add_argument("--policy", default="shoal", help="kpa, apa, hpa, aibrix-kpa or shoal")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--rate-scale", type=float, default=1.0, help="arrival rate multiplier (time compressed)"
    )
    parser.add_argument(
        "--copies", type=float, default=1.0, help="each request N times on the same clock"
    )
    parser.add_argument("--start-time-s", type=float, default=0.0, help="skip the trace's start")
    parser.add_argument("--duration-s", type=float, default=None, help="replay only this long")
    parser.add_argument("--slo", default="ttft=1.0,tpot=0.1", help="ttft=S,tpot=S (%(default)s)")
    parser.add_argument(
        "--metrics", default=DEFAULT_METRICS, help="METRIC:TARGET,... (%(default)s)"
    )
    parser.add_argument("--options", default="", help="policy tunables NAME=VALUE,...")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=16)
    parser.add_argument(
        "--initial-replicas", type=int, default=None, help="default: what the load needs at t=0"
    )
    parser.add_argument(
        "--model-size",
        default="7b",
        choices=sorted(MODEL_BYTES),
        help="pod start = vllm serve start + weight load at the loader's measured rate",
    )
    parser.add_argument(
        "--start-delay-s", type=float, default=None, help="pod start time (overrides --model-size)"
    )
    parser.add_argument(
        "--scrape-failure-rate", type=float, default=0.0, help="fraction of scrapes that fail"
    )
    parser.add_argument("--profile", default="", help="step profile JSON (shoal sim calibrate)")
    parser.add_argument("--seed", type=int, default=0)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The trace and the ``SimulationSpec`` the flags describe (bench/autoscale.py too)."""
    from control.autoscale.simulate.pipeline import pipeline_for
    from control.autoscale.simulate.replicas import ReplicaConfig
    from control.autoscale.simulate.run import SimulationSpec, Slo, start_delay_s
    from control.autoscale.simulate.traces import load_trace
    from sim.errors import ProfileError
    from sim.profile import DEFAULT_PROFILE, load_profile

    ttft, tpot = parse_slo(args.slo)
    if not 0 <= args.scrape_failure_rate < 1:
        raise ConfigError("--scrape-failure-rate must be in [0, 1)")
    if args.start_delay_s is not None and args.start_delay_s < 0:
        raise ConfigError("--start-delay-s must be >= 0")
    if args.initial_replicas is not None and args.initial_replicas < 0:
        raise ConfigError("--initial-replicas must be >= 0")
    try:
        profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    if not tpot > profile.c0_s:
        raise ConfigError(f"--slo tpot must exceed one step's fixed cost ({profile.c0_s} s)")
    delay = args.start_delay_s if args.start_delay_s is not None else start_delay_s(args.model_size)
    try:
        policy_spec = PolicySpec(
            parse_metrics(args.metrics),
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            options={
                **deployment_options(args.policy, Slo(ttft, tpot), delay),
                **parse_options(args.options),
            },
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    trace = load_trace(
        args.trace,
        rate_scale=args.rate_scale,
        copies=args.copies,
        start_s=args.start_time_s,
        duration_s=args.duration_s,
        seed=args.seed,
    )
    spec = SimulationSpec(
        policy=args.policy,
        policy_spec=policy_spec,
        pipeline=pipeline_for(args.policy, failure_rate=args.scrape_failure_rate, seed=args.seed),
        replica=ReplicaConfig(profile=profile),
        slo=Slo(ttft, tpot),
        start_delay_s=delay,
        initial_replicas=args.initial_replicas,
        seed=args.seed,
    )
    return trace, spec


def result_json(result: Any) -> dict[str, Any]:
    """The figures and the run's context, as ``--json`` prints them."""
    return {
        **result.figures(),
        "policy": result.policy,
        "trace": result.trace,
        "tpot_p99_ms": round(result.tpot_p99_ms, 1),
        "load_step_s": result.load_step_s,
        "target_replicas": result.target_replicas,
        "initial_replicas": result.initial_replicas,
        "peak_replicas": result.peak_replicas,
        "num_requests": result.num_requests,
        "num_decisions": result.num_decisions,
    }


def main(args: argparse.Namespace) -> int:
    from control.autoscale.policies import make_policy
    from control.autoscale.simulate.run import simulate

    try:
        trace, spec = build(args)
        policy = make_policy(spec.policy, spec.policy_spec)
    except (TraceError, PolicyConfigError, ConfigError) as exc:
        print(f"shoal autoscale simulate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    result = simulate(trace, spec, policy)
    figures = result_json(result)
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = [[key, "-" if value is None else str(value)] for key, value in figures.items()]
    print("\n".join(table(["figure", "value"], rows, "<>")))
    return 0
