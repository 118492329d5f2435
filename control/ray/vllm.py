"""The real vLLM inside an engine group: vLLM's Ray executor made to use the group's
placement group instead of creating its own.

Invariant: a group started with ``workers="vllm"`` holds exactly one placement group (the
group's), and vLLM's ``world_size`` worker actors sit in it, rank ``r`` in bundle ``r``;
vLLM never creates a second placement group (which would wait forever for the GPUs the
group already holds: the "Waiting for creating a placement group" hang).

What vLLM does with an existing group (read in vLLM 0.32, ``vllm/engine/arg_utils.py``
``create_engine_config``, ``vllm/v1/executor/ray_utils.py`` ``initialize_ray_cluster``,
``vllm/v1/executor/ray_executor_v2.py``)::

    API server process  --(is_in_ray_actor()? then get_current_placement_group())-->
        ParallelConfig.placement_group  --(pickled into the spawned EngineCore process)-->
    EngineCore: ray.init(RAY_ADDRESS); "Using the existing placement group";
        checks every bundle has <= 1 GPU and >= world_size bundles have one;
        RayExecutorV2 starts one RayWorkerProc actor per rank, num_cpus=0,
        num_gpus=VLLM_RAY_PER_WORKER_GPUS, in bundle VLLM_RAY_BUNDLE_INDICES[rank]
        (unset: GPU bundles sorted driver-node first);
        each worker's GPU is the one Ray gave its bundle; per node vLLM sets
        CUDA_VISIBLE_DEVICES to the sorted GPU ids of that node's workers.

1. The placement group reaches vLLM **only** through ``get_current_placement_group()`` in
   the API server's own process, and only when that process is a Ray actor. There is no
   flag or environment variable naming a group: a ``vllm serve`` subprocess started by the
   driver actor is a new Ray driver, sees no group and builds its own (rejected).
2. So vLLM's OpenAI server runs *in-process* in a Ray actor, ``VllmServer``, scheduled
   into bundle 0 with ``num_cpus=0`` (the driver's CPUs are already in bundle 0 and held
   by the group's driver actor) and ``placement_group_capture_child_tasks``.
3. The group's driver actor keeps running a plain command, ``python -m control.ray.vllm
   --placement-group {placement_group} -- <vLLM server flags>`` (``vllm_command``): this
   launcher connects to the cluster, starts ``VllmServer`` in bundle 0 of the named group
   and lives exactly as long as it (it exits with the server; SIGTERM stops the server).
   The server actor is owned by the launcher, so Ray kills it when the launcher dies, and
   vLLM's workers are owned by vLLM's EngineCore, a child of the server actor: killing the
   driver actor takes the whole engine down, as the group's stop expects.
4. ``VLLM_RAY_BUNDLE_INDICES=0,1,...`` fixes rank ``r`` to bundle ``r``, so the GPUs the
   group reports (bundle order) are the GPUs of ranks 0..world-1 in order, which is what
   the fleet needs to map an unhealthy ``NODE/gpuI`` to the group. ``bundle_gpus`` reads
   them before vLLM starts (a zero-CPU probe task per bundle, printed as
   ``SHOAL_VLLM_GPUS=...``; RayEngineGroup runs the same probes itself): Ray allocates a
   bundle's GPU instances when it commits the bundle, so a probe and the worker that
   later takes the bundle see the same ids.
5. The cluster: ``--ray-address``, else ``RAY_ADDRESS``, else the cluster of the raylet
   that started the driver actor (``RAY_RAYLET_PID``; not ``auto``, which picks the
   machine's newest cluster). The server gets it as ``RAY_ADDRESS``: vLLM's EngineCore is
   a fresh (spawned) process that calls ``ray.init()`` itself and must join the group's
   cluster, not start one.
6. The cluster's workers must run a Python that has vLLM (the image's Python): the server
   actor imports vLLM. This module imports vLLM only inside that actor.
7. Stopping: SIGTERM to the launcher -> SIGTERM to the server actor's process, vLLM's own
   handler drains and stops the EngineCore (``--shutdown-timeout`` 10 s added: vLLM's
   default 0 SIGKILLs it). vLLM's RayExecutorV2 still ends its workers with ``ray.kill``,
   so the shared memory they own (message queues ``/dev/shm/psm_*``, on CPU the TP
   buffers ``*-cpushm_*``) would stay behind; the launcher notes what the engine maps on
   its node and removes what is left once the engine is gone (workers on other nodes:
   not cleaned, a vLLM limitation to report upstream).

Measured on the project's 2-core CPU machines (vLLM 0.32 CPU build, ray 2.60, the tiny
model, tp=2, other jobs on the cores): vLLM's CPU platform declares no Ray device key
(``CpuPlatform.ray_device_key == ""``), so ``initialize_ray_cluster`` raises ``ValueError:
current platform cpu does not support ray.`` (a plain ``vllm serve --tensor-parallel-size 2
--distributed-executor-backend ray`` fails so in 30 s), and with the EngineCore fixed the
worker's ``get_node_and_physical_gpu_ids`` raises the same. With that one attribute set to
``"GPU"`` (the test cluster's fake GPUs; a test-only import hook, tests/e2e/test_ray_vllm.py)
everything else is vLLM's own and works: "Using the existing placement group", both
workers in it (gloo between them), /health 200 in 28-56 s, a 32-token completion in 5.4 s,
2.3 GiB PSS (server 0.5, EngineCore 0.5, each worker 0.65), stopped in 5.4 s with no
process or /dev/shm segment left.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from control.ray.errors import RayGroupError

__all__ = [
    "VllmLaunchError",
    "VllmServer",
    "bundle_gpus",
    "cluster_address",
    "main",
    "serve_in_actor",
    "server_argv",
    "vllm_command",
    "vllm_env",
]

log = logging.getLogger("shoal." + __name__)

# Flags Shoal owns: set from the GroupSpec, a conflicting value in the user's flags is an error.
_OWNED_FLAGS = {
    "--tensor-parallel-size": "tp",
    "-tp": "tp",
    "--pipeline-parallel-size": "pp",
    "-pp": "pp",
    "--distributed-executor-backend": "backend",
    "--port": "port",
    "--host": "host",
}
PROBE_TIMEOUT_S = 30.0
SHM_SCAN_S = 2.0  # how often the launcher notes the engine's shared memory


class VllmLaunchError(RayGroupError):
    """vLLM cannot be launched in the group as asked: flags that contradict the group
    (another tp/pp/backend), no placement group, or the server actor could not start."""


def vllm_command(
    python: str, *, extra_flags: Sequence[str] = (), module: str = "control.ray.vllm"
) -> str:
    """A GroupSpec.engine_command template for ``workers="vllm"``: the group's driver
    actor fills ``{placement_group}``, ``{host}``, ``{port}``, ``{model}``, ``{tp}``,
    ``{pp}``. ``python`` is the interpreter with vLLM (the image's)."""
    flags = " ".join(shlex.quote(flag) for flag in extra_flags)
    return (
        f"{shlex.quote(python)} -m {module} --placement-group {{placement_group}} -- "
        "--model {model} --host {host} --port {port} "
        "--tensor-parallel-size {tp} --pipeline-parallel-size {pp}" + (f" {flags}" if flags else "")
    )


def server_argv(
    flags: Sequence[str], *, tp: int, pp: int, host: str, port: int, shutdown_timeout_s: int = 10
) -> list[str]:
    """vLLM server flags with the group's own: tp, pp, ``--distributed-executor-backend
    ray``, host and port. A user flag that says otherwise raises VllmLaunchError naming
    it; an equal one is kept once. ``--shutdown-timeout`` is added unless given: vLLM's
    default 0 SIGKILLs the EngineCore on SIGTERM, its Ray workers die unclean and leave
    their shared-memory queues in ``/dev/shm`` (measured: 4 segments, 0.7 GB, per stop)."""
    want = {"tp": str(tp), "pp": str(pp), "backend": "ray", "port": str(port), "host": host}
    out: list[str] = []
    seen: set[str] = set()
    index = 0
    while index < len(flags):
        flag = flags[index]
        name, eq, inline = flag.partition("=")
        key = _OWNED_FLAGS.get(name)
        if key is None:
            out.append(flag)
            index += 1
            continue
        if eq:
            value, index = inline, index + 1
        elif index + 1 < len(flags):
            value, index = flags[index + 1], index + 2
        else:
            raise VllmLaunchError(f"{name} has no value")
        if value != want[key]:
            raise VllmLaunchError(
                f"{name} {value} contradicts the group ({key} {want[key]}): the group "
                "sets it; drop it from the engine command"
            )
        seen.add(key)
    for flag, key in (
        ("--tensor-parallel-size", "tp"),
        ("--pipeline-parallel-size", "pp"),
        ("--distributed-executor-backend", "backend"),
        ("--host", "host"),
        ("--port", "port"),
    ):
        out += [flag, want[key]]
    if _flag_value(flags, "--shutdown-timeout") is None:
        out += ["--shutdown-timeout", str(shutdown_timeout_s)]
    return out


def vllm_env(
    *, world_size: int, gpus_per_worker: float, ray_address: str, base: Mapping[str, str]
) -> dict[str, str]:
    """The environment of vLLM's server (and, through vLLM, its EngineCore): the group's
    env ``base`` plus what makes vLLM use the group (notes 4, 5). Shoal's keys win."""
    return {
        **base,
        "RAY_ADDRESS": ray_address,
        "VLLM_RAY_BUNDLE_INDICES": ",".join(str(i) for i in range(world_size)),
        "VLLM_RAY_PER_WORKER_GPUS": f"{gpus_per_worker:g}",
        "VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _node_name() -> str:
    labels = ray.get_runtime_context().get_node_labels()
    return str(labels.get("shoal.node") or os.uname().nodename)


@ray.remote(num_cpus=0)
def _probe() -> tuple[str, list[int]]:
    return _node_name(), [int(i) for i in ray.get_gpu_ids()]


def bundle_gpus(
    pg: PlacementGroup, *, world_size: int, gpus_per_worker: float = 1.0
) -> tuple[str, ...]:
    """``NODE/gpuI`` of bundles 0..world-1, i.e. of vLLM's ranks in order (note 4). Call
    it before vLLM starts: a probe waits for its bundle's GPU, which vLLM's worker holds."""
    refs = [
        _probe.options(
            num_gpus=gpus_per_worker,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index
            ),
        ).remote()
        for index in range(world_size)
    ]
    found = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    return tuple(f"{node}/gpu{gpu}" for node, gpus in found for gpu in gpus)


def serve_in_actor(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Run vLLM's OpenAI server in this process until it stops. Must run inside a Ray
    actor scheduled in the group's placement group (note 1)."""
    if ray.util.get_current_placement_group() is None:
        raise VllmLaunchError(
            "not in a placement group: vLLM would create its own; run it through VllmServer"
        )
    os.environ.update(env)
    # vLLM's own modules, imported by name: they exist only in the engine's Python, and
    # the checker's vLLM (another version) has other signatures.
    uvloop = importlib.import_module("uvloop")
    entry = importlib.import_module("vllm.entrypoints.launchers.api_server.entry")
    cli_args = importlib.import_module("vllm.entrypoints.launchers.cli_args")
    api_utils = importlib.import_module("vllm.entrypoints.serve.utils.api_utils")
    argparse_utils = importlib.import_module("vllm.utils.argparse_utils")

    api_utils.cli_env_setup()
    args = cli_args.make_arg_parser(argparse_utils.FlexibleArgumentParser()).parse_args(list(argv))
    cli_args.validate_parsed_serve_args(args)
    uvloop.run(entry.run_server(args))


class _VllmServer:
    """The actor vLLM's API server runs in (note 2). ``serve`` blocks for the server's
    life; it runs on the actor's main thread, where vLLM installs its signal handlers."""

    def pid(self) -> int:
        return os.getpid()

    def serve(self, argv: list[str], env: dict[str, str]) -> str:
        serve_in_actor(argv, env)
        return "stopped"


VllmServer = ray.remote(_VllmServer)


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m control.ray.vllm",
        description="Run vLLM's OpenAI server in bundle 0 of an engine group's placement group.",
    )
    parser.add_argument(
        "--placement-group", required=True, help="the group's placement group id (hex)"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="default: RAY_ADDRESS, else the cluster of the Ray worker that started us",
    )
    parser.add_argument("--gpus-per-worker", type=float, default=1.0)
    parser.add_argument("--grace-s", type=float, default=20.0, help="SIGTERM -> vLLM stopped")
    args_end = list(argv).index("--") if "--" in argv else len(argv)
    args = parser.parse_args(list(argv)[:args_end])
    return args, list(argv)[args_end + 1 :]


def cluster_address(env: Mapping[str, str]) -> str:
    """The GCS address to join. A process started by a Ray actor (the group's driver) has
    no RAY_ADDRESS but inherits RAY_RAYLET_PID, and the raylet's command line names its
    cluster (``--gcs-address=IP:PORT``); ``auto`` would take the machine's newest cluster,
    which on a machine with several is not necessarily ours."""
    if env.get("RAY_ADDRESS"):
        return env["RAY_ADDRESS"]
    raylet = env.get("RAY_RAYLET_PID")
    if raylet:
        try:
            words = psutil.Process(int(raylet)).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
            words = []  # Ray's own discovery, below
        for word in words:
            if word.startswith("--gcs-address="):
                return str(word.partition("=")[2])
    return "auto"


def _flag_value(flags: Sequence[str], *names: str) -> str | None:
    for index, flag in enumerate(flags):
        name, eq, inline = flag.partition("=")
        if name in names:
            return inline if eq else (flags[index + 1] if index + 1 < len(flags) else None)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher (note 3): exit 0 when the server stopped, 1 when it failed, 143 on
    SIGTERM (after killing the server actor)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args, flags = _parse(sys.argv[1:] if argv is None else argv)
    tp = int(_flag_value(flags, "--tensor-parallel-size", "-tp") or 1)
    pp = int(_flag_value(flags, "--pipeline-parallel-size", "-pp") or 1)
    host = _flag_value(flags, "--host") or "127.0.0.1"
    port = int(_flag_value(flags, "--port") or 8000)
    full = server_argv(flags, tp=tp, pp=pp, host=host, port=port)
    ray.init(address=args.ray_address or cluster_address(os.environ), log_to_driver=True)
    address = ray.get_runtime_context().gcs_address
    pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(args.placement_group)))
    gpus = bundle_gpus(pg, world_size=tp * pp, gpus_per_worker=args.gpus_per_worker)
    log.info("vLLM ranks 0..%d on %s", tp * pp - 1, ",".join(gpus))
    print(f"SHOAL_VLLM_GPUS={','.join(gpus)}", flush=True)
    env = vllm_env(
        world_size=tp * pp,
        gpus_per_worker=args.gpus_per_worker,
        ray_address=address,
        base={
            k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "TRANSFORMERS_"))
        },
    )
    server: Any = VllmServer.options(
        num_cpus=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg,
            placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True,
        ),
    ).remote()
    server_pid = int(ray.get(server.pid.remote()))  # same node: bundle 0 is ours
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    ref = server.serve.remote(full, env)
    segments: set[Path] = set()
    try:
        while not stopping:
            done, _ = ray.wait([ref], timeout=SHM_SCAN_S)
            if done:
                return _outcome(ref)
            segments |= mapped_shm(server_pid)
        segments |= mapped_shm(server_pid)
        segments |= workers_shm(segments)
        _stop_server(server_pid, ref, args.grace_s)
        return 128 + stopping[0]
    finally:
        ray.kill(server)  # a no-op when vLLM already stopped; else its workers die with it
        ray.shutdown()
        _unlink(segments)


