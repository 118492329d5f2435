"""ShoalConnector inside vLLM's real scheduler, driven in the model runner's call order
(``tests/integration/vllm_engine.py``), against real daemon processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="the connector tests need vLLM (scripts/setup-vllm)")

from kvcache.connector.plan import ChunkGeometry, LoadJob, SaveJob, StepPlan
from kvcache.connector.scheduler import ConnectorScheduler
from kvcache.connector.settings import ConnectorSettings
from kvcache.connector.worker import ConnectorWorker
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    ENV,
    DaemonProcess,
    start_cluster,
    start_daemon,
    stop_all,
    wait_until,
)
from tests.integration.vllm_engine import Engine, EngineSpec, write_model_dir

ENGINE = Path(__file__).with_name("vllm_engine.py")
PROMPT = [(7 * i + 3) % 30000 for i in range(150)]


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    return str(write_model_dir(tmp_path / "model"))


def engine(model_dir: str, node: DaemonProcess, salt: int, **kwargs: object) -> Engine:
    return Engine(EngineSpec(model_dir=model_dir, endpoint=node.endpoint, salt=salt, **kwargs))  # type: ignore[arg-type]


def prefill(e: Engine, req_id: str, prompt: list[int], cache_salt: str | None = None) -> None:
    """Step until ``req_id`` has computed its whole prompt (and is still held); a request
    waiting for a lookup is skipped by the scheduler for a while, as in a real engine."""
    e.add(req_id, prompt, max_tokens=8, cache_salt=cache_salt)

    def done() -> bool:
        request = e.scheduler.requests.get(req_id)
        if request is not None and request.num_computed_tokens >= len(prompt):
            return True
        e.step()
        return False

    assert wait_until(done, timeout=10, interval=0.001), f"{req_id} did not finish its prefill"
    e.flush()  # saves are committed off the step; tests look at the daemon right after


def positions_matching(e: Engine, req_id: str, salt: int, n: int) -> list[int]:
    actual = e.kv_of(req_id, range(n))
    expected = e.expected(req_id, range(n), salt)
    return [p for p in range(n) if all(a[p] == x[p] for a, x in zip(actual, expected, strict=True))]


def chunk_keys(e: Engine, prompt: list[int]) -> list[bytes]:
    sched = e.scheduler.connector._scheduler
    return chain_keys(sched.namespaces[0], prompt, sched.geometry.chunk_tokens)


@pytest.mark.parametrize(
    ("layout", "chunk_tokens"), [("flash", 32), ("flashinfer", 16), ("hnd", 64)]
)
def test_a_second_engine_loads_the_prefix_bit_identical_to_what_the_first_saved(
    daemon: DaemonProcess, model_dir: str, layout: str, chunk_tokens: int
) -> None:
    first = engine(model_dir, daemon, salt=1, layout=layout, chunk_tokens=chunk_tokens)
    second = engine(model_dir, daemon, salt=2, layout=layout, chunk_tokens=chunk_tokens)
    try:
        prefill(first, "a", PROMPT)
        full = len(PROMPT) // chunk_tokens * chunk_tokens
        with daemon.client() as c:
            assert c.lookup(chunk_keys(first, PROMPT)) == len(PROMPT) // chunk_tokens

        prefill(second, "b", [*PROMPT, 11, 12, 13])
        assert second.loaded_steps == 1
        # The cached chunks came from the first engine, byte for byte; the rest is its own.
        assert positions_matching(second, "b", 1, full) == list(range(full))
        own = positions_matching(second, "b", 2, len(PROMPT) + 3)
        assert own == list(range(full, len(PROMPT) + 3))
        assert second.invalid_reported == set()
        first.run()
        second.run()
    finally:
        first.close()
        second.close()


def test_two_engine_processes_share_a_prefix(
    daemon: DaemonProcess, model_dir: str, tmp_path: Path
) -> None:
    def run(salt: int, req: str, prompt: list[int], check: int | None) -> dict:
        spec = {
            "engine": {"model_dir": model_dir, "endpoint": daemon.endpoint, "salt": salt},
            "requests": [{"id": req, "prompt": prompt, "max_tokens": 2}],
            "check_salt": {req: check} if check else {},
        }
        path = tmp_path / f"spec-{salt}.json"
        path.write_text(json.dumps(spec))
        done = subprocess.run(
            [sys.executable, str(ENGINE), str(path)],
            env=ENV, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    saver = run(1, "a", PROMPT, None)
    assert saver["worker_stats"]["saved_chunks"] == len(PROMPT) // 32
    loader = run(2, "b", [*PROMPT, 1, 2], check=1)
    report = loader["requests"]["b"]
    assert report["loaded_match"] == list(range(128))
    assert report["own_match"] == list(range(128, len(PROMPT) + 2))
    assert loader["worker_stats"]["loaded_chunks"] == 4
    assert loader["invalid_reported"] == []


def test_a_corrupted_chunk_is_a_load_error_that_vllm_recomputes(
    daemon: DaemonProcess, model_dir: str
) -> None:
    first = engine(model_dir, daemon, salt=1)
    second = engine(model_dir, daemon, salt=2)
    try:
        prefill(first, "a", PROMPT)
        keys = chunk_keys(first, PROMPT)
        with daemon.client() as c:  # flip one byte of chunk 2 in shared memory
            view = c.get([keys[2]], prefix=False)[0]
            assert view is not None
            c.arena_memory()[view.offset + 100] ^= 0xFF
            c.release([view])

        prefill(second, "b", [*PROMPT, 9])
        # Chunk 2 failed its checksum: its blocks (and chunk 3's, past the hole) were
        # reported, vLLM recomputed them with the second engine's own values.
        assert len(second.invalid_reported) == 4  # 2 chunks of 2 blocks
        assert positions_matching(second, "b", 1, 64) == list(range(64))
        assert positions_matching(second, "b", 2, len(PROMPT)) == list(range(64, len(PROMPT)))
        stats = second.worker._worker.stats
        assert stats["corrupt_chunks"] == 1
        # The corrupt chunk was deleted and saved again from the recomputed KV.
        second.run()
        second.flush()
        with daemon.client() as c:
            assert c.lookup(keys) == 4
            blocks = c.get(keys)
            assert all(b is not None and b.verify() for b in blocks)
            c.release([b for b in blocks if b is not None])
    finally:
        first.close()
        second.close()


def test_a_killed_daemon_degrades_to_misses(tmp_path: Path, model_dir: str) -> None:
    node = start_daemon(tmp_path)
    first = engine(model_dir, node, salt=1, extra={"io_timeout_s": 0.5, "lookup_timeout_s": 0.3})
    try:
        prefill(first, "a", PROMPT)
        node.process.kill()
        node.process.wait()
        # The same prompt again: the lookup fails into a miss, the saves are skipped, and
        # every token is computed by the engine itself. No call raises.
        prefill(first, "b", [5, *PROMPT])
        assert positions_matching(first, "b", 1, len(PROMPT) + 1) == list(range(len(PROMPT) + 1))
        first.run()
        assert first.scheduler.connector._scheduler.lookups.failures >= 1
    finally:
        first.close()
        node.config.arena_path.unlink(missing_ok=True)


def test_a_slow_lookup_defers_the_request_instead_of_blocking_the_scheduler(
    daemon: DaemonProcess, model_dir: str
) -> None:
    first = engine(model_dir, daemon, salt=1)
    second = engine(model_dir, daemon, salt=2, extra={"lookup_wait_ms": 0})
    try:
        prefill(first, "a", PROMPT)
        # With no inline wait the first answer is "not yet": vLLM schedules nothing for
        # the request that step, asks again, and then gets the hit.
        second.add("b", [*PROMPT, 1], max_tokens=2)
        out = second.step()
        assert "b" not in out.num_scheduled_tokens
        assert wait_until(lambda: second.step().num_scheduled_tokens.get("b"), timeout=5)
        assert second.scheduler.connector._scheduler.stats["deferred"] >= 1
        assert second.loaded_steps == 1
        assert positions_matching(second, "b", 1, 128) == list(range(128))
    finally:
        first.close()
        second.close()


def test_a_prefix_cached_on_a_peer_is_fetched_then_loaded(tmp_path: Path, model_dir: str) -> None:
    nodes = start_cluster(tmp_path, 2)
    first = engine(model_dir, nodes[0], salt=1)
    second = engine(model_dir, nodes[1], salt=2)
    try:
        prefill(first, "a", PROMPT)
        keys = chunk_keys(first, PROMPT)
        with nodes[1].client() as c:
            assert wait_until(lambda: c.locate(keys).remote_length == 4)
        prefill(second, "b", [*PROMPT, 1])
        assert positions_matching(second, "b", 1, 128) == list(range(128))
        with nodes[1].client() as c:
            assert c.lookup(keys) == 4  # now local to node 1 as well
    finally:
        first.close()
        second.close()
        stop_all(nodes)


class _Req:
    def __init__(self, req_id: str, tokens: list[int]) -> None:
        self.request_id = req_id
        self.all_token_ids = tokens
        self.prompt_token_ids = tokens
        self.num_tokens = len(tokens)
        self.num_computed_tokens = 0
        self.kv_transfer_params = None


def test_tensor_parallel_ranks_keep_their_own_shards_and_a_hit_needs_every_rank(
    daemon: DaemonProcess,
) -> None:
    geometry = ChunkGeometry(block_size=16, chunk_tokens=32)
    # A generous inline wait: one lookup answered in this step, whatever the machine's load.
    settings = ConnectorSettings(endpoint=daemon.endpoint, lookup_wait_ms=5000)
    namespaces = [Namespace("m", tp_rank=r, tp_size=2) for r in range(2)]
    scheduler = ConnectorScheduler(settings, geometry, [ns.digest for ns in namespaces])
    workers = [
        ConnectorWorker(settings, geometry, rank, namespaces[rank].label()) for rank in range(2)
    ]
    # Each rank's shard differs (rank r holds values + 1000 r).
    caches = [
        torch.arange(2 * 32 * 16 * 2 * 8, dtype=torch.float32).view(2, 32, 16, 2, 8) + 1000 * r
        for r in range(2)
    ]
    try:
        for rank, worker in enumerate(workers):
            worker.register({"layer.0": caches[rank]}, num_blocks=32)
        tokens = list(range(64))
        keys = tuple(tuple(chain_keys(ns, tokens, 32)) for ns in namespaces)
        # Both ranks save chunk 0 (blocks 4, 5); only rank 0 saves chunk 1 (blocks 6, 7).
        for rank, worker in enumerate(workers):
            chunks = 2 if rank == 0 else 1
            rank_keys = (keys[0][:chunks], keys[1][:chunks])
            block_ids = ((4, 5), (6, 7))[:chunks]
            worker.bind(StepPlan(saves=[SaveJob("r", 0, rank_keys, (None, None), block_ids)]))
            worker.save_layer("layer.0")
            worker.finish()
            worker.flush()
            worker.unbind()
        # A hit needs every rank: one chunk.
        assert scheduler.matched_tokens(_Req("r", [*tokens, 1]), 0) == (32, False)
        # Loading chunk 0 into blocks 20, 21 gives each rank its own shard back.
        for rank, worker in enumerate(workers):
            worker.bind(StepPlan(loads=[LoadJob("r", 0, (keys[0][:1], keys[1][:1]), ((20, 21),))]))
            worker.start_loads()
            worker.wait_layer("layer.0")
            worker.finish()
            assert worker.take_load_errors() == set()
            assert torch.equal(caches[rank][:, 20:22], caches[rank][:, 4:6])
            assert (
                caches[rank][0, 20, 0, 0, 0].item() == caches[0][0, 4, 0, 0, 0].item() + 1000 * rank
            )
        with daemon.client() as c:
            assert c.lookup(keys[0]) == 2 and c.lookup(keys[1]) == 1
            assert c.lookup(chain_keys(Namespace("m"), tokens, 32)) == 0  # another namespace
    finally:
        scheduler.close()
        for worker in workers:
            worker.close()


def test_connector_counters_reach_prometheus_through_vllms_stats_route(
    daemon: DaemonProcess, model_dir: str
) -> None:
    """M10: worker and scheduler counters travel in vLLM's KVConnectorOutput/SchedulerStats
    and the API server's KVConnectorProm turns them into shoal_connector_* samples in the
    default registry that vLLM's /metrics serves."""
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

    first = engine(model_dir, daemon, salt=1)
    second = engine(model_dir, daemon, salt=2)
    try:
        prefill(first, "a", PROMPT)
        prefill(second, "b", [*PROMPT, 1])
        first.run()
        second.run()
        first.flush()
        second.step()  # stats are reported with the step after the commit
        first.step()
        prom = KVConnectorProm(
            first.config, ["model_name", "engine"], {0: ["m", "0"], 1: ["m", "1"]}
        )
        for index, e in enumerate((first, second)):
            for data in e.connector_stats:
                prom.observe(data, index)

        def sample(name: str, engine: str, **labels: str) -> float | None:
            return REGISTRY.get_sample_value(
                f"shoal_connector_{name}", {"model_name": "m", "engine": engine, **labels}
            )

        chunk_bytes = first.worker._worker.chunk_bytes  # type: ignore[union-attr]
        assert sample("saved_chunks_total", "0") == 4
        assert sample("saved_bytes_total", "0") == 4 * chunk_bytes
        assert (sample("save_seconds_total", "0") or 0) > 0
        assert (sample("lookups_total", "1") or 0) >= 1
        assert sample("hit_tokens_total", "1") == 128
        assert sample("loaded_chunks_total", "1") == 4
        assert sample("loaded_bytes_total", "1") == 4 * chunk_bytes
        assert (sample("load_seconds_total", "1") or 0) > 0
        assert sample("failures_total", "1", reason="corrupt_chunk") is None  # none happened
    finally:
        first.close()
        second.close()


