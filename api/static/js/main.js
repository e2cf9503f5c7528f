// The dashboard's shell: sign-in with an API key, the header, and the views that follow the URL's hash
// (#/jobs, #/jobs/<id>, #/compare?ids=a,b or ?tag=t, #/sweeps, #/sweeps/<id>, #/workers, #/datasets).
import { api, ApiError, key } from "./api.js";
import { fill, h, problemBox } from "./dom.js";
import * as compare from "./pages/compare.js";
import * as datasets from "./pages/datasets.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as sweep from "./pages/sweep.js";
import * as sweeps from "./pages/sweeps.js";
import * as workers from "./pages/workers.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
let cleanup = () => {};
let me = null;

/** The view of a hash: its page module, path parameters and query. */
function route(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query);
  if (parts[0] === "jobs" && parts[1]) return { name: "jobs", page: job, args: { id: parts[1] }, params };
  if (parts[0] === "sweeps" && parts[1]) return { name: "sweeps", page: sweep, args: { id: parts[1] }, params };
  const pages = { jobs, compare, sweeps, workers, datasets };
  return { name: parts[0] in pages ? parts[0] : "jobs", page: pages[parts[0]] || jobs, args: {}, params };
}

function show() {
  cleanup();
  cleanup = () => {};
  if (!me) return signIn();
  const view = route(window.location.hash);
  for (const link of nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === view.name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const root = h("section", { class: "page", "data-page": view.name });
  fill(main, root);
  cleanup = view.page.render(root, view.args, view.params, { me }) || (() => {});
}

function signedIn(user) {
  me = user;
  nav.hidden = false;
  who.hidden = false;
  document.getElementById("who-name").textContent = user.name;
  const role = document.getElementById("who-role");
  role.textContent = user.role;
  role.className = `badge role-${user.role}`;
  show();
}

function signOut(message) {
  key.clear();
  me = null;
  nav.hidden = true;
  who.hidden = true;
  cleanup();
  cleanup = () => {};
  signIn(message);
}

function signIn(message) {
  const input = h("input", { type: "password", name: "api-key", id: "api-key", autocomplete: "off",
    placeholder: "ty_…", required: true, spellcheck: "false" });
  const status = h("div", { class: "sign-in-status" }, message ? problemBox({ message }) : null);
  const form = h("form", { class: "card sign-in", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API key (", h("code", {}, "torchyard token create"),
      ", or the one ", h("code", {}, "torchyard serve"), " prints). It stays in this tab only."),
    h("label", { for: "api-key" }, "API key"), input,
    h("button", { type: "submit", class: "primary" }, "Sign in"), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    key.set(input.value.trim());
    try {
      signedIn(await api("/me"));
    } catch (error) {
      key.clear();
      fill(status, problemBox(error instanceof ApiError && error.status === 401
        ? { message: "That key is not valid (unknown, revoked or expired)." } : error));
    }
  });
  fill(main, form);
  input.focus();
}

window.addEventListener("hashchange", show);
window.addEventListener("torchyard:unauthorized", () => {
  if (me) signOut("The API key was refused (revoked or expired?): sign in again.");
});
document.getElementById("sign-out").addEventListener("click", () => signOut());

async function start() {
  if (!key.get()) return signIn();
  try {
    signedIn(await api("/me"));
  } catch (error) {
    signOut(error instanceof ApiError && error.status === 401 ? undefined : error.message);
  }
}

start();
