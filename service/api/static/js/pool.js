// Nodes (admin), adapters, merges, evaluations and federations: tables refreshed every few
// seconds while shown.

import { get } from "./api.js";
import { bytes, h, mount, num, statusBadge, table, when } from "./dom.js";

const REFRESH_MS = 5000;

/** A view that lists `path` into a table made by `build(items)`, refreshed while shown. */
function refreshing(el, title, path, build, params = { limit: 100 }) {
  const body = h("div", {});
  mount(el, h("h2", {}, title), body);
  let alive = true;
  let timer = null;
  const load = async () => {
    try {
      const page = await get(path, params);
      if (alive) mount(body, build(page.data));
    } catch (err) {
      if (alive) mount(body, h("p", { class: "error" }, err.message));
    }
    if (alive) timer = setTimeout(load, REFRESH_MS);
  };
  load();
  return () => { alive = false; clearTimeout(timer); };
}

function metricsText(metrics) {
  return Object.entries(metrics || {})
    .filter(([, v]) => typeof v === "number")
    .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : num(v)}`).join(", ") || "—";
}

/** Memory of one GPU: used by its owner / promised to lorapool's jobs / free. */
export function memorySplit(n) {
  const total = n.total_memory_bytes || 0;
  const promised = Math.min(n.reserved_memory_bytes || 0, total);
  const owner = Math.max(0, total - (n.free_memory_bytes || 0) - promised);
  const free = Math.max(0, total - owner - promised);
  return { total, owner, promised, free };
}

function memoryBar(n, prefix = "") {
  const m = memorySplit(n);
  const pct = (v) => `${m.total ? (100 * v) / m.total : 0}%`;
  const label = `${prefix}${bytes(m.owner)} used by the owner, ${bytes(m.promised)} promised to jobs, ${bytes(m.free)} free of ${bytes(m.total)}`;
  const bar = h("div", { class: "membar", role: "img", "aria-label": label, title: label },
    h("span", { class: "owner" }), h("span", { class: "promised" }), h("span", { class: "free" }));
  const [o, p, f] = bar.children;
  o.style.width = pct(m.owner); // CSSOM, not a style attribute: allowed by the page's CSP
  p.style.width = pct(m.promised);
  f.style.width = pct(m.free);
  return h("div", {}, bar, h("div", { class: "muted mem-text" }, label));
}

/** A node's memory: one bar, or one per GPU where it has several (a job too big for one card
 * may run split over them). */
export function nodeMemory(n) {
  const gpus = n.gpus || [];
  if (gpus.length < 2) return memoryBar(n);
  return h("div", { class: "gpus" }, ...gpus.map((g) => memoryBar(g, `GPU ${g.index} (${g.name || "?"}): `)));
}

export function renderNodes(el) {
  return refreshing(el, "Nodes", "/v1/nodes", (nodes) => h("div", {},
    h("p", { class: "legend-note" }, "Memory:", h("span", { class: "swatch owner" }), "used by the owner",
      h("span", { class: "swatch promised" }), "promised to jobs", h("span", { class: "swatch free" }), "free"),
    table([["Node"], ["GPU"], ["State"], ["Memory"], ["Speed"], ["Jobs"], ["Last heartbeat"]],
      nodes.map((n) => h("tr", { dataset: { node: n.name } },
        h("td", {}, h("strong", {}, n.name), h("div", { class: "id muted" }, n.id)),
        h("td", {}, n.gpu_name || "—", n.compute_capability ? ` (cc ${n.compute_capability})` : "", n.bf16 ? ", bf16" : ""),
        h("td", {}, statusBadge(n.state)),
        h("td", {}, nodeMemory(n)),
        h("td", {}, speed(n)),
        h("td", {}, n.jobs.length ? n.jobs.map((j) => h("div", {}, h("a", { class: "id", href: `#/jobs/${j}` }, j))) : "—"),
        h("td", {}, n.last_heartbeat ? new Date(n.last_heartbeat * 1000).toLocaleTimeString() : "—"))))));
}

function speed(n) {
  // Measured by the node's agent (a short matmul at join, refreshed while idle), in TFLOP/s.
  const v = n.speed;
  if (typeof v === "number") return `${num(v, 1)} TFLOP/s`;
  return v ? String(v) : "—";
}

