"""Metrics: one schema, one DuckDB file per run (and per rank), written in batches.

    metrics(run_id VARCHAR, step BIGINT, tokens_or_events BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE)

`step` is the optimizer step (or pipeline tick) the value belongs to, `tokens_or_events` the count of tokens
(language models) or events (market systems) consumed so far, `wall_time` seconds since the Unix epoch.

DuckDB lets one process hold a file open for writing and nobody else open it meanwhile, so `MetricsWriter` buffers
rows in memory and opens the file only for the moment of a flush; readers in other processes (`cambium runs show`,
the dashboard) get in between flushes and retry briefly when they collide with one. Flush before saving a
checkpoint, and on resume call `truncate_after(checkpoint_step)` so rows logged after that checkpoint by the
interrupted process are replaced by the ones the resumed process logs again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import duckdb
import pyarrow as pa

from cambium.core.errors import DataError, RunError

__all__ = ["SCHEMA", "MetricRow", "MetricsWriter", "last_step", "latest_values", "read_metrics", "validate_name"]

SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("step", pa.int64()),
    ("tokens_or_events", pa.int64()),
    ("name", pa.string()),
    ("value", pa.float64()),
    ("wall_time", pa.float64()),
])
_CREATE = (
    "CREATE TABLE IF NOT EXISTS metrics (run_id VARCHAR NOT NULL, step BIGINT NOT NULL, "
    "tokens_or_events BIGINT NOT NULL, name VARCHAR NOT NULL, value DOUBLE, wall_time DOUBLE NOT NULL)"
)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_./:-]{0,127}$")
_LOCK_WORDS = ("lock", "conflicting", "being used", "already open", "different configuration")
T = TypeVar("T")


class MetricRow(NamedTuple):
    run_id: str
    step: int
    tokens_or_events: int
    name: str
    value: float
    wall_time: float


def validate_name(name: str) -> str:
    """A metric name: letters, digits and `_ . / : -`, starting with a letter or `_`, at most 128 characters."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DataError(
            f"metric name {name!r} is invalid: use 1-128 characters of letters, digits and '_./:-', "
            "starting with a letter or '_' (e.g. 'loss', 'lr/group0', 'val.bpb')"
        )
    return name


