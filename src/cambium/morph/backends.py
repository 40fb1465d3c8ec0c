"""Which backend each morph service uses, from the environment (read once, at the entry point):

| service        | embedded default (nothing set)   | at scale                                  |
|----------------|----------------------------------|-------------------------------------------|
| Oona (bus)     | `InProcessBus`                   | `RedisBus` on `REDIS_URL`                 |
| Urza metadata  | SQLite `<root>/urza.sqlite`      | PostgreSQL on `DATABASE_URL`              |
| Urza artifacts | local directory `<root>/objects` | S3-compatible store on `S3_ENDPOINT_URL`  |
| HTTP services  | no token: loopback only          | bearer token `CAMBIUM_API_TOKEN`          |
| Tamiyo         | the trainer's own policy         | a Tamiyo service on `CAMBIUM_TAMIYO_URL`  |

`check_services` reports each backend's health, as `cambium morph check-services` prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cambium.core.errors import CambiumError
from cambium.morph.bus import Bus, InProcessBus
from cambium.morph.errors import BackendError, redact
from cambium.morph.library import LocalObjectStore, ObjectStore, Urza
from cambium.morph.sql_store import SqlMetadataStore

__all__ = ["Endpoints", "Health", "check_services", "open_bus", "open_urza"]


@dataclass(frozen=True)
class Endpoints:
    """Backend endpoints and the API secret; None means the embedded default."""

    redis_url: str | None = None
    database_url: str | None = None
    s3_endpoint_url: str | None = None
    api_token: str | None = None
    tamiyo_url: str | None = None
    """A Tamiyo service (`cambium morph serve`) the trainer asks for decisions instead of deciding in-process."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Endpoints:
        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        return cls(get("REDIS_URL"), get("DATABASE_URL"), get("S3_ENDPOINT_URL"), get("CAMBIUM_API_TOKEN"),
                   get("CAMBIUM_TAMIYO_URL"))


def open_bus(endpoints: Endpoints, *, namespace: str = "oona", retention: int = 0) -> Bus:
    """Redis Streams on `REDIS_URL` (trimmed to `retention` acknowledged entries, 0 = never), else in-process."""
    if endpoints.redis_url is None:
        return InProcessBus()
    from cambium.morph.redis_bus import RedisBus  # redis-py only when Redis is used

    return RedisBus(endpoints.redis_url, namespace=namespace, retention=retention)


def open_urza(endpoints: Endpoints, root: str | Path, *, bucket: str = "cambium-urza") -> Urza:
    """The library on the configured backends; `root` holds whatever stays local."""
    objects: ObjectStore
    if endpoints.s3_endpoint_url is not None:
        from cambium.morph.s3_store import S3ObjectStore  # boto3 only when S3 is used

        objects = S3ObjectStore(endpoints.s3_endpoint_url, bucket)
    else:
        objects = LocalObjectStore(root)
    meta = (SqlMetadataStore(endpoints.database_url) if endpoints.database_url is not None
            else SqlMetadataStore.sqlite(Path(root) / "urza.sqlite"))
    return Urza(objects, meta)


@dataclass(frozen=True)
class Health:
    service: str
    backend: str
    ok: bool
    detail: str
    latency_ms: float


def check_services(endpoints: Endpoints, root: str | Path, *, bucket: str = "cambium-urza") -> list[Health]:
    """Ping every backend once; never raises for a backend that is down (that is what it reports)."""
    rows = []

    def probe(service: str, backend: str, fn: Callable[[], str]) -> None:
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except CambiumError as exc:
            detail, ok = str(exc), False
        rows.append(Health(service, backend, ok, detail, (time.perf_counter() - t0) * 1e3))

    def redis_ping(url: str) -> str:
        from cambium.morph.redis_bus import RedisBus

        bus = RedisBus(url, timeout_s=3.0)
        try:
            return "PONG" if bus.ping() else "no answer"
        finally:
            bus.close()

    def sql_ping(url: str) -> str:
        meta = SqlMetadataStore(url)
        try:
            return meta.ping()
        finally:
            meta.close()

    def s3_ping(url: str) -> str:
        from cambium.morph.s3_store import S3ObjectStore

        return S3ObjectStore(url, bucket, timeout_s=3.0).ping()

    if endpoints.redis_url is None:
        rows.append(Health("oona", "in-process", True, "embedded bus (set REDIS_URL for Redis Streams)", 0.0))
    else:
        probe("oona", f"redis {redact(endpoints.redis_url)}", lambda: redis_ping(endpoints.redis_url or ""))
    db = endpoints.database_url or f"sqlite:///{Path(root) / 'urza.sqlite'}"
    if endpoints.database_url is None:
        Path(root).mkdir(parents=True, exist_ok=True)
    probe("urza metadata", redact(db), lambda: sql_ping(db))
    if endpoints.s3_endpoint_url is None:
        rows.append(Health("urza artifacts", "local", True, f"directory {Path(root) / 'objects'}", 0.0))
    else:
        probe("urza artifacts", f"s3 {redact(endpoints.s3_endpoint_url)}",
              lambda: s3_ping(endpoints.s3_endpoint_url or ""))
    def tamiyo_ping(url: str) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {endpoints.api_token}"} if endpoints.api_token else {}
        try:
            reply = httpx.get(url.rstrip("/") + "/policy/version", headers=headers, timeout=3.0)
        except httpx.HTTPError as exc:
            raise BackendError(f"Tamiyo service at {redact(url)} is unreachable: {exc}") from None
        if reply.status_code != 200:
            raise BackendError(f"Tamiyo service at {redact(url)} answered {reply.status_code}")
        version = reply.json()
        return f"{version.get('kind')} policy, version {version.get('version')}"

    if endpoints.tamiyo_url is not None:
        probe("tamiyo", redact(endpoints.tamiyo_url), lambda: tamiyo_ping(endpoints.tamiyo_url or ""))
    token = "set" if endpoints.api_token else "not set: services bind to loopback only"
    rows.append(Health("api", "bearer token", True, f"CAMBIUM_API_TOKEN {token}", 0.0))
    return rows
