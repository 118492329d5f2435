"""The issue's bar: `shoal deploy render` with the default values and with the multi-node GPU
example produce manifests that pass every check (Kubernetes schemas for the two newest minor
versions, the Prometheus Operator's models, the contracts and RBAC); and the command's exits.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.checks import schema
from deploy.checks.credentials import _keys_at
from deploy.checks.run import check_all
from deploy.render import COMPONENTS, render
from deploy.values import load_values

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
VALUES = [None, *EXAMPLES]
IDS = ["defaults", *[path.stem for path in EXAMPLES]]

needs_crd_validator = pytest.mark.skipif(
    not (schema.INSTALL_DIR / "node_modules").is_dir() and os.environ.get("CI") != "true",
    reason="the CRD validator is not installed (scripts/setup-deploy-check); CI installs it",
)


def shoal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "deploy", *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_the_multinode_gpu_examples_exist() -> None:
    assert [path.name for path in EXAMPLES] == ["multinode-gpu.yaml", "multinode-ray.yaml"]


@needs_crd_validator
@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_every_check_passes(values_file: Path | None) -> None:
    values = load_values(values_file)
    objects = render(values)
    assert check_all(objects, values) == []


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_every_component_and_kind_is_rendered(values_file: Path | None) -> None:
    kinds = {obj["kind"] for obj in render(load_values(values_file))}
    assert {
        "Namespace", "ServiceAccount", "Role", "RoleBinding", "Service", "DaemonSet",
        "Deployment", "NetworkPolicy", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor",
        "PrometheusRule",
    } <= kinds  # fmt: skip


def test_names_are_unique_per_kind_and_namespace() -> None:
    for values_file in VALUES:
        seen = [
            (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
            for o in render(load_values(values_file))
        ]
        assert len(seen) == len(set(seen)), values_file


def test_the_example_runs_per_node_keys_and_one_engine_per_gpu_node() -> None:
    objects = render(load_values(EXAMPLES[0]))
    (daemon,) = [
        o for o in objects if o["kind"] == "DaemonSet" and "cache" in o["metadata"]["name"]
    ]
    env = {
        e["name"]: e.get("value")
        for e in daemon["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SHOAL_CACHE_CLUSTER_CURVE_KEY"] == "/var/lib/shoal/curve/$(NODE_NAME).key_secret"
    (engine,) = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "llama-70b"
    ]
    spec = engine["spec"]["template"]["spec"]
    (vllm,) = [c for c in spec["containers"] if c["name"] == "vllm"]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_the_ray_example_routes_and_scales_through_the_fleet() -> None:
    objects = render(load_values(EXAMPLES[1]))

    def env(name: str) -> dict[str, str]:
        (deployment,) = [o for o in objects
                         if o["kind"] == "Deployment" and o["metadata"]["name"] == name]  # fmt: skip
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value", "") for e in container["env"]}

    fleet_url = "http://shoal-engines-fleet.llm.svc:8093"
    assert env("shoal-router")["SHOAL_ROUTER_DISCOVERY"] == "http"
    assert env("shoal-router")["SHOAL_ROUTER_ENGINES"].startswith(fleet_url)
    assert env("shoal-autoscaler")["SHOAL_AUTOSCALE_TARGET"] == f"ray:{fleet_url}"
    assert env("shoal-engines-fleet")["SHOAL_ENGINES_GPU_HEALTH"].startswith("dns+http://")
    # nothing on the Kubernetes API for the autoscaler or the router then
    roles = {o["metadata"]["name"] for o in objects if o["kind"] in ("Role", "ClusterRole")}
    assert "shoal-autoscaler" not in roles and "shoal-router" not in roles


class TestSecretPaths:
    def test_a_path_with_a_variable_matches_each_mapped_item_of_its_shape(self) -> None:
        items = {"a.key_secret": "a.key_secret", "b.key_secret": "b.key_secret",
                 "cluster.key": "cluster.key"}  # fmt: skip
        assert _keys_at("$(NODE_NAME).key_secret", items) == ["a.key_secret", "b.key_secret"]

    def test_a_remapped_path_names_the_key_it_comes_from(self) -> None:
        assert _keys_at("members/a.key", {"members/a.key": "members.a.key"}) == ["members.a.key"]

    def test_a_path_no_item_maps_is_returned_for_the_listing_check_to_name(self) -> None:
        assert _keys_at("$(NODE_NAME).key", {"cluster.key_secret": "cluster.key_secret"}) == [
            "$(NODE_NAME).key"
        ]


class TestCommand:
    def test_render_prints_one_stream_that_parses(self) -> None:
        result = shoal("render")
        assert result.returncode == 0, result.stderr
        documents = [d for d in yaml.safe_load_all(result.stdout) if d]
        assert documents == render(load_values(None))

    def test_render_out_writes_a_kustomize_base_in_apply_order(self, tmp_path: Path) -> None:
        result = shoal("render", "-f", str(EXAMPLES[0]), "--out", str(tmp_path / "base"))
        assert result.returncode == 0, result.stderr
        kustomization = yaml.safe_load((tmp_path / "base" / "kustomization.yaml").read_text())
        order = [stem for stem, _ in COMPONENTS]
        resources = [name.removesuffix(".yaml") for name in kustomization["resources"]]
        assert resources == [stem for stem in order if stem in resources]
        for name in kustomization["resources"]:
            assert list(yaml.safe_load_all((tmp_path / "base" / name).read_text()))

    def test_bad_values_exit_2_naming_the_key(self) -> None:
        result = shoal("render", "--set", "cache.settings.shm_bytez=1GiB")
        assert result.returncode == 2
        assert "shm_bytez" in result.stderr

    def test_check_exits_1_with_each_problem_on_a_line(self) -> None:
        # Native sidecars (the loader) and the preStop sleep (the engine) need newer
        # Kubernetes than 1.27, whose schema says so (one problem per object: the first).
        result = shoal("check", "--skip-crds", "--kubernetes-version", "1.27",
                       "--set", "engine.loader.uri=s3://models/qwen3/")  # fmt: skip
        assert result.returncode == 1
        line = result.stdout.splitlines()[0]  # the loader sidecar; the preStop sleeps too
        assert line.startswith("[schema] Deployment/shoal/vllm: Kubernetes 1.27:")
        assert re.search(r"'(restartPolicy|sleep)' was unexpected", line)

    def test_check_json(self) -> None:
        result = shoal("check", "--skip-crds", "--json")
        assert result.returncode == 0, result.stdout
        assert json_of(result.stdout)["problems"] == []

    @pytest.mark.parametrize("key", ["run_as_user", "run_as_group"])
    def test_root_is_refused(self, key: str) -> None:
        result = shoal("render", "--set", f"{key}=0")
        assert result.returncode == 2
        assert f"{key} must be a non-root id" in result.stderr


def json_of(text: str) -> dict:
    import json

    return dict(json.loads(text))
