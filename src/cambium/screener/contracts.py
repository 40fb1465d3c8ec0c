"""Wire contracts of the screener: frozen msgspec structs, strict JSON in and out.

Every message that crosses a process, file or network boundary is one of these structs. They are frozen
`msgspec.Struct`s because those construct and encode an order of magnitude faster than pydantic models (the hot
path builds one FeatureSnapshot and one PredictionSnapshot per symbol per second, and a replay builds them at full
speed). Decoding is strict: unknown fields, missing fields and wrong types (a string where a number is expected) are
rejected by `decode`, which raises `ProtocolError` naming the struct and the field.

Conventions: `ts` is integer epoch milliseconds (UTC, exchange time); probabilities are in [0, 1]; quantities in
basis points end in `_bps`. Floats must be finite: JSON has no NaN, so a NaN would not survive a round-trip; a
missing feature value is `None` instead.

MarketEvent is not defined here: it belongs to `cambium.market`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from cambium.core.errors import ProtocolError

__all__ = [
    "EVENT_KINDS",
    "PROFILES",
    "STATUSES",
    "DataHealth",
    "EventKind",
    "ExplainInput",
    "ExplainOutput",
    "FeatureSnapshot",
    "PredictionSnapshot",
    "Profile",
    "RankEvent",
    "Status",
    "convert",
    "decode",
    "encode",
    "to_builtins",
]

Status = Literal["TRADEABLE", "WATCH", "TRAP", "DEAD", "DATA_ISSUE"]
STATUSES: Final[tuple[Status, ...]] = ("TRADEABLE", "WATCH", "TRAP", "DEAD", "DATA_ISSUE")
EventKind = Literal["SYMBOL_ENTER", "SYMBOL_EXIT", "ALERT_TRADABLE", "ALERT_TRAP", "DATA_ISSUE"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = (
    "SYMBOL_ENTER", "SYMBOL_EXIT", "ALERT_TRADABLE", "ALERT_TRAP", "DATA_ISSUE",
)
Profile = Literal["A", "B"]
PROFILES: Final[tuple[Profile, ...]] = ("A", "B")

TimestampMs = Annotated[int, msgspec.Meta(ge=0, description="epoch milliseconds, UTC")]
Probability = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
NonNegMs = Annotated[int, msgspec.Meta(ge=0)]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[A-Z0-9_]+$")]
# A code, optionally with an argument: "TOXIC_GATE", "MISSING_FEATURE:spread_bps", "MISSING_STREAM:bookTicker".
ReasonCode = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Z][A-Z0-9_]*(:[A-Za-z0-9_.@]+)?$")]
SummaryKey = Annotated[str, msgspec.Meta(min_length=1, max_length=40, pattern=r"^[a-z0-9_]+$")]
PayloadValue = str | int | float | bool | None | tuple[str, ...]


def _check_finite(where: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{where}={value!r} must be finite (JSON has no NaN/inf; use None for a missing value)")


class DataHealth(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How fresh the inputs behind a snapshot are.

    `stale_book_ms` / `stale_trades_ms`: time since the last book update / trade at snapshot time.
    `missing_streams`: names of subscribed streams that have delivered nothing (e.g. "bookTicker").
    """

    stale_book_ms: NonNegMs
    stale_trades_ms: NonNegMs
    missing_streams: tuple[str, ...] = ()


class FeatureSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Features of one symbol at one instant, emitted by the feature engine on its cadence.

    `features`: flat name → value map read by the model (names and order in `schema.FEATURE_SCHEMA`);
    `None` marks a value that cannot be computed yet (e.g. no trade in the window).
    `windows`: per-window aggregates for audit and explanations, keyed by window label ("1s", "10s", "60s", "5m").
    """

    ts: TimestampMs
    symbol: Symbol
    features: dict[str, float | None]
    windows: dict[str, dict[str, float | None]]
    data_health: DataHealth

    def __post_init__(self) -> None:
        for name, value in self.features.items():
            if value is not None and not math.isfinite(value):
                _check_finite(f"features.{name}", value)
        for label, window in self.windows.items():
            for name, value in window.items():
                if value is not None and not math.isfinite(value):
                    _check_finite(f"windows.{label}.{name}", value)


class PredictionSnapshot(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Model output for one symbol and one cost profile (A maker-ish, B taker-ish)."""

    ts: TimestampMs
    symbol: Symbol
    profile: Profile
    p_inplay_30s: Probability
    p_inplay_2m: Probability
    p_inplay_5m: Probability
    expected_utility_bps_2m: float
    p_toxic: Probability
    status: Status
    reasons: tuple[ReasonCode, ...]
    model_version: str
    calibration_version: str
    data_health: DataHealth

    def __post_init__(self) -> None:
        if not math.isfinite(self.expected_utility_bps_2m):
            _check_finite("expected_utility_bps_2m", self.expected_utility_bps_2m)


class RankEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A change in the ranked list (a delta, never the full list) or an alert about a listed symbol.

    `rank` is the 1-based position of the symbol among the listed symbols when the event happened (for
    SYMBOL_EXIT: the position it held just before leaving); `score` is its score then.
    """

    ts: TimestampMs
    event: EventKind
    symbol: Symbol
    rank: Annotated[int, msgspec.Meta(ge=1)]
    score: Probability
    payload: dict[str, PayloadValue] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.payload.items():
            if isinstance(value, float):
                _check_finite(f"payload.{key}", value)


class ExplainInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything an explanation may use: reason codes, a small numeric summary and the status (no raw data)."""

    symbol: Symbol
    timeframe: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,3}[smh]$")]
    status: Status
    score: Probability
    reasons: Annotated[tuple[ReasonCode, ...], msgspec.Meta(max_length=16)]
    numeric_summary: Annotated[dict[SummaryKey, float], msgspec.Meta(max_length=16)]
    style: Literal["short", "detailed"] = "short"

    def __post_init__(self) -> None:
        for key, value in self.numeric_summary.items():
            _check_finite(f"numeric_summary.{key}", value)


class ExplainOutput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A human explanation. Length limits and the no-new-number rule are checked by `explain.validate_output`."""

    headline: str
    subtext: str
    status_label: str
    tooltips: dict[str, str] = msgspec.field(default_factory=dict)


T = TypeVar("T")

_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def encode(obj: msgspec.Struct) -> bytes:
    """Compact JSON bytes of a contract struct (field order as declared; see `digest.canonical_json` for hashing)."""
    return _ENCODER.encode(obj)


def decode(data: bytes | str, kind: type[T]) -> T:
    """Strictly decode untrusted JSON into `kind`; raises ProtocolError naming the struct and the field."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{kind.__name__}: {exc}; fix the sender to follow docs/screener/contracts.md") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{kind.__name__}: not valid JSON: {exc}") from None


def to_builtins(obj: msgspec.Struct) -> dict[str, Any]:
    """Plain dict/list/str/number form of a contract struct (tuples become lists)."""
    out = msgspec.to_builtins(obj)
    assert isinstance(out, dict)
    return out


def convert(data: dict[str, Any], kind: type[T]) -> T:
    """Strictly build `kind` from plain Python data (e.g. a row read back from Parquet); ProtocolError if invalid."""
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{kind.__name__}: {exc}") from None
