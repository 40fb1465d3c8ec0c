"""The post-feature pipeline: model → score → rank → storage, notifiers and the replay digest, deterministic."""

from __future__ import annotations

from collections.abc import Sequence
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
        posted = [decode(body, RankEvent) for _, body in server.requests]
    # every ALERT reaches the webhook with its template explanation; the stored events are the ranked ones
    alerts = [e for e in posted if e.event.startswith("ALERT_")]
    assert alerts and all(str(e.payload["headline"]).startswith(f"{e.symbol} ") and e.payload["explanation"]
                          for e in alerts)
    assert [msgspec.structs.replace(e, payload={k: v for k, v in e.payload.items()
                                                if k not in ("headline", "explanation")}) for e in posted] == events
    assert read_rank_events(tmp_path) == events
    con = connect(tmp_path)
    assert con.execute("SELECT count(*) FROM predictions").fetchone() == (90,)
    assert con.execute("SELECT count(DISTINCT symbol) FROM features").fetchone() == (3,)


def test_failing_snapshots_are_counted_and_skipped() -> None:
    class Flaky(ModelRunner):
        def predict_batch(self, snaps: Sequence[FeatureSnapshot],  # type: ignore[override]
                          profile: str | None = None) -> list[PredictionSnapshot]:
            if any(snap.symbol == "ETHUSDT" for snap in snaps):
                raise DataError("model returned nan")
            return super().predict_batch(snaps)

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


def test_alert_explanations_reach_the_status_page_and_telegram() -> None:
    from fastapi.testclient import TestClient

    from cambium.screener.notify import telegram_text
    from cambium.screener.observability import ScreenerMetrics, status_app
    from cambium.screener.replay import Session

    session = Session(CFG)
    seen: list[RankEvent] = []

    class Collect:
        def offer(self, event: RankEvent) -> bool:
            seen.append(event)
            return True

        def close(self) -> None: ...

    session.pipeline.notifiers.append(Collect())
    for ts, snaps in ticks()[:14]:
        session.pipeline.step(ts, snaps)
    alerts = [e for e in seen if e.event.startswith("ALERT_")]
    assert alerts
    last = alerts[-1]
    out = session.pipeline.explanations[last.symbol]
    assert out.headline == last.payload["headline"] and out.subtext == last.payload["explanation"]
    assert telegram_text(last).splitlines()[1:] == [out.headline, out.subtext]
    listed = {s for s, _ in session.pipeline.ranker.ranked()}
    client = TestClient(status_app(session, ScreenerMetrics(), lambda: []), base_url="http://127.0.0.1")
    top = {r["symbol"]: r["explanation"] for r in client.get("/api/status").json()["top"]}
    assert top[last.symbol] == {"headline": out.headline, "subtext": out.subtext} and last.symbol in listed
    assert out.headline in client.get("/").text
