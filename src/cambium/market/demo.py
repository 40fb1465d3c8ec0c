"""The market demo: the committed samples through the candle store, the recorder and the live path under faults.

1. Import committed 1 h candles (futures REST CSV, freqtrade OHLCV and spot 12-field formats) into a candle store.
2. Import the committed BTCUSDT websocket capture into a recording (sha256 manifest).
3. Serve that recording on 127.0.0.1 with faults (random disconnects, 1 % malformed frames) and receive it with the
   connector on the /public and /market endpoints: every well-formed frame arrives, every malformed one is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path

from cambium.core.errors import DataError
from cambium.market.binance import binance_usdm_venue, route_usdm
from cambium.market.captures import import_capture, iter_hftbacktest
from cambium.market.config import WsConfig
from cambium.market.connector import Connector, ShardStats
from cambium.market.importers import read_kline_file
from cambium.market.recorder import Record, Recorder, read_recording
from cambium.market.replay_server import Faults, ReplayServer
from cambium.market.store import CandleStore, PartitionInfo

__all__ = ["DemoResult", "default_samples", "run_demo"]

CANDLE_FILES = (
    ("klines_1h_futures/BTCUSDT.csv.gz", "futures"),
    ("klines_1h_futures/ETHUSDT.csv.gz", "futures"),
    ("klines_1h_futures_long/BTCUSDT.csv.gz", "futures"),
    ("klines_1h_spot/BTCUSDT.csv.gz", "spot"),
)
CAPTURE = "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"
STREAMS = ["btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@0ms"]


def default_samples() -> Path:
    """data/samples/market of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[3] / "data" / "samples" / "market"


@dataclass
class DemoResult:
    partitions: list[PartitionInfo]
    recorded_frames: int
    served_frames: int
    received_frames: int
    lost_frames: int
    malformed_sent: int
    shards: list[ShardStats]


def run_demo(out: Path, *, samples: Path | None = None, frames: int = 20_000) -> DemoResult:
    """Run the three steps under `out` (created); `frames` bounds the part of the capture that is replayed."""
    samples = samples or default_samples()
    if not (samples / CAPTURE).is_file():
        raise DataError(f"committed samples not found under {samples}; run from a source checkout of cambium")
    out.mkdir(parents=True, exist_ok=True)
    for rel, market in CANDLE_FILES:
        got = read_kline_file(samples / rel)
        CandleStore(out / "store", market).write(got.symbol, got.interval, got.table, merge=True)
    partitions = [p for m in ("futures", "spot") for p in CandleStore(out / "store", m).ls()]
    rec_dir = out / "recording"
    if (rec_dir / "manifest.json").exists():
        for f in rec_dir.iterdir():
            f.unlink()
    if frames >= 93_954:
        import_capture(samples / CAPTURE, rec_dir)
    else:
        with Recorder(rec_dir, meta={"imported_from": CAPTURE, "frames": frames}) as rec:
            for r in itertools.islice(iter_hftbacktest(samples / CAPTURE), frames):
                rec.write(r)
    records = list(read_recording(rec_dir))
    return asyncio.run(_live(records, partitions))


async def _live(records: list[Record], partitions: list[PartitionInfo]) -> DemoResult:
    faults = Faults(drop_every_s=(0.1, 0.4), malformed_prob=0.01, seed=1)
    async with ReplayServer(records, faults=faults, serves=lambda ep, s: route_usdm(s) == ep) as srv:
        cfg = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"),
                       backoff_base_s=0.01, backoff_cap_s=0.1, stale_after_s=5.0)
        conn = Connector(binance_usdm_venue(cfg), STREAMS, cfg)
        want = {ep: srv.frames_for(set(s)) for ep, s in conn.plan}
        total = sum(len(v) for v in want.values())
        got: dict[int, list[str]] = {s.sid: [] for s in conn.shards}

        async def drain() -> None:
            n = 0
            async for rec, _ in conn.deliveries():
                got[rec.shard].append(rec.frame)
                n += 1
                if n == total:
                    return

        async with conn:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain(), timeout=120)
        lost = sum(len(want[s.endpoint]) for s in conn.shards) - sum(
            sum(1 for a, b in zip(got[s.sid], want[s.endpoint], strict=False) if a == b) for s in conn.shards
        )
        received = sum(len(v) for v in got.values())
        return DemoResult(partitions, len(records), srv.stats.frames_sent, received, lost, srv.stats.malformed_sent,
                          conn.stats)
