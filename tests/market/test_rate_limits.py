"""Issue 18: HTTP 429/418 on websocket handshakes and REST requests. The connector (on each websocket client) holds
off for the server's Retry-After (a 418 without one: ws.ban_backoff_s), counts the incident and logs it as one JSON
line with a correlation id; the REST client does the same for its requests. Retry-After values are fuzzed."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import itertools
import json
import logging
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.progress import JsonFormatter, log_context
from cambium.market.binance import binance_usdm_venue
from cambium.market.binance_rest import IpBanned, RestClient
from cambium.market.captures import iter_hftbacktest
from cambium.market.config import RestConfig, WsConfig
from cambium.market.connector import Connector
from cambium.market.limits import MAX_RETRY_AFTER_S, parse_retry_after
from cambium.market.recorder import Record

from .fake_binance import FakeBinance, RateLimitedStreams

BTC = "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"


@pytest.fixture(scope="module")
def records(samples: Path) -> list[Record]:
    return list(itertools.islice(iter_hftbacktest(samples / BTC), 1500))


def _incident_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    fmt = JsonFormatter()
    lines = [fmt.format(r) for r in caplog.records if getattr(r, "event", None) == "rate_limit_incident"]
    assert all("\n" not in line for line in lines)  # one line each
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("client", ["websockets", "picows"])
def test_handshake_429_and_418_hold_off_count_and_log(records: list[Record], client: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cambium.market")

    async def go() -> tuple[RateLimitedStreams, Connector, list[str], list[str]]:
        refusals: list[tuple[int, str | None]] = [(429, "1"), (418, None)]
        async with RateLimitedStreams(records, refusals) as srv:
            cfg = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"),
                           backoff_base_s=0.005, backoff_cap_s=0.01, ping_interval_s=None, client=client,
                           ban_backoff_s=0.4)
            conn = Connector(binance_usdm_venue(cfg), ["btcusdt@bookTicker"], cfg)
            want = srv.frames_for({"btcusdt@bookTicker"})
            got: list[str] = []
            async with conn:
                async for rec, _ in conn.deliveries():
                    got.append(rec.frame)
                    if len(got) == len(want):
                        break
            return srv, conn, got, want

    srv, conn, got, want = asyncio.run(asyncio.wait_for(go(), 60))
    assert got == want  # nothing lost once served
    assert [s for _, s in srv.handshakes] == [429, 418, 101]
    (t429, _), (t418, _), (t101, _) = srv.handshakes
    assert t418 - t429 >= 1.0 - 0.02  # Retry-After: 1 honoured
    assert t101 - t418 >= 0.4 - 0.02  # a 418 without Retry-After: ws.ban_backoff_s
    st = conn.stats[0]
    assert st.incidents == {"429": 1, "418": 1} and st.handshake_failures == 2
    lines = _incident_lines(caplog)
    assert [(d["source"], d["status"], d["retry_after"], d["hold_s"]) for d in lines] == [
        ("ws", 429, "1", 1.0), ("ws", 418, None, 0.4)]
    ids = [str(d["incident_id"]) for d in lines]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids) and len(set(ids)) == 2
    assert all(str(d["conn_id"]).startswith(conn.conn_tag) for d in lines)  # the connection's correlation id too


def test_rest_429_honours_retry_after_and_418_stops_with_a_logged_incident(caplog: pytest.LogCaptureFixture,
                                                                         tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="cambium.market")
    slept: list[float] = []
    with FakeBinance({}, faults={1: ("429", 3), 3: ("418", 600)}) as fake, \
            RestClient("futures", RestConfig(futures_url=fake.url), sleep=slept.append,
                       incident_log=tmp_path / "incidents.jsonl") as client:
        assert client.get("/exchangeInfo") == {"rateLimits": [], "symbols": []}
        assert ("429", 3.0) in client.slept
        with pytest.raises(IpBanned) as info:
            client.get("/exchangeInfo")
    assert info.value.retry_after_s == 600.0
    assert dict(client.incident_counts) == {"429": 1, "418": 1}
    lines = _incident_lines(caplog)
    assert [(d["source"], d["status"]) for d in lines] == [("rest", 429), ("rest", 418)]
    stored = [json.loads(line) for line in (tmp_path / "incidents.jsonl").read_text().splitlines()]
    assert [d["incident_id"] for d in stored] == [d["incident_id"] for d in lines]
    assert str(lines[1]["incident_id"]) in str(info.value)  # the ban's message names its incident


def test_log_context_fields_reach_the_json_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cambium.test")
    log = logging.getLogger("cambium.test")
    with log_context(batch_id="b1"):
        with log_context(conn_id="c1"):
            log.info("inside", extra={"conn_id": "own"})
        log.info("outer")
    log.info("after")
    out = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert [(d.get("batch_id"), d.get("conn_id")) for d in out] == [("b1", "own"), ("b1", None), (None, None)]


# --- Retry-After values ------------------------------------------------------------------------------------------

def test_retry_after_forms() -> None:
    now = 1_700_000_000.0
    date = email.utils.format_datetime(datetime.datetime.fromtimestamp(now + 90, datetime.UTC), usegmt=True)
    assert parse_retry_after("120") == 120.0 and parse_retry_after(" 7 ") == 7.0 and parse_retry_after(5) == 5.0
    assert parse_retry_after(date, now=now) == pytest.approx(90.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0  # in the past: go now
    assert parse_retry_after(str(10**12)) == MAX_RETRY_AFTER_S
    for bad in (None, "", "-1", "nan", "inf", "1e3", "0x10", "+5", "soon", True, float("nan"), -3, [1], b"\xff"):
        assert parse_retry_after(bad) is None, bad


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                       st.binary(max_size=20), st.none(), st.booleans(),
                       st.datetimes(timezones=st.just(datetime.UTC)).map(
                           lambda d: email.utils.format_datetime(d, usegmt=True)),
                       st.integers(0, 10**7).map(str)))
def test_fuzzed_retry_after_is_none_or_a_bounded_delay(value: object) -> None:
    got = parse_retry_after(value, now=1_700_000_000.0)
    assert got is None or 0.0 <= got <= MAX_RETRY_AFTER_S
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        assert got == min(float(value), MAX_RETRY_AFTER_S)
