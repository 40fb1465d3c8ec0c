"""MOR-8 without servers: Urza's SQL metadata on SQLite (the default), the FieldReport replay buffer, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.morph.backends import Endpoints, check_services, open_bus, open_urza
from cambium.morph.bus import InProcessBus
from cambium.morph.compiler import Tezzeret, load_kernel
from cambium.morph.contracts import (
    BlueprintStatus,
    CompileSettings,
    FieldReport,
    KernelStatus,
    SeedState,
    StateChange,
)
from cambium.morph.errors import BackendError, redact
from cambium.morph.library import ArtifactError, Urza
from cambium.morph.sql_store import SqlMetadataStore, engine_url


def report(seed: str, outcome: SeedState = SeedState.CULLED) -> FieldReport:
    return FieldReport(
        seed_id=seed, blueprint_id=None, artifact_id=None, outcome=outcome,  # type: ignore[arg-type]
        health_at_decision=0.2, metric_before=0.5, metric_after=0.4, epoch_started=1, epoch_finished=3,
        timeline=(StateChange(epoch=1, source=SeedState.DORMANT, target=SeedState.GERMINATED),),
    )


def exercise(urza: Urza) -> None:
    """What every backend pair must do: the library's whole surface, records read back equal."""
    bp = urza.template("low_rank_adapter", ("B", 8))
    assert urza.template("low_rank_adapter", ("B", 8)) == bp  # content-addressed: the same IR is one record
    assert urza.blueprint(bp.blueprint_id) == bp
    tz = Tezzeret(urza, benchmark_repeats=1)
    try:
        art = tz.compile(bp.blueprint_id, CompileSettings(init_seed=3))
        assert tz.compile(bp.blueprint_id, CompileSettings(init_seed=3)) == art  # reused, not compiled twice
    finally:
        tz.close()
    assert urza.blueprint(bp.blueprint_id).status == BlueprintStatus.VALIDATED
    record, payload = urza.kernel(art.artifact_id)
    assert record == art and load_kernel(payload, record) is not None
    assert urza.meta.list_artifacts(bp.blueprint_id) == [art]
    assert urza.meta.list_artifacts("0" * 64) == []
    assert urza.set_kernel_status(art.artifact_id, KernelStatus.REJECTED).status == KernelStatus.REJECTED
    assert urza.kernel(art.artifact_id)[0].status == KernelStatus.REJECTED
    assert [b.blueprint_id for b in urza.meta.list_blueprints()] == [bp.blueprint_id]
    sizes = [urza.record_experience(report(f"s{i}")) for i in range(3)]
    assert sizes == [1, 2, 3]
    assert [r.seed_id for r in urza.experience()] == ["s0", "s1", "s2"]
    assert [r.seed_id for r in urza.experience(limit=2)] == ["s1", "s2"]
    assert urza.experience()[0] == report("s0")
    with pytest.raises(ArtifactError, match="no record"):
        urza.kernel("f" * 64)
    with pytest.raises(ArtifactError, match="no record"):
        urza.set_kernel_status("f" * 64, KernelStatus.READY)


def test_local_default_is_sqlite_and_a_directory(tmp_path: Path) -> None:
    urza = Urza.local(tmp_path)
    exercise(urza)
    assert (tmp_path / "urza.sqlite").is_file() and any((tmp_path / "objects").rglob("*"))
    again = Urza.local(tmp_path)  # another process opening the same library
    assert [r.seed_id for r in again.experience()] == ["s0", "s1", "s2"]


def test_open_urza_and_open_bus_pick_the_embedded_defaults(tmp_path: Path) -> None:
    ends = Endpoints.from_env({"REDIS_URL": " ", "DATABASE_URL": ""})
    assert ends == Endpoints()
    assert isinstance(open_bus(ends), InProcessBus)
    exercise(open_urza(ends, tmp_path))
    db = tmp_path / "other.sqlite"
    urza = open_urza(Endpoints(database_url=f"sqlite:///{db}"), tmp_path / "objects-here")
    urza.template("residual_mlp", ("B", 4))
    assert db.is_file()


def test_a_database_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    store = SqlMetadataStore.sqlite(tmp_path / "u.sqlite")
    assert store.list_blueprints() == []
    with store.engine.begin() as conn:
        conn.execute(sa.text("update urza_meta set value = '99' where key = 'schema_version'"))
    with pytest.raises(BackendError, match="schema version 99, this cambium writes 2"):
        SqlMetadataStore.sqlite(tmp_path / "u.sqlite").list_blueprints()


