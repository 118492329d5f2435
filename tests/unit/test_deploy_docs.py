"""docs/operations.md, the metric catalogue, the systemd units and the Dockerfiles.

The document's generated blocks must equal what the code generates (as test_config.py does
for the README's configuration tables); every ``shoal_`` literal in the code must be a
catalogued metric; each unit's ExecStart must parse with shoal's own parser.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from deploy import metrics_catalogue, operations_doc
from deploy.metrics_catalogue import MetricDoc, catalogue, render_markdown, uncovered_literals
from deploy.operations_doc import RUNBOOK, render_alerts_markdown, update_document

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
UNIT_NAMES = {"shoal-cache", "shoal-loader", "shoal-router", "shoal-autoscale", "shoal-health"}


@pytest.fixture(scope="module")
def docs() -> list[MetricDoc]:
    return catalogue()


def by_name(docs: list[MetricDoc]) -> dict[str, MetricDoc]:
    return {d.name: d for d in docs}


# -- the document ---------------------------------------------------------------------------


def test_the_operations_doc_holds_the_current_metric_table_and_alerts() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    assert metrics_catalogue.BEGIN_MARKER in text, "docs/operations.md lost its metric table"
    assert operations_doc.ALERTS_BEGIN in text, "docs/operations.md lost its alerts block"
    assert update_document(text) == text, (
        "docs/operations.md is stale: regenerate it with "
        'python -c "from deploy.operations_doc import write_document; write_document()"'
    )


def test_the_operations_doc_has_an_alerts_section_to_link_to() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    assert re.search(r"^## Alerts$", text, re.M), "runbook links point at #alerts"


# -- the catalogue --------------------------------------------------------------------------


def test_every_shoal_literal_in_the_code_is_a_catalogued_metric(docs: list[MetricDoc]) -> None:
    assert uncovered_literals(docs) == []


def test_a_metrics_module_missing_from_the_catalogue_is_named_by_the_scan(
    docs: list[MetricDoc],
) -> None:
    without_router = [d for d in docs if d.source_module != "router.metrics"]
    problems = uncovered_literals(without_router, packages=("router",))
    assert any(
        p.startswith("router/metrics.py:") and "shoal_router_arrivals" in p for p in problems
    )
    assert any("shoal_router_prefix_lookups" in p for p in problems)  # a collector's family


def test_an_fstring_prefix_is_covered_only_by_a_metric_it_starts(docs: list[MetricDoc]) -> None:
    without_engine_feed = [d for d in docs if not d.name.startswith("shoal_kvcache_engine_")]
    problems = uncovered_literals(without_engine_feed, packages=("kvcache",))
    assert any(p.endswith(": shoal_kvcache_engine_") for p in problems)


def test_a_new_module_cannot_hide_a_metric_behind_a_known_prefix(
    docs: list[MetricDoc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "extra.py").write_text(
        'B = Counter("retries", "x", namespace="shoal", subsystem="router")\n'
        'PREFIX = "shoal_router_"\n'
        'D = Counter(f"shoal_router_{\'x\'}_new", "x")\n'
        'E = Gauge("shoal_" "router_concat", "x")\n'
    )
    (tmp_path / "router" / "more_metrics.py").write_text("")
    monkeypatch.setattr(metrics_catalogue, "REPO", tmp_path)
    assert uncovered_literals(docs, packages=("router",)) == [
        'router/extra.py:1: namespace="shoal"',
        "router/extra.py:2: shoal_router_",
        "router/extra.py:3: shoal_router_",
        "router/extra.py:4: shoal_",
        "router.more_metrics: a metrics module that is not among the catalogue's sources "
        "(_SOURCES)",
    ]


def test_counters_and_infos_are_named_as_prometheus_scrapes_them(docs: list[MetricDoc]) -> None:
    named = by_name(docs)
    assert named["shoal_kvcache_hits_total"].type == "counter"
    assert named["shoal_kvcache_misses_total"].type == "counter"  # a collector's family
    assert named["shoal_kvcache_request_seconds"].type == "histogram"
    assert named["shoal_engines_update_revision_info"].type == "info"
    assert "shoal_kvcache_hits" not in named


def test_labels_come_from_the_declarations_and_collectors(docs: list[MetricDoc]) -> None:
    named = by_name(docs)
    assert named["shoal_kvcache_hits_total"].labels == ("tier",)
    assert named["shoal_kvcache_engine_events_total"].labels == ("engine", "kind")
    assert named["shoal_router_shared_state_calls_total"].labels == ("part", "result")
    assert named["shoal_gpu_ecc_errors"].labels == ("node", "gpu", "uuid", "scope", "bit")
    assert named["shoal_engines_update_revision_info"].labels == ("revision",)
    assert named["shoal_router_replicas"].labels == ()


def test_a_counter_and_a_gauge_sharing_a_family_name_keep_their_own_labels(
    docs: list[MetricDoc],
) -> None:
    named = by_name(docs)
    assert named["shoal_loader_staged_bytes_total"].labels == ("source",)
    assert named["shoal_loader_staged_bytes"].type == "gauge"
    assert named["shoal_loader_staged_bytes"].labels == ()


def test_connector_counters_carry_vllms_labels_and_reason_for_failures(
    docs: list[MetricDoc],
) -> None:
    named = by_name(docs)
    failures = named["shoal_connector_failures_total"]
    assert (failures.labels, failures.component) == (("model_name", "engine", "reason"), "engine")
    assert named["shoal_connector_hit_tokens_total"].labels == ("model_name", "engine")
    assert sum(d.name == "shoal_connector_failures_total" for d in docs) == 1


def test_the_simulators_own_metrics_are_catalogued_and_vllms_are_not(
    docs: list[MetricDoc],
) -> None:
    sim = [d for d in docs if d.component == "sim"]
    assert "shoal_sim_steps_total" in {d.name for d in sim}
    assert all(d.name.startswith("shoal_sim_") for d in sim)
    assert not [d for d in docs if not d.name.startswith("shoal_")]


def test_every_catalogued_metric_is_in_its_registrys_exposition(docs: list[MetricDoc]) -> None:
    for source in metrics_catalogue._SOURCES:
        text = generate_latest(source.build()).decode()
        for doc in (d for d in docs if d.source_module == source.module):
            kind = "gauge" if doc.type == "info" else doc.type
            assert f"# TYPE {doc.name} {kind}\n" in text, (source.module, doc.name)


def test_every_metric_has_help_and_a_component(docs: list[MetricDoc]) -> None:
    assert len(docs) > 100
    assert all(d.help.strip() and d.component and d.source_module for d in docs)


def test_the_table_has_one_row_per_metric_with_escaped_cells() -> None:
    doc = MetricDoc("shoal_x_total", "counter", ("a", "b"), "one | two", "cache", "m")
    table = render_markdown([doc]).splitlines()
    assert table[2] == "| `shoal_x_total` | counter | `a`, `b` | cache (`m`) | one \\| two |"
    assert len(table) == 3


# -- alerts ---------------------------------------------------------------------------------


def test_alerts_render_as_a_table_and_a_runbook_section_each() -> None:
    name = next(iter(RUNBOOK))
    alerts = [
        {"name": name, "expr": "up == 0", "for": "5m", "severity": "critical",
         "summary": "down"},
        SimpleNamespace(name="ShoalNoSuchAlert", expr="x > 1", for_="1m", severity="warning",
                        summary="a | b"),
    ]  # fmt: skip
    text = render_alerts_markdown(alerts)
    assert f"| [{name}](#{name.lower()}) | critical | 5m | down |" in text
    assert "| [ShoalNoSuchAlert](#shoalnosuchalert) | warning | 1m | a \\| b |" in text
    assert f"### {name}\n\n```promql\nup == 0\n```\n\n{RUNBOOK[name]}" in text
    assert "### ShoalNoSuchAlert" in text and "No runbook entry yet" in text


def test_no_alerts_render_as_one_sentence() -> None:
    assert render_alerts_markdown([]).startswith("No alerts are defined")


def _alert_names() -> list[str]:
    alerts = operations_doc.defined_alerts()
    if alerts is None:
        pytest.skip("deploy/components/monitoring.py defines no ALERTS yet")
    return operations_doc.alert_names(alerts)


def test_every_alert_has_a_runbook_entry() -> None:
    missing = [name for name in _alert_names() if name not in RUNBOOK]
    assert missing == [], f"add a RUNBOOK entry to deploy/operations_doc.py for {missing}"


def test_every_runbook_entry_names_an_alert() -> None:
    stale = sorted(set(RUNBOOK) - set(_alert_names()))
    assert stale == [], f"RUNBOOK entries for alerts that do not exist: {stale}"


# -- systemd units --------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def service(path: Path) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_unit(path)["Service"].items()}


def seconds(value: str) -> float:
    assert re.fullmatch(r"\d+", value), f"write TimeoutStopSec in plain seconds, not {value!r}"
    return float(value)


def test_there_is_a_unit_per_daemon() -> None:
    assert {p.stem for p in UNITS} == UNIT_NAMES


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.stem)
def test_unit_execstart_is_accepted_by_shoals_own_parser(unit: Path) -> None:
    from shoal.cli import build_parser

    argv = shlex.split(service(unit)["ExecStart"])
    assert argv[0] == "/opt/shoal/bin/shoal"
    args = build_parser(argv[1]).parse_args(argv[1:])
    assert callable(getattr(args, "func", None)), f"{unit.name}: {argv[1:3]} is not a verb"
    assert args.config == "/etc/shoal/shoal.toml"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.stem)
def test_unit_runs_as_shoal_and_restarts_on_failure(unit: Path) -> None:
    s = service(unit)
    assert (s["User"], s["Group"]) == ("shoal", "shoal")
    assert s["EnvironmentFile"] == "-/etc/shoal/env"
    assert (s["Restart"], s["KillSignal"]) == ("on-failure", "SIGTERM")
    assert s["NoNewPrivileges"] == "yes"
    assert parse_unit(unit)["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("stem", ["shoal-cache", "shoal-loader"])
def test_socket_daemons_get_the_runtime_dir_contract_from_systemd(stem: str) -> None:
    path = REPO / "deploy" / "systemd" / f"{stem}.service"
    s = service(path)
    assert (s["RuntimeDirectory"], s["RuntimeDirectoryMode"]) == ("shoal", "0700")
    assert s["RuntimeDirectoryPreserve"] == "yes"  # engines' sockets live there too
    argv = shlex.split(s["ExecStart"])
    assert argv[argv.index("--runtime-dir") + 1] == "/run/shoal"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.stem)
def test_units_beside_engines_keep_the_hosts_dev(unit: Path) -> None:
    s = service(unit)
    if unit.stem == "shoal-router":
        assert s["PrivateDevices"] == "yes"
    else:  # the arena in /dev/shm, the GPUs: a private /dev would hide them
        assert s.get("PrivateDevices", "no") == "no"
    if s.get("ProtectSystem") == "strict" and unit.stem in {"shoal-cache", "shoal-loader"}:
        assert "/dev/shm" in s["ReadWritePaths"].split()


def test_stop_timeouts_exceed_each_daemons_own_shutdown() -> None:
    from control.autoscale.config import AutoscaleSettings
    from kvcache.config import CacheConfig
    from router.config import RouterSettings

    def default(cls: type, name: str) -> float:
        return float(next(f.default for f in dataclasses.fields(cls) if f.name == name))

    def timeout(stem: str) -> float:
        return seconds(service(REPO / "deploy" / "systemd" / f"{stem}.service")["TimeoutStopSec"])

    disk_job_s = 5.0  # a stuck SSD job is abandoned after 5 s (README, the cache daemon)
    assert timeout("shoal-cache") > default(CacheConfig, "shutdown_timeout_s") + disk_job_s
    assert timeout("shoal-router") > default(RouterSettings, "shutdown_timeout_s")
    engines_s = default(AutoscaleSettings, "drain_s") + default(
        AutoscaleSettings, "engine_stop_grace_s"
    )
    assert timeout("shoal-autoscale") > engines_s
    assert service(REPO / "deploy" / "systemd" / "shoal-autoscale.service")["KillMode"] == "mixed"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_every_unit(tmp_path: Path) -> None:
    executable = shutil.which("true")
    assert executable
    for unit in UNITS:  # verify wants ExecStart's binary to exist: point it at one that does
        text = unit.read_text().replace("/opt/shoal/bin/shoal", executable)
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    # unknown keys and unparsable values are only warnings on stderr, with status 0
    assert (result.returncode, result.stderr.strip()) == (0, "")


# -- Dockerfiles ----------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.engine"])
def test_dockerfile_runs_as_uid_10001(name: str) -> None:
    users = [args for word, args in instructions(REPO / "deploy" / name) if word == "USER"]
    assert users, f"deploy/{name} has no USER"
    assert users[-1].split(":")[0] == "10001"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.engine"])
def test_dockerfile_copies_only_paths_that_exist(name: str) -> None:
    copies = [args for word, args in instructions(REPO / "deploy" / name) if word == "COPY"]
    assert copies
    for args in copies:
        if "--from=" in args:
            continue  # from an earlier stage, not the build context
        *sources, _ = args.split()
        for source in sources:
            assert (REPO / source).exists(), f"deploy/{name}: COPY {source} is not in the repo"


def test_daemon_image_installs_torch_from_the_cpu_index_before_the_extras() -> None:
    steps = instructions(REPO / "deploy" / "Dockerfile")
    runs = [args for word, args in steps if word == "RUN"]
    torch = next(i for i, r in enumerate(runs) if "download.pytorch.org/whl/cpu" in r)
    extras_step = next(i for i, r in enumerate(runs) if 'pip install ".[' in r)
    assert torch < extras_step
    default = next(a for w, a in steps if w == "ARG" and a.startswith("EXTRAS="))
    extras = set(default.removeprefix("EXTRAS=").split(","))
    assert {"router", "control", "loader", "deploy"} <= extras
    assert extras <= set(pyproject()["project"]["optional-dependencies"])  # type: ignore[index]


def test_engine_image_adds_shoal_to_vllm_without_touching_its_dependencies() -> None:
    steps = instructions(REPO / "deploy" / "Dockerfile.engine")
    text = " ".join(args for _, args in steps)
    assert next(a for w, a in steps if w == "ARG").startswith("VLLM_IMAGE=vllm/vllm-openai:")
    assert "pip install --no-deps ." in text
    project = pyproject()["project"]
    extras = project["optional-dependencies"]  # type: ignore[index]
    wanted = [*project["dependencies"], *extras["connector"], *extras["loader"]]  # type: ignore[index]
    for requirement in wanted:
        if not requirement.startswith("torch"):  # vLLM's own CUDA build stays
            assert f'"{requirement}"' in text, f"Dockerfile.engine does not install {requirement}"
    plugins = project["entry-points"]["vllm.general_plugins"]  # type: ignore[index]
    assert plugins == {"shoal_loader": "shoal.vllm_plugin:register"}  # --load-format shoal
