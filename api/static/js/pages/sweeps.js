// Sweeps: the caller's sweeps a page at a time (the API's cursors), refreshed every few seconds: each one's
// status, trials ended of all, best metric; cancel a running one, delete an ended one; submit a request.
import { api } from "../api.js";
import { age, attempt, badge, drawPager, every, fill, FINISHED, h, number, problemBox, progressBar, thead } from "../dom.js";
import { submitForm } from "../submit.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 4000;
// A trial in these states is over: the sweep's progress counts them.
export const ENDED_STATES = ["succeeded", "pruned", "failed", "cancelled"];

export function render(root) {
  const cursors = [null]; // the cursor of each page shown so far; the last is the current page's
  const body = h("tbody");
  const pager = h("div", { class: "pager" });
  const message = h("div");

  async function load() {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    const cursor = cursors[cursors.length - 1];
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/sweeps?${query}`);
      fill(message);
      drawRows(page.sweeps);
      drawPager(pager, cursors, page.next_cursor, load);
    } catch (error) {
      fill(message, problemBox(error));
    }
  }

  let shown = "";
  function drawRows(list) {
    // Redrawn only when something changed (ages move by the minute): a row isn't replaced under the pointer.
    const signature = JSON.stringify([list, Math.floor(Date.now() / 60000)]);
    if (signature === shown) return;
    shown = signature;
    root.dataset.sweeps = String(list.length);
    fill(body, list.length ? list.map(row)
      : h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No sweeps here yet. Submit one above.")));
  }

  function row(sweep) {
    const path = `/sweeps/${encodeURIComponent(sweep.id)}`;
    const ended = ENDED_STATES.reduce((sum, state) => sum + (sweep.counts[state] || 0), 0);
    const actions = h("td", { class: "actions" }, FINISHED.has(sweep.status)
      ? h("button", { type: "button", class: "delete danger", onclick: () => {
        if (window.confirm(`Delete sweep ${sweep.name}, its ${sweep.created} trial jobs and their files?`)) {
          act(() => api(path, { method: "DELETE" }));
        }
      } }, "Delete")
      : h("button", { type: "button", class: "cancel", onclick: () => act(() => api(`${path}/cancel`, { method: "POST" })) },
        "Cancel"));
    return h("tr", { "data-sweep-id": sweep.id, "data-status": sweep.status },
      h("td", { class: "name" }, h("a", { href: `#${path}` }, sweep.name), h("div", { class: "muted small" }, sweep.id)),
      h("td", {}, badge(sweep.status)),
      h("td", {}, progressBar(ended, sweep.trials, "trials ended")),
      h("td", { class: "small" }, `${sweep.method}${sweep.rungs.length ? " · asha" : ""}`),
      h("td", { class: "num" }, sweep.best ? `${sweep.best.metric} ${number(sweep.best.value)}` : "–"),
      h("td", {}, age(sweep.created_at)),
      actions);
  }

  // Reload after the request, refused or not: the list shows what the server has now.
  const act = (request) => attempt(message, request).then(load);

  fill(root,
    h("div", { class: "page-head" }, h("h1", {}, "Sweeps")),
    submitForm({ what: "sweep", label: "Sweep request (JSON)", path: "/sweeps",
      placeholder: '{"name": "lr-search", "base": {…a job spec…}, "space": {"optimizer.lr": {"log_uniform": '
        + '[0.001, 0.1]}}, "method": "random", "trials": 9, "parallelism": 3, "scheduler": {"type": "asha", …}}' }),
    message,
    h("table", { class: "jobs sweeps" },
      thead(["Name", "Status", "Trials ended", "Method", "Best", "Age", ""], ["Best"]),
      body),
    pager);
  load();
  return every(REFRESH_MS, load);
}
