"""Hypothesis strategies for hostile input: real frames from the committed captures, mutated one field at a time.

A mutation is one of: a wrong JSON type or an odd value in a field (a number where the symbol belongs, a string event
time, "NaN", a list, ...); a raw JSON token no encoder writes (1e400, NaN, a 40-digit integer); an event time moved far
into the future or the past; a key removed or added; a depth level damaged; the envelope damaged; the frame cut short.
The decoders, the feature engine and `screener replay` are fuzzed with these (tests/screener/test_hostile.py,
tests/market/test_binance_decode.py).
"""

from __future__ import annotations

import gzip
import heapq
import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from hypothesis import strategies as st

from cambium.market.captures import iter_hftbacktest
from cambium.market.recorder import Record

REPO = Path(__file__).resolve().parents[2]
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]

ODD_VALUES: list[Any] = [0, -1, 1.5, 2**63, 2**64 + 1, -(2**63) - 1, True, False, None, "", "x", "BTCUSDT", "123",
                         "NaN", "nan", "inf", "-inf", "1e400", "1e16", "-1", "-0", " 1.5", [], {}, [1, 2],
                         ["1", "2", "3"], {"e": "trade"}]
RAW_TOKENS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1" * 40, "1.0e-400", "00", "tru"]
TIME_SHIFTS_MS = [1, -1, 10_001, -10_001, 3_600_000, -3_600_000, 86_400_000 * 365, -86_400_000 * 365, 10**15, -(10**15)]
_RAW = "\x00raw\x00"


@cache
def base_records(n: int = 2_000) -> tuple[Record, ...]:
    """The first `n` records of the BTC and ETH captures, merged in receive order (about 4 s of exchange time)."""
    merged = heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns)
    return tuple(itertools.islice(merged, n))


@cache
def stream_frames(n: int = 2_000) -> tuple[str, ...]:
    """The combined-stream frames among `base_records(n)` (not the inline REST snapshots): what gets mutated."""
    return tuple(r.frame for r in base_records(n) if r.frame.startswith('{"stream"'))


def first_line(kind: str) -> str:
    """The first frame of the BTC capture whose stream name contains `kind`."""
    with gzip.open(CAPTURES[0], "rt") as fh:
        return next(ln for ln in fh if kind in ln[:60]).split(" ", 1)[1].rstrip("\n")


def _dump(msg: Any, raw: str | None) -> str:
    text = json.dumps(msg, separators=(",", ":"))  # not orjson: it cannot write an integer beyond 64 bits
    return text.replace(json.dumps(_RAW), raw) if raw is not None else text


@st.composite
def mutate(draw: st.DrawFn, frame: str) -> str:
    """`frame` with one field mutated (or the frame truncated)."""
    kind = draw(st.sampled_from(["value", "raw", "time", "drop", "extra", "level", "envelope", "truncate"]))
    if kind == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    msg = orjson.loads(frame)
    if kind == "envelope":
        key = draw(st.sampled_from(["stream", "data"]))
        if draw(st.booleans()):
            del msg[key]
        else:
            msg[key] = draw(st.sampled_from(ODD_VALUES))
        return _dump(msg, None)
    data = msg["data"]
    raw = None
    if kind == "time":
        key = draw(st.sampled_from([k for k in ("E", "T") if k in data] or ["E"]))
        data[key] = int(data.get(key, 0)) + draw(st.sampled_from(TIME_SHIFTS_MS))
    elif kind == "level" and data.get("e") == "depthUpdate" and (data["b"] or data["a"]):
        side = data["b"] if data["b"] else data["a"]
        level = side[draw(st.integers(0, len(side) - 1))]
        if draw(st.booleans()):
            level[draw(st.integers(0, 1))] = draw(st.sampled_from(ODD_VALUES))
        elif draw(st.booleans()):
            level.append("1")
        else:
            level.pop()
    elif kind == "extra":
        data[draw(st.sampled_from(["X", "zz", "e2", "E "]))] = draw(st.sampled_from(ODD_VALUES))
    else:
        key = draw(st.sampled_from(sorted(data)))
        if kind == "drop":
            del data[key]
        elif kind == "raw":
            data[key], raw = _RAW, draw(st.sampled_from(RAW_TOKENS))
        else:
            data[key] = draw(st.sampled_from(ODD_VALUES))
    return _dump(msg, raw)


def hostile_frames(frames: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A real frame from `frames`, mutated (drawn by index: a failing example then prints short)."""
    return st.integers(0, len(frames) - 1).flatmap(lambda i: mutate(frames[i]))
