"""The simulated engine's ``/metrics``: vLLM 0.33's names, labels and buckets.

Every vLLM series carries ``model_name`` (the served name) and ``engine`` ("0": one engine
core per process, as ``vllm serve`` without data parallelism), in that label order, as
``vllm/v1/metrics/loggers.py`` declares them. Buckets are copied from
``vllm/v1/metrics/buckets.py`` (``_STATIC_FAMILY_DEFAULTS``; ``request_tokens`` is its 1-2-5
series up to ``max_model_len``). All latencies are in *simulated* seconds: with
``--time-scale 10`` a TTFT of 0.5 s is observed as 0.5 s though it took 50 ms of wall time.

What vLLM has and the simulator does not: speculative decoding, KV-connector, multimodal
and sleep-mode series (always zero or absent on an engine without those features), and
``vllm:admission_rejections`` and ``vllm:estimated_{flops,read_bytes,write_bytes}_per_gpu``
(compared with the CPU build's /metrics, ``tests/integration/test_sim_engine.py``). Every
per-request histogram is observed when the request finishes, as vLLM does, so a request
whose client hung up is in none of them.
``shoal_sim_*`` series are the simulator's own (lag behind the model, faults).

Each engine has its own ``CollectorRegistry`` (several engines in one test process must
not share the global one).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ENGINE_LABELS", "SimMetrics", "request_token_buckets"]

ENGINE_LABELS = ("model_name", "engine")
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")

REQUEST_LATENCY = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TIME_TO_FIRST_TOKEN = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
INTER_TOKEN_LATENCY = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITERATION_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_PARAMS_N = (1, 2, 5, 10, 20)
NUM_PREEMPTIONS = (1, 2, 3, 4, 5, 10, 20)


def request_token_buckets(max_model_len: int) -> list[float]:
    """vLLM's ``build_1_2_5_buckets(max_model_len)``: 1, 2, 5, 10, ... <= max_model_len."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class SimMetrics:
    """The registry and the series the engine updates; see the module docstring."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        max_loras: int | None,
        cache_info: dict[str, str],
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = list(ENGINE_LABELS)
        values = (model_name, "0")
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(*values)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(*values)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        by_reason = Gauge(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for "
            "scheduling capacity; 'deferred' = deferred by transient constraints (LoRA "
            "budget, KV transfer, blocked status). Sum of all reasons equals "
            "vllm:num_requests_waiting.",
            [*labels, "reason"],
            registry=reg,
        )
        self.waiting_by_reason = {
            reason: by_reason.labels(*values, reason) for reason in ("capacity", "deferred")
        }
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        # No KV connector in a simulated engine: vLLM registers these anyway, at 0.
        counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache "
            "sharing, in terms of number of queried tokens.",
        )
        counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, "
            "in terms of number of cached tokens.",
        )
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.prompt_tokens_cached = counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external)."
        )
        by_source = Counter(
            "vllm:prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [*labels, "source"],
            registry=reg,
        )
        self.prompt_tokens_by_source = {
            source: by_source.labels(*values, source)
            for source in ("local_compute", "local_cache_hit", "external_kv_transfer")
        }
        cached_by_source = Counter(
            "vllm:prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), "
            "host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or "
            "external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + "
            "vllm:external_prefix_cache_hits.",
            [*labels, "source"],
            registry=reg,
        )
        self.prompt_tokens_cached_by_source = {
            source: cached_by_source.labels(*values, source)
            for source in ("device", "host", "p2p", "disk", "external_unspecified")
        }
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=reg,
        )
        self.success = {r: success.labels(*values, r) for r in FINISH_REASONS}
        token_buckets = request_token_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        )
        self.max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.prefill_kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            token_buckets,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS,
        )
        self.max_tokens_param = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            token_buckets,
        )
        self.n_param = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_PARAMS_N
        )
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TIME_TO_FIRST_TOKEN,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            INTER_TOKEN_LATENCY,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            INTER_TOKEN_LATENCY,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY,
        )
        self.inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY,
        )
        self.prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY,
        )
        self.decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY,
        )
        self.request_preemptions = histogram(
            "vllm:request_num_preemptions",
            "Number of preemptions per finished request.",
            NUM_PREEMPTIONS,
        )
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            [*sorted(cache_info), "engine"],
            registry=reg,
        )
        info.labels(**cache_info, engine="0").set(1)
        self._lora_info: Gauge | None = None
        self._max_loras = max_loras
        if max_loras is not None:
            self._lora_info = Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                registry=reg,
            )
        self.lag = Gauge(
            "shoal_sim_step_lag_seconds",
            "How far the engine loop runs behind its model (simulated seconds); above a "
            "step's time the host cannot keep up with --time-scale.",
            labels,
            registry=reg,
        ).labels(*values)
        self.steps = Counter("shoal_sim_steps", "Engine steps run.", labels, registry=reg).labels(
            *values
        )
        self.step_seconds = Counter(
            "shoal_sim_step_seconds",
            "Simulated seconds the model priced the steps at.",
            labels,
            registry=reg,
        ).labels(*values)
        self.lag_seconds = Counter(
            "shoal_sim_lag_seconds",
            "Simulated seconds steps ended after their modelled end, summed: over "
            "shoal_sim_step_seconds_total, how far latencies exceed the model.",
            labels,
            registry=reg,
        ).labels(*values)
        self.client_aborts = Counter(
            "shoal_sim_client_aborts",
            "Requests aborted because their client went away (vLLM counts them nowhere).",
            labels,
            registry=reg,
        ).labels(*values)
        self.open_requests = Gauge(
            "shoal_sim_open_requests",
            "Completion requests whose HTTP handler is still running (answered or not).",
            labels,
            registry=reg,
        ).labels(*values)
        faults = Counter(
            "shoal_sim_faults", "Fault knobs that fired, by kind.", [*labels, "kind"], registry=reg
        )
        self.faults = {k: faults.labels(*values, k) for k in ("fail", "hang", "die_stream", "exit")}

    def lora_info(self, running: Sequence[str], waiting: Sequence[str], now: float) -> None:
        """Stamp the series of this (running, waiting) combination with ``now``. As vLLM's,
        the series of earlier combinations stay with their last stamp: the latest state is
        the series with the highest value, not the only one."""
        if self._lora_info is None:
            return
        self._lora_info.labels(str(self._max_loras), ",".join(waiting), ",".join(running)).set(now)
