"""Settings of ``shoal health watch``: one frozen value, read through ``shoal.config``.

Flags (``--interval-s 5``), environment (``SHOAL_HEALTH_INTERVAL_S=5``) or the ``[health]``
table of the TOML file named by ``--config``; file < environment < flags, as every Shoal
component. The README's reference table is generated from this class.

Invariant: a ``HealthSettings`` that constructs is internally consistent: positive
intervals, a non-negative GPU count, no listening beyond loopback without a token or an
explicit ``--insecure-no-auth`` (the rule of the autoscaler's endpoint), and
``--cordon-apply`` only with ``--cordon``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from control.health.types import default_node_name
from shoal.config import is_loopback, read_secret, setting
from shoal.errors import ConfigError

__all__ = ["HealthSettings", "kube_node_name", "node_name", "read_token"]


@dataclass(frozen=True, slots=True)
class HealthSettings:
    node: str = setting(
        "",
        "this node's name in GPU names NODE/gpuI; empty = the hostname as it is (full, as "
        "Ray reports it; must match the Ray node's shoal.node label where that is set)",
    )
    nvml_mock: str = setting(
        "", "read GPUs from this fake-backend TOML file instead of NVML (tests, game days)"
    )
    expect_gpus: int = setting(0, "GPUs this node should have (fewer is critical); 0 = any")
    interval_s: float = setting(5.0, "seconds between full checks (an XID event checks at once)")
    xid_wait_s: float = setting(
        1.0, "longest single wait for NVML's XID events (how fast the event thread stops)"
    )
    host: str = setting("127.0.0.1", "the watcher's HTTP address (/v1/gpus, /metrics, /healthz)")
    port: int = setting(8094, "the watcher's HTTP port")
    auth_token_file: str = setting(
        "",
        "file holding the bearer token GET /v1/gpus and POST /v1/clear require (needed to "
        "listen beyond loopback)",
    )
    insecure_no_auth: bool = setting(
        False, "listen beyond loopback without --auth-token-file (anyone may read and clear)"
    )
    cordon: bool = setting(
        False, "cordon the Kubernetes node when a GPU needs draining (dry run unless applied)"
    )
    cordon_apply: bool = setting(
        False, "really patch the node (spec.unschedulable); without it --cordon only logs"
    )
    cordon_after_checks: int = setting(
        3,
        "cordon only after the same GPU needed draining (or could not be read) in this many "
        "checks in a row",
    )
    state_file: str = setting(
        "",
        "keep the XID ledger in this JSON file, so a watcher restart does not forget critical "
        "XIDs (a host path; empty = in memory only)",
    )
    kube_node: str = setting("", "the Kubernetes node to cordon; empty = $NODE_NAME")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "text or json")

    def __post_init__(self) -> None:
        for name in ("interval_s", "xid_wait_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.expect_gpus < 0:
            raise ConfigError("--expect-gpus must be >= 0 (0 = any number)")
        if "/" in self.node:
            raise ConfigError(f"--node {self.node!r}: a node name has no '/'")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a TCP port")
        if not self.auth_token_file and not self.insecure_no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"the health watcher would listen on {self.host} beyond loopback without "
                "authentication (POST /v1/clear forgets XIDs): give --auth-token-file FILE, "
                "or --insecure-no-auth to accept that"
            )
        if self.cordon_after_checks < 1:
            raise ConfigError("--cordon-after-checks must be >= 1")
        if self.cordon_apply and not self.cordon:
            raise ConfigError("--cordon-apply needs --cordon")


def node_name(settings: HealthSettings) -> str:
    """``--node``, else ``default_node_name()``: ``socket.gethostname()`` as it is (full,
    never shortened), the Ray side's rule too (a node without a ``shoal.node`` label)."""
    return settings.node or default_node_name()


def kube_node_name(settings: HealthSettings, environ: dict[str, str] | None = None) -> str:
    """The node to cordon: ``--kube-node``, else ``$NODE_NAME`` (the downward API);
    ``ConfigError`` when ``--cordon`` has neither."""
    env = os.environ if environ is None else environ
    name = settings.kube_node or env.get("NODE_NAME", "")
    if not name:
        raise ConfigError(
            "--cordon needs the Kubernetes node name: --kube-node NAME, or NODE_NAME from "
            "the downward API (env: valueFrom: fieldRef: fieldPath: spec.nodeName)"
        )
    return name


def read_token(path: str, flag: str = "--auth-token-file") -> str:
    """The bearer token in ``path``; ``ConfigError`` when unreadable or empty."""
    return read_secret(path, flag)
