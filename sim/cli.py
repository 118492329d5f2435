"""``shoal sim ...``: simulated vLLM engines for tests and fleet sizing.

::

    engine     run one simulated engine (an OpenAI server like `vllm serve`) in the foreground
    calibrate  measure a real OpenAI-compatible engine and write a step-time profile

Exit codes (``shoal.cli_format``): 0 success; 1 calibration failed; 2 bad flags or profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shoal.cli_format import EXIT_FAILED
from shoal.errors import ConfigError
from shoal.logs import setup_logging

__all__ = ["config_from_args", "register"]


def register(subparsers: Any) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="simulated vLLM engines for tests and fleet sizing",
        description="Simulated vLLM engines: same HTTP surface, metrics and KV events.",
    )
    verbs = sim.add_subparsers(dest="verb", required=True, metavar="VERB")
    engine = verbs.add_parser("engine", help="run one simulated engine in the foreground")
    add_engine_flags(engine)
    engine.set_defaults(func=_engine)

    calibrate = verbs.add_parser("calibrate", help="fit a step-time profile to a real engine")
    calibrate.add_argument("--engine", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    calibrate.add_argument("--out", required=True, help="profile JSON to write")
    calibrate.add_argument("--model", help="model name to send (default: the first listed)")
    calibrate.add_argument(
        "--vocab-size", type=int, default=1000, help="token ids are drawn below this (default 1000)"
    )
    calibrate.add_argument(
        "--max-prompt",
        type=int,
        default=1024,
        help="longest prompt measured, <= the engine's batched-token budget",
    )
    calibrate.add_argument(
        "--batch-sizes", default="1,2,4,8", help="decode batch sizes to measure (default 1,2,4,8)"
    )
    calibrate.add_argument("--decode-tokens", type=int, default=32)
    calibrate.add_argument("--repeats", type=int, default=2)
    calibrate.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="the engine's --time-scale when it is a simulator",
    )
    calibrate.add_argument("--json", action="store_true", help="print the fit as JSON")
    calibrate.set_defaults(func=_calibrate)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--host", default="127.0.0.1", help="listen address (default loopback)")
    a("--port", type=int, default=8000)
    a("--model", default="sim-7b", help="model path or name (listed as `root`)")
    a("--served-model-name", help="the name clients send (default: --model)")
    a("--max-model-len", type=int, default=4096)
    a("--block-size", type=int, default=16, help="tokens per KV block (vLLM CPU uses 128)")
    a("--num-gpu-blocks", type=int, help="KV-cache size in blocks (default 8192)")
    a("--kv-cache-memory-bytes", type=int, help="KV-cache size in bytes, instead of blocks")
    a("--kv-bytes-per-token", type=int, default=2 * 32 * 4096 * 2)
    a("--max-num-seqs", type=int, default=256)
    a("--max-num-batched-tokens", type=int, default=2048)
    a("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    a("--enable-lora", action="store_true")
    a("--max-loras", type=int, default=1, help="distinct adapters in one step (vLLM's)")
    a("--max-cpu-loras", type=int, help="adapters resident in the LoRA cache (>= max-loras)")
    a("--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    a(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage.prompt_tokens_details.cached_tokens, as vLLM's flag",
    )
    a("--profile", help="step-time profile JSON (default: a 7B model on one A100)")
    a("--time-scale", type=float, default=1.0, help="simulated seconds per wall second")
    a("--tokenizer", help="directory with a tokenizer.json (default: hashed words)")
    a("--vocab-size", type=int, default=32000)
    a("--kv-events-config", help="vLLM's KV-events JSON (publisher zmq, endpoint, ...)")
    a("--max-request-bytes", type=int, default=64 << 20)
    a("--fault-slowdown", type=float, default=1.0)
    a("--fault-hang", choices=("off", "requests", "all"), default="off")
    a("--fault-fail-next", type=int, default=0)
    a("--fault-die-after-chunks", type=int, default=0)
    a("--fault-die-mode", choices=("close", "exit"), default="close")
    a("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> Any:
    from sim.config import SimConfig
    from sim.errors import ProfileError
    from sim.events import parse_kv_events_config
    from sim.profile import DEFAULT_PROFILE, load_profile

    modules = []
    for item in args.lora_modules:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules takes NAME=PATH, got {item!r}")
        modules.append((name, path))
    try:
        profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    except ProfileError as exc:
        raise ConfigError(str(exc)) from None
    return SimConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        served_model_name=args.served_model_name,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        kv_bytes_per_token=args.kv_bytes_per_token,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        lora_modules=tuple(modules),
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        profile=profile,
        time_scale=args.time_scale,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        kv_events=parse_kv_events_config(args.kv_events_config) if args.kv_events_config else None,
        faults={
            "slowdown": args.fault_slowdown,
            "hang": args.fault_hang,
            "fail_next": args.fault_fail_next,
            "die_after_chunks": args.fault_die_after_chunks,
            "die_mode": args.fault_die_mode,
        },
        max_request_bytes=args.max_request_bytes,
    )


def _engine(args: argparse.Namespace) -> int:
    from sim.server import serve

    setup_logging(args.log_level, "text")
    return serve(config_from_args(args))


def _calibrate(args: argparse.Namespace) -> int:
    from sim.calibrate import CalibrationPlan, HttpProber, calibrate
    from sim.errors import CalibrationError

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes takes ints, got {args.batch_sizes!r}") from None
    plan = CalibrationPlan(
        max_prompt=args.max_prompt,
        batch_sizes=sizes,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        vocab_size=args.vocab_size,
    )
    prober = HttpProber(args.engine, args.model, time_scale=args.time_scale)
    try:
        fit = calibrate(prober, plan, source=f"calibrated against {args.engine}")
    except CalibrationError as exc:
        print(f"shoal sim calibrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    fit.profile.save(args.out)
    if args.json:
        print(json.dumps(fit.to_json(), indent=2))
    else:
        p = fit.profile
        print(
            f"c0 {p.c0_s * 1e3:.3f} ms  prefill {p.c_prefill_s * 1e6:.3f} us/token  "
            f"decode {p.c_decode_s * 1e6:.3f} us/seq  kv {p.c_kv_s * 1e9:.3f} ns/token"
            f"  attn {p.c_attn_s * 1e9:.3f} ns/pair"
        )
        print(
            f"fit error: ttft {fit.ttft_error:.1%}, itl {fit.itl_error:.1%} "
            f"(mean relative, {fit.num_measurements} measurements); wrote {args.out}"
        )
    return 0
