"""Shared builders for screener tests (real values from the committed BTCUSDT capture where it matters)."""

from __future__ import annotations

from cambium.screener.contracts import DataHealth, FeatureSnapshot, PredictionSnapshot, RankEvent

HEALTHY = DataHealth(stale_book_ms=12, stale_trades_ms=340, missing_streams=())


def feature_snapshot(**over: object) -> FeatureSnapshot:
    # Values from line 2 of data/samples/market/ws/binance_usdm_hftbacktest/btcusdt_20240808.gz (bookTicker
    # b=61800.20 B=2.507 a=61800.30 A=2.510, E=1723161256313).
    base: dict[str, object] = dict(
        ts=1723161256313, symbol="BTCUSDT",
        features={"mid": 61800.25, "microprice": 61800.250024, "spread_bps": 0.016181, "book_imbalance": -0.000598,
                  "impact_bps": 0.4, "realized_vol_bps_60s": 3.0, "flow_imbalance_10s": 0.2,
                  "trade_rate_10s": None},
        windows={"10s": {"ret_bps": 0.5, "n_trades": 3.0}},
        data_health=HEALTHY)
    base.update(over)
    return FeatureSnapshot(**base)  # type: ignore[arg-type]


def prediction(**over: object) -> PredictionSnapshot:
    base: dict[str, object] = dict(
        ts=1723161256313, symbol="BTCUSDT", profile="B", p_inplay_30s=0.3, p_inplay_2m=0.5, p_inplay_5m=0.6,
        expected_utility_bps_2m=20.0, p_toxic=0.1, status="WATCH", reasons=(), model_version="baseline-v1",
        calibration_version="none", data_health=HEALTHY)
    base.update(over)
    return PredictionSnapshot(**base)  # type: ignore[arg-type]


def rank_event(**over: object) -> RankEvent:
    base: dict[str, object] = dict(ts=1723161256313, event="SYMBOL_ENTER", symbol="BTCUSDT", rank=1, score=0.42,
                                   payload={"status": "TRADEABLE", "reasons": ("HIGH_SCORE",)})
    base.update(over)
    return RankEvent(**base)  # type: ignore[arg-type]
