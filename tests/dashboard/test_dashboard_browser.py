"""The dashboard in a real browser (headless Debian chromium through Playwright) over runs the tiny configs made:
the runs list, a moe run's expert heatmaps, a comparison, a morph seed timeline, report images, and a live run whose
curves grow without a reload. Each test keeps a screenshot (see the `artifacts_dir` fixture)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cambium.core.metrics import MetricsWriter
from cambium.core.runs import create_run

from .conftest import Runs, Server

pytestmark = pytest.mark.slow


@pytest.fixture
def page(browser: Any, artifacts_dir: Path, request: pytest.FixtureRequest) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    yield p
    p.screenshot(path=str(artifacts_dir / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _open(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    assert page.get_attribute("body", "data-ready") == "1", page.inner_text("#main")


def test_runs_list_shows_every_run_and_filters_by_system(page: Any, server: str, runs: Runs) -> None:
    _open(page, server + "/")
    rows = page.locator("#runs tr[data-run]")
    assert rows.count() == 5
    shown = {rows.nth(i).get_attribute("data-run"): rows.nth(i).get_attribute("data-system") for i in range(5)}
    assert shown == {runs.moe[0]: "moe", runs.moe[1]: "moe", runs.morph: "morph", runs.worldmodel: "worldmodel",
                     runs.nested: "nested"}
    moe_row = page.locator(f"#runs tr[data-run='{runs.moe[0]}']")
    assert "finished" in moe_row.inner_text() and "30" in moe_row.inner_text() and "val/loss=" in moe_row.inner_text()
    _open(page, server + "/?system=morph")
    assert page.locator("#runs tr[data-run]").count() == 1
    assert page.input_value("#f-system") == "morph"


def test_moe_run_page_draws_curves_and_expert_heatmaps(page: Any, server: str, runs: Runs) -> None:
    _open(page, f"{server}/runs/{runs.moe[0]}")
    for chart in ("loss", "val", "lr", "throughput", "mfu", "balance", "entropy"):
        assert page.locator(f"#chart-{chart} .main-svg").count() > 0, f"chart {chart} not drawn"
    # 30 steps logged each step: the loss chart holds loss, lm_loss and aux_loss, 30 points each.
    assert page.get_attribute("#chart-loss", "data-points") == "90"
    assert "lm_loss" in (page.locator("#chart-loss .legend").text_content() or "")
    for layer in (0, 1):
        heat = f"#heat-load-l{layer}"
        assert page.get_attribute(heat, "data-experts") == "8"
        assert page.get_attribute(heat, "data-steps") == "15"  # expert_stats_every=2 over 30 steps
        assert page.locator(f"{heat} .hm").count() + page.locator(f"{heat} canvas").count() > 0
        assert f"MoE layer {layer}: expert load" in (page.locator(heat).text_content() or "")
    assert page.get_attribute("#heat-bias-l0", "data-experts") == "8"
    assert "expert_lr = 0.003" in page.inner_text("#config")


def test_comparison_overlays_curves_and_diffs_the_configs(page: Any, server: str, runs: Runs) -> None:
    _open(page, server + "/")
    for run_id in runs.moe:
        page.check(f"#runs tr[data-run='{run_id}'] input")
    page.click("#compare")
    page.wait_for_url("**/compare?**")
    page.wait_for_selector("body[data-ready]", timeout=30_000)
    overlay = page.locator("#overlay-loss")
    assert overlay.get_attribute("data-points") == "60"  # two runs x 30 steps
    assert overlay.locator(".legend .traces").count() == 2
    diff = page.inner_text("#config-diff")
    assert "optim.expert_lr" in diff and "0.003" in diff and "0.001" in diff
    assert page.locator("#config-diff tr").count() == 2  # header + the one key that differs


def test_morph_run_page_draws_the_seed_timeline_and_accuracy_vs_parameters(page: Any, server: str,
                                                                            runs: Runs) -> None:
    _open(page, f"{server}/runs/{runs.morph}")
    timeline = page.locator("#timeline")
    assert timeline.get_attribute("data-seeds") == "3"  # the tiny config's three seed locations
    states = set((timeline.get_attribute("data-states") or "").split(","))
    assert {"DORMANT", "GERMINATED"} <= states
    text = timeline.text_content() or ""
    assert "stages.0" in text and "seed states over epochs" in text
    assert page.get_attribute("#acc-params", "data-points") == "3"  # one point per epoch; no other morph run
    assert "val_acc" in (page.locator("#chart-val").text_content() or "")


def test_worldmodel_and_nested_pages_show_evaluation_tables_and_report_images(page: Any, server: str, runs: Runs,
                                                                                artifacts_dir: Path) -> None:
    _open(page, f"{server}/runs/{runs.worldmodel}")
    page.wait_for_selector("#artifacts img.report")
    table = page.inner_text("#artifacts table.eval")
    assert "latent" in table and "raw" in table and "majority direction" in table
    images = page.locator("#artifacts img.report")
    assert images.count() == len(list(Path(runs.root, runs.worldmodel, "report").glob("*.png"))) >= 2
    for i in range(images.count()):  # loaded and decoded, not a broken-image icon
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 100")
    page.screenshot(path=str(artifacts_dir / "worldmodel_run_page.png"), full_page=True)
    _open(page, f"{server}/runs/{runs.nested}")
    assert "val/ppl" in page.inner_text("#artifacts table.eval")


class _Cfg(BaseModel):
    name: str = "live"


def test_a_live_run_grows_without_a_reload(page: Any, tmp_path: Path) -> None:
    run = create_run(tmp_path, system="moe", name="live", config=_Cfg(), seed=0)
    live = Server(tmp_path)
    try:
        with MetricsWriter(run.metrics_path(), run.id, flush_rows=1) as w:
            for step in range(1, 11):
                w.log(step, step * 10, {"loss": 5.0 - step * 0.1})
            _open(page, f"{live.url}/runs/{run.id}")
            assert page.get_attribute("#chart-loss", "data-points") == "10"
            assert "running" in page.inner_text("#status")
            page.evaluate("window.__marker = 1")  # gone if the page reloads
            for step in range(11, 26):
                w.log(step, step * 10, {"loss": 5.0 - step * 0.1})
            w.flush()
            page.wait_for_function("document.querySelector('#chart-loss').dataset.points === '25'", timeout=20_000)
            assert page.evaluate("window.__marker") == 1
            assert page.inner_text("#steps") == "25"
        run.finish()
        page.wait_for_function("document.querySelector('#status').innerText.includes('finished')", timeout=20_000)
    finally:
        run.close()
        live.stop()


def test_screener_panel_shows_the_live_top_k(page: Any, tmp_path: Path) -> None:
    # The screener registers no runs yet (see docs/dashboard.md): this run stands for one that writes the document
    # of its /api/status as status.json; the panel must show it and follow it while the run is live.
    import json

    run = create_run(tmp_path, system="screener", name="live", config=_Cfg(), seed=0)
    status = {"top": [{"rank": 1, "symbol": "BTCUSDT", "score": 0.91}, {"rank": 2, "symbol": "ETHUSDT", "score": 0.4}],
              "p95_latency_ms": 3.25, "snapshots": 120}
    (run.dir / "status.json").write_text(json.dumps(status))
    live = Server(tmp_path)
    try:
        _open(page, f"{live.url}/runs/{run.id}")
        assert page.locator("#topk tr").count() == 3
        assert "BTCUSDT" in page.inner_text("#topk") and "3.25 ms" in page.inner_text("#screener")
        status["top"] = [{"rank": 1, "symbol": "SOLUSDT", "score": 0.97},
                         *({**r, "rank": r["rank"] + 1} for r in status["top"])]
        (run.dir / "status.json").write_text(json.dumps(status))
        page.wait_for_function("document.querySelector('#topk').innerText.includes('SOLUSDT')", timeout=20_000)
        assert page.locator("#topk tr").count() == 4
    finally:
        run.close()
        live.stop()
