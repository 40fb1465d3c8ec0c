"""WM-7 agent evaluation: policies rolled out on the hold-out after costs, baselines, performance figures with a
stationary block-bootstrap confidence interval, and the bias check.

Every policy — a trained agent or a baseline — follows one protocol, `Policy.act(obs [F+1]) -> [1]` in [−1, 1]
(obs = the bar's features then the position held). Agents are rolled out through `TradingEnv` (`rollout`), baselines
are position series computed causally from prices; both are turned into net returns by the same arithmetic
(`cambium.worldmodel.env.realise`, equal to the environment's steps). Multiverse scaling multiplies the agent's
target position by the bar's convergence score in [0, 1] before the environment realises it (the observation's
position is then the scaled one, the position actually held).

Symbols are pooled into one equal-weight portfolio: at every bar time the mean of the net returns of the symbols
trading then (`portfolio`). Figures (`performance`): annualised Sharpe mean/std·√A, Sortino mean/downside·√A
(downside = √mean(min(r, 0)²)), maximum drawdown of the compounded equity, annualised turnover Σ|Δp| per year (mean
over symbols), annualised mean return; A = bars per year (365·24 for 1 h bars: crypto trades every hour).

Confidence intervals come from the stationary bootstrap (Politis & Romano 1994): a resample concatenates blocks that
start at uniform positions and have geometric lengths of mean `block_bars`, wrapping around the series' end. The same
resampled time indices serve every policy, so the interval of a Sharpe difference (agent − baseline) is paired.
`stationary_indices` is the vectorised form of `stationary_indices_reference` (a plain loop); tests compare them.

Bias check: a policy whose returns correlate with buy-and-hold's at |ρ| ≥ mirror_corr merely mirrors the market
(β = cov/var says by how much), and one long (or short) on ≥ one_side_share of bars sits at one side — the origin's
agent collapsed to always-short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cambium.worldmodel.config import BacktestConfig, EnvConfig
from cambium.worldmodel.env import TradingEnv, realise

__all__ = ["Policy", "SegmentData", "bias_check", "bootstrap_sharpe", "momentum_positions", "performance",
           "portfolio", "random_positions", "rollout", "sharpe", "stationary_draws", "stationary_indices",
           "stationary_indices_reference"]


class Policy(Protocol):
    """What every agent and baseline offers the backtest."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs [F + 1] (features, then the position held) -> target position [1] in [−1, 1]."""
        ...


@dataclass
class SegmentData:
    """One contiguous run of bars of one symbol: ohlc [T, 4], funding [T], features [T, F], open times [T] (ms),
    convergence [T] in [0, 1] (the Multiverse score per bar; ones when there is none)."""

    name: str
    ohlc: np.ndarray
    funding: np.ndarray
    features: np.ndarray
    open_time_ms: np.ndarray
    convergence: np.ndarray

    def __len__(self) -> int:
        return len(self.ohlc)


