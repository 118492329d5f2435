"""The cache daemon's manifests: what `shoal deploy render` gives the node cache DaemonSet."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest

from deploy.components import cache, node_dirs
from deploy.errors import ValuesError
from deploy.secrets import curve_secrets
from deploy.sizes import derive, quantity
from deploy.values import Values, parse_values
from kvcache.cluster.discovery import KubernetesDiscovery
from kvcache.cluster.settings import cluster_settings
from kvcache.config import CacheConfig
from kvcache.keygen import keygen_command
from shoal.cli import build_parser
from shoal.config import load_config

GiB = 1 << 30
Obj = dict[str, Any]


# --- factories ----------------------------------------------------------------------------


def values_with(**cache_values: Any) -> Values:
    """Values with this ``cache`` table (``cluster=`` is its nested table)."""
    return parse_values({"cache": cache_values})


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def daemon_set(values: Values) -> Obj:
    (ds,) = by_kind(cache.render(values), "DaemonSet")
    return ds


def pod(values: Values) -> Obj:
    return daemon_set(values)["spec"]["template"]["spec"]


def container(values: Values) -> Obj:
    (only,) = pod(values)["containers"]
    return only


def env_of(values: Values) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(values)["env"]}


def container_environ(
    values: Values, node: str = "node-a", pod_ip: str = "10.1.2.3"
) -> dict[str, str]:
    """The SHOAL_CACHE_* environment as the kubelet gives it: $(VAR) expanded."""
    known = {"NODE_NAME": node, "POD_IP": pod_ip}
    environ: dict[str, str] = {}
    for entry in container(values)["env"]:
        if "value" not in entry:
            continue
        expanded = re.sub(r"\$\((\w+)\)", lambda m: known[m.group(1)], entry["value"])
        environ[entry["name"]] = expanded
    return environ


def volumes_of(values: Values) -> dict[str, Obj]:
    return {v["name"]: v for v in pod(values)["volumes"]}


def mounts_of(values: Values) -> dict[str, Obj]:
    """The daemon's mounts by mount path."""
    return {m["mountPath"]: m for m in container(values)["volumeMounts"]}


def init_named(values: Values, name: str) -> Obj:
    (found,) = [c for c in pod(values)["initContainers"] if c["name"] == name]
    return found


def kubelet_secret_dir(directory: Path, files: dict[str, bytes], stamp: str) -> None:
    """What the kubelet's atomic writer makes of a whole-Secret mount: the files in a
    timestamped dir, ``..data`` pointing at it, and one symlink per key through ``..data``."""
    directory.mkdir(exist_ok=True)
    payload = directory / f"..{stamp}"
    payload.mkdir()
    for name, data in files.items():
        (payload / name).write_bytes(data)
    (directory / "..data_tmp").symlink_to(payload.name)
    (directory / "..data_tmp").replace(directory / "..data")
    for entry in directory.iterdir():
        if not entry.name.startswith("..") and entry.name not in files:
            entry.unlink()
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


# --- specification ------------------------------------------------------------------------


