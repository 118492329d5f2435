"""Anchors for the KV-cache benchmark: the physical limits and two published caches.

Everything here measures in the calling process, on this machine, with the blocks and
the thread count the caller gives, so that ``bench/kvcache.py`` can put Shoal next to:

* ``memcpy_gbps``: torch and numpy copies between preallocated, pre-touched buffers,
  block by block (the most any in-process cache can do per block);
* ``shm_crossprocess_gbps``: a POSIX shared-memory segment written block by block in this
  process and read block by block in another one (the most a cache behind a process
  boundary can do);
* ``aibrix_gbps``: aibrix-kvcache's ``BaseKVCacheManager`` with only its L1 (CPU) cache,
  driven the way aibrix's own vLLM connector drives it;
* ``lmcache_gbps``: LMCache's ``LMCacheEngine`` with only its local CPU backend and a
  ``MockGPUConnector`` subclass whose copies are real torch copies;
* ``checksum_gbps``: xxh3_64, xxh3_128 and zlib.crc32 over buffers cold in DRAM and hot
  in cache (the cache checksums every block).

Units: GB/s are decimal (1e9 bytes per second) of payload, i.e. the bytes of the blocks
moved, not read+write traffic. Each figure is the median of ``repeat`` timed runs that
follow one untimed warm-up run, timed with ``time.perf_counter`` around only the calls
being measured (data is prepared beforehand, checks run outside the timed loops).

Threads: ``torch.set_num_threads(threads)`` for the whole measurement (restored after).
For the anchors that is the only parallelism: one caller thread, as an engine's worker
calls its connector, with torch's intra-op threads splitting each large copy (torch only
splits a copy above ~32K elements, so small blocks stay on one core). ``memcpy_gbps``
additionally reports copies split across ``threads`` Python threads (numpy and torch both
release the GIL while copying) and gives the better figure as ``best``.

Block shape: a 7B-class model (32 layers, 8 KV heads, head dim 128, bf16; K+V of one
token over all layers is 128 KiB, over one layer 4 KiB). A block of ``block_bytes`` is
``tokens`` tokens of ``layers`` consecutive layers, see ``block_shape``: vLLM's 16-token
block cut into layer groups below 2 MiB, and longer blocks of all 32 layers above it:

    64 KiB = 16 tokens x  1 layer     1 MiB = 16 tokens x 16 layers
   256 KiB = 16 tokens x  4 layers    2 MiB = 16 tokens x 32 layers
                                      4 MiB = 32 tokens x 32 layers

A "sequence" is ``seq_blocks`` consecutive blocks (64 unless told) of one prompt;
``*_block`` figures make one cache call per block (prefix = the blocks before it),
``*_seq`` figures one call per sequence. Different sequences have different tokens.

Importing this module has no side effects and imports neither aibrix nor LMCache; each
function imports what it needs and returns ``{"error": "..."}`` instead of raising.
Run ``python bench/anchors.py --quick`` for a table of all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

NUM_LAYERS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
DTYPE_BYTES = 2  # bf16
TOKEN_LAYER_BYTES = 2 * NUM_KV_HEADS * HEAD_DIM * DTYPE_BYTES  # K+V of 1 token, 1 layer: 4 KiB
BASE_BLOCK_TOKENS = 16  # vLLM's default block size
DEFAULT_SEQ_BLOCKS = 64

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

INSTALL_HINT = "run bench/install_anchors.sh"


# --------------------------------------------------------------------------- helpers


def block_shape(block_bytes: int) -> tuple[int, int]:
    """(layers, tokens) of a block of ``block_bytes`` for the 7B-class shape above.

    Up to 2 MiB: 16 tokens over ``block_bytes / 64 KiB`` layers; above: all 32 layers
    (or the largest layer count <= 32 that divides evenly) over more tokens.
    """
    unit = BASE_BLOCK_TOKENS * TOKEN_LAYER_BYTES  # 64 KiB: 16 tokens of one layer
    if block_bytes <= 0 or block_bytes % unit:
        raise ValueError(f"block_bytes must be a positive multiple of {unit} (64 KiB)")
    units = block_bytes // unit
    if units <= NUM_LAYERS:
        return units, BASE_BLOCK_TOKENS
    layers = max(d for d in range(1, NUM_LAYERS + 1) if units % d == 0)
    return layers, BASE_BLOCK_TOKENS * units // layers


def _gbps(nbytes: int, seconds: Sequence[float]) -> float:
    return round(nbytes / statistics.median(seconds) / 1e9, 3)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fill(t: Any) -> None:
    """Fill a tensor with a cheap, position-unique pattern (also pre-touches it)."""
    import torch

    flat = t.view(-1).view(torch.uint8)
    words = flat[: flat.numel() // 8 * 8].view(torch.int64)
    torch.arange(words.numel(), out=words)
    words.mul_(0x9E3779B97F4A7C15 - (1 << 64))  # spread bits over every byte


def _same_bytes(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _error(exc: BaseException, hint: str = INSTALL_HINT) -> dict[str, Any]:
    if isinstance(exc, ImportError):
        return {"error": f"not installed ({exc}); {hint}"}
    return {"error": f"{type(exc).__name__}: {exc}"}


def _layout(block_bytes: int, num_blocks: int, seq_blocks: int) -> tuple[int, int, int]:
    """(layers, tokens, seq_blocks) with seq_blocks clipped to a divisor of num_blocks."""
    layers, tokens = block_shape(block_bytes)
    seq_blocks = max(1, min(seq_blocks, num_blocks))
    while num_blocks % seq_blocks:
        seq_blocks -= 1
    return layers, tokens, seq_blocks


# --------------------------------------------------------------------------- memcpy


def memcpy_gbps(block_bytes: int, num_blocks: int, threads: int, repeat: int = 5) -> dict[str, Any]:
    """Copy bandwidth of ``num_blocks`` blocks of ``block_bytes``, one copy call per block.

    Keys (GB/s): ``torch`` (one caller, ``torch.set_num_threads(threads)`` intra-op
    threads), ``numpy`` (``np.copyto``; with threads > 1 the blocks are split across
    ``threads`` Python threads), ``torch_split`` (threads > 1 only: blocks split across
    Python threads, one intra-op thread each), ``best`` (the largest of those).
    """
    try:
        import numpy as np
        import torch

        total = block_bytes * num_blocks
        src = torch.empty(total, dtype=torch.uint8)
        dst = torch.empty(total, dtype=torch.uint8)
        _fill(src)
        dst.fill_(0)
        sblk = list(src.view(num_blocks, block_bytes))
        dblk = list(dst.view(num_blocks, block_bytes))
        nsrc, ndst = src.numpy(), dst.numpy()
        nsblk = [nsrc[i * block_bytes : (i + 1) * block_bytes] for i in range(num_blocks)]
        ndblk = [ndst[i * block_bytes : (i + 1) * block_bytes] for i in range(num_blocks)]
        parts = [range(k, num_blocks, threads) for k in range(threads)]

        def torch_one() -> None:
            for s, d in zip(sblk, dblk, strict=True):
                d.copy_(s)

        def numpy_part(idx: range) -> None:
            for i in idx:
                np.copyto(ndblk[i], nsblk[i])

        def torch_part(idx: range) -> None:
            for i in idx:
                dblk[i].copy_(sblk[i])

        out: dict[str, Any] = {
            "block_bytes": block_bytes,
            "num_blocks": num_blocks,
            "threads": threads,
        }
        with ThreadPoolExecutor(max_workers=threads) as pool:

            def split(fn: Callable[[range], None]) -> Callable[[], None]:
                if threads == 1:
                    return lambda: fn(parts[0])
                return lambda: [f.result() for f in [pool.submit(fn, p) for p in parts]]

            variants: dict[str, tuple[Callable[[], None], int]] = {
                "torch": (torch_one, threads),
                "numpy": (split(numpy_part), 1),
            }
            if threads > 1:
                variants["torch_split"] = (split(torch_part), 1)
            for name, (fn, torch_threads) in variants.items():
                with _torch_threads(torch_threads):
                    fn()  # warm-up
                    times = [_timed(fn) for _ in range(repeat)]
                out[name] = _gbps(total, times)
                if not np.array_equal(ndst, nsrc):
                    return {"error": f"memcpy variant {name} copied wrong bytes"}
                dst.fill_(0)
        out["best"] = max(out[k] for k in variants)
        return out
    except Exception as exc:
        return _error(exc, "install Shoal's own dependencies")


# --------------------------------------------------------------------------- shm

_SHM_READER = r"""
import mmap, os, sys, time
import numpy as np
path, block, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
mm = mmap.mmap(fd, block * n, prot=mmap.PROT_READ)
os.close(fd)
src = np.frombuffer(mm, dtype=np.uint8)
dst = np.ones(block * n, dtype=np.uint8)  # private, pre-touched
sb = [src[i * block:(i + 1) * block] for i in range(n)]
db = [dst[i * block:(i + 1) * block] for i in range(n)]
print("ready", flush=True)
for line in sys.stdin:
    if line.strip() != "read":
        break
    t0 = time.perf_counter()
    for s, d in zip(sb, db):
        np.copyto(d, s)
    dt = time.perf_counter() - t0
    print(f"{dt!r} {int(dst[::4096].astype(np.uint64).sum())}", flush=True)
