"""Settings of ``shoal engines serve``, and the fleet's template they describe.

Flags (``--replicas 2``), environment (``SHOAL_ENGINES_REPLICAS=2``) or the ``[engines]``
table of the TOML file named by ``--config``; file < environment < flags, as every Shoal
component. The README's reference table is generated from this class.

Invariant: an ``EnginesSettings`` that constructs is internally consistent (``tp``,
``pp`` >= 1, ``0 <= replicas <= max_replicas``, a known strategy and worker kind, a
rolling update that can progress (``max_surge`` or ``max_unavailable`` > 0), positive
times, no HTTP port beyond loopback without a token unless ``--insecure-no-auth``). What
only ``serve`` needs (a model, an engine command with ``{port}``) is checked by
``check_serve``, so client verbs and tests can build defaults.

The template's ``revision`` is a hash of everything else in it (``template_revision``):
the same template always has the same revision, on any machine and after a restart, so a
``POST /v1/update`` that changes nothing starts no rolling update. Rejected: a counter
(restarts reset it, and two daemons would disagree about the same template).

Pure: imports no transport (the import contract checks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from control.health.targets import check_watcher_url
from control.ray.types import STRATEGIES, WORKER_MODES, FleetSpec, GroupSpec
from shoal.config import is_loopback, setting
from shoal.errors import ConfigError

__all__ = [
    "UPDATABLE",
    "EnginesSettings",
    "apply_update",
    "check_serve",
    "fleet_spec",
    "gpu_health_urls",
    "group_template",
    "template_revision",
]

# POST /v1/update's keys -> GroupSpec's fields (the short flag names, as on the command line)
UPDATABLE: Mapping[str, str] = {
    "model": "model",
    "engine_command": "engine_command",
    "env": "env",
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "strategy": "strategy",
    "accelerator_type": "accelerator_type",
    "gpu_type": "gpu_type",
    "driver_cpus": "driver_cpus",
    "wait_deadline_s": "wait_deadline_s",
    "ready_timeout_s": "ready_timeout_s",
    "workers": "workers",
}


@dataclass(frozen=True, slots=True)
class EnginesSettings:
    model: str = setting("", "the model every engine serves ({model} in --engine-command)")
    engine_command: str = setting(
        "",
        "the command the group's driver runs; {host} (the driver node's IP), {port}, "
        "{model}, {tp} and {pp} are replaced (vllm serve {model} --host {host} --port {port} "
        "--tensor-parallel-size {tp} --distributed-executor-backend ray; shoal sim engine "
        "--host {host} --port {port} on CPU)",
    )
    tp: int = setting(1, "tensor-parallel size: GPUs per pipeline stage")
    pp: int = setting(1, "pipeline-parallel size: stages (a group has tp x pp GPUs)")
    replicas: int = setting(1, "engine groups to keep")
    max_replicas: int = setting(64, "most groups POST /v1/scale (and the autoscaler) may ask for")
    strategy: str = setting(
        "PACK", "placement-group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
    )
    accelerator_type: str = setting(
        "", "Ray accelerator type every GPU bundle needs (e.g. A100; the node must advertise it)"
    )
    gpu_type: str = setting(
        "", "the GPU type name published with each engine (router discovery, placement pools)"
    )
    driver_cpus: float = setting(1.0, "CPUs the driver (the engine's API process) reserves")
    wait_deadline_s: float = setting(
        600.0, "seconds a group waits for capacity (then fails, saying what was missing)"
    )
    ready_timeout_s: float = setting(
        900.0, "seconds a placed group's engine may take to answer /health"
    )
    max_surge: int = setting(1, "rolling update: groups above --replicas while replacing")
    max_unavailable: int = setting(
        0, "rolling update: ready groups below --replicas allowed while replacing"
    )
    workers: str = setting(
        "standin",
        "standin (stand-in actors record where vLLM's workers sit: CPU tests) or vllm (vLLM "
        "starts its workers in the group)",
    )
    ray_address: str = setting(
        "", "Ray cluster to join (ray://HOST:10001 or HOST:6379); empty = RAY_ADDRESS or local"
    )
    discovery_file: str = setting(
        "", "ready engines (url, gpus, gpu_type) written here for the router's --discovery-file"
    )
    gpu_health: str = setting(
        "", "health watchers (shoal health watch) to poll, URL[,URL...]; dns+http://NAME:PORT "
        "= every address NAME resolves to (a headless Service); groups on sick GPUs are "
        "replaced"
    )  # fmt: skip
    gpu_health_token_file: str = setting(
        "", "file holding the health watchers' bearer token, if they have one"
    )
    gpu_health_interval_s: float = setting(5.0, "seconds between polls of the health watchers")
    interval_s: float = setting(2.0, "seconds between fleet rounds (poll groups, act, publish)")
    drain_s: float = setting(
        10.0,
        "seconds a ready group leaving the fleet (scale down, rolling update) keeps serving "
        "after it left the router's list, before it is stopped",
    )
    stop_grace_s: float = setting(
        30.0, "seconds a stopping group's engine has after SIGTERM before it is killed"
    )
    host: str = setting("127.0.0.1", "the daemon's HTTP address (/v1/fleet, /v1/scale, ...)")
    port: int = setting(8093, "the daemon's HTTP port; 0 = none")
    auth_token_file: str = setting(
        "",
        "file holding the bearer token every route but /metrics and /healthz requires "
        "(needed to listen beyond loopback)",
    )
    insecure_no_auth: bool = setting(
        False,
        "listen beyond loopback without --auth-token-file (anyone who reaches the port may "
        "start and stop engines)",
    )
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"--tp and --pp must be >= 1, got {self.tp} and {self.pp}")
        if not 0 <= self.replicas <= self.max_replicas:
            raise ConfigError(
                f"need 0 <= --replicas <= --max-replicas, got {self.replicas} and "
                f"{self.max_replicas}"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.workers not in WORKER_MODES:
            raise ConfigError(f"--workers {self.workers!r}: use standin or vllm")
        if self.max_surge < 0 or self.max_unavailable < 0:
            raise ConfigError("--max-surge and --max-unavailable must be >= 0")
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ConfigError(
                "--max-surge 0 with --max-unavailable 0 lets no rolling update progress: "
                "allow one extra group (--max-surge 1) or one fewer ready (--max-unavailable 1)"
            )
        for name in (
            "driver_cpus",
            "wait_deadline_s",
            "ready_timeout_s",
            "gpu_health_interval_s",
            "interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.drain_s < 0 or self.stop_grace_s < 0:
            raise ConfigError("--drain-s and --stop-grace-s must be >= 0")
        if (
            self.port
            and not self.auth_token_file
            and not self.insecure_no_auth
            and not is_loopback(self.host)
        ):
            raise ConfigError(
                f"the engines daemon would listen on {self.host} beyond loopback without "
                "authentication (a scale starts GPUs): give --auth-token-file FILE, or "
                "--insecure-no-auth to accept that"
            )
        gpu_health_urls(self.gpu_health)


def gpu_health_urls(text: str) -> tuple[str, ...]:
    """``"http://a:8094,dns+http://shoal-health.ns.svc:8094"`` as URLs (a ``dns+`` one is
    every address of its name: ``control.health.targets``); ``ConfigError`` for one that
    is neither form."""
    try:
        return tuple(
            check_watcher_url(part, "--gpu-health") for part in text.split(",") if part.strip()
        )
    except ValueError as exc:
        raise ConfigError(f"{exc}, e.g. http://node-a:8094") from None


def check_serve(settings: EnginesSettings) -> None:
    """What ``serve`` needs beyond consistency; ``ConfigError`` naming the flag."""
    if not settings.model:
        raise ConfigError("--model is required: the model every engine serves")
    if "{port}" not in settings.engine_command:
        raise ConfigError(
            "--engine-command needs {port} in it, e.g. 'shoal sim engine --host {host} "
            "--port {port}' or 'vllm serve {model} --host {host} --port {port} "
            "--tensor-parallel-size {tp} --distributed-executor-backend ray'"
        )


def template_revision(spec: GroupSpec) -> str:
    """A hash of every field of ``spec`` but ``revision`` (12 hex digits)."""
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(spec):
        if field.name != "revision":
            value = getattr(spec, field.name)
            fields[field.name] = dict(sorted(value.items())) if field.name == "env" else value
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _with_revision(spec: GroupSpec) -> GroupSpec:
    return dataclasses.replace(spec, revision=template_revision(spec))


def group_template(settings: EnginesSettings) -> GroupSpec:
    """The group template the settings describe, with its revision."""
    spec = GroupSpec(
        model=settings.model,
        engine_command=settings.engine_command,
        tensor_parallel=settings.tp,
        pipeline_parallel=settings.pp,
        strategy=settings.strategy,
        accelerator_type=settings.accelerator_type,
        driver_cpus=settings.driver_cpus,
        wait_deadline_s=settings.wait_deadline_s,
        ready_timeout_s=settings.ready_timeout_s,
        gpu_type=settings.gpu_type,
        workers=settings.workers,
    )
    return _with_revision(spec)


def fleet_spec(settings: EnginesSettings) -> FleetSpec:
    return FleetSpec(
        template=group_template(settings),
        replicas=settings.replicas,
        max_surge=settings.max_surge,
        max_unavailable=settings.max_unavailable,
    )


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key!r} must be an integer >= 1, got {value!r}")
    return value


def _positive_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{key!r} must be a number > 0, got {value!r}")
    return float(value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key!r} must be a string, got {value!r}")
    return value


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError('"env" must be an object of strings: {"NAME": "VALUE", ...}')
    return dict(value)


def apply_update(template: GroupSpec, body: Mapping[str, Any]) -> GroupSpec:
    """``template`` with ``body``'s changes (``POST /v1/update``'s keys, ``UPDATABLE``)
    and the new revision; ``ConfigError`` naming the key for an unknown key or a bad value.
    ``env`` replaces the whole environment."""
    unknown = sorted(set(body) - set(UPDATABLE))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; updatable: {', '.join(UPDATABLE)}")
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("tp", "pp"):
            changes[UPDATABLE[key]] = _positive_int(key, value)
        elif key in ("driver_cpus", "wait_deadline_s", "ready_timeout_s"):
            changes[key] = _positive_number(key, value)
        elif key == "env":
            changes[key] = _env(value)
        else:
            changes[UPDATABLE[key]] = _text(key, value)
    if "engine_command" in changes and "{port}" not in changes["engine_command"]:
        raise ConfigError('"engine_command" needs {port} in it')
    if "model" in changes and not changes["model"]:
        raise ConfigError('"model" must not be empty')
    if "strategy" in changes and changes["strategy"] not in STRATEGIES:
        raise ConfigError(f'"strategy" must be one of {", ".join(STRATEGIES)}')
    if "workers" in changes and changes["workers"] not in WORKER_MODES:
        raise ConfigError('"workers" must be standin or vllm')
    return _with_revision(dataclasses.replace(template, **changes))
