// One sweep: its status, trials by state and best trial; its trials in a table sortable by the metric (or by
// number), each linked to its job's page; the metric's curve of every trial overlaid in one chart; a scatter
// plot of each parameter against the metric. Read again every few seconds until the sweep has ended.
import { api } from "../api.js";
import { aligned, lineChart, scatterChart, scatterKey, swatch } from "../charts.js";
import { age, attempt, badge, every, fill, FINISHED, h, number, problemBox, progressBar, time } from "../dom.js";

const POLL_MS = 4000; // two reads, and one per trial that has new epochs: inside the read budget
const MAX_POINTS = 500; // per trial's curve on the first read; the server picks them evenly
const MAX_LEGEND = 10; // more lines than this: the table's swatches say which is which, not uPlot's legend
const COMPARE_BEST = 5; // the trials "Compare the best" opens
const STATES = ["queued", "running", "paused", "succeeded", "pruned", "failed", "cancelled"];
// A dot's group in the scatter plots (an index of SCATTER_GROUPS), by its trial's state.
const GROUP = { succeeded: 0, pruned: 1, queued: 2, running: 2, paused: 2, failed: 3, cancelled: 3 };

export function render(root, { id }) {
  const path = `/sweeps/${encodeURIComponent(id)}`;
  const abort = new AbortController();
  const parts = {
    head: h("div", { class: "page-head" }),
    message: h("div"),
    status: h("div", { class: "card", id: "sweep-status" }),
    best: h("div", { class: "card", id: "sweep-best" }),
    trials: h("div", { class: "card", id: "sweep-trials" }),
    curves: h("div", { class: "charts", id: "sweep-curves" }),
    params: h("div", { class: "charts scatter-charts", id: "sweep-params" }),
  };
  fill(root, parts.head, parts.message,
    h("div", { class: "job-grid" },
      h("div", { class: "main-column" },
        h("div", { class: "card" }, h("h2", {}, "Curves"), parts.curves),
        h("div", { class: "card" }, h("div", { class: "card-head" }, h("h2", {}, "Parameters against the metric"),
          scatterKey()), parts.params)),
      h("div", { class: "side-column" }, parts.status, parts.best)),
    parts.trials);

  let sweep = null;
  let trials = [];
  const rows = new Map(); // a trial job's id → its epoch rows read so far
  let sort = null; // {key: "number" | "value", dir: 1 ascending | -1 descending}
  let curves = null; // {chart, count}: redrawn with a line more when a trial is created
  let scatters = null; // [{path, chart, x}] once the sweep's space is known
  const stops = [() => abort.abort(), () => curves?.chart.destroy(), () => scatters?.forEach(({ chart }) => chart.destroy())];

  async function refresh() {
    const [next, page] = await Promise.all([api(path, { signal: abort.signal }),
      api(`${path}/trials`, { signal: abort.signal })]);
    sweep = next;
    trials = page.trials;
    sort = sort || { key: "value", dir: bestFirst(sweep.mode) };
    await readCurves();
    if (abort.signal.aborted) return;
    draw();
    if (FINISHED.has(sweep.status)) stopPolling(); // the curves were read after it ended: nothing more comes
  }

  /** Read each trial's epochs after those read already, for the trials that have new ones. */
  async function readCurves() {
    const behind = trials.filter((trial) => trial.epoch > lastEpoch(rows.get(trial.job_id)));
    await Promise.all(behind.map(async (trial) => {
      const since = lastEpoch(rows.get(trial.job_id));
      let query = since ? `since_epoch=${since}` : `max_points=${MAX_POINTS}`;
      try {
        // New epochs come a page at a time: read to the last page, so that a sweep's final read is whole.
        while (query) {
          const history = await api(`/jobs/${encodeURIComponent(trial.job_id)}/metrics?${query}`, { signal: abort.signal });
          rows.set(trial.job_id, [...(rows.get(trial.job_id) || []), ...history.metrics]);
          query = history.next_since_epoch === null ? null : `since_epoch=${history.next_since_epoch}`;
        }
      } catch (error) {
        if (!abort.signal.aborted) console.warn(error); // this trial only: asked again on the next turn
      }
    }));
  }

  let drawn = "";
  function draw() {
    root.dataset.status = sweep.status;
    root.dataset.trials = String(trials.length);
    const signature = JSON.stringify([sweep, trials, sort, Math.floor(Date.now() / 60000)]);
    if (signature !== drawn) { // a table row isn't replaced under the pointer when nothing changed
      drawn = signature;
      drawHead(parts.head, sweep, path, parts.message);
      drawStatus(parts.status, sweep);
      drawBest(parts.best, sweep, trials);
      drawTrials(parts.trials, sweep, ordered(trials, sort), sort, (key) => {
        sort = sort.key === key ? { key, dir: -sort.dir } : { key, dir: key === "number" ? 1 : bestFirst(sweep.mode) };
        draw();
      });
    }
    drawCurves();
    drawScatters();
  }

  function drawCurves() {
    if (!curves || curves.count !== trials.length) {
      curves?.chart.destroy();
      const chart = lineChart(sweep.metric, trials.map((trial) => `trial ${trial.number}`),
        { spanGaps: true, legend: trials.length <= MAX_LEGEND });
      curves = { chart, count: trials.length };
      fill(parts.curves, trials.length ? chart.element : null);
    }
    const { xs, columns } = aligned(trials.map((trial) => rows.get(trial.job_id) || []), sweep.metric);
    curves.chart.set(xs, columns);
    parts.curves.dataset.lines = String(columns.filter((column) => column.some((value) => value !== null)).length);
  }

  function drawScatters() {
    if (!scatters) {
      scatters = parameterAxes(sweep.request.space).map(({ path: param, log, categories, x }) => ({
        path: param, x, chart: scatterChart(param, sweep.metric, { log, categories }) }));
      scatters.forEach(({ path: param, chart }) => { chart.element.dataset.param = param; });
      fill(parts.params, scatters.map(({ chart }) => chart.element));
    }
    for (const { path: param, chart, x } of scatters) {
      chart.set(trials.filter((trial) => trial.value !== null && param in trial.params)
        .map((trial) => ({ x: x(trial.params[param]), y: trial.value, group: GROUP[trial.state] ?? 3 }))
        .filter((point) => point.x !== null));
    }
  }

  // One read at a time: two at once would both add a trial's epochs after the same one.
  let reading = null;
  const readOnce = () => {
    reading = reading || refresh().finally(() => { reading = null; });
    return reading;
  };
  const stopPolling = every(POLL_MS, readOnce);
  stops.push(stopPolling);
  readOnce().catch((error) => {
    if (abort.signal.aborted) return;
    if (sweep) fill(parts.message, problemBox(error));
    else {
      stopPolling();
      fill(root, h("h1", {}, "Sweep"), problemBox(error));
    }
  });
  return () => stops.forEach((stop) => stop());
}

