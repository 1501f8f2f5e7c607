// Predict: drop, pick or paste images; each is sent on its own request (so one refused file
// shows its own error and the others still get answers), at most three at a time. Each answer
// shows the top-k as bars and the version that answered (“unknown (below threshold X)” when
// its best score is below the threshold, the bars still drawn); signed in, a correct label can be
// sent back as feedback.
import { api } from "./api.js";
import { h, clear, pool, bytes, pct } from "./dom.js";
import { bar } from "./charts.js";

const ACCEPT = "image/jpeg,image/png,image/webp";
const MAX_CARDS = 60;

export function mount(root, ctx) {
  const urls = new Set();
  if (!ctx.config.predict_open && !ctx.signedIn()) {
    root.append(ctx.needSignIn("Predict (a predict token is configured)"));
    return;
  }
  let labels = [];
  const labelList = h("datalist", { id: "known-labels" });
  const topK = h("select", { id: "top-k" },
    ...[1, 3, 5, 10].map((k) => h("option", { value: String(k), selected: k === 5 }, String(k))));
  const version = h("select", { id: "predict-version" }, h("option", { value: "" }, "the served version"));
  const input = h("input", { type: "file", id: "predict-files", accept: ACCEPT, multiple: true, class: "visually-hidden" });
  const zone = h("label", { for: "predict-files", class: "dropzone", tabindex: "0", id: "dropzone" },
    h("strong", {}, "Drop images here"), h("span", {}, " or choose files; paste an image with Ctrl+V"),
    h("span", { class: "muted small" }, `JPEG, PNG or WebP, up to ${bytes(ctx.config.max_upload_bytes)} each`));
  const results = h("div", { class: "results", id: "predictions", "aria-live": "polite" });
  const clearButton = h("button", { type: "button", onclick: () => { revokeAll(); clear(results); } }, "Clear");

  root.append(h("section", { class: "card" },
    h("h2", {}, "Predict"),
    zone, input, labelList,
    h("div", { class: "row" }, h("label", { for: "top-k" }, "Top"), topK,
      ctx.signedIn() ? [h("label", { for: "predict-version" }, "Answer with"), version] : null, clearButton)),
  results);

  function revokeAll() { for (const u of urls) URL.revokeObjectURL(u); urls.clear(); }

  async function loadLabels() {
    if (!ctx.signedIn()) return;
    api("/v1/models").then((m) => {
      const names = m.versions.map((v) => v.version).sort((a, b) => Number(b.slice(1)) - Number(a.slice(1)));
      version.append(...names.map((n) => h("option", { value: n }, n === m.current ? `${n} (served)` : n)));
    }).catch(() => { /* the served version still answers */ });
    try {
      labels = Object.keys((await api("/v1/dataset")).labels).sort();
      clear(labelList, ...labels.map((l) => h("option", { value: l })));
    } catch { /* feedback still works with typed labels */ }
  }

  function feedbackForm(prediction) {
    const field = h("input", { type: "text", list: "known-labels", required: true, maxlength: "128",
      value: labels.includes(prediction.label) ? prediction.label : "", placeholder: "correct label",
      "aria-label": `Correct label for ${prediction.filename || "this image"}` });
    const note = h("span", { class: "small", role: "status" });
    const form = h("form", { class: "feedback row" }, field,
      h("button", { type: "submit" }, "Save label"), note);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const label = field.value.trim();
      if (!label) return;
      note.className = "small";
      note.textContent = "Saving…";
      try {
        const r = await api("/v1/feedback", { method: "POST", json: { prediction_id: prediction.prediction_id, label } });
        note.textContent = `Saved as “${r.label}” (${r.status})`;
        if (!labels.includes(r.label)) { labels.push(r.label); labelList.append(h("option", { value: r.label })); }
      } catch (err) {
        note.className = "small error";
        note.textContent = ctx.failed(err);
      }
    });
    return form;
  }

  async function classify(file, card) {
    const body = card.querySelector(".answer");
    const form = new FormData();
    form.append("files", file, file.name);
    try {
      const query = new URLSearchParams({ top_k: topK.value });
      if (version.value) query.set("version", version.value);
      const answer = await api(`/v1/predict?${query}`, { method: "POST", form });
      const p = answer.predictions[0];
      card.dataset.label = p.label;
      // Below the threshold (the version's, or the request's min_score) the answer is
      // `unknown`; the top-k bars still show what the model thought.
      card.classList.toggle("unknown", !!p.unknown);
      clear(body,
        h("p", { class: "verdict" }, h("strong", { class: "predicted-label" }, p.unknown ? "unknown" : p.label),
          p.unknown ? h("span", { class: "unknown-note" }, ` (below threshold ${pct(p.threshold)})`) : null,
          " ", h("span", { class: "muted small" }, `by ${answer.model_version}`)),
        h("div", { class: "bars" }, ...p.top_k.map((t) => bar(t.label, t.score))),
        ctx.signedIn() ? feedbackForm(p) : h("p", { class: "muted small" }, "Sign in to send the correct label back."));
    } catch (err) {
      card.classList.add("failed");
      clear(body, h("p", { class: "error", role: "alert" }, ctx.failed(err)));
    }
  }

  async function take(files) {
    files = [...files];
    if (!files.length) return;
    const jobs = files.map((file) => {
      const url = URL.createObjectURL(file);
      urls.add(url);
      const img = h("img", { src: url, alt: file.name || "pasted image", class: "thumb" });
      img.addEventListener("error", () => { img.replaceWith(h("div", { class: "thumb placeholder" }, "?")); });
      const card = h("article", { class: "card prediction" },
        img,
        h("div", { class: "body" },
          h("h3", { class: "filename", title: file.name }, file.name || "pasted image"),
          h("p", { class: "muted small" }, bytes(file.size)),
          h("div", { class: "answer" }, h("p", { class: "muted" }, "Classifying…"))));
      results.prepend(card);
      return [file, card];
    });
    while (results.children.length > MAX_CARDS) {
      const old = results.lastElementChild;
      const img = old.querySelector("img");
      if (img) { URL.revokeObjectURL(img.src); urls.delete(img.src); }
      old.remove();
    }
    await pool(jobs, 3, ([file, card]) => classify(file, card));
  }

  input.addEventListener("change", () => { take(input.files); input.value = ""; });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
  });
  const over = (event) => { event.preventDefault(); zone.classList.add("over"); };
  const leave = () => zone.classList.remove("over");
  const drop = (event) => {
    event.preventDefault();
    leave();
    take(event.dataTransfer.files);
  };
  // On the whole window while this view is up: a file dropped beside the zone must not make
  // the browser leave the page to show it.
  window.addEventListener("dragover", over);
  window.addEventListener("dragleave", leave);
  window.addEventListener("drop", drop);
  const paste = (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) { event.preventDefault(); take(files); }
  };
  document.addEventListener("paste", paste);
  loadLabels();
  return () => {
    document.removeEventListener("paste", paste);
    window.removeEventListener("dragover", over);
    window.removeEventListener("dragleave", leave);
    window.removeEventListener("drop", drop);
    revokeAll();
  };
}
