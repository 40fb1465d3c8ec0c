"""SCR-9: Parquet writing (batched, rotated, atomic) and the DuckDB round-trip of all three record kinds."""

from __future__ import annotations

from pathlib import Path

import pytest

from cambium.core.errors import DataError
from cambium.screener.config import StorageConfig
from cambium.screener.contracts import DataHealth
from cambium.screener.storage import ScreenerStore, connect, read_features, read_predictions, read_rank_events

from ._builders import feature_snapshot, prediction, rank_event


def _records(n: int):  # type: ignore[no-untyped-def]
    feats = [feature_snapshot(ts=1723161256313 + i * 1000, symbol=("BTCUSDT", "ETHUSDT")[i % 2],
                              features={"mid": 61800.25 + i, "spread_bps": 0.016 * (i + 1), "impact_bps": None},
                              windows={"10s": {"ret_bps": -0.5 * i, "n_trades": float(i)}, "5m": {}},
                              data_health=DataHealth(i, 2 * i, ("depth",) if i % 3 == 0 else ()))
             for i in range(n)]
    preds = [prediction(ts=1723161256313 + i * 1000, p_inplay_2m=i / n, reasons=("TOXIC_GATE", "FLOW_BUY")[: i % 3],
                        status=("WATCH", "TRADEABLE", "DATA_ISSUE")[i % 3]) for i in range(n)]
    events = [rank_event(ts=1723161256313 + i, rank=i % 20 + 1, score=(i % 7) / 7,
                         payload={"status": "WATCH", "reasons": ("A", "B"), "n": i, "x": i / 3, "none": None})
              for i in range(n)]
    return feats, preds, events


def test_round_trip_through_parquet_and_duckdb(tmp_path: Path) -> None:
    feats, preds, events = _records(257)
    cfg = StorageConfig(batch_rows=50, rotate_rows=100)
    with ScreenerStore(cfg, root=tmp_path) as store:
        for obj in [*feats, *preds, *events]:
            store.write(obj)
    assert read_features(tmp_path) == feats
    assert read_predictions(tmp_path) == preds
    assert read_rank_events(tmp_path) == events
    # Rotation: 257 rows at 100 per file → 3 files per kind, no temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == [
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    con = connect(tmp_path)
    assert con.execute("SELECT count(*) FROM rank_events").fetchone() == (257,)
    row = con.execute("SELECT symbol, features['spread_bps'], windows['10s']['ret_bps'] FROM features "
                      "WHERE ts = 1723161256313 + 4000").fetchone()
    assert row == ("BTCUSDT", pytest.approx(0.016 * 5), -2.0)
    counts = dict(con.execute("SELECT status, count(*) FROM predictions GROUP BY status").fetchall())
    assert counts == {"WATCH": 86, "TRADEABLE": 86, "DATA_ISSUE": 85}


def test_unflushed_rows_are_invisible_and_reopening_appends(tmp_path: Path) -> None:
    cfg = StorageConfig(batch_rows=10, rotate_rows=10)
    store = ScreenerStore(cfg, root=tmp_path)
    _, _, events = _records(15)
    for ev in events:
        store.write(ev)
    # 10 rows reached rotate_rows → one complete file; 5 rows still buffered.
    assert len(read_rank_events(tmp_path)) == 10
    store.close()
    assert read_rank_events(tmp_path) == events
    with ScreenerStore(cfg, root=tmp_path) as again:
        again.write(events[0])
    assert len(read_rank_events(tmp_path)) == 16
    assert (tmp_path / "rank_events" / "part-000002.parquet").exists()
    with pytest.raises(DataError, match="no features files"):
        read_features(tmp_path)
