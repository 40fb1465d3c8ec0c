"""Strate IV trading environment over real candles (WM-4), and the arithmetic of a position series after costs.

At the close of bar t the agent sees `features[t]` (computed outside the environment from data up to that close) and
the position it holds, and sets a target position p_t in [−1, 1] (fraction of equity, negative = short), held from
the close of t to the close of t + 1. A bar's net return is

    r_t = p_t · (close[t+1] / close[t] − 1)            price move, always the REAL next close
          − p_t · funding[t+1]                         funding settled during bar t+1 (longs pay a positive rate)
          − |p_t − p_{t−1}| · (fee + slip_t)           fee of the order type, slippage of the decision bar

with slip_t = range_fraction · (high[t] − low[t]) / close[t] (`slippage = "range"`), half_spread_bps · 1e-4
(`"spread"`) or 0 (`"none"`); the position before the first step is 0. One step holds the target for
`decision_bars` bars k (p_t = … = p_{t+k−1}: only the first pays a trade), fewer where the segment or episode ends;
its reward is the sum of their net returns · reward_scale, and `info["returns"]` lists them. Nothing a
caller holds (a sampled future, a forecast) enters a step: the environment reads its own price arrays only, so a
generated future can never be realised as a reward.

Actions: a float array of shape (1,). Values outside [−1, 1] are clipped to it (documented, not an error); a NaN or
infinite action, or one of another shape, raises `ValueError` naming it.

Several contiguous segments (symbols, gap-free runs) are concatenated into one environment with `segment_lengths`:
an episode never crosses a segment's end. Training resets draw a segment (weighted by its steps) and a start inside
it, and run `episode_bars` steps; `reset(options={"segment": k, "start": 0, "full": True})` runs one segment from
`start` to its end (the backtest).

Funding per bar comes from a funding-rate history (`funding_per_bar`): a rate with time stamp τ is charged in the bar
whose [open, open + interval) holds τ. Bars outside a symbol's history get 0 or are refused (`env.missing_funding`).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from cambium.core.errors import DataError
from cambium.worldmodel.config import EnvConfig

__all__ = ["FUNDING_INTERVAL_MS", "TradingEnv", "bar_costs", "funding_per_bar", "read_funding", "realise"]

FUNDING_INTERVAL_MS = 8 * 3_600_000  # Binance USDⓈ-M perpetuals settle every 8 hours


def bar_costs(ohlc: np.ndarray, cfg: EnvConfig) -> np.ndarray:
    """Cost per unit traded at the close of each bar [T]: fee of the order type + slippage (module docstring)."""
    fee = {"taker": cfg.taker_fee, "maker": cfg.maker_fee}[cfg.order_type]
    slip = {"range": cfg.range_fraction * (ohlc[:, 1] - ohlc[:, 2]) / ohlc[:, 3],
            "spread": np.full(len(ohlc), cfg.half_spread_bps * 1e-4), "none": np.zeros(len(ohlc))}[cfg.slippage]
    return fee + slip


def realise(ohlc: np.ndarray, funding: np.ndarray, positions: np.ndarray, cfg: EnvConfig) -> np.ndarray:
    """Net returns [T−1] of holding positions[t] from the close of t to the close of t + 1 (t < T − 1), starting flat:
    the vectorised form of `TradingEnv.step` (tests compare the two)."""
    ohlc, funding = np.asarray(ohlc, np.float64), np.asarray(funding, np.float64)
    p = np.asarray(positions, np.float64)
    n = len(ohlc) - 1
    if p.shape != (n,):
        raise ValueError(f"positions has shape {p.shape}; need ({n},) for {len(ohlc)} bars")
    close = ohlc[:, 3]
    trade = np.abs(np.diff(np.concatenate([[0.0], p])))
    return p * (close[1:] / close[:-1] - 1.0) - p * funding[1:] - trade * bar_costs(ohlc, cfg)[:-1]


def read_funding(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A funding-rate history file (gzip CSV with a `funding_time` or `timestamp` column and `funding_rate`) ->
    (time stamps in epoch ms [K], rates [K]) sorted by time. A damaged file is one DataError naming it."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            header = fh.readline().strip().split(",")
            rows = [line.strip().split(",") for line in fh if line.strip()]
        t_col = header.index("funding_time") if "funding_time" in header else header.index("timestamp")
        r_col = header.index("funding_rate")
        times = np.array([int(r[t_col]) for r in rows], dtype=np.int64)
        rates = np.array([float(r[r_col]) for r in rows], dtype=np.float64)
    except (OSError, EOFError, ValueError, IndexError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a funding-rate history (need funding_time|timestamp and funding_rate columns; "
                        f"{exc})") from None
    if not np.isfinite(rates).all():
        raise DataError(f"{path}: non-finite funding rate")
    order = np.argsort(times, kind="stable")
    return times[order], rates[order]


def funding_per_bar(open_time_ms: np.ndarray, interval_ms: int, times: np.ndarray | None,
                    rates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Funding rate settled in each bar [T] and whether the bar lies inside the history [T] (between its first stamp
    and one funding interval after its last); no history (None) covers no bar."""
    t = np.asarray(open_time_ms, np.int64)
    out = np.zeros(len(t))
    if times is None or rates is None or not len(times):
        return out, np.zeros(len(t), dtype=bool)
    bar = np.searchsorted(t, times, side="right") - 1  # the bar whose open is the last at or before τ
    inside = (bar >= 0) & (times < t[np.clip(bar, 0, None)] + interval_ms)
    np.add.at(out, bar[inside], rates[inside])
    covered = (t + interval_ms > times[0]) & (t <= times[-1] + FUNDING_INTERVAL_MS)
    return out, covered


