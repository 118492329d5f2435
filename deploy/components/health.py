"""The GPU health watcher: one ``shoal health watch`` per GPU node, reporting on its own GPUs.

::

    ServiceAccount     shoal-health   token mounted only when it cordons for real
    ClusterRole        shoal-health   patch nodes (CoreV1Api.patch_node, control/health/
                                      cordon.py), only with health.cordon and cordon_apply
    ClusterRoleBinding shoal-health
    ValidatingAdmissionPolicy(+Binding) shoal-health-cordon   what that patch may change
    Service            shoal-health   headless, http 8094: Prometheus, the router and the
                                      fleet find every watcher's pod address through it
    DaemonSet          shoal-health   on health.node_selector, tolerating health.tolerations

Invariant: the watcher sees the node's GPUs and takes none. NVML comes from the NVIDIA
container toolkit, which mounts the driver's libraries and device nodes into a container
whose environment says ``NVIDIA_VISIBLE_DEVICES=all`` and
``NVIDIA_DRIVER_CAPABILITIES=utility`` (nvidia-smi, NVML), when the pod runs under the
toolkit's runtime (``runtimeClassName: nvidia``, ``health.runtime_class``; empty where the
node's default runtime is already NVIDIA's). It never requests ``nvidia.com/gpu``: a
request would allocate a GPU to the watcher, hide the others from it, and take one from
the engines. Rejected: ``privileged`` with the host's /dev (wide open, and still no
driver libraries in the image).

Names: ``NODE_NAME`` from the downward API (``spec.nodeName``) is the node the cordoner
patches (``kube_node`` empty = ``$NODE_NAME``, control/health/config.py), and the same
value is ``SHOAL_HEALTH_NODE``, the node part of GPU names ``NODE/gpuI``: in a pod the
hostname is the pod's name, which no consumer knows. (Consumers matching by Ray node
name need that node's ``shoal.node`` label to be the Kubernetes node name.)

The XID ledger persists in ``state_file`` on a hostPath (``/var/lib/shoal/health``,
``DirectoryOrCreate``): a critical XID clears only by ``POST /v1/clear``, so a watcher
restart (an upgrade, an OOM kill) must not forget it. The kubelet creates the directory
root-owned (fsGroup does not apply to hostPath), so an init container (root, with CHOWN
only) makes it 0700 and hands it to the watcher's UID.

Cordon guard (``cordon_policy``). A DaemonSet's pods share one ServiceAccount, so RBAC
cannot say "your own node" (no ``resourceNames``), and ``patch`` on nodes allows any field
of any node. A ValidatingAdmissionPolicy (admissionregistration.k8s.io/v1, GA in 1.30),
bound with ``validationActions: [Deny]``, narrows what the watcher's ServiceAccount may do
to what ``control/health/cordon.py`` sends: an UPDATE (a PATCH reaches admission as one) of
the node named by its token's node claim (``request.userInfo.extra
["authentication.kubernetes.io/node-name"]``, which bound pod tokens carry since
``ServiceAccountTokenPodNodeInfo``, GA in 1.32), that leaves ``spec.unschedulable`` true,
with labels, annotations, finalizers, owner references, taints and the rest of the spec
as they were. Uncordoning is refused too: the watcher never uncordons (an operator's
call). A token without the node claim (an older cluster, a long-lived Secret token) is
refused, so the policy fails closed. Only standard CEL is used (``has()``, ``in``, ``==``;
no optionals), so the tests evaluate every expression with cel-python.

Settings (``[health]``): ``FIXED`` keys are the deployment's (addresses, token, node
names, the state file, cordon and cordon_apply, which come from ``health.cordon`` and
``health.cordon_apply`` because the RBAC follows them); the rest are the user's.
"""

from __future__ import annotations

from typing import Any

from control.health.config import HealthSettings
from deploy import objects
from deploy.errors import ValuesError
from deploy.values import Values

