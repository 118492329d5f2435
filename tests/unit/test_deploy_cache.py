"""The cache daemon's manifests: what `shoal deploy render` gives the node cache DaemonSet."""

from __future__ import annotations

import dataclasses
import re
import shlex
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest

from deploy.components import cache, node_dirs
from deploy.errors import ValuesError
from deploy.sizes import derive, quantity
from deploy.values import Values, parse_values
from kvcache.cluster.discovery import KubernetesDiscovery
from kvcache.cluster.settings import cluster_settings
from kvcache.config import CacheConfig
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


def curve_items(values: Values) -> dict[str, str]:
    volumes = {v["name"]: v for v in pod(values)["volumes"]}
    secret = volumes[cache.CURVE_VOLUME]["secret"]
    assert secret["secretName"] == values.cache.cluster.secret
    return {item["key"]: item["path"] for item in secret["items"]}


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
        assert cache.curve_secret_keys(values) == []
        for obj in objects:
            kubernetes_validate.validate(obj, "1.37", strict=True)


class TestCurveKeys:
    def test_shared_keys_mount_the_legacy_layout(self) -> None:
        values = values_with(cluster={"operators": ["admin", "oncall"]})
        items = curve_items(values)
        assert items == {
            "cluster.key": "cluster.key",
            "cluster.key_secret": "cluster.key_secret",
            "operators.admin.key": "operators/admin.key",
            "operators.oncall.key": "operators/oncall.key",
        }
        assert list(items) == cache.curve_secret_keys(values)
        assert not any(path.startswith("members/") for path in items.values())
        env = env_of(values)
        assert env["SHOAL_CACHE_CLUSTER_CURVE_DIR"] == "/etc/shoal/curve"
        assert env["SHOAL_CACHE_CLUSTER_CURVE_KEY"] == "/etc/shoal/curve/cluster.key_secret"
        mount = next(m for m in container(values)["volumeMounts"] if m["name"] == "shoal-curve")
        assert mount == {"name": "shoal-curve", "mountPath": "/etc/shoal/curve", "readOnly": True}

    def test_per_node_keys_mount_every_member_and_pick_this_nodes_keypair(self) -> None:
        values = values_with(cluster={"keys": "per_node", "member_nodes": ["gpu-1", "gpu-2"]})
        items = curve_items(values)
        assert items == {
            "cluster.key": "cluster.key",
            "cluster.key_secret": "cluster.key_secret",
            "operators.admin.key": "operators/admin.key",
            "members.gpu-1.key": "members/gpu-1.key",
            "members.gpu-2.key": "members/gpu-2.key",
            "gpu-1.key_secret": "gpu-1.key_secret",
            "gpu-2.key_secret": "gpu-2.key_secret",
        }
        assert list(items) == cache.curve_secret_keys(values)
        environ = container_environ(values, node="gpu-2")
        assert environ["SHOAL_CACHE_CLUSTER_CURVE_KEY"] == "/etc/shoal/curve/gpu-2.key_secret"
        for version in ("1.36", "1.37"):
            kubernetes_validate.validate(daemon_set(values), version, strict=True)

    def test_per_node_without_member_nodes_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="member_nodes: keys per_node needs"):
            cache.render(values_with(cluster={"keys": "per_node"}))

    def test_insecure_mounts_no_secret_and_says_so(self) -> None:
        values = values_with(cluster={"keys": "insecure"})
        assert cache.curve_secret_keys(values) == []
        assert "shoal-curve" not in {v["name"] for v in pod(values)["volumes"]}
        env = env_of(values)
        assert env["SHOAL_CACHE_CLUSTER_INSECURE"] == "true"
        assert "SHOAL_CACHE_CLUSTER_CURVE_DIR" not in env

    @pytest.mark.parametrize(
        "cluster",
        [{"keys": "curve"}, {"operators": ["a/b"]}, {"keys": "per_node", "member_nodes": ["x y"]}],
    )
    def test_unusable_key_settings_are_refused(self, cluster: dict[str, Any]) -> None:
        with pytest.raises(ValuesError, match="cache.cluster"):
            cache.curve_secret_keys(values_with(cluster=cluster))


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
        (init,) = spec["initContainers"]
        assert "chown 10001:10001 /mnt/nvme/shoal" in init["command"][-1]
        assert {"name": "shoal-ssd", "mountPath": "/mnt/nvme/shoal"} in init["volumeMounts"]
        kubernetes_validate.validate(daemon_set(values), "1.37", strict=True)

    def test_a_relative_ssd_dir_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="absolute host path"):
            cache.render(values_with(settings={"ssd_dir": "spill"}))
