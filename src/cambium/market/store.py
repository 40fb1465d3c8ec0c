"""The Parquet candle store: one dataset partitioned ``market=<m>/interval=<i>/symbol=<s>/candles.parquet``.

`market` is ``futures`` (USDⓈ-M perpetuals) or ``spot``: the same symbol name is a different instrument on each.

Each partition is one file rewritten atomically (temporary name, then rename), so a reader or a killed writer never
sees half a file, and the bytes depend only on the rows: the same candles give the same file whatever the order of
pages that produced them. Read it back with `CandleStore.read`, or with any Parquet reader using hive partitioning
(``duckdb: read_parquet('<root>/*/*/*/*.parquet', hive_partitioning=true)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cambium.core.errors import DataError
from cambium.core.files import atomic_write
from cambium.market.candles import CANDLE_SCHEMA, GapReport, fill_gaps, find_gaps, interval_ms, validate_candles

__all__ = ["CandleStore", "PartitionInfo"]

FILE_NAME = "candles.parquet"
MARKETS = ("futures", "spot")


@dataclass(frozen=True)
class PartitionInfo:
    """What one (market, interval, symbol) partition holds."""

    market: str
    interval: str
    symbol: str
    rows: int
    first_open_time: int | None
    last_open_time: int | None
    path: Path


class CandleStore:
    """Candles of one market under `root`, one validated Parquet file per (interval, symbol)."""

    def __init__(self, root: str | Path, market: str = "futures") -> None:
        if market not in MARKETS:
            raise DataError(f"market {market!r} is unknown; use one of {MARKETS}")
        self.root = Path(root)
        self.market = market

    def path(self, symbol: str, interval: str) -> Path:
        interval_ms(interval)
        if not symbol or not symbol.isalnum():
            raise DataError(f"symbol {symbol!r} must be letters and digits only, e.g. 'BTCUSDT'")
        return self.root / f"market={self.market}" / f"interval={interval}" / f"symbol={symbol.upper()}" / FILE_NAME

    def write(self, symbol: str, interval: str, table: pa.Table, *, merge: bool = False) -> PartitionInfo:
        """Validate `table` and store it, replacing the partition (or merging by open_time when `merge`).

        When merging, a bar present in both takes the new values (a later download of a bar that was still forming),
        except where the new source has no value for a column (an OHLCV-only file over a full kline): those keep the
        stored value.
        """
        table = table.select(CANDLE_SCHEMA.names).cast(CANDLE_SCHEMA)
        path = self.path(symbol, interval)
        if merge and path.exists():
            table = _merge(self._read_file(path), table)
        validate_candles(table, interval, f"{path} (to be written)")
        atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20))
        return self._info(interval, symbol.upper(), table, path)

    def _read_file(self, path: Path) -> pa.Table:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable Parquet file ({exc}); delete it and import again") from None
        missing = [n for n in CANDLE_SCHEMA.names if n not in table.column_names]
        if missing:
            raise DataError(f"{path}: columns {missing} are missing; it was not written by the candle store")
        return table.select(CANDLE_SCHEMA.names).cast(CANDLE_SCHEMA)

    def read(
        self, symbol: str, interval: str, *, validate: bool = True, fill: bool = False
    ) -> pa.Table:
        """The partition as a CANDLE_SCHEMA table [N], validated; gaps forward-filled only when `fill`."""
        path = self.path(symbol, interval)
        if not path.exists():
            raise DataError(f"no candles for {symbol} {interval} under {self.root}; import or download them first")
        table = self._read_file(path)
        if validate:
            validate_candles(table, interval, str(path))
        return fill_gaps(table, interval) if fill else table

    def last_open_time(self, symbol: str, interval: str) -> int | None:
        """open_time of the newest stored bar, or None when the partition is empty or absent."""
        path = self.path(symbol, interval)
        if not path.exists():
            return None
        t = self._read_file(path).column("open_time")
        return None if len(t) == 0 else int(pc.max(t).as_py())

    def gaps(self, symbol: str, interval: str) -> GapReport:
        return find_gaps(self.read(symbol, interval).column("open_time").to_numpy(), interval)

    def ls(self) -> list[PartitionInfo]:
        """Every partition of this market under the root, sorted by interval then symbol."""
        out: list[PartitionInfo] = []
        for path in sorted(self.root.glob(f"market={self.market}/interval=*/symbol=*/{FILE_NAME}")):
            interval = path.parent.parent.name.split("=", 1)[1]
            symbol = path.parent.name.split("=", 1)[1]
            out.append(self._info(interval, symbol, self._read_file(path), path))
        return out

    def _info(self, interval: str, symbol: str, table: pa.Table, path: Path) -> PartitionInfo:
        t = table.column("open_time")
        first = int(t[0].as_py()) if len(t) else None
        last = int(t[-1].as_py()) if len(t) else None
        return PartitionInfo(self.market, interval, symbol, table.num_rows, first, last, path)


def _merge(old: pa.Table, new: pa.Table) -> pa.Table:
    """Rows of `old` and `new` by open_time; on overlap `new` wins column by column unless its value is null."""
    new_times = new.column("open_time")
    in_new = pc.is_in(old.column("open_time"), value_set=new_times)
    overlap = old.filter(in_new)
    if overlap.num_rows:
        joined = new.join(overlap, keys="open_time", join_type="left outer", right_suffix="_old")
        cols = {"open_time": joined.column("open_time")}
        for name in CANDLE_SCHEMA.names[1:]:
            cols[name] = pc.coalesce(joined.column(name), joined.column(f"{name}_old"))
        new = pa.table(cols).select(CANDLE_SCHEMA.names).cast(CANDLE_SCHEMA)
    return pa.concat_tables([old.filter(pc.invert(in_new)), new]).sort_by("open_time")