def test_bad_database_urls_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="only sqlite:/// and postgresql://") as exc:
        SqlMetadataStore("mysql://u:secret@h/db")
    assert "secret" not in str(exc.value)
    unwritable = SqlMetadataStore(f"sqlite:///{tmp_path}/missing-dir/x.sqlite")
    with pytest.raises(BackendError, match="failed while creating the Urza schema"):
        unwritable.list_blueprints()


def test_engine_url_and_redaction() -> None:
    assert engine_url("postgresql://u@h:5/db") == "postgresql+psycopg://u@h:5/db"
    assert engine_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert engine_url("sqlite:///x") == "sqlite:///x"
    assert redact("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_check_services_reports_embedded_and_down_backends(tmp_path: Path) -> None:
    rows = check_services(Endpoints(), tmp_path)
    assert [(r.service, r.ok) for r in rows] == [("oona", True), ("urza metadata", True), ("urza artifacts", True),
                                                 ("api", True)]
    assert rows[1].detail.startswith("SQLite ")
    down = check_services(Endpoints(database_url="postgresql://postgres:pw@127.0.0.1:1/x"), tmp_path)
    meta = down[1]
    assert not meta.ok and "failed while connecting" in meta.detail and "pw" not in meta.detail + meta.backend


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=60), st.sampled_from(["sqlite:", "postgresql://", "redis://", "http://"]).flatmap(
    lambda scheme: st.text(max_size=40).map(lambda rest: scheme + rest))))
def test_any_backend_url_is_taken_or_refused_in_one_line(url: str) -> None:
    """Endpoints come from the environment: a bad one is a one-line BackendError at construction, never a traceback
    (nothing here connects: stores and buses connect on first use)."""
    from cambium.morph.redis_bus import RedisBus
    from cambium.morph.s3_store import S3ObjectStore

    for make in (SqlMetadataStore, RedisBus, S3ObjectStore):
        try:
            made = make(url)
        except BackendError as exc:
            assert "\n" not in str(exc)
        else:
            if hasattr(made, "close"):
                made.close()


def exercise_replay_keys(meta: SqlMetadataStore) -> None:
    """Keyed reports and decisions are stored once however often they are written (a resumed run repeats them)."""
    for _ in range(3):
        meta.add_field_report(report("k0"), key="run1/k0/1/3", run_id="run1")
        meta.add_decision("run1", 1, "run1/1", '{"x": 1}')
    meta.add_decision("run1", 2, "run1/2", '{"x": 2}')
    meta.add_field_report(report("free"))  # no key (POST /training/experience): always appended
    meta.add_field_report(report("free"))
    got = [(run, r.seed_id) for run, r in meta.keyed_field_reports()]
    assert got[-3:] == [("run1", "k0"), (None, "free"), (None, "free")] and got.count(("run1", "k0")) == 1
    assert meta.decisions() == [("run1", '{"x": 1}'), ("run1", '{"x": 2}')]


def test_replay_buffer_keys_dedupe_and_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    exercise_replay_keys(SqlMetadataStore.sqlite(tmp_path / "new.sqlite"))
    old = sa.create_engine(f"sqlite:///{tmp_path / 'v1.sqlite'}")
    with old.begin() as conn:  # the schema as version 1 wrote it, with a report in it
        conn.execute(sa.text("create table urza_meta (key varchar(64) primary key, value text not null)"))
        conn.execute(sa.text("insert into urza_meta values ('schema_version', '1')"))
        conn.execute(sa.text("create table field_reports (id integer primary key autoincrement, seed_id text not "
                             "null, outcome varchar(16) not null, record text not null)"))
        conn.execute(sa.text("insert into field_reports (seed_id, outcome, record) values (:s, :o, :r)"),
                     {"s": "old", "o": "CULLED", "r": report("old").model_dump_json()})
    old.dispose()
    store = SqlMetadataStore.sqlite(tmp_path / "v1.sqlite")
    assert store.field_reports() == [report("old")]
    exercise_replay_keys(store)
    with store.engine.begin() as conn:
        assert conn.execute(sa.text("select value from urza_meta")).scalar_one() == "2"
