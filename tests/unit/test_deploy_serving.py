"""The serving components of `shoal deploy`: the vLLM engine, the router and Redis."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from deploy.components import engine, node_dirs, redis, router
from deploy.errors import ValuesError
from deploy.sizes import derive, quantity
from deploy.values import Values, parse_values
from router.config import RouterSettings
from shoal.config import load_config

GiB = 1 << 30
WITH_LOADER = {"engine": {"loader": {"uri": "s3://weights/qwen3/", "s3_secret": "s3-creds"}}}


def objects(values: Values) -> list[dict[str, Any]]:
    return engine.render(values) + router.render(values) + redis.render(values)


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def pod(values: Values, name: str) -> dict[str, Any]:
    return find(objects(values), "Deployment", name)["spec"]["template"]["spec"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    every = spec["containers"] + spec.get("initContainers", [])
    (match,) = [c for c in every if c["name"] == name]
    return match


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


class TestSchema:
    @pytest.mark.parametrize("version", ["1.36", "1.37"])
    @pytest.mark.parametrize(
        "document",
        [{}, WITH_LOADER, {"engine": {"kv_events": False, "connector": False}},
         {"router": {"api_keys_secret": "", "insecure_no_auth": True, "replicas": 1},
          "redis": {"enabled": False}}],
        ids=["defaults", "loader", "plain-vllm", "no-auth-no-redis"],
    )  # fmt: skip
    def test_every_object_validates_strictly(self, document: dict, version: str) -> None:
        rendered = objects(parse_values(document))
        assert {o["kind"] for o in rendered} >= {"Deployment", "Service", "ServiceAccount"}
        for obj in rendered:
            kubernetes_validate.validate(obj, version, strict=True)

    def test_defaults_render_all_three(self) -> None:
        names = {(o["kind"], o["metadata"]["name"]) for o in objects(parse_values({}))}
        assert {("Deployment", "vllm"), ("Deployment", "shoal-router"),
                ("Deployment", "shoal-redis"), ("Role", "shoal-router")} <= names  # fmt: skip


class TestEngineContract:
    def test_connector_endpoint_is_the_daemons_socket(self) -> None:
        values = parse_values({"node_dirs": {"runtime_dir": "/run/x"}})
        args = container(pod(values, "vllm"), "vllm")["command"]
        transfer = json.loads(flag(args, "--kv-transfer-config"))
        assert transfer["kv_connector"] == "ShoalConnector"
        assert transfer["kv_connector_module_path"] == "kvcache.connector.vllm"
        extra = transfer["kv_connector_extra_config"]
        assert (
            extra["endpoint"]
            == node_dirs.daemon_socket(values)
            == "ipc:///run/x/shoal-default.sock"
        )
        assert extra["chunk_tokens"] == values.engine.chunk_tokens

    def test_extra_config_keys_are_the_connectors(self) -> None:
        from kvcache.connector.settings import ConnectorSettings

        args = container(pod(parse_values({}), "vllm"), "vllm")["command"]
        extra = json.loads(flag(args, "--kv-transfer-config"))["kv_connector_extra_config"]
        ConnectorSettings.from_extra_config(extra, environ={})  # raises on an unknown key

    def test_arena_dir_and_mounts_are_the_node_dirs(self) -> None:
        values = parse_values({"node_dirs": {"shm_dir": "/dev/shm/arena"}})
        spec = pod(values, "vllm")
        vllm = container(spec, "vllm")
        assert env_of(vllm)["SHOAL_CACHE_SHM_DIR"] == "/dev/shm/arena"
        assert node_dirs.arena_path(values).startswith(env_of(vllm)["SHOAL_CACHE_SHM_DIR"] + "/")
        assert all(m in vllm["volumeMounts"] for m in node_dirs.mounts(values))
        assert all(v in spec["volumes"] for v in node_dirs.volumes(values, create=False))

    def test_same_uid_and_host_pid_as_the_daemon(self) -> None:
        values = parse_values({"run_as_user": 4242, "cache": {"share_host_pid": True}})
        spec = pod(values, "vllm")
        assert spec["securityContext"]["runAsUser"] == 4242
        assert spec["hostPID"] is True

    def test_vllm_claims_a_kv_event_slot_by_a_lock_in_the_runtime_dir(self) -> None:
        values = parse_values({"node_dirs": {"runtime_dir": "/run/x"}})
        command = container(pod(values, "vllm"), "vllm")["command"]
        assert command[:2] == ["sh", "-c"]
        assert command[4:] == engine.vllm_args(values)  # "$@": every other argument as is
        script = command[2]
        assert "while [ $i -lt 8 ]" in script  # cache.num_event_slots' default
        assert "9>/run/x/gpu$i.lock && flock -n 9" in script
        assert '"ipc:///run/x/gpu$i.pub' in script.replace('\\"', '"')
        assert "--kv-events-config" not in engine.vllm_args(values)

    def test_engines_spread_over_nodes_by_preference_only(self) -> None:
        values = parse_values({})
        spec = pod(values, "vllm")
        assert "affinity" not in spec  # several engines per node: each claims its own slot
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert spread["labelSelector"]["matchLabels"] == engine.engine_selector(values)

    @pytest.mark.parametrize(
        "document",
        [{"engine": {"kv_events": False}}, {"cache": {"num_event_slots": 0}},
         {"cache": {"enabled": False}}],
        ids=["kv-events-off", "no-slots", "no-daemon"],
    )  # fmt: skip
    def test_no_slot_claim_without_a_daemon_following_slots(self, document: dict) -> None:
        values = parse_values(document)
        command = container(pod(values, "vllm"), "vllm")["command"]
        assert command == engine.vllm_args(values)
        assert "--kv-events-config" not in command

    def test_a_runtime_dir_the_script_cannot_hold_unquoted_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="node_dirs.runtime_dir"):
            engine.render(parse_values({"node_dirs": {"runtime_dir": '/run/"x'}}))


class TestSlotScript:
    """The start script run by a real ``sh`` (dash on Ubuntu, as in the vLLM image), with a
    stand-in for vLLM that prints its arguments and stays up for a while, holding its lock."""

    STAND_IN = [sys.executable, "-c",
                "import sys, json, time; print(json.dumps(sys.argv[1:]), flush=True); "
                "time.sleep(float(sys.argv[1]))"]  # fmt: skip

    def run(self, values: Values, seconds: float) -> tuple[dict[str, Any] | None, str]:
        """Start the script; once the stand-in is up (its lock taken, if any), return the
        events config it was given and what the script said on stderr."""
        script = engine.slot_script(values)
        process = subprocess.Popen(
            ["sh", "-c", script, "vllm-slot", *self.STAND_IN, str(seconds), "--port", "8000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stdout is not None
        args = json.loads(process.stdout.readline())
        self.processes.append(process)
        assert args[1:3] == ["--port", "8000"]  # the other arguments pass through as they are
        if "--kv-events-config" not in args:
            return None, process.communicate(timeout=20)[1]
        return json.loads(flag(args, "--kv-events-config")), ""

    @pytest.mark.skipif(not shutil.which("flock"), reason="util-linux flock")
    def test_each_engine_takes_a_free_slot_and_a_surplus_one_runs_without(
        self, tmp_path: Path
    ) -> None:
        values = parse_values({"node_dirs": {"runtime_dir": str(tmp_path)},
                               "cache": {"num_event_slots": 2}})  # fmt: skip
        self.processes: list[subprocess.Popen[str]] = []
        try:
            self.claims_in_order(values, tmp_path)
        finally:
            for process in self.processes:
                process.kill()
                process.communicate(timeout=20)

    def claims_in_order(self, values: Values, tmp_path: Path) -> None:
        first, _ = self.run(values, 30)
        second, _ = self.run(values, 30)
        surplus, message = self.run(values, 0)
        assert first == {"enable_kv_cache_events": True, "publisher": "zmq",
                         "endpoint": f"ipc://{tmp_path}/gpu0.pub",
                         "replay_endpoint": f"ipc://{tmp_path}/gpu0.replay"}  # fmt: skip
        assert second is not None
        assert (second["endpoint"], second["replay_endpoint"]) == node_dirs.event_endpoints(
            values, 1
        )
        assert surplus is None
        assert "no free KV-event slot" in message and "cache.num_event_slots (2)" in message
        self.processes[0].kill()  # a crashed engine's slot is free at once
        self.processes[0].wait(timeout=20)
        again, _ = self.run(values, 0)
        assert again is not None and again["endpoint"].endswith("/gpu0.pub")


class TestDrain:
    def test_vllm_finishes_in_flight_requests_for_drain_s(self) -> None:
        values = parse_values({"engine": {"drain_s": 300}})
        assert flag(engine.vllm_args(values), "--shutdown-timeout") == "300"

    def test_routers_drop_the_pod_before_vllm_is_told_to_stop(self) -> None:
        values = parse_values({"engine": {"drain_s": 300}})
        spec = pod(values, "vllm")
        sleep = container(spec, "vllm")["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep == engine.PRESTOP_SLEEP_S == 10
        assert spec["terminationGracePeriodSeconds"] == sleep + 300 + 15

    def test_a_negative_drain_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="engine.drain_s"):
            engine.render(parse_values({"engine": {"drain_s": -1}}))


class TestExtraArgs:
    @pytest.mark.parametrize(
        ("arg", "field"),
        [("--port", "engine.port"), ("--port=9000", "engine.port"),
         ("--tensor_parallel_size", "engine.gpus"), ("-tp", "engine.gpus"),
         ("--kv-transfer-config.kv_connector", "engine.connector"),
         ("--kv-events-config", "engine.kv_events"), ("--host", "0.0.0.0"),
         ("--served-model-name", "engine.model"), ("--load-format=auto", "engine.loader.uri"),
         ("--model-loader-extra-config", "engine.loader"),
         ("--shutdown-timeout", "engine.drain_s")],
    )  # fmt: skip
    def test_flags_the_deployment_sets_are_refused(self, arg: str, field: str) -> None:
        values = parse_values({"engine": {"extra_args": [arg, "x"]}})
        with pytest.raises(ValuesError, match=rf"engine.extra_args: .*{re.escape(field)}"):
            engine.render(values)

    def test_every_owned_flag_is_one_the_renderer_sets(self) -> None:
        values = parse_values(
            {
                **WITH_LOADER,
                "engine": {**WITH_LOADER["engine"], "extra_args": ["--max-model-len", "8"]},
            }
        )
        words = set(engine.vllm_args(values)) | {"--kv-events-config"}
        assert set(engine.OWNED_FLAGS) <= words
        assert engine.vllm_args(values)[-2:] == ["--max-model-len", "8"]


class TestCredentials:
    def test_hf_token_from_the_secret(self) -> None:
        vllm = container(pod(parse_values({"engine": {"hf_token_secret": "hf"}}), "vllm"), "vllm")
        (token,) = [e for e in vllm["env"] if e["name"] == "HF_TOKEN"]
        assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}

    def test_no_hf_token_by_default(self) -> None:
        vllm = container(pod(parse_values({}), "vllm"), "vllm")
        assert "HF_TOKEN" not in {e["name"] for e in vllm["env"]}

    def test_vllm_has_the_s3_credentials_for_its_origin_fallback(self) -> None:
        spec = pod(parse_values(WITH_LOADER), "vllm")
        assert container(spec, "vllm")["envFrom"] == container(spec, "loader")["envFrom"]
        assert "envFrom" not in container(pod(parse_values({}), "vllm"), "vllm")

    def test_dev_shm_is_memory_sized_from_derive(self) -> None:
        values = parse_values(WITH_LOADER)
        spec = pod(values, "vllm")
        (dshm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        assert dshm["emptyDir"] == {
            "medium": "Memory",
            "sizeLimit": quantity(derive(values).engine_shm_bytes),
        }
        for name in ("vllm", "loader"):
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container(spec, name)[
                "volumeMounts"
            ]

    def test_memory_request_equals_limit_from_derive(self) -> None:
        values = parse_values({})
        resources = container(pod(values, "vllm"), "vllm")["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
        assert resources["limits"]["memory"] == quantity(derive(values).engine_memory_bytes)
        assert resources["limits"]["nvidia.com/gpu"] == "1"

    def test_startup_probe_covers_startup_s(self) -> None:
        values = parse_values({"engine": {"startup_s": 905}})
        probe = container(pod(values, "vllm"), "vllm")["startupProbe"]
        assert probe["httpGet"]["path"] == "/health"
        assert probe["failureThreshold"] * probe["periodSeconds"] >= 905

    def test_service_selects_this_deployments_pods(self) -> None:
        values = parse_values({"engine": {"name": "llama"}})
        service = find(objects(values), "Service", "llama")
        assert service["spec"]["selector"] == engine.engine_selector(values)
        assert service["spec"]["selector"]["app.kubernetes.io/instance"] == "llama"
        labels = find(objects(values), "Deployment", "llama")["spec"]["template"]["metadata"]
        assert service["spec"]["selector"].items() <= labels["labels"].items()


class TestReplicas:
    def test_the_autoscaler_owns_the_engine_replicas(self) -> None:
        deployment = find(objects(parse_values({})), "Deployment", "vllm")
        assert "replicas" not in deployment["spec"]  # `kubectl apply` must not undo a scale

    def test_without_the_autoscaler_the_values_set_them(self) -> None:
        values = parse_values({"autoscaler": {"enabled": False}, "engine": {"replicas": 3}})
        assert find(objects(values), "Deployment", "vllm")["spec"]["replicas"] == 3


class TestLoader:
    def test_is_a_native_sidecar_serving_in_a_pod_local_dir(self) -> None:
        spec = pod(parse_values(WITH_LOADER), "vllm")
        (loader,) = spec["initContainers"]
        assert loader["name"] == "loader"
        assert loader["restartPolicy"] == "Always"
        assert loader["command"] == ["shoal", "loader", "serve"]
        settings = env_of(loader)
        assert settings["SHOAL_LOADER_ALLOW"] == "s3://weights/qwen3/"
        assert settings["SHOAL_LOADER_SHM_DIR"] == "/dev/shm"
        assert settings["SHOAL_LOADER_RUNTIME_DIR"] == engine.LOADER_RUNTIME_DIR
        assert loader["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert "shoal loader" in " ".join(loader["startupProbe"]["exec"]["command"])

    def test_vllm_streams_through_the_sidecars_socket(self) -> None:
        values = parse_values(WITH_LOADER)
        args = container(pod(values, "vllm"), "vllm")["command"]
        assert flag(args, "--load-format") == "shoal"
        extra = json.loads(flag(args, "--model-loader-extra-config"))
        socket = engine.loader_socket(values)
        assert extra == {"model_weights": f"peer+unix://{socket}/s3://weights/qwen3/"}
        from loader.sources.peer import parse_peer_uri

        assert parse_peer_uri(extra["model_weights"]) == (f"unix:{socket}", "s3://weights/qwen3/")

    def test_without_a_uri_vllm_loads_the_model_itself(self) -> None:
        spec = pod(parse_values({}), "vllm")
        assert "initContainers" not in spec
        assert "--load-format" not in container(spec, "vllm")["command"]

    def test_deployment_owned_settings_are_refused(self) -> None:
        document = {"engine": {"loader": {"uri": "s3://w/m/", "settings": {"allow": "*"}}}}
        with pytest.raises(ValuesError, match=r"\['allow'\] are set by the deployment"):
            engine.render(parse_values(document))


class TestRouter:
    def test_env_parses_through_router_settings(self) -> None:
        values = parse_values({"router": {"settings": {"strategy": "least-request"}}})
        environ = env_of(container(pod(values, "shoal-router"), "router"))
        settings = load_config(RouterSettings, "router", flags={}, environ=environ, config_path="")
        assert settings.host == "0.0.0.0"
        assert settings.discovery == "k8s"
        assert settings.engines == "shoal/vllm:http"
        assert settings.strategy == "least-request"
        assert settings.api_keys == "/etc/shoal/router-api-keys/api-keys"
        assert settings.autoscaler_url == "http://shoal-autoscaler.shoal.svc:8090"
        assert settings.autoscaler_token_file == "/etc/shoal/control-token/token"
        assert settings.log_format == "json"

    def test_engines_carry_the_gpu_type(self) -> None:
        values = parse_values({"namespace": "prod", "engine": {"gpu_type": "H100"}})
        environ = env_of(container(pod(values, "shoal-router"), "router"))
        assert environ["SHOAL_ROUTER_ENGINES"] == "prod/vllm:http@H100"

    def test_rbac_covers_listing_endpointslices(self) -> None:
        rendered = objects(parse_values({}))
        (rule,) = find(rendered, "Role", "shoal-router")["rules"]
        assert rule["apiGroups"] == ["discovery.k8s.io"]
        assert "endpointslices" in rule["resources"] and "list" in rule["verbs"]
        binding = find(rendered, "RoleBinding", "shoal-router")
        assert (
            binding["subjects"][0]["name"]
            == pod(parse_values({}), "shoal-router")["serviceAccountName"]
        )

    def test_health_watchers_are_polled_only_for_engines_with_gpu_names(self) -> None:
        from deploy.components import health

        def router_settings(document: dict[str, Any]) -> RouterSettings:
            environ = env_of(container(pod(parse_values(document), "shoal-router"), "router"))
            return load_config(RouterSettings, "router", flags={}, environ=environ,
                               config_path="")  # fmt: skip

        # k8s-discovered engines carry no GPU names: polling could never take one out
        settings = router_settings({"namespace": "prod"})
        assert settings.discovery == "k8s" and settings.gpu_health_urls == ()
        assert settings.gpu_health_token_file == ""
        # the Ray fleet's do: every watcher through the headless Service, no cluster domain
        settings = router_settings({"namespace": "prod", "engine": {"enabled": False},
                                    "fleet": {"enabled": True, "ray_address": "ray://h:1"}})  # fmt: skip
        assert settings.gpu_health_urls == (f"dns+http://{health.NAME}.prod.svc:{health.PORT}",)
        assert settings.gpu_health_token_file == "/etc/shoal/control-token/token"
        off = router_settings({"namespace": "prod", "engine": {"enabled": False},
                               "fleet": {"enabled": True, "ray_address": "ray://h:1"},
                               "health": {"enabled": False}})  # fmt: skip
        assert off.gpu_health_urls == () and off.gpu_health_token_file == ""

    def test_with_the_fleet_engines_come_from_its_discovery_endpoint(self) -> None:
        document = {"namespace": "prod", "engine": {"enabled": False},
                    "fleet": {"enabled": True, "ray_address": "ray://head:10001"},
                    "autoscaler": {"enabled": False}}  # fmt: skip
        values = parse_values(document)
        spec = pod(values, "shoal-router")
        environ = env_of(container(spec, "router"))
        settings = load_config(RouterSettings, "router", flags={}, environ=environ, config_path="")
        assert settings.discovery == "http"
        assert settings.engines == "http://shoal-engines-fleet.prod.svc:8093/v1/discovery"
        assert settings.discovery_token_file == "/etc/shoal/control-token/token"
        mount = next(m for m in container(spec, "router")["volumeMounts"]
                     if m["name"] == "control-token")  # fmt: skip
        assert mount["mountPath"] == "/etc/shoal/control-token"
        # no Kubernetes API call: no Role, no binding, no service-account token
        rendered = router.render(values)
        assert {o["kind"] for o in rendered} == {"ServiceAccount", "Service", "Deployment"}
        assert spec["automountServiceAccountToken"] is False
        for obj in rendered:
            for version in ("1.36", "1.37"):
                kubernetes_validate.validate(obj, version, strict=True)

    def test_the_fleet_and_the_engine_deployment_together_are_refused(self) -> None:
        document = {"fleet": {"enabled": True, "ray_address": "ray://head:10001"}}
        with pytest.raises(ValuesError, match="set engine.enabled: false to serve the Ray"):
            router.render(parse_values(document))

    def test_redis_url_points_at_the_redis_service(self) -> None:
        values = parse_values({"namespace": "prod"})
        environ = env_of(container(pod(values, "shoal-router"), "router"))
        service = find(objects(values), "Service", redis.NAME)
        (port,) = service["spec"]["ports"]
        expected = f"redis://{service['metadata']['name']}.prod.svc:{port['port']}/0"
        assert environ["SHOAL_ROUTER_REDIS"] == expected

    def test_external_redis_renders_no_redis(self) -> None:
        values = parse_values({"redis": {"url": "rediss://r.example:6380/1"}})
        assert redis.render(values) == []
        environ = env_of(container(pod(values, "shoal-router"), "router"))
        assert environ["SHOAL_ROUTER_REDIS"] == "rediss://r.example:6380/1"

    def test_replicas_without_redis_are_refused(self) -> None:
        with pytest.raises(ValuesError, match="replicas need shared state"):
            router.render(parse_values({"redis": {"enabled": False}}))

    def test_one_replica_without_redis_keeps_memory_state(self) -> None:
        values = parse_values({"redis": {"enabled": False}, "router": {"replicas": 1}})
        assert "SHOAL_ROUTER_REDIS" not in env_of(container(pod(values, "shoal-router"), "router"))

    def test_neither_api_keys_nor_insecure_is_refused(self) -> None:
        with pytest.raises(ValuesError, match="no API keys"):
            router.render(parse_values({"router": {"api_keys_secret": ""}}))

    def test_insecure_without_a_secret_serves_without_auth(self) -> None:
        values = parse_values({"router": {"api_keys_secret": "", "insecure_no_auth": True}})
        spec = pod(values, "shoal-router")
        assert env_of(container(spec, "router"))["SHOAL_ROUTER_INSECURE_NO_AUTH"] == "true"
        assert all(v["name"] != "api-keys" for v in spec["volumes"])

    @pytest.mark.parametrize("precise", [False, True])
    def test_precise_is_not_yet_supported(self, precise: bool) -> None:
        values = parse_values({"router": {"precise": precise}})
        if not precise:
            environ = env_of(container(pod(values, "shoal-router"), "router"))
            assert "SHOAL_ROUTER_CACHE_SOCKET" not in environ
            return
        with pytest.raises(ValuesError, match="not yet supported on Kubernetes"):
            router.render(values)

    def test_admin_routes_listen_on_their_own_port_behind_a_cluster_ip_service(self) -> None:
        values = parse_values({"namespace": "prod", "router": {"service_type": "LoadBalancer"}})
        rendered = router.render(values)
        public = find(rendered, "Service", router.NAME)
        admin = find(rendered, "Service", router.ADMIN_NAME)
        assert public["spec"]["type"] == "LoadBalancer"
        assert [p["name"] for p in public["spec"]["ports"]] == ["http"]  # never the admin port
        assert admin["spec"]["type"] == "ClusterIP"
        assert admin["spec"]["ports"] == [{"name": "admin", "port": 9091, "targetPort": "admin"}]
        assert admin["spec"]["selector"] == public["spec"]["selector"]
        assert admin["metadata"]["labels"].items() >= router.ADMIN_LABELS.items()
        assert router.ADMIN_LABELS.items() - public["metadata"]["labels"].items()
        spec = pod(values, "shoal-router")
        c = container(spec, "router")
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "admin": 9091}
        settings = load_config(RouterSettings, "router", flags={}, environ=env_of(c),
                               config_path="")  # fmt: skip
        assert (settings.admin_port, settings.admin_host) == (9091, "0.0.0.0")
        token = "/etc/shoal/control-token/token"
        assert settings.admin_token_file == token  # beyond loopback: the control token
        mount = next(m for m in c["volumeMounts"] if m["name"] == "control-token")
        assert token.startswith(mount["mountPath"] + "/")
        assert router.admin_url(values) == "http://shoal-router-admin.prod.svc:9091"

    @pytest.mark.parametrize("admin_port", [8080, 0, 70000])
    def test_an_admin_port_that_is_the_main_one_or_out_of_range_is_refused(
        self, admin_port: int
    ) -> None:
        with pytest.raises(ValuesError, match="router.admin_port"):
            router.render(parse_values({"router": {"admin_port": admin_port}}))

    @pytest.mark.parametrize("name", ["admin_port", "admin_host", "admin_token_file"])
    def test_admin_settings_come_from_the_values(self, name: str) -> None:
        with pytest.raises(ValuesError, match=rf"\['{name}'\] are set from the values"):
            router.render(parse_values({"router": {"settings": {name: "x"}}}))

    @pytest.mark.parametrize(("shutdown_s", "grace"), [(None, 25), (30, 45), (2.5, 18)])
    def test_termination_waits_for_endpoints_then_requests_in_flight(
        self, shutdown_s: float | None, grace: int
    ) -> None:
        document = {"router": {"settings": {"shutdown_timeout_s": shutdown_s}}}
        spec = pod(parse_values(document if shutdown_s else {}), "shoal-router")
        sleep = container(spec, "router")["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep == router.PRESTOP_SLEEP_S == 10
        assert spec["terminationGracePeriodSeconds"] == grace  # 10 + shutdown + 5
        assert spec["terminationGracePeriodSeconds"] >= sleep + (shutdown_s or 10) + 5

    def test_owned_settings_are_refused(self) -> None:
        with pytest.raises(ValuesError, match=r"\['port'\] are set from the values"):
            router.render(parse_values({"router": {"settings": {"port": 9000}}}))

    def test_replicas_spread_over_nodes_and_probe_health(self) -> None:
        spec = pod(parse_values({}), "shoal-router")
        (spread,) = spec["topologySpreadConstraints"]
        assert spread["topologyKey"] == "kubernetes.io/hostname"
        assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
        assert container(spec, "router")["readinessProbe"]["httpGet"]["path"] == "/health"
        assert spec["automountServiceAccountToken"] is True


class TestRedis:
    def test_maxmemory_is_80_percent_of_the_limit(self) -> None:
        values = parse_values({"redis": {"memory_bytes": "1GiB"}})
        c = container(pod(values, redis.NAME), "redis")
        assert flag(c["command"], "--maxmemory") == str(GiB * 8 // 10)
        assert c["resources"]["limits"]["memory"] == "1024Mi"
        assert flag(c["command"], "--save") == ""
        assert flag(c["command"], "--appendonly") == "no"

    def test_runs_as_the_images_redis_user(self) -> None:
        spec = pod(parse_values({}), redis.NAME)
        assert spec["securityContext"]["runAsUser"] == 999
        assert spec["securityContext"]["runAsNonRoot"] is True
        probe = container(spec, "redis")["readinessProbe"]
        assert probe["exec"]["command"] == ["redis-cli", "ping"]
