"""Throughput of the wire contracts: construct + encode, and strict decode, against a pydantic reference.

`contract_throughput()` returns benchmark records in the bench/ convention (case, metric, value, unit, reference,
reference_value, ratio); the reference is the same contract written as a strict pydantic v2 model (the
project's config library), built and dumped to JSON the same way. Run: `python -m bench.screener_contracts [--quick]`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.common import machine, parse_args, write_results
from cambium.screener.contracts import DataHealth, FeatureSnapshot, PredictionSnapshot, RankEvent, decode, encode
from cambium.screener.digest import canonical_json
from cambium.screener.schema import feature_names

__all__ = ["contract_throughput"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _PHealth(_Strict):
    stale_book_ms: int = Field(ge=0)
    stale_trades_ms: int = Field(ge=0)
    missing_streams: tuple[str, ...] = ()


class _PPrediction(_Strict):
    ts: int = Field(ge=0)
    symbol: str
    profile: Literal["A", "B"]
    p_inplay_30s: float = Field(ge=0, le=1)
    p_inplay_2m: float = Field(ge=0, le=1)
    p_inplay_5m: float = Field(ge=0, le=1)
    expected_utility_bps_2m: float
    p_toxic: float = Field(ge=0, le=1)
    status: Literal["TRADEABLE", "WATCH", "TRAP", "DEAD", "DATA_ISSUE"]
    reasons: tuple[str, ...]
    model_version: str
    calibration_version: str
    data_health: _PHealth


class _PFeatures(_Strict):
    ts: int = Field(ge=0)
    symbol: str
    features: dict[str, float | None]
    windows: dict[str, dict[str, float | None]]
    data_health: _PHealth


def _rate(fn: Callable[[int], Any], n: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return n / best


def contract_throughput(n: int = 100_000) -> list[dict[str, Any]]:
    names = feature_names()
    feats: dict[str, float | None] = {name: 1.0 + i / 7 for i, name in enumerate(names)}
    windows: dict[str, dict[str, float | None]] = {w: {"ret_bps": 0.5, "n_trades": 3.0}
                                                   for w in ("1s", "10s", "60s", "5m")}

    def pred_msgspec(k: int) -> None:
        for i in range(k):
            encode(PredictionSnapshot(ts=1723161256313 + i, symbol="BTCUSDT", profile="B", p_inplay_30s=0.3,
                                      p_inplay_2m=0.5, p_inplay_5m=0.6, expected_utility_bps_2m=20.0, p_toxic=0.1,
                                      status="WATCH", reasons=("TOXIC_GATE",), model_version="baseline-v1",
                                      calibration_version="none", data_health=DataHealth(12, 340)))

    def pred_pydantic(k: int) -> None:
        for i in range(k):
            _PPrediction(ts=1723161256313 + i, symbol="BTCUSDT", profile="B", p_inplay_30s=0.3, p_inplay_2m=0.5,
                         p_inplay_5m=0.6, expected_utility_bps_2m=20.0, p_toxic=0.1, status="WATCH",
                         reasons=("TOXIC_GATE",), model_version="baseline-v1", calibration_version="none",
                         data_health=_PHealth(stale_book_ms=12, stale_trades_ms=340)).model_dump_json()

    def feat_msgspec(k: int) -> None:
        for i in range(k):
            encode(FeatureSnapshot(ts=1723161256313 + i, symbol="BTCUSDT", features=feats, windows=windows,
                                   data_health=DataHealth(12, 340)))

    def feat_pydantic(k: int) -> None:
        for i in range(k):
            _PFeatures(ts=1723161256313 + i, symbol="BTCUSDT", features=feats, windows=windows,
                       data_health=_PHealth(stale_book_ms=12, stale_trades_ms=340)).model_dump_json()

    sample = encode(PredictionSnapshot(ts=1723161256313, symbol="BTCUSDT", profile="B", p_inplay_30s=0.3,
                                       p_inplay_2m=0.5, p_inplay_5m=0.6, expected_utility_bps_2m=20.0, p_toxic=0.1,
                                       status="WATCH", reasons=("TOXIC_GATE",), model_version="baseline-v1",
                                       calibration_version="none", data_health=DataHealth(12, 340)))

    def decode_msgspec(k: int) -> None:
        for _ in range(k):
            decode(sample, PredictionSnapshot)

    def decode_pydantic(k: int) -> None:
        for _ in range(k):
            _PPrediction.model_validate_json(sample)

    def canonical(k: int) -> None:
        for i in range(k):
            canonical_json(RankEvent(ts=1723161256313 + i, event="SYMBOL_ENTER", symbol="BTCUSDT", rank=3,
                                     score=0.42, payload={"status": "WATCH", "reasons": ("TOXIC_GATE",)}))

    records = []
    for case, ours, ref in [("PredictionSnapshot construct+encode", pred_msgspec, pred_pydantic),
                            ("FeatureSnapshot construct+encode (19 features, 4 windows)", feat_msgspec, feat_pydantic),
                            ("PredictionSnapshot strict decode", decode_msgspec, decode_pydantic)]:
        value, ref_value = _rate(ours, n), _rate(ref, n)
        records.append({"case": case, "metric": "throughput", "value": value, "unit": "msg/s",
                        "reference": "pydantic v2 strict model", "reference_value": ref_value,
                        "ratio": value / ref_value})
    value = _rate(canonical, n)
    records.append({"case": "RankEvent construct+canonical_json", "metric": "throughput", "value": value,
                    "unit": "msg/s", "reference": None, "reference_value": None, "ratio": None})
    return records


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("screener contract throughput against strict pydantic models", argv)
    facts = machine("cpu")
    records = [{**r, "machine": facts} for r in contract_throughput(10_000 if args.quick else 100_000)]
    write_results("screener_contracts", records, args.results_dir)


if __name__ == "__main__":
    main()
