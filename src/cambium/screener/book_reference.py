"""The reference L2 order book: `book.OrderBook` written plainly on `SortedDict`s (tests hold the two equal).

The sync rules and the impact walk are those documented in `book.py`; this version stores each side as one
`SortedDict` and buffers diffs as they come, which is simple to check and slower (a sorted-list update per level).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from sortedcontainers import SortedDict

__all__ = ["ReferenceOrderBook"]

Levels = Sequence[Sequence[float]]


class ReferenceOrderBook:
    __slots__ = ("_first", "_pending", "asks", "bids", "dropped", "gaps", "last_update_id", "synced")

    def __init__(self, buffer: int = 2_000) -> None:
        self.bids: SortedDict = SortedDict()  # price -> qty; best bid is the last key
        self.asks: SortedDict = SortedDict()  # price -> qty; best ask is the first key
        self.last_update_id: int | None = None
        self.synced = False
        self.gaps = 0
        self.dropped = 0
        self._first = True
        self._pending: deque[tuple[Levels, Levels, int, int, int | None]] = deque(maxlen=buffer)

    def apply_snapshot(self, bids: Levels, asks: Levels, last_update_id: int) -> None:
        self.bids = SortedDict({float(p): float(q) for p, q in bids if float(q) > 0})
        self.asks = SortedDict({float(p): float(q) for p, q in asks if float(q) > 0})
        self.last_update_id = last_update_id
        self.synced, self._first = True, True
        pending, self._pending = list(self._pending), deque(maxlen=self._pending.maxlen)
        for diff in pending:
            if diff[3] >= last_update_id and not self.apply_diff(*diff):
                break

    def apply_diff(self, bids: Levels, asks: Levels, first_update_id: int, last_update_id: int,
                   prev_update_id: int | None) -> bool:
        """Apply one diff; returns False (and counts it) when it is dropped or breaks the sequence."""
        if not self.synced or self.last_update_id is None:
            self._pending.append((bids, asks, first_update_id, last_update_id, prev_update_id))
            return False
        if last_update_id < self.last_update_id:
            self.dropped += 1
            return False
        if self._first:
            ok = first_update_id <= self.last_update_id <= last_update_id or (
                prev_update_id is not None and prev_update_id == self.last_update_id)
        elif prev_update_id is not None:
            ok = prev_update_id == self.last_update_id
        else:
            ok = first_update_id == self.last_update_id + 1
        if not ok:
            self.synced = False
            self.gaps += 1
            return False
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, qty in levels:
                if qty > 0:
                    side[price] = qty
                else:
                    side.pop(price, None)
        self.last_update_id, self._first = last_update_id, False
        return True

    def impact_bps(self, notional: float, mid: float) -> float | None:
        """Cost in bps of mid of buying or selling `notional` at market, the worse of the two sides.

        None when the book is out of sync or too thin on either side to fill the order.
        """
        if not self.synced or mid <= 0:
            return None
        buy = _vwap(self.asks.items(), notional)
        sell = _vwap(reversed(self.bids.items()), notional)
        if buy is None or sell is None:
            return None
        return max((buy / mid - 1.0) * 1e4, (1.0 - sell / mid) * 1e4)


def _vwap(levels: object, notional: float) -> float | None:
    """Average price paid walking `levels` (best first) until `notional` quote currency is filled."""
    filled_quote, filled_base = 0.0, 0.0
    for price, qty in levels:  # type: ignore[attr-defined]
        take = min(qty, (notional - filled_quote) / price)
        filled_quote += take * price
        filled_base += take
        if filled_quote >= notional * (1 - 1e-12):
            return filled_quote / filled_base
    return None
