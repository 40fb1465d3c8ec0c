"""Phase 1 of the pipeline: kline files → the market candle store, validation, gap report; store → candle segments.

A symbol's bars are split at every gap into contiguous segments (no bar is invented: a window never spans a gap).
`chronological_split` gives the WM-7 calendar split: bars before `split_ms` form the training window, bars from
`holdout_ms = split_ms + embargo` on form the hold-out window; nothing in between is used as a target by anyone.
"""

from __future__ import annotations

import glob
import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cambium.core.errors import CambiumError, DataError
from cambium.market.candles import interval_ms
from cambium.market.importers import read_kline_file
from cambium.market.store import CandleStore
from cambium.worldmodel.config import DataConfig, EvalConfig
from cambium.worldmodel.training import CandleSeries

__all__ = [
    "ImportReport", "Split", "chronological_split", "holdout_part", "import_candles", "kline_files", "load_segments",
    "train_part",
]


@dataclass
class ImportReport:
    """What phase 1 imported: per symbol rows and gaps, and the files it refused (with the reason)."""

    store_root: str
    market: str
    interval: str
    symbols: dict[str, dict[str, int | str | None]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @property
    def rows(self) -> int:
        return sum(int(v["rows"] or 0) for v in self.symbols.values())

    @property
    def gaps(self) -> int:
        return sum(int(v["gaps"] or 0) for v in self.symbols.values())


def kline_files(cfg: DataConfig) -> list[Path]:
    """The files of `cfg.klines_glob` (sorted), restricted to `cfg.symbols` when given; none when the glob is empty."""
    if not cfg.klines_glob:
        return []
    paths = sorted(Path(p) for p in glob.glob(cfg.klines_glob))
    if cfg.symbols:
        wanted = {s.upper() for s in cfg.symbols}
        paths = [p for p in paths if p.name.split(".")[0].split("_")[0].split("-")[0].upper() in wanted]
        found = {p.name.split(".")[0].split("_")[0].split("-")[0].upper() for p in paths}
        if wanted - found:
            raise DataError(f"data.symbols {sorted(wanted - found)} have no file matching {cfg.klines_glob!r}")
    if not paths:
        raise DataError(f"data.klines_glob={cfg.klines_glob!r} matches no file (relative to {Path.cwd()})")
    return paths


def import_candles(cfg: DataConfig, store_root: Path, *, merge: bool = False) -> ImportReport:
    """Validate every kline file and write it to the store; bad files are counted and skipped, with their reason.

    Without `merge` a file replaces its partition (re-running phase 1 gives the same store); with it the file's bars
    are merged into what the store holds. The report covers every partition of the interval afterwards (restricted to
    `cfg.symbols` when given), so an empty `klines_glob` reads a store as it is.
    """
    store = CandleStore(store_root, cfg.market)
    report = ImportReport(str(store_root), cfg.market, cfg.interval)
    for path in kline_files(cfg):
        try:
            imported = read_kline_file(path, interval=cfg.interval)
            table = imported.table
            if cfg.drop_last_bar and table.num_rows:
                table = table.slice(0, table.num_rows - 1)
            store.write(imported.symbol, cfg.interval, table, merge=merge)
        except CambiumError as exc:
            report.rejected[str(path)] = str(exc)
    wanted = {s.upper() for s in cfg.symbols}
    for info in store.ls():
        if info.interval != cfg.interval or (wanted and info.symbol not in wanted):
            continue
        gaps = store.gaps(info.symbol, cfg.interval)
        report.symbols[info.symbol] = {
            "rows": info.rows, "first_open_time": info.first_open_time, "last_open_time": info.last_open_time,
            "gaps": gaps.count, "missing_bars": gaps.missing_bars, "longest_gap_bars": gaps.longest_bars,
        }
    if not report.symbols:
        raise DataError(f"no kline file could be imported; rejected: {report.rejected}")
    return report


def load_segments(store_root: Path, cfg: DataConfig, symbols: list[str]) -> list[CandleSeries]:
    """Contiguous segments of each symbol's stored bars, named `SYMBOL` (or `SYMBOL.k` when gaps split it)."""
    store = CandleStore(store_root, cfg.market)
    step = interval_ms(cfg.interval)
    out: list[CandleSeries] = []
    for symbol in symbols:
        table = store.read(symbol, cfg.interval)
        t = table.column("open_time").to_numpy().astype(np.int64)
        ohlcv = np.stack([table.column(c).to_numpy().astype(np.float64)
                          for c in ("open", "high", "low", "close", "volume")], axis=1)
        breaks = np.flatnonzero(np.diff(t) != step) + 1
        bounds = [0, *breaks.tolist(), len(t)]
        pieces = [(a, b) for a, b in itertools.pairwise(bounds) if b - a >= cfg.min_segment_bars]
        for k, (a, b) in enumerate(pieces):
            name = symbol if len(pieces) == 1 else f"{symbol}.{k}"
            out.append(CandleSeries(name, torch.from_numpy(ohlcv[a:b].copy()), torch.from_numpy(t[a:b].copy())))
    if not out:
        raise DataError(f"no segment of >= data.min_segment_bars={cfg.min_segment_bars} bars in the store")
    return out


@dataclass(frozen=True)
class Split:
    """Calendar split (epoch ms): training bars have open_time < split_ms, hold-out bars open_time >= holdout_ms."""

    split_ms: int
    holdout_ms: int
    first_ms: int
    last_ms: int


def chronological_split(series: list[CandleSeries], cfg: EvalConfig, interval: str) -> Split:
    """The split at (1 - holdout_fraction) of the calendar span of all bars, aligned to the interval."""
    step = interval_ms(interval)
    first = min(int(s.open_time_ms[0]) for s in series)
    last = max(int(s.open_time_ms[-1]) for s in series)
    split = first + int((last - first) * (1.0 - cfg.holdout_fraction))
    split -= split % step
    return Split(split, split + cfg.embargo_bars * step, first, last)


def train_part(series: list[CandleSeries], split: Split, min_bars: int) -> list[CandleSeries]:
    """Each segment cut to its bars before the split (segments left with fewer than `min_bars` are dropped)."""
    out = []
    for s in series:
        n = int((s.open_time_ms < split.split_ms).sum())
        if n >= min_bars:
            out.append(CandleSeries(s.name, s.ohlcv[:n], s.open_time_ms[:n]))
    return out


def holdout_part(series: list[CandleSeries], split: Split, min_bars: int) -> list[CandleSeries]:
    """Each segment cut to its bars of the hold-out window."""
    out = []
    for s in series:
        keep = s.open_time_ms >= split.holdout_ms
        if int(keep.sum()) >= min_bars:
            out.append(CandleSeries(s.name, s.ohlcv[keep], s.open_time_ms[keep]))
    return out