__all__ = [
    "CORDON_POLICY",
    "FIXED",
    "NAME",
    "NODE_NAME_KEY",
    "PORT",
    "STATE_DIR",
    "cordon_policy",
    "render",
    "watchers_url",
]

NAME = "shoal-health"
COMPONENT = "health"
PORT = 8094
STATE_DIR = "/var/lib/shoal/health"
STATE_FILE = f"{STATE_DIR}/xids.json"
CORDON_POLICY = "shoal-health-cordon"
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"  # serviceaccount.NodeNameKey
# every NodeSpec field but unschedulable (core/v1 as of 1.37; a field an older API server
# lacks is only a type-checking warning there, and has() is false), and the metadata a
# patch could abuse; tests/unit/test_deploy_control.py checks the list against the schema
_KEPT_SPEC = ("taints", "podCIDR", "podCIDRs", "providerID", "configSource", "externalID",
              "podPreemptionPolicy")  # fmt: skip
_KEPT_METADATA = ("labels", "annotations", "finalizers", "ownerReferences")

FIXED = {
    "host": "the headless Service reaches the pod's address",
    "port": f"the Service and probes use {PORT}",
    "auth_token_file": f"Secret {objects.CONTROL_TOKEN_SECRET} is mounted there",
    "insecure_no_auth": "the endpoint always has a token",
    "node": "each pod's own node (NODE_NAME, the downward API)",
    "kube_node": "each pod's own node (NODE_NAME, the downward API)",
    "state_file": f"on the hostPath {STATE_DIR}",
    "cordon": "health.cordon (the RBAC follows it)",
    "cordon_apply": "health.cordon_apply (the RBAC follows it)",
}


def patches_nodes(values: Values) -> bool:
    """Whether the watcher calls the API server: only a cordon that is applied (the dry run
    logs and counts, and never builds a client)."""
    return values.health.cordon and values.health.cordon_apply


def watchers_url(values: Values) -> str:
    """Every watcher through the headless Service (``dns+http``: each address the name
    resolves to). No cluster domain: the pod's DNS search path completes ``NAME.NS.svc``,
    so a cluster whose domain is not ``cluster.local`` works too."""
    return f"dns+http://{NAME}.{values.namespace}.svc:{PORT}"


def settings(values: Values) -> dict[str, Any]:
    health = values.health
    if health.cordon_apply and not health.cordon:
        raise ValuesError("health.cordon_apply needs health.cordon: true")
    derived: dict[str, Any] = {
        "host": "0.0.0.0",
        "port": PORT,
        "auth_token_file": objects.CONTROL_TOKEN_FILE,
        "state_file": STATE_FILE,
        "cordon": health.cordon,
        "cordon_apply": health.cordon_apply,
        "log_format": "json",
    }
    return objects.merge_settings(derived, health.settings, fixed=FIXED, where="health.settings")


def _node_env() -> list[dict[str, Any]]:
    def field(name: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}

    return [field("NODE_NAME"), field("SHOAL_HEALTH_NODE")]


def _rbac(values: Values) -> list[dict[str, Any]]:
    if not patches_nodes(values):
        return []
    rules = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    role = objects.role(values, NAME, COMPONENT, rules, cluster=True)
    binding = objects.role_binding(values, NAME, COMPONENT, cluster=True)
    return [role, binding, *cordon_policy(values)]


def _unchanged(path: str, field: str) -> str:
    """``path.field`` is in the new object exactly as in the old one (absent in both, or
    equal): standard CEL, without the optional syntax cel-python lacks."""
    new, old = f"object.{path}.{field}", f"oldObject.{path}.{field}"
    return f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))"