class TradingEnv(gym.Env[np.ndarray, np.ndarray]):
    """Gymnasium environment over real candles (module docstring).

    ohlc [T, 4] (open, high, low, close > 0), funding [T] (rate settled in each bar), features [T, F] (finite), split
    into consecutive segments of `segment_lengths` bars (default: one segment of T bars, each at least 2 bars)."""

    def __init__(self, ohlc: np.ndarray, funding: np.ndarray, features: np.ndarray, cfg: EnvConfig, *,
                 segment_lengths: list[int] | None = None) -> None:
        super().__init__()
        self.metadata = {"render_modes": []}
        self.ohlc = np.ascontiguousarray(ohlc, dtype=np.float64)
        self.funding = np.ascontiguousarray(funding, dtype=np.float64)
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        t = len(self.ohlc)
        if self.ohlc.ndim != 2 or self.ohlc.shape[1] != 4:
            raise ValueError(f"ohlc has shape {self.ohlc.shape}; need [T, 4] (open, high, low, close)")
        if self.funding.shape != (t,) or self.features.ndim != 2 or self.features.shape[0] != t:
            raise ValueError(f"funding {self.funding.shape} and features {self.features.shape} must be [{t}] and "
                             f"[{t}, F] for {t} bars")
        if not (np.isfinite(self.ohlc).all() and (self.ohlc > 0).all()):
            raise ValueError("ohlc must be finite and > 0")
        if not (np.isfinite(self.funding).all() and np.isfinite(self.features).all()):
            raise ValueError("funding and features must be finite")
        lengths = [t] if segment_lengths is None else [int(n) for n in segment_lengths]
        if sum(lengths) != t or any(n < 2 for n in lengths):
            raise ValueError(f"segment_lengths {lengths} must be >= 2 each and sum to the {t} bars")
        self.cfg = cfg
        self.starts = np.cumsum([0, *lengths[:-1]])
        self.ends = self.starts + np.asarray(lengths) - 1  # last bar of each segment (no step starts there)
        self.cost = bar_costs(self.ohlc, cfg)
        # Bounds: each feature's range over the arrays (every observation is a row of them), the position's [-1, 1].
        low = np.concatenate([self.features.min(axis=0), [-1.0]]).astype(np.float32)
        high = np.concatenate([self.features.max(axis=0), [1.0]]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.t = 0
        self.stop = 1
        self.position = 0.0

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def _obs(self) -> np.ndarray:
        out = np.empty(self.n_features + 1, dtype=np.float32)
        out[:-1] = self.features[self.t]
        out[-1] = self.position
        return out

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        opts = options or {}
        if "segment" in opts:
            k = int(opts["segment"])
            if not 0 <= k < len(self.starts):
                raise ValueError(f"segment {k} is not one of the {len(self.starts)} segments")
            start = self.starts[k] + int(opts.get("start", 0))
            if not self.starts[k] <= start < self.ends[k]:
                raise ValueError(f"start {opts.get('start')} is outside segment {k}")
        else:
            steps = (self.ends - self.starts).astype(np.float64)
            k = int(self.np_random.choice(len(steps), p=steps / steps.sum()))
            start = int(self.starts[k] + self.np_random.integers(0, self.ends[k] - self.starts[k]))
        full = bool(opts.get("full", False))
        self.t = int(start)
        self.stop = int(self.ends[k]) if full else int(min(self.ends[k], start + self.cfg.episode_bars))
        self.position = 0.0
        return self._obs(), {"segment": k, "bar": self.t}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        a = np.asarray(action, dtype=np.float64)
        if a.shape not in ((1,), ()):
            raise ValueError(f"action has shape {a.shape}; need (1,) (target position in [-1, 1])")
        target = float(a.reshape(()))
        if not np.isfinite(target):
            raise ValueError(f"action {target} is not finite; need a target position in [-1, 1]")
        if self.t >= self.stop:
            raise RuntimeError("step after the end of the episode: call reset()")
        p = min(1.0, max(-1.0, target))
        t0, t1 = self.t, min(self.stop, self.t + self.cfg.decision_bars)
        close = self.ohlc[t0 : t1 + 1, 3]
        price = p * (close[1:] / close[:-1] - 1.0)
        funding = p * self.funding[t0 + 1 : t1 + 1]
        cost = abs(p - self.position) * self.cost[t0]
        rets = price - funding
        rets[0] -= cost
        self.position = p
        self.t = t1
        info = {"returns": rets, "return": float(rets.sum()), "position": p, "price": float(price.sum()),
                "funding": float(funding.sum()), "cost": cost, "bar": t0}
        return self._obs(), float(rets.sum() * self.cfg.reward_scale), False, self.t >= self.stop, info
