"""A local L2 order book kept from a REST snapshot and the depth diff stream, and the impact of a market order.

Sync rules (Binance's documented procedure): diffs that arrive while the book is not synced are buffered (the last
`buffer` of them), because the REST snapshot is usually fetched after the stream started; on a snapshot the buffered
diffs are replayed. Diffs older than the snapshot (`last_update_id < snapshot id`) are dropped; the first diff
applied must straddle the snapshot id (`first_update_id <= id <= last_update_id`); after that
each diff must continue the previous one — USDⓈ-M: `prev_update_id == previous last_update_id`, spot:
`first_update_id == previous last_update_id + 1`. A break is a gap: the book is out of sync (its impact is unknown)
until the next snapshot. Gaps are counted, never fatal.

Layout, for speed (`book_reference.ReferenceOrderBook` is the plain `SortedDict` version; tests hold them equal):
each side is a dict price → qty plus a sorted list of its prices. Most levels of a diff change the size of a price
already in the book, which is one dict store; only a new or emptied price touches the sorted list (a C bisect and
memmove). Buffered diffs keep their levels as flat `array('d')`s: a live book that never gets a snapshot buffers
thousands of diffs of ~70 levels, and as lists of lists they would be hundreds of thousands of objects for the
garbage collector to traverse again and again (measured: full collections took half the replay time).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import chain

__all__ = ["OrderBook"]

Levels = Sequence[Sequence[float]]  # [[price, qty], ...]
_Pending = tuple[Levels | array, Levels | array, int, int, int | None]


class OrderBook:
    __slots__ = ("_first", "_pending", "ask_prices", "asks", "bid_prices", "bids", "dropped", "gaps",
                 "last_update_id", "synced")

    def __init__(self, buffer: int = 2_000) -> None:
        self.bids: dict[float, float] = {}  # price -> qty
        self.asks: dict[float, float] = {}
        self.bid_prices: list[float] = []  # ascending: the best bid is the last
        self.ask_prices: list[float] = []  # ascending: the best ask is the first
        self.last_update_id: int | None = None
        self.synced = False
        self.gaps = 0
        self.dropped = 0
        self._first = True
        self._pending: deque[_Pending] = deque(maxlen=buffer)

    @property
    def best_bid(self) -> float | None:
        return self.bid_prices[-1] if self.bid_prices else None

    @property
    def best_ask(self) -> float | None:
        return self.ask_prices[0] if self.ask_prices else None

    def apply_snapshot(self, bids: Levels, asks: Levels, last_update_id: int) -> None:
        self.bids = {float(p): float(q) for p, q in bids if float(q) > 0}
        self.asks = {float(p): float(q) for p, q in asks if float(q) > 0}
        self.bid_prices, self.ask_prices = sorted(self.bids), sorted(self.asks)
        self.last_update_id = last_update_id
        self.synced, self._first = True, True
        pending, self._pending = list(self._pending), deque(maxlen=self._pending.maxlen)
        for bids_, asks_, first, last, prev in pending:
            if last >= last_update_id and not self.apply_diff(_unpack(bids_), _unpack(asks_), first, last, prev):
                break

    def apply_diff(self, bids: Levels, asks: Levels, first_update_id: int, last_update_id: int,
                   prev_update_id: int | None) -> bool:
        """Apply one diff; returns False (and counts it) when it is dropped or breaks the sequence."""
        if not self.synced or self.last_update_id is None:
            self._pending.append((_pack(bids), _pack(asks), first_update_id, last_update_id, prev_update_id))
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
        _update(self.bids, self.bid_prices, bids)
        _update(self.asks, self.ask_prices, asks)
        self.last_update_id, self._first = last_update_id, False
        return True

    def impact_bps(self, notional: float, mid: float) -> float | None:
        """Cost in bps of mid of buying or selling `notional` at market, the worse of the two sides.

        None when the book is out of sync or too thin on either side to fill the order.
        """
        if not self.synced or mid <= 0:
            return None
        buy = _vwap(self.ask_prices, self.asks, notional)
        sell = _vwap(reversed(self.bid_prices), self.bids, notional)
        if buy is None or sell is None:
            return None
        return max((buy / mid - 1.0) * 1e4, (1.0 - sell / mid) * 1e4)


def _update(side: dict[float, float], prices: list[float], levels: Levels) -> None:
    for price, qty in levels:
        if qty > 0:
            if price not in side:
                insort(prices, price)
            side[price] = qty
        elif price in side:
            del side[price]
            del prices[bisect_left(prices, price)]


def _pack(levels: Levels) -> Levels | array:
    """[[price, qty], ...] as one flat array('d'), which the garbage collector does not track. Levels are floats
    (the payload contract; an int would come back as a float); levels that are not number pairs are kept as they
    are (applying them fails later, as it would have)."""
    try:
        flat = array("d", chain.from_iterable(levels))
    except TypeError:
        return levels
    return flat if len(flat) == 2 * len(levels) else levels


def _unpack(levels: Levels | array) -> Levels:
    if isinstance(levels, array):
        return list(zip(levels[::2], levels[1::2], strict=True))
    return levels


def _vwap(prices: Iterable[float], qty_at: dict[float, float], notional: float) -> float | None:
    """Average price paid walking `prices` (best first) until `notional` quote currency is filled."""
    filled_quote, filled_base = 0.0, 0.0
    for price in prices:
        qty = qty_at[price]
        take = min(qty, (notional - filled_quote) / price)
        filled_quote += take * price
        filled_base += take
        if filled_quote >= notional * (1 - 1e-12):
            return filled_quote / filled_base
    return None
