"""The Secrets an operator creates before ``kubectl apply``: names, keys and how to make them.

Invariant: every Secret a rendered object references is listed here with the keys it uses,
and nothing else (``deploy/checks/contracts.py`` ``listed_secrets`` holds both directions).
We never render Secret contents: a key in a manifest is a key in git, and the tokens and
CurveZMQ keys have their own lifecycles (docs/operations.md: rotating keys).

    shoal-control-token     token          bearer token of the control daemons (autoscaler,
                                           health, fleet) and the router's admin port, and
                                           of their clients (the router among them)
    router.api_keys_secret  api-keys       the router's KEY USER lines
    cache.cluster.secret    cluster.key,   the cache cluster's server keypair (`shoal cache
                            .key_secret    keygen DIR`); a new one restarts every member
      <secret>-operators    NAME.key       operators' public keys: edit to admit or revoke
      <secret>-members      NODE.key       per_node: members' public keys, made on each node
                                           (deploy/components/cache.py); starts empty
    engine.loader.s3_secret AWS_*          the loader's S3 credentials (and vLLM's, for its
                                           fallback to the origin)
    engine.hf_token_secret  token          HF_TOKEN: vLLM reads a gated model's config and
                                           tokenizer from the Hugging Face Hub
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from deploy.values import Values

__all__ = ["CONTROL_TOKEN_SECRET", "SecretSpec", "curve_secrets", "required_secrets"]

CONTROL_TOKEN_SECRET = "shoal-control-token"


@dataclass(frozen=True, slots=True)
class SecretSpec:
    name: str
    keys: tuple[str, ...]
    purpose: str
    create_command: str  # shell commands that create it (one per line)


def _kubectl(values: Values, name: str, sources: list[str]) -> str:
    args = ["kubectl", "create", "secret", "generic", name, "-n", values.namespace, *sources]
    return " ".join(
        shlex.quote(a) if not a.startswith("--from-literal=token=") else a for a in args
    )


def curve_secrets(values: Values) -> list[SecretSpec]:
    """The cache cluster's key Secrets (deploy/components/cache.py draws the layout): the
    server keypair, and the allow-lists mounted whole, so editing them needs no restart."""
    from deploy.components import cache

    names = cache.curve_secrets(values)
    if not names:
        return []
    operators = values.cache.cluster.operators
    keygen = ["shoal cache keygen keys"]
    keygen += [f"shoal cache keygen keys --operator {shlex.quote(name)}" for name in operators]
    server = [f"--from-file={key}=keys/{key}" for key in cache.CLUSTER_KEYS]
    specs = [
        SecretSpec(
            names["cluster"],
            cache.CLUSTER_KEYS,
            f"the cache cluster's CurveZMQ server keypair ({values.cache.cluster.keys} keys)",
            "\n".join([*keygen, _kubectl(values, names["cluster"], server)]),
        ),
        SecretSpec(
            names["operators"],
            tuple(f"{name}.key" for name in operators),
            "operators' public keys (NAME.key), admitted and revoked by editing this Secret",
            _kubectl(
                values,
                names["operators"],
                [f"--from-file={name}.key=keys/operators/{name}.key" for name in operators],
            ),
        ),
    ]
    if "members" in names:
        specs.append(
            SecretSpec(
                names["members"],
                (),
                "members' public keys (NODE.key), made on each node: a cache pod's curve-keygen "
                "log prints the kubectl patch that admits its node; delete a key to revoke it",
                _kubectl(values, names["members"], []),
            )
        )
    return specs


def required_secrets(values: Values) -> list[SecretSpec]:
    """The Secrets the rendered manifests reference, for these values."""
    specs: list[SecretSpec] = []
    if values.autoscaler.enabled or values.health.enabled or values.fleet.enabled:
        specs.append(
            SecretSpec(
                CONTROL_TOKEN_SECRET,
                ("token",),
                "bearer token of the control daemons (autoscaler, health, fleet) and the "
                "router's admin port, and of their clients (the router among them)",
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
    specs += curve_secrets(values)
    loader = values.engine.loader
    if values.engine.enabled and values.engine.hf_token_secret:
        specs.append(
            SecretSpec(
                values.engine.hf_token_secret,
                ("token",),
                "HF_TOKEN for vLLM: a gated model's config and tokenizer come from the Hub",
                _kubectl(values, values.engine.hf_token_secret, ["--from-literal=token=hf_..."]),
            )
        )
    if values.engine.enabled and loader.enabled and loader.uri and loader.s3_secret:
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
