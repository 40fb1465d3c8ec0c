"""Oona, the message bus: typed topics, consumer groups with acknowledgement; in-process by default, Redis Streams at
scale (`cambium.morph.redis_bus.RedisBus`, chosen by `REDIS_URL`). Both backends pass one contract suite
(tests/morph/bus_contract.py).

Each topic carries one contract. `publish` wraps it in a `BusMessage` envelope (topic, id, sequence, JSON payload)
and appends it to the topic's log. Two ways to consume, with the semantics of Redis Streams:

- `subscribe(topic, handler)`: the handler is called synchronously, in the publisher's thread, for every message
  published *through this bus object* (a local fan-out; the training loop relies on it being synchronous). Another
  process sees those messages through a consumer group, never through a subscription.
- consumer groups: `read(topic, group, consumer=...)` hands out messages not yet delivered to the group; each stays
  pending, owned by the consumer that read it, until `ack`. `read(..., redeliver=True)` first hands the consumer its own
  pending messages again; `claim(topic, group, consumer, min_idle_s)` takes over messages another consumer has held
  unacknowledged for at least `min_idle_s` (it died mid-job). Delivery is therefore at-least-once, and every handler
  is idempotent: Kasmina runs each command id once (the set is checkpointed) and keys compile outcomes by request id,
  the compile worker's kernels are content-addressed, the API's seed view keeps the latest report.

Frames arriving as raw JSON go through `publish_raw`, which rejects and counts malformed ones instead of raising into
the caller's loop; a malformed entry found in a stream is counted in `rejected`, acknowledged and skipped.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cambium.core.errors import ProtocolError
from cambium.morph.contracts import (
    BusMessage,
    CompilationRequest,
    Contract,
    EpochEvent,
    HealthSignal,
    KasminaCommand,
    KernelReady,
    parse,
)

__all__ = ["TOPICS", "Bus", "InProcessBus", "contract_of"]

TOPICS: dict[str, type[Contract]] = {
    "telemetry.seed.health": HealthSignal,
    "control.kasmina.commands": KasminaCommand,
    "compilation.blueprint.submitted": CompilationRequest,
    "compilation.kernel.ready": KernelReady,
    "system.events.epoch": EpochEvent,
}

Handler = Callable[[Any], None]
Delivery = tuple[str, Any]
"""(message_id, contract) as handed out by `read` and `claim`."""


def contract_of(topic: str) -> type[Contract]:
    if topic not in TOPICS:
        raise ProtocolError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
    return TOPICS[topic]


def check_message(topic: str, message: Contract) -> None:
    kind = contract_of(topic)
    if not isinstance(message, kind):
        raise ProtocolError(f"topic {topic!r} carries {kind.__name__}, got {type(message).__name__}")


class Bus(Protocol):
    """What every Oona backend offers (see the module docstring for the semantics)."""

    rejected: int

    def publish(self, topic: str, message: Contract) -> BusMessage: ...
    def publish_raw(self, topic: str, payload: str | bytes | dict[str, Any]) -> BusMessage | None: ...
    def subscribe(self, topic: str, handler: Handler) -> None: ...
    def read(self, topic: str, group: str, count: int = ..., redeliver: bool = ..., *, consumer: str = ...,
             block_s: float = ...) -> list[Delivery]: ...
    def claim(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = ...) -> list[Delivery]: ...
    def ack(self, topic: str, group: str, message_id: str) -> None: ...
    def pending(self, topic: str, group: str) -> int: ...
    def log(self, topic: str) -> list[BusMessage]: ...
    def close(self) -> None: ...


@dataclass
class _Pending:
    env: BusMessage
    consumer: str
    delivered_at: float
    deliveries: int


class LocalHandlers:
    """What every bus shares: handlers called synchronously in the publishing process (the training loop relies on
    it) and the count of malformed raw frames. `publish` is the backend's own; `_lock` guards the handler lists."""

    def __init__(self, lock: threading.Lock | threading.Condition) -> None:
        self._lock = lock
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self.rejected = 0

    def publish(self, topic: str, message: Contract) -> BusMessage:
        raise NotImplementedError

    def publish_raw(self, topic: str, payload: str | bytes | dict[str, Any]) -> BusMessage | None:
        """Publish a frame received as JSON; a malformed one is counted in `rejected` and dropped (None)."""
        try:
            message = parse(contract_of(topic), payload)
        except ProtocolError:
            with self._lock:
                self.rejected += 1
            return None
        return self.publish(topic, message)

    def subscribe(self, topic: str, handler: Handler) -> None:
        contract_of(topic)
        with self._lock:
            self._handlers[topic].append(handler)


