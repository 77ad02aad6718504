// Rendering of a conversion report, as plain functions (no DOM, no ComfyUI): data in, SVG markup out.
// The report is what nodes/quantize.py puts in the node's "ui" output:
//   {summary: {quantized, quantized_elements, exact_fraction, relative_error, seconds, peak_rss_bytes, ...},
//    layers: [{name, relative_error, exact_fraction}, ...]}
// and live layer events are nodes/progress.py's {node, index, total, layer}.

export const PLOT = { width: 320, height: 150, left: 34, right: 8, top: 8, bottom: 18 };
const ERROR_COLOR = "#4e9bd6";
const EXACT_COLOR = "#e39b3b";

export function escapeXml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function formatError(value) {
  return Number.isFinite(value) ? value.toExponential(2) : "n/a";
}

export function formatPercent(fraction) {
  return Number.isFinite(fraction) ? `${(100 * fraction).toFixed(fraction < 0.001 && fraction > 0 ? 3 : 1)}%` : "n/a";
}

export function emptyState() {
  return { layers: [], total: 0, done: 0, current: "", summary: null };
}

// Adds one live layer event; an index not after the last one means a new run started.
export function mergeLayerEvent(state, event) {
  const restart = state.summary !== null || event.index < state.done;
  const layers = restart ? [] : state.layers;
  return {
    layers: [...layers, event.layer],
    total: event.total,
    done: event.index + 1,
    current: event.layer.name,
    summary: null,
  };
}

export function finalState(report) {
  return { layers: report.layers, total: report.layers.length, done: report.layers.length, current: "", summary: report.summary };
}

// Decades spanned by the relative errors, so bars use a log scale that fits them all.
export function errorRange(layers) {
  const logs = layers.map((l) => l.relative_error).filter((v) => v > 0 && Number.isFinite(v)).map(Math.log10);
  if (logs.length === 0) return { low: -6, high: -2 };
  const low = Math.floor(Math.min(...logs));
  const high = Math.ceil(Math.max(...logs));
  return { low, high: high > low ? high : low + 1 };
}

// Geometry of the plot: one bar per layer (log relative error), one dot per layer (bit-exact fraction).
export function plotGeometry(layers, box = PLOT) {
  const innerW = box.width - box.left - box.right;
  const innerH = box.height - box.top - box.bottom;
  const range = errorRange(layers);
  const step = layers.length ? innerW / layers.length : innerW;
  const bottom = box.top + innerH;
  const bars = layers.map((l, i) => {
    const v = l.relative_error > 0 ? (Math.log10(l.relative_error) - range.low) / (range.high - range.low) : 0;
    const h = Math.max(0, Math.min(1, v)) * innerH;
    return { x: box.left + i * step, y: bottom - h, width: Math.max(step * 0.8, 0.5), height: h, layer: l };
  });
  const dots = layers.map((l, i) => ({
    x: box.left + (i + 0.5) * step,
    y: bottom - Math.max(0, Math.min(1, l.exact_fraction)) * innerH,
  }));
  const ticks = [];
  for (let e = range.low; e <= range.high; e++) {
    ticks.push({ y: bottom - ((e - range.low) / (range.high - range.low)) * innerH, label: `1e${e}` });
  }
  return { bars, dots, ticks, range, bottom };
}

export function summaryLines(state) {
  if (state.summary) {
    const s = state.summary;
    return [
      `${s.quantized} weights, ${s.quantized_elements.toLocaleString("en-US")} values`,
      `relative error ${formatError(s.relative_error)} · bit-exact ${formatPercent(s.exact_fraction)}`,
      `${s.seconds.toFixed(1)} s · peak RSS ${Math.round(s.peak_rss_bytes / 2 ** 20)} MiB`,
    ];
  }
  if (state.total) return [`${state.done}/${state.total} · ${state.current}`];
  return ["not run yet"];
}

export function reportSvg(state, box = PLOT) {
  const g = plotGeometry(state.layers, box);
  const parts = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${box.width}" height="${box.height}" viewBox="0 0 ${box.width} ${box.height}" font-family="sans-serif" font-size="9">`,
    `<line x1="${box.left}" y1="${g.bottom}" x2="${box.width - box.right}" y2="${g.bottom}" stroke="#888"/>`,
  ];
  for (const t of g.ticks) {
    parts.push(`<text x="${box.left - 3}" y="${t.y + 3}" text-anchor="end" fill="${ERROR_COLOR}">${t.label}</text>`);
  }
  for (const b of g.bars) {
    const title = `${escapeXml(b.layer.name)}: error ${formatError(b.layer.relative_error)}, exact ${formatPercent(b.layer.exact_fraction)}`;
    parts.push(
      `<rect x="${b.x.toFixed(2)}" y="${b.y.toFixed(2)}" width="${b.width.toFixed(2)}" height="${b.height.toFixed(2)}" fill="${ERROR_COLOR}"><title>${title}</title></rect>`,
    );
  }
  if (g.dots.length) {
    const points = g.dots.map((d) => `${d.x.toFixed(2)},${d.y.toFixed(2)}`).join(" ");
    parts.push(`<polyline points="${points}" fill="none" stroke="${EXACT_COLOR}" stroke-width="1"/>`);
  }
  parts.push(
    `<text x="${box.left}" y="${box.height - 5}" fill="${ERROR_COLOR}">relative error (log)</text>`,
    `<text x="${box.width - box.right}" y="${box.height - 5}" text-anchor="end" fill="${EXACT_COLOR}">bit-exact 0-100%</text>`,
    "</svg>",
  );
  return parts.join("");
}

// The whole widget body: summary lines then the plot.
export function reportHtml(state, box = PLOT) {
  const lines = summaryLines(state).map((l) => `<div>${escapeXml(l)}</div>`).join("");
  return `<div class="lrfp16-summary">${lines}</div>${reportSvg(state, box)}`;
}
