import { test } from "node:test";
import assert from "node:assert/strict";

import {
  PLOT,
  emptyState,
  errorRange,
  escapeXml,
  finalState,
  formatPercent,
  mergeLayerEvent,
  plotGeometry,
  reportHtml,
  reportSvg,
  summaryLines,
} from "../report_view.js";

const layers = [
  { name: "a.weight", relative_error: 2e-4, exact_fraction: 0.5 },
  { name: "b.weight", relative_error: 3e-3, exact_fraction: 1.0 },
  { name: "c.weight", relative_error: 0, exact_fraction: 0.0 },
];
const report = {
  summary: { quantized: 3, quantized_elements: 1234567, exact_fraction: 0.25, relative_error: 2.5e-4, seconds: 1.25, peak_rss_bytes: 300 * 2 ** 20 },
  layers,
};

test("escapeXml neutralises markup in tensor names taken from files", () => {
  assert.equal(escapeXml(`<img src=x onerror="a">&'`), "&lt;img src=x onerror=&quot;a&quot;&gt;&amp;&#39;");
  const svg = reportSvg(finalState({ summary: report.summary, layers: [{ name: "<script>x</script>", relative_error: 1e-3, exact_fraction: 0 }] }));
  assert.ok(!svg.includes("<script>"));
  assert.ok(svg.includes("&lt;script&gt;x&lt;/script&gt;"));
});

test("errorRange spans whole decades around the errors, ignoring zeros", () => {
  assert.deepEqual(errorRange(layers), { low: -4, high: -2 });
  assert.deepEqual(errorRange([{ relative_error: 1e-3 }]), { low: -3, high: -2 });
  assert.deepEqual(errorRange([]), { low: -6, high: -2 });
});

test("plotGeometry: bar heights follow log error, dots follow exact fraction, all inside the box", () => {
  const g = plotGeometry(layers);
  assert.equal(g.bars.length, 3);
  assert.equal(g.dots.length, 3);
  const innerH = PLOT.height - PLOT.top - PLOT.bottom;
  // 2e-4 is log10 = -3.70 in [-4, -2]: 15% of the height
  assert.ok(Math.abs(g.bars[0].height - innerH * ((Math.log10(2e-4) + 4) / 2)) < 1e-9);
  assert.ok(g.bars[1].height > g.bars[0].height);
  assert.equal(g.bars[2].height, 0);
  assert.equal(g.dots[1].y, PLOT.top); // 100% exact at the top
  assert.equal(g.dots[2].y, g.bottom); // 0% at the bottom
  for (const b of g.bars) {
    assert.ok(b.x >= PLOT.left && b.x + b.width <= PLOT.width - PLOT.right + 1e-9);
    assert.ok(b.y >= PLOT.top - 1e-9 && b.y + b.height <= g.bottom + 1e-9);
  }
  assert.deepEqual(g.ticks.map((t) => t.label), ["1e-4", "1e-3", "1e-2"]);
});

test("reportSvg draws one bar per layer with a tooltip and one exactness line", () => {
  const svg = reportSvg(finalState(report));
  assert.equal((svg.match(/<rect /g) || []).length, 3);
  assert.equal((svg.match(/<polyline /g) || []).length, 1);
  assert.ok(svg.includes("<title>a.weight: error 2.00e-4, exact 50.0%</title>"));
  assert.ok(svg.startsWith("<svg") && svg.endsWith("</svg>"));
});

test("summary lines give the totals after a run and the current tensor during one", () => {
  assert.deepEqual(summaryLines(finalState(report)), [
    "3 weights, 1,234,567 values",
    "relative error 2.50e-4 · bit-exact 25.0%",
    "1.3 s · peak RSS 300 MiB",
  ]);
  const running = mergeLayerEvent(emptyState(), { node: "7", index: 4, total: 10, layer: layers[0] });
  assert.deepEqual(summaryLines(running), ["5/10 · a.weight"]);
  assert.deepEqual(summaryLines(emptyState()), ["not run yet"]);
});

test("live events accumulate, and a new run starts a fresh plot", () => {
  let s = emptyState();
  s = mergeLayerEvent(s, { index: 1, total: 6, layer: layers[0] });
  s = mergeLayerEvent(s, { index: 3, total: 6, layer: layers[1] });
  assert.equal(s.layers.length, 2);
  assert.equal(s.done, 4);
  s = mergeLayerEvent(s, { index: 1, total: 6, layer: layers[2] }); // index went back: next run
  assert.deepEqual(s.layers, [layers[2]]);
  const after = mergeLayerEvent(finalState(report), { index: 5, total: 6, layer: layers[0] }); // after a finished run
  assert.deepEqual(after.layers, [layers[0]]);
});

test("formatPercent keeps small fractions visible", () => {
  assert.equal(formatPercent(0.0001169), "0.012%");
  assert.equal(formatPercent(0.5), "50.0%");
  assert.equal(formatPercent(0), "0.0%");
});

test("reportHtml escapes the summary and embeds the plot", () => {
  const html = reportHtml(mergeLayerEvent(emptyState(), { index: 0, total: 2, layer: { name: "<b>", relative_error: 1e-3, exact_fraction: 0 } }));
  assert.ok(html.includes("1/2 · &lt;b&gt;"));
  assert.ok(html.includes("<svg"));
});
