"""The feature engine's numbers computed over a whole recording at once, with array operations.

This is the offline path of SCR-2 (for training sets and audits) and the independent check of the streaming engine:
bars come from a running maximum of event times, window sums from cumulative sums, bar-close mids from
`searchsorted`. Only the L2 book is replayed event by event (an order book is a sequential object); it uses the same
`OrderBook`. Definitions are those of `cambium.screener.features`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cambium.market.events import MarketEvent
from cambium.screener.book import OrderBook
from cambium.screener.config import FeatureConfig
from cambium.screener.contracts import DataHealth, FeatureSnapshot
from cambium.screener.features import WINDOWS_MS, Windows, impact_bps

__all__ = ["compute_features_offline"]


def _clock(events: Sequence[MarketEvent], ts: np.ndarray, max_skew_ms: int) -> np.ndarray:
    """The engine's watermark after each event: max so far of (min over seen book/trade streams of their newest
    event time, newest event time − max_skew_ms)."""
    big = np.iinfo(np.int64).max
    newest = np.maximum.accumulate(ts)
    low = np.full(ts.size, big)
    for kind in ("book", "trade"):
        mine = np.fromiter((e.type == kind for e in events), bool, len(events))
        kind_newest = np.maximum.accumulate(np.where(mine, ts, np.iinfo(np.int64).min))
        seen = np.maximum.accumulate(mine)
        low = np.where(seen, np.minimum(low, kind_newest), low)
    low = np.where(low == big, newest, low)
    return np.maximum.accumulate(np.maximum(low, newest - max_skew_ms))


def _window_sum(x: np.ndarray, n: int) -> np.ndarray:
    """S[i] = x[max(0, i−n+1)] + … + x[i]."""
    cs = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(x.size)
    return cs[i + 1] - cs[np.maximum(0, i + 1 - n)]


def _opt(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def compute_features_offline(events: Sequence[MarketEvent], cfg: FeatureConfig | None = None) -> list[FeatureSnapshot]:
    """Every FeatureSnapshot the streaming engine emits for `events` (in arrival order), flush included."""
    cfg = cfg or FeatureConfig()
    if not events:
        return []
    cad = cfg.cadence_ms
    ts = np.fromiter((e.ts for e in events), np.int64, len(events))
    bar = -(-_clock(events, ts, cfg.max_skew_ms) // cad) * cad
    last_bar = int(bar[-1])
    by_symbol: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_symbol.setdefault(e.symbol, []).append(i)
    out: list[tuple[int, str, FeatureSnapshot]] = []
    for symbol, idx in by_symbol.items():
        out.extend(_symbol(symbol, idx, events, ts, bar, last_bar, cfg))
    out.sort(key=lambda t: (t[0], t[1]))
    return [snap for _, _, snap in out]


def _symbol(symbol: str, idx: list[int], events: Sequence[MarketEvent], ts: np.ndarray, bar: np.ndarray,
            last_bar: int, cfg: FeatureConfig) -> list[tuple[int, str, FeatureSnapshot]]:
    cad = cfg.cadence_ms
    tops = [i for i in idx if events[i].type == "book" and events[i].payload.get("kind") == "top"]
    if not tops:
        return []
    first = tops[0]  # nothing of the symbol counts before its first quote
    grid = np.arange(int(bar[first]), last_bar + cad, cad)
    m = grid.size
    bars = {label: ms // cad for label, ms in WINDOWS_MS.items()}

    top_bar = bar[tops]
    quote = np.array([[events[i].payload[k] for k in ("bid", "ask", "bid_qty", "ask_qty")] for i in tops])
    mids = 0.5 * (quote[:, 0] + quote[:, 1])
    k = np.searchsorted(top_bar, grid, side="right") - 1
    close = mids[k]
    gi_top = (top_bar - grid[0]) // cad
    hi = np.full(m, -np.inf)
    lo = np.full(m, np.inf)
    np.maximum.at(hi, gi_top, mids)
    np.minimum.at(lo, gi_top, mids)
    hi[1:] = np.maximum(hi[1:], close[:-1])
    lo[1:] = np.minimum(lo[1:], close[:-1])

    trades = [i for i in idx if i > first and events[i].type == "trade"]
    gi_trade = (bar[trades] - grid[0]) // cad if trades else np.zeros(0, np.int64)
    qty = np.array([events[i].payload["qty"] for i in trades], dtype=np.float64)
    price = np.array([events[i].payload["price"] for i in trades], dtype=np.float64)
    is_buy = np.array([events[i].payload["side"] == "buy" for i in trades], dtype=bool)
    per_bar = {
        "buy": np.bincount(gi_trade, weights=np.where(is_buy, qty, 0.0), minlength=m),
        "sell": np.bincount(gi_trade, weights=np.where(is_buy, 0.0, qty), minlength=m),
        "trades": np.bincount(gi_trade, minlength=m).astype(np.float64),
        "notional": np.bincount(gi_trade, weights=qty * price, minlength=m),
    }
    sums = {(name, label): _window_sum(x, n) for name, x in per_bar.items() for label, n in bars.items()}
    notional_sq_5m = _window_sum(per_bar["notional"] ** 2, bars["5m"])
    r2 = np.zeros(m)
    r2[1:] = np.log(close[1:] / close[:-1]) ** 2
    sq = {label: _window_sum(r2, bars[label]) for label in ("60s", "5m")}
    tr = _window_sum(hi - lo, bars["60s"])

    books = [i for i in idx if i >= first and events[i].type == "book"]
    book_bar = bar[books]
    last_book = np.searchsorted(book_bar, grid, side="right") - 1
    trade_bar = bar[trades] if trades else np.zeros(0, np.int64)
    last_trade = np.searchsorted(trade_bar, grid, side="right") - 1
    diffs = [i for i in books if events[i].payload.get("kind") == "diff"]
    first_diff_bar = int(bar[diffs[0]]) if diffs else None
    depth = [i for i in idx if events[i].type == "book" and events[i].payload.get("kind") in ("snapshot", "diff")]
    impact = _impacts(depth, events, bar, grid, close, quote[k], cfg.clip_notional)
    first_ts = int(ts[idx[0]])

    out = []
    for i in range(m):
        b = int(grid[i])
        bid, ask, bq, aq = quote[k[i]]
        mid = float(close[i])
        depth = bq + aq
        f: dict[str, float | None] = {
            "mid": mid, "microprice": (bid * aq + ask * bq) / depth if depth > 0 else None,
            "spread_bps": (ask - bid) / mid * 1e4, "book_imbalance": (bq - aq) / depth if depth > 0 else None,
            "impact_bps": impact[i],
        }
        windows: Windows = {}
        for label, n in bars.items():
            buy, sell = sums[("buy", label)][i], sums[("sell", label)][i]
            ret = 1e4 * math.log(mid / close[i - n]) if i >= n else None
            windows[label] = {"ret_bps": ret, "trades": sums[("trades", label)][i], "buy_qty": buy, "sell_qty": sell,
                              "notional": sums[("notional", label)][i]}
            f[f"ret_bps_{label}"] = ret
            if label in ("10s", "60s"):
                f[f"flow_imbalance_{label}"] = (buy - sell) / (buy + sell) if buy + sell > 0 else None
                f[f"trade_rate_{label}"] = sums[("trades", label)][i] / (WINDOWS_MS[label] / 1000)
        for label in ("60s", "5m"):
            rv = 1e4 * math.sqrt(max(sq[label][i], 0.0)) if i >= bars[label] else None
            f[f"realized_vol_bps_{label}"] = rv
            windows[label]["realized_vol_bps"] = rv
        f["natr_bps"] = 1e4 * (tr[i] / bars["60s"]) / mid if i + 1 >= bars["60s"] else None
        f["volume_zscore_60s"] = _zscore(sums[("notional", "5m")][i], notional_sq_5m[i],
                                         sums[("notional", "60s")][i], bars, full=i + 1 >= bars["5m"])
        rv60, rv5 = f["realized_vol_bps_60s"], f["realized_vol_bps_5m"]
        f["regime_vol"] = rv60 / rv5 if rv60 is not None and rv5 else None
        ret5 = f["ret_bps_5m"]
        f["regime_trend"] = abs(ret5) / (rv5 + 1e-9) if ret5 is not None and rv5 is not None else None
        seen = {"bookTicker"}
        if last_trade[i] >= 0:
            seen.add("trade")
        if first_diff_bar is not None and first_diff_bar <= b:
            seen.add("depth")
        book_ts = int(ts[books[last_book[i]]])
        trade_ts = int(ts[trades[last_trade[i]]]) if last_trade[i] >= 0 else first_ts
        health = DataHealth(stale_book_ms=max(0, b - book_ts), stale_trades_ms=max(0, b - trade_ts),
                            missing_streams=tuple(s for s in cfg.streams if s not in seen))
        out.append((b, symbol, FeatureSnapshot(ts=b, symbol=symbol, features=f, windows=windows, data_health=health)))
    return out


def _zscore(total: float, total_sq: float, v60: float, bars: dict[str, int], *, full: bool) -> float | None:
    if not full:
        return None
    n5, n60 = bars["5m"], bars["60s"]
    mean = total / n5
    var = total_sq / n5 - mean * mean
    if var <= mean * mean * 1e-12 or var <= 0:
        return None
    return (v60 - n60 * mean) / (math.sqrt(n60) * math.sqrt(var))


def _impacts(book_events: list[int], events: Sequence[MarketEvent], bar: np.ndarray, grid: np.ndarray,
             close: np.ndarray, quotes: np.ndarray, clip: float) -> list[float | None]:
    book, j, out = OrderBook(), 0, []
    for i in range(grid.size):
        while j < len(book_events) and bar[book_events[j]] <= grid[i]:
            p = events[book_events[j]].payload
            if p["kind"] == "snapshot":
                book.apply_snapshot(p["bids"], p["asks"], p["last_update_id"])
            else:
                book.apply_diff(p["bids"], p["asks"], p["first_update_id"], p["last_update_id"],
                                p.get("prev_update_id"))
            j += 1
        bid, ask, bid_qty, ask_qty = (float(x) for x in quotes[i])
        out.append(impact_bps(book, clip, float(close[i]), bid, ask, bid_qty, ask_qty))
    return out
