from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import orjson
import pytest

from cambium.core.errors import DataError
from cambium.market.captures import import_capture, iter_cryptofeed, iter_hftbacktest
from cambium.market.recorder import Record, Recorder, read_manifest, read_recording, recover, replay

BTC = "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"
CF = "ws/binance_cryptofeed/2021-07-22_usdm/BINANCE_FUTURES.ws.1.0.gz"


def test_hftbacktest_import_is_byte_identical_frame_for_frame(samples: Path, tmp_path: Path) -> None:
    with gzip.open(samples / BTC, "rb") as fh:
        raw_lines = fh.read().split(b"\n")
    raw_lines = [ln for ln in raw_lines if ln]
    report = import_capture(samples / BTC, tmp_path / "rec")
    assert (report.frames, report.skipped) == (len(raw_lines), 0) == (93954, 0)
    got = list(read_recording(tmp_path / "rec"))
    assert len(got) == len(raw_lines)
    for rec, line in zip(got, raw_lines, strict=True):
        stamp, frame = line.split(b" ", 1)
        assert rec.frame.encode() == frame
        assert rec.recv_ns == rec.mono_ns == int(stamp) and rec.shard == 0
    man = read_manifest(tmp_path / "rec")
    assert man["frames"] == 93954 and len(man["files"]) == 1 and man["files"][0]["name"] == "20240808T23.jsonl.gz"
    data = (tmp_path / "rec" / man["files"][0]["name"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == man["files"][0]["sha256"]


def test_cryptofeed_import_keeps_frames_and_decimal_stamps(samples: Path, tmp_path: Path) -> None:
    recs = list(iter_cryptofeed(samples / CF))
    with gzip.open(samples / CF, "rt") as fh:
        lines = [ln.rstrip("\n") for ln in fh][1:]
    lines = [ln for ln in lines if ln.strip()]
    assert len(recs) == len(lines) == 1535
    ts, frame = lines[0].split(": ", 1)
    assert recs[0].frame == frame and recs[0].recv_ns == 1626992741062170000 and ts == "1626992741.06217"
    kinds = {orjson.loads(r.frame)["stream"].split("@", 1)[1] for r in recs}
    assert {"aggTrade", "kline_1m", "bookTicker", "depth@100ms"} <= kinds


def test_hourly_files_manifest_and_corruption_detection(samples: Path, tmp_path: Path) -> None:
    recs = [r for _, r in zip(range(3000), iter_hftbacktest(samples / BTC), strict=False)]
    shift = 1723161600 * 10**9 - recs[1500].recv_ns  # move the real frames to straddle midnight: two hourly files
    with Recorder(tmp_path / "r", meta={"note": "shifted"}) as rec:
        for r in recs:
            rec.write(Record(r.recv_ns + shift, r.mono_ns, 3, r.frame))
    man = read_manifest(tmp_path / "r")
    names = [f["name"] for f in man["files"]]
    assert names == ["20240808T23.jsonl.gz", "20240809T00.jsonl.gz"]
    assert sum(f["frames"] for f in man["files"]) == 3000 == man["frames"]
    assert [r.frame for r in read_recording(tmp_path / "r")] == [r.frame for r in recs]
    assert not list((tmp_path / "r").glob("*.part"))
    with pytest.raises(DataError, match="already holds a recording"):
        Recorder(tmp_path / "r")
    with Recorder(tmp_path / "again", meta={"note": "shifted"}) as rec:  # same frames, same bytes, same sha256
        for r in recs:
            rec.write(Record(r.recv_ns + shift, r.mono_ns, 3, r.frame))
    assert read_manifest(tmp_path / "again") == man
    victim = tmp_path / "r" / names[1]
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"20240809T00\.jsonl\.gz: sha256 does not match"):
        list(read_recording(tmp_path / "r"))


def test_replay_paces_by_recorded_speed_times_factor(samples: Path, tmp_path: Path) -> None:
    recs = [r for _, r in zip(range(400), iter_hftbacktest(samples / BTC), strict=False)]
    with Recorder(tmp_path / "r") as rec:
        for r in recs:
            rec.write(r)
    assert list(replay(tmp_path / "r")) == recs
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    out = list(replay(tmp_path / "r", speed=4.0, sleep=sleep, monotonic=lambda: now[0]))
    assert out == recs
    span = (recs[-1].mono_ns - recs[0].mono_ns) / 1e9
    assert now[0] == pytest.approx(span / 4.0, rel=1e-9)
    assert all(s > 0 for s in slept)
    with pytest.raises(DataError):
        list(replay(tmp_path / "r", speed=0))


def test_recover_a_killed_recorder_up_to_its_last_flush(samples: Path, tmp_path: Path) -> None:
    recs = [r for _, r in zip(range(1200), iter_hftbacktest(samples / BTC), strict=False)]
    rec = Recorder(tmp_path / "r")
    for r in recs[:1000]:
        rec.write(r)
    rec.flush()
    for r in recs[1000:]:
        rec.write(r)
    assert rec._raw is not None
    rec._raw.close()  # the process dies: the gzip stream is never finished, the manifest never updated
    assert read_manifest(tmp_path / "r")["files"] == [] and list((tmp_path / "r").glob("*.part"))
    n = recover(tmp_path / "r")
    got = list(read_recording(tmp_path / "r"))
    assert 1000 <= n == len(got) <= 1200 and got == recs[:n]
    assert not list((tmp_path / "r").glob("*.part")) and read_manifest(tmp_path / "r")["frames"] == n
