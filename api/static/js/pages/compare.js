// Compare: the curves of several jobs overlaid (one chart per quantity, a line per job) and the fields in
// which their specs differ. Jobs come from the list's ticks (?ids=a,b) or from a tag (?tag=t). The curves of
// jobs still queued or running are read on every few seconds.
import { api } from "../api.js";
import { aligned, lineChart, NOT_DRAWN, rowKeys, swatch } from "../charts.js";
import { badge, every, fill, FINISHED, h, problemBox, thead } from "../dom.js";

const MAX_POINTS = 500; // per job and curve
const MAX_JOBS = 20; // two rounds of the palette: its colours, then dashed
const LIVE_MS = 5000; // one metrics read per unfinished job each time
const ABSENT = Symbol("absent");

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
  const charts = compareCharts();
  const stops = [() => charts.destroy()];
  let left = false;
  load(ids, tag, content, charts)
    .then((stop) => (left ? stop() : stops.push(stop)))
    .catch((error) => fill(content, problemBox(error)));
  return () => {
    left = true;
    stops.forEach((stop) => stop());
  };
}

/** Draw the comparison; returns what stops its live part. */
async function load(ids, tag, content, charts) {
  const { chosen, notes } = await chooseJobs(ids, tag);
  if (!chosen.length) {
    const hint = tag ? notes.join(" ") // no jobs carry it
      : "Tick two or more jobs on the Jobs page and press Compare selected, or name job ids or a tag above.";
    fill(content, h("p", { class: "muted", id: "compare-hint" }, hint));
    return () => {};
  }
  fill(content, h("p", { class: "muted" }, "Loading…"));
  const jobs = await Promise.all(chosen.map(async (id) => {
    const path = `/jobs/${encodeURIComponent(id)}`;
    const [job, metrics] = await Promise.all([api(path), api(`${path}/metrics?max_points=${MAX_POINTS}`)]);
    return { job, rows: metrics.metrics, status: job.status };
  }));
  const labels = jobs.map(({ job }) => `${job.name} (${job.id.slice(-6)})`);
  const table = h("tbody");
  const drawTable = () => fill(table, jobs.map(({ job, rows, status }, i) => h("tr", { "data-job-id": job.id },
    h("td", {}, swatch(i)),
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name),
      h("span", { class: "muted small" }, ` ${job.id}`)),
    h("td", {}, badge(status)),
    h("td", {}, `${rows.length ? rows[rows.length - 1].epoch : job.progress.epoch}/${job.progress.epochs}`))));
  drawTable();
  charts.grid.dataset.jobs = String(jobs.length);
  charts.draw(jobs.map(({ rows }) => rows), labels);
  fill(content,
    notes.length ? h("p", { class: "muted", id: "compare-note" }, notes.join(" ")) : null,
    h("table", { class: "compact", id: "compared-jobs" }, thead(["", "Job", "Status", "Epochs"]), table),
    charts.grid,
    h("h2", {}, "Spec differences"),
    differences(jobs.map(({ job }) => job.spec), labels));
  return follow(jobs, () => {
    drawTable();
    charts.draw(jobs.map(({ rows }) => rows), labels);
  });
}

/**
 * The ids to compare (the ones named, then the newest jobs carrying ``tag``; at most MAX_JOBS) and notes
 * that say what was left out.
 */
async function chooseJobs(ids, tag) {
  const named = [...new Set(ids)];
  const notes = [];
  if (named.length > MAX_JOBS) notes.push(`Showing the first ${MAX_JOBS} of the ${named.length} jobs named.`);
  let chosen = named.slice(0, MAX_JOBS);
  if (!tag) return { chosen, notes };
  const page = await api(`/jobs?${new URLSearchParams({ tag, limit: MAX_JOBS })}`);
  if (!page.jobs.length) return { chosen, notes: [...notes, `No jobs carry the tag “${tag}”.`] };
  const tagged = page.jobs.map((job) => job.id).filter((id) => !chosen.includes(id));
  const room = MAX_JOBS - chosen.length;
  chosen = [...chosen, ...tagged.slice(0, room)];
  if (page.next_cursor || tagged.length > room) {
    const count = page.next_cursor ? await tagCount(tag) : page.jobs.length;
    const shown = Math.min(tagged.length, room);
    notes.push(count ? `Showing the newest ${shown} of the ${count} jobs tagged “${tag}” (at most ${MAX_JOBS} at once).`
      : `Showing the newest ${shown} jobs tagged “${tag}”; more carry it (at most ${MAX_JOBS} at once).`);
  }
  return { chosen, notes };
}