def test_connector_logs_go_through_vllms_handlers(daemon: DaemonProcess, model_dir: str) -> None:
    """vLLM configures only its own logger; the connector's records must reach its handlers
    (as in a vLLM server process: the vllm logger has a handler, the root logger none)."""
    import logging

    from kvcache.connector.vllm import _ToVllmHandlers

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    vllm_logger, root = logging.getLogger("vllm"), logging.getLogger()
    ours = [logging.getLogger(name) for name in ("shoal", "kvcache")]
    saved = (vllm_logger.level, root.handlers[:], [(lg.level, lg.handlers[:]) for lg in ours])
    for lg in ours:  # as in a fresh process
        lg.handlers = [h for h in lg.handlers if not isinstance(h, _ToVllmHandlers)]
        lg.setLevel(logging.NOTSET)
    vllm_logger.addHandler(capture := Capture(logging.DEBUG))
    vllm_logger.setLevel(logging.INFO)
    root.handlers = []
    e = None
    try:
        e = engine(model_dir, daemon, salt=1)
        messages = [r.getMessage() for r in records if r.name.startswith("shoal.")]
        assert any(m.startswith("ShoalConnector WORKER") for m in messages), messages
        assert any(m.startswith("KV layout of 4 layers") for m in messages), messages
        # vLLM's level applies: at WARNING the connector's INFO lines are dropped.
        vllm_logger.setLevel(logging.WARNING)
        records.clear()
        logging.getLogger("shoal.kvcache.connector").info("hidden")
        logging.getLogger("shoal.kvcache.connector").warning("shown")
        assert [r.getMessage() for r in records] == ["shown"]
    finally:
        root.handlers = saved[1]
        vllm_logger.removeHandler(capture)
        vllm_logger.setLevel(saved[0])
        for lg, (level, handlers) in zip(ours, saved[2], strict=True):
            lg.setLevel(level)
            lg.handlers = handlers
        if e is not None:
            e.close()


