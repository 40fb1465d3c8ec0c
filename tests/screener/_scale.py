"""Exchange-scale test helpers: the captures replicated over synthetic symbols, served with their exchangeInfo and
depth snapshots by a ReplayServer in a thread, and the invariants of a rank-event sequence."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from pathlib import Path

from cambium.market import synthetic
from cambium.market.binance import route_usdm
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer
from cambium.screener.contracts import RankEvent
from cambium.screener.digest import ReplayDigest

CAPTURES = [Path(f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz") for s in ("btcusdt", "ethusdt")]


def tagged_records(limit: int) -> list[tuple[Record, str]]:
    """The first `limit` records of the merged captures (inline REST snapshots included) with their symbol."""
    tagged = [((r, p.name[:7].upper()) for r in iter_hftbacktest(p)) for p in CAPTURES]
    return list(itertools.islice(heapq.merge(*tagged, key=lambda rs: rs[0].recv_ns), limit))


def rest_snapshots() -> dict[str, str]:
    out = {}
    for p in CAPTURES:
        rec = next(r for r in iter_hftbacktest(p) if r.frame.startswith('{"lastUpdateId"'))
        out[p.name[:7]] = rec.frame
    return out


class SyntheticMarket:
    """A ReplayServer of `n` synthetic symbols (their exchangeInfo and depth snapshots too) in a thread."""

    def __init__(self, seconds: float, n: int, traffic: str, speed: float = 1.0) -> None:
        recs = [r for r, _ in tagged_records(int(seconds * 600)) if r.frame.startswith('{"stream"')]
        self.speed = speed
        self.head = [r for r in recs if r.recv_ns - recs[0].recv_ns < seconds * 1e9]
        self.frames = synthetic.replicate(self.head, n, traffic)
        self.names = [synthetic.synthetic_name(k) for k in range(n)]
        self.depth = synthetic.depth_bodies(self.head, rest_snapshots(), n)
        self.port = 0
        self.server: ReplayServer | None = None
        self._stop = False
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        async with ReplayServer(self.frames, speed=self.speed, serves=lambda ep, s: route_usdm(s) == ep,
                                exchange_info=synthetic.exchange_info(self.names), depth=self.depth) as srv:
            self.server = srv
            self.port = srv.port
            while not self._stop:
                await asyncio.sleep(0.05)

    def __enter__(self) -> SyntheticMarket:
        self._thread.start()
        while not self.port:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(10)

    @property
    def ws(self) -> WsConfig:
        url = f"ws://127.0.0.1:{self.port}"
        return WsConfig(futures_public_url=f"{url}/public", futures_market_url=f"{url}/market")

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def check_rank_events(events: list[RankEvent], digest: str) -> None:
    """No event twice, time order, ENTER/EXIT alternating per symbol, and the parent's digest chains exactly them."""
    keys = [(e.ts, e.event, e.symbol) for e in events]
    assert len(keys) == len(set(keys))
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    listed: set[str] = set()
    for e in events:
        if e.event == "SYMBOL_ENTER":
            assert e.symbol not in listed
            listed.add(e.symbol)
        elif e.event == "SYMBOL_EXIT":
            assert e.symbol in listed
            listed.remove(e.symbol)
    assert ReplayDigest().update_all(events) == digest
