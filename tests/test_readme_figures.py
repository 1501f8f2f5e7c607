"""Every figure in the README's Performance section comes from a results file: the table is
rendered from benchmarks/results/*.json (benchmarks.readme), and its --check fails, naming the
difference, when README and results disagree. Fast: reads files, starts nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from benchmarks import readme
from benchmarks.common import RESULTS


def test_readme_performance_table_is_the_one_the_results_render() -> None:
    found = readme.problems(readme.README.read_text(), RESULTS)
    assert not found, "\n".join(found)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of README.md and of benchmarks/results/ to change."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    doc = tmp_path / "README.md"
    doc.write_text(readme.README.read_text())
    readme.write(doc, results)  # as rendered from these very files
    return doc, results


def check(doc: Path, results: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = readme.main(["--check", "--readme", str(doc), "--results", str(results)])
    return rc, capsys.readouterr().err


def test_check_passes_on_the_rendered_readme(copies: tuple[Path, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert check(*copies, capsys) == (0, "")


def test_a_changed_result_fails_the_check_naming_old_and_new(
        copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc, results = copies
    data = json.loads((results / "pipeline.json").read_text())
    old = data["best_layout"]["images_per_s"]
    data["best_layout"]["images_per_s"] = 4321.0
    (results / "pipeline.json").write_text(json.dumps(data))
    rc, err = check(doc, results, capsys)
    assert rc == 1
    assert "python -m benchmarks.readme" in err
    assert "-| best in-process pipeline" in err and f"{readme.num(old)} img/s" in err
    assert "+| best in-process pipeline" in err and "4321 img/s" in err
    # rendering again makes them agree
    assert readme.main(["--readme", str(doc), "--results", str(results)]) == 0
    assert check(doc, results, capsys) == (0, "")
    assert "4321 img/s" in doc.read_text()


def test_a_figure_edited_by_hand_in_the_table_fails_the_check(
        copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc, results = copies
    before, table, after = readme.split(doc.read_text())
    assert "img/s" in table
    doc.write_text(before + "\n" + table.replace("img/s", "img/s (x2)", 1) + "\n" + after)
    rc, err = check(doc, results, capsys)
    assert rc == 1 and "(x2)" in err


def test_a_figure_in_the_section_prose_fails_the_check(
        copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc, results = copies
    text = doc.read_text()
    doc.write_text(text.replace(readme.END + "\n", readme.END + "\nWe serve 250 img/s.\n", 1))
    rc, err = check(doc, results, capsys)
    assert rc == 1 and "250 img/s" in err and "prose" in err
    # figures in other sections are not this check's business
    doc.write_text(text.replace("## Reliability", "## Reliability\n\nIt took 3 s.", 1))
    assert check(doc, results, capsys) == (0, "")


def test_a_missing_results_file_is_a_not_measured_row(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    (results / "web.json").unlink()
    table = readme.render(results)
    row = next(line for line in table.splitlines() if "results/web.json" in line)
    assert "not measured: no results file yet" in row and "`python -m benchmarks.web`" in row


def test_a_results_file_of_an_older_shape_says_so(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    data = json.loads((results / "training.json").read_text())
    data["table"] = [r for r in data["table"] if r["section"] != "input"]
    (results / "training.json").write_text(json.dumps(data))
    row = next(line for line in readme.render(results).splitlines()
               if "results/training.json" in line)
    assert "not rendered: the file predates this table's shape" in row


def test_a_readme_without_the_markers_fails_the_check(
        copies: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    doc, results = copies
    doc.write_text(doc.read_text().replace(readme.BEGIN, ""))
    rc, err = check(doc, results, capsys)
    assert rc == 1 and readme.BEGIN in err


def test_serving_ratios_are_against_the_best_measured_peer_at_the_same_clients() -> None:
    from benchmarks.serving import add_ratios, summary

    def row(section: str, layout: str, clients: int, ips: float, p50: float) -> dict[str, Any]:
        return {"section": section, "layout": layout, "clients": clients, "images_per_s": ips,
                "p50_ms": p50, "p95_ms": p50, "p99_ms": p50, "failed": 0}

    rows = [{"section": "in-process limit", "layout": "x", "clients": "-",
             "images_per_s": 200.0, "p50_ms": 8.0},
            row("ours, defaults", "d", 1, 60.0, 11.0), row("ours, defaults", "d", 16, 170.0, 90),
            row("peer", "A, 2 workers", 1, 50.0, 14.0), row("peer", "A, 2 workers", 16, 80.0, 200),
            row("peer", "B, batching", 16, 85.0, 190),
            {"section": "peer", "layout": "C", "not_measured": "no JDK"}]
    add_ratios(rows, 200.0, 8.0)
    d1, d16 = rows[1], rows[2]
    assert (d16["vs_in_process"], d16["vs_best_peer"]) == (0.85, 2.0)  # 170 / max(80, 85)
    assert (d1["vs_best_peer"], d1["added_p50_ms"]) == (1.2, 3.0)
    assert "vs_best_peer" not in rows[3] and rows[3]["vs_in_process"] == 0.25
    s = summary(rows, {"defaults": {"layout": "d", "cold_start_s": 9.0, "memory": {},
                                    "left_behind_after_stop": []}},
                {"images_per_s": 200.0}, {"p50_ms": 8.0})
    assert s["goals"] == {"served_vs_in_process_at_least_0.8": True,
                          "served_vs_best_peer_at_least_2": True, "added_p50_at_most_5_ms": True}
    assert s["best_peer_16_clients"]["layout"] == "B, batching"
    assert [p["layout"] for p in s["peers_not_measured"]] == ["C"]
