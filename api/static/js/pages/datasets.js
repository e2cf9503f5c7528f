// Datasets: upload a CSV or NPZ file (with its progress), list them a page at a time, see a CSV's columns,
// delete one.
import { api, upload } from "../api.js";
import { age, bytes, fill, h, number, problemBox, thead } from "../dom.js";

const PAGE_SIZE = 50;

export function render(root) {
  const body = h("tbody");
  const more = h("div", { class: "pager" });
  const message = h("div");
  let alive = true;

  async function load(cursor = null) {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`/datasets?${query}`);
      if (!alive) return;
      if (!cursor) body.replaceChildren();
      page.datasets.forEach((dataset) => body.append(...row(dataset)));
      if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No datasets yet.")));
      fill(more, page.next_cursor ? h("button", { type: "button", onclick: () => load(page.next_cursor) }, "More") : null);
    } catch (error) {
      fill(message, problemBox(error));
    }
  }

  function row(dataset) {
    const columns = h("tr", { class: "columns-row", hidden: true }, h("td", { colspan: 9 }));
    const main = h("tr", { "data-dataset-id": dataset.id },
      h("td", { class: "name" }, dataset.name, h("div", { class: "muted small" }, dataset.id)),
      h("td", {}, dataset.format.toUpperCase()), h("td", { class: "num" }, number(dataset.n_rows)),
      h("td", { class: "num" }, number(dataset.n_features)), h("td", {}, dataset.target || "–"),
      h("td", { class: "num" }, dataset.n_classes ?? "–"), h("td", { class: "num" }, bytes(dataset.size)),
      h("td", {}, age(dataset.created_at)),
      h("td", { class: "actions" },
        dataset.n_columns ? h("button", { type: "button", class: "link", onclick: () => showColumns(dataset, columns) },
          `${dataset.n_columns} columns`) : null,
        h("button", { type: "button", class: "danger", onclick: async () => {
          if (!window.confirm(`Delete dataset ${dataset.name}?`)) return;
          try {
            await api(`/datasets/${encodeURIComponent(dataset.id)}`, { method: "DELETE" });
            fill(message);
            load();
          } catch (error) {
            fill(message, problemBox(error));
          }
        } }, "Delete")));
    return [main, columns];
  }

  async function showColumns(dataset, columns) {
    columns.hidden = !columns.hidden;
    if (columns.hidden || columns.dataset.loaded) return;
    const full = await api(`/datasets/${encodeURIComponent(dataset.id)}`);
    columns.dataset.loaded = "1";
    fill(columns.firstChild, (full.columns || []).map((name) => h("span", { class: "tag" }, name)));
  }

  fill(root, h("div", { class: "page-head" }, h("h1", {}, "Datasets")),
    uploadForm(() => load()), message,
    h("table", { class: "datasets" },
      thead(["Name", "Format", "Rows", "Features", "Target", "Classes", "Size", "Uploaded", ""],
        ["Rows", "Features", "Classes", "Size"]),
      body),
    more);
  load();
  return () => { alive = false; };
}

function uploadForm(onUploaded) {
  const file = h("input", { type: "file", id: "dataset-file", accept: ".csv,.npz", required: true });
  const name = h("input", { type: "text", id: "dataset-name", placeholder: "name (default: file name)" });
  const target = h("input", { type: "text", id: "dataset-target", placeholder: "target column (CSV)" });
  const bar = h("span", { class: "bar-fill" });
  const progress = h("span", { class: "progress upload-progress", hidden: true }, h("span", { class: "bar" }, bar),
    h("span", { class: "count" }));
  const status = h("div", { id: "upload-status", "aria-live": "polite" });
  const form = h("form", { class: "card toolbar upload", id: "upload-form" }, file, name, target,
    h("button", { type: "submit", class: "primary" }, "Upload"), progress, status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData();
    data.append("file", file.files[0]);
    if (name.value.trim()) data.append("name", name.value.trim());
    if (target.value.trim()) data.append("target", target.value.trim());
    progress.hidden = false;
    fill(status);
    let sent = false;
    const shown = (fraction) => {
      bar.style.width = `${(fraction * 100).toFixed(1)}%`;
      progress.lastChild.textContent = `${Math.round(fraction * 100)}%`;
      if (fraction < 1 || sent) return;
      sent = true; // every byte is there: the server reads the file before it answers
      fill(status, h("span", { class: "muted" }, "Sent; checking the file…"));
    };
    shown(0);
    try {
      const dataset = await upload("/datasets", data, shown);
      fill(status, h("span", { class: "ok" }, `Stored ${dataset.name} (${dataset.id}).`));
      form.reset();
      onUploaded();
    } catch (error) {
      fill(status, problemBox(error));
    }
  });
  return form;
}
