"""Specification of deploy/checks and deploy/secrets: each check passes a well-formed stack
and names the one violation planted in it.

The stack is hand-built in tests/unit/deploy_stack.py, independently of the component
renderers; the contracts are specified in test_deploy_contracts.py.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest

from deploy.checks import rbac, schema
from deploy.checks.run import check_all
from deploy.secrets import required_secrets
from deploy.values import Values
from shoal.errors import ConfigError
from tests.unit.deploy_stack import (
    AUTOSCALER_RULES,
    REPO,
    Obj,
    _autoscaler,
    _container,
    _env,
    _find,
    _messages,
    _monitor,
    _pod,
    _stack,
    _values,
    _workload,
)


@pytest.fixture
def values() -> Values:
    return _values()


@pytest.fixture
def stack(values: Values) -> list[Obj]:
    return _stack(values)


# --- schema ---------------------------------------------------------------------------------


class TestKubernetesSchema:
    def test_the_default_versions_are_the_two_newest_minors_kubernetes_validate_knows(self) -> None:
        from kubernetes_validate import utils

        minors = sorted(
            {utils.major_minor(v) for v in utils.all_versions()},
            key=lambda v: tuple(map(int, v.split("."))),
        )
        assert schema.default_versions() == [minors[-1], minors[-2]]

    def test_the_hand_built_stack_is_valid_kubernetes(self, stack: list[Obj]) -> None:
        assert schema.kubernetes_problems(stack, schema.default_versions()) == []

    def test_an_unknown_field_is_named_with_object_version_and_path(self, stack: list[Obj]) -> None:
        _pod(stack, "Deployment", "vllm")["containers"][0]["gpus"] = 1
        problems = schema.kubernetes_problems(stack, ["1.37"])
        assert _messages(problems) == [
            "[schema] Deployment/shoal/vllm: Kubernetes 1.37: $.spec.template.spec.containers[0]: "
            "Additional properties are not allowed ('gpus' was unexpected)"
        ]

    def test_a_kind_without_a_schema_is_a_problem(self) -> None:
        odd = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}}
        (problem,) = schema.kubernetes_problems([odd], ["1.37"])
        assert problem.where == "Gadget/g" and "Couldn't find schema" in problem.message


CRD_INSTALLED = (schema.default_install_dir() / "node_modules").is_dir()
needs_crd_validator = pytest.mark.skipif(
    not CRD_INSTALLED and os.environ.get("CI") != "true",
    reason="the CRD validator is not installed (scripts/setup-deploy-check); CI installs it",
)


class TestPrometheusOperatorObjects:
    @needs_crd_validator
    def test_a_valid_pod_monitor_passes_the_operators_model(self) -> None:
        assert schema.crd_problems([_monitor()]) == []

    @needs_crd_validator
    def test_a_wrongly_typed_field_fails_the_operators_model(self) -> None:
        assert _messages(schema.crd_problems([_monitor(port=9500)])) == [
            "[crd] PodMonitor/shoal/shoal-cache: monitoring.coreos.com/v1: "
            "data/spec/podMetricsEndpoints/0/port must be string"
        ]

    def test_without_the_install_the_validator_is_unavailable(self, tmp_path: Path) -> None:
        (problem,) = schema.crd_problems([_monitor()], install_dir=tmp_path)
        assert problem.message == "crd validator unavailable: run scripts/setup-deploy-check"

    def test_crds_false_skips_the_validator(self) -> None:
        assert schema.schema_problems([_monitor()], kubernetes_versions=["1.37"], crds=False) == []

    def test_a_field_shoal_does_not_use_is_a_problem_although_the_crd_would_prune_it(self) -> None:
        (problem,) = schema.monitor_field_problems([_monitor(intervall="5s")])
        assert problem.where == "PodMonitor/shoal/shoal-cache"
        assert problem.message.startswith("$.spec.podMetricsEndpoints[0]: field(s) ['intervall']")


# --- RBAC -----------------------------------------------------------------------------------


class TestCallsFoundInTheCode:
    def test_the_autoscaler_calls_are_exactly_the_kubernetes_actuators(self) -> None:
        actuator = (REPO / "control/autoscale/actuators/kubernetes.py").read_text()
        in_actuator = set(re.findall(r"(?:apps|core)\.(\w+)\(", actuator))
        found = {call.method for call in rbac.scan_calls("control/autoscale")}
        assert (
            found
            == in_actuator
            == {
                "list_namespaced_pod",
                "patch_namespaced_deployment_scale",
                "patch_namespaced_stateful_set_scale",
                "read_namespaced_deployment",
                "read_namespaced_deployment_scale",
                "read_namespaced_stateful_set",
                "read_namespaced_stateful_set_scale",
            }
        )

    def test_a_call_passed_as_a_function_is_found(self) -> None:
        assert [call.method for call in rbac.scan_calls("control/health")] == ["patch_node"]

    @pytest.mark.parametrize(
        ("method", "grant"),
        [
            (
                "patch_namespaced_deployment_scale",
                rbac.Grant("apps", "deployments/scale", "patch", True),
            ),
            ("read_namespaced_endpoints", rbac.Grant("", "endpoints", "get", True)),
            (
                "list_namespaced_endpoint_slice",
                rbac.Grant("discovery.k8s.io", "endpointslices", "list", True),
            ),
            ("patch_node", rbac.Grant("", "nodes", "patch", False)),
            ("list_pod_for_all_namespaces", rbac.Grant("", "pods", "list", False)),
            ("read_text", None),
        ],
    )
    def test_a_method_maps_to_what_rbac_checks(self, method: str, grant: rbac.Grant | None) -> None:
        assert rbac.api_method(method) == ((grant,) if grant else ())


class TestRbac:
    def test_the_stack_is_granted_exactly_what_it_calls(self, stack: list[Obj]) -> None:
        assert rbac.rbac_problems(stack) == []

    def test_a_missing_rule_names_the_call_and_where_the_code_makes_it(
        self, values: Values
    ) -> None:
        objects = _autoscaler(values, AUTOSCALER_RULES[:2])
        (problem,) = rbac.rbac_problems(objects)
        assert problem.where == "Deployment/shoal/shoal-autoscaler"
        assert problem.message.startswith(
            "ServiceAccount shoal-autoscaler may not list pods in namespace shoal, which "
            "list_namespaced_pod (control/autoscale/actuators/kubernetes.py:"
        )

    def test_a_rule_no_call_needs_is_least_privilege_violated(self, values: Values) -> None:
        extra = {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["patch"]}
        objects = _autoscaler(values, [*AUTOSCALER_RULES, extra])
        assert _messages(rbac.rbac_problems(objects)) == [
            "[rbac] Role/shoal/shoal-autoscaler: rules[3] patch statefulsets/scale.apps: no call "
            "of the pods bound to it needs it (least privilege: remove it)"
        ]

    def test_a_wildcard_rule_is_a_problem(self, values: Values) -> None:
        objects = _autoscaler(
            values,
            [*AUTOSCALER_RULES, {"apiGroups": ["apps"], "resources": ["*"], "verbs": ["get"]}],
        )
        assert [p.message for p in rbac.rbac_problems(objects)] == [
            "rules[3] a wildcard (get *.apps) grants more than the code calls"
        ]

    def test_a_call_the_configuration_cannot_make_needs_no_rule(self, stack: list[Obj]) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"] = [e for e in router["env"] if e["name"] != "SHOAL_ROUTER_DISCOVERY"]
        router["env"].append({"name": "SHOAL_ROUTER_ENGINES", "value": "http://vllm:8000"})
        assert [p.message for p in rbac.rbac_problems(stack)] == [
            "automounts a ServiceAccount token but makes no Kubernetes API call: "
            "automountServiceAccountToken: false",
            "rules[0] list endpointslices.discovery.k8s.io: no call of the pods bound to it "
            "needs it (least privilege: remove it)",
        ]

    def test_a_resource_names_rule_counts_only_for_the_object_the_code_touches(
        self, values: Values
    ) -> None:
        named = [{**rule, "resourceNames": ["other"]} for rule in AUTOSCALER_RULES[:2]]
        objects = _autoscaler(values, [*named, AUTOSCALER_RULES[2]])
        messages = [p.message for p in rbac.rbac_problems(objects)]
        assert messages[0].startswith("ServiceAccount shoal-autoscaler may not patch deployments")
        named = [{**rule, "resourceNames": ["vllm"]} for rule in AUTOSCALER_RULES[:2]]
        assert rbac.rbac_problems(_autoscaler(values, [*named, AUTOSCALER_RULES[2]])) == []

    def test_a_dry_run_cordon_makes_no_call_so_its_token_is_a_problem(self, values: Values) -> None:
        env = _env(SHOAL_HEALTH_CORDON="true", SHOAL_HEALTH_CORDON_APPLY="false")
        pod = {"containers": [_container("health", ["shoal", "health", "watch"], env=env)]}
        health = _workload("DaemonSet", "shoal-health", "health", pod)
        (problem,) = rbac.rbac_problems([health])
        assert problem.message.startswith("automounts a ServiceAccount token")

    def test_an_applied_cordon_needs_patch_on_nodes_cluster_wide(self, values: Values) -> None:
        env = _env(SHOAL_HEALTH_CORDON="true", SHOAL_HEALTH_CORDON_APPLY="true")
        pod = {
            "serviceAccountName": "shoal-health",
            "containers": [_container("health", ["shoal", "health", "watch"], env=env)],
        }
        health = _workload("DaemonSet", "shoal-health", "health", pod)
        (problem,) = rbac.rbac_problems([health])
        assert problem.message.startswith(
            "ServiceAccount shoal-health may not patch nodes cluster-wide, which patch_node"
        )


# --- secrets and the whole run --------------------------------------------------------------


class TestSecrets:
    def test_the_default_values_need_the_control_token_api_keys_and_curve_keys(self) -> None:
        specs = {s.name: s.keys for s in required_secrets(_values())}
        assert specs == {
            "shoal-control-token": ("token",),
            "shoal-router-api-keys": ("api-keys",),
            "shoal-cache-curve": ("cluster.key", "cluster.key_secret"),
            "shoal-cache-curve-operators": ("admin.key",),
        }

    def test_per_node_keys_add_the_members_secret_the_nodes_fill(self) -> None:
        values = _values(cache={"cluster": {"keys": "per_node"}})
        specs = {s.name: s for s in required_secrets(values)}
        assert list(specs) == [
            "shoal-control-token",
            "shoal-router-api-keys",
            "shoal-cache-curve",
            "shoal-cache-curve-operators",
            "shoal-cache-curve-members",
        ]
        members = specs["shoal-cache-curve-members"]
        assert members.keys == ()  # each node's key is added by the patch its pod logs
        assert members.create_command == (
            "kubectl create secret generic shoal-cache-curve-members -n shoal"
        )
        assert "shoal cache keygen keys --operator admin" in (
            specs["shoal-cache-curve"].create_command
        )

    def test_no_control_daemon_no_token_no_s3_without_a_secret(self) -> None:
        values = _values(
            autoscaler={"enabled": False},
            health={"enabled": False},
            cache={"cluster": {"keys": "insecure"}},
            router={"api_keys_secret": ""},
        )
        assert required_secrets(values) == []
        (s3,) = required_secrets(
            _values(
                autoscaler={"enabled": False},
                health={"enabled": False},
                cache={"enabled": False},
                router={"api_keys_secret": ""},
                engine={"loader": {"uri": "s3://weights/model", "s3_secret": "weights-s3"}},
            )
        )
        assert (s3.name, s3.keys) == ("weights-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


def test_an_unknown_kubernetes_version_is_a_usage_error_naming_the_known_ones() -> None:
    from shoal.cli import main

    with pytest.raises(ConfigError, match=r"--kubernetes-version 9.99: .* known: 1\.\d+"):
        schema.check_versions(["9.99"])
    assert main(["deploy", "check", "--kubernetes-version", "9.99"]) == 2


def test_render_out_that_cannot_be_written_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shoal.cli import main

    (tmp_path / "file").write_text("")
    assert main(["deploy", "render", "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: not a directory" in capsys.readouterr().err


def test_check_all_runs_schema_contracts_and_rbac(values: Values) -> None:
    stack = _stack(values)
    assert check_all(stack, values, kubernetes_versions=["1.37"], crds=False) == []
    broken = copy.deepcopy(stack)
    _find(broken, "Role", "shoal-router")["rules"] = []
    _pod(broken, "Deployment", "vllm")["hostPID"] = True
    _find(broken, "Service", "vllm")["spec"]["bogus"] = 1
    checks = [p.check for p in check_all(broken, values, kubernetes_versions=["1.37"], crds=False)]
    assert checks == ["schema", "contract", "rbac"]
