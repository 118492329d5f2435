"""What a client accepts from the filesystem before it trusts a daemon (no daemon needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvcache.client.session import check_arena_path, check_private_dir
from kvcache.errors import UntrustedEndpoint


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def arena_file(directory: Path, mode: int = 0o600) -> Path:
    arena = directory / "shoal-x.arena"
    arena.write_bytes(b"\0" * 4096)
    arena.chmod(mode)
    return arena


def test_a_private_directory_of_this_user_is_accepted(tmp_path: Path) -> None:
    check_private_dir(private_dir(tmp_path / "run"))


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o701, 0o777])
def test_a_directory_others_may_enter_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    runtime = private_dir(tmp_path / "run")
    runtime.chmod(mode)
    with pytest.raises(UntrustedEndpoint, match=f"mode {mode:04o}"):
        check_private_dir(runtime)


def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = private_dir(tmp_path / "run")
    other = os.getuid() + 1
    monkeypatch.setattr(os, "getuid", lambda: other)  # as if another user made it
    with pytest.raises(UntrustedEndpoint, match=f"must be owned by uid {other}"):
        check_private_dir(runtime)


def test_an_arena_in_the_shm_dir_owned_by_this_user_is_accepted(tmp_path: Path) -> None:
    shm = private_dir(tmp_path / "shm")
    arena = arena_file(shm)
    assert check_arena_path(str(arena), str(shm)) == arena


def test_an_arena_elsewhere_is_refused(tmp_path: Path) -> None:
    shm = private_dir(tmp_path / "shm")
    elsewhere = arena_file(private_dir(tmp_path / "elsewhere"))
    with pytest.raises(UntrustedEndpoint, match="not in"):
        check_arena_path(str(elsewhere), str(shm))
    with pytest.raises(UntrustedEndpoint, match="not in"):
        check_arena_path(f"{shm}/../elsewhere/{elsewhere.name}", str(shm))


def test_an_arena_that_is_a_symlink_or_readable_by_others_is_refused(tmp_path: Path) -> None:
    shm = private_dir(tmp_path / "shm")
    target = arena_file(private_dir(tmp_path / "elsewhere"))
    link = shm / "shoal-link.arena"
    link.symlink_to(target)
    with pytest.raises(UntrustedEndpoint, match="not a regular file"):
        check_arena_path(str(link), str(shm))
    with pytest.raises(UntrustedEndpoint, match="mode 0644"):
        check_arena_path(str(arena_file(shm, 0o644)), str(shm))


def test_an_arena_of_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = private_dir(tmp_path / "shm")
    arena = arena_file(shm)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(arena).st_uid + 1)
    with pytest.raises(UntrustedEndpoint, match="owned by uid"):
        check_arena_path(str(arena), str(shm))
