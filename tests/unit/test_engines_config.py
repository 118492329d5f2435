"""``shoal engines serve`` settings: layering, validation messages, the template and its
revision, ``POST /v1/update``'s changes; the autoscaler's ``ray:URL`` target and the
placement planner's ``TYPE=ray:URL`` pool."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from control.autoscale.actuators.ray import RayFleetActuator
from control.autoscale.config import AutoscaleSettings
from control.autoscale.controller import make_actuator
from control.placement.config import PlacementSettings, PoolSpec, parse_pools
from control.ray.config import (
    EnginesSettings,
    apply_update,
    check_serve,
    fleet_spec,
    gpu_health_urls,
    group_template,
    template_revision,
)
from control.ray.types import FleetSpec, GroupSpec
from shoal.config import load_config
from shoal.errors import ConfigError

SIM = "shoal sim engine --port {port}"


def serve_settings(**changes: object) -> EnginesSettings:
    return EnginesSettings(model="m", engine_command=SIM, **changes)  # type: ignore[arg-type]


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "shoal.toml"
    config.write_text('[engines]\nreplicas = 3\ntp = 2\nstrategy = "SPREAD"\nport = 9000\n')
    settings = load_config(
        EnginesSettings,
        "engines",
        flags={"replicas": "4"},
        environ={"SHOAL_ENGINES_TP": "4", "SHOAL_ENGINES_REPLICAS": "5"},
        config_path=config,
    )
    assert (settings.replicas, settings.tp, settings.strategy, settings.port) == (
        4,
        4,
        "SPREAD",
        9000,
    )
    assert (settings.host, EnginesSettings().port) == ("127.0.0.1", 8093)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"tp": 0}, "--tp and --pp must be >= 1"),
        ({"replicas": 5, "max_replicas": 4}, "0 <= --replicas <= --max-replicas"),
        ({"strategy": "pack"}, "use one of PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
        ({"workers": "ray"}, "use standin or vllm"),
        ({"max_surge": 0, "max_unavailable": 0}, "--max-surge 1"),
        ({"interval_s": 0}, "--interval-s must be > 0"),
        ({"drain_s": -1}, "--drain-s and --stop-grace-s must be >= 0"),
        ({"host": "0.0.0.0"}, "--auth-token-file FILE, or --insecure-no-auth"),
        ({"gpu_health": "node-a:8094"}, "http://node-a:8094"),
    ],
)
def test_inconsistent_settings_name_the_fix(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EnginesSettings(**changes)  # type: ignore[arg-type]


def test_beyond_loopback_with_a_token_or_the_insecure_flag_or_no_port() -> None:
    EnginesSettings(host="0.0.0.0", auth_token_file="/t")
    EnginesSettings(host="0.0.0.0", insecure_no_auth=True)
    EnginesSettings(host="0.0.0.0", port=0)


def test_serve_needs_a_model_and_an_engine_command_with_a_port() -> None:
    with pytest.raises(ConfigError, match="--model is required"):
        check_serve(EnginesSettings(engine_command=SIM))
    with pytest.raises(ConfigError, match="needs \\{port\\}"):
        check_serve(EnginesSettings(model="m", engine_command="shoal sim engine"))
    check_serve(serve_settings())


def test_gpu_health_urls_are_split_and_trimmed() -> None:
    assert gpu_health_urls(" http://a:8094/, https://b:8094 ,") == (
        "http://a:8094",
        "https://b:8094",
    )
    assert gpu_health_urls("") == ()


def test_the_fleet_spec_carries_every_setting_and_a_content_revision() -> None:
    settings = serve_settings(
        tp=2, pp=2, replicas=3, strategy="STRICT_SPREAD", accelerator_type="A100",
        gpu_type="a100-80g", driver_cpus=2.0, wait_deadline_s=30.0, ready_timeout_s=60.0,
        max_surge=2, max_unavailable=1,
    )  # fmt: skip
    spec = fleet_spec(settings)
    expected = GroupSpec(
        model="m", engine_command=SIM, tensor_parallel=2, pipeline_parallel=2,
        strategy="STRICT_SPREAD", accelerator_type="A100", driver_cpus=2.0,
        wait_deadline_s=30.0, ready_timeout_s=60.0, gpu_type="a100-80g",
    )  # fmt: skip
    assert spec == FleetSpec(
        template=dataclasses.replace(expected, revision=template_revision(expected)),
        replicas=3,
        max_surge=2,
        max_unavailable=1,
    )
    assert len(spec.template.revision) == 12
    # the revision is the content: same template, same revision; any change, another
    assert group_template(settings).revision == spec.template.revision
    assert group_template(serve_settings(tp=2, pp=2)).revision != spec.template.revision


def test_the_revision_ignores_the_old_revision_and_the_order_of_env() -> None:
    a = GroupSpec(model="m", engine_command=SIM, env={"A": "1", "B": "2"}, revision="x")
    b = GroupSpec(model="m", engine_command=SIM, env={"B": "2", "A": "1"}, revision="y")
    assert template_revision(a) == template_revision(b)
    assert template_revision(a) != template_revision(dataclasses.replace(a, env={"A": "1"}))


def test_an_update_changes_the_named_fields_and_the_revision() -> None:
    template = group_template(serve_settings())
    updated = apply_update(
        template, {"engine_command": SIM + " --x", "env": {"K": "v"}, "tp": 2, "pp": 1}
    )
    assert updated == dataclasses.replace(
        template,
        engine_command=SIM + " --x",
        env={"K": "v"},
        tensor_parallel=2,
        revision=template_revision(updated),
    )
    assert updated.revision != template.revision
    assert apply_update(template, {}).revision == template.revision
    assert apply_update(template, {"workers": "vllm"}).workers == "vllm"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"replicas": 2}, r"unknown key\(s\) \['replicas'\]; updatable: model, engine_command"),
        ({"tp": 0}, "'tp' must be an integer >= 1"),
        ({"tp": True}, "'tp' must be an integer >= 1"),
        ({"pp": "2"}, "'pp' must be an integer >= 1"),
        ({"env": {"K": 1}}, '"env" must be an object of strings'),
        ({"env": ["K=v"]}, '"env" must be an object of strings'),
        ({"engine_command": "vllm serve m"}, "needs \\{port\\}"),
        ({"engine_command": 3}, "'engine_command' must be a string"),
        ({"strategy": "FAST"}, '"strategy" must be one of PACK'),
        ({"model": ""}, '"model" must not be empty'),
        ({"wait_deadline_s": 0}, "'wait_deadline_s' must be a number > 0"),
        ({"workers": "x"}, '"workers" must be standin or vllm'),
    ],
)
def test_a_bad_update_names_the_key(body: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_update(group_template(serve_settings()), body)


def test_the_autoscaler_targets_a_ray_fleet_by_url(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    actuator = make_actuator(
        AutoscaleSettings(target="ray:http://10.0.0.5:8093/", target_token_file=str(token))
    )
    assert isinstance(actuator, RayFleetActuator)
    assert actuator.url == "http://10.0.0.5:8093"
    assert actuator._headers == {"Authorization": "Bearer s3cret"}
    with pytest.raises(ConfigError, match="ray:http://127.0.0.1:8093"):
        make_actuator(AutoscaleSettings(target="ray:10.0.0.5:8093"))


def test_a_placement_pool_can_be_a_ray_fleet() -> None:
    settings = PlacementSettings(pool="A100=ray:http://h:8093;A10G=memory")
    assert parse_pools(settings) == (
        PoolSpec("A100", "ray", name="http://h:8093"),
        PoolSpec("A10G", "memory"),
    )
    with pytest.raises(ConfigError, match="TYPE=ray:http://HOST:8093"):
        parse_pools(PlacementSettings(pool="A100=ray:h:8093"))
