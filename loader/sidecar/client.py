"""The engine's side of the sidecar: ask it to stage a checkpoint, then map the staged
tensors straight from shared memory.

``SidecarClient.load(uri)`` streams the sidecar's progress, receives the tensor table and
maps the segment:

1. The file is opened read-only and mapped ``MAP_PRIVATE`` (copy-on-write): reading costs
   no copy (the pages are the sidecar's tmpfs pages), and an engine that writes into a
   tensor gets a private page instead of corrupting what other engines map. Rejected:
   ``MAP_SHARED`` read-write (one buggy engine could change every engine's weights) and
   read-only mappings (``torch.frombuffer`` warns on them, and in-place ops would crash).
2. The segment's header token must equal the one in the reply (``staging`` point 3).
3. Tensors are ``torch.frombuffer`` views of the mapping: zero-copy on the host; they keep
   the mapping alive, so an ``Evict`` (which only unlinks the name) never invalidates them.
4. With ``device="cuda..."`` each tensor is copied to the GPU. The mapping is first
   page-locked in place (``cudaHostRegister``, read-only where the driver supports it) so
   the copies are DMA from the shared pages with ``non_blocking=True``, no pinned bounce
   copy; if registering fails, ``to(device)`` from pageable memory (CUDA stages it).

Trust (M6): before dialling a Unix socket the client checks that the socket's directory
belongs to this user and is not group/world-writable, and that the socket does too: on a
host without ``XDG_RUNTIME_DIR`` the runtime directory is under ``/tmp``, where another
local user could have pre-created it to impersonate the sidecar. A segment path the reply
names must be a ``shoal-loader-*`` file directly in the expected ``shm_dir``, a regular file
(not a symlink: ``O_NOFOLLOW``) owned by this user and not writable by others; anything
else is refused with ``SidecarUnavailable`` naming the path and what is wrong with it.

``files(uri)`` and ``read_into(...)`` read a whole staging's files, as a peer replica does
(``loader.sources.peer``): each chunk of the stream is copied once, into the caller's buffer.

Every ``grpc.RpcError`` is translated once, here, into the loader error the sidecar raised
(``loader.sidecar.status``); a sidecar that cannot be reached is ``SidecarUnavailable``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any

import grpc

from loader.errors import IntegrityError, LoaderError, SidecarUnavailable, SourceError
from loader.sidecar._proto import loader_pb2 as pb
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc
from loader.sidecar.segment import (
    StagedTable,
    StagedTensor,
    StageSpec,
    StagingInfo,
    read_segment_header,
)
from loader.sidecar.status import error_from_rpc
from loader.sources.base import ObjectInfo

if TYPE_CHECKING:  # torch only where tensors are made: `shoal loader list` starts fast
    import torch

    from loader.stream import Progress

__all__ = [
    "LoadedCheckpoint",
    "PeerFiles",
    "SidecarClient",
    "SidecarHealth",
    "StageResult",
    "check_socket_trust",
]

log = logging.getLogger("shoal." + __name__)

_ORIGINS = {pb.ORIGIN_STAGED: "staged", pb.ORIGIN_JOINED: "joined", pb.ORIGIN_CACHED: "cached"}
_STATES = {pb.STATE_STAGING: "staging", pb.STATE_READY: "ready", pb.STATE_FAILED: "failed"}
_CUDA_HOST_REGISTER_READ_ONLY = 0x08
DEFAULT_SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shoal-loader-"  # LoaderConfig.segment_prefix() without the name


@dataclass(frozen=True, slots=True)
class StageResult:
    table: StagedTable
    origin: str  # "staged" (this call staged it), "joined" or "cached"


@dataclass(frozen=True, slots=True)
class PeerFiles:
    """The files of a checkpoint a sidecar staged whole (``Files``), with the digests the
    sidecar computed while staging (M5)."""

    checkpoint_id: str
    token: bytes  # pass it to read_into: reads fail once the checkpoint is staged again
    files: tuple[ObjectInfo, ...]
    # path -> (prefix bytes, hex SHA-256 of bytes [0, prefix bytes) of the file)
    prefixes: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    # (path, file offset, nbytes) -> (tensor name, hex SHA-256 of those bytes)
    tensors: Mapping[tuple[str, int, int], tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SidecarHealth:
    serving: bool
    staged_bytes: int
    staging_bytes: int
    capacity_bytes: int
    num_checkpoints: int
    num_stagings: int
    version: str
    pid: int


class LoadedCheckpoint:
    """A staged checkpoint mapped into this process. ``tensors`` are zero-copy views of the
    mapping (or device copies); ``close()`` drops this object's references."""

    def __init__(
        self, result: StageResult, device: str | torch.device = "cpu", *,
        shm_dir: str | Path = DEFAULT_SHM_DIR, verify: bool = False,
    ) -> None:  # fmt: skip
        import torch

        self.table = result.table
        self.origin = result.origin
        self._mapping = _map_segment(self.table, Path(shm_dir))
        self._bytes: torch.Tensor | None = torch.frombuffer(self._mapping, dtype=torch.uint8)
        if verify:
            _verify(self.table, self._bytes)
        host = {t.name: _view(self._bytes, t) for t in self.table.tensors}
        self.host_tensors: dict[str, torch.Tensor] = host
        target = torch.device(device)
        self.tensors = host if target.type == "cpu" else _to_device(host, self._bytes, target)

    @property
    def checkpoint_id(self) -> str:
        return self.table.checkpoint_id

    @property
    def address_range(self) -> tuple[int, int]:
        """[start, end) of the mapping in this process (tensors on the host lie inside)."""
        assert self._bytes is not None, "closed"
        start = self._bytes.data_ptr()
        return start, start + self.table.segment_bytes

    def close(self) -> None:
        self.tensors = {}
        self.host_tensors = {}
        self._bytes = None
        with contextlib.suppress(BufferError):  # tensors still held keep the mapping alive
            self._mapping.close()

    def __enter__(self) -> LoadedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _map_segment(table: StagedTable, shm_dir: Path) -> mmap.mmap:
    path = table.segment_path
    where = os.path.realpath(os.path.dirname(path)) if os.path.isabs(path) else ""
    if where != os.path.realpath(shm_dir) or not os.path.basename(path).startswith(SEGMENT_PREFIX):
        raise SidecarUnavailable(
            f"the sidecar named segment {path!r}, which is not a {SEGMENT_PREFIX}* file in "
            f"{shm_dir}: refusing to map it (a sidecar of another configuration, or not one)"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise LoaderError(f"cannot open staged segment {path}: {exc.strerror}") from None
    try:
        stat = os.fstat(fd)
        _check_owned(path, stat, "segment")
        if not S_ISREG(stat.st_mode):
            raise SidecarUnavailable(f"segment {path} is not a regular file: refusing it")
        size = stat.st_size
        if size != table.segment_bytes:
            raise LoaderError(f"{path}: {size} bytes, the sidecar announced {table.segment_bytes}")
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        _, token = read_segment_header(mapping[:64])
    except ValueError as exc:
        mapping.close()
        raise LoaderError(f"{path}: {exc}") from None
    if token != table.token:
        mapping.close()
        raise LoaderError(f"{path} was re-staged since the sidecar answered; load again")
    return mapping


def _verify(table: StagedTable, data: torch.Tensor) -> None:
    """``IntegrityError`` naming the first tensor whose mapped bytes do not hash to the
    digest the sidecar computed while staging (M5)."""
    for entry in table.tensors:
        if not entry.sha256:
            continue
        raw = data[entry.offset : entry.offset + entry.nbytes].numpy()
        actual = hashlib.sha256(memoryview(raw)).hexdigest()  # type: ignore[arg-type]
        if actual != entry.sha256:
            raise IntegrityError(
                f"{entry.name}: the staged bytes in {table.segment_path} hash to {actual}, "
                f"the sidecar staged {entry.sha256}"
            )


def _view(data: torch.Tensor, entry: StagedTensor) -> torch.Tensor:
    import torch

    from loader.plan import DTYPES

    dtype = DTYPES.get(entry.dtype)
    if dtype is None:
        raise LoaderError(f"{entry.name}: the sidecar sent unknown dtype {entry.dtype!r}")
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return data[entry.offset : entry.offset + entry.nbytes].view(dtype).view(entry.shape)


def _to_device(
    host: Mapping[str, torch.Tensor], data: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    import torch

    registered = False
    if device.type == "cuda":
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        for flags in (_CUDA_HOST_REGISTER_READ_ONLY, 0):
            if int(cudart.cudaHostRegister(data.data_ptr(), data.numel(), flags)) == 0:
                registered = True
                break
        if not registered:
            log.info("cannot page-lock the segment; copying from pageable memory")
    try:
        out = {name: t.to(device, non_blocking=registered) for name, t in host.items()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(data.data_ptr())  # type: ignore[no-untyped-call]
    return out


def _check_owned(path: str | Path, stat: os.stat_result, what: str) -> None:
    """``SidecarUnavailable`` unless ``stat`` is this user's and not group/world-writable."""
    if stat.st_uid != os.getuid():
        raise SidecarUnavailable(
            f"{what} {path} belongs to uid {stat.st_uid}, not to this user ({os.getuid()}): "
            "refusing a sidecar another user may control"
        )
    if stat.st_mode & 0o022:
        raise SidecarUnavailable(
            f"{what} {path} is writable by group or others (mode {stat.st_mode & 0o777:o}): "
            "refusing it; the sidecar's runtime directory must be 0700"
        )


def check_socket_trust(socket_path: str | Path) -> None:
    """M6: the socket's directory and the socket are this user's and not writable by
    others; a socket that does not exist is left to the call to report."""
    path = Path(socket_path)
    try:
        directory = os.stat(path.parent)
    except FileNotFoundError:
        return
    _check_owned(path.parent, directory, "the socket's directory")
    try:
        sock = os.lstat(path)
    except FileNotFoundError:
        return
    _check_owned(path, sock, "socket")


class SidecarClient:
    """Calls to one sidecar: ``target`` is ``unix:/path`` or ``host:port`` (with ``tls_ca``,
    the PEM bundle that verifies the sidecar, for TLS; and ``tls_cert`` + ``tls_key``, the
    client's own certificate, for a sidecar that requires one)."""

    def __init__(
        self,
        target: str,
        *,
        tls_ca: str | bytes | None = None,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        timeout_s: float = 10.0,
        shm_dir: str | Path = DEFAULT_SHM_DIR,
        keepalive_time_s: float = 30.0,
        keepalive_timeout_s: float = 10.0,
    ) -> None:
        """``shm_dir``: where the sidecar's segments must lie (its ``--shm-dir``). HTTP/2
        keepalive pings every ``keepalive_time_s`` notice a sidecar that vanished without
        closing the connection (a streaming call would otherwise wait forever)."""
        from loader.sidecar.config import keepalive_options

        self.target = target
        self.timeout_s = timeout_s
        self.shm_dir = Path(shm_dir)
        if target.startswith("unix:"):
            check_socket_trust(target.removeprefix("unix:").removeprefix("//"))
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("a client certificate and its key go together")
        if tls_cert and not tls_ca:
            raise ValueError("a client certificate is for TLS: give tls_ca too")
        if not tls_ca and not target.startswith("unix:") and not _loopback_target(target):
            raise ValueError(
                f"{target} is another host: a sidecar there is reached over TLS only (its "
                "weights and tables would otherwise travel unauthenticated); give tls_ca"
            )
        credentials = None
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca),
                private_key=_pem(tls_key) if tls_key else None,
                certificate_chain=_pem(tls_cert) if tls_cert else None,
            )
        options = keepalive_options(keepalive_time_s, keepalive_timeout_s)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.LoaderStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- staging --------------------------------------------------------------------------

    def prefetch(
        self, uri: str, *, on_progress: Callable[[Progress], None] | None = None, **spec: Any
    ) -> StageResult:
        """Stage ``uri`` in the sidecar (``spec``: tp_rank, tp_size, order,
        rate_bytes_per_s, digests) and return its table without mapping it."""
        return self._stage(self._stub.Prefetch, uri, spec, on_progress)

    def prefetch_detached(self, uri: str, **spec: Any) -> str:
        """Start staging ``uri`` (or find it staging or staged) and return its checkpoint
        id at once: the staging goes on with nobody waiting. ``list()`` shows how it ends
        (state "ready", or "failed" with the error); ``evict(id)`` cancels it."""
        checked = _spec(uri, spec)
        for _ in self._events(self._stub.Prefetch(self._request(checked, detach=True))):
            pass
        return checked.checkpoint_id

    def load(
        self,
        uri: str,
        *,
        device: str | torch.device = "cpu",
        on_progress: Callable[[Progress], None] | None = None,
        verify: bool = False,
        **spec: Any,
    ) -> LoadedCheckpoint:
        """Stage ``uri`` if needed and map it: tensors zero-copy on the host, or copied to
        ``device``. ``verify`` hashes every mapped tensor against the SHA-256 the sidecar
        computed while staging (off by default: the segment is this user's, 0600, on this
        host, and hashing costs about a second per GB on every engine)."""
        result = self._stage(self._stub.Load, uri, spec, on_progress)
        return LoadedCheckpoint(result, device, shm_dir=self.shm_dir, verify=verify)

    def _stage(
        self,
        method: Any,
        uri: str,
        spec: Mapping[str, Any],
        on_progress: Callable[[Progress], None] | None,
    ) -> StageResult:
        call = method(self._request(_spec(uri, spec)))
        try:
            for event in self._events(call):
                if event.HasField("progress") and on_progress is not None:
                    from loader.stream import Progress

                    p = event.progress
                    on_progress(Progress(p.bytes_done, p.bytes_total, p.tensors_done,
                                         p.tensors_total, p.elapsed_s))  # fmt: skip
                elif event.HasField("staged"):
                    return _result(event.staged)
        except BaseException:
            call.cancel()  # e.g. Ctrl-C: the sidecar stops staging if no one else waits
            raise
        raise LoaderError(f"loader sidecar at {self.target} ended the call without a table")

    @staticmethod
    def _request(spec: StageSpec, *, detach: bool = False) -> pb.StageRequest:
        return pb.StageRequest(
            uri=spec.uri, tp_rank=spec.tp_rank, tp_size=spec.tp_size, order=spec.order,
            rate_bytes_per_s=spec.rate_bytes_per_s, digests=dict(spec.digests), detach=detach,
        )  # fmt: skip

    def _events(self, call: Any) -> Iterator[pb.StageEvent]:
        try:
            yield from call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from None

    # -- files of a staged checkpoint (peers) -----------------------------------------------

    def files(self, uri: str) -> PeerFiles:
        """The files of ``uri`` as the sidecar staged it whole: ``UnknownCheckpoint`` if it
        holds none, ``SourceUnavailable`` while staging, ``StagingConflict`` if sliced."""
        reply = self._unary(self._stub.Files, pb.FilesRequest(uri=uri))
        return PeerFiles(
            reply.checkpoint_id, bytes(reply.token),
            tuple(ObjectInfo(f.path, f.size, f.identity) for f in reply.files),
            {f.path: (f.prefix_bytes, f.prefix_sha256) for f in reply.files if f.prefix_sha256},
            {(t.path, t.offset, t.nbytes): (t.name, t.sha256) for t in reply.tensors},
        )  # fmt: skip

    def read_into(
        self, uri: str, path: str, offset: int, buffer: memoryview | Sequence[memoryview], *,
        token: bytes = b"", timeout_s: float | None = None,
    ) -> None:  # fmt: skip
        """Fill ``buffer`` (or several, in turn) with the bytes from ``offset`` on of file
        ``path`` of the staged ``uri``, in one call, within ``timeout_s`` (default: the
        client's)."""
        buffers = [buffer] if isinstance(buffer, memoryview) else [b for b in buffer if len(b)]
        total = sum(len(b) for b in buffers)
        request = pb.ReadRequest(uri=uri, path=path, offset=offset, length=total, token=token)
        call = self._stub.Read(request, timeout=timeout_s or self.timeout_s)
        done = 0
        index = at = 0  # where the next byte goes: buffers[index][at]
        try:
            for chunk in call:
                data = memoryview(chunk.data)
                if done + len(data) > total:
                    raise SourceError(
                        f"loader sidecar at {self.target} sent more than the {total} "
                        f"bytes asked of {path} at {offset}"
                    )
                done += len(data)
                while data:
                    target = buffers[index]
                    take = min(len(target) - at, len(data))
                    target[at : at + take] = data[:take]
                    data = data[take:]
                    at += take
                    if at == len(target):
                        index, at = index + 1, 0
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops it if we failed midway
        if done != total:
            raise SourceError(
                f"loader sidecar at {self.target} ended {path} at {offset + done}, "
                f"short of {offset + total}"
            )

    # -- inspection -----------------------------------------------------------------------

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.target) from None

    def list(self) -> list[StagingInfo]:
        reply = self._unary(self._stub.List, pb.ListRequest())
        return [
            StagingInfo(
                c.checkpoint_id,
                c.uri,
                c.tp_rank,
                c.tp_size,
                c.bytes,
                _STATES.get(c.state, "staging"),  # type: ignore[arg-type]
                c.age_s,
                c.bytes_done,
                c.num_loads,
                c.error,
            )
            for c in reply.checkpoints
        ]

    def evict(self, checkpoint_id: str) -> int:
        """Bytes freed; ``UnknownCheckpoint`` if there is no such checkpoint."""
        return int(self._unary(self._stub.Evict, pb.EvictRequest(checkpoint_id=checkpoint_id))
                   .bytes_freed)  # fmt: skip

    def health(self) -> SidecarHealth:
        r = self._unary(self._stub.Health, pb.HealthRequest())
        return SidecarHealth(
            r.serving, r.staged_bytes, r.staging_bytes, r.capacity_bytes, r.num_checkpoints,
            r.num_stagings, r.version, r.pid,
        )  # fmt: skip


def _result(staged: pb.Staged) -> StageResult:
    table = StagedTable(
        staged.checkpoint_id, staged.segment_path, staged.segment_bytes, bytes(staged.token),
        tuple(StagedTensor(t.name, t.dtype, tuple(t.shape), t.offset, t.nbytes, t.sha256)
              for t in staged.tensors),
        staged.staging_s,
    )  # fmt: skip
    return StageResult(table, _ORIGINS.get(staged.origin, "staged"))


def _spec(uri: str, spec: Mapping[str, Any]) -> StageSpec:
    """What a staging call asks for; bad arguments fail here, before any call. A local path
    is made absolute: the sidecar does not share our working directory."""
    return StageSpec(uri if "://" in uri else os.path.abspath(uri), **spec)


def _loopback_target(target: str) -> bool:
    """Whether a ``host:port`` gRPC target (``[v6]:port`` too) is this host."""
    from loader.sidecar.config import is_loopback

    host = target.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:")
    return is_loopback(host.rpartition(":")[0] or host)


def _pem(value: str | bytes) -> bytes:
    """PEM bytes given, or read from the file named."""
    return value if isinstance(value, bytes) else Path(value).read_bytes()
