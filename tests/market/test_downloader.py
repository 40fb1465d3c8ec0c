from __future__ import annotations

import gzip
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from cambium.core.errors import ProtocolError
from cambium.market.binance_rest import IpBanned, RestClient, parse_exchange_info
from cambium.market.config import RestConfig
from cambium.market.downloader import download_klines
from cambium.market.importers import read_kline_file
from cambium.market.store import CandleStore

from .fake_binance import FakeBinance, futures_rows, spot_rows

SPOT = ("BTCUSDT", "ETHUSDT")
FUT = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT")
EXINFO = "rest/fapi_v1_exchangeInfo_2021-07-22.json.gz"


class TopOfRange(random.Random):
    """A jitter source that always draws the top of the range, so back-off waits are their ceilings."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeWall:
    """Shared by the client (wall clock, sleep) and the server (weight windows): sleeping costs no real time."""

    def __init__(self, now: float = 1_748_000_000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.fixture(scope="module")
def spot(samples: Path) -> dict[str, list]:
    return {s: spot_rows(samples / f"klines_1h_spot/{s}.csv.gz") for s in SPOT}


@pytest.fixture(scope="module")
def fut(samples: Path) -> dict[str, list]:
    return {s: futures_rows(samples / f"klines_1h_futures/{s}.csv.gz") for s in FUT}


def _client(market: str, url: str, wall: FakeWall, **kw: object) -> RestClient:
    key = "spot_url" if market == "spot" else "futures_url"
    cfg = RestConfig.model_validate({key: url, **kw})
    return RestClient(market, cfg, wall=wall, sleep=wall.sleep, rng=TopOfRange())


def _download(client: RestClient, root: Path, symbols, rows, **kw):
    store = CandleStore(root, client.market)
    last = max(r[-1][0] for r in rows.values())
    return store, download_klines(client, store, symbols, "1h", 0, now_ms=lambda: last + 3_600_000, **kw)


def test_download_equals_committed_candles_through_429_5xx_and_malformed(samples: Path, spot, tmp_path) -> None:
    wall = FakeWall()
    faults = {2: ("429", 7), 5: ("5xx", 503), 8: ("malformed",), 9: ("5xx", 502), 14: ("429", 3)}
    with FakeBinance(spot, faults=faults, clock=wall) as srv, _client("spot", srv.url, wall) as client:
        store, report = _download(client, tmp_path, SPOT, spot)
    for s in SPOT:
        want = read_kline_file(samples / f"klines_1h_spot/{s}.csv.gz").table
        assert store.read(s, "1h").equals(want)
        assert report.candles[s] == want.num_rows == 9458
    assert report.pages == 20 and report.requests == 20 + len(faults)  # 10 pages of 1000 per symbol
    assert [i["status"] for i in report.incidents] == [429, 429]
    assert [w for w in client.slept if w[0] == "429"] == [("429", 7.0), ("429", 3.0)]
    # 5xx and the malformed body are retried with exponential back-off: ceilings 1 s, then 1 s and 2 s in a row.
    assert [w for w in client.slept if w[0] == "retry"] == [("retry", 1.0), ("retry", 1.0), ("retry", 2.0)]
    assert client.budget_scale == 0.25  # halved on each 429


def test_418_stops_at_once_reports_the_ban_and_resumes_later(spot, tmp_path) -> None:
    wall = FakeWall()
    log = tmp_path / "incidents.jsonl"
    with FakeBinance(spot, faults={4: ("418", 300)}, clock=wall) as srv:
        cfg = RestConfig(spot_url=srv.url)
        client = RestClient("spot", cfg, wall=wall, sleep=wall.sleep, incident_log=log)
        with client, pytest.raises(IpBanned) as exc:
            _download(client, tmp_path / "a", SPOT, spot)
        assert len(srv.log) == 4  # nothing was requested after the 418
        assert exc.value.retry_after_s == 300 and exc.value.until_ms == int((wall.now + 300) * 1000)
        assert "banned for 300 s" in str(exc.value)
        rec = orjson.loads(log.read_bytes().splitlines()[0])
        assert rec["status"] == 418 and rec["retry_after_s"] == 300
        assert CandleStore(tmp_path / "a", "spot").last_open_time("BTCUSDT", "1h") == spot["BTCUSDT"][2999][0]
        wall.now += 300
        with _client("spot", srv.url, wall) as client:
            _download(client, tmp_path / "a", SPOT, spot)
        with _client("spot", srv.url, wall) as client:
            _download(client, tmp_path / "b", SPOT, spot)
    for s in SPOT:
        a, b = (CandleStore(tmp_path / d, "spot").path(s, "1h").read_bytes() for d in "ab")
        assert a == b


def test_weight_headers_keep_the_client_under_the_limit(samples: Path, fut, tmp_path) -> None:
    body = orjson.loads(gzip.decompress((samples / EXINFO).read_bytes()))
    for r in body["rateLimits"]:
        if r["rateLimitType"] == "REQUEST_WEIGHT":
            r["limit"] = 50  # a small limit so that a few pages cross it (the real one is 2400)
    wall = FakeWall()
    srv = FakeBinance(fut, exchange_info=orjson.dumps(body), weight_limit=50, clock=wall)
    with srv, _client("futures", srv.url, wall) as client:
        client.exchange_info()
        assert client.weight_limit == 50 and client.budget == 40
        store, _report = _download(client, tmp_path, FUT[:3], fut)
    assert all(status == 200 for _, _, status, _ in srv.log)  # never a 429
    assert max(used for *_, used in srv.log) <= 40
    kline_weights = {q["limit"] for p, q, *_ in srv.log if p.endswith("klines")}
    assert kline_weights == {"1500"}  # weight 10 each
    assert len([w for w in client.slept if w[0] == "weight"]) >= 2
    for s in FUT[:3]:
        got = store.read(s, "1h").drop_columns(["taker_buy_base", "taker_buy_quote"])
        want = read_kline_file(samples / f"klines_1h_futures/{s}.csv.gz").table
        assert got.equals(want.drop_columns(["taker_buy_base", "taker_buy_quote"]))


def test_exchange_info_and_top_by_quote_volume(samples: Path, fut) -> None:
    raw = gzip.decompress((samples / EXINFO).read_bytes())
    symbols, limit = parse_exchange_info(orjson.loads(raw))
    assert limit == 2400 and len(symbols) == 122
    btc = symbols["BTCUSDT"]
    assert (btc.status, btc.tick_size, btc.step_size, btc.contract_type) == ("TRADING", 0.01, 0.001, "PERPETUAL")
    wall = FakeWall()
    with FakeBinance(fut, exchange_info=raw, clock=wall) as srv, _client("futures", srv.url, wall) as client:
        top = client.top_by_quote_volume(3)
    vol = {s: sum(float(r[7]) for r in rows[-24:]) for s, rows in fut.items() if s in symbols}
    assert top == sorted(vol, key=lambda s: -vol[s])[:3]


def test_persistent_5xx_and_bad_requests_raise(spot, tmp_path) -> None:
    wall = FakeWall()
    faults = {k: ("5xx", 500) for k in range(1, 4)}
    with FakeBinance(spot, faults=faults, clock=wall) as srv, _client("spot", srv.url, wall, max_retries=2) as cl:
        with pytest.raises(ProtocolError, match="HTTP 500; gave up after 3 attempts"):
            cl.klines("BTCUSDT", "1h", 0)
        with pytest.raises(ProtocolError, match="HTTP 404"):
            cl.get("/nope")


def test_interrupted_after_any_page_and_restarted_gives_identical_files(spot, tmp_path) -> None:
    wall = FakeWall()
    with FakeBinance(spot, clock=wall) as srv:
        with _client("spot", srv.url, wall) as client:
            _download(client, tmp_path / "full", SPOT, spot)
        reference = {s: CandleStore(tmp_path / "full", "spot").path(s, "1h").read_bytes() for s in SPOT}
        for stop_at in (3, 12):  # inside the first symbol, and just after the second one started

            def interrupt(symbol: str, rows: int, pages: list[int] = [0], stop_at: int = stop_at) -> None:  # noqa: B006
                pages[0] += 1
                if pages[0] == stop_at:
                    raise KeyboardInterrupt

            root = tmp_path / f"stop{stop_at}"
            with _client("spot", srv.url, wall) as client, pytest.raises(KeyboardInterrupt):
                _download(client, root, SPOT, spot, on_page=interrupt)
            with _client("spot", srv.url, wall) as client:
                _download(client, root, SPOT, spot)
            assert {s: CandleStore(root, "spot").path(s, "1h").read_bytes() for s in SPOT} == reference


def test_cli_download_killed_mid_run_and_restarted_is_identical(spot, tmp_path) -> None:
    until = str(spot["BTCUSDT"][-1][0])
    with FakeBinance(spot, delay_s=0.03) as srv:
        def cmd(root: Path) -> list[str]:
            return [sys.executable, "-c", "from cambium.market.cli import app; app()", "download", "--market", "spot",
                    "--symbols", ",".join(SPOT), "--since", "2024-01-01", "--until", until,
                    "--set", f"store.root={root}", "--set", f"rest.spot_url={srv.url}"]

        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        full = subprocess.run(cmd(tmp_path / "full"), env=env, capture_output=True, text=True, timeout=120)
        assert full.returncode == 0, full.stderr
        assert "BTCUSDT: 9458 new candles" in full.stdout
        victim = CandleStore(tmp_path / "killed", "spot").path("ETHUSDT", "1h")
        proc = subprocess.Popen(cmd(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not victim.exists() and time.monotonic() < deadline:  # kill it in the middle of the second symbol
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        partial = CandleStore(tmp_path / "killed", "spot").read("ETHUSDT", "1h").num_rows
        assert 0 < partial < 9458
        again = subprocess.run(cmd(tmp_path / "killed"), env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "BTCUSDT: 0 new candles" in again.stdout and f"ETHUSDT: {9458 - partial} new candles" in again.stdout
    for s in SPOT:
        a, b = (CandleStore(tmp_path / d, "spot").path(s, "1h").read_bytes() for d in ("full", "killed"))
        assert a == b


def test_retry_back_off_has_full_jitter_so_parallel_clients_do_not_retry_in_lockstep() -> None:
    """Issue 14: the REST client used a fixed base·2ⁿ; it now draws U(0, min(cap, base·2ⁿ)) like the connector."""
    cfg = RestConfig(backoff_base_s=1.0, backoff_cap_s=8.0)
    waits = []
    for seed in (1, 2):
        client = RestClient("spot", cfg, rng=random.Random(seed))
        waits.append([client._backoff(n) for n in range(6)])
        client.close()
    assert waits[0] != waits[1]
    for w in waits:
        assert all(0.0 <= x <= min(8.0, 2.0**n) for n, x in enumerate(w))
    assert len(set(waits[0])) == 6  # not a fixed schedule
