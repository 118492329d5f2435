"""One real ``ClusterNode`` in this process, on real TCP sockets, against peers played by
raw ZeroMQ sockets: what a peer may and may not make the node do (review C4, m6, m7, M12).

The fake peers speak the wire format by hand (msgpack maps), so a test can be a v2
member, a v3 member, or a member that lies.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from prometheus_client import CollectorRegistry

from kvcache.allocator import SlabAllocator
from kvcache.cluster.admin import ClusterAdmin
from kvcache.cluster.discovery import StaticDiscovery
from kvcache.cluster.node import PEER_SESSION, ClusterNode
from kvcache.cluster.settings import ClusterSettings
from kvcache.keys import join_keys
from kvcache.store import BlockStore, ReserveStatus
from kvcache.tiers import MemoryBacking, Tier, TierStore, block_checksum
from tests.integration.conftest import cluster_ports

pytestmark = pytest.mark.integration

BLOCK = 64 << 10
WRITER = 7  # store session the tests write local blocks under


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int, salt: int = 0) -> bytes:
    return bytes([(i + salt) % 251]) * BLOCK


class FakePeer:
    """A member played by hand: a PUB (its stream) and a ROUTER (its requests)."""

    def __init__(self, name: str, port: int, version: int = 2) -> None:
        self.name, self.port, self.version = name, port, version
        self.address = f"127.0.0.1:{port}"
        context: zmq.Context[Any] = zmq.Context.instance()
        self.pub = context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(f"tcp://127.0.0.1:{port + 1}")
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(f"tcp://127.0.0.1:{port}")
        self.epoch = 1_000

    def beat(self, seq: int = 0, state: str = "active", node: str | None = None) -> None:
        body: dict[str, Any] = {"v": 2, "t": "heartbeat", "node": node or self.name,
                                "epoch": self.epoch, "seq": seq, "address": self.address,
                                "state": state, "ts": time.time(), "interval_s": 0.2,
                                "stats": {}}  # fmt: skip
        if self.version >= 3:
            body["proto"] = 3
        self.pub.send_multipart([b"shoal.hb", msgpack.packb(body)])

    def announce(self, seq: int, keys: list[bytes], tier: int = 1) -> None:
        body = {"v": 2, "t": "events", "node": self.name, "address": self.address,
                "epoch": self.epoch, "seq": seq, "ts": time.time(),
                "ops": bytes([1 + tier]) * len(keys), "keys": join_keys(keys)}  # fmt: skip
        self.pub.send_multipart([b"shoal.ev", msgpack.packb(body)])

    def receive(
        self, run: Callable[[], None], timeout: float = 5.0
    ) -> tuple[bytes, dict[str, Any]]:
        """The next request the node sends here (``run`` drives the node meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run()
            if self.router.poll(10):
                identity, frame = self.router.recv_multipart()
                body = msgpack.unpackb(frame)
                if self.version == 2:  # a v2 member reads v2 only (wire.unpack_map at db917a5)
                    assert body["v"] == 2, f"the node spoke v{body['v']} to a v2 member"
                return identity, body
        raise AssertionError(f"{self.name} got no request within {timeout}s")

    def reply(self, identity: bytes, body: dict[str, Any], *payloads: bytes) -> None:
        frame = msgpack.packb({"v": self.version, "ok": True, **body})
        self.router.send_multipart([identity, frame, *payloads])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.router.close(linger=0)


class Harness:
    """The node under test, its store, and a loop that drives it like the daemon does."""

    def __init__(self, peers: list[FakePeer], **overrides: Any) -> None:
        port = cluster_ports(1)[0]
        shm = MemoryBacking.anonymous(16 * BLOCK)
        self.tiers = [
            TierStore(Tier.SHM, SlabAllocator(16 * BLOCK, slab_bytes=BLOCK), shm),
            TierStore(Tier.DRAM, SlabAllocator(64 * BLOCK, slab_bytes=BLOCK),
                      MemoryBacking.anonymous(64 * BLOCK)),
        ]  # fmt: skip
        self.store = BlockStore(self.tiers, policy="lru")
        self.store.open_session(WRITER)
        self.context: zmq.Context[Any] = zmq.Context()
        values: dict[str, Any] = {
            "node": "under-test", "host": "127.0.0.1", "port": port,
            "advertise": f"127.0.0.1:{port}",
            "discovery": StaticDiscovery(tuple(p.address for p in peers)),
            "heartbeat_s": 0.2, "member_timeout_s": 2.0, "fetch_timeout_s": 2.0,
            "max_block_bytes": BLOCK, **overrides,
        }  # fmt: skip
        known = {f.name for f in dataclasses.fields(ClusterSettings)}
        self.node = ClusterNode(
            ClusterSettings(**{k: v for k, v in values.items() if k in known}),
            self.store, shm, self.context, CollectorRegistry(),
        )  # fmt: skip
        self.poller = zmq.Poller()
        self.node.register(self.poller)
        self.address = f"127.0.0.1:{port}"

    def step(self) -> None:
        for sock, _ in self.poller.poll(10):
            if self.node.owns(sock):
                self.node.handle(sock)
        self.node.publish(self.store.take_events(), time.time())
        self.node.tick(time.monotonic())

    def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            if predicate():
                return True
        return False

    def put(self, ids: list[int]) -> None:
        keys = [key(i) for i in ids]
        results = self.store.reserve(WRITER, keys, [BLOCK] * len(keys))
        for i, result in zip(ids, results, strict=True):
            assert result.status is ReserveStatus.OK
            self.tiers[0].backing.write(result.offset, memoryview(data(i)))
        assert self.store.commit(WRITER, keys, [block_checksum(data(i)) for i in ids]) == len(ids)

    def read(self, i: int) -> bytes | None:
        (lease,) = self.store.acquire(WRITER, [key(i)])
        if lease is None:
            return None
        out = bytes(self.tiers[0].backing.view(lease.offset, lease.nbytes))  # type: ignore[attr-defined]
        self.store.release(WRITER, [key(i)])
        return out

    def tier_of(self, i: int) -> Tier | None:
        return dict(self.store.snapshot()).get(key(i))

    def close(self) -> None:
        self.node.close()
        self.context.destroy(linger=0)


@pytest.fixture
def peers() -> Iterator[list[FakePeer]]:
    ports = cluster_ports(3)
    made = [FakePeer(f"peer{i}", port) for i, port in enumerate(ports)]
    yield made
    for peer in made:
        peer.close()


def dealer(address: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    return sock


def ask(harness: Harness, sock: zmq.Socket[bytes], body: dict[str, Any]) -> dict[str, Any]:
    sock.send(msgpack.packb(body))
    assert harness.until(lambda: bool(sock.poll(0)), timeout=5), f"no reply to {body['op']}"
    reply: dict[str, Any] = msgpack.unpackb(sock.recv())
    return reply


def joined(harness: Harness, *members: FakePeer) -> None:
    def heard() -> bool:
        for member in members:
            member.beat()
        return set(harness.node.view.nodes) >= {m.name for m in members}

    assert harness.until(heard), "the node never heard the fake members"


# -- m6: replies are matched by (peer, id) -------------------------------------------------


def test_a_peer_cannot_answer_a_fetch_sent_to_another_peer(peers: list[FakePeer]) -> None:
    holder, liar, _ = peers
    harness = Harness(peers)
    try:
        joined(harness, holder, liar)
        holder.announce(1, [key(1)])
        assert harness.until(lambda: harness.node.view.index.num_blocks() == 1)
        done: list[bool] = []
        harness.node.fetch([key(1)], lambda: done.append(True))
        fetch_identity, fetch = holder.receive(harness.step)
        assert fetch["op"] == "fetch"
        # The liar gets a request of its own (a sync after a heartbeat announcing seq 1) ...
        liar.beat(seq=1)
        liar_identity, sync = liar.receive(harness.step)
        assert sync["op"] == "sync"
        # ... and answers it with a fetch reply to the holder's request id: forged bytes
        # under a valid checksum.
        forged = data(1, salt=99)
        liar.reply(liar_identity, {"id": fetch["id"], "found": [0], "sizes": [BLOCK],
                                   "checksums": [block_checksum(forged)], "namespaces": [""]},
                   forged)  # fmt: skip
        harness.until(lambda: False, timeout=0.3)  # the node reads the forged reply
        assert harness.read(1) is None, "the forged reply landed a block"
        holder.reply(fetch_identity, {"id": fetch["id"], "found": [0], "sizes": [BLOCK],
                                      "checksums": [block_checksum(data(1))], "namespaces": [""]},
                     data(1))  # fmt: skip
        assert harness.until(lambda: bool(done))
        assert harness.read(1) == data(1), "the holder's own reply completed its request"
    finally:
        harness.close()


def test_a_reply_lands_by_chained_runs_and_a_bad_block_or_repeat_spoils_only_itself(
    peers: list[FakePeer],
) -> None:
    """Replies land one run of chained blocks per reserve/commit (issue 17); a block with a
    bad checksum in the middle of a run, and a block sent twice, cost only themselves."""
    holder, _, _ = peers
    harness = Harness(peers)
    try:
        joined(harness, holder)
        holder.announce(1, [key(1), key(2), key(3)])
        assert harness.until(lambda: harness.node.view.index.num_blocks() == 3)
        done: list[bool] = []
        harness.node.fetch([key(1), key(2), key(3)], lambda: done.append(True))
        identity, fetch = holder.receive(harness.step)
        assert fetch["op"] == "fetch"
        sums = [block_checksum(data(i)) for i in (1, 2, 3)]
        holder.reply(identity, {"id": fetch["id"], "found": [0, 1, 2, 2],
                                "sizes": [BLOCK] * 4,
                                "checksums": [sums[0], sums[1] ^ 1, sums[2], sums[2]],
                                "namespaces": [""] * 4},
                     data(1), data(2), data(3), data(3))  # fmt: skip
        assert harness.until(lambda: bool(done))
        assert harness.read(1) == data(1)
        assert harness.read(2) is None, "a block failing its checksum landed"
        assert harness.read(3) == data(3)
    finally:
        harness.close()


# -- m7: serving peers leaves the hot tier alone -------------------------------------------


def test_serving_warm_blocks_to_a_peer_does_not_promote_them_into_shm(
    peers: list[FakePeer],
) -> None:
    harness = Harness(peers)
    try:
        harness.put(list(range(16)))  # fills SHM (16 blocks)
        harness.put(list(range(100, 116)))  # pushes the first 16 down into DRAM
        warm = list(range(16))
        hot = list(range(100, 116))
        assert all(harness.tier_of(i) is Tier.DRAM for i in warm)
        assert all(harness.tier_of(i) is Tier.SHM for i in hot)
        sock = dealer(harness.address)
        sock.send(msgpack.packb({"v": 2, "id": 1, "op": "fetch", "node": "peer0",
                                 "keys": join_keys([key(i) for i in warm])}))  # fmt: skip
        assert harness.until(lambda: bool(sock.poll(0)))
        header, *payloads = sock.recv_multipart()
        reply = msgpack.unpackb(header)
        assert reply["found"] == list(range(16))
        assert [bytes(p) for p in payloads] == [data(i) for i in warm]
        assert harness.until(lambda: harness.store.statistics().num_leases == 0)
        assert all(harness.tier_of(i) is Tier.SHM for i in hot), "the node's hot blocks stay"
        assert all(harness.tier_of(i) is Tier.DRAM for i in warm), "served from where they lie"
        sock.close()
    finally:
        harness.close()


# -- C4: offers ----------------------------------------------------------------------------


def test_an_offer_from_a_member_that_is_not_draining_is_refused_and_nothing_is_dialled(
    peers: list[FakePeer],
) -> None:
    member, attacker, _ = peers
    harness = Harness(peers, member_timeout_s=1.0)
    try:
        joined(harness, member)
        sock = dealer(harness.address)
        v2_offer = {"v": 2, "id": 1, "op": "offer", "source": attacker.address,
                    "keys": join_keys([key(1)])}  # fmt: skip
        reply = ask(harness, sock, v2_offer)
        assert (reply["ok"], reply.get("code")) == (False, "forbidden")
        v3_offer = {**v2_offer, "v": 3, "id": 2, "node": member.name}
        assert ask(harness, sock, v3_offer)["code"] == "forbidden"
        assert not attacker.router.poll(0), "the node dialled the address in the offer"
        sock.close()
    finally:
        harness.close()


def test_an_offer_from_a_draining_member_is_fetched_from_its_own_address(
    peers: list[FakePeer],
) -> None:
    draining, attacker, _ = peers
    harness = Harness(peers)
    try:
        joined(harness, draining)
        draining.beat(state="draining")
        assert harness.until(lambda: harness.node.view.member_state("peer0") == "draining")
        sock = dealer(harness.address)
        sock.send(msgpack.packb({"v": 2, "id": 5, "op": "offer", "source": draining.address,
                                 "keys": join_keys([key(3)])}))  # fmt: skip
        identity, fetch = draining.receive(harness.step)
        assert fetch["op"] == "fetch" and fetch["keys"] == key(3)
        draining.reply(identity, {"id": fetch["id"], "found": [0], "sizes": [BLOCK],
                                  "checksums": [block_checksum(data(3))], "namespaces": [""]},
                       data(3))  # fmt: skip
        assert harness.until(lambda: bool(sock.poll(0)))
        assert msgpack.unpackb(sock.recv())["fetched"] == 1
        assert harness.read(3) == data(3)
        # An offer naming the attacker's address matches no draining member.
        sock.send(msgpack.packb({"v": 2, "id": 6, "op": "offer", "source": attacker.address,
                                 "keys": join_keys([key(4)])}))  # fmt: skip
        assert harness.until(lambda: bool(sock.poll(0)), timeout=6)
        assert msgpack.unpackb(sock.recv())["code"] == "forbidden"
        assert not attacker.router.poll(0)
        sock.close()
    finally:
        harness.close()


# -- M12: a v2 member and a v3 member in one cluster ---------------------------------------


def test_v2_and_v3_members_sync_with_the_node_each_in_its_own_version(
    peers: list[FakePeer],
) -> None:
    old, new, _ = peers
    new.version = 3
    harness = Harness(peers)
    try:
        harness.put([1, 2])
        joined(harness, old, new)
        # The node syncs each member's stream, asking each in the version it speaks.
        for member, ids in ((old, [10, 11]), (new, [20])):
            member.beat(seq=1)
            identity, sync = member.receive(harness.step)
            assert sync["op"] == "sync" and sync["v"] == member.version
            member.reply(identity, {"id": sync["id"], "kind": "snapshot", "epoch": member.epoch,
                                    "seq": 1, "keys": join_keys([key(i) for i in ids]),
                                    "tiers": bytes(len(ids))})  # fmt: skip
        assert harness.until(
            lambda: (
                {h.node for i in (10, 11, 20) for h in harness.node.view.index.holders(key(i))}
                == {"peer0", "peer1"}
            )
        )
        # The node's stream is read by a v2 subscriber (v == 2, fields it knows).
        sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"shoal.hb")
        sub.connect(f"tcp://127.0.0.1:{harness.node.settings.port + 1}")
        assert harness.until(lambda: bool(sub.poll(0)))
        beat = msgpack.unpackb(sub.recv_multipart()[1])
        assert beat["v"] == 2 and beat["node"] == "under-test" and beat["proto"] == 3
        sub.close()
        # Both versions' requests are answered, each in its own version.
        sock = dealer(harness.address)
        for version in (2, 3):
            reply = ask(harness, sock, {"v": version, "id": version, "op": "sync",
                                        "stream": "under-test", "epoch": 0, "after_seq": 0})  # fmt: skip
            assert reply["ok"] and reply["v"] == version and reply["kind"] == "snapshot"
            assert reply["keys"] == join_keys([key(1), key(2)])
        assert ask(harness, sock, {"v": 1, "id": 9, "op": "status"})["code"] == "version"
        sock.close()
    finally:
        harness.close()


def test_leases_for_peers_are_released_once_sent(peers: list[FakePeer]) -> None:
    harness = Harness(peers)
    try:
        harness.put([1, 2, 3])
        sock = dealer(harness.address)
        sock.send(msgpack.packb({"v": 2, "id": 1, "op": "fetch", "node": "p",
                                 "keys": join_keys([key(1), key(2), key(3)])}))  # fmt: skip
        assert harness.until(lambda: bool(sock.poll(0)))
        assert len(sock.recv_multipart()) == 4
        assert harness.until(lambda: harness.store.statistics().num_leases == 0)
        assert harness.store.release(PEER_SESSION, [key(1)]) == 0
        sock.close()
    finally:
        harness.close()


def test_an_operator_asks_a_v2_member_again_in_v2(peers: list[FakePeer]) -> None:
    old = peers[0]
    seen: list[int] = []

    def serve_like_v2() -> None:
        for _ in range(2):
            assert old.router.poll(5000)
            identity, frame = old.router.recv_multipart()
            body = msgpack.unpackb(frame)
            seen.append(body["v"])
            if body["v"] != 2:  # what kvcache.cluster.node answered at db917a5
                error = {"v": 2, "id": 0, "ok": False, "code": "version", "error": "v2 only"}
                old.router.send_multipart([identity, msgpack.packb(error)])
            else:
                old.router.send_multipart([identity, msgpack.packb(
                    {"v": 2, "id": body["id"], "ok": True, "node": old.name})])  # fmt: skip

    server = threading.Thread(target=serve_like_v2)
    server.start()
    with ClusterAdmin(old.address, timeout_s=5) as admin:
        assert admin.status()["node"] == "peer0"
    server.join(timeout=5)
    assert seen == [3, 2]
