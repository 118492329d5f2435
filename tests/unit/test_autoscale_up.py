"""``shoal up --autoscale``'s plan (issue 13): the autoscaler starts the engines, the
router finds them in its discovery file and holds requests while there is none (no
process is started here, except ``/bin/sh`` expanding the engine script)."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.stack import Service
from router.up import UpOptions, check_setup, describe, options_from_args, plan_stack, register
from router.up_plan import UpPlan, engine_script
from shoal.errors import ConfigError


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "models" / "tiny-llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def plan(tmp_path: Path, workdir: Path | None = None, **options: object) -> UpPlan:
    ports = itertools.count(30001)
    opts = UpOptions(model=model_folder(tmp_path), port=8080, **options)  # type: ignore[arg-type]
    return plan_stack(
        opts, workdir or tmp_path / "up-x", free_port=lambda: next(ports), cpus=[0, 1],
        precise=True,
    )  # fmt: skip


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A workdir short enough for vLLM's ipc sockets in each engine's home."""
    path = Path(tempfile.mkdtemp(prefix="u", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def step(p: UpPlan, name: str) -> Service:
    found = [s for stage in p.stages for s in stage if s.name == name]
    assert len(found) == 1 and isinstance(found[0], Service)
    return found[0]


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def expand(script: str, workdir: Path, port: int) -> list[str]:
    """The argv (with ``env -i`` assignments) the script would exec on ``port``."""
    path = workdir / "probe.sh"
    path.write_text(script.replace("exec ", "printf '%s\\0' "))
    done = subprocess.run(["/bin/sh", str(path), str(port)], capture_output=True, check=True)
    return done.stdout.decode().split("\0")[:-1]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="component"))
    return parser.parse_args(["up", *argv])


def test_the_autoscaler_replaces_the_engines_and_starts_before_the_router(
    tmp_path: Path, short_dir: Path
) -> None:
    sim = plan(tmp_path / "a", sim=True, num_engines=4, autoscale="kpa", min_replicas=0)
    assert [[s.name for s in stage] for stage in sim.stages] == [
        ["cache"], ["autoscaler"], ["router"]
    ]  # fmt: skip
    real = plan(tmp_path / "b", short_dir / "up", autoscale="")
    assert [[s.name for s in stage] for stage in real.stages] == [
        ["cache"], ["loader"], ["prefetch"], ["autoscaler"], ["router"]
    ]  # fmt: skip
    assert (sim.engine_urls, sim.streams) == ((), ())
    assert "--engine-events" not in step(sim, "cache").argv  # no fixed publisher list


def test_the_autoscaler_and_the_router_are_wired_to_each_other_and_the_discovery_file(
    tmp_path: Path,
) -> None:
    p = plan(tmp_path, sim=True, num_engines=4, autoscale="kpa", min_replicas=0)
    autoscaler, router = step(p, "autoscaler"), step(p, "router")
    a, r = autoscaler.argv, router.argv
    assert a[a.index("autoscale") : a.index("autoscale") + 2] == ("autoscale", "run")
    listing = p.workdir / "engines.json"
    assert flag(a, "--target") == "local"
    assert flag(a, "--engine-command") == f"/bin/sh {p.workdir / 'engine.sh'} {{port}}"
    assert flag(a, "--discovery-file") == str(listing) == flag(r, "--discovery-file")
    assert (flag(a, "--min-replicas"), flag(a, "--max-replicas")) == ("0", "4")
    assert (flag(a, "--policy"), flag(a, "--model")) == ("kpa", "tiny-llama")
    assert flag(a, "--router-url") == p.router_url == "http://127.0.0.1:8080"
    assert p.autoscaler_url == autoscaler.address == f"http://127.0.0.1:{flag(a, '--port')}"
    assert flag(a, "--host") == "127.0.0.1"
    assert flag(r, "--discovery") == "file" and "--engines" not in r
    assert flag(r, "--autoscaler-url") == p.autoscaler_url
    assert autoscaler.ready_url == p.autoscaler_url + "/status"
    assert dict(p.files)[listing] == "[]\n"  # the router's file exists before it starts
    assert "--policy" not in step(plan(tmp_path / "d", sim=True, autoscale=""), "autoscaler").argv


