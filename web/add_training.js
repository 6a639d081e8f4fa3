// ComfyUI-ADD: the "ADD Training" sidebar panel (background training jobs) and the status text
// shown on the ADD Train / ADD Training Status nodes.
//
// Data: GET /add/jobs (list), GET /add/jobs/{id} (with the loss history), live `add.job` events
// (PromptServer.send_sync), GET /add/jobs/{id}/preview.png, POST /add/jobs/{id}/cancel.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ACTIVE = new Set(["queued", "running", "paused"]);
const STATE_COLOR = {
  queued: "#9aa0a6", running: "#4caf50", paused: "#e0a030", done: "#4a90d9", cancelled: "#9aa0a6", failed: "#e05050",
};
const LINES = [["d_loss", "#e05050", "D"], ["g_loss", "#4a90d9", "G"], ["distill", "#4caf50", "distill"]];

const jobs = new Map(); // id -> job json (with .history)
let root = null; // the panel's element while the tab is open

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(e.style, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function fmtEta(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
}

function fmtLoss(v) {
  return typeof v === "number" ? v.toPrecision(4) : "–";
}

async function loadJob(id) {
  const r = await api.fetchApi(`/add/jobs/${id}`);
  if (r.ok) jobs.set(id, await r.json());
}

async function loadAll() {
  const r = await api.fetchApi("/add/jobs");
  if (!r.ok) return;
  const { jobs: list } = await r.json();
  await Promise.all(list.map((j) => loadJob(j.id)));
  render();
}

function onEvent(job) {
  const prev = jobs.get(job.id);
  const history = prev?.history ? prev.history : [];
  const last = history.length ? history[history.length - 1].step : -1;
  if (job.step > last && job.losses && "g_loss" in job.losses) {
    history.push({ step: job.step, ...job.losses });
  }
  jobs.set(job.id, { ...job, history });
  if (!prev) loadJob(job.id).then(render); // first sight of a job: fetch its full history
  render();
}

function drawPlot(canvas, history) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(255,255,255,0.04)";
  ctx.fillRect(0, 0, w, h);
  if (!history || history.length < 2) {
    ctx.fillStyle = "#888";
    ctx.font = "11px sans-serif";
    ctx.fillText("losses appear after a few steps", 8, h / 2);
    return;
  }
  const vals = history.flatMap((p) => LINES.map(([k]) => p[k]).filter((v) => Number.isFinite(v)));
  let lo = Math.min(...vals), hi = Math.max(...vals);
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const s0 = history[0].step, s1 = history[history.length - 1].step;
  const x = (s) => 4 + ((s - s0) / Math.max(1, s1 - s0)) * (w - 8);
  const y = (v) => h - 14 - ((v - lo) / (hi - lo)) * (h - 20);
  LINES.forEach(([key, color, label], i) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    let started = false;
    for (const p of history) {
      if (!Number.isFinite(p[key])) continue;
      if (!started) { ctx.moveTo(x(p.step), y(p[key])); started = true; } else ctx.lineTo(x(p.step), y(p[key]));
    }
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.font = "10px sans-serif";
    ctx.fillText(label, 6 + i * 48, h - 3);
  });
  ctx.fillStyle = "#aaa";
  ctx.fillText(`${hi.toPrecision(3)}`, w - 44, 10);
  ctx.fillText(`${lo.toPrecision(3)}`, w - 44, h - 16);
}