"""


def _shm_rounds(shm: Any, block_bytes: int, num_blocks: int, repeat: int) -> Any:
    """Write/read rounds over ``shm``; (write times, read times) or an error string."""
    import numpy as np

    total = block_bytes * num_blocks
    seg = np.ndarray((total,), dtype=np.uint8, buffer=shm.buf)
    seg.fill(0)  # pre-touch the segment
    src = np.empty(total, dtype=np.uint8)
    src.view(np.uint64)[:] = np.arange(total // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    sb = [src[i * block_bytes : (i + 1) * block_bytes] for i in range(num_blocks)]
    gb = [seg[i * block_bytes : (i + 1) * block_bytes] for i in range(num_blocks)]
    expect = int(src[::4096].astype(np.uint64).sum())
    args = [f"/dev/shm/{shm.name.lstrip('/')}", str(block_bytes), str(num_blocks)]
    with subprocess.Popen(
        [sys.executable, "-c", _SHM_READER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            if proc.stdout.readline().strip() != "ready":
                return "shm reader process did not start"
            wtimes: list[float] = []
            rtimes: list[float] = []
            for it in range(repeat + 1):
                t0 = time.perf_counter()
                for s, g in zip(sb, gb, strict=True):
                    np.copyto(g, s)
                wt = time.perf_counter() - t0
                proc.stdin.write("read\n")
                proc.stdin.flush()
                rt_s, checksum = proc.stdout.readline().split()
                if int(checksum) != expect:
                    return "shm reader saw wrong bytes"
                if it:  # the first round is the warm-up
                    wtimes.append(wt)
                    rtimes.append(float(rt_s))
            proc.stdin.close()
            proc.wait(timeout=30)
            return wtimes, rtimes
        finally:
            if proc.poll() is None:
                proc.kill()


def shm_crossprocess_gbps(block_bytes: int, num_blocks: int, repeat: int = 5) -> dict[str, Any]:
    """POSIX shared memory: this process writes the blocks, another process reads them.

    One thread each, ``np.copyto`` per block between private pre-touched buffers and a
    pre-touched ``/dev/shm`` segment. Keys (GB/s): ``write`` (here), ``read`` (in the
    reader process), ``end_to_end`` (bytes / (write time + read time), i.e. the two
    copies a cache behind a process boundary needs, back to back, no protocol).
    """
    try:
        from multiprocessing import shared_memory

        total = block_bytes * num_blocks
        shm = shared_memory.SharedMemory(create=True, size=total)
        try:
            res = _shm_rounds(shm, block_bytes, num_blocks, repeat)
        finally:
            shm.close()
            shm.unlink()
        if isinstance(res, str):
            return {"error": res}
        wtimes, rtimes = res
        e2e = [w + r for w, r in zip(wtimes, rtimes, strict=True)]
        return {
            "block_bytes": block_bytes,
            "num_blocks": num_blocks,
            "write": _gbps(total, wtimes),
            "read": _gbps(total, rtimes),
            "end_to_end": _gbps(total, e2e),
        }
    except Exception as exc:
        return _error(exc, "install Shoal's own dependencies")


# --------------------------------------------------------------------------- anchors


@dataclass
class AnchorSession:
    """One anchor set up for one block size: its four timed phases, a check and a reset.

    ``round`` times put_block, get_block, (verify, clear), put_seq, get_seq, (verify,
    clear) once. ``_measure_anchor`` runs rounds back to back for the ``*_gbps``
    functions; ``bench/anchor_server.py`` runs one round per request so that
    ``bench/kvcache.py`` can interleave the anchors with its own rounds.
    """

    total_bytes: int
    phases: dict[str, Callable[[], None]]
    verify: Callable[[], bool]
    clear: Callable[[], None]
    info: dict[str, Any]

    def round(self, check: bool = True) -> dict[str, float]:
        """Seconds of each phase; with ``check``, the bytes got back are compared."""
        times: dict[str, float] = {}
        for mode in ("block", "seq"):
            times[f"put_{mode}"] = _timed(self.phases[f"put_{mode}"])
            times[f"get_{mode}"] = _timed(self.phases[f"get_{mode}"])
            if check and not self.verify():
                raise RuntimeError(f"get_{mode} returned different bytes than were put")
            self.clear()
        return times


def _measure_anchor(session: AnchorSession, repeat: int) -> dict[str, float]:
    """1 warm-up round + ``repeat`` timed rounds; GB/s of the median round per phase."""
    times: dict[str, list[float]] = {k: [] for k in session.phases}
    for it in range(repeat + 1):
        for phase, seconds in session.round(check=it in (0, repeat)).items():
            if it:
                times[phase].append(seconds)
    return {k: _gbps(session.total_bytes, v) for k, v in times.items()}


@contextlib.contextmanager
def aibrix_session(
    block_bytes: int,
    num_blocks: int,
    threads: int,
    seq_blocks: int = DEFAULT_SEQ_BLOCKS,
) -> Iterator[AnchorSession]:
    """aibrix-kvcache ``BaseKVCacheManager``, L1 (CPU) cache only, no L2, no meta service.

    Driven like aibrix's vLLM offloading connector: put = ``allocate_for(prefix, query)``,
    copy the engine's block into ``handle.to_tensors()``, ``put(prefix, query, handle)``;
    get = ``acquire(prefix, query)``, copy ``handle.to_tensors()`` into the engine's
    block, ``handle.release()``. Keys are ``TokenListView`` tokens (aibrix hashes
    prefix + block tokens), layout LCND, L1 sized to hold every block. Keys put_block,
    get_block, put_seq, get_seq in GB/s.
    """
    mgr = None
    try:
        import asyncio

        layers, tokens, seq_blocks = _layout(block_bytes, num_blocks, seq_blocks)
        capacity_gb = math.ceil((block_bytes * num_blocks * 1.1 + 64 * MiB) / GiB)
        policy = asyncio.get_event_loop_policy()
        try:  # aibrix installs uvloop's policy on import; keep the process's own
            import aibrix_kvcache.cache_manager as cm
            import torch
            from aibrix_kvcache import BaseKVCacheManager, KVCacheConfig, TokenListView
            from aibrix_kvcache.spec import (
                KVCacheBlockLayout,
                KVCacheBlockSpec,
                KVCacheTensorSpec,
                ModelSpec,
            )
        finally:
            asyncio.set_event_loop_policy(policy)

        spec = KVCacheBlockSpec(
            block_ntokens=tokens,
            block_dtype=torch.bfloat16,
            block_layout=KVCacheBlockLayout.LCND,
            tensor_spec=KVCacheTensorSpec(
                heads=list(range(NUM_KV_HEADS)), layers=list(range(layers)), head_size=HEAD_DIM
            ),
        )
        if spec.block_nbytes != block_bytes:
            raise ValueError(f"aibrix block is {spec.block_nbytes} bytes, not {block_bytes}")
        nseq = num_blocks // seq_blocks
        seq_tokens = seq_blocks * tokens

        with (
            _torch_threads(threads),
            _env(
                AIBRIX_KV_CACHE_OL_L1_CACHE_ENABLED="1",
                AIBRIX_KV_CACHE_OL_L1_CACHE_CAPACITY_GB=str(capacity_gb),
                AIBRIX_KV_CACHE_OL_L2_CACHE_BACKEND="",
                AIBRIX_KV_CACHE_OL_META_SERVICE_BACKEND="",
                AIBRIX_KV_CACHE_OL_DEVICE="cpu",
                AIBRIX_KV_CACHE_OL_BLOCK_SIZE="-1",
            ),
        ):
            old_pin = cm.TESTING_DISABLE_PIN_MEMORY
            # pin_memory needs an accelerator; on a CPU-only build the slabs stay pageable
            cm.TESTING_DISABLE_PIN_MEMORY = not torch.cuda.is_available()
            try:
                mgr = BaseKVCacheManager(
                    KVCacheConfig(block_spec=spec, model_spec=ModelSpec(max_model_len=seq_tokens))
                )
            finally:
                cm.TESTING_DISABLE_PIN_MEMORY = old_pin
            for slab in mgr._allocator.slabs:  # pre-touch the pool, as a warm cache has it
                slab.zero_()

            src = torch.empty((num_blocks, *spec.block_shape), dtype=torch.bfloat16)
            dst = torch.zeros_like(src)
            _fill(src)
            seqs = []
            for s in range(nseq):
                toks = TokenListView(list(range(s * 1_000_000, s * 1_000_000 + seq_tokens)))
                blocks = [
                    (
                        toks[: i * tokens] if i else None,
                        toks[i * tokens : (i + 1) * tokens],
                        src[s * seq_blocks + i],
                        dst[s * seq_blocks + i],
                    )
                    for i in range(seq_blocks)
                ]
                seqs.append(
                    (
                        toks,
                        blocks,
                        src[s * seq_blocks : (s + 1) * seq_blocks],
                        dst[s * seq_blocks : (s + 1) * seq_blocks],
                    )
                )

            def put_block() -> None:
                for _, blocks, _, _ in seqs:
                    for prefix, query, s_blk, _ in blocks:
                        handle = mgr.allocate_for(prefix, query).get()
                        handle.to_tensors()[0].copy_(s_blk)
                        st = mgr.put(prefix, query, handle)
                        if not st.is_ok():
                            raise RuntimeError(f"aibrix put: {st}")

            def get_block() -> None:
                for _, blocks, _, _ in seqs:
                    for prefix, query, _, d_blk in blocks:
                        st = mgr.acquire(prefix, query)
                        if not st.is_ok():
                            raise RuntimeError(f"aibrix acquire: {st}")
                        n, handle = st.get()
                        d_blk.copy_(handle.to_tensors()[0])
                        handle.release()
                        if n != tokens:
                            raise RuntimeError(f"aibrix acquire got {n} of {tokens} tokens")

            def put_seq() -> None:
                for toks, _, s_seq, _ in seqs:
                    handle = mgr.allocate_for(None, toks).get()
                    for t, s_blk in zip(handle.to_tensors(), s_seq, strict=True):
                        t.copy_(s_blk)
                    st = mgr.put(None, toks, handle)
                    if not st.is_ok():
                        raise RuntimeError(f"aibrix put: {st}")

            def get_seq() -> None:
                for toks, _, _, d_seq in seqs:
                    st = mgr.acquire(None, toks)
                    if not st.is_ok():
                        raise RuntimeError(f"aibrix acquire: {st}")
                    n, handle = st.get()
                    for t, d_blk in zip(handle.to_tensors(), d_seq, strict=True):
                        d_blk.copy_(t)
                    handle.release()
                    if n != seq_tokens:
                        raise RuntimeError(f"aibrix acquire got {n} of {seq_tokens} tokens")

            def verify() -> bool:
                ok = _same_bytes(src, dst)
                dst.zero_()
                return ok

            def clear() -> None:
                for toks, _, _, _ in seqs:
                    mgr.delete(None, toks)

            yield AnchorSession(
                total_bytes=block_bytes * num_blocks,
                phases={
                    "put_block": put_block,
                    "get_block": get_block,
                    "put_seq": put_seq,
                    "get_seq": get_seq,
                },
                verify=verify,
                clear=clear,
                info={
                    "block_bytes": block_bytes,
                    "num_blocks": num_blocks,
                    "threads": threads,
                    "layers": layers,
                    "tokens": tokens,
                    "seq_blocks": seq_blocks,
                },
            )
    finally:
        if mgr is not None:
            with contextlib.suppress(Exception):
                mgr.close()


def aibrix_gbps(
    block_bytes: int,
    num_blocks: int,
    threads: int,
    repeat: int = 3,
    seq_blocks: int = DEFAULT_SEQ_BLOCKS,
) -> dict[str, Any]:
    """GB/s of ``aibrix_session``'s phases: 1 warm-up + ``repeat`` rounds, median round."""
    try:
        with aibrix_session(block_bytes, num_blocks, threads, seq_blocks) as session:
            return {**session.info, **_measure_anchor(session, repeat)}
    except Exception as exc:
        return _error(exc)