def test_a_simulated_engine_script_starts_one_engine_on_the_port_it_is_given(
    tmp_path: Path,
) -> None:
    p = plan(tmp_path, sim=True, autoscale="", engine_args=("--time-scale", "10"))
    script = dict(p.files)[p.workdir / "engine.sh"]
    argv = expand(script, tmp_path, 41234)
    assert argv[argv.index("sim") + 1] == "engine"
    assert flag(tuple(argv), "--port") == "41234"
    assert flag(tuple(argv), "--served-model-name") == "tiny-llama"
    assert argv[-2:] == ["--time-scale", "10"]
    assert "--kv-events-config" not in argv
    assert (tmp_path / "up-x" / "engine-41234").is_dir()  # its own home


def test_a_vllm_engine_script_keeps_the_connector_loader_and_environment_per_port(
    tmp_path: Path, short_dir: Path
) -> None:
    p = plan(tmp_path, short_dir / "up", autoscale="", cpu_per_engine=2)
    argv = expand(dict(p.files)[p.workdir / "engine.sh"], tmp_path, 41000)
    assert argv[:2] == ["env", "-i"]
    env = dict(a.split("=", 1) for a in argv[2 : argv.index("-m") - 1])
    home = f"{p.workdir}/engine-41000"
    assert (env["HOME"], env["HF_HOME"], env["TMPDIR"]) == (home, home + "/hf", home)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    command = tuple(argv[argv.index("-m") - 1 :])
    assert flag(command, "--port") == "41000"
    transfer = json.loads(flag(command, "--kv-transfer-config"))  # survived the quoting
    assert transfer["kv_connector_extra_config"]["endpoint"] == f"ipc://{p.cache_socket}"
    assert flag(command, "--load-format") == "shoal"
    assert "--kv-events-config" not in command
    with pytest.raises(ConfigError, match="shorter --workdir"):  # vLLM's ipc paths
        plan(tmp_path / "c", tmp_path / ("w" * 40), autoscale="")


def test_engine_script_quotes_what_the_shell_would_otherwise_expand(tmp_path: Path) -> None:
    script = engine_script(
        ["prog", "--port", "0", "it's $HOME `x`"], {"A": "b c", "H": "$home/h"}, "/w/e-$port"
    )
    argv = expand(script, tmp_path, 7)
    assert argv == ["env", "-i", "A=b c", "H=/w/e-7/h", "prog", "--port", "7", "it's $HOME `x`"]


def test_the_flags_and_their_checks() -> None:
    assert options_from_args(parse()).autoscale is None
    assert options_from_args(parse("--autoscale")).autoscale == ""
    chosen = options_from_args(parse("--autoscale", "apa", "--min-replicas", "0"))
    assert (chosen.autoscale, chosen.min_replicas) == ("apa", 0)
    many = options_from_args(parse("--engines", "sim:2", "--autoscale", "--min-replicas", "3"))
    with pytest.raises(ConfigError, match="--min-replicas 3 must be 0..2"):
        check_setup(many)


def test_the_json_names_the_autoscaler(tmp_path: Path) -> None:
    p = plan(tmp_path, sim=True, autoscale="")
    assert describe(p, [])["autoscaler"] == p.autoscaler_url
    assert describe(plan(tmp_path / "s", sim=True), [])["autoscaler"] is None


def test_the_engines_stop_grace_is_passed_and_the_autoscalers_own_covers_it(
    tmp_path: Path, short_dir: Path
) -> None:
    from control.autoscale.config import AutoscaleSettings

    interval_s = AutoscaleSettings().interval_s
    for p, grace in (
        (plan(tmp_path / "a", sim=True, autoscale="kpa"), 10.0),
        (plan(tmp_path / "b", short_dir / "up", autoscale=""), 25.0),
    ):
        autoscaler = step(p, "autoscaler")
        assert float(flag(autoscaler.argv, "--engine-stop-grace-s")) == grace
        # a round that stops one engine, then every engine stopped at once, then a round
        assert autoscaler.stop_grace_s > 2 * grace + interval_s
