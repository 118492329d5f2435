"""Contracts (a)-(c): the node-local contract between the cache daemon and the engines.

    one_uid       (a) every container of a pod mounting a node dir (``values.node_dirs``) runs
                  as ``values.run_as_user`` / ``run_as_group`` under a pod with
                  ``runAsNonRoot: true``; the init ``node-dirs`` is excepted (it chowns them as
                  root), but every ``chown U:G`` it runs must name that same UID:GID: the arena
                  is 0600 and the socket dir 0700, so a different owner locks the engines out
    one_shm_path  (b) the daemon's ``SHOAL_CACHE_SHM_DIR`` = every engine's = the host path
                  mounted there; the engine connector's endpoint is
                  ``ipc://<daemon runtime dir>/shoal-<name>.sock``; the engine's KV-events
                  ``endpoint`` / ``replay_endpoint`` (``--kv-events-config``) are among the
                  daemon's ``SHOAL_CACHE_ENGINE_EVENTS`` / ``_REPLAY`` at the same index, under
                  the runtime dir. An endpoint written with a shell variable (``gpu$i.pub``,
                  the slot an engine claims at start) stands for every slot
                  ``0..values.cache.num_event_slots-1``, each of which must be followed.
    same_host_pid (c) ``hostPID`` equal on the daemon and the engines (pidfd lease release)

vLLM parses its flags with argparse, which keeps the last copy of a repeated flag, so the
last ``--kv-transfer-config`` / ``--kv-events-config`` is the one checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from deploy.checks import (
    PodTemplate,
    Problem,
    all_containers,
    command_words,
    contract_problem,
    env_of,
    flag_values,
    is_under,
    pod_templates,
    shoal_component,
)
from deploy.objects import LABEL_COMPONENT
from deploy.values import Values

__all__ = ["engines", "flag_json", "one_shm_path", "one_uid", "pods", "same_host_pid"]

Obj = dict[str, Any]
_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_CHOWN = re.compile(r"\bchown\s+(?:-\w+\s+)*(\S+)")


def default_of(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def pods(objects: list[Obj], component: str) -> list[PodTemplate]:
    return [p for p in pod_templates(objects) if p.labels.get(LABEL_COMPONENT) == component]


def flag_json(container: Obj, flag: str) -> Obj | None:
    """The JSON object given to ``flag`` (its last copy); {} when it is not an object."""
    found = flag_values(command_words(container), flag)
    if not found:
        return None
    try:
        config = json.loads(found[-1])
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _host_paths(pod: PodTemplate, container: Obj) -> dict[str, str]:
    """mountPath -> host path, for the container's hostPath mounts."""
    volumes = {
        v["name"]: v["hostPath"]["path"] for v in pod.spec.get("volumes") or [] if "hostPath" in v
    }
    return {
        m["mountPath"]: volumes[m["name"]]
        for m in container.get("volumeMounts") or []
        if m.get("name") in volumes
    }


# --- (a) one UID/GID ------------------------------------------------------------------------


def one_uid(objects: list[Obj], values: Values) -> list[Problem]:
    dirs = (values.node_dirs.shm_dir, values.node_dirs.runtime_dir)
    want = {"runAsUser": values.run_as_user, "runAsGroup": values.run_as_group}
    owner = f"{values.run_as_user}:{values.run_as_group}"
    problems = []
    for pod in pod_templates(objects):
        host = [v["hostPath"]["path"] for v in pod.spec.get("volumes") or [] if "hostPath" in v]
        if not any(is_under(path, d) or is_under(d, path) for path in host for d in dirs):
            continue
        if (pod.spec.get("securityContext") or {}).get("runAsNonRoot") is not True:
            problems.append(
                contract_problem(pod.where, "mounts a node dir without runAsNonRoot: true")
            )
        inits = {c.get("name") for c in pod.spec.get("initContainers") or []}
        for container in all_containers(pod.spec):
            if container.get("name") == "node-dirs" and "node-dirs" in inits:
                for chown in _CHOWN.findall(" ".join(command_words(container))):
                    if chown != owner:
                        problems.append(
                            contract_problem(
                                pod.where,
                                f"init node-dirs runs chown {chown}, not {owner} "
                                "(values.run_as_*): the daemon and engines could not use the dirs",
                            )
                        )
                continue
            context = {
                **(pod.spec.get("securityContext") or {}),
                **(container.get("securityContext") or {}),
            }
            for key, expected in want.items():
                if context.get(key) != expected:
                    problems.append(
                        contract_problem(
                            pod.where,
                            f"container {container.get('name')} mounts a node dir but runs with "
                            f"{key} {context.get(key)}, not {expected} (values.run_as_*)",
                        )
                    )
    return problems


# --- (b) one shm path, one socket, the KV-events endpoints; (c) hostPID ---------------------


def _daemons(objects: list[Obj]) -> list[tuple[PodTemplate, Obj]]:
    return [
        (pod, c)
        for pod in pods(objects, "cache")
        for c in all_containers(pod.spec)
        if shoal_component(c) == "cache"
    ]


def engines(objects: list[Obj]) -> list[tuple[PodTemplate, Obj]]:
    """(pod, container) of every engine container (vLLM with the Shoal connector)."""
    return [
        (pod, c)
        for pod in pods(objects, "engine")
        for c in all_containers(pod.spec)
        if not shoal_component(c)
        and ("SHOAL_CACHE_SHM_DIR" in env_of(c) or flag_json(c, "--kv-transfer-config") is not None)
    ]