class TestDefaults:
    @pytest.mark.parametrize("version", ["1.36", "1.37"])
    def test_every_object_passes_the_strict_schema(self, version: str) -> None:
        for obj in cache.render(parse_values({})):
            kubernetes_validate.validate(obj, version, strict=True)

    def test_objects_come_in_apply_order(self) -> None:
        kinds = [obj["kind"] for obj in cache.render(parse_values({}))]
        assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Service", "DaemonSet"]

    def test_every_object_is_named_and_labelled_as_the_cache(self) -> None:
        for obj in cache.render(parse_values({})):
            assert obj["metadata"]["name"] == "shoal-cache"
            assert obj["metadata"]["namespace"] == "shoal"
            assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "cache"

    def test_disabled_renders_nothing(self) -> None:
        assert cache.render(values_with(enabled=False)) == []

    def test_the_daemon_runs_shoal_cache_serve_from_the_values_image(self) -> None:
        values = parse_values({"image": {"tag": "9.9", "pull_policy": "Always"}})
        daemon = container(values)
        assert daemon["command"] == ["shoal", "cache", "serve"]
        assert daemon["image"] == "ghcr.io/shoal-project/shoal:9.9"
        assert daemon["imagePullPolicy"] == "Always"

    def test_the_settings_are_real_and_load_as_the_daemon_loads_them(self) -> None:
        values = parse_values({})
        config = load_config(
            CacheConfig, "cache", environ=container_environ(values), config_path=""
        )
        fields = {f.name.upper() for f in dataclasses.fields(CacheConfig)}
        names = [e["name"] for e in container(values)["env"]]
        assert names[:2] == ["NODE_NAME", "POD_IP"]  # before the settings that expand them
        assert {n.removeprefix("SHOAL_CACHE_") for n in names[2:]} <= fields
        assert config.shm_dir == values.node_dirs.shm_dir
        assert config.runtime_dir == values.node_dirs.runtime_dir
        assert (config.metrics_host, config.metrics_port) == ("0.0.0.0", 9500)
        assert config.cluster_node == "node-a"
        assert config.log_format == "json"
        assert config.endpoint == node_dirs.daemon_socket(values)
        assert str(config.arena_path) == node_dirs.arena_path(values)

    def test_the_root_filesystem_is_read_only_and_nothing_runs_privileged(self) -> None:
        spec = pod(parse_values({}))
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert spec["securityContext"]["runAsUser"] == 10001
        assert spec["hostPID"] is False

    def test_host_pid_follows_the_values(self) -> None:
        assert pod(values_with(share_host_pid=True))["hostPID"] is True

    def test_node_selector_and_tolerations_follow_the_values(self) -> None:
        toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        spec = pod(values_with(node_selector={"gpu": "yes"}, tolerations=[toleration]))
        assert spec["nodeSelector"] == {"gpu": "yes"}
        assert spec["tolerations"] == [toleration]

    def test_updates_roll_one_node_at_a_time(self) -> None:
        strategy = daemon_set(parse_values({}))["spec"]["updateStrategy"]
        assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}

    def test_the_daemon_selector_matches_its_pod_labels(self) -> None:
        ds = daemon_set(parse_values({}))
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


class TestSettings:
    @pytest.mark.parametrize("key", ["shm_dir", "cluster_port", "engine_events", "cluster_host"])
    def test_a_structural_setting_in_the_users_table_is_refused(self, key: str) -> None:
        with pytest.raises(ValuesError, match=f"cache.settings: {key} \\(set by"):
            cache.render(values_with(settings={key: "1"}))

    def test_a_misspelt_setting_is_refused_with_the_daemons_names(self) -> None:
        with pytest.raises(ValuesError, match=r"unknown setting\(s\) \['shm_byte'\]"):
            cache.render(values_with(settings={"shm_byte": "1GiB"}))

    def test_the_users_log_format_wins(self) -> None:
        assert (
            env_of(values_with(settings={"log_format": "text"}))["SHOAL_CACHE_LOG_FORMAT"] == "text"
        )

    def test_static_discovery_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="cluster_discovery 'static'"):
            cache.render(values_with(settings={"cluster_discovery": "static"}))


class TestSizes:
    def test_memory_request_equals_limit_equals_shm_dram_staging_overhead(self) -> None:
        values = values_with(
            settings={"shm_bytes": "2GiB", "dram_bytes": "3GiB", "io_staging_bytes": "512MiB"},
            memory_overhead_bytes="1GiB",
        )
        resources = container(values)["resources"]
        expected = quantity(2 * GiB + 3 * GiB + 512 * (1 << 20) + GiB)
        assert expected == quantity(derive(values).daemon_memory_bytes) == "6656Mi"
        assert resources["requests"]["memory"] == resources["limits"]["memory"] == expected

    def test_cpu_is_requested_not_limited(self) -> None:
        resources = container(values_with(cpu="3"))["resources"]
        assert resources["requests"]["cpu"] == "3"
        assert "cpu" not in resources["limits"]

    def test_the_startup_probe_grows_with_the_arena(self) -> None:
        small = container(values_with(settings={"shm_bytes": "1GiB"}))["startupProbe"]
        large = container(values_with(settings={"shm_bytes": "512GiB"}))["startupProbe"]
        allowed = [p["failureThreshold"] * p["periodSeconds"] for p in (small, large)]
        assert allowed[0] >= 60
        assert allowed[1] >= 60 + 2 * 512


