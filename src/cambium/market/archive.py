"""MKT-6: Binance's public daily archives (data.binance.vision): aggTrades, bookTicker and klines, checked and kept.

Layout of the archive (`base_url`, default https://data.binance.vision):

    data/futures/um/daily/<kind>/<SYMBOL>/<SYMBOL>-<kind>-<YYYY-MM-DD>.zip          aggTrades, bookTicker
    data/futures/um/daily/klines/<SYMBOL>/<interval>/<SYMBOL>-<interval>-<YYYY-MM-DD>.zip
    data/spot/daily/...                                                            the same for spot
    each with `<file>.zip.CHECKSUM`: "<sha256 hex>  <file>.zip"

Each day's zip is fetched with its checksum file, its sha256 compared, its single CSV member extracted and written
gzip-compressed to `<out>/<market>/<kind>/<SYMBOL>/<stem>.csv.gz` (atomically: a temporary name, then a rename), so
kline days are read directly by `cambium market import` / `read_kline_file` (format `binance_csv`) and by
`cambium screener train` (`train.data`). A day already on disk is skipped (a rerun resumes). A day the archive does
not have (HTTP 404: not published yet, or before the listing) is reported as missing, not fatal; a checksum that
does not match, a body that is not a zip of one CSV, or any other HTTP status is a clear error naming the URL.
`archive_events.py` turns the stored aggTrades and bookTicker days of a symbol into MarketEvents for the feature engine
(`cambium screener train` with `train.source = "ticks"`).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import os
import random
import re
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cambium.core.errors import DataError, ProtocolError
from cambium.market.limits import Backoff, parse_retry_after

__all__ = ["ARCHIVE_KINDS", "ARCHIVE_URL", "ArchiveReport", "archive_file", "days", "download_archive"]

ARCHIVE_URL = "https://data.binance.vision"
ARCHIVE_KINDS = ("aggTrades", "bookTicker", "klines")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
_MAX_BYTES = 2_000_000_000


@dataclass
class ArchiveReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    """URLs the archive answered 404 for."""
    retried: int = 0
    """Requests retried after a connection error, timeout, HTTP 5xx or 429."""


def days(start: str, end: str) -> list[str]:
    """Every UTC day from `start` to `end` inclusive (YYYY-MM-DD); DataError on a bad or reversed range."""
    try:
        a, b = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    except ValueError:
        raise DataError(f"days must be YYYY-MM-DD: got start={start!r}, end={end!r}") from None
    if b < a:
        raise DataError(f"end={end} is before start={start}")
    if (b - a).days > 3660:
        raise DataError(f"{start} → {end} is more than ten years of days; ask for less")
    return [(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def archive_file(market: str, kind: str, symbol: str, day: str, interval: str = "1m") -> str:
    """The path of one day's zip under the archive's base URL."""
    if market not in ("futures", "spot"):
        raise DataError(f"market={market!r} must be futures or spot")
    if kind not in ARCHIVE_KINDS:
        raise DataError(f"kind={kind!r} must be one of {ARCHIVE_KINDS}")
    if not _SYMBOL.match(symbol):
        raise DataError(f"symbol={symbol!r} must be upper-case letters and digits, e.g. BTCUSDT")
    if kind == "bookTicker" and market == "spot":
        raise DataError("the archive has bookTicker days for USDⓈ-M futures only")
    if not re.fullmatch(r"\d+[smhdwM]", interval):
        raise DataError(f"interval={interval!r} is not a kline interval such as 1m")
    root = "data/futures/um/daily" if market == "futures" else "data/spot/daily"
    if kind == "klines":
        return f"{root}/klines/{symbol}/{interval}/{symbol}-{interval}-{day}.zip"
    return f"{root}/{kind}/{symbol}/{symbol}-{kind}-{day}.zip"


@dataclass
class _Fetcher:
    """GET with retries: connection errors, timeouts, 5xx and 429 are retried (`retries` times at most)."""

    client: httpx.Client
    retries: int
    backoff: Backoff
    sleep: Callable[[float], None]
    retried: int = 0

    def get(self, url: str) -> bytes | None:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self.client.get(url)
            except httpx.HTTPError as exc:
                if last:
                    raise ProtocolError(f"GET {url} failed after {attempt + 1} attempts: {type(exc).__name__}: "
                                        f"{exc}") from None
                self._wait(self.backoff.delay(attempt))
                continue
            if response.status_code == 200:
                return response.content
            if response.status_code == 404:
                return None
            if response.status_code == 429 or response.status_code >= 500:
                if last:
                    raise ProtocolError(f"GET {url} answered HTTP {response.status_code} after {attempt + 1} "
                                        f"attempts")
                self._wait(max(self.backoff.delay(attempt),
                                   parse_retry_after(response.headers.get("retry-after"), cap_s=300.0) or 0.0))
                continue
            raise ProtocolError(f"GET {url} answered HTTP {response.status_code}")
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _wait(self, seconds: float) -> None:
        self.retried += 1
        self.sleep(seconds)


def _checksum(text: bytes, url: str, name: str) -> str:
    parts = text.decode("ascii", errors="replace").split()
    if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]) or parts[1] != name:
        raise DataError(f"{url}: expected '<sha256 hex>  {name}', got {text[:120]!r}")
    return parts[0]


def _csv_of(body: bytes, url: str) -> bytes:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            if len(members) != 1 or not members[0].filename.endswith(".csv"):
                raise DataError(f"{url}: expected a zip of one .csv, found {[m.filename for m in members][:5]}")
            if members[0].file_size > _MAX_BYTES:
                raise DataError(f"{url}: its CSV unpacks to {members[0].file_size} bytes (over {_MAX_BYTES})")
            return zf.read(members[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as exc:
        raise DataError(f"{url}: not a readable zip: {exc}") from None


def download_archive(client: httpx.Client, out: str | Path, market: str, kind: str, symbols: Sequence[str],
                     day_list: Sequence[str], *, interval: str = "1m", base_url: str = ARCHIVE_URL,
                     on_day: Callable[[str], None] | None = None, retries: int = 4, backoff_s: float = 1.0,
                     sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> ArchiveReport:
    """Fetch, verify and store every (symbol, day); `on_day(path)` after each (a progress bar advances on it).
    `retries`, `backoff_s` (first back-off ceiling, doubling to 60 s), `sleep` and `rng` shape the retries."""
    if retries < 0 or backoff_s < 0:
        raise DataError(f"retries={retries} and backoff_s={backoff_s} must be ≥ 0")
    out = Path(out)
    report = ArchiveReport()
    fetch = _Fetcher(client, retries, Backoff(backoff_s, 60.0, rng or random.Random()), sleep)
    for symbol in symbols:
        for day in day_list:
            rel = archive_file(market, kind, symbol, day, interval)
            name = rel.rsplit("/", 1)[1]
            target = out / market / kind / symbol / (name[: -len(".zip")] + ".csv.gz")
            url = f"{base_url.rstrip('/')}/{rel}"
            if target.is_file():
                report.skipped.append(target)
            else:
                body = fetch.get(url)
                if body is None:
                    report.missing.append(url)
                else:
                    listed = fetch.get(url + ".CHECKSUM")
                    if listed is None:
                        raise DataError(f"{url}.CHECKSUM is missing: the zip cannot be verified")
                    want, got = _checksum(listed, url + ".CHECKSUM", name), hashlib.sha256(body).hexdigest()
                    if want != got:
                        raise DataError(f"{url}: sha256 {got} differs from its CHECKSUM file's {want}")
                    csv = _csv_of(body, url)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".tmp")
                    # mtime=0: the stored bytes depend on the CSV only
                    tmp.write_bytes(gzip.compress(csv, mtime=0))
                    os.replace(tmp, target)
                    report.written.append(target)
            if on_day is not None:
                on_day(url)
    report.retried = fetch.retried
    return report
