// Workers: what the live workers offer per queue (everyone); each worker's host, devices and jobs (admins:
// the API sends those to admins only).
import { api } from "../api.js";
import { age, every, fill, h, problemBox, thead } from "../dom.js";

const REFRESH_MS = 10000;

export function render(root) {
  const content = h("div", { id: "workers" });
  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Workers")), content);
  const load = async () => {
    try {
      draw(content, await api("/workers"));
    } catch (error) {
      fill(content, problemBox(error));
    }
  };
  load();
  return every(REFRESH_MS, load);
}

function draw(content, list) {
  fill(content,
    h("p", { class: "lead" }, h("strong", { id: "live-workers" }, list.live_workers),
      list.live_workers === 1 ? " live worker" : " live workers"),
    h("div", { class: "card" }, h("h2", {}, "Queues"),
      list.queues.length ? h("table", { class: "compact", id: "queues" },
        thead(["Queue", "Workers", "Slots", "Free slots", "Devices"], ["Workers", "Slots", "Free slots"]),
        h("tbody", {}, list.queues.map((queue) => h("tr", {}, h("td", {}, queue.queue), h("td", { class: "num" }, queue.workers),
          h("td", { class: "num" }, queue.slots), h("td", { class: "num" }, queue.free_slots),
          h("td", {}, queue.devices.map((kind) => h("span", { class: "tag" }, kind)))))))
        : h("p", { class: "muted" }, "No worker is alive: queued jobs wait (start one with torchyard worker).")),
    list.workers ? h("div", { class: "card" }, h("h2", {}, "Each worker (admins)"),
      h("table", { class: "compact", id: "worker-detail" },
        thead(["Worker", "Host", "Queues", "Devices", "Slots", "Running", "Jobs", "Started", "Heartbeat"],
          ["Slots", "Running"]),
        h("tbody", {}, list.workers.map((worker) => h("tr", {},
          h("td", { class: "small" }, worker.id), h("td", {}, worker.hostname), h("td", {}, worker.queues.join(", ")),
          h("td", { class: "small" }, devices(worker.devices)), h("td", { class: "num" }, worker.slots),
          h("td", { class: "num" }, worker.running),
          h("td", { class: "small" }, worker.job_ids.map((id) => h("div", {},
            h("a", { href: `#/jobs/${encodeURIComponent(id)}` }, id)))),
          h("td", {}, age(worker.started_at)), h("td", {}, age(worker.last_heartbeat_at)))))))
      : h("p", { class: "muted small" }, "Hosts and the jobs on them are shown to admins."));
}

function devices(record) {
  if (!record) return "–";
  return Object.entries(record).map(([name, value]) => `${name}: ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
}
