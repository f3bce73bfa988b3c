#!/usr/bin/env python3
"""Write servers/grafana-dashboard.json, the Grafana dashboard operators import: panels over every metric a
server (`shardnet serve --metrics-port`) and the gateway (`shardnet api`, /metrics) expose, with datasource,
job and instance variables matching servers/prometheus.yml.

    python scripts/grafana_dashboard.py           # rewrite the JSON after changing a panel here
    python scripts/grafana_dashboard.py --check   # exit 1 if the committed JSON is not what this writes

Edit the panels here, not in the JSON. tests/test_dashboard.py fails if the two differ, and if a panel
queries a metric neither exposition has. Standard library only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "servers" / "grafana-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SERVERS = '{job=~"$server_job", instance=~"$instance"}'  # label selectors every query carries
GATEWAY = '{job=~"$api_job"}'
WIDTH = 24  # Grafana's grid columns
HEIGHT = 8  # a panel's rows


def rate(metric: str, selector: str, by: str = "instance") -> str:
    grouping = f"sum by ({by}) " if by else "sum"
    return f"{grouping}(rate({metric}{selector}[$__rate_interval]))"


def quantile(histogram: str, selector: str, q: float) -> str:
    return f"histogram_quantile({q}, sum by (le, instance) (rate({histogram}_bucket{selector}[$__rate_interval])))"


def latency(title: str, histogram: str, selector: str, legend: str = "") -> dict:
    """A panel of a seconds histogram's p50 and p95."""
    targets = [
        (quantile(histogram, selector, q), f"{name}{legend}") for q, name in ((0.5, "p50"), (0.95, "p95"))
    ]
    return panel(f"{title}, p50 / p95", targets, unit="s")


