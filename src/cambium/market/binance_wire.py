"""Binance combined-stream frames as typed msgspec structs: the fast decoding path of `binance.decode_binance`.

One `msgspec.json.Decoder` reads a frame straight into these structs, choosing the struct by the event type `e`
(a tagged union), and converts the decimal strings of prices and sizes to floats in C (`strict=False` allows
string → float). No intermediate dict and no Python string per price level are built: on a depth diff of ~70 levels
that is most of the decoding cost.

The reference is `binance.decode_binance_reference` (orjson + NamedTuples); the fast path must give the same events
or refuse the frame, which then goes to the reference. To keep that true, only the fields the reference converts
with `float()` are typed `float`; every field it passes through unchanged is `Any`, so the lax mode cannot coerce it
(a string "123" stays a string, as in the reference). msgspec reads two inputs Binance never sends
differently, so `decode_binance` hands them to the reference: the string "-0" (+0.0 here, -0.0 from `float()`; any
frame with a string starting with "-" goes) and non-ASCII bytes (msgspec does not check the UTF-8 of fields it
skips). One difference is left: an integer beyond 64 bits passes through as an int, where orjson makes it a float.

Frames of other shapes (klines and mark prices, which are rare; spot bookTicker, which has no `e`; unknown event
types, control replies, malformed frames) fail to decode here and take the reference path.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from cambium.market.events import MarketEvent

__all__ = ["ENVELOPE_DECODER", "Envelope"]

# [price, qty]: exactly two numbers, as the reference's `for p, q in levels` demands.
Level = Annotated[list[float], msgspec.Meta(min_length=2, max_length=2)]


class _Trade(msgspec.Struct, tag_field="e", tag="trade", frozen=True, gc=False):
    E: Any
    T: Any
    s: Any
    t: Any
    p: float
    q: float
    m: Any

    def event(self, source: str, recv_ns: int) -> MarketEvent:
        payload = {"price": self.p, "qty": self.q, "side": "sell" if self.m else "buy", "trade_id": self.t,
                   "trade_time": self.T}
        return MarketEvent(self.E, source, self.s, "trade", payload, recv_ns)


class _AggTrade(_Trade, tag="aggTrade", frozen=True, gc=False):
    """An aggregate trade: a trade whose id is in `a` (still required: the field has no default)."""

    t: Any = msgspec.field(name="a")


class _BookTicker(msgspec.Struct, tag_field="e", tag="bookTicker", frozen=True, gc=False):
    s: Any
    u: Any
    b: float
    B: float
    a: float
    A: float
    E: Any = None

    def event(self, source: str, recv_ns: int) -> MarketEvent:
        payload = {"kind": "top", "bid": self.b, "bid_qty": self.B, "ask": self.a, "ask_qty": self.A,
                   "update_id": self.u}
        E = self.E
        return MarketEvent(E if E is not None else recv_ns // 1_000_000, source, self.s, "book", payload, recv_ns)


class _Depth(msgspec.Struct, tag_field="e", tag="depthUpdate", frozen=True, gc=False):
    E: Any
    s: Any
    U: Any
    u: Any
    b: list[Level]
    a: list[Level]
    pu: Any = None

    def event(self, source: str, recv_ns: int) -> MarketEvent:
        payload = {"kind": "diff", "bids": self.b, "asks": self.a, "first_update_id": self.U,
                   "last_update_id": self.u, "prev_update_id": self.pu}
        return MarketEvent(self.E, source, self.s, "book", payload, recv_ns)


Data = _Trade | _AggTrade | _BookTicker | _Depth


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """``{"stream": ..., "data": ...}`` with one event, or a list of them (all-market streams)."""

    stream: str
    data: Data | list[Data]


ENVELOPE_DECODER = msgspec.json.Decoder(Envelope, strict=False)
