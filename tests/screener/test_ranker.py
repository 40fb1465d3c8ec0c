"""SCR-6: top-K with hysteresis, confirmation times and dwell; deltas only; deterministic (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.config import load_data
from cambium.core.errors import ConfigError, DataError
from cambium.screener.config import RankerConfig
from cambium.screener.contracts import RankEvent, Status
from cambium.screener.ranker import Ranker
from cambium.screener.scorer import Scored

SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT", "DDDUSDT", "EEEUSDT")
STATUS_CHOICES: tuple[Status, ...] = ("WATCH", "TRADEABLE", "TRAP", "DATA_ISSUE")


@dataclass(frozen=True)
class Tick:
    ts: int
    items: tuple[Scored, ...]


@st.composite
def ranker_cfg(draw: st.DrawFn) -> RankerConfig:
    exit_t = draw(st.sampled_from([0.1, 0.2, 0.3]))
    return RankerConfig(top_k=draw(st.integers(1, 4)), enter_threshold=exit_t + draw(st.sampled_from([0.05, 0.2])),
                        exit_threshold=exit_t, enter_confirm_ms=draw(st.sampled_from([0, 1000, 3000])),
                        exit_confirm_ms=draw(st.sampled_from([0, 1000, 4000])),
                        min_dwell_ms=draw(st.sampled_from([0, 2000, 10000])))


@st.composite
def tick_sequence(draw: st.DrawFn) -> list[Tick]:
    ts = 1_000_000
    ticks = []
    for _ in range(draw(st.integers(1, 40))):
        ts += draw(st.sampled_from([0, 250, 1000, 2500]))
        chosen = draw(st.lists(st.sampled_from(SYMBOLS), unique=True, max_size=len(SYMBOLS)))
        items = tuple(Scored(ts, s, draw(st.sampled_from([0.0, 0.12, 0.18, 0.22, 0.28, 0.4, 0.9])),
                             draw(st.sampled_from(STATUS_CHOICES)), ()) for s in chosen)
        ticks.append(Tick(ts, items))
    return ticks


def run(cfg: RankerConfig, ticks: list[Tick]) -> tuple[list[RankEvent], list[frozenset[str]]]:
    ranker = Ranker(cfg)
    events: list[RankEvent] = []
    sets = []
    for tick in ticks:
        events += ranker.update(tick.ts, tick.items)
        sets.append(ranker.members())
    return events, sets


def _held(hist: list[tuple[int, float]], ts: int, span: int, ok) -> bool:  # type: ignore[no-untyped-def]
    """The condition held at every update so far from the last one at or before ts − span."""
    start = max((i for i, (t, _) in enumerate(hist) if t <= ts - span), default=None)
    return start is not None and all(ok(v) for _, v in hist[start:])


@settings(max_examples=150, deadline=None)
@given(cfg=ranker_cfg(), ticks=tick_sequence())
def test_ranker_properties(cfg: RankerConfig, ticks: list[Tick]) -> None:
    ranker = Ranker(cfg)
    hist: dict[str, list[tuple[int, float]]] = {}
    applied: set[str] = set()
    entered_at: dict[str, int] = {}
    for tick in ticks:
        for item in tick.items:
            hist.setdefault(item.symbol, []).append((tick.ts, ranker.effective_score(item)))
        events = ranker.update(tick.ts, tick.items)
        for ev in events:
            assert ev.ts == tick.ts
            if ev.event == "SYMBOL_ENTER":
                assert ev.symbol not in applied
                applied.add(ev.symbol)
                entered_at[ev.symbol] = ev.ts
                assert _held(hist[ev.symbol], ev.ts, cfg.enter_confirm_ms, lambda v: v >= cfg.enter_threshold)
            elif ev.event == "SYMBOL_EXIT":
                assert ev.symbol in applied
                applied.remove(ev.symbol)
                assert ev.ts - entered_at[ev.symbol] >= cfg.min_dwell_ms
                assert _held(hist[ev.symbol], ev.ts, cfg.exit_confirm_ms, lambda v: v < cfg.exit_threshold)
            else:
                assert ev.symbol in applied
        # Deltas only, and they reproduce the ranker's set; never more than K members; ranks are 1..n.
        assert applied == ranker.members()
        assert len(applied) <= cfg.top_k
        assert sorted(s for s, _ in ranker.ranked()) == sorted(applied)
    assert run(cfg, ticks) == run(cfg, ticks)


@settings(max_examples=100, deadline=None)
@given(cfg=ranker_cfg(), band=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_no_flicker_inside_band(cfg: RankerConfig, band: list[float]) -> None:
    lo, hi = cfg.exit_threshold, cfg.enter_threshold
    ranker = Ranker(cfg)
    ts = 0
    first = ranker.update(ts, [Scored(ts, "AAAUSDT", 0.95, "WATCH", ())])
    ts += cfg.enter_confirm_ms
    first += ranker.update(ts, [Scored(ts, "AAAUSDT", 0.95, "WATCH", ())])
    assert [e.event for e in first] == ["SYMBOL_ENTER"]
    for u in band:
        ts += 1000
        inside = lo + u * (hi - lo) * 0.999
        events = ranker.update(ts, [Scored(ts, "AAAUSDT", inside, "WATCH", ()),
                                    Scored(ts, "BBBUSDT", inside, "WATCH", ())])
        assert events == [], "a score inside the band must never cause an event"
    assert ranker.members() == {"AAAUSDT"}


def test_enter_confirm_dwell_and_exit_sequence() -> None:
    cfg = RankerConfig(top_k=2, enter_threshold=0.3, exit_threshold=0.2, enter_confirm_ms=2000, exit_confirm_ms=3000,
                       min_dwell_ms=10_000)
    r = Ranker(cfg)
    s = lambda ts, sym, v, st="WATCH": Scored(ts, sym, v, st, ())  # noqa: E731
    assert r.update(0, [s(0, "AAAUSDT", 0.5)]) == []
    assert r.update(1000, [s(1000, "AAAUSDT", 0.5)]) == []
    ev = r.update(2000, [s(2000, "AAAUSDT", 0.5, "TRADEABLE")])
    assert [(e.event, e.symbol, e.rank) for e in ev] == [("SYMBOL_ENTER", "AAAUSDT", 1),
                                                        ("ALERT_TRADABLE", "AAAUSDT", 1)]
    # Below exit, but dwell (10 s from t=2000) not reached until t=12000.
    assert r.update(3000, [s(3000, "AAAUSDT", 0.1)]) == []
    assert r.update(6000, [s(6000, "AAAUSDT", 0.1)]) == []
    ev = r.update(12_000, [s(12_000, "AAAUSDT", 0.1)])
    assert [(e.event, e.symbol, e.rank, e.score) for e in ev] == [("SYMBOL_EXIT", "AAAUSDT", 1, 0.1)]


def test_full_list_makes_candidates_wait_and_best_enters_first() -> None:
    cfg = RankerConfig(top_k=2, enter_threshold=0.3, exit_threshold=0.2, enter_confirm_ms=0, exit_confirm_ms=0,
                       min_dwell_ms=0)
    r = Ranker(cfg)
    ev = r.update(0, [Scored(0, sym, v, "WATCH", ()) for sym, v in
                      [("AAAUSDT", 0.4), ("BBBUSDT", 0.9), ("CCCUSDT", 0.6)]])
    assert [(e.event, e.symbol, e.rank) for e in ev] == [("SYMBOL_ENTER", "BBBUSDT", 1), ("SYMBOL_ENTER", "CCCUSDT", 2)]
    ev = r.update(1, [Scored(1, "CCCUSDT", 0.05, "WATCH", ())])
    assert [(e.event, e.symbol) for e in ev] == [("SYMBOL_EXIT", "CCCUSDT"), ("SYMBOL_ENTER", "AAAUSDT")]
    ev = r.update(2, [Scored(2, "AAAUSDT", 0.5, "DATA_ISSUE", ("STALE_BOOK",))])
    assert [(e.event, e.symbol) for e in ev] == [("SYMBOL_EXIT", "AAAUSDT")]


def test_hysteresis_is_validated_and_time_must_not_go_back() -> None:
    with pytest.raises(ConfigError, match=r"enter_threshold=0.2 must be > exit_threshold=0.2"):
        load_data({"enter_threshold": 0.2, "exit_threshold": 0.2}, RankerConfig)
    r = Ranker()
    r.update(10, [])
    with pytest.raises(DataError, match="ts=5"):
        r.update(5, [])
