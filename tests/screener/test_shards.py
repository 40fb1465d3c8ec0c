"""Symbol-sharded workers and one ranker (SCR-13): digests per worker count, exchange-scale live run, worker restart."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.screener._scale import SyntheticMarket, check_rank_events, tagged_records

from cambium.core.config import load
from cambium.market import synthetic
from cambium.market.binance import route_usdm
from cambium.market.config import WsConfig
from cambium.market.recorder import Recorder
from cambium.market.replay_server import ReplayServer
from cambium.screener.config import ScreenerConfig
from cambium.screener.contracts import RankEvent
from cambium.screener.replay import Session, replay
from cambium.screener.shard_replay import replay_sharded
from cambium.screener.shards import ShardedRunner, shard_of

CONFIG = Path("configs/screener/sample-replay.toml")
BUSY = ["ranker.enter_threshold=0.002", "ranker.exit_threshold=0.001", "ranker.enter_confirm_ms=0",
        "ranker.exit_confirm_ms=1000", "ranker.min_dwell_ms=1000"]


def test_replay_digest_does_not_depend_on_the_worker_count(tmp_path: Path) -> None:
    """A recording of the captures' first 45 000 frames (about 90 s: past the model's 60 s warm-up) replayed by one
    process and by 1, 2 and 4 workers, each reading the recording itself: the same RankEvents, the same digest."""
    cfg = load(CONFIG, ScreenerConfig, BUSY)
    with Recorder(tmp_path / "rec") as rec:
        for r, _ in tagged_records(45_000):
            if r.frame.startswith('{"stream"'):
                rec.write(r)
    single = replay([tmp_path / "rec"], cfg)
    assert single.rank_events > 0, "the case must emit rank events for the digest to mean something"
    for workers in (1, 2, 4):
        assert replay_sharded([tmp_path / "rec"], cfg, workers) == (single.digest, single.rank_events), workers


# --- live ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def market540() -> Iterator[SyntheticMarket]:
    with SyntheticMarket(2.0, 540, "market") as srv:
        yield srv


def _scored(runner: ShardedRunner) -> int:
    return len(runner.session.pipeline.ranker.scores())


@pytest.mark.slow
def test_all_540_symbols_are_ranked_through_sharded_workers(market540: SyntheticMarket) -> None:
    """The acceptance case: live.symbols = "all" against the replay server's synthetic 540-symbol exchangeInfo and
    two seconds of market-activity traffic, two workers: every symbol reaches the ranker."""
    cfg = load(CONFIG, ScreenerConfig, ['live.symbols="all"', "live.workers=2", "live.depth_snapshots=true"])
    session = Session(cfg)
    runner = ShardedRunner(cfg, market540.ws, session, workers=2, rest_url=market540.rest)
    res = runner.run(duration_s=90, until=lambda r: _scored(r) == 540)
    assert sorted(session.pipeline.ranker.scores()) == market540.names
    assert [s["symbols"] for s in res.shards] == [sum(shard_of(n, 2) == k for n in market540.names) for k in (0, 1)]
    assert all(s["alive"] and s["frames"] > 0 and isinstance(s["dropped"], dict) for s in res.shards)
    assert sum(s["snapshots"] for s in res.shards) > 0
    check_rank_events(res.rank_events, session.digest)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_no_rank_event_is_lost_or_repeated() -> None:
    cfg = load(CONFIG, ScreenerConfig, [*BUSY, 'live.symbols="all"', "live.workers=2", "live.depth_snapshots=true"])
    session = Session(cfg)
    ticks: list[tuple[int, set[str]]] = []
    on_predictions = session.on_predictions

    def spy(ts: int, preds: list[Any]) -> list[RankEvent]:
        ticks.append((ts, {p.symbol for p in preds}))
        return on_predictions(ts, preds)

    session.on_predictions = spy  # type: ignore[method-assign]
    # The baseline model needs 60 s of bars (realised volatility) before a symbol stops being DATA_ISSUE: 150 s of
    # market-activity traffic over 6 symbols, served at 25 × recorded speed.
    with SyntheticMarket(150.0, 6, "market", speed=25.0) as srv:
        runner = ShardedRunner(cfg, srv.ws, session, workers=2, rest_url=srv.rest)
        state: dict[str, Any] = {}

        def until(r: ShardedRunner) -> bool:
            if "killed" not in state and r.result.rank_events:
                w = r.workers[0]
                state["killed"], state["symbols"] = len(ticks), set(w.symbols)
                os.kill(w.process.pid, signal.SIGKILL)
            after = ticks[state["killed"]:] if "killed" in state else []
            return (r.result.restarts == 1 and sum(1 for _, s in after if s & state["symbols"]) >= 2
                    and r.shard_stats()[0]["snapshots"] >= 2 * len(state["symbols"]))

        res = runner.run(duration_s=60, until=until)
    assert res.restarts == 1
    zero = res.shards[0]
    assert zero["generation"] == 1 and zero["alive"]
    assert zero["snapshots"] >= 2 * len(state["symbols"])  # its books synced at start and resynced after the restart
    assert any(s & state["symbols"] for _, s in ticks[state["killed"]:])  # its symbols are predicted again
    check_rank_events(res.rank_events, session.digest)
    assert res.rank_events, "the run must rank something for the check to mean something"


def test_a_receive_backlog_sheds_the_least_active_symbols_depth_diffs(caplog: pytest.LogCaptureFixture) -> None:
    """The server sends as fast as it can (no pacing) to a consumer told to shed at a 200-frame backlog: the depth
    diffs of the least active symbols are dropped and counted by reason, the busiest symbols are never shed. The
    warning carries the correlation id of the frame batch it was logged in."""
    from cambium.screener.live import run_live
    from cambium.screener.observability import ScreenerMetrics

    recs = [r for r, _ in tagged_records(6_000) if r.frame.startswith('{"stream"')]
    frames = synthetic.replicate(recs, 40, "market")
    cfg = load(CONFIG, ScreenerConfig, ["live.symbols=[" + ",".join(f'"{synthetic.synthetic_name(k)}"'
                                        for k in range(40)) + "]", "live.shed_backlog=200", "live.shed_fraction=0.25",
                                        "live.gc_freeze=false"])

    holder: list[Any] = []

    async def go() -> Any:
        async with ReplayServer(frames, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            return await run_live(cfg, ws, Session(cfg), ScreenerMetrics(), max_events=len(frames), duration_s=60,
                                  connector=holder)

    with caplog.at_level(logging.WARNING, logger="cambium.screener.live"):
        res = asyncio.run(go())
    assert res.shed_episodes >= 1 and res.dropped.get("shed_depth", 0) > 0
    shed_logs = [r for r in caplog.records if "shedding the depth diffs" in r.getMessage()]
    assert shed_logs and all(re.fullmatch(r"[0-9a-f]{16}", r._cambium_context["batch_id"]) for r in shed_logs)
    # one process reports its counters with the keys of the sharded runner's shard stats
    stats = res.process_stats(holder)
    assert stats["dropped"]["shed_depth"] == res.dropped["shed_depth"] and stats["frames"] >= len(frames)
    assert stats.keys() == ShardedRunner(cfg, WsConfig(), Session(cfg), workers=1).shard_stats()[0].keys()
    busiest = {synthetic.synthetic_name(k) for k in range(4)}  # activity_shares is busiest first
    assert res.shed_symbols and not res.shed_symbols & busiest


@pytest.mark.slow
def test_screener_live_symbols_all_against_market_serve_ranks_all_540(tmp_path: Path,
                                                                      market540: SyntheticMarket) -> None:
    """The acceptance command: `cambium screener live --symbols all --workers 2 --local <market serve address>`
    against the synthetic 540-symbol exchangeInfo and recorded traffic; the run's summary counts 540 symbols scored."""
    from typer.testing import CliRunner

    from cambium.screener.cli import app

    args = ["live", "--symbols", "all", "--workers", "2", "--local", f"ws://127.0.0.1:{market540.port}",
            "--duration", "6", "--config", str(CONFIG), "--set", "live.depth_snapshots=true",
            "--runs-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "540 symbols scored" in output and "0 restarts" in output


def test_worker_incidents_survive_a_restart_and_reach_the_metrics() -> None:
    """A worker's rate-limit incidents (handshakes and REST) are kept across its restarts and exported as the
    `cambium_screener_incidents_total{source="ws"}` counter."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from cambium.screener.observability import ScreenerMetrics, status_app

    cfg = load(CONFIG, ScreenerConfig, ['live.symbols=["BTCUSDT","ETHUSDT"]'])
    runner = ShardedRunner(cfg, WsConfig(), Session(cfg), workers=2)
    w = runner.workers[0]
    w.base["incidents"] = {"418": 1}  # what an earlier generation reported before it died
    w.stats = {"incidents": {"429": 2}, "rest_incidents": {"429": 1}, "dropped": {}}
    assert runner.shard_stats()[0]["incidents"] == {"418": 1, "429": 2}
    metrics = ScreenerMetrics()
    metrics.watch(workers=runner.shard_stats)
    text = TestClient(status_app(Session(cfg), metrics, lambda: []), base_url="http://127.0.0.1").get("/metrics").text
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "cambium_screener_incidents")
    got = {(s.labels["source"], s.labels["status"]): s.value for s in fam.samples if s.name.endswith("_total")}
    assert got[("ws", "429")] == 2.0 and got[("ws", "418")] == 1.0 and got[("rest", "429")] == 1.0
