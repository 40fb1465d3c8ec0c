"""MOR-7: the contract every Oona backend passes. Imported by tests/morph/test_bus_contract.py (in-process bus) and
tests/integration/test_redis_bus.py (Redis Streams on a real redis-server); each provides a `bus` fixture."""

from __future__ import annotations

import threading
import time

import pytest

from cambium.core.errors import ProtocolError
from cambium.morph.bus import Bus
from cambium.morph.contracts import CommandKind, EpochEvent, KasminaCommand, parse

EPOCH = "system.events.epoch"
COMMANDS = "control.kasmina.commands"


def _event(e: int) -> EpochEvent:
    return EpochEvent(epoch=e, step=10 * e, train_loss=1.0 / (e + 1))


def _command(i: int) -> KasminaCommand:
    return KasminaCommand(command_id=f"c{i}", kind=CommandKind.GERMINATE, seed_id=f"s{i % 3}", epoch=i)


def test_topics_are_typed(bus: Bus) -> None:
    with pytest.raises(ProtocolError, match="carries KasminaCommand"):
        bus.publish(COMMANDS, _event(0))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="unknown topic"):
        bus.publish("nope", _event(0))
    with pytest.raises(ProtocolError, match="unknown topic"):
        bus.read("nope", "g")


def test_publish_keeps_order_and_round_trips(bus: Bus) -> None:
    envs = [bus.publish(EPOCH, _event(e)) for e in range(4)]
    assert [env.sequence for env in envs] == sorted(env.sequence for env in envs)
    assert len({env.message_id for env in envs}) == 4
    log = bus.log(EPOCH)
    assert [env.message_id for env in log] == [env.message_id for env in envs]
    assert [parse(EpochEvent, env.payload) for env in log] == [_event(e) for e in range(4)]
    assert bus.log(COMMANDS) == []


def test_subscribers_are_called_synchronously(bus: Bus) -> None:
    got: list[EpochEvent] = []
    bus.subscribe(EPOCH, got.append)
    bus.publish(EPOCH, _event(0))
    assert got == [_event(0)]  # before publish returned
    bus.publish(EPOCH, _event(1))
    assert got == [_event(0), _event(1)]


def test_groups_are_independent_and_start_at_the_beginning(bus: Bus) -> None:
    for e in range(3):
        bus.publish(EPOCH, _event(e))
    first = bus.read(EPOCH, "a", count=2)
    assert [m.epoch for _, m in first] == [0, 1]
    assert [m.epoch for _, m in bus.read(EPOCH, "b")] == [0, 1, 2]
    assert [m.epoch for _, m in bus.read(EPOCH, "a")] == [2]
    assert bus.read(EPOCH, "a") == []


def test_unacked_messages_stay_pending_and_are_redelivered(bus: Bus) -> None:
    for e in range(3):
        bus.publish(EPOCH, _event(e))
    got = bus.read(EPOCH, "a", count=2)
    bus.ack(EPOCH, "a", got[0][0])
    bus.ack(EPOCH, "a", got[0][0])  # acking twice is harmless
    assert bus.pending(EPOCH, "a") == 1
    again = bus.read(EPOCH, "a", redeliver=True)
    assert [m.epoch for _, m in again] == [1, 2]  # the consumer's pending one first, then the fresh one
    assert again[0][0] == got[1][0]
    for message_id, _ in again:
        bus.ack(EPOCH, "a", message_id)
    assert bus.pending(EPOCH, "a") == 0
    assert bus.read(EPOCH, "a", redeliver=True) == []


def test_consumers_of_a_group_share_the_work(bus: Bus) -> None:
    for i in range(6):
        bus.publish(COMMANDS, _command(i))
    a = bus.read(COMMANDS, "workers", count=4, consumer="a")
    b = bus.read(COMMANDS, "workers", count=4, consumer="b")
    assert [m.command_id for _, m in a] == ["c0", "c1", "c2", "c3"]
    assert [m.command_id for _, m in b] == ["c4", "c5"]
    # Redelivery hands a consumer only its own pending messages.
    assert [m.command_id for _, m in bus.read(COMMANDS, "workers", redeliver=True, consumer="b")] == ["c4", "c5"]


