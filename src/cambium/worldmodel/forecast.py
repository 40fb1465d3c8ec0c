"""WM-7 forecast evaluation: sampled return paths scored against realised returns, next to four baselines.

At each hold-out origin (the last bar e of a patch, see `cambium.worldmodel.futures`) every method gives N paths of
per-bar log returns over the next max(horizons) bars, using only bars up to e:

- random walk: i.i.d. Normal(0, σ_train²), σ_train the std of the segment's training-window returns;
- GBM with rolling volatility: i.i.d. Normal(−σ²/2, σ²), σ the std of the last `flow.vol_window` returns (a
  martingale price);
- historical bootstrap: returns drawn i.i.d. from the last `forecast.bootstrap_window` returns;
- GARCH(1,1) with Student-t errors (the `arch` package, zero mean, returns in percent): fitted on the training
  window's last `garch_window` returns, refitted every `garch_refit_bars` hold-out bars on the returns before the
  refit (as a user would); between refits the variance is filtered with the fixed parameters up to e, then paths
  are simulated (σ²_{t+1} = ω + α ε_t² + β σ_t², ε = σ·z, z a unit-variance Student-t).

Per horizon h the scores are: CRPS of the cumulative h-bar log return (`properscoring.crps_ensemble`), the energy
score of the h-bar path of per-bar returns, the coverage of the central 50 % and 90 % intervals of the cumulative
return, and its PIT (share of samples below the realised value). Means are per symbol and pooled over all origins.
Significance: Diebold–Mariano on the loss differential (CRPS), averaged over the symbols at each origin time (one
series in time), with a Newey–West (Bartlett) variance of `ceil(h / stride)` lags and Student-t p-values with T − 1
degrees of freedom (Harvey–Leybourne–Newbold): two-sided, negative statistic = the first method is better.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import properscoring
import torch
from scipy import signal, stats

__all__ = ["BASELINES", "GarchFit", "MethodScores", "diebold_mariano", "energy_score", "fit_garch", "garch_paths",
           "garch_variance", "interval_coverage", "pit", "score_paths"]

BASELINES = ("random_walk", "gbm", "bootstrap", "garch")


def energy_score(paths: np.ndarray, realised: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Energy score (β = 1) of ensembles paths [M, N, d] for outcomes realised [M, d] -> [M]:
    mean_i ‖X_i − y‖ − ½ mean_ij ‖X_i − X_j‖ (equals the ensemble CRPS for d = 1)."""
    out = np.empty(paths.shape[0])
    for a in range(0, paths.shape[0], chunk):
        x = torch.from_numpy(np.ascontiguousarray(paths[a : a + chunk], dtype=np.float64))
        y = torch.from_numpy(np.ascontiguousarray(realised[a : a + chunk], dtype=np.float64))
        first = (x - y[:, None]).norm(dim=-1).mean(1)
        second = torch.cdist(x, x).mean((1, 2))
        out[a : a + chunk] = (first - 0.5 * second).numpy()
    return out


def interval_coverage(samples: np.ndarray, realised: np.ndarray, level: float) -> np.ndarray:
    """Whether realised [M] lies in the central `level` interval of samples [M, N] (empirical quantiles) -> [M]."""
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return (realised >= lo) & (realised <= hi)


def pit(samples: np.ndarray, realised: np.ndarray) -> np.ndarray:
    """Probability integral transform: share of samples [M, N] below realised [M] (ties count half) -> [M]."""
    below = (samples < realised[:, None]).mean(1)
    ties = (samples == realised[:, None]).mean(1)
    return below + 0.5 * ties


@dataclass
class MethodScores:
    """Per-origin scores of one method at one horizon: crps, energy, in50, in90, pit [M]."""

    crps: np.ndarray
    energy: np.ndarray
    in50: np.ndarray
    in90: np.ndarray
    pit: np.ndarray


def score_paths(paths: np.ndarray, realised: np.ndarray, h: int) -> MethodScores:
    """Scores at horizon h of paths [M, N, ≥h] against realised per-bar returns [M, ≥h]."""
    cum, obs = paths[:, :, :h].astype(np.float64).sum(-1), realised[:, :h].sum(-1)
    return MethodScores(properscoring.crps_ensemble(obs, cum), energy_score(paths[:, :, :h], realised[:, :h]),
                        interval_coverage(cum, obs, 0.5), interval_coverage(cum, obs, 0.9), pit(cum, obs))


def diebold_mariano(loss_a: np.ndarray, loss_b: np.ndarray, times: np.ndarray, lags: int) -> dict[str, float]:
    """DM test of equal mean loss (see the module docstring). Losses [M] at origin times [M]; several origins at one
    time (symbols) are averaged first. -> {mean_diff, stat, p_value, n_times} (stat < 0: a has the lower loss)."""
    d = loss_a - loss_b
    order = np.unique(times, return_inverse=True)[1]
    series = np.bincount(order, weights=d) / np.bincount(order)
    t = len(series)
    mean = float(series.mean()) if t else float("nan")
    if t < 3:
        return {"mean_diff": mean, "stat": float("nan"), "p_value": float("nan"), "n_times": t}
    c = series - mean
    var = float(c @ c) / t
    for k in range(1, min(lags, t - 1) + 1):
        var += 2 * (1 - k / (lags + 1)) * float(c[k:] @ c[:-k]) / t
    if var <= 0:
        return {"mean_diff": mean, "stat": float("nan"), "p_value": float("nan"), "n_times": t}
    stat = mean / math.sqrt(var / t)
    return {"mean_diff": mean, "stat": stat, "p_value": float(2 * stats.t.sf(abs(stat), df=t - 1)), "n_times": t}


