"""The candle schema, its validation rules and gap report.

One schema for every interval (see `CANDLE_SCHEMA`); `open_time` is the bar's open in epoch milliseconds UTC. Columns a
source does not carry (taker-buy volumes in freqtrade files, say) are null, never made up. `validate_candles` checks
every rule at once and raises a `DataError` naming the file, the row and the rule of each violation; `find_gaps`
reports missing bars and `fill_gaps` forward-fills them only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cambium.core.errors import DataError

__all__ = [
    "CANDLE_SCHEMA",
    "INTERVAL_MS",
    "GapReport",
    "fill_gaps",
    "find_gaps",
    "interval_ms",
    "validate_candles",
]

CANDLE_SCHEMA = pa.schema(
    [
        pa.field("open_time", pa.int64(), nullable=False),
        pa.field("open", pa.float64(), nullable=False),
        pa.field("high", pa.float64(), nullable=False),
        pa.field("low", pa.float64(), nullable=False),
        pa.field("close", pa.float64(), nullable=False),
        pa.field("volume", pa.float64(), nullable=False),
        pa.field("quote_volume", pa.float64()),
        pa.field("trades", pa.int64()),
        pa.field("taker_buy_base", pa.float64()),
        pa.field("taker_buy_quote", pa.float64()),
    ]
)
REQUIRED = ("open_time", "open", "high", "low", "close", "volume")
NON_NEGATIVE = ("volume", "quote_volume", "trades", "taker_buy_base", "taker_buy_quote")

_MIN = 60_000
INTERVAL_MS: dict[str, int] = {
    "1s": 1_000,
    "1m": _MIN,
    "3m": 3 * _MIN,
    "5m": 5 * _MIN,
    "15m": 15 * _MIN,
    "30m": 30 * _MIN,
    "1h": 60 * _MIN,
    "2h": 120 * _MIN,
    "4h": 240 * _MIN,
    "6h": 360 * _MIN,
    "8h": 480 * _MIN,
    "12h": 720 * _MIN,
    "1d": 1440 * _MIN,
    "3d": 3 * 1440 * _MIN,
    "1w": 7 * 1440 * _MIN,
}


def interval_ms(interval: str) -> int:
    """Length of a Binance interval name in ms; calendar months ("1M") have no fixed length and are refused."""
    try:
        return INTERVAL_MS[interval]
    except KeyError:
        raise DataError(
            f"interval {interval!r} is not supported; use one of {', '.join(INTERVAL_MS)}"
        ) from None


@dataclass(frozen=True)
class GapReport:
    """Missing bars between consecutive rows: how many gaps, bars missing in total, the longest and where it starts."""

    count: int
    missing_bars: int
    longest_bars: int
    longest_after_open_time: int | None

    def describe(self) -> str:
        if self.count == 0:
            return "no gaps"
        return (
            f"{self.count} gaps, {self.missing_bars} bars missing, longest {self.longest_bars} bars "
            f"after open_time={self.longest_after_open_time}"
        )


def _row_label(i: int, line_of_row: np.ndarray | None) -> str:
    return f"row {i}" + (f" (line {int(line_of_row[i])})" if line_of_row is not None else "")


def validate_candles(
    table: pa.Table,
    interval: str,
    source: str,
    *,
    line_of_row: np.ndarray | None = None,
    max_reported: int = 10,
) -> None:
    """Check every rule on `table` (CANDLE_SCHEMA columns); raise DataError listing the violations.

    Rows are numbered from 0 in table order; `line_of_row[i]` (the line in the source file) is quoted too when given.
    Rules: required values present; finite numbers; open_time aligned to the interval; open_time strictly increasing
    (named "duplicate" or "out-of-order"); low <= min(open, close) and max(open, close) <= high (which also catches
    high < low); volumes and trade counts >= 0.
    """
    step = interval_ms(interval)
    problems: list[tuple[int, str]] = []
    n = table.num_rows
    cols: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    for name in CANDLE_SCHEMA.names:
        if name not in table.column_names:
            raise DataError(f"{source}: column {name!r} is missing; the candle schema is {CANDLE_SCHEMA.names}")
        col = table.column(name)
        is_valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
        if name in REQUIRED:
            for i in np.flatnonzero(~is_valid)[:max_reported]:
                problems.append((int(i), f"rule 'required': {name} is empty"))
        # Nulls become NaN (or 0 for ints) so they never trip the ordering rules a second time.
        fill = 0 if pa.types.is_integer(col.type) else float("nan")
        cols[name] = pc.fill_null(col, fill).to_numpy(zero_copy_only=False)
        valid[name] = is_valid
    for name in CANDLE_SCHEMA.names[1:]:
        values = cols[name].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(values) & valid[name])
        for i in bad[:max_reported]:
            problems.append((int(i), f"rule 'finite': {name}={float(values[i])}"))
    t = cols["open_time"]
    misaligned = np.flatnonzero(t % step != 0)
    for i in misaligned[:max_reported]:
        problems.append((int(i), f"rule 'aligned': open_time={t[i]} is not a multiple of {interval} ({step} ms)"))
    if n > 1:
        d = np.diff(t)
        for i in np.flatnonzero(d == 0)[:max_reported]:
            problems.append((int(i) + 1, f"rule 'duplicate': open_time={t[i + 1]} repeats row {i}"))
        for i in np.flatnonzero(d < 0)[:max_reported]:
            problems.append(
                (int(i) + 1, f"rule 'out-of-order': open_time={t[i + 1]} is before row {i}'s open_time={t[i]}")
            )
    o, h, lo, c = cols["open"], cols["high"], cols["low"], cols["close"]
    with np.errstate(invalid="ignore"):
        for i in np.flatnonzero(h < lo)[:max_reported]:
            problems.append((int(i), f"rule 'high>=low': high={float(h[i])} < low={float(lo[i])}"))
        body_hi = np.maximum(o, c)
        body_lo = np.minimum(o, c)
        hl_ok = h >= lo
        for i in np.flatnonzero(hl_ok & (body_hi > h))[:max_reported]:
            msg = f"rule 'high>=max(open,close)': high={float(h[i])} < max(open,close)={float(body_hi[i])}"
            problems.append((int(i), msg))
        for i in np.flatnonzero(hl_ok & (body_lo < lo))[:max_reported]:
            msg = f"rule 'low<=min(open,close)': low={float(lo[i])} > min(open,close)={float(body_lo[i])}"
            problems.append((int(i), msg))
        for name in NON_NEGATIVE:
            v = cols[name]
            for i in np.flatnonzero((v < 0) & valid[name])[:max_reported]:
                problems.append((int(i), f"rule 'non-negative': {name}={float(v[i])} < 0"))
    if problems:
        problems.sort(key=lambda p: p[0])
        shown = "; ".join(f"{_row_label(i, line_of_row)}: {msg}" for i, msg in problems[:max_reported])
        more = f" (and {len(problems) - max_reported} more)" if len(problems) > max_reported else ""
        raise DataError(f"{source}: {len(problems)} invalid candle rows: {shown}{more}; fix or drop these rows")


def find_gaps(open_time: np.ndarray, interval: str) -> GapReport:
    """Gaps in a strictly increasing, aligned `open_time` [N] column."""
    step = interval_ms(interval)
    if len(open_time) < 2:
        return GapReport(0, 0, 0, None)
    missing = np.diff(open_time) // step - 1
    where = np.flatnonzero(missing > 0)
    if len(where) == 0:
        return GapReport(0, 0, 0, None)
    k = int(where[np.argmax(missing[where])])
    return GapReport(len(where), int(missing[where].sum()), int(missing[k]), int(open_time[k]))


def fill_gaps(table: pa.Table, interval: str) -> pa.Table:
    """Insert the missing bars as flat candles at the previous close with zero volume and zero trades.

    Only ever called on request: a filled bar is not market data, and callers that care (labels, backtests) must
    know which bars they asked to be invented.
    """
    step = interval_ms(interval)
    t = table.column("open_time").to_numpy()
    if len(t) < 2:
        return table
    full = np.arange(t[0], t[-1] + step, step, dtype=np.int64)
    if len(full) == len(t):
        return table
    # Index of the last real row at or before each slot: a forward fill by construction.
    src = np.searchsorted(t, full, side="right") - 1
    real = t[src] == full
    out: dict[str, np.ndarray | pa.Array] = {"open_time": full}
    close = table.column("close").to_numpy()[src]
    for name in ("open", "high", "low", "close"):
        vals = table.column(name).to_numpy()[src]
        out[name] = np.where(real, vals, close)
    for name in ("volume", "quote_volume", "trades", "taker_buy_base", "taker_buy_quote"):
        col = table.column(name)
        taken = col.take(pa.array(src))
        zero = pa.scalar(0, type=col.type)
        fill = pc.if_else(pa.array(real), taken, pc.if_else(pc.is_valid(taken), zero, taken))
        out[name] = fill
    return pa.Table.from_pydict(out, schema=CANDLE_SCHEMA)
