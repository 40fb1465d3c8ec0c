"""Issue 14: the status page under hostile HTTP requests: `/openapi.json` answers with a valid schema, a foreign `Host`
(DNS rebinding) is refused with 400, and no path, query string or header makes it answer 500."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.openapi.models import OpenAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.config import load
from cambium.market.connector import ShardStats
from cambium.screener.config import ScreenerConfig
from cambium.screener.observability import LOOPBACK_HOSTS, ScreenerMetrics, StatusServer, status_app
from cambium.screener.replay import Session

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
ROUTES = ("/", "/api/status", "/metrics", "/openapi.json")
SHARDS = [ShardStats(shard=0, endpoint="public", streams=4, connects=2, frames=10, malformed=1)]


@pytest.fixture(scope="module")
def app() -> Any:
    return status_app(Session(load(CONFIG, ScreenerConfig)), ScreenerMetrics(), lambda: SHARDS)


@pytest.fixture(scope="module")
def client(app: Any) -> TestClient:
    # raise_server_exceptions: a handler exception fails the test with its traceback instead of becoming a 500.
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True)


def test_openapi_schema_is_served_and_valid(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    schema = OpenAPI.model_validate(r.json())
    assert schema.paths is not None and set(schema.paths) == {"/", "/api/status", "/metrics"}
    for path in schema.paths.values():
        assert path.get is not None and path.get.responses is not None and "200" in path.get.responses


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8123", "localhost", "localhost:9"])
def test_loopback_hosts_are_served(client: TestClient, host: str) -> None:
    for route in ROUTES:
        assert client.get(route, headers={"host": host}).status_code == 200, (route, host)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "0.0.0.0", ""])
def test_foreign_host_is_refused(client: TestClient, host: str) -> None:
    for route in ROUTES:
        r = client.get(route, headers={"host": host})
        assert r.status_code == 400 and "top" not in r.text, (route, host)


def test_running_server_refuses_a_rebinding_host() -> None:
    """The same over a real socket (uvicorn), as a browser behind a rebinding name would send it."""
    app = status_app(Session(load(CONFIG, ScreenerConfig)), ScreenerMetrics(), lambda: SHARDS)
    server = StatusServer(app)
    url = server.start()
    try:
        assert httpx.get(url + "/api/status", timeout=10).status_code == 200
        assert httpx.get(url + "/openapi.json", timeout=10).status_code == 200
        r = httpx.get(url + "/api/status", headers={"host": "attacker.example"}, timeout=10)
        assert r.status_code == 400 and "digest" not in r.text
    finally:
        server.stop()


_TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_VALUE = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t"
# What an HTTP client can put on the wire: no control characters in the URL (httpx refuses them before sending).
_URL_TEXT = st.characters(exclude_categories=("Cc", "Cs"))
hosts = st.one_of(st.sampled_from([*LOOPBACK_HOSTS, "127.0.0.1:1", "localhost:65535"]),
                  st.text(_TOKEN + ":[]", max_size=40))
paths = st.one_of(st.sampled_from(ROUTES),
                  st.builds(lambda route, tail: route + tail, st.sampled_from(ROUTES),
                           st.text(_URL_TEXT, max_size=30)),
                  st.text(_URL_TEXT, max_size=60).map(lambda s: "/" + s))
queries = st.dictionaries(st.text(_URL_TEXT, max_size=20), st.text(_URL_TEXT, max_size=40), max_size=4)
headers = st.dictionaries(st.text(_TOKEN, min_size=1, max_size=20).filter(lambda k: k.lower() != "host"),
                          st.text(_VALUE, max_size=80).map(str.strip), max_size=6)
methods = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=methods, host=hosts, path=paths, query=queries, extra=headers)
def test_fuzzed_requests_never_fail_the_server(client: TestClient, method: str, host: str, path: str,
                                               query: dict[str, str], extra: dict[str, str]) -> None:
    # An absolute URL, so that a path starting with "//" stays a path instead of naming another host.
    r = client.request(method, "http://127.0.0.1" + path, params=query, headers={**extra, "host": host})
    assert r.status_code < 500, (method, host, path, r.status_code, r.text[:200])
    assert "Traceback" not in r.text
    if host.split(":")[0] not in LOOPBACK_HOSTS:
        assert r.status_code == 400
    elif method == "GET" and path in ROUTES:
        assert r.status_code == 200
