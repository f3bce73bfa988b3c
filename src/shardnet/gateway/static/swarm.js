// The swarm monitor: refreshes from /api/swarm every 2 s.
"use strict";
const REFRESH_MS = 2000;

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
}

function spanOf(server) {
  const [start, end] = server.span.split(":").map(Number);
  return [start, end];
}

function render(doc) {
  const online = doc.servers.filter((s) => s.state === "online").length;
  document.getElementById("summary").textContent =
    `${doc.model_name} (${doc.architecture}, ${doc.num_blocks} blocks): ${online}/${doc.servers.length} servers online`;
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
  const route = document.getElementById("route");
  route.textContent = doc.route_error
    ? doc.route_error
    : doc.route.map((h) => `${h.span} @ ${h.short_id} (${h.address})`).join("  →  ");
  const steps = doc.recent.steps.slice(-8);
  document.getElementById("timings").textContent = steps.length
    ? steps.map((step) => step.map((t) => `${t.total_ms.toFixed(1)}/${t.server_compute_ms.toFixed(1)}/${t.wire_ms.toFixed(1)}`).join("  |  ")).join("\n")
    : "no generation yet";
  document.getElementById("timings").style.whiteSpace = "pre";
  const missing = new Set(doc.blocks_without_online_server);
  const blocks = document.querySelector("#blocks tbody");
  blocks.textContent = "";
  for (let b = 0; b < doc.num_blocks; b++) {
    const holders = doc.servers.filter((s) => { const [a, z] = spanOf(s); return a <= b && b < z; });
    const row = document.createElement("tr");
    cell(row, String(b));
    cell(row, holders.map((s) => `..${s.peer_id.slice(-4)} (${s.state})`).join(", ") || "none");
    cell(row, missing.has(b) ? "no" : "yes", missing.has(b) ? "missing" : "covered");
    blocks.appendChild(row);
  }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const reply = await fetch("/api/swarm");
    render(await reply.json());
  } catch (error) {
    document.getElementById("updated").textContent = "refresh failed: " + error.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