class TestProbesAndLifecycle:
    def test_liveness_is_healthz_and_readiness_readyz_on_the_metrics_port(self) -> None:
        daemon = container(parse_values({}))
        assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert daemon["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert {"name": "metrics", "containerPort": 9500, "protocol": "TCP"} in daemon["ports"]

    def test_prestop_drains_this_node_with_shoals_own_cli(self) -> None:
        values = values_with(drain_s=17.5)
        hook = container(values)["lifecycle"]["preStop"]["exec"]["command"]
        assert hook[:2] == ["sh", "-c"]
        argv = shlex.split(hook[2])
        assert argv[:4] == ["exec", "shoal", "cache", "drain"]
        # The shell expands the container's own setting, which the kubelet set to the node.
        assert argv[4] == "$SHOAL_CACHE_CLUSTER_NODE"
        assert env_of(values)["SHOAL_CACHE_CLUSTER_NODE"] == "$(NODE_NAME)"
        args = build_parser("cache").parse_args([*argv[2:4], "node-a", *argv[5:]])
        assert (args.component, args.verb, args.node, args.timeout) == (
            "cache",
            "drain",
            "node-a",
            17.5,
        )

    def test_the_grace_period_covers_the_drain_and_the_shutdown(self) -> None:
        spec = pod(values_with(drain_s=30.0, settings={"shutdown_timeout_s": 8}))
        assert spec["terminationGracePeriodSeconds"] >= 30 + 8
        assert spec["terminationGracePeriodSeconds"] <= 30 + 8 + 30

    def test_without_a_cluster_there_is_no_drain_to_do(self) -> None:
        assert "lifecycle" not in container(values_with(cluster={"enabled": False}))


class TestCluster:
    def test_the_headless_service_publishes_starting_members(self) -> None:
        (service,) = by_kind(cache.render(parse_values({})), "Service")
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
        assert ports == {
            "cluster": (7400, "cluster"),
            "stream": (7401, "stream"),
            "metrics": (9500, "metrics"),
        }

    def test_discovery_reads_the_service_and_finds_this_member_at_its_advertised_address(
        self,
    ) -> None:
        values = values_with(cluster={"port": 7700})
        config = load_config(
            CacheConfig,
            "cache",
            environ=container_environ(values, pod_ip="10.1.2.3"),
            config_path="",
        )
        assert (config.cluster_discovery, config.cluster_k8s_service) == ("k8s", "shoal-cache")
        assert config.cluster_k8s_namespace == values.namespace
        (service,) = by_kind(cache.render(values), "Service")
        # The Endpoints controller names each port as the Service does, with the pod's number.
        container_ports = {p["name"]: p["containerPort"] for p in container(values)["ports"]}
        ports = [
            SimpleNamespace(name=p["name"], port=container_ports[p["targetPort"]])
            for p in service["spec"]["ports"]
        ]
        subset = SimpleNamespace(addresses=[SimpleNamespace(ip="10.1.2.3")], ports=ports)
        api = SimpleNamespace(
            read_namespaced_endpoints=lambda name, ns, **kw: (
                SimpleNamespace(subsets=[subset])
                if (name, ns) == ("shoal-cache", "shoal")
                else None
            )
        )
        discovered = KubernetesDiscovery(
            config.cluster_k8s_service, config.cluster_k8s_namespace, api=api
        ).addresses()
        # The advertised address does not depend on the source; static (no peers) builds no
        # Kubernetes client, which would want credentials.
        settings = cluster_settings(dataclasses.replace(config, cluster_discovery="static"))
        assert discovered == [settings.advertise] == ["10.1.2.3:7700"]

    def test_rbac_grants_exactly_the_endpoints_read_discovery_makes(self) -> None:
        objects = cache.render(parse_values({}))
        (role,) = by_kind(objects, "Role")
        (binding,) = by_kind(objects, "RoleBinding")
        assert role["rules"] == [
            {
                "apiGroups": [""],
                "resources": ["endpoints"],
                "resourceNames": ["shoal-cache"],
                "verbs": ["get"],
            }
        ]
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "shoal-cache", "namespace": "shoal"}
        ]
        (account,) = by_kind(objects, "ServiceAccount")
        assert account["automountServiceAccountToken"] is True
        assert pod(parse_values({}))["automountServiceAccountToken"] is True

    def test_dns_discovery_needs_no_api_and_no_rbac(self) -> None:
        values = values_with(settings={"cluster_discovery": "dns"})
        objects = cache.render(values)
        assert [o["kind"] for o in objects] == ["ServiceAccount", "Service", "DaemonSet"]
        assert objects[0]["automountServiceAccountToken"] is False
        assert env_of(values)["SHOAL_CACHE_CLUSTER_DNS_NAME"] == "shoal-cache.shoal.svc"

    def test_cluster_disabled_means_no_service_no_rbac_and_port_zero(self) -> None:
        values = values_with(cluster={"enabled": False})
        objects = cache.render(values)
        assert [o["kind"] for o in objects] == ["ServiceAccount", "DaemonSet"]
        assert objects[0]["automountServiceAccountToken"] is False
        assert [p["name"] for p in container(values)["ports"]] == ["metrics"]
        env = env_of(values)
        assert env["SHOAL_CACHE_CLUSTER_PORT"] == "0"
        assert "POD_IP" not in env and "SHOAL_CACHE_CLUSTER_CURVE_DIR" not in env
        assert cache.curve_secrets(values) == {}
        for obj in objects:
            kubernetes_validate.validate(obj, "1.37", strict=True)


