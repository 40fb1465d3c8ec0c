"""Issue 14: hostile input never stops the screener. A bad frame is counted and skipped, an event time far from the
clock fills no bars, an event that fails is counted by the session's guard; replay and live carry on, and every input
frame and event is either processed or counted. Regression cases first, then fuzzing with mutated real frames."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from functools import cache
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from tests.screener._hostile import CAPTURES, REPO, base_records, hostile_frames, stream_frames
from typer.testing import CliRunner

from cambium.core.config import load
from cambium.market.binance import ControlReply, MalformedFrame, decode_binance, route_usdm
from cambium.market.config import WsConfig
from cambium.market.events import MarketEvent
from cambium.market.recorder import Record
from cambium.market.replay_server import ReplayServer
from cambium.screener.cli import app
from cambium.screener.config import FeatureConfig, ScreenerConfig
from cambium.screener.features import RESYNC_EVENTS, FeatureEngine
from cambium.screener.live import LiveResult, MalformedCollector, run_live
from cambium.screener.observability import ScreenerMetrics
from cambium.screener.replay import Session, replay
from cambium.screener.sources import DecodeStats, decode_record

CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
DAY_MS = 86_400_000
YEAR_MS = 365 * DAY_MS


def _cfg(*overrides: str) -> ScreenerConfig:
    return load(CONFIG, ScreenerConfig, list(overrides))


@cache
def _base_events(n: int) -> tuple[MarketEvent, ...]:
    stats = DecodeStats()
    return tuple(ev for r in base_records(n) for ev in decode_record(r, None, "binance_usdm", stats))


def _events(records: tuple[Record, ...]) -> list[MarketEvent]:
    """The events of `base_records(n)` (decoded once; the engine never changes an event)."""
    return list(_base_events(len(records)))


def _shifted(ev: MarketEvent, ms: int) -> MarketEvent:
    return MarketEvent(ev.ts + ms, ev.source, ev.symbol, ev.type, ev.payload, ev.recv_ts)


def _issue_frames() -> list[str]:
    """The frames of issue 14: wrong JSON types, non-finite and absurd numbers, a far-future event time."""
    trade = next(f for f in stream_frames() if '"e":"trade"' in f and "BTCUSDT" in f)
    book = next(f for f in stream_frames() if '"e":"bookTicker"' in f and "BTCUSDT" in f)
    e = book.split('"E":', 1)[1].rstrip("}")
    return [
        trade.replace('"s":"BTCUSDT"', '"s":5'),
        trade.replace('"E":', '"E":"', 1).replace(',"T"', '","T"', 1),
        trade.replace('"p":"', '"p":"NaN","x":"', 1),
        book.replace('"b":"', '"b":"1e400","x":"', 1),
        book.replace(f'"E":{e}', f'"E":{int(e) + YEAR_MS}'),  # accepted by the decoder, held by the engine
    ]


def _write_capture(path: Path, records: list[Record]) -> Path:
    path.write_text("".join(f"{r.recv_ns} {r.frame}\n" for r in records))
    return path


def _with(records: tuple[Record, ...], frames: list[str], at: list[int]) -> list[Record]:
    out = list(records)
    for i, frame in sorted(zip(at, frames, strict=True), reverse=True):
        out.insert(i, out[i]._replace(frame=frame))
    return out


def test_replay_counts_the_issue_frames_and_gives_the_clean_digest(tmp_path: Path) -> None:
    clean = base_records(20_000)
    hostile = _with(clean, _issue_frames(), [300, 4_000, 9_000, 12_000, 15_000])
    cfg = _cfg()
    want = replay([_write_capture(tmp_path / "btcusdt_20240808.txt", list(clean))], cfg)
    (tmp_path / "hostile").mkdir()
    path = _write_capture(tmp_path / "hostile" / "btcusdt_20240808.txt", hostile)
    got = replay([path], cfg)
    assert got.stats.malformed == 4 and got.malformed_events == {"clock_jump": 1, "error": 0}
    assert (got.digest, got.snapshots, got.rank_events, got.applied) == (want.digest, want.snapshots,
                                                                         want.rank_events, want.applied)
    result = CliRunner().invoke(app, ["replay", str(path), "--config", str(CONFIG)])
    assert result.exit_code == 0, result.output
    assert "4 malformed" in result.output and "1 refused (clock_jump)" in result.output
    assert want.digest in result.output


def test_a_far_future_event_time_fills_no_bars() -> None:
    events = _events(base_records(8_000))
    clean = FeatureEngine(_cfg().features).run(events)
    i = next(i for i, ev in enumerate(events) if i > 2_000 and ev.type == "book")
    engine = FeatureEngine(_cfg().features)
    got = engine.run([*events[:i], _shifted(events[i], DAY_MS), *events[i:]])
    assert [(s.ts, s.symbol, s.features) for s in got] == [(s.ts, s.symbol, s.features) for s in clean]
    assert (engine.clock_jumps, engine.resyncs, engine.events) == (1, 0, len(events))


def test_a_far_past_event_time_is_refused_too() -> None:
    events = _events(base_records(8_000))
    clean = FeatureEngine(_cfg().features).run(events)
    engine = FeatureEngine(_cfg().features)
    got = engine.run([*events[:3_000], _shifted(events[3_000], -YEAR_MS), *events[3_000:]])
    assert [(s.ts, s.symbol, s.data_health) for s in got] == [(s.ts, s.symbol, s.data_health) for s in clean]
    assert engine.clock_jumps == 1


def test_a_stream_that_really_jumps_moves_the_clock_without_filling_the_gap() -> None:
    """Two recordings an hour apart: the second is held for RESYNC_EVENTS events, then the clock moves to it."""
    events = _events(base_records(8_000))
    later = [_shifted(ev, 3_600_000) for ev in events]
    engine = FeatureEngine(_cfg().features)
    got = engine.run([*events, *later])
    assert (engine.resyncs, engine.clock_jumps, engine.events) == (1, 0, 2 * len(events))
    first, second = FeatureEngine(_cfg().features).run(events), FeatureEngine(_cfg().features).run(later)
    assert len(got) <= len(first) + len(second) + 2
    gap = (events[-1].ts + 2_000, later[0].ts - 1)
    assert not [s.ts for s in got if gap[0] < s.ts < gap[1]]  # no bar inside the gap
    assert {s.ts for s in second} <= {s.ts for s in got}


def test_a_bogus_first_event_time_is_outvoted_by_the_stream() -> None:
    events = _events(base_records(8_000))
    engine = FeatureEngine(_cfg().features)
    got = engine.run([_shifted(events[0], YEAR_MS), *events])
    assert engine.resyncs == 1 and engine.events == len(events) + 1
    clean = FeatureEngine(_cfg().features).run(events)
    assert [s.ts for s in got] == [s.ts for s in clean] and all(s.ts < events[0].ts + YEAR_MS for s in got)


def test_a_tick_older_than_one_already_ranked_is_dropped_and_counted_not_raised() -> None:
    """Found by the replay fuzz: a stream whose per-symbol clocks straddle (one symbol's events 10 s behind another's)
    made the engine's final flush hand the ranker an older tick, and `finish` raised DataError."""
    events = _events(base_records(4_000))
    session = Session(_cfg())
    snapshots = FeatureEngine(_cfg().features).run(events)
    ticks = sorted({s.ts for s in snapshots})
    late, early = [s for s in snapshots if s.ts == ticks[-1]], [s for s in snapshots if s.ts == ticks[0]]
    session._ticks(late)
    assert session._ticks(early) == [] and session.out_of_order == len(early)
    assert session._ticks(late) is not None  # a tick at the last ranked time is still taken


