"""`shoal cache keygen`: CurveZMQ keypairs for the cache cluster.

Two layouts (``kvcache.cluster.security`` explains what each key may do):

    DIR/cluster.key, DIR/cluster.key_secret   the cluster's server keypair, held by every
                                              member (``keygen DIR``)
    DIR/NAME.key_secret                       a member's or operator's own keypair
    DIR/members/NAME.key                      its public half in the members' allow-list,
    DIR/operators/NAME.key                    or in the operators' (``--member``/``--operator``)

Secret files are written with mode 0600 under umask 077; public ones 0644.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from shoal.cli_format import EXIT_FAILED, EXIT_USAGE

__all__ = ["keygen_command"]


def keygen_command(args: argparse.Namespace) -> int:
    import zmq.auth

    if args.member or args.operator:
        return _keygen_identity(args)
    directory = Path(args.dir)
    public, secret = directory / "cluster.key", directory / "cluster.key_secret"
    if not args.force and (public.exists() or secret.exists()):
        print(
            f"shoal cache keygen: {directory} already holds a cluster keypair; every member "
            "uses it, so replacing it needs --force (and a restart of every member)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    # umask first: the secret must never exist with group or world read, even briefly.
    saved = os.umask(0o077)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(str(directory), "cluster")
    except OSError as exc:
        print(f"shoal cache keygen: cannot write {directory}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        os.umask(saved)
    secret.chmod(0o600)
    public.chmod(0o644)
    if args.json:
        print(json.dumps({"public": str(public), "secret": str(secret)}))
        return 0
    d = directory.resolve()
    print(f"""wrote {public} (public) and {secret} (secret, mode 0600)

Every daemon uses this keypair, and so does `shoal cache status`:
  shoal cache serve  --cluster-curve-dir {d} ...
  shoal cache status --cluster-curve-dir {d}
or SHOAL_CACHE_CLUSTER_CURVE_DIR={d}, or cluster_curve_dir in the [cache] table.

Operators need their own key for evict/flush/drain --node (this keypair is a
member's): `shoal cache keygen {d} --operator NAME`, given as --cluster-curve-key.
Per-node keys (a member then cannot act as another): `shoal cache keygen {d}
--member NODE` for each node, each given as its --cluster-curve-key.

On Kubernetes, keep it in a Secret and mount it read-only at that path in every pod:
  kubectl create secret generic shoal-cluster-key \\
      --from-file={public} --from-file={secret}
  (volume: secret shoal-cluster-key, defaultMode 0400, mountPath {d})""")
    return 0


def _keygen_identity(args: argparse.Namespace) -> int:
    """A member's or operator's own keypair: NAME.key_secret in DIR, its public half in
    DIR/members/ (pinned to the node name) or DIR/operators/ (kvcache.cluster.security)."""
    import tempfile

    import zmq.auth

    name, folder = (args.member, "members") if args.member else (args.operator, "operators")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
        print(f"shoal cache keygen: {name!r} is not a usable key name", file=sys.stderr)
        return EXIT_USAGE
    directory = Path(args.dir)
    secret, public = directory / f"{name}.key_secret", directory / folder / f"{name}.key"
    if not args.force and (secret.exists() or public.exists()):
        print(f"shoal cache keygen: {secret} or {public} exists; --force replaces it",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    metadata = {"node": name} if args.member else {"operator": name}
    saved = os.umask(0o077)
    try:
        public.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            _, made_secret = zmq.auth.create_certificates(scratch, name, metadata)
            # pyzmq writes metadata into the secret file only: the public one (what the
            # allow-list holds) is the secret one without its secret-key line.
            lines = Path(made_secret).read_text().splitlines(keepends=True)
            kept = [line for line in lines if "secret-key" not in line and line[:1] != "#"]
            public.write_text("#   ZeroMQ CURVE public certificate (shoal cache keygen)\n"
                              + "".join(kept))  # fmt: skip
            os.replace(made_secret, secret)
    except OSError as exc:
        print(f"shoal cache keygen: cannot write {directory}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        os.umask(saved)
    public.chmod(0o644)
    if args.json:
        print(json.dumps({"public": str(public), "secret": str(secret)}))
    else:
        print(f"wrote {secret} (secret, mode 0600) and {public} (public)\n"
              f"give it as --cluster-curve-key {secret.resolve()} "
              f"(SHOAL_CACHE_CLUSTER_CURVE_KEY); copy {public.name} into {folder}/ of "
              "every member's key directory")  # fmt: skip
    return 0