class TestCurveKeys:
    def test_shared_keys_nest_the_cluster_keypair_and_the_operators_in_an_emptydir(self) -> None:
        values = values_with(cluster={"operators": ["admin", "oncall"]})
        volumes, mounts = volumes_of(values), mounts_of(values)
        assert volumes["shoal-curve"]["emptyDir"]["medium"] == "Memory"
        assert mounts["/etc/shoal/curve"] == {
            "name": "shoal-curve",
            "mountPath": "/etc/shoal/curve",
        }
        assert volumes["shoal-curve-cluster"]["secret"] == {
            "secretName": "shoal-cache-curve",
            "defaultMode": 0o400,
            "items": [{"key": k, "path": k} for k in ("cluster.key", "cluster.key_secret")],
        }
        for key in ("cluster.key", "cluster.key_secret"):
            mount = mounts[f"/etc/shoal/curve/{key}"]
            assert (mount["name"], mount["subPath"], mount["readOnly"]) == (
                "shoal-curve-cluster",
                key,
                True,
            )
        # the allow-list is the whole Secret: no items, so the kubelet adds and deletes keys
        assert volumes["shoal-curve-operators"]["secret"] == {
            "secretName": "shoal-cache-curve-operators",
            "defaultMode": 0o444,
        }
        assert "subPath" not in mounts["/etc/shoal/curve/operators"]
        assert not any(path.endswith("/members") for path in mounts)
        assert "shoal-node-key" not in volumes
        env = env_of(values)
        assert env["SHOAL_CACHE_CLUSTER_CURVE_DIR"] == "/etc/shoal/curve"
        assert env["SHOAL_CACHE_CLUSTER_CURVE_KEY"] == "/etc/shoal/curve/cluster.key_secret"
        assert [c["name"] for c in pod(values)["initContainers"]] == ["node-dirs"]

    def test_per_node_mounts_the_members_whole_and_only_this_nodes_own_key(self) -> None:
        values = values_with(cluster={"keys": "per_node"})
        volumes, mounts = volumes_of(values), mounts_of(values)
        assert volumes["shoal-curve-members"]["secret"] == {
            "secretName": "shoal-cache-curve-members",
            "defaultMode": 0o444,
        }
        assert mounts["/etc/shoal/curve/members"]["readOnly"] is True
        assert volumes["shoal-node-key"]["hostPath"]["path"] == "/var/lib/shoal/curve"
        assert mounts["/var/lib/shoal/curve"]["readOnly"] is True
        secrets_mounted = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
        assert secrets_mounted == {
            "shoal-cache-curve",
            "shoal-cache-curve-operators",
            "shoal-cache-curve-members",
        }  # no member's secret key comes from the API: it is made on the node
        environ = container_environ(values, node="gpu-2")
        assert environ["SHOAL_CACHE_CLUSTER_CURVE_KEY"] == "/var/lib/shoal/curve/gpu-2.key_secret"
        node_dirs_init = init_named(values, "node-dirs")
        assert (
            "chown 10001:10001 /var/lib/shoal/curve && chmod 0700" in node_dirs_init["command"][-1]
        )
        keygen = init_named(values, "curve-keygen")
        assert "runAsUser" not in keygen["securityContext"]  # the pod's: run_as_user
        assert [c["name"] for c in pod(values)["initContainers"]] == ["node-dirs", "curve-keygen"]
        for version in ("1.36", "1.37"):
            kubernetes_validate.validate(daemon_set(values), version, strict=True)

    def test_member_nodes_is_refused_with_the_new_way_to_admit_a_node(self) -> None:
        with pytest.raises(ValuesError, match="no longer used: .*-members"):
            values_with(cluster={"keys": "per_node", "member_nodes": ["gpu-1"]})

    def test_insecure_mounts_no_secret_and_says_so(self) -> None:
        values = values_with(cluster={"keys": "insecure"})
        assert cache.curve_secrets(values) == {}
        assert not any(name.startswith("shoal-curve") for name in volumes_of(values))
        env = env_of(values)
        assert env["SHOAL_CACHE_CLUSTER_INSECURE"] == "true"
        assert "SHOAL_CACHE_CLUSTER_CURVE_DIR" not in env

    @pytest.mark.parametrize("cluster", [{"keys": "curve"}, {"operators": ["a/b"]}])
    def test_unusable_key_settings_are_refused(self, cluster: dict[str, Any]) -> None:
        with pytest.raises(ValuesError, match="cache.cluster"):
            cache.curve_secrets(values_with(cluster=cluster))

    @pytest.mark.parametrize("keys", ["shared", "per_node"])
    def test_secrets_lists_every_key_secret_the_pod_mounts(self, keys: str) -> None:
        values = values_with(cluster={"keys": keys})
        specs = {spec.name: spec for spec in curve_secrets(values)}
        mounted = {v["secret"]["secretName"] for v in volumes_of(values).values() if "secret" in v}
        assert set(specs) == mounted
        assert specs["shoal-cache-curve"].keys == ("cluster.key", "cluster.key_secret")
        assert specs["shoal-cache-curve-operators"].keys == ("admin.key",)
        assert "--from-file=admin.key=keys/operators/admin.key" in (
            specs["shoal-cache-curve-operators"].create_command
        )


