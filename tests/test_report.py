"""The run report: one HTML page that renders every plot in headless Chromium with no console
error and no network request, and the same figures as tables for the dataset card."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rankmill.report import PLOTS, run_summary, summary_markdown, write_report
from tests.fixtures.export_data import export_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def render(page_path: Path, screenshot: Path | None = None) -> dict:
    """Open the page in headless Chromium; what it logged, requested and drew."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no chromium (Debian package `chromium`)")
    errors: list[str] = []
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri(), wait_until="load")
        drawn = {}
        for name in PLOTS:
            page.wait_for_selector(f"#plot-{name} .main-svg", timeout=20_000)
            drawn[name] = page.evaluate(
                "n => { const d = document.getElementById('plot-' + n);"
                " return {title: (d.querySelector('.gtitle') || {}).textContent || '',"
                " traces: (d.data || []).length}; }",
                name,
            )
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return {"errors": errors, "requests": requests, "drawn": drawn}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, ray_session) -> str:
    return export_run(str(tmp_path_factory.mktemp("report") / "run"), report=True)


@pytest.mark.slow
def test_report_renders_every_plot_offline(run_dir):
    # the report stage wrote it at the end of the run; `rankmill report` writes the same page
    staged = (Path(run_dir) / "report.html").read_text()
    path = Path(write_report(run_dir, str(Path(run_dir) / "again.html")))
    html = path.read_text()
    assert 'class="plot"' in staged and staged.count("<section") == html.count("<section")
    assert "<script src=" not in html and "<link" not in html  # plotly.js is inline
    seen = render(path)
    assert seen["errors"] == []
    assert [u for u in seen["requests"] if not u.startswith(("file://", "data:"))] == []
    assert set(seen["drawn"]) == set(PLOTS)
    # plots that have data in this run draw traces, with titles
    for name in ("rows", "rejects", "labels", "judges", "margins", "ranks", "cost"):
        assert seen["drawn"][name]["title"], name
    for name in ("rows", "labels", "margins", "ranks", "cost", "judges"):
        assert seen["drawn"][name]["traces"] > 0, name


@pytest.mark.slow
def test_summary_tables_match_the_run(run_dir):
    s = run_summary(run_dir)
    assert [x["stage"] for x in s["stages"]] == ["tables", "export", "report"]
    assert s["labels"]["answers"] == 24 and s["labels"]["yes"] == 12
    assert sum(s["labels"]["p_yes_hist"]) == 24
    # the fixture's labels: 0.8 on positives, 0.3 on negatives; qrels make truth for positives
    assert s["negatives"]["negatives"] == 48
    assert min(s["negatives"]["margins"]) == pytest.approx(0.9 - 0.6 - 0.15, abs=0.2)
    md = summary_markdown(s)
    assert "| tables |" in md and "| export |" in md and "Hard negatives" in md


def test_judge_stage_tables_give_the_heatmap_and_accuracies():
    import pyarrow as pa

    from rankmill.report import _judge_stage

    report = pa.table({"judge": ["a", "b", "c"], "n": [10, 10, 8], "accuracy": [0.9, 0.7, None]})
    agreement = pa.table(
        {
            "judge_a": ["a", "a", "*"],
            "judge_b": ["b", "c", "fleiss"],
            "kappa": [0.4, -0.1, 0.2],
        }
    )
    j = _judge_stage(report, agreement)
    assert j["names"] == ["a", "b", "c"]
    assert j["kappa"][0][1] == j["kappa"][1][0] == 0.4
    assert j["kappa"][2][0] == -0.1 and j["kappa"][1][2] is None
    assert [a["judge"] for a in j["accuracy"]] == ["a", "b"]
    md = summary_markdown({"stages": [], "rejects": [], "judges": j})
    assert "| a | 10 | 0.900 |" in md and "Cohen's kappa" in md
