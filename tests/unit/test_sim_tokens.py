"""The simulator's tokenizers: deterministic hashed words, or a real tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.errors import ConfigError
from sim.tokens import FIRST_ID, FileTokenizer, HashTokenizer, generated_token, render_chat


def test_hashed_words_are_stable_and_inside_the_vocabulary() -> None:
    tokenizer = HashTokenizer(vocab_size=100)
    ids = tokenizer.encode("the cat  sat\non the mat")
    assert ids == HashTokenizer(vocab_size=100).encode("the cat  sat\non the mat")
    assert len(ids) == 6 and all(FIRST_ID <= t < 100 for t in ids)
    assert ids[0] != ids[4], "a piece keeps its leading whitespace: 'the' != ' the'"
    assert tokenizer.encode("the cat")[:1] == ids[:1], "prefix text, prefix ids"


def test_generated_tokens_are_a_pure_function_of_seed_and_index() -> None:
    assert [generated_token(7, i, 50) for i in range(5)] == [
        generated_token(7, i, 50) for i in range(5)
    ]
    assert generated_token(7, 0, 50) != generated_token(8, 0, 50) or generated_token(
        7, 1, 50
    ) != generated_token(8, 1, 50)


def test_chat_messages_render_with_their_roles() -> None:
    text = render_chat(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ]
    )
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"


def test_a_tokenizer_json_counts_like_the_model_would(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = FileTokenizer(tmp_path)
    assert loaded.vocab_size == 3
    assert loaded.encode("hello world again") == [1, 2, 0]
    assert loaded.decode_one(2) == "world"
    with pytest.raises(ConfigError, match="cannot load"):
        FileTokenizer(tmp_path / "missing")
