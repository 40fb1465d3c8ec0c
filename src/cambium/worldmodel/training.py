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

__all__ = [
    "CandleSeries", "GeneratorState", "JEPASteps", "TokenizerSteps", "candle_batch_fn", "fit_jepa", "fit_tokenizer",
    "sample_windows", "tokenize_series",
]

StepCallback = Callable[[int, dict[str, float]], None]
# (generator) -> (code indices [B, N], clock features [B, N, F])
JEPABatchFn = Callable[[torch.Generator], tuple[Tensor, Tensor]]


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


class GeneratorState:
    """A torch.Generator as a checkpointable object (state_dict / load_state_dict)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Tensor]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["state"])


class TokenizerSteps:
    """Strate I training one optimizer step at a time; `state()` holds everything a checkpoint needs."""

    def __init__(self, model: FSQTokenizer, series: Sequence[CandleSeries], train: TrainConfig,
                 generator: torch.Generator, window_patches: int = 8) -> None:
        self.model, self.series, self.train, self.generator = model, series, train, generator
        self.bars = window_patches * model.cfg.patch_length
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, train)

    def state(self) -> dict[str, object]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                "generator": GeneratorState(self.generator)}

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step number `step` (0-based) -> {loss, grad_norm, lr} (lr used by this step)."""
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        out = self.model(sample_windows(self.series, self.bars, self.train.batch_size, self.generator).ohlcv)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.opt.step()
        self.sched.step(step + 1)
        return {"loss": float(out.loss.detach()), "grad_norm": float(grad_norm), "lr": float(lr)}


class JEPASteps:
    """Strate II training one optimizer step at a time on batches from `batch_fn` (the tokenizer stays frozen)."""

    def __init__(self, model: WorldModelJEPA, batch_fn: JEPABatchFn, train: TrainConfig,
                 generator: torch.Generator) -> None:
        self.model, self.batch_fn, self.train, self.generator = model, batch_fn, train, generator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.sched = _optimizer(self.params, train)

    def state(self) -> dict[str, object]:
        return {"model": self.model, "optimizer": self.opt, "scheduler": self.sched,
                "generator": GeneratorState(self.generator)}

    def step(self, step: int) -> dict[str, float]:
        """Optimizer step number `step` (0-based) -> loss terms, grad_norm, lr, ema momentum."""
        cfg = self.model.cfg
        self.model.train()
        lr = self.opt.param_groups[0]["lr"]
        indices, clock = self.batch_fn(self.generator)
        mask = block_mask(indices.shape[0], indices.shape[1], cfg.masking, self.generator)
        out = self.model(indices, clock, mask)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
        self.opt.step()
        self.sched.step(step + 1)
        tau = ema_momentum(step + 1, self.train.steps, cfg.ema)
        self.model.update_target(tau)
        return {
            "loss": float(out.loss.detach()), "invariance": float(out.invariance.detach()),
            "variance": float(out.variance.detach()), "covariance": float(out.covariance.detach()),
            "grad_norm": float(grad_norm), "lr": float(lr), "ema_tau": float(tau),
        }


def candle_batch_fn(series: Sequence[CandleSeries], model: WorldModelJEPA, batch_size: int) -> JEPABatchFn:
    """Random windows of seq_len patches from `series`, tokenized on the fly (patch grid moves with the start)."""
    patch = model.tokenizer.cfg.patch_length

    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        candles = sample_windows(series, model.cfg.seq_len * patch, batch_size, generator)
        return model.tokenizer.tokenize(candles.ohlcv), clock_features(candles, patch)

    return batch


def fit_tokenizer(
    model: FSQTokenizer,
    series: Sequence[CandleSeries],
    train: TrainConfig,
    generator: torch.Generator,
    window_patches: int = 8,
    on_step: StepCallback | None = None,
) -> list[float]:
    """Train Strate I for train.steps steps on random windows; returns the loss of every step."""
    steps = TokenizerSteps(model, series, train, generator, window_patches)
    losses = []
    for step in range(train.steps):
        row = steps.step(step)
        losses.append(row["loss"])
        if on_step is not None:
            on_step(step, {"loss": row["loss"], "grad_norm": row["grad_norm"]})
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
    steps = JEPASteps(model, candle_batch_fn(series, model, train.batch_size), train, generator)
    history = []
    for step in range(train.steps):
        full = steps.step(step)
        row = {k: full[k] for k in ("loss", "invariance", "variance", "covariance", "grad_norm")}
        history.append(row)
        if on_step is not None:
            on_step(step, row)
    model.eval()
    return history
