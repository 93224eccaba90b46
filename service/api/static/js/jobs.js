// Jobs: the tenant's list (status, progress, ETA), the admin's all-tenants list, and a job's
// page with live loss curves from its event stream, its events and its checkpoints.

import { download, get, post, stream } from "./api.js";
import { LossChart } from "./chart.js";
import { bytes, duration, h, mount, num, statusBadge, table, toast, when } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const REFRESH_MS = 4000;

/** Seconds left from step metrics events [{created_at, data: {step}}], or null. */
export function etaFromSteps(events, totalSteps) {
  const pts = events
    .filter((e) => e.type === "metrics" && typeof e.data?.step === "number" && typeof e.data?.train_loss === "number")
    .map((e) => [e.created_at, e.data.step])
    .sort((a, b) => a[1] - b[1]);
  if (pts.length < 2 || !totalSteps) return null;
  const [t0, s0] = pts[0];
  const [t1, s1] = pts[pts.length - 1];
  if (s1 <= s0 || t1 <= t0) return null;
  return ((t1 - t0) / (s1 - s0)) * (totalSteps - s1);
}

function etaText(job, stepEta) {
  if (TERMINAL.has(job.status)) return "—";
  if (job.estimated_finish) return `${duration(job.estimated_finish - Date.now() / 1000)} (${when(job.estimated_finish)})`;
  if (stepEta !== null && stepEta !== undefined) return `~${duration(stepEta)}`;
  return job.status === "running" ? "estimating…" : "—";
}

function progress(job) {
  if (!job.total_steps) return h("span", { class: "muted" }, job.status === "succeeded" ? "done" : "—");
  const step = job.step || 0;
  const label = `step ${step} of ${job.total_steps}`;
  return h("span", {}, h("progress", { max: job.total_steps, value: step, "aria-label": label }), " ", `${step}/${job.total_steps}`);
}

async function stepEtas(jobs) {
  // Only running jobs without a server-side estimate, and few of them: one small read each.
  const out = {};
  await Promise.all(jobs.filter((j) => j.status === "running" && !j.estimated_finish).slice(0, 10).map(async (j) => {
    try {
      const ev = await get(`/v1/fine_tuning/jobs/${encodeURIComponent(j.id)}/events`, { limit: 50 });
      out[j.id] = etaFromSteps(ev.data, j.total_steps);
    } catch { /* the ETA is a nicety */ }
  }));
  return out;
}

function jobsTable(jobs, etas, showTenant) {
  const headers = [["Job"], ...(showTenant ? [["Tenant"]] : []), ["Model"], ["Status"], ["Progress"], ["ETA"], ["Node"], ["Created"], ["Adapter"]];
  const rows = jobs.map((j) => h("tr", { dataset: { job: j.id } },
    h("td", {}, h("a", { href: `#/jobs/${j.id}`, class: "id" }, j.id)),
    showTenant ? h("td", {}, j.organization_id) : null,
    h("td", {}, j.model),
    h("td", {}, statusBadge(j.status)),
    h("td", {}, progress(j)),
    h("td", {}, etaText(j, etas[j.id])),
    h("td", {}, j.node_id || "—"),
    h("td", {}, when(j.created_at)),
    h("td", {}, j.fine_tuned_model ? h("code", {}, j.fine_tuned_model) : "—")));
  return table(headers, rows);
}

function listView(el, path, title, showTenant) {
  const body = h("div", {});
  mount(el, h("div", { class: "toolbar" }, h("h2", {}, title),
    h("a", { href: "#/submit" }, "New job")), body);
  let timer = null;
  let alive = true;
  const load = async () => {
    try {
      const page = await get(path, { limit: 100 });
      const etas = await stepEtas(page.data);
      if (alive) mount(body, jobsTable(page.data, etas, showTenant));
    } catch (err) {
      if (alive) mount(body, h("p", { class: "error" }, err.message));
    }
    if (alive) timer = setTimeout(load, REFRESH_MS);
  };
  load();
  return () => { alive = false; clearTimeout(timer); };
}

export const renderJobs = (el) => listView(el, "/v1/fine_tuning/jobs", "Jobs", false);
export const renderAllJobs = (el) => listView(el, "/v1/admin/jobs", "All tenants' jobs", true);

