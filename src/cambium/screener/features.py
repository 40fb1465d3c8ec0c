"""The streaming feature engine (SCR-2): MarketEvents in, one FeatureSnapshot per symbol per cadence tick out.

Clock. Event time (the exchange's `E`), on a grid of `cadence_ms`: bar k covers (b_k − cadence, b_k]. Book and
trade streams arrive on different connections (USDⓈ-M /public and /market), so the clock is a watermark: the
slower of the two streams' latest event times, but never more than `max_skew_ms` behind the newest event seen, and
never moving backwards. When an event moves the clock past the current boundary the bar closes for every symbol and
snapshots are emitted (one per symbol with a quote), then the event is applied. An event older than the open bar
arrived late: it is counted and applied to the open bar, never to a closed one.

Clock jumps. An event more than `max_clock_jump_ms` ahead of or behind the clock (a corrupt or hostile event time:
one frame stamped a year ahead would otherwise make the engine close a bar per cadence up to it) is held, not applied,
and fills no bar. The next event near the clock drops what is held: those events are counted in `clock_jumps` (the
malformed count by reason "clock_jump"). If instead `RESYNC_EVENTS` held events in a row agree with each other (within
`max_clock_jump_ms` of the first), the stream itself moved (an outage longer than the longest window, recordings of
two days merged): the open bar closes (when the jump is forward), the clock restarts at the held events without
filling the gap, and they are applied in order. The windows then hold the bars from before the gap; with the default
jump bound (the longest window) every window has rolled past the gap within its own length.

State per symbol is a handful of running sums over ring buffers of per-bar aggregates (`Rolling`), so a snapshot
costs the same whatever the trade count or window length. Definitions (n = window / cadence bars, c_i the bar-close
mid, i.e. the mid of the last bookTicker at or before b_i):
    ret_bps_w        1e4 · ln(c_i / c_{i−n})                    (needs n earlier closes)
    realized_vol     1e4 · sqrt(Σ ln(c_j/c_{j−1})² over n returns)
    natr_bps         1e4 · mean(high_j − low_j over 60 s) / c_i, high/low of the mid inside bar j including c_{j−1}
    flow_imbalance   (taker buy qty − taker sell qty) / (buy + sell) over the window (None without trades)
    trade_rate       trades / window seconds
    volume_zscore    (V60 − n60·m) / (sqrt(n60)·s), V60 the 60 s notional, m and s the mean and std of per-bar
                     notional over 5 m
    regime_vol       realized_vol_60s / realized_vol_5m;  regime_trend  |ret_bps_5m| / (realized_vol_5m + 1e-9)
    impact_bps       the worse side's cost of a market order of `clip_notional` through the local L2 book (or the
                     top of book when the L2 book is not in sync and the clip fits in the best levels)
Trades that arrive before a symbol's first quote are dropped (the L2 book takes every depth event).
`features_offline.py` computes the same numbers with array operations over a whole recording; a test holds the two
equal.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable

from cambium.market.events import MarketEvent
from cambium.screener.book import OrderBook
from cambium.screener.config import FeatureConfig
from cambium.screener.contracts import DataHealth, FeatureSnapshot

__all__ = ["WINDOWS_MS", "FeatureEngine", "Rolling", "SymbolState", "derive_features", "impact_bps"]

WINDOWS_MS = {"1s": 1_000, "10s": 10_000, "60s": 60_000, "5m": 300_000}
RESYNC_EVENTS = 64
"""Held off-clock events in a row that move the clock to them (see "Clock jumps" above)."""


class Rolling:
    """Sum (and count) of the last `n` values pushed: a ring buffer with a running total."""

    __slots__ = ("buf", "filled", "i", "n", "total")

    def __init__(self, n: int) -> None:
        self.n, self.buf, self.i, self.total, self.filled = n, [0.0] * n, 0, 0.0, 0

    def push(self, x: float) -> None:
        self.total += x - self.buf[self.i]
        self.buf[self.i] = x
        self.i = (self.i + 1) % self.n
        self.filled = min(self.filled + 1, self.n)

    @property
    def full(self) -> bool:
        return self.filled == self.n


class SymbolState:
    """Everything the engine keeps about one symbol."""

    def __init__(self, symbol: str, cfg: FeatureConfig, first_ts: int) -> None:
        self.symbol, self.first_ts = symbol, first_ts
        bars = {label: ms // cfg.cadence_ms for label, ms in WINDOWS_MS.items()}
        self.bars = bars
        self.bid = self.ask = self.bid_qty = self.ask_qty = self.mid = math.nan
        self.high = self.low = math.nan
        self.buy = self.sell = self.notional = 0.0
        self.trades = 0
        self.last_book_ts: int | None = None
        self.last_trade_ts: int | None = None
        self.seen: set[str] = set()
        self.book = OrderBook()
        self.closes: deque[float] = deque(maxlen=bars["5m"] + 1)
        self.buy_w = {k: Rolling(n) for k, n in bars.items()}
        self.sell_w = {k: Rolling(n) for k, n in bars.items()}
        self.trades_w = {k: Rolling(n) for k, n in bars.items()}
        self.notional_w = {k: Rolling(n) for k, n in bars.items()}
        self.notional_sq_5m = Rolling(bars["5m"])
        self.sq_ret = {k: Rolling(bars[k]) for k in ("60s", "5m")}
        self.tr_60s = Rolling(bars["60s"])

    @property
    def has_quote(self) -> bool:
        return not math.isnan(self.mid)

    def apply(self, ev: MarketEvent) -> None:
        p = ev.payload
        if ev.type == "book":
            kind = p.get("kind")
            if kind == "top":  # three events in four on the captures: plain comparisons and stores only
                bid, ask = self.bid, self.ask = p["bid"], p["ask"]
                self.bid_qty, self.ask_qty = p["bid_qty"], p["ask_qty"]
                mid = self.mid = 0.5 * (bid + ask)
                # max(high, mid) / min(low, mid), where a NaN high/low means "no mid yet in this bar"
                if mid > self.high or self.high != self.high:
                    self.high = mid
                if mid < self.low or self.low != self.low:
                    self.low = mid
                self.seen.add("bookTicker")
            elif kind == "snapshot":
                self.book.apply_snapshot(p["bids"], p["asks"], p["last_update_id"])
            elif kind == "diff":
                self.book.apply_diff(p["bids"], p["asks"], p["first_update_id"], p["last_update_id"],
                                     p.get("prev_update_id"))
                if self.has_quote:
                    self.seen.add("depth")
            if self.has_quote:
                self.last_book_ts = ev.ts
        elif ev.type == "trade" and self.has_quote:
            qty = p["qty"]
            if p["side"] == "buy":
                self.buy += qty
            else:
                self.sell += qty
            self.trades += 1
            self.notional += qty * p["price"]
            self.last_trade_ts = ev.ts
            self.seen.add("trade")

    def close_bar(self) -> None:
        """Push the open bar's aggregates into the windows and start the next bar at the closing mid."""
        close = self.mid
        for label in self.bars:
            self.buy_w[label].push(self.buy)
            self.sell_w[label].push(self.sell)
            self.trades_w[label].push(float(self.trades))
            self.notional_w[label].push(self.notional)
        self.notional_sq_5m.push(self.notional * self.notional)
        if self.closes:
            r = math.log(close / self.closes[-1])
            for roll in self.sq_ret.values():
                roll.push(r * r)
        self.tr_60s.push(self.high - self.low)
        self.closes.append(close)
        self.high = self.low = close
        self.buy = self.sell = self.notional = 0.0
        self.trades = 0


