"""The Secrets an operator creates before ``kubectl apply``: names, keys and how to make them.

Invariant: every Secret a rendered object references is listed here with the keys it uses,
and nothing else (``deploy/checks/contracts.py`` ``listed_secrets`` holds both directions).
We never render Secret contents: a key in a manifest is a key in git, and the tokens and
CurveZMQ keys have their own lifecycles (docs/operations.md: rotating keys).

    shoal-control-token     token          bearer token of the control daemons (autoscaler,
                                           health, fleet) and of their clients
    router.api_keys_secret  api-keys       the router's KEY USER lines
    cache.cluster.secret    cluster.key,   the cache cluster's CurveZMQ keys (files of
                            ...            `shoal cache keygen`, flattened: a Secret key
                                           cannot hold "/", so members/N.key is members.N.key)
    engine.loader.s3_secret AWS_*          the loader's S3 credentials
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from deploy.values import Values

__all__ = ["CONTROL_TOKEN_SECRET", "SecretSpec", "curve_keys", "required_secrets"]

CONTROL_TOKEN_SECRET = "shoal-control-token"


@dataclass(frozen=True, slots=True)
class SecretSpec:
    name: str
    keys: tuple[str, ...]
    purpose: str
    create_command: str  # shell commands that create it (one per line)


def curve_keys(values: Values) -> tuple[str, ...]:
    """The CurveZMQ Secret's keys: the cache renderer's own list when it has one."""
    from deploy.components import cache

    own = getattr(cache, "curve_secret_keys", None)
    if own is not None:
        return tuple(own(values))
    cluster = values.cache.cluster
    keys = ["cluster.key", "cluster.key_secret"]
    keys += [f"operators.{name}.key" for name in cluster.operators]
    if cluster.keys == "per_node":
        for node in cluster.member_nodes:
            keys += [f"members.{node}.key", f"{node}.key_secret"]
    return tuple(keys)


def _kubectl(values: Values, name: str, sources: list[str]) -> str:
    args = ["kubectl", "create", "secret", "generic", name, "-n", values.namespace, *sources]
    return " ".join(
        shlex.quote(a) if not a.startswith("--from-literal=token=") else a for a in args
    )


def _curve_command(values: Values, keys: tuple[str, ...]) -> str:
    cluster = values.cache.cluster
    lines = ["shoal cache keygen keys"]
    lines += [f"shoal cache keygen keys --operator {shlex.quote(n)}" for n in cluster.operators]
    if cluster.keys == "per_node":
        lines += [
            f"shoal cache keygen keys --member {shlex.quote(n)}" for n in cluster.member_nodes
        ]
    files = []
    for key in keys:  # members.N.key -> keys/members/N.key (the layout keygen writes)
        head, _, rest = key.partition(".")
        files.append(
            f"--from-file={key}=keys/"
            + (f"{head}/{rest}" if head in ("members", "operators") else key)
        )
    lines.append(_kubectl(values, cluster.secret, files))
    return "\n".join(lines)


def required_secrets(values: Values) -> list[SecretSpec]:
    """The Secrets the rendered manifests reference, for these values."""
    specs: list[SecretSpec] = []
    if values.autoscaler.enabled or values.health.enabled or values.fleet.enabled:
        specs.append(
            SecretSpec(
                CONTROL_TOKEN_SECRET,
                ("token",),
                "bearer token of the control daemons (autoscaler, health, fleet) and their clients",
                _kubectl(
                    values, CONTROL_TOKEN_SECRET, ['--from-literal=token="$(openssl rand -hex 32)"']
                ),
            )
        )
    router = values.router
    if router.enabled and router.api_keys_secret:
        specs.append(
            SecretSpec(
                router.api_keys_secret,
                ("api-keys",),
                "the router's API keys (KEY USER lines)",
                _kubectl(values, router.api_keys_secret, ["--from-file=api-keys=api-keys.txt"]),
            )
        )
    cluster = values.cache.cluster
    joins = values.cache.enabled or (router.enabled and router.precise)
    if joins and cluster.enabled and cluster.keys != "insecure":
        keys = curve_keys(values)
        specs.append(
            SecretSpec(
                cluster.secret,
                keys,
                f"the cache cluster's CurveZMQ keys ({cluster.keys})",
                _curve_command(values, keys),
            )
        )
    loader = values.engine.loader
    if values.engine.enabled and loader.enabled and loader.s3_secret:
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        specs.append(
            SecretSpec(
                loader.s3_secret,
                keys,
                "the loader's S3 credentials",
                _kubectl(values, loader.s3_secret, [f"--from-literal={k}=..." for k in keys]),
            )
        )
    return specs
