"""A local websocket server that serves a recording like Binance's combined streams, with fault injection.

Clients connect to ``ws://127.0.0.1:<port>/<endpoint>/stream[?streams=a/b]`` and subscribe with Binance control
messages (``{"method": "SUBSCRIBE", "params": [...], "id": n}``). The server sends the recorded frames of the
subscribed streams in recorded order, each frame text exactly as recorded. Delivery behaves like a live feed that
pauses while nobody listens: the server remembers, per stream, the last frame it sent, and a new connection carries on
after it. So a client that reconnects and resubscribes receives every recorded frame exactly once, and any loss is the
client's fault, which is what the connector tests check.

`serves(endpoint, stream)` mimics the 2026 USDⓈ-M split: a stream subscribed on an endpoint that does not serve it is
accepted but never sent (as Binance's legacy path silently sends no klines).

Faults (`Faults`, mutable while the server runs): drop each connection after N frames or after a random time in
[lo, hi] s, insert a malformed frame after every k-th frame or with probability p, a fixed delay per frame, a one-off
stall after N frames (for stale detection), refuse new connections (HTTP 503), answer every k-th control message with
an error, and disconnect clients that exceed the control-message rate like Binance does.

Bad control messages are answered as Binance answers them (``{"code": 3, "msg": "Invalid JSON", ...}`` for text that
is not a JSON object with an integer id, ``{"code": 2, "msg": "Invalid request: ..."}`` for an unknown method or
``params`` that are not a list of stream names), counted in `ServerStats.bad_requests`, and the connection stays open.
Recorded frames that are not combined-stream messages cannot be served; they are counted in `ServerStats.unservable`.

REST on the same port (plain HTTP GET, no websocket upgrade), for live mode's universe and depth snapshots:
``/fapi/v1/exchangeInfo`` answers `exchange_info` (e.g. `cambium.market.synthetic.exchange_info`), and
``/fapi/v1/depth?symbol=X`` answers `depth[X]` (raw JSON bytes), each with an ``X-MBX-USED-WEIGHT-1M`` header; an
unknown path or symbol is a 404 and a server without them answers 404 too. Counted in `ServerStats.rest_requests`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from cambium.market.recorder import Record

__all__ = ["Faults", "ReplayServer", "ServerStats"]

MAX_CONTROL_BYTES = 2**20  # a control message is a few hundred bytes; a larger one is closed with 1009 (too big)
MAX_PARAMS = 1024  # Binance's cap of streams per connection

MALFORMED = ('{"stream":"btcusdt@trade","data":{"e":"trade","E":1723', "not json at all", '{"stream":"x"}', "[1,2,3]")


@dataclass
class Faults:
    drop_after: int | None = None
    drop_every_s: tuple[float, float] | None = None
    malformed_every: int | None = None
    malformed_prob: float = 0.0
    delay_s: float = 0.0
    stall_after: int | None = None
    stall_s: float = 0.0
    stall_connections: int = 1
    refuse: bool = False
    refuse_next: int = 0
    control_error_every: int | None = None
    control_limit_per_s: float | None = None
    seed: int = 0


@dataclass
class ServerStats:
    attempts: int = 0
    refused: int = 0
    connections: int = 0
    frames_sent: int = 0
    malformed_sent: int = 0
    control_errors_sent: int = 0
    control_limit_kicks: int = 0
    stalls: int = 0
    bad_requests: int = 0
    unservable: int = 0
    rest_requests: int = 0
    control_log: list[tuple[int, float, Any]] = field(default_factory=list)
    attempt_times: list[float] = field(default_factory=list)
    subscribed: dict[int, set[str]] = field(default_factory=dict)
    connection_paths: list[str] = field(default_factory=list)
    sends: list[tuple[int, int]] = field(default_factory=list)  # (frame index, time.time_ns() after the send)


async def _reply_error(ws: ServerConnection, code: int, msg: str, rid: int | None) -> None:
    await ws.send(orjson.dumps({"code": code, "msg": msg, "id": rid}).decode())


class _Conn:
    def __init__(self, cid: int, endpoint: str) -> None:
        self.cid = cid
        self.endpoint = endpoint
        self.streams: set[str] = set()
        self.pos = 0
        self.wake = asyncio.Event()
        self.control_times: list[float] = []  # those of the last second, for the rate limit
        self.controls = 0


class ReplayServer:
    """Serve `records` on 127.0.0.1; use as ``async with ReplayServer(...) as srv: srv.url(endpoint)``."""

    def __init__(
        self,
        records: Sequence[Record],
        *,
        faults: Faults | None = None,
        speed: float | None = None,
        serves: Callable[[str, str], bool] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
        log_sends: bool = False,
        exchange_info: dict[str, Any] | None = None,
        depth: dict[str, bytes] | None = None,
    ) -> None:
        """`speed` paces frames at `speed` × recorded speed (None: as fast as the client reads); `log_sends` keeps
        (frame index, `time.time_ns()`) of every send in `stats.sends`, for latency benchmarks."""
        self.faults = faults or Faults()
        self.stats = ServerStats()
        self.speed = speed
        self.serves = serves
        self.host = host
        self.port = port
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.log_sends = log_sends
        self.exchange_info = None if exchange_info is None else orjson.dumps(exchange_info)
        self.depth = depth or {}
        self.frames: list[str] = []
        self.stream_of: list[str] = []
        self.mono: list[int] = []
        for rec in records:
            try:
                msg = orjson.loads(rec.frame)
            except orjson.JSONDecodeError:
                msg = None
            if isinstance(msg, dict) and isinstance(msg.get("stream"), str) and "data" in msg:
                self.frames.append(rec.frame)
                self.stream_of.append(msg["stream"])
                self.mono.append(rec.mono_ns)
            else:
                self.stats.unservable += 1
        self.sent_upto: dict[str, int] = {}
        self._server: Server | None = None
        self._cid = 0
        self._malformed_k = 0
        self._stalls_left = 0
        self._rng = random.Random(self.faults.seed)

    def frames_for(self, streams: set[str]) -> list[str]:
        """The frames a client subscribed to `streams` should receive, in order."""
        return [f for f, s in zip(self.frames, self.stream_of, strict=True) if s in streams]

    @property
    def address(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def url(self, endpoint: str = "") -> str:
        return f"{self.address}/{endpoint}" if endpoint else self.address

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._stalls_left = self.faults.stall_connections
        self._server = await serve(
            self._handler,
            self.host,
            self.port,
            process_request=self._process_request,
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            max_size=MAX_CONTROL_BYTES,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _rest(self, request: Request) -> Response:
        self.stats.rest_requests += 1
        parts = urlsplit(request.path)
        body: bytes | None = None
        if parts.path == "/fapi/v1/exchangeInfo":
            body = self.exchange_info
        elif parts.path == "/fapi/v1/depth":
            body = self.depth.get(parse_qs(parts.query).get("symbol", [""])[0])
        if body is None:
            body = b'{"code":-1121,"msg":"not served here"}'
            return Response(int(HTTPStatus.NOT_FOUND), "Not Found",
                            Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))]), body)
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                           ("X-MBX-USED-WEIGHT-1M", "1")])
        return Response(int(HTTPStatus.OK), "OK", headers, body)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.startswith("/fapi/") and "upgrade" not in request.headers.get("Connection", "").lower():
            return self._rest(request)
        self.stats.attempts += 1
        self.stats.attempt_times.append(time.monotonic())
        if self.faults.refuse or self.faults.refuse_next > 0:
            self.faults.refuse_next = max(0, self.faults.refuse_next - 1)
            self.stats.refused += 1
            return Response(int(HTTPStatus.SERVICE_UNAVAILABLE), "Service Unavailable", Headers(), b"refused\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        self._cid += 1
        self.stats.connections += 1
        parts = urlsplit(ws.request.path if ws.request else "/")
        self.stats.connection_paths.append(parts.path)
        endpoint = parts.path.strip("/").removesuffix("stream").strip("/")
        conn = _Conn(self._cid, endpoint)
        self.stats.subscribed[conn.cid] = conn.streams
        for value in parse_qs(parts.query).get("streams", []):
            self._subscribe(conn, [s for s in value.split("/") if s])
        sender = asyncio.create_task(self._send_loop(ws, conn))
        try:
            async for message in ws:
                await self._control(ws, conn, message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    def _subscribe(self, conn: _Conn, streams: list[str]) -> None:
        for s in streams:
            if self.serves is None or self.serves(conn.endpoint, s):
                conn.streams.add(s)
                conn.pos = min(conn.pos, self.sent_upto.get(s, -1) + 1)
        conn.wake.set()

    async def _control(self, ws: ServerConnection, conn: _Conn, message: str | bytes) -> None:
        now = time.monotonic()
        try:
            msg = orjson.loads(message)
        except orjson.JSONDecodeError:
            msg = None
        self.stats.control_log.append((conn.cid, now, msg))
        limit = self.faults.control_limit_per_s
        conn.controls += 1
        conn.control_times = [t for t in conn.control_times if now - t < 1.0] + [now]
        if limit is not None and len(conn.control_times) > limit:
            self.stats.control_limit_kicks += 1
            await ws.close(1008, "Too many requests")
            return
        if not isinstance(msg, dict) or type(msg.get("id")) is not int:
            self.stats.bad_requests += 1
            await ws.send(orjson.dumps({"code": 3, "msg": "Invalid JSON", "id": None}).decode())
            return
        k = self.faults.control_error_every
        if k and conn.controls % k == 0:
            self.stats.control_errors_sent += 1
            await ws.send(orjson.dumps({"code": 2, "msg": "Invalid request: injected", "id": msg["id"]}).decode())
            return
        method, params = msg.get("method"), msg.get("params")
        if params is None:
            params = []
        if method in ("SUBSCRIBE", "UNSUBSCRIBE") and not (
            isinstance(params, list) and len(params) <= MAX_PARAMS and all(isinstance(p, str) for p in params)
        ):
            self.stats.bad_requests += 1
            await _reply_error(ws, 2, f"Invalid request: params must be a list of at most {MAX_PARAMS} stream names",
                               msg["id"])
            return
        if method == "SUBSCRIBE":
            self._subscribe(conn, params)
            await ws.send(orjson.dumps({"result": None, "id": msg["id"]}).decode())
        elif method == "UNSUBSCRIBE":
            conn.streams.difference_update(params)
            await ws.send(orjson.dumps({"result": None, "id": msg["id"]}).decode())
        elif method == "LIST_SUBSCRIPTIONS":
            await ws.send(orjson.dumps({"result": sorted(conn.streams), "id": msg["id"]}).decode())
        else:
            self.stats.bad_requests += 1
            await _reply_error(ws, 2, f"Invalid request: {method!s:.60}", msg["id"])

    async def _send_loop(self, ws: ServerConnection, conn: _Conn) -> None:
        f = self.faults
        sent = 0
        start: tuple[float, int] | None = None
        loop = asyncio.get_running_loop()
        drop_at = loop.time() + self._rng.uniform(*f.drop_every_s) if f.drop_every_s else None
        while True:
            i = self._next_index(conn)
            if i is None:
                conn.wake.clear()
                await conn.wake.wait()
                continue
            if self.speed is not None:
                # Due times count from the connection's first frame, so many tiny pauses do not add up to drift;
                # waits under 1 ms are not worth a trip through the event loop.
                if start is None:
                    start = (loop.time(), self.mono[i])
                wait = start[0] + (self.mono[i] - start[1]) / 1e9 / self.speed - loop.time()
                if wait > 1e-3:
                    await asyncio.sleep(wait)
            if f.delay_s:
                await asyncio.sleep(f.delay_s)
            stream = self.stream_of[i]
            await ws.send(self.frames[i])
            if self.log_sends:
                self.stats.sends.append((i, time.time_ns()))
            self.sent_upto[stream] = i
            if conn.pos == i:  # unless a SUBSCRIBE during the awaits above rewound it to older frames
                conn.pos = i + 1
            sent += 1
            self.stats.frames_sent += 1
            if (f.malformed_every and sent % f.malformed_every == 0) or (
                f.malformed_prob and self._rng.random() < f.malformed_prob
            ):
                await ws.send(MALFORMED[self._malformed_k % len(MALFORMED)])
                self._malformed_k += 1
                self.stats.malformed_sent += 1
            if f.stall_after is not None and sent == f.stall_after and self._stalls_left > 0:
                self._stalls_left -= 1
                self.stats.stalls += 1
                await asyncio.sleep(f.stall_s)
            if (f.drop_after is not None and sent >= f.drop_after) or (drop_at is not None and loop.time() >= drop_at):
                await ws.close(1001, "going away (injected drop)")
                return

    def _next_index(self, conn: _Conn) -> int | None:
        i = conn.pos
        n = len(self.frames)
        streams, stream_of, sent_upto = conn.streams, self.stream_of, self.sent_upto
        while i < n:
            s = stream_of[i]
            if s in streams and i > sent_upto.get(s, -1):
                conn.pos = i
                return i
            i += 1
        conn.pos = n
        return None
