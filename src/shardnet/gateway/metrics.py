"""The gateway's ``/metrics``: what ``shardnet api`` served, in Prometheus' text format (prometheus_client).

Each app gets its own ``CollectorRegistry`` (never the process-wide default), so several gateways in one
process (tests, a notebook) keep their own counts. What is measured where:

    shardnet_api_requests_total{route, status}     every HTTP request, by the matched route's path template
                                                   (``other`` for a path no route knows) and the status
                                                   sent; a streamed answer counts when its headers go out
    shardnet_api_time_to_first_token_seconds       per choice, from its ``generate`` call to its first token
    shardnet_api_inter_token_latency_seconds       per choice, each gap between two consecutive tokens
    shardnet_api_generated_tokens_total            tokens generated, every choice (a cancelled one too)
    shardnet_api_prompt_tokens_total               prompt tokens, once per prompt whatever ``n``
    shardnet_api_failovers_total                   what this process's client did (``ServerTrust.counts()``,
    shardnet_api_verification_checks_total         shared by every model of the process), read when scraped
    shardnet_api_verification_disputes_total
    shardnet_api_suspected_servers                 servers outvoted by other holders, banned for the process
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shardnet.client.trust import ServerTrust
from shardnet.gateway.activity import ChoiceReport

logger = logging.getLogger(__name__)

# Seconds. A first token pays the prefill through every hop (tens of ms on loopback, seconds for a long
# prompt on a remote 13B swarm); a decode step is one pass through the chain.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OTHER_ROUTE = "other"  # the route label of a path no route matches (scanners, typos)


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own."""

    def __init__(self, trust: ServerTrust) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "shardnet_api_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "shardnet_api_time_to_first_token_seconds",
            "Per generated choice: from its generate() call to its first token",
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "shardnet_api_inter_token_latency_seconds",
            "Gaps between consecutive tokens of a choice",
            buckets=ITL_BUCKETS_S,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "shardnet_api_generated_tokens", "Tokens generated, every choice", registry=self.registry
        )
        self.prompt_tokens = Counter(
            "shardnet_api_prompt_tokens", "Prompt tokens, once per prompt", registry=self.registry
        )
        self.registry.register(ClientCollector(trust))

    def observe_choice(self, report: ChoiceReport) -> None:
        """One choice done (finished, stopped or cancelled): its tokens and their timing."""
        self.prompt_tokens.inc(report.prompt_tokens)
        self.generated_tokens.inc(len(report.token_offsets_s))
        if report.token_offsets_s:
            self.time_to_first_token.observe(report.token_offsets_s[0])
        for before, after in zip(report.token_offsets_s, report.token_offsets_s[1:], strict=False):
            self.inter_token_latency.observe(after - before)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ClientCollector(Collector):
    """What the gateway's client saw, read from its ``ServerTrust`` (``model.health``) at each scrape."""

    def __init__(self, trust: ServerTrust) -> None:
        self.trust = trust

    def describe(self) -> list[Metric]:
        return list(self._families({}, 0))

    def collect(self) -> Iterator[Metric]:
        return self._families(self.trust.counts(), len(self.trust.suspected()))

    @staticmethod
    def _families(counts: dict[str, int], suspected: int) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "shardnet_api_failovers",
            "Hops the client re-routed after a server failed (this process's clients)",
            value=counts.get("failovers", 0),
        )
        yield CounterMetricFamily(
            "shardnet_api_verification_checks",
            "Hop outputs recomputed by another holder and compared (verify_fraction)",
            value=counts.get("checks", 0),
        )
        yield CounterMetricFamily(
            "shardnet_api_verification_disputes",
            "Checks whose outputs disagreed, settled by a third holder",
            value=counts.get("disputes", 0),
        )
        yield GaugeMetricFamily(
            "shardnet_api_suspected_servers",
            "Servers outvoted by other holders of their blocks, not used again by this process",
            value=suspected,
        )


class RequestCounter:
    """ASGI middleware: counts each HTTP request by route template and the status it was answered with."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, router) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        answered = False

        async def counting_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start" and not answered:
                answered = True
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except BaseException:
            if not answered:  # Starlette's outermost middleware answers it with a 500
                self.metrics.requests.labels(route, "500").inc()
            raise

    def _route(self, scope: Scope) -> str:
        """The path template of the route that will answer (a wrong method's too: its 405 counts there)."""
        partial = None
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return getattr(route, "path", OTHER_ROUTE)
            if match is Match.PARTIAL and partial is None:
                partial = route
        return getattr(partial, "path", OTHER_ROUTE) if partial is not None else OTHER_ROUTE


def add_metrics(app: FastAPI, metrics: GatewayMetrics) -> None:
    """Serve ``GET /metrics`` and count every request of ``app``."""

    @app.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(RequestCounter, metrics=metrics, router=app.router)
