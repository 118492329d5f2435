"""Streaming loader benchmark: Shoal's ``Streamer`` next to the raw limits of the same bytes
and to the published loaders (issue 5).

The checkpoint: bf16, shaped like a 1B Llama (hidden 2048, 16 layers, 32 query and 8 KV
heads of 64, intermediate 8192, vocab 32000, untied head: 2.21 GB) in ~500 MB shards with
``model.safetensors.index.json``, written once by ``safetensors`` into
``/tmp/shoal-bench-loader/`` and reused (``--quick``: 2 layers, 0.51 GB in two shards).

Every contender runs in a fresh interpreter per run (clean RSS, no threads or page-cache
state left by another contender), ``--runs`` times (5), round robin: run 1 of
every contender of a section, then run 2, ... so that drift in the machine (other tenants;
on these VMs the cost of first-touching fresh memory swings by 2-4x within minutes) spreads
over all of them alike (each round starting one entry further along). Figures are medians
of the runs with min and max; ``rounds`` has Shoal's default over each limit and anchor
round by round (run i against run i), median, min and max of those ratios (issue 17: a
target is met in the median, and "in every run" is the min). A run's clock starts before
anything is opened (headers included) and stops when every tensor is in process memory;
GB/s = 10^9 tensor bytes per second. Peak RSS growth is ``VmHWM`` after the load minus
before it (every contender keeps every tensor, so a growth of about the checkpoint's size
is the floor; "extra" is what is above it); CPU s per GB is the process's user + system
time over the load, which other tenants shift far less than wall time.

Local disk (page cache warm; cold too when run as root and not ``--quick``: each run drops
the page cache after its imports and setup, just before its clock starts):

* raw: the files' bytes read with ``threads`` concurrent ``os.preadv`` calls of ``chunk``
  bytes each, into one preallocated buffer that is already touched (``raw``: what a reused
  staging ring pays) and into fresh anonymous memory (``raw_fresh``: what any CPU
  destination pays, first-touch page faults included; private anonymous memory, as malloc
  gives: Python's default ``mmap`` is shared memory and faults in more slowly). Cold: the
  same with ``O_DIRECT`` (``raw_buffered`` is buffered cold reads, for reference). The best
  of a small sweep of threads x chunk sizes is the limit.
* anchors: ``safetensors.torch.load_file`` (lazy mmap views: each tensor is cloned, which
  is what materialises it); the Run:ai model streamer's ``SafetensorsStreamer`` (0.17 yields
  tensors the caller owns by default, so they are kept as given: no clone needed);
  ``fastsafetensors`` (``SafeTensorsFileLoader``, CPU, ``nogds``). Tensorizer does not read
  safetensors files (it loads its own serialized format), so it has no column here.
* Shoal: ``Streamer`` over ``LocalSource`` with the default ``StreamOptions``; the full run
  also sweeps a few concurrency/chunk settings. ``shoal_drop`` streams and drops each tensor
  (as a model loader copying into its parameters would): its RSS growth is what the
  in-flight bound (``max_inflight_bytes``) is about.

S3 (the npm ``s3rver`` on loopback, started here as the integration tests start it, with the
same shards in a bucket; data kept in the cache folder): raw = ranged GETs of ``chunk``
bytes by ``threads`` threads with one boto3 client, each body read straight into a
preallocated, touched buffer (``raw``) or into fresh anonymous memory (``raw_fresh``, the
limit for a CPU destination, as on local disk) (one untimed pass first: s3rver serves its
first few hundred MB slower while Node warms up); Run:ai's streamer from ``s3://``
(path-style endpoint from ``AWS_ENDPOINT_URL``); Shoal's ``Streamer`` over ``S3Source``.

    python bench/loader.py [--quick] [--json] [--runs N] [--no-cold] [--no-s3]
                           [--only warm|cold|s3]

``--json`` prints one JSON object (interface kept for scripts, see the issue):
{"local": {"raw_gbps", "raw_fresh_gbps", "safetensors_gbps", "runai_gbps",
"fastsafetensors_gbps", "shoal_gbps", "shoal_first_tensor_ms", ...},
"s3": {"raw_gbps", "runai_gbps", "shoal_gbps", "shoal_first_tensor_ms", ...},
"local_cold": {...} | null, "machine": {...}, "checkpoint": {...}, "notes": [...]};
each section also has ``first_tensor_floor_ms``: the first tensor's bytes at the raw fresh
rate, a floor for the time to it in file order;
an anchor that is not installed is null, with a note. Anchors are installed by
``bench/install_anchors.sh`` (not part of CI).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# This script is named like the package it measures: drop its own folder from the path so
# `import loader` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))

from bench.rounds import Spread, paired_ratios  # noqa: E402

MiB = 1 << 20
CACHE = Path("/tmp/shoal-bench-loader")
INDEX = "model.safetensors.index.json"
S3RVER_JS = REPO / ".cache" / "node" / "node_modules" / "s3rver" / "bin" / "s3rver.js"
S3RVER_KEY = "S3RVER"  # s3rver's one account: access key id and secret
BUCKET = "checkpoints"
_ALIGN = 4096
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python's mmap module names it from 3.13 on

# A 1B Llama: hidden 2048, 32 query heads and 8 KV heads of 64, intermediate 8192.
HIDDEN, HEAD_DIM, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 64, 8, 8192, 32000
SHAPES = {
    "full": {"layers": 16, "shard_bytes": 500_000_000},
    "quick": {"layers": 2, "shard_bytes": 256 * MiB},
}


# -- the checkpoint --------------------------------------------------------------------


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = KV_HEADS * HEAD_DIM
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    return [*shapes, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_checkpoint(size: str) -> Path:
    """The checkpoint folder for ``size``, written once (a ``.complete`` marker)."""
    folder = CACHE / f"llama-1b-{size}"
    if (folder / ".complete").exists():
        return folder
    import torch
    from safetensors.torch import save_file

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shapes = tensor_shapes(SHAPES[size]["layers"])
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in shapes:
        nbytes = 2 * _numel(shape)
        if shards[-1] and filled + nbytes > SHAPES[size]["shard_bytes"]:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            name: torch.empty(shape, dtype=torch.bfloat16).normal_(generator=generator)
            for name, shape in shard
        }
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update((name, file) for name in tensors)
        del tensors
    total = sum(2 * _numel(shape) for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    (folder / ".complete").touch()
    return folder


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in one safetensors file (its size less the header)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - int(header_len)


# The tensors whose bytes every contender hashes after its clock stops: all must agree.
def first_tensor(folder: Path) -> dict[str, Any]:
    """The tensor a file-order load yields first: its size bounds the time to it."""
    from loader.checkpoint import open_checkpoint
    from loader.sources.local import LocalSource

    source = LocalSource(folder)
    try:
        plan = open_checkpoint(source).plan()[0]
    finally:
        source.close()
    return {"name": plan.name, "bytes": plan.nbytes}


def sample_names(layers: int) -> list[str]:
    last = layers - 1
    return [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "lm_head.weight",
    ]


# -- s3rver ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_s3rver(folder: Path) -> Iterator[str]:
    """s3rver on a free loopback port storing under ``folder`` (kept between runs, so the
    upload happens once), with the bucket created; yields its endpoint URL."""
    node = shutil.which("node")
    if node is None or not S3RVER_JS.exists():
        raise FileNotFoundError("s3rver is not installed: run scripts/setup-loader-servers")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = folder / "s3rver.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [node, str(S3RVER_JS), "--directory", str(folder / "data"), "--address",
             "127.0.0.1", "--port", str(port), "--silent", "--configure-bucket", BUCKET],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"s3rver exited with {process.returncode}: {log.read_text()}")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"s3rver did not listen within 15 s: {log.read_text()}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def s3_client(endpoint: str, pool: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    # s3rver predates the aws-chunked checksum trailers boto3 sends by default.
    config = Config(
        s3={"addressing_style": "path"},
        max_pool_connections=pool,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=S3RVER_KEY, aws_secret_access_key=S3RVER_KEY, region_name="us-east-1"
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def upload(endpoint: str, folder: Path, prefix: str) -> None:
    """Put the checkpoint's files under ``prefix/`` unless the same ones are there."""
    from boto3.s3.transfer import TransferConfig

    client = s3_client(endpoint)
    transfer = TransferConfig(multipart_chunksize=64 * MiB, max_concurrency=4)
    for path in [*shard_files(folder), folder / INDEX]:
        key = f"{prefix}/{path.name}"
        identity = f"{path.stat().st_size}-{path.stat().st_mtime_ns}"
        with contextlib.suppress(Exception):  # absent (or s3rver's odd 404 body): upload
            head = client.head_object(Bucket=BUCKET, Key=key)
            if head.get("Metadata", {}).get("identity") == identity:
                continue
        client.upload_file(
            str(path), BUCKET, key, ExtraArgs={"Metadata": {"identity": identity}}, Config=transfer
        )


