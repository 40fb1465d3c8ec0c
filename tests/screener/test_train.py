"""`screener train` end to end on the committed 1 m klines and tick captures; the artifacts it writes drive the
ModelRunner (predict_proba protocol, batched prediction, schema hash, fallback targets); the kline features."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cambium.core.config import load_data
from cambium.core.errors import DataError
from cambium.core.runs import list_runs
from cambium.screener.config import ModelConfig, ScreenerConfig
from cambium.screener.model_runner import LightGBMModel, ModelRunner, load_artifacts
from cambium.screener.schema import feature_names
from cambium.screener.train import train
from cambium.screener.training_data import kline_rows

from ._builders import feature_snapshot

KLINES = "data/samples/market/klines_1m_futures/BTCUSDT_2023-07.csv.gz"
CAPTURES = [f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]
QUICK = {"cv_folds": 2, "bootstrap": 10, "lightgbm": {"n_estimators": 20, "min_child_samples": 50}}


@pytest.fixture(scope="module")
def kline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ScreenerConfig, object, Path]:
    work = tmp_path_factory.mktemp("train")
    cfg = load_data({"train": {**QUICK, "data": [KLINES], "max_rows_per_file": 8000,
                               "out_dir": str(work / "art")}}, ScreenerConfig)
    return cfg, train(cfg, work / "runs", show_progress=False), work


def test_training_on_klines_writes_artifacts_a_report_and_a_run(kline_run: tuple) -> None:
    cfg, result, work = kline_run
    art = Path(cfg.train.out_dir)
    manifest = json.loads((art / "manifest.json").read_text())
    # 1 m bars label 2 m and 5 m; 30 s and toxicity are left to the heuristic, and say so
    assert manifest["fallback"] == {"A": ["p_inplay_30s", "p_toxic"], "B": ["p_inplay_30s", "p_toxic"]}
    assert result.unlabelled == ("p_inplay_30s", "p_toxic")
    for stem in ("A_p_inplay_2m", "B_p_inplay_5m"):
        assert (art / f"{stem}.lgb.txt").is_file()
        assert msgspec.json.decode((art / f"{stem}.isotonic.json").read_bytes())["type"] == "isotonic"
        assert msgspec.json.decode((art / f"{stem}.platt.json").read_bytes())["type"] == "platt"
    text = result.report.read_text()
    assert "| heuristic |" in text and "| logistic |" in text and "AUC(lightgbm + isotonic) − AUC(heuristic)" in text
    assert result.report.with_name("report-reliability.png").stat().st_size > 1000
    (run,) = list_runs(work / "runs", "screener")
    assert run.status == "finished" and run.id == result.run_id
    for r in result.reports:
        for m in r.metrics.values():
            assert 0.0 <= m["ece"] <= 1.0 and 0.0 <= m["brier"] <= 1.0 and 0.5 < m["auc"] <= 1.0


def test_the_runner_predicts_with_the_trained_models_in_one_batch(kline_run: tuple) -> None:
    cfg, _, _ = kline_run
    runner = ModelRunner(ModelConfig(artifacts_dir=cfg.train.out_dir))
    assert runner.model_version.endswith("+baseline-v1(A:p_inplay_30s,p_toxic;B:p_inplay_30s,p_toxic)")
    snaps = [feature_snapshot(ts=1000 + i, features={**feature_snapshot().features,
                                                     "realized_vol_bps_60s": 1.0 + i, "ret_bps_60s": -3.0 + i})
             for i in range(6)]
    batch = runner.predict_batch(snaps)
    assert [runner.predict(s) for s in snaps] == batch
    model = runner.artifacts.models[("B", "p_inplay_2m")] if runner.artifacts else None
    assert isinstance(model, LightGBMModel)
    from cambium.screener.schema import feature_vector

    want = model.calibrator(model.raw(feature_vector(snaps)))
    np.testing.assert_allclose([p.p_inplay_2m for p in batch], want)
    base = ModelRunner().predict_batch(snaps)
    assert [p.p_inplay_30s for p in batch] == [p.p_inplay_30s for p in base]  # the fallback target
    assert all(p.calibration_version.startswith("isotonic-") for p in batch)


def test_artifacts_of_another_feature_schema_are_refused(kline_run: tuple, tmp_path: Path) -> None:
    cfg, _, _ = kline_run
    import shutil

    art = shutil.copytree(cfg.train.out_dir, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["feature_schema_hash"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not match the code's feature schema hash"):
        load_artifacts(art)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda p: {**p, "file": "../outside.txt"}, "not a file inside"),
    (lambda p: {**p, "features": ["nope"]}, "unknown"),
    (lambda p: {**p, "features": p["features"][:2]}, "reads 6 features"),
    (lambda p: {**p, "calibration": "A_p_inplay_2m.lgb.txt"}, "invalid calibration"),
])
def test_bad_lightgbm_specs_are_refused(kline_run: tuple, tmp_path: Path, edit: object, match: str) -> None:
    cfg, _, _ = kline_run
    import shutil

    art = shutil.copytree(cfg.train.out_dir, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    spec = manifest["models"]["A"]["p_inplay_2m"]
    spec["params"] = edit(spec["params"])  # type: ignore[operator]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=match):
        load_artifacts(art)


class _Labels:
    """A classifier mistaken for a probability model: 0/1 labels (like sklearn's `predict`)."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return (np.nan_to_num(x[:, 0]) > 0).astype(float)


class _Unnormalised:
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.full((x.shape[0], 2), 0.7)


@pytest.mark.parametrize(("model", "match"), [(_Labels(), r"shape \(2,\), expected \(2, 2\)"),
                                              (_Unnormalised(), "summing to 1")])
def test_predict_proba_is_checked(kline_run: tuple, model: object, match: str) -> None:
    cfg, _, _ = kline_run
    runner = ModelRunner(ModelConfig(artifacts_dir=cfg.train.out_dir))
    assert runner.artifacts is not None
    runner.artifacts.models[("B", "p_inplay_2m")] = model  # type: ignore[assignment]
    with pytest.raises(DataError, match=match):
        runner.predict_batch([feature_snapshot(), feature_snapshot(symbol="ETHUSDT")])


def test_training_on_a_tick_capture_goes_through_the_feature_engine(tmp_path: Path) -> None:
    cfg = load_data({"train": {**QUICK, "source": "ticks", "data": CAPTURES, "embargo_ms": 10_000,
                               "bootstrap_block_ms": 30_000, "out_dir": str(tmp_path / "art"),
                               "lightgbm": {"n_estimators": 20, "min_child_samples": 20}}}, ScreenerConfig)
    result = train(cfg, tmp_path / "runs", show_progress=False)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert result.unlabelled == ()  # a 1 s grid can label every horizon ...
    trained = {k for k, v in manifest["models"].items() for k in (f"{k}/{t}" for t in v)}
    assert trained and all(r.key in trained or r.key == "p_toxic" for r in result.reports)
    # ... but six minutes of two symbols cannot train and evaluate all of them, and the report says which and why
    assert result.skipped and all(key in result.report.read_text() for key in result.skipped)
    assert len(result.reports) + len(result.skipped) == 7
    assert set(manifest["models"]["A"]) | set(manifest["fallback"]["A"]) == {"p_inplay_30s", "p_inplay_2m",
                                                                             "p_inplay_5m", "p_toxic"}
    load_artifacts(tmp_path / "art")


def _kline_loop(open_time: list[int], high: list[float], low: list[float], close: list[float]) -> list[dict]:
    """The kline features of the training_data docstring, bar by bar."""
    out = []
    for i in range(len(close)):
        def back(k: int, i: int = i) -> float | None:
            ok = i >= k and open_time[i] - open_time[i - k] == k * 60_000
            return 1e4 * (math.log(close[i]) - math.log(close[i - k])) if ok else None

        rets = [back(1, j) if j >= 0 else None for j in range(i - 4, i + 1)]
        rv5 = math.sqrt(sum(r * r for r in rets)) if all(r is not None for r in rets) else None  # type: ignore
        rv60 = 1e4 * math.log(high[i] / low[i]) / math.sqrt(4 * math.log(2))
        r5 = back(5)
        out.append({"ret_bps_60s": back(1), "ret_bps_5m": r5, "realized_vol_bps_5m": rv5,
                    "realized_vol_bps_60s": rv60, "regime_vol": rv60 / rv5 if rv5 else None,
                    "regime_trend": abs(r5) / (rv5 + 1e-9) if r5 is not None and rv5 is not None else None})
    return out


@given(st.lists(st.tuples(st.integers(1, 2), st.integers(-30, 30), st.integers(0, 20)), min_size=1, max_size=30))
def test_kline_features_equal_a_bar_by_bar_loop(bars: list[tuple[int, int, int]]) -> None:
    open_time = np.cumsum([60_000 * gap for gap, _, _ in bars]).astype(np.int64)
    close = 100.0 * np.exp(np.cumsum([m for _, m, _ in bars]) * 1e-4)
    high = close * np.exp(np.array([w for _, _, w in bars]) * 1e-4)
    low = close * np.exp(-np.array([w for _, _, w in bars]) * 0.5e-4)
    x = kline_rows(open_time, high, low, close, np.ones(len(bars)), None, None, 60_000)
    names = feature_names()
    for i, want in enumerate(_kline_loop(open_time.tolist(), high.tolist(), low.tolist(), close.tolist())):
        for name, value in want.items():
            got = x[i, names.index(name)]
            if value is None:
                assert math.isnan(got), (i, name)
            else:
                assert got == pytest.approx(value, rel=1e-9, abs=1e-9), (i, name)


@pytest.mark.parametrize(("train_cfg", "match"), [
    ({"data": ["data/samples/nope.csv.gz"]}, "do not exist"),
    ({"data": ["data/samples/market/klines_1h_futures/BTCUSDT.csv.gz"]}, "1h bars can label no horizon"),
    ({"data": ["data/samples/market/activity/usdm_trades_30d.csv"]}, "unknown kline format"),
    ({"source": "ticks", "data": ["data/samples/market/klines_1m_futures/BTCUSDT_2023-07.csv.gz"]},
     "no feature snapshots"),
])
def test_bad_training_inputs_get_one_clear_error(tmp_path: Path, train_cfg: dict, match: str) -> None:
    cfg = load_data({"train": {**QUICK, **train_cfg, "out_dir": str(tmp_path / "art")}}, ScreenerConfig)
    with pytest.raises(DataError, match=match):
        train(cfg, tmp_path / "runs", show_progress=False)
    assert not (tmp_path / "art").exists()


@given(st.binary(max_size=400))
def test_a_hostile_kline_file_is_refused_cleanly(body: bytes) -> None:
    import tempfile

    from cambium.screener.training_data import load_klines

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "XUSDT_2024-01.csv"
        path.write_bytes(b"open_time,open,high,low,close,volume\n" + body)
        try:
            ds = load_klines([path], 0.5, 0.0, ScreenerConfig().model.baseline)
        except DataError as exc:
            assert str(exc)
        else:
            assert ds.x.shape[0] == ds.ts.shape[0]
