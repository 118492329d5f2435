"""The precise locator's pure parts: a daemon's answer priced per engine in tokens, the
engines' namespace read from a daemon's status, and prompts rendered as the engines
render them (the tiny Llama's tokenizer and chat template, and synthetic templates in a
temporary model directory). The exact match with a real vLLM is checked by hand and in
``tests/integration/test_router_precise.py`` against simulated engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest

from kvcache.client import ClusterLookup
from kvcache.keys import Namespace
from router.precise import PromptTokenizer, engine_namespace, prefix_view
from router.types import EnginePrefix, EngineView, RouteRequest
from shoal.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / ".cache/engine/tiny-llama"
needs_tiny = pytest.mark.skipif(
    not (TINY / "tokenizer.json").exists(), reason="the tiny model is missing: scripts/setup-engine"
)


def engine(engine_id: str, stream: str = "") -> EngineView:
    return EngineView(engine_id, f"http://{engine_id}", frozenset({"m"}),
                      node=stream.partition("/")[0], stream=stream)  # fmt: skip


# -- pricing ------------------------------------------------------------------------


def test_a_lookup_is_priced_per_engine_in_tokens_capped_at_the_prompt() -> None:
    found = ClusterLookup(
        length=2,  # this node's daemon holds 2 chunks
        remote_length=5,  # with peers' help, 5
        runs=(("node-b", "10.0.0.2:7100", 5), ("node-c", "10.0.0.3:7100", 3)),
        gpu=(("node-b/gpu1", 6), ("node-a/gpu0", 1)),
    )
    engines = [
        engine("a0", "node-a/gpu0"),  # this node
        engine("a1", "node-a/gpu1"),
        engine("b1", "node-b/gpu1"),
        engine("c0", "node-c/gpu0"),
        engine("d0", "node-d/gpu0"),  # a member holding nothing of it
        engine("x"),  # no stream: found by dns/k8s
    ]
    view = prefix_view(found, 700, engines, chunk_tokens=128, local_node="node-a")
    assert view.source == "precise" and view.prompt_tokens == 700
    assert dict(view.engines) == {
        "a0": EnginePrefix(gpu_tokens=128, node_tokens=256, peer_tokens=640),
        "a1": EnginePrefix(gpu_tokens=0, node_tokens=256, peer_tokens=640),
        "b1": EnginePrefix(gpu_tokens=700, node_tokens=640, peer_tokens=640),  # 768 capped
        "c0": EnginePrefix(gpu_tokens=0, node_tokens=384, peer_tokens=640),
        "d0": EnginePrefix(gpu_tokens=0, node_tokens=0, peer_tokens=640),
    }
    assert view.of("x") == EnginePrefix()


def test_nothing_anywhere_is_an_empty_view() -> None:
    view = prefix_view(ClusterLookup(0, 0, ()), 300, [engine("a0", "n/gpu0")], 256, "n")
    assert dict(view.engines) == {} and view.prompt_tokens == 300


# -- the daemon's namespace ---------------------------------------------------------


def test_the_engines_namespace_comes_from_the_daemons_status() -> None:
    ns = Namespace("m@rev", layout="vllm0.32/LBHNC/b128/FullAttentionSpec:2x64")
    status = {"engines": [{"stream": "n/gpu0", "namespace": ns.to_wire(), "chunk_tokens": 256},
                          {"stream": "n/gpu1", "namespace": ns.to_wire(), "chunk_tokens": 256}]}  # fmt: skip
    assert engine_namespace(status) == (ns, 256)
    assert engine_namespace({"engines": []}) is None
    assert engine_namespace({"engines": [{"namespace": "m/bfloat16", "chunk_tokens": 256}]}) is None


# -- tokens -------------------------------------------------------------------------


@needs_tiny
def test_the_tiny_llamas_chat_template_renders_as_vllm_renders_it() -> None:
    tokenizer = PromptTokenizer(TINY)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "one"},
                                             {"type": "image_url", "image_url": {"url": "x"}},
                                             {"type": "text", "text": "two"}]}]  # fmt: skip
    assert tokenizer.render_chat(messages) == (
        "<s>system\nBe brief.</s>\n<s>user\none\ntwo</s>\n<s>assistant\n"
    )
    request = RouteRequest("r", "chat", "tiny", "", 0, messages=tuple(messages))
    ids = tokenizer.token_ids(request)
    assert ids is not None and ids[0] == 1  # <s>, written by the template, not added twice
    assert ids.count(1) == 3
    # token ids given by the client are used as they are; a chat without messages is unknown
    assert tokenizer.token_ids(
        RouteRequest("r", "completions", "tiny", "", 3, token_ids=(5, 6, 7))
    ) == [5, 6, 7]
    assert tokenizer.token_ids(RouteRequest("r", "chat", "tiny", "x", 1)) is None


@needs_tiny
def test_the_simulator_dialect_renders_chat_as_the_simulator_does() -> None:
    from sim.tokens import FileTokenizer, render_chat

    messages = [{"role": "user", "content": "What is cached?"}]
    ours = PromptTokenizer(TINY, dialect="simulator")
    sim = FileTokenizer(TINY)
    assert ours.encode_chat(messages) == sim.encode(render_chat(messages))
    assert ours.encode_text("plain text prompt") == sim.encode("plain text prompt")


def model_dir(tmp_path: Path, config: dict[str, object]) -> Path:
    """A model directory with the tiny tokenizer and ``config`` as tokenizer_config.json."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "tokenizer.json").write_text((TINY / "tokenizer.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@needs_tiny
