"""The cluster part of the daemon's configuration, resolved: names, addresses, keys.

``CacheConfig`` holds what the operator typed (``cluster_*`` settings); ``ClusterSettings``
is what the member runs with: the discovery object built, the node name and advertised
address defaulted, the CurveZMQ keypair loadable. CurveZMQ uses one cluster keypair (made
by ``shoal cache keygen``, shipped as a Kubernetes Secret): every member is both server
(its PUB and ROUTER) and client (its SUB and DEALERs) with it, and the ZAP handler admits
only the public keys in the same directory, so a peer without the key is refused.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from kvcache.cluster.discovery import Discovery, StaticDiscovery, make_discovery
from kvcache.config import CacheConfig
from kvcache.errors import CacheError

__all__ = [
    "ClusterSettings",
    "bracket",
    "cluster_settings",
    "default_advertise",
    "load_curve",
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


def load_curve(directory: str) -> tuple[bytes, bytes]:
    """The cluster keypair from ``<dir>/cluster.key_secret`` (``shoal cache keygen``)."""
    import zmq.auth

    path = Path(directory) / "cluster.key_secret"
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise CacheError(
            f"cannot load the cluster CurveZMQ key {path}: {exc}; create it with "
            "`shoal cache keygen DIR`"
        ) from None
    if secret is None:
        raise CacheError(f"{path} holds no secret key; point cluster_curve_dir at the keypair")
    return public, secret
