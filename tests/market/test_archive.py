"""MKT-6: the daily-archive downloader against a loopback server serving real committed klines as archive days."""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cambium.cli import app as cli
from cambium.core.errors import DataError, ProtocolError
from cambium.market.archive import archive_file, days, download_archive
from cambium.market.importers import read_kline_file

REPO = Path(__file__).resolve().parents[2]
KLINES = REPO / "data/samples/market/klines_1m_futures/BTCUSDT_2023-07.csv.gz"


def _day_csv(day: str) -> bytes:
    """One UTC day of the committed BTCUSDT 1 m bars in Binance's 12-field archive CSV (with header)."""
    import datetime as dt

    start = int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp() * 1000)
    lines = ["open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,"
             "taker_buy_quote_volume,ignore"]
    with gzip.open(KLINES, "rt") as fh:
        for row in fh.read().splitlines()[1:]:
            t, o, h, lo, c, v = row.split(",")
            if start <= int(t) < start + 86_400_000:
                lines.append(f"{t},{o},{h},{lo},{c},{v},{int(t) + 59_999},0,0,0,0,0")
    return ("\n".join(lines) + "\n").encode()


def _zip(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


class Archive:
    """Serves `files` (path → body) on 127.0.0.1; anything else is 404. Records the paths asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.asked = files, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.asked.append(self.path)
                body = owner.files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("content-length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _day_files(day: str, *, checksum: str | None = None) -> dict[str, bytes]:
    rel = archive_file("futures", "klines", "BTCUSDT", day)
    name = rel.rsplit("/", 1)[1]
    body = _zip(name.replace(".zip", ".csv"), _day_csv(day))
    digest = checksum or hashlib.sha256(body).hexdigest()
    return {rel: body, rel + ".CHECKSUM": f"{digest}  {name}\n".encode()}


@pytest.fixture
def archive() -> Iterator[Archive]:
    srv = Archive({**_day_files("2023-07-20"), **_day_files("2023-07-21")})
    yield srv
    srv.close()


def test_days_are_fetched_verified_stored_and_resumed(archive: Archive, tmp_path: Path) -> None:
    wanted = days("2023-07-20", "2023-07-22")
    with httpx.Client() as client:
        report = download_archive(client, tmp_path, "futures", "klines", ["BTCUSDT"], wanted, base_url=archive.url)
        assert [p.name for p in report.written] == ["BTCUSDT-1m-2023-07-20.csv.gz", "BTCUSDT-1m-2023-07-21.csv.gz"]
        assert report.missing == [f"{archive.url}/{archive_file('futures', 'klines', 'BTCUSDT', '2023-07-22')}"]
        candles = read_kline_file(report.written[0])
        assert candles.table.num_rows == 1440 and candles.fmt == "binance_csv" and candles.symbol == "BTCUSDT"
        asked = len(archive.asked)
        again = download_archive(client, tmp_path, "futures", "klines", ["BTCUSDT"], wanted, base_url=archive.url)
    assert again.skipped == report.written and len(archive.asked) == asked + 1  # only the missing day is asked again


def test_a_checksum_mismatch_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    srv = Archive(_day_files("2023-07-20", checksum="0" * 64))
    try:
        with httpx.Client() as client, pytest.raises(DataError, match="differs from its CHECKSUM"):
            download_archive(client, tmp_path, "futures", "klines", ["BTCUSDT"], ["2023-07-20"], base_url=srv.url)
    finally:
        srv.close()
    assert not list(tmp_path.rglob("*.csv.gz"))


def test_the_cli_downloads_with_a_progress_bar(archive: Archive, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["market", "archive", "--kind", "klines", "--symbols", "btcusdt", "--start",
                                      "2023-07-20", "--end", "2023-07-21", "--out", str(tmp_path), "--base-url",
                                      archive.url])
    assert result.exit_code == 0, result.output
    assert "2 days written" in result.output
    assert len(list((tmp_path / "futures" / "klines" / "BTCUSDT").glob("*.csv.gz"))) == 2


@pytest.mark.parametrize(("args", "match"), [
    (("futures", "trades", "BTCUSDT", "2024-01-01"), "kind="),
    (("spot", "bookTicker", "BTCUSDT", "2024-01-01"), "futures only"),
    (("futures", "klines", "btc/../x", "2024-01-01"), "symbol="),
    (("options", "klines", "BTCUSDT", "2024-01-01"), "market="),
])
def test_bad_requests_are_named(args: tuple[str, ...], match: str) -> None:
    with pytest.raises(DataError, match=match):
        archive_file(*args)
    with pytest.raises(DataError, match="YYYY-MM-DD"):
        days("2024-13-01", "2024-12-01")
    with pytest.raises(DataError, match="before"):
        days("2024-02-01", "2024-01-01")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(zip_body=st.binary(max_size=300), checksum=st.binary(max_size=120), status=st.sampled_from([200, 500, 403]))
def test_hostile_archive_answers_give_a_clear_error(tmp_path: Path, zip_body: bytes, checksum: bytes,
                                                     status: int) -> None:
    rel = archive_file("futures", "aggTrades", "BTCUSDT", "2024-08-08")

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".CHECKSUM"):
            return httpx.Response(200, content=checksum)
        return httpx.Response(status, content=zip_body)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        try:
            download_archive(client, tmp_path, "futures", "aggTrades", ["BTCUSDT"], ["2024-08-08"],
                             base_url="http://archive.test", sleep=lambda _: None)
        except (DataError, ProtocolError) as exc:
            assert str(exc)
    assert rel.endswith(".zip") and not list(tmp_path.rglob("*.tmp"))


def _flaky(files: dict[str, bytes], failures: list[object]) -> httpx.MockTransport:
    """Serves `files`; each URL first meets `failures` in turn (an HTTP status, or "drop" for a connection error)."""
    seen: dict[str, int] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path.lstrip("/")
        n = seen[path] = seen.get(path, 0) + 1
        if n <= len(failures):
            failure = failures[n - 1]
            if failure == "drop":
                raise httpx.ConnectError("connection reset", request=request)
            assert isinstance(failure, tuple)
            return httpx.Response(failure[0], headers=failure[1])
        body = files.get(path)
        return httpx.Response(200 if body is not None else 404, content=body or b"")

    return httpx.MockTransport(answer)


def test_blips_are_retried_with_backoff_and_the_day_is_kept(tmp_path: Path) -> None:
    import random

    slept: list[float] = []
    transport = _flaky(_day_files("2023-07-20"), ["drop", (503, {}), (429, {"retry-after": "7"})])
    with httpx.Client(transport=transport) as client:
        report = download_archive(client, tmp_path, "futures", "klines", ["BTCUSDT"], ["2023-07-20"],
                                  base_url="http://archive.test", sleep=slept.append, rng=random.Random(0),
                                  backoff_s=0.5)
    assert [p.name for p in report.written] == ["BTCUSDT-1m-2023-07-20.csv.gz"]
    assert report.retried == 6 and len(slept) == 6  # three failures for the zip and three for its CHECKSUM
    assert slept[0] <= 0.5 and slept[1] <= 1.0 and slept[2] == 7.0  # full-jitter ceilings, then Retry-After
    assert read_kline_file(report.written[0]).table.num_rows == 1440


@pytest.mark.parametrize(("failures", "retries", "match", "asked"), [
    ([(503, {})] * 5, 2, "HTTP 503 after 3 attempts", 3),
    (["drop"] * 5, 1, "failed after 2 attempts: ConnectError", 2),
    ([(403, {})], 4, "answered HTTP 403$", 1),  # not a blip: never retried
    ([(418, {})], 4, "answered HTTP 418$", 1),  # banned: retrying would extend the ban
])
def test_failures_that_outlast_the_retries_are_named(tmp_path: Path, failures: list[object], retries: int,
                                                     match: str, asked: int) -> None:
    slept: list[float] = []
    with httpx.Client(transport=_flaky(_day_files("2023-07-20"), failures)) as client, \
            pytest.raises(ProtocolError, match=match):
        download_archive(client, tmp_path, "futures", "klines", ["BTCUSDT"], ["2023-07-20"],
                         base_url="http://archive.test", sleep=slept.append, retries=retries)
    assert len(slept) == asked - 1 and not list(tmp_path.rglob("*.csv.gz"))


@settings(max_examples=40, deadline=None)
@given(header=st.text(max_size=30))
def test_any_retry_after_header_gives_a_bounded_wait(header: str) -> None:
    import tempfile

    slept: list[float] = []
    transport = _flaky(_day_files("2023-07-20"), [(429, {"retry-after": header})])
    with tempfile.TemporaryDirectory() as out, httpx.Client(transport=transport) as client:
        try:
            download_archive(client, out, "futures", "klines", ["BTCUSDT"], ["2023-07-20"],
                             base_url="http://archive.test", sleep=slept.append, backoff_s=0.0)
        except UnicodeEncodeError:  # a header httpx itself refuses to build
            return
    assert len(slept) == 2 and all(0.0 <= s <= 300.0 for s in slept)  # one 429 for the zip, one for its CHECKSUM
