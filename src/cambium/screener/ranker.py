"""Ranker: a top-K list with hysteresis, confirmation times and a minimum dwell, emitting RankEvent deltas.

Rules (all times in exchange milliseconds, from the `ts` passed to `update`):
- A symbol's *effective score* is its score, or 0 while its status is DATA_ISSUE (bad data never ranks).
- Entering: the effective score must stay ≥ enter_threshold for enter_confirm_ms (every update in that span), and a
  slot must be free. Confirmed candidates take free slots best score first (ties by symbol); the others wait, still
  confirmed, for a slot as long as their score holds.
- Leaving: the effective score must stay < exit_threshold for exit_confirm_ms, and the symbol must have been listed
  for at least min_dwell_ms. A listed symbol is never pushed out by a better one, so a score that stays inside the
  band [exit_threshold, enter_threshold) never causes an event (no flicker).
- Alerts for listed symbols, on a change of status (or on entry with that status): ALERT_TRADABLE on TRADEABLE,
  ALERT_TRAP on TRAP, DATA_ISSUE on DATA_ISSUE.

Only deltas are emitted: applying SYMBOL_ENTER/SYMBOL_EXIT in order reproduces `members()`. Within one update the
order is exits, entries, alerts, each by rank then symbol, so the output is a pure function of the input sequence.
`rank` is 1-based among listed symbols by (−score, symbol): after the update for entries and alerts, just before
leaving for exits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cambium.core.errors import DataError
from cambium.screener.config import RankerConfig
from cambium.screener.contracts import EventKind, RankEvent, Status
from cambium.screener.scorer import Scored

__all__ = ["Ranker"]

_ALERTS: dict[Status, EventKind] = {"TRADEABLE": "ALERT_TRADABLE", "TRAP": "ALERT_TRAP", "DATA_ISSUE": "DATA_ISSUE"}


@dataclass(slots=True)
class _Member:
    entered_ts: int
    below_since: int | None
    status: Status | None


class Ranker:
    """Stateful top-K list; feed it every scoring tick with `update(ts, scored)`."""

    def __init__(self, cfg: RankerConfig | None = None) -> None:
        self.cfg = cfg or RankerConfig()
        self._latest: dict[str, Scored] = {}
        self._members: dict[str, _Member] = {}
        self._above_since: dict[str, int] = {}
        self._last_ts: int | None = None

    def members(self) -> frozenset[str]:
        return frozenset(self._members)

    def ranked(self) -> list[tuple[str, float]]:
        """Current list as (symbol, score), best first (for display; the wire only carries deltas)."""
        return [(s, self._latest[s].score) for s in self._order()]

    def scores(self) -> dict[str, float]:
        """The latest score of every symbol the ranker has been fed, listed or not."""
        return {s: item.score for s, item in self._latest.items()}

    def effective_score(self, item: Scored) -> float:
        return 0.0 if item.status == "DATA_ISSUE" else item.score

    def update(self, ts: int, scored: Iterable[Scored]) -> list[RankEvent]:
        """Apply one tick of scores at time `ts` (non-decreasing) and return the resulting events."""
        if self._last_ts is not None and ts < self._last_ts:
            raise DataError(f"ranker update ts={ts} is earlier than the previous ts={self._last_ts}; "
                            "feed scores in time order")
        self._last_ts = ts
        cfg = self.cfg
        touched: dict[str, Scored] = {}
        for item in scored:
            touched[item.symbol] = item
        for symbol in sorted(touched):
            item = touched[symbol]
            self._latest[symbol] = item
            eff = self.effective_score(item)
            member = self._members.get(symbol)
            if member is not None:
                if eff < cfg.exit_threshold:
                    if member.below_since is None:
                        member.below_since = ts
                else:
                    member.below_since = None
            elif eff >= cfg.enter_threshold:
                self._above_since.setdefault(symbol, ts)
            else:
                self._above_since.pop(symbol, None)

        events: list[RankEvent] = []
        before = self._ranks()
        leaving = [s for s, m in self._members.items()
                   if m.below_since is not None and ts - m.below_since >= cfg.exit_confirm_ms
                   and ts - m.entered_ts >= cfg.min_dwell_ms]
        for symbol in sorted(leaving, key=lambda s: (before[s], s)):
            del self._members[symbol]
            events.append(RankEvent(ts=ts, event="SYMBOL_EXIT", symbol=symbol, rank=before[symbol],
                                    score=self._latest[symbol].score,
                                    payload={"status": self._latest[symbol].status, "reason": "BELOW_EXIT"}))

        free = cfg.top_k - len(self._members)
        entering: list[str] = []
        if free > 0:
            ready = [s for s, since in self._above_since.items() if ts - since >= cfg.enter_confirm_ms]
            ready.sort(key=lambda s: (-self._latest[s].score, s))
            entering = ready[:free]
        for symbol in entering:
            del self._above_since[symbol]
            self._members[symbol] = _Member(entered_ts=ts, below_since=None, status=None)
        after = self._ranks()
        for symbol in sorted(entering, key=lambda s: (after[s], s)):
            item = self._latest[symbol]
            events.append(RankEvent(ts=ts, event="SYMBOL_ENTER", symbol=symbol, rank=after[symbol], score=item.score,
                                    payload={"status": item.status, "reasons": item.reasons}))

        alerts: list[RankEvent] = []
        for symbol, member in self._members.items():
            item = self._latest[symbol]
            if item.status == member.status:
                continue
            member.status = item.status
            kind = _ALERTS.get(item.status)
            if kind is not None:
                alerts.append(RankEvent(ts=ts, event=kind, symbol=symbol, rank=after[symbol], score=item.score,
                                        payload={"status": item.status, "reasons": item.reasons}))
        alerts.sort(key=lambda e: (e.rank, e.symbol))
        events.extend(alerts)
        return events

    def _order(self) -> list[str]:
        return sorted(self._members, key=lambda s: (-self._latest[s].score, s))

    def _ranks(self) -> dict[str, int]:
        return {s: i + 1 for i, s in enumerate(self._order())}
