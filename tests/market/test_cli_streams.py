from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

from typer.testing import CliRunner

from cambium.market.captures import iter_hftbacktest
from cambium.market.cli import app
from cambium.market.recorder import read_manifest, read_recording
from cambium.market.replay_server import Faults, ReplayServer

BTC = "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"
CF = "ws/binance_cryptofeed/2021-07-22_usdm/BINANCE_FUTURES.ws.1.0.gz"


def test_import_capture_and_replay_commands(samples: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["import-capture", str(samples / CF), str(tmp_path / "rec"), "--kind", "cryptofeed"])
    assert res.exit_code == 0, res.output
    assert "1535 frames, 0 lines skipped" in res.output
    res = runner.invoke(app, ["replay", str(tmp_path / "rec")])
    assert res.exit_code == 0, res.output
    assert "1535 frames, events book=1377, kline=67, trade=91, 0 not decodable" in res.output


def test_record_command_against_the_replay_server(samples: Path, tmp_path: Path) -> None:
    records = list(itertools.islice(iter_hftbacktest(samples / BTC), 3000))
    ready = threading.Event()
    box: list = []

    def serve() -> None:
        async def main() -> None:
            async with ReplayServer(records, faults=Faults(drop_after=800)) as srv:
                done = asyncio.Event()
                box.extend([srv, asyncio.get_running_loop(), done])
                ready.set()
                await done.wait()

        asyncio.run(main())

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert ready.wait(10)
    srv = box[0]
    streams = ["btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@0ms"]
    want = len(srv.frames_for(set(streams)))
    res = CliRunner().invoke(app, [
        "record", str(tmp_path / "rec"), "--streams", ",".join(streams), "--max-frames", str(want),
        "--duration", "60", "--set", f"ws.futures_public_url={srv.url()}", "--set",
        f"ws.futures_market_url={srv.url()}", "--set", "ws.backoff_base_s=0.01", "--set", "ws.backoff_cap_s=0.02",
    ])
    box[1].call_soon_threadsafe(box[2].set)
    th.join(10)
    assert res.exit_code == 0, res.output
    got = list(read_recording(tmp_path / "rec"))
    assert len(got) == want == read_manifest(tmp_path / "rec")["frames"]
    by_shard: dict[int, list[str]] = {}
    for r in got:
        by_shard.setdefault(r.shard, []).append(r.frame)
    assert sorted(map(len, by_shard.values())) == sorted(
        [len(srv.frames_for({"btcusdt@trade"})), len(srv.frames_for({"btcusdt@bookTicker", "btcusdt@depth@0ms"}))]
    )
    assert "malformed" in res.output


def test_demo_loses_nothing(samples: Path, tmp_path: Path) -> None:
    from cambium.market.demo import run_demo

    res = run_demo(tmp_path, samples=samples, frames=4000)
    assert res.recorded_frames == 4000 and res.lost_frames == 0
    assert res.received_frames == res.served_frames == 3999  # all but the inline REST snapshot line
    assert sum(s.malformed for s in res.shards) == res.malformed_sent
    rows = {(p.market, p.symbol, p.rows) for p in res.partitions}
    assert rows >= {("spot", "BTCUSDT", 9458), ("futures", "ETHUSDT", 4500)}