def test_a_dead_consumers_pending_messages_are_claimed(bus: Bus) -> None:
    for i in range(3):
        bus.publish(COMMANDS, _command(i))
    held = bus.read(COMMANDS, "workers", consumer="dead")
    bus.ack(COMMANDS, "workers", held[0][0])
    assert bus.claim(COMMANDS, "workers", "alive", min_idle_s=60.0) == []  # not idle long enough
    time.sleep(0.12)
    claimed = bus.claim(COMMANDS, "workers", "alive", min_idle_s=0.1)
    assert [m.command_id for _, m in claimed] == ["c1", "c2"]
    # Now they are the claimer's: its redelivery sees them, the dead consumer's does not.
    assert [m.command_id for _, m in bus.read(COMMANDS, "workers", redeliver=True, consumer="alive")] == ["c1", "c2"]
    assert bus.read(COMMANDS, "workers", redeliver=True, consumer="dead") == []
    for message_id, _ in claimed:
        bus.ack(COMMANDS, "workers", message_id)
    assert bus.pending(COMMANDS, "workers") == 0
    assert bus.claim(COMMANDS, "workers", "alive", min_idle_s=0.0) == []


def test_at_least_once_with_an_idempotent_handler_applies_each_message_once(bus: Bus) -> None:
    for i in range(5):
        bus.publish(COMMANDS, _command(i))
    applied: list[str] = []
    seen: set[str] = set()
    duplicates = 0

    def handle(cmd: KasminaCommand) -> None:  # idempotent: keyed by command id, like Kasmina's
        nonlocal duplicates
        if cmd.command_id in seen:
            duplicates += 1
            return
        seen.add(cmd.command_id)
        applied.append(cmd.command_id)

    # A consumer handles three messages but dies before acknowledging the last two of them.
    got = bus.read(COMMANDS, "g", count=3, consumer="w1")
    for _, cmd in got:
        handle(cmd)
    bus.ack(COMMANDS, "g", got[0][0])
    time.sleep(0.06)
    for message_id, cmd in bus.claim(COMMANDS, "g", "w2", min_idle_s=0.05) + bus.read(COMMANDS, "g", consumer="w2"):
        handle(cmd)
        bus.ack(COMMANDS, "g", message_id)
    assert applied == ["c0", "c1", "c2", "c3", "c4"]
    assert duplicates == 2
    assert bus.pending(COMMANDS, "g") == 0


def test_a_blocking_read_wakes_on_publish(bus: Bus) -> None:
    bus.read(EPOCH, "waiter")  # the group exists before the publisher starts
    timer = threading.Timer(0.1, lambda: bus.publish(EPOCH, _event(7)))
    timer.start()
    try:
        got = bus.read(EPOCH, "waiter", consumer="w", block_s=10.0)
    finally:
        timer.join()
    assert [m.epoch for _, m in got] == [7]
    assert bus.read(EPOCH, "waiter", consumer="w", block_s=0.05) == []


def test_malformed_frames_are_counted_not_raised(bus: Bus) -> None:
    ok = _command(1)
    assert bus.publish_raw(COMMANDS, ok.model_dump_json()) is not None
    assert bus.publish_raw(COMMANDS, '{"command_id": "c"}') is None
    assert bus.publish_raw(COMMANDS, b"\xff not json") is None
    assert bus.publish_raw(COMMANDS, {"command_id": "c", "kind": "EXPLODE", "seed_id": "s", "epoch": 1}) is None
    assert bus.rejected == 3
    assert [env.payload["command_id"] for env in bus.log(COMMANDS)] == ["c1"]
