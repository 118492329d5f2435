"""An operator's evict over the cluster socket is a scan of every block: it runs in
bounded steps between requests, not inside the request's handling (review M3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache.cluster import messages as cm
from kvcache.cluster.security import read_operator_token
from tests.integration.test_cluster_node import FakePeer, Harness, dealer, key, peers

pytestmark = pytest.mark.integration

__all__ = ["peers"]  # the fixture, used by name


def test_an_operators_evict_scans_after_its_request_and_then_replies(
    peers: list[FakePeer], tmp_path: Path
) -> None:
    harness = Harness(peers, runtime_dir=str(tmp_path))
    sock = dealer(harness.address)
    try:
        harness.put(list(range(12)))
        token = read_operator_token(tmp_path)
        sock.send(cm.EvictRequest(1, "", "", token).encode())
        handled = False
        while not handled:  # only the request's handling: no idle step, no tick
            for ready, _ in harness.poller.poll(1000):
                if ready is harness.node._router:  # the operator socket only
                    harness.node.handle(ready)
                    handled = True
        assert harness.store.lookup([key(i) for i in range(12)]) == 12, "no scan in the handler"
        assert not sock.poll(0)
        assert harness.node.idle_step() is False  # one step covers 12 blocks: done
        assert sock.poll(2000)
        reply = cm.decode_reply(sock.recv())
        assert reply["ok"] and reply["evicted"] == 12, reply
        assert harness.store.lookup([key(0)]) == 0
    finally:
        sock.close(linger=0)
        harness.close()
