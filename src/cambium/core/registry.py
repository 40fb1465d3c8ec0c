"""The experiments registry: one row per run, behind a small interface.

`RunRecord` is a row; `RunRegistry` is what `cambium.core.runs` needs of a registry (`insert`, `update`, `get`,
`find`); `SQLiteRegistry` is the embedded implementation and holds all of the SQL, so a PostgreSQL registry can
replace it without touching callers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambium.core.errors import RunError

__all__ = ["RunRecord", "RunRegistry", "SQLiteRegistry"]


@dataclass(frozen=True)
class RunRecord:
    """One row of the registry. Times are ISO-8601 UTC strings; `summary` is whatever `finish_run` stored."""

    id: str
    system: str
    name: str
    status: str
    created: str
    updated: str
    fingerprint: str
    dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    host: str = ""
    pid: int = 0
    pid_started: float = 0.0


class RunRegistry(ABC):
    """Where runs are indexed. Implementations hold all of their SQL; callers use only these methods."""

    @abstractmethod
    def insert(self, record: RunRecord) -> None:
        """Add a new run; raises RunError if the id exists."""

    @abstractmethod
    def update(self, run_id: str, **fields: Any) -> None:
        """Set `status`, `updated`, `summary`, `host`, `pid` or `pid_started` of an existing run."""

    @abstractmethod
    def get(self, run_id: str) -> RunRecord | None:
        """The run with exactly this id, or None."""

    @abstractmethod
    def find(self, prefix: str = "", system: str | None = None) -> list[RunRecord]:
        """Runs whose id starts with `prefix` (all runs for ""), oldest first, optionally of one system."""


class SQLiteRegistry(RunRegistry):
    """The embedded registry: one SQLite file in WAL mode, a connection per call, writes in IMMEDIATE transactions.

    WAL lets readers proceed while a writer commits, and the busy timeout makes a second process wait for the write
    lock instead of failing, which is enough for a handful of concurrent runs on one machine.
    """

    _COLUMNS = ("id", "system", "name", "status", "created", "updated", "fingerprint", "dir", "summary", "host",
                "pid", "pid_started")
    _UPDATABLE = frozenset({"status", "updated", "fingerprint", "summary", "host", "pid", "pid_started"})

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._ready = False

    @contextmanager
    def _connect(self, write: bool) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise RunError(f"cannot open the run registry {str(self.path)!r}: {exc}") from None
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            if not self._ready:
                self._prepare(con)
                self._ready = True
            if write:
                con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
            if con.in_transaction:
                con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RunError(f"run registry {str(self.path)!r}: {exc}") from None
        finally:
            con.close()

    def _prepare(self, con: sqlite3.Connection) -> None:
        """Switch the file to WAL and create the table if that is not done yet, retrying while another process holds
        a lock. On a registry that is ready this is two reads and takes no lock.

        SQLite answers "database is locked" at once, without waiting in the busy handler, when waiting could
        deadlock: a journal-mode change or a read-then-write statement that meets another connection's write
        transaction. Both are retried here until the busy timeout; the schema is written in an IMMEDIATE transaction,
        which does wait in the busy handler.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.002
        while True:
            try:
                if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    con.execute("PRAGMA journal_mode = WAL")
                if con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'runs'").fetchone():
                    return
                con.execute("BEGIN IMMEDIATE")
                con.execute(
                    "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, system TEXT NOT NULL, name TEXT NOT NULL,"
                    " status TEXT NOT NULL, created TEXT NOT NULL, updated TEXT NOT NULL, fingerprint TEXT NOT NULL,"
                    " dir TEXT NOT NULL, summary TEXT NOT NULL DEFAULT '{}', host TEXT NOT NULL DEFAULT '',"
                    " pid INTEGER NOT NULL DEFAULT 0, pid_started REAL NOT NULL DEFAULT 0)"
                )
                con.execute("CREATE INDEX IF NOT EXISTS runs_system ON runs (system, id)")
                con.execute("COMMIT")
                return
            except sqlite3.OperationalError as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                busy = exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 0.1)

    def insert(self, record: RunRecord) -> None:
        row = self._to_row(record)
        with self._connect(write=True) as con:
            if con.execute("SELECT 1 FROM runs WHERE id = ?", (record.id,)).fetchone():
                raise RunError(f"run {record.id!r} is already registered in {self.path}; pick another run id")
            placeholders = ", ".join("?" for _ in self._COLUMNS)
            con.execute(f"INSERT INTO runs ({', '.join(self._COLUMNS)}) VALUES ({placeholders})", row)

    def update(self, run_id: str, **fields: Any) -> None:
        unknown = set(fields) - self._UPDATABLE
        assert not unknown, f"not updatable: {sorted(unknown)}"
        if "summary" in fields:
            fields["summary"] = json.dumps(fields["summary"], sort_keys=True, default=str)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._connect(write=True) as con:
            cursor = con.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))
            if cursor.rowcount != 1:
                raise RunError(f"run {run_id!r} is not registered in {self.path}")

    def get(self, run_id: str) -> RunRecord | None:
        if not self.path.exists():
            return None
        with self._connect(write=False) as con:
            row = con.execute(f"SELECT {', '.join(self._COLUMNS)} FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._from_row(row) if row else None

    def find(self, prefix: str = "", system: str | None = None) -> list[RunRecord]:
        if not self.path.exists():
            return []
        # substr() rather than LIKE: ids may contain '_' which LIKE treats as a wildcard.
        sql = f"SELECT {', '.join(self._COLUMNS)} FROM runs WHERE substr(id, 1, ?) = ?"
        params: list[Any] = [len(prefix), prefix]
        if system is not None:
            sql += " AND system = ?"
            params.append(system)
        with self._connect(write=False) as con:
            rows = con.execute(sql + " ORDER BY id", params).fetchall()
        return [self._from_row(r) for r in rows]

    @staticmethod
    def _to_row(r: RunRecord) -> tuple[Any, ...]:
        return (r.id, r.system, r.name, r.status, r.created, r.updated, r.fingerprint, str(r.dir),
                json.dumps(r.summary, sort_keys=True, default=str), r.host, r.pid, r.pid_started)

    def _from_row(self, row: tuple[Any, ...]) -> RunRecord:
        (id_, system, name, status, created, updated, fp, dir_, summary, host, pid, pid_started) = row
        try:
            summary_value = json.loads(summary)
            if not isinstance(summary_value, dict):
                raise ValueError(f"summary {summary!r} is not a JSON object")
            return RunRecord(id=id_, system=system, name=name, status=status, created=created, updated=updated,
                             fingerprint=fp, dir=Path(dir_), summary=summary_value, host=host, pid=int(pid),
                             pid_started=float(pid_started))
        except (TypeError, ValueError) as exc:
            raise RunError(f"run registry {str(self.path)!r}: the row of run {id_!r} is damaged ({exc}); "
                           "fix or delete that row") from None
