"""SCR-5: the score equals its closed form; status rules and their gates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.screener.config import ScorerConfig, StatusConfig
from cambium.screener.contracts import DataHealth
from cambium.screener.scorer import Scorer, reference_score

from ._builders import HEALTHY, prediction

prob = st.floats(min_value=0.0, max_value=1.0)


@given(p30=prob, p2m=prob, p5m=prob, util=st.floats(min_value=-1e6, max_value=1e6), tox=prob)
def test_default_score_matches_closed_form(p30: float, p2m: float, p5m: float, util: float, tox: float) -> None:
    got = Scorer().score(prediction(p_inplay_30s=p30, p_inplay_2m=p2m, p_inplay_5m=p5m,
                                    expected_utility_bps_2m=util, p_toxic=tox))
    assert got == pytest.approx(reference_score(p30, p2m, p5m, util, tox), abs=1e-15)
    assert 0.0 <= got <= 1.0


def test_score_hand_computed_values() -> None:
    s = Scorer()
    # (0.2·0.3 + 0.5·0.5 + 0.3·0.6) · 20/50 · (1 − 0.5·0.1) = 0.49 · 0.4 · 0.95
    assert s.score(prediction()) == pytest.approx(0.1862, abs=1e-12)
    assert s.score(prediction(expected_utility_bps_2m=80.0)) == pytest.approx(0.49 * 0.95)
    assert s.score(prediction(expected_utility_bps_2m=-3.0)) == 0.0
    assert s.score_of(1, 1, 1, 50, 0) == 1.0
    assert s.score_of(1, 1, 1, 50, 1) == 0.5


def test_weights_come_from_config() -> None:
    s = Scorer(ScorerConfig(w_30s=1.0, w_2m=0.0, w_5m=0.0, utility_cap_bps=10.0, toxic_penalty=1.0))
    assert s.score_of(0.8, 0.0, 0.0, 5.0, 0.25) == pytest.approx(0.8 * 0.5 * 0.75)


def test_weights_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match=r"w_30s=0.5 \+ w_2m=0.5 \+ w_5m=0.3"):
        load_data({"w_30s": 0.5, "w_2m": 0.5, "w_5m": 0.3}, ScorerConfig)


@pytest.mark.parametrize(("over", "status", "reason"), [
    (dict(p_inplay_30s=0.9, p_inplay_2m=0.9, p_inplay_5m=0.9, expected_utility_bps_2m=40.0, p_toxic=0.05),
     "TRADEABLE", "HIGH_SCORE"),
    (dict(p_inplay_30s=0.9, p_inplay_2m=0.9, p_inplay_5m=0.9, expected_utility_bps_2m=40.0, p_toxic=0.7),
     "TRAP", "TOXIC_FLOW"),
    (dict(p_inplay_30s=0.9, p_inplay_2m=0.9, p_inplay_5m=0.9, expected_utility_bps_2m=40.0, p_toxic=0.4),
     "WATCH", "TOXIC_GATE"),
    (dict(p_inplay_2m=0.2, p_toxic=0.7), "WATCH", "BELOW_TRADEABLE"),
    (dict(p_inplay_30s=0.01, p_inplay_2m=0.01, p_inplay_5m=0.01, expected_utility_bps_2m=1.0), "DEAD", "LOW_SCORE"),
    (dict(data_health=DataHealth(stale_book_ms=60_000, stale_trades_ms=0)), "DATA_ISSUE", "STALE_BOOK"),
    (dict(data_health=DataHealth(stale_book_ms=0, stale_trades_ms=10**7)), "DATA_ISSUE", "STALE_TRADES"),
    (dict(data_health=DataHealth(0, 0, ("bookTicker",))), "DATA_ISSUE", "MISSING_STREAM:bookTicker"),
    (dict(reasons=("MISSING_FEATURE:spread_bps",)), "DATA_ISSUE", "MISSING_FEATURE:spread_bps"),
])
def test_status_rules(over: dict, status: str, reason: str) -> None:
    pred, scored = Scorer().apply(prediction(**over))
    assert pred.status == scored.status == status
    assert reason in pred.reasons


def test_data_issue_wins_over_everything_and_rescoring_is_idempotent() -> None:
    hot = dict(p_inplay_30s=0.9, p_inplay_2m=0.9, p_inplay_5m=0.9, expected_utility_bps_2m=40.0, p_toxic=0.05)
    bad = DataHealth(stale_book_ms=10_000, stale_trades_ms=0)
    pred, _ = Scorer().apply(prediction(**hot, data_health=bad))
    assert pred.status == "DATA_ISSUE"
    again, _ = Scorer().apply(pred)
    assert again == pred
    # A looser config re-derives the status and does not keep the old rule's reason codes.
    loose = Scorer(status=StatusConfig(max_stale_book_ms=20_000))
    relaxed, _ = loose.apply(pred)
    assert relaxed.status == "TRADEABLE" and relaxed.reasons == ("HIGH_SCORE",)
    assert Scorer().apply(prediction(**hot, data_health=HEALTHY))[0].reasons == ("HIGH_SCORE",)
