"""The gRPC face of the sidecar: requests in, ``Stager`` calls, replies and statuses out.

Each streaming call (``Load``, ``Prefetch``) holds one worker thread while it waits: it
takes a ``Ticket`` (starting, joining or reusing a staging), wakes every
``progress_interval_s`` to send a ``Progress`` if the staging moved, and ends with the
``Staged`` table or the staging's error as a status (``loader.sidecar.status``).

A caller that disappears: gRPC cancels its call, which runs the callback registered with
``context.add_callback`` (on *every* termination, so it is also the normal release) and
makes ``context.is_active()`` false, which ends the wait loop. The ticket's release is
idempotent; the last release of a staging that is not ready cancels it (``Stager``).

``Files`` and ``Read`` serve a whole staging's files to peer replicas
(``loader.sidecar.files``, ``loader.sources.peer``). A ``Read`` is checked in full before
its first chunk, so a refused range is a status, never a short stream; a caller that goes
away stops the stream (gRPC stops pulling chunks and closes the generator, which releases
its view of the segment).
"""

# ruff: noqa: N802  (method names are the proto's RPC names)

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from loader.errors import CapacityExceeded, LoaderError
from loader.sidecar._proto import loader_pb2 as pb
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc
from loader.sidecar.metrics import LoaderMetrics
from loader.sidecar.segment import StagedTable, StageSpec
from loader.sidecar.staging import Stager
from loader.sidecar.status import ERROR_KEY, status_for
from loader.stream import Progress
from shoal import __version__

__all__ = ["LoaderService", "progress_message", "spec_from", "staged_message"]

log = logging.getLogger("shoal." + __name__)

READ_CHUNK_BYTES = 2 << 20  # under gRPC's default 4 MiB receive limit, with room to spare
_ORIGINS = {"staged": pb.ORIGIN_STAGED, "joined": pb.ORIGIN_JOINED, "cached": pb.ORIGIN_CACHED}
_STATES = {"staging": pb.STATE_STAGING, "ready": pb.STATE_READY, "failed": pb.STATE_FAILED}


def spec_from(request: pb.StageRequest) -> StageSpec:
    return StageSpec(
        uri=request.uri, tp_rank=request.tp_rank, tp_size=max(request.tp_size, 1),
        order=request.order or "file", rate_bytes_per_s=request.rate_bytes_per_s,
        digests=dict(request.digests),
    )  # fmt: skip


def progress_message(p: Progress) -> pb.Progress:
    gbps = p.bytes_done / p.elapsed_s / 1e9 if p.elapsed_s > 0 else 0.0
    return pb.Progress(
        bytes_done=p.bytes_done, bytes_total=p.bytes_total, tensors_done=p.tensors_done,
        tensors_total=p.tensors_total, elapsed_s=p.elapsed_s, gbps=gbps,
    )  # fmt: skip


def staged_message(table: StagedTable, origin: str) -> pb.Staged:
    return pb.Staged(
        checkpoint_id=table.checkpoint_id,
        segment_path=table.segment_path,
        segment_bytes=table.segment_bytes,
        token=table.token,
        tensors=[
            pb.TensorEntry(
                name=t.name,
                dtype=t.dtype,
                shape=t.shape,
                offset=t.offset,
                nbytes=t.nbytes,
                sha256=t.sha256,
            )
            for t in table.tensors
        ],
        origin=_ORIGINS[origin],
        staging_s=table.staging_s,
    )


def _abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    code, name = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=error)
    context.set_trailing_metadata(((ERROR_KEY, name),))
    context.abort(code, str(error) or name)
    raise AssertionError("ServicerContext.abort returns only by raising")


