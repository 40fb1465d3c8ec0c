"""Where replayed MarketEvents come from: a recorder directory, or a raw hftbacktest capture file (plain or gzip).

A raw capture may carry REST depth snapshots inline as bare `{"lastUpdateId": ...}` objects; they have no symbol,
so the symbol comes from the capture's file name (`btcusdt_20240808.gz` → BTCUSDT) and they become book events of
kind "snapshot". Frames that are not well-formed messages are counted and skipped, never fatal.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cambium.core.errors import DataError
from cambium.market.binance import ControlReply, MalformedFrame, decode_binance, wire_number
from cambium.market.captures import iter_hftbacktest
from cambium.market.events import MarketEvent
from cambium.market.recorder import Record, read_recording

__all__ = ["DecodeStats", "decode_record", "depth_snapshot_event", "iter_events", "iter_records"]


@dataclass
class DecodeStats:
    frames: int = 0
    events: int = 0
    malformed: int = 0
    control_replies: int = 0
    skipped_lines: list[int] = field(default_factory=list)


def iter_records(path: Path, stats: DecodeStats | None = None) -> Iterator[Record]:
    if path.is_dir():
        yield from read_recording(path)
    elif path.is_file():
        yield from iter_hftbacktest(path, stats.skipped_lines if stats is not None else None)
    else:
        raise DataError(f"{str(path)!r} is neither a recording directory nor a capture file")


def _file_symbol(path: Path) -> str | None:
    match = re.match(r"([a-z0-9]+)_\d{8}", path.name.lower())
    return match.group(1).upper() if match else None


def depth_snapshot_event(body: dict[str, Any], symbol: str, recv_ns: int, source: str) -> MarketEvent:
    """A REST `/depth` response as a book event of kind "snapshot" (KeyError/TypeError/ValueError if malformed: a
    price or size that is not a finite number in range, an id or time that is not an integer)."""
    last, ts = body["lastUpdateId"], body.get("E", recv_ns // 1_000_000)
    if type(last) is not int or type(ts) is not int:
        raise TypeError(f"lastUpdateId={last!r} and E={ts!r} must be integers")
    payload = {"kind": "snapshot", "bids": [[wire_number(p), wire_number(q)] for p, q in body["bids"]],
               "asks": [[wire_number(p), wire_number(q)] for p, q in body["asks"]], "last_update_id": last}
    return MarketEvent(ts, source, symbol, "book", payload, recv_ns)


def _rest_snapshot(frame: str, symbol: str | None, recv_ns: int, source: str) -> MarketEvent | None:
    if symbol is None or not frame.startswith('{"lastUpdateId"'):
        return None
    try:
        return depth_snapshot_event(orjson.loads(frame), symbol, recv_ns, source)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):  # the last: a body not a dict
        return None


def decode_record(rec: Record, symbol: str | None, source: str, stats: DecodeStats) -> list[MarketEvent]:
    """The events of one captured frame: a stream frame's, or the inline REST snapshot's when `symbol` (the capture
    file's) is known; a control reply or a malformed frame gives none. Counted in `stats`."""
    stats.frames += 1
    try:
        decoded = decode_binance(rec.frame, rec.recv_ns, source)
    except MalformedFrame:
        snap = _rest_snapshot(rec.frame, symbol, rec.recv_ns, source)
        if snap is None:
            stats.malformed += 1
            return []
        decoded = [snap]
    if isinstance(decoded, ControlReply):
        stats.control_replies += 1
        return []
    stats.events += len(decoded)
    return decoded


def iter_events(path: Path, *, source: str = "binance_usdm", stats: DecodeStats | None = None) -> Iterator[MarketEvent]:
    """MarketEvents of a recording or capture, in recorded order."""
    stats = stats if stats is not None else DecodeStats()
    symbol = _file_symbol(path) if path.is_file() else None
    for rec in iter_records(path, stats):
        yield from decode_record(rec, symbol, source, stats)