def test_pipeline_stages_get_their_own_namespaces_and_the_model_is_not_a_branch(
    model_dir: str,
) -> None:
    from kvcache.connector.vllm import engine_namespaces
    from tests.integration.vllm_engine import vllm_config

    config = vllm_config(EngineSpec(model_dir=model_dir, endpoint="ipc:///nonexistent"))
    settings = ConnectorSettings(chunk_tokens=32)
    (single,) = engine_namespaces(config, None, settings)
    config.parallel_config.pipeline_parallel_size = 2
    stage0, stage1 = engine_namespaces(config, None, settings)
    assert (stage0.pp_rank, stage1.pp_rank) == (0, 1)
    assert len({single.digest, stage0.digest, stage1.digest}) == 3
    # m9: a local model directory is named by its weights, never by a moving "@main".
    assert "@weights-" in single.model and not single.model.endswith("@main")


def test_a_cache_salt_isolates_tenants_across_engines(
    daemon: DaemonProcess, model_dir: str
) -> None:
    """C3 end to end: vLLM's per-tenant cache_salt also isolates the shared cache; the same
    tenant still shares across engines."""
    first = engine(model_dir, daemon, salt=1)
    second = engine(model_dir, daemon, salt=2)
    try:
        prefill(first, "a", PROMPT, cache_salt="tenant-a")
        prefill(second, "b", [*PROMPT, 1], cache_salt="tenant-b")
        assert second.loaded_steps == 0  # another tenant's prefix: computed, not loaded
        assert positions_matching(second, "b", 2, len(PROMPT)) == list(range(len(PROMPT)))
        prefill(second, "c", [*PROMPT, 2], cache_salt="tenant-a")
        assert second.loaded_steps == 1
        assert positions_matching(second, "c", 1, 128) == list(range(128))
    finally:
        first.close()
        second.close()
