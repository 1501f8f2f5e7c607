// Review: the queue of uncertain predictions (GET /v1/review, most uncertain first) as a grid
// of thumbnails, one selected at a time. Keys: 1-9 label the selected image with the dataset's
// labels in the order shown, N (or /) types a new label, D dismisses, → or S skips, ← goes back.
// An action takes the image out of the grid at once and the next one is selected; if the API
// refuses, the image comes back with the API's error. The queue is refilled without a reload.
import { api, imageURL } from "./api.js";
import { h, clear, pct, isTyping, pool } from "./dom.js";
import { bar } from "./charts.js";

const PAGE = 60;

export function mount(root, ctx) {
  if (!ctx.signedIn()) { root.append(ctx.needSignIn("The review queue")); return; }
  let items = [];
  let selected = 0;
  let labels = [];
  let loading = false;
  let alive = true;
  const handled = new Set();
  const urls = new Map();

  const filter = h("input", { id: "review-filter", type: "text", list: "review-predicted", placeholder: "any", maxlength: "256" });
  const predictedList = h("datalist", { id: "review-predicted" });
  const order = h("select", { id: "review-order" },
    h("option", { value: "margin" }, "smallest margin"),
    h("option", { value: "entropy" }, "largest entropy"),
    h("option", { value: "score" }, "lowest score"));
  const count = h("span", { class: "muted", id: "review-count", role: "status" });
  const legend = h("p", { class: "legend", id: "review-keys" });
  const panel = h("section", { class: "card focus", id: "review-focus", "aria-live": "polite" });
  const grid = h("ul", { class: "grid", id: "review-grid", "aria-label": "Review queue" });

  root.append(
    h("section", { class: "card" },
      h("h2", {}, "Review"),
      h("form", { class: "row controls", onsubmit: (e) => { e.preventDefault(); reload(); } },
        h("label", { for: "review-filter" }, "Predicted label"), filter, predictedList,
        h("label", { for: "review-order" }, "Order"), order,
        h("button", { type: "submit" }, "Show"), count),
      legend),
    panel, grid);
  order.addEventListener("change", reload);

  function showLegend() {
    clear(legend, h("span", { class: "muted" }, "Keys: "),
      ...labels.slice(0, 9).map((l, i) => h("span", { class: "key-hint" }, h("kbd", {}, String(i + 1)), " ", l)),
      h("span", { class: "key-hint" }, h("kbd", {}, "N"), " new label"),
      h("span", { class: "key-hint" }, h("kbd", {}, "D"), " dismiss"),
      h("span", { class: "key-hint" }, h("kbd", {}, "→"), " skip"),
      h("span", { class: "key-hint" }, h("kbd", {}, "←"), " back"));
  }

  // One fetch per image however often the grid is drawn: id -> Promise of its object URL.
  function thumb(item) {
    const id = item.prediction_id;
    let url = urls.get(id);
    if (!url) {
      url = imageURL(item.image_url).then((u) => {
        if (!alive) { URL.revokeObjectURL(u); return null; }
        return u;
      });
      url.catch(() => urls.delete(id));
      urls.set(id, url);
    }
    return url;
  }

  function forget(id) {
    const url = urls.get(id);
    urls.delete(id);
    if (url) url.then((u) => u && URL.revokeObjectURL(u), () => {});
  }

  function image(item, cls) {
    const img = h("img", { class: cls, alt: `image predicted ${item.label}` });
    thumb(item).then((url) => { if (url) img.src = url; })
      .catch((err) => img.replaceWith(h("div", { class: `${cls} placeholder` }, ctx.failed(err))));
    return img;
  }

  function renderGrid() {
    clear(grid, ...items.map((item, i) => {
      const tile = h("button", { type: "button", class: `tile${i === selected ? " selected" : ""}`,
        "aria-pressed": i === selected ? "true" : "false", dataset: { id: item.prediction_id },
        onclick: () => { selected = i; render(); } },
      image(item, "thumb"),
      h("span", { class: "tile-label" }, item.label),
      h("span", { class: "muted small" }, pct(item.score, 0)));
      return h("li", {}, tile);
    }));
    count.textContent = `${items.length} waiting`;
  }

  function renderPanel(error) {
    const item = items[selected];
    if (!item) {
      clear(panel, h("h3", {}, "Nothing to review"),
        h("p", { class: "muted" }, "Predictions scored below the review threshold appear here."));
      return;
    }
    const newLabel = h("input", { type: "text", id: "review-new-label", list: "review-labels", maxlength: "128",
      placeholder: "new label", "aria-label": "Label this image as" });
    const labelList = h("datalist", { id: "review-labels" }, ...labels.map((l) => h("option", { value: l })));
    const form = h("form", { class: "row" }, newLabel, labelList, h("button", { type: "submit" }, "Label"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const label = newLabel.value.trim();
      if (label) act(item, "label", label);
    });
    newLabel.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { newLabel.value = ""; newLabel.blur(); }
    });
    clear(panel,
      image(item, "large"),
      h("div", { class: "body" },
        h("h3", {}, "Predicted ", h("strong", {}, item.label), " ", h("span", { class: "muted small" },
          `${pct(item.score)} by ${item.model_version}, margin ${pct(item.margin)}`)),
        item.filename ? h("p", { class: "muted small" }, item.filename) : null,
        h("div", { class: "bars" }, ...item.top_k.map((t) => bar(t.label, t.score))),
        h("div", { class: "choices", role: "group", "aria-label": "Label as" },
          ...labels.slice(0, 9).map((l, i) => h("button", { type: "button", class: "choice", onclick: () => act(item, "label", l) },
            h("kbd", {}, String(i + 1)), " ", l))),
        form,
        h("div", { class: "row" },
          h("button", { type: "button", onclick: () => act(item, "dismiss") }, h("kbd", {}, "D"), " Dismiss"),
          h("button", { type: "button", onclick: () => move(1) }, "Skip ", h("kbd", {}, "→"))),
        error ? h("p", { class: "error", role: "alert" }, error) : null));
  }

  function render(error) { renderGrid(); renderPanel(error); }

  function move(step) {
    if (!items.length) return;
    selected = Math.max(0, Math.min(items.length - 1, selected + step));
    render();
    grid.querySelector(".selected")?.scrollIntoView({ block: "nearest" });
  }

  async function act(item, kind, label) {
    const at = items.indexOf(item);
    if (at < 0) return;
    handled.add(item.prediction_id);
    items.splice(at, 1);
    selected = Math.min(at, Math.max(0, items.length - 1));
    render();
    if (items.length < 5) refill();
    try {
      if (kind === "label") {
        const r = await api("/v1/feedback", { method: "POST", json: { prediction_id: item.prediction_id, label } });
        ctx.say(`Labelled “${r.label}” (${r.status}).`);
        if (!labels.includes(r.label)) { labels.push(r.label); showLegend(); }
      } else {
        await api(`/v1/review/${encodeURIComponent(item.prediction_id)}/dismiss`, { method: "POST" });
        ctx.say("Dismissed.");
      }
      forget(item.prediction_id);
    } catch (err) {
      handled.delete(item.prediction_id);
      const again = items.findIndex((i) => i.prediction_id === item.prediction_id);
      if (again >= 0) items.splice(again, 1); // a refill brought it back meanwhile
      const back = Math.min(at, items.length);
      items.splice(back, 0, item);
      selected = back;
      render(ctx.failed(err));
    }
  }

  async function fetchQueue() {
    const params = new URLSearchParams({ limit: String(PAGE), order: order.value });
    if (filter.value.trim()) params.set("label", filter.value.trim());
    return (await api(`/v1/review?${params}`)).items.filter((i) => !handled.has(i.prediction_id));
  }

  async function refill() {
    if (loading) return;
    loading = true;
    try {
      const queue = await fetchQueue();
      const known = new Set(items.map((i) => i.prediction_id));
      const more = queue.filter((i) => !known.has(i.prediction_id) && !handled.has(i.prediction_id));
      if (more.length && alive) { items.push(...more); render(); }
    } catch { /* the next action tries again */ } finally { loading = false; }
  }

  async function reload() {
    loading = true;
    try {
      const [queue, dataset] = await Promise.all([fetchQueue(), api("/v1/dataset")]);
      if (!alive) return;
      labels = Object.keys(dataset.labels).sort();
      items = queue;
      selected = 0;
      const seen = [...new Set(items.map((i) => i.label))].sort();
      if (!filter.value) clear(predictedList, ...seen.map((l) => h("option", { value: l })));
      showLegend();
      render();
      pool(items.slice(0, 24), 4, (item) => thumb(item).catch(() => null));
    } catch (err) {
      clear(panel, h("p", { class: "error", role: "alert" }, ctx.failed(err)));
    } finally { loading = false; }
  }

  const keys = (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || isTyping(document.activeElement)) return;
    if (document.querySelector("dialog[open]")) return;
    const item = items[selected];
    if (/^[1-9]$/.test(event.key)) {
      const label = labels[Number(event.key) - 1];
      if (item && label) { event.preventDefault(); act(item, "label", label); }
    } else if (event.key === "n" || event.key === "N" || event.key === "/") {
      event.preventDefault();
      document.getElementById("review-new-label")?.focus();
    } else if ((event.key === "d" || event.key === "D" || event.key === "Delete") && item) {
      event.preventDefault();
      act(item, "dismiss");
    } else if (event.key === "ArrowRight" || event.key === "s" || event.key === "S") {
      event.preventDefault();
      move(1);
    } else if (event.key === "ArrowLeft") {
      event.preventDefault();
      move(-1);
    }
  };
  document.addEventListener("keydown", keys);
  reload();
  return () => {
    alive = false;
    document.removeEventListener("keydown", keys);
    for (const id of [...urls.keys()]) forget(id);
  };
}