_lmcache_ids = iter(range(1 << 62))


@contextlib.contextmanager
def lmcache_session(
    block_bytes: int,
    num_blocks: int,
    threads: int,
    seq_blocks: int = DEFAULT_SEQ_BLOCKS,
) -> Iterator[AnchorSession]:
    """LMCache ``LMCacheEngine`` with only the local CPU backend (no disk, no remote).

    chunk_size = the block's token count (one LMCache chunk = one block), save_unfull_chunk
    off, layerwise off, async loading off, default hash ("builtin" without vLLM),
    local CPU pool sized to hold every block. The GPU connector is a ``MockGPUConnector``
    subclass whose ``batched_from_gpu``/``batched_to_gpu`` copy each chunk with torch
    between the engine's blocks and LMCache's memory objects. Driven like LMCache's vLLM
    adapter: put = ``store(tokens, mask)``, get = ``retrieve(tokens, mask)``; per block,
    tokens = the sequence up to the end of the block and mask = False over the prefix.
    Keys put_block, get_block, put_seq, get_seq in GB/s.
    """
    instance_id = f"shoal-bench-{os.getpid()}-{next(_lmcache_ids)}"
    builder = None
    try:
        import multiprocessing

        layers, tokens, seq_blocks = _layout(block_bytes, num_blocks, seq_blocks)
        # No usage telemetry; LMCache logs every store/retrieve at INFO, keep it to WARNING
        os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
        os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
        import torch
        from lmcache.v1.cache_engine import LMCacheEngineBuilder
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector
        from lmcache.v1.metadata import LMCacheMetadata

        class CopyingConnector(MockGPUConnector):  # type: ignore[misc]
            """The mock connector, with the copies a real one does (here CPU to CPU)."""

            def __init__(self, kv_shape: tuple[int, ...], chunk_tokens: int) -> None:
                super().__init__(kv_shape)
                self.chunk_tokens = chunk_tokens

            def from_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
                memory_obj.tensor.copy_(kw["bench_src"][start // self.chunk_tokens])

            def to_gpu(self, memory_obj: Any, start: int, end: int, **kw: Any) -> None:
                kw["bench_dst"][start // self.chunk_tokens].copy_(memory_obj.tensor)

            def batched_from_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kw: Any) -> None:
                for m, s, e in zip(memory_objs, starts, ends, strict=True):
                    self.from_gpu(m, s, e, **kw)

            def batched_to_gpu(self, memory_objs: Any, starts: Any, ends: Any, **kw: Any) -> None:
                for m, s, e in zip(memory_objs, starts, ends, strict=True):
                    self.to_gpu(m, s, e, **kw)

        kv_shape = (layers, 2, tokens, NUM_KV_HEADS, HEAD_DIM)
        cpu_gb = (block_bytes * num_blocks * 1.1 + 64 * MiB) / GiB
        config = LMCacheEngineConfig.from_defaults(
            chunk_size=tokens,
            local_cpu=True,
            max_local_cpu_size=round(cpu_gb, 3),
            local_disk=None,
            remote_url=None,
            save_unfull_chunk=False,
            use_layerwise=False,
            enable_async_loading=False,
            lmcache_instance_id=instance_id,
        )
        metadata = LMCacheMetadata(
            model_name="shoal-bench-7b-class",
            world_size=1,
            local_world_size=1,
            worker_id=0,
            local_worker_id=0,
            kv_dtype=torch.bfloat16,
            kv_shape=kv_shape,
            chunk_size=tokens,
        )
        nseq = num_blocks // seq_blocks
        seq_tokens = seq_blocks * tokens

        with _torch_threads(threads):
            start_method = multiprocessing.get_start_method(allow_none=True)
            builder = LMCacheEngineBuilder
            engine = builder.get_or_create(
                instance_id,
                config,
                metadata,
                CopyingConnector(kv_shape, tokens),
                lambda t, r: None,
                lambda o, r: o,
            )
            # LMCacheEngine forces the "spawn" start method process-wide; undo that
            multiprocessing.set_start_method(start_method, force=True)
            engine.post_init()
            for backend in engine.storage_manager.storage_backends.values():
                pool = getattr(backend.get_memory_allocator(), "buffer", None)
                if isinstance(pool, torch.Tensor):  # pre-touch the pool, as a warm cache has it
                    pool.zero_()

            # the engine's blocks, in LMCache's memory-object format [2, L, T, H*D]
            src = torch.empty(
                (num_blocks, 2, layers, tokens, NUM_KV_HEADS * HEAD_DIM), dtype=torch.bfloat16
            )
            dst = torch.zeros_like(src)
            _fill(src)
            masks = []
            for i in range(seq_blocks):
                m = torch.ones((i + 1) * tokens, dtype=torch.bool)
                m[: i * tokens] = False
                masks.append(m)
            seqs = [
                (
                    torch.arange(s * 1_000_000, s * 1_000_000 + seq_tokens, dtype=torch.long),
                    list(src[s * seq_blocks : (s + 1) * seq_blocks]),
                    list(dst[s * seq_blocks : (s + 1) * seq_blocks]),
                )
                for s in range(nseq)
            ]

            def put_block() -> None:
                for toks, s_blks, _ in seqs:
                    for i in range(seq_blocks):
                        engine.store(toks[: (i + 1) * tokens], mask=masks[i], bench_src=s_blks)

            def get_block() -> None:
                for toks, _, d_blks in seqs:
                    for i in range(seq_blocks):
                        got = engine.retrieve(
                            toks[: (i + 1) * tokens], mask=masks[i], bench_dst=d_blks
                        )
                        if not bool(got[i * tokens :].all()):
                            raise RuntimeError("lmcache retrieve missed a stored block")

            def put_seq() -> None:
                for toks, s_blks, _ in seqs:
                    engine.store(toks, bench_src=s_blks)

            def get_seq() -> None:
                for toks, _, d_blks in seqs:
                    got = engine.retrieve(toks, bench_dst=d_blks)
                    if not bool(got.all()):
                        raise RuntimeError("lmcache retrieve missed a stored block")

            def verify() -> bool:
                ok = _same_bytes(src, dst)
                dst.zero_()
                return ok

            yield AnchorSession(
                total_bytes=block_bytes * num_blocks,
                phases={
                    "put_block": put_block,
                    "get_block": get_block,
                    "put_seq": put_seq,
                    "get_seq": get_seq,
                },
                verify=verify,
                clear=engine.clear,
                info={
                    "block_bytes": block_bytes,
                    "num_blocks": num_blocks,
                    "threads": threads,
                    "layers": layers,
                    "tokens": tokens,
                    "seq_blocks": seq_blocks,
                },
            )
    finally:
        if builder is not None:
            with contextlib.suppress(Exception):
                builder.destroy(instance_id)


def lmcache_gbps(
    block_bytes: int,
    num_blocks: int,
    threads: int,
    repeat: int = 3,
    seq_blocks: int = DEFAULT_SEQ_BLOCKS,
) -> dict[str, Any]:
    """GB/s of ``lmcache_session``'s phases: 1 warm-up + ``repeat`` rounds, median round."""
    try:
        with lmcache_session(block_bytes, num_blocks, threads, seq_blocks) as session:
            return {**session.info, **_measure_anchor(session, repeat)}
    except Exception as exc:
        return _error(exc)


# --------------------------------------------------------------------------- checksums


def checksum_gbps(buf_bytes: int, cold_bytes: int = 256 * MiB, repeat: int = 5) -> dict[str, Any]:
    """Hash speed (GB/s) of xxh3_64, xxh3_128 (xxhash package) and zlib.crc32.

    ``<name>_hot``: the same buffer hashed over and over (in cache). ``<name>_cold``: a
    pass over ``cold_bytes`` of distinct buffers (far larger than the LLC, so from DRAM).
    """
    try:
        import numpy as np
        import xxhash

        n = max(1, cold_bytes // buf_bytes)
        pool = np.empty(n * buf_bytes, dtype=np.uint8)
        pool.view(np.uint64)[: pool.size // 8] = np.arange(pool.size // 8, dtype=np.uint64)
        bufs = [memoryview(pool[i * buf_bytes : (i + 1) * buf_bytes]) for i in range(n)]
        fns: dict[str, Callable[[Any], Any]] = {
            "xxh3_64": xxhash.xxh3_64_intdigest,
            "xxh3_128": xxhash.xxh3_128_intdigest,
            "crc32": zlib.crc32,
        }
        out: dict[str, Any] = {"buf_bytes": buf_bytes}
        hot_iters = max(8, (64 * MiB) // buf_bytes)
        for name, fn in fns.items():

            def cold(fn: Callable[[Any], Any] = fn) -> None:
                for b in bufs:
                    fn(b)

            def hot(fn: Callable[[Any], Any] = fn) -> None:
                b = bufs[0]
                for _ in range(hot_iters):
                    fn(b)

            hot()
            out[f"{name}_hot"] = _gbps(hot_iters * buf_bytes, [_timed(hot) for _ in range(repeat)])
            out[f"{name}_cold"] = _gbps(n * buf_bytes, [_timed(cold) for _ in range(repeat)])
        return out
    except Exception as exc:
        return _error(exc, "install Shoal's own dependencies")


# --------------------------------------------------------------------------- suite

BLOCK_SIZES = (64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB)
FULL_TOTAL_BYTES = 256 * MiB  # of blocks per measurement: 8x the 32 MiB L3 here
QUICK_TOTAL_BYTES = 64 * MiB  # still 2x the L3 for src, 4x with dst and the cache


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(monotonic s, machine busy CPU-s, this process's + reaped children's CPU-s)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (steal: taken by the hypervisor)
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf(
        "SC_CLK_TCK"
    )
    t = os.times()
    return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system


def foreign_cpu(
    a: tuple[float, float, float] | None, b: tuple[float, float, float] | None
) -> float:
    """Share of all CPUs used by other processes between two ``_cpu_snapshot``s (0..1)."""
    if a is None or b is None or b[0] <= a[0]:
        return 0.0
    other = (b[1] - a[1]) - (b[2] - a[2])
    return round(max(0.0, other / ((b[0] - a[0]) * (os.cpu_count() or 1))), 3)


def wait_quiet(max_wait_s: float, threshold: float = 0.1, probe_s: float = 0.5) -> float:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` of the CPUs."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a = _cpu_snapshot()
        time.sleep(probe_s)
        share = foreign_cpu(a, _cpu_snapshot())
        if share < threshold or time.monotonic() >= deadline:
            return share


def run_suite(
    block_sizes: Sequence[int] = BLOCK_SIZES,
    threads_list: Sequence[int] = (1, 2),
    *,
    total_bytes: int = FULL_TOTAL_BYTES,
    repeat: int = 3,
    which: Sequence[str] = ("memcpy", "shm", "aibrix", "lmcache"),
    tries: int = 1,
    max_foreign: float = 0.1,
    quiet_wait_s: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Every anchor for every block size and thread count; one row per measurement.

    This machine has 2 cores: another process that runs during a measurement slows it
    (with 2 torch threads, a copy waits for the descheduled OpenMP worker: 10-100x).
    Each row records ``foreign_cpu``, the share of all CPUs other processes used while
    it ran. With ``tries`` > 1, a row measured while ``foreign_cpu`` > ``max_foreign`` is
    measured again (up to ``tries`` times; the last try is kept). ``quiet_wait_s`` > 0
    first waits up to that long for the machine to be quiet before each try.
    """
    rows: list[dict[str, Any]] = []
    for bs in block_sizes:
        nb = max(1, total_bytes // bs)
        for th in threads_list:
            for name in which:
                if name == "shm" and th != threads_list[0]:
                    continue  # single-threaded by construction
                for attempt in range(1, tries + 1):
                    if quiet_wait_s > 0:
                        wait_quiet(quiet_wait_s, max_foreign)
                    before = _cpu_snapshot()
                    t0 = time.perf_counter()
                    if name == "memcpy":
                        r = memcpy_gbps(bs, nb, th, repeat=max(repeat, 3))
                    elif name == "shm":
                        r = shm_crossprocess_gbps(bs, nb, repeat=max(repeat, 3))
                    elif name == "aibrix":
                        r = aibrix_gbps(bs, nb, th, repeat=repeat)
                    elif name == "lmcache":
                        r = lmcache_gbps(bs, nb, th, repeat=repeat)
                    else:
                        raise ValueError(name)
                    wall = round(time.perf_counter() - t0, 2)
                    foreign = foreign_cpu(before, _cpu_snapshot())
                    used = attempt
                    if foreign <= max_foreign or "error" in r:
                        break
                row = {
                    "anchor": name,
                    "block_bytes": bs,
                    "num_blocks": nb,
                    "threads": 1 if name == "shm" else th,
                    **r,
                    "wall_s": wall,
                    "foreign_cpu": foreign,
                    "tries": used,
                }
                rows.append(row)
                if log:
                    log(json.dumps(row))
    return rows


def _fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = ("put_block", "get_block", "put_seq", "get_seq")
    lines = [
        "| anchor | block | threads | figures (GB/s) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            figs = f"error: {r['error']}"
        elif r["anchor"] == "memcpy":
            figs = ", ".join(
                f"{k} {r[k]}" for k in ("torch", "numpy", "torch_split", "best") if k in r
            )
        elif r["anchor"] == "shm":
            figs = f"write {r['write']}, read {r['read']}, end_to_end {r['end_to_end']}"
        else:
            figs = ", ".join(f"{k} {r[k]}" for k in cols)
        lines.append(f"| {r['anchor']} | {_fmt_size(r['block_bytes'])} | {r['threads']} | {figs} |")
    return "\n".join(lines)


def format_checksums(sums: Sequence[dict[str, Any]]) -> str:
    names = ("xxh3_64", "xxh3_128", "crc32")
    lines = [
        "| buffer | " + " | ".join(f"{n} hot | {n} cold" for n in names) + " |",
        "|---|" + "---|---|" * len(names),
    ]
    for s in sums:
        if "error" in s:
            lines.append(f"| error: {s['error']} |")
            continue
        vals = " | ".join(f"{s[n + '_hot']} | {s[n + '_cold']}" for n in names)
        lines.append(f"| {_fmt_size(s['buf_bytes'])} | {vals} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="64 MiB of blocks per measurement (not 256), 2 repeats (not 3): a smoke run",
    )
    p.add_argument("--total-mib", type=int, default=None, help="MiB of blocks per measurement")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--sizes-kib", default="64,256,1024,4096")
    p.add_argument("--only", default="memcpy,shm,aibrix,lmcache")
    p.add_argument("--checksums", action="store_true", help="also time xxh3 / crc32")
    p.add_argument("--json", dest="json_path", default=None, help="write rows here")
    p.add_argument(
        "--tries", type=int, default=1, help="re-measure a row disturbed by other processes"
    )
    p.add_argument("--max-foreign", type=float, default=0.1, help="see run_suite")
    p.add_argument("--quiet-wait-s", type=float, default=0.0, help="see run_suite")
    a = p.parse_args(argv)
    total = (
        a.total_mib * MiB if a.total_mib else (QUICK_TOTAL_BYTES if a.quick else FULL_TOTAL_BYTES)
    )
    repeat = a.repeat or (2 if a.quick else 3)
    t0 = time.perf_counter()
    rows = run_suite(
        [int(s) * KiB for s in a.sizes_kib.split(",")],
        [int(t) for t in a.threads.split(",")],
        total_bytes=total,
        repeat=repeat,
        which=a.only.split(","),
        tries=a.tries,
        max_foreign=a.max_foreign,
        quiet_wait_s=a.quiet_wait_s,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(format_table(rows))
    out: dict[str, Any] = {"rows": rows}
    if a.checksums:
        sums = [checksum_gbps(n, repeat=3) for n in (256 * KiB, 2 * MiB)]
        out["checksums"] = sums
        print()
        print(format_checksums(sums))
    print(f"\nwall {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