class MetricsWriter:
    """Buffers metric rows and appends them to a DuckDB file in batches.

    A batch is written when `flush_rows` rows are buffered or `flush_seconds` have passed since the last write
    (checked at each `log`), on `flush()` and on `close()`. A periodic flush that finds the file locked by a reader
    keeps the rows and tries again at the next `log`; `flush()` and `close()` retry for `lock_timeout_s` and then raise.
    """

    def __init__(self, path: str | Path, run_id: str, *, flush_rows: int = 1000, flush_seconds: float = 10.0,
                 lock_timeout_s: float = 30.0) -> None:
        if flush_rows < 1:
            raise DataError(f"flush_rows={flush_rows} must be >= 1")
        self.path = Path(path)
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.lock_timeout_s = lock_timeout_s
        self.deferred_flushes = 0
        self.rows_written = 0
        self._buffer: list[tuple[int, int, str, float, float]] = []
        self._last_flush = time.monotonic()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, tokens_or_events: int, values: Mapping[str, Any]) -> None:
        """Record `values` (name -> number; NaN and inf are kept) for `step`.

        Values may be Python numbers, numpy scalars or one-element tensors (anything `float()` accepts).
        """
        if self._closed:
            raise RunError(f"MetricsWriter for {self.path} is closed; open a new one")
        step = _as_count("step", step)
        tokens_or_events = _as_count("tokens_or_events", tokens_or_events)
        now = time.time()
        rows = []
        for name, value in values.items():
            validate_name(name)
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise DataError(f"metric {name!r} at step {step}: value {value!r} is not a number") from None
            rows.append((step, tokens_or_events, name, number, now))
        self._buffer.extend(rows)
        if len(self._buffer) >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            try:
                self._write(timeout=0.0)
            except RunError:
                self.deferred_flushes += 1

    def flush(self) -> None:
        """Write every buffered row now (call before saving a checkpoint)."""
        self._write(timeout=self.lock_timeout_s)

    def truncate_after(self, step: int) -> int:
        """Delete this run's rows with step > `step`, on disk and in the buffer; returns how many were on disk."""
        step = _as_count("step", step)
        self._buffer = [r for r in self._buffer if r[0] <= step]
        if not self.path.exists():
            return 0

        def delete(con: duckdb.DuckDBPyConnection) -> int:
            con.execute(_CREATE)
            (n,) = con.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND step > ?",
                               [self.run_id, step]).fetchone() or (0,)
            con.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [self.run_id, step])
            return int(n)

        return _with_connection(self.path, False, delete, self.lock_timeout_s)

    def close(self) -> None:
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write(self, timeout: float) -> None:
        if not self._buffer:
            self._last_flush = time.monotonic()
            return
        batch = self._buffer
        steps, tokens, names, values, times = zip(*batch, strict=True)
        table = pa.Table.from_arrays(
            [pa.array([self.run_id] * len(batch), pa.string()), pa.array(steps, pa.int64()),
             pa.array(tokens, pa.int64()), pa.array(names, pa.string()), pa.array(values, pa.float64()),
             pa.array(times, pa.float64())],
            schema=SCHEMA,
        )

        def insert(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(_CREATE)
            con.register("metrics_batch", table)
            con.execute("INSERT INTO metrics SELECT * FROM metrics_batch")
            con.unregister("metrics_batch")

        _with_connection(self.path, False, insert, timeout)
        self._buffer = []
        self.rows_written += len(batch)
        self._last_flush = time.monotonic()


def read_metrics(path: str | Path, names: Iterable[str] | None = None, *, run_id: str | None = None,
                 lock_timeout_s: float = 30.0) -> list[MetricRow]:
    """Every row of the file (optionally only `names`, only `run_id`), ordered by (step, name, wall_time)."""
    path = _existing(path)
    where, params = [], []
    if names is not None:
        wanted = [validate_name(n) for n in names]
        if not wanted:
            return []
        where.append(f"name IN ({', '.join('?' for _ in wanted)})")
        params.extend(wanted)
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    sql = "SELECT run_id, step, tokens_or_events, name, value, wall_time FROM metrics"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY step, name, wall_time"
    rows = _with_connection(path, True, lambda con: con.execute(sql, params).fetchall(), lock_timeout_s)
    return [MetricRow(*r) for r in rows]


def latest_values(path: str | Path, *, lock_timeout_s: float = 30.0) -> dict[str, tuple[int, float]]:
    """For each metric name, (step, value) of its row with the highest step."""
    path = _existing(path)
    sql = ("SELECT name, step, value FROM (SELECT name, step, value, row_number() OVER "
           "(PARTITION BY name ORDER BY step DESC, wall_time DESC) AS k FROM metrics) WHERE k = 1 ORDER BY name")
    rows = _with_connection(path, True, lambda con: con.execute(sql).fetchall(), lock_timeout_s)
    return {name: (int(step), float(value)) for name, step, value in rows}


def last_step(path: str | Path, *, lock_timeout_s: float = 30.0) -> int | None:
    """The highest step in the file, or None if it has no rows."""
    path = _existing(path)
    rows = _with_connection(path, True, lambda con: con.execute("SELECT max(step) FROM metrics").fetchall(),
                            lock_timeout_s)
    return None if rows[0][0] is None else int(rows[0][0])


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {str(path)!r} does not exist (nothing has been flushed to it yet?)")
    return path


def _as_count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            raise DataError(f"{what}={value!r} must be a non-negative integer") from None
        if isinstance(value, bool) or as_int != value:
            raise DataError(f"{what}={value!r} must be a non-negative integer")
        value = as_int
    if value < 0:
        raise DataError(f"{what}={value} must be a non-negative integer")
    return int(value)


def _with_connection(path: Path, read_only: bool, work: Callable[[duckdb.DuckDBPyConnection], T],
                     timeout: float) -> T:
    """Run `work` on a fresh connection, retrying while another process holds the file's lock."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as exc:
            text = str(exc).lower()
            if not any(word in text for word in _LOCK_WORDS):
                raise DataError(f"cannot open metrics file {str(path)!r}: {exc}") from None
            if time.monotonic() >= deadline:
                raise RunError(f"metrics file {str(path)!r} stayed locked by another process for {timeout:.0f} s: "
                               f"{exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        try:
            return work(con)
        except duckdb.CatalogException as exc:
            raise DataError(f"metrics file {str(path)!r} has no metrics table: {exc}") from None
        except duckdb.Error as exc:
            # A `metrics` table of another shape, or a file some other tool wrote.
            raise DataError(f"metrics file {str(path)!r} does not hold cambium's metrics table "
                            f"(run_id, step, tokens_or_events, name, value, wall_time): {exc}") from None
        finally:
            con.close()
