"""Stored archive days (aggTrades + bookTicker) → MarketEvents: both CSV layouts, the merge order, finding days,
and bad rows (one line naming file and line, never a traceback)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.market.archive_events import (
    AGG_TRADES_COLUMNS,
    BOOK_TICKER_COLUMNS,
    archive_events,
    find_archive,
    read_agg_trades,
    read_book_ticker,
)

T0 = 1_723_075_200_000  # 2024-08-08 00:00 UTC, ms
TRADES = [f"{100 + i},{'60000.1' if i % 2 else '60000.2'},0.{i + 1}00,{200 + i},{201 + i},{T0 + 10 * i},"
          f"{'true' if i % 2 else 'false'}" for i in range(6)]
BOOKS = [f"{900 + i},60000.0,{i + 1}.5,60000.3,2.25,{T0 + 10 * i + 5 - 1},{T0 + 10 * i + 5 * (i % 2)}"
         for i in range(6)]


def write_day(root: Path, kind: str, rows: list[str], *, symbol: str = "BTCUSDT", day: str = "2024-08-08",
              market: str = "futures", header: bool = True) -> Path:
    cols = AGG_TRADES_COLUMNS if kind == "aggTrades" else BOOK_TICKER_COLUMNS
    path = root / market / kind / symbol / f"{symbol}-{kind}-{day}.csv.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([",".join(cols)] if header else []) + rows
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    return path


@pytest.mark.parametrize("header", [True, False])
def test_rows_become_trade_and_top_of_book_events(tmp_path: Path, header: bool) -> None:
    trades = list(read_agg_trades(write_day(tmp_path, "aggTrades", TRADES, header=header), "BTCUSDT"))
    books = list(read_book_ticker(write_day(tmp_path, "bookTicker", BOOKS, header=header), "BTCUSDT"))
    assert len(trades) == 6 and len(books) == 6
    t = trades[1]
    assert (t.ts, t.type, t.symbol, t.source, t.recv_ts) == (T0 + 10, "trade", "BTCUSDT", "binance_usdm",
                                                            (T0 + 10) * 1_000_000)
    # is_buyer_maker true: the buyer rested, the taker sold
    assert t.payload == {"price": 60000.1, "qty": 0.2, "side": "sell", "trade_id": 101, "trade_time": T0 + 10}
    assert trades[0].payload["side"] == "buy"
    b = books[1]
    assert (b.ts, b.type) == (T0 + 15, "book")  # the event time, not the transaction time
    assert b.payload == {"kind": "top", "bid": 60000.0, "bid_qty": 2.5, "ask": 60000.3, "ask_qty": 2.25,
                         "update_id": 901}


def test_the_merge_is_time_ordered_with_books_first_at_ties(tmp_path: Path) -> None:
    write_day(tmp_path, "aggTrades", TRADES)
    write_day(tmp_path, "bookTicker", BOOKS, header=False)
    (session,) = find_archive(tmp_path) or []
    events = list(archive_events(session))
    assert len(events) == 12
    keys = [(e.ts, 0 if e.type == "book" else 1) for e in events]
    assert keys == sorted(keys)
    # even rows of both files share a time: the quote comes before the trade
    assert [e.type for e in events[:2]] == ["book", "trade"] and events[0].ts == events[1].ts == T0
    assert events == list(archive_events(session))  # deterministic


def test_days_are_chained_in_date_order_and_paths_of_every_level_find_them(tmp_path: Path) -> None:
    for day, shift in (("2024-08-09", 86_400_000), ("2024-08-08", 0)):
        write_day(tmp_path, "aggTrades", [r.replace(str(T0), str(T0 + shift)) for r in TRADES[:1]], day=day)
        write_day(tmp_path, "bookTicker", [r.replace(str(T0), str(T0 + shift)) for r in BOOKS[:1]], day=day)
    root = find_archive(tmp_path)
    assert root is not None and [d.day for d in root[0].days] == ["2024-08-08", "2024-08-09"]
    assert find_archive(tmp_path / "futures") == root
    assert find_archive(tmp_path / "futures" / "bookTicker" / "BTCUSDT") == root
    (one,) = find_archive(tmp_path / "futures/aggTrades/BTCUSDT/BTCUSDT-aggTrades-2024-08-09.csv.gz") or []
    assert [d.day for d in one.days] == ["2024-08-09"] and len(one.files) == 2
    ts = [e.ts for e in archive_events(root[0])]
    assert ts == sorted(ts) and ts[-1] - ts[0] == 86_400_000


def test_non_archive_paths_are_not_taken_and_a_missing_pair_is_named(tmp_path: Path) -> None:
    other = tmp_path / "btcusdt_20240808.gz"
    other.write_bytes(b"")
    assert find_archive(other) is None and find_archive(tmp_path) is None
    write_day(tmp_path, "aggTrades", TRADES)
    with pytest.raises(DataError, match="no bookTicker day 2024-08-08"):
        find_archive(tmp_path)


def test_spot_files_with_a_best_match_column_and_microsecond_times(tmp_path: Path) -> None:
    row = f"7,3000.5,1.5,1,2,{(T0 + 123) * 1000 + 456},True,True"
    (t,) = read_agg_trades(write_day(tmp_path, "aggTrades", [row], market="spot", header=False), "ETHUSDT",
                           "binance_spot")
    assert t.ts == T0 + 123 and t.payload["side"] == "sell" and t.source == "binance_spot"


@pytest.mark.parametrize(("kind", "row", "match"), [
    ("aggTrades", "1,2,3", "3 fields, expected 7"),
    ("aggTrades", f"1,nan,1,1,1,{T0},true", "not a plain decimal"),
    ("aggTrades", f"1,0,1,1,1,{T0},true", "out of range"),
    ("aggTrades", f"1,1,1,1,1,{T0},maybe", "is_buyer_maker"),
    ("aggTrades", "1,1,1,1,1,-5,true", "not a non-negative integer"),
    ("bookTicker", f"1,1,1,1e99,1,{T0},{T0}", "out of range"),
    ("bookTicker", f"1,1,1,1,1,{T0},0", "not an epoch time"),
])
def test_a_bad_row_names_its_file_and_line(tmp_path: Path, kind: str, row: str, match: str) -> None:
    good = TRADES[0] if kind == "aggTrades" else BOOKS[0]
    path = write_day(tmp_path, kind, [good, row])
    reader = read_agg_trades if kind == "aggTrades" else read_book_ticker
    with pytest.raises(DataError, match=match) as info:
        list(reader(path, "BTCUSDT"))
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_a_foreign_header_or_a_broken_gzip_is_a_clear_error(tmp_path: Path) -> None:
    path = write_day(tmp_path, "bookTicker", [], header=False)
    path.write_bytes(gzip.compress(b"id,bid,ask\n1,2,3\n"))
    with pytest.raises(DataError, match=":1: header"):
        list(read_book_ticker(path, "BTCUSDT"))
    path.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(DataError, match="not a readable gzip CSV"):
        list(read_book_ticker(path, "BTCUSDT"))


_FIELD = st.one_of(st.text(alphabet="0123456789.-eE,truefalsTRUE \t", max_size=14),
                   st.integers(-5, 2 * 10**15).map(str), st.sampled_from(["true", "false", "", "nan", "inf"]))


def _mutated(row: str) -> st.SearchStrategy[str]:
    """A good row with one field replaced (most draws fail on exactly one check)."""
    n = row.count(",") + 1
    return st.tuples(st.integers(0, n - 1), _FIELD).map(
        lambda f: ",".join(f[1] if i == f[0] else v for i, v in enumerate(row.split(","))))


_ROW = st.one_of(st.lists(_FIELD, min_size=0, max_size=9).map(",".join), st.sampled_from(TRADES + BOOKS),
                 _mutated(TRADES[1]), _mutated(BOOKS[1]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["aggTrades", "bookTicker"]), header=st.booleans(), rows=st.lists(_ROW, max_size=6),
       raw=st.binary(max_size=40))
def test_fuzzed_rows_give_events_or_one_clear_line(tmp_path: Path, kind: str, header: bool, rows: list[str],
                                                  raw: bytes) -> None:
    path = write_day(tmp_path, kind, rows, header=header)
    reader = read_agg_trades if kind == "aggTrades" else read_book_ticker
    try:
        events = list(reader(path, "BTCUSDT"))
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert all(e.ts > 0 and e.type in ("trade", "book") for e in events)
    path.write_bytes(raw)  # arbitrary bytes, gzip or not
    try:
        list(reader(path, "BTCUSDT"))
    except DataError as exc:
        assert str(path) in str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trade_gaps=st.lists(st.integers(0, 5), max_size=30), book_gaps=st.lists(st.integers(0, 5), max_size=30))
def test_any_two_time_sorted_files_merge_into_one_time_sorted_stream(tmp_path: Path, trade_gaps: list[int],
                                                                      book_gaps: list[int]) -> None:
    def times(gaps: list[int]) -> list[int]:
        out, t = [], T0
        for g in gaps:
            t += g
            out.append(t)
        return out

    trades = [f"{i},10.5,1,{i},{i},{t},true" for i, t in enumerate(times(trade_gaps))]
    books = [f"{i},10,1,11,1,{t},{t}" for i, t in enumerate(times(book_gaps))]
    write_day(tmp_path, "aggTrades", trades)
    write_day(tmp_path, "bookTicker", books, header=False)
    (session,) = find_archive(tmp_path) or []
    events = list(archive_events(session))
    keys = [(e.ts, e.type != "book") for e in events]
    assert keys == sorted(keys) and len(events) == len(trades) + len(books)
    # each file's own rows keep their order
    assert [e.payload["trade_id"] for e in events if e.type == "trade"] == list(range(len(trades)))
    assert [e.payload["update_id"] for e in events if e.type == "book"] == list(range(len(books)))
