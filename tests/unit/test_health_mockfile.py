"""Fault files: AIBrix's schema read as is, every malformed key named, atomic edits."""

from __future__ import annotations

import os
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.health.checks import THROTTLE_REASONS
from control.health.errors import MockFormatError
from control.health.mockfile import Injection, MockCard, apply_injection, inject, load, loads
from control.health.report import check_once

SAMPLE = Path(__file__).parent / "data" / "health" / "aibrix_sample.toml"


def test_aibrix_sample_parses_with_every_key_it_documents() -> None:
    config = load(SAMPLE)
    assert (config.version, config.card_count, config.nvml_init_error) == ("0.1.0", 4, 9)
    assert sorted(config.cards) == [0, 1]
    assert config.cards[0].remapping_pending and config.cards[0].dram_ue == 7
    one = config.card(1)
    assert (one.device_name, one.uuid, one.pci, one.nvlink_active) == (
        "A800",
        "xxxxx",
        "00:00",
        (True,) * 6,
    )


def test_cards_not_listed_are_healthy_with_ids_from_their_index() -> None:
    config = loads(b"[gpus]\ncard_count = 3\n", "f.toml")
    assert config.cards == {}
    cards = [config.card(i) for i in range(3)]
    assert [c.uuid for c in cards] == [
        f"GPU-00000000-0000-4000-8000-00000000000{i}" for i in range(3)
    ]
    assert [c.pci for c in cards] == ["00000000:10:00.0", "00000000:11:00.0", "00000000:12:00.0"]
    assert cards[0].nvlink_active == MockCard().nvlink_active and cards[0].temperature == 35


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("verison = '1'", "f.toml: verison: unknown key"),
        ("version = 1", "f.toml: version: must be a string"),
        ("gpus = 3", "f.toml: gpus: must be a table"),
        ("[gpus]\ncard_count = 65", r"f.toml: gpus.card_count: must be in \[0, 64\]"),
        ("[gpus]\ncard_count = -1", r"gpus.card_count: must be in \[0, 64\]"),
        ("[gpus]\ncard_count = '4'", "gpus.card_count: must be an integer"),
        ("[gpus]\ncard_count = true", "gpus.card_count: must be an integer"),
        ("[gpus]\nnvml_init_error = 1000", "gpus.nvml_init_error: must be in"),
        ("[gpus]\ncards = 2", "gpus.cards: unknown key"),
        (
            "[gpus]\ncard_count = 2\n[gpus.2]\ndram_ue = 1",
            "gpus.2: card index beyond card_count = 2",
        ),
        ("[gpus]\n[gpus.0]\ndram_eu = 1", "gpus.0.dram_eu: unknown key"),
        ("[gpus]\n[gpus.0]\ndram_ue = 'many'", "gpus.0.dram_ue: must be an integer"),
        (
            "[gpus]\n[gpus.0]\nremapping_pending = 1",
            "gpus.0.remapping_pending: must be true or false",
        ),
        (
            "[gpus]\n[gpus.0]\nnvlink_active = [1]",
            "gpus.0.nvlink_active: must hold only true or false",
        ),
        ("[gpus]\n[gpus.0]\nnvlink_active = true", "gpus.0.nvlink_active: must be a list"),
        ("[gpus]\n[gpus.0]\nxids = 79", "gpus.0.xids: must be a list"),
        ("[gpus]\n[gpus.0]\nxids = [-79]", "gpus.0.xids: must be in"),
        (
            "[gpus]\n[gpus.0]\nxids = [" + "79," * 1025 + "]",
            "gpus.0.xids: must be a list of at most 1024",
        ),
        ("[gpus]\n[gpus.0]\ntemperature = 500", r"gpus.0.temperature: must be in \[0, 200\]"),
        ("[gpus]\n[gpus.0]\nuuid = 7", "gpus.0.uuid: must be a string"),
        (
            "[gpus]\n[gpus.0]\nthrottle_reasons = ['hot']",
            "gpus.0.throttle_reasons: unknown reason 'hot'",
        ),
        (
            "[gpus]\n[gpus.0]\nthrottle_reasons = 'hot'",
            "gpus.0.throttle_reasons: must be a bitmask",
        ),
        ("[gpus]\ngpus.0 = 3", "gpus.gpus: unknown key"),
        ("[gpus]\n0 = 3", "gpus.0: must be a table"),
        ("[gpus", "f.toml: not valid TOML"),
    ],
)
def test_malformed_files_name_the_file_and_the_key(text: str, message: str) -> None:
    with pytest.raises(MockFormatError, match=message):
        loads(text.encode(), "f.toml")


def test_a_missing_file_is_a_format_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MockFormatError, match=f"{tmp_path}/none.toml: cannot read"):
        load(tmp_path / "none.toml")


def test_throttle_names_become_nvml_bits() -> None:
    config = loads(b"[gpus]\n[gpus.0]\nthrottle_reasons = ['hw_slowdown', 'sw_power_cap']", "f")
    assert config.card(0).throttle_reasons == 0x8 | 0x4


