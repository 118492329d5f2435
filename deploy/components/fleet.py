"""The Ray engine fleet: ``shoal engines serve`` keeping engine groups on a Ray cluster.

::

    ServiceAccount shoal-engines-fleet   no token: the fleet talks to Ray, not to Kubernetes
    Service        shoal-engines-fleet   http 8093: the autoscaler (target ray:URL), Prometheus
    Deployment     shoal-engines-fleet   1 replica, strategy Recreate

Invariant: one fleet daemon per Ray cluster. Two would each count the groups, start the
missing ones and stop the extra, doubling or fighting; so one replica and ``Recreate``,
never a rolling update's overlap (the same reason as the autoscaler's). The daemon stops
every group on SIGTERM (control/ray/server.py), so restarting the pod (an upgrade, a
values change) restarts every engine: the grace period covers ``stop_grace_s``.

The Ray cluster is not rendered here: ``fleet.ray_address`` names one (a KubeRay
``RayCluster`` head, ``ray://HEAD:10001``) and is required. The image needs Shoal's
``ray`` extra (``pip install shoal[ray]``), at the Ray version of that cluster.

Defaults derived from the values (the user's ``settings`` win): the model is
``engine.model``, the GPU type ``engine.gpu_type``, the engine command ``vllm serve`` with
the Ray executor (``DEFAULT_ENGINE_COMMAND``), and ``workers: vllm`` (the stand-ins are
for CPU tests). ``FIXED`` are the deployment's: the address and port the Service uses, the
token file, ``ray_address`` (its own values field).

Wiring: routers learn the fleet's ready groups from its ``GET /v1/discovery`` (``discovery:
http``, deploy/components/router.py), not from a ``discovery_file`` no other pod can read.
With ``health.enabled`` the fleet polls every health watcher through the DaemonSet's
headless Service, ``dns+http://shoal-health.NS.svc:8094`` (each address the
name resolves to, re-resolved each poll; each report names its node), with the control
token (``gpu_health_token_file``, then fixed); groups on a sick GPU are replaced.
"""

from __future__ import annotations

from typing import Any

from control.ray.config import EnginesSettings, check_serve
from deploy import objects
from deploy.errors import ValuesError
from deploy.values import Values
from shoal.errors import ConfigError

__all__ = ["DEFAULT_ENGINE_COMMAND", "FIXED", "NAME", "PORT", "health_url", "render"]

NAME = "shoal-engines-fleet"
COMPONENT = "fleet"
PORT = 8093

DEFAULT_ENGINE_COMMAND = (
    "vllm serve {model} --host {host} --port {port} --tensor-parallel-size {tp} "
    "--pipeline-parallel-size {pp} --distributed-executor-backend ray"
)

FIXED = {
    "host": "the Service reaches the pod's address",
    "port": f"the Service and probes use {PORT}",
    "auth_token_file": f"Secret {objects.CONTROL_TOKEN_SECRET} is mounted there",
    "insecure_no_auth": "the endpoint always has a token",
    "ray_address": "fleet.ray_address",
}


def health_url(values: Values) -> str:
    """Every GPU health watcher: the DaemonSet's headless Service, resolved at each poll."""
    from deploy.components.health import watchers_url

    return watchers_url(values)


def settings(values: Values) -> dict[str, Any]:
    fleet = values.fleet
    if not fleet.ray_address:
        raise ValuesError(
            "fleet.ray_address is required with fleet.enabled: the fleet runs its engines on "
            "a Ray cluster (e.g. a KubeRay head, ray://HEAD-SVC:10001), which is not rendered"
        )
    derived: dict[str, Any] = {
        "model": values.engine.model,
        "engine_command": DEFAULT_ENGINE_COMMAND,
        "workers": "vllm",
        "ray_address": fleet.ray_address,
        "host": "0.0.0.0",
        "port": PORT,
        "auth_token_file": objects.CONTROL_TOKEN_FILE,
        "log_format": "json",
    }
    if values.engine.gpu_type:
        derived["gpu_type"] = values.engine.gpu_type
    fixed = dict(FIXED)
    if values.health.enabled:
        derived["gpu_health"] = health_url(values)
        derived["gpu_health_token_file"] = objects.CONTROL_TOKEN_FILE
        fixed["gpu_health_token_file"] = (
            f"the watchers' token, Secret {objects.CONTROL_TOKEN_SECRET}"
        )
    merged = objects.merge_settings(derived, fleet.settings, fixed=fixed, where="fleet.settings")
    try:  # what only `serve` checks: a model, an engine command with {port}
        check_serve(
            EnginesSettings(
                model=str(merged["model"]), engine_command=str(merged["engine_command"])
            )
        )
    except ConfigError as exc:
        raise ValuesError(f"fleet.settings: {exc}") from None
    return merged


def _grace_s(merged: dict[str, Any]) -> int:
    """SIGTERM stops every group, each given ``stop_grace_s`` after its own SIGTERM (in
    parallel); the pod gets that and half a minute for Ray's calls."""
    stop_grace_s = float(merged.get("stop_grace_s", EnginesSettings().stop_grace_s))
    return int(stop_grace_s) + 30


def render(values: Values) -> list[dict[str, Any]]:
    fleet = values.fleet
    if not fleet.enabled:
        return []
    merged = settings(values)
    env = objects.settings_env(EnginesSettings, "engines", merged, where="fleet.settings")
    account = objects.service_account(values, NAME, COMPONENT, automount=False)
    service = objects.service(values, NAME, COMPONENT, [("http", PORT)])
    container = objects.shoal_container(
        values, "fleet", ["shoal", "engines", "serve"],
        # Ray's client writes its session files under $TMPDIR; the root filesystem is read-only
        env=[*env, objects.env("TMPDIR", "/tmp")],
        memory_bytes=fleet.memory_bytes, cpu=fleet.cpu, ports=[("http", PORT)],
        mounts=[objects.control_token_mount(), {"name": "tmp", "mountPath": "/tmp"}],
        liveness=objects.http_probe("/healthz", "http", period_s=10, failures=6),
        readiness=objects.http_probe("/healthz", "http", period_s=5),
    )  # fmt: skip
    pod = objects.pod_spec(values, NAME, automount=False, grace_s=_grace_s(merged))
    pod["containers"] = [container]
    pod["volumes"] = [
        objects.control_token_volume(),
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    deployment = objects.deployment(values, NAME, COMPONENT, pod, recreate=True)
    return [account, service, deployment]