def s3_env(endpoint: str) -> dict[str, str]:
    """What Run:ai's streamer (and boto3's default chain) needs to reach s3rver."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3RVER_KEY,
        "AWS_SECRET_ACCESS_KEY": S3RVER_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }


# -- contenders (each runs in its own interpreter) ----------------------------------------


def _maxrss() -> int:
    """This process's peak RSS in bytes: ``VmHWM``, the high-water mark of its own memory
    map. Not ``ru_maxrss``: across ``exec`` Linux keeps the larger of the old and new maps'
    peaks there, and a child started by vfork + exec inherits the parent's (this script's,
    which wrote the checkpoint: over a GB), so a growth measured with it reads 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_s() -> float:
    """CPU seconds this process has used, all threads, user and system: the work a load
    costs, which the machine's other tenants shift far less than its wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Clock:
    """Started right before a contender opens anything; records the first tensor."""

    def __init__(self) -> None:
        self.rss_before = _maxrss()
        self.cpu_before = _cpu_s()
        self.start = time.perf_counter()
        self.first: float | None = None

    def tensor(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.start


def _hash(tensor: Any) -> str:
    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(memoryview(data), digest_size=16).hexdigest()


def _finish(
    clock: Clock, nbytes: int, tensors: dict[str, Any], spec: dict[str, Any]
) -> dict[str, Any]:
    elapsed = time.perf_counter() - clock.start
    cpu = _cpu_s() - clock.cpu_before
    grown = _maxrss() - clock.rss_before
    result: dict[str, Any] = {"bytes": nbytes, "elapsed_s": elapsed, "rss_growth": grown}
    result["cpu_s"] = cpu
    result["first_s"] = clock.first
    if tensors:
        result["tensors"] = len(tensors)
        result["hashes"] = {n: _hash(tensors[n]) for n in spec["samples"] if n in tensors}
    return result


def run_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """Whole files with concurrent positional reads into one buffer (touched or fresh)."""
    files = [Path(p) for p in spec["files"]]
    sizes = [p.stat().st_size for p in files]
    padded = [-(-s // _ALIGN) * _ALIGN for s in sizes]
    # Private anonymous memory, as malloc's (Python's default, MAP_SHARED, is shmem-backed
    # and faults in far more slowly); page-aligned, as O_DIRECT needs.
    buffer = mmap.mmap(-1, sum(padded), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if spec["touched"]:
        import numpy as np

        np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    view = memoryview(buffer)
    flags = os.O_RDONLY | (os.O_DIRECT if spec["direct"] else 0)
    fds = [os.open(p, flags) for p in files]
    chunk = spec["chunk"]
    work = []
    base = 0
    for fd, span in zip(fds, padded, strict=True):
        for offset in range(0, span, chunk):
            work.append((fd, offset, base + offset, min(chunk, span - offset)))
        base += span
    if spec["cold"]:
        _drop_caches()

    populate = spec.get("populate", False)

    def read(item: tuple[int, int, int, int]) -> None:
        fd, offset, dest, length = item
        if populate:  # the range's pages faulted in by one madvise first (see loader/_pages)
            buffer.madvise(MADV_POPULATE_WRITE, dest, -(-length // _ALIGN) * _ALIGN)
        done = 0
        while done < length:
            got = os.preadv(fd, [view[dest + done : dest + length]], offset + done)
            if got == 0:
                break  # end of file (the last direct read asks for a whole block)
            done += got

    clock = Clock()
    with ThreadPoolExecutor(spec["threads"]) as pool:
        list(pool.map(read, work))
    result = _finish(clock, sum(sizes), {}, spec)
    for fd in fds:
        os.close(fd)
    return result


def run_safetensors(spec: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = spec["files"]
    if spec["cold"]:
        _drop_caches()
    clock = Clock()
    tensors = {}
    for path in files:
        for name, lazy in load_file(path).items():  # views of a private file mapping
            tensors[name] = lazy.clone()
            clock.tensor()
    return _finish(clock, sum(t.nbytes for t in tensors.values()), tensors, spec)


def run_runai(spec: dict[str, Any]) -> dict[str, Any]:
    from runai_model_streamer import SafetensorsStreamer
    from runai_model_streamer.safetensors_streamer.safetensors_streamer import list_safetensors

    if spec["cold"]:
        _drop_caches()
    clock = Clock()
    tensors = {}
    files = spec["files"]
    if spec.get("s3_uri"):
        files = sorted(list_safetensors(spec["s3_uri"]))  # listing is part of its load
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(files)
        for name, tensor in streamer.get_tensors():  # owned by the caller (the default)
            tensors[name] = tensor
            clock.tensor()
    return _finish(clock, sum(t.nbytes for t in tensors.values()), tensors, spec)


def run_fastsafetensors(spec: dict[str, Any]) -> dict[str, Any]:
    from fastsafetensors import SafeTensorsFileLoader

    if spec["cold"]:
        _drop_caches()
    clock = Clock()
    tensors = {}
    loader = SafeTensorsFileLoader(None, "cpu", nogds=True)
    loader.add_filenames({0: spec["files"]})
    buffers = loader.copy_files_to_device()
    for name in buffers.key_to_rank_lidx:  # tensors keep their file buffer alive
        tensors[name] = buffers.get_tensor(name)
        clock.tensor()
    result = _finish(clock, sum(t.nbytes for t in tensors.values()), tensors, spec)
    buffers.close()
    loader.close()
    return result


# The StreamOptions fields a Shoal entry's spec may set.
OPTION_KEYS = ("concurrency", "cached_concurrency", "chunk_bytes", "max_inflight_bytes", "prefault")


def run_shoal(spec: dict[str, Any]) -> dict[str, Any]:
    from loader.checkpoint import open_checkpoint
    from loader.stream import Streamer, StreamOptions

    options = StreamOptions(**{k: spec[k] for k in OPTION_KEYS if k in spec})
    if spec.get("s3_uri"):
        from loader.sources.s3 import S3Source

        source: Any = S3Source(
            spec["s3_uri"], endpoint_url=spec["endpoint"], concurrency=options.concurrency
        )
    else:
        from loader.sources.local import LocalSource

        source = LocalSource(spec["root"], direct=spec.get("direct", "auto"))
    if spec["cold"]:
        _drop_caches()
    clock = Clock()
    checkpoint = open_checkpoint(source, concurrency=options.concurrency)
    streamer = Streamer(source, checkpoint.plan(), options)
    tensors = {}
    nbytes = 0
    samples = {}
    for name, tensor in streamer:
        clock.tensor()
        nbytes += tensor.nbytes
        if spec.get("keep", True):
            tensors[name] = tensor
        elif name in spec["samples"]:
            samples[name] = tensor  # a few small-to-mid tensors, to check the bytes
    stats = streamer.statistics()
    result = _finish(clock, nbytes, tensors or samples, spec)
    result["tensors"] = stats.tensors
    result["peak_held_bytes"] = stats.peak_held_bytes
    result["max_inflight_bytes"] = options.max_inflight_bytes
    result["num_reads"] = stats.num_reads
    source.close()
    return result


def run_s3_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """Ranged GETs of the shards' bytes by ``threads`` threads into one buffer, touched
    before the clock starts or (``touched`` false) fresh private anonymous memory."""
    client = s3_client(spec["endpoint"], pool=spec["threads"] + 4)
    keys = [f"{spec['prefix']}/{Path(p).name}" for p in spec["files"]]
    sizes = [int(client.head_object(Bucket=BUCKET, Key=k)["ContentLength"]) for k in keys]
    buffer = mmap.mmap(-1, sum(sizes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if spec.get("touched", True):
        import numpy as np

        np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    view = memoryview(buffer)
    chunk = spec["chunk"]
    work = []
    base = 0
    for key, size in zip(keys, sizes, strict=True):
        work += [(key, o, base + o, min(chunk, size - o)) for o in range(0, size, chunk)]
        base += size

    def get(item: tuple[str, int, int, int]) -> None:
        key, offset, dest, length = item
        response = client.get_object(
            Bucket=BUCKET, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        raw = response["Body"]._raw_stream  # urllib3's response; _fp reads into our memory
        target = view[dest : dest + length]
        done = 0
        while done < length:
            got = raw._fp.readinto(target[done:])
            if not got:
                raise RuntimeError(f"{key}: body ended at {done} of {length} bytes")
            done += got
        raw.release_conn()

    clock = Clock()
    with ThreadPoolExecutor(spec["threads"]) as pool:
        list(pool.map(get, work))
    return _finish(clock, sum(sizes), {}, spec)


CONTENDERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "raw": run_raw,
    "safetensors": run_safetensors,
    "runai": run_runai,
    "fastsafetensors": run_fastsafetensors,
    "shoal": run_shoal,
    "s3_raw": run_s3_raw,
}
ANCHOR_MODULES = {"runai": "runai_model_streamer", "fastsafetensors": "fastsafetensors"}


def child_main(kind: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = CONTENDERS[kind](spec)
    sys.stdout.write("\nRESULT " + json.dumps(result) + "\n")


# -- the parent: runs, medians, the table -------------------------------------------------


def run_once(kind: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    done = subprocess.run(
        args, check=False, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return result
    raise RuntimeError(f"{kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")


class _Busy:
    """How much of the machine other processes took while a section ran: all CPUs' busy
    time (``/proc/stat``, steal included) less this process's and its waited-for
    children's (every contender run is one), as a share of all CPUs. On this shared VM
    it says whether a section's figures were measured on a quiet machine or a busy one
    (``bench/rounds.py`` explains why a busy one biases ratios, not only spreads them)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            own += usage.ru_utime + usage.ru_stime
        return time.monotonic(), busy, own

    def foreign_share(self) -> float:
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
        other = (busy1 - busy0) - (own1 - own0)
        return round(max(0.0, other / max(t1 - t0, 1e-9) / (os.cpu_count() or 1)), 3)


