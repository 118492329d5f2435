"""The router benchmark's seeded workloads and its oracle (``bench/router.py`` drives them).

A workload is a list of *sessions*; a session starts at ``start_s`` (open-loop Poisson or
a trace's arrival times) and sends its turns one after another, each ``think_s`` after the
previous reply ended (single-request workloads are one-turn sessions). A turn is either a
fixed completion prompt, or a chat turn whose messages are the session's history so far
(the assistant replies as the engine streamed them) plus the next user message. Every arm
of a run replays the same sessions: the generator is a pure function of (name, seed, scale).

Prompts are words, and the simulator's default tokenizer (``sim.tokens.HashTokenizer``)
makes one token of each space-prefixed word, so ``n`` words are ``n`` tokens and equal text
is equal blocks. Workloads:

* ``tenants``: 16 tenants, each a 1,024-token system prompt, Poisson arrivals, a tenant
  per request (Zipf 0.6), a unique 48-token question; the shared prompts together are
  ~1.4x what one engine caches (768 blocks of 16), a quarter of them fits easily.
* ``chat``: Poisson session starts; 3-6 turns of 120-token user messages over a private
  256-token system prompt, 0.3 s mean think time, `/v1/chat/completions`, replies of 32.
* ``mooncake``: a replay of ``shared/traces/mooncake_conversation.jsonl``: conversations
  (requests chained by their ``hash_ids``: a later turn extends an earlier one's block
  chain) of at most 8,192 input tokens are sampled (2 per second of window), with their
  first 6 turns in trace order; conversation starts are spread over the window in trace
  order and gaps between turns divided by 60, at most 1.5 s. Each ``hash_id`` is a
  512-token block of words unique to that id, so equal ids give equal prefixes
  (the last block is cut to ``input_length``). Output capped at 16 tokens.
* ``azure_noreuse``: the no-reuse control: consecutive rows of
  ``shared/traces/azure2023_conv.csv`` from a seeded offset (context tokens capped at
  3,072: the engines' --max-model-len is 4,096; output at 16), inter-arrival gaps
  rescaled to the target rate; every prompt is unique words, so no request shares a
  block with another.
* ``hot_prefix``: one 2,048-token prefix shared by every request plus a unique 512-token
  suffix, at a rate one engine cannot prefill alone.

Decode lengths are capped (16-32 tokens): TTFT is what is measured, and the decode steps
of long outputs would cost this 2-core machine's CPU without changing the ordering.

``Oracle``: sees every engine's true cache from its KV events (``BlockStored`` /
``BlockRemoved`` / ``AllBlocksCleared``, the same 64-bit block hashes the engine computes:
``sim.blocks.block_hash`` over ``HashTokenizer`` ids) plus the blocks that requests it has
already sent will store, and prices each engine by the prefill work ahead of the request's
first token: its uncached prompt tokens there + the uncached tokens of the requests in
flight there that have not produced a token yet. It picks the engine with the longest
cached prefix among those within ``SLACK_TOKENS`` (~0.1 s) of the cheapest: the longest
prefix under a load gate priced in the same unit. Rejected: the cheapest engine alone
(a tenant's second request went to an idle engine while the first was still prefilling:
duplicated prompts, hit rate 0.45 against sglang's 0.56 in the first run), and the longest
prefix among engines within 4,096 queued tokens of the least queued (piled a hot prefix on
one engine: twice its fair share).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.blocks import block_hash, external_hash
from sim.tokens import FileTokenizer, HashTokenizer, Tokenizer, render_chat

TRACES = Path("/work/shared/traces")
WORKLOADS = ("tenants", "chat", "mooncake", "azure_noreuse", "hot_prefix")
BLOCK_SIZE = 16  # the simulated engines' --block-size
SLACK_TOKENS = 1024  # the oracle's load gate: ~0.1 s of prefill on the default profile


@dataclass
class Turn:
    prompt: str | None = None  # completions prompt; None = a chat turn
    user: str | None = None  # chat: this turn's user message
    max_tokens: int = 16
    think_s: float = 0.0  # after the previous turn's reply ended


@dataclass
class Session:
    start_s: float
    turns: list[Turn]
    system: str | None = None  # chat sessions: the system message
    history: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    name: str
    sessions: list[Session]
    engine_flags: dict[str, Any]  # per-engine `shoal sim engine` flags for this workload
    requests: int
    warmup_s: float = 0.0  # sessions starting before this are warm-up, not measured


# With ``use_tokenizer``: the words that are one token each after a space in the engines'
# tokenizer (byte-level BPE: ``Ġword`` entries), so n words are still ~n tokens.
_VOCAB: list[str] = []


def use_tokenizer(directory: str | Path) -> None:
    """Draw prompt words from ``directory``'s tokenizer.json (one token per word) instead
    of tagged hex words, for engines that tokenize with it (the precise-routing fleet)."""
    vocab = json.loads((Path(directory) / "tokenizer.json").read_text())["model"]["vocab"]
    _VOCAB[:] = sorted(
        w[1:]
        for w in vocab
        if w.startswith("\u0120") and w[1:].isalpha() and w[1:].islower() and 3 <= len(w) <= 11
    )


def _words(rng: random.Random, n: int, tag: str) -> str:
    if _VOCAB:
        return " ".join(rng.choice(_VOCAB) for _ in range(n))
    return " ".join(f"{tag}{rng.randrange(1 << 30):x}" for _ in range(n))


def _poisson_starts(rng: random.Random, rate: float, seconds: float) -> list[float]:
    starts, t = [], rng.expovariate(rate)
    while t < seconds:
        starts.append(t)
        t += rng.expovariate(rate)
    return starts


def _zipf_pick(rng: random.Random, n: int, s: float) -> int:
    weights = [1 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights)[0]


def tenants(seed: int, seconds: float, rate: float = 28.0) -> Workload:
    rng = random.Random(f"tenants/{seed}")
    systems = [_words(rng, 1024, f"t{i}_") for i in range(16)]
    sessions = []
    for start in _poisson_starts(rng, rate, seconds):
        tenant = _zipf_pick(rng, len(systems), 0.6)
        prompt = systems[tenant] + " " + _words(rng, 48, "q")
        sessions.append(Session(start, [Turn(prompt=prompt, max_tokens=16)]))
    return Workload("tenants", sessions, {"num_gpu_blocks": 768}, len(sessions))


def chat(seed: int, seconds: float, rate: float = 3.0) -> Workload:
    rng = random.Random(f"chat/{seed}")
    sessions = []
    for i, start in enumerate(_poisson_starts(rng, rate, seconds)):
        turns = [
            Turn(user=_words(rng, 120, f"u{i}_"), max_tokens=32, think_s=rng.expovariate(1 / 0.3))
            for _ in range(rng.randint(3, 6))
        ]
        sessions.append(Session(start, turns, system=_words(rng, 256, f"s{i}_")))
    count = sum(len(s.turns) for s in sessions)
    return Workload("chat", sessions, {"num_gpu_blocks": 640}, count)


class _BlockTexts:
    """The 512 words of one Mooncake ``hash_id``: a pure function of the id."""

    def __init__(self) -> None:
        self._cache: dict[int, list[str]] = {}

    def words(self, hash_id: int) -> list[str]:
        found = self._cache.get(hash_id)
        if found is None:
            rng = random.Random(f"mooncake-block/{hash_id}")
            found = (
                [rng.choice(_VOCAB) for _ in range(512)]
                if _VOCAB
                else [f"m{hash_id}_{rng.randrange(1 << 20):x}" for _ in range(512)]
            )
            self._cache[hash_id] = found
        return found

    def prompt(self, hash_ids: Sequence[int], length: int) -> str:
        words: list[str] = []
        for hid in hash_ids:
            words.extend(self.words(hid))
        return " ".join(words[:length])


def mooncake(seed: int, seconds: float, rate: float = 2.0) -> Workload:
    rows = [json.loads(line) for line in (TRACES / "mooncake_conversation.jsonl").open()]
    owner: dict[int, int] = {}
    conv_of: list[int] = []
    members: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        ids = row["hash_ids"]
        parent = owner.get(ids[1]) if len(ids) > 1 else None
        conv = conv_of[parent] if parent is not None else i
        conv_of.append(conv)
        members.setdefault(conv, []).append(i)
        for hid in ids[1:]:
            owner.setdefault(hid, i)
    eligible = [
        c
        for c, m in members.items()
        if len(m) >= 2 and all(rows[i]["input_length"] <= 8192 for i in m)
    ]
    rng = random.Random(f"mooncake/{seed}")
    chosen = sorted(rng.sample(eligible, max(6, round(rate * seconds))))
    first = [rows[members[c][0]]["timestamp"] for c in chosen]
    t0, t1 = min(first), max(first)
    span = max(t1 - t0, 1)
    texts = _BlockTexts()
    sessions = []
    for conv in chosen:
        turns = []
        previous = None
        for i in members[conv][:6]:
            row = rows[i]
            gap = 0.0 if previous is None else min((row["timestamp"] - previous) / 1000 / 60, 1.5)
            previous = row["timestamp"]
            prompt = texts.prompt(row["hash_ids"], row["input_length"])
            turns.append(
                Turn(prompt=prompt, max_tokens=max(1, min(row["output_length"], 16)), think_s=gap)
            )
        start = (rows[members[conv][0]]["timestamp"] - t0) / span * seconds
        sessions.append(Session(start, turns))
    count = sum(len(s.turns) for s in sessions)
    return Workload("mooncake", sessions, {"num_gpu_blocks": 2048, "max_model_len": 16384}, count)


def azure_noreuse(seed: int, seconds: float, rate: float = 12.0) -> Workload:
    with (TRACES / "azure2023_conv.csv").open() as f:
        rows = [
            (r["TIMESTAMP"], int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for r in csv.DictReader(f)
        ]
    rng = random.Random(f"azure/{seed}")
    count = max(1, round(rate * seconds))
    offset = rng.randrange(len(rows) - count - 1)
    window = rows[offset : offset + count + 1]
    stamps = [_seconds(t) for t, _, _ in window]
    gaps = [max(b - a, 0.0) for a, b in itertools.pairwise(stamps)]
    scale = seconds / max(sum(gaps), 1e-9)
    sessions, t = [], 0.0
    for i, (_, context, generated) in enumerate(window[1:]):
        t += gaps[i] * scale
        prompt = _words(rng, max(16, min(context, 3072)), f"a{i}_")
        sessions.append(Session(t, [Turn(prompt=prompt, max_tokens=max(1, min(generated, 16)))]))
    return Workload("azure_noreuse", sessions, {"num_gpu_blocks": 1024}, len(sessions))


def _seconds(stamp: str) -> float:
    clock = stamp.split(" ")[1]
    h, m, s = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def hot_prefix(seed: int, seconds: float, rate: float = 24.0) -> Workload:
    rng = random.Random(f"hot/{seed}")
    prefix = _words(rng, 2048, "hot")
    sessions = [
        Session(start, [Turn(prompt=prefix + " " + _words(rng, 512, "x"), max_tokens=16)])
        for start in _poisson_starts(rng, rate, seconds)
    ]
    return Workload("hot_prefix", sessions, {"num_gpu_blocks": 1024}, len(sessions))


BUILDERS = {
    "tenants": tenants,
    "chat": chat,
    "mooncake": mooncake,
    "azure_noreuse": azure_noreuse,
    "hot_prefix": hot_prefix,
}


def build(name: str, seed: int, seconds: float, warmup_s: float) -> Workload:
    """``name``'s sessions over ``warmup_s + seconds``; the first ``warmup_s`` warm the
    caches and are not measured."""
    workload = BUILDERS[name](seed, warmup_s + seconds)
    return dataclasses.replace(workload, warmup_s=warmup_s)


# --- the oracle ---------------------------------------------------------------------------


def prompt_hashes(tokenizer: Tokenizer, body: dict[str, Any]) -> tuple[list[int], int]:
    """(the request's full-block hashes as the engine publishes them, prompt tokens)."""
    if "messages" in body:
        ids = tokenizer.encode(render_chat(body["messages"]))
    else:
        ids = tokenizer.encode(body["prompt"])
    hashes, parent = [], None
    for start in range(0, len(ids) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = block_hash(parent, ids[start : start + BLOCK_SIZE], None)
        hashes.append(external_hash(parent))
    return hashes, len(ids)


class Oracle:
    """See the module docstring. ``apply`` takes decoded KV-event batches per engine; the
    bench calls ``place`` before it sends, ``first_token`` and ``done`` as replies come."""

    def __init__(self, engines: int, tokenizer: str | None = None) -> None:
        self.tokenizer: Tokenizer = FileTokenizer(tokenizer) if tokenizer else HashTokenizer()
        self.cached: list[set[int]] = [set() for _ in range(engines)]
        self.inflight: list[dict[int, tuple[list[int], int]]] = [{} for _ in range(engines)]
        self.pending_tokens = [0] * engines
        self._next = 0

    def apply(self, engine: int, events: Sequence[dict[str, Any]]) -> None:
        cached = self.cached[engine]
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored":
                cached.update(event["block_hashes"])
            elif kind == "BlockRemoved":
                cached.difference_update(event["block_hashes"])
            elif kind == "AllBlocksCleared":
                cached.clear()

    def _hit_blocks(self, engine: int, hashes: Sequence[int]) -> int:
        cached = self.cached[engine]
        soon: set[int] = set()
        for request_hashes, _ in self.inflight[engine].values():
            soon.update(request_hashes)
        n = 0
        for h in hashes:
            if h not in cached and h not in soon:
                break
            n += 1
        return n

    def place(self, body: dict[str, Any], alive: Sequence[bool]) -> tuple[int, int]:
        """(engine index, request key) for one request; the key goes to first_token/done.
        See the module docstring: the warmest engine whose expected work ahead of this
        request's first token is within ``SLACK_TOKENS`` of the least."""
        hashes, tokens = prompt_hashes(self.tokenizer, body)
        live = [e for e in range(len(self.cached)) if alive[e]]
        uncached = {e: tokens - self._hit_blocks(e, hashes) * BLOCK_SIZE for e in live}
        cost = {e: uncached[e] + self.pending_tokens[e] + 8 * len(self.inflight[e]) for e in live}
        least = min(cost.values())
        best = min(
            (e for e in live if cost[e] <= least + SLACK_TOKENS),
            key=lambda e: (uncached[e], cost[e]),
        )
        key_id = self._next
        self._next += 1
        self.inflight[best][key_id] = (hashes, uncached[best])
        self.pending_tokens[best] += uncached[best]
        return best, key_id

    def first_token(self, engine: int, key: int) -> None:
        entry = self.inflight[engine].get(key)
        if entry is not None and entry[1]:
            self.pending_tokens[engine] -= entry[1]
            self.inflight[engine][key] = (entry[0], 0)

    def done(self, engine: int, key: int) -> None:
        entry = self.inflight[engine].pop(key, None)
        if entry is not None:
            self.pending_tokens[engine] -= entry[1]
