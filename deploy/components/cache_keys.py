"""The cache daemons' CurveZMQ keys on Kubernetes (``cache.cluster.keys``).

kvcache/cluster/security.py has the model. Keys are
admitted and revoked by editing a Secret, with no restart and no re-render: the kubelet
updates a Secret mounted whole (no ``items``, no ``subPath``) in place, keys added and
deleted, and the daemon re-reads ``members/*.key`` and ``operators/*.key`` every
``cluster_key_reload_s`` (KeyRing globs ``*.key``: the kubelet's ``..data`` and
``..<timestamp>`` entries do not match, and each ``NAME.key`` symlink reads as the file).
So ``/etc/shoal/curve`` is a tiny memory emptyDir holding nested mounts (the runtime sorts
mounts by depth and makes the mount points in the writable emptyDir)::

    /etc/shoal/curve/           emptyDir (medium Memory)                    shared, per_node
      cluster.key, .key_secret  subPath of Secret <secret> (0400): replaced shared, per_node
                                only by a cluster-keypair rotation, which restarts every member
      operators/                Secret <secret>-operators, whole: NAME.key  shared, per_node
      members/                  Secret <secret>-members, whole: NODE.key    per_node
    /var/lib/shoal/curve/       hostPath 0700: NODE.key_secret, made on the node  per_node

``shared`` (legacy layout, no ``members/``): ``cluster_curve_key`` is the cluster keypair.
``per_node``: a node's own keypair never leaves it. The init container ``curve-keygen``
(as ``run_as_user``) runs ``shoal cache keygen /var/lib/shoal/curve --member $NODE_NAME``
unless the key is there, logs the public key with the ``kubectl patch`` that admits it,
and waits until it is in ``members/``; ``cluster_curve_key`` is that node key. A new node
(or one whose key was removed) thus waits in Init with the command to run in its log,
instead of crash-looping in ``load_curve_keys``. Rejected: naming the nodes in the values
(``member_nodes``, for a nodeAffinity): admitting a node would need a re-render and a
DaemonSet roll, and the nodeSelector already picks the nodes. ``insecure``: no keys,
``cluster_insecure``. deploy/secrets.py gives the commands that create the three Secrets.

Invariant: the daemon's ``cluster_curve_dir``/``cluster_curve_key`` (``curve_settings``)
name exactly the paths ``volumes_and_mounts`` mounts, and the Secrets those mounts read are
the ones deploy/secrets.py tells the operator to create (``curve_secrets``).
"""

from __future__ import annotations

import re
from typing import Any

from deploy import objects
from deploy.errors import ValuesError
from deploy.objects import Obj
from deploy.values import Values

__all__ = [
    "CLUSTER_KEYS",
    "CURVE_DIR",
    "KEY_MODES",
    "NODE_KEY_DIR",
    "NODE_KEY_VOLUME",
    "curve_secrets",
    "curve_settings",
    "key_mode",
    "keygen_container",
    "volumes_and_mounts",
]

CURVE_DIR = "/etc/shoal/curve"
CURVE_VOLUME = "shoal-curve"  # the emptyDir the key mounts nest in
CLUSTER_KEYS = ("cluster.key", "cluster.key_secret")
NODE_KEY_DIR = "/var/lib/shoal/curve"  # per_node: this node's own keypair, made here
NODE_KEY_VOLUME = "shoal-node-key"
KEYGEN_POLL_S = 10
KEY_MODES = ("shared", "per_node", "insecure")

# Kubernetes Secret keys are [-._a-zA-Z0-9]+; keygen names start alphanumeric.
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def curve_secrets(values: Values) -> dict[str, str]:
    """Role (``cluster``, ``operators``, ``members``) -> the Secret the pods mount for it
    (module docstring); empty when no keys are mounted."""
    cluster = values.cache.cluster
    if not values.cache.enabled or not cluster.enabled or key_mode(values) == "insecure":
        return {}
    bad = [name for name in cluster.operators if not _KEY_NAME.fullmatch(name)]
    if bad:
        raise ValuesError(
            f"cache.cluster.operators: {bad} cannot name a Secret key (letters, digits, "
            "'.', '_', '-', starting with a letter or digit)"
        )
    roles = {"cluster": cluster.secret, "operators": f"{cluster.secret}-operators"}
    if cluster.keys == "per_node":
        roles["members"] = f"{cluster.secret}-members"
    return roles


