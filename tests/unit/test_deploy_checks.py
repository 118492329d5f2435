"""Specification of deploy/checks and deploy/secrets: each check passes a well-formed stack
and names the one violation planted in it.

The stack is hand-built here (``_stack``: a cache DaemonSet, an engine Deployment with the
loader as a native sidecar, the router and its Service, the autoscaler with its RBAC), so
the checks are specified independently of the component renderers.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from deploy.checks import Problem, rbac, schema
from deploy.checks import contracts as c
from deploy.checks.run import check_all
from deploy.objects import container_security, labels, pod_security, selector
from deploy.secrets import required_secrets
from deploy.values import Values, parse_values
from shoal.errors import ConfigError

Obj = dict[str, Any]
REPO = Path(__file__).resolve().parents[2]
NS = "shoal"
SHM, RUN = "/dev/shm/shoal", "/run/shoal"
SOCKET = f"ipc://{RUN}/shoal-default.sock"
TOKEN = "/etc/shoal/control-token"


# --- factories ------------------------------------------------------------------------------


def _values(**document: Any) -> Values:
    return parse_values(document)


def _env(**env: Any) -> list[Obj]:
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def _meta(name: str, component: str) -> Obj:
    return {"name": name, "namespace": NS, "labels": labels(component)}


def _container(name: str, command: list[str], *, memory: str = "1Gi", **extra: Any) -> Obj:
    return {
        "name": name,
        "image": "ghcr.io/shoal-project/shoal:1",
        "command": command,
        "securityContext": container_security(),
        "resources": {"requests": {"cpu": "1", "memory": memory}, "limits": {"memory": memory}},
        **extra,
    }


def _workload(kind: str, name: str, component: str, pod: Obj) -> Obj:
    pod.setdefault("enableServiceLinks", False)
    spec: Obj = {
        "selector": {"matchLabels": selector(component)},
        "template": {"metadata": {"labels": labels(component)}, "spec": pod},
    }
    api = "apps/v1"
    return {"apiVersion": api, "kind": kind, "metadata": _meta(name, component), "spec": spec}


def _service(name: str, component: str, ports: list[tuple[str, int]]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, component),
        "spec": {
            "selector": selector(component),
            "ports": [{"name": n, "port": p, "targetPort": n} for n, p in ports],
        },
    }


def _node_volumes(kind: str) -> list[Obj]:
    return [
        {"name": "shoal-shm", "hostPath": {"path": SHM, "type": kind}},
        {"name": "shoal-run", "hostPath": {"path": RUN, "type": kind}},
    ]


NODE_MOUNTS = [{"name": "shoal-shm", "mountPath": SHM}, {"name": "shoal-run", "mountPath": RUN}]
TOKEN_VOLUME = {"name": "control-token", "secret": {"secretName": "shoal-control-token"}}
TOKEN_MOUNT = {"name": "control-token", "mountPath": TOKEN, "readOnly": True}
CURVE = "/etc/shoal/curve"
# The key layout of deploy/components/cache.py: an emptyDir holding the cluster keypair
# (subPath of an items volume) and the operators' Secret mounted whole.
CURVE_VOLUMES = [
    {"name": "curve", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
    {
        "name": "curve-cluster",
        "secret": {
            "secretName": "shoal-cache-curve",
            "items": [{"key": k, "path": k} for k in ("cluster.key", "cluster.key_secret")],
        },
    },
    {"name": "curve-operators", "secret": {"secretName": "shoal-cache-curve-operators"}},
]
CURVE_MOUNTS = [
    {"name": "curve", "mountPath": CURVE},
    *(
        {"name": "curve-cluster", "mountPath": f"{CURVE}/{k}", "subPath": k, "readOnly": True}
        for k in ("cluster.key", "cluster.key_secret")
    ),
    {"name": "curve-operators", "mountPath": f"{CURVE}/operators", "readOnly": True},
]


def _cache(values: Values) -> list[Obj]:
    daemon = _container(
        "cache",
        ["shoal", "cache", "serve"],
        memory="26Gi",
        env=_env(
            SHOAL_CACHE_SHM_DIR=SHM,
            SHOAL_CACHE_RUNTIME_DIR=RUN,
            SHOAL_CACHE_SHM_BYTES="8GiB",
            SHOAL_CACHE_DRAM_BYTES="16GiB",
            SHOAL_CACHE_CLUSTER_HOST="0.0.0.0",
            SHOAL_CACHE_CLUSTER_PORT=7400,
            SHOAL_CACHE_CLUSTER_CURVE_DIR=CURVE,
            SHOAL_CACHE_CLUSTER_CURVE_KEY=f"{CURVE}/cluster.key_secret",
            SHOAL_CACHE_CLUSTER_DISCOVERY="dns",
            SHOAL_CACHE_CLUSTER_DNS_NAME="shoal-cache",
        ),
        ports=[
            {"name": "cluster", "containerPort": 7400},
            {"name": "stream", "containerPort": 7401},
            {"name": "metrics", "containerPort": 9500},
        ],
        volumeMounts=[*NODE_MOUNTS, *copy.deepcopy(CURVE_MOUNTS)],
    )
    init = _container(
        "node-dirs",
        ["sh", "-c", "mkdir"],
        memory="64Mi",
        securityContext={"runAsUser": 0, "runAsNonRoot": False},
    )
    pod = {
        "securityContext": pod_security(values),
        "automountServiceAccountToken": False,
        "initContainers": [init],
        "containers": [daemon],
        "volumes": [
            *_node_volumes("DirectoryOrCreate"),
            *copy.deepcopy(CURVE_VOLUMES),
        ],
    }
    return [
        _service("shoal-cache", "cache", [("cluster", 7400)]),
        _workload("DaemonSet", "shoal-cache", "cache", pod),
    ]


def _engine(values: Values) -> list[Obj]:
    config = {
        "kv_connector": "ShoalConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"endpoint": SOCKET},
    }
    vllm = _container(
        "vllm",
        ["vllm", "serve", "m", "--kv-transfer-config", json.dumps(config)],
        memory="84Gi",
        env=_env(SHOAL_CACHE_SHM_DIR=SHM),
        ports=[{"name": "http", "containerPort": 8000}],
        volumeMounts=[*NODE_MOUNTS, {"name": "dshm", "mountPath": "/dev/shm"}],
    )
    loader = _container(
        "loader",
        ["shoal", "loader", "serve"],
        memory="1Gi",
        env=_env(SHOAL_LOADER_CAPACITY_BYTES="32GiB"),
        restartPolicy="Always",
        volumeMounts=[{"name": "dshm", "mountPath": "/dev/shm"}],
    )
    pod = {
        "securityContext": pod_security(values),
        "automountServiceAccountToken": False,
        "initContainers": [loader],
        "containers": [vllm],
        "volumes": [
            *_node_volumes("Directory"),
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "36Gi"}},
        ],
    }
    return [
        _service("vllm", "engine", [("http", 8000)]),
        _workload("Deployment", "vllm", "engine", pod),
    ]


def _router(values: Values) -> list[Obj]:
    router = _container(
        "router",
        ["shoal", "router", "serve"],
        env=_env(
            SHOAL_ROUTER_HOST="0.0.0.0",
            SHOAL_ROUTER_API_KEYS="/etc/shoal/api-keys/api-keys",
            SHOAL_ROUTER_ENGINES="vllm:http",
            SHOAL_ROUTER_DISCOVERY="k8s",
            SHOAL_ROUTER_AUTOSCALER_URL="http://shoal-autoscaler:8090",
            SHOAL_ROUTER_AUTOSCALER_TOKEN_FILE=f"{TOKEN}/token",
        ),
        ports=[{"name": "http", "containerPort": 8080}],
        volumeMounts=[{"name": "api-keys", "mountPath": "/etc/shoal/api-keys"}, TOKEN_MOUNT],
    )
    pod = {
        "securityContext": pod_security(values),
        "serviceAccountName": "shoal-router",
        "containers": [router],
        "volumes": [
            {"name": "api-keys", "secret": {"secretName": "shoal-router-api-keys"}},
            TOKEN_VOLUME,
        ],
    }
    rules = [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list"]}
    ]
    return [
        *_rbac("shoal-router", "router", rules),
        _service("shoal-router", "router", [("http", 8080)]),
        _workload("Deployment", "shoal-router", "router", pod),
    ]


AUTOSCALER_RULES = [
    {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale"], "verbs": ["get"]},
    {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
]


def _rbac(name: str, component: str, rules: list[Obj]) -> list[Obj]:
    rbac_api = "rbac.authorization.k8s.io/v1"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, component)},
        {
            "apiVersion": rbac_api,
            "kind": "Role",
            "metadata": _meta(name, component),
            "rules": rules,
        },
        {
            "apiVersion": rbac_api,
            "kind": "RoleBinding",
            "metadata": _meta(name, component),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}],
        },
    ]


def _autoscaler(values: Values, rules: list[Obj] | None = None) -> list[Obj]:
    container = _container(
        "autoscaler",
        ["shoal", "autoscale", "run"],
        env=_env(
            SHOAL_AUTOSCALE_TARGET="deployment/vllm",
            SHOAL_AUTOSCALE_HOST="0.0.0.0",
            SHOAL_AUTOSCALE_AUTH_TOKEN_FILE=f"{TOKEN}/token",
            SHOAL_AUTOSCALE_ROUTER_URL="http://shoal-router:8080",
        ),
        ports=[{"name": "http", "containerPort": 8090}],
        volumeMounts=[TOKEN_MOUNT],
    )
    pod = {
        "securityContext": pod_security(values),
        "serviceAccountName": "shoal-autoscaler",
        "containers": [container],
        "volumes": [TOKEN_VOLUME],
    }
    return [
        *_rbac("shoal-autoscaler", "autoscaler", AUTOSCALER_RULES if rules is None else rules),
        _service("shoal-autoscaler", "autoscaler", [("http", 8090)]),
        _workload("Deployment", "shoal-autoscaler", "autoscaler", pod),
    ]


def _stack(values: Values) -> list[Obj]:
    return [*_cache(values), *_engine(values), *_router(values), *_autoscaler(values)]


def _find(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def _pod(objects: list[Obj], kind: str, name: str) -> Obj:
    return _find(objects, kind, name)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _messages(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]


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


def _monitor(**endpoint: Any) -> Obj:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": _meta("shoal-cache", "cache"),
        "spec": {
            "selector": {"matchLabels": selector("cache")},
            "podMetricsEndpoints": [{"port": "metrics", "interval": "15s", **endpoint}],
        },
    }


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


# --- contracts ------------------------------------------------------------------------------


class TestContracts:
    def test_the_stack_keeps_every_contract(self, stack: list[Obj], values: Values) -> None:
        assert c.contract_problems(stack, values) == []

    def test_a_one_uid(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["initContainers"][0]["securityContext"]["runAsUser"] = 0
        assert [p.message for p in c.one_uid(stack, values)] == [
            "container loader mounts a node dir but runs with runAsUser 0, not 10001 "
            "(values.run_as_*)"
        ]

    def test_b_one_shm_path(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["containers"][0]["env"][0]["value"] = "/dev/shm"
        assert [p.message for p in c.one_shm_path(stack, values)] == [
            "engine container vllm: SHOAL_CACHE_SHM_DIR '/dev/shm' != the daemon's '/dev/shm/shoal'"
        ]

    def test_b_the_connector_endpoint_is_the_daemons_socket(
        self, stack: list[Obj], values: Values
    ) -> None:
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"][-1] = vllm["command"][-1].replace("shoal-default", "shoal-other")
        (problem,) = c.one_shm_path(stack, values)
        assert "the connector endpoint 'ipc:///run/shoal/shoal-other.sock'" in problem.message

    def test_b_the_shm_dir_is_a_host_path(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][0] = {"name": "shoal-shm", "emptyDir": {}}
        (problem,) = c.one_shm_path(stack, values)
        assert (
            problem.where == "Deployment/shoal/vllm" and "is not the host path" in problem.message
        )

    def test_c_same_host_pid(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["hostPID"] = True
        (problem,) = c.same_host_pid(stack, values)
        assert problem.where == "Deployment/shoal/vllm"
        assert problem.message.startswith("hostPID False differs from the cache daemon's [True]")

    def test_d_a_dialed_service_must_exist(self, stack: list[Obj], values: Values) -> None:
        stack.remove(_find(stack, "Service", "shoal-autoscaler"))
        assert _messages(c.dialed_services(stack, values)) == [
            "[contract] Deployment/shoal/shoal-router container router: dials "
            "shoal/shoal-autoscaler:8090 (SHOAL_ROUTER_AUTOSCALER_URL): no such Service is rendered"
        ]

    def test_d_the_service_must_have_the_port(self, stack: list[Obj], values: Values) -> None:
        _find(stack, "Service", "vllm")["spec"]["ports"][0]["name"] = "web"
        (problem,) = c.dialed_services(stack, values)
        assert (
            problem.message == "dials shoal/vllm:http (SHOAL_ROUTER_ENGINES): the Service "
            "has no such port"
        )

    def test_d_the_service_must_select_a_pod_exposing_it(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["ports"] = []
        (problem,) = c.dialed_services(stack, values)
        assert problem.message.endswith("the Service selects no rendered pod exposing port http")

    def test_d_a_monitors_port_must_be_a_container_port(
        self, stack: list[Obj], values: Values
    ) -> None:
        stack.append(_monitor(port="prom"))
        (problem,) = c.dialed_services(stack, values)
        assert problem.where == "PodMonitor/shoal/shoal-cache"

    def test_e_known_settings(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]["env"].append(
            {"name": "SHOAL_CACHE_ARENA_BYTES", "value": "1GiB"}
        )
        _pod(stack, "Deployment", "vllm")["containers"][0]["env"].append(
            {"name": "SHOAL_CONNECTOR_ENDPOINT", "value": SOCKET}
        )
        assert [p.message for p in c.known_settings(stack, values)] == [
            "SHOAL_CACHE_ARENA_BYTES: CacheConfig has no setting 'arena_bytes'"
        ]

    def test_f_the_daemon_limit_covers_its_tiers(self, stack: list[Obj], values: Values) -> None:
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["resources"] = {"requests": {"memory": "20Gi"}, "limits": {"memory": "20Gi"}}
        (problem,) = c.memory(stack, values)
        assert problem.message.startswith("memory limit 21474836480 < shm + dram + io staging")

    def test_f_dev_shm_covers_the_loaders_capacity(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][2]["emptyDir"]["sizeLimit"] = "16Gi"
        (problem,) = c.memory(stack, values)
        assert problem.where == "Deployment/shoal/vllm" and "34359738368 bytes" in problem.message

    def test_f_requests_equal_limits(self, stack: list[Obj], values: Values) -> None:
        init = _pod(stack, "DaemonSet", "shoal-cache")["initContainers"][0]
        init["resources"]["requests"]["memory"] = "16Mi"
        assert [p.message for p in c.memory(stack, values)] == [
            "memory request 16777216 != limit 67108864 (they must be equal)"
        ]

    def test_g_a_referenced_secret_must_be_listed(self, stack: list[Obj]) -> None:
        values = _values(router={"api_keys_secret": ""})
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "volume api-keys uses Secret shoal-router-api-keys, which deploy.secrets does not list"
        ]

    def test_g_a_used_key_must_be_listed(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][1]["value"] = "/etc/shoal/api-keys/keys.txt"
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "env SHOAL_ROUTER_API_KEYS uses key keys.txt of Secret shoal-router-api-keys; "
            "deploy.secrets lists ['api-keys']"
        ]

    def test_i_a_listener_beyond_loopback_needs_auth(
        self, stack: list[Obj], values: Values
    ) -> None:
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["env"] = [e for e in daemon["env"] if e["name"] != "SHOAL_CACHE_CLUSTER_CURVE_DIR"]
        assert [p.message for p in c.auth_beyond_loopback(stack, values)] == [
            "SHOAL_CACHE_CLUSTER_HOST=0.0.0.0 listens beyond loopback without "
            "SHOAL_CACHE_CLUSTER_CURVE_DIR (or SHOAL_CACHE_CLUSTER_INSECURE=true)"
        ]

    def test_j_service_links_must_be_off(self, stack: list[Obj], values: Values) -> None:
        assert c.no_service_links(stack, values) == []
        del _pod(stack, "Deployment", "shoal-router")["enableServiceLinks"]
        (problem,) = c.no_service_links(stack, values)
        assert problem.where == "Deployment/shoal/shoal-router"
        assert "VLLM_PORT" in problem.message

    def test_h_an_alert_on_a_metric_shoal_does_not_export(self, values: Values) -> None:
        rule = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "shoal", "namespace": "shoal"},
            "spec": {
                "groups": [
                    {
                        "name": "shoal",
                        "rules": [
                            {"alert": "Good", "expr": "rate(shoal_kvcache_no_space_total[5m]) > 0"},
                            {
                                "alert": "Hist",
                                "expr": "histogram_quantile(0.9, shoal_router_held_seconds_bucket)",
                            },
                            {"alert": "Bad", "expr": "rate(shoal_kvcache_no_spaces_total[5m]) > 0"},
                        ],
                    }
                ]
            },
        }
        assert [p.message for p in c.alert_metrics([rule], values)] == [
            "Bad: shoal_kvcache_no_spaces_total is not a metric Shoal exports "
            "(deploy/metrics_catalogue.py)"
        ]

    def test_i_an_explicit_insecure_flag_is_enough(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][1] = {"name": "SHOAL_ROUTER_INSECURE_NO_AUTH", "value": "true"}
        assert c.auth_beyond_loopback(stack, values) == []

    def test_b_the_kv_events_endpoints_are_ones_the_daemon_follows(self, stack: list[Obj]) -> None:
        values = _values(cache={"num_event_slots": 2})
        events = {
            "endpoint": f"ipc://{RUN}/gpu$i.pub",
            "replay_endpoint": f"ipc://{RUN}/gpu$i.replay",
        }
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"] = [
            "sh",
            "-c",
            f"exec vllm serve m --kv-events-config '{json.dumps(events)}'",
        ]
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["env"] += _env(
            SHOAL_CACHE_ENGINE_EVENTS=f"ipc://{RUN}/gpu0.pub",
            SHOAL_CACHE_ENGINE_EVENTS_REPLAY=f"ipc://{RUN}/gpu0.replay",
        )
        (problem,) = c.one_shm_path(stack, values)
        assert "the KV-events endpoint ipc:///run/shoal/gpu1.pub is not among" in problem.message
        vllm["command"] = [
            "vllm",
            "serve",
            "--kv-events-config",
            json.dumps({"endpoint": "ipc:///tmp/gpu0.pub"}),
        ]
        assert len(c.one_shm_path(stack, values)) == 2  # not under the runtime dir, not followed

    def test_b_the_last_copy_of_a_repeated_flag_is_the_one_checked(
        self, stack: list[Obj], values: Values
    ) -> None:
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"] += ["--kv-transfer-config", json.dumps({"kv_connector": "X"})]
        (problem,) = c.one_shm_path(stack, values)
        assert "the connector endpoint None" in problem.message

    def test_a_the_init_chowns_to_the_one_uid_and_pods_run_as_non_root(
        self, stack: list[Obj], values: Values
    ) -> None:
        cache = _pod(stack, "DaemonSet", "shoal-cache")
        cache["initContainers"][0]["command"] = [
            "sh",
            "-c",
            f"mkdir -p {RUN} && chown 1000:1000 {RUN}",
        ]
        del _pod(stack, "Deployment", "vllm")["securityContext"]["runAsNonRoot"]
        assert [p.message[:40] for p in c.one_uid(stack, values)] == [
            "init node-dirs runs chown 1000:1000, not",
            "mounts a node dir without runAsNonRoot: ",
        ]

    def test_e_a_setting_sits_on_a_container_that_reads_its_section_and_loads(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]["env"] += _env(SHOAL_ROUTER_PORT=1)
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["env"] += _env(
            SHOAL_ROUTER_PORT="x"
        )
        messages = [p.message for p in c.known_settings(stack, values)]
        assert messages[0] == (
            "SHOAL_ROUTER_PORT: the container runs shoal cache, which reads SHOAL_CACHE_*, not this"
        )
        assert messages[1].startswith("its settings do not load: SHOAL_ROUTER_PORT: invalid")

    def test_f_engine_sizes_are_at_least_the_derived_ones(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][2]["emptyDir"]["sizeLimit"] = "64Mi"
        _pod(stack, "Deployment", "vllm")["containers"][0]["resources"] = {
            "limits": {"memory": "1Mi"}
        }
        messages = [p.message[:28] for p in c.memory(stack, values)]
        assert messages[:2] == ["memory limit 1048576 < 55834", "/dev/shm sizeLimit 67108864 "]

    def test_f_a_malformed_quantity_is_a_problem(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["resources"]["limits"][
            "memory"
        ] = "8GiB"
        (problem,) = c.memory(stack, values)
        assert problem.message == "not a Kubernetes quantity: '8GiB'"

    def test_g_a_file_no_item_projects_is_a_problem(self, stack: list[Obj], values: Values) -> None:
        pod = _pod(stack, "Deployment", "shoal-router")
        pod["volumes"][0]["secret"]["items"] = [{"key": "api-keys", "path": "apikeys"}]
        (problem,) = c.listed_secrets(stack, values)
        assert problem.message.endswith("file api-keys is not projected by volume api-keys")

    def test_g_a_path_setting_lies_under_a_mount(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][5]["value"] = "/etc/shoal/contrl-token/token"
        (problem,) = c.listed_secrets(stack, values)
        assert (
            "SHOAL_ROUTER_AUTOSCALER_TOKEN_FILE=/etc/shoal/contrl-token/token lies under none"
            in problem.message
        )

    def test_g_every_listed_key_is_projected(self, stack: list[Obj]) -> None:
        values = _values(cache={"cluster": {"operators": ["admin", "ci"]}})
        assert c.listed_secrets(stack, values) == []  # a whole-Secret mount projects every key
        pod = _pod(stack, "DaemonSet", "shoal-cache")
        pod["volumes"][3]["secret"]["items"] = [{"key": "cluster.key", "path": "cluster.key"}]
        pod["volumes"][4]["secret"]["items"] = [{"key": "admin.key", "path": "admin.key"}]
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "key cluster.key_secret is listed by deploy.secrets but no pod projects it",
            "key ci.key is listed by deploy.secrets but no pod projects it",
        ]

    def test_g_nested_whole_secret_mounts_and_node_held_keys_pass(self, stack: list[Obj]) -> None:
        values = _values(cache={"cluster": {"keys": "per_node"}})
        pod = _pod(stack, "DaemonSet", "shoal-cache")
        pod["volumes"] += [
            {"name": "curve-members", "secret": {"secretName": "shoal-cache-curve-members"}},
            {"name": "node-key", "hostPath": {"path": "/var/lib/shoal/curve"}},
        ]
        daemon = pod["containers"][0]
        daemon["volumeMounts"] += [
            {"name": "curve-members", "mountPath": f"{CURVE}/members", "readOnly": True},
            {"name": "node-key", "mountPath": "/var/lib/shoal/curve", "readOnly": True},
        ]
        (key,) = [e for e in daemon["env"] if e["name"] == "SHOAL_CACHE_CLUSTER_CURVE_KEY"]
        key["value"] = "/var/lib/shoal/curve/$(NODE_NAME).key_secret"  # made on the node
        assert c.listed_secrets(stack, values) == []
        del daemon["volumeMounts"][-1]
        (problem,) = c.listed_secrets(stack, values)
        assert (
            "SHOAL_CACHE_CLUSTER_CURVE_KEY=/var/lib/shoal/curve/$(NODE_NAME).key_secret "
            "lies under none" in problem.message
        )

    def test_k_the_process_listens_on_the_targeted_port_beyond_loopback(
        self, stack: list[Obj], values: Values
    ) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"] += _env(SHOAL_ROUTER_PORT=9999)
        assert [p.message for p in c.listen_ports(stack, values)] == [
            "Service/shoal/shoal-router targets port http (8080), but the process listens on [9999]",
            "listens on 0.0.0.0:9999, which is not a declared containerPort [8080]",
        ]
        router["env"] = [
            e for e in router["env"] if e["name"] not in ("SHOAL_ROUTER_PORT", "SHOAL_ROUTER_HOST")
        ]
        (problem,) = c.listen_ports(stack, values)
        assert problem.message.endswith("but the process listens on 127.0.0.1 only")

    def test_l_a_policy_selects_pods_names_their_ports_and_admits_each_dial(
        self, stack: list[Obj], values: Values
    ) -> None:
        ingress = [
            {
                "ports": [{"port": "http"}],
                "from": [{"podSelector": {"matchLabels": selector("autoscaler")}}],
            }
        ]
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("vllm", "engine"),
            "spec": {"podSelector": {"matchLabels": selector("engine")}, "ingress": ingress},
        }
        stack.append(policy)
        (problem,) = c.policies_and_selectors(stack, values)
        assert problem.message.startswith(
            "dials shoal/vllm:http (SHOAL_ROUTER_ENGINES), but no NetworkPolicy"
        )
        ingress[0]["from"] = []
        ingress[0]["ports"] = [{"port": "metrics"}]
        assert (
            "port 'metrics' is no containerPort"
            in c.policies_and_selectors(stack, values)[0].message
        )
        policy["spec"]["podSelector"] = {"matchLabels": {"app.kubernetes.io/component": "engin"}}
        (problem,) = c.policies_and_selectors(stack, values)
        assert problem.message == "its podSelector selects no rendered pod"

    def test_l_probes_pdbs_and_workload_selectors_resolve(
        self, stack: list[Obj], values: Values
    ) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["livenessProbe"] = {"httpGet": {"path": "/health", "port": "metricz"}}
        _find(stack, "Deployment", "vllm")["spec"]["selector"]["matchLabels"]["x"] = "y"
        stack.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": _meta("r", "router"),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"a": "routr"}}},
            }
        )
        assert [p.message[:30] for p in c.policies_and_selectors(stack, values)] == [
            "selector {'app.kubernetes.io/n",
            "livenessProbe port 'metricz' i",
            "its selector selects no render",
        ]

    def test_h_an_expression_must_parse_and_match_labels_and_jobs_that_exist(
        self, values: Values
    ) -> None:
        rule = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "shoal", "namespace": "shoal"},
            "spec": {
                "groups": [
                    {
                        "name": "shoal",
                        "rules": [
                            {
                                "alert": "Ok",
                                "expr": 'sum by (job, pod) (rate(shoal_kvcache_io_errors_total{job="shoal-cache"}[5m])) > 0 and on() vector(1)',
                            },
                            {"alert": "Syntax", "expr": "up ) )"},
                            {
                                "alert": "By",
                                "expr": "sum by (nodee) (shoal_kvcache_io_errors_total)",
                            },
                            {"alert": "Label", "expr": 'shoal_kvcache_engine_connected{tierr="x"}'},
                            {
                                "alert": "Job",
                                "expr": 'up{job="shoal-cach"} == 0 or vllm:num_requests_running > 0',
                            },
                        ],
                    }
                ]
            },
        }
        assert [
            p.message
            for p in c.alert_metrics(
                [
                    rule,
                    _monitor(relabelings=[{"targetLabel": "job", "replacement": "shoal-cache"}]),
                ],
                values,
            )
        ] == [
            "Syntax: not valid PromQL: unexpected right parenthesis ')'",
            "By: groups by 'nodee', which no series it reads carries",
            "Label: shoal_kvcache_engine_connected has no label 'tierr' (it has ['engine'])",
            "Job: job 'shoal-cach' is not a job any monitor scrapes (['shoal-cache'])",
        ]

    @pytest.mark.parametrize(
        ("text", "num_bytes"),
        [
            ("8192Mi", 8 << 30),
            ("1G", 10**9),
            ("1024", 1024),
            ("1.5Gi", 3 << 29),
            ("500m", 1),
            ("1Ei", 1 << 60),
            ("1e3", 1000),
            ("2.5E+2", 250),
        ],
    )
    def test_quantities(self, text: str, num_bytes: int) -> None:
        assert c.parse_quantity(text) == num_bytes


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