Windows = dict[str, dict[str, float | None]]


def derive_features(s: SymbolState, clip_notional: float) -> tuple[dict[str, float | None], Windows]:
    """The schema features and per-window aggregates of `s` right after `close_bar`."""
    mid = s.closes[-1]
    depth = s.bid_qty + s.ask_qty
    out: dict[str, float | None] = {
        "mid": mid,
        "microprice": (s.bid * s.ask_qty + s.ask * s.bid_qty) / depth if depth > 0 else None,
        "spread_bps": (s.ask - s.bid) / mid * 1e4,
        "book_imbalance": (s.bid_qty - s.ask_qty) / depth if depth > 0 else None,
        "impact_bps": impact_bps(s.book, clip_notional, mid, s.bid, s.ask, s.bid_qty, s.ask_qty),
    }
    windows: Windows = {}
    for label, n in s.bars.items():
        buy, sell = s.buy_w[label].total, s.sell_w[label].total
        ret = 1e4 * math.log(mid / s.closes[-1 - n]) if len(s.closes) > n else None
        seconds = WINDOWS_MS[label] / 1000
        windows[label] = {"ret_bps": ret, "trades": s.trades_w[label].total, "buy_qty": buy, "sell_qty": sell,
                          "notional": s.notional_w[label].total}
        out[f"ret_bps_{label}"] = ret
        if label in ("10s", "60s"):
            out[f"flow_imbalance_{label}"] = (buy - sell) / (buy + sell) if buy + sell > 0 else None
            out[f"trade_rate_{label}"] = s.trades_w[label].total / seconds
    for label, roll in s.sq_ret.items():
        rv = 1e4 * math.sqrt(max(roll.total, 0.0)) if roll.full else None
        out[f"realized_vol_bps_{label}"] = rv
        windows[label]["realized_vol_bps"] = rv
    out["natr_bps"] = 1e4 * (s.tr_60s.total / s.tr_60s.n) / mid if s.tr_60s.full else None
    out["volume_zscore_60s"] = _zscore(s)
    rv60, rv5 = out["realized_vol_bps_60s"], out["realized_vol_bps_5m"]
    out["regime_vol"] = rv60 / rv5 if rv60 is not None and rv5 else None
    ret5 = out["ret_bps_5m"]
    out["regime_trend"] = abs(ret5) / (rv5 + 1e-9) if ret5 is not None and rv5 is not None else None
    return out, windows