def rollout(env: TradingEnv, policy: Policy, segment: int, scale: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Run `policy` through segment `segment` of `env` from its first bar to its end, deterministically; with `scale`
    (per bar of the segment) the target position set at bar t is multiplied by scale[t]. -> (positions [T−1], net
    returns [T−1]), per bar (a step of `decision_bars` bars repeats its position)."""
    obs, info = env.reset(options={"segment": segment, "start": 0, "full": True})
    first = info["bar"]
    positions, returns = [], []
    done = False
    while not done:
        a = np.asarray(policy.act(obs), dtype=np.float64).reshape(1)
        if scale is not None:
            a = a * scale[env.t - first]
        obs, _, _, done, info = env.step(a)
        positions.extend([info["position"]] * len(info["returns"]))
        returns.extend(info["returns"])
    return np.asarray(positions), np.asarray(returns)


def momentum_positions(close: np.ndarray, lookback: int) -> np.ndarray:
    """Time-series momentum [T−1]: sign(close[t] / close[t − lookback] − 1) held over bar t + 1; flat for the first
    `lookback` bars (no history yet)."""
    c = np.asarray(close, np.float64)
    out = np.zeros(len(c) - 1)
    if len(c) - 1 > lookback:
        out[lookback:] = np.sign(c[lookback:-1] / c[: len(c) - 1 - lookback] - 1.0)
    return out


def random_positions(n: int, hold: int, rng: np.random.Generator) -> np.ndarray:
    """[n] uniform positions in [−1, 1], a new one every `hold` bars."""
    draws = rng.uniform(-1.0, 1.0, size=-(-n // hold))
    return np.repeat(draws, hold)[:n]


def baseline_positions(seg: SegmentData, cfg: BacktestConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Positions [T−1] of buy-and-hold, time-series momentum and the random policy on one segment."""
    n = len(seg) - 1
    return {"buy_and_hold": np.ones(n), "momentum": momentum_positions(seg.ohlc[:, 3], cfg.momentum_bars),
            "random": random_positions(n, cfg.random_hold_bars, rng)}


def segment_returns(seg: SegmentData, positions: np.ndarray, cfg: EnvConfig) -> np.ndarray:
    return realise(seg.ohlc, seg.funding, positions, cfg)


def portfolio(times: Sequence[np.ndarray], returns: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Equal-weight pooling: per distinct time (sorted) the mean of the returns stamped with it. -> (times, returns)."""
    t = np.concatenate([np.asarray(x, np.int64) for x in times])
    r = np.concatenate([np.asarray(x, np.float64) for x in returns])
    uniq, inv = np.unique(t, return_inverse=True)
    sums = np.bincount(inv, weights=r, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq))
    return uniq, sums / counts


def sharpe(r: np.ndarray, bars_per_year: float) -> np.ndarray:
    """Annualised Sharpe along the last axis (0 where the returns do not vary)."""
    r = np.asarray(r, np.float64)
    sd = r.std(axis=-1, ddof=1)
    mean = r.mean(axis=-1)
    return np.where(sd > 0, mean / np.where(sd > 0, sd, 1.0), 0.0) * np.sqrt(bars_per_year)


def performance(r: np.ndarray, bars_per_year: float, turnover: float) -> dict[str, float]:
    """Figures of one per-bar net return series (module docstring); `turnover` is passed through (annualised)."""
    r = np.asarray(r, np.float64)
    down = float(np.sqrt(np.mean(np.minimum(r, 0.0) ** 2)))
    equity = np.cumprod(1.0 + r)
    peak = np.maximum.accumulate(np.concatenate([[1.0], equity]))[1:]
    return {"sharpe": float(sharpe(r, bars_per_year)),
            "sortino": float(r.mean() / down * np.sqrt(bars_per_year)) if down > 0 else 0.0,
            "max_drawdown": float(np.max(1.0 - equity / peak)) if len(r) else 0.0,
            "annual_return": float(r.mean() * bars_per_year), "total_return": float(equity[-1] - 1.0),
            "turnover": float(turnover), "bars": len(r)}


def annual_turnover(positions: Sequence[np.ndarray], bars_per_year: float) -> float:
    """Mean over segments of Σ|Δp| per year (starting flat)."""
    per = [np.abs(np.diff(np.concatenate([[0.0], p]))).sum() / len(p) * bars_per_year for p in positions if len(p)]
    return float(np.mean(per)) if per else 0.0


# -- stationary bootstrap --------------------------------------------------------------------------------------------
def stationary_draws(n: int, samples: int, mean_block: float, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The random draws of `samples` stationary-bootstrap resamples of length n: block starts [S, n] uniform in
    [0, n) and block breaks [S, n] (True with probability 1 / mean_block; always at position 0)."""
    starts = rng.integers(0, n, size=(samples, n))
    new = rng.random((samples, n)) < 1.0 / mean_block
    new[:, 0] = True
    return starts, new


def stationary_indices(starts: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Resampled time indices [S, n]: at a break, jump to that position's start; otherwise the next index (mod n)."""
    n = starts.shape[1]
    pos = np.arange(n)
    last = np.maximum.accumulate(np.where(new, pos, 0), axis=1)  # position of the latest break
    return (np.take_along_axis(starts, last, axis=1) + pos - last) % n


def stationary_indices_reference(starts: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The slow reference of `stationary_indices`: the Politis–Romano recursion, one index at a time."""
    s, n = starts.shape
    out = np.empty((s, n), dtype=np.int64)
    for i in range(s):
        for j in range(n):
            out[i, j] = starts[i, j] if new[i, j] else (out[i, j - 1] + 1) % n
    return out


def bootstrap_sharpe(series: dict[str, np.ndarray], cfg: BacktestConfig, bars_per_year: float,
                     rng: np.random.Generator, pairs: Sequence[tuple[str, str]] = (), chunk: int = 100
                     ) -> dict[str, Any]:
    """Percentile intervals at `cfg.confidence` of each series' Sharpe and of the paired Sharpe differences
    `pairs` (a − b), from `cfg.bootstrap_samples` stationary-bootstrap resamples shared by all series (aligned,
    equal length)."""
    names = list(series)
    x = np.stack([np.asarray(series[k], np.float64) for k in names])  # [K, n]
    n = x.shape[1]
    draws: list[np.ndarray] = []
    done = 0
    while done < cfg.bootstrap_samples:
        b = min(chunk, cfg.bootstrap_samples - done)
        idx = stationary_indices(*stationary_draws(n, b, cfg.block_bars, rng))
        draws.append(sharpe(x[:, idx], bars_per_year))  # [K, b]
        done += b
    sr = np.concatenate(draws, axis=1)
    lo, hi = (1 - cfg.confidence) / 2 * 100, (1 + cfg.confidence) / 2 * 100
    out: dict[str, Any] = {"samples": cfg.bootstrap_samples, "block_bars": cfg.block_bars,
                           "confidence": cfg.confidence, "sharpe": {}, "difference": {}}
    for i, k in enumerate(names):
        out["sharpe"][k] = {"low": float(np.percentile(sr[i], lo)), "high": float(np.percentile(sr[i], hi))}
    for first, second in pairs:
        d = sr[names.index(first)] - sr[names.index(second)]
        out["difference"][f"{first} - {second}"] = {"low": float(np.percentile(d, lo)),
                                                    "high": float(np.percentile(d, hi)),
                                                    "share_above_zero": float((d > 0).mean())}
    return out


# -- bias check ------------------------------------------------------------------------------------------------------
def bias_check(returns: np.ndarray, market: np.ndarray, positions: np.ndarray, cfg: BacktestConfig
               ) -> dict[str, Any]:
    """Correlation and β of a policy's returns with buy-and-hold's (aligned), its long/short/flat shares of bars,
    and the flags raised: `mirrors buy-and-hold` (|ρ| ≥ mirror_corr), `always long` / `always short` (share ≥
    one_side_share)."""
    r, m, p = (np.asarray(v, np.float64) for v in (returns, market, positions))
    var_m = float(m.var())
    corr = float(np.corrcoef(r, m)[0, 1]) if r.std() > 0 and m.std() > 0 else 0.0
    beta = float(np.mean((r - r.mean()) * (m - m.mean())) / var_m) if var_m > 0 else 0.0
    long_share, short_share = float((p > 0).mean()), float((p < 0).mean())
    flags = []
    if abs(corr) >= cfg.mirror_corr:
        flags.append("mirrors buy-and-hold" if corr > 0 else "mirrors short buy-and-hold")
    if long_share >= cfg.one_side_share:
        flags.append("always long")
    if short_share >= cfg.one_side_share:
        flags.append("always short")
    return {"corr": corr, "beta": beta, "long_share": long_share, "short_share": short_share,
            "flat_share": float((p == 0).mean()), "mean_position": float(p.mean()) if len(p) else 0.0,
            "flags": flags}


# -- the hold-out backtest -------------------------------------------------------------------------------------------
UNSCALED = " (no Multiverse scaling)"
BASELINES = ("buy_and_hold", "momentum", "random")


@dataclass
class BacktestResult:
    """Figures (JSON-ready) and the series behind the plots: portfolio times [n] and returns per policy [n], and
    every bar's position per policy (all segments)."""

    figures: dict[str, Any]
    times: np.ndarray
    returns: dict[str, np.ndarray]
    positions: dict[str, np.ndarray]


def run_backtest(holdout: Sequence[SegmentData], agents: dict[str, Policy], env_cfg: EnvConfig,
                 cfg: BacktestConfig, bars_per_year: float, rng: np.random.Generator, *,
                 scaling: bool) -> BacktestResult:
    """Every agent (scaled by convergence when `scaling`, and unscaled as its own baseline) and every baseline on
    each hold-out segment, pooled into equal-weight portfolios; performance, paired bootstrap intervals of each agent
    against every baseline, and the bias check of every policy."""
    rets: dict[str, list[np.ndarray]] = {}
    pos: dict[str, list[np.ndarray]] = {}
    stamps: list[np.ndarray] = []
    for seg in holdout:
        env = TradingEnv(seg.ohlc, seg.funding, seg.features, env_cfg)
        runs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, agent in agents.items():
            runs[name] = rollout(env, agent, 0, scale=seg.convergence if scaling else None)
            if scaling:
                runs[name + UNSCALED] = rollout(env, agent, 0)
        for name, p in baseline_positions(seg, cfg, rng).items():
            runs[name] = (p, realise(seg.ohlc, seg.funding, p, env_cfg))
        for name, (p, r) in runs.items():
            pos.setdefault(name, []).append(p)
            rets.setdefault(name, []).append(r)
        stamps.append(seg.open_time_ms[1:])  # a step's return is earned over the next bar
    times = np.array([], dtype=np.int64)
    series: dict[str, np.ndarray] = {}
    for name, parts in rets.items():
        times, series[name] = portfolio(stamps, parts)
    figures: dict[str, Any] = {"policies": {}, "bars_per_year": bars_per_year, "portfolio_bars": len(times),
                               "segments": [s.name for s in holdout]}
    market = series["buy_and_hold"]
    for name in series:
        f: dict[str, Any] = {**performance(series[name], bars_per_year, annual_turnover(pos[name], bars_per_year))}
        f["bias"] = bias_check(series[name], market, np.concatenate(pos[name]), cfg)
        figures["policies"][name] = f
    pairs = [(a, b) for a in agents for b in (*([a + UNSCALED] if scaling else []), *BASELINES)]
    figures["bootstrap"] = bootstrap_sharpe(series, cfg, bars_per_year, rng, pairs)
    return BacktestResult(figures, times, series, {k: np.concatenate(v) for k, v in pos.items()})
