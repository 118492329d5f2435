"""The values schema of `shoal deploy`: strict parsing, overrides, defaults, derived sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy.errors import ValuesError
from deploy.sizes import LOADER_OVERHEAD_BYTES, derive, human_bytes, quantity
from deploy.values import defaults_yaml, load_values, parse_values
from shoal.errors import ConfigError

GiB = 1 << 30


class TestParsing:
    def test_empty_document_gives_every_default(self) -> None:
        values = parse_values(None)
        assert values.namespace == "shoal"
        assert values.cache.memory_overhead_bytes == GiB  # sizes are parsed, not kept as text
        assert values.engine.shm_bytes == 4 * GiB

    def test_unknown_key_names_the_path_and_the_valid_keys(self) -> None:
        with pytest.raises(ValuesError, match=r"cache\.cluster: unknown key\(s\) \['prot'\]"):
            parse_values({"cache": {"cluster": {"prot": 1}}})

    def test_unknown_top_level_key(self) -> None:
        with pytest.raises(ValuesError, match="the top level: unknown key"):
            parse_values({"namespce": "x"})

    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ({"run_as_user": "root"}, "run_as_user: expected an integer"),
            ({"run_as_user": True}, "run_as_user: expected an integer"),
            ({"create_namespace": "yes"}, "create_namespace: expected true or false"),
            ({"engine": {"shm_bytes": "lots"}}, "engine.shm_bytes: 'lots' is not a size"),
            ({"cache": []}, "cache: expected a mapping"),
            ({"engine": {"extra_args": "--x"}}, "engine.extra_args: expected a list"),
        ],
    )
    def test_bad_values_are_refused_with_their_path(self, document: dict, message: str) -> None:
        with pytest.raises(ValuesError, match=message):
            parse_values(document)

    def test_values_error_is_a_config_error_so_the_cli_exits_2(self) -> None:
        assert issubclass(ValuesError, ConfigError)

    def test_sizes_accept_human_forms(self) -> None:
        values = parse_values({"engine": {"shm_bytes": "512MiB", "memory_bytes": 1 << 30}})
        assert values.engine.shm_bytes == 512 << 20
        assert values.engine.memory_bytes == GiB

    def test_settings_tables_are_kept_as_given(self) -> None:
        values = parse_values({"cache": {"settings": {"shm_bytes": "2GiB", "policy": "lru"}}})
        assert values.cache.settings == {"shm_bytes": "2GiB", "policy": "lru"}


class TestFilesAndOverrides:
    def test_file_then_set_assignments_win(self, tmp_path: Path) -> None:
        path = tmp_path / "values.yaml"
        path.write_text("namespace: prod\nrouter:\n  replicas: 3\n")
        values = load_values(path, ["router.replicas=5", "cache.settings.shm_bytes=16GiB"])
        assert values.namespace == "prod"
        assert values.router.replicas == 5
        assert values.cache.settings == {"shm_bytes": "16GiB"}  # a table is replaced per key

    def test_set_values_are_yaml_typed(self) -> None:
        values = load_values(None, ["create_namespace=false", "engine.extra_args=[--a, --b]"])
        assert values.create_namespace is False
        assert values.engine.extra_args == ["--a", "--b"]

    @pytest.mark.parametrize("assignment", ["novalue", "=x"])
    def test_malformed_set(self, assignment: str) -> None:
        with pytest.raises(ValuesError, match="expected path.to.key=VALUE"):
            load_values(None, [assignment])

    def test_set_through_a_scalar_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "values.yaml"
        path.write_text("namespace: prod\n")
        with pytest.raises(ValuesError, match="namespace is not a mapping"):
            load_values(path, ["namespace.x=1"])

    def test_set_of_a_mapping_onto_a_scalar_key_is_a_type_error(self) -> None:
        with pytest.raises(ValuesError, match="namespace: expected a string"):
            load_values(None, ["namespace.x=1"])

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ValuesError, match="cannot read values file"):
            load_values(tmp_path / "nope.yaml")

    def test_file_that_is_not_a_mapping(self, tmp_path: Path) -> None:
        path = tmp_path / "values.yaml"
        path.write_text("- a\n- b\n")
        with pytest.raises(ValuesError, match="the top level must be a mapping"):
            load_values(path)

    def test_file_that_is_not_yaml(self, tmp_path: Path) -> None:
        path = tmp_path / "values.yaml"
        path.write_text("a: [\n")
        with pytest.raises(ValuesError, match="is not valid YAML"):
            load_values(path)


class TestDefaultsFile:
    def test_printed_defaults_parse_back_to_the_defaults(self) -> None:
        document = yaml.safe_load(defaults_yaml())
        assert parse_values(document) == parse_values({})

    def test_every_key_has_a_comment(self) -> None:
        lines = defaults_yaml().splitlines()
        for index, line in enumerate(lines):
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and not stripped.startswith("-"):
                assert lines[index - 1].strip().startswith("#"), f"no help above {line!r}"


class TestDerivedSizes:
    def test_daemon_limit_holds_every_memory_tier_and_the_overhead(self) -> None:
        values = parse_values({"cache": {
            "settings": {"shm_bytes": "8GiB", "dram_bytes": "16GiB", "io_staging_bytes": "1GiB"},
            "memory_overhead_bytes": "2GiB",
        }})  # fmt: skip
        sizes = derive(values)
        assert sizes.arena_bytes == 8 * GiB
        assert sizes.daemon_memory_bytes == (8 + 16 + 1 + 2) * GiB

    def test_unset_tiers_take_the_daemons_own_defaults(self) -> None:
        values = parse_values({"cache": {"settings": {}}})
        sizes = derive(values)
        assert sizes.arena_bytes == GiB  # CacheConfig's shm_bytes default
        assert sizes.daemon_memory_bytes == GiB + 4 * GiB + (256 << 20) + GiB

    def test_engine_shm_holds_the_loader_capacity_charged_to_the_sidecar(self) -> None:
        values = parse_values({"engine": {
            "shm_bytes": "2GiB", "memory_bytes": "10GiB",
            "loader": {"uri": "s3://m/x/", "settings": {"capacity_bytes": "20GiB"}},
        }})  # fmt: skip
        sizes = derive(values)
        assert sizes.engine_shm_bytes == 22 * GiB
        assert sizes.engine_memory_bytes == 12 * GiB  # vllm: its memory and its own shm
        assert sizes.loader_memory_bytes == 20 * GiB + LOADER_OVERHEAD_BYTES

    @pytest.mark.parametrize("loader", [{"enabled": False, "uri": "s3://m/x/"}, {"uri": ""}])
    def test_without_a_running_loader_no_staging_room(self, loader: dict) -> None:
        values = parse_values({"engine": {"shm_bytes": "2GiB", "loader": loader}})
        assert derive(values).engine_shm_bytes == 2 * GiB
        assert derive(values).loader_memory_bytes == 0

    @pytest.mark.parametrize(
        ("num_bytes", "expected"),
        [(1, "1Mi"), (1 << 20, "1Mi"), ((1 << 20) + 1, "2Mi"), (GiB, "1024Mi")],
    )
    def test_quantity_rounds_up_to_whole_mebibytes(self, num_bytes: int, expected: str) -> None:
        assert quantity(num_bytes) == expected

    @pytest.mark.parametrize(
        ("num_bytes", "expected"), [(8 * GiB, "8GiB"), (512 << 20, "512MiB"), (1000, "1000")]
    )
    def test_human_bytes(self, num_bytes: int, expected: str) -> None:
        assert human_bytes(num_bytes) == expected
