"""The cluster part of the daemon's configuration, resolved: names, addresses, keys.

``CacheConfig`` holds what the operator typed (``cluster_*`` settings); ``ClusterSettings``
is what the member runs with: the discovery object built, the node name and advertised
address defaulted, the key paths and the runtime dir (for the operator token) carried.
The keys and what they allow: ``security.py``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from kvcache.cluster.discovery import Discovery, StaticDiscovery, make_discovery
from kvcache.config import CacheConfig

__all__ = [
    "ClusterSettings",
    "bracket",
    "cluster_settings",
    "default_advertise",
    "node_name",
]


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    node: str
    host: str  # bind address
    port: int  # ROUTER port; PUB is port + 1
    advertise: str  # host:port that peers reach us on
    discovery: Discovery
    heartbeat_s: float = 1.0
    member_timeout_s: float = 3.0
    fetch_timeout_s: float = 0.5
    discovery_interval_s: float = 5.0
    curve_dir: str = ""
    drain_timeout_s: float = 60.0
    curve_key: str = ""  # own keypair; "" = <curve_dir>/node.key_secret (security.py)
    insecure: bool = False  # a non-loopback bind without CurveZMQ was asked for
    key_reload_s: float = 10.0
    runtime_dir: str = ""  # where the local operator token lives; "" = no token (tests)
    max_block_bytes: int = 64 << 20  # the largest block a fetch reply may carry


def cluster_settings(config: CacheConfig) -> ClusterSettings:
    """The cluster part of the daemon's configuration, with defaults filled in."""
    port = config.cluster_port
    if config.cluster_discovery == "static" and not config.cluster_peers.strip():
        discovery: Discovery = StaticDiscovery(())  # a cluster of one, for now
    else:
        discovery = make_discovery(
            config.cluster_discovery,
            peers=config.cluster_peers,
            dns_name=config.cluster_dns_name,
            k8s_service=config.cluster_k8s_service,
            k8s_namespace=config.cluster_k8s_namespace,
            port=port,
        )
    return ClusterSettings(
        node=node_name(config),
        host=config.cluster_host,
        port=port,
        advertise=config.cluster_advertise or default_advertise(config.cluster_host, port),
        discovery=discovery,
        heartbeat_s=config.cluster_heartbeat_s,
        member_timeout_s=config.cluster_member_timeout_s,
        fetch_timeout_s=config.cluster_fetch_timeout_s,
        curve_dir=config.cluster_curve_dir,
        curve_key=config.cluster_curve_key,
        insecure=config.cluster_insecure,
        key_reload_s=config.cluster_key_reload_s,
        runtime_dir=str(config.runtime_path),
        max_block_bytes=config.slab_bytes,
    )


def node_name(config: CacheConfig) -> str:
    """This daemon's member name: ``cluster_node``, or HOSTNAME:name."""
    return config.cluster_node or f"{socket.gethostname()}:{config.name}"


def default_advertise(host: str, port: int) -> str:
    if host not in ("", "0.0.0.0", "::"):
        return f"{bracket(host)}:{port}"
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = "127.0.0.1"
    return f"{address}:{port}"


def bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
