"""Purged CV (no label overlap between training and test rows, embargo after) and calibration (ECE drops)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.screener.calibration import Isotonic, Platt, decode_calibrator, ece, fit_isotonic, fit_platt, reliability
from cambium.screener.cv import holdout_split, purged_folds

MIN = 60_000


def _rows(spans: list[tuple[str, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    ts, sym = [], []
    for s, start, n in spans:
        ts.append(start + MIN * np.arange(n))
        sym.append(np.full(n, s))
    return np.concatenate(ts), np.concatenate(sym)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 6), st.integers(0, 15), st.integers(0, 300))
def test_purged_folds_leave_no_overlapping_label_and_respect_the_embargo(k: int, horizon_min: int,
                                                                         embargo_min: int, offset_min: int) -> None:
    ts, sym = _rows([("BTC", 0, 400), ("ETH", offset_min * MIN, 300), ("DOGE", 10**9, 250)])
    h, e = horizon_min * MIN, embargo_min * MIN
    covered = np.zeros(ts.size, dtype=int)
    for train, test in purged_folds(ts, sym, k, h, e):
        assert train.size and test.size and not np.intersect1d(train, test).size
        covered[test] += 1
        # brute force: every pair (training row, test row), any symbols
        gap = np.abs(ts[train][:, None] - ts[test][None, :])
        assert (gap >= h).all(), "a training label window overlaps a test one"
        for s in np.unique(sym[test]):
            end = ts[test][sym[test] == s].max()
            after = ts[train][(ts[train] > end)]
            assert ((after >= end + h + e) | (after < end)).all() or not after.size
            assert not ((ts[train] > end) & (ts[train] < end + h + e)).any()
    assert (covered == 1).all()  # every row is tested exactly once


def test_holdout_is_the_end_of_each_span_after_purge_and_embargo() -> None:
    ts, sym = _rows([("BTC", 0, 1000), ("ETH", 0, 1000)])
    train, test = holdout_split(ts, sym, 0.25, 5 * MIN, 10 * MIN)
    cut = ts[test].min()
    assert cut == 750 * MIN and ts[train].max() == cut - 15 * MIN  # purge 5 min + embargo 10 min
    assert (np.abs(ts[train][:, None] - ts[test][None, :]) >= 5 * MIN).all()
    with pytest.raises(DataError, match="fraction"):
        holdout_split(ts, sym, 1.0, MIN, 0)


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.beta(0.6, 6.0, n)                       # true probabilities, mostly small like the in-play labels
    y = (rng.random(n) < q).astype(float)
    p = 1.0 / (1.0 + np.exp(-(2.5 * np.log(q / (1 - q)) + 1.5)))  # over-confident and shifted
    return p, y


@pytest.mark.parametrize("fit", [fit_isotonic, fit_platt])
def test_calibration_lowers_ece_on_fresh_data(fit: object) -> None:
    p_fit, y_fit = _miscalibrated(20_000, 0)
    p, y = _miscalibrated(20_000, 1)
    cal = fit(p_fit, y_fit)  # type: ignore[operator]
    before, after = ece(p, y), ece(cal(p), y)
    assert before > 0.04 and after < 0.01 and after < before / 5
    assert cal == decode_calibrator(__import__("msgspec").json.encode(cal), "test")


def test_platt_recovers_a_logit_affine_distortion() -> None:
    p, y = _miscalibrated(200_000, 2)
    cal = fit_platt(p, y)
    assert cal.a == pytest.approx(1 / 2.5, rel=0.05) and cal.b == pytest.approx(-1.5 / 2.5, abs=0.05)


def test_reliability_bins_match_sklearn() -> None:
    from sklearn.calibration import calibration_curve

    p, y = _miscalibrated(5_000, 3)
    r = reliability(p, y, 10)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(r.mean_p, mean, rtol=1e-12)
    np.testing.assert_allclose(r.frac_pos, frac, rtol=1e-12)
    assert ece(np.full(4, 0.5), np.array([0.0, 1.0, 0.0, 1.0])) == 0.0
    assert ece(np.full(4, 0.9), np.zeros(4)) == pytest.approx(0.9)


@pytest.mark.parametrize(("doc", "match"), [
    (b'{"type": "isotonic", "x": [0.0, 0.5], "y": [0.5, 0.2]}', "non-decreasing"),
    (b'{"type": "isotonic", "x": [0.0], "y": [0.5, 0.2]}', "equal length"),
    (b'{"type": "platt", "a": 1.0}', "invalid calibration"),
    (b'{"type": "pickle", "a": 1.0}', "invalid calibration"),
    (b'[1, 2', "invalid calibration"),
])
def test_bad_calibration_files_are_refused(doc: bytes, match: str) -> None:
    with pytest.raises(DataError, match=match):
        decode_calibrator(doc, "cal.json")


def test_calibrators_apply_as_documented() -> None:
    iso = Isotonic((0.1, 0.3), (0.0, 0.5))
    np.testing.assert_allclose(iso(np.array([0.0, 0.2, 0.9])), [0.0, 0.25, 0.5])
    assert Platt(1.0, 0.0)(np.array([0.3]))[0] == pytest.approx(0.3)