class TestKeyRingReadsKubeletSecretMounts:
    """The daemon's allow-lists as the kubelet lays out a whole-Secret mount."""

    def test_keys_are_admitted_and_revoked_through_the_data_symlinks(self, tmp_path: Path) -> None:
        from kvcache.cluster.security import KeyRing, load_curve_keys

        made = tmp_path / "made"
        for member in ("gpu-1", "gpu-2", None):
            args = argparse.Namespace(dir=str(made), member=member, operator=None, force=False,
                                      json=True)  # fmt: skip
            assert keygen_command(args) == 0
        curve = tmp_path / "curve"
        curve.mkdir()
        for key in ("cluster.key", "cluster.key_secret"):
            (curve / key).write_bytes((made / key).read_bytes())
        public = {n: (made / "members" / f"{n}.key").read_bytes() for n in ("gpu-1", "gpu-2")}
        kubelet_secret_dir(curve / "members", {"gpu-1.key": public["gpu-1"]}, "2026_01_01_1")
        kubelet_secret_dir(curve / "operators", {}, "2026_01_01_1")
        keys = load_curve_keys(str(curve), str(made / "gpu-1.key_secret"))
        ring = KeyRing(str(curve), keys)
        own = keys.public.decode()
        assert ring.role(own) == "member" and ring.pinned_node(own) == "gpu-1"

        both = {f"{n}.key": public[n] for n in ("gpu-1", "gpu-2")}
        kubelet_secret_dir(curve / "members", both, "2026_01_01_2")
        assert ring.reload() is True
        other = load_curve_keys(str(curve), str(made / "gpu-2.key_secret")).public.decode()
        assert ring.role(other) == "member"

        kubelet_secret_dir(curve / "members", {"gpu-1.key": public["gpu-1"]}, "2026_01_01_3")
        assert ring.reload() is True
        assert ring.role(other) is None and ring.role(own) == "member"


