"""Live mode (SCR-12): the market connector's events through the same `Session` that replay uses.

Read-only: nothing here can place an order. Every event is stamped on receipt by the connector; after the session
has taken it (features, and on a cadence tick model → score → rank) the frame→decision latency is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from cambium.market.binance import binance_usdm_venue
from cambium.market.config import WsConfig
from cambium.market.connector import Connector, ShardStats
from cambium.screener.config import ScreenerConfig
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session

__all__ = ["LiveResult", "run_live"]


@dataclass
class LiveResult:
    events: int
    rank_events: int
    shards: list[ShardStats]


async def run_live(cfg: ScreenerConfig, ws: WsConfig, session: Session, metrics: ScreenerMetrics, *,
                   connector: list[Connector] | None = None, max_events: int | None = None,
                   duration_s: float | None = None) -> LiveResult:
    """Run until `max_events` events, `duration_s` seconds, or cancellation. `connector`, if given, receives the
    Connector as soon as it exists (the status page reads its shard counters)."""
    conn = Connector(binance_usdm_venue(ws), cfg.live.streams(cfg.features.streams), ws)
    if connector is not None:
        connector.append(conn)
    n = rank_events = 0

    async def pump() -> None:
        nonlocal n, rank_events
        async for ev in conn.events():
            rank_events += len(session.on_event(ev))
            metrics.observe_event(ev.recv_ts, ev.ts, time.time_ns())
            n += 1
            if max_events is not None and n >= max_events:
                return

    async with conn:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pump(), duration_s)
    rank_events += len(session.finish())
    return LiveResult(n, rank_events, conn.stats)
