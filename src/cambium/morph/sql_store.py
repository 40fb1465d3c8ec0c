"""Urza's metadata in SQL (SQLAlchemy Core): a SQLite file by default, PostgreSQL (psycopg) at scale via `DATABASE_URL`.

Each record is kept whole as its contract's JSON (`record`, the authority: read back through `parse`, so a damaged row
is one clear error) beside the columns that queries filter on. Tables:

    urza_meta      key → value                 (schema_version)
    blueprints     blueprint_id PK, name, family, status, parent_id, param_count, record
    kernels        artifact_id PK, blueprint_id, status, device, created_at, record
    field_reports  id PK (insertion order), seed_id, outcome, run_id, report_key UNIQUE, record
    decisions      id PK (insertion order), run_id, epoch, decision_key UNIQUE, record
                   (with field_reports: Simic's replay buffer, cambium.morph.field_reports)

`report_key` / `decision_key` are dedupe keys (run id + boundary epoch + seed): a row whose key is already stored is
not written again, so a resumed run (which repeats the boundaries after its last checkpoint) records each decision
and outcome once. Reports posted without a key (`POST /training/experience`) are always appended.

The schema is created on first use (`create_all`, idempotent) and stamped with `SCHEMA_VERSION`. A version-1 database
(no dedupe columns, no decisions table) is upgraded in place by adding them (additive: nothing is rewritten); any
other version is refused rather than migrated silently. Writes of blueprint and kernel records are upserts, so
two workers storing the same content-addressed record agree.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError, ProgrammingError

from cambium.morph.contracts import Blueprint, CompiledKernelArtifact, FieldReport, parse
from cambium.morph.errors import BackendError, redact

__all__ = ["SCHEMA_VERSION", "SqlMetadataStore", "engine_url"]

SCHEMA_VERSION = "2"

_md = sa.MetaData()
_meta_t = sa.Table("urza_meta", _md, sa.Column("key", sa.String(64), primary_key=True),
                   sa.Column("value", sa.Text, nullable=False))
_blueprints = sa.Table(
    "blueprints", _md,
    sa.Column("blueprint_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("family", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("parent_id", sa.String(64), nullable=True),
    sa.Column("param_count", sa.BigInteger, nullable=False),
    sa.Column("record", sa.Text, nullable=False),
)
_kernels = sa.Table(
    "kernels", _md,
    sa.Column("artifact_id", sa.String(64), primary_key=True),
    sa.Column("blueprint_id", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("device", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("record", sa.Text, nullable=False),
)
_reports = sa.Table(
    "field_reports", _md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("seed_id", sa.Text, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("run_id", sa.Text, nullable=True),
    sa.Column("report_key", sa.String(400), nullable=True, unique=True),
)
_decisions = sa.Table(
    "decisions", _md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("decision_key", sa.String(400), nullable=False, unique=True),
    sa.Column("record", sa.Text, nullable=False),
)
_V1_UPGRADE = (
    "ALTER TABLE field_reports ADD COLUMN run_id TEXT",
    "ALTER TABLE field_reports ADD COLUMN report_key VARCHAR(400)",
    "CREATE UNIQUE INDEX IF NOT EXISTS field_reports_report_key ON field_reports (report_key)",
)


def engine_url(url: str) -> str:
    """`postgresql://` and `postgres://` URLs (as libpq writes them) use the psycopg 3 driver."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


