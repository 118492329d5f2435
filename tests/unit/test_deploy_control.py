"""The control plane's manifests: autoscaler, health watcher, fleet, policies and monitoring.

Each test reads the rendered objects (plain dicts) and checks them against what the code
they run does: the API calls grepped from the actuator and the cordoner, the ports and
paths the daemons serve, the metric names the code registers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from deploy import objects
from deploy.components import autoscaler, engine, fleet, health, monitoring, policies
from deploy.errors import ValuesError
from deploy.values import Values, parse_values

REPO = Path(__file__).resolve().parents[2]
MODULES = (autoscaler, health, fleet, policies, monitoring)
KUBERNETES_VERSIONS = ("1.36", "1.37")

# Every Kubernetes call of control/autoscale/actuators/kubernetes.py -> the rule it needs.
AUTOSCALER_CALLS = {
    "read_namespaced_deployment_scale": ("apps", "deployments/scale", "get"),
    "read_namespaced_deployment": ("apps", "deployments", "get"),
    "read_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "get"),
    "read_namespaced_stateful_set": ("apps", "statefulsets", "get"),
    "patch_namespaced_deployment_scale": ("apps", "deployments/scale", "patch"),
    "patch_namespaced_stateful_set_scale": ("apps", "statefulsets/scale", "patch"),
    "list_namespaced_pod": ("", "pods", "list"),
}
# ... and of control/health/cordon.py
HEALTH_CALLS = {"patch_node": ("", "nodes", "patch")}

FULL = {
    "router": {"precise": True},
    "engine": {"loader": {"uri": "s3://models/qwen3/"}},
    "health": {"cordon": True, "cordon_apply": True, "settings": {"expect_gpus": 8}},
    "fleet": {"enabled": True, "ray_address": "ray://raycluster-head-svc:10001"},
    "autoscaler": {"settings": {"min_replicas": 2, "max_replicas": 16, "policy": "kpa"}},
}


def values(document: dict[str, Any] | None = None) -> Values:
    return parse_values(document or {})


def rendered(v: Values) -> list[dict[str, Any]]:
    return [obj for module in MODULES for obj in module.render(v)]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def kinds(objs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objs}


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def covers(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
    )


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, res, verb)
        for r in rules
        for g in r["apiGroups"]
        for res in r["resources"]
        for verb in r["verbs"]
    }


def calls_in(path: str, receivers: str) -> set[str]:
    source = (REPO / path).read_text()
    return set(re.findall(rf"\b(?:{receivers})\.(\w+)\s*[(,]", source))


# --- every object is valid Kubernetes ----------------------------------------------------


@pytest.mark.parametrize("document", [{}, FULL], ids=["defaults", "full"])
def test_every_object_validates_strictly_on_the_two_newest_versions(document: dict) -> None:
    objs = rendered(values(document))
    assert objs
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the operator's kinds: the checks validate them with its models
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_disabled_components_render_nothing() -> None:
    off = values({
        "autoscaler": {"enabled": False},
        "health": {"enabled": False},
        "network_policies": False,
        "pod_disruption_budgets": False,
        "monitoring": {"service_monitors": False, "pod_monitors": False, "rules": False},
    })  # fmt: skip
    assert rendered(off) == []


def test_no_loader_endpoint_without_a_loader_sidecar() -> None:
    objs = monitoring.render(values())  # the loader runs only with a uri
    (engine,) = [o for o in objs if o["metadata"]["name"] == "shoal-engine"]
    assert [e["port"] for e in engine["spec"]["podMetricsEndpoints"]] == ["http"]


# --- the autoscaler ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "kind"),
    [(None, "deployment"), ("statefulset/engines", "stateful_set")],
    ids=["deployment", "statefulset"],
)
def test_autoscaler_role_allows_exactly_the_calls_for_its_targets_kind(
    target: str | None, kind: str
) -> None:
    grepped = calls_in("control/autoscale/actuators/kubernetes.py", "apps|core")
    assert grepped == set(AUTOSCALER_CALLS), "the actuator's calls changed: update the table"
    document = {"autoscaler": {"settings": {"target": target}}} if target else {}
    role = find(autoscaler.render(values(document)), "Role", "shoal-autoscaler")
    assert role["metadata"]["namespace"] == "shoal"
    needed = {call: rule for call, rule in AUTOSCALER_CALLS.items()
              if "pod" in call or f"_{kind}" in call}  # fmt: skip
    for call, rule in needed.items():
        assert covers(role["rules"], *rule), f"{call} needs {rule}"
    assert grants(role["rules"]) == set(needed.values())
    named = [rule for rule in role["rules"] if rule["apiGroups"] == ["apps"]]
    expected_name = (target or "deployment/vllm").split("/")[1]
    assert all(rule["resourceNames"] == [expected_name] for rule in named)


def test_autoscaler_target_must_be_a_kubernetes_workload() -> None:
    with pytest.raises(ValuesError, match="deployment/NAME or statefulset/NAME"):
        autoscaler.render(values({"autoscaler": {"settings": {"target": "local"}}}))


def test_autoscaler_binding_names_its_account_in_the_namespace() -> None:
    objs = autoscaler.render(values({"namespace": "llm"}))
    binding = find(objs, "RoleBinding", "shoal-autoscaler")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "shoal-autoscaler",
    }  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "shoal-autoscaler", "namespace": "llm"}
    ]
    account = find(objs, "ServiceAccount", "shoal-autoscaler")
    assert account["automountServiceAccountToken"] is True


def test_autoscaler_runs_one_controller_with_its_settings() -> None:
    deployment = find(autoscaler.render(values()), "Deployment", "shoal-autoscaler")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(deployment)
    assert pod["serviceAccountName"] == "shoal-autoscaler"
    (container,) = pod["containers"]
    assert container["command"] == ["shoal", "autoscale", "run"]
    env = container_env(container)
    assert env["SHOAL_AUTOSCALE_TARGET"] == "deployment/vllm"
    assert env["SHOAL_AUTOSCALE_NAMESPACE"] == "shoal"
    assert env["SHOAL_AUTOSCALE_MODEL"] == "Qwen/Qwen3-0.6B"
    assert env["SHOAL_AUTOSCALE_ENGINE_PORT"] == "8000"
    assert env["SHOAL_AUTOSCALE_ROUTER_URL"] == "http://shoal-router-admin.shoal.svc:9091"
    assert env["SHOAL_AUTOSCALE_HOST"] == "0.0.0.0"
    assert env["SHOAL_AUTOSCALE_PORT"] == "8090"
    assert env["SHOAL_AUTOSCALE_AUTH_TOKEN_FILE"] == objects.CONTROL_TOKEN_FILE
    assert env["SHOAL_AUTOSCALE_LOG_FORMAT"] == "json"
    assert env["SHOAL_AUTOSCALE_MAX_REPLICAS"] == "8"
    assert container["ports"] == [{"name": "http", "containerPort": 8090, "protocol": "TCP"}]
    # the controller has no /healthz; /metrics is open (control/http.py) and served by its loop
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "http"}
    mount = container["volumeMounts"][0]
    assert objects.CONTROL_TOKEN_FILE.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "shoal-control-token"
    assert volume["secret"]["items"] == [{"key": "token", "path": "token"}]


def test_autoscaler_without_a_router_scrapes_none_and_the_user_wins_on_the_target() -> None:
    v = values({
        "router": {"enabled": False},
        "autoscaler": {"settings": {"target": "statefulset/big", "model": "m"}},
    })  # fmt: skip
    env = container_env(pod_spec(autoscaler.render(v)[-1])["containers"][0])
    assert "SHOAL_AUTOSCALE_ROUTER_URL" not in env
    assert env["SHOAL_AUTOSCALE_TARGET"] == "statefulset/big"
    assert env["SHOAL_AUTOSCALE_MODEL"] == "m"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"port": 9000}, "port"),
        ({"auth_token_file": "/x"}, "auth_token_file"),
        ({"namespace": "other"}, "namespace"),
        ({"max_replica": 3}, "unknown setting"),
        ({"min_replicas": 5, "max_replicas": 2}, "min-replicas"),
    ],
)
def test_autoscaler_settings_that_would_break_the_deployment_are_refused(
    settings: dict, message: str
) -> None:
    with pytest.raises(ValuesError, match=message):
        autoscaler.render(values({"autoscaler": {"settings": settings}}))


def test_autoscaler_service_exposes_http() -> None:
    service = find(autoscaler.render(values()), "Service", "shoal-autoscaler")
    assert service["spec"]["selector"] == objects.selector("autoscaler")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8090, "targetPort": "http", "protocol": "TCP"}
    ]


# --- the health watcher ----------------------------------------------------------------------


def test_health_cluster_role_is_exactly_the_cordoners_call_and_only_when_applied() -> None:
    assert calls_in("control/health/cordon.py", "api") == set(HEALTH_CALLS)
    applied = health.render(values({"health": {"cordon": True, "cordon_apply": True}}))
    role = find(applied, "ClusterRole", "shoal-health")
    assert "namespace" not in role["metadata"]
    assert grants(role["rules"]) == set(HEALTH_CALLS.values())
    binding = find(applied, "ClusterRoleBinding", "shoal-health")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "shoal-health", "namespace": "shoal"}
    ]
    assert find(applied, "ServiceAccount", "shoal-health")["automountServiceAccountToken"]
    assert pod_spec(find(applied, "DaemonSet", "shoal-health"))["automountServiceAccountToken"]
    # a dry run (cordon without apply) never builds an API client; no cordon at all neither
    for health_values in ({"cordon": True, "cordon_apply": False}, {"cordon": False}):
        objs = health.render(values({"health": health_values}))
        assert not {k for k, _ in kinds(objs)} & {"ClusterRole", "ClusterRoleBinding"}
        assert (
            pod_spec(find(objs, "DaemonSet", "shoal-health"))["automountServiceAccountToken"]
            is False
        )


# --- the cordon guard: a ValidatingAdmissionPolicy, its CEL evaluated with cel-python ---------

NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "gpu-node-1",
        "labels": {"kubernetes.io/hostname": "gpu-node-1", "nvidia.com/gpu.present": "true"},
        "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
    },
    "spec": {
        "podCIDR": "10.0.1.0/24",
        "providerID": "aws:///us-east-1a/i-0abc",
        "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}],
    },
}
WATCHER = "system:serviceaccount:shoal:shoal-health"


def cordon_guard() -> tuple[dict[str, Any], dict[str, Any]]:
    objs = health.render(values({"health": {"cordon": True, "cordon_apply": True}}))
    return (
        find(objs, "ValidatingAdmissionPolicy", health.CORDON_POLICY),
        find(objs, "ValidatingAdmissionPolicyBinding", health.CORDON_POLICY),
    )


def refusals(change: Any, *, user: str = WATCHER, node: str | None = "gpu-node-1") -> set[str]:
    """The messages the policy denies an UPDATE with (empty: allowed; ``{"not matched"}``:
    the policy does not apply to that user). ``change(new)`` edits a copy of ``NODE``."""
    import copy

    import celpy

    old = copy.deepcopy(NODE)
    new = copy.deepcopy(NODE)
    change(new)
    extra = {health.NODE_NAME_KEY: [node]} if node is not None else {}
    activation = celpy.json_to_cel({
        "object": new, "oldObject": old,
        "request": {"operation": "UPDATE", "userInfo": {"username": user, "extra": extra}},
    })  # fmt: skip
    env = celpy.Environment()
    policy = cordon_guard()[0]["spec"]

    def holds(expression: str) -> bool:
        return bool(env.program(env.compile(expression)).evaluate(activation))

    if not all(holds(c["expression"]) for c in policy["matchConditions"]):
        return {"not matched"}
    return {v["message"] for v in policy["validations"] if not holds(v["expression"])}


def cordon(node: dict[str, Any]) -> None:
    node["spec"]["unschedulable"] = True


def test_cordon_guard_allows_the_watcher_to_cordon_its_own_node_only() -> None:
    assert refusals(cordon) == set()  # what control/health/cordon.py sends
    assert refusals(cordon, node="gpu-node-2") == {
        v["message"] for v in cordon_guard()[0]["spec"]["validations"] if "own node" in v["message"]
    }
    assert len(refusals(cordon, node=None)) == 1  # no node claim (old cluster): fails closed
    assert refusals(cordon, user="system:serviceaccount:shoal:other") == {"not matched"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda n: None, "only cordon"),  # an update that does not cordon
        (lambda n: n["spec"].update(unschedulable=False), "never uncordon"),
        (lambda n: n["metadata"]["labels"].update({"nvidia.com/gpu.present": "false"}), "labels"),
        (lambda n: n["metadata"].pop("labels"), "labels"),
        (lambda n: n["metadata"]["annotations"].update(evil="1"), "annotations"),
        (lambda n: n["metadata"].update(finalizers=["x/y"]), "finalizers"),
        (lambda n: n["spec"].pop("taints"), "taints"),
        (lambda n: n["spec"]["taints"].append({"key": "k", "effect": "NoExecute"}), "taints"),
        (lambda n: n["spec"].update(providerID="aws:///other"), "rest of the spec"),
        (lambda n: n["spec"].update(podCIDRs=["10.9.0.0/16"]), "rest of the spec"),
    ],
)
def test_cordon_guard_refuses_every_other_change(change: Any, words: str) -> None:
    def cordon_and(node: dict[str, Any]) -> None:  # the cordon, plus the change
        if words not in ("only cordon", "never uncordon"):
            cordon(node)
        change(node)

    (message,) = refusals(cordon_and)
    assert words in message


def test_uncordoning_a_cordoned_node_is_refused_and_cordoning_it_again_is_not() -> None:
    NODE["spec"]["unschedulable"] = True  # the old object: cordoned already
    try:
        assert refusals(cordon) == set()
        (message,) = refusals(lambda n: n["spec"].pop("unschedulable"))
        assert "never uncordon" in message
    finally:
        del NODE["spec"]["unschedulable"]


def test_cordon_guard_is_bound_to_deny_and_matches_node_updates_only() -> None:
    policy, binding = cordon_guard()
    assert "namespace" not in policy["metadata"]
    assert binding["spec"] == {"policyName": health.CORDON_POLICY, "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"] == [{
        "apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
        "resources": ["nodes"],
    }]  # fmt: skip
    for health_values in ({"cordon": True, "cordon_apply": False}, {"cordon": False}):
        objs = health.render(values({"health": health_values}))
        assert not {k for k, _ in kinds(objs)} & {"ValidatingAdmissionPolicy"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_cordon_guard_keeps_every_node_spec_field_but_unschedulable(version: str) -> None:
    import json

    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    spec = json.loads((schema_dir / f"v{version}.0-local-strict" / "nodespec-v1.json").read_text())
    kept = " ".join(v["expression"] for v in cordon_guard()[0]["spec"]["validations"])
    missing = {f for f in spec["properties"] if f != "unschedulable"} - set(
        re.findall(r"object\.spec\.(\w+)", kept)
    )
    assert not missing, f"add {missing} to health._KEPT_SPEC"


def test_health_cordon_apply_without_cordon_is_refused() -> None:
    with pytest.raises(ValuesError, match="cordon_apply needs"):
        health.render(values({"health": {"cordon": False, "cordon_apply": True}}))


def test_health_node_names_come_from_the_downward_api() -> None:
    daemonset = find(health.render(values()), "DaemonSet", "shoal-health")
    (container,) = pod_spec(daemonset)["containers"]
    env = container_env(container)
    node_ref = {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["NODE_NAME"] == node_ref  # the cordoner's node (kube_node empty)
    assert env["SHOAL_HEALTH_NODE"] == node_ref  # GPU names NODE/gpuI
    assert "SHOAL_HEALTH_KUBE_NODE" not in env
    assert env["SHOAL_HEALTH_CORDON"] == "true"
    assert env["SHOAL_HEALTH_CORDON_APPLY"] == "false"
    assert env["SHOAL_HEALTH_HOST"] == "0.0.0.0"
    assert env["SHOAL_HEALTH_PORT"] == "8094"
    with pytest.raises(ValuesError, match="node"):
        health.render(values({"health": {"settings": {"node": "gpu-1"}}}))


def test_health_sees_every_gpu_and_takes_none() -> None:
    daemonset = find(health.render(values()), "DaemonSet", "shoal-health")
    pod = pod_spec(daemonset)
    (container,) = pod["containers"]
    env = container_env(container)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    for part in ("requests", "limits"):
        assert not any("nvidia.com" in key for key in container["resources"][part])
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    no_class = pod_spec(health.render(values({"health": {"runtime_class": ""}}))[-1])
    assert "runtimeClassName" not in no_class


def test_health_state_file_lives_on_a_host_path_the_watcher_owns() -> None:
    pod = pod_spec(find(health.render(values()), "DaemonSet", "shoal-health"))
    (container,) = pod["containers"]
    state_file = container_env(container)["SHOAL_HEALTH_STATE_FILE"]
    mount = next(
        m for m in container["volumeMounts"] if state_file.startswith(m["mountPath"] + "/")
    )
    assert not mount.get("readOnly")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"] == {"path": mount["mountPath"], "type": "DirectoryOrCreate"}
    (init,) = pod["initContainers"]
    assert f"chown 10001:10001 {mount['mountPath']}" in init["command"][-1]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}


def test_health_service_is_headless_with_http_and_probes_use_healthz() -> None:
    objs = health.render(values())
    service = find(objs, "Service", "shoal-health")
    assert service["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
    (container,) = pod_spec(find(objs, "DaemonSet", "shoal-health"))["containers"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert '"/healthz", _healthz' in (REPO / "control/health/watch.py").read_text()


# --- the fleet --------------------------------------------------------------------------


def test_fleet_needs_a_ray_cluster() -> None:
    with pytest.raises(ValuesError, match="ray_address"):
        fleet.render(values({"fleet": {"enabled": True}}))


def test_fleet_runs_one_daemon_joined_to_ray() -> None:
    objs = fleet.render(values(FULL))
    deployment = find(objs, "Deployment", "shoal-engines-fleet")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = pod_spec(deployment)
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] > 30  # stop_grace_s of every group
    (container,) = pod["containers"]
    assert container["command"] == ["shoal", "engines", "serve"]
    env = container_env(container)
    assert env["SHOAL_ENGINES_RAY_ADDRESS"] == "ray://raycluster-head-svc:10001"
    assert env["SHOAL_ENGINES_PORT"] == "8093"
    assert env["SHOAL_ENGINES_MODEL"] == "Qwen/Qwen3-0.6B"
    assert "{port}" in env["SHOAL_ENGINES_ENGINE_COMMAND"]
    assert env["SHOAL_ENGINES_AUTH_TOKEN_FILE"] == objects.CONTROL_TOKEN_FILE
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    service = find(objs, "Service", "shoal-engines-fleet")
    assert service["spec"]["ports"][0] == {
        "name": "http", "port": 8093, "targetPort": "http", "protocol": "TCP",
    }  # fmt: skip


def test_fleet_polls_every_health_watcher_through_the_headless_service() -> None:
    def env_of(document: dict[str, Any]) -> dict[str, Any]:
        deployment = find(fleet.render(values(document)), "Deployment", "shoal-engines-fleet")
        return container_env(pod_spec(deployment)["containers"][0])

    env = env_of(FULL)
    assert env["SHOAL_ENGINES_GPU_HEALTH"] == (
        "dns+http://shoal-health.shoal.svc:8094"
    )  # the DaemonSet's Service (deploy/components/health.py), each address a watcher
    assert env["SHOAL_ENGINES_GPU_HEALTH_TOKEN_FILE"] == objects.CONTROL_TOKEN_FILE
    health_service = find(health.render(values(FULL)), "Service", health.NAME)
    assert health_service["spec"]["clusterIP"] == "None"
    assert health_service["spec"]["ports"][0]["port"] == health.PORT == 8094
    off = env_of({**FULL, "health": {"enabled": False}})
    assert "SHOAL_ENGINES_GPU_HEALTH" not in off
    assert "SHOAL_ENGINES_GPU_HEALTH_TOKEN_FILE" not in off
    with pytest.raises(ValuesError, match="gpu_health_token_file: the watchers' token"):
        fleet.render(
            values(
                {**FULL, "fleet": {**FULL["fleet"], "settings": {"gpu_health_token_file": "/t"}}}
            )
        )


def test_fleet_engine_command_without_a_port_is_refused() -> None:
    doc = {"fleet": {**FULL["fleet"], "settings": {"engine_command": "vllm serve x"}}}
    with pytest.raises(ValuesError, match="port"):
        fleet.render(values(doc))


# --- disruption budgets and network policies ----------------------------------------------


def test_budgets_let_one_router_and_one_engine_go_at_a_time_and_skip_daemonsets() -> None:
    pdbs = [o for o in policies.render(values()) if o["kind"] == "PodDisruptionBudget"]
    by_component = {p["spec"]["selector"]["matchLabels"][objects.LABEL_COMPONENT]: p for p in pdbs}
    assert set(by_component) == {"router", "engine"}
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1
        assert "minAvailable" not in pdb["spec"]
    assert by_component["engine"]["metadata"]["name"] == "vllm"


def test_the_engine_budget_covers_this_deployments_pods_only() -> None:
    v = values({"engine": {"name": "llama"}})
    pdb = find(policies.render(v), "PodDisruptionBudget", "llama")
    assert pdb["spec"]["selector"]["matchLabels"] == engine.engine_selector(v)
    assert pdb["spec"]["selector"]["matchLabels"][engine.INSTANCE_LABEL] == "llama"


def peers_of(rule: dict[str, Any]) -> set[str]:
    """``*`` for anyone, a component for its pods, ``ns:NAME`` for a namespace."""
    if "from" not in rule:
        return {"*"}
    out = set()
    for peer in rule["from"]:
        if "podSelector" in peer:
            out.add(peer["podSelector"]["matchLabels"][objects.LABEL_COMPONENT])
        else:
            out.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    return out


def ingress(objs: list[dict[str, Any]]) -> dict[str, dict[str | int, set[str]]]:
    """component -> port name (or number) -> who may connect."""
    table: dict[str, dict[str | int, set[str]]] = {}
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        component = spec["podSelector"]["matchLabels"][objects.LABEL_COMPONENT]
        assert spec["podSelector"]["matchLabels"] == objects.selector(component)
        ports = table.setdefault(component, {})
        for rule in spec["ingress"]:
            assert rule.get("from", None) != [], "an empty from admits everyone"
            for port in rule["ports"]:
                ports.setdefault(port["port"], set()).update(peers_of(rule))
    return table


def test_network_policies_keep_cluster_engine_and_control_ports_internal() -> None:
    mon = "ns:monitoring"
    assert ingress(policies.render(values())) == {
        "cache": {"cluster": {"cache"}, "stream": {"cache"}, "metrics": {mon}},
        "engine": {"http": {"router", "autoscaler", mon}},  # no loader uri: no sidecar
        "redis": {"redis": {"router"}},
        "autoscaler": {"http": {"router", mon}},
        "health": {"http": {"router", mon}},
        "router": {"http": {"*"}, "admin": {"autoscaler", mon}},  # admin: /metrics, /router/*
    }


def test_network_policies_with_the_precise_router_and_the_fleet() -> None:
    table = ingress(policies.render(values({**FULL, "monitoring": {"namespace": "obs"}})))
    mon = "ns:obs"
    assert table["cache"] == {
        "cluster": {"cache", "router"}, "stream": {"cache", "router"}, "metrics": {mon},
    }  # fmt: skip
    assert table["router"] == {"http": {"*"}, "admin": {"autoscaler", mon},
                               "cluster": {"cache", "router"},
                               "stream": {"cache", "router"}}  # fmt: skip
    assert table["engine"] == {"http": {"router", "autoscaler", "fleet", mon}, 9501: {mon}}
    assert table["health"] == {"http": {"router", "fleet", mon}}
    assert table["fleet"] == {"http": {"autoscaler", "router", mon}}  # router: /v1/discovery


def test_the_loader_metrics_port_is_admitted_by_number() -> None:
    # a named port of an init container (the native sidecar) is not resolved by every CNI
    loader = {"uri": "s3://models/qwen3/", "settings": {"metrics_port": 9611}}
    objs = policies.render(values({"engine": {"loader": loader}}))
    assert set(ingress(objs)["engine"]) == {"http", 9611}
    objs = policies.render(values({"engine": {"loader": {**loader, "enabled": False}}}))
    assert set(ingress(objs)["engine"]) == {"http"}


def test_redis_without_a_router_admits_no_one() -> None:
    objs = policies.render(values({"router": {"enabled": False}}))
    redis = find(objs, "NetworkPolicy", "shoal-redis")
    assert redis["spec"]["ingress"] == []
    assert "router" not in ingress(objs)
    assert "shoal-router" not in {o["metadata"]["name"] for o in objs}


# --- monitoring -------------------------------------------------------------------------------


def service_ports(objs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """component -> the port names of its Services."""
    out: dict[str, set[str]] = {}
    for service in (o for o in objs if o["kind"] == "Service"):
        component = service["metadata"]["labels"][objects.LABEL_COMPONENT]
        out.setdefault(component, set()).update(p["name"] for p in service["spec"]["ports"])
    return out


def test_service_monitors_select_a_service_port_that_exists() -> None:
    objs = rendered(values(FULL))
    ports = service_ports(objs)
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {
        "shoal-router", "shoal-autoscaler", "shoal-health", "shoal-engines-fleet",
    }  # fmt: skip
    checked = set()
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        component = selector[objects.LABEL_COMPONENT]
        assert selector.items() >= objects.selector(component).items()
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["shoal"]}
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            if component in ports:  # the router's Service is another module's
                assert endpoint["port"] in ports[component]
                checked.add(component)
    assert checked == {"autoscaler", "health", "fleet"}


def test_pod_monitors_scrape_the_cache_and_the_engines() -> None:
    objs = monitoring.render(values({"engine": {"loader": {"uri": "s3://models/qwen3/"}}}))
    monitors = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodMonitor"}
    assert set(monitors) == {"shoal-cache", "shoal-engine"}
    cache = monitors["shoal-cache"]["spec"]
    assert cache["selector"]["matchLabels"] == objects.selector("cache")
    assert [e["port"] for e in cache["podMetricsEndpoints"]] == ["metrics"]
    engine = monitors["shoal-engine"]["spec"]
    assert engine["selector"]["matchLabels"] == objects.selector("engine")
    assert [(e["port"], e["path"]) for e in engine["podMetricsEndpoints"]] == [
        ("http", "/metrics"), ("metrics", "/metrics"),
    ]  # fmt: skip
    no_loader = monitoring.render(values({"engine": {"loader": {"enabled": False}}}))
    engine = next(o for o in no_loader if o["metadata"]["name"] == "shoal-engine")
    assert [e["port"] for e in engine["spec"]["podMetricsEndpoints"]] == ["http"]


def test_every_monitor_sets_the_job_the_alerts_name() -> None:
    objs = monitoring.render(values(FULL))
    jobs = set()
    for monitor in (o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor")):
        spec = monitor["spec"]
        for endpoint in spec.get("endpoints", []) + spec.get("podMetricsEndpoints", []):
            relabel = endpoint["relabelings"][0]
            assert relabel["targetLabel"] == "job"
            jobs.add(relabel["replacement"])
    assert jobs == set(monitoring.JOBS.values())
    for alert in monitoring.ALERTS:
        for job in re.findall(r'job="([^"]+)"', alert.expr):
            assert job in jobs, f"{alert.name} names job {job}, which no monitor sets"


def test_pod_monitors_label_every_target_with_its_node() -> None:
    objs = monitoring.render(values(FULL))
    for monitor in (o for o in objs if o["kind"] == "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_node_name"],
                    "targetLabel": "node"} in endpoint["relabelings"]  # fmt: skip


def test_the_feed_alert_compares_engines_and_feeds_per_node() -> None:
    # not `connected == 0`: a slot no engine claims (8 by default) would fire for ever
    (feed,) = [a for a in monitoring.ALERTS if a.name == "ShoalCacheEngineFeedDown"]
    assert "== 0" not in feed.expr
    assert re.fullmatch(
        r'count by \(node\) \(up\{job="shoal-engine"\} == 1\) > '
        r'sum by \(node\) \(shoal_kvcache_engine_connected\{job="shoal-cache"\}\)',
        feed.expr,
    )


def test_daemonsets_without_available_pods_alert_through_kube_state_metrics() -> None:
    def rules(v: Values) -> dict[str, str]:
        objs = monitoring.render(v)
        (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
        return {r["alert"]: r["expr"] for r in rule["spec"]["groups"][0]["rules"]}

    every = rules(values({"namespace": "prod"}))
    for alert, daemonset in (("ShoalCacheDaemonSetUnavailable", "shoal-cache"),
                             ("ShoalHealthDaemonSetUnavailable", "shoal-health")):  # fmt: skip
        assert every[alert] == (
            'kube_daemonset_status_number_unavailable{namespace="prod",'
            f'daemonset="{daemonset}"}} > 0'
        )
    assert "kube-state-metrics" in (monitoring.__doc__ or "")
    without = rules(values({"health": {"enabled": False}}))
    assert "ShoalHealthDaemonSetUnavailable" not in without
    assert "ShoalCacheDaemonSetUnavailable" in without


def code_text() -> str:
    """Every .py file of the daemons (not deploy/, whose ALERTS would match itself)."""
    parts = []
    for top in ("kvcache", "loader", "router", "control", "shoal"):
        parts.extend(p.read_text() for p in sorted((REPO / top).rglob("*.py")))
    return "\n".join(parts)


SUFFIX = r"(_total|_bucket|_sum|_count|_created)"


def in_code(metric: str, text: str) -> bool:
    base = re.sub(SUFFIX + "$", "", metric)
    return re.search(rf"\b{base}{SUFFIX}?\b", text) is not None


def test_every_metric_an_alert_reads_exists_in_the_code() -> None:
    from deploy.metrics_catalogue import catalogue

    exported = {metric.name for metric in catalogue()}  # built from the code's registries
    assert len(monitoring.ALERTS) >= 8
    assert len({a.name for a in monitoring.ALERTS}) == len(monitoring.ALERTS)
    for alert in monitoring.ALERTS:
        in_expr = set(re.findall(r"\bshoal_[a-z0-9_]+", alert.expr))
        assert in_expr == set(alert.metrics_used), f"{alert.name}: metrics_used is not exact"
        for metric in alert.metrics_used:
            assert metric in exported, f"{alert.name}: {metric} is not a metric Shoal exports"


def test_the_metric_grep_finds_no_made_up_name() -> None:
    text = code_text()
    assert in_code("shoal_kvcache_checksum_failures_total", text)
    assert not in_code("shoal_kvcache_checksum_failure_total", text)
    assert not in_code("shoal_kvcache_made_up_total", text)


def test_the_cluster_counters_the_alerts_read_are_registered_under_those_names() -> None:
    # their names are composed (f"shoal_kvcache_cluster_{name}"): only the docstring spells
    # them out, so check the registry too
    from prometheus_client import CollectorRegistry

    from kvcache.cluster.metrics import ClusterMetrics

    registry = CollectorRegistry()
    metrics = ClusterMetrics(registry)
    metrics.dropped.labels("impersonation").inc()
    samples = {s.name for family in registry.collect() for s in family.samples}
    for alert in monitoring.ALERTS:
        for metric in alert.metrics_used:
            if metric.startswith("shoal_kvcache_cluster_"):
                assert metric in samples, f"{alert.name}: {metric} is not registered"


def test_alerts_render_with_severity_summary_and_runbook() -> None:
    (rule,) = [o for o in monitoring.render(values(FULL)) if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    assert list(alerts) == [a.name for a in monitoring.ALERTS]
    for alert in monitoring.ALERTS:
        rendered_rule = alerts[alert.name]
        assert rendered_rule["labels"] == {"severity": alert.severity}
        assert alert.severity in ("critical", "warning")
        assert rendered_rule["annotations"]["summary"] == alert.summary
        assert rendered_rule["annotations"]["description"]
        assert rendered_rule["annotations"]["runbook_url"] == (
            f"docs/operations.md#{alert.name.lower()}"
        )
        assert "$" not in rendered_rule["expr"].replace("$labels", "")
    assert alerts["ShoalAutoscalerAtMaxReplicas"]["expr"].endswith(">= 16")
    assert "for" not in alerts["ShoalCacheChecksumFailures"]
    assert alerts["ShoalCacheDaemonDown"]["for"] == "5m"


def test_alerts_follow_the_components_that_are_rendered() -> None:
    v = values({
        "cache": {"cluster": {"enabled": False}},
        "autoscaler": {"enabled": False},
        "engine": {"loader": {"enabled": False}},
    })  # fmt: skip
    (rule,) = [o for o in monitoring.render(v) if o["kind"] == "PrometheusRule"]
    names = {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}
    assert "ShoalCacheDaemonDown" in names
    assert not {a for a in names if a.startswith(("ShoalCacheCluster", "ShoalAutoscaler"))}
    assert "ShoalLoaderStagingFailures" not in names
