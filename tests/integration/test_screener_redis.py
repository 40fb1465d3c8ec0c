"""The sharded screener over Redis Streams (`REDIS_URL`): the workers' predictions reach the ranker through a real
redis-server, and the run ranks every symbol of a synthetic exchange-scale market."""

from __future__ import annotations

from pathlib import Path

from tests.screener._scale import SyntheticMarket, check_rank_events

from cambium.core.config import load
from cambium.screener.config import ScreenerConfig
from cambium.screener.replay import Session
from cambium.screener.shard_transport import RedisChannel
from cambium.screener.shards import ShardedRunner

CONFIG = Path("configs/screener/sample-replay.toml")


def test_sharded_live_run_over_redis_streams_ranks_every_symbol(redis_url: str) -> None:
    cfg = load(CONFIG, ScreenerConfig, ['live.symbols="all"', "live.workers=2", "live.depth_snapshots=true"])
    session = Session(cfg)
    with SyntheticMarket(2.0, 120, "market") as market:
        runner = ShardedRunner(cfg, market.ws, session, workers=2, rest_url=market.rest, redis_url=redis_url,
                               namespace="test-screener-shards")
        assert isinstance(runner.channel, RedisChannel)
        res = runner.run(duration_s=60, until=lambda r: len(r.session.pipeline.ranker.scores()) == 120)
    assert sorted(session.pipeline.ranker.scores()) == market.names
    assert runner.channel.received > 0  # every tick and report went through the stream
    assert all(s["alive"] and s["frames"] > 0 for s in res.shards)
    check_rank_events(res.rank_events, session.digest)