class TestPerNodeKeygen:
    """The curve-keygen init container's script, run here with the real `shoal cache keygen`."""

    def script(self, tmp_path: Path) -> tuple[str, dict[str, str]]:
        values = values_with(cluster={"keys": "per_node"})
        text = init_named(values, "curve-keygen")["command"][-1]
        text = text.replace("/var/lib/shoal/curve", str(tmp_path / "node"))
        text = text.replace("/etc/shoal/curve", str(tmp_path / "curve"))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "sleep").write_text("#!/bin/sh\nexit 0\n")  # poll without waiting
        (bin_dir / "sleep").chmod(0o755)
        (bin_dir / "shoal").write_text(f'#!/bin/sh\nexec {sys.executable} -m shoal "$@"\n')
        (bin_dir / "shoal").chmod(0o755)
        environ = {
            **os.environ,
            "NODE_NAME": "gpu-7",
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        }
        (tmp_path / "node").mkdir(mode=0o700, exist_ok=True)
        return text, environ

    def admit_from_log(self, process: subprocess.Popen[str], members: Path) -> str:
        """Do what the log tells the operator: apply the printed patch to the Secret."""
        assert process.stdout is not None
        for line in process.stdout:
            if "kubectl" in line:
                assert line.split()[:7] == [
                    "kubectl",
                    "-n",
                    "shoal",
                    "patch",
                    "secret",
                    "shoal-cache-curve-members",
                    "--type",
                ]
                patch = json.loads(shlex.split(line)[-1])
                ((name, data),) = patch["data"].items()
                kubelet_secret_dir(members, {name: base64.b64decode(data)}, "2026_01_01_1")
                return name
        raise AssertionError("no kubectl command in the log")

    def test_the_key_is_made_on_the_node_printed_and_waited_for(self, tmp_path: Path) -> None:
        text, environ = self.script(tmp_path)
        members = tmp_path / "curve" / "members"
        members.mkdir(parents=True)
        with subprocess.Popen(
            ["sh", "-c", text], env=environ, stdout=subprocess.PIPE, text=True
        ) as process:
            name = self.admit_from_log(process, members)
            assert process.wait(timeout=30) == 0
        assert name == "gpu-7.key"
        secret = tmp_path / "node" / "gpu-7.key_secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        from kvcache.cluster.security import _pinned_node

        assert _pinned_node(members / name) == "gpu-7"
        assert (members / name).read_bytes() == (tmp_path / "node/members/gpu-7.key").read_bytes()

        before = secret.read_bytes()  # a restart keeps the key, and finds it admitted
        again = subprocess.run(["sh", "-c", text], env=environ, capture_output=True, text=True,
                               timeout=30)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "admitted" in again.stdout and "kubectl" not in again.stdout
        assert secret.read_bytes() == before


