"""HealthSettings: flags < SHOAL_HEALTH_* < [health] as every component; the auth and
cordon rules; the Kubernetes node name."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.health.config import HealthSettings, kube_node_name
from shoal.config import load_config
from shoal.errors import ConfigError


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "shoal.toml"
    config.write_text('[health]\ninterval_s = 2\nnode = "from-file"\nexpect_gpus = 8\n')
    env = {"SHOAL_HEALTH_NODE": "from-env", "SHOAL_HEALTH_PORT": "9000"}
    settings = load_config(
        HealthSettings,
        "health",
        flags={"port": "9100", "cordon": True},
        environ=env,
        config_path=config,
    )
    assert (settings.interval_s, settings.node, settings.port) == (2.0, "from-env", 9100)
    assert (settings.expect_gpus, settings.cordon, settings.cordon_apply) == (8, True, False)


def test_defaults() -> None:
    s = HealthSettings()
    assert (s.host, s.port, s.interval_s, s.expect_gpus, s.cordon) == (
        "127.0.0.1", 8094, 5.0, 0, False
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "0.0.0.0"}, "beyond loopback without authentication"),
        ({"cordon_apply": True}, "--cordon-apply needs --cordon"),
        ({"interval_s": 0.0}, "--interval-s must be > 0"),
        ({"expect_gpus": -1}, "--expect-gpus must be >= 0"),
        ({"node": "a/b"}, "has no '/'"),
    ],
)
def test_inconsistent_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        HealthSettings(**fields)  # type: ignore[arg-type]


def test_beyond_loopback_with_a_token_or_explicitly_without() -> None:
    assert HealthSettings(host="0.0.0.0", auth_token_file="/t").host == "0.0.0.0"
    assert HealthSettings(host="10.0.0.1", insecure_no_auth=True).insecure_no_auth


def test_the_node_to_cordon_is_the_flag_else_the_downward_api() -> None:
    assert kube_node_name(HealthSettings(kube_node="k8s-a"), {"NODE_NAME": "env"}) == "k8s-a"
    assert kube_node_name(HealthSettings(), {"NODE_NAME": "env"}) == "env"
    with pytest.raises(ConfigError, match="--kube-node NAME, or NODE_NAME"):
        kube_node_name(HealthSettings(), {})


def test_the_watcher_the_check_and_ray_name_a_node_by_one_rule(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On an FQDN host every side says the full hostname, so GPU names NODE/gpuI match."""
    import argparse
    import json
    import socket
    import types

    import ray

    from control.health import cli
    from control.health.config import node_name
    from control.health.mockfile import Injection, inject
    from control.health.types import default_node_name
    from control.ray import actors, group

    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-01.dc.example.com")
    context = types.SimpleNamespace(get_node_labels=lambda: {})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: context)
    assert default_node_name() == "gpu-01.dc.example.com"
    assert node_name(HealthSettings()) == "gpu-01.dc.example.com"  # was "gpu-01"
    assert actors.node_name() == "gpu-01.dc.example.com"
    ray_node = {"NodeID": "ab12", "Labels": {}, "NodeManagerHostname": socket.gethostname()}
    assert group._name_of(ray_node) == "gpu-01.dc.example.com"
    # a label wins on the Ray side; --node must then say the same on the watcher's
    context.get_node_labels = lambda: {"shoal.node": "rack3-a"}
    assert actors.node_name() == node_name(HealthSettings(node="rack3-a")) == "rack3-a"
    # ``shoal health check`` without --node
    mock = tmp_path / "node.toml"
    inject(mock, Injection("card_count", None, 1))
    parser = argparse.ArgumentParser(prog="shoal")
    cli.register(parser.add_subparsers(dest="component"))
    args = parser.parse_args(["health", "check", "--nvml-mock", str(mock), "--json"])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["node"] == "gpu-01.dc.example.com"
