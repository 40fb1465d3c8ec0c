from __future__ import annotations

import asyncio
import random
import statistics

import pytest

from cambium.core.errors import ConfigError
from cambium.market.binance import route_usdm
from cambium.market.limits import Backoff, CircuitBreaker, FakeClock, SlidingWindowLimiter, shard_streams


def _usdm_streams(n_symbols: int) -> list[str]:
    syms = [f"sym{i}usdt" for i in range(n_symbols)]
    kinds = ["aggTrade", "bookTicker", "depth@100ms", "kline_1m"]
    return [f"{s}@{k}" for s in syms for k in kinds]


def test_shards_respect_cap_route_and_balance() -> None:
    streams = [*_usdm_streams(500), "!markPrice@arr@1s"]
    plan = shard_streams(streams + streams[:10], route_usdm, 800)
    sizes = [(ep, len(s)) for ep, s in plan]
    assert sizes == [("market", 501), ("market", 500), ("public", 500), ("public", 500)]
    assert sorted(x for _, s in plan for x in s) == sorted(streams)
    for ep, s in plan:
        assert all(route_usdm(x) == ep for x in s)
        assert all(("bookTicker" in x or "depth" in x) == (ep == "public") for x in s)
    plan = shard_streams(_usdm_streams(1000), route_usdm, 1024)
    assert [len(s) for _, s in plan] == [1000, 1000, 1000, 1000]
    plan = shard_streams(_usdm_streams(1000), route_usdm, 200)
    assert len(plan) == 20 and {len(s) for _, s in plan} == {200}
    with pytest.raises(ConfigError, match="1024"):
        shard_streams(streams, route_usdm, 1025)


def test_control_limiter_keeps_any_one_second_window_under_the_cap() -> None:
    clock = FakeClock()
    lim = SlidingWindowLimiter(9, 1.0, clock)

    async def send(n: int) -> list[float]:
        out = []
        for _ in range(n):
            await lim.acquire()
            out.append(clock.monotonic())
        return out

    times = asyncio.run(send(50))
    for t in times:
        assert sum(1 for u in times if t <= u < t + 1.0) <= 9
    assert times[-1] - times[0] == pytest.approx(5.0)  # 50 messages at 9/s: the last leaves after 5 s
    assert sum(clock.sleeps) == pytest.approx(5.0)


def test_new_connection_budget_per_ip() -> None:
    clock = FakeClock()
    budget = SlidingWindowLimiter(300, 300.0, clock)

    async def go() -> None:
        for _ in range(300):
            await budget.acquire()
        assert clock.sleeps == []
        await budget.acquire()

    asyncio.run(go())
    assert clock.sleeps == [pytest.approx(300.0)]


def test_backoff_grows_exponentially_with_full_jitter() -> None:
    rng = random.Random(7)
    samples: list[list[float]] = [[] for _ in range(8)]
    for _ in range(3000):
        b = Backoff(0.5, 16.0, rng)
        for k in range(8):
            samples[k].append(b.next())
    for k, xs in enumerate(samples):
        ceiling = min(16.0, 0.5 * 2**k)
        assert min(xs) >= 0 and max(xs) <= ceiling
        assert statistics.mean(xs) == pytest.approx(ceiling / 2, rel=0.06)  # uniform on [0, ceiling]
        assert max(xs) > 0.97 * ceiling and min(xs) < 0.03 * ceiling  # full jitter spans the whole range
    means = [statistics.mean(xs) for xs in samples]
    assert all(means[k + 1] > 1.7 * means[k] for k in range(5))  # doubling until the cap
    b = Backoff(0.5, 16.0, rng)
    for _ in range(5):
        b.next()
    b.reset()
    assert b.attempt == 0 and b.next() <= 0.5


def test_circuit_breaker_state_table() -> None:
    clock = FakeClock(now=0.0)
    br = CircuitBreaker(3, 10.0, clock)
    rows = []

    def step(action: str) -> None:
        if action == "fail":
            br.record_failure()
        elif action == "ok":
            br.record_success()
        elif action.startswith("wait"):
            clock.now += float(action[4:])
        elif action == "allow":
            rows.append(br.allow())
        rows.append(br.state)

    for a in ["fail", "fail", "allow", "fail", "allow", "wait9.9", "allow", "wait0.1", "allow", "allow", "fail",
              "wait10", "allow", "ok", "allow"]:
        step(a)
    assert rows == [
        "closed", "closed", True, "closed", "open", False, "open", "open", False, "open", "half_open",
        True, "half_open", False, "half_open", "open", "half_open", True, "half_open", "closed", True, "closed",
    ]
    assert [s for _, s in br.transitions] == ["open", "half_open", "open", "half_open", "closed"]
