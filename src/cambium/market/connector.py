"""The websocket connector: sharded combined-stream connections that survive disconnects, stalls and bans.

Generic over `Venue` (no venue branches here). Per shard, forever until stopped:

1. wait for the circuit breaker (open after N failed handshakes, half-open probe after a cool-down), for a rate-limit
   hold (below) and for the per-IP new-connection budget (shared by all shards);
2. connect to the shard's endpoint and (re)subscribe its streams with SUBSCRIBE messages, at most
   `control_messages_per_s` - 1 per second so the library's pings/pongs fit under the venue's per-connection cap;
3. receive: stamp every frame (wall and monotonic ns, shard id), decode it once, count and skip malformed frames,
   answer control errors by re-sending that subscription, push (Record, events) to the shared queue;
4. a watchdog closes the connection when no data frame came for `stale_after_s` (that shard only) or when it is
   `rotate_after_s` old (Binance cuts connections at 24 h);
5. wait a back-off delay (exponential, full jitter; reset after a connection that delivered data; none after a
   planned rotation) and go to 1.

A handshake answered HTTP 429 (too many requests) or 418 (this IP is banned) is a rate-limit incident: limits are per
IP, so every shard of the connector holds off until the `Retry-After` the server sent (for a 418 without one,
`ws.ban_backoff_s`; for a 429 without one, the usual back-off). The incident is counted in `ShardStats.incidents` (by
status) and logged once, as one line with its correlation id `incident_id`. Every log line about a connection carries
its `conn_id` (`cambium.core.progress.log_context`).

`Connector.unsubscribe(streams)` stops streams at run time (a symbol delisted): UNSUBSCRIBE on the open connection
within the same control budget, and the streams are never subscribed again on a reconnect.

`connect` is the websocket client: `cambium.market.ws_picows.connect` by default (`ws.client = "picows"`),
`websockets.asyncio.client.connect` for `ws.client = "websockets"`, or any function with the same keywords returning an
object with `send`, `close` and async iteration over frames. A client that is not websockets reports a refused
handshake by raising `limits.HandshakeRejected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from cambium.core.errors import ConfigError
from cambium.core.progress import correlation_id, log_context
from cambium.market.binance import ControlReply, MalformedFrame, Venue
from cambium.market.config import WsConfig
from cambium.market.events import MarketEvent
from cambium.market.limits import (
    Backoff,
    CircuitBreaker,
    Clock,
    HandshakeRejected,
    SlidingWindowLimiter,
    SystemClock,
    parse_retry_after,
    shard_streams,
)
from cambium.market.recorder import Record

__all__ = ["Connector", "Delivery", "ShardStats", "client_connect"]

log = logging.getLogger("cambium.market.connector")

Delivery = tuple[Record, list[MarketEvent]]
MAX_SUBSCRIBE_RETRIES = 3
RATE_LIMIT_STATUSES = (418, 429)


def _rejection(exc: BaseException) -> tuple[int, str | None] | None:
    """(HTTP status, Retry-After header) of a refused handshake, or None for other failures."""
    if isinstance(exc, HandshakeRejected):
        return exc.status, exc.headers.get("retry-after")
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code, exc.response.headers.get("Retry-After")
    return None


def client_connect(name: str) -> Callable[..., Any]:
    """The `connect` function of websocket client `name` (`ws.client`)."""
    if name == "websockets":
        return ws_connect
    if name == "picows":
        from cambium.market.ws_picows import connect

        return connect
    raise ConfigError(f"ws.client={name!r} is unknown; use 'websockets' or 'picows'")


@dataclass
class ShardStats:
    """Counters of one shard (also the input of the screener's observability metrics)."""

    shard: int
    endpoint: str
    streams: int
    connects: int = 0
    handshake_failures: int = 0
    disconnects: int = 0
    frames: int = 0
    malformed: int = 0
    malformed_by_reason: dict[str, int] = field(default_factory=dict)  # MalformedFrame.reason, or 'utf8'
    incidents: dict[str, int] = field(default_factory=dict)  # refused handshakes by HTTP status: '429', '418'
    control_sent: int = 0
    control_errors: int = 0
    stale_reconnects: int = 0
    rotations: int = 0
    errors: int = 0
    backoff_delays: list[float] = field(default_factory=list)
    connect_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    control_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))


