"""Stored daily-archive days (`cambium market archive`, MKT-6) → the MarketEvent stream the feature engine consumes.

One symbol's aggTrades and bookTicker days become one time-ordered stream, as a recording of the `aggTrade` and
`bookTicker` websocket streams would give it:

- **aggTrades** rows → trade events: ``price``, ``qty``, ``side`` the taker's (``is_buyer_maker`` true → "sell"),
  ``trade_id`` the aggregate id, ``trade_time`` and ``ts`` the row's transact time.
- **bookTicker** rows → book events of kind "top": ``bid``, ``bid_qty``, ``ask``, ``ask_qty``, ``update_id``;
  ``ts`` the row's event time.

Column layouts (Binance added a header row to later files; both are read, a header must name these columns):

    aggTrades   agg_trade_id,price,quantity,first_trade_id,last_trade_id,transact_time,is_buyer_maker
                (spot adds an 8th column is_best_match; spot times are in µs from 2025: a time ≥ 1e14 is read as µs)
    bookTicker  update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,event_time

Order: the two files of a day are merged by exchange time; at equal times the book event comes first (the quote
is known when the trade is applied), and each file keeps its own row order. A row whose time steps back within its
own file is passed in file order: the feature engine treats it as a late event, as it does live. Days follow each
other in date order; a gap between days is a clock jump the engine resyncs over. ``recv_ts`` is the exchange time
in ns (the archive records no receive time).

Bad input: the archive is checksum-verified, so a bad row means a damaged or foreign file. A row that does not
parse (field count, a number that is not a plain decimal, a non-positive price, a negative size, a time out of
range, ``is_buyer_maker`` not true/false) is a one-line `DataError` naming the file and line, never skipped.

No depth: the archive has no depth snapshots or diffs, so the engine's L2 book never syncs. Exactly as on a
recording without the depth stream, ``impact_bps`` then comes from the top of book when `clip_notional` fits in the
best levels (the fill is at the best price) and is missing otherwise, and ``missing_streams`` lists "depth"; every
other feature (returns, volatility, flow, trade rate, volume z-score, spread, microprice, book imbalance of the
top level) is computed as from a recording.
"""

from __future__ import annotations

import gzip
import heapq
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cambium.core.errors import DataError
from cambium.market.binance_wire import MAX_NUM
from cambium.market.events import MarketEvent

__all__ = ["AGG_TRADES_COLUMNS", "BOOK_TICKER_COLUMNS", "ArchiveDay", "ArchiveSession", "archive_events",
           "find_archive", "read_agg_trades", "read_book_ticker"]

AGG_TRADES_COLUMNS = ("agg_trade_id", "price", "quantity", "first_trade_id", "last_trade_id", "transact_time",
                      "is_buyer_maker")
BOOK_TICKER_COLUMNS = ("update_id", "best_bid_price", "best_bid_qty", "best_ask_price", "best_ask_qty",
                       "transaction_time", "event_time")
_KINDS = ("aggTrades", "bookTicker")
_DAY_FILE = re.compile(r"^([A-Z0-9]{2,30})-(aggTrades|bookTicker)-(\d{4}-\d{2}-\d{2})\.csv(?:\.gz)?$")
_INT = re.compile(r"\d{1,19}")
_NUM = re.compile(r"\d{1,30}(?:\.\d{0,30})?(?:[eE][-+]?\d{1,3})?")
_US_FROM = 10**14
"""A time at or above this is in µs (spot archives from 2025), below in ms (2e12 ms is the year 2033)."""
_MAX_TS_MS = 10**13


@dataclass(frozen=True)
class ArchiveDay:
    day: str
    agg_trades: Path
    book_ticker: Path


@dataclass(frozen=True)
class ArchiveSession:
    """One symbol's consecutive archive days: one feature-engine session."""

    market: str
    symbol: str
    days: tuple[ArchiveDay, ...]

    @property
    def source(self) -> str:
        return "binance_spot" if self.market == "spot" else "binance_usdm"

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(p for d in self.days for p in (d.agg_trades, d.book_ticker))


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a .csv or .csv.gz; blank lines are skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("ascii").strip()
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{n}: not ASCII text") from None
                if line:
                    yield n, line.split(",")
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable {'gzip ' if opener is gzip.open else ''}CSV: {exc}") from None


def _int(text: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"{text!r:.40} is not a non-negative integer")
    return int(text)


def _num(text: str, *, positive: bool) -> float:
    if not _NUM.fullmatch(text):
        raise ValueError(f"{text!r:.40} is not a plain decimal number")
    x = float(text)
    if not (x > 0.0 if positive else x >= 0.0) or x > MAX_NUM:
        raise ValueError(f"{text!r:.40} is out of range ({'> 0' if positive else '≥ 0'} and ≤ {MAX_NUM:g})")
    return x


def _ms(text: str) -> int:
    t = _int(text)
    if t >= _US_FROM:
        t //= 1000
    if not 0 < t < _MAX_TS_MS:
        raise ValueError(f"time {text!r:.40} is not an epoch time in ms or µs")
    return t


def _rows(path: Path, columns: tuple[str, ...], extra: int) -> Iterator[tuple[int, list[str]]]:
    """Data rows of an archive CSV with `columns` (plus up to `extra` trailing ones); a header row is checked."""
    first = True
    for n, fields in _lines(path):
        if first:
            first = False
            if fields and not fields[0][:1].isdigit():
                if tuple(f.strip().lower() for f in fields[: len(columns)]) != columns:
                    raise DataError(f"{path}:{n}: header {','.join(fields)[:120]!r} is not {','.join(columns)!r}")
                continue
        if not len(columns) <= len(fields) <= len(columns) + extra:
            raise DataError(f"{path}:{n}: {len(fields)} fields, expected {len(columns)} ({','.join(columns)})")
        yield n, fields


