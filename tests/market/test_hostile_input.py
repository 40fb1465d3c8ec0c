"""Issue 14, market part: damaged or hostile captures, recordings and control messages give one clear line or are
counted and survived; a recording is complete or refused (MKT-7)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import sys
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from cambium.core.errors import DataError
from cambium.market.captures import import_capture, iter_hftbacktest
from cambium.market.recorder import MANIFEST, Recorder, read_manifest, read_recording, recover, replay
from cambium.market.replay_server import ReplayServer

BTC = "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`cambium <args>` in-process through the console entry point: (exit code, stdout + stderr)."""
    from cambium.cli import main

    monkeypatch.setattr(sys, "argv", ["cambium", *args])
    code: int | str | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return int(code or 0), out.out + out.err


def sample_lines(samples: Path, n: int = 40) -> list[str]:
    with gzip.open(samples / BTC, "rt") as fh:
        return [line.rstrip("\n") for line in itertools.islice(fh, n)]


def write_capture(path: Path, lines: list[str]) -> Path:
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    return path


def rewrite_manifest(root: Path, **changes: object) -> None:
    doc = read_manifest(root)
    doc.update(changes)
    (root / MANIFEST).write_bytes(orjson.dumps(doc))


def test_a_26_digit_stamp_is_skipped_and_counted_not_a_traceback(samples: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    lines = sample_lines(samples)
    frame = lines[5].split(" ", 1)[1]
    lines[5] = "1" * 26 + " " + frame  # a year far beyond datetime: OSError on today's main
    lines[9] = "99999999999999999999 " + frame  # beyond int64 ns
    lines[11] = "1723161255 " + frame  # seconds, not ns: 1970
    lines[13] = "１７２３１６１２５５０３０３１４６６７ " + frame  # full-width digits pass str.isdigit
    cap = write_capture(tmp_path / "cap.gz", lines)
    code, out = run_cli(["market", "import-capture", str(cap), str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 0, out
    assert "36 frames, 4 lines skipped (6, 10, 12, 14)" in out and "Traceback" not in out
    assert read_manifest(tmp_path / "rec")["complete"] is True
    assert [r.frame for r in read_recording(tmp_path / "rec")] == [
        ln.split(" ", 1)[1] for i, ln in enumerate(lines) if i not in (5, 9, 11, 13)
    ]


def test_a_failed_import_leaves_an_unfinished_recording_that_every_reader_refuses(samples: Path, tmp_path: Path,
                                                                                  monkeypatch, capsys) -> None:
    good = "\n".join(sample_lines(samples, 30)).encode() + b"\n"
    cap = tmp_path / "cap.gz"
    cap.write_bytes(gzip.compress(good + b"1723161255030314667 {\"x\": \"\xff\xfe\"}\n", mtime=0))  # not UTF-8
    code, out = run_cli(["market", "import-capture", str(cap), str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1 and out.startswith("error: ")
    assert "cannot be read as (gzipped) UTF-8 text" in out and "left unfinished" in out
    man = read_manifest(tmp_path / "rec")
    assert man["complete"] is False and man["frames"] > 0  # what was written is listed, and the hashes are valid
    for read in (lambda: list(read_recording(tmp_path / "rec")), lambda: list(replay(tmp_path / "rec"))):
        with pytest.raises(DataError, match="unfinished recording"):
            read()
    code, out = run_cli(["market", "replay", str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1 and "unfinished recording" in out
    code, out = run_cli(["market", "serve", str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1 and "unfinished recording" in out


def test_a_writer_that_raises_leaves_the_recording_unfinished_and_recover_finishes_it(samples: Path,
                                                                                      tmp_path: Path) -> None:
    recs = list(itertools.islice(iter_hftbacktest(samples / BTC), 50))
    with pytest.raises(RuntimeError), Recorder(tmp_path / "r") as rec:
        for r in recs:
            rec.write(r)
        raise RuntimeError("the source failed")
    with pytest.raises(DataError, match="unfinished"):
        next(read_recording(tmp_path / "r"))
    assert recover(tmp_path / "r") == 0
    assert list(read_recording(tmp_path / "r")) == recs and read_manifest(tmp_path / "r")["recovered"] is True
    with Recorder(tmp_path / "ok") as rec:
        rec.write(recs[0])
        with pytest.raises(DataError, match="receive stamp 100000000000000000000 is not"):
            rec.write(recs[0]._replace(recv_ns=10**20))
    assert read_manifest(tmp_path / "ok")["complete"] is True


@pytest.mark.parametrize("name", ["../x.jsonl.gz", "/etc/x.jsonl.gz", "sub/x.jsonl.gz", "..", "x.jsonl.gz\n", 7])
def test_manifest_entries_outside_the_recording_are_refused(samples: Path, tmp_path: Path, name: object,
                                                           monkeypatch, capsys) -> None:
    import_capture(write_capture(tmp_path / "cap.gz", sample_lines(samples)), tmp_path / "rec")
    doc = read_manifest(tmp_path / "rec")
    outside = tmp_path / "x.jsonl.gz"
    outside.write_bytes((tmp_path / "rec" / doc["files"][0]["name"]).read_bytes())
    doc["files"][0]["name"] = name
    (tmp_path / "rec" / MANIFEST).write_bytes(orjson.dumps(doc))
    code, out = run_cli(["market", "replay", str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1 and "not a plain '*.jsonl.gz' file name" in out


def test_a_symlink_leading_outside_the_recording_is_refused(samples: Path, tmp_path: Path) -> None:
    import_capture(write_capture(tmp_path / "cap.gz", sample_lines(samples)), tmp_path / "rec")
    name = read_manifest(tmp_path / "rec")["files"][0]["name"]
    (tmp_path / "rec" / name).rename(tmp_path / "elsewhere.jsonl.gz")
    (tmp_path / "rec" / name).symlink_to(tmp_path / "elsewhere.jsonl.gz")
    with pytest.raises(DataError, match="leads outside the recording"):
        list(read_recording(tmp_path / "rec"))


@pytest.mark.parametrize("cut", [10, 200, -9])
def test_a_truncated_recording_gzip_is_one_line_naming_the_file(samples: Path, tmp_path: Path, cut: int,
                                                               monkeypatch, capsys) -> None:
    import_capture(write_capture(tmp_path / "cap.gz", sample_lines(samples)), tmp_path / "rec")
    doc = read_manifest(tmp_path / "rec")
    path = tmp_path / "rec" / doc["files"][0]["name"]
    data = path.read_bytes()[:cut]
    path.write_bytes(data)
    doc["files"][0]["sha256"] = hashlib.sha256(data).hexdigest()  # hashes made to match: only the gzip tells
    (tmp_path / "rec" / MANIFEST).write_bytes(orjson.dumps(doc))
    code, out = run_cli(["market", "replay", str(tmp_path / "rec")], monkeypatch, capsys)
    assert code == 2 and out.count("\n") == 1, out  # today's main: "Aborted!"
    assert f"{path}: the gzip stream is cut or corrupt" in out


def test_recording_lines_of_the_wrong_type_are_refused_in_one_line(samples: Path, tmp_path: Path) -> None:
    root = tmp_path / "rec"
    with Recorder(root) as rec:
        rec.write(next(iter_hftbacktest(samples / BTC)))
    name = read_manifest(root)["files"][0]["name"]
    for line, why in [(b'{"t":"1","m":1,"s":0,"f":"x"}', "t='1'"), (b'{"t":1,"m":1,"s":0,"f":5}', "f=5"),
                      (b'[1,2]', "a list"), (b'{"t":-1,"m":1,"s":0,"f":"x"}', "t=-1"), (b'{"t":1}', "'m'")]:
        data = gzip.compress(line + b"\n", mtime=0)
        (root / name).write_bytes(data)
        rewrite_manifest(root, files=[{**read_manifest(root)["files"][0], "sha256": hashlib.sha256(data).hexdigest()}])
        with pytest.raises(DataError, match=f"line 1 is not a recording line.*{why}"):
            list(read_recording(root))


async def _talk(srv: ReplayServer, messages: list[str], replies: int) -> list[dict]:
    async with connect(srv.url()) as ws:
        for m in messages:
            await ws.send(m)
        got = []
        while len(got) < replies:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            if "stream" not in msg:
                got.append(msg)
        return got


def test_a_subscribe_with_params_5_is_answered_counted_and_the_connection_kept(samples: Path) -> None:
    records = list(itertools.islice(iter_hftbacktest(samples / BTC), 200))

    async def main() -> tuple[list[dict], int]:
        async with ReplayServer(records) as srv:
            got = await _talk(srv, [
                '{"method":"SUBSCRIBE","params":5,"id":1}',
                '{"method":"UNSUBSCRIBE","params":[[1]],"id":2}',
                '{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":3}',
                '{"method":"LIST_SUBSCRIPTIONS","id":4}',
            ], 4)
            return got, srv.stats.bad_requests

    got, bad = asyncio.run(main())
    assert [g["id"] for g in got] == [1, 2, 3, 4]
    assert got[0]["code"] == got[1]["code"] == 2 and got[0]["msg"].startswith("Invalid request: params")
    assert got[2] == {"result": None, "id": 3} and got[3] == {"result": ["btcusdt@trade"], "id": 4}
    assert bad == 2
