"""Live terminal table of the current top-K (rich), redrawn on a token bucket from a background thread.

The table is rebuilt from RankEvent deltas (SYMBOL_ENTER adds a row, SYMBOL_EXIT removes it, alerts update its status)
plus optional score refreshes (`set_scores`); `offer` only updates a dict under a lock, so the pipeline never waits
for the terminal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cambium.screener.contracts import RankEvent
from cambium.screener.notify import TokenBucket

__all__ = ["TerminalTable"]

_STYLE = {"TRADEABLE": "bold green", "WATCH": "yellow", "TRAP": "bold red", "DEAD": "dim", "DATA_ISSUE": "magenta"}


@dataclass(slots=True)
class _Row:
    score: float
    status: str
    since_ts: int
    last_ts: int
    why: str = ""


class TerminalTable:
    def __init__(self, top_k: int = 20, redraws_per_s: float = 4.0, burst: int = 1,
                 console: Console | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.top_k = top_k
        self.console = console or Console()
        self.bucket = TokenBucket(redraws_per_s, burst, clock)
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: Live | None = None
        self.redraws = 0

    def offer(self, event: RankEvent) -> bool:
        status = event.payload.get("status")
        with self._lock:
            if event.event == "SYMBOL_EXIT":
                self._rows.pop(event.symbol, None)
            elif event.event == "SYMBOL_ENTER":
                self._rows[event.symbol] = _Row(event.score, str(status or ""), event.ts, event.ts)
            elif event.symbol in self._rows:
                row = self._rows[event.symbol]
                row.score, row.last_ts = event.score, event.ts
                if status is not None:
                    row.status = str(status)
                if event.payload.get("explanation"):
                    row.why = str(event.payload["explanation"])
        self._dirty.set()
        return True

    def set_scores(self, ts: int, ranked: Iterable[tuple[str, float]]) -> None:
        """Refresh the scores of listed symbols (e.g. from `Ranker.ranked()`); unknown symbols are ignored."""
        with self._lock:
            for symbol, score in ranked:
                row = self._rows.get(symbol)
                if row is not None:
                    row.score, row.last_ts = score, ts
        self._dirty.set()

    def symbols(self) -> list[str]:
        with self._lock:
            return [s for s, _ in sorted(self._rows.items(), key=lambda kv: (-kv[1].score, kv[0]))]

    def render(self) -> Table:
        table = Table(title=f"cambium screener — top {self.top_k}", expand=False)
        for name, justify in [("#", "right"), ("symbol", "left"), ("score", "right"), ("status", "left"),
                              ("listed s", "right"), ("why (last alert)", "left")]:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        with self._lock:
            rows = sorted(self._rows.items(), key=lambda kv: (-kv[1].score, kv[0]))[: self.top_k]
        for i, (symbol, row) in enumerate(rows, 1):
            table.add_row(str(i), symbol, f"{row.score:.3f}", row.status, f"{(row.last_ts - row.since_ts) / 1000:.0f}",
                          row.why, style=_STYLE.get(row.status))
        return table

    def start(self) -> None:
        self._live = Live(self.render(), console=self.console, auto_refresh=False)
        self._live.start()
        self._thread = threading.Thread(target=self._run, name="screener-terminal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._live is not None
        while not self._stop.is_set():
            if not self._dirty.wait(0.1):
                continue
            if not self.bucket.try_take():
                self._stop.wait(self.bucket.wait_time())
                continue
            self._dirty.clear()
            self._live.update(self.render(), refresh=True)
            self.redraws += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._live is not None:
            self._live.update(self.render(), refresh=True)
            self._live.stop()
