"""Real candles for the world-model tests, read with the market importer (validated like the pipeline's store)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cambium.market.importers import read_kline_file
from cambium.worldmodel.features import CandleBatch
from cambium.worldmodel.training import CandleSeries

T0 = 1757750400000  # 2025-09-13 08:00 UTC, a Saturday
HOUR = 3_600_000
KLINES = Path(__file__).resolve().parents[2] / "data" / "samples" / "market" / "klines_1h_futures"


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (restored after): small ops on a loaded 2-core machine run ~10x slower with two
    (oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_klines(path: Path) -> CandleSeries:
    """A klines_1h_futures file -> CandleSeries; the last row (probably a still-forming candle) is dropped."""
    table = read_kline_file(path, interval="1h").table
    table = table.slice(0, table.num_rows - 1)
    ohlcv = torch.stack(
        [torch.from_numpy(table.column(k).to_numpy()) for k in ("open", "high", "low", "close", "volume")], dim=-1
    ).double()
    times = torch.from_numpy(table.column("open_time").to_numpy().copy()).long()
    return CandleSeries(path.name.removesuffix(".csv.gz"), ohlcv, times)


@pytest.fixture(scope="session")
def real_series() -> list[CandleSeries]:
    paths = sorted(KLINES.glob("*.csv.gz"))
    assert paths, f"no sample klines under {KLINES}"
    return [read_klines(p) for p in paths]


def random_candles(b: int, t: int, seed: int = 0) -> CandleBatch:
    gen = torch.Generator().manual_seed(seed)
    close = 100 * torch.exp(torch.cumsum(torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.01, dim=1))
    open_ = torch.cat([close[:, :1], close[:, :-1]], dim=1)
    high = torch.maximum(open_, close) * (1 + torch.rand(b, t, generator=gen, dtype=torch.float64) * 0.01)
    low = torch.minimum(open_, close) * (1 - torch.rand(b, t, generator=gen, dtype=torch.float64) * 0.01)
    volume = torch.rand(b, t, generator=gen, dtype=torch.float64) * 1000
    times = T0 + torch.arange(t, dtype=torch.int64) * HOUR
    return CandleBatch(torch.stack([open_, high, low, close, volume], dim=-1), times.expand(b, t).clone())


@pytest.fixture
def make_candles():
    """Synthetic random-walk candles: make_candles(b, t, seed=0) -> CandleBatch (float64 ohlcv, hourly times)."""
    return random_candles
