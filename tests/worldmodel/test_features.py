import math

import pytest
import torch

from cambium.core.errors import DataError
from cambium.worldmodel.features import CandleBatch, bar_features, calendar_features, clock_features, patch_bars

T0 = 1757750400000  # 2025-09-13 08:00 UTC, a Saturday
HOUR = 3_600_000


def test_bar_features_closed_form():
    ohlcv = torch.tensor([[[10.0, 11.0, 9.0, 10.5, 3.0], [10.4, 12.0, 10.0, 11.0, 0.0]]])
    f = bar_features(ohlcv).double()
    expected = torch.tensor([
        [0.0, math.log(11 / 10), math.log(9 / 10), math.log(10.5 / 10), math.log(4.0)],
        [math.log(10.4 / 10.5), math.log(12 / 10.5), math.log(10 / 10.5), math.log(11 / 10.5), 0.0],
    ], dtype=torch.float64)
    torch.testing.assert_close(f[0], expected, atol=1e-6, rtol=1e-6)


def test_calendar_features_of_a_known_time():
    cal = calendar_features(torch.tensor([T0, T0 + 16 * HOUR + 2 * 24 * HOUR]))
    # 08:00 on a Saturday (weekday 5, Monday = 0), then 00:00 on the Tuesday after.
    torch.testing.assert_close(cal[0], torch.tensor([
        math.sin(2 * math.pi * 8 / 24), math.cos(2 * math.pi * 8 / 24),
        math.sin(2 * math.pi * 5 / 7), math.cos(2 * math.pi * 5 / 7)]))
    torch.testing.assert_close(cal[1], torch.tensor([0.0, 1.0, math.sin(2 * math.pi / 7), math.cos(2 * math.pi / 7)]))


def test_patching_keeps_the_latest_bars():
    x = torch.arange(37.0).view(1, 37, 1)
    patches, dropped = patch_bars(x, 8)
    assert dropped == 5 and patches.shape == (1, 4, 8, 1)
    assert patches[0, -1, -1, 0] == 36 and patches[0, 0, 0, 0] == 5
    with pytest.raises(DataError, match="shorter than one patch"):
        patch_bars(x[:, :7], 8)


def test_clock_features_are_causal_per_patch(make_candles):
    candles = make_candles(2, 96)
    clock = clock_features(candles, 16)
    assert clock.shape == (2, 6, 6)
    assert torch.equal(clock[:, 0, :2], torch.zeros(2, 2))  # nothing earlier to compare with
    changed = candles.ohlcv.clone()
    changed[:, 64:, :4] *= torch.linspace(0.5, 2.0, 32, dtype=torch.float64).view(1, 32, 1)
    changed[:, 64:, 4] *= 10
    clock2 = clock_features(CandleBatch(changed, candles.open_time_ms), 16)
    torch.testing.assert_close(clock2[:, :4], clock[:, :4])
    assert not torch.allclose(clock2[:, 4:, :2], clock[:, 4:, :2])


def test_bad_candles_are_rejected(make_candles):
    candles = make_candles(1, 32)
    bad = candles.ohlcv.clone()
    bad[0, 3, 2] = 0.0
    with pytest.raises(DataError, match="> 0"):
        bar_features(bad)
    bad[0, 3, 2] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        bar_features(bad)
    with pytest.raises(DataError, match=r"\[B, T, 5\]"):
        CandleBatch(candles.ohlcv[..., :4], candles.open_time_ms)
    with pytest.raises(DataError, match="open_time_ms"):
        CandleBatch(candles.ohlcv, candles.open_time_ms[:, :5])