def test_templates_in_tokenizer_config_win_and_see_transformers_helpers(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}"
        "{{ raise_exception('no tools') }}{% endif %}"
        "[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    directory = model_dir(tmp_path, {"bos_token": {"content": "<s>", "special": True},
                                     "chat_template": [{"name": "default", "template": template},
                                                       {"name": "tool_use", "template": "x"}]})  # fmt: skip
    (directory / "chat_template.jinja").write_text("ignored: tokenizer_config.json's wins")
    tokenizer = PromptTokenizer(directory)
    assert (
        tokenizer.render_chat([{"role": "user", "content": " hi "}]) == "<s>[user] hi\n[assistant] "
    )
    with pytest.raises(jinja2.TemplateError, match="no tools"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])


@needs_tiny
def test_no_chat_template_means_chat_is_unknown(tmp_path: Path) -> None:
    tokenizer = PromptTokenizer(model_dir(tmp_path, {}))
    assert tokenizer.encode_chat([{"role": "user", "content": "hi"}]) is None
    assert tokenizer.encode_text("hi") == PromptTokenizer(TINY).encode_text("hi")


def test_a_missing_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        PromptTokenizer(tmp_path)
    with pytest.raises(ConfigError, match="dialect"):
        PromptTokenizer(tmp_path, dialect="sglang")


# -- the token cache ----------------------------------------------------------------


def conversation(turns: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You answer briefly. " * 30}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: why é? " * (turn + 3)})
        messages.append({"role": "assistant", "content": f"Because {turn}. " * 5})
    return messages


@needs_tiny
def test_each_turn_of_a_conversation_reuses_the_last_and_equals_a_whole_tokenization() -> None:
    from tokenizers import Tokenizer

    whole = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    tokenizer = PromptTokenizer(TINY)
    for turns in range(1, 8):
        messages = conversation(turns)[:-1]  # ends with the user's question
        text = tokenizer.render_chat(messages)
        assert text is not None
        assert tokenizer.encode_chat(messages) == whole.encode(text, add_special_tokens=False).ids
    stats = tokenizer.statistics()
    assert (stats.num_encoded, stats.num_continued, stats.enabled) == (1, 6, True)
    assert stats.num_verified == 6  # the first ones are all checked
    again = tokenizer.encode_chat(conversation(3)[:-1])
    assert tokenizer.statistics().num_repeated == 1
    assert again == whole.encode(tokenizer.render_chat(conversation(3)[:-1]) or "",
                                 add_special_tokens=False).ids  # fmt: skip


class TailBreaking:
    """A tokenizer whose text after a special token tokenizes differently alone (as
    Metaspace's "first" prepending can): the cache must notice and stop continuing."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def get_added_tokens_decoder(self) -> Any:
        return self.real.get_added_tokens_decoder()

    def encode(self, text: str, add_special_tokens: bool = True) -> Any:
        encoding = self.real.encode(text, add_special_tokens=add_special_tokens)
        if not text.startswith("<s>"):
            return encoding
        ids = [7, *encoding.ids]  # a marker only a tail that starts with <s> gets
        return _Encoding(ids, [(0, 0), *encoding.offsets])


class _Encoding:
    """The parts of ``tokenizers.Encoding`` the token cache reads, over given offsets."""

    def __init__(self, ids: list[int], offsets: list[tuple[int, int]]) -> None:
        self.ids = ids
        self.offsets = offsets

    def token_to_chars(self, index: int) -> tuple[int, int]:
        return self.offsets[index]

    def char_to_token(self, char: int) -> int | None:
        return next((k for k, (a, b) in enumerate(self.offsets) if a <= char < b), None)


@needs_tiny
def test_a_tokenizer_that_is_not_separable_is_caught_and_tokenized_whole() -> None:
    from tokenizers import Tokenizer

    from router.precise import _TokenCache

    real = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    cache = _TokenCache(TailBreaking(real), ["<s>", "</s>"])
    first = "a</s>\n<s>user\nfirst"
    second = first + "</s>\n<s>user\nsecond"
    assert cache.encode(first, add_special_tokens=False) == real.encode(first).ids
    assert cache.encode(second, add_special_tokens=False) == real.encode(second).ids
    assert not cache.statistics().enabled
    third = second + "</s>\n<s>user\nthird"
    assert cache.encode(third, add_special_tokens=False) == real.encode(third).ids
    assert cache.statistics().num_continued == 1  # never again once off


@needs_tiny
def test_the_cache_keeps_at_most_max_prompts_and_their_anchors() -> None:
    from tokenizers import Tokenizer

    from router.precise import _TokenCache

    real = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    cache = _TokenCache(real, ["<s>", "</s>"], max_prompts=2)
    texts = [f"<s>user\nprompt {i}</s>\n<s>assistant\n" for i in range(5)]
    for text in texts:
        assert cache.encode(text, add_special_tokens=False) == real.encode(text).ids
    assert len(cache._prompts) == 2
    owners = {owner for owner, _k in cache._anchors.values()}
    assert owners <= set(cache._prompts)
