"""Candle features: per-bar inputs of the tokenizer and per-patch clock features of the encoder.

Bars are OHLCV rows [..., T, 5] (open, high, low, close, volume) with their open times in epoch milliseconds UTC.
A patch is `patch_length` consecutive bars; the tokenizer emits one code per patch and the encoder one latent per code,
so every per-patch feature here is computed from the bars of that patch alone or from earlier ones (never later):
nothing a position sees comes from its future.

When T is not a multiple of the patch length, the first T % patch_length bars are dropped so that the last patch ends at
the last bar (the latest data always counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from cambium.core.errors import DataError

__all__ = [
    "CLOCK_FEATURES",
    "N_BAR_FEATURES",
    "N_MARKET_CLOCK",
    "CandleBatch",
    "bar_features",
    "calendar_features",
    "clock_features",
    "patch_bars",
]

N_BAR_FEATURES = 5
# Market-derived clock features come first; at masked positions of the JEPA context they are hidden (they would reveal
# the masked patch), while the calendar features, known in advance, stay.
N_MARKET_CLOCK = 2
CLOCK_FEATURES = ("log_rv_surprise", "log_volume_surprise", "hour_sin", "hour_cos", "weekday_sin", "weekday_cos")
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


@dataclass(frozen=True)
class CandleBatch:
    """A batch of candle windows: ohlcv [B, T, 5] (float), open_time_ms [B, T] (int64, epoch ms UTC)."""

    ohlcv: Tensor
    open_time_ms: Tensor

    def __post_init__(self) -> None:
        if self.ohlcv.ndim != 3 or self.ohlcv.shape[-1] != 5:
            raise DataError(f"ohlcv must be [B, T, 5] (open, high, low, close, volume), got {tuple(self.ohlcv.shape)}")
        if self.open_time_ms.shape != self.ohlcv.shape[:2]:
            raise DataError(
                f"open_time_ms must be [B, T] = {tuple(self.ohlcv.shape[:2])}, got {tuple(self.open_time_ms.shape)}"
            )


def _check_prices(ohlcv: Tensor) -> None:
    prices, volume = ohlcv[..., :4], ohlcv[..., 4]
    if not torch.isfinite(ohlcv).all():
        raise DataError("candles contain NaN or infinite values; drop or repair those bars first")
    if (prices <= 0).any():
        bad = prices[prices <= 0][0].item()
        raise DataError(f"candle prices must be > 0, found {bad}; drop or repair those bars first")
    if (volume < 0).any():
        raise DataError(f"candle volume must be >= 0, found {volume[volume < 0][0].item()}")


def patch_bars(x: Tensor, patch_length: int) -> tuple[Tensor, int]:
    """x [..., T, F] -> ([..., N, patch_length, F], dropped) keeping the last N = T // patch_length patches."""
    t = x.shape[-2]
    n = t // patch_length
    if n == 0:
        raise DataError(f"a window of {t} bars is shorter than one patch of {patch_length} bars")
    dropped = t - n * patch_length
    return x[..., dropped:, :].reshape(*x.shape[:-2], n, patch_length, x.shape[-1]), dropped


def bar_features(ohlcv: Tensor) -> Tensor:
    """ohlcv [..., T, 5] -> [..., T, 5]: log(open, high, low, close / previous close), log1p(volume).

    Prices relative to the previous close make the features scale-free; the first bar of a window uses its own open
    as the previous close. Computed in float64 then returned as float32 (log returns of 1e-5 survive).
    """
    _check_prices(ohlcv)
    x = ohlcv.double()
    prev_close = torch.cat([x[..., :1, 0], x[..., :-1, 3]], dim=-1)
    rel = torch.log(x[..., :4] / prev_close.unsqueeze(-1))
    return torch.cat([rel, torch.log1p(x[..., 4:5])], dim=-1).float()


def calendar_features(open_time_ms: Tensor) -> Tensor:
    """open_time_ms [...] int64 -> [..., 4]: sin/cos of the hour of day and of the weekday (UTC)."""
    t = open_time_ms.long()
    hour = torch.remainder(t, _DAY_MS).double() / _HOUR_MS
    weekday = torch.remainder(torch.div(t, _DAY_MS, rounding_mode="floor") + 3, 7).double()  # 1970-01-01: Thursday
    h, w = 2 * math.pi * hour / 24, 2 * math.pi * weekday / 7
    return torch.stack([h.sin(), h.cos(), w.sin(), w.cos()], dim=-1).float()


def _causal_surprise(x: Tensor) -> Tensor:
    """x [..., N] minus the mean of x[..., :i] (the earlier positions of the window); 0 at the first position."""
    n = x.shape[-1]
    prior_sum = torch.cumsum(x, dim=-1) - x
    count = torch.arange(n, device=x.device, dtype=x.dtype)
    prior_mean = prior_sum / count.clamp_min(1)
    return torch.where(count > 0, x - prior_mean, torch.zeros_like(x))


def clock_features(candles: CandleBatch, patch_length: int) -> Tensor:
    """Per-patch exo-clock features [B, N, 6] in the order of `CLOCK_FEATURES`.

    log_rv_surprise: log realised volatility of the patch (sqrt of summed squared close-to-close log returns) minus its
    mean over the earlier patches of the window; log_volume_surprise: the same for log(1 + volume summed over the
    patch); then the calendar of the patch's last bar. Surprises rather than levels keep the features comparable
    across assets and eras.
    """
    feats = bar_features(candles.ohlcv)
    patches, dropped = patch_bars(feats, patch_length)  # [B, N, P, 5]
    rv = torch.sqrt((patches[..., 3].double() ** 2).sum(-1) + 1e-12)
    log_rv = torch.log(rv + 1e-8)
    volume = patch_bars(candles.ohlcv[..., 4:5].double(), patch_length)[0].sum(dim=(-1, -2))
    log_vol = torch.log1p(volume)
    last_time = candles.open_time_ms[:, dropped:].reshape(*patches.shape[:2], patch_length)[..., -1]
    market = torch.stack([_causal_surprise(log_rv), _causal_surprise(log_vol)], dim=-1).float()
    return torch.cat([market, calendar_features(last_time)], dim=-1)
