// Building the page: elements from plain values, text always as text (textContent, never innerHTML), so
// that a job named "<img src=x onerror=...>" is shown as those characters and nothing else.

/**
 * An element: ``attrs`` sets attributes (``class``, ``data-*``, ``href``…), ``on*`` functions become
 * listeners, and children are nodes or strings (text nodes); null and false children are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "value") element.value = value;
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replace ``element``'s children. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A table's head row; the titles in ``numeric`` head right-aligned number columns. */
export function thead(titles, numeric = []) {
  return h("thead", {}, h("tr", {}, titles.map((title) => h("th", { class: numeric.includes(title) ? "num" : null },
    title))));
}

export const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

export function badge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

/** A bar filled to ``epoch / epochs``, with the count beside it (``unit`` says what it counts). */
export function progressBar(epoch, epochs, unit = "epochs") {
  const fraction = epochs ? Math.min(epoch / epochs, 1) : 0;
  const fillBar = h("span", { class: "bar-fill" });
  fillBar.style.width = `${(fraction * 100).toFixed(1)}%`; // CSSOM, which the style-src policy allows
  return h("span", { class: "progress", title: `${epoch} of ${epochs} ${unit}` },
    h("span", { class: "bar" }, fillBar), h("span", { class: "count" }, `${epoch}/${epochs}`));
}

export function number(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return value === null || value === undefined ? "–" : String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-3 || size >= 1e6) ? value.toExponential(3) : value.toPrecision(4);
}

export function bytes(count) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit ? `${value.toFixed(1)} ${units[unit]}` : `${value} B`;
}

/** "3 min ago", with the exact time as the element's title. */
export function age(iso) {
  if (!iso) return h("span", {}, "–");
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  const text = seconds < 60 ? "just now"
    : seconds < 3600 ? `${Math.round(seconds / 60)} min ago`
      : seconds < 86400 ? `${Math.round(seconds / 3600)} h ago`
        : `${Math.round(seconds / 86400)} d ago`;
  return h("time", { datetime: iso, title: new Date(iso).toLocaleString() }, text);
}

export function time(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

/** A problem as a message box: its title, detail and each field error (path: message). */
export function problemBox(error) {
  const problem = error.problem || { title: String(error.message || error) };
  const fields = problem.errors || [];
  return h("div", { class: "problem", role: "alert" },
    h("strong", {}, problem.title || "Error"),
    problem.detail && !fields.length ? h("div", {}, problem.detail) : null,
    fields.length ? h("ul", { class: "field-errors" },
      fields.map((item) => h("li", {}, h("code", {}, item.path || "(spec)"), " ", item.message))) : null);
}

/** Run a button's request: clear ``message`` and go on with ``after``, or show the refusal in ``message``. */
export async function attempt(message, request, after = () => {}) {
  try {
    await request();
    fill(message);
    after();
  } catch (error) {
    fill(message, problemBox(error));
  }
}

/** Newer / Older buttons under a list, over the stack of ``cursors`` of the pages shown so far. */
export function drawPager(pager, cursors, next, load) {
  const page = cursors.length;
  fill(pager,
    h("button", { type: "button", disabled: page === 1, onclick: () => { cursors.pop(); load(); } }, "← Newer"),
    h("span", { class: "muted" }, `page ${page}`),
    h("button", { type: "button", disabled: !next, onclick: () => { cursors.push(next); load(); } }, "Older →"));
}

export function tagChips(tags) {
  return (tags || []).map((tag) => h("span", { class: "tag" }, tag));
}

/** A repeating task that stops itself once ``cleanup`` runs; skips its turns while the tab is hidden. */
export function every(ms, task) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await task();
      } catch (error) {
        console.warn(error);
      }
    }
    if (!stopped) timer = setTimeout(run, ms);
  };
  timer = setTimeout(run, ms);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
