"""The web page's weight and first paint on the local service.

Serves the real app (in-process classifier, a temporary volume with v0) over loopback, as
tests/web do, and loads `/` in Debian's headless chromium: `--cold` loads, each in a fresh
browser context (nothing cached), then `--warm` reloads in one context (the browser revalidates
each file: 304s). From the Performance API: first paint, first contentful paint,
DOMContentLoaded and load, in ms from navigation start; every file of the page with its size on
disk, gzip size and bytes transferred. Writes benchmarks/results/web.json and web.md.

    .venv/bin/python -m benchmarks.web [--cold 10] [--warm 5]
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import write_results
from service.api.routes.web import WEB_DIR

BUDGET_ASSET_BYTES = 200 * 1024
BUDGET_FIRST_PAINT_MS = 1000.0


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": round(statistics.median(ordered), 1), "min": round(ordered[0], 1),
            "max": round(ordered[-1], 1)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", type=int, default=10, help="loads in fresh contexts")
    parser.add_argument("--warm", type=int, default=5, help="reloads in one context")
    args = parser.parse_args(argv)

    from tests.web.server import browser_missing, chromium, first_paint, serve_volume

    missing = browser_missing()
    if missing:
        raise SystemExit(f"cannot measure the page: {missing}")
    files = {p.name: {"bytes": p.stat().st_size,
                      "gzip_bytes": len(gzip.compress(p.read_bytes(), 9))}
             for p in sorted(WEB_DIR.iterdir())}
    with tempfile.TemporaryDirectory() as tmp:
        service = serve_volume(Path(tmp) / "home")
        try:
            with chromium() as browser:
                cold = []
                for _ in range(args.cold):
                    context = browser.new_context()
                    cold.append(first_paint(context.new_page(), service.url + "/"))
                    context.close()
                context = browser.new_context()
                page = context.new_page()
                first_paint(page, service.url + "/")
                warm = [first_paint(page, service.url + "/") for _ in range(args.warm)]
                context.close()
        finally:
            service.stop()
    metrics = ("first_paint_ms", "first_contentful_paint_ms", "dom_content_loaded_ms", "load_ms")
    results: dict[str, Any] = {
        "budgets": {"asset_bytes": BUDGET_ASSET_BYTES, "first_paint_ms": BUDGET_FIRST_PAINT_MS},
        "files": files, "page_bytes": sum(f["bytes"] for f in files.values()),
        "page_gzip_bytes": sum(f["gzip_bytes"] for f in files.values()),
        "largest_file": max(files.items(), key=lambda kv: kv[1]["bytes"]),
        "cold": {m: summary([r[m] for r in cold]) for m in metrics},
        "warm": {m: summary([r[m] for r in warm]) for m in metrics},
        "cold_transfer_bytes": summary([float(sum(x["transfer_bytes"] for x in r["resources"]))
                                        for r in cold]),
        "warm_transfer_bytes": summary([float(sum(x["transfer_bytes"] for x in r["resources"]))
                                        for r in warm]),
        "requests_per_load": len(cold[0]["resources"]),
        "resources_first_load": cold[0]["resources"],
    }
    results["within_budget"] = (
        all(f["bytes"] < BUDGET_ASSET_BYTES for f in files.values())
        and results["cold"]["first_paint_ms"]["max"] < BUDGET_FIRST_PAINT_MS)
    table = [{"page_load": kind, **{m: results[kind][m]["median"] for m in metrics},
              "transfer_bytes": results[f"{kind}_transfer_bytes"]["median"],
              "runs": n}
             for kind, n in (("cold", args.cold), ("warm", args.warm))]
    notes = [f"medians in ms from navigation start; {results['requests_per_load']} requests "
             f"per load; page files {results['page_bytes']} bytes "
             f"({results['page_gzip_bytes']} gzipped), largest "
             f"{results['largest_file'][0]} {results['largest_file'][1]['bytes']} bytes",
             f"cold first paint max {results['cold']['first_paint_ms']['max']} ms; "
             f"within budget (every file < 200 KB, first paint < 1 s): "
             f"{results['within_budget']}"]
    write_results("web", results, table, notes)
    return results


if __name__ == "__main__":
    main()
