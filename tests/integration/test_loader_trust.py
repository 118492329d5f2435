"""The loader client trusts neither a runtime directory others can write nor the segment
paths a server hands back (M6): a real gRPC server impersonating a sidecar names segments
outside shm_dir, symlinks and files of another user, and every one is refused."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("torch")

from loader.errors import SidecarUnavailable  # noqa: E402
from loader.sidecar._proto import loader_pb2 as pb  # noqa: E402
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc  # noqa: E402
from loader.sidecar.client import SidecarClient  # noqa: E402
from loader.sidecar.segment import DATA_OFFSET, HEADER, SEGMENT_MAGIC, SEGMENT_VERSION  # noqa: E402

TOKEN = b"t" * 16


class Impostor(pb_grpc.LoaderServicer):
    """Answers every Load with a table naming ``segment_path``."""

    def __init__(self) -> None:
        self.segment_path = ""

    def Load(self, request: pb.StageRequest, context: object) -> Iterator[pb.StageEvent]:
        size = os.stat(self.segment_path, follow_symlinks=True).st_size
        yield pb.StageEvent(staged=pb.Staged(
            checkpoint_id="0" * 16, segment_path=self.segment_path, segment_bytes=size,
            token=TOKEN, tensors=[pb.TensorEntry(name="w", dtype="U8", shape=[8],
                                                 offset=DATA_OFFSET, nbytes=8)],
        ))  # fmt: skip


def segment_file(path: Path) -> Path:
    header = HEADER.pack(SEGMENT_MAGIC, SEGMENT_VERSION, DATA_OFFSET, DATA_OFFSET + 8, TOKEN)
    path.write_bytes(header + bytes(DATA_OFFSET - len(header)) + b"weights!")
    path.chmod(0o600)
    return path


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[tuple[Impostor, Path, Path]]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    service = Impostor()
    server = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_LoaderServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{run / 'x.sock'}")
    server.start()
    try:
        yield service, run / "x.sock", shm
    finally:
        server.stop(0)


def test_a_segment_where_the_server_says_is_mapped_only_inside_shm_dir(
    impostor: tuple[Impostor, Path, Path], tmp_path: Path
) -> None:
    service, sock, shm = impostor
    client = SidecarClient(f"unix:{sock}", shm_dir=shm)
    service.segment_path = str(segment_file(shm / "shoal-loader-t-0000000000000000"))
    with client.load("/models/m") as loaded:  # the real thing maps
        assert bytes(loaded.tensors["w"].numpy()) == b"weights!"
    elsewhere = segment_file(tmp_path / "shoal-loader-t-1111111111111111")
    for path in (str(elsewhere), f"{shm}/../shoal-loader-t-1111111111111111",
                 str(segment_file(shm / "not-a-segment"))):  # fmt: skip
        service.segment_path = path
        with pytest.raises(SidecarUnavailable, match="not a shoal-loader"):
            client.load("/models/m")
    link = shm / "shoal-loader-t-2222222222222222"
    link.symlink_to(elsewhere)
    service.segment_path = str(link)
    with pytest.raises(Exception, match="segment"):  # O_NOFOLLOW: ELOOP
        client.load("/models/m")
    writable = segment_file(shm / "shoal-loader-t-3333333333333333")
    writable.chmod(0o666)
    service.segment_path = str(writable)
    with pytest.raises(SidecarUnavailable, match="writable by group or others"):
        client.load("/models/m")
    client.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_segment_of_another_user_is_refused(impostor: tuple[Impostor, Path, Path]) -> None:
    service, sock, shm = impostor
    theirs = segment_file(shm / "shoal-loader-t-4444444444444444")
    os.chown(theirs, 4242, 4242)
    service.segment_path = str(theirs)
    with (
        SidecarClient(f"unix:{sock}", shm_dir=shm) as client,
        pytest.raises(SidecarUnavailable, match="belongs to uid 4242"),
    ):
        client.load("/models/m")


def listening_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen()
    return sock


def test_a_runtime_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shoal-1000"
    shared.mkdir()
    shared.chmod(0o777)  # pre-created by someone, as /tmp/shoal-<uid> could be
    with listening_socket(shared / "shoal-loader-default.sock"):
        with pytest.raises(SidecarUnavailable, match="writable by group or others"):
            SidecarClient(f"unix:{shared / 'shoal-loader-default.sock'}")
        shared.chmod(0o700)
        SidecarClient(f"unix:{shared / 'shoal-loader-default.sock'}").close()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_runtime_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "shoal-0"
    theirs.mkdir(mode=0o700)
    with listening_socket(theirs / "s.sock"):
        os.chown(theirs, 4242, 4242)
        with pytest.raises(SidecarUnavailable, match="belongs to uid 4242"):
            SidecarClient(f"unix:{theirs / 's.sock'}")
        os.chown(theirs, 0, 0)
        os.chown(theirs / "s.sock", 4242, 4242)
        with pytest.raises(SidecarUnavailable, match="socket .* belongs to uid 4242"):
            SidecarClient(f"unix:{theirs / 's.sock'}")
