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

With `live.symbols = "all"` the symbols come from exchangeInfo (`cambium.screener.universe`), re-read every
`live.universe.refresh_s`: new listings get a connector of their own (sharing the pump's queue) and their depth
snapshots; delisted symbols' streams are unsubscribed (`LiveResult.unsubscribed` counts them), their events still in
flight are dropped (`dropped['unlisted']`), and a connector left with no symbol closes.

Load shedding: when `live.shed_backlog` frames wait in the receive queue, the depth diffs of the least active
`live.shed_fraction` of the symbols (events seen, decayed; once 20 per symbol have been seen) are dropped
(`dropped['shed_depth']`) until the backlog halves; their books are then resynced from REST snapshots. Their features
meanwhile use the top of book.

One bad frame never stops the pump: the connector counts the frames the decoder refuses (per shard), and the session
counts the events it refuses (`Session.malformed`, by reason), which `MalformedCollector` exposes on `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from cambium.core.errors import CambiumError
from cambium.core.progress import correlation_id, log_context
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
from cambium.screener.universe import EXCHANGE_INFO_WEIGHT, Universe

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
    dropped: dict[str, int] = field(default_factory=dict)
    """Events dropped on purpose, by reason: 'shed_depth' (load shedding), 'unlisted' (a symbol the universe
    dropped: its frames still in flight after the UNSUBSCRIBE)."""
    symbols: int = 0
    universe_reads: int = 0
    unsubscribed: int = 0
    """Streams unsubscribed at run time because the universe dropped their symbol."""
    shed_episodes: int = 0
    shed_symbols: set[str] = field(default_factory=set)
    """Every symbol whose depth diffs were shed at some point."""

    def process_stats(self, connectors: list[Connector]) -> dict[str, Any]:
        """This process's counters as one shard stats dict, with the keys of `ShardedRunner.shard_stats()` (see
        cambium.screener.shards), so one reader serves both modes; pass the run's `result=` and `connector=` lists."""
        shards = [st for conn in connectors for st in conn.stats]
        return {"shard": 0, "symbols": self.symbols, "alive": True, "generation": 0,
                "frames": sum(st.frames for st in shards), "events": self.events, "ticks": None,
                "snapshots": self.snapshots, "snapshot_errors": self.snapshot_errors,
                "malformed": sum(st.malformed for st in shards), "connects": sum(st.connects for st in shards),
                "disconnects": sum(st.disconnects for st in shards), "dropped": dict(self.dropped),
                "incidents": dict(sum((Counter(st.incidents) for st in shards), Counter())), "rest_incidents": {},
                "latency_p95_ms": None, "cpu_s": None}


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


class _Activity:
    """Frames per symbol, halved every `HALF_LIFE_FRAMES` frames: who is least active right now (load shedding)."""

    HALF_LIFE_FRAMES = 50_000

    WARMUP_PER_SYMBOL = 20
    """Events per symbol seen before the activity ranking is trusted (no shedding before)."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.n = 0
        self.total = 0

    def known(self, n_symbols: int) -> bool:
        return self.total >= self.WARMUP_PER_SYMBOL * n_symbols

    def add(self, symbol: str) -> None:
        self.counts[symbol] = self.counts.get(symbol, 0.0) + 1.0
        self.total += 1
        self.n += 1
        if self.n >= self.HALF_LIFE_FRAMES:
            self.n = 0
            self.counts = {s: c / 2 for s, c in self.counts.items()}

    def least(self, symbols: list[str], fraction: float) -> set[str]:
        k = max(1, int(len(symbols) * fraction))
        return set(sorted(symbols, key=lambda s: (self.counts.get(s, 0.0), s))[:k])


async def run_live(cfg: ScreenerConfig, ws: WsConfig, session: Session, metrics: ScreenerMetrics, *,
                   connector: list[Connector] | None = None, max_events: int | None = None,
                   duration_s: float | None = None, rest: RestClient | None = None,
                   probe: Callable[[Record, int], None] | None = None,
                   symbols: tuple[str, ...] | None = None, result: LiveResult | None = None) -> LiveResult:
    """Run until `max_events` stream events (checked after each frame), `duration_s` seconds, or cancellation.
    `connector`, if given, receives each Connector as soon as it exists (the status page reads their shard
    counters; a universe refresh that lists new symbols adds one). With `live.depth_snapshots`, or `live.symbols =
    "all"` (exchangeInfo), `rest` (default: a futures RestClient) is the REST client. `probe`, if given, is called
    with each frame's record and its decision time (`time.time_ns()`), after the metrics; the benchmark uses it to
    time frames from the server's send. `symbols`, if given, overrides `live.symbols` (a shard worker's share);
    `result`, if given, is filled while the run goes (a shard worker reports its counters from it)."""
    live = cfg.live
    result = result if result is not None else LiveResult(0, 0, [])
    metrics.watch(dropped=lambda: result.dropped)  # cambium_screener_dropped_events_total{reason}
    clients: list[RestClient] = []

    def client() -> RestClient:
        if not clients:
            clients.append(rest or RestClient("futures"))
            metrics.watch(incidents=clients[0])  # its 429/418 incidents on /metrics
        return clients[0]

    universe: Universe | None = None
    if symbols is None and live.symbols == "all":
        universe = Universe(live.universe, lambda: client().get("/exchangeInfo", weight=EXCHANGE_INFO_WEIGHT))
        await asyncio.to_thread(universe.bootstrap)
        symbols = universe.symbols
        log.info("universe: %d symbols from exchangeInfo (%s refused)", len(symbols), dict(universe.refused) or "none")
    elif symbols is None:
        symbols = tuple(live.symbols)
    result.symbols = len(symbols)
    venue = binance_usdm_venue(ws)
    first = Connector(venue, live.streams(cfg.features.streams, symbols), ws)
    conns: dict[Connector, set[str]] = {first: set(symbols)}
    if connector is not None:
        connector.append(first)
    active = set(symbols)
    snapshots: asyncio.Queue[MarketEvent] = asyncio.Queue()
    activity = _Activity()
    shedding: set[str] = set()
    dropped = result.dropped

    halt = threading.Event()  # the fetch threads stop at the next symbol when live mode ends

    def fetch(client: RestClient, wanted: tuple[str, ...]) -> None:
        for symbol in wanted:
            if halt.is_set():
                return
            try:
                snapshots.put_nowait(fetch_depth_snapshot(client, symbol, live.depth_limit))
            except (CambiumError, KeyError, TypeError, ValueError) as exc:
                result.snapshot_errors += 1
                log.warning("depth snapshot of %s failed: %s", symbol, exc)

    fetchers: list[asyncio.Task[None]] = []

    def resync(wanted: tuple[str, ...]) -> None:
        if live.depth_snapshots and wanted:
            fetchers.append(asyncio.create_task(asyncio.to_thread(fetch, client(), wanted)))

    async def follow_universe(u: Universe) -> None:
        while True:
            await asyncio.sleep(live.universe.refresh_s)
            change = await asyncio.to_thread(u.refresh)
            result.universe_reads += 1
            if not change:
                continue
            log.info("universe: +%d -%d symbols (%s / %s)", len(change.added), len(change.removed),
                     ",".join(change.added[:10]), ",".join(change.removed[:10]))
            active.difference_update(change.removed)
            for conn, owned in list(conns.items()):
                gone = owned.intersection(change.removed)
                owned.difference_update(change.removed)
                if not owned and conn is not first:
                    del conns[conn]
                    await conn.stop()
                elif gone:  # UNSUBSCRIBE their streams; frames already in flight are dropped as 'unlisted'
                    result.unsubscribed += await conn.unsubscribe(live.streams(cfg.features.streams, sorted(gone)))
            if change.added:
                added = Connector(venue, live.streams(cfg.features.streams, change.added), ws)
                added.queue = first.queue  # one pump reads every connector's deliveries
                conns[added] = set(change.added)
                if connector is not None:
                    connector.append(added)
                await added.start()
                active.update(change.added)
                resync(change.added)
            result.symbols = len(active)

    def handle(record: Record, events: list[MarketEvent]) -> bool:
        """One frame's events through the session; True once `max_events` events are done."""
        queue = first.queue
        while not snapshots.empty():
            result.rank_events += len(session.on_event(snapshots.get_nowait()))
            result.snapshots += 1
        backlog = queue.qsize()
        if not shedding and backlog >= live.shed_backlog and activity.known(len(active)):
            shedding.update(activity.least(sorted(active), live.shed_fraction))
            result.shed_symbols |= shedding
            result.shed_episodes += 1
            log.warning("receive backlog %d frames: shedding the depth diffs of %d least active symbols",
                        backlog, len(shedding))
        elif shedding and backlog < live.shed_backlog // 2:
            resync(tuple(sorted(shedding)))  # their books missed diffs: new snapshots
            shedding.clear()
        for ev in events:
            symbol = ev.symbol
            if symbol not in active:
                dropped["unlisted"] = dropped.get("unlisted", 0) + 1
                continue
            activity.add(symbol)
            if shedding and symbol in shedding and ev.type == "book" and ev.payload.get("kind") == "diff":
                dropped["shed_depth"] = dropped.get("shed_depth", 0) + 1
                continue
            result.rank_events += len(session.on_event(ev))
        decided = time.time_ns()
        if events:
            metrics.observe_frame(record.recv_ns, max(ev.ts for ev in events), decided)
        if probe is not None:
            probe(record, decided)
        result.events += len(events)
        return max_events is not None and result.events >= max_events

    async def deliveries() -> None:
        queue = first.queue
        while True:
            item = await queue.get()
            # a frame batch = the frames waiting when the loop wakes up: log lines while handling it share a batch_id
            with log_context(batch_id=correlation_id()):
                while True:
                    if handle(*item):
                        return
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        break

    if live.gc_freeze:
        gc.collect()
        gc.freeze()
    follower = None
    try:
        async with first:
            resync(symbols)
            if universe is not None:
                follower = asyncio.create_task(follow_universe(universe))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(deliveries(), duration_s)
            for task in [*fetchers, *([follower] if follower is not None else [])]:
                task.cancel()
            for conn in conns:
                if conn is not first:
                    await conn.stop()
    finally:
        halt.set()
        if live.gc_freeze:
            gc.unfreeze()
    result.rank_events += len(session.finish())
    result.shards = [st for conn in conns for st in conn.stats]
    result.malformed = session.malformed
    return result
