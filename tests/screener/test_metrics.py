"""Issue 18: the Prometheus exposition, scraped from the status page's `/metrics` (prometheus_client's ASGI app) and
parsed with prometheus_client's own parser: types, base units, counters that only grow across scrapes, status-page
reads that reset nothing, and the 429/418 and dropped-event counters fed by their producers. Fuzzed over random
stats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from cambium.core.config import load
from cambium.market.binance_rest import IpBanned, RestClient
from cambium.market.connector import ShardStats
from cambium.screener.config import ScreenerConfig
from cambium.screener.notify import RetryPolicy, WebhookNotifier
from cambium.screener.observability import RateWindow, ScreenerMetrics, status_app
from cambium.screener.replay import Session

from ._builders import rank_event

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"


def scrape(client: TestClient) -> dict[str, Any]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def samples(family: Any, suffix: str = "_total") -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def _session(notifiers: list[Any] | None = None) -> Session:
    return Session(load(CONFIG, ScreenerConfig), notifiers=notifiers or [])


def test_scrape_types_units_and_monotonic_counters() -> None:
    stats = [ShardStats(0, "public", 4, connects=1, frames=100), ShardStats(1, "market", 2, connects=3, frames=7)]
    dropped = {"shed_depth": 0}
    session = _session()
    metrics = ScreenerMetrics()
    app = status_app(session, metrics, lambda: stats)
    metrics.watch(dropped=lambda: dropped)
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=True)
    metrics.observe_frame(1_700_000_000_000_000_000, 1_700_000_000_000 - 50, 1_700_000_000_002_000_000)

    first = scrape(client)
    # (prometheus_client adds a `<histogram>_created` gauge per histogram in the 0.0.4 text format)
    kinds = {name: f.type for name, f in first.items() if name.startswith("cambium_screener")
             and not name.endswith("_created")}
    assert kinds == {
        "cambium_screener_messages": "counter", "cambium_screener_reconnects": "counter",
        "cambium_screener_stale_reconnects": "counter", "cambium_screener_malformed_frames": "counter",
        "cambium_screener_incidents": "counter", "cambium_screener_notifications": "counter",
        "cambium_screener_dropped_events": "counter", "cambium_screener_stale_seconds": "gauge",
        "cambium_screener_e2e_latency_seconds": "histogram", "cambium_screener_event_lag_seconds": "histogram",
    }
    assert not any(name.endswith(("_ms", "per_second")) for name in kinds)  # base units, no rate gauges
    assert samples(first["cambium_screener_messages"]) == {(("shard", "0"),): 100.0, (("shard", "1"),): 7.0}
    assert samples(first["cambium_screener_reconnects"]) == {(("shard", "0"),): 0.0, (("shard", "1"),): 2.0}
    assert samples(first["cambium_screener_incidents"]) == {
        (("source", s), ("status", c)): 0.0 for s in ("rest", "ws") for c in ("418", "429")}
    latency = {s.labels.get("le"): s.value for s in first["cambium_screener_e2e_latency_seconds"].samples
               if s.name.endswith("_bucket")}
    assert latency["0.001"] == 0.0 and latency["0.002"] == 1.0  # 2 ms, in seconds

    # the producers move on; the status page is read in between (its display rate must not disturb the scrape)
    stats[0].frames, stats[1].frames = 250, 9
    stats[0].incidents["429"] = 1
    stats[1].malformed_by_reason["json"] = 3
    dropped["shed_depth"] = 17
    pages = [client.get("/").text for _ in range(3)]
    second = scrape(client)
    assert samples(second["cambium_screener_messages"]) == {(("shard", "0"),): 250.0, (("shard", "1"),): 9.0}
    assert samples(second["cambium_screener_incidents"])[(("source", "ws"), ("status", "429"))] == 1.0
    assert samples(second["cambium_screener_malformed_frames"]) == {(("reason", "json"), ("shard", "1")): 3.0}
    assert samples(second["cambium_screener_dropped_events"]) == {(("reason", "shed_depth"),): 17.0}
    for name, fam in first.items():  # every counter sample is >= its value at the previous scrape
        if fam.type == "counter":
            after = samples(second[name])
            assert all(after.get(k, v) >= v for k, v in samples(fam).items()), name
    third = scrape(client)  # nothing moved: a scrape (or page read) changes nothing
    assert samples(third["cambium_screener_messages"]) == samples(second["cambium_screener_messages"])
    assert "frames/s" in pages[0] and client.get("/api/status").json()["shards"][0]["incidents"] == {"429": 1}


def test_rest_incidents_and_notifier_drops_are_counted() -> None:
    answers = iter([httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(418, text="banned")])
    rest = RestClient("futures", sleep=lambda s: None,
                      transport=httpx.MockTransport(lambda request: next(answers, httpx.Response(200, json={}))))
    with pytest.raises(IpBanned, match="HTTP 418"):
        rest.get("/ping")  # 429 (Retry-After honoured), then 418: banned
    hook = WebhookNotifier("http://hook.invalid", rate=1000, burst=1000, retry=RetryPolicy(0),
                           transport=httpx.MockTransport(lambda request: httpx.Response(400)))
    hook.offer(rank_event())
    assert hook.flush(10)
    metrics = ScreenerMetrics()
    app = status_app(_session([hook]), metrics, lambda: [])
    metrics.watch(incidents=rest)
    metrics.watch(incidents=rest)  # watched twice, counted once
    fams = scrape(TestClient(app, base_url="http://127.0.0.1"))
    hook.close()
    inc = samples(fams["cambium_screener_incidents"])
    assert inc[(("source", "rest"), ("status", "429"))] == 1.0 and inc[(("source", "rest"), ("status", "418"))] == 1.0
    assert samples(fams["cambium_screener_dropped_events"])[(("reason", "webhook_http_4xx"),)] == 1.0
    notes = samples(fams["cambium_screener_notifications"])
    assert notes[(("channel", "webhook"), ("outcome", "failed"))] == 1.0
    assert notes[(("channel", "webhook"), ("outcome", "offered"))] == 1.0


def test_display_rate_window_is_not_reset_by_other_readers() -> None:
    now = [0.0]
    window = RateWindow(10.0, clock=lambda: now[0])
    assert window.rate("s", 0) is None
    for t in range(1, 31):  # a counter growing 100/s, read by two readers every second
        now[0] = float(t)
        a = window.rate("s", 100 * t)
        b = window.rate("s", 100 * t)
        assert a == b == 100.0  # the second reader's read did not restart the first one's window
    now[0] = 31.0
    assert window.rate("s", 0) is None  # a counter reset starts the window over


shard_stats = st.builds(
    lambda sid, frames, connects, mal, inc: ShardStats(sid, "public", 1, connects=connects, frames=frames,
                                                       malformed_by_reason=mal, incidents=inc),
    st.integers(0, 50), st.integers(0, 2**53), st.integers(0, 10**9),
    st.dictionaries(st.sampled_from(["json", "envelope", "event", "payload", "utf8"]), st.integers(0, 10**12)),
    st.dictionaries(st.sampled_from(["429", "418"]), st.integers(0, 10**6)))


@settings(max_examples=40, deadline=None)
@given(stats=st.lists(shard_stats, max_size=4, unique_by=lambda s: s.shard),
       dropped=st.dictionaries(st.text("abcdefghij_", min_size=1, max_size=12), st.integers(0, 10**12), max_size=4))
def test_fuzzed_stats_always_scrape_to_parsable_exact_counters(stats: list[ShardStats],
                                                               dropped: dict[str, int]) -> None:
    metrics = ScreenerMetrics()
    metrics.watch(shards=lambda: stats, dropped=lambda: dropped)
    fams = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert samples(fams["cambium_screener_messages"]) == {(("shard", str(s.shard)),): float(s.frames) for s in stats}
    ws = {c: float(sum(s.incidents.get(c, 0) for s in stats)) for c in ("418", "429")}
    inc = samples(fams["cambium_screener_incidents"])
    assert {c: inc[(("source", "ws"), ("status", c))] for c in ws} == ws
    assert samples(fams["cambium_screener_dropped_events"]) == {(("reason", k),): float(v) for k, v in dropped.items()}


def test_worker_stats_are_exported_per_worker() -> None:
    """`live.workers`: the runner's per-worker dicts (cambium.screener.shards) become per-worker series."""
    workers = [{"shard": 0, "frames": 10, "connects": 3, "dropped": {"shed_depth": 2}, "generation": 1,
                "cpu_s": 1.5, "alive": True},
               {"shard": 1, "frames": 4, "connects": 1, "dropped": {"late_tick": 1, "shed_depth": 1},
                "incidents": {"418": 1}, "generation": 0, "cpu_s": 0.25, "alive": False}]
    metrics = ScreenerMetrics()
    metrics.watch(workers=lambda: workers)
    fams = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert samples(fams["cambium_screener_messages"]) == {(("shard", "w0"),): 10.0, (("shard", "w1"),): 4.0}
    assert samples(fams["cambium_screener_dropped_events"]) == {(("reason", "late_tick"),): 1.0,
                                                                (("reason", "shed_depth"),): 3.0}
    assert samples(fams["cambium_screener_incidents"])[(("source", "ws"), ("status", "418"))] == 1.0
    assert samples(fams["cambium_screener_worker_restarts"]) == {(("worker", "w0"),): 1.0, (("worker", "w1"),): 0.0}
    assert fams["cambium_screener_worker_cpu_seconds"].type == "counter"
    assert samples(fams["cambium_screener_worker_up"], "") == {(("worker", "w0"),): 1.0, (("worker", "w1"),): 0.0}
