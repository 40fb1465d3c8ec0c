"""Resumable kline downloader: pages forward by startTime from the last stored candle into the candle store.

Each page is merged into its partition with an atomic rewrite, and only closed bars are kept (a bar whose close time
is not yet past is still forming), so a downloader killed at any point and started again ends with exactly the files
an uninterrupted run writes: the store's bytes depend only on the candles, and the restart resumes after the last
stored one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow.compute as pc

from cambium.core.errors import DataError
from cambium.market.binance_rest import RestClient
from cambium.market.candles import interval_ms
from cambium.market.importers import klines_to_table
from cambium.market.store import CandleStore

__all__ = ["DownloadReport", "download_klines"]


class ProgressLike(Protocol):
    def advance(self, n: float = 1) -> None: ...

    def set(self, **fields: Any) -> None: ...


@dataclass
class DownloadReport:
    """Candles written per symbol, pages fetched and what the client went through."""

    candles: dict[str, int] = field(default_factory=dict)
    pages: int = 0
    requests: int = 0
    incidents: list[dict[str, Any]] = field(default_factory=list)


def download_klines(
    client: RestClient,
    store: CandleStore,
    symbols: Sequence[str],
    interval: str,
    since_ms: int,
    *,
    until_ms: int | None = None,
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    bar: ProgressLike | None = None,
    on_page: Callable[[str, int], None] | None = None,
) -> DownloadReport:
    """Download closed `interval` bars of `symbols` from `since_ms` (or after the last stored bar) to `until_ms`.

    `on_page(symbol, rows)` is called after each page is stored (tests use it to interrupt the run).
    """
    if store.market != client.market:
        raise DataError(f"store market {store.market!r} differs from the client's {client.market!r}")
    step = interval_ms(interval)
    report = DownloadReport()
    for symbol in symbols:
        symbol = symbol.upper()
        last = store.last_open_time(symbol, interval)
        start = since_ms if last is None else max(since_ms, last + step)
        start = -(-start // step) * step
        written = 0
        while True:
            now = now_ms()
            # The newest bar we may keep must be closed: open_time + step <= now.
            end = (now - step) if until_ms is None else min(until_ms, now - step)
            if start > end:
                break
            rows = client.klines(symbol, interval, start, end)
            report.pages += 1
            if not rows:
                break
            table = klines_to_table(rows)
            t = table.column("open_time")
            table = table.filter(pc.and_(pc.greater_equal(t, start), pc.less_equal(t, end)))
            if table.num_rows == 0:
                break
            store.write(symbol, interval, table, merge=True)
            written += table.num_rows
            if bar is not None:
                bar.advance(table.num_rows)
                bar.set(symbol=symbol)
            if on_page is not None:
                on_page(symbol, table.num_rows)
            start = int(table.column("open_time")[-1].as_py()) + step
        report.candles[symbol] = written
    report.requests = client.requests
    report.incidents = list(client.incidents)
    return report
