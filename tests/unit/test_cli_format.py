"""What ``shoal cache status|stats|lookup`` print, from the maps the daemon answers with."""

from __future__ import annotations

from typing import Any

from kvcache.cli import ago, hit_ratio, lookup_lines, status_lines, table

EPOCH = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def local_stats(**overrides: Any) -> dict[str, Any]:
    tier = {"num_blocks": 0, "used_bytes": 0, "fragmentation": 0.0, "hits": 0, "evictions": 0}
    stats: dict[str, Any] = {
        "name": "default", "pid": 42, "num_sessions": 1, "num_leases": 0,
        "num_reservations": 0, "misses": 0, "no_space": 0, "checksum_failures": 0,
        "tiers": [tier | {"tier": "shm", "capacity_bytes": 1 << 30},
                  tier | {"tier": "dram", "capacity_bytes": 4 << 30}],
    }  # fmt: skip
    return stats | overrides


def member(node: str, **overrides: Any) -> dict[str, Any]:
    beat = {
        "tiers": [{"tier": "shm", "blocks": 3, "used": 3 << 20, "capacity": 1 << 30, "hits": 3}],
        "misses": 1,
        "sessions": 2,
    }
    return {
        "node": node, "address": f"10.0.0.{node[-1]}:7400", "epoch": EPOCH, "applied_seq": 5,
        "published_seq": 7, "state": "active", "stream": "in_sync", "last_heard_s": 0.25,
        "num_blocks": 3, "num_syncs": 0, "stats": beat,
    } | overrides  # fmt: skip


def cluster(*members: dict[str, Any]) -> dict[str, Any]:
    return {
        "enabled": True, "node": "node0", "address": "10.0.0.0:7400", "epoch": EPOCH, "seq": 9,
        "state": "active", "index_blocks": 3, "gaps": 1, "members": list(members),
    }  # fmt: skip


def test_table_pads_columns_to_their_widest_cell_and_aligns_as_told() -> None:
    assert table(["NODE", "N"], [["a", "10"], ["long-name", "2"]], "<>") == [
        "NODE        N",
        "a          10",
        "long-name   2",
    ]


def test_ago_is_short_at_every_scale() -> None:
    assert [ago(s) for s in (0.25, 42, 185, 7300)] == ["0.2s", "42s", "3m05s", "2h01m"]


def test_hit_ratio_counts_hits_in_every_tier_against_misses() -> None:
    two_tiers = {"tiers": [{"hits": 3}, {"hits": 1}], "misses": 4}
    assert hit_ratio(two_tiers) == "50.0%"
    assert hit_ratio({"tiers": [{"hits": 0}], "misses": 0}) == "-", "no traffic, no ratio"


def test_status_puts_this_node_first_then_each_member_with_lag_and_hit_ratio() -> None:
    lines = status_lines(cluster(member("node1")), local_stats())
    assert lines[0] == (
        "node node0 at 10.0.0.0:7400: active, epoch 1700000000000000000 "
        "(started 2023-11-14T22:13:20Z), seq 9"
    )
    assert lines[1] == "1 peer; 3 peer blocks indexed, 1 stream gap so far"
    header, own, peer = (line.split() for line in lines[3:6])
    assert header == ["NODE", "ADDRESS", "STATE", "EPOCH", "(START)", "BLOCKS", "SHM", "USED/CAP",
                      "DRAM", "USED/CAP", "HIT", "RATIO", "LAG", "HEARD", "STREAM"]  # fmt: skip
    assert own == ["node0", "10.0.0.0:7400", "active", "2023-11-14T22:13:20Z", "0",
                   "0B/1.0GiB", "0B/4.0GiB", "-", "-", "-", "self"]  # fmt: skip
    assert peer == ["node1", "10.0.0.1:7400", "active", "2023-11-14T22:13:20Z", "3",
                    "3.0MiB/1.0GiB", "-", "75.0%", "2", "0.2s", "in_sync"]  # fmt: skip
    assert lines[7].startswith("daemon default (pid 42)")


