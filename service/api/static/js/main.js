// The dashboard's shell: sign-in, the hash router (#/jobs, #/jobs/ID, …) and the nav.
// Each view renders into #view and returns a cleanup function (timers, open streams).

import { get, token } from "./api.js";
import { h, mount } from "./dom.js";
import { renderAllJobs, renderJob, renderJobs } from "./jobs.js";
import { renderAdapters, renderEvaluations, renderFederations, renderMerges, renderNodes } from "./pool.js";
import { renderSubmit } from "./submit.js";

const ROUTES = [
  [/^#\/jobs\/([\w.-]+)$/, (el, m) => renderJob(el, m[1])],
  [/^#\/jobs$/, renderJobs],
  [/^#\/submit$/, renderSubmit],
  [/^#\/adapters$/, renderAdapters],
  [/^#\/merges$/, renderMerges],
  [/^#\/evaluations$/, renderEvaluations],
  [/^#\/federations$/, renderFederations],
  [/^#\/nodes$/, renderNodes, true],
  [/^#\/all-jobs$/, renderAllJobs, true],
];

let me = null;
let cleanup = null;
const $ = (id) => document.getElementById(id);

async function signIn(t) {
  token.set(t);
  try {
    me = await get("/v1/me");
  } catch (err) {
    token.clear();
    me = null;
    throw err;
  }
}

function showLogin(message) {
  me = null;
  if (cleanup) { cleanup(); cleanup = null; }
  mount($("view"));
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function route() {
  if (!me) return;
  if (cleanup) { cleanup(); cleanup = null; }
  const hash = location.hash || "#/jobs";
  for (const a of document.querySelectorAll("nav a")) {
    const active = hash === a.getAttribute("href") || hash.startsWith(a.getAttribute("href") + "/");
    if (active) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const view = $("view");
  for (const [re, render, adminOnly] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    if (adminOnly && !me.admin) {
      mount(view, h("p", { class: "error" }, "This view needs an admin token."));
      return;
    }
    mount(view);
    cleanup = render(view, m, me) || null;
    return;
  }
  mount(view, h("p", {}, "No such page. ", h("a", { href: "#/jobs" }, "Back to jobs")));
}

function showApp() {
  $("login").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("who-name").textContent = `${me.tenant}${me.admin ? " (admin)" : ""}`;
  for (const el of document.querySelectorAll(".admin-only")) el.hidden = !me.admin;
  route();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  $("token").value = "";
  try {
    await signIn(t);
    showApp();
  } catch (err) {
    showLogin(err.status === 401 ? "That token is not valid on this server." : err.message);
  }
});
$("logout").addEventListener("click", () => { token.clear(); showLogin(); });
window.addEventListener("hashchange", route);
window.addEventListener("lorapool:unauthorized", () => { token.clear(); showLogin("Your token is no longer valid."); });

(async () => {
  const t = token.get();
  if (!t) return showLogin();
  try { await signIn(t); showApp(); } catch (err) { showLogin(err.message); }
})();
