"""Oona, the message bus: typed topics, consumer groups with acknowledgement, in-process by default.

Each topic carries one contract. `publish` wraps it in a `BusMessage` envelope (topic, id, sequence, JSON payload)
and appends it to the topic's log; consumers either subscribe a callback (called synchronously, in the publisher's
thread) or read through a consumer group, which mirrors Redis Streams: `read` hands out messages not yet delivered
to the group, they stay pending until `ack`, and `read(..., redeliver=True)` hands pending ones out again
(at-least-once; handlers dedupe by message id). Frames arriving as raw JSON go through `publish_raw`, which rejects
and counts malformed ones instead of raising into the caller's loop.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from collections.abc import Callable
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

__all__ = ["TOPICS", "Bus", "InProcessBus"]

TOPICS: dict[str, type[Contract]] = {
    "telemetry.seed.health": HealthSignal,
    "control.kasmina.commands": KasminaCommand,
    "compilation.blueprint.submitted": CompilationRequest,
    "compilation.kernel.ready": KernelReady,
    "system.events.epoch": EpochEvent,
}

Handler = Callable[[Any], None]


class Bus(Protocol):
    def publish(self, topic: str, message: Contract) -> BusMessage: ...
    def subscribe(self, topic: str, handler: Handler) -> None: ...
    def read(self, topic: str, group: str, count: int = ..., redeliver: bool = ...) -> list[tuple[str, Any]]: ...
    def ack(self, topic: str, group: str, message_id: str) -> None: ...


class InProcessBus:
    """The embedded Oona: thread-safe, everything in memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._log: dict[str, list[BusMessage]] = defaultdict(list)
        self._cursor: dict[tuple[str, str], int] = defaultdict(int)
        self._pending: dict[tuple[str, str], dict[str, BusMessage]] = defaultdict(dict)
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._ids = itertools.count()
        self.rejected = 0

    @staticmethod
    def _contract(topic: str) -> type[Contract]:
        if topic not in TOPICS:
            raise ProtocolError(f"unknown topic {topic!r}; topics: {', '.join(TOPICS)}")
        return TOPICS[topic]

    def publish(self, topic: str, message: Contract) -> BusMessage:
        kind = self._contract(topic)
        if not isinstance(message, kind):
            raise ProtocolError(f"topic {topic!r} carries {kind.__name__}, got {type(message).__name__}")
        with self._lock:
            seq = next(self._ids)
            env = BusMessage(
                topic=topic, message_id=f"{seq}-0", sequence=seq, payload=message.model_dump(mode="json")
            )
            self._log[topic].append(env)
            handlers = list(self._handlers[topic])
        for handler in handlers:
            handler(message)
        return env

    def publish_raw(self, topic: str, payload: str | bytes | dict[str, Any]) -> BusMessage | None:
        """Publish a frame received as JSON; a malformed one is counted in `rejected` and dropped (None)."""
        try:
            message = parse(self._contract(topic), payload)
        except ProtocolError:
            with self._lock:
                self.rejected += 1
            return None
        return self.publish(topic, message)

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._contract(topic)
        with self._lock:
            self._handlers[topic].append(handler)

    def read(self, topic: str, group: str, count: int = 100, redeliver: bool = False) -> list[tuple[str, Any]]:
        """Up to `count` (message_id, contract) pairs for `group`; they stay pending until acked."""
        kind = self._contract(topic)
        key = (topic, group)
        with self._lock:
            out: list[BusMessage] = list(self._pending[key].values())[:count] if redeliver else []
            log = self._log[topic]
            start = self._cursor[key]
            fresh = log[start : start + count - len(out)]
            self._cursor[key] = start + len(fresh)
            for env in fresh:
                self._pending[key][env.message_id] = env
            out.extend(fresh)
        return [(env.message_id, parse(kind, env.payload)) for env in out]

    def ack(self, topic: str, group: str, message_id: str) -> None:
        with self._lock:
            self._pending[(topic, group)].pop(message_id, None)

    def pending(self, topic: str, group: str) -> int:
        with self._lock:
            return len(self._pending[(topic, group)])

    def log(self, topic: str) -> list[BusMessage]:
        """Every message published on `topic` so far (for reports and tests)."""
        with self._lock:
            return list(self._log[topic])
