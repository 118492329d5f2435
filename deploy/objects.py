"""Builders for the Kubernetes objects every component renders, so they agree by construction.

Objects are plain dicts (what ``yaml.safe_dump`` and the schema validator take). Every
object gets the same label scheme (``app.kubernetes.io/name: shoal``, ``.../component``,
``.../part-of``, ``.../managed-by: shoal-deploy``) and every Shoal container the same
restricted security context (non-root, the values' UID/GID, no privilege escalation, all
capabilities dropped, read-only root filesystem, RuntimeDefault seccomp): the Pod Security
Standard "restricted" profile, where the component allows it.

``settings_env`` turns a component's ``settings`` table into ``SHOAL_<SECTION>_<KEY>``
variables *after* building the component's own settings dataclass from them
(``shoal.config.load_config``), so a typo'd key or a bad value fails the render with the
daemon's own message instead of crash-looping a pod.

``service_account`` / ``role`` / ``role_binding`` give an account, its role and their binding
one name, and ``shoal_container`` the image, command, security context and memory request =
limit every Shoal container shares (contract (f) then holds by construction);
``root_init_container`` is the one exception to the restricted profile (root with named
capabilities, to hand a hostPath directory to the values' UID). ``service``, ``pod_spec``,
``deployment`` and ``daemon_set`` give every Service and workload the same selector and
labels, and every pod no service links and the values' security context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deploy.errors import ValuesError
from deploy.sizes import quantity
from deploy.values import Values
from shoal.config import load_config
from shoal.errors import ConfigError

__all__ = [
    "CONTROL_TOKEN_DIR",
    "CONTROL_TOKEN_FILE",
    "CONTROL_TOKEN_SECRET",
    "LABEL_COMPONENT",
    "Obj",
    "container_security",
    "control_token_mount",
    "control_token_volume",
    "daemon_set",
    "deployment",
    "env",
    "http_probe",
    "labels",
    "merge_settings",
    "metadata",
    "own_dir_script",
    "pod_security",
    "pod_spec",
    "role",
    "role_binding",
    "root_init_container",
    "selector",
    "service",
    "service_account",
    "settings_env",
    "shoal_container",
]

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

Obj = dict[str, Any]  # a Kubernetes object, or a part of one, as plain data

# The bearer token of the control daemons (autoscaler, health watcher, fleet) and the router's
# admin port, and of their clients (the router among them): one Secret, mounted read-only at
# one path in every pod that serves or calls them.
CONTROL_TOKEN_SECRET = "shoal-control-token"
CONTROL_TOKEN_DIR = "/etc/shoal/control-token"
CONTROL_TOKEN_FILE = f"{CONTROL_TOKEN_DIR}/token"
_CONTROL_TOKEN_VOLUME = "control-token"


def selector(component: str) -> dict[str, str]:
    """The labels a Service, a monitor or a policy selects ``component``'s pods by."""
    return {LABEL_NAME: "shoal", LABEL_COMPONENT: component}


def labels(component: str) -> dict[str, str]:
    return {**selector(component), LABEL_PART_OF: "shoal", LABEL_MANAGED_BY: "shoal-deploy"}


def metadata(values: Values, name: str, component: str, *, namespaced: bool = True,
             extra_labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None) -> Obj:  # fmt: skip
    meta: Obj = {"name": name, "labels": {**labels(component), **(extra_labels or {})}}
    if namespaced:
        meta["namespace"] = values.namespace
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def env(name: str, value: Any) -> Obj:
    return {"name": name, "value": str(value).lower() if isinstance(value, bool) else str(value)}


def settings_env(cls: type, section: str, settings: Mapping[str, Any], *,
                 where: str) -> list[Obj]:  # fmt: skip
    """``SHOAL_<SECTION>_<KEY>`` variables for ``settings``, checked by ``cls`` first.

    ``where`` names the values path for the error message (``cache.settings``). A setting
    is a scalar or a flat list (given comma-joined); null, a mapping or a nested list has
    no environment form and is refused rather than rendered as ``"None"`` or a dict repr.
    """
    environ = {
        f"SHOAL_{section.upper()}_{key.upper()}": _text(v, f"{where}.{key}")
        for key, v in settings.items()
    }
    try:
        load_config(cls, section, flags={}, environ=environ, config_path="")
    except ConfigError as exc:
        raise ValuesError(f"{where}: {exc}") from None
    known = {name.upper() for name in getattr(cls, "__dataclass_fields__", {})}
    unknown = sorted(key for key in settings if key.upper() not in known)
    if unknown:
        raise ValuesError(f"{where}: unknown setting(s) {unknown}; valid: {sorted(known)}")
    return [env(name, text) for name, text in sorted(environ.items())]


