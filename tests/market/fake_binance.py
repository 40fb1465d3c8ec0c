"""A loopback HTTP server that answers like Binance's REST API from the committed real candles, with faults."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer


def spot_rows(path: Path) -> list[list[Any]]:
    """12-field REST kline arrays from the committed spot sample (values as the text in the file)."""
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()[1:]
    out = []
    for line in lines:
        f = line.split(",")
        close_time = int(f[6])
        out.append([close_time - 3_599_999, *f[1:6], close_time, f[7], int(f[8]), f[9], f[10], "0"])
    return out


def futures_rows(path: Path) -> list[list[Any]]:
    """REST kline arrays from the committed futures sample; it has no taker-buy volumes, sent as "0"."""
    with gzip.open(path, "rt") as fh:
        lines = fh.read().splitlines()[1:]
    return [[int(f[0]), *f[1:6], int(f[8]), f[6], int(f[7]), "0", "0", "0"] for f in (ln.split(",") for ln in lines)]


class FakeBinance:
    """Serves /api/v3/* and /fapi/v1/* klines, exchangeInfo and ticker/24hr on 127.0.0.1.

    `faults[k]` replaces the k-th request's answer (1-based): ("429", retry_after), ("418", retry_after),
    ("5xx", status), ("malformed",). The used weight of the current minute (by `clock`) is sent in
    X-MBX-USED-WEIGHT-1M; above `weight_limit` the server answers 429 like Binance.
    """

    def __init__(
        self,
        rows: dict[str, list[list[Any]]],
        *,
        exchange_info: bytes = b'{"rateLimits":[],"symbols":[]}',
        faults: dict[int, tuple[Any, ...]] | None = None,
        weight_limit: int | None = None,
        clock: Callable[[], float] = time.time,
        delay_s: float = 0.0,
    ) -> None:
        self.rows = rows
        self.exchange_info = exchange_info
        self.faults = faults or {}
        self.weight_limit = weight_limit
        self.clock = clock
        self.delay_s = delay_s
        self.log: list[tuple[str, dict[str, str], int, int]] = []
        self._lock = threading.Lock()
        self._used: dict[int, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._answer(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeBinance:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            k = len(self.log) + 1
            path = parts.path.split("/", 3)[-1]
            weight = 1
            if path == "klines":
                limit = int(q.get("limit", 500))
                weight = 2 if parts.path.startswith("/api") else (1 if limit < 100 else 2 if limit < 500 else
                                                                   5 if limit <= 1000 else 10)
            window = int(self.clock() // 60)
            used = self._used.get(window, 0) + weight
            self._used[window] = used
            fault = self.faults.get(k)
            status = 200
            if fault is None and self.weight_limit is not None and used > self.weight_limit:
                fault = ("429", (window + 1) * 60 - self.clock())
            if fault is not None:
                status = {"429": 429, "418": 418, "malformed": 200}.get(str(fault[0]), 0) or int(fault[1])
            self.log.append((parts.path, q, status, used))
        if self.delay_s:
            time.sleep(self.delay_s)
        headers = {"X-MBX-USED-WEIGHT-1M": str(used), "Content-Type": "application/json"}
        if fault is not None:
            kind = str(fault[0])
            if kind in ("429", "418"):
                headers["Retry-After"] = str(int(fault[1]))
                ban = int((self.clock() + fault[1]) * 1000)
                msg = (f"Way too much request weight used; IP banned until {ban}." if kind == "418"
                       else "Too much request weight used; current limit is 2400 request weight per 1 MINUTE.")
                return self._send(h, status, headers, orjson.dumps({"code": -1003, "msg": msg}))
            if kind == "malformed":
                return self._send(h, 200, headers, b'[[1714521600000,"60672.01","60841')
            return self._send(h, status, headers, b"<html>502 Bad Gateway</html>")
        if path == "klines":
            rows = self.rows.get(q["symbol"], [])
            start, end = int(q.get("startTime", 0)), int(q.get("endTime", 2**62))
            page = [r for r in rows if start <= r[0] <= end][: int(q.get("limit", 500))]
            return self._send(h, 200, headers, orjson.dumps(page))
        if path == "exchangeInfo":
            return self._send(h, 200, headers, self.exchange_info)
        if path == "ticker/24hr":
            body = [{"symbol": s, "quoteVolume": str(sum(float(r[7]) for r in rows[-24:]))}
                    for s, rows in self.rows.items()]
            return self._send(h, 200, headers, orjson.dumps(body))
        return self._send(h, 404, headers, b'{"code":-1100,"msg":"not found"}')

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


class RateLimitedStreams(ReplayServer):
    """The replay websocket server behind Binance's rate limits: the first handshakes are answered with the scripted
    HTTP refusals — (429 or 418, Retry-After header value or None), in order — the later ones are served.
    `handshakes` keeps (time.monotonic(), status) of every handshake: 101 for the served ones."""

    def __init__(self, records: list[Record], refusals: list[tuple[int, str | None]], **kw: Any) -> None:
        super().__init__(records, **kw)
        self.refusals = list(refusals)
        self.handshakes: list[tuple[float, int]] = []

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if not self.refusals:
            self.handshakes.append((time.monotonic(), 101))
            return super()._process_request(connection, request)
        status, retry_after = self.refusals.pop(0)
        self.handshakes.append((time.monotonic(), status))
        reason = "I'm a teapot" if status == 418 else "Too Many Requests"
        msg = ("Way too much request weight used; IP banned until 1714521600000." if status == 418
               else "Too many new connections.")
        body = orjson.dumps({"code": -1003, "msg": msg})
        headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return Response(status, reason, headers, body)
