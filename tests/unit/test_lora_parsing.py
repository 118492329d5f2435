"""Pure parsing of what the manager reads: /v1/models, an engine's max_lora, the
router's arrivals, and the settings' own checks."""

from __future__ import annotations

import pytest

from control.lora.config import LoraSettings
from control.lora.engines import EngineModels, parse_max_loras, parse_models
from control.lora.errors import LoadRejected
from control.lora.traffic import parse_arrivals
from shoal.errors import ConfigError


def card(name: str, parent: str | None) -> dict[str, object]:
    return {"id": name, "object": "model", "parent": parent}


class TestModels:
    def test_adapters_are_cards_whose_parent_is_the_base(self) -> None:
        body = {"data": [card("llama", None), card("sql", "llama"), card("x", "other")]}
        assert parse_models(body) == EngineModels("llama", frozenset({"sql"}))

    def test_not_a_model_list(self) -> None:
        with pytest.raises(LoadRejected, match="not an OpenAI model list"):
            parse_models({"object": "error"})

    def test_max_lora_label(self) -> None:
        text = (
            "# TYPE vllm:lora_requests_info gauge\n"
            'vllm:lora_requests_info{max_lora="4",running_lora_adapters="a",'
            'waiting_lora_adapters=""} 1.7e9\n'
        )
        assert parse_max_loras(text) == 4
        assert parse_max_loras("# TYPE vllm:lora_requests_info gauge\n") is None


class TestArrivals:
    TEXT = (
        "# TYPE shoal_router_arrivals counter\n"
        'shoal_router_arrivals_total{model="sql"} 30.0\n'
        'shoal_router_arrivals_total{model="chat"} 4.0\n'
        'shoal_router_arrivals_created{model="sql"} 1.7e9\n'
    )

    def test_counts_per_model(self) -> None:
        assert parse_arrivals(self.TEXT) == {"sql": 30.0, "chat": 4.0}


class TestSettings:
    def test_beyond_loopback_needs_a_token(self) -> None:
        with pytest.raises(ConfigError, match="--auth-token-file"):
            LoraSettings(host="0.0.0.0")
        assert LoraSettings(host="0.0.0.0", insecure_no_auth=True).port == 8092
        assert LoraSettings(host="0.0.0.0", auth_token_file="/t").host == "0.0.0.0"

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [("interval_s", 0.0, "--interval-s"), ("hysteresis", 1.0, "--hysteresis"),
         ("budget", -1, "--budget"), ("max_concurrency", 0, "--max-concurrency"),
         ("balance", -0.1, "--balance"), ("rate_window_s", 0.0, "--rate-window-s")],
    )  # fmt: skip
    def test_bad_values(self, field: str, value: float, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            LoraSettings(**{field: value})  # type: ignore[arg-type]

    def test_state_file_defaults_into_the_adapter_dir(self) -> None:
        settings = LoraSettings(adapter_dir="/srv/lora")
        assert str(settings.state_path) == "/srv/lora/registry.json"
