"""`screener train` from a stored Binance archive day (aggTrades + bookTicker, as `cambium market archive` keeps
them): through the feature engine, every horizon labelled, models written or a reason given per target."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cambium.core.config import load_data
from cambium.core.errors import DataError
from cambium.market.archive_events import archive_events, find_archive
from cambium.screener.config import ScreenerConfig
from cambium.screener.features import FeatureEngine
from cambium.screener.model_runner import TARGETS
from cambium.screener.schema import feature_vector
from cambium.screener.train import train
from cambium.screener.training_data import _archive_rows, load_ticks

T0 = 1_723_075_200_000  # 2024-08-08 00:00 UTC
QUICK = {"source": "ticks", "cv_folds": 2, "bootstrap": 10, "embargo_ms": 30_000,
         "lightgbm": {"n_estimators": 20, "min_child_samples": 20}}


def synthetic_day(root: Path, seconds: int = 2400, seed: int = 0) -> Path:
    """A random-walk mid (≈ 3 bps a second), one quote and one or two aggTrades a second, taker side following
    the next move; the bookTicker file without a header row, the aggTrades file with one (both variants)."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(0.0, 3e-4, seconds)
    mid = 100.0 * np.exp(np.cumsum(steps))
    books, trades = [], []
    agg = 1
    for i in range(seconds):
        t = T0 + 1000 * i + int(rng.integers(0, 400))
        bid, ask = mid[i] * (1 - 0.5e-4), mid[i] * (1 + 0.5e-4)
        books.append(f"{10 * i + 1},{bid:.5f},{rng.uniform(200, 800):.3f},{ask:.5f},{rng.uniform(200, 800):.3f},"
                     f"{t - 1},{t}")
        for k in range(1 + int(rng.integers(0, 2))):
            up = i + 1 < seconds and steps[i + 1] > 0
            maker = "false" if (up if rng.uniform() < 0.8 else not up) else "true"
            price = ask if maker == "false" else bid
            trades.append(f"{agg},{price:.5f},{rng.uniform(0.1, 5):.3f},{agg},{agg},{t + 100 + 50 * k},{maker}")
            agg += 1
    for kind, rows, header in (("bookTicker", books, ""), ("aggTrades", trades,
                               "agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,"
                               "is_buyer_maker\n")):
        path = root / "futures" / kind / "SYNUSDT" / f"SYNUSDT-{kind}-2024-08-08.csv.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress((header + "\n".join(rows) + "\n").encode(), mtime=0))
    return root


def test_training_from_an_archive_day_labels_every_horizon(tmp_path: Path) -> None:
    root = synthetic_day(tmp_path / "archive")
    cfg = load_data({"train": {**QUICK, "data": [str(root)], "out_dir": str(tmp_path / "art")}}, ScreenerConfig)
    ds = load_ticks([root], cfg.features, cfg.model.baseline)
    assert ds.targets == TARGETS and ds.x.shape[0] >= 2300 and set(ds.symbol.tolist()) == {"SYNUSDT"}
    assert [f.name for f in ds.files] == ["SYNUSDT-aggTrades-2024-08-08.csv.gz", "SYNUSDT-bookTicker-2024-08-08.csv.gz"]
    assert "impact_bps" in ds.features and "flow_imbalance_10s" in ds.features  # top-of-book impact: the clip fits
    result = train(cfg, tmp_path / "runs", show_progress=False)
    assert result.unlabelled == ()
    trained = {r.key for r in result.reports}
    # every label is either trained or skipped with a reason, never silently dropped
    assert trained | set(result.skipped) == set(ds.labels) and not trained & set(result.skipped)
    assert {"A/p_inplay_30s", "p_toxic"} <= trained, result.skipped
    assert all(reason for reason in result.skipped.values())
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["model_version"].startswith("lgbm-ticks-")
    assert "p_toxic" in manifest["models"]["A"] and "p_inplay_30s" in manifest["models"]["A"]
    report = result.report.read_text()
    assert "SYNUSDT" in report
    for key, reason in result.skipped.items():
        assert f"not trained: {key}" in report and reason[:40] in report


def test_an_archive_day_without_its_pair_is_refused_by_train(tmp_path: Path) -> None:
    root = synthetic_day(tmp_path / "archive", seconds=30)
    next(root.rglob("SYNUSDT-bookTicker-*.csv.gz")).unlink()
    cfg = load_data({"train": {**QUICK, "data": [str(root / "futures")], "out_dir": str(tmp_path / "art")}},
                    ScreenerConfig)
    with pytest.raises(DataError, match="no bookTicker day 2024-08-08"):
        train(cfg, tmp_path / "runs", show_progress=False)


def test_an_archive_directory_under_the_klines_source_says_which_source_reads_it(tmp_path: Path) -> None:
    root = synthetic_day(tmp_path / "archive", seconds=30)
    cfg = load_data({"train": {"source": "klines", "data": [str(root)], "out_dir": str(tmp_path / "art")}},
                    ScreenerConfig)
    with pytest.raises(DataError, match=r"set train\.source=ticks"):
        train(cfg, tmp_path / "runs", show_progress=False)


def test_rows_built_chunk_by_chunk_equal_the_engine_run_at_once(tmp_path: Path) -> None:
    (session,) = find_archive(synthetic_day(tmp_path / "archive", seconds=400)) or []
    snaps = FeatureEngine().run(archive_events(session))
    x, ts = _archive_rows(archive_events(session), FeatureEngine(), chunk=7)
    assert ts.tolist() == [s.ts for s in snaps] and len(snaps) >= 399
    np.testing.assert_array_equal(x, feature_vector(snaps))