def test_the_session_guard_counts_an_event_that_fails_and_carries_on() -> None:
    events = _events(base_records(4_000))
    broken = MarketEvent(events[100].ts, "binance_usdm", "BTCUSDT", "book", {"kind": "top", "bid": 1.0}, 1)
    session = Session(_cfg())
    out = [session.on_event(ev) for ev in [*events[:200], broken, *events[200:]]]
    session.finish()
    assert session.malformed == {"clock_jump": 0, "error": 1} and len(out) == len(events) + 1
    assert session.engine.events == len(events) and session.snapshots > 0


def test_live_carries_on_past_hostile_frames_and_exposes_the_counts() -> None:
    records = _with(base_records(3_000), _issue_frames(), [100, 300, 500, 700, 900])  # each before later good ones
    cfg = _cfg("live.depth_snapshots=false", "live.gc_freeze=false")
    session, metrics = Session(cfg), ScreenerMetrics()
    metrics.registry.register(MalformedCollector(session))

    async def run() -> tuple[LiveResult, int]:
        async with ReplayServer(records, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            good = 0
            for frame in srv.frames:
                with contextlib.suppress(MalformedFrame):
                    good += len(decode_binance(frame, 0, "x"))  # type: ignore[arg-type]
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            return await run_live(cfg, ws, session, metrics, max_events=good, duration_s=60), good

    result, good = asyncio.run(run())
    assert result.events == good and sum(s.malformed for s in result.shards) == 4
    assert result.malformed == {"clock_jump": 1, "error": 0} and session.snapshots > 0
    text = metrics.exposition().decode()
    assert 'cambium_screener_malformed_events_total{reason="clock_jump"} 1.0' in text
    assert 'cambium_screener_malformed_events_total{reason="error"} 0.0' in text


JUMP_CFG = ("features.max_clock_jump_ms=10000",)


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(hostile_frames(stream_frames()), min_size=1, max_size=12),
       at=st.lists(st.integers(0, 1_999), min_size=12, max_size=12))
