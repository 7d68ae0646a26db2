"""Prometheus `/metrics` for the HTTP server, under the names vLLM's and SGLang's servers export, so that their
Grafana dashboards and alert rules read ours unchanged.

- Per request (observed by the server as requests finish): time to first token, end-to-end latency, time per
  output token, inter-token latency (gaps between the engine's deliveries of one request), prompt and generated
  token counters, finished requests by finish reason. Each under both `vllm:` and `sglang:` names.
- From the engine at scrape time: requests running and waiting, KV-cache usage, and speculative decoding:
  vLLM's `vllm:spec_decode_num_drafts` (verify steps of a request), `..._num_draft_tokens` (draft tokens
  verified), `..._num_accepted_tokens`; SGLang's `sglang:spec_accept_length` (mean tokens per verify step, the
  bonus token included) and `sglang:spec_accept_rate` (accepted / verified drafts).
Histograms and counters are thread-safe (prometheus_client), so the engine thread observes directly.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for request latencies (seconds) and for per-token latencies.
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
PREFIXES = ("vllm", "sglang")


class ServerMetrics:
    """The server's Prometheus registry (one per server, so that tests can run several in one process)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def both(kind, name, doc, **kw):
            return [kind(f"{p}:{name}", doc, labelnames=labels, registry=self.registry, **kw).labels(model_name)
                    for p in PREFIXES]

        self.ttft = both(Histogram, "time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS)
        self.e2e = both(Histogram, "e2e_request_latency_seconds", "End-to-end request latency",
                        buckets=REQUEST_BUCKETS)
        self.tpot = both(Histogram, "time_per_output_token_seconds", "Mean time per output token of a request",
                         buckets=TOKEN_BUCKETS)
        self.itl = both(Histogram, "inter_token_latency_seconds", "Gap between deliveries of a request's tokens",
                        buckets=TOKEN_BUCKETS)
        self.prompt_tokens = both(Counter, "prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = both(Counter, "generation_tokens", "Generated tokens of finished requests")
        self.success = Counter("vllm:request_success", "Finished requests", labelnames=[*labels, "finished_reason"],
                               registry=self.registry)
        self.num_requests = Counter("sglang:num_requests", "Finished requests", labelnames=labels,
                                    registry=self.registry).labels(model_name)
        self._engine = _EngineCollector(model_name)
        self.registry.register(self._engine)

    def observe_request(self, *, prompt_tokens: int, output_tokens: int, ttft_s: float | None, e2e_s: float,
                        finish_reason: str | None) -> None:
        for h in self.e2e:
            h.observe(max(e2e_s, 0.0))
        if ttft_s is not None:
            for h in self.ttft:
                h.observe(max(ttft_s, 0.0))
            if output_tokens > 1:
                for h in self.tpot:
                    h.observe(max(e2e_s - ttft_s, 0.0) / (output_tokens - 1))
        for c in self.prompt_tokens:
            c.inc(prompt_tokens)
        for c in self.generation_tokens:
            c.inc(output_tokens)
        self.success.labels(self.model_name, finish_reason or "abort").inc()
        self.num_requests.inc()

    def observe_itl(self, gap_s: float) -> None:
        for h in self.itl:
            h.observe(max(gap_s, 0.0))

    def render(self, engine_stats: dict, *, inflight: int) -> bytes:
        """The exposition text, with the engine's gauges and counters as of `engine_stats`."""
        self._engine.stats, self._engine.inflight = engine_stats, inflight
        return generate_latest(self.registry)


def _num(stats: dict, key: str) -> float | None:
    v = stats.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class _EngineCollector:
    """Gauges and counters read from the engine's stats() at scrape time."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: dict = {}
        self.inflight = 0

    def describe(self):
        return []

    def collect(self):
        s, m = self.stats, [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        running, waiting = _num(s, "running"), _num(s, "waiting")
        if running is None:  # an engine without these stats: what the server has in flight
            running, waiting = float(self.inflight), 0.0
        yield gauge("vllm:num_requests_running", "Requests decoding", running)
        yield gauge("vllm:num_requests_waiting", "Requests queued", waiting)
        yield gauge("sglang:num_running_reqs", "Requests decoding", running)
        yield gauge("sglang:num_queue_reqs", "Requests queued", waiting)
        free, total = _num(s, "free_kv_blocks"), _num(s, "num_kv_blocks")
        if free is not None and total:
            usage = 1.0 - free / total
            yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full)", usage)
            yield gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (1 = full), vLLM's older name", usage)
            yield gauge("sglang:token_usage", "KV-cache usage (1 = full)", usage)
        verifies, verified, accepted = (_num(s, k) for k in ("request_verifies", "verify_tokens", "accepted_drafts"))
        if verifies is not None and accepted is not None:
            drafts = max((verified or 0.0) - verifies, 0.0)  # verified tree tokens less one root per request-step
            yield counter("vllm:spec_decode_num_drafts", "Speculative verify steps, per request", verifies)
            yield counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified", drafts)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted", accepted)
            yield gauge("sglang:spec_accept_length", "Mean tokens per verify step (bonus token included)",
                        (accepted + verifies) / verifies if verifies else 0.0)
            yield gauge("sglang:spec_accept_rate", "Accepted / verified draft tokens",
                        accepted / drafts if drafts else 0.0)
