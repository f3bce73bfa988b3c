"""ServerMetrics: what ``shardnet serve --metrics-port N`` exposes at ``/metrics`` for Prometheus.

Counters and histograms are updated where the work happens (the servicer, after each step and each
refusal; the compute queue, after each decode pass). What the server already keeps (its state, open
sessions, cache, prefix store) is read when Prometheus scrapes, not copied on every step. Every metric
lives in this server's own registry, so servers started in one process (tests) do not mix.

Names follow Prometheus' conventions: ``shardnet_server_`` first, the unit last (``_seconds``, ``_tokens``),
``_total`` on counters. ``servers/grafana-dashboard.json`` draws them; README "Metrics" lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    StateSetMetricFamily,
)
from prometheus_client.registry import Collector

from shardnet.dht import ServerState
from shardnet.version import __version__
from shardnet.wire import pb

if TYPE_CHECKING:
    from shardnet.server.servicer import ServerRuntime

logger = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series beside each counter: Prometheus does without them
# Seconds: a decode step's queue and push are milliseconds on a LAN, a prefill's compute may take seconds.
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, runtime: ServerRuntime, model_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self._runtime = runtime
        self._model_id = model_id
        self._http = None
        registry = self.registry
        self.steps = Counter("shardnet_server_steps", "Session steps computed", registry=registry)
        self.tokens = Counter(
            "shardnet_server_tokens",
            "Positions computed by session steps: rows times new positions (a prefill counts its prompt)",
            registry=registry,
        )
        self.stateless = Counter(
            "shardnet_server_stateless_calls",
            "Forward and Backward calls answered (no session: a training step, an evaluation)",
            ["rpc"],
            registry=registry,
        )
        self.errors = Counter(
            "shardnet_server_errors",
            "Requests refused or failed, by rpc and gRPC status code",
            ["rpc", "code"],
            registry=registry,
        )
        self.pushes = Counter(
            "shardnet_server_pushes", "Step outputs pushed to the next server", registry=registry
        )
        self.push_failures = Counter(
            "shardnet_server_push_failures",
            "Pushes the next server did not take (the client delivered the step itself)",
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "shardnet_server_step_queue_seconds",
            "A step's arrival to its output being ready, less compute: decoding, checks, waiting to compute",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "shardnet_server_step_compute_seconds",
            "Running the span's blocks for one step",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.push_seconds = Histogram(
            "shardnet_server_step_push_seconds",
            "A push to the next server, sent to acknowledged (a round trip)",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "shardnet_server_decode_batch_rows",
            "Rows (sequences) in one decode forward pass, all sessions batched into it together",
            buckets=BATCH_ROWS_BUCKETS,
            registry=registry,
        )
        registry.register(_RuntimeCollector(self))

    # ---- updates, from the servicer and the compute queue ----

    def step_served(self, request: pb.Step, reply: pb.InferenceResponse) -> None:
        result = reply.step
        shape = request.hidden_states.shape
        self.steps.inc()
        self.tokens.inc(shape[0] * shape[1] if len(shape) == 3 else 0)
        self.queue_seconds.observe(result.queue_s)
        self.compute_seconds.observe(result.compute_s)
        if len(request.push):
            if result.push_error:
                self.push_failures.inc()
            else:
                self.pushes.inc()
                self.push_seconds.observe(result.push_s)

    def stateless_call(self, rpc: str) -> None:
        self.stateless.labels(rpc=rpc).inc()

    def refused(self, rpc: str, code_name: str) -> None:
        self.errors.labels(rpc=rpc, code=code_name).inc()

    def batch_ran(self, rows: int) -> None:
        self.batch_rows.observe(rows)

    # ---- the /metrics endpoint ----

    def registry_text(self) -> str:
        """What a scrape reads now, in Prometheus' text format."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int) -> None:
        """Listen on ``host:port`` for Prometheus (a thread of its own); ``stop`` ends it."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        logger.info("metrics at http://%s:%d/metrics", host, self._http.server_port)

    @property
    def port(self) -> int | None:
        return None if self._http is None else self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            http.shutdown()  # waits for its thread's loop to notice (at most half a second)
            http.server_close()


class _RuntimeCollector(Collector):
    """What the server keeps anyway, read at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator:
        runtime, model_id = self._metrics._runtime, self._metrics._model_id
        sessions, backend = runtime.sessions, runtime.backend
        state = runtime.state.value
        states = StateSetMetricFamily("shardnet_server_state", "The server's announced state")
        states.add_metric([], {s.value: s.value == state for s in ServerState})
        yield states
        info = InfoMetricFamily("shardnet_server", "What this server serves")
        span = "" if backend is None else f"{backend.limits.start}:{backend.limits.end}"
        info.add_metric(
            [], {"model_id": model_id, "span": span, "version": __version__, "quant": runtime.quant}
        )
        yield info
        yield GaugeMetricFamily(
            "shardnet_server_open_sessions", "Inference sessions open now", value=len(sessions)
        )
        yield CounterMetricFamily(
            "shardnet_server_sessions_served",
            "Inference sessions opened since start",
            value=sessions.sessions_served,
        )
        total = sessions.max_cache_tokens
        yield GaugeMetricFamily(
            "shardnet_server_cache_tokens_used",
            "KV cache reserved by open sessions, in tokens (batch x max length)",
            value=total - sessions.cache_tokens_free,
        )
        yield GaugeMetricFamily(
            "shardnet_server_cache_tokens", "KV cache this server gives sessions, in tokens", value=total
        )
        prefix = None if backend is None else backend.prefix  # none: turned off, or no blocks loaded
        yield CounterMetricFamily(
            "shardnet_server_prefix_hits",
            "First steps that started from a kept prefix",
            value=0 if prefix is None else prefix.hits,
        )
        yield CounterMetricFamily(
            "shardnet_server_prefix_tokens_reused",
            "Positions not computed thanks to kept prefixes",
            value=0 if prefix is None else prefix.tokens_reused,
        )
        yield GaugeMetricFamily(
            "shardnet_server_prefix_cache_tokens_used",
            "Positions kept in the prefix store",
            value=0 if prefix is None else prefix.tokens_used,
        )
