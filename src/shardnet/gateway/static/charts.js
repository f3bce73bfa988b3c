// A small line chart on a <canvas>, no library: x is "seconds ago", y starts at 0.
// drawLineChart(canvas, {windowS, unit, lines: [{name, color, points: [[ageS, value], ...]}]}) draws every
// line (dots joined in time order) and sets canvas.dataset.points to the number of points drawn. The x axis
// reaches back to the oldest point (at least a minute, at most windowS), so a new gateway's first
// minutes are not squeezed against "now".
const CHART_COLORS = ["#2a6bd1", "#d1572a", "#2e9e5b", "#8a4fd1", "#c9a100", "#1aa3a3", "#b0306e"];
const PAD = { left: 52, right: 12, top: 22, bottom: 26 };

function niceMax(value) {
  // the top of the y axis: four gridline steps, each 1, 2, 2.5 or 5 times a power of ten
  if (!(value > 0)) return 1;
  const quarter = value / 4;
  const power = 10 ** Math.floor(Math.log10(quarter));
  const step = [1, 2, 2.5, 5, 10].find((s) => s * power >= quarter) * power;
  return 4 * step;
}

const SPANS_S = [60, 120, 300, 600, 1200, 1800, 3600];

function axisSpan(oldestS, windowS) {
  const span = SPANS_S.find((s) => s >= oldestS * 1.05) || windowS;
  return Math.min(windowS, span);
}

function formatValue(value, yMax) {
  return value.toFixed(yMax >= 40 ? 0 : yMax >= 4 ? 1 : 2);
}

function ageLabel(seconds) {
  if (seconds === 0) return "now";
  return seconds % 60 === 0 ? `-${seconds / 60} min` : `-${seconds} s`;
}

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = canvas.clientHeight || 160;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width, height };
}

function drawAxes(ctx, plot, spanS, yMax, unit) {
  ctx.strokeStyle = "#d8dce3";
  ctx.fillStyle = "#5b6475";
  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = plot.bottom - (i / 4) * (plot.bottom - plot.top);
    ctx.beginPath();
    ctx.moveTo(plot.left, y);
    ctx.lineTo(plot.right, y);
    ctx.stroke();
    ctx.fillText(formatValue((i / 4) * yMax, yMax), plot.left - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const tickS = spanS <= 60 ? 15 : spanS <= 120 ? 30 : spanS <= 600 ? 120 : 600;
  for (let age = 0; age <= spanS; age += tickS) {
    const x = plot.right - (age / spanS) * (plot.right - plot.left);
    ctx.fillText(ageLabel(age), x, plot.bottom + 6);
  }
  ctx.textAlign = "left";
  ctx.fillText(unit, plot.left, 4);
}

function drawLegend(ctx, lines, plot) {
  if (lines.length < 2) return;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "top";
  ctx.textAlign = "left";
  let x = plot.left + 90;
  for (const line of lines) {
    ctx.fillStyle = line.color;
    ctx.fillRect(x, 6, 10, 3);
    ctx.fillStyle = "#1d2330";
    ctx.fillText(line.name, x + 14, 2);
    x += 22 + ctx.measureText(line.name).width;
  }
}

export function drawLineChart(canvas, { windowS, unit, lines }) {
  const { ctx, width, height } = fitCanvas(canvas);
  ctx.clearRect(0, 0, width, height);
  const plot = { left: PAD.left, right: width - PAD.right, top: PAD.top, bottom: height - PAD.bottom };
  const shown = lines.map((line, i) => ({
    ...line,
    color: line.color || CHART_COLORS[i % CHART_COLORS.length],
    points: line.points.filter(([age, value]) => age >= 0 && age <= windowS && Number.isFinite(value))
      .sort((a, b) => b[0] - a[0]),
  }));
  const yMax = niceMax(Math.max(0, ...shown.flatMap((line) => line.points.map((p) => p[1]))) * 1.1);
  const spanS = axisSpan(Math.max(0, ...shown.flatMap((line) => line.points.map((p) => p[0]))), windowS);
  drawAxes(ctx, plot, spanS, yMax, unit);
  const xOf = (age) => plot.right - (age / spanS) * (plot.right - plot.left);
  const yOf = (value) => plot.bottom - (value / yMax) * (plot.bottom - plot.top);
  let count = 0;
  for (const line of shown) {
    ctx.strokeStyle = line.color;
    ctx.fillStyle = line.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    line.points.forEach(([age, value], i) => (i ? ctx.lineTo(xOf(age), yOf(value)) : ctx.moveTo(xOf(age), yOf(value))));
    ctx.stroke();
    for (const [age, value] of line.points) {
      ctx.beginPath();
      ctx.arc(xOf(age), yOf(value), 2.5, 0, 2 * Math.PI);
      ctx.fill();
    }
    count += line.points.length;
  }
  drawLegend(ctx, shown, plot);
  if (!count) {
    ctx.fillStyle = "#8a93a3";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("no generation in this window yet", (plot.left + plot.right) / 2, (plot.top + plot.bottom) / 2);
  }
  canvas.dataset.points = String(count);
}
