"""Live mode (SCR-12): the market connector's events through the same `Session` that replay uses.

Read-only: nothing here can place an order. Every frame is stamped on receipt by the connector; after the session
has taken its events (features, and on a cadence tick model → score → rank) the frame→decision latency is recorded,
once per frame.

With `live.gc_freeze` the objects that exist when live mode starts are frozen (`gc.freeze`) for the run: a full
collection then walks only what the run itself allocated, instead of every module, class and function loaded, which
on the benchmark took full collections from 40-110 ms to under 20 ms. They are unfrozen when the run ends.

The local L2 books need one REST depth snapshot per symbol (the websocket sends diffs only). They are fetched in a
worker thread once the streams are open, paced by the REST client's weight tracking, and enter the session as book
events of kind "snapshot"; the books buffer the diffs that arrive before their snapshot.

One bad frame never stops the pump: the connector counts the frames the decoder refuses (per shard), and the session
counts the events it refuses (`Session.malformed`, by reason), which `MalformedCollector` exposes on `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cambium.core.errors import CambiumError
from cambium.market.binance import binance_usdm_venue
from cambium.market.binance_rest import RestClient
from cambium.market.config import WsConfig
from cambium.market.connector import Connector, ShardStats
from cambium.market.events import MarketEvent
from cambium.market.recorder import Record
from cambium.screener.config import ScreenerConfig
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session
from cambium.screener.sources import depth_snapshot_event

__all__ = ["LiveResult", "MalformedCollector", "fetch_depth_snapshot", "run_live"]

log = logging.getLogger("cambium.screener.live")

# /fapi/v1/depth request weight by limit (Binance USDⓈ-M docs).
DEPTH_WEIGHT = {100: 5, 500: 10, 1000: 20}


def fetch_depth_snapshot(client: RestClient, symbol: str, limit: int) -> MarketEvent:
    body = client.get("/depth", {"symbol": symbol, "limit": limit}, weight=DEPTH_WEIGHT[limit])
    return depth_snapshot_event(body, symbol, time.time_ns(), "binance_usdm")


@dataclass
class LiveResult:
    events: int
    rank_events: int
    shards: list[ShardStats]
    snapshots: int = 0
    snapshot_errors: int = 0
    malformed: dict[str, int] = field(default_factory=dict)


class MalformedCollector(Collector):
    """`cambium_screener_malformed_events_total{reason}`: the events a session refused, read at scrape time (no cost
    on the hot path). Register it once on the `ScreenerMetrics.registry` that serves the session's page."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("cambium_screener_malformed_events", "Decoded events refused and skipped by "
                                     "the session, by reason (clock_jump, error)", labels=["reason"])
        for reason, n in sorted(self.session.malformed.items()):
            family.add_metric([reason], n)
        yield family


async def run_live(cfg: ScreenerConfig, ws: WsConfig, session: Session, metrics: ScreenerMetrics, *,
                   connector: list[Connector] | None = None, max_events: int | None = None,
                   duration_s: float | None = None, rest: RestClient | None = None,
                   probe: Callable[[Record, int], None] | None = None) -> LiveResult:
    """Run until `max_events` stream events (checked after each frame), `duration_s` seconds, or cancellation.
    `connector`, if given, receives the Connector as soon as it exists (the status page reads its shard counters).
    With `live.depth_snapshots`, `rest` (default: a futures RestClient) fetches the depth snapshots. `probe`, if
    given, is called with each frame's record and its decision time (`time.time_ns()`), after the metrics; the
    benchmark uses it to time frames from the server's send."""
    conn = Connector(binance_usdm_venue(ws), cfg.live.streams(cfg.features.streams), ws)
    if connector is not None:
        connector.append(conn)
    result = LiveResult(0, 0, [])
    snapshots: asyncio.Queue[MarketEvent] = asyncio.Queue()

    def fetch_all(client: RestClient) -> None:
        for symbol in cfg.live.symbols:
            try:
                snapshots.put_nowait(fetch_depth_snapshot(client, symbol, cfg.live.depth_limit))
            except (CambiumError, KeyError, TypeError, ValueError) as exc:
                result.snapshot_errors += 1
                log.warning("depth snapshot of %s failed: %s", symbol, exc)

    async def pump() -> None:
        async for record, events in conn.deliveries():
            while not snapshots.empty():
                result.rank_events += len(session.on_event(snapshots.get_nowait()))
                result.snapshots += 1
            for ev in events:
                result.rank_events += len(session.on_event(ev))
            decided = time.time_ns()
            if events:
                metrics.observe_frame(record.recv_ns, max(ev.ts for ev in events), decided)
            if probe is not None:
                probe(record, decided)
            result.events += len(events)
            if max_events is not None and result.events >= max_events:
                return

    if cfg.live.gc_freeze:
        gc.collect()
        gc.freeze()
    try:
        async with conn:
            fetcher = None
            if cfg.live.depth_snapshots:
                client = rest or RestClient("futures")
                fetcher = asyncio.create_task(asyncio.to_thread(fetch_all, client))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pump(), duration_s)
            if fetcher is not None:
                fetcher.cancel()
    finally:
        if cfg.live.gc_freeze:
            gc.unfreeze()
    result.rank_events += len(session.finish())
    result.shards = conn.stats
    result.malformed = session.malformed
    return result