def read_agg_trades(path: Path, symbol: str, source: str = "binance_usdm") -> Iterator[MarketEvent]:
    """Trade events of one aggTrades day file, in file order (see the module for the columns)."""
    for n, f in _rows(path, AGG_TRADES_COLUMNS, extra=1):
        try:
            agg_id, price, qty, ts = _int(f[0]), _num(f[1], positive=True), _num(f[2], positive=False), _ms(f[5])
            maker = f[6].strip().lower()
            if maker not in ("true", "false"):
                raise ValueError(f"is_buyer_maker {f[6]!r:.20} is not true/false")
        except ValueError as exc:
            raise DataError(f"{path}:{n}: {exc}") from None
        payload = {"price": price, "qty": qty, "side": "sell" if maker == "true" else "buy", "trade_id": agg_id,
                   "trade_time": ts}
        yield MarketEvent(ts, source, symbol, "trade", payload, ts * 1_000_000)


def read_book_ticker(path: Path, symbol: str, source: str = "binance_usdm") -> Iterator[MarketEvent]:
    """Top-of-book events of one bookTicker day file, in file order (see the module for the columns)."""
    for n, f in _rows(path, BOOK_TICKER_COLUMNS, extra=0):
        try:
            update_id = _int(f[0])
            bid, bid_qty = _num(f[1], positive=True), _num(f[2], positive=False)
            ask, ask_qty = _num(f[3], positive=True), _num(f[4], positive=False)
            _ms(f[5])
            ts = _ms(f[6])
        except ValueError as exc:
            raise DataError(f"{path}:{n}: {exc}") from None
        payload = {"kind": "top", "bid": bid, "bid_qty": bid_qty, "ask": ask, "ask_qty": ask_qty,
                   "update_id": update_id}
        yield MarketEvent(ts, source, symbol, "book", payload, ts * 1_000_000)


def _ts(ev: MarketEvent) -> int:
    return ev.ts


def archive_events(session: ArchiveSession) -> Iterator[MarketEvent]:
    """The session's events: each day's bookTicker and aggTrades merged by time (book first at equal times)."""
    for day in session.days:
        books = read_book_ticker(day.book_ticker, session.symbol, session.source)
        trades = read_agg_trades(day.agg_trades, session.symbol, session.source)
        # heapq.merge is stable: at equal keys the earlier iterable's item (the book) comes first
        yield from heapq.merge(books, trades, key=_ts)


def _day_files(kind_dir: Path, symbol: str, kind: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    folder = kind_dir / symbol
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            m = _DAY_FILE.match(p.name)
            if m and m.group(1) == symbol and m.group(2) == kind:
                out.setdefault(m.group(3), p)
    return out


def _session(market_dir: Path, symbol: str, only: Sequence[str] | None = None) -> ArchiveSession:
    trades = _day_files(market_dir / "aggTrades", symbol, "aggTrades")
    books = _day_files(market_dir / "bookTicker", symbol, "bookTicker")
    wanted = sorted(set(trades) | set(books)) if only is None else sorted(only)
    if not wanted:
        raise DataError(f"{market_dir}: no aggTrades/bookTicker days of {symbol} (expected "
                        f"<kind>/{symbol}/{symbol}-<kind>-<YYYY-MM-DD>.csv.gz)")
    for day in wanted:
        for kind, have in (("aggTrades", trades), ("bookTicker", books)):
            if day not in have:
                raise DataError(f"{market_dir}: {symbol} has no {kind} day {day}; the feature engine needs both "
                                f"aggTrades and bookTicker of each day (cambium market archive --kind {kind})")
    return ArchiveSession(market_dir.name, symbol, tuple(ArchiveDay(d, trades[d], books[d]) for d in wanted))


def _is_market_dir(path: Path) -> bool:
    return any((path / kind).is_dir() for kind in _KINDS)


def _market_sessions(market_dir: Path) -> list[ArchiveSession]:
    symbols = sorted({p.name for kind in _KINDS if (market_dir / kind).is_dir()
                      for p in (market_dir / kind).iterdir() if p.is_dir()})
    return [_session(market_dir, s) for s in symbols]


def find_archive(path: Path) -> list[ArchiveSession] | None:
    """The sessions (one per market and symbol) an archive path names, or None when `path` is not archive-shaped.

    Accepted: the archive root (`<out>`, holding futures/ or spot/), a market directory (`<out>/<market>`), a symbol
    directory (`<out>/<market>/<kind>/<SYMBOL>`) or one day file (`<SYMBOL>-<kind>-<YYYY-MM-DD>.csv.gz`, its pair
    of the other kind looked up in the same layout). An archive-shaped path lacking a day's pair is a DataError."""
    if path.is_file():
        m = _DAY_FILE.match(path.name)
        if m is None:
            return None
        symbol, kind, day = m.groups()
        if path.parent.name != symbol or path.parent.parent.name != kind:
            raise DataError(f"{path}: an archive day file must lie in <market>/{kind}/{symbol}/ (as `cambium market "
                            f"archive` stores it) so its {'bookTicker' if kind == 'aggTrades' else 'aggTrades'} "
                            f"pair can be found")
        return [_session(path.parent.parent.parent, symbol, [day])]
    if not path.is_dir():
        return None
    if path.parent.name in _KINDS:
        return [_session(path.parent.parent, path.name)]
    if _is_market_dir(path):
        sessions = _market_sessions(path)
    else:
        markets = [path / m for m in ("futures", "spot") if _is_market_dir(path / m)]
        if not markets:
            return None
        sessions = [s for m in markets for s in _market_sessions(m)]
    if not sessions:
        raise DataError(f"{path}: holds no symbol directories under aggTrades/ or bookTicker/")
    return sessions
