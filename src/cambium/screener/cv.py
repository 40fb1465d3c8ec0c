"""Purged and embargoed time-series splits (SCR-3): no training row's label window overlaps a test row's.

Rows are (symbol, ts) with a label that looks `horizon_ms` ahead: the label of a row at t covers (t, t + h]. Two rows'
labels overlap iff |t_r − t_q| < h, whatever their symbols (assets move together, so a training row of BTC at the
same minute as a test row of ETH leaks too). A test block of one symbol spanning [a, b] therefore removes from
training every row, of any symbol, with t in (a − h, b + h) (the purge), and the rows with t in [b + h, b + h + e)
after it (the embargo: features with memory, such as 5 m windows, still carry the test period).

- `holdout_split`: the last `fraction` of each symbol's time span is the held-out test; training keeps what the
  purge and embargo leave, and ends `h + e` before the held-out period starts. Symbols that share a span (the
  DOGE/LINK/SUI 1 m bars of the shared data) share the boundary.
- `purged_folds`: k contiguous time blocks per symbol over the training rows; fold f tests block f and trains on the
  other blocks less the purge and embargo around every symbol's block f.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cambium.core.errors import DataError

__all__ = ["holdout_split", "purge_mask", "purged_folds"]


def _blocks(ts: np.ndarray, symbol: np.ndarray, mask: np.ndarray) -> list[tuple[int, int]]:
    """[min ts, max ts] of the masked rows of each symbol."""
    out = []
    for s in np.unique(symbol[mask]):
        t = ts[mask & (symbol == s)]
        out.append((int(t.min()), int(t.max())))
    return out


def purge_mask(ts: np.ndarray, blocks: list[tuple[int, int]], horizon_ms: int, embargo_ms: int) -> np.ndarray:
    """True for rows whose label overlaps a block's labels or that fall in the embargo after it."""
    out = np.zeros(ts.shape[0], dtype=bool)
    for a, b in blocks:
        out |= (ts > a - horizon_ms) & (ts < b + horizon_ms + embargo_ms)
    return out


def holdout_split(ts: np.ndarray, symbol: np.ndarray, fraction: float, horizon_ms: int,
                  embargo_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) boolean masks `[N]`."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"holdout fraction {fraction} must be in (0, 1)")
    test = np.zeros(ts.shape[0], dtype=bool)
    for s in np.unique(symbol):
        mine = symbol == s
        start, end = int(ts[mine].min()), int(ts[mine].max())
        test |= mine & (ts >= end - fraction * (end - start))
    # the embargo also keeps training away from the start of the held-out period: a gap, then the test
    blocks = [(a - embargo_ms, b) for a, b in _blocks(ts, symbol, test)]
    train = ~test & ~purge_mask(ts, blocks, horizon_ms, embargo_ms)
    if not train.any() or not test.any():
        raise DataError(f"the hold-out split left {int(train.sum())} training and {int(test.sum())} test rows: "
                        "give more data or a shorter embargo")
    return train, test


def purged_folds(ts: np.ndarray, symbol: np.ndarray, k: int, horizon_ms: int,
                 embargo_ms: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index arrays of k folds over all rows."""
    if k < 2:
        raise DataError(f"cv_folds={k} must be >= 2")
    fold = np.zeros(ts.shape[0], dtype=np.int64)
    for s in np.unique(symbol):
        mine = symbol == s
        start, end = int(ts[mine].min()), int(ts[mine].max())
        fold[mine] = np.minimum(k - 1, (ts[mine] - start) * k // max(1, end - start + 1))
    for f in range(k):
        test = fold == f
        train = ~test & ~purge_mask(ts, _blocks(ts, symbol, test), horizon_ms, embargo_ms)
        yield np.flatnonzero(train), np.flatnonzero(test)
