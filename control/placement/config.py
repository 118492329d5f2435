"""Settings of ``shoal placement run``: one frozen value, read through ``shoal.config``.

Flags (``--interval-s 30``), environment (``SHOAL_PLACEMENT_INTERVAL_S=30``) or the
``[placement]`` table of the TOML file named by ``--config``; file < environment < flags,
as every Shoal component. The README's reference table is generated from this class.

Lists: ``profile``, ``pool`` and ``pool_engine_command`` hold several entries. On the
command line each flag repeats (``--pool A100=memory --pool A10G=local``); in the
environment and the file the entries are separated by ``;`` (``pool = "A100=memory;
A10G=local"``). Counts per GPU type are ``TYPE=N,TYPE=N`` (``--min-replicas A10G=1``).

Pools, one per GPU type (``parse_pools``)::

    TYPE=memory                         replicas as numbers only (dry runs, tests)
    TYPE=local                          engine processes on this machine, started by
                                        --pool-engine-command TYPE="CMD ... --port {port}"
    TYPE=kubernetes:[NAMESPACE/]DEPLOYMENT   a Deployment's scale subresource
    TYPE=kubernetes:[NAMESPACE/]statefulset/NAME
    TYPE=ray:URL                        a fleet of Ray engine groups, ``shoal engines
                                        serve`` at URL (it publishes its own engines)

Invariant: a ``PlacementSettings`` that constructs is internally consistent (positive
intervals, a window the router answers (10-600 s), ``headroom >= 1``, ``slice_factor`` in
1-64, ``0 <= min_saving < 1``, a known backend, counts that parse,
every pool named once with a known kind, an engine command with ``{port}`` for every
local pool and none for another, no HTTP port beyond loopback without a token unless
``--insecure-no-auth``). Whether the profiles exist and name exactly the pools' types is
checked when they are read (``planner.build``).
"""

from __future__ import annotations

from dataclasses import dataclass

from control.placement.types import MAX_SLICE_FACTOR
from shoal.config import is_loopback, setting
from shoal.errors import ConfigError

__all__ = [
    "BACKENDS",
    "PlacementSettings",
    "PoolSpec",
    "parse_counts",
    "parse_pools",
    "split_list",
]

