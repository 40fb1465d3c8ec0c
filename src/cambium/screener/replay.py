"""Deterministic replay (SCR-11): a recording through features → model → score → rank, with the chained digest.

Replay and live mode share everything after the event source: `Session` takes MarketEvents in arrival order, turns
them into FeatureSnapshots (`FeatureEngine`) and feeds each cadence tick to the `Pipeline`. The digest chains the
sha256 of every RankEvent's canonical JSON, so two replays of the same recording with the same config give the same
64 hex characters on any machine, and any change of a number that reaches a RankEvent changes it.

Hostile input never stops a session: the decoders refuse frames with a wrong JSON type or a non-finite or absurd
number (counted in `DecodeStats.malformed`), the feature engine holds events whose time jumps too far
(`features.max_clock_jump_ms`), and `Session.on_event` is a per-event guard: an event whose processing raises is
counted under reason "error", logged, and skipped. `Session.malformed` gives the counts by reason (the Prometheus
counter `cambium_screener_malformed_events_total`); every event is applied, held, or counted there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambium.core.config import fingerprint
from cambium.core.errors import CambiumError, DataError
from cambium.market.events import MarketEvent
from cambium.screener.config import ScreenerConfig
from cambium.screener.contracts import FeatureSnapshot, PredictionSnapshot, RankEvent
from cambium.screener.features import FeatureEngine
from cambium.screener.pipeline import Notifier, Pipeline
from cambium.screener.scorer import Scored
from cambium.screener.sources import DecodeStats, iter_events
from cambium.screener.storage import ScreenerStore

__all__ = ["ReplayResult", "Session", "read_expected", "replay", "write_expected"]

log = logging.getLogger("cambium.screener.session")

# What bad data can raise inside the engine or the pipeline; anything else is a bug and propagates.
GUARDED = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError, CambiumError)


class Session:
    """Events in, RankEvents out: the part of the screener that live mode and replay share."""

    def __init__(self, cfg: ScreenerConfig, *, store: ScreenerStore | None = None,
                 notifiers: Iterable[Notifier] = ()) -> None:
        self.cfg = cfg
        self.engine = FeatureEngine(cfg.features)
        self.pipeline = Pipeline(cfg, store=store, notifiers=notifiers)
        self.snapshots = 0
        self.errors = 0
        self.out_of_order = 0
        self._last_tick: int | None = None
        self.latest: dict[str, FeatureSnapshot] = {}

    def on_event(self, ev: MarketEvent) -> list[RankEvent]:
        try:
            snapshots = self.engine.on_event(ev)
            return self._ticks(snapshots) if snapshots else []
        except GUARDED as exc:
            self.errors += 1
            # The first one with its traceback (a bug report), then one line at each power of two.
            if self.errors & (self.errors - 1) == 0:
                log.warning("skipped an event that failed (%d so far): %s %s at ts=%r: %s: %s", self.errors,
                            ev.symbol, ev.type, ev.ts, type(exc).__name__, exc, exc_info=self.errors == 1)
            return []

    @property
    def malformed(self) -> dict[str, int]:
        """Events refused after decoding, by reason: 'clock_jump' (see FeatureEngine) and 'error' (the guard).
        `out_of_order` counts snapshots (not events) of a tick older than one already ranked, which the ranker cannot
        take back: they are dropped."""
        return {"clock_jump": self.engine.clock_jumps, "error": self.errors}

    def finish(self) -> list[RankEvent]:
        events = self._ticks(self.engine.flush())
        self.pipeline.close()
        return events

    def _ticks(self, snapshots: list[FeatureSnapshot]) -> list[RankEvent]:
        out: list[RankEvent] = []
        start = 0
        # The engine returns the snapshots of one or more ticks, ordered by (ts, symbol): one pipeline step a tick.
        for i in range(1, len(snapshots) + 1):
            if i == len(snapshots) or snapshots[i].ts != snapshots[start].ts:
                tick = snapshots[start:i]
                if self._last_tick is not None and tick[0].ts < self._last_tick:
                    self.out_of_order += len(tick)
                    start = i
                    continue
                self._last_tick = tick[0].ts
                out.extend(self._step(tick[0].ts, tick))
                for snap in tick:
                    self.latest[snap.symbol] = snap
                start = i
        self.snapshots += len(snapshots)
        return out

    def _step(self, ts: int, tick: list[FeatureSnapshot]) -> list[RankEvent]:
        """One tick through the pipeline (a shard worker's session predicts only, see cambium.screener.shards)."""
        return self.pipeline.step(ts, tick)

    def on_predictions(self, ts: int, predictions: list[PredictionSnapshot]) -> list[RankEvent]:
        """A tick predicted by shard workers (their predictions merged, in symbol order) into score → rank: the
        sharded runner's parent session. A tick older than one already ranked is dropped, as in `_ticks`."""
        if self._last_tick is not None and ts < self._last_tick:
            self.out_of_order += len(predictions)
            return []
        self._last_tick = ts
        self.snapshots += len(predictions)
        return self.pipeline.decide(ts, [(None, p) for p in predictions])

    @property
    def digest(self) -> str:
        return self.pipeline.digest.hexdigest()


@dataclass
class ReplayResult:
    digest: str
    rank_events: int
    snapshots: int
    stats: DecodeStats
    late_events: int
    counts: dict[str, int] = field(default_factory=dict)
    malformed_events: dict[str, int] = field(default_factory=dict)
    """Decoded events the session refused, by reason (`Session.malformed`); `stats.malformed` counts frames."""
    applied: int = 0
    """Decoded events the feature engine applied: with `malformed_events`, every one of `stats.events`."""
    out_of_order: int = 0
    """Snapshots dropped because their tick was older than one already ranked (`Session.out_of_order`)."""
    top: Scored | None = None
    """The highest score of the replay (`Pipeline.top`)."""

    def why_no_events(self, cfg: ScreenerConfig) -> str | None:
        """One line saying why the replay emitted no RankEvent, or None when it emitted some."""
        if self.rank_events:
            return None
        if self.top is None:
            return "no RankEvent: no feature snapshot was scored (is the recording empty, or every frame malformed?)"
        r = cfg.ranker
        if self.top.score >= r.enter_threshold:
            return (f"no RankEvent: scores reached {self.top.score:.4f} ({self.top.symbol} at ts={self.top.ts}) but "
                    f"never stayed >= ranker.enter_threshold={r.enter_threshold} for ranker.enter_confirm_ms="
                    f"{r.enter_confirm_ms}")
        return (f"no RankEvent: the highest score was {self.top.score:.4f} ({self.top.symbol} at ts={self.top.ts}), "
                f"below ranker.enter_threshold={r.enter_threshold}; a calm recording stays under the default "
                "threshold: configs/screener/sample-replay.toml lowers it to the committed sample's scale")

    def summary(self) -> dict[str, Any]:
        out = {"digest": self.digest, "rank_events": self.rank_events, "snapshots": self.snapshots,
               "frames": self.stats.frames, "events": self.stats.events, "malformed": self.stats.malformed,
               "late_events": self.late_events}
        refused = sum(self.malformed_events.values())
        if refused:  # absent when zero: a clean recording's summary stays what it was
            out["malformed_events"] = refused
        if self.out_of_order:
            out["out_of_order_snapshots"] = self.out_of_order
        return out


def replay(paths: list[Path], cfg: ScreenerConfig, *, store: ScreenerStore | None = None) -> ReplayResult:
    """Replay recordings or captures at full speed; several paths are merged in receive-time order."""
    import heapq

    stats = DecodeStats()
    sources = [iter_events(p, stats=stats) for p in paths]
    stream = sources[0] if len(sources) == 1 else heapq.merge(*sources, key=lambda e: e.recv_ts)
    session = Session(cfg, store=store)
    n_events = 0
    for ev in stream:
        n_events += len(session.on_event(ev))
    n_events += len(session.finish())
    return ReplayResult(session.digest, n_events, session.snapshots, stats, session.engine.late_events,
                        dict(session.pipeline.counts), session.malformed, session.engine.events, session.out_of_order,
                        session.pipeline.top)


def write_expected(path: Path, result: ReplayResult, cfg: ScreenerConfig, sources: list[Path]) -> None:
    doc = {**result.summary(), "config_fingerprint": fingerprint(cfg), "sources": [p.name for p in sources]}
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def read_expected(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"expected digest file {str(path)!r} cannot be read: {exc}") from None
    digest = doc.get("digest") if isinstance(doc, dict) else None
    if not isinstance(digest, str) or len(digest) != 64:
        raise DataError(f"{path}: no 64-hex 'digest' field")
    return doc
