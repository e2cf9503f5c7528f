// One job: its curves (a downsampled history, then each new epoch from the metrics stream), status and
// reasons, network table, spec, downloads and log.
import { api, ApiError, download, events } from "../api.js";
import { jobCurves } from "../charts.js";
import {
  age, attempt, badge, bytes, every, fill, FINISHED, h, number, problemBox, progressBar, tagChips, thead, time,
} from "../dom.js";

const MAX_POINTS = 1000; // per curve; the server picks them evenly (first and last kept)
const POLL_MS = 3000;
const RETRY_MS = 5000; // before a stream refused (a quota of streams) or broken is tried again
// A new epoch reads the checkpoint list again after this long (at most one read per this long): the epoch's
// checkpoint is written just after its metrics, which is what tells the page of the epoch.
const CHECKPOINTS_MS = 3000;

export function render(root, { id }) {
  const path = `/jobs/${encodeURIComponent(id)}`;
  const abort = new AbortController();
  const stops = [() => abort.abort()];
  // What starts after the page was left (an await later) is stopped at once.
  const keep = (stop) => (abort.signal.aborted ? stop() : stops.push(stop));
  const parts = {
    head: h("div", { class: "page-head" }),
    status: h("div", { class: "card status-card" }),
    curves: h("div", { class: "charts", id: "curves", "data-points": 0 }),
    network: h("div", { class: "card" }, h("h2", {}, "Network")),
    downloads: h("div", { class: "card", id: "downloads" }, h("h2", {}, "Downloads")),
    spec: h("div", { class: "card" }, h("h2", {}, "Spec")),
    log: h("div", { class: "card", id: "log" }, h("h2", {}, "Log")),
    message: h("div"),
  };
  fill(root, parts.head, parts.message,
    h("div", { class: "job-grid" },
      h("div", { class: "main-column" }, h("div", { class: "card" }, h("h2", {}, "Curves"), parts.curves), parts.log),
      h("div", { class: "side-column" }, parts.status, parts.downloads, parts.network)),
    parts.spec);
  const curves = jobCurves(parts.curves);
  keep(() => curves.destroy());
  const downloads = downloadsCard(parts.downloads, path);
  keep(() => downloads.stop());
  let job = null;

  const show = (next) => {
    job = next;
    root.dataset.status = job.status;
    drawHead(parts.head, job, path, parts.message);
    drawStatus(parts.status, job);
    downloads.show(job);
  };

  async function start() {
    try {
      show(await api(path, { signal: abort.signal }));
    } catch (error) {
      if (!abort.signal.aborted) fill(root, h("h1", {}, "Job"), problemBox(error));
      return;
    }
    fill(parts.spec, h("h2", {}, "Spec"), h("pre", { class: "spec" }, JSON.stringify(job.spec, null, 2)));
    drawNetwork(parts.network, path);
    const log = followLog(parts.log, path);
    keep(log.stop);
    const history = await api(`${path}/metrics?max_points=${MAX_POINTS}`, { signal: abort.signal });
    curves.reset(history.metrics);
    if (FINISHED.has(job.status) || abort.signal.aborted) return;
    // The job document (attempts, reasons, progress) is polled; the curves follow the stream.
    const stopPolling = every(POLL_MS, async () => {
      show(await api(path, { signal: abort.signal }));
      if (FINISHED.has(job.status)) stopPolling();
    });
    keep(stopPolling);
    follow(path, curves, abort.signal, {
      onEpoch: () => downloads.epoch(),
      onFinished: (finished) => {
        show(finished);
        log.now(); // its last line says how it ended
      },
    });
  }

  start().catch((error) => { if (!abort.signal.aborted) fill(parts.message, problemBox(error)); });
  return () => stops.forEach((stop) => stop());
}

/**
 * Follow the metrics stream from the last epoch drawn until the job's status event (``onFinished`` with the
 * job); resume after breaks. ``onEpoch`` hears of each new epoch.
 */
