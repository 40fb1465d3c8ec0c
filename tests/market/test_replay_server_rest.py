"""The replay server's REST side (exchangeInfo, depth snapshots) and the synthetic exchange-scale market."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
import orjson
import pytest

from cambium.core.errors import DataError
from cambium.market import synthetic
from cambium.market.captures import iter_hftbacktest
from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer

CAPTURE = Path("data/samples/market/ws/binance_usdm_hftbacktest/btcusdt_20240808.gz")


def _records(n: int = 1_500) -> list[Record]:
    return [r for r in itertools.islice(iter_hftbacktest(CAPTURE), n) if r.frame.startswith('{"stream"')]


def test_exchange_info_and_depth_are_served_next_to_the_streams() -> None:
    names = [synthetic.synthetic_name(k) for k in range(540)]
    depth = synthetic.depth_bodies(_records(), {}, 540)

    async def go() -> list[httpx.Response]:
        async with ReplayServer([], exchange_info=synthetic.exchange_info(names), depth=depth) as srv:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}") as client:
                out = [await client.get("/fapi/v1/exchangeInfo"), await client.get("/fapi/v1/depth?symbol=S539USDT"),
                       await client.get("/fapi/v1/depth?symbol=NOPE"), await client.get("/fapi/v1/klines")]
            assert srv.stats.rest_requests == 4 and srv.stats.attempts == 0  # REST is not a websocket attempt
            return out

    info, snap, unknown, other = asyncio.run(go())
    assert info.status_code == 200 and info.headers["x-mbx-used-weight-1m"] == "1"
    listed = [s["symbol"] for s in info.json()["symbols"]]
    assert listed[:540] == names and len(listed) == 543  # + three entries every universe filter refuses
    assert snap.status_code == 200 and {"lastUpdateId", "bids", "asks"} <= snap.json().keys()
    assert (unknown.status_code, other.status_code) == (404, 404)


def test_replicate_follows_activity_and_keeps_every_symbols_first_frames() -> None:
    recs = _records()
    market = synthetic.replicate(recs, 100, "market")
    stress = synthetic.replicate(recs, 100, "stress")
    assert len(stress) == 100 * len(recs)
    per = {s: sum(1 for r in market if r.frame.startswith(f'{{"stream":"{s.lower()}@')) for s in
           (synthetic.synthetic_name(0), synthetic.synthetic_name(99))}
    assert per["S000USDT"] > 10 * per["S099USDT"] > 0  # the busiest gets most; the quietest still quotes
    streams = {orjson.loads(r.frame)["stream"] for r in market}
    assert {f"s099usdt@{k}" for k in ("bookTicker", "trade")} <= streams
    assert synthetic.replicate(recs, 100, "market") == market  # seeded
    with pytest.raises(DataError, match="traffic"):
        synthetic.replicate(recs, 3, "busy")
    with pytest.raises(DataError, match="no combined-stream"):
        synthetic.replicate([], 3)
