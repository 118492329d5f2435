"""Which health watchers to poll: fixed URLs, and ``dns+http://NAME:PORT`` names re-resolved.

::

    http://node-a:8094                 that watcher, as given
    dns+http://shoal-health.ns.svc:8094   every address NAME resolves to, now:
        -> http://10.0.0.7:8094, http://10.0.0.9:8094, http://[fd00::3]:8094
    dns+https://NAME:PORT              the same, polled over https

On Kubernetes the watchers are a DaemonSet behind a headless Service: one URL reaches one
random pod, but the Service's name resolves to every ready pod's address. ``current()``
resolves each name once per call (the pollers call it once per poll interval) through the
event loop's ``getaddrinfo`` (a worker thread: a slow DNS server never blocks the loop),
within ``timeout_s``. No URL -> node mapping is needed: each watcher's ``/v1/gpus`` names
its node (``NodeHealth.node``).

Invariant: ``current()`` is the fixed URLs in the order given, then each name's addresses
(sorted), without repeats; it never raises after construction. A name that cannot be
resolved this time (an error, a timeout, no records) keeps its last good addresses, so a
DNS blip changes nothing (logged once per streak, counted: ``num_failures``). An address
that leaves the answer is no longer polled; the pollers then forget its report as they
forget a watcher unreadable for three intervals (unknown is not sick), so a watcher pod
that goes away never keeps its GPUs out of service, and a DNS flap within three intervals
changes nothing.

Shared by the router (``router/gpu_health.py``, which already reads this package's wire
format) and the Ray fleet (``client.py``): one resolver, one set of tests. Pure apart from
the resolver, which is injected (``resolve``) in tests. Rejected: listing the Service's
EndpointSlices (RBAC for every client, and the API server on the health path; DNS is what
the headless Service is for); resolving once at start (a watcher pod replaced on a node
gets a new address).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["DNS_SCHEMES", "Resolve", "WatcherTargets", "check_watcher_url"]

log = logging.getLogger("shoal." + __name__)

DNS_SCHEMES = {"dns+http": "http", "dns+https": "https"}

Resolve = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``: what ``WatcherTargets`` calls (tests inject one)."""


async def getaddrinfo_addresses(host: str, port: int) -> list[str]:
    """Every IPv4/IPv6 address of ``host``, through the loop's resolver thread."""
    records = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(sockaddr[0]) for family, _t, _p, _c, sockaddr in records
            if family in (socket.AF_INET, socket.AF_INET6)]  # fmt: skip


def check_watcher_url(url: str, flag: str = "--gpu-health") -> str:
    """``url`` without a trailing slash; ``ValueError`` naming ``flag`` and the forms."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    forms = "http(s)://HOST:PORT or dns+http(s)://NAME:PORT"
    if parts.scheme not in ("http", "https", *DNS_SCHEMES) or not parts.hostname:
        raise ValueError(f"{flag} {url!r}: give {forms}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{flag} {url!r} has a malformed port") from None
    if parts.scheme in DNS_SCHEMES and (port is None or parts.path):
        raise ValueError(f"{flag} {url!r}: a dns+ URL is dns+http(s)://NAME:PORT (no path)")
    return url


def _address_url(scheme: str, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


@dataclass(slots=True)
class _Name:
    scheme: str  # what each address is polled with: http or https
    host: str
    port: int
    addresses: tuple[str, ...] = ()  # the last good answer
    failing: bool = False


class WatcherTargets:
    """The URLs to poll now, from ``--gpu-health``'s items (module docstring)."""

    def __init__(
        self, urls: Iterable[str], *, resolve: Resolve = getaddrinfo_addresses,
        timeout_s: float = 2.0,
    ) -> None:  # fmt: skip
        self._fixed: list[str] = []
        self._names: list[_Name] = []
        for raw in urls:
            if not raw.strip():
                continue
            url = check_watcher_url(raw)
            parts = urlsplit(url)
            if parts.scheme in DNS_SCHEMES:
                assert parts.hostname and parts.port, "check_watcher_url requires both"
                self._names.append(_Name(DNS_SCHEMES[parts.scheme], parts.hostname, parts.port))
            elif url not in self._fixed:
                self._fixed.append(url)
        self._resolve = resolve
        self.timeout_s = timeout_s
        self.num_resolutions = 0
        self.num_failures = 0

    @property
    def resolves(self) -> bool:
        """Whether any item is a ``dns+`` name (the set of URLs may change)."""
        return bool(self._names)

    def current_nowait(self) -> list[str]:
        """The URLs as of the last resolution (fixed ones only before the first)."""
        urls = dict.fromkeys(self._fixed)
        for name in self._names:
            urls.update(dict.fromkeys(_address_url(name.scheme, a, name.port)
                                      for a in name.addresses))  # fmt: skip
        return list(urls)

    async def current(self) -> list[str]:
        """Resolve every name (concurrently), then ``current_nowait()``."""
        if self._names:
            await asyncio.gather(*(self._refresh(name) for name in self._names))
        return self.current_nowait()

    async def _refresh(self, name: _Name) -> None:
        self.num_resolutions += 1
        try:
            found = await asyncio.wait_for(self._resolve(name.host, name.port), self.timeout_s)
        except (TimeoutError, OSError) as exc:  # socket.gaierror is an OSError
            self._failed(name, str(exc) or "timed out")
            return
        addresses = tuple(sorted(set(found)))
        if not addresses:
            self._failed(name, "no A/AAAA records")
            return
        if name.failing:
            log.info("health watchers: %s resolves again (%d address(es))",
                     name.host, len(addresses))  # fmt: skip
            name.failing = False
        if addresses != name.addresses:
            log.info("health watchers: %s -> %s", name.host, ", ".join(addresses))
        name.addresses = addresses

    def _failed(self, name: _Name, reason: str) -> None:
        self.num_failures += 1
        level = logging.DEBUG if name.failing else logging.WARNING
        log.log(level, "health watchers: cannot resolve %s (%s); polling its last %d "
                "address(es)", name.host, reason, len(name.addresses))  # fmt: skip
        name.failing = True
