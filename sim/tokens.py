"""Text <-> token ids for the simulator, and the tokens it "generates".

* ``HashTokenizer`` (default): a prompt is split into words and the whitespace before them
  (``re`` ``\\s*\\S+``), each piece hashed (blake2b, 8 bytes) into ``[FIRST_ID, vocab)``.
  Deterministic across processes and machines (no ``hash()`` salt), so two simulated
  engines, or a simulated engine and a test, agree on a prompt's ids and so on its prefix
  blocks. Decoding maps an id back to a short pseudo-word; it is not the inverse of
  encoding (the simulator never needs that).
* ``FileTokenizer`` (``--tokenizer DIR``): the ``tokenizers`` library's ``tokenizer.json``
  in DIR, as a real engine with that tokenizer would count tokens.

Generated tokens are ``generated_token(request_seed, index)``: a pure function, so a
request's output is the same on every run and on every engine given the same prompt.
Chat messages are rendered as ``"<|role|>\\n" + content`` lines (not the model's Jinja chat
template; the token count differs from a real engine's by the template's few tokens).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from shoal.errors import ConfigError

__all__ = [
    "FIRST_ID",
    "FileTokenizer",
    "HashTokenizer",
    "Tokenizer",
    "generated_token",
    "render_chat",
]

FIRST_ID = 16  # ids below are left for specials, as real vocabularies do
_PIECES = re.compile(r"\s*\S+|\s+")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fu")


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode_one(self, token_id: int) -> str: ...


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashTokenizer:
    """Words hashed into a vocabulary; see the module docstring."""

    def __init__(self, vocab_size: int = 32000) -> None:
        if vocab_size <= FIRST_ID:
            raise ConfigError(f"vocab size must be > {FIRST_ID}, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - FIRST_ID
        return [FIRST_ID + _hash64(p.encode()) % span for p in _PIECES.findall(text)]

    def decode_one(self, token_id: int) -> str:
        n = token_id
        word = ""
        for _ in range(2):
            word += _SYLLABLES[n % len(_SYLLABLES)]
            n //= len(_SYLLABLES)
        return " " + word


class FileTokenizer:
    """A ``tokenizer.json`` (HF ``tokenizers``) read from ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ModuleNotFoundError:
            raise ConfigError("--tokenizer needs the 'tokenizers' package") from None
        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        try:
            self._tokenizer: Any = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for every failure
            raise ConfigError(f"--tokenizer: cannot load {path}: {exc}") from None
        self.vocab_size = int(self._tokenizer.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode_one(self, token_id: int) -> str:
        return str(self._tokenizer.decode([token_id]))


def generated_token(seed: int, index: int, vocab_size: int) -> int:
    """The ``index``-th generated token of a request whose prompt hashes to ``seed``."""
    span = vocab_size - FIRST_ID
    return FIRST_ID + _hash64(seed.to_bytes(8, "big") + index.to_bytes(4, "big")) % span


def prompt_seed(prompt_ids: Sequence[int]) -> int:
    """A request's generation seed: a hash of its prompt ids."""
    return _hash64(
        b"".join(t.to_bytes(4, "big") for t in prompt_ids[-64:]) + bytes([len(prompt_ids) % 256])
    )


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages as one prompt text (see the module docstring)."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        lines.append(f"<|{message.get('role', 'user')}|>\n{content or ''}")
    return "\n".join(lines) + "\n<|assistant|>\n"
