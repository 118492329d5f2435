"""Redis for the router replicas' shared state: ``shoal-redis`` Deployment and Service.

Invariant: the state is soft. ``router/shared.py`` keeps in-flight counts (rewritten by
every replica on each refresh, expiring ``10 * ttl`` after the last) and GCRA rate-limit
buckets (each set with ``PX``, expiring about a second after the bucket is full again), and
a Redis failure never fails a request (each replica falls back to its own view). So: no
persistence (``--save ""``, ``--appendonly no``), one replica, ``Recreate`` (two Redis
pods behind the Service during a rollout would split the replicas' view), an emptyDir
for ``/data``.

Eviction: ``maxmemory`` is 80% of the container's limit (Redis's own overhead and
fragmentation live in the rest) with ``volatile-ttl``. Every key Shoal writes has a TTL,
and the soonest to expire are the cheapest to lose: a rate bucket about to expire is
almost full again anyway, and the ledger is rewritten within a refresh. Rejected:
``noeviction`` (a full Redis answers writes with errors, and every replica falls back to
its local view: rate limits multiplied by the replica count until memory frees);
``allkeys-lru`` (could drop a live ledger hash before an idle bucket).

Security: the image's ``redis`` user (UID 999, GID 1000 in the Alpine image), no
password: only the router pods should reach port 6379, which the NetworkPolicies enforce
(``protected-mode`` is off explicitly, as the image's entrypoint would do, because the
port is reached over the pod network).
"""

from __future__ import annotations

from deploy import objects
from deploy.objects import Obj
from deploy.sizes import quantity
from deploy.values import Values

__all__ = ["NAME", "PORT", "REDIS_GID", "REDIS_UID", "maxmemory_bytes", "render"]

NAME = "shoal-redis"
PORT = 6379
REDIS_UID = 999  # the redis user of the official redis:*-alpine images
REDIS_GID = 1000


def maxmemory_bytes(values: Values) -> int:
    return values.redis.memory_bytes * 8 // 10


def render(values: Values) -> list[Obj]:
    redis = values.redis
    if not redis.enabled or redis.url:
        return []
    account = objects.service_account(values, NAME, "redis", automount=False)
    service = objects.service(values, NAME, "redis", [("redis", PORT)], protocol=False)
    memory = quantity(redis.memory_bytes)
    ping = {"exec": {"command": ["redis-cli", "ping"]}, "timeoutSeconds": 2}
    container = {
        "name": "redis",
        "image": redis.image,
        "command": [
            "redis-server",
            "--port",
            str(PORT),
            "--protected-mode",
            "no",
            "--maxmemory",
            str(maxmemory_bytes(values)),
            "--maxmemory-policy",
            "volatile-ttl",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        "ports": [{"name": "redis", "containerPort": PORT}],
        "resources": {"requests": {"cpu": "100m", "memory": memory}, "limits": {"memory": memory}},
        "securityContext": objects.container_security(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "readinessProbe": {**ping, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**ping, "periodSeconds": 10, "failureThreshold": 6},
    }
    security = {
        "runAsNonRoot": True,
        "runAsUser": REDIS_UID,
        "runAsGroup": REDIS_GID,
        "fsGroup": REDIS_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    pod = objects.pod_spec(values, NAME, automount=False, security=security)
    pod["containers"] = [container]
    pod["volumes"] = [{"name": "data", "emptyDir": {}}]
    deployment = objects.deployment(values, NAME, "redis", pod, recreate=True)
    return [account, service, deployment]
