"""The README's performance table, rendered from benchmarks/results/*.json.

    python -m benchmarks.readme            # rewrite the table in README.md
    python -m benchmarks.readme --check    # exit 1, naming the difference, if they disagree

Every figure in the README's "## Performance" section comes from a results file that a
benchmark run wrote: the table between the markers `<!-- perf-table -->` and
`<!-- /perf-table -->` is made here from those files, each row naming its results file (with
the run's date) and the command that writes it, and nothing else in that section may quote a
measured figure (`--check` also fails on a number with a unit of measure there, outside the
markers). A results file that is missing, or older than the shape read here, gives a row that
says so and names the command to run: nothing is typed in. `make bench` runs every benchmark
and then this; tests/test_readme_figures.py runs `--check`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- perf-table -->", "<!-- /perf-table -->"
SECTION = "## Performance"
# A measured figure in prose: a number followed by a unit this section measures in.
FIGURE = re.compile(r"\d[\d.,]*\s*(?:ms|s\b|img/s|images/s|MiB|GiB|MB|KiB|kB|%|\u00d7)")

Row = tuple[str, str]
X = "\u00d7"  # the multiplication sign the README writes ratios with


def num(v: Any) -> str:
    """A figure as the README shows it: as stored when it is an int or has few digits, else
    rounded to what a reader can compare (3 significant digits, no exponent above 1)."""
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.2g}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else ("es" if word.endswith("s") else "s"))


def goal(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "not met")


# -- one renderer per results file: results dict -> rows (what, measured) ------------------------

UNITS = (("images_per_s", " img/s"), ("ms_per_image", " ms/image"), ("_ms", " ms"),
         ("_s", " s"), ("ratio", X))


def figure(key: str, value: Any) -> str:
    """One numeric field of a results row as `name value unit`, the unit read from the key's
    name: `p50_ms` -> "p50 15.9 ms", `images_per_s` -> "101 img/s", `ratio` -> a ratio."""
    for suffix, unit in UNITS:
        if key.endswith(suffix):
            name = key[:-len(suffix)].replace("_", " ").strip()
            return f"{name} {num(value)}{unit}".strip()
    return f"{key.replace('_', ' ')} {num(value)}"


LABELS = ("variant", "pipeline", "engine", "processes", "threads", "batch")


def described(row: dict[str, Any]) -> str:
    """One results row as `label: figure, figure, ...`."""
    label = ", ".join(f"{row[k]}" if k in ("variant", "pipeline", "engine") else f"{k} {row[k]}"
                      for k in LABELS if k in row)
    figures = [figure(k, v) if isinstance(v, (int, float)) else f"{k.replace('_', ' ')} {v}"
               for k, v in row.items() if k not in (*LABELS, "section") and v is not None]
    return f"{label}: {', '.join(figures)}"


def pipeline_rows(r: dict[str, Any]) -> list[Row]:
    best = r["best_layout"]
    lat = r["latency_batch1"]
    p50 = lat["p50_ms"] if "p50_ms" in lat else min(v["p50_ms"] for v in lat.values())
    layouts = [t for t in r["table"] if t["section"] == "layout"]
    rows: list[Row] = [(
        "best in-process pipeline (decode + preprocess + forward)",
        f"{best['engine']}, {plural(best['processes'], 'process')} {X} "
        f"{plural(best['threads'], 'thread')}, batch {best['batch']}: "
        f"{num(best['images_per_s'])} img/s (best of {len(layouts)} layouts); batch-1 p50 "
        f"{num(p50)} ms at 1 thread")]
    sections: dict[str, list[dict[str, Any]]] = {}
    for t in r["table"]:
        if t["section"] != "layout":
            sections.setdefault(t["section"], []).append(t)
    rows += [(name, "; ".join(described(t) for t in rows_))
             for name, rows_ in sections.items()]
    return rows


def _served(t: dict[str, Any]) -> str:
    return f"{num(t['images_per_s'])} img/s (p50 {num(t['p50_ms'])} ms)"


def _mem(m: dict[str, Any]) -> str:
    replicas = ", ".join(f"{num(x)}" for x in m["replica_rss_mib"])
    return (f"API replica RSS {replicas} MiB; whole service ({m['processes']} processes) "
            f"PSS {num(m['service_pss_mib'])} MiB, RSS {num(m['service_rss_mib'])} MiB")


def _layout_rows(r: dict[str, Any], front: str) -> list[Row]:
    table = [t for t in r["table"] if t["section"] == f"ours, {front}"]
    noop = [t for t in table if "no-op" in t["layout"]]
    layouts = [t for t in table if "no-op" not in t["layout"]]
    out = []
    if noop:
        by = {t["clients"]: t for t in noop}
        out.append((f"Serve front end alone ({front}, no-op handler, same HTTP path)",
                    f"1 client {_served(by[1])}; 16 clients {num(by[16]['images_per_s'])} "
                    f"img/s"))
    names = list(dict.fromkeys(t["layout"] for t in layouts))
    parts = []
    for name in names:
        by = {t["clients"]: t for t in layouts if t["layout"] == name}
        parts.append(f"{name}: {num(by[16]['images_per_s'])} img/s at 16 clients "
                     f"({num(by[16]['vs_in_process'])}{X} in-process), 1-client p50 "
                     f"{num(by[1]['p50_ms'])} ms (+{num(by[1]['added_p50_ms'])})")
    if parts:
        out.append((f"served layouts ({front})", "; ".join(parts)))
    reload = r.get("reload")
    if reload:
        out.append((f"hot reload under load ({front}, 2 replicas, 4 clients)",
                    f"every replica on the new version {num(reload['swap_s'])} s after "
                    f"`CURRENT` changed; {reload['failed_requests']} failed of "
                    f"{reload['requests']} requests"))
    return out


def serving_rows(r: dict[str, Any]) -> list[Row]:
    s = r["summary"]
    d = s["defaults"]
    g = s["goals"]
    table = r["table"]
    ours = {t["clients"]: t for t in table if t["section"] == "ours, defaults"}
    rows: list[Row] = [
        ("in-process limit, same run", f"{num(s['in_process_images_per_s'])} img/s "
         f"({table[0]['layout']}); batch-1 p50 {num(s['in_process_batch1_p50_ms'])} ms"),
        (f"served with the defaults ({d['layout']}), 16 clients",
         f"{num(d['images_per_s_16'])} img/s: {num(d['vs_in_process'])}{X} the in-process limit "
         f"(goal ≥ 0.8: {goal(g['served_vs_in_process_at_least_0.8'])}), "
         + (f"{num(d['vs_best_peer'])}{X} the best peer" if d["vs_best_peer"] is not None
            else "no peer measured")
         + f" (goal ≥ 2: {goal(g['served_vs_best_peer_at_least_2'])}); p50 "
         f"{num(ours[16]['p50_ms'])} ms, p99 {num(ours[16]['p99_ms'])} ms, "
         f"{ours[16]['failed']} failed"),
        ("served with the defaults, 1 client",
         f"p50 {num(d['p50_ms_1'])} ms: {'+' if d['added_p50_ms'] >= 0 else ''}"
         f"{num(d['added_p50_ms'])} ms over the in-process batch-1 p50 (goal ≤ 5 ms: "
         f"{goal(g['added_p50_at_most_5_ms'])})"),
    ]
    for peer in sorted({t["layout"].split(",")[0] for t in table if t["section"] == "peer"}):
        prow = [t for t in table if t["section"] == "peer"
                and t["layout"].split(",")[0] == peer]
        if "not_measured" in prow[0]:
            rows.append((f"peer: {peer}", f"not measured: {prow[0]['not_measured']}"))
            continue
        by = {t["clients"]: t for t in prow}
        layout = prow[0]["layout"].split(",", 1)[1].strip()
        rows.append((f"peer: {peer} ({layout}), same model, images and load",
                     "; ".join(f"{c} client{'s' if c > 1 else ''} {_served(by[c])}"
                               for c in sorted(by))))
    rows += [
        ("cold start: `visionloop up` to the first answered predict",
         f"{num(d['cold_start_s'])} s"),
        ("memory at idle", _mem(d["memory"]["idle"])),
        ("memory under 16 clients (peak)", _mem(d["memory"]["under_16_clients"])),
    ]
    cpu, pipe = d.get("cpu_ms_per_request_16_clients"), d.get("pipeline_cpu_ms_per_image")
    if cpu and pipe:  # files written before the breakdown existed have neither
        in_pipeline = sum(pipe.values())
        rows.append((
            "where the CPU goes with the defaults, 16 clients (CPU ms per answered request)",
            "; ".join(f"{g} {num(v)}" for g, v in cpu.items() if g != "total")
            + f"; total {num(cpu['total'])}. The in-process pipeline: "
            + ", ".join(f"{k} {num(v)}" for k, v in pipe.items())
            + f" = {num(in_pipeline)} per image, so the API replicas spend "
            f"{num(cpu['API replicas'] - in_pipeline)} ms per request on HTTP, Serve and the "
            "app"))
    return rows + _layout_rows(r, r["front_end"])


def serving_front_end_rows(r: dict[str, Any]) -> list[Row]:
    """`benchmarks.serving --front-end X`: the layouts on the other front end."""
    s = r["summary"]
    return [(f"in-process limit, same run as the {r['front_end']} rows",
             f"{num(s['in_process_images_per_s'])} img/s ({r['table'][0]['layout']}); "
             f"batch-1 p50 {num(s['in_process_batch1_p50_ms'])} ms"),
            *_layout_rows(r, r["front_end"])]


def training_rows(r: dict[str, Any]) -> list[Row]:
    sec: dict[str, list[dict[str, Any]]] = {}
    for t in r["table"]:
        sec.setdefault(t["section"], []).append(t)
    plain, ray = sec["ray-vs-plain"][0], sec["ray-vs-plain"][1]
    files, decoded = sec["input"][0], sec["input"][1]
    full, cached = sec["feature-cache"][0], sec["feature-cache"][1]
    return [
        ("training: Ray Train against the plain PyTorch loop",
         f"{ray['variant']}: {num(ray['images_per_s'])} img/s, {num(ray['ratio'])}{X} the "
         f"{plain['variant']} ({num(plain['images_per_s'])}); Ray startup "
         f"{num(ray['startup_s'])} s and job overhead {num(ray['job_overhead_s'])} s not "
         f"included"),
        ("training: is JPEG decoding the bottleneck?",
         f"{decoded['variant']}: {num(decoded['images_per_s'])} img/s against "
         f"{num(files['images_per_s'])} from {files['variant']}"),
        ("feature-extract retrain: cached features",
         f"{cached['variant']}: {num(cached['seconds'])} s against {num(full['seconds'])} s "
         f"with the {full['variant']} ({num(cached['ratio'])}{X} faster); best val accuracy "
         f"{num(cached['best_val_accuracy'])} vs {num(full['best_val_accuracy'])}"),
    ]


def retrain_rows(r: dict[str, Any]) -> list[Row]:
    """One row per tree measured: `POST /v1/train` to the new version answering, by stage."""
    trees: dict[str, list[dict[str, Any]]] = {}
    for t in r["table"]:
        trees.setdefault(t["tree"], []).append(t)
    return [(f"time to a new model ({r['images']} images, {r['epochs']} epochs), {tree}",
             f"{num(stages[-1]['at_s'])} s from `POST /v1/train` to the new version "
             f"answering: " + ", ".join(f"{t['stage']} {num(t['stage_s'])} s" for t in stages))
            for tree, stages in trees.items()]


def predict_dir_rows(r: dict[str, Any]) -> list[Row]:
    return [("batch prediction: " + " ".join(str(t["path"]).split()),
             f"{t['layout']}: {t['images']} images, {num(t['images_per_s'])} img/s "
             f"({num(t['ratio'])}{X}), {t['failed']} failed") for t in r["table"]]


def web_rows(r: dict[str, Any]) -> list[Row]:
    by = {t["page_load"]: t for t in r["table"]}
    return [("web page", f"{r['page_bytes']} bytes ({r['page_gzip_bytes']} gzipped), "
             f"{r['requests_per_load']} requests per load; first contentful paint "
             f"{num(by['cold']['first_contentful_paint_ms'])} ms cold, "
             f"{num(by['warm']['first_contentful_paint_ms'])} ms warm; load "
             f"{num(by['cold']['load_ms'])} / {num(by['warm']['load_ms'])} ms")]


# (results file stem, the command that writes it, renderer), in the table's order.
SOURCES: list[tuple[str, str, Callable[[dict[str, Any]], list[Row]]]] = [
    ("pipeline", "python -m benchmarks.pipeline", pipeline_rows),
    ("serving", "python -m benchmarks.serving", serving_rows),
    ("serving-python-proxy", "python -m benchmarks.serving --front-end python-proxy",
     serving_front_end_rows),
    ("serving-haproxy", "python -m benchmarks.serving --front-end haproxy",
     serving_front_end_rows),
    ("training", "python -m benchmarks.training", training_rows),
    ("retrain", "python -m benchmarks.retrain", retrain_rows),
    ("predict_dir", "python -m benchmarks.predict_dir", predict_dir_rows),
    ("web", "python -m benchmarks.web", web_rows),
]
# rendered only when their benchmark exists (retrain) or when they were run (the Python proxy
# on its own: `benchmarks.serving`'s own layouts already run on it, and `make bench` runs
# HAProxy, the front end of `visionloop up`, as the other front end)
OPTIONAL = {"retrain", "serving-python-proxy"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: Path = RESULTS) -> str:
    """The block between the markers: a line on the machines, then the table."""
    rows: list[str] = []
    machines: dict[str, list[str]] = {}
    for stem, command, renderer in SOURCES:
        path = results / f"{stem}.json"
        source = f"`benchmarks/results/{stem}.json`"
        if not path.exists():
            if stem in OPTIONAL and (stem == "serving-python-proxy" or not (
                    Path(__file__).parent / f"{stem}.py").exists()):
                continue
            rows.append(f"| {stem} | not measured: no results file yet | {source} | "
                        f"`{command}` |")
            continue
        data = json.loads(path.read_text())
        day = dt.datetime.fromtimestamp(data["time"], dt.UTC).strftime("%Y-%m-%d")
        source += f", {day}" + (", a --quick run" if data.get("quick") else "")
        m = data.get("machine", {})
        machines.setdefault(
            f"{m.get('cpu_count')}-core {m.get('processor')}, "
            + (f"GPU {m['cuda']}" if m.get("cuda") else "no GPU")
            + f", Python {m.get('python')}, torch {m.get('torch')}", []).append(stem)
        try:
            made = renderer(data)
        except (KeyError, IndexError, StopIteration, TypeError, ValueError) as exc:
            made = [(stem, f"not rendered: the file predates this table's shape "
                           f"({type(exc).__name__}: {exc}); rerun the command")]
        rows += [f"| {_cell(what)} | {_cell(measured)} | {source} | `{command}` |"
                 for what, measured in made]
    where = "; ".join(f"{m} ({', '.join(stems)})" for m, stems in machines.items())
    return "\n".join([
        f"Measured on: {where or 'nothing yet'}. Each baseline is measured in the same run "
        "as what it is compared with. Rendered by `python -m benchmarks.readme` from the "
        "results files named in each row; full tables: `benchmarks/results/*.md`.",
        "",
        "| what | measured | results file | command |",
        "|---|---|---|---|",
        *rows,
    ])


def section(readme_text: str) -> str:
    """The text of the "## Performance" section (to the next "## " heading)."""
    start = readme_text.index(SECTION)
    nxt = readme_text.find("\n## ", start + len(SECTION))
    return readme_text[start:nxt if nxt >= 0 else len(readme_text)]


def split(readme_text: str) -> tuple[str, str, str]:
    """(before the table, the table, after it); ValueError when the markers are missing."""
    perf = section(readme_text)
    if BEGIN not in perf or END not in perf:
        raise ValueError(f"README.md's {SECTION!r} section lacks the markers {BEGIN} / {END}")
    a = readme_text.index(BEGIN) + len(BEGIN)
    b = readme_text.index(END)
    return readme_text[:a], readme_text[a:b].strip("\n"), readme_text[b:]


def prose_figures(readme_text: str) -> list[str]:
    """Measured figures in the Performance section outside the rendered table."""
    perf = section(readme_text)
    outside = perf[:perf.index(BEGIN)] + perf[perf.index(END):] if BEGIN in perf else perf
    return [m.group(0) for m in FIGURE.finditer(outside)]


def problems(readme_text: str, results: Path = RESULTS) -> list[str]:
    """What makes README and results disagree: a unified diff of the table, figures quoted
    in prose. Empty when they agree."""
    out = []
    try:
        _, table, _ = split(readme_text)
    except ValueError as exc:
        return [str(exc)]
    want = render(results)
    if table != want:
        diff = difflib.unified_diff(table.splitlines(), want.splitlines(), "README.md",
                                    "rendered from benchmarks/results", lineterm="", n=0)
        out.append("the README's performance table differs from the results files "
                   "(run `python -m benchmarks.readme`):\n" + "\n".join(diff))
    figures = prose_figures(readme_text)
    if figures:
        out.append(f"figures in the {SECTION!r} prose outside the rendered table (render "
                   f"them or remove them): {', '.join(figures)}")
    return out


def write(readme: Path = README, results: Path = RESULTS) -> bool:
    """Rewrite the table in `readme`; -> whether it changed."""
    text = readme.read_text()
    before, table, after = split(text)
    new = render(results)
    if new == table:
        return False
    readme.write_text(f"{before}\n{new}\n{after}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="exit 1, naming the difference, when README and results disagree")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.check:
        found = problems(args.readme.read_text(), args.results)
        _print(found, sys.stderr)
        return 1 if found else 0
    changed = write(args.readme, args.results)
    print(f"{args.readme}: performance table {'rewritten' if changed else 'unchanged'}")
    return 0


def _print(lines: Iterable[str], stream: Any) -> None:
    for line in lines:
        print(line, file=stream)


if __name__ == "__main__":
    sys.exit(main())
