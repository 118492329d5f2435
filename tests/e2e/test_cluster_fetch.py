"""Two nodes of a cache cluster: an engine on node B loads what an engine on node A computed.

Two cache daemons form a cluster on loopback (``node0`` = A, ``node1`` = B; heartbeats every
0.2 s). Engine A (core 0) has Shoal's connector to daemon A only, engine B (core 1) to
daemon B only: nothing but the cluster links the two. A computes a 1,100-token prompt and
saves its four whole 256-token chunks in daemon A, whose block events reach B's cluster
index. When B gets the same prompt its connector finds the chunks on a peer
(``locate``), has daemon B fetch them from daemon A (``peer_fetch``, on by default), and
loads them: B's ``vllm:external_prefix_cache_hits_total`` rises by the four chunks, daemon
B counts four blocks fetched and daemon A four served, and B's top-5 logprobs are exactly
those A gives when it answers again from its own prefix cache (the equality argument of
``test_prefix_sharing``: the same 1,024 tokens loaded, the same 76 computed, one thread
each). A prompt no node holds fetches nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.engines import (
    BLOCK_SIZE,
    CHUNK,
    EXTERNAL_HITS,
    LOCAL_HITS,
    Engine,
    connector_config,
    random_prompt,
    running_engines,
    spawn_engine,
    stored_blocks,
    top_logprobs,
)
from tests.integration.conftest import (
    DaemonProcess,
    start_cluster,
    stop_all,
    wait_for_members,
    wait_until,
)

NUM_CHUNKS = 4  # whole chunks of a 1,100-token prompt


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-fetch")


@pytest.fixture(scope="module")
def nodes(workdir: Path) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    a, b = start_cluster(workdir, 2, shm_bytes="256MiB", dram_bytes="0", session_ttl_s=60)
    try:
        wait_for_members([a, b])
        yield a, b
    finally:
        stop_all([a, b])


@pytest.fixture(scope="module")
def engines(
    workdir: Path, nodes: tuple[DaemonProcess, DaemonProcess]
) -> Iterator[tuple[Engine, Engine]]:
    node_a, node_b = nodes
    a = spawn_engine(
        workdir,
        "engine-a",
        cpu=0,
        kv_transfer=connector_config(node_a.endpoint, chunk_tokens=CHUNK),
    )
    b = spawn_engine(
        workdir,
        "engine-b",
        cpu=1,
        kv_transfer=connector_config(node_b.endpoint, chunk_tokens=CHUNK),
    )
    with running_engines(a, b):
        yield a, b


def cluster(node: DaemonProcess) -> dict[str, Any]:
    with node.client(heartbeat=False) as client:
        return client.cluster_status()


def test_engine_b_loads_through_peer_fetch_what_engine_a_computed(
    engines: tuple[Engine, Engine], nodes: tuple[DaemonProcess, DaemonProcess]
) -> None:
    a, b = engines
    node_a, node_b = nodes
    prompt = random_prompt(11, 1100)
    stored_a = stored_blocks(node_a)
    indexed_b = cluster(node_b)["index_blocks"]
    from_a = a.complete(prompt, max_tokens=4, logprobs=5)
    # A saves its four whole chunks in daemon A; daemon B's index learns of them.
    assert wait_until(lambda: stored_blocks(node_a) >= stored_a + NUM_CHUNKS, timeout=30), (
        node_a.log()
    )
    assert wait_until(
        lambda: cluster(node_b)["index_blocks"] >= indexed_b + NUM_CHUNKS, timeout=10
    ), cluster(node_b)

    stored_b = stored_blocks(node_b)
    fetched_b = cluster(node_b)["fetched_blocks"]
    served_a = cluster(node_a)["served_blocks"]
    hits_before = b.metric(EXTERNAL_HITS)
    from_b = b.complete(prompt, max_tokens=4, logprobs=5)
    assert b.metric(EXTERNAL_HITS) - hits_before == NUM_CHUNKS * CHUNK
    # The chunks came over the cluster from node A, and now daemon B holds them too.
    assert cluster(node_b)["fetched_blocks"] - fetched_b == NUM_CHUNKS
    assert cluster(node_a)["served_blocks"] - served_a == NUM_CHUNKS
    assert stored_blocks(node_b) >= stored_b + NUM_CHUNKS

    local_hits_before = a.metric(LOCAL_HITS)
    from_a_warm = a.complete(prompt, max_tokens=4, logprobs=5)
    assert a.metric(LOCAL_HITS) - local_hits_before == 8 * BLOCK_SIZE  # its own GPU cache
    assert top_logprobs(from_b) == top_logprobs(from_a_warm)
    assert from_b["choices"][0]["text"] == from_a["choices"][0]["text"]


def test_a_prefix_no_node_holds_fetches_nothing(
    engines: tuple[Engine, Engine], nodes: tuple[DaemonProcess, DaemonProcess]
) -> None:
    _, b = engines
    _, node_b = nodes
    fetched_b = cluster(node_b)["fetched_blocks"]
    hits_before = b.metric(EXTERNAL_HITS)
    b.complete(random_prompt(12, 1100), max_tokens=1)
    assert b.metric(EXTERNAL_HITS) == hits_before
    assert cluster(node_b)["fetched_blocks"] == fetched_b
