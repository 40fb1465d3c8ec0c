"""Oona on Redis Streams (`REDIS_URL`): one stream per topic, consumer groups, acknowledgement, pending-entry reclaim.

Same semantics as `InProcessBus` (see cambium.morph.bus); the mapping is direct:

    publish            XADD <ns>:<topic> * seq <n> payload <json>   (seq from INCR <ns>:seq, atomically, in one script)
    read               XREADGROUP GROUP g c  [id 0 → the consumer's own pending, if redeliver]  then  id >
    claim              XAUTOCLAIM <stream> g c <min_idle_ms> 0-0     (messages a dead consumer held)
    ack / pending      XACK / XPENDING
    log                XRANGE <stream> - +
    retention          XTRIM <stream> MINID <cut>   (in the publish script; see below)

Retention (`bus.retention` = N, 0 = keep everything): when a stream holds more than N + N/10 entries, the publish
script trims it to its N newest, but never past an entry that an existing consumer group has not acknowledged or
not yet been handed: the cut is the oldest of (the N-th newest entry, each group's oldest pending entry, or — with
nothing pending — its last-delivered entry). So an un-acked message is never lost to trimming, and a stream whose
groups keep up stays within about 1.1 N entries. The trade-off: a group that stops reading (a dead consumer nobody
reclaims for, an API gateway that went away without deleting its group) holds the floor, and the stream then grows
by that group's backlog rather than staying bounded (XINFO GROUPS shows the culprit; `XGROUP DESTROY` releases it).
A group created after a trim starts at the retained tail, and `log` shows only the retained tail. Redis's own
`XADD MAXLEN ~` was not used because it deletes entries whether or not they were acknowledged.

Groups are created at the start of the stream (id 0, like a new in-process group) the first time they are used. An
entry that is not a valid envelope or contract (written by something else, or damaged) is counted in `rejected`,
acknowledged so it does not stay pending forever, and skipped. Connection failures raise `BackendError` naming the
server, never a redis-py traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cambium.core.errors import ProtocolError
from cambium.morph.bus import Delivery, LocalHandlers, check_message, contract_of
from cambium.morph.contracts import BusMessage, Contract, parse
from cambium.morph.errors import BackendError, redact

__all__ = ["RedisBus"]

_PUBLISH = """
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local seq = redis.call('INCR', KEYS[2]) - 1
local id = redis.call('XADD', KEYS[1], '*', 'seq', seq, 'payload', ARGV[1])
local keep = tonumber(ARGV[2])
if keep > 0 and redis.call('XLEN', KEYS[1]) > keep + math.max(math.floor(keep / 10), 1) then
  local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', keep)
  local cut = newest[#newest][1]
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local floor = info['last-delivered-id']
    if tonumber(info['pending']) > 0 then
      floor = redis.call('XPENDING', KEYS[1], info['name'])[2]
    end
    if older(floor, cut) then cut = floor end
  end
  redis.call('XTRIM', KEYS[1], 'MINID', cut)
end
return {seq, id}
"""


class RedisBus(LocalHandlers):
    """Oona over Redis Streams. `namespace` prefixes every key, so runs (and tests) can share one server."""

    def __init__(self, url: str, *, namespace: str = "oona", timeout_s: float = 5.0, retention: int = 0) -> None:
        """`retention`: the entries a stream keeps once every group has acknowledged older ones (0: all)."""
        if retention < 0:
            raise BackendError(f"bus retention={retention} must be >= 0 (0 keeps every entry)")
        self.url = url
        self.namespace = namespace
        self.retention = retention
        try:
            self._r: Any = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise BackendError(f"REDIS_URL={redact(url)!r} is not a Redis URL: {exc}") from None
        self._publish = self._r.register_script(_PUBLISH)
        self._groups: set[tuple[str, str]] = set()
        super().__init__(threading.Lock())

    @contextmanager
    def _server(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendError(f"Redis at {redact(self.url)} is unreachable while {doing}: {exc}; start redis-server "
                               "or unset REDIS_URL to use the in-process bus") from None
        except RedisError as exc:
            raise BackendError(f"Redis at {redact(self.url)} refused {doing}: {exc}") from None

    def _key(self, topic: str) -> str:
        return f"{self.namespace}:{topic}"

    def ping(self) -> bool:
        with self._server("pinging"):
            return bool(self._r.ping())

    def publish(self, topic: str, message: Contract) -> BusMessage:
        check_message(topic, message)
        with self._server(f"publishing on {topic}"):
            seq, raw_id = self._publish(keys=[self._key(topic), f"{self.namespace}:seq"],
                                        args=[message.model_dump_json(), self.retention])
        env = BusMessage(topic=topic, message_id=_text(raw_id), sequence=int(seq),
                         payload=message.model_dump(mode="json"))
        with self._lock:
            handlers = list(self._handlers[topic])
        for handler in handlers:
            handler(message)
        return env

    def _ensure_group(self, topic: str, group: str) -> None:
        if (topic, group) in self._groups:
            return
        with self._server(f"creating group {group!r} on {topic}"):
            try:
                self._r.xgroup_create(self._key(topic), group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups.add((topic, group))

    def read(self, topic: str, group: str, count: int = 100, redeliver: bool = False, *, consumer: str = "main",
             block_s: float = 0.0) -> list[Delivery]:
        """Up to `count` (message_id, contract) pairs for `consumer` of `group`; they stay pending until acked.
        With nothing to hand out, waits up to `block_s` seconds for a new message."""
        contract_of(topic)
        self._ensure_group(topic, group)
        key = self._key(topic)
        out: list[Delivery] = []
        with self._server(f"reading {topic} for group {group!r}"):
            if redeliver:
                for _, entries in self._r.xreadgroup(group, consumer, {key: "0"}, count=count) or []:
                    out.extend(self._decode(topic, group, entries))
            if len(out) < count:
                block = int(block_s * 1000) if block_s > 0 and not out else None
                for _, entries in self._r.xreadgroup(group, consumer, {key: ">"}, count=count - len(out),
                                                     block=block) or []:
                    out.extend(self._decode(topic, group, entries))
        return out

    def claim(self, topic: str, group: str, consumer: str, min_idle_s: float, count: int = 100) -> list[Delivery]:
        """Take over up to `count` messages pending in `group` for at least `min_idle_s` seconds (any consumer's)."""
        contract_of(topic)
        self._ensure_group(topic, group)
        out: list[Delivery] = []
        start = "0-0"
        with self._server(f"claiming pending {topic} messages of group {group!r}"):
            while len(out) < count:
                reply = self._r.xautoclaim(self._key(topic), group, consumer, int(min_idle_s * 1000), start,
                                           count=count - len(out))
                start, entries = _text(reply[0]), reply[1]
                out.extend(self._decode(topic, group, entries))
                if start == "0-0":
                    break
        return out

    def _decode(self, topic: str, group: str, entries: list[Any]) -> list[Delivery]:
        kind = contract_of(topic)
        out: list[Delivery] = []
        for raw_id, fields in entries:
            message_id = _text(raw_id)
            try:
                if not fields or b"payload" not in fields:
                    raise ProtocolError("entry has no payload field")
                out.append((message_id, parse(kind, fields[b"payload"])))
            except ProtocolError:
                with self._lock:
                    self.rejected += 1
                self._r.xack(self._key(topic), group, message_id)
        return out

    def ack(self, topic: str, group: str, message_id: str) -> None:
        with self._server(f"acknowledging {message_id} on {topic}"):
            self._r.xack(self._key(topic), group, message_id)

    def pending(self, topic: str, group: str) -> int:
        self._ensure_group(topic, group)
        with self._server(f"counting pending {topic} messages"):
            return int(self._r.xpending(self._key(topic), group)["pending"])

    def log(self, topic: str) -> list[BusMessage]:
        """Every message on `topic`'s stream (for reports and tests); malformed entries are left out."""
        kind = contract_of(topic)
        with self._server(f"reading the {topic} stream"):
            entries = self._r.xrange(self._key(topic))
        out = []
        for raw_id, fields in entries:
            try:
                message = parse(kind, fields.get(b"payload", b""))
                seq = int(fields.get(b"seq", b"-1"))
            except (ProtocolError, ValueError):
                continue
            out.append(BusMessage(topic=topic, message_id=_text(raw_id), sequence=max(seq, 0),
                                  payload=message.model_dump(mode="json")))
        return out

    def close(self) -> None:
        self._r.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