async function follow(path, curves, signal, { onEpoch, onFinished }) {
  const add = (row) => {
    const before = curves.lastEpoch;
    curves.add(row);
    if (curves.lastEpoch > before) onEpoch();
  };
  let since = curves.lastEpoch;
  let first = true;
  while (!signal.aborted) {
    try {
      const url = first ? `${path}/metrics?since_epoch=${since}` : `${path}/metrics`;
      const options = first ? { signal } : { signal, lastEventId: since };
      for await (const event of events(url, options)) {
        if (event.event === "metrics") add(event.data);
        else if (event.event === "status") return onFinished(event.data);
        since = curves.lastEpoch;
      }
      first = false; // the server ended the stream (its time limit): resume from the last epoch
      await sleep(1000, signal);
    } catch (error) {
      if (signal.aborted) return;
      // Refused (429: the user's streams are all in use) or cut: catch up by polling, then try again.
      try {
        const rows = await api(`${path}/metrics?since_epoch=${curves.lastEpoch}`, { signal });
        rows.metrics.forEach(add);
        // A page at a time: the job is done with once its last page is read (next_since_epoch null).
        if (FINISHED.has(rows.status) && rows.next_since_epoch === null) return onFinished(await api(path, { signal }));
      } catch { /* the next turn tries again */ }
      since = curves.lastEpoch;
      first = true;
      await sleep(error instanceof ApiError && error.status === 429 ? RETRY_MS : 1000, signal);
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function drawHead(head, job, path, message) {
  const act = (request, after) => attempt(message, request, after);
  const actions = h("div", { class: "toolbar" },
    h("a", { class: "button", href: `#/compare?ids=${encodeURIComponent(job.id)}` }, "Compare…"),
    FINISHED.has(job.status) ? null : h("button", { type: "button", id: "cancel-job", disabled: job.cancel_requested,
      onclick: () => act(() => api(`${path}/cancel`, { method: "POST" }), () => {}) },
    job.cancel_requested ? "Stopping…" : "Cancel"),
    FINISHED.has(job.status) ? h("button", { type: "button", class: "danger", id: "delete-job", onclick: () => {
      if (window.confirm(`Delete job ${job.name} and its files?`)) {
        act(() => api(path, { method: "DELETE" }), () => { window.location.hash = "#/jobs"; });
      }
    } }, "Delete") : null);
  fill(head, h("div", {},
    h("h1", { id: "job-name" }, job.name, " ", badge(job.status)),
    h("div", { class: "muted small" }, job.id, " · ", job.owner, " · queue ", job.queue, " ",
      job.experiment ? h("span", { class: "tag experiment" }, job.experiment) : null, tagChips(job.tags))),
  actions);
}

function drawStatus(card, job) {
  const rows = [
    ["Progress", progressBar(job.progress.epoch, job.progress.epochs)],
    ["Best", job.best ? `${job.best.metric} ${number(job.best.value)} at epoch ${job.best.epoch}` : "–"],
    ["Attempts", `${job.attempts} of ${job.max_attempts}`],
    ["Worker", job.worker_id || "–"],
    ["Device", job.device || "–"],
    ["Created", age(job.created_at)],
    ["Started", time(job.started_at)],
    ["Finished", time(job.finished_at)],
  ];
  if (job.stop_reason) rows.push(["Stop reason", job.stop_reason]);
  if (job.pending_reason) rows.push(["Pending", job.pending_reason]);
  if (job.cancel_requested && !FINISHED.has(job.status)) rows.push(["Cancel", "asked; stops at its next batch"]);
  const facts = (pairs) => h("dl", { class: "facts" }, pairs.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
  const final = Object.entries(job.final_metrics || {}).filter(([name]) => name !== "epoch");
  fill(card, h("h2", {}, "Status"), facts(rows),
    final.length ? [h("h3", {}, `Final metrics (epoch ${job.final_metrics.epoch ?? job.progress.epoch})`),
      facts(final.map(([name, value]) => [name, number(value)]))] : null,
    job.error ? h("div", { class: "error-box" }, h("strong", {}, "Error"), h("pre", { id: "job-error" }, job.error)) : null);
}

/**
 * The Downloads card: the weights (once the job succeeded) and its checkpoints. ``show(job)`` redraws it when
 * the status changed (the files change with it); ``epoch()`` reads the checkpoint list again soon.
 */
function downloadsCard(card, path) {
  const note = h("div", { class: "small muted", id: "download-note" });
  const list = h("ul", { class: "plain", id: "checkpoints" });
  let drawnFor = null;
  let timer = null;
  let reads = 0;
  const save = (what, name) => async () => {
    fill(note, `Downloading ${name}…`);
    try {
      const size = await download(what, name);
      card.dataset.downloadedBytes = String(size);
      fill(note, `Saved ${name} (${bytes(size)}).`);
    } catch (error) {
      fill(note, problemBox(error));
    }
  };
  const readCheckpoints = async () => {
    const read = ++reads;
    try {
      const { checkpoints } = await api(`${path}/checkpoints`);
      if (read !== reads) return; // a later read answers for the list
      fill(list, checkpoints.length ? checkpoints.map((checkpoint) => h("li", {},
        h("button", { type: "button", class: "link", onclick: save(checkpoint.download.replace(/^\/api\/v1/, ""),
          checkpoint.name) }, `epoch ${checkpoint.epoch}`), ` ${bytes(checkpoint.size)}`))
        : h("li", { class: "muted small" }, "none kept"));
    } catch (error) {
      if (read === reads) fill(list, h("li", {}, problemBox(error)));
    }
  };
  return {
    show(job) {
      if (drawnFor === job.status) return;
      drawnFor = job.status;
      const done = job.status === "succeeded";
      fill(card, h("h2", {}, "Downloads"),
        h("div", { class: "toolbar" },
          h("button", { type: "button", id: "download-weights", disabled: !done,
            onclick: save(`${path}/weights`, `${job.id}.safetensors`) }, "Weights (.safetensors)"),
          h("button", { type: "button", id: "download-bundle", disabled: !done,
            onclick: save(`${path}/weights?format=bundle`, `${job.id}.tar.gz`) }, "Bundle (.tar.gz)")),
        done ? null : h("p", { class: "small muted" }, "Weights are stored when the job succeeds."),
        h("h3", {}, "Checkpoints"), list, note);
      readCheckpoints();
    },
    epoch() {
      if (!timer) timer = setTimeout(() => { timer = null; readCheckpoints(); }, CHECKPOINTS_MS);
    },
    stop() {
      clearTimeout(timer);
    },
  };
}

async function drawNetwork(card, path) {
  try {
    const network = await api(`${path}/network`);
    fill(card, h("h2", {}, "Network"),
      h("p", { class: "small muted" }, `input ${JSON.stringify(network.input_shape)} · ${number(network.total_parameters)} `
        + "parameters"),
      h("table", { class: "compact", id: "network" },
        thead(["#", "Layer", "Output", "Parameters"], ["Parameters"]),
        h("tbody", {}, network.layers.map((layer) => h("tr", {},
          h("td", {}, layer.index), h("td", {}, layer.type), h("td", {}, JSON.stringify(layer.output_shape)),
          h("td", { class: "num" }, number(layer.parameters)))))));
  } catch (error) {
    fill(card, h("h2", {}, "Network"), problemBox(error));
  }
}

/**
 * The job's log (GET /jobs/{id}/logs), read on from its last line while the job runs; ``now()`` reads it at
 * once, ``stop()`` for good.
 */
function followLog(card, path) {
  const lines = h("div", { class: "log-lines", id: "log-lines" });
  const note = h("span", { class: "small muted" });
  const save = h("button", { type: "button", class: "link", onclick: () => download(`${path}/logs?format=text`, "job.log")
    .catch((error) => fill(note, error.message)) }, "Download (.log)");
  fill(card, h("div", { class: "card-head" }, h("h2", {}, "Log"), h("span", {}, note, " ", save)), lines);
  let next = 0;
  let stopped = false;
  let stop = () => {};
  const read = async () => {
    if (stopped) return;
    try {
      const page = await api(`${path}/logs?since_seq=${next}`);
      if (next === 0 && !page.lines.length) fill(lines, h("div", { class: "muted" }, "Nothing logged yet."));
      else if (next === 0) lines.replaceChildren();
      for (const line of page.lines) lines.append(logLine(line));
      next = page.last_seq ?? page.next_seq; // last_seq is the field's newer name
      if (FINISHED.has(page.status)) stop(); // read after the job: a finished job's lines were all there
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        fill(lines, h("div", { class: "muted", id: "no-log" }, "No log for this job."));
        save.hidden = true;
        stop();
      } else throw error;
    }
  };
  // One read at a time: two at once would both add the lines after the same seq.
  let turn = Promise.resolve();
  const readInTurn = () => (turn = turn.catch(() => {}).then(read));
  stop = every(POLL_MS, readInTurn);
  readInTurn().catch(() => {});
  return {
    now: () => readInTurn().catch(() => {}),
    stop: () => {
      stopped = true;
      stop();
    },
  };
}

function logLine(line) {
  return h("div", { class: `log-line level-${String(line.level).toLowerCase()}` },
    h("span", { class: "log-time", title: time(line.time) }, clock(line.time)),
    h("span", { class: "log-attempt" }, `#${line.attempt}`),
    h("span", { class: "log-level" }, line.level), h("span", { class: "log-text" }, line.text));
}

/** The local time of day as HH:MM:SS (24-hour: always eight characters, so the column never wraps). */
function clock(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  return [at.getHours(), at.getMinutes(), at.getSeconds()].map((part) => String(part).padStart(2, "0")).join(":");
}