function lastEpoch(rows) {
  return rows && rows.length ? rows[rows.length - 1].epoch : 0;
}

/** The direction that puts the best value first: descending when the metric is maximised. */
function bestFirst(mode) {
  return mode === "max" ? -1 : 1;
}

/** ``trials`` sorted by ``sort``; those without a value last whatever the direction, ties by number. */
function ordered(trials, { key, dir }) {
  const absent = (value) => value === null || value === undefined;
  return [...trials].sort((a, b) => {
    if (absent(a[key]) || absent(b[key])) return absent(a[key]) - absent(b[key]) || a.number - b.number;
    return (a[key] - b[key]) * dir || a.number - b.number;
  });
}

/** A parameter's value in a cell: numbers as the page shows them, strings as they are, the rest as JSON. */
function paramText(value) {
  if (typeof value === "number") return number(value);
  return typeof value === "string" ? value : JSON.stringify(value);
}

/**
 * Each parameter's x axis for its scatter plot, from the sweep's space: a log axis for a log_uniform domain, a
 * category per value for a choice of values that are not all numbers, else a linear axis; ``x(value)`` is
 * where a value goes on it (null: nowhere).
 */
function parameterAxes(space) {
  return Object.entries(space).map(([param, domain]) => {
    const choices = domain.choice;
    if (Array.isArray(choices) && !choices.every((value) => typeof value === "number")) {
      const keys = choices.map((value) => JSON.stringify(value));
      const index = (value) => keys.indexOf(JSON.stringify(value));
      return { path: param, categories: choices.map(paramText), x: (value) => (index(value) < 0 ? null : index(value)) };
    }
    const numeric = (value) => (typeof value === "number" ? value : null);
    return { path: param, log: "log_uniform" in domain, x: numeric };
  });
}

function drawHead(head, sweep, path, message) {
  const act = (request, after) => attempt(message, request, after);
  const ended = FINISHED.has(sweep.status);
  fill(head,
    h("div", {},
      h("h1", { id: "sweep-name" }, sweep.name, " ", badge(sweep.status)),
      h("div", { class: "muted small" }, sweep.id, " · ", h("a", { href: "#/sweeps" }, "all sweeps"))),
    h("div", { class: "toolbar" },
      ended ? h("button", { type: "button", class: "danger", id: "delete-sweep", onclick: () => {
        if (window.confirm(`Delete sweep ${sweep.name}, its trial jobs and their files?`)) {
          act(() => api(path, { method: "DELETE" }), () => { window.location.hash = "#/sweeps"; });
        }
      } }, "Delete")
        : h("button", { type: "button", id: "cancel-sweep", onclick: () => act(
          () => api(`${path}/cancel`, { method: "POST" }), () => {}) }, "Cancel")));
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
}

