"""Notifiers that never block the pipeline: a bounded queue, a background sender and a token-bucket rate limit.

`offer(event)` only enqueues (O(1), never waits); when the queue is full the event is dropped and counted. A daemon
thread takes events off the queue, waits for a token, and sends. A send that fails with a connection error, a timeout
or an HTTP 5xx is retried, up to `RetryPolicy.max_retries` times, after a jittered exponential delay (uniform on
[0, min(cap, base·2^n)]); an HTTP 429 pauses the channel for the delay the server asked for (Retry-After header, or
Telegram's `parameters.retry_after`) and is then retried; any other 4xx (and a 429 that names no delay) is final.
Every attempt takes a token, so retries stay inside the rate limit. The webhook sends an `Idempotency-Key` header
(the same on every attempt of one event) so a receiver can drop a duplicate when an answer was lost after the event
arrived. An event that is finally not delivered is counted (`counts["failed"]` and `counts["dropped:<reason>"]`:
http_4xx, http_429, retries_exhausted, error, shutdown) and logged, never raised into the pipeline. The clock, the
sleep and the jitter's random source are injectable so tests can drive the rate limit without wall time.

Channels: `WebhookNotifier` POSTs each RankEvent as JSON; `TelegramNotifier` calls the bot API's sendMessage.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import httpx
import orjson

from cambium.core.errors import ProtocolError
from cambium.market.limits import Backoff, parse_retry_after
from cambium.screener.config import SenderConfig
from cambium.screener.contracts import RankEvent, encode

__all__ = ["BackgroundSender", "RetryPolicy", "SendFailed", "TelegramNotifier", "TokenBucket", "WebhookNotifier",
           "telegram_text"]

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


class SendFailed(ProtocolError):
    """A send that did not deliver: `reason` (connect, http_5xx, http_429, http_4xx), whether another attempt may
    succeed, and the delay the server asked for, if any."""

    def __init__(self, message: str, reason: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """At most `max_retries` more attempts per event; the n-th waits U(0, min(cap_s, base_s·2^n)) seconds."""

    max_retries: int = 3
    base_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_config(cls, cfg: SenderConfig) -> RetryPolicy:
        return cls(cfg.max_retries, cfg.retry_base_s, cfg.retry_cap_s)

    def delay(self, retry: int) -> float:
        return Backoff(self.base_s, self.cap_s, self.rng).delay(retry)


class BackgroundSender:
    """Bounded queue + daemon sender thread + token bucket + retries. Subclasses implement `send(item)`, raising
    `SendFailed` (other exceptions are final failures, reason 'error')."""

    def __init__(self, name: str, rate: float, burst: int, queue_size: int,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None,
                 retry: RetryPolicy | None = None) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
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
                self.counts["dropped:queue_full"] += 1
            return False
        return True

    def snapshot_counts(self) -> dict[str, int]:
        """A copy of `counts`, taken under the lock (the metrics read it from another thread)."""
        with self._lock:
            return dict(self.counts)

    def send(self, event: RankEvent) -> None:
        raise NotImplementedError

    def back_off(self, seconds: float) -> None:
        """Send nothing for `seconds` (the server said 429 with a retry delay); capped at 10 minutes."""
        self._resume_at = self._clock() + min(max(seconds, 0.0), 600.0)
        with self._lock:
            self.counts["rate_limited"] += 1

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` of `clock` time; False if the sender is stopping."""
        deadline = self._clock() + seconds
        while self._clock() < deadline:
            if self._stop.is_set():
                return False
            self._sleep(deadline - self._clock())
        return not self._stop.is_set()

    def _take_turn(self) -> bool:
        """Wait out a 429 pause and for a token; False if the sender is stopping."""
        while self._clock() < self._resume_at:
            if self._stop.is_set():
                return False
            self._sleep(self._resume_at - self._clock())
        while not self.bucket.try_take():
            if self._stop.is_set():
                return False
            self._sleep(self.bucket.wait_time())
        return True

    def _deliver(self, event: RankEvent) -> str | None:
        """Send `event` with retries; None when delivered, else why not."""
        retries = 0
        while True:
            if not self._take_turn():
                return "shutdown"
            try:
                self.send(event)
                return None
            except SendFailed as exc:
                if exc.retry_after is not None:
                    self.back_off(exc.retry_after)
                if not exc.retryable:
                    log.warning("notifier %s dropped %s %s: %s", self.name, event.event, event.symbol, exc)
                    return exc.reason
                if retries >= self.retry.max_retries:
                    log.warning("notifier %s dropped %s %s after %d attempts: %s", self.name, event.event,
                                event.symbol, retries + 1, exc)
                    return "retries_exhausted"
                with self._lock:
                    self.counts["retried"] += 1
                if exc.retry_after is None and not self._pause(self.retry.delay(retries)):
                    return "shutdown"
                retries += 1
            except Exception as exc:  # a notifier failure must never reach the pipeline
                log.warning("notifier %s failed to send %s %s: %r", self.name, event.event, event.symbol, exc)
                return "error"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            why = self._deliver(event)
            with self._lock:
                if why is None:
                    self.counts["sent"] += 1
                else:
                    self.counts["failed"] += 1
                    self.counts[f"dropped:{why}"] += 1
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


