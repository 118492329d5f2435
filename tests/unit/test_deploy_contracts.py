"""Specification of deploy/checks' cross-object contracts (contracts a-l): each passes the
well-formed hand-built stack (tests/unit/deploy_stack.py) and names the one violation planted
in it.
"""

from __future__ import annotations

import json

import pytest

from deploy.checks import contracts as c
from deploy.objects import selector
from deploy.values import Values
from tests.unit.deploy_stack import (
    CURVE,
    RUN,
    SOCKET,
    Obj,
    _env,
    _find,
    _messages,
    _meta,
    _monitor,
    _pod,
    _stack,
    _values,
)


@pytest.fixture
def values() -> Values:
    return _values()


@pytest.fixture
def stack(values: Values) -> list[Obj]:
    return _stack(values)


# --- contracts ------------------------------------------------------------------------------


class TestContracts:
    def test_the_stack_keeps_every_contract(self, stack: list[Obj], values: Values) -> None:
        assert c.contract_problems(stack, values) == []

    def test_a_one_uid(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["initContainers"][0]["securityContext"]["runAsUser"] = 0
        assert [p.message for p in c.one_uid(stack, values)] == [
            "container loader mounts a node dir but runs with runAsUser 0, not 10001 "
            "(values.run_as_*)"
        ]

    def test_b_one_shm_path(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["containers"][0]["env"][0]["value"] = "/dev/shm"
        assert [p.message for p in c.one_shm_path(stack, values)] == [
            "engine container vllm: SHOAL_CACHE_SHM_DIR '/dev/shm' != the daemon's '/dev/shm/shoal'"
        ]

    def test_b_the_connector_endpoint_is_the_daemons_socket(
        self, stack: list[Obj], values: Values
    ) -> None:
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"][-1] = vllm["command"][-1].replace("shoal-default", "shoal-other")
        (problem,) = c.one_shm_path(stack, values)
        assert "the connector endpoint 'ipc:///run/shoal/shoal-other.sock'" in problem.message

    def test_b_the_shm_dir_is_a_host_path(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][0] = {"name": "shoal-shm", "emptyDir": {}}
        (problem,) = c.one_shm_path(stack, values)
        assert (
            problem.where == "Deployment/shoal/vllm" and "is not the host path" in problem.message
        )

    def test_c_same_host_pid(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["hostPID"] = True
        (problem,) = c.same_host_pid(stack, values)
        assert problem.where == "Deployment/shoal/vllm"
        assert problem.message.startswith("hostPID False differs from the cache daemon's [True]")

    def test_d_a_dialed_service_must_exist(self, stack: list[Obj], values: Values) -> None:
        stack.remove(_find(stack, "Service", "shoal-autoscaler"))
        assert _messages(c.dialed_services(stack, values)) == [
            "[contract] Deployment/shoal/shoal-router container router: dials "
            "shoal/shoal-autoscaler:8090 (SHOAL_ROUTER_AUTOSCALER_URL): no such Service is rendered"
        ]

    def test_d_the_service_must_have_the_port(self, stack: list[Obj], values: Values) -> None:
        _find(stack, "Service", "vllm")["spec"]["ports"][0]["name"] = "web"
        (problem,) = c.dialed_services(stack, values)
        assert (
            problem.message == "dials shoal/vllm:http (SHOAL_ROUTER_ENGINES): the Service "
            "has no such port"
        )

    def test_d_the_service_must_select_a_pod_exposing_it(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["ports"] = []
        (problem,) = c.dialed_services(stack, values)
        assert problem.message.endswith("the Service selects no rendered pod exposing port http")

    def test_d_a_monitors_port_must_be_a_container_port(
        self, stack: list[Obj], values: Values
    ) -> None:
        stack.append(_monitor(port="prom"))
        (problem,) = c.dialed_services(stack, values)
        assert problem.where == "PodMonitor/shoal/shoal-cache"

    def test_e_known_settings(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]["env"].append(
            {"name": "SHOAL_CACHE_ARENA_BYTES", "value": "1GiB"}
        )
        _pod(stack, "Deployment", "vllm")["containers"][0]["env"].append(
            {"name": "SHOAL_CONNECTOR_ENDPOINT", "value": SOCKET}
        )
        assert [p.message for p in c.known_settings(stack, values)] == [
            "SHOAL_CACHE_ARENA_BYTES: CacheConfig has no setting 'arena_bytes'"
        ]

    def test_f_the_daemon_limit_covers_its_tiers(self, stack: list[Obj], values: Values) -> None:
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["resources"] = {"requests": {"memory": "20Gi"}, "limits": {"memory": "20Gi"}}
        (problem,) = c.memory(stack, values)
        assert problem.message.startswith("memory limit 21474836480 < shm + dram + io staging")

    def test_f_dev_shm_covers_the_loaders_capacity(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][2]["emptyDir"]["sizeLimit"] = "16Gi"
        (problem,) = c.memory(stack, values)
        assert problem.where == "Deployment/shoal/vllm" and "34359738368 bytes" in problem.message

    def test_f_requests_equal_limits(self, stack: list[Obj], values: Values) -> None:
        init = _pod(stack, "DaemonSet", "shoal-cache")["initContainers"][0]
        init["resources"]["requests"]["memory"] = "16Mi"
        assert [p.message for p in c.memory(stack, values)] == [
            "memory request 16777216 != limit 67108864 (they must be equal)"
        ]

    def test_g_a_referenced_secret_must_be_listed(self, stack: list[Obj]) -> None:
        values = _values(router={"api_keys_secret": ""})
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "volume api-keys uses Secret shoal-router-api-keys, which deploy.secrets does not list"
        ]

    def test_g_a_used_key_must_be_listed(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][1]["value"] = "/etc/shoal/api-keys/keys.txt"
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "env SHOAL_ROUTER_API_KEYS uses key keys.txt of Secret shoal-router-api-keys; "
            "deploy.secrets lists ['api-keys']"
        ]

    def test_i_a_listener_beyond_loopback_needs_auth(
        self, stack: list[Obj], values: Values
    ) -> None:
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["env"] = [e for e in daemon["env"] if e["name"] != "SHOAL_CACHE_CLUSTER_CURVE_DIR"]
        assert [p.message for p in c.auth_beyond_loopback(stack, values)] == [
            "SHOAL_CACHE_CLUSTER_HOST=0.0.0.0 listens beyond loopback without "
            "SHOAL_CACHE_CLUSTER_CURVE_DIR (or SHOAL_CACHE_CLUSTER_INSECURE=true)"
        ]

    def test_j_service_links_must_be_off(self, stack: list[Obj], values: Values) -> None:
        assert c.no_service_links(stack, values) == []
        del _pod(stack, "Deployment", "shoal-router")["enableServiceLinks"]
        (problem,) = c.no_service_links(stack, values)
        assert problem.where == "Deployment/shoal/shoal-router"
        assert "VLLM_PORT" in problem.message

    def test_h_an_alert_on_a_metric_shoal_does_not_export(self, values: Values) -> None:
        rule = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "shoal", "namespace": "shoal"},
            "spec": {
                "groups": [
                    {
                        "name": "shoal",
                        "rules": [
                            {"alert": "Good", "expr": "rate(shoal_kvcache_no_space_total[5m]) > 0"},
                            {
                                "alert": "Hist",
                                "expr": "histogram_quantile(0.9, shoal_router_held_seconds_bucket)",
                            },
                            {"alert": "Bad", "expr": "rate(shoal_kvcache_no_spaces_total[5m]) > 0"},
                        ],
                    }
                ]
            },
        }
        assert [p.message for p in c.alert_metrics([rule], values)] == [
            "Bad: shoal_kvcache_no_spaces_total is not a metric Shoal exports "
            "(deploy/metrics_catalogue.py)"
        ]

    def test_i_an_explicit_insecure_flag_is_enough(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][1] = {"name": "SHOAL_ROUTER_INSECURE_NO_AUTH", "value": "true"}
        assert c.auth_beyond_loopback(stack, values) == []

    def test_b_the_kv_events_endpoints_are_ones_the_daemon_follows(self, stack: list[Obj]) -> None:
        values = _values(cache={"num_event_slots": 2})
        events = {
            "endpoint": f"ipc://{RUN}/gpu$i.pub",
            "replay_endpoint": f"ipc://{RUN}/gpu$i.replay",
        }
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"] = [
            "sh",
            "-c",
            f"exec vllm serve m --kv-events-config '{json.dumps(events)}'",
        ]
        daemon = _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]
        daemon["env"] += _env(
            SHOAL_CACHE_ENGINE_EVENTS=f"ipc://{RUN}/gpu0.pub",
            SHOAL_CACHE_ENGINE_EVENTS_REPLAY=f"ipc://{RUN}/gpu0.replay",
        )
        (problem,) = c.one_shm_path(stack, values)
        assert "the KV-events endpoint ipc:///run/shoal/gpu1.pub is not among" in problem.message
        vllm["command"] = [
            "vllm",
            "serve",
            "--kv-events-config",
            json.dumps({"endpoint": "ipc:///tmp/gpu0.pub"}),
        ]
        assert len(c.one_shm_path(stack, values)) == 2  # not under the runtime dir, not followed

    def test_b_the_last_copy_of_a_repeated_flag_is_the_one_checked(
        self, stack: list[Obj], values: Values
    ) -> None:
        vllm = _pod(stack, "Deployment", "vllm")["containers"][0]
        vllm["command"] += ["--kv-transfer-config", json.dumps({"kv_connector": "X"})]
        (problem,) = c.one_shm_path(stack, values)
        assert "the connector endpoint None" in problem.message

    def test_a_the_init_chowns_to_the_one_uid_and_pods_run_as_non_root(
        self, stack: list[Obj], values: Values
    ) -> None:
        cache = _pod(stack, "DaemonSet", "shoal-cache")
        cache["initContainers"][0]["command"] = [
            "sh",
            "-c",
            f"mkdir -p {RUN} && chown 1000:1000 {RUN}",
        ]
        del _pod(stack, "Deployment", "vllm")["securityContext"]["runAsNonRoot"]
        assert [p.message[:40] for p in c.one_uid(stack, values)] == [
            "init node-dirs runs chown 1000:1000, not",
            "mounts a node dir without runAsNonRoot: ",
        ]

    def test_e_a_setting_sits_on_a_container_that_reads_its_section_and_loads(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "DaemonSet", "shoal-cache")["containers"][0]["env"] += _env(SHOAL_ROUTER_PORT=1)
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["env"] += _env(
            SHOAL_ROUTER_PORT="x"
        )
        messages = [p.message for p in c.known_settings(stack, values)]
        assert messages[0] == (
            "SHOAL_ROUTER_PORT: the container runs shoal cache, which reads SHOAL_CACHE_*, not this"
        )
        assert messages[1].startswith("its settings do not load: SHOAL_ROUTER_PORT: invalid")

    def test_f_engine_sizes_are_at_least_the_derived_ones(
        self, stack: list[Obj], values: Values
    ) -> None:
        _pod(stack, "Deployment", "vllm")["volumes"][2]["emptyDir"]["sizeLimit"] = "64Mi"
        _pod(stack, "Deployment", "vllm")["containers"][0]["resources"] = {
            "limits": {"memory": "1Mi"}
        }
        messages = [p.message[:28] for p in c.memory(stack, values)]
        assert messages[:2] == ["memory limit 1048576 < 55834", "/dev/shm sizeLimit 67108864 "]

    def test_f_a_malformed_quantity_is_a_problem(self, stack: list[Obj], values: Values) -> None:
        _pod(stack, "Deployment", "shoal-router")["containers"][0]["resources"]["limits"][
            "memory"
        ] = "8GiB"
        (problem,) = c.memory(stack, values)
        assert problem.message == "not a Kubernetes quantity: '8GiB'"

    def test_g_a_file_no_item_projects_is_a_problem(self, stack: list[Obj], values: Values) -> None:
        pod = _pod(stack, "Deployment", "shoal-router")
        pod["volumes"][0]["secret"]["items"] = [{"key": "api-keys", "path": "apikeys"}]
        (problem,) = c.listed_secrets(stack, values)
        assert problem.message.endswith("file api-keys is not projected by volume api-keys")

    def test_g_a_path_setting_lies_under_a_mount(self, stack: list[Obj], values: Values) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"][5]["value"] = "/etc/shoal/contrl-token/token"
        (problem,) = c.listed_secrets(stack, values)
        assert (
            "SHOAL_ROUTER_AUTOSCALER_TOKEN_FILE=/etc/shoal/contrl-token/token lies under none"
            in problem.message
        )

    def test_g_every_listed_key_is_projected(self, stack: list[Obj]) -> None:
        values = _values(cache={"cluster": {"operators": ["admin", "ci"]}})
        assert c.listed_secrets(stack, values) == []  # a whole-Secret mount projects every key
        pod = _pod(stack, "DaemonSet", "shoal-cache")
        pod["volumes"][3]["secret"]["items"] = [{"key": "cluster.key", "path": "cluster.key"}]
        pod["volumes"][4]["secret"]["items"] = [{"key": "admin.key", "path": "admin.key"}]
        assert [p.message for p in c.listed_secrets(stack, values)] == [
            "key cluster.key_secret is listed by deploy.secrets but no pod projects it",
            "key ci.key is listed by deploy.secrets but no pod projects it",
        ]

    def test_g_nested_whole_secret_mounts_and_node_held_keys_pass(self, stack: list[Obj]) -> None:
        values = _values(cache={"cluster": {"keys": "per_node"}})
        pod = _pod(stack, "DaemonSet", "shoal-cache")
        pod["volumes"] += [
            {"name": "curve-members", "secret": {"secretName": "shoal-cache-curve-members"}},
            {"name": "node-key", "hostPath": {"path": "/var/lib/shoal/curve"}},
        ]
        daemon = pod["containers"][0]
        daemon["volumeMounts"] += [
            {"name": "curve-members", "mountPath": f"{CURVE}/members", "readOnly": True},
            {"name": "node-key", "mountPath": "/var/lib/shoal/curve", "readOnly": True},
        ]
        (key,) = [e for e in daemon["env"] if e["name"] == "SHOAL_CACHE_CLUSTER_CURVE_KEY"]
        key["value"] = "/var/lib/shoal/curve/$(NODE_NAME).key_secret"  # made on the node
        assert c.listed_secrets(stack, values) == []
        del daemon["volumeMounts"][-1]
        (problem,) = c.listed_secrets(stack, values)
        assert (
            "SHOAL_CACHE_CLUSTER_CURVE_KEY=/var/lib/shoal/curve/$(NODE_NAME).key_secret "
            "lies under none" in problem.message
        )

    def test_k_the_process_listens_on_the_targeted_port_beyond_loopback(
        self, stack: list[Obj], values: Values
    ) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["env"] += _env(SHOAL_ROUTER_PORT=9999)
        assert [p.message for p in c.listen_ports(stack, values)] == [
            "Service/shoal/shoal-router targets port http (8080), but the process listens on [9999]",
            "listens on 0.0.0.0:9999, which is not a declared containerPort [8080]",
        ]
        router["env"] = [
            e for e in router["env"] if e["name"] not in ("SHOAL_ROUTER_PORT", "SHOAL_ROUTER_HOST")
        ]
        (problem,) = c.listen_ports(stack, values)
        assert problem.message.endswith("but the process listens on 127.0.0.1 only")

    def test_l_a_policy_selects_pods_names_their_ports_and_admits_each_dial(
        self, stack: list[Obj], values: Values
    ) -> None:
        ingress = [
            {
                "ports": [{"port": "http"}],
                "from": [{"podSelector": {"matchLabels": selector("autoscaler")}}],
            }
        ]
        policy = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta("vllm", "engine"),
            "spec": {"podSelector": {"matchLabels": selector("engine")}, "ingress": ingress},
        }
        stack.append(policy)
        (problem,) = c.policies_and_selectors(stack, values)
        assert problem.message.startswith(
            "dials shoal/vllm:http (SHOAL_ROUTER_ENGINES), but no NetworkPolicy"
        )
        ingress[0]["from"] = []
        ingress[0]["ports"] = [{"port": "metrics"}]
        assert (
            "port 'metrics' is no containerPort"
            in c.policies_and_selectors(stack, values)[0].message
        )
        policy["spec"]["podSelector"] = {"matchLabels": {"app.kubernetes.io/component": "engin"}}
        (problem,) = c.policies_and_selectors(stack, values)
        assert problem.message == "its podSelector selects no rendered pod"

    def test_l_probes_pdbs_and_workload_selectors_resolve(
        self, stack: list[Obj], values: Values
    ) -> None:
        router = _pod(stack, "Deployment", "shoal-router")["containers"][0]
        router["livenessProbe"] = {"httpGet": {"path": "/health", "port": "metricz"}}
        _find(stack, "Deployment", "vllm")["spec"]["selector"]["matchLabels"]["x"] = "y"
        stack.append(
            {
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": _meta("r", "router"),
                "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"a": "routr"}}},
            }
        )
        assert [p.message[:30] for p in c.policies_and_selectors(stack, values)] == [
            "selector {'app.kubernetes.io/n",
            "livenessProbe port 'metricz' i",
            "its selector selects no render",
        ]

    def test_h_an_expression_must_parse_and_match_labels_and_jobs_that_exist(
        self, values: Values
    ) -> None:
        rule = {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {"name": "shoal", "namespace": "shoal"},
            "spec": {
                "groups": [
                    {
                        "name": "shoal",
                        "rules": [
                            {
                                "alert": "Ok",
                                "expr": 'sum by (job, pod) (rate(shoal_kvcache_io_errors_total{job="shoal-cache"}[5m])) > 0 and on() vector(1)',
                            },
                            {"alert": "Syntax", "expr": "up ) )"},
                            {
                                "alert": "By",
                                "expr": "sum by (nodee) (shoal_kvcache_io_errors_total)",
                            },
                            {"alert": "Label", "expr": 'shoal_kvcache_engine_connected{tierr="x"}'},
                            {
                                "alert": "Job",
                                "expr": 'up{job="shoal-cach"} == 0 or vllm:num_requests_running > 0',
                            },
                        ],
                    }
                ]
            },
        }
        assert [
            p.message
            for p in c.alert_metrics(
                [
                    rule,
                    _monitor(relabelings=[{"targetLabel": "job", "replacement": "shoal-cache"}]),
                ],
                values,
            )
        ] == [
            "Syntax: not valid PromQL: unexpected right parenthesis ')'",
            "By: groups by 'nodee', which no series it reads carries",
            "Label: shoal_kvcache_engine_connected has no label 'tierr' (it has ['engine'])",
            "Job: job 'shoal-cach' is not a job any monitor scrapes (['shoal-cache'])",
        ]

    @pytest.mark.parametrize(
        ("text", "num_bytes"),
        [
            ("8192Mi", 8 << 30),
            ("1G", 10**9),
            ("1024", 1024),
            ("1.5Gi", 3 << 29),
            ("500m", 1),
            ("1Ei", 1 << 60),
            ("1e3", 1000),
            ("2.5E+2", 250),
        ],
    )
    def test_quantities(self, text: str, num_bytes: int) -> None:
        assert c.parse_quantity(text) == num_bytes
