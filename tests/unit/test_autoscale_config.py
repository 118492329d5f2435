"""``shoal autoscale run`` settings: --metrics and --options parsing, the policy spec."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control.autoscale.config import AutoscaleSettings, parse_metrics, parse_options, policy_spec
from control.autoscale.errors import PolicyConfigError
from control.autoscale.types import MetricTarget
from shoal.config import load_config
from shoal.errors import ConfigError


def test_metrics_parse_into_targets_in_order() -> None:
    assert parse_metrics("kv_cache_usage:0.7, requests_waiting:4") == (
        MetricTarget("kv_cache_usage", 0.7),
        MetricTarget("requests_waiting", 4.0),
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("gpu_cache_usage:0.7", "unknown metric 'gpu_cache_usage'; known: kv_cache_usage"),
        ("kv_cache_usage", "METRIC:TARGET"),
        ("kv_cache_usage:-1", "METRIC:TARGET"),
        ("", "names no metric"),
        ("kv_cache_usage:0.5,kv_cache_usage:0.6", "twice"),
    ],
)
def test_bad_metrics_are_config_errors_that_name_the_fix(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_metrics(text)


def test_options_are_numbers_where_they_parse() -> None:
    assert parse_options("stable_window_s=60, mode=fast,") == {
        "stable_window_s": 60.0,
        "mode": "fast",
    }
    with pytest.raises(PolicyConfigError, match="NAME=VALUE"):
        parse_options("stable_window_s")


def test_shoal_policy_gets_the_slos_and_profile_and_options_win() -> None:
    settings = AutoscaleSettings(
        policy="shoal", ttft_slo_s=0.5, profile="p.json", options="tpot_slo_s=0.05"
    )
    spec = policy_spec(settings)
    assert spec.options == {"ttft_slo_s": 0.5, "tpot_slo_s": 0.05, "profile": "p.json"}
    assert spec.min_replicas == 1 and spec.max_replicas == 10


def test_other_policies_get_only_their_options() -> None:
    spec = policy_spec(AutoscaleSettings(policy="kpa", options="panic_threshold=2"))
    assert spec.options == {"panic_threshold": 2.0}


def test_settings_come_from_flags_environment_and_file(tmp_path: Path) -> None:
    path = tmp_path / "shoal.toml"
    path.write_text('[autoscale]\npolicy = "hpa"\nmax_replicas = 4\ninterval_s = 5\n')
    settings = load_config(
        AutoscaleSettings,
        "autoscale",
        flags={"interval_s": "1.5"},
        environ={"SHOAL_AUTOSCALE_MIN_REPLICAS": "0"},
        config_path=path,
    )
    assert (settings.policy, settings.min_replicas, settings.max_replicas) == ("hpa", 0, 4)
    assert settings.interval_s == 1.5


def test_inconsistent_bounds_are_refused() -> None:
    with pytest.raises(ConfigError, match="min-replicas"):
        AutoscaleSettings(min_replicas=3, max_replicas=2)


@pytest.mark.parametrize("policy", ["kpa", "apa", "hpa", "aibrix-kpa", "shoal"])
def test_every_policy_builds_from_the_default_settings(policy: str) -> None:
    from control.autoscale.policies.base import make_policy

    built = make_policy(policy, policy_spec(AutoscaleSettings(policy=policy)))
    assert built.name == policy


def test_an_option_the_policy_does_not_know_is_refused() -> None:
    from control.autoscale.policies.base import make_policy

    settings = AutoscaleSettings(policy="kpa", options="stable_windw_s=30")
    with pytest.raises(PolicyConfigError, match="stable_windw_s"):
        make_policy("kpa", policy_spec(settings))


@pytest.mark.parametrize(
    ("flags", "ok"),
    [
        ({"host": "127.0.0.1"}, True),
        ({"host": "localhost"}, True),
        ({"host": "::1"}, True),
        ({"host": "0.0.0.0"}, False),
        ({"host": "node-1.example"}, False),  # a name may resolve anywhere
        ({"host": "0.0.0.0", "port": 0}, True),  # nothing listens
        ({"host": "0.0.0.0", "auth_token_file": "/run/token"}, True),
        ({"host": "0.0.0.0", "insecure_no_auth": True}, True),
    ],
)
def test_listening_beyond_loopback_needs_a_token_or_an_explicit_flag(
    flags: dict[str, object], ok: bool
) -> None:
    if ok:
        AutoscaleSettings(**flags)  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError, match="--auth-token-file FILE, or --insecure-no-auth"):
            AutoscaleSettings(**flags)  # type: ignore[arg-type]


def test_a_token_file_must_hold_a_token(tmp_path: Path) -> None:
    from control.autoscale.config import read_token

    (tmp_path / "token").write_text("  abc\n")
    assert read_token(str(tmp_path / "token")) == "abc"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read it"):
        read_token(str(tmp_path / "missing"))


def test_the_engine_stop_grace_reaches_the_local_actuator(tmp_path: Path) -> None:
    from control.autoscale.actuators.local import LocalActuator
    from control.autoscale.controller import make_actuator

    settings = AutoscaleSettings(
        target="local",
        engine_command="true {port}",
        discovery_file=str(tmp_path / "engines.json"),
        engine_stop_grace_s=42.0,
    )
    actuator = make_actuator(settings)
    assert isinstance(actuator, LocalActuator)
    try:
        assert actuator._kill_grace_s == 42.0
    finally:
        asyncio.run(actuator.close())
    assert AutoscaleSettings().engine_stop_grace_s == 25.0
    with pytest.raises(ConfigError, match="--engine-stop-grace-s must be > 0"):
        AutoscaleSettings(engine_stop_grace_s=0)
