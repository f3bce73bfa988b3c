// The block map, in SVG: the model's blocks along x, one row per server with a bar over its span [start, end),
// coloured by state and shaded by load (the share of its KV cache in use), and an axis row below marking in
// red the blocks no online server holds. Bars are <rect class="bar" data-peer data-span data-state>.
const SVG_NS = "http://www.w3.org/2000/svg";
const STATE_COLORS = {
  online: "#2e9e5b",
  joining: "#e0a100",
  draining: "#8a4fd1",
  resting: "#4a90d9",
  offline: "#9aa0a6",
};
const MAP = { width: 920, label: 170, right: 12, row: 22, gap: 6, axis: 20 };

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (parent) parent.appendChild(element);
  return element;
}

function serverLoad(server) {
  // 0..1: the share of its cache in use; a server that announces no total counts its open sessions
  if (server.cache_tokens_total > 0) {
    return Math.min(1, Math.max(0, 1 - server.cache_tokens_free / server.cache_tokens_total));
  }
  return Math.min(1, server.open_sessions / 8);
}

function parseSpan(span) {
  const [start, end] = span.split(":").map(Number);
  return [start, end];
}

export function drawBlockMap(container, doc) {
  const servers = [...doc.servers].sort((a, b) => parseSpan(a.span)[0] - parseSpan(b.span)[0]
    || parseSpan(a.span)[1] - parseSpan(b.span)[1] || a.peer_id.localeCompare(b.peer_id));
  const blocks = Math.max(1, doc.num_blocks);
  const plotWidth = MAP.width - MAP.label - MAP.right;
  const xOf = (block) => MAP.label + (block / blocks) * plotWidth;
  const rowsTop = MAP.axis;
  const axisTop = rowsTop + servers.length * (MAP.row + MAP.gap);
  const height = axisTop + MAP.row + MAP.axis;
  const svg = svgElement("svg", { viewBox: `0 0 ${MAP.width} ${height}`, width: "100%", role: "img" });
  svg.setAttribute("aria-label", `block map: ${servers.length} servers over ${blocks} blocks`);

  const tickEvery = blocks <= 32 ? 1 : blocks <= 80 ? 5 : 10;
  for (let b = 0; b <= blocks; b++) {
    const major = b % tickEvery === 0 || b === blocks;
    svgElement("line", { x1: xOf(b), x2: xOf(b), y1: rowsTop - 4, y2: axisTop + MAP.row,
      stroke: major ? "#c4c9d2" : "#eceef2", "stroke-width": 1 }, svg);
    if (b < blocks && b % tickEvery === 0) {  // block numbers sit over their column
      const label = svgElement("text", { x: (xOf(b) + xOf(b + 1)) / 2, y: rowsTop - 8, "text-anchor": "middle",
        class: "tick" }, svg);
      label.textContent = String(b);
    }
  }

  servers.forEach((server, i) => {
    const y = rowsTop + i * (MAP.row + MAP.gap);
    const [start, end] = parseSpan(server.span);
    const load = serverLoad(server);
    const name = svgElement("text", { x: 4, y: y + MAP.row / 2 + 4, class: "row-label" }, svg);
    name.textContent = `..${server.peer_id.slice(-4)} ${server.state}`;
    svgElement("rect", { x: MAP.label, y, width: plotWidth, height: MAP.row, class: "track" }, svg);
    const bar = svgElement("rect", {
      x: xOf(start), y, width: Math.max(1, xOf(end) - xOf(start)), height: MAP.row, rx: 3,
      class: "bar", fill: STATE_COLORS[server.state] || "#555", "fill-opacity": (0.35 + 0.65 * load).toFixed(2),
      stroke: STATE_COLORS[server.state] || "#555",
      "data-peer": server.peer_id, "data-span": server.span, "data-state": server.state,
      "data-load": load.toFixed(3),
    }, svg);
    const title = svgElement("title", {}, bar);
    title.textContent = `${server.peer_id}\nblocks ${server.span}, ${server.state}, ${server.address}\n`
      + `${server.open_sessions} open sessions, ${(100 * load).toFixed(0)}% of its cache in use`;
    const text = svgElement("text", { x: (xOf(start) + xOf(end)) / 2, y: y + MAP.row / 2 + 4,
      "text-anchor": "middle", class: "bar-label" }, svg);
    text.textContent = `${server.span} · ${server.open_sessions} sessions`;
  });

  const missing = new Set(doc.blocks_without_online_server);
  const axisLabel = svgElement("text", { x: 4, y: axisTop + MAP.row / 2 + 4, class: "row-label" }, svg);
  axisLabel.textContent = missing.size ? `${missing.size} blocks uncovered` : "all blocks covered";
  for (let b = 0; b < blocks; b++) {
    const gap = missing.has(b);
    svgElement("rect", { x: xOf(b) + 0.5, y: axisTop + 4, width: Math.max(1, xOf(b + 1) - xOf(b) - 1),
      height: MAP.row - 8, class: gap ? "gap" : "covered-block", "data-block": b }, svg);
  }
  const footer = svgElement("text", { x: MAP.label, y: height - 4, class: "tick" }, svg);
  footer.textContent = `blocks 0..${blocks} (spans are half-open start:end)`;
  container.replaceChildren(svg);
}

export function drawStateLegend(container) {
  container.replaceChildren();
  for (const [state, color] of Object.entries(STATE_COLORS)) {
    const item = document.createElement("span");
    item.className = "legend-item";
    const swatch = document.createElement("i");
    swatch.style.background = color;
    item.append(swatch, state);
    container.appendChild(item);
  }
  const gap = document.createElement("span");
  gap.className = "legend-item";
  const swatch = document.createElement("i");
  swatch.className = "gap-swatch";
  gap.append(swatch, "no online server");
  const shade = document.createElement("span");
  shade.className = "legend-note";
  shade.textContent = "darker bar = more of its cache in use";
  container.append(gap, shade);
}
