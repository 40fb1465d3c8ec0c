"""SCR-10/12: the live path against the local replay websocket server, with the status page and Prometheus metrics."""

from __future__ import annotations

import asyncio
import gc
import heapq
import itertools
import threading
from pathlib import Path

import httpx

from cambium.core.config import load
from cambium.market.binance import route_usdm
from cambium.market.binance_rest import RestClient
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.replay_server import ReplayServer
from cambium.screener.cli import run_with_status
from cambium.screener.config import ScreenerConfig
from cambium.screener.live import LiveResult, run_live
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]


def test_live_path_serves_status_page_and_metrics() -> None:
    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    60_000))
    # The replay server sends stream frames only, not the capture's inline REST depth snapshot, so the L2 books never
    # sync and impact comes from the top of book: a small clip keeps it known. The first minutes are the calmest,
    # so the entry bar is lowered too.
    # At 20× a tenth of a second of wall-clock lag between the two connections is 2 s of exchange time: the clock
    # tolerates 20 s of skew here, as it tolerates 1 s of lag in real time.
    cfg = load(CONFIG, ScreenerConfig, ["ranker.enter_threshold=0.002", "ranker.exit_threshold=0.001",
                                        "features.clip_notional=1000", "features.max_skew_ms=20000"])

    seen_top: list[list[dict[str, object]]] = []
    pages: list[str] = []
    done = threading.Event()

    def poll(url: str) -> None:
        def loop() -> None:
            while not done.is_set():
                try:
                    pages.append(httpx.get(url + "/", timeout=10).text)
                    top = httpx.get(url + "/api/status", timeout=10).json()["top"]
                except httpx.ConnectError:
                    return  # the run ended and the page closed
                if top:
                    seen_top.append(top)
                done.wait(0.3)
        threading.Thread(target=loop, daemon=True).start()

    async def run() -> tuple[dict[str, object], int]:
        # Paced at 20× recorded speed: as fast as possible, the two connections (book streams on /public, trades on
        # /market) would drift apart by minutes of exchange time, which live feeds never do.
        async with ReplayServer(records, speed=20.0, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            status = await asyncio.to_thread(run_with_status, cfg, ws, max_events=len(srv.frames), duration_s=120,
                                             on_started=poll)
            done.set()
            return status, len(srv.frames)

    status, served = asyncio.run(run())
    shards = status["shards"]
    assert isinstance(shards, list) and {s["endpoint"] for s in shards} == {"public", "market"}
    assert sum(s["frames"] for s in shards) == served  # every served frame arrived
    assert seen_top, "the status API never showed a listed symbol during the run"
    assert any("<td>ETHUSDT</td>" in page or "<td>BTCUSDT</td>" in page for page in pages)
    assert all(0 <= float(row["score"]) <= 1 for top in seen_top for row in top)  # type: ignore[arg-type]
    assert isinstance(status["p95_latency_ms"], float)
    text = status["metrics"]
    assert isinstance(text, str)
    for name in ("cambium_screener_messages_total", "cambium_screener_e2e_latency_seconds_bucket",
                 "cambium_screener_reconnects_total", "cambium_screener_malformed_frames_total",
                 "cambium_screener_stale_seconds", "cambium_screener_event_lag_seconds",
                 "cambium_screener_incidents_total", "cambium_screener_dropped_events_total",
                 "cambium_screener_notifications_total", "cambium_screener_malformed_events_total"):
        assert name in text, name


def test_rest_depth_snapshots_sync_the_live_books() -> None:
    """The capture's own REST snapshots, served by a mock REST transport, sync the L2 books of the live path."""
    bodies = {}
    for path in CAPTURES:
        for rec in iter_hftbacktest(path):
            if rec.frame.startswith('{"lastUpdateId"'):
                bodies[path.name[:7].upper()] = rec.frame
                break
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/fapi/v1/depth" and request.url.params["limit"] == "1000"
        symbol = request.url.params["symbol"]
        requested.append(symbol)
        return httpx.Response(200, text=bodies[symbol], headers={"X-MBX-USED-WEIGHT-1M": "20"})

    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    30_000))
    # no load shedding here: on a busy machine the 20× replay backs up, and a shed symbol's book is resynced with a
    # further snapshot (shedding has its own tests in test_shards.py)
    cfg = load(CONFIG, ScreenerConfig, ["live.depth_snapshots=true", "features.max_skew_ms=20000",
                                        "live.shed_backlog=1000000000"])
    session = Session(cfg)
    client = RestClient("futures", transport=httpx.MockTransport(handler))

    async def run() -> LiveResult:
        async with ReplayServer(records, speed=20.0, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            return await run_live(cfg, ws, session, ScreenerMetrics(), max_events=len(srv.frames), duration_s=120,
                                  rest=client)

    result = asyncio.run(run())
    assert sorted(requested) == ["BTCUSDT", "ETHUSDT"] and result.snapshots == 2 and result.snapshot_errors == 0
    for symbol in ("BTCUSDT", "ETHUSDT"):
        book = session.engine.symbols[symbol].book
        assert book.synced and book.gaps == 0, symbol
    assert session.latest["BTCUSDT"].features["impact_bps"] is not None


def test_gc_freeze_holds_for_the_run_only_and_every_frame_is_probed() -> None:
    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    2_000))
    frozen_during: dict[bool, set[int]] = {}
    for freeze in (True, False):
        cfg = load(CONFIG, ScreenerConfig, [f"live.gc_freeze={str(freeze).lower()}", "live.depth_snapshots=false"])
        counts: set[int] = set()
        frames: list[int] = []

        def probe(rec: object, decided_ns: int, counts: set[int] = counts, frames: list[int] = frames) -> None:
            if len(frames) % 100 == 0:  # get_freeze_count walks the frozen heap: every 100th frame (the first, ...)
                counts.add(gc.get_freeze_count())
            frames.append(decided_ns)

        async def run(cfg: ScreenerConfig = cfg, probe: object = probe) -> tuple[LiveResult, int]:
            async with ReplayServer(records, serves=lambda ep, s: route_usdm(s) == ep) as srv:
                ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
                result = await run_live(cfg, ws, Session(cfg), ScreenerMetrics(), max_events=len(srv.frames),
                                        duration_s=60, probe=probe)  # type: ignore[arg-type]
                return result, len(srv.frames)

        result, sent = asyncio.run(run())
        assert result.events == sent == len(frames)  # one probe call per frame, each frame one event here
        assert frames == sorted(frames)
        frozen_during[freeze] = counts
        assert gc.get_freeze_count() == 0  # unfrozen when the run ended
    assert min(frozen_during[True]) > 10_000  # the modules, config and model loaded before the run
    assert frozen_during[False] == {0}
