"""Issue 18: notifiers survive a blip. Connection errors, timeouts and 5xx are retried with jittered back-off inside
the rate limit and the alert is delivered once; 4xx are final; a channel that never answers drops the alert with a
reason and carries on. Fuzzed over server answers."""

from __future__ import annotations

import itertools
import random
import threading

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.screener.contracts import RankEvent, decode
from cambium.screener.notify import RetryPolicy, TelegramNotifier, WebhookNotifier

from ._builders import rank_event
from ._http import LocalServer
from .test_notify import FakeClock


def _policy(retries: int = 3) -> RetryPolicy:
    return RetryPolicy(retries, base_s=0.5, cap_s=4.0, rng=random.Random(0))


def test_connection_errors_then_success_deliver_once_within_the_rate() -> None:
    clock = FakeClock()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= 2:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200 if len(seen) != 3 else 502)

    hook = WebhookNotifier("http://hook.invalid/x", rate=1.0, burst=1, clock=clock, sleep=clock.sleep,
                           retry=_policy(), transport=httpx.MockTransport(handler))
    event = rank_event(symbol="AAAUSDT")
    hook.offer(event)
    assert hook.flush(10)
    hook.close()
    assert len(seen) == 4 and hook.counts["sent"] == 1 and hook.counts["retried"] == 3 and hook.counts["failed"] == 0
    assert all(decode(r.content, RankEvent) == event for r in seen)
    # one key for every attempt of the event: a receiver can drop a duplicate
    assert len({r.headers["idempotency-key"] for r in seen}) == 1
    # each attempt took a token of the 1/s bucket (burst 1): 3 retries cannot go out in under 3 s of clock time
    assert clock() >= 3.0


def test_5xx_from_a_real_server_then_success_is_delivered_once() -> None:
    answers = iter([(503, b"{}", 0.0), (500, b"{}", 0.0)])
    with LocalServer(lambda path, body: next(answers, (200, b"{}", 0.0))) as server:
        hook = WebhookNotifier(server.url, rate=1000, burst=1000, retry=RetryPolicy(3, 0.001, 0.002))
        hook.offer(rank_event(symbol="BBBUSDT"))
        hook.close()
    assert server.count() == 3 and hook.counts["sent"] == 1 and hook.counts["retried"] == 2


def test_4xx_is_final_and_the_channel_carries_on() -> None:
    replies = itertools.chain([(400, b"{}", 0.0)], itertools.repeat((200, b"{}", 0.0)))
    with LocalServer(lambda path, body: next(replies)) as server:
        hook = WebhookNotifier(server.url, rate=1000, burst=1000, retry=RetryPolicy(3, 0.001, 0.002))
        hook.offer(rank_event(symbol="BADUSDT"))
        hook.offer(rank_event(symbol="OKUSDT"))
        hook.close()
    assert server.count() == 2  # no retry of the 400
    assert hook.counts["dropped:http_4xx"] == 1 and hook.counts["sent"] == 1 and hook.counts["retried"] == 0


def test_a_dead_endpoint_drops_with_a_reason_and_never_blocks() -> None:
    clock = FakeClock()
    calls = threading.Semaphore(0)

    def handler(request: httpx.Request) -> httpx.Response:
        calls.release()
        raise httpx.ReadTimeout("no answer")

    tg = TelegramNotifier("http://tg.invalid", token="T", chat_id="1", events=("ALERT_TRAP",), rate=1000,
                          burst=1000, clock=clock, sleep=clock.sleep, retry=_policy(2),
                          transport=httpx.MockTransport(handler))
    for i in range(3):
        assert tg.offer(rank_event(event="ALERT_TRAP", symbol=f"S{i}USDT"))
    assert tg.flush(10)
    tg.close()
    assert tg.counts["failed"] == 3 and tg.counts["dropped:retries_exhausted"] == 3 and tg.counts["retried"] == 6
    assert tg.snapshot_counts()["offered"] == 3


def test_429_without_a_delay_is_not_retried_with_one_it_is() -> None:
    clock = FakeClock()
    answers = iter([httpx.Response(429), httpx.Response(429, headers={"Retry-After": "12"})])

    def handler(request: httpx.Request) -> httpx.Response:
        return next(answers, httpx.Response(204))

    hook = WebhookNotifier("http://hook.invalid/", rate=1000, burst=1000, clock=clock, sleep=clock.sleep,
                           retry=_policy(), transport=httpx.MockTransport(handler))
    hook.offer(rank_event(symbol="AAAUSDT"))  # 429, no delay named: final
    hook.offer(rank_event(symbol="BBBUSDT"))  # 429 + Retry-After 12: waits 12 s of clock, then 204
    assert hook.flush(10)
    hook.close()
    assert hook.counts["dropped:http_429"] == 1 and hook.counts["sent"] == 1 and hook.counts["retried"] == 1
    assert clock() >= 12.0 and hook.counts["rate_limited"] == 2


statuses = st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 408, 418, 429, 500, 502, 503, 504])
retry_after = st.one_of(st.none(), st.text(max_size=12), st.integers(-5, 10**6).map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(str))
answers_st = st.lists(st.one_of(st.tuples(statuses, retry_after, st.binary(max_size=40)), st.just("connect")),
                      min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(answers=answers_st, telegram=st.booleans(), retries=st.integers(0, 3))
def test_fuzzed_server_answers_every_event_is_accounted_for(answers: list[object], telegram: bool,
                                                            retries: int) -> None:
    clock = FakeClock()
    it = iter(answers)
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        answer = next(it, (200, None, b"{}"))
        if answer == "connect":
            raise httpx.ConnectError("refused")
        status, after, body = answer  # type: ignore[misc]
        return httpx.Response(status, headers={} if after is None else {"Retry-After": after}, content=body)

    transport = httpx.MockTransport(handler)
    kw = dict(rate=1000.0, burst=1000, clock=clock, sleep=clock.sleep, retry=_policy(retries), transport=transport)
    sender = (TelegramNotifier("http://tg.invalid", "T", "1", ("ALERT_TRAP",), **kw) if telegram  # type: ignore[arg-type]
              else WebhookNotifier("http://hook.invalid", **kw))  # type: ignore[arg-type]
    events = [rank_event(event="ALERT_TRAP", symbol=f"S{i}USDT") for i in range(2)]
    for ev in events:
        sender.offer(ev)
    assert sender.flush(20)
    sender.close()
    counts = sender.snapshot_counts()
    assert counts.get("sent", 0) + counts.get("failed", 0) == 2  # each event delivered or dropped, exactly once
    assert counts.get("failed", 0) == sum(n for k, n in counts.items() if k.startswith("dropped:"))
    assert len(calls) <= 2 * (retries + 1) and counts.get("retried", 0) == len(calls) - 2
    assert clock() <= 2 * retries * 3 * 86_400 + 1  # every wait bounded (Retry-After capped at 3 days)