def test_a_member_not_yet_heard_from_shows_dashes_not_zeros() -> None:
    silent = member("node2", stats={}, state="unknown", stream="awaiting_sync")
    row = status_lines(cluster(silent), local_stats())[5].split()
    assert row[0] == "node2" and row[5:8] == ["-", "-", "-"] and row[-1] == "awaiting_sync"


def test_status_without_a_cluster_says_so_and_still_shows_the_local_tiers() -> None:
    lines = status_lines({"enabled": False, "members": []}, local_stats())
    assert lines[0].startswith("cluster: disabled")
    assert lines[3].split()[0] == "TIER"


def test_lookup_lists_holders_longest_run_first() -> None:
    result = {
        "namespace": "m/bfloat16/default/tp0of1", "num_tokens": 130, "chunk_tokens": 16,
        "num_blocks": 8, "local_blocks": 2, "remote_blocks": 8,
        "holders": [{"node": "node1", "address": "10.0.0.1:7400", "upto": 8},
                    {"node": "node2", "address": "10.0.0.2:7400", "upto": 5}],
    }  # fmt: skip
    assert lookup_lines(result) == [
        "namespace m/bfloat16/default/tp0of1: 130 tokens, 8 blocks of 16 tokens",
        "cached here:      2 leading blocks",
        "with peers' help: 8 leading blocks",
        "",
        "HOLDER  ADDRESS        UPTO",
        "node1   10.0.0.1:7400     8",
        "node2   10.0.0.2:7400     5",
    ]


def engine(**overrides: Any) -> dict[str, Any]:
    return {
        "engine": "gpu0", "stream": "node0/gpu0", "endpoint": "tcp://127.0.0.1:5557",
        "replay_endpoint": "tcp://127.0.0.1:5558", "connected": True, "seq": 41,
        "replaying": False, "gpu_blocks": 12, "gpu_keys": 3, "gaps": 1, "replays": 1,
        "skipped": {}, "dropped": 0, "resets": 2,
    } | overrides  # fmt: skip


def test_status_lists_the_engines_beside_this_node_before_the_local_tiers() -> None:
    engines = [engine(), engine(engine="gpu1", stream="node0/gpu1", connected=False, seq=-1)]
    lines = status_lines(cluster(member("node1")) | {"engines": engines}, local_stats())
    start = lines.index(next(line for line in lines if line.startswith("ENGINE")))
    assert lines[start].split() == ["ENGINE", "EVENTS", "FROM", "CONNECTED", "SEQ", "GPU",
                                    "KEYS", "GAPS", "RESETS", "DROPPED"]  # fmt: skip
    assert lines[start + 1].split() == ["node0/gpu0", "tcp://127.0.0.1:5557", "yes", "41", "3",
                                        "1", "2", "0"]  # fmt: skip
    assert lines[start + 2].split()[2:4] == ["no", "-"], "nothing heard yet"
    assert lines[start + 4].startswith("daemon default")


def test_status_without_a_cluster_still_shows_the_engines() -> None:
    lines = status_lines({"enabled": False, "members": [], "engines": [engine()]}, local_stats())
    assert lines[2].startswith("ENGINE") and lines[3].startswith("node0/gpu0")


def test_lookup_lists_engines_holding_the_prefix_on_their_gpu() -> None:
    result = {
        "namespace": "m/bfloat16/default/tp0of1", "num_tokens": 64, "chunk_tokens": 16,
        "num_blocks": 4, "local_blocks": 0, "remote_blocks": 0, "holders": [],
        "gpu": [{"engine": "node1/gpu0", "upto": 4}, {"engine": "node0/gpu1", "upto": 1}],
    }  # fmt: skip
    assert lookup_lines(result)[3:] == [
        "",
        "ON ENGINE GPU  UPTO",
        "node1/gpu0        4",
        "node0/gpu1        1",
    ]