def test_inject_creates_the_file_and_keeps_keys_it_does_not_touch(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    inject(path, Injection("xid", 2, 79), new_card_count=4)
    assert tomllib.loads(path.read_text()) == {
        "version": "0.1.0",
        "gpus": {"card_count": 4, "2": {"xids": [79]}},
    }
    path.write_text(path.read_text() + "\n[gpus.0]\ndevice_name = 'H100'\n")
    inject(path, Injection("xid", 2, 48))
    inject(path, Injection("ecc_dbe", 0, 3))
    inject(path, Injection("throttle", 0, "hw_slowdown"))
    inject(path, Injection("throttle", 0, "hw_slowdown"))
    inject(path, Injection("nvlink_down", 0, 13))
    doc = tomllib.loads(path.read_text())
    assert doc["gpus"]["2"] == {"xids": [79, 48]}
    card0 = doc["gpus"]["0"]
    assert card0["device_name"] == "H100"
    assert (card0["ecc_volatile_dbe"], card0["ecc_aggregate_dbe"]) == (3, 3)
    assert card0["throttle_reasons"] == ["hw_slowdown"]
    assert card0["nvlink_active"] == [True] * 13 + [False]
    assert [name for name in os.listdir(tmp_path)] == ["gpus.toml"]  # no temporary left


def test_a_bitmask_throttle_gets_the_bit(tmp_path: Path) -> None:
    doc = {"gpus": {"0": {"throttle_reasons": 0x4}}}
    assert apply_injection(doc, Injection("throttle", 0, "hw_slowdown"))["gpus"]["0"] == {
        "throttle_reasons": 0xC
    }


def test_a_bad_injection_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    inject(path, Injection("card_count", None, 2))
    before = path.read_bytes()
    with pytest.raises(MockFormatError, match="gpus.5: card index beyond card_count = 2"):
        inject(path, Injection("xid", 5, 79))
    with pytest.raises(MockFormatError, match="gpus.0.temperature: must be in"):
        inject(path, Injection("temperature", 0, 900))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["gpus.toml"]


def test_a_malformed_file_is_not_edited(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    path.write_text("[gpus]\n[gpus.0]\necc_aggregate_dbe = 'lots'\n")
    with pytest.raises(MockFormatError, match="gpus.0.ecc_aggregate_dbe: must be an integer"):
        inject(path, Injection("ecc_dbe", 0, 1))
    assert path.read_text() == "[gpus]\n[gpus.0]\necc_aggregate_dbe = 'lots'\n"


def test_card_count_drops_cards_beyond_it_and_clear_resets(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    for gpu in range(4):
        inject(path, Injection("remap_pending", gpu), new_card_count=4)
    inject(path, Injection("nvml_init_error", None, 9))
    assert sorted(load(path).cards) == [0, 1, 2, 3]
    inject(path, Injection("card_count", None, 2))
    assert sorted(load(path).cards) == [0, 1]
    inject(path, Injection("clear", 0))
    assert sorted(load(path).cards) == [1] and load(path).nvml_init_error == 9
    inject(path, Injection("clear", None))
    config = load(path)
    assert (config.cards, config.nvml_init_error, config.card_count) == ({}, 0, 2)


def test_an_unknown_injection_kind_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown injection 'melt'"):
        Injection("melt", 0)


_INJECTION = st.one_of(
    st.builds(Injection, st.sampled_from(["xid", "ecc_dbe", "ecc_sbe", "link_width", "temperature"]),
              st.integers(0, 3), st.integers(0, 200)),
    st.builds(Injection, st.sampled_from(["remap_pending", "remap_failure", "fail_read", "clear"]),
              st.integers(0, 3)),
    st.builds(Injection, st.just("throttle"), st.integers(0, 3), st.sampled_from(list(THROTTLE_REASONS))),
    st.builds(Injection, st.just("nvlink_down"), st.integers(0, 3), st.integers(0, 35)),
    st.builds(Injection, st.just("nvml_init_error"), st.none(), st.integers(0, 20)),
    st.builds(Injection, st.just("clear"), st.none()),
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.lists(_INJECTION, max_size=8))
def test_any_injections_leave_a_valid_file_or_refuse_and_clear_heals_it(
    injections: list[Injection],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gpus.toml"
        for injection in injections:
            before = path.read_bytes() if path.exists() else None
            try:
                inject(path, injection, new_card_count=4)
            except MockFormatError:  # out of bounds (x65 link, 201 C): refused, file as it was
                assert (path.read_bytes() if path.exists() else None) == before
        if path.exists():
            assert load(path).card_count == 4
        inject(path, Injection("clear", None), new_card_count=4)
        health = check_once(nvml_mock=path, node="n", expect_gpus=4, now=0.0)
        assert health.healthy and [g.problems for g in health.gpus] == [()] * 4
        assert os.listdir(folder) == ["gpus.toml"]
