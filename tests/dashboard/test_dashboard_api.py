"""The dashboard's JSON routes over runs the tiny configs made: what each answers, and a clean 4xx for every kind of
bad input (unknown runs, malformed parameters, file paths that leave the run directory)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cambium.core.metrics import read_metrics
from cambium.dashboard.app import create_app

from .conftest import Runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(runs: Runs) -> Iterator[TestClient]:
    with TestClient(create_app(runs.root, allowed_hosts=["testserver"])) as c:
        yield c


def test_runs_list_and_filters(client: TestClient, runs: Runs) -> None:
    body = client.get("/api/runs").json()
    assert [r["id"] for r in body["runs"]] == sorted([*runs.moe, runs.morph, runs.worldmodel, runs.nested])
    assert body["systems"] == ["moe", "morph", "nested", "worldmodel"]
    moe = {r["id"]: r for r in body["runs"]}[runs.moe[0]]
    last = {r.name: r.value for r in read_metrics(Path(runs.root, runs.moe[0], "metrics.duckdb"), ["loss"])}
    assert moe["steps"] == 30 and moe["latest"]["loss"] == pytest.approx(last["loss"])
    assert [r["id"] for r in client.get("/api/runs", params={"system": "morph"}).json()["runs"]] == [runs.morph]
    assert client.get("/api/runs", params={"status": "running"}).json()["runs"] == []
    day = moe["created"][:10]
    assert len(client.get("/api/runs", params={"since": day, "until": day}).json()["runs"]) == 5
    assert client.get("/api/runs", params={"until": "2000-01-01"}).json()["runs"] == []


def test_series_are_the_logged_rows_or_their_buckets(client: TestClient, runs: Runs) -> None:
    rows = [r for r in read_metrics(Path(runs.root, runs.moe[0], "metrics.duckdb"), ["loss"])]
    exact = client.get(f"/api/runs/{runs.moe[0]}/series", params={"name": ["loss", "absent"]}).json()["series"]
    assert set(exact) == {"loss"}
    assert exact["loss"]["step"] == [r.step for r in rows] and exact["loss"]["value"] == [r.value for r in rows]
    five = client.get(f"/api/runs/{runs.moe[0]}/series", params={"name": "loss", "points": 5}).json()["series"]
    assert five["loss"]["step"] == [6, 12, 18, 24, 30]  # 30 steps in 5 buckets of 6
    assert five["loss"]["value"][0] == pytest.approx(sum(r.value for r in rows[:6]) / 6)
    since = client.get(f"/api/runs/{runs.moe[0]}/series", params={"name": "loss", "since": 27}).json()["series"]
    assert since["loss"]["step"] == [28, 29, 30]


def test_expert_matrix_holds_the_logged_loads(client: TestClient, runs: Runs) -> None:
    both = client.get(f"/api/runs/{runs.moe[0]}/experts", params={"kind": "load"}).json()["layers"]
    assert set(both) == {"0", "1"}
    body = client.get(f"/api/runs/{runs.moe[0]}/experts", params={"layer": 1, "kind": "load"}).json()["layers"]["1"]
    assert body == both["1"]
    assert body["experts"] == list(range(8)) and body["steps"] == list(range(2, 31, 2))
    rows = read_metrics(Path(runs.root, runs.moe[0], "metrics.duckdb"), [f"moe/l1/load/e{e}" for e in range(8)])
    at_30 = {int(r.name.rsplit("e", 1)[1]): r.value for r in rows if r.step == 30}
    assert [body["z"][e][-1] for e in range(8)] == pytest.approx([at_30[e] for e in range(8)])
    assert sum(body["z"][e][-1] for e in range(8)) == pytest.approx(1.0)
    assert client.get(f"/api/runs/{runs.moe[0]}/experts", params={"layer": 7}).json()["layers"] == {}


def test_run_detail_seeds_artifacts_and_comparison(client: TestClient, runs: Runs) -> None:
    detail = client.get(f"/api/runs/{runs.moe[0]}").json()
    assert detail["experts"] == {"bias": [0, 1], "load": [0, 1]} and detail["steps"] == 30
    assert detail["names"]["loss"] == {"rows": 30, "first": 1, "last": 30}
    seeds = client.get(f"/api/runs/{runs.morph}/seeds").json()
    assert [s["seed"] for s in seeds["timeline"]["seeds"]] == ["stages.0", "stages.1", "stages.2"]
    for seed in seeds["timeline"]["seeds"]:  # spans tile the epochs from 0 without gaps
        assert seed["spans"][0]["start"] == 0
        assert all(a["end"] == b["start"] for a, b in zip(seed["spans"], seed["spans"][1:], strict=False))
    assert client.get(f"/api/runs/{runs.moe[0]}/seeds").json()["timeline"] is None
    wm = client.get(f"/api/runs/{runs.worldmodel}/artifacts").json()
    on_disk = sorted(f"report/{p.name}" for p in Path(runs.root, runs.worldmodel, "report").glob("*.png"))
    assert wm["images"] == on_disk and {"report/codebook_usage.png", "report/training_curves.png"} <= set(on_disk)
    image = client.get(f"/api/runs/{runs.worldmodel}/files/report/codebook_usage.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    nested = client.get(f"/api/runs/{runs.nested}/artifacts").json()
    assert nested["tables"][0]["file"] == "eval.json"
    compare = client.get("/api/compare", params={"run": list(runs.moe)}).json()
    assert compare["diff"] == [{"key": "optim.expert_lr", "values": ["0.003", "0.001"]}]
    assert "loss" in compare["common"] and "moe/l0/load/e0" in compare["common"]


def test_screener_panel_reads_a_status_json(client: TestClient, runs: Runs) -> None:
    # No screener code writes a run directory yet; the panel reads the document of its /api/status when one is there.
    assert client.get(f"/api/runs/{runs.nested}/screener").json()["live"] is None


@pytest.mark.parametrize(("url", "code"), [
    ("/api/runs/nope", 404),
    ("/runs/nope", 404),
    ("/api/runs/..%2F..%2Fetc", 404),
    ("/api/runs?status=sleeping", 422),
    ("/api/runs?since=yesterday", 422),
    ("/api/runs/{moe}/series", 422),
    ("/api/runs/{moe}/series?name=loss&points=1", 422),
    ("/api/runs/{moe}/series?name=loss&since=abc", 422),
    ("/api/runs/{moe}/series?name=bad%20name", 400),
    ("/api/runs/{moe}/experts?layer=-1", 422),
    ("/api/runs/{moe}/experts?layer=0&kind=weights", 422),
    ("/compare?run={moe}", 422),
    ("/api/compare?run={moe}&run=nope", 404),
    ("/static/../app.py", 404),
    ("/static/app.py", 404),
    ("/api/runs/{wm}/files/..%2F..%2Fexperiments.sqlite", 400),
    ("/api/runs/{wm}/files/%2Fetc%2Fpasswd", 400),
    ("/api/runs/{wm}/files/config.toml", 400),
    ("/api/runs/{wm}/files/report/missing.png", 404),
    ("/api/runs/{wm}/files/report/..%2F..%2F{moe}%2Fconfig.toml", 400),
])
def test_bad_requests_get_a_clean_4xx(client: TestClient, runs: Runs, url: str, code: int) -> None:
    response = client.get(url.format(moe=runs.moe[0], wm=runs.worldmodel))
    assert response.status_code == code, response.text
    assert response.json()["detail"]


def test_files_are_served_only_from_inside_the_run(client: TestClient, runs: Runs, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not yours")
    link = Path(runs.root, runs.worldmodel, "report", "link.png")
    os.symlink(outside, link)
    try:
        assert client.get(f"/api/runs/{runs.worldmodel}/files/report/link.png").status_code == 400
        other = Path(runs.root, runs.moe[0], "plot.png")
        other.write_bytes(b"\x89PNG other run")
        try:  # another run's image, reached by climbing out of this run
            assert client.get(f"/api/runs/{runs.worldmodel}/files/..%2F{runs.moe[0]}%2Fplot.png").status_code == 400
            assert client.get(f"/api/runs/{runs.moe[0]}/files/plot.png").content == b"\x89PNG other run"
        finally:
            other.unlink()
    finally:
        link.unlink()


def test_requests_for_another_host_are_refused(runs: Runs) -> None:
    with TestClient(create_app(runs.root), base_url="http://evil.example") as c:
        assert c.get("/api/runs").status_code == 400
    with TestClient(create_app(runs.root), base_url="http://127.0.0.1:8050") as c:
        assert c.get("/api/runs").status_code == 200


def test_plotly_is_served_from_the_installed_package(client: TestClient) -> None:
    from plotly.offline import get_plotlyjs

    plain = client.get("/static/plotly.min.js", headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and plain.text == get_plotlyjs()
    page = client.get("/").text
    assert "<script src='/static/plotly.min.js'>" in page and "cdn" not in page.lower()