export function renderJob(el, jobId) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const summary = h("div", { class: "card" }, "Loading…");
  const chartEl = h("div", { class: "chart", id: "loss-chart", role: "img", "aria-label": "Training and validation loss by step" });
  const chartNote = h("p", { class: "legend-note", id: "loss-note" }, "Waiting for step events…");
  const eventsBody = h("tbody", {});
  const checkpoints = h("div", {});
  const cancelBtn = h("button", { type: "button", class: "secondary", hidden: true }, "Cancel job");
  mount(el,
    h("div", { class: "toolbar" }, h("h2", {}, "Job ", h("span", { class: "id" }, jobId)), cancelBtn),
    summary,
    h("section", { class: "card", "aria-labelledby": "curve-h" }, h("h3", { id: "curve-h" }, "Loss curves"), chartEl, chartNote),
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "ev-h" }, h("h3", { id: "ev-h" }, "Events"),
        h("div", { class: "events" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Time"), h("th", {}, "Level"), h("th", {}, "Message"))), eventsBody))),
      h("section", { class: "card", "aria-labelledby": "ck-h" }, h("h3", { id: "ck-h" }, "Checkpoints"), checkpoints)));

  const chart = new LossChart(chartEl);
  const events = [];
  const ctl = new AbortController();
  let job = null;
  let timer = null;
  let alive = true;

  const renderSummary = () => {
    if (!job) return;
    cancelBtn.hidden = TERMINAL.has(job.status);
    const hp = job.hyperparameters || {};
    mount(summary, h("dl", { class: "kv" },
      h("dt", {}, "Status"), h("dd", {}, statusBadge(job.status), job.error ? h("span", { class: "error" }, ` — ${job.error.message}`) : null),
      h("dt", {}, "Progress"), h("dd", {}, progress(job)),
      h("dt", {}, "ETA"), h("dd", { id: "eta" }, etaText(job, etaFromSteps(events, job.total_steps))),
      h("dt", {}, "Model"), h("dd", {}, job.model),
      h("dt", {}, "Node"), h("dd", {}, job.node_id || "—"),
      h("dt", {}, "Hyperparameters"), h("dd", {}, `epochs ${hp.n_epochs ?? "auto"}, batch ${hp.batch_size ?? "auto"}, lr multiplier ${hp.learning_rate_multiplier ?? "auto"}, LoRA r ${job.lora?.r ?? "—"}`),
      h("dt", {}, "Memory"), h("dd", {}, `predicted ${bytes(job.memory?.predicted_bytes)}, measured ${bytes(job.memory?.measured_peak_bytes)}`),
      h("dt", {}, "Created"), h("dd", {}, when(job.created_at)),
      h("dt", {}, "Adapter"), h("dd", {}, job.fine_tuned_model ? h("code", {}, job.fine_tuned_model) : "—")));
  };

  const loadJob = async () => {
    try {
      job = await get(base);
      renderSummary();
      if (TERMINAL.has(job.status)) loadCheckpoints();
    } catch (err) {
      mount(summary, h("p", { class: "error" }, err.message));
    }
    if (alive && !(job && TERMINAL.has(job.status))) timer = setTimeout(loadJob, REFRESH_MS);
  };

  const loadCheckpoints = async () => {
    try {
      const page = await get(`${base}/checkpoints`, { limit: 100 });
      mount(checkpoints, table([["Step", "num"], ["Metrics"], ["Created"], [""]],
        page.data.map((c) => h("tr", {},
          h("td", { class: "num" }, c.step_number),
          h("td", {}, Object.entries(c.metrics || {}).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${num(v)}`).join(", ") || "—"),
          h("td", {}, when(c.created_at)),
          h("td", {}, h("button", { type: "button", class: "secondary", onclick: () =>
            download(`${base}/checkpoints/${encodeURIComponent(c.id)}/download`, `${c.id}.tar.gz`).catch((e) => toast(e.message)) }, "Download"))))));
    } catch (err) {
      mount(checkpoints, h("p", { class: "error" }, err.message));
    }
  };

  const onEvent = (ev, name) => {
    if (name === "error") { toast(ev?.error?.message || "stream error"); return; }
    events.push(ev);
    eventsBody.prepend(h("tr", { class: `level-${ev.level}` },
      h("td", {}, new Date(ev.created_at * 1000).toLocaleTimeString()), h("td", {}, ev.level), h("td", {}, ev.message)));
    while (eventsBody.childElementCount > 300) eventsBody.lastElementChild.remove();
    if (ev.type === "metrics" && chart.add(ev.data)) {
      const p = chart.points;
      chartNote.textContent = `${p.train} training point(s), ${p.valid} validation point(s).`;
      if (typeof ev.data.step === "number" && job && (!job.step || ev.data.step > job.step)) {
        job.step = ev.data.step;
        if (ev.data.total_steps) job.total_steps = ev.data.total_steps;
        renderSummary();
      }
    }
    if (/checkpoint/i.test(ev.message)) loadCheckpoints();
  };

  const follow = async () => {
    let retry = 0;
    while (alive) {
      try {
        events.length = 0;
        mount(eventsBody);
        await stream(`${base}/events?stream=true`, onEvent, ctl.signal);
        return; // the server ends the stream once the job finished
      } catch (err) {
        if (!alive || err.name === "AbortError") return;
        if (err.status && err.status < 500 && err.status !== 429) { toast(err.message); return; }
        retry = Math.min(retry + 1, 5);
        await new Promise((r) => setTimeout(r, 1000 * retry));
      }
    }
  };

  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try { job = await post(`${base}/cancel`, {}); renderSummary(); toast("Cancel requested."); }
    catch (err) { toast(err.message); }
    cancelBtn.disabled = false;
  });

  loadJob();
  loadCheckpoints();
  follow();
  return () => { alive = false; clearTimeout(timer); ctl.abort(); chart.destroy(); };
}
