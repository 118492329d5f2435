"""Where a prompt's prefix lives in the cluster, asked of the local cache daemon.

The ``precise-prefix`` and ``shoal`` strategies need, per candidate engine, how many of a
request's leading tokens are already on its GPU, in its node's cache daemon, or on a
peer's. The cache daemon knows all three: its own store, its peers' indexes, and every
engine's GPU prefixes from vLLM's KV events, all keyed by Shoal chain keys
(``kvcache/keys.py``). So the router computes the keys the engines' connectors compute,
and asks one question::

    request ──PromptTokenizer──► token ids ──chain_keys(ns, ids, C)──► keys
    keys ──AsyncCacheClient.locate──► ClusterLookup(length, remote_length, runs, gpu)
    ──► PrefixView: per engine  gpu_tokens  = gpu[engine.stream] x C
                                node_tokens = length x C          (engine on this node)
                                            | runs[engine.node] x C (on a peer node)
                                peer_tokens = remote_length x C
        (every figure capped at the prompt's tokens; an engine with no known node, as dns
        and k8s discovery give, has only what its stream says, i.e. nothing)

Invariant: the keys are exactly the engines' own. That needs three things to match:

1. Tokens. ``PromptTokenizer`` reads the served model's ``tokenizer.json`` with the
   ``tokenizers`` library, as vLLM's fast tokenizer does. A completion's text prompt is
   encoded with the tokenizer's special tokens (vLLM's ``add_special_tokens`` default for
   completions); a chat's messages are rendered with the model's chat template
   (``chat_template`` in ``tokenizer_config.json``, else ``chat_template.jinja``) in a
   Jinja sandbox set up as ``transformers``' ``apply_chat_template`` sets it up
   (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
   ``strftime_now``, the special tokens as variables, ``add_generation_prompt=True``),
   content parts joined by newlines as vLLM's "string" content format does, and encoded
   without special tokens (vLLM's chat default: the template writes them). Checked
   against a real vLLM 0.32 serving the tiny Llama: equal ids from ``/tokenize`` and
   equal ``usage.prompt_tokens``. The simulator (``shoal sim engine --tokenizer DIR``)
   renders chat its own way (``sim.tokens.render_chat``) and never adds special tokens:
   ``dialect="simulator"`` follows it, for fleets of simulated engines. Not followed
   (the keys then differ from some chunk on, and the lookup finds less): a request's own
   ``chat_template``, ``chat_template_kwargs``, ``add_generation_prompt: false`` or
   ``continue_final_message``, and a batch of completion prompts (keyed as one text).
2. Namespace and chunk. The daemon's: the namespace its engines' connectors said hello
   with (or ``--engine-model`` ... on the daemon) and its ``engine_chunk_tokens``, read
   from its cluster status as ``shoal cache lookup`` does without ``--model``, and re-read
   every ``namespace_refresh_s`` (an engine that connects later teaches the daemon). An
   explicit ``namespace`` (``--engine-model``) overrides; ``chunk_tokens`` is then the
   router's ``--chunk-tokens``.
3. Chunk grid from token 0. vLLM's blocks (128 tokens on CPU) and the connector's chunks
   (256: two blocks) both start at the prompt's first token, so only full chunks match:
   a figure here is a multiple of C (at most C - 1 tokens short of the engine's truth).

Cost: tokenizing is about 1 us per token (5 ms for a 16 KiB prompt on the CI machine);
``_TokenCache`` reuses a recent prompt's ids up to a special token (a shared system
prompt, a conversation's earlier turns: 0.2 ms for a new question after a 16 KiB system
prompt), checked against whole tokenizations; keys cost 0.1 ms, the daemon's answer one
round trip on its socket.

Failure: any daemon error, a timeout (``timeout_s``, shorter than the pipeline's own
bound), an unknown namespace or a request the tokenizer cannot render is ``None`` (the
pipeline falls back to the approximate index), counted in ``statistics()`` and logged at
most once per ``log_interval_s``. Requests with a LoRA adapter or multimodal parts key
differently in the engines (extra keys) and are not mapped by the daemon either: their
lookups simply miss.

Rejected: re-implementing the index in the router (every replica would subscribe to every
engine's events and peer; the daemon already does, and the router stays stateless);
counting tiers cumulatively (the strategies price each tier separately).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2

from kvcache import messages as m
from kvcache.client import AsyncCacheClient, ClusterLookup
from kvcache.errors import CacheError
from kvcache.keys import Namespace, chain_keys
from router.types import EnginePrefix, EngineView, PrefixView, RouteRequest
from shoal.errors import ConfigError

__all__ = [
    "LocatorStats",
    "PreciseLocator",
    "PromptTokenizer",
    "TokenCacheStats",
    "engine_namespace",
    "prefix_view",
]

log = logging.getLogger("shoal." + __name__)

DIALECTS = ("vllm", "simulator")


class PromptTokenizer:
    """A request's prompt as the engines' token ids (module docstring, point 1)."""

    def __init__(self, directory: str | Path, *, dialect: str = "vllm") -> None:
        if dialect not in DIALECTS:
            raise ConfigError(f"tokenizer dialect {dialect!r} must be one of {DIALECTS}")
        self.dialect = dialect
        directory = Path(directory)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("--tokenizer needs the 'tokenizers' package") from None
        path = directory / "tokenizer.json"
        try:
            self._tokenizer: Any = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for every failure
            raise ConfigError(f"--tokenizer: cannot load {path}: {exc}") from None
        config = _read_json(directory / "tokenizer_config.json")
        self._specials = {
            name: _token_text(config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                         "cls_token", "mask_token")
        }  # fmt: skip
        added = [t.content for t in self._tokenizer.get_added_tokens_decoder().values()]
        self._cache = _TokenCache(self._tokenizer, added)
        self._template: Any = None
        source = _chat_template(directory, config)
        if source is not None and dialect == "vllm":
            self._template = _jinja_environment().from_string(source)

    def encode_text(self, text: str) -> list[int]:
        """A completion's text prompt."""
        return self._cache.encode(text, add_special_tokens=self.dialect == "vllm")

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int] | None:
        """A chat's messages, rendered and encoded; None without a chat template."""
        text = self.render_chat(messages)
        if text is None:
            return None
        return self._cache.encode(text, add_special_tokens=False)

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str | None:
        if self.dialect == "simulator":
            from sim.tokens import render_chat

            return render_chat([dict(message) for message in messages])
        if self._template is None:
            return None
        normalised = [_string_content(message) for message in messages]
        rendered: str = self._template.render(
            messages=normalised, add_generation_prompt=True, tools=None, documents=None,
            **self._specials,
        )  # fmt: skip
        return rendered

    def statistics(self) -> TokenCacheStats:
        return self._cache.statistics()

    def token_ids(self, request: RouteRequest) -> list[int] | None:
        """The ids the engine will see for ``request``; None when they cannot be known."""
        if request.token_ids is not None:
            return list(request.token_ids)
        if request.route == "chat":
            if not request.messages:
                return None
            return self.encode_chat(request.messages)
        return self.encode_text(request.prompt_text)