/** How many of the caller's jobs carry ``tag`` (GET /tags), or null when it can't be told. */
async function tagCount(tag) {
  try {
    const { tags } = await api("/tags?limit=1000");
    return tags.find((item) => item.tag === tag)?.jobs ?? null;
  } catch {
    return null; // the note says "more" instead of a number
  }
}

/** Read the new epochs of the jobs still queued or running every LIVE_MS; ``changed`` redraws. */
function follow(jobs, changed) {
  const live = () => jobs.filter(({ status }) => !FINISHED.has(status));
  if (!live().length) return () => {};
  let stopped = false;
  const stopReading = every(LIVE_MS, async () => {
    const answers = await Promise.all(live().map(async (entry) => {
      const since = entry.rows.length ? entry.rows[entry.rows.length - 1].epoch : 0;
      let page;
      try {
        page = await api(`/jobs/${encodeURIComponent(entry.job.id)}/metrics?since_epoch=${since}`);
      } catch (error) {
        console.warn(error); // this job (deleted meanwhile?) only: the others are still drawn, and it is asked again
        return false;
      }
      // Rows come a page at a time: a job that finished stays live until its last page is read.
      const status = page.next_since_epoch === null ? page.status : entry.status;
      const news = page.metrics.length > 0 || status !== entry.status;
      entry.rows = [...entry.rows, ...page.metrics];
      entry.status = status;
      return news;
    }));
    if (stopped) return; // the page was left meanwhile
    if (answers.some(Boolean)) changed();
    if (!live().length) stopReading();
  });
  return () => {
    stopped = true;
    stopReading();
  };
}

/** The charts of a comparison in one grid: ``draw`` sets their data, adding a chart for a new quantity. */
function compareCharts() {
  const grid = h("div", { class: "charts compare-charts" });
  let charts = new Map(); // quantity → its chart
  const destroy = () => charts.forEach((chart) => chart.destroy());
  return {
    grid,
    draw(rowsPerJob, labels) {
      const names = [...rowKeys(rowsPerJob.flat())].filter((key) => !NOT_DRAWN.has(key)).sort(byQuantity);
      if (names.join("\n") !== [...charts.keys()].join("\n")) {
        destroy();
        charts = new Map(names.map((name) => [name, lineChart(name, labels, { spanGaps: true })]));
        grid.replaceChildren(...[...charts.values()].map((chart) => chart.element));
      }
      for (const [name, chart] of charts) {
        const { xs, columns } = aligned(rowsPerJob, name);
        chart.set(xs, columns);
      }
    },
    destroy,
  };
}

const ORDER = ["loss", "val_loss"];
const LAST = ["lr", "epoch_seconds"];
function byQuantity(a, b) {
  const rank = (name) => (ORDER.includes(name) ? ORDER.indexOf(name) : LAST.includes(name) ? 100 + LAST.indexOf(name) : 10);
  return rank(a) - rank(b) || a.localeCompare(b);
}

/** A table of the spec fields (dotted paths) whose values are not the same in every spec. */
function differences(specs, labels) {
  const rows = differingFields(specs);
  if (!rows.length) return h("p", { class: "muted", id: "spec-differences" }, "The specs are the same.");
  return h("table", { class: "compact diff", id: "spec-differences" },
    thead(["Field", ...labels]),
    h("tbody", {}, rows.map(({ path, values }) => h("tr", {}, h("td", {}, h("code", {}, path)),
      values.map((value) => (value === ABSENT ? h("td", { class: "absent" }, "(absent)")
        : h("td", {}, JSON.stringify(value))))))));
}

/**
 * The fields at which ``values`` (one per spec, ABSENT where a spec lacks the field) differ, as {path, values}.
 * Where every value is an object, or every value a list, the comparison goes down into their fields or items;
 * otherwise (scalars, or values of different kinds: a list and null, an object and no field at all) the
 * field's whole values are the row.
 */
function differingFields(values, path = "") {
  const kinds = new Set(values.map(kind));
  if (kinds.size === 1 && kinds.has("object")) {
    const names = [...new Set(values.flatMap(Object.keys))].sort();
    return names.flatMap((name) => differingFields(values.map((value) => (name in value ? value[name] : ABSENT)),
      path ? `${path}.${name}` : name));
  }
  if (kinds.size === 1 && kinds.has("list")) {
    const length = Math.max(...values.map((value) => value.length));
    return Array.from({ length }, (_, i) => differingFields(
      values.map((value) => (i < value.length ? value[i] : ABSENT)), `${path}[${i}]`)).flat();
  }
  const same = kinds.size === 1 && new Set(values.map((value) => JSON.stringify(value))).size === 1;
  return same ? [] : [{ path, values }];
}

function kind(value) {
  if (value === ABSENT) return "absent";
  if (Array.isArray(value)) return "list";
  return value !== null && typeof value === "object" ? "object" : "scalar";
}