function jobCard(job) {
  const pct = job.max_steps ? Math.min(100, (100 * job.step) / job.max_steps) : 0;
  const losses = job.losses || {};
  const card = el("div", { "data-testid": `add-job-${job.id}`, "data-job-name": job.name, class: "add-job",
    style: { border: "1px solid var(--border-color, #444)", borderRadius: "6px", padding: "8px", marginBottom: "10px" } });
  card.append(el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "baseline" } },
    el("b", {}, job.name),
    el("span", { "data-testid": "add-state", style: { color: STATE_COLOR[job.state] || "#ccc", fontWeight: "bold" } },
      job.state)));
  card.append(el("div", { style: { background: "#333", borderRadius: "3px", height: "8px", margin: "6px 0" } },
    el("div", { "data-testid": "add-progress", "data-step": String(job.step), "data-max": String(job.max_steps),
      style: { width: `${pct}%`, height: "100%", background: STATE_COLOR[job.state] || "#4caf50", borderRadius: "3px" } })));
  card.append(el("div", { style: { fontSize: "12px", opacity: 0.85 } },
    `step ${job.step}/${job.max_steps} · ${job.it_s ? job.it_s.toPrecision(3) + " it/s" : "– it/s"} · ETA ${fmtEta(job.eta_s)}`));
  card.append(el("div", { style: { fontSize: "12px", opacity: 0.85 } },
    `D ${fmtLoss(losses.d_loss)} · G ${fmtLoss(losses.g_loss)} · adv ${fmtLoss(losses.adv)} · distill ${fmtLoss(losses.distill)}`));
  const canvas = el("canvas", { "data-testid": "add-loss-plot", width: "300", height: "110",
    style: { width: "100%", marginTop: "6px" } });
  card.append(canvas);
  drawPlot(canvas, job.history);
  if (job.preview_step !== null && job.preview_step !== undefined) {
    card.append(el("div", { style: { fontSize: "11px", opacity: 0.7, marginTop: "4px" } },
      `preview at step ${job.preview_step} (1-step student, fixed seeds)`));
    card.append(el("img", { "data-testid": "add-preview", src: api.apiURL(`/add/jobs/${job.id}/preview.png?v=${job.preview_step}`),
      style: { width: "100%", imageRendering: "pixelated", borderRadius: "4px" } }));
  }
  if (job.message) card.append(el("div", { "data-testid": "add-message", style: { fontSize: "12px", marginTop: "4px" } }, job.message));
  if (job.error) card.append(el("div", { "data-testid": "add-error", style: { fontSize: "12px", color: "#e05050", marginTop: "4px" } }, job.error));
  card.append(el("div", { style: { fontSize: "11px", opacity: 0.6, marginTop: "4px", wordBreak: "break-all" } },
    `LoRA: ${job.lora_path}${job.last_checkpoint_step !== null && job.last_checkpoint_step !== undefined ? ` (saved at step ${job.last_checkpoint_step})` : ""}`));
  if (ACTIVE.has(job.state)) {
    card.append(el("button", { "data-testid": "add-cancel", class: "p-button p-button-sm p-button-danger",
      style: { marginTop: "6px" },
      onclick: async (ev) => {
        ev.target.disabled = true;
        ev.target.textContent = "cancelling…";
        await api.fetchApi(`/add/jobs/${job.id}/cancel`, { method: "POST" });
      } }, "Cancel"));
  }
  return card;
}

function render() {
  if (!root) return;
  const list = [...jobs.values()].sort((a, b) => b.created - a.created);
  root.replaceChildren(
    el("div", { style: { padding: "10px", overflowY: "auto", height: "100%", boxSizing: "border-box" } },
      el("h3", { style: { margin: "0 0 8px 0" } }, "ADD Training"),
      list.length
        ? el("div", { "data-testid": "add-jobs" }, ...list.map(jobCard))
        : el("div", { "data-testid": "add-empty", style: { opacity: 0.7, fontSize: "13px" } },
          "No training jobs yet. Queue a workflow with ADD Train (background), e.g. the add_train_lora template.")));
}

function showText(node, text) {
  // A read-only text area under the node's widgets with the node's latest UI text.
  let w = node.widgets?.find((x) => x.name === "add_status");
  if (!w) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.rows = 5;
    Object.assign(area.style, { width: "100%", fontSize: "11px", opacity: 0.85, resize: "none" });
    w = node.addDOMWidget("add_status", "add_status", area, { serialize: false, getValue: () => area.value, setValue: () => {} });
    w.element = area;
  }
  w.element.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui-add.training",
  async setup() {
    api.addEventListener("add.job", (e) => onEvent(e.detail));
    if (app.extensionManager?.registerSidebarTab) {
      app.extensionManager.registerSidebarTab({
        id: "add-training",
        icon: "pi pi-bolt",
        title: "ADD Training",
        tooltip: "ADD Training: background jobs, losses, previews",
        type: "custom",
        render: (elem) => {
          root = elem;
          render();
          loadAll();
        },
        destroy: () => { root = null; },
      });
    }
    loadAll();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    // Every node of this plugin that reports text (training status, LoRA merge report, saved file,
    // extraction error, comparison) shows it on the node, where the user is looking.
    if (!String(nodeData.category || "").startsWith("ADD")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text.join("\n"));
    };
  },
});