BACKENDS = ("highs", "greedy", "cbc")
# the router's request-size ring (router/sizes.py SLOT_S, MAX_WINDOW_S): it refuses other
# windows with a 400, which would leave every round without sizes
MIN_WINDOW_S = 10.0
MAX_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    model: str = setting("", "the served model whose request sizes are planned for (empty: all)")
    router_url: str = setting(
        "http://127.0.0.1:8080", "the router whose GET /v1/request_sizes feeds the plan"
    )
    router_token_file: str = setting(
        "", "file holding a bearer token (an API key) for the router's admin routes"
    )
    profile: str = setting(
        "", "GPU profile JSON files (AIBrix format), one per GPU type; repeat the flag"
    )
    pool: str = setting(
        "",
        "one pool per GPU type: TYPE=memory, TYPE=local, TYPE=kubernetes:[NS/]DEPLOYMENT or "
        "TYPE=ray:URL (a `shoal engines serve` fleet); repeat the flag",
    )
    ray_token_file: str = setting(
        "", "ray pools: file holding the engines daemons' bearer token, if they have one"
    )
    pool_engine_command: str = setting(
        "", "local pools: TYPE=COMMAND starting one engine, {port} replaced; repeat the flag"
    )
    discovery_file: str = setting(
        "",
        "local pools: the engine list (with each engine's gpu_type) for the router's "
        "--discovery-file",
    )
    engine_port: int = setting(8000, "kubernetes pools: the engines' HTTP port on each pod")
    interval_s: float = setting(30.0, "seconds between planning rounds")
    pool_interval_s: float = setting(
        2.0, "seconds between pool checks (ready engines published, dead ones replaced)"
    )
    window_s: float = setting(
        300.0, "seconds of request sizes each round plans for (10 to 600: what the router keeps)"
    )
    headroom: float = setting(
        1.1, "the window's request rate is multiplied by this before solving (>= 1)"
    )
    slice_factor: int = setting(
        4, "each cell's rate is split into this many assignable slices (1 to 64)"
    )
    backend: str = setting("highs", "solver: highs, greedy, or cbc (tests and benchmarks)")
    time_limit_s: float = setting(10.0, "the solver's time limit per round")
    min_replicas: str = setting("", "fewest replicas per GPU type: TYPE=N,... (absent: 0)")
    max_replicas: str = setting(
        "", "most replicas per GPU type (what the cloud has): TYPE=N,... (absent: unlimited)"
    )
    scale_down_delay_s: float = setting(
        300.0, "a smaller replica count takes effect once it held this long (scale-up: at once)"
    )
    min_saving: float = setting(
        0.05,
        "keep the current mix unless the new optimum is this much cheaper (a fraction) or "
        "the mix no longer serves",
    )
    fetch_timeout_s: float = setting(5.0, "deadline of one GET /v1/request_sizes")
    engine_ready_timeout_s: float = setting(
        120.0, "local pools: seconds an engine may take to start"
    )
    drain_s: float = setting(
        10.0, "local pools: seconds a removed engine keeps serving its requests before SIGTERM"
    )
    engine_stop_grace_s: float = setting(
        25.0, "local pools: seconds an engine has after SIGTERM before SIGKILL"
    )
    host: str = setting("127.0.0.1", "the planner's HTTP address (/v1/plan, /metrics, /status)")
    port: int = setting(8091, "the planner's HTTP port; 0 = none")
    auth_token_file: str = setting(
        "",
        "file holding the bearer token GET /v1/plan and /status require (needed to listen "
        "beyond loopback)",
    )
    insecure_no_auth: bool = setting(
        False, "listen beyond loopback without --auth-token-file (anyone may read the plan)"
    )
    dry_run: bool = setting(False, "plan and serve the plan, scale nothing")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")

    def __post_init__(self) -> None:
        for name in (
            "interval_s",
            "pool_interval_s",
            "window_s",
            "time_limit_s",
            "fetch_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        for name in ("engine_ready_timeout_s", "engine_stop_grace_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if not self.drain_s >= 0 or not self.scale_down_delay_s >= 0:
            raise ConfigError("--drain-s and --scale-down-delay-s must be >= 0")
        if not self.headroom >= 1:
            raise ConfigError(
                f"--headroom must be >= 1 (1.1 plans for 10% more), got {self.headroom}"
            )
        if not 0 <= self.min_saving < 1:
            raise ConfigError(f"--min-saving is a fraction in [0, 1), got {self.min_saving}")
        if not 1 <= self.slice_factor <= MAX_SLICE_FACTOR:
            raise ConfigError(
                f"--slice-factor must be between 1 and {MAX_SLICE_FACTOR}, got {self.slice_factor}"
            )
        if not MIN_WINDOW_S <= self.window_s <= MAX_WINDOW_S:
            raise ConfigError(
                f"--window-s must be between {MIN_WINDOW_S:g} and {MAX_WINDOW_S:g} seconds "
                f"(the router's GET /v1/request_sizes answers only those), got {self.window_s:g}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: use one of {', '.join(BACKENDS)}")
        parse_counts(self.min_replicas, "--min-replicas")
        parse_counts(self.max_replicas, "--max-replicas")
        parse_pools(self)
        if (
            self.port
            and not self.auth_token_file
            and not self.insecure_no_auth
            and not is_loopback(self.host)
        ):
            raise ConfigError(
                f"the planner would listen on {self.host} beyond loopback without "
                "authentication: give --auth-token-file FILE, or --insecure-no-auth to "
                "accept that"
            )


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One GPU type's pool as configured: ``kind`` memory, local, kubernetes or ray."""

    gpu: str
    kind: str
    engine_command: str = ""  # local
    namespace: str = ""  # kubernetes ("" = the pod's own, else default)
    workload_kind: str = "deployment"  # kubernetes: deployment or statefulset
    name: str = ""  # kubernetes: the workload's name; ray: the engines daemon's URL


def split_list(text: str) -> list[str]:
    """``"a;b ; c"`` (or the flags' repeated values joined by ``;``) as ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(";") if item.strip()]


def parse_counts(text: str, flag: str) -> dict[str, int]:
    """``"A100=1,A10G=0"`` as ``{"A100": 1, "A10G": 0}``; ``ConfigError`` naming ``flag``."""
    counts: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        gpu, sep, raw = item.partition("=")
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if not sep or not gpu.strip() or n < 0 or gpu.strip() in counts:
            raise ConfigError(f"{flag}: {item!r} needs TYPE=N with N >= 0, each type once")
        counts[gpu.strip()] = n
    return counts


def _pool(gpu: str, spec: str, command: str) -> PoolSpec:
    if spec in ("memory", "local"):
        return PoolSpec(gpu, spec, engine_command=command)
    kind, sep, target = spec.partition(":")
    if kind == "ray" and target.startswith(("http://", "https://")):
        return PoolSpec(gpu, "ray", name=target)
    if kind == "kubernetes" and sep and target:
        parts = target.split("/")
        if len(parts) == 1:
            return PoolSpec(gpu, "kubernetes", name=parts[0])
        if len(parts) == 2:
            return PoolSpec(gpu, "kubernetes", namespace=parts[0], name=parts[1])
        if len(parts) == 3 and parts[1] in ("deployment", "statefulset"):
            return PoolSpec(gpu, "kubernetes", namespace=parts[0], workload_kind=parts[1],
                            name=parts[2])  # fmt: skip
    raise ConfigError(
        f"--pool {gpu}={spec}: use TYPE=memory, TYPE=local, "
        "TYPE=kubernetes:[NAMESPACE/]DEPLOYMENT (or NAMESPACE/statefulset/NAME) or "
        "TYPE=ray:http://HOST:8093"
    )


def parse_pools(settings: PlacementSettings) -> tuple[PoolSpec, ...]:
    """The pools the settings name, checked (see the module docstring); empty when none."""
    commands: dict[str, str] = {}
    for item in split_list(settings.pool_engine_command):
        gpu, sep, command = item.partition("=")
        if not sep or not gpu.strip() or "{port}" not in command or gpu.strip() in commands:
            raise ConfigError(
                f"--pool-engine-command {item!r} needs TYPE=COMMAND with {{port}} in the "
                "command, each type once"
            )
        commands[gpu.strip()] = command.strip()
    pools: list[PoolSpec] = []
    for item in split_list(settings.pool):
        gpu, sep, spec = item.partition("=")
        gpu = gpu.strip()
        if not sep or not gpu:
            raise ConfigError(f"--pool {item!r} needs TYPE=KIND")
        if any(p.gpu == gpu for p in pools):
            raise ConfigError(f"--pool names {gpu} twice")
        pool = _pool(gpu, spec.strip(), commands.get(gpu, ""))
        if pool.kind == "local" and not pool.engine_command:
            raise ConfigError(
                f"--pool {gpu}=local needs --pool-engine-command {gpu}='CMD ... --port {{port}}'"
            )
        pools.append(pool)
    extra = set(commands) - {p.gpu for p in pools if p.kind == "local"}
    if extra:
        raise ConfigError(f"--pool-engine-command for {', '.join(sorted(extra))}: not a local pool")
    return tuple(pools)
