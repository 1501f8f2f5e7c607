// Versions: every published version with its accuracy, size and date; one version's card
// (classes, per-class accuracy, confusion matrix, curves, data fingerprint, parent, why it
// was or was not promoted); two versions side by side (per-class accuracy difference);
// activate, pin/unpin (where the API has a promotion policy), download weights.
import { api, download } from "./api.js";
import { h, clear, pct, bytes, when } from "./dom.js";
import { bar, curves } from "./charts.js";

const MANY_CLASSES = 40;

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
  root.append(listBox, card, compare);

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
        h("th", { scope: "row" }, v.version, isCurrent ? h("span", { class: "badge succeeded" }, "serving") : null),
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
    const names = models.versions.map((v) => v.version);
    const keepA = compareA.value, keepB = compareB.value;
    clear(compareA, ...names.map((n) => h("option", { value: n }, n)));
    clear(compareB, ...names.map((n) => h("option", { value: n }, n)));
    compareA.value = names.includes(keepA) ? keepA : names[1] || names[0] || "";
    compareB.value = names.includes(keepB) ? keepB : names[0] || "";
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

  async function showCard(version) {
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
