"""The fast L2 book (`book.OrderBook`) against the plain `SortedDict` one (`book_reference.ReferenceOrderBook`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.screener.book import OrderBook
from cambium.screener.book_reference import ReferenceOrderBook
from cambium.screener.sources import iter_events

WS = Path(__file__).resolve().parents[2] / "data" / "samples" / "market" / "ws" / "binance_usdm_hftbacktest"
NOTIONALS = (1e3, 1e5, 1e6, 3e7)


def state(book: OrderBook | ReferenceOrderBook, mid: float) -> tuple[object, ...]:
    """Everything observable, floats as repr so that every bit counts."""
    if isinstance(book, OrderBook):
        bids = [(p, book.bids[p]) for p in book.bid_prices]
        asks = [(p, book.asks[p]) for p in book.ask_prices]
    else:
        bids, asks = list(book.bids.items()), list(book.asks.items())
    return (book.synced, book.gaps, book.dropped, book.last_update_id, repr(bids), repr(asks),
            repr([book.impact_bps(n, mid) for n in NOTIONALS]))


@pytest.mark.parametrize("symbol", ["btcusdt", "ethusdt"])
def test_fast_book_equals_the_reference_on_the_committed_captures(symbol: str) -> None:
    fast, ref = OrderBook(), ReferenceOrderBook()
    mid, checked = 0.0, 0
    for i, ev in enumerate(iter_events(WS / f"{symbol}_20240808.gz")):
        p = ev.payload
        if ev.type != "book":
            continue
        if p["kind"] == "top":
            mid = 0.5 * (p["bid"] + p["ask"])
        elif p["kind"] == "snapshot":
            for book in (fast, ref):
                book.apply_snapshot(p["bids"], p["asks"], p["last_update_id"])
        else:
            args = (p["bids"], p["asks"], p["first_update_id"], p["last_update_id"], p["prev_update_id"])
            assert fast.apply_diff(*args) == ref.apply_diff(*args)
            assert (fast.synced, fast.last_update_id) == (ref.synced, ref.last_update_id)
        if i % 97 == 0:
            assert state(fast, mid) == state(ref, mid), i
            checked += 1
    assert fast.synced and checked > 300 and len(fast.bids) > 100
    assert state(fast, mid) == state(ref, mid)


PRICES = st.sampled_from([99.0, 99.5, 100.0, 100.5, 101.0, 101.5, 102.0])
LEVELS = st.lists(st.tuples(PRICES, st.sampled_from([0.0, 0.5, 1.0, 2.5, 40.0])).map(list), max_size=6)
OPS = st.lists(st.one_of(
    st.tuples(st.just("snapshot"), LEVELS, LEVELS, st.integers(0, 30)),
    st.tuples(st.just("diff"), LEVELS, LEVELS, st.integers(0, 30), st.integers(0, 3), st.booleans()),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, buffer=st.integers(1, 5))
def test_fast_book_equals_the_reference_on_any_sequence(ops: list[tuple], buffer: int) -> None:
    """Snapshots, continuing diffs, gaps, stale diffs and the pre-snapshot buffer (small, so it overflows)."""
    fast, ref = OrderBook(buffer), ReferenceOrderBook(buffer)
    for op in ops:
        if op[0] == "snapshot":
            _, bids, asks, last = op
            for book in (fast, ref):
                book.apply_snapshot(bids, asks, last)
        else:
            _, bids, asks, first, span, usdm = op
            prev = (ref.last_update_id or 0) if usdm else None
            args = (bids, asks, first, first + span, prev)
            assert fast.apply_diff(*args) == ref.apply_diff(*args)
        assert state(fast, 100.25) == state(ref, 100.25)
        assert fast.best_bid == (ref.bids.peekitem(-1)[0] if ref.bids else None)
        assert fast.best_ask == (ref.asks.peekitem(0)[0] if ref.asks else None)
