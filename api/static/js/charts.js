// Charts with the vendored uPlot (a global from its IIFE build): curves per epoch, one chart per quantity and
// a series per line, and scatter plots (a sweep's parameter against its metric). Each chart's element says how
// many epochs or dots it draws (data-points), which the browser tests wait on.
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

/** The mark of the ``i``th line in a table beside its chart: its colour, dashed as the line is. */
export function swatch(i) {
  const mark = h("span", { class: dashed(i) ? "swatch dashed" : "swatch" });
  mark.style.color = PALETTE[i % PALETTE.length]; // CSSOM, which the style-src policy allows
  return mark;
}

/**
 * A chart titled ``title`` with one line per name of ``names``; ``set(xs, columns)`` draws them. ``legend``
 * false leaves uPlot's legend out (many lines: a table beside the chart says which is which).
 */
export function lineChart(title, names, { spanGaps = false, legend = true } = {}) {
  const element = h("figure", { class: "chart", "data-title": title, "data-points": 0 });
  let data = [[], ...names.map(() => [])];
  const options = (width) => ({
    title, width, height: HEIGHT,
    legend: { show: legend },
    scales: { x: { time: false } },
    axes: [{ incrs: EPOCH_STEPS }, { size: 56, values: (_plot, ticks) => ticks.map(tick) }],
    series: [{ label: "epoch" },
      ...names.map((name, i) => ({ label: name, stroke: PALETTE[i % PALETTE.length], dash: dashed(i) ? DASH : undefined,
        width: 1.5, spanGaps }))],
  });
  const chart = sized(element, options, () => data, HEIGHT);
  return {
    element,
    set(xs, columns) {
      data = [xs, ...columns];
      element.dataset.points = String(xs.length);
      chart.setData(data);
    },
    destroy: chart.destroy,
  };
}

/**
 * uPlot in ``element`` once it is laid out (uPlot needs a width), following its size: ``options(width)`` and
 * ``data()`` build it; ``setData`` redraws a chart already drawn (one not drawn yet takes ``data()`` then).
 */
function sized(element, options, data, height) {
  let plot = null;
  const observer = new ResizeObserver(([entry]) => {
    const width = Math.floor(entry.contentRect.width);
    if (width <= 0) return;
    if (!plot) plot = new window.uPlot(options(width), data(), element);
    else if (width !== plot.width) plot.setSize({ width, height });
  });
  observer.observe(element);
  return {
    setData(next) {
      if (plot) plot.setData(next);
    },
    destroy() {
      observer.disconnect();
      if (plot) plot.destroy();
    },
  };
}

const SCATTER_HEIGHT = 180;
export const SCATTER_GROUPS = [
  { name: "completed", color: "#16a34a" },
  { name: "pruned", color: "#9ca3af" },
  { name: "running or paused", color: "#2563eb" },
  { name: "failed or cancelled", color: "#dc2626" },
];

/**
 * A scatter plot of a metric (y) against one parameter (x), a dot per trial, coloured by SCATTER_GROUPS:
 * ``set(points)`` draws [{x, y, group}] (group an index of SCATTER_GROUPS). ``log``: a logarithmic x axis;
 * ``categories``: x is an index into these labels (a choice of values that are not numbers). The element's
 * data-points says how many dots it draws.
 */
export function scatterChart(title, yLabel, { log = false, categories = null } = {}) {
  const element = h("figure", { class: "chart scatter", "data-title": title, "data-points": 0,
    "data-scale": categories ? "categories" : log ? "log" : "linear" });
  let data = [[], ...SCATTER_GROUPS.map(() => [])];
  const xAxis = categories
    ? { splits: () => categories.map((_, i) => i), values: (_plot, ticks) => ticks.map((i) => categories[i] ?? "") }
    : { values: (_plot, ticks) => ticks.map(tick) };
  const options = (width) => ({
    title, width, height: SCATTER_HEIGHT,
    legend: { show: false }, // one key for all of them: scatterKey
    // Unset options are left out, not undefined: uPlot would take an undefined for the value.
    scales: { x: { time: false, distr: log ? 3 : 1,
      ...(categories ? { range: () => [-0.5, categories.length - 0.5] } : {}) } },
    axes: [xAxis, { size: 56, values: (_plot, ticks) => ticks.map(tick) }],
    // Dots, no lines: uPlot draws each series' points and, with paths that draw nothing, nothing between them.
    series: [{ label: title, ...(categories ? { value: (_plot, i) => (i === null ? "–" : categories[i]) } : {}) },
      ...SCATTER_GROUPS.map(({ name, color }) => ({ label: `${yLabel} (${name})`, stroke: color, fill: color,
        paths: () => null, points: { show: true, size: 7, fill: color, stroke: color } }))],
  });
  const chart = sized(element, options, () => data, SCATTER_HEIGHT);
  return {
    element,
    set(points) {
      // uPlot's x values go in ascending order; a dot's group is the one series where it isn't null.
      const sorted = [...points].sort((a, b) => a.x - b.x);
      data = [sorted.map((p) => p.x), ...SCATTER_GROUPS.map((_, g) => sorted.map((p) => (p.group === g ? p.y : null)))];
      element.dataset.points = String(sorted.length);
      chart.setData(data);
    },
    destroy: chart.destroy,
  };
}

/** The key to the scatter plots' colours: a dot and a name for each of SCATTER_GROUPS. */
export function scatterKey() {
  return h("div", { class: "scatter-key small muted" }, SCATTER_GROUPS.map(({ name, color }) => {
    const dot = h("span", { class: "dot" });
    dot.style.background = color; // CSSOM, which the style-src policy allows
    return h("span", {}, dot, name);
  }));
}

/** One x axis for every job (the union of their epochs) and each job's values of ``name`` on it (null where absent). */
export function aligned(rowsPerJob, name) {
  const xs = [...new Set(rowsPerJob.flatMap((rows) => rows.map((row) => row.epoch)))].sort((a, b) => a - b);
  const columns = rowsPerJob.map((rows) => {
    const byEpoch = new Map(rows.map((row) => [row.epoch, row[name]]));
    return xs.map((epoch) => byEpoch.get(epoch) ?? null);
  });
  return { xs, columns };
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
