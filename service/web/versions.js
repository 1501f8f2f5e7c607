// Versions: every published version with its accuracy, size and date; one version's card
// (classes, per-class accuracy, confusion matrix, curves, data fingerprint, parent, why it
// was or was not promoted); two versions side by side (per-class accuracy difference);
// activate, pin/unpin (where the API has a promotion policy), download weights. Answer quality
// (issue 14): the card shows the calibration and threshold records and the live drift block
// of `GET /v1/models/{v}`; the version on trial (shadow or canary, `GET /v1/models` `trial`)
// has its own section with its live figures, started from a version's row (`PUT
// /v1/models/trial`) and ended there (`DELETE /v1/models/trial`), the API's error shown next
// to the control that failed.
import { api, download } from "./api.js";
import { h, clear, pct, bytes, when } from "./dom.js";
import { bar, curves } from "./charts.js";

const MANY_CLASSES = 40;
const num = (x, digits = 3) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "—");

// The accuracies a manifest holds: test (held out, what the gate judged) when there, else
// validation.
function accuracyOf(manifest) {
  const m = manifest.metrics || {};
  if (m.test && m.test.per_class_accuracy) {
    return { split: "test", overall: m.test.accuracy, perClass: m.test.per_class_accuracy, confusion: m.test.confusion_matrix };
  }
  return { split: "validation", overall: m.best_val_accuracy, perClass: m.per_class_accuracy || {}, confusion: m.confusion_matrix };
}

function policyMode(policy) {
  return typeof policy === "string" ? policy : policy && policy.mode;
}

