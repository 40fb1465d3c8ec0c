"""Binance combined-stream frames as typed msgspec structs: the fast decoding path of `binance.decode_binance`.

One `msgspec.json.Decoder` reads a frame straight into these structs, choosing the struct by the event type `e`
(a tagged union), and converts the decimal strings of prices and sizes to floats in C (`strict=False` allows
string → float). No intermediate dict and no Python string per price level are built: on a depth diff of ~70 levels
that is most of the decoding cost.

The reference is `binance.decode_binance_reference` (orjson + NamedTuples); the fast path must give the same events or
refuse the frame, which then goes to the reference. To keep that true, only the fields the reference converts with
`float()` are typed `float` (as `Num`: finite, in [0, MAX_NUM], like the reference's `wire_number`) and the symbol
`str` (which the lax mode never coerces). Every other field is `Any`, because the lax mode would coerce a string
"123" to an int or "false" to a bool; `event` checks its type exactly as the reference does (ids and times an int in
[0, 2**63), `pu` any int64, `m` a bool) and returns None otherwise, sending the frame to the reference, which names
what is wrong. (`x >> 63` is 0 exactly for an int in [0, 2**63): one test for the range of several ids at once.)

msgspec reads two inputs Binance never sends differently, so `decode_binance` hands them to the reference: the string
"-0" (+0.0 here, -0.0 from `float()`; any frame with a string starting with "-" goes) and non-ASCII bytes (msgspec
does not check the UTF-8 of fields it skips). One difference is left, safe either way: a number beyond float range
(1e400) in a field neither decoder reads is skipped here, where orjson refuses the whole frame.

Frames of other shapes (klines and mark prices, which are rare; spot bookTicker, which has no `e`; unknown event
types, control replies, malformed frames) fail to decode here and take the reference path.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from cambium.market.events import MarketEvent

__all__ = ["ENVELOPE_DECODER", "I64", "MAX_NUM", "Envelope"]

MAX_NUM = 1e15
"""Largest price or size accepted: far above any real one, and its squares and products stay finite in the windows."""
I64 = 2**63
"""Ids and times are below 2**63 (int64): what a Binance id is, and where msgspec and orjson read an integer alike."""

# A price or size: finite and in [0, MAX_NUM] ("NaN", "inf" and 1e400 are refused; negatives go to the reference).
Num = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_NUM)]
# [price, qty]: exactly two numbers, as the reference's `for p, q in levels` demands.
Level = Annotated[list[Num], msgspec.Meta(min_length=2, max_length=2)]


class _Trade(msgspec.Struct, tag_field="e", tag="trade", frozen=True, gc=False):
    E: Any
    T: Any
    s: str
    t: Any
    p: Num
    q: Num
    m: Any

    def event(self, source: str, recv_ns: int) -> MarketEvent | None:
        E, T, t, m = self.E, self.T, self.t, self.m
        if type(E) is not int or type(T) is not int or type(t) is not int or (E | T | t) >> 63 or type(m) is not bool:
            return None
        payload = {"price": self.p, "qty": self.q, "side": "sell" if m else "buy", "trade_id": t, "trade_time": T}
        return MarketEvent(E, source, self.s, "trade", payload, recv_ns)


class _AggTrade(_Trade, tag="aggTrade", frozen=True, gc=False):
    """An aggregate trade: a trade whose id is in `a` (still required: the field has no default)."""

    t: Any = msgspec.field(name="a")


class _BookTicker(msgspec.Struct, tag_field="e", tag="bookTicker", frozen=True, gc=False):
    s: str
    u: Any
    b: Num
    B: Num
    a: Num
    A: Num
    E: Any = None

    def event(self, source: str, recv_ns: int) -> MarketEvent | None:
        E, u = self.E, self.u
        if type(u) is not int or u >> 63:
            return None
        if E is None:
            E = recv_ns // 1_000_000
        elif type(E) is not int or E >> 63:
            return None
        payload = {"kind": "top", "bid": self.b, "bid_qty": self.B, "ask": self.a, "ask_qty": self.A, "update_id": u}
        return MarketEvent(E, source, self.s, "book", payload, recv_ns)


class _Depth(msgspec.Struct, tag_field="e", tag="depthUpdate", frozen=True, gc=False):
    E: Any
    s: str
    U: Any
    u: Any
    b: list[Level]
    a: list[Level]
    pu: Any = None

    def event(self, source: str, recv_ns: int) -> MarketEvent | None:
        E, U, u, pu = self.E, self.U, self.u, self.pu
        if type(E) is not int or type(U) is not int or type(u) is not int or (E | U | u) >> 63:
            return None
        if pu is not None and (type(pu) is not int or not -I64 <= pu < I64):
            return None
        payload = {"kind": "diff", "bids": self.b, "asks": self.a, "first_update_id": self.U,
                   "last_update_id": self.u, "prev_update_id": self.pu}
        return MarketEvent(self.E, source, self.s, "book", payload, recv_ns)


Data = _Trade | _AggTrade | _BookTicker | _Depth


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """``{"stream": ..., "data": ...}`` with one event, or a list of them (all-market streams)."""

    stream: str
    data: Data | list[Data]


ENVELOPE_DECODER = msgspec.json.Decoder(Envelope, strict=False)