@dataclass(frozen=True, slots=True)
class TokenCacheStats:
    num_encoded: int  # prompts tokenized whole
    num_repeated: int  # prompts seen before, answered from the cache
    num_continued: int  # prompts that continued a cached one at a special token
    num_verified: int  # continued prompts also tokenized whole, to check
    enabled: bool  # continuing is on (off for good after one mismatch)


class _TokenCache:
    """Token ids of recent prompts, reused for a repeat and for a continuation.

    Tokenizing is the precise path's main cost (about 1 us per token: 5 ms for 16 KiB).
    A multi-turn chat re-sends every earlier turn, and its template separates turns with
    special tokens, which ``tokenizers`` cuts out before anything else runs: the text
    before one is tokenized without looking past it. So a prompt that equals a cached
    prompt up to the start of a special token reuses that prompt's ids up to that token,
    and only the rest is tokenized (as the tail of a text, without special tokens)::

        cached   [<s>system ... </s>\n<s>user q1</s>\n<s>assistant a1</s>\n]
        new      [<s>system ... </s>\n<s>user q1</s>\n<s>assistant a1</s>\n<s>user q2 ...]
                                                                          ^ anchor: reuse
                                                                            ids[:k], encode
                                                                            the rest

    Anchors are digests of the text before each special token (one running BLAKE2b
    over the text, so O(length) per prompt) mapped to (prompt, token index); a prompt's
    token index for an anchor is the token whose offset starts there. Whether a
    tokenizer really is separable there (normalizers and pre-tokenizers that look at the
    first split, post-processors that append) is checked, not assumed: the first 32
    continued prompts and one in 64 after are also tokenized whole, and one mismatch
    turns continuing off for good (logged). Repeats are always exact (whole results).
    Memory: ``max_prompts`` arrays of 4-byte ids, least recently used evicted.
    """

    VERIFY_FIRST = 32
    VERIFY_EVERY = 64

    def __init__(self, tokenizer: Any, added_tokens: Sequence[str], max_prompts: int = 512) -> None:
        self._tokenizer = tokenizer
        pieces = sorted({t for t in added_tokens if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self.max_prompts = max_prompts
        self._prompts: OrderedDict[bytes, tuple[array[int], list[bytes]]] = OrderedDict()
        self._anchors: dict[bytes, tuple[bytes, int]] = {}
        self.enabled = self._pattern is not None
        self._encoded = self._repeated = self._continued = self._verified = 0

    def statistics(self) -> TokenCacheStats:
        return TokenCacheStats(self._encoded, self._repeated, self._continued, self._verified,
                               self.enabled)  # fmt: skip

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        flag = b"1" if add_special_tokens else b"0"
        whole = hashlib.blake2b(flag + text.encode(), digest_size=16).digest()
        cached = self._prompts.get(whole)
        if cached is not None:
            self._prompts.move_to_end(whole)
            self._repeated += 1
            return cached[0].tolist()
        starts, digests = self._boundaries(text, flag)
        continued = self._continue(text, starts, digests) if self.enabled else None
        if continued is None:
            encoding = self._tokenizer.encode(text, add_special_tokens=add_special_tokens)
            ids = list(encoding.ids)
            self._encoded += 1
            self._remember(whole, ids, starts, digests, _token_starts(encoding, starts, 0, 0))
            return ids
        ids, positions = continued
        self._continued += 1
        if self._continued <= self.VERIFY_FIRST or self._continued % self.VERIFY_EVERY == 0:
            self._verified += 1
            check = list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)
            if check != ids:
                self.enabled = False
                log.warning("this tokenizer does not tokenize the text before a special token "
                            "on its own; prompts are tokenized whole from now on")  # fmt: skip
                return check
        self._remember(whole, ids, starts, digests, positions)
        return ids

    def _boundaries(self, text: str, flag: bytes) -> tuple[list[int], list[bytes]]:
        """Where special tokens start (past 0), with a digest of the text before each."""
        if self._pattern is None:
            return [], []
        starts = [m.start() for m in self._pattern.finditer(text) if m.start() > 0]
        hasher = hashlib.blake2b(flag, digest_size=16)
        digests = []
        previous = 0
        for start in starts:
            hasher.update(text[previous:start].encode())
            previous = start
            digests.append(hasher.copy().digest())
        return starts, digests

    def _continue(
        self, text: str, starts: list[int], digests: list[bytes]
    ) -> tuple[list[int], dict[int, int]] | None:
        """The ids of ``text`` from the latest anchored boundary, and the token index at
        each character where a token of the re-tokenized tail starts."""
        for index in range(len(starts) - 1, -1, -1):
            anchor = self._anchors.get(digests[index])
            if anchor is None:
                continue
            owner = self._prompts.get(anchor[0])
            if owner is None:
                del self._anchors[digests[index]]  # its prompt was evicted
                continue
            head = owner[0][: anchor[1]].tolist()
            tail = self._tokenizer.encode(text[starts[index] :], add_special_tokens=False)
            positions = _token_starts(tail, starts[index:], starts[index], len(head))
            return head + list(tail.ids), positions
        return None

    def _remember(self, whole: bytes, ids: list[int], starts: list[int], digests: list[bytes],
                  positions: Mapping[int, int]) -> None:  # fmt: skip
        """Keep ``ids`` and anchor each boundary whose token index is known: where a
        tokenized token starts, or from the anchors already known (a reused head)."""
        anchored: list[bytes] = []
        for start, digest in zip(starts, digests, strict=True):
            k = positions.get(start)
            if k is None and digest in self._anchors:
                k = self._anchors[digest][1]
            if k is not None:
                self._anchors[digest] = (whole, k)
                anchored.append(digest)
        self._prompts[whole] = (array("I", ids), anchored)
        while len(self._prompts) > self.max_prompts:
            old, (_ids, old_anchors) = self._prompts.popitem(last=False)
            for digest in old_anchors:
                if self._anchors.get(digest, (b"",))[0] == old:
                    del self._anchors[digest]


def _token_starts(encoding: Any, starts: Sequence[int], shift: int, first: int) -> dict[int, int]:
    """For each character ``start`` in ``starts`` (an offset ``shift`` into the encoded
    text), the index (plus ``first``) of the first token that starts exactly there.

    Asks the encoding per boundary (``char_to_token``, ``token_to_chars``: native) rather
    than walking ``encoding.offsets``: that list is built in Python on every access, and
    walking it cost ~5 ms for a 5,000-token prompt, more than tokenizing it (measured in
    the router bench: precise routing added 11 ms per request before this)."""
    positions: dict[int, int] = {}
    for start in starts:
        local = start - shift
        k = encoding.char_to_token(local) if local >= 0 else None
        while k is not None and k > 0 and encoding.token_to_chars(k - 1)[0] == local:
            k -= 1  # a character split into several byte tokens: the first one
        if k is not None and encoding.token_to_chars(k)[0] == local:
            positions[start] = k + first
    return positions


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer: cannot read {path}: {exc}") from None
    return document if isinstance(document, dict) else {}


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: text or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The template ``transformers`` would use: tokenizer_config.json's (the one named
    "default" when it lists several), else chat_template.jinja, else chat_template.json."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    loaded = _read_json(directory / "chat_template.json").get("chat_template")
    return loaded if isinstance(loaded, str) else None


