// Compare: the curves of several jobs overlaid (one chart per quantity, a line per job) and the fields in
// which their specs differ. Jobs come from the list's ticks (?ids=a,b) or from a tag (?tag=t).
import { api } from "../api.js";
import { lineChart, NOT_DRAWN, PALETTE, rowKeys } from "../charts.js";
import { badge, fill, h, problemBox, thead } from "../dom.js";

const MAX_POINTS = 500; // per job and curve
const MAX_JOBS = 10;

export function render(root, _args, params) {
  const ids = (params.get("ids") || "").split(",").map((id) => id.trim()).filter(Boolean);
  const tag = params.get("tag") || "";
  const tagInput = h("input", { type: "search", id: "compare-tag", placeholder: "tag", value: tag });
  const idsInput = h("input", { type: "text", id: "compare-ids", placeholder: "job ids, comma-separated",
    value: ids.join(",") });
  const choose = h("form", { class: "toolbar" }, idsInput, tagInput, h("button", { type: "submit" }, "Compare"));
  choose.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    if (idsInput.value.trim()) query.set("ids", idsInput.value.trim());
    if (tagInput.value.trim()) query.set("tag", tagInput.value.trim());
    window.location.hash = `#/compare?${query}`;
  });
  const content = h("div", { id: "comparison" });
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Compare"), choose), content);
  const charts = [];
  load(ids, tag, content, charts).catch((error) => fill(content, problemBox(error)));
  return () => charts.forEach((chart) => chart.destroy());
}

async function load(ids, tag, content, charts) {
  let chosen = [...ids];
  if (tag) {
    const page = await api(`/jobs?${new URLSearchParams({ tag, limit: MAX_JOBS })}`);
    chosen = [...chosen, ...page.jobs.map((job) => job.id)];
  }
  chosen = [...new Set(chosen)].slice(0, MAX_JOBS);
  if (!chosen.length) {
    fill(content, h("p", { class: "muted" }, "Tick two or more jobs on the Jobs page and press Compare selected, "
      + "or name job ids or a tag above."));
    return;
  }
  fill(content, h("p", { class: "muted" }, "Loading…"));
  const jobs = await Promise.all(chosen.map(async (id) => {
    const path = `/jobs/${encodeURIComponent(id)}`;
    const [job, metrics] = await Promise.all([api(path), api(`${path}/metrics?max_points=${MAX_POINTS}`)]);
    return { job, rows: metrics.metrics };
  }));
  const labels = jobs.map(({ job }) => `${job.name} (${job.id.slice(-6)})`);
  const grid = h("div", { class: "charts compare-charts", "data-jobs": jobs.length });
  for (const name of [...rowKeys(jobs.flatMap(({ rows }) => rows))].filter((key) => !NOT_DRAWN.has(key)).sort(byQuantity)) {
    const chart = lineChart(name, labels, { spanGaps: true });
    const { xs, columns } = aligned(jobs.map(({ rows }) => rows), name);
    chart.set(xs, columns);
    charts.push(chart);
    grid.append(chart.element);
  }
  fill(content,
    h("table", { class: "compact", id: "compared-jobs" },
      thead(["", "Job", "Status", "Epochs"]),
      h("tbody", {}, jobs.map(({ job }, i) => h("tr", {},
        h("td", {}, swatch(i)),
        h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name),
          h("span", { class: "muted small" }, ` ${job.id}`)),
        h("td", {}, badge(job.status)), h("td", {}, `${job.progress.epoch}/${job.progress.epochs}`))))),
    grid,
    h("h2", {}, "Spec differences"),
    differences(jobs.map(({ job }) => job), labels));
}

function swatch(i) {
  const mark = h("span", { class: "swatch" });
  mark.style.background = PALETTE[i % PALETTE.length]; // the colour of the job's lines
  return mark;
}

const ORDER = ["loss", "val_loss"];
const LAST = ["lr", "epoch_seconds"];
function byQuantity(a, b) {
  const rank = (name) => (ORDER.includes(name) ? ORDER.indexOf(name) : LAST.includes(name) ? 100 + LAST.indexOf(name) : 10);
  return rank(a) - rank(b) || a.localeCompare(b);
}

/** One x axis for every job (the union of their epochs) and each job's values on it (null where absent). */
function aligned(rowsPerJob, name) {
  const xs = [...new Set(rowsPerJob.flatMap((rows) => rows.map((row) => row.epoch)))].sort((a, b) => a - b);
  const columns = rowsPerJob.map((rows) => {
    const byEpoch = new Map(rows.map((row) => [row.epoch, row[name]]));
    return xs.map((epoch) => byEpoch.get(epoch) ?? null);
  });
  return { xs, columns };
}

/** A table of the spec fields (dotted paths) whose values are not the same in every job. */
function differences(jobs, labels) {
  const flat = jobs.map((job) => flatten(job.spec));
  const paths = [...new Set(flat.flatMap((fields) => [...fields.keys()]))].sort();
  const differing = paths.filter((path) => new Set(flat.map((fields) => fields.get(path))).size > 1);
  if (!differing.length) return h("p", { class: "muted", id: "spec-differences" }, "The specs are the same.");
  return h("table", { class: "compact diff", id: "spec-differences" },
    thead(["Field", ...labels]),
    h("tbody", {}, differing.map((path) => h("tr", {}, h("td", {}, h("code", {}, path)),
      flat.map((fields) => h("td", {}, fields.has(path) ? fields.get(path) : "–"))))));
}

/** Each leaf of a spec by its path (model.layers[0].out_features), as JSON text. */
function flatten(value, prefix = "", into = new Map()) {
  if (Array.isArray(value) && value.length) value.forEach((item, i) => flatten(item, `${prefix}[${i}]`, into));
  else if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
    for (const [name, item] of Object.entries(value)) flatten(item, prefix ? `${prefix}.${name}` : name, into);
  } else into.set(prefix, JSON.stringify(value));
  return into;
}
