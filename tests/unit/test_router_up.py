"""``shoal up``'s plan: what runs, in which order, wired to what (no process is started)."""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from router.demo import render_demo, run_demo
from router.stack import Job, Service
from router.up import (
    UpOptions,
    check_setup,
    describe,
    engine_cpus,
    options_from_args,
    plan_stack,
    register,
    render,
)
from shoal.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="component"))
    return parser.parse_args(["up", *argv])


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def plan(tmp_path: Path, **options: object):  # type: ignore[no-untyped-def]
    ports = itertools.count(30001)
    opts = UpOptions(model=model_folder(tmp_path), port=8080, **options)  # type: ignore[arg-type]
    return plan_stack(
        opts, tmp_path / "up-x", free_port=lambda: next(ports), cpus=[0, 1], precise=True
    )


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_real_engines_start_after_the_daemon_and_the_staged_weights_before_the_router(
    tmp_path: Path,
) -> None:
    stages = plan(tmp_path).stages
    assert [[step.name for step in stage] for stage in stages] == [
        ["cache"],
        ["loader"],
        ["prefetch"],
        ["engine-0", "engine-1"],
        ["router"],
    ]
    assert isinstance(stages[2][0], Job)
    assert all(
        isinstance(step, Service) for stage in stages if stage != stages[2] for step in stage
    )


def test_each_engine_is_one_daemon_stream_and_the_router_maps_its_url_to_it(
    tmp_path: Path,
) -> None:
    p = plan(tmp_path, num_engines=3)
    assert p.streams == ("up/gpu0", "up/gpu1", "up/gpu2")
    (cache,) = p.stages[0]
    (router,) = p.stages[-1]
    publishers = flag(cache.argv, "--engine-events").split(",")
    assert publishers == [f"ipc://{p.workdir}/ev/gpu{i}.pub" for i in range(3)]
    assert flag(cache.argv, "--cluster-node") == "up"
    assert flag(cache.argv, "--engine-model") == "tiny-llama"
    for i, engine in enumerate(p.stages[-2]):
        events = json.loads(flag(engine.argv, "--kv-events-config"))
        assert events["endpoint"] == publishers[i]  # engine i publishes to stream gpu<i>
        assert engine.address == p.engine_urls[i]
    assert flag(router.argv, "--engines") == ",".join(
        f"{url}=up/gpu{i}" for i, url in enumerate(p.engine_urls)
    )
    assert flag(router.argv, "--cache-socket") == str(p.cache_socket)
    assert flag(router.argv, "--port") == "8080"
    assert flag(router.argv, "--tokenizer").endswith("tiny-llama")


def test_a_real_engine_has_the_connector_kv_events_and_loads_through_the_sidecar(
    tmp_path: Path,
) -> None:
    p = plan(tmp_path, cpu_per_engine=1, engine_args=("--max-num-seqs", "2"))
    engine = p.stages[3][1]
    assert isinstance(engine, Service)
    argv = engine.argv
    assert argv[1:3] == ("-m", "vllm.entrypoints.openai.api_server")
    connector = json.loads(flag(argv, "--kv-transfer-config"))
    assert connector["kv_connector"] == "ShoalConnector"
    assert connector["kv_connector_extra_config"] == {
        "endpoint": f"ipc://{p.cache_socket}",
        "chunk_tokens": 256,
    }
    assert flag(argv, "--load-format") == "shoal"
    weights = json.loads(flag(argv, "--model-loader-extra-config"))["model_weights"]
    assert weights == f"peer+unix://{p.workdir}/shoal-loader-up-x.sock/{flag(argv, '--model')}"
    assert "--enable-prompt-tokens-details" in argv
    assert argv[-2:] == ("--max-num-seqs", "2")
    assert engine.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"  # engine 1 on the second core
    assert engine.env["HF_HUB_OFFLINE"] == "1"
    assert engine.cwd == p.workdir / "engine-1"


def test_without_the_loader_engines_load_with_vllms_own_loader(tmp_path: Path) -> None:
    p = plan(tmp_path, loader=False)
    assert [stage[0].name for stage in p.stages] == ["cache", "engine-0", "router"]
    assert "--load-format" not in p.stages[1][0].argv


def test_simulated_engines_need_no_sidecar_and_tokenize_as_the_model_does(
    tmp_path: Path,
) -> None:
    p = plan(tmp_path, sim=True, num_engines=2)
    assert [[s.name for s in stage] for stage in p.stages] == [
        ["cache"],
        ["engine-0", "engine-1"],
        ["router"],
    ]
    engine = p.stages[1][0]
    assert engine.argv[2:5] == ("shoal", "sim", "engine")
    assert flag(engine.argv, "--tokenizer") == flag(p.stages[2][0].argv, "--tokenizer")
    assert json.loads(flag(engine.argv, "--kv-events-config"))["topic"] == "kv-events"


def test_without_router_precise_the_router_gets_no_cache_socket(tmp_path: Path) -> None:
    opts = UpOptions(model=model_folder(tmp_path), sim=True, port=8080)
    p = plan_stack(opts, tmp_path / "up-x", free_port=lambda: 30000, cpus=[0], precise=False)
    router = p.stages[-1][0]
    assert "--cache-socket" not in router.argv
    assert isinstance(router, Service) and router.detail.endswith("approximate prefixes")


