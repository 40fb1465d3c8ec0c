"""MOR-7 on a real redis-server: the bus contract suite (tests/morph/bus_contract.py) on Redis Streams, and what only
a networked bus has: other processes' messages, foreign entries in a stream, an unreachable server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from tests.integration.conftest import free_port
from tests.morph.bus_contract import *  # noqa: F403  (the contract's tests run here against this module's fixture)

from cambium.morph.contracts import EpochEvent
from cambium.morph.errors import BackendError
from cambium.morph.redis_bus import RedisBus

pytestmark = pytest.mark.integration


@pytest.fixture
def bus(redis_url: str) -> Iterator[RedisBus]:
    b = RedisBus(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}")
    yield b
    b.close()


def test_another_connection_sees_the_streams(bus: RedisBus, redis_url: str) -> None:
    other = RedisBus(redis_url, namespace=bus.namespace)  # what another process would open
    try:
        sent = bus.publish("system.events.epoch", EpochEvent(epoch=3, step=30, train_loss=0.5))
        ((message_id, got),) = other.read("system.events.epoch", "g", consumer="elsewhere")
        assert message_id == sent.message_id and got == EpochEvent(epoch=3, step=30, train_loss=0.5)
        assert bus.pending("system.events.epoch", "g") == 1
        other.ack("system.events.epoch", "g", message_id)
        assert bus.pending("system.events.epoch", "g") == 0
    finally:
        other.close()


def test_a_foreign_entry_in_a_stream_is_counted_acked_and_skipped(bus: RedisBus, redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)
    key = f"{bus.namespace}:system.events.epoch"
    raw.xadd(key, {"payload": b'{"epoch": "not a number"}'})
    raw.xadd(key, {"something": b"else"})
    bus.publish("system.events.epoch", EpochEvent(epoch=1, step=1, train_loss=1.0))
    got = bus.read("system.events.epoch", "g")
    assert [m.epoch for _, m in got] == [1]
    assert bus.rejected == 2
    bus.ack("system.events.epoch", "g", got[0][0])
    assert bus.pending("system.events.epoch", "g") == 0  # the bad entries were acknowledged, not left pending
    assert len(bus.log("system.events.epoch")) == 1
    raw.close()


def test_an_unreachable_server_is_one_clear_error() -> None:
    dead = RedisBus(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(BackendError, match=r"Redis at redis://127\.0\.0\.1:\d+/0 is unreachable while publishing"):
        dead.publish("system.events.epoch", EpochEvent(epoch=0, step=0, train_loss=1.0))
    with pytest.raises(BackendError, match="not a Redis URL"):
        RedisBus("http://nope")


def test_the_kasmina_api_drives_a_trainer_through_redis(redis_url: str, tmp_path) -> None:
    """The trainer and the API hold separate Redis connections (as separate processes would) and share nothing else
    but the library."""
    from fastapi.testclient import TestClient
    from tests.morph._harness import Harness

    from cambium.morph.api import create_app
    from cambium.morph.contracts import SeedState

    namespace = f"api-{uuid.uuid4().hex[:8]}"
    h = Harness(tmp_path, bus=RedisBus(redis_url, namespace=namespace))
    api_bus = RedisBus(redis_url, namespace=namespace)
    try:
        with TestClient(create_app(h.m.urza, api_bus, token="t"), headers={"Authorization": "Bearer t"}) as c:
            h.run_epoch()
            assert c.get("/seeds/1/status").json()["state"] == "DORMANT"
            bp = h.m.urza.template("residual_mlp", ("B", 8))
            assert c.post("/seeds/1/germinate", json={"blueprint_id": bp.blueprint_id}).status_code == 202
            h.run_epoch()
            assert h.state() == SeedState.GERMINATED
            h.run_epoch()
            assert c.get("/seeds/1/status").json()["state"] == h.state() == SeedState.TRAINING
            assert c.get("/layers/1/stats").json()["epoch"] == 3  # the telemetry of the third boundary
    finally:
        h.close()
        h.m.bus.close()
        api_bus.close()


def test_retention_bounds_a_stream_but_never_drops_an_unacknowledged_entry(redis_url: str) -> None:
    """`retention` = 20: a stream whose groups keep up stays within 22 entries; a group that has not read, or read
    without acknowledging, keeps every entry it still owes (redelivered or claimed with its payload intact)."""
    topic = "system.events.epoch"
    bus = RedisBus(redis_url, namespace=f"test-{uuid.uuid4().hex[:12]}", retention=20)
    key = f"{bus.namespace}:{topic}"
    try:
        bus.read(topic, "late")  # the group exists but reads nothing while 100 entries arrive
        for i in range(100):
            bus.publish(topic, EpochEvent(epoch=i, step=i, train_loss=1.0))
        assert bus._r.xlen(key) == 100
        got = bus.read(topic, "late", count=100)
        assert [e.epoch for _, e in got] == list(range(100))
        for message_id, _ in got[:50]:
            bus.ack(topic, "late", message_id)  # the other 50 stay pending: the consumer "died" holding them
        for i in range(100, 200):
            bus.publish(topic, EpochEvent(epoch=i, step=i, train_loss=1.0))
        claimed = bus.claim(topic, "late", "heir", min_idle_s=0.0)
        assert [e.epoch for _, e in claimed] == list(range(50, 100))
        for message_id, _ in claimed:
            bus.ack(topic, "late", message_id)
        fresh = bus.read(topic, "late", count=500)
        assert [e.epoch for _, e in fresh] == list(range(100, 200))
        for message_id, _ in fresh:
            bus.ack(topic, "late", message_id)
        lengths = []
        for i in range(200, 300):  # the group keeps up now: the stream stays bounded
            bus.publish(topic, EpochEvent(epoch=i, step=i, train_loss=1.0))
            for message_id, event in bus.read(topic, "late", count=10):
                assert event.epoch == i
                bus.ack(topic, "late", message_id)
            lengths.append(bus._r.xlen(key))
        assert max(lengths) <= 22 and min(lengths[20:]) >= 20
        assert [m.payload["epoch"] for m in bus.log(topic)][-1] == 299
    finally:
        bus.close()
    with pytest.raises(BackendError, match="retention=-1"):
        RedisBus(redis_url, retention=-1)
