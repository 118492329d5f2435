"""``shoal cache`` ops verbs as an operator runs them: real processes against real daemons."""

from __future__ import annotations

import importlib.util
import json
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvcache.cluster.admin import ClusterAdmin
from kvcache.errors import CacheUnavailable
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import (
    ENV,
    DaemonProcess,
    cluster_ports,
    free_port,
    start_cluster,
    start_daemon,
    stop_all,
    wait_for_members,
    wait_until,
)

pytestmark = pytest.mark.integration

BLOCK = 16 << 10
TOKENS = list(range(16 * 8))  # eight blocks of 16 tokens


def start_joined(
    tmp_path: Path, count: int, prefix: str, member_timeout_s: float = 1.0
) -> list[DaemonProcess]:
    nodes = start_cluster(tmp_path, count, prefix=prefix, cluster_member_timeout_s=member_timeout_s)
    wait_for_members(nodes)
    return nodes


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DaemonProcess]]:
    nodes = start_joined(tmp_path_factory.mktemp("trio"), 3, "cli")
    yield nodes
    stop_all(nodes)


def shoal(
    node: DaemonProcess | None, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``python -m shoal cache ARGS`` aimed at ``node``'s daemon."""
    target = (
        []
        if node is None
        else ["--name", node.config.name, "--runtime-dir", node.config.runtime_dir]
    )
    return subprocess.run(
        [sys.executable, "-m", "shoal", "cache", *args, *target],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def put_chain(node: DaemonProcess, namespace: Namespace) -> list[bytes]:
    keys = chain_keys(namespace, TOKENS, 16)
    with node.client(namespace=namespace.label(), heartbeat=False) as writer:
        assert writer.put(keys, [np.full(BLOCK, i, np.uint8) for i in range(len(keys))]).complete
    return list(keys)


def seen_by(node: DaemonProcess, keys: list[bytes], remote_length: int) -> bool:
    with node.client(heartbeat=False) as reader:
        return reader.locate(keys).remote_length == remote_length


def address_of(node: DaemonProcess) -> str:
    with node.client(heartbeat=False) as c:
        return str(c.cluster_status()["address"])


# -- inspection ------------------------------------------------------------------------------


def test_status_shows_this_node_its_members_and_the_local_tiers(trio: list[DaemonProcess]) -> None:
    human = shoal(trio[0], "status")
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("node node0 at 127.0.0.1:")
    for text in ("node1", "node2", "SHM USED/CAP", "DRAM USED/CAP", "LAG", "in_sync", "TIER"):
        assert text in human.stdout

    scripted = shoal(trio[0], "status", "--json")
    assert scripted.returncode == 0, scripted.stderr
    body = json.loads(scripted.stdout)
    assert body["cluster"]["node"] == "node0" and body["cluster"]["state"] == "active"
    assert {m["node"] for m in body["cluster"]["members"]} == {"node1", "node2"}
    assert [t["tier"] for t in body["local"]["tiers"]][:2] == ["shm", "dram"]


def test_nodes_lists_every_member_with_this_node_first(trio: list[DaemonProcess]) -> None:
    human = shoal(trio[1], "nodes")
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ADDRESS", "STATE", "HEARD"]
    assert lines[1].startswith("node1") and lines[1].endswith("(this node)")
    assert [line.split()[0] for line in lines[2:]] == ["node0", "node2"]

    scripted = json.loads(shoal(trio[1], "nodes", "--json").stdout)
    assert [(n["node"], n["self"], n["state"]) for n in scripted] == [
        ("node1", True, "active"), ("node0", False, "active"), ("node2", False, "active"),
    ]  # fmt: skip


def test_lookup_on_node1_names_node0_as_the_holder_of_a_prefix_put_there(
    trio: list[DaemonProcess],
) -> None:
    namespace = Namespace(model="cli-lookup@1")
    keys = put_chain(trio[0], namespace)
    assert wait_until(lambda: seen_by(trio[1], keys, 8))
    tokens = ",".join(map(str, [*TOKENS, 1, 2, 3]))  # a partial tail chunk has no key

    scripted = shoal(
        trio[1],
        "lookup",
        "--chunk-tokens",
        "16",
        "--model",
        "cli-lookup@1",
        "--tokens",
        tokens,
        "--json",
    )
    assert scripted.returncode == 0, scripted.stderr
    body = json.loads(scripted.stdout)
    assert (body["num_blocks"], body["local_blocks"], body["remote_blocks"]) == (8, 0, 8)
    assert body["holders"] == [{"node": "node0", "address": address_of(trio[0]), "upto": 8}]
    assert body["keys"][0] == keys[0].hex()
    assert body["namespace"] == namespace.label()

    human = shoal(
        trio[1], "lookup", "--chunk-tokens", "16", "--model", "cli-lookup@1", "--tokens", tokens
    )
    assert "cached here:      0" in human.stdout and "with peers' help: 8" in human.stdout
    assert human.stdout.splitlines()[-1].split()[0::2] == ["node0", "8"]

    other = shoal(trio[1], "lookup", "--chunk-tokens", "16", "--model", "cli-lookup@1", "--tp-size", "2", "--tokens", tokens,
                  "--json")  # fmt: skip
    assert json.loads(other.stdout)["remote_blocks"] == 0, "another namespace, other keys"


def test_lookup_of_text_tokenizes_it_like_the_engine(
    trio: list[DaemonProcess], tmp_path: Path
) -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    tokenizers = pytest.importorskip("tokenizers")
    # A local word-level tokenizer: "w<i>" is token 100 + i, no special tokens, no network.
    vocab = {"[UNK]": 0, **{f"w{i}": 100 + i for i in range(32)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"})
    )
    namespace = Namespace(model="cli-text@1")
    keys = chain_keys(namespace, [100 + i for i in range(32)], 16)
    with trio[0].client(namespace=namespace.label(), heartbeat=False) as writer:
        assert writer.put(keys, [np.zeros(BLOCK, np.uint8)] * 2).complete
    assert wait_until(lambda: seen_by(trio[1], list(keys), 2))

    text = " ".join(f"w{i}" for i in range(32))
    result = shoal(trio[1], "lookup", "--chunk-tokens", "16", "--model", "cli-text@1", "--text", text,
                   "--tokenizer", str(tmp_path), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert (body["num_tokens"], body["remote_blocks"]) == (32, 2)


def test_lookup_usage_errors_exit_2_before_any_daemon_is_asked(tmp_path: Path) -> None:
    nowhere = ["--name", "absent", "--runtime-dir", str(tmp_path)]
    no_tokenizer = shoal(None, "lookup", "--model", "m", "--text", "hello", *nowhere)
    assert no_tokenizer.returncode == 2 and "--tokenizer" in no_tokenizer.stderr
    not_ids = shoal(None, "lookup", "--model", "m", "--tokens", "1,two,3", *nowhere)
    assert not_ids.returncode == 2 and "integers" in not_ids.stderr
    bad_rank = shoal(None, "lookup", "--model", "m", "--tokens", "1", "--tp-rank", "3", *nowhere)
    assert bad_rank.returncode == 2 and "tp_rank" in bad_rank.stderr


def test_stats_watch_refreshes_count_times(trio: list[DaemonProcess]) -> None:
    human = shoal(trio[2], "stats", "--watch", "--interval", "0.1", "--count", "2")
    assert human.returncode == 0, human.stderr
    assert human.stdout.count("TIER") == 2
    assert "\x1b[" not in human.stdout, "no screen clearing when stdout is not a terminal"
    scripted = shoal(trio[2], "stats", "--json", "--count", "3", "--interval", "0.05")
    assert [json.loads(line)["name"] for line in scripted.stdout.splitlines()] == [
        trio[2].config.name
    ] * 3


# -- operations ------------------------------------------------------------------------------


def test_evict_by_namespace_on_a_remote_member_removes_only_its_blocks_there(
    trio: list[DaemonProcess],
) -> None:
    doomed, kept = Namespace(model="cli-evict@1"), Namespace(model="cli-keep@1")
    doomed_keys, kept_keys = put_chain(trio[1], doomed), put_chain(trio[1], kept)

    result = shoal(trio[0], "evict", "--namespace", doomed.label(), "--node", "node1", "--json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert [(n["node"], n["evicted"]) for n in body["nodes"]] == [("node1", 8)]
    assert body["total"] == 8 and body["unreachable"] == []
    with trio[1].client(heartbeat=False) as c:
        assert c.lookup(doomed_keys) == 0 and c.lookup(kept_keys) == 8

    by_prefix = shoal(trio[0], "evict", "--key-prefix", kept_keys[0].hex()[:12], "--all")
    assert by_prefix.returncode == 0, by_prefix.stderr
    rows = {line.split()[0]: line.split()[-1] for line in by_prefix.stdout.splitlines()[1:]}
    assert rows == {"node0": "0", "node1": "1", "node2": "0", "total": "1"}


def test_an_unknown_node_is_a_usage_error_listing_the_members(trio: list[DaemonProcess]) -> None:
    result = shoal(trio[0], "evict", "--namespace", "x", "--node", "node9")
    assert result.returncode == 2
    assert "unknown node 'node9'" in result.stderr
    assert "node0 (this node), node1, node2" in result.stderr


def test_flush_needs_yes_and_then_empties_every_member(trio: list[DaemonProcess]) -> None:
    keys = [put_chain(node, Namespace(model=f"cli-flush-{i}@1")) for i, node in enumerate(trio)]

    refused = shoal(trio[0], "flush", "--all")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    with trio[2].client(heartbeat=False) as c:
        assert c.lookup(keys[2]) == 8, "a refused flush touches nothing"

    result = shoal(trio[0], "flush", "--all", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    flushed = {n["node"]: n["flushed"] for n in json.loads(result.stdout)["nodes"]}
    assert set(flushed) == {"node0", "node1", "node2"}
    assert all(count >= 8 for count in flushed.values())
    for node, node_keys in zip(trio, keys, strict=True):
        with node.client(heartbeat=False) as c:
            assert c.lookup(node_keys) == 0


def test_drain_hands_blocks_to_peers_and_the_node_exits_cleanly(tmp_path: Path) -> None:
    nodes = start_joined(tmp_path, 3, "drain")
    try:
        keys = put_chain(nodes[2], Namespace(model="cli-drain@1"))
        assert wait_until(lambda: seen_by(nodes[0], keys, 8))

        remote = shoal(nodes[0], "drain", "node2", "--json")  # through node0's view
        assert remote.returncode == 0, remote.stderr
        body = json.loads(remote.stdout)
        assert body == {"node": "node2", "handed_off": 8, "peers": ["node0", "node1"]}
        assert nodes[2].process.wait(timeout=10) == 0, nodes[2].log()
        # node0 and node1 now share the chain between them; node2 is gone from the index.
        with nodes[0].client(heartbeat=False) as c:
            assert wait_until(lambda: c.locate(keys).remote_length == 8)
            assert "node2" not in {run[0] for run in c.locate(keys).runs}

        local = shoal(nodes[1], "drain", "node1")  # a node drains itself over ipc
        assert local.returncode == 0, local.stderr
        assert "to node0" in local.stdout and "left the cluster" in local.stdout
        assert nodes[1].process.wait(timeout=10) == 0, nodes[1].log()
        with nodes[0].client(heartbeat=False) as c:
            assert c.lookup(keys) == 8, "the last node holds the whole chain"
    finally:
        stop_all(nodes)


# -- keys and failures -----------------------------------------------------------------------


def test_keygen_writes_a_private_keypair_that_admin_commands_use(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    made = shoal(None, "keygen", str(keys))
    assert made.returncode == 0, made.stderr
    assert "--cluster-curve-dir" in made.stdout and "kubectl create secret" in made.stdout
    assert stat.S_IMODE((keys / "cluster.key_secret").stat().st_mode) == 0o600
    assert (keys / "cluster.key").exists()
    again = shoal(None, "keygen", str(keys))
    assert again.returncode == 2 and "--force" in again.stderr

    port = cluster_ports(1)[0]
    daemon = start_daemon(tmp_path, cluster_port=port, cluster_host="127.0.0.1",
                          cluster_node="secure", cluster_curve_dir=str(keys))  # fmt: skip
    try:
        with ClusterAdmin(f"127.0.0.1:{port}", curve_dir=str(keys), timeout_s=5) as admin:
            assert admin.status()["node"] == "secure"
        with (
            ClusterAdmin(f"127.0.0.1:{port}", timeout_s=0.5) as admin,
            pytest.raises(CacheUnavailable, match="CurveZMQ"),
        ):
            admin.status()  # no key: the handshake fails silently, then the timeout
    finally:
        daemon.stop()


def test_an_absent_local_daemon_is_exit_3_naming_the_endpoint(tmp_path: Path) -> None:
    result = shoal(None, "status", "--name", "absent", "--runtime-dir", str(tmp_path))
    assert result.returncode == 3
    assert f"ipc://{tmp_path}/shoal-absent.sock" in result.stderr
    assert "shoal cache serve" in result.stderr


def test_a_silent_member_address_is_unavailable_naming_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"
    with ClusterAdmin(address, timeout_s=0.3) as admin, pytest.raises(CacheUnavailable) as caught:
        admin.flush()
    assert address in str(caught.value)


def test_an_unreachable_member_is_exit_3_after_the_others_are_done(tmp_path: Path) -> None:
    # A long member timeout keeps the stopped node in node0's view while the command runs.
    nodes = start_joined(tmp_path, 2, "gone", member_timeout_s=60)
    keys = put_chain(nodes[0], Namespace(model="cli-gone@1"))
    nodes[1].process.send_signal(signal.SIGSTOP)
    try:
        result = shoal(nodes[0], "flush", "--all", "--yes", "--timeout", "0.5")
        assert result.returncode == 3
        assert result.stdout.splitlines()[1].split() == ["node0", "(this", "node)", "8"]
        assert "node1 unreachable: no reply from cluster member tcp://127.0.0.1:" in result.stderr
        with nodes[0].client(heartbeat=False) as c:
            assert c.lookup(keys) == 0, "the reachable node was flushed all the same"
    finally:
        nodes[1].process.send_signal(signal.SIGCONT)
        stop_all(nodes)


def test_a_daemon_without_a_cluster_says_so_and_acts_alone(daemon: DaemonProcess) -> None:
    status = shoal(daemon, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("cluster: disabled") and "TIER" in status.stdout
    nodes = json.loads(shoal(daemon, "nodes", "--json").stdout)
    assert [(n["node"], n["self"]) for n in nodes] == [(daemon.config.name, True)]
    evicted = shoal(daemon, "evict", "--namespace", "x", "--all")
    assert (
        evicted.returncode == 0 and evicted.stdout.splitlines()[1].split()[0] == daemon.config.name
    )
    elsewhere = shoal(daemon, "evict", "--namespace", "x", "--node", "node1")
    assert elsewhere.returncode == 2 and "without a cluster" in elsewhere.stderr
    drained = shoal(daemon, "drain", daemon.config.name)
    assert drained.returncode == 2 and "no peers" in drained.stderr
