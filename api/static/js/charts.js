// Curves per epoch with the vendored uPlot (a global from its IIFE build): one chart per quantity, a series
// per line. Each chart's element says how many epochs it draws (data-points), which the browser tests wait on.
import { h } from "./dom.js";

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
  "#4b5563", "#65a30d"];
const HEIGHT = 200;
// Epochs are whole numbers: ticks at these steps only (uPlot picks the smallest that fits).
const EPOCH_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];
// Quantities every epoch row has besides the loss and the metrics, drawn last, one chart each; samples per
// second is epoch seconds again (the job document's final metrics show it).
const TIMING = { lr: "Learning rate", epoch_seconds: "Seconds per epoch" };
export const NOT_DRAWN = new Set(["epoch", "samples_per_second"]);
const DASH = [6, 4];

/** Whether the ``i``th line is dashed: once the palette's colours are used up, they come again dashed. */
export function dashed(i) {
  return i >= PALETTE.length;
}

/** A chart titled ``title`` with one line per name of ``names``; ``set(xs, columns)`` draws them. */
export function lineChart(title, names, { spanGaps = false } = {}) {
  const element = h("figure", { class: "chart", "data-title": title, "data-points": 0 });
  let plot = null;
  let data = [[], ...names.map(() => [])];
  const options = (width) => ({
    title, width, height: HEIGHT,
    scales: { x: { time: false } },
    axes: [{ incrs: EPOCH_STEPS }, { size: 56, values: (_plot, ticks) => ticks.map(tick) }],
    series: [{ label: "epoch" },
      ...names.map((name, i) => ({ label: name, stroke: PALETTE[i % PALETTE.length], dash: dashed(i) ? DASH : undefined,
        width: 1.5, spanGaps }))],
  });
  // uPlot needs a width: the chart is drawn once the element is laid out, and follows its size.
  const observer = new ResizeObserver(([entry]) => {
    const width = Math.floor(entry.contentRect.width);
    if (width <= 0) return;
    if (!plot) plot = new window.uPlot(options(width), data, element);
    else if (width !== plot.width) plot.setSize({ width, height: HEIGHT });
  });
  observer.observe(element);
  return {
    element,
    set(xs, columns) {
      data = [xs, ...columns];
      element.dataset.points = String(xs.length);
      if (plot) plot.setData(data);
    },
    destroy() {
      observer.disconnect();
      if (plot) plot.destroy();
    },
  };
}

/** A y tick's label: three significant digits without trailing zeros (0.00125, 0.5, 1200), thousands as k. */
function tick(value) {
  if (value === null) return "";
  return Math.abs(value) >= 10000 ? `${Number((value / 1000).toPrecision(3))}k` : String(Number(value.toPrecision(3)));
}

/** Group one job's row keys into charts: loss with val_loss, each metric with its val_ twin, then timings. */
export function groups(keys) {
  const byBase = new Map();
  for (const name of keys) {
    if (NOT_DRAWN.has(name) || name in TIMING) continue;
    const base = name.startsWith("val_") ? name.slice(4) : name;
    if (!byBase.has(base)) byBase.set(base, []);
    byBase.get(base).push(name);
  }
  const bases = [...byBase.keys()].sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
  const found = bases.map((base) => ({ title: base === "loss" ? "Loss" : base, names: byBase.get(base).sort(
    (a, b) => a.length - b.length) }));
  for (const [name, title] of Object.entries(TIMING)) if (keys.has(name)) found.push({ title, names: [name] });
  return found;
}

/** The keys of ``rows`` (epoch rows), in order of first appearance. */
export function rowKeys(rows) {
  const keys = new Set();
  for (const row of rows) for (const name of Object.keys(row)) keys.add(name);
  return keys;
}

/**
 * A job's curves in ``container``: ``reset(rows)`` draws the rows, ``add(row)`` appends one epoch (a chart
 * for a quantity not seen before is added). ``container.dataset.points`` counts the epochs drawn.
 */
export function jobCurves(container) {
  let rows = [];
  let charts = [];
  let signature = "";
  const draw = () => {
    const keys = rowKeys(rows);
    const wanted = groups(keys);
    const next = JSON.stringify(wanted);
    if (next !== signature) {
      charts.forEach((chart) => chart.destroy());
      charts = wanted.map((group) => ({ group, chart: lineChart(group.title, group.names) }));
      container.replaceChildren(...charts.map(({ chart }) => chart.element));
      signature = next;
    }
    const xs = rows.map((row) => row.epoch);
    for (const { group, chart } of charts) chart.set(xs, group.names.map((name) => rows.map((row) => row[name] ?? null)));
    container.dataset.points = String(rows.length);
    container.dataset.lastEpoch = String(rows.length ? rows[rows.length - 1].epoch : 0);
  };
  return {
    reset(all) {
      rows = [...all];
      draw();
    },
    add(row) {
      if (rows.length && row.epoch <= rows[rows.length - 1].epoch) return; // a resent epoch
      rows.push(row);
      draw();
    },
    get lastEpoch() {
      return rows.length ? rows[rows.length - 1].epoch : 0;
    },
    destroy() {
      charts.forEach(({ chart }) => chart.destroy());
    },
  };
}
