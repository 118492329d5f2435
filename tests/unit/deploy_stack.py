"""The hand-built stack the deploy checks are specified against (test_deploy_checks.py,
test_deploy_contracts.py): a cache DaemonSet, an engine Deployment with the loader as a
native sidecar, the router and its Service, the autoscaler with its RBAC; built here, not by
the component renderers, so the checks are specified independently of them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from deploy.checks import Problem
from deploy.objects import container_security, labels, pod_security, selector
from deploy.values import Values, parse_values

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