def test_replay_of_mutated_frames_counts_every_frame_and_stays_bounded(frames: list[str], at: list[int]) -> None:
    """Fuzz `screener replay`: never a traceback; every frame is decoded or counted malformed, every event is applied
    or counted refused; the bars closed stay within what the jump bound allows."""
    base = base_records(2_000)
    records = _with(base, frames, at[: len(frames)])
    cfg = _cfg(*JUMP_CFG)
    with tempfile.TemporaryDirectory() as tmp:
        result = replay([_write_capture(Path(tmp) / "btcusdt_20240808.txt", records)], cfg)
    skipped = set(result.stats.skipped_lines)  # a frame cut to nothing leaves a line without a frame
    assert all(not r.frame.strip() for line, r in enumerate(records, 1) if line in skipped)
    records = [r for line, r in enumerate(records, 1) if line not in skipped]
    decoded = 0
    for r in records:
        try:
            out = decode_binance(r.frame, r.recv_ns, "binance_usdm")
        except MalformedFrame:
            continue
        decoded += not isinstance(out, ControlReply)
    rest = sum(r.frame.startswith('{"lastUpdateId"') for r in records)  # the capture's inline REST snapshot
    assert result.stats.frames == len(records)
    assert result.stats.malformed == len(records) - decoded - rest
    assert result.applied + sum(result.malformed_events.values()) == result.stats.events
    span_bars = (base[-1].recv_ns - base[0].recv_ns) // 1_000_000_000 + 4
    symbols = 2 + len(frames)
    assert result.snapshots <= symbols * (span_bars + len(frames) * (10_000 // cfg.features.cadence_ms + 1))


@settings(max_examples=60, deadline=None)
@given(shifts=st.lists(st.tuples(st.integers(0, 3_999), st.sampled_from([1, 10**3, 10**4, 10**5, 10**7, 10**12,
                                                                          2**62])),
                       max_size=8),
       negative=st.lists(st.booleans(), min_size=8, max_size=8))
def test_the_engine_under_hostile_event_times(shifts: list[tuple[int, int]], negative: list[bool]) -> None:
    """Fuzz the feature engine with event times moved anywhere in int64: every event is applied or counted, and the
    bars stay bounded (a bar per cadence over the real span, plus the jump bound per moved event)."""
    events = _events(base_records(4_000))
    for (i, ms), neg in zip(shifts, negative, strict=False):
        events[i % len(events)] = _shifted(events[i % len(events)], -ms if neg else ms)
    cfg = FeatureConfig(max_clock_jump_ms=10_000)
    engine = FeatureEngine(cfg)
    snapshots = engine.run(events)
    assert engine.events + engine.clock_jumps == len(events) and not engine.held
    span_bars = (base_records(4_000)[-1].recv_ns - base_records(4_000)[0].recv_ns) // 1_000_000_000 + 4
    assert len(snapshots) <= len(engine.symbols) * (span_bars + len(shifts) * (10_000 // cfg.cadence_ms + 2)
                                                    + RESYNC_EVENTS)


def test_the_fuzzed_captures_are_the_committed_ones() -> None:
    assert all(p.is_file() for p in CAPTURES) and len(stream_frames()) > 1_900
