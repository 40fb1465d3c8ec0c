"""Parquet storage of FeatureSnapshots, PredictionSnapshots and RankEvents, queryable with DuckDB.

Layout: `<root>/<kind>/part-NNNNNN.parquet` with kind ∈ features, predictions, rank_events. Rows are buffered and
written as one row group per `batch_rows`; a file is closed and a new one started every `rotate_rows` rows. A file
is written under a `.tmp` name and renamed when closed, so readers (the `*.parquet` glob) only ever see complete files.

Columns: flat scalars for the contract fields; `features` is MAP(VARCHAR, DOUBLE) (DuckDB: `features['spread_bps']`),
`windows` MAP(VARCHAR, MAP(VARCHAR, DOUBLE)), reasons and missing_streams LIST(VARCHAR), and a RankEvent's payload
its JSON text. `read_*` rebuild the exact structs (a test checks the round-trip).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from cambium.core.errors import DataError
from cambium.screener.config import StorageConfig
from cambium.screener.contracts import DataHealth, FeatureSnapshot, PredictionSnapshot, RankEvent, convert

__all__ = ["KINDS", "ParquetSink", "ScreenerStore", "connect", "read_features", "read_predictions", "read_rank_events"]

T = TypeVar("T")

_HEALTH_FIELDS = [pa.field("stale_book_ms", pa.int64()), pa.field("stale_trades_ms", pa.int64()),
                  pa.field("missing_streams", pa.list_(pa.string()))]
FEATURES_SCHEMA = pa.schema([
    pa.field("ts", pa.int64()), pa.field("symbol", pa.string()),
    pa.field("features", pa.map_(pa.string(), pa.float64())),
    pa.field("windows", pa.map_(pa.string(), pa.map_(pa.string(), pa.float64()))),
    *_HEALTH_FIELDS,
])
PREDICTIONS_SCHEMA = pa.schema([
    pa.field("ts", pa.int64()), pa.field("symbol", pa.string()), pa.field("profile", pa.string()),
    pa.field("p_inplay_30s", pa.float64()), pa.field("p_inplay_2m", pa.float64()),
    pa.field("p_inplay_5m", pa.float64()), pa.field("expected_utility_bps_2m", pa.float64()),
    pa.field("p_toxic", pa.float64()), pa.field("status", pa.string()), pa.field("reasons", pa.list_(pa.string())),
    pa.field("model_version", pa.string()), pa.field("calibration_version", pa.string()),
    *_HEALTH_FIELDS,
])
RANK_EVENTS_SCHEMA = pa.schema([
    pa.field("ts", pa.int64()), pa.field("event", pa.string()), pa.field("symbol", pa.string()),
    pa.field("rank", pa.int32()), pa.field("score", pa.float64()), pa.field("payload", pa.string()),
])
KINDS = {"features": FEATURES_SCHEMA, "predictions": PREDICTIONS_SCHEMA, "rank_events": RANK_EVENTS_SCHEMA}


def _health(h: DataHealth) -> dict[str, Any]:
    return {"stale_book_ms": h.stale_book_ms, "stale_trades_ms": h.stale_trades_ms,
            "missing_streams": list(h.missing_streams)}


def _feature_row(s: FeatureSnapshot) -> dict[str, Any]:
    return {"ts": s.ts, "symbol": s.symbol, "features": list(s.features.items()),
            "windows": [(k, list(v.items())) for k, v in s.windows.items()], **_health(s.data_health)}


def _prediction_row(p: PredictionSnapshot) -> dict[str, Any]:
    row = {f: getattr(p, f) for f in p.__struct_fields__ if f not in ("data_health", "reasons")}
    return {**row, "reasons": list(p.reasons), **_health(p.data_health)}


def _rank_row(e: RankEvent) -> dict[str, Any]:
    return {"ts": e.ts, "event": e.event, "symbol": e.symbol, "rank": e.rank, "score": e.score,
            "payload": msgspec.json.encode(e.payload).decode()}


class ParquetSink(Generic[T]):
    """Buffered, rotated writer of one kind of struct to `<directory>/part-NNNNNN.parquet`."""

    def __init__(self, directory: str | Path, schema: pa.Schema, to_row: Callable[[T], dict[str, Any]],
                 batch_rows: int = 1000, rotate_rows: int = 200_000, compression: str = "zstd") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.to_row = to_row
        self.batch_rows = batch_rows
        self.rotate_rows = rotate_rows
        self.compression = compression
        self._buffer: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0
        self._tmp: Path | None = None
        existing = [int(m.group(1)) for p in self.directory.glob("part-*.parquet")
                    if (m := re.fullmatch(r"part-(\d+)\.parquet", p.name))]
        self._seq = max(existing, default=-1) + 1
        self.rows_written = 0
        self.files: list[Path] = []

    def append(self, obj: T) -> None:
        for name, value in self.to_row(obj).items():
            self._buffer[name].append(value)
        self._buffered += 1
        if self._buffered >= self.batch_rows:
            self._write_batch()

    def extend(self, objs: Iterable[T]) -> None:
        for obj in objs:
            self.append(obj)

    def _write_batch(self) -> None:
        while self._buffered:
            if self._writer is None:
                self._tmp = self.directory / f"part-{self._seq:06d}.parquet.tmp"
                self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=self.compression)
                self._file_rows = 0
            take = min(self._buffered, self.rotate_rows - self._file_rows)
            chunk = {name: values[:take] for name, values in self._buffer.items()}
            self._writer.write_table(pa.Table.from_pydict(chunk, schema=self.schema))
            for values in self._buffer.values():
                del values[:take]
            self._buffered -= take
            self._file_rows += take
            self.rows_written += take
            if self._file_rows >= self.rotate_rows:
                self._close_file()

    def _close_file(self) -> None:
        if self._writer is None or self._tmp is None:
            return
        self._writer.close()
        final = self._tmp.with_suffix("")
        self._tmp.rename(final)
        self.files.append(final)
        self._writer, self._tmp = None, None
        self._seq += 1

    def flush(self) -> None:
        """Write buffered rows and close the current file so that readers see everything so far."""
        self._write_batch()
        self._close_file()

    def close(self) -> None:
        self.flush()


class ScreenerStore:
    """The three sinks under one root, plus DuckDB views over what has been written."""

    def __init__(self, cfg: StorageConfig | None, root: str | Path) -> None:
        self.cfg = cfg or StorageConfig()
        self.root = Path(root)
        c = self.cfg
        self.features = ParquetSink(self.root / "features", FEATURES_SCHEMA, _feature_row,
                                    c.batch_rows, c.rotate_rows, c.compression)
        self.predictions = ParquetSink(self.root / "predictions", PREDICTIONS_SCHEMA, _prediction_row,
                                       c.batch_rows, c.rotate_rows, c.compression)
        self.rank_events = ParquetSink(self.root / "rank_events", RANK_EVENTS_SCHEMA, _rank_row,
                                       c.batch_rows, c.rotate_rows, c.compression)

    def write(self, obj: FeatureSnapshot | PredictionSnapshot | RankEvent) -> None:
        if isinstance(obj, FeatureSnapshot):
            self.features.append(obj)
        elif isinstance(obj, PredictionSnapshot):
            self.predictions.append(obj)
        else:
            self.rank_events.append(obj)

    def flush(self) -> None:
        for sink in (self.features, self.predictions, self.rank_events):
            sink.flush()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ScreenerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(root: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views `features`, `predictions`, `rank_events` over the files written so far."""
    root = Path(root)
    con = duckdb.connect()
    for kind in KINDS:
        files = sorted((root / kind).glob("part-*.parquet"))
        if files:
            listing = ", ".join("'" + str(f).replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {kind} AS SELECT * FROM read_parquet([{listing}])")
    return con


def _rows(root: str | Path, kind: str) -> list[dict[str, Any]]:
    files = sorted((Path(root) / kind).glob("part-*.parquet"))
    if not files:
        raise DataError(f"no {kind} files under {root}/{kind}; was anything written and flushed?")
    rows: list[dict[str, Any]] = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _health_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"stale_book_ms": row.pop("stale_book_ms"), "stale_trades_ms": row.pop("stale_trades_ms"),
            "missing_streams": row.pop("missing_streams")}


def read_features(root: str | Path) -> list[FeatureSnapshot]:
    out = []
    for row in _rows(root, "features"):
        row["data_health"] = _health_of(row)
        row["features"] = dict(row["features"])
        row["windows"] = {k: dict(v) for k, v in row["windows"]}
        out.append(convert(row, FeatureSnapshot))
    return out


def read_predictions(root: str | Path) -> list[PredictionSnapshot]:
    out = []
    for row in _rows(root, "predictions"):
        row["data_health"] = _health_of(row)
        out.append(convert(row, PredictionSnapshot))
    return out


def read_rank_events(root: str | Path) -> list[RankEvent]:
    out = []
    for row in _rows(root, "rank_events"):
        row["payload"] = msgspec.json.decode(row["payload"])
        out.append(convert(row, RankEvent))
    return out