def mapped_shm(pid: int) -> set[Path]:
    """The ``/dev/shm`` segments that process ``pid`` and its children map: for the server
    actor, vLLM's EngineCore maps its message queue to every worker (it created the
    broadcast one, it reads the workers' response ones)."""
    try:
        root = psutil.Process(pid)
        return _maps([root, *root.children(recursive=True)])
    except psutil.NoSuchProcess:
        return set()


def workers_shm(engine_segments: set[Path]) -> set[Path]:
    """The segments of this node's vLLM workers of *this* engine: Ray worker processes
    (``ray::...``) that map one of the engine's segments; their own (a TP group's queue,
    on CPU the ``PORT-tp:...-cpushm_RANK`` buffers) included."""
    if not engine_segments:
        return set()
    found: set[Path] = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or [""]
        if not cmdline or not cmdline[0].startswith("ray::RayWorkerProc"):
            continue
        theirs = _maps([process])
        if theirs & engine_segments:
            found |= theirs
    return found


def _maps(processes: Sequence[psutil.Process]) -> set[Path]:
    found: set[Path] = set()
    for process in processes:
        try:
            maps = process.memory_maps(grouped=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {Path(m.path) for m in maps if m.path.startswith("/dev/shm/")}
    return found


def _unlink(segments: set[Path]) -> None:
    """vLLM 0.32's RayExecutorV2.shutdown ends its workers with ``ray.kill`` (SIGKILL), so
    the queues they own stay in /dev/shm (measured: 3 segments, 0.5 GB, per stop). The
    engine is gone when this runs; what it mapped and still exists is its leftover."""
    for segment in sorted(segments):
        try:
            segment.unlink()
            log.info("removed %s, left by vLLM's killed workers", segment)
        except FileNotFoundError:
            continue


def _outcome(ref: Any) -> int:
    try:
        log.info("vLLM server ended: %s", ray.get(ref))
        return 0
    except ray.exceptions.RayError as exc:
        log.error("vLLM server failed: %s", exc)
        return 1


def _stop_server(pid: int, ref: Any, grace_s: float) -> None:
    """vLLM's own SIGTERM handler shuts the engine down: its EngineCore, its workers and
    their shared-memory queues (``/dev/shm/psm_*``, which a killed engine leaks)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    started = time.monotonic()
    while time.monotonic() - started < grace_s:
        done, _ = ray.wait([ref], timeout=0.5)
        if done:
            _outcome(ref)
            return
    log.warning("vLLM server still up %.0f s after SIGTERM: killing it", grace_s)


if __name__ == "__main__":
    sys.exit(main())
