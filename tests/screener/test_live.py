"""SCR-10/12: the live path against the local replay websocket server, with the status page and Prometheus metrics."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from pathlib import Path

import httpx

from cambium.core.config import load
from cambium.market.binance import route_usdm
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.replay_server import ReplayServer
from cambium.screener.cli import run_with_status
from cambium.screener.config import ScreenerConfig

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]


def test_live_path_serves_status_page_and_metrics() -> None:
    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    60_000))
    # The replay server sends stream frames only, not the capture's inline REST depth snapshot, so the L2 books never
    # sync and impact comes from the top of book: a small clip keeps it known. The first minutes are the calmest,
    # so the entry bar is lowered too.
    cfg = load(CONFIG, ScreenerConfig, ["ranker.enter_threshold=0.002", "ranker.exit_threshold=0.001",
                                        "features.clip_notional=1000"])

    seen_top: list[list[dict[str, object]]] = []
    done = threading.Event()

    def poll(url: str) -> None:
        def loop() -> None:
            while not done.is_set():
                try:
                    page = httpx.get(url + "/", timeout=10).text
                    top = httpx.get(url + "/api/status", timeout=10).json()["top"]
                except httpx.ConnectError:
                    return  # the run ended and the page closed
                if top:
                    assert all(row["symbol"] in page for row in top)
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
    assert seen_top, "the status page never showed a listed symbol during the run"
    assert all(0 <= float(row["score"]) <= 1 for top in seen_top for row in top)  # type: ignore[arg-type]
    assert isinstance(status["p95_latency_ms"], float)
    text = status["metrics"]
    assert isinstance(text, str)
    for name in ("cambium_screener_messages_total", "cambium_screener_e2e_latency_seconds_bucket",
                 "cambium_screener_reconnects_total", "cambium_screener_malformed_frames_total",
                 "cambium_screener_stale_ms", "cambium_screener_event_lag_seconds", "cambium_screener_incidents_total",
                 "cambium_screener_dropped_events_total", "cambium_screener_messages_per_second"):
        assert name in text, name
