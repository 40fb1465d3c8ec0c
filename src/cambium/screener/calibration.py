"""Calibration of predicted probabilities (SCR-3): isotonic and Platt maps, and the metrics that judge them.

Both maps are fitted on out-of-fold predictions of the training period and stored as small JSON artifacts (numbers
only, nothing unpickled): isotonic as the breakpoints of a non-decreasing step function (applied with linear
interpolation between them, clipped at the ends), Platt as p' = sigmoid(a · logit(p) + b). scikit-learn fits them
(`IsotonicRegression`, `LogisticRegression`); the tests compare the reliability bins with
`sklearn.calibration.calibration_curve`.

ECE (expected calibration error) uses `bins` equal-width bins of the predicted probability:
ECE = Σ_b (n_b / N) · |mean(y in b) − mean(p in b)|.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from cambium.core.errors import DataError

__all__ = ["Calibrator", "Isotonic", "Platt", "decode_calibrator", "ece", "fit_isotonic", "fit_platt", "reliability"]

_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


class Isotonic(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="isotonic"):
    x: tuple[float, ...]
    y: tuple[float, ...]

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.interp(p, np.asarray(self.x), np.asarray(self.y))


class Platt(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag="platt"):
    a: float
    b: float

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))


Calibrator = Isotonic | Platt


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> Isotonic:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    return Isotonic(tuple(float(v) for v in iso.X_thresholds_), tuple(float(v) for v in iso.y_thresholds_))


def fit_platt(p: np.ndarray, y: np.ndarray) -> Platt:
    from sklearn.linear_model import LogisticRegression

    if np.unique(y).size < 2:
        raise DataError("Platt calibration needs both classes in its data")
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(p)[:, None], y)
    return Platt(float(lr.coef_[0, 0]), float(lr.intercept_[0]))


def decode_calibrator(data: bytes, where: str) -> Calibrator:
    try:
        cal = msgspec.json.decode(data, type=Calibrator)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DataError(f"{where}: invalid calibration: {exc}") from None
    if isinstance(cal, Isotonic):
        x, y = np.asarray(cal.x), np.asarray(cal.y)
        if (x.size == 0 or x.size != y.size or not np.isfinite(x).all() or not np.isfinite(y).all()
                or (np.diff(x) < 0).any() or (np.diff(y) < 0).any() or y.min() < 0 or y.max() > 1):
            raise DataError(f"{where}: isotonic breakpoints must be finite, of equal length, non-decreasing, "
                            "y in [0, 1]")
    elif not (np.isfinite(cal.a) and np.isfinite(cal.b)):
        raise DataError(f"{where}: Platt a={cal.a}, b={cal.b} must be finite")
    return cal


@dataclass(frozen=True)
class Reliability:
    """Per non-empty bin: mean predicted probability, fraction of positives, count."""

    mean_p: np.ndarray
    frac_pos: np.ndarray
    count: np.ndarray


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 15) -> Reliability:
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], p)
    count = np.bincount(idx, minlength=bins)
    sum_p = np.bincount(idx, weights=p, minlength=bins)
    sum_y = np.bincount(idx, weights=y, minlength=bins)
    keep = count > 0
    return Reliability(sum_p[keep] / count[keep], sum_y[keep] / count[keep], count[keep])


def ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    r = reliability(p, y, bins)
    return float(np.sum(r.count * np.abs(r.frac_pos - r.mean_p)) / max(1, p.shape[0]))