function drawStatus(card, sweep) {
  const { scheduler } = sweep.request;
  const scheduling = scheduler
    ? `${scheduler.type}: rungs at epochs ${sweep.rungs.join(", ")}, reduction factor ${scheduler.reduction_factor}`
    : "none (every trial runs all its epochs)";
  fill(card, h("h2", {}, "Status"), facts([
    ["Trials", `${sweep.created} of ${sweep.trials} created`],
    ["By state", h("span", { id: "sweep-counts" }, STATES.filter((state) => sweep.counts[state]).map((state) =>
      h("span", { class: "count-chip", "data-state": state }, badge(state), ` ${sweep.counts[state]}`)))],
    ["Method", `${sweep.method}, parallelism ${sweep.parallelism}`],
    ["Metric", `${sweep.metric} (${sweep.mode === "max" ? "higher" : "lower"} is better)`],
    ["Scheduler", scheduling],
    ["Created", age(sweep.created_at)],
    ["Finished", time(sweep.finished_at)],
  ]), sweep.error ? h("div", { class: "error-box" }, h("strong", {}, "Error"), h("pre", {}, sweep.error)) : null);
}

function drawBest(card, sweep, trials) {
  const best = sweep.best;
  if (!best) {
    fill(card, h("h2", {}, "Best trial"), h("p", { class: "muted" }, "No trial has reached a value yet."));
    return;
  }
  const trial = trials.find((item) => item.job_id === best.job_id);
  const top = ordered(trials.filter((item) => item.value !== null), { key: "value", dir: bestFirst(sweep.mode) })
    .slice(0, COMPARE_BEST).map((item) => encodeURIComponent(item.job_id));
  fill(card, h("h2", {}, "Best trial"),
    h("p", { class: "lead" }, `${best.metric} `, h("strong", { id: "best-value" }, number(best.value))),
    facts([
      ["Trial", trial ? String(trial.number) : "–"],
      ["Job", h("a", { id: "best-job", href: `#/jobs/${encodeURIComponent(best.job_id)}` }, best.job_id)],
      ...Object.entries(best.params).map(([param, value]) => [h("code", {}, param), paramText(value)]),
    ]),
    top.length > 1 ? h("p", {}, h("a", { class: "button", id: "compare-best", href: `#/compare?ids=${top.join(",")}` },
      `Compare the best ${top.length}`)) : null);
}

/** The trials table, in the order given; ``onSort(key)`` hears a click on a sortable column's head. */
function drawTrials(card, sweep, trials, sort, onSort) {
  const paths = [...new Set(trials.flatMap((trial) => Object.keys(trial.params)))];
  const colour = new Map([...trials].sort((a, b) => a.number - b.number).map((trial, i) => [trial.number, i]));
  const sortable = (title, key, numeric = true) => {
    const current = sort.key === key;
    return h("th", { class: numeric ? "num" : null, "aria-sort": current ? (sort.dir > 0 ? "ascending" : "descending") : null },
      h("button", { type: "button", class: "link sort", "data-sort": key, onclick: () => onSort(key) },
        title, current ? (sort.dir > 0 ? " ▲" : " ▼") : ""));
  };
  const head = h("thead", {}, h("tr", {},
    h("th", {}), sortable("#", "number", false), h("th", {}, "Job"), h("th", {}, "State"), h("th", {}, "Epochs"),
    h("th", { class: "num" }, "Rung"), sortable(sweep.metric, "value"),
    paths.map((param) => h("th", { class: "param" }, param))));
  const row = (trial) => h("tr", { "data-trial": trial.number, "data-job-id": trial.job_id, "data-state": trial.state },
    h("td", {}, swatch(colour.get(trial.number))),
    h("td", { class: "trial-number" }, String(trial.number)),
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(trial.job_id)}` }, trial.job_id)),
    h("td", {}, badge(trial.state),
      trial.pending_reason ? h("div", { class: "muted small pending-reason" }, trial.pending_reason) : null),
    h("td", {}, progressBar(trial.epoch, trial.epochs)),
    h("td", { class: "num", title: trial.rung === null ? null : `epoch ${sweep.rungs[trial.rung]}` },
      trial.rung === null ? "–" : String(trial.rung)),
    h("td", { class: "num value" }, number(trial.value)),
    paths.map((param) => h("td", { class: "param" }, param in trial.params ? paramText(trial.params[param]) : "–")));
  const body = h("tbody", {}, trials.length ? trials.map(row)
    : h("tr", {}, h("td", { colspan: 7 + paths.length, class: "empty" }, "No trial created yet.")));
  fill(card, h("h2", {}, "Trials"), h("div", { class: "table-scroll" }, h("table", { class: "compact", id: "trials",
    "data-sort": sort.key, "data-dir": sort.dir > 0 ? "ascending" : "descending" }, head, body)));
}
