"""Read kline files into the candle schema: every format found in the committed samples plus Binance's own.

Formats, detected from the header (or its absence):

- ``futures_rest``: ``timestamp,open,high,low,close,volume,quote_volume,trades,close_time`` (verbatim /fapi/v1/klines
  fields, no taker-buy volumes).
- ``ohlcv``: ``open_time,open,high,low,close,volume`` (freqtrade exports).
- ``spot_full``: ``open_time,...,taker_buy_quote,ignore[,fg_index]`` with open_time as a UTC ``YYYY-MM-DD HH:MM:SS``
  string; extra non-Binance columns are dropped.
- ``binance_csv``: data.binance.vision kline CSVs, 12 fields with or without header; microsecond timestamps
  (spot files from 2025) are turned into ms.
- ``rest_json``: a saved REST response, a JSON array of 12-field kline arrays.

`.gz` files are read transparently. The symbol comes from the file name (``BTCUSDT.csv.gz``, ``BTCUSDT_2023-07.csv.gz``,
``BTCUSDT-1h-2024-01.csv``) unless given; the interval from the median spacing of open_time unless given.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cambium.core.errors import DataError
from cambium.market.candles import CANDLE_SCHEMA, INTERVAL_MS, validate_candles

__all__ = ["FORMATS", "ImportedCandles", "detect_format", "klines_to_table", "read_kline_file"]

FORMATS = ("futures_rest", "ohlcv", "spot_full", "binance_csv", "rest_json")

_BINANCE_NAMES = [
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
    "ignore",
]
# the header of data.binance.vision's futures kline CSVs (the same 12 columns under Binance's own names)
_ARCHIVE_HEADER = ["open_time", "open", "high", "low", "close", "volume", "close_time", "quote_volume", "count",
                   "taker_buy_volume", "taker_buy_quote_volume", "ignore"]
_SPOT_FULL_HEADER = [
    "open_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "close_time",
    "quote_asset_volume",
    "num_trades",
    "taker_buy_base",
    "taker_buy_quote",
    "ignore",
]
_RENAMES = {"timestamp": "open_time", "quote_asset_volume": "quote_volume", "num_trades": "trades"}
_SYMBOL_RE = re.compile(r"^([A-Z0-9]+?)(?:[_-].*)?$")


@dataclass(frozen=True)
class ImportedCandles:
    """A validated candle table [N rows, CANDLE_SCHEMA] with where it came from."""

    table: pa.Table
    symbol: str
    interval: str
    source: str
    fmt: str


def _open_text_head(path: Path) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return f.readline().strip()


def detect_format(path: str | Path) -> str:
    """Name of the kline format of `path` (one of FORMATS), from its first line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"kline file {str(path)!r} does not exist")
    try:
        head = _open_text_head(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as (gzipped) text: {exc}") from None
    if head.startswith("["):
        return "rest_json"
    fields = [f.strip() for f in head.split(",")]
    if fields[:9] == ["timestamp", "open", "high", "low", "close", "volume", "quote_volume", "trades", "close_time"]:
        return "futures_rest"
    if fields == ["open_time", "open", "high", "low", "close", "volume"]:
        return "ohlcv"
    if fields[:12] == _SPOT_FULL_HEADER:
        return "spot_full"
    if fields[:12] in (_BINANCE_NAMES, _ARCHIVE_HEADER) or (len(fields) == 12 and fields[0].isdigit()):
        return "binance_csv"
    raise DataError(
        f"{path}: unknown kline format (first line {head[:120]!r}); expected one of the headers described in "
        "cambium.market.importers or a headerless 12-field Binance kline CSV"
    )


def _symbol_from_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    m = _SYMBOL_RE.match(stem.upper())
    if not m:
        raise DataError(f"{path}: cannot infer the symbol from the file name; pass it explicitly")
    return m.group(1)


def _infer_interval(open_time: np.ndarray, source: str) -> str:
    if len(open_time) < 2:
        raise DataError(f"{source}: fewer than 2 rows, cannot infer the interval; pass it explicitly")
    step = int(np.median(np.diff(open_time)))
    for name, ms in INTERVAL_MS.items():
        if ms == step:
            return name
    raise DataError(f"{source}: median open_time spacing {step} ms matches no Binance interval; pass it explicitly")


def _read_csv(path: Path, names: list[str] | None, skip_header: bool, types: dict[str, pa.DataType]) -> pa.Table:
    read = pacsv.ReadOptions(column_names=names, skip_rows=1 if (skip_header and names) else 0, block_size=1 << 22)
    # Only an empty field is missing: "nan" must stay a NaN so the finite rule can name it.
    conv = pacsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, read_options=read, convert_options=conv)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a valid kline CSV: {exc}") from None


