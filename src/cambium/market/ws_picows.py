"""picows as the connector's websocket client (`ws.client = "picows"`): the `connect` the connector calls, returning an
object with the part of the websockets client API the connector uses (`send`, `close`, async iteration of messages).

picows parses frames in Cython and calls a listener per frame; `PicowsConnection` turns that into an async iterator:
frames go into a deque and wake the iterating task. Text messages are yielded as str (one that is not valid UTF-8 as
bytes, which the connector counts as a malformed frame), binary ones as bytes; fragmented messages are reassembled
(capped by `max_size`). Server pings are answered by picows; client pings are picows' periodic auto-ping
(`ping_interval`; closed when no pong comes in `ping_timeout`, which picows caps at `ping_interval`). `close` runs the
closing handshake, so frames the server sent before its CLOSE are still iterated. A refused handshake raises
`limits.HandshakeRejected` with the HTTP status and headers, other protocol failures an `OSError`, a handshake that
takes longer than `open_timeout` a `TimeoutError`: the three kinds the connector counts as failed connects.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSError,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from cambium.market.limits import HandshakeRejected

__all__ = ["PicowsConnection", "connect"]

DEFAULT_MAX_SIZE = 64 * 2**20


class PicowsConnection(WSListener):
    """One client connection: picows calls `on_ws_frame`, the connector iterates, `send`s and `close`s."""

    def __init__(self, max_size: int | None, close_timeout: float | None) -> None:
        super().__init__()
        self.max_size = max_size or DEFAULT_MAX_SIZE
        self.close_timeout = close_timeout or 1.0
        self.transport: WSTransport | None = None
        self._messages: deque[str | bytes] = deque()
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self.close_code: int | None = None

    # -- picows callbacks ---------------------------------------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT and frame.fin:
            try:
                self._push(frame.get_payload_as_utf8_text())
            except UnicodeDecodeError:  # the connector counts it: malformed, reason 'utf8'
                self._push(frame.get_payload_as_bytes())
        elif kind == WSMsgType.TEXT or kind == WSMsgType.BINARY:
            if frame.fin:
                self._push(frame.get_payload_as_bytes())
            else:
                self._parts = [frame.get_payload_as_bytes()]
                self._parts_size = len(self._parts[0])
        elif kind == WSMsgType.CONTINUATION:
            self._parts.append(frame.get_payload_as_bytes())
            self._parts_size += frame.payload_size
            if self._parts_size > self.max_size:
                transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
                transport.disconnect()
                return
            if frame.fin:
                self._push(b"".join(self._parts))
                self._parts, self._parts_size = [], 0
        elif kind == WSMsgType.CLOSE:
            code = frame.get_close_code()
            self.close_code = int(code.value) if isinstance(code, WSCloseCode) else code
            transport.send_close(code)
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._closed = True
        self._wake()

    # -- what the connector uses --------------------------------------------------------------------------------------
    def _push(self, message: str | bytes) -> None:
        self._messages.append(message)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> PicowsConnection:
        return self

    async def __anext__(self) -> str | bytes:
        while not self._messages:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()

    async def send(self, message: str | bytes) -> None:
        if self.transport is None or self._closed:
            return
        if isinstance(message, str):
            self.transport.send(WSMsgType.TEXT, message.encode())
        else:
            self.transport.send(WSMsgType.BINARY, message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        # The closing handshake, as websockets does it: frames the server sent before its CLOSE are still received
        # (and iterated); dropping the socket at once would lose them.
        transport.send_close(WSCloseCode(code), reason.encode()[:123])
        try:
            await asyncio.wait_for(transport.wait_disconnected(), self.close_timeout)
        except (TimeoutError, WSError):
            transport.disconnect()
        self._closed = True
        self._wake()


async def connect(url: str, *, ping_interval: float | None = None, ping_timeout: float | None = None,
                  open_timeout: float | None = 10.0, close_timeout: float | None = None, max_size: int | None = None,
                  max_queue: int | None = None) -> PicowsConnection:
    """Open `url` with picows; the keywords are those the connector passes to websockets' `connect`
    (`max_queue` is accepted and not used: the queue is unbounded, as the connector asks with max_queue=None)."""
    del max_queue
    pinging: dict[str, Any] = {}
    if ping_interval:
        pinging = {"enable_auto_ping": True, "auto_ping_idle_timeout": ping_interval,
                   # picows wants the pong within the ping period: ping_timeout is capped at ping_interval
                   "auto_ping_reply_timeout": min(ping_timeout or ping_interval, ping_interval),
                   "auto_ping_strategy": WSAutoPingStrategy.PING_PERIODICALLY}
    try:
        _, listener = await ws_connect(lambda: PicowsConnection(max_size, close_timeout), url,
                                       websocket_handshake_timeout=open_timeout,
                                       max_frame_size=max_size or DEFAULT_MAX_SIZE, max_redirects=0, **pinging)
    except WSInvalidStatusError as exc:
        response = exc.response
        if response is None:
            raise OSError(f"websocket handshake with {url} refused: {exc}") from None
        raise HandshakeRejected(int(response.status), {str(k): str(v) for k, v in response.headers.items()}) from None
    except WSError as exc:
        raise OSError(f"websocket handshake with {url} failed: {exc}") from None
    assert isinstance(listener, PicowsConnection)
    return listener
