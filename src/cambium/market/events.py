"""`MarketEvent`: the typed, venue-neutral event the connector yields and the screener consumes (SCR-1).

A plain ``__slots__`` class rather than a pydantic model or dataclass: it is built once per websocket message on the
hot path (≥ 100k events/s), and a slots ``__init__`` costs a fraction of a validating constructor. Strictness lives
at the JSON boundary instead: `from_json` rejects unknown fields, missing fields and wrong types.

Fields: ``ts`` exchange event time (epoch ms; the receive time when the venue sends none), ``source`` the venue feed
(e.g. ``binance_usdm``), ``symbol`` upper case, ``type`` one of EVENT_TYPES, ``payload`` the decoded message as plain
JSON values (floats for prices and sizes, see `cambium.market.binance` for each type's keys), ``recv_ts`` wall-clock
receive time (epoch ns).
"""

from __future__ import annotations

from typing import Any

import orjson

from cambium.core.errors import ProtocolError

__all__ = ["EVENT_TYPES", "MarketEvent"]

EVENT_TYPES = frozenset({"trade", "book", "kline", "mark", "oi", "funding"})
_FIELDS = ("ts", "source", "symbol", "type", "payload", "recv_ts")
_TYPES: dict[str, type | tuple[type, ...]] = {
    "ts": int,
    "source": str,
    "symbol": str,
    "type": str,
    "payload": dict,
    "recv_ts": int,
}


class MarketEvent:
    """One market event; treat instances as immutable (they are shared between consumers)."""

    __slots__ = _FIELDS

    ts: int
    source: str
    symbol: str
    type: str
    payload: dict[str, Any]
    recv_ts: int

    def __init__(self, ts: int, source: str, symbol: str, type: str, payload: dict[str, Any], recv_ts: int) -> None:
        self.ts = ts
        self.source = source
        self.symbol = symbol
        self.type = type
        self.payload = payload
        self.recv_ts = recv_ts

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MarketEvent):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"MarketEvent(ts={self.ts}, source={self.source!r}, symbol={self.symbol!r}, type={self.type!r}, "
            f"payload={self.payload!r}, recv_ts={self.recv_ts})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> MarketEvent:
        """Strict: exactly the six fields, with their types (bools are not ints), type in EVENT_TYPES."""
        if not isinstance(d, dict):
            raise ProtocolError(f"MarketEvent must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - set(_FIELDS)
        missing = set(_FIELDS) - set(d)
        if unknown or missing:
            raise ProtocolError(f"MarketEvent fields: unknown {sorted(unknown)}, missing {sorted(missing)}")
        for name, want in _TYPES.items():
            v = d[name]
            if not isinstance(v, want) or isinstance(v, bool):
                raise ProtocolError(f"MarketEvent.{name}={v!r}: expected {want}")
        if d["type"] not in EVENT_TYPES:
            raise ProtocolError(f"MarketEvent.type={d['type']!r}: expected one of {sorted(EVENT_TYPES)}")
        return cls(d["ts"], d["source"], d["symbol"], d["type"], d["payload"], d["recv_ts"])

    @classmethod
    def from_json(cls, data: bytes | str) -> MarketEvent:
        try:
            return cls.from_dict(orjson.loads(data))
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"MarketEvent JSON is malformed: {exc}") from None
