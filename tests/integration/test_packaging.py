"""The core install: ``shoal`` and the cache without the extras' packages (audit M1, m2).

Each test runs a fresh interpreter whose imports of the blocked packages fail as they do
where the package is not installed (a meta-path finder raising ``ModuleNotFoundError``),
so the real ``shoal`` command is exercised as a bare ``pip install .`` would run it.
``scripts/test-bare`` checks the same against a real bare install, including the demo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.integration.conftest import ENV, REPO

pytestmark = pytest.mark.integration

# What only the extras bring (pyproject.toml: loader, connector) and vLLM.
EXTRAS = ("torch", "grpc", "google.protobuf", "boto3", "botocore", "urllib3", "tqdm", "vllm")

WRAPPER = """
import importlib.abc, json, os, sys

BLOCKED = set(json.loads(os.environ["BLOCK"]))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
try:
    exec(compile(os.environ["CODE"], "<test>", "exec"))
finally:
    with open(os.environ["MODULES_OUT"], "w") as out:
        json.dump(sorted(sys.modules), out)
"""


def run_blocked(
    tmp_path: Path, code: str, blocked: tuple[str, ...] = EXTRAS, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``code`` with ``blocked`` unimportable; returns the result and sys.modules."""
    modules_out = tmp_path / "modules.json"
    env = {**ENV, "BLOCK": json.dumps(blocked), "CODE": code, "MODULES_OUT": str(modules_out)}
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, set(json.loads(modules_out.read_text()))


def shoal_blocked(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    code = f"import sys\nfrom shoal.cli import main\nsys.exit(main({list(argv)!r}))"
    return run_blocked(tmp_path, code)


def components(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in {"kvcache", "loader", "router", "control"}}


def test_shoal_help_works_without_the_extras_and_imports_no_component(tmp_path: Path) -> None:
    done, modules = shoal_blocked(tmp_path, "--help")
    assert done.returncode == 0, done.stderr
    for name in ("cache", "load", "loader"):
        assert f"    {name} " in done.stdout
    assert components(modules) == set()


def test_cache_verbs_work_without_the_extras_and_import_no_loader(tmp_path: Path) -> None:
    for argv in (("cache", "--help"), ("cache", "serve", "--help"), ("cache", "stats", "--help")):
        done, modules = shoal_blocked(tmp_path, *argv)
        assert done.returncode == 0, (argv, done.stderr)
        assert "usage: shoal cache" in done.stdout
        assert not {m for m in modules if m.split(".")[0] == "loader"}, argv


def test_cache_stats_without_the_extras_reaches_for_the_daemon(tmp_path: Path) -> None:
    """Not only --help: a verb runs (exit 3: no daemon at the configured socket)."""
    done, _ = shoal_blocked(
        tmp_path, "cache", "stats", "--name", "bare", "--runtime-dir", str(tmp_path / "run")
    )
    assert done.returncode == 3, done.stderr
    assert "no cache daemon at ipc://" in done.stderr


@pytest.mark.parametrize(
    "argv", [("load", "--help"), ("load", "/models/x"), ("loader", "--help"), ("loader", "list")]
)
def test_a_loader_command_without_the_extra_names_it_in_one_line_with_exit_4(
    tmp_path: Path, argv: tuple[str, ...]
) -> None:
    done, modules = shoal_blocked(tmp_path, *argv)
    assert done.returncode == 4, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"shoal {argv[0]}: needs the 'loader' extra (missing: torch, grpc")
    assert lines[0].endswith("pip install 'shoal[loader]'")
    assert not {m for m in modules if m.split(".")[0] == "loader"}  # checked before importing


def test_loader_plan_imports_without_torch(tmp_path: Path) -> None:
    done, modules = run_blocked(
        tmp_path,
        "import loader.plan\nprint(loader.plan.ITEMSIZES['BF16'], loader.plan.INDEX_FILE)",
        blocked=("torch",),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "model.safetensors.index.json"]
    assert "torch" not in modules


def test_itemsizes_agree_with_torch() -> None:
    torch = pytest.importorskip("torch")
    from loader.plan import DTYPES, ITEMSIZES

    assert set(ITEMSIZES) == set(DTYPES)
    for name, dtype in DTYPES.items():
        assert ITEMSIZES[name] == torch.empty((), dtype=dtype).element_size(), name