class SqlMetadataStore:
    """Blueprint, kernel and field-report records in a SQL database. Thread-safe (a pooled engine)."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite:"):
                # WAL lets a compile worker in another process write while the trainer reads.
                self.engine: Engine = sa.create_engine(url, connect_args={"timeout": 30})
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            elif url.startswith(("postgresql", "postgres://")):
                self.engine = sa.create_engine(engine_url(url), pool_pre_ping=True,
                                               connect_args={"connect_timeout": 10})
            else:
                raise BackendError(f"DATABASE_URL={redact(url)!r}: only sqlite:/// and postgresql:// URLs are "
                                   "supported")
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise BackendError(f"DATABASE_URL={redact(url)!r} is not a database URL: {exc}") from None
        self._lock = threading.Lock()
        self._ready = False

    @classmethod
    def sqlite(cls, path: str | Path) -> SqlMetadataStore:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{Path(path)}")

    @contextmanager
    def _tx(self, doing: str) -> Iterator[Connection]:
        self._ensure_schema()
        with self._db(doing), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _db(self, doing: str) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
            raise BackendError(f"database {redact(self.url)} failed while {doing}: {first}") from None

    def _ensure_schema(self) -> None:
        with self._lock:
            if self._ready:
                return
            with self._db("creating the Urza schema"):
                try:
                    _md.create_all(self.engine)
                except (IntegrityError, ProgrammingError, OperationalError):
                    # another process created the tables at the same moment (SQLite: "table … already exists" is an
                    # OperationalError); the second pass finds them. A real failure fails again and is reported.
                    _md.create_all(self.engine)
                with self.engine.begin() as conn:
                    stamped = conn.execute(sa.select(_meta_t.c.value).where(_meta_t.c.key == "schema_version")
                                           ).scalar_one_or_none()
                    if stamped == "1":  # additive upgrade: the dedupe columns (the decisions table is new)
                        for statement in _V1_UPGRADE:
                            conn.execute(sa.text(statement))
                        stamped = None
                    if stamped is None:
                        conn.execute(self._upsert(_meta_t, {"key": "schema_version", "value": SCHEMA_VERSION},
                                                  ["key"]))
                    elif stamped != SCHEMA_VERSION:
                        raise BackendError(
                            f"database {redact(self.url)} holds Urza schema version {stamped}, this cambium writes "
                            f"{SCHEMA_VERSION}: point DATABASE_URL at a new database"
                        )
            self._ready = True

    def _upsert(self, table: sa.Table, row: dict[str, Any], keys: list[str]) -> Any:
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        stmt = insert(table).values(**row)
        return stmt.on_conflict_do_update(index_elements=keys, set_={k: v for k, v in row.items() if k not in keys})

    def ping(self) -> str:
        """The server's version string (raises BackendError if it does not answer)."""
        with self._db("connecting"), self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                return str(conn.execute(sa.text("select version()")).scalar_one()).split(",")[0]
            return "SQLite " + str(conn.execute(sa.text("select sqlite_version()")).scalar_one())

    def put_blueprint(self, bp: Blueprint) -> None:
        row = {"blueprint_id": bp.blueprint_id, "name": bp.name, "family": bp.family, "status": bp.status.value,
               "parent_id": bp.parent_id, "param_count": bp.param_count, "record": bp.model_dump_json()}
        with self._tx("storing a blueprint") as conn:
            conn.execute(self._upsert(_blueprints, row, ["blueprint_id"]))

    def get_blueprint(self, blueprint_id: str) -> Blueprint | None:
        with self._tx("reading a blueprint") as conn:
            raw = conn.execute(sa.select(_blueprints.c.record).where(_blueprints.c.blueprint_id == blueprint_id)
                               ).scalar_one_or_none()
        return None if raw is None else parse(Blueprint, raw)

    def list_blueprints(self) -> list[Blueprint]:
        with self._tx("listing blueprints") as conn:
            rows = conn.execute(sa.select(_blueprints.c.record).order_by(_blueprints.c.blueprint_id)).scalars().all()
        return [parse(Blueprint, raw) for raw in rows]

    def put_artifact(self, art: CompiledKernelArtifact) -> None:
        row = {"artifact_id": art.artifact_id, "blueprint_id": art.blueprint_id, "status": art.status.value,
               "device": art.device, "created_at": art.created_at, "record": art.model_dump_json()}
        with self._tx("storing a kernel record") as conn:
            conn.execute(self._upsert(_kernels, row, ["artifact_id"]))

    def get_artifact(self, artifact_id: str) -> CompiledKernelArtifact | None:
        with self._tx("reading a kernel record") as conn:
            raw = conn.execute(sa.select(_kernels.c.record).where(_kernels.c.artifact_id == artifact_id)
                               ).scalar_one_or_none()
        return None if raw is None else parse(CompiledKernelArtifact, raw)

    def list_artifacts(self, blueprint_id: str | None = None) -> list[CompiledKernelArtifact]:
        query = sa.select(_kernels.c.record).order_by(_kernels.c.created_at, _kernels.c.artifact_id)
        if blueprint_id is not None:
            query = query.where(_kernels.c.blueprint_id == blueprint_id)
        with self._tx("listing kernel records") as conn:
            rows = conn.execute(query).scalars().all()
        return [parse(CompiledKernelArtifact, raw) for raw in rows]

    def _insert_once(self, table: sa.Table, row: dict[str, Any], key: str) -> Any:
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        return insert(table).values(**row).on_conflict_do_nothing(index_elements=[key])

    def add_field_report(self, report: FieldReport, *, key: str | None = None, run_id: str | None = None) -> int:
        """Append to the replay buffer (not again if a report with dedupe `key` is stored); returns its size."""
        row = {"seed_id": report.seed_id, "outcome": report.outcome.value, "record": report.model_dump_json(),
               "run_id": run_id, "report_key": key}
        with self._tx("storing a field report") as conn:
            if key is None:
                conn.execute(sa.insert(_reports).values(**row))
            else:
                conn.execute(self._insert_once(_reports, row, "report_key"))
            return int(conn.execute(sa.select(sa.func.count()).select_from(_reports)).scalar_one())

    def keyed_field_reports(self) -> list[tuple[str | None, FieldReport]]:
        """Every report with the run that recorded it (None for reports posted without one), oldest first."""
        query = sa.select(_reports.c.run_id, _reports.c.record).order_by(_reports.c.id)
        with self._tx("reading field reports") as conn:
            rows = conn.execute(query).all()
        return [(run, parse(FieldReport, raw)) for run, raw in rows]

    def add_decision(self, run_id: str, epoch: int, key: str, record: str) -> None:
        """Store one boundary's observation and actions (JSON `record`) unless `key` is stored already."""
        row = {"run_id": run_id, "epoch": epoch, "decision_key": key, "record": record}
        with self._tx("storing a decision") as conn:
            conn.execute(self._insert_once(_decisions, row, "decision_key"))

    def decisions(self) -> list[tuple[str, str]]:
        """(run_id, record JSON) of every stored decision, oldest first."""
        query = sa.select(_decisions.c.run_id, _decisions.c.record).order_by(_decisions.c.id)
        with self._tx("reading decisions") as conn:
            return [(run, raw) for run, raw in conn.execute(query).all()]

    def field_reports(self, limit: int | None = None) -> list[FieldReport]:
        """The replay buffer, oldest first (the last `limit` reports if given)."""
        query = sa.select(_reports.c.record).order_by(_reports.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._tx("reading field reports") as conn:
            rows = conn.execute(query).scalars().all()
        return [parse(FieldReport, raw) for raw in reversed(rows)]

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
