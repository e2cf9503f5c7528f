// Jobs: the caller's jobs a page at a time (the API's cursors), filtered by status, tag and experiment, refreshed every
// few seconds; cancel, delete, compare the ones ticked; submit a spec pasted or read from a file.
import { api } from "../api.js";
import { age, attempt, badge, drawPager, every, fill, FINISHED, h, number, problemBox, progressBar, tagChips, thead } from "../dom.js";
import { submitForm } from "../submit.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 4000; // 15 reads a minute: far inside the read budget (rate_limit_read)
const STATUSES = ["", "queued", "running", "succeeded", "failed", "cancelled"];

export function render(root, _args, params) {
  const filters = { status: params.get("status") || "", tag: params.get("tag") || "",
    experiment: params.get("experiment") || "" };
  const cursors = [null]; // the cursor of each page shown so far; the last is the current page's
  const selected = new Set();
  const body = h("tbody");
  const pager = h("div", { class: "pager" });
  const message = h("div");
  const compareButton = h("button", { type: "button", disabled: true, onclick: () => {
    window.location.hash = `#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");

  const setFilter = (name, value) => {
    filters[name] = value;
    const query = new URLSearchParams(Object.entries(filters).filter(([, v]) => v)).toString();
    window.history.replaceState(null, "", `#/jobs${query ? `?${query}` : ""}`);
    cursors.splice(0, cursors.length, null);
    load();
  };
  const statusSelect = h("select", { id: "status-filter", onchange: (e) => setFilter("status", e.target.value) },
    STATUSES.map((status) => h("option", { value: status, selected: status === filters.status }, status || "any status")));
  const tagInput = h("input", { id: "tag-filter", type: "search", placeholder: "tag", value: filters.tag,
    list: "known-tags", onchange: (e) => setFilter("tag", e.target.value.trim()) });
  const knownTags = h("datalist", { id: "known-tags" });
  api("/tags").then(({ tags }) => fill(knownTags, tags.map(({ tag }) => h("option", { value: tag }))))
    .catch(() => {}); // suggestions only
  const experimentInput = h("input", { id: "experiment-filter", type: "search", placeholder: "experiment",
    value: filters.experiment, onchange: (e) => setFilter("experiment", e.target.value.trim()) });

  async function load() {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    if (filters.status) query.set("status", filters.status);
    if (filters.tag) query.set("tag", filters.tag);
    if (filters.experiment) query.set("experiment", filters.experiment);
    const cursor = cursors[cursors.length - 1];
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/jobs?${query}`);
      fill(message);
      drawRows(page.jobs);
      drawPager(pager, cursors, page.next_cursor, load);
    } catch (error) {
      fill(message, problemBox(error));
    }
  }

  let shown = "";
  function drawRows(list) {
    // Redrawn only when something changed (ages move by the minute): a row isn't replaced under the pointer.
    const filtered = Object.values(filters).some(Boolean);
    const signature = JSON.stringify([list, filtered, Math.floor(Date.now() / 60000)]);
    if (signature === shown) return;
    shown = signature;
    root.dataset.jobs = String(list.length);
    if (!list.length) {
      fill(body, h("tr", {}, h("td", { colspan: 9, class: "empty" },
        filtered ? "No jobs match these filters." : "No jobs here yet. Submit one above.")));
      return;
    }
    fill(body, list.map(row));
    compareButton.disabled = selected.size < 2;
  }

  function row(job) {
    const tick = h("input", { type: "checkbox", "aria-label": "select", checked: selected.has(job.id), onchange: (e) => {
      if (e.target.checked) selected.add(job.id); else selected.delete(job.id);
      compareButton.disabled = selected.size < 2;
    } });
    const best = job.best ? `${job.best.metric} ${number(job.best.value)} @ ${job.best.epoch}` : "–";
    const actions = h("td", { class: "actions" });
    if (!FINISHED.has(job.status)) {
      actions.append(h("button", { type: "button", class: "cancel", disabled: job.cancel_requested,
        onclick: () => act(() => api(`/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" })) },
      job.cancel_requested ? "Stopping…" : "Cancel"));
    } else {
      actions.append(h("button", { type: "button", class: "delete danger", onclick: () => {
        if (window.confirm(`Delete job ${job.name} and its files?`)) {
          act(() => api(`/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" }));
        }
      } }, "Delete"));
    }
    return h("tr", { "data-job-id": job.id, "data-status": job.status },
      h("td", {}, tick),
      h("td", { class: "name" }, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name),
        h("div", { class: "muted small" }, job.id)),
      h("td", {}, badge(job.status),
        job.pending_reason ? h("div", { class: "muted small pending-reason" }, job.pending_reason) : null),
      h("td", {}, progressBar(job.progress.epoch, job.progress.epochs)),
      h("td", { class: "num" }, best),
      h("td", {}, age(job.created_at)),
      h("td", {}, job.experiment ? h("span", { class: "tag experiment" }, job.experiment) : null, tagChips(job.tags)),
      h("td", { class: "small" }, job.owner),
      actions);
  }

  // Reload after the request, refused or not: the list shows what the server has now.
  const act = (request) => attempt(message, request).then(load);

  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Jobs"),
      h("div", { class: "toolbar" }, statusSelect, tagInput, knownTags, experimentInput, compareButton)),
    submitForm({ what: "job", label: "Job spec (JSON)", path: "/jobs",
      placeholder: '{"name": "circles-mlp", "task": "binary", "data": {…}, "model": {"layers": […]}, …}' }),
    message,
    h("table", { class: "jobs" },
      thead(["", "Name", "Status", "Progress", "Best", "Age", "Tags", "Owner", ""], ["Best"]),
      body),
    pager);
  load();
  return every(REFRESH_MS, load);
}
