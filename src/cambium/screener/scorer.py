"""Scorer: one number in [0, 1] per prediction, and the status rules with their toxicity gates.

    score = (w_30s·p30 + w_2m·p2m + w_5m·p5m) × clamp(utility_bps_2m, 0, cap)/cap × (1 − toxic_penalty·p_toxic)

With the weights summing to 1 (checked by the config) every factor is in [0, 1], so the score is too.

Status rules, first match wins (reason codes in brackets):
1. DATA_ISSUE — book older than max_stale_book_ms [STALE_BOOK], no trade for max_stale_trades_ms [STALE_TRADES], a
   stream missing [MISSING_STREAM:<name>], or the model could not read a feature it needs (it says so with a
   MISSING_FEATURE:<name> reason).
2. TRAP — p_toxic ≥ trap_min_toxic while a move is likely (p_inplay_2m ≥ trap_min_p2m) [TOXIC_FLOW].
3. TRADEABLE — score ≥ tradeable_min_score, p_toxic < tradeable_max_toxic and utility ≥ tradeable_min_utility_bps
   [HIGH_SCORE].
4. DEAD — score < dead_max_score [LOW_SCORE].
5. WATCH otherwise; gates that blocked TRADEABLE are named [TOXIC_GATE, LOW_UTILITY, BELOW_TRADEABLE].
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from cambium.screener.config import ScorerConfig, StatusConfig
from cambium.screener.contracts import DataHealth, PredictionSnapshot, Status

__all__ = ["RULE_REASONS", "Scored", "Scorer", "data_health_reasons", "is_rule_reason", "reference_score"]


@dataclass(frozen=True, slots=True)
class Scored:
    """What the ranker needs about one symbol at one instant."""

    ts: int
    symbol: str
    score: float
    status: Status
    reasons: tuple[str, ...]


def reference_score(p30: float, p2m: float, p5m: float, utility_bps: float, p_toxic: float) -> float:
    """The default formula written out literally (the closed form tests compare against)."""
    return (0.2 * p30 + 0.5 * p2m + 0.3 * p5m) * min(max(utility_bps, 0.0), 50.0) / 50.0 * (1.0 - 0.5 * p_toxic)


def data_health_reasons(health: DataHealth, cfg: StatusConfig) -> tuple[str, ...]:
    """Reason codes for every way `health` is bad under `cfg` (empty when healthy)."""
    reasons: list[str] = []
    if health.stale_book_ms > cfg.max_stale_book_ms:
        reasons.append("STALE_BOOK")
    if health.stale_trades_ms > cfg.max_stale_trades_ms:
        reasons.append("STALE_TRADES")
    reasons.extend(f"MISSING_STREAM:{name}" for name in health.missing_streams)
    return tuple(reasons)


class Scorer:
    """Turns PredictionSnapshots into scores and statuses; pure and stateless."""

    def __init__(self, scorer: ScorerConfig | None = None, status: StatusConfig | None = None) -> None:
        self.cfg = scorer or ScorerConfig()
        self.status_cfg = status or StatusConfig()

    def score_of(self, p30: float, p2m: float, p5m: float, utility_bps: float, p_toxic: float) -> float:
        c = self.cfg
        blend = c.w_30s * p30 + c.w_2m * p2m + c.w_5m * p5m
        utility = min(max(utility_bps, 0.0), c.utility_cap_bps) / c.utility_cap_bps
        score = blend * utility * (1.0 - c.toxic_penalty * p_toxic)
        # Rounding in the weighted sum can overshoot 1 by an ulp; the contract says [0, 1].
        return min(max(score, 0.0), 1.0)

    def score(self, pred: PredictionSnapshot) -> float:
        return self.score_of(pred.p_inplay_30s, pred.p_inplay_2m, pred.p_inplay_5m,
                             pred.expected_utility_bps_2m, pred.p_toxic)

    def classify(self, score: float, p2m: float, utility_bps: float, p_toxic: float,
                 health: DataHealth, model_reasons: tuple[str, ...] = ()) -> tuple[Status, tuple[str, ...]]:
        """Status and reason codes (model reasons first, then the rule's)."""
        s = self.status_cfg
        bad = data_health_reasons(health, s)
        if bad or any(r.startswith("MISSING_FEATURE:") for r in model_reasons):
            return "DATA_ISSUE", _merge(model_reasons, bad)
        if p_toxic >= s.trap_min_toxic and p2m >= s.trap_min_p2m:
            return "TRAP", _merge(model_reasons, ("TOXIC_FLOW",))
        gates: list[str] = []
        if p_toxic >= s.tradeable_max_toxic:
            gates.append("TOXIC_GATE")
        if utility_bps < s.tradeable_min_utility_bps:
            gates.append("LOW_UTILITY")
        if score < s.tradeable_min_score:
            gates.append("BELOW_TRADEABLE")
        if not gates:
            return "TRADEABLE", _merge(model_reasons, ("HIGH_SCORE",))
        if score < s.dead_max_score:
            return "DEAD", _merge(model_reasons, ("LOW_SCORE",))
        return "WATCH", _merge(model_reasons, tuple(gates))

    def apply(self, pred: PredictionSnapshot) -> tuple[PredictionSnapshot, Scored]:
        """Re-derive `pred.status`/`reasons` with this scorer's rules and return it with its score."""
        score = self.score(pred)
        model_reasons = tuple(r for r in pred.reasons if not is_rule_reason(r))
        status, reasons = self.classify(score, pred.p_inplay_2m, pred.expected_utility_bps_2m, pred.p_toxic,
                                        pred.data_health, model_reasons)
        if status != pred.status or reasons != pred.reasons:
            pred = msgspec.structs.replace(pred, status=status, reasons=reasons)
        return pred, Scored(pred.ts, pred.symbol, score, status, reasons)


RULE_REASONS = frozenset({"STALE_BOOK", "STALE_TRADES", "TOXIC_FLOW", "TOXIC_GATE", "LOW_UTILITY",
                          "BELOW_TRADEABLE", "HIGH_SCORE", "LOW_SCORE"})


def is_rule_reason(code: str) -> bool:
    """True for the codes this module adds (so re-scoring replaces them instead of piling them up)."""
    return code in RULE_REASONS or code.startswith("MISSING_STREAM:")


def _merge(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    if not first:
        return second
    return first + tuple(r for r in second if r not in first)