class Dashboard:
    """Panels laid out top to bottom: a row title, then lines of panels sharing the grid's width."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0

    def row(self, title: str) -> None:
        grid = {"h": 1, "w": WIDTH, "x": 0, "y": self.y}
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._next_id(),
                "collapsed": False,
                "gridPos": grid,
                "panels": [],
            }
        )
        self.y += 1

    def line(self, *panels: dict) -> None:
        """Panels side by side. Each is panel(...)'s keyword arguments."""
        width = WIDTH // len(panels)
        for column, spec in enumerate(panels):
            self.panels.append(self._panel(x=column * width, w=width, **spec))
        self.y += HEIGHT

    def _next_id(self) -> int:
        return len(self.panels) + 1

    def _panel(
        self, title: str, targets: list[tuple[str, str]], x: int, w: int, unit="short", kind="timeseries"
    ):
        return {
            "type": kind,
            "title": title,
            "id": self._next_id(),
            "description": "",
            "datasource": DATASOURCE,
            "gridPos": {"h": HEIGHT, "w": w, "x": x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
            if kind == "timeseries"
            else {},
            "targets": [
                {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
                for i, (expr, legend) in enumerate(targets)
            ],
        }


def panel(title: str, targets: list[tuple[str, str]], **options) -> dict:
    return {"title": title, "targets": targets, **options}


def server_panels(board: Dashboard) -> None:
    board.row("Servers (shardnet serve --metrics-port)")
    board.line(
        panel(
            "Steps per second", [(rate("shardnet_server_steps_total", SERVERS), "{{instance}}")], unit="ops"
        ),
        panel(
            "Tokens per second (rows x new positions)",
            [(rate("shardnet_server_tokens_total", SERVERS), "{{instance}}")],
        ),
        panel(
            "State",
            [(f"shardnet_server_state{SERVERS} == 1", "{{instance}} {{shardnet_server_state}}")],
            kind="table",
        ),
    )
    board.line(
        latency("Step queue", "shardnet_server_step_queue_seconds", SERVERS, " {{instance}}"),
        latency("Step compute", "shardnet_server_step_compute_seconds", SERVERS, " {{instance}}"),
        latency("Push round trip", "shardnet_server_step_push_seconds", SERVERS, " {{instance}}"),
    )
    rows, passes = (rate(f"shardnet_server_decode_batch_rows_{part}", SERVERS) for part in ("sum", "count"))
    board.line(
        panel("Decode batch rows (mean per pass)", [(f"{rows} / {passes}", "{{instance}}")]),
        panel(
            "Sessions",
            [
                (f"shardnet_server_open_sessions{SERVERS}", "open {{instance}}"),
                (
                    f"rate(shardnet_server_sessions_served_total{SERVERS}[$__rate_interval]) * 60",
                    "opened per minute {{instance}}",
                ),
            ],
        ),
        panel(
            "KV cache tokens",
            [
                (f"shardnet_server_cache_tokens_used{SERVERS}", "used {{instance}}"),
                (f"shardnet_server_cache_tokens{SERVERS}", "total {{instance}}"),
            ],
        ),
    )
    board.line(
        panel(
            "Errors and refusals by status",
            [(rate("shardnet_server_errors_total", SERVERS, by="code, rpc"), "{{rpc}} {{code}}")],
            unit="ops",
        ),
        panel(
            "Pushes",
            [
                (rate("shardnet_server_pushes_total", SERVERS), "sent {{instance}}"),
                (rate("shardnet_server_push_failures_total", SERVERS), "failed {{instance}}"),
            ],
            unit="ops",
        ),
        panel(
            "Prefix cache",
            [
                (rate("shardnet_server_prefix_hits_total", SERVERS), "hits/s {{instance}}"),
                (rate("shardnet_server_prefix_tokens_reused_total", SERVERS), "tokens reused/s {{instance}}"),
                (f"shardnet_server_prefix_cache_tokens_used{SERVERS}", "tokens kept {{instance}}"),
            ],
        ),
    )
    board.line(
        panel(
            "Forward and Backward calls (training, evaluation)",
            [
                (
                    rate("shardnet_server_stateless_calls_total", SERVERS, by="instance, rpc"),
                    "{{rpc}} {{instance}}",
                )
            ],
            unit="ops",
        ),
        panel(
            "What each server serves",
            [(f"shardnet_server_info{SERVERS}", "{{instance}} {{span}} {{model_id}} {{quant}} {{version}}")],
            kind="table",
        ),
    )


def gateway_panels(board: Dashboard) -> None:
    board.row("Gateway (shardnet api /metrics)")
    board.line(
        panel(
            "Requests by route and status",
            [(rate("shardnet_api_requests_total", GATEWAY, by="route, status"), "{{route}} {{status}}")],
            unit="reqps",
        ),
        panel(
            "Tokens generated per second",
            [
                (rate("shardnet_api_generated_tokens_total", GATEWAY, by=""), "generated"),
                (rate("shardnet_api_prompt_tokens_total", GATEWAY, by=""), "prompt"),
            ],
        ),
        panel(
            "Failovers seen by the gateway's client",
            [(rate("shardnet_api_failovers_total", GATEWAY, by="") + " * 60", "per minute")],
        ),
    )
    board.line(
        panel(
            "Verification: checks and disputes per minute, servers suspected",
            [
                (rate("shardnet_api_verification_checks_total", GATEWAY, by="") + " * 60", "checks"),
                (rate("shardnet_api_verification_disputes_total", GATEWAY, by="") + " * 60", "disputes"),
                (f"sum(shardnet_api_suspected_servers{GATEWAY})", "suspected"),
            ],
        ),
    )
    board.line(
        latency("Time to first token", "shardnet_api_time_to_first_token_seconds", GATEWAY),
        latency("Inter-token latency", "shardnet_api_inter_token_latency_seconds", GATEWAY),
    )


def variables() -> list[dict]:
    """The datasource, the two scrape jobs of servers/prometheus.yml, and the servers to show (all by default)."""
    instances = 'label_values(shardnet_server_steps_total{job=~"$server_job"}, instance)'

    def job(name: str, label: str, default: str) -> dict:
        current = {"text": default, "value": default}
        return {
            "name": name,
            "label": label,
            "type": "custom",
            "query": default,
            "current": current,
            "options": [],
        }

    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        job("server_job", "server job", "shardnet-servers"),
        job("api_job", "gateway job", "shardnet-api"),
        {
            "name": "instance",
            "label": "server",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": instances, "refId": "instances"},
            "definition": instances,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "refresh": 2,  # on time range change
            "current": {"text": "All", "value": "$__all"},
        },
    ]


def dashboard() -> dict:
    board = Dashboard()
    server_panels(board)
    gateway_panels(board)
    source = {"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus"}
    return {
        "__inputs": [{**source, "pluginName": "Prometheus"}],
        "title": "shardnet",
        "uid": "shardnet",
        "description": "shardnet servers (serve --metrics-port) and the OpenAI gateway (shardnet api /metrics). "
        "README: Metrics.",
        "tags": ["shardnet"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables()},
        "panels": board.panels,
    }


def rendered() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON differs")
    args = parser.parse_args()
    if args.check:
        if OUTPUT.read_text() != rendered():
            print(f"{OUTPUT} is stale: run python scripts/grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(rendered())
    print(f"wrote {OUTPUT} ({sum(p['type'] != 'row' for p in dashboard()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