export function mount(root, ctx) {
  if (!ctx.signedIn()) { root.append(ctx.needSignIn("Model versions")); return; }
  let alive = true;
  let models = null;
  const manifests = new Map();
  const listBox = h("section", { class: "card", id: "versions" }, h("h2", {}, "Versions"), h("p", { class: "muted" }, "Loading…"));
  const trialBox = h("section", { class: "card", id: "trial", "aria-labelledby": "trial-title" });
  const card = h("section", { class: "card", id: "version-card", hidden: true });
  const compareA = h("select", { id: "compare-a" });
  const compareB = h("select", { id: "compare-b" });
  const compareOut = h("div", { id: "compare-result" });
  const compare = h("section", { class: "card", id: "compare" },
    h("h2", {}, "Compare two versions"),
    h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); runCompare(); } },
      h("label", { for: "compare-a" }, "A"), compareA, h("label", { for: "compare-b" }, "B"), compareB,
      h("button", { type: "submit" }, "Compare")),
    compareOut);
  root.append(listBox, trialBox, card, compare);

  async function manifest(version) {
    if (!manifests.has(version)) manifests.set(version, api(`/v1/models/${encodeURIComponent(version)}`));
    try { return await manifests.get(version); } catch (err) { manifests.delete(version); throw err; }
  }

  async function activate(version, pin) {
    const query = pin === undefined ? "" : `?pin=${pin}`;
    try {
      const r = await api(`/v1/models/${encodeURIComponent(version)}/activate${query}`, { method: "POST" });
      ctx.say(`${r.current} is now serving${pin ? " (pinned)" : ""}.`);
    } catch (err) {
      ctx.say(`Could not activate ${version}: ${ctx.failed(err)}`, "error");
    }
    load();
  }

  async function setPolicy(mode) {
    try {
      await api("/v1/models/policy", { method: "PUT", json: { mode } });
      ctx.say(`Promotion policy: ${mode}.`);
    } catch (err) { ctx.say(ctx.failed(err), "error"); }
    load();
  }

  // Activate serves a version (keeping the policy automatic); Pin serves it and keeps it
  // (jobs publish but do not promote); Unpin lets jobs promote again. Without a policy in the
  // API's answer (an older service), Activate alone.
  function actions(version, isCurrent, hasPolicy, mode) {
    const button = (text, cls, onclick) => h("button", { type: "button", class: cls, onclick }, text);
    if (!hasPolicy) return isCurrent ? [] : [button("Activate", "activate", () => activate(version))];
    if (isCurrent) {
      return mode === "pinned" ? [button("Unpin", "unpin", () => setPolicy("automatic"))]
        : [button("Pin", "pin", () => setPolicy("pinned"))];
    }
    return [button("Activate", "activate", () => activate(version, false)),
      button("Pin", "pin", () => activate(version, true))];
  }

  function render(sizes) {
    const mode = policyMode(models.policy);
    const hasPolicy = models.policy !== undefined && models.policy !== null;
    const rows = models.versions.map((v) => {
      const isCurrent = v.version === models.current;
      const classes = v.class_count ?? (v.classes || []).length;
      return h("tr", { dataset: { version: v.version }, class: isCurrent ? "current" : "" },
        h("th", { scope: "row" }, v.version, isCurrent ? h("span", { class: "badge succeeded" }, "serving") : null,
          models.trial && models.trial.version === v.version ? h("span", { class: "badge running" }, `on trial (${models.trial.mode})`) : null),
        h("td", {}, when(v.created_at)),
        h("td", {}, v.backbone || "—"),
        h("td", { class: "num" }, String(classes)),
        h("td", { class: "num" }, pct(v.val_accuracy)),
        h("td", { class: "num" }, pct(v.test_accuracy)),
        h("td", {}, v.promoted === true ? "yes" : v.promoted === false ? "no" : "—"),
        h("td", { class: "num" }, bytes(sizes[v.version])),
        h("td", { class: "actions" },
          h("button", { type: "button", onclick: () => showCard(v.version) }, "Card"),
          ...actions(v.version, isCurrent, hasPolicy, mode),
          isCurrent || !models.current ? null : h("button", { type: "button", class: "try", "aria-expanded": "false",
            onclick: (e) => openTrialForm(v.version, e.currentTarget) }, "Try live…"),
          h("button", { type: "button", onclick: () => download(`/v1/models/${encodeURIComponent(v.version)}/weights`, `visionloop-${v.version}.safetensors`).catch((err) => ctx.say(ctx.failed(err), "error")) }, "Weights")));
    });
    clear(listBox, h("h2", {}, "Versions"),
      h("p", { id: "current-version" }, "Serving ", h("strong", {}, models.current || "nothing"),
        hasPolicy ? [". Promotion: ", h("strong", { id: "policy" }, mode || "?"),
          mode === "pinned" ? ` (${models.policy.version || "the current version"} is pinned: new versions are published, not promoted)`
            : " (a version that passes the gate is promoted)"] : "."),
      h("div", { class: "scroll" }, h("table", { id: "versions-table" },
        h("thead", {}, h("tr", {}, ...["Version", "Created", "Backbone", "Classes", "Val acc.", "Test acc.", "Promoted", "Size", ""].map((t) =>
          h("th", { scope: "col", class: ["Classes", "Val acc.", "Test acc.", "Size"].includes(t) ? "num" : null }, t)))),
        h("tbody", {}, ...rows))));
    renderTrial();
    const names = models.versions.map((v) => v.version);
    const keepA = compareA.value, keepB = compareB.value;
    clear(compareA, ...names.map((n) => h("option", { value: n }, n)));
    clear(compareB, ...names.map((n) => h("option", { value: n }, n)));
    compareA.value = names.includes(keepA) ? keepA : names[1] || names[0] || "";
    compareB.value = names.includes(keepB) ? keepB : names[0] || "";
  }

  // The form that starts a trial, opened below a version's row; its errors stay beside it.
  function openTrialForm(version, button) {
    for (const old of listBox.querySelectorAll("tr.trial-form")) old.remove();
    for (const b of listBox.querySelectorAll("button.try")) b.setAttribute("aria-expanded", "false");
    button.setAttribute("aria-expanded", "true");
    const ids = (name) => `trial-${name}`;
    const mode = h("select", { id: ids("mode") },
      h("option", { value: "shadow" }, "shadow: also classifies, answers none"),
      h("option", { value: "canary" }, "canary: answers a share of requests"));
    const share = h("input", { id: ids("share"), type: "number", min: "1", max: "100", step: "1", value: "10", required: true });
    const error = h("p", { class: "error", id: ids("form-error"), role: "alert" });
    const close = () => { row.remove(); button.setAttribute("aria-expanded", "false"); button.focus(); };
    const form = h("form", { class: "row", "aria-label": `Try ${version} on live traffic` },
      h("label", { for: ids("mode") }, `Try ${version} as`), mode,
      h("label", { for: ids("share") }, "on % of requests"), share,
      h("button", { type: "submit", class: "primary" }, "Start trial"),
      h("button", { type: "button", onclick: close }, "Cancel"), error);
    form.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); close(); } });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      error.textContent = "Starting…";
      try {
        const t = await api("/v1/models/trial", { method: "PUT", json: { version, mode: mode.value, share: Number(share.value) / 100 } });
        ctx.say(`${t.version} is on ${t.mode} trial (${pct(t.share, 0)} of requests).`);
        await load();
        trialBox.querySelector("h2")?.focus();
      } catch (err) {
        error.textContent = `Could not start the trial: ${ctx.failed(err)}`;
      }
    });
    const row = h("tr", { class: "trial-form", dataset: { version } }, h("td", { colspan: "9" }, form));
    button.closest("tr").after(row);
    mode.focus();
  }

  async function endTrial(error) {
    error.textContent = "Ending…";
    try {
      const ended = await api("/v1/models/trial", { method: "DELETE" });
      ctx.say(ended ? `The trial of ${ended.version} has ended.` : "No trial was running.");
      await load();
      trialBox.querySelector("h2")?.focus();
    } catch (err) {
      error.textContent = `Could not end the trial: ${ctx.failed(err)}`;
    }
  }

  // The version on trial and its live figures (as of the last load; Refresh reads them again).
  function renderTrial() {
    trialBox.hidden = !("trial" in models); // an older service without trials
    const t = models.trial;
    const title = h("h2", { id: "trial-title", tabindex: "-1" }, "Live trial");
    if (!t) {
      clear(trialBox, title, h("p", { id: "trial-none" }, "No version is on trial. “Try live…” on a version's row ",
        "shadows it (it also classifies a share of live requests and answers none) or makes it a canary ",
        "(it answers a share of them); activate it to promote it, end the trial to roll back."));
      return;
    }
    const fb = t.feedback || {};
    const error = h("p", { class: "error", id: "trial-error", role: "alert" });
    const accuracy = (a, n) => (n ? `${pct(a)} of ${n} labelled` : "no labelled answer yet");
    clear(trialBox, h("div", { class: "row spread" }, title,
      h("div", { class: "row" },
        h("button", { type: "button", id: "trial-refresh", onclick: () => load() }, "Refresh"),
        h("button", { type: "button", id: "trial-end", class: "danger", onclick: () => endTrial(error) }, "End trial"))),
      error,
      h("p", {}, h("strong", {}, t.version), ` on ${t.mode} trial beside `, h("strong", {}, t.current || "—"),
        `: ${t.mode === "canary" ? "answers" : "also classifies"} ${pct(t.share, 0)} of the requests that name no version. `,
        `Since ${when(t.set_at)}${t.by ? ` (by ${t.by})` : ""}.`),
      h("dl", { class: "facts", id: "trial-figures" },
        h("dt", {}, "Live answers"), h("dd", { id: "trial-answers" }, String(t.answers ?? 0)),
        h("dt", {}, "Agreement with the served answer"), h("dd", { id: "trial-agreement" },
          t.mode === "shadow" ? pct(t.agreement) : "— (a canary's answers are the served ones)"),
        h("dt", {}, "Feedback accuracy, trial"), h("dd", { id: "trial-accuracy" }, accuracy(fb.trial_accuracy, fb.count)),
        h("dt", {}, "Feedback accuracy, current"), h("dd", { id: "trial-current-accuracy" }, accuracy(fb.current_accuracy, fb.current_count)),
        h("dt", {}, "Replicas"), h("dd", { id: "trial-replicas" }, (t.replicas || []).length
          ? t.replicas.map((r, i) => `#${i + 1} ${r ? `follows ${r}` : "without it (could not load it)"}`).join(" · ") : "—")));
  }

  async function load() {
    try {
      const [m, s] = await Promise.all([api("/v1/models"), api("/v1/web/model-sizes").catch(() => ({ sizes: {} }))]);
      models = m;
      models.versions.sort((a, b) => Number(b.version.slice(1)) - Number(a.version.slice(1)));
      if (alive) render(s.sizes);
    } catch (err) {
      clear(listBox, h("h2", {}, "Versions"), h("p", { class: "error" }, ctx.failed(err)));
    }
  }

  function confusionTable(classes, matrix) {
    if (!matrix || classes.length > 30) return null;
    const max = Math.max(1, ...matrix.flat());
    return h("div", { class: "scroll" }, h("table", { class: "confusion", "aria-label": "Confusion matrix: rows true, columns predicted" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "true ↓ / predicted →"), ...classes.map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, ...matrix.map((row, i) => h("tr", {}, h("th", { scope: "row" }, classes[i]),
        ...row.map((n, j) => {
          const cell = h("td", { class: i === j ? "diag" : n ? "off" : "" }, String(n));
          cell.style.setProperty("--a", String(n / max));
          return cell;
        }))))));
  }

  // The calibration and threshold records of the manifest (none for v0: its scores are the
  // raw softmax and nothing is answered unknown).
  function calibrationOf(m, version) {
    const cal = m.calibration, thr = m.threshold;
    const why = version === "v0" ? "version 0 is the pretrained ImageNet classifier" : "this version was published without one";
    return [h("h3", {}, "Calibration"),
      cal ? h("dl", { class: "facts", id: "card-calibration" },
        h("dt", {}, "Method"), h("dd", {}, String(cal.method || "temperature_scaling").replace(/_/g, " ")),
        h("dt", {}, "Temperature"), h("dd", {}, num(cal.temperature)),
        h("dt", {}, "ECE"), h("dd", {}, `${num(cal.ece_before)} before → ${num(cal.ece_after)} after`,
          cal.ece_bins ? ` (${cal.ece_bins} bins)` : ""),
        h("dt", {}, "Fitted on"), h("dd", {}, `the ${cal.fitted_on || "?"} split`, cal.count ? ` (${cal.count} images)` : "",
          cal.fitted_on === "test" ? "; ECE after is measured on the split it was fitted on" : ""))
        : h("p", { id: "card-calibration", class: "muted" }, `No calibration record: ${why}; its scores are the raw softmax.`),
      h("h3", {}, "Confidence threshold"),
      thr ? h("dl", { class: "facts", id: "card-threshold" },
        h("dt", {}, "Threshold"), h("dd", {}, pct(thr.threshold), thr.threshold > 0 ? " (a lower best score is answered “unknown”)" : " (nothing is answered “unknown”)"),
        h("dt", {}, "Rule"), h("dd", {}, thr.rule || "—"),
        h("dt", {}, "Target precision"), h("dd", {}, pct(thr.target_precision),
          thr.reached === false ? " (not reached: the threshold with the highest precision)" : ""),
        h("dt", {}, "Accepted"), h("dd", {}, typeof thr.accepted_share === "number"
          ? `${pct(thr.accepted_share)} of held-out answers${typeof thr.accepted_precision === "number" ? `, ${pct(thr.accepted_precision)} of them right` : ""}${thr.count ? ` (${thr.count} images)` : ""}`
          : "—"))
        : h("p", { id: "card-threshold", class: "muted" }, `No threshold record: ${why}; nothing is answered “unknown” unless a request sets min_score.`)];
  }

  // The manifest's live `drift` block: why there is no score, or the score, its parts and the
  // label shares live against the held-out reference.
  function driftOf(m, version) {
    const d = m.drift;
    if (d === undefined) return null; // an older service
    const head = h("h3", {}, "Drift (live answers against the held-out split)");
    if (d === null) {
      return [head, h("p", { id: "card-drift", class: "muted" }, "No drift score: ",
        version === "v0" ? "version 0 is the pretrained classifier and has no held-out reference."
          : "this version was published without a held-out reference.")];
    }
    if (d.score === null || d.score === undefined) {
      return [head, h("p", { id: "card-drift", class: "muted" },
        `Not judged yet: ${d.count} live answer${d.count === 1 ? "" : "s"} of ${version}, ${d.min_count} needed `,
        "(a score over a handful of answers is noise).")];
    }
    const ref = (m.reference && m.reference.label_shares) || {};
    const live = (d.live && d.live.label_shares) || {};
    const labels = Object.keys(ref);
    return [head, h("dl", { class: "facts", id: "card-drift" },
      h("dt", {}, "Score"), h("dd", {}, `${num(d.score)} (threshold ${num(d.threshold, 2)}) `,
        h("span", { class: `badge ${d.drifted ? "failed" : "succeeded"}`, id: "card-drift-verdict" }, d.drifted ? "drifted" : "not drifted")),
      h("dt", {}, "Labels"), h("dd", {}, `PSI ${num(d.label_psi)}`),
      h("dt", {}, "Confidence"), h("dd", {}, `PSI ${num(d.confidence_psi)} (ten bins)`),
      h("dt", {}, "Live answers"), h("dd", {}, `${d.count}`, d.window ? ` (the newest up to ${d.window})` : "",
        d.reference_count ? ` against ${d.reference_count} held-out images` : ""),
      h("dt", {}, "Test"), h("dd", {}, d.test || "—")),
      labels.length && labels.length <= 30 ? h("div", { class: "scroll" }, h("table", { id: "drift-labels" },
        h("thead", {}, h("tr", {}, ...["Predicted label", "Held-out share", "Live share"].map((t, i) => h("th", { scope: "col", class: i ? "num" : null }, t)))),
        h("tbody", {}, ...labels.map((l) => h("tr", {}, h("th", { scope: "row" }, l), h("td", { class: "num" }, pct(ref[l])), h("td", { class: "num" }, pct(live[l])))),
          d.live && d.live.other_share ? h("tr", {}, h("th", { scope: "row" }, "other (unknown to the reference)"), h("td", { class: "num" }, "—"), h("td", { class: "num" }, pct(d.live.other_share))) : null))) : null];
  }

  async function showCard(version) {
    manifests.delete(version); // drift is live: read the card afresh
    card.hidden = false;
    clear(card, h("h2", {}, `Version ${version}`), h("p", { class: "muted" }, "Loading…"));
    let m;
    try { m = await manifest(version); } catch (err) {
      clear(card, h("h2", {}, `Version ${version}`), h("p", { class: "error" }, ctx.failed(err)));
      return;
    }
    const classes = m.classes || [];
    const acc = accuracyOf(m);
    const fp = m.data_fingerprint;
    const promotion = m.promotion || {};
    clear(card,
      h("div", { class: "row spread" }, h("h2", {}, `Version ${version}`),
        h("button", { type: "button", onclick: () => { card.hidden = true; } }, "Close")),
      h("dl", { class: "facts" },
        h("dt", {}, "Created"), h("dd", {}, when(m.created_at)),
        h("dt", {}, "Backbone"), h("dd", {}, `${m.backbone} (${m.weights_origin || "?"})`),
        h("dt", {}, "Strategy"), h("dd", {}, m.strategy || "—"),
        h("dt", {}, "Parent"), h("dd", {}, m.parent || "—"),
        h("dt", {}, "Job"), h("dd", {}, m.job_id || "—"),
        h("dt", {}, `Accuracy (${acc.split})`), h("dd", {}, pct(acc.overall)),
        h("dt", {}, "Promotion"), h("dd", { id: "card-promotion" }, promotion.promoted ? "promoted" : "not promoted",
          promotion.reason ? ` — ${promotion.reason}` : "")),
      calibrationOf(m, version),
      driftOf(m, version),
      h("h3", {}, `Classes (${classes.length})`),
      classes.length > MANY_CLASSES
        ? h("details", {}, h("summary", {}, `${classes.slice(0, 8).join(", ")}, …`), h("p", { class: "small" }, classes.join(", ")))
        : h("p", { class: "classes" }, classes.join(", ")),
      Object.keys(acc.perClass).length ? [h("h3", {}, `Per-class accuracy (${acc.split} split)`),
        h("div", { class: "bars" }, ...Object.entries(acc.perClass).map(([c, a]) => bar(c, a ?? 0, { text: a === null ? "no image" : pct(a) })))] : null,
      acc.confusion ? [h("h3", {}, `Confusion matrix (${acc.split} split)`), confusionTable(classes, acc.confusion)] : null,
      m.metrics && m.metrics.epochs ? [h("h3", {}, "Curves"), h("div", { class: "charts" }, ...curves(m.metrics.epochs))] : null,
      fp ? [h("h3", {}, "Data fingerprint"), h("dl", { class: "facts" },
        h("dt", {}, "Images"), h("dd", {}, `${fp.train_count} train, ${fp.val_count} validation, ${fp.test_count} test`),
        h("dt", {}, "Per label"), h("dd", {}, Object.entries(fp.label_counts || {}).map(([l, n]) => `${l} ${n}`).join(", ")),
        h("dt", {}, "Image set"), h("dd", {}, h("code", { title: fp.images_sha256 }, String(fp.images_sha256 || "").slice(0, 16))))] : null,
      m.training_config ? h("details", {}, h("summary", {}, "Training configuration"),
        h("dl", { class: "facts small" }, ...Object.entries(m.training_config).flatMap(([k, v]) =>
          [h("dt", {}, k), h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]))) : null);
    card.scrollIntoView({ block: "start" });
  }

  async function runCompare() {
    const a = compareA.value, b = compareB.value;
    if (!a || !b) return;
    clear(compareOut, h("p", { class: "muted" }, "Loading…"));
    let ma, mb;
    try { [ma, mb] = await Promise.all([manifest(a), manifest(b)]); } catch (err) {
      clear(compareOut, h("p", { class: "error" }, ctx.failed(err)));
      return;
    }
    const A = accuracyOf(ma), B = accuracyOf(mb);
    const classes = [...new Set([...Object.keys(A.perClass), ...Object.keys(B.perClass)])].sort();
    const cell = (x) => h("td", { class: "num" }, x === undefined || x === null ? "—" : pct(x));
    const diff = (x, y) => {
      if (typeof x !== "number" || typeof y !== "number") return h("td", { class: "num muted" }, "—");
      const d = y - x;
      return h("td", { class: `num ${d > 0 ? "up" : d < 0 ? "down" : ""}` }, `${d > 0 ? "+" : ""}${(d * 100).toFixed(1)}`);
    };
    clear(compareOut,
      h("p", {}, `${a}: ${pct(A.overall)} (${A.split}) · ${b}: ${pct(B.overall)} (${B.split})`,
        A.split !== B.split ? " — measured on different splits" : ""),
      classes.length ? h("div", { class: "scroll" }, h("table", { id: "compare-table" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Class"), h("th", { scope: "col", class: "num" }, a),
          h("th", { scope: "col", class: "num" }, b), h("th", { scope: "col", class: "num" }, `${b} − ${a} (points)`))),
        h("tbody", {}, ...classes.map((c) => h("tr", {}, h("th", { scope: "row" }, c),
          cell(A.perClass[c]), cell(B.perClass[c]), diff(A.perClass[c], B.perClass[c]))))))
        : h("p", { class: "muted" }, "Neither version has per-class accuracy (version 0 is the pretrained classifier)."));
  }

  load();
  return () => { alive = false; };
}