class TestNodeContract:
    def test_the_daemon_mounts_the_node_dirs_at_their_host_paths(self) -> None:
        values = parse_values({"node_dirs": {"shm_dir": "/dev/shm/x", "runtime_dir": "/run/x"}})
        spec = pod(values)
        assert spec["volumes"][:2] == node_dirs.volumes(values, create=True)
        assert container(values)["volumeMounts"][:2] == node_dirs.mounts(values)
        (init,) = spec["initContainers"]
        assert init == node_dirs.init_container(values)

    @pytest.mark.parametrize("num_slots", [1, 3])
    def test_engine_events_follow_every_slot_on_the_node(self, num_slots: int) -> None:
        values = values_with(num_event_slots=num_slots)
        environ = container_environ(values)
        config = load_config(CacheConfig, "cache", environ=environ, config_path="")
        slots = [node_dirs.event_endpoints(values, slot) for slot in range(num_slots)]
        assert config.engine_endpoints == [pub for pub, _ in slots]
        assert config.engine_replay_endpoints == [replay for _, replay in slots]
        assert config.engine_model == values.engine.model
        assert config.engine_chunk_tokens == values.engine.chunk_tokens
        assert config.engine_tp_size == values.engine.gpus

    def test_no_engine_events_without_kv_events(self) -> None:
        env = env_of(parse_values({"engine": {"kv_events": False}}))
        assert "SHOAL_CACHE_ENGINE_EVENTS" not in env
        assert "SHOAL_CACHE_ENGINE_MODEL" not in env

    def test_an_ssd_tier_gets_its_host_directory_made_and_owned(self) -> None:
        values = values_with(settings={"ssd_dir": "/mnt/nvme/shoal", "ssd_bytes": "100GiB"})
        spec = pod(values)
        assert {
            "name": "shoal-ssd",
            "hostPath": {"path": "/mnt/nvme/shoal", "type": "DirectoryOrCreate"},
        } in spec["volumes"]
        assert {"name": "shoal-ssd", "mountPath": "/mnt/nvme/shoal"} in container(values)[
            "volumeMounts"
        ]
        init = init_named(values, "node-dirs")
        assert "chown 10001:10001 /mnt/nvme/shoal" in init["command"][-1]
        assert {"name": "shoal-ssd", "mountPath": "/mnt/nvme/shoal"} in init["volumeMounts"]
        kubernetes_validate.validate(daemon_set(values), "1.37", strict=True)

    def ssd_guard(self, values: Values) -> list[str]:
        """The guard step of node-dirs, as argv."""
        steps = init_named(values, "node-dirs")["command"][-1].split(" && ")
        (guard,) = [step for step in steps if step.startswith("python3 ")]
        return shlex.split(guard)

    def test_the_ssd_guard_refuses_a_filesystem_with_less_than_ssd_bytes_free(
        self, tmp_path: Path
    ) -> None:
        values = values_with(settings={"ssd_dir": "/mnt/nvme/shoal", "ssd_bytes": "1024TiB"})
        argv = self.ssd_guard(values)
        assert argv[3:] == ["/mnt/nvme/shoal", str(1 << 50), "shoal-default.spill"]
        argv[0], argv[3] = sys.executable, str(tmp_path)
        refused = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1
        assert "refusing to start the SSD tier" in refused.stderr
        assert "Is the NVMe mounted" in refused.stderr

    def test_the_ssd_guard_counts_the_old_spill_file_as_free(self, tmp_path: Path) -> None:
        spill = tmp_path / "shoal-default.spill"
        with spill.open("wb") as out:
            os.posix_fallocate(out.fileno(), 0, 64 << 20)
        st = os.statvfs(tmp_path)
        free = st.f_bavail * st.f_frsize
        values = values_with(settings={"ssd_dir": "/mnt/nvme/shoal", "ssd_bytes": "1GiB"})
        argv = self.ssd_guard(values)
        argv[0], argv[3] = sys.executable, str(tmp_path)
        argv[4] = str(free + (32 << 20))  # more than is free, less than free + the spill file
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
        argv[5] = "shoal-other.spill"  # another daemon's file is not freed at start
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 1

    def test_a_relative_ssd_dir_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="absolute host path"):
            cache.render(values_with(settings={"ssd_dir": "spill"}))
