from __future__ import annotations

import gzip
import re
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from cambium.core.errors import DataError
from cambium.market.candles import CANDLE_SCHEMA, fill_gaps, find_gaps
from cambium.market.cli import app
from cambium.market.importers import detect_format, read_kline_file
from cambium.market.store import CandleStore


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


@pytest.mark.parametrize(
    ("rel", "fmt", "symbol", "interval"),
    [
        ("klines_1h_futures/BTCUSDT.csv.gz", "futures_rest", "BTCUSDT", "1h"),
        ("klines_1h_futures_long/ETHUSDT.csv.gz", "ohlcv", "ETHUSDT", "1h"),
        ("klines_1m_futures/BTCUSDT_2023-07.csv.gz", "ohlcv", "BTCUSDT", "1m"),
        ("klines_1h_spot/BTCUSDT.csv.gz", "spot_full", "BTCUSDT", "1h"),
    ],
)
def test_every_sample_format_imports_exactly(samples: Path, rel: str, fmt: str, symbol: str, interval: str) -> None:
    path = samples / rel
    got = read_kline_file(path)
    lines = _lines(path)
    assert (got.fmt, got.symbol, got.interval) == (fmt, symbol, interval)
    assert got.table.num_rows == len(lines) - 1
    assert got.table.schema == CANDLE_SCHEMA
    header = lines[0].split(",")
    for k in (1, len(lines) // 2, len(lines) - 1):
        row = dict(zip(header, lines[k].split(","), strict=False))
        rec = got.table.slice(k - 1, 1).to_pylist()[0]
        for name in ("open", "high", "low", "close", "volume"):
            assert rec[name] == float(row[name])
        if fmt == "futures_rest":
            assert rec["open_time"] == int(row["timestamp"]) and rec["trades"] == int(row["trades"])
            assert rec["quote_volume"] == float(row["quote_volume"]) and rec["taker_buy_base"] is None
        if fmt == "spot_full":
            assert rec["open_time"] == int(row["close_time"]) - 3_599_999
            assert rec["taker_buy_quote"] == float(row["taker_buy_quote"]) and rec["trades"] == int(row["num_trades"])
        if fmt == "ohlcv":
            assert rec["open_time"] == int(row["open_time"]) and rec["quote_volume"] is None


def _spot_rows(samples: Path, n: int) -> list[list[str]]:
    lines = _lines(samples / "klines_1h_spot/ETHUSDT.csv.gz")[1 : n + 1]
    out = []
    for line in lines:
        f = line.split(",")
        open_ms = int(f[6]) - 3_599_999
        out.append([str(open_ms), *f[1:6], f[6], *f[7:12]])
    return out


def test_binance_vision_csv_with_microseconds_and_rest_json(samples: Path, tmp_path: Path) -> None:
    rows = _spot_rows(samples, 30)
    plain = tmp_path / "ETHUSDT-1h-2024-05.csv"
    plain.write_text("\n".join(",".join(r) for r in rows) + "\n")
    micro = tmp_path / "ETHUSDT-1h-2025-01.csv"
    micro.write_text("\n".join(",".join([str(int(r[0]) * 1000), *r[1:]]) for r in rows) + "\n")
    js = tmp_path / "ETHUSDT.json.gz"
    rest = [[int(r[0]), *r[1:6], int(r[6]), r[7], int(r[8]), *r[9:12]] for r in rows]
    js.write_bytes(gzip.compress(orjson.dumps(rest)))
    assert detect_format(plain) == "binance_csv" and detect_format(js) == "rest_json"
    a, b, c = read_kline_file(plain), read_kline_file(micro), read_kline_file(js)
    assert a.table.equals(b.table) and a.table.equals(c.table)
    assert (a.symbol, a.interval) == ("ETHUSDT", "1h")
    assert a.table.column("trades")[0].as_py() == int(rows[0][8])


def _corrupt(samples: Path, tmp_path: Path, edit) -> Path:
    lines = _lines(samples / "klines_1h_futures/ETHUSDT.csv.gz")[:40]
    edit(lines)
    out = tmp_path / "ETHUSDT.csv.gz"
    out.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return out


def _set(lines: list[str], k: int, col: int, value: str) -> None:
    f = lines[k].split(",")
    f[col] = value
    lines[k] = ",".join(f)


@pytest.mark.parametrize(
    ("edit", "row", "rule"),
    [
        (lambda ls: _set(ls, 5, 4, "nan"), 4, "finite"),
        (lambda ls: ls.__setitem__(8, ls[7]), 7, "duplicate"),
        (lambda ls: ls.__setitem__(slice(10, 12), [ls[11], ls[10]]), 10, "out-of-order"),
        (lambda ls: _set(ls, 12, 3, "1e9"), 11, "high>=low"),
        (lambda ls: _set(ls, 20, 5, "-3.5"), 19, "non-negative"),
        (lambda ls: _set(ls, 21, 2, ls[21].split(",")[3]), 20, "high>=max(open,close)"),
        (lambda ls: _set(ls, 25, 0, str(int(ls[25].split(",")[0]) + 1500)), 24, "aligned"),
    ],
)
def test_corrupted_files_name_file_row_and_rule(samples: Path, tmp_path: Path, edit, row: int, rule: str) -> None:
    path = _corrupt(samples, tmp_path, edit)
    with pytest.raises(DataError) as exc:
        read_kline_file(path, interval="1h")
    msg = str(exc.value)
    assert str(path) in msg
    assert f"row {row} (line {row + 2})" in msg
    assert f"rule '{rule}'" in msg


def test_gaps_are_reported_and_filled_only_on_request(samples: Path, tmp_path: Path) -> None:
    got = read_kline_file(samples / "klines_1h_futures/SOLUSDT.csv.gz")
    keep = np.ones(got.table.num_rows, dtype=bool)
    keep[[10, 11, 12, 100, 2000]] = False
    holed = got.table.filter(pa.array(keep))
    report = find_gaps(holed.column("open_time").to_numpy(), "1h")
    assert (report.count, report.missing_bars, report.longest_bars) == (3, 5, 3)
    assert report.longest_after_open_time == got.table.column("open_time")[9].as_py()
    store = CandleStore(tmp_path)
    store.write("SOLUSDT", "1h", holed)
    assert store.read("SOLUSDT", "1h").num_rows == holed.num_rows
    filled = store.read("SOLUSDT", "1h", fill=True)
    assert filled.num_rows == got.table.num_rows
    # Reference: a plain loop carrying the last close forward.
    rows = holed.to_pylist()
    ref: list[dict] = []
    for r in rows:
        while ref and r["open_time"] - ref[-1]["open_time"] > 3_600_000:
            prev = ref[-1]
            c = prev["close"]
            ref.append(dict(open_time=prev["open_time"] + 3_600_000, open=c, high=c, low=c, close=c, volume=0.0,
                            quote_volume=0.0, trades=0, taker_buy_base=None, taker_buy_quote=None))
        ref.append(r)
    assert filled.to_pylist() == ref
    assert fill_gaps(got.table, "1h") is got.table


def test_store_roundtrip_merge_is_deterministic_and_duckdb_reads_it(samples: Path, tmp_path: Path) -> None:
    got = read_kline_file(samples / "klines_1h_spot/ETHUSDT.csv.gz")
    a, b = CandleStore(tmp_path / "a", "spot"), CandleStore(tmp_path / "b", "spot")
    a.write("ETHUSDT", "1h", got.table)
    n = got.table.num_rows
    for lo, hi in [(5000, n), (0, 3000), (2500, 5200)]:  # overlapping pages in a scrambled order
        b.write("ETHUSDT", "1h", got.table.slice(lo, hi - lo), merge=True)
    assert a.read("ETHUSDT", "1h").equals(got.table)
    assert a.path("ETHUSDT", "1h").read_bytes() == b.path("ETHUSDT", "1h").read_bytes()
    assert a.last_open_time("ETHUSDT", "1h") == got.table.column("open_time")[-1].as_py()
    con = duckdb.connect()
    res = con.execute(
        f"select market, interval, symbol, count(*), max(high) from read_parquet('{tmp_path / 'a'}/*/*/*/*.parquet',"
        " hive_partitioning=true) group by all"
    ).fetchall()
    assert res == [("spot", "1h", "ETHUSDT", n, max(got.table.column("high").to_pylist()))]


def test_store_refuses_invalid_tables(samples: Path, tmp_path: Path) -> None:
    got = read_kline_file(samples / "klines_1h_futures/BTCUSDT.csv.gz")
    bad = pa.concat_tables([got.table.slice(0, 10), got.table.slice(5, 1)])
    with pytest.raises(DataError, match=r"row 10: rule 'out-of-order'"):
        CandleStore(tmp_path).write("BTCUSDT", "1h", bad)
    assert not CandleStore(tmp_path).path("BTCUSDT", "1h").exists()


def test_cli_import_validate_ls(samples: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    root = f"store.root={tmp_path}"
    files = [str(samples / "klines_1h_futures/BTCUSDT.csv.gz"), str(samples / "klines_1h_spot/BTCUSDT.csv.gz")]
    res = runner.invoke(app, ["import", *files, "--set", root])
    assert res.exit_code == 0, res.output
    assert "futures/1h/BTCUSDT: 4500 rows, no gaps" in res.output and "spot/1h/BTCUSDT: 9458 rows" in res.output
    res = runner.invoke(app, ["ls", "--set", root])
    assert res.exit_code == 0 and re.search(r"futures.*1h.*BTCUSDT.*4500", res.output)
    assert runner.invoke(app, ["validate", "--set", root]).exit_code == 0
    bad = _corrupt(samples, tmp_path, lambda ls: _set(ls, 5, 5, "-1"))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1 and "rule 'non-negative'" in res.output


def test_merge_keeps_columns_the_new_source_lacks(samples: Path, tmp_path: Path) -> None:
    rich = read_kline_file(samples / "klines_1h_futures/BTCUSDT.csv.gz").table  # has quote_volume and trades
    poor = read_kline_file(samples / "klines_1h_futures_long/BTCUSDT.csv.gz").table  # OHLCV only, years longer
    store = CandleStore(tmp_path)
    store.write("BTCUSDT", "1h", rich)
    store.write("BTCUSDT", "1h", poor, merge=True)
    got = store.read("BTCUSDT", "1h")
    t0, t1 = rich.column("open_time")[0].as_py(), rich.column("open_time")[-1].as_py()
    assert got.num_rows == len(set(poor.column("open_time").to_pylist()) | set(rich.column("open_time").to_pylist()))
    inside = got.filter(pc.and_(pc.greater_equal(got.column("open_time"), t0),
                                        pc.less_equal(got.column("open_time"), t1)))
    assert inside.column("quote_volume").equals(rich.column("quote_volume"))
    assert inside.column("trades").equals(rich.column("trades"))
    before = got.filter(pc.less(got.column("open_time"), t0))
    assert before.num_rows > 40000 and before.column("quote_volume").null_count == before.num_rows
