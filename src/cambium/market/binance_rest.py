"""Binance REST client (httpx) for market data: klines, exchangeInfo and 24 h tickers, spot and USDⓈ-M futures.

Rate limits are per IP and counted in request weight. The client reads ``X-MBX-USED-WEIGHT-1M`` from every response
and, before each request, waits for the next minute window if the request would take the used weight over
`weight_fraction` of the limit (the limit comes from exchangeInfo's REQUEST_WEIGHT entry once it has been fetched).
On 429 it sleeps ``Retry-After`` seconds, halves its own budget for the rest of the run and retries; on 418 (IP
banned) it stops at once, records an incident and raises `IpBanned` with the unban time (Retry-After, else the time
in the body, else 120 s: Binance's shortest ban); 5xx, transport errors and
malformed bodies are retried up to `max_retries` with the connector's exponential back-off with full jitter
(`limits.Backoff`), so parallel downloaders do not retry in lockstep. Clock, sleep and the jitter's random source are
injectable so tests never wait.

Every 429/418 is an incident: counted in `incident_counts` (by status, read by the screener's metrics), kept in
`incidents` (and appended to `incident_log` when given), and logged as one line (JSON under `setup_logging`'s JSON
mode) that carries its correlation id `incident_id`, also in the record and in the IpBanned message.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from cambium.core.errors import ProtocolError
from cambium.core.progress import correlation_id
from cambium.market.config import RestConfig
from cambium.market.limits import Backoff, parse_retry_after

__all__ = ["IpBanned", "RestClient", "SymbolInfo", "futures_kline_weight", "parse_exchange_info"]

_BAN_RE = re.compile(r"banned until (\d{12,15})")
BAN_DEFAULT_S = 120.0  # a 418 without Retry-After: Binance's bans last 2 minutes to 3 days

log = logging.getLogger("cambium.market.rest")


class IpBanned(ProtocolError):
    """HTTP 418: the IP is banned; nothing may be requested before `until_ms`."""

    def __init__(self, message: str, retry_after_s: float, until_ms: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.until_ms = until_ms


@dataclass(frozen=True)
class SymbolInfo:
    """Symbol metadata from exchangeInfo."""

    symbol: str
    status: str
    base_asset: str
    quote_asset: str
    contract_type: str | None
    tick_size: float | None
    step_size: float | None
    min_qty: float | None


def parse_exchange_info(body: dict[str, Any]) -> tuple[dict[str, SymbolInfo], int | None]:
    """(symbol → SymbolInfo, REQUEST_WEIGHT per minute or None) from an exchangeInfo body."""
    out: dict[str, SymbolInfo] = {}
    try:
        for s in body["symbols"]:
            filters = {f["filterType"]: f for f in s.get("filters", [])}
            price = filters.get("PRICE_FILTER", {})
            lot = filters.get("LOT_SIZE", {})
            out[s["symbol"]] = SymbolInfo(
                symbol=s["symbol"],
                status=s["status"],
                base_asset=s["baseAsset"],
                quote_asset=s["quoteAsset"],
                contract_type=s.get("contractType"),
                tick_size=float(price["tickSize"]) if "tickSize" in price else None,
                step_size=float(lot["stepSize"]) if "stepSize" in lot else None,
                min_qty=float(lot["minQty"]) if "minQty" in lot else None,
            )
        limit = None
        for r in body.get("rateLimits", []):
            if r["rateLimitType"] == "REQUEST_WEIGHT":
                seconds = {"SECOND": 1, "MINUTE": 60, "HOUR": 3600, "DAY": 86400}[r["interval"]] * r["intervalNum"]
                if seconds == 60:
                    limit = int(r["limit"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"exchangeInfo body does not have the documented layout: {exc!r}") from None
    return out, limit


def futures_kline_weight(limit: int) -> int:
    """Documented weight of /fapi/v1/klines by `limit`: [1,100) 1, [100,500) 2, [500,1000] 5, above 10."""
    if limit < 100:
        return 1
    if limit < 500:
        return 2
    if limit <= 1000:
        return 5
    return 10


class RestClient:
    """Synchronous client of one Binance REST market ("spot" or "futures")."""

    def __init__(
        self,
        market: str,
        cfg: RestConfig | None = None,
        *,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        incident_log: str | Path | None = None,
        transport: httpx.BaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if market not in ("spot", "futures"):
            raise ProtocolError(f"market {market!r} is unknown; use 'spot' or 'futures'")
        self.market = market
        self.cfg = cfg or RestConfig()
        base = self.cfg.spot_url if market == "spot" else self.cfg.futures_url
        self.prefix = "/api/v3" if market == "spot" else "/fapi/v1"
        self.http = httpx.Client(base_url=base, timeout=self.cfg.timeout_s, transport=transport)
        self.wall = wall
        self.sleep = sleep
        self.backoff = Backoff(self.cfg.backoff_base_s, self.cfg.backoff_cap_s, rng or random.Random())
        self.incident_log = Path(incident_log) if incident_log else None
        self.weight_limit = 6000 if market == "spot" else 2400
        self.budget_scale = 1.0
        self.used_weight = 0
        self._window = -1
        self.requests = 0
        self.incidents: list[dict[str, Any]] = []
        self.incident_counts: Counter[str] = Counter()
        self.slept: list[tuple[str, float]] = []

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def budget(self) -> float:
        return self.weight_limit * self.cfg.weight_fraction * self.budget_scale

    def _pause(self, why: str, seconds: float) -> None:
        self.slept.append((why, seconds))
        self.sleep(seconds)

    def _incident(self, status: int, url: str, retry_after: float | None, msg: str) -> str:
        incident_id = correlation_id()
        rec = {"time": self.wall(), "incident_id": incident_id, "status": status, "url": url,
               "retry_after_s": retry_after, "msg": msg}
        self.incidents.append(rec)
        self.incident_counts[str(status)] += 1
        log.warning("REST rate-limit incident: HTTP %d from %s, retry after %s s", status, url, retry_after,
                    extra={"event": "rate_limit_incident", "source": "rest", "incident_id": incident_id,
                           "status": status, "url": url, "retry_after_s": retry_after})
        if self.incident_log is not None:
            self.incident_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.incident_log, "ab") as fh:
                fh.write(orjson.dumps(rec) + b"\n")
        return incident_id

    def _wait_for_weight(self, weight: int) -> None:
        window = int(self.wall() // 60)
        if window != self._window:
            self._window, self.used_weight = window, 0
        if self.used_weight + weight > self.budget:
            wait = (window + 1) * 60 - self.wall()
            self._pause("weight", max(wait, 0.0))
            self._window, self.used_weight = int(self.wall() // 60), 0

    def get(self, path: str, params: dict[str, Any] | None = None, *, weight: int = 1) -> Any:
        """GET `prefix + path` and return the parsed JSON body, applying the rules in the module docstring."""
        url = self.prefix + path
        attempt = 0
        while True:
            self._wait_for_weight(weight)
            self.requests += 1
            try:
                resp = self.http.get(url, params=params)
            except httpx.TransportError as exc:
                problem = f"transport error {type(exc).__name__}: {exc}"
            else:
                used = resp.headers.get("x-mbx-used-weight-1m")
                if used is not None and used.isdigit():
                    self.used_weight = int(used)
                else:
                    self.used_weight += weight
                status = resp.status_code
                if status == 200:
                    try:
                        return orjson.loads(resp.content)
                    except orjson.JSONDecodeError as exc:
                        problem = f"malformed JSON body ({exc})"
                elif status == 418:
                    m = _BAN_RE.search(resp.text)
                    ban_s = _retry_after(resp, self.wall())
                    if ban_s is None:
                        ban_s = max(0.0, int(m.group(1)) / 1000 - self.wall()) if m else BAN_DEFAULT_S
                    until = int(m.group(1)) if m else int((self.wall() + ban_s) * 1000)
                    incident = self._incident(418, str(resp.url), ban_s, resp.text[:300])
                    raise IpBanned(
                        f"HTTP 418 from {resp.url}: this IP is banned for {ban_s:.0f} s (until epoch ms {until}); "
                        f"stop all requests to Binance from this IP until then (incident {incident})",
                        ban_s,
                        until,
                    )
                elif status == 429:
                    retry = _retry_after(resp, self.wall())
                    self._incident(429, str(resp.url), retry, resp.text[:300])
                    self.budget_scale = max(0.05, self.budget_scale / 2)
                    self._pause("429", retry if retry is not None else self._backoff(attempt))
                    attempt += 1
                    if attempt > self.cfg.max_retries:
                        raise ProtocolError(f"HTTP 429 from {resp.url} {attempt} times in a row; giving up")
                    continue
                elif status >= 500:
                    problem = f"HTTP {status}"
                else:
                    raise ProtocolError(f"HTTP {status} from {resp.url}: {resp.text[:300]}")
            if attempt >= self.cfg.max_retries:
                raise ProtocolError(f"GET {url} {params}: {problem}; gave up after {attempt + 1} attempts")
            self._pause("retry", self._backoff(attempt))
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        return self.backoff.delay(attempt)

    def klines(self, symbol: str, interval: str, start_ms: int, end_ms: int | None = None,
               limit: int | None = None) -> list[list[Any]]:
        """One page of klines with open_time >= start_ms (and <= end_ms), oldest first."""
        if limit is None:
            limit = self.cfg.spot_page_limit if self.market == "spot" else self.cfg.futures_page_limit
        params: dict[str, Any] = {"symbol": symbol, "interval": interval, "startTime": start_ms, "limit": limit}
        if end_ms is not None:
            params["endTime"] = end_ms
        weight = 2 if self.market == "spot" else futures_kline_weight(limit)
        rows = self.get("/klines", params, weight=weight)
        if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) < 11 for r in rows):
            raise ProtocolError(f"klines for {symbol}: expected a JSON array of 12-field arrays")
        return rows

    def exchange_info(self) -> dict[str, SymbolInfo]:
        """Symbol metadata; also adopts the REQUEST_WEIGHT per-minute limit it announces."""
        body = self.get("/exchangeInfo", weight=1 if self.market == "futures" else 20)
        if not isinstance(body, dict):
            raise ProtocolError("exchangeInfo: expected a JSON object")
        symbols, limit = parse_exchange_info(body)
        if limit:
            self.weight_limit = limit
        return symbols

    def top_by_quote_volume(self, n: int, quote: str = "USDT") -> list[str]:
        """The `n` TRADING symbols (perpetuals on futures) quoted in `quote` with the largest 24 h quote volume."""
        info = self.exchange_info()
        tickers = self.get("/ticker/24hr", weight=40 if self.market == "futures" else 80)
        vol: dict[str, float] = {}
        for t in tickers if isinstance(tickers, list) else []:
            try:
                vol[t["symbol"]] = float(t["quoteVolume"])
            except (KeyError, TypeError, ValueError):
                continue
        ok = [
            s for s, i in info.items()
            if i.status == "TRADING" and i.quote_asset == quote and i.contract_type in (None, "PERPETUAL")
            and math.isfinite(vol.get(s, math.nan))
        ]
        return sorted(ok, key=lambda s: -vol[s])[:n]


def _retry_after(resp: httpx.Response, now: float) -> float | None:
    return parse_retry_after(resp.headers.get("retry-after"), now=now)