@dataclass
class Entry:
    """One contender (or one setting of one) in a section: ``runs`` fresh-process runs."""

    key: str  # in the JSON: details[key], or a sweep list when ``group`` is set
    label: str
    kind: str  # a CONTENDERS name
    spec: dict[str, Any]
    env: dict[str, str] | None = None
    group: str | None = None  # sweep entries: the best of a group is details[group]
    setting: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args = args
        self.folder = folder
        self.files = [str(p) for p in shard_files(folder)]
        self.total = sum(tensor_bytes(Path(p)) for p in self.files)
        self.samples = sample_names(SHAPES[args.size]["layers"])
        self.notes: list[str] = []
        self.hashes: dict[str, str] = {}

    def spec(self, **extra: Any) -> dict[str, Any]:
        return {"files": self.files, "root": str(self.folder), "samples": self.samples,
                "cold": False, **extra}  # fmt: skip

    def say(self, text: str) -> None:
        if not self.args.json:
            print(text, flush=True)

    def installed(self, anchor: str) -> bool:
        module = ANCHOR_MODULES.get(anchor)
        if module is None:
            return True
        probe = subprocess.run(
            [sys.executable, "-c", f"import {module}"], check=False, capture_output=True
        )
        if probe.returncode != 0:
            self.notes.append(f"{anchor} is not installed: run bench/install_anchors.sh")
        return probe.returncode == 0

    def run(self, entries: list[Entry]) -> dict[str, Any]:
        """Round robin: run 1 of every entry, then run 2, ... so that drift in the machine
        (other tenants, the host's memory) spreads over all contenders alike. Each round
        starts one entry further along (round 2 at the second entry, ...), so that no
        contender always follows the same one (the memory a run frees is still backed by
        the host for a few seconds, then handed back: cheaper or dearer for the next)."""
        busy = _Busy()
        for round_ in range(self.args.runs):
            turn = round_ % len(entries)
            for entry in entries[turn:] + entries[:turn]:
                run = run_once(entry.kind, entry.spec, entry.env)
                self.check(entry, run)
                entry.runs.append(run)
            self.say(f"  round {round_ + 1} of {self.args.runs} done")
        details: dict[str, Any] = {}
        chosen: dict[str, Entry] = {}  # the entry behind each details[key] (a group's best)
        for entry in entries:
            got = figures(entry.runs) | entry.setting
            self.say(f"  {entry.label:40} {got['gbps']:6.2f} GB/s  (runs: {got['all_gbps']})")
            if entry.group is None:
                details[entry.key] = got
                chosen[entry.key] = entry
                continue
            details.setdefault(entry.key, []).append(got)
            best = details.get(entry.group)
            if best is None or got["gbps"] > best["gbps"]:
                details[entry.group] = got
                chosen[entry.group] = entry
        details["rounds"] = round_ratios(chosen)
        details["rounds"]["foreign_cpu_share"] = busy.foreign_share()
        self.say(f"  other processes used {busy.foreign_share():.0%} of the CPUs meanwhile")
        return details

    def check(self, entry: Entry, run: dict[str, Any]) -> None:
        expected = self.total if entry.kind not in ("raw", "s3_raw") else run["bytes"]
        if run["bytes"] != expected:
            raise RuntimeError(f"{entry.label}: read {run['bytes']} bytes, expected {expected}")
        for name, digest in run.get("hashes", {}).items():
            if self.hashes.setdefault(name, digest) != digest:
                raise RuntimeError(f"{entry.label}: {name} differs from the other contenders")

    def raw_entries(
        self,
        group: str,
        label: str,
        kind: str,
        settings: list[tuple[int, int]],
        spec: dict[str, Any],
    ) -> list[Entry]:
        return [
            Entry(f"{group}_sweep", f"{label} ({threads} threads x {chunk_mib} MiB)", kind,
                  {**spec, "threads": threads, "chunk": chunk_mib * MiB}, group=group,
                  setting={"threads": threads, "chunk_mib": chunk_mib})
            for threads, chunk_mib in settings
        ]  # fmt: skip

    def local(self, cold: bool) -> dict[str, Any]:
        self.say(f"local disk, page cache {'cold (dropped before every run)' if cold else 'warm'}")
        settings = self.args.cold_raw_settings if cold else self.args.raw_settings
        raws = [("raw", "raw, touched buffer", True, cold), ("raw_fresh", "raw, fresh memory",
                False, cold)] + ([("raw_buffered", "raw, buffered reads", True, False)]
                if cold else [])  # fmt: skip
        entries: list[Entry] = []
        for group, label, touched, direct in raws:
            spec = self.spec(touched=touched, direct=direct, cold=cold)
            entries += self.raw_entries(group, label, "raw", settings, spec)
        if not cold:  # a reference, not the limit: what Shoal's prefault gives raw reads
            spec = self.spec(touched=False, direct=False, populate=True)
            entries += self.raw_entries("raw_fresh_populated", "raw, fresh, populated per read",
                                        "raw", [(4, 16)], spec)  # fmt: skip
        missing: list[str] = []
        for anchor in ("safetensors", "runai", "fastsafetensors"):
            if self.installed(anchor):
                entries.append(Entry(anchor, anchor, anchor, self.spec(cold=cold)))
            else:
                missing.append(anchor)
        entries.append(Entry("shoal", "shoal (defaults)", "shoal", self.spec(cold=cold)))
        entries.append(Entry("shoal_drop", "shoal, tensors dropped", "shoal",
                             self.spec(cold=cold, keep=False)))  # fmt: skip
        if cold:
            entries.append(Entry("shoal_direct", "shoal, O_DIRECT", "shoal",
                                 self.spec(cold=cold, direct=True)))  # fmt: skip
        else:
            # The warm default before issue 17: 16 reads for every file, no prefault.
            before = self.spec(cached_concurrency=16, prefault=False)
            entries.append(
                Entry("shoal_before", "shoal, 16 reads, no prefault (before)", "shoal", before)
            )
            entries += [
                Entry("shoal_settings", f"shoal ({concurrency} reads x {chunk_mib} MiB)",
                      "shoal", self.spec(concurrency=concurrency, cached_concurrency=concurrency,
                                         chunk_bytes=chunk_mib * MiB),
                      group="shoal_best", setting={"concurrency": concurrency,
                                                   "chunk_mib": chunk_mib})
                for concurrency, chunk_mib in self.args.sweep
            ]  # fmt: skip
        details = self.run(entries)
        details.update(dict.fromkeys(missing))
        return summarise(details)

    def s3(self) -> dict[str, Any]:
        self.say("S3 (s3rver on loopback)")
        prefix = f"bench-{self.args.size}"
        with running_s3rver(CACHE / "s3rver") as endpoint:
            upload(endpoint, self.folder, prefix)
            uri = f"s3://{BUCKET}/{prefix}"
            env = s3_env(endpoint)
            base = self.spec(endpoint=endpoint, prefix=prefix)
            # s3rver (Node) serves its first few hundred MB slower, while its code warms up.
            run_once("s3_raw", {**base, "threads": 8, "chunk": 64 * MiB})
            entries = self.raw_entries(
                "raw", "raw ranged GETs", "s3_raw", self.args.s3_raw_settings, base
            ) + self.raw_entries(
                "raw_fresh", "raw ranged GETs, fresh memory", "s3_raw",
                self.args.s3_raw_settings, {**base, "touched": False},
            )  # fmt: skip
            missing = []
            if self.installed("runai"):
                entries.append(Entry("runai", "runai", "runai", {**base, "s3_uri": uri}, env))
            else:
                missing.append("runai")
            entries.append(Entry("shoal", "shoal (defaults)", "shoal", {**base, "s3_uri": uri},
                                 env))  # fmt: skip
            entries += [
                Entry("shoal_settings", f"shoal ({concurrency} reads x {chunk_mib} MiB)",
                      "shoal", {**base, "s3_uri": uri, "concurrency": concurrency,
                                "chunk_bytes": chunk_mib * MiB}, env, group="shoal_best",
                      setting={"concurrency": concurrency, "chunk_mib": chunk_mib})
                for concurrency, chunk_mib in self.args.s3_sweep
            ]  # fmt: skip
            details = self.run(entries)
        details.update(dict.fromkeys(missing))
        return summarise(details)


