"""The gateway's ``/metrics`` and swarm-page series without a swarm: what one choice adds to the histograms
and counters, the client's counts read at scrape time, registries kept apart, and steps whose hops are
pending when a choice ends turning into numbers once the client fills them. ``tests/test_api.py`` checks
the same counters against a real swarm through curl."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardnet.client.timings import HopTiming, StepTiming
from shardnet.client.trust import ServerTrust
from shardnet.gateway.activity import ChoiceReport, RecentActivity
from shardnet.gateway.metrics import GatewayMetrics

pytestmark = pytest.mark.timeout(30)


def _samples(metrics: GatewayMetrics) -> dict[str, float]:
    """The unlabelled samples of the metrics' exposition, parsed by prometheus_client."""
    text = metrics.exposition().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels  # counters, gauges, and the histograms' _count and _sum
    }


def test_a_choice_moves_the_histograms_and_counters_by_its_tokens():
    metrics = GatewayMetrics(ServerTrust())
    metrics.observe_choice(ChoiceReport(started_at=0.0, token_offsets_s=(0.25, 0.3, 0.4), prompt_tokens=7))
    metrics.observe_choice(
        ChoiceReport(started_at=0.0, token_offsets_s=(), prompt_tokens=0)
    )  # cancelled early
    samples = _samples(metrics)
    assert samples["shardnet_api_generated_tokens_total"] == 3
    assert samples["shardnet_api_prompt_tokens_total"] == 7
    assert samples["shardnet_api_time_to_first_token_seconds_count"] == 1
    assert samples["shardnet_api_time_to_first_token_seconds_sum"] == pytest.approx(0.25)
    assert samples["shardnet_api_inter_token_latency_seconds_count"] == 2
    assert samples["shardnet_api_inter_token_latency_seconds_sum"] == pytest.approx(0.15)


def test_client_counts_are_read_when_scraped_and_registries_stay_apart():
    trust = ServerTrust()
    first, second = GatewayMetrics(trust), GatewayMetrics(ServerTrust())  # no duplicate-series error
    assert _samples(first)["shardnet_api_failovers_total"] == 0
    trust.count("failovers", 2)
    trust.checked(0.001)
    trust.count("disputes")
    trust.suspect("12D3KooWLiar", (0, 4), "outvoted by two holders (test)")
    samples = _samples(first)
    assert samples["shardnet_api_failovers_total"] == 2
    assert samples["shardnet_api_verification_checks_total"] == 1
    assert samples["shardnet_api_verification_disputes_total"] == 1
    assert samples["shardnet_api_suspected_servers"] == 1
    first.observe_choice(ChoiceReport(started_at=0.0, token_offsets_s=(0.1,), prompt_tokens=3))
    others = _samples(second)
    assert others["shardnet_api_failovers_total"] == 0 and others["shardnet_api_generated_tokens_total"] == 0


def test_hops_pending_when_a_choice_ends_show_their_parts_once_filled():
    late = HopTiming(span="0:2", peer_id="12D3KooWFirst")  # a push chain's first hop: its answer comes later
    last = HopTiming("2:4", "12D3KooWLast", 0.001, 0.0005, 0.002, 0.001, pending=False)
    prefill = StepTiming(
        0.02, 5, [HopTiming("0:2", "12D3KooWFirst", 0.002, 0.001, 0.005, 0.0, pending=False)]
    )
    decode = StepTiming(0.008, 1, [late, last])
    activity = RecentActivity()
    activity.record(ChoiceReport(0.0, (0.03, 0.038), prompt_tokens=5, steps=[prefill, decode]))

    document = activity.document()
    step = document["steps"][-1]
    assert step["pending"] and step["critical_path_ms"] is None
    assert step["hops"][0]["network_ms"] is None and step["hops"][0]["pending"]
    assert step["hops"][1]["total_ms"] == pytest.approx(4.5)
    (choice,) = document["series"]["choices"]
    assert choice["tokens"] == 2 and choice["ttft_ms"] == pytest.approx(30.0)
    assert choice["tokens_per_s"] == pytest.approx(125.0)
    assert [p["span"] for p in document["series"]["hops"]] == ["2:4"]  # the pending hop has no mean yet

    late.network_s, late.queue_s, late.compute_s, late.pending = 0.001, 0.0005, 0.002, False  # read late
    document = activity.document()
    step = document["steps"][-1]
    assert not step["pending"] and step["critical_path_ms"] == pytest.approx(8.0)
    assert step["hops"][0]["total_ms"] == pytest.approx(3.5)
    means = {p["span"]: p["mean_ms"] for p in document["series"]["hops"]}
    assert means == {"0:2": pytest.approx(3.5), "2:4": pytest.approx(4.5)}  # decode steps only