def _listed(env: dict[str, str], name: str) -> list[str]:
    return [e.strip() for e in env.get(name, "").split(",") if e.strip()]


def _events_problems(
    events: Obj, daemon: dict[str, str], runtime_dir: str, slots: int
) -> list[str]:
    """What is wrong with an engine's ``--kv-events-config`` against the daemon's env."""
    followed = _listed(daemon, "SHOAL_CACHE_ENGINE_EVENTS")
    replays = _listed(daemon, "SHOAL_CACHE_ENGINE_EVENTS_REPLAY")
    endpoint, replay = events.get("endpoint"), events.get("replay_endpoint")
    if not isinstance(endpoint, str):
        return [f"--kv-events-config has no endpoint ({events})"]
    choices = [None] if not _VARIABLE.search(endpoint) else list(range(slots))
    if not choices:
        return [
            f"the KV-events endpoint {endpoint} picks a slot, but there are none "
            "(values.cache.num_event_slots 0)"
        ]
    messages = []
    for slot in choices:
        mine = endpoint if slot is None else _VARIABLE.sub(str(slot), endpoint)
        path = mine.removeprefix("ipc://")
        if not (mine.startswith("ipc://") and runtime_dir and is_under(path, runtime_dir)):
            messages.append(f"the KV-events endpoint {mine} is not ipc:// under {runtime_dir}")
        if mine not in followed:
            messages.append(
                f"the KV-events endpoint {mine} is not among the daemon's "
                f"SHOAL_CACHE_ENGINE_EVENTS {followed}"
            )
            continue
        if isinstance(replay, str):
            theirs = replay if slot is None else _VARIABLE.sub(str(slot), replay)
            index = followed.index(mine)
            paired = replays[index] if index < len(replays) else None
            if theirs != paired:
                messages.append(
                    f"the KV-events replay endpoint {theirs} != the daemon's "
                    f"SHOAL_CACHE_ENGINE_EVENTS_REPLAY for {mine} ({paired})"
                )
    return messages


def one_shm_path(objects: list[Obj], values: Values) -> list[Problem]:
    from kvcache.config import CacheConfig

    problems: list[Problem] = []
    for pod, daemon in _daemons(objects):
        env = env_of(daemon)
        shm_dir = env.get("SHOAL_CACHE_SHM_DIR", default_of(CacheConfig, "shm_dir"))
        runtime_dir = env.get("SHOAL_CACHE_RUNTIME_DIR", "")
        socket = f"ipc://{runtime_dir}/shoal-{env.get('SHOAL_CACHE_NAME', 'default')}.sock"
        if not runtime_dir:
            problems.append(
                contract_problem(
                    pod.where,
                    (
                        "the cache daemon has no SHOAL_CACHE_RUNTIME_DIR (its default depends on "
                        "$XDG_RUNTIME_DIR, which engines cannot know)"
                    ),
                )
            )
        for owner, container, role in [(pod, daemon, "daemon")] + [
            (p, c, "engine") for p, c in engines(objects)
        ]:
            mounts = _host_paths(owner, container)
            name = f"{role} container {container.get('name')}"
            theirs = env_of(container).get("SHOAL_CACHE_SHM_DIR")
            if role == "engine" and theirs != shm_dir:
                problems.append(
                    contract_problem(
                        owner.where,
                        (f"{name}: SHOAL_CACHE_SHM_DIR {theirs!r} != the daemon's {shm_dir!r}"),
                    )
                )
            if mounts.get(shm_dir) != shm_dir:
                problems.append(
                    contract_problem(
                        owner.where,
                        (
                            f"{name}: {shm_dir} is not the host path {shm_dir} mounted at the same "
                            f"path (mounted: {mounts.get(shm_dir)})"
                        ),
                    )
                )
            if runtime_dir and mounts.get(runtime_dir) != runtime_dir:
                problems.append(
                    contract_problem(
                        owner.where,
                        (
                            f"{name}: the runtime dir {runtime_dir} is not a host path mounted "
                            "at the same path"
                        ),
                    )
                )
            if role == "daemon":
                continue
            config = flag_json(container, "--kv-transfer-config")
            if config is not None:
                endpoint = (config.get("kv_connector_extra_config") or {}).get("endpoint")
                if endpoint != socket:
                    problems.append(
                        contract_problem(
                            owner.where,
                            (
                                f"{name}: the connector endpoint {endpoint!r} != the daemon's "
                                f"socket {socket!r}"
                            ),
                        )
                    )
            events = flag_json(container, "--kv-events-config")
            if events is not None and events.get("enable_kv_cache_events", True):
                slots = values.cache.num_event_slots
                for message in _events_problems(events, env, runtime_dir, slots):
                    problems.append(contract_problem(owner.where, f"{name}: {message}"))
    return problems


def same_host_pid(objects: list[Obj], values: Values) -> list[Problem]:
    daemons = {bool(p.spec.get("hostPID", False)) for p in pods(objects, "cache")}
    problems = []
    for pod in pods(objects, "engine"):
        mine = bool(pod.spec.get("hostPID", False))
        if daemons and daemons != {mine}:
            problems.append(
                contract_problem(
                    pod.where,
                    f"hostPID {mine} differs from the cache daemon's {sorted(daemons)} (leases "
                    "of a killed engine are freed by pidfd only when both see the host's PIDs)",
                )
            )
    return problems