def _rates(runs: list[dict[str, Any]]) -> list[float]:
    return [run["bytes"] / run["elapsed_s"] / 1e9 for run in runs]


# What Shoal's default is compared with round by round: the limits, then the anchors.
COMPARED = ("raw_fresh", "raw", "safetensors", "runai", "fastsafetensors")


def round_ratios(chosen: dict[str, Entry]) -> dict[str, Any]:
    """Shoal's default over each limit and anchor, round by round: run i of Shoal against
    run i of the other (the same round of the round robin, so the machine's drift between
    rounds cancels), with the median, min and max over the rounds. A limit swept over
    settings is its best setting by median (the one the table shows), in every round."""
    shoal = chosen.get("shoal")
    if shoal is None:
        return {}
    mine = _rates(shoal.runs)
    out: dict[str, Any] = {}
    for name in COMPARED:
        other = chosen.get(name)
        if other is not None:
            theirs = _rates(other.runs)
            out[f"shoal_vs_{name}"] = Spread.of(paired_ratios(mine, theirs)).to_json()
    return out


def figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs (GB/s also min, best and all), from the children's raw results."""
    rates = _rates(runs)
    out: dict[str, Any] = {
        "gbps": statistics.median(rates),
        "min_gbps": min(rates),
        "best_gbps": max(rates),
        "all_gbps": [round(r, 3) for r in rates],
        "rss_growth_bytes": int(statistics.median(r["rss_growth"] for r in runs)),
        "cpu_s_per_gb": statistics.median(r["cpu_s"] / (r["bytes"] / 1e9) for r in runs),
    }
    firsts = [r["first_s"] for r in runs if r.get("first_s") is not None]
    if firsts:
        out["first_tensor_ms"] = statistics.median(firsts) * 1000
    for key in ("peak_held_bytes", "max_inflight_bytes", "num_reads"):
        if key in runs[0]:
            out[key] = max(r[key] for r in runs)
    return out


