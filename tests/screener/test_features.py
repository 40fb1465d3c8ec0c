"""SCR-2 on real captures: the streaming engine equals the vectorised offline computation, and direct formulas."""

from __future__ import annotations

import hashlib
import heapq
import math
from pathlib import Path

import pytest

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.market.events import MarketEvent
from cambium.screener.book import OrderBook
from cambium.screener.config import FeatureConfig
from cambium.screener.contracts import to_builtins
from cambium.screener.digest import canonical_value
from cambium.screener.features import FeatureEngine
from cambium.screener.features_offline import compute_features_offline
from cambium.screener.schema import feature_names
from cambium.screener.sources import DecodeStats, iter_events

WS = Path(__file__).resolve().parents[2] / "data" / "samples" / "market" / "ws" / "binance_usdm_hftbacktest"


@pytest.fixture(scope="module")
def two_symbols() -> list[MarketEvent]:
    """BTCUSDT and ETHUSDT captures merged in receive order, as one connection would deliver them."""
    streams = [list(iter_events(WS / f"{s}_20240808.gz")) for s in ("btcusdt", "ethusdt")]
    return list(heapq.merge(*streams, key=lambda e: e.recv_ts))


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def test_streaming_equals_offline_on_a_real_capture(two_symbols: list[MarketEvent]) -> None:
    engine = FeatureEngine()
    streamed = engine.run(two_symbols)
    offline = compute_features_offline(two_symbols)
    assert len(streamed) == len(offline) > 600
    assert {s.symbol for s in streamed} == {"BTCUSDT", "ETHUSDT"}
    assert engine.late_events > 0  # the captures interleave streams whose event times are not sorted
    for a, b in zip(streamed, offline, strict=True):
        assert (a.ts, a.symbol, a.data_health) == (b.ts, b.symbol, b.data_health)
        assert set(a.features) == set(feature_names())
        for name in a.features:
            assert close(a.features[name], b.features[name]), (a.ts, a.symbol, name, a.features[name], b.features[name])
        for label, window in a.windows.items():
            for name, value in window.items():
                assert close(value, b.windows[label][name]), (a.ts, label, name)
    last = streamed[-1].features
    assert all(last[name] is not None for name in feature_names()), last  # after 5 minutes every feature exists


# sha256 over the canonical JSON (floats to 9 decimals) of every snapshot the streaming engine makes of the merged
# captures; recorded from the engine before its hot path was rewritten for speed, which must not move a number.
STREAMED_DIGEST = "63c7c1363ed164fbdd175f12c98d3f8a45485eb339af2caebdf3ec6181e4c6aa"


def test_streaming_snapshots_reproduce_the_recorded_digest(two_symbols: list[MarketEvent]) -> None:
    snaps = FeatureEngine().run(two_symbols)
    digest = hashlib.sha256()
    for snap in snaps:
        digest.update(canonical_value(to_builtins(snap)).encode())
    assert len(snaps) == 690 and digest.hexdigest() == STREAMED_DIGEST


def test_features_match_direct_formulas(two_symbols: list[MarketEvent]) -> None:
    snaps = [s for s in FeatureEngine().run(two_symbols) if s.symbol == "ETHUSDT"]
    eth = [e for e in two_symbols if e.symbol == "ETHUSDT"]
    first_quote = next(i for i, e in enumerate(eth) if e.type == "book" and e.payload["kind"] == "top")
    # The engine's clock (a watermark over the book and trade streams, at most 2 s behind the newest event) also sees
    # BTC events, so the bar of each event comes from the merged stream, recomputed here with a plain loop.
    clock, newest, kind_newest = -(2**62), -(2**62), {}
    merged_bar: dict[int, int] = {}
    for e in two_symbols:
        newest = max(newest, e.ts)
        kind_newest[e.type] = max(kind_newest.get(e.type, e.ts), e.ts)
        clock = max(clock, min(kind_newest.values()), newest - 2_000)
        merged_bar[id(e)] = -(-clock // 1000) * 1000
    for snap in snaps[-3:]:
        b = snap.ts
        trades = [e for e in eth[first_quote:] if e.type == "trade" and b - 10_000 < merged_bar[id(e)] <= b]
        buy = sum(e.payload["qty"] for e in trades if e.payload["side"] == "buy")
        sell = sum(e.payload["qty"] for e in trades if e.payload["side"] == "sell")
        assert snap.features["trade_rate_10s"] == pytest.approx(len(trades) / 10)
        assert snap.features["flow_imbalance_10s"] == pytest.approx((buy - sell) / (buy + sell))
        tops = [e for e in eth if e.type == "book" and e.payload["kind"] == "top" and merged_bar[id(e)] <= b]
        q = tops[-1].payload
        assert snap.features["mid"] == (q["bid"] + q["ask"]) / 2
        assert snap.features["spread_bps"] == pytest.approx((q["ask"] - q["bid"]) / snap.features["mid"] * 1e4)
        old = [e for e in eth if e.type == "book" and e.payload["kind"] == "top" and merged_bar[id(e)] <= b - 60_000]
        mid_then = (old[-1].payload["bid"] + old[-1].payload["ask"]) / 2
        assert snap.features["ret_bps_60s"] == pytest.approx(1e4 * math.log(snap.features["mid"] / mid_then))


def test_book_syncs_from_snapshot_and_every_diff_continues() -> None:
    stats = DecodeStats()
    book, applied = OrderBook(), 0
    for ev in iter_events(WS / "btcusdt_20240808.gz", stats=stats):
        p = ev.payload
        if ev.type == "book" and p["kind"] == "snapshot":
            book.apply_snapshot(p["bids"], p["asks"], p["last_update_id"])
        elif ev.type == "book" and p["kind"] == "diff":
            applied += book.apply_diff(p["bids"], p["asks"], p["first_update_id"], p["last_update_id"],
                                       p["prev_update_id"])
    assert stats.malformed == 0 and stats.frames == 93_954
    assert book.synced and book.gaps == 0 and applied > 6_000
    assert book.best_bid is not None and book.best_ask is not None and book.best_bid < book.best_ask
    # A gap (a diff that does not continue the previous one) unsyncs the book until the next snapshot.
    assert not book.apply_diff([], [], book.last_update_id + 10, book.last_update_id + 20, book.last_update_id + 5)
    assert not book.synced and book.gaps == 1 and book.impact_bps(10_000, 60_000) is None


def test_engine_state_is_bounded_whatever_the_trade_count(two_symbols: list[MarketEvent]) -> None:
    engine = FeatureEngine()
    engine.run(two_symbols)
    for state in engine.symbols.values():
        assert len(state.closes) <= state.bars["5m"] + 1
        assert all(len(r.buf) == r.n for r in state.buy_w.values())


def test_cadence_must_divide_the_windows() -> None:
    with pytest.raises(ConfigError, match="cadence_ms=7000 must divide"):
        load_data({"cadence_ms": 7000}, FeatureConfig)
