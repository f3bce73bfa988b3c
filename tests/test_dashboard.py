"""What ships for operators names only metrics that exist: every metric the Grafana dashboard
(servers/grafana-dashboard.json) queries and the README names is one a server
(server/metrics.py) or the gateway (gateway/metrics.py) exposes, and the dashboard's default jobs are
the ones servers/prometheus.yml scrapes; the JSON is what scripts/grafana_dashboard.py writes. No swarm: the
metrics' own expositions are read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shardnet.client.trust import ServerTrust
from shardnet.gateway.metrics import GatewayMetrics
from shardnet.server.metrics import ServerMetrics
from shardnet.server.servicer import ServerRuntime
from shardnet.server.sessions import SessionTable

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"\bshardnet_(?:server|api)_[a-z_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("", "_bucket", "_sum", "_count")}  # "": its own name


def _exposed() -> set[str]:
    """Every series name the server's and the gateway's expositions can carry."""
    metrics = ServerMetrics(ServerRuntime(SessionTable(1024, 4), 1 << 20), "model")
    text = metrics.registry_text() + GatewayMetrics(ServerTrust()).exposition().decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        names.update(name.removesuffix("_total") + suffix for suffix in SUFFIXES.get(kind, ("",)))
    return names


def test_the_dashboard_and_the_readme_name_only_exposed_metrics():
    exposed = _exposed()
    dashboard = json.loads((ROOT / "servers" / "grafana-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in NAME.findall(target["expr"])
    }
    assert len(queried) >= 20 and queried <= exposed, sorted(queried - exposed)
    listed = set(NAME.findall((ROOT / "README.md").read_text()))
    assert listed <= exposed, sorted(listed - exposed)
    drawn = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    assert listed <= drawn, sorted(
        listed - drawn
    )  # the README says the dashboard draws every metric it lists
    assert {"shardnet_server_steps_total", "shardnet_api_requests_total"} <= listed


def test_the_dashboard_s_jobs_are_the_ones_prometheus_yml_scrapes():
    dashboard = json.loads((ROOT / "servers" / "grafana-dashboard.json").read_text())
    defaults = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "custom"}
    scraped = re.findall(r"job_name: (\S+)", (ROOT / "servers" / "prometheus.yml").read_text())
    assert sorted(defaults.values()) == sorted(scraped) == ["shardnet-api", "shardnet-servers"]


def test_the_dashboard_is_what_its_script_writes():
    """The JSON is generated: a hand edit would be lost at the next run of scripts/grafana_dashboard.py."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "grafana_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
