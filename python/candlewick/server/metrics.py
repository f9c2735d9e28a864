"""/metrics in Prometheus' text format (prometheus_client): requests running and waiting, tokens in and out, time
to first token and inter-token latency, KV cache use and prefix-cache hits. Names follow vLLM's where one
exists (with the candlewick: prefix)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineGauges:
    """Gauges read from the scheduler when scraped."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("candlewick:num_requests_running", "Sequences in the running batch.",
                                value=s["running"])
        yield GaugeMetricFamily("candlewick:num_requests_waiting", "Sequences waiting to join the batch.",
                                value=s["waiting"])
        used = s["kv_blocks_used"] / max(s["kv_blocks"], 1)
        yield GaugeMetricFamily("candlewick:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                                value=used)
        yield GaugeMetricFamily("candlewick:kv_cache_blocks_cached",
                                "Unreferenced KV blocks kept for the prefix cache.", value=s["kv_blocks_cached"])
        yield GaugeMetricFamily("candlewick:num_preemptions", "Sequences preempted (recomputed later) so far.",
                                value=s["preemptions"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_submitted = Counter("candlewick:requests_submitted", "Requests admitted.", registry=r)
        self.requests_aborted = Counter("candlewick:requests_aborted", "Requests aborted (client gone).",
                                        registry=r)
        self.requests_rejected = Counter("candlewick:requests_rejected", "Requests refused with 429.", registry=r)
        self.finished = Counter("candlewick:request_success", "Choices finished, by finish reason.",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("candlewick:prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.cached_prompt_tokens = Counter("candlewick:prefix_cache_hits",
                                            "Prompt tokens found in the prefix cache.", registry=r)
        self.generation_tokens = Counter("candlewick:generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("candlewick:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("candlewick:inter_token_latency_seconds", "Time between tokens of a choice.",
                             buckets=_LATENCY, registry=r)

    def watch(self, stats: Callable[[], dict]) -> None:
        self.registry.register(_EngineGauges(stats))