def test_engines_take_cores_round_robin() -> None:
    assert [engine_cpus(i, 1, [0, 1]) for i in range(3)] == [[0], [1], [0]]
    assert [engine_cpus(i, 2, [0, 1, 2, 3]) for i in range(3)] == [[0, 1], [2, 3], [0, 1]]
    assert engine_cpus(0, 3, [4, 5]) == [4, 5]


def test_the_engines_flag_takes_a_count_or_sim() -> None:
    assert options_from_args(parse()).num_engines == 2
    assert not options_from_args(parse()).sim
    assert options_from_args(parse("--engines", "3")).num_engines == 3
    sim = options_from_args(parse("--engines", "sim"))
    assert (sim.sim, sim.num_engines) == (True, 2)
    sim4 = options_from_args(parse("--engines", "sim:4", "--engine-args", "--time-scale 10"))
    assert (sim4.sim, sim4.num_engines, sim4.engine_args) == (True, 4, ("--time-scale", "10"))
    with pytest.raises(ConfigError, match="sim:N"):
        options_from_args(parse("--engines", "many"))


def test_missing_set_up_is_named_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scripts/setup-engine"):
        check_setup(UpOptions(engine_python=tmp_path / "no-python"))
    missing_model = UpOptions(model=tmp_path / "nothing", engine_python=Path("/bin/sh"))
    with pytest.raises(ConfigError, match="no config.json"):
        check_setup(missing_model)
    with pytest.raises(ConfigError, match="at least 1"):
        check_setup(UpOptions(sim=True, num_engines=0, port=0))


def test_a_workdir_too_long_for_ipc_sockets_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ConfigError, match="shorter --workdir"):
        plan_stack(UpOptions(sim=True), deep, free_port=lambda: 30000, cpus=[0])


def test_the_table_and_json_list_every_component_with_an_example_curl(tmp_path: Path) -> None:
    p = plan(tmp_path, sim=True)

    class Item:
        def __init__(self, step: Service, pid: int) -> None:
            self.step, self.pid, self.name, self.ready_after_s = step, pid, step.name, 1.54

    running = [Item(step, 100 + i) for i, step in enumerate(s for st in p.stages for s in st)]
    described = describe(p, running)  # type: ignore[arg-type]
    assert [c["component"] for c in described["components"]] == [
        "cache",
        "engine-0",
        "engine-1",
        "router",
    ]
    assert described["components"][3] == {
        "component": "router",
        "pid": 103,
        "address": "http://127.0.0.1:8080",
        "detail": "strategy shoal, precise prefixes from the cache daemon",
        "log": str(p.workdir / "router.log"),
        "ready_s": 1.5,
    }
    assert described["curl"].startswith("curl -sD - http://127.0.0.1:8080/v1/chat/completions")
    lines = render(described)
    assert lines[0].split() == ["COMPONENT", "PID", "ADDRESS", "DETAIL", "LOG"]
    assert [line.split()[0] for line in lines[1:5]] == ["cache", "engine-0", "engine-1", "router"]


def test_the_demo_resends_each_conversations_history_and_reports_its_engine_and_cache() -> None:
    sent: list[tuple[str, list[dict[str, str]]]] = []

    def post(url: str, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        messages = [dict(m) for m in body["messages"]]
        sent.append((url, messages))
        engine = "http://e0" if messages[0]["content"].startswith("You are") else "http://e1"
        size = sum(len(m["content"]) for m in messages) // 4
        details = {"cached_tokens": 0 if len(messages) == 2 else size - 10}
        return engine, {
            "choices": [{"message": {"content": f"answer {len(sent)}"}}],
            "usage": {"prompt_tokens": size, "prompt_tokens_details": details},
        }

    turns = run_demo("http://router", "tiny", {"http://e0": "engine-0"}, post=post)
    assert [(t.conversation, t.turn) for t in turns] == [
        (1, 1),
        (2, 1),
        (1, 2),
        (2, 2),
        (1, 3),
        (2, 3),
    ]
    assert {t.engine for t in turns if t.conversation == 1} == {"engine-0"}
    assert {t.engine for t in turns if t.conversation == 2} == {"http://e1"}  # unnamed: URL
    assert all(url == "http://router/v1/chat/completions" for url, _ in sent)
    third_turn = sent[4][1]  # conversation 1, turn 3: system, (user, assistant) x 2, user
    assert [m["role"] for m in third_turn] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert third_turn[2]["content"] == "answer 1"
    assert [t.cached_tokens for t in turns[:2]] == [0, 0]
    lines = render_demo(turns)
    assert lines[0].split()[:3] == ["CONVERSATION", "TURN", "ENGINE"]
    assert lines[1].split()[:3] == ["1", "1", "engine-0"]
    assert lines[1].split()[-1] == "0%"


def test_a_missing_tiny_model_names_the_script_that_builds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / ".cache" / "engine" / "tiny-llama"
    monkeypatch.setattr("router.up_plan.DEFAULT_MODEL", absent)
    python = tmp_path / "python"
    python.touch()
    with pytest.raises(ConfigError, match=r"tiny model is missing .*bash scripts/setup-engine"):
        check_setup(UpOptions(model=absent, engine_python=python, port=0))
