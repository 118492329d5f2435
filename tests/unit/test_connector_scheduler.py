"""The scheduler side with a dead daemon: it never adds a wait of its own to the client's."""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

from kvcache.connector.plan import ChunkGeometry
from kvcache.connector.scheduler import ConnectorScheduler, LookupService
from kvcache.connector.settings import ConnectorSettings
from kvcache.errors import CacheUnavailable
from kvcache.keys import Namespace


class _DeadDaemonClient:
    """A client that knows its daemon is dead and says so at once (the fail-fast client)."""

    def lookup(self, keys: Sequence[bytes]) -> int:
        raise CacheUnavailable("the cache daemon is gone")

    locate = lookup

    def close(self) -> None:
        pass


def _request(req_id: str) -> SimpleNamespace:
    tokens = list(range(100))
    return SimpleNamespace(
        request_id=req_id, all_token_ids=tokens, prompt_token_ids=tokens, num_tokens=100,
        num_computed_tokens=0, kv_transfer_params=None,
    )  # fmt: skip


def test_a_daemon_known_dead_costs_no_wait_beyond_the_clients_own() -> None:
    settings = ConnectorSettings(lookup_wait_ms=2000, retry_after_s=60)
    lookups = LookupService(settings, _DeadDaemonClient)  # type: ignore[arg-type]
    scheduler = ConnectorScheduler(
        settings, ChunkGeometry(16, 32), [Namespace("m").digest], lookups
    )
    try:
        start = time.monotonic()
        # The failure comes back within the step's inline wait: a miss, not "not yet".
        assert scheduler.matched_tokens(_request("a"), 0) == (0, False)
        # While the daemon is down, lookups answer misses without asking or waiting.
        for i in range(20):
            assert scheduler.matched_tokens(_request(f"b{i}"), 0) == (0, False)
        assert time.monotonic() - start < 1.0  # far below one 2 s inline wait
        assert lookups.failures == 1
        assert scheduler.stats["deferred"] == 0
    finally:
        scheduler.close()