def _count_malformed(stats: ShardStats, reason: str, sid: int, what: str, recv_ns: int) -> None:
    stats.malformed += 1
    stats.malformed_by_reason[reason] = stats.malformed_by_reason.get(reason, 0) + 1
    if stats.malformed & (stats.malformed - 1) == 0:  # the 1st, 2nd, 4th, ... : a trace without a flood
        log.warning("shard %d: malformed frame skipped (%d so far; reason %s): %s", sid, stats.malformed, reason,
                    what[:200], extra={"frame_recv_ns": recv_ns})  # the frame's receive stamp, as recorded


class _Shard:
    def __init__(self, sid: int, endpoint: str, streams: list[str], conn: Connector) -> None:
        self.sid = sid
        self.endpoint = endpoint
        self.streams = streams
        self.c = conn
        cfg = conn.cfg
        self.stats = ShardStats(sid, endpoint, len(streams))
        self.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_cap_s, conn.rng)
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_cooldown_s, conn.clock)
        self.last_data = 0.0
        self.blocked = False
        self.close_reason = ""
        self.live: tuple[Any, SlidingWindowLimiter] | None = None  # the open connection and its control budget

    async def run(self) -> None:
        c = self.c
        clock = c.clock
        url = c.venue.url(self.endpoint)
        while not c.stopping and self.streams:  # a shard whose streams were all unsubscribed is done
            while not self.breaker.allow():
                await clock.sleep(max(self.breaker.wait_time(), 1e-3))
            while (hold := c.hold_until - clock.monotonic()) > 0:
                await clock.sleep(hold)
            await c.connection_budget.acquire()
            try:
                delivered = await self._connection(url)
            except Exception:  # a bug must not silently kill the shard: log it, count it, reconnect
                log.exception("shard %d: unexpected error, reconnecting", self.sid)
                self.stats.errors += 1
                delivered = False
            if c.stopping:
                return
            if self.close_reason == "rotate":
                self.backoff.reset()
                continue
            if delivered:
                self.backoff.reset()
            delay = self.backoff.next()
            self.stats.backoff_delays.append(delay)
            await clock.sleep(delay)

    async def _connection(self, url: str) -> bool:
        with log_context(conn_id=f"{self.c.conn_tag}-{self.sid}-{self.stats.connects + 1}"):
            return await self._connection_logged(url)

    async def _connection_logged(self, url: str) -> bool:
        c = self.c
        cfg = c.cfg
        self.close_reason = ""
        self.stats.connects += 1
        self.stats.connect_times.append(c.clock.monotonic())
        try:
            ws = await c.connect(
                url,
                ping_interval=cfg.ping_interval_s,
                ping_timeout=cfg.ping_timeout_s,
                open_timeout=cfg.open_timeout_s,
                close_timeout=1.0,
                max_size=None,
                max_queue=None,
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            self.stats.handshake_failures += 1
            self.breaker.record_failure()
            rejected = _rejection(exc)
            if rejected is not None and rejected[0] in RATE_LIMIT_STATUSES:
                self._incident(url, *rejected)
            else:
                log.info("shard %d: connect to %s failed: %s", self.sid, url, exc)
            return False
        self.breaker.record_success()
        frames_before = self.stats.frames
        self.last_data = c.clock.monotonic()
        opened = self.last_data
        limiter = SlidingWindowLimiter(c.control_budget, 1.0, c.clock, min_interval=1.0 / c.control_budget)
        resend: asyncio.Queue[int] = asyncio.Queue()
        self.live = (ws, limiter)
        sub = asyncio.create_task(self._subscribe(ws, limiter, resend))
        dog = asyncio.create_task(self._watchdog(ws, opened))
        try:
            await self._receive(ws, resend)
        except ConnectionClosed:
            pass
        finally:
            self.live = None
            for task in (sub, dog):
                task.cancel()
            for task in (sub, dog):
                try:
                    await task
                except (asyncio.CancelledError, ConnectionClosed):
                    pass
                except Exception:
                    log.exception("shard %d: %s task failed", self.sid, task.get_name())
                    self.stats.errors += 1
            with contextlib.suppress(Exception):
                await ws.close()
        self.stats.disconnects += 1
        return self.stats.frames > frames_before

    def _incident(self, url: str, status: int, retry_after: str | None) -> None:
        """HTTP 429/418 on the handshake: count it, hold every shard off, log one line with a correlation id."""
        c = self.c
        wait = parse_retry_after(retry_after)
        if wait is None:
            wait = c.ban_backoff_s if status == 418 else self.backoff.delay(self.backoff.attempt)
        c.hold_until = max(c.hold_until, c.clock.monotonic() + wait)
        key = str(status)
        self.stats.incidents[key] = self.stats.incidents.get(key, 0) + 1
        log.warning("shard %d: websocket handshake refused with HTTP %d (%s); every shard holds off %.1f s",
                    self.sid, status, "IP banned" if status == 418 else "too many requests", wait,
                    extra={"event": "rate_limit_incident", "source": "ws", "incident_id": correlation_id(),
                           "status": status, "url": url, "retry_after": retry_after, "hold_s": round(wait, 3),
                           "shard": self.sid})

    async def _subscribe(self, ws: Any, limiter: SlidingWindowLimiter, resend: asyncio.Queue[int]) -> None:
        c = self.c
        chunks = [self.streams[i : i + c.cfg.streams_per_subscribe]
                  for i in range(0, len(self.streams), c.cfg.streams_per_subscribe)]
        pending: dict[int, tuple[list[str], int]] = {}
        queue: deque[tuple[list[str], int]] = deque((chunk, 0) for chunk in chunks)
        while True:
            while queue:
                chunk, tries = queue.popleft()
                wanted = set(self.streams)
                chunk = [s for s in chunk if s in wanted]  # unsubscribed meanwhile: never asked for again
                if not chunk:
                    continue
                await limiter.acquire()
                msg_id = c.next_id()
                pending[msg_id] = (chunk, tries)
                self.stats.control_sent += 1
                self.stats.control_times.append(c.clock.monotonic())
                await ws.send(c.venue.subscribe(chunk, msg_id))
            failed = await resend.get()
            if failed in pending:
                chunk, tries = pending.pop(failed)
                if tries + 1 > MAX_SUBSCRIBE_RETRIES:
                    log.warning("shard %d: subscription refused %d times, reconnecting", self.sid, tries + 1)
                    await ws.close(1000, "subscription refused")
                    return
                queue.append((chunk, tries + 1))

    async def unsubscribe(self, streams: set[str]) -> int:
        """Drop `streams` from this shard: UNSUBSCRIBE on the open connection (within the control budget), and never
        subscribed again on a reconnect. A shard left with no stream closes its connection and ends."""
        c = self.c
        gone = [s for s in self.streams if s in streams]
        if not gone:
            return 0
        self.streams = [s for s in self.streams if s not in streams]
        self.stats.streams = len(self.streams)
        if self.live is not None:
            ws, limiter = self.live
            with contextlib.suppress(ConnectionClosed):
                if not self.streams:
                    await ws.close(1000, "no streams left")
                    return len(gone)
                step = c.cfg.streams_per_subscribe
                for i in range(0, len(gone), step):
                    await limiter.acquire()
                    self.stats.control_sent += 1
                    self.stats.control_times.append(c.clock.monotonic())
                    await ws.send(c.venue.unsubscribe(gone[i : i + step], c.next_id()))
        return len(gone)

    async def _watchdog(self, ws: Any, opened: float) -> None:
        c = self.c
        cfg = c.cfg
        tick = max(1e-3, min(cfg.stale_after_s, cfg.rotate_after_s) / 4)
        while True:
            await c.clock.sleep(tick)
            now = c.clock.monotonic()
            if now - opened >= cfg.rotate_after_s:
                self.close_reason = "rotate"
                self.stats.rotations += 1
                await ws.close(1000, "rotation")
                return
            if not self.blocked and now - self.last_data >= cfg.stale_after_s:
                self.close_reason = "stale"
                self.stats.stale_reconnects += 1
                log.info("shard %d: no data for %.3f s, reconnecting", self.sid, now - self.last_data)
                await ws.close(1000, "stale")
                return

    async def _receive(self, ws: Any, resend: asyncio.Queue[int]) -> None:
        c = self.c
        stats = self.stats
        decode = c.venue.decode
        clock = c.clock
        queue = c.queue
        sid = self.sid
        async for frame in ws:
            recv_ns = clock.time_ns()
            mono_ns = clock.monotonic_ns()
            if isinstance(frame, bytes):
                try:
                    frame = frame.decode()
                except UnicodeDecodeError:
                    _count_malformed(stats, "utf8", sid, "not UTF-8 text", recv_ns)
                    continue
            try:
                out = decode(frame, recv_ns)
            except MalformedFrame as exc:
                _count_malformed(stats, exc.reason, sid, str(exc), recv_ns)
                continue
            if isinstance(out, ControlReply):
                if out.error is not None:
                    stats.control_errors += 1
                    log.warning("shard %d: control message %d refused: %s", sid, out.id, out.error)
                    resend.put_nowait(out.id)
                continue
            stats.frames += 1
            self.last_data = mono_ns / 1e9
            item = (Record(recv_ns, mono_ns, sid, frame), out)
            if queue.full():
                # A slow consumer is not a stale feed: the watchdog looks away while we wait for room.
                self.blocked = True
                try:
                    await queue.put(item)
                finally:
                    self.blocked = False
                    self.last_data = clock.monotonic()
            else:
                queue.put_nowait(item)


class Connector:
    """Streams of one venue over sharded connections; iterate `deliveries()` or `events()`.

    ``async with Connector(venue, streams, cfg) as conn: async for ev in conn.events(): ...``
    """

    def __init__(
        self,
        venue: Venue,
        streams: list[str],
        cfg: WsConfig | None = None,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        connection_budget: SlidingWindowLimiter | None = None,
        connect: Callable[..., Any] | None = None,
    ) -> None:
        """`connect` overrides the websocket client that `cfg.client` names."""
        self.venue = venue
        self.cfg = cfg or WsConfig()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.connect = connect or client_connect(self.cfg.client)
        self.hold_until = float("-inf")  # no shard connects before this (monotonic s): a 429/418 said so
        self.ban_backoff_s = self.cfg.ban_backoff_s
        self.conn_tag = correlation_id()[:8]  # conn_id = <conn_tag>-<shard>-<connection number>
        if not streams:
            raise ConfigError("the connector needs at least one stream name")
        cap = min(self.cfg.max_streams_per_connection, venue.max_streams_per_connection)
        self.plan = shard_streams(streams, venue.route, cap)
        # Pings and pongs count towards the venue's per-connection message cap: keep one slot for them.
        self.control_budget = max(1, int(venue.control_messages_per_s) - (1 if self.cfg.ping_interval_s else 0))
        self.connection_budget = connection_budget or SlidingWindowLimiter(
            self.cfg.new_connections_per_window, self.cfg.connection_window_s, self.clock
        )
        self.queue: asyncio.Queue[Delivery] = asyncio.Queue(self.cfg.queue_size)
        self.shards = [_Shard(i, ep, s, self) for i, (ep, s) in enumerate(self.plan)]
        self.stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._id = 0

    def next_id(self) -> int:
        self._id += 1
        return self._id

    @property
    def stats(self) -> list[ShardStats]:
        return [s.stats for s in self.shards]

    def breaker(self, shard: int) -> CircuitBreaker:
        return self.shards[shard].breaker

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(s.run(), name=f"shard-{s.sid}") for s in self.shards]

    async def stop(self) -> None:
        self.stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def unsubscribe(self, streams: Iterable[str]) -> int:
        """Stop `streams` at run time (a delisted symbol): UNSUBSCRIBE on the open connections, not resubscribed on a
        reconnect. Frames already in flight may still arrive. Returns how many of the streams were dropped."""
        wanted = set(streams)
        return sum([await shard.unsubscribe(wanted) for shard in self.shards])

    async def __aenter__(self) -> Connector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def deliveries(self) -> AsyncIterator[Delivery]:
        """(Record, events) per well-formed data frame, in receive order per shard."""
        while True:
            item = await self.queue.get()
            yield item

    async def events(self) -> AsyncIterator[MarketEvent]:
        while True:
            _, events = await self.queue.get()
            for ev in events:
                yield ev
