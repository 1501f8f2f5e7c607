// Charts drawn as SVG (no library): line charts for training curves, bars for scores.
import { h, s, pct } from "./dom.js";

const W = 360, H = 190, PAD = { l: 42, r: 10, t: 10, b: 30 };

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// series: [{name, cls, points: [[x, y], ...]}]; options: {title, yMax (fixed top, e.g. 1),
// xLabel, percent (format y as %)}. -> an <figure> with the SVG and a legend.
export function lineChart(series, { title, yMax, xLabel = "epoch", percent = false } = {}) {
  const all = series.flatMap((x) => x.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const xMax = Math.max(1, ...all.map(([x]) => x));
  const xMin = Math.min(xMax, ...all.map(([x]) => x));
  const top = yMax ?? niceMax(Math.max(0, ...all.map(([, y]) => y)));
  const sx = (x) => PAD.l + ((x - xMin) / Math.max(1e-9, xMax - xMin)) * (W - PAD.l - PAD.r);
  const sy = (y) => H - PAD.b - (y / top) * (H - PAD.t - PAD.b);
  const fmt = (y) => (percent ? `${Math.round(y * 100)}%` : Number(y.toPrecision(2)).toString());
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
    "aria-label": `${title}: ${series.map((x) => `${x.name} ${x.points.length ? fmt(x.points.at(-1)[1]) : "none yet"}`).join(", ")}` });
  for (let i = 0; i <= 4; i++) {
    const y = (top * i) / 4;
    svg.append(s("line", { x1: PAD.l, x2: W - PAD.r, y1: sy(y), y2: sy(y), class: "grid" }),
      s("text", { x: PAD.l - 4, y: sy(y) + 4, class: "tick", "text-anchor": "end", text: fmt(y) }));
  }
  const xs = [...new Set(all.map(([x]) => x))].sort((a, b) => a - b);
  const step = Math.max(1, Math.ceil(xs.length / 8));
  xs.filter((_, i) => i % step === 0).forEach((x) =>
    svg.append(s("text", { x: sx(x), y: H - PAD.b + 14, class: "tick", "text-anchor": "middle", text: x })));
  svg.append(s("text", { x: (W + PAD.l) / 2, y: H - 2, class: "tick", "text-anchor": "middle", text: xLabel }));
  for (const line of series) {
    const pts = line.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (!pts.length) continue;
    svg.append(s("polyline", { points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), class: `line ${line.cls}` }));
    for (const [x, y] of pts) svg.append(s("circle", { cx: sx(x), cy: sy(y), r: 2.5, class: `dot ${line.cls}` }));
  }
  return h("figure", { class: "chart-box" },
    h("figcaption", {}, title, " ",
      ...series.map((x) => h("span", { class: `key ${x.cls}` }, x.name))),
    svg);
}

// Training curves of a job's or a manifest's per-epoch metrics -> [loss chart, accuracy chart].
export function curves(metrics) {
  const pick = (key) => (metrics || []).map((m) => [Number(m.epoch), Number(m[key])]);
  return [
    lineChart([{ name: "train", cls: "s1", points: pick("train_loss") },
      { name: "validation", cls: "s2", points: pick("val_loss") }], { title: "Loss" }),
    lineChart([{ name: "train", cls: "s1", points: pick("train_accuracy") },
      { name: "validation", cls: "s2", points: pick("val_accuracy") }], { title: "Accuracy", yMax: 1, percent: true }),
  ];
}

// One horizontal bar: label, a filled track, the value as text.
export function bar(label, value, { cls = "", text } = {}) {
  const fill = h("span", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, value || 0)) * 100}%`;
  return h("div", { class: `bar ${cls}` },
    h("span", { class: "bar-label", title: label }, label),
    h("span", { class: "track", "aria-hidden": "true" }, fill),
    h("span", { class: "bar-value" }, text ?? pct(value)));
}
