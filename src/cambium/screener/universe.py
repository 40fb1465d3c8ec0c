"""The watched universe of `live.symbols = "all"` (SCR-13): exchangeInfo → the symbols that pass `live.universe`.

`select_symbols(body, cfg)` reads a `/fapi/v1/exchangeInfo` body: every entry of ``symbols`` whose ``status``,
``contractType`` and ``quoteAsset`` are among the configured ones (default TRADING, PERPETUAL, USDT), minus
`exclude`, in name order, at most `max_symbols`. It is tolerant per entry and strict per body: an entry that is not
an object with string fields, or whose name is not a symbol (``[A-Z0-9_]{1,32}``), is skipped and counted by reason
in `Selection.refused`; a body that is not an object with a ``symbols`` array raises `UniverseError`, one line naming
what is wrong, never a traceback.

`Universe` keeps the current set and turns each new read into a `Change` (added, removed), which live mode and the
sharded runner subscribe and unsubscribe. A read that fails, or finds no symbol at all (an outage page, an empty
answer), keeps the current set: an exchange hiccup never unsubscribes the market.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cambium.core.errors import CambiumError, DataError
from cambium.screener.config import UniverseConfig

__all__ = ["Change", "Selection", "Universe", "UniverseError", "select_symbols"]

SYMBOL_RE = re.compile(r"^[A-Z0-9_]{1,32}$")
# /fapi/v1/exchangeInfo weight (Binance USDⓈ-M docs).
EXCHANGE_INFO_WEIGHT = 1


class UniverseError(DataError):
    """An exchangeInfo body that cannot be read at all."""


@dataclass(frozen=True)
class Selection:
    symbols: tuple[str, ...]
    """Kept symbols, in name order."""
    listed: int
    """Entries in the body's ``symbols`` array."""
    refused: dict[str, int] = field(default_factory=dict)
    """Entries skipped as malformed, by reason: 'entry' (not an object), 'field' (a missing or non-string field),
    'name' (not a symbol name), 'duplicate'."""


def _text(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    return value if isinstance(value, str) else None


def select_symbols(body: Any, cfg: UniverseConfig) -> Selection:
    """The symbols of an exchangeInfo body that pass `cfg` (see the module docstring)."""
    if not isinstance(body, dict):
        raise UniverseError(f"exchangeInfo: expected a JSON object, got {type(body).__name__}")
    entries = body.get("symbols")
    if not isinstance(entries, list):
        raise UniverseError(f"exchangeInfo: 'symbols' must be an array, got {type(entries).__name__}")
    refused: Counter[str] = Counter()
    kept: set[str] = set()
    seen: set[str] = set()
    excluded = set(cfg.exclude)
    for entry in entries:
        if not isinstance(entry, dict):
            refused["entry"] += 1
            continue
        name, status, quote = _text(entry, "symbol"), _text(entry, "status"), _text(entry, "quoteAsset")
        contract = _text(entry, "contractType")
        if name is None or status is None or quote is None or contract is None:
            refused["field"] += 1
            continue
        if not SYMBOL_RE.match(name):
            refused["name"] += 1
            continue
        if name in seen:
            refused["duplicate"] += 1
            continue
        seen.add(name)
        if (status in cfg.statuses and contract in cfg.contract_types and quote in cfg.quote_assets
                and name not in excluded):
            kept.add(name)
    symbols = tuple(sorted(kept))
    if cfg.max_symbols is not None:
        symbols = symbols[: cfg.max_symbols]
    return Selection(symbols, len(entries), dict(refused))


@dataclass(frozen=True)
class Change:
    added: tuple[str, ...]
    removed: tuple[str, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class Universe:
    """The current watched set; `refresh()` reads exchangeInfo again through `fetch` (a callable returning the
    parsed body) and returns what changed."""

    def __init__(self, cfg: UniverseConfig, fetch: Callable[[], Any]) -> None:
        self.cfg = cfg
        self.fetch = fetch
        self.symbols: tuple[str, ...] = ()
        self.reads = 0
        self.failures = 0
        self.refused: Counter[str] = Counter()
        self.last_error = ""

    def bootstrap(self) -> tuple[str, ...]:
        """The first read; raises UniverseError when it fails or finds nothing (live mode cannot start)."""
        change = self.refresh()
        if not self.symbols:
            raise UniverseError(f"live.symbols='all' found no symbol to watch: {self.last_error}")
        return change.added

    def refresh(self) -> Change:
        self.reads += 1
        try:
            selection = select_symbols(self.fetch(), self.cfg)
        except (CambiumError, OSError, ValueError) as exc:
            self.failures += 1
            self.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return Change((), ())
        self.refused.update(selection.refused)
        if not selection.symbols:
            self.failures += 1
            self.last_error = f"exchangeInfo listed {selection.listed} entries and none passes live.universe"
            return Change((), ())
        self.last_error = ""
        old, new = set(self.symbols), set(selection.symbols)
        self.symbols = selection.symbols
        return Change(tuple(sorted(new - old)), tuple(sorted(old - new)))