def _jinja_environment() -> Any:
    """The sandbox ``transformers`` renders chat templates in."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)  # fmt: skip

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _string_content(message: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's "string" content format: a list of parts becomes its text parts joined by
    newlines."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, list):
        out["content"] = "\n".join(
            str(part.get("text", "")) for part in content
            if isinstance(part, dict) and part.get("type", "text") == "text"
        )  # fmt: skip
    return out


@dataclass(frozen=True, slots=True)
class LocatorStats:
    num_located: int  # lookups answered
    num_failures: int  # daemon errors and timeouts (each one an unknown prefix)
    num_unknown: int  # requests that could not be keyed (no namespace, no chat template)


def engine_namespace(cluster: Mapping[str, Any]) -> tuple[Namespace, int] | None:
    """The namespace and chunk size a daemon keys its engines' KV events in, from its
    cluster status (what ``shoal cache lookup`` uses without ``--model``); None when it
    follows no engine."""
    learned = {(e.get("namespace", ""), e.get("chunk_tokens", 0))
               for e in cluster.get("engines") or ()}  # fmt: skip
    if not learned:
        return None
    wire, chunk_tokens = min(learned)  # one: a daemon keys all its engines in one namespace
    namespace = Namespace.from_wire(str(wire))
    if namespace is None or int(chunk_tokens) <= 0:
        return None
    return namespace, int(chunk_tokens)


def prefix_view(
    found: ClusterLookup,
    num_tokens: int,
    engines: Sequence[EngineView],
    chunk_tokens: int,
    local_node: str,
) -> PrefixView:
    """A daemon's answer (in chunks) as tokens per engine (module docstring). Engines
    holding nothing anywhere are left out of the view."""

    def tokens(blocks: int) -> int:
        return min(blocks * chunk_tokens, num_tokens)

    gpu = dict(found.gpu)
    runs = {node: upto for node, _address, upto in found.runs}
    view: dict[str, EnginePrefix] = {}
    for engine in engines:
        node = engine.node or engine.stream.partition("/")[0]
        if node and node == local_node:
            node_blocks = found.length
        else:
            node_blocks = runs.get(node, 0) if node else 0
        prefix = EnginePrefix(
            gpu_tokens=tokens(gpu.get(engine.stream, 0)) if engine.stream else 0,
            node_tokens=tokens(node_blocks),
            peer_tokens=tokens(found.remote_length) if node else 0,  # no node: not a member
        )
        if prefix != EnginePrefix():
            view[engine.engine_id] = prefix
    return PrefixView("precise", num_tokens, view)


def _local_node(cluster: Mapping[str, Any]) -> str:
    node = cluster.get("node")
    if isinstance(node, str) and node:
        return node
    for engine in cluster.get("engines") or ():
        stream = str(engine.get("stream", ""))
        if "/" in stream:
            return stream.split("/", 1)[0]
    return ""


class PreciseLocator:
    """The ``PrefixLocator`` over the local cache daemon (module docstring)."""

    def __init__(
        self,
        client: AsyncCacheClient,
        tokenizer: PromptTokenizer,
        *,
        namespace: Namespace | None = None,
        chunk_tokens: int = 256,
        timeout_s: float = 0.04,
        namespace_refresh_s: float = 10.0,
        log_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if chunk_tokens <= 0:
            raise ConfigError(f"--chunk-tokens must be positive, got {chunk_tokens}")
        self._client = client
        self.tokenizer = tokenizer
        self._fixed = namespace is not None
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.node = ""
        self.timeout_s = timeout_s
        self.namespace_refresh_s = namespace_refresh_s
        self.log_interval_s = log_interval_s
        self._clock = clock
        self._status_at = -math.inf
        self._status_task: asyncio.Task[None] | None = None
        self._logged: dict[str, float] = {}
        self._located = self._failures = self._unknown = 0

    @classmethod
    def for_endpoint(
        cls,
        endpoint: str,
        tokenizer: PromptTokenizer,
        *,
        shm_dir: str | None = None,
        **kwargs: Any,
    ) -> PreciseLocator:
        """A locator on the daemon at ``endpoint`` (``ipc://PATH``, or a bare socket path);
        nothing is sent yet: ``start()`` or the first ``locate`` connects."""
        if "://" not in endpoint:
            endpoint = f"ipc://{endpoint}"
        # the client's own bound covers hello (arena mapping included); lookups are bounded
        # by ``timeout_s`` around each call
        client = AsyncCacheClient(endpoint, name="shoal-router", timeout_s=2.0, shm_dir=shm_dir)
        return cls(client, tokenizer, **kwargs)

    @classmethod
    async def connect(
        cls, endpoint: str, tokenizer: PromptTokenizer, **kwargs: Any
    ) -> PreciseLocator:
        """``for_endpoint`` and ``start``."""
        locator = cls.for_endpoint(endpoint, tokenizer, **kwargs)
        try:
            await locator.start()
        except ConfigError:
            await locator.close()
            raise
        return locator

    async def start(self) -> None:
        """Say hello and read what the daemon keys in; ``ConfigError`` when no daemon
        answers (``--cache-socket`` names it). Without it, the first ``locate`` connects in
        the background and answers None until then."""
        try:
            await self._status()
        except (CacheError, TimeoutError) as exc:
            raise ConfigError(
                f"--cache-socket: no cache daemon answers at {self._client.endpoint}: {exc}"
            ) from None

    def statistics(self) -> LocatorStats:
        return LocatorStats(self._located, self._failures, self._unknown)

    # -- the question -----------------------------------------------------------------

    async def locate(
        self, request: RouteRequest, engines: Sequence[EngineView]
    ) -> PrefixView | None:
        self._maybe_refresh_status()
        if not self._client.session:  # not connected (yet, or again): never hello here
            self._refresh_status_now()
            self._unknown += 1
            return None
        if self.namespace is None:
            self._unknown += 1
            self._log_once("namespace", "the cache daemon follows no engine's KV events yet "
                           "(no namespace to key prompts in); precise routing is off")  # fmt: skip
            return None
        ids = self._token_ids(request)
        if ids is None:
            self._unknown += 1
            self._log_once("tokens", f"cannot tokenize a {request.route} request exactly "
                           "(no chat template?); precise routing skips it")  # fmt: skip
            return None
        chunk = self.chunk_tokens
        keys = chain_keys(self.namespace, ids, chunk)
        if not keys:
            return PrefixView("precise", len(ids))
        try:
            found = await asyncio.wait_for(self._client.locate(keys), self.timeout_s)
        except (CacheError, TimeoutError) as exc:
            self._failures += 1
            self._log_once("daemon", f"cache daemon lookup failed ({type(exc).__name__}: "
                           f"{exc}); routing without precise prefixes")  # fmt: skip
            return None
        self._located += 1
        return self.prefix_view(found, len(ids), engines)

    def prefix_view(
        self, found: ClusterLookup, num_tokens: int, engines: Sequence[EngineView]
    ) -> PrefixView:
        return prefix_view(found, num_tokens, engines, self.chunk_tokens, self.node)

    def _token_ids(self, request: RouteRequest) -> list[int] | None:
        # on the event loop: ``tokenizers`` keeps the GIL while it encodes (measured: two
        # threads take as long as one after the other), so a thread would only add a hop
        try:
            return self.tokenizer.token_ids(request)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            # a template's raise_exception, or messages the template cannot walk
            self._log_once("render", f"cannot render a chat request ({type(exc).__name__}: "
                           f"{exc}); precise routing skips it")  # fmt: skip
            return None

    # -- what the daemon keys in --------------------------------------------------------

    def _maybe_refresh_status(self) -> None:
        if self._clock() - self._status_at >= self.namespace_refresh_s:
            self._refresh_status_now()

    def _refresh_status_now(self) -> None:
        if self._status_task is None or self._status_task.done():
            self._status_at = self._clock()
            self._status_task = asyncio.get_running_loop().create_task(self._read_status())

    async def _read_status(self) -> None:
        try:
            await self._status()
        except (CacheError, TimeoutError) as exc:
            self._log_once("status", f"cannot read the cache daemon's status ({exc})")

    async def _status(self) -> None:
        self._status_at = self._clock()
        # AsyncCacheClient has no public cluster_status (the sync client does); this also
        # says hello when the client has no session, off the request path
        reply = await self._client._call(
            lambda: self._client._simple_flow(m.ClusterRequest, samples=False)
        )
        cluster = dict(reply["cluster"])
        self.node = _local_node(cluster)
        if self._fixed:
            return
        learned = engine_namespace(cluster)
        if learned is not None and (self.namespace, self.chunk_tokens) != learned:
            self.namespace, self.chunk_tokens = learned
            log.info(
                "keying prompts as the engines do",
                extra={"namespace": self.namespace.label(), "chunk_tokens": self.chunk_tokens,
                       "node": self.node},
            )  # fmt: skip

    def _log_once(self, what: str, message: str) -> None:
        now = self._clock()
        if now - self._logged.get(what, -math.inf) >= self.log_interval_s:
            self._logged[what] = now
            log.warning(message)

    async def close(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._status_task
        await self._client.close()
