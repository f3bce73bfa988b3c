// The swarm monitor: refreshes from /api/swarm every 2 s. The block map and the charts are drawn by
// blockmap.js and charts.js; this module fills the tables and feeds them.
import { drawBlockMap, drawStateLegend } from "./blockmap.js";
import { drawLineChart } from "./charts.js";

const REFRESH_MS = 2000;
const RECENT_STEPS = 8;
let lastDoc = null;  // redrawn as it is when the window is resized

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function spanOf(server) {
  const [start, end] = server.span.split(":").map(Number);
  return [start, end];
}

function ms(value) {
  return value === null || value === undefined ? "pending" : value.toFixed(1);
}

function renderServers(doc) {
  const servers = document.querySelector("#servers tbody");
  servers.textContent = "";
  for (const s of doc.servers) {
    const row = document.createElement("tr");
    row.className = "server";
    row.dataset.peer = s.peer_id;
    cell(row, ".." + s.peer_id.slice(-4));
    cell(row, s.state);
    cell(row, s.address);
    cell(row, s.span);
    cell(row, s.dtype);
    cell(row, s.throughput.toFixed(1));
    cell(row, s.cache_tokens_total ? `${s.cache_tokens_free}/${s.cache_tokens_total}` : String(s.cache_tokens_free));
    cell(row, String(s.open_sessions));
    cell(row, String(s.sessions_served));
    servers.appendChild(row);
  }
}

function hopText(hop) {
  const where = `${hop.span} ..${hop.peer_id.slice(-4)}${hop.failed_over ? " (failed over)" : ""}`;
  if (hop.pending) return `${where}: pending`;
  if (hop.failed_over) return `${where}: failover ${ms(hop.failover_ms)}`;  // its wait and its replacement
  return `${where}: ${ms(hop.network_ms)} / ${ms(hop.queue_ms)} / ${ms(hop.compute_ms)} / ${ms(hop.return_ms)}`
    + ` = ${ms(hop.total_ms)}`;
}

function renderSteps(steps) {
  const body = document.querySelector("#steps tbody");
  body.textContent = "";
  const newest = steps.slice(-RECENT_STEPS).reverse();
  for (const step of newest) {
    const row = document.createElement("tr");
    row.className = "step";
    row.dataset.pending = step.pending ? "1" : "0";
    cell(row, String(step.positions));
    cell(row, ms(step.step_ms));
    cell(row, ms(step.critical_path_ms), step.pending ? "pending" : "");
    const hops = cell(row, "");
    for (const hop of step.hops) {
      const span = document.createElement("span");
      span.className = hop.pending ? "hop pending" : "hop";
      span.textContent = hopText(hop);
      hops.appendChild(span);
    }
    body.appendChild(row);
  }
  if (!newest.length) {
    const row = document.createElement("tr");
    cell(row, "no generation yet").colSpan = 4;
    body.appendChild(row);
  }
}

function renderBlocks(doc) {
  const missing = new Set(doc.blocks_without_online_server);
  const blocks = document.querySelector("#blocks tbody");
  blocks.textContent = "";
  for (let b = 0; b < doc.num_blocks; b++) {
    const holders = doc.servers.filter((s) => { const [a, z] = spanOf(s); return a <= b && b < z; });
    const row = document.createElement("tr");
    row.className = "block";
    cell(row, String(b));
    cell(row, holders.map((s) => `..${s.peer_id.slice(-4)} (${s.state})`).join(", ") || "none");
    cell(row, missing.has(b) ? "no" : "yes", missing.has(b) ? "missing" : "covered");
    blocks.appendChild(row);
  }
}

function renderCharts(series) {
  const age = (at) => series.now - at;
  const windowS = series.window_s;
  document.getElementById("window").textContent = String(Math.round(windowS / 60));
  const choices = series.choices;
  drawLineChart(document.getElementById("chart-tokens"), {
    windowS, unit: "tokens/s",
    lines: [{ name: "tokens/s", points: choices.filter((c) => c.tokens_per_s !== null).map((c) => [age(c.at), c.tokens_per_s]) }],
  });
  drawLineChart(document.getElementById("chart-ttft"), {
    windowS, unit: "ms",
    lines: [{ name: "TTFT", color: "#d1572a", points: choices.filter((c) => c.ttft_ms !== null).map((c) => [age(c.at), c.ttft_ms]) }],
  });
  const bySpan = new Map();
  for (const point of series.hops) {
    if (!bySpan.has(point.span)) bySpan.set(point.span, []);
    bySpan.get(point.span).push([age(point.at), point.mean_ms]);
  }
  const spans = [...bySpan.keys()].sort((a, b) => Number(a.split(":")[0]) - Number(b.split(":")[0]));
  drawLineChart(document.getElementById("chart-hops"), {
    windowS, unit: "ms", lines: spans.map((span) => ({ name: span, points: bySpan.get(span) })),
  });
}

function render(doc) {
  lastDoc = doc;
  const online = doc.servers.filter((s) => s.state === "online").length;
  document.getElementById("summary").textContent =
    `${doc.model_name} (${doc.architecture}, ${doc.num_blocks} blocks): ${online}/${doc.servers.length} servers online`;
  drawBlockMap(document.getElementById("blockmap"), doc);
  renderServers(doc);
  document.getElementById("route").textContent = doc.route_error
    ? doc.route_error
    : doc.route.map((h) => `${h.span} @ ${h.short_id} (${h.address})`).join("  →  ");
  renderSteps(doc.recent.steps);
  renderCharts(doc.recent.series);
  renderBlocks(doc);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const reply = await fetch("/api/swarm");
    if (!reply.ok) throw new Error(`/api/swarm answered ${reply.status}`);
    render(await reply.json());
  } catch (error) {
    document.getElementById("updated").textContent = "refresh failed: " + error.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

drawStateLegend(document.getElementById("legend"));
window.addEventListener("resize", () => lastDoc && render(lastDoc));
refresh();
