"""Settings of ``shoal lora serve``: one frozen value, read through ``shoal.config``.

Flags (``--interval-s 5``), environment (``SHOAL_LORA_INTERVAL_S=5``) or the ``[lora]``
table of the TOML file named by ``--config``; file < environment < flags, as every Shoal
component.

Invariant: a ``LoraSettings`` that constructs is internally consistent (positive
intervals and rates, ``0 <= hysteresis < 1``, a budget >= 0, authentication beyond
loopback); the discovery source is checked where it is built
(``router.discovery.make_discovery``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shoal.config import is_loopback, read_secret, setting
from shoal.errors import ConfigError

__all__ = ["LoraSettings", "read_token"]


@dataclass(frozen=True, slots=True)
class LoraSettings:
    discovery: str = setting("static", "where engines come from: static, dns, k8s or file "
                             "(the router's discovery)")  # fmt: skip
    engines: str = setting("", "engine URLs (static), names (dns) or SERVICE (k8s)")
    discovery_file: str = setting("", "file discovery: the JSON or YAML engine list")
    discovery_interval_s: float = setting(5.0, "seconds between discovery reads")
    router_url: str = setting(
        "", "the router whose shoal_router_arrivals_total{model} gives adapters' traffic"
    )
    adapter_dir: str = setting(
        "~/.cache/shoal/lora",
        "where remote adapters are fetched; engines read them there (same node or a shared volume)",
    )
    state_file: str = setting(
        "", "the registry's JSON state file; empty = <adapter-dir>/registry.json"
    )
    interval_s: float = setting(5.0, "seconds between placement rounds")
    idle_unload_s: float = setting(
        600.0, "an adapter without traffic for this long is unloaded everywhere"
    )
    budget: int = setting(
        0,
        "adapters one engine may hold; 0 = the engine's --max-loras (vllm:lora_requests_info"
        " max_lora), or 1 when it does not say; set it to --max-cpu-loras to use the CPU "
        "LoRA cache",
    )
    replica_rate: float = setting(
        10.0, "requests/s one engine's copy of an adapter takes before it gets another copy"
    )
    hysteresis: float = setting(
        0.2,
        "a copy stays until the rate is this fraction below what would add it, and an "
        "adapter keeps its slot until a challenger's rate is 1/(1 - this) times its own",
    )
    balance: float = setting(
        0.5,
        "once engines near --replica-rate, one copy of an adapter carries at most this share "
        "of an engine's fair share of adapter traffic (hot adapters get copies); 0 = off",
    )
    rate_window_s: float = setting(
        60.0,
        "adapters' rates are averaged over this long (a sliding window of the router's "
        "counters; shorter than --interval-s means one round)",
    )
    max_concurrency: int = setting(8, "loads and unloads in flight at once")
    engine_timeout_s: float = setting(30.0, "deadline of one load or unload")
    poll_timeout_s: float = setting(2.0, "deadline of one engine's /v1/models")
    retry_base_s: float = setting(2.0, "first delay before retrying a failed load")
    retry_max_s: float = setting(60.0, "longest delay between retries of a failed load")
    host: str = setting("127.0.0.1", "the manager's HTTP address")
    port: int = setting(8092, "the manager's HTTP port")
    auth_token_file: str = setting(
        "",
        "file holding the bearer token every route but /metrics requires (needed to listen "
        "beyond loopback)",
    )
    insecure_no_auth: bool = setting(
        False, "listen beyond loopback without --auth-token-file (anyone may load adapters)"
    )
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")

    def __post_init__(self) -> None:
        if not self.auth_token_file and not self.insecure_no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"the LoRA manager would listen on {self.host} beyond loopback without "
                "authentication (its API loads adapters into engines): give "
                "--auth-token-file FILE, or --insecure-no-auth to accept that"
            )
        for name in ("interval_s", "idle_unload_s", "replica_rate", "rate_window_s",
                     "engine_timeout_s",
                     "poll_timeout_s", "retry_base_s", "retry_max_s",
                     "discovery_interval_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if not self.balance >= 0:
            raise ConfigError(f"--balance must be >= 0 (0 = off), got {self.balance}")
        if not 0 <= self.hysteresis < 1:
            raise ConfigError(f"--hysteresis must be in [0, 1), got {self.hysteresis}")
        if self.budget < 0:
            raise ConfigError(f"--budget must be >= 0, got {self.budget}")
        if self.max_concurrency < 1:
            raise ConfigError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")

    @property
    def adapter_path(self) -> Path:
        return Path(self.adapter_dir).expanduser().resolve()

    @property
    def state_path(self) -> Path:
        if self.state_file:
            return Path(self.state_file).expanduser().resolve()
        return self.adapter_path / "registry.json"


def read_token(path: str, flag: str = "--auth-token-file") -> str:
    return read_secret(path, flag)