def merge_settings(derived: Mapping[str, Any], user: Mapping[str, Any], *,
                   fixed: Mapping[str, str], where: str) -> dict[str, Any]:  # fmt: skip
    """``derived`` updated by the user's ``settings`` table, except the ``fixed`` keys.

    ``fixed`` maps each key the deployment owns (addresses, ports, token files: what other
    objects are built around) to why; setting one is a ``ValuesError`` naming the reason,
    never a silent override either way. The user wins on every other derived key.
    """
    clashes = sorted(set(user) & set(fixed))
    if clashes:
        why = "; ".join(f"{key}: {fixed[key]}" for key in clashes)
        raise ValuesError(f"{where}: set by the deployment, remove them ({why})")
    return {**derived, **user}


def _text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list | tuple):
        for item in value:
            if item is None or isinstance(item, Mapping | list | tuple):
                what = "null" if item is None else "a nested list or mapping"
                raise ValuesError(f"{where}: a list setting holds scalars only, got {what}")
        return ",".join(_text(item, where) for item in value)
    if value is None:
        raise ValuesError(f"{where}: no value (null); give one, or delete the key for the default")
    raise ValuesError(f"{where}: expected a string, number, boolean or list, got a mapping")


# Every pod sets ``enableServiceLinks: false``: the kubelet would otherwise put
# ``<SERVICE>_PORT=tcp://IP:PORT`` for every Service of the namespace into each container,
# and a Service named ``vllm`` yields ``VLLM_PORT``, which vLLM refuses at start ("appears to
# be a URI"); Shoal's own ``SHOAL_*`` settings could be shadowed the same way.


def pod_security(values: Values) -> Obj:
    """The pod-level security context of every Shoal pod (and the engines)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": values.run_as_user,
        "runAsGroup": values.run_as_group,
        "fsGroup": values.run_as_group,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security(*, read_only_root: bool = True) -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": read_only_root,
        "capabilities": {"drop": ["ALL"]},
    }


def http_probe(path: str, port: int | str, *, period_s: int = 10, failures: int = 3,
               initial_delay_s: int = 0) -> Obj:  # fmt: skip
    probe: Obj = {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "failureThreshold": failures,
        "timeoutSeconds": 2,
    }
    if initial_delay_s:
        probe["initialDelaySeconds"] = initial_delay_s
    return probe


def control_token_volume() -> Obj:
    """The pod volume of Secret ``shoal-control-token`` (key ``token``, mode 0440 for fsGroup)."""
    return {
        "name": _CONTROL_TOKEN_VOLUME,
        "secret": {
            "secretName": CONTROL_TOKEN_SECRET,
            "items": [{"key": "token", "path": "token"}],
            "defaultMode": 0o440,
        },
    }


def control_token_mount() -> Obj:
    """Its container mount: the token at ``CONTROL_TOKEN_FILE``."""
    return {"name": _CONTROL_TOKEN_VOLUME, "mountPath": CONTROL_TOKEN_DIR, "readOnly": True}


# --- the boilerplate every component repeats: accounts, RBAC, the Shoal container ---------

_RBAC = "rbac.authorization.k8s.io/v1"


def service_account(values: Values, name: str, component: str, *, automount: bool) -> Obj:
    """The ServiceAccount ``name``; ``automount`` only for a component calling the API."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(values, name, component),
        "automountServiceAccountToken": automount,
    }


def role(values: Values, name: str, component: str, rules: Sequence[Obj], *,
         cluster: bool = False) -> Obj:  # fmt: skip
    """Role ``name`` in the namespace (ClusterRole with ``cluster``) granting ``rules``."""
    return {
        "apiVersion": _RBAC,
        "kind": "ClusterRole" if cluster else "Role",
        "metadata": metadata(values, name, component, namespaced=not cluster),
        "rules": [dict(rule) for rule in rules],
    }


def role_binding(values: Values, name: str, component: str, *, cluster: bool = False) -> Obj:
    """Binds (Cluster)Role ``name`` to ServiceAccount ``name`` of the namespace: one name for
    the account, its role and the binding, so none can point at another's."""
    kind = "ClusterRole" if cluster else "Role"
    return {
        "apiVersion": _RBAC,
        "kind": f"{kind}Binding",
        "metadata": metadata(values, name, component, namespaced=not cluster),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": values.namespace}],
    }


