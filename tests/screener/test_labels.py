"""Labels (SCR-3): the vectorised labeller equals the loop reference; closed-form cases; what a source can label."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.screener.labels import LabelSpec, PricePath, labellable, make_labels, sliding_max, window_moves
from cambium.screener.labels_reference import reference_labels

SPEC = LabelSpec()


def _path(mids: list[float], step: int = 10_000, gaps: tuple[int, ...] = (), **over: object) -> PricePath:
    n = len(mids)
    ts = np.arange(1, n + 1, dtype=np.int64) * step
    for g in gaps:
        ts[g:] += step
    a = np.asarray(mids, dtype=np.float64)
    fields: dict[str, object] = {"ts": ts, "entry": a, "high": a.copy(), "low": a.copy(),
                                 "spread_bps": np.full(n, 1.0), "impact_bps": np.full(n, 0.5),
                                 "direction": np.ones(n, np.int8), "step_ms": step}
    fields.update(over)
    return PricePath(**fields)  # type: ignore[arg-type]


@st.composite
def paths(draw: st.DrawFn) -> PricePath:
    step = draw(st.sampled_from([10_000, 30_000, 60_000]))
    n = draw(st.integers(1, 45))
    steps = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n)) if draw(st.booleans()) else [1] * n
    ts = np.cumsum(np.asarray(steps, dtype=np.int64)) * step
    walk = np.cumsum(draw(st.lists(st.integers(-12, 12), min_size=n, max_size=n)))
    entry = 100.0 * np.exp(walk * 1e-4)  # moves of 0-12 bps a step
    wick = np.asarray(draw(st.lists(st.integers(0, 15), min_size=n, max_size=n))) * 1e-4
    high, low = entry * np.exp(wick), entry * np.exp(-wick[::-1])
    spread = np.asarray(draw(st.lists(st.sampled_from([0.5, 2.0, 11.0, math.nan]), min_size=n, max_size=n)))
    impact = np.asarray(draw(st.lists(st.sampled_from([0.0, 3.0, 25.0]), min_size=n, max_size=n)))
    if draw(st.booleans()):
        high[draw(st.integers(0, n - 1))] = math.nan
    direction = np.asarray(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=n, max_size=n)), dtype=np.int8)
    return PricePath(ts, entry, high, low, spread, impact, direction, step)


@settings(max_examples=200, deadline=None)
@given(paths())
def test_vectorised_labels_equal_the_loop_reference(path: PricePath) -> None:
    got = make_labels(path, SPEC)
    want = reference_labels(path.ts.tolist(), path.entry.tolist(), path.high.tolist(), path.low.tolist(),
                            path.spread_bps.tolist(), path.impact_bps.tolist(), path.direction.tolist(),
                            path.step_ms, labellable(path.step_ms), SPEC.fee_bps, SPEC.target_bps,
                            SPEC.max_spread_bps, SPEC.max_impact_bps, SPEC.toxic_move_bps)
    assert set(got) == set(want)
    for key, col in want.items():
        np.testing.assert_array_equal(got[key], np.asarray(col), err_msg=key)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=60), st.integers(1, 20))
def test_sliding_max_equals_a_loop(values: list[float], k: int) -> None:
    y = np.asarray(values)
    want = [max(values[i:i + k]) for i in range(len(values) - k + 1)]
    np.testing.assert_array_equal(sliding_max(y, k), np.asarray(want, dtype=np.float64))


def test_a_move_either_way_is_in_play_net_of_cost() -> None:
    # 10 s steps, 2 m = 12 steps. Profile A: cost 2 + 1 + 0.5 = 3.5 bps, target 10 → a 13.5 bps move is needed.
    down = [100.0] * 5 + [100.0 * math.exp(-13.6e-4)] + [100.0] * 30
    labels = make_labels(_path(down), SPEC, ("p_inplay_2m",))
    assert labels["A/p_inplay_2m"][0] == 1.0          # the drop at row 5 is within 2 m of row 0 and pays
    assert labels["B/p_inplay_2m"][0] == 0.0          # B needs 15 + 5.5 bps
    assert labels["A/p_inplay_2m"][5] == 1.0          # entering at the low, the way back up pays too
    assert labels["A/p_inplay_2m"][6] == 0.0          # after it: a flat price
    small = [100.0] * 5 + [100.0 * math.exp(-13.4e-4)] + [100.0] * 30
    assert make_labels(_path(small), SPEC, ("p_inplay_2m",))["A/p_inplay_2m"][0] == 0.0
    # the last 12 rows have no complete horizon
    assert np.isnan(labels["A/p_inplay_2m"][-12:]).all() and not np.isnan(labels["A/p_inplay_2m"][:-12]).any()


def test_gates_spread_and_impact_make_a_move_not_in_play() -> None:
    jump = [100.0] * 3 + [101.0] * 30
    n = len(jump)
    wide = make_labels(_path(jump, spread_bps=np.full(n, 10.5)), SPEC, ("p_inplay_2m",))
    costly = make_labels(_path(jump, impact_bps=np.full(n, 20.5)), SPEC, ("p_inplay_2m",))
    fine = make_labels(_path(jump), SPEC, ("p_inplay_2m",))
    assert fine["B/p_inplay_2m"][0] == 1.0
    assert wide["B/p_inplay_2m"][0] == 0.0 and costly["B/p_inplay_2m"][0] == 0.0


def test_toxic_is_a_move_against_the_entry_within_30s() -> None:
    drop = [100.0, 100.0, 100.0 * math.exp(-10.5e-4)] + [100.0] * 10
    n = len(drop)
    long = make_labels(_path(drop), SPEC, ("p_toxic",))["p_toxic"]
    short = make_labels(_path(drop, direction=-np.ones(n, np.int8)), SPEC, ("p_toxic",))["p_toxic"]
    flat = make_labels(_path(drop, direction=np.zeros(n, np.int8)), SPEC, ("p_toxic",))["p_toxic"]
    assert long[0] == 1.0 and short[0] == 0.0 and np.isnan(flat).all()
    assert long[2] == 0.0  # after the drop: nothing further against a long


def test_a_gap_inside_the_horizon_leaves_the_row_unlabelled() -> None:
    labels = make_labels(_path([100.0] * 40, gaps=(20,)), SPEC, ("p_inplay_2m",))["A/p_inplay_2m"]
    assert np.isnan(labels[8:20]).all() and (labels[:8] == 0.0).all() and (labels[20:28] == 0.0).all()


def test_one_minute_bars_cannot_label_30s_or_toxicity() -> None:
    assert labellable(60_000) == ("p_inplay_2m", "p_inplay_5m")
    assert labellable(1_000) == ("p_inplay_30s", "p_inplay_2m", "p_inplay_5m", "p_toxic")
    with pytest.raises(DataError, match="30 s horizon cannot be labelled from 60 s steps"):
        window_moves(_path([100.0] * 10, step=60_000), 30_000)


def test_a_path_off_its_grid_is_refused() -> None:
    with pytest.raises(DataError, match="multiples of step_ms"):
        PricePath(np.array([0, 1_500]), *(np.ones(2) for _ in range(5)), np.zeros(2), 1_000)
    with pytest.raises(DataError, match="shape"):
        PricePath(np.array([0, 1_000]), np.ones(3), *(np.ones(2) for _ in range(4)), np.zeros(2), 1_000)
