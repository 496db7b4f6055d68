"""``GET /metrics``: Prometheus text format, with vLLM's metric names where vLLM has the metric, so dashboards
and alerts written for vLLM read this server unchanged. Every series carries ``model_name``.

Two sources:

* per finished request (:meth:`ServerMetrics.observe`, called on the engine thread by
  :class:`~dsv3.server.loop.EngineLoop`): token counters, the prefix cache's queried and hit prompt tokens,
  request outcomes and the latency histograms (time to first token, between tokens, end to end, queued);
* read from the engine when scraped (:class:`_EngineCollector`): requests running and waiting, the share of
  cache pages in use, preemptions, and the speculative decoder's drafted and accepted tokens. These are plain
  integers the engine thread updates; reading them from the HTTP thread needs no lock.

Each app has its own :class:`~prometheus_client.CollectorRegistry` (not the process-wide one), so several
servers (tests, benchmarks) live in one process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..inference import Engine, GenerationResult
from .loop import RequestTiming

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
"""Seconds; from a millisecond (a token of a small model) to most of an hour (a long queue)."""
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                     0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
"""Seconds between two tokens of a request."""

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
"""The engine's finish reasons as vLLM labels them (a request its client dropped is an ``abort``)."""


class ServerMetrics:
    """The metrics of one server over ``engine``, in their own registry (:meth:`render` writes them)."""

    def __init__(self, engine: Engine, model_name: str):
        self.registry = CollectorRegistry()
        reg, names = self.registry, ["model_name"]

        def counter(name: str, doc: str, labels: list[str] = names) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, names, buckets=buckets, registry=reg).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of finished requests.").labels(model_name)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Generated tokens of finished requests.").labels(model_name)
        self._success = counter("vllm:request_success", "Finished requests, by finish reason.",
                                names + ["finished_reason"])
        self.success = {reason: self._success.labels(model_name, label) for reason, label in FINISH_REASONS.items()}
        self.prefix_queries = counter("vllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.").labels(model_name)
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.").labels(model_name)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first token.", LATENCY_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Seconds between the steps that bring a request tokens.", TOKEN_GAP_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Seconds from a request's arrival to its end.", LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Seconds from a request's arrival to its admission into the batch.", LATENCY_BUCKETS)
        reg.register(_EngineCollector(engine, model_name))

    def observe(self, result: GenerationResult, timing: RequestTiming) -> None:
        """Account one finished engine request (one choice of an HTTP request)."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generation_tokens.inc(result.completion_tokens)
        if timing.finish_reason in self.success:
            self.success[timing.finish_reason].inc()
        if timing.admitted is not None:  # looked up in the prefix cache when it was admitted
            self.prefix_queries.inc(result.prompt_tokens)
            self.prefix_hits.inc(result.cached_tokens)
            self.queue.observe(timing.queue_time)
        if timing.ttft is not None:
            self.ttft.observe(timing.ttft)
        for gap in timing.token_gaps:
            self.itl.observe(gap)
        if timing.e2e is not None:
            self.e2e.observe(timing.e2e)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.labels = engine, [model_name]

    def describe(self):
        return []  # computed at scrape time: nothing for the registry to check names against

    def collect(self):
        engine, labels = self.engine, self.labels
        sch, cache = engine.scheduler, engine.cache

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", len(sch.running))
        yield gauge("vllm:num_requests_waiting", "Requests waiting for a slot or cache pages.", len(sch.waiting))
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of the latent cache's pages in use (0-1; cached prefix "
                    "pages nobody holds count as free).", 1.0 - cache.num_free_pages / cache.num_pages)
        yield counter("vllm:num_preemptions", "Sequences preempted (and recomputed later) for cache pages.",
                      sch.preemptions)
        spec = engine.speculator
        if spec is not None:  # k MTP draft tokens per verify step (a draft)
            drafted, accepted = spec.drafted, spec.accepted
            yield counter("vllm:spec_decode_num_drafts", "Speculative drafts verified.", drafted // spec.k)
            yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", drafted)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", accepted)
            per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                          "Draft tokens accepted, by position in the draft.",
                                          labels=["model_name", "position"])
            for position, n in enumerate(spec.accepted_at):
                per_pos.add_metric(labels + [str(position)], n)
            yield per_pos
