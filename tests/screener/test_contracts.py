"""SCR-1: strict decoding, lossless JSON round-trip, canonical JSON and the chained replay digest."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cambium.core.errors import ProtocolError
from cambium.screener.contracts import (
    DataHealth,
    ExplainInput,
    ExplainOutput,
    FeatureSnapshot,
    PredictionSnapshot,
    RankEvent,
    decode,
    encode,
)
from cambium.screener.digest import ReplayDigest, canonical_json

from ._builders import feature_snapshot, prediction, rank_event


@pytest.mark.parametrize("obj", [
    feature_snapshot(), prediction(), rank_event(),
    ExplainInput(symbol="BTCUSDT", timeframe="2m", status="WATCH", score=0.31, reasons=("TOXIC_GATE",),
                 numeric_summary={"spread_bps": 0.016}),
    ExplainOutput(headline="h", subtext="s", status_label="WATCH", tooltips={"TOXIC_GATE": "t"}),
])
def test_round_trip_is_lossless(obj: msgspec.Struct) -> None:
    again = decode(encode(obj), type(obj))
    assert again == obj
    assert encode(again) == encode(obj)


finite = st.floats(allow_nan=False, allow_infinity=False)
prob = st.floats(min_value=0.0, max_value=1.0)


@given(p30=prob, p2m=prob, p5m=prob, util=finite, tox=prob, stale=st.integers(0, 2**40),
       reasons=st.lists(st.from_regex(r"[A-Z][A-Z_]{0,9}", fullmatch=True), max_size=4))
def test_prediction_round_trip_any_values(p30: float, p2m: float, p5m: float, util: float, tox: float, stale: int,
                                          reasons: list[str]) -> None:
    pred = prediction(p_inplay_30s=p30, p_inplay_2m=p2m, p_inplay_5m=p5m, expected_utility_bps_2m=util, p_toxic=tox,
                      reasons=tuple(reasons), data_health=DataHealth(stale, stale, ("trade",)))
    assert decode(encode(pred), PredictionSnapshot) == pred


@given(feats=st.dictionaries(st.text(min_size=1, max_size=8), st.none() | finite, max_size=6))
def test_feature_snapshot_round_trip_any_values(feats: dict[str, float | None]) -> None:
    snap = feature_snapshot(features=feats)
    assert decode(encode(snap), FeatureSnapshot) == snap


def _json_of(obj: msgspec.Struct, **changes: object) -> bytes:
    data = msgspec.to_builtins(obj)
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("kind", "obj", "changes", "field"), [
    (PredictionSnapshot, prediction(), {"p_inplay_2m": "0.5"}, "p_inplay_2m"),
    (PredictionSnapshot, prediction(), {"p_toxic": 1.5}, "p_toxic"),
    (PredictionSnapshot, prediction(), {"status": "MAYBE"}, "status"),
    (PredictionSnapshot, prediction(), {"profile": "C"}, "profile"),
    (PredictionSnapshot, prediction(), {"surprise": 1}, "surprise"),
    (FeatureSnapshot, feature_snapshot(), {"ts": 1.5}, "ts"),
    (FeatureSnapshot, feature_snapshot(), {"symbol": "btc usdt"}, "symbol"),
    (FeatureSnapshot, feature_snapshot(), {"data_health": {"stale_book_ms": 1, "stale_trades_ms": 1, "x": 0}}, "x"),
    (FeatureSnapshot, feature_snapshot(), {"data_health": {"stale_book_ms": -1, "stale_trades_ms": 1}},
     "data_health.stale_book_ms"),
    (RankEvent, rank_event(), {"event": "SYMBOL_WOBBLE"}, "event"),
    (RankEvent, rank_event(), {"score": -0.1}, "score"),
    (RankEvent, rank_event(), {"rank": 0}, "rank"),
    (ExplainInput, ExplainInput(symbol="BTCUSDT", timeframe="2m", status="WATCH", score=0.3, reasons=(),
                                numeric_summary={}), {"style": "poem"}, "style"),
])
def test_strict_decoding_names_the_field(kind: type, obj: msgspec.Struct, changes: dict, field: str) -> None:
    with pytest.raises(ProtocolError, match=field.replace(".", r"\.")) as info:
        decode(_json_of(obj, **changes), kind)
    assert kind.__name__ in str(info.value)


def test_missing_field_and_bad_json_are_protocol_errors() -> None:
    data = msgspec.to_builtins(rank_event())
    del data["score"]
    with pytest.raises(ProtocolError, match="score"):
        decode(json.dumps(data), RankEvent)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode(b"{\"ts\": 1,", RankEvent)


def test_non_finite_floats_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"features\.mid"):
        feature_snapshot(features={"mid": float("nan")})
    with pytest.raises(ValueError, match="expected_utility_bps_2m"):
        prediction(expected_utility_bps_2m=float("inf"))


def test_canonical_json_is_sorted_fixed_point_ascii() -> None:
    ev = rank_event(score=1e-7, payload={"z": -0.0, "a": "é", "n": 3, "f": 2.5})
    text = canonical_json(ev).decode()
    assert text == ('{"event":"SYMBOL_ENTER","payload":{"a":"\\u00e9","f":2.500000000,"n":3,"z":0.000000000},'
                    '"rank":1,"score":0.000000100,"symbol":"BTCUSDT","ts":1723161256313}')
    # The canonical text is JSON and decodes back to the same event.
    assert decode(text, RankEvent) == rank_event(score=1e-7, payload={"z": 0.0, "a": "é", "n": 3, "f": 2.5})


def test_canonical_json_ignores_field_and_key_order() -> None:
    a = rank_event(payload={"x": 1, "y": "b"})
    b = decode(b'{"symbol":"BTCUSDT","payload":{"y":"b","x":1},"score":0.42,"rank":1,"event":"SYMBOL_ENTER",'
               b'"ts":1723161256313}', RankEvent)
    assert canonical_json(a) == canonical_json(b)


def test_replay_digest_is_the_documented_chain() -> None:
    events = [rank_event(ts=1000 + i, rank=i + 1, score=i / 10) for i in range(5)]
    state = hashlib.sha256(b"").digest()
    for ev in events:
        state = hashlib.sha256(state + canonical_json(ev)).digest()
    digest = ReplayDigest()
    out = digest.update_all(events)
    assert out == state.hex() and len(out) == 64 and digest.count == 5
    # Order matters, and any change to any event changes the final digest.
    assert ReplayDigest().update_all(reversed(events)) != out
    changed = [*events[:2], rank_event(ts=1002, rank=3, score=0.2000001), *events[3:]]
    assert ReplayDigest().update_all(changed) != out
    assert ReplayDigest().hexdigest() == hashlib.sha256(b"").hexdigest()


def test_throughput_helper_reports_bench_records() -> None:
    from bench.screener_contracts import contract_throughput

    records = contract_throughput(200)
    assert records[0]["case"] == "PredictionSnapshot construct+encode"
    assert all(r["value"] > 0 and r["unit"] == "msg/s" for r in records)
    assert all(r["ratio"] == pytest.approx(r["value"] / r["reference_value"]) for r in records if r["reference"])
