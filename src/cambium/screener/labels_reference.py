"""The labels of `labels.py` with plain Python loops over timestamps: the slow reference its tests compare with.

A leaf: it reads the definitions from the module docstring of `labels.py`, not its code. For row i, the horizon's
rows are found by time (ts[i] < ts[j] ≤ ts[i] + h) and it is complete when they are exactly the h / step grid
times; no window algorithm, no shifted arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["reference_labels"]

_HORIZONS = {"p_inplay_30s": 30_000, "p_inplay_2m": 120_000, "p_inplay_5m": 300_000}


def _finite(x: float) -> bool:
    return x == x and math.isfinite(x)


def _moves(ts: Sequence[int], entry: Sequence[float], high: Sequence[float], low: Sequence[float], step: int,
           horizon: int, i: int) -> tuple[float, float] | None:
    t0 = ts[i]
    want = [t0 + step * m for m in range(1, horizon // step + 1)]
    rows = [j for j in range(len(ts)) if t0 < ts[j] <= t0 + horizon]
    if [ts[j] for j in rows] != want or not (_finite(entry[i]) and entry[i] > 0):
        return None
    up = down = -math.inf
    for j in rows:
        if not (_finite(high[j]) and _finite(low[j]) and high[j] > 0 and low[j] > 0):
            return None
        up = max(up, 1e4 * (math.log(high[j]) - math.log(entry[i])))
        down = max(down, 1e4 * (math.log(entry[i]) - math.log(low[j])))
    return up, down


def reference_labels(ts: Sequence[int], entry: Sequence[float], high: Sequence[float], low: Sequence[float],
                     spread: Sequence[float], impact: Sequence[float], direction: Sequence[int], step: int,
                     targets: Sequence[str], fee: Mapping[str, float], target_bps: Mapping[str, Sequence[float]],
                     max_spread: float, max_impact: float, toxic_bps: float) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    order = list(_HORIZONS)
    for target in targets:
        if target == "p_toxic":
            col = []
            for i in range(len(ts)):
                mv = _moves(ts, entry, high, low, step, 30_000, i)
                if mv is None or direction[i] == 0:
                    col.append(math.nan)
                    continue
                adverse = mv[1] if direction[i] > 0 else mv[0]
                col.append(1.0 if adverse > toxic_bps else 0.0)
            out["p_toxic"] = col
            continue
        for profile in fee:
            col = []
            for i in range(len(ts)):
                mv = _moves(ts, entry, high, low, step, _HORIZONS[target], i)
                if mv is None or not (_finite(spread[i]) and _finite(impact[i])):
                    col.append(math.nan)
                    continue
                if spread[i] > max_spread or impact[i] > max_impact:
                    col.append(0.0)
                    continue
                net = max(mv) - (fee[profile] + spread[i] + impact[i])
                col.append(1.0 if net >= target_bps[profile][order.index(target)] else 0.0)
            out[f"{profile}/{target}"] = col
    return out
