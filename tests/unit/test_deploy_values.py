"""The values schema of `shoal deploy`: strict parsing, overrides, defaults, derived sizes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deploy.errors import ValuesError
from deploy.sizes import LOADER_OVERHEAD_BYTES, derive, human_bytes, quantity
from deploy.values import Values, defaults_yaml, load_values, parse_values

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

    @pytest.mark.parametrize("path", ["engine.events_slot", "cache.cluster.member_nodes"])
    def test_a_retired_key_says_what_replaced_it(self, path: str) -> None:
        *parents, key = path.split(".")
        document: dict = {key: 0}
        for parent in reversed(parents):
            document = {parent: document}
        with pytest.raises(ValuesError, match=rf"{path}: no longer used: .*; remove it"):
            parse_values(document)

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

    def test_sizes_accept_human_forms(self) -> None:
        values = parse_values({"engine": {"shm_bytes": "512MiB", "memory_bytes": 1 << 30}})
        assert values.engine.shm_bytes == 512 << 20
        assert values.engine.memory_bytes == GiB

    def test_settings_tables_are_kept_as_given(self) -> None:
        values = parse_values({"cache": {"settings": {"shm_bytes": "2GiB", "policy": "lru"}}})
        assert values.cache.settings == {"shm_bytes": "2GiB", "policy": "lru"}

    def test_null_or_empty_tables_are_empty(self, tmp_path: Path) -> None:
        path = tmp_path / "values.yaml"
        path.write_text("cache:\n  settings:\nrouter:\n  settings: ~\nengine: ~\n")
        values = load_values(path, ["router.settings.user_rpm=60"])
        assert values.cache.settings == {}
        assert values.router.settings == {"user_rpm": 60}
        assert values.engine == Values().engine


class TestDefaultInstance:
    def test_the_dataclass_defaults_are_the_parsed_defaults(self) -> None:
        assert Values() == parse_values({})
        assert Values().engine.memory_bytes == 48 * GiB  # an int, as annotated

    def test_sizes_derive_from_a_directly_built_instance(self) -> None:
        assert derive(Values()).daemon_memory_bytes == derive(parse_values({})).daemon_memory_bytes

    def test_the_printed_defaults_show_human_sizes(self) -> None:
        assert "memory_bytes: 48GiB" in defaults_yaml()


class TestStringsStayWhatWasTyped:
    """YAML reads unquoted 1.10 as 1.1, 0700 as 448 and yes as true; a string field that took
    them would render something the user never wrote (an image tag 1.1)."""

    @pytest.mark.parametrize(
        ("assignment", "got"),
        [
            ("image.tag=1.10", "the number 1.1;"),
            ("image.tag=0700", "the number 448;"),
            ("engine.model=yes", "the boolean true;"),
            ("engine.gpu_type=100", "the number 100;"),
            ("cache.node_selector.zone=1", "the number 1;"),
            ("engine.extra_args=[--max-model-len, 8192]", "the number 8192;"),
            ("cache.cpu=0.5", "the number 0.5;"),
        ],
    )
    def test_a_number_or_boolean_for_a_string_is_refused_with_how_to_quote_it(
        self, assignment: str, got: str
    ) -> None:
        path = assignment.split("=", maxsplit=1)[0]
        with pytest.raises(ValuesError, match="quote it") as info:
            load_values(None, [assignment])
        assert str(info.value).startswith(path)  # the key, then [N] for a list item
        assert f"expected a string, got {got}" in str(info.value)

    def test_quoted_it_is_kept_as_typed(self) -> None:
        values = load_values(None, ["image.tag='1.10'", 'engine.gpu_type="0700"'])
        assert (values.image.tag, values.engine.gpu_type) == ("1.10", "0700")
        assert values.image_ref.endswith(":1.10")

    def test_a_plain_integer_is_a_cpu_quantity(self) -> None:
        values = parse_values({"cache": {"cpu": 4}, "router": {"cpu": "1500m"}})
        assert (values.cache.cpu, values.router.cpu) == ("4", "1500m")

    @pytest.mark.parametrize("cpu", ["lots", "2 cores", "-1", "1.5.0", ""])
    def test_a_cpu_that_is_not_a_quantity_is_refused(self, cpu: str) -> None:
        with pytest.raises(ValuesError, match="router.cpu: .* is not a Kubernetes quantity"):
            parse_values({"router": {"cpu": cpu}})

    def test_a_null_string_is_refused(self) -> None:
        with pytest.raises(ValuesError, match=r"image.tag: expected a string, got null"):
            parse_values({"image": {"tag": None}})


class TestRanges:
    @pytest.mark.parametrize(
        ("assignment", "message"),
        [
            ("engine.gpus=0", r"engine.gpus: must be >= 1"),
            ("engine.replicas=-1", r"engine.replicas: must be >= 0"),
            ("router.replicas=-2", r"router.replicas: must be >= 0"),
            ("engine.shm_bytes=-1", r"engine.shm_bytes: a size must be >= 0"),
            ("redis.memory_bytes=~", r"redis.memory_bytes: null .* is not a size"),
            ("engine.model=", r"engine.model: empty"),
            ("redis.url=notaurl", r"redis.url: 'notaurl' is not a Redis URL"),
            ("redis.url=http://r:6379", r"redis.url: .* is not a Redis URL"),
        ],
    )
    def test_out_of_range_values_name_their_own_key(self, assignment: str, message: str) -> None:
        with pytest.raises(ValuesError, match=message):
            load_values(None, [assignment])

    def test_no_model_is_needed_without_engines(self) -> None:
        values = load_values(None, ["engine.enabled=false", "engine.model="])
        assert values.engine.model == ""

    @pytest.mark.parametrize("url", ["redis://redis.db:6379/0", "rediss://:pw@redis.db:6380"])
    def test_redis_urls(self, url: str) -> None:
        assert load_values(None, [f"redis.url={url}"]).redis.url == url


class TestKubernetesNames:
    @pytest.mark.parametrize(
        ("assignment", "what"),
        [
            ("namespace=My_NS", "an RFC 1123 label"),
            ("namespace=", "an RFC 1123 label"),
            (f"namespace={'a' * 64}", "an RFC 1123 label"),
            ("engine.name=My_Engine", "an RFC 1035 label"),
            ("engine.name=1vllm", "an RFC 1035 label"),  # a Service name starts with a letter
            ("engine.name=vllm.x", "an RFC 1035 label"),
            ("cache.cluster.secret=curve_keys", "an RFC 1123 subdomain"),
            ("router.api_keys_secret=-keys", "an RFC 1123 subdomain"),
            ("monitoring.namespace=Mon", "an RFC 1123 label"),
        ],
    )
    def test_a_name_kubernetes_would_refuse_is_refused(self, assignment: str, what: str) -> None:
        key = assignment.split("=", maxsplit=1)[0]
        with pytest.raises(ValuesError, match=f"{key}: .* it must be {what}"):
            load_values(None, [assignment])

    def test_valid_names(self) -> None:
        values = load_values(None, [
            "namespace=llm-prod", "engine.name=llama-70b", "cache.cluster.secret=curve.keys-1",
            "router.api_keys_secret=", "engine.loader.s3_secret=", "health.runtime_class=",
        ])  # fmt: skip
        assert values.engine.name == "llama-70b"
        assert values.router.api_keys_secret == ""  # empty = none, where it says so


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

    def test_set_keys_escape_dots_as_helm_does(self) -> None:
        values = load_values(None, [
            r"health.node_selector.nvidia\.com/gpu\.present='true'",
            r"cache.node_selector.kubernetes\.io/arch=amd64",
        ])  # fmt: skip
        assert values.health.node_selector == {"nvidia.com/gpu.present": "true"}
        assert values.cache.node_selector == {"kubernetes.io/arch": "amd64"}

    @pytest.mark.parametrize("assignment", ["cache.cluster.operators[0]=x", "a[1].b=2"])
    def test_list_items_are_not_set_one_by_one(self, assignment: str) -> None:
        whole = assignment.split("[", maxsplit=1)[0]
        with pytest.raises(ValuesError, match=re.escape(f"lists are set whole: --set '{whole}=")):
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
