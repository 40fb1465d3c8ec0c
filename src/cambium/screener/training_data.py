"""Training sets for `cambium screener train`: feature rows, labels and the heuristic's predictions, per source.

Two sources a user can actually have:

- **ticks** — recordings (`cambium screener record`), imported captures, or Binance daily archives stored by
  `cambium market archive` (aggTrades + bookTicker days, `cambium.market.archive_events`: no depth, so impact comes
  from the top of book), through the streaming `FeatureEngine` (the code live mode runs): one row per snapshot
  (cadence 1 s), every schema feature the data gives, every label (30 s, 2 m, 5 m, toxic; the step of 1 s divides
  every horizon).
- **klines** — 1-minute bars (any format `cambium market import` reads). One row per bar, at its close. The kline
  feature subset (`KLINE_FEATURES`) holds the schema features a bar can give with the same meaning as in the engine:

      ret_bps_60s           1e4 · ln(close_i / close_{i−1})
      ret_bps_5m            1e4 · ln(close_i / close_{i−5})
      realized_vol_bps_5m   1e4 · sqrt(Σ of the last five 1 m log returns²)   (quadratic variation, 1 m sampling)
      realized_vol_bps_60s  Parkinson's estimate of the 60 s volatility from the bar's range: 1e4 · ln(H/L)/sqrt(4 ln 2)
      regime_vol, regime_trend   from the two above, as in the engine
      flow_imbalance_60s    (2 · taker buy − volume) / volume, only where the file has taker-buy volumes
      trade_rate_60s        trades / 60, only where the file has trade counts

  Spread and impact are not in bars: the rows carry the configured `kline_spread_bps` / `kline_impact_bps` (for the
  labels' cost and the heuristic's inputs alike). Labels: 2 m and 5 m from the bars' highs and lows; 30 s and toxic
  (a 30 s window) cannot be told from 1 m bars, and are not made up: an artifact trained on klines lists them under
  `fallback` and the heuristic predicts them.

A row's features are those known at its time; its labels look forward. Rows are ordered by (symbol, ts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cambium.core.errors import DataError
from cambium.screener.baseline import baseline_values
from cambium.screener.config import BaselineConfig, FeatureConfig
from cambium.screener.contracts import FeatureSnapshot
from cambium.screener.labels import LabelSpec, PricePath, labellable, make_labels
from cambium.screener.schema import feature_names, feature_vector

if TYPE_CHECKING:
    from cambium.market.events import MarketEvent
    from cambium.screener.features import FeatureEngine

__all__ = ["KLINE_FEATURES", "TrainingSet", "kline_rows", "load_klines", "load_ticks", "tick_rows"]

KLINE_FEATURES = ("ret_bps_60s", "ret_bps_5m", "realized_vol_bps_60s", "realized_vol_bps_5m", "regime_vol",
                  "regime_trend", "flow_imbalance_60s", "trade_rate_60s")
_PARKINSON = 1.0 / math.sqrt(4.0 * math.log(2.0))
_NAMES = feature_names()


@dataclass
class TrainingSet:
    """`x` `[N, F]` in schema order (NaN = missing); `features`: the columns the source gives (the models read only
    these); `labels` and `heuristic` keyed by label name (`A/p_inplay_2m`, `p_toxic`), NaN = unlabelled."""

    source: str
    x: np.ndarray
    ts: np.ndarray
    symbol: np.ndarray
    labels: dict[str, np.ndarray]
    heuristic: dict[str, np.ndarray]
    features: tuple[str, ...]
    targets: tuple[str, ...]
    files: tuple[Path, ...]

    @staticmethod
    def concat(parts: Sequence[TrainingSet]) -> TrainingSet:
        if not parts:
            raise DataError("no training rows: every input was empty")
        first = parts[0]
        keys = set(first.labels)
        for p in parts[1:]:
            if set(p.labels) != keys or p.source != first.source:
                raise DataError("inputs of one training set must be of one source and label the same targets")
        used = tuple(n for n in _NAMES if any(n in p.features for p in parts))
        return TrainingSet(first.source, np.concatenate([p.x for p in parts]), np.concatenate([p.ts for p in parts]),
                           np.concatenate([p.symbol for p in parts]),
                           {k: np.concatenate([p.labels[k] for p in parts]) for k in first.labels},
                           {k: np.concatenate([p.heuristic[k] for p in parts]) for k in first.heuristic}, used,
                           first.targets, tuple(f for p in parts for f in p.files))


def _heuristic(spread: np.ndarray, impact: np.ndarray, vol60: np.ndarray, flow10: np.ndarray, flow60: np.ndarray,
               label_keys: Sequence[str], cfg: BaselineConfig) -> dict[str, np.ndarray]:
    """The heuristic baseline's probability for each label, row by row (NaN where it lacks an input)."""
    n = spread.shape[0]
    out = {k: np.full(n, np.nan) for k in label_keys}
    index = {"p_inplay_30s": 0, "p_inplay_2m": 1, "p_inplay_5m": 2}
    profiles = sorted({k.split("/")[0] for k in label_keys if "/" in k}) or ["B"]
    for i in range(n):
        s, m, v = float(spread[i]), float(impact[i]), float(vol60[i])
        if not (math.isfinite(s) and math.isfinite(m) and math.isfinite(v)):
            continue
        f10 = None if math.isnan(flow10[i]) else float(flow10[i])
        f60 = None if math.isnan(flow60[i]) else float(flow60[i])
        for profile in profiles:
            b = baseline_values(s, m, v, f10, f60, "A" if profile == "A" else "B", cfg)
            for key in label_keys:
                if key == "p_toxic":
                    out[key][i] = b.p_toxic
                elif key.startswith(profile + "/"):
                    out[key][i] = b.p_inplay[index[key.split("/")[1]]]
    return out


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, _NAMES.index(name)]


