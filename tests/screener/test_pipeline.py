"""The post-feature pipeline: model → score → rank → storage, notifiers and the replay digest, deterministic."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from cambium.core.config import load_data
from cambium.core.errors import ConfigError, DataError
from cambium.screener.config import CONFIG_MODEL, NotifyConfig, StorageConfig
from cambium.screener.contracts import FeatureSnapshot, PredictionSnapshot, RankEvent, decode
from cambium.screener.model_runner import ModelRunner
from cambium.screener.pipeline import Pipeline, build_notifiers
from cambium.screener.storage import ScreenerStore, connect, read_rank_events

from ._builders import HEALTHY
from ._http import LocalServer
from .doc_examples import feature_snapshot_from_capture

CFG = load_data({}, CONFIG_MODEL, ["ranker.enter_confirm_ms=2000", "ranker.exit_confirm_ms=3000",
                                   "ranker.min_dwell_ms=5000", "ranker.top_k=2"])


def ticks() -> list[tuple[int, list[FeatureSnapshot]]]:
    """30 one-second ticks for 3 symbols; the real capture snapshot scaled so volatility rises then falls."""
    base, _ = feature_snapshot_from_capture()
    out = []
    for k in range(30):
        ts = base.ts + 1000 * k
        snaps = []
        for j, symbol in enumerate(("BTCUSDT", "ETHUSDT", "SOLUSDT")):
            vol = 2.0 + 40.0 * max(0.0, 1.0 - abs(k - 8 - 4 * j) / 8)
            feats = {**base.features, "realized_vol_bps_60s": vol, "flow_imbalance_10s": 0.6}
            snaps.append(msgspec.structs.replace(base, ts=ts, symbol=symbol, features=feats, data_health=HEALTHY))
        out.append((ts, snaps))
    return out


def run(store: ScreenerStore | None = None, notifiers: list | None = None) -> tuple[list[RankEvent], Pipeline]:
    pipe = Pipeline(CFG, store=store, notifiers=notifiers or [])
    events = []
    for ts, snaps in ticks():
        events += pipe.step(ts, snaps)
    pipe.close()
    return events, pipe


def test_pipeline_is_deterministic_and_emits_deltas() -> None:
    events, pipe = run()
    again, pipe2 = run()
    assert events == again and pipe.digest.hexdigest() == pipe2.digest.hexdigest()
    kinds = [(e.event, e.symbol) for e in events]
    assert ("SYMBOL_ENTER", "BTCUSDT") in kinds and ("SYMBOL_EXIT", "BTCUSDT") in kinds
    members: set[str] = set()
    for e in events:
        if e.event == "SYMBOL_ENTER":
            members.add(e.symbol)
        elif e.event == "SYMBOL_EXIT":
            members.remove(e.symbol)
        assert len(members) <= 2
    assert members == set(pipe.ranker.members())
    assert pipe.counts["snapshots"] == 90 and pipe.counts["events"] == len(events)


def test_pipeline_writes_storage_and_notifies(tmp_path: Path) -> None:
    with LocalServer(lambda path, body: (200, b"{}", 0.0)) as server:
        notify = load_data({"webhook": {"enabled": True, "url": server.url + "/hook", "rate_per_s": 1000.0,
                                        "burst": 1000}}, NotifyConfig)
        store = ScreenerStore(StorageConfig(batch_rows=16, rotate_rows=64), root=tmp_path)
        events, _ = run(store, build_notifiers(notify, env={}))
        assert [decode(body, RankEvent) for _, body in server.requests] == events
    assert read_rank_events(tmp_path) == events
    con = connect(tmp_path)
    assert con.execute("SELECT count(*) FROM predictions").fetchone() == (90,)
    assert con.execute("SELECT count(DISTINCT symbol) FROM features").fetchone() == (3,)


def test_failing_snapshots_are_counted_and_skipped() -> None:
    class Flaky(ModelRunner):
        def predict(self, snap: FeatureSnapshot, profile: str | None = None) -> PredictionSnapshot:  # type: ignore[override]
            if snap.symbol == "ETHUSDT":
                raise DataError("model returned nan")
            return super().predict(snap)

    pipe = Pipeline(CFG, runner=Flaky())
    for ts, snaps in ticks()[:3]:
        pipe.step(ts, snaps)
    assert pipe.counts["errors"] == 3 and pipe.counts["snapshots"] == 6


def test_telegram_needs_its_token_in_the_environment() -> None:
    notify = load_data({"telegram": {"enabled": True, "chat_id": "1"}}, NotifyConfig)
    with pytest.raises(ConfigError, match="CAMBIUM_TELEGRAM_TOKEN"):
        build_notifiers(notify, env={})
    (tg,) = build_notifiers(notify, env={"CAMBIUM_TELEGRAM_TOKEN": "x"})
    tg.close()
