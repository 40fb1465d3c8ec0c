"""Training loops of Strate I and Strate II on in-memory candle series (the pipeline adds runs, metrics, checkpoints).

Windows are sampled uniformly: a series with enough bars, then a start bar. Tokenizer windows start at any bar, so
patch boundaries move from one step to the next (more distinct patches than a fixed grid gives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cambium.core.errors import DataError
from cambium.core.schedule import CosineSchedule, LRScheduler
from cambium.worldmodel.config import TrainConfig
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA, block_mask, ema_momentum
from cambium.worldmodel.tokenizer import FSQTokenizer

__all__ = ["CandleSeries", "fit_jepa", "fit_tokenizer", "sample_windows", "tokenize_series"]

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class CandleSeries:
    """One instrument's contiguous bars: ohlcv [T, 5] (float64), open_time_ms [T] (int64)."""

    name: str
    ohlcv: Tensor
    open_time_ms: Tensor


def sample_windows(
    series: Sequence[CandleSeries], bars: int, batch: int, generator: torch.Generator
) -> CandleBatch:
    """`batch` random windows of `bars` consecutive bars -> CandleBatch (ohlcv [batch, bars, 5] float32)."""
    usable = [s for s in series if s.ohlcv.shape[0] >= bars]
    if not usable:
        longest = max((s.ohlcv.shape[0] for s in series), default=0)
        raise DataError(f"no series has {bars} bars for one training window (longest: {longest}); shorten seq_len")
    which = torch.randint(len(usable), (batch,), generator=generator).tolist()
    ohlcv, times = [], []
    for i in which:
        s = usable[i]
        start = int(torch.randint(s.ohlcv.shape[0] - bars + 1, (1,), generator=generator))
        ohlcv.append(s.ohlcv[start : start + bars])
        times.append(s.open_time_ms[start : start + bars])
    return CandleBatch(torch.stack(ohlcv).float(), torch.stack(times))


def _optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> tuple[torch.optim.AdamW, LRScheduler]:
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    schedule = CosineSchedule(
        lr_max=train.lr, lr_min=train.lr * 0.1, warmup=min(train.warmup_steps, train.steps), total=train.steps
    )
    return opt, LRScheduler(opt, schedule)


def fit_tokenizer(
    model: FSQTokenizer,
    series: Sequence[CandleSeries],
    train: TrainConfig,
    generator: torch.Generator,
    window_patches: int = 8,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train Strate I for train.steps steps on random windows; returns the loss of every step."""
    bars = window_patches * model.cfg.patch_length
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, train)
    model.train()
    losses = []
    for step in range(train.steps):
        out = model(sample_windows(series, bars, train.batch_size, generator).ohlcv)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step(step + 1)
        losses.append(float(out.loss.detach()))
        if on_step is not None:
            on_step(step, {"loss": losses[-1], "grad_norm": float(grad_norm)})
    model.eval()
    return losses


@torch.no_grad()
def tokenize_series(model: FSQTokenizer, series: Sequence[CandleSeries]) -> list[Tensor]:
    """Codes [N_i] of each series on the fixed grid of patches ending at its last bar."""
    model.eval()
    return [model.tokenize(s.ohlcv.float().unsqueeze(0))[0] for s in series]


def fit_jepa(
    model: WorldModelJEPA,
    series: Sequence[CandleSeries],
    train: TrainConfig,
    generator: torch.Generator,
    on_step: StepCallback | None = None,
) -> list[dict[str, float]]:
    """Train Strate II (the tokenizer stays frozen); returns the loss terms of every step."""
    cfg = model.cfg
    patch = model.tokenizer.cfg.patch_length
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(params, train)
    model.train()
    history = []
    for step in range(train.steps):
        candles = sample_windows(series, cfg.seq_len * patch, train.batch_size, generator)
        indices = model.tokenizer.tokenize(candles.ohlcv)
        clock = clock_features(candles, patch)
        mask = block_mask(indices.shape[0], indices.shape[1], cfg.masking, generator)
        out = model(indices, clock, mask)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        opt.step()
        sched.step(step + 1)
        model.update_target(ema_momentum(step + 1, train.steps, cfg.ema))
        row = {
            "loss": float(out.loss.detach()), "invariance": float(out.invariance.detach()),
            "variance": float(out.variance.detach()), "covariance": float(out.covariance.detach()),
            "grad_norm": float(grad_norm),
        }
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    model.eval()
    return history