def test_sidecar_submodules_import_without_grpc(tmp_path: Path) -> None:
    """Importing loader.sidecar.config runs the package __init__: it must not need grpc."""
    done, modules = run_blocked(
        tmp_path,
        "from loader.sidecar.config import LoaderConfig\nprint(LoaderConfig().name)",
        blocked=("grpc", "google.protobuf"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "default"
    assert "loader.sidecar.client" not in modules


def test_sidecar_package_still_exports_its_client() -> None:
    pytest.importorskip("grpc")
    import loader.sidecar
    from loader.sidecar import LoaderConfig, SidecarClient
    from loader.sidecar.client import SidecarClient as Direct

    assert SidecarClient is Direct
    assert LoaderConfig.__module__ == "loader.sidecar.config"
    assert "SidecarClient" in dir(loader.sidecar)
    with pytest.raises(AttributeError):
        _ = loader.sidecar.NoSuchName  # type: ignore[attr-defined]


# -- --config after the verb (m2) -------------------------------------------------------------


def shoal(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in ENV.items() if not k.startswith("SHOAL_")}
    return subprocess.run(
        [sys.executable, "-m", "shoal", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_is_read_when_it_follows_the_verb(tmp_path: Path) -> None:
    run = tmp_path / "from-file"
    config = tmp_path / "shoal.toml"
    config.write_text(f'[cache]\nname = "filed"\nruntime_dir = "{run}"\n')
    for argv in (
        ("cache", "stats", "--config", str(config)),
        ("--config", str(config), "cache", "stats"),
        ("--config", str(tmp_path / "absent.toml"), "cache", "stats", "--config", str(config)),
    ):
        done = shoal(*argv, cwd=tmp_path)
        assert done.returncode == 3, (argv, done.stderr)
        assert f"no cache daemon at ipc://{run}/shoal-filed.sock" in done.stderr, argv


def test_loader_verbs_take_config_after_the_verb_too(tmp_path: Path) -> None:
    pytest.importorskip("grpc")
    config = tmp_path / "shoal.toml"
    config.write_text('[loader]\nlisten = "not-a-transport"\n')
    done = shoal("loader", "health", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # the file's bad value, named: it was read
    assert "not-a-transport" in done.stderr


# -- vLLM's general plugin ---------------------------------------------------------------------


def test_vllm_entry_point_is_the_import_cheap_plugin() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["vllm.general_plugins"]
    assert plugins == {"shoal_loader": "shoal.vllm_plugin:register"}
    assert "torch" not in " ".join(project["dependencies"])


PLUGIN = """
import sys
import torch
from safetensors.torch import save_file
from shoal import vllm_plugin

vllm_plugin.register()
vllm_plugin.register()  # idempotent: vLLM may call it more than once
assert not [m for m in sys.modules if m.split(".")[0] == "loader"], "register imported loader"

from types import SimpleNamespace
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import get_model_loader

folder = sys.argv[1]
save_file({"a": torch.arange(6, dtype=torch.float32).view(2, 3)}, folder + "/m.safetensors")
model_loader = get_model_loader(LoadConfig(load_format="shoal"))
assert type(model_loader.loader).__module__ == "loader.vllm"

class Model:
    def load_weights(self, weights):
        self.got = {name: tensor.tolist() for name, tensor in weights}

model = Model()
model_loader.load_weights(model, SimpleNamespace(model=folder, model_weights=None))
print(model.got)
"""


def test_vllm_plugin_registers_without_importing_the_loader_and_then_loads(
    tmp_path: Path,
) -> None:
    pytest.importorskip("vllm")
    pytest.importorskip("safetensors")
    done = subprocess.run(
        [sys.executable, "-c", PLUGIN, str(tmp_path)],
        env={**ENV, "VLLM_LOGGING_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "{'a': [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]}"


def test_version_comes_from_the_distribution_metadata_and_types_ship() -> None:
    from importlib.metadata import version

    import shoal

    assert shoal.__version__ == version("shoal")
    assert (REPO / "shoal" / "py.typed").exists() and (REPO / "kvcache" / "py.typed").exists()