def curve_settings(values: Values) -> dict[str, Any]:
    keys = key_mode(values)
    if keys == "insecure":
        return {"cluster_insecure": True}
    own = f"{CURVE_DIR}/cluster" if keys == "shared" else f"{NODE_KEY_DIR}/$(NODE_NAME)"
    return {"cluster_curve_dir": CURVE_DIR, "cluster_curve_key": f"{own}.key_secret"}


def key_mode(values: Values) -> str:
    keys = values.cache.cluster.keys
    if keys not in KEY_MODES:
        raise ValuesError(f"cache.cluster.keys {keys!r}: expected one of {', '.join(KEY_MODES)}")
    return keys


def keygen_container(values: Values, members: str) -> Obj:
    """Make this node's keypair unless it exists, log how to admit it, wait until it is."""
    # A JSON merge patch of data.NODE.key, the public key file in base64: one line to paste.
    admit = (
        f"kubectl -n {values.namespace} patch secret {members} --type merge -p "
        """'{\\"data\\":{\\"$node.key\\":\\"$b64\\"}}'"""
    )
    script = f"""set -eu
dir={NODE_KEY_DIR}
node="$NODE_NAME"
if [ ! -s "$dir/$node.key_secret" ] || [ ! -s "$dir/members/$node.key" ]; then
  shoal cache keygen "$dir" --member "$node" --force >/dev/null
fi
key=$(grep public-key "$dir/members/$node.key" | cut -d '"' -f 2)
b64=$(base64 -w0 "$dir/members/$node.key")
n=0
until grep -qsF -e "$key" {CURVE_DIR}/members/*.key; do
  if [ $((n % 30)) -eq 0 ]; then
    echo "shoal: node $node: CurveZMQ public key $key is not in Secret {members}; admit it:"
    echo "  {admit}"
  fi
  n=$((n + 1))
  sleep {KEYGEN_POLL_S}
done
echo "shoal: node $node: key $key admitted"
"""
    return objects.shoal_container(
        values, "curve-keygen", ["sh", "-c", script],
        env=[{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        memory_bytes=128 << 20, cpu="10m",
        mounts=[
            {"name": NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR},
            {"name": _secret_volume("members"), "mountPath": f"{CURVE_DIR}/members",
             "readOnly": True},
        ],
    )  # fmt: skip


def _secret_volume(role: str) -> str:
    return f"{CURVE_VOLUME}-{role}"


def volumes_and_mounts(values: Values) -> tuple[list[Obj], list[Obj]]:
    """(volumes, daemon mounts) of the key layout (module docstring); none without keys."""
    secrets = curve_secrets(values)
    if not secrets:
        return [], []
    volumes: list[Obj] = [
        {"name": CURVE_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": _secret_volume("cluster"),
            "secret": {
                "secretName": secrets["cluster"],
                "defaultMode": 0o400,
                "items": [{"key": key, "path": key} for key in CLUSTER_KEYS],
            },
        },
    ]
    # Not readOnly: the nested mount points are made in it when the container starts.
    mounts: list[Obj] = [{"name": CURVE_VOLUME, "mountPath": CURVE_DIR}]
    mounts += [
        {"name": _secret_volume("cluster"), "mountPath": f"{CURVE_DIR}/{key}", "subPath": key,
         "readOnly": True}
        for key in CLUSTER_KEYS
    ]  # fmt: skip
    for role in ("operators", "members"):
        if role in secrets:  # whole Secrets: updated in place (admit and revoke)
            volumes.append(
                {
                    "name": _secret_volume(role),
                    "secret": {"secretName": secrets[role], "defaultMode": 0o444},
                }
            )
            mounts.append(
                {"name": _secret_volume(role), "mountPath": f"{CURVE_DIR}/{role}", "readOnly": True}
            )
    if "members" in secrets:
        volumes.append(
            {
                "name": NODE_KEY_VOLUME,
                "hostPath": {"path": NODE_KEY_DIR, "type": "DirectoryOrCreate"},
            }
        )
        mounts.append({"name": NODE_KEY_VOLUME, "mountPath": NODE_KEY_DIR, "readOnly": True})
    return volumes, mounts