def kline_rows(open_time: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
               taker_buy: np.ndarray | None, trades: np.ndarray | None, step_ms: int) -> np.ndarray:
    """The kline feature subset `[N, F]` (schema order, NaN elsewhere) of bars sorted by open_time; a feature that
    reaches across a missing bar is NaN."""
    n = open_time.shape[0]
    x = np.full((n, len(_NAMES)), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        logc = np.log(close)

        def back(k: int) -> np.ndarray:
            out = np.full(n, np.nan)
            ok = open_time[k:] - open_time[:-k] == k * step_ms
            out[k:] = np.where(ok, logc[k:] - logc[:-k], np.nan)
            return out

        r1 = 1e4 * back(1)
        r5 = 1e4 * back(5)
        r2 = np.where(np.isfinite(r1), r1 * r1, np.nan)
        csum = np.concatenate([[0.0], np.cumsum(np.nan_to_num(r2))])
        nan_count = np.concatenate([[0], np.cumsum(~np.isfinite(r2))])
        rv5 = np.full(n, np.nan)
        if n >= 5:
            full = nan_count[5:] - nan_count[:-5] == 0
            rv5[4:] = np.where(full, np.sqrt(csum[5:] - csum[:-5]), np.nan)
        rv60 = 1e4 * np.log(high / low) * _PARKINSON
        x[:, _NAMES.index("ret_bps_60s")] = r1
        x[:, _NAMES.index("ret_bps_5m")] = r5
        x[:, _NAMES.index("realized_vol_bps_5m")] = rv5
        x[:, _NAMES.index("realized_vol_bps_60s")] = rv60
        x[:, _NAMES.index("regime_vol")] = np.where(rv5 > 0, rv60 / rv5, np.nan)
        x[:, _NAMES.index("regime_trend")] = np.abs(r5) / (rv5 + 1e-9)
        if taker_buy is not None:
            x[:, _NAMES.index("flow_imbalance_60s")] = np.where(volume > 0, (2 * taker_buy - volume) / volume, np.nan)
        if trades is not None:
            x[:, _NAMES.index("trade_rate_60s")] = trades / (step_ms / 1000)
    return x


def load_klines(paths: Sequence[Path], spread_bps: float, impact_bps: float, baseline: BaselineConfig,
                max_rows: int | None = None) -> TrainingSet:
    """Kline files (one symbol each, any interval that divides 2 m and 5 m) → a training set."""
    from cambium.market.candles import interval_ms
    from cambium.market.importers import read_kline_file

    parts = []
    spec = LabelSpec.from_baseline(baseline)
    for path in paths:
        candles = read_kline_file(path)
        table = candles.table
        if max_rows is not None:
            table = table.slice(0, max_rows)
        step = interval_ms(candles.interval)
        targets = labellable(step)
        if not targets:
            raise DataError(f"{path}: {candles.interval} bars can label no horizon (30 s, 2 m, 5 m); use 1m klines")

        def col(name: str) -> np.ndarray:
            return table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)  # noqa: B023

        open_time = table.column("open_time").to_numpy().astype(np.int64)
        close, high, low, volume = col("close"), col("high"), col("low"), col("volume")
        taker = col("taker_buy_base") if table.column("taker_buy_base").null_count == 0 else None
        trades = col("trades") if table.column("trades").null_count == 0 else None
        x = kline_rows(open_time, high, low, close, volume, taker, trades, step)
        n = open_time.shape[0]
        spread, impact = np.full(n, spread_bps), np.full(n, impact_bps)
        price = PricePath(open_time + step, close, high, low, spread, impact, np.zeros(n, np.int8), step)
        labels = make_labels(price, spec, targets)
        nan = np.full(n, np.nan)
        flow60 = _col(x, "flow_imbalance_60s")
        heur = _heuristic(spread, impact, _col(x, "realized_vol_bps_60s"), nan, flow60, list(labels), baseline)
        features = tuple(name for j, name in enumerate(_NAMES) if np.isfinite(x[:, j]).any())
        parts.append(TrainingSet("klines", x, open_time + step, np.full(n, candles.symbol), labels, heur, features,
                                 targets, (Path(path),)))
    return TrainingSet.concat(parts)


