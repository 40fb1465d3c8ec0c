"""MOR-8 on real servers: Urza's metadata in PostgreSQL and its artifacts in an S3-compatible store (moto_server),
verified by hash on every load; two library handles (two processes) see one library."""

from __future__ import annotations

import boto3
import pytest
from tests.integration.conftest import free_port
from tests.morph.test_storage import exercise, exercise_replay_keys

from cambium.morph.backends import Endpoints, check_services, open_urza
from cambium.morph.compiler import Tezzeret
from cambium.morph.contracts import CompileSettings
from cambium.morph.errors import BackendError
from cambium.morph.library import ArtifactError, LocalObjectStore, Urza
from cambium.morph.s3_store import S3ObjectStore
from cambium.morph.sql_store import SqlMetadataStore

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cambium-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cambium-test")


def test_postgres_and_s3_do_everything_the_embedded_library_does(database_url: str, s3_endpoint: str, bucket: str,
                                                                  tmp_path) -> None:
    ends = Endpoints(database_url=database_url, s3_endpoint_url=s3_endpoint)
    urza = open_urza(ends, tmp_path, bucket=bucket)
    assert isinstance(urza.meta, SqlMetadataStore) and urza.meta.engine.dialect.name == "postgresql"
    assert isinstance(urza.objects, S3ObjectStore)
    exercise(urza)
    assert not (tmp_path / "objects").exists() and not (tmp_path / "urza.sqlite").exists()  # nothing stayed local
    other = open_urza(ends, tmp_path / "elsewhere", bucket=bucket)  # what a worker process opens
    assert other.meta.list_blueprints() == urza.meta.list_blueprints()
    assert [r.seed_id for r in other.experience()] == ["s0", "s1", "s2"]
    art = other.meta.list_artifacts()[0]
    assert other.kernel(art.artifact_id)[1] == urza.kernel(art.artifact_id)[1]


def test_replay_buffer_keys_dedupe_on_postgres(database_url: str) -> None:
    exercise_replay_keys(SqlMetadataStore(database_url))  # a fresh database (the fixture)


def test_a_tampered_or_missing_s3_object_is_refused(s3_endpoint: str, bucket: str, tmp_path) -> None:
    store = S3ObjectStore(s3_endpoint, bucket)
    urza = Urza(store, SqlMetadataStore.sqlite(tmp_path / "u.sqlite"))
    bp = urza.template("residual_mlp", ("B", 6))
    tz = Tezzeret(urza, benchmark_repeats=1)
    art = tz.compile(bp.blueprint_id, CompileSettings())
    tz.close()
    assert store.has(art.artifact_id) and store.put(urza.kernel(art.artifact_id)[1]) == art.artifact_id
    raw = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = f"objects/{art.artifact_id[:2]}/{art.artifact_id}"
    body = bytearray(raw.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 1
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(ArtifactError, match=r"hashes to .* modified or corrupted"):
        urza.kernel(art.artifact_id)
    raw.delete_object(Bucket=bucket, Key=key)
    assert not store.has(art.artifact_id)
    with pytest.raises(ArtifactError, match="is not in s3://"):
        urza.kernel(art.artifact_id)
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.get("../../etc/passwd")


def test_s3_and_local_stores_agree_on_addresses(s3_endpoint: str, bucket: str, tmp_path) -> None:
    s3, local = S3ObjectStore(s3_endpoint, bucket, prefix="run-1/"), LocalObjectStore(tmp_path)
    for data in (b"", b"kernel", bytes(range(256)) * 100):
        assert s3.put(data) == local.put(data)
        assert s3.get(local.put(data)) == data


def test_down_servers_are_one_clear_error() -> None:
    port = free_port()
    dead_pg = SqlMetadataStore(f"postgresql://postgres:hunter2@127.0.0.1:{port}/x")
    with pytest.raises(BackendError, match=r"database postgresql://postgres:\*\*\*@127\.0\.0\.1:\d+/x failed") as exc:
        dead_pg.list_blueprints()
    assert "hunter2" not in str(exc.value) and "\n" not in str(exc.value)
    dead_s3 = S3ObjectStore(f"http://127.0.0.1:{port}", "b", timeout_s=0.5)
    with pytest.raises(BackendError, match=r"S3 store s3://b/ at http://127\.0\.0\.1:\d+ failed"):
        dead_s3.has("0" * 64)


def test_check_services_on_live_servers(redis_url: str, database_url: str, s3_endpoint: str, tmp_path) -> None:
    rows = check_services(Endpoints(redis_url=redis_url, database_url=database_url, s3_endpoint_url=s3_endpoint,
                                    api_token="t"), tmp_path)
    assert all(r.ok for r in rows), rows
    assert rows[0].detail == "PONG" and rows[1].detail.startswith("PostgreSQL 1")
    assert rows[3].detail == "CAMBIUM_API_TOKEN set"
