"""Prometheus metrics, one registry per app, named like vLLM's (prefix `lamina:`).

Histograms: time to first token, inter-token latency, end-to-end latency, queue time, and per-stage latency
(`stage` = image_fetch | image_decode | visual_encode | expert:<name> | prefill). Gauges read from the
engine at scrape time: running and waiting requests, KV-cache usage. Counters: prompt and generated tokens,
requests by finish reason, HTTP errors by status.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("lamina:time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lamina:inter_token_latency_seconds", "Time between streamed tokens", ["model"],
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lamina:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lamina:request_queue_time_seconds",
                               "Time a request waited in the engine for a slot (submission to admission)",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("lamina:stage_latency_seconds", "Latency of each request stage", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.expert_queue = Histogram("lamina:expert_queue_time_seconds", "Time an expert call waited for a worker",
                                      ["expert"], buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("lamina:num_requests_running", "Requests in the engine's batch", registry=r)
        self.waiting = Gauge("lamina:num_requests_waiting", "Admitted requests waiting for a slot", registry=r)
        self.kv_usage = Gauge("lamina:kv_cache_usage_perc", "KV-cache usage, 0..1", registry=r)
        self.prefix_hits = Gauge("lamina:prefix_cache_hit_tokens", "Prompt tokens reused from retained K/V "
                                 "instead of prefilled (since start)", registry=r)
        self.weight_bytes = Gauge("lamina:model_weight_bytes", "Base weights as held in memory (quantized or packed, "
                                  "each once)", registry=r)
        self.kv_bytes = Gauge("lamina:kv_cache_capacity_bytes", "KV-cache capacity in bytes", registry=r)
        self.prompt_tokens = Counter("lamina:prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("lamina:generation_tokens", "Tokens generated", ["model"], registry=r)
        self.requests = Counter("lamina:request_success", "Finished requests by finish reason",
                                ["model", "finished_reason"], registry=r)
        self.errors = Counter("lamina:http_errors", "Refused or failed API requests by status", ["status"],
                              registry=r)
        self._engine_stats: Callable[[], object] | None = None
        self.admitted: OrderedDict[str, float] = OrderedDict()  # request id → monotonic time it got a slot

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage).observe(seconds)

    # the engine's observer (server.engine.types.EngineObserver), called on the engine thread
    on_stage = observe_stage

    def on_admit(self, request_id: str) -> None:
        self.admitted.setdefault(request_id, time.monotonic())
        while len(self.admitted) > 4096:
            self.admitted.popitem(last=False)

    def expert_observer(self, name: str, seconds: float, status: str) -> None:
        if status != "cached":
            self.stage.labels(f"expert:{name}").observe(seconds)

    def expert_queue_observer(self, name: str, seconds: float) -> None:
        self.expert_queue.labels(name).observe(seconds)

    def bind_engine(self, stats: Callable[[], object]) -> None:
        self._engine_stats = stats

    def render(self) -> bytes:
        if self._engine_stats is not None:
            s = self._engine_stats()
            self.running.set(s.running)
            self.waiting.set(s.waiting)
            self.kv_usage.set(s.kv_cache_usage)
            self.prefix_hits.set(s.prompt_tokens_cached_total)
            self.weight_bytes.set(s.weight_bytes)
            self.kv_bytes.set(s.kv_cache_bytes)
        return generate_latest(self.registry)
