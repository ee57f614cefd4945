"""Prometheus metrics, named like vLLM's with the `freelunch_` prefix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

from freelunch.cpu_features import cpu_features, cpu_name, isa_level

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(
        self, stats: Callable[[], object], workers_alive: Callable[[], int], method_specs: Mapping[str, Any] | None = None
    ) -> None:
        """`stats()` returns an object with running, waiting and kv_usage (the pool's); `method_specs`
        the served methods' specs (methods/spec.py), whose counters are added."""
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("freelunch_workers_alive", "Engine workers serving requests", registry=r).set_function(workers_alive)
        Gauge("freelunch_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: stats().running
        )
        Gauge("freelunch_requests_waiting", "Requests waiting for admission", registry=r).set_function(
            lambda: stats().waiting
        )
        Gauge("freelunch_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r).set_function(
            lambda: stats().kv_usage
        )
        Gauge("freelunch_prefix_cache_blocks", "KV blocks named in the prefix cache", registry=r).set_function(
            lambda: stats().prefix_cache_blocks
        )
        r.register(_WorkerCounters(stats))
        self.prefix_cache_queries = Counter(
            "freelunch_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Counter(
            "freelunch_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)", registry=r
        )
        self.request_success = Counter(
            "freelunch_request_success", "Finished requests by finish reason", ["finished_reason"], registry=r
        )
        self.request_failure = Counter(
            "freelunch_request_failure",
            "Requests refused or ended in an error (overloaded, rate_limited, timeout, worker_died, engine, shutdown)",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("freelunch_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("freelunch_generation_tokens", "Tokens generated", registry=r)
        # each method's own counters, declared in its spec: (option, metric, counter)
        self.method_counters = [
            (spec.option, metric, Counter(metric.name, metric.help, list(metric.labels), registry=r))
            for spec in (method_specs or {}).values()
            for metric in spec.metrics
        ]
        self.method_requests = Counter(
            "freelunch_method_requests",
            "Finished generations (one per choice) that used a decoding method, by method",
            ["method"],
            registry=r,
        )
        self.grammar_compile_seconds = Histogram(
            "freelunch_structured_output_compile_seconds",
            "Time to compile a structured output's grammar (JSON schema, regex, tools), cache misses",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.grammar_cache_hits = Counter(
            "freelunch_structured_output_cache_hits", "Structured-output grammars found compiled in the cache", registry=r
        )
        self.grammar_refused = Counter(
            "freelunch_structured_output_refused",
            "Structured-output grammars refused before admission: invalid, or not compiled within the limit",
            ["reason"],
            registry=r,
        )
        self.structured_requests = Counter(
            "freelunch_structured_output_requests", "Finished generations with a structured output or logit_bias", registry=r
        )
        self.ttft = Histogram(
            "freelunch_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "freelunch_time_per_output_token_seconds", "Time per output token after the first", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "freelunch_e2e_request_latency_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r
        )

    def observe_finished(
        self,
        finish_reason: str,
        prompt_tokens: int,
        output_tokens: int,
        ttft: float | None,
        e2e: float,
        method_stats: dict | None = None,
        cached_tokens: int = 0,
    ) -> None:
        self.request_success.labels(finished_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        self.generation_tokens.inc(output_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))
        self.e2e.observe(e2e)
        for method in method_stats or {}:
            if method == "structured_output":
                self.structured_requests.inc()
                continue
            self.method_requests.labels(method=method).inc()
        for option, metric, counter in self.method_counters:
            stats = (method_stats or {}).get(option)
            if stats:
                for labels, value in metric.read(stats):
                    (counter.labels(*labels) if labels else counter).inc(value)


class _WorkerCounters:
    """The workers' totals as counters (each worker counts since it started): evictions, forwards by path."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self.stats = stats

    def collect(self):
        stats = self.stats()
        yield InfoMetricFamily(
            "freelunch_cpu",
            "The CPU, its widest instruction-set level, its features, and the kernels the workers' linears run "
            "(int8-<instruction set>: integer activations, the variant chosen by CPUID; float-avx2; torch; vllm)",
            value={"model": cpu_name(), "isa": isa_level(), "features": " ".join(cpu_features()), "kernels": stats.kernels},
        )
        yield CounterMetricFamily(
            "freelunch_prefix_cache_evictions", "Cached KV blocks whose memory went to other requests", value=stats.prefix_cache_evictions
        )
        steps = CounterMetricFamily(
            "freelunch_engine_steps",
            "Model forwards by the path the layers took: one_call (every layer in one C call) or per_layer",
            labels=["path"],
        )
        for path, count in sorted(stats.steps_by_path.items()):
            steps.add_metric([path], count)
        yield steps
