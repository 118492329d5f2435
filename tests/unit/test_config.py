"""Settings come from defaults, a TOML file, the environment and flags, in that order."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from kvcache.config import CacheConfig
from shoal.config import add_flags, load_config, parse_bool, parse_size, render_reference
from shoal.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64KiB", 65536),
        ("1.5GiB", 3 << 29),
        ("500MB", 500_000_000),
        ("2 mib", 2 << 20),
    ],
)
def test_sizes_accept_binary_and_decimal_units(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_toml_numbers_are_sizes_too(tmp_path: Path) -> None:
    config_file = tmp_path / "shoal.toml"
    config_file.write_text("[cache]\nshm_bytes = 2147483648.0\nslab_bytes = 8388608\n")
    config = load_config(CacheConfig, "cache", environ={}, config_path=config_file)
    assert (config.shm_bytes, config.slab_bytes) == (2 << 30, 8 << 20)
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nslab_bytes = 1000\n")
    with pytest.raises(ConfigError, match="multiple of 4 KiB"):
        load_config(CacheConfig, "cache", environ={}, config_path=bad)


def test_bad_sizes_and_booleans_name_the_expected_form() -> None:
    with pytest.raises(ValueError, match="64KiB"):
        parse_size("lots")
    with pytest.raises(ValueError, match="true/false"):
        parse_bool("maybe")


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "shoal.toml"
    config_file.write_text('[cache]\nshm_bytes = "2GiB"\ndram_bytes = "8GiB"\npolicy = "lru"\n')
    parser = argparse.ArgumentParser()
    add_flags(parser, CacheConfig, "cache")
    flags = parser.parse_args(["--shm-bytes", "3GiB", "--no-populate"])
    config = load_config(
        CacheConfig,
        "cache",
        flags=flags,
        environ={"SHOAL_CONFIG": str(config_file), "SHOAL_CACHE_DRAM_BYTES": "16GiB"},
    )
    assert config.shm_bytes == 3 << 30  # flag
    assert config.dram_bytes == 16 << 30  # environment
    assert config.policy == "lru"  # file
    assert config.populate is False  # boolean flag
    assert config.slab_bytes == 64 << 20  # default


def test_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SHOAL_CACHE_SHM_BYTES"):
        load_config(CacheConfig, "cache", environ={"SHOAL_CACHE_SHM_BYTES": "huge"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache]\nshm_bites = 1\n")
    with pytest.raises(ConfigError, match="unknown key.*shm_bites"):
        load_config(CacheConfig, "cache", environ={}, config_path=bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[cache\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(CacheConfig, "cache", environ={}, config_path=broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(CacheConfig, "cache", environ={}, config_path=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="name"):
        load_config(CacheConfig, "cache", environ={"SHOAL_CACHE_NAME": "a/b"})


def test_readme_reference_matches_the_settings() -> None:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"cache-config-reference.*?-->\n(.*?)\n<!-- end", readme, re.S)
    assert match, "README lost its configuration reference"
    assert match.group(1) == render_reference(CacheConfig, "cache"), (
        "README's [cache] reference is stale: regenerate it with shoal.config.render_reference"
    )


def test_readme_loader_reference_matches_the_sidecar_settings() -> None:
    from loader.sidecar.config import LoaderConfig

    readme = (REPO / "README.md").read_text()
    match = re.search(r"loader-config-reference.*?-->\n(.*?)\n<!-- end", readme, re.S)
    assert match, "README lost its loader configuration reference"
    assert match.group(1) == render_reference(LoaderConfig, "loader"), (
        "README's [loader] reference is stale: regenerate it with shoal.config.render_reference"
    )


def test_readme_router_reference_matches_the_router_settings() -> None:
    from router.config import RouterSettings

    readme = (REPO / "README.md").read_text()
    match = re.search(r"router-config-reference.*?-->\n(.*?)\n<!-- end", readme, re.S)
    assert match, "README lost its router configuration reference"
    assert match.group(1) == render_reference(RouterSettings, "router"), (
        "README's [router] reference is stale: regenerate it with shoal.config.render_reference"
    )


def test_readme_autoscale_reference_matches_the_autoscale_settings() -> None:
    from control.autoscale.config import AutoscaleSettings

    readme = (REPO / "README.md").read_text()
    match = re.search(r"autoscale-config-reference.*?-->\n(.*?)\n<!-- end", readme, re.S)
    assert match, "README lost its autoscale configuration reference"
    assert match.group(1) == render_reference(AutoscaleSettings, "autoscale"), (
        "README's [autoscale] reference is stale: regenerate it with shoal.config.render_reference"
    )


@pytest.mark.parametrize(
    ("section", "module", "name"),
    [
        ("profile", "control.placement.profile_cli", "ProfileSettings"),
        ("placement", "control.placement.config", "PlacementSettings"),
        ("lora", "control.lora.config", "LoraSettings"),
        ("health", "control.health.config", "HealthSettings"),
    ],
)
def test_readme_control_references_match_their_settings(
    section: str, module: str, name: str
) -> None:
    settings = getattr(importlib.import_module(module), name)
    readme = (REPO / "README.md").read_text()
    match = re.search(section + r"-config-reference.*?-->\n(.*?)\n<!-- end", readme, re.S)
    assert match, f"README lost its [{section}] configuration reference"
    assert match.group(1) == render_reference(settings, section), (
        f"README's [{section}] reference is stale: regenerate it with shoal.config.render_reference"
    )