def cordon_policy(values: Values) -> list[dict[str, Any]]:
    """The ValidatingAdmissionPolicy and its binding (module docstring, Cordon guard)."""
    user = f"system:serviceaccount:{values.namespace}:{NAME}"
    claim = f"request.userInfo.extra[{NODE_NAME_KEY!r}]"
    validations = [
        {
            "expression": f"{NODE_NAME_KEY!r} in request.userInfo.extra && "
            f"object.metadata.name in {claim}",
            "message": "the health watcher may cordon only its own node (its token's "
            f"{NODE_NAME_KEY} claim; Kubernetes 1.32+ bound tokens)",
            "reason": "Forbidden",
        },
        {
            "expression": "has(object.spec.unschedulable) && object.spec.unschedulable",
            "message": "the health watcher may only cordon (spec.unschedulable: true), never "
            "uncordon",
            "reason": "Forbidden",
        },
        {
            "expression": " && ".join(_unchanged("metadata", f) for f in _KEPT_METADATA),
            "message": "the health watcher may not change a node's labels, annotations, "
            "finalizers or owner references",
            "reason": "Forbidden",
        },
        {
            "expression": " && ".join(_unchanged("spec", f) for f in _KEPT_SPEC),
            "message": "the health watcher may change only spec.unschedulable (taints and the "
            "rest of the spec stay)",
            "reason": "Forbidden",
        },
    ]
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": objects.metadata(values, CORDON_POLICY, COMPONENT, namespaced=False),
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"], "operations": ["UPDATE"],
                    "resources": ["nodes"],
                }],
            },
            "matchConditions": [
                {"name": "health-watcher", "expression": f"request.userInfo.username == {user!r}"}
            ],
            "validations": validations,
        },
    }  # fmt: skip
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": objects.metadata(values, CORDON_POLICY, COMPONENT, namespaced=False),
        "spec": {"policyName": CORDON_POLICY, "validationActions": ["Deny"]},
    }
    return [policy, binding]


def _daemonset(values: Values) -> dict[str, Any]:
    health = values.health
    env = [
        *_node_env(),
        objects.env("NVIDIA_VISIBLE_DEVICES", "all"),
        objects.env("NVIDIA_DRIVER_CAPABILITIES", "utility"),
        *objects.settings_env(HealthSettings, "health", settings(values), where="health.settings"),
    ]
    state = {"name": "state", "mountPath": STATE_DIR}
    # chown first, then chmod: on a restart the directory is the watcher's already, and
    # root may change another user's mode only with FOWNER.
    init = objects.root_init_container(
        values, "state-dir",
        f"chown {values.run_as_user}:{values.run_as_group} {STATE_DIR} "
        f"&& chmod 0700 {STATE_DIR}",
        mounts=[state], memory_bytes=16 << 20, capabilities=["CHOWN", "FOWNER"],
    )  # fmt: skip
    container = objects.shoal_container(
        values, "health", ["shoal", "health", "watch"], env=env,
        memory_bytes=health.memory_bytes, cpu=health.cpu, ports=[("http", PORT)],
        mounts=[objects.control_token_mount(), state],
        liveness=objects.http_probe("/healthz", "http", period_s=10, failures=6),
        readiness=objects.http_probe("/healthz", "http", period_s=5),
    )  # fmt: skip
    pod = objects.pod_spec(values, NAME, automount=patches_nodes(values), grace_s=10)
    pod["initContainers"] = [init]
    pod["containers"] = [container]
    pod["volumes"] = [
        objects.control_token_volume(),
        {"name": "state", "hostPath": {"path": STATE_DIR, "type": "DirectoryOrCreate"}},
    ]
    if health.runtime_class:
        pod["runtimeClassName"] = health.runtime_class
    if health.node_selector:
        pod["nodeSelector"] = dict(health.node_selector)
    if health.tolerations:
        pod["tolerations"] = [dict(t) for t in health.tolerations]
    return objects.daemon_set(values, NAME, COMPONENT, pod)


def render(values: Values) -> list[dict[str, Any]]:
    if not values.health.enabled:
        return []
    account = objects.service_account(values, NAME, COMPONENT, automount=patches_nodes(values))
    service = objects.service(values, NAME, COMPONENT, [("http", PORT)], headless=True)
    return [account, *_rbac(values), service, _daemonset(values)]
