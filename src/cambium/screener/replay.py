"""Deterministic replay (SCR-11): a recording through features → model → score → rank, with the chained digest.

Replay and live mode share everything after the event source: `Session` takes MarketEvents in arrival order, turns
them into FeatureSnapshots (`FeatureEngine`) and feeds each cadence tick to the `Pipeline`. The digest chains the
sha256 of every RankEvent's canonical JSON, so two replays of the same recording with the same config give the same
64 hex characters on any machine, and any change of a number that reaches a RankEvent changes it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cambium.core.config import fingerprint
from cambium.core.errors import DataError
from cambium.market.events import MarketEvent
from cambium.screener.config import ScreenerConfig
from cambium.screener.contracts import FeatureSnapshot, RankEvent
from cambium.screener.features import FeatureEngine
from cambium.screener.pipeline import Notifier, Pipeline
from cambium.screener.sources import DecodeStats, iter_events
from cambium.screener.storage import ScreenerStore

__all__ = ["ReplayResult", "Session", "read_expected", "replay", "write_expected"]


class Session:
    """Events in, RankEvents out: the part of the screener that live mode and replay share."""

    def __init__(self, cfg: ScreenerConfig, *, store: ScreenerStore | None = None,
                 notifiers: Iterable[Notifier] = ()) -> None:
        self.cfg = cfg
        self.engine = FeatureEngine(cfg.features)
        self.pipeline = Pipeline(cfg, store=store, notifiers=notifiers)
        self.snapshots = 0
        self.latest: dict[str, FeatureSnapshot] = {}

    def on_event(self, ev: MarketEvent) -> list[RankEvent]:
        snapshots = self.engine.on_event(ev)
        return self._ticks(snapshots) if snapshots else []

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
                out.extend(self.pipeline.step(tick[0].ts, tick))
                for snap in tick:
                    self.latest[snap.symbol] = snap
                start = i
        self.snapshots += len(snapshots)
        return out

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

    def summary(self) -> dict[str, Any]:
        return {"digest": self.digest, "rank_events": self.rank_events, "snapshots": self.snapshots,
                "frames": self.stats.frames, "events": self.stats.events, "malformed": self.stats.malformed,
                "late_events": self.late_events}


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
                        dict(session.pipeline.counts))


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
