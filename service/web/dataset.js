// Dataset: counts per label and how many are new since the last job; per label a page of
// thumbnails (GET /v1/dataset/labels/{label}/images) with "Remove" on each; upload a folder's
// (or any picked) images under one label, one image per request so that each refused file
// shows its own error.
import { api, imageURL } from "./api.js";
import { h, clear, pool } from "./dom.js";

const SAMPLE = 12;

export function mount(root, ctx) {
  if (!ctx.signedIn()) { root.append(ctx.needSignIn("The dataset")); return; }
  let alive = true;
  const urls = new Set();
  const summary = h("p", { id: "dataset-summary", role: "status" });
  const table = h("div", { class: "labels", id: "dataset-labels" });
  const labelInput = h("input", { id: "upload-label", type: "text", required: true, maxlength: "128", list: "dataset-label-list", placeholder: "label" });
  const labelList = h("datalist", { id: "dataset-label-list" });
  const folder = h("input", { id: "upload-folder", type: "file", multiple: true, webkitdirectory: true });
  const picked = h("input", { id: "upload-files", type: "file", multiple: true, accept: "image/jpeg,image/png,image/webp" });
  const progress = h("progress", { id: "upload-progress", max: "1", value: 0, hidden: true });
  const report = h("div", { id: "upload-report", class: "report", "aria-live": "polite" });
  const form = h("form", { class: "card upload", id: "upload-form" },
    h("h3", {}, "Add labelled images"),
    h("div", { class: "fields" },
      h("label", { for: "upload-label" }, "Label"), labelInput, labelList,
      h("label", { for: "upload-folder" }, "A folder"), folder,
      h("label", { for: "upload-files" }, "or images"), picked),
    h("div", { class: "row" }, h("button", { type: "submit", class: "primary" }, "Upload"), progress),
    report);
  root.append(h("section", { class: "card" }, h("h2", {}, "Dataset"), summary, table), form);

  function forgetImages() { for (const u of urls) URL.revokeObjectURL(u); urls.clear(); }

  async function samples(label, box, offset = 0) {
    clear(box, h("p", { class: "muted small" }, "Loading images…"));
    let page;
    try {
      page = await api(`/v1/dataset/labels/${encodeURIComponent(label)}/images?offset=${offset}&limit=${SAMPLE}`);
    } catch (err) {
      clear(box, h("p", { class: "error small" }, `Images cannot be listed: ${ctx.failed(err)}`));
      return;
    }
    const images = page.images || [];
    const tiles = images.map((img) => {
      const pic = h("img", { class: "thumb", alt: `${label} ${img.sha256.slice(0, 12)}` });
      const remove = h("button", { type: "button", class: "small danger", "aria-label": `Remove image ${img.sha256.slice(0, 12)} from ${label}` }, "Remove");
      remove.addEventListener("click", async () => {
        if (remove.dataset.armed !== "1") {
          remove.dataset.armed = "1";
          remove.textContent = "Remove?";
          return;
        }
        remove.disabled = true;
        try {
          await api(`/v1/labels/${encodeURIComponent(img.sha256)}`, { method: "DELETE" });
          tile.remove();
          ctx.say(`Removed ${img.sha256.slice(0, 12)} from “${label}”.`);
          load();
        } catch (err) {
          remove.disabled = false;
          tile.append(h("span", { class: "error small" }, ctx.failed(err)));
        }
      });
      const tile = h("figure", { class: "sample", dataset: { sha256: img.sha256 } }, pic,
        h("figcaption", { class: "small muted" }, img.sha256.slice(0, 10)), remove);
      return [tile, pic, img];
    });
    const more = page.total !== undefined ? offset + images.length < page.total : images.length === SAMPLE;
    clear(box, h("div", { class: "samples" }, ...tiles.map(([t]) => t)),
      h("div", { class: "row" },
        offset > 0 ? h("button", { type: "button", onclick: () => samples(label, box, Math.max(0, offset - SAMPLE)) }, "Previous") : null,
        more ? h("button", { type: "button", onclick: () => samples(label, box, offset + SAMPLE) }, "Next") : null));
    pool(tiles, 4, async ([, pic, img]) => {
      const src = img.thumbnail_url || img.image_url;
      if (!src) return;
      try {
        const url = await imageURL(src);
        if (!alive) { URL.revokeObjectURL(url); return; }
        urls.add(url);
        pic.src = url;
      } catch { pic.replaceWith(h("div", { class: "thumb placeholder" }, "?")); }
    });
  }

  async function load() {
    let data;
    try {
      data = await api("/v1/dataset");
    } catch (err) {
      clear(summary, h("span", { class: "error" }, ctx.failed(err)));
      return;
    }
    if (!alive) return;
    forgetImages();
    const entries = Object.entries(data.labels).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
    const most = Math.max(1, ...entries.map(([, n]) => n));
    summary.textContent = `${data.total} images in ${entries.length} labels; ${data.new_since_last_job} new since the last training job.`;
    clear(labelList, ...entries.map(([l]) => h("option", { value: l })));
    if (!entries.length) {
      clear(table, h("p", { class: "muted" }, "No labelled images yet: upload some below, or label predictions in Review."));
      return;
    }
    clear(table, ...entries.map(([label, n]) => {
      const box = h("div", { class: "sample-box" });
      const fill = h("span", { class: "fill" });
      fill.style.width = `${(n / most) * 100}%`;
      const details = h("details", { class: "label-row", dataset: { label } },
        h("summary", {}, h("span", { class: "label-name" }, label),
          h("span", { class: "track", "aria-hidden": "true" }, fill),
          h("span", { class: "label-count" }, String(n))),
        box);
      details.addEventListener("toggle", () => { if (details.open && !box.childElementCount) samples(label, box); });
      return details;
    }));
    const first = table.querySelector("details");
    if (first && entries.length <= 6) first.open = true;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const label = labelInput.value.trim();
    const all = [...folder.files, ...picked.files];
    const files = all.filter((f) => !f.name.startsWith("."));
    if (!label || !files.length) {
      clear(report, h("p", { class: "error" }, !label ? "Name the label first." : "Choose a folder or images first."));
      return;
    }
    const counts = { added: 0, duplicate: 0, relabelled: 0 };
    const problems = [];
    progress.hidden = false;
    progress.max = files.length;
    progress.value = 0;
    clear(report, h("p", {}, `Uploading ${files.length} file(s) under “${label}”…`));
    await pool(files, 3, async (file) => {
      const body = new FormData();
      body.append("label", label);
      body.append("files", file, file.name);
      try {
        const r = await api("/v1/labels", { method: "POST", form: body });
        for (const x of r.results) counts[x.status] = (counts[x.status] || 0) + 1;
      } catch (err) {
        problems.push([file.webkitRelativePath || file.name, ctx.failed(err)]);
      }
      progress.value += 1;
    });
    progress.hidden = true;
    clear(report,
      h("p", { id: "upload-result" }, `${counts.added} added, ${counts.duplicate} already there, ${counts.relabelled} relabelled` +
        (problems.length ? `, ${problems.length} refused:` : ".")),
      problems.length ? h("ul", { class: "problems" }, ...problems.map(([name, why]) =>
        h("li", {}, h("strong", {}, name), ": ", h("span", { class: "error" }, why)))) : null);
    folder.value = "";
    picked.value = "";
    load();
  });

  load();
  return () => { alive = false; forgetImages(); };
}