def summarise(details: dict[str, Any]) -> dict[str, Any]:
    """The kept interface (``<name>_gbps``, ``shoal_first_tensor_ms``) plus the details."""
    out: dict[str, Any] = {}
    rounds = details.pop("rounds")
    for name, got in details.items():
        if not isinstance(got, list):
            out[f"{name}_gbps"] = None if got is None else got["gbps"]
    out["rounds"] = rounds
    shoal = details["shoal"]
    out["shoal_first_tensor_ms"] = shoal.get("first_tensor_ms")
    for limit in ("raw", "raw_fresh"):
        if details.get(limit):
            out[f"shoal_vs_{limit}"] = shoal["gbps"] / details[limit]["gbps"]
    out["shoal_rss_growth_bytes"] = shoal["rss_growth_bytes"]
    out["shoal_max_inflight_bytes"] = shoal["max_inflight_bytes"]
    if details.get("shoal_drop"):
        out["shoal_drop_rss_growth_bytes"] = details["shoal_drop"]["rss_growth_bytes"]
    out["details"] = details
    return out


def machine_facts() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    cpu = next(
        (line.split(":", 1)[1].strip() for line in read("/proc/cpuinfo").splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    mem = next((line.split()[1] for line in read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), "0")  # fmt: skip
    device = subprocess.run(
        ["df", "--output=source", str(CACHE)], check=False, capture_output=True, text=True
    ).stdout.split()[-1:]
    versions: dict[str, str | None] = {}
    import importlib.metadata as md

    for package in ("torch", "safetensors", "boto3", "runai-model-streamer",
                    "runai-model-streamer-s3", "fastsafetensors"):  # fmt: skip
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory_gib": round(int(mem) / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "thp": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "disk": device[0] if device else "?",
        "load_average_start": os.getloadavg()[0],
        "versions": versions,
    }


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _ratio(value: float | None, limit: float | None) -> str:
    return f"{value / limit:5.0%}" if value and limit else "    -"


def print_table(result: dict[str, Any]) -> None:
    m, c = result["machine"], result["checkpoint"]
    print()
    print(f"checkpoint: {c['description']}; {c['files']} shards, {c['bytes'] / 1e9:.2f} GB")
    print(f"machine: {m['cpu']}, {m['memory_gib']} GiB, kernel {m['kernel']}, THP {m['thp']}")
    print(f"median of {result['runs']} runs, each in a fresh process; GB/s = 1e9 B/s")
    rows = [("raw, touched buffer", "raw"), ("raw, fresh memory", "raw_fresh"),
            ("raw, buffered reads", "raw_buffered"),
            ("raw, fresh, populated", "raw_fresh_populated"),
            ("safetensors.load_file + clone", "safetensors"), ("Run:ai streamer", "runai"),
            ("fastsafetensors", "fastsafetensors"),
            ("Shoal Streamer", "shoal"), ("Shoal, O_DIRECT", "shoal_direct"),
            ("Shoal, 16 reads, no prefault (before)", "shoal_before"),
            ("Shoal, tensors dropped", "shoal_drop")]  # fmt: skip
    for section in ("local", "local_cold", "s3"):
        got_section = result.get(section)
        if not got_section:
            continue
        details = got_section["details"]
        raw, fresh = got_section["raw_gbps"], got_section.get("raw_fresh_gbps")
        print(f"\n{section:40}{'GB/s':>7}{'min-max':>12}{'/raw':>7}{'/fresh':>7}{'first ms':>10}"
              f"{'RSS +MB':>9}{'CPU s/GB':>10}")  # fmt: skip
        named = [(label, details[key]) for label, key in rows if key in details]
        if section == "s3":
            named[:2] = [("raw ranged GETs", details["raw"]),
                         ("raw ranged GETs, fresh memory", details["raw_fresh"])]  # fmt: skip
        named += [
            (f"Shoal, {got['concurrency']} reads x {got['chunk_mib']} MiB", got)
            for got in details.get("shoal_settings", [])
        ]
        for label, got in named:
            if got is None:
                print(f"{label:40}{'not installed':>16}")
                continue
            settings = f" ({got['threads']} x {got['chunk_mib']} MiB)" if "threads" in got else ""
            first = got.get("first_tensor_ms")
            span = f"{got['min_gbps']:.2f}-{got['best_gbps']:.2f}"
            print(
                f"{label + settings:40}{got['gbps']:7.2f}{span:>12}{_ratio(got['gbps'], raw):>7}"
                f"{_ratio(got['gbps'], fresh):>7}{'' if first is None else f'{first:.1f}':>10}"
                f"{got['rss_growth_bytes'] / 1e6:9.0f}{got['cpu_s_per_gb']:10.3f}"
            )
        for name, ratio in got_section["rounds"].items():
            if not isinstance(ratio, dict):
                print(f"  {name}: {ratio}")
                continue
            print(
                f"  round by round, {name:28} median {ratio['median']:.3f}  min "
                f"{ratio['min']:.3f}  max {ratio['max']:.3f}  (rounds: {ratio['rounds']})"
            )
    for note in result["notes"]:
        print(f"note: {note}")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 GB checkpoint, warm only")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--runs", type=int, help="runs per contender (default 5, quick 3)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold page cache")
    parser.add_argument("--no-s3", action="store_true", help="skip S3")
    parser.add_argument(
        "--only", choices=("warm", "cold", "s3"), help="run this one section (cold: full only)"
    )
    args = parser.parse_args()
    args.size = "quick" if args.quick else "full"
    args.runs = args.runs or 5
    # (threads, MiB per read): the raw limits are the best of these; s3rver (one Node
    # process) pays per request, so its best ranges are larger than a real S3's.
    args.raw_settings = [(2, 16), (16, 16)]
    if not args.quick:
        args.raw_settings += [(8, 16), (16, 64)]
    args.s3_raw_settings = [(8, 64)] if args.quick else [(16, 8), (16, 16), (8, 64), (16, 64)]
    # Shoal beside its defaults (16 reads x 16 MiB for every source): (reads, MiB per read).
    args.cold_raw_settings = [(8, 16), (16, 16)]
    args.sweep = [] if args.quick else [(2, 16), (4, 16), (8, 16), (32, 16), (16, 64)]
    args.s3_sweep = [(16, 64)] if args.quick else [(8, 64), (16, 64), (32, 16)]
    started = time.monotonic()
    folder = write_checkpoint(args.size)
    bench = Bench(args, folder)
    result: dict[str, Any] = {
        "machine": machine_facts(),
        "checkpoint": {
            "description": f"bf16 1B-Llama shapes, {SHAPES[args.size]['layers']} layers",
            "files": len(bench.files),
            "bytes": bench.total,
            "tensors": len(tensor_shapes(SHAPES[args.size]["layers"])),
            "first_tensor": first_tensor(folder),
            "path": str(folder),
        },
        "runs": args.runs,
        "notes": bench.notes,
    }
    bench.notes.append(
        "Tensorizer loads its own serialized format, not safetensors files: no column"
    )
    sections = {args.only} if args.only else {"warm", "cold", "s3"}
    if args.no_cold:
        sections.discard("cold")
    if args.no_s3:
        sections.discard("s3")
    result["local"] = bench.local(cold=False) if "warm" in sections else None
    result["local_cold"] = None
    if not args.quick and "cold" in sections:
        if can_drop_caches():
            result["local_cold"] = bench.local(cold=True)
        else:
            bench.notes.append("cold page cache skipped: dropping it needs root")
    result["s3"] = bench.s3() if "s3" in sections else None
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    first = result["checkpoint"]["first_tensor"]
    for section in ("local", "local_cold", "s3"):
        got = result.get(section)
        if got and got.get("raw_fresh_gbps"):
            floor = first["bytes"] / got["raw_fresh_gbps"] / 1e6
            got["first_tensor_floor_ms"] = floor
            bench.notes.append(
                f"{section}: the first tensor in file order ({first['name']}, "
                f"{first['bytes'] / 1e6:.0f} MB) alone takes {floor:.0f} ms at the raw fresh rate"
            )
    result["elapsed_s"] = time.monotonic() - started
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