# -- GARCH(1,1)-t ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GarchFit:
    """Parameters of a zero-mean GARCH(1,1) with standardised Student-t errors, in percent-return units."""

    omega: float
    alpha: float
    beta: float
    nu: float


def fit_garch(returns: np.ndarray) -> GarchFit:
    """Fit GARCH(1,1)-t (zero mean) to log returns [T] with `arch` (in percent)."""
    from arch import arch_model

    model = arch_model(returns * 100.0, mean="Zero", vol="GARCH", p=1, q=1, dist="t", rescale=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter; a failed fit still returns its best parameters
        res = model.fit(disp="off", show_warning=False)
    p = res.params
    return GarchFit(float(p["omega"]), float(p["alpha[1]"]), float(p["beta[1]"]), float(p["nu"]))


def garch_variance(fit: GarchFit, returns: np.ndarray, backcast: float) -> np.ndarray:
    """Conditional variances σ²_1 … σ²_{T+1} (percent²) of returns [T] (log, not percent): σ²_t for t ≤ T is the
    one-step forecast made after return t−1, the last entry the forecast after the last return. As in `arch`, the
    lagged squared return and variance before the first return are the backcast."""
    e2 = (returns * 100.0) ** 2
    drive = fit.omega + fit.alpha * np.concatenate([[backcast], e2])
    # σ²_{t+1} = drive_t + β σ²_t: a first-order linear recursion (lfilter), started at σ²_0 = backcast.
    out, _ = signal.lfilter([1.0], [1.0, -fit.beta], drive, zi=[fit.beta * backcast])
    return np.asarray(out)


def garch_backcast(returns: np.ndarray) -> float:
    """arch's backcast: the exponentially weighted (λ = 0.94, first 75 points) mean of squared percent returns."""
    e2 = (returns[:75] * 100.0) ** 2
    w = 0.94 ** np.arange(len(e2))
    return float((w / w.sum()) @ e2) if len(e2) else 1.0


def garch_paths(fit: GarchFit, variance_next: np.ndarray, n: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Simulated log-return paths [M, n, h] from the next-bar variances [M] (percent²)."""
    var = np.repeat(variance_next[:, None], n, axis=1)
    scale = math.sqrt((fit.nu - 2) / fit.nu) if fit.nu > 2 else 1.0
    out = np.empty((len(variance_next), n, h))
    for k in range(h):
        eps = np.sqrt(var) * rng.standard_t(fit.nu, size=var.shape) * scale
        out[:, :, k] = eps / 100.0
        var = fit.omega + fit.alpha * eps**2 + fit.beta * var
    return out


def baseline_paths(method: str, r: np.ndarray, ends: np.ndarray, n: int, h: int, rng: np.random.Generator, *,
                   train_bars: int, vol_window: int, bootstrap_window: int,
                   garch_var: np.ndarray | None = None, garch_fit: Sequence[GarchFit] | None = None) -> np.ndarray:
    """Paths [M, n, h] of one baseline for one segment with per-bar log returns r [T] (r[0] NaN) at origins ends [M]
    (the returns up to ends[i] inclusive are known). GARCH takes its next-bar variances and fits per origin."""
    m = len(ends)
    if method == "random_walk":
        sigma = float(np.nanstd(r[1:train_bars], ddof=1))
        return rng.standard_normal((m, n, h)) * sigma
    if method == "gbm":
        sig = np.array([np.std(r[e - vol_window + 1 : e + 1], ddof=1) for e in ends])
        return -0.5 * sig[:, None, None] ** 2 + rng.standard_normal((m, n, h)) * sig[:, None, None]
    if method == "bootstrap":
        out = np.empty((m, n, h))
        for i, e in enumerate(ends):
            hist = r[max(1, e - bootstrap_window + 1) : e + 1]
            out[i] = hist[rng.integers(0, len(hist), size=(n, h))]
        return out
    if method == "garch":
        assert garch_var is not None and garch_fit is not None
        out = np.empty((m, n, h))
        for i in range(m):
            out[i] = garch_paths(garch_fit[i], garch_var[i : i + 1], n, h, rng)[0]
        return out
    raise ValueError(f"unknown baseline {method!r}")


def garch_for_origins(r: np.ndarray, ends: np.ndarray, train_bars: int, refit_bars: int,
                      window: int) -> tuple[np.ndarray, list[GarchFit], int]:
    """Next-bar variances [M] (percent²) and the fit used at each origin ends[i]; fits on a rolling schedule: the first
    on returns 1 … train_bars − 1 (the training window), then every `refit_bars` bars after it, each on the last
    `window` returns before the refit. -> (variances, fits, number of fits)."""
    var = np.empty(len(ends))
    fits: list[GarchFit] = [GarchFit(0, 0, 0, 0)] * len(ends)
    block = np.maximum(0, (ends - train_bars) // refit_bars + 1)  # 0: origin still inside the training window
    n_fits = 0
    for b in np.unique(block):
        cut = train_bars + (int(b) - 1) * refit_bars if b > 0 else train_bars
        lo = max(1, cut - window)
        fit = fit_garch(r[lo:cut])
        n_fits += 1
        sel = np.flatnonzero(block == b)
        last = int(ends[sel].max())
        v = garch_variance(fit, r[lo : last + 1], garch_backcast(r[lo:cut]))
        var[sel] = v[ends[sel] - lo + 1]
        for i in sel:
            fits[i] = fit
    return var, fits, n_fits


def summarise(scores: dict[str, MethodScores], times: np.ndarray, symbols: np.ndarray, h: int, stride: int,
              pit_bins: int) -> dict[str, Any]:
    """Pooled and per-symbol means, DM tests of cambium against each baseline, PIT histograms, for one horizon."""
    lags = max(1, math.ceil(h / stride))
    out: dict[str, Any] = {"horizon": h, "n_origins": len(times), "dm_lags": lags, "methods": {},
                           "per_symbol": {}}
    for name, s in scores.items():
        out["methods"][name] = {"crps": float(s.crps.mean()), "energy": float(s.energy.mean()),
                                "coverage50": float(s.in50.mean()), "coverage90": float(s.in90.mean()),
                                "pit_hist": np.histogram(s.pit, bins=pit_bins, range=(0, 1))[0].tolist()}
    if "cambium" in scores:
        out["dm"] = {b: diebold_mariano(scores["cambium"].crps, scores[b].crps, times, lags)
                     for b in scores if b != "cambium"}
    for sym in np.unique(symbols):
        sel = symbols == sym
        row: dict[str, Any] = {"n": int(sel.sum())}
        for name, s in scores.items():
            row[name] = {"crps": float(s.crps[sel].mean()), "coverage90": float(s.in90[sel].mean())}
        if "cambium" in scores and "garch" in scores:
            row["dm_garch"] = diebold_mariano(scores["cambium"].crps[sel], scores["garch"].crps[sel], times[sel],
                                              lags)
        out["per_symbol"][str(sym)] = row
    return out


def evaluate_forecasts(paths: np.ndarray, segment: np.ndarray, end_bar: np.ndarray, origin_ms: np.ndarray,
                       series: Sequence[Any], split_ms: int, *, horizons: Sequence[int], stride: int,
                       vol_window: int, bootstrap_window: int, garch_refit_bars: int, garch_window: int,
                       pit_bins: int, rng: np.random.Generator) -> dict[str, Any]:
    """Score cambium's paths [M, N, max(h)] at origins (segment index, origin bar, origin time) against the realised
    returns of `series` (CandleSeries by segment index) and the baselines, per horizon (module docstring)."""
    n, hmax = paths.shape[1], max(horizons)
    per_h: dict[int, dict[str, list[MethodScores]]] = {h: {} for h in horizons}
    times: list[np.ndarray] = []
    symbols: list[np.ndarray] = []
    n_fits = 0
    for si in np.unique(segment):
        sel = np.flatnonzero(segment == si)
        s = series[int(si)]
        close = s.ohlcv[:, 3].double().numpy()
        r = np.concatenate([[np.nan], np.diff(np.log(close))])
        ends = end_bar[sel]
        realised = np.stack([r[ends + 1 + k] for k in range(hmax)], axis=1)
        train_bars = int((s.open_time_ms < split_ms).sum())
        gvar, gfits, nf = garch_for_origins(r, ends, train_bars, garch_refit_bars, garch_window)
        n_fits += nf
        methods = {"cambium": paths[sel].astype(np.float64)}
        for b in BASELINES:
            methods[b] = baseline_paths(b, r, ends, n, hmax, rng, train_bars=train_bars, vol_window=vol_window,
                                        bootstrap_window=bootstrap_window, garch_var=gvar, garch_fit=gfits)
        for h in horizons:
            for name, p in methods.items():
                per_h[h].setdefault(name, []).append(score_paths(p, realised, h))
        times.append(origin_ms[sel])
        symbols.append(np.array([s.name.split(".")[0]] * len(sel)))
    t_all, sym_all = np.concatenate(times), np.concatenate(symbols)
    out: dict[str, Any] = {"n_origins": len(t_all), "n_symbols": len(np.unique(sym_all)),
                           "n_futures": int(n), "garch_fits": n_fits, "horizons": {}}
    for h in horizons:
        merged = {name: MethodScores(*(np.concatenate([getattr(x, f) for x in parts])
                                       for f in ("crps", "energy", "in50", "in90", "pit")))
                  for name, parts in per_h[h].items()}
        out["horizons"][str(h)] = summarise(merged, t_all, sym_all, h, stride, pit_bins)
    return out