def _ms(col: pa.ChunkedArray) -> np.ndarray:
    t = col.to_numpy().astype(np.int64)
    # data.binance.vision spot files switched to microseconds in 2025; ms epochs stay below 1e14 until year 5138.
    return np.where(t >= 10**14, t // 1000, t)


def klines_to_table(rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Binance REST kline arrays (12 fields, numbers as strings) → CANDLE_SCHEMA table [N]."""
    floats = {"open": 1, "high": 2, "low": 3, "close": 4, "volume": 5, "quote_volume": 7}
    floats |= {"taker_buy_base": 9, "taker_buy_quote": 10}
    try:
        data: dict[str, pa.Array] = {
            "open_time": pa.array([int(r[0]) for r in rows], pa.int64()),
            "trades": pa.array([int(r[8]) for r in rows], pa.int64()),
        }
        for name, k in floats.items():
            data[name] = pa.array([float(r[k]) for r in rows], pa.float64())
    except (IndexError, TypeError, ValueError) as exc:
        raise DataError(f"kline arrays do not have Binance's 12-field layout: {exc}") from None
    return pa.Table.from_pydict({n: data[n] for n in CANDLE_SCHEMA.names}, schema=CANDLE_SCHEMA)


def _null(n: int, t: pa.DataType) -> pa.Array:
    return pa.nulls(n, type=t)


def _table_from_columns(t: np.ndarray, src: pa.Table, present: set[str]) -> pa.Table:
    n = len(t)
    out: dict[str, object] = {"open_time": pa.array(t, pa.int64())}
    for field in list(CANDLE_SCHEMA)[1:]:
        if field.name in present:
            out[field.name] = src.column(field.name).cast(field.type)
        else:
            out[field.name] = _null(n, field.type)
    return pa.table(out, schema=CANDLE_SCHEMA)


def read_kline_file(
    path: str | Path,
    *,
    symbol: str | None = None,
    interval: str | None = None,
    fmt: str | None = None,
    validate: bool = True,
) -> ImportedCandles:
    """Read one kline file into CANDLE_SCHEMA and validate it (rows numbered as in the file)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} is unknown; use one of {FORMATS}")
    f64, i64 = pa.float64(), pa.int64()
    num = {"open": f64, "high": f64, "low": f64, "close": f64, "volume": f64}
    first_data_line = 2
    if fmt == "futures_rest":
        raw = _read_csv(
            path, None, False, {"timestamp": i64, **num, "quote_volume": f64, "trades": i64, "close_time": i64}
        )
        raw = raw.rename_columns([_RENAMES.get(c, c) for c in raw.column_names])
        t = _ms(raw.column("open_time"))
        present = {"open", "high", "low", "close", "volume", "quote_volume", "trades"}
    elif fmt == "ohlcv":
        raw = _read_csv(path, None, False, {"open_time": i64, **num})
        t = _ms(raw.column("open_time"))
        present = {"open", "high", "low", "close", "volume"}
    elif fmt == "spot_full":
        types = {"open_time": pa.timestamp("ms"), **num, "close_time": i64, "quote_asset_volume": f64}
        types |= {"num_trades": i64, "taker_buy_base": f64, "taker_buy_quote": f64}
        raw = _read_csv(path, None, False, types)
        raw = raw.rename_columns([_RENAMES.get(c, c) for c in raw.column_names])
        t = pc.cast(raw.column("open_time"), i64).to_numpy()
        present = {"open", "high", "low", "close", "volume", "quote_volume", "trades"}
        present |= {"taker_buy_base", "taker_buy_quote"}
    elif fmt == "binance_csv":
        has_header = not _open_text_head(path).split(",")[0].strip().isdigit()
        first_data_line = 2 if has_header else 1
        types = {"open_time": i64, **num, "close_time": i64, "quote_volume": f64, "trades": i64}
        types |= {"taker_buy_base": f64, "taker_buy_quote": f64}
        raw = _read_csv(path, _BINANCE_NAMES, has_header, types)
        t = _ms(raw.column("open_time"))
        present = set(_BINANCE_NAMES) - {"open_time", "close_time", "ignore"}
    else:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fh:
            try:
                rows = orjson.loads(fh.read())
            except orjson.JSONDecodeError as exc:
                raise DataError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of kline arrays, got {type(rows).__name__}")
        table = klines_to_table(rows)
        raw = table
        t = _ms(table.column("open_time"))
        present = set(CANDLE_SCHEMA.names[1:])
        first_data_line = 1
    table = _table_from_columns(t, raw, present)
    source = str(path)
    symbol = symbol or _symbol_from_name(path)
    interval = interval or _infer_interval(t, source)
    if validate:
        lines = np.arange(table.num_rows) + first_data_line if fmt != "rest_json" else None
        validate_candles(table, interval, source, line_of_row=lines)
    return ImportedCandles(table=table, symbol=symbol, interval=interval, source=source, fmt=fmt)
