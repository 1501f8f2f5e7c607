// Train: start a job with the deployment's defaults filled in (only what is changed is sent),
// follow it live over server-sent events (status, epoch, step, ETA, loss and accuracy curves
// as each epoch arrives; "reconnecting" while the connection is down), cancel it, resume a
// failed one, and the history of jobs with why each version was or was not promoted.
import { api, followJob } from "./api.js";
import { h, clear, pct, when, duration } from "./dom.js";
import { curves } from "./charts.js";

const NUMBERS = [
  ["epochs", "Epochs", 1, 1],
  ["workers", "Workers", 1, 1],
  ["batch_size", "Batch size (per worker)", 1, 1],
  ["lr", "Learning rate (head)", 0, "any"],
  ["image_size", "Image size (px)", 32, 1],
];
const FLAGS = [["gpu", "One GPU per worker"], ["augment", "Augmentation"]];
const GATE = [
  ["min_error_reduction", "Share of the baseline's errors to avoid"],
  ["min_accuracy", "Minimum test accuracy"],
  ["max_regression", "Allowed regression vs. current"],
];
const ACTIVE = new Set(["queued", "running"]);

export function mount(root, ctx) {
  if (!ctx.signedIn()) { root.append(ctx.needSignIn("Training")); return; }
  let defaults = null;
  let stop = null;
  let shown = null;
  let alive = true;

  const form = h("form", { class: "card", id: "train-form" }, h("h2", {}, "Train"), h("p", { class: "muted" }, "Loading defaults…"));
  const live = h("section", { class: "card", id: "job", "aria-live": "polite" }, h("h2", {}, "Job"), h("p", { class: "muted" }, "No job selected."));
  const history = h("section", { class: "card", id: "history" }, h("h2", {}, "History"));
  root.append(h("div", { class: "columns" }, form, live), history);

  function field(name, label, input) {
    input.id = `train-${name}`;
    input.name = name;
    return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
  }

  function buildForm(d, strategies) {
    const controls = [
      field("backbone", "Backbone", h("input", { type: "text", value: d.backbone, maxlength: "64" })),
      field("strategy", "Strategy", h("select", {}, ...strategies.map((s) => h("option", { value: s, selected: s === d.strategy }, s)))),
      ...NUMBERS.map(([name, label, min, step]) => field(name, label,
        h("input", { type: "number", value: String(d[name]), min: String(min), step: String(step), required: true }))),
      ...FLAGS.map(([name, label]) => h("div", { class: "field check" },
        h("input", { type: "checkbox", id: `train-${name}`, name, checked: !!d[name] }),
        h("label", { for: `train-${name}` }, label))),
    ];
    const gate = h("details", { class: "gate" }, h("summary", {}, "Promotion gate"),
      h("div", { class: "fields" }, ...GATE.map(([name, label]) => field(`gate-${name}`, label,
        h("input", { type: "number", min: "0", max: "1", step: "any", value: String(d.gate[name]) })))));
    const error = h("p", { class: "error", role: "alert", id: "train-error" });
    clear(form, h("h2", {}, "Train"),
      h("p", { class: "muted small" }, "The deployment's defaults are filled in; only what you change is sent."),
      h("div", { class: "fields" }, ...controls), gate,
      h("div", { class: "row" }, h("button", { type: "submit", class: "primary", id: "train-start" }, "Start training")),
      error);
    // Augmentation's default follows the strategy (the server's rule: off for feature-extract,
    // whose backbone features are then cached; on for finetune and partial): show it.
    form.querySelector("#train-strategy").addEventListener("change", (event) => {
      form.querySelector("#train-augment").checked = event.target.value !== "feature-extract";
    });
  }

  function overrides() {
    const out = {};
    const val = (name) => form.querySelector(`#train-${name}`);
    if (val("backbone").value.trim() !== defaults.backbone) out.backbone = val("backbone").value.trim();
    if (val("strategy").value !== defaults.strategy) out.strategy = val("strategy").value;
    for (const [name] of NUMBERS) {
      const v = Number(val(name).value);
      if (v !== defaults[name]) out[name] = v;
    }
    for (const [name] of FLAGS) {  // augment is sent with a changed strategy: its default follows it
      if (val(name).checked !== !!defaults[name] || (name === "augment" && out.strategy)) out[name] = val(name).checked;
    }
    const gate = {};
    for (const [name] of GATE) {
      const v = Number(val(`gate-${name}`).value);
      if (v !== defaults.gate[name]) gate[name] = v;
    }
    if (Object.keys(gate).length) out.gate = gate;
    return out;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!defaults) return;
    const error = form.querySelector("#train-error");
    const button = form.querySelector("#train-start");
    error.textContent = "";
    button.disabled = true;
    try {
      const started = await api("/v1/train", { method: "POST", json: overrides() });
      ctx.say(`Job ${started.job_id} started.`);
      show(started.job_id);
      loadHistory();
    } catch (err) {
      error.textContent = ctx.failed(err);
    } finally { button.disabled = false; }
  });

  function renderJob(job, connection) {
    const p = job.progress || {};
    const active = ACTIVE.has(job.status);
    const bar = h("progress", { max: "1", value: p.fraction || 0, id: "job-progress", "aria-label": "Training progress" });
    const cancel = h("button", { type: "button", class: "danger", id: "job-cancel" }, "Cancel");
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try { await api(`/v1/train/${encodeURIComponent(job.job_id)}`, { method: "DELETE" }); ctx.say("Cancel requested."); }
      catch (err) { cancel.disabled = false; ctx.say(ctx.failed(err), "error"); }
    });
    const resume = h("button", { type: "button", id: "job-resume" }, "Resume");
    resume.addEventListener("click", async () => {
      resume.disabled = true;
      try {
        const r = await api(`/v1/train/${encodeURIComponent(job.job_id)}/resume`, { method: "POST" });
        show(r.job_id || job.job_id);
        loadHistory();
      } catch (err) { resume.disabled = false; ctx.say(ctx.failed(err), "error"); }
    });
    const outcome = job.status === "succeeded"
      ? h("p", { id: "job-outcome" }, "Published ", h("strong", {}, job.version || "—"), ": ",
        job.promoted ? "promoted" : "not promoted", job.reason ? ` — ${job.reason}` : "")
      : job.reason || job.error ? h("p", { id: "job-outcome", class: job.status === "failed" ? "error" : "" },
        [job.reason, job.error].filter(Boolean).join(": ")) : null;
    clear(live,
      h("h2", {}, "Job ", h("code", {}, job.job_id)),
      h("p", {}, h("span", { class: `badge ${job.status}`, id: "job-status" }, job.status), " ",
        connection ? h("span", { class: `connection ${connection}`, id: "job-connection" }, connection) : null),
      h("dl", { class: "facts" },
        h("dt", {}, "Epoch"), h("dd", { id: "job-epoch" }, `${p.epoch ?? 0} / ${p.epochs ?? "?"}`),
        h("dt", {}, "Step"), h("dd", {}, `${p.step ?? 0} / ${p.steps ?? "?"}`),
        h("dt", {}, "Done"), h("dd", {}, pct(p.fraction, 0)),
        h("dt", {}, "ETA"), h("dd", { id: "job-eta" }, active ? duration(p.eta_s) : "—"),
        job.val_accuracy !== undefined ? [h("dt", {}, "Val / test accuracy"),
          h("dd", {}, `${pct(job.val_accuracy)} / ${pct(job.test_accuracy)}`)] : null),
      bar,
      h("div", { class: "charts" }, ...curves(job.metrics)),
      outcome,
      h("div", { class: "row" }, active ? cancel : null, job.status === "failed" || job.status === "cancelled" ? resume : null));
  }

  function show(jobId) {
    if (stop) stop();
    const mine = shown = { job: null, connection: "connecting" };
    // Callbacks of a stream that was replaced (another job shown) change nothing.
    stop = followJob(jobId, {
      onJob(job) {
        if (!alive || shown !== mine) return;
        shown.job = job;
        renderJob(job, shown.connection);
      },
      onState(state, detail) {
        if (!alive || shown !== mine) return;
        shown.connection = state === "live" ? "live" : state === "ended" ? null : state;
        if (state === "error") {
          clear(live, h("h2", {}, "Job"), h("p", { class: "error", role: "alert" }, detail));
          return;
        }
        if (state === "ended") loadHistory();
        if (shown.job) renderJob(shown.job, shown.connection);
        else clear(live, h("h2", {}, "Job ", h("code", {}, jobId)), h("p", { class: "muted", id: "job-connection" }, state));
      },
    });
  }

  async function loadHistory() {
    let jobs;
    try {
      jobs = (await api("/v1/train?limit=50")).jobs;
    } catch (err) {
      clear(history, h("h2", {}, "History"), h("p", { class: "error" }, ctx.failed(err)));
      return [];
    }
    if (!alive) return jobs;
    const rows = jobs.map((j) => h("tr", {},
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => show(j.job_id) }, j.job_id)),
      h("td", {}, h("span", { class: `badge ${j.status}` }, j.status)),
      h("td", {}, j.source || "—"),
      h("td", {}, when(j.created_at)),
      h("td", {}, j.version || "—"),
      h("td", {}, j.promoted === true ? "yes" : j.promoted === false ? "no" : "—"),
      h("td", { class: "why" }, [j.reason, j.error].filter(Boolean).join(": ") || "—")));
    clear(history, h("h2", {}, "History"),
      jobs.length ? h("div", { class: "scroll" }, h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, ...["Job", "Status", "By", "Started", "Version", "Promoted", "Why"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, ...rows)))
        : h("p", { class: "muted" }, "No training jobs yet."));
    return jobs;
  }

  (async () => {
    try {
      const d = await api("/v1/web/train-defaults");
      defaults = d.defaults;
      if (alive) buildForm(d.defaults, d.strategies);
    } catch (err) {
      clear(form, h("h2", {}, "Train"), h("p", { class: "error" }, ctx.failed(err)));
    }
    const jobs = await loadHistory();
    const running = jobs.find((j) => ACTIVE.has(j.status));
    if (alive && running) show(running.job_id);
  })();

  return () => { alive = false; if (stop) stop(); };
}
