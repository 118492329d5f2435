"""Shared object builders (deploy/objects.py) and the YAML they become (deploy/render.py).

The builders: settings as environment variables (scalars only), the ServiceAccount / Role /
binding triple, the Shoal container (memory request = limit by construction), the root init
container, Services, pod specs and workloads. The YAML: safe
for YAML 1.1 readers (kubectl), and ``--out`` owning its directory.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy import objects
from deploy.errors import ValuesError
from deploy.render import HEADER, dump_yaml, render_by_file, write_base
from deploy.sizes import quantity
from deploy.values import Values, load_values
from router.config import RouterSettings

VERSION = "1.37"
GiB = 1 << 30


def validate(obj: objects.Obj) -> None:
    kubernetes_validate.validate(obj, VERSION, strict=True)


def pod(*containers: objects.Obj) -> objects.Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": list(containers)},
    }


class TestSettingsEnv:
    def test_scalars_and_flat_lists_become_text(self) -> None:
        env = objects.settings_env(
            RouterSettings,
            "router",
            {"user_rpm": 60, "log_format": "json"},
            where="router.settings",
        )
        assert {"name": "SHOAL_ROUTER_USER_RPM", "value": "60"} in env

    @pytest.mark.parametrize(
        ("setting", "message"),
        [
            (None, r"router\.settings\.user_rpm: no value \(null\)"),
            ({"a": 1}, r"router\.settings\.user_rpm: expected a string, .* got a mapping"),
            ([[1, 2]], r"router\.settings\.user_rpm: a list setting holds scalars only"),
            ([None], r"router\.settings\.user_rpm: a list setting holds scalars only, got null"),
        ],
    )
    def test_a_value_with_no_environment_form_is_refused_by_key(
        self, setting: object, message: str
    ) -> None:
        with pytest.raises(ValuesError, match=message):
            objects.settings_env(
                RouterSettings, "router", {"user_rpm": setting}, where="router.settings"
            )


class TestAccountsAndRbac:
    RULES = [{"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get"]}]

    def test_a_namespaced_triple_points_at_one_name_in_the_namespace(self) -> None:
        values = load_values(None, ["namespace=llm"])
        account = objects.service_account(values, "shoal-x", "cache", automount=True)
        role = objects.role(values, "shoal-x", "cache", self.RULES)
        binding = objects.role_binding(values, "shoal-x", "cache")
        assert account["automountServiceAccountToken"] is True
        assert (role["kind"], role["rules"]) == ("Role", self.RULES)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "shoal-x",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "shoal-x", "namespace": "llm"}
        ]
        for obj in (account, role, binding):
            assert obj["metadata"]["namespace"] == "llm"
            assert obj["metadata"]["labels"] == objects.labels("cache")
            validate(obj)

    def test_a_cluster_role_and_its_binding_have_no_namespace(self) -> None:
        values = Values()
        role = objects.role(values, "shoal-health", "health", self.RULES, cluster=True)
        binding = objects.role_binding(values, "shoal-health", "health", cluster=True)
        assert (role["kind"], binding["kind"]) == ("ClusterRole", "ClusterRoleBinding")
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert "namespace" not in role["metadata"]
        assert "namespace" not in binding["metadata"]
        assert binding["subjects"][0]["namespace"] == values.namespace  # the account's
        validate(role)
        validate(binding)

    def test_the_rules_are_copied_not_shared(self) -> None:
        role = objects.role(Values(), "r", "cache", self.RULES)
        role["rules"][0]["verbs"] = ["delete"]
        assert self.RULES[0]["verbs"] == ["get"]


class TestShoalContainer:
    def test_memory_is_requested_and_limited_alike_and_cpu_only_requested(self) -> None:
        container = objects.shoal_container(
            Values(), "router", ["shoal", "router", "serve"],
            env=[objects.env("SHOAL_ROUTER_PORT", 8080)], memory_bytes=3 * GiB, cpu="2",
        )  # fmt: skip
        resources = container["resources"]
        assert resources["requests"] == {"cpu": "2", "memory": quantity(3 * GiB)}
        assert resources["limits"] == {"memory": quantity(3 * GiB)}
        validate(pod(container))

    def test_the_shoal_image_command_and_restricted_security(self) -> None:
        values = load_values(None, ["image.tag=v9", "image.pull_policy=Always"])
        container = objects.shoal_container(
            values, "autoscaler", ("shoal", "autoscale", "run"), env=[], memory_bytes=GiB,
            cpu="100m",
        )  # fmt: skip
        assert container["image"].endswith(":v9")
        assert container["imagePullPolicy"] == "Always"
        assert container["command"] == ["shoal", "autoscale", "run"]
        assert container["securityContext"] == objects.container_security()
        assert "ports" not in container and "livenessProbe" not in container

    def test_ports_mounts_and_probes(self) -> None:
        live = objects.http_probe("/healthz", "metrics")
        ready = objects.http_probe("/readyz", "metrics", period_s=5)
        mount = objects.control_token_mount()
        container = objects.shoal_container(
            Values(), "cache", ["shoal", "cache", "serve"], env=[], memory_bytes=GiB, cpu="1",
            ports=[("cluster", 7400), ("metrics", 9500)], mounts=[mount],
            liveness=live, readiness=ready, read_only_root=False,
        )  # fmt: skip
        assert container["ports"] == [
            {"name": "cluster", "containerPort": 7400, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 9500, "protocol": "TCP"},
        ]
        assert container["volumeMounts"] == [mount]
        assert (container["livenessProbe"], container["readinessProbe"]) == (live, ready)
        assert "startupProbe" not in container
        assert container["securityContext"]["readOnlyRootFilesystem"] is False
        validate(pod(container))


# Strings a YAML 1.1 reader (go-yaml v2, as in kubectl) takes as booleans, nulls or numbers.
RISKY = ["y", "n", "Y", "N", "yes", "off", "~", "null", "0700", "1e3", "1_000", "0x1F",
         "0b101", "1:20", ".5", "3.10", "+1", ".inf", "=", "<<", "true"]  # fmt: skip
SAFE = ["nvidia", "1.2.3", "v1.10", "10Gi", "500m", "a-1", "yesterday"]


class TestYamlOut:
    def objects_holding(self, texts: list[str]) -> list[objects.Obj]:
        labels = {f"k{i}": text for i, text in enumerate(texts)}
        return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                 "data": labels, "keys": {text: 1 for text in texts}}]  # fmt: skip

    def test_the_stream_reads_back_as_the_objects(self) -> None:
        objs = self.objects_holding(RISKY + SAFE)
        assert list(yaml.safe_load_all(dump_yaml(objs))) == objs

    @pytest.mark.parametrize("text", RISKY)
    def test_strings_a_yaml_1_1_reader_would_retype_are_quoted(self, text: str) -> None:
        dumped = dump_yaml(self.objects_holding([text]))
        assert f"k0: '{text}'" in dumped  # as a value
        assert f"'{text}': 1" in dumped  # and as a key

    @pytest.mark.parametrize("text", SAFE)
    def test_other_strings_stay_plain(self, text: str) -> None:
        assert f"k0: {text}\n" in dump_yaml(self.objects_holding([text]))

    def test_a_rendered_label_value_y_is_quoted(self) -> None:
        values = load_values(None, ["health.node_selector.zone='y'"])
        dumped = "".join(dump_yaml(objs) for objs in render_by_file(values).values())
        assert "zone: 'y'" in dumped


class TestOutDirectory:
    def test_every_file_carries_the_header_and_the_kustomization_lists_them(
        self, tmp_path: Path
    ) -> None:
        written = write_base(Values(), tmp_path / "base")
        for path in written:
            assert path.read_text().startswith(HEADER)
        kustomization = yaml.safe_load((tmp_path / "base" / "kustomization.yaml").read_text())
        assert kustomization["resources"] == [p.name for p in written[:-1]]

    def test_a_component_no_longer_rendered_loses_its_file(self, tmp_path: Path) -> None:
        write_base(Values(), tmp_path)
        assert (tmp_path / "autoscaler.yaml").exists()
        write_base(load_values(None, ["autoscaler.enabled=false"]), tmp_path)
        assert not (tmp_path / "autoscaler.yaml").exists()
        assert (tmp_path / "router.yaml").exists()

    @pytest.mark.parametrize("name", ["notes.txt", "mine.yaml"])
    def test_a_directory_with_other_files_is_refused_and_left_alone(
        self, tmp_path: Path, name: str
    ) -> None:
        write_base(Values(), tmp_path)
        (tmp_path / name).write_text("kind: Mine\n")
        with pytest.raises(ValuesError, match=f"holds files .* did not write \\({name}\\)"):
            write_base(load_values(None, ["autoscaler.enabled=false"]), tmp_path)
        assert (tmp_path / name).read_text() == "kind: Mine\n"
        assert (tmp_path / "autoscaler.yaml").exists()

    def test_a_file_is_not_a_directory(self, tmp_path: Path) -> None:
        (tmp_path / "f").write_text("")
        with pytest.raises(ValuesError, match="not a directory"):
            write_base(Values(), tmp_path / "f")


class TestRootInitContainer:
    def test_root_with_only_the_named_capabilities_and_no_escalation(self) -> None:
        mount = {"name": "state", "mountPath": "/var/lib/x"}
        values = Values()
        script = objects.own_dir_script(values, "/var/lib/x")
        init = objects.root_init_container(
            values, "state-dir", script, mounts=[mount], memory_bytes=16 << 20,
            capabilities=["CHOWN"],
        )  # fmt: skip
        uid, gid = values.run_as_user, values.run_as_group
        assert (
            script
            == f"mkdir -p /var/lib/x && chown {uid}:{gid} /var/lib/x && chmod 0700 /var/lib/x"
        )
        assert init["command"] == ["sh", "-c", script]
        assert init["securityContext"] == {
            "runAsNonRoot": False,
            "runAsUser": 0,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        }
        assert init["resources"]["limits"] == {"memory": "16Mi"}
        assert "env" not in init and "ports" not in init
        validate(pod(init))


class TestServiceAndWorkloads:
    def test_a_service_targets_its_ports_by_name_and_selects_the_component(self) -> None:
        values = load_values(None, ["namespace=llm"])
        svc = objects.service(values, "shoal-x", "cache", [("cluster", 7400)], headless=True,
                              publish_not_ready=True)  # fmt: skip
        assert svc["spec"] == {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": objects.selector("cache"),
            "ports": [{"name": "cluster", "port": 7400, "targetPort": "cluster",
                       "protocol": "TCP"}],
        }  # fmt: skip
        assert svc["metadata"]["namespace"] == "llm"
        validate(svc)

    def test_a_service_may_select_other_pods_and_omit_the_protocol(self) -> None:
        chosen = {"app": "x"}
        svc = objects.service(Values(), "e", "engine", [("http", 80)], selects=chosen,
                              service_type="ClusterIP", protocol=False)  # fmt: skip
        assert svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["selector"] == chosen
        assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http"}]

    def test_a_deployment_selects_what_its_pods_are_labelled(self) -> None:
        values = Values()
        container = objects.shoal_container(values, "x", ["shoal", "x"], memory_bytes=GiB, cpu="1")
        spec = objects.pod_spec(values, "shoal-x", automount=False, grace_s=30)
        spec["containers"] = [container]
        deployment = objects.deployment(values, "shoal-x", "autoscaler", spec, recreate=True)
        selected = deployment["spec"]["selector"]["matchLabels"]
        labelled = deployment["spec"]["template"]["metadata"]["labels"]
        assert selected.items() <= labelled.items()
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"] == objects.pod_security(values)
        validate(deployment)

    def test_a_daemon_set_rolls_one_node_at_a_time(self) -> None:
        values = Values()
        spec = objects.pod_spec(values, "shoal-x", automount=True, host_pid=False)
        spec["containers"] = [
            objects.shoal_container(values, "x", ["shoal", "x"], memory_bytes=GiB, cpu="1")
        ]
        daemon_set = objects.daemon_set(values, "shoal-x", "health", spec)
        assert daemon_set["spec"]["updateStrategy"]["rollingUpdate"] == {"maxUnavailable": 1}
        assert daemon_set["spec"]["template"]["spec"]["hostPID"] is False
        validate(daemon_set)
