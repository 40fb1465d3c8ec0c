"""Heuristic baseline model ("baseline-v1"): probabilities from cost, volatility and flow, in closed form.

Used when no trained artifacts exist, and the reference a trained model must beat (SCR-3). The mid price is modelled
over a horizon h as a Gaussian log-return X ~ N(μ_h, σ_h²) in bps:

- σ_h = max(realized_vol_bps_60s, vol_floor_bps) · sqrt(h / 60 s)   (60 s realised vol scaled by the square-root law)
- μ_h = flow_drift · flow · σ_h, with flow = flow_imbalance_10s for 30 s and flow_imbalance_60s for 2 m / 5 m
  (taker pressure tilts the move in its direction; a missing flow counts as 0)
- cost = fees(profile) + spread_bps + impact_bps   (one round trip: fees both ways, cross the spread, pay impact)

In-play ("a net move ≥ target reachable within h in either direction"): the threshold is T = target_h + cost and,
by the reflection principle for the running maximum, P(reach ±T) ≈ min(1, 2·[P(X ≥ T) + P(X ≤ −T)]).
Label gates: spread_bps > max_spread_bps or impact_bps > max_impact_bps → every in-play probability is 0.

Expected 2 m utility (bps), net of cost, for the better direction: E[(|X| − cost)⁺] with the Gaussian closed form
E[(Y − c)⁺] = (m − c)·Φ((m − c)/s) + s·φ((m − c)/s) applied to Y = X and Y = −X.

Toxicity ("the price moves > toxic_move_bps against entry within 30 s"), entering with the flow:
p_toxic = min(1, 2·P(X_30 ≤ −toxic_move_bps)) where X_30 has drift |μ_30| in the entry's favour.

Required features: spread_bps, impact_bps, realized_vol_bps_60s; missing ones give MISSING_FEATURE:<name>.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cambium.screener.config import BaselineConfig
from cambium.screener.contracts import FeatureSnapshot, Profile

__all__ = ["BASELINE_VERSION", "REQUIRED_FEATURES", "BaselineOutput", "baseline_predict", "baseline_values", "norm_cdf"]

BASELINE_VERSION = "baseline-v1"
REQUIRED_FEATURES = ("spread_bps", "impact_bps", "realized_vol_bps_60s")
HORIZONS_S = (30.0, 120.0, 300.0)
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True, slots=True)
class BaselineOutput:
    p_inplay: tuple[float, float, float]  # 30 s, 2 m, 5 m
    expected_utility_bps_2m: float
    p_toxic: float
    reasons: tuple[str, ...]


def norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


def _partial_mean(m: float, s: float, c: float) -> float:
    """E[(Y − c)⁺] for Y ~ N(m, s²)."""
    z = (m - c) / s
    return (m - c) * norm_cdf(z) + s * _INV_SQRT_2PI * math.exp(-0.5 * z * z)


def baseline_predict(snap: FeatureSnapshot, profile: Profile, cfg: BaselineConfig) -> BaselineOutput:
    feats = snap.features
    missing = tuple(f"MISSING_FEATURE:{name}" for name in REQUIRED_FEATURES if feats.get(name) is None)
    if missing:
        return BaselineOutput((0.0, 0.0, 0.0), 0.0, 0.0, missing)
    spread = feats["spread_bps"]
    impact = feats["impact_bps"]
    vol60 = feats["realized_vol_bps_60s"]
    assert spread is not None and impact is not None and vol60 is not None
    return baseline_values(spread, impact, vol60, feats.get("flow_imbalance_10s"), feats.get("flow_imbalance_60s"),
                           profile, cfg)


def baseline_values(spread: float, impact: float, vol60: float, flow10: float | None, flow60: float | None,
                    profile: Profile, cfg: BaselineConfig) -> BaselineOutput:
    """The baseline from its inputs as plain numbers (training sets call it row by row); a missing flow is 0."""
    flow10 = flow10 or 0.0
    flow60 = flow10 if flow60 is None else flow60

    fees = cfg.fee_bps_a if profile == "A" else cfg.fee_bps_b
    targets = cfg.target_bps_a if profile == "A" else cfg.target_bps_b
    cost = fees + spread + impact
    vol = max(vol60, cfg.vol_floor_bps)
    reasons: list[str] = []
    gated = spread > cfg.max_spread_bps or impact > cfg.max_impact_bps
    if spread > cfg.max_spread_bps:
        reasons.append("WIDE_SPREAD")
    if impact > cfg.max_impact_bps:
        reasons.append("HIGH_IMPACT")

    probs: list[float] = []
    for horizon, target, flow in zip(HORIZONS_S, targets, (flow10, flow60, flow60), strict=True):
        sigma = vol * math.sqrt(horizon / 60.0)
        mu = cfg.flow_drift * flow * sigma
        threshold = target + cost
        tail = (1.0 - norm_cdf((threshold - mu) / sigma)) + norm_cdf((-threshold - mu) / sigma)
        probs.append(0.0 if gated else min(1.0, 2.0 * tail))

    sigma_2m = vol * math.sqrt(2.0)
    mu_2m = cfg.flow_drift * flow60 * sigma_2m
    utility = _partial_mean(mu_2m, sigma_2m, cost) + _partial_mean(-mu_2m, sigma_2m, cost)

    sigma_30 = vol * math.sqrt(0.5)
    favour = cfg.flow_drift * abs(flow10) * sigma_30
    p_toxic = min(1.0, 2.0 * norm_cdf((-cfg.toxic_move_bps - favour) / sigma_30))

    if flow60 >= cfg.flow_reason_min:
        reasons.append("FLOW_BUY")
    elif flow60 <= -cfg.flow_reason_min:
        reasons.append("FLOW_SELL")
    return BaselineOutput((probs[0], probs[1], probs[2]), utility, p_toxic, tuple(reasons))