def impact_bps(book: OrderBook, clip: float, mid: float, bid: float, ask: float, bid_qty: float,
               ask_qty: float) -> float | None:
    """From the L2 book when it is in sync; otherwise from the top of book when the clip fits in the best levels
    (then the fill is at the best price); None when neither can tell."""
    if book.synced:
        return book.impact_bps(clip, mid)
    if clip <= ask * ask_qty and clip <= bid * bid_qty:
        return max((ask / mid - 1.0) * 1e4, (1.0 - bid / mid) * 1e4)
    return None


def _zscore(s: SymbolState) -> float | None:
    hist = s.notional_w["5m"]
    if not hist.full:
        return None
    n5, n60 = hist.n, s.bars["60s"]
    mean = hist.total / n5
    var = s.notional_sq_5m.total / n5 - mean * mean
    if var <= mean * mean * 1e-12 or var <= 0:
        return None
    return (s.notional_w["60s"].total - n60 * mean) / (math.sqrt(n60) * math.sqrt(var))


class FeatureEngine:
    """Feed MarketEvents in arrival order with `on_event`; call `flush` at the end of a recording."""

    def __init__(self, cfg: FeatureConfig | None = None, owns: Callable[[str], bool] | None = None) -> None:
        """`owns`, if given, selects the symbols this engine keeps state for (a shard of the sharded replay): every
        event still moves the clock, so bars close where an engine of every symbol closes them."""
        self.cfg = cfg or FeatureConfig()
        self.owns = owns
        self.symbols: dict[str, SymbolState] = {}
        self.bar_end: int | None = None
        self.clock = -(2**62)
        self.newest = -(2**62)
        self.kind_newest: dict[str, int] = {}
        self.events = 0
        self.late_events = 0
        self.ignored_events = 0
        self.clock_jumps = 0
        self.resyncs = 0
        self.held: list[MarketEvent] = []
        self._jump = self.cfg.max_clock_jump_ms

    def _advance_clock(self, ev: MarketEvent) -> int:
        """clock = max(clock, min(newest book ts, newest trade ts), newest − max_skew_ms), written out for speed."""
        ts, kind = ev.ts, ev.type
        if ts > self.newest:
            self.newest = ts
        if kind == "book" or kind == "trade":
            prev = self.kind_newest.get(kind)
            if prev is None or ts > prev:
                self.kind_newest[kind] = ts
        book, trade = self.kind_newest.get("book"), self.kind_newest.get("trade")
        if book is None:
            low = self.newest if trade is None else trade
        else:
            low = book if trade is None or book <= trade else trade
        clock = self.clock
        if low > clock:
            clock = low
        skewed = self.newest - self.cfg.max_skew_ms
        if skewed > clock:
            clock = skewed
        self.clock = clock
        return clock

    def on_event(self, ev: MarketEvent) -> list[FeatureSnapshot]:
        # Only a new newest event can jump ahead, only a late one behind; the first event starts the clock.
        ts = ev.ts
        if ts > self.newest:
            if ts > self.clock + self._jump and self.bar_end is not None:
                return self._off_clock(ev)
        elif ts < self.clock - self._jump and self.bar_end is not None:
            return self._off_clock(ev)
        if self.held:
            self._drop_held()
        clock = self._advance_clock(ev)
        out: list[FeatureSnapshot] = []
        bar_end = self.bar_end
        if bar_end is None or clock > bar_end:
            bar_end = self._close_bars(clock, out)
        if ev.ts <= bar_end - self.cfg.cadence_ms:
            self.late_events += 1
        if self.owns is not None and not self.owns(ev.symbol):
            return out
        state = self.symbols.get(ev.symbol)
        if state is None:
            state = self.symbols[ev.symbol] = SymbolState(ev.symbol, self.cfg, ev.ts)
        if ev.type == "book" or ev.type == "trade":
            state.apply(ev)
        else:
            self.ignored_events += 1
        self.events += 1
        return out

    def _off_clock(self, ev: MarketEvent) -> list[FeatureSnapshot]:
        held = self.held
        if held and abs(ev.ts - held[0].ts) > self._jump:
            self._drop_held()
        held.append(ev)
        if len(held) < RESYNC_EVENTS:
            return []
        self.held = []
        self.resyncs += 1
        out = self._close(self.bar_end) if held[0].ts > self.clock and self.bar_end is not None else []
        self.bar_end = None
        self.clock = self.newest = -(2**62)
        self.kind_newest = {}
        for held_ev in held:
            out.extend(self.on_event(held_ev))
        return out

    def _drop_held(self) -> None:
        self.clock_jumps += len(self.held)
        self.held.clear()

    def _close_bars(self, clock: int, out: list[FeatureSnapshot]) -> int:
        """Close every bar that ends before `clock` into `out` (the first event opens the bar holding it);
        returns the open bar's end."""
        cadence = self.cfg.cadence_ms
        if self.bar_end is None:
            self.bar_end = -(-clock // cadence) * cadence
        while clock > self.bar_end:
            out.extend(self._close(self.bar_end))
            self.bar_end += cadence
        return self.bar_end

    def run(self, events: Iterable[MarketEvent]) -> list[FeatureSnapshot]:
        out: list[FeatureSnapshot] = []
        for ev in events:
            out.extend(self.on_event(ev))
        out.extend(self.flush())
        return out

    def flush(self) -> list[FeatureSnapshot]:
        """Close the open bar (the end of a recording); held off-clock events are dropped."""
        self._drop_held()
        if self.bar_end is None:
            return []
        out = self._close(self.bar_end)
        self.bar_end += self.cfg.cadence_ms
        return out

    def _close(self, boundary: int) -> list[FeatureSnapshot]:
        out = []
        for symbol in sorted(self.symbols):
            s = self.symbols[symbol]
            if not s.has_quote:
                continue
            s.close_bar()
            features, windows = derive_features(s, self.cfg.clip_notional)
            out.append(FeatureSnapshot(ts=boundary, symbol=symbol, features=features, windows=windows,
                                       data_health=self._health(s, boundary)))
        return out

    def _health(self, s: SymbolState, boundary: int) -> DataHealth:
        book = boundary - (s.last_book_ts if s.last_book_ts is not None else s.first_ts)
        trades = boundary - (s.last_trade_ts if s.last_trade_ts is not None else s.first_ts)
        missing = tuple(name for name in self.cfg.streams if name not in s.seen)
        return DataHealth(stale_book_ms=max(0, book), stale_trades_ms=max(0, trades), missing_streams=missing)
