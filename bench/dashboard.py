"""Dashboard page load for a long run: a generated moe-shaped run of >= 50k metric rows.

Run: `python -m bench.dashboard [--quick]`.
- `run_page_server_s`: server time of everything the run page fetches (the page, `/api/runs/{id}`, the downsampled
  curves of its charts at 600 points in one request, the expert heatmaps of both layers at 300 step buckets, one
  request per kind, the artifacts list), in-process
  through the ASGI app. Reference: one naive route returning every row of the run as JSON (what a page that
  aggregated nothing on the server would have to fetch), measured in the same run.
- `run_page_bytes`: the JSON those requests return, against the naive route's.
- `browser_load_s`: headless chromium (Debian package, via Playwright) from navigation to the page drawn (every chart
  and heatmap rendered, `body[data-ready]`), on a page reload with plotly.js in the browser cache; `browser_cold_s` the
  first load in a fresh browser context (4.8 MB plotly.js fetched from the local server). No reference; skipped when
  chromium or playwright is missing.
Full: 20k steps (132k rows); --quick: 10k steps (66k rows).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient
from pydantic import BaseModel

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.core.metrics import MetricsWriter, read_metrics
from cambium.core.runs import create_run
from cambium.dashboard.app import create_app

LAYERS, EXPERTS, STATS_EVERY = 2, 8, 20


class _BenchConfig(BaseModel):
    name: str = "dashboard-bench"
    steps: int = 0


def make_run(root: Path, steps: int) -> tuple[str, int]:
    """A finished moe-shaped run: 5 scalars per step, per-expert load and bias of 2 layers every 20 steps."""
    run = create_run(root, system="moe", name="bench", config=_BenchConfig(steps=steps), seed=0)
    rows = 0
    with MetricsWriter(run.metrics_path(), run.id, flush_rows=50_000) as w:
        for step in range(1, steps + 1):
            values = {"loss": 6.0 * math.exp(-step / steps) + 0.05 * math.sin(step), "lm_loss": 6.0 - step / steps,
                      "aux_loss": 1e-4, "lr/expert": 3e-3 * min(1.0, step / 1000),
                      "perf/tokens_per_s": 8000 + 500 * math.sin(step / 50)}
            if step % STATS_EVERY == 0:
                for layer in range(LAYERS):
                    for e in range(EXPERTS):
                        values[f"moe/l{layer}/load/e{e}"] = (1 + math.sin(step / 300 + e + layer)) / (2 * EXPERTS)
                        values[f"moe/l{layer}/bias/e{e}"] = 1e-3 * math.cos(step / 500 + e)
            w.log(step, step * 512, values)
            rows += len(values)
    run.finish()
    run.close()
    return run.id, rows


def page_requests(client: TestClient, run_id: str) -> int:
    """Every request the run page makes (plotly.js aside: the browser caches it); returns the JSON bytes."""
    total = len(client.get(f"/runs/{run_id}").content)
    detail = client.get(f"/api/runs/{run_id}")
    total += len(detail.content)
    names = ["loss", "lm_loss", "aux_loss", "lr/expert", "perf/tokens_per_s"]
    total += len(client.get(f"/api/runs/{run_id}/series", params={"name": names, "points": 600}).content)
    for kind in ("load", "bias"):
        total += len(client.get(f"/api/runs/{run_id}/experts", params={"kind": kind, "points": 300}).content)
    total += len(client.get(f"/api/runs/{run_id}/artifacts").content)
    return total


def naive_payload(run_dir: Path) -> bytes:
    """The reference: every row of the run, as JSON."""
    rows = read_metrics(run_dir / "metrics.duckdb")
    return json.dumps([{"step": r.step, "name": r.name, "value": r.value} for r in rows]).encode()


def browser_times(root: Path, run_id: str) -> dict[str, float] | None:
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if executable is None:
        return None
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/runs/{run_id}"
    out: dict[str, float] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            start = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=120_000)
            out["cold"] = time.perf_counter() - start
            warm = []
            for _ in range(3):
                start = time.perf_counter()
                page.reload()
                page.wait_for_selector("body[data-ready='1']", timeout=120_000)
                warm.append(time.perf_counter() - start)
            out["warm"] = min(warm)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__ or "", argv)
    steps = 10_000 if args.quick else 20_000
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="cambium-bench-dashboard-") as tmp:
        root = Path(tmp)
        run_id, rows = make_run(root, steps)
        client = TestClient(create_app(root, allowed_hosts=["testserver"]))
        ours_bytes = page_requests(client, run_id)
        naive_bytes = len(naive_payload(root / run_id))
        best = interleaved_best({"ours": lambda: page_requests(client, run_id),
                                 "naive": lambda: naive_payload(root / run_id)}, rounds=2 if args.quick else 5)
        case = f"run_{rows // 1000}k_rows"
        records = [
            make_record(case, "run_page_server_s", best["ours"], "s", "all rows as JSON", best["naive"],
                        higher_is_better=False, machine_facts=facts),
            make_record(case, "run_page_bytes", float(ours_bytes), "bytes", "all rows as JSON", float(naive_bytes),
                        higher_is_better=False, machine_facts=facts),
        ]
        times = browser_times(root, run_id)
        if times is not None:
            records.append(make_record(case, "browser_load_s", times["warm"], "s", "none", None,
                                       higher_is_better=False, machine_facts=facts))
            records.append(make_record(case, "browser_cold_s", times["cold"], "s", "none", None,
                                       higher_is_better=False, machine_facts=facts))
        for r in records:
            r["rows"] = rows
            r["steps"] = steps
    write_results("dashboard", records, args.results_dir)


if __name__ == "__main__":
    main()
