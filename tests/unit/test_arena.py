"""The arena file: one live owner per name, every page reserved before a client maps it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvcache.arena import Arena
from kvcache.errors import ArenaError

MIB = 1 << 20


def test_a_second_arena_started_between_the_firsts_create_and_lock_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the review found (m1): the first daemon has created its arena file but
    not locked it yet when the second looks. The second must still see a live owner."""
    path = tmp_path / "shoal-race.arena"
    real_open = os.open
    second: list[Arena | ArenaError] = []

    def racing_open(file: object, flags: int, *args: object, **kwargs: object) -> int:
        fd = real_open(file, flags, *args, **kwargs)  # type: ignore[arg-type]
        if flags & os.O_EXCL and Path(str(file)) == path and not second:
            second.append(ArenaError("placeholder"))  # no recursion into this branch
            try:
                second[0] = Arena(path, MIB)
            except ArenaError as exc:
                second[0] = exc
        return fd

    monkeypatch.setattr(os, "open", racing_open)
    first = Arena(path, MIB)
    monkeypatch.undo()
    try:
        assert isinstance(second[0], ArenaError), "two daemons both own the arena"
        assert "held by a running daemon" in str(second[0])
        assert path.exists() and os.stat(path).st_ino == os.fstat(first._fd).st_ino
    finally:
        first.close()
        if isinstance(second[0], Arena):
            second[0].close()


def test_a_dead_owners_arena_is_replaced_and_the_lock_file_outlives_a_clean_exit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shoal-x.arena"
    path.write_bytes(b"left by a daemon killed with -9")
    arena = Arena(path, MIB)
    assert path.stat().st_size == 4096 + MIB
    with pytest.raises(ArenaError, match="held by a running daemon"):
        Arena(path, MIB)
    arena.close()
    assert not path.exists()
    assert path.with_name(path.name + ".lock").exists(), "never unlinked: unlinking races"
    Arena(path, MIB).close()  # the name is free again


def test_the_arena_is_allocated_not_sparse(tmp_path: Path) -> None:
    arena = Arena(tmp_path / "shoal-y.arena", 4 * MIB, populate=False)
    try:
        allocated = os.stat(arena.path).st_blocks * 512
        assert allocated >= 4 * MIB, f"only {allocated} bytes backed: a write may SIGBUS"
    finally:
        arena.close()
