"""SCR-8: token bucket, non-blocking bounded queues, webhook and Telegram against a local server, terminal table."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time

import pytest
from rich.console import Console

from cambium.screener.contracts import RankEvent, decode
from cambium.screener.notify import BackgroundSender, RetryPolicy, TelegramNotifier, TokenBucket, WebhookNotifier
from cambium.screener.terminal import TerminalTable

from ._builders import rank_event
from ._http import LocalServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += max(seconds, 1e-6)


def test_token_bucket_with_injected_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time() == pytest.approx(0.5)
    clock.now = 0.49
    assert not bucket.try_take()
    clock.now = 0.5
    assert bucket.try_take()
    clock.now = 100.0  # refill is capped at burst
    assert [bucket.try_take() for _ in range(4)] == [True, True, True, False]


class Recorder(BackgroundSender):
    def __init__(self, clock: FakeClock, gate: threading.Event | None = None, **kw: int) -> None:
        self.sent_at: list[tuple[float, str]] = []
        self.clock = clock
        self.gate = gate
        super().__init__("recorder", rate=kw.get("rate", 2), burst=kw.get("burst", 2),
                         queue_size=kw.get("queue_size", 100), clock=clock, sleep=clock.sleep)

    def send(self, event: RankEvent) -> None:
        if self.gate is not None:
            self.gate.wait(5)
        if event.symbol == "FAILUSDT":
            raise RuntimeError("boom")
        self.sent_at.append((self.clock(), event.symbol))


def test_sender_respects_the_rate_in_clock_time() -> None:
    clock = FakeClock()
    sender = Recorder(clock, rate=2, burst=2)
    for i in range(6):
        assert sender.offer(rank_event(symbol=f"S{i}USDT"))
    assert sender.flush(10)
    sender.close()
    times = [t for t, _ in sender.sent_at]
    assert [s for _, s in sender.sent_at] == [f"S{i}USDT" for i in range(6)]
    assert times[:2] == [0.0, 0.0]  # the burst
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times[1:]))  # then 2 per second
    assert sender.counts == {"offered": 6, "sent": 6}


def test_full_queue_drops_and_counts_without_blocking() -> None:
    gate = threading.Event()
    sender = Recorder(FakeClock(), gate=gate, rate=1000, burst=1000, queue_size=3)
    results = [sender.offer(rank_event(symbol=f"S{i}USDT")) for i in range(50)]
    # 1 event may be in the sender's hands, 3 in the queue; everything else is dropped, immediately.
    assert results.count(False) == sender.counts["dropped"] >= 46
    gate.set()
    sender.close()
    assert sender.counts["sent"] + sender.counts["dropped"] == 50


def test_failures_are_counted_not_raised() -> None:
    sender = Recorder(FakeClock(), rate=1000, burst=1000)
    sender.offer(rank_event(symbol="FAILUSDT"))
    sender.offer(rank_event(symbol="OKUSDT"))
    sender.close()
    assert sender.counts["failed"] == 1 and sender.counts["sent"] == 1


def test_webhook_posts_contract_json(caplog: pytest.LogCaptureFixture) -> None:
    with LocalServer(lambda path, body: (200 if path == "/hook" else 503, b"{}", 0.0)) as server:
        events = [rank_event(symbol=f"S{i}USDT", rank=i + 1) for i in range(5)]
        hook = WebhookNotifier(server.url + "/hook", rate=1000, burst=1000)
        for ev in events:
            hook.offer(ev)
        hook.close()
        assert [decode(body, RankEvent) for _, body in server.requests] == events
        assert hook.counts["sent"] == 5
        bad = WebhookNotifier(server.url + "/down/SECRET-PART", rate=1000, burst=1000,
                              retry=RetryPolicy(2, 0.001, 0.002))
        bad.offer(events[0])
        bad.close()
        assert bad.counts["failed"] == 1 and bad.counts["retried"] == 2 and bad.counts["dropped:retries_exhausted"] == 1
        assert sum(path.startswith("/down") for path, _ in server.requests) == 3  # 1 attempt + 2 retries
        assert "HTTP 503" in caplog.text and "SECRET-PART" not in caplog.text


def test_webhook_never_blocks_on_a_stuck_server() -> None:
    release = threading.Event()

    def stuck(path: str, body: bytes) -> tuple[int, bytes, float]:
        release.wait(10)
        return 200, b"{}", 0.0

    with LocalServer(stuck) as server:
        hook = WebhookNotifier(server.url, rate=1000, burst=1000, queue_size=2, timeout_s=10.0)
        # The server holds its first answer until `release`: if offer() waited for the network this would hang.
        accepted = [hook.offer(rank_event(symbol=f"S{i}USDT")) for i in range(20)]
        assert not release.is_set() and hook.counts["sent"] == 0
        assert accepted.count(True) <= 3 and hook.counts["dropped"] == accepted.count(False) >= 17
        release.set()
        hook.close(timeout=10)
        assert hook.counts["sent"] == accepted.count(True) == server.count()


def test_telegram_send_message_and_filter() -> None:
    with LocalServer(lambda path, body: (200, b'{"ok":true}', 0.0)) as server:
        tg = TelegramNotifier(server.url, token="123:ABC", chat_id="-100200", events=("ALERT_TRADABLE",),
                              rate=1000, burst=1000)
        assert not tg.offer(rank_event(event="SYMBOL_ENTER"))
        assert tg.offer(rank_event(event="ALERT_TRADABLE", rank=2, score=0.512,
                                   payload={"status": "TRADEABLE"}))
        tg.close()
        assert len(server.requests) == 1
        path, body = server.requests[0]
        assert path == "/bot123:ABC/sendMessage"
        assert json.loads(body) == {"chat_id": "-100200", "text": "ALERT_TRADABLE BTCUSDT #2 score 0.512 TRADEABLE"}


def test_telegram_errors_do_not_leak_the_token(caplog: pytest.LogCaptureFixture) -> None:
    with LocalServer(lambda path, body: (401, b'{"ok":false}', 0.0)) as server:
        tg = TelegramNotifier(server.url, token="SECRET-TOKEN", chat_id="1", events=("ALERT_TRAP",),
                              rate=1000, burst=1000)
        tg.offer(rank_event(event="ALERT_TRAP"))
        tg.close()
    assert tg.counts["failed"] == 1
    assert "HTTP 401" in caplog.text and "SECRET-TOKEN" not in caplog.text


def test_terminal_table_follows_deltas() -> None:
    table = TerminalTable(top_k=2, console=Console(file=io.StringIO(), width=100))
    table.offer(rank_event(symbol="AAAUSDT", score=0.3, payload={"status": "WATCH"}))
    table.offer(rank_event(symbol="BBBUSDT", score=0.6, payload={"status": "WATCH"}))
    table.offer(rank_event(symbol="CCCUSDT", score=0.1, payload={"status": "WATCH"}))
    table.offer(rank_event(event="ALERT_TRADABLE", symbol="AAAUSDT", score=0.7, payload={"status": "TRADEABLE"}))
    table.offer(rank_event(event="SYMBOL_EXIT", symbol="CCCUSDT", score=0.1))
    assert table.symbols() == ["AAAUSDT", "BBBUSDT"]
    out = Console(file=io.StringIO(), width=100, record=True)
    out.print(table.render())
    text = out.export_text()
    assert "AAAUSDT" in text and "TRADEABLE" in text and "0.700" in text and "CCCUSDT" not in text
    table.set_scores(1723161256313, [("BBBUSDT", 0.9)])
    assert table.symbols() == ["BBBUSDT", "AAAUSDT"]


def test_terminal_live_redraws_are_rate_limited() -> None:
    clock = FakeClock()
    table = TerminalTable(top_k=5, redraws_per_s=1.0, burst=1, console=Console(file=io.StringIO(), width=100),
                          clock=clock)
    table.start()
    for i in range(20):
        table.offer(rank_event(symbol=f"S{i}USDT"))
        time.sleep(0.01)
    table.close()
    # The fake clock never advances, so only the single burst token can have been spent.
    assert table.redraws == 1


def test_http_429_pauses_the_channel_for_retry_after_then_retries() -> None:
    clock = FakeClock()
    answers = iter([(429, b'{"ok":false,"parameters":{"retry_after":7}}', 0.0)])

    def reply(path: str, body: bytes) -> tuple[int, bytes, float]:
        return next(answers, (200, b'{"ok":true}', 0.0))

    with LocalServer(reply) as server:
        tg = TelegramNotifier(server.url, token="t", chat_id="1", events=("ALERT_TRAP",), rate=1000, burst=1000,
                              clock=clock, sleep=clock.sleep)
        tg.offer(rank_event(event="ALERT_TRAP", symbol="AAAUSDT"))
        assert tg.flush(10)
        # the 429 paused the channel for the 7 s Telegram asked for (clock time), then the same message went out
        assert tg.counts["rate_limited"] == 1 and tg.counts["retried"] == 1 and tg.counts["sent"] == 1
        assert clock() >= 7.0 and tg.counts["failed"] == 0
        tg.close()
        assert [b"AAAUSDT" in body for _, body in server.requests] == [True, True]