def _failure(what: str, status: int, retry_after: float | None) -> SendFailed:
    """The SendFailed for a non-success HTTP status (see the module docstring for what is retried)."""
    if status == 429:
        return SendFailed(f"{what} answered HTTP 429", "http_429", retryable=retry_after is not None,
                          retry_after=1.0 if retry_after is None else retry_after)
    if status >= 500:
        return SendFailed(f"{what} answered HTTP {status}", "http_5xx", retryable=True)
    return SendFailed(f"{what} answered HTTP {status}", "http_4xx", retryable=False)


class WebhookNotifier(BackgroundSender):
    """POSTs each RankEvent as its contract JSON to `url`; any 2xx answer is a delivery."""

    def __init__(self, url: str, rate: float = 1.0, burst: int = 5, queue_size: int = 1000, timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self._client = httpx.Client(timeout=timeout_s, transport=transport)
        super().__init__("webhook", rate, burst, queue_size, clock, sleep, retry)

    def send(self, event: RankEvent) -> None:
        body = encode(event)
        headers = {"content-type": "application/json", "idempotency-key": hashlib.sha256(body).hexdigest()[:32]}
        # Errors leave the URL out: webhook URLs often embed a secret (Slack, Discord).
        try:
            response = self._client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            raise SendFailed(f"webhook POST failed: {type(exc).__name__}", "connect", retryable=True) from None
        if not 200 <= response.status_code < 300:
            raise _failure("webhook", response.status_code, parse_retry_after(response.headers.get("retry-after")))

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self._client.close()


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
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] | None = None,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        self.endpoint = f"{api_url.rstrip('/')}/bot{token}/sendMessage"
        self.chat_id = chat_id
        self.events = frozenset(events)
        self._client = httpx.Client(timeout=timeout_s, transport=transport)
        super().__init__("telegram", rate, burst, queue_size, clock, sleep, retry)

    def wants(self, event: RankEvent) -> bool:
        return event.event in self.events

    def send(self, event: RankEvent) -> None:
        body = orjson.dumps({"chat_id": self.chat_id, "text": telegram_text(event)})
        # Errors are re-raised without the URL: it holds the bot token, which must not reach the logs.
        try:
            response = self._client.post(self.endpoint, content=body, headers={"content-type": "application/json"})
        except httpx.TransportError as exc:
            raise SendFailed(f"telegram sendMessage failed: {type(exc).__name__}", "connect", retryable=True) from None
        if response.status_code == 200:
            return
        retry = parse_retry_after(response.headers.get("retry-after"))
        if response.status_code == 429 and retry is None:
            try:
                retry = parse_retry_after(orjson.loads(response.content)["parameters"]["retry_after"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                retry = None
        raise _failure("telegram sendMessage", response.status_code, retry)

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        self._client.close()
