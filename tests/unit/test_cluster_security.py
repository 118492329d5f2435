"""Keys and names: the allow-lists of a key directory, and which key speaks for which member."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvcache.cluster.security import (
    MEMBER,
    OPERATOR,
    STREAM_DOMAIN,
    Identities,
    KeyRing,
    check_bind,
    is_loopback,
    load_curve_keys,
)
from kvcache.errors import CacheError


def member_key(directory: Path, name: str, *, pinned: bool) -> str:
    """A member keypair NAME.key_secret, its public half in members/ (pinned: naming it)."""
    (directory / "members").mkdir(exist_ok=True)
    public, _ = zmq.auth.create_certificates(str(directory), name)
    text = Path(public).read_text()
    if pinned:
        text = text.replace("metadata\n", f"metadata\n    node = {name}\n")
    (directory / "members" / f"{name}.key").write_text(text)
    key, _ = zmq.auth.load_certificate(public)
    return key.decode()


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    zmq.auth.create_certificates(str(tmp_path), "cluster")
    (tmp_path / "members").mkdir()
    zmq.auth.create_certificates(str(tmp_path), "node")
    return KeyRing(str(tmp_path), load_curve_keys(str(tmp_path)))


class Live:
    def __init__(self) -> None:
        self.nodes: set[str] = set()

    def __call__(self, node: str) -> bool:
        return node in self.nodes


def test_roles_follow_the_allow_lists_as_they_are_re_read(tmp_path: Path, ring: KeyRing) -> None:
    a = member_key(tmp_path, "a", pinned=False)
    (tmp_path / "operators").mkdir()
    public, _ = zmq.auth.create_certificates(str(tmp_path / "operators"), "alice")
    alice = zmq.auth.load_certificate(public)[0].decode()
    assert ring.role(a) is None, "not before a reload"
    assert ring.reload()
    assert (ring.role(a), ring.role(alice), ring.role("x" * 40), ring.role(None)) == (
        MEMBER, OPERATOR, None, None,
    )  # fmt: skip
    assert ring.callback("*", a.encode()) and ring.callback("*", alice.encode())
    assert ring.callback(STREAM_DOMAIN, a.encode()), "a member may subscribe"
    assert not ring.callback(STREAM_DOMAIN, alice.encode()), "an operator may not"
    (tmp_path / "members" / "a.key").unlink()
    assert ring.reload() and ring.role(a) is None and not ring.callback("*", a.encode())


def test_a_pinned_key_speaks_only_for_its_node(tmp_path: Path, ring: KeyRing) -> None:
    a = member_key(tmp_path, "a", pinned=True)
    b = member_key(tmp_path, "b", pinned=True)
    ring.reload()
    live = Live()
    names = Identities(ring, live)
    assert names.admit("a", a) and names.admit("a/gpu0", a)
    live.nodes |= {"a", "a/gpu0"}
    assert not names.admit("a", b), "b's key cannot speak for a"
    assert not names.admit("c", a), "nor a's for a name its certificate does not hold"
    assert names.node_of(a) == "a" and names.num_refused == 2


def test_an_unpinned_key_holds_the_first_name_it_speaks_while_that_member_lives(
    tmp_path: Path, ring: KeyRing
) -> None:
    x = member_key(tmp_path, "x", pinned=False)
    y = member_key(tmp_path, "y", pinned=False)
    ring.reload()
    live = Live()
    names = Identities(ring, live)
    assert names.admit("a", x)
    live.nodes.add("a")
    assert not names.admit("a", y), "a live member's name is held by its key"
    assert not names.admit("b", x), "a key speaks for one member at a time"
    assert names.admit("b", y)
    live.nodes.discard("a")  # a left (or died): its name is free again
    assert names.admit("c", x) and names.node_of(x) == "c"
    assert not names.admit("a", None), "no key, no name"


def test_bind_policy() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.3.4.5"):
        assert is_loopback(host)
        check_bind(host, curve=False, insecure=False)
    for host in ("0.0.0.0", "::", "10.0.0.7", "cache.example"):
        assert not is_loopback(host)
        with pytest.raises(CacheError, match="--cluster-insecure"):
            check_bind(host, curve=False, insecure=False)
        check_bind(host, curve=True, insecure=False)
        check_bind(host, curve=False, insecure=True)


def test_a_member_directory_without_an_own_keypair_names_the_command(tmp_path: Path) -> None:
    zmq.auth.create_certificates(str(tmp_path), "cluster")
    (tmp_path / "members").mkdir()
    with pytest.raises(CacheError, match="keygen .* --member NAME"):
        load_curve_keys(str(tmp_path))


def test_an_operator_needs_only_the_public_half_of_the_cluster_keypair(tmp_path: Path) -> None:
    zmq.auth.create_certificates(str(tmp_path), "cluster")
    (tmp_path / "cluster.key_secret").unlink()  # what an operator's laptop holds
    zmq.auth.create_certificates(str(tmp_path), "alice")
    keys = load_curve_keys(str(tmp_path), str(tmp_path / "alice.key_secret"), member=False)
    assert keys.server_secret is None and keys.public != keys.server_public
    with pytest.raises(CacheError, match="cluster CurveZMQ key"):
        load_curve_keys(str(tmp_path), str(tmp_path / "alice.key_secret"))  # a member does


def test_a_member_whose_own_key_peers_would_refuse_is_stopped_at_start(
    tmp_path: Path, ring: KeyRing
) -> None:
    a = member_key(tmp_path, "a", pinned=True)
    ring.reload()
    ring.check_own(a.encode(), "a")
    with pytest.raises(CacheError, match="pinned to node 'a'"):
        ring.check_own(a.encode(), "b")
    with pytest.raises(CacheError, match="not in"):
        ring.check_own(b"x" * 40, "a")
