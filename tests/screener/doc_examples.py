"""Builds the examples of docs/screener/contracts.md from the committed BTCUSDT capture.

The FeatureSnapshot is the feature engine's (SCR-2) last snapshot of
data/samples/market/ws/binance_usdm_hftbacktest/btcusdt_20240808.gz (all 93,954 frames, the inline REST depth snapshot
included); the other examples follow from it through the real ModelRunner, Scorer, Ranker and explain template.
Run `python tests/screener/doc_examples.py` to print the blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from cambium.screener.config import ExplainConfig, RankerConfig
from cambium.screener.contracts import ExplainInput, FeatureSnapshot
from cambium.screener.explain import template_output
from cambium.screener.features import FeatureEngine
from cambium.screener.model_runner import ModelRunner
from cambium.screener.ranker import Ranker
from cambium.screener.scorer import Scorer
from cambium.screener.sources import DecodeStats, iter_events

ROOT = Path(__file__).resolve().parents[2]
CAPTURE = ROOT / "data" / "samples" / "market" / "ws" / "binance_usdm_hftbacktest" / "btcusdt_20240808.gz"


def feature_snapshot_from_capture() -> tuple[FeatureSnapshot, int]:
    """The feature engine's last snapshot of the capture (after 5 minutes every feature exists), and the frame count."""
    stats = DecodeStats()
    snapshots = FeatureEngine().run(iter_events(CAPTURE, stats=stats))
    return snapshots[-1], stats.frames


def examples() -> dict[str, msgspec.Struct]:
    snap, _ = feature_snapshot_from_capture()
    runner = ModelRunner()
    pred = runner.predict(snap)
    missing = runner.predict(msgspec.structs.replace(snap, features={**snap.features, "impact_bps": None}))
    _, scored = Scorer().apply(pred)
    score = scored.score
    # These calm minutes of BTC score far below the default enter_threshold (0.25); thresholds low enough for it to
    # enter make the real Ranker emit a real event.
    low = RankerConfig(enter_threshold=0.01, exit_threshold=0.005, enter_confirm_ms=0)
    (event,) = Ranker(low).update(pred.ts, [scored])
    explain_in = ExplainInput(symbol=pred.symbol, timeframe="2m", status=pred.status, score=round(score, 4),
                              reasons=pred.reasons,
                              numeric_summary={"spread_bps": round(snap.features["spread_bps"] or 0.0, 4),
                                               "p_inplay_2m": round(pred.p_inplay_2m, 4),
                                               "p_toxic": round(pred.p_toxic, 4)})
    return {"feature_snapshot": snap, "prediction_snapshot": pred, "prediction_snapshot_data_issue": missing,
            "rank_event": event, "explain_input": explain_in,
            "explain_output": template_output(explain_in, ExplainConfig())}


def block(obj: msgspec.Struct) -> str:
    return json.dumps(msgspec.to_builtins(obj), indent=2, ensure_ascii=False)


if __name__ == "__main__":
    print("frames read:", feature_snapshot_from_capture()[1])
    for name, obj in examples().items():
        print(f"<!-- example:{name} -->\n```json\n{block(obj)}\n```\n")
