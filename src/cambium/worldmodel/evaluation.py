"""WM-7 representation quality: linear probes of next-bar returns from the JEPA latents and from the raw features.

Anchors are the patches of the pretokenized grid. For anchor k of a segment (its last bar e), the inputs are the
`seq_len` patches ending with k (the window the encoder was trained on) and the target is the next bar's log return
y = log(close[e+1] / close[e]) (next hour on 1 h bars), its direction y > 0.

- latent features: the target encoder's latent of the last position of the window [D];
- raw features: what the model sees at that position: the per-bar features of the patch's bars [P · 5] and the
  patch's clock features [6].

Training anchors have their target bar before the split; hold-out anchors have their last bar in the hold-out window
(after the embargo); their input windows may reach back before it (past bars are legitimate inputs). Features are
standardised with the training anchors' mean and standard deviation only. Penalties are chosen on the latest
`validation_fraction` of the training anchors (a chronological inner split), then the probe is refitted on all
training anchors and scored once on the hold-out: R² (1 − SSE / Σ(y − ȳ_holdout)², scikit-learn's r2_score) and
direction accuracy, with the accuracy of always predicting the training window's majority direction for reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cambium.core.errors import DataError
from cambium.worldmodel.config import EvalConfig
from cambium.worldmodel.data import Split
from cambium.worldmodel.features import CandleBatch, bar_features, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.training import CandleSeries

__all__ = [
    "CodedSeries", "ProbeData", "ProbeResult", "fit_logistic", "fit_ridge", "probe_dataset", "r2_score", "run_probes",
]


@dataclass(frozen=True)
class CodedSeries:
    """A segment with its codes on the fixed grid: patch k covers bars offset + k·P … offset + (k+1)·P − 1."""

    series: CandleSeries
    codes: Tensor  # [N] int64
    offset: int
    patch_length: int

    def window_bars(self, first_patch: int, n_patches: int) -> tuple[Tensor, Tensor]:
        """(ohlcv [n·P, 5] float32, open_time_ms [n·P]) of patches first_patch … first_patch + n − 1."""
        a = self.offset + first_patch * self.patch_length
        b = a + n_patches * self.patch_length
        return self.series.ohlcv[a:b].float(), self.series.open_time_ms[a:b]

    def end_bar(self, k: Tensor) -> Tensor:
        """Index of the last bar of patches k [...]."""
        return self.offset + (k + 1) * self.patch_length - 1


@dataclass
class ProbeData:
    """latent [M, D], raw [M, F], y [M] (next-bar log return), split masks [M], target open time [M] (epoch ms)."""

    latent: np.ndarray
    raw: np.ndarray
    y: np.ndarray
    train: np.ndarray
    holdout: np.ndarray
    target_time: np.ndarray


@torch.no_grad()
def probe_dataset(model: WorldModelJEPA, coded: Sequence[CodedSeries], split: Split, cfg: EvalConfig) -> ProbeData:
    """Features and targets of every anchor with a full window and a next bar (see the module docstring)."""
    model.eval()
    seq = model.cfg.seq_len
    lat, raw, ys, times = [], [], [], []
    for cs in coded:
        n = int(cs.codes.shape[0])
        if n < seq:
            continue  # a segment shorter than one window (a recent listing) has no anchor
        close, t = cs.series.ohlcv[:, 3], cs.series.open_time_ms
        anchors = torch.arange(seq - 1, n)
        anchors = anchors[cs.end_bar(anchors) + 1 < close.shape[0]]
        for chunk in anchors.split(cfg.batch_windows):
            firsts = chunk - (seq - 1)
            idx = torch.stack([cs.codes[f : f + seq] for f in firsts.tolist()])
            bars = [cs.window_bars(f, seq) for f in firsts.tolist()]
            candles = CandleBatch(torch.stack([b[0] for b in bars]), torch.stack([b[1] for b in bars]))
            clock = clock_features(candles, cs.patch_length)
            z = model.encode_codes(idx, clock.to(model.embed.weight.dtype))[:, -1]
            feats = bar_features(candles.ohlcv)[:, -cs.patch_length :].reshape(len(chunk), -1)
            lat.append(z.double().numpy())
            raw.append(torch.cat([feats, clock[:, -1]], dim=-1).double().numpy())
            e = cs.end_bar(chunk)
            ys.append(torch.log(close[e + 1].double() / close[e].double()).numpy())
            times.append(t[e + 1].numpy())
    if not ys:
        raise DataError(f"no probe anchor: every segment is shorter than seq_len={seq} patches")
    target_time = np.concatenate(times)
    # Segments are contiguous, so an anchor's last bar opens one bar before its target.
    bar_ms = int(coded[0].series.open_time_ms[1] - coded[0].series.open_time_ms[0])
    return ProbeData(np.concatenate(lat), np.concatenate(raw), np.concatenate(ys), target_time < split.split_ms,
                     target_time - bar_ms >= split.holdout_ms, target_time)


def _standardise(x_train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(x - mean) / std for x in (x_train, *others)]


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept: argmin ‖y − xw − b‖² + alpha‖w‖² -> (w [F], b)."""
    xm, ym = x.mean(axis=0), y.mean()
    xc, yc = x - xm, y - ym
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return w, float(ym - xm @ w)