class InProcessBus(LocalHandlers):
    """The embedded Oona: thread-safe, everything in memory."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        super().__init__(self._cond)
        self._log: dict[str, list[BusMessage]] = defaultdict(list)
        self._cursor: dict[tuple[str, str], int] = defaultdict(int)
        self._pending: dict[tuple[str, str], dict[str, _Pending]] = defaultdict(dict)
        self._ids = itertools.count()

    def publish(self, topic: str, message: Contract) -> BusMessage:
        check_message(topic, message)
        with self._cond:
            seq = next(self._ids)
            env = BusMessage(
                topic=topic, message_id=f"{seq}-0", sequence=seq, payload=message.model_dump(mode="json")
            )
            self._log[topic].append(env)
            handlers = list(self._handlers[topic])
            self._cond.notify_all()
        for handler in handlers:
            handler(message)
        return env

    def read(self, topic: str, group: str, count: int = 100, redeliver: bool = False, *, consumer: str = "main",
             block_s: float = 0.0) -> list[Delivery]:
        """Up to `count` (message_id, contract) pairs for `consumer` of `group`; they stay pending until acked.
        With nothing to hand out, waits up to `block_s` seconds for a new message."""
        kind = contract_of(topic)
        key = (topic, group)
        deadline = time.monotonic() + block_s
        with self._cond:
            while True:
                now = time.monotonic()
                out: list[BusMessage] = []
                if redeliver:
                    for p in self._pending[key].values():
                        if len(out) == count:
                            break
                        if p.consumer == consumer:
                            p.delivered_at, p.deliveries = now, p.deliveries + 1
                            out.append(p.env)
                log = self._log[topic]
                start = self._cursor[key]
                fresh = log[start : start + count - len(out)]
                self._cursor[key] = start + len(fresh)
                for env in fresh:
                    self._pending[key][env.message_id] = _Pending(env, consumer, now, 1)
                out.extend(fresh)
                if out or now >= deadline:
                    break
                self._cond.wait(deadline - now)
        return [(env.message_id, parse(kind, env.payload)) for env in out]

    def claim(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 100) -> list[Delivery]:
        """Take over up to `count` messages pending in `group` for at least `min_idle_s` seconds (any consumer's)."""
        kind = contract_of(topic)
        now = time.monotonic()
        out: list[BusMessage] = []
        with self._cond:
            for p in self._pending[(topic, group)].values():
                if len(out) == count:
                    break
                if now - p.delivered_at >= min_idle_s:
                    p.consumer, p.delivered_at, p.deliveries = consumer, now, p.deliveries + 1
                    out.append(p.env)
        return [(env.message_id, parse(kind, env.payload)) for env in out]

    def ack(self, topic: str, group: str, message_id: str) -> None:
        with self._cond:
            self._pending[(topic, group)].pop(message_id, None)

    def pending(self, topic: str, group: str) -> int:
        with self._cond:
            return len(self._pending[(topic, group)])

    def log(self, topic: str) -> list[BusMessage]:
        """Every message published on `topic` so far (for reports and tests)."""
        contract_of(topic)
        with self._cond:
            return list(self._log[topic])

    def close(self) -> None:
        """Nothing to release; present so callers treat every backend alike."""