def shoal_container(values: Values, name: str, command: Sequence[str], *,
                    env: Sequence[Obj] = (), memory_bytes: int, cpu: str,
                    ports: Sequence[tuple[str, int]] = (), mounts: Sequence[Obj] = (),
                    startup: Obj | None = None, liveness: Obj | None = None,
                    readiness: Obj | None = None, read_only_root: bool = True,
                    protocol: bool = True) -> Obj:  # fmt: skip
    """A container running ``command`` from the Shoal image, with the restricted security
    context, named TCP ``ports`` (name, number), and memory requested = limited to
    ``memory_bytes`` (one number for both, so they cannot differ; CPU is requested only:
    a CPU limit throttles the event loops without protecting anything).

    Keys come in one order (name, image, command, env, ports, mounts, resources, probes,
    security context), the rendered YAML's; a component adds its extras (``lifecycle``,
    ``restartPolicy``, ``envFrom``) after them. ``protocol`` writes the ports' ``TCP``
    explicitly (the default either way)."""
    memory = quantity(memory_bytes)
    container: Obj = {
        "name": name,
        "image": values.image_ref,
        "imagePullPolicy": values.image.pull_policy,
        "command": list(command),
    }
    if env:
        container["env"] = [dict(item) for item in env]
    if ports:
        container["ports"] = [
            {"name": port_name, "containerPort": number} | ({"protocol": "TCP"} if protocol else {})
            for port_name, number in ports
        ]
    if mounts:
        container["volumeMounts"] = [dict(mount) for mount in mounts]
    container["resources"] = {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"memory": memory},
    }
    for key, probe in (("startupProbe", startup), ("livenessProbe", liveness),
                       ("readinessProbe", readiness)):  # fmt: skip
        if probe is not None:
            container[key] = probe
    container["securityContext"] = container_security(read_only_root=read_only_root)
    return container


def own_dir_script(values: Values, path: str) -> str:
    """The shell step making host directory ``path`` 0700 and the values' UID/GID's."""
    uid, gid = values.run_as_user, values.run_as_group
    return f"mkdir -p {path} && chown {uid}:{gid} {path} && chmod 0700 {path}"


def root_init_container(values: Values, name: str, script: str, *, mounts: Sequence[Obj],
                        memory_bytes: int, capabilities: Sequence[str]) -> Obj:  # fmt: skip
    """An init container running ``sh -c script`` as root with only ``capabilities`` added:
    the kubelet makes a hostPath directory root-owned and fsGroup does not apply to it, so
    someone must hand it to the values' UID before the non-root containers start."""
    container = shoal_container(
        values, name, ["sh", "-c", script], memory_bytes=memory_bytes, cpu="10m", mounts=mounts
    )
    container["securityContext"] = {
        "runAsNonRoot": False,
        "runAsUser": 0,
        **container["securityContext"],
        "capabilities": {"drop": ["ALL"], "add": list(capabilities)},
    }
    return container


# --- Services and workloads -----------------------------------------------------------------


def service(values: Values, name: str, component: str, ports: Sequence[tuple[str, int]], *,
            headless: bool = False, publish_not_ready: bool = False, service_type: str = "",
            selects: Mapping[str, str] | None = None,
            extra_labels: Mapping[str, str] | None = None,
            protocol: bool = True) -> Obj:  # fmt: skip
    """Service ``name`` in front of ``component``'s pods (or the pods ``selects`` names),
    each port (name, number) targeting the container port of the same name, so a renumbered
    container port cannot leave the Service behind. ``protocol`` writes ``TCP`` explicitly
    (the default either way)."""
    spec: Obj = {}
    if service_type:
        spec["type"] = service_type
    if headless:
        spec["clusterIP"] = "None"
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    spec["selector"] = dict(selects if selects is not None else selector(component))
    spec["ports"] = [
        {"name": port_name, "port": number, "targetPort": port_name}
        | ({"protocol": "TCP"} if protocol else {})
        for port_name, number in ports
    ]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(values, name, component, extra_labels=extra_labels),
        "spec": spec,
    }


def pod_spec(values: Values, account: str, *, automount: bool, host_pid: bool | None = None,
             security: Obj | None = None, grace_s: int | None = None) -> Obj:  # fmt: skip
    """The head of a pod spec: its ServiceAccount (token mounted only with ``automount``),
    no service links (see above), the pod security context; the caller adds the containers
    and volumes after it."""
    spec: Obj = {
        "serviceAccountName": account,
        "enableServiceLinks": False,
        "automountServiceAccountToken": automount,
    }
    if host_pid is not None:
        spec["hostPID"] = host_pid
    spec["securityContext"] = pod_security(values) if security is None else security
    if grace_s is not None:
        spec["terminationGracePeriodSeconds"] = grace_s
    return spec


def deployment(values: Values, name: str, component: str, pod: Obj, *, replicas: int = 1,
               recreate: bool = False) -> Obj:  # fmt: skip
    """Deployment ``name`` of ``replicas`` pods ``pod``, selected by ``selector(component)``;
    ``recreate`` for a singleton that must never overlap its successor (a rolling update
    runs old and new side by side until the new one is ready)."""
    spec: Obj = {"replicas": replicas}
    if recreate:
        spec["strategy"] = {"type": "Recreate"}
    spec["selector"] = {"matchLabels": selector(component)}
    spec["template"] = {"metadata": {"labels": labels(component)}, "spec": pod}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(values, name, component),
        "spec": spec,
    }


def daemon_set(values: Values, name: str, component: str, pod: Obj) -> Obj:
    """DaemonSet ``name`` of pods ``pod``, updated one node at a time."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(values, name, component),
        "spec": {
            "selector": {"matchLabels": selector(component)},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {"metadata": {"labels": labels(component)}, "spec": pod},
        },
    }
