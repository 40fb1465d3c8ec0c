"""Notifiers that never block the pipeline: a bounded queue, a background sender and a token-bucket rate limit.

`offer(event)` only enqueues (O(1), never waits); when the queue is full the event is dropped and counted. A daemon
thread takes events off the queue, waits for a token, and sends. A failed send is counted and logged, never raised
into the pipeline; an HTTP 429 also pauses the channel for the delay the server asked for (Retry-After header, or
Telegram's `parameters.retry_after`), and the event that got the 429 is counted as failed. The clock and the sleep
are injectable so tests can drive the rate limit without wall time.

Channels: `WebhookNotifier` POSTs each RankEvent as JSON; `TelegramNotifier` calls the bot API's sendMessage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection

import httpx
import orjson

from cambium.core.errors import ProtocolError
from cambium.screener.contracts import RankEvent, encode

__all__ = ["BackgroundSender", "TelegramNotifier", "TokenBucket", "WebhookNotifier", "telegram_text"]

log = logging.getLogger("cambium.screener.notify")


class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second of `clock()`."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"token bucket needs rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last = clock()

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def try_take(self) -> bool:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill()
        return max(0.0, (1.0 - self._tokens) / self.rate)


class BackgroundSender:
    """Bounded queue + daemon sender thread + token bucket. Subclasses implement `send(item)`."""

    def __init__(self, name: str, rate: float, burst: int, queue_size: int,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None) -> None:
        self.name = name
        self.bucket = TokenBucket(rate, burst, clock)
        self.queue: queue.Queue[RankEvent] = queue.Queue(maxsize=queue_size)
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._sleep = sleep or self._stop.wait
        self._lock = threading.Lock()
        self._clock = clock
        self._resume_at = float("-inf")
        self._thread = threading.Thread(target=self._run, name=f"screener-notify-{name}", daemon=True)
        self._thread.start()

    def wants(self, event: RankEvent) -> bool:
        return True

    def offer(self, event: RankEvent) -> bool:
        """Enqueue without waiting; False (and counted as dropped) when the queue is full."""
        if not self.wants(event):
            return False
        with self._lock:
            self.counts["offered"] += 1
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.counts["dropped"] += 1
            return False
        return True

    def send(self, event: RankEvent) -> None:
        raise NotImplementedError

    def back_off(self, seconds: float) -> None:
        """Send nothing for `seconds` (the server said 429 with a retry delay); capped at 10 minutes."""
        self._resume_at = self._clock() + min(max(seconds, 0.0), 600.0)
        with self._lock:
            self.counts["rate_limited"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            while self._clock() < self._resume_at:
                if self._stop.is_set():
                    return
                self._sleep(self._resume_at - self._clock())
            while not self.bucket.try_take():
                if self._stop.is_set():
                    return
                self._sleep(self.bucket.wait_time())
            try:
                self.send(event)
                key = "sent"
            except Exception as exc:  # a notifier failure must never reach the pipeline
                log.warning("notifier %s failed to send %s %s: %r", self.name, event.event, event.symbol, exc)
                key = "failed"
            with self._lock:
                self.counts[key] += 1
            self.queue.task_done()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was handled (sent or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)


class WebhookNotifier(BackgroundSender):
    """POSTs each RankEvent as its contract JSON to `url`; non-2xx answers count as failed."""

    def __init__(self, url: str, rate: float = 1.0, burst: int = 5, queue_size: int = 1000, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None) -> None:
        self.url = url
        self._client = httpx.Client(timeout=timeout_s)
        super().__init__("webhook", rate, burst, queue_size, clock, sleep)

    def send(self, event: RankEvent) -> None:
        # Errors leave the URL out: webhook URLs often embed a secret (Slack, Discord).
        try:
            response = self._client.post(self.url, content=encode(event), headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise ProtocolError(f"webhook POST failed: {type(exc).__name__}") from None
        if response.status_code == 429:
            self.back_off(_retry_after(response.headers.get("retry-after")))
        if not 200 <= response.status_code < 300:
            raise ProtocolError(f"webhook answered HTTP {response.status_code}")

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self._client.close()


def _retry_after(value: object, default: float = 1.0) -> float:
    """Seconds from a Retry-After header / retry_after field; `default` when absent or not a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def telegram_text(event: RankEvent) -> str:
    """One line per event; an ALERT's explanation (`payload.headline`/`explanation`, see `Pipeline`) below it."""
    status = event.payload.get("status", "")
    line = f"{event.event} {event.symbol} #{event.rank} score {event.score:.3f} {status}".rstrip()
    headline, why = event.payload.get("headline"), event.payload.get("explanation")
    return "\n".join([line, *(str(t) for t in (headline, why) if t)])


class TelegramNotifier(BackgroundSender):
    """Bot API sendMessage (`{api_url}/bot{token}/sendMessage`) for the configured event kinds."""

    def __init__(self, api_url: str, token: str, chat_id: str, events: Collection[str], rate: float = 1.0,
                 burst: int = 5, queue_size: int = 1000, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None) -> None:
        self.endpoint = f"{api_url.rstrip('/')}/bot{token}/sendMessage"
        self.chat_id = chat_id
        self.events = frozenset(events)
        self._client = httpx.Client(timeout=timeout_s)
        super().__init__("telegram", rate, burst, queue_size, clock, sleep)

    def wants(self, event: RankEvent) -> bool:
        return event.event in self.events

    def send(self, event: RankEvent) -> None:
        body = orjson.dumps({"chat_id": self.chat_id, "text": telegram_text(event)})
        # Errors are re-raised without the URL: it holds the bot token, which must not reach the logs.
        try:
            response = self._client.post(self.endpoint, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            raise ProtocolError(f"telegram sendMessage failed: {type(exc).__name__}") from None
        if response.status_code == 429:
            try:
                retry = orjson.loads(response.content)["parameters"]["retry_after"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                retry = None
            self.back_off(_retry_after(retry))
        if response.status_code != 200:
            raise ProtocolError(f"telegram sendMessage answered HTTP {response.status_code}")

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self._client.close()
