"""Fuzzing as a habit (issue 14): real capture lines, recording lines and control messages mutated field by field.

Property: never a traceback. Every capture line is either imported or counted as skipped; every recording either
reads back whole or is refused with one `DataError`; every control message is answered and the connection kept.
Example counts keep the whole module well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.errors import DataError
from cambium.market.captures import import_capture
from cambium.market.recorder import MANIFEST, read_manifest, read_recording
from cambium.market.replay_server import ReplayServer, _Conn

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples" / "market"
BTC = SAMPLES / "ws/binance_usdm_hftbacktest/btcusdt_20240808.gz"
with gzip.open(BTC, "rt") as _fh:
    LINES = [ln.rstrip("\n") for ln in itertools.islice(_fh, 0, 4000, 100)]  # 40 real lines, every stream type

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values a hostile or broken peer puts where a field belongs; written as JSON text so NaN and 1e400 get through.
HOSTILE = st.one_of(
    st.sampled_from(["null", "true", "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "18446744073709551616",
                     "-9223372036854775809", "1" * 40, '""', '"NaN"', '"1e400"', "[]", "{}", '[["1","2","3"]]',
                     '"\\u0000"', '"' + "x" * 5000 + '"']),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: orjson.dumps(f).decode()),
    st.text(max_size=20).map(lambda s: orjson.dumps(s).decode()),
)
STAMPS = st.one_of(
    st.sampled_from(["", "0", "1" * 26, "99999999999999999999", "1723161255", "4102444800000000000", "-5",
                     "1.5e18", "１２３", "0x10", "1723161255030314667"]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)


def _set_path(doc: dict[str, Any], path: tuple[str, ...], text: str | None) -> str:
    """`doc` as JSON text with the field at `path` replaced by raw JSON `text` (None: the field removed)."""
    marker = "__FUZZ_MARKER__"
    node = doc
    for key in path[:-1]:
        node = node[key]
    if text is None:
        node.pop(path[-1], None)
        return orjson.dumps(doc).decode()
    node[path[-1]] = marker
    return orjson.dumps(doc).decode().replace(f'"{marker}"', text, 1)


@st.composite
def mutated_line(draw: st.DrawFn) -> str:
    """One real capture line with one field of its stamp or frame mutated, or cut short."""
    line = draw(st.sampled_from(LINES))
    stamp, frame = line.split(" ", 1)
    how = draw(st.sampled_from(["stamp", "field", "drop", "extra", "truncate", "none"]))
    if how == "stamp":
        return f"{draw(STAMPS)} {frame}"
    if how == "truncate":
        return line[: draw(st.integers(0, len(line)))]
    if how == "none":
        return line
    doc = orjson.loads(frame)
    paths = [(k,) for k in doc] + [("data", k) for k in doc.get("data", {})]
    path = draw(st.sampled_from(paths))
    if how == "drop":
        return f"{stamp} {_set_path(doc, path, None)}"
    if how == "extra":
        return f"{stamp} {_set_path(doc, (*path[:-1], draw(st.text(min_size=1, max_size=5))), draw(HOSTILE))}"
    return f"{stamp} {_set_path(doc, path, draw(HOSTILE))}"


@FUZZ
@given(lines=st.lists(mutated_line(), min_size=1, max_size=8))
def test_import_capture_then_replay_never_tracebacks(lines: list[str],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    from typer.testing import CliRunner

    from cambium.market.cli import app

    tmp = tmp_path_factory.mktemp("fuzz")
    cap = tmp / "cap.gz"
    cap.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
    report = import_capture(cap, tmp / "rec")
    assert report.frames + report.skipped == len(lines)  # every line imported or counted
    assert read_manifest(tmp / "rec")["complete"] is True
    res = CliRunner().invoke(app, ["replay", str(tmp / "rec")])
    assert res.exit_code == 0, (res.output, res.exception)
    assert f"{report.frames} frames" in res.output


@st.composite
def damaged_recording_line(draw: st.DrawFn) -> bytes:
    stamp, frame = draw(st.sampled_from(LINES)).split(" ", 1)
    doc: dict[str, Any] = {"t": int(stamp), "m": int(stamp), "s": 0, "f": frame}
    key = draw(st.sampled_from(["t", "m", "s", "f", "extra"]))
    how = draw(st.sampled_from(["value", "drop", "truncate"]))
    text = _set_path(doc, (key,), None if how == "drop" else draw(HOSTILE))
    if how == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@FUZZ
@given(lines=st.lists(damaged_recording_line(), min_size=1, max_size=6), cut=st.integers(0, 4000))
def test_damaged_recordings_read_whole_or_refused_in_one_line(lines: list[bytes], cut: int,
                                                              tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("rec")
    data = gzip.compress(b"\n".join(lines) + b"\n", mtime=0)
    data = data[: max(1, len(data) - cut % (len(data) + 1))]  # sometimes cut, sometimes whole
    (root / "20240808T23.jsonl.gz").write_bytes(data)
    entry = {"name": "20240808T23.jsonl.gz", "sha256": hashlib.sha256(data).hexdigest(), "frames": len(lines)}
    doc = {"format": "cambium.market.recording/1", "meta": {}, "frames": len(lines), "files": [entry],
           "complete": True}
    (root / MANIFEST).write_bytes(orjson.dumps(doc))
    try:
        got = list(read_recording(root))
    except DataError as exc:
        assert "\n" not in str(exc) and "20240808T23.jsonl.gz" in str(exc)
    else:
        assert len(got) == len(lines)
        assert all(type(r.recv_ns) is int and type(r.mono_ns) is int and isinstance(r.frame, str) for r in got)


class _FakeWs:
    """Collects what the server sends; a close is recorded, not performed."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed: int | None = None

    async def send(self, text: str) -> None:
        self.sent.append(orjson.loads(text))

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = code


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def control_message(draw: st.DrawFn) -> str | bytes:
    base: dict[str, Any] = {"method": draw(st.sampled_from(["SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS"])),
                            "params": ["btcusdt@trade"], "id": 1}
    how = draw(st.sampled_from(["field", "drop", "extra", "truncate", "raw"]))
    key = draw(st.sampled_from(["method", "params", "id"]))
    if how == "drop":
        base.pop(key)
    elif how == "extra":
        base[draw(st.text(max_size=6))] = draw(JSON)
    elif how == "field":
        base[key] = draw(JSON)
    text = json.dumps(base)  # unlike orjson, writes integers beyond 64 bits
    if how == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if how == "raw":
        return draw(st.binary(max_size=40) | st.text(max_size=40))
    return text


@FUZZ
@given(messages=st.lists(control_message(), min_size=1, max_size=10))
def test_every_control_message_is_answered_and_the_connection_kept(messages: list[str | bytes]) -> None:
    srv = ReplayServer([])

    async def main() -> _FakeWs:
        ws, conn = _FakeWs(), _Conn(1, "")
        for m in messages:
            await srv._control(ws, conn, m)  # type: ignore[arg-type]
        return ws

    ws = asyncio.run(main())
    assert ws.closed is None and len(ws.sent) == len(messages)
    errors = [m for m in ws.sent if "code" in m]
    assert srv.stats.bad_requests == len(errors)
    assert all(m["code"] in (2, 3) and isinstance(m["msg"], str) for m in errors)
