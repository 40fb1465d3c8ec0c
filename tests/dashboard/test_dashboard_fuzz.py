"""Every route fuzzed: schemathesis from the app's OpenAPI schema over runs the tiny configs made, and hypothesis on
what the schema cannot say (real run ids mixed with hostile ones, path traversal on the file route, odd metric
names). No request may get a 5xx."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from cambium.dashboard.app import create_app

from .conftest import Runs

pytestmark = pytest.mark.slow


# schemathesis builds its tests at import, before any fixture: the app serves a path that the `runs` fixture links to
# the session's runs directory before the first request (the app reads its root at each request).
FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="cambium-dashboard-fuzz-")) / "runs"
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(FUZZ_ROOT, allowed_hosts=["testserver"]))


@pytest.fixture(scope="module", autouse=True)
def _fuzz_root(runs: Runs) -> None:
    if not FUZZ_ROOT.exists():
        FUZZ_ROOT.symlink_to(runs.root, target_is_directory=True)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])


@pytest.fixture(scope="module")
def client(runs: Runs) -> Iterator[TestClient]:
    with TestClient(create_app(runs.root, allowed_hosts=["testserver"])) as c:
        yield c


TRAVERSAL = st.lists(st.sampled_from(["..", ".", "report", "%2e%2e", "..%2f", "%2f", "/", "\\", "\x00", "~", "etc",
                                      "passwd", "config.toml", "codebook_usage.png", "x.png", "%00", "…", "a" * 300]),
                     min_size=1, max_size=8).map("/".join)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)


@given(path=st.one_of(TRAVERSAL, TEXT), which=st.integers(0, 4), raw=TEXT)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_file_paths_and_ids_get_4xx(client: TestClient, runs: Runs, path: str, which: int, raw: str) -> None:
    # Percent-encoded as a client must (raw control characters are not a URL), '/' and '%' kept so that traversal
    # segments and the client's own escapes reach the server as written.
    path = quote(path, safe="/%")
    ids = [*runs.moe, runs.morph, runs.worldmodel]
    run_id = ids[which] if which < 4 else quote(raw, safe="")
    for url in (f"/api/runs/{run_id}/files/{path}", f"/api/runs/{run_id}", f"/runs/{run_id}",
                f"/api/runs/{ids[3]}/files/{path}"):
        response = client.get(url)
        assert response.status_code < 500, (url, response.text)
        if response.status_code == 200 and "/files/" in response.request.url.path:  # (the client folds "/..")
            assert response.content.startswith(b"\x89PNG")  # only images from inside a run directory


@given(names=st.lists(TEXT, min_size=1, max_size=4), points=st.integers(-10, 10_000),
       since=st.integers(-(2**70), 2**70), layer=st.integers(-5, 2**40), kind=TEXT,
       status=TEXT, since_day=TEXT)
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_hostile_query_parameters_get_4xx(client: TestClient, runs: Runs, names: list[str], points: int, since: int,
                                          layer: int, kind: str, status: str, since_day: str) -> None:
    run = runs.moe[0]
    for url, params in (
        (f"/api/runs/{run}/series", {"name": names, "points": points, "since": since}),
        (f"/api/runs/{run}/experts", {"layer": layer, "kind": kind, "points": points}),
        ("/api/runs", {"status": status, "since": since_day, "system": names[0]}),
        ("/api/compare", {"run": [run, *names]}),
        ("/compare", {"run": [run, *names]}),
    ):
        response = client.get(url, params=params)
        assert response.status_code < 500, (url, params, response.text)
