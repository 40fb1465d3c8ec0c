"""Clocks and the rate-limiting pieces of the connector: sliding-window limiter, back-off, circuit breaker, sharding,
and the parser of `Retry-After` values shared by every HTTP client here (REST, websocket handshakes, notifiers).

Everything that waits takes a `Clock`, so tests run on `FakeClock` (sleeping advances its time at once) and never wait
for real back-off.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cambium.core.errors import ConfigError

__all__ = [
    "HARD_STREAM_CAP",
    "Backoff",
    "CircuitBreaker",
    "Clock",
    "FakeClock",
    "HandshakeRejected",
    "SlidingWindowLimiter",
    "SystemClock",
    "parse_retry_after",
    "shard_streams",
]

HARD_STREAM_CAP = 1024
# Binance's longest IP ban is 3 days; a Retry-After beyond that is not believed.
MAX_RETRY_AFTER_S = 3 * 86_400.0
_DELAY_SECONDS = re.compile(r"[0-9]{1,20}(?:\.[0-9]{0,9})?")


class HandshakeRejected(OSError):
    """The server answered a websocket handshake with HTTP `status` (429/418 are rate-limit incidents). The connector
    reads websockets' own InvalidStatus; other clients (`ws_picows`) raise this."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"server rejected the websocket handshake with HTTP {status}")
        self.status = status
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}


def parse_retry_after(value: object, *, now: float | None = None, cap_s: float = MAX_RETRY_AFTER_S) -> float | None:
    """Seconds to wait from a `Retry-After` value, or None when there is no usable one.

    Accepts delay-seconds (RFC 9110: a non-negative integer; a decimal is accepted too), an int or float (Telegram's
    `parameters.retry_after`), or an HTTP-date (seconds from `now`, wall-clock epoch seconds, default `time.time()`;
    a date in the past is 0). The result is capped at `cap_s`. Negative, non-finite and unparsable values, booleans
    and other types are None: the caller falls back to its own back-off.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    seconds: float | None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            return None
        seconds = float(text) if _DELAY_SECONDS.fullmatch(text) else None
        if seconds is None:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
            if when.tzinfo is None:
                return None
            seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    else:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap_s)


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time_ns(self) -> int: ...

    def monotonic_ns(self) -> int: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks and asyncio.sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


@dataclass
class FakeClock:
    """A clock for tests: `sleep` advances time immediately and is recorded in `sleeps`."""

    now: float = 1000.0
    wall_offset_ns: int = 1_700_000_000 * 10**9
    sleeps: list[float] = field(default_factory=list)

    def monotonic(self) -> float:
        return self.now

    def time_ns(self) -> int:
        return self.wall_offset_ns + int(self.now * 1e9)

    def monotonic_ns(self) -> int:
        return int(self.now * 1e9)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class SlidingWindowLimiter:
    """At most `limit` acquisitions in any `window` seconds, optionally at least `min_interval` s apart.

    Used for control messages per connection (evenly spaced, so that network jitter cannot bunch a burst at the
    end of one second with the next second's burst on the server's clock) and new connections per IP.
    """

    def __init__(self, limit: int, window: float, clock: Clock, *, min_interval: float = 0.0) -> None:
        if limit < 1 or window <= 0 or min_interval < 0:
            raise ConfigError(
                f"limiter needs limit >= 1, window > 0, min_interval >= 0; got {limit}, {window}, {min_interval}"
            )
        self.limit = limit
        self.window = window
        self.min_interval = min_interval
        self.clock = clock
        self.times: deque[float] = deque()
        self.last: float | None = None
        self.waited = 0.0

    def _trim(self, now: float) -> None:
        while self.times and now - self.times[0] >= self.window:
            self.times.popleft()

    def wait_time(self) -> float:
        now = self.clock.monotonic()
        self._trim(now)
        spacing = 0.0 if self.last is None else self.last + self.min_interval - now
        if len(self.times) < self.limit:
            return max(0.0, spacing)
        return max(spacing, self.times[0] + self.window - now)

    async def acquire(self) -> None:
        while (wait := self.wait_time()) > 0:
            self.waited += wait
            await self.clock.sleep(wait)
        self.last = self.clock.monotonic()
        self.times.append(self.last)


class Backoff:
    """Exponential back-off with full jitter: the n-th delay is uniform on [0, min(cap, base·2^n)]."""

    def __init__(self, base: float, cap: float, rng: random.Random) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(attempt, 62))

    def delay(self, attempt: int) -> float:
        """A delay for retry number `attempt` (0-based), for callers that count attempts themselves."""
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def next(self) -> float:
        delay = self.delay(self.attempt)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class CircuitBreaker:
    """closed → (N consecutive failures) → open → (cool-down) → half-open → success: closed / failure: open.

    In half-open exactly one probe is allowed until its outcome is recorded.
    """

    def __init__(self, failures_to_open: int, cooldown: float, clock: Clock) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self._open_since: float | None = None
        self._probing = False
        self.transitions: list[tuple[float, str]] = []

    @property
    def state(self) -> str:
        if self._open_since is None:
            return "closed"
        if self.clock.monotonic() - self._open_since >= self.cooldown:
            return "half_open"
        return "open"

    def wait_time(self) -> float:
        if self._open_since is None:
            return 0.0
        return max(0.0, self._open_since + self.cooldown - self.clock.monotonic())

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probing:
            self._probing = True
            self.transitions.append((self.clock.monotonic(), "half_open"))
            return True
        return False

    def record_success(self) -> None:
        if self._open_since is not None:
            self.transitions.append((self.clock.monotonic(), "closed"))
        self.failures = 0
        self._open_since = None
        self._probing = False

    def record_failure(self) -> None:
        self.failures += 1
        if self._probing or (self._open_since is None and self.failures >= self.failures_to_open):
            self._open_since = self.clock.monotonic()
            self._probing = False
            self.transitions.append((self._open_since, "open"))


def shard_streams(
    streams: Iterable[str], route: Callable[[str], str], max_per_connection: int
) -> list[tuple[str, list[str]]]:
    """Split `streams` into (endpoint, streams) shards: grouped by endpoint, near-equal sizes <= the cap.

    Duplicates are dropped (first occurrence kept). Raises ConfigError if the cap is outside [1, 1024].
    """
    if not 1 <= max_per_connection <= HARD_STREAM_CAP:
        raise ConfigError(f"max_per_connection={max_per_connection} must be in [1, {HARD_STREAM_CAP}]")
    by_endpoint: dict[str, list[str]] = {}
    seen: set[str] = set()
    for s in streams:
        if s in seen:
            continue
        seen.add(s)
        by_endpoint.setdefault(route(s), []).append(s)
    shards: list[tuple[str, list[str]]] = []
    for endpoint in sorted(by_endpoint):
        group = by_endpoint[endpoint]
        n = math.ceil(len(group) / max_per_connection)
        size, extra = divmod(len(group), n)
        start = 0
        for k in range(n):
            end = start + size + (1 if k < extra else 0)
            shards.append((endpoint, group[start:end]))
            start = end
    return shards
