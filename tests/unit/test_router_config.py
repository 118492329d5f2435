"""RouterSettings: defaults < file < environment < flags, and consistency checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import RouterSettings
from shoal.config import load_config
from shoal.errors import ConfigError


def test_layers_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "shoal.toml"
    path.write_text(
        '[router]\nport = 9001\nstrategy = "random"\nuser_rpm = 5\nmax_body_bytes = "1MiB"\n'
    )
    environ = {"SHOAL_ROUTER_STRATEGY": "least-request", "SHOAL_ROUTER_USER_RPM": "7"}
    settings = load_config(RouterSettings, "router", flags={"user_rpm": "9"}, environ=environ,
                           config_path=path)  # fmt: skip
    assert settings.port == 9001  # file
    assert settings.strategy == "least-request"  # environment over file
    assert settings.user_rpm == 9  # flag over environment
    assert settings.max_body_bytes == 1 << 20
    assert settings.workers == 1  # default


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"discovery": "carrier-pigeon"}, "discovery"),
        ({"discovery": "file"}, "discovery_file"),
        ({"workers": "0"}, "workers"),
        ({"metrics_stale_s": "0"}, "metrics_stale_s"),
        ({"user_tpm": "-1"}, "user_tpm"),
        ({"strategy": " "}, "strategy"),
        ({"port": "many"}, "port"),
        ({"admin_port": "8080"}, "admin_port .* must differ from port"),
        ({"admin_port": "70000"}, "admin_port"),
        ({"admin_token_file": "/t"}, "admin_token_file needs admin_port"),
    ],
)
def test_inconsistent_settings_are_config_errors(flags: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(RouterSettings, "router", flags=flags, environ={})


def test_http_discovery_needs_the_discovery_url_in_engines() -> None:
    settings = RouterSettings(discovery="http", engines="http://fleet:8093/v1/discovery",
                              discovery_token_file="/etc/shoal/control-token/token")  # fmt: skip
    assert settings.holds  # engines can appear: requests wait for one
    for engines in ("", "fleet:8093", "ns/fleet:http"):
        with pytest.raises(ValueError, match="discovery http needs engines"):
            RouterSettings(discovery="http", engines=engines)


def test_an_admin_listener_beyond_loopback_needs_a_token_or_the_insecure_flag(
    tmp_path: Path,
) -> None:
    from router.server import check_settings

    base = {"engines": "http://e:1", "admin_port": 9091}
    check_settings(RouterSettings(**base))  # loopback by default
    with pytest.raises(ConfigError, match="admin listener .* 0.0.0.0 .* --admin-token-file"):
        check_settings(RouterSettings(**base, admin_host="0.0.0.0"))
    with pytest.raises(ConfigError, match="--admin-token-file"):  # unreadable is refused too
        check_settings(RouterSettings(**base, admin_host="0.0.0.0",
                                      admin_token_file=str(tmp_path / "absent")))  # fmt: skip
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    check_settings(RouterSettings(**base, admin_host="0.0.0.0", admin_token_file=str(token)))