def tick_rows(snaps: Sequence[FeatureSnapshot], step_ms: int, spec: LabelSpec,
              baseline: BaselineConfig) -> TrainingSet:
    """One symbol's snapshots (sorted by ts) → a training set; toxicity is judged entering with the 10 s flow."""
    ts = np.array([s.ts for s in snaps], dtype=np.int64)
    return _tick_set(feature_vector(snaps), ts, snaps[0].symbol if snaps else "", step_ms, spec, baseline)


def _tick_set(x: np.ndarray, ts: np.ndarray, symbol: str, step_ms: int, spec: LabelSpec,
              baseline: BaselineConfig) -> TrainingSet:
    mid = _col(x, "mid")
    spread, impact = _col(x, "spread_bps"), _col(x, "impact_bps")
    flow10 = _col(x, "flow_imbalance_10s")
    direction = np.sign(np.nan_to_num(flow10)).astype(np.int8)
    path = PricePath(ts, mid, mid, mid, spread, impact, direction, step_ms)
    targets = labellable(step_ms)
    labels = make_labels(path, spec, targets)
    heur = _heuristic(spread, impact, _col(x, "realized_vol_bps_60s"), flow10, _col(x, "flow_imbalance_60s"),
                      list(labels), baseline)
    features = tuple(name for j, name in enumerate(_NAMES) if np.isfinite(x[:, j]).any())
    return TrainingSet("ticks", x, ts, np.full(ts.shape[0], symbol), labels, heur, features, targets, ())


def _archive_rows(events: Iterable[MarketEvent], engine: FeatureEngine,
                  chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """One symbol's snapshots as `(x, ts)`, turned into rows `chunk` at a time: weeks of 1 s snapshots would hold
    gigabytes as snapshot objects, a few hundred bytes a row as floats."""
    xs, tss = [np.empty((0, len(_NAMES)))], [np.empty(0, np.int64)]
    buf: list[FeatureSnapshot] = []

    def drain() -> None:
        xs.append(feature_vector(buf))
        tss.append(np.array([snap.ts for snap in buf], dtype=np.int64))
        buf.clear()

    for ev in events:
        buf.extend(engine.on_event(ev))
        if len(buf) >= chunk:
            drain()
    buf.extend(engine.flush())
    drain()
    return np.concatenate(xs), np.concatenate(tss)


def load_ticks(paths: Sequence[Path], features: FeatureConfig, baseline: BaselineConfig,
               on_file: Callable[[Path], None] | None = None) -> TrainingSet:
    """Recordings, captures or stored daily archives through the streaming feature engine; each recording or
    capture is one session (its own engine), an archive path one session per symbol (`find_archive`)."""
    from cambium.market.archive_events import archive_events, find_archive
    from cambium.screener.features import FeatureEngine
    from cambium.screener.sources import iter_events

    spec = LabelSpec.from_baseline(baseline)
    parts = []
    for path in paths:
        if not path.exists():
            raise DataError(f"{path} does not exist (expected a recording directory, a capture file or an archive "
                            f"directory)")
        sessions = find_archive(path)
        if sessions is not None:
            for session in sessions:
                x, ts = _archive_rows(archive_events(session), FeatureEngine(features))
                if ts.size:
                    part = _tick_set(x, ts, session.symbol, features.cadence_ms, spec, baseline)
                    part.files = session.files
                    parts.append(part)
            if on_file is not None:
                on_file(path)
            continue
        engine = FeatureEngine(features)
        snaps = engine.run(iter_events(path))
        by_symbol: dict[str, list[FeatureSnapshot]] = {}
        for snap in snaps:
            by_symbol.setdefault(snap.symbol, []).append(snap)
        for symbol in sorted(by_symbol):
            part = tick_rows(by_symbol[symbol], features.cadence_ms, spec, baseline)
            part.files = (Path(path),)
            parts.append(part)
        if on_file is not None:
            on_file(path)
    if not parts:
        raise DataError(f"no feature snapshots came out of {[str(p) for p in paths]}")
    return TrainingSet.concat(parts)
