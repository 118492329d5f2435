"""control/ray/vllm.py's pure parts: the vLLM server flags and environment a group sets,
and the engine command template the group's driver fills."""

from __future__ import annotations

import shlex

import pytest

from control.ray import vllm
from control.ray.errors import RayGroupError
from control.ray.vllm import (
    VllmLaunchError,
    cluster_address,
    server_argv,
    vllm_command,
    vllm_env,
)

OWNED = [
    "--tensor-parallel-size", "2",
    "--pipeline-parallel-size", "1",
    "--distributed-executor-backend", "ray",
    "--host", "10.0.0.5",
    "--port", "8123",
]  # fmt: skip


def argv(flags: list[str], **overrides: object) -> list[str]:
    kwargs: dict[str, object] = {"tp": 2, "pp": 1, "host": "10.0.0.5", "port": 8123}
    kwargs.update(overrides)
    return server_argv(flags, **kwargs)  # type: ignore[arg-type]


def test_the_group_sets_tp_pp_backend_host_port_and_a_shutdown_timeout() -> None:
    assert argv(["--model", "/m", "--enforce-eager"]) == [
        "--model", "/m", "--enforce-eager", *OWNED, "--shutdown-timeout", "10",
    ]  # fmt: skip


def test_flags_equal_to_the_groups_are_kept_once_in_either_spelling() -> None:
    flags = ["--model", "/m", "--tensor-parallel-size=2", "-pp", "1", "--port", "8123"]
    assert argv(flags) == ["--model", "/m", *OWNED, "--shutdown-timeout", "10"]


def test_a_given_shutdown_timeout_is_the_users() -> None:
    assert argv(["--shutdown-timeout", "30"]) == ["--shutdown-timeout", "30", *OWNED]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tensor-parallel-size", "4"], "--tensor-parallel-size 4 contradicts the group (tp 2)"),
        (["-tp=1"], "-tp 1 contradicts the group (tp 2)"),
        (["--distributed-executor-backend", "mp"], "--distributed-executor-backend mp"),
        (["--port", "9000"], "--port 9000 contradicts the group (port 8123)"),
    ],
)
def test_a_flag_that_contradicts_the_group_is_refused_by_name(flags: list[str], named: str) -> None:
    with pytest.raises(VllmLaunchError, match=named.replace("(", r"\(").replace(")", r"\)")):
        argv(flags)


def test_an_owned_flag_without_a_value_is_refused() -> None:
    with pytest.raises(VllmLaunchError, match="--port has no value"):
        argv(["--model", "/m", "--port"])


def test_launch_errors_belong_to_the_ray_group_tree() -> None:
    assert issubclass(VllmLaunchError, RayGroupError)


def test_the_environment_pins_rank_r_to_bundle_r_and_joins_the_groups_cluster() -> None:
    env = vllm_env(
        world_size=4,
        gpus_per_worker=0.5,
        ray_address="10.0.0.1:6379",
        base={"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "elsewhere:1", "VLLM_RAY_BUNDLE_INDICES": "3"},
    )
    assert env == {
        "HF_HUB_OFFLINE": "1",
        "RAY_ADDRESS": "10.0.0.1:6379",
        "VLLM_RAY_BUNDLE_INDICES": "0,1,2,3",
        "VLLM_RAY_PER_WORKER_GPUS": "0.5",
        "VLLM_USE_RAY_V2_EXECUTOR_BACKEND": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def test_the_command_template_filled_by_the_driver_parses_back_into_the_launch() -> None:
    template = vllm_command("/opt/engine env/bin/python", extra_flags=["--max-model-len", "2048"])
    line = template.format(
        placement_group="ab12", model="/models/m", host="10.0.0.5", port=8123, tp=2, pp=1
    )
    words = shlex.split(line)
    assert words[:3] == ["/opt/engine env/bin/python", "-m", "control.ray.vllm"]
    args, flags = vllm._parse(words[3:])
    assert args.placement_group == "ab12"
    assert args.grace_s == 20.0
    assert argv(flags) == [
        "--model", "/models/m", "--max-model-len", "2048", *OWNED, "--shutdown-timeout", "10",
    ]  # fmt: skip


def test_the_cluster_is_ray_address_first_else_rays_own_discovery() -> None:
    assert cluster_address({"RAY_ADDRESS": "10.0.0.1:6379", "RAY_RAYLET_PID": "1"}) == (
        "10.0.0.1:6379"
    )
    assert cluster_address({}) == "auto"
    assert cluster_address({"RAY_RAYLET_PID": "not-a-pid"}) == "auto"
