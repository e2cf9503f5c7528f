// The submit form of the Jobs and Sweeps pages: a JSON document pasted or read from a file, POSTed as typed
// (the API names what is wrong); a refused one's field errors beside the text, an accepted one's page opened.
import { api } from "./api.js";
import { fill, h, problemBox } from "./dom.js";

/**
 * A collapsed card "Submit a <what>" whose form POSTs the text to ``path`` and then opens
 * ``#<path>/<the new id>`` (the job's or the sweep's page).
 */
export function submitForm({ what, label, path, placeholder }) {
  const text = h("textarea", { id: "spec-text", rows: 14, spellcheck: "false", placeholder });
  const file = h("input", { type: "file", id: "spec-file", accept: ".json,application/json", onchange: async (e) => {
    const [chosen] = e.target.files;
    if (chosen) text.value = await chosen.text();
  } });
  const errors = h("div", { id: "spec-errors", class: "spec-errors", "aria-live": "polite" });
  const form = h("form", { class: "submit-form", id: "submit-form" },
    h("div", { class: "spec-input" },
      h("label", { for: "spec-text" }, label), text,
      h("div", { class: "row" }, h("label", { class: "file" }, "or from a file ", file),
        h("button", { type: "submit", class: "primary", id: "submit-spec" }, `Submit ${what}`))),
    errors);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    fill(errors, h("span", { class: "muted" }, "Submitting…"));
    try {
      const made = await api(path, { method: "POST", body: text.value });
      window.location.hash = `#${path}/${encodeURIComponent(made.id)}`;
    } catch (error) {
      fill(errors, problemBox(error));
    }
  });
  return h("details", { class: "card submit", id: "submit" }, h("summary", {}, `Submit a ${what}`), form);
}