def fit_logistic(x: np.ndarray, label: np.ndarray, l2: float, iters: int = 50) -> tuple[np.ndarray, float]:
    """L2 logistic regression (intercept unpenalised) by Newton's method: min Σ logloss + l2/2 ‖w‖² -> (w, b).

    Same objective as scikit-learn's LogisticRegression(C=1/l2).
    """
    n, f = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    reg = np.full(f + 1, l2)
    reg[-1] = 0.0
    yl = label.astype(np.float64)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(xa @ theta)))
        grad = xa.T @ (p - yl) + reg * theta
        hess = (xa * (p * (1 - p))[:, None]).T @ xa + np.diag(reg) + 1e-10 * np.eye(f + 1)
        delta = np.linalg.solve(hess, grad)
        theta -= delta
        if np.abs(delta).max() < 1e-10:
            break
    return theta[:-1], float(theta[-1])


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """1 − Σ(y − pred)² / Σ(y − mean(y))²."""
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@dataclass(frozen=True)
class ProbeResult:
    """One feature set's probes on the hold-out."""

    features: str
    dim: int
    r2: float
    accuracy: float
    ridge_alpha: float
    logistic_l2: float


def _probe(name: str, x: np.ndarray, data: ProbeData, cfg: EvalConfig) -> ProbeResult:
    tr = np.flatnonzero(data.train)
    tr = tr[np.argsort(data.target_time[tr], kind="stable")]
    cut = int(len(tr) * (1 - cfg.validation_fraction))
    fit_i, val_i, ho = tr[:cut], tr[cut:], np.flatnonzero(data.holdout)
    y, up = data.y, data.y > 0
    xf, xv = _standardise(x[fit_i], x[val_i])

    def val_r2(a: float) -> float:
        w, b = fit_ridge(xf, y[fit_i], a)
        return r2_score(y[val_i], xv @ w + b)

    alpha = max(cfg.ridge_alphas, key=val_r2)

    def val_acc(l2: float) -> float:
        w, b = fit_logistic(xf, up[fit_i], l2)
        return float((((xv @ w + b) > 0) == up[val_i]).mean())

    l2 = max(cfg.logistic_l2, key=val_acc)
    xt, xh = _standardise(x[tr], x[ho])
    w, b = fit_ridge(xt, y[tr], alpha)
    wl, bl = fit_logistic(xt, up[tr], l2)
    return ProbeResult(name, x.shape[1], r2_score(y[ho], xh @ w + b), float((((xh @ wl + bl) > 0) == up[ho]).mean()),
                       float(alpha), float(l2))


def run_probes(data: ProbeData, cfg: EvalConfig) -> dict[str, Any]:
    """Probes of the latents and of the raw features; returns the numbers the report and the metrics show."""
    n_train, n_hold = int(data.train.sum()), int(data.holdout.sum())
    if n_train < 10 or n_hold < 10:
        raise DataError(f"too few probe anchors (train {n_train}, hold-out {n_hold}); lower "
                        "evaluation.holdout_fraction / embargo_bars or use more data")
    results = [_probe("latent", data.latent, data, cfg), _probe("raw", data.raw, data, cfg)]
    majority_up = bool((data.y[data.train] > 0).mean() >= 0.5)
    majority = float(((data.y[data.holdout] > 0) == majority_up).mean())
    return {"n_train": n_train, "n_holdout": n_hold, "majority_accuracy": majority,
            "results": [r.__dict__ for r in results]}