class LoaderService(pb_grpc.LoaderServicer):
    def __init__(
        self,
        stager: Stager,
        *,
        progress_interval_s: float = 0.1,
        max_streams: int = 30,
        metrics: LoaderMetrics | None = None,
    ) -> None:
        """``max_streams``: streaming calls served at once; one more is refused with
        ``RESOURCE_EXHAUSTED`` (each holds a worker thread: ``server`` keeps threads free
        for unary calls and probes this way)."""
        self.stager = stager
        self.progress_interval_s = progress_interval_s
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        self.metrics = metrics or LoaderMetrics(stager.statistics)

    def _abort(self, context: grpc.ServicerContext, error: BaseException) -> NoReturn:
        self.metrics.error(type(error).__name__)
        _abort(context, error)

    def _stream_slot(self, context: grpc.ServicerContext) -> None:
        """Take a streaming slot, released when the call ends; refuse the call if none."""
        if not self._streams.acquire(blocking=False):
            self._abort(context, CapacityExceeded(
                f"the sidecar already serves {self.max_streams} streaming calls (Load, "
                "Prefetch, Read); retry later or raise --max-streams and --workers"
            ))  # fmt: skip
        context.add_callback(self._streams.release)

    def Load(self, request: pb.StageRequest, context: Any) -> Iterator[pb.StageEvent]:
        self._stream_slot(context)
        return self._stage(request, context, load=True)

    def Prefetch(self, request: pb.StageRequest, context: Any) -> Iterator[pb.StageEvent]:
        self._stream_slot(context)
        return self._stage(request, context, load=False)

    def _stage(
        self, request: pb.StageRequest, context: grpc.ServicerContext, *, load: bool
    ) -> Iterator[pb.StageEvent]:
        try:
            spec = spec_from(request)
            if request.detach and load:
                raise ValueError("detach is for Prefetch: a Load maps what it waits for")
        except ValueError as exc:
            self._abort(context, exc)
        ticket = self.stager.stage(spec, load=load, detach=request.detach)
        if request.detach:
            ticket.release()  # the staging goes on; List tells how it ends
            return
        context.add_callback(ticket.release)
        try:
            sent: Progress | None = None
            while True:
                over = ticket.wait(self.progress_interval_s)
                if not over and not context.is_active():
                    return  # the caller went away; its callback released the ticket
                progress = ticket.progress
                if progress is not None and progress != sent:
                    yield pb.StageEvent(progress=progress_message(progress))
                    sent = progress
                if over:
                    break
            try:
                table = ticket.result()
            except BaseException as exc:
                self._abort(context, exc)
            # Counted before the last message: a client stops reading once it has the
            # table, and gRPC then closes this generator at the yield.
            self.metrics.served("Load" if load else "Prefetch")
            yield pb.StageEvent(staged=staged_message(table, ticket.origin))
        finally:
            ticket.release()

    def List(self, request: pb.ListRequest, context: Any) -> pb.ListReply:
        return pb.ListReply(
            checkpoints=[
                pb.CheckpointInfo(
                    checkpoint_id=i.checkpoint_id,
                    uri=i.uri,
                    tp_rank=i.tp_rank,
                    tp_size=i.tp_size,
                    bytes=i.bytes,
                    state=_STATES[i.state],
                    age_s=i.age_s,
                    bytes_done=i.bytes_done,
                    num_loads=i.num_loads,
                    error=i.error,
                )
                for i in self.stager.list()
            ]
        )

    def Evict(self, request: pb.EvictRequest, context: Any) -> pb.EvictReply:
        try:
            return pb.EvictReply(bytes_freed=self.stager.evict(request.checkpoint_id))
        except LoaderError as exc:
            self._abort(context, exc)

    def Files(self, request: pb.FilesRequest, context: Any) -> pb.FilesReply:
        try:
            files = self.stager.files(request.uri)
        except (LoaderError, ValueError) as exc:
            self._abort(context, exc)
        return pb.FilesReply(
            checkpoint_id=files.checkpoint_id, token=files.token,
            files=[pb.FileInfo(path=f.path, size=f.size, identity=f.identity,
                               prefix_bytes=len(f.prefix), prefix_sha256=f.prefix_sha256)
                   for f in files.files],
            tensors=[pb.TensorDigest(name=d.name, path=d.path, offset=d.offset,
                                     nbytes=d.nbytes, sha256=d.sha256) for d in files.digests],
        )  # fmt: skip

    def Read(self, request: pb.ReadRequest, context: Any) -> Iterator[pb.ReadChunk]:
        self._stream_slot(context)
        try:
            chunks = self.stager.read_file(
                request.uri, request.path, request.offset, request.length,
                token=request.token, chunk_bytes=READ_CHUNK_BYTES,
            )  # fmt: skip
        except (LoaderError, ValueError) as exc:
            self._abort(context, exc)
        sent = 0
        for data in chunks:
            yield pb.ReadChunk(data=data)
            sent += len(data)
        self.metrics.served("Read", sent)

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        stats = self.stager.statistics()
        return pb.HealthReply(
            serving=True, staged_bytes=stats.staged_bytes, staging_bytes=stats.staging_bytes,
            capacity_bytes=stats.capacity_bytes, num_checkpoints=stats.num_checkpoints,
            num_stagings=stats.num_stagings, version=__version__, pid=os.getpid(),
        )  # fmt: skip
