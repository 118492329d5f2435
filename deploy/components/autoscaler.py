"""The autoscaler: one controller scaling the engine Deployment through its scale subresource.

::

    ServiceAccount shoal-autoscaler   token mounted: the controller calls the API server
    Role           shoal-autoscaler   ``rules()`` here, exactly the calls of
                                      control/autoscale/actuators/kubernetes.py for the
                                      target's kind: get the workload and its /scale,
                                      patch /scale (by name), list pods (namespace-wide:
                                      the ready engines' IPs), in values.namespace only
    RoleBinding    shoal-autoscaler
    Service        shoal-autoscaler   http 8090: the router's wakes, Prometheus
    Deployment     shoal-autoscaler   1 replica, strategy Recreate

Invariant: at most one controller acts on the target at any moment. Two would each read
the scale, decide and patch it, and fight (one's scale-down undoing the other's
scale-up); so one replica, and ``Recreate`` rather than a rolling update, which would run
the old and the new pod side by side for as long as the new one takes to become ready.
A controller's state (its policy windows) is rebuilt from scrapes within a window, so a
restart costs a few rounds, not a wrong decision. Rejected: leader election (a Lease
object, more RBAC and code for a controller whose gap on restart is seconds).

Settings (``[autoscale]``): the deployment fixes what other objects are built around
(``FIXED``: the namespace the Role is in, the listening address and port the Service and
probes use, the token file the Secret is mounted at); the user's ``settings`` win over
the other derived ones: ``target`` (``deployment/ENGINE_NAME``; a ``statefulset/NAME`` is
covered by the Role too), ``model``, ``engine_port``, ``router_url``, ``log_format``.

The controller has no ``/healthz``: its probes GET ``/metrics``, which its endpoint
serves without a token (control/http.py ``OPEN_PATHS``) from the same event loop as the
control rounds, so an answer shows the loop is alive.
"""

from __future__ import annotations

from typing import Any

from control.autoscale.config import AutoscaleSettings
from deploy import objects
from deploy.errors import ValuesError
from deploy.values import Values

__all__ = ["FIXED", "NAME", "PORT", "render", "rules"]

NAME = "shoal-autoscaler"
COMPONENT = "autoscaler"
PORT = 8090

# The calls KubernetesActuator makes (state() and scale()) for a KIND/NAME target, as RBAC
# rules; only the target's kind is granted (deploy.checks.rbac flags the other as unused):
#   read_namespaced_{deployment,stateful_set}_scale   get   {deployments,statefulsets}/scale
#   read_namespaced_{deployment,stateful_set}         get   deployments, statefulsets
#   list_namespaced_pod                               list  pods
#   patch_namespaced_{deployment,stateful_set}_scale  patch {deployments,statefulsets}/scale
_RESOURCES = {"deployment": "deployments", "statefulset": "statefulsets"}


def rules(target: str) -> list[dict[str, Any]]:
    """The Role's rules for ``target`` (``deployment/NAME`` or ``statefulset/NAME``)."""
    kind, _, name = target.partition("/")
    if kind not in _RESOURCES or not name:
        raise ValuesError(
            f"autoscaler.settings.target {target!r}: on Kubernetes give deployment/NAME or "
            "statefulset/NAME (the workload the Role lets it scale)"
        )
    resource = _RESOURCES[kind]
    return [
        {"apiGroups": ["apps"], "resources": [resource], "resourceNames": [name],
         "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": [f"{resource}/scale"], "resourceNames": [name],
         "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]  # fmt: skip


FIXED = {
    "namespace": "the Role is in values.namespace",
    "host": "the Service reaches the pod's address",
    "port": f"the Service and probes use {PORT}",
    "target_token_file": f"with the fleet, Secret {objects.CONTROL_TOKEN_SECRET} is mounted there",
    "auth_token_file": f"Secret {objects.CONTROL_TOKEN_SECRET} is mounted there",
    "insecure_no_auth": "the endpoint always has a token",
}


def router_url(values: Values) -> str:
    """The router's in-cluster URL (its Service), or ``""`` when no router is rendered."""
    if not values.router.enabled:
        return ""
    from deploy.components.router import admin_url

    return admin_url(values)


def target(values: Values) -> str:
    """The engine Deployment, or with the Ray fleet its daemon (``ray:URL``)."""
    if values.fleet.enabled:
        from deploy.components import fleet

        return f"ray:http://{fleet.NAME}.{values.namespace}.svc:{fleet.PORT}"
    return f"deployment/{values.engine.name}"


def settings(values: Values) -> dict[str, Any]:
    derived: dict[str, Any] = {
        "target": target(values),
        "namespace": values.namespace,
        "model": values.engine.model,
        "engine_port": values.engine.port,
        "host": "0.0.0.0",
        "port": PORT,
        "auth_token_file": objects.CONTROL_TOKEN_FILE,
        "log_format": "json",
    }
    if values.router.enabled:
        derived["router_url"] = router_url(values)
    if values.fleet.enabled:
        derived["target_token_file"] = objects.CONTROL_TOKEN_FILE
    return objects.merge_settings(
        derived, values.autoscaler.settings, fixed=FIXED, where="autoscaler.settings"
    )


def render(values: Values) -> list[dict[str, Any]]:
    if not values.autoscaler.enabled:
        return []
    env = objects.settings_env(
        AutoscaleSettings, "autoscale", settings(values), where="autoscaler.settings"
    )
    chosen = str(settings(values)["target"])
    # A ray:URL target scales through the fleet daemon's API: no Kubernetes calls, no RBAC.
    on_kubernetes = not chosen.startswith("ray:")
    account = objects.service_account(values, NAME, COMPONENT, automount=on_kubernetes)
    role = objects.role(values, NAME, COMPONENT, rules(chosen) if on_kubernetes else [])
    binding = objects.role_binding(values, NAME, COMPONENT)
    service = objects.service(values, NAME, COMPONENT, [("http", PORT)])
    container = objects.shoal_container(
        values, "autoscaler", ["shoal", "autoscale", "run"], env=env,
        memory_bytes=values.autoscaler.memory_bytes, cpu=values.autoscaler.cpu,
        ports=[("http", PORT)], mounts=[objects.control_token_mount()],
        liveness=objects.http_probe("/metrics", "http", period_s=10, failures=6),
        readiness=objects.http_probe("/metrics", "http", period_s=5),
    )  # fmt: skip
    pod = objects.pod_spec(values, NAME, automount=on_kubernetes, grace_s=30)
    pod.update(containers=[container], volumes=[objects.control_token_volume()])
    deployment = objects.deployment(values, NAME, COMPONENT, pod, recreate=True)
    return [account, *([role, binding] if on_kubernetes else []), service, deployment]
