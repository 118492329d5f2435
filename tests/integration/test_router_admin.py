"""The admin listener (``--admin-port``, review16-k8s #4): the routes that are not the
OpenAI API leave the public port, and the admin port serves them; beyond loopback its
token guards everything but ``/metrics``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from router.server import running_router
from shoal.processes import shoal_env
from sim.process import running_sim_engine
from tests.integration.conftest import free_port

ADMIN = ("/metrics", "/router/engines", "/v1/request_sizes")


def test_admin_routes_move_to_the_admin_port_and_leave_the_main_one() -> None:
    with running_sim_engine(free_port(), time_scale=20.0) as engine, running_router(
        free_port(), engines=[engine.url], admin_port=free_port()
    ) as router:  # fmt: skip
        for path in ADMIN:
            assert router.request("GET", path)[0] == 404, path
            assert router.request("GET", path, admin=True)[0] == 200, path
        assert router.request("GET", "/health")[0] == 200  # probes stay on the main port
        assert router.request("GET", "/v1/models")[0] == 200  # the OpenAI API too
        assert router.request("GET", "/health", admin=True)[0] == 404
        assert b"shoal_router_" in router.request("GET", "/metrics", admin=True)[2]
        engines = json.loads(router.request("GET", "/router/engines", admin=True)[2])
        assert [e["url"] for e in engines["engines"]] == [engine.url]


def test_without_an_admin_port_the_main_port_serves_them_as_before() -> None:
    with running_sim_engine(free_port(), time_scale=20.0) as engine, running_router(
        free_port(), engines=[engine.url]
    ) as router:  # fmt: skip
        for path in ADMIN:
            assert router.request("GET", path)[0] == 200, path


def test_the_admin_token_guards_all_but_metrics(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with running_sim_engine(free_port(), time_scale=20.0) as engine, running_router(
        free_port(), engines=[engine.url], admin_port=free_port(), admin_host="0.0.0.0",
        admin_token_file=str(token),
    ) as router:  # fmt: skip
        assert router.request("GET", "/metrics", admin=True)[0] == 200  # Prometheus: no token
        for path in ("/router/engines", "/v1/request_sizes"):
            assert router.request("GET", path, admin=True)[0] == 401, path
            wrong = {"Authorization": "Bearer nope"}
            assert router.request("GET", path, admin=True, headers=wrong)[0] == 401, path
            right = {"Authorization": "Bearer s3cret"}
            assert router.request("GET", path, admin=True, headers=right)[0] == 200, path

        def engines_verb(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "shoal", "router", "engines", "--url", router.admin_url,
                 "--json", *args],
                capture_output=True, text=True, timeout=30, env=shoal_env(),
            )  # fmt: skip

        listed = engines_verb("--token-file", str(token))
        assert listed.returncode == 0, listed.stderr
        assert [row["url"] for row in json.loads(listed.stdout)] == [engine.url]
        refused = engines_verb()
        assert refused.returncode != 0 and "401" in refused.stderr