export function renderAdapters(el) {
  return refreshing(el, "Adapters", "/v1/adapters", (items) => table(
    [["Adapter"], ["Name"], ["Base model"], ["Job"], ["Owner"], ["Shared with"], ["Size", "num"], ["Metrics"], ["Created"]],
    items.map((a) => h("tr", {},
      h("td", {}, h("code", {}, a.id)),
      h("td", {}, a.name || "—"),
      h("td", {}, a.base_model),
      h("td", {}, a.job_id ? h("a", { class: "id", href: `#/jobs/${a.job_id}` }, a.job_id) : "—"),
      h("td", {}, a.owner || "—"),
      h("td", {}, a.shared_with?.length ? a.shared_with.join(", ") : "—"),
      h("td", { class: "num" }, bytes(a.bytes)),
      h("td", {}, metricsText(a.metrics)),
      h("td", {}, when(a.created_at))))), { limit: 100, include_shared: true });
}

export function renderMerges(el) {
  return refreshing(el, "Merges", "/v1/merges", (items) => table(
    [["Merge"], ["Status"], ["Method"], ["Adapters"], ["Weights"], ["Result"], ["Rank", "num"], ["Rel. error", "num"], ["Evaluation"], ["Created"]],
    items.map((m) => h("tr", {},
      h("td", {}, h("code", {}, m.id), m.name ? h("div", {}, m.name) : null),
      h("td", {}, statusBadge(m.status), m.error ? h("div", { class: "error" }, m.error.message) : null),
      h("td", {}, m.method),
      h("td", {}, m.adapters.map((a) => h("div", { class: "id" }, a))),
      h("td", {}, (m.applied_weights || m.weights || []).map((w) => num(w, 3)).join(", ") || "—"),
      h("td", {}, m.result_adapter ? h("code", {}, m.result_adapter) : "—"),
      h("td", { class: "num" }, m.rank ?? "—"),
      h("td", { class: "num" }, num(m.relative_error)),
      h("td", {}, m.evaluation_id ? h("code", {}, m.evaluation_id) : "—"),
      h("td", {}, when(m.created_at))))));
}

export function renderEvaluations(el) {
  return refreshing(el, "Evaluations", "/v1/evaluations", (items) => table(
    [["Evaluation"], ["Status"], ["Model"], ["Adapter"], ["File"], ["Loss", "num"], ["Perplexity", "num"], ["Tokens", "num"], ["Examples", "num"], ["Created"]],
    items.map((e) => h("tr", {},
      h("td", {}, h("code", {}, e.id)),
      h("td", {}, statusBadge(e.status), e.error ? h("div", { class: "error" }, e.error.message) : null),
      h("td", {}, e.model),
      h("td", {}, e.adapter ? h("code", {}, e.adapter) : "base"),
      h("td", {}, h("code", {}, e.file)),
      h("td", { class: "num" }, num(e.loss)),
      h("td", { class: "num" }, num(e.perplexity, 2)),
      h("td", { class: "num" }, e.tokens ?? "—"),
      h("td", { class: "num" }, e.examples ?? "—"),
      h("td", {}, when(e.created_at))))));
}

export function renderFederations(el) {
  return refreshing(el, "Federations", "/v1/federations", (items) => items.length
    ? h("div", {}, items.map((f) => h("section", { class: "card" },
      h("h3", {}, h("code", {}, f.id), " ", statusBadge(f.status)),
      h("p", {}, `${f.model} · ${f.method} · round ${f.current_round} of ${f.rounds_total} · quorum ${f.min_quorum} · participants: ${f.participants.map((p) => p.name).join(", ")}`),
      f.error ? h("p", { class: "error" }, f.error.message) : null,
      table([["Round", "num"], ["Status"], ["Took part"], ["Dropped"], ["Global adapter"], ["Metrics"]],
        f.rounds.map((r) => h("tr", {},
          h("td", { class: "num" }, r.round),
          h("td", {}, statusBadge(r.status)),
          h("td", {}, r.took_part.join(", ") || "—"),
          h("td", {}, Object.entries(r.dropped).map(([p, why]) => `${p}: ${why}`).join("; ") || "—"),
          h("td", {}, r.global_adapter ? h("code", {}, r.global_adapter) : "—"),
          h("td", {}, metricsText(r.metrics)))))))) 
    : h("p", { class: "muted" }, "No federations yet."));
}
