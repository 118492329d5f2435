"""Settings of ``shoal autoscale run``: one frozen value, read through ``shoal.config``.

Flags (``--policy kpa``), environment (``SHOAL_AUTOSCALE_POLICY=kpa``) or the
``[autoscale]`` table of the TOML file named by ``--config``; file < environment < flags,
as every Shoal component. The README's reference table is generated from this class.

Invariant: an ``AutoscaleSettings`` that constructs is internally consistent (positive
intervals, ``0 <= min_replicas <= max_replicas``); the policy name, its options and the
metric targets are checked where policies are known (``policies.base.make_policy``).
"""

from __future__ import annotations

from dataclasses import dataclass

from control.autoscale.errors import PolicyConfigError
from control.autoscale.types import METRICS, MetricTarget, PolicySpec
from shoal.config import is_loopback, read_secret, setting
from shoal.errors import ConfigError

__all__ = [
    "AutoscaleSettings",
    "parse_metrics",
    "parse_options",
    "policy_spec",
    "read_token",
]


@dataclass(frozen=True, slots=True)
class AutoscaleSettings:
    policy: str = setting("shoal", "scaling policy: kpa, apa, hpa, aibrix-kpa or shoal")
    target: str = setting(
        "",
        "what to scale: deployment/NAME or statefulset/NAME (Kubernetes), local (engine "
        "processes on this machine), ray:URL (a `shoal engines serve` fleet of Ray engine "
        "groups), memory (nothing real: decisions only)",
    )
    target_token_file: str = setting(
        "", "ray:URL target: file holding the engines daemon's bearer token, if it has one"
    )
    namespace: str = setting("", "Kubernetes namespace of the target; empty = own or default")
    model: str = setting("", "the served model name (router metrics, scale-from-zero wakes)")
    metrics: str = setting(
        "kv_cache_usage:0.7,requests_waiting:4",
        "comma-separated METRIC:TARGET per replica; the largest recommendation wins",
    )
    options: str = setting(
        "", "policy tunables as NAME=VALUE,... (e.g. stable_window_s=60,panic_threshold=2)"
    )
    min_replicas: int = setting(1, "fewest replicas (0 allows scale to zero)")
    max_replicas: int = setting(10, "most replicas")
    interval_s: float = setting(2.0, "seconds between control rounds")
    scrape_timeout_s: float = setting(1.0, "deadline of one engine's /metrics scrape")
    engine_port: int = setting(8000, "Kubernetes target: the engines' HTTP port on each pod")
    router_url: str = setting("", "the router to scrape for in-flight, arrivals and held requests")
    ttft_slo_s: float = setting(1.0, "time-to-first-token target (shoal policy, SLO figures)")
    tpot_slo_s: float = setting(0.1, "time-per-output-token target (shoal policy, SLO figures)")
    profile: str = setting(
        "", "engine step profile JSON (shoal sim calibrate) for the shoal policy's capacity"
    )
    engine_command: str = setting(
        "",
        "local target: the command that starts one engine; {port} is replaced by a free port",
    )
    discovery_file: str = setting(
        "", "local target: engine list written for the router's --discovery file"
    )
    engine_ready_timeout_s: float = setting(
        120.0, "local target: seconds an engine may take to start"
    )
    drain_s: float = setting(
        10.0, "local target: seconds a removed engine keeps serving its requests before SIGTERM"
    )
    engine_stop_grace_s: float = setting(
        25.0,
        "local target: seconds an engine has after SIGTERM before SIGKILL (vLLM unlinks its "
        "shared memory last)",
    )
    host: str = setting("127.0.0.1", "the controller's HTTP address (/metrics, /status, /v1/wake)")
    port: int = setting(8090, "the controller's HTTP port; 0 = none")
    auth_token_file: str = setting(
        "",
        "file holding the bearer token POST /v1/wake and GET /status require (needed to "
        "listen beyond loopback)",
    )
    insecure_no_auth: bool = setting(
        False,
        "listen beyond loopback without --auth-token-file (anyone who reaches the port may "
        "start engines)",
    )
    dry_run: bool = setting(False, "decide and log, never scale")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"need 0 <= --min-replicas <= --max-replicas, got {self.min_replicas} and "
                f"{self.max_replicas}"
            )
        if (
            self.port
            and not self.auth_token_file
            and not self.insecure_no_auth
            and not is_loopback(self.host)
        ):
            raise ConfigError(
                f"the autoscaler would listen on {self.host} beyond loopback without "
                "authentication (a wake starts engines): give --auth-token-file FILE, or "
                "--insecure-no-auth to accept that"
            )
        for name in (
            "interval_s",
            "scrape_timeout_s",
            "engine_ready_timeout_s",
            "engine_stop_grace_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")


def parse_metrics(text: str) -> tuple[MetricTarget, ...]:
    """``"kv_cache_usage:0.7,requests_waiting:4"`` as targets; an unknown metric name, a
    missing or non-positive target raises ``PolicyConfigError`` naming the known metrics."""
    targets: list[MetricTarget] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, raw = item.partition(":")
        name = name.strip()
        if name not in METRICS:
            raise PolicyConfigError(
                f"--metrics: unknown metric {name!r}; known: {', '.join(METRICS)}"
            )
        try:
            targets.append(MetricTarget(name, float(raw)))
        except ValueError:
            raise PolicyConfigError(
                f"--metrics: {item!r} needs METRIC:TARGET with a positive number"
            ) from None
    if not targets:
        raise PolicyConfigError(f"--metrics names no metric; known: {', '.join(METRICS)}")
    if len({t.metric for t in targets}) != len(targets):
        raise PolicyConfigError(f"--metrics names a metric twice: {text!r}")
    return tuple(targets)


def parse_options(text: str) -> dict[str, float | str]:
    """``"stable_window_s=60,mode=fast"`` as options: numbers where they parse, else text."""
    options: dict[str, float | str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise PolicyConfigError(f"--options: {item!r} needs NAME=VALUE")
        try:
            options[name.strip()] = float(raw)
        except ValueError:
            options[name.strip()] = raw.strip()
    return options


def policy_spec(settings: AutoscaleSettings) -> PolicySpec:
    """The ``PolicySpec`` the settings describe; the shoal policy also gets the SLOs and
    the profile as options (an explicit ``--options`` entry wins)."""
    options: dict[str, float | str] = {}
    if settings.policy == "shoal":
        options = {"ttft_slo_s": settings.ttft_slo_s, "tpot_slo_s": settings.tpot_slo_s}
        if settings.profile:
            options["profile"] = settings.profile
    options.update(parse_options(settings.options))
    return PolicySpec(
        targets=parse_metrics(settings.metrics),
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
        options=options,
    )


def read_token(path: str, flag: str = "--auth-token-file") -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); ``ConfigError`` when
    the file cannot be read or holds none."""
    return read_secret(path, flag)
